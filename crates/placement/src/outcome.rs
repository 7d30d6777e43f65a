//! What placement answers: a [`Decision`] with its score breakdown and a sentence saying why the
//! host won, or a [`Refusal`] naming, for every host, the filter that excluded it and why. Also
//! the scoring arithmetic, shared by the indexed and the naive implementations so both rank
//! hosts bit for bit the same.

use std::fmt;

use crate::model::{AntiAffinityMode, HostState, Policy, Request, Strategy};

/// The filters, in the order they are applied: a host is reported under the first one it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Filter {
    /// The request is pinned to another host.
    Pinned,
    /// The host is not ready.
    State,
    /// The host lacks a required label.
    Labels,
    /// The host neither holds the image nor can fetch it.
    Image,
    /// The host already runs a VM of the request's anti-affinity group (hard mode).
    AntiAffinity,
    /// Not enough vCPUs left, overcommit included.
    Cpu,
    /// Not enough memory left, overcommit included.
    Memory,
}

impl Filter {
    /// Every filter, in application order.
    pub const ALL: [Filter; 7] = [
        Filter::Pinned,
        Filter::State,
        Filter::Labels,
        Filter::Image,
        Filter::AntiAffinity,
        Filter::Cpu,
        Filter::Memory,
    ];

    /// Short name for summaries and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Filter::Pinned => "pinned elsewhere",
            Filter::State => "state",
            Filter::Labels => "labels",
            Filter::Image => "image",
            Filter::AntiAffinity => "anti-affinity",
            Filter::Cpu => "cpu",
            Filter::Memory => "memory",
        }
    }
}

/// A required label a host does not carry with the wanted value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMismatch {
    /// Label key.
    pub key: String,
    /// Value the request needs.
    pub wanted: String,
    /// Value the host has (None: no such label).
    pub actual: Option<String>,
}

/// Why one host was excluded.
#[derive(Debug, Clone, PartialEq)]
pub enum Exclusion {
    /// The request is pinned to another host.
    NotPinned {
        /// The pinned host's id.
        pinned_host: u64,
    },
    /// The host is not ready.
    State {
        /// Its state.
        state: HostState,
    },
    /// Required labels it lacks.
    Labels {
        /// Every required label that does not match.
        missing: Vec<LabelMismatch>,
    },
    /// The image is neither on the host nor fetchable from a peer.
    Image {
        /// The image id.
        image: String,
    },
    /// VMs of the group already on the host (hard anti-affinity).
    AntiAffinity {
        /// The group.
        group: String,
        /// How many of its VMs the host runs.
        vms: u32,
    },
    /// Not enough vCPUs.
    Cpu {
        /// vCPUs the VM needs.
        needed: u32,
        /// vCPUs still allocatable on the host, overcommit included.
        free: f64,
        /// The cpu overcommit ratio applied.
        overcommit: f64,
    },
    /// Not enough memory.
    Memory {
        /// MiB the VM needs.
        needed_mib: u64,
        /// MiB still allocatable, overcommit included.
        free_mib: f64,
        /// The memory overcommit ratio applied.
        overcommit: f64,
    },
}

impl Exclusion {
    /// The filter that produced this exclusion.
    pub fn filter(&self) -> Filter {
        match self {
            Exclusion::NotPinned { .. } => Filter::Pinned,
            Exclusion::State { .. } => Filter::State,
            Exclusion::Labels { .. } => Filter::Labels,
            Exclusion::Image { .. } => Filter::Image,
            Exclusion::AntiAffinity { .. } => Filter::AntiAffinity,
            Exclusion::Cpu { .. } => Filter::Cpu,
            Exclusion::Memory { .. } => Filter::Memory,
        }
    }
}

impl fmt::Display for Exclusion {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exclusion::NotPinned { pinned_host } => {
                write!(formatter, "the request is pinned to host id {pinned_host}")
            }
            Exclusion::State { state } => write!(formatter, "host is {state}, not ready"),
            Exclusion::Labels { missing } => {
                formatter.write_str("lacks ")?;
                for (index, mismatch) in missing.iter().enumerate() {
                    if index > 0 {
                        formatter.write_str(", ")?;
                    }
                    write!(formatter, "label {}={}", mismatch.key, mismatch.wanted)?;
                    match &mismatch.actual {
                        Some(actual) => write!(formatter, " (has {}={actual})", mismatch.key)?,
                        None => write!(formatter, " (no {} label)", mismatch.key)?,
                    }
                }
                Ok(())
            }
            Exclusion::Image { image } => write!(
                formatter,
                "does not hold image {image} and no peer can serve it"
            ),
            Exclusion::AntiAffinity { group, vms } => write!(
                formatter,
                "already runs {vms} VM{} of anti-affinity group {group}",
                if *vms == 1 { "" } else { "s" }
            ),
            Exclusion::Cpu {
                needed,
                free,
                overcommit,
            } => write!(
                formatter,
                "needs {needed} vCPU{}, {} free with overcommit {overcommit:.1}",
                if *needed == 1 { "" } else { "s" },
                free.max(0.0).floor()
            ),
            Exclusion::Memory {
                needed_mib,
                free_mib,
                overcommit,
            } => write!(
                formatter,
                "needs {needed_mib} MiB, {} MiB free with overcommit {overcommit:.1}",
                free_mib.max(0.0).floor()
            ),
        }
    }
}

