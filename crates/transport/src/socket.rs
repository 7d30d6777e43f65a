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

/// How long a connection attempt waits for the answer to its SYN before a second attempt starts
/// beside it ([`connect_hedged`]): three round trips when one is known, within
/// [`HEDGE_AFTER_MIN`]..[`HEDGE_AFTER_MAX`], else [`HEDGE_AFTER_UNKNOWN`].
///
/// Linux retransmits a lost SYN (or the peer a lost SYN-ACK) after a full second, then three:
/// at 0.5 % loss one session of five connections met it in about one opening of twenty, a
/// second added to a migration's set-up. A second attempt after a few round trips costs one
/// more SYN on a slow path and saves most of that second on a lossy one.
pub fn hedge_after(round_trip: Option<std::time::Duration>) -> std::time::Duration {
    match round_trip {
        Some(round_trip) => (round_trip * 3).clamp(HEDGE_AFTER_MIN, HEDGE_AFTER_MAX),
        None => HEDGE_AFTER_UNKNOWN,
    }
}

/// Least wait before a second attempt: a loaded host's scheduling, not the path, below this.
pub const HEDGE_AFTER_MIN: std::time::Duration = std::time::Duration::from_millis(150);
/// Most wait before a second attempt: the kernel's own retransmission comes at one second.
pub const HEDGE_AFTER_MAX: std::time::Duration = std::time::Duration::from_millis(700);
/// Wait before a second attempt when no round trip to the peer is known yet: above a
/// continental round trip, well below the kernel's one second.
pub const HEDGE_AFTER_UNKNOWN: std::time::Duration = std::time::Duration::from_millis(300);

/// Connects like [`connect`], but starts a second attempt if the first has not connected after
/// `hedge_after` (a lost SYN or SYN-ACK), and keeps whichever connects first; the other is
/// dropped (closed). An attempt that fails before the second starts is the answer (a refused
/// connection is not retried here). Returns the connection, its own attempt's duration (a round
/// trip, also when the second attempt won) and whether the second attempt won.
pub async fn connect_hedged(
    address: SocketAddr,
    congestion_control: Option<&str>,
    hedge_after: std::time::Duration,
) -> io::Result<(TcpStream, std::time::Duration, bool)> {
    let attempt = || async {
        let started = tokio::time::Instant::now();
        let stream = connect(address, congestion_control).await?;
        Ok::<_, io::Error>((stream, started.elapsed()))
    };
    let (winner, second_won) = hedged(hedge_after, attempt).await?;
    Ok((winner.0, winner.1, second_won))
}

