//! Typed access to the records the agent keeps in the store. This is the only module that knows
//! the key layout:
//!
//! ```text
//! vms/<name>            VmRecord (JSON)
//! images/<id>           ImageRecord (JSON)
//! image-names/<name>    the id of the image with that name
//! peers/<fingerprint>   PeerRecord (JSON): a host trusted for transfers, by certificate
//!                       fingerprint (`sha256:<hex>`)
//! host-status/<node id, 20 digits>   HostHeartbeat (JSON): each host's status and capacity
//! migrations/<id>       MigrationRecord (JSON): a live migration's state machine and history
//! cluster/placement-policy   PlacementPolicy (JSON): how the region places VMs (absent: defaults)
//! scratch/<key>         plain values of the scratch keyspace (`serve --scratch-keys`)
//! ```
//!
//! In a region the writes and linearizable reads go through the [`ClusterStore`] (forwarded to
//! the leader), so any host serves any call; on a one-host cluster they go to the local store.
//!
//! Every read-modify-write is a compare-and-swap on the key's `mod_revision`, so the API (which
//! writes desired state) and the reconciler (which writes status) never overwrite each other.

use crate::AgentError;
use novacron_cluster::ClusterStore;
use novacron_store::{Consistency, KeyValue, Listing, Store, Transaction, TransactionOutcome};
use novacron_types::{
    HostHeartbeat, ImageRecord, MigrationRecord, PeerRecord, RECORD_FORMAT_VERSION, VmRecord,
};
use serde::de::DeserializeOwned;

pub const VM_PREFIX: &str = "vms/";
pub const IMAGE_PREFIX: &str = "images/";
pub const IMAGE_NAME_PREFIX: &str = "image-names/";
pub const PEER_PREFIX: &str = "peers/";
pub const HOST_STATUS_PREFIX: &str = "host-status/";
pub const MIGRATION_PREFIX: &str = "migrations/";
pub const PLACEMENT_POLICY_KEY: &str = "cluster/placement-policy";

pub fn migration_key(id: &str) -> String {
    format!("{MIGRATION_PREFIX}{id}")
}

pub fn host_status_key(node_id: u64) -> String {
    format!("{HOST_STATUS_PREFIX}{node_id:020}")
}

pub fn peer_key(fingerprint: &str) -> String {
    format!("{PEER_PREFIX}{fingerprint}")
}

pub fn vm_key(name: &str) -> String {
    format!("{VM_PREFIX}{name}")
}

pub fn image_key(id: &str) -> String {
    format!("{IMAGE_PREFIX}{id}")
}

pub fn image_name_key(name: &str) -> String {
    format!("{IMAGE_NAME_PREFIX}{name}")
}

/// A record with the revision it was read at, for compare-and-swap.
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    pub record: T,
    pub mod_revision: u64,
}

fn decode<T: DeserializeOwned>(key_value: &KeyValue) -> Result<T, AgentError> {
    let version: Option<u32> = serde_json::from_slice::<serde_json::Value>(&key_value.value)
        .ok()
        .and_then(|value| value.get("format_version").and_then(|v| v.as_u64()))
        .and_then(|v| u32::try_from(v).ok());
    if let Some(version) = version
        && version > RECORD_FORMAT_VERSION
    {
        return Err(AgentError::CorruptRecord {
            key: key_value.key.clone(),
            reason: format!(
                "written by a newer NovaCron (record format {version}, this build reads up to \
                 {RECORD_FORMAT_VERSION}); upgrade this host"
            ),
        });
    }
    serde_json::from_slice(&key_value.value).map_err(|error| AgentError::CorruptRecord {
        key: key_value.key.clone(),
        reason: error.to_string(),
    })
}

fn encode<T: serde::Serialize>(record: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail (no maps with non-string keys, no I/O).
    serde_json::to_vec(record).unwrap_or_default()
}

/// Where reads and writes go: the local store alone, or the region's store through the leader.
#[derive(Clone)]
enum Backend {
    Local(Store),
    Region(ClusterStore),
}

/// The store as the records see it: transactions, reads and lists, routed by [`Backend`].
#[derive(Clone)]
pub struct RecordStore {
    backend: Backend,
}

