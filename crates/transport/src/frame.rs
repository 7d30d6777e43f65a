//! The on-wire format inside each TLS connection (version 5). Pure encoding and decoding, no IO.
//!
//! A connection starts with a fixed-size hello from the dialer and a hello reply from the
//! listener, then carries frames in both directions. The dialer does not wait for the reply:
//! its frames may follow its hello at once, up to [`EARLY_WINDOW_BYTES`] (charged, see
//! `reliable::charge_of`) on each channel until the reply announces the listener's windows,
//! which are never smaller (version 4; version 3 dialers waited a round trip for the reply). A
//! refused hello's reply is the last thing the listener sends on that connection.
//!
//! ```text
//! hello / reply (44 bytes): magic "NCTR" | version u8 | purpose-or-status u8 | reserved u16
//!                           | session id [16] | connection index u32
//!                           | bulk receive window u64 | control receive window u64
//! frame: kind u8 | channel u8 | flags u8 | reserved u8 | payload length u32 | sequence u64
//!        | payload | tag [16]
//! ```
//!
//! All integers are big-endian. The tag is XXH3-128 over header and payload (big-endian): TLS
//! already authenticates every record, the tag is an end-to-end check that catches bugs in
//! striping, reassembly and resume (a frame delivered with the wrong sequence number or length
//! fails it), so it needs a checksum, not a cryptographic hash. Version 1 used the first 16
//! bytes of BLAKE3: 6 GB/s against XXH3's 24 GB/s on this project's machine, about 2 % of both
//! cores in a migration at 1 Gbit/s, where the two cores are the limit. Version 3 added the
//! padding frame (kind 3, bulk channel, sequence 0, no end-of-stream flag): bytes that warm a
//! new connection's congestion control up before the session has data, outside the reliable
//! stream (never acknowledged, resent or delivered). Version 5 added the park frame (kind 4,
//! control channel, sequence 0, no payload, no flags): its sender sends nothing more on this
//! connection for its session. Either side parks a connection when its session shuts down
//! cleanly; the other answers with a park of its own, and once both have crossed, the
//! connection, authenticated and with its congestion state, waits for the dialer's next hello
//! (a new session, see `session::ConnectionPool`) instead of closing. Decoding never
//! allocates more than [`MAX_FRAME_PAYLOAD`] for one frame and rejects unknown kinds, channels,
//! flags and versions.

use crate::error::TransportError;

pub const PROTOCOL_MAGIC: [u8; 4] = *b"NCTR";
pub const PROTOCOL_VERSION: u8 = 5;
pub const HELLO_LEN: usize = 44;
/// What a dialer may send on each channel of a new session before the listener's hello reply
/// has announced its receive windows; every listener's windows are at least this.
pub const EARLY_WINDOW_BYTES: u64 = 1 << 20;
pub const FRAME_HEADER_LEN: usize = 16;
pub const FRAME_TAG_LEN: usize = 16;
/// Largest payload one frame may carry; a peer announcing more is a protocol violation.
pub const MAX_FRAME_PAYLOAD: usize = 1 << 20;
pub const ACK_PAYLOAD_LEN: usize = 16;

const FLAG_END_OF_STREAM: u8 = 0b0000_0001;

/// What a dialer wants a new connection to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionPurpose {
    /// The first connection of a new session; carries control messages and acknowledgements.
    OpenSession = 1,
    /// A replacement control connection for an existing session.
    ResumeControl = 2,
    /// A connection that carries bulk data of an existing session.
    Bulk = 3,
}

/// The listener's answer to a hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelloStatus {
    Accepted = 0,
    UnknownSession = 1,
    UnsupportedVersion = 2,
    Malformed = 3,
    SessionClosed = 4,
}

impl HelloStatus {
    pub fn describe(self) -> &'static str {
        match self {
            HelloStatus::Accepted => "accepted",
            HelloStatus::UnknownSession => {
                "unknown session (expired, or opened by a different peer identity)"
            }
            HelloStatus::UnsupportedVersion => "unsupported protocol version",
            HelloStatus::Malformed => "malformed hello",
            HelloStatus::SessionClosed => "session already closed",
        }
    }
}

