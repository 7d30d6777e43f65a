//! [`RaftServer`]: the accepting side of the cluster channel. It listens on TCP, requires a
//! client certificate from the cluster CA on every connection, learns the peer's node id from
//! that certificate, and dispatches each request to the local [`Store`]: raft messages to
//! [`Store::handle_raft_message`], forwarded writes to [`Store::transaction`], read-index
//! requests to [`Store::read_index`].
//!
//! A raft message whose `source_node_id` is not the authenticated node is refused and the
//! connection closed: a host may speak only for itself. A peer without a certificate (a host
//! that is joining) may send one thing only, a join request, answered only by a host that holds
//! the cluster CA ([`RaftListener::serve_cluster`]). The server owns no raft logic; it must not
//! interpret raft bodies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use novacron_store::Store;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::cluster_store::ClusterStore;
use crate::error::{ClusterError, Result};
use crate::identity::{ClusterCa, NodeIdentity, node_id_of_certificate};
use crate::transport::read_frame_limited;
use crate::wire::{Frame, RemoteFailure, Request};

/// How long a connecting peer may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests served at once per connection; the reader waits beyond that (backpressure).
const REQUESTS_IN_FLIGHT_PER_CONNECTION: usize = 512;
/// Largest frame from a peer without a certificate (a join request is a few KiB).
const MAX_UNAUTHENTICATED_FRAME_BYTES: usize = 64 * 1024;
/// How long a peer without a certificate may stay silent.
const UNAUTHENTICATED_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Reply frames queued per connection.
const REPLY_QUEUE: usize = 256;

/// A bound, not yet serving, cluster listener: bind first to learn the address the store
/// announces (`StoreConfig::node_address`), open the store, then [`Self::serve`] it.
pub struct RaftListener {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    local_address: SocketAddr,
}

impl std::fmt::Debug for RaftListener {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RaftListener")
            .field("local_address", &self.local_address)
            .finish_non_exhaustive()
    }
}

impl RaftListener {
    /// Binds `address` (e.g. `0.0.0.0:7181`, or port 0 in tests) with `identity`'s certificate;
    /// clients must present a certificate from the same cluster CA.
    pub async fn bind(address: &str, identity: &NodeIdentity) -> Result<RaftListener> {
        let server_config = server_config(identity)?;
        let listener =
            TcpListener::bind(address)
                .await
                .map_err(|source| ClusterError::Listener {
                    address: address.to_string(),
                    action: "binding",
                    source,
                })?;
        let local_address = listener
            .local_addr()
            .map_err(|source| ClusterError::Listener {
                address: address.to_string(),
                action: "reading the bound address",
                source,
            })?;
        Ok(RaftListener {
            listener,
            acceptor: TlsAcceptor::from(server_config),
            local_address,
        })
    }

    /// Like [`Self::bind`] on an already bound socket: a joining host binds first (its raft
    /// address goes into the join request) and gets its identity afterwards.
    pub fn from_listener(listener: TcpListener, identity: &NodeIdentity) -> Result<RaftListener> {
        let server_config = server_config(identity)?;
        let local_address = listener
            .local_addr()
            .map_err(|source| ClusterError::Listener {
                address: "bound socket".to_string(),
                action: "reading the bound address",
                source,
            })?;
        Ok(RaftListener {
            listener,
            acceptor: TlsAcceptor::from(server_config),
            local_address,
        })
    }

    /// The bound address.
    pub fn local_address(&self) -> SocketAddr {
        self.local_address
    }

    /// Starts serving raft, forwarded writes and read-index requests for `store`. Join and
    /// membership requests are refused: use [`Self::serve_cluster`] for them.
    pub fn serve(self, store: Store) -> RaftServer {
        self.start(Arc::new(ServerContext {
            store,
            cluster: None,
            ca: SharedCa::default(),
        }))
    }

    /// Starts serving everything: raft, forwarded writes and reads, membership requests, and,
    /// once `ca` holds the cluster CA (it may be set later, while serving), join requests from
    /// hosts without a certificate yet.
    pub fn serve_cluster(self, cluster: ClusterStore, ca: SharedCa) -> RaftServer {
        self.start(Arc::new(ServerContext {
            store: cluster.store().clone(),
            cluster: Some(cluster),
            ca,
        }))
    }

