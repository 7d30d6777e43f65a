//! Property tests of placement on random small clusters: the indexed snapshot agrees with the
//! naive implementation, a chosen host passes every filter (checked here independently of the
//! crate's own filter code), a refusal happens exactly when no host passes and names every
//! host, answers do not depend on input order, bin-pack never picks an emptier host than spread,
//! and applying or removing a VM incrementally equals rebuilding the snapshot.

use std::collections::{BTreeMap, BTreeSet};

use novacron_placement::naive::NaiveCluster;
use novacron_placement::{
    AntiAffinityMode, Exclusion, HostSpec, HostState, Placement, Policy, Request, Snapshot,
    Strategy as PlacementStrategy, VmSpec,
};
use proptest::prelude::*;

const IMAGES: [&str; 4] = ["debian", "alpine", "windows", "fedora"];
const GROUPS: [&str; 3] = ["web", "db", "cache"];

#[derive(Debug, Clone)]
struct Case {
    hosts: Vec<HostSpec>,
    vms: Vec<VmSpec>,
    fetchable: BTreeSet<String>,
    request: Request,
    policy: Policy,
}

impl Case {
    fn snapshot(&self) -> Snapshot {
        Snapshot::new(
            self.hosts.clone(),
            self.vms.clone(),
            self.fetchable.iter().cloned(),
        )
        .expect("valid snapshot")
    }

    fn naive(&self) -> NaiveCluster {
        NaiveCluster {
            hosts: self.hosts.clone(),
            vms: self.vms.clone(),
            fetchable_images: self.fetchable.clone(),
        }
    }
}

fn host_state() -> impl Strategy<Value = HostState> {
    prop_oneof![
        6 => Just(HostState::Ready),
        1 => Just(HostState::Unreachable),
        1 => Just(HostState::Draining),
        1 => Just(HostState::Cordoned),
    ]
}

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    (
        prop::option::of(prop::sample::select(vec!["a", "b", "c"])),
        prop::option::of(prop::sample::select(vec!["ssd", "hdd"])),
    )
        .prop_map(|(zone, disk)| {
            let mut labels = BTreeMap::new();
            if let Some(zone) = zone {
                labels.insert("zone".to_string(), zone.to_string());
            }
            if let Some(disk) = disk {
                labels.insert("disk".to_string(), disk.to_string());
            }
            labels
        })
}

fn image_name() -> impl Strategy<Value = String> {
    prop::sample::select(IMAGES.to_vec()).prop_map(str::to_string)
}

fn group_name() -> impl Strategy<Value = Option<String>> {
    prop::option::of(prop::sample::select(GROUPS.to_vec()).prop_map(str::to_string))
}

fn hosts() -> impl Strategy<Value = Vec<HostSpec>> {
    prop::collection::vec(
        (
            host_state(),
            labels(),
            prop::sample::select(vec![2u32, 4, 8, 16]),
            prop::sample::select(vec![2048u64, 4096, 8192, 16384]),
            0u32..2,
            prop::sample::select(vec![0u64, 512, 1024]),
            prop::collection::btree_set(image_name(), 0..3),
        ),
        1..16,
    )
    .prop_flat_map(|specs| {
        let count = specs.len();
        // Distinct ids in a shuffled order, so tie-breaking by id is not tie-breaking by position.
        (
            Just(specs),
            Just((0..count as u64).map(|id| id * 7 + 3).collect::<Vec<_>>()).prop_shuffle(),
        )
    })
    .prop_map(|(specs, ids)| {
        specs
            .into_iter()
            .zip(ids)
            .map(
                |((state, labels, cpus, memory, cpu_reserved, memory_reserved, images), id)| {
                    HostSpec {
                        id,
                        name: format!("host-{id}"),
                        state,
                        labels,
                        cpu_capacity: cpus,
                        memory_capacity_mib: memory,
                        cpu_reserved,
                        memory_reserved_mib: memory_reserved,
                        images: images.into_iter().collect(),
                    }
                },
            )
            .collect()
    })
}

