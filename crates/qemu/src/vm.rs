//! A running QEMU process: launch, re-attach, exit watching and stop.
//!
//! QEMU runs in its own session, outside `novacron serve`'s lifetime: a restart of `serve`
//! re-attaches through the run directory (pid file + QMP socket), as libvirt and Incus do. So the
//! process is only sometimes our child: when we launched it in this process we get its exact wait
//! status; after a re-attach we watch a pidfd and infer the cause from QMP (a `SHUTDOWN` event
//! precedes every orderly exit, so its absence means the process was killed or crashed) and from
//! QEMU's log. This module does not decide what an exit means for the VM's desired state.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use uuid::Uuid;

use crate::accelerator::Accelerator;
use crate::binaries::QemuBinaries;
use crate::launch::{LaunchSpec, RunDirectory};
use crate::qmp::{QmpClient, QmpError, QmpEvent, QmpObserver};

/// How long QEMU may take to open its QMP socket after being started.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Poll interval while waiting for QEMU's QMP socket.
const START_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// After the process ended, how long to wait for QMP to deliver what QEMU wrote before exiting.
const EXIT_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `quit` may take before SIGKILL.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the kernel may take to reap QEMU after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long re-attach waits for QMP (another client may hold the socket).
const ATTACH_QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of QEMU's log and of the console log kept in a [`QemuExit`].
const LOG_TAIL_BYTES: u64 = 4096;
/// Version of `launch.json`.
const LAUNCH_RECORD_FORMAT: u32 = 1;

/// Why a QEMU process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum QemuExitReason {
    /// The guest powered off or halted; `reason` is QEMU's (`guest-shutdown`, ...).
    GuestShutdown { reason: String },
    /// The guest kernel panicked (reported through the pvpanic device).
    GuestPanicked,
    /// The host asked QEMU to exit: QMP `quit` (`host-qmp-quit`) or SIGTERM/SIGINT/SIGHUP
    /// (`host-signal`).
    HostShutdown { reason: String },
    /// Killed by a signal without an orderly shutdown (e.g. `kill -9`).
    Killed { signal: i32 },
    /// Died of a crash signal (SIGSEGV, SIGABRT, SIGBUS, SIGILL, SIGFPE).
    Crashed { signal: i32 },
    /// Exited with a status code without an orderly shutdown (an error: see the log tail).
    Failed { exit_code: i32 },
    /// Ended without an orderly shutdown and its status is unknown, because it was not our
    /// child (re-attached): it was killed or it crashed.
    Vanished,
}

/// How a QEMU process ended, with the tails of its logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuExit {
    /// The cause.
    pub reason: QemuExitReason,
    /// Last bytes of QEMU's own stdout/stderr (`qemu.log`).
    pub qemu_log_tail: String,
    /// Last bytes of the guest's serial console (`console.log`).
    pub console_log_tail: String,
}

impl QemuExit {
    /// An orderly exit: the guest shut down or the host asked QEMU to quit.
    pub fn is_orderly(&self) -> bool {
        matches!(
            self.reason,
            QemuExitReason::GuestShutdown { .. } | QemuExitReason::HostShutdown { .. }
        )
    }
}

impl std::fmt::Display for QemuExit {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.reason {
            QemuExitReason::GuestShutdown { reason } => {
                write!(formatter, "guest shut down ({reason})")?
            }
            QemuExitReason::HostShutdown { reason } => {
                write!(formatter, "stopped by the host ({reason})")?
            }
            QemuExitReason::GuestPanicked => write!(formatter, "guest kernel panicked")?,
            QemuExitReason::Killed { signal } => {
                write!(formatter, "qemu killed by {}", signal_name(*signal))?
            }
            QemuExitReason::Crashed { signal } => {
                write!(formatter, "qemu crashed with {}", signal_name(*signal))?
            }
            QemuExitReason::Failed { exit_code } => {
                write!(formatter, "qemu exited with status {exit_code}")?
            }
            QemuExitReason::Vanished => write!(
                formatter,
                "qemu ended without shutting down (killed or crashed)"
            )?,
        }
        let last_line = self
            .qemu_log_tail
            .lines()
            .rev()
            .find(|line| !line.trim().is_empty() && !line.starts_with("==="));
        if !self.is_orderly()
            && let Some(line) = last_line
        {
            write!(formatter, ": {}", line.trim())?;
        }
        Ok(())
    }
}

