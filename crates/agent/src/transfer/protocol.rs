//! The image transfer protocol between two hosts, carried by one DWCP transport session
//! (wire format version [`TRANSFER_PROTOCOL_VERSION`]). This module only defines and checks the
//! messages (sans-IO); `transfer::send` and `transfer::receive` drive them.
//!
//! Control channel, every message `[version u8][kind u8][body]`; bodies are JSON except the hash
//! questions, which are raw:
//!
//! ```text
//! push (dialer sends):  Offer{name,id,size,format}  → OfferReply{proceed | already_present | refused}
//! pull (dialer asks):   Fetch{image}                → FetchReply{offer | refused}
//!                       then PullDecision{proceed | already_present | refused} (notification)
//! then, sender → receiver:
//!   WhichOf[32-byte hashes]    → WhichOfAnswer[one byte per hash: 1 held, 0 not]
//!   (bulk stream: frames)       finish
//!   Verify                     → VerifyReply{stored{name,id} | failed{code,message}}
//! either side, on failure:     Abort{code,message} (notification)
//!
//! live migration (source dials the destination; see `crate::migration`):
//!   Migration(Begin{id})       → Migration(Ready{held_files} | Refused{code,message})
//!   with a disk, on a second session: Migration(DiskBegin{id}) → Ready | Refused, then NBD
//!   between the source QEMU's block mirror and the destination QEMU's export, both ways
//!   (bulk stream: the migration proxy's messages, `novacron_migration::proxy`)
//!   destination → source:      Migration(Loaded{pid,stream_checksum,codec} | Refused{..}) (notification)
//!   source → destination:      Migration(Commit | Abort{message}) (notification)
//! ```
//!
//! Bulk stream: the codec's chunk frames, each preceded by its length as a u32 little-endian,
//! in order, ended by the transport's `finish`.

use bytes::{BufMut, Bytes, BytesMut};
use novacron_codec::ContentHash;
use novacron_types::{ErrorCode, ImageFormat};
use serde::{Deserialize, Serialize};

/// Version of the messages and bulk framing described above. A peer speaking another version is
/// refused with a message naming both.
pub const TRANSFER_PROTOCOL_VERSION: u8 = 1;

/// Largest bulk frame accepted (the codec's largest decompressed body plus headroom).
pub const MAX_BULK_FRAME: usize = 80 << 20;

/// Most hashes in one question (a frame of 16 MiB has at most 4 096 aligned blocks plus chunks).
pub const MAX_QUESTION_HASHES: usize = 65_536;

/// What the sender offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageOffer {
    /// Name the image gets where it arrives.
    pub name: String,
    /// BLAKE3 (hex) of the image file.
    pub id: String,
    pub size: u64,
    pub format: ImageFormat,
}

/// The receiver's answer to an offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "decision")]
pub enum OfferDecision {
    Proceed,
    /// The receiver holds an image with this id already (under `name`).
    AlreadyPresent {
        name: String,
    },
    Refused {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "answer")]
