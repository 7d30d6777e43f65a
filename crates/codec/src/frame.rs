//! The frame: the unit the codec puts on the wire. Every frame is self-delimiting and versioned:
//!
//! ```text
//! offset size field
//!      0    3 magic "NCF"
//!      3    1 format version (FRAME_VERSION)
//!      4    1 kind: 1 = page batch, 2 = chunk batch
//!      5    1 flags: bit 0 = body is one or more zstd frames; other bits must be 0
//!      6    4 entry count, little-endian u32
//!     10    4 body length once decompressed, little-endian u32
//!     14    4 length of the body as sent, little-endian u32
//!     18    …  body as sent
//! ```
//!
//! Batching many pages or chunks into one body is what makes zstd pay on 4 KiB pages. The body
//! layout belongs to the page and chunk modules. Decoding checks every header field, caps the
//! declared body length before allocating, and decompresses into a buffer of exactly that size
//! (zstd cannot write past it), so hostile frames cannot make the decoder allocate without bound.

use crate::error::{DecodeError, EncodeError};

pub const FRAME_MAGIC: [u8; 3] = *b"NCF";
pub const FRAME_VERSION: u8 = 1;
pub const FRAME_HEADER_LENGTH: usize = 18;

const FLAG_ZSTD: u8 = 0x01;

/// Magic number of a standard zstd frame (0xFD2FB528, little-endian).
const ZSTD_FRAME_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
const KNOWN_FLAGS: u8 = FLAG_ZSTD;

/// Bodies shorter than this are sent as they are.
const MIN_COMPRESSIBLE_BODY: usize = 64;

/// Bodies above this use a window as large as the body and long-distance matching.
pub const LONG_WINDOW_THRESHOLD: usize = 4 << 20;

/// Largest window the encoder asks for and the decoder accepts (the zstd CLI's `--long=27`).
pub const MAX_WINDOW_LOG: u32 = 27;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Pages = 1,
    Chunks = 2,
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: u8,
    pub compressed: bool,
    pub entry_count: u32,
    pub body_length: u32,
    pub wire_length: u32,
}

impl FrameHeader {
    /// Header plus body as sent.
    pub fn frame_length(&self) -> usize {
        FRAME_HEADER_LENGTH + self.wire_length as usize
    }
}

/// Parses and checks the header at the start of `bytes`.
pub fn parse_frame_header(bytes: &[u8]) -> Result<FrameHeader, DecodeError> {
    if bytes.len() < FRAME_HEADER_LENGTH {
        return Err(DecodeError::Truncated {
            what: "frame header",
            offset: 0,
            needed: FRAME_HEADER_LENGTH,
            available: bytes.len(),
        });
    }
    if bytes[0..3] != FRAME_MAGIC {
        return Err(DecodeError::Malformed {
            what: "frame magic",
            offset: 0,
            reason: "not a NovaCron codec frame",
        });
    }
    if bytes[3] != FRAME_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            version: bytes[3],
            supported: FRAME_VERSION,
        });
    }
    let flags = bytes[5];
    if flags & !KNOWN_FLAGS != 0 {
        return Err(DecodeError::Malformed {
            what: "frame flags",
            offset: 5,
            reason: "unknown flag bits set",
        });
    }
    let read_u32 =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let header = FrameHeader {
        kind: bytes[4],
        compressed: flags & FLAG_ZSTD != 0,
        entry_count: read_u32(6),
        body_length: read_u32(10),
        wire_length: read_u32(14),
    };
    if !header.compressed && header.wire_length != header.body_length {
        return Err(DecodeError::Malformed {
            what: "frame lengths",
            offset: 10,
            reason: "an uncompressed body must be sent at its own length",
        });
    }
    Ok(header)
}

/// The total length of the frame starting at `prefix`, or `None` if fewer than
/// [`FRAME_HEADER_LENGTH`] bytes are available yet. For splitting a byte stream into frames.
pub fn frame_length(prefix: &[u8]) -> Result<Option<usize>, DecodeError> {
    if prefix.len() < FRAME_HEADER_LENGTH {
        return Ok(None);
    }
    parse_frame_header(prefix).map(|header| Some(header.frame_length()))
}

/// Compresses frame bodies and writes frames.
pub(crate) struct FrameWriter {
    compressor: zstd::bulk::Compressor<'static>,
    level: i32,
    scratch: Vec<u8>,
    /// Frames in a row whose compression saved less than 1/[`POOR_SAVING_DIVISOR`].
    poor_streak: u32,
    /// Frames still to store without trying zstd (after a poor streak).
    skip_remaining: u32,
}

