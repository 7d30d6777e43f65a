//! [`ClusterStore`]: the store as every host of a region uses it. Writes and linearizable reads
//! work on any node: a follower forwards a write to the leader over the cluster channel and
//! returns its outcome; for a linearizable read it asks the leader for a read index, waits until
//! its own state machine has applied it, and reads locally (raft read-index, so the data never
//! crosses the network twice). Local reads and watches are served from the local store.
//!
//! Retries are limited to cases where the request certainly did not take effect: no leader
//! known, leader unreachable (nothing sent), or the leader answering "not the leader". A forwarded
//! write whose exchange failed after sending is returned as an error, never repeated, because it
//! may have been applied.

use std::future::Future;
use std::time::Duration;

use novacron_store::{
    Consistency, KeyValue, Listing, NodeRole, Store, StoreError, Transaction, TransactionOutcome,
    Watcher,
};

use crate::error::{ClusterError, Result};
use crate::transport::{MtlsRaftTransport, RequestError};
use crate::wire::{RemoteFailure, Request};

/// How long a request waits for a leader change before asking again.
const LEADER_CHANGE_WAIT: Duration = Duration::from_millis(200);

/// A cluster member's view of the replicated store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ClusterStore {
    store: Store,
    transport: MtlsRaftTransport,
}

/// Where a request goes.
enum Route {
    Local,
    Remote { node_id: u64, address: String },
}

impl ClusterStore {
    /// Wraps the local `store`; `transport` is the one the store was opened with.
    pub fn new(store: Store, transport: MtlsRaftTransport) -> ClusterStore {
        ClusterStore { store, transport }
    }

    /// The local store (metrics, membership changes on the leader, watches).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The cluster channel.
    pub fn transport(&self) -> &MtlsRaftTransport {
        &self.transport
    }

    /// This node's raft id.
    pub fn node_id(&self) -> u64 {
        self.store.node_id()
    }

    /// How long a request may wait for a leader in all.
    fn budget(&self) -> Duration {
        self.store.request_timeout()
    }

    fn route(&self) -> Option<Route> {
        let metrics = self.store.metrics();
        let leader = metrics.leader_id?;
        if leader == self.store.node_id() {
            return (metrics.role == NodeRole::Leader).then_some(Route::Local);
        }
        let address = metrics.membership.addresses.get(&leader)?.clone();
        Some(Route::Remote {
            node_id: leader,
            address,
        })
    }

    /// Waits (briefly) until this node knows a leader other than `previous`.
    async fn await_leader_change(&self, previous: Option<u64>) {
        let _ = self
            .store
            .wait_for("a new raft leader", LEADER_CHANGE_WAIT, |metrics| {
                metrics.leader_id.is_some() && metrics.leader_id != previous
            })
            .await;
    }

