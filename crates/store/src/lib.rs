//! NovaCron's replicated key-value store: the one place desired state lives.
//!
//! A [`Store`] is one node of a raft group (openraft) whose log lives in append-only segment
//! files and whose state machine lives in a redb database, both in the node's data directory. The state machine is a revisioned key-value map
//! like etcd's: UTF-8 keys with `/` namespaces (`vms/NAME`, `images/ID`), byte values (the rest
//! of NovaCron stores JSON records), a global revision bumped by every change, and per key a
//! `create_revision`, `mod_revision` and `version`. Writes are [`Transaction`]s (conditions, then
//! operations applied atomically); reads are linearizable (raft read-index) or local; watches
//! stream the changes under a prefix from a revision.
//!
//! openraft stays inside this crate: callers see [`Store`], the [`kv`] types, [`StoreMetrics`]
//! and the [`RaftTransport`] seam that a network layer implements.

pub mod error;
pub mod kv;
mod log_files;
pub mod network;
mod raft_types;
mod records;
mod storage;
mod store;
pub mod timers;
mod watch;

pub use error::{LeaderHint, Result, StoreError};
pub use kv::{
    Condition, Consistency, FailedCondition, KeyValue, Listing, Operation, Transaction,
    TransactionOutcome, WatchEvent,
};
pub use network::{
    InProcessTransport, RaftMessage, RaftMessageKind, RaftTarget, RaftTransport, TransportError,
};
pub use storage::{DATABASE_FILE_NAME, FORMAT_VERSION, MAX_APPEND_ENTRIES_BYTES};
pub use store::{
    Bootstrap, ClusterMembership, NodeRole, RaftTiming, Store, StoreConfig, StoreMetrics,
};
pub use watch::Watcher;
