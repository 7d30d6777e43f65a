//! The realistic workload's base image, shared by the migration benches: an ext4 image filled
//! with copies of this machine's own files (real content of mixed compressibility), indexed at
//! 4 KiB as a host indexes an image when it arrives, and the index loaded back as `vm migrate`
//! loads it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};

/// The realistic workload's base image, shared by every method of the run.
pub struct RealisticDisk {
    _directory: tempfile::TempDir,
    pub base: PathBuf,
    /// Bytes of files copied into it.
    pub file_bytes: u64,
    /// The base image's blocks, as `vm migrate`'s hosts load them before a move.
    pub index: Arc<novacron_migration::ImagePageIndex>,
    /// How long building the index took (a host does it once, when the image arrives: not a
    /// migration's time).
    pub build_seconds: f64,
    /// How long loading the saved index took (a `vm migrate` host does it while preparing;
    /// added to NovaCron's times).
    pub index_seconds: f64,
}

/// Builds the realistic disk: an ext4 image of `mib` MiB whose files are copies of this
/// machine's libraries, programs and documentation (real, mixed-compressibility content).
pub fn realistic_disk(mib: u64) -> anyhow::Result<RealisticDisk> {
    let directory = tempfile::Builder::new()
        .prefix("nmb-disk-")
        .tempdir_in("/tmp")?;
    let staging = directory.path().join("files");
    std::fs::create_dir(&staging)?;
    let budget = (mib << 20) * 8 / 10;
    let mut file_bytes = 0u64;
    let mut serial = 0u64;
    let mut pending: Vec<PathBuf> = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/bin",
        "/usr/share",
        "/usr/lib",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    'walk: while let Some(directory_path) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&directory_path) else {
            continue;
        };
        let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
        entries.sort_by_key(|entry| entry.file_name());
        for entry in entries {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                let size = entry.metadata().map(|metadata| metadata.len()).unwrap_or(0);
                if size == 0 || size > 64 << 20 {
                    continue;
                }
                if file_bytes + size > budget {
                    break 'walk;
                }
                serial += 1;
                if std::fs::copy(entry.path(), staging.join(format!("f{serial:06}"))).is_ok() {
                    file_bytes += size;
                }
            }
        }
    }
    let base = directory.path().join("base.raw");
    let status = std::process::Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-b", "4096", "-d"])
        .arg(&staging)
        .arg("-F")
        .arg(&base)
        .arg(format!("{mib}M"))
        .status()
        .context("running mke2fs")?;
    if !status.success() {
        bail!("mke2fs failed to build the {mib} MiB realistic disk");
    }
    std::fs::remove_dir_all(&staging)?;
    let started = Instant::now();
    let built = novacron_migration::ImagePageIndex::build(&base)?;
    let saved = directory.path().join("base.pages");
    built.save(&saved)?;
    let build_seconds = started.elapsed().as_secs_f64();
    drop(built);
    let started = Instant::now();
    let index = Arc::new(novacron_migration::ImagePageIndex::load(&saved, &base)?);
    let index_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "realistic disk: {mib} MiB ext4 with {:.0} MiB of this machine's files; {} distinct blocks \
         indexed and saved in {build_seconds:.2} s (once, when the image arrives), loaded in \
         {index_seconds:.2} s (each migration)",
        file_bytes as f64 / f64::from(1u32 << 20),
        index.distinct_blocks()
    );
    Ok(RealisticDisk {
        _directory: directory,
        base,
        file_bytes,
        index,
        build_seconds,
        index_seconds,
    })
}
