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
//! - [`pool`]: connections a finished session parked, for the next session to the same peer.
//!
//! At the end of a bulk stream, a frame overdue on one connection (behind a loss it has not
//! repaired, or a stalled path) is sent once more on another that has nothing left to send; the
//! receiver keeps the first copy (`reliable::OutboundChannel::next_hedge`).
//!
//! Use: the destination binds a [`Listener`] and `accept`s; the source calls [`Session::connect`].
//! Both sides then `send`/`recv` bulk data (ordered, reliable, across reconnections), end it with
//! `finish`, and exchange requests, responses and notifications on [`Session::control`], which has
//! its own connection so it never waits behind bulk data. [`Session::stats`] reports the chosen
//! number of connections, the measured rate, retransmissions and reconnections.
//!
//! Memory bound per session (enforced, see `reliable` and `session`): sending side at most
//! `bulk_send_window_bytes + control_window_bytes`, receiving side at most
//! `bulk_receive_window_bytes + control_window_bytes` (payload plus 128 bytes per frame; defaults
//! 64 MiB + 4 MiB each), plus per connection 2 × 256 KiB of IO buffers and one frame being read
//! (≤ 1 MiB), plus kernel socket buffers. A peer that sends beyond the window fails the session.
//!
//! This crate carries bytes; it does not interpret them (that is the codec's and migration's job).

pub mod error;
pub mod frame;
pub mod identity;
pub mod policy;
pub mod pool;
pub mod reliable;
pub mod session;
pub mod socket;
mod sys;
pub mod tls;

pub use error::TransportError;
pub use identity::{ClusterCertificateAuthority, Fingerprint, HostIdentity};
pub use pool::ConnectionPool;
pub use session::{
    ControlChannel, ControlIncoming, ControlRequest, DEFAULT_BULK_WINDOW_BYTES, Listener,
    ListenerStats, RateObserver, RateSample, Session, SessionId, SessionOptions, SessionStats,
};
pub use tls::{PeerTrust, TlsSettings};
