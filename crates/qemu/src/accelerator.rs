//! Accelerator probe: KVM when `/dev/kvm` can really run a 64-bit guest, TCG otherwise.
//!
//! On some hosts `/dev/kvm` opens and QEMU starts with `-accel kvm`, yet guests never get past
//! real mode (nested virtualization without the features QEMU needs). So the probe boots a tiny
//! firmware (source in `accelerator/probe-firmware.S`) that enters long mode, computes a sum and
//! reports through the `isa-debug-exit` device; only that exit code selects KVM. The probe never
//! fails: any problem selects TCG with the reason.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use crate::binaries::QemuBinaries;

/// How long a working KVM may take to run the probe firmware to its end.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// QEMU's exit status when the probe firmware writes 0x2a to isa-debug-exit: (0x2a << 1) | 1.
const PROBE_SUCCESS_EXIT_CODE: i32 = 85;
const FIRMWARE_SIZE: usize = 64 * 1024;
const RESET_VECTOR_OFFSET: usize = 0xfff0;
/// `ljmp $0xf000, $0`: from the reset vector to the start of the firmware.
const RESET_VECTOR_JUMP: [u8; 5] = [0xea, 0x00, 0x00, 0x00, 0xf0];
/// Assembled `accelerator/probe-firmware.S`, loaded at 0xf0000.
const PROBE_FIRMWARE_CODE: [u8; 190] = [
    0xfa, 0x31, 0xc0, 0x8e, 0xd8, 0x8e, 0xc0, 0x8e, 0xd0, 0x66, 0xc7, 0x06, 0x00, 0x10, 0x03, 0x20,
    0x00, 0x00, 0x66, 0xc7, 0x06, 0x04, 0x10, 0x00, 0x00, 0x00, 0x00, 0x66, 0xc7, 0x06, 0x00, 0x20,
    0x03, 0x30, 0x00, 0x00, 0x66, 0xc7, 0x06, 0x04, 0x20, 0x00, 0x00, 0x00, 0x00, 0x66, 0xc7, 0x06,
    0x00, 0x30, 0x83, 0x00, 0x00, 0x00, 0x66, 0xc7, 0x06, 0x04, 0x30, 0x00, 0x00, 0x00, 0x00, 0x2e,
    0x66, 0x0f, 0x01, 0x16, 0xb8, 0x00, 0x0f, 0x20, 0xe0, 0x66, 0x83, 0xc8, 0x20, 0x0f, 0x22, 0xe0,
    0x66, 0xb8, 0x00, 0x10, 0x00, 0x00, 0x0f, 0x22, 0xd8, 0x66, 0xb9, 0x80, 0x00, 0x00, 0xc0, 0x0f,
    0x32, 0x66, 0x0d, 0x00, 0x01, 0x00, 0x00, 0x0f, 0x30, 0x0f, 0x20, 0xc0, 0x66, 0x0d, 0x01, 0x00,
    0x00, 0x80, 0x0f, 0x22, 0xc0, 0x66, 0xea, 0x7d, 0x00, 0x0f, 0x00, 0x08, 0x00, 0x48, 0x31, 0xc0,
    0x48, 0xc7, 0xc1, 0xe8, 0x03, 0x00, 0x00, 0x48, 0x01, 0xc8, 0xe2, 0xfb, 0x48, 0x3d, 0x14, 0xa3,
    0x07, 0x00, 0x75, 0x07, 0xb0, 0x2a, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd, 0xb0, 0x01, 0xe6, 0xf4, 0xf4,
    0xeb, 0xfd, 0x8d, 0xb4, 0x00, 0x00, 0x66, 0x90, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x9a, 0x20, 0x00, 0x0f, 0x00, 0xa8, 0x00, 0x0f, 0x00,
];

/// The CPU accelerator a VM runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation (Tiny Code Generator).
    Tcg,
}

impl Accelerator {
    /// The value of QEMU's `-accel` option.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        }
    }

    /// The CPU model used with this accelerator: the host's CPU under KVM, QEMU's portable
    /// `qemu64` under TCG (fast to emulate, migratable between any two hosts).
    pub fn cpu_model(self) -> &'static str {
        match self {
            Accelerator::Kvm => "host",
            Accelerator::Tcg => "qemu64",
        }
    }
}

