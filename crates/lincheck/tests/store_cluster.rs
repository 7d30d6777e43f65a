//! Records a history of concurrent clients against a 3-voter store cluster over the
//! in-process transport while the leader is isolated mid-run and later healed, then checks it
//! for linearizability. Writes whose answer is an error are recorded as "outcome unknown" (a
//! timed-out or deposed leader may or may not have committed them); failed reads are dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use novacron_lincheck::{
    Change, CheckOptions, Condition, KvInput, KvOutput, Observed, Recorder, Verdict, check_history,
};
use novacron_store::{
    Bootstrap, Consistency, InProcessTransport, NodeRole, Store, StoreConfig, StoreError,
    Transaction,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tempfile::TempDir;

const DEADLINE: Duration = Duration::from_secs(30);
const CLIENTS: u64 = 4;
const KEYS: u64 = 3;
/// Operations recorded before the leader is isolated, while it is, and after healing: bounds
/// the history (about 3 × 80 operations over 3 keys), so the check takes well under a second.
const PHASE_OPERATIONS: usize = 80;

struct Cluster {
    transport: InProcessTransport,
    stores: BTreeMap<u64, Store>,
    _dirs: Vec<TempDir>,
}

impl Cluster {
    async fn start_voters() -> Cluster {
        let transport = InProcessTransport::new();
        let mut stores = BTreeMap::new();
        let mut dirs = Vec::new();
        for node_id in 1..=3u64 {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut config = StoreConfig::new(dir.path(), node_id, format!("node-{node_id}"));
            config.transport = Some(Arc::new(transport.clone()));
            config.bootstrap = if node_id == 1 {
                Bootstrap::SingleNode
            } else {
                Bootstrap::JoinExisting
            };
            config.request_timeout = Duration::from_secs(1);
            let store = Store::open(config).await.expect("open node");
            transport.register(&store);
            stores.insert(node_id, store);
            dirs.push(dir);
        }
        let leader = &stores[&1];
        leader
            .wait_for_leader(DEADLINE)
            .await
            .expect("node 1 leads");
        for node_id in 2..=3 {
            leader
                .add_learner(node_id, format!("node-{node_id}"))
                .await
                .expect("add learner");
        }
        leader
            .change_membership(BTreeSet::from([1, 2, 3]))
            .await
            .expect("three voters");
        Cluster {
            transport,
            stores,
            _dirs: dirs,
        }
    }

    /// The leader all `candidates` agree on, polling until there is one.
    async fn leader_among(&self, candidates: &[u64]) -> u64 {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let leaders: BTreeSet<u64> = candidates
                .iter()
                .filter_map(|id| self.stores[id].metrics().leader_id)
                .collect();
            if let Some(&leader) = leaders.iter().next()
                && leaders.len() == 1
                && candidates.contains(&leader)
                && self.stores[&leader].metrics().role == NodeRole::Leader
            {
                return leader;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no leader among {candidates:?} within {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn observed(item: novacron_store::KeyValue) -> Observed {
    Observed {
        value: item.value,
        create_revision: item.create_revision,
        mod_revision: item.mod_revision,
        version: item.version,
    }
}

/// One client: random single-key operations against the node it believes leads, following
/// leader hints and rotating on other errors, until `stop`.
async fn client(
    client_id: u64,
    stores: Arc<BTreeMap<u64, Store>>,
    recorder: Recorder<KvInput, KvOutput>,
    completed: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) {
    let mut random = StdRng::seed_from_u64(0x11_5eed ^ client_id);
    let mut target = 1u64;
    let mut serial = 0u64;
    // The last mod_revision this client saw per key, for compare-and-swap attempts.
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        serial += 1;
        let key = format!("lin/k{}", random.random_range(0..KEYS));
        let value = format!("c{client_id}-{serial}").into_bytes();
        let store = &stores[&target];
        let choice = random.random_range(0..10);
        let error = if choice < 4 {
            let pending = recorder.invoke(client_id, KvInput::Get { key: key.clone() });
            match store.get(&key, Consistency::Linearizable).await {
                Ok(item) => {
                    if let Some(item) = &item {
                        seen.insert(key.clone(), item.mod_revision);
                    }
                    pending.complete(KvOutput::Get(item.map(observed)));
                    completed.fetch_add(1, Ordering::Relaxed);
                    None
                }
                Err(error) => {
                    pending.discard();
                    Some(error)
                }
            }
        } else {
            let (conditions, changes, transaction) = match choice {
                4..=5 => (
                    vec![],
                    vec![Change::Put(value.clone())],
                    Transaction::new().put(key.clone(), value),
                ),
                6 => (
                    vec![Condition::Absent],
                    vec![Change::Put(value.clone())],
                    Transaction::new()
                        .when_absent(key.clone())
                        .put(key.clone(), value),
                ),
                7..=8 => {
                    let expected = seen.get(&key).copied().unwrap_or(1);
                    (
                        vec![Condition::ModRevision(expected)],
                        vec![Change::Put(value.clone())],
                        Transaction::new()
                            .when_mod_revision(key.clone(), expected)
                            .put(key.clone(), value),
                    )
                }
                _ => (
                    vec![Condition::Exists],
                    vec![Change::Delete],
                    Transaction::new()
                        .when_exists(key.clone())
                        .delete(key.clone()),
                ),
            };
            let input = KvInput::Transaction {
                key: key.clone(),
                conditions,
                changes,
            };
            let pending = recorder.invoke(client_id, input);
            match store.transaction(transaction).await {
                Ok(outcome) => {
                    pending.complete(KvOutput::Transaction {
                        succeeded: outcome.succeeded,
                        revision: outcome.revision,
                        deleted_keys: outcome.deleted_keys,
                        failed_condition: outcome
                            .failed_condition
                            .map(|failed| (failed.index, failed.actual_mod_revision)),
                    });
                    completed.fetch_add(1, Ordering::Relaxed);
                    None
                }
                Err(error) => {
                    // A leader that timed out or was deposed may still have committed it.
                    pending.unknown();
                    Some(error)
                }
            }
        };
        match error {
            None => {}
            Some(StoreError::NotLeader {
                leader_hint: Some(hint),
            }) if stores.contains_key(&hint.node_id) => target = hint.node_id,
            Some(_) => {
                target = target % 3 + 1;
                // Let an election finish instead of hammering a node without a leader.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn wait_for_operations(completed: &AtomicUsize, target: usize) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while completed.load(Ordering::Relaxed) < target {
        assert!(
            tokio::time::Instant::now() < deadline,
            "clients completed only {} of {target} operations within {DEADLINE:?}",
            completed.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_with_an_isolated_leader_is_linearizable() {
    let cluster = Cluster::start_voters().await;
    let first_leader = cluster.leader_among(&[1, 2, 3]).await;
    let stores = Arc::new(cluster.stores.clone());
    let recorder = Recorder::new();
    let completed = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (1..=CLIENTS)
        .map(|client_id| {
            tokio::spawn(client(
                client_id,
                Arc::clone(&stores),
                recorder.clone(),
                Arc::clone(&completed),
                Arc::clone(&stop),
            ))
        })
        .collect();

    wait_for_operations(&completed, PHASE_OPERATIONS).await;
    cluster.transport.isolate(first_leader);
    let others: Vec<u64> = [1, 2, 3]
        .into_iter()
        .filter(|id| *id != first_leader)
        .collect();
    let second_leader = cluster.leader_among(&others).await;
    assert_ne!(second_leader, first_leader);
    wait_for_operations(&completed, 2 * PHASE_OPERATIONS).await;
    cluster.transport.heal(first_leader);
    wait_for_operations(&completed, 3 * PHASE_OPERATIONS).await;
    stop.store(true, Ordering::Relaxed);
    for handle in clients {
        handle.await.expect("client task");
    }

    let history = recorder.history();
    let summary = novacron_lincheck::summarize(&history);
    let (writes, unknown) = (summary.successful_writes, summary.unknown_outcomes);
    assert!(
        writes > 20,
        "too few successful writes to mean anything: {writes}"
    );
    let started = std::time::Instant::now();
    let verdict = check_history(&history, CheckOptions::default()).expect("well-formed");
    assert_eq!(
        verdict,
        Verdict::Linearizable,
        "history of {} operations ({unknown} with unknown outcome)",
        history.len()
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the check took {:?}",
        started.elapsed()
    );
    for store in cluster.stores.values() {
        store.shutdown().await.expect("shutdown");
    }
}
