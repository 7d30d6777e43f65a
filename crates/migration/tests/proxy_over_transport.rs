//! A real guest migrated through the proxy: the source QEMU migrates into a unix socket, the
//! source side re-encodes the stream and sends it over a DWCP transport session (mTLS with pinned
//! self-signed identities, over loopback), the destination side rebuilds it into the destination
//! QEMU's `-incoming` socket and proves it identical (BLAKE3 over the whole stream). Needs the
//! test guest (`scripts/build-guest`) with its memory workload.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use novacron_migration::{
    ProxyConfig, receive_migration_stream, receive_migration_stream_duplex,
    receive_multifd_migration, send_migration_stream, send_migration_stream_duplex,
    send_multifd_migration,
};
use novacron_transport::{Listener, Session, SessionOptions};
use tokio::time::timeout;

fn session_options() -> SessionOptions {
    SessionOptions {
        initial_bulk_connections: Some(2),
        adapt_stream_count: false,
        resume_timeout: Duration::from_secs(20),
        handshake_timeout: Duration::from_secs(10),
        ..SessionOptions::default()
    }
}

/// The proxy over a real session without QEMU: a synthetic stream (8 MiB guest, two passes)
/// arrives identical, in fewer bytes. The source's send window starts from a measured rate
/// (a forecast) and never goes below four of its bandwidth-delay products.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthetic_stream_crosses_a_loopback_session_identically() {
    let stream = novacron_migration::synthetic::two_pass_stream(2048);
    let (destination_tls, source_tls) = pinned_pair();
    let config = ProxyConfig {
        // Four products at this rate exceed the session's largest window even over loopback.
        initial_rate_bytes_per_second: 1e13,
        initial_rate_is_measured: true,
        ..ProxyConfig::default()
    };
    let listener = Listener::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &destination_tls,
        session_options(),
    )
    .await
    .expect("bind");
    let address = listener.local_addr();
    let destination_side = {
        let config = config.clone();
        tokio::spawn(async move {
            let session = listener.accept().await.expect("accept");
            let mut sink = Vec::new();
            let report = receive_migration_stream(&session, &mut sink, &config).await;
            // Everything arrived: the receiving side has nothing to flush, so it drops its end
            // (`Session::close` here would wait for the already closed source).
            drop(session);
            (report, sink)
        })
    };
    let session = Session::connect(address, &source_tls, session_options())
        .await
        .expect("connect");
    let sent = timeout(
        Duration::from_secs(60),
        send_migration_stream(&stream[..], &session, &config),
    )
    .await
    .expect("sent in time")
    .expect("send");
    assert_eq!(
        session.bulk_send_window(),
        session_options().bulk_send_window_bytes,
        "the window stays at the forecast's floor (capped by the session's largest)"
    );
    timeout(Duration::from_secs(60), session.close())
        .await
        .expect("closed in time")
        .expect("close");
    let (received, rebuilt) = timeout(Duration::from_secs(60), destination_side)
        .await
        .expect("received in time")
        .expect("destination task");
    let received = received.expect("receive");
    assert_eq!(rebuilt, stream);
    assert_eq!(
        received.stream_checksum,
        *novacron_migration::stream_digest(novacron_migration::StreamParser::new(), &stream)
            .expect("the stream parses")
            .as_bytes()
    );
    assert_eq!(sent.stream_checksum, received.stream_checksum);
    assert!(sent.message_bytes * 4 < stream.len() as u64, "{sent:?}");
}

