//! The block mirror over the emulated link, shared by the disk and migration benches: the
//! source's written overlay, the relays that carry the mirror's NBD connection across the link
//! (one TCP connection as QEMU's own migration does, or NovaCron's proxy in its NBD format), and
//! the mirror job's QMP steps.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use novacron_linkemu::{LinkError, RunningLink};
use novacron_migration::{
    ProxyConfig, SharedImagePages, StreamFormat, migration_session_options,
    receive_migration_stream_duplex, send_migration_stream_duplex,
};
use novacron_qemu::QemuVm;
use novacron_transport::{Listener, Session, SessionOptions, TlsSettings};
use serde_json::json;

use crate::common::{pinned_pair, words};
use crate::realistic_disk::RealisticDisk;

pub const MIB: u64 = 1 << 20;
/// The overlay is written in pieces of this size.
pub const PIECE: u64 = 16 * MIB;
/// The mirror job's id.
pub const MIRROR_JOB: &str = "bench-mirror";
const MIRROR_TARGET: &str = "bench-target";

/// Application text: request-log lines whose fields come from small vocabularies (about 4x with
/// zstd -3), fresh values in every line.
pub fn log_text(length: usize, seed: u64) -> Vec<u8> {
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
pub fn write_overlay(
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

pub fn create_overlay(base: &Path, overlay: &Path) -> anyhow::Result<()> {
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

pub fn nbd_config(image_pages: SharedImagePages) -> ProxyConfig {
    ProxyConfig {
        format: StreamFormat::Nbd,
        idle_flush: Duration::from_millis(2),
        image_pages,
        ..ProxyConfig::default()
    }
}

/// Both relays of the mirror's connection, running: the source's listens on `client_socket`
/// (the mirror's NBD client connects there), the destination's forwards into `server_socket`.
pub struct Relays {
    threads: [std::thread::JoinHandle<Result<anyhow::Result<()>, LinkError>>; 2],
}

impl Relays {
    /// `pages`: what the destination holds, as the source's and the destination's codec see it.
    pub async fn start(
        proxied: bool,
        link: &Arc<RunningLink>,
        server_socket: PathBuf,
        client_socket: &Path,
        (source_pages, destination_pages): (SharedImagePages, SharedImagePages),
    ) -> anyhow::Result<Self> {
        let (destination_tls, source_tls) = pinned_pair();
        let address_b = link.addr_b();
        let (port_sender, port_receiver) = tokio::sync::oneshot::channel();
        let destination = {
            let link = link.clone();
            let image_pages = destination_pages;
            std::thread::spawn(move || {
                link.in_ns_b(move || {
                    relay_destination(
                        proxied,
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
            .context("the disk relay at the destination did not start")?;
        let client_listener = std::os::unix::net::UnixListener::bind(client_socket)?;
        let source = {
            let link = link.clone();
            std::thread::spawn(move || {
                link.in_ns_a(move || {
                    relay_source(
                        proxied,
                        client_listener,
                        SocketAddr::from((address_b, port)),
                        source_tls,
                        source_pages,
                    )
                })
            })
        };
        Ok(Self {
            threads: [source, destination],
        })
    }

    /// Waits for both to end (the mirror's connection closed).
    pub async fn join(self) -> anyhow::Result<()> {
        for thread in self.threads {
            tokio::task::spawn_blocking(move || thread.join())
                .await?
                .map_err(|_| anyhow::anyhow!("a disk relay panicked"))??
                .context("a disk relay")?;
        }
        Ok(())
    }
}

/// The runtime a relay runs on inside its network namespace (two workers: this machine's cores).
pub fn relay_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// Binds a transport listener on `address`, says its port through `port`, and accepts the one
/// session the source opens. Returns the listener too: it must live as long as the session, which attaches the bulk
/// connections the sender adds (and any it reconnects) through it, as `serve`'s listener does.
pub async fn accept_one_session(
    address: Ipv4Addr,
    tls: &TlsSettings,
    port: tokio::sync::oneshot::Sender<u16>,
) -> anyhow::Result<(Listener, Arc<Session>)> {
    let listener = Listener::bind(
        SocketAddr::from((address, 0)),
        tls,
        SessionOptions::default(),
    )
    .await?;
    let _ = port.send(listener.local_addr().port());
    let session = Arc::new(listener.accept().await?);
    Ok((listener, session))
}

/// Namespace B: takes the mirror's connection off the link and into the NBD server's socket:
/// relayed over one TCP connection, or (`proxied`) rebuilt from the proxy's NBD format.
fn relay_destination(
    proxied: bool,
    address: Ipv4Addr,
    server_socket: PathBuf,
    tls: TlsSettings,
    port: tokio::sync::oneshot::Sender<u16>,
    image_pages: SharedImagePages,
) -> anyhow::Result<()> {
    let runtime = relay_runtime()?;
    runtime.block_on(async move {
        match proxied {
            false => {
                let listener = tokio::net::TcpListener::bind((address, 0)).await?;
                let _ = port.send(listener.local_addr()?.port());
                let (mut from_link, _) = listener.accept().await?;
                let mut to_server = tokio::net::UnixStream::connect(&server_socket).await?;
                tokio::io::copy_bidirectional(&mut from_link, &mut to_server).await?;
            }
            true => {
                let (_listener, session) = accept_one_session(address, &tls, port).await?;
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

/// Namespace A: takes the mirror's connection from its socket and sends it over the link: one
/// TCP connection, or (`proxied`) the proxy's NBD format over a transport session.
fn relay_source(
    proxied: bool,
    client_listener: std::os::unix::net::UnixListener,
    destination: SocketAddr,
    tls: TlsSettings,
    image_pages: SharedImagePages,
) -> anyhow::Result<()> {
    let runtime = relay_runtime()?;
    runtime.block_on(async move {
        client_listener.set_nonblocking(true)?;
        let client_listener = tokio::net::UnixListener::from_std(client_listener)?;
        match proxied {
            false => {
                let (mut from_qemu, _) = client_listener.accept().await?;
                let mut to_link = tokio::net::TcpStream::connect(destination).await?;
                tokio::io::copy_bidirectional(&mut from_qemu, &mut to_link).await?;
            }
            true => {
                let session = Arc::new(
                    Session::connect(
                        destination,
                        &tls,
                        migration_session_options(SessionOptions::default()),
                    )
                    .await?,
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

pub async fn mirror_job(vm: &QemuVm) -> anyhow::Result<Option<serde_json::Value>> {
    let jobs = vm.qmp().execute("query-block-jobs", None).await?;
    Ok(jobs
        .as_array()
        .and_then(|jobs| jobs.iter().find(|job| job["device"] == MIRROR_JOB))
        .cloned())
}

/// Starts the block mirror of `vm`'s disk (`disk0`, `sync=top`: the overlay's clusters) into
/// the NBD server reached through `client_socket` (`export`: its export name, if it has one).
pub async fn start_mirror(
    vm: &QemuVm,
    client_socket: &Path,
    export: Option<&str>,
) -> anyhow::Result<()> {
    let mut server = json!({
        "driver": "nbd",
        "node-name": MIRROR_TARGET,
        "server": { "type": "unix", "path": client_socket.display().to_string() },
    });
    if let Some(export) = export {
        server["export"] = json!(export);
    }
    vm.qmp().execute("blockdev-add", Some(server)).await?;
    vm.qmp()
        .execute(
            "blockdev-mirror",
            Some(json!({
                "job-id": MIRROR_JOB,
                "device": "disk0",
                "target": MIRROR_TARGET,
                "sync": "top",
            })),
        )
        .await?;
    Ok(())
}

/// Waits until the mirror is ready (everything copied, in sync); returns the seconds since
/// `started`.
pub async fn wait_mirror_ready(
    vm: &QemuVm,
    started: Instant,
    deadline: Duration,
) -> anyhow::Result<f64> {
    loop {
        let job = mirror_job(vm)
            .await?
            .context("the mirror job ended by itself")?;
        if job["ready"].as_bool() == Some(true) {
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > deadline {
            bail!("mirror not ready after {deadline:?}: {job}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Completes the mirror without pivoting to the target (as `vm migrate` does at the
/// switch-over: the job drains what is left and ends) and removes the target node.
pub async fn complete_mirror(vm: &QemuVm) -> anyhow::Result<()> {
    vm.qmp()
        .execute("block-job-cancel", Some(json!({ "device": MIRROR_JOB })))
        .await?;
    while mirror_job(vm).await?.is_some() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    vm.qmp()
        .execute("blockdev-del", Some(json!({ "node-name": MIRROR_TARGET })))
        .await?;
    Ok(())
}
