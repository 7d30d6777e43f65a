//! The cluster crate's error type. Every variant names what failed and on which object, and says
//! what to do; sources are chained, not repeated in the message.

use novacron_store::StoreError;

/// An error from the cluster layer: identities, join tokens, the mTLS raft channel and
/// forwarded requests.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The local or the leader's store refused or failed the request.
    #[error(transparent)]
    Store(#[from] StoreError),

    /// Creating, signing or parsing a certificate or key failed.
    #[error("cannot {action}: {reason}")]
    Certificate {
        /// What was being done.
        action: &'static str,
        /// Why it failed.
        reason: String,
    },

    /// A TLS configuration could not be built.
    #[error("invalid tls configuration for the cluster channel")]
    Tls {
        /// The underlying error.
        #[source]
        source: novacron_transport::TransportError,
    },

    /// A join token could not be parsed.
    #[error(
        "invalid join token: {reason}; copy the whole token printed by `novacron cluster token create`"
    )]
    InvalidJoinToken {
        /// What is wrong with it.
        reason: String,
    },

    /// A join token was refused by the cluster.
    #[error("join token {token_id} refused: {reason}")]
    JoinTokenRefused {
        /// The token's public id.
        token_id: String,
        /// Why (expired, already used, unknown, wrong secret).
        reason: String,
    },

    /// The certificate authority presented by a host is not the one the join token pins.
    #[error(
        "the cluster ca offered by the host has fingerprint {found}, the join token pins {expected}; the token is for another cluster or the connection is intercepted"
    )]
    CaFingerprintMismatch {
        /// The pinned fingerprint from the token.
        expected: String,
        /// What was offered.
        found: String,
    },

    /// A peer could not be reached: connection refused, timed out or tls handshake failed.
    /// Nothing was sent, so retrying elsewhere is safe.
    #[error("cluster peer node {node_id} at {address} is unreachable")]
    PeerUnreachable {
        /// The peer's raft node id.
        node_id: u64,
        /// Its address.
        address: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A request was sent to a peer but the exchange failed (connection lost, timeout, bad
    /// reply). A forwarded write may or may not have been applied.
    #[error(
        "request {request} to cluster peer node {node_id} at {address} failed; a write may or may not have been applied: re-read before retrying"
    )]
    PeerFailed {
        /// What was asked.
        request: &'static str,
        /// The peer's raft node id.
        node_id: u64,
        /// Its address.
        address: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A peer answered with a refusal.
    #[error("cluster peer node {node_id} refused {request}: {message}")]
    PeerRefused {
        /// What was asked.
        request: &'static str,
        /// The peer's raft node id.
        node_id: u64,
        /// The peer's reason.
        message: String,
    },

    /// No leader could be found or reached before the deadline.
    #[error(
        "no reachable raft leader within {waited:?} ({last_problem}); check that a majority of voters is running and reachable"
    )]
    NoLeader {
        /// How long the request waited.
        waited: std::time::Duration,
        /// The last reason a leader could not serve the request.
        last_problem: String,
    },

    /// A stored cluster record could not be decoded.
    #[error("cluster record {key:?} is invalid: {reason}")]
    InvalidRecord {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },

    /// A membership request is not allowed.
    #[error("membership change refused: {reason}")]
    Membership {
        /// Why.
        reason: String,
    },

    /// Binding or accepting on the raft listener failed.
    #[error("cluster raft listener on {address} failed while {action}")]
    Listener {
        /// The listen address.
        address: String,
        /// What it was doing.
        action: &'static str,
        /// The io error.
        #[source]
        source: std::io::Error,
    },
}

impl ClusterError {
    pub(crate) fn certificate(action: &'static str) -> impl Fn(rcgen::Error) -> ClusterError {
        move |error| ClusterError::Certificate {
            action,
            reason: error.to_string(),
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = ClusterError> = std::result::Result<T, E>;
