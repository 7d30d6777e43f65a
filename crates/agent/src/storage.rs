//! Where a VM's disk lives: in its host's data directory (`<data>/vms/<uuid>/disk.qcow2`, the
//! default), or on a shared storage every host naming it mounts (`serve --shared-storage
//! NAME=PATH`; `vm create --storage NAME`). A shared storage holds:
//!
//! ```text
//! <storage>/images/<id>.<fmt>       base images, copied there by the first host that needed one
//! <storage>/vms/<uuid>/disk.qcow2   a VM's overlay; its backing file is named relative to it
//!                                   (../../images/<id>.<fmt>), so hosts mounting the storage at
//!                                   different paths all find it
//! ```
//!
//! The VM's run directory (QMP and console sockets, logs, pid file) stays in its host's data
//! directory. A live migration of a VM on shared storage moves only its memory: both QEMUs open
//! the same overlay (the destination's inactive until the switch-over), and no host but the VM's
//! own ever writes or removes it, except `vm delete`.

use crate::AgentError;
use crate::host::{HostConfig, Shared};
use crate::paths::{image_file_name, vm_dir_name};
use novacron_types::{ImageFormat, ImageRecord, VmRecord};
use std::path::{Path, PathBuf};

const IMAGES: &str = "images";
const VMS: &str = "vms";

/// Checks at start-up that each configured shared storage is a directory this host can write,
/// and makes its `images` and `vms` directories.
pub(crate) fn check_shared_storages(config: &HostConfig) -> Result<(), AgentError> {
    for (name, root) in &config.shared_storages {
        let metadata = std::fs::metadata(root).map_err(|error| {
            AgentError::InvalidArgument(format!(
                "shared storage {name}: {} cannot be used: {error} (mount it first, or fix \
                 --shared-storage {name}=PATH)",
                root.display()
            ))
        })?;
        if !metadata.is_dir() {
            return Err(AgentError::InvalidArgument(format!(
                "shared storage {name}: {} is not a directory",
                root.display()
            )));
        }
        for directory in [root.join(IMAGES), root.join(VMS)] {
            std::fs::create_dir_all(&directory).map_err(|error| {
                AgentError::io(
                    format!(
                        "shared storage {name}: creating {} (is it mounted writable?)",
                        directory.display()
                    ),
                    error,
                )
            })?;
        }
    }
    Ok(())
}

/// Whether a move of `record` to another host copies its disk (QEMU's block mirror): it has one,
/// and it is not on shared storage.
pub(crate) fn moves_disk(record: &VmRecord) -> bool {
    record.spec.image_id.is_some() && record.spec.storage.is_none()
}

/// Where this host mounts shared storage `name`.
pub(crate) fn storage_root<'a>(shared: &'a Shared, name: &str) -> Result<&'a Path, AgentError> {
    shared
        .config
        .shared_storages
        .get(name)
        .map(PathBuf::as_path)
        .ok_or_else(|| AgentError::StorageNotMounted {
            storage: name.to_string(),
            host: shared.config.host_name.clone(),
        })
}

/// The directory on shared storage holding the disk of `record`, if its disk is there.
pub(crate) fn shared_vm_dir(
    shared: &Shared,
    record: &VmRecord,
) -> Result<Option<PathBuf>, AgentError> {
    let Some(name) = &record.spec.storage else {
        return Ok(None);
    };
    Ok(Some(
        storage_root(shared, name)?
            .join(VMS)
            .join(vm_dir_name(&record.uuid)),
    ))
}

/// The VM's disk overlay on this host.
pub(crate) fn vm_disk(shared: &Shared, record: &VmRecord) -> Result<PathBuf, AgentError> {
    Ok(match shared_vm_dir(shared, record)? {
        Some(directory) => directory.join("disk.qcow2"),
        None => shared.paths.vm_disk(&record.uuid),
    })
}

/// The name of a base image on a shared storage, relative to a VM's directory there.
fn relative_base(image: &ImageRecord) -> PathBuf {
    Path::new("..")
        .join("..")
        .join(IMAGES)
        .join(image_file_name(&image.id, image.format))
}

