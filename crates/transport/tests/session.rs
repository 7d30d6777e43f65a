//! Loopback tests of sessions: round trips over N streams, bidirectional use, the control channel,
//! resume after cut connections, backpressure bounds, and stream-count adaptation.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use novacron_transport::{ControlIncoming, Session, SessionOptions};

async fn receive_all(session: &Session) -> (u64, blake3::Hash) {
    let mut hasher = blake3::Hasher::new();
    let mut total = 0u64;
    while let Some(chunk) = session.recv().await.unwrap() {
        total += chunk.len() as u64;
        hasher.update(&chunk);
    }
    (total, hasher.finalize())
}

/// A session dialled through a [`CuttingProxy`], its accepted end receiving everything in the
/// background.
struct ThroughProxy {
    dialer: Session,
    accepted: Arc<Session>,
    /// What the accepted end received: bytes and their BLAKE3.
    receiver: tokio::task::JoinHandle<(u64, blake3::Hash)>,
    proxy: CuttingProxy,
    _listener: novacron_transport::Listener,
}

/// Both ends with `test_options(connections)`, the dialer's changed by `dialer_options`.
async fn through_proxy(
    connections: u32,
    dialer_options: impl FnOnce(&mut SessionOptions),
) -> ThroughProxy {
    let (listener_tls, dialer_tls) = pinned_pair();
    let listener = listen(&listener_tls, test_options(connections)).await;
    let proxy = CuttingProxy::start(listener.local_addr()).await;
    let mut options = test_options(connections);
    dialer_options(&mut options);
    let dialer = Session::connect(proxy.address, &dialer_tls, options)
        .await
        .unwrap();
    let accepted = Arc::new(listener.accept().await.unwrap());
    let receiver_session = accepted.clone();
    let receiver = tokio::spawn(async move { receive_all(&receiver_session).await });
    ThroughProxy {
        dialer,
        accepted,
        receiver,
        proxy,
        _listener: listener,
    }
}

