//! Growing a region over the cluster channel: a host joins with a one-time token (CSR signed by
//! the CA, CA pinned by the token's fingerprint), is added as a learner, the voter policy
//! promotes it, and a host can be removed. Each host has its own redb directory and a real mTLS
//! listener on 127.0.0.1.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use novacron_cluster::join::{self, HostRecord, JoinToken};
use novacron_cluster::membership::{self, HostView, MemberRole, MembershipPolicy, MembershipView};
use novacron_cluster::{
    ClusterCa, ClusterError, ClusterStore, MtlsRaftOptions, MtlsRaftTransport, NodeIdentity,
    RaftListener, RaftServer, joiner,
};
use novacron_store::{Bootstrap, Consistency, Store, StoreConfig};
use tempfile::TempDir;

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

struct Host {
    cluster: ClusterStore,
    server: RaftServer,
    address: String,
    _dir: TempDir,
}

async fn open_host(
    identity: &NodeIdentity,
    listener: RaftListener,
    bootstrap: Bootstrap,
    ca: Option<Arc<ClusterCa>>,
) -> Host {
    let transport =
        MtlsRaftTransport::new(identity, MtlsRaftOptions::default()).expect("transport");
    let address = listener.local_address().to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = StoreConfig::new(dir.path(), identity.node_id(), address.clone());
    config.transport = Some(Arc::new(transport.clone()));
    config.bootstrap = bootstrap;
    config.request_timeout = Duration::from_secs(5);
    let store = Store::open(config).await.expect("open store");
    let cluster = ClusterStore::new(store, transport);
    let server = listener.serve_cluster(cluster.clone(), novacron_cluster::server::shared_ca(ca));
    Host {
        cluster,
        server,
        address,
        _dir: dir,
    }
}

/// `cluster init`: a CA, node 1, a single-voter store, the host recorded.
async fn init() -> (Arc<ClusterCa>, Host) {
    let ca = Arc::new(ClusterCa::generate("join-test").expect("ca"));
    let identity = ca.issue_node_identity(1).expect("identity");
    let listener = RaftListener::bind("127.0.0.1:0", &identity)
        .await
        .expect("bind");
    let host = open_host(&identity, listener, Bootstrap::SingleNode, Some(ca.clone())).await;
    join::record_host(
        &host.cluster,
        &HostRecord {
            format_version: join::CLUSTER_RECORD_FORMAT_VERSION,
            node_id: 1,
            host_name: "host-1".into(),
            raft_address: host.address.clone(),
            certificate_fingerprint: identity.host_identity().fingerprint().to_string(),
            joined_at_unix_ms: join::now_unix_millis(),
        },
    )
    .await
    .expect("record the first host");
    (ca, host)
}

/// `cluster join ADDR --token T`: bind, enrol, open the store, ask to be added as a learner.
async fn join_through(address: &str, token: &str, host_name: &str) -> Result<Host, ClusterError> {
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let raft_address = socket.local_addr().expect("address").to_string();
    let (identity, grant) = joiner::enrol(
        address,
        token,
        host_name,
        &raft_address,
        Duration::from_secs(10),
    )
    .await?;
    if let Some(timing) = &grant.raft_timing {
        assert!(timing.timing().is_ok(), "the grant carries a valid timing");
    }
    let listener = RaftListener::from_listener(socket, &identity).expect("listener");
    let host = open_host(&identity, listener, Bootstrap::JoinExisting, None).await;
    host.cluster
        .transport()
        .add_learner_via(grant.admitted_by_node_id, address, identity.node_id())
        .await?;
    Ok(host)
}

