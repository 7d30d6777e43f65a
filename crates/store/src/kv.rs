//! The key-value model the rest of NovaCron sees: keys, values, revisions, transactions, reads
//! and watch events.
//!
//! These are plain data types with no IO. A write is always a [`Transaction`]: conditions that
//! must all hold and operations applied atomically when they do. Every transaction that changes
//! at least one key bumps the store's global revision by one; every key carries the revision that
//! created it and the revision that last modified it, as etcd does.

use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 4096;
/// Largest value accepted, in bytes (etcd's default request limit is 1.5 MiB).
pub const MAX_VALUE_BYTES: usize = 4 * 1024 * 1024;

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    /// Confirmed with a quorum (raft read-index) and served after the local state machine has
    /// applied everything committed at the time of the read. Only the leader serves it.
    #[default]
    Linearizable,
    /// Served from this node's state machine as it is, without asking anyone: fast, may be stale
    /// on a follower or a deposed leader.
    Local,
}

/// A condition of a transaction. All conditions must hold for the operations to apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "condition")]
pub enum Condition {
    /// The key does not exist.
    KeyAbsent {
        /// The key.
        key: String,
    },
    /// The key exists.
    KeyExists {
        /// The key.
        key: String,
    },
    /// The key exists and was last modified at exactly this revision (compare-and-swap).
    ModRevisionEquals {
        /// The key.
        key: String,
        /// The expected `mod_revision`.
        mod_revision: u64,
    },
}

impl Condition {
    /// The key this condition is about.
    pub fn key(&self) -> &str {
        match self {
            Condition::KeyAbsent { key }
            | Condition::KeyExists { key }
            | Condition::ModRevisionEquals { key, .. } => key,
        }
    }

    /// The condition in words, for error messages.
    pub fn describe(&self) -> String {
        match self {
            Condition::KeyAbsent { .. } => "key absent".to_string(),
            Condition::KeyExists { .. } => "key exists".to_string(),
            Condition::ModRevisionEquals { mod_revision, .. } => {
                format!("mod_revision == {mod_revision}")
            }
        }
    }

    /// Whether the condition holds given the key's current `mod_revision` (None: absent).
    pub(crate) fn holds(&self, current_mod_revision: Option<u64>) -> bool {
        match self {
            Condition::KeyAbsent { .. } => current_mod_revision.is_none(),
            Condition::KeyExists { .. } => current_mod_revision.is_some(),
            Condition::ModRevisionEquals { mod_revision, .. } => {
                current_mod_revision == Some(*mod_revision)
            }
        }
    }
}

/// One change in a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "operation")]
pub enum Operation {
    /// Create or replace a key.
    Put {
        /// The key.
        key: String,
        /// The new value.
        #[serde(with = "base64_bytes")]
        value: Vec<u8>,
    },
    /// Delete a key (no change if it does not exist).
    Delete {
        /// The key.
        key: String,
    },
    /// Delete every key that starts with the prefix.
    DeletePrefix {
        /// The prefix; must not be empty.
        prefix: String,
    },
}

/// A write request: conditions, then operations applied atomically iff every condition holds.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Transaction {
    /// Conditions, checked in order against the state before the transaction.
    pub conditions: Vec<Condition>,
    /// Operations, applied in order when all conditions hold.
    pub operations: Vec<Operation>,
}

impl Transaction {
    /// An empty transaction.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a condition: the key must not exist.
    pub fn when_absent(mut self, key: impl Into<String>) -> Self {
        self.conditions
            .push(Condition::KeyAbsent { key: key.into() });
        self
    }

    /// Adds a condition: the key must exist.
    pub fn when_exists(mut self, key: impl Into<String>) -> Self {
        self.conditions
            .push(Condition::KeyExists { key: key.into() });
        self
    }

    /// Adds a condition: the key's `mod_revision` must equal `mod_revision`.
    pub fn when_mod_revision(mut self, key: impl Into<String>, mod_revision: u64) -> Self {
        self.conditions.push(Condition::ModRevisionEquals {
            key: key.into(),
            mod_revision,
        });
        self
    }

