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
//!
//! The same holds for the files of a direct kernel boot ([`HeldFile`]): QEMU loads the kernel
//! image into guest RAM, and the compressed kernel stays there after the guest booted (two
//! 4 KiB-aligned copies: where QEMU put it and where the kernel moved it to unpack itself),
//! about 25 MB of incompressible pages in a small Debian guest, and so do the text and read-only
//! data of the kernel it unpacked. Both hosts need those files to run the VM; a file (or the
//! kernel unpacked from it) counts as held once the destination reported the same identity.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use novacron_codec::{
    BoxError, ContentHash, ContentHashBuildHasher, LocalContentSource, PAGE_SIZE, RemoteHashQuery,
    is_zero,
};

use crate::delivered::DeliveredPages;

/// Reads of the image file while indexing.
const INDEX_READ_SIZE: usize = 1 << 20;

/// Magic of a saved index (format 1: see [`ImagePageIndex::save`]).
const SAVED_MAGIC: &[u8; 8] = b"NCPGIX01";
const SAVED_HEADER: usize = 32;
const SAVED_ENTRY: usize = 32 + 8;
const SAVED_TRAILER: usize = 32;

/// A range of the guest-visible disk stored as is (uncompressed) in the image file, as
/// `qemu-img map` reports it. A raw image is one range: the whole file at offset 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredRange {
    pub guest_offset: u64,
    pub file_offset: u64,
    pub length: u64,
}

