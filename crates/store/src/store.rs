//! [`Store`]: the handle the rest of NovaCron uses. It opens the redb database, starts openraft
//! on it, bootstraps a one-voter cluster on a fresh directory, and offers transactions, reads,
//! watches, membership changes and metrics in plain NovaCron types.
//!
//! It owns the raft instance; it does not own any network listener (a transport calls
//! [`Store::handle_raft_message`] for incoming raft traffic).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{
    CheckIsLeaderError, ClientWriteError, Fatal, ForwardToLeader, InitializeError, RaftError,
};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, VoteRequest,
};
use openraft::storage::RaftLogStorage;
use openraft::{ChangeMembers, Raft, RaftMetrics, ServerState, SnapshotPolicy};
use tokio::sync::{Semaphore, broadcast, mpsc, oneshot, watch};

use crate::error::{LeaderHint, Result, StoreError};
use crate::kv::{Consistency, KeyValue, Listing, Transaction, TransactionOutcome, validate_key};
use crate::network::{
    NetworkFactory, NoTransport, RaftMessage, RaftMessageKind, RaftTransport, SnapshotChunk,
    decode_message, encode_message,
};
use crate::raft_types::{Node, NodeId, TypeConfig, WriteBatch};
use crate::storage::{LogStore, StateMachineStore, StoreDatabase};
use crate::watch::{ChangeNotice, Watcher};

/// What `open` does with a data directory that holds no raft state yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Bootstrap {
    /// Initialize a cluster whose only voter is this node, and wait until it leads.
    #[default]
    SingleNode,
    /// Stay uninitialized and wait to be added by an existing cluster's leader.
    JoinExisting,
}

/// Raft timing. The defaults suit a LAN; issue 4 derives them from measured RTT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftTiming {
    /// How often the leader sends heartbeats.
    pub heartbeat_interval: Duration,
    /// Lower bound of the randomized election timeout.
    pub election_timeout_min: Duration,
    /// Upper bound of the randomized election timeout.
    pub election_timeout_max: Duration,
}

impl Default for RaftTiming {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(50),
            election_timeout_min: Duration::from_millis(150),
            election_timeout_max: Duration::from_millis(300),
        }
    }
}

/// Everything [`Store::open`] needs.
#[derive(Clone)]
pub struct StoreConfig {
    /// Directory of the store's files (created if missing). Only one process may use it.
    pub data_dir: PathBuf,
    /// This node's raft id; unique in the cluster, never reused for another host.
    pub node_id: u64,
    /// The address other nodes reach this node's raft endpoint at.
    pub node_address: String,
    /// What to do on a fresh directory.
    pub bootstrap: Bootstrap,
    /// How raft messages reach other nodes; `None` for a single node.
    pub transport: Option<Arc<dyn RaftTransport>>,
    /// Raft heartbeat and election timing.
    pub timing: RaftTiming,
    /// How long `open` waits for this node to lead a single-node cluster.
    pub startup_timeout: Duration,
    /// How long a write or a linearizable read may take before failing with `Timeout`.
    pub request_timeout: Duration,
    /// How many revisions of change history are kept for watches that resume from the past.
    pub watch_history_revisions: u64,
    /// How many change notices are buffered per watcher; a watcher that misses notices catches
    /// up from the history (it fails with `WatchLagged` only when the history no longer holds
    /// what it missed).
    pub watch_buffer: usize,
    /// Build a snapshot (and purge the log before it) after this many log entries.
    pub snapshot_after_log_entries: u64,
    /// Most transactions proposed together in one raft entry (group commit).
    pub max_write_batch: usize,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("StoreConfig")
            .field("data_dir", &self.data_dir)
            .field("node_id", &self.node_id)
            .field("node_address", &self.node_address)
            .field("bootstrap", &self.bootstrap)
            .field("transport", &self.transport.as_ref().map(|_| "configured"))
            .field("timing", &self.timing)
            .field("startup_timeout", &self.startup_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("watch_history_revisions", &self.watch_history_revisions)
            .field("watch_buffer", &self.watch_buffer)
            .field(
                "snapshot_after_log_entries",
                &self.snapshot_after_log_entries,
            )
            .field("max_write_batch", &self.max_write_batch)
            .finish()
    }
}

impl StoreConfig {
    /// A single-node configuration with default tuning.
    pub fn new(
        data_dir: impl Into<PathBuf>,
        node_id: u64,
        node_address: impl Into<String>,
    ) -> Self {
        Self {
            data_dir: data_dir.into(),
            node_id,
            node_address: node_address.into(),
            bootstrap: Bootstrap::SingleNode,
            transport: None,
            timing: RaftTiming::default(),
            startup_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            watch_history_revisions: 10_000,
            watch_buffer: 4096,
            snapshot_after_log_entries: 10_000,
            max_write_batch: 512,
        }
    }

