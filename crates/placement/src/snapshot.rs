//! The indexed snapshot of cluster state that placement runs against, and placement itself.
//!
//! Hosts are stored as parallel arrays (struct of arrays) addressed by a dense index, with the
//! aggregates placement needs kept up to date instead of recomputed: allocated cpu and memory
//! per host, the set of ready hosts, per label the hosts carrying it, per image the hosts
//! holding it, per anti-affinity group the hosts running its VMs and how many. A placement is
//! then a handful of set intersections followed by one scan of the surviving hosts' four
//! numbers. Applying a decision ([`Snapshot::add_vm`]) touches O(1) entries, so a stream of
//! decisions against one snapshot is cheap. Nothing here does IO.

use std::collections::{BTreeMap, HashMap};

use crate::error::PlacementError;
use crate::host_set::HostSet;
use crate::model::{AntiAffinityMode, HostSpec, HostState, Policy, Request, VmSpec};
use crate::outcome::{
    self, Exclusion, Filter, FilterCounts, Fit, HostExclusion, LabelMismatch, Placement, Refusal,
    RunnerUp,
};

/// Identifies a VM inside one [`Snapshot`] (not a cluster-wide id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmId(pub u64);

/// What placement sees of one host's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLoad {
    /// vCPUs allocated (reserved plus VMs).
    pub cpu_allocated: u64,
    /// Memory allocated in MiB (reserved plus VMs).
    pub memory_allocated_mib: u64,
    /// VMs on the host.
    pub vms: u32,
}

#[derive(Debug, Clone)]
struct VmRecord {
    host: u32,
    cpus: u32,
    memory_mib: u64,
    image: Option<String>,
    group: Option<String>,
}

#[derive(Debug, Clone)]
struct ImageEntry {
    holders: HostSet,
    fetchable: bool,
}

/// Cluster state indexed for placement. Build it with [`Snapshot::new`], keep it current with
/// [`Snapshot::add_vm`], [`Snapshot::remove_vm`], [`Snapshot::set_host_state`] and
/// [`Snapshot::set_image_fetchable`], and ask it with [`Snapshot::place`].
#[derive(Debug, Clone)]
pub struct Snapshot {
    host_ids: Vec<u64>,
    host_names: Vec<String>,
    host_states: Vec<HostState>,
    host_labels: Vec<BTreeMap<String, String>>,
    cpu_capacity: Vec<u32>,
    memory_capacity_mib: Vec<u64>,
    cpu_allocated: Vec<u64>,
    memory_allocated_mib: Vec<u64>,
    vms_per_host: Vec<u32>,
    host_by_id: HashMap<u64, u32>,
    ready: HostSet,
    /// label key → value → hosts carrying it.
    labels: HashMap<String, HashMap<String, HostSet>>,
    images: HashMap<String, ImageEntry>,
    /// group → host index → VMs of the group on that host.
    groups: HashMap<String, HashMap<u32, u32>>,
    vms: Vec<Option<VmRecord>>,
    live_vms: usize,
}

