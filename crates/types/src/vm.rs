//! VM records: the desired state a user asked for (spec + desired power) and the status the host
//! agent observed. The API writes the first, the agent's reconciler writes the second.

use crate::name::VmName;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use utoipa::ToSchema;

/// What the user asked for when creating a VM. Immutable after creation except for the power state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmSpec {
    pub name: VmName,
    /// Image id (BLAKE3 hex) the VM's disk overlay is backed by; `None` for a diskless VM.
    pub image_id: Option<String>,
    pub cpus: u32,
    pub memory_bytes: u64,
    /// Size of the VM's disk overlay; defaults to the image's virtual size.
    pub disk_bytes: Option<u64>,
    /// Kernel, initrd and command line for a direct kernel boot (paths on the host).
    #[schema(value_type = Option<String>)]
    pub kernel: Option<PathBuf>,
    #[schema(value_type = Option<String>)]
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub restart_policy: RestartPolicy,
    /// Labels its host must carry with exactly these values (placement and `vm migrate`
    /// respect them).
    #[serde(default, skip_serializing_if = "crate::Labels::is_empty")]
    pub required_labels: crate::Labels,
    /// VMs of one anti-affinity group run on distinct hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anti_affinity_group: Option<String>,
    /// The shared storage (`serve --shared-storage NAME=PATH`, a file system every host naming
    /// it mounts) holding the VM's disk; `None`: the disk is local to its host. A VM on shared
    /// storage runs only on hosts that mount it, and moves without copying its disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
}

/// What to do when QEMU exits on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Leave the VM stopped or failed.
    #[default]
    Never,
    /// Restart after a crash, not after a clean guest shutdown.
    OnFailure,
    /// Restart after any exit that the user did not ask for.
    Always,
}

/// The power state the user wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DesiredPower {
    Running,
    Paused,
    Stopped,
}

/// The state the agent observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    Creating,
    Starting,
    Running,
    Paused,
    Stopping,
    Stopped,
    Failed,
    Deleting,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Creating => "creating",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
            VmState::Deleting => "deleting",
        }
    }

    /// A QEMU process may exist in this state.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
        )
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// Which accelerator a running VM got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Accelerator {
    Kvm,
    Tcg,
}

/// What the agent last observed about a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmStatus {
    pub state: VmState,
    /// Why the VM is in this state (always set for `failed`).
    pub reason: Option<String>,
    pub accelerator: Option<Accelerator>,
    /// Why that accelerator was chosen (e.g. why KVM could not be used).
    pub accelerator_reason: Option<String>,
    pub pid: Option<u32>,
    /// Host the VM is assigned to.
    pub host: String,
    /// Unix seconds of the last state change.
    pub since: u64,
    /// How many times the agent restarted the VM after an unexpected exit.
    pub restarts: u32,
    /// The `restart_generation` the agent has carried out.
    pub observed_restart_generation: u64,
}

/// One VM as kept in the store (key `vms/<name>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmRecord {
    pub format_version: u32,
    pub uuid: String,
    pub spec: VmSpec,
    pub desired: DesiredPower,
    /// Set by `vm delete`: the agent tears the VM down, then removes the record.
    pub deletion_requested: bool,
    /// Bumped by `vm restart` so the agent notices a restart request.
    pub restart_generation: u64,
    /// How the last `vm stop` asked to stop: skip the ACPI power-down.
    pub stop_force: bool,
    /// How long the last `vm stop` lets the guest power off before forcing.
    pub stop_timeout_secs: u64,
    pub status: VmStatus,
    pub created_at: u64,
    /// The VM's disk is made by the host it is assigned to (`status.host`), not by the host
    /// that took the create request (which wrote the record in `creating` and returned).
    #[serde(default)]
    pub disk_by_assigned_host: bool,
    /// Why placement chose `status.host` (`None` when the host was not placed by the region's
    /// placement, e.g. on a one-host cluster).
    #[serde(default)]
    pub placement: Option<String>,
    /// The live migration under way (its id, key `migrations/<id>`). While it is set, the source
    /// host's migration drives QEMU and nothing else may change the VM.
    #[serde(default)]
    pub migration: Option<String>,
}

/// A state change, as streamed by the event endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmEvent {
    /// Store revision of the change; events are ordered by it.
    pub revision: u64,
    pub vm: String,
    /// `None` when the VM was deleted.
    pub state: Option<VmState>,
    pub reason: Option<String>,
    pub at: u64,
}