/// A QEMU launch, attach or stop failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The QEMU binary is missing.
    #[error(transparent)]
    Binary(#[from] crate::binaries::BinaryError),
    /// The launch spec is invalid.
    #[error("cannot launch vm {name}: {detail}")]
    InvalidSpec { name: String, detail: String },
    /// The run directory could not be prepared or read.
    #[error("run directory {} of vm {name}", path.display())]
    RunDirectory {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A QEMU for this run directory is already running.
    #[error("vm {name} already has a running qemu (pid {pid}) in {}", run_dir.display())]
    AlreadyRunning {
        name: String,
        pid: i32,
        run_dir: PathBuf,
    },
    /// Another launch into the same run directory is under way.
    #[error("vm {name} is already being launched in {}", run_dir.display())]
    LaunchInProgress { name: String, run_dir: PathBuf },
    /// QEMU could not be executed.
    #[error("cannot execute {} for vm {name}", binary.display())]
    Spawn {
        name: String,
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited during start-up.
    #[error("qemu for vm {name} failed to start ({status}): {stderr}")]
    StartFailed {
        name: String,
        status: String,
        stderr: String,
    },
    /// QEMU did not open its QMP socket in time (it was killed).
    #[error("qemu for vm {name} did not become ready within {timeout:?}")]
    StartTimeout { name: String, timeout: Duration },
    /// A QMP exchange failed.
    #[error("qmp error on vm {name}")]
    Qmp {
        name: String,
        #[source]
        source: QmpError,
    },
    /// A process operation (pidfd, signal) failed.
    #[error("cannot {action} qemu process {pid} of vm {name}")]
    Process {
        name: String,
        pid: i32,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// QEMU is still alive after SIGKILL.
    #[error("qemu process {pid} of vm {name} did not exit after SIGKILL within {timeout:?}")]
    StopTimeout {
        name: String,
        pid: i32,
        timeout: Duration,
    },
}

/// What was launched, written to the run directory as `launch.json` and read back on re-attach.
///
/// On-disk format, version 1 (`format: 1`): `{"format", "name", "uuid", "accelerator" ("kvm" |
/// "tcg"), "qemu_binary"}`. A re-attach that cannot read it falls back to the process's command
/// line (`-uuid`, `-accel`), so a newer format never strands a running VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LaunchRecord {
    format: u32,
    name: String,
    uuid: Uuid,
    accelerator: Accelerator,
    qemu_binary: PathBuf,
}

enum ProcessWatch {
    /// Our child: its wait status is exact.
    Child(tokio::process::Child),
    /// Not our child (re-attached): a pidfd tells when it ends.
    Pidfd(OwnedFd),
}

/// A running (or just ended) QEMU process with its QMP connection.
///
/// Dropping it closes the QMP connection and stops watching; QEMU keeps running (that is what a
/// restart of `novacron serve` does), and [`QemuVm::attach`] finds it again.
pub struct QemuVm {
    name: String,
    uuid: Uuid,
    pid: i32,
    accelerator: Accelerator,
    run_directory: RunDirectory,
    qmp: QmpClient,
    pidfd: Arc<OwnedFd>,
    exit: watch::Receiver<Option<QemuExit>>,
    watcher: tokio::task::JoinHandle<()>,
}

/// A QEMU process, started or found running, with its QMP connection: what a [`QemuVm`] is made
/// of before its exit is watched.
struct Attached {
    name: String,
    uuid: Uuid,
    pid: i32,
    accelerator: Accelerator,
    run_directory: RunDirectory,
    qmp: QmpClient,
    pidfd: OwnedFd,
    watch: ProcessWatch,
}

impl std::fmt::Debug for QemuVm {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("QemuVm")
            .field("name", &self.name)
            .field("uuid", &self.uuid)
            .field("pid", &self.pid)
            .field("run_directory", &self.run_directory.path())
            .finish_non_exhaustive()
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl QemuVm {
    /// Starts QEMU for `spec`, detached in its own session, and connects to its QMP socket.
    /// On failure nothing is left running and the error carries QEMU's stderr.
    pub async fn launch(binaries: &QemuBinaries, spec: &LaunchSpec) -> Result<Self, VmError> {
        let name = spec.name.clone();
        // QEMU runs with its run directory as working directory (a core dump lands there), so
        // every path it is given must be absolute.
        let spec = &absolute_paths(spec).map_err(|source| VmError::RunDirectory {
            name: name.clone(),
            path: spec.run_dir.clone(),
            source,
        })?;
        spec.validate().map_err(|detail| VmError::InvalidSpec {
            name: name.clone(),
            detail,
        })?;
        binaries.check_system_binary()?;
        let run_directory = RunDirectory::new(&spec.run_dir);
        let directory_error = |path: &Path| {
            let name = name.clone();
            let path = path.to_owned();
            move |source| VmError::RunDirectory { name, path, source }
        };
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(run_directory.path())
                .map_err(directory_error(run_directory.path()))?;
        }
        // Held until this function returns: two launches into one run directory would otherwise
        // both remove "stale" sockets, one of them the other's live QMP socket.
        let lock_path = run_directory.path().join("launch.lock");
        let _launch_lock = {
            let lock_file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(directory_error(&lock_path))?;
            match lock_file.try_lock() {
                Ok(()) => lock_file,
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(VmError::LaunchInProgress {
                        name,
                        run_dir: spec.run_dir.clone(),
                    });
                }
                Err(std::fs::TryLockError::Error(source)) => {
                    return Err(directory_error(&lock_path)(source));
                }
            }
        };
        if let Some(pid) = live_qemu_pid(&run_directory, spec.uuid) {
            return Err(VmError::AlreadyRunning {
                name,
                pid,
                run_dir: spec.run_dir.clone(),
            });
        }
        for stale in [
            run_directory.qmp_socket(),
            run_directory.console_socket(),
            run_directory.pid_file(),
        ] {
            remove_if_present(&stale).map_err(directory_error(&stale))?;
        }
        let record = LaunchRecord {
            format: LAUNCH_RECORD_FORMAT,
            name: name.clone(),
            uuid: spec.uuid,
            accelerator: spec.accelerator,
            qemu_binary: binaries.system.clone(),
        };
        let record_path = run_directory.launch_record();
        let record_json =
            serde_json::to_vec_pretty(&record).map_err(|error| VmError::InvalidSpec {
                name: name.clone(),
                detail: format!("cannot encode launch record: {error}"),
            })?;
        std::fs::write(&record_path, record_json).map_err(directory_error(&record_path))?;

        let log_path = run_directory.qemu_log();
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(directory_error(&log_path))?;
        writeln!(
            log,
            "=== launch of vm {name} ({}) at unix time {} ===",
            spec.uuid,
            unix_time_seconds()
        )
        .map_err(directory_error(&log_path))?;
        let log_offset = log.metadata().map(|metadata| metadata.len()).unwrap_or(0);
        let stdout_log = log.try_clone().map_err(directory_error(&log_path))?;

        // `setsid` puts QEMU in its own session, so a terminal hang-up or a signal to `serve`'s
        // process group does not reach it; it execs in place, so QEMU stays our child.
        let mut command = match find_setsid() {
            Some(setsid) => {
                let mut command = tokio::process::Command::new(setsid);
                command.arg(&binaries.system);
                command
            }
            None => {
                let mut command = tokio::process::Command::new(&binaries.system);
                command.process_group(0);
                command
            }
        };
        command
            .args(spec.qemu_arguments())
            .current_dir(run_directory.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout_log))
            .stderr(Stdio::from(log))
            .kill_on_drop(false);
        tracing::info!(vm = %name, uuid = %spec.uuid, accelerator = %spec.accelerator, "launching qemu");
        let mut child = command.spawn().map_err(|source| VmError::Spawn {
            name: name.clone(),
            binary: binaries.system.clone(),
            source,
        })?;
        let child_pid = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .unwrap_or(0);

        let qmp = match wait_for_qmp(&name, &mut child, &run_directory, log_offset).await {
            Ok(qmp) => qmp,
            Err(error) => {
                let _ = child.start_kill();
                let _ = tokio::time::timeout(KILL_TIMEOUT, child.wait()).await;
                for leftover in [
                    run_directory.qmp_socket(),
                    run_directory.console_socket(),
                    run_directory.pid_file(),
                ] {
                    let _ = remove_if_present(&leftover);
                }
                return Err(error);
            }
        };
        // QEMU wrote its pid file before opening QMP. If something in between forked, trust the
        // pid file and watch that process instead of our child.
        let pid = read_pid_file(&run_directory.pid_file()).unwrap_or(child_pid);
        let pidfd = open_pidfd(pid).map_err(|source| VmError::Process {
            name: name.clone(),
            pid,
            action: "open a pidfd for",
            source,
        })?;
        let watch = if pid == child_pid {
            ProcessWatch::Child(child)
        } else {
            tracing::warn!(vm = %name, pid, child_pid, "qemu pid differs from the launched process");
            async_pidfd(&pidfd).map_err(|source| VmError::Process {
                name: name.clone(),
                pid,
                action: "watch",
                source,
            })?
        };
        Ok(Self::assemble(Attached {
            name,
            uuid: spec.uuid,
            pid,
            accelerator: spec.accelerator,
            run_directory,
            qmp,
            pidfd,
            watch,
        }))
    }

    /// Finds the QEMU left running in `run_dir` for the VM `uuid` and connects to it.
    ///
    /// `Ok(None)` means no such QEMU is running: no pid file, or a stale one (the process is gone
    /// or the pid now belongs to another program); a stale pid file is removed.
    pub async fn attach(run_dir: &Path, uuid: Uuid) -> Result<Option<Self>, VmError> {
        let run_directory = RunDirectory::new(run_dir);
        let display_name = uuid.to_string();
        let Some(pid) = live_qemu_pid(&run_directory, uuid) else {
            match read_pid_file(&run_directory.pid_file()) {
                Some(pid) if process_is_a_qemu(pid) => {
                    // Alive and a QEMU, but another VM's: not ours to clean up.
                    tracing::warn!(run_dir = %run_dir.display(), pid, %uuid, "pid file names a qemu of another vm");
                }
                _ if run_directory.pid_file().exists() => {
                    tracing::info!(run_dir = %run_dir.display(), "removing stale qemu pid file");
                    let _ = remove_if_present(&run_directory.pid_file());
                }
                _ => {}
            }
            return Ok(None);
        };
        let pidfd = match open_pidfd(pid) {
            Ok(pidfd) => pidfd,
            Err(error) if error.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
            Err(source) => {
                return Err(VmError::Process {
                    name: display_name,
                    pid,
                    action: "open a pidfd for",
                    source,
                });
            }
        };
        // The pidfd pins the process: check again that it is the same QEMU (pid reuse race).
        if !process_is_our_qemu(pid, uuid) {
            return Ok(None);
        }
        let record: Option<LaunchRecord> = std::fs::read(run_directory.launch_record())
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        let (name, accelerator) = match &record {
            Some(record) => (record.name.clone(), record.accelerator),
            None => (
                display_name,
                accelerator_from_cmdline(pid).unwrap_or(Accelerator::Tcg),
            ),
        };
        let qmp = match tokio::time::timeout(
            ATTACH_QMP_TIMEOUT,
            QmpClient::connect(&run_directory.qmp_socket()),
        )
        .await
        {
            Ok(Ok(qmp)) => qmp,
            Ok(Err(source)) => return Err(VmError::Qmp { name, source }),
            Err(_elapsed) => {
                return Err(VmError::Qmp {
                    name,
                    source: QmpError::Timeout {
                        command: "greeting".to_owned(),
                        timeout: ATTACH_QMP_TIMEOUT,
                    },
                });
            }
        };
        let watch = async_pidfd(&pidfd).map_err(|source| VmError::Process {
            name: name.clone(),
            pid,
            action: "watch",
            source,
        })?;
        tracing::info!(vm = %name, pid, "re-attached to running qemu");
        Ok(Some(Self::assemble(Attached {
            name,
            uuid,
            pid,
            accelerator,
            run_directory,
            qmp,
            pidfd,
            watch,
        })))
    }

    /// Starts watching the process for its exit.
    fn assemble(attached: Attached) -> Self {
        let (exit_sender, exit) = watch::channel(None);
        let watcher = tokio::spawn(watch_exit(
            attached.name.clone(),
            attached.pid,
            attached.watch,
            attached.qmp.observer(),
            attached.run_directory.clone(),
            exit_sender,
        ));
        Self {
            name: attached.name,
            uuid: attached.uuid,
            pid: attached.pid,
            accelerator: attached.accelerator,
            run_directory: attached.run_directory,
            qmp: attached.qmp,
            pidfd: Arc::new(attached.pidfd),
            exit,
            watcher,
        }
    }

    /// VM name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// VM identity (`-uuid`).
    pub fn uuid(&self) -> Uuid {
        self.uuid
    }

    /// QEMU's process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The accelerator QEMU was launched with.
    pub fn accelerator(&self) -> Accelerator {
        self.accelerator
    }

    /// Where its sockets, pid file and logs are.
    pub fn run_directory(&self) -> &RunDirectory {
        &self.run_directory
    }

    /// The QMP connection (typed helpers and the raw-JSON path).
    pub fn qmp(&self) -> &QmpClient {
        &self.qmp
    }

    /// QMP events from now on (`SHUTDOWN`, `STOP`, `RESUME`, ...).
    pub fn subscribe_events(&self) -> tokio::sync::broadcast::Receiver<QmpEvent> {
        self.qmp.subscribe()
    }

    /// The exit, once the process has ended.
    pub fn exit_status(&self) -> Option<QemuExit> {
        self.exit.borrow().clone()
    }

    /// A receiver that changes to `Some` when the process ends (for `select!` loops).
    pub fn exit_receiver(&self) -> watch::Receiver<Option<QemuExit>> {
        self.exit.clone()
    }

    /// Waits until the process has ended.
    pub async fn wait_for_exit(&self) -> QemuExit {
        let mut exit = self.exit.clone();
        match exit.wait_for(Option::is_some).await {
            Ok(exit) => exit.clone().unwrap_or_else(vanished_without_logs),
            Err(_watcher_gone) => vanished_without_logs(),
        }
    }

    /// Stops the VM: ACPI power-down, then [`QemuVm::force_stop`] if the guest has not powered
    /// off within `timeout`.
    pub async fn stop(&self, timeout: Duration) -> Result<QemuExit, VmError> {
        if let Some(exit) = self.exit_status() {
            return Ok(exit);
        }
        match self.qmp.system_powerdown().await {
            Ok(()) | Err(QmpError::Disconnected { .. }) => {
                if let Ok(exit) = tokio::time::timeout(timeout, self.wait_for_exit()).await {
                    return Ok(exit);
                }
                tracing::warn!(vm = %self.name, ?timeout, "guest did not power off, forcing stop");
            }
            Err(error) => {
                tracing::warn!(vm = %self.name, %error, "acpi power-down failed, forcing stop");
            }
        }
        self.force_stop().await
    }

    /// Stops QEMU now: QMP `quit`, then SIGKILL if it is still alive after a few seconds.
    pub async fn force_stop(&self) -> Result<QemuExit, VmError> {
        if let Some(exit) = self.exit_status() {
            return Ok(exit);
        }
        let quit = tokio::time::timeout(QUIT_TIMEOUT, async {
            if let Err(error) = self.qmp.quit().await {
                tracing::warn!(vm = %self.name, %error, "qmp quit failed");
            }
            self.wait_for_exit().await
        })
        .await;
        if let Ok(exit) = quit {
            return Ok(exit);
        }
        tracing::warn!(vm = %self.name, pid = self.pid, "qemu did not quit, sending SIGKILL");
        self.kill()?;
        tokio::time::timeout(KILL_TIMEOUT, self.wait_for_exit())
            .await
            .map_err(|_elapsed| VmError::StopTimeout {
                name: self.name.clone(),
                pid: self.pid,
                timeout: KILL_TIMEOUT,
            })
    }

    /// Kills the QEMU of `uuid` running in `run_dir` without talking to it (SIGKILL through a
    /// pidfd, after checking that the pid is that QEMU), and waits until it is gone (at most
    /// [`KILL_TIMEOUT`]). For a QEMU whose monitor cannot be trusted to answer. Returns whether
    /// one was running.
    pub async fn kill_in(run_dir: &Path, uuid: Uuid) -> Result<bool, VmError> {
        let run_directory = RunDirectory::new(run_dir);
        let Some(pid) = live_qemu_pid(&run_directory, uuid) else {
            return Ok(false);
        };
        let process_error = |action: &'static str, source: std::io::Error| VmError::Process {
            name: uuid.to_string(),
            pid,
            action,
            source,
        };
        let pidfd = match open_pidfd(pid) {
            Ok(pidfd) => pidfd,
            Err(error) if error.raw_os_error() == Some(libc::ESRCH) => return Ok(false),
            Err(error) => return Err(process_error("open a pidfd for", error)),
        };
        // The pidfd pins the process: check again that it is the same QEMU (pid reuse race).
        if !process_is_our_qemu(pid, uuid) {
            return Ok(false);
        }
        match rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => {}
            Err(error) => return Err(process_error("kill", error.into())),
        }
        let deadline = tokio::time::Instant::now() + KILL_TIMEOUT;
        while process_is_our_qemu(pid, uuid) {
            if tokio::time::Instant::now() > deadline {
                return Err(VmError::StopTimeout {
                    name: uuid.to_string(),
                    pid,
                    timeout: KILL_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(true)
    }

    /// Sends SIGKILL to QEMU (through its pidfd: never to a reused pid).
    pub fn kill(&self) -> Result<(), VmError> {
        match rustix::process::pidfd_send_signal(&*self.pidfd, rustix::process::Signal::KILL) {
            Ok(()) => Ok(()),
            // Already exited (and reaped).
            Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(error) => Err(VmError::Process {
                name: self.name.clone(),
                pid: self.pid,
                action: "kill",
                source: error.into(),
            }),
        }
    }
}

fn absolute_paths(spec: &LaunchSpec) -> std::io::Result<LaunchSpec> {
    let mut spec = spec.clone();
    spec.run_dir = std::path::absolute(&spec.run_dir)?;
    if let Some(disk) = spec.disk.as_mut() {
        disk.path = std::path::absolute(&disk.path)?;
    }
    if let Some(kernel) = spec.kernel.as_mut() {
        kernel.kernel = std::path::absolute(&kernel.kernel)?;
        if let Some(initrd) = kernel.initrd.as_mut() {
            *initrd = std::path::absolute(&*initrd)?;
        }
    }
    Ok(spec)
}

async fn wait_for_qmp(
    name: &str,
    child: &mut tokio::process::Child,
    run_directory: &RunDirectory,
    log_offset: u64,
) -> Result<QmpClient, VmError> {
    let deadline = Instant::now() + START_TIMEOUT;
    let socket = run_directory.qmp_socket();
    let start_failed = |status: std::process::ExitStatus| VmError::StartFailed {
        name: name.to_owned(),
        status: status.to_string(),
        stderr: read_from(&run_directory.qemu_log(), log_offset)
            .trim()
            .to_owned(),
    };
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(start_failed(status));
        }
        if socket.exists() {
            match QmpClient::connect(&socket).await {
                Ok(qmp) => return Ok(qmp),
                Err(
                    error @ (QmpError::Protocol { .. }
                    | QmpError::Io { .. }
                    | QmpError::Disconnected { .. }),
                ) => {
                    // QEMU opened the socket and then went away: report why.
                    if let Ok(Ok(status)) =
                        tokio::time::timeout(Duration::from_secs(5), child.wait()).await
                    {
                        return Err(start_failed(status));
                    }
                    return Err(VmError::Qmp {
                        name: name.to_owned(),
                        source: error,
                    });
                }
                Err(_not_yet_listening) => {}
            }
        }
        if Instant::now() >= deadline {
            return Err(VmError::StartTimeout {
                name: name.to_owned(),
                timeout: START_TIMEOUT,
            });
        }
        tokio::time::sleep(START_POLL_INTERVAL).await;
    }
}

