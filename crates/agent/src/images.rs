//! The image store: imported disk images, checked with qemu-img and kept content-addressed by the
//! BLAKE3 hash of their bytes under `<data>/images/`. An upload is written to the staging
//! directory while it is hashed, checked, then renamed into place before its record is written;
//! start-up removes staging leftovers and image files without a record, so a crash at any point
//! leaves nothing half-made.

use crate::paths::DataPaths;
use crate::records::Records;
use crate::{AgentError, Hypervisor};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use novacron_types::{ImageFormat, ImageName, ImageRecord, RECORD_FORMAT_VERSION, unix_now};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

/// Where the bytes of an imported image come from.
pub enum ImportSource {
    /// An upload (the API's request body).
    Stream(Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>),
    /// A file on this host, copied (never moved) into the store.
    File(PathBuf),
}

fn to_qemu_format(format: ImageFormat) -> novacron_qemu::ImageFormat {
    match format {
        ImageFormat::Qcow2 => novacron_qemu::ImageFormat::Qcow2,
        ImageFormat::Raw => novacron_qemu::ImageFormat::Raw,
    }
}

pub(crate) fn qemu_format(record: &ImageRecord) -> novacron_qemu::ImageFormat {
    to_qemu_format(record.format)
}

/// Removes its file on drop unless disarmed: an import that fails anywhere leaves no file.
pub(crate) struct StagedFile {
    pub path: PathBuf,
    armed: bool,
}

impl StagedFile {
    /// A new file name in the staging directory (the file is not created here).
    pub(crate) fn in_staging(paths: &DataPaths) -> Self {
        Self {
            path: paths
                .staging_dir()
                .join(format!("{}.part", uuid::Uuid::new_v4().simple())),
            armed: true,
        }
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

pub(crate) async fn import(
    paths: &DataPaths,
    records: &Records,
    hypervisor: &Hypervisor,
    name: &str,
    source: ImportSource,
) -> Result<ImageRecord, AgentError> {
    let name = ImageName::new(name)?;
    let qemu_img = hypervisor.qemu_img()?;
    if let Ok(existing) = records.resolve_image(name.as_str()).await {
        return Err(AgentError::ImageNameTaken {
            name: name.to_string(),
            id: existing.id,
        });
    }
    crate::vms::ensure_free_space(paths.root(), &format!("image {name}"))?;
    let mut staged = StagedFile::in_staging(paths);
    let (hash, file_bytes) = write_staged(&staged.path, source).await?;
    let id = hash.to_hex().to_string();
    let display = format!("upload for image {name:?}");
    ImageStore {
        paths,
        records,
        qemu_img: &qemu_img,
    }
    .store_staged(name, &mut staged, id, file_bytes, &display)
    .await
}

/// Where a staged image goes once checked: the image files, their records, and the qemu-img
/// that checks them.
pub(crate) struct ImageStore<'a> {
    pub(crate) paths: &'a DataPaths,
    pub(crate) records: &'a Records,
    pub(crate) qemu_img: &'a novacron_qemu::QemuImg,
}

impl ImageStore<'_> {
    /// Checks a fully written staged file with qemu-img (a runnable, self-contained, healthy
    /// disk), moves it into the image store and writes its record. On any error the staged file
    /// is left armed, so dropping it removes it. `id` is the BLAKE3 (hex) of the file's bytes.
    pub(crate) async fn store_staged(
        &self,
        name: ImageName,
        staged: &mut StagedFile,
        id: String,
        file_bytes: u64,
        display: &str,
    ) -> Result<ImageRecord, AgentError> {
        let Self {
            paths,
            records,
            qemu_img,
        } = *self;
        let display = display.to_string();
        let (info, format) = qemu_img
            .inspect_runnable(&staged.path)
            .await
            .map_err(|error| AgentError::BadImage {
                file: display.clone(),
                reason: error.to_string(),
            })?;
        let format = match format {
            novacron_qemu::ImageFormat::Qcow2 => ImageFormat::Qcow2,
            novacron_qemu::ImageFormat::Raw => ImageFormat::Raw,
        };
        if let Some(backing) = &info.backing_file {
            return Err(AgentError::BadImage {
                file: display,
                reason: format!(
                    "it has a backing file ({backing}); an image must be self-contained — flatten it \
                 with `qemu-img convert -O qcow2 IN OUT` first"
                ),
            });
        }
        if format == ImageFormat::Raw && looks_like_text(&staged.path)? {
            return Err(AgentError::BadImage {
                file: display,
                reason: "it looks like a text file, not a disk; import a qcow2 image or a raw disk"
                    .into(),
            });
        }
        let check = qemu_img
            .check(&staged.path, to_qemu_format(format))
            .await
            .map_err(|error| AgentError::BadImage {
                file: display.clone(),
                reason: error.to_string(),
            })?;
        if !check.is_healthy() {
            return Err(AgentError::BadImage {
                file: display,
                reason: format!(
                    "qemu-img check found {} corruption(s) and {} error(s)",
                    check.corruptions, check.check_errors
                ),
            });
        }
        let existing = records.image(&id).await?;
        if let Some(existing) = &existing
            && (existing.format != format || paths.image_file(&id, format).exists())
        {
            return Err(AgentError::ImageNameTaken {
                name: existing.name.to_string(),
                id,
            });
        }
        let final_path = paths.image_file(&id, format);
        tokio::fs::rename(&staged.path, &final_path)
            .await
            .map_err(|error| AgentError::io(format!("storing image {name}"), error))?;
        staged.path = final_path;
        if let Some(existing) = existing {
            // A region's image whose file this host lacked: the copy is now here, under the
            // region's record (a host's heartbeat lists it from now on).
            staged.armed = false;
            tracing::info!(image = %existing.name, id = %existing.id, "copy of a region image stored");
            return Ok(existing);
        }
        let record = ImageRecord {
            format_version: RECORD_FORMAT_VERSION,
            id,
            name,
            format,
            virtual_bytes: info.virtual_size,
            file_bytes,
            created_at: unix_now(),
        };
        records.create_image(&record).await?;
        staged.armed = false;
        tracing::info!(image = %record.name, id = %record.id, format = record.format.as_str(), "image stored");
        Ok(record)
    }
}

