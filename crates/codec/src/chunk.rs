//! Chunk codec for disk images and files: content-defined chunks (FastCDC 2020, `fastcdc` 5.0.0,
//! pinned) so that an insertion early in a file does not shift every later chunk, encoded in
//! tiers cheapest first:
//!
//! 1. **zero**: the chunk is all zeros (tag and length);
//! 2. **known**: the destination holds the chunk (sent earlier in this transfer, or in its chunk
//!    store: asked through [`RemoteHashQuery`], once per frame);
//! 3. **split**: the chunk is new, but some of the 4 KiB blocks it covers (aligned to the image,
//!    as a file system lays out data) are zero or held by the destination's 4 KiB-aligned index:
//!    those go as hashes, the rest as literal bytes. This finds file data that moved between
//!    blocks of a file system image, which chunk hashes alone miss;
//! 4. **literal**: the chunk's bytes.
//!
//! Literal bytes are compressed by zstd over the whole frame body (several MiB of chunks; a body
//! above [`crate::frame::LONG_WINDOW_THRESHOLD`] gets a window as large as itself and long-distance
//! matching).
//!
//! Body layout, one entry per chunk: tag byte, then
//! `0 zero: varint length` · `1 known: hash, varint length` · `2 literal: varint length, bytes` ·
//! `3 split: varint length, varint part count, parts`; a part is
//! `0 zero: varint length` · `1 known block: hash (4096 bytes)` · `2 literal: varint length, bytes`.
//! The decoder checks every length against its limits, every part sum against its chunk length,
//! and every hash it resolves locally against the content it gets.

use std::collections::HashSet;
use std::io::Read;
use std::time::{Duration, Instant};

use fastcdc::v2020;

use crate::PAGE_SIZE;
use crate::error::{DecodeError, EncodeError};
use crate::frame::{FrameKind, FrameReader, FrameWriter};
use crate::hash::{ChunkRepository, ContentHash, ContentHashBuildHasher, RemoteHashQuery};
use crate::page::is_zero;
use crate::wire::{Reader, put_varint};

const CHUNK_ZERO: u8 = 0;
const CHUNK_KNOWN: u8 = 1;
const CHUNK_LITERAL: u8 = 2;
const CHUNK_SPLIT: u8 = 3;
const PART_ZERO: u8 = 0;
const PART_KNOWN_BLOCK: u8 = 1;
const PART_LITERAL: u8 = 2;

/// Size of the blocks of the aligned index (a file system block, a guest page).
pub const BLOCK_SIZE: usize = PAGE_SIZE;

/// FastCDC size bounds, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkingParameters {
    pub min_size: u32,
    pub average_size: u32,
    pub max_size: u32,
}

/// 8 KiB / 32 KiB / 128 KiB: small enough that scattered file system metadata updates cost
/// little, large enough to keep the index at about one entry per 32 KiB.
pub const DEFAULT_CHUNKING: ChunkingParameters = ChunkingParameters {
    min_size: 8 * 1024,
    average_size: 32 * 1024,
    max_size: 128 * 1024,
};

impl ChunkingParameters {
    /// Checks the bounds FastCDC 2020 accepts (it only `debug_assert`s them itself).
    pub fn validate(&self) -> Result<(), &'static str> {
        let (min, average, max) = (
            self.min_size as usize,
            self.average_size as usize,
            self.max_size as usize,
        );
        if !(v2020::MINIMUM_MIN..=v2020::MINIMUM_MAX).contains(&min)
            || !(v2020::AVERAGE_MIN..=v2020::AVERAGE_MAX).contains(&average)
            || !(v2020::MAXIMUM_MIN..=v2020::MAXIMUM_MAX).contains(&max)
        {
            return Err("chunk sizes outside what fastcdc 2020 supports");
        }
        if min > average || average > max {
            return Err("chunk sizes must satisfy min <= average <= max");
        }
        if !min.is_multiple_of(2) || !average.is_multiple_of(2) || !max.is_multiple_of(2) {
            return Err("chunk sizes must be even");
        }
        Ok(())
    }
}

/// Where one content-defined chunk lies in its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkBoundary {
    pub offset: u64,
    pub length: usize,
}