impl RecordStore {
    pub async fn transaction(
        &self,
        transaction: Transaction,
    ) -> Result<TransactionOutcome, AgentError> {
        match &self.backend {
            Backend::Local(store) => Ok(store.transaction(transaction).await?),
            Backend::Region(cluster) => Ok(cluster.transaction(transaction).await?),
        }
    }

    pub async fn get(
        &self,
        key: &str,
        consistency: Consistency,
    ) -> Result<Option<KeyValue>, AgentError> {
        match &self.backend {
            Backend::Local(store) => Ok(store.get(key, consistency).await?),
            Backend::Region(cluster) => Ok(cluster.get(key, consistency).await?),
        }
    }

    pub async fn list(
        &self,
        prefix: &str,
        consistency: Consistency,
    ) -> Result<Listing, AgentError> {
        match &self.backend {
            Backend::Local(store) => Ok(store.list(prefix, consistency).await?),
            Backend::Region(cluster) => Ok(cluster.list(prefix, consistency).await?),
        }
    }
}

#[derive(Clone)]
pub struct Records {
    store: RecordStore,
    local: Store,
    /// How the records' reads are served: linearizable, except in a [`Records::fenced`] view.
    reads: Consistency,
}

impl Records {
    /// Records of a one-host cluster.
    pub fn new(store: Store) -> Self {
        Self {
            store: RecordStore {
                backend: Backend::Local(store.clone()),
            },
            local: store,
            reads: Consistency::Linearizable,
        }
    }

    /// Records of a region member: writes and fresh reads through the leader.
    pub fn in_region(cluster: ClusterStore) -> Self {
        Self {
            local: cluster.store().clone(),
            store: RecordStore {
                backend: Backend::Region(cluster),
            },
            reads: Consistency::Linearizable,
        }
    }

    /// A view whose reads see at least everything committed before this call, as linearizable
    /// reads made now would, after one read index from the leader instead of one per read: for
    /// a few reads that are checked together (a migration's destination checks four records,
    /// four round trips across the region's link otherwise). Its writes are as usual.
    pub async fn fenced(&self) -> Result<Records, AgentError> {
        match &self.store.backend {
            // One host: its store's linearizable reads ask nobody.
            Backend::Local(_) => Ok(self.clone()),
            Backend::Region(cluster) => {
                cluster.read_fence().await?;
                Ok(Records {
                    reads: Consistency::Local,
                    ..self.clone()
                })
            }
        }
    }

    /// A view whose reads are this host's own copy of the store: no round trip, but possibly
    /// behind the leader by what replication has not brought yet. For a guess that a fresh
    /// read confirms before anything depends on it. Its writes are as usual.
    pub fn local(&self) -> Records {
        Records {
            reads: Consistency::Local,
            ..self.clone()
        }
    }

    /// Transactions and reads routed like the records' (through the leader in a region).
    pub fn store_routed(&self) -> &RecordStore {
        &self.store
    }

    /// The local store (watches, local reads, metrics).
    pub fn store(&self) -> &Store {
        &self.local
    }

    /// Heartbeats of every host.
    pub async fn heartbeats(&self) -> Result<Vec<HostHeartbeat>, AgentError> {
        let listing = self.store.list(HOST_STATUS_PREFIX, self.reads).await?;
        listing.items.iter().map(decode).collect()
    }

    /// The heartbeats this host holds (a local read: usable without a quorum, possibly a
    /// little stale), skipping any that cannot be decoded.
    pub async fn heartbeats_local(&self) -> Result<Vec<HostHeartbeat>, AgentError> {
        let listing = self
            .store
            .list(HOST_STATUS_PREFIX, Consistency::Local)
            .await?;
        Ok(listing
            .items
            .iter()
            .filter_map(|item| match decode(item) {
                Ok(heartbeat) => Some(heartbeat),
                Err(error) => {
                    tracing::debug!(key = %item.key, %error, "skipping an unreadable heartbeat");
                    None
                }
            })
            .collect())
    }

    /// The region's placement policy (the defaults until someone sets one).
    pub async fn placement_policy(&self) -> Result<novacron_types::PlacementPolicy, AgentError> {
        Ok(self
            .versioned(PLACEMENT_POLICY_KEY)
            .await?
            .map(|versioned| versioned.record)
            .unwrap_or_default())
    }

    pub async fn put_placement_policy(
        &self,
        policy: &novacron_types::PlacementPolicy,
    ) -> Result<(), AgentError> {
        self.store
            .transaction(Transaction::new().put(PLACEMENT_POLICY_KEY, encode(policy)))
            .await?;
        Ok(())
    }

