//! Connections kept after their session ends, for the next session to the same peer.
//!
//! A TCP connection that has carried a transfer knows its path: its congestion control (BBR)
//! keeps its bandwidth estimate and window while idle, where a new connection starts from ten
//! packets and needs a dozen round trips, longer at a lossy link, to fill it. On the emulated
//! 1 Gbit/s, 50 ms, 0.5 % loss link of the benchmarks, 150 MB over two kept connections took
//! 1.34-1.38 s against 2.04-2.25 s over two new ones. So when a session shuts down, its
//! connections are parked (see `frame`: a park frame each way) instead of closed, and the
//! dialer keeps them here, authenticated, for its next session to the same address with the
//! same identity and trust: that session sends its hello on them, without a TCP or TLS
//! handshake, and its bytes leave at the rate the last one reached.
//!
//! The listener keeps its end of a parked connection waiting for a hello for
//! [`LISTENER_PARKED_IDLE`] and closes it if whom it trusts changed meanwhile; a dialer uses a
//! parked connection for at most [`MAX_POOL_IDLE`] (less), and checks that the peer has not
//! closed it before sending a hello (keepalive, set on every connection, finds a dead peer
//! meanwhile). A parked connection that died unseen costs the session a new connection, as any
//! lost one. BBR's estimate does not age while idle: after a long pause it paces at the rate
//! the path had, and corrects within its next probing cycles if the path changed.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio_rustls::TlsStream;

use crate::identity::Fingerprint;
use crate::tls::{PeerTrust, TlsSettings};

/// How long the listener's end of a parked connection waits for the dialer's next hello.
pub const LISTENER_PARKED_IDLE: Duration = Duration::from_secs(720);
/// The longest a dialer keeps a parked connection: below [`LISTENER_PARKED_IDLE`], so the
/// listener's end is still waiting when a hello comes.
pub const MAX_POOL_IDLE: Duration = Duration::from_secs(600);
/// Parked connections kept per peer at most (a session uses up to its bulk maximum plus one).
pub const MAX_PARKED_PER_PEER: usize = 33;

/// Where a dialer's parked connections wait for its next session to the same peer. Cheap to
/// clone (shared); give the same pool to every session that should reuse connections, in
/// [`crate::SessionOptions::connection_pool`].
#[derive(Clone)]
pub struct ConnectionPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    idle_limit: Duration,
    parked: Mutex<HashMap<PoolKey, Vec<Parked>>>,
}

/// A connection that carried a session and waits for the next.
pub(crate) struct Parked {
    pub(crate) stream: TlsStream<TcpStream>,
    /// The round trip its session last knew.
    pub(crate) round_trip: Duration,
    parked_at: Instant,
}

/// Which sessions may use a parked connection: those to the same address, authenticating as
/// the same identity under the same trust (a connection authenticated under trust since
/// withdrawn is never reused).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(crate) struct PoolKey {
    address: SocketAddr,
    server_name: String,
    identity: Fingerprint,
    trust: Vec<u8>,
}

impl PoolKey {
    pub(crate) fn new(address: SocketAddr, server_name: &str, tls: &TlsSettings) -> PoolKey {
        let mut trust = Vec::new();
        match &tls.trust {
            PeerTrust::PinnedFingerprints(fingerprints) => {
                let mut fingerprints = fingerprints.clone();
                fingerprints.sort();
                trust.push(0);
                for fingerprint in fingerprints {
                    trust.extend_from_slice(&fingerprint.0);
                }
            }
            PeerTrust::ClusterCertificateAuthority { root_certificates } => {
                trust.push(1);
                for root in root_certificates {
                    trust.extend_from_slice(&(root.len() as u64).to_be_bytes());
                    trust.extend_from_slice(root.as_ref());
                }
            }
        }
        PoolKey {
            address,
            server_name: server_name.to_string(),
            identity: tls.identity.fingerprint(),
            trust,
        }
    }
}

impl Default for ConnectionPool {
    fn default() -> ConnectionPool {
        ConnectionPool::new(MAX_POOL_IDLE)
    }
}

impl std::fmt::Debug for ConnectionPool {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ConnectionPool")
            .field("idle_limit", &self.inner.idle_limit)
            .field("parked", &self.parked())
            .finish()
    }
}

impl ConnectionPool {
    /// A pool whose connections are used for `idle_limit` after their session at most
    /// (capped at [`MAX_POOL_IDLE`]).
    pub fn new(idle_limit: Duration) -> ConnectionPool {
        ConnectionPool {
            inner: Arc::new(PoolInner {
                idle_limit: idle_limit.min(MAX_POOL_IDLE),
                parked: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Parked connections to `address`, under any identity and trust.
    pub fn parked_to(&self, address: SocketAddr) -> usize {
        let mut parked = self.lock();
        self.expire(&mut parked);
        parked
            .iter()
            .filter(|(key, _)| key.address == address)
            .map(|(_, connections)| connections.len())
            .sum()
    }

    /// Parked connections in all.
    pub fn parked(&self) -> usize {
        let mut parked = self.lock();
        self.expire(&mut parked);
        parked.values().map(Vec::len).sum()
    }

    /// Closes every parked connection.
    pub fn clear(&self) {
        self.lock().clear();
    }

    pub(crate) fn available(&self, key: &PoolKey) -> usize {
        let mut parked = self.lock();
        self.expire(&mut parked);
        parked.get(key).map_or(0, Vec::len)
    }

    /// The connection parked last for `key` that still looks open (the peer has neither closed
    /// it nor sent anything since it was parked: see `expire`).
    pub(crate) fn take(&self, key: &PoolKey) -> Option<Parked> {
        let mut parked = self.lock();
        self.expire(&mut parked);
        parked.get_mut(key)?.pop()
    }

    pub(crate) fn put(&self, key: PoolKey, stream: TlsStream<TcpStream>, round_trip: Duration) {
        let mut parked = self.lock();
        self.expire(&mut parked);
        let connections = parked.entry(key).or_default();
        if connections.len() >= MAX_PARKED_PER_PEER {
            connections.remove(0);
        }
        connections.push(Parked {
            stream,
            round_trip,
            parked_at: Instant::now(),
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Vec<Parked>>> {
        self.inner
            .parked
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Drops (closes) connections parked longer than the idle limit or closed by their peer.
    fn expire(&self, parked: &mut HashMap<PoolKey, Vec<Parked>>) {
        let limit = self.inner.idle_limit;
        for connections in parked.values_mut() {
            connections.retain(|connection| {
                connection.parked_at.elapsed() < limit && looks_open(connection.stream.get_ref().0)
            });
        }
        parked.retain(|_, connections| !connections.is_empty());
    }
}

/// Whether a parked connection's peer has left it alone: nothing to read (a peer that closed it
/// has sent a FIN or a TLS alert, and one that sends anything else breaks the protocol).
fn looks_open(tcp: &TcpStream) -> bool {
    let mut byte = [MaybeUninit::<u8>::uninit()];
    // Tokio's sockets do not block: an open, quiet connection has nothing to peek at.
    match socket2::SockRef::from(tcp).peek(&mut byte) {
        Err(error) => error.kind() == std::io::ErrorKind::WouldBlock,
        Ok(_) => false,
    }
}
