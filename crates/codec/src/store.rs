//! Content-addressed chunk store on disk, shared by the image store and the codec's receiving
//! side: a redb index (`index.redb`) plus append-only pack files (`packs/pack-<id>.dat`).
//!
//! **Packs, not one file per chunk**: a 2 GiB image is ~60 000 chunks of ~32 KiB; one file each
//! would cost an inode, a directory entry and an fsync per chunk, while a pack takes a whole batch
//! with one sequential write and one `fdatasync`. Reads are `pread`s at indexed offsets.
//!
//! **What is kept**: image manifests are the roots. [`ChunkStore::collect_garbage`] drops chunks
//! no manifest lists and rewrites packs that are mostly garbage (see [`collect`]); a transfer
//! holds a [`ChunkPin`] while its chunks have no manifest yet.
//!
//! **Crash safety**: a batch's bytes are written and synced to the pack first, then one redb
//! transaction (durable on commit) records their locations and the pack's new committed length.
//! After a crash, bytes past a pack's committed length belong to no record; opening the store
//! truncates them, and deletes pack files the index does not list (a pack whose first batch never
//! committed, or one a collection rewrote just before the crash). Every read checks the BLAKE3 hash of what it returns.
//!
//! **Format**: the index's `meta` table holds `format_version` ([`STORE_FORMAT_VERSION`]); a store
//! of another version is refused. Packs start with the magic `NCPACK01`; index values start with
//! their own version byte.
//!
//! Tables: `chunks` hash → (pack, offset, length, reference count); `aligned_blocks` hash of a
//! 4 KiB block at a 4 KiB-aligned offset of an image → up to two (chunk hash, offset, length)
//! segments, so RAM pages that hold file contents are found; `images` name → manifest (image
//! length and its chunk list); `packs` pack id → committed length.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use crate::chunk::{BLOCK_SIZE, ChunkingParameters, DEFAULT_CHUNKING, for_each_chunk};
use crate::hash::{BoxError, ChunkRepository, ContentHash, LocalContentSource, RemoteHashQuery};
use crate::page::is_zero;

pub mod collect;

use collect::CollectionGate;
pub use collect::{ChunkPin, CollectionSummary};

/// Version of the on-disk layout described in the module documentation.
pub const STORE_FORMAT_VERSION: u64 = 1;

const PACK_MAGIC: &[u8; 8] = b"NCPACK01";
/// A pack is closed once it passes this size.
const PACK_ROTATE_LENGTH: u64 = 1 << 30;
/// Chunks longer than this are refused (FastCDC's largest maximum).
pub const MAX_STORED_CHUNK: usize = 16 << 20;
/// Bytes of image data gathered before one commit while indexing an image.
const IMAGE_BATCH_BYTES: usize = 64 << 20;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const CHUNKS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("chunks");
const ALIGNED_BLOCKS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("aligned_blocks");
const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("images");
const PACKS: TableDefinition<u32, u64> = TableDefinition::new("packs");

const RECORD_VERSION: u8 = 1;

/// Errors of the chunk store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("creating chunk store directory {path}")]
    CreateDirectory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("chunk store index {path}")]
    Index {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },

    #[error("chunk store {path} has format version {found}; this build reads version {supported}")]
    UnsupportedVersion {
        path: PathBuf,
        found: u64,
        supported: u64,
    },

    #[error("{operation} pack file {path}")]
    Pack {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "pack file {path} is {actual} bytes but the index says {committed} are committed; the store lost data"
    )]
    PackShorterThanIndex {
        path: PathBuf,
        actual: u64,
        committed: u64,
    },

    #[error("index record for {hash:?} is corrupt: {reason}")]
    CorruptRecord {
        hash: ContentHash,
        reason: &'static str,
    },

    #[error("chunk {hash:?} read from {path} does not match its hash; the pack is damaged")]
    CorruptData { hash: ContentHash, path: PathBuf },

    #[error("chunk of {length} bytes is above the store's limit of {limit}")]
    ChunkTooLarge { length: usize, limit: usize },

    #[error("reading image input at offset {offset}")]
    Input {
        offset: u64,
        #[source]
        source: std::io::Error,
    },

    #[error("writing image {name:?}")]
    Output {
        name: String,
        #[source]
        source: std::io::Error,
    },

    #[error("image {name:?} is not in the chunk store")]
    ImageNotFound { name: String },

    #[error("image {name:?} needs chunk {hash:?}, which the store does not hold")]
    MissingChunk { name: String, hash: ContentHash },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ChunkLocation {
    pack: u32,
    offset: u64,
    length: u32,
    references: u64,
}

impl ChunkLocation {
    const ENCODED_LENGTH: usize = 1 + 4 + 8 + 4 + 8;

    fn encode(&self) -> [u8; Self::ENCODED_LENGTH] {
        let mut out = [0u8; Self::ENCODED_LENGTH];
        out[0] = RECORD_VERSION;
        out[1..5].copy_from_slice(&self.pack.to_le_bytes());
        out[5..13].copy_from_slice(&self.offset.to_le_bytes());
        out[13..17].copy_from_slice(&self.length.to_le_bytes());
        out[17..25].copy_from_slice(&self.references.to_le_bytes());
        out
    }

    fn decode(hash: ContentHash, bytes: &[u8]) -> Result<Self, StoreError> {
        if bytes.len() != Self::ENCODED_LENGTH || bytes[0] != RECORD_VERSION {
            return Err(StoreError::CorruptRecord {
                hash,
                reason: "chunk location has the wrong length or version",
            });
        }
        let u32_at = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let u64_at = |at: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(word)
        };
        Ok(Self {
            pack: u32_at(1),
            offset: u64_at(5),
            length: u32_at(13),
            references: u64_at(17),
        })
    }
}