/// Cuts `data` into content-defined chunks.
pub fn chunk_boundaries(data: &[u8], parameters: ChunkingParameters) -> Vec<ChunkBoundary> {
    v2020::FastCDC::new(
        data,
        parameters.min_size as usize,
        parameters.average_size as usize,
        parameters.max_size as usize,
    )
    .map(|chunk| ChunkBoundary {
        offset: chunk.offset as u64,
        length: chunk.length,
    })
    .collect()
}

/// Cuts a reader into content-defined chunks; calls `each(offset, bytes)` for every chunk.
pub fn for_each_chunk<R: Read, E>(
    reader: R,
    parameters: ChunkingParameters,
    mut each: impl FnMut(u64, &[u8]) -> Result<(), E>,
    input_error: impl Fn(u64, std::io::Error) -> E,
) -> Result<(), E> {
    let chunker = v2020::StreamCDC::new(
        reader,
        parameters.min_size as usize,
        parameters.average_size as usize,
        parameters.max_size as usize,
    );
    let mut position = 0u64;
    for chunk in chunker {
        let chunk = chunk.map_err(|error| input_error(position, error.into()))?;
        each(chunk.offset, &chunk.data)?;
        position = chunk.offset + chunk.length as u64;
    }
    Ok(())
}

/// Counters of one side of a chunk transfer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChunkStats {
    pub chunks: u64,
    pub zero_chunks: u64,
    pub known_from_transfer: u64,
    pub known_from_destination: u64,
    pub split_chunks: u64,
    /// 4 KiB blocks inside split chunks sent as hashes.
    pub known_blocks: u64,
    pub literal_chunks: u64,
    /// Bytes sent literally (before zstd), in literal chunks and split parts.
    pub literal_bytes: u64,
    pub input_bytes: u64,
    pub frames: u64,
    /// Frame bytes out, headers included.
    pub frame_bytes: u64,
    pub compression_time: Duration,
}

/// Settings of a [`ChunkEncoder`].
#[derive(Clone, Debug)]
pub struct ChunkEncoderConfig {
    pub chunking: ChunkingParameters,
    pub zstd_level: i32,
    /// Input bytes per frame before the frame counts as full.
    pub frame_input_target: usize,
    /// Look for zero and known 4 KiB blocks inside new chunks.
    pub split_into_blocks: bool,
    /// Ask the destination which hashes its chunk store holds.
    pub query_destination: bool,
}

impl Default for ChunkEncoderConfig {
    fn default() -> Self {
        Self {
            chunking: DEFAULT_CHUNKING,
            zstd_level: 3,
            frame_input_target: 16 << 20,
            split_into_blocks: true,
            query_destination: true,
        }
    }
}

struct PendingChunk {
    image_offset: u64,
    start: usize,
    length: usize,
}

enum ChunkPlan {
    Zero,
    Known,
    Literal,
    /// Per aligned block inside the chunk: (offset in chunk, what it is).
    Split(Vec<(usize, BlockPlan)>),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BlockPlan {
    Zero,
    Known(ContentHash),
}

/// Encodes chunks into frames; [`ChunkEncoder::encode_reader`] does the whole job for a file.
pub struct ChunkEncoder<Q: RemoteHashQuery> {
    config: ChunkEncoderConfig,
    query: Q,
    sent: HashSet<ContentHash, ContentHashBuildHasher>,
    destination_holds: HashSet<ContentHash, ContentHashBuildHasher>,
    pending: Vec<PendingChunk>,
    pending_data: Vec<u8>,
    body: Vec<u8>,
    writer: FrameWriter,
    stats: ChunkStats,
}

impl<Q: RemoteHashQuery> ChunkEncoder<Q> {
    pub fn new(config: ChunkEncoderConfig, query: Q) -> Result<Self, EncodeError> {
        config
            .chunking
            .validate()
            .map_err(|reason| EncodeError::Compression {
                level: config.zstd_level,
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, reason),
            })?;
        Ok(Self {
            writer: FrameWriter::new(config.zstd_level)?,
            config,
            query,
            sent: HashSet::default(),
            destination_holds: HashSet::default(),
            pending: Vec::new(),
            pending_data: Vec::new(),
            body: Vec::new(),
            stats: ChunkStats::default(),
        })
    }

