//! Which hosts vote: a pure planner from the hosts' state to the next single membership change,
//! and a thin executor that applies one change to the store.
//!
//! Rules, in order (the first that applies wins; at most one change per call):
//! 1. A membership change is already under way (joint consensus): do nothing, unless the
//!    caller saw it stalled (joint for longer than a change takes: openraft's second step,
//!    joint to uniform, was refused or never ran because its caller timed out or died); then
//!    finish it, towards the voters it was going to.
//! 2. A voter has not heartbeated for longer than the grace period and a healthy learner
//!    exists: replace that voter by the learner (one voter at a time). The leader is never
//!    "lost": it is the one planning.
//! 3. Fewer voters than the target for the number of healthy hosts: promote healthy learners up
//!    to the target. The target is 1 with one or two hosts, 3 with three or four, 5 with five
//!    or more: always odd (an even count tolerates no more failures than the odd count below it
//!    and needs a larger quorum).
//! 4. More voters than the target for the number of hosts (hosts were removed): demote the
//!    surplus, lost voters first, never the leader.
//!
//! A lost voter with no learner to replace it stays a voter: it may come back, and demoting it
//! would not make the quorum any safer. Every change is one `change_membership` call, which
//! openraft runs as joint consensus.

use std::collections::BTreeSet;
use std::time::Duration;

use novacron_store::Store;

use crate::error::Result;

/// A host's role in raft.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberRole {
    /// Votes.
    Voter,
    /// Receives the log without voting.
    Learner,
}

/// One host as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    /// Raft node id.
    pub node_id: u64,
    /// Current role.
    pub role: MemberRole,
    /// Whether the host reports itself healthy (agent running, store caught up).
    pub healthy: bool,
    /// Its last heartbeat, if any was seen.
    pub last_heartbeat_unix_ms: Option<u64>,
}

/// The cluster as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipView {
    /// Every member (voters and learners).
    pub hosts: Vec<HostView>,
    /// Whether a membership change is half-way.
    pub joint: bool,
    /// Set when the caller has seen the same joint configuration for longer than a change
    /// takes: the voters of its newer half, which the planner then makes the only ones.
    pub stalled_joint_target: Option<BTreeSet<u64>>,
    /// The leader (the planner runs on it).
    pub leader_id: Option<u64>,
    /// Now.
    pub now_unix_ms: u64,
}

/// The planner's knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MembershipPolicy {
    /// How long a voter may be silent before it is replaced.
    pub voter_loss_grace: Duration,
    /// How recent a heartbeat must be for a host to count as healthy.
    pub heartbeat_fresh_within: Duration,
    /// Most voters (5: survives two failures; more only slows every write).
    pub max_voters: usize,
}

impl Default for MembershipPolicy {
    fn default() -> Self {
        Self {
            voter_loss_grace: Duration::from_secs(60),
            heartbeat_fresh_within: Duration::from_secs(15),
            max_voters: 5,
        }
    }
}

/// Why a change is proposed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeReason {
    /// More healthy hosts than voters warrant: grow the voter set.
    Grow {
        /// Learners promoted.
        promoted: BTreeSet<u64>,
    },
    /// A voter was silent past the grace period.
    ReplaceLostVoter {
        /// The silent voter (stays a learner).
        lost: u64,
        /// The learner taking its place.
        promoted: u64,
    },
    /// Fewer hosts than voters warrant: shrink the voter set.
    Shrink {
        /// Voters demoted to learners.
        demoted: BTreeSet<u64>,
    },
    /// A joint configuration stalled half-way: finish it.
    FinishStalledChange,
}

/// One membership change: the next set of voters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipChange {
    /// The voters after the change.
    pub voters: BTreeSet<u64>,
    /// Why.
    pub reason: ChangeReason,
}