async fn watch_exit(
    name: String,
    pid: i32,
    watch: ProcessWatch,
    observer: QmpObserver,
    run_directory: RunDirectory,
    exit_sender: watch::Sender<Option<QemuExit>>,
) {
    let status = match watch {
        ProcessWatch::Child(mut child) => child.wait().await.ok(),
        ProcessWatch::Pidfd(pidfd) => {
            wait_for_pidfd(pidfd).await;
            None
        }
    };
    // QEMU's last QMP messages (the SHUTDOWN event) may still be in the socket buffer.
    let _ = tokio::time::timeout(EXIT_DRAIN_TIMEOUT, observer.closed()).await;
    let reason = classify_exit(observer.last_shutdown().as_ref(), status);
    if read_pid_file(&run_directory.pid_file()) == Some(pid) {
        let _ = remove_if_present(&run_directory.pid_file());
    }
    let exit = QemuExit {
        reason,
        qemu_log_tail: read_tail(&run_directory.qemu_log(), LOG_TAIL_BYTES),
        console_log_tail: read_tail(&run_directory.console_log(), LOG_TAIL_BYTES),
    };
    if exit.is_orderly() {
        tracing::info!(vm = %name, pid, exit = %exit, "qemu exited");
    } else {
        tracing::warn!(vm = %name, pid, exit = %exit, "qemu exited unexpectedly");
    }
    exit_sender.send_replace(Some(exit));
}