    pub fn stats(&self) -> &ChunkStats {
        &self.stats
    }

    pub fn set_zstd_level(&mut self, level: i32) -> Result<(), EncodeError> {
        self.writer.set_level(level)
    }

    /// Queues a chunk found at `image_offset`. Returns true once the frame's input target is
    /// reached.
    pub fn push_chunk(&mut self, image_offset: u64, data: &[u8]) -> bool {
        self.pending.push(PendingChunk {
            image_offset,
            start: self.pending_data.len(),
            length: data.len(),
        });
        self.pending_data.extend_from_slice(data);
        self.pending_data.len() >= self.config.frame_input_target
    }

    /// Chunks `reader` and hands each finished frame to `sink`.
    pub fn encode_reader<R: Read>(
        &mut self,
        reader: R,
        sink: impl FnMut(&[u8]) -> Result<(), crate::hash::BoxError>,
    ) -> Result<(), EncodeError> {
        let level = self.config.zstd_level;
        self.encode_reader_choosing_level(reader, |_| level, sink)
    }

    /// Like [`encode_reader`](Self::encode_reader), but asks `choose_level` for the zstd level
    /// before each frame is encoded, with the statistics so far: a transfer adapts the level to
    /// the link as it goes (the decoder needs no notice; every frame is self-describing).
    pub fn encode_reader_choosing_level<R: Read>(
        &mut self,
        reader: R,
        mut choose_level: impl FnMut(&ChunkStats) -> i32,
        mut sink: impl FnMut(&[u8]) -> Result<(), crate::hash::BoxError>,
    ) -> Result<(), EncodeError> {
        let mut frame = Vec::new();
        let chunking = self.config.chunking;
        let mut encode_frame = |encoder: &mut Self, frame: &mut Vec<u8>| {
            let level = choose_level(&encoder.stats);
            encoder.set_zstd_level(level)?;
            frame.clear();
            encoder.finish_frame(frame)
        };
        for_each_chunk(
            reader,
            chunking,
            |offset, data| {
                if self.push_chunk(offset, data) {
                    encode_frame(self, &mut frame)?;
                    sink(&frame).map_err(EncodeError::Output)?;
                }
                Ok(())
            },
            |offset, source| EncodeError::Input { offset, source },
        )?;
        if !self.pending.is_empty() && encode_frame(self, &mut frame)? > 0 {
            sink(&frame).map_err(EncodeError::Output)?;
        }
        Ok(())
    }

    fn ask(&mut self, mut questions: Vec<ContentHash>) -> Result<(), EncodeError> {
        if questions.is_empty() || !self.config.query_destination {
            return Ok(());
        }
        questions.sort_unstable();
        questions.dedup();
        let answers = self
            .query
            .which_of(&questions)
            .map_err(EncodeError::HashQuery)?;
        if answers.len() != questions.len() {
            return Err(EncodeError::HashQueryAnswerCount {
                questions: questions.len(),
                answers: answers.len(),
            });
        }
        self.destination_holds.extend(
            questions
                .iter()
                .zip(&answers)
                .filter(|(_, held)| **held)
                .map(|(hash, _)| *hash),
        );
        Ok(())
    }