/// The number of voters for `hosts` hosts: 1, 3 or 5 (odd, at most `max_voters`).
pub fn target_voter_count(hosts: usize, max_voters: usize) -> usize {
    let cap = if max_voters.is_multiple_of(2) {
        max_voters.saturating_sub(1)
    } else {
        max_voters
    }
    .max(1);
    let odd = if hosts.is_multiple_of(2) {
        hosts.saturating_sub(1)
    } else {
        hosts
    };
    odd.clamp(1, cap)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The next membership change, or `None` when the voters are as they should be.
pub fn next_membership_change(
    policy: &MembershipPolicy,
    view: &MembershipView,
) -> Option<MembershipChange> {
    if view.joint {
        return view
            .stalled_joint_target
            .clone()
            .filter(|target| !target.is_empty())
            .map(|voters| MembershipChange {
                voters,
                reason: ChangeReason::FinishStalledChange,
            });
    }
    let silent_for = |host: &HostView| {
        host.last_heartbeat_unix_ms
            .map_or(u64::MAX, |last| view.now_unix_ms.saturating_sub(last))
    };
    let is_leader = |host: &HostView| Some(host.node_id) == view.leader_id;
    let available = |host: &HostView| {
        is_leader(host)
            || (host.healthy && silent_for(host) <= millis(policy.heartbeat_fresh_within))
    };
    let lost =
        |host: &HostView| !is_leader(host) && silent_for(host) > millis(policy.voter_loss_grace);

    let voters: BTreeSet<u64> = view
        .hosts
        .iter()
        .filter(|host| host.role == MemberRole::Voter)
        .map(|host| host.node_id)
        .collect();
    // Healthy learners, oldest (lowest id) first. A learner silent past the grace is not one,
    // even while its heartbeat still counts as fresh: it may be the voter just replaced for
    // that silence, which would otherwise be promoted straight back.
    let mut candidates: Vec<u64> = view
        .hosts
        .iter()
        .filter(|host| host.role == MemberRole::Learner && available(host) && !lost(host))
        .map(|host| host.node_id)
        .collect();
    candidates.sort_unstable();

    // 2. Replace one lost voter.
    let mut lost_voters: Vec<&HostView> = view
        .hosts
        .iter()
        .filter(|host| host.role == MemberRole::Voter && lost(host))
        .collect();
    lost_voters.sort_by_key(|host| std::cmp::Reverse(silent_for(host)));
    if let (Some(lost_voter), Some(&promoted)) = (lost_voters.first(), candidates.first()) {
        let mut next = voters.clone();
        next.remove(&lost_voter.node_id);
        next.insert(promoted);
        return Some(MembershipChange {
            voters: next,
            reason: ChangeReason::ReplaceLostVoter {
                lost: lost_voter.node_id,
                promoted,
            },
        });
    }

    // 3. Grow to the target for the healthy hosts.
    let healthy_hosts = view.hosts.iter().filter(|host| available(host)).count();
    let grow_target = target_voter_count(healthy_hosts, policy.max_voters);
    if voters.len() < grow_target {
        let wanted = grow_target - voters.len();
        // Growing by one to an even count is worse than staying: wait for enough learners.
        let promoted: BTreeSet<u64> = candidates.iter().copied().take(wanted).collect();
        let next_count = voters.len() + promoted.len();
        if !promoted.is_empty() && next_count % 2 == 1 {
            let mut next = voters.clone();
            next.extend(promoted.iter().copied());
            return Some(MembershipChange {
                voters: next,
                reason: ChangeReason::Grow { promoted },
            });
        }
    }

    // 4. Shrink to the target for all hosts.
    let shrink_target = target_voter_count(view.hosts.len(), policy.max_voters);
    if voters.len() > shrink_target {
        let surplus = voters.len() - shrink_target;
        let mut order: Vec<&HostView> = view
            .hosts
            .iter()
            .filter(|host| host.role == MemberRole::Voter && !is_leader(host))
            .collect();
        // Lost first, then unhealthy, then the most recently added.
        order.sort_by_key(|host| {
            (
                !lost(host),
                available(host),
                std::cmp::Reverse(host.node_id),
            )
        });
        let demoted: BTreeSet<u64> = order
            .iter()
            .take(surplus)
            .map(|host| host.node_id)
            .collect();
        if !demoted.is_empty() {
            let next: BTreeSet<u64> = voters.difference(&demoted).copied().collect();
            return Some(MembershipChange {
                voters: next,
                reason: ChangeReason::Shrink { demoted },
            });
        }
    }
    None
}

/// Applies one change on the leader (joint consensus; removed voters stay learners).
pub async fn apply_membership_change(store: &Store, change: &MembershipChange) -> Result<()> {
    tracing::info!(
        voters = ?change.voters,
        reason = ?change.reason,
        "changing raft voters"
    );
    store.change_membership(change.voters.clone()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;

    fn host(node_id: u64, role: MemberRole, silent_ms: Option<u64>) -> HostView {
        HostView {
            node_id,
            role,
            healthy: true,
            last_heartbeat_unix_ms: silent_ms.map(|silent| NOW - silent),
        }
    }

    fn view(hosts: Vec<HostView>) -> MembershipView {
        MembershipView {
            hosts,
            joint: false,
            stalled_joint_target: None,
            leader_id: Some(1),
            now_unix_ms: NOW,
        }
    }

    fn voters(ids: &[u64]) -> BTreeSet<u64> {
        ids.iter().copied().collect()
    }

    use MemberRole::{Learner, Voter};

    #[test]
    fn voter_counts_are_one_three_or_five() {
        let counts: Vec<usize> = (0..9).map(|hosts| target_voter_count(hosts, 5)).collect();
        assert_eq!(counts, vec![1, 1, 1, 3, 3, 5, 5, 5, 5]);
        assert_eq!(target_voter_count(9, 4), 3);
        assert_eq!(target_voter_count(9, 0), 1);
    }

    #[test]
    fn a_growing_region_goes_from_one_to_three_to_five_voters() {
        let policy = MembershipPolicy::default();
        // Two hosts: one voter is right.
        let two = view(vec![host(1, Voter, Some(0)), host(2, Learner, Some(0))]);
        assert_eq!(next_membership_change(&policy, &two), None);
        // Three: promote both learners in one change.
        let three = view(vec![
            host(1, Voter, Some(0)),
            host(2, Learner, Some(0)),
            host(3, Learner, Some(0)),
        ]);
        let change = next_membership_change(&policy, &three).expect("grow");
        assert_eq!(change.voters, voters(&[1, 2, 3]));
        // Four hosts with three voters: nothing.
        let four = view(vec![
            host(1, Voter, Some(0)),
            host(2, Voter, Some(0)),
            host(3, Voter, Some(0)),
            host(4, Learner, Some(0)),
        ]);
        assert_eq!(next_membership_change(&policy, &four), None);
        // Six hosts: five voters, the oldest learners first.
        let mut six = four.clone();
        six.hosts.push(host(6, Learner, Some(0)));
        six.hosts.push(host(5, Learner, Some(0)));
        let change = next_membership_change(&policy, &six).expect("grow");
        assert_eq!(change.voters, voters(&[1, 2, 3, 4, 5]));
        // Twenty hosts with five voters: nothing more.
        let mut twenty = view((1..=5).map(|id| host(id, Voter, Some(0))).collect());
        twenty
            .hosts
            .extend((6..=20).map(|id| host(id, Learner, Some(0))));
        assert_eq!(next_membership_change(&policy, &twenty), None);
    }

    #[test]
    fn unhealthy_or_silent_learners_are_not_promoted() {
        let policy = MembershipPolicy::default();
        let mut unhealthy = host(3, Learner, Some(0));
        unhealthy.healthy = false;
        let stale = host(2, Learner, Some(20_000));
        let region = view(vec![host(1, Voter, Some(0)), stale, unhealthy]);
        assert_eq!(next_membership_change(&policy, &region), None);
    }

    #[test]
    fn a_grace_shorter_than_heartbeat_freshness_never_promotes_a_silent_learner() {
        // `serve --voter-loss-grace 3`: a voter silent 5 s is lost, while its heartbeat still
        // counts as fresh (10 s). Host 3 is the voter replaced a moment ago for the same silence.
        let policy = MembershipPolicy {
            voter_loss_grace: Duration::from_secs(3),
            heartbeat_fresh_within: Duration::from_secs(10),
            ..MembershipPolicy::default()
        };
        let region = view(vec![
            host(1, Voter, Some(0)),
            host(2, Voter, Some(5_000)),
            host(3, Learner, Some(5_000)),
            host(4, Voter, Some(0)),
            host(5, Learner, Some(0)),
        ]);
        let change = next_membership_change(&policy, &region).expect("replace");
        assert_eq!(
            change.reason,
            ChangeReason::ReplaceLostVoter {
                lost: 2,
                promoted: 5
            }
        );
        let only_the_silent_one = view(vec![
            host(1, Voter, Some(0)),
            host(2, Voter, Some(5_000)),
            host(3, Learner, Some(5_000)),
            host(4, Voter, Some(0)),
        ]);
        assert_eq!(next_membership_change(&policy, &only_the_silent_one), None);
    }

    #[test]
    fn a_voter_lost_past_the_grace_period_is_replaced_by_a_healthy_learner() {
        let policy = MembershipPolicy::default();
        let within_grace = view(vec![
            host(1, Voter, Some(0)),
            host(2, Voter, Some(59_000)),
            host(3, Voter, Some(0)),
            host(4, Learner, Some(0)),
        ]);
        assert_eq!(next_membership_change(&policy, &within_grace), None);
        let past_grace = view(vec![
            host(1, Voter, Some(0)),
            host(2, Voter, Some(61_000)),
            host(3, Voter, None),
            host(4, Learner, Some(0)),
            host(5, Learner, Some(0)),
        ]);
        // Two voters lost: only one replaced per change, the longest silent first.
        let change = next_membership_change(&policy, &past_grace).expect("replace");
        assert_eq!(change.voters, voters(&[1, 2, 4]));
        assert_eq!(
            change.reason,
            ChangeReason::ReplaceLostVoter {
                lost: 3,
                promoted: 4
            }
        );
    }

    #[test]
    fn a_lost_voter_without_a_replacement_stays_and_a_joint_change_blocks_everything() {
        let policy = MembershipPolicy::default();
        let region = view(vec![
            host(1, Voter, Some(0)),
            host(2, Voter, Some(0)),
            host(3, Voter, None),
        ]);
        assert_eq!(next_membership_change(&policy, &region), None);
        let mut joint = view(vec![
            host(1, Voter, Some(0)),
            host(2, Learner, Some(0)),
            host(3, Learner, Some(0)),
        ]);
        joint.joint = true;
        assert_eq!(next_membership_change(&policy, &joint), None);
    }

    #[test]
    fn a_stalled_joint_change_is_finished_towards_its_newer_half() {
        let policy = MembershipPolicy::default();
        // Joint {1} + {1, 2, 3}: the union shows as voters.
        let mut joint = view(vec![
            host(1, Voter, Some(0)),
            host(2, Voter, Some(0)),
            host(3, Voter, Some(0)),
            host(4, Learner, Some(0)),
            host(5, Learner, Some(0)),
        ]);
        joint.joint = true;
        // Not yet seen stalled: wait, even though two learners could be promoted.
        assert_eq!(next_membership_change(&policy, &joint), None);
        joint.stalled_joint_target = Some(voters(&[1, 2, 3]));
        assert_eq!(
            next_membership_change(&policy, &joint),
            Some(MembershipChange {
                voters: voters(&[1, 2, 3]),
                reason: ChangeReason::FinishStalledChange,
            })
        );
        // Once uniform, the policy goes on from there (grow to five).
        joint.joint = false;
        joint.stalled_joint_target = None;
        assert!(matches!(
            next_membership_change(&policy, &joint),
            Some(MembershipChange {
                reason: ChangeReason::Grow { .. },
                ..
            })
        ));
    }

    #[test]
    fn removed_hosts_shrink_the_voters_but_never_demote_the_leader() {
        let policy = MembershipPolicy::default();
        // Five voters left after two hosts were removed from a region of six... now four hosts.
        let region = MembershipView {
            leader_id: Some(4),
            ..view(vec![
                host(1, Voter, Some(0)),
                host(2, Voter, Some(0)),
                host(3, Voter, Some(0)),
                host(4, Voter, Some(0)),
            ])
        };
        let change = next_membership_change(&policy, &region).expect("shrink");
        assert_eq!(change.voters.len(), 3);
        assert!(change.voters.contains(&4), "the leader keeps its vote");
        assert_eq!(
            change.reason,
            ChangeReason::Shrink {
                demoted: voters(&[3])
            }
        );
    }

    #[test]
    fn the_planner_converges_in_single_steps() {
        // Apply the planner's changes to a model until it proposes nothing; every step changes
        // the voters and the result has the target size.
        let policy = MembershipPolicy::default();
        for count in 1..=12u64 {
            let mut hosts: Vec<HostView> = (1..=count)
                .map(|id| host(id, if id == 1 { Voter } else { Learner }, Some(0)))
                .collect();
            let mut steps = 0;
            while let Some(change) = next_membership_change(&policy, &view(hosts.clone())) {
                steps += 1;
                assert!(steps < 5, "no convergence for {count} hosts");
                for host in &mut hosts {
                    host.role = if change.voters.contains(&host.node_id) {
                        Voter
                    } else {
                        Learner
                    };
                }
            }
            let voter_count = hosts.iter().filter(|host| host.role == Voter).count();
            assert_eq!(
                voter_count,
                target_voter_count(count as usize, 5),
                "{count} hosts"
            );
        }
    }
}
