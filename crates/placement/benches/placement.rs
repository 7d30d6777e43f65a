//! Placement decisions per second, single-threaded, against a 10 000-host / 100 000-VM snapshot,
//! for spread and bin-pack, with and without applying each decision, next to the naive
//! implementation (recompute host aggregates from the VM list for every request) in the same
//! run. Prints a table. `PLACEMENT_BENCH_HOSTS`, `PLACEMENT_BENCH_VMS`,
//! `PLACEMENT_BENCH_DECISIONS` and `PLACEMENT_BENCH_NAIVE_DECISIONS` change the sizes.

use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;
use std::time::{Duration, Instant};

use novacron_placement::naive::NaiveCluster;
use novacron_placement::{
    AntiAffinityMode, HostSpec, HostState, Placement, Policy, Request, Snapshot, Strategy, VmSpec,
};

/// A small deterministic generator (SplitMix64) so every run builds the same cluster.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// Roughly Zipf-like: small indices much more often.
    fn skewed(&mut self, bound: u64) -> u64 {
        let a = self.below(bound);
        let b = self.below(bound);
        a.min(b).min(self.below(bound))
    }
}

const ZONES: [&str; 6] = ["eu-1a", "eu-1b", "eu-1c", "us-2a", "us-2b", "us-2c"];
const IMAGES: u64 = 60;
const GROUPS: u64 = 8_000;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

struct Cluster {
    hosts: Vec<HostSpec>,
    vms: Vec<VmSpec>,
    fetchable: BTreeSet<String>,
}

fn image_name(index: u64) -> String {
    format!("image-{index:03}")
}

fn build_cluster(hosts: usize, vms: usize, random: &mut Random) -> Cluster {
    let mut host_specs = Vec::with_capacity(hosts);
    for index in 0..hosts as u64 {
        let mut labels = BTreeMap::new();
        labels.insert(
            "zone".to_string(),
            ZONES[random.below(ZONES.len() as u64) as usize].to_string(),
        );
        labels.insert(
            "disk".to_string(),
            if random.chance(70) { "ssd" } else { "hdd" }.to_string(),
        );
        if random.chance(5) {
            labels.insert("gpu".to_string(), "a100".to_string());
        }
        let (cpus, memory) = match random.below(3) {
            0 => (32, 128 * 1024),
            1 => (64, 256 * 1024),
            _ => (128, 512 * 1024),
        };
        let state = match random.below(100) {
            0..=1 => HostState::Unreachable,
            2..=3 => HostState::Draining,
            4 => HostState::Cordoned,
            _ => HostState::Ready,
        };
        let images = (0..random.below(6))
            .map(|_| image_name(random.skewed(IMAGES)))
            .collect();
        host_specs.push(HostSpec {
            id: index * 3 + 1,
            name: format!("host-{index:05}"),
            state,
            labels,
            cpu_capacity: cpus,
            memory_capacity_mib: memory,
            cpu_reserved: 2,
            memory_reserved_mib: 4096,
            images,
        });
    }
    let mut vm_specs = Vec::with_capacity(vms);
    for _ in 0..vms {
        let host = &host_specs[random.below(hosts as u64) as usize];
        let (cpus, memory) = vm_size(random);
        vm_specs.push(VmSpec {
            host: host.id,
            cpus,
            memory_mib: memory,
            image: Some(image_name(random.skewed(IMAGES))),
            anti_affinity_group: random
                .chance(60)
                .then(|| format!("group-{}", random.below(GROUPS))),
        });
    }
    // Most images are in the cluster's image store; a few are only on the hosts holding them.
    let fetchable = (0..IMAGES)
        .filter(|index| index % 10 != 7)
        .map(image_name)
        .collect();
    Cluster {
        hosts: host_specs,
        vms: vm_specs,
        fetchable,
    }
}

fn vm_size(random: &mut Random) -> (u32, u64) {
    match random.below(10) {
        0..=3 => (1, 2048),
        4..=6 => (2, 4096),
        7..=8 => (4, 8192),
        _ => (8, 32768),
    }
}

fn requests(count: usize, random: &mut Random) -> Vec<Request> {
    (0..count)
        .map(|_| {
            let (cpus, memory_mib) = vm_size(random);
            let mut required_labels = BTreeMap::new();
            if random.chance(30) {
                required_labels.insert(
                    "zone".to_string(),
                    ZONES[random.below(ZONES.len() as u64) as usize].to_string(),
                );
            }
            if random.chance(20) {
                required_labels.insert("disk".to_string(), "ssd".to_string());
            }
            if random.chance(2) {
                required_labels.insert("gpu".to_string(), "a100".to_string());
            }
            Request {
                cpus,
                memory_mib,
                image: Some(image_name(random.skewed(IMAGES))),
                required_labels,
                anti_affinity_group: random
                    .chance(60)
                    .then(|| format!("group-{}", random.below(GROUPS))),
                pinned_host: None,
            }
        })
        .collect()
}