/// Runs `attempt`, and a second one beside it if the first has not finished after
/// `hedge_after`; the first success wins (true when it was the second's). An error is returned
/// only when no attempt succeeded: the first's at once if it failed before the second started,
/// else the last one's.
pub(crate) async fn hedged<T, E, F, Fut>(
    hedge_after: std::time::Duration,
    mut attempt: F,
) -> Result<(T, bool), E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let first = attempt();
    tokio::pin!(first);
    tokio::select! {
        result = &mut first => return result.map(|value| (value, false)),
        () = tokio::time::sleep(hedge_after) => {}
    }
    let second = attempt();
    tokio::pin!(second);
    tokio::select! {
        result = &mut first => match result {
            Ok(value) => Ok((value, false)),
            Err(_) => second.await.map(|value| (value, true)),
        },
        result = &mut second => match result {
            Ok(value) => Ok((value, true)),
            Err(_) => first.await.map(|value| (value, false)),
        },
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::Pin;
    use std::time::Duration;
    use tokio::time::Instant;

    type Attempt = Pin<Box<dyn Future<Output = Result<u32, &'static str>>>>;

    /// Attempts that answer (`Ok(number)` or the error) after the given delays, `None` never.
    fn scripted(
        outcomes: Vec<(Option<Duration>, Result<u32, &'static str>)>,
    ) -> impl FnMut() -> Attempt {
        let mut outcomes = outcomes.into_iter();
        move || {
            let (delay, result) = outcomes.next().expect("no more attempts scripted");
            Box::pin(async move {
                match delay {
                    Some(delay) => tokio::time::sleep(delay).await,
                    None => std::future::pending::<()>().await,
                }
                result
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_attempt_starts_when_the_first_is_late_and_the_first_to_connect_wins() {
        let after = Duration::from_millis(300);
        // The first SYN lost: the second attempt connects one round trip after it started.
        let started = Instant::now();
        let won = hedged(
            after,
            scripted(vec![
                (None, Ok(1)),
                (Some(Duration::from_millis(50)), Ok(2)),
            ]),
        )
        .await;
        assert_eq!(won, Ok((2, true)));
        assert_eq!(started.elapsed(), Duration::from_millis(350));
        // The first answers late but before the second: it wins.
        let won = hedged(
            after,
            scripted(vec![
                (Some(Duration::from_millis(320)), Ok(1)),
                (Some(Duration::from_millis(50)), Ok(2)),
            ]),
        )
        .await;
        assert_eq!(won, Ok((1, false)));
        // In time: no second attempt at all (the script would panic on one).
        let won = hedged(
            after,
            scripted(vec![(Some(Duration::from_millis(50)), Ok(1))]),
        )
        .await;
        assert_eq!(won, Ok((1, false)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_is_returned_only_when_no_attempt_connects() {
        let after = Duration::from_millis(300);
        // Refused before the second would start: that is the answer, at once.
        let started = Instant::now();
        let won = hedged(
            after,
            scripted(vec![(Some(Duration::from_millis(50)), Err("refused"))]),
        )
        .await;
        assert_eq!(won, Err("refused"));
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        // One of two fails after the hedge: the other still wins, whichever failed.
        let won = hedged(
            after,
            scripted(vec![
                (Some(Duration::from_millis(400)), Err("reset")),
                (Some(Duration::from_millis(200)), Ok(2)),
            ]),
        )
        .await;
        assert_eq!(won, Ok((2, true)));
        let won = hedged(
            after,
            scripted(vec![
                (Some(Duration::from_millis(500)), Ok(1)),
                (Some(Duration::from_millis(10)), Err("unreachable")),
            ]),
        )
        .await;
        assert_eq!(won, Ok((1, false)));
        // Both fail: the last error.
        let won = hedged(
            after,
            scripted(vec![
                (Some(Duration::from_millis(400)), Err("first")),
                (Some(Duration::from_millis(500)), Err("second")),
            ]),
        )
        .await;
        assert_eq!(won, Err("second"));
    }

    #[test]
    fn the_hedge_waits_a_few_round_trips_within_bounds() {
        assert_eq!(hedge_after(None), HEDGE_AFTER_UNKNOWN);
        assert_eq!(
            hedge_after(Some(Duration::from_millis(50))),
            HEDGE_AFTER_MIN
        );
        assert_eq!(
            hedge_after(Some(Duration::from_millis(100))),
            Duration::from_millis(300)
        );
        assert_eq!(
            hedge_after(Some(Duration::from_millis(600))),
            HEDGE_AFTER_MAX
        );
        assert!(
            HEDGE_AFTER_MAX < Duration::from_secs(1),
            "before the kernel's own retry"
        );
    }

    #[tokio::test]
    async fn a_hedged_connect_reaches_a_listener_and_measures_its_round_trip() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        // A hedge far beyond any loaded machine's loopback connect: one attempt.
        let patient = Duration::from_secs(30);
        let (stream, round_trip, second_won) =
            connect_hedged(address, None, patient).await.unwrap();
        let (_accepted, peer) = listener.accept().await.unwrap();
        assert_eq!(stream.local_addr().unwrap(), peer);
        assert!(round_trip < patient && !second_won, "{round_trip:?}");
        // Nothing listens once it is gone: refused, not hedged into a wait.
        drop(listener);
        let error = connect_hedged(address, None, patient).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
    }
}
