//! Garbage collection of the chunk store.
//!
//! **What is kept**: image manifests are the roots. A chunk that no manifest lists is garbage,
//! and so is an aligned 4 KiB block whose bytes lie in such a chunk. Chunks a transfer has
//! received but not yet written a manifest for are protected by a [`ChunkPin`]: a collection
//! does not start while any pin is held, and a pin waits for a running collection to end.
//!
//! **Compaction**: packs are append-only, so dropping chunks from the index frees no disk space
//! by itself. A pack whose live chunks fill less than half of it is rewritten: its live chunks
//! are appended to the current pack and synced, one index transaction moves them and forgets
//! the old pack, and only then is its file deleted. A crash before that transaction leaves the
//! copies past the committed length (truncated at the next open); a crash after it leaves a pack
//! file the index no longer lists, which the next open deletes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex};

use redb::{ReadableDatabase, ReadableTable, WriteTransaction};

use super::{
    ALIGNED_BLOCKS, CHUNKS, ChunkLocation, ChunkStore, IMAGES, ImageManifest, PACK_MAGIC, PACKS,
    PackWriter, StoreError, decode_block_location, pack_path,
};
use crate::hash::ContentHash;

/// A pack is rewritten when its live chunks fill less than this share of it.
const COMPACT_BELOW_LIVE_SHARE: f64 = 0.5;
/// Live bytes copied per sync while rewriting a pack.
const COMPACTION_BATCH_BYTES: usize = 64 << 20;

/// What a collection found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CollectionSummary {
    /// Image manifests (the roots).
    pub images: u64,
    /// Chunks kept because a manifest lists them.
    pub live_chunks: u64,
    /// Chunks dropped from the index.
    pub chunks_removed: u64,
    /// Aligned 4 KiB blocks dropped with them.
    pub aligned_blocks_removed: u64,
    /// Packs rewritten (or deleted outright when nothing in them was live).
    pub packs_rewritten: u64,
    /// Live bytes copied out of rewritten packs.
    pub bytes_moved: u64,
    /// Disk space given back: the length of every deleted pack.
    pub bytes_reclaimed: u64,
    /// Bytes in packs after the collection.
    pub pack_bytes: u64,
}

#[derive(Debug, Default)]
struct GateState {
    pins: usize,
    collecting: bool,
    /// A collection was refused because of a pin.
    postponed: bool,
}

/// Shared between a store and its pins.
#[derive(Debug, Default)]
pub(super) struct CollectionGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl CollectionGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The state, once no collection is running.
    fn lock_when_not_collecting(&self) -> std::sync::MutexGuard<'_, GateState> {
        let mut state = self.lock();
        while state.collecting {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        state
    }
}

/// Keeps every chunk in the store while it lives: held by a transfer from its first hash
/// question until the received image's manifest is written.
#[derive(Debug)]
#[must_use = "chunks are protected only while the pin lives"]
pub struct ChunkPin {
    gate: Arc<CollectionGate>,
}

impl Drop for ChunkPin {
    fn drop(&mut self) {
        let mut state = self.gate.lock();
        state.pins -= 1;
        self.gate.changed.notify_all();
    }
}

/// Marks a collection as running until dropped.
struct Collecting<'a> {
    gate: &'a CollectionGate,
}

impl Drop for Collecting<'_> {
    fn drop(&mut self) {
        let mut state = self.gate.lock();
        state.collecting = false;
        self.gate.changed.notify_all();
    }
}

impl ChunkStore {
    /// Protects every chunk from collection until the pin is dropped; waits for a collection
    /// that is running (it blocks: call it off the async runtime).
    pub fn pin(&self) -> ChunkPin {
        let mut state = self.gate.lock_when_not_collecting();
        state.pins += 1;
        ChunkPin {
            gate: Arc::clone(&self.gate),
        }
    }

    /// Whether a collection was refused because of a pin since the last one ran: the holder of
    /// the last pin should then run one.
    pub fn collection_postponed(&self) -> bool {
        self.gate.lock().postponed
    }

    /// Forgets an image's manifest; its chunks stay until [`ChunkStore::collect_garbage`].
    /// Returns false if the store had no such image.
    pub fn remove_image(&self, name: &str) -> Result<bool, StoreError> {
        let transaction = self
            .database
            .begin_write()
            .map_err(|error| self.index_error(error))?;
        let removed = {
            let mut images = transaction
                .open_table(IMAGES)
                .map_err(|error| self.index_error(error))?;
            images
                .remove(name)
                .map_err(|error| self.index_error(error))?
                .is_some()
        };
        transaction
            .commit()
            .map_err(|error| self.index_error(error))?;
        Ok(removed)
    }