/// Migrates the guest through the proxy (paused first when `pause_source`); checks identity and
/// that the destination loaded the stream, then resumes the destination and checks that the guest
/// continues with its whole workload region re-verified.
async fn migrate_through_proxy(pause_source: bool) {
    let source_dir = run_directory();
    let destination_dir = run_directory();
    let (source, _source_guard) = launch(&guest_spec("px-src", source_dir.path(), None)).await;
    let source_console = source.run_directory().console_log();
    wait_for_console(&source_console, "NOVACRON-WORKLOAD tick=2 ").await;
    let incoming = destination_dir.path().join("in.sock");
    let (destination, _destination_guard) = launch(&guest_spec(
        "px-dst",
        destination_dir.path(),
        Some(&format!("unix:{}", incoming.display())),
    ))
    .await;

    let (destination_tls, source_tls) = pinned_pair();
    let config = ProxyConfig::default();
    let listener = Listener::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &destination_tls,
        session_options(),
    )
    .await
    .expect("bind the transport listener");
    let address = listener.local_addr();
    let destination_side = {
        let config = config.clone();
        let incoming = incoming.clone();
        tokio::spawn(async move {
            let session = listener.accept().await.expect("accept the session");
            let to_qemu = tokio::net::UnixStream::connect(&incoming)
                .await
                .expect("connect to the destination's -incoming socket");
            let report = receive_migration_stream(&session, to_qemu, &config).await;
            let stats = session.stats();
            // Everything arrived: the receiving side drops its end (see above).
            drop(session);
            (report, stats)
        })
    };

    let outgoing = source_dir.path().join("out.sock");
    let from_qemu_listener = tokio::net::UnixListener::bind(&outgoing).expect("bind");
    if pause_source {
        source.qmp().stop().await.expect("stop the source");
    }
    // Far above what the proxy carries: the proxy's backpressure sets the pace.
    let max_bandwidth: u64 = 1 << 30;
    set_max_bandwidth(&source, max_bandwidth).await;
    start_migration(&source, &format!("unix:{}", outgoing.display())).await;
    let (from_qemu, _) = from_qemu_listener
        .accept()
        .await
        .expect("accept qemu's stream");
    let session = Session::connect(address, &source_tls, session_options())
        .await
        .expect("open the transport session");
    let sent = send_migration_stream(from_qemu, &session, &config)
        .await
        .expect("send the migration stream");
    let source_stats = session.stats();
    session.close().await.expect("close the session");
    let (received, destination_stats) = destination_side.await.expect("destination task");
    let received = received.expect("receive the migration stream");

    // Identity: the destination rebuilt every byte (it checked the END checksum itself).
    assert_eq!(received.stream_bytes, sent.stream_bytes);
    assert_eq!(received.stream_checksum, sent.stream_checksum);
    assert_eq!(received.pages, sent.pages);
    assert!(sent.stream_bytes > 100 << 20, "{sent:?}");
    let source_info = wait_for_migration_status(&source, &["completed"]).await;
    let passes = source_info["ram"]["dirty-sync-count"]
        .as_u64()
        .unwrap_or_default();
    let codec = &sent.codec;
    println!(
        "proxy ({}): {passes} passes; stream {} bytes, proxy messages {} bytes ({:.1}x smaller), \
         transport bulk payload sent {} / received {} bytes; {} pages: {} zero, {} known, {} delta, {} literal; \
         opaque {} bytes -> script {} bytes; {} batches",
        if pause_source {
            "paused source"
        } else {
            "live"
        },
        sent.stream_bytes,
        sent.message_bytes,
        sent.stream_bytes as f64 / sent.message_bytes as f64,
        source_stats.bulk_bytes_sent,
        destination_stats.bulk_bytes_received,
        sent.pages,
        codec.zero_pages,
        codec.known_from_transfer,
        codec.delta_pages,
        codec.literal_pages,
        sent.opaque_bytes,
        sent.script_bytes,
        sent.batches,
    );
    assert!(sent.message_bytes < sent.stream_bytes, "{sent:?}");
    assert_eq!(received.message_bytes, sent.message_bytes);

    resume_at_destination_and_verify(&source, &source_console, &destination).await;
}

/// A paused guest through the proxy: the destination resumes it, its workload counter carries on
/// from the source's, and its whole 64 MiB region is re-verified there without an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_guest_migrates_through_the_proxy_and_its_memory_verifies() {
    migrate_through_proxy(true).await;
}

/// A running guest through the proxy (several dirty-page passes: the proxy, a debug build here,
/// is slower than QEMU): identical stream, loaded at the destination, where the guest continues
/// with its whole workload region re-verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_guest_migrates_through_the_proxy_and_its_memory_verifies() {
    migrate_through_proxy(false).await;
}

