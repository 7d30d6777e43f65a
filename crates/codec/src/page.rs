//! Page codec: fixed 4 KiB pages (guest RAM), keyed by (block name, byte offset in the block) as
//! in QEMU's migration stream, encoded record by record in tiers, cheapest first:
//!
//! 1. **zero**: the page is all zeros (one tag byte);
//! 2. **known**: the destination holds a page with the same BLAKE3 hash, either because it was sent
//!    earlier in this transfer (the page mirror) or because the destination's chunk store has it
//!    (asked through [`RemoteHashQuery`], once per frame);
//! 3. **delta**: XOR + run-length against the previous version of the same page, when that is at
//!    most [`PageEncoderConfig::delta_limit`] bytes;
//! 4. **literal**: the page itself.
//!
//! Pages are batched into frames (see [`crate::frame`]) and the whole frame body is compressed
//! with zstd, which is where literal and delta pages get compressed: batching is what makes zstd
//! pay on 4 KiB pages. A body that does not shrink is sent as it is.
//!
//! Both sides keep a **page mirror**: for every key, the hash of the content last sent there,
//! with a count of keys per hash. The encoder and decoder update it in the same order (every
//! encoded page, plus [`PageEncoder::observe_page`] / [`PageDecoder::observe_page`] for pages that
//! travel outside the codec, such as QEMU's own ZERO or XBZRLE records), so they agree on what
//! "known" means without ever talking about it. The decoder also keeps one copy of each distinct
//! content (it must produce it); the encoder keeps only hashes plus a bounded cache of recent
//! pages as delta bases, so its memory does not grow with the guest. The number of keys is capped
//! by `mirror_page_limit`, which must be the same on both sides.
//!
//! Body layout: one entry per page, in order. An entry is a tag byte (bits 0-1 tier, bit 2 "next
//! page of the same block as the previous entry", bit 3 "a new block name follows"), then unless
//! bit 2 is set the key (`u8 length + name` when bit 3 is set, otherwise a varint index into the
//! block table built from the names in order of first appearance; then a varint page index =
//! offset / 4096), then the tier's payload: nothing, a 32-byte hash, `varint length + delta`, or
//! 4096 bytes.
//!
//! An error from either side leaves its mirror in an unspecified state: the transfer has to
//! restart. This module does no IO; it must not know about QEMU's record syntax.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::PAGE_SIZE;
use crate::delta::{apply_delta, encode_delta};
use crate::error::{DecodeError, EncodeError};
use crate::frame::{FrameKind, FrameReader, FrameWriter};
use crate::hash::{ContentHash, ContentHashBuildHasher, LocalContentSource, RemoteHashQuery};
use crate::wire::{Reader, put_varint};

/// One guest page.
pub type Page = [u8; PAGE_SIZE];

/// Most pages one frame may carry (16 MiB of input).
pub const MAX_PAGES_PER_FRAME: usize = 4096;

/// Most distinct block names in one transfer (QEMU machines have a handful).
pub const MAX_BLOCKS: usize = 1024;

const MAX_BLOCK_NAME_LENGTH: usize = 255;

/// Upper bound of one entry's encoded size: tag, name, page index, tier payload.
const MAX_PAGE_ENTRY_LENGTH: usize = 1 + 1 + MAX_BLOCK_NAME_LENGTH + 10 + 10 + PAGE_SIZE;

const TIER_ZERO: u8 = 0;
const TIER_KNOWN: u8 = 1;
const TIER_DELTA: u8 = 2;
const TIER_LITERAL: u8 = 3;
const TIER_MASK: u8 = 0x03;
const TAG_NEXT_PAGE: u8 = 0x04;
const TAG_NEW_BLOCK: u8 = 0x08;
const TAG_KNOWN_BITS: u8 = TIER_MASK | TAG_NEXT_PAGE | TAG_NEW_BLOCK;

/// The tier a page was encoded in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageTier {
    Zero,
    Known,
    Delta,
    Literal,
}

