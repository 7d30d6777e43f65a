//! [`MtlsRaftTransport`]: the dialing side of the cluster channel. It implements the store's
//! [`RaftTransport`] and also carries forwarded writes and read-index requests to the leader.
//!
//! One mutually authenticated TLS connection per peer, multiplexed: every request gets an id, a
//! writer task sends frames in order, a reader task hands each reply to its waiting caller. A
//! connection that fails (reset, protocol error, a reply that does not come within the request
//! timeout) is closed and every request waiting on it fails; the next request dials again.
//!
//! Errors keep raft's distinction: nothing sent (connect refused or timed out, handshake failed,
//! the peer shutting down) is *unreachable*, raft backs off; sent but no good reply is *failed*.
//! This module must not retry raft messages: raft does that.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use novacron_store::{RaftMessage, RaftMessageKind, RaftTarget, RaftTransport, TransportError};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio_rustls::TlsConnector;

use crate::error::{ClusterError, Result};
use crate::identity::{NodeIdentity, node_server_name};
use crate::wire::{Frame, RemoteFailure, Request, WireError};

/// Timeouts of the dialing side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MtlsRaftOptions {
    /// TCP connect plus TLS handshake, each. A peer that does not answer within it is
    /// unreachable.
    pub connect_timeout: Duration,
    /// How long a request waits for its reply before the connection is considered broken.
    /// openraft applies its own, shorter deadlines to raft messages on top of this.
    pub request_timeout: Duration,
}

impl Default for MtlsRaftOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(15),
        }
    }
}

/// Frames queued per connection before senders wait (backpressure on a slow peer).
const OUTGOING_FRAMES: usize = 256;

/// A failed request, classified.
#[derive(Debug)]
pub(crate) enum RequestError {
    /// Nothing was sent.
    Unreachable(Box<dyn std::error::Error + Send + Sync>),
    /// Sent, no usable reply.
    Failed(Box<dyn std::error::Error + Send + Sync>),
    /// The peer answered with a failure.
    Remote(RemoteFailure),
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Reason(pub String);

fn reason(text: impl Into<String>) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(Reason(text.into()))
}

/// An error while reading a frame from a connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameReadError {
    #[error("reading from the connection failed")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Reads one frame; `None` on a clean end of stream at a frame boundary.
pub(crate) async fn read_frame<Reader: AsyncRead + Unpin>(
    reader: &mut Reader,
) -> std::result::Result<Option<Frame>, FrameReadError> {
    read_frame_limited(reader, crate::wire::MAX_FRAME_BYTES).await
}

/// Like [`read_frame`], refusing frames longer than `max_bytes` (a peer without a certificate
/// gets a small limit: a join request is a few KiB).
pub(crate) async fn read_frame_limited<Reader: AsyncRead + Unpin>(
    reader: &mut Reader,
    max_bytes: usize,
) -> std::result::Result<Option<Frame>, FrameReadError> {
    let mut length = [0u8; 4];
    match reader.read_exact(&mut length).await {
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error.into()),
    }
    let length = Frame::check_length(u32::from_be_bytes(length))?;
    if length > max_bytes {
        return Err(WireError::Length { length }.into());
    }
    // Grow as bytes arrive rather than trusting the prefix with one large allocation.
    let mut buffer = Vec::with_capacity(length.min(1024 * 1024));
    let read = (&mut *reader)
        .take(length as u64)
        .read_to_end(&mut buffer)
        .await?;
    if read != length {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    Ok(Some(Frame::decode(&buffer)?))
}

type PendingReplies = HashMap<u64, oneshot::Sender<Frame>>;

/// One multiplexed connection to a peer.
struct Connection {
    outgoing: mpsc::Sender<Vec<u8>>,
    /// `None` once the connection is closed.
    pending: Arc<Mutex<Option<PendingReplies>>>,
    next_request_id: AtomicU64,
    tasks: Vec<AbortHandle>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn close_pending(pending: &Mutex<Option<PendingReplies>>) {
    // Dropping the senders wakes every waiting request with "connection lost".
    lock(pending).take();
}

impl Connection {
    fn start<Stream>(stream: Stream) -> Connection
    where
        Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let pending: Arc<Mutex<Option<PendingReplies>>> =
            Arc::new(Mutex::new(Some(HashMap::new())));
        let (outgoing, mut queue) = mpsc::channel::<Vec<u8>>(OUTGOING_FRAMES);

