//! The few kernel calls the emulator needs that std does not offer: creating a TUN/TAP device
//! (`TUNSETIFF`), waiting for readability with a nanosecond timeout (`ppoll`), tightening the
//! calling thread's timer slack, and moving the calling thread into a network namespace
//! (`setns`). Everything here is a thin, checked wrapper; no policy lives in this module.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

/// `_IOW('T', 202, int)` from `linux/if_tun.h`.
const TUNSETIFF: u64 = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: u64 = 0x4004_54d0;
const TUN_F_CSUM: libc::c_ulong = 0x01;
const TUN_F_TSO4: libc::c_ulong = 0x02;
const TUN_F_TSO6: libc::c_ulong = 0x04;
const TUN_F_TSO_ECN: libc::c_ulong = 0x08;
const INTERFACE_NAME_SIZE: usize = 16;

/// Which kind of virtual device to create: layer 3 (IP packets) or layer 2 (Ethernet frames).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// `IFF_TUN`: reads and writes carry bare IP packets.
    Tun,
    /// `IFF_TAP`: reads and writes carry Ethernet frames (for attaching to a bridge).
    Tap,
    /// `IFF_TUN` with a virtio header and TCP segmentation offload.
    OffloadingTun,
}

/// `struct ifreq` restricted to the members `TUNSETIFF` uses; the kernel copies 40 bytes.
#[repr(C)]
struct InterfaceRequest {
    name: [u8; INTERFACE_NAME_SIZE],
    flags: libc::c_short,
    padding: [u8; 22],
}

/// Opens `/dev/net/tun` non-blocking and creates a device from `name_pattern` (which may contain
/// `%d` so the kernel picks a free name). Returns the device's file and its actual name. The
/// device disappears when the file is closed (it is not persistent).
pub fn create_tun_device(name_pattern: &str, kind: DeviceKind) -> io::Result<(File, String)> {
    create_device(name_pattern, kind, false)
}

/// Like [`create_tun_device`], but with a `virtio_net_hdr` in front of every packet and TCP
/// segmentation and checksum offload enabled, so TCP super-packets of up to 64 KiB cross it.
pub fn create_offloading_tun_device(name_pattern: &str) -> io::Result<(File, String)> {
    let (file, name) = create_device(name_pattern, DeviceKind::Tun, true)?;
    let offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
    // SAFETY: `file` is a TUN device descriptor; TUNSETOFFLOAD takes its argument by value.
    let result = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD as _, offloads) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((file, name))
}

fn create_device(
    name_pattern: &str,
    kind: DeviceKind,
    virtio_header: bool,
) -> io::Result<(File, String)> {
    if name_pattern.len() >= INTERFACE_NAME_SIZE || name_pattern.as_bytes().contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name pattern {name_pattern:?} is longer than 15 bytes"),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut request = InterfaceRequest {
        name: [0; INTERFACE_NAME_SIZE],
        flags: IFF_NO_PI
            | if virtio_header { IFF_VNET_HDR } else { 0 }
            | match kind {
                DeviceKind::Tun | DeviceKind::OffloadingTun => IFF_TUN,
                DeviceKind::Tap => IFF_TAP,
            },
        padding: [0; 22],
    };
    request.name[..name_pattern.len()].copy_from_slice(name_pattern.as_bytes());
    // SAFETY: `file` is an open descriptor for /dev/net/tun; TUNSETIFF reads and writes one
    // `struct ifreq`, and `request` is a live, writable, correctly laid out 40-byte buffer.
    let result = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            TUNSETIFF as _,
            &mut request as *mut InterfaceRequest,
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    let name_length = request
        .name
        .iter()
        .position(|&byte| byte == 0)
        .unwrap_or(INTERFACE_NAME_SIZE);
    let name = String::from_utf8_lossy(&request.name[..name_length]).into_owned();
    Ok((file, name))
}

/// Waits until `file` is readable or `timeout` passes. Returns whether it is readable.
pub fn wait_readable(file: &File, timeout: Duration) -> io::Result<bool> {
    let mut poll_entry = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let timeout = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: one valid pollfd is passed with count 1, `timeout` is a valid timespec, and a null
    // signal mask means "leave the mask unchanged".
    let result = unsafe { libc::ppoll(&mut poll_entry, 1, &timeout, std::ptr::null()) };
    if result < 0 {
        let error = io::Error::last_os_error();
        if error.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(error);
    }
    Ok(result > 0 && poll_entry.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0)
}

/// Sets the calling thread's timer slack, so timed wake-ups for delayed packets are not
/// coalesced by the default 50 µs.
pub fn set_thread_timer_slack(slack: Duration) {
    let nanoseconds = slack.as_nanos().clamp(1, u64::MAX as u128) as libc::c_ulong;
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and only affects the calling thread.
    let _ = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, nanoseconds, 0, 0, 0) };
}

/// Moves the calling thread into the network namespace bound at `/run/netns/<name>`. Only call
/// this on a thread dedicated to that namespace: it is not undone.
pub fn enter_network_namespace(name: &str) -> io::Result<()> {
    let file = File::open(format!("/run/netns/{name}"))?;
    // SAFETY: `file` is an open namespace descriptor; CLONE_NEWNET asks the kernel to check it
    // is a network namespace. setns changes only the calling thread's namespace.
    let result = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether a process with this id exists (used to find leftovers of killed runs).
pub fn process_exists(process_id: u32) -> bool {
    std::path::Path::new(&format!("/proc/{process_id}")).exists()
}

/// Asks for real-time FIFO scheduling of the calling thread at `priority` (1-99), so a
/// forwarder thread is not starved by CPU-bound neighbours (compilers, the traffic generators
/// themselves). The thread blocks in `ppoll` between packets, so it cannot monopolize a CPU, and
/// the kernel's RT throttling caps it anyway.
pub fn set_thread_realtime(priority: i32) -> io::Result<()> {
    let parameters = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `parameters` is a valid sched_param; pid 0 means the calling thread.
    let result = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &parameters) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
