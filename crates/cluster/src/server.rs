//! [`RaftServer`]: the accepting side of the cluster channel. It listens on TCP, requires a
//! client certificate from the cluster CA on every connection, learns the peer's node id from
//! that certificate, and dispatches each request to the local [`Store`]: raft messages to
//! [`Store::handle_raft_message`], forwarded writes to [`Store::transaction`], read-index
//! requests to [`Store::read_index`].
//!
//! A raft message whose `source_node_id` is not the authenticated node is refused and the
//! connection closed: a host may speak only for itself. The server owns no raft logic; it must
//! not interpret raft bodies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use novacron_store::Store;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::error::{ClusterError, Result};
use crate::identity::{NodeIdentity, node_id_of_certificate};
use crate::transport::read_frame;
use crate::wire::{Frame, RemoteFailure, Request};

/// How long a connecting peer may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests served at once per connection; the reader waits beyond that (backpressure).
const REQUESTS_IN_FLIGHT_PER_CONNECTION: usize = 512;
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
        let server_config = identity
            .tls_settings()
            .server_config()
            .map_err(|source| ClusterError::Tls { source })?;
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

    /// The bound address.
    pub fn local_address(&self) -> SocketAddr {
        self.local_address
    }

    /// Starts serving `store`.
    pub fn serve(self, store: Store) -> RaftServer {
        let (stop, stopped) = watch::channel(false);
        let local_address = self.local_address;
        let accept_task = tokio::spawn(accept_loop(self.listener, self.acceptor, store, stopped));
        tracing::info!(address = %local_address, "cluster raft listener serving");
        RaftServer {
            local_address,
            stop,
            accept_task: Some(accept_task),
        }
    }
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
    store: Store,
    mut stopped: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = async { let _ = stopped.wait_for(|stop| *stop).await; } => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    connections.spawn(serve_connection(tcp, peer, acceptor.clone(), store.clone()));
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

async fn serve_connection(tcp: TcpStream, peer: SocketAddr, acceptor: TlsAcceptor, store: Store) {
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
    let peer_node_id = match tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| node_id_of_certificate(leaf.as_ref()))
    {
        Some(Ok(node_id)) => node_id,
        Some(Err(error)) => {
            tracing::warn!(%peer, %error, "cluster peer certificate names no node");
            return;
        }
        None => {
            tracing::warn!(%peer, "cluster peer presented no certificate");
            return;
        }
    };
    tracing::debug!(%peer, peer_node_id, "cluster connection accepted");

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

    let in_flight = Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_PER_CONNECTION));
    let mut requests = JoinSet::new();
    loop {
        let frame = tokio::select! {
            frame = read_frame(&mut reader) => frame,
            Some(_) = requests.join_next(), if !requests.is_empty() => continue,
        };
        let (id, request) = match frame {
            Ok(Some(Frame::Request { id, request })) => (id, request),
            Ok(Some(_)) => {
                tracing::warn!(%peer, peer_node_id, "cluster peer sent a reply to the listener");
                break;
            }
            Ok(None) => break,
            Err(error) => {
                tracing::warn!(%peer, peer_node_id, %error, "cluster connection read failed");
                break;
            }
        };
        if let Request::Raft(message) = &request
            && message.source_node_id != peer_node_id
        {
            tracing::warn!(
                %peer,
                peer_node_id,
                claimed_node_id = message.source_node_id,
                "raft message refused: its source is not the authenticated node"
            );
            let failure = RemoteFailure::Refused {
                message: format!(
                    "the raft message claims to come from node {} but the connection is authenticated as node {peer_node_id}",
                    message.source_node_id
                ),
            };
            if let Ok(bytes) = (Frame::Error { id, failure }).encode() {
                let _ = replies.send(bytes).await;
            }
            break;
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let store = store.clone();
        let replies = replies.clone();
        requests.spawn(async move {
            let frame = handle_request(&store, id, request).await;
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

async fn handle_request(store: &Store, id: u64, request: Request) -> Frame {
    let result: std::result::Result<Vec<u8>, RemoteFailure> = match request {
        Request::Raft(message) => store
            .handle_raft_message(message)
            .await
            .map_err(|error| RemoteFailure::from_store(&error)),
        Request::Transaction(transaction) => match store.transaction(transaction).await {
            Ok(outcome) => serde_json::to_vec(&outcome).map_err(|error| RemoteFailure::Failed {
                message: error.to_string(),
            }),
            Err(error) => Err(RemoteFailure::from_store(&error)),
        },
        Request::ReadIndex => store
            .read_index()
            .await
            .map(|index| index.to_be_bytes().to_vec())
            .map_err(|error| RemoteFailure::from_store(&error)),
    };
    match result {
        Ok(body) => Frame::Reply { id, body },
        Err(failure) => Frame::Error { id, failure },
    }
}