    fn start(self, context: Arc<ServerContext>) -> RaftServer {
        let (stop, stopped) = watch::channel(false);
        let local_address = self.local_address;
        let accept_task = tokio::spawn(accept_loop(self.listener, self.acceptor, context, stopped));
        tracing::info!(address = %local_address, "cluster raft listener serving");
        RaftServer {
            local_address,
            stop,
            accept_task: Some(accept_task),
        }
    }
}

/// What a listener serves.
struct ServerContext {
    store: Store,
    cluster: Option<ClusterStore>,
    ca: SharedCa,
}

/// The cluster CA as a host comes to hold it: empty on a host without it, set once when the
/// host receives a copy (the listener admits joiners from then on).
pub type SharedCa = Arc<std::sync::OnceLock<Arc<ClusterCa>>>;

/// A [`SharedCa`] holding `ca`, or empty.
pub fn shared_ca(ca: Option<Arc<ClusterCa>>) -> SharedCa {
    let cell = SharedCa::default();
    if let Some(ca) = ca {
        let _ = cell.set(ca);
    }
    cell
}

/// mTLS server configuration: TLS 1.3, the aws-lc-rs provider (X25519MLKEM768 first), this
/// host's certificate, client certificates verified against the cluster CA. A client without a
/// certificate is let through the handshake only to send a join request.
fn server_config(identity: &NodeIdentity) -> Result<Arc<rustls::ServerConfig>> {
    let tls_error = |reason: String| ClusterError::Tls {
        source: novacron_transport::TransportError::TlsConfiguration { reason },
    };
    let provider = novacron_transport::tls::crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(identity.ca_certificate_der().clone())
        .map_err(|error| tls_error(error.to_string()))?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|error| tls_error(format!("client verifier: {error}")))?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
        identity
            .host_identity()
            .private_key_pkcs8_der()
            .to_vec()
            .into(),
    );
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| tls_error(error.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.host_identity().certificate_chain().to_vec(), key)
        .map_err(|error| tls_error(error.to_string()))?;
    Ok(Arc::new(config))
}

/// A running cluster listener. [`Self::shutdown`] stops it and closes its connections.
pub struct RaftServer {
    local_address: SocketAddr,
    stop: watch::Sender<bool>,
    accept_task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for RaftServer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RaftServer")
            .field("local_address", &self.local_address)
            .finish_non_exhaustive()
    }
}

impl RaftServer {
    /// Binds and serves in one step, for a store that is already open.
    pub async fn start(address: &str, identity: &NodeIdentity, store: Store) -> Result<RaftServer> {
        Ok(RaftListener::bind(address, identity).await?.serve(store))
    }

    /// The address the server listens on.
    pub fn local_address(&self) -> SocketAddr {
        self.local_address
    }