/// A frame whose compression saves less than 1/32 of its body (3 %) counts as incompressible.
const POOR_SAVING_DIVISOR: usize = 32;
/// After this many incompressible frames in a row ...
const POOR_STREAK_TO_SKIP: u32 = 4;
/// ... this many frames are stored without trying zstd, then one is tried again. Random data
/// (encrypted disks, a guest's fresh random pages) costs zstd CPU for nothing: on a 2-core
/// host at 1 Gbit/s that CPU is what the transfer is short of.
const FRAMES_SKIPPED: u32 = 16;
/// While skipping, the first bytes of each frame are still tried (about 1.5 % of a 1 MiB frame's
/// zstd work): a sample that compresses ends the skipping at once, so compressible data right
/// after a random stretch (text written after an encrypted file, say) is not stored raw.
const SKIP_SAMPLE_LENGTH: usize = 16 << 10;

impl FrameWriter {
    pub(crate) fn new(level: i32) -> Result<Self, EncodeError> {
        let compressor = zstd::bulk::Compressor::new(level)
            .map_err(|source| EncodeError::Compression { level, source })?;
        Ok(Self {
            compressor,
            level,
            scratch: Vec::new(),
            poor_streak: 0,
            skip_remaining: 0,
        })
    }

    pub(crate) fn level(&self) -> i32 {
        self.level
    }

    pub(crate) fn set_level(&mut self, level: i32) -> Result<(), EncodeError> {
        let level = level.clamp(-7, 22);
        self.compressor
            .set_compression_level(level)
            .map_err(|source| EncodeError::Compression { level, source })?;
        self.level = level;
        Ok(())
    }

