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

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/realistic_disk.rs"]
mod realistic_disk;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use common::{pinned_pair, words};
use novacron_linkemu::{LinkEmulator, RunningLink};
use novacron_migration::{
    ProxyConfig, SharedImagePages, StreamFormat, receive_migration_stream_duplex,
    send_migration_stream_duplex,
};
use novacron_qemu::{LaunchSpec, QemuBinaries, QemuVm, TestGuest};
use novacron_transport::{Listener, Session, SessionOptions, TlsSettings};
use realistic_disk::{RealisticDisk, realistic_disk};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(1800);
const MIB: u64 = 1 << 20;
/// The overlay is written in pieces of this size.
const PIECE: u64 = 16 * MIB;

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

fn parse_options() -> anyhow::Result<Options> {
    let mut options = Options {
        rate_mbit: 100.0,
        delay_ms: 25,
        loss: 0.0,
        disk_mib: 4096,
        written_mib: 512,
        methods: vec![Method::Qemu, Method::Proxy],
    };
    let mut arguments = std::env::args().skip(1);
    while let Some(argument) = arguments.next() {
        if argument == "--bench" {
            continue;
        }
        let mut value = || {
            arguments
                .next()
                .with_context(|| format!("{argument} needs a value"))
        };
        match argument.as_str() {
            "--rate-mbit" => options.rate_mbit = value()?.parse()?,
            "--delay-ms" => options.delay_ms = value()?.parse()?,
            "--loss" => options.loss = value()?.parse()?,
            "--disk-mib" => options.disk_mib = value()?.parse()?,
            "--written-mib" => options.written_mib = value()?.parse()?,
            "--methods" => {
                options.methods = value()?
                    .split(',')
                    .map(|name| match name {
                        "qemu" => Ok(Method::Qemu),
                        "proxy" => Ok(Method::Proxy),
                        other => bail!("unknown method {other:?}: use qemu or proxy"),
                    })
                    .collect::<anyhow::Result<_>>()?;
            }
            other => bail!(
                "unknown option {other:?}: use --rate-mbit, --delay-ms, --loss, --disk-mib, \
                 --written-mib, --methods"
            ),
        }
    }
    if options.written_mib * 2 > options.disk_mib || options.written_mib < 32 {
        bail!("--written-mib must be at least 32 and at most half of --disk-mib");
    }
    Ok(options)
}

/// Application text: request-log lines whose fields come from small vocabularies (about 4x with
/// zstd -3), fresh values in every line.
fn log_text(length: usize, seed: u64) -> Vec<u8> {
    let methods = ["GET", "POST", "PUT", "DELETE"];
    let paths = [
        "/api/v1/vms",
        "/api/v1/images",
        "/api/v1/migrations",
        "/healthz",
        "/metrics",
    ];
    let users = ["alice", "bob", "carol", "dave", "erin", "frank"];
    let mut out = Vec::with_capacity(length + 256);
    let mut sequence = words(seed);
    let mut next = || sequence.next().unwrap_or_default();
    let mut time = 1_764_000_000_000u64;
    while out.len() < length {
        let word = next();
        time += word % 1000;
        out.extend_from_slice(
            format!(
                "{time} req={:016x} {} {} status={} bytes={} user={} ms={}\n",
                next(),
                methods[(word % 4) as usize],
                paths[((word >> 8) % 5) as usize],
                [200, 201, 204, 404, 500][((word >> 16) % 5) as usize],
                (word >> 24) % 65536,
                users[((word >> 40) % 6) as usize],
                (word >> 48) % 900,
            )
            .as_bytes(),
        );
    }
    out.truncate(length);
    out
}