fn classify_exit(
    shutdown: Option<&QmpEvent>,
    status: Option<std::process::ExitStatus>,
) -> QemuExitReason {
    if let Some(event) = shutdown {
        let guest = event
            .data
            .get("guest")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
        let reason = event
            .data
            .get("reason")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("unknown")
            .to_owned();
        return if reason == "guest-panic" {
            QemuExitReason::GuestPanicked
        } else if guest {
            QemuExitReason::GuestShutdown { reason }
        } else {
            QemuExitReason::HostShutdown { reason }
        };
    }
    match status {
        None => QemuExitReason::Vanished,
        Some(status) => match (status.signal(), status.code()) {
            (Some(signal), _) if is_crash_signal(signal) => QemuExitReason::Crashed { signal },
            (Some(signal), _) => QemuExitReason::Killed { signal },
            (None, Some(exit_code)) => QemuExitReason::Failed { exit_code },
            (None, None) => QemuExitReason::Vanished,
        },
    }
}

fn is_crash_signal(signal: i32) -> bool {
    matches!(
        signal,
        libc::SIGSEGV | libc::SIGABRT | libc::SIGBUS | libc::SIGILL | libc::SIGFPE | libc::SIGSYS
    )
}

fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGSYS => "SIGSYS",
        _ => return format!("signal {signal}"),
    };
    format!("{name} (signal {signal})")
}