/// A piece of an aligned block: `length` bytes at `offset` inside chunk `chunk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BlockSegment {
    chunk: ContentHash,
    offset: u32,
    length: u32,
}

fn encode_block_location(segments: &[BlockSegment]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + segments.len() * 40);
    out.push(RECORD_VERSION);
    out.push(segments.len() as u8);
    for segment in segments {
        out.extend_from_slice(segment.chunk.as_bytes());
        out.extend_from_slice(&segment.offset.to_le_bytes());
        out.extend_from_slice(&segment.length.to_le_bytes());
    }
    out
}

fn decode_block_location(hash: ContentHash, bytes: &[u8]) -> Result<Vec<BlockSegment>, StoreError> {
    let corrupt = StoreError::CorruptRecord {
        hash,
        reason: "aligned block location is malformed",
    };
    if bytes.len() < 2 || bytes[0] != RECORD_VERSION {
        return Err(corrupt);
    }
    let count = bytes[1] as usize;
    if !(1..=2).contains(&count) || bytes.len() != 2 + count * 40 {
        return Err(corrupt);
    }
    let mut segments = Vec::with_capacity(count);
    let mut total = 0usize;
    for index in 0..count {
        let at = 2 + index * 40;
        let mut chunk = [0u8; 32];
        chunk.copy_from_slice(&bytes[at..at + 32]);
        let offset = u32::from_le_bytes([
            bytes[at + 32],
            bytes[at + 33],
            bytes[at + 34],
            bytes[at + 35],
        ]);
        let length = u32::from_le_bytes([
            bytes[at + 36],
            bytes[at + 37],
            bytes[at + 38],
            bytes[at + 39],
        ]);
        total += length as usize;
        segments.push(BlockSegment {
            chunk: ContentHash(chunk),
            offset,
            length,
        });
    }
    if total != BLOCK_SIZE {
        return Err(StoreError::CorruptRecord {
            hash,
            reason: "aligned block segments do not add up to 4 KiB",
        });
    }
    Ok(segments)
}

/// One chunk of an image, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManifestEntry {
    pub hash: ContentHash,
    pub length: u32,
}

/// The chunks an image is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageManifest {
    pub length: u64,
    pub chunks: Vec<ManifestEntry>,
}

impl ImageManifest {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(17 + self.chunks.len() * 36);
        out.push(RECORD_VERSION);
        out.extend_from_slice(&self.length.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for entry in &self.chunks {
            out.extend_from_slice(entry.hash.as_bytes());
            out.extend_from_slice(&entry.length.to_le_bytes());
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < 17 || bytes[0] != RECORD_VERSION {
            return None;
        }
        let length = u64::from_le_bytes(bytes[1..9].try_into().ok()?);
        let count = usize::try_from(u64::from_le_bytes(bytes[9..17].try_into().ok()?)).ok()?;
        if bytes.len() != 17 + count.checked_mul(36)? {
            return None;
        }
        let chunks = bytes[17..]
            .chunks_exact(36)
            .map(|entry| {
                let mut hash = [0u8; 32];
                hash.copy_from_slice(&entry[..32]);
                ManifestEntry {
                    hash: ContentHash(hash),
                    length: u32::from_le_bytes([entry[32], entry[33], entry[34], entry[35]]),
                }
            })
            .collect();
        Some(Self { length, chunks })
    }
}

/// What indexing an image did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageSummary {
    pub length: u64,
    pub chunks: u64,
    /// Chunks the store did not hold before.
    pub new_chunks: u64,
    /// Bytes appended to packs.
    pub new_bytes: u64,
    /// Non-zero aligned 4 KiB blocks added to the aligned index.
    pub indexed_blocks: u64,
}

struct PackWriter {
    id: u32,
    file: Arc<File>,
    length: u64,
    /// No more appends: a collection is about to rewrite this pack.
    sealed: bool,
}

/// Where [`ChunkStore::append_chunks`] put a batch.
struct Appended {
    /// (pack, offset) of each chunk, in order.
    positions: Vec<(u32, u64)>,
    /// New length of every pack written to.
    touched_packs: Vec<(u32, u64)>,
    bytes: u64,
}

/// The store. All methods take `&self`; writes are serialised internally.
pub struct ChunkStore {
    root: PathBuf,
    index_path: PathBuf,
    database: redb::Database,
    readers: Mutex<HashMap<u32, Arc<File>>>,
    writer: Mutex<Option<PackWriter>>,
    gate: Arc<CollectionGate>,
    /// A pack is closed once it passes this ([`PACK_ROTATE_LENGTH`]; smaller in tests).
    pack_rotate_length: u64,
}

impl std::fmt::Debug for ChunkStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ChunkStore")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

fn pack_path(root: &Path, id: u32) -> PathBuf {
    root.join("packs").join(format!("pack-{id:08}.dat"))
}

