//! This host as a member of a region (issue 4): the settings file under `<data>/cluster/`, opening
//! the store with the mTLS raft transport, `cluster init` / `join` / `token create` / `list` /
//! `remove`, the heartbeat every host writes, and the leader's loop that applies the voter
//! policy (1 → 3 → 5 voters) and recommends a raft timing from measured round trips (every host
//! applies it at once and keeps it for its next start).
//!
//! Init and join change how the store must be opened (a transport, a node id, a fresh store for a
//! joiner), so they write the new settings and ask `serve` to restart itself; the next start
//! opens the store in the region. Nothing here decides about VMs: removing a host with VMs is the
//! caller's check, and placement is elsewhere.

use crate::AgentError;
use crate::host::{Host, Shared};
use crate::paths::DataPaths;
use novacron_cluster::join::{self, HostRecord};
use novacron_cluster::membership::{self, HostView, MemberRole, MembershipPolicy, MembershipView};
use novacron_cluster::{
    ClusterCa, ClusterError, ClusterStore, MtlsRaftOptions, MtlsRaftTransport, NodeIdentity,
    RaftListener, RaftServer, joiner, timing,
};
use novacron_store::{Bootstrap, Consistency, Store, StoreConfig};
use novacron_types::{
    ClusterHost, ClusterInfo, ClusterInitRequest, ClusterJoinRequest, ClusterMembershipChange,
    CreateJoinTokenRequest, ErrorCode, HostHeartbeat, JoinTokenInfo, RECORD_FORMAT_VERSION,
    RemoveHostOptions, VmState,
};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Where the cluster listener binds unless told otherwise.
pub const DEFAULT_RAFT_LISTEN: &str = "0.0.0.0:7182";
/// Settings file of a region member, in `<data>/cluster/`.
const SETTINGS_FILE: &str = "region.json";
/// Version of the settings file.
const SETTINGS_FORMAT_VERSION: u32 = 1;
/// How often each host writes its heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// A host whose last heartbeat is older than this is shown as unreachable.
pub const UNREACHABLE_AFTER: Duration = Duration::from_secs(10);
/// How often the leader looks at the voter policy.
const LEADER_LOOP_INTERVAL: Duration = Duration::from_secs(2);
/// The store key of the region's name.
const REGION_NAME_KEY: &str = "region/name";
/// Default token lifetime.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// `<data>/cluster/region.json`: what a host needs to open its store in the region.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RegionSettings {
    format_version: u32,
    /// The region's name (as given to init; a joiner learns it from the store).
    region: Option<String>,
    node_id: u64,
    /// Where the cluster listener binds.
    raft_listen: String,
    /// Where the region reaches it (this node's raft address).
    advertise: String,
    /// A joined host that is not a member yet: ask this member to add it as a learner.
    join_via: Option<JoinVia>,
    /// Move the one-host store aside at the next start (a joiner starts from an empty store).
    #[serde(default)]
    replace_store: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct JoinVia {
    node_id: u64,
    address: String,
}

fn cluster_dir(paths: &DataPaths) -> PathBuf {
    paths.root().join("cluster")
}

/// The cluster directory for an init or a join, which must not exist yet: one left without
/// region settings is an interrupted init or join, and the user must decide about it.
fn free_cluster_dir(paths: &DataPaths) -> Result<PathBuf, AgentError> {
    let dir = cluster_dir(paths);
    if dir.exists() {
        return Err(AgentError::InvalidArgument(format!(
            "{} exists without region settings (an interrupted init or join?); remove it and \
             try again",
            dir.display()
        )));
    }
    Ok(dir)
}

fn settings_path(paths: &DataPaths) -> PathBuf {
    cluster_dir(paths).join(SETTINGS_FILE)
}

fn load_settings(paths: &DataPaths) -> Result<Option<RegionSettings>, AgentError> {
    let path = settings_path(paths);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(AgentError::io(format!("reading {}", path.display()), error)),
    };
    let settings: RegionSettings =
        serde_json::from_slice(&bytes).map_err(|error| AgentError::CorruptRecord {
            key: path.display().to_string(),
            reason: format!(
                "{error}; restore it or remove {} to leave the region",
                path.display()
            ),
        })?;
    if settings.format_version > SETTINGS_FORMAT_VERSION {
        return Err(AgentError::CorruptRecord {
            key: path.display().to_string(),
            reason: format!(
                "written by a newer NovaCron (format {}); upgrade this host",
                settings.format_version
            ),
        });
    }
    Ok(Some(settings))
}

fn save_settings(paths: &DataPaths, settings: &RegionSettings) -> Result<(), AgentError> {
    let path = settings_path(paths);
    let temporary = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(settings).unwrap_or_default();
    std::fs::write(&temporary, bytes)
        .and_then(|()| std::fs::rename(&temporary, &path))
        .map_err(|error| AgentError::io(format!("writing {}", path.display()), error))
}

impl From<ClusterError> for AgentError {
    fn from(error: ClusterError) -> Self {
        let code = match &error {
            ClusterError::Store(store) => {
                return AgentError::from(clone_store_error(store));
            }
            ClusterError::NoLeader { .. }
            | ClusterError::PeerUnreachable { .. }
            | ClusterError::PeerFailed { .. }
            | ClusterError::Listener { .. } => ErrorCode::Unavailable,
            ClusterError::InvalidJoinToken { .. }
            | ClusterError::JoinTokenRefused { .. }
            | ClusterError::CaFingerprintMismatch { .. } => ErrorCode::InvalidArgument,
            // The admitting host refused the join request itself: the token or the request.
            ClusterError::PeerRefused { request, .. } if *request == "join" => {
                ErrorCode::InvalidArgument
            }
            ClusterError::PeerRefused { .. } | ClusterError::Membership { .. } => {
                ErrorCode::Conflict
            }
            _ => ErrorCode::Internal,
        };
        AgentError::Cluster {
            code,
            message: error_chain(&error),
        }
    }
}

/// A store error carried inside a cluster error, rebuilt so the agent's mapping applies.
fn clone_store_error(error: &novacron_store::StoreError) -> novacron_store::StoreError {
    use novacron_store::StoreError;
    match error {
        StoreError::NoQuorum { message } => StoreError::NoQuorum {
            message: message.clone(),
        },
        StoreError::Timeout { operation, timeout } => StoreError::Timeout {
            operation: operation.clone(),
            timeout: *timeout,
        },
        other => StoreError::Raft {
            message: other.to_string(),
        },
    }
}

