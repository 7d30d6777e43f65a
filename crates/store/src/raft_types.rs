//! The openraft type configuration of the store. openraft types stay inside this crate: the
//! public API speaks in [`crate::kv`] types and plain integers.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::kv::{Transaction, TransactionOutcome};

/// Raft node id: a plain `u64` in NovaCron's API.
pub(crate) type NodeId = u64;
/// What raft knows of a node: its address.
pub(crate) type Node = openraft::BasicNode;

/// One raft log entry's payload: transactions proposed together (group commit). They are
/// applied in order, each with its own revision, exactly as if proposed one by one.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub(crate) struct WriteBatch {
    pub transactions: Vec<Transaction>,
}

/// The outcomes of a [`WriteBatch`], one per transaction, in order. Entries without
/// transactions (blank, membership) answer with an empty list.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub(crate) struct BatchOutcome {
    pub outcomes: Vec<TransactionOutcome>,
}

openraft::declare_raft_types!(
    /// The store's raft: transaction batches in the log, their outcomes as responses,
    /// snapshots as byte streams.
    pub(crate) TypeConfig:
        D = WriteBatch,
        R = BatchOutcome,
        NodeId = NodeId,
        Node = Node,
        SnapshotData = Cursor<Vec<u8>>,
);