/// The hello exchanged at the start of every connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// [`ConnectionPurpose`] from the dialer, [`HelloStatus`] in the reply.
    pub code: u8,
    pub session_id: [u8; 16],
    pub connection_index: u32,
    pub bulk_receive_window: u64,
    pub control_receive_window: u64,
}

impl Hello {
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut bytes = [0u8; HELLO_LEN];
        bytes[0..4].copy_from_slice(&PROTOCOL_MAGIC);
        bytes[4] = PROTOCOL_VERSION;
        bytes[5] = self.code;
        bytes[8..24].copy_from_slice(&self.session_id);
        bytes[24..28].copy_from_slice(&self.connection_index.to_be_bytes());
        bytes[28..36].copy_from_slice(&self.bulk_receive_window.to_be_bytes());
        bytes[36..44].copy_from_slice(&self.control_receive_window.to_be_bytes());
        bytes
    }

    /// Decodes a hello; the error is the status to answer with.
    pub fn decode(bytes: &[u8; HELLO_LEN]) -> Result<Hello, HelloStatus> {
        if bytes[0..4] != PROTOCOL_MAGIC || bytes[6..8] != [0, 0] {
            return Err(HelloStatus::Malformed);
        }
        if bytes[4] != PROTOCOL_VERSION {
            return Err(HelloStatus::UnsupportedVersion);
        }
        let mut session_id = [0u8; 16];
        session_id.copy_from_slice(&bytes[8..24]);
        Ok(Hello {
            code: bytes[5],
            session_id,
            connection_index: u32::from_be_bytes(bytes[24..28].try_into().unwrap_or_default()),
            bulk_receive_window: u64::from_be_bytes(bytes[28..36].try_into().unwrap_or_default()),
            control_receive_window: u64::from_be_bytes(
                bytes[36..44].try_into().unwrap_or_default(),
            ),
        })
    }

    pub fn purpose(&self) -> Option<ConnectionPurpose> {
        match self.code {
            1 => Some(ConnectionPurpose::OpenSession),
            2 => Some(ConnectionPurpose::ResumeControl),
            3 => Some(ConnectionPurpose::Bulk),
            _ => None,
        }
    }

    pub fn status(&self) -> HelloStatus {
        match self.code {
            0 => HelloStatus::Accepted,
            1 => HelloStatus::UnknownSession,
            2 => HelloStatus::UnsupportedVersion,
            4 => HelloStatus::SessionClosed,
            _ => HelloStatus::Malformed,
        }
    }
}

