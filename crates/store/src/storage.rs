//! openraft storage: the raft log ([`LogStore`]) in append-only segment files
//! ([`crate::log_files`], `raft-log/` in the data directory) and the key-value state machine
//! ([`StateMachineStore`]) in a redb database file, `store.redb` in the data directory.
//!
//! Durability: log appends and truncations are `fdatasync`ed, votes committed with
//! `Durability::Immediate`, before openraft is told they are done. State machine applies are
//! committed with `Durability::None` (and carry the last saved `committed` log id, which has no
//! transaction of its own), and an apply at least every
//! [`DURABLE_APPLY_INTERVAL`] with `Durability::Immediate`: redb persists commits in order, so
//! after a crash the state machine is a consistent prefix that openraft completes by
//! re-applying committed entries from the durable log. A purge first commits durably (which
//! makes every earlier apply durable too), so the log never loses an entry the durable state
//! machine still needs. The state machine is persistent, so a restart does not replay the log.
//!
//! Tables (the on-disk format, version [`FORMAT_VERSION`]):
//! - `meta` (`&str` → bytes): `format_version` (u64 LE), `vote`, `committed`,
//!   `last_purged_log_id`, `state_machine` (JSON).
//! - `log` (u64 index → JSON entry): the raft log of format version 1, empty since version 2;
//!   opening a version-1 store moves its entries to the segment files once.
//! - `kv` (key → [`crate::records`] key record).
//! - `changes` (revision → encoded changes of that revision; the watch history, pruned to the
//!   configured number of revisions).
//! - `snapshot` (`meta` JSON, `data` snapshot stream): the current snapshot.
//!
//! This module owns every redb transaction of the crate; it must not talk to the network.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::error::{Result, StoreError};
use crate::kv::{
    FailedCondition, KeyValue, Listing, Operation, Transaction, TransactionOutcome, WatchEvent,
};
use crate::log_files::{LogFileError, LogFiles};
use crate::raft_types::{BatchOutcome, Node, NodeId, TypeConfig};
use crate::records::{self, RecordError};
use crate::watch::ChangeNotice;

/// Version of the on-disk layout this build writes and reads. Version 1 kept the raft log in
/// redb; version 2 keeps it in segment files; version 3 preallocates new segments with zeros
/// (see [`crate::log_files`]), which a version-2 build would take for corruption. Versions 1
/// and 2 still open (version 1's log is moved out of redb once; version 2 needs no change).
pub const FORMAT_VERSION: u64 = 3;
/// Applies of at most this many transactions that need no fsync run on the async task itself.
const INLINE_APPLY_TRANSACTIONS: usize = 32;
/// The state machine is committed durably at least this often while entries are applied.
pub const DURABLE_APPLY_INTERVAL: Duration = Duration::from_secs(1);
/// Name of the database file inside the data directory.
pub const DATABASE_FILE_NAME: &str = "store.redb";

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

const META_FORMAT_VERSION: &str = "format_version";
const META_VOTE: &str = "vote";
const META_COMMITTED: &str = "committed";
const META_LAST_PURGED: &str = "last_purged_log_id";
const META_STATE_MACHINE: &str = "state_machine";
const SNAPSHOT_META: &str = "meta";
const SNAPSHOT_DATA: &str = "data";

type StoreStorageError = StorageError<NodeId>;
type StorageResult<T> = std::result::Result<T, StoreStorageError>;

/// The state machine's own bookkeeping, kept in `meta` under `state_machine`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct StateMachineMeta {
    pub last_applied: Option<LogId<NodeId>>,
    pub last_membership: StoredMembership<NodeId, Node>,
    /// The store's revision: bumped by every transaction that changes a key.
    pub revision: u64,
    /// Changes at or below this revision are no longer in `changes`.
    pub compacted_revision: u64,
}

/// The redb database shared by the log, the state machine and the read path.
pub(crate) struct StoreDatabase {
    database: Database,
    path: PathBuf,
    /// The format version found on open (this build's for a new database).
    found_format_version: AtomicU64,
    /// The committed log id openraft last saved, not yet written: the next apply (or purge)
    /// writes it in its own transaction, so saving it costs no transaction of its own on the
    /// path of every write.
    unsaved_committed: std::sync::Mutex<Option<Vec<u8>>>,
}

impl Debug for StoreDatabase {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("StoreDatabase")
            .field("path", &self.path)
            .finish()
    }
}