/// The error and its sources, `a: b: c`.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(source) = current {
        let part = source.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        current = source.source();
    }
    text
}

/// A region member's running parts.
pub(crate) struct Region {
    settings: std::sync::Mutex<RegionSettings>,
    pub(crate) cluster: ClusterStore,
    /// The cluster CA, once this host holds it (node 1 from `cluster init`; the others from the
    /// copy node 1 puts in the store, see [`share_ca`]).
    ca: novacron_cluster::SharedCa,
    server: tokio::sync::Mutex<Option<RaftServer>>,
    paths: DataPaths,
}

/// Opens the store: alone (no region settings) as before, or in the region with the mTLS
/// transport and the cluster listener.
pub(crate) async fn open_store(
    paths: &DataPaths,
    host_name: &str,
) -> Result<(Store, Option<Arc<Region>>), AgentError> {
    let Some(mut settings) = load_settings(paths)? else {
        let store = Store::open(StoreConfig::new(paths.store_dir(), 1, host_name)).await?;
        return Ok((store, None));
    };
    let dir = cluster_dir(paths);
    if settings.replace_store {
        let store_dir = paths.store_dir();
        if store_dir.exists() {
            let aside = paths
                .root()
                .join(format!("store.before-join-{}", novacron_types::unix_now()));
            std::fs::rename(&store_dir, &aside).map_err(|error| {
                AgentError::io(format!("moving {} aside", store_dir.display()), error)
            })?;
            tracing::info!(old_store = %aside.display(), "joining a region: the one-host store was moved aside");
        }
        settings.replace_store = false;
        save_settings(paths, &settings)?;
    }
    let identity = NodeIdentity::load(&dir)?;
    let ca = novacron_cluster::server::shared_ca(
        if dir.join(novacron_cluster::identity::CA_KEY_FILE).exists() {
            Some(Arc::new(ClusterCa::load(&dir)?))
        } else {
            None
        },
    );
    let listener = RaftListener::bind(&settings.raft_listen, &identity).await?;
    let transport = MtlsRaftTransport::new(&identity, MtlsRaftOptions::default())?;
    let mut config = StoreConfig::new(paths.store_dir(), identity.node_id(), &settings.advertise);
    config.transport = Some(Arc::new(transport.clone()));
    config.bootstrap = if identity.node_id() == 1 && settings.join_via.is_none() {
        Bootstrap::SingleNode
    } else {
        Bootstrap::JoinExisting
    };
    config.timing = timing::read_timing_file(&dir);
    let store = Store::open(config).await?;
    let cluster = ClusterStore::new(store.clone(), transport);
    let server = listener.serve_cluster(cluster.clone(), ca.clone());
    tracing::info!(
        node_id = identity.node_id(),
        raft_address = %settings.advertise,
        listen = %server.local_address(),
        holds_ca = ca.get().is_some(),
        "region member started"
    );
    let region = Arc::new(Region {
        settings: std::sync::Mutex::new(settings),
        cluster,
        ca,
        server: tokio::sync::Mutex::new(Some(server)),
        paths: paths.clone(),
    });
    Ok((store, Some(region)))
}