    /// Encodes every pending chunk into one frame appended to `out`; returns its length (0 and
    /// no frame when nothing was pending).
    pub fn finish_frame(&mut self, out: &mut Vec<u8>) -> Result<usize, EncodeError> {
        if self.pending.is_empty() {
            return Ok(0);
        }
        let pending = std::mem::take(&mut self.pending);
        let data = std::mem::take(&mut self.pending_data);
        let chunk_bytes = |chunk: &PendingChunk| &data[chunk.start..chunk.start + chunk.length];

        // Whole-chunk hashes, and one question per hash not already settled.
        let mut hashes = Vec::with_capacity(pending.len());
        let mut questions = Vec::new();
        for chunk in &pending {
            let bytes = chunk_bytes(chunk);
            if is_zero(bytes) {
                hashes.push(None);
                continue;
            }
            let hash = ContentHash::of(bytes);
            if !self.sent.contains(&hash) && !self.destination_holds.contains(&hash) {
                questions.push(hash);
            }
            hashes.push(Some(hash));
        }
        self.ask(questions)?;

        // Aligned-block hashes inside chunks still unknown.
        let mut block_hashes: Vec<Vec<(usize, Option<ContentHash>)>> =
            Vec::with_capacity(pending.len());
        let mut questions = Vec::new();
        for (chunk, hash) in pending.iter().zip(&hashes) {
            let unknown = hash.is_some_and(|hash| {
                !self.sent.contains(&hash) && !self.destination_holds.contains(&hash)
            });
            if !unknown || !self.config.split_into_blocks {
                block_hashes.push(Vec::new());
                continue;
            }
            let bytes = chunk_bytes(chunk);
            let first =
                (BLOCK_SIZE as u64 - chunk.image_offset % BLOCK_SIZE as u64) as usize % BLOCK_SIZE;
            let mut blocks = Vec::new();
            let mut start = first;
            while start + BLOCK_SIZE <= bytes.len() {
                let block = &bytes[start..start + BLOCK_SIZE];
                if is_zero(block) {
                    blocks.push((start, None));
                } else {
                    let block_hash = ContentHash::of(block);
                    if !self.destination_holds.contains(&block_hash) {
                        questions.push(block_hash);
                    }
                    blocks.push((start, Some(block_hash)));
                }
                start += BLOCK_SIZE;
            }
            block_hashes.push(blocks);
        }
        self.ask(questions)?;

        self.body.clear();
        for ((chunk, hash), blocks) in pending.iter().zip(&hashes).zip(&block_hashes) {
            let bytes = chunk_bytes(chunk);
            let plan = match hash {
                None => ChunkPlan::Zero,
                Some(hash) if self.sent.contains(hash) => {
                    self.stats.known_from_transfer += 1;
                    ChunkPlan::Known
                }
                Some(hash) if self.destination_holds.contains(hash) => {
                    self.stats.known_from_destination += 1;
                    ChunkPlan::Known
                }
                Some(_) => {
                    let useful: Vec<(usize, BlockPlan)> = blocks
                        .iter()
                        .filter_map(|(start, block_hash)| match block_hash {
                            None => Some((*start, BlockPlan::Zero)),
                            Some(block_hash) if self.destination_holds.contains(block_hash) => {
                                Some((*start, BlockPlan::Known(*block_hash)))
                            }
                            Some(_) => None,
                        })
                        .collect();
                    if useful.is_empty() {
                        ChunkPlan::Literal
                    } else {
                        ChunkPlan::Split(useful)
                    }
                }
            };
            match plan {
                ChunkPlan::Zero => {
                    self.stats.zero_chunks += 1;
                    self.body.push(CHUNK_ZERO);
                    put_varint(&mut self.body, bytes.len() as u64);
                }
                ChunkPlan::Known => {
                    self.body.push(CHUNK_KNOWN);
                    self.body.extend_from_slice(
                        hash.as_ref()
                            .map_or(&[0u8; 32], ContentHash::as_bytes)
                            .as_slice(),
                    );
                    put_varint(&mut self.body, bytes.len() as u64);
                }
                ChunkPlan::Literal => {
                    self.stats.literal_chunks += 1;
                    self.stats.literal_bytes += bytes.len() as u64;
                    self.body.push(CHUNK_LITERAL);
                    put_varint(&mut self.body, bytes.len() as u64);
                    self.body.extend_from_slice(bytes);
                }
                ChunkPlan::Split(blocks) => {
                    self.stats.split_chunks += 1;
                    self.write_split(bytes, &blocks);
                }
            }
            if let Some(hash) = hash {
                self.sent.insert(*hash);
            }
        }
        self.stats.chunks += pending.len() as u64;
        self.stats.input_bytes += data.len() as u64;

        let started = Instant::now();
        let written =
            self.writer
                .write_frame(FrameKind::Chunks, pending.len() as u32, &self.body, out)?;
        self.stats.compression_time += started.elapsed();
        self.stats.frames += 1;
        self.stats.frame_bytes += written as u64;

        self.pending = pending;
        self.pending.clear();
        self.pending_data = data;
        self.pending_data.clear();
        Ok(written)
    }