impl StoreDatabase {
    /// Opens (or creates) `store.redb` in `data_dir`, checks its format version and creates the
    /// tables. Fails with [`StoreError::AlreadyOpen`] when another process holds it.
    pub fn open(data_dir: &Path) -> Result<Arc<Self>> {
        std::fs::create_dir_all(data_dir)
            .map_err(|error| StoreError::storage("creating the data directory", data_dir, error))?;
        let path = data_dir.join(DATABASE_FILE_NAME);
        let database = Database::builder()
            .create(&path)
            .map_err(|error| match error {
                redb::DatabaseError::DatabaseAlreadyOpen => {
                    StoreError::AlreadyOpen { path: path.clone() }
                }
                other => StoreError::storage("opening the database", &path, other),
            })?;
        let store_database = Self {
            database,
            path,
            found_format_version: AtomicU64::new(FORMAT_VERSION),
            unsaved_committed: std::sync::Mutex::new(None),
        };
        store_database.check_format_version()?;
        Ok(Arc::new(store_database))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the raft log's segment files in `data_dir`; for a version-1 store, first moves the
    /// log out of redb into them, and marks the store with this build's version before any
    /// preallocated segment exists (repeatable after a crash).
    pub fn open_log(&self, data_dir: &Path) -> Result<Arc<LogFiles>> {
        let storage = |action: &str, error: OperationError| {
            StoreError::storage(action, self.path.clone(), error)
        };
        let log_error =
            |error: LogFileError| StoreError::storage("opening the raft log", data_dir, error);
        let last_purged = (|| -> std::result::Result<Option<LogId<NodeId>>, OperationError> {
            let transaction = self.database.begin_read()?;
            read_json(&transaction.open_table(META)?, META_LAST_PURGED)
        })()
        .map_err(|error| storage("reading the last purged log id", error))?;
        let found = self.found_format_version.load(Ordering::Relaxed);
        if found == 2 {
            self.mark_format_version(|_| Ok(()))
                .map_err(|error| storage("marking the store format version", error))?;
        }
        let files =
            LogFiles::open(data_dir, last_purged.map(|log_id| log_id.index)).map_err(log_error)?;
        if found < 2 {
            let legacy = (|| -> std::result::Result<Vec<(u64, Vec<u8>)>, OperationError> {
                let transaction = self.database.begin_read()?;
                let table = transaction.open_table(LOG)?;
                let after = last_purged.map_or(0, |log_id| log_id.index + 1);
                let mut records = Vec::new();
                for item in table.range(after..)? {
                    let (index, bytes) = item?;
                    records.push((index.value(), bytes.value().to_vec()));
                }
                Ok(records)
            })()
            .map_err(|error| storage("reading the version-1 raft log", error))?;
            files.replace_all(&legacy).map_err(log_error)?;
            self.mark_format_version(|transaction| {
                transaction.open_table(LOG)?.retain(|_, _| false)?;
                Ok(())
            })
            .map_err(|error| storage("finishing the move of the raft log", error))?;
            tracing::info!(
                entries = legacy.len(),
                "moved the raft log out of redb into segment files (store format version 3)"
            );
        }
        Ok(Arc::new(files))
    }

    /// Commits this build's format version, together with `also`'s changes, durably.
    fn mark_format_version(
        &self,
        also: impl FnOnce(&redb::WriteTransaction) -> std::result::Result<(), OperationError>,
    ) -> std::result::Result<(), OperationError> {
        let transaction = self.database.begin_write()?;
        also(&transaction)?;
        transaction
            .open_table(META)?
            .insert(META_FORMAT_VERSION, FORMAT_VERSION.to_le_bytes().as_slice())?;
        transaction.commit()?;
        self.found_format_version
            .store(FORMAT_VERSION, Ordering::Relaxed);
        Ok(())
    }

    fn lock_unsaved_committed(&self) -> std::sync::MutexGuard<'_, Option<Vec<u8>>> {
        self.unsaved_committed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn check_format_version(&self) -> Result<()> {
        let path = &self.path;
        let storage = |action: &str, error: redb::Error| StoreError::storage(action, path, error);
        let transaction = self
            .database
            .begin_write()
            .map_err(|error| storage("starting the format check", error.into()))?;
        {
            let mut meta = transaction
                .open_table(META)
                .map_err(|error| storage("opening the meta table", error.into()))?;
            let found = meta
                .get(META_FORMAT_VERSION)
                .map_err(|error| storage("reading the format version", error.into()))?
                .map(|guard| decode_u64(guard.value()));
            match found {
                None => {
                    meta.insert(META_FORMAT_VERSION, FORMAT_VERSION.to_le_bytes().as_slice())
                        .map_err(|error| storage("writing the format version", error.into()))?;
                }
                Some(Some(found)) if found <= FORMAT_VERSION => {
                    self.found_format_version.store(found, Ordering::Relaxed);
                }
                Some(found) => {
                    return Err(StoreError::FormatVersion {
                        path: path.clone(),
                        found: found.unwrap_or(u64::MAX),
                        supported: FORMAT_VERSION,
                    });
                }
            }
            for table in [LOG, CHANGES] {
                transaction
                    .open_table(table)
                    .map_err(|error| storage("creating tables", error.into()))?;
            }
            for table in [KV, SNAPSHOT] {
                transaction
                    .open_table(table)
                    .map_err(|error| storage("creating tables", error.into()))?;
            }
        }
        transaction
            .commit()
            .map_err(|error| storage("committing the format check", error.into()))
    }

    /// Overwrites the format version: only for tests of the refusal of newer formats.
    #[cfg(test)]
    pub fn force_format_version(&self, version: u64) {
        let transaction = self.database.begin_write().expect("begin write");
        {
            let mut meta = transaction.open_table(META).expect("open meta");
            meta.insert(META_FORMAT_VERSION, version.to_le_bytes().as_slice())
                .expect("insert");
        }
        transaction.commit().expect("commit");
    }

    fn read_error(&self, action: &str, error: impl Into<redb::Error>) -> StoreError {
        StoreError::storage(action, &self.path, error.into())
    }

    /// The state machine's bookkeeping as last committed.
    pub fn read_state_machine_meta(&self) -> Result<StateMachineMeta> {
        let transaction = self
            .database
            .begin_read()
            .map_err(|error| self.read_error("starting a read", error))?;
        let meta = transaction
            .open_table(META)
            .map_err(|error| self.read_error("opening the meta table", error))?;
        read_state_machine_meta(&meta)
            .map_err(|error| StoreError::storage("reading state machine meta", &self.path, error))
    }

    /// One key, read from the local state machine.
    pub fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let transaction = self
            .database
            .begin_read()
            .map_err(|error| self.read_error("starting a read", error))?;
        let table = transaction
            .open_table(KV)
            .map_err(|error| self.read_error("opening the kv table", error))?;
        let Some(guard) = table
            .get(key)
            .map_err(|error| self.read_error("reading a key", error))?
        else {
            return Ok(None);
        };
        let record = records::decode_key_record(guard.value()).map_err(|error| {
            StoreError::storage(format!("decoding key {key:?}"), &self.path, error)
        })?;
        Ok(Some(record.to_key_value(key)))
    }

