//! What to launch and where its files live: [`LaunchSpec`] and [`RunDirectory`], and the QEMU
//! command line built from them.
//!
//! Building the command line is pure (no IO) so it can be tested and shown to an operator; the
//! process itself is started by [`crate::vm::QemuVm::launch`].

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::accelerator::Accelerator;
use crate::image::ImageFormat;

/// Unix socket paths longer than this do not fit in `sockaddr_un` (108 bytes with the NUL).
pub const MAX_SOCKET_PATH_BYTES: usize = 107;

/// The disk a VM boots with (attached as a virtio-blk device, the guest's `/dev/vda`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Image file (for NovaCron VMs: a qcow2 overlay over the image).
    pub path: PathBuf,
    /// Its format; never probed by QEMU.
    pub format: ImageFormat,
    /// Open the image (and its backing chain) with `O_DIRECT` (`cache.direct=on`, as
    /// `cache=none` does): the guest's own page cache is its cache, and the host's holds none
    /// of the disk. Besides not caching the disk twice, a destination of a live migration then
    /// has no host cache of the images to drop when it activates them at `cont`: with it, QEMU
    /// ran `POSIX_FADV_DONTNEED` over the whole base image inside the guest's pause (158 ms for
    /// a 1 GiB base the migration proxy had read blocks of). See [`supports_direct_io`].
    #[serde(default)]
    pub direct_io: bool,
}

/// Whether every file in `paths` can be opened with `O_DIRECT` (some file systems refuse it:
/// tmpfs before Linux 6.6, for one): whether a [`DiskSpec`] over them may set `direct_io`.
pub fn supports_direct_io(paths: &[&Path]) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    paths.iter().all(|path| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .is_ok()
    })
}

/// Boot a kernel directly instead of from the disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectKernelBoot {
    /// Kernel image (`bzImage`/`vmlinuz`).
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line; `console=ttyS0` makes the serial console the log.
    pub cmdline: Option<String>,
}

/// Everything needed to start one QEMU process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// VM name, shown in `-name` and in process listings.
    pub name: String,
    /// VM identity, passed as `-uuid` and used to recognise the process on re-attach.
    pub uuid: Uuid,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// KVM or TCG (see [`crate::accelerator::probe_accelerator`]).
    pub accelerator: Accelerator,
    /// Optional virtio disk.
    pub disk: Option<DiskSpec>,
    /// Optional direct kernel boot.
    pub kernel: Option<DirectKernelBoot>,
    /// Directory for the QMP and console sockets, pid file and logs. Created if missing; must
    /// be short enough for Unix socket paths.
    pub run_dir: PathBuf,
    /// Start with vCPUs stopped (`-S`); `cont` starts them.
    pub start_paused: bool,
    /// A second QMP monitor (`recovery.sock`) for a holder process to keep an out-of-band
    /// connection to ([`crate::held_monitor`]): a migration's incoming QEMU, whose post-copy a
    /// later `serve` may have to resume.
    pub recovery_monitor: bool,
    /// Extra QEMU arguments appended at the end (for tests and migration targets, `-incoming`).
    pub extra_arguments: Vec<String>,
}

