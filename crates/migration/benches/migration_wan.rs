//! Migration benchmark skeleton (issue 5): the same running test guest migrated over the same
//! emulated WAN link (`novacron-linkemu`) by QEMU's own precopy (one TCP stream) and through the
//! NovaCron proxy (codec + transport session), one after the other in one run. Prints one table.
//! Needs root (namespaces, TUN devices) and the test guest (`scripts/build-guest`).
//!
//! QEMU runs in the root namespace; the link joins two namespaces A and B. Both methods carry
//! QEMU's stream the same way into and out of the link: the source QEMU migrates into a unix
//! socket served by a thread in namespace A, and a thread in namespace B writes into the
//! destination QEMU's `-incoming` unix socket. For "qemu precopy" those threads only relay bytes
//! over one TCP connection; for "proxy" they run `send_migration_stream` /
//! `receive_migration_stream` over a transport session; for "proxy-multifd" QEMU's multifd
//! (no compression) opens five connections and each crosses over a session of its own
//! (`send_multifd_migration` / `receive_multifd_migration`). QEMU's max-bandwidth is raised
//! far above the link in all, so the link (or the proxy) sets the pace.
//!
//! Options: `--help` lists them (`USAGE` below). See bench/migration/README.md.

#[path = "support/arguments.rs"]
mod arguments;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/disk_mirror.rs"]
mod disk_mirror;
#[path = "support/qemu_methods.rs"]
mod qemu_methods;
#[path = "support/realistic_disk.rs"]
mod realistic_disk;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use common::pinned_pair;
use novacron_linkemu::{LinkEmulator, RunningLink};
use novacron_migration::{
    ConvergencePlanner, DeliveredPages, HeldFile, PROXY_MULTIFD_CHANNELS, PlanInputs, ProxyConfig,
    ProxyReport, SharedImagePages, expected_send_window, migration_session_options,
    multifd_session_options, queued_wire_bytes, receive_migration_stream,
    receive_migration_stream_duplex, receive_multifd_migration, send_migration_stream,
    send_migration_stream_duplex, send_multifd_migration,
};
use novacron_qemu::{LaunchSpec, QemuBinaries, QemuVm, TestGuest, wait_for_console_text};
use novacron_transport::{Listener, Session, SessionOptions, TlsSettings};
use qemu_methods::{MULTIFD_CHANNELS, first_event};
use realistic_disk::{RealisticDisk, realistic_disk};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(600);
/// The guest workload's default dirty rate: 1024 fresh 4 KiB pages a second.
const WORKLOAD_DIRTY_BYTES_PER_SECOND: f64 = 1024.0 * 4096.0;

#[derive(Clone, Debug)]
struct Options {
    rate_mbit: f64,
    delay_ms: u64,
    loss: f64,
    memory_mib: u64,
    workload_mib: u64,
    methods: Vec<Method>,
    /// The proxy's transport send window: data queued beyond the link is data the guest's
    /// final pause has to wait for.
    send_window_mib: u64,
    /// The proxy's zstd level for page frames.
    zstd_level: i32,
    /// Whether RAM pages equal to a block of the guest's kernel or initrd travel as hashes, as
    /// `vm migrate` does when the destination reports the same files.
    held_boot_files: bool,
    /// `--link-timeline true`: print what the link carried in each quarter second.
    link_timeline: bool,
    /// `--offload`: the emulator forwards TCP super-packets (`LinkBuilder::segmentation_offload`;
    /// loss, queue and rate still act per 1500-byte segment). On by default: per-packet
    /// forwarding took a quarter of this machine's two cores at 1 Gbit/s, taken from QEMU and
    /// the proxy, which a real link does not.
    offload: bool,
    /// What the link was measured to carry before, Mbit/s (0: nothing known): `vm migrate`
    /// starts the proxy's send window from the link's forecast, keeps it at least four of its
    /// bandwidth-delay products, and limits the connections' pacing a third above it, when a
    /// transfer measured the link before.
    forecast_mbit: f64,
    /// `--forecast-mbit measure` (the default): before the methods run, a transfer over the
    /// transport measures the link for a bandwidth model as an earlier transfer between the
    /// hosts would, and its five-second forecast is `forecast_mbit`.
    measure_forecast: bool,
    /// The realistic workload's disk (0: none, the adversarial workload alone): a base image of
    /// this size filled with this machine's own files, which the guest reads whole into its page
    /// cache before the move, under a qcow2 overlay on each side (the destination holds the base).
    disk_mib: u64,
    /// With a disk: 0 when it is shared (both QEMUs open one overlay chain on the base image);
    /// else it is local, its overlay holds this many MiB the guest wrote, and the block mirror
    /// moves it to a fresh overlay on the destination before the memory moves.
    local_disk_written_mib: u64,
    /// The post-copy methods switch once QEMU has made this many full passes (0: at once, so
    /// every page crosses once, after the switch).
    postcopy_after_passes: u64,
    /// Whether to time plain TCP connections moving the floor's bytes on the same link.
    tcp_reference: bool,
    /// Whether to time QEMU's precopy into a local socket (no destination, no link).
    qemu_reference: bool,
    /// Keep that reference's stream (and the realistic disk's base image) in this directory,
    /// for the `proxy_codec` bench.
    save_stream: Option<PathBuf>,
    transport: TransportKnobs,
    /// What the workload writes: `random` (incompressible, the default) or `records`
    /// (application-like text records, about 4x with zstd -3; see scripts/guest/workload.c).
    workload_kind: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    QemuPrecopy,
    /// QEMU's multifd with 4 channels and zstd, max-bandwidth far above the link (QEMU applies
    /// its cap before compression).
    QemuMultifdZstd,
    /// QEMU's precopy with XBZRLE (delta of re-sent pages against a 256 MiB cache).
    QemuXbzrle,
    Proxy,
    /// The proxy with QEMU's multifd (no compression) behind it: each of QEMU's connections
    /// proxied over a session of its own (`novacron_migration::multichannel`).
    ProxyMultifd,
    /// QEMU's precopy switched to post-copy after its first pass (QEMU's return path relayed
    /// over the same TCP connection).
    QemuPostcopy,
    /// The proxy, switched to post-copy after the first pass, as `vm migrate
    /// --when-not-converging post-copy` does (the return path over the session).
    ProxyPostcopy,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::QemuPrecopy => "qemu precopy (1 tcp stream)",
            Method::QemuMultifdZstd => "qemu multifd x4 + zstd",
            Method::QemuXbzrle => "qemu precopy + xbzrle",
            Method::Proxy => "novacron proxy (codec + transport)",
            Method::ProxyMultifd => "novacron proxy, qemu multifd x4 behind it",
            Method::QemuPostcopy => "qemu precopy, then post-copy",
            Method::ProxyPostcopy => "novacron proxy, then post-copy",
        }
    }

    fn parse(text: &str) -> anyhow::Result<Method> {
        Ok(match text {
            "qemu" => Method::QemuPrecopy,
            "multifd" => Method::QemuMultifdZstd,
            "xbzrle" => Method::QemuXbzrle,
            "proxy" => Method::Proxy,
            "proxy-multifd" => Method::ProxyMultifd,
            "postcopy" => Method::QemuPostcopy,
            "proxy-postcopy" => Method::ProxyPostcopy,
            other => bail!(
                "unknown method {other:?}: use qemu, multifd, xbzrle, proxy, proxy-multifd, \
                 postcopy and/or proxy-postcopy"
            ),
        })
    }

    /// Connections QEMU opens to the migration socket (the main one, plus multifd channels).
    fn connections(self) -> usize {
        match self {
            Method::QemuMultifdZstd => 1 + MULTIFD_CHANNELS,
            Method::ProxyMultifd => 1 + PROXY_MULTIFD_CHANNELS,
            _ => 1,
        }
    }

    /// Capabilities and parameters set on both QEMUs before the migration.
    fn settings(self) -> (serde_json::Value, serde_json::Value) {
        match self {
            Method::QemuMultifdZstd => qemu_methods::multifd_zstd(),
            Method::ProxyMultifd => (
                json!([{ "capability": "multifd", "state": true }]),
                json!({
                    "multifd-channels": PROXY_MULTIFD_CHANNELS,
                    "multifd-compression": "none",
                }),
            ),
            Method::QemuXbzrle => qemu_methods::xbzrle(),
            Method::QemuPostcopy | Method::ProxyPostcopy => (
                json!([{ "capability": "postcopy-ram", "state": true }]),
                json!({}),
            ),
            Method::QemuPrecopy | Method::Proxy => (json!([]), json!({})),
        }
    }

    fn postcopy(self) -> bool {
        matches!(self, Method::QemuPostcopy | Method::ProxyPostcopy)
    }

    fn proxied(self) -> bool {
        matches!(
            self,
            Method::Proxy | Method::ProxyMultifd | Method::ProxyPostcopy
        )
    }
}