    /// Stops accepting, closes every connection and waits until the listener socket is closed.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.accept_task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for RaftServer {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.accept_task.take() {
            task.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    context: Arc<ServerContext>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = async { let _ = stopped.wait_for(|stop| *stop).await; } => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    connections.spawn(serve_connection(tcp, peer, acceptor.clone(), context.clone()));
                }
                Err(error) => {
                    // Out of file descriptors and the like: keep serving the others.
                    tracing::warn!(%error, "cluster listener accept failed");
                    tokio::task::yield_now().await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    context: Arc<ServerContext>,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            tracing::warn!(%peer, %error, "cluster tls handshake refused");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "cluster tls handshake timed out");
            return;
        }
    };
    // `None`: a joining host without a certificate.
    let peer_node_id = match tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| node_id_of_certificate(leaf.as_ref()))
    {
        Some(Ok(node_id)) => Some(node_id),
        Some(Err(error)) => {
            tracing::warn!(%peer, %error, "cluster peer certificate names no node");
            return;
        }
        None => None,
    };
    tracing::debug!(%peer, ?peer_node_id, "cluster connection accepted");

    let (mut reader, mut writer) = tokio::io::split(tls);
    let (replies, mut reply_queue) = mpsc::channel::<Vec<u8>>(REPLY_QUEUE);
    let writer_task = tokio::spawn(async move {
        while let Some(first) = reply_queue.recv().await {
            let mut result = writer.write_all(&first).await;
            while result.is_ok() {
                match reply_queue.try_recv() {
                    Ok(next) => result = writer.write_all(&next).await,
                    Err(_) => break,
                }
            }
            if result.and(writer.flush().await).is_err() {
                return;
            }
        }
        let _ = writer.shutdown().await;
    });

    let frame_limit = if peer_node_id.is_some() {
        crate::wire::MAX_FRAME_BYTES
    } else {
        MAX_UNAUTHENTICATED_FRAME_BYTES
    };
    let in_flight = Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_PER_CONNECTION));
    let mut requests = JoinSet::new();
    loop {
        // Not raced against anything: a frame read is not cancel-safe (a partial read would
        // desynchronize the stream). A peer without a certificate gets an idle limit.
        let read = read_frame_limited(&mut reader, frame_limit);
        let frame = if peer_node_id.is_some() {
            read.await
        } else {
            match tokio::time::timeout(UNAUTHENTICATED_IDLE_TIMEOUT, read).await {
                Ok(frame) => frame,
                Err(_) => break,
            }
        };
        // Reap the requests that finished meanwhile.
        while requests.try_join_next().is_some() {}
        let (id, request) = match frame {
            Ok(Some(Frame::Request { id, request })) => (id, request),
            Ok(Some(_)) => {
                tracing::warn!(%peer, ?peer_node_id, "cluster peer sent a reply to the listener");
                break;
            }
            Ok(None) => break,
            Err(error) => {
                tracing::warn!(%peer, ?peer_node_id, %error, "cluster connection read failed");
                break;
            }
        };
        if let Some(refusal) = refusal(peer_node_id, &request) {
            tracing::warn!(
                %peer,
                ?peer_node_id,
                request = request.name(),
                %refusal,
                "cluster request refused"
            );
            let failure = RemoteFailure::Refused { message: refusal };
            if let Ok(bytes) = (Frame::Error { id, failure }).encode() {
                let _ = replies.send(bytes).await;
            }
            break;
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let context = context.clone();
        let replies = replies.clone();
        requests.spawn(async move {
            let frame = handle_request(&context, peer_node_id, id, request).await;
            match frame.encode() {
                Ok(bytes) => {
                    let _ = replies.send(bytes).await;
                }
                Err(error) => {
                    tracing::warn!(%error, "cluster reply could not be encoded");
                    let failure = RemoteFailure::Failed {
                        message: format!("the reply could not be encoded: {error}"),
                    };
                    if let Ok(bytes) = (Frame::Error { id, failure }).encode() {
                        let _ = replies.send(bytes).await;
                    }
                }
            }
            drop(permit);
        });
    }
    // Requests still running have no one to answer to once the connection is gone.
    requests.shutdown().await;
    drop(replies);
    let _ = writer_task.await;
}

/// Why a request may not be served on this connection, if it may not: a host speaks only for
/// itself, and a host without a certificate may only ask to join.
fn refusal(peer_node_id: Option<u64>, request: &Request) -> Option<String> {
    match (peer_node_id, request) {
        (_, Request::Join(_)) => None,
        (None, other) => Some(format!(
            "{} needs a cluster certificate; only a join request is accepted without one",
            other.name()
        )),
        (Some(peer_node_id), Request::Raft(message)) if message.source_node_id != peer_node_id => {
            Some(format!(
                "the raft message claims to come from node {} but the connection is authenticated as node {peer_node_id}",
                message.source_node_id
            ))
        }
        (Some(_), _) => None,
    }
}

fn cluster_error_failure(error: &ClusterError) -> RemoteFailure {
    match error {
        ClusterError::Store(store_error) => RemoteFailure::from_store(store_error),
        ClusterError::JoinTokenRefused { .. }
        | ClusterError::InvalidJoinToken { .. }
        | ClusterError::Certificate { .. }
        | ClusterError::Membership { .. } => RemoteFailure::Refused {
            message: error.to_string(),
        },
        other => RemoteFailure::Failed {
            message: other.to_string(),
        },
    }
}

fn encoded<T: serde::Serialize>(value: &T) -> std::result::Result<Vec<u8>, RemoteFailure> {
    serde_json::to_vec(value).map_err(|error| RemoteFailure::Failed {
        message: error.to_string(),
    })
}