/// Images whose indexes ([`index_image`]) are being built in the background, by id: an import
/// returns once the image is stored and checked, and its indexing (about as long again as the
/// upload) goes on after. Deleting an image waits for its indexing to end first, so no manifest
/// or page index is written for an image that is gone.
#[derive(Default)]
pub(crate) struct IndexingImages {
    running: std::sync::Mutex<std::collections::HashMap<String, tokio::sync::watch::Receiver<()>>>,
}

impl IndexingImages {
    /// Waits until no indexing of image `id` runs.
    pub(crate) async fn wait_for(&self, id: &str) {
        let running = self
            .running
            .lock()
            .ok()
            .and_then(|running| running.get(id).cloned());
        if let Some(mut running) = running {
            tracing::info!(image = id, "waiting for the image's indexing to end");
            // Ends when the indexing drops its sender.
            let _ = running.changed().await;
        }
    }
}

/// Indexes `record` ([`index_image`]) in the background; [`IndexingImages::wait_for`] waits
/// for it. Nothing happens while an indexing of the same image runs.
pub(crate) fn index_image_in_background(shared: &Arc<crate::host::Shared>, record: ImageRecord) {
    let (done, running) = tokio::sync::watch::channel(());
    {
        let Ok(mut indexing) = shared.indexing_images.running.lock() else {
            return;
        };
        if indexing.contains_key(&record.id) {
            return;
        }
        indexing.insert(record.id.clone(), running);
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        index_image(&shared, &record).await;
        if let Ok(mut indexing) = shared.indexing_images.running.lock() {
            indexing.remove(&record.id);
        }
        drop(done);
    });
}

