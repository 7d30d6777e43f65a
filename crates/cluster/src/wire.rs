//! The on-wire format of the cluster channel (sans-IO): length-prefixed, versioned frames that
//! carry requests and their replies, matched by a request id so that one connection carries many
//! requests at once.
//!
//! ```text
//! u32 length of what follows (big endian) | u8 wire version | u8 frame kind | u64 request id | payload
//! ```
//!
//! Kinds and payloads (format version [`WIRE_VERSION`]; a change is a `data-change:` commit):
//! - `RAFT` (1): `u8 raft message kind | u64 source node id | raft body` (the store's JSON).
//! - `TRANSACTION` (2): a forwarded write, the JSON of a [`Transaction`].
//! - `READ_INDEX` (3): empty; asks the leader for a read index.
//! - `JOIN` (4): the JSON of a [`JoinRequest`]; the only request accepted from a peer without a
//!   client certificate. Replied with the JSON of a [`crate::join::JoinGrant`].
//! - `ADD_LEARNER` (5): `u64 node id`; adds an admitted host to raft as a learner (leader).
//! - `REMOVE_HOST` (6): `u64 node id`; removes a host from raft and its record (leader).
//! - `REPLY` (128): the reply bytes (raft reply body, JSON outcome, or a u64 read index).
//! - `ERROR` (129): the JSON of a [`RemoteFailure`].

use crate::join::JoinRequest;
use novacron_store::{LeaderHint, RaftMessage, RaftMessageKind, StoreError, Transaction};
use serde::{Deserialize, Serialize};

/// Version byte of every frame. Peers with another version are refused.
pub const WIRE_VERSION: u8 = 1;
/// Largest frame accepted (a raft append with many large entries, or a snapshot chunk).
pub const MAX_FRAME_BYTES: usize = 256 * 1024 * 1024;
/// Bytes of the header after the length prefix.
pub(crate) const HEADER_BYTES: usize = 1 + 1 + 8;

const KIND_RAFT: u8 = 1;
const KIND_TRANSACTION: u8 = 2;
const KIND_READ_INDEX: u8 = 3;
const KIND_JOIN: u8 = 4;
const KIND_ADD_LEARNER: u8 = 5;
const KIND_REMOVE_HOST: u8 = 6;
const KIND_REPLY: u8 = 128;
const KIND_ERROR: u8 = 129;

/// A request from one host to another.
#[derive(Debug, Clone)]
pub(crate) enum Request {
    /// A raft RPC.
    Raft(RaftMessage),
    /// A write forwarded to the leader.
    Transaction(Transaction),
    /// A linearizable read's read index, asked of the leader.
    ReadIndex,
    /// A host asking to be admitted (unauthenticated connection).
    Join(JoinRequest),
    /// Add an admitted host as a learner.
    AddLearner { node_id: u64 },
    /// Remove a host from the membership (voter: demoted first) and forget it.
    RemoveHost { node_id: u64 },
}

impl Request {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Request::Raft(message) => match message.kind {
                RaftMessageKind::AppendEntries => "raft append-entries",
                RaftMessageKind::Vote => "raft vote",
                RaftMessageKind::InstallSnapshot => "raft install-snapshot",
            },
            Request::Transaction(_) => "forwarded transaction",
            Request::ReadIndex => "read index",
            Request::Join(_) => "join",
            Request::AddLearner { .. } => "add learner",
            Request::RemoveHost { .. } => "remove host",
        }
    }
}

/// Why a peer did not serve a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "failure", rename_all = "snake_case")]
pub enum RemoteFailure {
    /// The peer is not the leader.
    #[error("not the leader")]
    NotLeader {
        /// The leader the peer knows of.
        leader_hint: Option<LeaderHint>,
    },
    /// The peer's store is shutting down.
    #[error("the peer is shutting down")]
    ShuttingDown,
    /// The leader could not reach a quorum.
    #[error("no quorum: {message}")]
    NoQuorum {
        /// Details.
        message: String,
    },
    /// The peer's store timed out.
    #[error("{operation} timed out after {timeout_ms} ms on the peer")]
    Timeout {
        /// What timed out.
        operation: String,
        /// After how long.
        timeout_ms: u64,
    },
    /// The request was refused (authentication, malformed request).
    #[error("refused: {message}")]
    Refused {
        /// Why.
        message: String,
    },
    /// Any other failure of the peer's store.
    #[error("{message}")]
    Failed {
        /// The peer's error message.
        message: String,
    },
}