struct Row {
    implementation: &'static str,
    strategy: Strategy,
    apply: bool,
    decisions: usize,
    placed: usize,
    elapsed: Duration,
}

impl Row {
    fn per_second(&self) -> f64 {
        self.decisions as f64 / self.elapsed.as_secs_f64()
    }
}

fn policy(strategy: Strategy) -> Policy {
    Policy {
        strategy,
        cpu_overcommit: 4.0,
        memory_overcommit: 1.0,
        image_locality_weight: 0.2,
        anti_affinity: AntiAffinityMode::Hard,
        anti_affinity_weight: 0.5,
    }
}

fn run_indexed(snapshot: &Snapshot, requests: &[Request], strategy: Strategy, apply: bool) -> Row {
    let policy = policy(strategy);
    let mut snapshot = snapshot.clone();
    let mut placed = 0;
    let start = Instant::now();
    for request in requests {
        let placement = snapshot.place(request, &policy).expect("valid request");
        if let Placement::Decision(decision) = &placement {
            placed += 1;
            if apply {
                snapshot
                    .add_vm(request.to_vm(decision.host_id))
                    .expect("chosen host exists");
            }
        }
        black_box(&placement);
    }
    Row {
        implementation: "indexed snapshot",
        strategy,
        apply,
        decisions: requests.len(),
        placed,
        elapsed: start.elapsed(),
    }
}

fn run_naive(cluster: &Cluster, requests: &[Request], strategy: Strategy, apply: bool) -> Row {
    let policy = policy(strategy);
    let mut naive = NaiveCluster {
        hosts: cluster.hosts.clone(),
        vms: cluster.vms.clone(),
        fetchable_images: cluster.fetchable.clone(),
    };
    let mut placed = 0;
    let start = Instant::now();
    for request in requests {
        let placement = naive.place(request, &policy).expect("valid request");
        if let Placement::Decision(decision) = &placement {
            placed += 1;
            if apply {
                naive.vms.push(request.to_vm(decision.host_id));
            }
        }
        black_box(&placement);
    }
    Row {
        implementation: "naive (recompute per request)",
        strategy,
        apply,
        decisions: requests.len(),
        placed,
        elapsed: start.elapsed(),
    }
}

fn main() {
    let hosts = env_usize("PLACEMENT_BENCH_HOSTS", 10_000);
    let vms = env_usize("PLACEMENT_BENCH_VMS", 100_000);
    let decisions = env_usize("PLACEMENT_BENCH_DECISIONS", 20_000);
    let naive_decisions = env_usize("PLACEMENT_BENCH_NAIVE_DECISIONS", 300);
    let mut random = Random(0x6e6f_7661_6372_6f6e);
    let cluster = build_cluster(hosts, vms, &mut random);
    let requests = requests(decisions, &mut random);

    let build_start = Instant::now();
    let snapshot = Snapshot::new(
        cluster.hosts.clone(),
        cluster.vms.clone(),
        cluster.fetchable.iter().cloned(),
    )
    .expect("valid cluster");
    let build_time = build_start.elapsed();

    // The two implementations must agree before their speeds mean anything.
    let naive = NaiveCluster {
        hosts: cluster.hosts.clone(),
        vms: cluster.vms.clone(),
        fetchable_images: cluster.fetchable.clone(),
    };
    for request in requests.iter().take(20) {
        for strategy in [Strategy::Spread, Strategy::BinPack] {
            assert_eq!(
                snapshot.place(request, &policy(strategy)).expect("place"),
                naive.place(request, &policy(strategy)).expect("place"),
                "indexed and naive placement disagree"
            );
        }
    }

    let mut rows = Vec::new();
    for strategy in [Strategy::Spread, Strategy::BinPack] {
        for apply in [false, true] {
            rows.push(run_indexed(&snapshot, &requests, strategy, apply));
            rows.push(run_naive(
                &cluster,
                &requests[..naive_decisions.min(requests.len())],
                strategy,
                apply,
            ));
        }
    }

    println!(
        "placement: {hosts} hosts, {vms} VMs, {} requests (naive: {}); snapshot built in {:.1} ms; one thread",
        requests.len(),
        naive_decisions.min(requests.len()),
        build_time.as_secs_f64() * 1000.0
    );
    println!();
    println!(
        "| implementation                | strategy | apply decision | decisions | placed | decisions/s | µs/decision | speed-up |"
    );
    println!(
        "|-------------------------------|----------|----------------|-----------|--------|-------------|-------------|----------|"
    );
    for pair in rows.chunks(2) {
        let baseline = pair[1].per_second();
        for row in pair {
            println!(
                "| {:<29} | {:<8} | {:<14} | {:>9} | {:>6} | {:>11.0} | {:>11.1} | {:>7.1}× |",
                row.implementation,
                row.strategy.to_string(),
                if row.apply { "yes" } else { "no" },
                row.decisions,
                row.placed,
                row.per_second(),
                1e6 / row.per_second(),
                row.per_second() / baseline,
            );
        }
    }
}