        let writer_pending = pending.clone();
        let writer_task = tokio::spawn(async move {
            while let Some(first) = queue.recv().await {
                let mut result = writer.write_all(&first).await;
                while result.is_ok() {
                    match queue.try_recv() {
                        Ok(next) => result = writer.write_all(&next).await,
                        Err(_) => break,
                    }
                }
                if let Err(error) = result.and(writer.flush().await) {
                    tracing::debug!(%error, "cluster connection write failed");
                    break;
                }
            }
            close_pending(&writer_pending);
            let _ = writer.shutdown().await;
        });

        let reader_pending = pending.clone();
        let reader_task = tokio::spawn(async move {
            loop {
                match read_frame(&mut reader).await {
                    Ok(Some(frame @ (Frame::Reply { .. } | Frame::Error { .. }))) => {
                        let waiting = lock(&reader_pending)
                            .as_mut()
                            .and_then(|pending| pending.remove(&frame.id()));
                        if let Some(waiting) = waiting {
                            let _ = waiting.send(frame);
                        }
                    }
                    Ok(Some(Frame::Request { .. })) => {
                        tracing::warn!("cluster peer sent a request on a dialed connection");
                        break;
                    }
                    Ok(None) => break,
                    Err(error) => {
                        tracing::debug!(%error, "cluster connection read failed");
                        break;
                    }
                }
            }
            close_pending(&reader_pending);
        });

        Connection {
            outgoing,
            pending,
            next_request_id: AtomicU64::new(1),
            tasks: vec![writer_task.abort_handle(), reader_task.abort_handle()],
        }
    }

    fn is_closed(&self) -> bool {
        lock(&self.pending).is_none() || self.outgoing.is_closed()
    }

    fn close(&self) {
        close_pending(&self.pending);
        for task in &self.tasks {
            task.abort();
        }
    }

    /// Registers a request id and the channel its reply arrives on; `None` if closed.
    fn register(&self) -> Option<(u64, oneshot::Receiver<Frame>)> {
        let id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        lock(&self.pending).as_mut()?.insert(id, sender);
        Some((id, receiver))
    }

