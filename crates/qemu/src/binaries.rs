//! Locating the QEMU binaries (`qemu-system-x86_64`, `qemu-img`).
//!
//! A missing binary is an error that names the Debian package to install and the command that
//! installs it. This module only finds files; it never runs them.

use std::path::{Path, PathBuf};

/// System emulator binary name.
pub const QEMU_SYSTEM_BINARY: &str = "qemu-system-x86_64";
/// Image tool binary name.
pub const QEMU_IMG_BINARY: &str = "qemu-img";
/// Debian package that ships [`QEMU_SYSTEM_BINARY`].
pub const QEMU_SYSTEM_PACKAGE: &str = "qemu-system-x86";
/// Debian package that ships [`QEMU_IMG_BINARY`].
pub const QEMU_IMG_PACKAGE: &str = "qemu-utils";

/// Directories searched after `$PATH` (a daemon may run with a minimal `PATH`).
const FALLBACK_DIRECTORIES: &[&str] = &["/usr/local/bin", "/usr/bin", "/bin"];

/// A QEMU binary could not be found or is not executable.
#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    /// Not found in `$PATH` nor in the usual directories.
    #[error(
        "{binary} not found in PATH: install the Debian package {package} (apt-get install -y {package})"
    )]
    NotFound {
        binary: &'static str,
        package: &'static str,
    },
    /// An explicitly given path does not exist or is not an executable file.
    #[error(
        "{binary} at {} is missing or not executable: install the Debian package {package} (apt-get install -y {package}) or fix the configured path",
        path.display()
    )]
    NotExecutable {
        binary: &'static str,
        package: &'static str,
        path: PathBuf,
    },
}

/// Paths of the QEMU binaries this driver runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuBinaries {
    /// `qemu-system-x86_64`.
    pub system: PathBuf,
    /// `qemu-img`.
    pub img: PathBuf,
}

impl QemuBinaries {
    /// Finds both binaries in `$PATH` (then `/usr/local/bin`, `/usr/bin`, `/bin`).
    pub fn locate() -> Result<Self, BinaryError> {
        Ok(Self {
            system: located(QEMU_SYSTEM_BINARY, QEMU_SYSTEM_PACKAGE)?,
            img: located(QEMU_IMG_BINARY, QEMU_IMG_PACKAGE)?,
        })
    }

    /// Uses the paths given (from configuration; each must be an executable file) and finds
    /// the others as [`Self::locate`] does.
    pub fn with_paths(system: Option<PathBuf>, img: Option<PathBuf>) -> Result<Self, BinaryError> {
        let system = match system {
            Some(path) => path,
            None => located(QEMU_SYSTEM_BINARY, QEMU_SYSTEM_PACKAGE)?,
        };
        let img = match img {
            Some(path) => path,
            None => located(QEMU_IMG_BINARY, QEMU_IMG_PACKAGE)?,
        };
        Self::from_paths(system, img)
    }

    /// Uses explicit paths (from configuration), checking that both are executable files.
    pub fn from_paths(
        system: impl Into<PathBuf>,
        img: impl Into<PathBuf>,
    ) -> Result<Self, BinaryError> {
        let system = system.into();
        let img = img.into();
        if !is_executable_file(&system) {
            return Err(BinaryError::NotExecutable {
                binary: QEMU_SYSTEM_BINARY,
                package: QEMU_SYSTEM_PACKAGE,
                path: system,
            });
        }
        if !is_executable_file(&img) {
            return Err(BinaryError::NotExecutable {
                binary: QEMU_IMG_BINARY,
                package: QEMU_IMG_PACKAGE,
                path: img,
            });
        }
        Ok(Self { system, img })
    }
}

impl QemuBinaries {
    /// Checks that the system emulator is (still) an executable file.
    pub fn check_system_binary(&self) -> Result<(), BinaryError> {
        if is_executable_file(&self.system) {
            Ok(())
        } else {
            Err(BinaryError::NotExecutable {
                binary: QEMU_SYSTEM_BINARY,
                package: QEMU_SYSTEM_PACKAGE,
                path: self.system.clone(),
            })
        }
    }
}

/// `binary` from `$PATH` and the usual directories, or the error naming `package`.
fn located(binary: &'static str, package: &'static str) -> Result<PathBuf, BinaryError> {
    find_in_path(binary).ok_or(BinaryError::NotFound { binary, package })
}

fn find_in_path(binary: &str) -> Option<PathBuf> {
    let from_environment = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    from_environment
        .into_iter()
        .chain(FALLBACK_DIRECTORIES.iter().map(PathBuf::from))
        .map(|directory| directory.join(binary))
        .find(|candidate| is_executable_file(candidate))
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_explicit_system_binary_names_the_package() {
        let error =
            QemuBinaries::from_paths("/nonexistent/qemu-system-x86_64", "/bin/sh").unwrap_err();
        let message = error.to_string();
        assert!(message.contains("qemu-system-x86 "), "{message}");
        assert!(
            message.contains("apt-get install -y qemu-system-x86"),
            "{message}"
        );
        assert!(
            message.contains("/nonexistent/qemu-system-x86_64"),
            "{message}"
        );
    }

    #[test]
    fn a_binary_not_given_is_found_in_path() {
        // `/bin/sh` stands for a configured system emulator; qemu-img comes from PATH (or is
        // reported missing with its package where it is not installed).
        match QemuBinaries::with_paths(Some("/bin/sh".into()), None) {
            Ok(binaries) => {
                assert_eq!(binaries.system, PathBuf::from("/bin/sh"));
                assert!(binaries.img.ends_with(QEMU_IMG_BINARY), "{binaries:?}");
                assert!(binaries.img.is_absolute(), "{binaries:?}");
            }
            Err(error) => assert!(
                matches!(
                    error,
                    BinaryError::NotFound {
                        package: QEMU_IMG_PACKAGE,
                        ..
                    }
                ),
                "{error}"
            ),
        }
        if find_in_path(QEMU_IMG_BINARY).is_some() {
            let error =
                QemuBinaries::with_paths(Some("/nonexistent/qemu".into()), None).unwrap_err();
            assert!(error.to_string().contains("/nonexistent/qemu"), "{error}");
        }
    }

    #[test]
    fn non_executable_img_binary_names_the_package() {
        let directory = tempfile::tempdir().unwrap();
        let not_executable = directory.path().join("qemu-img");
        std::fs::write(&not_executable, b"#!/bin/sh\n").unwrap();
        let error = QemuBinaries::from_paths("/bin/sh", &not_executable).unwrap_err();
        assert!(matches!(
            error,
            BinaryError::NotExecutable {
                package: QEMU_IMG_PACKAGE,
                ..
            }
        ));
        assert!(error.to_string().contains("apt-get install -y qemu-utils"));
    }
}