    /// Drops every chunk no image manifest lists (and the aligned blocks inside them), then
    /// rewrites packs that are mostly garbage. Returns `None`, having changed nothing, while a
    /// [`ChunkPin`] is held (see [`ChunkStore::collection_postponed`]); waits for a collection
    /// already running, then runs. Writers wait for the collection; readers do not. Blocks:
    /// call it off the async runtime.
    pub fn collect_garbage(&self) -> Result<Option<CollectionSummary>, StoreError> {
        let _collecting = {
            // A collection already running may have marked before the caller's change.
            let mut state = self.gate.lock_when_not_collecting();
            if state.pins > 0 {
                state.postponed = true;
                return Ok(None);
            }
            state.collecting = true;
            state.postponed = false;
            Collecting { gate: &self.gate }
        };
        let mut writer_slot = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut summary = CollectionSummary::default();

        let transaction = self
            .database
            .begin_write()
            .map_err(|error| self.index_error(error))?;
        let live_by_pack = self.sweep(&transaction, &mut summary)?;
        let pack_lengths: Vec<(u32, u64)> = {
            let packs = transaction
                .open_table(PACKS)
                .map_err(|error| self.index_error(error))?;
            packs
                .iter()
                .map_err(|error| self.index_error(error))?
                .map(|entry| {
                    let (id, length) = entry.map_err(|error| self.index_error(error))?;
                    Ok((id.value(), length.value()))
                })
                .collect::<Result<_, StoreError>>()?
        };
        transaction
            .commit()
            .map_err(|error| self.index_error(error))?;

        let candidates: Vec<(u32, u64)> = pack_lengths
            .into_iter()
            .filter(|&(id, length)| {
                let live_bytes: u64 = live_by_pack.get(&id).map_or(0, |live| {
                    live.iter()
                        .map(|(_, location)| u64::from(location.length))
                        .sum()
                });
                let payload = length.saturating_sub(PACK_MAGIC.len() as u64);
                payload > 0 && (live_bytes as f64) < COMPACT_BELOW_LIVE_SHARE * payload as f64
            })
            .collect();
        // Appends must not land in a pack about to be deleted: if the current pack is one, the
        // next append (the first moved chunk included) starts a new pack.
        if let Some(writer) = writer_slot.as_mut()
            && candidates.iter().any(|&(id, _)| id == writer.id)
        {
            writer.sealed = true;
        }
        for (id, length) in candidates {
            let live = live_by_pack.get(&id).map_or(&[][..], Vec::as_slice);
            self.rewrite_pack(&mut writer_slot, id, length, live, &mut summary)?;
        }
        summary.pack_bytes = self.committed_pack_bytes()?;
        Ok(Some(summary))
    }

    fn committed_pack_bytes(&self) -> Result<u64, StoreError> {
        let transaction = self
            .database
            .begin_read()
            .map_err(|error| self.index_error(error))?;
        let packs = transaction
            .open_table(PACKS)
            .map_err(|error| self.index_error(error))?;
        let mut total = 0;
        for entry in packs.iter().map_err(|error| self.index_error(error))? {
            total += entry.map_err(|error| self.index_error(error))?.1.value();
        }
        Ok(total)
    }

