//! The files of a direct kernel boot (kernel, initrd) as a migration's codec holds them:
//! hashed and indexed with what the guest unpacks from them, so that RAM pages equal to one of
//! their blocks travel as hashes when both hosts hold the same file.
//!
//! Indexing a distribution kernel and its initramfs takes about 0.2 s of CPU. A migration
//! needs the index on both hosts before its copy starts (the destination names the files it
//! holds in its answer to `Begin`), so every region member keeps the boot files of the
//! region's VMs that it holds indexed ahead of time ([`keep_boot_files_indexed`]); a
//! migration then finds them in [`Shared::held_file_indexes`] instead of indexing them on its
//! critical path.

use crate::host::Shared;
use crate::records::VM_PREFIX;
use novacron_migration::HeldFile;
use novacron_store::{Consistency, Store, WatchEvent};
use novacron_types::VmRecord;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A file as the held-file cache knows it: a file replaced or rewritten (another inode, size
/// or modification time) is hashed and indexed again.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct HeldFileKey {
    path: std::path::PathBuf,
    device: u64,
    inode: u64,
    length: u64,
    modified_ns: i128,
}

impl HeldFileKey {
    fn of(path: &std::path::Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let metadata = std::fs::metadata(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            device: metadata.dev(),
            inode: metadata.ino(),
            length: metadata.len(),
            modified_ns: i128::from(metadata.mtime()) * 1_000_000_000
                + i128::from(metadata.mtime_nsec()),
        })
    }
}

