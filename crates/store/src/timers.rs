//! The raft timers, driven here instead of by openraft, so that a new [`RaftTiming`] applies at
//! once, without restarting raft (openraft 0.9 fixes its own timing for the life of a `Raft`).
//!
//! - **Heartbeats:** while this node leads, it asks openraft for a heartbeat every
//!   `heartbeat_interval` (`Trigger::heartbeat`).
//! - **Elections:** a voter that is not the leader campaigns (`Trigger::elect`) once it has not
//!   heard from a leader for a randomized election timeout, drawn anew for every wait from
//!   `election_timeout_min..election_timeout_max`. Hearing from a leader means an append-entries
//!   or snapshot message it accepted, or a vote it granted ([`LeaderContact::touch`], called by
//!   [`crate::Store::handle_raft_message`], and here as soon as raft's metrics show the vote
//!   given, which can be before that handler runs again). A sole voter campaigns at once.
//! - **Backing off:** a candidate refused by a voter whose log is newer than its own waits one
//!   more `election_timeout_max` before it campaigns again ([`LeaderContact::saw_greater_log`]),
//!   as openraft's own timer does: it cannot win, and its campaigns, always a little earlier
//!   than the up-to-date voter's, would otherwise keep taking the term from under it (seen:
//!   two survivors of three without a leader for over ten seconds).
//!
//! openraft's own configuration keeps two fixed values, from the timing at start
//! ([`rpc_deadline`]): the deadline of every append-entries exchange (openraft uses its
//! `heartbeat_interval` for it; at least [`MIN_RPC_DEADLINE`], so an append over a slow link is
//! never cancelled and resent forever while the live timing catches up), and the leader lease
//! (a voter refuses to vote for that long after it last heard from a leader; just above the
//! deadline, as openraft requires). An election timeout shorter than the lease waits for the
//! lease.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use openraft::{Raft, ServerState};
use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::raft_types::TypeConfig;
use crate::store::RaftTiming;

/// Shortest deadline of an append-entries exchange.
pub const MIN_RPC_DEADLINE: Duration = Duration::from_millis(500);

/// The append-entries deadline for a region started with `timing`: the heartbeat interval (the
/// ACP rule makes it twice the p99 round trip) or [`MIN_RPC_DEADLINE`], whichever is longer.
pub fn rpc_deadline(timing: &RaftTiming) -> Duration {
    timing.heartbeat_interval.max(MIN_RPC_DEADLINE)
}

/// How long the leader lease of openraft's configuration is for `deadline` (see the module
/// docs: openraft wants its election timeout above its heartbeat interval).
pub(crate) fn leader_lease(deadline: Duration) -> Duration {
    deadline + Duration::from_millis(2)
}

/// When this node last heard from a leader (or granted a vote).
#[derive(Debug)]
pub(crate) struct LeaderContact {
    origin: Instant,
    /// Milliseconds since `origin` (in the future while backing off).
    last_ms: AtomicU64,
    greater_log_seen: AtomicBool,
}