/// At start-up: indexes, in the background, the images this host holds that the chunk store has
/// no manifest of (a `serve` stopped while it indexed an import).
pub(crate) async fn index_unindexed_images(
    shared: &Arc<crate::host::Shared>,
) -> Result<(), AgentError> {
    for image in shared.records.images().await? {
        let held = shared.paths.image_file(&image.id, image.format).exists();
        let indexed = shared
            .chunks
            .image_manifest(&image.id)
            .is_ok_and(|manifest| manifest.is_some());
        if held && !indexed {
            tracing::info!(image = %image.name, "image not indexed in the chunk store; indexing it");
            index_image_in_background(shared, image);
        }
    }
    Ok(())
}

/// Indexes a stored image in the chunk store (its chunks, manifest and aligned 4 KiB blocks), so
/// later transfers to this host send only what it lacks. Best effort: an image that could not be
/// indexed still works, transfers of similar images just send more.
pub(crate) async fn index_image(shared: &crate::host::Shared, record: &ImageRecord) {
    let (chunks, paths) = (shared.chunks.clone(), &shared.paths);
    let path = paths.image_file(&record.id, record.format);
    let id = record.id.clone();
    let started = std::time::Instant::now();
    let outcome = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path)
            .map_err(|error| format!("opening {}: {error}", path.display()))?;
        chunks
            .put_image(&id, std::io::BufReader::with_capacity(1 << 20, file))
            .map_err(|error| error.to_string())
    })
    .await;
    match outcome {
        Ok(Ok(summary)) => tracing::info!(
            image = %record.name,
            chunks = summary.chunks,
            new_chunks = summary.new_chunks,
            new_bytes = summary.new_bytes,
            seconds = started.elapsed().as_secs_f64(),
            "image indexed in the chunk store"
        ),
        Ok(Err(error)) => {
            tracing::warn!(image = %record.name, %error, "cannot index image in the chunk store")
        }
        Err(error) => {
            tracing::warn!(image = %record.name, %error, "cannot index image in the chunk store")
        }
    }
    // Migrations of VMs on this image find RAM pages and disk blocks it holds by this index.
    if let Err(error) = stored_page_index(shared, record).await {
        tracing::warn!(image = %record.name, %error, "cannot build the image's page index; a migration builds it");
    }
}

/// The 4 KiB page index of a stored image, for the migration page codec's "the destination
/// holds it" tier (`novacron_migration::image_pages`): loaded from `<id>.pages` beside the
/// image, else built from the image file and saved there (import and arrival build it, so a
/// migration does not read the image). `None` for an image whose guest blocks are not all
/// stored as is in its file (a qcow2 with compressed clusters or a backing file): a migration
/// converts such an image to raw and indexes that instead.
pub(crate) async fn stored_page_index(
    shared: &crate::host::Shared,
    image: &ImageRecord,
) -> Result<Option<novacron_migration::ImagePageIndex>, AgentError> {
    use novacron_migration::{ImagePageIndex, StoredRange};
    let file = shared.paths.image_file(&image.id, image.format);
    let saved = shared.paths.image_pages_file(&image.id);
    if saved.exists() {
        let (saved_path, file_path) = (saved.clone(), file.clone());
        match tokio::task::spawn_blocking(move || ImagePageIndex::load(&saved_path, &file_path))
            .await
        {
            Ok(Ok(index)) => return Ok(Some(index)),
            Ok(Err(error)) => {
                tracing::warn!(image = %image.name, %error, "saved page index unusable; rebuilding it")
            }
            Err(error) => {
                tracing::warn!(image = %image.name, %error, "loading the page index failed; rebuilding it")
            }
        }
        let _ = tokio::fs::remove_file(&saved).await;
    }
    let started = std::time::Instant::now();
    let ranges = match image.format {
        ImageFormat::Raw => None,
        ImageFormat::Qcow2 => {
            let extents = shared
                .hypervisor
                .qemu_img()?
                .map(&file, novacron_qemu::ImageFormat::Qcow2)
                .await?;
            let mut ranges = Vec::new();
            for extent in extents.iter().filter(|extent| extent.data) {
                match extent.offset {
                    Some(offset) if extent.depth == 0 && !extent.compressed => {
                        ranges.push(StoredRange {
                            guest_offset: extent.start,
                            file_offset: offset,
                            length: extent.length,
                        })
                    }
                    _ => {
                        tracing::info!(
                            image = %image.name,
                            "image has compressed clusters or a backing file; migrations index a raw copy of it"
                        );
                        return Ok(None);
                    }
                }
            }
            Some(ranges)
        }
    };
    let (file_path, saved_path, guest_length) = (file.clone(), saved.clone(), image.virtual_bytes);
    let built = tokio::task::spawn_blocking(move || {
        let index = match ranges {
            None => ImagePageIndex::build(&file_path),
            Some(ranges) => ImagePageIndex::build_from_ranges(&file_path, &ranges, guest_length),
        }?;
        let saved = index.save(&saved_path);
        Ok::<_, std::io::Error>((index, saved))
    })
    .await
    .map_err(|error| AgentError::io("indexing an image's pages", std::io::Error::other(error)))?;
    let (index, written) =
        built.map_err(|error| AgentError::io(format!("indexing {}", file.display()), error))?;
    if let Err(error) = written {
        tracing::warn!(file = %saved.display(), %error, "cannot save the page index; the next migration builds it again");
    }
    tracing::info!(
        image = %image.name,
        distinct_blocks = index.distinct_blocks(),
        seconds = started.elapsed().as_secs_f64(),
        "image's page index built and saved"
    );
    Ok(Some(index))
}