/// A live guest migrated with QEMU's multifd (2 channels, no compression) through the proxy:
/// three sessions, one per QEMU connection, each rebuilt and proved identical at the
/// destination; the pages travel on the multifd channels through the codec, and the guest
/// continues at the destination with its whole region verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_guest_migrates_over_multifd_channels_through_the_proxy() {
    const CHANNELS: usize = 2;
    let source_dir = run_directory();
    let destination_dir = run_directory();
    // Multifd checks that both ends are the same VM.
    let uuid = uuid::Uuid::new_v4();
    let mut source_spec = guest_spec("mf-src", source_dir.path(), None);
    source_spec.uuid = uuid;
    let (source, _source_guard) = launch(&source_spec).await;
    let source_console = source.run_directory().console_log();
    wait_for_console(&source_console, "NOVACRON-WORKLOAD tick=2 ").await;
    // `defer`: multifd must be on before the destination listens.
    let mut destination_spec = guest_spec("mf-dst", destination_dir.path(), Some("defer"));
    destination_spec.uuid = uuid;
    let (destination, _destination_guard) = launch(&destination_spec).await;
    for vm in [&source, &destination] {
        vm.qmp()
            .execute(
                "migrate-set-capabilities",
                Some(serde_json::json!({
                    "capabilities": [{ "capability": "multifd", "state": true }]
                })),
            )
            .await
            .expect("multifd on");
        vm.qmp()
            .execute(
                "migrate-set-parameters",
                Some(serde_json::json!({
                    "multifd-channels": CHANNELS,
                    "multifd-compression": "none",
                })),
            )
            .await
            .expect("multifd parameters");
    }
    let incoming = destination_dir.path().join("in.sock");
    destination
        .qmp()
        .execute(
            "migrate-incoming",
            Some(serde_json::json!({ "uri": format!("unix:{}", incoming.display()) })),
        )
        .await
        .expect("migrate-incoming");

    let (destination_tls, source_tls) = pinned_pair();
    let config = ProxyConfig::default();
    let listener = Listener::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &destination_tls,
        session_options(),
    )
    .await
    .expect("bind the transport listener");
    let address = listener.local_addr();
    let destination_side = {
        let config = config.clone();
        let incoming = incoming.clone();
        tokio::spawn(async move {
            let mut sessions = Vec::new();
            for _ in 0..=CHANNELS {
                sessions.push(listener.accept().await.expect("accept a session"));
            }
            let report = receive_multifd_migration(&sessions, &incoming, &config).await;
            drop(sessions);
            report
        })
    };
    let mut sessions = Vec::new();
    for _ in 0..=CHANNELS {
        sessions.push(
            Session::connect(address, &source_tls, session_options())
                .await
                .expect("open a transport session"),
        );
    }
    let outgoing = source_dir.path().join("out.sock");
    let from_qemu = tokio::net::UnixListener::bind(&outgoing).expect("bind");
    set_max_bandwidth(&source, 1 << 30).await;
    start_migration(&source, &format!("unix:{}", outgoing.display())).await;
    let sent = send_multifd_migration(&from_qemu, &sessions, &config)
        .await
        .expect("send the migration's channels");
    for session in sessions {
        session.close().await.expect("close a session");
    }
    let received = destination_side
        .await
        .expect("destination task")
        .expect("receive the migration's channels");

    assert_eq!(received.stream_bytes, sent.stream_bytes);
    assert_eq!(received.stream_checksum, sent.stream_checksum);
    assert_eq!(received.pages, sent.pages);
    let source_info = wait_for_migration_status(&source, &["completed"]).await;
    // Every page QEMU sent whole went through a multifd channel and the codec.
    let normal = source_info["ram"]["normal"].as_u64().expect("normal pages");
    assert!(normal > 10_000, "{source_info}");
    assert_eq!(sent.pages, normal, "{sent:?} {source_info}");
    assert!(sent.message_bytes < sent.stream_bytes, "{sent:?}");
    println!(
        "multifd x{CHANNELS} through the proxy: {} stream bytes in {} message bytes, {} pages \
         ({} zero, {} known, {} delta, {} literal)",
        sent.stream_bytes,
        sent.message_bytes,
        sent.pages,
        sent.codec.zero_pages,
        sent.codec.known_from_transfer,
        sent.codec.delta_pages,
        sent.codec.literal_pages,
    );

    resume_at_destination_and_verify(&source, &source_console, &destination).await;
}