fn vanished_without_logs() -> QemuExit {
    QemuExit {
        reason: QemuExitReason::Vanished,
        qemu_log_tail: String::new(),
        console_log_tail: String::new(),
    }
}

/// The pid in the run directory's pid file, if that process is alive and is the QEMU of `uuid`.
fn live_qemu_pid(run_directory: &RunDirectory, uuid: Uuid) -> Option<i32> {
    let pid = read_pid_file(&run_directory.pid_file())?;
    process_is_our_qemu(pid, uuid).then_some(pid)
}

fn read_pid_file(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path)
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|pid| *pid > 0)
}

/// The arguments of a live process that is a QEMU system emulator (from `/proc/PID/cmdline`).
fn qemu_arguments_of(pid: i32) -> Option<Vec<Vec<u8>>> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let arguments: Vec<Vec<u8>> = cmdline
        .split(|byte| *byte == 0)
        .map(<[u8]>::to_vec)
        .collect();
    let program = String::from_utf8_lossy(arguments.first()?).into_owned();
    let is_qemu = Path::new(&program)
        .file_name()
        .is_some_and(|file_name| file_name.to_string_lossy().starts_with("qemu-system"));
    is_qemu.then_some(arguments)
}

fn process_is_a_qemu(pid: i32) -> bool {
    qemu_arguments_of(pid).is_some()
}