impl RemoteFailure {
    pub(crate) fn from_store(error: &StoreError) -> RemoteFailure {
        match error {
            StoreError::NotLeader { leader_hint } => RemoteFailure::NotLeader {
                leader_hint: leader_hint.clone(),
            },
            StoreError::ShuttingDown => RemoteFailure::ShuttingDown,
            StoreError::NoQuorum { message } => RemoteFailure::NoQuorum {
                message: message.clone(),
            },
            StoreError::Timeout { operation, timeout } => RemoteFailure::Timeout {
                operation: operation.clone(),
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            },
            StoreError::InvalidRaftMessage { .. } => RemoteFailure::Refused {
                message: error.to_string(),
            },
            other => RemoteFailure::Failed {
                message: other.to_string(),
            },
        }
    }
}

/// A frame: a request or a reply, with its request id.
#[derive(Debug, Clone)]
pub(crate) enum Frame {
    Request { id: u64, request: Request },
    Reply { id: u64, body: Vec<u8> },
    Error { id: u64, failure: RemoteFailure },
}

/// A frame that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The peer speaks another version of the format.
    #[error(
        "peer speaks cluster wire version {found}, this host {supported}; run the same novacron version on every host"
    )]
    Version {
        /// The version found.
        found: u8,
        /// The version this build speaks.
        supported: u8,
    },
    /// The frame is larger than [`MAX_FRAME_BYTES`] or smaller than its header.
    #[error("frame length {length} outside 10..={MAX_FRAME_BYTES}")]
    Length {
        /// The announced length.
        length: usize,
    },
    /// The frame's content is malformed.
    #[error("malformed frame: {reason}")]
    Malformed {
        /// What is wrong.
        reason: String,
    },
}

fn malformed(reason: impl Into<String>) -> WireError {
    WireError::Malformed {
        reason: reason.into(),
    }
}

fn raft_kind_byte(kind: RaftMessageKind) -> u8 {
    match kind {
        RaftMessageKind::AppendEntries => 1,
        RaftMessageKind::Vote => 2,
        RaftMessageKind::InstallSnapshot => 3,
    }
}

fn raft_kind_from_byte(byte: u8) -> Result<RaftMessageKind, WireError> {
    match byte {
        1 => Ok(RaftMessageKind::AppendEntries),
        2 => Ok(RaftMessageKind::Vote),
        3 => Ok(RaftMessageKind::InstallSnapshot),
        other => Err(malformed(format!("unknown raft message kind {other}"))),
    }
}

impl Frame {
    /// The frame's request id.
    pub(crate) fn id(&self) -> u64 {
        match self {
            Frame::Request { id, .. } | Frame::Reply { id, .. } | Frame::Error { id, .. } => *id,
        }
    }