    /// Appends a frame holding `body` to `out`. Returns the number of bytes appended.
    pub(crate) fn write_frame(
        &mut self,
        kind: FrameKind,
        entry_count: u32,
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<usize, EncodeError> {
        let body_length = u32::try_from(body.len()).map_err(|_| EncodeError::Compression {
            level: self.level,
            source: std::io::Error::other("frame body above 4 GiB"),
        })?;
        let mut compressed = false;
        let mut skip = self.skip_remaining > 0;
        self.skip_remaining = self.skip_remaining.saturating_sub(1);
        if skip && body.len() >= MIN_COMPRESSIBLE_BODY {
            let sample = &body[..body.len().min(SKIP_SAMPLE_LENGTH)];
            if self.compress_saves_enough(sample)? {
                skip = false;
                self.skip_remaining = 0;
            }
        }
        if body.len() >= MIN_COMPRESSIBLE_BODY && !skip {
            let saves_enough = self.compress_saves_enough(body)?;
            compressed = self.scratch.len() < body.len();
            if saves_enough {
                self.poor_streak = 0;
            } else {
                self.poor_streak += 1;
                if self.poor_streak >= POOR_STREAK_TO_SKIP {
                    self.poor_streak = 0;
                    self.skip_remaining = FRAMES_SKIPPED;
                }
            }
        }
        let payload: &[u8] = if compressed { &self.scratch } else { body };
        let start = out.len();
        out.extend_from_slice(&FRAME_MAGIC);
        out.push(FRAME_VERSION);
        out.push(kind as u8);
        out.push(if compressed { FLAG_ZSTD } else { 0 });
        out.extend_from_slice(&entry_count.to_le_bytes());
        out.extend_from_slice(&body_length.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(payload);
        Ok(out.len() - start)
    }

    /// Compresses `data` into `scratch`; whether that saved at least 1/[`POOR_SAVING_DIVISOR`].
    fn compress_saves_enough(&mut self, data: &[u8]) -> Result<bool, EncodeError> {
        self.configure_window(data.len())?;
        self.scratch.clear();
        self.scratch
            .reserve(zstd::zstd_safe::compress_bound(data.len()));
        self.compressor
            .compress_to_buffer(data, &mut self.scratch)
            .map_err(|source| EncodeError::Compression {
                level: self.level,
                source,
            })?;
        let saved = data.len().saturating_sub(self.scratch.len());
        Ok(saved * POOR_SAVING_DIVISOR >= data.len())
    }

    fn configure_window(&mut self, body_length: usize) -> Result<(), EncodeError> {
        use zstd::zstd_safe::CParameter;
        let level = self.level;
        let map = |source| EncodeError::Compression { level, source };
        if body_length > LONG_WINDOW_THRESHOLD {
            let window_log =
                (usize::BITS - (body_length - 1).leading_zeros()).clamp(10, MAX_WINDOW_LOG);
            self.compressor
                .set_parameter(CParameter::WindowLog(window_log))
                .map_err(map)?;
            self.compressor
                .set_parameter(CParameter::EnableLongDistanceMatching(true))
                .map_err(map)?;
        } else {
            // 0 restores the level's own default.
            self.compressor
                .set_parameter(CParameter::WindowLog(0))
                .map_err(map)?;
            self.compressor
                .set_parameter(CParameter::EnableLongDistanceMatching(false))
                .map_err(map)?;
        }
        Ok(())
    }
}

/// Checks frames and decompresses their bodies into a reused buffer.
pub(crate) struct FrameReader {
    decompressor: zstd::bulk::Decompressor<'static>,
    body: Vec<u8>,
}

impl FrameReader {
    pub(crate) fn new() -> Result<Self, DecodeError> {
        let mut decompressor =
            zstd::bulk::Decompressor::new().map_err(DecodeError::Decompression)?;
        decompressor
            .set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(MAX_WINDOW_LOG))
            .map_err(DecodeError::Decompression)?;
        Ok(Self {
            decompressor,
            body: Vec::new(),
        })
    }

    /// Checks that `frame` is exactly one frame of `kind` whose body is at most
    /// `max_body_length` bytes, and returns its header and decompressed body.
    pub(crate) fn open<'a>(
        &'a mut self,
        frame: &'a [u8],
        kind: FrameKind,
        max_entries: usize,
        max_body_length: usize,
    ) -> Result<(FrameHeader, &'a [u8]), DecodeError> {
        let header = parse_frame_header(frame)?;
        if header.kind != kind as u8 {
            return Err(DecodeError::WrongFrameKind {
                found: header.kind,
                expected: kind as u8,
            });
        }
        if header.entry_count as usize > max_entries {
            return Err(DecodeError::LimitExceeded {
                what: "frame entry count",
                offset: 6,
                value: u64::from(header.entry_count),
                limit: max_entries as u64,
            });
        }
        if header.body_length as usize > max_body_length {
            return Err(DecodeError::LimitExceeded {
                what: "frame body length",
                offset: 10,
                value: u64::from(header.body_length),
                limit: max_body_length as u64,
            });
        }
        if frame.len() != header.frame_length() {
            return Err(DecodeError::Malformed {
                what: "frame length",
                offset: 14,
                reason: if frame.len() < header.frame_length() {
                    "frame is shorter than its header says"
                } else {
                    "bytes follow the end of the frame"
                },
            });
        }
        let payload = &frame[FRAME_HEADER_LENGTH..];
        if !header.compressed {
            return Ok((header, payload));
        }
        // Exactly one standard zstd frame: no legacy-format frames (zstd still decodes them, old
        // code we do not want facing the network), no skippable or concatenated frames.
        if payload.len() < 4 || payload[..4] != ZSTD_FRAME_MAGIC {
            return Err(DecodeError::Malformed {
                what: "frame body",
                offset: FRAME_HEADER_LENGTH,
                reason: "not a zstd frame",
            });
        }
        match zstd::zstd_safe::find_frame_compressed_size(payload) {
            Ok(length) if length == payload.len() => {}
            _ => {
                return Err(DecodeError::Malformed {
                    what: "frame body",
                    offset: FRAME_HEADER_LENGTH,
                    reason: "body is not exactly one complete zstd frame",
                });
            }
        }
        let declared = header.body_length as usize;
        self.body.clear();
        self.body.reserve_exact(declared);
        let actual = self
            .decompressor
            .decompress_to_buffer(payload, &mut self.body)
            .map_err(DecodeError::Decompression)?;
        if actual != declared {
            return Err(DecodeError::BodyLengthMismatch { declared, actual });
        }
        Ok((header, &self.body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trips_compressed_and_plain() {
        let mut writer = FrameWriter::new(3).unwrap();
        let mut reader = FrameReader::new().unwrap();
        for body in [
            vec![1u8, 2, 3],
            vec![b'a'; 10_000],
            (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect(),
        ] {
            let mut out = Vec::new();
            writer
                .write_frame(FrameKind::Pages, 1, &body, &mut out)
                .unwrap();
            assert_eq!(frame_length(&out).unwrap(), Some(out.len()));
            let (header, decoded) = reader.open(&out, FrameKind::Pages, 10, 1 << 20).unwrap();
            assert_eq!(header.entry_count, 1);
            assert_eq!(decoded, &body[..]);
        }
    }

    #[test]
    fn after_a_run_of_incompressible_frames_zstd_is_skipped_for_a_while_then_tried_again() {
        let mut writer = FrameWriter::new(3).unwrap();
        let mut reader = FrameReader::new().unwrap();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let random: Vec<u8> = (0..16_384)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let compressible = vec![b'q'; 16_384];
        let mut send = |writer: &mut FrameWriter, body: &[u8]| {
            let mut out = Vec::new();
            writer
                .write_frame(FrameKind::Pages, 1, body, &mut out)
                .unwrap();
            let (header, decoded) = reader.open(&out, FrameKind::Pages, 10, 1 << 20).unwrap();
            assert_eq!(decoded, body);
            header.compressed
        };
        for _ in 0..POOR_STREAK_TO_SKIP {
            assert!(!send(&mut writer, &random));
        }
        // Skipping: a body whose first bytes do not compress is stored as it is (still a valid
        // frame), even if the rest would.
        let mut mixed = random.clone();
        mixed.extend_from_slice(&compressible);
        mixed.extend_from_slice(&compressible);
        for _ in 0..FRAMES_SKIPPED {
            assert!(!send(&mut writer, &mixed));
        }
        // Then zstd is tried again, and a compressible body is compressed.
        assert!(send(&mut writer, &compressible));
        // A compressible body while skipping ends the skipping at once.
        for _ in 0..POOR_STREAK_TO_SKIP {
            assert!(!send(&mut writer, &random));
        }
        assert!(!send(&mut writer, &random));
        assert!(send(&mut writer, &compressible));
        assert_eq!(writer.skip_remaining, 0);
        // One good frame ends a streak: three poor ones do not start skipping.
        for _ in 0..POOR_STREAK_TO_SKIP - 1 {
            send(&mut writer, &random);
        }
        assert!(send(&mut writer, &compressible));
    }

    #[test]
    fn only_one_standard_zstd_frame_is_accepted() {
        let mut writer = FrameWriter::new(3).unwrap();
        let mut reader = FrameReader::new().unwrap();
        let body = vec![b'z'; 5000];
        let mut out = Vec::new();
        writer
            .write_frame(FrameKind::Chunks, 1, &body, &mut out)
            .unwrap();
        let payload = out[FRAME_HEADER_LENGTH..].to_vec();
        // Two concatenated zstd frames, header adjusted to match: refused.
        let mut doubled = out[..FRAME_HEADER_LENGTH].to_vec();
        doubled[10..14].copy_from_slice(&10_000u32.to_le_bytes());
        doubled[14..18].copy_from_slice(&((payload.len() * 2) as u32).to_le_bytes());
        doubled.extend_from_slice(&payload);
        doubled.extend_from_slice(&payload);
        assert!(
            reader
                .open(&doubled, FrameKind::Chunks, 10, 1 << 20)
                .is_err()
        );
        // A legacy (v0.7) magic number: refused before zstd sees it.
        let mut legacy = out.clone();
        legacy[FRAME_HEADER_LENGTH] = 0x27;
        assert!(matches!(
            reader.open(&legacy, FrameKind::Chunks, 10, 1 << 20),
            Err(DecodeError::Malformed {
                what: "frame body",
                ..
            })
        ));
        assert_eq!(
            reader.open(&out, FrameKind::Chunks, 10, 1 << 20).unwrap().1,
            &body[..]
        );
    }

    #[test]
    fn hostile_headers_are_rejected_before_allocation() {
        let mut writer = FrameWriter::new(3).unwrap();
        let mut reader = FrameReader::new().unwrap();
        let mut out = Vec::new();
        writer
            .write_frame(FrameKind::Chunks, 1, &[b'x'; 1000], &mut out)
            .unwrap();
        // Declared body length far above the cap.
        let mut hostile = out.clone();
        hostile[10..14].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            reader.open(&hostile, FrameKind::Chunks, 10, 1 << 20),
            Err(DecodeError::LimitExceeded { .. })
        ));
        // Declared body length smaller than the real one: zstd must stop at the buffer's end.
        let mut hostile = out.clone();
        hostile[10..14].copy_from_slice(&10u32.to_le_bytes());
        assert!(
            reader
                .open(&hostile, FrameKind::Chunks, 10, 1 << 20)
                .is_err()
        );
        // Wrong kind, version, flags, trailing bytes, truncation.
        assert!(matches!(
            reader.open(&out, FrameKind::Pages, 10, 1 << 20),
            Err(DecodeError::WrongFrameKind { .. })
        ));
        let mut hostile = out.clone();
        hostile[3] = 9;
        assert!(matches!(
            parse_frame_header(&hostile),
            Err(DecodeError::UnsupportedVersion { .. })
        ));
        let mut hostile = out.clone();
        hostile[5] |= 0x80;
        assert!(parse_frame_header(&hostile).is_err());
        let mut hostile = out.clone();
        hostile.push(0);
        assert!(
            reader
                .open(&hostile, FrameKind::Chunks, 10, 1 << 20)
                .is_err()
        );
        assert!(
            reader
                .open(&out[..out.len() - 1], FrameKind::Chunks, 10, 1 << 20)
                .is_err()
        );
        assert!(
            reader
                .open(&out[..5], FrameKind::Chunks, 10, 1 << 20)
                .is_err()
        );
    }
}