    /// Every key under `prefix`, ordered, with the revision they were read at.
    pub fn list(&self, prefix: &str, limit: Option<usize>) -> Result<Listing> {
        let transaction = self
            .database
            .begin_read()
            .map_err(|error| self.read_error("starting a read", error))?;
        let meta = transaction
            .open_table(META)
            .map_err(|error| self.read_error("opening the meta table", error))?;
        let revision = read_state_machine_meta(&meta)
            .map_err(|error| StoreError::storage("reading state machine meta", &self.path, error))?
            .revision;
        let table = transaction
            .open_table(KV)
            .map_err(|error| self.read_error("opening the kv table", error))?;
        let mut items = Vec::new();
        let range = table
            .range::<&str>(prefix..)
            .map_err(|error| self.read_error("listing a prefix", error))?;
        for item in range {
            if limit.is_some_and(|limit| items.len() >= limit) {
                break;
            }
            let (key_guard, value_guard) =
                item.map_err(|error| self.read_error("listing a prefix", error))?;
            let key = key_guard.value();
            if !key.starts_with(prefix) {
                break;
            }
            let record = records::decode_key_record(value_guard.value()).map_err(|error| {
                StoreError::storage(format!("decoding key {key:?}"), &self.path, error)
            })?;
            items.push(record.to_key_value(key));
        }
        Ok(Listing { revision, items })
    }

    /// Changes under `prefix` with revision >= `from_revision`, the current revision, and the
    /// compacted revision, all from one consistent read.
    pub fn changes_since(&self, prefix: &str, from_revision: u64) -> Result<ChangeHistory> {
        let transaction = self
            .database
            .begin_read()
            .map_err(|error| self.read_error("starting a read", error))?;
        let meta = transaction
            .open_table(META)
            .map_err(|error| self.read_error("opening the meta table", error))?;
        let state = read_state_machine_meta(&meta).map_err(|error| {
            StoreError::storage("reading state machine meta", &self.path, error)
        })?;
        let mut events = Vec::new();
        if from_revision > state.compacted_revision && from_revision <= state.revision {
            let table = transaction
                .open_table(CHANGES)
                .map_err(|error| self.read_error("opening the changes table", error))?;
            let range = table
                .range(from_revision..)
                .map_err(|error| self.read_error("reading the watch history", error))?;
            for item in range {
                let (revision, bytes) =
                    item.map_err(|error| self.read_error("reading the watch history", error))?;
                records::decode_changes(revision.value(), bytes.value(), prefix, &mut events)
                    .map_err(|error| {
                        StoreError::storage("decoding the watch history", &self.path, error)
                    })?;
            }
        }
        Ok(ChangeHistory {
            events,
            revision: state.revision,
            compacted_revision: state.compacted_revision,
        })
    }
}

