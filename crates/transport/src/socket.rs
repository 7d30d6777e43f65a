//! TCP socket set-up for transport connections: congestion control per socket (BBR by default:
//! loss-based CUBIC collapses on long lossy paths, and other hosts may default to it), no Nagle
//! delay. Send and receive buffers are left to the kernel's autotuning, which setting them would
//! disable.

use std::io;
use std::net::SocketAddr;

use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream};

/// A connection whose sent data stays unacknowledged this long, or whose idle peer stops
/// answering keepalive probes for about this long, is closed by the kernel, so the session
/// notices a silently dead path (a cut link sends no reset) and starts resuming, instead of
/// waiting for TCP's own give-up after about 15 minutes.
pub const DEAD_CONNECTION_AFTER: std::time::Duration = std::time::Duration::from_secs(15);

/// Fallback for a connection's largest send buffer when `/proc` cannot be read.
const DEFAULT_PER_CONNECTION_WINDOW_BYTES: u64 = 4 << 20;

/// Default bound on bytes written to one connection's socket but not yet sent (see
/// [`configure_connected`]).
pub const DEFAULT_UNSENT_LIMIT_BYTES: u32 = 256 << 10;

/// Applies the options to a connected socket; returns the congestion control in effect.
///
/// `unsent_limit_bytes` (`TCP_NOTSENT_LOWAT`, 0 keeps the kernel's default) bounds what the
/// socket holds beyond its congestion window. Frames wait in the session's own queue instead,
/// where whichever connection can send next takes them: without the bound, autotuned send
/// buffers (up to `tcp_wmem`'s maximum) let one connection that is recovering from a loss, or
/// in BBR's periodic RTT probe, sit on megabytes of frames that every other connection's
/// frames then wait behind at the receiver.
pub fn configure_connected(
    stream: &TcpStream,
    congestion_control: Option<&str>,
    unsent_limit_bytes: u32,
) -> Option<String> {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "cannot disable nagle on transport socket");
    }
    let socket = SockRef::from(stream);
    if unsent_limit_bytes > 0
        && let Err(error) = socket.set_tcp_notsent_lowat(unsent_limit_bytes)
    {
        tracing::debug!(%error, "cannot limit unsent bytes on transport socket");
    }
    if let Err(error) = socket.set_tcp_user_timeout(Some(DEAD_CONNECTION_AFTER)) {
        tracing::debug!(%error, "cannot set tcp user timeout on transport socket");
    }
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(DEAD_CONNECTION_AFTER / 3)
        .with_interval(DEAD_CONNECTION_AFTER / 6)
        .with_retries(4);
    if let Err(error) = socket.set_tcp_keepalive(&keepalive) {
        tracing::debug!(%error, "cannot enable tcp keepalive on transport socket");
    }
    if let Some(name) = congestion_control
        && let Err(error) = socket.set_tcp_congestion(name.as_bytes())
    {
        tracing::warn!(congestion_control = name, %error, "cannot set tcp congestion control");
    }
    socket.tcp_congestion().ok().map(|name| {
        String::from_utf8_lossy(&name)
            .trim_end_matches('\0')
            .to_string()
    })
}

/// Connects with the congestion control set before the handshake, so the first round trips use it.
pub async fn connect(
    address: SocketAddr,
    congestion_control: Option<&str>,
) -> io::Result<TcpStream> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(name) = congestion_control
        && let Err(error) = SockRef::from(&socket).set_tcp_congestion(name.as_bytes())
    {
        tracing::warn!(congestion_control = name, %error, "cannot set tcp congestion control");
    }
    socket.connect(address).await
}

/// The most one TCP connection can keep in flight here: the kernel's maximum send buffer
/// (third field of `net.ipv4.tcp_wmem`).
pub fn per_connection_window_bytes() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|text| text.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(DEFAULT_PER_CONNECTION_WINDOW_BYTES)
}

/// Congestion control algorithms this kernel offers.
pub fn available_congestion_controls() -> Vec<String> {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
        .map(|text| text.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}