async fn send_in_pieces(session: &Session, payload: &Bytes, piece: usize) {
    let mut offset = 0;
    while offset < payload.len() {
        let end = (offset + piece).min(payload.len());
        session.send(payload.slice(offset..end)).await.unwrap();
        offset = end;
    }
    session.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_random_payload_round_trips_over_four_streams_with_post_quantum_key_exchange() {
    init_tracing();
    within(async {
        let (listener_tls, dialer_tls) = pinned_pair();
        let listener = listen(&listener_tls, test_options(4)).await;
        let payload = random_payload(64 << 20, 1);
        let expected = blake3::hash(&payload);
        let dialer = Session::connect(listener.local_addr(), &dialer_tls, test_options(4))
            .await
            .unwrap();
        let accepted = listener.accept().await.unwrap();
        assert_eq!(
            accepted.peer_fingerprint(),
            dialer_tls.identity.fingerprint()
        );
        assert_eq!(
            dialer.peer_fingerprint(),
            listener_tls.identity.fingerprint()
        );
        let receiver = tokio::spawn(async move {
            let result = receive_all(&accepted).await;
            (result, accepted)
        });
        // Odd piece size so frames and application writes do not line up.
        send_in_pieces(&dialer, &payload, 1_000_003).await;
        let ((total, hash), accepted) = receiver.await.unwrap();
        assert_eq!(total, payload.len() as u64);
        assert_eq!(hash, expected);
        let stats = dialer.stats();
        assert_eq!(stats.key_exchange_group.as_deref(), Some("X25519MLKEM768"));
        assert_eq!(
            accepted.stats().key_exchange_group.as_deref(),
            Some("X25519MLKEM768")
        );
        assert_eq!(stats.bulk_connections, 4, "{stats:?}");
        assert_eq!(stats.bulk_bytes_retransmitted, 0);
        dialer.close().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_directions_and_the_control_channel_work_at_once() {
    init_tracing();
    within(async {
        let (listener_tls, dialer_tls) = pinned_pair();
        let listener = listen(&listener_tls, test_options(2)).await;
        let dialer = std::sync::Arc::new(
            Session::connect(listener.local_addr(), &dialer_tls, test_options(2))
                .await
                .unwrap(),
        );
        let accepted = std::sync::Arc::new(listener.accept().await.unwrap());
        let forward = random_payload(8 << 20, 2);
        let backward = random_payload(6 << 20, 3);

        // The listener answers "which of these do you have?" requests while it streams back.
        let responder_control = accepted.control();
        let responder = tokio::spawn(async move {
            let mut notifications = Vec::new();
            while let Some(incoming) = responder_control.next_incoming().await.unwrap() {
                match incoming {
                    ControlIncoming::Request(request) => {
                        let mut answer = request.body.to_vec();
                        answer.reverse();
                        request.respond(Bytes::from(answer)).await.unwrap();
                    }
                    ControlIncoming::Notification(body) => {
                        notifications.push(body);
                        if notifications.len() == 3 {
                            return notifications;
                        }
                    }
                }
            }
            notifications
        });
        let listener_side = accepted.clone();
        let backward_clone = backward.clone();
        let listener_sends =
            tokio::spawn(
                async move { send_in_pieces(&listener_side, &backward_clone, 65_537).await },
            );
        let dialer_side = dialer.clone();
        let dialer_receives = tokio::spawn(async move { receive_all(&dialer_side).await });
        let listener_side = accepted.clone();
        let listener_receives = tokio::spawn(async move { receive_all(&listener_side).await });

        let control = dialer.control();
        for index in 0..20u8 {
            let answer = control
                .request(Bytes::from(vec![index, 1, 2]))
                .await
                .unwrap();
            assert_eq!(&answer[..], &[2, 1, index]);
        }
        for index in 0..3u8 {
            control.notify(Bytes::from(vec![index])).await.unwrap();
        }
        send_in_pieces(&dialer, &forward, 300_000).await;

        let notifications = responder.await.unwrap();
        assert_eq!(
            notifications,
            vec![
                Bytes::from_static(&[0]),
                Bytes::from_static(&[1]),
                Bytes::from_static(&[2])
            ]
        );
        listener_sends.await.unwrap();
        let (total, hash) = listener_receives.await.unwrap();
        assert_eq!(
            (total, hash),
            (forward.len() as u64, blake3::hash(&forward))
        );
        let (total, hash) = dialer_receives.await.unwrap();
        assert_eq!(
            (total, hash),
            (backward.len() as u64, blake3::hash(&backward))
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_resumes_after_every_connection_is_cut_mid_transfer() {
    init_tracing();
    within(async {
        let payload = random_payload(48 << 20, 4);
        let expected = blake3::hash(&payload);
        // A small window keeps the sender from finishing before the cuts.
        let ThroughProxy {
            dialer,
            accepted,
            receiver,
            proxy,
            _listener,
        } = through_proxy(3, |options| options.bulk_send_window_bytes = 2 << 20).await;
        let sender = tokio::spawn(async move {
            send_in_pieces(&dialer, &payload, 1 << 20).await;
            dialer.flush().await.unwrap();
            dialer
        });
        for cut in 1..=3u64 {
            let threshold = cut * (12 << 20);
            wait_until("receiver progress before the cut", TEST_DEADLINE, || {
                accepted.stats().bulk_bytes_received >= threshold
            })
            .await;
            proxy.cut_all();
        }
        let (total, hash) = receiver.await.unwrap();
        assert_eq!(total, 48 << 20);
        assert_eq!(
            hash, expected,
            "data lost, duplicated or reordered across resumes"
        );
        let dialer = sender.await.unwrap();
        let stats = dialer.stats();
        assert!(stats.reconnections >= 3, "{stats:?}");
        assert!(proxy.connections.load(std::sync::atomic::Ordering::Relaxed) > 4);
        // Only unacknowledged frames are resent: at most a send window per lost connection (a
        // requeued frame can land on a connection that is already cut but not yet noticed).
        assert!(
            stats.bulk_bytes_retransmitted <= stats.reconnections * (2 << 20),
            "{stats:?}"
        );
    })
    .await;
}

/// A bulk connection that stops delivering (its path stalled, not cut: nothing resets it, and
/// TCP would take 15 s to give up) no longer holds the end of the stream: once nothing else is
/// left to send, its overdue frames go again on the other connection, and the receiver has
/// everything while the stall lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_stuck_on_a_stalled_connection_arrive_by_another_at_the_end() {
    init_tracing();
    within(async {
        let payload = random_payload(16 << 20, 9);
        let expected = blake3::hash(&payload);
        let ThroughProxy {
            dialer,
            accepted,
            receiver,
            proxy,
            _listener,
        } = through_proxy(2, |_| {}).await;
        for piece in payload.slice(..8 << 20).chunks(1 << 20) {
            dialer.send(Bytes::copy_from_slice(piece)).await.unwrap();
        }
        wait_until("the first half to arrive", TEST_DEADLINE, || {
            accepted.stats().bulk_bytes_received >= 4 << 20
        })
        .await;
        let stalled = proxy.stall_busiest();
        let forwarded_when_stalled = proxy.forwarded_by(stalled);
        send_in_pieces(&dialer, &payload.slice(8 << 20..), 1 << 20).await;
        let (total, hash) = receiver.await.unwrap();
        assert_eq!(total, 16 << 20);
        assert_eq!(hash, expected, "data lost, duplicated or reordered");
        // At most the read the stall caught in flight crossed the stalled connection since.
        assert!(
            proxy.forwarded_by(stalled) <= forwarded_when_stalled + (64 << 10),
            "the stalled connection delivered {} bytes more",
            proxy.forwarded_by(stalled) - forwarded_when_stalled
        );
        dialer.flush().await.unwrap();
        let stats = dialer.stats();
        assert!(stats.bulk_bytes_hedged > 0, "{stats:?}");
        assert_eq!(stats.reconnections, 0, "{stats:?}");
    })
    .await;
}

/// A session fails once it has been without connections for its resume timeout; one whose
/// timeout is raised while it runs (as a post-copy migration does once the guest depends on the
/// link) waits out a longer outage and then delivers everything, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_resume_timeout_outlasts_an_outage_the_configured_one_does_not() {
    init_tracing();
    within(async {
        let short = Duration::from_millis(1500);
        let options = SessionOptions {
            resume_timeout: short,
            ..test_options(2)
        };
        let (listener_tls, dialer_tls) = pinned_pair();
        let listener = listen(&listener_tls, options.clone()).await;
        let proxy = CuttingProxy::start(listener.local_addr()).await;
        let payload = random_payload(8 << 20, 9);

        // Raised on both sides: the outage lasts twice the configured timeout, then ends.
        let dialer = Session::connect(proxy.address, &dialer_tls, options.clone())
            .await
            .unwrap();
        let accepted = std::sync::Arc::new(listener.accept().await.unwrap());
        let receiver_session = accepted.clone();
        let receiver = tokio::spawn(async move { receive_all(&receiver_session).await });
        dialer.send(payload.slice(..4 << 20)).await.unwrap();
        wait_until("the first half to arrive", TEST_DEADLINE, || {
            accepted.stats().bulk_bytes_received >= 4 << 20
        })
        .await;
        dialer.set_resume_timeout(Duration::from_secs(30));
        accepted.set_resume_timeout(Duration::from_secs(30));
        proxy.set_down(true);
        wait_until(
            "both sides to be without connections for twice the configured timeout",
            TEST_DEADLINE,
            || {
                [dialer.stats(), accepted.stats()]
                    .iter()
                    .all(|stats| stats.disconnected_for.is_some_and(|d| d > short * 2))
            },
        )
        .await;
        proxy.set_down(false);
        send_in_pieces(&dialer, &payload.slice(4 << 20..), 1 << 20).await;
        dialer.flush().await.unwrap();
        assert!(dialer.stats().reconnections >= 1, "{:?}", dialer.stats());
        dialer.close().await.unwrap();
        let (total, hash) = receiver.await.unwrap();
        assert_eq!(total, 8 << 20);
        assert_eq!(hash, blake3::hash(&payload), "data lost or reordered");

        // Not raised: the same outage fails both sides with the configured timeout.
        let dialer = Session::connect(proxy.address, &dialer_tls, options)
            .await
            .unwrap();
        let accepted = listener.accept().await.unwrap();
        proxy.set_down(true);
        let error = dialer.send(payload.slice(..1 << 20)).await;
        let error = match error {
            Err(error) => error,
            Ok(()) => dialer.flush().await.expect_err("the session fails"),
        };
        assert!(error.to_string().contains("1 s"), "{error}");
        // The listener's side fails too, after whatever crossed before the cut took hold (the
        // first frames may: a CI run saw a recv answer data here).
        loop {
            match accepted.recv().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the listener's side saw the stream end instead of failing"),
                Err(_) => break,
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_receiver_bounds_memory_on_both_sides() {
    init_tracing();
    within(async {
        let (listener_tls, dialer_tls) = pinned_pair();
        let mut options = test_options(2);
        options.bulk_send_window_bytes = 4 << 20;
        options.bulk_receive_window_bytes = 3 << 20;
        let listener = listen(&listener_tls, options.clone()).await;
        let dialer = std::sync::Arc::new(
            Session::connect(listener.local_addr(), &dialer_tls, options.clone())
                .await
                .unwrap(),
        );
        let accepted = listener.accept().await.unwrap();
        let payload = random_payload(32 << 20, 5);
        let sending = dialer.clone();
        let sent_payload = payload.clone();
        let sender = tokio::spawn(async move {
            send_in_pieces(&sending, &sent_payload, 256 << 10).await;
        });
        // The receiver does not read: the receiver fills its window, the sender its own, then
        // the sender's `send` blocks.
        wait_until("windows to fill", TEST_DEADLINE, || {
            let sent = dialer.stats();
            let received = accepted.stats();
            received.receive_buffered_bytes + (256 << 10) > options.bulk_receive_window_bytes
                && sent.send_buffered_bytes + (256 << 10) > options.bulk_send_window_bytes
        })
        .await;
        let sent = dialer.stats();
        let received = accepted.stats();
        assert!(received.receive_buffered_bytes <= options.bulk_receive_window_bytes);
        assert!(sent.send_buffered_bytes <= options.bulk_send_window_bytes);
        assert!(
            sent.bulk_bytes_sent < 16 << 20,
            "sender ran ahead: {sent:?}"
        );
        assert!(!sender.is_finished());
        // A wait for the sender's buffer to empty below a megabyte cannot end while the
        // receiver holds back its credit.
        let draining = dialer.clone();
        let mut drained =
            tokio::spawn(async move { draining.bulk_buffered_at_most(1 << 20).await });
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut drained)
                .await
                .is_err(),
            "the wait ended with {} bytes buffered",
            dialer.stats().send_buffered_bytes
        );
        // Now read everything, checking the bound on the way.
        let mut hasher = blake3::Hasher::new();
        let mut total = 0usize;
        while let Some(chunk) = accepted.recv().await.unwrap() {
            assert!(accepted.stats().receive_buffered_bytes <= options.bulk_receive_window_bytes);
            assert!(dialer.stats().send_buffered_bytes <= options.bulk_send_window_bytes);
            total += chunk.len();
            hasher.update(&chunk);
        }
        sender.await.unwrap();
        assert_eq!(total, payload.len());
        assert_eq!(hasher.finalize(), blake3::hash(&payload));
        // Everything was received, so the wait ended.
        drained.await.unwrap().unwrap();
        assert!(dialer.stats().send_buffered_bytes <= 1 << 20);
    })
    .await;
}

/// A dialer's options that let the stream-count policy add connections, up to `maximum`,
/// measuring every 100 ms.
fn adaptive_options(maximum: u32) -> SessionOptions {
    SessionOptions {
        initial_bulk_connections: None,
        adapt_stream_count: true,
        maximum_bulk_connections: maximum,
        measurement_interval: Duration::from_millis(100),
        // Loopback has almost no round trip: the estimate is the minimum.
        bandwidth_hint_bytes_per_second: 1e3,
        ..test_options(1)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_count_adapts_from_the_estimate_while_the_rate_rises() {
    init_tracing();
    within(async {
        let (listener_tls, dialer_tls) = pinned_pair();
        let listener = listen(&listener_tls, test_options(1)).await;
        let (samples, observer) = recorder();
        let options = SessionOptions {
            rate_observer: Some(observer),
            ..adaptive_options(3)
        };
        let dialer = Session::connect(listener.local_addr(), &dialer_tls, options)
            .await
            .unwrap();
        assert_eq!(dialer.stats().target_bulk_connections, 1);
        let accepted = listener.accept().await.unwrap();
        // The receiver drains slowly and ever faster, so each added stream appears to help
        // until the maximum; the policy's own rules are unit-tested in `policy`.
        let receiver = tokio::spawn(async move {
            let mut total = 0usize;
            while let Some(chunk) = accepted.recv().await.unwrap() {
                total += chunk.len();
            }
            total
        });
        let chunk = random_payload(1 << 20, 6);
        let mut sent = 0usize;
        let started = tokio::time::Instant::now();
        while dialer.stats().target_bulk_connections < 2 {
            dialer.send(chunk.clone()).await.unwrap();
            sent += chunk.len();
            assert!(started.elapsed() < TEST_DEADLINE, "no stream was added");
        }
        dialer.finish().await.unwrap();
        assert_eq!(receiver.await.unwrap(), sent);
        // The stream was added on measured rates (the stats keep only the last interval's,
        // which is nothing once the data is through), and an added stream is no reconnection.
        let samples = samples.lock().unwrap();
        assert!(
            samples
                .iter()
                .any(|(_, sample)| sample.bytes_acknowledged > 0),
            "{samples:?}"
        );
        let stats = dialer.stats();
        assert_eq!(stats.reconnections, 0, "{stats:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallel_start_opens_its_connections_with_the_session() {
    init_tracing();
    within(async {
        let (listener_tls, dialer_tls) = pinned_pair();
        let listener = listen(&listener_tls, test_options(1)).await;
        // The estimate alone is one connection (loopback, a tiny hint).
        let options = SessionOptions {
            parallel_start_connections: 3,
            adapt_stream_count: false,
            ..adaptive_options(8)
        };
        let dialer = Session::connect(listener.local_addr(), &dialer_tls, options)
            .await
            .unwrap();
        assert_eq!(dialer.stats().target_bulk_connections, 3);
        let accepted = listener.accept().await.unwrap();
        let receiver = tokio::spawn(async move { receive_all(&accepted).await });
        let started = tokio::time::Instant::now();
        while dialer.stats().bulk_connections < 3 {
            assert!(started.elapsed() < TEST_DEADLINE, "{:?}", dialer.stats());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let payload = random_payload(16 << 20, 9);
        send_in_pieces(&dialer, &payload, 1 << 20).await;
        assert_eq!(
            receiver.await.unwrap(),
            (payload.len() as u64, blake3::hash(&payload))
        );
        // Without adaptation the count stays.
        assert_eq!(dialer.stats().target_bulk_connections, 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_fast_path_starts_with_several_connections() {
    init_tracing();
    within(async {
        let (listener_tls, dialer_tls) = pinned_pair();
        let listener = listen(&listener_tls, test_options(1)).await;
        // A hint so large that even loopback's round trip makes a long fast path; one
        // connection's window covers it, so only the start-up share asks for more.
        for (share, expected) in [
            (
                novacron_transport::policy::DEFAULT_STARTUP_SHARE_BYTES,
                novacron_transport::policy::STARTUP_STREAMS_MAX,
            ),
            (0, 1),
        ] {
            let options = SessionOptions {
                bandwidth_hint_bytes_per_second: 1e15,
                per_connection_window_bytes: u64::MAX,
                startup_share_bytes: share,
                adapt_stream_count: false,
                ..adaptive_options(8)
            };
            let dialer = Session::connect(listener.local_addr(), &dialer_tls, options)
                .await
                .unwrap();
            assert_eq!(dialer.stats().target_bulk_connections, expected);
            let accepted = listener.accept().await.unwrap();
            let receiver = tokio::spawn(async move { receive_all(&accepted).await });
            let started = tokio::time::Instant::now();
            while dialer.stats().bulk_connections < expected {
                assert!(started.elapsed() < TEST_DEADLINE, "{:?}", dialer.stats());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(dialer.stats().bulk_connections, expected);
            let payload = random_payload(8 << 20, 11);
            send_in_pieces(&dialer, &payload, 1 << 20).await;
            assert_eq!(
                receiver.await.unwrap(),
                (payload.len() as u64, blake3::hash(&payload))
            );
            assert_eq!(dialer.stats().target_bulk_connections, expected);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_added_as_the_rate_fell_is_closed_again_and_nothing_is_lost() {
    init_tracing();
    within(async {
        let (listener_tls, dialer_tls) = pinned_pair();
        // A small receive window, so the receiving application's pace (not the window
        // filling) sets the rate the dialer measures from the start.
        let listener_options = SessionOptions {
            bulk_receive_window_bytes: 1 << 20,
            ..test_options(1)
        };
        let listener = listen(&listener_tls, listener_options).await;
        let options = SessionOptions {
            bulk_send_window_bytes: 1 << 20,
            ..adaptive_options(2)
        };
        let dialer = Arc::new(
            Session::connect(listener.local_addr(), &dialer_tls, options)
                .await
                .unwrap(),
        );
        let accepted = listener.accept().await.unwrap();
        // The receiver sets the rate: at most 10 MB/s until the second connection opens, then
        // 70 % of the rate the dialer measured (bytes acknowledged) over the 0.3 s before, so
        // the connection added seems to have cost 30 % (more than the 5 % that closes it).
        // Relative, because a loaded machine may carry less than 10 MB/s (CI once carried too
        // little for a fixed 40 → 27 MB/s to look like a fall); paced without catching up, so
        // no burst follows a stall. The policy may probe again later (its rate before the
        // addition, a mean of three intervals, can be 40 % above the new pace): the loop
        // below has seen the close by then, a decision of several intervals later.
        let probe = dialer.clone();
        let receiver = tokio::spawn(async move {
            const FAST: f64 = 10e6;
            const RECENT: Duration = Duration::from_millis(300);
            let (mut total, mut hasher) = (0usize, blake3::Hasher::new());
            let mut rate = FAST;
            let mut slowed = false;
            let mut recent = std::collections::VecDeque::new();
            let mut due = tokio::time::Instant::now();
            while let Some(chunk) = accepted.recv().await.unwrap() {
                let now = tokio::time::Instant::now();
                total += chunk.len();
                hasher.update(&chunk);
                let stats = probe.stats();
                recent.push_back((now, stats.bulk_bytes_acknowledged));
                while recent.len() > 2 && now - recent[1].0 >= RECENT {
                    recent.pop_front();
                }
                if !slowed && stats.target_bulk_connections >= 2 {
                    slowed = true;
                    let (since, base) = recent[0];
                    let span = (now - since).as_secs_f64();
                    let measured = if span > 0.0 {
                        (stats.bulk_bytes_acknowledged - base) as f64 / span
                    } else {
                        FAST
                    };
                    rate = 0.7 * measured.clamp(FAST / 10.0, FAST);
                }
                due = due.max(now) + Duration::from_secs_f64(chunk.len() as f64 / rate);
                tokio::time::sleep_until(due).await;
            }
            (total, hasher.finalize())
        });
        let chunk = random_payload(256 << 10, 7);
        let (mut sent, mut hasher) = (0usize, blake3::Hasher::new());
        let started = tokio::time::Instant::now();
        let mut added = false;
        loop {
            let stats = dialer.stats();
            added |= stats.target_bulk_connections >= 2;
            if added && stats.target_bulk_connections == 1 && stats.bulk_connections == 1 {
                break;
            }
            assert!(
                started.elapsed() < TEST_DEADLINE,
                "no connection added and closed again: {stats:?}"
            );
            dialer.send(chunk.clone()).await.unwrap();
            sent += chunk.len();
            hasher.update(&chunk);
        }
        // A few more after the close, then the end: every byte arrives once, in order.
        for _ in 0..8 {
            dialer.send(chunk.clone()).await.unwrap();
            sent += chunk.len();
            hasher.update(&chunk);
        }
        dialer.finish().await.unwrap();
        let (received, digest) = receiver.await.unwrap();
        assert_eq!(received, sent);
        assert_eq!(digest, hasher.finalize());
        let stats = dialer.stats();
        assert_eq!(
            stats.bulk_bytes_retransmitted, 0,
            "closed once its frames were acknowledged, none resent: {stats:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_samples_account_for_every_byte_and_flag_a_backlogged_sender() {
    use novacron_transport::RateSample;
    use std::sync::Arc;
    init_tracing();
    within(async {
        let (dialer_samples, dialer_observer) = recorder();
        let (listener_samples, listener_observer) = recorder();
        let (listener_tls, dialer_tls) = pinned_pair();
        let mut options = test_options(2);
        options.bulk_send_window_bytes = 2 << 20;
        options.bulk_receive_window_bytes = 2 << 20;
        options.measurement_interval = Duration::from_millis(100);
        let listener = listen(
            &listener_tls,
            novacron_transport::SessionOptions {
                rate_observer: Some(listener_observer),
                ..options.clone()
            },
        )
        .await;
        let dialer = Arc::new(
            Session::connect(
                listener.local_addr(),
                &dialer_tls,
                novacron_transport::SessionOptions {
                    rate_observer: Some(dialer_observer),
                    ..options.clone()
                },
            )
            .await
            .unwrap(),
        );
        let accepted = listener.accept().await.unwrap();
        // The receiver does not read until the sender has been held back for a whole sample.
        let payload = random_payload(16 << 20, 9);
        let sending = Arc::clone(&dialer);
        let sent_payload = payload.clone();
        let sender = tokio::spawn(async move {
            send_in_pieces(&sending, &sent_payload, 256 << 10).await;
        });
        wait_until("a backlogged sample", TEST_DEADLINE, || {
            dialer_samples
                .lock()
                .unwrap()
                .iter()
                .any(|(_, sample)| sample.sender_backlogged)
        })
        .await;
        let (total, hash) = receive_all(&accepted).await;
        sender.await.unwrap();
        assert_eq!(
            (total, hash),
            (payload.len() as u64, blake3::hash(&payload))
        );
        let sum = |samples: &Samples, pick: fn(&RateSample) -> u64| {
            samples
                .lock()
                .unwrap()
                .iter()
                .map(|(_, sample)| pick(sample))
                .sum::<u64>()
        };
        wait_until("every byte in the samples", TEST_DEADLINE, || {
            sum(&dialer_samples, |sample| sample.bytes_acknowledged) == total
                && sum(&listener_samples, |sample| sample.bytes_received) == total
        })
        .await;
        assert_eq!(sum(&dialer_samples, |sample| sample.bytes_received), 0);
        // Each side's samples name the other end, so one observer can keep a model per link.
        let names_only = |samples: &Samples, peer| {
            samples
                .lock()
                .unwrap()
                .iter()
                .all(|(_, sample)| sample.peer_fingerprint == peer)
        };
        assert!(names_only(&dialer_samples, dialer.peer_fingerprint()));
        assert!(names_only(&listener_samples, accepted.peer_fingerprint()));
        assert_ne!(dialer.peer_fingerprint(), accepted.peer_fingerprint());
        assert!(
            dialer_samples
                .lock()
                .unwrap()
                .iter()
                .all(|(_, sample)| sample.interval >= Duration::from_millis(100))
        );
        drop(accepted);
    })
    .await;
}

/// The pacing limit holds the session's connections together below it (the kernel paces each
/// at its share), whatever the path would carry: loopback carries gigabytes per second, and a
/// limit of 16 MB/s over two connections makes 16 MiB take about a second (no pacing check
/// comes meanwhile to raise it). Only a lower bound on the time is checked; a slow
/// machine can only make it longer. Lifting the limit frees the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pacing_limit_holds_the_connections_below_it_until_lifted() {
    init_tracing();
    within(async {
        let (listener_tls, dialer_tls) = pinned_pair();
        let listener = listen(&listener_tls, test_options(2)).await;
        const LIMIT: u64 = 16_000_000;
        let options = SessionOptions {
            bulk_pacing_limit_bytes_per_second: Some(LIMIT),
            pacing_check_interval: Duration::from_secs(30),
            ..test_options(2)
        };
        let dialer = Session::connect(listener.local_addr(), &dialer_tls, options)
            .await
            .unwrap();
        let accepted = listener.accept().await.unwrap();
        assert_eq!(
            dialer.stats().bulk_pacing_limit_bytes_per_second,
            Some(LIMIT)
        );
        let receiver = tokio::spawn(async move {
            let result = receive_all(&accepted).await;
            (result, accepted)
        });
        let capped = random_payload(16 << 20, 7);
        let started = std::time::Instant::now();
        for piece in capped.chunks(1 << 20) {
            dialer.send(capped.slice_ref(piece)).await.unwrap();
        }
        // Everything acknowledged: it all crossed the paced connections.
        dialer.flush().await.unwrap();
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(700),
            "16 MiB at a 16 MB/s limit crossed in {elapsed:?}"
        );
        assert_eq!(
            dialer.stats().bulk_pacing_limit_bytes_per_second,
            Some(LIMIT)
        );
        dialer.set_bulk_pacing_limit(None);
        assert_eq!(dialer.stats().bulk_pacing_limit_bytes_per_second, None);
        let free = random_payload(64 << 20, 8);
        send_in_pieces(&dialer, &free, 1 << 20).await;
        let ((total, hash), _accepted) = receiver.await.unwrap();
        assert_eq!(total, (capped.len() + free.len()) as u64);
        let mut expected = blake3::Hasher::new();
        expected.update(&capped);
        expected.update(&free);
        assert_eq!(hash, expected.finalize());
        dialer.close().await.unwrap();
    })
    .await;
}

/// A limit the path could beat (a forecast too low) is raised once a measurement shows the
/// session filling it: over loopback, every interval does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pacing_limit_is_raised() {
    init_tracing();
    within(async {
        let (listener_tls, dialer_tls) = pinned_pair();
        let listener = listen(&listener_tls, test_options(2)).await;
        const LIMIT: u64 = 16_000_000;
        let options = SessionOptions {
            bulk_pacing_limit_bytes_per_second: Some(LIMIT),
            ..test_options(2)
        };
        let dialer = Session::connect(listener.local_addr(), &dialer_tls, options)
            .await
            .unwrap();
        let accepted = listener.accept().await.unwrap();
        // The accepted session lives until the test ends: the dialer's flush waits for its
        // acknowledgements.
        let receiver = tokio::spawn(async move {
            let result = receive_all(&accepted).await;
            (result, accepted)
        });
        let payload = random_payload(32 << 20, 9);
        let sender = async {
            send_in_pieces(&dialer, &payload, 1 << 20).await;
            dialer.flush().await.unwrap();
        };
        let raised = async {
            wait_until("the pacing limit to be raised", TEST_DEADLINE, || {
                dialer
                    .stats()
                    .bulk_pacing_limit_bytes_per_second
                    .is_some_and(|limit| limit > LIMIT)
            })
            .await
        };
        tokio::join!(sender, raised);
        let ((total, _), _accepted) = receiver.await.unwrap();
        assert_eq!(total, payload.len() as u64);
        dialer.close().await.unwrap();
    })
    .await;
}

/// A listener told to trust another set of peers while a session runs keeps that session: a
/// peer still trusted resumes it after its connections are cut, and nothing is lost; a peer no
/// longer trusted cannot open a session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_changes_whom_it_trusts_without_forgetting_its_sessions() {
    init_tracing();
    within(async {
        let (listener_tls, dialer_tls) = pinned_pair();
        let listener = listen(&listener_tls, test_options(2)).await;
        let proxy = CuttingProxy::start(listener.local_addr()).await;
        let payload = random_payload(16 << 20, 9);
        let expected = blake3::hash(&payload);
        let mut options = test_options(2);
        options.bulk_send_window_bytes = 2 << 20;
        let dialer = Session::connect(proxy.address, &dialer_tls, options.clone())
            .await
            .unwrap();
        let accepted = Arc::new(listener.accept().await.unwrap());
        let receiver_session = accepted.clone();
        let receiver = tokio::spawn(async move { receive_all(&receiver_session).await });
        let sender = tokio::spawn(async move {
            send_in_pieces(&dialer, &payload, 1 << 20).await;
            dialer.flush().await.unwrap();
            dialer
        });
        wait_until("receiver progress", TEST_DEADLINE, || {
            accepted.stats().bulk_bytes_received >= 4 << 20
        })
        .await;
        // A host joins: the listener trusts it too, in place.
        let newcomer = novacron_transport::HostIdentity::generate_self_signed("newcomer").unwrap();
        let novacron_transport::PeerTrust::PinnedFingerprints(trusted) = &listener_tls.trust else {
            unreachable!("pinned pair")
        };
        let mut widened = listener_tls.clone();
        widened.trust = novacron_transport::PeerTrust::PinnedFingerprints(
            trusted
                .iter()
                .copied()
                .chain([newcomer.fingerprint()])
                .collect(),
        );
        listener.set_tls(&widened).unwrap();
        proxy.cut_all();
        let (total, hash) = receiver.await.unwrap();
        assert_eq!(total, 16 << 20);
        assert_eq!(hash, expected, "data lost across the trust change");
        let dialer = sender.await.unwrap();
        assert!(dialer.stats().reconnections >= 1, "{:?}", dialer.stats());

        // The dialer forgotten: a new session of its is refused.
        let mut narrowed = listener_tls.clone();
        narrowed.trust =
            novacron_transport::PeerTrust::PinnedFingerprints(vec![newcomer.fingerprint()]);
        listener.set_tls(&narrowed).unwrap();
        refused_at_open(listener.local_addr(), &dialer_tls, options).await;
    })
    .await;
}

/// A session opened before its data is ready warms its bulk connections up with padding: the
/// padding flows while nothing is queued, the peer drops it, it stops at the first frame (a
/// frame or two per connection were on their way then), and the stream carries exactly what
/// was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_up_pads_the_connections_until_data_comes_and_delivers_only_the_data() {
    init_tracing();
    within(async {
        let (listener_tls, dialer_tls) = pinned_pair();
        let listener = listen(&listener_tls, test_options(2)).await;
        let dialer = Session::connect(listener.local_addr(), &dialer_tls, test_options(2))
            .await
            .unwrap();
        let accepted = Arc::new(listener.accept().await.unwrap());
        let payload = random_payload(8 << 20, 21);
        dialer.warm_up(Duration::from_secs(600));
        let peer = accepted.clone();
        wait_until("padding to cross", TEST_DEADLINE, || {
            dialer.stats().bulk_padding_bytes_sent >= 4 << 20
                && peer.stats().bulk_padding_bytes_received >= 1 << 20
        })
        .await;
        let receiver = tokio::spawn(async move { receive_all(&accepted).await });
        let padded_before_data = dialer.stats().bulk_padding_bytes_sent;
        send_in_pieces(&dialer, &payload, 1 << 20).await;
        assert_eq!(
            receiver.await.unwrap(),
            (payload.len() as u64, blake3::hash(&payload))
        );
        let stats = dialer.stats();
        assert!(
            // Per connection: the frame being written at the look, and one begun before
            // the first frame was queued.
            stats.bulk_padding_bytes_sent - padded_before_data <= 2 * 2 * (64 << 10),
            "padding went on after the data: {stats:?}"
        );
        assert_eq!(stats.bulk_bytes_sent, payload.len() as u64);
        dialer.close().await.unwrap();
    })
    .await;
}

/// A session's rate counts from its first bulk byte: the time it sat open before (a
/// migration's session opens while the destination prepares) is not the path's. The first
/// sample comes a whole interval after the first byte, not an interval after the opening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_rate_sample_starts_at_the_first_byte() {
    init_tracing();
    within(async {
        const INTERVAL: Duration = Duration::from_millis(800);
        let (samples, observer) = recorder();
        let (listener_tls, dialer_tls) = pinned_pair();
        let listener = listen(&listener_tls, test_options(1)).await;
        let options = SessionOptions {
            measurement_interval: INTERVAL,
            rate_observer: Some(observer),
            ..test_options(1)
        };
        let dialer = Session::connect(listener.local_addr(), &dialer_tls, options)
            .await
            .unwrap();
        let accepted = listener.accept().await.unwrap();
        // Open and idle for most of an interval.
        tokio::time::sleep(INTERVAL / 2).await;
        assert!(samples.lock().unwrap().is_empty(), "no sample while idle");
        // The accepted session lives on until the end: dropped, it would fail the dialer's
        // session before its samples count every byte (a failed session samples no more).
        let receiver = tokio::spawn(async move {
            let received = receive_all(&accepted).await;
            (received, accepted)
        });
        let first_byte = std::time::Instant::now();
        let payload = random_payload(1 << 20, 5);
        dialer.send(payload.clone()).await.unwrap();
        dialer.finish().await.unwrap();
        let ((received, _), _accepted) = receiver.await.unwrap();
        assert_eq!(received, payload.len() as u64);
        wait_until("a rate sample", TEST_DEADLINE, || {
            !samples.lock().unwrap().is_empty()
        })
        .await;
        let (at, sample) = samples.lock().unwrap()[0];
        // Lower bounds only: a slow machine can only make them later and longer. The session
        // looks every 100 ms, so the interval may start up to that before the first byte;
        // counted from the opening, the sample would come INTERVAL / 2 after it.
        assert!(
            at.duration_since(first_byte) >= INTERVAL * 3 / 4,
            "the first sample came {:?} after the first byte",
            at.duration_since(first_byte)
        );
        assert!(sample.interval >= INTERVAL, "{sample:?}");
        wait_until("every byte in the samples", TEST_DEADLINE, || {
            samples
                .lock()
                .unwrap()
                .iter()
                .map(|(_, sample)| sample.bytes_acknowledged)
                .sum::<u64>()
                == payload.len() as u64
        })
        .await;
        dialer.close().await.unwrap();
    })
    .await;
}

/// Rate samples with the moment each came.
type Samples = Arc<std::sync::Mutex<Vec<(std::time::Instant, novacron_transport::RateSample)>>>;

/// An observer that keeps every rate sample with the moment it came.
fn recorder() -> (Samples, novacron_transport::RateObserver) {
    let samples: Samples = Arc::default();
    let sink = Arc::clone(&samples);
    let observer = novacron_transport::RateObserver::new(move |sample| {
        sink.lock()
            .unwrap()
            .push((std::time::Instant::now(), sample))
    });
    (samples, observer)
}

/// The dialer's frames follow its hello at once (protocol version 4): a listener that has not
/// answered yet already receives them; its refusal, when it comes, fails the session with the
/// listener's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_follow_the_hello_before_its_reply_and_a_late_refusal_fails_the_session() {
    use novacron_transport::frame::{
        ConnectionPurpose, FRAME_HEADER_LEN, FRAME_TAG_LEN, FrameHeader, FrameKind, HELLO_LEN,
        Hello, HelloStatus,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    init_tracing();
    within(async {
        let (listener_tls, dialer_tls) = pinned_pair();
        // A listener by hand: TLS, then the hello, and no reply until told.
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = tcp.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(listener_tls.server_config().unwrap());
        let (frames_tx, mut frames) = tokio::sync::mpsc::unbounded_channel();
        let (refuse_tx, refuse) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            loop {
                let (socket, _) = tcp.accept().await.unwrap();
                let acceptor = acceptor.clone();
                let frames_tx = frames_tx.clone();
                let mut refuse = refuse.clone();
                tokio::spawn(async move {
                    let mut stream = acceptor.accept(socket).await.unwrap();
                    let mut hello = [0u8; HELLO_LEN];
                    stream.read_exact(&mut hello).await.unwrap();
                    let hello = Hello::decode(&hello).unwrap();
                    if hello.purpose() == Some(ConnectionPurpose::OpenSession) {
                        refuse.wait_for(|refuse| *refuse).await.unwrap();
                        let reply = Hello {
                            code: HelloStatus::UnsupportedVersion as u8,
                            bulk_receive_window: 0,
                            control_receive_window: 0,
                            ..hello
                        };
                        stream.write_all(&reply.encode()).await.unwrap();
                        stream.flush().await.unwrap();
                        // Held open: the refusal alone must end the session.
                        std::future::pending::<()>().await;
                    }
                    let mut header = [0u8; FRAME_HEADER_LEN];
                    stream.read_exact(&mut header).await.unwrap();
                    let header = FrameHeader::decode(&header).unwrap();
                    let mut payload = vec![0u8; header.payload_len as usize + FRAME_TAG_LEN];
                    stream.read_exact(&mut payload).await.unwrap();
                    payload.truncate(header.payload_len as usize);
                    let _ = frames_tx.send((hello.purpose(), header.kind, payload));
                    std::future::pending::<()>().await;
                });
            }
        });
        // `connect` returns without the reply (it waited for it before version 4).
        let dialer = Session::connect(address, &dialer_tls, test_options(1))
            .await
            .unwrap();
        dialer
            .send(Bytes::from_static(b"sent before the reply"))
            .await
            .unwrap();
        let (purpose, kind, payload) = frames.recv().await.unwrap();
        assert_eq!(purpose, Some(ConnectionPurpose::Bulk));
        assert_eq!(kind, FrameKind::Data);
        assert_eq!(payload, b"sent before the reply");
        refuse_tx.send_replace(true);
        let error = dialer.flush().await.unwrap_err().to_string();
        assert!(
            error.contains("unsupported protocol version"),
            "the listener's reason reaches the dialer: {error}"
        );
        let error = dialer.opened().await.unwrap_err();
        assert!(
            matches!(
                &error,
                novacron_transport::TransportError::Refused { reason, .. }
                    if reason.contains("unsupported protocol version")
            ),
            "{error}"
        );
    })
    .await;
}