    /// Writes this host's heartbeat.
    pub async fn put_heartbeat(&self, heartbeat: &HostHeartbeat) -> Result<(), AgentError> {
        self.store
            .transaction(
                Transaction::new().put(host_status_key(heartbeat.node_id), encode(heartbeat)),
            )
            .await?;
        Ok(())
    }

    /// Removes a host's heartbeat (the host left the region).
    pub async fn delete_heartbeat(&self, node_id: u64) -> Result<(), AgentError> {
        self.store
            .transaction(Transaction::new().delete(host_status_key(node_id)))
            .await?;
        Ok(())
    }

    /// A record with its revision (linearizable read).
    async fn versioned<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<Versioned<T>>, AgentError> {
        let Some(key_value) = self.store.get(key, self.reads).await? else {
            return Ok(None);
        };
        Ok(Some(Versioned {
            record: decode(&key_value)?,
            mod_revision: key_value.mod_revision,
        }))
    }

    /// Reads the record at `key`, lets `change` modify it and writes it back if it changed
    /// (compare-and-swap on its revision, retried when someone else wrote in between).
    /// `change` returns `Ok(false)` to leave the record as is; `missing` is the error when the
    /// record does not exist.
    async fn read_modify_write<T: DeserializeOwned + serde::Serialize>(
        &self,
        key: &str,
        missing: impl Fn() -> AgentError,
        mut change: impl FnMut(&mut T) -> Result<bool, AgentError>,
    ) -> Result<T, AgentError> {
        loop {
            let Some(current) = self.versioned::<T>(key).await? else {
                return Err(missing());
            };
            let mut record = current.record;
            if !change(&mut record)? {
                return Ok(record);
            }
            let outcome = self
                .store
                .transaction(
                    Transaction::new()
                        .when_mod_revision(key, current.mod_revision)
                        .put(key, encode(&record)),
                )
                .await?;
            if outcome.succeeded {
                return Ok(record);
            }
        }
    }

    pub async fn vm(&self, name: &str) -> Result<Option<Versioned<VmRecord>>, AgentError> {
        self.versioned(&vm_key(name)).await
    }

    pub async fn vms(&self) -> Result<Vec<Versioned<VmRecord>>, AgentError> {
        let listing = self.store.list(VM_PREFIX, self.reads).await?;
        listing
            .items
            .iter()
            .map(|key_value| {
                Ok(Versioned {
                    record: decode(key_value)?,
                    mod_revision: key_value.mod_revision,
                })
            })
            .collect()
    }

    /// Writes a new VM record; fails with `VmAlreadyExists` when the name is taken.
    pub async fn create_vm(&self, record: &VmRecord) -> Result<u64, AgentError> {
        let name = record.spec.name.as_str();
        let mut transaction = Transaction::new()
            .when_absent(vm_key(name))
            .put(vm_key(name), encode(record));
        if let Some(image_id) = &record.spec.image_id {
            transaction = transaction.when_exists(image_key(image_id));
        }
        let outcome = self.store.transaction(transaction).await?;
        if outcome.succeeded {
            return Ok(outcome.revision);
        }
        match outcome
            .failed_condition
            .map(|failed| failed.condition.key().to_string())
        {
            Some(key) if key.starts_with(IMAGE_PREFIX) => Err(AgentError::ImageNotFound {
                reference: record.spec.image_id.clone().unwrap_or_default(),
            }),
            _ => Err(AgentError::VmAlreadyExists {
                name: name.to_string(),
            }),
        }
    }

    /// Reads the VM, lets `change` modify it and writes it back if it changed, retrying when
    /// someone else wrote in between. `change` returns `Ok(false)` to leave the record as is.
    pub async fn update_vm(
        &self,
        name: &str,
        change: impl FnMut(&mut VmRecord) -> Result<bool, AgentError>,
    ) -> Result<VmRecord, AgentError> {
        let missing = || AgentError::VmNotFound {
            name: name.to_string(),
        };
        self.read_modify_write(&vm_key(name), missing, change).await
    }