/// The kernel and initrd of the VM's direct kernel boot, hashed and indexed with what the
/// guest unpacks from them (the kernel, the initramfs's files): RAM pages equal to one of
/// their blocks travel as hashes when both hosts hold the same file. Shared with the other
/// migrations on this host using the same files now or in the last [`super::IMAGE_PAGE_INDEX_KEEP`]
/// (an evacuation moves many VMs booted from one kernel), and usually indexed already
/// ([`keep_boot_files_indexed`]); each file is indexed once however many migrations ask at
/// once. A file that cannot be read is left out (the migration then sends those pages).
pub(super) async fn held_boot_files(shared: &Shared, record: &VmRecord) -> Vec<Arc<HeldFile>> {
    let vm = record.spec.name.to_string();
    let vm = &vm;
    // The kernel and the initrd at the same time.
    let opening = boot_files(record).map(|path| async move {
        held_boot_file(shared, path)
            .await
            .inspect_err(|error| {
                tracing::warn!(%vm, path = %path.display(), %error, "boot file not indexed; its pages are sent in full");
            })
            .ok()
    });
    futures::future::join_all(opening)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// The index of the file at `path` as it is now: the one in use or kept, else built.
async fn held_boot_file(shared: &Shared, path: &Path) -> std::io::Result<Arc<HeldFile>> {
    let key = HeldFileKey::of(path)?;
    shared
        .held_file_indexes
        .get_or_build(key, || {
            let path = path.to_path_buf();
            async move {
                tokio::task::spawn_blocking(move || HeldFile::open(&path))
                    .await
                    .unwrap_or_else(|error| Err(std::io::Error::other(error)))
                    .map(Arc::new)
            }
        })
        .await
}

/// The VM's kernel and initrd, when it boots a kernel directly.
fn boot_files(record: &VmRecord) -> impl Iterator<Item = &PathBuf> {
    record.spec.kernel.iter().chain(&record.spec.initrd)
}

/// At most this many boot files are kept indexed ahead of migrations (the ones most of the
/// region's VMs boot from): each holds its index and what the guest unpacks from it (a
/// distribution kernel unpacks to about 30 MB, kept in an unnamed temporary file).
const KEPT_AHEAD: usize = 6;

/// How long a burst of VM changes settles before the region's boot files are looked at again.
const SETTLE: Duration = Duration::from_secs(1);

/// How often the boot files are looked at again without a change (a file replaced in place
/// gets a new index then; a migration meanwhile indexes it itself).
const RELOOK: Duration = Duration::from_secs(600);

/// Keeps the boot files that the region's VMs boot from, and that this host holds, indexed
/// (see the module's documentation): looks at the VM records in this host's copy of the store,
/// indexes the [`KEPT_AHEAD`] files most of them use, and looks again when a VM names a file
/// not looked at yet, when one is removed, and every [`RELOOK`]. Files this host does not
/// hold are left out (a VM elsewhere may boot from a path that exists only there).
pub(crate) async fn keep_boot_files_indexed(shared: Arc<Shared>, store: Store) {
    let mut kept: HashMap<PathBuf, Arc<HeldFile>> = HashMap::new();
    loop {
        let listing = match store.list(VM_PREFIX, Consistency::Local).await {
            Ok(listing) => listing,
            Err(error) => {
                tracing::debug!(%error, "boot files not looked at: the store cannot list vms");
                tokio::time::sleep(SETTLE).await;
                continue;
            }
        };
        let records: Vec<VmRecord> = listing
            .items
            .iter()
            .filter_map(|item| serde_json::from_slice(&item.value).ok())
            .collect();
        let named: HashSet<PathBuf> = records.iter().flat_map(boot_files).cloned().collect();
        let mut indexed = HashMap::new();
        let held_here = |path: &Path| path.exists();
        for path in most_used(records.iter().flat_map(boot_files), KEPT_AHEAD, held_here) {
            match held_boot_file(&shared, &path).await {
                Ok(file) => {
                    indexed.insert(path, file);
                }
                Err(error) => {
                    tracing::debug!(path = %path.display(), %error, "boot file not indexed ahead of migrations");
                }
            }
        }
        if indexed.keys().collect::<HashSet<_>>() != kept.keys().collect::<HashSet<_>>() {
            tracing::info!(
                files = ?indexed.keys().collect::<Vec<_>>(),
                "boot files indexed ahead of migrations"
            );
        }
        kept = indexed;
        shared.metrics.boot_files_indexed.set(kept.len() as i64);
        // Wait for a VM naming a file not looked at yet, or a removal.
        let Ok(mut watcher) = store.watch(VM_PREFIX, listing.revision + 1) else {
            tokio::time::sleep(SETTLE).await;
            continue;
        };
        let relook = tokio::time::sleep(RELOOK);
        tokio::pin!(relook);
        loop {
            tokio::select! {
                _ = &mut relook => break,
                change = watcher.next() => match change {
                    Ok(WatchEvent::Put { key_value }) => {
                        let new_file = serde_json::from_slice::<VmRecord>(&key_value.value)
                            .is_ok_and(|record| boot_files(&record).any(|path| !named.contains(path)));
                        if new_file {
                            break;
                        }
                    }
                    Ok(WatchEvent::Delete { .. }) | Err(_) => break,
                },
            }
        }
        tokio::time::sleep(SETTLE).await;
    }
}

/// The `most` paths named most often among `named` (each VM's boot files; ties: by path) of
/// those this host `holds`.
fn most_used<'a>(
    named: impl Iterator<Item = &'a PathBuf>,
    most: usize,
    holds: impl Fn(&Path) -> bool,
) -> Vec<PathBuf> {
    let mut uses: HashMap<&PathBuf, usize> = HashMap::new();
    for path in named {
        *uses.entry(path).or_default() += 1;
    }
    let mut ranked: Vec<(&PathBuf, usize)> = uses.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    ranked
        .into_iter()
        .map(|(path, _)| path)
        .filter(|path| holds(path))
        .take(most)
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_files_most_vms_boot_from_are_kept_ahead() {
        let paths = |names: &[&str]| -> Vec<PathBuf> { names.iter().map(PathBuf::from).collect() };
        let named = paths(&[
            "/k/rare",
            "/k/common",
            "/i/common",
            "/k/common",
            "/i/common",
            "/k/other",
            "/k/common",
            "/k/other",
        ]);
        assert_eq!(
            most_used(named.iter(), 3, |_| true),
            paths(&["/k/common", "/i/common", "/k/other"])
        );
        assert_eq!(
            most_used(named.iter(), 10, |_| true).len(),
            4,
            "each file once"
        );
        assert!(most_used(std::iter::empty(), 3, |_| true).is_empty());
        // Files only other hosts hold leave room for the next ones.
        assert_eq!(
            most_used(named.iter(), 2, |path| !path.starts_with("/k")),
            paths(&["/i/common"])
        );
        assert_eq!(
            most_used(named.iter(), 2, |path| path != Path::new("/k/common")),
            paths(&["/i/common", "/k/other"])
        );
    }

    #[test]
    fn a_held_file_rewritten_or_replaced_gets_a_new_cache_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vmlinuz");
        std::fs::write(&path, b"kernel one").expect("write");
        let first = HeldFileKey::of(&path).expect("key");
        assert_eq!(
            HeldFileKey::of(&path).expect("key"),
            first,
            "unchanged file"
        );
        // Replaced by a rename (another inode), same length.
        let replacement = dir.path().join("vmlinuz.new");
        std::fs::write(&replacement, b"kernel two").expect("write");
        std::fs::rename(&replacement, &path).expect("rename");
        let second = HeldFileKey::of(&path).expect("key");
        assert_ne!(second, first);
        // Rewritten in place with another length.
        std::fs::write(&path, b"kernel three").expect("write");
        assert_ne!(HeldFileKey::of(&path).expect("key"), second);
        assert!(HeldFileKey::of(&dir.path().join("absent")).is_err());
    }
}