/// Deletes pack files the index does not list: none of their bytes were ever committed, or a
/// collection moved everything out of them before a crash.
fn remove_unlisted_packs(
    directory: &Path,
    listed: &HashMap<u32, Arc<File>>,
) -> Result<(), StoreError> {
    let entries = std::fs::read_dir(directory).map_err(|source| StoreError::Pack {
        operation: "listing",
        path: directory.to_path_buf(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| StoreError::Pack {
            operation: "listing",
            path: directory.to_path_buf(),
            source,
        })?;
        let name = entry.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|name| name.strip_prefix("pack-")?.strip_suffix(".dat"))
            .and_then(|digits| digits.parse::<u32>().ok())
        else {
            continue;
        };
        if !listed.contains_key(&id) {
            let path = entry.path();
            tracing::warn!(pack = %path.display(), "deleting a pack file the index does not list");
            std::fs::remove_file(&path).map_err(|source| StoreError::Pack {
                operation: "deleting",
                path,
                source,
            })?;
        }
    }
    Ok(())
}

impl ChunkStore {
    /// Opens the store at `root`, creating it if needed, and truncates bytes a crash left past
    /// any pack's committed length.
    pub fn open(root: impl AsRef<Path>) -> Result<Self, StoreError> {
        let root = root.as_ref().to_path_buf();
        let packs_directory = root.join("packs");
        std::fs::create_dir_all(&packs_directory).map_err(|source| {
            StoreError::CreateDirectory {
                path: packs_directory.clone(),
                source,
            }
        })?;
        let index_path = root.join("index.redb");
        let index_error = |source: redb::Error| StoreError::Index {
            path: index_path.clone(),
            source: Box::new(source),
        };
        let database =
            redb::Database::create(&index_path).map_err(|error| index_error(error.into()))?;

        let transaction = database
            .begin_write()
            .map_err(|error| index_error(error.into()))?;
        let mut committed_packs = Vec::new();
        {
            let mut meta = transaction
                .open_table(META)
                .map_err(|error| index_error(error.into()))?;
            let version = meta
                .get("format_version")
                .map_err(|error| index_error(error.into()))?
                .map(|value| value.value());
            match version {
                None => {
                    meta.insert("format_version", STORE_FORMAT_VERSION)
                        .map_err(|error| index_error(error.into()))?;
                }
                Some(found) if found != STORE_FORMAT_VERSION => {
                    return Err(StoreError::UnsupportedVersion {
                        path: index_path.clone(),
                        found,
                        supported: STORE_FORMAT_VERSION,
                    });
                }
                Some(_) => {}
            }
            transaction
                .open_table(CHUNKS)
                .map_err(|error| index_error(error.into()))?;
            transaction
                .open_table(ALIGNED_BLOCKS)
                .map_err(|error| index_error(error.into()))?;
            transaction
                .open_table(IMAGES)
                .map_err(|error| index_error(error.into()))?;
            let packs = transaction
                .open_table(PACKS)
                .map_err(|error| index_error(error.into()))?;
            for entry in packs.iter().map_err(|error| index_error(error.into()))? {
                let (id, committed) = entry.map_err(|error| index_error(error.into()))?;
                committed_packs.push((id.value(), committed.value()));
            }
        }
        transaction
            .commit()
            .map_err(|error| index_error(error.into()))?;

        let mut readers = HashMap::new();
        let mut writer = None;
        for &(id, committed) in &committed_packs {
            let path = pack_path(&root, id);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|source| StoreError::Pack {
                    operation: "opening",
                    path: path.clone(),
                    source,
                })?;
            let actual = file
                .metadata()
                .map_err(|source| StoreError::Pack {
                    operation: "inspecting",
                    path: path.clone(),
                    source,
                })?
                .len();
            if actual < committed {
                return Err(StoreError::PackShorterThanIndex {
                    path,
                    actual,
                    committed,
                });
            }
            if actual > committed {
                tracing::warn!(pack = %path.display(), actual, committed, "truncating uncommitted pack tail after a crash");
                file.set_len(committed).map_err(|source| StoreError::Pack {
                    operation: "truncating",
                    path: path.clone(),
                    source,
                })?;
            }
            let file = Arc::new(file);
            readers.insert(id, Arc::clone(&file));
            if writer
                .as_ref()
                .is_none_or(|current: &PackWriter| id > current.id)
            {
                writer = Some(PackWriter {
                    id,
                    file,
                    length: committed,
                    sealed: false,
                });
            }
        }
        remove_unlisted_packs(&packs_directory, &readers)?;
        Ok(Self {
            root,
            index_path,
            database,
            readers: Mutex::new(readers),
            writer: Mutex::new(writer),
            gate: Arc::default(),
            pack_rotate_length: PACK_ROTATE_LENGTH,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn index_error(&self, error: impl Into<redb::Error>) -> StoreError {
        StoreError::Index {
            path: self.index_path.clone(),
            source: Box::new(error.into()),
        }
    }

    /// True if the store holds a chunk or an aligned block with this hash.
    pub fn contains(&self, hash: &ContentHash) -> Result<bool, StoreError> {
        Ok(self.which_of(std::slice::from_ref(hash))?[0])
    }

    /// For each hash, whether the store holds a chunk or an aligned block with it (one read
    /// transaction for the whole batch).
    pub fn which_of(&self, hashes: &[ContentHash]) -> Result<Vec<bool>, StoreError> {
        let transaction = self
            .database
            .begin_read()
            .map_err(|error| self.index_error(error))?;
        let chunks = transaction
            .open_table(CHUNKS)
            .map_err(|error| self.index_error(error))?;
        let blocks = transaction
            .open_table(ALIGNED_BLOCKS)
            .map_err(|error| self.index_error(error))?;
        hashes
            .iter()
            .map(|hash| {
                if chunks
                    .get(hash.as_bytes())
                    .map_err(|error| self.index_error(error))?
                    .is_some()
                {
                    return Ok(true);
                }
                Ok(blocks
                    .get(hash.as_bytes())
                    .map_err(|error| self.index_error(error))?
                    .is_some())
            })
            .collect()
    }

    fn reader(&self, pack: u32) -> Result<Arc<File>, StoreError> {
        let mut readers = self
            .readers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(file) = readers.get(&pack) {
            return Ok(Arc::clone(file));
        }
        let path = pack_path(&self.root, pack);
        let file = Arc::new(File::open(&path).map_err(|source| StoreError::Pack {
            operation: "opening",
            path,
            source,
        })?);
        readers.insert(pack, Arc::clone(&file));
        Ok(file)
    }

    fn read_range(
        &self,
        location: &ChunkLocation,
        offset: u64,
        length: usize,
    ) -> Result<Vec<u8>, StoreError> {
        let file = self.reader(location.pack)?;
        let mut data = vec![0u8; length];
        file.read_exact_at(&mut data, location.offset + offset)
            .map_err(|source| StoreError::Pack {
                operation: "reading",
                path: pack_path(&self.root, location.pack),
                source,
            })?;
        Ok(data)
    }

    fn chunk_location(
        &self,
        transaction: &redb::ReadTransaction,
        hash: &ContentHash,
    ) -> Result<Option<ChunkLocation>, StoreError> {
        let chunks = transaction
            .open_table(CHUNKS)
            .map_err(|error| self.index_error(error))?;
        let record = chunks
            .get(hash.as_bytes())
            .map_err(|error| self.index_error(error))?;
        record
            .map(|record| ChunkLocation::decode(*hash, record.value()))
            .transpose()
    }

    /// The chunk or aligned block with this hash, checked against the hash.
    pub fn get(&self, hash: &ContentHash) -> Result<Option<Vec<u8>>, StoreError> {
        match self.get_once(hash) {
            // A collection rewrote the pack between the lookup and the read: look again.
            Err(StoreError::Pack {
                operation: "opening",
                source,
                ..
            }) if source.kind() == std::io::ErrorKind::NotFound => self.get_once(hash),
            other => other,
        }
    }

    fn get_once(&self, hash: &ContentHash) -> Result<Option<Vec<u8>>, StoreError> {
        let transaction = self
            .database
            .begin_read()
            .map_err(|error| self.index_error(error))?;
        if let Some(location) = self.chunk_location(&transaction, hash)? {
            let data = self.read_range(&location, 0, location.length as usize)?;
            if ContentHash::of(&data) != *hash {
                return Err(StoreError::CorruptData {
                    hash: *hash,
                    path: pack_path(&self.root, location.pack),
                });
            }
            return Ok(Some(data));
        }
        let segments = {
            let blocks = transaction
                .open_table(ALIGNED_BLOCKS)
                .map_err(|error| self.index_error(error))?;
            match blocks
                .get(hash.as_bytes())
                .map_err(|error| self.index_error(error))?
            {
                Some(record) => decode_block_location(*hash, record.value())?,
                None => return Ok(None),
            }
        };
        let mut block = Vec::with_capacity(BLOCK_SIZE);
        for segment in segments {
            let Some(location) = self.chunk_location(&transaction, &segment.chunk)? else {
                return Ok(None); // the chunk was released; the block went with it
            };
            if u64::from(segment.offset) + u64::from(segment.length) > u64::from(location.length) {
                return Err(StoreError::CorruptRecord {
                    hash: *hash,
                    reason: "aligned block segment outside its chunk",
                });
            }
            block.extend(self.read_range(
                &location,
                u64::from(segment.offset),
                segment.length as usize,
            )?);
        }
        if ContentHash::of(&block) != *hash {
            return Err(StoreError::CorruptData {
                hash: *hash,
                path: self.root.join("packs"),
            });
        }
        Ok(Some(block))
    }

    /// Stores chunks (one sync and one index transaction for the batch); a chunk already held
    /// gains a reference. Returns their hashes.
    pub fn put_many(&self, chunks: &[&[u8]]) -> Result<Vec<ContentHash>, StoreError> {
        let hashed: Vec<(ContentHash, &[u8])> = chunks
            .iter()
            .map(|chunk| (ContentHash::of(chunk), *chunk))
            .collect();
        self.commit_batch(&hashed, &[])?;
        Ok(hashed.into_iter().map(|(hash, _)| hash).collect())
    }

    /// Stores one chunk; see [`ChunkStore::put_many`].
    pub fn put(&self, chunk: &[u8]) -> Result<ContentHash, StoreError> {
        Ok(self.put_many(&[chunk])?[0])
    }

    fn commit_batch(
        &self,
        chunks: &[(ContentHash, &[u8])],
        blocks: &[(ContentHash, Vec<BlockSegment>)],
    ) -> Result<u64, StoreError> {
        if let Some((_, chunk)) = chunks
            .iter()
            .find(|(_, chunk)| chunk.len() > MAX_STORED_CHUNK)
        {
            return Err(StoreError::ChunkTooLarge {
                length: chunk.len(),
                limit: MAX_STORED_CHUNK,
            });
        }
        let mut writer_slot = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let transaction = self
            .database
            .begin_write()
            .map_err(|error| self.index_error(error))?;
        let new_bytes;
        {
            let mut table = transaction
                .open_table(CHUNKS)
                .map_err(|error| self.index_error(error))?;
            let mut packs = transaction
                .open_table(PACKS)
                .map_err(|error| self.index_error(error))?;
            // Decide what is new; count references for what is not.
            let mut records: HashMap<ContentHash, ChunkLocation> = HashMap::new();
            let mut new_chunks: Vec<(ContentHash, &[u8])> = Vec::new();
            for (hash, data) in chunks {
                if let Some(location) = records.get_mut(hash) {
                    location.references += 1;
                    continue;
                }
                let existing = table
                    .get(hash.as_bytes())
                    .map_err(|error| self.index_error(error))?;
                match existing {
                    Some(record) => {
                        let mut location = ChunkLocation::decode(*hash, record.value())?;
                        location.references += 1;
                        records.insert(*hash, location);
                    }
                    None => {
                        // Placeholder; the real location is set once the bytes are written.
                        records.insert(
                            *hash,
                            ChunkLocation {
                                pack: 0,
                                offset: 0,
                                length: data.len() as u32,
                                references: 1,
                            },
                        );
                        new_chunks.push((*hash, data));
                    }
                }
            }
            // Data first: append new chunks to the pack, sync, then index.
            let appended = self.append_chunks(&mut writer_slot, &new_chunks)?;
            for ((hash, _), (pack, offset)) in new_chunks.iter().zip(&appended.positions) {
                if let Some(location) = records.get_mut(hash) {
                    location.pack = *pack;
                    location.offset = *offset;
                }
            }
            new_bytes = appended.bytes;
            let touched_packs = appended.touched_packs;
            for (hash, location) in &records {
                table
                    .insert(hash.as_bytes(), &location.encode()[..])
                    .map_err(|error| self.index_error(error))?;
            }
            for (id, length) in touched_packs {
                packs
                    .insert(id, length)
                    .map_err(|error| self.index_error(error))?;
            }
            if !blocks.is_empty() {
                let mut aligned = transaction
                    .open_table(ALIGNED_BLOCKS)
                    .map_err(|error| self.index_error(error))?;
                for (hash, segments) in blocks {
                    if aligned
                        .get(hash.as_bytes())
                        .map_err(|error| self.index_error(error))?
                        .is_none()
                    {
                        aligned
                            .insert(hash.as_bytes(), &encode_block_location(segments)[..])
                            .map_err(|error| self.index_error(error))?;
                    }
                }
            }
        }
        transaction
            .commit()
            .map_err(|error| self.index_error(error))?;
        Ok(new_bytes)
    }

    /// Appends chunks to the current pack (moving on to a new one past the rotation length) and
    /// syncs them; the caller records their positions in the index.
    fn append_chunks(
        &self,
        writer_slot: &mut Option<PackWriter>,
        chunks: &[(ContentHash, &[u8])],
    ) -> Result<Appended, StoreError> {
        let mut appended = Appended {
            positions: Vec::with_capacity(chunks.len()),
            touched_packs: Vec::new(),
            bytes: 0,
        };
        let mut buffer = Vec::new();
        let mut index = 0;
        while index < chunks.len() {
            let writer = self.writable_pack(writer_slot)?;
            buffer.clear();
            let start = writer.length;
            while index < chunks.len()
                && (buffer.is_empty() || start + (buffer.len() as u64) < self.pack_rotate_length)
            {
                let (_, data) = chunks[index];
                appended
                    .positions
                    .push((writer.id, start + buffer.len() as u64));
                buffer.extend_from_slice(data);
                index += 1;
            }
            let path = pack_path(&self.root, writer.id);
            writer
                .file
                .write_all_at(&buffer, start)
                .map_err(|source| StoreError::Pack {
                    operation: "writing",
                    path: path.clone(),
                    source,
                })?;
            writer.file.sync_data().map_err(|source| StoreError::Pack {
                operation: "syncing",
                path,
                source,
            })?;
            writer.length = start + buffer.len() as u64;
            appended.bytes += buffer.len() as u64;
            appended.touched_packs.push((writer.id, writer.length));
        }
        Ok(appended)
    }

    /// The pack to append to, creating the first or the next one when needed. A new pack is
    /// recorded in the index by the transaction that commits its first chunks.
    fn writable_pack<'a>(
        &self,
        slot: &'a mut Option<PackWriter>,
    ) -> Result<&'a mut PackWriter, StoreError> {
        let next_id = match slot.as_ref() {
            Some(writer) if writer.length < self.pack_rotate_length && !writer.sealed => None,
            Some(writer) => Some(writer.id + 1),
            None => Some(1),
        };
        if let Some(id) = next_id {
            let path = pack_path(&self.root, id);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(|source| StoreError::Pack {
                    operation: "creating",
                    path: path.clone(),
                    source,
                })?;
            file.write_all_at(PACK_MAGIC, 0)
                .map_err(|source| StoreError::Pack {
                    operation: "writing",
                    path: path.clone(),
                    source,
                })?;
            let file = Arc::new(file);
            self.readers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(id, Arc::clone(&file));
            *slot = Some(PackWriter {
                id,
                file,
                length: PACK_MAGIC.len() as u64,
                sealed: false,
            });
        }
        // The slot was filled just above when it was empty.
        slot.as_mut().ok_or_else(|| StoreError::Pack {
            operation: "selecting",
            path: self.root.join("packs"),
            source: std::io::Error::other("no writable pack"),
        })
    }