struct Outcome {
    method: Method,
    seconds: f64,
    stream_bytes: u64,
    wire_bytes: u64,
    passes: u64,
    qemu_downtime_ms: u64,
    /// Source STOP event to destination RESUME event (QMP timestamps, same host clock).
    real_pause_ms: Option<f64>,
    guest_continued: bool,
    /// With a local disk: when the mirror was in sync (seconds from the start), and whether
    /// the destination's disk ended identical to the source's.
    local_disk: Option<(f64, bool)>,
}

/// What the proxy's session measures, published by the source side for the convergence planner
/// (the same planner `novacron vm migrate` runs).
#[derive(Debug, Clone, Copy, Default)]
struct LinkView {
    rate_bytes_per_second: f64,
    wire_bytes_sent: u64,
    send_window_bytes: u64,
    round_trip: Duration,
}

type SharedLinkView = Arc<std::sync::Mutex<Option<LinkView>>>;

/// What the source side tells the run while it goes: the link as its session measures it, and
/// that it is ready for QEMU's stream.
struct SourceSignals {
    link_view: SharedLinkView,
    ready: tokio::sync::oneshot::Sender<()>,
    transport: TransportKnobs,
}

/// Experiments with the proxy's transport session (`None`: the session's defaults, which
/// `vm migrate` uses).
#[derive(Clone, Copy, Debug, Default)]
struct TransportKnobs {
    /// `--unsent-limit-kib`: each connection's `TCP_NOTSENT_LOWAT`.
    unsent_limit_kib: Option<u32>,
    /// `--initial-connections`: bulk connections opened first.
    initial_connections: Option<u32>,
    /// `--adapt-streams`: whether the session adds connections while its rate rises.
    adapt_streams: Option<bool>,
    /// `--congestion-control NAME`: the TCP congestion control of the session's connections
    /// (`default`: this kernel's default).
    congestion_control: Option<&'static str>,
}

/// The guest's pause limit every method gets (QEMU's default).
const DOWNTIME_LIMIT: Duration = Duration::from_millis(300);

const USAGE: &str = "
One running test guest migrated over the emulated WAN link by QEMU's own methods and by
NovaCron's proxy, one after the other; one table (bench/migration/README.md). Needs root and the
test guest (scripts/build-guest).

cargo bench -p novacron-migration --bench migration_wan -- [options]

The link and the guest:
  --rate-mbit R                 link rate, Mbit/s (default 100)
  --delay-ms D                  one-way delay, ms (default 25: a 50 ms round trip)
  --loss P                      random loss per direction, 0-1 (default 0)
  --offload BOOL                forward TCP super-packets through the emulator (default true)
  --memory-mib N                guest memory (default 256)
  --workload-mib N              memory the guest's workload keeps rewriting (default 64)
  --workload-kind KIND          random (incompressible, default) or records (text-like)
  --disk-mib N                  the realistic workload: a disk of this machine's files the
                                guest reads first (default 0: none)
  --local-disk-written-mib N    with --disk-mib: the disk is local; N MiB written into its
                                overlay move by block mirror first (default 0: shared disk)

What runs:
  --methods LIST                qemu, multifd, xbzrle, proxy, proxy-multifd, postcopy,
                                proxy-postcopy, comma-separated, or none (default
                                qemu,multifd,xbzrle,proxy)
  --postcopy-after-passes N     the post-copy methods switch after N passes (default 1)
  --tcp-reference BOOL          time plain TCP moving the floor's bytes (default true)
  --qemu-reference BOOL         time QEMU's precopy into a local socket (default false)
  --save-stream DIR             keep that reference's stream for the proxy_codec bench
  --link-timeline BOOL          print the link's and QEMU's rates per quarter second and the
                                switch-over's moments (default false)

The proxy:
  --forecast-mbit measure|none|N  the link's forecast the proxy starts from: measured by a 5 s
                                transfer first (default), none, or N Mbit/s
  --held-boot-files BOOL        pages equal to the kernel's or initrd's travel as hashes
                                (default true)
  --send-window-mib N           a fixed send window (default 0: adaptive)
  --zstd-level L                zstd level of page frames
  --unsent-limit-kib N, --initial-connections N, --adapt-streams BOOL,
  --congestion-control NAME|default     transport experiments
";

/// The options, or `None` when `--help` was asked for (and printed).
fn parse_options() -> anyhow::Result<Option<Options>> {
    let mut options = Options {
        rate_mbit: 100.0,
        delay_ms: 25,
        loss: 0.0,
        memory_mib: 256,
        workload_mib: 64,
        methods: vec![
            Method::QemuPrecopy,
            Method::QemuMultifdZstd,
            Method::QemuXbzrle,
            Method::Proxy,
        ],
        send_window_mib: 0,
        zstd_level: novacron_codec::PageEncoderConfig::default().zstd_level,
        held_boot_files: true,
        link_timeline: false,
        offload: true,
        forecast_mbit: 0.0,
        measure_forecast: true,
        disk_mib: 0,
        local_disk_written_mib: 0,
        postcopy_after_passes: 1,
        tcp_reference: true,
        qemu_reference: false,
        save_stream: None,
        transport: TransportKnobs::default(),
        workload_kind: "random".to_string(),
    };
    let Some(values) = arguments::named_values(USAGE)? else {
        return Ok(None);
    };
    for (name, value) in values {
        let value = &value;
        match name.as_str() {
            "--rate-mbit" => options.rate_mbit = value.parse()?,
            "--delay-ms" => options.delay_ms = value.parse()?,
            "--loss" => options.loss = value.parse()?,
            "--memory-mib" => options.memory_mib = value.parse()?,
            "--workload-mib" => options.workload_mib = value.parse()?,
            "--send-window-mib" => options.send_window_mib = value.parse()?,
            "--zstd-level" => options.zstd_level = value.parse()?,
            "--forecast-mbit" => {
                options.measure_forecast = value == "measure";
                options.forecast_mbit = match value.as_str() {
                    "measure" | "none" => 0.0,
                    number => number.parse()?,
                };
            }
            "--disk-mib" => options.disk_mib = value.parse()?,
            "--local-disk-written-mib" => options.local_disk_written_mib = value.parse()?,
            "--postcopy-after-passes" => options.postcopy_after_passes = value.parse()?,
            "--tcp-reference" => options.tcp_reference = value.parse()?,
            "--qemu-reference" => options.qemu_reference = value.parse()?,
            "--held-boot-files" => options.held_boot_files = value.parse()?,
            "--link-timeline" => options.link_timeline = value.parse()?,
            "--offload" => options.offload = value.parse()?,
            "--save-stream" => {
                options.save_stream = Some(PathBuf::from(value));
                options.qemu_reference = true;
            }
            "--unsent-limit-kib" => options.transport.unsent_limit_kib = Some(value.parse()?),
            "--initial-connections" => {
                options.transport.initial_connections = Some(value.parse()?);
            }
            "--adapt-streams" => options.transport.adapt_streams = Some(value.parse()?),
            "--congestion-control" => {
                options.transport.congestion_control = Some(String::leak(value.clone()));
            }
            "--workload-kind" => {
                anyhow::ensure!(
                    value == "random" || value == "records",
                    "--workload-kind is random or records, not {value}"
                );
                options.workload_kind = value.clone();
            }
            "--methods" if value == "none" => options.methods = Vec::new(),
            "--methods" => {
                options.methods = value
                    .split(',')
                    .map(Method::parse)
                    .collect::<anyhow::Result<_>>()?;
            }
            other => bail!("unknown option {other:?}: --help lists the options"),
        }
    }
    if options.local_disk_written_mib > 0 {
        anyhow::ensure!(
            options.local_disk_written_mib >= 32
                && options.local_disk_written_mib * 2 <= options.disk_mib,
            "--local-disk-written-mib must be at least 32 and at most half of --disk-mib"
        );
        anyhow::ensure!(
            !options.methods.iter().any(|method| method.postcopy()),
            "--local-disk-written-mib runs precopy methods only (a post-copy switch waits for \
             the mirror first, as `vm migrate` does; not in this bench)"
        );
    }
    Ok(Some(options))
}