/// Where each distinct non-zero 4 KiB block of an image's guest-visible content is stored in the
/// image file (its first occurrence). Blocks are those at 4 KiB-aligned guest offsets.
pub struct ImagePageIndex {
    file: std::fs::File,
    file_length: u64,
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
        let length = std::fs::metadata(path)?.len();
        Self::build_from_ranges(
            path,
            &[StoredRange {
                guest_offset: 0,
                file_offset: 0,
                length,
            }],
            length,
        )
    }

    /// Indexes the image file at `path` whose guest-visible disk of `guest_length` bytes has
    /// its data in `ranges` (the rest reads as zeros or is not in this file). A 4 KiB guest block
    /// is indexed when it lies inside one range. Keeps the file open to serve reads.
    pub fn build_from_ranges(
        path: &Path,
        ranges: &[StoredRange],
        guest_length: u64,
    ) -> std::io::Result<Self> {
        Self::index_file(std::fs::File::open(path)?, path, ranges, guest_length)
    }

    /// Indexes an open file whose whole content the caller already holds in `bytes` (read
    /// from it, or just written to it): no second read. Keeps the file open to serve reads.
    pub fn build_from_bytes(file: std::fs::File, bytes: &[u8]) -> std::io::Result<Self> {
        let file_length = file.metadata()?.len();
        if file_length != bytes.len() as u64 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "the file holds {file_length} bytes, the content given {}",
                    bytes.len()
                ),
            ));
        }
        let mut offsets = HashMap::with_hasher(ContentHashBuildHasher::default());
        index_blocks(&mut offsets, bytes, 0);
        Ok(Self {
            file,
            file_length,
            offsets,
            blocks: file_length / PAGE_SIZE as u64,
        })
    }

    fn index_file(
        file: std::fs::File,
        path: &Path,
        ranges: &[StoredRange],
        guest_length: u64,
    ) -> std::io::Result<Self> {
        let file_length = file.metadata()?.len();
        let page = PAGE_SIZE as u64;
        let mut offsets = HashMap::with_hasher(ContentHashBuildHasher::default());
        let mut buffer = vec![0u8; INDEX_READ_SIZE];
        for range in ranges {
            let first = range.guest_offset.div_ceil(page) * page;
            let end = (range.guest_offset + range.length) / page * page;
            let mut guest = first;
            while guest < end {
                let length = (end - guest).min(INDEX_READ_SIZE as u64) as usize;
                let at = range.file_offset + (guest - range.guest_offset);
                if at + length as u64 > file_length {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "guest range at {guest} maps past the end of {} ({file_length} bytes)",
                            path.display()
                        ),
                    ));
                }
                file.read_exact_at(&mut buffer[..length], at)?;
                index_blocks(&mut offsets, &buffer[..length], at);
                guest += length as u64;
            }
        }
        Ok(Self {
            file,
            file_length,
            offsets,
            blocks: guest_length / page,
        })
    }

    /// Writes the index to `path` (through a temporary file renamed into place, synced), so
    /// the next use loads it instead of reading the image again. Format 1: the magic
    /// `NCPGIX01`; the image file's length, the guest blocks and the entry count (u64 LE
    /// each); per entry the block's BLAKE3 hash and its offset in the image file (u64 LE); then
    /// the BLAKE3 hash of everything before.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let mut bytes =
            Vec::with_capacity(SAVED_HEADER + self.offsets.len() * SAVED_ENTRY + SAVED_TRAILER);
        bytes.extend_from_slice(SAVED_MAGIC);
        bytes.extend_from_slice(&self.file_length.to_le_bytes());
        bytes.extend_from_slice(&self.blocks.to_le_bytes());
        bytes.extend_from_slice(&(self.offsets.len() as u64).to_le_bytes());
        for (hash, offset) in &self.offsets {
            bytes.extend_from_slice(&hash.0);
            bytes.extend_from_slice(&offset.to_le_bytes());
        }
        let trailer = blake3::hash(&bytes);
        bytes.extend_from_slice(trailer.as_bytes());
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(".tmp");
        let temporary = std::path::PathBuf::from(temporary);
        let written = (|| {
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&temporary, path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        written
    }

    /// Loads an index [`ImagePageIndex::save`] wrote for the image file at `image`. Refuses
    /// (`InvalidData`) a damaged or truncated index, one of another format, and one written for
    /// a file of another length.
    pub fn load(path: &Path, image: &Path) -> std::io::Result<Self> {
        let invalid = |reason: String| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("page index {}: {reason}", path.display()),
            )
        };
        let bytes = std::fs::read(path)?;
        if bytes.len() < SAVED_HEADER + SAVED_TRAILER || &bytes[..8] != SAVED_MAGIC {
            return Err(invalid("not a page index of format 1".into()));
        }
        let (body, trailer) = bytes.split_at(bytes.len() - SAVED_TRAILER);
        if blake3::hash(body).as_bytes() != trailer {
            return Err(invalid("checksum mismatch (damaged)".into()));
        }
        let word = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"));
        let (file_length, blocks, count) = (word(8), word(16), word(24));
        let entries = &body[SAVED_HEADER..];
        if count.checked_mul(SAVED_ENTRY as u64) != Some(entries.len() as u64) {
            return Err(invalid(format!("{count} entries do not fill its length")));
        }
        let file = std::fs::File::open(image)?;
        let actual = file.metadata()?.len();
        if actual != file_length {
            return Err(invalid(format!(
                "written for a file of {file_length} bytes, {} has {actual}",
                image.display()
            )));
        }
        let mut offsets =
            HashMap::with_capacity_and_hasher(count as usize, ContentHashBuildHasher::default());
        for entry in entries.chunks_exact(SAVED_ENTRY) {
            let hash = ContentHash(entry[..32].try_into().expect("32 bytes"));
            let offset = u64::from_le_bytes(entry[32..].try_into().expect("8 bytes"));
            if offset
                .checked_add(PAGE_SIZE as u64)
                .is_none_or(|end| end > file_length)
            {
                return Err(invalid(format!(
                    "an offset ({offset}) is past the image's end"
                )));
            }
            offsets.insert(hash, offset);
        }
        Ok(Self {
            file,
            file_length,
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

    /// The guest-visible disk's blocks (zero ones included).
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

/// A file both hosts may hold (a direct kernel boot's kernel or initrd): the index of its 4 KiB
/// blocks at 4 KiB-aligned offsets and of what the guest unpacks from it (a bzImage's kernel,
/// [`crate::kernel_image`]; an initramfs's files, [`crate::initramfs`]), each under an identity
/// the two hosts compare: the file's BLAKE3 (hex), and the same followed by
/// [`UNPACKED_SUFFIX`] for what it unpacks to.
#[derive(Debug)]
pub struct HeldFile {
    parts: Vec<(String, Arc<ImagePageIndex>)>,
}

/// Indexes the non-zero 4 KiB blocks of `bytes`, which start at `file_offset` in the file;
/// the first offset of a content wins.
fn index_blocks(
    offsets: &mut HashMap<ContentHash, u64, ContentHashBuildHasher>,
    bytes: &[u8],
    file_offset: u64,
) {
    for (index, block) in bytes.chunks_exact(PAGE_SIZE).enumerate() {
        if !is_zero(block) {
            offsets
                .entry(ContentHash::of(block))
                .or_insert(file_offset + (index * PAGE_SIZE) as u64);
        }
    }
}

/// Appended to a file's digest to name what the guest unpacks from it (a kernel, an
/// initramfs's files).
pub const UNPACKED_SUFFIX: &str = "/unpacked";

impl HeldFile {
    /// Hashes and indexes the file at `path` (read once), and what the guest unpacks from it
    /// into its RAM, written to an unnamed temporary file (removed with the index) and indexed
    /// too: a bzImage's kernel ([`crate::kernel_image`]), or an initramfs's files laid out as
    /// its page cache holds them ([`crate::initramfs`]). A file that does not unpack is logged
    /// and left out: its own blocks are still held.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        use std::io::{Read, Write};
        let mut file = std::fs::File::open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let digest = blake3::hash(&bytes).to_hex().to_string();
        let mut parts = vec![(
            digest.clone(),
            Arc::new(ImagePageIndex::build_from_bytes(file, &bytes)?),
        )];
        let unpacked = match crate::kernel_image::unpack_bzimage(&bytes) {
            Ok(None) => crate::initramfs::file_blocks(&bytes),
            other => other,
        };
        match unpacked {
            Ok(Some(unpacked)) if !unpacked.is_empty() => {
                let mut file = tempfile::tempfile()?;
                file.write_all(&unpacked)?;
                let index = ImagePageIndex::build_from_bytes(file, &unpacked)?;
                parts.push((format!("{digest}{UNPACKED_SUFFIX}"), Arc::new(index)));
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "kernel or initramfs not unpacked; RAM pages equal to its contents are sent")
            }
        }
        Ok(Self { parts })
    }

    /// What the destination reports, and the source compares.
    pub fn identities(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().map(|(identity, _)| identity.as_str())
    }

    /// Each index with its identity.
    pub fn parts(&self) -> impl Iterator<Item = (&str, &Arc<ImagePageIndex>)> {
        self.parts
            .iter()
            .map(|(identity, index)| (identity.as_str(), index))
    }
}