impl LaunchSpec {
    /// A spec with 1 vCPU, 256 MiB, TCG, no disk and no kernel; adjust with the builder methods.
    pub fn new(name: impl Into<String>, uuid: Uuid, run_dir: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            uuid,
            cpus: 1,
            memory_mib: 256,
            accelerator: Accelerator::Tcg,
            disk: None,
            kernel: None,
            run_dir: run_dir.into(),
            start_paused: false,
            recovery_monitor: false,
            extra_arguments: Vec::new(),
        }
    }

    /// Sets the vCPU count.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// Sets guest memory in MiB.
    pub fn memory_mib(mut self, memory_mib: u64) -> Self {
        self.memory_mib = memory_mib;
        self
    }

    /// Sets the accelerator.
    pub fn accelerator(mut self, accelerator: Accelerator) -> Self {
        self.accelerator = accelerator;
        self
    }

    /// Attaches a virtio disk.
    pub fn disk(mut self, path: impl Into<PathBuf>, format: ImageFormat) -> Self {
        self.disk = Some(DiskSpec {
            path: path.into(),
            format,
            direct_io: false,
        });
        self
    }

    /// Opens the disk (set with [`Self::disk`] before) with `O_DIRECT`; see
    /// [`DiskSpec::direct_io`].
    pub fn disk_direct_io(mut self, direct_io: bool) -> Self {
        if let Some(disk) = &mut self.disk {
            disk.direct_io = direct_io;
        }
        self
    }

    /// Boots a kernel directly.
    pub fn kernel(mut self, kernel: DirectKernelBoot) -> Self {
        self.kernel = Some(kernel);
        self
    }

    /// Starts with vCPUs stopped.
    pub fn start_paused(mut self, start_paused: bool) -> Self {
        self.start_paused = start_paused;
        self
    }

    /// Checks what QEMU would otherwise reject late or misread.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.chars().any(|character| character.is_control()) {
            return Err(format!(
                "invalid vm name {:?}: must be non-empty without control characters",
                self.name
            ));
        }
        if self.cpus == 0 || self.cpus > 255 {
            return Err(format!("invalid cpu count {}: must be 1 to 255", self.cpus));
        }
        if self.memory_mib < 16 {
            return Err(format!(
                "invalid memory {} MiB: at least 16 MiB",
                self.memory_mib
            ));
        }
        let run_directory = RunDirectory::new(&self.run_dir);
        for socket in [run_directory.qmp_socket(), run_directory.console_socket()] {
            if socket.as_os_str().len() > MAX_SOCKET_PATH_BYTES {
                return Err(format!(
                    "run directory {} is too long: socket path {} exceeds {MAX_SOCKET_PATH_BYTES} bytes",
                    self.run_dir.display(),
                    socket.display()
                ));
            }
        }
        Ok(())
    }

    /// The QEMU arguments (without the binary) for this spec.
    pub fn qemu_arguments(&self) -> Vec<OsString> {
        let run_directory = RunDirectory::new(&self.run_dir);
        let mut arguments: Vec<OsString> = Vec::new();
        let mut push = |items: &[&str]| arguments.extend(items.iter().map(OsString::from));
        push(&[
            "-name",
            &format!("guest={},debug-threads=on", escape_option_value(&self.name)),
        ]);
        push(&["-uuid", &self.uuid.to_string()]);
        push(&["-no-user-config", "-nodefaults", "-display", "none"]);
        push(&["-machine", "q35"]);
        push(&["-accel", self.accelerator.qemu_name()]);
        push(&["-cpu", self.accelerator.cpu_model()]);
        push(&["-smp", &self.cpus.to_string()]);
        push(&["-m", &format!("{}M", self.memory_mib)]);
        push(&[
            "-chardev",
            &format!(
                "socket,id=qmp,path={},server=on,wait=off",
                escape_path(&run_directory.qmp_socket())
            ),
        ]);
        push(&["-mon", "chardev=qmp,mode=control"]);
        if self.recovery_monitor {
            push(&[
                "-chardev",
                &format!(
                    "socket,id=recovery,path={},server=on,wait=off",
                    escape_path(&run_directory.recovery_socket())
                ),
            ]);
            push(&["-mon", "chardev=recovery,mode=control"]);
        }
        push(&[
            "-chardev",
            &format!(
                "socket,id=console,path={},server=on,wait=off,logfile={},logappend=on",
                escape_path(&run_directory.console_socket()),
                escape_path(&run_directory.console_log())
            ),
        ]);
        push(&["-serial", "chardev:console"]);
        push(&["-pidfile", &run_directory.pid_file().to_string_lossy()]);
        // A guest kernel panic is reported to QEMU, which then exits with a `guest-panic` shutdown
        // instead of the guest rebooting in a loop unnoticed.
        push(&["-device", "pvpanic", "-action", "panic=shutdown"]);
        if let Some(disk) = &self.disk {
            // On the format node too: the backing chain QEMU opens inherits it.
            let cache = if disk.direct_io {
                ",cache.direct=on"
            } else {
                ""
            };
            push(&[
                "-blockdev",
                &format!(
                    "driver=file,node-name=disk0-file,filename={},discard=unmap{cache}",
                    escape_path(&disk.path)
                ),
            ]);
            push(&[
                "-blockdev",
                &format!(
                    "driver={},node-name=disk0,file=disk0-file,discard=unmap{cache}",
                    disk.format.qemu_name()
                ),
            ]);
            push(&["-device", "virtio-blk-pci,drive=disk0,id=virtio-disk0"]);
        }
        if let Some(kernel) = &self.kernel {
            push(&["-kernel", &kernel.kernel.to_string_lossy()]);
            if let Some(initrd) = &kernel.initrd {
                push(&["-initrd", &initrd.to_string_lossy()]);
            }
            if let Some(cmdline) = &kernel.cmdline {
                push(&["-append", cmdline]);
            }
        }
        if self.start_paused {
            push(&["-S"]);
        }
        for extra in &self.extra_arguments {
            push(&[extra]);
        }
        arguments
    }
}

/// The files of one QEMU instance inside its run directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDirectory {
    path: PathBuf,
}

impl RunDirectory {
    /// Names the files inside `path` (nothing is created).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.path.join("qmp.sock")
    }

    /// The second monitor's socket, when the spec asked for one (`recovery_monitor`).
    pub fn recovery_socket(&self) -> PathBuf {
        self.path.join("recovery.sock")
    }

    /// Serial console socket: `vm console` connects here (one client at a time). A connected
    /// client must keep reading: QEMU's serial device waits for the socket, so an unread client
    /// stalls the guest's console output (and a kernel printing to it).
    pub fn console_socket(&self) -> PathBuf {
        self.path.join("console.sock")
    }

    /// Everything the guest wrote on its serial console, across restarts (appended).
    pub fn console_log(&self) -> PathBuf {
        self.path.join("console.log")
    }

    /// QEMU's pid file.
    pub fn pid_file(&self) -> PathBuf {
        self.path.join("qemu.pid")
    }

    /// QEMU's own stdout and stderr (appended, one header line per launch).
    pub fn qemu_log(&self) -> PathBuf {
        self.path.join("qemu.log")
    }

    /// What was launched (versioned JSON), read back on re-attach.
    pub fn launch_record(&self) -> PathBuf {
        self.path.join("launch.json")
    }
}

