//! Blocks a migration's disk mirror carried to the destination, offered to the same migration's
//! memory session.
//!
//! A guest's page cache holds what it recently read and wrote. Blocks it read from the base
//! image are found at the destination in its copy of the image ([`crate::ImagePageIndex`]); blocks
//! it wrote live in its overlay, which the disk mirror copies to the destination before the
//! memory phase starts. Without this, those pages cross the link twice: once as disk blocks, once
//! as RAM.
//!
//! Both sides record, in the order of the disk stream, each distinct non-zero 4 KiB block the
//! mirror writes that is not in the base image, up to [`DELIVERED_PAGE_LIMIT`] blocks. The
//! source keeps the hashes (the memory encoder treats them as held by the destination); the
//! destination keeps the contents, appended to an unlinked spill file, and the memory decoder
//! reads them back by hash. Both see the same blocks in the same order, so both hold the same
//! set. Nothing is ever removed: a block the guest later overwrites on its disk stays readable
//! under its old hash.
//!
//! The two sessions are not ordered: the memory session can refer to a block still in flight on
//! the disk session. The destination then waits for it (at most the configured wait; the disk
//! session ending or failing wakes waiters at once).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use novacron_codec::{BoxError, ContentHash, ContentHashBuildHasher};

use crate::PAGE_SIZE;

/// Distinct blocks recorded per migration, at most: 4 GiB of disk writes (a spill file of that
/// size at the destination, about 80 MB of hashes at the source). Both sides must use the same
/// limit; it is part of the proxy's protocol version.
pub const DELIVERED_PAGE_LIMIT: usize = 1 << 20;

/// How long the destination waits, by default, for a block the memory session refers to that
/// the disk session has not delivered yet.
pub const DEFAULT_DELIVERY_WAIT: Duration = Duration::from_secs(120);

/// The blocks one migration's disk mirror delivered (see the module's documentation). Shared by
/// the migration's disk and memory proxies on one host.
#[derive(Debug)]
pub struct DeliveredPages {
    state: Mutex<State>,
    arrived: Condvar,
    /// The destination's copy of the blocks (`None` at the source, which keeps only hashes).
    spill: Option<File>,
    limit: usize,
    wait: Duration,
}

#[derive(Debug, Default)]
struct State {
    /// Block hash → offset in the spill file (0 at the source).
    offsets: HashMap<ContentHash, u64, ContentHashBuildHasher>,
    spill_length: u64,
    /// The disk session that delivers blocks is not running (ended or failed): a block not here
    /// now will not come.
    idle: bool,
    /// The first spill write that failed: the destination then holds fewer blocks than the
    /// source believes, and every later lookup of a missing block fails with this.
    broken: Option<String>,
    /// Blocks the memory session read back (destination) or referred to (source).
    used: u64,
}

impl DeliveredPages {
    /// The source's record: hashes only.
    pub fn at_source() -> Self {
        Self::new(None, DELIVERED_PAGE_LIMIT, DEFAULT_DELIVERY_WAIT)
    }

    /// The destination's record: block contents kept in a spill file created in `directory` and
    /// unlinked at once (nothing is left behind, whatever happens to this process).
    pub fn at_destination(directory: &Path) -> std::io::Result<Self> {
        Self::at_destination_with(directory, DELIVERED_PAGE_LIMIT, DEFAULT_DELIVERY_WAIT)
    }

