//! The seam between raft and the network: [`RaftTransport`] carries opaque raft messages between
//! nodes; this crate encodes and decodes them.
//!
//! A transport (mTLS between hosts in a later issue, [`InProcessTransport`] in tests) only moves
//! bytes: `send` delivers a [`RaftMessage`] to the target node, whose side hands it to
//! [`crate::Store::handle_raft_message`] and returns the reply bytes. Neither side names an
//! openraft type. Messages are JSON (format version [`RAFT_MESSAGE_FORMAT_VERSION`]); a change of
//! their layout is a `data-change:` commit.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};

use futures::FutureExt;
use futures::future::BoxFuture;
use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{RaftNetwork, RaftNetworkFactory};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::raft_types::{Node, NodeId, TypeConfig};
use crate::store::{Store, StoreInner};

/// Version of the raft message encoding. Peers with a different version must not talk.
pub const RAFT_MESSAGE_FORMAT_VERSION: u32 = 1;

/// Which raft RPC a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RaftMessageKind {
    /// Log replication and heartbeats (leader → follower).
    AppendEntries,
    /// Vote requests (candidate → voter).
    Vote,
    /// A chunk of a snapshot (leader → lagging follower).
    InstallSnapshot,
}

impl RaftMessageKind {
    /// A stable name, usable in a URL path.
    pub fn as_str(self) -> &'static str {
        match self {
            RaftMessageKind::AppendEntries => "append-entries",
            RaftMessageKind::Vote => "vote",
            RaftMessageKind::InstallSnapshot => "install-snapshot",
        }
    }

    /// Parses [`Self::as_str`]'s output.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "append-entries" => Some(RaftMessageKind::AppendEntries),
            "vote" => Some(RaftMessageKind::Vote),
            "install-snapshot" => Some(RaftMessageKind::InstallSnapshot),
            _ => None,
        }
    }
}

impl std::fmt::Display for RaftMessageKind {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// One raft message: its kind, its sender and its encoded body.
#[derive(Debug, Clone)]
pub struct RaftMessage {
    /// Which RPC.
    pub kind: RaftMessageKind,
    /// The sending node's id (a transport with authenticated peers should check it).
    pub source_node_id: u64,
    /// The encoded request.
    pub body: Vec<u8>,
}

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftTarget {
    /// The target's raft node id.
    pub node_id: u64,
    /// The target's address, as registered with `add_learner` or `StoreConfig::node_address`.
    pub address: String,
}

/// A failure to deliver a raft message or to get its reply.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The target could not be reached (no connection, node down, partitioned). Raft backs off.
    #[error("raft peer node {node_id} at {address} is unreachable")]
    Unreachable {
        /// Target node.
        node_id: u64,
        /// Target address.
        address: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The message was sent but the exchange failed (reset connection, bad reply).
    #[error("raft message {kind} to node {node_id} at {address} failed")]
    Failed {
        /// Message kind.
        kind: RaftMessageKind,
        /// Target node.
        node_id: u64,
        /// Target address.
        address: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Carries raft messages to other nodes. Implement it for a real network (the later mTLS
/// transport) and pass it in `StoreConfig::transport`.
///
/// `send` delivers `message` to `target` and returns the reply body produced by the target's
/// [`crate::Store::handle_raft_message`]. It should not retry: raft retries with backoff.
pub trait RaftTransport: Send + Sync + 'static {
    /// Sends one message and waits for its reply.
    fn send(
        &self,
        target: RaftTarget,
        message: RaftMessage,
    ) -> BoxFuture<'_, Result<Vec<u8>, TransportError>>;
}

/// The transport of a store that has no peers: every send fails as unreachable.
#[derive(Debug, Default)]
pub(crate) struct NoTransport;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Message(String);

impl RaftTransport for NoTransport {
    fn send(
        &self,
        target: RaftTarget,
        _message: RaftMessage,
    ) -> BoxFuture<'_, Result<Vec<u8>, TransportError>> {
        async move {
            Err(TransportError::Unreachable {
                node_id: target.node_id,
                address: target.address,
                source: Box::new(Message(
                    "this store has no raft transport configured (single node)".into(),
                )),
            })
        }
        .boxed()
    }
}

/// openraft's network factory over a [`RaftTransport`].
pub(crate) struct NetworkFactory {
    pub transport: Arc<dyn RaftTransport>,
    pub source_node_id: NodeId,
    /// Told when a vote this node asked for was refused for an older log.
    pub contact: Arc<crate::timers::LeaderContact>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = NetworkConnection;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Self::Network {
        NetworkConnection {
            transport: self.transport.clone(),
            source_node_id: self.source_node_id,
            contact: self.contact.clone(),
            target: RaftTarget {
                node_id: target,
                address: node.addr.clone(),
            },
        }
    }
}

/// openraft's connection to one peer.
pub(crate) struct NetworkConnection {
    transport: Arc<dyn RaftTransport>,
    source_node_id: NodeId,
    contact: Arc<crate::timers::LeaderContact>,
    target: RaftTarget,
}

impl NetworkConnection {
    async fn call<Request, Response, RemoteFailure, ApiError>(
        &self,
        kind: RaftMessageKind,
        request: &Request,
        option: &RPCOption,
    ) -> Result<Response, RPCError<NodeId, Node, RaftError<NodeId, ApiError>>>
    where
        Request: Serialize,
        Response: DeserializeOwned,
        RemoteFailure: DeserializeOwned + Into<RaftError<NodeId, ApiError>>,
        ApiError: std::error::Error,
    {
        let body = encode_message(request)
            .map_err(|error| RPCError::Network(NetworkError::new(&error)))?;
        let message = RaftMessage {
            kind,
            source_node_id: self.source_node_id,
            body,
        };
        let send = self.transport.send(self.target.clone(), message);
        let reply = match tokio::time::timeout(option.hard_ttl(), send).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(error @ TransportError::Unreachable { .. })) => {
                return Err(RPCError::Unreachable(Unreachable::new(&error)));
            }
            Ok(Err(error)) => return Err(RPCError::Network(NetworkError::new(&error))),
            Err(_) => {
                let error = Message(format!(
                    "raft message {kind} to node {} timed out after {:?}",
                    self.target.node_id,
                    option.hard_ttl()
                ));
                return Err(RPCError::Network(NetworkError::new(&error)));
            }
        };
        let result: Result<Response, RemoteFailure> =
            decode_message(&reply).map_err(|error| RPCError::Network(NetworkError::new(&error)))?;
        result.map_err(|remote| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target.node_id,
                Node::new(self.target.address.clone()),
                remote.into(),
            ))
        })
    }
}