impl Region {
    fn settings(&self) -> RegionSettings {
        self.settings
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub(crate) fn node_id(&self) -> u64 {
        self.cluster.node_id()
    }

    /// This node's raft address as the region reaches it.
    pub(crate) fn advertise(&self) -> String {
        self.settings().advertise
    }

    pub(crate) async fn shutdown(&self) {
        if let Some(server) = self.server.lock().await.take() {
            server.shutdown().await;
        }
    }

    /// A joined host asks to be added as a learner until it is a member.
    pub(crate) async fn become_learner(self: Arc<Self>) {
        let Some(via) = self.settings().join_via else {
            return;
        };
        let node_id = self.node_id();
        loop {
            let membership = self.cluster.store().metrics().membership;
            if membership.voters.contains(&node_id) || membership.learners.contains(&node_id) {
                break;
            }
            match self
                .cluster
                .transport()
                .add_learner_via(via.node_id, &via.address, node_id)
                .await
            {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(via = %via.address, error = %error_chain(&error), "asking to be added as a learner; will retry");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        tracing::info!(node_id, "this host is a member of the region");
        let mut settings = self.settings();
        settings.join_via = None;
        if let Err(error) = save_settings(&self.paths, &settings) {
            tracing::warn!(%error, "cannot record that the join finished");
        }
        *self
            .settings
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = settings;
    }
}

/// Writes this host's heartbeat every [`HEARTBEAT_INTERVAL`].
pub(crate) async fn heartbeat(shared: Arc<Shared>, region: Arc<Region>) {
    let mut interval = tokio::time::interval(HEARTBEAT_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let heartbeat = local_heartbeat(&shared, region.node_id()).await;
        if let Err(error) = shared.records.put_heartbeat(&heartbeat).await {
            tracing::debug!(%error, "heartbeat not written");
        }
        match timing::load_raft_timing(&region.cluster).await {
            Ok(stored) => mirror_raft_timing(&region, stored),
            Err(error) => tracing::debug!(%error, "region raft timing unreadable"),
        }
        if let Err(error) = share_ca(&region).await {
            tracing::debug!(%error, "cluster CA not shared yet");
        }
    }
}

/// Store key of the cluster CA's copy.
const CA_RECORD_KEY: &str = "cluster/ca";

/// The cluster CA as the store holds it, for every member to admit joiners.
#[derive(Serialize, Deserialize)]
struct CaRecord {
    certificate_pem: String,
    private_key_pem: String,
}

/// Spreads the cluster CA over the region, so that any member can admit a joining host, not
/// only the first one: a host holding the CA puts a copy in the store once; a host without it
/// takes the copy (after checking it is the CA its own certificate chains to), saves it in its
/// cluster directory (the key with mode 0600) and admits joiners from then on. Like Incus's
/// shared cluster certificate, every member then holds the key; the store's files are as
/// private as the key file.
async fn share_ca(region: &Region) -> Result<(), AgentError> {
    let store = region.cluster.store();
    let stored = store.get(CA_RECORD_KEY, Consistency::Local).await?;
    match (region.ca.get(), stored) {
        (Some(_), Some(_)) | (None, None) => Ok(()),
        (Some(ca), None) => {
            let record = CaRecord {
                certificate_pem: ca.certificate_pem(),
                private_key_pem: ca.private_key_pem().to_string(),
            };
            let value = serde_json::to_vec(&record).unwrap_or_default();
            region
                .cluster
                .transaction(
                    novacron_store::Transaction::new()
                        .when_absent(CA_RECORD_KEY)
                        .put(CA_RECORD_KEY, value),
                )
                .await?;
            tracing::info!(
                "cluster CA copied into the region's store: every member can admit hosts"
            );
            Ok(())
        }
        (None, Some(stored)) => {
            let record: CaRecord = serde_json::from_slice(&stored.value).map_err(|error| {
                AgentError::CorruptRecord {
                    key: CA_RECORD_KEY.into(),
                    reason: error.to_string(),
                }
            })?;
            let ca = ClusterCa::from_pem(&record.certificate_pem, &record.private_key_pem)?;
            let dir = cluster_dir(&region.paths);
            let own = NodeIdentity::load(&dir)?;
            if ca.certificate_pem()
                != novacron_cluster::identity::certificate_pem(own.ca_certificate_der().as_ref())
            {
                return Err(AgentError::CorruptRecord {
                    key: CA_RECORD_KEY.into(),
                    reason: "it is not the CA that signed this host's certificate".into(),
                });
            }
            ca.save(&dir)?;
            if region.ca.set(Arc::new(ca)).is_ok() {
                tracing::info!("this host now holds the cluster CA and can admit hosts");
            }
            Ok(())
        }
    }
}

async fn local_heartbeat(shared: &Shared, node_id: u64) -> HostHeartbeat {
    let host_name = &shared.config.host_name;
    let (mut vms, mut running, mut memory) = (0u32, 0u32, 0u64);
    if let Ok(listing) = shared
        .records
        .store()
        .list(crate::records::VM_PREFIX, Consistency::Local)
        .await
    {
        for item in &listing.items {
            let Ok(record) = serde_json::from_slice::<novacron_types::VmRecord>(&item.value) else {
                continue;
            };
            if &record.status.host != host_name {
                continue;
            }
            vms += 1;
            if record.status.state.has_process() {
                running += 1;
            }
            if record.desired != novacron_types::DesiredPower::Stopped
                && record.status.state != VmState::Failed
            {
                memory += record.spec.memory_bytes;
            }
        }
    }
    let mut images = Vec::new();
    if let Ok(listing) = shared
        .records
        .store()
        .list(crate::records::IMAGE_PREFIX, Consistency::Local)
        .await
    {
        for item in &listing.items {
            if let Ok(image) = serde_json::from_slice::<novacron_types::ImageRecord>(&item.value)
                && shared.paths.image_file(&image.id, image.format).exists()
            {
                images.push(image.id);
            }
        }
    }
    let (transfer_address, transfer_fingerprint) = match shared.transfer_endpoint.get() {
        Some((address, fingerprint)) => (address.clone(), Some(fingerprint.clone())),
        None => (None, None),
    };
    HostHeartbeat {
        images,
        format_version: RECORD_FORMAT_VERSION,
        node_id,
        host: host_name.clone(),
        cpus: shared.capacity.cpus,
        memory_bytes: shared.capacity.memory_bytes,
        memory_available_bytes: crate::resources::memory_available_bytes().unwrap_or(0),
        vms,
        vms_running: running,
        vm_memory_bytes: memory,
        at_unix_ms: join::now_unix_millis(),
        transfer_address,
        transfer_fingerprint,
        labels: shared.config.labels.clone(),
        shared_storages: shared.config.shared_storages.keys().cloned().collect(),
        raft_timing: Some(raft_timing_info(&shared.records.store().timing())),
    }
}

fn raft_timing_info(timing: &novacron_store::RaftTiming) -> novacron_types::RaftTimingInfo {
    let millis = |duration: Duration| u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    novacron_types::RaftTimingInfo {
        heartbeat_ms: millis(timing.heartbeat_interval),
        election_timeout_min_ms: millis(timing.election_timeout_min),
        election_timeout_max_ms: millis(timing.election_timeout_max),
    }
}

/// The transfer address other hosts of the region dial: the bound one, or, when it is bound to
/// every interface, the IP this host advertises to the region with the bound port.
pub(crate) fn advertised_transfer_address(shared: &Shared, bound: std::net::SocketAddr) -> String {
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    let advertised_ip = shared.region.as_ref().and_then(|region| {
        region
            .advertise()
            .parse::<std::net::SocketAddr>()
            .ok()
            .map(|address| address.ip())
    });
    match advertised_ip {
        Some(ip) => std::net::SocketAddr::new(ip, bound.port()).to_string(),
        None => bound.to_string(),
    }
}

/// On the leader: keep node 1's address and host record right, and apply the voter policy one
/// change at a time.
pub(crate) async fn leader_loop(shared: Arc<Shared>, region: Arc<Region>) {
    let policy = MembershipPolicy {
        heartbeat_fresh_within: UNREACHABLE_AFTER,
        voter_loss_grace: shared.config.voter_loss_grace,
        ..MembershipPolicy::default()
    };
    let mut interval = tokio::time::interval(LEADER_LOOP_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut joint_watch = JointWatch::default();
    loop {
        interval.tick().await;
        if let Err(error) = leader_pass(&shared, &region, &policy, &mut joint_watch).await {
            tracing::warn!(%error, "region upkeep failed; will retry");
        }
    }
}

/// A joint configuration left for longer than this is finished by the leader: a change that
/// runs its course leaves joint within a couple of commits.
const STALLED_JOINT_AFTER: Duration = Duration::from_secs(10);

/// Which joint configuration the leader has seen, and since when.
#[derive(Debug, Default)]
struct JointWatch {
    seen: Option<(std::collections::BTreeSet<u64>, std::time::Instant)>,
}

impl JointWatch {
    /// Records what the membership is now; returns the joint's target once the same joint
    /// configuration has stayed for [`STALLED_JOINT_AFTER`].
    fn stalled_target(
        &mut self,
        joint_target: Option<&std::collections::BTreeSet<u64>>,
        now: std::time::Instant,
    ) -> Option<std::collections::BTreeSet<u64>> {
        let Some(target) = joint_target else {
            self.seen = None;
            return None;
        };
        match &self.seen {
            Some((seen, since)) if seen == target => {
                (now.duration_since(*since) >= STALLED_JOINT_AFTER).then(|| target.clone())
            }
            _ => {
                self.seen = Some((target.clone(), now));
                None
            }
        }
    }
}

async fn leader_pass(
    shared: &Shared,
    region: &Region,
    policy: &MembershipPolicy,
    joint_watch: &mut JointWatch,
) -> Result<(), AgentError> {
    let store = region.cluster.store();
    let metrics = store.metrics();
    let node_id = region.node_id();
    if metrics.leader_id != Some(node_id) {
        return Ok(());
    }
    let settings = region.settings();
    if metrics.membership.addresses.get(&node_id) != Some(&settings.advertise) {
        tracing::info!(node_id, address = %settings.advertise, "recording this host's raft address");
        store.set_node_address(node_id, &settings.advertise).await?;
    }
    if join::host_record(&region.cluster, node_id).await?.is_none() {
        let identity = NodeIdentity::load(&cluster_dir(&region.paths))?;
        join::record_host(
            &region.cluster,
            &HostRecord {
                format_version: join::CLUSTER_RECORD_FORMAT_VERSION,
                node_id,
                host_name: shared.config.host_name.clone(),
                raft_address: settings.advertise.clone(),
                certificate_fingerprint: identity.host_identity().fingerprint().to_string(),
                joined_at_unix_ms: join::now_unix_millis(),
            },
        )
        .await?;
    }
    if let Some(name) = &settings.region
        && region
            .cluster
            .get(REGION_NAME_KEY, Consistency::Local)
            .await?
            .is_none()
    {
        region
            .cluster
            .put(REGION_NAME_KEY, name.clone().into_bytes())
            .await?;
    }
    let heartbeats = shared.records.heartbeats().await?;
    let now = join::now_unix_millis();
    let metrics = store.metrics();
    let stalled_joint_target = joint_watch.stalled_target(
        metrics.membership.joint_target.as_ref(),
        std::time::Instant::now(),
    );
    if let Some(target) = &stalled_joint_target {
        tracing::warn!(
            voters = ?target,
            "a voter change has stayed half-way (joint consensus) for more than {}s; finishing it",
            STALLED_JOINT_AFTER.as_secs()
        );
    }
    let fresh = u64::try_from(UNREACHABLE_AFTER.as_millis()).unwrap_or(u64::MAX);
    let view = MembershipView {
        hosts: metrics
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
            .map(|(id, role)| {
                let last = heartbeats
                    .iter()
                    .find(|heartbeat| heartbeat.node_id == id)
                    .map(|heartbeat| heartbeat.at_unix_ms);
                HostView {
                    node_id: id,
                    role,
                    healthy: last.is_some_and(|at| now.saturating_sub(at) <= fresh),
                    last_heartbeat_unix_ms: last,
                }
            })
            .collect(),
        joint: metrics.membership.joint,
        stalled_joint_target,
        leader_id: metrics.leader_id,
        now_unix_ms: now,
    };
    if let Some(change) = membership::next_membership_change(policy, &view) {
        membership::apply_membership_change(store, &change).await?;
    }
    recommend_raft_timing(region, &metrics.membership.voters).await
}

/// On the leader: derives the raft timing from the append round trips measured to the other
/// voters and stores it when it differs enough from the current one (every host applies it
/// within a heartbeat of this host's, [`HEARTBEAT_INTERVAL`], and writes it to its timing file).
async fn recommend_raft_timing(
    region: &Region,
    voters: &std::collections::BTreeSet<u64>,
) -> Result<(), AgentError> {
    let peers: Vec<u64> = voters
        .iter()
        .copied()
        .filter(|voter| *voter != region.node_id())
        .collect();
    let samples = region.cluster.transport().round_trip_samples(&peers);
    if samples.is_empty() {
        return Ok(());
    }
    let proposed = timing::RaftTimingRecord::from_samples(&samples);
    let current = match timing::load_raft_timing(&region.cluster).await? {
        Some(record) => record.timing()?,
        None => timing::read_timing_file(&cluster_dir(&region.paths)),
    };
    if timing::timing_change_is_worth_applying(&current, &proposed.timing()?) {
        tracing::info!(
            heartbeat_ms = proposed.heartbeat_ms,
            election_timeout_min_ms = proposed.election_timeout_min_ms,
            round_trip_p99_us = proposed.measured_round_trip_p99_us,
            samples = proposed.samples,
            "recommending a new raft timing to every host"
        );
        timing::store_raft_timing(&region.cluster, &proposed).await?;
    }
    Ok(())
}

/// Every host: runs raft on the region's stored timing from now on, and mirrors it into its
/// timing file for the next start (which also sets the append-entries deadline from it).
fn mirror_raft_timing(region: &Region, stored: Option<timing::RaftTimingRecord>) {
    let Some(record) = stored else {
        return;
    };
    let store = region.cluster.store();
    match record.timing() {
        Ok(timing) if store.timing() != timing => match store.set_timing(timing) {
            Ok(()) => tracing::info!(
                heartbeat_ms = record.heartbeat_ms,
                election_timeout_min_ms = record.election_timeout_min_ms,
                "raft runs on the region's new timing"
            ),
            Err(error) => tracing::warn!(%error, "cannot apply the region's raft timing"),
        },
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "the region's raft timing is invalid"),
    }
    let dir = cluster_dir(&region.paths);
    let on_disk = std::fs::read(dir.join(timing::RAFT_TIMING_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<timing::RaftTimingRecord>(&bytes).ok());
    if on_disk.as_ref() == Some(&record) {
        return;
    }
    if let Err(error) = timing::write_timing_file(&dir, &record) {
        tracing::warn!(%error, "cannot save the region's raft timing");
    }
}

/// Checks that `address` can be bound now (the listener binds it after the restart).
async fn check_bindable(address: &str) -> Result<(), AgentError> {
    match tokio::net::TcpListener::bind(address).await {
        Ok(_) => Ok(()),
        Err(error) => Err(AgentError::InvalidArgument(format!(
            "cannot bind the cluster listener on {address}: {error}; choose another --raft-listen"
        ))),
    }
}

/// The listen and advertise addresses of an init or join request, with defaults, checked.
async fn listen_and_advertise(
    raft_listen: Option<&str>,
    advertise: Option<&str>,
) -> Result<(String, String), AgentError> {
    let listen = raft_listen.unwrap_or(DEFAULT_RAFT_LISTEN).to_string();
    let listen_address: std::net::SocketAddr = listen.parse().map_err(|_| {
        AgentError::InvalidArgument(format!(
            "--raft-listen {listen:?} is not an address like 0.0.0.0:7182"
        ))
    })?;
    let advertise = match advertise {
        Some(advertise) => {
            let valid = advertise
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                return Err(AgentError::InvalidArgument(format!(
                    "--advertise {advertise:?} is not HOST:PORT (the address other hosts reach this \
                     host's cluster listener at)"
                )));
            }
            advertise.to_string()
        }
        None if listen_address.ip().is_unspecified() => {
            return Err(AgentError::InvalidArgument(format!(
                "--raft-listen {listen} binds every interface: pass --advertise HOST:PORT, the \
                 address other hosts reach this host's cluster listener at"
            )));
        }
        None => listen.clone(),
    };
    check_bindable(&listen).await?;
    Ok((listen, advertise))
}

/// Cluster operations of a host.
impl Host {
    fn region(&self) -> Result<&Arc<Region>, AgentError> {
        self.shared.region.as_ref().ok_or_else(|| {
            AgentError::InvalidArgument(
                "this host is not in a region; `novacron cluster init` makes it the first host, \
                 `novacron cluster join` adds it to one"
                    .into(),
            )
        })
    }

    fn refuse_if_in_region(&self) -> Result<(), AgentError> {
        if let Some(region) = &self.shared.region {
            return Err(AgentError::Cluster {
                code: ErrorCode::AlreadyExists,
                message: format!(
                    "this host is already node {} of a region; `novacron cluster list` shows it",
                    region.node_id()
                ),
            });
        }
        Ok(())
    }

    /// `GET /api/v1/cluster`.
    pub async fn cluster_info(&self) -> Result<ClusterInfo, AgentError> {
        let unreachable_after_secs = UNREACHABLE_AFTER.as_secs();
        let Some(region) = &self.shared.region else {
            let shared = &self.shared;
            let heartbeat = local_heartbeat(shared, 1).await;
            let metrics = shared.records.store().metrics();
            return Ok(ClusterInfo {
                region: None,
                node_id: 1,
                leader_id: metrics.leader_id,
                membership_changing: false,
                unreachable_after_secs,
                hosts: vec![ClusterHost {
                    node_id: 1,
                    host: shared.config.host_name.clone(),
                    role: "leader".into(),
                    raft_address: "-".into(),
                    health: "ok".into(),
                    heartbeat_age_secs: Some(0),
                    heartbeat: Some(heartbeat),
                }],
            });
        };
        let summaries = join::host_summaries(&region.cluster).await?;
        let heartbeats = self.shared.records.heartbeats().await?;
        let now = join::now_unix_millis();
        let name = region
            .cluster
            .get(REGION_NAME_KEY, Consistency::Local)
            .await?
            .map(|value| String::from_utf8_lossy(&value.value).to_string())
            .or_else(|| region.settings().region);
        let hosts = summaries
            .into_iter()
            .map(|summary| {
                let heartbeat = heartbeats
                    .iter()
                    .find(|heartbeat| heartbeat.node_id == summary.record.node_id)
                    .cloned();
                let age_ms = heartbeat
                    .as_ref()
                    .map(|heartbeat| now.saturating_sub(heartbeat.at_unix_ms));
                let fresh = age_ms.is_some_and(|age| {
                    age <= u64::try_from(UNREACHABLE_AFTER.as_millis()).unwrap_or(u64::MAX)
                });
                ClusterHost {
                    node_id: summary.record.node_id,
                    host: summary.record.host_name,
                    role: summary.role,
                    raft_address: summary.record.raft_address,
                    health: if fresh { "ok" } else { "unreachable" }.into(),
                    heartbeat_age_secs: age_ms.map(|age| age / 1000),
                    heartbeat,
                }
            })
            .collect();
        let metrics = region.cluster.store().metrics();
        Ok(ClusterInfo {
            region: name,
            node_id: region.node_id(),
            leader_id: metrics.leader_id,
            membership_changing: metrics.membership.joint,
            unreachable_after_secs,
            hosts,
        })
    }

    /// `POST /api/v1/cluster/init`: creates the cluster CA and this host's identity (node 1),
    /// writes the region settings and restarts `serve` into the region. The store keeps its
    /// data: the host's VMs and images become the region's.
    pub async fn cluster_init(
        &self,
        request: ClusterInitRequest,
    ) -> Result<ClusterMembershipChange, AgentError> {
        self.refuse_if_in_region()?;
        let name = request.name.unwrap_or_else(|| "novacron".into());
        if name.is_empty()
            || name.len() > 63
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(AgentError::InvalidArgument(format!(
                "region name {name:?} must be 1 to 63 letters, digits, '-' or '_'"
            )));
        }
        let (listen, advertise) =
            listen_and_advertise(request.raft_listen.as_deref(), request.advertise.as_deref())
                .await?;
        let paths = self.shared.paths.clone();
        let dir = free_cluster_dir(&paths)?;
        let settings = RegionSettings {
            format_version: SETTINGS_FORMAT_VERSION,
            region: Some(name.clone()),
            node_id: 1,
            raft_listen: listen,
            advertise: advertise.clone(),
            join_via: None,
            replace_store: false,
        };
        let written = tokio::task::spawn_blocking({
            let paths = paths.clone();
            let dir = dir.clone();
            let name = name.clone();
            move || -> Result<(), AgentError> {
                std::fs::create_dir_all(&dir).map_err(|error| {
                    AgentError::io(format!("creating {}", dir.display()), error)
                })?;
                let ca = ClusterCa::generate(&name)?;
                ca.save(&dir)?;
                ca.issue_node_identity(1)?.save(&dir)?;
                save_settings(&paths, &settings)
            }
        })
        .await
        .map_err(|error| AgentError::InvalidArgument(format!("cluster init failed: {error}")))?;
        if let Err(error) = written {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(error);
        }
        tracing::info!(region = %name, raft_address = %advertise, "region created; restarting into it");
        self.request_restart();
        Ok(ClusterMembershipChange {
            region: name,
            node_id: 1,
            raft_address: advertise,
            restarting: true,
        })
    }

    /// `POST /api/v1/cluster/join`: enrols this (fresh) host with a member holding the CA,
    /// writes the region settings and restarts `serve`; after the restart the host opens an
    /// empty store, asks to be added as a learner and catches up. The leader's voter policy
    /// promotes it later.
    pub async fn cluster_join(
        &self,
        request: ClusterJoinRequest,
    ) -> Result<ClusterMembershipChange, AgentError> {
        self.refuse_if_in_region()?;
        let records = &self.shared.records;
        let (vms, images) = (records.vms().await?.len(), records.images().await?.len());
        if vms + images > 0 {
            return Err(AgentError::Cluster {
                code: ErrorCode::Conflict,
                message: format!(
                    "this host has {vms} vm(s) and {images} image(s) of its own; only a fresh \
                     host can join a region (its store is replaced by the region's): delete \
                     them, or run `serve` with a new --data-dir"
                ),
            });
        }
        if request.address.is_empty() || request.token.is_empty() {
            return Err(AgentError::InvalidArgument(
                "give the address of a region host's cluster listener and a join token".into(),
            ));
        }
        // Parse the token before anything else: a typo must not cost a round trip.
        request
            .token
            .parse::<join::JoinToken>()
            .map_err(AgentError::from)?;
        let (listen, advertise) =
            listen_and_advertise(request.raft_listen.as_deref(), request.advertise.as_deref())
                .await?;
        let paths = self.shared.paths.clone();
        let dir = free_cluster_dir(&paths)?;
        let (identity, grant) = joiner::enrol(
            &request.address,
            &request.token,
            &self.shared.config.host_name,
            &advertise,
            Duration::from_secs(15),
        )
        .await?;
        let settings = RegionSettings {
            format_version: SETTINGS_FORMAT_VERSION,
            region: None,
            node_id: identity.node_id(),
            raft_listen: listen,
            advertise: advertise.clone(),
            join_via: Some(JoinVia {
                node_id: grant.admitted_by_node_id,
                address: request.address.clone(),
            }),
            replace_store: true,
        };
        let node_id = identity.node_id();
        let written = (|| -> Result<(), AgentError> {
            std::fs::create_dir_all(&dir)
                .map_err(|error| AgentError::io(format!("creating {}", dir.display()), error))?;
            identity.save(&dir)?;
            if let Some(record) = &grant.raft_timing {
                timing::write_timing_file(&dir, record).map_err(|error| {
                    AgentError::io(
                        format!("writing the raft timing into {}", dir.display()),
                        error,
                    )
                })?;
            }
            save_settings(&paths, &settings)
        })();
        if let Err(error) = written {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(error);
        }
        tracing::info!(node_id, via = %request.address, "admitted to the region; restarting into it");
        self.request_restart();
        Ok(ClusterMembershipChange {
            region: String::new(),
            node_id,
            raft_address: advertise,
            restarting: true,
        })
    }

    /// `POST /api/v1/cluster/tokens`: a one-time join token (only on a host holding the CA).
    pub async fn create_join_token(
        &self,
        request: CreateJoinTokenRequest,
    ) -> Result<JoinTokenInfo, AgentError> {
        let region = self.region()?;
        let Some(ca) = region.ca.get() else {
            return Err(AgentError::Cluster {
                code: ErrorCode::Conflict,
                message: "this host does not hold the cluster CA yet, so it cannot admit hosts; \
                          every member receives a copy within seconds of joining: retry, or \
                          create the token on another host"
                    .into(),
            });
        };
        let lifetime = request
            .ttl_secs
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME);
        if lifetime.is_zero() || lifetime > join::MAX_JOIN_TOKEN_LIFETIME {
            return Err(AgentError::InvalidArgument(format!(
                "token lifetime {}s is out of range: 1s to {}s",
                lifetime.as_secs(),
                join::MAX_JOIN_TOKEN_LIFETIME.as_secs()
            )));
        }
        let token = join::create_join_token(&region.cluster, ca.fingerprint(), lifetime).await?;
        Ok(JoinTokenInfo {
            token: token.to_string(),
            token_id: token.token_id.clone(),
            expires_at_unix_ms: join::now_unix_millis()
                + u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX),
            join_address: region.settings().advertise,
        })
    }