    /// Runs `local` on the leader or `remote` against it, following leader changes until the
    /// store's request timeout.
    async fn on_leader<T, Local, LocalFuture>(
        &self,
        request: Request,
        local: Local,
        decode: impl Fn(Vec<u8>) -> Result<T>,
    ) -> Result<T>
    where
        Local: Fn() -> LocalFuture,
        LocalFuture: Future<Output = std::result::Result<T, StoreError>>,
    {
        let budget = self.budget();
        let deadline = tokio::time::Instant::now() + budget;
        let mut last_problem = String::from("no leader known yet");
        loop {
            let route = self.route();
            let previous_leader = self.store.metrics().leader_id;
            match route {
                None => {}
                Some(Route::Local) => match local().await {
                    Err(StoreError::NotLeader { .. }) => {
                        last_problem = "leadership moved while serving the request".into();
                    }
                    // A read index has no effect: when the leader could not confirm its
                    // leadership in time (a slow heartbeat round), ask again within the budget.
                    Err(error @ (StoreError::NoQuorum { .. } | StoreError::Timeout { .. }))
                        if matches!(request, Request::ReadIndex) =>
                    {
                        last_problem = error.to_string();
                    }
                    other => return other.map_err(ClusterError::from),
                },
                Some(Route::Remote { node_id, address }) => {
                    match self
                        .transport
                        .request(node_id, &address, request.clone())
                        .await
                    {
                        Ok(body) => return decode(body),
                        Err(RequestError::Unreachable(source)) => {
                            last_problem = format!(
                                "leader node {node_id} at {address} is unreachable: {source}"
                            );
                        }
                        Err(RequestError::Remote(RemoteFailure::NotLeader { .. })) => {
                            last_problem = format!("node {node_id} is no longer the leader");
                        }
                        Err(RequestError::Remote(RemoteFailure::ShuttingDown))
                            if matches!(request, Request::ReadIndex) =>
                        {
                            last_problem = format!("leader node {node_id} is shutting down");
                        }
                        Err(RequestError::Remote(
                            failure @ (RemoteFailure::NoQuorum { .. }
                            | RemoteFailure::Timeout { .. }),
                        )) if matches!(request, Request::ReadIndex) => {
                            last_problem = format!(
                                "leader node {node_id} could not confirm its leadership: {failure}"
                            );
                        }
                        Err(RequestError::Remote(failure)) => {
                            return Err(remote_failure_error(node_id, &request, failure));
                        }
                        // A read index has no effect: a lost answer is only a problem.
                        Err(RequestError::Failed(source))
                            if matches!(request, Request::ReadIndex) =>
                        {
                            last_problem = format!(
                                "leader node {node_id} at {address} did not answer the read index: {source}"
                            );
                        }
                        Err(RequestError::Failed(source)) => {
                            return Err(ClusterError::PeerFailed {
                                request: request.name(),
                                node_id,
                                address,
                                source,
                            });
                        }
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ClusterError::NoLeader {
                    waited: budget,
                    last_problem,
                });
            }
            self.await_leader_change(previous_leader).await;
        }
    }

    /// Applies a transaction through the leader, from any node. A transaction whose condition
    /// fails is not an error (see [`TransactionOutcome::succeeded`]).
    pub async fn transaction(&self, transaction: Transaction) -> Result<TransactionOutcome> {
        transaction.validate()?;
        self.on_leader(
            Request::Transaction(transaction.clone()),
            || self.store.transaction(transaction.clone()),
            |body| {
                serde_json::from_slice(&body).map_err(|error| ClusterError::PeerRefused {
                    request: "forwarded transaction",
                    node_id: 0,
                    message: format!("the leader's reply could not be decoded: {error}"),
                })
            },
        )
        .await
    }

    /// Creates or replaces a key from any node; returns the new revision.
    pub async fn put(&self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Result<u64> {
        Ok(self
            .transaction(Transaction::new().put(key, value))
            .await?
            .revision)
    }

    /// Waits until this node can serve a read of the given consistency locally.
    async fn prepare_read(&self, consistency: Consistency) -> Result<()> {
        if consistency == Consistency::Local {
            return Ok(());
        }
        let index = self
            .on_leader(
                Request::ReadIndex,
                || self.store.read_index(),
                |body| {
                    let bytes: [u8; 8] =
                        body.as_slice()
                            .try_into()
                            .map_err(|_| ClusterError::PeerRefused {
                                request: "read index",
                                node_id: 0,
                                message: format!(
                                    "the leader's read index reply has {} bytes, not 8",
                                    body.len()
                                ),
                            })?;
                    Ok(u64::from_be_bytes(bytes))
                },
            )
            .await?;
        self.store.wait_for_applied(index).await?;
        Ok(())
    }

    /// Returns once this node's state machine holds everything committed before the call (one
    /// read index from the leader): local reads after it are as fresh as linearizable reads
    /// made at the call.
    pub async fn read_fence(&self) -> Result<()> {
        self.prepare_read(Consistency::Linearizable).await
    }

    /// Reads one key from any node, as fresh as `consistency` asks.
    pub async fn get(&self, key: &str, consistency: Consistency) -> Result<Option<KeyValue>> {
        novacron_store::kv::validate_key(key)?;
        self.prepare_read(consistency).await?;
        Ok(self.store.get(key, Consistency::Local).await?)
    }

    /// Lists a prefix from any node, as fresh as `consistency` asks.
    pub async fn list(&self, prefix: &str, consistency: Consistency) -> Result<Listing> {
        if !prefix.is_empty() {
            novacron_store::kv::validate_key(prefix)?;
        }
        self.prepare_read(consistency).await?;
        Ok(self.store.list(prefix, Consistency::Local).await?)
    }

    /// Adds an admitted host (one with a host record, see [`crate::join::admit_host`]) to raft
    /// as a learner, from any node; returns once it has caught up with the log. The address is
    /// the one recorded at admission, never one given here.
    pub async fn add_learner(&self, node_id: u64) -> Result<()> {
        let host = crate::join::host_record(self, node_id)
            .await?
            .ok_or_else(|| ClusterError::Membership {
                reason: format!(
                    "node {node_id} was not admitted (no host record); join with a token first"
                ),
            })?;
        let address = host.raft_address;
        self.on_leader(
            Request::AddLearner { node_id },
            || self.store.add_learner(node_id, address.clone()),
            |_| Ok(()),
        )
        .await
    }

    /// Removes a host from the region, from any node: a voter is demoted first (one joint
    /// change; refused if it is the last voter), then it leaves the membership and its host
    /// record is deleted. Whether the host may be removed (VMs still on it) is the caller's
    /// decision; choosing a replacement voter is the voter policy's.
    pub async fn remove_host(&self, node_id: u64) -> Result<()> {
        self.on_leader(
            Request::RemoveHost { node_id },
            move || async move {
                let store = &self.store;
                let membership = store.metrics().membership;
                if membership.voters.contains(&node_id) {
                    let remaining: std::collections::BTreeSet<u64> = membership
                        .voters
                        .iter()
                        .copied()
                        .filter(|voter| *voter != node_id)
                        .collect();
                    if remaining.is_empty() {
                        return Err(StoreError::Membership {
                            message: format!(
                                "node {node_id} is the only voter; add another host before removing it"
                            ),
                        });
                    }
                    store.change_membership(remaining).await?;
                }
                if store.metrics().membership.learners.contains(&node_id) {
                    store
                        .remove_learners(std::collections::BTreeSet::from([node_id]))
                        .await?;
                }
                Ok(())
            },
            |_| Ok(()),
        )
        .await?;
        crate::join::forget_host(self, node_id).await?;
        self.transport.disconnect(node_id);
        Ok(())
    }

    /// Watches a prefix on this node's state (see [`Store::watch`]).
    pub fn watch(&self, prefix: &str, from_revision: u64) -> Result<Watcher> {
        Ok(self.store.watch(prefix, from_revision)?)
    }
}

fn remote_failure_error(node_id: u64, request: &Request, failure: RemoteFailure) -> ClusterError {
    match failure {
        RemoteFailure::NoQuorum { message } => StoreError::NoQuorum { message }.into(),
        RemoteFailure::Timeout {
            operation,
            timeout_ms,
        } => StoreError::Timeout {
            operation: format!("{operation} on leader node {node_id}"),
            timeout: Duration::from_millis(timeout_ms),
        }
        .into(),
        RemoteFailure::ShuttingDown => ClusterError::PeerRefused {
            request: request.name(),
            node_id,
            message: "the leader shut down while serving the request; a write may or may not have been applied: re-read before retrying".into(),
        },
        other => ClusterError::PeerRefused {
            request: request.name(),
            node_id,
            message: other.to_string(),
        },
    }
}