/// One excluded host and why.
#[derive(Debug, Clone, PartialEq)]
pub struct HostExclusion {
    /// The host's id.
    pub host_id: u64,
    /// The host's name.
    pub host_name: String,
    /// Why it was excluded (the first filter it failed).
    pub exclusion: Exclusion,
}

/// How many hosts each filter excluded (each host counted once, under the first filter it failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FilterCounts {
    counts: [usize; 7],
}

impl FilterCounts {
    /// Hosts excluded by `filter`.
    pub fn get(&self, filter: Filter) -> usize {
        self.counts[filter as usize]
    }

    pub(crate) fn add(&mut self, filter: Filter, hosts: usize) {
        self.counts[filter as usize] += hosts;
    }

    /// Hosts excluded by any filter.
    pub fn total(&self) -> usize {
        self.counts.iter().sum()
    }

    /// Filters that excluded at least one host, with their counts, in filter order.
    pub fn nonzero(&self) -> impl Iterator<Item = (Filter, usize)> + '_ {
        Filter::ALL
            .into_iter()
            .map(|filter| (filter, self.get(filter)))
            .filter(|(_, count)| *count > 0)
    }
}

impl fmt::Display for FilterCounts {
    /// `"3 by state, 12 by memory"`, or `"none"`.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut any = false;
        for (filter, count) in self.nonzero() {
            if any {
                formatter.write_str(", ")?;
            }
            write!(formatter, "{count} by {}", filter.name())?;
            any = true;
        }
        if !any {
            formatter.write_str("none")?;
        }
        Ok(())
    }
}

/// The parts of the winning host's score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreBreakdown {
    /// The resource strategy used.
    pub strategy: Strategy,
    /// Resource score, 0 to 1: for spread the free share, for bin-pack the used share (mean of
    /// cpu and memory after placement, of overcommitted capacity).
    pub resources: f64,
    /// Share of allocatable vCPUs in use after placement.
    pub cpu_fraction_after: f64,
    /// Share of allocatable memory in use after placement.
    pub memory_fraction_after: f64,
    /// Whether the host already holds the image.
    pub holds_image: bool,
    /// Image locality bonus (0 when it must fetch the image).
    pub image_locality: f64,
    /// VMs of the request's anti-affinity group already on the host.
    pub group_vms_on_host: u32,
    /// Soft anti-affinity penalty (0 or negative).
    pub anti_affinity: f64,
}

impl ScoreBreakdown {
    /// The total score.
    pub fn total(&self) -> f64 {
        self.resources + self.image_locality + self.anti_affinity
    }
}

/// The second-best host, to show how close the choice was.
#[derive(Debug, Clone, PartialEq)]
pub struct RunnerUp {
    /// Its id.
    pub host_id: u64,
    /// Its name.
    pub host_name: String,
    /// Its total score.
    pub score: f64,
}

/// A host was chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The chosen host's id.
    pub host_id: u64,
    /// The chosen host's name.
    pub host_name: String,
    /// Its total score.
    pub score: f64,
    /// How the score was made up.
    pub breakdown: ScoreBreakdown,
    /// The next best host, if any other passed every filter.
    pub runner_up: Option<RunnerUp>,
    /// Hosts that passed every filter.
    pub candidates: usize,
    /// Hosts in the snapshot.
    pub hosts: usize,
    /// Hosts excluded, per filter.
    pub excluded: FilterCounts,
    /// Why the host won, in one sentence for `vm show`.
    pub explanation: String,
}

/// No host passed every filter.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// Every host of the snapshot with the first filter it failed, ordered by host id.
    pub exclusions: Vec<HostExclusion>,
    /// The same, counted per filter.
    pub counts: FilterCounts,
}

impl Refusal {
    /// One line for a CLI: `"no host can take the VM: 4 hosts; 1 by state, 3 by memory"`.
    pub fn summary(&self) -> String {
        if self.exclusions.is_empty() {
            return "no host can take the VM: the cluster has no hosts".to_string();
        }
        format!(
            "no host can take the VM: {} host{} excluded; {}",
            self.exclusions.len(),
            if self.exclusions.len() == 1 { "" } else { "s" },
            self.counts
        )
    }
}

/// The answer of placement.
#[derive(Debug, Clone, PartialEq)]
pub enum Placement {
    /// A host was chosen.
    Decision(Decision),
    /// No host fits.
    Refusal(Refusal),
}

impl Placement {
    /// The decision, if any.
    pub fn decision(&self) -> Option<&Decision> {
        match self {
            Placement::Decision(decision) => Some(decision),
            Placement::Refusal(_) => None,
        }
    }

    /// The refusal, if any.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            Placement::Decision(_) => None,
            Placement::Refusal(refusal) => Some(refusal),
        }
    }
}

