//! Watches: a stream of the changes under a key prefix, starting at a chosen revision.
//!
//! A [`Watcher`] first replays the kept history (the `changes` table) from its start revision,
//! then follows the live notices the state machine broadcasts after each applied batch. It
//! subscribes to the live notices before reading the history and skips notices it already
//! replayed, so no change is missed or repeated. A watcher that falls behind the broadcast
//! buffer, or whose node installs a snapshot, fails with an error telling the caller to list
//! again: it never silently skips changes.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::{broadcast, watch};

use crate::error::{Result, StoreError};
use crate::kv::WatchEvent;
use crate::storage::StoreDatabase;

/// What the state machine broadcasts after it commits.
#[derive(Debug, Clone)]
pub(crate) enum ChangeNotice {
    /// The changes of one revision.
    Changes {
        revision: u64,
        events: Arc<Vec<WatchEvent>>,
    },
    /// The whole state was replaced by a snapshot at `revision`.
    Reset {
        #[allow(dead_code)]
        revision: u64,
    },
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
    pending: VecDeque<WatchEvent>,
    /// Every change up to this revision is already queued or delivered.
    delivered_through: u64,
    receiver: broadcast::Receiver<ChangeNotice>,
    shutdown: watch::Receiver<bool>,
    failure: Option<WatchFailure>,
}

impl Watcher {
    pub(crate) fn start(
        database: &StoreDatabase,
        prefix: String,
        from_revision: u64,
        notices: &broadcast::Sender<ChangeNotice>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self> {
        // Subscribe first: a change committed between the history read and the subscription
        // would otherwise be lost.
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
            tokio::select! {
                biased;
                received = self.receiver.recv() => match received {
                    Ok(ChangeNotice::Changes { revision, events }) => {
                        if revision > self.delivered_through {
                            self.delivered_through = revision;
                            let prefix = &self.prefix;
                            self.pending.extend(
                                events.iter().filter(|event| event.key().starts_with(prefix.as_str())).cloned(),
                            );
                        }
                    }
                    Ok(ChangeNotice::Reset { .. }) => self.failure = Some(WatchFailure::Reset),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(prefix = %self.prefix, missed, "watch fell behind");
                        self.failure = Some(WatchFailure::Lagged);
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        self.failure = Some(WatchFailure::ShuttingDown);
                    }
                },
                _ = self.shutdown.wait_for(|stopped| *stopped) => {
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
