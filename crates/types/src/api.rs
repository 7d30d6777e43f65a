//! Request and response bodies of the REST API that are not records themselves. The CLI uses the
//! same types as the server, so the two cannot drift apart.

use crate::vm::{Accelerator, RestartPolicy};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Body of `POST /api/v1/vms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreateVmRequest {
    pub name: String,
    /// Image name or id; the VM's disk is a qcow2 overlay backed by it.
    pub image: Option<String>,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    #[serde(default = "default_memory_bytes")]
    pub memory_bytes: u64,
    /// Size of the VM's disk; defaults to the image's virtual size (never smaller than it).
    pub disk_bytes: Option<u64>,
    /// Absolute paths on the host of a kernel and initrd for a direct kernel boot.
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Start the VM once created (default true).
    #[serde(default = "default_true")]
    pub start: bool,
    /// Host (by name) to run the VM on; default the host that serves the request.
    #[serde(default)]
    pub host: Option<String>,
    /// Labels the VM's host must carry (`{"zone": "eu-1"}`); hosts get labels from `serve
    /// --label`.
    #[serde(default)]
    pub required_labels: crate::Labels,
    /// Anti-affinity group: no two VMs of a group are placed on one host.
    #[serde(default)]
    pub anti_affinity_group: Option<String>,
    /// Keep the VM's disk on this shared storage (`serve --shared-storage NAME=PATH` on the
    /// hosts that mount it) instead of its host's data directory: a live migration between two
    /// hosts mounting it then moves only the VM's memory.
    #[serde(default)]
    pub storage: Option<String>,
}

fn default_cpus() -> u32 {
    1
}
fn default_memory_bytes() -> u64 {
    512 << 20
}
fn default_true() -> bool {
    true
}

/// Query of `POST /api/v1/vms/{name}/stop`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, utoipa::IntoParams,
)]
pub struct StopOptions {
    /// Skip the ACPI power-down and end QEMU at once.
    #[serde(default)]
    pub force: bool,
    /// Seconds to wait for the guest to power off before forcing (default 30).
    pub timeout_secs: Option<u64>,
}

/// Query of `DELETE /api/v1/vms/{name}`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, utoipa::IntoParams,
)]
pub struct DeleteOptions {
    /// Delete even when the VM is running (it is stopped at once).
    #[serde(default)]
    pub force: bool,
}

/// What `GET /api/v1/host` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostInfo {
    pub host: String,
    pub version: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub accelerator: Accelerator,
    pub accelerator_reason: String,
    pub qemu_version: String,
    pub data_dir: String,
    pub vms: usize,
    pub images: usize,
    /// SHA-256 fingerprint of this host's transfer certificate, what peers pin
    /// (`novacron peer trust <fingerprint>` on them).
    pub fingerprint: String,
    /// Address the DWCP transfer listener is bound to, if it runs.
    pub transfer_address: Option<String>,
}

/// What `GET /api/v1/health` reports (no token needed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
}
