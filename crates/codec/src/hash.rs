//! Content hashes (BLAKE3) and the two interfaces through which the codec learns what the
//! destination already holds: [`RemoteHashQuery`] on the sending side ("which of these hashes do
//! you have?", answered by the transport's control channel) and [`LocalContentSource`] /
//! [`ChunkRepository`] on the receiving side (the chunk store, or an in-memory map in tests).
//!
//! This module does no IO of its own.

use std::collections::HashMap;
use std::fmt;
use std::sync::OnceLock;

/// An error from an implementation of one of the traits below (transport or store).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The BLAKE3 hash of a page, block or chunk.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentHash(pub [u8; 32]);

impl ContentHash {
    /// Hashes `data` with BLAKE3.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// The hash of a 4 KiB page of zeros, computed once.
    pub fn of_zero_page() -> Self {
        static ZERO_PAGE_HASH: OnceLock<ContentHash> = OnceLock::new();
        *ZERO_PAGE_HASH.get_or_init(|| ContentHash::of(&[0u8; crate::PAGE_SIZE]))
    }

    /// The hash of a 4 KiB page: a page of zeros is recognised without hashing it.
    pub fn of_page(page: &[u8]) -> Self {
        if crate::page::is_zero(page) && page.len() == crate::PAGE_SIZE {
            Self::of_zero_page()
        } else {
            Self::of(page)
        }
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in &self.0[..8] {
            write!(formatter, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in &self.0 {
            write!(formatter, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// Asked by an encoder, once per frame, which content the destination already holds (its chunk
/// store, including the 4 KiB-aligned index of its images). The transport implements this over its
/// control channel; tests and benchmarks use a local [`crate::ChunkStore`] or a [`MemoryRepository`].
pub trait RemoteHashQuery {
    /// Returns one answer per hash, in order. A wrong "yes" makes the destination fail to decode
    /// (it reports the unknown hash); a wrong "no" only costs bytes.
    fn which_of(&mut self, hashes: &[ContentHash]) -> Result<Vec<bool>, BoxError>;

    /// Whether the destination holds `hash`, when this query knows without asking anyone (an
    /// index both sides hold): the encoder then settles the page as it is pushed, with no copy
    /// of it kept for the frame. `None` (the default): ask with the frame's other pages.
    fn holds_locally(&mut self, _hash: &ContentHash) -> Option<bool> {
        None
    }
}

impl<T: RemoteHashQuery + ?Sized> RemoteHashQuery for &mut T {
    fn which_of(&mut self, hashes: &[ContentHash]) -> Result<Vec<bool>, BoxError> {
        (**self).which_of(hashes)
    }

    fn holds_locally(&mut self, hash: &ContentHash) -> Option<bool> {
        (**self).holds_locally(hash)
    }
}

/// A destination that holds nothing: every answer is "no".
#[derive(Debug, Default, Clone, Copy)]
pub struct NothingRemote;

impl RemoteHashQuery for NothingRemote {
    fn which_of(&mut self, hashes: &[ContentHash]) -> Result<Vec<bool>, BoxError> {
        Ok(vec![false; hashes.len()])
    }
}

/// Content the receiving side can read by hash (its chunk store).
pub trait LocalContentSource {
    /// The bytes whose BLAKE3 hash is `hash`, if held. Decoders verify the hash themselves.
    fn content(&self, hash: &ContentHash) -> Result<Option<Vec<u8>>, BoxError>;
}

impl<T: LocalContentSource + ?Sized> LocalContentSource for &T {
    fn content(&self, hash: &ContentHash) -> Result<Option<Vec<u8>>, BoxError> {
        (**self).content(hash)
    }
}

impl<T: LocalContentSource + ?Sized> LocalContentSource for &mut T {
    fn content(&self, hash: &ContentHash) -> Result<Option<Vec<u8>>, BoxError> {
        (**self).content(hash)
    }
}

/// A receiving side that holds nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NothingLocal;

impl LocalContentSource for NothingLocal {
    fn content(&self, _hash: &ContentHash) -> Result<Option<Vec<u8>>, BoxError> {
        Ok(None)
    }
}

/// Where a chunk decoder keeps the chunks it receives, so that later references to them in the
/// same transfer (and later transfers) resolve.
pub trait ChunkRepository: LocalContentSource {
    /// Keeps `data` (whose hash is `hash`). Must be visible to [`LocalContentSource::content`]
    /// at once, even before [`ChunkRepository::end_of_frame`].
    fn remember(&mut self, hash: ContentHash, data: &[u8]) -> Result<(), BoxError>;

    /// Called after each decoded frame: a good moment to make remembered chunks durable.
    fn end_of_frame(&mut self) -> Result<(), BoxError> {
        Ok(())
    }
}

/// An in-memory content map: a test double for the chunk store on both sides (it answers
/// [`RemoteHashQuery`] too).
#[derive(Debug, Default, Clone)]
pub struct MemoryRepository {
    contents: HashMap<ContentHash, Vec<u8>>,
}

impl MemoryRepository {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `data` and returns its hash.
    pub fn insert(&mut self, data: &[u8]) -> ContentHash {
        let hash = ContentHash::of(data);
        self.contents.entry(hash).or_insert_with(|| data.to_vec());
        hash
    }

    pub fn len(&self) -> usize {
        self.contents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.contents.is_empty()
    }

    pub fn contains(&self, hash: &ContentHash) -> bool {
        self.contents.contains_key(hash)
    }
}

impl LocalContentSource for MemoryRepository {
    fn content(&self, hash: &ContentHash) -> Result<Option<Vec<u8>>, BoxError> {
        Ok(self.contents.get(hash).cloned())
    }
}

impl RemoteHashQuery for MemoryRepository {
    fn which_of(&mut self, hashes: &[ContentHash]) -> Result<Vec<bool>, BoxError> {
        Ok(hashes
            .iter()
            .map(|hash| self.contents.contains_key(hash))
            .collect())
    }
}

impl ChunkRepository for MemoryRepository {
    fn remember(&mut self, hash: ContentHash, data: &[u8]) -> Result<(), BoxError> {
        self.contents.entry(hash).or_insert_with(|| data.to_vec());
        Ok(())
    }
}

/// A `Hasher` for maps keyed by [`ContentHash`]: the key is already uniformly random, so its
/// first eight bytes are a good hash and far cheaper than SipHash.
#[derive(Default)]
pub struct ContentHashHasher(u64);

impl std::hash::Hasher for ContentHashHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as a length prefix (write_usize) followed by the 32 bytes.
        let mut prefix = [0u8; 8];
        let take = bytes.len().min(8);
        prefix[..take].copy_from_slice(&bytes[..take]);
        self.0 ^= u64::from_le_bytes(prefix);
    }

    fn write_usize(&mut self, _length: usize) {}
}

/// A `HashMap` hasher for [`ContentHash`] keys: they are already uniformly random.
pub type ContentHashBuildHasher = std::hash::BuildHasherDefault<ContentHashHasher>;

/// Checks content a destination looked up by hash before a decoder uses it: present, of the
/// expected length, and really hashing to `hash` (a damaged local store must not corrupt a VM).
pub(crate) fn verified_content(
    hash: ContentHash,
    expected_length: usize,
    looked_up: Result<Option<Vec<u8>>, BoxError>,
) -> Result<Vec<u8>, crate::error::DecodeError> {
    use crate::error::DecodeError;
    let content = looked_up
        .map_err(|error| DecodeError::LocalSource {
            hash,
            source: error,
        })?
        .ok_or(DecodeError::UnknownHash { hash })?;
    if content.len() != expected_length {
        return Err(DecodeError::ContentLengthMismatch {
            hash,
            expected: expected_length,
            actual: content.len(),
        });
    }
    let actual = ContentHash::of(&content);
    if actual != hash {
        return Err(DecodeError::HashMismatch {
            expected: hash,
            actual,
        });
    }
    Ok(content)
}
