//! The transport's error type. Every variant names what failed and on what; sources are chained,
//! not repeated in the message.

use std::io;
use std::net::SocketAddr;

/// Errors from identities, TLS set-up, connections and sessions.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot {action}: {reason}")]
    Certificate {
        action: &'static str,
        reason: String,
    },

    #[error("invalid fingerprint {text:?}: expected sha256: followed by 64 hex digits")]
    InvalidFingerprint { text: String },

    #[error("invalid tls configuration: {reason}")]
    TlsConfiguration { reason: String },

    #[error("invalid transport options: {reason}")]
    InvalidOptions { reason: String },

    #[error("i/o error while {action} (peer {peer})")]
    Io {
        action: &'static str,
        peer: SocketAddr,
        #[source]
        source: io::Error,
    },

    #[error("tls handshake with {peer} failed")]
    Handshake {
        peer: SocketAddr,
        #[source]
        source: io::Error,
    },

    #[error("peer {peer} refused the connection: {reason}")]
    Refused { peer: SocketAddr, reason: String },

    #[error("protocol violation by peer: {reason}")]
    Protocol { reason: String },

    #[error("frame {sequence} on channel {channel} failed its integrity check")]
    FrameIntegrity { channel: u8, sequence: u64 },

    #[error("session {session} lost all connections and was not resumed within {seconds} s")]
    ResumeTimedOut { session: String, seconds: u64 },

    #[error("session {session} is closed")]
    SessionClosed { session: String },

    #[error("session {session} failed: {reason}")]
    SessionFailed { session: String, reason: String },

    #[error("listener is shut down")]
    ListenerClosed,
}

impl TransportError {
    /// A copy of this error for a second caller (I/O sources keep their kind and text).
    pub fn replica(&self) -> TransportError {
        let source = |source: &io::Error| io::Error::new(source.kind(), source.to_string());
        match self {
            TransportError::Certificate { action, reason } => TransportError::Certificate {
                action,
                reason: reason.clone(),
            },
            TransportError::InvalidFingerprint { text } => {
                TransportError::InvalidFingerprint { text: text.clone() }
            }
            TransportError::TlsConfiguration { reason } => TransportError::TlsConfiguration {
                reason: reason.clone(),
            },
            TransportError::InvalidOptions { reason } => TransportError::InvalidOptions {
                reason: reason.clone(),
            },
            TransportError::Io {
                action,
                peer,
                source: error,
            } => TransportError::Io {
                action,
                peer: *peer,
                source: source(error),
            },
            TransportError::Handshake {
                peer,
                source: error,
            } => TransportError::Handshake {
                peer: *peer,
                source: source(error),
            },
            TransportError::Refused { peer, reason } => TransportError::Refused {
                peer: *peer,
                reason: reason.clone(),
            },
            TransportError::Protocol { reason } => TransportError::Protocol {
                reason: reason.clone(),
            },
            TransportError::FrameIntegrity { channel, sequence } => {
                TransportError::FrameIntegrity {
                    channel: *channel,
                    sequence: *sequence,
                }
            }
            TransportError::ResumeTimedOut { session, seconds } => TransportError::ResumeTimedOut {
                session: session.clone(),
                seconds: *seconds,
            },
            TransportError::SessionClosed { session } => TransportError::SessionClosed {
                session: session.clone(),
            },
            TransportError::SessionFailed { session, reason } => TransportError::SessionFailed {
                session: session.clone(),
                reason: reason.clone(),
            },
            TransportError::ListenerClosed => TransportError::ListenerClosed,
        }
    }
}
