//! Where a host keeps its files. Everything lives under one data directory:
//!
//! ```text
//! <data>/serve.lock          held by the running `novacron serve`
//! <data>/admin.token         the admin API token (mode 0600)
//! <data>/store/              the replicated store (redb)
//! <data>/images/<id>.<fmt>   imported images, named by the BLAKE3 of their bytes
//! <data>/staging/            uploads and received images in progress (emptied at start-up)
//! <data>/identity/           this host's transfer certificate and key (host.key.der mode 0600)
//! <data>/chunks/             the chunk store (redb index + packs) indexing every image
//! <data>/links.json          the links' recent measurements, replayed at start-up
//! <data>/transfers.jsonl     the last 1000 finished image transfers (`transfer list`)
//! <data>/vms/<uuid>/         one directory per VM: disk overlay, serial log, QMP and console
//!                            sockets, pid file (named by uuid to keep socket paths short)
//! ```

use novacron_types::ImageFormat;
use std::path::{Path, PathBuf};

/// Unix socket paths are limited to 107 bytes; a VM directory adds 50 bytes to the data dir.
pub const MAX_DATA_DIR_BYTES: usize = 56;

#[derive(Debug, Clone)]
pub struct DataPaths {
    root: PathBuf,
}

impl DataPaths {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn lock_file(&self) -> PathBuf {
        self.root.join("serve.lock")
    }

    pub fn token_file(&self) -> PathBuf {
        self.root.join("admin.token")
    }

    pub fn links_file(&self) -> PathBuf {
        self.root.join("links.json")
    }

    pub fn transfer_history_file(&self) -> PathBuf {
        self.root.join("transfers.jsonl")
    }

    pub fn store_dir(&self) -> PathBuf {
        self.root.join("store")
    }

    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    pub fn image_file(&self, id: &str, format: ImageFormat) -> PathBuf {
        self.images_dir().join(image_file_name(id, format))
    }

    /// The saved 4 KiB page index of an image (see `images::stored_page_index`).
    pub fn image_pages_file(&self, id: &str) -> PathBuf {
        self.images_dir().join(format!("{id}.pages"))
    }

    pub fn staging_dir(&self) -> PathBuf {
        self.root.join("staging")
    }

    pub fn identity_dir(&self) -> PathBuf {
        self.root.join("identity")
    }

    pub fn chunks_dir(&self) -> PathBuf {
        self.root.join("chunks")
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.root.join("vms")
    }

    /// The directory of the VM with this uuid (its QEMU run directory too).
    pub fn vm_dir(&self, uuid: &str) -> PathBuf {
        self.vms_dir().join(vm_dir_name(uuid))
    }

    pub fn vm_disk(&self, uuid: &str) -> PathBuf {
        self.vm_dir(uuid).join("disk.qcow2")
    }
}

/// An image's file name, in a host's image store as on a shared storage.
pub fn image_file_name(id: &str, format: ImageFormat) -> String {
    format!("{id}.{}", format.as_str())
}

/// A VM's directory name (its uuid without dashes, keeping socket paths short), in a host's
/// data directory as on a shared storage.
pub fn vm_dir_name(uuid: &str) -> String {
    uuid.replace('-', "")
}
