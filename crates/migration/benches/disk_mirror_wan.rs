//! Disk benchmark (issue 5, "with a 4 GiB local disk"): the disk phase of a live migration over
//! the emulated WAN link, QEMU's own block mirror against NovaCron's. A running test guest's disk
//! is a qcow2 overlay on a base image of this machine's files that both hosts hold; the overlay
//! holds what the guest wrote since it started (copies of files it already had, application
//! text, fresh random data). Both methods run QEMU's block mirror (`blockdev-mirror`,
//! `sync=top`: only the overlay's clusters) into the destination's overlay on its own copy of
//! the base image, exported by `qemu-nbd`:
//!
//! - `qemu`: the mirror's NBD connection over one TCP connection across the link, as QEMU's
//!   migration with a non-shared disk does;
//! - `proxy`: the connection through NovaCron's proxy in its NBD format over a transport session
//!   (what `vm migrate` does): the mirror's writes go through the page codec (blocks of the base
//!   image as hashes, zero blocks, deltas, zstd), the identical connection rebuilt and checked
//!   (BLAKE3) at the destination.
//!
//! Timed from `blockdev-mirror` until the job is ready (everything copied, in sync) and then
//! completed; the destination's overlay is compared with the source's (`qemu-img compare`).
//! Needs root (namespaces, TUN devices) and the test guest (`scripts/build-guest`).
//!
//! Options: `--rate-mbit 100 --delay-ms 25 --loss 0 --disk-mib 4096 --written-mib 512
//! --methods qemu,proxy`. See bench/migration/README.md.

#[path = "support/arguments.rs"]
mod arguments;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/disk_mirror.rs"]
mod disk_mirror;
#[path = "support/realistic_disk.rs"]
mod realistic_disk;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use disk_mirror::{
    MIB, Relays, complete_mirror, create_overlay, start_mirror, wait_mirror_ready, write_overlay,
};
use novacron_linkemu::{LinkEmulator, RunningLink};
use novacron_migration::SharedImagePages;
use novacron_qemu::{LaunchSpec, QemuBinaries, QemuVm, TestGuest};
use realistic_disk::{RealisticDisk, realistic_disk};

const DEADLINE: Duration = Duration::from_secs(1800);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Qemu,
    Proxy,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Qemu => "qemu block mirror (nbd, 1 tcp stream)",
            Method::Proxy => "novacron (mirror through the proxy's nbd format)",
        }
    }
}

#[derive(Clone, Debug)]
struct Options {
    rate_mbit: f64,
    delay_ms: u64,
    loss: f64,
    disk_mib: u64,
    written_mib: u64,
    methods: Vec<Method>,
}

const USAGE: &str = "
A live migration's disk phase over the emulated WAN link: QEMU's block mirror over TCP against
NovaCron's proxy (bench/migration/README.md). Needs root and the test guest.

cargo bench -p novacron-migration --bench disk_mirror_wan -- [options]

  --rate-mbit R       link rate, Mbit/s (default 100)
  --delay-ms D        one-way delay, ms (default 25: a 50 ms round trip)
  --loss P            random loss per direction, 0-1 (default 0)
  --disk-mib N        the disk's size (default 4096)
  --written-mib N     what the guest wrote into its overlay, 32 to half the disk (default 512)
  --methods LIST      qemu,proxy (default both)
";

/// The options, or `None` when `--help` was asked for (and printed).
fn parse_options() -> anyhow::Result<Option<Options>> {
    let mut options = Options {
        rate_mbit: 100.0,
        delay_ms: 25,
        loss: 0.0,
        disk_mib: 4096,
        written_mib: 512,
        methods: vec![Method::Qemu, Method::Proxy],
    };
    let Some(values) = arguments::named_values(USAGE)? else {
        return Ok(None);
    };
    for (argument, value) in values {
        match argument.as_str() {
            "--rate-mbit" => options.rate_mbit = value.parse()?,
            "--delay-ms" => options.delay_ms = value.parse()?,
            "--loss" => options.loss = value.parse()?,
            "--disk-mib" => options.disk_mib = value.parse()?,
            "--written-mib" => options.written_mib = value.parse()?,
            "--methods" => {
                options.methods = value
                    .split(',')
                    .map(|name| match name {
                        "qemu" => Ok(Method::Qemu),
                        "proxy" => Ok(Method::Proxy),
                        other => bail!("unknown method {other:?}: use qemu or proxy"),
                    })
                    .collect::<anyhow::Result<_>>()?;
            }
            other => bail!("unknown option {other:?}: --help lists the options"),
        }
    }
    if options.written_mib * 2 > options.disk_mib || options.written_mib < 32 {
        bail!("--written-mib must be at least 32 and at most half of --disk-mib");
    }
    Ok(Some(options))
}

struct Outcome {
    method: Method,
    /// From `blockdev-mirror` until the job was ready (in sync).
    ready_seconds: f64,
    /// Until the job completed and the connection ended.
    total_seconds: f64,
    wire_bytes: u64,
    identical: bool,
}

