//! Watches: a stream of the changes under a key prefix, starting at a chosen revision.
//!
//! The changes themselves are read from the store's kept history (the `changes` table, the last
//! `watch_history_revisions` revisions); the state machine only broadcasts "revision N is
//! applied" notices to wake watchers. So a slow watcher costs no memory and loses nothing while
//! the history still holds what it has not read: a watcher that falls behind the broadcast
//! buffer catches up from the table. Only when the history it needs was pruned, or when its node
//! replaced its state with a snapshot, does it fail, with an error telling the caller to list
//! again: it never silently skips changes.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};

use tokio::sync::{broadcast, watch};

use crate::error::{Result, StoreError};
use crate::kv::WatchEvent;
use crate::storage::StoreDatabase;

/// What the state machine broadcasts after it commits.
#[derive(Debug, Clone)]
pub(crate) enum ChangeNotice {
    /// Revisions up to `revision` are applied and in the history.
    Changes { revision: u64 },
    /// The whole state was replaced by a snapshot.
    Reset,
}

#[derive(Debug, Clone, Copy)]
enum WatchFailure {
    Lagged,
    Reset,
    ShuttingDown,
}

/// A stream of changes under a prefix. Get one from [`crate::Store::watch`].
#[derive(Debug)]
pub struct Watcher {
    prefix: String,
    /// Weak, so an idle watcher does not keep the database open after shutdown.
    database: Weak<StoreDatabase>,
    pending: VecDeque<WatchEvent>,
    /// Every change up to this revision is already queued or delivered.
    delivered_through: u64,
    receiver: broadcast::Receiver<ChangeNotice>,
    shutdown: watch::Receiver<bool>,
    failure: Option<WatchFailure>,
}

impl Watcher {
    pub(crate) fn start(
        database: &Arc<StoreDatabase>,
        prefix: String,
        from_revision: u64,
        notices: &broadcast::Sender<ChangeNotice>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self> {
        // Subscribe first: a change committed between the history read and the subscription
        // would otherwise be noticed by nobody.
        let receiver = notices.subscribe();
        let history = database.changes_since(&prefix, from_revision)?;
        if from_revision != 0 && from_revision <= history.compacted_revision {
            return Err(StoreError::Compacted {
                requested: from_revision,
                compacted_revision: history.compacted_revision,
            });
        }
        let delivered_through = history.revision.max(from_revision.saturating_sub(1));
        Ok(Self {
            prefix,
            database: Arc::downgrade(database),
            pending: history.events.into(),
            delivered_through,
            receiver,
            shutdown,
            failure: None,
        })
    }

    /// The watched prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The next change, in revision order (changes of one transaction in operation order).
    /// Waits until there is one. After an error the watcher is finished and keeps returning it.
    pub async fn next(&mut self) -> Result<WatchEvent> {
        loop {
            if let Some(failure) = self.failure {
                return Err(self.error(failure));
            }
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            let woken = tokio::select! {
                biased;
                received = self.receiver.recv() => Some(received),
                _ = self.shutdown.wait_for(|stopped| *stopped) => None,
            };
            match woken {
                Some(Ok(ChangeNotice::Changes { revision })) => {
                    if revision > self.delivered_through {
                        self.catch_up()?;
                    }
                }
                Some(Ok(ChangeNotice::Reset)) => self.failure = Some(WatchFailure::Reset),
                // Missed notices, not changes: the history has them.
                Some(Err(broadcast::error::RecvError::Lagged(_))) => self.catch_up()?,
                Some(Err(broadcast::error::RecvError::Closed)) | None => {
                    self.failure = Some(WatchFailure::ShuttingDown);
                }
            }
        }
    }

    /// The watcher as a stream: yields events, then the error that ends it (if any), then ends.
    pub fn into_stream(self) -> impl futures::Stream<Item = Result<WatchEvent>> + Send {
        futures::stream::unfold(Some(self), |state| async move {
            let mut watcher = state?;
            match watcher.next().await {
                Ok(event) => Some((Ok(event), Some(watcher))),
                Err(error) => Some((Err(error), None)),
            }
        })
    }

    /// Reads every change after `delivered_through` from the history.
    fn catch_up(&mut self) -> Result<()> {
        // One read covers every queued notice; a queued reset still wins.
        loop {
            match self.receiver.try_recv() {
                Ok(ChangeNotice::Reset) => {
                    self.failure = Some(WatchFailure::Reset);
                    return Ok(());
                }
                Ok(ChangeNotice::Changes { .. })
                | Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
        let Some(database) = self.database.upgrade() else {
            self.failure = Some(WatchFailure::ShuttingDown);
            return Ok(());
        };
        let from_revision = self.delivered_through + 1;
        let history = database.changes_since(&self.prefix, from_revision)?;
        if from_revision <= history.compacted_revision {
            tracing::warn!(
                prefix = %self.prefix,
                from_revision,
                compacted_revision = history.compacted_revision,
                "watch fell behind the kept history"
            );
            self.failure = Some(WatchFailure::Lagged);
            return Ok(());
        }
        self.pending.extend(history.events);
        self.delivered_through = self.delivered_through.max(history.revision);
        Ok(())
    }

    fn error(&self, failure: WatchFailure) -> StoreError {
        match failure {
            WatchFailure::Lagged => StoreError::WatchLagged {
                prefix: self.prefix.clone(),
            },
            WatchFailure::Reset => StoreError::WatchReset {
                prefix: self.prefix.clone(),
            },
            WatchFailure::ShuttingDown => StoreError::ShuttingDown,
        }
    }
}