    fn raft_config(&self) -> Result<openraft::Config> {
        let millis = |duration: Duration| u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        if self.node_address.is_empty() {
            return Err(StoreError::Config {
                message: "node_address must not be empty".into(),
            });
        }
        if self.watch_buffer == 0 {
            return Err(StoreError::Config {
                message: "watch_buffer must be at least 1".into(),
            });
        }
        validate_timing(&self.timing)?;
        // The timers are run by `timers`, from the live timing; openraft keeps the
        // append-entries deadline and the leader lease (see `timers`).
        let deadline = crate::timers::rpc_deadline(&self.timing);
        let lease = crate::timers::leader_lease(deadline);
        let config = openraft::Config {
            cluster_name: "novacron".into(),
            heartbeat_interval: millis(deadline),
            election_timeout_min: millis(lease) - 1,
            election_timeout_max: millis(lease),
            enable_heartbeat: false,
            enable_elect: false,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_after_log_entries.max(1)),
            max_in_snapshot_log_to_keep: (self.snapshot_after_log_entries / 10).max(1),
            ..Default::default()
        };
        config.validate().map_err(|error| StoreError::Config {
            message: format!("raft timing: {error}"),
        })
    }
}

/// Checks a raft timing: a heartbeat, and an election timeout range above it.
fn validate_timing(timing: &RaftTiming) -> Result<()> {
    let problem = if timing.heartbeat_interval < Duration::from_millis(1) {
        Some("the heartbeat interval must be at least 1 ms".to_string())
    } else if timing.election_timeout_min <= timing.heartbeat_interval {
        Some(format!(
            "the election timeout ({:?}) must be longer than the heartbeat interval ({:?})",
            timing.election_timeout_min, timing.heartbeat_interval
        ))
    } else if timing.election_timeout_max <= timing.election_timeout_min {
        Some(format!(
            "the election timeout range {:?}..{:?} is empty",
            timing.election_timeout_min, timing.election_timeout_max
        ))
    } else {
        None
    };
    match problem {
        Some(problem) => Err(StoreError::Config {
            message: format!("raft timing: {problem}"),
        }),
        None => Ok(()),
    }
}

/// Role of a node in its raft group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeRole {
    /// Leads the group: serves writes and linearizable reads.
    Leader,
    /// A voter following the leader.
    Follower,
    /// A voter asking for votes.
    Candidate,
    /// A non-voting member receiving the log.
    Learner,
    /// Raft has stopped on this node.
    Shutdown,
}

/// Membership of the raft group as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct ClusterMembership {
    /// Voters (in a joint configuration: the union of both configurations).
    pub voters: BTreeSet<u64>,
    /// Members that receive the log without voting.
    pub learners: BTreeSet<u64>,
    /// Address of every member.
    pub addresses: BTreeMap<u64, String>,
    /// Whether a membership change is half-way (joint consensus).
    pub joint: bool,
    /// In a joint configuration: the voters of its newer half, where the change was going.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joint_target: Option<BTreeSet<u64>>,
}

/// A snapshot of this node's raft state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreMetrics {
    /// This node.
    pub node_id: u64,
    /// Its role.
    pub role: NodeRole,
    /// The leader it knows of.
    pub leader_id: Option<u64>,
    /// Current raft term.
    pub term: u64,
    /// Index of the last entry in its log.
    pub last_log_index: Option<u64>,
    /// Index of the last entry applied to its state machine.
    pub last_applied_index: Option<u64>,
    /// Index covered by its current snapshot.
    pub snapshot_index: Option<u64>,
    /// Index up to which its log was purged.
    pub purged_index: Option<u64>,
    /// Milliseconds since a quorum last acknowledged this leader (leaders only).
    pub millis_since_quorum_ack: Option<u64>,
    /// Membership.
    pub membership: ClusterMembership,
    /// On a leader: per member, the highest log index known to be replicated to it.
    pub replication: BTreeMap<u64, Option<u64>>,
}

impl StoreMetrics {
    fn from_raft(metrics: &RaftMetrics<NodeId, Node>) -> Self {
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let learners: BTreeSet<u64> = membership.learner_ids().collect();
        let addresses = membership
            .nodes()
            .map(|(id, node)| (*id, node.addr.clone()))
            .collect();
        let role = match metrics.state {
            ServerState::Leader => NodeRole::Leader,
            ServerState::Follower => NodeRole::Follower,
            ServerState::Candidate => NodeRole::Candidate,
            ServerState::Learner => NodeRole::Learner,
            ServerState::Shutdown => NodeRole::Shutdown,
        };
        Self {
            node_id: metrics.id,
            role,
            leader_id: metrics.current_leader,
            term: metrics.current_term,
            last_log_index: metrics.last_log_index,
            last_applied_index: metrics.last_applied.map(|log_id| log_id.index),
            snapshot_index: metrics.snapshot.map(|log_id| log_id.index),
            purged_index: metrics.purged.map(|log_id| log_id.index),
            millis_since_quorum_ack: metrics.millis_since_quorum_ack,
            replication: metrics
                .replication
                .as_ref()
                .map(|replication| {
                    replication
                        .iter()
                        .map(|(node_id, matched)| (*node_id, matched.map(|log_id| log_id.index)))
                        .collect()
                })
                .unwrap_or_default(),
            membership: ClusterMembership {
                voters,
                learners,
                addresses,
                joint: membership.get_joint_config().len() > 1,
                joint_target: (membership.get_joint_config().len() > 1)
                    .then(|| membership.get_joint_config().last().cloned())
                    .flatten(),
            },
        }
    }
}

