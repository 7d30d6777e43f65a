//! The project's test guest (built by `scripts/build-guest`) and waiting for its console lines.
//!
//! Tests, benchmarks and the demo of every crate boot this guest; this module finds it and knows
//! the lines it prints. It does not build it: a missing guest is an error that says which script
//! to run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::image::ImageFormat;
use crate::launch::DirectKernelBoot;

/// Printed by the guest when it is up, followed by the kernel's uptime in seconds.
pub const READY_LINE: &str = "NOVACRON-GUEST-READY";
/// Printed by the guest after [`READY_LINE`] when it has a virtio disk: `NOVACRON-DISK vda <bytes>`.
pub const DISK_LINE: &str = "NOVACRON-DISK";
/// Printed by the guest when the ACPI power button was pressed.
pub const POWERDOWN_LINE: &str = "NOVACRON-GUEST-POWERDOWN";
/// Printed every tick by the memory workload (`novacron.workload=1` on the kernel command line).
pub const WORKLOAD_LINE: &str = "NOVACRON-WORKLOAD";
/// The kernel command line the guest is meant to boot with.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1 quiet";
/// Environment variable naming the guest directory (overrides the default cache directory).
pub const GUEST_DIRECTORY_VARIABLE: &str = "NOVACRON_GUEST_DIR";

/// The guest is missing or a console wait failed.
#[derive(Debug, thiserror::Error)]
pub enum TestGuestError {
    /// A guest file is missing.
    #[error("test guest file {} is missing: run scripts/build-guest (or set NOVACRON_GUEST_DIR to its output directory)", path.display())]
    Missing { path: PathBuf },
    /// The console line did not appear in time.
    #[error("{needle:?} did not appear in {} within {timeout:?}", path.display())]
    ConsoleTimeout {
        path: PathBuf,
        needle: String,
        timeout: Duration,
    },
}

/// The files of the test guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestGuest {
    /// Directory holding the files.
    pub directory: PathBuf,
    /// Kernel.
    pub vmlinuz: PathBuf,
    /// Busybox initramfs.
    pub initrd: PathBuf,
    /// 64 MiB ext4 disk image (qcow2): use it as a backing file, never write it.
    pub disk: PathBuf,
}

impl TestGuest {
    /// The default guest directory: `$NOVACRON_GUEST_DIR`, else `$XDG_CACHE_HOME/novacron/guest`,
    /// else `~/.cache/novacron/guest` (the same rule as `scripts/build-guest`).
    pub fn default_directory() -> PathBuf {
        if let Some(directory) = std::env::var_os(GUEST_DIRECTORY_VARIABLE) {
            return PathBuf::from(directory);
        }
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
            });
        cache.join("novacron").join("guest")
    }

    /// Finds the guest in [`TestGuest::default_directory`].
    pub fn locate() -> Result<Self, TestGuestError> {
        Self::in_directory(&Self::default_directory())
    }

    /// Finds the guest in `directory`.
    pub fn in_directory(directory: &Path) -> Result<Self, TestGuestError> {
        let guest = Self {
            directory: directory.to_owned(),
            vmlinuz: directory.join("vmlinuz"),
            initrd: directory.join("initrd.img"),
            disk: directory.join("disk.qcow2"),
        };
        for path in [&guest.vmlinuz, &guest.initrd, &guest.disk] {
            if !path.is_file() {
                return Err(TestGuestError::Missing { path: path.clone() });
            }
        }
        Ok(guest)
    }

    /// Format of [`TestGuest::disk`].
    pub fn disk_format(&self) -> ImageFormat {
        ImageFormat::Qcow2
    }

    /// Direct kernel boot of this guest with `extra_cmdline` appended to [`DEFAULT_CMDLINE`].
    pub fn kernel_boot(&self, extra_cmdline: &str) -> DirectKernelBoot {
        let cmdline = if extra_cmdline.is_empty() {
            DEFAULT_CMDLINE.to_owned()
        } else {
            format!("{DEFAULT_CMDLINE} {extra_cmdline}")
        };
        DirectKernelBoot {
            kernel: self.vmlinuz.clone(),
            initrd: Some(self.initrd.clone()),
            cmdline: Some(cmdline),
        }
    }
}

/// Polls a console log until it contains `needle` (every 10 ms, up to `timeout`); returns the
/// log's text at that moment.
pub async fn wait_for_console_text(
    path: &Path,
    needle: &str,
    timeout: Duration,
) -> Result<String, TestGuestError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let bytes = tokio::fs::read(path).await.unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        if text.contains(needle) {
            return Ok(text.into_owned());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(TestGuestError::ConsoleTimeout {
                path: path.to_owned(),
                needle: needle.to_owned(),
                timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_guest_says_which_script_to_run() {
        let directory = tempfile::tempdir().unwrap();
        let error = TestGuest::in_directory(directory.path()).unwrap_err();
        assert!(error.to_string().contains("scripts/build-guest"), "{error}");
    }

    #[tokio::test]
    async fn console_wait_times_out_with_the_needle_in_the_error() {
        let directory = tempfile::tempdir().unwrap();
        let log = directory.path().join("console.log");
        std::fs::write(&log, "booting\n").unwrap();
        let error = wait_for_console_text(&log, "never", Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("never"), "{error}");
        let text = wait_for_console_text(&log, "boot", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(text, "booting\n");
    }
}