fn main() -> anyhow::Result<()> {
    // `RUST_LOG=novacron_transport=debug,novacron_migration=debug` shows the transport's stream
    // count and the proxy's send window as they change.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let Some(mut options) = parse_options()? else {
        return Ok(());
    };
    let guest = TestGuest::locate()?;
    let binaries = QemuBinaries::locate()?;
    let link = Arc::new(
        LinkEmulator::builder()
            .name_prefix("nmig")
            .delay(Duration::from_millis(options.delay_ms))
            .loss(options.loss)
            .rate_bits_per_sec(options.rate_mbit * 1e6)
            .seed(5)
            .segmentation_offload(options.offload)
            .spawn()
            .context("starting the link emulator (run as root)")?,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let disk = (options.disk_mib > 0)
        .then(|| realistic_disk(options.disk_mib))
        .transpose()?;
    let written = tempfile::Builder::new()
        .prefix("nmb-w-")
        .tempdir_in("/tmp")?;
    let local_disk = match &disk {
        Some(disk) if options.local_disk_written_mib > 0 => Some(disk_mirror::write_overlay(
            disk,
            options.disk_mib,
            options.local_disk_written_mib,
            written.path(),
        )?),
        _ => None,
    };
    // `vm migrate`'s hosts hash and index the kernel and initrd of a direct kernel boot while
    // they prepare (each side its own copy, at the same time). This index serves both sides of
    // every proxied run; `run_one` times another beside the destination QEMU's start.
    let boot_files = if options.held_boot_files {
        let started = Instant::now();
        let files = index_boot_files(guest.vmlinuz.clone(), guest.initrd.clone())?;
        Some(BootFiles {
            files,
            seconds: started.elapsed().as_secs_f64(),
        })
    } else {
        None
    };
    let measured_forecast =
        if options.measure_forecast && options.methods.iter().any(|method| method.proxied()) {
            options.forecast_mbit = measure_forecast(&link)?;
            eprintln!(
                "== the link's forecast after a {} s transfer: {:.0} Mbit/s",
                FORECAST_TRANSFER.as_secs(),
                options.forecast_mbit
            );
            true
        } else {
            false
        };
    let mut outcomes = Vec::new();
    for &method in &options.methods {
        let outcome = runtime.block_on(run_one(
            method,
            &link,
            &options,
            &guest,
            &binaries,
            Held {
                disk: disk.as_ref(),
                boot_files: boot_files.as_ref(),
            },
            local_disk.as_ref().map(|(overlay, _)| overlay.as_path()),
        ))?;
        outcomes.push(outcome);
    }
    let qemu_reference = if options.qemu_reference {
        let setup = GuestSetup {
            guest: &guest,
            options: &options,
            uuid: uuid::Uuid::new_v4(),
            disk: disk.as_ref(),
            written_overlay: local_disk.as_ref().map(|(overlay, _)| overlay.as_path()),
        };
        Some(runtime.block_on(qemu_stream_reference(
            &binaries,
            &setup,
            options.save_stream.as_deref(),
        ))?)
    } else {
        None
    };
    println!(
        "\nlink: {} Mbit/s, {} ms RTT, {} % loss; guest {} MiB (TCG) with a {} MiB dirtying workload ({})",
        options.rate_mbit,
        2 * options.delay_ms,
        options.loss * 100.0,
        options.memory_mib,
        options.workload_mib,
        options.workload_kind
    );
    if options.forecast_mbit > 0.0 {
        println!(
            "the proxy's send window starts from a forecast of {:.0} Mbit/s for this link{} and \
             stays at least four of its bandwidth-delay products, and its connections' pacing is \
             limited a third above it (as `vm migrate` does once a transfer measured the link)",
            options.forecast_mbit,
            if measured_forecast {
                format!(
                    " (the bandwidth model's five-second forecast after a {} s transfer over the \
                     transport on this link, before the methods ran)",
                    FORECAST_TRANSFER.as_secs()
                )
            } else {
                String::new()
            }
        );
    } else {
        println!(
            "the proxy starts without a forecast of the link (its window ramps up from a guess)"
        );
    }
    if let Some(disk) = &disk {
        println!(
            "realistic workload: the guest first read its whole {} MiB disk ({:.0} MiB of this \
             machine's files) into its page cache; the destination holds the base image. The \
             proxy's time includes loading the base image's saved page index ({:.2} s; \
             building it took {:.1} s, once, when the image arrived)",
            options.disk_mib,
            disk.file_bytes as f64 / f64::from(1u32 << 20),
            disk.index_seconds,
            disk.build_seconds
        );
    }
    if let Some(boot) = &boot_files {
        println!(
            "boot files: RAM pages equal to a block of the guest's kernel or initrd (both hosts \
             hold them) travel as hashes; hashing and indexing them takes {:.2} s alone, done \
             while the destination QEMU starts as `vm migrate` does: what it takes beyond that \
             start is in the proxy's time",
            boot.seconds
        );
    }
    if let Some((_, random_bytes)) = &local_disk {
        println!(
            "local disk: not shared; the source's overlay holds {} MiB the guest wrote (half \
             copies of its own files, 3/8 application text, 1/8 random: {:.0} MB that cannot \
             shrink, {:.1} s at the link rate), mirrored before the memory moves; total time \
             from the mirror's start until the guest runs on the destination",
            options.local_disk_written_mib,
            *random_bytes as f64 / 1e6,
            *random_bytes as f64 * 8.0 / (options.rate_mbit * 1e6)
        );
    }
    // The floors hold for the random workload only: a records workload compresses.
    if options.workload_kind != "random" {
        println!(
            "floor: not computed for the {} workload (its pages compress about 4x)",
            options.workload_kind
        );
    }
    // The floor: the workload's region is fresh pseudo-random data (neither zero, repeated nor
    // compressible), so at least that much crosses the link whatever the method.
    let floor_seconds = (options.workload_mib << 20) as f64 * 8.0 / (options.rate_mbit * 1e6);
    if options.workload_kind == "random" {
        println!(
            "floor: {} MiB of incompressible workload memory at {} Mbit/s = {floor_seconds:.1} s",
            options.workload_mib, options.rate_mbit
        );
    }
    // The precopy floor: the pages the workload rewrites while the region crosses are fresh
    // random data too and must cross again, so a live copy moves at least M / (R - D).
    let link_bytes_per_second = options.rate_mbit * 1e6 / 8.0;
    if options.workload_kind == "random" && link_bytes_per_second > WORKLOAD_DIRTY_BYTES_PER_SECOND
    {
        let precopy_floor = (options.workload_mib << 20) as f64
            / (link_bytes_per_second - WORKLOAD_DIRTY_BYTES_PER_SECOND);
        println!(
            "precopy floor: the region plus what the workload rewrites meanwhile ({:.1} MiB/s) = \
             {precopy_floor:.1} s",
            WORKLOAD_DIRTY_BYTES_PER_SECOND / f64::from(1u32 << 20)
        );
    }
    if options.workload_kind == "random" && options.tcp_reference {
        // What TCP itself takes from a cold start for the bytes no method can shrink.
        let bytes = options.workload_mib << 20;
        for connections in [1, 4] {
            let seconds = tcp_reference(&link, bytes, connections)?;
            println!(
                "TCP reference: {} MiB of random bytes over {connections} plain TCP \
                 connection{} (no QEMU, TLS or codec; this kernel's default congestion control) \
                 on the same link: {seconds:.1} s, {:.2}x the floor",
                options.workload_mib,
                if connections == 1 { "" } else { "s" },
                seconds / floor_seconds
            );
        }
    }
    if options.methods.iter().any(|method| method.postcopy()) {
        println!(
            "post-copy methods: switched to post-copy after {} full pass(es) of QEMU's precopy",
            options.postcopy_after_passes
        );
    }
    if let Some((seconds, bytes)) = qemu_reference {
        println!(
            "QEMU reference: QEMU's precopy of this guest into a local socket {} (no \
             destination, no link): {seconds:.1} s for {:.1} MB of stream",
            if options.save_stream.is_some() {
                "written to a file"
            } else {
                "read and discarded"
            },
            bytes as f64 / 1e6
        );
    }
    let disk_columns = if local_disk.is_some() {
        (" disk in sync (s) | disk identical |", "---|---|")
    } else {
        ("", "")
    };
    println!(
        "| method | total time (s) | QEMU stream (MB) | on the link A→B (MB) | passes | QEMU downtime (ms) | real pause STOP→RESUME (ms) | guest continued |{}",
        disk_columns.0
    );
    println!("|---|---|---|---|---|---|---|---|{}", disk_columns.1);
    for outcome in &outcomes {
        let disk = outcome
            .local_disk
            .map(|(in_sync, identical)| {
                format!(" {in_sync:.1} | {} |", if identical { "yes" } else { "NO" })
            })
            .unwrap_or_default();
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} |{disk}",
            outcome.method.name(),
            outcome.seconds,
            outcome.stream_bytes as f64 / 1e6,
            outcome.wire_bytes as f64 / 1e6,
            outcome.passes,
            outcome.qemu_downtime_ms,
            outcome
                .real_pause_ms
                .map_or("?".to_owned(), |pause| format!("{pause:.0}")),
            if outcome.guest_continued { "yes" } else { "no" }
        );
    }
    if outcomes
        .iter()
        .any(|outcome| outcome.local_disk.is_some_and(|(_, identical)| !identical))
    {
        bail!("a destination disk differs from the source's");
    }
    Ok(())
}

/// How long the transfer that measures the link for the proxy's forecast runs.
const FORECAST_TRANSFER: Duration = Duration::from_secs(5);

