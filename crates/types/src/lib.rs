//! Plain data shared by every NovaCron crate: VM and image records, their names, the API's error
//! codes. No IO lives here, so every other crate (and the API's OpenAPI document) can depend on it.
//!
//! Records are stored in the replicated store as JSON; each carries a `format_version` so a newer
//! binary can read an older record and an older one refuses a newer record clearly.

pub mod api;
pub mod cluster;
pub mod error;
pub mod image;
pub mod link;
pub mod migration;
pub mod name;
pub mod scratch;
pub mod size;
pub mod transfer;
pub mod vm;

pub use api::{CreateVmRequest, DeleteOptions, Health, HostInfo, StopOptions};
pub use cluster::{
    AntiAffinity, ClusterHost, ClusterInfo, ClusterInitRequest, ClusterJoinRequest,
    ClusterMembershipChange, CreateJoinTokenRequest, HostHeartbeat, JoinTokenInfo, PlacementPolicy,
    PlacementStrategy, RaftTimingInfo, RemoveHostOptions,
};
pub use error::{ApiErrorBody, ErrorCode};
pub use image::{ImageFormat, ImageRecord};
pub use link::{LinkInfo, ProbeLinkRequest};
pub use migration::{MigrateVmRequest, MigrationPhase, MigrationProgress, MigrationRecord};
pub use name::{
    ImageName, LABEL_MAX_LEN, Labels, NameError, VmName, parse_label, validate_group,
    validate_label, validate_labels, validate_storage_name,
};
pub use scratch::{ScratchCondition, ScratchOutcome, ScratchRead, ScratchValue, ScratchWrite};
pub use size::{ByteSize, ParseSizeError};
pub use transfer::{
    CreateTransferRequest, PeerRecord, TransferDirection, TransferEstimateBasis, TransferInfo,
    TransferState, TrustPeerRequest,
};
pub use vm::{
    Accelerator, DesiredPower, RestartPolicy, VmEvent, VmRecord, VmSpec, VmState, VmStatus,
};

/// Version of the JSON records this build writes into the store.
pub const RECORD_FORMAT_VERSION: u32 = 1;

/// Seconds since the Unix epoch, the timestamp type used in records.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}