pub enum FetchReply {
    Offer(ImageOffer),
    Refused { code: ErrorCode, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum VerifyReply {
    Stored { name: String, id: String },
    Failed { code: ErrorCode, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
}

/// The steps of a live migration between the two agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "step")]
pub enum MigrationControl {
    /// Source → destination (request): start an incoming QEMU for migration `id`.
    Begin { id: String },
    /// Source → destination (request, on a second session): connect this session to the
    /// incoming QEMU's NBD export of the VM's disk; the session's bulk streams then carry NBD
    /// in both directions (the source QEMU's block mirror is the client).
    DiskBegin { id: String },
    /// Source → destination (request, on a new session): the stream of post-copy migration
    /// `id` broke (a `serve` restarted, or the session was lost for good); the source QEMU
    /// waits paused to resume it on this session. Answered `Ready` once the destination QEMU
    /// listens for the resumed stream, or `Refused`.
    Recover { id: String },
    /// Destination → source (reply): send the stream. Its QEMU waits for it, or, to a memory-only
    /// move's `Begin`, is about to (the stream waits in the session meanwhile; a failure to
    /// start it comes as a `Refused` notice). To a `Begin`, also what this
    /// host holds and indexed of the VM's direct kernel boot: the BLAKE3 (hex) of each file,
    /// and for a kernel it unpacked the same followed by `/unpacked`
    /// (`novacron_migration::HeldFile`). RAM pages equal to a block of one the source holds
    /// under the same identity travel as hashes. Added later: older hosts send and expect none
    /// (an empty list is not encoded).
    Ready {
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        held_files: Vec<String>,
    },
    /// Destination → source: it cannot take the VM (reply to Begin) or lost it (notification).
    Refused { code: ErrorCode, message: String },
    /// Destination → source (notification): the stream was rebuilt identically (length and
    /// BLAKE3) and its QEMU loaded it; the guest waits paused.
    Loaded {
        pid: Option<u32>,
        stream_checksum: String,
        /// Where the destination's codec spent the copy (added later: absent from older
        /// hosts and for a post-copy).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        codec: Option<novacron_types::migration::CodecTime>,
    },
    /// Source → destination (notification): the destination is recorded as the VM's host.
    Commit,
    /// Source → destination (notification): abandoned; the VM stays on the source.
    Abort { message: String },
}

/// One control-channel message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Offer(ImageOffer),
    OfferReply(OfferDecision),
    Fetch {
        image: String,
    },
    FetchReply(FetchReply),
    PullDecision(OfferDecision),
    WhichOf(Vec<ContentHash>),
    WhichOfAnswer(Vec<bool>),
    Verify,
    VerifyReply(VerifyReply),
    Abort(Failure),
    Migration(MigrationControl),
    /// Prober → peer (request): "discard up to `max_bytes` of bulk data I am about to send";
    /// answered with an `OfferReply`. The sender's transport measures the link meanwhile.
    Probe {
        max_bytes: u64,
    },
    /// Prober → peer (request): "I have measured enough; drop what is still on its way and
    /// close". Answered with a `ProbeDone` before the peer closes, so the prober can close
    /// without waiting for the data it queued to cross the link.
    ProbeDone,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("empty transfer message")]
    Empty,
    #[error(
        "the peer speaks transfer protocol version {theirs}, this host version \
         {TRANSFER_PROTOCOL_VERSION}; run the same NovaCron release on both hosts"
    )]
    Version { theirs: u8 },
    #[error("unknown transfer message kind {kind}")]
    UnknownKind { kind: u8 },
    #[error("malformed transfer message ({what}): {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("expected {expected}, the peer sent {got}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
}

const OFFER: u8 = 1;
const OFFER_REPLY: u8 = 2;
const FETCH: u8 = 3;
const FETCH_REPLY: u8 = 4;
const PULL_DECISION: u8 = 5;
const WHICH_OF: u8 = 6;
const WHICH_OF_ANSWER: u8 = 7;
const VERIFY: u8 = 8;
const VERIFY_REPLY: u8 = 9;
const ABORT: u8 = 10;
const MIGRATION: u8 = 11;
const PROBE: u8 = 12;
const PROBE_DONE: u8 = 13;

#[derive(Serialize, Deserialize)]
struct FetchBody {
    image: String,
}