/// The watch history read by [`StoreDatabase::changes_since`].
pub(crate) struct ChangeHistory {
    pub events: Vec<WatchEvent>,
    pub revision: u64,
    pub compacted_revision: u64,
}

fn decode_u64(bytes: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(bytes).ok().map(u64::from_le_bytes)
}

/// An error inside a storage operation, before it is wrapped into openraft's error.
#[derive(Debug, thiserror::Error)]
enum OperationError {
    #[error(transparent)]
    Database(#[from] redb::Error),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("background storage task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Log(#[from] LogFileError),
}

macro_rules! impl_from_redb {
    ($($error:ty),*) => {
        $(impl From<$error> for OperationError {
            fn from(error: $error) -> Self {
                OperationError::Database(error.into())
            }
        })*
    };
}
impl_from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

fn read_state_machine_meta(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> std::result::Result<StateMachineMeta, OperationError> {
    match meta.get(META_STATE_MACHINE)? {
        Some(guard) => Ok(serde_json::from_slice(guard.value())?),
        None => Ok(StateMachineMeta::default()),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> std::result::Result<Option<T>, OperationError> {
    match table.get(key)? {
        Some(guard) => Ok(Some(serde_json::from_slice(guard.value())?)),
        None => Ok(None),
    }
}

/// Runs a database operation on the blocking pool, so fsyncs never stall the async runtime.
async fn run_blocking<T, F>(operation: F) -> std::result::Result<T, OperationError>
where
    T: Send + 'static,
    F: FnOnce() -> std::result::Result<T, OperationError> + Send + 'static,
{
    tokio::task::spawn_blocking(operation).await?
}

// ---------------------------------------------------------------------------------------------
// The raft log
// ---------------------------------------------------------------------------------------------

/// openraft's log storage on the shared redb database.
#[derive(Clone, Debug)]
pub(crate) struct LogStore {
    database: Arc<StoreDatabase>,
    files: Arc<LogFiles>,
}

impl LogStore {
    pub fn new(database: Arc<StoreDatabase>, files: Arc<LogFiles>) -> Self {
        Self { database, files }
    }

    /// Entries in `range`; with a `budget`, only as many as add up to at most that many bytes
    /// as stored (the first entry always comes, whatever its size, so a non-empty range never
    /// yields nothing).
    fn read_entries(
        &self,
        range: impl RangeBounds<u64>,
        budget: Option<usize>,
    ) -> std::result::Result<Vec<Entry<TypeConfig>>, OperationError> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(start) => *start,
            Bound::Excluded(start) => start.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(end) => end.saturating_add(1),
            Bound::Excluded(end) => *end,
            Bound::Unbounded => u64::MAX,
        };
        self.files
            .read(start, end, budget)?
            .iter()
            .map(|bytes| Ok(serde_json::from_slice(bytes)?))
            .collect()
    }
}

/// Most bytes of log entries (as stored, which is how they travel) that replication sends in one
/// append-entries message. openraft 0.9 gives every append the heartbeat interval as its
/// deadline and would otherwise send up to 300 entries at once (each up to a whole write batch),
/// which can miss that deadline on every retry and never replicate. Replication reads its
/// batches through `limited_get_log_entries`, so the cap also keeps the leader from reading
/// entries it will not send.
pub const MAX_APPEND_ENTRIES_BYTES: usize = 1024 * 1024;

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        self.read_entries(range, None)
            .map_err(|error| StorageIOError::read_logs(&error).into())
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        self.read_entries(start..end, Some(MAX_APPEND_ENTRIES_BYTES))
            .map_err(|error| StorageIOError::read_logs(&error).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let read = || -> std::result::Result<LogState<TypeConfig>, OperationError> {
            let transaction = self.database.database.begin_read()?;
            let meta = transaction.open_table(META)?;
            let last_purged_log_id: Option<LogId<NodeId>> = read_json(&meta, META_LAST_PURGED)?;
            let last_log_id = match self.files.last()? {
                Some(bytes) => {
                    let entry: Entry<TypeConfig> = serde_json::from_slice(&bytes)?;
                    Some(entry.log_id)
                }
                None => last_purged_log_id,
            };
            Ok(LogState {
                last_purged_log_id,
                last_log_id,
            })
        };
        read().map_err(|error| StorageIOError::read_logs(&error).into())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        let database = self.database.clone();
        let bytes = serde_json::to_vec(vote).map_err(|error| StorageIOError::write_vote(&error))?;
        run_blocking(move || {
            let transaction = database.database.begin_write()?;
            transaction
                .open_table(META)?
                .insert(META_VOTE, bytes.as_slice())?;
            transaction.commit()?;
            Ok(())
        })
        .await
        .map_err(|error| StorageIOError::write_vote(&error).into())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        let read = || -> std::result::Result<Option<Vote<NodeId>>, OperationError> {
            let transaction = self.database.database.begin_read()?;
            read_json(&transaction.open_table(META)?, META_VOTE)
        };
        read().map_err(|error| StorageIOError::read_vote(&error).into())
    }

    /// Keeps `committed` for the next apply's transaction to write (see
    /// [`StoreDatabase::unsaved_committed`]). It is as durable as that apply: a crash that
    /// loses it loses the applies it would have re-applied too, and a restarted node learns the
    /// commit index from the leader.
    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        let bytes =
            serde_json::to_vec(&committed).map_err(|error| StorageIOError::write(&error))?;
        *self.database.lock_unsaved_committed() = Some(bytes);
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        if let Some(bytes) = self.database.lock_unsaved_committed().as_ref() {
            let committed: Option<LogId<NodeId>> =
                serde_json::from_slice(bytes).map_err(|error| StorageIOError::read(&error))?;
            return Ok(committed);
        }
        let read = || -> std::result::Result<Option<LogId<NodeId>>, OperationError> {
            let transaction = self.database.database.begin_read()?;
            Ok(
                read_json::<Option<LogId<NodeId>>>(&transaction.open_table(META)?, META_COMMITTED)?
                    .flatten(),
            )
        };
        read().map_err(|error| StorageIOError::read(&error).into())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        for entry in entries {
            let bytes =
                serde_json::to_vec(&entry).map_err(|error| StorageIOError::write_logs(&error))?;
            encoded.push((entry.log_id.index, bytes));
        }
        let files = self.files.clone();
        let result = run_blocking(move || Ok(files.append(&encoded)?)).await;
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(error) => {
                callback.log_io_completed(Err(std::io::Error::other(error.to_string())));
                Err(StorageIOError::write_logs(&error).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let files = self.files.clone();
        run_blocking(move || Ok(files.truncate(log_id.index)?))
            .await
            .map_err(|error| StorageIOError::write_logs(&error).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let database = self.database.clone();
        let files = self.files.clone();
        let bytes = serde_json::to_vec(&Some(log_id))
            .map_err(|error| StorageIOError::write_logs(&error))?;
        run_blocking(move || {
            // Durable before any entry is dropped: the restarted log starts after it, and the
            // durable state machine (this commit makes every earlier apply durable) never needs
            // an entry that is gone.
            let transaction = database.database.begin_write()?;
            {
                let mut meta = transaction.open_table(META)?;
                meta.insert(META_LAST_PURGED, bytes.as_slice())?;
                if let Some(committed) = database.lock_unsaved_committed().take() {
                    meta.insert(META_COMMITTED, committed.as_slice())?;
                }
            }
            transaction.commit()?;
            files.purge(log_id.index)?;
            Ok(())
        })
        .await
        .map_err(|error| StorageIOError::write_logs(&error).into())
    }
}

// ---------------------------------------------------------------------------------------------
// The state machine
// ---------------------------------------------------------------------------------------------

/// openraft's state machine: the revisioned key-value store in the shared redb database.
pub(crate) struct StateMachineStore {
    database: Arc<StoreDatabase>,
    notices: broadcast::Sender<ChangeNotice>,
    watch_history_revisions: u64,
    snapshot_counter: Arc<AtomicU64>,
    last_durable_apply: Instant,
}

impl StateMachineStore {
    pub fn new(
        database: Arc<StoreDatabase>,
        notices: broadcast::Sender<ChangeNotice>,
        watch_history_revisions: u64,
    ) -> Self {
        Self {
            database,
            notices,
            watch_history_revisions: watch_history_revisions.max(1),
            snapshot_counter: Arc::new(AtomicU64::new(0)),
            last_durable_apply: Instant::now(),
        }
    }
}

/// Applies one transaction inside a redb write transaction. Returns the outcome and the events
/// (empty when nothing changed); bumps `state.revision` when something changed.
fn apply_transaction(
    kv: &mut redb::Table<&'static str, &'static [u8]>,
    state: &mut StateMachineMeta,
    request: &Transaction,
) -> std::result::Result<(TransactionOutcome, Vec<WatchEvent>), OperationError> {
    for (index, condition) in request.conditions.iter().enumerate() {
        let current = match kv.get(condition.key())? {
            Some(guard) => Some(records::decode_key_record(guard.value())?.mod_revision),
            None => None,
        };
        if !condition.holds(current) {
            let outcome = TransactionOutcome {
                succeeded: false,
                revision: state.revision,
                failed_condition: Some(FailedCondition {
                    index,
                    condition: condition.clone(),
                    actual_mod_revision: current,
                }),
                deleted_keys: 0,
            };
            return Ok((outcome, Vec::new()));
        }
    }
    let revision = state.revision + 1;
    let mut events = Vec::new();
    let mut deleted_keys = 0;
    for operation in &request.operations {
        match operation {
            Operation::Put { key, value } => {
                let (create_revision, version) = match kv.get(key.as_str())? {
                    Some(guard) => {
                        let record = records::decode_key_record(guard.value())?;
                        (record.create_revision, record.version + 1)
                    }
                    None => (revision, 1),
                };
                let record = records::encode_key_record(create_revision, revision, version, value);
                kv.insert(key.as_str(), record.as_slice())?;
                events.push(WatchEvent::Put {
                    key_value: KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision,
                        mod_revision: revision,
                        version,
                    },
                });
            }
            Operation::Delete { key } => {
                if kv.remove(key.as_str())?.is_some() {
                    deleted_keys += 1;
                    events.push(WatchEvent::Delete {
                        key: key.clone(),
                        revision,
                    });
                }
            }
            Operation::DeletePrefix { prefix } => {
                let mut doomed = Vec::new();
                for item in kv.range::<&str>(prefix.as_str()..)? {
                    let (key, _) = item?;
                    let key = key.value();
                    if !key.starts_with(prefix.as_str()) {
                        break;
                    }
                    doomed.push(key.to_string());
                }
                for key in doomed {
                    kv.remove(key.as_str())?;
                    deleted_keys += 1;
                    events.push(WatchEvent::Delete { key, revision });
                }
            }
        }
    }
    if !events.is_empty() {
        state.revision = revision;
    }
    let outcome = TransactionOutcome {
        succeeded: true,
        revision: state.revision,
        failed_condition: None,
        deleted_keys,
    };
    Ok((outcome, events))
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>)> {
        let state = self
            .database
            .read_state_machine_meta()
            .map_err(|error| StorageIOError::read_state_machine(&error))?;
        Ok((state.last_applied, state.last_membership))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<BatchOutcome>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let database = self.database.clone();
        let history = self.watch_history_revisions;
        let durable = self.last_durable_apply.elapsed() >= DURABLE_APPLY_INTERVAL;
        if durable {
            self.last_durable_apply = Instant::now();
        }
        let transactions: usize = entries
            .iter()
            .map(|entry| match &entry.payload {
                EntryPayload::Normal(batch) => batch.transactions.len(),
                _ => 0,
            })
            .sum();
        let apply_all = move || {
            let mut transaction = database.database.begin_write()?;
            // Mostly not durable at once: after a crash the committed log is re-applied.
            if !durable {
                transaction.set_durability(Durability::None)?;
            }
            let mut outcomes = Vec::with_capacity(entries.len());
            let mut changed_revision = None;
            {
                let mut meta = transaction.open_table(META)?;
                let mut kv = transaction.open_table(KV)?;
                let mut changes = transaction.open_table(CHANGES)?;
                let mut state = read_state_machine_meta(&meta)?;
                for entry in entries {
                    state.last_applied = Some(entry.log_id);
                    match entry.payload {
                        EntryPayload::Blank => outcomes.push(BatchOutcome::default()),
                        EntryPayload::Normal(batch) => {
                            let mut batch_outcome = BatchOutcome {
                                outcomes: Vec::with_capacity(batch.transactions.len()),
                            };
                            for request in &batch.transactions {
                                let (outcome, events) =
                                    apply_transaction(&mut kv, &mut state, request)?;
                                if !events.is_empty() {
                                    changes.insert(
                                        state.revision,
                                        records::encode_changes(&events).as_slice(),
                                    )?;
                                    changed_revision = Some(state.revision);
                                }
                                batch_outcome.outcomes.push(outcome);
                            }
                            outcomes.push(batch_outcome);
                        }
                        EntryPayload::Membership(membership) => {
                            state.last_membership =
                                StoredMembership::new(Some(entry.log_id), membership);
                            outcomes.push(BatchOutcome::default());
                        }
                    }
                }
                // Prune the watch history in steps of an eighth of its length, not every write.
                let slack = (history / 8).max(1);
                if state.revision > state.compacted_revision + history + slack {
                    let cut = state.revision - history;
                    changes.retain_in(..=cut, |_, _| false)?;
                    state.compacted_revision = cut;
                }
                meta.insert(META_STATE_MACHINE, serde_json::to_vec(&state)?.as_slice())?;
                if let Some(committed) = database.lock_unsaved_committed().take() {
                    meta.insert(META_COMMITTED, committed.as_slice())?;
                }
            }
            transaction.commit()?;
            Ok((outcomes, changed_revision))
        };
        // A small commit that is not durable does no IO and takes about 0.1 ms: it runs here,
        // without the hop to the blocking pool, which costs as much on the path of every write.
        let (outcomes, changed_revision) = if durable || transactions > INLINE_APPLY_TRANSACTIONS {
            run_blocking(apply_all).await
        } else {
            apply_all()
        }
        .map_err(|error| StorageIOError::write_state_machine(&error))?;
        if let Some(revision) = changed_revision {
            // No receiver is not an error: nobody is watching.
            let _ = self.notices.send(ChangeNotice::Changes { revision });
        }
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            database: self.database.clone(),
            snapshot_counter: self.snapshot_counter.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let signature = meta.signature();
        let decoded_revision = records::decode_snapshot(&data)
            .map_err(|error| StorageIOError::read_snapshot(Some(signature.clone()), &error))?
            .revision;
        let database = self.database.clone();
        let meta = meta.clone();
        run_blocking(move || {
            let decoded = records::decode_snapshot(&data)?;
            let transaction = database.database.begin_write()?;
            {
                transaction.delete_table(KV)?;
                transaction.delete_table(CHANGES)?;
                transaction.open_table(CHANGES)?;
                let mut kv = transaction.open_table(KV)?;
                for (key, record) in &decoded.entries {
                    kv.insert(*key, *record)?;
                }
                let state = StateMachineMeta {
                    last_applied: meta.last_log_id,
                    last_membership: meta.last_membership.clone(),
                    revision: decoded.revision,
                    compacted_revision: decoded.revision,
                };
                let mut meta_table = transaction.open_table(META)?;
                meta_table.insert(META_STATE_MACHINE, serde_json::to_vec(&state)?.as_slice())?;
                let mut snapshot_table = transaction.open_table(SNAPSHOT)?;
                snapshot_table.insert(SNAPSHOT_META, serde_json::to_vec(&meta)?.as_slice())?;
                snapshot_table.insert(SNAPSHOT_DATA, data.as_slice())?;
            }
            transaction.commit()?;
            Ok(())
        })
        .await
        .map_err(|error| StorageIOError::write_snapshot(Some(signature), &error))?;
        tracing::info!(
            revision = decoded_revision,
            "installed a snapshot from the leader"
        );
        let _ = self.notices.send(ChangeNotice::Reset);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        read_current_snapshot(&self.database)
            .map_err(|error| StorageIOError::read_snapshot(None, &error).into())
    }
}

fn read_current_snapshot(
    database: &StoreDatabase,
) -> std::result::Result<Option<Snapshot<TypeConfig>>, OperationError> {
    let transaction = database.database.begin_read()?;
    let table = transaction.open_table(SNAPSHOT)?;
    let Some(meta) = read_json::<SnapshotMeta<NodeId, Node>>(&table, SNAPSHOT_META)? else {
        return Ok(None);
    };
    let data = match table.get(SNAPSHOT_DATA)? {
        Some(guard) => guard.value().to_vec(),
        None => return Ok(None),
    };
    Ok(Some(Snapshot {
        meta,
        snapshot: Box::new(Cursor::new(data)),
    }))
}

/// Builds a snapshot from one consistent read of the key-value table.
pub(crate) struct SnapshotBuilder {
    database: Arc<StoreDatabase>,
    snapshot_counter: Arc<AtomicU64>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let database = self.database.clone();
        let sequence = self.snapshot_counter.fetch_add(1, Ordering::Relaxed);
        let (meta, data) = run_blocking(move || {
            let read = database.database.begin_read()?;
            let state = read_state_machine_meta(&read.open_table(META)?)?;
            let mut data = Vec::new();
            records::encode_snapshot_header(state.revision, &mut data);
            for item in read.open_table(KV)?.iter()? {
                let (key, record) = item?;
                records::encode_snapshot_entry(key.value(), record.value(), &mut data);
            }
            drop(read);
            let snapshot_id = match &state.last_applied {
                Some(log_id) => format!(
                    "{}-{}-{}-r{}-{}",
                    log_id.leader_id.term,
                    log_id.leader_id.node_id,
                    log_id.index,
                    state.revision,
                    sequence
                ),
                None => format!("empty-r{}-{}", state.revision, sequence),
            };
            let meta = SnapshotMeta {
                last_log_id: state.last_applied,
                last_membership: state.last_membership,
                snapshot_id,
            };
            let mut transaction = database.database.begin_write()?;
            transaction.set_durability(Durability::None)?;
            {
                let mut table = transaction.open_table(SNAPSHOT)?;
                // Never replace a newer snapshot (one installed from the leader meanwhile).
                let current: Option<SnapshotMeta<NodeId, Node>> = read_json(&table, SNAPSHOT_META)?;
                let is_newer = current
                    .as_ref()
                    .is_none_or(|current| current.last_log_id <= meta.last_log_id);
                if is_newer {
                    table.insert(SNAPSHOT_META, serde_json::to_vec(&meta)?.as_slice())?;
                    table.insert(SNAPSHOT_DATA, data.as_slice())?;
                }
            }
            transaction.commit()?;
            Ok((meta, data))
        })
        .await
        .map_err(|error| StorageIOError::write_snapshot(None, &error))?;
        tracing::debug!(snapshot = %meta.snapshot_id, bytes = data.len(), "built a snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_format_version_is_refused_with_a_clear_error() {
        let directory = tempfile::tempdir().expect("tempdir");
        {
            let database = StoreDatabase::open(directory.path()).expect("open fresh");
            database.force_format_version(FORMAT_VERSION + 1);
        }
        let error =
            StoreDatabase::open(directory.path()).expect_err("newer format must be refused");
        assert!(
            matches!(error, StoreError::FormatVersion { found, supported, .. } if found == FORMAT_VERSION + 1 && supported == FORMAT_VERSION),
            "{error}"
        );
        assert!(error.to_string().contains("upgrade novacron"), "{error}");
    }