    /// How many times a chunk was stored (0 if not held). Informational: what keeps a chunk is
    /// a manifest listing it (see [`ChunkStore::collect_garbage`]), not this count.
    pub fn references(&self, hash: &ContentHash) -> Result<u64, StoreError> {
        let transaction = self
            .database
            .begin_read()
            .map_err(|error| self.index_error(error))?;
        Ok(self
            .chunk_location(&transaction, hash)?
            .map_or(0, |location| location.references))
    }

    /// Stores an image read from `reader` under `name`: its content-defined chunks (with
    /// [`DEFAULT_CHUNKING`]), its manifest, and an index of its non-zero 4 KiB-aligned blocks.
    pub fn put_image(&self, name: &str, reader: impl Read) -> Result<ImageSummary, StoreError> {
        self.put_image_with(name, reader, DEFAULT_CHUNKING)
    }

    /// [`ChunkStore::put_image`] with other chunking parameters.
    pub fn put_image_with(
        &self,
        name: &str,
        reader: impl Read,
        chunking: ChunkingParameters,
    ) -> Result<ImageSummary, StoreError> {
        // Its chunks have no manifest until the end.
        let _pin = self.pin();
        let mut indexer = ImageIndexer::default_for(self);
        for_each_chunk(
            reader,
            chunking,
            |offset, data| indexer.add_chunk(offset, data),
            |offset, source| StoreError::Input { offset, source },
        )?;
        indexer.flush()?;
        let manifest = ImageManifest {
            length: indexer.summary.length,
            chunks: std::mem::take(&mut indexer.manifest),
        };
        let transaction = self
            .database
            .begin_write()
            .map_err(|error| self.index_error(error))?;
        {
            let mut images = transaction
                .open_table(IMAGES)
                .map_err(|error| self.index_error(error))?;
            images
                .insert(name, &manifest.encode()[..])
                .map_err(|error| self.index_error(error))?;
        }
        transaction
            .commit()
            .map_err(|error| self.index_error(error))?;
        Ok(indexer.summary)
    }

