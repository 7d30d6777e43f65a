//! Multi-node stores in one process over [`InProcessTransport`]: replication, membership
//! changes, leader failover, partitions, snapshot installation on a lagging learner, and reads on
//! a leader restarted behind its log.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{DEADLINE, eventually};
use novacron_store::{
    Bootstrap, Consistency, InProcessTransport, NodeRole, RaftTiming, Store, StoreConfig,
    StoreError,
};
use tempfile::TempDir;

struct Cluster {
    transport: InProcessTransport,
    stores: BTreeMap<u64, Store>,
    _dirs: Vec<TempDir>,
}

fn node_config(dir: &TempDir, node_id: u64, transport: &InProcessTransport) -> StoreConfig {
    let mut config = StoreConfig::new(dir.path(), node_id, format!("node-{node_id}"));
    config.transport = Some(std::sync::Arc::new(transport.clone()));
    config.bootstrap = if node_id == 1 {
        Bootstrap::SingleNode
    } else {
        Bootstrap::JoinExisting
    };
    config.request_timeout = Duration::from_secs(3);
    config
}

impl Cluster {
    /// Starts node 1 as a single-node cluster and the others as empty nodes waiting to join.
    async fn start(nodes: u64, tune: impl Fn(&mut StoreConfig)) -> Cluster {
        let transport = InProcessTransport::new();
        let mut stores = BTreeMap::new();
        let mut dirs = Vec::new();
        for node_id in 1..=nodes {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut config = node_config(&dir, node_id, &transport);
            tune(&mut config);
            let store = Store::open(config).await.expect("open node");
            transport.register(&store);
            stores.insert(node_id, store);
            dirs.push(dir);
        }
        Cluster {
            transport,
            stores,
            _dirs: dirs,
        }
    }

    /// Starts `nodes` nodes and makes them all voters.
    async fn start_voters(nodes: u64) -> Cluster {
        let cluster = Cluster::start(nodes, |_| {}).await;
        let leader = cluster.node(1);
        for node_id in 2..=nodes {
            leader
                .add_learner(node_id, format!("node-{node_id}"))
                .await
                .expect("add learner");
        }
        leader
            .change_membership((1..=nodes).collect())
            .await
            .expect("change membership");
        cluster
    }

    fn node(&self, node_id: u64) -> &Store {
        &self.stores[&node_id]
    }

    async fn leader_among(&self, candidates: &[u64]) -> u64 {
        eventually("a leader among the running nodes", || async {
            let leaders: BTreeSet<u64> = candidates
                .iter()
                .filter_map(|id| self.node(*id).metrics().leader_id)
                .collect();
            let leader = *leaders.iter().next()?;
            let agreed = leaders.len() == 1 && candidates.contains(&leader);
            let leads = self.node(leader).metrics().role == NodeRole::Leader;
            (agreed && leads).then_some(leader)
        })
        .await
    }

    /// The leader once all nodes have agreed on it and its term for 1.5 s: no campaign is under
    /// way (one would change a term within an append deadline, 0.5 s).
    async fn settled_leader(&self) -> u64 {
        let ids: Vec<u64> = self.stores.keys().copied().collect();
        eventually("a leader that stays put", || async {
            let leader = self.leader_among(&ids).await;
            let term = self.node(leader).metrics().term;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let settled = ids.iter().all(|node_id| {
                let metrics = self.node(*node_id).metrics();
                metrics.leader_id == Some(leader) && metrics.term == term
            }) && self.node(leader).metrics().role == NodeRole::Leader;
            settled.then_some(leader)
        })
        .await
    }

    async fn shutdown(self) {
        for store in self.stores.values() {
            store.shutdown().await.expect("shutdown");
        }
    }
}