/// Whether `pid` is a live QEMU system emulator started with `-uuid UUID`.
fn process_is_our_qemu(pid: i32, uuid: Uuid) -> bool {
    let uuid_text = uuid.to_string();
    qemu_arguments_of(pid).is_some_and(|arguments| {
        arguments.windows(2).any(|pair| {
            pair[0] == b"-uuid"
                && String::from_utf8_lossy(&pair[1]).eq_ignore_ascii_case(&uuid_text)
        })
    })
}

fn accelerator_from_cmdline(pid: i32) -> Option<Accelerator> {
    let arguments = qemu_arguments_of(pid)?;
    arguments
        .windows(2)
        .find(|pair| pair[0] == b"-accel")
        .and_then(|pair| match pair[1].as_slice() {
            b"kvm" => Some(Accelerator::Kvm),
            b"tcg" => Some(Accelerator::Tcg),
            _ => None,
        })
}

fn open_pidfd(pid: i32) -> std::io::Result<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("invalid pid {pid}"),
        )
    })?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
        .map_err(std::io::Error::from)
}

fn async_pidfd(pidfd: &OwnedFd) -> std::io::Result<ProcessWatch> {
    Ok(ProcessWatch::Pidfd(pidfd.try_clone()?))
}

/// Waits until the process behind `pidfd` has ended. A pidfd becomes readable when its process
/// exits; it is polled on a blocking thread (registering it with tokio's reactor needs `unsafe`),
/// in short slices so that the thread ends soon after the waiting task is dropped.
async fn wait_for_pidfd(pidfd: OwnedFd) {
    struct CancelOnDrop(Arc<AtomicBool>);
    impl Drop for CancelOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let cancelled = Arc::new(AtomicBool::new(false));
    let _cancel_on_drop = CancelOnDrop(cancelled.clone());
    let slice = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 200_000_000,
    };
    let _ = tokio::task::spawn_blocking(move || {
        while !cancelled.load(Ordering::Relaxed) {
            let mut poll_fds = [rustix::event::PollFd::new(
                &pidfd,
                rustix::event::PollFlags::IN,
            )];
            match rustix::event::poll(&mut poll_fds, Some(&slice)) {
                Ok(0) | Err(rustix::io::Errno::INTR) => continue,
                Ok(_) => return,
                Err(error) => {
                    tracing::warn!(%error, "polling a qemu pidfd failed");
                    return;
                }
            }
        }
    })
    .await;
}