    /// The whole frame, length prefix included.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, WireError> {
        let (kind, payload): (u8, Vec<u8>) = match self {
            Frame::Request { request, .. } => match request {
                Request::Raft(message) => {
                    let mut payload = Vec::with_capacity(9 + message.body.len());
                    payload.push(raft_kind_byte(message.kind));
                    payload.extend_from_slice(&message.source_node_id.to_be_bytes());
                    payload.extend_from_slice(&message.body);
                    (KIND_RAFT, payload)
                }
                Request::Transaction(transaction) => (
                    KIND_TRANSACTION,
                    serde_json::to_vec(transaction)
                        .map_err(|error| malformed(error.to_string()))?,
                ),
                Request::ReadIndex => (KIND_READ_INDEX, Vec::new()),
                Request::Join(join) => (
                    KIND_JOIN,
                    serde_json::to_vec(join).map_err(|error| malformed(error.to_string()))?,
                ),
                Request::AddLearner { node_id } => {
                    (KIND_ADD_LEARNER, node_id.to_be_bytes().to_vec())
                }
                Request::RemoveHost { node_id } => {
                    (KIND_REMOVE_HOST, node_id.to_be_bytes().to_vec())
                }
            },
            Frame::Reply { body, .. } => (KIND_REPLY, body.clone()),
            Frame::Error { failure, .. } => (
                KIND_ERROR,
                serde_json::to_vec(failure).map_err(|error| malformed(error.to_string()))?,
            ),
        };
        let length = HEADER_BYTES + payload.len();
        if length > MAX_FRAME_BYTES {
            return Err(WireError::Length { length });
        }
        let mut bytes = Vec::with_capacity(4 + length);
        bytes.extend_from_slice(&u32::try_from(length).unwrap_or(u32::MAX).to_be_bytes());
        bytes.push(WIRE_VERSION);
        bytes.push(kind);
        bytes.extend_from_slice(&self.id().to_be_bytes());
        bytes.extend_from_slice(&payload);
        Ok(bytes)
    }

    /// Checks a length prefix before the frame is read.
    pub(crate) fn check_length(length: u32) -> Result<usize, WireError> {
        let length = length as usize;
        if !(HEADER_BYTES..=MAX_FRAME_BYTES).contains(&length) {
            return Err(WireError::Length { length });
        }
        Ok(length)
    }

    /// Decodes a frame from what follows its length prefix.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Frame, WireError> {
        if bytes.len() < HEADER_BYTES {
            return Err(WireError::Length {
                length: bytes.len(),
            });
        }
        if bytes[0] != WIRE_VERSION {
            return Err(WireError::Version {
                found: bytes[0],
                supported: WIRE_VERSION,
            });
        }
        let kind = bytes[1];
        let mut id_bytes = [0u8; 8];
        id_bytes.copy_from_slice(&bytes[2..10]);
        let id = u64::from_be_bytes(id_bytes);
        let payload = &bytes[HEADER_BYTES..];
        let frame = match kind {
            KIND_RAFT => {
                if payload.len() < 9 {
                    return Err(malformed("raft request shorter than its header"));
                }
                let kind = raft_kind_from_byte(payload[0])?;
                let mut source = [0u8; 8];
                source.copy_from_slice(&payload[1..9]);
                Frame::Request {
                    id,
                    request: Request::Raft(RaftMessage {
                        kind,
                        source_node_id: u64::from_be_bytes(source),
                        body: payload[9..].to_vec(),
                    }),
                }
            }
            KIND_TRANSACTION => Frame::Request {
                id,
                request: Request::Transaction(
                    serde_json::from_slice(payload)
                        .map_err(|error| malformed(format!("transaction: {error}")))?,
                ),
            },
            KIND_READ_INDEX => {
                if !payload.is_empty() {
                    return Err(malformed("read index request with a payload"));
                }
                Frame::Request {
                    id,
                    request: Request::ReadIndex,
                }
            }
            KIND_JOIN => Frame::Request {
                id,
                request: Request::Join(
                    serde_json::from_slice(payload)
                        .map_err(|error| malformed(format!("join request: {error}")))?,
                ),
            },
            KIND_ADD_LEARNER | KIND_REMOVE_HOST => {
                let node_id: [u8; 8] = payload
                    .try_into()
                    .map_err(|_| malformed("membership request is not 8 bytes"))?;
                let node_id = u64::from_be_bytes(node_id);
                Frame::Request {
                    id,
                    request: if kind == KIND_ADD_LEARNER {
                        Request::AddLearner { node_id }
                    } else {
                        Request::RemoveHost { node_id }
                    },
                }
            }
            KIND_REPLY => Frame::Reply {
                id,
                body: payload.to_vec(),
            },
            KIND_ERROR => Frame::Error {
                id,
                failure: serde_json::from_slice(payload)
                    .map_err(|error| malformed(format!("error reply: {error}")))?,
            },
            other => return Err(malformed(format!("unknown frame kind {other}"))),
        };
        Ok(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(frame: &Frame) -> Frame {
        let bytes = frame.encode().expect("encode");
        let length = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        assert_eq!(
            Frame::check_length(length).expect("length") + 4,
            bytes.len()
        );
        Frame::decode(&bytes[4..]).expect("decode")
    }

    #[test]
    fn every_frame_kind_round_trips() {
        let raft = Frame::Request {
            id: 7,
            request: Request::Raft(RaftMessage {
                kind: RaftMessageKind::Vote,
                source_node_id: 3,
                body: b"{\"x\":1}".to_vec(),
            }),
        };
        match round_trip(&raft) {
            Frame::Request {
                id: 7,
                request: Request::Raft(message),
            } => {
                assert_eq!(message.kind, RaftMessageKind::Vote);
                assert_eq!(message.source_node_id, 3);
                assert_eq!(message.body, b"{\"x\":1}");
            }
            other => panic!("unexpected {other:?}"),
        }
        let transaction = Transaction::new()
            .when_absent("a/b")
            .put("a/b", b"v".to_vec());
        match round_trip(&Frame::Request {
            id: u64::MAX,
            request: Request::Transaction(transaction.clone()),
        }) {
            Frame::Request {
                id: u64::MAX,
                request: Request::Transaction(decoded),
            } => assert_eq!(decoded, transaction),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            round_trip(&Frame::Request {
                id: 1,
                request: Request::ReadIndex
            }),
            Frame::Request {
                id: 1,
                request: Request::ReadIndex
            }
        ));
        match round_trip(&Frame::Request {
            id: 5,
            request: Request::AddLearner { node_id: 42 },
        }) {
            Frame::Request {
                id: 5,
                request: Request::AddLearner { node_id: 42 },
            } => {}
            other => panic!("unexpected {other:?}"),
        }
        let join = JoinRequest {
            token: "t".into(),
            csr_pem: "c".into(),
            host_name: "h".into(),
            raft_address: "127.0.0.1:1".into(),
        };
        match round_trip(&Frame::Request {
            id: 6,
            request: Request::Join(join),
        }) {
            Frame::Request {
                id: 6,
                request: Request::Join(decoded),
            } => assert_eq!(decoded.host_name, "h"),
            other => panic!("unexpected {other:?}"),
        }
        match round_trip(&Frame::Reply {
            id: 2,
            body: vec![1, 2, 3],
        }) {
            Frame::Reply { id: 2, body } => assert_eq!(body, vec![1, 2, 3]),
            other => panic!("unexpected {other:?}"),
        }
        let failure = RemoteFailure::NotLeader {
            leader_hint: Some(LeaderHint {
                node_id: 4,
                address: Some("127.0.0.1:1".into()),
            }),
        };
        match round_trip(&Frame::Error {
            id: 3,
            failure: failure.clone(),
        }) {
            Frame::Error {
                id: 3,
                failure: decoded,
            } => assert_eq!(decoded, failure),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        assert!(matches!(
            Frame::check_length(3),
            Err(WireError::Length { length: 3 })
        ));
        assert!(Frame::check_length(u32::MAX).is_err());
        let mut bytes = Frame::Request {
            id: 1,
            request: Request::ReadIndex,
        }
        .encode()
        .expect("encode");
        bytes[4] = 9;
        assert!(matches!(
            Frame::decode(&bytes[4..]),
            Err(WireError::Version { found: 9, .. })
        ));
        let error = WireError::Version {
            found: 9,
            supported: WIRE_VERSION,
        };
        assert!(error.to_string().contains("same novacron version"));
        for garbage in [
            vec![WIRE_VERSION, 77, 0, 0, 0, 0, 0, 0, 0, 0],
            vec![WIRE_VERSION, KIND_RAFT, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            vec![
                WIRE_VERSION,
                KIND_RAFT,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                9,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
            ],
            vec![WIRE_VERSION, KIND_TRANSACTION, 0, 0, 0, 0, 0, 0, 0, 0, b'{'],
            vec![WIRE_VERSION, KIND_ERROR, 0, 0, 0, 0, 0, 0, 0, 0, b'1'],
            vec![WIRE_VERSION, KIND_READ_INDEX, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            vec![WIRE_VERSION, KIND_REPLY],
            vec![WIRE_VERSION, KIND_ADD_LEARNER, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            vec![WIRE_VERSION, KIND_JOIN, 0, 0, 0, 0, 0, 0, 0, 0, b'['],
        ] {
            assert!(Frame::decode(&garbage).is_err(), "{garbage:?}");
        }
    }
}