#[derive(Serialize, Deserialize)]
struct ProbeBody {
    max_bytes: u64,
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain structs of strings and numbers: serializing cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn from_json<T: serde::de::DeserializeOwned>(
    what: &'static str,
    body: &[u8],
) -> Result<T, ProtocolError> {
    serde_json::from_slice(body).map_err(|error| ProtocolError::Malformed {
        what,
        reason: error.to_string(),
    })
}

impl Message {
    pub fn name(&self) -> &'static str {
        match self {
            Message::Offer(_) => "offer",
            Message::OfferReply(_) => "offer reply",
            Message::Fetch { .. } => "fetch",
            Message::FetchReply(_) => "fetch reply",
            Message::PullDecision(_) => "pull decision",
            Message::WhichOf(_) => "hash question",
            Message::WhichOfAnswer(_) => "hash answer",
            Message::Verify => "verify",
            Message::VerifyReply(_) => "verify reply",
            Message::Abort(_) => "abort",
            Message::Migration(_) => "migration step",
            Message::Probe { .. } => "link probe",
            Message::ProbeDone => "end of a link probe",
        }
    }

    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        out.put_u8(TRANSFER_PROTOCOL_VERSION);
        match self {
            Message::Offer(offer) => {
                out.put_u8(OFFER);
                out.put_slice(&json(offer));
            }
            Message::OfferReply(decision) => {
                out.put_u8(OFFER_REPLY);
                out.put_slice(&json(decision));
            }
            Message::Fetch { image } => {
                out.put_u8(FETCH);
                out.put_slice(&json(&FetchBody {
                    image: image.clone(),
                }));
            }
            Message::FetchReply(reply) => {
                out.put_u8(FETCH_REPLY);
                out.put_slice(&json(reply));
            }
            Message::PullDecision(decision) => {
                out.put_u8(PULL_DECISION);
                out.put_slice(&json(decision));
            }
            Message::WhichOf(hashes) => {
                out.put_u8(WHICH_OF);
                for hash in hashes {
                    out.put_slice(hash.as_bytes());
                }
            }
            Message::WhichOfAnswer(answers) => {
                out.put_u8(WHICH_OF_ANSWER);
                for held in answers {
                    out.put_u8(u8::from(*held));
                }
            }
            Message::Verify => out.put_u8(VERIFY),
            Message::VerifyReply(reply) => {
                out.put_u8(VERIFY_REPLY);
                out.put_slice(&json(reply));
            }
            Message::Abort(failure) => {
                out.put_u8(ABORT);
                out.put_slice(&json(failure));
            }
            Message::Migration(step) => {
                out.put_u8(MIGRATION);
                out.put_slice(&json(step));
            }
            Message::Probe { max_bytes } => {
                out.put_u8(PROBE);
                out.put_slice(&json(&ProbeBody {
                    max_bytes: *max_bytes,
                }));
            }
            Message::ProbeDone => out.put_u8(PROBE_DONE),
        }
        out.freeze()
    }

    pub fn decode(bytes: &[u8]) -> Result<Message, ProtocolError> {
        let [version, kind, body @ ..] = bytes else {
            return Err(ProtocolError::Empty);
        };
        if *version != TRANSFER_PROTOCOL_VERSION {
            return Err(ProtocolError::Version { theirs: *version });
        }
        Ok(match *kind {
            OFFER => Message::Offer(from_json("offer", body)?),
            OFFER_REPLY => Message::OfferReply(from_json("offer reply", body)?),
            FETCH => Message::Fetch {
                image: from_json::<FetchBody>("fetch", body)?.image,
            },
            FETCH_REPLY => Message::FetchReply(from_json("fetch reply", body)?),
            PULL_DECISION => Message::PullDecision(from_json("pull decision", body)?),
            WHICH_OF => {
                if body.len() % 32 != 0 || body.len() / 32 > MAX_QUESTION_HASHES {
                    return Err(ProtocolError::Malformed {
                        what: "hash question",
                        reason: format!(
                            "{} bytes is not a whole number of 32-byte hashes (at most \
                             {MAX_QUESTION_HASHES})",
                            body.len()
                        ),
                    });
                }
                Message::WhichOf(
                    body.chunks_exact(32)
                        .map(|hash| {
                            let mut bytes = [0u8; 32];
                            bytes.copy_from_slice(hash);
                            ContentHash(bytes)
                        })
                        .collect(),
                )
            }
            WHICH_OF_ANSWER => Message::WhichOfAnswer(
                body.iter()
                    .map(|byte| match byte {
                        0 => Ok(false),
                        1 => Ok(true),
                        other => Err(ProtocolError::Malformed {
                            what: "hash answer",
                            reason: format!("answer byte {other} is neither 0 nor 1"),
                        }),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            VERIFY if body.is_empty() => Message::Verify,
            VERIFY => {
                return Err(ProtocolError::Malformed {
                    what: "verify",
                    reason: "unexpected body".into(),
                });
            }
            VERIFY_REPLY => Message::VerifyReply(from_json("verify reply", body)?),
            ABORT => Message::Abort(from_json("abort", body)?),
            MIGRATION => Message::Migration(from_json("migration step", body)?),
            PROBE => Message::Probe {
                max_bytes: from_json::<ProbeBody>("link probe", body)?.max_bytes,
            },
            PROBE_DONE if body.is_empty() => Message::ProbeDone,
            PROBE_DONE => {
                return Err(ProtocolError::Malformed {
                    what: "end of a link probe",
                    reason: "unexpected body".into(),
                });
            }
            kind => return Err(ProtocolError::UnknownKind { kind }),
        })
    }
}

/// Splits the bulk byte stream back into frames.
#[derive(Debug, Default)]
pub struct FrameSplitter {
    buffer: BytesMut,
}

impl FrameSplitter {
    pub fn push(&mut self, data: &[u8]) {
        self.buffer.extend_from_slice(data);
    }

    /// The next whole frame, if buffered.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, ProtocolError> {
        if self.buffer.len() < 4 {
            return Ok(None);
        }
        let length = u32::from_le_bytes([
            self.buffer[0],
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
        ]) as usize;
        if length == 0 || length > MAX_BULK_FRAME {
            return Err(ProtocolError::Malformed {
                what: "bulk frame",
                reason: format!("length {length} is outside 1..={MAX_BULK_FRAME}"),
            });
        }
        if self.buffer.len() < 4 + length {
            return Ok(None);
        }
        let _ = self.buffer.split_to(4);
        Ok(Some(self.buffer.split_to(length).freeze()))
    }

    /// Bytes left over that do not make a whole frame.
    pub fn leftover(&self) -> usize {
        self.buffer.len()
    }
}

/// A frame with its length prefix, ready for the bulk stream.
pub fn bulk_frame(frame: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(frame.len() + 4);
    out.put_u32_le(frame.len() as u32);
    out.put_slice(frame);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_survives_a_round_trip() {
        let offer = ImageOffer {
            name: "debian".into(),
            id: "ab".repeat(32),
            size: 42,
            format: ImageFormat::Qcow2,
        };
        let messages = vec![
            Message::Offer(offer.clone()),
            Message::OfferReply(OfferDecision::Proceed),
            Message::OfferReply(OfferDecision::AlreadyPresent { name: "x".into() }),
            Message::Fetch {
                image: "debian".into(),
            },
            Message::FetchReply(FetchReply::Offer(offer)),
            Message::PullDecision(OfferDecision::Refused {
                code: ErrorCode::AlreadyExists,
                message: "taken".into(),
            }),
            Message::WhichOf(vec![ContentHash([7; 32]), ContentHash([9; 32])]),
            Message::WhichOfAnswer(vec![true, false, true]),
            Message::Verify,
            Message::VerifyReply(VerifyReply::Stored {
                name: "a".into(),
                id: "b".into(),
            }),
            Message::Abort(Failure {
                code: ErrorCode::InsufficientResources,
                message: "disk full".into(),
            }),
            Message::Migration(MigrationControl::Begin { id: "m1".into() }),
            Message::Migration(MigrationControl::Ready { held_files: vec![] }),
            Message::Migration(MigrationControl::Ready {
                held_files: vec!["ab".into(), "cd".into()],
            }),
            Message::Migration(MigrationControl::DiskBegin { id: "m1".into() }),
            Message::Migration(MigrationControl::Loaded {
                pid: Some(7),
                stream_checksum: "12 bytes, blake3 00".into(),
                codec: None,
            }),
            Message::Migration(MigrationControl::Loaded {
                pid: Some(7),
                stream_checksum: "12 bytes, blake3 00".into(),
                codec: Some(novacron_types::migration::CodecTime {
                    working_ms: 1,
                    waiting_for_input_ms: 2,
                    waiting_for_output_ms: 3,
                }),
            }),
            Message::Migration(MigrationControl::Commit),
            Message::Migration(MigrationControl::Abort {
                message: "cancelled".into(),
            }),
            Message::Probe { max_bytes: 1 << 26 },
            Message::ProbeDone,
        ];
        for message in messages {
            assert_eq!(Message::decode(&message.encode()), Ok(message));
        }
    }

    #[test]
    fn other_versions_and_garbage_are_refused() {
        let mut bytes = Message::Verify.encode().to_vec();
        bytes[0] = 2;
        assert_eq!(
            Message::decode(&bytes),
            Err(ProtocolError::Version { theirs: 2 })
        );
        assert_eq!(Message::decode(&[]), Err(ProtocolError::Empty));
        assert!(matches!(
            Message::decode(&[TRANSFER_PROTOCOL_VERSION, 99]),
            Err(ProtocolError::UnknownKind { kind: 99 })
        ));
        assert!(Message::decode(&[TRANSFER_PROTOCOL_VERSION, WHICH_OF, 1, 2]).is_err());
        assert!(Message::decode(&[TRANSFER_PROTOCOL_VERSION, WHICH_OF_ANSWER, 2]).is_err());
        assert!(Message::decode(&[TRANSFER_PROTOCOL_VERSION, OFFER, b'{']).is_err());
    }

    #[test]
    fn a_ready_without_held_files_is_what_older_hosts_send_and_read() {
        let mut older = vec![TRANSFER_PROTOCOL_VERSION, MIGRATION];
        older.extend_from_slice(br#"{"step":"ready"}"#);
        assert_eq!(
            Message::decode(&older),
            Ok(Message::Migration(MigrationControl::Ready {
                held_files: vec![]
            }))
        );
        assert_eq!(
            Message::Migration(MigrationControl::Ready { held_files: vec![] }).encode()[..],
            older[..]
        );
    }

    #[test]
    fn bulk_frames_split_back_at_any_boundary() {
        let frames: Vec<Vec<u8>> = vec![vec![1; 10], vec![2; 1], vec![3; 70_000]];
        let stream: Vec<u8> = frames.iter().flat_map(|frame| bulk_frame(frame)).collect();
        for step in [1, 3, 4096, stream.len()] {
            let mut splitter = FrameSplitter::default();
            let mut out = Vec::new();
            for piece in stream.chunks(step) {
                splitter.push(piece);
                while let Some(frame) = splitter.next_frame().expect("valid") {
                    out.push(frame.to_vec());
                }
            }
            assert_eq!(out, frames);
            assert_eq!(splitter.leftover(), 0);
        }
        let mut splitter = FrameSplitter::default();
        splitter.push(&u32::MAX.to_le_bytes());
        assert!(splitter.next_frame().is_err());
    }
}