async fn run_one(
    method: Method,
    link: &Arc<RunningLink>,
    guest: &TestGuest,
    binaries: &QemuBinaries,
    disk: &RealisticDisk,
    source_overlay: &Path,
) -> anyhow::Result<Outcome> {
    eprintln!("== {}", method.name());
    let run = tempfile::Builder::new().prefix("nmd-").tempdir_in("/tmp")?;
    // This run's copy of the written overlay, and the destination's fresh one.
    let overlay = run.path().join("disk.qcow2");
    std::fs::copy(source_overlay, &overlay)?;
    let target = run.path().join("target.qcow2");
    create_overlay(&disk.base, &target)?;
    let server_socket = run.path().join("server.sock");
    let mut server = std::process::Command::new("qemu-nbd")
        .args(["--format", "qcow2", "--cache", "none", "--aio", "threads"])
        .arg(format!("--socket={}", server_socket.display()))
        .arg(&target)
        .spawn()
        .context("qemu-nbd")?;
    let spec = LaunchSpec::new("bench-disk", uuid::Uuid::new_v4(), run.path())
        .memory_mib(256)
        .kernel(guest.kernel_boot(""))
        .disk(overlay.clone(), novacron_qemu::ImageFormat::Qcow2)
        // As `vm migrate`'s hosts open disks.
        .disk_direct_io(novacron_qemu::supports_direct_io(&[&overlay]));
    let source = QemuVm::launch(binaries, &spec).await?;
    let _source_guard = common::KillOnDrop::new(&source);
    let started_wait = Instant::now();
    while !server_socket.exists() {
        if started_wait.elapsed() > Duration::from_secs(30) {
            bail!("qemu-nbd did not listen");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let client_socket = run.path().join("client.sock");
    let relays = Relays::start(
        method == Method::Proxy,
        link,
        server_socket.clone(),
        &client_socket,
        (
            SharedImagePages::new(Some(disk.index.clone())),
            SharedImagePages::new(Some(disk.index.clone())),
        ),
    )
    .await?;

    let wire_before = link.counters().a_to_b.bytes_forwarded;
    let started = Instant::now();
    start_mirror(&source, &client_socket, None).await?;
    let ready_seconds = wait_mirror_ready(&source, started, DEADLINE).await?;
    complete_mirror(&source).await?;
    relays.join().await?;
    let total_seconds = started.elapsed().as_secs_f64();
    let wire_bytes = link.counters().a_to_b.bytes_forwarded - wire_before;
    let _ = source.force_stop().await;
    let _ = tokio::task::spawn_blocking(move || server.wait()).await;
    let compared = tokio::process::Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "qcow2"])
        .arg(&overlay)
        .arg(&target)
        .status()
        .await?;
    Ok(Outcome {
        method,
        ready_seconds,
        total_seconds,
        wire_bytes,
        identical: compared.success(),
    })
}

fn main() -> anyhow::Result<()> {
    let Some(options) = parse_options()? else {
        return Ok(());
    };
    let guest = TestGuest::locate()?;
    let binaries = QemuBinaries::locate()?;
    let link = Arc::new(
        LinkEmulator::builder()
            .name_prefix("ndsk")
            .delay(Duration::from_millis(options.delay_ms))
            .loss(options.loss)
            .rate_bits_per_sec(options.rate_mbit * 1e6)
            .seed(7)
            .spawn()
            .context("starting the link emulator (run as root)")?,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let disk = realistic_disk(options.disk_mib)?;
    let written = tempfile::Builder::new()
        .prefix("nmd-w-")
        .tempdir_in("/tmp")?;
    let (source_overlay, random_bytes) =
        write_overlay(&disk, options.disk_mib, options.written_mib, written.path())?;
    let mut outcomes = Vec::new();
    for &method in &options.methods {
        outcomes.push(runtime.block_on(run_one(
            method,
            &link,
            &guest,
            &binaries,
            &disk,
            &source_overlay,
        ))?);
    }
    let rate = options.rate_mbit * 1e6 / 8.0;
    println!(
        "\nlink: {} Mbit/s, {} ms RTT, {} % loss; disk {} MiB (base: {:.0} MiB of this machine's \
         files, held by both sides); the overlay holds {} MiB the guest wrote (half copies of \
         its own files, 3/8 application text, 1/8 random)",
        options.rate_mbit,
        2 * options.delay_ms,
        options.loss * 100.0,
        options.disk_mib,
        disk.file_bytes as f64 / MIB as f64,
        options.written_mib
    );
    println!(
        "floor: the random eighth at the link rate = {:.1} s; the written bytes at the link rate \
         = {:.1} s. NovaCron's time includes loading the base image's saved page index \
         ({:.2} s; building it took {:.1} s, once, when the image arrived)",
        random_bytes as f64 / rate,
        (options.written_mib * MIB) as f64 / rate,
        disk.index_seconds,
        disk.build_seconds
    );
    println!("| method | in sync (s) | total (s) | on the link A→B (MB) | destination identical |");
    println!("|---|---|---|---|---|");
    for outcome in &outcomes {
        let index = if outcome.method == Method::Proxy {
            disk.index_seconds
        } else {
            0.0
        };
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {} |",
            outcome.method.name(),
            outcome.ready_seconds + index,
            outcome.total_seconds + index,
            outcome.wire_bytes as f64 / 1e6,
            if outcome.identical { "yes" } else { "NO" }
        );
    }
    if outcomes.iter().any(|outcome| !outcome.identical) {
        bail!("a destination disk differs from the source's");
    }
    Ok(())
}
