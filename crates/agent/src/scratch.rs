//! The scratch keyspace (`serve --scratch-keys`): single-key reads and conditional writes under
//! `scratch/` in the store, through the same routing as every record. See
//! [`novacron_types::scratch`].

use crate::AgentError;
use crate::host::Host;
use novacron_store::{Consistency, Transaction};
use novacron_types::scratch::{SCRATCH_KEY_MAX, SCRATCH_VALUE_MAX};
use novacron_types::{
    ErrorCode, ScratchCondition, ScratchOutcome, ScratchRead, ScratchValue, ScratchWrite,
};

const SCRATCH_PREFIX: &str = "scratch/";

impl Host {
    /// A linearizable read of one scratch key.
    pub async fn scratch_get(&self, key: &str) -> Result<ScratchRead, AgentError> {
        let key = self.scratch_key(key)?;
        let item = self
            .shared
            .records
            .store_routed()
            .get(&key, Consistency::Linearizable)
            .await?;
        Ok(ScratchRead {
            value: item.map(|item| ScratchValue {
                value: String::from_utf8_lossy(&item.value).into_owned(),
                create_revision: item.create_revision,
                mod_revision: item.mod_revision,
                version: item.version,
            }),
        })
    }

    /// One conditional write of one scratch key.
    pub async fn scratch_write(
        &self,
        key: &str,
        write: ScratchWrite,
    ) -> Result<ScratchOutcome, AgentError> {
        let key = self.scratch_key(key)?;
        let mut transaction = Transaction::new();
        for condition in write.conditions {
            transaction = match condition {
                ScratchCondition::Absent => transaction.when_absent(key.clone()),
                ScratchCondition::Exists => transaction.when_exists(key.clone()),
                ScratchCondition::ModRevision { mod_revision } => {
                    transaction.when_mod_revision(key.clone(), mod_revision)
                }
            };
        }
        transaction = match (write.put, write.delete) {
            (Some(value), false) => {
                if value.len() > SCRATCH_VALUE_MAX {
                    return Err(AgentError::InvalidArgument(format!(
                        "a scratch value is at most {SCRATCH_VALUE_MAX} bytes"
                    )));
                }
                transaction.put(key.clone(), value.into_bytes())
            }
            (None, true) => transaction.delete(key.clone()),
            _ => {
                return Err(AgentError::InvalidArgument(
                    "a scratch write needs exactly one of put (a value) and delete".into(),
                ));
            }
        };
        let outcome = self
            .shared
            .records
            .store_routed()
            .transaction(transaction)
            .await?;
        let failed = outcome.failed_condition;
        Ok(ScratchOutcome {
            succeeded: outcome.succeeded,
            revision: outcome.revision,
            deleted_keys: outcome.deleted_keys,
            failed_condition: failed.as_ref().map(|failed| failed.index),
            actual_mod_revision: failed.and_then(|failed| failed.actual_mod_revision),
        })
    }

    /// The store key of a scratch key, after checking that scratch keys are on and the key is
    /// letters, digits, '-', '_' and '.' (it is one path segment of the URL).
    fn scratch_key(&self, key: &str) -> Result<String, AgentError> {
        if !self.shared.config.scratch_keys {
            return Err(AgentError::Cluster {
                code: ErrorCode::NotFound,
                message: "the scratch keyspace is off on this host; start `novacron serve` with \
                          --scratch-keys to use it"
                    .into(),
            });
        }
        if key.is_empty()
            || key.len() > SCRATCH_KEY_MAX
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(AgentError::InvalidArgument(format!(
                "scratch key {key:?}: use 1 to {SCRATCH_KEY_MAX} letters, digits, '-', '_' and '.'"
            )));
        }
        Ok(format!("{SCRATCH_PREFIX}{key}"))
    }
}