/// The replicated key-value store of one node. Cheap to clone; all clones share one raft
/// instance. Call [`Store::shutdown`] before dropping the last clone.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<StoreInner>,
}

pub(crate) struct StoreInner {
    node_id: NodeId,
    node_address: String,
    raft: Raft<TypeConfig>,
    database: Arc<StoreDatabase>,
    notices: broadcast::Sender<ChangeNotice>,
    stopped: watch::Sender<bool>,
    request_timeout: Duration,
    write_queue: mpsc::Sender<WriteRequest>,
    /// The live raft timing the timers run on.
    timing: watch::Sender<RaftTiming>,
    contact: Arc<crate::timers::LeaderContact>,
    /// The last log index on disk when this store opened: the least a read index may be while
    /// this node leads (see [`Store::ensure_consistency`]).
    opened_log_index: u64,
    /// Held across each membership call: openraft refuses a change while another is
    /// uncommitted, and its two-step voter change would be left joint if a learner's admission
    /// slipped in between the steps.
    membership_changes: tokio::sync::Mutex<()>,
}

/// A transaction waiting for the batcher, with the way back to its caller.
struct WriteRequest {
    transaction: Transaction,
    reply: oneshot::Sender<Result<TransactionOutcome>>,
}

/// Upper bound of the keys and values of one batch, so one raft entry stays small enough to
/// replicate quickly.
const MAX_WRITE_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Batches proposed to raft and not yet answered. While they are in flight, new transactions
/// queue up and form the next batch: one log append and one fsync for all of them.
const WRITE_BATCHES_IN_FLIGHT: usize = 2;

fn transaction_size(transaction: &Transaction) -> usize {
    let conditions: usize = transaction
        .conditions
        .iter()
        .map(|condition| condition.key().len() + 16)
        .sum();
    let operations: usize = transaction
        .operations
        .iter()
        .map(|operation| match operation {
            crate::kv::Operation::Put { key, value } => key.len() + value.len(),
            crate::kv::Operation::Delete { key } => key.len(),
            crate::kv::Operation::DeletePrefix { prefix } => prefix.len(),
        })
        .sum();
    conditions + operations + 16
}

/// Group commit: takes the queued transactions, proposes them as one raft entry, and answers
/// each caller with its own outcome. Ends when every `Store` handle is gone.
async fn run_write_batcher(
    raft: Raft<TypeConfig>,
    mut queue: mpsc::Receiver<WriteRequest>,
    max_write_batch: usize,
) {
    let in_flight = Arc::new(Semaphore::new(WRITE_BATCHES_IN_FLIGHT));
    while let Some(first) = queue.recv().await {
        // Wait for a slot before draining the queue, so the batch grows while raft is busy.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let mut bytes = transaction_size(&first.transaction);
        let mut batch = vec![first];
        while batch.len() < max_write_batch && bytes < MAX_WRITE_BATCH_BYTES {
            match queue.try_recv() {
                Ok(request) => {
                    bytes += transaction_size(&request.transaction);
                    batch.push(request);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let (transactions, replies): (Vec<_>, Vec<_>) = batch
                .into_iter()
                .map(|request| (request.transaction, request.reply))
                .unzip();
            let result = raft.client_write(WriteBatch { transactions }).await;
            drop(permit);
            match result {
                Ok(response) => {
                    let mut outcomes = response.data.outcomes.into_iter();
                    for reply in replies {
                        let answer = outcomes.next().ok_or_else(|| StoreError::Raft {
                            message: "a write batch returned fewer outcomes than transactions"
                                .into(),
                        });
                        let _ = reply.send(answer);
                    }
                }
                Err(error) => {
                    for reply in replies {
                        let _ = reply.send(Err(client_write_error(error.clone())));
                    }
                }
            }
        });
    }
}

impl Drop for StoreInner {
    fn drop(&mut self) {
        if !*self.stopped.borrow() {
            // Dropped without shutdown(): stop raft in the background so its tasks release
            // the database.
            let raft = self.raft.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = raft.shutdown().await;
                });
            }
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Store")
            .field("node_id", &self.inner.node_id)
            .field("node_address", &self.inner.node_address)
            .field("database", &self.inner.database.path())
            .finish()
    }
}