fn membership_view(leader: &ClusterStore) -> MembershipView {
    let metrics = leader.store().metrics();
    let now = join::now_unix_millis();
    let hosts = metrics
        .membership
        .voters
        .iter()
        .map(|id| (*id, MemberRole::Voter))
        .chain(
            metrics
                .membership
                .learners
                .iter()
                .map(|id| (*id, MemberRole::Learner)),
        )
        .map(|(node_id, role)| HostView {
            node_id,
            role,
            healthy: true,
            last_heartbeat_unix_ms: Some(now),
        })
        .collect();
    MembershipView {
        hosts,
        joint: metrics.membership.joint,
        stalled_joint_target: None,
        leader_id: metrics.leader_id,
        now_unix_ms: now,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_join_with_one_time_tokens_become_voters_and_can_be_removed() {
    let (ca, first) = init().await;
    let token = join::create_join_token(&first.cluster, ca.fingerprint(), Duration::from_secs(60))
        .await
        .expect("token");

    novacron_cluster::timing::store_raft_timing(
        &first.cluster,
        &novacron_cluster::timing::RaftTimingRecord::from_samples(&[Duration::from_millis(1)]),
    )
    .await
    .expect("store the region's timing");
    let second = join_through(&first.address, &token.to_string(), "host-2")
        .await
        .expect("host 2 joins");
    assert_eq!(second.cluster.node_id(), 2);
    let metrics = first.cluster.store().metrics();
    assert!(metrics.membership.learners.contains(&2), "{metrics:?}");

    // The token was one-time.
    let error = match join_through(&first.address, &token.to_string(), "host-x").await {
        Ok(_) => panic!("a used token must be refused"),
        Err(error) => error,
    };
    assert!(error.to_string().contains("already used"), "{error}");
    let records = join::list_join_tokens(&first.cluster).await.expect("list");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].used_by_node_id, Some(2));

    // A third host joins through the second (which does not hold the CA: refused), then the
    // first.
    let token = join::create_join_token(&first.cluster, ca.fingerprint(), Duration::from_secs(60))
        .await
        .expect("token");
    let error = match join_through(&second.address, &token.to_string(), "host-3").await {
        Ok(_) => panic!("a host without the CA cannot admit"),
        Err(error) => error,
    };
    assert!(
        error.to_string().contains("does not hold the cluster ca"),
        "{error}"
    );
    let third = join_through(&first.address, &token.to_string(), "host-3")
        .await
        .expect("host 3 joins");
    assert_eq!(third.cluster.node_id(), 3);

    // The voter policy: three healthy hosts, one voter → one change to three voters.
    let policy = MembershipPolicy::default();
    let change = membership::next_membership_change(&policy, &membership_view(&first.cluster))
        .expect("grow to three voters");
    assert_eq!(change.voters, BTreeSet::from([1, 2, 3]));
    membership::apply_membership_change(first.cluster.store(), &change)
        .await
        .expect("apply");
    assert_eq!(
        membership::next_membership_change(&policy, &membership_view(&first.cluster)),
        None
    );

    // The region works from the newest host.
    third
        .cluster
        .put("joined/works", b"yes".to_vec())
        .await
        .expect("write forwarded from a joined host");
    let summaries = join::host_summaries(&first.cluster)
        .await
        .expect("summaries");
    let roles: Vec<(u64, &str)> = summaries
        .iter()
        .map(|summary| (summary.record.node_id, summary.role.as_str()))
        .collect();
    assert_eq!(roles, [(1, "leader"), (2, "voter"), (3, "voter")]);
    assert!(
        summaries
            .iter()
            .all(|summary| summary.replicated_index.is_some())
    );
    let hosts = join::list_hosts(&third.cluster).await.expect("hosts");
    let names: Vec<&str> = hosts.iter().map(|host| host.host_name.as_str()).collect();
    assert_eq!(names, ["host-1", "host-2", "host-3"]);

    // Remove host 3 from host 2 (forwarded to the leader).
    second.cluster.remove_host(3).await.expect("remove host 3");
    // Its certificate is still valid, but it is no longer a member: the leader refuses its
    // membership requests (and forwarded writes and reads).
    let error = third
        .cluster
        .transport()
        .add_learner_via(1, &first.address, 2)
        .await
        .expect_err("a removed host has no say");
    assert!(error.to_string().contains("not a member"), "{error}");
    let metrics = first.cluster.store().metrics();
    assert!(!metrics.membership.voters.contains(&3));
    assert!(!metrics.membership.learners.contains(&3));
    assert_eq!(
        join::list_hosts(&first.cluster).await.expect("hosts").len(),
        2
    );
    eventually("the write on host 2", || async {
        second
            .cluster
            .get("joined/works", Consistency::Local)
            .await
            .expect("get")
            .map(|_| ())
    })
    .await;

    for host in [third, second, first] {
        host.cluster.store().shutdown().await.expect("shutdown");
        host.server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_refuses_a_member_whose_ca_is_not_the_pinned_one() {
    let (ca, first) = init().await;
    let token = join::create_join_token(&first.cluster, ca.fingerprint(), Duration::from_secs(60))
        .await
        .expect("token");
    // The same token text but pinning another CA: the joiner refuses the member's certificate,
    // so the secret never leaves the joiner.
    let other = ClusterCa::generate("other").expect("other ca");
    let mut forged: JoinToken = token.to_string().parse().expect("parse");
    forged.ca_fingerprint = other.fingerprint();
    let error = match join_through(&first.address, &forged.to_string(), "host-2").await {
        Ok(_) => panic!("the member's CA is not the pinned one"),
        Err(error) => error,
    };
    assert!(
        matches!(error, ClusterError::PeerUnreachable { .. }),
        "{error}"
    );
    // The token is still unused.
    let records = join::list_join_tokens(&first.cluster).await.expect("list");
    assert_eq!(records[0].used_at_unix_ms, None);
    // And an expired or garbled token is refused by the member.
    let error = match join_through(&first.address, "ncjoin1.garbage", "host-2").await {
        Ok(_) => panic!("garbage token"),
        Err(error) => error,
    };
    assert!(
        matches!(error, ClusterError::InvalidJoinToken { .. }),
        "{error}"
    );
    first.cluster.store().shutdown().await.expect("shutdown");
    first.server.shutdown().await;
}