fn find_setsid() -> Option<PathBuf> {
    ["/usr/bin/setsid", "/bin/setsid"]
        .iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut text = String::new();
    if let Ok(mut file) = std::fs::File::open(path)
        && file.seek(SeekFrom::Start(offset)).is_ok()
    {
        let mut bytes = Vec::new();
        let _ = file.take(64 * 1024).read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    text
}

fn read_tail(path: &Path, bytes: u64) -> String {
    let length = std::fs::metadata(path)
        .map(|metadata| metadata.len())
        .unwrap_or(0);
    read_from(path, length.saturating_sub(bytes))
}

fn unix_time_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|duration| duration.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn shutdown(guest: bool, reason: &str) -> QmpEvent {
        QmpEvent {
            event: "SHUTDOWN".into(),
            data: json!({"guest": guest, "reason": reason}),
            timestamp_seconds: 0,
            timestamp_microseconds: 0,
        }
    }

    #[test]
    fn classify_prefers_the_shutdown_event() {
        let killed = std::process::ExitStatus::from_raw(libc::SIGKILL);
        assert_eq!(
            classify_exit(Some(&shutdown(true, "guest-shutdown")), Some(killed)),
            QemuExitReason::GuestShutdown {
                reason: "guest-shutdown".into()
            }
        );
        assert_eq!(
            classify_exit(Some(&shutdown(false, "host-qmp-quit")), None),
            QemuExitReason::HostShutdown {
                reason: "host-qmp-quit".into()
            }
        );
    }

    #[test]
    fn classify_without_shutdown_event() {
        let from_signal = |signal| std::process::ExitStatus::from_raw(signal);
        assert_eq!(
            classify_exit(None, Some(from_signal(libc::SIGKILL))),
            QemuExitReason::Killed { signal: 9 }
        );
        assert_eq!(
            classify_exit(None, Some(from_signal(libc::SIGSEGV))),
            QemuExitReason::Crashed { signal: 11 }
        );
        assert_eq!(
            classify_exit(None, Some(std::process::ExitStatus::from_raw(1 << 8))),
            QemuExitReason::Failed { exit_code: 1 }
        );
        assert_eq!(classify_exit(None, None), QemuExitReason::Vanished);
    }

    #[test]
    fn our_own_process_is_not_a_qemu() {
        let pid = i32::try_from(std::process::id()).unwrap();
        assert!(!process_is_our_qemu(pid, Uuid::new_v4()));
    }

    #[test]
    fn exit_display_names_signal_and_log_line() {
        let exit = QemuExit {
            reason: QemuExitReason::Crashed {
                signal: libc::SIGABRT,
            },
            qemu_log_tail: "=== launch ===\nqemu: assertion failed\n".into(),
            console_log_tail: String::new(),
        };
        assert_eq!(
            exit.to_string(),
            "qemu crashed with SIGABRT (signal 6): qemu: assertion failed"
        );
    }
}