    fn forget(&self, id: u64) {
        if let Some(pending) = lock(&self.pending).as_mut() {
            pending.remove(&id);
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Removes a request's reply slot when the request ends for any reason (including openraft
/// dropping the future at its own deadline).
struct PendingGuard<'a> {
    connection: &'a Connection,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.connection.forget(self.id);
    }
}

struct Peer {
    address: String,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
}

struct Inner {
    node_id: u64,
    connector: TlsConnector,
    options: MtlsRaftOptions,
    peers: Mutex<HashMap<u64, Arc<Peer>>>,
    connections_opened: AtomicU64,
    round_trips: Mutex<HashMap<u64, VecDeque<Duration>>>,
}

/// Round-trip samples kept per peer (the most recent).
pub const ROUND_TRIP_SAMPLES_PER_PEER: usize = 512;

/// The store's raft transport over mutual TLS between hosts, trusting the cluster CA. Cheap to
/// clone.
#[derive(Clone)]
pub struct MtlsRaftTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MtlsRaftTransport {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("MtlsRaftTransport")
            .field("node_id", &self.inner.node_id)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl MtlsRaftTransport {
    /// A transport that presents `identity` and accepts only peers with certificates from the
    /// same cluster CA, each naming the node it dials.
    pub fn new(identity: &NodeIdentity, options: MtlsRaftOptions) -> Result<MtlsRaftTransport> {
        let client_config = identity
            .tls_settings()
            .client_config()
            .map_err(|source| ClusterError::Tls { source })?;
        Ok(MtlsRaftTransport {
            inner: Arc::new(Inner {
                node_id: identity.node_id(),
                connector: TlsConnector::from(client_config),
                options,
                peers: Mutex::new(HashMap::new()),
                connections_opened: AtomicU64::new(0),
                round_trips: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// This host's node id.
    pub fn node_id(&self) -> u64 {
        self.inner.node_id
    }

    /// How many connections this transport has opened so far (reconnections included).
    pub fn connections_opened(&self) -> u64 {
        self.inner.connections_opened.load(Ordering::Relaxed)
    }

    /// The recent round trips of raft append-entries exchanges (heartbeats and replication)
    /// with each of `peers`: the input of [`crate::timing::raft_timing_for_round_trips`] when
    /// `peers` are the voters and this node leads. A sample is the time from queuing the request
    /// to receiving its reply, so it includes the peer's handling (a log append) as raft sees it.
    pub fn round_trip_samples(&self, peers: &[u64]) -> Vec<Duration> {
        let round_trips = lock(&self.inner.round_trips);
        peers
            .iter()
            .filter_map(|peer| round_trips.get(peer))
            .flat_map(|samples| samples.iter().copied())
            .collect()
    }

    fn record_round_trip(&self, node_id: u64, round_trip: Duration) {
        let mut round_trips = lock(&self.inner.round_trips);
        let samples = round_trips.entry(node_id).or_default();
        if samples.len() == ROUND_TRIP_SAMPLES_PER_PEER {
            samples.pop_front();
        }
        samples.push_back(round_trip);
    }

    /// Closes the connection to a peer (the next request dials again), e.g. after the peer was
    /// removed from the cluster.
    pub fn disconnect(&self, node_id: u64) {
        if let Some(peer) = lock(&self.inner.peers).remove(&node_id)
            && let Ok(mut connection) = peer.connection.try_lock()
            && let Some(connection) = connection.take()
        {
            connection.close();
        }
    }

    fn peer(&self, node_id: u64, address: &str) -> Arc<Peer> {
        let mut peers = lock(&self.inner.peers);
        if let Some(peer) = peers.get(&node_id)
            && peer.address == address
        {
            return peer.clone();
        }
        let peer = Arc::new(Peer {
            address: address.to_string(),
            connection: tokio::sync::Mutex::new(None),
        });
        peers.insert(node_id, peer.clone());
        peer
    }

    async fn dial(
        &self,
        node_id: u64,
        address: &str,
    ) -> std::result::Result<Connection, RequestError> {
        let timeout = self.inner.options.connect_timeout;
        let tcp = match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(error)) => return Err(RequestError::Unreachable(Box::new(error))),
            Err(_) => {
                return Err(RequestError::Unreachable(reason(format!(
                    "tcp connect timed out after {timeout:?}"
                ))));
            }
        };
        let _ = tcp.set_nodelay(true);
        // Closing this side (a request timed out, the peer was removed) resets the connection
        // and drops what the kernel has not sent yet: a forwarded write stuck behind a cut link
        // must not reach the leader after the link heals, once its caller was told it failed.
        let _ = tcp.set_zero_linger();
        let server_name = ServerName::try_from(node_server_name(node_id))
            .map_err(|error| RequestError::Unreachable(Box::new(error)))?;
        let tls =
            match tokio::time::timeout(timeout, self.inner.connector.connect(server_name, tcp))
                .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::warn!(
                        peer_node_id = node_id,
                        peer = address,
                        %error,
                        "cluster tls handshake failed"
                    );
                    return Err(RequestError::Unreachable(Box::new(error)));
                }
                Err(_) => {
                    return Err(RequestError::Unreachable(reason(format!(
                        "tls handshake timed out after {timeout:?}"
                    ))));
                }
            };
        self.inner
            .connections_opened
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            peer_node_id = node_id,
            peer = address,
            "cluster connection opened"
        );
        Ok(Connection::start(tls))
    }

    async fn connection(
        &self,
        node_id: u64,
        address: &str,
    ) -> std::result::Result<Arc<Connection>, RequestError> {
        let peer = self.peer(node_id, address);
        let mut slot = peer.connection.lock().await;
        if let Some(connection) = slot.as_ref()
            && !connection.is_closed()
        {
            return Ok(connection.clone());
        }
        let connection = Arc::new(self.dial(node_id, address).await?);
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Sends one request to `node_id` at `address` and waits for its reply.
    pub(crate) async fn request(
        &self,
        node_id: u64,
        address: &str,
        request: Request,
    ) -> std::result::Result<Vec<u8>, RequestError> {
        let connection = self.connection(node_id, address).await?;
        let Some((id, reply)) = connection.register() else {
            // Closed between the check and now: nothing was sent.
            return Err(RequestError::Unreachable(reason(
                "the connection closed before the request was sent",
            )));
        };
        let _guard = PendingGuard {
            connection: &connection,
            id,
        };
        let name = request.name();
        let bytes = Frame::Request { id, request }
            .encode()
            .map_err(|error| RequestError::Failed(Box::new(error)))?;
        let timeout = self.inner.options.request_timeout;
        let exchange = async {
            connection
                .outgoing
                .send(bytes)
                .await
                .map_err(|_| RequestError::Unreachable(reason("the connection closed")))?;
            reply.await.map_err(|_| {
                RequestError::Failed(reason(format!(
                    "the connection was lost before the reply to {name}"
                )))
            })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(Frame::Reply { body, .. })) => Ok(body),
            Ok(Ok(Frame::Error { failure, .. })) => {
                if matches!(failure, RemoteFailure::Refused { .. }) {
                    // The listener closes a connection after refusing a message on it; don't
                    // let the next request race that close.
                    connection.close();
                }
                Err(RequestError::Remote(failure))
            }
            Ok(Ok(Frame::Request { .. })) => Err(RequestError::Failed(reason(
                "the peer answered with a request",
            ))),
            Ok(Err(error)) => Err(error),
            Err(_) => {
                // A peer that does not answer in time is treated as gone: the next request
                // reconnects (and finds it unreachable if it really is).
                connection.close();
                Err(RequestError::Failed(reason(format!(
                    "no reply to {name} within {timeout:?}"
                ))))
            }
        }
    }
}

impl MtlsRaftTransport {
    async fn membership_request(
        &self,
        via_node_id: u64,
        via_address: &str,
        request: Request,
    ) -> Result<()> {
        let name = request.name();
        match self.request(via_node_id, via_address, request).await {
            Ok(_) => Ok(()),
            Err(RequestError::Unreachable(source)) => Err(ClusterError::PeerUnreachable {
                node_id: via_node_id,
                address: via_address.to_string(),
                source,
            }),
            Err(RequestError::Failed(source)) => Err(ClusterError::PeerFailed {
                request: name,
                node_id: via_node_id,
                address: via_address.to_string(),
                source,
            }),
            Err(RequestError::Remote(failure)) => Err(ClusterError::PeerRefused {
                request: name,
                node_id: via_node_id,
                message: failure.to_string(),
            }),
        }
    }

