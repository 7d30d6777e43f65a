//! Bodies of the region API (`/api/v1/cluster...`): init, join tokens, join, the host list and
//! host removal, plus the heartbeat record every host keeps in the store.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Body of `POST /api/v1/cluster/init`: make this host the first host of a region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClusterInitRequest {
    /// Region name (written into the cluster CA's certificate). Default `novacron`.
    pub name: Option<String>,
    /// Address the cluster (raft) listener binds, default `0.0.0.0:7182`.
    pub raft_listen: Option<String>,
    /// Address other hosts reach the cluster listener at (required when `raft_listen` binds
    /// every interface).
    pub advertise: Option<String>,
}

/// Body of `POST /api/v1/cluster/join`: make this (fresh) host join a region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClusterJoinRequest {
    /// Cluster listener of a host of the region that holds the CA (the first host), HOST:PORT.
    pub address: String,
    /// The one-time token `novacron cluster token create` printed.
    pub token: String,
    /// Address this host's cluster listener binds, default `0.0.0.0:7182`.
    pub raft_listen: Option<String>,
    /// Address the region reaches this host's cluster listener at.
    pub advertise: Option<String>,
}

/// What init and join answer: the host restarts its `serve` to take the new role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClusterMembershipChange {
    pub region: String,
    pub node_id: u64,
    pub raft_address: String,
    /// Always true: `serve` restarts itself (same pid) to open the store in the region.
    pub restarting: bool,
}

/// Body of `POST /api/v1/cluster/tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreateJoinTokenRequest {
    /// Lifetime in seconds (default 3600, at most 7 days).
    pub ttl_secs: Option<u64>,
}

/// A new join token. The secret is shown once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JoinTokenInfo {
    pub token: String,
    pub token_id: String,
    pub expires_at_unix_ms: u64,
    /// Where joiners should connect (this host's cluster listener).
    pub join_address: String,
}

/// Query of `DELETE /api/v1/cluster/hosts/{host}`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, utoipa::IntoParams,
)]
pub struct RemoveHostOptions {
    /// Remove even though VMs are assigned to the host. The API does not move them (they stay
    /// assigned to a host that no longer exists until deleted); `novacron cluster remove
    /// --force` moves them with `vm migrate` before it asks.
    #[serde(default)]
    pub force: bool,
}

/// What each host writes to the store every few seconds (`host-status/<node id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostHeartbeat {
    pub format_version: u32,
    pub node_id: u64,
    pub host: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub memory_available_bytes: u64,
    /// VMs assigned to the host.
    pub vms: u32,
    /// Those of them with a QEMU process.
    pub vms_running: u32,
    /// Sum of the memory of its VMs that should run.
    pub vm_memory_bytes: u64,
    /// Unix milliseconds, by the host's clock.
    pub at_unix_ms: u64,
    /// Ids of the images whose files the host holds (placement prefers, and for now requires,
    /// a host holding the VM's image).
    #[serde(default)]
    pub images: Vec<String>,
    /// Where the host's DWCP transfer listener is reached (live migrations and image moves
    /// between hosts of the region dial it), and the fingerprint its certificate must have.
    #[serde(default)]
    pub transfer_address: Option<String>,
    #[serde(default)]
    pub transfer_fingerprint: Option<String>,
    /// The host's labels (`serve --label zone=eu-1`), matched by VMs' required labels.
    #[serde(default)]
    pub labels: crate::Labels,
    /// Names of the shared storages the host mounts (`serve --shared-storage NAME=PATH`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_storages: Vec<String>,
    /// The raft timing the host runs on now (the region's recommended one once applied).
    #[serde(default)]
    pub raft_timing: Option<RaftTimingInfo>,
}

/// A host's live raft timing, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RaftTimingInfo {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
}

/// One line of `cluster list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClusterHost {
    pub node_id: u64,
    pub host: String,
    /// `leader`, `voter`, `learner` or `not_member` (admitted but not added, or removed).
    pub role: String,
    pub raft_address: String,
    /// `ok`, or `unreachable` when its last heartbeat is older than the limit (or missing).
    pub health: String,
    /// Seconds since its last heartbeat, if one was seen.
    pub heartbeat_age_secs: Option<u64>,
    pub heartbeat: Option<HostHeartbeat>,
}

/// `GET /api/v1/cluster`: the region as the host that answers sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClusterInfo {
    /// `None` when this host is not in a region (a one-host cluster).
    pub region: Option<String>,
    /// This host's raft node id.
    pub node_id: u64,
    pub leader_id: Option<u64>,
    /// A change of the voters is half-way (raft's joint consensus: both the old and the new
    /// voters must form a majority until it completes), as this host sees the membership.
    /// Losing a majority of either set now stalls the region until they return.
    #[serde(default)]
    pub membership_changing: bool,
    /// A host whose heartbeat is older than this is shown as unreachable.
    pub unreachable_after_secs: u64,
    pub hosts: Vec<ClusterHost>,
}

/// How placement ranks hosts that pass every filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PlacementStrategy {
    /// Prefer the emptiest host.
    Spread,
    /// Prefer the fullest host that still fits, keeping others empty.
    BinPack,
}

/// Whether an anti-affinity group excludes hosts or only lowers their score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AntiAffinity {
    /// A host already running a VM of the group is excluded.
    Hard,
    /// A host loses `anti_affinity_weight` per VM of the group it runs.
    Soft,
}

/// The region's placement policy (`GET/PUT /api/v1/cluster/placement-policy`, `novacron cluster
/// policy`): one record in the store, used by every host that places a VM. A field left out
/// takes its default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct PlacementPolicy {
    pub strategy: PlacementStrategy,
    /// Allocatable vCPUs = a host's CPUs × this ratio, in (0, 1000].
    pub cpu_overcommit: f64,
    /// Allocatable memory = a host's memory × this ratio, in (0, 1000].
    pub memory_overcommit: f64,
    pub anti_affinity: AntiAffinity,
    /// Score lost per VM of the group on a host (soft anti-affinity), in [0, 1000].
    pub anti_affinity_weight: f64,
    /// Score bonus of a host that already holds the VM's image, in [0, 1000].
    pub image_locality_weight: f64,
}

impl Default for PlacementPolicy {
    fn default() -> Self {
        Self {
            strategy: PlacementStrategy::Spread,
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
            anti_affinity: AntiAffinity::Hard,
            anti_affinity_weight: 0.5,
            image_locality_weight: 0.2,
        }
    }
}
