//! The obvious placement, kept as the benchmark's baseline and the tests' oracle: for every
//! request it recomputes each host's allocation, anti-affinity groups and images from the full
//! VM list, then checks every host's filters directly on its description. O(hosts + VMs) per
//! request with hashing, against the indexed [`crate::Snapshot`]'s O(candidates).

use std::collections::{BTreeSet, HashMap};

use crate::error::PlacementError;
use crate::model::{AntiAffinityMode, HostSpec, Policy, Request, VmSpec};
use crate::outcome::{self, FilterCounts, HostExclusion, Placement, Refusal, RunnerUp};
use crate::snapshot::{HostView, first_exclusion};

/// Cluster state as plain lists.
#[derive(Debug, Clone, Default)]
pub struct NaiveCluster {
    /// Hosts.
    pub hosts: Vec<HostSpec>,
    /// VMs placed on them.
    pub vms: Vec<VmSpec>,
    /// Image ids some peer can serve.
    pub fetchable_images: BTreeSet<String>,
}

#[derive(Default)]
struct Aggregate {
    cpu: u64,
    memory_mib: u64,
    group_vms: u32,
    holds_image: bool,
}

impl NaiveCluster {
    /// Places one VM with the same filters, scores and tie-break as [`crate::Snapshot::place`].
    pub fn place(&self, request: &Request, policy: &Policy) -> Result<Placement, PlacementError> {
        request.validate()?;
        policy.validate()?;
        if let Some(pinned) = request.pinned_host
            && !self.hosts.iter().any(|host| host.id == pinned)
        {
            return Err(PlacementError::UnknownHost { id: pinned });
        }
        let mut aggregates: HashMap<u64, Aggregate> = HashMap::new();
        for vm in &self.vms {
            let aggregate = aggregates.entry(vm.host).or_default();
            aggregate.cpu += u64::from(vm.cpus);
            aggregate.memory_mib = aggregate.memory_mib.saturating_add(vm.memory_mib);
            if vm.anti_affinity_group.is_some()
                && vm.anti_affinity_group == request.anti_affinity_group
            {
                aggregate.group_vms += 1;
            }
            if vm.image.is_some() && vm.image == request.image {
                aggregate.holds_image = true;
            }
        }
        let image_fetchable = request
            .image
            .as_ref()
            .is_some_and(|image| self.fetchable_images.contains(image));

        let mut counts = FilterCounts::default();
        let mut exclusions = Vec::new();
        let mut best: Option<(f64, u64, &HostSpec, outcome::ScoreBreakdown)> = None;
        let mut second: Option<(f64, u64, &HostSpec)> = None;
        let mut passed = 0;
        for host in &self.hosts {
            let aggregate = aggregates.get(&host.id);
            let holds_image = match &request.image {
                None => true,
                Some(image) => {
                    host.images.contains(image) || aggregate.is_some_and(|a| a.holds_image)
                }
            };
            let group_vms = aggregate.map_or(0, |a| a.group_vms);
            let cpu_allocated = u64::from(host.cpu_reserved) + aggregate.map_or(0, |a| a.cpu);
            let memory_allocated_mib = host
                .memory_reserved_mib
                .saturating_add(aggregate.map_or(0, |a| a.memory_mib));
            let view = HostView {
                id: host.id,
                state: host.state,
                labels: &host.labels,
                cpu_capacity: host.cpu_capacity,
                memory_capacity_mib: host.memory_capacity_mib,
                cpu_allocated,
                memory_allocated_mib,
                holds_image,
                image_fetchable,
                group_vms,
            };
            if let Some(exclusion) = first_exclusion(view, request, policy) {
                counts.add(exclusion.filter(), 1);
                exclusions.push(HostExclusion {
                    host_id: host.id,
                    host_name: host.name.clone(),
                    exclusion,
                });
                continue;
            }
            let outcome::Fit::Fits {
                cpu_fraction_after,
                memory_fraction_after,
            } = outcome::fit(
                host.cpu_capacity,
                host.memory_capacity_mib,
                cpu_allocated,
                memory_allocated_mib,
                request,
                policy,
            )
            else {
                unreachable!("first_exclusion passed the capacity filters");
            };
            passed += 1;
            let group_vms = match policy.anti_affinity {
                AntiAffinityMode::Soft => group_vms,
                AntiAffinityMode::Hard => 0,
            };
            let breakdown = outcome::score(
                cpu_fraction_after,
                memory_fraction_after,
                request.image.is_some() && holds_image,
                group_vms,
                policy,
            );
            let total = breakdown.total();
            if outcome::beats(total, host.id, best.map(|(score, id, ..)| (score, id))) {
                second = best.map(|(score, id, host, _)| (score, id, host));
                best = Some((total, host.id, host, breakdown));
            } else if outcome::beats(total, host.id, second.map(|(score, id, _)| (score, id))) {
                second = Some((total, host.id, host));
            }
        }
        match best {
            Some((_, id, host, breakdown)) => {
                let runner_up = second.map(|(score, host_id, host)| RunnerUp {
                    host_id,
                    host_name: host.name.clone(),
                    score,
                });
                Ok(Placement::Decision(outcome::decision(
                    id,
                    &host.name,
                    breakdown,
                    runner_up,
                    outcome::Tally {
                        candidates: passed,
                        hosts: self.hosts.len(),
                        excluded: counts,
                    },
                    request,
                )))
            }
            None => {
                exclusions.sort_by_key(|exclusion| exclusion.host_id);
                Ok(Placement::Refusal(Refusal { exclusions, counts }))
            }
        }
    }
}