impl Snapshot {
    /// Indexes hosts and the VMs placed on them. `fetchable_images` are the image ids some peer
    /// can serve, so a host without them can still take a VM using them. Fails without building
    /// anything on a duplicate host id, an unnamed host, or a VM on an unknown host.
    pub fn new(
        hosts: Vec<HostSpec>,
        vms: Vec<VmSpec>,
        fetchable_images: impl IntoIterator<Item = String>,
    ) -> Result<Snapshot, PlacementError> {
        let mut snapshot = Snapshot {
            host_ids: Vec::with_capacity(hosts.len()),
            host_names: Vec::with_capacity(hosts.len()),
            host_states: Vec::with_capacity(hosts.len()),
            host_labels: Vec::with_capacity(hosts.len()),
            cpu_capacity: Vec::with_capacity(hosts.len()),
            memory_capacity_mib: Vec::with_capacity(hosts.len()),
            cpu_allocated: Vec::with_capacity(hosts.len()),
            memory_allocated_mib: Vec::with_capacity(hosts.len()),
            vms_per_host: Vec::with_capacity(hosts.len()),
            host_by_id: HashMap::with_capacity(hosts.len()),
            ready: HostSet::empty(0),
            labels: HashMap::new(),
            images: HashMap::new(),
            groups: HashMap::new(),
            vms: Vec::with_capacity(vms.len()),
            live_vms: 0,
        };
        for host in &hosts {
            if let Some(&first) = snapshot.host_by_id.get(&host.id) {
                return Err(PlacementError::DuplicateHost {
                    id: host.id,
                    first: hosts[first as usize].name.clone(),
                    second: host.name.clone(),
                });
            }
            validate_host(host)?;
            snapshot
                .host_by_id
                .insert(host.id, snapshot.host_ids.len() as u32);
            snapshot.host_ids.push(host.id);
        }
        for vm in &vms {
            if !snapshot.host_by_id.contains_key(&vm.host) {
                return Err(PlacementError::UnknownHost { id: vm.host });
            }
        }
        snapshot.host_ids.clear();
        snapshot.host_by_id.clear();
        for host in hosts {
            snapshot.push_host(host);
        }
        for image in fetchable_images {
            snapshot.set_image_fetchable(&image, true);
        }
        for vm in vms {
            snapshot.add_vm(vm)?;
        }
        Ok(snapshot)
    }

    fn push_host(&mut self, host: HostSpec) {
        let index = self.host_ids.len();
        let len = index + 1;
        self.ready.grow(len);
        for values in self.labels.values_mut() {
            values.values_mut().for_each(|set| set.grow(len));
        }
        for entry in self.images.values_mut() {
            entry.holders.grow(len);
        }
        self.host_by_id.insert(host.id, index as u32);
        self.host_ids.push(host.id);
        self.host_names.push(host.name);
        self.host_states.push(host.state);
        if host.state == HostState::Ready {
            self.ready.insert(index);
        }
        for (key, value) in &host.labels {
            self.labels
                .entry(key.clone())
                .or_default()
                .entry(value.clone())
                .or_insert_with(|| HostSet::empty(len))
                .insert(index);
        }
        self.host_labels.push(host.labels);
        self.cpu_capacity.push(host.cpu_capacity);
        self.memory_capacity_mib.push(host.memory_capacity_mib);
        self.cpu_allocated.push(u64::from(host.cpu_reserved));
        self.memory_allocated_mib.push(host.memory_reserved_mib);
        self.vms_per_host.push(0);
        for image in host.images {
            self.image_entry(&image).holders.insert(index);
        }
    }

    fn image_entry(&mut self, image: &str) -> &mut ImageEntry {
        let len = self.host_ids.len();
        if !self.images.contains_key(image) {
            self.images.insert(
                image.to_string(),
                ImageEntry {
                    holders: HostSet::empty(len),
                    fetchable: false,
                },
            );
        }
        self.images
            .get_mut(image)
            .expect("image entry was just inserted")
    }

    /// Adds a host (its id must be new).
    pub fn add_host(&mut self, host: HostSpec) -> Result<(), PlacementError> {
        if let Some(&first) = self.host_by_id.get(&host.id) {
            return Err(PlacementError::DuplicateHost {
                id: host.id,
                first: self.host_names[first as usize].clone(),
                second: host.name,
            });
        }
        validate_host(&host)?;
        self.push_host(host);
        Ok(())
    }

    /// Records a VM on its host: allocation, anti-affinity group and image holder. This is how a
    /// decision is applied; O(1).
    pub fn add_vm(&mut self, vm: VmSpec) -> Result<VmId, PlacementError> {
        let host = *self
            .host_by_id
            .get(&vm.host)
            .ok_or(PlacementError::UnknownHost { id: vm.host })?;
        let index = host as usize;
        self.cpu_allocated[index] += u64::from(vm.cpus);
        self.memory_allocated_mib[index] =
            self.memory_allocated_mib[index].saturating_add(vm.memory_mib);
        self.vms_per_host[index] += 1;
        if let Some(group) = &vm.anti_affinity_group {
            match self.groups.get_mut(group.as_str()) {
                Some(hosts) => *hosts.entry(host).or_insert(0) += 1,
                None => {
                    self.groups
                        .insert(group.clone(), HashMap::from([(host, 1)]));
                }
            }
        }
        if let Some(image) = &vm.image {
            self.image_entry(image).holders.insert(index);
        }
        let id = VmId(self.vms.len() as u64);
        self.vms.push(Some(VmRecord {
            host,
            cpus: vm.cpus,
            memory_mib: vm.memory_mib,
            image: vm.image,
            group: vm.anti_affinity_group,
        }));
        self.live_vms += 1;
        Ok(id)
    }