impl std::fmt::Display for Accelerator {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.qemu_name())
    }
}

/// Result of [`probe_accelerator`]: which accelerator to use and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceleratorProbe {
    /// The accelerator VMs on this host should use.
    pub accelerator: Accelerator,
    /// Human-readable reason, e.g. why KVM was rejected.
    pub reason: String,
}

/// Probes whether KVM can run a guest on this host; TCG otherwise. Takes up to a few seconds.
pub async fn probe_accelerator(binaries: &QemuBinaries) -> AcceleratorProbe {
    probe_accelerator_with_device(binaries, Path::new("/dev/kvm")).await
}

/// [`probe_accelerator`] run once per process; later calls return the first result.
pub async fn probe_accelerator_cached(binaries: &QemuBinaries) -> AcceleratorProbe {
    static PROBE: OnceCell<AcceleratorProbe> = OnceCell::const_new();
    PROBE
        .get_or_init(|| probe_accelerator(binaries))
        .await
        .clone()
}

async fn probe_accelerator_with_device(
    binaries: &QemuBinaries,
    kvm_device: &Path,
) -> AcceleratorProbe {
    let tcg = |reason: String| {
        tracing::info!(%reason, "kvm not usable, using tcg");
        AcceleratorProbe {
            accelerator: Accelerator::Tcg,
            reason,
        }
    };
    if let Err(error) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(kvm_device)
    {
        return tcg(format!("cannot open {}: {error}", kvm_device.display()));
    }
    match run_probe_guest(binaries, Accelerator::Kvm).await {
        Ok(()) => AcceleratorProbe {
            accelerator: Accelerator::Kvm,
            reason: "kvm ran the 64-bit probe guest to completion".to_owned(),
        },
        Err(reason) => tcg(reason),
    }
}