    /// [`DeliveredPages::at_destination`] with another limit and wait (tests).
    pub fn at_destination_with(
        directory: &Path,
        limit: usize,
        wait: Duration,
    ) -> std::io::Result<Self> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let path = directory.join(format!(
            ".delivered-pages-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        std::fs::remove_file(&path)?;
        Ok(Self::new(Some(file), limit, wait))
    }

    /// [`DeliveredPages::at_source`] with another limit (tests).
    pub fn at_source_with(limit: usize) -> Self {
        Self::new(None, limit, DEFAULT_DELIVERY_WAIT)
    }

    fn new(spill: Option<File>, limit: usize, wait: Duration) -> Self {
        Self {
            state: Mutex::new(State::default()),
            arrived: Condvar::new(),
            spill,
            limit,
            wait,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a block the disk session carries (`hash` is its content hash). Zero blocks and
    /// blocks of the base image are the caller's to leave out, on both sides alike.
    pub fn record(&self, hash: ContentHash, block: &[u8]) {
        let mut state = self.lock();
        state.idle = false;
        if state.offsets.len() >= self.limit || state.offsets.contains_key(&hash) {
            return;
        }
        let offset = state.spill_length;
        if let Some(spill) = &self.spill {
            if state.broken.is_some() {
                return;
            }
            if let Err(error) = spill.write_all_at(block, offset) {
                state.broken = Some(format!(
                    "keeping a block the disk mirror delivered failed: {error}"
                ));
                drop(state);
                self.arrived.notify_all();
                return;
            }
            state.spill_length += block.len() as u64;
        }
        state.offsets.insert(hash, offset);
        drop(state);
        self.arrived.notify_all();
    }

    /// The disk session stopped delivering (it ended, or failed): waiters for a block that is
    /// not here give up at once. A later [`DeliveredPages::record`] (a reconnected mirror)
    /// makes it deliver again.
    pub fn set_idle(&self) {
        self.lock().idle = true;
        self.arrived.notify_all();
    }

    /// Whether `hash` was recorded (the source's question).
    pub fn contains(&self, hash: &ContentHash) -> bool {
        self.lock().offsets.contains_key(hash)
    }

    /// Records that the memory session used `count` recorded blocks (the source's count).
    pub fn note_used(&self, count: u64) {
        self.lock().used += count;
    }

    /// Distinct blocks recorded.
    pub fn len(&self) -> usize {
        self.lock().offsets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Blocks the memory session read back (destination) or referred to (source).
    pub fn used(&self) -> u64 {
        self.lock().used
    }

    /// The content of `hash`, waiting for it while the disk session may still deliver it
    /// (destination). `Ok(None)`: not delivered and not coming (or this is the source).
    pub fn content(&self, hash: &ContentHash) -> Result<Option<Vec<u8>>, BoxError> {
        let Some(spill) = &self.spill else {
            return Ok(None);
        };
        let deadline = Instant::now() + self.wait;
        let mut state = self.lock();
        let offset = loop {
            if let Some(&offset) = state.offsets.get(hash) {
                break offset;
            }
            if let Some(broken) = &state.broken {
                return Err(broken.clone().into());
            }
            let now = Instant::now();
            if state.idle || now >= deadline {
                return Ok(None);
            }
            state = self
                .arrived
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        };
        state.used += 1;
        drop(state);
        let mut block = vec![0u8; PAGE_SIZE];
        spill.read_exact_at(&mut block, offset)?;
        Ok(Some(block))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn block(fill: u8) -> (ContentHash, Vec<u8>) {
        let data = vec![fill; PAGE_SIZE];
        (ContentHash::of(&data), data)
    }

    #[test]
    fn both_sides_record_the_same_blocks_up_to_the_limit_and_the_destination_reads_them_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = DeliveredPages::at_source_with(2);
        let destination =
            DeliveredPages::at_destination_with(dir.path(), 2, Duration::from_secs(5))
                .expect("destination");
        // The spill file is unlinked: nothing is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        for fill in [1u8, 1, 2, 3] {
            let (hash, data) = block(fill);
            source.record(hash, &data);
            destination.record(hash, &data);
        }
        for fill in [1u8, 2] {
            let (hash, data) = block(fill);
            assert!(source.contains(&hash));
            assert_eq!(destination.content(&hash).unwrap(), Some(data));
        }
        // Over the limit on both sides alike.
        let (three, _) = block(3);
        assert!(!source.contains(&three));
        destination.set_idle();
        assert_eq!(destination.content(&three).unwrap(), None);
        assert_eq!(source.len(), 2);
        assert_eq!(destination.used(), 2);
        // The source holds no contents.
        assert_eq!(source.content(&block(1).0).unwrap(), None);
    }

    #[test]
    fn a_block_still_in_flight_is_waited_for_and_an_idle_disk_session_ends_the_wait() {
        let dir = tempfile::tempdir().expect("tempdir");
        let destination = Arc::new(
            DeliveredPages::at_destination_with(dir.path(), 16, Duration::from_secs(60))
                .expect("destination"),
        );
        let (hash, data) = block(7);
        let reader = {
            let destination = destination.clone();
            std::thread::spawn(move || destination.content(&hash))
        };
        destination.record(hash, &data);
        assert_eq!(reader.join().unwrap().unwrap(), Some(data));

        let (missing, _) = block(8);
        let waiter = {
            let destination = destination.clone();
            std::thread::spawn(move || destination.content(&missing))
        };
        destination.set_idle();
        assert_eq!(waiter.join().unwrap().unwrap(), None);
    }

    #[test]
    fn a_block_never_delivered_is_not_waited_for_beyond_the_wait() {
        let dir = tempfile::tempdir().expect("tempdir");
        let destination =
            DeliveredPages::at_destination_with(dir.path(), 16, Duration::from_millis(50))
                .expect("destination");
        assert_eq!(destination.content(&block(9).0).unwrap(), None);
    }
}
