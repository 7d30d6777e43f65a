//! NovaCron's codec (HDE in the design documents): turns guest pages and disk-image chunks into
//! as few bytes on the wire as the destination's existing content allows, and back.
//!
//! - [`page`]: fixed 4 KiB pages keyed by (QEMU RAM block name, offset), record by record, with a
//!   mirror of pages already sent on both sides; tiers zero → known hash → delta → zstd.
//! - [`chunk`]: content-defined chunks (FastCDC 2020) for disk images and files; tiers zero →
//!   known hash → known 4 KiB blocks inside a new chunk → zstd.
//! - [`frame`]: the versioned, length-delimited frame both use; batches many pages or chunks
//!   into one zstd-compressed body.
//! - [`store`]: the destination's content-addressed chunk store (redb index + pack files), with
//!   a 4 KiB-aligned index of every stored image.
//! - [`level`]: the zstd level from the measured link rate and compression speed.
//!
//! Typical use. Sender of a migration: one [`PageEncoder`] per migration, `push_page(block,
//! offset, page)` for every RAM page record, `finish_frame` when it reports the frame full or
//! when the proxy must flush (end of a RAM section), frames handed to the transport in order.
//! Receiver: one [`PageDecoder`] over the local [`ChunkStore`], `decode_frame` per frame in the
//! same order. Images: [`ChunkEncoder::encode_reader`] on the sender with the transport's
//! [`RemoteHashQuery`], [`ChunkDecoder`] over a [`StoreRepository`] on the receiver, then
//! [`ChunkStore::put_image`] of the received file so the next transfer finds it.
//!
//! Frames depend on earlier frames of the same transfer (the page mirror, chunks sent earlier):
//! they must reach the decoder complete, once, and in order, which the transport guarantees. A
//! transfer that resumes after a reconnect continues with the same encoder and decoder; one that
//! restarts from scratch needs new ones on both sides.
//!
//! The codec does no network IO: the transport carries its frames and answers its
//! "which of these hashes do you hold?" questions through [`RemoteHashQuery`]. Decoding never
//! panics on input and never allocates beyond the limits in each decoder's configuration.

pub mod chunk;
pub mod delta;
pub mod error;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod hash;
pub mod level;
pub mod page;
pub mod store;
mod wire;

/// Size of a guest page and of an aligned block.
pub const PAGE_SIZE: usize = 4096;

pub use chunk::{
    ChunkBoundary, ChunkDecoder, ChunkDecoderConfig, ChunkEncoder, ChunkEncoderConfig, ChunkStats,
    ChunkingParameters, DEFAULT_CHUNKING, chunk_boundaries,
};
pub use error::{DecodeError, EncodeError};
pub use frame::{
    FRAME_HEADER_LENGTH, FRAME_VERSION, FrameHeader, frame_length, parse_frame_header,
};
pub use hash::{
    BoxError, ChunkRepository, ContentHash, ContentHashBuildHasher, LocalContentSource,
    MemoryRepository, NothingLocal, NothingRemote, RemoteHashQuery,
};
pub use level::{LevelMeter, LevelProfile, choose_zstd_level};
pub use page::{
    Page, PageDecoder, PageDecoderConfig, PageEncoder, PageEncoderConfig, PageStats, is_zero,
};
pub use store::{
    ChunkPin, ChunkStore, CollectionSummary, ImageManifest, ImageSummary, STORE_FORMAT_VERSION,
    StoreError, StoreRepository,
};