async fn wait_for_value(store: &Store, key: &str, value: &[u8]) -> u64 {
    eventually(&format!("{key} on node {}", store.node_id()), || async {
        let item = store
            .get(key, Consistency::Local)
            .await
            .expect("local get")?;
        (item.value == value).then_some(item.mod_revision)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_voters_replicate_writes_to_every_node() {
    let cluster = Cluster::start_voters(3).await;
    let leader = cluster.node(1);
    let metrics = leader.metrics();
    assert_eq!(metrics.membership.voters, BTreeSet::from([1, 2, 3]));
    assert_eq!(
        metrics.replication.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([1, 2, 3])
    );
    assert!(metrics.membership.learners.is_empty());
    assert_eq!(metrics.membership.addresses[&2], "node-2");

    let revision = leader
        .put("vms/web", b"spec".to_vec())
        .await
        .expect("write through leader");
    for node_id in [1, 2, 3] {
        let seen = wait_for_value(cluster.node(node_id), "vms/web", b"spec").await;
        assert_eq!(seen, revision, "same revision on node {node_id}");
    }

    // A follower refuses writes and linearizable reads, and names the leader.
    let error = cluster
        .node(2)
        .put("vms/other", b"x".to_vec())
        .await
        .expect_err("follower write");
    match error {
        StoreError::NotLeader {
            leader_hint: Some(hint),
        } => {
            assert_eq!(hint.node_id, 1);
            assert_eq!(hint.address.as_deref(), Some("node-1"));
        }
        other => panic!("expected NotLeader with a hint, got {other}"),
    }
    let read = cluster
        .node(3)
        .get("vms/web", Consistency::Linearizable)
        .await;
    assert!(
        matches!(read, Err(StoreError::NotLeader { .. })),
        "{read:?}"
    );

    // Watches work on followers, from their own applied state.
    let mut watcher = cluster
        .node(3)
        .watch("vms/", revision)
        .expect("watch on follower");
    let event = tokio::time::timeout(DEADLINE, watcher.next())
        .await
        .expect("event")
        .expect("event");
    assert_eq!((event.key(), event.revision()), ("vms/web", revision));
    let next = leader.put("vms/db", b"db".to_vec()).await.expect("write");
    let event = tokio::time::timeout(DEADLINE, watcher.next())
        .await
        .expect("event")
        .expect("event");
    assert_eq!((event.key(), event.revision()), ("vms/db", next));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_receives_the_log_and_is_promoted_to_voter() {
    let cluster = Cluster::start(2, |_| {}).await;
    let leader = cluster.node(1);
    leader
        .put("vms/before", b"1".to_vec())
        .await
        .expect("write");
    leader.add_learner(2, "node-2").await.expect("add learner");
    let metrics = leader.metrics();
    assert_eq!(metrics.membership.voters, BTreeSet::from([1]));
    assert_eq!(metrics.membership.learners, BTreeSet::from([2]));
    wait_for_value(cluster.node(2), "vms/before", b"1").await;
    assert_eq!(cluster.node(2).metrics().role, NodeRole::Learner);

    leader
        .change_membership(BTreeSet::from([1, 2]))
        .await
        .expect("promote");
    let metrics = leader.metrics();
    assert_eq!(metrics.membership.voters, BTreeSet::from([1, 2]));
    assert!(metrics.membership.learners.is_empty());
    assert!(!metrics.membership.joint);
    cluster
        .node(2)
        .wait_for("node 2 to become a follower", DEADLINE, |metrics| {
            metrics.role == NodeRole::Follower
        })
        .await
        .expect("follower");

    // Promoting a node that is not a learner is refused with a clear error.
    let error = leader
        .change_membership(BTreeSet::from([1, 2, 9]))
        .await
        .expect_err("unknown node");
    assert!(matches!(error, StoreError::Membership { .. }), "{error}");
    cluster.shutdown().await;
}

/// A voter change whose caller gave up half-way (openraft's second step, joint to uniform,
/// never ran) leaves the region joint; the metrics say where it was going, and asking for
/// that target finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_change_left_half_way_shows_its_target_and_can_be_finished() {
    let cluster = Cluster::start(3, |_| {}).await;
    let leader = cluster.node(1);
    leader
        .add_learner(2, "node-2")
        .await
        .expect("add learner 2");
    leader
        .add_learner(3, "node-3")
        .await
        .expect("add learner 3");
    // With both learners cut off, the joint configuration {1} + {1, 2, 3} cannot commit: the
    // call times out after its first step was proposed.
    cluster.transport.isolate(2);
    cluster.transport.isolate(3);
    let error = leader
        .change_membership(BTreeSet::from([1, 2, 3]))
        .await
        .expect_err("no quorum for the new voters");
    assert!(matches!(error, StoreError::Timeout { .. }), "{error}");
    cluster.transport.heal(2);
    cluster.transport.heal(3);
    // The joint configuration commits once the learners are back, and stays joint.
    let stalled = leader
        .wait_for("the joint configuration to commit", DEADLINE, |metrics| {
            let caught_up = |node: u64| {
                metrics.replication.get(&node).copied().flatten() >= metrics.last_log_index
            };
            metrics.membership.joint && caught_up(2) && caught_up(3)
        })
        .await
        .expect("joint");
    assert_eq!(
        stalled.membership.joint_target,
        Some(BTreeSet::from([1, 2, 3]))
    );
    assert_eq!(stalled.membership.voters, BTreeSet::from([1, 2, 3]));

    leader
        .change_membership(BTreeSet::from([1, 2, 3]))
        .await
        .expect("finish the change");
    let metrics = leader.metrics();
    assert!(!metrics.membership.joint, "{metrics:?}");
    assert_eq!(metrics.membership.joint_target, None);
    assert_eq!(metrics.membership.voters, BTreeSet::from([1, 2, 3]));
    leader
        .put("vms/after", b"1".to_vec())
        .await
        .expect("writes go on under the new voters");
    wait_for_value(cluster.node(3), "vms/after", b"1").await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_shutdown_elects_a_new_leader_and_writes_continue() {
    let cluster = Cluster::start_voters(3).await;
    cluster
        .node(1)
        .put("vms/a", b"1".to_vec())
        .await
        .expect("write");
    for node_id in [2, 3] {
        wait_for_value(cluster.node(node_id), "vms/a", b"1").await;
    }
    cluster.node(1).shutdown().await.expect("shutdown leader");

    let new_leader = cluster.leader_among(&[2, 3]).await;
    let other = if new_leader == 2 { 3 } else { 2 };
    let revision = cluster
        .node(new_leader)
        .put("vms/b", b"2".to_vec())
        .await
        .expect("write through the new leader");
    assert_eq!(
        wait_for_value(cluster.node(other), "vms/b", b"2").await,
        revision
    );
    let a = cluster
        .node(new_leader)
        .get("vms/a", Consistency::Linearizable)
        .await
        .expect("read");
    assert_eq!(a.expect("committed write survives failover").value, b"1");
    cluster.shutdown().await;
}

/// The election timeout is the live one: with a minute's timeout nobody replaces a stopped
/// leader; once the timing is set back to seconds, one of them takes over, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_timing_applies_to_elections_without_a_restart() {
    let cluster = Cluster::start_voters(3).await;
    let patient = RaftTiming {
        heartbeat_interval: Duration::from_millis(50),
        election_timeout_min: Duration::from_secs(60),
        election_timeout_max: Duration::from_secs(61),
    };
    let invalid = RaftTiming {
        election_timeout_min: Duration::from_millis(40),
        ..patient
    };
    let error = cluster
        .node(2)
        .set_timing(invalid)
        .expect_err("an election timeout below the heartbeat");
    assert!(
        error.to_string().contains("longer than the heartbeat"),
        "{error}"
    );
    // A campaign under way when the timing changes (a loaded machine can delay heartbeats past
    // the lease) would end after it, with the new timing's patience. So: a leadership that all
    // three agree on for longer than an append deadline (0.5 s) first, then the new timing.
    cluster.settled_leader().await;
    for node_id in [1, 2, 3] {
        cluster
            .node(node_id)
            .set_timing(patient)
            .expect("set timing");
        assert_eq!(cluster.node(node_id).timing(), patient);
    }
    let leader = cluster.settled_leader().await;
    cluster
        .node(leader)
        .put("vms/before", b"1".to_vec())
        .await
        .expect("a write through the leader");
    let followers: Vec<u64> = [1, 2, 3]
        .into_iter()
        .filter(|node_id| *node_id != leader)
        .collect();
    cluster
        .node(leader)
        .shutdown()
        .await
        .expect("shutdown leader");
    // Well past the leader lease (about 0.5 s) and the old election timeout (0.3 s at most):
    // with the old timing one of them would lead by now.
    let quiet_until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < quiet_until {
        for node_id in followers.iter().copied() {
            assert_ne!(
                cluster.node(node_id).metrics().role,
                NodeRole::Leader,
                "node {node_id} campaigned before its election timeout"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let quick = RaftTiming {
        heartbeat_interval: Duration::from_millis(50),
        election_timeout_min: Duration::from_millis(600),
        election_timeout_max: Duration::from_millis(900),
    };
    for node_id in followers.iter().copied() {
        cluster.node(node_id).set_timing(quick).expect("set timing");
    }
    let new_leader = cluster.leader_among(&followers).await;
    cluster
        .node(new_leader)
        .put("vms/after", b"1".to_vec())
        .await
        .expect("write through the new leader");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_cannot_write_and_catches_up_after_healing() {
    let cluster = Cluster::start_voters(3).await;
    cluster.transport.isolate(1);
    let new_leader = cluster.leader_among(&[2, 3]).await;
    let revision = cluster
        .node(new_leader)
        .put("vms/majority", b"m".to_vec())
        .await
        .expect("majority writes");

    let minority = cluster.node(1).put("vms/minority", b"x".to_vec()).await;
    assert!(
        matches!(
            minority,
            Err(StoreError::Timeout { .. }
                | StoreError::NotLeader { .. }
                | StoreError::NoQuorum { .. })
        ),
        "{minority:?}"
    );

    cluster.transport.heal(1);
    assert_eq!(
        wait_for_value(cluster.node(1), "vms/majority", b"m").await,
        revision
    );
    assert!(
        cluster
            .node(new_leader)
            .get("vms/minority", Consistency::Linearizable)
            .await
            .expect("read")
            .is_none(),
        "the minority's write was never committed"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_learner_behind_a_purged_log_gets_a_snapshot() {
    let cluster = Cluster::start(2, |config| config.snapshot_after_log_entries = 20).await;
    let leader = cluster.node(1);
    for index in 0..120u32 {
        leader
            .put(format!("vms/{index:03}"), index.to_le_bytes().to_vec())
            .await
            .expect("write");
    }
    leader.delete("vms/005").await.expect("delete");
    leader
        .wait_for("the leader to purge its log", DEADLINE, |metrics| {
            metrics.purged_index.is_some_and(|purged| purged > 20)
        })
        .await
        .expect("purge");

    // A watch open on the empty node before it joins is told to re-list when the snapshot
    // replaces its state.
    let mut early_watcher = cluster
        .node(2)
        .watch("vms/", 0)
        .expect("watch before joining");
    leader.add_learner(2, "node-2").await.expect("add learner");
    let learner = cluster.node(2);
    let reset = tokio::time::timeout(DEADLINE, early_watcher.next())
        .await
        .expect("answer");
    assert!(
        matches!(reset, Err(StoreError::WatchReset { .. })),
        "{reset:?}"
    );
    let leader_revision = leader.current_revision().expect("revision");
    eventually("the learner to reach the leader's revision", || async {
        (learner.current_revision().expect("revision") == leader_revision).then_some(())
    })
    .await;
    assert!(
        learner.metrics().snapshot_index.is_some(),
        "the learner was brought up to date by a snapshot"
    );
    let on_leader = leader.list("vms/", Consistency::Local).await.expect("list");
    let on_learner = learner
        .list("vms/", Consistency::Local)
        .await
        .expect("list");
    assert_eq!(
        on_learner, on_leader,
        "identical keys, values and revisions"
    );
    assert_eq!(on_learner.items.len(), 119);

    // History before the snapshot is not available on the learner; after it, it is.
    let error = learner.watch("vms/", 1).expect_err("compacted");
    assert!(matches!(error, StoreError::Compacted { .. }), "{error}");
    let mut watcher = learner.watch("vms/", leader_revision + 1).expect("watch");
    let next = leader.put("vms/new", b"n".to_vec()).await.expect("write");
    let event = tokio::time::timeout(DEADLINE, watcher.next())
        .await
        .expect("event")
        .expect("event");
    assert_eq!(event.revision(), next);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_learner_times_out_without_blocking_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = StoreConfig::new(dir.path(), 1, "node-1");
    config.request_timeout = Duration::from_millis(500);
    // No transport: every peer is unreachable.
    let store = Store::open(config).await.expect("open");
    let error = store
        .add_learner(2, "node-2")
        .await
        .expect_err("the learner cannot catch up");
    assert!(matches!(error, StoreError::Timeout { .. }), "{error}");
    let metrics = store.metrics();
    assert_eq!(metrics.membership.learners, BTreeSet::from([2]));
    assert_eq!(
        metrics.replication.get(&2),
        Some(&None),
        "nothing replicated to node 2"
    );
    // A learner does not count toward the quorum: writes go on.
    store
        .put("vms/a", b"1".to_vec())
        .await
        .expect("write with a dead learner");
    store
        .remove_learners(BTreeSet::from([2]))
        .await
        .expect("remove learner");
    assert!(store.metrics().membership.learners.is_empty());
    store.shutdown().await.expect("shutdown");
}

/// The follower read path that `novacron-cluster` builds on: the leader hands out a read index
/// confirmed by a quorum, a follower waits until it has applied that index and reads locally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_index_from_the_leader_makes_a_follower_read_fresh() {
    let cluster = Cluster::start_voters(3).await;
    let leader_id = cluster.leader_among(&[1, 2, 3]).await;
    let follower_id = [1, 2, 3]
        .into_iter()
        .find(|id| *id != leader_id)
        .expect("a follower");
    let leader = cluster.node(leader_id);
    let follower = cluster.node(follower_id);

    let error = follower
        .read_index()
        .await
        .expect_err("a follower has no read index");
    match error {
        StoreError::NotLeader { leader_hint } => {
            assert_eq!(leader_hint.map(|hint| hint.node_id), Some(leader_id));
        }
        other => panic!("expected NotLeader, got {other}"),
    }

    leader.put("fresh/key", b"v1".to_vec()).await.expect("put");
    let index = leader.read_index().await.expect("read index on the leader");
    assert!(
        index >= leader.metrics().last_applied_index.unwrap_or_default(),
        "the read index covers everything the leader applied"
    );
    follower
        .wait_for_applied(index)
        .await
        .expect("follower applies the read index");
    let item = follower
        .get("fresh/key", Consistency::Local)
        .await
        .expect("local get")
        .expect("the write is visible on the follower after its read index");
    assert_eq!(item.value, b"v1");
    cluster.shutdown().await;
}

/// Wraps the in-process transport and remembers the largest append-entries message sent.
struct RecordingTransport {
    inner: InProcessTransport,
    largest_append: std::sync::atomic::AtomicUsize,
}

impl novacron_store::RaftTransport for RecordingTransport {
    fn send(
        &self,
        target: novacron_store::RaftTarget,
        message: novacron_store::RaftMessage,
    ) -> futures::future::BoxFuture<'_, Result<Vec<u8>, novacron_store::TransportError>> {
        if message.kind == novacron_store::RaftMessageKind::AppendEntries {
            self.largest_append
                .fetch_max(message.body.len(), std::sync::atomic::Ordering::Relaxed);
        }
        self.inner.send(target, message)
    }
}

/// Regression: openraft 0.9 gives every append-entries the heartbeat interval (50 ms) as its
/// deadline, so a learner behind by many large entries was sent them all in one message that
/// could miss the deadline on every retry. Appends are capped (`MAX_APPEND_ENTRIES_BYTES`): the
/// learner catches up in steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_behind_by_large_entries_catches_up_in_capped_appends() {
    const ENTRIES: usize = 64;
    let inner = InProcessTransport::new();
    let recording = std::sync::Arc::new(RecordingTransport {
        inner: inner.clone(),
        largest_append: Default::default(),
    });
    let mut stores = Vec::new();
    let mut dirs = Vec::new();
    for node_id in [1, 2] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = node_config(&dir, node_id, &inner);
        config.transport = Some(recording.clone());
        config.request_timeout = Duration::from_secs(30);
        let store = Store::open(config).await.expect("open node");
        inner.register(&store);
        stores.push(store);
        dirs.push(dir);
    }
    let leader = &stores[0];
    // 64 entries of ~85 KiB encoded (64 KiB values): ~5.5 MiB the learner lacks, which openraft
    // would send in one message (up to 300 entries) that does not fit the 50 ms deadline.
    let value = vec![7u8; 64 * 1024];
    for index in 0..ENTRIES {
        leader
            .put(format!("images/big-{index:03}"), value.clone())
            .await
            .expect("write a large value");
    }
    leader
        .add_learner(2, "node-2")
        .await
        .expect("the learner catches up");
    for index in 0..ENTRIES {
        wait_for_value(&stores[1], &format!("images/big-{index:03}"), &value).await;
    }
    let largest = recording
        .largest_append
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        largest <= novacron_store::MAX_APPEND_ENTRIES_BYTES * 2,
        "largest append-entries message was {largest} bytes"
    );
    eprintln!(
        "largest append-entries message: {largest} bytes (cap {} bytes of entries)",
        novacron_store::MAX_APPEND_ENTRIES_BYTES
    );
    for store in &stores {
        store.shutdown().await.expect("shutdown");
    }
}

/// Reopens every node of a stopped cluster in its old directory (all `JoinExisting`: the
/// membership is in their logs).
async fn reopen(dirs: &[TempDir]) -> (InProcessTransport, BTreeMap<u64, Store>) {
    let transport = InProcessTransport::new();
    let mut stores = BTreeMap::new();
    for (index, dir) in dirs.iter().enumerate() {
        let node_id = index as u64 + 1;
        let mut config = node_config(dir, node_id, &transport);
        config.bootstrap = Bootstrap::JoinExisting;
        let store = Store::open(config).await.expect("reopen node");
        transport.register(&store);
        stores.insert(node_id, store);
    }
    (transport, stores)
}

/// Shuts every node down and drops it with its transport, which releases their directories.
async fn stop(transport: InProcessTransport, stores: BTreeMap<u64, Store>) {
    for store in stores.values() {
        store.shutdown().await.expect("shutdown");
    }
    drop(transport);
    drop(stores);
}

/// What `kill -9` leaves on a leader: its log holds a committed write that its state machine
/// (applied without waiting for the disk) and its saved commit index lost. Built here without
/// a crash by putting back an earlier copy of the leader's state machine file: the leader
/// restores itself at once (its vote is unchanged), and its first linearizable read must see
/// the write, not the state from before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_restarted_behind_its_log_reads_what_it_committed() {
    let cluster = Cluster::start_voters(3).await;
    let leader_id = cluster.settled_leader().await;
    assert_eq!(leader_id, 1, "node 1 keeps the leadership it bootstrapped");
    cluster
        .node(1)
        .put("vms/a", b"before".to_vec())
        .await
        .expect("first write");
    for node_id in [2, 3] {
        wait_for_value(cluster.node(node_id), "vms/a", b"before").await;
    }
    let term = cluster.node(1).metrics().term;
    let Cluster {
        transport,
        stores,
        _dirs,
    } = cluster;
    stop(transport, stores).await;
    let database = _dirs[0].path().join("store.redb");
    let earlier = _dirs[0].path().join("store.redb.earlier");
    std::fs::copy(&database, &earlier).expect("copy the leader's state machine");

    let (transport, stores) = reopen(&_dirs).await;
    eventually("node 1 to lead again in the same term", || async {
        let metrics = stores[&1].metrics();
        (metrics.role == NodeRole::Leader).then_some(())
    })
    .await;
    assert_eq!(
        stores[&1].metrics().term,
        term,
        "a restarted leader keeps its term (else this test builds nothing)"
    );
    stores[&1]
        .put("vms/a", b"after".to_vec())
        .await
        .expect("second write");
    for node_id in [2, 3] {
        wait_for_value(&stores[&node_id], "vms/a", b"after").await;
    }
    stop(transport, stores).await;
    std::fs::rename(&earlier, &database).expect("put back the earlier state machine");

    let (transport, stores) = reopen(&_dirs).await;
    let item = stores[&1]
        .get("vms/a", Consistency::Linearizable)
        .await
        .expect("linearizable read on the restarted leader")
        .expect("the key exists");
    assert_eq!(
        String::from_utf8_lossy(&item.value),
        "after",
        "a linearizable read on a restarted leader returned state from before a committed write"
    );
    stop(transport, stores).await;
}
