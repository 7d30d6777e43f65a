//! Errors of the placement core. A refusal (no host fits) is not an error: it is a
//! [`crate::Placement::Refusal`] with its reasons. These are for input that makes no sense.

/// Input the placement core refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// Two hosts share an id.
    #[error("host id {id} appears twice (hosts {first:?} and {second:?}); host ids must be unique")]
    DuplicateHost {
        /// The id.
        id: u64,
        /// Name of the first host with it.
        first: String,
        /// Name of the second.
        second: String,
    },
    /// A VM or a pinned request names a host the snapshot does not have.
    #[error("no host with id {id} in the snapshot")]
    UnknownHost {
        /// The id.
        id: u64,
    },
    /// A VM id that is not (or no longer) in the snapshot.
    #[error("no VM with id {id} in the snapshot")]
    UnknownVm {
        /// The id.
        id: u64,
    },
    /// A host description that cannot be right.
    #[error("invalid host {name:?}: {reason}")]
    InvalidHost {
        /// The host's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A request that cannot be placed on any cluster (zero resources).
    #[error("invalid placement request: {reason}")]
    InvalidRequest {
        /// What is wrong.
        reason: String,
    },
    /// A policy with a ratio or weight out of range.
    #[error("invalid placement policy: {reason}")]
    InvalidPolicy {
        /// What is wrong.
        reason: String,
    },
}