fn leader_hint(forward: &ForwardToLeader<NodeId, Node>) -> Option<LeaderHint> {
    forward.leader_id.map(|node_id| LeaderHint {
        node_id,
        address: forward.leader_node.as_ref().map(|node| node.addr.clone()),
    })
}

fn fatal_error(fatal: Fatal<NodeId>) -> StoreError {
    match fatal {
        Fatal::Stopped => StoreError::ShuttingDown,
        other => StoreError::Raft {
            message: other.to_string(),
        },
    }
}

fn client_write_error(error: RaftError<NodeId, ClientWriteError<NodeId, Node>>) -> StoreError {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => StoreError::NotLeader {
            leader_hint: leader_hint(&forward),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(error)) => {
            StoreError::Membership {
                message: error.to_string(),
            }
        }
        RaftError::Fatal(fatal) => fatal_error(fatal),
    }
}

fn into_fatal(error: RaftError<NodeId>) -> Fatal<NodeId> {
    match error {
        RaftError::Fatal(fatal) => fatal,
        RaftError::APIError(never) => match never {},
    }
}

impl Store {
    /// Opens the store in `config.data_dir`: on a fresh directory (with
    /// [`Bootstrap::SingleNode`]) it initializes a cluster of this node alone and returns once
    /// it leads; on an existing directory it restarts from the persisted log and state machine.
    pub async fn open(config: StoreConfig) -> Result<Store> {
        let started = Instant::now();
        let raft_config = Arc::new(config.raft_config()?);
        let data_dir = config.data_dir.clone();
        let (database, log_files) = tokio::task::spawn_blocking(move || {
            let database = StoreDatabase::open(&data_dir)?;
            let log_files = database.open_log(&data_dir)?;
            Ok::<_, StoreError>((database, log_files))
        })
        .await
        .map_err(|error| StoreError::storage("opening the database", &config.data_dir, error))??;
        let (notices, _) = broadcast::channel(config.watch_buffer);
        let transport = config
            .transport
            .clone()
            .unwrap_or_else(|| Arc::new(NoTransport));
        let contact = Arc::new(crate::timers::LeaderContact::new());
        let network = NetworkFactory {
            transport,
            source_node_id: config.node_id,
            contact: contact.clone(),
        };
        let log_store = LogStore::new(database.clone(), log_files);
        let opened_log_index = log_store
            .clone()
            .get_log_state()
            .await
            .map_err(|error| StoreError::Raft {
                message: format!("reading the raft log's state: {error}"),
            })?
            .last_log_id
            .map_or(0, |log_id| log_id.index);
        let state_machine = StateMachineStore::new(
            database.clone(),
            notices.clone(),
            config.watch_history_revisions,
        );
        let raft = Raft::new(
            config.node_id,
            raft_config,
            network,
            log_store,
            state_machine,
        )
        .await
        .map_err(fatal_error)?;
        let (stopped, _) = watch::channel(false);
        let (timing, timing_receiver) = watch::channel(config.timing);
        tokio::spawn(crate::timers::run_raft_timers(
            raft.clone(),
            config.node_id,
            timing_receiver,
            contact.clone(),
            crate::timers::leader_lease(crate::timers::rpc_deadline(&config.timing)),
            stopped.subscribe(),
        ));
        let (write_queue, write_receiver) = mpsc::channel(config.max_write_batch.max(1) * 4);
        tokio::spawn(run_write_batcher(
            raft.clone(),
            write_receiver,
            config.max_write_batch.max(1),
        ));
        let store = Store {
            inner: Arc::new(StoreInner {
                node_id: config.node_id,
                node_address: config.node_address.clone(),
                raft,
                database,
                notices,
                stopped,
                request_timeout: config.request_timeout,
                write_queue,
                timing,
                contact,
                opened_log_index,
                membership_changes: tokio::sync::Mutex::new(()),
            }),
        };
        if config.bootstrap == Bootstrap::SingleNode {
            store.bootstrap_single_node(&config).await?;
        }
        tracing::info!(
            node_id = config.node_id,
            data_dir = %config.data_dir.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "store opened"
        );
        Ok(store)
    }