/// The two ordered, reliable channels of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Channel {
    Bulk = 0,
    Control = 1,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// Carries a payload at a sequence number of a channel.
    Data = 1,
    /// Carries the receiver's cumulative acknowledgement and flow-control credit for a channel.
    Ack = 2,
    /// Bytes the receiver reads and drops: a connection's warm-up (see
    /// `Session::warm_up`). Bulk channel only, sequence 0.
    Padding = 3,
    /// Its sender sends nothing more on this connection for the session; the connection may
    /// carry the dialer's next hello once both sides have parked it. Control channel,
    /// sequence 0, no payload.
    Park = 4,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub channel: Channel,
    /// The sender will send nothing after this frame on this channel.
    pub end_of_stream: bool,
    pub payload_len: u32,
    pub sequence: u64,
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut bytes = [0u8; FRAME_HEADER_LEN];
        bytes[0] = self.kind as u8;
        bytes[1] = self.channel as u8;
        bytes[2] = if self.end_of_stream {
            FLAG_END_OF_STREAM
        } else {
            0
        };
        bytes[4..8].copy_from_slice(&self.payload_len.to_be_bytes());
        bytes[8..16].copy_from_slice(&self.sequence.to_be_bytes());
        bytes
    }

    /// Validates a received header before any payload is read or allocated.
    pub fn decode(bytes: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, TransportError> {
        let protocol = |reason: String| TransportError::Protocol { reason };
        let kind = match bytes[0] {
            1 => FrameKind::Data,
            2 => FrameKind::Ack,
            3 => FrameKind::Padding,
            4 => FrameKind::Park,
            other => return Err(protocol(format!("unknown frame kind {other}"))),
        };
        let channel = match bytes[1] {
            0 => Channel::Bulk,
            1 => Channel::Control,
            other => return Err(protocol(format!("unknown channel {other}"))),
        };
        if bytes[2] & !FLAG_END_OF_STREAM != 0 || bytes[3] != 0 {
            return Err(protocol(format!(
                "unknown frame flags {:#04x} {:#04x}",
                bytes[2], bytes[3]
            )));
        }
        let end_of_stream = bytes[2] & FLAG_END_OF_STREAM != 0;
        let payload_len = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        let sequence = u64::from_be_bytes(bytes[8..16].try_into().unwrap_or_default());
        if payload_len as usize > MAX_FRAME_PAYLOAD {
            return Err(protocol(format!(
                "frame payload of {payload_len} bytes exceeds the {MAX_FRAME_PAYLOAD} byte limit"
            )));
        }
        if kind == FrameKind::Ack && (payload_len as usize != ACK_PAYLOAD_LEN || end_of_stream) {
            return Err(protocol(format!(
                "acknowledgement frame with {payload_len} byte payload"
            )));
        }
        if kind == FrameKind::Padding
            && (channel != Channel::Bulk || end_of_stream || sequence != 0)
        {
            return Err(protocol(
                "padding frame off the bulk channel, with a sequence or ending a stream".into(),
            ));
        }
        if kind == FrameKind::Park
            && (channel != Channel::Control || end_of_stream || sequence != 0 || payload_len != 0)
        {
            return Err(protocol(
                "park frame off the control channel, with a payload, a sequence or ending a stream"
                    .into(),
            ));
        }
        Ok(FrameHeader {
            kind,
            channel,
            end_of_stream,
            payload_len,
            sequence,
        })
    }
}

/// The end-to-end integrity tag of a frame.
pub fn frame_tag(header: &[u8; FRAME_HEADER_LEN], payload: &[u8]) -> [u8; FRAME_TAG_LEN] {
    let mut hasher = xxhash_rust::xxh3::Xxh3Default::new();
    hasher.update(header);
    hasher.update(payload);
    hasher.digest128().to_be_bytes()
}

/// Acknowledgement of one channel: every sequence number below `contiguous_sequence` has been
/// received (and will never be needed again), and the application has consumed
/// `consumed_bytes` bytes of payload in total.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Acknowledgement {
    pub contiguous_sequence: u64,
    pub consumed_bytes: u64,
}