/// Why an authenticated host may not make `request`, if it may not: forwarded writes, reads
/// and membership requests come only from current members (a removed host keeps a valid
/// certificate, not a say), except a host's request to add itself right after admission.
fn membership_refusal(
    store: &Store,
    peer_node_id: Option<u64>,
    request: &Request,
) -> Option<String> {
    let peer = peer_node_id?;
    match request {
        Request::Raft(_) | Request::Join(_) => None,
        Request::AddLearner { node_id } if *node_id == peer => None,
        Request::Transaction(_)
        | Request::ReadIndex
        | Request::AddLearner { .. }
        | Request::RemoveHost { .. } => {
            let is_member = store.metrics().membership.addresses.contains_key(&peer);
            (!is_member).then(|| {
                format!(
                    "node {peer} is not a member of this region; {} refused",
                    request.name()
                )
            })
        }
    }
}

async fn handle_request(
    context: &ServerContext,
    peer_node_id: Option<u64>,
    id: u64,
    request: Request,
) -> Frame {
    let store = &context.store;
    if let Some(message) = membership_refusal(store, peer_node_id, &request) {
        tracing::warn!(
            ?peer_node_id,
            request = request.name(),
            "request from a non-member refused"
        );
        return Frame::Error {
            id,
            failure: RemoteFailure::Refused { message },
        };
    }
    let not_served = |what: &str| RemoteFailure::Refused {
        message: format!("this host does not serve {what}"),
    };
    let result: std::result::Result<Vec<u8>, RemoteFailure> = match request {
        Request::Raft(message) => store
            .handle_raft_message(message)
            .await
            .map_err(|error| RemoteFailure::from_store(&error)),
        Request::Transaction(transaction) => match store.transaction(transaction).await {
            Ok(outcome) => encoded(&outcome),
            Err(error) => Err(RemoteFailure::from_store(&error)),
        },
        Request::ReadIndex => store
            .read_index()
            .await
            .map(|index| index.to_be_bytes().to_vec())
            .map_err(|error| RemoteFailure::from_store(&error)),
        Request::Join(join) => match (&context.cluster, context.ca.get()) {
            (Some(cluster), Some(ca)) => match crate::join::admit_host(cluster, ca, &join).await {
                Ok(grant) => {
                    tracing::info!(
                        host_name = %join.host_name,
                        node_id = grant.node_id,
                        "host admitted"
                    );
                    encoded(&grant)
                }
                Err(error) => {
                    tracing::warn!(host_name = %join.host_name, %error, "join refused");
                    Err(cluster_error_failure(&error))
                }
            },
            _ => Err(not_served(
                "joins: it does not hold the cluster ca; join through the host that does",
            )),
        },
        Request::AddLearner { node_id } => match &context.cluster {
            Some(cluster) => cluster
                .add_learner(node_id)
                .await
                .map(|()| Vec::new())
                .map_err(|error| cluster_error_failure(&error)),
            None => Err(not_served("membership requests")),
        },
        Request::RemoveHost { node_id } => match &context.cluster {
            Some(cluster) => cluster
                .remove_host(node_id)
                .await
                .map(|()| Vec::new())
                .map_err(|error| cluster_error_failure(&error)),
            None => Err(not_served("membership requests")),
        },
    };
    match result {
        Ok(body) => Frame::Reply { id, body },
        Err(failure) => Frame::Error { id, failure },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use novacron_store::{RaftMessage, RaftMessageKind};

    fn raft(source_node_id: u64) -> Request {
        Request::Raft(RaftMessage {
            kind: RaftMessageKind::AppendEntries,
            source_node_id,
            body: Vec::new(),
        })
    }

    #[test]
    fn without_a_certificate_only_a_join_is_served_and_a_host_speaks_only_for_itself() {
        let join = Request::Join(crate::join::JoinRequest {
            token: String::new(),
            csr_pem: String::new(),
            host_name: String::new(),
            raft_address: String::new(),
        });
        assert_eq!(refusal(None, &join), None);
        for request in [
            raft(1),
            Request::ReadIndex,
            Request::AddLearner { node_id: 1 },
            Request::RemoveHost { node_id: 1 },
            Request::Transaction(novacron_store::Transaction::new()),
        ] {
            let reason = refusal(None, &request).expect("refused");
            assert!(reason.contains("needs a cluster certificate"), "{reason}");
        }
        assert_eq!(refusal(Some(4), &raft(4)), None);
        assert!(refusal(Some(4), &raft(5)).is_some());
        assert_eq!(refusal(Some(4), &Request::ReadIndex), None);
    }
}