    /// The manifest of an image stored with [`ChunkStore::put_image`].
    pub fn image_manifest(&self, name: &str) -> Result<Option<ImageManifest>, StoreError> {
        let transaction = self
            .database
            .begin_read()
            .map_err(|error| self.index_error(error))?;
        let images = transaction
            .open_table(IMAGES)
            .map_err(|error| self.index_error(error))?;
        let Some(record) = images.get(name).map_err(|error| self.index_error(error))? else {
            return Ok(None);
        };
        ImageManifest::decode(record.value())
            .map(Some)
            .ok_or(StoreError::CorruptRecord {
                hash: ContentHash([0; 32]),
                reason: "image manifest is malformed",
            })
    }

    /// Writes an image back out from its chunks.
    pub fn read_image(
        &self,
        name: &str,
        mut writer: impl std::io::Write,
    ) -> Result<u64, StoreError> {
        let manifest = self
            .image_manifest(name)?
            .ok_or_else(|| StoreError::ImageNotFound {
                name: name.to_owned(),
            })?;
        let mut written = 0u64;
        for entry in &manifest.chunks {
            let data = self
                .get(&entry.hash)?
                .ok_or_else(|| StoreError::MissingChunk {
                    name: name.to_owned(),
                    hash: entry.hash,
                })?;
            writer
                .write_all(&data)
                .map_err(|source| StoreError::Output {
                    name: name.to_owned(),
                    source,
                })?;
            written += data.len() as u64;
        }
        Ok(written)
    }
}