    /// Forgets a VM (deleted or moved away) and frees its resources. The host keeps the image.
    pub fn remove_vm(&mut self, id: VmId) -> Result<VmSpec, PlacementError> {
        let record = self
            .vms
            .get_mut(id.0 as usize)
            .and_then(Option::take)
            .ok_or(PlacementError::UnknownVm { id: id.0 })?;
        let index = record.host as usize;
        self.cpu_allocated[index] -= u64::from(record.cpus);
        self.memory_allocated_mib[index] =
            self.memory_allocated_mib[index].saturating_sub(record.memory_mib);
        self.vms_per_host[index] -= 1;
        if let Some(group) = &record.group
            && let Some(hosts) = self.groups.get_mut(group.as_str())
        {
            if let Some(count) = hosts.get_mut(&record.host) {
                *count -= 1;
                if *count == 0 {
                    hosts.remove(&record.host);
                }
            }
            if hosts.is_empty() {
                self.groups.remove(group.as_str());
            }
        }
        self.live_vms -= 1;
        Ok(VmSpec {
            host: self.host_ids[index],
            cpus: record.cpus,
            memory_mib: record.memory_mib,
            image: record.image,
            anti_affinity_group: record.group,
        })
    }

    /// Changes a host's state (from heartbeats or an operator).
    pub fn set_host_state(&mut self, host_id: u64, state: HostState) -> Result<(), PlacementError> {
        let index = *self
            .host_by_id
            .get(&host_id)
            .ok_or(PlacementError::UnknownHost { id: host_id })? as usize;
        self.host_states[index] = state;
        if state == HostState::Ready {
            self.ready.insert(index);
        } else {
            self.ready.remove(index);
        }
        Ok(())
    }

    /// Records whether some peer can serve an image, so hosts without it may still take it.
    pub fn set_image_fetchable(&mut self, image: &str, fetchable: bool) {
        self.image_entry(image).fetchable = fetchable;
    }

    /// Number of hosts.
    pub fn host_count(&self) -> usize {
        self.host_ids.len()
    }

    /// Number of VMs currently recorded.
    pub fn vm_count(&self) -> usize {
        self.live_vms
    }

    /// A host's current load, by host id.
    pub fn host_load(&self, host_id: u64) -> Option<HostLoad> {
        let index = *self.host_by_id.get(&host_id)? as usize;
        Some(HostLoad {
            cpu_allocated: self.cpu_allocated[index],
            memory_allocated_mib: self.memory_allocated_mib[index],
            vms: self.vms_per_host[index],
        })
    }

    /// Whether a host holds an image's bytes.
    pub fn host_holds_image(&self, host_id: u64, image: &str) -> bool {
        match (self.host_by_id.get(&host_id), self.images.get(image)) {
            (Some(&index), Some(entry)) => entry.holders.contains(index as usize),
            _ => false,
        }
    }