fn request(host_ids: Vec<u64>) -> impl Strategy<Value = Request> {
    (
        1u32..6,
        prop::sample::select(vec![256u64, 1024, 2048, 4096, 8192]),
        prop::option::of(image_name()),
        labels(),
        group_name(),
        prop::option::weighted(0.15, prop::sample::select(host_ids)),
    )
        .prop_map(
            |(cpus, memory_mib, image, required_labels, group, pinned_host)| Request {
                cpus,
                memory_mib,
                image,
                required_labels,
                anti_affinity_group: group,
                pinned_host,
            },
        )
}

fn policy() -> impl Strategy<Value = Policy> {
    (
        prop_oneof![
            Just(PlacementStrategy::Spread),
            Just(PlacementStrategy::BinPack)
        ],
        prop::sample::select(vec![1.0f64, 1.5, 4.0]),
        prop::sample::select(vec![1.0f64, 1.25]),
        prop::sample::select(vec![0.0f64, 0.2, 1.0]),
        prop_oneof![Just(AntiAffinityMode::Hard), Just(AntiAffinityMode::Soft)],
        prop::sample::select(vec![0.0f64, 0.1, 0.5]),
    )
        .prop_map(
            |(strategy, cpu_overcommit, memory_overcommit, image_weight, mode, aa_weight)| Policy {
                strategy,
                cpu_overcommit,
                memory_overcommit,
                image_locality_weight: image_weight,
                anti_affinity: mode,
                anti_affinity_weight: aa_weight,
            },
        )
}

fn case() -> impl Strategy<Value = Case> {
    hosts().prop_flat_map(|hosts| {
        let ids: Vec<u64> = hosts.iter().map(|host| host.id).collect();
        let vms = prop::collection::vec(
            (
                prop::sample::select(ids.clone()),
                1u32..4,
                prop::sample::select(vec![256u64, 512, 1024, 2048]),
                prop::option::of(image_name()),
                group_name(),
            )
                .prop_map(|(host, cpus, memory_mib, image, group)| VmSpec {
                    host,
                    cpus,
                    memory_mib,
                    image,
                    anti_affinity_group: group,
                }),
            0..30,
        );
        let fetchable = prop::collection::btree_set(image_name(), 0..3);
        (Just(hosts), vms, fetchable, request(ids), policy()).prop_map(
            |(hosts, vms, fetchable, request, policy)| Case {
                hosts,
                vms,
                fetchable,
                request,
                policy,
            },
        )
    })
}

/// Whether `host` passes every filter, computed from the plain lists without any of the
/// crate's code.
fn passes_every_filter(case: &Case, host: &HostSpec) -> bool {
    let request = &case.request;
    if request.pinned_host.is_some_and(|pinned| pinned != host.id) {
        return false;
    }
    if host.state != HostState::Ready {
        return false;
    }
    if request
        .required_labels
        .iter()
        .any(|(key, value)| host.labels.get(key) != Some(value))
    {
        return false;
    }
    let on_host: Vec<&VmSpec> = case.vms.iter().filter(|vm| vm.host == host.id).collect();
    if let Some(image) = &request.image {
        let holds = host.images.contains(image)
            || on_host.iter().any(|vm| vm.image.as_ref() == Some(image));
        if !holds && !case.fetchable.contains(image) {
            return false;
        }
    }
    if case.policy.anti_affinity == AntiAffinityMode::Hard
        && let Some(group) = &request.anti_affinity_group
        && on_host
            .iter()
            .any(|vm| vm.anti_affinity_group.as_ref() == Some(group))
    {
        return false;
    }
    let cpu_used: u64 =
        u64::from(host.cpu_reserved) + on_host.iter().map(|vm| u64::from(vm.cpus)).sum::<u64>();
    let memory_used: u64 =
        host.memory_reserved_mib + on_host.iter().map(|vm| vm.memory_mib).sum::<u64>();
    let cpu_ok = (cpu_used + u64::from(request.cpus)) as f64
        <= f64::from(host.cpu_capacity) * case.policy.cpu_overcommit;
    let memory_ok = (memory_used + request.memory_mib) as f64
        <= host.memory_capacity_mib as f64 * case.policy.memory_overcommit;
    cpu_ok && memory_ok
}