/// Streams an image into the store in batches, building the manifest and the aligned index.
struct ImageIndexer<'a> {
    store: &'a ChunkStore,
    summary: ImageSummary,
    manifest: Vec<ManifestEntry>,
    batch_data: Vec<u8>,
    /// (hash, start in batch_data, length)
    batch_chunks: Vec<(ContentHash, usize, usize)>,
    batch_blocks: Vec<(ContentHash, Vec<BlockSegment>)>,
    /// An aligned block that began in the previous chunk: its bytes so far and segments.
    carry: Option<(Vec<u8>, Vec<BlockSegment>)>,
}

impl<'a> ImageIndexer<'a> {
    fn default_for(store: &'a ChunkStore) -> Self {
        Self {
            store,
            summary: ImageSummary::default(),
            manifest: Vec::new(),
            batch_data: Vec::new(),
            batch_chunks: Vec::new(),
            batch_blocks: Vec::new(),
            carry: None,
        }
    }

    fn add_chunk(&mut self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        let hash = ContentHash::of(data);
        self.manifest.push(ManifestEntry {
            hash,
            length: data.len() as u32,
        });
        self.summary.length = offset + data.len() as u64;
        self.summary.chunks += 1;

        // Finish a block that started in the previous chunk.
        let mut position = 0usize;
        if let Some((mut bytes, mut segments)) = self.carry.take() {
            let needed = BLOCK_SIZE - bytes.len();
            let take = needed.min(data.len());
            bytes.extend_from_slice(&data[..take]);
            segments.push(BlockSegment {
                chunk: hash,
                offset: 0,
                length: take as u32,
            });
            position = take;
            if bytes.len() == BLOCK_SIZE {
                self.add_block(&bytes, segments);
            } else {
                self.carry = Some((bytes, segments));
            }
        }
        // Blocks starting inside this chunk (offset + position is aligned once any carry is done,
        // or we are at the first aligned offset inside the chunk).
        if self.carry.is_none() {
            let misalignment = ((offset + position as u64) % BLOCK_SIZE as u64) as usize;
            if misalignment != 0 {
                position += BLOCK_SIZE - misalignment;
            }
            while position < data.len() {
                let end = (position + BLOCK_SIZE).min(data.len());
                let segment = BlockSegment {
                    chunk: hash,
                    offset: position as u32,
                    length: (end - position) as u32,
                };
                if end - position == BLOCK_SIZE {
                    self.add_block(&data[position..end], vec![segment]);
                } else {
                    self.carry = Some((data[position..end].to_vec(), vec![segment]));
                }
                position = end;
            }
        }

        self.batch_chunks
            .push((hash, self.batch_data.len(), data.len()));
        self.batch_data.extend_from_slice(data);
        if self.batch_data.len() >= IMAGE_BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn add_block(&mut self, bytes: &[u8], segments: Vec<BlockSegment>) {
        // Segments longer than two pieces cannot happen with chunks of at least 4 KiB; the
        // smallest FastCDC minimum is 64 bytes, so guard anyway rather than store a bad record.
        if segments.len() > 2 || is_zero(bytes) {
            return;
        }
        self.summary.indexed_blocks += 1;
        self.batch_blocks.push((ContentHash::of(bytes), segments));
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        if self.batch_chunks.is_empty() && self.batch_blocks.is_empty() {
            return Ok(());
        }
        let chunks: Vec<(ContentHash, &[u8])> = self
            .batch_chunks
            .iter()
            .map(|(hash, start, length)| (*hash, &self.batch_data[*start..*start + *length]))
            .collect();
        let before = self
            .store
            .which_of(&chunks.iter().map(|(hash, _)| *hash).collect::<Vec<_>>())?;
        self.summary.new_chunks += before.iter().filter(|held| !**held).count() as u64;
        self.summary.new_bytes += self.store.commit_batch(&chunks, &self.batch_blocks)?;
        self.batch_chunks.clear();
        self.batch_data.clear();
        self.batch_blocks.clear();
        Ok(())
    }
}

impl LocalContentSource for ChunkStore {
    fn content(&self, hash: &ContentHash) -> Result<Option<Vec<u8>>, BoxError> {
        Ok(self.get(hash)?)
    }
}

impl RemoteHashQuery for ChunkStore {
    fn which_of(&mut self, hashes: &[ContentHash]) -> Result<Vec<bool>, BoxError> {
        Ok(ChunkStore::which_of(self, hashes)?)
    }
}

impl RemoteHashQuery for &ChunkStore {
    fn which_of(&mut self, hashes: &[ContentHash]) -> Result<Vec<bool>, BoxError> {
        Ok(ChunkStore::which_of(self, hashes)?)
    }
}

/// The receiving side's [`ChunkRepository`] over a [`ChunkStore`]: chunks received in a frame
/// are kept in memory and stored with one commit at the end of the frame.
pub struct StoreRepository<'a> {
    store: &'a ChunkStore,
    pending: Vec<(ContentHash, Vec<u8>)>,
    pending_index: HashMap<ContentHash, usize>,
}