    /// Places one VM: filters, then scores, then the best host (ties to the lowest host id), or
    /// a refusal naming every host's first failed filter. Does not change the snapshot; apply a
    /// decision with `add_vm(request.to_vm(decision.host_id))`.
    pub fn place(&self, request: &Request, policy: &Policy) -> Result<Placement, PlacementError> {
        request.validate()?;
        policy.validate()?;
        let hosts = self.host_ids.len();
        let mut counts = FilterCounts::default();
        let mut candidates = self.ready.clone();
        match request.pinned_host {
            Some(pinned) => {
                let index = *self
                    .host_by_id
                    .get(&pinned)
                    .ok_or(PlacementError::UnknownHost { id: pinned })?
                    as usize;
                let ready = candidates.contains(index);
                candidates.clear();
                counts.add(Filter::Pinned, hosts - 1);
                if ready {
                    candidates.insert(index);
                } else {
                    counts.add(Filter::State, 1);
                }
            }
            None => counts.add(Filter::State, hosts - candidates.count()),
        }

        let mut remaining = candidates.count();
        if !request.required_labels.is_empty() {
            for (key, value) in &request.required_labels {
                match self
                    .labels
                    .get(key.as_str())
                    .and_then(|values| values.get(value.as_str()))
                {
                    Some(carriers) => candidates.intersect(carriers),
                    None => candidates.clear(),
                }
            }
            let after = candidates.count();
            counts.add(Filter::Labels, remaining - after);
            remaining = after;
        }

        let image = request.image.as_deref().map(|image| self.images.get(image));
        match image {
            None
            | Some(Some(ImageEntry {
                fetchable: true, ..
            })) => {}
            Some(Some(entry)) => candidates.intersect(&entry.holders),
            Some(None) => candidates.clear(),
        }
        let after = candidates.count();
        counts.add(Filter::Image, remaining - after);
        remaining = after;

        let group_hosts = request
            .anti_affinity_group
            .as_deref()
            .and_then(|group| self.groups.get(group));
        if policy.anti_affinity == AntiAffinityMode::Hard
            && let Some(group_hosts) = group_hosts
        {
            for &host in group_hosts.keys() {
                candidates.remove(host as usize);
            }
            let after = candidates.count();
            counts.add(Filter::AntiAffinity, remaining - after);
        }

        let holders = image.flatten().map(|entry| &entry.holders);
        let soft_group = match policy.anti_affinity {
            AntiAffinityMode::Soft => group_hosts,
            AntiAffinityMode::Hard => None,
        };
        let mut best: Option<(f64, u64, usize, outcome::ScoreBreakdown)> = None;
        let mut second: Option<(f64, u64, usize)> = None;
        let mut passed = 0;
        for index in candidates.iter() {
            match outcome::fit(
                self.cpu_capacity[index],
                self.memory_capacity_mib[index],
                self.cpu_allocated[index],
                self.memory_allocated_mib[index],
                request,
                policy,
            ) {
                Fit::Cpu { .. } => counts.add(Filter::Cpu, 1),
                Fit::Memory { .. } => counts.add(Filter::Memory, 1),
                Fit::Fits {
                    cpu_fraction_after,
                    memory_fraction_after,
                } => {
                    passed += 1;
                    let holds_image = holders.is_some_and(|holders| holders.contains(index));
                    let group_vms = soft_group
                        .and_then(|hosts| hosts.get(&(index as u32)).copied())
                        .unwrap_or(0);
                    let breakdown = outcome::score(
                        cpu_fraction_after,
                        memory_fraction_after,
                        holds_image,
                        group_vms,
                        policy,
                    );
                    let total = breakdown.total();
                    let id = self.host_ids[index];
                    if outcome::beats(total, id, best.map(|(score, id, ..)| (score, id))) {
                        second = best.map(|(score, id, index, _)| (score, id, index));
                        best = Some((total, id, index, breakdown));
                    } else if outcome::beats(total, id, second.map(|(score, id, _)| (score, id))) {
                        second = Some((total, id, index));
                    }
                }
            }
        }

        match best {
            Some((_, id, index, breakdown)) => {
                let runner_up = second.map(|(score, host_id, index)| RunnerUp {
                    host_id,
                    host_name: self.host_names[index].clone(),
                    score,
                });
                Ok(Placement::Decision(outcome::decision(
                    id,
                    &self.host_names[index],
                    breakdown,
                    runner_up,
                    outcome::Tally {
                        candidates: passed,
                        hosts,
                        excluded: counts,
                    },
                    request,
                )))
            }
            None => Ok(Placement::Refusal(self.refusal(request, policy))),
        }
    }

