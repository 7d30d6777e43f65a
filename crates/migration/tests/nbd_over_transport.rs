//! A disk written through the proxy's NBD format by QEMU's own NBD client (`qemu-img convert`
//! into an `nbd+unix://` target, the client code a block mirror uses) into QEMU's NBD server
//! (`qemu-nbd`), over a DWCP transport session on loopback: the target ends byte-identical, the
//! client's half of the connection is proved identical (BLAKE3), and blocks the destination's
//! base image holds, zero blocks and compressible ones cost far less than their size.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use novacron_migration::{
    ImagePageIndex, ProxyConfig, SharedImagePages, StreamFormat, receive_migration_stream_duplex,
    send_migration_stream_duplex,
};
use novacron_transport::{Listener, Session, SessionOptions};
use tokio::time::timeout;

const MIB: usize = 1 << 20;

fn session_options() -> SessionOptions {
    SessionOptions {
        initial_bulk_connections: Some(2),
        adapt_stream_count: false,
        ..SessionOptions::default()
    }
}

/// Text-like bytes: lines of words from a small vocabulary (compresses several times).
fn text(length: usize, seed: u64) -> Vec<u8> {
    let vocabulary = [
        "GET",
        "POST",
        "/api/v1/vms",
        "200",
        "404",
        "user",
        "alice",
        "bob",
        "bytes",
        "latency",
    ];
    let mut out = Vec::with_capacity(length + 64);
    for word in words(seed) {
        if out.len() >= length {
            break;
        }
        out.extend_from_slice(vocabulary[(word % vocabulary.len() as u64) as usize].as_bytes());
        out.push(if word >> 61 == 0 { b'\n' } else { b' ' });
    }
    out.truncate(length);
    out
}

fn random(length: usize, seed: u64) -> Vec<u8> {
    words(seed)
        .flat_map(u64::to_le_bytes)
        .take(length)
        .collect()
}

/// Runs `qemu-nbd` serving `target` (raw) on `socket` until the client disconnects.
fn serve_nbd(target: &Path, socket: &Path) -> std::process::Child {
    std::process::Command::new("qemu-nbd")
        .args(["--format", "raw", "--cache", "none", "--aio", "threads"])
        .arg(format!("--socket={}", socket.display()))
        .arg(target)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-nbd (qemu-utils)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_writes_a_disk_through_the_proxy_and_known_blocks_cost_only_their_hash() {
    let directory = run_directory();
    let base_path = directory.path().join("base.raw");
    let source_path = directory.path().join("source.raw");
    let target_path = directory.path().join("target.raw");
    // The base image both hosts hold: 8 MiB of random blocks.
    let base = random(8 * MIB, 1);
    std::fs::write(&base_path, &base).unwrap();
    // What the client writes: zeros, the base's blocks (as a guest copying files it has),
    // fresh random data and text.
    let mut disk = vec![0u8; 4 * MIB];
    disk.extend_from_slice(&base);
    disk.extend(random(4 * MIB, 2));
    disk.extend(text(8 * MIB, 3));
    std::fs::write(&source_path, &disk).unwrap();
    std::fs::write(&target_path, vec![0xaau8; disk.len()]).unwrap();

    let index = Arc::new(ImagePageIndex::build(&base_path).expect("index"));
    let config = ProxyConfig {
        format: StreamFormat::Nbd,
        idle_flush: Duration::from_millis(2),
        image_pages: SharedImagePages::new(Some(index)),
        ..ProxyConfig::default()
    };
    let (destination_tls, source_tls) = pinned_pair();
    let listener = Listener::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &destination_tls,
        session_options(),
    )
    .await
    .expect("bind");
    let address = listener.local_addr();

    let server_socket = directory.path().join("server.sock");
    let mut server = serve_nbd(&target_path, &server_socket);
    let destination_side = {
        let config = config.clone();
        let server_socket = server_socket.clone();
        tokio::spawn(async move {
            let session = Arc::new(listener.accept().await.expect("accept"));
            let connected = async {
                loop {
                    match tokio::net::UnixStream::connect(&server_socket).await {
                        Ok(stream) => return stream,
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            };
            let stream = timeout(Duration::from_secs(30), connected)
                .await
                .expect("qemu-nbd listens");
            receive_migration_stream_duplex(&session, stream, &config).await
        })
    };

    let client_socket = directory.path().join("client.sock");
    let client_listener = tokio::net::UnixListener::bind(&client_socket).unwrap();
    let session = Arc::new(
        Session::connect(address, &source_tls, session_options())
            .await
            .expect("connect"),
    );
    let source_side = {
        let session = session.clone();
        let config = config.clone();
        tokio::spawn(async move {
            let (stream, _) = client_listener.accept().await.expect("qemu-img connects");
            send_migration_stream_duplex(stream, &session, &config).await
        })
    };
    let convert = tokio::process::Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&source_path)
        .arg(format!("nbd+unix:///?socket={}", client_socket.display()))
        .status();
    let status = timeout(DEADLINE, convert)
        .await
        .expect("qemu-img in time")
        .expect("qemu-img runs");
    assert!(status.success(), "qemu-img convert through the proxy");
    let sent = timeout(DEADLINE, source_side)
        .await
        .expect("source side in time")
        .unwrap()
        .expect("the client's half sent");
    let received = timeout(DEADLINE, destination_side)
        .await
        .expect("destination side in time")
        .unwrap()
        .expect("the client's half rebuilt and verified");
    let _ = timeout(Duration::from_secs(10), session.flush()).await;
    let _ = tokio::task::spawn_blocking(move || server.wait()).await;

    assert_eq!(sent.stream_checksum, received.stream_checksum);
    assert_eq!(sent.stream_bytes, received.stream_bytes);
    let written = std::fs::read(&target_path).unwrap();
    assert!(written == disk, "the target holds the source's bytes");
    let codec = &sent.codec;
    eprintln!(
        "nbd through the proxy: {} stream bytes, {} message bytes, {codec:?}",
        sent.stream_bytes, sent.message_bytes
    );
    assert!(
        codec.known_from_destination >= 2048,
        "the base's 2048 blocks travel as hashes: {codec:?}"
    );
    // Zeros, hashes and 8 MiB of text cost little; the 4 MiB of random data is what crosses.
    assert!(
        sent.message_bytes < 6 * MIB as u64,
        "{} message bytes for a {} byte disk",
        sent.message_bytes,
        disk.len()
    );
}