    /// Mark and sweep inside `transaction`; returns the live chunks of each pack.
    fn sweep(
        &self,
        transaction: &WriteTransaction,
        summary: &mut CollectionSummary,
    ) -> Result<HashMap<u32, Vec<(ContentHash, ChunkLocation)>>, StoreError> {
        let index_error = |error: redb::StorageError| self.index_error(error);
        let mut live = HashSet::new();
        {
            let images = transaction
                .open_table(IMAGES)
                .map_err(|error| self.index_error(error))?;
            for entry in images.iter().map_err(index_error)? {
                let (name, record) = entry.map_err(index_error)?;
                let manifest =
                    ImageManifest::decode(record.value()).ok_or(StoreError::CorruptRecord {
                        hash: ContentHash([0; 32]),
                        reason: "image manifest is malformed",
                    })?;
                tracing::trace!(
                    image = name.value(),
                    chunks = manifest.chunks.len(),
                    "live image"
                );
                summary.images += 1;
                live.extend(manifest.chunks.iter().map(|entry| entry.hash));
            }
        }
        let mut by_pack: HashMap<u32, Vec<(ContentHash, ChunkLocation)>> = HashMap::new();
        {
            let mut chunks = transaction
                .open_table(CHUNKS)
                .map_err(|error| self.index_error(error))?;
            let mut dead = Vec::new();
            for entry in chunks.iter().map_err(index_error)? {
                let (key, record) = entry.map_err(index_error)?;
                let hash = ContentHash(*key.value());
                if live.contains(&hash) {
                    let location = ChunkLocation::decode(hash, record.value())?;
                    by_pack
                        .entry(location.pack)
                        .or_default()
                        .push((hash, location));
                    summary.live_chunks += 1;
                } else {
                    dead.push(hash);
                }
            }
            for hash in &dead {
                chunks.remove(hash.as_bytes()).map_err(index_error)?;
            }
            summary.chunks_removed = dead.len() as u64;
        }
        {
            let mut aligned = transaction
                .open_table(ALIGNED_BLOCKS)
                .map_err(|error| self.index_error(error))?;
            let mut stale = Vec::new();
            for entry in aligned.iter().map_err(index_error)? {
                let (key, record) = entry.map_err(index_error)?;
                let hash = ContentHash(*key.value());
                let segments = decode_block_location(hash, record.value())?;
                if segments
                    .iter()
                    .any(|segment| !live.contains(&segment.chunk))
                {
                    stale.push(hash);
                }
            }
            for hash in &stale {
                aligned.remove(hash.as_bytes()).map_err(index_error)?;
            }
            summary.aligned_blocks_removed = stale.len() as u64;
        }
        for chunks in by_pack.values_mut() {
            chunks.sort_unstable_by_key(|(_, location)| location.offset);
        }
        Ok(by_pack)
    }

