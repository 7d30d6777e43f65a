//! Connections parked by a finished session carry the next session to the same peer.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use novacron_transport::{
    ConnectionPool, HostIdentity, PeerTrust, Session, SessionOptions, TlsSettings,
};

fn pooled_options(pool: &ConnectionPool) -> SessionOptions {
    SessionOptions {
        connection_pool: Some(pool.clone()),
        ..test_options(2)
    }
}

/// Sends `payload` from the dialer, and `reply` back from the listener, and checks both.
async fn exchange(dialer: &Session, accepted: &Session, payload: &Bytes, reply: &Bytes) {
    let receive = async {
        let mut received = Vec::new();
        while let Some(chunk) = accepted.recv().await.unwrap() {
            received.extend_from_slice(&chunk);
        }
        received
    };
    let send = async {
        dialer.send(payload.clone()).await.unwrap();
        dialer.finish().await.unwrap();
    };
    let ((), received) = tokio::join!(send, receive);
    assert!(received == payload[..], "the dialer's bytes arrived intact");
    let answer = accepted.control();
    let request = async { dialer.control().request(reply.clone()).await.unwrap() };
    let respond = async {
        match answer.next_incoming().await.unwrap() {
            Some(novacron_transport::ControlIncoming::Request(request)) => {
                let body = request.body.clone();
                request.respond(body).await.unwrap();
            }
            other => panic!("expected a request, got {other:?}"),
        }
    };
    let (echoed, ()) = tokio::join!(request, respond);
    assert_eq!(echoed, *reply);
}

#[tokio::test]
async fn a_finished_sessions_connections_carry_the_next_session() {
    init_tracing();
    within(async {
        let (listener_tls, dialer_tls) = pinned_pair();
        let listener = listen(&listener_tls, test_options(2)).await;
        let address = listener.local_addr();
        let pool = ConnectionPool::default();

        // First session: new connections (one control, two bulk); the dialer closes first.
        let dialer = Session::connect(address, &dialer_tls, pooled_options(&pool))
            .await
            .unwrap();
        let accepted = listener.accept().await.unwrap();
        exchange(
            &dialer,
            &accepted,
            &random_payload(3 << 20, 1),
            &Bytes::from_static(b"one"),
        )
        .await;
        dialer.close().await.unwrap();
        wait_until("three parked connections", Duration::from_secs(10), || {
            pool.parked_to(address) == 3
        })
        .await;
        drop(accepted);
        wait_until(
            "the listener's ends parked",
            Duration::from_secs(10),
            || listener.stats().connections_parked == 3,
        )
        .await;
        let accepted_before = listener.stats().connections_accepted;
        assert_eq!(accepted_before, 3);

        // Second session: on the parked connections, without a TCP connection of its own;
        // this time the listener's end goes first.
        let dialer = Session::connect(address, &dialer_tls, pooled_options(&pool))
            .await
            .unwrap();
        dialer.opened().await.unwrap();
        let accepted = listener.accept().await.unwrap();
        assert_eq!(pool.parked_to(address), 0, "the session took them all");
        exchange(
            &dialer,
            &accepted,
            &random_payload(2 << 20, 2),
            &Bytes::from_static(b"two"),
        )
        .await;
        let stats = listener.stats();
        assert_eq!(
            stats.connections_accepted, accepted_before,
            "no new TCP connection"
        );
        assert_eq!(stats.connections_reused, 3);
        assert_eq!(stats.sessions_opened, 2);
        assert_eq!(dialer.stats().reconnections, 0);
        drop(accepted);
        wait_until("parked again", Duration::from_secs(10), || {
            pool.parked_to(address) == 3
        })
        .await;
        drop(dialer);
        assert_eq!(listener.stats().connections_parked, 6);

        // Third: the pool again, and a session without one dials its own.
        let dialer = Session::connect(address, &dialer_tls, pooled_options(&pool))
            .await
            .unwrap();
        let accepted = listener.accept().await.unwrap();
        exchange(
            &dialer,
            &accepted,
            &random_payload(1 << 20, 3),
            &Bytes::from_static(b"three"),
        )
        .await;
        let unpooled = Session::connect(address, &dialer_tls, test_options(1))
            .await
            .unwrap();
        let unpooled_accepted = listener.accept().await.unwrap();
        exchange(
            &unpooled,
            &unpooled_accepted,
            &random_payload(1 << 20, 4),
            &Bytes::from_static(b"four"),
        )
        .await;
        let stats = listener.stats();
        assert_eq!(stats.connections_reused, 6);
        assert_eq!(stats.connections_accepted, accepted_before + 2);
        unpooled.close().await.unwrap();
        dialer.close().await.unwrap();
    })
    .await;
}

