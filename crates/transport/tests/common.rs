//! Helpers shared by the transport integration tests: identities, listeners, a TCP proxy that
//! cuts every connection on demand, and polling with a deadline.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use novacron_transport::{HostIdentity, Listener, PeerTrust, SessionOptions, TlsSettings};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

pub const TEST_DEADLINE: Duration = Duration::from_secs(60);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Two hosts that pin each other's self-signed certificate.
pub fn pinned_pair() -> (TlsSettings, TlsSettings) {
    let listener_identity = HostIdentity::generate_self_signed("listener").unwrap();
    let dialer_identity = HostIdentity::generate_self_signed("dialer").unwrap();
    let listener = TlsSettings {
        trust: PeerTrust::PinnedFingerprints(vec![dialer_identity.fingerprint()]),
        identity: listener_identity.clone(),
    };
    let dialer = TlsSettings {
        trust: PeerTrust::PinnedFingerprints(vec![listener_identity.fingerprint()]),
        identity: dialer_identity,
    };
    (listener, dialer)
}

pub fn test_options(bulk_connections: u32) -> SessionOptions {
    SessionOptions {
        initial_bulk_connections: Some(bulk_connections),
        adapt_stream_count: false,
        resume_timeout: Duration::from_secs(20),
        handshake_timeout: Duration::from_secs(10),
        measurement_interval: Duration::from_millis(200),
        ..SessionOptions::default()
    }
}

pub async fn listen(tls: &TlsSettings, options: SessionOptions) -> Listener {
    Listener::bind(SocketAddr::from(([127, 0, 0, 1], 0)), tls, options)
        .await
        .unwrap()
}

pub fn random_payload(len: usize, seed: u64) -> Bytes {
    use rand::{RngCore, SeedableRng};
    let mut generator = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    generator.fill_bytes(&mut data);
    Bytes::from(data)
}

/// Polls `condition` until it holds or the deadline passes.
pub async fn wait_until(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) {
    let started = tokio::time::Instant::now();
    while !condition() {
        assert!(started.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_DEADLINE, future)
        .await
        .expect("test exceeded its deadline")
}

/// A TCP proxy between the dialer and the listener that can drop every connection at once.
pub struct CuttingProxy {
    pub address: SocketAddr,
    cut: broadcast::Sender<()>,
    pub connections: Arc<AtomicU64>,
    /// While set, new connections are closed at once (the path is down).
    blocked: Arc<std::sync::atomic::AtomicBool>,
}

impl CuttingProxy {
    pub async fn start(target: SocketAddr) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (cut, _) = broadcast::channel(16);
        let connections = Arc::new(AtomicU64::new(0));
        let blocked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let proxy = CuttingProxy {
            address,
            cut: cut.clone(),
            connections: connections.clone(),
            blocked: blocked.clone(),
        };
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if blocked.load(Ordering::SeqCst) {
                    continue;
                }
                let mut cut_signal = cut.subscribe();
                connections.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_signal.recv() => {}
                    }
                });
            }
        });
        proxy
    }

    /// Drops every connection currently proxied (both directions, no shutdown).
    pub fn cut_all(&self) {
        let _ = self.cut.send(());
    }

    /// Takes the path down (every connection dropped, new ones closed at once) or back up.
    pub fn set_down(&self, down: bool) {
        self.blocked.store(down, Ordering::SeqCst);
        if down {
            self.cut_all();
        }
    }
}