/// Measures the link as an earlier transfer between the hosts would for `vm migrate`: random
/// bytes over a migration's transport session for [`FORECAST_TRANSFER`], every rate sample in
/// which the sender was backlogged fed to a bandwidth model (as the agent's link monitor
/// does). Returns the model's five-second forecast, Mbit/s.
fn measure_forecast(link: &Arc<RunningLink>) -> anyhow::Result<f64> {
    let (destination_tls, source_tls) = pinned_pair();
    let address_b = link.addr_b();
    let (port_sender, port_receiver) = tokio::sync::oneshot::channel();
    let receiver = {
        let link = link.clone();
        std::thread::spawn(move || {
            link.in_ns_b(move || -> anyhow::Result<()> {
                disk_mirror::relay_runtime()?.block_on(async move {
                    let (_listener, session) =
                        disk_mirror::accept_one_session(address_b, &destination_tls, port_sender)
                            .await?;
                    while session.recv().await?.is_some() {}
                    // Stay (acknowledging) until the sender says goodbye: its `close` waits
                    // for every frame's acknowledgement.
                    while session.control().next_incoming().await?.is_some() {}
                    Ok(())
                })
            })
        })
    };
    let model = Arc::new(std::sync::Mutex::new(novacron_bandwidth::LinkModel::new()));
    let observer = {
        let model = model.clone();
        novacron_transport::RateObserver::new(move |sample| {
            if sample.sender_backlogged {
                model
                    .lock()
                    .expect("the model's lock")
                    .observe(sample.bytes_acknowledged, sample.interval);
            }
        })
    };
    let sender = {
        let link = link.clone();
        std::thread::spawn(move || {
            link.in_ns_a(move || -> anyhow::Result<()> {
                disk_mirror::relay_runtime()?.block_on(async move {
                    let port = tokio::time::timeout(Duration::from_secs(10), port_receiver)
                        .await
                        .context("the forecast transfer's receiver did not start")??;
                    let options = SessionOptions {
                        rate_observer: Some(observer),
                        ..migration_session_options(SessionOptions::default())
                    };
                    let session =
                        Session::connect(SocketAddr::from((address_b, port)), &source_tls, options)
                            .await?;
                    let mut chunk = vec![0u8; 8 << 20];
                    blake3::Hasher::new()
                        .update(b"forecast transfer")
                        .finalize_xof()
                        .fill(&mut chunk);
                    let chunk = bytes::Bytes::from(chunk);
                    let started = Instant::now();
                    while started.elapsed() < FORECAST_TRANSFER {
                        session.send(chunk.clone()).await?;
                    }
                    session.finish().await?;
                    session.close().await?;
                    Ok(())
                })
            })
        })
    };
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("the forecast transfer's sender panicked"))???;
    receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the forecast transfer's receiver panicked"))???;
    let forecast = model
        .lock()
        .expect("the model's lock")
        .forecast(novacron_bandwidth::ForecastHorizon::FiveSeconds)
        .context("the forecast transfer measured nothing")?;
    Ok(forecast.expected_bits_per_sec / 1e6)
}

/// Plain TCP's time for `bytes` of random data over `connections` connections A→B on `link`,
/// from the first connect until the receiver has the last byte: what TCP itself needs here,
/// start-up and loss recovery included, for bytes nothing can shrink.
fn tcp_reference(link: &Arc<RunningLink>, bytes: u64, connections: usize) -> anyhow::Result<f64> {
    use std::io::{Read, Write};
    let address_b = link.addr_b();
    let (port_sender, port_receiver) = std::sync::mpsc::channel();
    let receiver = {
        let link = link.clone();
        std::thread::spawn(move || {
            link.in_ns_b(move || -> anyhow::Result<(Instant, u64)> {
                let listener = std::net::TcpListener::bind((address_b, 0))?;
                port_sender.send(listener.local_addr()?.port())?;
                let readers: Vec<_> = (0..connections)
                    .map(|_| {
                        let (mut connection, _) = listener.accept()?;
                        Ok(std::thread::spawn(move || -> std::io::Result<u64> {
                            let mut buffer = vec![0u8; 1 << 20];
                            let mut received = 0;
                            loop {
                                match connection.read(&mut buffer)? {
                                    0 => return Ok(received),
                                    count => received += count as u64,
                                }
                            }
                        }))
                    })
                    .collect::<anyhow::Result<_>>()?;
                let mut received = 0;
                for reader in readers {
                    received += reader
                        .join()
                        .map_err(|_| anyhow::anyhow!("a reader panicked"))??;
                }
                Ok((Instant::now(), received))
            })
        })
    };
    let port = port_receiver
        .recv_timeout(Duration::from_secs(10))
        .context("the TCP reference's receiver did not start")?;
    // Pseudo-random (BLAKE3's output): nothing on the path could shrink it either.
    let mut chunk = vec![0u8; 8 << 20];
    blake3::Hasher::new()
        .update(b"tcp reference")
        .finalize_xof()
        .fill(&mut chunk);
    let chunk = Arc::new(chunk);
    // Each connection takes the next MiB as it can send it (as multifd's channels take pages),
    // so one connection slowed by a loss does not hold a fixed share back.
    let left = Arc::new(std::sync::atomic::AtomicU64::new(bytes));
    let started = Instant::now();
    let senders: Vec<_> = (0..connections)
        .map(|_| {
            let link = link.clone();
            let chunk = chunk.clone();
            let left = left.clone();
            std::thread::spawn(move || {
                link.in_ns_a(move || -> std::io::Result<()> {
                    use std::sync::atomic::Ordering;
                    let mut connection = std::net::TcpStream::connect((address_b, port))?;
                    loop {
                        let taken = left
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                                left.checked_sub(left.min(1 << 20)).filter(|_| left > 0)
                            })
                            .map(|before| before.min(1 << 20));
                        let Ok(count) = taken else { break };
                        connection.write_all(&chunk[..count as usize])?;
                    }
                    connection.shutdown(std::net::Shutdown::Write)
                })
            })
        })
        .collect();
    for sender in senders {
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("a sender panicked"))???;
    }
    let (finished, received) = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the receiver panicked"))???;
    anyhow::ensure!(
        received == bytes,
        "the TCP reference received {received} of {bytes} bytes"
    );
    Ok(finished.duration_since(started).as_secs_f64())
}

/// What both QEMUs of one run share: the guest, its workload and disks, one VM identity.
struct GuestSetup<'a> {
    guest: &'a TestGuest,
    options: &'a Options,
    /// One VM identity on both sides, as a real migration has (multifd checks it).
    uuid: uuid::Uuid,
    disk: Option<&'a RealisticDisk>,
    written_overlay: Option<&'a Path>,
}

impl GuestSetup<'_> {
    /// The source's QEMU (`incoming: None`) or the destination's, waiting paused for the stream.
    fn spec(
        &self,
        name: &str,
        run_dir: &Path,
        incoming: Option<&Path>,
    ) -> anyhow::Result<LaunchSpec> {
        let GuestSetup {
            guest,
            options,
            uuid,
            disk,
            written_overlay,
        } = *self;
        let mut extra = format!(
            "novacron.workload=1 novacron.workload_mib={} novacron.workload_kind={}",
            options.workload_mib, options.workload_kind
        );
        if disk.is_some() {
            extra.push_str(" novacron.readdisk=1");
        }
        let mut spec = LaunchSpec::new(name, uuid, run_dir)
            .memory_mib(options.memory_mib)
            .kernel(guest.kernel_boot(&extra));
        if let Some(disk) = disk {
            // Each side its own overlay on the base image both hosts hold; with a local disk,
            // the source's holds what the guest wrote (a copy: every run starts from the same).
            let overlay = run_dir.join("disk.qcow2");
            match written_overlay {
                Some(written) if incoming.is_none() => {
                    std::fs::copy(written, &overlay)?;
                }
                _ => disk_mirror::create_overlay(&disk.base, &overlay)?,
            }
            // O_DIRECT where the file system allows it, as `vm migrate`'s hosts open disks.
            let direct_io = novacron_qemu::supports_direct_io(&[&overlay, &disk.base]);
            spec = spec
                .disk(overlay, novacron_qemu::ImageFormat::Qcow2)
                .disk_direct_io(direct_io);
        }
        if incoming.is_some() {
            // `defer`: capabilities (multifd) must be set before QEMU listens
            // (`migrate-incoming`).
            spec = spec.start_paused(true);
            spec.extra_arguments = vec!["-incoming".to_owned(), "defer".to_owned()];
        }
        Ok(spec)
    }
}

/// What the link carried A→B in each quarter second of a migration (`--link-timeline true`):
/// where a method leaves the link idle (start-up, stalls, the end) shows in no total.
struct LinkTimeline {
    link: Arc<RunningLink>,
    samples: Arc<std::sync::Mutex<Vec<(Instant, u64)>>>,
    sampler: tokio::task::JoinHandle<()>,
}

impl LinkTimeline {
    const STEP: Duration = Duration::from_millis(250);