    fn write_split(&mut self, bytes: &[u8], blocks: &[(usize, BlockPlan)]) {
        // Build the parts first: merge neighbouring zero blocks, keep literal runs whole.
        let mut parts: Vec<(u8, usize, usize, Option<ContentHash>)> = Vec::new(); // kind, start, length, hash
        let mut position = 0usize;
        for &(start, block) in blocks {
            if start > position {
                parts.push((PART_LITERAL, position, start - position, None));
            }
            match block {
                BlockPlan::Zero => match parts.last_mut() {
                    Some((PART_ZERO, _, length, _)) => *length += BLOCK_SIZE,
                    _ => parts.push((PART_ZERO, start, BLOCK_SIZE, None)),
                },
                BlockPlan::Known(hash) => {
                    self.stats.known_blocks += 1;
                    parts.push((PART_KNOWN_BLOCK, start, BLOCK_SIZE, Some(hash)));
                }
            }
            position = start + BLOCK_SIZE;
        }
        if position < bytes.len() {
            parts.push((PART_LITERAL, position, bytes.len() - position, None));
        }
        self.body.push(CHUNK_SPLIT);
        put_varint(&mut self.body, bytes.len() as u64);
        put_varint(&mut self.body, parts.len() as u64);
        for (kind, start, length, hash) in parts {
            self.body.push(kind);
            match (kind, hash) {
                (PART_KNOWN_BLOCK, Some(hash)) => self.body.extend_from_slice(hash.as_bytes()),
                (PART_ZERO, _) => put_varint(&mut self.body, length as u64),
                _ => {
                    self.stats.literal_bytes += length as u64;
                    put_varint(&mut self.body, length as u64);
                    self.body.extend_from_slice(&bytes[start..start + length]);
                }
            }
        }
    }
}

/// Limits of a [`ChunkDecoder`].
#[derive(Clone, Debug)]
pub struct ChunkDecoderConfig {
    /// Longest chunk accepted (FastCDC's own maximum by default).
    pub max_chunk_length: usize,
    /// Largest decompressed frame body accepted.
    pub max_frame_body: usize,
}

impl Default for ChunkDecoderConfig {
    fn default() -> Self {
        Self {
            max_chunk_length: v2020::MAXIMUM_MAX,
            max_frame_body: 64 << 20,
        }
    }
}

static ZEROS: [u8; 64 * 1024] = [0u8; 64 * 1024];

