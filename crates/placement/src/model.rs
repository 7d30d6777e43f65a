//! The plain inputs of placement: hosts and VMs as an operator describes them, the request to
//! place one VM, and the policy that scores candidates. No behaviour beyond validation.

use std::collections::BTreeMap;
use std::fmt;

use crate::error::PlacementError;

/// Whether a host takes new VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostState {
    /// Heartbeating and accepting VMs.
    Ready,
    /// Missed its heartbeats; its VMs may or may not run.
    Unreachable,
    /// Being emptied; takes no new VMs.
    Draining,
    /// Taken out of placement by an operator; its VMs keep running.
    Cordoned,
}

impl fmt::Display for HostState {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            HostState::Ready => "ready",
            HostState::Unreachable => "unreachable",
            HostState::Draining => "draining",
            HostState::Cordoned => "cordoned",
        })
    }
}

/// A host as the cluster knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    /// Stable id; ties between equally good hosts go to the lowest id.
    pub id: u64,
    /// Name shown to operators.
    pub name: String,
    /// Whether it takes new VMs.
    pub state: HostState,
    /// Labels (`zone=eu-1`, `disk=ssd`); a request may require some.
    pub labels: BTreeMap<String, String>,
    /// vCPUs the host offers before overcommit.
    pub cpu_capacity: u32,
    /// Memory the host offers before overcommit, in MiB.
    pub memory_capacity_mib: u64,
    /// vCPUs in use by things other than the VMs in the snapshot (the host itself).
    pub cpu_reserved: u32,
    /// Memory in use by things other than the VMs in the snapshot, in MiB.
    pub memory_reserved_mib: u64,
    /// Image ids whose bytes the host already holds.
    pub images: Vec<String>,
}

/// A VM already placed on a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// The host it runs on (a [`HostSpec::id`]).
    pub host: u64,
    /// vCPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// The image it was created from; the host holds it from then on.
    pub image: Option<String>,
    /// Its anti-affinity group: VMs of one group prefer (soft) or require (hard) distinct hosts.
    pub anti_affinity_group: Option<String>,
}

/// One VM to place.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Request {
    /// vCPUs; at least 1.
    pub cpus: u32,
    /// Memory in MiB; at least 1.
    pub memory_mib: u64,
    /// The image the VM boots from: a host must hold it or be able to fetch it.
    pub image: Option<String>,
    /// Labels the host must carry with exactly these values.
    pub required_labels: BTreeMap<String, String>,
    /// Anti-affinity group of the new VM.
    pub anti_affinity_group: Option<String>,
    /// Only this host (a [`HostSpec::id`]) is considered; it must still pass every filter.
    pub pinned_host: Option<u64>,
}

impl Request {
    /// The VM this request becomes once placed on `host`.
    pub fn to_vm(&self, host: u64) -> VmSpec {
        VmSpec {
            host,
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            image: self.image.clone(),
            anti_affinity_group: self.anti_affinity_group.clone(),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), PlacementError> {
        if self.cpus == 0 {
            return Err(PlacementError::InvalidRequest {
                reason: "a VM needs at least 1 vCPU".to_string(),
            });
        }
        if self.memory_mib == 0 {
            return Err(PlacementError::InvalidRequest {
                reason: "a VM needs at least 1 MiB of memory".to_string(),
            });
        }
        Ok(())
    }
}

/// How candidates that pass every filter are ranked on their resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// Prefer the emptiest host (least allocated cpu and memory after placement).
    Spread,
    /// Prefer the fullest host that still fits, keeping other hosts empty.
    BinPack,
}

impl fmt::Display for Strategy {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Strategy::Spread => "spread",
            Strategy::BinPack => "bin-pack",
        })
    }
}

/// Whether anti-affinity excludes hosts or only lowers their score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AntiAffinityMode {
    /// A host already running a VM of the group is excluded.
    Hard,
    /// A host loses [`Policy::anti_affinity_weight`] per VM of the group it already runs.
    Soft,
}

/// The scoring policy. Scores add up: the resource score (0 to 1), plus
/// `image_locality_weight` when the host holds the image, minus `anti_affinity_weight` per VM of
/// the request's group on the host (soft mode).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Spread or bin-pack.
    pub strategy: Strategy,
    /// Allocatable vCPUs = capacity × this ratio (≥ 1 overcommits).
    pub cpu_overcommit: f64,
    /// Allocatable memory = capacity × this ratio.
    pub memory_overcommit: f64,
    /// Bonus for a host that already holds the request's image.
    pub image_locality_weight: f64,
    /// Hard or soft anti-affinity.
    pub anti_affinity: AntiAffinityMode,
    /// Penalty per VM of the group already on a host, in soft mode.
    pub anti_affinity_weight: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            strategy: Strategy::Spread,
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
            image_locality_weight: 0.2,
            anti_affinity: AntiAffinityMode::Hard,
            anti_affinity_weight: 0.5,
        }
    }
}

impl Policy {
    pub fn validate(&self) -> Result<(), PlacementError> {
        let refuse = |reason: String| Err(PlacementError::InvalidPolicy { reason });
        for (name, ratio) in [
            ("cpu overcommit", self.cpu_overcommit),
            ("memory overcommit", self.memory_overcommit),
        ] {
            if !(ratio.is_finite() && ratio > 0.0 && ratio <= 1000.0) {
                return refuse(format!("{name} ratio must be in (0, 1000], got {ratio}"));
            }
        }
        for (name, weight) in [
            ("image locality weight", self.image_locality_weight),
            ("anti-affinity weight", self.anti_affinity_weight),
        ] {
            if !(weight.is_finite() && (0.0..=1000.0).contains(&weight)) {
                return refuse(format!("{name} must be in [0, 1000], got {weight}"));
            }
        }
        Ok(())
    }
}