/// Boots the probe firmware with `accelerator`; `Err` says why it did not run to completion.
async fn run_probe_guest(binaries: &QemuBinaries, accelerator: Accelerator) -> Result<(), String> {
    let firmware_path = probe_firmware_file(&std::env::temp_dir())
        .map_err(|error| format!("cannot write the {accelerator} probe firmware: {error}"))?;
    // Under coreutils' `timeout`: a probe whose vCPU never finishes must not outlive a `serve`
    // that was killed before it could kill the probe (seen here: orphaned probes spinning).
    let mut command = tokio::process::Command::new("timeout");
    command
        .args(["--signal=KILL", &PROBE_TIMEOUT.as_secs().to_string()])
        .arg(&binaries.system)
        .args([
            "-accel",
            accelerator.qemu_name(),
            "-cpu",
            accelerator.cpu_model(),
        ])
        .args(["-machine", "q35", "-m", "16"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-monitor", "none", "-serial", "none", "-parallel", "none"])
        .arg("-bios")
        .arg(&firmware_path)
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(|error| format!("cannot run {}: {error}", binaries.system.display()))?;
    let stderr = child.stderr.take();
    let stderr_reader = tokio::spawn(async move {
        let mut text = String::new();
        if let Some(mut stderr) = stderr {
            use tokio::io::AsyncReadExt;
            let _ = stderr.read_to_string(&mut text).await;
        }
        text
    });
    // `timeout` kills QEMU at PROBE_TIMEOUT and exits with 128 + 9; killing `timeout` itself
    // here would orphan QEMU, so this side only waits (a little longer).
    let timed_out = || {
        Err(format!(
            "{accelerator} accepted the probe guest but did not run it to completion within {PROBE_TIMEOUT:?} (it cannot run ordinary guests here)"
        ))
    };
    match tokio::time::timeout(PROBE_TIMEOUT + Duration::from_secs(5), child.wait()).await {
        Err(_elapsed) => {
            stderr_reader.abort();
            timed_out()
        }
        Ok(Err(error)) => Err(format!(
            "waiting for the {accelerator} probe failed: {error}"
        )),
        Ok(Ok(status)) if status.code() == Some(PROBE_SUCCESS_EXIT_CODE) => Ok(()),
        Ok(Ok(status)) if status.code() == Some(128 + 9) => timed_out(),
        Ok(Ok(status)) => {
            let stderr = stderr_reader.await.unwrap_or_default();
            Err(format!(
                "{accelerator} probe guest failed ({status}): {}",
                stderr.trim()
            ))
        }
    }
}

/// Where the probe firmware is, in `directory`: one file, kept. Written only when missing or
/// different, through a rename (concurrent probes are safe), so a probe killed with its `serve`
/// (the KVM probe runs for [`PROBE_TIMEOUT`] on hosts where KVM cannot run guests) leaves
/// nothing behind; a temporary directory per probe did, one per killed `serve`.
fn probe_firmware_file(directory: &Path) -> std::io::Result<std::path::PathBuf> {
    use std::io::Write;
    let firmware = probe_firmware();
    let path = directory.join("novacron-probe-firmware.bin");
    if std::fs::read(&path).is_ok_and(|bytes| bytes == firmware) {
        return Ok(path);
    }
    let mut file = tempfile::Builder::new()
        .prefix("novacron-probe-firmware")
        .tempfile_in(directory)?;
    file.write_all(&firmware)?;
    file.persist(&path).map_err(|error| error.error)?;
    Ok(path)
}

fn probe_firmware() -> Vec<u8> {
    let mut firmware = vec![0u8; FIRMWARE_SIZE];
    firmware[..PROBE_FIRMWARE_CODE.len()].copy_from_slice(&PROBE_FIRMWARE_CODE);
    firmware[RESET_VECTOR_OFFSET..RESET_VECTOR_OFFSET + RESET_VECTOR_JUMP.len()]
        .copy_from_slice(&RESET_VECTOR_JUMP);
    firmware
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_firmware_file_is_written_once_and_mended_when_changed() {
        let directory = tempfile::tempdir().unwrap();
        let path = probe_firmware_file(directory.path()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), probe_firmware());
        // Not written again: the same file (a rewrite renames a new one into place).
        let inode = || std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap());
        let written = inode();
        assert_eq!(probe_firmware_file(directory.path()).unwrap(), path);
        assert_eq!(inode(), written);
        std::fs::write(&path, b"something else").unwrap();
        probe_firmware_file(directory.path()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), probe_firmware());
        // Nothing but the one file.
        assert_eq!(std::fs::read_dir(directory.path()).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn missing_kvm_device_selects_tcg_with_reason() {
        let binaries = QemuBinaries {
            system: "/bin/false".into(),
            img: "/bin/false".into(),
        };
        let probe = probe_accelerator_with_device(&binaries, Path::new("/nonexistent/kvm")).await;
        assert_eq!(probe.accelerator, Accelerator::Tcg);
        assert!(
            probe.reason.contains("/nonexistent/kvm"),
            "{}",
            probe.reason
        );
    }

    /// Pins the firmware bytes: under TCG (always able to run it) it must reach the success exit.
    #[tokio::test]
    async fn probe_firmware_runs_to_completion_under_tcg() {
        let binaries = QemuBinaries::locate().expect("qemu-system-x86_64 is needed for this test");
        run_probe_guest(&binaries, Accelerator::Tcg)
            .await
            .expect("probe firmware under tcg");
    }

    #[tokio::test]
    async fn probe_gives_an_accelerator_and_a_reason() {
        let binaries = QemuBinaries::locate().expect("qemu-system-x86_64 is needed for this test");
        let probe = probe_accelerator_cached(&binaries).await;
        assert!(!probe.reason.is_empty());
        assert_eq!(probe_accelerator_cached(&binaries).await, probe, "cached");
    }

    #[test]
    fn firmware_has_code_and_reset_vector() {
        let firmware = probe_firmware();
        assert_eq!(firmware.len(), FIRMWARE_SIZE);
        assert_eq!(firmware[0], 0xfa, "starts with cli");
        assert_eq!(
            &firmware[RESET_VECTOR_OFFSET..RESET_VECTOR_OFFSET + 5],
            &RESET_VECTOR_JUMP
        );
    }
}