/// The base image file the VM's overlay is backed by, as this host reaches it.
pub(crate) fn base_image(
    shared: &Shared,
    record: &VmRecord,
    image: &ImageRecord,
) -> Result<PathBuf, AgentError> {
    base_image_file(shared, record, &image.id, image.format)
}

fn base_image_file(
    shared: &Shared,
    record: &VmRecord,
    id: &str,
    format: ImageFormat,
) -> Result<PathBuf, AgentError> {
    Ok(match &record.spec.storage {
        Some(name) => storage_root(shared, name)?
            .join(IMAGES)
            .join(image_file_name(id, format)),
        None => shared.paths.image_file(id, format),
    })
}

/// The VM's base image file, found without its image record (whichever format's file exists).
pub(crate) fn existing_base_image(
    shared: &Shared,
    record: &VmRecord,
) -> Result<Option<PathBuf>, AgentError> {
    let Some(id) = &record.spec.image_id else {
        return Ok(None);
    };
    for format in [ImageFormat::Qcow2, ImageFormat::Raw] {
        let path = base_image_file(shared, record, id, format)?;
        if path.exists() {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Makes the VM's overlay on its shared storage: copies the base image there first when it is
/// not yet (from this host's image store, through a temporary name, so a half-copied base is
/// never taken for a whole one), then creates the overlay with a relative backing name.
/// Replaces a leftover overlay of an interrupted create.
pub(crate) async fn create_shared_overlay(
    shared: &Shared,
    record: &VmRecord,
    image: &ImageRecord,
    directory: &Path,
) -> Result<PathBuf, AgentError> {
    let base = base_image(shared, record, image)?;
    if !base.exists() {
        let local = shared.paths.image_file(&image.id, image.format);
        let partial = base.with_extension(format!("partial-{}", uuid::Uuid::new_v4().simple()));
        let copied = tokio::fs::copy(&local, &partial).await;
        let copied = match copied {
            Ok(_) => tokio::fs::rename(&partial, &base).await,
            Err(error) => Err(error),
        };
        if let Err(error) = copied {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(AgentError::io(
                format!(
                    "copying base image {} to shared storage ({})",
                    image.name,
                    base.display()
                ),
                error,
            ));
        }
        tracing::info!(image = %image.name, path = %base.display(), "base image copied to shared storage");
    }
    tokio::fs::create_dir_all(directory)
        .await
        .map_err(|error| AgentError::io(format!("creating {}", directory.display()), error))?;
    let disk = directory.join("disk.qcow2");
    let _ = tokio::fs::remove_file(&disk).await;
    shared
        .hypervisor
        .qemu_img()?
        .create_overlay_relative(
            &relative_base(image),
            crate::images::qemu_format(image),
            &disk,
            record.spec.disk_bytes,
        )
        .await?;
    Ok(disk)
}

/// Removes the VM's directory on shared storage (its disk): only when the VM itself goes.
pub(crate) async fn remove_shared_disk(shared: &Shared, record: &VmRecord) {
    let directory = match shared_vm_dir(shared, record) {
        Ok(Some(directory)) => directory,
        Ok(None) => return,
        Err(error) => {
            tracing::warn!(vm = %record.spec.name, %error, "the vm's disk on shared storage is left");
            return;
        }
    };
    if let Err(error) = tokio::fs::remove_dir_all(&directory).await
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(vm = %record.spec.name, %error, path = %directory.display(), "removing the vm's disk on shared storage");
    }
}

/// Removes copies of `image` from this host's shared storages (no VM uses it any more).
pub(crate) async fn remove_shared_image_copies(shared: &Shared, image: &ImageRecord) {
    for root in shared.config.shared_storages.values() {
        let path = root
            .join(IMAGES)
            .join(image_file_name(&image.id, image.format));
        if let Err(error) = tokio::fs::remove_file(&path).await
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(image = %image.name, path = %path.display(), %error, "removing the image's copy on shared storage");
        }
    }
}
