//! `qemu-img` wrapper: inspect, check and create disk images.
//!
//! Every error names the file and carries what `qemu-img` said. This module runs `qemu-img` and
//! parses its JSON; it does not decide where images live (the image store does).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::{Deserialize, Serialize};

use crate::binaries::QemuBinaries;

/// A disk image format this driver accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// QEMU's copy-on-write format (overlays, backing files).
    Qcow2,
    /// A plain disk image.
    Raw,
}

impl ImageFormat {
    /// The name `qemu-img` and `-drive format=` use.
    pub fn qemu_name(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }

    fn from_qemu_name(name: &str) -> Option<Self> {
        match name {
            "qcow2" => Some(ImageFormat::Qcow2),
            "raw" => Some(ImageFormat::Raw),
            _ => None,
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.qemu_name())
    }
}

/// What `qemu-img info` reports about an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// The path that was inspected.
    pub path: PathBuf,
    /// Format as detected by `qemu-img` (`qcow2`, `raw`, `vmdk`, ...).
    pub format: String,
    /// Size the guest sees, in bytes.
    pub virtual_size: u64,
    /// Bytes allocated on the host file system.
    pub actual_size: Option<u64>,
    /// Backing file as recorded in the image (may be relative to the image's directory).
    pub backing_file: Option<String>,
    /// Format recorded for the backing file.
    pub backing_format: Option<String>,
}

impl ImageInfo {
    /// The format as an [`ImageFormat`], when it is one this driver can run.
    pub fn image_format(&self) -> Option<ImageFormat> {
        ImageFormat::from_qemu_name(&self.format)
    }
}

/// What `qemu-img check` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageCheck {
    /// Corrupted clusters or structures: the image must not be used.
    pub corruptions: u64,
    /// Leaked clusters: wasted space, harmless.
    pub leaks: u64,
    /// Errors that stopped the check.
    pub check_errors: u64,
}

impl ImageCheck {
    /// No corruption and no check error (leaks are tolerated).
    pub fn is_healthy(&self) -> bool {
        self.corruptions == 0 && self.check_errors == 0
    }
}

/// A `qemu-img` operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// `qemu-img` could not be started.
    #[error("cannot run {} for {}", binary.display(), path.display())]
    Spawn {
        binary: PathBuf,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `qemu-img` rejected the file (not an image, unreadable, corrupt header, ...).
    #[error("qemu-img {operation} failed on {}: {message}", path.display())]
    Rejected {
        operation: &'static str,
        path: PathBuf,
        message: String,
    },
    /// The file is an image in a format this driver cannot run.
    #[error("{} is a {format} image: only qcow2 and raw images are supported", path.display())]
    UnsupportedFormat { path: PathBuf, format: String },
    /// The file is not in a known image format and its size is not a whole number of sectors.
    #[error("{} is not a disk image: not qcow2, and its size ({size_bytes} bytes) is not a multiple of 512", path.display())]
    NotADiskImage { path: PathBuf, size_bytes: u64 },
    /// `qemu-img check` found corruption.
    #[error("{} is corrupt: {corruptions} corruptions, {check_errors} check errors", path.display())]
    Corrupt {
        path: PathBuf,
        corruptions: u64,
        check_errors: u64,
    },
    /// `qemu-img` printed JSON this driver does not understand.
    #[error("cannot parse qemu-img {operation} output for {}", path.display())]
    Parse {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Runs `qemu-img`.
#[derive(Debug, Clone)]
pub struct QemuImg {
    binary: PathBuf,
}

#[derive(Deserialize)]
struct RawInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "actual-size")]
    actual_size: Option<u64>,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
    #[serde(rename = "backing-filename-format")]
    backing_filename_format: Option<String>,
}

#[derive(Deserialize)]
struct RawCheck {
    #[serde(default)]
    corruptions: u64,
    #[serde(default)]
    leaks: u64,
    #[serde(rename = "check-errors", default)]
    check_errors: u64,
}

struct Output {
    success: bool,
    exit_code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// One range of a guest-visible disk as `qemu-img map` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MapExtent {
    /// Guest offset of the range.
    pub start: u64,
    pub length: u64,
    /// 0: in this file; more: in a backing file that deep.
    pub depth: u32,
    /// The range reads as zeros.
    pub zero: bool,
    /// The range holds data (not a hole or a zero cluster).
    pub data: bool,
    /// Whether its clusters are compressed (absent in older QEMU: not compressed).
    #[serde(default)]
    pub compressed: bool,
    /// Where the range's bytes are in the file, when they are stored there uncompressed.
    pub offset: Option<u64>,
}