/// After a precopy through the proxy: the destination loaded the stream and waits, paused; the
/// source stops, the destination resumes and runs, and its workload carries on from the source's
/// last tick with its whole region re-verified.
async fn resume_at_destination_and_verify(
    source: &novacron_qemu::QemuVm,
    source_console: &std::path::Path,
    destination: &novacron_qemu::QemuVm,
) {
    let state = wait_until_loaded(destination).await;
    assert_eq!(state, "paused", "loaded and waiting for cont");
    let text = std::fs::read_to_string(source_console).unwrap_or_default();
    let source_tick = workload_ticks(&text).last().expect("source ticks").tick;
    source.force_stop().await.expect("stop source");
    let ticks = resume_and_check_guest_continues(
        destination,
        source_tick,
        TICKS_TO_VERIFY_WHOLE_REGION + 1,
    )
    .await;
    println!(
        "destination continued from tick {source_tick} to {} with errors=0",
        ticks.last().unwrap().tick
    );
    destination.force_stop().await.expect("stop destination");
}

async fn enable_postcopy(vm: &novacron_qemu::QemuVm) {
    vm.qmp()
        .execute(
            "migrate-set-capabilities",
            Some(serde_json::json!({ "capabilities": [
                { "capability": "postcopy-ram", "state": true },
            ]})),
        )
        .await
        .expect("enable postcopy-ram");
}