/// Whether the request fits a host's free resources and, if so, the shares in use after.
pub(crate) enum Fit {
    Fits {
        cpu_fraction_after: f64,
        memory_fraction_after: f64,
    },
    Cpu {
        free: f64,
    },
    Memory {
        free_mib: f64,
    },
}

#[inline]
pub(crate) fn fit(
    cpu_capacity: u32,
    memory_capacity_mib: u64,
    cpu_allocated: u64,
    memory_allocated_mib: u64,
    request: &Request,
    policy: &Policy,
) -> Fit {
    let cpu_allocatable = f64::from(cpu_capacity) * policy.cpu_overcommit;
    let cpu_after = (cpu_allocated + u64::from(request.cpus)) as f64;
    if cpu_after > cpu_allocatable {
        return Fit::Cpu {
            free: cpu_allocatable - cpu_allocated as f64,
        };
    }
    let memory_allocatable = memory_capacity_mib as f64 * policy.memory_overcommit;
    let memory_after = memory_allocated_mib.saturating_add(request.memory_mib) as f64;
    if memory_after > memory_allocatable {
        return Fit::Memory {
            free_mib: memory_allocatable - memory_allocated_mib as f64,
        };
    }
    // Both allocatable amounts are positive here: the request is at least 1 of each.
    Fit::Fits {
        cpu_fraction_after: cpu_after / cpu_allocatable,
        memory_fraction_after: memory_after / memory_allocatable,
    }
}

#[inline]
pub(crate) fn score(
    cpu_fraction_after: f64,
    memory_fraction_after: f64,
    holds_image: bool,
    group_vms_on_host: u32,
    policy: &Policy,
) -> ScoreBreakdown {
    let used = (cpu_fraction_after + memory_fraction_after) / 2.0;
    let resources = match policy.strategy {
        Strategy::Spread => 1.0 - used,
        Strategy::BinPack => used,
    };
    let image_locality = if holds_image {
        policy.image_locality_weight
    } else {
        0.0
    };
    let anti_affinity = match policy.anti_affinity {
        AntiAffinityMode::Soft => -policy.anti_affinity_weight * f64::from(group_vms_on_host),
        AntiAffinityMode::Hard => 0.0,
    };
    ScoreBreakdown {
        strategy: policy.strategy,
        resources,
        cpu_fraction_after,
        memory_fraction_after,
        holds_image,
        image_locality,
        group_vms_on_host,
        anti_affinity,
    }
}

/// Whether a candidate with `score` and `host_id` beats the current best: higher score, then
/// lower host id.
#[inline]
pub(crate) fn beats(score: f64, host_id: u64, best: Option<(f64, u64)>) -> bool {
    match best {
        None => true,
        Some((best_score, best_id)) => {
            score > best_score || (score == best_score && host_id < best_id)
        }
    }
}

/// What the filters did: hosts that passed every one, hosts looked at, and the exclusions.
pub(crate) struct Tally {
    pub(crate) candidates: usize,
    pub(crate) hosts: usize,
    pub(crate) excluded: FilterCounts,
}

/// Assembles a decision and its sentence.
pub(crate) fn decision(
    host_id: u64,
    host_name: &str,
    breakdown: ScoreBreakdown,
    runner_up: Option<RunnerUp>,
    tally: Tally,
    request: &Request,
) -> Decision {
    use fmt::Write;
    let Tally {
        candidates,
        hosts,
        excluded,
    } = tally;
    let score = breakdown.total();
    let mut explanation = format!(
        "{host_name} (id {host_id}) won with score {score:.3}: {} {:.3} (cpu {:.0}%, memory \
         {:.0}% of allocatable after placement)",
        breakdown.strategy,
        breakdown.resources,
        breakdown.cpu_fraction_after * 100.0,
        breakdown.memory_fraction_after * 100.0
    );
    if let Some(image) = &request.image {
        if breakdown.holds_image {
            let _ = write!(
                explanation,
                ", image locality +{:.3} (holds {image})",
                breakdown.image_locality
            );
        } else {
            let _ = write!(explanation, ", image {image} will be fetched from a peer");
        }
    }
    if let Some(group) = &request.anti_affinity_group
        && breakdown.group_vms_on_host > 0
    {
        let _ = write!(
            explanation,
            ", anti-affinity {:.3} ({} VM(s) of group {group} already there)",
            breakdown.anti_affinity, breakdown.group_vms_on_host
        );
    }
    match &runner_up {
        Some(runner_up) => {
            let _ = write!(
                explanation,
                "; runner-up {} (id {}) scored {:.3}",
                runner_up.host_name, runner_up.host_id, runner_up.score
            );
            if runner_up.score == score {
                explanation.push_str(" (tie broken by lower host id)");
            }
        }
        None => explanation.push_str("; no other host qualified"),
    }
    let _ = write!(
        explanation,
        "; {candidates} of {hosts} hosts passed every filter, excluded: {excluded}"
    );
    Decision {
        host_id,
        host_name: host_name.to_string(),
        score,
        breakdown,
        runner_up,
        candidates,
        hosts,
        excluded,
        explanation,
    }
}