/// Forgets a deleted image in the chunk store and collects what no other image uses, in the
/// background. While a transfer is receiving (it holds a pin) the collection is postponed; the
/// transfer runs it when its pin goes ([`ReceivingPin`]).
pub(crate) fn forget_image(
    chunks: &std::sync::Arc<novacron_codec::ChunkStore>,
    record: &ImageRecord,
) {
    spawn_collection(chunks, Some((record.name.to_string(), record.id.clone())));
}

/// Collects in the background, first forgetting the image `(name, id)` if given.
fn spawn_collection(
    chunks: &std::sync::Arc<novacron_codec::ChunkStore>,
    forget: Option<(String, String)>,
) {
    let chunks = chunks.clone();
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn_blocking(move || {
        let started = std::time::Instant::now();
        let image = forget
            .as_ref()
            .map_or("(postponed)", |(name, _)| name.as_str());
        let outcome = match &forget {
            Some((_, id)) => chunks.remove_image(id).map(|_| ()),
            None => Ok(()),
        }
        .and_then(|()| chunks.collect_garbage());
        match outcome {
            Ok(Some(summary)) => tracing::info!(
                image,
                chunks_removed = summary.chunks_removed,
                packs_rewritten = summary.packs_rewritten,
                bytes_reclaimed = summary.bytes_reclaimed,
                pack_bytes = summary.pack_bytes,
                seconds = started.elapsed().as_secs_f64(),
                "chunk store collected"
            ),
            Ok(None) => tracing::info!(
                image,
                "chunk store collection postponed until the receiving transfers end"
            ),
            Err(error) => tracing::warn!(image, %error, "cannot collect the chunk store"),
        }
    });
}

/// Keeps the chunk store from collecting while a transfer's chunks have no manifest yet; when
/// it goes, runs a collection that it postponed.
pub(crate) struct ReceivingPin {
    pin: Option<novacron_codec::ChunkPin>,
    chunks: std::sync::Arc<novacron_codec::ChunkStore>,
}

impl Drop for ReceivingPin {
    fn drop(&mut self) {
        drop(self.pin.take());
        if self.chunks.collection_postponed() {
            spawn_collection(&self.chunks, None);
        }
    }
}