    /// `DELETE /api/v1/cluster/hosts/{host}`: removes a host (by name or node id) from the
    /// region. Refused while VMs are assigned to it unless `force` (the API does not move them:
    /// `cluster remove --force` evacuates them first with `vm migrate`, `--abandon-vms` leaves
    /// them assigned to the removed host).
    pub async fn remove_cluster_host(
        &self,
        reference: &str,
        options: RemoveHostOptions,
    ) -> Result<ClusterHost, AgentError> {
        let region = self.region()?;
        let info = self.cluster_info().await?;
        let Some(host) = info
            .hosts
            .into_iter()
            .find(|host| host.host == reference || host.node_id.to_string() == reference)
        else {
            return Err(AgentError::Cluster {
                code: ErrorCode::NotFound,
                message: format!(
                    "host {reference:?} is not in the region; `novacron cluster list` shows the \
                     hosts"
                ),
            });
        };
        let assigned: Vec<String> = self
            .shared
            .records
            .vms()
            .await?
            .into_iter()
            .filter(|vm| vm.record.status.host == host.host)
            .map(|vm| vm.record.spec.name.to_string())
            .collect();
        if !assigned.is_empty() && !options.force {
            return Err(AgentError::Cluster {
                code: ErrorCode::Conflict,
                message: format!(
                    "host {} has {} vm(s) assigned ({}); pass --force to move them to other \
                     hosts first, or --abandon-vms to remove the host anyway (the VMs then stay \
                     assigned to the removed host)",
                    host.host,
                    assigned.len(),
                    assigned.join(", ")
                ),
            });
        }
        region.cluster.remove_host(host.node_id).await?;
        self.shared.records.delete_heartbeat(host.node_id).await?;
        tracing::info!(host = %host.host, node_id = host.node_id, "host removed from the region");
        Ok(host)
    }
}