/// QEMU's option parser splits on commas; a literal comma is written twice.
fn escape_option_value(value: &str) -> String {
    value.replace(',', ",,")
}

fn escape_path(path: &Path) -> String {
    escape_option_value(&path.to_string_lossy())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arguments_as_strings(spec: &LaunchSpec) -> Vec<String> {
        spec.qemu_arguments()
            .into_iter()
            .map(|argument| argument.into_string().unwrap())
            .collect()
    }

    #[test]
    fn command_line_has_identity_sockets_disk_and_kernel() {
        let uuid = Uuid::parse_str("6f9619ff-8b86-d011-b42d-00cf4fc964ff").unwrap();
        let spec = LaunchSpec::new("web,1", uuid, "/run/vm")
            .cpus(2)
            .memory_mib(512)
            .disk("/images/a,b.qcow2", ImageFormat::Qcow2)
            .kernel(DirectKernelBoot {
                kernel: "/k/vmlinuz".into(),
                initrd: Some("/k/initrd.img".into()),
                cmdline: Some("console=ttyS0".into()),
            })
            .start_paused(true);
        let arguments = arguments_as_strings(&spec);
        let after = |flag: &str| {
            let position = arguments
                .iter()
                .position(|argument| argument == flag)
                .unwrap();
            arguments[position + 1].clone()
        };
        assert_eq!(after("-name"), "guest=web,,1,debug-threads=on");
        assert_eq!(after("-uuid"), "6f9619ff-8b86-d011-b42d-00cf4fc964ff");
        assert_eq!(after("-smp"), "2");
        assert_eq!(after("-m"), "512M");
        assert_eq!(after("-accel"), "tcg");
        assert_eq!(after("-pidfile"), "/run/vm/qemu.pid");
        assert_eq!(after("-append"), "console=ttyS0");
        assert!(arguments.contains(&"-nodefaults".to_owned()));
        assert!(arguments.contains(&"-no-user-config".to_owned()));
        assert!(arguments.contains(&"-S".to_owned()));
        assert!(
            arguments
                .iter()
                .any(|argument| argument.contains("filename=/images/a,,b.qcow2"))
        );
        assert!(
            arguments
                .iter()
                .any(|argument| argument.contains("logfile=/run/vm/console.log"))
        );
        assert!(
            !arguments.iter().any(|argument| argument.contains("-net")),
            "no network for now"
        );
    }

    #[test]
    fn a_direct_io_disk_opens_every_node_with_o_direct() {
        let blockdevs = |direct_io: bool| {
            let spec = LaunchSpec::new("vm", Uuid::new_v4(), "/run/vm")
                .disk("/vms/disk.qcow2", ImageFormat::Qcow2)
                .disk_direct_io(direct_io);
            let arguments = arguments_as_strings(&spec);
            arguments
                .windows(2)
                .filter(|pair| pair[0] == "-blockdev")
                .map(|pair| pair[1].clone())
                .collect::<Vec<_>>()
        };
        let direct = blockdevs(true);
        assert_eq!(direct.len(), 2, "{direct:?}");
        assert!(
            direct.iter().all(|node| node.ends_with(",cache.direct=on")),
            "{direct:?}"
        );
        let buffered = blockdevs(false);
        assert!(
            buffered.iter().all(|node| !node.contains("cache.")),
            "{buffered:?}"
        );
    }

    #[test]
    fn direct_io_is_supported_for_files_that_open_with_o_direct_only() {
        use std::os::unix::fs::OpenOptionsExt;
        let directory = tempfile::tempdir().unwrap();
        let file = directory.path().join("disk.raw");
        std::fs::write(&file, vec![0u8; 4096]).unwrap();
        let missing = directory.path().join("missing.raw");
        // The temporary directory's own file system decides for its file.
        let supported = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&file)
            .is_ok();
        assert_eq!(supports_direct_io(&[&file]), supported);
        assert!(!supports_direct_io(&[&missing]), "a missing file");
        assert!(
            !supports_direct_io(&[&file, &missing]),
            "every file must open"
        );
    }

    #[test]
    fn validate_rejects_long_run_directory_and_zero_cpus() {
        let long = format!("/tmp/{}", "x".repeat(120));
        let spec = LaunchSpec::new("vm", Uuid::new_v4(), long);
        assert!(spec.validate().unwrap_err().contains("too long"));
        let spec = LaunchSpec::new("vm", Uuid::new_v4(), "/tmp/vm").cpus(0);
        assert!(spec.validate().unwrap_err().contains("cpu"));
        assert!(
            LaunchSpec::new("vm", Uuid::new_v4(), "/tmp/vm")
                .validate()
                .is_ok()
        );
    }
}