impl<'a> StoreRepository<'a> {
    pub fn new(store: &'a ChunkStore) -> Self {
        Self {
            store,
            pending: Vec::new(),
            pending_index: HashMap::new(),
        }
    }
}

impl LocalContentSource for StoreRepository<'_> {
    fn content(&self, hash: &ContentHash) -> Result<Option<Vec<u8>>, BoxError> {
        if let Some(&index) = self.pending_index.get(hash) {
            return Ok(Some(self.pending[index].1.clone()));
        }
        Ok(self.store.get(hash)?)
    }
}

impl ChunkRepository for StoreRepository<'_> {
    fn remember(&mut self, hash: ContentHash, data: &[u8]) -> Result<(), BoxError> {
        if !self.pending_index.contains_key(&hash) {
            self.pending_index.insert(hash, self.pending.len());
            self.pending.push((hash, data.to_vec()));
        }
        Ok(())
    }

    fn end_of_frame(&mut self) -> Result<(), BoxError> {
        let chunks: Vec<(ContentHash, &[u8])> = self
            .pending
            .iter()
            .map(|(hash, data)| (*hash, &data[..]))
            .collect();
        self.store.commit_batch(&chunks, &[])?;
        self.pending.clear();
        self.pending_index.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn pseudo_random(length: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        (0..length)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn put_get_contains_and_references() {
        let directory = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(directory.path()).unwrap();
        let first = pseudo_random(10_000, 1);
        let second = pseudo_random(20_000, 2);
        let hashes = store.put_many(&[&first, &second, &first]).unwrap();
        assert_eq!(hashes[0], hashes[2]);
        assert_eq!(store.get(&hashes[0]).unwrap().unwrap(), first);
        assert_eq!(store.get(&hashes[1]).unwrap().unwrap(), second);
        assert_eq!(store.references(&hashes[0]).unwrap(), 2);
        let absent = ContentHash::of(b"absent");
        assert_eq!(
            store.which_of(&[hashes[1], absent, hashes[0]]).unwrap(),
            vec![true, false, true]
        );
        assert!(store.get(&absent).unwrap().is_none());
    }

    #[test]
    fn contents_survive_reopening() {
        let directory = tempfile::tempdir().unwrap();
        let data = pseudo_random(50_000, 3);
        let hash = ChunkStore::open(directory.path())
            .unwrap()
            .put(&data)
            .unwrap();
        let store = ChunkStore::open(directory.path()).unwrap();
        assert_eq!(store.get(&hash).unwrap().unwrap(), data);
        // Appending after reopening continues the same pack.
        let more = pseudo_random(1000, 4);
        let more_hash = store.put(&more).unwrap();
        assert_eq!(store.get(&more_hash).unwrap().unwrap(), more);
        assert_eq!(store.get(&hash).unwrap().unwrap(), data);
    }

    #[test]
    fn uncommitted_pack_tail_is_truncated_on_open() {
        let directory = tempfile::tempdir().unwrap();
        let data = pseudo_random(5000, 5);
        let hash = ChunkStore::open(directory.path())
            .unwrap()
            .put(&data)
            .unwrap();
        // A crash after writing a batch's bytes but before its index commit leaves a tail.
        let pack = pack_path(directory.path(), 1);
        let committed = std::fs::metadata(&pack).unwrap().len();
        {
            let file = OpenOptions::new().append(true).open(&pack).unwrap();
            file.write_all_at(&pseudo_random(3000, 6), committed)
                .unwrap();
        }
        let store = ChunkStore::open(directory.path()).unwrap();
        assert_eq!(std::fs::metadata(&pack).unwrap().len(), committed);
        assert_eq!(store.get(&hash).unwrap().unwrap(), data);
    }

    #[test]
    fn damaged_pack_is_reported_not_returned() {
        let directory = tempfile::tempdir().unwrap();
        let data = pseudo_random(5000, 7);
        let store = ChunkStore::open(directory.path()).unwrap();
        let hash = store.put(&data).unwrap();
        let pack = pack_path(directory.path(), 1);
        let file = OpenOptions::new().write(true).open(&pack).unwrap();
        file.write_all_at(&[0xff; 16], PACK_MAGIC.len() as u64 + 100)
            .unwrap();
        assert!(matches!(
            store.get(&hash),
            Err(StoreError::CorruptData { .. })
        ));
    }

    #[test]
    fn other_format_versions_are_refused() {
        let directory = tempfile::tempdir().unwrap();
        drop(ChunkStore::open(directory.path()).unwrap());
        {
            let database = redb::Database::create(directory.path().join("index.redb")).unwrap();
            let transaction = database.begin_write().unwrap();
            transaction
                .open_table(META)
                .unwrap()
                .insert("format_version", 99)
                .unwrap();
            transaction.commit().unwrap();
        }
        assert!(matches!(
            ChunkStore::open(directory.path()),
            Err(StoreError::UnsupportedVersion { found: 99, .. })
        ));
    }

    #[test]
    fn image_is_indexed_by_chunks_and_aligned_blocks() {
        let directory = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(directory.path()).unwrap();
        let mut image = pseudo_random(3 << 20, 8);
        image[1 << 20..(1 << 20) + 200_000].fill(0);
        image.extend_from_slice(&pseudo_random(1234, 9)); // a ragged tail
        let summary = store.put_image("base", &image[..]).unwrap();
        assert_eq!(summary.length, image.len() as u64);
        let zero_blocks = image
            .chunks_exact(BLOCK_SIZE)
            .filter(|block| is_zero(block))
            .count();
        assert_eq!(
            summary.indexed_blocks as usize,
            image.len() / BLOCK_SIZE - zero_blocks
        );

        // Every non-zero aligned block, as a guest page holding file data would be found.
        for (index, block) in image.chunks_exact(BLOCK_SIZE).enumerate().step_by(37) {
            if is_zero(block) {
                continue;
            }
            let hash = ContentHash::of(block);
            assert!(store.contains(&hash).unwrap(), "block {index} not indexed");
            assert_eq!(store.get(&hash).unwrap().unwrap(), block, "block {index}");
        }
        // An unaligned 4 KiB window is not indexed.
        assert!(
            !store
                .contains(&ContentHash::of(&image[100..100 + BLOCK_SIZE]))
                .unwrap()
        );

        let mut copy = Vec::new();
        assert_eq!(
            store.read_image("base", &mut copy).unwrap(),
            image.len() as u64
        );
        assert!(copy == image);
        assert_eq!(
            store.image_manifest("base").unwrap().unwrap().length,
            image.len() as u64
        );

        // Storing it again adds no data.
        let again = store.put_image("base-again", &image[..]).unwrap();
        assert_eq!(again.new_chunks, 0);
        assert_eq!(again.new_bytes, 0);
        assert!(matches!(
            store.read_image("missing", std::io::sink()),
            Err(StoreError::ImageNotFound { .. })
        ));
    }

    #[test]
    fn decoder_repository_stores_received_chunks() {
        let directory = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(directory.path()).unwrap();
        let data = pseudo_random(300_000, 10);
        let mut encoder =
            crate::chunk::ChunkEncoder::new(crate::chunk::ChunkEncoderConfig::default(), &store)
                .unwrap();
        let mut frames = Vec::new();
        encoder
            .encode_reader(&data[..], |frame| {
                frames.push(frame.to_vec());
                Ok(())
            })
            .unwrap();
        let mut decoder = crate::chunk::ChunkDecoder::new(
            crate::chunk::ChunkDecoderConfig::default(),
            StoreRepository::new(&store),
        )
        .unwrap();
        let mut output = Vec::new();
        for frame in &frames {
            decoder
                .decode_frame(frame, |bytes| {
                    output.extend_from_slice(bytes);
                    Ok(())
                })
                .unwrap();
        }
        assert!(output == data);
        // A second transfer of the same data now sends hashes only.
        let mut encoder =
            crate::chunk::ChunkEncoder::new(crate::chunk::ChunkEncoderConfig::default(), &store)
                .unwrap();
        let mut wire = 0usize;
        encoder
            .encode_reader(&data[..], |frame| {
                wire += frame.len();
                Ok(())
            })
            .unwrap();
        assert!(wire < 2000, "second transfer sent {wire} bytes");
    }
}
