//! Three stores in one process, each with its own redb directory and its own mTLS listener on
//! 127.0.0.1: leader election, write forwarding from followers, failover after the leader shuts
//! down, and the channel's authentication (foreign CA, forged source node id).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use novacron_cluster::{
    ClusterCa, ClusterError, ClusterStore, MtlsRaftOptions, MtlsRaftTransport, NodeIdentity,
    RaftListener, RaftServer,
};
use novacron_store::{
    Bootstrap, Consistency, NodeRole, RaftMessage, RaftMessageKind, RaftTarget, RaftTiming,
    RaftTransport, Store, StoreConfig, Transaction, TransportError,
};
use tempfile::TempDir;

/// Generous bound for anything that should take milliseconds; only hit when a test fails.
const DEADLINE: Duration = Duration::from_secs(20);

async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn options() -> MtlsRaftOptions {
    MtlsRaftOptions {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
    }
}

struct Host {
    identity: NodeIdentity,
    cluster: ClusterStore,
    server: Option<RaftServer>,
    address: String,
    _dir: TempDir,
}

impl Host {
    async fn start(ca: &ClusterCa, node_id: u64, bootstrap: Bootstrap, timing: RaftTiming) -> Host {
        let identity = ca.issue_node_identity(node_id).expect("issue identity");
        let transport = MtlsRaftTransport::new(&identity, options()).expect("transport");
        let listener = RaftListener::bind("127.0.0.1:0", &identity)
            .await
            .expect("bind");
        let address = listener.local_address().to_string();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = StoreConfig::new(dir.path(), node_id, address.clone());
        config.transport = Some(Arc::new(transport.clone()));
        config.bootstrap = bootstrap;
        config.request_timeout = Duration::from_secs(5);
        config.timing = timing;
        let store = Store::open(config).await.expect("open store");
        let server = listener.serve(store.clone());
        Host {
            identity,
            cluster: ClusterStore::new(store, transport),
            server: Some(server),
            address,
            _dir: dir,
        }
    }

    fn store(&self) -> &Store {
        self.cluster.store()
    }

    async fn stop(&mut self) {
        self.store().shutdown().await.expect("store shutdown");
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }
}

struct Region {
    hosts: BTreeMap<u64, Host>,
}

impl Region {
    /// Node 1 initializes; nodes 2 and 3 join as learners over mTLS and become voters.
    async fn start_three_voters() -> Region {
        Region::start_three_voters_with(RaftTiming::default()).await
    }

    async fn start_three_voters_with(timing: RaftTiming) -> Region {
        let ca = ClusterCa::generate("test-region").expect("ca");
        let mut hosts = BTreeMap::new();
        hosts.insert(1, Host::start(&ca, 1, Bootstrap::SingleNode, timing).await);
        for node_id in [2, 3] {
            hosts.insert(
                node_id,
                Host::start(&ca, node_id, Bootstrap::JoinExisting, timing).await,
            );
        }
        let first = hosts[&1].store().clone();
        for node_id in [2, 3] {
            first
                .add_learner(node_id, hosts[&node_id].address.clone())
                .await
                .expect("add learner over mtls");
        }
        first
            .change_membership(BTreeSet::from([1, 2, 3]))
            .await
            .expect("make three voters");
        Region { hosts }
    }

    fn host(&self, node_id: u64) -> &Host {
        &self.hosts[&node_id]
    }

    async fn leader_among(&self, candidates: &[u64]) -> u64 {
        eventually("one leader agreed on by the running hosts", || async {
            let leaders: BTreeSet<u64> = candidates
                .iter()
                .filter_map(|id| self.host(*id).store().metrics().leader_id)
                .collect();
            let leader = *leaders.iter().next()?;
            let agreed = leaders.len() == 1 && candidates.contains(&leader);
            let leads = self.host(leader).store().metrics().role == NodeRole::Leader;
            (agreed && leads).then_some(leader)
        })
        .await
    }

    async fn shutdown(mut self) {
        for host in self.hosts.values_mut() {
            if host.server.is_some() {
                host.stop().await;
            }
        }
    }
}