/// Post-copy through the proxy: the source switches after its first pass at a rate far below
/// the guest's needs, the destination's guest runs while the rest of its memory arrives (the
/// pages it touches first, fetched over QEMU's return path, which the proxy carries back), the
/// rebuilt stream is identical, and the workload's counter and memory check carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_copy_runs_the_guest_at_the_destination_while_its_pages_arrive_over_the_proxy() {
    let source_dir = run_directory();
    let destination_dir = run_directory();
    let (source, _source_guard) = launch(&guest_spec("pc-src", source_dir.path(), None)).await;
    let source_console = source.run_directory().console_log();
    wait_for_console(&source_console, "NOVACRON-WORKLOAD tick=2 ").await;
    let incoming = destination_dir.path().join("in.sock");
    let (destination, _destination_guard) = launch(&guest_spec(
        "pc-dst",
        destination_dir.path(),
        Some(&format!("unix:{}", incoming.display())),
    ))
    .await;
    enable_postcopy(&source).await;
    enable_postcopy(&destination).await;

    let (destination_tls, source_tls) = pinned_pair();
    let config = ProxyConfig::default();
    let listener = Listener::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &destination_tls,
        session_options(),
    )
    .await
    .expect("bind the transport listener");
    let address = listener.local_addr();
    let destination_side = {
        let config = config.clone();
        let incoming = incoming.clone();
        tokio::spawn(async move {
            let session = std::sync::Arc::new(listener.accept().await.expect("accept"));
            let to_qemu = tokio::net::UnixStream::connect(&incoming)
                .await
                .expect("connect to the destination's -incoming socket");
            receive_migration_stream_duplex(&session, to_qemu, &config).await
        })
    };
    let outgoing = source_dir.path().join("out.sock");
    let from_qemu_listener = tokio::net::UnixListener::bind(&outgoing).expect("bind");
    // 8 MB/s against a 64 MiB working set rewritten every few seconds: precopy alone would
    // never converge.
    set_max_bandwidth(&source, 8 << 20).await;
    start_migration(&source, &format!("unix:{}", outgoing.display())).await;
    let (from_qemu, _) = from_qemu_listener.accept().await.expect("accept");
    let session = std::sync::Arc::new(
        Session::connect(address, &source_tls, session_options())
            .await
            .expect("open the transport session"),
    );
    let sender = {
        let session = session.clone();
        let config = config.clone();
        tokio::spawn(
            async move { send_migration_stream_duplex(from_qemu, &session, &config).await },
        )
    };

    // After the first pass (about 256 MiB of mostly zero pages), switch.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let info = source.qmp().query_migrate().await.expect("query-migrate");
        // `setup` until QEMU has synced its dirty bitmap the first time (slow on a busy host).
        assert!(
            info["status"] == "active" || info["status"] == "setup",
            "{info}"
        );
        if info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "first pass never ended: {info}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // As `vm migrate` does: the session is emptied first (the proxy stops reading QEMU's
    // stream meanwhile), so the device state crosses behind little else; released once QEMU
    // was told to switch, the stream goes on.
    let drained = config.window_control.drain(DEADLINE).await;
    let switched = source.qmp().execute("migrate-start-postcopy", None).await;
    config.window_control.release();
    switched.expect("migrate-start-postcopy");
    assert!(drained, "the session drained before the switch");
    wait_for_migration_status(&source, &["postcopy-active", "completed"]).await;
    let state = wait_until_loaded(&destination).await;
    assert_eq!(state, "paused", "started with -S: waits for cont");
    let text = std::fs::read_to_string(&source_console).unwrap_or_default();
    let source_tick = workload_ticks(&text).last().expect("source ticks").tick;
    // Raise the rate so the background push ends soon; the guest already runs on demand.
    set_max_bandwidth(&source, 1 << 30).await;
    destination.qmp().cont().await.expect("cont");

    wait_for_migration_status(&source, &["completed"]).await;
    let sent = timeout(DEADLINE, sender)
        .await
        .expect("the sender ends")
        .expect("sender task")
        .expect("send the migration stream");
    let received = timeout(DEADLINE, destination_side)
        .await
        .expect("the receiver ends")
        .expect("destination task")
        .expect("receive the migration stream");
    assert_eq!(received.stream_bytes, sent.stream_bytes);
    assert_eq!(received.stream_checksum, sent.stream_checksum);
    assert_eq!(received.pages, sent.pages);
    assert!(sent.message_bytes < sent.stream_bytes, "{sent:?}");
    let stats = session.stats();
    assert!(
        stats.bulk_bytes_received > 0,
        "the destination's answers came back over the session: {stats:?}"
    );
    let ticks = check_guest_continues(
        &destination.run_directory().console_log(),
        source_tick,
        TICKS_TO_VERIFY_WHOLE_REGION + 1,
    )
    .await;
    println!(
        "post-copy: stream {} bytes, proxy messages {} bytes, {} pages; return path {} bytes; \
         destination continued from tick {source_tick} to {} with errors=0",
        sent.stream_bytes,
        sent.message_bytes,
        sent.pages,
        stats.bulk_bytes_received,
        ticks.last().unwrap().tick
    );
    source.force_stop().await.expect("stop source");
    destination.force_stop().await.expect("stop destination");
}

/// Forwards writes to `inner` until `limit` bytes have passed, then fails every write: a
/// destination that dies part-way through the stream.
struct FailAfter<W> {
    inner: W,
    remaining: u64,
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for FailAfter<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        buffer: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.remaining == 0 {
            return std::task::Poll::Ready(Err(std::io::Error::other("destination died")));
        }
        let allowed = buffer.len().min(self.remaining as usize);
        let result = std::pin::Pin::new(&mut self.inner).poll_write(context, &buffer[..allowed]);
        if let std::task::Poll::Ready(Ok(written)) = &result {
            self.remaining -= *written as u64;
        }
        result
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(context)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(context)
    }
}

