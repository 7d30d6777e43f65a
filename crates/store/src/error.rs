//! The store's error type: every failure a caller of [`crate::Store`] can see.
//!
//! Messages are written for an operator: they name what failed and say what to do. openraft's
//! own error types never leave this crate; they are mapped here into plain variants.

use std::path::PathBuf;
use std::time::Duration;

/// Where a request should go instead, when this node is not the leader.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaderHint {
    /// Raft node id of the node this node believes is the leader.
    pub node_id: u64,
    /// Address of that node, as it was given to `add_learner` or `StoreConfig::node_address`.
    pub address: Option<String>,
}

/// An error returned by the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The request must be served by the leader and this node is not it.
    #[error(
        "this node is not the raft leader (leader: {}); send the request to the leader",
        leader_hint.as_ref().map_or_else(|| "unknown, an election may be running".to_string(), |hint| format!("node {} at {}", hint.node_id, hint.address.as_deref().unwrap_or("unknown address")))
    )]
    NotLeader {
        /// The leader as this node knows it, if it knows one.
        leader_hint: Option<LeaderHint>,
    },

    /// A transaction's condition did not hold; nothing was written.
    #[error("condition {condition} failed (key {key:?}: {actual}); re-read the key and retry")]
    ConditionFailed {
        /// The key the failed condition is about.
        key: String,
        /// The condition, in words.
        condition: String,
        /// What the store found instead, in words.
        actual: String,
    },

    /// A key or value was refused before it reached the log.
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey {
        /// The key as given.
        key: String,
        /// Why it was refused.
        reason: String,
    },

    /// A value is larger than the store accepts.
    #[error(
        "value for key {key:?} is {size} bytes, more than the limit of {limit} bytes; store large data outside the store and keep a reference"
    )]
    ValueTooLarge {
        /// The key being written.
        key: String,
        /// Size of the value.
        size: usize,
        /// The limit.
        limit: usize,
    },

    /// The on-disk store was written by a newer NovaCron.
    #[error(
        "store at {path} has format version {found}, this build supports up to {supported}; upgrade novacron or restore a backup written by this version"
    )]
    FormatVersion {
        /// The database file.
        path: PathBuf,
        /// Version found on disk.
        found: u64,
        /// Highest version this build understands.
        supported: u64,
    },

    /// Another process (or another `Store` in this process) holds the data directory.
    #[error(
        "store database {path} is already open by another process; stop the other novacron serve using this data directory or choose another --data-dir"
    )]
    AlreadyOpen {
        /// The database file.
        path: PathBuf,
    },

    /// Reading or writing the database failed.
    #[error(
        "store storage failed while {action} ({path}); check the disk (space, permissions, errors in the kernel log)"
    )]
    Storage {
        /// What the store was doing.
        action: String,
        /// The database file or data directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The store was shut down (or is shutting down) and no longer serves requests.
    #[error("the store is shutting down; retry against a running node")]
    ShuttingDown,

    /// A request did not complete in time.
    #[error(
        "{operation} did not complete within {timeout:?}; the cluster may have lost its quorum: check that a majority of voters is running and reachable (a write that timed out may still be applied: re-read before retrying)"
    )]
    Timeout {
        /// The operation that timed out.
        operation: String,
        /// How long it waited.
        timeout: Duration,
    },

    /// The leader could not confirm its leadership with a quorum of voters.
    #[error(
        "the leader could not reach a quorum of voters ({message}); check that a majority of voters is running and reachable"
    )]
    NoQuorum {
        /// Details from raft.
        message: String,
    },

    /// A membership change was refused.
    #[error("membership change refused: {message}")]
    Membership {
        /// Why it was refused.
        message: String,
    },

    /// A watch fell further behind than the kept history; the changes it missed are gone.
    #[error(
        "watch on prefix {prefix:?} fell behind the kept change history and missed changes; list the prefix again and watch from the listed revision + 1"
    )]
    WatchLagged {
        /// The watched prefix.
        prefix: String,
    },

    /// A watch asked for changes that are no longer kept.
    #[error(
        "changes before revision {compacted_revision} are no longer kept (watch asked from {requested}); list the prefix again and watch from the listed revision + 1"
    )]
    Compacted {
        /// The revision the watch asked to start from.
        requested: u64,
        /// The oldest revision still available is `compacted_revision + 1`.
        compacted_revision: u64,
    },

    /// The state was replaced by a snapshot from the leader while a watch was open.
    #[error(
        "watch on prefix {prefix:?} was reset because this node installed a snapshot; list the prefix again and watch from the listed revision + 1"
    )]
    WatchReset {
        /// The watched prefix.
        prefix: String,
    },

    /// A raft message from a peer could not be decoded.
    #[error("invalid raft message ({kind}) from a peer: {message}")]
    InvalidRaftMessage {
        /// Which message kind.
        kind: String,
        /// What was wrong.
        message: String,
    },

    /// The store configuration is invalid.
    #[error("invalid store configuration: {message}")]
    Config {
        /// What is wrong.
        message: String,
    },

    /// Raft stopped or failed in a way not covered above.
    #[error("raft failed: {message}")]
    Raft {
        /// Details from raft.
        message: String,
    },
}

impl StoreError {
    pub(crate) fn storage(
        action: impl Into<String>,
        path: impl Into<PathBuf>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StoreError::Storage {
            action: action.into(),
            path: path.into(),
            source: Box::new(source),
        }
    }

    /// Whether retrying the same request on another node (the leader) may succeed.
    pub fn is_not_leader(&self) -> bool {
        matches!(self, StoreError::NotLeader { .. })
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