pub(crate) async fn pin_chunks(
    chunks: &std::sync::Arc<novacron_codec::ChunkStore>,
) -> ReceivingPin {
    let store = chunks.clone();
    let pin = match tokio::task::spawn_blocking(move || store.pin()).await {
        Ok(pin) => Some(pin),
        Err(error) => {
            tracing::warn!(%error, "cannot pin the chunk store");
            None
        }
    };
    ReceivingPin {
        pin,
        chunks: chunks.clone(),
    }
}

async fn write_staged(
    path: &Path,
    source: ImportSource,
) -> Result<(blake3::Hash, u64), AgentError> {
    let context = || format!("writing upload to {}", path.display());
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(|error| AgentError::io(context(), error))?;
    let mut hasher = blake3::Hasher::new();
    let mut total = 0u64;
    match source {
        ImportSource::Stream(mut stream) => {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|error| AgentError::io("receiving the upload", error))?;
                hasher.update(&chunk);
                total += chunk.len() as u64;
                file.write_all(&chunk)
                    .await
                    .map_err(|error| AgentError::io(context(), error))?;
            }
        }
        ImportSource::File(source_path) => {
            let mut source = tokio::fs::File::open(&source_path).await.map_err(|error| {
                AgentError::io(format!("opening {}", source_path.display()), error)
            })?;
            let mut buffer = vec![0u8; 1 << 20];
            loop {
                let count = tokio::io::AsyncReadExt::read(&mut source, &mut buffer)
                    .await
                    .map_err(|error| {
                        AgentError::io(format!("reading {}", source_path.display()), error)
                    })?;
                if count == 0 {
                    break;
                }
                hasher.update(&buffer[..count]);
                total += count as u64;
                file.write_all(&buffer[..count])
                    .await
                    .map_err(|error| AgentError::io(context(), error))?;
            }
        }
    }
    file.sync_all()
        .await
        .map_err(|error| AgentError::io(context(), error))?;
    if total == 0 {
        return Err(AgentError::BadImage {
            file: "upload".into(),
            reason: "it is empty".into(),
        });
    }
    Ok((hasher.finalize(), total))
}

/// A raw "disk" whose first 4 KiB are printable text is a text file sent by mistake.
fn looks_like_text(path: &Path) -> Result<bool, AgentError> {
    use std::io::Read;
    let mut head = vec![0u8; 4096];
    let mut file = std::fs::File::open(path)
        .map_err(|error| AgentError::io(format!("reading {}", path.display()), error))?;
    let count = file
        .read(&mut head)
        .map_err(|error| AgentError::io(format!("reading {}", path.display()), error))?;
    head.truncate(count);
    Ok(!head.is_empty()
        && std::str::from_utf8(&head).is_ok()
        && !head.contains(&0)
        && head
            .iter()
            .all(|&byte| byte == b'\n' || byte == b'\t' || byte == b'\r' || byte >= 0x20))
}

/// Removes staging leftovers and image files that no record names (a crash between the rename
/// and the record write).
pub(crate) async fn sweep(paths: &DataPaths, records: &Records) -> Result<(), AgentError> {
    for directory in [paths.staging_dir(), paths.images_dir()] {
        tokio::fs::create_dir_all(&directory)
            .await
            .map_err(|error| AgentError::io(format!("creating {}", directory.display()), error))?;
    }
    if let Ok(mut entries) = tokio::fs::read_dir(paths.staging_dir()).await {
        while let Ok(Some(entry)) = entries.next_entry().await {
            let _ = tokio::fs::remove_file(entry.path()).await;
        }
    }
    let known: HashSet<PathBuf> = records
        .images()
        .await?
        .iter()
        .flat_map(|image| {
            [
                paths.image_file(&image.id, image.format),
                paths.image_pages_file(&image.id),
            ]
        })
        .collect();
    if let Ok(mut entries) = tokio::fs::read_dir(paths.images_dir()).await {
        while let Ok(Some(entry)) = entries.next_entry().await {
            if !known.contains(&entry.path()) {
                tracing::warn!(file = %entry.path().display(), "removing image file without a record");
                let _ = tokio::fs::remove_file(entry.path()).await;
            }
        }
    }
    Ok(())
}