impl LeaderContact {
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            greater_log_seen: AtomicBool::new(false),
        }
    }

    pub fn touch(&self) {
        let now = self.origin.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(now, Ordering::Relaxed);
    }

    /// A voter refused this node's campaign because its log is newer: the timers push the next
    /// campaign back by one `election_timeout_max`.
    pub fn saw_greater_log(&self) {
        self.greater_log_seen.store(true, Ordering::Relaxed);
    }

    /// Counts as contact until `extra` from now.
    fn back_off(&self, extra: Duration) {
        let until = self.origin.elapsed() + extra;
        self.last_ms
            .fetch_max(until.as_millis() as u64, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A random election timeout from `timing`'s range, shifted up as a whole when it starts
/// within the leader lease (so that candidates still spread out).
fn election_timeout(timing: &RaftTiming, lease: Duration) -> Duration {
    let min = timing.election_timeout_min;
    let width = timing
        .election_timeout_max
        .saturating_sub(min)
        .max(Duration::from_millis(1));
    let start = min.max(lease + Duration::from_millis(5));
    start + width.mul_f64(rand::rng().random_range(0.0..1.0))
}

/// Runs the timers until `stopped` turns true or raft shuts down.
pub(crate) async fn run_raft_timers(
    raft: Raft<TypeConfig>,
    node_id: u64,
    mut timing: watch::Receiver<RaftTiming>,
    contact: Arc<LeaderContact>,
    lease: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let mut server = raft.server_metrics();
    let mut applied = *timing.borrow();
    let mut timeout = election_timeout(&applied, lease);
    let mut last_vote = server.borrow().vote;
    loop {
        let current = *timing.borrow_and_update();
        if current != applied {
            // Whichever wake-up saw the new timing first (this read marks it seen, so the
            // `changed` branch below may never fire for it): the timeout is drawn from it now.
            applied = current;
            timeout = election_timeout(&applied, lease);
        }
        let (state, sole_voter, voter, vote) = {
            let metrics = server.borrow_and_update();
            let membership = metrics.membership_config.membership();
            let voters: Vec<u64> = membership.voter_ids().collect();
            (
                metrics.state,
                voters == [node_id],
                voters.contains(&node_id),
                metrics.vote,
            )
        };
        if vote != last_vote {
            // A vote given to another node counts as contact from the moment raft gave it.
            if vote.leader_id().voted_for().is_some_and(|id| id != node_id) {
                contact.touch();
            }
            last_vote = vote;
        }
        if contact.greater_log_seen.swap(false, Ordering::Relaxed) {
            contact.back_off(current.election_timeout_max);
        }
        let pause = match state {
            ServerState::Shutdown => return,
            ServerState::Leader => {
                contact.touch();
                if raft.trigger().heartbeat().await.is_err() {
                    return;
                }
                current.heartbeat_interval
            }
            ServerState::Learner | ServerState::Follower | ServerState::Candidate => {
                if !voter {
                    contact.touch();
                } else if sole_voter || contact.last() + timeout <= Instant::now() {
                    tracing::info!(
                        node_id,
                        election_timeout_ms = timeout.as_millis() as u64,
                        "no leader heard from within the election timeout: campaigning"
                    );
                    contact.touch();
                    timeout = election_timeout(&current, lease);
                    if raft.trigger().elect().await.is_err() {
                        return;
                    }
                }
                // Check a few times per heartbeat; the timeout's randomness is far coarser.
                (current.heartbeat_interval / 4).max(Duration::from_millis(5))
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            changed = timing.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            changed = server.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            changed = stopped.changed() => {
                if changed.is_err() || *stopped.borrow() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_covers_slow_links_and_the_election_waits_for_the_lease() {
        let lan = RaftTiming::default();
        assert_eq!(rpc_deadline(&lan), MIN_RPC_DEADLINE);
        let slow = RaftTiming {
            heartbeat_interval: Duration::from_millis(800),
            election_timeout_min: Duration::from_secs(8),
            election_timeout_max: Duration::from_secs(12),
        };
        assert_eq!(rpc_deadline(&slow), Duration::from_millis(800));
        let lease = leader_lease(MIN_RPC_DEADLINE);
        let mut lan_timeouts = std::collections::BTreeSet::new();
        for _ in 0..100 {
            let timeout = election_timeout(&lan, lease);
            assert!(
                timeout > lease && timeout < lease + Duration::from_millis(200),
                "{timeout:?}"
            );
            lan_timeouts.insert(timeout);
            let timeout = election_timeout(&slow, lease);
            assert!(
                timeout >= slow.election_timeout_min && timeout < slow.election_timeout_max,
                "{timeout:?}"
            );
        }
        assert!(
            lan_timeouts.len() > 50,
            "timeouts shifted past the lease stay spread out"
        );
    }

    #[test]
    fn contact_only_moves_forward() {
        let contact = LeaderContact::new();
        let first = contact.last();
        contact.touch();
        assert!(contact.last() >= first);
    }

    #[test]
    fn backing_off_counts_as_contact_into_the_future_and_a_touch_never_undoes_it() {
        let contact = LeaderContact::new();
        contact.back_off(Duration::from_secs(60));
        let until = contact.last();
        assert!(until > Instant::now() + Duration::from_secs(59));
        contact.touch();
        assert_eq!(contact.last(), until);
    }
}