    async fn bootstrap_single_node(&self, config: &StoreConfig) -> Result<()> {
        let raft = &self.inner.raft;
        let initialized = raft.is_initialized().await.map_err(fatal_error)?;
        if !initialized {
            let members =
                BTreeMap::from([(config.node_id, Node::new(config.node_address.clone()))]);
            match raft.initialize(members).await {
                Ok(()) => {}
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(RaftError::APIError(error)) => {
                    return Err(StoreError::Raft {
                        message: error.to_string(),
                    });
                }
                Err(RaftError::Fatal(fatal)) => return Err(fatal_error(fatal)),
            }
        }
        // The metrics are published by raft's own task: wait until they show the membership.
        let metrics = self
            .wait_for(
                "raft to load its membership",
                config.startup_timeout,
                |metrics| !metrics.membership.voters.is_empty(),
            )
            .await?;
        let only_voter = metrics.membership.voters == BTreeSet::from([config.node_id]);
        if !only_voter {
            // A member of a larger cluster: its peers elect a leader; don't block start-up.
            return Ok(());
        }
        let node_id = config.node_id;
        let leads = |metrics: &StoreMetrics| {
            metrics.leader_id == Some(node_id) && metrics.role == NodeRole::Leader
        };
        let deadline = Instant::now() + config.startup_timeout;
        if initialized {
            // A restarted sole voter whose vote was committed restores itself as leader at
            // once. Otherwise, alone, there is nobody to wait for: campaign now rather than after
            // an election timeout. (A fresh cluster campaigns inside `initialize`.)
            let quick = self
                .wait_for(
                    "leadership restored",
                    config.timing.heartbeat_interval,
                    leads,
                )
                .await;
            if quick.is_err() && self.metrics().role == NodeRole::Follower {
                raft.trigger().elect().await.map_err(fatal_error)?;
            }
        }
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            self.wait_for(
                "this node to lead its single-node cluster",
                remaining,
                leads,
            )
            .await?;
            // Confirm with raft itself (the metrics may lag behind a new election).
            match raft.ensure_linearizable().await {
                Ok(_) => return Ok(()),
                Err(RaftError::APIError(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(RaftError::APIError(error)) => {
                    return Err(StoreError::Raft {
                        message: format!("single-node cluster did not settle: {error}"),
                    });
                }
                Err(RaftError::Fatal(fatal)) => return Err(fatal_error(fatal)),
            }
        }
    }

    /// The raft timing this node runs on now.
    pub fn timing(&self) -> RaftTiming {
        *self.inner.timing.borrow()
    }

    /// Runs this node's heartbeats and elections on `timing` from now on (no restart; see
    /// [`crate::timers`]). The append-entries deadline stays the one this store opened with.
    pub fn set_timing(&self, timing: RaftTiming) -> Result<()> {
        validate_timing(&timing)?;
        self.inner.timing.send_if_modified(|current| {
            let changed = *current != timing;
            *current = timing;
            changed
        });
        Ok(())
    }

    /// This node's raft id.
    pub fn node_id(&self) -> u64 {
        self.inner.node_id
    }

    /// This node's raft address.
    pub fn node_address(&self) -> &str {
        &self.inner.node_address
    }

    /// Path of the database file.
    pub fn database_path(&self) -> PathBuf {
        self.inner.database.path().to_path_buf()
    }

    fn check_running(&self) -> Result<()> {
        if *self.inner.stopped.borrow() {
            return Err(StoreError::ShuttingDown);
        }
        Ok(())
    }

    async fn with_timeout<T>(
        &self,
        operation: &str,
        future: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let timeout = self.inner.request_timeout;
        match tokio::time::timeout(timeout, future).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout {
                operation: operation.to_string(),
                timeout,
            }),
        }
    }

    /// Proposes a transaction through raft and returns its outcome. A transaction whose
    /// condition fails is not an error here: see [`TransactionOutcome::succeeded`] (or use
    /// [`TransactionOutcome::into_result`]).
    pub async fn transaction(&self, transaction: Transaction) -> Result<TransactionOutcome> {
        self.check_running()?;
        transaction.validate()?;
        self.with_timeout("write", async {
            let (reply, answer) = oneshot::channel();
            self.inner
                .write_queue
                .send(WriteRequest { transaction, reply })
                .await
                .map_err(|_| StoreError::ShuttingDown)?;
            answer.await.map_err(|_| StoreError::ShuttingDown)?
        })
        .await
    }

    /// Creates or replaces a key; returns the new revision.
    pub async fn put(&self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Result<u64> {
        let outcome = self.transaction(Transaction::new().put(key, value)).await?;
        Ok(outcome.revision)
    }

    /// Creates a key that must not exist yet; fails with `ConditionFailed` when it does.
    pub async fn create(&self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Result<u64> {
        let key = key.into();
        let transaction = Transaction::new().when_absent(key.clone()).put(key, value);
        Ok(self.transaction(transaction).await?.into_result()?.revision)
    }

    /// Replaces a key only if it was last modified at `expected_mod_revision`
    /// (compare-and-swap); fails with `ConditionFailed` otherwise.
    pub async fn update(
        &self,
        key: impl Into<String>,
        value: impl Into<Vec<u8>>,
        expected_mod_revision: u64,
    ) -> Result<u64> {
        let key = key.into();
        let transaction = Transaction::new()
            .when_mod_revision(key.clone(), expected_mod_revision)
            .put(key, value);
        Ok(self.transaction(transaction).await?.into_result()?.revision)
    }

    /// Deletes a key; returns whether it existed.
    pub async fn delete(&self, key: impl Into<String>) -> Result<bool> {
        let outcome = self.transaction(Transaction::new().delete(key)).await?;
        Ok(outcome.deleted_keys > 0)
    }

    /// Deletes every key under a prefix; returns how many.
    pub async fn delete_prefix(&self, prefix: impl Into<String>) -> Result<u64> {
        let outcome = self
            .transaction(Transaction::new().delete_prefix(prefix))
            .await?;
        Ok(outcome.deleted_keys)
    }

    async fn ensure_consistency(&self, consistency: Consistency) -> Result<()> {
        self.check_running()?;
        if consistency == Consistency::Local {
            return Ok(());
        }
        self.with_timeout("linearizable read", async {
            match self.inner.raft.ensure_linearizable().await {
                Ok(_) => self.wait_for_opened_log().await,
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward))) => {
                    Err(StoreError::NotLeader {
                        leader_hint: leader_hint(&forward),
                    })
                }
                Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(error))) => {
                    Err(StoreError::NoQuorum {
                        message: error.to_string(),
                    })
                }
                Err(RaftError::Fatal(fatal)) => Err(fatal_error(fatal)),
            }
        })
        .await
    }

    /// Waits, on a leader, until its state machine has applied the log it found on disk when it
    /// opened.
    ///
    /// openraft's read index is the larger of the leader's first entry of its term and its
    /// commit index. A leader restarted in the same term (its vote was committed) keeps its
    /// old first entry, and its commit index is the one saved with the last durable apply:
    /// after `kill -9` both can be older than writes it had committed and acknowledged before
    /// it died, which are in its (durable) log. Every such write is at or below the log's last
    /// index at start-up, and a leader's log holds every committed entry, so reads wait for
    /// that index too. It is reached once the restarted leader commits its log again.
    async fn wait_for_opened_log(&self) -> Result<()> {
        let opened = self.inner.opened_log_index;
        let applied =
            (self.inner.raft.metrics().borrow().last_applied).map_or(0, |log_id| log_id.index);
        if applied >= opened {
            return Ok(());
        }
        self.wait_for_applied(opened).await
    }

    /// The log index a linearizable read must see (raft read-index), confirmed with a quorum by
    /// this node, which must be the leader (else `NotLeader`). A follower serves a linearizable
    /// read by asking the leader for this index, waiting with [`Store::wait_for_applied`] until
    /// its own state machine has applied it, and then reading locally.
    pub async fn read_index(&self) -> Result<u64> {
        self.check_running()?;
        self.with_timeout("read index", async {
            match self.inner.raft.get_read_log_id().await {
                Ok((read_log_id, _applied)) => Ok(read_log_id
                    .map_or(0, |log_id| log_id.index)
                    .max(self.inner.opened_log_index)),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward))) => {
                    Err(StoreError::NotLeader {
                        leader_hint: leader_hint(&forward),
                    })
                }
                Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(error))) => {
                    Err(StoreError::NoQuorum {
                        message: error.to_string(),
                    })
                }
                Err(RaftError::Fatal(fatal)) => Err(fatal_error(fatal)),
            }
        })
        .await
    }

    /// Waits until this node's state machine has applied the log up to `index` (at most the
    /// store's request timeout).
    pub async fn wait_for_applied(&self, index: u64) -> Result<()> {
        self.check_running()?;
        if index == 0 {
            return Ok(());
        }
        self.wait_for(
            &format!("the state machine to apply log index {index}"),
            self.inner.request_timeout,
            |metrics| {
                metrics
                    .last_applied_index
                    .is_some_and(|applied| applied >= index)
            },
        )
        .await?;
        Ok(())
    }

    /// How long a write or a linearizable read may take (`StoreConfig::request_timeout`).
    pub fn request_timeout(&self) -> Duration {
        self.inner.request_timeout
    }

    /// Reads one key.
    pub async fn get(&self, key: &str, consistency: Consistency) -> Result<Option<KeyValue>> {
        validate_key(key)?;
        self.ensure_consistency(consistency).await?;
        self.inner.database.get(key)
    }

    /// Lists every key under `prefix` (empty: all keys), ordered by key, with the revision of
    /// the read.
    pub async fn list(&self, prefix: &str, consistency: Consistency) -> Result<Listing> {
        if !prefix.is_empty() {
            validate_key(prefix)?;
        }
        self.ensure_consistency(consistency).await?;
        self.inner.database.list(prefix, None)
    }

    /// Like [`Store::list`], at most `limit` items.
    pub async fn list_limited(
        &self,
        prefix: &str,
        limit: usize,
        consistency: Consistency,
    ) -> Result<Listing> {
        if !prefix.is_empty() {
            validate_key(prefix)?;
        }
        self.ensure_consistency(consistency).await?;
        self.inner.database.list(prefix, Some(limit))
    }

    /// The revision of this node's state machine.
    pub fn current_revision(&self) -> Result<u64> {
        Ok(self.inner.database.read_state_machine_meta()?.revision)
    }

    /// Watches changes under `prefix` (empty: everything) starting at `from_revision`
    /// (inclusive; 0: only changes after now). To follow a prefix without gaps, list it and
    /// watch from the listing's revision + 1. Works on every node, from its local state.
    pub fn watch(&self, prefix: &str, from_revision: u64) -> Result<Watcher> {
        self.check_running()?;
        if !prefix.is_empty() {
            validate_key(prefix)?;
        }
        Watcher::start(
            &self.inner.database,
            prefix.to_string(),
            from_revision,
            &self.inner.notices,
            self.inner.stopped.subscribe(),
        )
    }

    /// The current raft state of this node.
    pub fn metrics(&self) -> StoreMetrics {
        StoreMetrics::from_raft(&self.inner.raft.metrics().borrow())
    }

    /// Waits until `condition` holds for this node's metrics, at most `timeout`.
    pub async fn wait_for(
        &self,
        description: &str,
        timeout: Duration,
        condition: impl Fn(&StoreMetrics) -> bool,
    ) -> Result<StoreMetrics> {
        let mut receiver = self.inner.raft.metrics();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let metrics = StoreMetrics::from_raft(&receiver.borrow_and_update());
            if condition(&metrics) {
                return Ok(metrics);
            }
            if metrics.role == NodeRole::Shutdown {
                return Err(StoreError::ShuttingDown);
            }
            match tokio::time::timeout_at(deadline, receiver.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(StoreError::ShuttingDown),
                Err(_) => {
                    return Err(StoreError::Timeout {
                        operation: format!("waiting for {description}"),
                        timeout,
                    });
                }
            }
        }
    }

    /// Waits until this node knows a leader; returns its id.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<u64> {
        let metrics = self
            .wait_for("a raft leader", timeout, |metrics| {
                metrics.leader_id.is_some()
            })
            .await?;
        metrics.leader_id.ok_or(StoreError::ShuttingDown)
    }

    /// Adds a node as a learner (leader only) and waits until it has caught up with the log.
    ///
    /// The learner is a member as soon as this returns or fails with `Timeout` (it then keeps
    /// catching up in the background: watch `StoreMetrics::replication`).
    pub async fn add_learner(&self, node_id: u64, address: impl Into<String>) -> Result<()> {
        self.check_running()?;
        let address = address.into();
        let response = self
            .with_timeout("adding a learner", async {
                let _one_change = self.inner.membership_changes.lock().await;
                self.inner
                    .raft
                    .add_learner(node_id, Node::new(address), false)
                    .await
                    .map_err(client_write_error)
            })
            .await?;
        let target = response.log_id.index;
        self.wait_for(
            &format!("learner {node_id} to catch up with the log"),
            self.inner.request_timeout,
            |metrics| {
                metrics
                    .replication
                    .get(&node_id)
                    .is_some_and(|matched| matched.is_some_and(|index| index >= target))
            },
        )
        .await?;
        Ok(())
    }

    /// Makes `voters` the set of voters (leader only), through joint consensus. Every new
    /// voter must already be a learner; removed voters stay as learners.
    pub async fn change_membership(&self, voters: BTreeSet<u64>) -> Result<()> {
        self.check_running()?;
        if voters.is_empty() {
            return Err(StoreError::Membership {
                message: "the set of voters must not be empty".into(),
            });
        }
        self.with_timeout("changing the voters", async {
            let _one_change = self.inner.membership_changes.lock().await;
            self.inner
                .raft
                .change_membership(ChangeMembers::ReplaceAllVoters(voters), true)
                .await
                .map_err(client_write_error)
        })
        .await?;
        Ok(())
    }

    /// Changes the raft address recorded for a member (leader only): used when a one-host
    /// store becomes the first host of a region and its raft endpoint moves from a placeholder
    /// to a real listener. The node must already be a member.
    pub async fn set_node_address(&self, node_id: u64, address: impl Into<String>) -> Result<()> {
        self.check_running()?;
        let address = address.into();
        let membership = self.metrics().membership;
        if !membership.voters.contains(&node_id) && !membership.learners.contains(&node_id) {
            return Err(StoreError::Membership {
                message: format!("node {node_id} is not a member; cannot change its address"),
            });
        }
        if membership.addresses.get(&node_id) == Some(&address) {
            return Ok(());
        }
        self.with_timeout("changing a node's address", async {
            let _one_change = self.inner.membership_changes.lock().await;
            self.inner
                .raft
                .change_membership(
                    ChangeMembers::SetNodes(BTreeMap::from([(node_id, Node::new(address))])),
                    false,
                )
                .await
                .map_err(client_write_error)
        })
        .await?;
        Ok(())
    }

    /// Removes learners from the cluster (leader only). Demote a voter with
    /// [`Store::change_membership`] first.
    pub async fn remove_learners(&self, node_ids: BTreeSet<u64>) -> Result<()> {
        self.check_running()?;
        self.with_timeout("removing learners", async {
            let _one_change = self.inner.membership_changes.lock().await;
            self.inner
                .raft
                .change_membership(ChangeMembers::RemoveNodes(node_ids), false)
                .await
                .map_err(client_write_error)
        })
        .await?;
        Ok(())
    }

    /// Handles a raft message from a peer (called by the transport's server side) and returns
    /// the reply body to send back.
    pub async fn handle_raft_message(&self, message: RaftMessage) -> Result<Vec<u8>> {
        self.check_running()?;
        let raft = &self.inner.raft;
        let invalid = |error: &dyn std::fmt::Display| StoreError::InvalidRaftMessage {
            kind: message.kind.to_string(),
            message: error.to_string(),
        };
        let reply = match message.kind {
            RaftMessageKind::AppendEntries => {
                let request: AppendEntriesRequest<TypeConfig> =
                    decode_message(&message.body).map_err(|error| invalid(&error))?;
                let result = raft.append_entries(request).await.map_err(into_fatal);
                if matches!(&result, Ok(response) if !matches!(response, AppendEntriesResponse::HigherVote(_)))
                {
                    self.inner.contact.touch();
                }
                encode_message(&result)
            }
            RaftMessageKind::Vote => {
                let request: VoteRequest<NodeId> =
                    decode_message(&message.body).map_err(|error| invalid(&error))?;
                let result = raft.vote(request).await.map_err(into_fatal);
                if matches!(&result, Ok(response) if response.vote_granted) {
                    self.inner.contact.touch();
                }
                encode_message(&result)
            }
            RaftMessageKind::InstallSnapshot => {
                let chunk: SnapshotChunk =
                    decode_message(&message.body).map_err(|error| invalid(&error))?;
                let result = raft
                    .install_snapshot(InstallSnapshotRequest::from(chunk))
                    .await;
                if result.is_ok() {
                    self.inner.contact.touch();
                }
                encode_message(&result)
            }
        };
        reply.map_err(|error| invalid(&error))
    }

    /// Asks raft to build a snapshot now (normally it does so every
    /// `snapshot_after_log_entries`), and waits until it exists.
    pub async fn snapshot_now(&self, timeout: Duration) -> Result<u64> {
        self.check_running()?;
        let applied = self.metrics().last_applied_index;
        self.inner
            .raft
            .trigger()
            .snapshot()
            .await
            .map_err(fatal_error)?;
        let metrics = self
            .wait_for("a snapshot", timeout, |metrics| {
                metrics.snapshot_index.is_some() && metrics.snapshot_index >= applied
            })
            .await?;
        Ok(metrics.snapshot_index.unwrap_or_default())
    }

    /// Stops raft on this node. Watches end with `ShuttingDown`; further calls fail with it.
    /// Drop every clone afterwards to release the data directory.
    pub async fn shutdown(&self) -> Result<()> {
        if self.inner.stopped.send_replace(true) {
            return Ok(());
        }
        self.inner
            .raft
            .shutdown()
            .await
            .map_err(|error| StoreError::Raft {
                message: format!("raft did not shut down cleanly: {error}"),
            })?;
        // openraft's state machine worker and replication tasks stop on their own shortly after
        // the core; wait for them to let go of the database so that the data directory is free
        // once the last handle is dropped (a restart in the same process, or a next process).
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&self.inner.database) > 1 {
            if Instant::now() >= deadline {
                tracing::warn!(
                    node_id = self.inner.node_id,
                    "raft tasks still hold the store database after shutdown"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tracing::info!(node_id = self.inner.node_id, "store shut down");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_shareable<T: Clone + Send + Sync + 'static>() {}

    #[test]
    fn store_is_clone_send_sync() {
        assert_shareable::<Store>();
        assert_shareable::<StoreConfig>();
    }

    #[test]
    fn invalid_timing_is_refused() {
        let mut config = StoreConfig::new("/nonexistent", 1, "node-1");
        config.timing.election_timeout_min = Duration::from_millis(300);
        config.timing.election_timeout_max = Duration::from_millis(100);
        assert!(matches!(
            config.raft_config(),
            Err(StoreError::Config { .. })
        ));
        let empty_address = StoreConfig::new("/nonexistent", 1, "");
        assert!(matches!(
            empty_address.raft_config(),
            Err(StoreError::Config { .. })
        ));
    }
}
