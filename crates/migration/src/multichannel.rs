//! A multifd migration through the proxy: QEMU's main channel and each of its multifd channels
//! cross the link as a proxied stream of their own, over a transport session of their own.
//!
//! Why: one ordered stream striped over several connections waits, at every lost segment, for
//! that segment's retransmission before anything behind it reaches QEMU (at 1 Gbit/s, 50 ms and
//! 0.5 % loss the destination's out-of-order data jumped to 15-30 MB and the link idled; see
//! bench/migration/README.md). QEMU's multifd channels are independent of each other — the
//! destination loads each in its own thread and meets them only at QEMU's own sync points (a
//! `SYNC` packet on every channel, `MULTIFD_FLUSH` on the main one) — so a loss stalls one
//! channel, not the migration. Each channel keeps the proxy's guarantees: its pages go through
//! the page codec (a mirror of its own; the held image and boot-file indexes shared), its bytes
//! are rebuilt exactly, and its own END digest proves it.
//!
//! QEMU must migrate with `multifd` on and `multifd-compression` `none` on both sides (the
//! codec compresses; a compressed channel would pass through unchanged), and without post-copy
//! (its return path and page requests ride the single-stream proxy).
//!
//! Session order: the source opens its sessions one after the other and the destination accepts
//! them in that order; the first carries the main channel. Each session's hello names what it
//! carries, so a mix-up fails at once instead of feeding QEMU the wrong bytes.

use std::path::Path;

use novacron_transport::Session;
use tokio::io::AsyncReadExt;

use crate::multifd::is_multifd_hello;
use crate::proxy::{
    ProxyConfig, ProxyError, ProxyReport, SendWindowControl, StreamFormat,
    receive_migration_stream, send_migration_stream,
};

/// Multifd channels the proxy asks QEMU for: as many as the benchmarks' reference (QEMU's
/// multifd ×4), each carried by a session with one connection.
pub const PROXY_MULTIFD_CHANNELS: usize = 4;

/// Session options for each connection of a multifd migration, from `base`: one bulk
/// connection, never more, as each of QEMU's own multifd channels is one TCP connection.
pub fn multifd_session_options(
    base: novacron_transport::SessionOptions,
) -> novacron_transport::SessionOptions {
    novacron_transport::SessionOptions {
        initial_bulk_connections: Some(1),
        parallel_start_connections: 1,
        adapt_stream_count: false,
        ..base
    }
}

/// The proxy's settings for one of the `connections` (the main one or a multifd channel): its
/// format, its share of the link's rate (each session sizes its window and caps its pacing
/// from it), and its own send-window handle (a drain applies to the single-stream proxy only).
fn channel_config(config: &ProxyConfig, format: StreamFormat, connections: usize) -> ProxyConfig {
    ProxyConfig {
        format,
        initial_rate_bytes_per_second: config.initial_rate_bytes_per_second
            / connections.max(1) as f64,
        window_control: if format == StreamFormat::Migration {
            config.window_control.clone()
        } else {
            SendWindowControl::default()
        },
        ..config.clone()
    }
}

/// Adds another connection's report to the whole migration's. The stream checksum and the
/// codec thread's timing stay the main channel's.
fn absorb(total: &mut ProxyReport, channel: &ProxyReport) {
    total.stream_bytes += channel.stream_bytes;
    total.message_bytes += channel.message_bytes;
    total.batches += channel.batches;
    total.pages += channel.pages;
    total.opaque_bytes += channel.opaque_bytes;
    total.script_bytes += channel.script_bytes;
    // One counter shared by every connection's codec (the held files' index): its latest value.
    total.pages_from_files = total.pages_from_files.max(channel.pages_from_files);
    total.codec.absorb(&channel.codec);
}