    /// Asks the member `via_node_id` at `via_address` (any member; it forwards to the leader) to
    /// add admitted host `node_id` as a learner. Used by a joining host right after
    /// [`crate::joiner::enrol`], with its new identity.
    pub async fn add_learner_via(
        &self,
        via_node_id: u64,
        via_address: &str,
        node_id: u64,
    ) -> Result<()> {
        self.membership_request(via_node_id, via_address, Request::AddLearner { node_id })
            .await
    }

    /// Asks a member to remove host `node_id` from the region (see
    /// [`crate::ClusterStore::remove_host`]).
    pub async fn remove_host_via(
        &self,
        via_node_id: u64,
        via_address: &str,
        node_id: u64,
    ) -> Result<()> {
        self.membership_request(via_node_id, via_address, Request::RemoveHost { node_id })
            .await
    }
}

impl RaftTransport for MtlsRaftTransport {
    fn send(
        &self,
        target: RaftTarget,
        message: RaftMessage,
    ) -> BoxFuture<'_, std::result::Result<Vec<u8>, TransportError>> {
        async move {
            let kind = message.kind;
            // Times append-entries exchanges that got a reply. One that failed, or that openraft
            // cancelled at its deadline (at least 500 ms, far above any sane round trip), says
            // the peer is cut off, not how far away it is: counted, it would slow the region's
            // failure detection for as long as a host is down.
            let started = tokio::time::Instant::now();
            let result = self
                .request(target.node_id, &target.address, Request::Raft(message))
                .await;
            if kind == RaftMessageKind::AppendEntries && result.is_ok() {
                self.record_round_trip(target.node_id, started.elapsed());
            }
            match result {
                Ok(reply) => Ok(reply),
                Err(RequestError::Unreachable(source)) => Err(TransportError::Unreachable {
                    node_id: target.node_id,
                    address: target.address,
                    source,
                }),
                Err(RequestError::Remote(RemoteFailure::ShuttingDown)) => {
                    Err(TransportError::Unreachable {
                        node_id: target.node_id,
                        address: target.address,
                        source: reason("the peer is shutting down"),
                    })
                }
                Err(RequestError::Failed(source)) => Err(TransportError::Failed {
                    kind,
                    node_id: target.node_id,
                    address: target.address,
                    source,
                }),
                Err(RequestError::Remote(failure)) => Err(TransportError::Failed {
                    kind,
                    node_id: target.node_id,
                    address: target.address,
                    source: Box::new(failure),
                }),
            }
        }
        .boxed()
    }
}
