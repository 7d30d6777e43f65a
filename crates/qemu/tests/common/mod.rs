//! Helpers shared by the QEMU integration tests: the test guest, run directories, polling.

#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use novacron_qemu::{
    ImageFormat, LaunchSpec, QemuBinaries, QemuImg, TestGuest, wait_for_console_text,
};
use uuid::Uuid;

/// Generous: two cores shared with other builds, guests under TCG.
pub const GUEST_DEADLINE: Duration = Duration::from_secs(120);

/// The guest built by `scripts/build-guest`; fails with what to run when it is missing.
pub fn guest() -> TestGuest {
    TestGuest::locate().unwrap_or_else(|error| panic!("{error}"))
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
        .kernel(guest.kernel_boot(""))
}

/// The test guest running its memory workload over a `workload_mib` region (see
/// `scripts/guest/workload.c`), launched; killed when the returned guard drops.
pub async fn launch_workload_guest(
    name: &str,
    run_dir: &Path,
    workload_mib: u32,
) -> (novacron_qemu::QemuVm, KillOnDrop) {
    let mut spec = guest_spec(name, run_dir, None).await;
    if let Some(kernel) = spec.kernel.as_mut() {
        kernel.cmdline = Some(format!(
            "console=ttyS0 panic=-1 quiet novacron.workload=1 novacron.workload_mib={workload_mib}"
        ));
    }
    let vm = novacron_qemu::QemuVm::launch(&binaries(), &spec)
        .await
        .expect("launch");
    let cleanup = KillOnDrop::new(&vm);
    (vm, cleanup)
}

/// Polls `log` until it contains `needle`; returns the log's content.
pub async fn wait_for_console(log: &Path, needle: &str) -> String {
    match wait_for_console_text(log, needle, GUEST_DEADLINE).await {
        Ok(text) => text,
        Err(error) => panic!(
            "{error}; log so far:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        ),
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

/// Kills a test's QEMU when the test ends while it still runs (a failed assertion): QEMU is
/// detached in its own session and would otherwise outlive the test process.
pub struct KillOnDrop {
    pid: i32,
    uuid: String,
}

impl KillOnDrop {
    pub fn new(vm: &novacron_qemu::QemuVm) -> Self {
        Self {
            pid: vm.pid(),
            uuid: vm.uuid().to_string(),
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Only if the pid still names this QEMU (never a reused pid).
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.pid)).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&self.uuid) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &self.pid.to_string()])
                .status();
        }
    }
}