    #[test]
    fn a_version_1_store_moves_its_log_out_of_redb_once() {
        let directory = tempfile::tempdir().expect("tempdir");
        let entry = |index: u64| {
            serde_json::to_vec(&Entry::<TypeConfig> {
                log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
                payload: EntryPayload::Blank,
            })
            .expect("encode")
        };
        {
            // A version-1 store: entries 3..=6 in the `log` table, 1..=2 purged.
            let database = StoreDatabase::open(directory.path()).expect("open fresh");
            database.force_format_version(1);
            let transaction = database.database.begin_write().expect("begin");
            {
                let mut log = transaction.open_table(LOG).expect("log");
                for index in 3..=6 {
                    log.insert(index, entry(index).as_slice()).expect("insert");
                }
                let purged = serde_json::to_vec(&Some(LogId::new(
                    openraft::CommittedLeaderId::new(1, 1),
                    2u64,
                )))
                .expect("encode");
                transaction
                    .open_table(META)
                    .expect("meta")
                    .insert(META_LAST_PURGED, purged.as_slice())
                    .expect("insert");
            }
            transaction.commit().expect("commit");
        }
        for _ in 0..2 {
            let database = StoreDatabase::open(directory.path()).expect("open version 1");
            let files = database.open_log(directory.path()).expect("move the log");
            assert_eq!(files.bounds(), Some((3, 7)));
            assert_eq!(
                files.read(0, u64::MAX, None).expect("read"),
                (3..=6).map(entry).collect::<Vec<_>>()
            );
            let transaction = database.database.begin_read().expect("read");
            assert!(
                transaction
                    .open_table(LOG)
                    .expect("log")
                    .first()
                    .expect("first")
                    .is_none()
            );
            let version = transaction
                .open_table(META)
                .expect("meta")
                .get(META_FORMAT_VERSION)
                .expect("get")
                .and_then(|guard| decode_u64(guard.value()));
            assert_eq!(version, Some(FORMAT_VERSION));
        }
    }

