//! Errors of the codec. Decoding untrusted input only ever fails with a [`DecodeError`]; it never
//! panics. Messages are lowercase and name the field and offset that failed.

use crate::hash::{BoxError, ContentHash};

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated {what} at offset {offset}: needed {needed} bytes, {available} available")]
    Truncated {
        what: &'static str,
        offset: usize,
        needed: usize,
        available: usize,
    },

    #[error("malformed {what} at offset {offset}: {reason}")]
    Malformed {
        what: &'static str,
        offset: usize,
        reason: &'static str,
    },

    #[error("{what} at offset {offset} is {value}, above the limit of {limit}")]
    LimitExceeded {
        what: &'static str,
        offset: usize,
        value: u64,
        limit: u64,
    },

    #[error("frame has version {version}; this build reads version {supported}")]
    UnsupportedVersion { version: u8, supported: u8 },

    #[error("frame is of kind {found}, expected kind {expected}")]
    WrongFrameKind { found: u8, expected: u8 },

    #[error("frame body failed to decompress")]
    Decompression(#[source] std::io::Error),

    #[error("frame body decompressed to {actual} bytes, its header declared {declared}")]
    BodyLengthMismatch { declared: usize, actual: usize },

    #[error("frame declares {declared} entries but its body holds {actual}")]
    EntryCountMismatch { declared: usize, actual: usize },

    #[error("content {hash:?} is neither earlier in this transfer nor in the local store")]
    UnknownHash { hash: ContentHash },

    #[error("local content for {hash:?} is {actual} bytes, the frame needs {expected}")]
    ContentLengthMismatch {
        hash: ContentHash,
        expected: usize,
        actual: usize,
    },

    #[error("local content for {expected:?} hashes to {actual:?}")]
    HashMismatch {
        expected: ContentHash,
        actual: ContentHash,
    },

    #[error("delta for page {block}+{offset:#x} has no previous version to apply to")]
    DeltaWithoutBase { block: String, offset: u64 },

    #[error("page mirror is full ({limit} pages); raise the mirror page limit on both sides")]
    MirrorFull { limit: usize },

    #[error("reading local content {hash:?}")]
    LocalSource {
        hash: ContentHash,
        #[source]
        source: BoxError,
    },

    #[error("storing a received chunk")]
    Repository(#[source] BoxError),

    #[error("writing decoded output")]
    Output(#[source] std::io::Error),
}

/// Why encoding failed. Encoding fails only on environment problems (the hash query, the
/// compressor, the input reader) or on caller mistakes, never because of page contents.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("asking the destination which hashes it holds")]
    HashQuery(#[source] BoxError),

    #[error("the destination answered {answers} times for {questions} hashes")]
    HashQueryAnswerCount { questions: usize, answers: usize },

    #[error("compressing a frame body at zstd level {level}")]
    Compression {
        level: i32,
        #[source]
        source: std::io::Error,
    },

    #[error("reading input at offset {offset}")]
    Input {
        offset: u64,
        #[source]
        source: std::io::Error,
    },

    #[error("writing an encoded frame")]
    Output(#[source] BoxError),

    #[error("page offset {offset:#x} in block {block} is not a multiple of the page size")]
    UnalignedOffset { block: String, offset: u64 },

    #[error("block name {block:?} must be 1 to 255 bytes")]
    BadBlockName { block: String },

    #[error("too many distinct blocks (limit {limit})")]
    TooManyBlocks { limit: usize },

    #[error("page mirror is full ({limit} pages); raise the mirror page limit on both sides")]
    MirrorFull { limit: usize },

    #[error("a page must be recorded without sending only when no page is pending in a frame")]
    PagesPending,

    #[error("the frame already holds {pages} pages; finish it before pushing more")]
    FrameFull { pages: usize },
}