/// What the destination is known to hold, as the proxy codec sees it: the blocks of the VM's
/// base image (both hosts hold the same image: no round trip) and, during a migration with a
/// local disk, the blocks its disk mirror delivered ([`DeliveredPages`]). On the source, "the
/// destination holds these"; on the destination, the blocks read back by hash. Without either:
/// nothing is held.
#[derive(Clone, Debug, Default)]
pub struct SharedImagePages {
    pub index: Option<Arc<ImagePageIndex>>,
    pub delivered: Option<Arc<DeliveredPages>>,
    /// Other files both hosts hold with the same content ([`HeldFile`]).
    pub files: Vec<Arc<ImagePageIndex>>,
    /// Pages the encoder found among `files` (not in the base image).
    file_pages: Arc<AtomicU64>,
}

impl SharedImagePages {
    /// The base image's blocks alone (`None`: no base image).
    pub fn new(index: Option<Arc<ImagePageIndex>>) -> Self {
        Self {
            index,
            delivered: None,
            files: Vec::new(),
            file_pages: Arc::default(),
        }
    }

    /// Also the blocks of these indexes of held files ([`HeldFile::parts`]; on the source: only
    /// those the destination reported holding under the same identity).
    pub fn with_files<'a>(
        mut self,
        indexes: impl IntoIterator<Item = &'a Arc<ImagePageIndex>>,
    ) -> Self {
        self.files.extend(indexes.into_iter().cloned());
        self
    }

    /// Also the blocks a disk mirror delivered.
    pub fn with_delivered(mut self, delivered: Arc<DeliveredPages>) -> Self {
        self.delivered = Some(delivered);
        self
    }

    /// Whether anything is held (the encoder asks only then).
    pub fn holds_anything(&self) -> bool {
        self.index.is_some() || self.delivered.is_some() || !self.files.is_empty()
    }

    /// Whether `hash` is a block of the base image or of a held file.
    pub fn in_image(&self, hash: &ContentHash) -> bool {
        self.index
            .iter()
            .chain(&self.files)
            .any(|index| index.contains(hash))
    }

    /// Pages the encoder found in the held files and not in the base image (counted by
    /// [`RemoteHashQuery::holds_locally`]).
    pub fn pages_from_files(&self) -> u64 {
        self.file_pages.load(Ordering::Relaxed)
    }
}