    #[test]
    fn second_open_in_the_same_process_is_refused() {
        let directory = tempfile::tempdir().expect("tempdir");
        let _first = StoreDatabase::open(directory.path()).expect("open");
        let error = StoreDatabase::open(directory.path()).expect_err("second open must fail");
        assert!(matches!(error, StoreError::AlreadyOpen { .. }), "{error}");
    }
}

#[cfg(test)]
mod conformance {
    //! openraft's own storage conformance suite (`openraft::testing::Suite`) run against the
    //! segment-file log and the redb state machine.

    use openraft::testing::{StoreBuilder, Suite};

    use super::*;

    struct RedbStoreBuilder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for RedbStoreBuilder {
        async fn build(&self) -> StorageResult<(tempfile::TempDir, LogStore, StateMachineStore)> {
            let directory = tempfile::tempdir().map_err(|error| StorageIOError::write(&error))?;
            let database = StoreDatabase::open(directory.path())
                .map_err(|error| StorageIOError::write(&error))?;
            let (notices, _) = broadcast::channel(16);
            let files = database
                .open_log(directory.path())
                .map_err(|error| StorageIOError::write(&error))?;
            let log = LogStore::new(database.clone(), files);
            let state_machine = StateMachineStore::new(database, notices, 100);
            Ok((directory, log, state_machine))
        }
    }

    #[test]
    fn openraft_storage_suite() {
        Suite::test_all(RedbStoreBuilder).expect("openraft storage suite");
    }
}
