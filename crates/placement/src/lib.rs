//! NovaCron's placement core (ITP): which host should run a new VM, and why.
//!
//! A pure function over a [`Snapshot`] of cluster state: no IO, no clock, no randomness. The
//! scheduler builds the snapshot from the store, keeps it current as VMs come and go, and asks
//! [`Snapshot::place`]. Placement first filters hosts, in this order (a host is reported under
//! the first filter it fails): pinned host, host state (only `ready` hosts), required labels,
//! image (held, or fetchable from a peer), hard anti-affinity, cpu and memory with the policy's
//! overcommit ratios. It then scores the survivors: spread (emptiest first) or bin-pack
//! (fullest first) on the mean of cpu and memory shares after placement, plus a bonus for
//! holding the image, minus a penalty per VM of the same group in soft anti-affinity mode.
//! Equal scores go to the lowest host id, so the answer is deterministic.
//!
//! The answer is a [`Decision`] (host, score, breakdown, runner-up, a sentence for `vm show`)
//! or a [`Refusal`] that names, for every host, the filter that excluded it and the numbers
//! behind it ("needs 2048 MiB, 1024 MiB free with overcommit 1.0"), with per-filter counts for
//! a one-line CLI summary.
//!
//! [`naive::NaiveCluster`] is the obvious implementation (recompute everything from the VM list
//! for every request): the benchmark's baseline and the property tests' oracle.

mod error;
mod host_set;
mod model;
pub mod naive;
mod outcome;
mod snapshot;

pub use error::PlacementError;
pub use model::{AntiAffinityMode, HostSpec, HostState, Policy, Request, Strategy, VmSpec};
pub use outcome::{
    Decision, Exclusion, Filter, FilterCounts, HostExclusion, LabelMismatch, Placement, Refusal,
    RunnerUp, ScoreBreakdown,
};
pub use snapshot::{HostLoad, Snapshot, VmId};