/// Counters of one side of a page transfer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageStats {
    pub pages: u64,
    pub zero_pages: u64,
    /// Pages whose content was sent earlier in this transfer.
    pub known_from_transfer: u64,
    /// Pages found in the destination's chunk store.
    pub known_from_destination: u64,
    pub delta_pages: u64,
    pub literal_pages: u64,
    pub frames: u64,
    /// Page bytes in (`pages × 4096`).
    pub input_bytes: u64,
    /// Frame bytes out, headers included.
    pub frame_bytes: u64,
    /// Time spent in zstd.
    pub compression_time: Duration,
}

impl PageStats {
    /// Adds another transfer's counters (a migration's channels, each with a codec of its own).
    pub fn absorb(&mut self, other: &PageStats) {
        self.pages += other.pages;
        self.zero_pages += other.zero_pages;
        self.known_from_transfer += other.known_from_transfer;
        self.known_from_destination += other.known_from_destination;
        self.delta_pages += other.delta_pages;
        self.literal_pages += other.literal_pages;
        self.frames += other.frames;
        self.input_bytes += other.input_bytes;
        self.frame_bytes += other.frame_bytes;
        self.compression_time += other.compression_time;
    }
}

/// Returns true if every byte of `bytes` is zero.
pub fn is_zero(bytes: &[u8]) -> bool {
    let (words, tail) = bytes.as_chunks::<16>();
    words.iter().all(|word| u128::from_ne_bytes(*word) == 0) && tail.iter().all(|&byte| byte == 0)
}

#[derive(Default)]
struct BlockTable {
    names: Vec<String>,
    by_name: HashMap<String, u32>,
}

impl BlockTable {
    fn name(&self, index: u32) -> &str {
        self.names.get(index as usize).map_or("", String::as_str)
    }
}

struct MirrorContent {
    /// Only the decoder keeps contents; the encoder needs hashes alone.
    page: Option<Box<Page>>,
    holders: u32,
}

/// What the destination holds, as both sides agree.
struct PageMirror {
    by_key: HashMap<(u32, u64), ContentHash>,
    by_hash: HashMap<ContentHash, MirrorContent, ContentHashBuildHasher>,
    page_limit: usize,
}

impl PageMirror {
    fn new(page_limit: usize) -> Self {
        Self {
            by_key: HashMap::new(),
            by_hash: HashMap::default(),
            page_limit,
        }
    }

    fn page_for_hash(&self, hash: &ContentHash) -> Option<&Page> {
        self.by_hash
            .get(hash)
            .and_then(|content| content.page.as_deref())
    }

    fn contains_hash(&self, hash: &ContentHash) -> bool {
        self.by_hash.contains_key(hash)
    }

    /// Records that the page at `key` now holds content `hash` (kept when `page` is given).
    /// Fails, changing nothing, when `key` is new and the mirror is full.
    fn record(
        &mut self,
        key: (u32, u64),
        hash: ContentHash,
        page: Option<&Page>,
    ) -> Result<(), usize> {
        match self.by_key.get(&key) {
            Some(old) if *old == hash => return Ok(()),
            Some(old) => {
                let old = *old;
                if let Some(content) = self.by_hash.get_mut(&old) {
                    content.holders -= 1;
                    if content.holders == 0 {
                        self.by_hash.remove(&old);
                    }
                }
            }
            None if self.by_key.len() >= self.page_limit => return Err(self.page_limit),
            None => {}
        }
        self.by_hash
            .entry(hash)
            .or_insert_with(|| MirrorContent {
                page: page.map(|page| Box::new(*page)),
                holders: 0,
            })
            .holders += 1;
        self.by_key.insert(key, hash);
        Ok(())
    }
}

/// Settings of a [`PageEncoder`].
#[derive(Clone, Debug)]
pub struct PageEncoderConfig {
    /// Starting zstd level; change it during a transfer with [`PageEncoder::set_zstd_level`]
    /// (see [`crate::level::choose_zstd_level`]).
    pub zstd_level: i32,
    /// Pages per frame before [`PageEncoder::push_page`] reports the frame full.
    pub pages_per_frame: usize,
    /// Most distinct page keys the mirror tracks; must equal the decoder's.
    pub mirror_page_limit: usize,
    /// Largest delta sent instead of the page; 0 disables the delta tier.
    pub delta_limit: usize,
    /// Pages whose last content the encoder keeps as delta bases (like QEMU's XBZRLE cache; the
    /// decoder always holds every page, so this bounds only the encoder's memory).
    pub delta_cache_pages: usize,
    /// Ask the destination which hashes its chunk store holds.
    pub query_destination: bool,
}