/// The source's overlay: what the guest wrote, in 16 MiB pieces across the disk: half copies of
/// the base image's own blocks (files the guest copied), three eighths application text, one
/// eighth fresh random data. Returns its path and the random bytes (the floor).
fn write_overlay(
    disk: &RealisticDisk,
    disk_mib: u64,
    written_mib: u64,
    directory: &Path,
) -> anyhow::Result<(PathBuf, u64)> {
    let overlay = directory.join("source.qcow2");
    create_overlay(&disk.base, &overlay)?;
    let pieces = written_mib * MIB / PIECE;
    let base = std::fs::File::open(&disk.base)?;
    let mut commands = Vec::new();
    let mut random_bytes = 0;
    for piece in 0..pieces {
        let data = match piece % 8 {
            0..=3 => {
                // A copy of a stretch of the base's files (they fill its first part).
                use std::os::unix::fs::FileExt;
                let from = ((piece * 37) % (disk_mib / 2 / 16).max(1)) * PIECE;
                let mut data = vec![0u8; PIECE as usize];
                base.read_exact_at(&mut data, from)?;
                data
            }
            4..=6 => log_text(PIECE as usize, piece),
            _ => {
                random_bytes += PIECE;
                words(1000 + piece)
                    .flat_map(u64::to_le_bytes)
                    .take(PIECE as usize)
                    .collect()
            }
        };
        let file = directory.join(format!("piece-{piece}"));
        std::fs::write(&file, data)?;
        // Spread over the disk's second half, away from the files.
        let offset = disk_mib * MIB / 2 + piece * PIECE;
        commands.push("-c".to_owned());
        commands.push(format!("write -q -s {} {offset} {PIECE}", file.display()));
    }
    let status = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .args(&commands)
        .arg(&overlay)
        .status()
        .context("running qemu-io")?;
    if !status.success() {
        bail!("qemu-io could not write the overlay");
    }
    for piece in 0..pieces {
        let _ = std::fs::remove_file(directory.join(format!("piece-{piece}")));
    }
    Ok((overlay, random_bytes))
}

fn create_overlay(base: &Path, overlay: &Path) -> anyhow::Result<()> {
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(overlay)
        .status()
        .context("running qemu-img")?;
    if !status.success() {
        bail!("qemu-img could not create {}", overlay.display());
    }
    Ok(())
}

fn nbd_config(image_pages: SharedImagePages) -> ProxyConfig {
    ProxyConfig {
        format: StreamFormat::Nbd,
        idle_flush: Duration::from_millis(2),
        image_pages,
        ..ProxyConfig::default()
    }
}

/// Namespace B: takes the connection off the link and into `qemu-nbd`'s socket.
fn destination_side(
    method: Method,
    address: Ipv4Addr,
    server_socket: PathBuf,
    tls: TlsSettings,
    port: tokio::sync::oneshot::Sender<u16>,
    image_pages: SharedImagePages,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match method {
            Method::Qemu => {
                let listener = tokio::net::TcpListener::bind((address, 0)).await?;
                let _ = port.send(listener.local_addr()?.port());
                let (mut from_link, _) = listener.accept().await?;
                let mut to_server = tokio::net::UnixStream::connect(&server_socket).await?;
                tokio::io::copy_bidirectional(&mut from_link, &mut to_server).await?;
            }
            Method::Proxy => {
                let listener = Listener::bind(
                    SocketAddr::from((address, 0)),
                    &tls,
                    SessionOptions::default(),
                )
                .await?;
                let _ = port.send(listener.local_addr().port());
                let session = Arc::new(listener.accept().await?);
                let to_server = tokio::net::UnixStream::connect(&server_socket).await?;
                let report =
                    receive_migration_stream_duplex(&session, to_server, &nbd_config(image_pages))
                        .await?;
                eprintln!(
                    "   proxy destination: {} nbd bytes rebuilt and verified from {} message bytes",
                    report.stream_bytes, report.message_bytes
                );
            }
        }
        Ok(())
    })
}

/// Namespace A: takes the mirror's connection from its socket and sends it over the link.
fn source_side(
    method: Method,
    client_listener: std::os::unix::net::UnixListener,
    destination: SocketAddr,
    tls: TlsSettings,
    image_pages: SharedImagePages,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        client_listener.set_nonblocking(true)?;
        let client_listener = tokio::net::UnixListener::from_std(client_listener)?;
        match method {
            Method::Qemu => {
                let (mut from_qemu, _) = client_listener.accept().await?;
                let mut to_link = tokio::net::TcpStream::connect(destination).await?;
                tokio::io::copy_bidirectional(&mut from_qemu, &mut to_link).await?;
            }
            Method::Proxy => {
                let session = Arc::new(
                    Session::connect(destination, &tls, SessionOptions::default()).await?,
                );
                let (from_qemu, _) = client_listener.accept().await?;
                let report =
                    send_migration_stream_duplex(from_qemu, &session, &nbd_config(image_pages))
                        .await?;
                let codec = &report.codec;
                eprintln!(
                    "   proxy source: {} nbd bytes as {} message bytes; pages: {} zero, {} from the \
                     base image, {} sent earlier, {} delta, {} literal",
                    report.stream_bytes,
                    report.message_bytes,
                    codec.zero_pages,
                    codec.known_from_destination,
                    codec.known_from_transfer,
                    codec.delta_pages,
                    codec.literal_pages
                );
                let _ = tokio::time::timeout(Duration::from_secs(10), session.flush()).await;
            }
        }
        Ok(())
    })
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