    /// Copies a pack's live chunks to the current pack, moves them in the index, forgets the
    /// pack and deletes its file.
    fn rewrite_pack(
        &self,
        writer_slot: &mut Option<PackWriter>,
        id: u32,
        length: u64,
        live: &[(ContentHash, ChunkLocation)],
        summary: &mut CollectionSummary,
    ) -> Result<(), StoreError> {
        let mut moved: Vec<(ContentHash, ChunkLocation)> = Vec::with_capacity(live.len());
        let mut touched: HashMap<u32, u64> = HashMap::new();
        let mut start = 0;
        while start < live.len() {
            let mut end = start;
            let mut batch_bytes = 0usize;
            while end < live.len() && (end == start || batch_bytes < COMPACTION_BATCH_BYTES) {
                batch_bytes += live[end].1.length as usize;
                end += 1;
            }
            let mut data = Vec::with_capacity(end - start);
            for (hash, location) in &live[start..end] {
                let bytes = self.read_range(location, 0, location.length as usize)?;
                if ContentHash::of(&bytes) != *hash {
                    return Err(StoreError::CorruptData {
                        hash: *hash,
                        path: pack_path(&self.root, id),
                    });
                }
                data.push((*hash, bytes));
            }
            let pieces: Vec<(ContentHash, &[u8])> = data
                .iter()
                .map(|(hash, bytes)| (*hash, bytes.as_slice()))
                .collect();
            let appended = self.append_chunks(writer_slot, &pieces)?;
            for ((hash, old), (pack, offset)) in live[start..end].iter().zip(appended.positions) {
                moved.push((
                    *hash,
                    ChunkLocation {
                        pack,
                        offset,
                        ..*old
                    },
                ));
            }
            touched.extend(appended.touched_packs);
            summary.bytes_moved += appended.bytes;
            start = end;
        }

        let transaction = self
            .database
            .begin_write()
            .map_err(|error| self.index_error(error))?;
        {
            let mut chunks = transaction
                .open_table(CHUNKS)
                .map_err(|error| self.index_error(error))?;
            for (hash, location) in &moved {
                chunks
                    .insert(hash.as_bytes(), &location.encode()[..])
                    .map_err(|error| self.index_error(error))?;
            }
            let mut packs = transaction
                .open_table(PACKS)
                .map_err(|error| self.index_error(error))?;
            for (pack, pack_length) in &touched {
                packs
                    .insert(*pack, *pack_length)
                    .map_err(|error| self.index_error(error))?;
            }
            packs.remove(id).map_err(|error| self.index_error(error))?;
        }
        transaction
            .commit()
            .map_err(|error| self.index_error(error))?;

        self.readers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id);
        let path = pack_path(&self.root, id);
        if let Err(error) = std::fs::remove_file(&path) {
            // The index no longer lists it; the next open deletes it.
            tracing::warn!(pack = %path.display(), %error, "cannot delete a rewritten pack");
        }
        summary.packs_rewritten += 1;
        summary.bytes_reclaimed += length;
        tracing::debug!(
            pack = id,
            length,
            live_chunks = live.len(),
            "pack rewritten"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::tests::pseudo_random;

    /// A new chunk can be stored and read back.
    fn assert_writable(store: &ChunkStore, seed: u64) {
        let fresh = pseudo_random(50_000, seed);
        let hash = store.put(&fresh).unwrap();
        assert_eq!(store.get(&hash).unwrap().unwrap(), fresh);
    }

    fn pack_files_bytes(store: &ChunkStore) -> u64 {
        std::fs::read_dir(store.root().join("packs"))
            .unwrap()
            .map(|entry| entry.unwrap().metadata().unwrap().len())
            .sum()
    }

    fn read_back(store: &ChunkStore, name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        store.read_image(name, &mut out).unwrap();
        out
    }

    #[test]
    fn chunks_no_manifest_lists_are_collected_and_their_space_comes_back() {
        let directory = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(directory.path()).unwrap();
        let kept = pseudo_random(3 << 20, 1);
        let dropped = pseudo_random(5 << 20, 2);
        store.put_image("kept", &kept[..]).unwrap();
        store.put_image("dropped", &dropped[..]).unwrap();
        let loose = store.put(&pseudo_random(10_000, 3)).unwrap();
        let dropped_block = ContentHash::of(&dropped[8192..12288]);
        let kept_block = ContentHash::of(&kept[8192..12288]);
        assert!(store.contains(&dropped_block).unwrap());

        // Both images are roots: only the loose chunk goes, and no pack is worth rewriting.
        let first = store.collect_garbage().unwrap().unwrap();
        assert_eq!(first.images, 2);
        assert_eq!(first.chunks_removed, 1);
        assert_eq!(first.packs_rewritten, 0);
        assert!(!store.contains(&loose).unwrap());
        assert_eq!(read_back(&store, "dropped"), dropped);

        let before = pack_files_bytes(&store);
        assert!(store.remove_image("dropped").unwrap());
        assert!(!store.remove_image("dropped").unwrap());
        let second = store.collect_garbage().unwrap().unwrap();
        assert_eq!(second.images, 1);
        assert!(second.chunks_removed > 50, "{second:?}");
        assert!(second.aligned_blocks_removed >= 1280, "{second:?}");
        // One pack held both images; more than half of it was garbage, so it was rewritten.
        assert_eq!(second.packs_rewritten, 1, "{second:?}");
        assert_eq!(second.bytes_moved, kept.len() as u64);
        let after = pack_files_bytes(&store);
        assert_eq!(after, second.pack_bytes);
        assert!(
            after < before - (5 << 20) + (64 << 10),
            "{before} -> {after}"
        );
        assert!(!store.contains(&dropped_block).unwrap());
        assert!(store.get(&dropped_block).unwrap().is_none());
        assert!(store.get(&kept_block).unwrap().is_some());
        assert_eq!(read_back(&store, "kept"), kept);

        // New chunks go on after the rewrite, and everything survives reopening.
        let more = pseudo_random(100_000, 4);
        let more_hash = store.put(&more).unwrap();
        drop(store);
        let store = ChunkStore::open(directory.path()).unwrap();
        assert_eq!(read_back(&store, "kept"), kept);
        assert_eq!(store.get(&more_hash).unwrap().unwrap(), more);
        assert!(store.get(&kept_block).unwrap().is_some());
    }

    #[test]
    fn a_rewrite_never_moves_chunks_into_a_pack_it_then_deletes() {
        let directory = tempfile::tempdir().unwrap();
        let mut store = ChunkStore::open(directory.path()).unwrap();
        store.pack_rotate_length = 1 << 20;
        // Pack 1: "first" and most of "dropped". Pack 2, the current one and still open for
        // appends: the rest of "dropped" and "second". Once "dropped" goes, both packs are
        // mostly garbage; the live chunks of pack 1 must not be moved into pack 2.
        let first = pseudo_random(200 << 10, 10);
        let dropped = pseudo_random(1536 << 10, 11);
        let second = pseudo_random(200 << 10, 12);
        store.put_image("first", &first[..]).unwrap();
        store.put_image("dropped", &dropped[..]).unwrap();
        store.put_image("second", &second[..]).unwrap();
        assert_eq!(
            std::fs::read_dir(directory.path().join("packs"))
                .unwrap()
                .count(),
            2
        );
        assert!(store.remove_image("dropped").unwrap());
        let summary = store.collect_garbage().unwrap().unwrap();
        assert_eq!(summary.packs_rewritten, 2, "{summary:?}");
        assert_eq!(
            summary.bytes_moved,
            (first.len() + second.len()) as u64,
            "{summary:?}"
        );
        assert_eq!(read_back(&store, "first"), first);
        assert_eq!(read_back(&store, "second"), second);
        assert_eq!(pack_files_bytes(&store), summary.pack_bytes);
        drop(store);
        let store = ChunkStore::open(directory.path()).unwrap();
        assert_eq!(read_back(&store, "first"), first);
        assert_eq!(read_back(&store, "second"), second);
        assert_writable(&store, 13);
    }

    #[test]
    fn a_pin_holds_off_collection_until_dropped() {
        let directory = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(directory.path()).unwrap();
        let received = store.put(&pseudo_random(20_000, 5)).unwrap();
        let pin = store.pin();
        let second_pin = store.pin();
        assert!(!store.collection_postponed());
        assert_eq!(store.collect_garbage().unwrap(), None);
        assert!(store.collection_postponed());
        drop(pin);
        assert_eq!(store.collect_garbage().unwrap(), None);
        assert!(store.contains(&received).unwrap());
        drop(second_pin);
        assert!(store.collection_postponed());
        let summary = store.collect_garbage().unwrap().unwrap();
        assert_eq!(summary.chunks_removed, 1);
        // Nothing live was left in the only pack: it is gone and the next write starts another.
        assert_eq!(summary.packs_rewritten, 1);
        assert_eq!(summary.pack_bytes, 0);
        assert!(!store.collection_postponed());
        assert!(!store.contains(&received).unwrap());
        assert_writable(&store, 6);
    }

    #[test]
    fn a_pin_waits_for_a_running_collection() {
        let directory = tempfile::tempdir().unwrap();
        let store = Arc::new(ChunkStore::open(directory.path()).unwrap());
        // Hold the collection open by marking it running, as collect_garbage does.
        store.gate.lock().collecting = true;
        let pinner = {
            let store = Arc::clone(&store);
            std::thread::spawn(move || drop(store.pin()))
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(300);
        while std::time::Instant::now() < deadline {
            assert!(
                !pinner.is_finished(),
                "a pin was granted during a collection"
            );
            std::thread::yield_now();
        }
        drop(Collecting { gate: &store.gate });
        pinner.join().unwrap();
        assert_eq!(store.gate.lock().pins, 0);
    }

    #[test]
    fn opening_deletes_pack_files_the_index_does_not_list() {
        let directory = tempfile::tempdir().unwrap();
        let data = pseudo_random(40_000, 7);
        let hash = ChunkStore::open(directory.path())
            .unwrap()
            .put(&data)
            .unwrap();
        // What a crash leaves after a rewrite committed but before its old pack was deleted,
        // or after a new pack was created but before its first batch committed.
        let stray = pack_path(directory.path(), 7);
        std::fs::write(&stray, b"NCPACK01 stray bytes").unwrap();
        let unrelated = directory.path().join("packs").join("notes.txt");
        std::fs::write(&unrelated, b"kept").unwrap();
        let store = ChunkStore::open(directory.path()).unwrap();
        assert!(!stray.exists());
        assert!(unrelated.exists());
        assert_eq!(store.get(&hash).unwrap().unwrap(), data);
    }

    #[test]
    fn a_lookup_that_races_a_rewrite_reads_the_new_place() {
        let directory = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(directory.path()).unwrap();
        let kept = pseudo_random(1 << 20, 8);
        store.put_image("kept", &kept[..]).unwrap();
        store.put(&pseudo_random(4 << 20, 9)).unwrap();
        let block = ContentHash::of(&kept[4096..8192]);
        // A reader resolved the block in pack 1 just before the collection rewrote it.
        let stale = store.database.begin_read().unwrap();
        let summary = store.collect_garbage().unwrap().unwrap();
        assert_eq!(summary.packs_rewritten, 1);
        assert!(!pack_path(directory.path(), 1).exists());
        // The old snapshot still points into pack 1; a direct read there fails with NotFound...
        let location = store
            .chunk_location(
                &stale,
                &store.image_manifest("kept").unwrap().unwrap().chunks[0].hash,
            )
            .unwrap()
            .unwrap();
        assert_eq!(location.pack, 1);
        match store.read_range(&location, 0, 16) {
            Err(StoreError::Pack {
                operation: "opening",
                source,
                ..
            }) => {
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound)
            }
            other => panic!("expected the old pack to be gone, got {other:?}"),
        }
        // ...which `get` answers by looking again.
        assert_eq!(store.get(&block).unwrap().unwrap(), kept[4096..8192]);
    }
}
