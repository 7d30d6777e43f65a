//! The 4 KiB pages of a disk image both hosts hold, for the page codec's "already at the
//! destination" tier.
//!
//! A guest's RAM holds much of its disk: the page cache keeps what it read, 4 KiB-aligned to the
//! disk's offsets. A VM moving with a local disk has a base image that the destination already
//! holds (the migration requires it), so RAM pages equal to a 4 KiB-aligned block of that image
//! need not cross the link: the destination reads them from its own copy. Both sides index the
//! image's guest-visible content (a raw view of it) by BLAKE3 hash. The source answers the
//! encoder's "which of these does the destination hold?" from its own index (same image, same
//! content: no round trip); the destination serves the decoder's reads by hash from its copy.
//! The stream checksum at the end still proves the rebuilt stream identical.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use novacron_codec::{
    BoxError, ContentHash, ContentHashBuildHasher, LocalContentSource, PAGE_SIZE, RemoteHashQuery,
    is_zero,
};

/// Reads of the raw view while indexing.
const INDEX_READ_SIZE: usize = 1 << 20;

/// Where each distinct non-zero 4 KiB block of a raw image is (its first occurrence).
pub struct ImagePageIndex {
    file: std::fs::File,
    offsets: HashMap<ContentHash, u64, ContentHashBuildHasher>,
    blocks: u64,
}

impl std::fmt::Debug for ImagePageIndex {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ImagePageIndex")
            .field("blocks", &self.blocks)
            .field("distinct", &self.offsets.len())
            .finish()
    }
}

impl ImagePageIndex {
    /// Indexes the raw image at `path` (its guest-visible bytes: a raw image, or a qcow2
    /// converted to raw). Keeps the file open to serve reads. A trailing partial block is
    /// ignored.
    pub fn build(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::File::open(path)?;
        let mut reader = std::io::BufReader::with_capacity(INDEX_READ_SIZE, &file);
        let mut offsets = HashMap::with_hasher(ContentHashBuildHasher::default());
        let mut block = vec![0u8; PAGE_SIZE];
        let mut offset = 0u64;
        let mut blocks = 0u64;
        loop {
            match reader.read_exact(&mut block) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(error) => return Err(error),
            }
            blocks += 1;
            if !is_zero(&block) {
                offsets.entry(ContentHash::of(&block)).or_insert(offset);
            }
            offset += PAGE_SIZE as u64;
        }
        drop(reader);
        Ok(Self {
            file,
            offsets,
            blocks,
        })
    }

    /// Whether a block with this content is in the image.
    pub fn contains(&self, hash: &ContentHash) -> bool {
        self.offsets.contains_key(hash)
    }

    /// Distinct non-zero blocks indexed.
    pub fn distinct_blocks(&self) -> usize {
        self.offsets.len()
    }

    /// Blocks read (zero ones included).
    pub fn blocks(&self) -> u64 {
        self.blocks
    }
}

/// The destination's view: blocks read back from its copy of the image by hash.
impl LocalContentSource for ImagePageIndex {
    fn content(&self, hash: &ContentHash) -> Result<Option<Vec<u8>>, BoxError> {
        let Some(&offset) = self.offsets.get(hash) else {
            return Ok(None);
        };
        let mut block = vec![0u8; PAGE_SIZE];
        self.file.read_exact_at(&mut block, offset)?;
        Ok(Some(block))
    }
}

/// The proxy codec's view of an index, shared: on the source, "the destination holds every
/// block of the image" (no round trip: both hold the same image); on the destination, the
/// blocks read back by hash. Without an index: nothing is held.
#[derive(Clone, Debug, Default)]
pub struct SharedImagePages(pub Option<std::sync::Arc<ImagePageIndex>>);

impl RemoteHashQuery for SharedImagePages {
    fn which_of(&mut self, hashes: &[ContentHash]) -> Result<Vec<bool>, BoxError> {
        Ok(match &self.0 {
            Some(index) => hashes.iter().map(|hash| index.contains(hash)).collect(),
            None => vec![false; hashes.len()],
        })
    }
}

impl LocalContentSource for SharedImagePages {
    fn content(&self, hash: &ContentHash) -> Result<Option<Vec<u8>>, BoxError> {
        match &self.0 {
            Some(index) => index.content(hash),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(blocks: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("image.raw");
        let mut bytes = Vec::new();
        for &fill in blocks {
            bytes.extend(std::iter::repeat_n(fill, PAGE_SIZE));
        }
        bytes.extend_from_slice(&[9u8; 100]); // a partial block at the end: ignored
        std::fs::write(&path, bytes).expect("write image");
        (dir, path)
    }

    #[test]
    fn indexes_distinct_non_zero_blocks_and_reads_them_back() {
        let (_dir, path) = image(&[1, 0, 2, 1, 3]);
        let index = ImagePageIndex::build(&path).expect("index");
        assert_eq!(index.blocks(), 5);
        assert_eq!(
            index.distinct_blocks(),
            3,
            "zeros skipped, the repeat counted once"
        );
        let two = ContentHash::of(&[2u8; PAGE_SIZE]);
        assert!(index.contains(&two));
        assert_eq!(index.content(&two).unwrap(), Some(vec![2u8; PAGE_SIZE]));
        let absent = ContentHash::of(&[7u8; PAGE_SIZE]);
        assert_eq!(index.content(&absent).unwrap(), None);
        let partial = ContentHash::of(&[9u8; 100]);
        assert!(!index.contains(&partial));
        let mut shared = SharedImagePages(Some(std::sync::Arc::new(index)));
        assert_eq!(shared.which_of(&[two, absent]).unwrap(), vec![true, false]);
        let mut none = SharedImagePages::default();
        assert_eq!(none.which_of(&[two]).unwrap(), vec![false]);
    }
}