    /// Adds a put.
    pub fn put(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.operations.push(Operation::Put {
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// Adds a delete.
    pub fn delete(mut self, key: impl Into<String>) -> Self {
        self.operations.push(Operation::Delete { key: key.into() });
        self
    }

    /// Adds a delete of every key under a prefix.
    pub fn delete_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.operations.push(Operation::DeletePrefix {
            prefix: prefix.into(),
        });
        self
    }

    /// Checks keys and values before the transaction is proposed to raft.
    pub fn validate(&self) -> Result<()> {
        for condition in &self.conditions {
            validate_key(condition.key())?;
        }
        for operation in &self.operations {
            match operation {
                Operation::Put { key, value } => {
                    validate_key(key)?;
                    if value.len() > MAX_VALUE_BYTES {
                        return Err(StoreError::ValueTooLarge {
                            key: key.clone(),
                            size: value.len(),
                            limit: MAX_VALUE_BYTES,
                        });
                    }
                }
                Operation::Delete { key } => validate_key(key)?,
                Operation::DeletePrefix { prefix } => validate_key(prefix)?,
            }
        }
        Ok(())
    }
}

/// Checks one key: non-empty, at most [`MAX_KEY_BYTES`], no control characters, no empty
/// `/`-separated segment except a trailing one (so `vms/` works as a prefix).
pub fn validate_key(key: &str) -> Result<()> {
    let refuse = |reason: &str| {
        Err(StoreError::InvalidKey {
            key: key.chars().take(200).collect(),
            reason: reason.to_string(),
        })
    };
    if key.is_empty() {
        return refuse("keys must not be empty");
    }
    if key.len() > MAX_KEY_BYTES {
        return refuse("keys must be at most 4096 bytes");
    }
    if key.chars().any(char::is_control) {
        return refuse("keys must not contain control characters");
    }
    if key.starts_with('/') {
        return refuse("keys must not start with '/' (use namespaces like vms/NAME)");
    }
    if key.contains("//") {
        return refuse("keys must not contain an empty segment ('//')");
    }
    Ok(())
}

/// Which condition of a transaction failed, and what the store found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedCondition {
    /// Index of the condition in [`Transaction::conditions`].
    pub index: usize,
    /// The condition.
    pub condition: Condition,
    /// The key's `mod_revision` at the time (None: the key did not exist).
    pub actual_mod_revision: Option<u64>,
}

impl FailedCondition {
    /// The failure as a [`StoreError::ConditionFailed`].
    pub fn to_error(&self) -> StoreError {
        StoreError::ConditionFailed {
            key: self.condition.key().to_string(),
            condition: self.condition.describe(),
            actual: match self.actual_mod_revision {
                None => "absent".to_string(),
                Some(revision) => format!("exists with mod_revision {revision}"),
            },
        }
    }
}

/// The outcome of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TransactionOutcome {
    /// Whether every condition held and the operations were applied.
    pub succeeded: bool,
    /// The store's revision after the transaction (the transaction's own revision when it
    /// changed something).
    pub revision: u64,
    /// The first condition that did not hold, when `succeeded` is false.
    pub failed_condition: Option<FailedCondition>,
    /// How many keys the operations deleted.
    pub deleted_keys: u64,
}

impl TransactionOutcome {
    /// Turns a failed transaction into [`StoreError::ConditionFailed`].
    pub fn into_result(self) -> Result<Self> {
        match &self.failed_condition {
            Some(failed) if !self.succeeded => Err(failed.to_error()),
            _ => Ok(self),
        }
    }
}

/// A stored key with its value and revisions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value.
    #[serde(with = "base64_bytes")]
    pub value: Vec<u8>,
    /// Revision of the transaction that created the key (since it last did not exist).
    pub create_revision: u64,
    /// Revision of the transaction that last modified it.
    pub mod_revision: u64,
    /// Number of writes since creation (1 after the create).
    pub version: u64,
}

/// The result of listing a prefix: the items and the revision they were read at. Watch from
/// `revision + 1` to follow the prefix without missing or repeating a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    /// The store's revision at the time of the read.
    pub revision: u64,
    /// The keys under the prefix, in byte order of their keys.
    pub items: Vec<KeyValue>,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum WatchEvent {
    /// A key was created or replaced; `key_value.mod_revision` is the change's revision.
    Put {
        /// The key as it is after the change.
        key_value: KeyValue,
    },
    /// A key was deleted at `revision`.
    Delete {
        /// The key.
        key: String,
        /// The revision of the transaction that deleted it.
        revision: u64,
    },
}

impl WatchEvent {
    /// The revision of the transaction this change belongs to.
    pub fn revision(&self) -> u64 {
        match self {
            WatchEvent::Put { key_value } => key_value.mod_revision,
            WatchEvent::Delete { revision, .. } => *revision,
        }
    }

    /// The key that changed.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put { key_value } => &key_value.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }
}

/// Byte vectors as base64 strings in JSON (log entries, wire messages), instead of serde's
/// default array of numbers, which is three to four times larger.
pub(crate) mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated() {
        assert!(validate_key("vms/web-1").is_ok());
        assert!(validate_key("vms/").is_ok());
        assert!(validate_key("").is_err());
        assert!(validate_key("/vms").is_err());
        assert!(validate_key("vms//a").is_err());
        assert!(validate_key("vms/\n").is_err());
        assert!(validate_key(&"k".repeat(MAX_KEY_BYTES + 1)).is_err());
    }

    #[test]
    fn oversized_value_is_refused() {
        let transaction = Transaction::new().put("vms/a", vec![0u8; MAX_VALUE_BYTES + 1]);
        assert!(matches!(
            transaction.validate(),
            Err(StoreError::ValueTooLarge { .. })
        ));
    }

    #[test]
    fn transaction_json_round_trip_uses_base64_values() {
        let transaction = Transaction::new()
            .when_absent("vms/a")
            .put("vms/a", b"{\"name\":\"a\"}".to_vec())
            .delete_prefix("images/");
        let json = serde_json::to_string(&transaction).expect("serialize");
        assert!(json.contains("eyJuYW1lIjoiYSJ9"), "{json}");
        let back: Transaction = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, transaction);
    }
}