fn emit_zeros(
    mut length: usize,
    sink: &mut impl FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<(), DecodeError> {
    while length > 0 {
        let piece = length.min(ZEROS.len());
        sink(&ZEROS[..piece]).map_err(DecodeError::Output)?;
        length -= piece;
    }
    Ok(())
}

/// Decodes chunk frames into the original bytes, remembering every chunk it receives in the
/// repository (the destination's chunk store) so later references resolve.
pub struct ChunkDecoder<R: ChunkRepository> {
    config: ChunkDecoderConfig,
    repository: R,
    reader: FrameReader,
    chunk: Vec<u8>,
    stats: ChunkStats,
}

impl<R: ChunkRepository> ChunkDecoder<R> {
    pub fn new(config: ChunkDecoderConfig, repository: R) -> Result<Self, DecodeError> {
        Ok(Self {
            config,
            repository,
            reader: FrameReader::new()?,
            chunk: Vec::new(),
            stats: ChunkStats::default(),
        })
    }

    pub fn stats(&self) -> &ChunkStats {
        &self.stats
    }

    pub fn repository(&self) -> &R {
        &self.repository
    }

    pub fn into_repository(self) -> R {
        self.repository
    }

    /// Decodes one whole frame, passing the output bytes to `sink` in order. Returns the number of
    /// bytes produced.
    pub fn decode_frame(
        &mut self,
        frame: &[u8],
        mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<u64, DecodeError> {
        let Self {
            config,
            repository,
            reader,
            chunk,
            stats,
        } = self;
        let (header, body) = reader.open(
            frame,
            FrameKind::Chunks,
            config.max_frame_body,
            config.max_frame_body,
        )?;
        let declared = header.entry_count as usize;
        let max_chunk = config.max_chunk_length;
        let mut body = Reader::new(body);
        let mut produced = 0u64;
        let mut decoded = 0usize;
        while !body.is_empty() {
            if decoded == declared {
                return Err(DecodeError::EntryCountMismatch {
                    declared,
                    actual: decoded + 1,
                });
            }
            let tag_offset = body.position();
            match body.u8("chunk tag")? {
                CHUNK_ZERO => {
                    let length = body.length("zero chunk length", max_chunk)?;
                    emit_zeros(length, &mut sink)?;
                    stats.zero_chunks += 1;
                    produced += length as u64;
                }
                CHUNK_KNOWN => {
                    let hash = body.hash("known chunk hash")?;
                    let length = body.length("known chunk length", max_chunk)?;
                    let content = resolve(repository, hash, length)?;
                    sink(&content).map_err(DecodeError::Output)?;
                    stats.known_from_destination += 1;
                    produced += length as u64;
                }
                CHUNK_LITERAL => {
                    let length = body.length("literal chunk length", max_chunk)?;
                    let bytes = body.take(length, "literal chunk")?;
                    repository
                        .remember(ContentHash::of(bytes), bytes)
                        .map_err(DecodeError::Repository)?;
                    sink(bytes).map_err(DecodeError::Output)?;
                    stats.literal_chunks += 1;
                    stats.literal_bytes += length as u64;
                    produced += length as u64;
                }
                CHUNK_SPLIT => {
                    let length = body.length("split chunk length", max_chunk)?;
                    let part_count = body.length("split part count", length)?;
                    chunk.clear();
                    chunk.reserve(length);
                    for _ in 0..part_count {
                        let part_offset = body.position();
                        let room = length - chunk.len();
                        match body.u8("split part tag")? {
                            PART_ZERO => {
                                let part_length = body.length("zero part length", room)?;
                                chunk.resize(chunk.len() + part_length, 0);
                            }
                            PART_KNOWN_BLOCK => {
                                let hash = body.hash("known block hash")?;
                                if room < BLOCK_SIZE {
                                    return Err(DecodeError::Malformed {
                                        what: "known block",
                                        offset: part_offset,
                                        reason: "block runs past the end of its chunk",
                                    });
                                }
                                let content = resolve(repository, hash, BLOCK_SIZE)?;
                                chunk.extend_from_slice(&content);
                                stats.known_blocks += 1;
                            }
                            PART_LITERAL => {
                                let part_length = body.length("literal part length", room)?;
                                chunk.extend_from_slice(body.take(part_length, "literal part")?);
                                stats.literal_bytes += part_length as u64;
                            }
                            _ => {
                                return Err(DecodeError::Malformed {
                                    what: "split part tag",
                                    offset: part_offset,
                                    reason: "unknown part kind",
                                });
                            }
                        }
                    }
                    if chunk.len() != length {
                        return Err(DecodeError::Malformed {
                            what: "split chunk",
                            offset: tag_offset,
                            reason: "parts do not add up to the chunk length",
                        });
                    }
                    repository
                        .remember(ContentHash::of(chunk), chunk)
                        .map_err(DecodeError::Repository)?;
                    sink(chunk).map_err(DecodeError::Output)?;
                    stats.split_chunks += 1;
                    produced += length as u64;
                }
                _ => {
                    return Err(DecodeError::Malformed {
                        what: "chunk tag",
                        offset: tag_offset,
                        reason: "unknown chunk kind",
                    });
                }
            }
            decoded += 1;
        }
        if decoded != declared {
            return Err(DecodeError::EntryCountMismatch {
                declared,
                actual: decoded,
            });
        }
        repository.end_of_frame().map_err(DecodeError::Repository)?;
        stats.chunks += decoded as u64;
        stats.input_bytes += produced;
        stats.frames += 1;
        stats.frame_bytes += frame.len() as u64;
        Ok(produced)
    }
}

fn resolve<R: ChunkRepository>(
    repository: &R,
    hash: ContentHash,
    length: usize,
) -> Result<Vec<u8>, DecodeError> {
    crate::hash::verified_content(hash, length, repository.content(&hash))
}
