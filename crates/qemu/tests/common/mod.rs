//! Helpers shared by the QEMU integration tests: the test guest, run directories, polling.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use novacron_qemu::{DirectKernelBoot, ImageFormat, LaunchSpec, QemuBinaries, QemuImg};
use uuid::Uuid;

/// Generous: two cores shared with other builds, guests under TCG.
pub const GUEST_DEADLINE: Duration = Duration::from_secs(120);
pub const READY_LINE: &str = "NOVACRON-GUEST-READY";

/// The guest built by `scripts/build-guest`.
pub struct Guest {
    pub vmlinuz: PathBuf,
    pub initrd: PathBuf,
    pub disk: PathBuf,
}

/// Finds the guest in `NOVACRON_GUEST_DIR` or the default cache dir; fails with what to run.
pub fn guest() -> Guest {
    let directory = match std::env::var_os("NOVACRON_GUEST_DIR") {
        Some(directory) => PathBuf::from(directory),
        None => {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
                });
            cache.join("novacron/guest")
        }
    };
    let guest = Guest {
        vmlinuz: directory.join("vmlinuz"),
        initrd: directory.join("initrd.img"),
        disk: directory.join("disk.qcow2"),
    };
    for file in [&guest.vmlinuz, &guest.initrd, &guest.disk] {
        assert!(
            file.is_file(),
            "test guest file {} is missing: run scripts/build-guest (or set NOVACRON_GUEST_DIR to its output)",
            file.display()
        );
    }
    guest
}

pub fn binaries() -> QemuBinaries {
    QemuBinaries::locate().expect("qemu binaries")
}

/// A unique, short run directory (Unix socket paths are limited to 107 bytes).
pub fn run_directory() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ncq-")
        .tempdir_in("/tmp")
        .expect("temp dir")
}

/// A spec booting the test guest with a qcow2 overlay of its disk (so the cached image is never
/// written), `disk_size_bytes` large.
pub async fn guest_spec(name: &str, run_dir: &Path, disk_size_bytes: Option<u64>) -> LaunchSpec {
    let guest = guest();
    let overlay = run_dir.join("disk.qcow2");
    QemuImg::new(&binaries())
        .create_overlay(&guest.disk, ImageFormat::Qcow2, &overlay, disk_size_bytes)
        .await
        .expect("overlay");
    LaunchSpec::new(name, Uuid::new_v4(), run_dir)
        .memory_mib(256)
        .disk(overlay, ImageFormat::Qcow2)
        .kernel(DirectKernelBoot {
            kernel: guest.vmlinuz,
            initrd: Some(guest.initrd),
            cmdline: Some("console=ttyS0 panic=-1 quiet".to_owned()),
        })
}

/// Polls `log` until it contains `needle`; returns the log's content.
pub async fn wait_for_console(log: &Path, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + GUEST_DEADLINE;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{needle:?} did not appear in {} within {GUEST_DEADLINE:?}; log so far:\n{text}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls until `pid` no longer exists.
pub async fn wait_for_process_gone(pid: i32) {
    let deadline = tokio::time::Instant::now() + GUEST_DEADLINE;
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "process {pid} still exists"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