/// A listener, a pool, and a first session between them that exchanged a little and parked
/// its three connections (one control, two bulk) at both ends.
async fn parked_first_session(
    listener_tls: &TlsSettings,
    dialer_tls: &TlsSettings,
    pool: &ConnectionPool,
) -> novacron_transport::Listener {
    let listener = listen(listener_tls, test_options(1)).await;
    let address = listener.local_addr();
    let dialer = Session::connect(address, dialer_tls, pooled_options(pool))
        .await
        .unwrap();
    let accepted = listener.accept().await.unwrap();
    exchange(
        &dialer,
        &accepted,
        &random_payload(1 << 20, 5),
        &Bytes::from_static(b"a"),
    )
    .await;
    dialer.close().await.unwrap();
    drop(accepted);
    wait_until("parked", Duration::from_secs(10), || {
        pool.parked_to(address) == 3 && listener.stats().connections_parked == 3
    })
    .await;
    listener
}

#[tokio::test]
async fn a_parked_connection_is_not_reused_once_the_listener_stops_trusting_the_dialer() {
    init_tracing();
    within(async {
        let (listener_tls, dialer_tls) = pinned_pair();
        let pool = ConnectionPool::default();
        let listener = parked_first_session(&listener_tls, &dialer_tls, &pool).await;
        let address = listener.local_addr();

        // The listener now trusts another host only.
        let stranger = HostIdentity::generate_self_signed("stranger").unwrap();
        listener
            .set_tls(&TlsSettings {
                identity: listener_tls.identity.clone(),
                trust: PeerTrust::PinnedFingerprints(vec![stranger.fingerprint()]),
            })
            .unwrap();
        let refused_before = listener.stats().connections_refused;
        let error = match Session::connect(address, &dialer_tls, pooled_options(&pool)).await {
            Ok(session) => session.opened().await.unwrap_err(),
            Err(error) => error,
        };
        let mut chain = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            chain.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        assert!(
            chain.contains("CertificateUnknown") || chain.contains("alert"),
            "a new handshake, refused: {chain}"
        );
        let stats = listener.stats();
        assert_eq!(
            stats.connections_reused, 0,
            "no parked connection carried a hello"
        );
        assert_eq!(stats.sessions_opened, 1);
        assert!(stats.connections_refused > refused_before);
    })
    .await;
}

#[tokio::test]
async fn a_session_opens_when_its_parked_connections_died_meanwhile() {
    init_tracing();
    within(async {
        let (listener_tls, dialer_tls) = pinned_pair();
        let pool = ConnectionPool::default();
        let listener = parked_first_session(&listener_tls, &dialer_tls, &pool).await;
        let address = listener.local_addr();
        // The listener restarts on the same port: its parked ends are closed, which the pool
        // sees.
        drop(listener);
        wait_until(
            "the closed connections dropped",
            Duration::from_secs(10),
            || pool.parked_to(address) == 0,
        )
        .await;
        let listener = loop {
            match novacron_transport::Listener::bind(address, &listener_tls, test_options(1)).await
            {
                Ok(listener) => break listener,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let dialer = Session::connect(address, &dialer_tls, pooled_options(&pool))
            .await
            .unwrap();
        dialer.opened().await.unwrap();
        let accepted = listener.accept().await.unwrap();
        exchange(
            &dialer,
            &accepted,
            &random_payload(1 << 20, 7),
            &Bytes::from_static(b"c"),
        )
        .await;
        assert_eq!(listener.stats().connections_reused, 0);
        dialer.close().await.unwrap();
    })
    .await;
}
