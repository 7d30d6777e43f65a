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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};

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

/// A TCP proxy between the dialer and the listener that can drop every connection at once, or
/// stall one (it stops forwarding the dialer's bytes, without closing anything).
pub struct CuttingProxy {
    pub address: SocketAddr,
    cut: broadcast::Sender<()>,
    pub connections: Arc<AtomicU64>,
    /// While set, new connections are closed at once (the path is down).
    blocked: Arc<std::sync::atomic::AtomicBool>,
    /// The connection (by accept order) whose dialer-to-listener direction is stalled.
    stalled: watch::Sender<Option<usize>>,
    /// Bytes forwarded from the dialer, per connection in accept order.
    forwarded: Arc<std::sync::Mutex<Vec<Arc<AtomicU64>>>>,
}

impl CuttingProxy {
    pub async fn start(target: SocketAddr) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (cut, _) = broadcast::channel(16);
        let connections = Arc::new(AtomicU64::new(0));
        let blocked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (stalled, _) = watch::channel(None);
        let forwarded = Arc::new(std::sync::Mutex::new(Vec::new()));
        let proxy = CuttingProxy {
            address,
            cut: cut.clone(),
            connections: connections.clone(),
            blocked: blocked.clone(),
            stalled: stalled.clone(),
            forwarded: forwarded.clone(),
        };
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if blocked.load(Ordering::SeqCst) {
                    continue;
                }
                let mut cut_signal = cut.subscribe();
                connections.fetch_add(1, Ordering::Relaxed);
                let counter = Arc::new(AtomicU64::new(0));
                let number = {
                    let mut forwarded = forwarded.lock().unwrap();
                    forwarded.push(counter.clone());
                    forwarded.len() - 1
                };
                let mut stall = stalled.subscribe();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut from_dialer, mut to_dialer) = inbound.into_split();
                    let (mut from_listener, mut to_listener) = outbound.into_split();
                    let forward = async {
                        let mut buffer = vec![0u8; 64 << 10];
                        loop {
                            // A dropped proxy stalls nothing.
                            let _ = stall.wait_for(|stalled| *stalled != Some(number)).await;
                            let read = from_dialer.read(&mut buffer).await?;
                            if read == 0 {
                                break;
                            }
                            to_listener.write_all(&buffer[..read]).await?;
                            counter.fetch_add(read as u64, Ordering::Relaxed);
                        }
                        to_listener.shutdown().await
                    };
                    let backward = async {
                        tokio::io::copy(&mut from_listener, &mut to_dialer).await?;
                        to_dialer.shutdown().await
                    };
                    // Both directions to their end, or either one's error (a reset) ends both.
                    tokio::select! {
                        _ = async { tokio::try_join!(forward, backward) } => {}
                        _ = cut_signal.recv() => {}
                    }
                });
            }
        });
        proxy
    }

    /// Stalls the connection that has forwarded the most from the dialer so far (a bulk one
    /// once data flows); returns its number for [`Self::forwarded_by`].
    pub fn stall_busiest(&self) -> usize {
        let busiest = self
            .forwarded
            .lock()
            .unwrap()
            .iter()
            .enumerate()
            .max_by_key(|(_, counter)| counter.load(Ordering::Relaxed))
            .map(|(number, _)| number)
            .expect("a proxied connection");
        self.stalled.send_replace(Some(busiest));
        busiest
    }

    /// Bytes connection `number` forwarded from the dialer.
    pub fn forwarded_by(&self, number: usize) -> u64 {
        self.forwarded.lock().unwrap()[number].load(Ordering::Relaxed)
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

/// What a dialer sees when the listener refuses to open its session: the error of `connect`,
/// or of [`novacron_transport::Session::opened`] after it (TLS 1.3 completes the dialer's side
/// of the handshake before the listener checks the dialer's certificate, and `connect` does not
/// wait for the hello's reply).
pub async fn refused_at_open(
    address: SocketAddr,
    tls: &TlsSettings,
    options: SessionOptions,
) -> novacron_transport::TransportError {
    match novacron_transport::Session::connect(address, tls, options).await {
        Ok(session) => {
            // Frames behind the hello, as a sender's would be: the listener's refusal must
            // still reach the dialer (closing a connection with unread bytes resets it).
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                session.send(random_payload(1 << 20, 1)),
            )
            .await;
            session
                .opened()
                .await
                .expect_err("the listener opened the session")
        }
        Err(error) => error,
    }
}