impl RemoteHashQuery for SharedImagePages {
    /// Both sides hold the same index and delivered blocks: always known at once.
    fn holds_locally(&mut self, hash: &ContentHash) -> Option<bool> {
        if self
            .index
            .as_ref()
            .is_some_and(|index| index.contains(hash))
        {
            return Some(true);
        }
        if self.files.iter().any(|file| file.contains(hash)) {
            self.file_pages.fetch_add(1, Ordering::Relaxed);
            return Some(true);
        }
        let delivered = self
            .delivered
            .as_ref()
            .is_some_and(|delivered| delivered.contains(hash));
        if delivered && let Some(record) = &self.delivered {
            record.note_used(1);
        }
        Some(delivered)
    }

    fn which_of(&mut self, hashes: &[ContentHash]) -> Result<Vec<bool>, BoxError> {
        Ok(hashes
            .iter()
            .map(|hash| self.holds_locally(hash) == Some(true))
            .collect())
    }
}

impl LocalContentSource for SharedImagePages {
    fn content(&self, hash: &ContentHash) -> Result<Option<Vec<u8>>, BoxError> {
        for index in self.index.iter().chain(&self.files) {
            if let Some(block) = index.content(hash)? {
                return Ok(Some(block));
            }
        }
        match &self.delivered {
            Some(delivered) => delivered.content(hash),
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
        let mut shared = SharedImagePages::new(Some(Arc::new(index)));
        assert_eq!(shared.which_of(&[two, absent]).unwrap(), vec![true, false]);
        let mut none = SharedImagePages::default();
        assert_eq!(none.which_of(&[two]).unwrap(), vec![false]);
    }

    #[test]
    fn held_files_are_read_back_and_their_pages_counted_apart_from_the_base_image() {
        let (_image_dir, image_path) = image(&[1, 2]);
        let (kernel_dir, kernel_path) = image(&[2, 3, 4]);
        let kernel = HeldFile::open(&kernel_path).expect("kernel");
        let whole = std::fs::read(&kernel_path).expect("read");
        // Not a bzImage: the file's blocks alone.
        let identities: Vec<&str> = kernel.identities().collect();
        assert_eq!(identities, [blake3::hash(&whole).to_hex().as_str()]);
        let (_, index) = kernel.parts().next().expect("one part");
        assert_eq!(index.distinct_blocks(), 3);
        let base = Arc::new(ImagePageIndex::build(&image_path).expect("index"));
        let mut held = SharedImagePages::new(Some(base)).with_files([index]);
        assert!(held.holds_anything());
        let block = |fill: u8| ContentHash::of(&[fill; PAGE_SIZE]);
        // In both: found in the base image, not counted as the kernel's.
        assert_eq!(held.holds_locally(&block(2)), Some(true));
        assert_eq!(held.pages_from_files(), 0);
        assert_eq!(held.holds_locally(&block(3)), Some(true));
        assert_eq!(held.holds_locally(&block(4)), Some(true));
        assert_eq!(held.holds_locally(&block(5)), Some(false));
        assert_eq!(
            held.which_of(&[block(1), block(4), block(5)]).unwrap(),
            vec![true, true, false]
        );
        // A clone (the agent's copy of the encoder's) shares the count.
        assert_eq!(held.clone().pages_from_files(), 3);
        assert_eq!(held.content(&block(3)).unwrap(), Some(vec![3u8; PAGE_SIZE]));
        assert_eq!(held.content(&block(5)).unwrap(), None);
        // Files alone, no base image: still something held.
        assert!(
            SharedImagePages::default()
                .with_files([index])
                .holds_anything()
        );
        let missing = kernel_dir.path().join("absent");
        assert!(HeldFile::open(&missing).is_err());
    }

    #[test]
    fn ranges_index_only_whole_blocks_inside_them_at_their_file_offsets() {
        // File: 4 KiB of header, then blocks 1 and 2 (guest blocks 3 and 4), then a block 5
        // mapped from guest offset 2 KiB (straddles two guest blocks: not indexed).
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("image.file");
        let mut bytes = vec![0xEEu8; PAGE_SIZE];
        bytes.extend(std::iter::repeat_n(1u8, PAGE_SIZE));
        bytes.extend(std::iter::repeat_n(2u8, PAGE_SIZE));
        bytes.extend(std::iter::repeat_n(5u8, PAGE_SIZE));
        std::fs::write(&path, &bytes).expect("write");
        let page = PAGE_SIZE as u64;
        let ranges = [
            StoredRange {
                guest_offset: 3 * page,
                file_offset: page,
                length: 2 * page,
            },
            StoredRange {
                guest_offset: 2048,
                file_offset: 3 * page,
                length: page,
            },
        ];
        let index = ImagePageIndex::build_from_ranges(&path, &ranges, 8 * page).expect("index");
        assert_eq!(index.blocks(), 8);
        assert_eq!(index.distinct_blocks(), 2);
        let two = ContentHash::of(&[2u8; PAGE_SIZE]);
        assert_eq!(index.content(&two).unwrap(), Some(vec![2u8; PAGE_SIZE]));
        assert!(!index.contains(&ContentHash::of(&[0xEEu8; PAGE_SIZE])));
        assert!(!index.contains(&ContentHash::of(&[5u8; PAGE_SIZE])));
        let past = [StoredRange {
            guest_offset: 0,
            file_offset: 3 * page,
            length: 2 * page,
        }];
        let error = ImagePageIndex::build_from_ranges(&path, &past, 8 * page).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_saved_index_loads_back_and_a_damaged_or_stale_one_is_refused() {
        let (dir, path) = image(&[1, 0, 2, 1, 3]);
        let index = ImagePageIndex::build(&path).expect("index");
        let saved = dir.path().join("image.pages");
        index.save(&saved).expect("save");
        assert!(!dir.path().join("image.pages.tmp").exists());
        let loaded = ImagePageIndex::load(&saved, &path).expect("load");
        assert_eq!(loaded.blocks(), 5);
        assert_eq!(loaded.distinct_blocks(), 3);
        for fill in [1u8, 2, 3] {
            let hash = ContentHash::of(&[fill; PAGE_SIZE]);
            assert_eq!(loaded.content(&hash).unwrap(), Some(vec![fill; PAGE_SIZE]));
        }

        let good = std::fs::read(&saved).expect("read");
        let refused = |bytes: &[u8]| {
            std::fs::write(&saved, bytes).expect("write");
            let error = ImagePageIndex::load(&saved, &path).unwrap_err();
            assert_eq!(error.kind(), std::io::ErrorKind::InvalidData, "{error}");
            error.to_string()
        };
        let mut flipped = good.clone();
        flipped[SAVED_HEADER + 3] ^= 1;
        assert!(refused(&flipped).contains("checksum"));
        assert!(refused(&good[..good.len() - 1]).contains("checksum"));
        assert!(refused(&good[..10]).contains("not a page index"));
        let mut other = good.clone();
        other[..8].copy_from_slice(b"NCPGIX02");
        assert!(refused(&other).contains("not a page index"));

        // A well-formed index of a file of another length: the image changed under it.
        std::fs::write(&saved, &good).expect("write");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut file| std::io::Write::write_all(&mut file, &[0u8; 7]))
            .expect("grow image");
        let error = ImagePageIndex::load(&saved, &path).unwrap_err();
        assert!(
            error.to_string().contains("written for a file of"),
            "{error}"
        );
    }
}