/// Source side: accepts the `sessions.len()` connections QEMU opens to `listener` (its main
/// channel and `sessions.len() - 1` multifd channels, in whatever order), tells them apart by
/// their first bytes, and sends each over its own session: the main channel over `sessions[0]`,
/// the multifd channels over the others in the order they were accepted. Returns once every
/// connection's stream reached the destination; the report sums them.
pub async fn send_multifd_migration(
    listener: &tokio::net::UnixListener,
    sessions: &[Session],
    config: &ProxyConfig,
) -> Result<ProxyReport, ProxyError> {
    if sessions.len() < 2 {
        return Err(ProxyError::Protocol {
            offset: 0,
            reason: format!(
                "a multifd migration needs a session for the main channel and at least one for a \
                 multifd channel, got {}",
                sessions.len()
            ),
        });
    }
    let mut connections = Vec::with_capacity(sessions.len());
    for _ in 0..sessions.len() {
        let (mut connection, _) = listener.accept().await.map_err(|source| ProxyError::Io {
            action: "accepting QEMU's migration connections",
            source,
        })?;
        let mut first = [0u8; 4];
        connection
            .read_exact(&mut first)
            .await
            .map_err(|source| ProxyError::Io {
                action: "reading the first bytes of QEMU's migration connection",
                source,
            })?;
        connections.push((is_multifd_hello(&first), first, connection));
    }
    let mains = connections.iter().filter(|(multifd, ..)| !multifd).count();
    if mains != 1 {
        return Err(ProxyError::Protocol {
            offset: 0,
            reason: format!(
                "QEMU opened {mains} main migration channels among {} connections; expected one \
                 (is multifd-channels {} on the source?)",
                connections.len(),
                sessions.len() - 1
            ),
        });
    }
    // The main channel first, then the multifd channels in the order they came.
    connections.sort_by_key(|(multifd, ..)| *multifd);
    let started = std::time::Instant::now();
    let count = connections.len();
    let sends = connections.into_iter().zip(sessions).enumerate().map(
        |(index, ((multifd, first, connection), session))| {
            let config = channel_config(
                config,
                if multifd {
                    StreamFormat::Multifd
                } else {
                    StreamFormat::Migration
                },
                count,
            );
            async move {
                let input = std::io::Cursor::new(first).chain(connection);
                let report = send_migration_stream(input, session, &config).await;
                tracing::debug!(
                    connection = index,
                    stream_bytes = report.as_ref().map_or(0, |report| report.stream_bytes),
                    seconds = started.elapsed().as_secs_f64(),
                    "a multifd migration's connection is through"
                );
                report
            }
        },
    );
    combine(futures::future::join_all(sends).await)
}

/// Destination side: writes what `sessions` carry into the destination QEMU's `-incoming`
/// socket at `incoming`, one connection per session (`sessions[0]` the main channel). Succeeds
/// only when every connection's stream arrived whole and proved equal to the source's.
pub async fn receive_multifd_migration(
    sessions: &[Session],
    incoming: &Path,
    config: &ProxyConfig,
) -> Result<ProxyReport, ProxyError> {
    let mut sinks = Vec::with_capacity(sessions.len());
    for _ in sessions {
        sinks.push(
            tokio::net::UnixStream::connect(incoming)
                .await
                .map_err(|source| ProxyError::Io {
                    action: "connecting to the destination QEMU's incoming socket",
                    source,
                })?,
        );
    }
    let count = sinks.len();
    let receives = sinks
        .into_iter()
        .zip(sessions)
        .enumerate()
        .map(|(index, (sink, session))| {
            let config = channel_config(
                config,
                if index == 0 {
                    StreamFormat::Migration
                } else {
                    StreamFormat::Multifd
                },
                count,
            );
            async move { receive_migration_stream(session, sink, &config).await }
        });
    combine(futures::future::join_all(receives).await)
}

/// The whole migration's report, or the first connection's failure. A failed connection does
/// not stop the others early: it leaves the destination QEMU with a broken channel, which fails
/// the migration and with it every other connection.
fn combine(reports: Vec<Result<ProxyReport, ProxyError>>) -> Result<ProxyReport, ProxyError> {
    let mut reports = reports.into_iter();
    let mut total = reports.next().expect("at least one connection")?;
    for report in reports {
        absorb(&mut total, &report?);
    }
    Ok(total)
}