    /// Removes a VM record if it was not changed since `mod_revision`.
    pub async fn delete_vm(&self, name: &str, mod_revision: u64) -> Result<bool, AgentError> {
        let outcome = self
            .store
            .transaction(
                Transaction::new()
                    .when_mod_revision(vm_key(name), mod_revision)
                    .delete(vm_key(name)),
            )
            .await?;
        Ok(outcome.succeeded)
    }

    pub async fn image(&self, id: &str) -> Result<Option<ImageRecord>, AgentError> {
        let Some(key_value) = self.store.get(&image_key(id), self.reads).await? else {
            return Ok(None);
        };
        Ok(Some(decode(&key_value)?))
    }

    /// Finds an image by name or by id (a full id or a unique prefix of at least 8 characters).
    pub async fn resolve_image(&self, reference: &str) -> Result<ImageRecord, AgentError> {
        let not_found = || AgentError::ImageNotFound {
            reference: reference.to_string(),
        };
        if reference.is_empty() || reference.contains('/') {
            return Err(not_found());
        }
        if let Some(key_value) = self
            .store
            .get(&image_name_key(reference), self.reads)
            .await?
        {
            let id = String::from_utf8_lossy(&key_value.value).to_string();
            return self.image(&id).await?.ok_or_else(not_found);
        }
        if reference.len() >= 8 && reference.chars().all(|c| c.is_ascii_hexdigit()) {
            let listing = self
                .store
                .list(&image_key(&reference.to_ascii_lowercase()), self.reads)
                .await?;
            if listing.items.len() == 1 {
                return decode(&listing.items[0]);
            }
        }
        Err(not_found())
    }

    pub async fn images(&self) -> Result<Vec<ImageRecord>, AgentError> {
        let listing = self.store.list(IMAGE_PREFIX, self.reads).await?;
        let mut images: Vec<ImageRecord> =
            listing.items.iter().map(decode).collect::<Result<_, _>>()?;
        images.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(images)
    }

    /// Writes a new image record and its name index entry atomically.
    pub async fn create_image(&self, record: &ImageRecord) -> Result<(), AgentError> {
        let name = record.name.as_str();
        let outcome = self
            .store
            .transaction(
                Transaction::new()
                    .when_absent(image_key(&record.id))
                    .when_absent(image_name_key(name))
                    .put(image_key(&record.id), encode(record))
                    .put(image_name_key(name), record.id.clone().into_bytes()),
            )
            .await?;
        if outcome.succeeded {
            return Ok(());
        }
        let failed_key = outcome
            .failed_condition
            .map(|failed| failed.condition.key().to_string())
            .unwrap_or_default();
        if failed_key.starts_with(IMAGE_NAME_PREFIX) {
            let id = self
                .store
                .get(&failed_key, self.reads)
                .await?
                .map(|key_value| String::from_utf8_lossy(&key_value.value).to_string())
                .unwrap_or_default();
            return Err(AgentError::ImageNameTaken {
                name: name.to_string(),
                id,
            });
        }
        let existing = self.image(&record.id).await?;
        Err(AgentError::ImageNameTaken {
            name: existing
                .map(|image| image.name.to_string())
                .unwrap_or_default(),
            id: record.id.clone(),
        })
    }

    pub async fn delete_image(&self, record: &ImageRecord) -> Result<(), AgentError> {
        self.store
            .transaction(
                Transaction::new()
                    .when_exists(image_key(&record.id))
                    .delete(image_key(&record.id))
                    .delete(image_name_key(record.name.as_str())),
            )
            .await?;
        Ok(())
    }

    pub async fn peers(&self) -> Result<Vec<PeerRecord>, AgentError> {
        let listing = self.store.list(PEER_PREFIX, self.reads).await?;
        listing.items.iter().map(decode).collect()
    }

    /// Writes (or replaces, to change its label) a trusted peer.
    pub async fn put_peer(&self, record: &PeerRecord) -> Result<(), AgentError> {
        self.store
            .transaction(Transaction::new().put(peer_key(&record.fingerprint), encode(record)))
            .await?;
        Ok(())
    }

    /// Removes a trusted peer; false if it was not trusted.
    pub async fn delete_peer(&self, fingerprint: &str) -> Result<bool, AgentError> {
        let outcome = self
            .store
            .transaction(
                Transaction::new()
                    .when_exists(peer_key(fingerprint))
                    .delete(peer_key(fingerprint)),
            )
            .await?;
        Ok(outcome.succeeded)
    }

