//! The openraft type configuration of the store. openraft types stay inside this crate: the
//! public API speaks in [`crate::kv`] types and plain integers.

use std::io::Cursor;

use crate::kv::{Transaction, TransactionOutcome};

/// Raft node id: a plain `u64` in NovaCron's API.
pub(crate) type NodeId = u64;
/// What raft knows of a node: its address.
pub(crate) type Node = openraft::BasicNode;

openraft::declare_raft_types!(
    /// The store's raft: transactions in the log, their outcomes as responses, snapshots as
    /// byte streams.
    pub(crate) TypeConfig:
        D = Transaction,
        R = TransactionOutcome,
        NodeId = NodeId,
        Node = Node,
        SnapshotData = Cursor<Vec<u8>>,
);