    /// Explains, for every host, the first filter it fails. Only run when nothing fits, so it
    /// may be thorough rather than fast.
    fn refusal(&self, request: &Request, policy: &Policy) -> Refusal {
        let mut exclusions = Vec::with_capacity(self.host_ids.len());
        let mut counts = FilterCounts::default();
        for index in 0..self.host_ids.len() {
            let group_vms = request
                .anti_affinity_group
                .as_deref()
                .and_then(|group| self.groups.get(group))
                .and_then(|hosts| hosts.get(&(index as u32)).copied())
                .unwrap_or(0);
            let holds_image = request.image.as_deref().is_none_or(|image| {
                self.images
                    .get(image)
                    .is_some_and(|entry| entry.holders.contains(index))
            });
            let image_fetchable = request
                .image
                .as_deref()
                .is_some_and(|image| self.images.get(image).is_some_and(|entry| entry.fetchable));
            let exclusion = first_exclusion(
                HostView {
                    id: self.host_ids[index],
                    state: self.host_states[index],
                    labels: &self.host_labels[index],
                    cpu_capacity: self.cpu_capacity[index],
                    memory_capacity_mib: self.memory_capacity_mib[index],
                    cpu_allocated: self.cpu_allocated[index],
                    memory_allocated_mib: self.memory_allocated_mib[index],
                    holds_image,
                    image_fetchable,
                    group_vms,
                },
                request,
                policy,
            );
            // Every host fails something, or this would not be a refusal.
            if let Some(exclusion) = exclusion {
                counts.add(exclusion.filter(), 1);
                exclusions.push(HostExclusion {
                    host_id: self.host_ids[index],
                    host_name: self.host_names[index].clone(),
                    exclusion,
                });
            }
        }
        exclusions.sort_by_key(|exclusion| exclusion.host_id);
        Refusal { exclusions, counts }
    }
}

fn validate_host(host: &HostSpec) -> Result<(), PlacementError> {
    if host.name.trim().is_empty() {
        return Err(PlacementError::InvalidHost {
            name: host.name.clone(),
            reason: format!("host id {} has an empty name", host.id),
        });
    }
    Ok(())
}

/// One host as the filters see it, whichever implementation gathered the facts.
pub(crate) struct HostView<'a> {
    pub(crate) id: u64,
    pub(crate) state: HostState,
    pub(crate) labels: &'a BTreeMap<String, String>,
    pub(crate) cpu_capacity: u32,
    pub(crate) memory_capacity_mib: u64,
    pub(crate) cpu_allocated: u64,
    pub(crate) memory_allocated_mib: u64,
    /// True when the request names no image.
    pub(crate) holds_image: bool,
    pub(crate) image_fetchable: bool,
    pub(crate) group_vms: u32,
}