impl Acknowledgement {
    pub fn encode(&self) -> [u8; ACK_PAYLOAD_LEN] {
        let mut bytes = [0u8; ACK_PAYLOAD_LEN];
        bytes[0..8].copy_from_slice(&self.contiguous_sequence.to_be_bytes());
        bytes[8..16].copy_from_slice(&self.consumed_bytes.to_be_bytes());
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Acknowledgement, TransportError> {
        if bytes.len() != ACK_PAYLOAD_LEN {
            return Err(TransportError::Protocol {
                reason: format!("acknowledgement payload of {} bytes", bytes.len()),
            });
        }
        Ok(Acknowledgement {
            contiguous_sequence: u64::from_be_bytes(bytes[0..8].try_into().unwrap_or_default()),
            consumed_bytes: u64::from_be_bytes(bytes[8..16].try_into().unwrap_or_default()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips() {
        let hello = Hello {
            code: ConnectionPurpose::Bulk as u8,
            session_id: [7; 16],
            connection_index: 3,
            bulk_receive_window: 1 << 25,
            control_receive_window: 1 << 20,
        };
        let decoded = Hello::decode(&hello.encode()).unwrap();
        assert_eq!(decoded, hello);
        assert_eq!(decoded.purpose(), Some(ConnectionPurpose::Bulk));
    }

    #[test]
    fn hello_with_bad_magic_or_version_is_rejected() {
        let mut bytes = Hello {
            code: 1,
            session_id: [0; 16],
            connection_index: 0,
            bulk_receive_window: 0,
            control_receive_window: 0,
        }
        .encode();
        bytes[4] = 9;
        assert_eq!(Hello::decode(&bytes), Err(HelloStatus::UnsupportedVersion));
        bytes[0] = b'X';
        assert_eq!(Hello::decode(&bytes), Err(HelloStatus::Malformed));
    }

    #[test]
    fn frame_header_round_trips() {
        let header = FrameHeader {
            kind: FrameKind::Data,
            channel: Channel::Control,
            end_of_stream: true,
            payload_len: 1234,
            sequence: u64::MAX - 1,
        };
        assert_eq!(FrameHeader::decode(&header.encode()).unwrap(), header);
    }

    #[test]
    fn oversized_frame_is_rejected_before_allocation() {
        let mut bytes = FrameHeader {
            kind: FrameKind::Data,
            channel: Channel::Bulk,
            end_of_stream: false,
            payload_len: 0,
            sequence: 0,
        }
        .encode();
        bytes[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        let error = FrameHeader::decode(&bytes).unwrap_err();
        assert!(error.to_string().contains("exceeds"), "{error}");
    }

    #[test]
    fn unknown_kind_channel_and_flags_are_rejected() {
        let good = FrameHeader {
            kind: FrameKind::Data,
            channel: Channel::Bulk,
            end_of_stream: false,
            payload_len: 8,
            sequence: 1,
        }
        .encode();
        for (index, value) in [(0usize, 9u8), (0, 5), (1, 2), (2, 0x80), (3, 1)] {
            let mut bytes = good;
            bytes[index] = value;
            assert!(
                FrameHeader::decode(&bytes).is_err(),
                "byte {index} = {value}"
            );
        }
    }

    #[test]
    fn padding_is_bulk_only_unsequenced_and_never_ends_a_stream() {
        let padding = FrameHeader {
            kind: FrameKind::Padding,
            channel: Channel::Bulk,
            end_of_stream: false,
            payload_len: 65_536,
            sequence: 0,
        };
        assert_eq!(FrameHeader::decode(&padding.encode()).unwrap(), padding);
        for bad in [
            FrameHeader {
                channel: Channel::Control,
                ..padding
            },
            FrameHeader {
                sequence: 7,
                ..padding
            },
            FrameHeader {
                end_of_stream: true,
                ..padding
            },
        ] {
            assert!(FrameHeader::decode(&bad.encode()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_park_is_an_empty_unsequenced_control_frame() {
        let park = FrameHeader {
            kind: FrameKind::Park,
            channel: Channel::Control,
            end_of_stream: false,
            payload_len: 0,
            sequence: 0,
        };
        assert_eq!(FrameHeader::decode(&park.encode()).unwrap(), park);
        for bad in [
            FrameHeader {
                channel: Channel::Bulk,
                ..park
            },
            FrameHeader {
                payload_len: 1,
                ..park
            },
            FrameHeader {
                sequence: 3,
                ..park
            },
            FrameHeader {
                end_of_stream: true,
                ..park
            },
        ] {
            assert!(FrameHeader::decode(&bad.encode()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ack_with_wrong_length_is_rejected() {
        let bytes = FrameHeader {
            kind: FrameKind::Ack,
            channel: Channel::Bulk,
            end_of_stream: false,
            payload_len: 3,
            sequence: 0,
        }
        .encode();
        assert!(FrameHeader::decode(&bytes).is_err());
        assert!(Acknowledgement::decode(&[0; 3]).is_err());
        let ack = Acknowledgement {
            contiguous_sequence: 5,
            consumed_bytes: 99,
        };
        assert_eq!(Acknowledgement::decode(&ack.encode()).unwrap(), ack);
    }

    #[test]
    fn tag_detects_a_changed_sequence_or_payload() {
        let header = FrameHeader {
            kind: FrameKind::Data,
            channel: Channel::Bulk,
            end_of_stream: false,
            payload_len: 5,
            sequence: 10,
        };
        let tag = frame_tag(&header.encode(), b"hello");
        let moved = FrameHeader {
            sequence: 11,
            ..header
        };
        assert_ne!(frame_tag(&moved.encode(), b"hello"), tag);
        assert_ne!(frame_tag(&header.encode(), b"hellp"), tag);
        assert_eq!(frame_tag(&header.encode(), b"hello"), tag);
    }
}