/// Where a new VM goes in a region: the placement core (filters, then scores; see
/// `novacron_placement`) over the region's hosts, their heartbeats (capacity, health, images held)
/// and the VMs already assigned. `pinned` restricts it to one host, which must still fit.
/// Returns the host's name and the sentence `vm show` prints.
pub(crate) async fn place_vm(
    shared: &Shared,
    region: &Region,
    spec: &novacron_types::VmSpec,
    pinned: Option<&str>,
) -> Result<(String, String), AgentError> {
    let pinned = pinned.map(|name| ("--host", name));
    place(shared, region, spec, pinned, None).await
}

/// Where a VM moves (`vm migrate`): placement over every host but the one it runs on, which is
/// treated as draining.
pub(crate) async fn place_vm_elsewhere(
    shared: &Shared,
    region: &Region,
    record: &novacron_types::VmRecord,
    pinned: Option<&str>,
) -> Result<(String, String), AgentError> {
    place(
        shared,
        region,
        &record.spec,
        pinned.map(|name| ("--to", name)),
        Some(&record.status.host),
    )
    .await
}

async fn place(
    shared: &Shared,
    region: &Region,
    spec: &novacron_types::VmSpec,
    // The pinned host's name, with the flag that named it (for the error).
    pinned: Option<(&str, &str)>,
    leaving: Option<&str>,
) -> Result<(String, String), AgentError> {
    use novacron_placement::{HostSpec, HostState, Placement, Request, Snapshot, VmSpec};
    let hosts = join::list_hosts(&region.cluster).await?;
    let heartbeats = shared.records.heartbeats().await?;
    let local = local_heartbeat(shared, region.node_id()).await;
    let membership = region.cluster.store().metrics().membership;
    let now = join::now_unix_millis();
    let fresh = u64::try_from(UNREACHABLE_AFTER.as_millis()).unwrap_or(u64::MAX);
    let specs: Vec<HostSpec> = hosts
        .iter()
        .map(|host| {
            let heartbeat = if host.node_id == region.node_id() {
                Some(&local)
            } else {
                heartbeats
                    .iter()
                    .find(|heartbeat| heartbeat.node_id == host.node_id)
            };
            let member = membership.voters.contains(&host.node_id)
                || membership.learners.contains(&host.node_id);
            let alive = heartbeat.is_some_and(|beat| now.saturating_sub(beat.at_unix_ms) <= fresh);
            HostSpec {
                id: host.node_id,
                name: host.host_name.clone(),
                state: if !(member && alive) {
                    HostState::Unreachable
                } else if leaving == Some(host.host_name.as_str()) {
                    HostState::Draining
                } else {
                    HostState::Ready
                },
                labels: heartbeat
                    .map(|beat| {
                        let mut labels = beat.labels.clone();
                        labels.extend(
                            beat.shared_storages
                                .iter()
                                .map(|name| (storage_label(name), STORAGE_MOUNTED.to_string())),
                        );
                        labels
                    })
                    .unwrap_or_default(),
                cpu_capacity: heartbeat.map(|beat| beat.cpus).unwrap_or(0),
                memory_capacity_mib: heartbeat.map(|beat| beat.memory_bytes >> 20).unwrap_or(0),
                cpu_reserved: 0,
                memory_reserved_mib: 0,
                images: heartbeat
                    .map(|beat| beat.images.clone())
                    .unwrap_or_default(),
            }
        })
        .collect();
    let id_of = |name: &str| {
        hosts
            .iter()
            .find(|host| host.host_name == name)
            .map(|host| host.node_id)
    };
    // Every VM assigned to a host holds its resources there, running or not.
    let vms: Vec<VmSpec> = shared
        .records
        .vms()
        .await?
        .into_iter()
        .filter_map(|vm| {
            Some(VmSpec {
                host: id_of(&vm.record.status.host)?,
                cpus: vm.record.spec.cpus,
                memory_mib: vm.record.spec.memory_bytes >> 20,
                image: vm.record.spec.image_id.clone(),
                anti_affinity_group: vm.record.spec.anti_affinity_group.clone(),
            })
        })
        .collect();
    let pinned_host = match pinned {
        None => None,
        Some((flag, name)) => Some(id_of(name).ok_or_else(|| {
            AgentError::InvalidArgument(format!(
                "{flag} {name:?} is not a host of this region (hosts: {}); `novacron cluster \
                 list` shows them",
                hosts
                    .iter()
                    .map(|host| host.host_name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?),
    };
    let invalid = |error: novacron_placement::PlacementError| {
        AgentError::InvalidArgument(format!("placement: {error}"))
    };
    // A new VM's host fetches a missing image from a live host holding it (`fetch_image`); a
    // migration's source pushes the VM's base image to a destination without it.
    let fetchable: Vec<String> = image_sources(&heartbeats, now)
        .flat_map(|heartbeat| heartbeat.images.iter().cloned())
        .chain(leaving.and(spec.image_id.clone()))
        .collect();
    let snapshot = Snapshot::new(specs, vms, fetchable).map_err(invalid)?;
    let mut required_labels = spec.required_labels.clone();
    if let Some(name) = &spec.storage {
        required_labels.insert(storage_label(name), STORAGE_MOUNTED.to_string());
    }
    let request = Request {
        cpus: spec.cpus,
        memory_mib: spec.memory_bytes >> 20,
        image: spec.image_id.clone(),
        required_labels,
        anti_affinity_group: spec.anti_affinity_group.clone(),
        pinned_host,
    };
    let policy = placement_policy(&shared.records.placement_policy().await?);
    match snapshot.place(&request, &policy).map_err(invalid)? {
        Placement::Decision(decision) => Ok((decision.host_name, decision.explanation)),
        Placement::Refusal(refusal) => {
            let reasons: Vec<String> = refusal
                .exclusions
                .iter()
                .map(|excluded| format!("{}: {}", excluded.host_name, excluded.exclusion))
                .collect();
            Err(AgentError::Cluster {
                code: ErrorCode::InsufficientResources,
                message: format!("{} ({})", refusal.summary(), reasons.join("; ")),
            })
        }
    }
}

/// Placement sees a host's shared storages as labels, `shared-storage/NAME=mounted`, and a VM on
/// one requires its label (a refusal then reads "lacks label shared-storage/NAME=mounted").
fn storage_label(name: &str) -> String {
    format!("shared-storage/{name}")
}

const STORAGE_MOUNTED: &str = "mounted";

/// Heartbeats of hosts that can serve an image now: fresh, with a transfer listener.
fn image_sources(heartbeats: &[HostHeartbeat], now: u64) -> impl Iterator<Item = &HostHeartbeat> {
    let fresh = u64::try_from(UNREACHABLE_AFTER.as_millis()).unwrap_or(u64::MAX);
    heartbeats.iter().filter(move |heartbeat| {
        now.saturating_sub(heartbeat.at_unix_ms) <= fresh
            && heartbeat.transfer_address.is_some()
            && heartbeat.transfer_fingerprint.is_some()
    })
}

/// Makes sure this host holds `image`'s file, pulling it over DWCP from a live host of the
/// region that holds it (the one with the freshest heartbeat first, then the others). Returns
/// the host it came from, or `None` when it was already here.
pub(crate) async fn fetch_image(
    shared: &Shared,
    image: &novacron_types::ImageRecord,
) -> Result<Option<String>, AgentError> {
    use novacron_types::{CreateTransferRequest, TransferDirection, TransferState};
    if shared.paths.image_file(&image.id, image.format).exists() {
        return Ok(None);
    }
    let unavailable = |detail: String| AgentError::Cluster {
        code: ErrorCode::Unavailable,
        message: format!(
            "image {} is not on this host and cannot be fetched: {detail}; `novacron image push` \
             copies it here",
            image.name
        ),
    };
    if shared.region.is_none() {
        return Err(unavailable("this host is not in a region".into()));
    }
    let service = shared
        .transfer_service()
        .ok_or_else(|| unavailable("this host's transfer service is not running".into()))?;
    let now = join::now_unix_millis();
    let heartbeats = shared.records.heartbeats().await?;
    let mut sources: Vec<&HostHeartbeat> = image_sources(&heartbeats, now)
        .filter(|heartbeat| {
            heartbeat.host != shared.config.host_name && heartbeat.images.contains(&image.id)
        })
        .collect();
    sources.sort_by_key(|heartbeat| std::cmp::Reverse(heartbeat.at_unix_ms));
    let mut failures = Vec::new();
    for source in sources {
        let (Some(address), Some(fingerprint)) =
            (&source.transfer_address, &source.transfer_fingerprint)
        else {
            continue;
        };
        tracing::info!(image = %image.name, from = %source.host, "fetching a missing image");
        let finished = service
            .run_to_end(
                CreateTransferRequest {
                    direction: TransferDirection::Pull,
                    image: image.id.clone(),
                    address: address.clone(),
                    fingerprint: fingerprint.clone(),
                    name: None,
                },
                std::future::pending::<std::convert::Infallible>(),
            )
            .await;
        let info = match finished {
            Ok(info) => info,
            Err(crate::transfer::TransferEnd::NotStarted(error)) => {
                failures.push(format!("{}: {error}", source.host));
                continue;
            }
            Err(crate::transfer::TransferEnd::Stopped(never)) => match never {},
        };
        if info.state == TransferState::Succeeded
            && shared.paths.image_file(&image.id, image.format).exists()
        {
            tracing::info!(image = %image.name, from = %source.host, bytes = info.wire_bytes, "image fetched");
            return Ok(Some(source.host.clone()));
        }
        failures.push(format!(
            "{}: {}",
            source.host,
            info.message.unwrap_or_else(|| format!("{:?}", info.state))
        ));
    }
    Err(unavailable(if failures.is_empty() {
        "no live host of the region holds it".into()
    } else {
        failures.join("; ")
    }))
}

/// The placement core's policy for the region's stored one.
fn placement_policy(policy: &novacron_types::PlacementPolicy) -> novacron_placement::Policy {
    use novacron_placement::{AntiAffinityMode, Policy, Strategy};
    use novacron_types::{AntiAffinity, PlacementStrategy};
    Policy {
        strategy: match policy.strategy {
            PlacementStrategy::Spread => Strategy::Spread,
            PlacementStrategy::BinPack => Strategy::BinPack,
        },
        cpu_overcommit: policy.cpu_overcommit,
        memory_overcommit: policy.memory_overcommit,
        image_locality_weight: policy.image_locality_weight,
        anti_affinity: match policy.anti_affinity {
            AntiAffinity::Hard => AntiAffinityMode::Hard,
            AntiAffinity::Soft => AntiAffinityMode::Soft,
        },
        anti_affinity_weight: policy.anti_affinity_weight,
    }
}

impl Host {
    /// `GET /api/v1/cluster/placement-policy`.
    pub async fn placement_policy(&self) -> Result<novacron_types::PlacementPolicy, AgentError> {
        self.shared.records.placement_policy().await
    }

    /// `PUT /api/v1/cluster/placement-policy`: checked, then stored for the whole region. VMs
    /// already placed stay where they are.
    pub async fn set_placement_policy(
        &self,
        policy: novacron_types::PlacementPolicy,
    ) -> Result<novacron_types::PlacementPolicy, AgentError> {
        placement_policy(&policy)
            .validate()
            .map_err(|error| AgentError::InvalidArgument(format!("placement policy: {error}")))?;
        self.shared.records.put_placement_policy(&policy).await?;
        tracing::info!(?policy, "placement policy changed");
        Ok(policy)
    }
}

#[cfg(test)]
mod placement_policy_tests {
    #[test]
    fn the_stored_default_is_the_placement_cores_default() {
        assert_eq!(
            super::placement_policy(&novacron_types::PlacementPolicy::default()),
            novacron_placement::Policy::default()
        );
    }
}

#[cfg(test)]
mod joint_watch_tests {
    use std::collections::BTreeSet;
    use std::time::{Duration, Instant};

    use super::{JointWatch, STALLED_JOINT_AFTER};

    #[test]
    fn only_the_same_joint_configuration_seen_long_enough_counts_as_stalled() {
        let start = Instant::now();
        let target = BTreeSet::from([1, 2, 3]);
        let other = BTreeSet::from([1, 2, 3, 4, 5]);
        let mut watch = JointWatch::default();
        assert_eq!(watch.stalled_target(Some(&target), start), None);
        let almost = start + STALLED_JOINT_AFTER - Duration::from_millis(1);
        assert_eq!(watch.stalled_target(Some(&target), almost), None);
        let late = start + STALLED_JOINT_AFTER;
        assert_eq!(
            watch.stalled_target(Some(&target), late),
            Some(target.clone())
        );
        // A different joint configuration starts its own clock.
        assert_eq!(watch.stalled_target(Some(&other), late), None);
        // Leaving joint forgets it: the same target seen again later starts over.
        assert_eq!(watch.stalled_target(None, late), None);
        let later = late + STALLED_JOINT_AFTER * 2;
        assert_eq!(watch.stalled_target(Some(&target), later), None);
    }
}