/// The first filter a host fails, with the facts behind it; None when it passes every filter.
pub(crate) fn first_exclusion(
    host: HostView<'_>,
    request: &Request,
    policy: &Policy,
) -> Option<Exclusion> {
    if let Some(pinned_host) = request.pinned_host
        && pinned_host != host.id
    {
        return Some(Exclusion::NotPinned { pinned_host });
    }
    if host.state != HostState::Ready {
        return Some(Exclusion::State { state: host.state });
    }
    let missing: Vec<LabelMismatch> = request
        .required_labels
        .iter()
        .filter(|(key, value)| host.labels.get(key.as_str()) != Some(value))
        .map(|(key, value)| LabelMismatch {
            key: key.clone(),
            wanted: value.clone(),
            actual: host.labels.get(key.as_str()).cloned(),
        })
        .collect();
    if !missing.is_empty() {
        return Some(Exclusion::Labels { missing });
    }
    if let Some(image) = &request.image
        && !host.holds_image
        && !host.image_fetchable
    {
        return Some(Exclusion::Image {
            image: image.clone(),
        });
    }
    if policy.anti_affinity == AntiAffinityMode::Hard
        && host.group_vms > 0
        && let Some(group) = &request.anti_affinity_group
    {
        return Some(Exclusion::AntiAffinity {
            group: group.clone(),
            vms: host.group_vms,
        });
    }
    match outcome::fit(
        host.cpu_capacity,
        host.memory_capacity_mib,
        host.cpu_allocated,
        host.memory_allocated_mib,
        request,
        policy,
    ) {
        Fit::Fits { .. } => None,
        Fit::Cpu { free } => Some(Exclusion::Cpu {
            needed: request.cpus,
            free,
            overcommit: policy.cpu_overcommit,
        }),
        Fit::Memory { free_mib } => Some(Exclusion::Memory {
            needed_mib: request.memory_mib,
            free_mib,
            overcommit: policy.memory_overcommit,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Strategy;

    fn host(id: u64, cpus: u32, memory_mib: u64) -> HostSpec {
        HostSpec {
            id,
            name: format!("host-{id}"),
            state: HostState::Ready,
            labels: BTreeMap::from([("zone".to_string(), "a".to_string())]),
            cpu_capacity: cpus,
            memory_capacity_mib: memory_mib,
            cpu_reserved: 0,
            memory_reserved_mib: 0,
            images: vec!["debian".to_string()],
        }
    }

    fn request(cpus: u32, memory_mib: u64) -> Request {
        Request {
            cpus,
            memory_mib,
            ..Request::default()
        }
    }

    fn strict() -> Policy {
        Policy {
            cpu_overcommit: 1.0,
            ..Policy::default()
        }
    }

    #[test]
    fn refusal_names_each_host_with_the_numbers_behind_it() {
        let mut cordoned = host(3, 8, 8192);
        cordoned.state = HostState::Cordoned;
        let snapshot = Snapshot::new(
            vec![host(2, 8, 4096), host(1, 1, 8192), cordoned],
            vec![VmSpec {
                host: 2,
                cpus: 1,
                memory_mib: 3072,
                image: None,
                anti_affinity_group: None,
            }],
            [],
        )
        .expect("snapshot");
        let placement = snapshot.place(&request(2, 2048), &strict()).expect("place");
        let refusal = placement.refusal().expect("nothing fits");
        let lines: Vec<String> = refusal
            .exclusions
            .iter()
            .map(|e| format!("{}: {}", e.host_name, e.exclusion))
            .collect();
        assert_eq!(
            lines,
            vec![
                "host-1: needs 2 vCPUs, 1 free with overcommit 1.0",
                "host-2: needs 2048 MiB, 1024 MiB free with overcommit 1.0",
                "host-3: host is cordoned, not ready",
            ]
        );
        assert_eq!(
            refusal.summary(),
            "no host can take the VM: 3 hosts excluded; 1 by state, 1 by cpu, 1 by memory"
        );
    }

    #[test]
    fn decision_explains_the_winner_and_the_runner_up() {
        let mut far = host(9, 16, 16384);
        far.labels.insert("zone".to_string(), "b".to_string());
        let snapshot = Snapshot::new(
            vec![host(5, 16, 16384), host(4, 16, 16384), far],
            vec![],
            ["alpine".to_string()],
        )
        .expect("snapshot");
        let mut wanted = request(2, 2048);
        wanted.image = Some("debian".to_string());
        wanted.required_labels = BTreeMap::from([("zone".to_string(), "a".to_string())]);
        let decision = snapshot
            .place(&wanted, &Policy::default())
            .expect("place")
            .decision()
            .cloned()
            .expect("fits");
        // Hosts 4 and 5 tie; the lower id wins.
        assert_eq!(decision.host_id, 4);
        assert_eq!(decision.runner_up.as_ref().map(|r| r.host_id), Some(5));
        assert_eq!(decision.excluded.get(Filter::Labels), 1);
        assert!(decision.breakdown.holds_image);
        assert!(
            decision
                .explanation
                .starts_with("host-4 (id 4) won with score"),
            "{}",
            decision.explanation
        );
        for part in [
            "image locality +0.200 (holds debian)",
            "runner-up host-5 (id 5)",
            "tie broken by lower host id",
            "2 of 3 hosts passed every filter, excluded: 1 by labels",
        ] {
            assert!(
                decision.explanation.contains(part),
                "{part}: {}",
                decision.explanation
            );
        }
    }

    #[test]
    fn hard_anti_affinity_excludes_and_soft_only_penalises() {
        let vm = VmSpec {
            host: 1,
            cpus: 1,
            memory_mib: 512,
            image: None,
            anti_affinity_group: Some("web".to_string()),
        };
        let mut snapshot =
            Snapshot::new(vec![host(1, 64, 65536), host(2, 4, 4096)], vec![vm], []).expect("ok");
        let mut wanted = request(1, 512);
        wanted.anti_affinity_group = Some("web".to_string());
        let hard = snapshot.place(&wanted, &strict()).expect("place");
        assert_eq!(hard.decision().expect("fits").host_id, 2);
        let soft = Policy {
            anti_affinity: AntiAffinityMode::Soft,
            anti_affinity_weight: 0.0,
            ..strict()
        };
        // With no penalty the big, nearly empty host wins despite the group.
        assert_eq!(
            snapshot
                .place(&wanted, &soft)
                .expect("place")
                .decision()
                .expect("fits")
                .host_id,
            1
        );
        // Pinning to host 1 under hard anti-affinity is refused with the reason.
        wanted.pinned_host = Some(1);
        let refusal = snapshot.place(&wanted, &strict()).expect("place");
        let refusal = refusal.refusal().expect("refused");
        assert_eq!(
            refusal.exclusions[0].exclusion.to_string(),
            "already runs 1 VM of anti-affinity group web"
        );
        assert_eq!(refusal.exclusions[1].exclusion.filter(), Filter::Pinned);
        // Taking host 2 out of service leaves nothing for the unpinned request.
        wanted.pinned_host = None;
        snapshot
            .set_host_state(2, HostState::Draining)
            .expect("state");
        assert!(
            snapshot
                .place(&wanted, &strict())
                .expect("place")
                .refusal()
                .is_some()
        );
    }

    #[test]
    fn bad_input_is_refused_with_a_clear_error() {
        let duplicate = Snapshot::new(vec![host(1, 1, 1), host(1, 2, 2)], vec![], []);
        assert!(matches!(
            duplicate,
            Err(PlacementError::DuplicateHost { id: 1, .. })
        ));
        let orphan = Snapshot::new(
            vec![host(1, 1, 1)],
            vec![VmSpec {
                host: 7,
                cpus: 1,
                memory_mib: 1,
                image: None,
                anti_affinity_group: None,
            }],
            [],
        );
        assert_eq!(orphan.unwrap_err(), PlacementError::UnknownHost { id: 7 });
        let snapshot = Snapshot::new(vec![host(1, 4, 4096)], vec![], []).expect("ok");
        assert!(matches!(
            snapshot.place(&request(0, 1), &Policy::default()),
            Err(PlacementError::InvalidRequest { .. })
        ));
        let nan = Policy {
            cpu_overcommit: f64::NAN,
            ..Policy::default()
        };
        let error = snapshot.place(&request(1, 1), &nan).unwrap_err();
        assert!(
            error.to_string().contains("cpu overcommit ratio"),
            "{error}"
        );
        let pinned = Request {
            pinned_host: Some(99),
            ..request(1, 1)
        };
        assert_eq!(
            snapshot.place(&pinned, &Policy::default()).unwrap_err(),
            PlacementError::UnknownHost { id: 99 }
        );
        let mut snapshot = snapshot;
        assert!(snapshot.remove_vm(VmId(0)).is_err());
        assert!(snapshot.add_host(host(1, 1, 1)).is_err());
        snapshot.add_host(host(2, 8, 8192)).expect("new host");
        let bin_pack = Policy {
            strategy: Strategy::BinPack,
            ..Policy::default()
        };
        assert_eq!(
            snapshot
                .place(&request(1, 1024), &bin_pack)
                .expect("place")
                .decision()
                .expect("fits")
                .host_id,
            1
        );
    }
}
