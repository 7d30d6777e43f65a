//! The QEMU driver: everything NovaCron needs to run one virtual machine under QEMU on this host.
//!
//! It owns the QEMU process and nothing above it: it locates the binaries ([`binaries`]), probes
//! whether KVM can really run a guest ([`accelerator`]), launches QEMU detached in its own session
//! with a QMP socket, a pid file and a logged serial console ([`launch`]), talks QMP ([`qmp`]),
//! keeps an outgoing migration's socket safe to give up on ([`migration_socket`]),
//! re-attaches to a QEMU left running by a previous `novacron serve`, watches for its exit and stops
//! it ([`vm`]), and wraps `qemu-img` ([`image`]). [`test_guest`] finds the project's test guest. It keeps no desired state and makes no policy
//! decisions (restart, placement): the VM manager above it does.
//!
//! The usual flow:
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use novacron_qemu::{LaunchSpec, QemuBinaries, QemuVm, probe_accelerator};
//! let binaries = QemuBinaries::locate()?;
//! let probe = probe_accelerator(&binaries).await;
//! let spec = LaunchSpec::new("web-1", uuid::Uuid::new_v4(), "/run/novacron/vms/web-1")
//!     .accelerator(probe.accelerator);
//! let vm = QemuVm::launch(&binaries, &spec).await?;
//! vm.qmp().stop().await?;
//! vm.qmp().cont().await?;
//! let exit = vm.stop(std::time::Duration::from_secs(30)).await?;
//! println!("{exit}");
//! # Ok(()) }
//! ```

pub mod accelerator;
pub mod binaries;
pub mod held_monitor;
pub mod image;
pub mod launch;
pub mod migration_socket;
pub mod qmp;
pub mod test_guest;
pub mod vm;

pub use accelerator::{Accelerator, AcceleratorProbe, probe_accelerator, probe_accelerator_cached};
pub use binaries::{BinaryError, QemuBinaries};
pub use held_monitor::HeldMonitor;
pub use image::{ImageCheck, ImageError, ImageFormat, ImageInfo, MapExtent, QemuImg};
pub use launch::{DirectKernelBoot, DiskSpec, LaunchSpec, RunDirectory, supports_direct_io};
pub use migration_socket::MigrationSocketKeeper;
pub use qmp::{QmpClient, QmpError, QmpEvent, QmpEventKind, RunState, StatusInfo};
pub use test_guest::{TestGuest, TestGuestError, wait_for_console_text};
pub use vm::{QemuExit, QemuExitReason, QemuVm, VmError};
