//! Peers and image transfers: the records and API bodies of `novacron peer ...` and
//! `novacron image push/pull`. Plain data only; the agent runs the transfers.

use crate::error::ErrorCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A host this host trusts for DWCP transfers before a cluster exists, pinned by the SHA-256
/// fingerprint of its certificate (store key `peers/<fingerprint>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PeerRecord {
    pub format_version: u32,
    /// `sha256:` followed by 64 lowercase hex digits.
    pub fingerprint: String,
    /// A label for people (`--name`); not checked against the peer.
    pub name: Option<String>,
    pub trusted_at: u64,
}

/// Body of `POST /api/v1/peers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TrustPeerRequest {
    /// The peer's fingerprint as `novacron host` prints it there (`sha256:<64 hex>`).
    pub fingerprint: String,
    pub name: Option<String>,
}

/// Which way the image moves, seen from the host that started the transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TransferDirection {
    /// This host sends one of its images to the peer.
    Push,
    /// This host fetches an image from the peer.
    Pull,
}

/// Body of `POST /api/v1/transfers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreateTransferRequest {
    pub direction: TransferDirection,
    /// Push: a local image (name or id). Pull: the image's name (or id) on the peer.
    pub image: String,
    /// The peer's transfer address (`--transfer-listen` there), `HOST:PORT`.
    pub address: String,
    /// The peer's fingerprint; the connection is refused unless the peer presents it.
    pub fingerprint: String,
    /// Name of the image where it arrives (default: its name where it comes from).
    pub name: Option<String>,
}

/// Where a transfer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TransferState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl TransferState {
    pub fn is_finished(self) -> bool {
        self != TransferState::Running
    }
}

/// One transfer with its progress (`GET /api/v1/transfers/{id}`). Transfers live in the memory
/// of the `serve` that runs them; a restart forgets them (the images they made stay).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TransferInfo {
    pub id: String,
    pub direction: TransferDirection,
    /// True when the peer started it (this host is the other end of its push or pull).
    pub initiated_by_peer: bool,
    /// The image where it comes from (name).
    pub image: String,
    /// The image's name where it arrives.
    pub target_name: String,
    /// BLAKE3 id of the image, once known.
    pub image_id: Option<String>,
    pub peer_address: String,
    pub peer_fingerprint: String,
    pub state: TransferState,
    /// Why it failed, or what happened (`already present`).
    pub message: Option<String>,
    /// Error code when failed.
    pub error_code: Option<ErrorCode>,
    /// Size of the image file.
    pub total_bytes: u64,
    /// Image bytes encoded (sender) or rebuilt (receiver) so far.
    pub raw_bytes_done: u64,
    /// Encoded bytes this transfer put on (or took off) the bulk stream so far.
    pub wire_bytes: u64,
    /// Set when the destination already held the image and nothing was sent.
    pub already_present: bool,
    pub started_at: u64,
    pub elapsed_seconds: f64,
    /// Raw bytes per second, averaged over the transfer.
    pub rate_bytes_per_second: f64,
    /// The transport's measured rate on the wire (bytes per second), when known.
    pub wire_rate_bytes_per_second: f64,
    /// Reconnections the transport made inside this transfer's session.
    pub reconnections: u64,
    /// The zstd level of the latest frame this host sent (the sender adapts it to the link's
    /// forecast); absent on the receiving side.
    pub zstd_level: Option<i32>,
    /// The link's 1 s throughput forecast, bits per second, while this host sends.
    pub forecast_bits_per_second: Option<f64>,
    /// Seconds until the transfer should end, while it runs and once a rate is known.
    pub eta_seconds: Option<f64>,
    /// What the ETA was computed from.
    pub eta_basis: Option<TransferEstimateBasis>,
}

/// What a transfer's ETA comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TransferEstimateBasis {
    /// The link model's throughput forecast (this host sends and measures the link).
    Forecast,
    /// The session's measured rate (this host receives, or the link has no forecast yet).
    MeasuredRate,
}