async fn wait_for_value(store: &Store, key: &str, value: &[u8]) {
    eventually(&format!("{key} on node {}", store.node_id()), || async {
        let item = store
            .get(key, Consistency::Local)
            .await
            .expect("local get")?;
        (item.value == value).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_a_follower_are_forwarded_to_the_leader_and_seen_everywhere() {
    let region = Region::start_three_voters().await;
    let leader = region.leader_among(&[1, 2, 3]).await;
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    let follower_host = region.host(follower);

    // A plain write and a conditional one, from the follower.
    let revision = follower_host
        .cluster
        .put("vms/web", b"v1".to_vec())
        .await
        .expect("forwarded put");
    assert!(revision > 0);
    let refused = follower_host
        .cluster
        .transaction(
            Transaction::new()
                .when_absent("vms/web")
                .put("vms/web", b"v2".to_vec()),
        )
        .await
        .expect("forwarded conditional transaction");
    assert!(
        !refused.succeeded,
        "the condition is checked on the leader's state"
    );

    // A linearizable read on the follower sees its own write at once (read index), without
    // waiting for replication by hand.
    let item = follower_host
        .cluster
        .get("vms/web", Consistency::Linearizable)
        .await
        .expect("linearizable read on a follower")
        .expect("the key exists");
    assert_eq!(item.value, b"v1");
    assert_eq!(item.mod_revision, revision);

    for node_id in [1, 2, 3] {
        wait_for_value(region.host(node_id).store(), "vms/web", b"v1").await;
    }

    // Many forwarded writes at once share one connection to the leader.
    let writes = (0..50).map(|index| {
        let cluster = follower_host.cluster.clone();
        async move {
            cluster
                .put(format!("bulk/{index:03}"), vec![index as u8])
                .await
        }
    });
    for result in futures::future::join_all(writes).await {
        result.expect("concurrent forwarded write");
    }
    let listing = follower_host
        .cluster
        .list("bulk/", Consistency::Linearizable)
        .await
        .expect("linearizable list on a follower");
    assert_eq!(listing.items.len(), 50);
    assert_eq!(
        follower_host.cluster.transport().connections_opened(),
        1,
        "the follower dialed only the leader, once"
    );

    // The leader measured its round trips to the voters; on loopback they give the LAN timing.
    let leader_transport = region.host(leader).cluster.transport();
    let voters: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != leader).collect();
    let samples = leader_transport.round_trip_samples(&voters);
    assert!(!samples.is_empty(), "heartbeats and appends were timed");
    assert!(samples.len() <= 2 * novacron_cluster::transport::ROUND_TRIP_SAMPLES_PER_PEER);
    let record = novacron_cluster::timing::RaftTimingRecord::from_samples(&samples);
    assert_eq!(record.samples, samples.len() as u64);
    let timing = record.timing().expect("valid timing");
    assert!(timing.heartbeat_interval >= novacron_cluster::timing::MIN_HEARTBEAT);

    region.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_leader_shuts_down_a_new_leader_is_elected_and_writes_continue() {
    let mut region = Region::start_three_voters().await;
    let old_leader = region.leader_among(&[1, 2, 3]).await;
    let survivors: Vec<u64> = [1, 2, 3]
        .into_iter()
        .filter(|id| *id != old_leader)
        .collect();
    region
        .host(survivors[0])
        .cluster
        .put("before", b"1".to_vec())
        .await
        .expect("write before the failover");

    region
        .hosts
        .get_mut(&old_leader)
        .expect("leader host")
        .stop()
        .await;

    let new_leader = region.leader_among(&survivors).await;
    assert_ne!(new_leader, old_leader);
    // Write through both survivors: one is the leader, the other forwards.
    for (index, node_id) in survivors.iter().enumerate() {
        region
            .host(*node_id)
            .cluster
            .put(format!("after/{index}"), b"2".to_vec())
            .await
            .expect("write after the failover");
    }
    for node_id in &survivors {
        let store = region.host(*node_id).store();
        wait_for_value(store, "before", b"1").await;
        wait_for_value(store, "after/0", b"2").await;
        wait_for_value(store, "after/1", b"2").await;
    }
    region.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_during_the_election_waits_for_the_new_leader() {
    let mut region = Region::start_three_voters().await;
    let old_leader = region.leader_among(&[1, 2, 3]).await;
    let survivors: Vec<u64> = [1, 2, 3]
        .into_iter()
        .filter(|id| *id != old_leader)
        .collect();
    let writer = region.host(survivors[0]).cluster.clone();
    region
        .hosts
        .get_mut(&old_leader)
        .expect("leader host")
        .stop()
        .await;
    // Issued at once: the follower still believes in the old leader, finds it unreachable,
    // and follows the election to the new one.
    writer
        .put("during/election", b"x".to_vec())
        .await
        .expect("a write issued during the election lands on the new leader");
    let item = writer
        .get("during/election", Consistency::Linearizable)
        .await
        .expect("read")
        .expect("present");
    assert_eq!(item.value, b"x");
    region.shutdown().await;
}

fn vote_message(source_node_id: u64) -> RaftMessage {
    RaftMessage {
        kind: RaftMessageKind::Vote,
        source_node_id,
        body: b"{\"format_version\":1,\"payload\":\"not a vote\"}".to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_with_a_certificate_from_another_ca_is_refused() {
    let region = Region::start_three_voters().await;
    let target = RaftTarget {
        node_id: 1,
        address: region.host(1).address.clone(),
    };

    // Same node id, same names, but issued by another CA: the handshake fails.
    let impostor_ca = ClusterCa::generate("impostor").expect("impostor ca");
    let impostor = impostor_ca
        .issue_node_identity(2)
        .expect("impostor identity");
    let impostor_transport = MtlsRaftTransport::new(&impostor, options()).expect("transport");
    let error = impostor_transport
        .send(target.clone(), vote_message(2))
        .await
        .expect_err("the impostor is refused");
    assert!(
        matches!(error, TransportError::Unreachable { .. }),
        "a refused handshake means nothing was delivered: {error}"
    );

    // And a real host does not talk to a listener with a foreign certificate either.
    let impostor_server =
        RaftServer::start("127.0.0.1:0", &impostor, region.host(2).store().clone())
            .await
            .expect("impostor listener");
    let genuine = MtlsRaftTransport::new(&region.host(1).identity, options()).expect("transport");
    let error = genuine
        .send(
            RaftTarget {
                node_id: 2,
                address: impostor_server.local_address().to_string(),
            },
            vote_message(1),
        )
        .await
        .expect_err("a foreign server is refused");
    assert!(
        matches!(error, TransportError::Unreachable { .. }),
        "{error}"
    );
    impostor_server.shutdown().await;

    // A genuine host dialing the right address under the wrong node id is refused too: the
    // certificate must name the node being dialed.
    let error = genuine
        .send(
            RaftTarget {
                node_id: 3,
                address: region.host(2).address.clone(),
            },
            vote_message(1),
        )
        .await
        .expect_err("node 2's certificate does not name node 3");
    assert!(
        matches!(error, TransportError::Unreachable { .. }),
        "{error}"
    );

    // The cluster is unaffected.
    region
        .host(1)
        .cluster
        .put("still/working", b"yes".to_vec())
        .await
        .expect("write");
    region.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raft_message_whose_source_is_not_the_certificate_is_refused() {
    let region = Region::start_three_voters().await;
    let target = RaftTarget {
        node_id: 1,
        address: region.host(1).address.clone(),
    };
    // Node 2's genuine certificate, speaking as node 2: the message reaches the store, which
    // refuses its body (proving the channel delivered it).
    let as_itself = MtlsRaftTransport::new(&region.host(2).identity, options()).expect("transport");
    let error = as_itself
        .send(target.clone(), vote_message(2))
        .await
        .expect_err("the body is not a vote");
    let text = format!("{:?}", error);
    assert!(text.contains("invalid raft message"), "{text}");

    // The same certificate claiming to be node 3: refused before the store sees it.
    let forger = MtlsRaftTransport::new(&region.host(2).identity, options()).expect("transport");
    let error = forger
        .send(target.clone(), vote_message(3))
        .await
        .expect_err("a forged source is refused");
    let text = format!("{:?}", error);
    assert!(
        matches!(error, TransportError::Failed { .. })
            && text.contains("claims to come from node 3"),
        "{text}"
    );
    // The listener closed that connection; a further message reconnects.
    let error = forger
        .send(target, vote_message(2))
        .await
        .expect_err("the body is not a vote");
    assert!(format!("{error:?}").contains("invalid raft message"));
    assert_eq!(forger.connections_opened(), 2);
    region.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_peer_is_unreachable_and_forwarding_reports_no_leader() {
    let ca = ClusterCa::generate("lonely").expect("ca");
    let identity = ca.issue_node_identity(1).expect("identity");
    let transport = MtlsRaftTransport::new(&identity, options()).expect("transport");
    // Bind and drop a listener to get a port nothing listens on.
    let address = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        listener.local_addr().expect("address").to_string()
    };
    let error = transport
        .send(
            RaftTarget {
                node_id: 2,
                address,
            },
            vote_message(1),
        )
        .await
        .expect_err("nobody listens");
    assert!(
        matches!(error, TransportError::Unreachable { .. }),
        "{error}"
    );

    // A node that was never added to a cluster has no leader: a write fails clearly.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = StoreConfig::new(dir.path(), 1, "127.0.0.1:1");
    config.transport = Some(Arc::new(transport.clone()));
    config.bootstrap = Bootstrap::JoinExisting;
    config.request_timeout = Duration::from_millis(500);
    let store = Store::open(config).await.expect("open");
    let cluster = ClusterStore::new(store.clone(), transport);
    let error = cluster
        .put("nowhere", b"x".to_vec())
        .await
        .expect_err("no leader");
    assert!(matches!(error, ClusterError::NoLeader { .. }), "{error}");
    store.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_unreachable_or_failed_and_the_transport_reconnects() {
    let ca = ClusterCa::generate("silent").expect("ca");
    let client = ca.issue_node_identity(1).expect("client identity");
    let server = ca.issue_node_identity(2).expect("server identity");
    let short = MtlsRaftOptions {
        connect_timeout: Duration::from_millis(300),
        request_timeout: Duration::from_millis(300),
    };
    let transport = MtlsRaftTransport::new(&client, short).expect("transport");

    // Accepts TCP, never speaks TLS: the handshake times out, nothing was delivered.
    let mute = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mute_address = mute.local_addr().expect("address").to_string();
    let mute_task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = mute.accept().await {
            held.push(socket);
        }
    });
    let error = transport
        .send(
            RaftTarget {
                node_id: 2,
                address: mute_address,
            },
            vote_message(1),
        )
        .await
        .expect_err("no handshake");
    assert!(
        matches!(error, TransportError::Unreachable { .. }),
        "{error}"
    );
    mute_task.abort();

    // Completes the handshake and reads requests, never replies: the request fails (it was
    // sent) and the connection is dropped, so the next request dials again.
    let acceptor = tokio_rustls::TlsAcceptor::from(
        server
            .tls_settings()
            .server_config()
            .expect("server config"),
    );
    let deaf = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let deaf_address = deaf.local_addr().expect("address").to_string();
    let deaf_task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = deaf.accept().await {
            if let Ok(mut tls) = acceptor.accept(socket).await {
                held.push(tokio::spawn(async move {
                    let mut sink = Vec::new();
                    let _ = tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut sink).await;
                }));
            }
        }
    });
    let target = RaftTarget {
        node_id: 2,
        address: deaf_address,
    };
    for attempt in 1..=2u64 {
        let error = transport
            .send(target.clone(), vote_message(1))
            .await
            .expect_err("no reply");
        assert!(matches!(error, TransportError::Failed { .. }), "{error}");
        assert_eq!(transport.connections_opened(), attempt);
    }
    deaf_task.abort();
}

/// Regression: the listener once raced its frame reads against finishing requests, and a read
/// cancelled half-way lost bytes and desynchronized the connection. Large frames arriving while
/// other requests complete exercise exactly that.
///
/// openraft 0.9 gives every append-entries RPC the heartbeat interval as its deadline, and a
/// megabyte append (JSON, TLS, fsync) takes longer than the 50 ms LAN heartbeat in a debug build:
/// this test runs with the timing the ACP rule derives from such appends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_concurrent_forwarded_writes_keep_the_stream_in_step() {
    let timing =
        novacron_cluster::timing::raft_timing_for_round_trips(&[Duration::from_millis(240)]);
    let region = Region::start_three_voters_with(timing).await;
    let leader = region.leader_among(&[1, 2, 3]).await;
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    let cluster = region.host(follower).cluster.clone();
    let writes = (0..24u8).map(|index| {
        let cluster = cluster.clone();
        async move {
            let size = if index % 2 == 0 { 100 * 1024 } else { 16 };
            cluster
                .put(format!("large/{index:02}"), vec![index; size])
                .await
        }
    });
    for result in futures::future::join_all(writes).await {
        result.expect("forwarded write");
    }
    let listing = cluster
        .list("large/", Consistency::Linearizable)
        .await
        .expect("list");
    assert_eq!(listing.items.len(), 24);
    for item in &listing.items {
        let index: u8 = item.key["large/".len()..].parse().expect("index");
        assert!(item.value.iter().all(|byte| *byte == index), "{}", item.key);
    }
    assert_eq!(cluster.transport().connections_opened(), 1);
    region.shutdown().await;
}