    pub async fn migration(
        &self,
        id: &str,
    ) -> Result<Option<Versioned<MigrationRecord>>, AgentError> {
        self.versioned(&migration_key(id)).await
    }

    pub async fn migrations(&self) -> Result<Vec<MigrationRecord>, AgentError> {
        let listing = self.store.list(MIGRATION_PREFIX, self.reads).await?;
        listing.items.iter().map(decode).collect()
    }

    /// Forgets finished migrations (a finished record never changes again).
    pub async fn delete_finished_migrations(&self, ids: &[String]) -> Result<(), AgentError> {
        if ids.is_empty() {
            return Ok(());
        }
        let transaction = ids.iter().fold(Transaction::new(), |transaction, id| {
            transaction.delete(migration_key(id))
        });
        self.store.transaction(transaction).await?;
        Ok(())
    }

    /// Records a new migration and marks the VM as migrating, both or neither: fails (returns
    /// false) when the VM changed since `vm.mod_revision`.
    pub async fn begin_migration(
        &self,
        vm: &Versioned<VmRecord>,
        migration: &MigrationRecord,
    ) -> Result<bool, AgentError> {
        let mut record = vm.record.clone();
        record.migration = Some(migration.id.clone());
        self.record_new_migration(vm, &record, migration).await
    }

    /// Writes a new migration record and the VM's `updated` record in one transaction, only if
    /// the VM is still as `vm` read it and the migration id is new: how a migration begins, or
    /// how a cold move happens whole.
    pub async fn record_new_migration(
        &self,
        vm: &Versioned<VmRecord>,
        updated: &VmRecord,
        migration: &MigrationRecord,
    ) -> Result<bool, AgentError> {
        let name = vm.record.spec.name.as_str();
        let outcome = self
            .store
            .transaction(
                Transaction::new()
                    .when_mod_revision(vm_key(name), vm.mod_revision)
                    .when_absent(migration_key(&migration.id))
                    .put(vm_key(name), encode(updated))
                    .put(migration_key(&migration.id), encode(migration)),
            )
            .await?;
        Ok(outcome.succeeded)
    }

    /// Reads the migration, lets `change` modify it and writes it back if it changed (CAS,
    /// retried). Returns the record as stored.
    pub async fn update_migration(
        &self,
        id: &str,
        change: impl FnMut(&mut MigrationRecord) -> Result<bool, AgentError>,
    ) -> Result<MigrationRecord, AgentError> {
        let missing = || AgentError::MigrationNotFound {
            reference: id.to_string(),
        };
        self.read_modify_write(&migration_key(id), missing, change)
            .await
    }

    /// Changes a VM and its migration in one transaction (CAS on both, retried): how a migration
    /// ends, so that the VM's owner and the migration's outcome never disagree. `change` returns
    /// `Ok(false)` to write nothing; the result is `None` then.
    pub async fn update_vm_and_migration(
        &self,
        vm: &str,
        id: &str,
        mut change: impl FnMut(&mut VmRecord, &mut MigrationRecord) -> Result<bool, AgentError>,
    ) -> Result<Option<(VmRecord, MigrationRecord)>, AgentError> {
        loop {
            // Read at once: a migration's commit runs inside the guest's pause.
            let (vm_at, migration_at) = (vm_key(vm), migration_key(id));
            let (read_vm, read_migration) = tokio::join!(
                self.versioned::<VmRecord>(&vm_at),
                self.versioned::<MigrationRecord>(&migration_at)
            );
            let Some(current_vm) = read_vm? else {
                return Err(AgentError::VmNotFound {
                    name: vm.to_string(),
                });
            };
            let Some(current) = read_migration? else {
                return Err(AgentError::MigrationNotFound {
                    reference: id.to_string(),
                });
            };
            let (mut vm_record, mut migration) = (current_vm.record, current.record);
            if !change(&mut vm_record, &mut migration)? {
                return Ok(None);
            }
            let outcome = self
                .store
                .transaction(
                    Transaction::new()
                        .when_mod_revision(vm_key(vm), current_vm.mod_revision)
                        .when_mod_revision(migration_key(id), current.mod_revision)
                        .put(vm_key(vm), encode(&vm_record))
                        .put(migration_key(id), encode(&migration)),
                )
                .await?;
            if outcome.succeeded {
                return Ok(Some((vm_record, migration)));
            }
        }
    }
}