/// Fail safe: the destination side dies 32 MiB into the stream. The proxy fails on both sides,
/// the destination QEMU gets a cut stream and never runs the guest, and the source guest keeps
/// running with its memory intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_dying_mid_stream_leaves_the_source_running() {
    let source_dir = run_directory();
    let destination_dir = run_directory();
    let (source, _source_guard) = launch(&guest_spec("cut-src", source_dir.path(), None)).await;
    let source_console = source.run_directory().console_log();
    wait_for_console(&source_console, "NOVACRON-WORKLOAD tick=2 ").await;
    let incoming = destination_dir.path().join("in.sock");
    let (destination, _destination_guard) = launch(&guest_spec(
        "cut-dst",
        destination_dir.path(),
        Some(&format!("unix:{}", incoming.display())),
    ))
    .await;

    let (destination_tls, source_tls) = pinned_pair();
    let config = ProxyConfig::default();
    let options = SessionOptions {
        resume_timeout: Duration::from_secs(5),
        ..session_options()
    };
    let listener = Listener::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &destination_tls,
        options.clone(),
    )
    .await
    .expect("bind");
    let address = listener.local_addr();
    let destination_side = {
        let config = config.clone();
        let incoming = incoming.clone();
        tokio::spawn(async move {
            let session = listener.accept().await.expect("accept");
            let to_qemu = tokio::net::UnixStream::connect(&incoming)
                .await
                .expect("connect to -incoming");
            let sink = FailAfter {
                inner: to_qemu,
                remaining: 32 << 20,
            };
            receive_migration_stream(&session, sink, &config).await
            // The session and the socket into QEMU drop here, as in a crash.
        })
    };
    let outgoing = source_dir.path().join("out.sock");
    let from_qemu_listener = tokio::net::UnixListener::bind(&outgoing).expect("bind");
    set_max_bandwidth(&source, 1 << 30).await;
    start_migration(&source, &format!("unix:{}", outgoing.display())).await;
    let (from_qemu, _) = timeout(DEADLINE, from_qemu_listener.accept())
        .await
        .expect("qemu connects in time")
        .expect("accept");
    let session = Session::connect(address, &source_tls, options)
        .await
        .expect("connect");
    let sent = timeout(
        DEADLINE,
        send_migration_stream(from_qemu, &session, &config),
    )
    .await
    .expect("the source side ends in time");
    let error = sent.expect_err("the source side fails when the destination is gone");
    println!("source side: {error}");
    drop(session);
    let received = timeout(DEADLINE, destination_side)
        .await
        .expect("destination ends in time")
        .expect("destination task");
    let error = received.expect_err("the destination side fails");
    assert!(error.to_string().contains("writing the stream"), "{error}");

    // QEMU reports the failed migration and the guest runs on at the source.
    let info = wait_for_migration_status(&source, &["failed", "cancelled"]).await;
    println!("source qemu: {}", info["status"]);
    let status = source.qmp().query_status().await.expect("query-status");
    assert!(status.running, "the source guest keeps running: {status:?}");
    let text = std::fs::read_to_string(&source_console).unwrap_or_default();
    let tick = workload_ticks(&text).last().expect("ticks").tick;
    check_guest_continues_in_place(&source_console, tick + 3).await;

    // The destination got a cut stream: QEMU refuses it and exits; the guest never ran there.
    let exit = timeout(DEADLINE, destination.wait_for_exit())
        .await
        .expect("the destination qemu exits on the cut stream");
    println!("destination qemu: {exit}");
    let destination_log =
        std::fs::read_to_string(destination.run_directory().console_log()).unwrap_or_default();
    assert!(
        workload_ticks(&destination_log).is_empty(),
        "the guest never ran at the destination: {destination_log}"
    );
    source.force_stop().await.expect("stop source");
}

/// Waits until the source's own workload reaches `tick` with no error (it never left).
async fn check_guest_continues_in_place(console: &std::path::Path, tick: u64) {
    let log = wait_for_console(console, &format!("NOVACRON-WORKLOAD tick={tick} ")).await;
    assert!(!log.contains("NOVACRON-WORKLOAD-CORRUPT"), "{log}");
    assert!(
        workload_ticks(&log).iter().all(|tick| tick.errors == 0),
        "{log}"
    );
}