/// Mean share of allocatable cpu and memory in use on `host_id` after placing the request.
fn utilisation_after(case: &Case, host_id: u64) -> f64 {
    let host = case
        .hosts
        .iter()
        .find(|host| host.id == host_id)
        .expect("host");
    let on_host = case.vms.iter().filter(|vm| vm.host == host_id);
    let (cpu, memory) = on_host.fold(
        (u64::from(host.cpu_reserved), host.memory_reserved_mib),
        |(cpu, memory), vm| (cpu + u64::from(vm.cpus), memory + vm.memory_mib),
    );
    let cpu_share = (cpu + u64::from(case.request.cpus)) as f64
        / (f64::from(host.cpu_capacity) * case.policy.cpu_overcommit);
    let memory_share = (memory + case.request.memory_mib) as f64
        / (host.memory_capacity_mib as f64 * case.policy.memory_overcommit);
    (cpu_share + memory_share) / 2.0
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn indexed_snapshot_agrees_with_the_naive_implementation(case in case()) {
        let fast = case.snapshot().place(&case.request, &case.policy).expect("place");
        let naive = case.naive().place(&case.request, &case.policy).expect("naive place");
        prop_assert_eq!(fast, naive);
    }

    #[test]
    fn a_decision_passes_every_filter_and_a_refusal_means_none_does(case in case()) {
        let placement = case.snapshot().place(&case.request, &case.policy).expect("place");
        let passing: Vec<u64> = case
            .hosts
            .iter()
            .filter(|host| passes_every_filter(&case, host))
            .map(|host| host.id)
            .collect();
        match placement {
            Placement::Decision(decision) => {
                prop_assert!(passing.contains(&decision.host_id), "{decision:?} not in {passing:?}");
                prop_assert_eq!(decision.candidates, passing.len());
                prop_assert_eq!(decision.excluded.total() + decision.candidates, case.hosts.len());
                prop_assert!(decision.explanation.contains(&decision.host_name));
            }
            Placement::Refusal(refusal) => {
                prop_assert!(passing.is_empty(), "refused although {passing:?} pass");
                let named: Vec<u64> = refusal.exclusions.iter().map(|e| e.host_id).collect();
                let mut every: Vec<u64> = case.hosts.iter().map(|host| host.id).collect();
                every.sort_unstable();
                prop_assert_eq!(named, every, "every host named once, by id");
                prop_assert_eq!(refusal.counts.total(), case.hosts.len());
                for exclusion in &refusal.exclusions {
                    let host = case.hosts.iter().find(|h| h.id == exclusion.host_id).expect("host");
                    // The reason given is true of the host.
                    let true_reason = match &exclusion.exclusion {
                        Exclusion::NotPinned { pinned_host } => *pinned_host != host.id,
                        Exclusion::State { state } => *state == host.state && *state != HostState::Ready,
                        Exclusion::Labels { missing } => !missing.is_empty() && missing.iter().all(|m| host.labels.get(&m.key) != Some(&m.wanted)),
                        Exclusion::Image { image } => !host.images.contains(image) && !case.fetchable.contains(image),
                        Exclusion::AntiAffinity { group, vms } => *vms as usize == case.vms.iter().filter(|vm| vm.host == host.id && vm.anti_affinity_group.as_ref() == Some(group)).count(),
                        Exclusion::Cpu { needed, free, .. } => f64::from(*needed) > *free,
                        Exclusion::Memory { needed_mib, free_mib, .. } => *needed_mib as f64 > *free_mib,
                    };
                    prop_assert!(true_reason, "{exclusion:?} is not true of {host:?}");
                    prop_assert!(!exclusion.exclusion.to_string().is_empty());
                }
                prop_assert!(refusal.summary().starts_with("no host can take the VM"));
            }
        }
    }

    #[test]
    fn the_answer_does_not_depend_on_input_order(case in case(), seed in any::<u64>()) {
        let first = case.snapshot().place(&case.request, &case.policy).expect("place");
        let mut shuffled = case.clone();
        // A deterministic permutation from the seed: rotate, then reverse when the seed is odd.
        let rotate_hosts = (seed as usize) % shuffled.hosts.len();
        shuffled.hosts.rotate_left(rotate_hosts);
        if !shuffled.vms.is_empty() {
            let rotate_vms = (seed as usize / 7) % shuffled.vms.len();
            shuffled.vms.rotate_left(rotate_vms);
        }
        if seed % 2 == 1 {
            shuffled.hosts.reverse();
            shuffled.vms.reverse();
        }
        let second = shuffled.snapshot().place(&case.request, &case.policy).expect("place");
        // Repeating a placement gives the identical answer.
        prop_assert_eq!(&second, &shuffled.snapshot().place(&case.request, &case.policy).expect("place"));
        match (first, second) {
            (Placement::Decision(a), Placement::Decision(b)) => {
                prop_assert_eq!(a.host_id, b.host_id);
                prop_assert_eq!(a.score, b.score);
                prop_assert_eq!(a.runner_up.map(|r| r.host_id), b.runner_up.map(|r| r.host_id));
                prop_assert_eq!(a.excluded, b.excluded);
            }
            (Placement::Refusal(a), Placement::Refusal(b)) => prop_assert_eq!(a, b),
            (a, b) => prop_assert!(false, "order changed the outcome: {a:?} vs {b:?}"),
        }
    }

    #[test]
    fn bin_pack_never_picks_an_emptier_host_than_spread(case in case()) {
        let mut spread = case.clone();
        spread.policy.strategy = PlacementStrategy::Spread;
        spread.policy.image_locality_weight = 0.0;
        spread.policy.anti_affinity_weight = 0.0;
        let mut bin_pack = spread.clone();
        bin_pack.policy.strategy = PlacementStrategy::BinPack;
        let spread_choice = spread.snapshot().place(&spread.request, &spread.policy).expect("place");
        let bin_pack_choice = bin_pack.snapshot().place(&bin_pack.request, &bin_pack.policy).expect("place");
        match (spread_choice.decision(), bin_pack_choice.decision()) {
            (Some(spread_decision), Some(bin_pack_decision)) => {
                prop_assert!(
                    utilisation_after(&bin_pack, bin_pack_decision.host_id)
                        >= utilisation_after(&spread, spread_decision.host_id)
                );
                // Same filters: the same hosts qualified.
                prop_assert_eq!(spread_decision.candidates, bin_pack_decision.candidates);
            }
            (None, None) => {}
            (a, b) => prop_assert!(false, "strategy changed feasibility: {a:?} vs {b:?}"),
        }
    }

    #[test]
    fn applying_and_removing_a_vm_incrementally_equals_rebuilding(case in case(), next in request(vec![0])) {
        let next = Request { pinned_host: None, ..next };
        let mut snapshot = case.snapshot();
        let Some(decision) = snapshot.place(&case.request, &case.policy).expect("place").decision().cloned() else {
            return Ok(());
        };
        let vm = case.request.to_vm(decision.host_id);
        let id = snapshot.add_vm(vm.clone()).expect("apply decision");
        let mut rebuilt_case = case.clone();
        rebuilt_case.vms.push(vm);
        let rebuilt = rebuilt_case.snapshot();
        for host in &case.hosts {
            prop_assert_eq!(snapshot.host_load(host.id), rebuilt.host_load(host.id));
        }
        prop_assert_eq!(snapshot.vm_count(), rebuilt.vm_count());
        prop_assert_eq!(
            snapshot.place(&next, &case.policy).expect("place"),
            rebuilt.place(&next, &case.policy).expect("place")
        );
        // Removing it again gives the original answers back.
        snapshot.remove_vm(id).expect("remove");
        let original = case.snapshot();
        for host in &case.hosts {
            prop_assert_eq!(snapshot.host_load(host.id), original.host_load(host.id));
        }
        prop_assert_eq!(snapshot.vm_count(), original.vm_count());
        // The host keeps the image's bytes after the VM leaves, so compare without images.
        let imageless = Request { image: None, ..next };
        prop_assert_eq!(
            snapshot.place(&imageless, &case.policy).expect("place"),
            original.place(&imageless, &case.policy).expect("place")
        );
    }
}