impl QemuImg {
    /// Uses the `qemu-img` of `binaries`.
    pub fn new(binaries: &QemuBinaries) -> Self {
        Self {
            binary: binaries.img.clone(),
        }
    }

    /// `qemu-img info`: format, sizes and backing file. Works on images in use by a running VM
    /// (it opens them with shared locks).
    pub async fn info(&self, path: &Path) -> Result<ImageInfo, ImageError> {
        let mut arguments = vec!["info".into(), "--output=json".into(), "-U".into()];
        arguments.push(path.as_os_str().to_owned());
        let output = self.run(path, &arguments).await?;
        if !output.success {
            return Err(rejected("info", path, &output));
        }
        let raw: RawInfo =
            serde_json::from_str(&output.stdout).map_err(|source| ImageError::Parse {
                operation: "info",
                path: path.to_owned(),
                source,
            })?;
        Ok(ImageInfo {
            path: path.to_owned(),
            format: raw.format,
            virtual_size: raw.virtual_size,
            actual_size: raw.actual_size,
            backing_file: raw.backing_filename,
            backing_format: raw.backing_filename_format,
        })
    }

    /// Inspects a file that should be a runnable image: `info`, then a format check (qcow2, or raw
    /// with a size that is a whole number of 512-byte sectors).
    pub async fn inspect_runnable(
        &self,
        path: &Path,
    ) -> Result<(ImageInfo, ImageFormat), ImageError> {
        let info = self.info(path).await?;
        match info.image_format() {
            // Any file "is" a raw image to qemu-img; a disk is a whole number of 512-byte sectors.
            Some(ImageFormat::Raw) => {
                // qemu-img rounds a raw file's size up to a sector: look at the file itself.
                let size_bytes = std::fs::metadata(path)
                    .map(|metadata| metadata.len())
                    .unwrap_or(0);
                if size_bytes == 0 || !size_bytes.is_multiple_of(512) {
                    Err(ImageError::NotADiskImage {
                        path: path.to_owned(),
                        size_bytes,
                    })
                } else {
                    Ok((info, ImageFormat::Raw))
                }
            }
            Some(format) => Ok((info, format)),
            None => Err(ImageError::UnsupportedFormat {
                path: path.to_owned(),
                format: info.format,
            }),
        }
    }

    /// `qemu-img check`. Raw images have no metadata to check and report a clean result.
    /// Corruption is an [`ImageError::Corrupt`]; leaks are reported, not an error.
    pub async fn check(&self, path: &Path, format: ImageFormat) -> Result<ImageCheck, ImageError> {
        if format == ImageFormat::Raw {
            return Ok(ImageCheck {
                corruptions: 0,
                leaks: 0,
                check_errors: 0,
            });
        }
        let arguments = vec![
            "check".into(),
            "--output=json".into(),
            "-f".into(),
            format.qemu_name().into(),
            path.as_os_str().to_owned(),
        ];
        let output = self.run(path, &arguments).await?;
        // Exit codes: 0 clean, 2 corruption, 3 leaks only; 1 and 63 are failures to check.
        if !matches!(output.exit_code, Some(0 | 2 | 3)) {
            return Err(rejected("check", path, &output));
        }
        let raw: RawCheck =
            serde_json::from_str(&output.stdout).map_err(|source| ImageError::Parse {
                operation: "check",
                path: path.to_owned(),
                source,
            })?;
        let check = ImageCheck {
            corruptions: raw.corruptions,
            leaks: raw.leaks,
            check_errors: raw.check_errors,
        };
        if !check.is_healthy() {
            return Err(ImageError::Corrupt {
                path: path.to_owned(),
                corruptions: check.corruptions,
                check_errors: check.check_errors,
            });
        }
        Ok(check)
    }

    /// Creates a qcow2 overlay at `overlay_path` whose backing file is `backing` (recorded as an
    /// absolute path). `size_bytes` may exceed the backing image's size (the guest sees a larger
    /// disk); `None` keeps the backing image's size. Fails if `overlay_path` exists.
    pub async fn create_overlay(
        &self,
        backing: &Path,
        backing_format: ImageFormat,
        overlay_path: &Path,
        size_bytes: Option<u64>,
    ) -> Result<ImageInfo, ImageError> {
        let backing_absolute =
            std::path::absolute(backing).map_err(|error| ImageError::Rejected {
                operation: "create",
                path: backing.to_owned(),
                message: error.to_string(),
            })?;
        self.create_overlay_named(&backing_absolute, backing_format, overlay_path, size_bytes)
            .await
    }

