//! Keeps the socket a source QEMU migrates into open after the reader gives up on it, and
//! drains it slowly until QEMU ends its migration ([`MigrationSocketKeeper`]).
//!
//! Why: with `auto-converge`, QEMU (9.2 and later, 10.0 here) re-syncs the dirty bitmap from
//! its main loop every 5 s when no pass began meanwhile. That sync waits, holding QEMU's big
//! lock, for the bitmap lock that the migration thread holds while it blocks writing into our
//! socket, so a transport that stalls for more than a few seconds stops QEMU's main loop (and
//! its QMP) until the write completes. If the reader then closes the socket, the tick resumes
//! as the migration fails; under TCG its sync lets the big lock go while it waits for the vCPU,
//! the failing migration stops the timer meanwhile, the tick re-arms it, the clean-up frees
//! QEMU's RAM state, and the next tick aborts QEMU (`migration_bitmap_sync_precopy: Assertion
//! 'ram_state' failed`): the guest the failed migration was to leave running on the source
//! dies. Reading what QEMU writes lets the blocked write finish and the tick's sync complete
//! while the migration still runs; QEMU's main loop then answers the `migrate_cancel` that
//! follows ([`crate::QmpClient::cancel_migration`]), whose clean-up stops the timer first. The
//! reads are slow so QEMU, seeing a slow link, does not finish the migration into them before
//! the cancel lands.

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

/// What the drain reads at a time, and the pause after each read: about 8 MiB/s.
const DRAIN_READ: usize = 64 << 10;
const DRAIN_PAUSE: Duration = Duration::from_millis(8);
/// The longest a drain runs: whoever drains cancels QEMU's migration at once, so QEMU
/// closes the socket long before (a QEMU that does not is left to its own error).
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

/// A second handle on QEMU's migration socket: while it lives, the socket stays open however
/// the reader's halves of it end. Dropped, it reads and discards what QEMU still writes,
/// slowly, on a task of its own, until QEMU closes the socket (it does once its migration
/// ended: at once after a completed one) or [`DRAIN_LIMIT`] passes; then the socket closes. So
/// a reader given up on mid-way (a failed or aborted proxy) never closes the socket under QEMU;
/// call [`crate::QmpClient::cancel_migration`] next when the migration is given up on.
pub struct MigrationSocketKeeper(Option<UnixStream>);

impl MigrationSocketKeeper {
    /// Splits `stream` into the stream the reader uses and a keeper of the same socket.
    pub fn keep(stream: UnixStream) -> std::io::Result<(UnixStream, Self)> {
        let stream = stream.into_std()?;
        let kept = stream.try_clone()?;
        Ok((
            UnixStream::from_std(stream)?,
            Self(Some(UnixStream::from_std(kept)?)),
        ))
    }
}

impl Drop for MigrationSocketKeeper {
    fn drop(&mut self) {
        let Some(mut socket) = self.0.take() else {
            return;
        };
        // Outside a runtime (its shutdown) the socket just closes.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let mut buffer = vec![0u8; DRAIN_READ];
            let drained = tokio::time::timeout(DRAIN_LIMIT, async {
                let mut total = 0u64;
                loop {
                    match socket.read(&mut buffer).await {
                        Ok(0) | Err(_) => return total,
                        Ok(read) => total += read as u64,
                    }
                    tokio::time::sleep(DRAIN_PAUSE).await;
                }
            })
            .await;
            match drained {
                Ok(0) => {}
                Ok(bytes) => tracing::debug!(bytes, "qemu's migration socket drained"),
                Err(_) => tracing::warn!(
                    "qemu kept writing into its given-up migration's socket for {} s; closing it",
                    DRAIN_LIMIT.as_secs()
                ),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// The keeper holds the socket open after the reader's handle is dropped, and dropped
    /// itself reads what the peer still writes until the peer closes.
    #[tokio::test]
    async fn the_socket_stays_open_until_the_drain_reaches_the_peers_end() {
        let (ours, mut qemu) = UnixStream::pair().expect("socket pair");
        let (reader, keeper) = MigrationSocketKeeper::keep(ours).expect("keep");
        drop(reader);
        // With only the reader's handle the peer's write would fail; the keeper keeps it open.
        let payload = vec![7u8; 1 << 20];
        let writer = tokio::spawn(async move {
            qemu.write_all(&payload)
                .await
                .expect("write into the kept socket");
            qemu.shutdown().await.expect("shutdown");
            qemu
        });
        drop(keeper);
        let mut qemu = tokio::time::timeout(Duration::from_secs(30), writer)
            .await
            .expect("the drain let the write finish")
            .expect("writer");
        // The drain saw the end and closed its handle: the peer reads the end too.
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), qemu.read_to_end(&mut rest))
            .await
            .expect("the keeper closed the socket after the drain")
            .expect("read");
        assert!(rest.is_empty());
    }
}
