//! The scratch keyspace: plain keys in the region's store, read and written through the same
//! path as every record (writes and reads through the leader). It exists so that the store's
//! guarantees can be checked from outside a running region (the linearizability test records
//! a history of these calls under faults) and for diagnostics. `serve --scratch-keys` turns it
//! on; it is off by default and never holds NovaCron's own records.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Longest scratch key, in bytes.
pub const SCRATCH_KEY_MAX: usize = 200;
/// Largest scratch value, in bytes.
pub const SCRATCH_VALUE_MAX: usize = 64 * 1024;

/// A scratch key with its value and revisions (as the store keeps them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ScratchValue {
    /// The value (UTF-8 text).
    pub value: String,
    /// Revision of the write that created the key.
    pub create_revision: u64,
    /// Revision of the write that last changed it.
    pub mod_revision: u64,
    /// Writes since it was created (1 after the create).
    pub version: u64,
}

/// `GET /api/v1/scratch/{key}`: a linearizable read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ScratchRead {
    /// The key's value; null when it does not exist.
    pub value: Option<ScratchValue>,
}

/// A condition on the key of a scratch write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", tag = "condition")]
pub enum ScratchCondition {
    /// The key does not exist.
    Absent,
    /// The key exists.
    Exists,
    /// The key was last changed at exactly this revision (compare-and-swap).
    ModRevision { mod_revision: u64 },
}

/// `POST /api/v1/scratch/{key}`: one transaction on one key. The change applies when every
/// condition holds: `put` sets the value, otherwise `delete` removes the key.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct ScratchWrite {
    #[serde(default)]
    pub conditions: Vec<ScratchCondition>,
    #[serde(default)]
    pub put: Option<String>,
    #[serde(default)]
    pub delete: bool,
}

/// What a scratch write did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ScratchOutcome {
    /// Whether every condition held (and the change was applied).
    pub succeeded: bool,
    /// The store's revision after the write.
    pub revision: u64,
    /// Keys the write deleted (0 or 1).
    pub deleted_keys: u64,
    /// When it did not succeed: the index of the first condition that failed.
    pub failed_condition: Option<usize>,
    /// When it did not succeed: the key's `mod_revision` then (null: absent).
    pub actual_mod_revision: Option<u64>,
}