impl Default for PageEncoderConfig {
    fn default() -> Self {
        Self {
            zstd_level: 3,
            pages_per_frame: 256,
            mirror_page_limit: 1 << 24,
            delta_limit: PAGE_SIZE / 2,
            delta_cache_pages: 65_536,
            query_destination: true,
        }
    }
}

/// The last content of recently sent pages, as delta bases. Bounded, first in first out; an
/// evicted page's buffer is reused so that a long transfer stops allocating.
struct DeltaCache {
    pages: HashMap<(u32, u64), Box<Page>>,
    order: VecDeque<(u32, u64)>,
    capacity: usize,
}

impl DeltaCache {
    fn new(capacity: usize) -> Self {
        Self {
            pages: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    fn get(&self, key: &(u32, u64)) -> Option<&Page> {
        self.pages.get(key).map(|page| &**page)
    }

    fn forget(&mut self, key: &(u32, u64)) {
        self.pages.remove(key);
    }

    fn remember(&mut self, key: (u32, u64), page: &Page) {
        if self.capacity == 0 {
            return;
        }
        if let Some(existing) = self.pages.get_mut(&key) {
            existing.copy_from_slice(page);
            return;
        }
        let mut recycled = None;
        while self.pages.len() >= self.capacity {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(buffer) = self.pages.remove(&oldest) {
                recycled = Some(buffer);
            }
        }
        // Keys re-sent after eviction leave stale entries in `order`; drop them now and then.
        if self.order.len() > self.capacity.saturating_mul(4) {
            self.order.retain(|key| self.pages.contains_key(key));
        }
        let buffer = match recycled {
            Some(mut buffer) => {
                buffer.copy_from_slice(page);
                buffer
            }
            None => Box::new(*page),
        };
        self.pages.insert(key, buffer);
        self.order.push_back(key);
    }
}

/// How a queued page will go out, as far as is known before the destination answers.
enum PendingTier {
    Zero,
    /// Sent earlier in this transfer.
    KnownFromTransfer(ContentHash),
    /// Held by the destination, as the query knew at once ([`RemoteHashQuery::holds_locally`]).
    KnownFromDestination(ContentHash),
    /// Depends on the destination's answer: known, else delta (bytes in `delta_data`), else
    /// literal (bytes in `literal_data`). `ask`: the answer is not known yet (a local query
    /// already said no).
    Undecided {
        hash: ContentHash,
        ask: bool,
        literal_start: usize,
        delta: Option<(usize, usize)>,
    },
}

struct PendingPage {
    block: u32,
    page_index: u64,
    first_use_of_block: bool,
    tier: PendingTier,
}

/// Encodes pages into frames. Push pages with [`PageEncoder::push_page`], then write a frame with
/// [`PageEncoder::finish_frame`] whenever the frame is full or the caller needs the bytes out
/// (at the end of a QEMU RAM section, say).
///
/// Zero pages and pages sent earlier are settled as they are pushed (a hash and a mirror update,
/// no copy); only the others are copied, and their tier is settled at the end of the frame, after
/// one question to the destination for all of them.
pub struct PageEncoder<Q: RemoteHashQuery> {
    config: PageEncoderConfig,
    query: Q,
    mirror: PageMirror,
    delta_cache: DeltaCache,
    blocks: BlockTable,
    pending: Vec<PendingPage>,
    literal_data: Vec<u8>,
    delta_data: Vec<u8>,
    destination_holds: HashSet<ContentHash, ContentHashBuildHasher>,
    body: Vec<u8>,
    writer: FrameWriter,
    stats: PageStats,
    last_hash: ContentHash,
}

impl<Q: RemoteHashQuery> PageEncoder<Q> {
    pub fn new(config: PageEncoderConfig, query: Q) -> Result<Self, EncodeError> {
        let writer = FrameWriter::new(config.zstd_level)?;
        Ok(Self {
            mirror: PageMirror::new(config.mirror_page_limit),
            delta_cache: DeltaCache::new(if config.delta_limit > 0 {
                config.delta_cache_pages
            } else {
                0
            }),
            config: PageEncoderConfig {
                pages_per_frame: config.pages_per_frame.clamp(1, MAX_PAGES_PER_FRAME),
                ..config
            },
            query,
            blocks: BlockTable::default(),
            pending: Vec::new(),
            literal_data: Vec::new(),
            delta_data: Vec::new(),
            destination_holds: HashSet::default(),
            body: Vec::new(),
            writer,
            stats: PageStats::default(),
            last_hash: ContentHash::of_zero_page(),
        })
    }

    pub fn stats(&self) -> &PageStats {
        &self.stats
    }

    /// What the encoder asks about the destination's holdings.
    pub fn query(&self) -> &Q {
        &self.query
    }

    /// The content hash of the page last given to [`PageEncoder::push_page`] (the zero page's
    /// hash before any).
    pub fn last_hash(&self) -> ContentHash {
        self.last_hash
    }

    pub fn zstd_level(&self) -> i32 {
        self.writer.level()
    }

    /// Changes the zstd level for the following frames (the decoder does not need to know).
    pub fn set_zstd_level(&mut self, level: i32) -> Result<(), EncodeError> {
        self.writer.set_level(level)
    }

    /// Pages waiting for [`PageEncoder::finish_frame`].
    pub fn pending_pages(&self) -> usize {
        self.pending.len()
    }

    fn block_index(&mut self, block: &str) -> Result<(u32, bool), EncodeError> {
        if let Some(&index) = self.blocks.by_name.get(block) {
            return Ok((index, false));
        }
        if block.is_empty() || block.len() > MAX_BLOCK_NAME_LENGTH {
            return Err(EncodeError::BadBlockName {
                block: block.to_owned(),
            });
        }
        if self.blocks.names.len() >= MAX_BLOCKS {
            return Err(EncodeError::TooManyBlocks { limit: MAX_BLOCKS });
        }
        let index = self.blocks.names.len() as u32;
        self.blocks.names.push(block.to_owned());
        self.blocks.by_name.insert(block.to_owned(), index);
        Ok((index, true))
    }

    fn page_index(block: &str, offset: u64) -> Result<u64, EncodeError> {
        if !offset.is_multiple_of(PAGE_SIZE as u64) {
            return Err(EncodeError::UnalignedOffset {
                block: block.to_owned(),
                offset,
            });
        }
        Ok(offset / PAGE_SIZE as u64)
    }

    /// Records `hash` as the content at `key` in the mirror. The delta cache keeps `page` as the
    /// key's next delta base only when `delta_base` is set; otherwise it forgets the key, because
    /// a stale base would make the decoder apply a delta to a different page.
    fn record(
        &mut self,
        key: (u32, u64),
        hash: ContentHash,
        page: &Page,
        delta_base: bool,
    ) -> Result<(), EncodeError> {
        self.mirror
            .record(key, hash, None)
            .map_err(|limit| EncodeError::MirrorFull { limit })?;
        if delta_base {
            self.delta_cache.remember(key, page);
        } else {
            self.delta_cache.forget(&key);
        }
        Ok(())
    }

    /// Queues the page at `offset` in `block`. Returns true once the frame is full: call
    /// [`PageEncoder::finish_frame`] before pushing more.
    pub fn push_page(
        &mut self,
        block: &str,
        offset: u64,
        page: &Page,
    ) -> Result<bool, EncodeError> {
        if self.pending.len() >= self.config.pages_per_frame {
            return Err(EncodeError::FrameFull {
                pages: self.pending.len(),
            });
        }
        let page_index = Self::page_index(block, offset)?;
        let (block, first_use_of_block) = self.block_index(block)?;
        let key = (block, page_index);
        let zero = is_zero(page);
        let (hash, tier) = if zero {
            (ContentHash::of_zero_page(), PendingTier::Zero)
        } else {
            let hash = ContentHash::of(page);
            if self.mirror.contains_hash(&hash) {
                (hash, PendingTier::KnownFromTransfer(hash))
            } else if let held @ (Some(false) | None) = self.destination_holds_now(&hash) {
                let ask = held.is_none();
                let literal_start = self.literal_data.len();
                self.literal_data.extend_from_slice(page);
                let mut delta = None;
                if let Some(previous) = self.delta_cache.get(&key) {
                    let delta_start = self.delta_data.len();
                    if encode_delta(
                        previous,
                        page,
                        self.config.delta_limit,
                        &mut self.delta_data,
                    ) {
                        delta = Some((delta_start, self.delta_data.len()));
                    }
                }
                (
                    hash,
                    PendingTier::Undecided {
                        hash,
                        ask,
                        literal_start,
                        delta,
                    },
                )
            } else {
                (hash, PendingTier::KnownFromDestination(hash))
            }
        };
        // Zero pages, pages sent earlier and pages the destination holds are not kept as delta
        // bases: copying them would cost more than the rare delta against them saves.
        let delta_base = matches!(tier, PendingTier::Undecided { .. });
        self.record(key, hash, page, delta_base)?;
        self.last_hash = hash;
        self.pending.push(PendingPage {
            block,
            page_index,
            first_use_of_block,
            tier,
        });
        Ok(self.pending.len() >= self.config.pages_per_frame)
    }

    /// Whether the destination holds `hash`, when that is known now: nothing to ask, an earlier
    /// answer, or the query's own at once ([`RemoteHashQuery::holds_locally`]). `None`: the
    /// frame's batch asks.
    fn destination_holds_now(&mut self, hash: &ContentHash) -> Option<bool> {
        if !self.config.query_destination {
            Some(false)
        } else if self.destination_holds.contains(hash) {
            Some(true)
        } else {
            self.query.holds_locally(hash)
        }
    }

    /// Records that the destination now holds `page` at (`block`, `offset`) although the codec did
    /// not carry it (QEMU's own ZERO or XBZRLE records). The decoder must make the same call at the
    /// same point of the stream. Only allowed between frames.
    pub fn observe_page(
        &mut self,
        block: &str,
        offset: u64,
        page: &Page,
    ) -> Result<(), EncodeError> {
        if !self.pending.is_empty() {
            return Err(EncodeError::PagesPending);
        }
        let page_index = Self::page_index(block, offset)?;
        let zero = is_zero(page);
        let hash = ContentHash::of_page(page);
        // Observing registers the name on both sides, in the same order, so no frame sends it.
        let (block_index, _) = self.block_index(block)?;
        self.record((block_index, page_index), hash, page, !zero)
    }

    /// Encodes every pending page into one frame appended to `out`. Returns the frame's length
    /// (0 and no frame when nothing was pending).
    pub fn finish_frame(&mut self, out: &mut Vec<u8>) -> Result<usize, EncodeError> {
        if self.pending.is_empty() {
            return Ok(0);
        }
        let count = self.pending.len();
        if self.config.query_destination {
            let mut questions: Vec<ContentHash> = self
                .pending
                .iter()
                .filter_map(|entry| match entry.tier {
                    PendingTier::Undecided {
                        hash, ask: true, ..
                    } if !self.destination_holds.contains(&hash) => Some(hash),
                    _ => None,
                })
                .collect();
            if !questions.is_empty() {
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
                if self.destination_holds.len() > self.config.mirror_page_limit {
                    self.destination_holds.clear();
                }
                self.destination_holds.extend(
                    questions
                        .iter()
                        .zip(&answers)
                        .filter(|(_, held)| **held)
                        .map(|(hash, _)| *hash),
                );
            }
        }

        self.body.clear();
        let mut previous_key: Option<(u32, u64)> = None;
        for entry in &self.pending {
            let tag_position = self.body.len();
            self.body.push(0);
            let mut tag = 0u8;
            if entry.first_use_of_block {
                tag |= TAG_NEW_BLOCK;
                let name = self.blocks.name(entry.block).as_bytes();
                self.body.push(name.len() as u8);
                self.body.extend_from_slice(name);
                put_varint(&mut self.body, entry.page_index);
            } else if previous_key.is_some_and(|(block, index)| {
                block == entry.block && index.checked_add(1) == Some(entry.page_index)
            }) {
                tag |= TAG_NEXT_PAGE;
            } else {
                put_varint(&mut self.body, u64::from(entry.block));
                put_varint(&mut self.body, entry.page_index);
            }
            previous_key = Some((entry.block, entry.page_index));

            let tier = match entry.tier {
                PendingTier::Zero => {
                    self.stats.zero_pages += 1;
                    TIER_ZERO
                }
                PendingTier::KnownFromTransfer(hash) => {
                    self.stats.known_from_transfer += 1;
                    self.body.extend_from_slice(hash.as_bytes());
                    TIER_KNOWN
                }
                PendingTier::KnownFromDestination(hash) => {
                    self.stats.known_from_destination += 1;
                    self.body.extend_from_slice(hash.as_bytes());
                    TIER_KNOWN
                }
                PendingTier::Undecided { hash, .. } if self.destination_holds.contains(&hash) => {
                    self.stats.known_from_destination += 1;
                    self.body.extend_from_slice(hash.as_bytes());
                    TIER_KNOWN
                }
                PendingTier::Undecided {
                    delta: Some((start, end)),
                    ..
                } => {
                    self.stats.delta_pages += 1;
                    put_varint(&mut self.body, (end - start) as u64);
                    self.body.extend_from_slice(&self.delta_data[start..end]);
                    TIER_DELTA
                }
                PendingTier::Undecided { literal_start, .. } => {
                    self.stats.literal_pages += 1;
                    self.body.extend_from_slice(
                        &self.literal_data[literal_start..literal_start + PAGE_SIZE],
                    );
                    TIER_LITERAL
                }
            };
            self.body[tag_position] = tag | tier;
        }
        self.stats.pages += count as u64;
        self.stats.input_bytes += (count * PAGE_SIZE) as u64;

        let started = Instant::now();
        let written = self
            .writer
            .write_frame(FrameKind::Pages, count as u32, &self.body, out)?;
        self.stats.compression_time += started.elapsed();
        self.stats.frames += 1;
        self.stats.frame_bytes += written as u64;

        self.pending.clear();
        self.literal_data.clear();
        self.delta_data.clear();
        Ok(written)
    }
}

/// Settings of a [`PageDecoder`].
#[derive(Clone, Debug)]
pub struct PageDecoderConfig {
    /// Most distinct page keys the mirror tracks; must equal the encoder's.
    pub mirror_page_limit: usize,
    /// Keep a copy of pages read from the local source. Without (`false`), the mirror records
    /// only their hash and reads them from the source again when a later page refers to them
    /// (as a known page or a delta base): for a source whose content cannot change or go while
    /// the transfer runs (an image's page index), it saves a page of memory for each.
    pub keep_local_content: bool,
}

impl Default for PageDecoderConfig {
    fn default() -> Self {
        Self {
            mirror_page_limit: PageEncoderConfig::default().mirror_page_limit,
            keep_local_content: true,
        }
    }
}

/// Decodes page frames back into pages, in order, resolving "known" pages from the mirror or
/// from `source` (the destination's chunk store).
pub struct PageDecoder<S: LocalContentSource> {
    source: S,
    keep_local_content: bool,
    mirror: PageMirror,
    blocks: BlockTable,
    reader: FrameReader,
    stats: PageStats,
}

impl<S: LocalContentSource> PageDecoder<S> {
    pub fn new(config: PageDecoderConfig, source: S) -> Result<Self, DecodeError> {
        Ok(Self {
            source,
            keep_local_content: config.keep_local_content,
            mirror: PageMirror::new(config.mirror_page_limit),
            blocks: BlockTable::default(),
            reader: FrameReader::new()?,
            stats: PageStats::default(),
        })
    }

    pub fn stats(&self) -> &PageStats {
        &self.stats
    }

    /// The decoder's half of [`PageEncoder::observe_page`].
    pub fn observe_page(
        &mut self,
        block: &str,
        offset: u64,
        page: &Page,
    ) -> Result<(), DecodeError> {
        if block.is_empty() || block.len() > MAX_BLOCK_NAME_LENGTH {
            return Err(DecodeError::Malformed {
                what: "observed block name",
                offset: 0,
                reason: "must be 1 to 255 bytes",
            });
        }
        if !offset.is_multiple_of(PAGE_SIZE as u64) {
            return Err(DecodeError::Malformed {
                what: "observed page offset",
                offset: 0,
                reason: "not page aligned",
            });
        }
        let block_index = match self.blocks.by_name.get(block) {
            Some(&index) => index,
            None => register_block(&mut self.blocks, block.to_owned(), 0)?,
        };
        let hash = ContentHash::of_page(page);
        self.mirror
            .record((block_index, offset / PAGE_SIZE as u64), hash, Some(page))
            .map_err(|limit| DecodeError::MirrorFull { limit })
    }

    /// Decodes one whole frame, calling `emit(block, offset, page, hash)` for each page in
    /// order (`hash`: the page's [`ContentHash`], which the decoder computes or verifies anyway).
    /// Returns the number of pages.
    pub fn decode_frame(
        &mut self,
        frame: &[u8],
        mut emit: impl FnMut(&str, u64, &Page, &ContentHash),
    ) -> Result<usize, DecodeError> {
        let Self {
            source,
            keep_local_content,
            mirror,
            blocks,
            reader,
            stats,
        } = self;
        let max_body = MAX_PAGES_PER_FRAME * MAX_PAGE_ENTRY_LENGTH;
        let (header, body) = reader.open(frame, FrameKind::Pages, MAX_PAGES_PER_FRAME, max_body)?;
        let declared = header.entry_count as usize;
        if body.len() > declared * MAX_PAGE_ENTRY_LENGTH {
            return Err(DecodeError::LimitExceeded {
                what: "page frame body length",
                offset: 10,
                value: body.len() as u64,
                limit: (declared * MAX_PAGE_ENTRY_LENGTH) as u64,
            });
        }
        let mut body = Reader::new(body);
        let mut previous_key: Option<(u32, u64)> = None;
        let mut page: Box<Page> = Box::new([0u8; PAGE_SIZE]);
        let mut decoded = 0usize;
        while !body.is_empty() {
            if decoded == declared {
                return Err(DecodeError::EntryCountMismatch {
                    declared,
                    actual: decoded + 1,
                });
            }
            let tag_offset = body.position();
            let tag = body.u8("page entry tag")?;
            if tag & !TAG_KNOWN_BITS != 0 || tag & TAG_NEXT_PAGE != 0 && tag & TAG_NEW_BLOCK != 0 {
                return Err(DecodeError::Malformed {
                    what: "page entry tag",
                    offset: tag_offset,
                    reason: "unknown bits set",
                });
            }
            let key = if tag & TAG_NEXT_PAGE != 0 {
                match previous_key {
                    Some((block, index)) if index < u64::MAX / PAGE_SIZE as u64 => {
                        (block, index + 1)
                    }
                    _ => {
                        return Err(DecodeError::Malformed {
                            what: "page entry key",
                            offset: tag_offset,
                            reason: "next-page entry without a previous page in the frame",
                        });
                    }
                }
            } else {
                let block = if tag & TAG_NEW_BLOCK != 0 {
                    let name_offset = body.position();
                    let length = body.u8("block name length")? as usize;
                    let name = body.take(length, "block name")?;
                    let name = std::str::from_utf8(name).map_err(|_| DecodeError::Malformed {
                        what: "block name",
                        offset: name_offset,
                        reason: "not utf-8",
                    })?;
                    if name.is_empty() {
                        return Err(DecodeError::Malformed {
                            what: "block name",
                            offset: name_offset,
                            reason: "empty",
                        });
                    }
                    if blocks.by_name.contains_key(name) {
                        return Err(DecodeError::Malformed {
                            what: "block name",
                            offset: name_offset,
                            reason: "block announced twice",
                        });
                    }
                    register_block(blocks, name.to_owned(), name_offset)?
                } else {
                    let index_offset = body.position();
                    let index = body.varint("block index")?;
                    if index >= blocks.names.len() as u64 {
                        return Err(DecodeError::LimitExceeded {
                            what: "block index",
                            offset: index_offset,
                            value: index,
                            limit: blocks.names.len() as u64,
                        });
                    }
                    index as u32
                };
                let index_offset = body.position();
                let page_index = body.varint("page index")?;
                if page_index > u64::MAX / PAGE_SIZE as u64 {
                    return Err(DecodeError::LimitExceeded {
                        what: "page index",
                        offset: index_offset,
                        value: page_index,
                        limit: u64::MAX / PAGE_SIZE as u64,
                    });
                }
                (block, page_index)
            };
            previous_key = Some(key);

            // Whether the page's content came from `source` (kept only if asked).
            let mut from_source = false;
            let hash = match tag & TIER_MASK {
                TIER_ZERO => {
                    page.fill(0);
                    stats.zero_pages += 1;
                    ContentHash::of_zero_page()
                }
                TIER_KNOWN => {
                    let hash = body.hash("known page hash")?;
                    if let Some(known) = mirror.page_for_hash(&hash) {
                        page.copy_from_slice(known);
                        stats.known_from_transfer += 1;
                    } else {
                        let content =
                            crate::hash::verified_content(hash, PAGE_SIZE, source.content(&hash))?;
                        page.copy_from_slice(&content);
                        from_source = true;
                        if mirror.contains_hash(&hash) {
                            // Sent earlier, read back rather than kept.
                            stats.known_from_transfer += 1;
                        } else {
                            stats.known_from_destination += 1;
                        }
                    }
                    hash
                }
                TIER_DELTA => {
                    let length = body.length("delta length", PAGE_SIZE * 2)?;
                    let delta = body.take(length, "delta")?;
                    let missing = || DecodeError::DeltaWithoutBase {
                        block: blocks.name(key.0).to_owned(),
                        offset: key.1 * PAGE_SIZE as u64,
                    };
                    let base = *mirror.by_key.get(&key).ok_or_else(missing)?;
                    match mirror.page_for_hash(&base) {
                        Some(previous) => page.copy_from_slice(previous),
                        None => {
                            // A page read from the source and not kept: read it again.
                            let content = crate::hash::verified_content(
                                base,
                                PAGE_SIZE,
                                source.content(&base),
                            )?;
                            page.copy_from_slice(&content);
                        }
                    }
                    apply_delta(&mut page, delta)?;
                    stats.delta_pages += 1;
                    ContentHash::of(&page[..])
                }
                _ => {
                    let literal = body.take(PAGE_SIZE, "literal page")?;
                    page.copy_from_slice(literal);
                    stats.literal_pages += 1;
                    ContentHash::of(&page[..])
                }
            };
            let kept = (!from_source || *keep_local_content).then_some(&*page);
            mirror
                .record(key, hash, kept)
                .map_err(|limit| DecodeError::MirrorFull { limit })?;
            emit(blocks.name(key.0), key.1 * PAGE_SIZE as u64, &page, &hash);
            decoded += 1;
        }
        if decoded != declared {
            return Err(DecodeError::EntryCountMismatch {
                declared,
                actual: decoded,
            });
        }
        stats.pages += decoded as u64;
        stats.input_bytes += (decoded * PAGE_SIZE) as u64;
        stats.frames += 1;
        stats.frame_bytes += frame.len() as u64;
        Ok(decoded)
    }
}

fn register_block(
    blocks: &mut BlockTable,
    name: String,
    offset: usize,
) -> Result<u32, DecodeError> {
    if blocks.names.len() >= MAX_BLOCKS {
        return Err(DecodeError::LimitExceeded {
            what: "block count",
            offset,
            value: blocks.names.len() as u64 + 1,
            limit: MAX_BLOCKS as u64,
        });
    }
    let index = blocks.names.len() as u32;
    blocks.by_name.insert(name.clone(), index);
    blocks.names.push(name);
    Ok(index)
}
