//! What the API says about the links to other hosts: the throughput each one was measured at by
//! this host's transfers, and the forecasts the transfers act on (`GET /api/v1/links`).

use novacron_bandwidth::LinkSummary;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One link from this host to a peer, as this host's transfers measured it. Only sending
/// measures a link (the sender knows whether it kept the link busy), so a peer this host only
/// received from has no entry. Links are saved in `<data>/links.json` and survive a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LinkInfo {
    /// The peer's certificate fingerprint (`sha256:<64 hex>`).
    pub peer_fingerprint: String,
    /// The peer's label from its peer record, when it has one.
    pub peer_name: Option<String>,
    /// The address this host last dialled the peer at (absent when the peer dialled in).
    pub peer_address: Option<String>,
    /// When the link last carried a measured sample (seconds since the Unix epoch).
    pub last_measured_at: u64,
    /// Measurement intervals in which this host was sending but could not keep the link busy
    /// (they do not measure the link).
    pub application_limited_samples: u64,
    /// Current rate, forecasts per horizon with their 80 % bands, and accuracy so far.
    pub summary: LinkSummary,
}

/// Body of `POST /api/v1/links/{peer}/probe`: measure the link now by sending it incompressible
/// data for a few seconds, which the peer discards.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProbeLinkRequest {
    /// How long to send, in seconds (more than 0, at most 30; default 3).
    #[serde(default)]
    pub seconds: Option<f64>,
    /// The peer's transfer address (`HOST:PORT`). Default: the address a region host publishes
    /// in its heartbeat, else the address this host last dialled the peer at.
    #[serde(default)]
    pub address: Option<String>,
}
