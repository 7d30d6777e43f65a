//! The DWCP transport (AMST in the design): an ordered, reliable, resumable bulk byte stream plus
//! a control channel between two hosts, striped over N parallel TCP connections, every one of
//! them mutually authenticated with TLS 1.3 (rustls with aws-lc-rs, X25519MLKEM768 key exchange).
//!
//! - [`identity`]: host certificates and SHA-256 fingerprints; a cluster CA for issue 4.
//! - [`tls`]: rustls configurations with pinned-fingerprint or CA-root verification.
//! - [`frame`]: the versioned on-wire format (sans-IO).
//! - [`reliable`]: sequence numbers, acknowledgements, flow control, reorder buffer (sans-IO).
//! - [`policy`]: how many bulk connections to use (sans-IO).
//! - [`session`]: the executor: [`Session`], [`Listener`], [`ControlChannel`].
//!
//! This crate carries bytes; it does not interpret them (that is the codec's and migration's job).

pub mod error;
pub mod frame;
pub mod identity;
pub mod policy;
pub mod reliable;
pub mod session;
pub mod socket;
pub mod tls;

pub use error::TransportError;
pub use identity::{ClusterCertificateAuthority, Fingerprint, HostIdentity};
pub use session::{
    ControlChannel, ControlIncoming, ControlRequest, Listener, ListenerStats, Session, SessionId,
    SessionOptions, SessionStats,
};
pub use tls::{PeerTrust, TlsSettings};