impl RaftNetwork<TypeConfig> for NetworkConnection {
    async fn append_entries(
        &mut self,
        request: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call::<_, _, Fatal<NodeId>, _>(RaftMessageKind::AppendEntries, &request, &option)
            .await
    }

    async fn install_snapshot(
        &mut self,
        request: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call::<_, _, RaftError<NodeId, InstallSnapshotError>, _>(
            RaftMessageKind::InstallSnapshot,
            &SnapshotChunk::from(request),
            &option,
        )
        .await
    }

    async fn vote(
        &mut self,
        request: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let response: VoteResponse<NodeId> = self
            .call::<_, _, Fatal<NodeId>, _>(RaftMessageKind::Vote, &request, &option)
            .await?;
        // A voter with a newer log than ours: it can win, we cannot. Campaigning again first
        // would only keep bumping the term past its campaigns (openraft's own timer delays the
        // next election the same way).
        if !response.vote_granted && response.last_log_id > request.last_log_id {
            self.contact.saw_greater_log();
        }
        Ok(response)
    }
}

/// The wire envelope: a version and the payload.
#[derive(serde::Serialize, serde::Deserialize)]
struct Envelope<T> {
    format_version: u32,
    payload: T,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum MessageCodecError {
    #[error(
        "raft message format version {found}, this node speaks {supported}; run the same novacron version on every host"
    )]
    Version { found: u32, supported: u32 },
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

pub(crate) fn encode_message<T: Serialize>(payload: &T) -> Result<Vec<u8>, MessageCodecError> {
    Ok(serde_json::to_vec(&Envelope {
        format_version: RAFT_MESSAGE_FORMAT_VERSION,
        payload,
    })?)
}

pub(crate) fn decode_message<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, MessageCodecError> {
    #[derive(serde::Deserialize)]
    struct VersionOnly {
        format_version: u32,
    }
    let check_version = |version: u32| {
        if version == RAFT_MESSAGE_FORMAT_VERSION {
            Ok(())
        } else {
            Err(MessageCodecError::Version {
                found: version,
                supported: RAFT_MESSAGE_FORMAT_VERSION,
            })
        }
    };
    match serde_json::from_slice::<Envelope<T>>(bytes) {
        Ok(envelope) => {
            check_version(envelope.format_version)?;
            Ok(envelope.payload)
        }
        Err(error) => {
            // Explain a version mismatch rather than the decoding error it causes.
            if let Ok(version) = serde_json::from_slice::<VersionOnly>(bytes) {
                check_version(version.format_version)?;
            }
            Err(error.into())
        }
    }
}

/// An `InstallSnapshotRequest` on the wire, with its data as base64 rather than a JSON array of
/// numbers.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct SnapshotChunk {
    vote: openraft::Vote<NodeId>,
    meta: openraft::SnapshotMeta<NodeId, Node>,
    offset: u64,
    #[serde(with = "crate::kv::base64_bytes")]
    data: Vec<u8>,
    done: bool,
}

