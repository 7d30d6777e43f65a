//! The one socket option this crate sets that neither std nor socket2 offers: the kernel's
//! per-socket pacing cap (`SO_MAX_PACING_RATE`). A thin, checked wrapper; the policy lives in
//! `session`.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;

/// Caps the rate the kernel paces `socket`'s packets at, bytes per second (`None`: no cap).
/// The congestion control still decides the rate below the cap (BBR paces by itself; other
/// algorithms through the fair-queue qdisc).
pub fn set_max_pacing_rate(socket: &impl AsFd, bytes_per_second: Option<u64>) -> io::Result<()> {
    // `~0` is the kernel's "unlimited".
    let value: u64 = bytes_per_second.unwrap_or(u64::MAX);
    // SAFETY: the descriptor is borrowed from a live socket for the duration of the call, and
    // the option value points at a local u64 whose size is passed as the length, which the
    // kernel reads as an unsigned long on 64-bit targets.
    let result = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MAX_PACING_RATE,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<u64>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The pacing cap in effect on `socket`, bytes per second (`None`: no cap).
#[cfg(test)]
pub fn max_pacing_rate(socket: &impl AsFd) -> io::Result<Option<u64>> {
    let mut value: u64 = 0;
    let mut length = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: as in `set_max_pacing_rate`; `length` tells the kernel how much it may write to
    // `value` and is updated to what it wrote.
    let result = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MAX_PACING_RATE,
            std::ptr::from_mut(&mut value).cast(),
            &mut length,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    // A 4-byte answer (older kernels) has `~0u32` for "unlimited".
    let unlimited = if length as usize == std::mem::size_of::<u32>() {
        u64::from(u32::MAX)
    } else {
        u64::MAX
    };
    Ok((value != unlimited).then_some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacing_cap_is_set_read_back_and_lifted() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let socket = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert_eq!(max_pacing_rate(&socket).unwrap(), None, "no cap by default");
        set_max_pacing_rate(&socket, Some(75_000_000)).unwrap();
        assert_eq!(max_pacing_rate(&socket).unwrap(), Some(75_000_000));
        set_max_pacing_rate(&socket, None).unwrap();
        assert_eq!(max_pacing_rate(&socket).unwrap(), None);
    }
}