async fn mirror_job(vm: &QemuVm) -> anyhow::Result<Option<serde_json::Value>> {
    let jobs = vm.qmp().execute("query-block-jobs", None).await?;
    Ok(jobs
        .as_array()
        .and_then(|jobs| jobs.iter().find(|job| job["device"] == "bench-mirror"))
        .cloned())
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
        .disk(overlay.clone(), novacron_qemu::ImageFormat::Qcow2);
    let source = QemuVm::launch(binaries, &spec).await?;
    let _source_guard = common::KillOnDrop::new(&source);
    let started_wait = Instant::now();
    while !server_socket.exists() {
        if started_wait.elapsed() > Duration::from_secs(30) {
            bail!("qemu-nbd did not listen");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (destination_tls, source_tls) = pinned_pair();
    let image_pages = SharedImagePages(Some(disk.index.clone()));
    let (port_sender, port_receiver) = tokio::sync::oneshot::channel();
    let address_b = link.addr_b();
    let destination_thread = {
        let link = link.clone();
        let server_socket = server_socket.clone();
        let image_pages = image_pages.clone();
        std::thread::spawn(move || {
            link.in_ns_b(move || {
                destination_side(
                    method,
                    address_b,
                    server_socket,
                    destination_tls,
                    port_sender,
                    image_pages,
                )
            })
        })
    };
    let port = port_receiver
        .await
        .context("the destination side did not start")?;
    let client_socket = run.path().join("client.sock");
    let client_listener = std::os::unix::net::UnixListener::bind(&client_socket)?;
    let source_thread = {
        let link = link.clone();
        std::thread::spawn(move || {
            link.in_ns_a(move || {
                source_side(
                    method,
                    client_listener,
                    SocketAddr::from((address_b, port)),
                    source_tls,
                    image_pages,
                )
            })
        })
    };

    let wire_before = link.counters().a_to_b.bytes_forwarded;
    let started = Instant::now();
    let qmp = source.qmp();
    qmp.execute(
        "blockdev-add",
        Some(json!({
            "driver": "nbd",
            "node-name": "bench-target",
            "server": { "type": "unix", "path": client_socket.display().to_string() },
        })),
    )
    .await?;
    qmp.execute(
        "blockdev-mirror",
        Some(json!({
            "job-id": "bench-mirror",
            "device": "disk0",
            "target": "bench-target",
            "sync": "top",
        })),
    )
    .await?;
    let ready_seconds = loop {
        let job = mirror_job(&source)
            .await?
            .context("the mirror job ended by itself")?;
        if job["ready"].as_bool() == Some(true) {
            break started.elapsed().as_secs_f64();
        }
        if started.elapsed() > DEADLINE {
            bail!("mirror not ready after {DEADLINE:?}: {job}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // As `vm migrate` does at the switch-over: complete without pivoting to the target.
    qmp.execute(
        "block-job-cancel",
        Some(json!({ "device": "bench-mirror" })),
    )
    .await?;
    while mirror_job(&source).await?.is_some() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    qmp.execute("blockdev-del", Some(json!({ "node-name": "bench-target" })))
        .await?;
    tokio::task::spawn_blocking(move || source_thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("source side panicked"))??
        .context("source side")?;
    tokio::task::spawn_blocking(move || destination_thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("destination side panicked"))??
        .context("destination side")?;
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
    let options = parse_options()?;
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
         = {:.1} s. NovaCron's time includes indexing the base image ({:.2} s)",
        random_bytes as f64 / rate,
        (options.written_mib * MIB) as f64 / rate,
        disk.index_seconds
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