    /// As [`Self::create_overlay`], with the backing file named relative to the overlay's
    /// directory and recorded so: the pair can be mounted at another path (a shared storage
    /// mounted elsewhere on another host) and still open.
    pub async fn create_overlay_relative(
        &self,
        backing_relative: &Path,
        backing_format: ImageFormat,
        overlay_path: &Path,
        size_bytes: Option<u64>,
    ) -> Result<ImageInfo, ImageError> {
        if backing_relative.is_absolute() {
            return Err(ImageError::Rejected {
                operation: "create",
                path: backing_relative.to_owned(),
                message: "the backing file must be named relative to the overlay".into(),
            });
        }
        self.create_overlay_named(backing_relative, backing_format, overlay_path, size_bytes)
            .await
    }

    async fn create_overlay_named(
        &self,
        backing: &Path,
        backing_format: ImageFormat,
        overlay_path: &Path,
        size_bytes: Option<u64>,
    ) -> Result<ImageInfo, ImageError> {
        let mut arguments = vec![
            "create".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            "-F".into(),
            backing_format.qemu_name().into(),
            "-b".into(),
            backing.as_os_str().to_owned(),
            overlay_path.as_os_str().to_owned(),
        ];
        if let Some(size_bytes) = size_bytes {
            arguments.push(size_bytes.to_string().into());
        }
        self.run_creating("create", overlay_path, overlay_path, &arguments)
            .await?;
        self.info(overlay_path).await
    }

    /// Writes the guest-visible content of `source` as a raw image at `destination` (sparse:
    /// zero clusters stay holes). Fails if `destination` exists.
    pub async fn convert_to_raw(
        &self,
        source: &Path,
        source_format: ImageFormat,
        destination: &Path,
    ) -> Result<(), ImageError> {
        let arguments = vec![
            "convert".into(),
            "-q".into(),
            "-f".into(),
            source_format.qemu_name().into(),
            "-O".into(),
            "raw".into(),
            source.as_os_str().to_owned(),
            destination.as_os_str().to_owned(),
        ];
        self.run_creating("convert", source, destination, &arguments)
            .await
    }

    /// `qemu-img map`: where each range of the guest-visible disk lives in the image file.
    /// Works on images in use (shared locks).
    pub async fn map(
        &self,
        path: &Path,
        format: ImageFormat,
    ) -> Result<Vec<MapExtent>, ImageError> {
        let arguments = vec![
            "map".into(),
            "--output=json".into(),
            "-U".into(),
            "-f".into(),
            format.qemu_name().into(),
            path.as_os_str().to_owned(),
        ];
        let output = self.run(path, &arguments).await?;
        if !output.success {
            return Err(rejected("map", path, &output));
        }
        serde_json::from_str(&output.stdout).map_err(|source| ImageError::Parse {
            operation: "map",
            path: path.to_owned(),
            source,
        })
    }

    /// Runs a command that writes `created`, which must not exist yet. qemu-img may leave a
    /// partial file behind when it fails: that file is ours to remove. Errors name `subject`.
    async fn run_creating(
        &self,
        operation: &'static str,
        subject: &Path,
        created: &Path,
        arguments: &[std::ffi::OsString],
    ) -> Result<(), ImageError> {
        if created.exists() {
            return Err(ImageError::Rejected {
                operation,
                path: created.to_owned(),
                message: "file already exists".to_owned(),
            });
        }
        let output = self.run(subject, arguments).await?;
        if !output.success {
            let _ = std::fs::remove_file(created);
            return Err(rejected(operation, subject, &output));
        }
        Ok(())
    }

    async fn run(
        &self,
        path: &Path,
        arguments: &[std::ffi::OsString],
    ) -> Result<Output, ImageError> {
        let output = tokio::process::Command::new(&self.binary)
            .args(arguments)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| ImageError::Spawn {
                binary: self.binary.clone(),
                path: path.to_owned(),
                source,
            })?;
        Ok(Output {
            success: output.status.success(),
            exit_code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

fn rejected(operation: &'static str, path: &Path, output: &Output) -> ImageError {
    let said = if output.stderr.trim().is_empty() {
        output.stdout.trim()
    } else {
        output.stderr.trim()
    };
    // qemu-img prefixes its messages with its own name: keep the part that explains.
    let message = said.strip_prefix("qemu-img: ").unwrap_or(said).to_owned();
    ImageError::Rejected {
        operation,
        path: path.to_owned(),
        message,
    }
}