    fn start(link: Arc<RunningLink>) -> LinkTimeline {
        let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sampler = {
            let (link, samples) = (link.clone(), samples.clone());
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(Self::STEP);
                loop {
                    ticks.tick().await;
                    let sample = (Instant::now(), link.counters().a_to_b.bytes_forwarded);
                    samples
                        .lock()
                        .unwrap_or_else(|error| error.into_inner())
                        .push(sample);
                }
            })
        };
        LinkTimeline {
            link,
            samples,
            sampler,
        }
    }

    /// The rates, in Mbit/s, one per step (the last one shorter).
    fn finish(self) -> String {
        self.sampler.abort();
        let mut samples = std::mem::take(
            &mut *self
                .samples
                .lock()
                .unwrap_or_else(|error| error.into_inner()),
        );
        samples.push((Instant::now(), self.link.counters().a_to_b.bytes_forwarded));
        samples
            .windows(2)
            .map(|pair| {
                let seconds = pair[1].0.duration_since(pair[0].0).as_secs_f64();
                let bits = pair[1].1.saturating_sub(pair[0].1) as f64 * 8.0;
                format!("{:.0}", bits / seconds.max(1e-3) / 1e6)
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// QEMU's stream rate in each [`LinkTimeline::STEP`] from `started`, from polled
/// `ram.transferred` figures (each step ends at the last poll before its end).
fn stream_timeline(started: Instant, polls: &[(Instant, u64)]) -> String {
    let Some(&(last_poll, _)) = polls.last() else {
        return String::new();
    };
    let steps = (last_poll.duration_since(started).as_secs_f64() / LinkTimeline::STEP.as_secs_f64())
        .ceil() as u32;
    let written_at = |moment: Instant| {
        polls
            .iter()
            .take_while(|(at, _)| *at <= moment)
            .last()
            .map_or(0, |(_, bytes)| *bytes)
    };
    (0..steps)
        .map(|step| {
            let from = started + LinkTimeline::STEP * step;
            let bits =
                written_at(from + LinkTimeline::STEP).saturating_sub(written_at(from)) as f64 * 8.0;
            format!("{:.0}", bits / LinkTimeline::STEP.as_secs_f64() / 1e6)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Plans again and gives QEMU the new downtime limit when it changed (noted in `limits`).
async fn replan(
    planner: &mut ConvergencePlanner,
    inputs: &PlanInputs,
    source: &QemuVm,
    limits: &mut Vec<u64>,
) -> anyhow::Result<()> {
    if let (_, Some(limit)) = planner.update(inputs) {
        limits.push(limit);
        source
            .qmp()
            .execute(
                "migrate-set-parameters",
                Some(json!({ "downtime-limit": limit })),
            )
            .await?;
    }
    Ok(())
}

fn last_tick(console: &Path) -> u64 {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    text.lines()
        .rev()
        .find_map(|line| {
            let start = line.find("NOVACRON-WORKLOAD tick=")? + "NOVACRON-WORKLOAD tick=".len();
            line[start..].split(' ').next()?.parse().ok()
        })
        .unwrap_or(0)
}

/// Waits until the source's guest is warm: its disk read into its page cache (the realistic
/// workload) and its memory workload running.
async fn wait_until_warm(source: &QemuVm, setup: &GuestSetup<'_>) -> anyhow::Result<()> {
    let console = source.run_directory().console_log();
    if setup.disk.is_some() {
        wait_for_console_text(&console, "NOVACRON-DISK-READ", DEADLINE).await?;
    }
    wait_for_console_text(&console, "NOVACRON-WORKLOAD tick=2 ", DEADLINE).await?;
    Ok(())
}

/// QEMU's max-bandwidth far above any link: the link (or what carries the stream) sets the
/// pace; QEMU applies its cap before compression, so a cap at the link rate would throttle zstd.
async fn uncap(source: &QemuVm) -> anyhow::Result<()> {
    source
        .qmp()
        .execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": 64u64 << 30 })),
        )
        .await?;
    Ok(())
}

/// Starts QEMU's migration into the unix socket at `socket`.
async fn migrate_into(source: &QemuVm, socket: &Path) -> anyhow::Result<()> {
    source
        .qmp()
        .execute(
            "migrate",
            Some(json!({ "uri": format!("unix:{}", socket.display()) })),
        )
        .await?;
    Ok(())
}

/// How long QEMU's own precopy takes to put the guest's state into a local socket that a task
/// reads and discards: no destination, no link, no proxy. Any method that carries QEMU's
/// precopy stream takes at least this on this machine. Returns the seconds and the stream's
/// bytes. With `save`, the task writes the stream to `save/stream.bin` instead (the time then
/// includes that file's writes), and the realistic disk's base image is copied to
/// `save/base.raw`.
async fn qemu_stream_reference(
    binaries: &QemuBinaries,
    setup: &GuestSetup<'_>,
    save: Option<&Path>,
) -> anyhow::Result<(f64, u64)> {
    let directory = tempfile::Builder::new().prefix("nmb-").tempdir_in("/tmp")?;
    let source =
        QemuVm::launch(binaries, &setup.spec("bench-ref", directory.path(), None)?).await?;
    let _source_guard = common::KillOnDrop::new(&source);
    wait_until_warm(&source, setup).await?;
    let socket = directory.path().join("sink.sock");
    let listener = tokio::net::UnixListener::bind(&socket)?;
    let saved = match save {
        Some(directory) => {
            std::fs::create_dir_all(directory)
                .with_context(|| format!("creating {}", directory.display()))?;
            Some(tokio::fs::File::create(directory.join("stream.bin")).await?)
        }
        None => None,
    };
    let sink = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await?;
        match saved {
            Some(mut file) => {
                let bytes = tokio::io::copy(&mut stream, &mut file).await?;
                file.sync_all().await?;
                Ok::<u64, std::io::Error>(bytes)
            }
            None => tokio::io::copy(&mut stream, &mut tokio::io::sink()).await,
        }
    });
    uncap(&source).await?;
    let started = Instant::now();
    migrate_into(&source, &socket).await?;
    qemu_methods::wait_for_completion(&source, "the reference migration", started, DEADLINE)
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    let bytes = sink.await??;
    if let (Some(directory), Some(disk)) = (save, setup.disk) {
        std::fs::copy(&disk.base, directory.join("base.raw"))
            .with_context(|| format!("copying the base image into {}", directory.display()))?;
    }
    if let Some(directory) = save {
        eprintln!(
            "   saved the stream ({:.1} MB){} in {}",
            bytes as f64 / 1e6,
            if setup.disk.is_some() {
                " and the base image"
            } else {
                ""
            },
            directory.display()
        );
    }
    Ok((seconds, bytes))
}

async fn run_one(
    method: Method,
    link: &Arc<RunningLink>,
    options: &Options,
    guest: &TestGuest,
    binaries: &QemuBinaries,
    held: Held<'_>,
    written_overlay: Option<&Path>,
) -> anyhow::Result<Outcome> {
    let Held { disk, boot_files } = held;
    eprintln!("== {}", method.name());
    let source_dir = tempfile::Builder::new().prefix("nmb-").tempdir_in("/tmp")?;
    let destination_dir = tempfile::Builder::new().prefix("nmb-").tempdir_in("/tmp")?;
    let setup = GuestSetup {
        guest,
        options,
        uuid: uuid::Uuid::new_v4(),
        disk,
        written_overlay,
    };
    let source =
        QemuVm::launch(binaries, &setup.spec("bench-src", source_dir.path(), None)?).await?;
    // Both QEMUs die with this run, also when it fails half-way.
    let _source_guard = common::KillOnDrop::new(&source);
    let source_console = source.run_directory().console_log();
    wait_until_warm(&source, &setup).await?;
    let incoming = destination_dir.path().join("in.sock");
    // `vm migrate`'s destination indexes the kernel and initrd while its QEMU starts (the
    // source its own copy meanwhile, hidden behind that): what the index takes beyond the
    // start is on the proxy's path.
    let launch_started = Instant::now();
    let indexing = (method.proxied() && boot_files.is_some()).then(|| {
        let (kernel, initrd) = (guest.vmlinuz.clone(), guest.initrd.clone());
        tokio::task::spawn_blocking(move || index_boot_files(kernel, initrd))
    });
    let destination = QemuVm::launch(
        binaries,
        &setup.spec("bench-dst", destination_dir.path(), Some(&incoming))?,
    )
    .await?;
    let _destination_guard = common::KillOnDrop::new(&destination);
    let launched = launch_started.elapsed();
    let boot_index_beyond_launch = match indexing {
        Some(task) => {
            task.await??;
            let indexed = launch_started.elapsed();
            eprintln!(
                "   kernel and initrd indexed in {:.2} s while the destination QEMU started \
                 ({:.2} s): {:.2} s on the proxy's path",
                indexed.as_secs_f64(),
                launched.as_secs_f64(),
                indexed.saturating_sub(launched).as_secs_f64()
            );
            indexed.saturating_sub(launched).as_secs_f64()
        }
        None => 0.0,
    };

    let (capabilities, parameters) = method.settings();
    qemu_methods::configure([&source, &destination], &capabilities, &parameters).await?;
    destination
        .qmp()
        .execute(
            "migrate-incoming",
            Some(json!({ "uri": format!("unix:{}", incoming.display()) })),
        )
        .await?;
    let (destination_tls, source_tls) = pinned_pair();
    let address_b = link.addr_b();
    let (port_sender, port_receiver) = tokio::sync::oneshot::channel();
    // As `vm migrate` does: with a local disk, memory pages equal to a block the disk mirror
    // delivered travel as hashes (each side keeps its own record of those blocks).
    let image_pages = SharedImagePages::new(disk.map(|disk| disk.index.clone())).with_files(
        boot_files
            .iter()
            .flat_map(|boot| &boot.files)
            .flat_map(HeldFile::parts)
            .map(|(_, index)| index),
    );
    let (source_pages, destination_pages) = match written_overlay {
        Some(_) => (
            image_pages
                .clone()
                .with_delivered(Arc::new(DeliveredPages::at_source())),
            image_pages.with_delivered(Arc::new(DeliveredPages::at_destination(
                destination_dir.path(),
            )?)),
        ),
        None => (image_pages.clone(), image_pages),
    };
    // Set when the destination side's work is done, before its runtime is taken down (which
    // took 40-120 ms here, a cost `vm migrate`'s long-lived agent never pays).
    let destination_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let destination_thread = {
        let link = link.clone();
        let incoming = incoming.clone();
        let image_pages = destination_pages.clone();
        let done = destination_done.clone();
        std::thread::spawn(move || {
            link.in_ns_b(move || {
                destination_side(
                    method,
                    address_b,
                    incoming,
                    destination_tls,
                    (port_sender, &done),
                    image_pages,
                )
            })
        })
    };
    let port = port_receiver
        .await
        .context("the destination side did not start")?;
    let outgoing = source_dir.path().join("out.sock");
    let unix_listener = std::os::unix::net::UnixListener::bind(&outgoing)?;
    let send_window_bytes = options.send_window_mib << 20;
    let mut config = ProxyConfig {
        image_pages: source_pages.clone(),
        ..ProxyConfig::default()
    };
    let window_control = config.window_control.clone();
    config.encoder.zstd_level = options.zstd_level;
    if options.forecast_mbit > 0.0 {
        config.initial_rate_bytes_per_second = options.forecast_mbit * 1e6 / 8.0;
        config.initial_rate_is_measured = true;
    }
    if send_window_bytes > 0 {
        // A fixed window (`--send-window-mib`), instead of the proxy's adaptive one.
        config.adaptive_send_window_minimum = None;
    }
    // As `vm migrate` does before the move: QEMU's downtime limit from the forecast, or the
    // smallest until the link is measured (the proxy's first window is a guess).
    let forecast_rate = (options.forecast_mbit > 0.0).then_some(options.forecast_mbit * 1e6 / 8.0);
    let round_trip = Duration::from_millis(2 * options.delay_ms);
    let initial_plan = PlanInputs {
        remaining_bytes: options.memory_mib << 20,
        dirty_bytes_per_second: 0.0,
        wire_bytes_per_second: forecast_rate.unwrap_or(0.0),
        encoding_ratio: 1.0,
        in_flight_wire_bytes: expected_send_window(
            &config,
            config.initial_rate_bytes_per_second,
            round_trip,
        ),
        round_trip,
        downtime_limit: DOWNTIME_LIMIT,
    };
    let link_view: SharedLinkView = Arc::default();
    let (ready_sender, ready) = tokio::sync::oneshot::channel();
    let source_thread = {
        let link = link.clone();
        let link_view = link_view.clone();
        let transport = options.transport;
        std::thread::spawn(move || {
            link.in_ns_a(move || {
                source_side(
                    method,
                    unix_listener,
                    SocketAddr::from((address_b, port)),
                    source_tls,
                    send_window_bytes,
                    config,
                    SourceSignals {
                        link_view,
                        ready: ready_sender,
                        transport,
                    },
                )
            })
        })
    };
    // The proxy's session is open before the clock starts, as `vm migrate`'s is before it
    // starts QEMU's migration (QEMU's own methods connect when told to migrate).
    ready
        .await
        .context("the source side failed before it was ready")?;

    let mut source_events = source.subscribe_events();
    let mut destination_events = destination.subscribe_events();
    let wire_before = link.counters().a_to_b.bytes_forwarded;
    let started = Instant::now();
    let started_wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    let timeline = options
        .link_timeline
        .then(|| LinkTimeline::start(link.clone()));
    // A local disk moves first: the block mirror into the destination's NBD export, until in
    // sync (it stays in sync while the memory moves, and completes at the switch-over).
    let mirror = match written_overlay {
        Some(_) => Some(
            start_disk_mirror(
                method,
                link,
                Side(&source, source_dir.path()),
                Side(&destination, destination_dir.path()),
                (source_pages.clone(), destination_pages.clone()),
                started,
            )
            .await?,
        ),
        None => None,
    };
    uncap(&source).await?;
    let mut qemu_limits: Vec<u64> = Vec::new();
    let mut planner = ConvergencePlanner::new();
    if method.proxied() {
        replan(&mut planner, &initial_plan, &source, &mut qemu_limits).await?;
    }
    eprintln!("   memory migration starts");
    migrate_into(&source, &outgoing).await?;
    let mut last_plan = Instant::now();
    let mut switched = false;
    let mut resumed_early = false;
    // When QEMU synced its dirty bitmap (a pass began), seconds from the start.
    let mut passes_began: Vec<f64> = Vec::new();
    // What QEMU had written of its stream (`ram.transferred`) at each poll, for the timeline.
    let mut stream_written: Vec<(Instant, u64)> = Vec::new();
    let info = loop {
        let info = source.qmp().query_migrate().await?;
        if let Some(transferred) = info["ram"]["transferred"].as_u64() {
            stream_written.push((Instant::now(), transferred));
        }
        let syncs = info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) as usize;
        while passes_began.len() < syncs {
            passes_began.push(started.elapsed().as_secs_f64());
        }
        let view = *link_view.lock().unwrap_or_else(|error| error.into_inner());
        if method.proxied()
            && info["status"] == "active"
            && last_plan.elapsed() >= Duration::from_millis(500)
            && let Some(view) = view.filter(|view| view.rate_bytes_per_second > 0.0)
        {
            // As `vm migrate` does: QEMU's downtime limit re-planned from the measured link.
            last_plan = Instant::now();
            let ram = &info["ram"];
            let ratio = planner.observe_ratio(
                ram["transferred"].as_u64().unwrap_or(0),
                view.wire_bytes_sent,
            );
            let inputs = PlanInputs {
                remaining_bytes: ram["remaining"].as_u64().unwrap_or(0),
                dirty_bytes_per_second: ram["dirty-pages-rate"].as_f64().unwrap_or(0.0) * 4096.0,
                wire_bytes_per_second: view.rate_bytes_per_second,
                encoding_ratio: ratio,
                in_flight_wire_bytes: view.send_window_bytes,
                round_trip: view.round_trip,
                downtime_limit: DOWNTIME_LIMIT,
            };
            replan(&mut planner, &inputs, &source, &mut qemu_limits).await?;
        }
        if method.postcopy()
            && !switched
            && info["status"] == "active"
            // QEMU syncs the dirty bitmap once as it starts, then after each full pass.
            && info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0)
                > options.postcopy_after_passes
        {
            // As `vm migrate` does: the device state that follows the switch crosses behind
            // whatever the session holds, so it is emptied first.
            if method.proxied() {
                window_control.drain(Duration::from_secs(1)).await;
            }
            let switch = source.qmp().execute("migrate-start-postcopy", None).await;
            window_control.release();
            switch?;
            switched = true;
        }
        if switched && !resumed_early {
            // Started with -S, the destination waits paused once it holds the device state:
            // resume it at once, as `vm migrate` does after its commit.
            let status = destination.qmp().query_status().await?;
            if !matches!(status.status, novacron_qemu::RunState::Inmigrate) {
                destination.qmp().cont().await?;
                resumed_early = true;
            }
        }
        match info["status"].as_str().unwrap_or_default() {
            "completed" => break info,
            "failed" | "cancelled" => {
                let log = std::fs::read_to_string(destination.run_directory().qemu_log())
                    .unwrap_or_default();
                bail!("migration failed: {info}; destination qemu log: {log}")
            }
            _ => {}
        }
        if started.elapsed() > DEADLINE {
            bail!("migration not done after {DEADLINE:?}: {info}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Moments of the switch-over (seconds from the start), for the pause's make-up.
    let source_completed_at = started.elapsed().as_secs_f64();
    loop {
        let status = destination.qmp().query_status().await?;
        if !matches!(status.status, novacron_qemu::RunState::Inmigrate) {
            break;
        }
        if started.elapsed() > DEADLINE {
            bail!("destination still loading after {DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let destination_loaded_at = started.elapsed().as_secs_f64();
    // The destination's side is done (the proxy: the stream verified; QEMU's methods: the
    // relays closed) before the guest may resume there.
    while !destination_done.load(std::sync::atomic::Ordering::Acquire)
        && !destination_thread.is_finished()
    {
        if started.elapsed() > DEADLINE {
            bail!("the destination side still running after {DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mirror_in_sync = match mirror {
        Some(mirror) => Some(mirror.complete(&source, &destination).await?),
        None => None,
    };
    let destination_side_done_at = started.elapsed().as_secs_f64();
    // The destination was started paused (it must not run before the stream is verified):
    // resume it as soon as it has loaded, as an orchestrator would (post-copy: done already).
    if !resumed_early {
        destination.qmp().cont().await?;
    }
    let mut seconds = started.elapsed().as_secs_f64();
    let switch_over = [
        ("source completed (polled)", source_completed_at),
        ("destination loaded (polled)", destination_loaded_at),
        ("destination side done", destination_side_done_at),
        ("cont answered", seconds),
    ];
    if let Some(timeline) = timeline {
        eprintln!(
            "   link A→B, Mbit/s per {} ms from the start: {}",
            LinkTimeline::STEP.as_millis(),
            timeline.finish()
        );
        eprintln!(
            "   QEMU's stream written, Mbit/s per {} ms from the start: {}",
            LinkTimeline::STEP.as_millis(),
            stream_timeline(started, &stream_written)
        );
        // Seen by polling every 20 ms or so: a pass's start is known to that precision.
        let passes: Vec<String> = passes_began
            .iter()
            .map(|seconds| format!("{seconds:.2}"))
            .collect();
        eprintln!(
            "   QEMU's dirty-bitmap syncs (passes) seen at (s): {}",
            passes.join(" ")
        );
    }
    if method.proxied()
        && let Some(disk) = disk
    {
        // `vm migrate` loads the base image's page index before QEMU starts sending.
        seconds += disk.index_seconds;
    }
    seconds += boot_index_beyond_launch;
    if method.proxied() {
        eprintln!("   qemu downtime limits set by the plan (ms): {qemu_limits:?}");
    }
    let stream_bytes = tokio::task::spawn_blocking(move || source_thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("source side panicked"))??
        .context("source side")?;
    tokio::task::spawn_blocking(move || destination_thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("destination side panicked"))??
        .context("destination side")?;
    let wire_bytes = link.counters().a_to_b.bytes_forwarded - wire_before;
    if let (Some(source), Some(destination)) =
        (&source_pages.delivered, &destination_pages.delivered)
        && method.proxied()
    {
        eprintln!(
            "   blocks the disk mirror delivered: {} (source) / {} (destination); memory pages \
             sent as one of them: {} distinct, {} read back",
            source.len(),
            destination.len(),
            source.used(),
            destination.used()
        );
    }

    let source_tick = last_tick(&source_console);
    let stopped = first_event(&mut source_events, "STOP").await;
    let resumed = first_event(&mut destination_events, "RESUME").await;
    let real_pause_ms = stopped
        .zip(resumed)
        .map(|(stopped, resumed)| (resumed - stopped) * 1e3);
    if let Some((stopped, resumed)) = stopped.zip(resumed) {
        // Seconds of the day (UTC), to line up with the proxy's logs (`RUST_LOG`).
        eprintln!(
            "   STOP at {:.3}, RESUME at {:.3} (seconds of the day, UTC; {:.2} and {:.2} s from the start)",
            stopped % 86_400.0,
            resumed % 86_400.0,
            stopped - started_wall,
            resumed - started_wall
        );
        let moments: Vec<String> = switch_over
            .iter()
            .map(|(what, at)| format!("{what} +{:.0}", (at - (stopped - started_wall)) * 1e3))
            .collect();
        eprintln!("   after STOP (ms): {}", moments.join(", "));
    }
    let guest_continued = wait_for_console_text(
        &destination.run_directory().console_log(),
        &format!("NOVACRON-WORKLOAD tick={} ", source_tick + 3),
        Duration::from_secs(60),
    )
    .await
    .is_ok();
    let _ = destination.force_stop().await;
    let _ = source.force_stop().await;
    let local_disk = match mirror_in_sync {
        Some(in_sync) => {
            let compared = tokio::process::Command::new("qemu-img")
                .args(["compare", "-q", "-f", "qcow2", "-F", "qcow2"])
                .arg(source_dir.path().join("disk.qcow2"))
                .arg(destination_dir.path().join("disk.qcow2"))
                .status()
                .await?;
            Some((in_sync, compared.success()))
        }
        None => None,
    };
    Ok(Outcome {
        method,
        seconds,
        stream_bytes,
        wire_bytes,
        passes: info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
        qemu_downtime_ms: info["downtime"].as_u64().unwrap_or(0),
        real_pause_ms,
        guest_continued,
        local_disk,
    })
}

/// One host's QEMU and its directory.
struct Side<'a>(&'a QemuVm, &'a Path);

/// What the destination holds before the move: the realistic workload's base image, the
/// guest's kernel and initrd.
struct Held<'a> {
    disk: Option<&'a RealisticDisk>,
    boot_files: Option<&'a BootFiles>,
}

/// Hashes and indexes the guest's kernel and initrd, both at once as `vm migrate`'s hosts do.
fn index_boot_files(kernel: PathBuf, initrd: PathBuf) -> anyhow::Result<Vec<HeldFile>> {
    let (kernel, initrd) = std::thread::scope(|scope| {
        let initrd = scope.spawn(|| HeldFile::open(&initrd));
        let kernel = HeldFile::open(&kernel);
        let initrd = initrd
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("indexing the initrd panicked")));
        (kernel, initrd)
    });
    Ok(vec![
        kernel.context("indexing the guest's kernel")?,
        initrd.context("indexing the guest's initrd")?,
    ])
}

/// The guest's kernel and initrd, hashed and indexed (`--held-boot-files`).
struct BootFiles {
    files: Vec<HeldFile>,
    seconds: f64,
}

/// The block mirror of a local disk across the link, started and in sync.
struct DiskMirror {
    in_sync_seconds: f64,
    relays: disk_mirror::Relays,
}

/// Exports the destination's fresh overlay over NBD (as `vm migrate` does on the incoming
/// QEMU), starts the relays of the mirror's connection across the link (one TCP connection for
/// QEMU's methods, the proxy's NBD format over a transport session for the proxy) and the
/// mirror, and waits until it is in sync.
async fn start_disk_mirror(
    method: Method,
    link: &Arc<RunningLink>,
    source: Side<'_>,
    destination: Side<'_>,
    image_pages: (SharedImagePages, SharedImagePages),
    started: Instant,
) -> anyhow::Result<DiskMirror> {
    let (Side(source, source_dir), Side(destination, destination_dir)) = (source, destination);
    let server_socket = destination_dir.join("nbd.sock");
    destination
        .qmp()
        .execute(
            "nbd-server-start",
            Some(json!({
                "addr": { "type": "unix", "data": { "path": server_socket.display().to_string() } }
            })),
        )
        .await?;
    destination
        .qmp()
        .execute(
            "block-export-add",
            Some(json!({
                "type": "nbd", "id": "bench-export", "node-name": "disk0", "writable": true,
            })),
        )
        .await?;
    let client_socket = source_dir.join("mirror.sock");
    let relays = disk_mirror::Relays::start(
        method.proxied(),
        link,
        server_socket,
        &client_socket,
        image_pages,
    )
    .await?;
    disk_mirror::start_mirror(source, &client_socket, Some("disk0")).await?;
    let in_sync_seconds = disk_mirror::wait_mirror_ready(source, started, DEADLINE).await?;
    eprintln!("   disk in sync after {in_sync_seconds:.1} s");
    Ok(DiskMirror {
        in_sync_seconds,
        relays,
    })
}

impl DiskMirror {
    /// At the switch-over (the source stopped, the memory moved): the mirror drains and ends,
    /// the destination's export closes before its guest runs. Returns when it was in sync.
    async fn complete(self, source: &QemuVm, destination: &QemuVm) -> anyhow::Result<f64> {
        disk_mirror::complete_mirror(source).await?;
        // Removing the target node closed the mirror's connection: the relays end.
        self.relays.join().await?;
        destination
            .qmp()
            .execute(
                "block-export-del",
                Some(json!({ "id": "bench-export", "mode": "hard" })),
            )
            .await?;
        destination.qmp().execute("nbd-server-stop", None).await?;
        Ok(self.in_sync_seconds)
    }
}

/// Runs in namespace B: listens on the link, writes what arrives into the destination QEMU.
/// Tells its listening port on `signals.0`, and sets `signals.1` once its work is done.
fn destination_side(
    method: Method,
    address: Ipv4Addr,
    incoming: PathBuf,
    tls: TlsSettings,
    signals: (
        tokio::sync::oneshot::Sender<u16>,
        &std::sync::atomic::AtomicBool,
    ),
    image_pages: SharedImagePages,
) -> anyhow::Result<()> {
    let (port, done) = signals;
    let runtime = disk_mirror::relay_runtime()?;
    let outcome = runtime.block_on(async move {
        match method {
            Method::QemuPrecopy
            | Method::QemuMultifdZstd
            | Method::QemuXbzrle
            | Method::QemuPostcopy => {
                // One TCP connection per QEMU connection, connected to the destination in the
                // order the source accepted them (the main channel first); both directions (the
                // return path).
                let listener = tokio::net::TcpListener::bind((address, 0)).await?;
                let _ = port.send(listener.local_addr()?.port());
                let mut copies = Vec::new();
                for _ in 0..method.connections() {
                    let (mut from_link, _) = listener.accept().await?;
                    let mut to_qemu = tokio::net::UnixStream::connect(&incoming).await?;
                    copies.push(tokio::spawn(async move {
                        tokio::io::copy_bidirectional(&mut from_link, &mut to_qemu).await
                    }));
                }
                for copy in copies {
                    copy.await??;
                }
            }
            Method::ProxyPostcopy => {
                let (_listener, session) =
                    disk_mirror::accept_one_session(address, &tls, port).await?;
                let to_qemu = tokio::net::UnixStream::connect(&incoming).await?;
                let config = ProxyConfig {
                    image_pages,
                    ..ProxyConfig::default()
                };
                let report = receive_migration_stream_duplex(&session, to_qemu, &config).await?;
                eprintln!(
                    "   proxy destination: {} stream bytes rebuilt and verified from {} message bytes; {}",
                    report.stream_bytes, report.message_bytes, report.timing
                );
            }
            Method::ProxyMultifd => {
                // The sessions arrive in the order the source opened them: the main channel's
                // first.
                let listener = Listener::bind(
                    SocketAddr::from((address, 0)),
                    &tls,
                    SessionOptions::default(),
                )
                .await?;
                let _ = port.send(listener.local_addr().port());
                let mut sessions = Vec::new();
                for _ in 0..method.connections() {
                    sessions.push(listener.accept().await?);
                }
                let config = ProxyConfig {
                    image_pages,
                    ..ProxyConfig::default()
                };
                let report = receive_multifd_migration(&sessions, &incoming, &config).await?;
                eprintln!(
                    "   proxy destination: {} stream bytes over {} connections rebuilt and verified from {} message bytes; main channel: {}",
                    report.stream_bytes,
                    sessions.len(),
                    report.message_bytes,
                    report.timing
                );
                drop(sessions);
            }
            Method::Proxy => {
                let (_listener, session) =
                    disk_mirror::accept_one_session(address, &tls, port).await?;
                let to_qemu = tokio::net::UnixStream::connect(&incoming).await?;
                let config = ProxyConfig {
                    image_pages,
                    ..ProxyConfig::default()
                };
                let report = receive_migration_stream(&session, to_qemu, &config).await?;
                eprintln!(
                    "   proxy destination: {} stream bytes rebuilt and verified from {} message bytes; {}",
                    report.stream_bytes, report.message_bytes, report.timing
                );
                drop(session);
            }
        }
        Ok(())
    });
    if outcome.is_ok() {
        done.store(true, std::sync::atomic::Ordering::Release);
    }
    outcome
}

/// Runs in namespace A: takes QEMU's stream from the unix socket and sends it over the link.
/// Returns QEMU's stream length.
fn source_side(
    method: Method,
    unix_listener: std::os::unix::net::UnixListener,
    destination: SocketAddr,
    tls: TlsSettings,
    send_window_bytes: u64,
    config: ProxyConfig,
    signals: SourceSignals,
) -> anyhow::Result<u64> {
    let SourceSignals {
        link_view,
        ready,
        transport,
    } = signals;
    let runtime = disk_mirror::relay_runtime()?;
    runtime.block_on(async move {
        unix_listener.set_nonblocking(true)?;
        let unix_listener = tokio::net::UnixListener::from_std(unix_listener)?;
        match method {
            Method::QemuPrecopy
            | Method::QemuMultifdZstd
            | Method::QemuXbzrle
            | Method::QemuPostcopy => {
                let _ = ready.send(());
                let mut copies = Vec::new();
                for _ in 0..method.connections() {
                    let (mut from_qemu, _) = unix_listener.accept().await?;
                    let mut to_link = tokio::net::TcpStream::connect(destination).await?;
                    copies.push(tokio::spawn(async move {
                        tokio::io::copy_bidirectional(&mut from_qemu, &mut to_link).await
                    }));
                }
                let mut copied = 0;
                for copy in copies {
                    copied += copy.await??.0;
                }
                Ok(copied)
            }
            Method::ProxyMultifd => {
                // One session per QEMU connection, opened one after the other (the destination
                // takes the first for the main channel), before QEMU starts.
                let options = proxy_session_options(method, send_window_bytes, transport);
                let mut sessions = Vec::new();
                for _ in 0..method.connections() {
                    sessions.push(Session::connect(destination, &tls, options.clone()).await?);
                }
                let sessions = Arc::new(sessions);
                let _ = ready.send(());
                let publisher = {
                    let sessions = sessions.clone();
                    tokio::spawn(publish_link_view(link_view, move || {
                        let mut view = LinkView::default();
                        for session in sessions.iter() {
                            let stats = session.stats();
                            view.rate_bytes_per_second += stats.measured_rate_bytes_per_second;
                            view.wire_bytes_sent += stats.bulk_bytes_sent;
                            view.send_window_bytes += queued_wire_bytes(session);
                            view.round_trip = view
                                .round_trip
                                .max(stats.round_trip_estimate.unwrap_or_default());
                        }
                        view
                    }))
                };
                let report = send_multifd_migration(&unix_listener, &sessions, &config).await;
                publisher.abort();
                let _ = publisher.await;
                let report = report?;
                let sessions = Arc::try_unwrap(sessions)
                    .map_err(|_| anyhow::anyhow!("a session is still shared"))?;
                for session in sessions {
                    session.close().await?;
                }
                print_source_report(&report);
                Ok(report.stream_bytes)
            }
            Method::Proxy | Method::ProxyPostcopy => {
                // As `vm migrate` does, the session is open before QEMU starts its stream.
                let options = proxy_session_options(method, send_window_bytes, transport);
                let session = Arc::new(Session::connect(destination, &tls, options).await?);
                let _ = ready.send(());
                let (from_qemu, _) = unix_listener.accept().await?;
                let publisher = {
                    let session = session.clone();
                    tokio::spawn(publish_link_view(link_view, move || {
                        let stats = session.stats();
                        LinkView {
                            rate_bytes_per_second: stats.measured_rate_bytes_per_second,
                            wire_bytes_sent: stats.bulk_bytes_sent,
                            send_window_bytes: queued_wire_bytes(&session),
                            round_trip: stats.round_trip_estimate.unwrap_or_default(),
                        }
                    }))
                };
                let report = if method == Method::ProxyPostcopy {
                    send_migration_stream_duplex(from_qemu, &session, &config).await
                } else {
                    send_migration_stream(from_qemu, &session, &config).await
                };
                publisher.abort();
                let _ = publisher.await;
                let report = report?;
                // The duplex sender's return-path task may still hold its handle for a moment.
                let mut session = session;
                let session = loop {
                    match Arc::try_unwrap(session) {
                        Ok(session) => break session,
                        Err(shared) => {
                            session = shared;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                };
                session.close().await?;
                print_source_report(&report);
                Ok(report.stream_bytes)
            }
        }
    })
}

/// The proxy's session options in this run (`--send-window-mib` and the transport knobs over
/// what `vm migrate` uses).
fn proxy_session_options(
    method: Method,
    send_window_bytes: u64,
    transport: TransportKnobs,
) -> SessionOptions {
    let base = SessionOptions {
        bulk_send_window_bytes: if send_window_bytes > 0 {
            send_window_bytes
        } else {
            64 << 20
        },
        ..SessionOptions::default()
    };
    let mut options = match method {
        Method::ProxyMultifd => multifd_session_options(base),
        _ => migration_session_options(base),
    };
    if let Some(kib) = transport.unsent_limit_kib {
        options.unsent_limit_bytes = kib << 10;
    }
    if transport.initial_connections.is_some() {
        options.initial_bulk_connections = transport.initial_connections;
    }
    if let Some(adapt) = transport.adapt_streams {
        options.adapt_stream_count = adapt;
    }
    match transport.congestion_control {
        Some("default") => options.congestion_control = None,
        Some(name) => options.congestion_control = Some(name.to_string()),
        None => {}
    }
    options
}

/// Publishes what `look` sees of the link every 200 ms, for the convergence planner.
async fn publish_link_view(link_view: SharedLinkView, look: impl Fn() -> LinkView) {
    loop {
        *link_view.lock().unwrap_or_else(|error| error.into_inner()) = Some(look());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn print_source_report(report: &ProxyReport) {
    let codec = &report.codec;
    eprintln!(
        "   proxy source: {} pages ({} known, {} held at the destination of which {} in the kernel or initrd, {} delta, {} literal), {} message bytes for {} stream bytes; {} frames, zstd {:.2} s; {}",
        report.pages,
        codec.known_from_transfer,
        codec.known_from_destination,
        report.pages_from_files,
        codec.delta_pages,
        codec.literal_pages,
        report.message_bytes,
        report.stream_bytes,
        codec.frames,
        codec.compression_time.as_secs_f64(),
        report.timing
    );
}