impl From<InstallSnapshotRequest<TypeConfig>> for SnapshotChunk {
    fn from(request: InstallSnapshotRequest<TypeConfig>) -> Self {
        Self {
            vote: request.vote,
            meta: request.meta,
            offset: request.offset,
            data: request.data,
            done: request.done,
        }
    }
}

impl From<SnapshotChunk> for InstallSnapshotRequest<TypeConfig> {
    fn from(chunk: SnapshotChunk) -> Self {
        Self {
            vote: chunk.vote,
            meta: chunk.meta,
            offset: chunk.offset,
            data: chunk.data,
            done: chunk.done,
        }
    }
}

/// A transport between stores in one process, for tests: delivers messages by calling the
/// target store directly, and can cut nodes off to simulate partitions and crashes.
#[derive(Clone, Default)]
pub struct InProcessTransport {
    state: Arc<Mutex<InProcessState>>,
}

#[derive(Default)]
struct InProcessState {
    nodes: HashMap<u64, Weak<StoreInner>>,
    isolated: HashSet<u64>,
}

impl std::fmt::Debug for InProcessTransport {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("InProcessTransport")
    }
}

impl InProcessTransport {
    /// An empty transport.
    pub fn new() -> Self {
        Self::default()
    }

    fn with_state<T>(&self, action: impl FnOnce(&mut InProcessState) -> T) -> T {
        let mut state = match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        };
        action(&mut state)
    }

    /// Makes `store` reachable under its node id (replacing an earlier store of that id).
    pub fn register(&self, store: &Store) {
        let weak = Arc::downgrade(&store.inner);
        self.with_state(|state| state.nodes.insert(store.node_id(), weak));
    }

    /// Cuts a node off: messages to and from it fail as unreachable until [`Self::heal`].
    pub fn isolate(&self, node_id: u64) {
        self.with_state(|state| state.isolated.insert(node_id));
    }

    /// Reconnects an isolated node.
    pub fn heal(&self, node_id: u64) {
        self.with_state(|state| state.isolated.remove(&node_id));
    }
}

impl RaftTransport for InProcessTransport {
    fn send(
        &self,
        target: RaftTarget,
        message: RaftMessage,
    ) -> BoxFuture<'_, Result<Vec<u8>, TransportError>> {
        async move {
            let unreachable = |reason: &str| TransportError::Unreachable {
                node_id: target.node_id,
                address: target.address.clone(),
                source: Box::new(Message(reason.to_string())),
            };
            let inner = self.with_state(|state| {
                if state.isolated.contains(&target.node_id)
                    || state.isolated.contains(&message.source_node_id)
                {
                    return Err(unreachable("node is isolated"));
                }
                state
                    .nodes
                    .get(&target.node_id)
                    .and_then(Weak::upgrade)
                    .ok_or_else(|| unreachable("node is not running"))
            })?;
            let store = Store { inner };
            let kind = message.kind;
            store
                .handle_raft_message(message)
                .await
                .map_err(|error| match error {
                    crate::StoreError::ShuttingDown => unreachable("node is shutting down"),
                    other => TransportError::Failed {
                        kind,
                        node_id: target.node_id,
                        address: target.address.clone(),
                        source: Box::new(other),
                    },
                })
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_kinds_have_stable_names() {
        for kind in [
            RaftMessageKind::AppendEntries,
            RaftMessageKind::Vote,
            RaftMessageKind::InstallSnapshot,
        ] {
            assert_eq!(RaftMessageKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(RaftMessageKind::parse("nope"), None);
    }

    #[test]
    fn messages_of_another_format_version_are_refused_with_a_clear_error() {
        let bytes = br#"{"format_version":99,"payload":{"whatever":1}}"#;
        let error = decode_message::<VoteRequest<NodeId>>(bytes).expect_err("refused");
        assert!(
            matches!(error, MessageCodecError::Version { found: 99, .. }),
            "{error}"
        );
        assert!(
            error.to_string().contains("same novacron version"),
            "{error}"
        );
    }

    #[test]
    fn snapshot_chunks_round_trip_with_base64_data() {
        let request = InstallSnapshotRequest::<TypeConfig> {
            vote: openraft::Vote::new_committed(3, 1),
            meta: openraft::SnapshotMeta::default(),
            offset: 4096,
            data: vec![0, 1, 2, 255, 254],
            done: true,
        };
        let bytes = encode_message(&SnapshotChunk::from(request.clone())).expect("encode");
        let text = String::from_utf8(bytes.clone()).expect("json");
        assert!(text.contains("\"AAEC//4=\""), "{text}");
        let decoded: SnapshotChunk = decode_message(&bytes).expect("decode");
        let back = InstallSnapshotRequest::<TypeConfig>::from(decoded);
        assert_eq!(
            (back.vote, back.offset, back.data, back.done),
            (request.vote, request.offset, request.data, request.done)
        );
    }
}
