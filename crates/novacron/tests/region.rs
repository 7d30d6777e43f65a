//! A region of three real `novacron serve` processes, each in its own network namespace on a
//! bridge (linkemu's `Region`: a switch namespace, veth pairs, unique names, torn down on drop),
//! formed with `cluster init`, `cluster token create` and `cluster join` through the CLI. Then:
//! the leader is killed with `kill -9` and writes continue through a survivor; a minority host's
//! link goes down and it cannot write (a clear error within a bounded time, not a hang) while the
//! majority can; after the link is back it catches up. Five hosts record a history of store
//! reads and writes (the scratch keyspace) through a killed leader and a cut-off minority, and
//! the project's Wing–Gong checker (`novacron-lincheck`) finds it linearizable. Every wait polls
//! with a deadline.

mod common;

use common::{TestHost, guest, last_workload_tick, poll};
use novacron_linkemu::Region;
use serde_json::Value;
use std::time::{Duration, Instant};

const RAFT_PORT: u16 = 7182;

/// Three hosts, `host-0` .. `host-2`, with `serve` running (not yet in a region).
struct Hosts {
    // Fields drop in order: the hosts' `serve` processes end before the namespaces go.
    hosts: Vec<TestHost>,
    region: novacron_linkemu::RunningRegion,
}

impl Hosts {
    fn start(count: usize) -> Hosts {
        Self::start_with(count, &[])
    }

    fn start_with(count: usize, serve_arguments: &[&str]) -> Hosts {
        Self::start_shaped(count, serve_arguments, &[])
    }

    /// Hosts whose bridge ports are shaped (`shapes`: host index and shape).
    fn start_shaped(
        count: usize,
        serve_arguments: &[&str],
        shapes: &[(usize, novacron_linkemu::HostLinkShape)],
    ) -> Hosts {
        let serve_arguments: Vec<String> = serve_arguments
            .iter()
            .map(|argument| argument.to_string())
            .collect();
        Self::start_each(count, |_| serve_arguments.clone(), shapes)
    }

    /// Hosts whose `serve` gets `serve_arguments(index)` on top of the usual ones.
    fn start_each(
        count: usize,
        serve_arguments: impl Fn(usize) -> Vec<String>,
        shapes: &[(usize, novacron_linkemu::HostLinkShape)],
    ) -> Hosts {
        let mut builder = Region::builder().name_prefix("ncregion").hosts(count);
        for (index, shape) in shapes {
            builder = builder.shape_host(*index, shape.clone());
        }
        let region = builder
            .spawn()
            .expect("create the namespaces (the test needs root)");
        let mut hosts = Vec::new();
        for index in 0..count {
            let host = region.host(index).expect("host");
            let mut test_host =
                TestHost::in_namespace(host.namespace(), &host.address().to_string());
            // Every host carries a zone label: host-0 is alone in zone a, the rest are in b.
            let zone = if index == 0 { "zone=a" } else { "zone=b" };
            test_host.extra_args.extend([
                "--host-name".to_string(),
                format!("host-{index}"),
                "--label".to_string(),
                zone.to_string(),
            ]);
            test_host.extra_args.extend(serve_arguments(index));
            test_host.spawn_serve();
            hosts.push(test_host);
        }
        Hosts { hosts, region }
    }

    fn raft_address(&self, index: usize) -> String {
        format!("{}:{RAFT_PORT}", self.hosts[index].bind_ip)
    }

    fn raft_arguments(&self, index: usize) -> Vec<String> {
        let address = self.raft_address(index);
        vec![
            "--raft-listen".into(),
            address.clone(),
            "--advertise".into(),
            address,
        ]
    }

    fn set_link_up(&self, index: usize, up: bool) {
        self.region
            .set_host_link_up(index, up)
            .expect("set the host's bridge port");
    }
}

fn cluster_list(host: &TestHost) -> Value {
    host.json(&["cluster", "list"])
}

/// `cluster list`, or `None` while the host cannot answer (a poll tolerates that).
fn try_cluster_list(host: &TestHost) -> Option<Value> {
    let output = host.cli(&["cluster", "list", "--output", "json"]);
    if !output.status.success() {
        eprintln!(
            "cluster list not answered yet: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        return None;
    }
    serde_json::from_slice(&output.stdout).ok()
}

/// `cluster list` as (host name, role, health) triples, by node id.
fn roles(list: &Value) -> Vec<(String, String, String)> {
    list["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .map(|host| {
            (
                host["host"].as_str().unwrap_or_default().to_string(),
                host["role"].as_str().unwrap_or_default().to_string(),
                host["health"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// A diskless VM booting the test guest's kernel, created stopped: a write that needs no image.
/// The fault scenarios pin it (`--host`): placement may still pick a host that died less than
/// the heartbeat limit ago, and such a VM would wait in `creating` until its host is back.
fn create_stopped_vm(host: &TestHost, name: &str, on: Option<&str>) -> std::process::Output {
    create_vm_with_memory(host, name, on, "128MiB", &[])
}

/// `vm create NAME --no-start` of the test guest with `memory`, on `on` or where placement
/// chooses, with `extra` arguments.
fn create_vm_with_memory(
    host: &TestHost,
    name: &str,
    on: Option<&str>,
    memory: &str,
    extra: &[&str],
) -> std::process::Output {
    let guest = guest();
    let mut arguments = vec![
        "vm".to_string(),
        "create".into(),
        name.into(),
        "--memory".into(),
        memory.into(),
        "--kernel".into(),
        guest.kernel.display().to_string(),
        "--initrd".into(),
        guest.initrd.display().to_string(),
        "--no-start".into(),
        "--wait-timeout".into(),
        "60".into(),
    ];
    if let Some(on) = on {
        arguments.extend(["--host".into(), on.into()]);
    }
    arguments.extend(extra.iter().map(|argument| argument.to_string()));
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    host.cli(&arguments)
}

/// Creates `name` from the test guest (256 MiB) with kernel command line `cmdline`, on `on` or
/// where placement puts it, waits until it runs there and returns its record.
fn create_running_vm(host: &TestHost, name: &str, on: Option<&str>, cmdline: &str) -> Value {
    create_running_vm_with(host, name, on, cmdline, &[])
}

/// [`create_running_vm`] with more `vm create` arguments.
fn create_running_vm_with(
    host: &TestHost,
    name: &str,
    on: Option<&str>,
    cmdline: &str,
    more: &[&str],
) -> Value {
    let guest = guest();
    let kernel = guest.kernel.display().to_string();
    let initrd = guest.initrd.display().to_string();
    let mut arguments = vec![
        "vm",
        "create",
        name,
        "--memory",
        "256MiB",
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--cmdline",
        cmdline,
        "--wait-timeout",
        "90",
    ];
    if let Some(on) = on {
        arguments.extend(["--host", on]);
    }
    arguments.extend(more);
    let created = host.cli(&arguments);
    assert_success(&created, &format!("vm create {name}"), host);
    let owner = host.vm(name)["status"]["host"]
        .as_str()
        .expect("the assigned host")
        .to_string();
    wait_until_owned_by(host, name, &owner, "running")
}

/// Creates a VM on `host` (pinned to it) booting the test guest with a local disk on the image
/// `base` (imported there before) and the kernel command line `cmdline`, which should have
/// the guest mark its disk (`novacron.diskmark=NCMARK42`); waits for the mark. Returns the
/// VM's uuid.
fn create_disk_vm(host: &TestHost, name: &str, cmdline: &str) -> String {
    create_disk_vm_with(host, name, cmdline, &[])
}

/// [`create_disk_vm`] with more `vm create` arguments.
fn create_disk_vm_with(host: &TestHost, name: &str, cmdline: &str, more: &[&str]) -> String {
    let mut arguments = TestHost::guest_vm_arguments(name, "base");
    let position = arguments
        .iter()
        .position(|argument| argument == "--cmdline")
        .expect("cmdline argument")
        + 1;
    arguments[position] = cmdline.into();
    arguments.extend(["--host".to_string(), host.name().to_string()]);
    arguments.extend(more.iter().map(|argument| argument.to_string()));
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    assert_success(&host.cli(&arguments), &format!("vm create {name}"), host);
    host.wait_for_console(name, "NOVACRON-DISK-MARKED NCMARK42");
    host.vm(name)["uuid"].as_str().expect("uuid").to_string()
}

/// Host 0's outbound port shaped to 40 Mbit/s with 5 ms of delay: long enough migrations to
/// interrupt or to outrun.
fn forty_mbit_from_host_0() -> Vec<(usize, novacron_linkemu::HostLinkShape)> {
    use novacron_linkemu::{Capacity, DirectionShape, HostLinkShape};
    let shape = HostLinkShape {
        outbound: DirectionShape {
            capacity: Capacity::BitsPerSecond(40_000_000),
            delay: Duration::from_millis(5),
            ..DirectionShape::default()
        },
        inbound: DirectionShape::default(),
    };
    vec![(0, shape)]
}

fn assert_success(output: &std::process::Output, what: &str, host: &TestHost) {
    assert!(
        output.status.success(),
        "{what} failed ({}): {}\nserve log tail:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        common::tail(&host.serve_log(), 4000)
    );
}

/// Forms the region: host-0 inits, the others join with one-time tokens; waits for three
/// voters (the leader's voter policy promotes the learners).
fn form_region(hosts: &Hosts) {
    form_region_of(hosts, hosts.hosts.len());
}

/// Forms a region of the first `count` hosts (the others stay alone).
fn form_region_of(hosts: &Hosts, count: usize) {
    let first = &hosts.hosts[0];
    let mut init = vec!["cluster", "init", "--name", "test-region"];
    let raft = hosts.raft_arguments(0);
    init.extend(raft.iter().map(String::as_str));
    let created = first.json(&init);
    assert_eq!(created["region"], "test-region", "{created}");
    let first_address = hosts.raft_address(0);

    for index in 1..count {
        let token = first.json(&["cluster", "token", "create", "--ttl", "10m"]);
        let token = token["token"].as_str().expect("token text").to_string();
        let raft = hosts.raft_arguments(index);
        let mut join = vec!["cluster", "join", &first_address, "--join-token", &token];
        join.extend(raft.iter().map(String::as_str));
        let joined = hosts.hosts[index].json(&join);
        let me = joined["hosts"]
            .as_array()
            .expect("hosts")
            .iter()
            .find(|host| host["node_id"] == joined["node_id"])
            .cloned()
            .expect("the joined host lists itself");
        assert_eq!(me["host"], format!("host-{index}"), "{joined}");

        // The token was one-time: a second use is refused with a clear error.
        if index == 1 {
            let raft = hosts.raft_arguments(2);
            let mut again = vec!["cluster", "join", &first_address, "--join-token", &token];
            again.extend(raft.iter().map(String::as_str));
            let output = hosts.hosts[2].cli(&again);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{stderr}");
            assert!(stderr.contains("already used"), "{stderr}");
        }
    }

    // The voter policy: 1 voter alone, 3 for 3 or 4 hosts, 5 from 5 hosts; the rest learners.
    let voters_wanted = match count {
        0..=2 => 1,
        3 | 4 => 3,
        _ => 5,
    };
    let learners_wanted = count - voters_wanted;
    poll(
        "the voters (and the learners) with fresh heartbeats",
        Duration::from_secs(60),
        || {
            let list = try_cluster_list(first)?;
            let roles = roles(&list);
            let leaders = roles.iter().filter(|(_, role, _)| role == "leader").count();
            let voters = roles.iter().filter(|(_, role, _)| role == "voter").count();
            let learners = roles
                .iter()
                .filter(|(_, role, _)| role == "learner")
                .count();
            let healthy = roles.iter().all(|(_, _, health)| health == "ok");
            // A voter change half-way (joint consensus) counts old and new voters together:
            // a test that kills voters next would find the region stalled.
            let settled = list["membership_changing"] == false;
            (roles.len() == count
                && settled
                && leaders == 1
                && voters == voters_wanted - 1
                && learners == learners_wanted
                && healthy)
                .then_some(())
        },
    );
}

fn leader_index(hosts: &Hosts, asked: usize) -> usize {
    let list = cluster_list(&hosts.hosts[asked]);
    let leader = list["leader_id"].as_u64().expect("a leader");
    let name = list["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .find(|host| host["node_id"] == leader)
        .and_then(|host| host["host"].as_str())
        .expect("the leader's record")
        .to_string();
    name.trim_start_matches("host-")
        .parse()
        .expect("host index")
}

#[test]
fn a_three_host_region_survives_a_killed_leader_and_a_partitioned_minority() {
    let started = Instant::now();
    let mut hosts = Hosts::start(3);

    // Bad input first: a garbage token and a token request outside a region.
    let stderr = hosts.hosts[1].fails(
        &[
            "cluster",
            "join",
            &hosts.raft_address(0),
            "--join-token",
            "nope",
        ],
        2,
    );
    assert!(stderr.contains("invalid join token"), "{stderr}");
    let stderr = hosts.hosts[0].fails(&["cluster", "token", "create"], 2);
    assert!(stderr.contains("not in a region"), "{stderr}");

    form_region(&hosts);
    eprintln!("region formed after {:?}", started.elapsed());
    let stderr = hosts.hosts[1].fails(&["cluster", "init"], 5);
    assert!(stderr.contains("already node"), "{stderr}");
    // Every member gets the cluster CA within a heartbeat; its tokens name its own listener.
    let token = poll("a join token from host-1", Duration::from_secs(30), || {
        let output = hosts.hosts[1].cli(&["cluster", "token", "create", "--output", "json"]);
        serde_json::from_slice::<Value>(&output.stdout).ok()
    });
    assert_eq!(token["join_address"], hosts.raft_address(1), "{token}");
    let stderr = hosts.hosts[0].fails(&["cluster", "token", "create", "--ttl", "8d"], 2);
    assert!(stderr.contains("out of range"), "{stderr}");
    let stderr = hosts.hosts[0].fails(&["cluster", "remove", "no-such-host"], 4);
    assert!(stderr.contains("not in the region"), "{stderr}");

    // Any host serves any call; a VM runs where it is assigned.
    let created = create_stopped_vm(&hosts.hosts[0], "pinned", Some("host-2"));
    assert_success(
        &created,
        "vm create --host host-2 through host-0",
        &hosts.hosts[0],
    );
    let vm = hosts.hosts[1].vm("pinned");
    assert_eq!(vm["status"]["host"], "host-2");
    assert_eq!(vm["status"]["state"], "stopped");
    let uuid = vm["uuid"].as_str().expect("uuid").to_string();
    assert!(
        hosts.hosts[2].vm_directory(&uuid).exists(),
        "host-2 made the vm"
    );
    assert!(
        !hosts.hosts[0].vm_directory(&uuid).exists(),
        "host-0 did not"
    );
    let stderr = hosts.hosts[0].fails(&["cluster", "remove", "host-2"], 6);
    assert!(stderr.contains("pinned"), "{stderr}");
    let stderr = hosts.hosts[0].fails(&["vm", "logs", "pinned"], 6);
    assert!(stderr.contains("runs on host host-2"), "{stderr}");

    // kill -9 of the leader: a new leader, writes continue through a survivor.
    let old_leader = leader_index(&hosts, 0);
    let killed_at = Instant::now();
    hosts.hosts[old_leader].kill_serve();
    let survivor = (old_leader + 1) % 3;
    let new_leader = poll("a new leader", Duration::from_secs(30), || {
        let list = try_cluster_list(&hosts.hosts[survivor])?;
        let leader = list["leader_id"].as_u64()?;
        (leader != old_leader as u64 + 1).then_some(leader)
    });
    let created = create_stopped_vm(
        &hosts.hosts[survivor],
        "after-failover",
        Some(&format!("host-{survivor}")),
    );
    assert_success(
        &created,
        "vm create after the leader died",
        &hosts.hosts[survivor],
    );
    eprintln!(
        "leader host-{old_leader} killed; node {new_leader} leads; write done {:?} after the kill",
        killed_at.elapsed()
    );
    // The dead host is shown as unreachable once its heartbeat is older than the limit.
    poll(
        "the killed host shown unreachable",
        Duration::from_secs(40),
        || {
            let list = try_cluster_list(&hosts.hosts[survivor])?;
            roles(&list)
                .into_iter()
                .any(|(name, _, health)| {
                    name == format!("host-{old_leader}") && health == "unreachable"
                })
                .then_some(())
        },
    );

    // A VM created while the host is down, placed by the scheduler: it lands on a live host
    // and boots there, once.
    let during = create_running_vm(
        &hosts.hosts[survivor],
        "during-outage",
        None,
        "console=ttyS0",
    );
    assert_ne!(
        during["status"]["host"],
        format!("host-{old_leader}"),
        "placed on a live host: {during}"
    );
    let during_uuid = during["uuid"].as_str().expect("uuid").to_string();
    assert_eq!(qemu_processes(&during_uuid), 1, "booted once");

    // It comes back (same data directory) and catches up.
    hosts.hosts[old_leader].spawn_serve();
    poll(
        "the restarted host to see the write made while it was down",
        Duration::from_secs(30),
        || {
            let output = hosts.hosts[old_leader].cli(&["vm", "show", "after-failover"]);
            output.status.success().then_some(())
        },
    );
    assert_eq!(
        qemu_processes(&during_uuid),
        1,
        "still one QEMU for the VM made during the outage after its host came back"
    );

    // A minority host loses its link: it cannot write (clear error, bounded time), the majority
    // continues, and after the link is back it catches up.
    let leader = leader_index(&hosts, survivor);
    let cut = (leader + 1) % 3;
    let majority = (leader + 2) % 3;
    hosts.set_link_up(cut, false);
    // At once, while the cut-off host still believes in its leader: a plain forwarded write (no
    // read before it) is queued on the connection to the leader, fails after the request
    // timeout, and must not be applied when the link comes back (the connection is reset,
    // dropping the unsent request). Later, with no leader known, nothing is sent at all.
    let fingerprint = format!("sha256:{}", "ab".repeat(32));
    let attempt_started = Instant::now();
    let output = hosts.hosts[cut].cli(&["peer", "trust", &fingerprint, "--name", "cut-off"]);
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(output.status.code(), Some(8), "{stderr}");
    eprintln!(
        "forwarded write on the cut-off host refused after {:?}: {stderr}",
        attempt_started.elapsed()
    );
    let attempt_started = Instant::now();
    let output = create_stopped_vm(
        &hosts.hosts[cut],
        "from-the-minority",
        Some(&format!("host-{cut}")),
    );
    let took = attempt_started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(
        output.status.code(),
        Some(8),
        "a write on a cut-off host fails as unavailable; stderr: {stderr}"
    );
    assert!(
        stderr.contains("leader") || stderr.contains("cluster peer node"),
        "the error says why: {stderr}"
    );
    assert!(
        took < Duration::from_secs(30),
        "the write failed after {took:?}, not within a bounded time"
    );
    eprintln!("write on the cut-off host-{cut} refused after {took:?}: {stderr}");
    let created = create_stopped_vm(
        &hosts.hosts[majority],
        "during-partition",
        Some(&format!("host-{majority}")),
    );
    assert_success(
        &created,
        "vm create on the majority",
        &hosts.hosts[majority],
    );

    hosts.set_link_up(cut, true);
    poll(
        "the healed host to see the majority's write",
        Duration::from_secs(40),
        || {
            let output = hosts.hosts[cut].cli(&["vm", "show", "during-partition"]);
            output.status.success().then_some(())
        },
    );
    let created = create_stopped_vm(
        &hosts.hosts[cut],
        "after-healing",
        Some(&format!("host-{cut}")),
    );
    assert_success(&created, "vm create on the healed host", &hosts.hosts[cut]);
    let names: Vec<String> = hosts.hosts[majority]
        .json(&["vm", "list"])
        .as_array()
        .expect("vms")
        .iter()
        .map(|vm| vm["spec"]["name"].as_str().unwrap_or_default().to_string())
        .collect();
    for name in [
        "pinned",
        "after-failover",
        "during-partition",
        "after-healing",
    ] {
        assert!(names.iter().any(|have| have == name), "{name} in {names:?}");
    }
    // The refused write: when no leader was reached nothing was sent and nothing may appear;
    // when it was sent before the link went down, the error said it may or may not be applied
    // (TCP delivers it after healing), and if it was, the VM is whole (its host made it).
    let applied = names.iter().any(|have| have == "from-the-minority");
    if stderr.contains("no reachable raft leader") {
        assert!(!applied, "nothing was sent, yet the vm exists: {names:?}");
    } else {
        assert!(
            stderr.contains("may or may not have been applied"),
            "{stderr}"
        );
    }
    if applied {
        hosts.hosts[majority].wait_for_state("from-the-minority", "stopped");
    }
    eprintln!("the refused write was applied later: {applied}");
    let peers = hosts.hosts[majority].json(&["peer", "list"]);
    assert!(
        !peers.to_string().contains(&fingerprint),
        "a forwarded write reported as failed reached the leader after healing: {peers}"
    );
    eprintln!("whole scenario took {:?}", started.elapsed());
}

#[test]
fn placement_spreads_vms_explains_the_choice_and_a_refusal_names_each_host() {
    let hosts = Hosts::start(3);
    form_region(&hosts);
    let first = &hosts.hosts[0];
    let list = cluster_list(first);
    let memory_mib = list["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .filter_map(|host| host["heartbeat"]["memory_bytes"].as_u64())
        .min()
        .expect("capacities from heartbeats")
        >> 20;
    // Each VM takes 60 % of a host's memory: one per host, and a fourth fits nowhere.
    let big = format!("{}MiB", memory_mib * 6 / 10);
    let mut placed = Vec::new();
    for name in ["big-1", "big-2", "big-3"] {
        let output = create_vm_with_memory(first, name, None, &big, &[]);
        assert_success(&output, &format!("vm create {name} without --host"), first);
        let vm = first.vm(name);
        let host = vm["status"]["host"]
            .as_str()
            .expect("assigned host")
            .to_string();
        let explanation = vm["placement"]
            .as_str()
            .expect("placement explanation")
            .to_string();
        assert!(
            explanation.starts_with(&format!("{host} (id "))
                && explanation.contains("won with score"),
            "{explanation}"
        );
        let shown = first.ok(&["vm", "show", name]);
        assert!(
            shown.contains("won with score"),
            "vm show prints it: {shown}"
        );
        eprintln!("{name} placed: {explanation}");
        placed.push(host);
    }
    placed.sort();
    assert_eq!(
        placed,
        ["host-0", "host-1", "host-2"],
        "spread over every host"
    );

    let output = create_vm_with_memory(first, "big-4", None, &big, &[]);
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(
        output.status.code(),
        Some(7),
        "refused as insufficient: {stderr}"
    );
    for host in ["host-0", "host-1", "host-2"] {
        assert!(
            stderr.contains(&format!("{host}: ")),
            "{host} and its reason in: {stderr}"
        );
    }
    assert!(stderr.contains("memory"), "{stderr}");
    eprintln!("refusal: {stderr}");
    let output = first.cli(&["vm", "show", "big-4"]);
    assert_eq!(
        output.status.code(),
        Some(4),
        "a refused create leaves nothing"
    );

    // Host labels (`serve --label`): host-0 alone is in zone a. They show in `cluster list`.
    let listed = first.ok(&["cluster", "list"]);
    assert!(
        listed.contains("LABELS") && listed.contains("zone=a") && listed.contains("zone=b"),
        "{listed}"
    );
    let output = create_vm_with_memory(
        first,
        "in-a",
        None,
        "128MiB",
        &["--require-label", "zone=a"],
    );
    assert_success(&output, "vm create --require-label zone=a", first);
    let vm = first.vm("in-a");
    assert_eq!(vm["status"]["host"], "host-0", "{vm}");
    let shown = first.ok(&["vm", "show", "in-a"]);
    assert!(
        shown.contains("zone=a"),
        "vm show names the required label: {shown}"
    );
    // The label stays with the VM: the only host in zone a is the one it is on.
    let stderr = first.fails(&["vm", "migrate", "in-a"], 7);
    assert!(stderr.contains("labels"), "{stderr}");
    let output = create_vm_with_memory(
        first,
        "nowhere",
        None,
        "128MiB",
        &["--require-label", "zone=c"],
    );
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(output.status.code(), Some(7), "no host in zone c: {stderr}");
    for host in ["host-0", "host-1", "host-2"] {
        assert!(stderr.contains(&format!("{host}: ")), "{host} in: {stderr}");
    }
    assert!(stderr.contains("zone"), "{stderr}");
    let output = create_vm_with_memory(
        first,
        "badlabel",
        None,
        "128MiB",
        &["--require-label", "zone"],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("KEY=VALUE"));

    // Anti-affinity: three VMs of one group land on three hosts; a fourth fits nowhere.
    let mut group_hosts = Vec::new();
    for name in ["web-1", "web-2", "web-3"] {
        let output =
            create_vm_with_memory(first, name, None, "128MiB", &["--anti-affinity", "web"]);
        assert_success(
            &output,
            &format!("vm create {name} --anti-affinity web"),
            first,
        );
        group_hosts.push(
            first.vm(name)["status"]["host"]
                .as_str()
                .expect("host")
                .to_string(),
        );
    }
    group_hosts.sort();
    assert_eq!(group_hosts, ["host-0", "host-1", "host-2"], "one per host");
    let output = create_vm_with_memory(first, "web-4", None, "128MiB", &["--anti-affinity", "web"]);
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(output.status.code(), Some(7), "{stderr}");
    assert!(
        stderr.contains("anti-affinity") || stderr.contains("web"),
        "{stderr}"
    );
    eprintln!("anti-affinity refusal: {stderr}");
    let output = first.cli(&["vm", "show", "web-4"]);
    assert_eq!(
        output.status.code(),
        Some(4),
        "a refused create leaves nothing"
    );
    let output = create_vm_with_memory(
        first,
        "badgroup",
        None,
        "128MiB",
        &["--anti-affinity", "Web"],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("anti-affinity group"));

    // The region's placement policy: shown, checked, and obeyed by the next placements.
    let shown = first.ok(&["cluster", "policy", "show"]);
    assert!(
        shown.contains("spread") && shown.contains("cpu overcommit"),
        "{shown}"
    );
    let stderr = first.fails(&["cluster", "policy", "set"], 2);
    assert!(stderr.contains("nothing to change"), "{stderr}");
    let stderr = first.fails(&["cluster", "policy", "set", "--cpu-overcommit", "0"], 2);
    assert!(stderr.contains("cpu overcommit"), "{stderr}");
    // Memory overcommitted twice: the VM refused above for memory now fits.
    first.ok(&["cluster", "policy", "set", "--memory-overcommit", "2"]);
    let output = create_vm_with_memory(first, "big-4", None, &big, &[]);
    assert_success(&output, "vm create big-4 with memory overcommit 2", first);
    let big_4_host = first.vm("big-4")["status"]["host"].clone();
    // Bin-pack: small VMs go to the fullest host that fits, the one big-4 went to.
    let policy = first.json(&["cluster", "policy", "set", "--strategy", "bin-pack"]);
    assert_eq!(policy["strategy"], "bin-pack", "{policy}");
    assert_eq!(
        policy["memory_overcommit"], 2.0,
        "other settings kept: {policy}"
    );
    for name in ["pack-1", "pack-2"] {
        let output = create_vm_with_memory(first, name, None, "128MiB", &[]);
        assert_success(&output, &format!("vm create {name} bin-packed"), first);
        assert_eq!(first.vm(name)["status"]["host"], big_4_host, "{name}");
    }
    // Soft anti-affinity: a fourth VM of the group is placed, on a host with one already.
    first.ok(&["cluster", "policy", "set", "--anti-affinity", "soft"]);
    let output = create_vm_with_memory(first, "web-4", None, "128MiB", &["--anti-affinity", "web"]);
    assert_success(&output, "vm create web-4 with soft anti-affinity", first);
    let policy = first.json(&["cluster", "policy", "reset"]);
    assert_eq!(policy["strategy"], "spread", "{policy}");
    assert_eq!(policy["anti_affinity"], "hard", "{policy}");
}

/// Hosts 20 ms apart each way (40 ms round trips, as between sites): the leader measures its
/// append round trips and recommends a slower raft timing (issue 4's ACP rule), every host runs
/// on it without restarting, and the region then replaces a killed leader and keeps writing.
#[test]
fn a_region_over_forty_ms_links_takes_a_slower_raft_timing_without_a_restart() {
    use novacron_linkemu::{DirectionShape, HostLinkShape};
    let shapes: Vec<(usize, HostLinkShape)> = (0..3)
        .map(|index| {
            let shape = HostLinkShape {
                outbound: DirectionShape {
                    delay: Duration::from_millis(20),
                    ..DirectionShape::default()
                },
                inbound: DirectionShape::default(),
            };
            (index, shape)
        })
        .collect();
    let mut hosts = Hosts::start_shaped(3, &[], &shapes);
    form_region(&hosts);
    let store_opens = |host: &TestHost| host.serve_log().matches("store opened").count();
    let opened_before: Vec<usize> = hosts.hosts.iter().map(store_opens).collect();
    let heartbeats = poll(
        "every host running raft on a timing for 40 ms round trips",
        Duration::from_secs(90),
        || {
            let list = try_cluster_list(&hosts.hosts[0])?;
            let beats: Vec<u64> = list["hosts"]
                .as_array()?
                .iter()
                .filter_map(|host| host["heartbeat"]["raft_timing"]["heartbeat_ms"].as_u64())
                .collect();
            (beats.len() == 3 && beats.iter().all(|ms| *ms >= 80)).then_some(beats)
        },
    );
    eprintln!("raft heartbeats over 40 ms links: {heartbeats:?} ms");
    for (index, host) in hosts.hosts.iter().enumerate() {
        assert_eq!(
            store_opens(host),
            opened_before[index],
            "host-{index} reopened its store to apply the timing"
        );
        assert!(
            host.serve_log()
                .contains("raft runs on the region's new timing"),
            "host-{index}: {}",
            common::tail(&host.serve_log(), 2000)
        );
    }
    let leader = leader_index(&hosts, 0);
    hosts.hosts[leader].kill_serve();
    let survivor = (0..3).find(|index| *index != leader).expect("a survivor");
    let dead = format!("host-{leader}");
    poll(
        "a new leader among the survivors",
        Duration::from_secs(60),
        || {
            let list = try_cluster_list(&hosts.hosts[survivor])?;
            let roles = roles(&list);
            roles
                .iter()
                .any(|(name, role, _)| role == "leader" && *name != dead)
                .then_some(())
        },
    );
    let created = create_stopped_vm(
        &hosts.hosts[survivor],
        "after-failover",
        Some(&format!("host-{survivor}")),
    );
    assert_success(&created, "vm create after failover", &hosts.hosts[survivor]);
}

/// A region of a dozen hosts: five voters and seven learners, all healthy; two voters killed
/// at once (a minority of the voters) are replaced by learners, and VMs are still placed and
/// created from any host.
#[test]
fn a_dozen_hosts_form_a_region_and_lose_two_voters_at_once() {
    const HOSTS: usize = 12;
    let mut hosts = Hosts::start_with(HOSTS, &["--voter-loss-grace", "3"]);
    form_region(&hosts);
    let before = roles(&cluster_list(&hosts.hosts[0]));
    let leader = leader_index(&hosts, 0);
    let victims: Vec<usize> = (0..HOSTS)
        .filter(|index| {
            *index != leader
                && before
                    .iter()
                    .any(|(name, role, _)| *name == format!("host-{index}") && role == "voter")
        })
        .take(2)
        .collect();
    assert_eq!(victims.len(), 2, "{before:?}");
    for victim in &victims {
        hosts.hosts[*victim].kill_serve();
    }
    let survivor = (0..HOSTS)
        .find(|index| !victims.contains(index) && *index != leader)
        .expect("a survivor");
    // Placement leaves out a host only once its heartbeat is stale (`cluster list` says
    // unreachable), which may come after the region replaced it as a voter (3 s of silence).
    poll(
        "five healthy voters again, the dead ones demoted and unreachable",
        Duration::from_secs(90),
        || {
            let roles = roles(&try_cluster_list(&hosts.hosts[survivor])?);
            let healthy_voters = roles
                .iter()
                .filter(|(_, role, health)| (role == "voter" || role == "leader") && health == "ok")
                .count();
            let demoted = victims.iter().all(|victim| {
                roles.iter().any(|(name, role, health)| {
                    *name == format!("host-{victim}")
                        && role == "learner"
                        && health == "unreachable"
                })
            });
            (healthy_voters == 5 && demoted).then_some(())
        },
    );
    for (index, asked) in [survivor, HOSTS - 1].into_iter().enumerate() {
        if victims.contains(&asked) {
            continue;
        }
        let name = format!("placed-{index}");
        let created = create_stopped_vm(&hosts.hosts[asked], &name, None);
        assert_success(
            &created,
            "vm create after losing two voters",
            &hosts.hosts[asked],
        );
    }
}

#[test]
fn a_dead_voter_is_replaced_by_a_healthy_learner() {
    let mut hosts = Hosts::start_with(4, &["--voter-loss-grace", "3"]);
    form_region(&hosts);
    let list = cluster_list(&hosts.hosts[0]);
    let before = roles(&list);
    let learner = before
        .iter()
        .find(|(_, role, _)| role == "learner")
        .map(|(name, _, _)| name.clone())
        .expect("a learner");
    let leader = leader_index(&hosts, 0);
    let victim = (0..4)
        .find(|index| {
            *index != leader
                && before
                    .iter()
                    .any(|(name, role, _)| *name == format!("host-{index}") && role == "voter")
        })
        .expect("a voter that does not lead");
    let killed_at = Instant::now();
    hosts.hosts[victim].kill_serve();
    let survivor = (0..4).find(|index| *index != victim).expect("a survivor");
    poll(
        "the learner promoted in place of the dead voter",
        Duration::from_secs(60),
        || {
            let roles = roles(&try_cluster_list(&hosts.hosts[survivor])?);
            let role_of = |name: &str| {
                roles
                    .iter()
                    .find(|(have, _, _)| have == name)
                    .map(|(_, role, _)| role.clone())
            };
            let promoted = matches!(role_of(&learner).as_deref(), Some("voter" | "leader"));
            let demoted = role_of(&format!("host-{victim}")).as_deref() == Some("learner");
            (promoted && demoted).then_some(())
        },
    );
    eprintln!(
        "host-{victim} killed; {learner} became a voter {:?} later",
        killed_at.elapsed()
    );
    let created = create_stopped_vm(
        &hosts.hosts[survivor],
        "after-replacement",
        Some(&format!("host-{survivor}")),
    );
    assert_success(
        &created,
        "vm create after the voter was replaced",
        &hosts.hosts[survivor],
    );
}

/// Waits until the workload of `name`'s guest on `host` has run three ticks past `after` (its
/// counter continues from the source's; with the 16 MiB region the guest re-verifies every page
/// in two ticks) and asserts that no page was found corrupted. Returns the tick reached.
fn assert_workload_continues(host: &TestHost, name: &str, after: u64) -> u64 {
    let (tick, errors) = poll(
        &format!(
            "the workload of {name} past tick {after} on {}",
            host.name()
        ),
        Duration::from_secs(90),
        || last_workload_tick(&host.serial_log(name)).filter(|(tick, _)| *tick >= after + 3),
    );
    assert_eq!(
        errors,
        0,
        "guest memory verified on {} (tick {tick})",
        host.name()
    );
    tick
}

/// QEMU processes on this machine whose command line names `uuid`.
fn qemu_processes(uuid: &str) -> usize {
    let output = std::process::Command::new("pgrep")
        .args(["-f", &format!("qemu-system.*{uuid}")])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&output.stdout).lines().count()
}

/// Polls until exactly one QEMU runs the VM `uuid` and `left` (the host it moved away from)
/// holds no directory for it.
fn wait_for_one_qemu(name: &str, uuid: &str, left: &TestHost, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let qemus = qemu_processes(uuid);
        let directory_left = left.vm_directory(uuid).exists();
        if qemus == 1 && !directory_left {
            return;
        }
        if Instant::now() >= deadline {
            let processes = std::process::Command::new("pgrep")
                .args(["-a", "-f", &format!("qemu-system.*{uuid}")])
                .output()
                .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
                .unwrap_or_default();
            panic!(
                "timed out after {timeout:?} waiting for one qemu for {name} and none left on \
                 {}: {qemus} qemu processes, directory left there: {directory_left}\n{}",
                left.name(),
                common::tail(&processes, 2000)
            );
        }
        std::thread::park_timeout(Duration::from_millis(100));
    }
}

/// The VM's overlay on `host`, read as a raw disk, holds the mark the guest wrote at 1 MiB
/// (`novacron.diskmark=NCMARK42`).
fn assert_disk_marked(host: &TestHost, uuid: &str, what: &str) {
    assert_overlay_marked(
        &host.vm_directory(uuid).join("disk.qcow2"),
        &host.directory.path().join(format!("{uuid}.raw")),
        what,
    );
}

/// The overlay, converted to the raw file `raw` (removed after), holds the guest's disk mark.
fn assert_overlay_marked(overlay: &std::path::Path, raw: &std::path::Path, what: &str) {
    let converted = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(overlay)
        .arg(raw)
        .status()
        .expect("qemu-img");
    assert!(
        converted.success(),
        "qemu-img convert of {}",
        overlay.display()
    );
    let bytes = std::fs::read(raw).expect("the converted disk");
    assert_eq!(&bytes[1 << 20..(1 << 20) + 8], b"NCMARK42", "{what}");
    let _ = std::fs::remove_file(raw);
}

fn wait_until_owned_by(host: &TestHost, name: &str, owner: &str, state: &str) -> Value {
    poll(
        &format!("vm {name} {state} on {owner}"),
        Duration::from_secs(60),
        || {
            let vm = host.vm(name);
            (vm["status"]["host"] == owner
                && vm["status"]["state"] == state
                && vm["migration"].is_null()
                && vm["status"]["pid"].is_u64())
            .then_some(vm)
        },
    )
}

fn assert_moved(record: &Value, from: &str, to: &str) {
    assert_eq!(record["phase"], "completed", "{record}");
    assert_eq!(record["source"], from, "{record}");
    assert_eq!(record["destination"], to, "{record}");
    let checksum = record["stream_checksum"].as_str().expect("stream proved");
    assert!(checksum.contains("blake3"), "{checksum}");
    let stream = record["progress"]["stream_bytes"].as_u64().expect("stream");
    let wire = record["progress"]["wire_bytes"].as_u64().expect("wire");
    assert!(
        stream > 0 && wire < stream,
        "the codec sends less than qemu's stream: {wire} of {stream}"
    );
    // Both sides said where their codec's time went; after a switch to post-copy only the
    // source (the destination's guest ran before its stream ended).
    let pipeline = &record["memory_pipeline"];
    let post_copy = record["message"]
        .as_str()
        .is_some_and(|message| message.contains("post-copy"));
    for side in ["source", "destination"] {
        let timing = &pipeline[side];
        if side == "destination" && post_copy {
            assert!(timing.is_null(), "{pipeline}");
            continue;
        }
        let total: u64 = [
            "working_ms",
            "waiting_for_input_ms",
            "waiting_for_output_ms",
        ]
        .iter()
        .map(|field| timing[field].as_u64().expect("codec timing"))
        .sum();
        assert!(total > 0, "{side} codec timing: {pipeline}");
    }
    // The test guest boots its kernel directly, and the kernel image QEMU loaded stays in its
    // RAM: both hosts hold the same file, so those pages travelled as hashes.
    if !post_copy {
        let from_boot_files = record["progress"]["pages_from_boot_files"]
            .as_u64()
            .unwrap_or(0);
        assert!(
            from_boot_files > 1000,
            "pages from the kernel and initrd: {from_boot_files}"
        );
        eprintln!("{from_boot_files} pages found in the kernel and initrd at the destination");
    }
    eprintln!(
        "moved {from} -> {to} in {} s: stream {stream} B, wire {wire} B, pause {} ms, pipeline {pipeline}",
        record["total_seconds"],
        record["resumed_at_ms"]
            .as_u64()
            .zip(record["stopped_at_ms"].as_u64())
            .map(|(resumed, stopped)| resumed.saturating_sub(stopped) as i64)
            .unwrap_or(-1)
    );
}

/// A VM moves between hosts of a region, live under a dirtying workload: there and back, chosen
/// by placement, twice at once (refused), cancelled, cold, with a local disk live and then cold
/// with it; bad requests
/// change nothing. After each move exactly one QEMU runs the VM, the source's directory is gone,
/// the rebuilt stream was byte-identical (BLAKE3, compared by the destination) and the guest's
/// workload continues on the destination with its whole memory region re-verified.
#[test]
fn a_vm_moves_between_hosts_and_bad_requests_leave_it_where_it_is() {
    // host-2's QEMU refuses `-incoming` while a marker file exists: a destination that gives
    // up after it answered the source (it answers before its QEMU starts).
    let wrapper_directory = tempfile::tempdir().expect("wrapper directory");
    let wrapper = wrapper_directory.path().join("qemu-system-x86_64");
    let refuse_incoming = wrapper_directory.path().join("refuse-incoming");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\
             if [ -e {marker} ]; then\n\
             \tfor argument in \"$@\"; do\n\
             \t\tif [ \"$argument\" = -incoming ]; then\n\
             \t\t\techo 'test wrapper: no incoming migration on this host now' >&2; exit 1\n\
             \t\tfi\n\
             \tdone\n\
             fi\n\
             exec qemu-system-x86_64 \"$@\"\n",
            marker = refuse_incoming.display()
        ),
    )
    .expect("write the qemu wrapper");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
            .expect("make the wrapper executable");
    }
    let hosts = Hosts::start_each(
        3,
        |index| match index {
            2 => vec!["--qemu".to_string(), wrapper.display().to_string()],
            _ => Vec::new(),
        },
        &[],
    );
    form_region(&hosts);
    let first = &hosts.hosts[0];
    let vm = create_running_vm(
        first,
        "mover",
        Some("host-0"),
        "console=ttyS0 novacron.workload=1 novacron.workload_mib=16",
    );
    let uuid = vm["uuid"].as_str().expect("uuid").to_string();
    let source_tick = poll("workload ticks on host-0", Duration::from_secs(90), || {
        last_workload_tick(&first.serial_log("mover"))
    });
    assert_eq!(source_tick.1, 0, "the workload runs clean before the move");
    // Every member keeps the region's boot files that it holds indexed before a move asks for
    // them (the test guest's kernel and initrd are on every host).
    for host in &hosts.hosts {
        poll(
            "boot files indexed ahead of moves",
            Duration::from_secs(30),
            || (host.metric("novacron_migration_boot_files_indexed")? >= 2.0).then_some(()),
        );
    }

    // Bad input: each refused with a clear error, nothing changes.
    let stderr = first.fails(&["vm", "migrate", "mover", "--to", "host-0"], 2);
    assert!(stderr.contains("already runs on host host-0"), "{stderr}");
    let stderr = first.fails(&["vm", "migrate", "mover", "--to", "nosuch"], 2);
    assert!(stderr.contains("not a host of this region"), "{stderr}");
    let stderr = first.fails(
        &[
            "vm",
            "migrate",
            "mover",
            "--to",
            "host-1",
            "--downtime-limit",
            "1",
        ],
        2,
    );
    assert!(stderr.contains("out of range"), "{stderr}");
    let stderr = first.fails(&["vm", "migrate", "ghost", "--to", "host-1"], 4);
    assert!(stderr.contains("does not exist"), "{stderr}");
    let stderr = first.fails(&["vm", "migrate", "mover", "--cancel"], 6);
    assert!(stderr.contains("not being migrated"), "{stderr}");
    assert_eq!(qemu_processes(&uuid), 1, "still one qemu after refusals");

    // The destination's QEMU does not start after it answered: the move fails with its
    // reason, the VM runs on here, nothing is left on host-2.
    std::fs::write(&refuse_incoming, "").expect("write the marker");
    let started = first.json(&["vm", "migrate", "mover", "--to", "host-2", "--no-wait"]);
    let id = started["id"].as_str().expect("migration id").to_string();
    wait_for_failed_migration(first, &id, "no incoming migration on this host now");
    wait_until_owned_by(first, "mover", "host-0", "running");
    poll(
        "one qemu for mover and nothing left on host-2",
        Duration::from_secs(30),
        || {
            (qemu_processes(&uuid) == 1 && !hosts.hosts[2].vm_directory(&uuid).exists())
                .then_some(())
        },
    );
    std::fs::remove_file(&refuse_incoming).expect("remove the marker");

    // Live moves under the dirtying workload, host-0 -> host-1 (asked on host-2: any host takes
    // the request) and back: each time the workload's counter continues on the destination and
    // the guest re-verifies its whole region there.
    let mut tick = source_tick.0;
    for (from, to, asked) in [(0, 1, 2), (1, 0, 1)] {
        let moved =
            hosts.hosts[asked].json(&["vm", "migrate", "mover", "--to", hosts.hosts[to].name()]);
        assert_moved(&moved, hosts.hosts[from].name(), hosts.hosts[to].name());
        assert!(
            moved["stopped_at_ms"].is_u64() && moved["resumed_at_ms"].is_u64(),
            "the source's STOP and the destination's RESUME were seen: {moved}"
        );
        wait_until_owned_by(first, "mover", hosts.hosts[to].name(), "running");
        poll("the source's copy removed", Duration::from_secs(30), || {
            (!hosts.hosts[from].vm_directory(&uuid).exists() && qemu_processes(&uuid) == 1)
                .then_some(())
        });
        tick = assert_workload_continues(&hosts.hosts[to], "mover", tick);
    }
    // host-1's one outbound session, the move back, left its connections for the next one to
    // host-0.
    poll(
        "host-1's parked connections in its metrics",
        Duration::from_secs(30),
        || (hosts.hosts[1].metric("novacron_transfer_parked_connections")? >= 1.0).then_some(()),
    );
    let shown = first.ok(&["migration", "show", "mover"]);
    assert!(
        shown.contains("completed") && shown.contains("host-0"),
        "{shown}"
    );

    // Two migrations of one VM at once: the second is refused; the first is cancelled, or had
    // already finished. Either way exactly one QEMU runs the VM afterwards, and its memory is
    // intact.
    let started = first.json(&["vm", "migrate", "mover", "--to", "host-2", "--no-wait"]);
    let id = started["id"].as_str().expect("migration id").to_string();
    let stderr = first.fails(&["vm", "migrate", "mover", "--to", "host-1"], 6);
    assert!(stderr.contains("already being migrated"), "{stderr}");
    let _ = first.cli(&["vm", "migrate", "mover", "--cancel"]);
    let ended = poll("the migration to end", Duration::from_secs(120), || {
        let record = first.json(&["migration", "show", &id]);
        let phase = record["phase"].as_str().unwrap_or_default().to_string();
        ["completed", "cancelled", "failed"]
            .contains(&phase.as_str())
            .then_some(record)
    });
    eprintln!("cancelled migration ended: {ended}");
    let owner = if ended["phase"] == "completed" {
        "host-2"
    } else {
        "host-0"
    };
    wait_until_owned_by(first, "mover", owner, "running");
    poll("one qemu for the vm", Duration::from_secs(30), || {
        (qemu_processes(&uuid) == 1).then_some(())
    });
    let owner_host = hosts
        .hosts
        .iter()
        .find(|host| host.name() == owner)
        .expect("owner host");
    tick = assert_workload_continues(owner_host, "mover", tick);

    // Live, without --to: placement picks one of the other hosts.
    let live = first.json(&["vm", "migrate", "mover"]);
    let to = live["destination"]
        .as_str()
        .expect("destination")
        .to_string();
    assert_ne!(to, owner);
    assert_moved(&live, owner, &to);
    assert!(
        live["placement"]
            .as_str()
            .is_some_and(|text| text.contains("won")),
        "{live}"
    );
    let vm = first.vm("mover");
    assert_eq!(vm["status"]["host"], to.as_str(), "{vm}");
    assert!(vm["migration"].is_null(), "{vm}");
    poll(
        "the live source's copy removed",
        Duration::from_secs(30),
        || (!owner_host.vm_directory(&uuid).exists() && qemu_processes(&uuid) == 1).then_some(()),
    );
    let new_owner = hosts
        .hosts
        .iter()
        .find(|host| host.name() == to)
        .expect("new owner host");
    assert_workload_continues(new_owner, "mover", tick);

    // A stopped VM without a disk moves cold: only its record.
    assert_success(
        &create_stopped_vm(first, "sleeper", Some("host-0")),
        "vm create sleeper",
        first,
    );
    let cold = first.json(&["vm", "migrate", "sleeper", "--to", "host-2"]);
    assert_eq!(cold["phase"], "completed", "{cold}");
    assert!(
        cold["message"]
            .as_str()
            .unwrap_or_default()
            .contains("cold"),
        "{cold}"
    );
    assert_eq!(first.vm("sleeper")["status"]["host"], "host-2");

    let list = first.json(&["migration", "list"]);
    assert!(
        list.as_array().is_some_and(|list| list.len() >= 4),
        "{list}"
    );

    // A VM with a local disk, live under the workload: the destination lacks the base image,
    // so the source copies it there first; the destination makes its own overlay on it, and the
    // source's block mirror fills it with what the VM wrote while QEMU copies memory.
    let destination = &hosts.hosts[1];
    first.import_guest_image("base");
    create_disk_vm(
        first,
        "disky",
        "console=ttyS0 panic=-1 novacron.diskmark=NCMARK42 novacron.readdisk=1 \
         novacron.workload=1 novacron.workload_mib=16",
    );
    // The guest read its whole disk: its page cache holds the base image's blocks.
    first.wait_for_console("disky", "NOVACRON-DISK-READ");
    let disky = wait_until_owned_by(first, "disky", "host-0", "running");
    let disky_uuid = disky["uuid"].as_str().expect("uuid").to_string();
    let disky_tick = poll("disky's workload ticks", Duration::from_secs(90), || {
        last_workload_tick(&first.serial_log("disky"))
    });
    let moved = first.json(&["vm", "migrate", "disky", "--to", "host-1"]);
    assert_moved(&moved, "host-0", "host-1");
    assert!(
        moved["progress"]["disk_bytes"].as_u64().unwrap_or(0) > 0,
        "the disk was mirrored: {moved}"
    );
    // The base image went to host-1 first, as a push from the source.
    let transfers = first.json(&["transfer", "list"]);
    assert!(
        transfers
            .as_array()
            .is_some_and(|transfers| transfers.iter().any(|transfer| {
                transfer["direction"] == "push"
                    && transfer["image"] == "base"
                    && transfer["state"] == "succeeded"
            })),
        "the source pushed the base image: {transfers}"
    );
    // The page cache's copy of the disk (the guest's kernel file, about 14 MiB, in the image)
    // travelled as hashes of blocks the destination read from its own copy of the base image.
    let from_image = moved["progress"]["pages_from_image"].as_u64().unwrap_or(0);
    eprintln!(
        "disky: {from_image} pages found in the base image at the destination, {} among the \
         blocks the disk mirror delivered",
        moved["progress"]["blocks_from_disk_mirror"]
    );
    assert!(from_image > 2000, "pages from the base image: {moved}");
    // The block the guest wrote its mark into is on its overlay (the mirror delivered it) and in
    // its page cache (the disk is far smaller than its RAM): that page travelled as a hash.
    assert!(
        moved["progress"]["blocks_from_disk_mirror"]
            .as_u64()
            .is_some_and(|blocks| blocks >= 1),
        "the marked block was found among the mirror's blocks: {moved}"
    );
    wait_until_owned_by(first, "disky", "host-1", "running");
    poll(
        "disky's source copy removed",
        Duration::from_secs(30),
        || {
            (!first.vm_directory(&disky_uuid).exists() && qemu_processes(&disky_uuid) == 1)
                .then_some(())
        },
    );
    assert_workload_continues(destination, "disky", disky_tick.0);
    destination.ok(&["vm", "stop", "disky", "--force"]);
    destination.wait_for_state("disky", "stopped");
    assert_disk_marked(
        destination,
        &disky_uuid,
        "the guest's write reached the destination's disk",
    );

    // Stopped, with its disk: a cold move carries the disk (from a QEMU that never runs the
    // guest) and leaves the VM stopped on the new host, with no QEMU left on either host.
    let cold = destination.json(&["vm", "migrate", "disky", "--to", "host-0"]);
    assert_eq!(cold["phase"], "completed", "{cold}");
    assert!(
        cold["message"]
            .as_str()
            .unwrap_or_default()
            .contains("cold move"),
        "{cold}"
    );
    assert!(
        cold["progress"]["disk_bytes"].as_u64().unwrap_or(0) > 0,
        "the disk was copied: {cold}"
    );
    let record = poll("disky stopped on host-0", Duration::from_secs(60), || {
        let vm = first.vm("disky");
        (vm["status"]["host"] == "host-0"
            && vm["status"]["state"] == "stopped"
            && vm["migration"].is_null())
        .then_some(vm)
    });
    assert_eq!(record["desired"], "stopped", "{record}");
    poll(
        "the cold move's QEMUs gone and disky's old directory removed",
        Duration::from_secs(30),
        || {
            (qemu_processes(&disky_uuid) == 0 && !destination.vm_directory(&disky_uuid).exists())
                .then_some(())
        },
    );
    assert_disk_marked(
        first,
        &disky_uuid,
        "the disk written on host-0, moved live to host-1, came back cold",
    );

    // A new VM on a host without its image: the host fetches the image from one that holds it
    // (over DWCP, as `image pull` would), then makes the VM's disk on it.
    let third = &hosts.hosts[2];
    let mut arguments = TestHost::guest_vm_arguments("fetched", "base");
    arguments.extend(["--host".into(), "host-2".into(), "--no-start".into()]);
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    assert_success(&first.cli(&arguments), "vm create fetched on host-2", first);
    let fetched = first.wait_for_state("fetched", "stopped");
    let fetched_uuid = fetched["uuid"].as_str().expect("uuid").to_string();
    assert!(
        third
            .vm_directory(&fetched_uuid)
            .join("disk.qcow2")
            .exists(),
        "host-2 made the disk: {fetched}"
    );
    // The image records are the region's; what host-2 holds is in its heartbeat.
    let base_id = first.json(&["image", "show", "base"])["id"]
        .as_str()
        .expect("image id")
        .to_string();
    poll(
        "host-2's heartbeat lists the fetched image",
        Duration::from_secs(30),
        || {
            cluster_list(first)["hosts"]
                .as_array()
                .expect("hosts")
                .iter()
                .find(|host| host["host"] == "host-2")
                .and_then(|host| host["heartbeat"]["images"].as_array())
                .is_some_and(|images| images.iter().any(|image| *image == base_id.as_str()))
                .then_some(())
        },
    );
    first.ok(&["vm", "delete", "fetched"]);

    // `cluster remove --force` evacuates first: each VM on host-2 (sleeper, cold; mover, live,
    // when placement put it there) moves to another host, then host-2 leaves the region.
    let stderr = first.fails(&["cluster", "remove", "host-2"], 6);
    assert!(
        stderr.contains("sleeper") && stderr.contains("--force"),
        "{stderr}"
    );
    let mover_before = first.vm("mover");
    let mover_was_on_2 = mover_before["status"]["host"] == "host-2";
    let mover_tick = last_workload_tick(&hosts.hosts[2].serial_log("mover")).map(|(tick, _)| tick);
    let removed = first.ok(&["cluster", "remove", "host-2", "--force"]);
    assert!(removed.contains("removed host host-2"), "{removed}");
    let vms = first.json(&["vm", "list"]);
    let on_host_2: Vec<&Value> = vms
        .as_array()
        .expect("vm list")
        .iter()
        .filter(|vm| vm["status"]["host"] == "host-2")
        .collect();
    assert!(on_host_2.is_empty(), "evacuated: {on_host_2:?}");
    assert_eq!(first.vm("sleeper")["status"]["state"], "stopped");
    let list = cluster_list(first);
    assert!(
        roles(&list).iter().all(|(name, _, _)| name != "host-2"),
        "{list}"
    );
    if mover_was_on_2 {
        let owner = first.vm("mover")["status"]["host"]
            .as_str()
            .expect("host")
            .to_string();
        let owner = hosts
            .hosts
            .iter()
            .find(|host| host.name() == owner)
            .expect("mover's new host");
        assert_workload_continues(owner, "mover", mover_tick.expect("mover ticked on host-2"));
    }
}

/// A VM whose disk is on shared storage (`serve --shared-storage shared=DIR` on host-0 and
/// host-1; host-2 mounts none; host-3 names another directory `shared`, a misconfiguration)
/// is placed only where the storage is mounted and moves without its disk: refused by host-2
/// (placement) and by host-3 (no such disk there: the VM stays, nothing is left on host-3),
/// live there and back, then cold (its record only); the overlay on the storage is the same
/// file throughout and keeps the guest's write, and `vm delete` removes it.
#[test]
fn a_vm_on_shared_storage_moves_with_memory_only_and_only_where_the_storage_is_mounted() {
    let storage = tempfile::tempdir().expect("shared storage directory");
    let elsewhere = tempfile::tempdir().expect("another directory");
    let storage_argument = |directory: &tempfile::TempDir| {
        vec![
            "--shared-storage".to_string(),
            format!("shared={}", directory.path().display()),
        ]
    };
    let hosts = Hosts::start_each(
        4,
        |index| match index {
            0 | 1 => storage_argument(&storage),
            3 => storage_argument(&elsewhere),
            _ => Vec::new(),
        },
        &[],
    );
    form_region(&hosts);
    let (first, second, third) = (&hosts.hosts[0], &hosts.hosts[1], &hosts.hosts[2]);
    let fourth = &hosts.hosts[3];
    first.import_guest_image("base");

    // Bad input: a storage no host mounts, a storage for a VM without a disk.
    let stderr = first.fails(
        &[
            "vm",
            "create",
            "nowhere",
            "--image",
            "base",
            "--storage",
            "elsewhere",
        ],
        2,
    );
    assert!(
        stderr.contains("no host of this region mounts shared storage \"elsewhere\""),
        "{stderr}"
    );
    let kernel = guest().kernel.display().to_string();
    let stderr = first.fails(
        &[
            "vm",
            "create",
            "diskless",
            "--kernel",
            &kernel,
            "--storage",
            "shared",
        ],
        2,
    );
    assert!(stderr.contains("has none"), "{stderr}");
    assert_eq!(
        first.json(&["vm", "list"]).as_array().map(Vec::len),
        Some(0)
    );

    let uuid = create_disk_vm_with(
        first,
        "pooled",
        "console=ttyS0 panic=-1 novacron.diskmark=NCMARK42 novacron.workload=1 \
         novacron.workload_mib=16",
        &["--storage", "shared"],
    );
    let overlay = storage
        .path()
        .join("vms")
        .join(uuid.replace('-', ""))
        .join("disk.qcow2");
    assert!(overlay.exists(), "the disk is on the shared storage");
    assert!(
        !first.vm_directory(&uuid).join("disk.qcow2").exists(),
        "and not in host-0's data directory"
    );
    // The overlay names its base relative to itself, so a host mounting the storage elsewhere
    // opens it too.
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output", "json", "-U"])
        .arg(&overlay)
        .output()
        .expect("qemu-img info");
    let info: Value = serde_json::from_slice(&info.stdout).expect("qemu-img info json");
    let backing = info["backing-filename"].as_str().expect("a backing file");
    assert!(backing.starts_with("../../images/"), "{info}");
    let inode = |path: &std::path::Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).expect("the overlay").ino()
    };
    let overlay_inode = inode(&overlay);
    let tick = poll("pooled's workload ticks", Duration::from_secs(90), || {
        last_workload_tick(&first.serial_log("pooled"))
    });

    // host-2 does not mount the storage: refused, the VM stays.
    let stderr = first.fails(&["vm", "migrate", "pooled", "--to", "host-2"], 7);
    assert!(
        stderr.contains("host-2") && stderr.contains("shared-storage/shared=mounted"),
        "{stderr}"
    );
    assert_eq!(first.vm("pooled")["status"]["host"], "host-0");
    // host-3 names another directory `shared`: it does not find the VM's disk and refuses.
    let started = first.json(&["vm", "migrate", "pooled", "--to", "host-3", "--no-wait"]);
    let id = started["id"].as_str().expect("migration id").to_string();
    wait_for_failed_migration(first, &id, "must name the same file system");
    wait_until_owned_by(first, "pooled", "host-0", "running");
    poll(
        "one qemu for pooled and nothing left on host-3",
        Duration::from_secs(30),
        || (qemu_processes(&uuid) == 1 && !fourth.vm_directory(&uuid).exists()).then_some(()),
    );
    assert!(
        std::fs::read_dir(elsewhere.path().join("vms"))
            .expect("host-3's storage directory")
            .next()
            .is_none(),
        "nothing made on host-3's storage"
    );

    // Live to host-1: memory only.
    let moved = first.json(&["vm", "migrate", "pooled", "--to", "host-1"]);
    assert_moved(&moved, "host-0", "host-1");
    assert_eq!(
        moved["progress"]["disk_bytes"].as_u64().unwrap_or(0),
        0,
        "no disk phase: {moved}"
    );
    wait_until_owned_by(first, "pooled", "host-1", "running");
    wait_for_one_qemu("pooled", &uuid, first, Duration::from_secs(30));
    let tick = assert_workload_continues(second, "pooled", tick.0);
    assert_eq!(inode(&overlay), overlay_inode, "the same disk file");
    let transfers = first.json(&["transfer", "list"]);
    assert!(
        transfers
            .as_array()
            .is_some_and(|transfers| transfers.iter().all(|transfer| transfer["image"] != "base")),
        "no base image copied: {transfers}"
    );

    // And back.
    let back = second.json(&["vm", "migrate", "pooled", "--to", "host-0"]);
    assert_moved(&back, "host-1", "host-0");
    wait_until_owned_by(first, "pooled", "host-0", "running");
    wait_for_one_qemu("pooled", &uuid, second, Duration::from_secs(30));
    assert_workload_continues(first, "pooled", tick);

    // Stopped: a cold move changes only the record; it starts on host-1 from the same disk.
    first.ok(&["vm", "stop", "pooled", "--force"]);
    first.wait_for_state("pooled", "stopped");
    assert_overlay_marked(
        &overlay,
        &first.directory.path().join("pooled.raw"),
        "the guest's write is on the shared disk",
    );
    let cold = first.json(&["vm", "migrate", "pooled", "--to", "host-1"]);
    assert_eq!(cold["phase"], "completed", "{cold}");
    assert!(
        cold["message"]
            .as_str()
            .is_some_and(|message| message.contains("shared storage shared")),
        "{cold}"
    );
    second.ok(&["vm", "start", "pooled"]);
    wait_until_owned_by(second, "pooled", "host-1", "running");
    second.wait_for_console("pooled", "NOVACRON-DISK-MARKED NCMARK42");
    assert_eq!(inode(&overlay), overlay_inode, "still the same disk file");
    assert!(third.vm_directory(&uuid).metadata().is_err());

    // Deleted: the disk on the storage goes with it.
    second.ok(&["vm", "delete", "pooled", "--force"]);
    poll(
        "pooled's disk removed from the shared storage",
        Duration::from_secs(60),
        || (!overlay.parent().expect("vm directory").exists()).then_some(()),
    );
}

/// Starts a live migration of `name` without waiting and polls (through `observer`, a host that
/// stays reachable) until it copies memory and has put `bytes` on the wire. Returns its id.
fn start_migration_and_wait_for_memory(
    requester: &TestHost,
    observer: &TestHost,
    name: &str,
    to: &str,
    bytes: u64,
) -> String {
    let started = requester.json(&["vm", "migrate", name, "--to", to, "--no-wait"]);
    let id = started["id"].as_str().expect("migration id").to_string();
    poll(
        &format!("migration {id} copying memory past {bytes} bytes"),
        Duration::from_secs(60),
        || {
            let record = observer.json(&["migration", "show", &id]);
            assert!(
                !["failed", "cancelled", "completed"].contains(&record["phase"].as_str()?),
                "the migration ended before the fault: {record}"
            );
            (record["phase"] == "memory" && record["progress"]["wire_bytes"].as_u64()? >= bytes)
                .then_some(())
        },
    );
    id
}

/// Polls `observer` until migration `id` began its `passes`-th pass over memory; fails the
/// test if it ends first.
fn wait_for_passes(observer: &TestHost, id: &str, passes: u64) {
    poll(
        &format!("migration {id} in pass {passes}"),
        Duration::from_secs(60),
        || {
            let record = observer.json(&["migration", "show", id]);
            assert!(
                !["failed", "cancelled", "completed"].contains(&record["phase"].as_str()?),
                "migration {id} ended before pass {passes}: {record}"
            );
            (record["progress"]["passes"].as_u64()? >= passes).then_some(())
        },
    );
}

/// Polls `observer` until migration `id` is in `phase`; fails the test if it ends first.
fn wait_for_migration_phase(observer: &TestHost, id: &str, phase: &str, timeout: Duration) {
    poll(&format!("migration {id} in {phase}"), timeout, || {
        let record = observer.json(&["migration", "show", id]);
        assert!(
            !["failed", "cancelled", "completed"].contains(&record["phase"].as_str()?),
            "migration {id} ended before it reached {phase}: {record}"
        );
        (record["phase"] == phase).then_some(())
    });
}

/// `migration show`, or `None` while the host cannot answer (a poll tolerates that).
fn try_migration(observer: &TestHost, id: &str) -> Option<Value> {
    let output = observer.cli(&["migration", "show", id, "--output", "json"]);
    if !output.status.success() {
        return None;
    }
    serde_json::from_slice(&output.stdout).ok()
}

/// Polls `observer` until the migration ended without moving the VM, and checks that its
/// message names `reason`.
fn wait_for_failed_migration(observer: &TestHost, id: &str, reason: &str) {
    let failed = poll(
        &format!("migration {id} to fail"),
        Duration::from_secs(90),
        || {
            let record = try_migration(observer, id)?;
            (record["phase"] == "failed").then_some(record)
        },
    );
    eprintln!("migration {id} failed: {}", failed["message"]);
    assert!(
        failed["message"]
            .as_str()
            .unwrap_or_default()
            .contains(reason),
        "the reason names {reason:?}: {failed}"
    );
}

/// Faults in the middle of a live migration, each leaving exactly one running copy of the VM,
/// on the source, and nothing on the destination: the source's link cut, the destination's
/// `serve` killed with `kill -9` (and started again), the source's `serve` killed and started
/// again, a cancel while the guest is stopped for switch-over. The source's outbound link is
/// shaped to 40 Mbit/s so the memory copy lasts long enough to be interrupted. After each, the
/// guest's workload re-verifies its whole memory region on the source. Then a cold move of a
/// stopped VM with a local disk loses its link: the VM stays stopped on the source with its
/// disk, and no QEMU is left for it.
#[test]
fn faults_during_a_live_migration_leave_the_vm_running_on_the_source() {
    let mut hosts = Hosts::start_shaped(3, &[], &forty_mbit_from_host_0());
    form_region(&hosts);
    let vm = create_running_vm(
        &hosts.hosts[0],
        "steady",
        Some("host-0"),
        "console=ttyS0 novacron.workload=1 novacron.workload_mib=16",
    );
    let uuid = vm["uuid"].as_str().expect("uuid").to_string();
    let stays_on_source = |hosts: &Hosts, destination: usize| {
        wait_until_owned_by(&hosts.hosts[0], "steady", "host-0", "running");
        wait_for_one_qemu(
            "steady",
            &uuid,
            &hosts.hosts[destination],
            Duration::from_secs(60),
        );
        let before =
            last_workload_tick(&hosts.hosts[0].serial_log("steady")).map_or(0, |(tick, _)| tick);
        assert_workload_continues(&hosts.hosts[0], "steady", before);
    };

    // 1. The source's link is cut mid-memory, after the first pass (QEMU's auto-converge then
    //    re-syncs its dirty bitmap every 5 s from its main loop, which blocks while the
    //    migration stream cannot be written): the source's session gives up after its resume
    //    timeout, the source's QEMU survives the failed migration; once the link is back the
    //    source records the failure, and the destination removes its QEMU.
    let id = start_migration_and_wait_for_memory(
        &hosts.hosts[0],
        &hosts.hosts[1],
        "steady",
        "host-1",
        4 << 20,
    );
    wait_for_passes(&hosts.hosts[0], &id, 2);
    hosts.set_link_up(0, false);
    poll(
        "the source to give up the cut-off migration",
        Duration::from_secs(60),
        || {
            hosts.hosts[0]
                .serve_log()
                .contains("migration ended; the vm stays on the source")
                .then_some(())
        },
    );
    hosts.set_link_up(0, true);
    wait_for_failed_migration(&hosts.hosts[1], &id, "session");
    stays_on_source(&hosts, 1);

    // 2. The destination's serve is killed mid-memory: the source fails the migration; the
    //    destination's orphaned incoming QEMU is removed when its serve starts again.
    let id = start_migration_and_wait_for_memory(
        &hosts.hosts[0],
        &hosts.hosts[0],
        "steady",
        "host-1",
        4 << 20,
    );
    hosts.hosts[1].kill_serve();
    wait_for_failed_migration(&hosts.hosts[0], &id, "stayed on the source");
    hosts.hosts[1].spawn_serve();
    stays_on_source(&hosts, 1);

    // 3. The source's serve is killed mid-memory and started again: QEMU's migration dies with
    //    the socket, the guest keeps running, the restarted source records the failure and the
    //    destination removes its QEMU.
    let id = start_migration_and_wait_for_memory(
        &hosts.hosts[0],
        &hosts.hosts[2],
        "steady",
        "host-2",
        4 << 20,
    );
    hosts.hosts[0].kill_serve();
    hosts.hosts[0].spawn_serve();
    wait_for_failed_migration(&hosts.hosts[2], &id, "restarted");
    stays_on_source(&hosts, 2);

    // 4. Cancelled during switch-over: a downtime limit of a minute lets QEMU stop the guest
    //    almost at once and send the rest of its memory paused (about 10 s over this link);
    //    the cancel lands while the guest is stopped, and the source resumes it.
    let started = hosts.hosts[0].json(&[
        "vm",
        "migrate",
        "steady",
        "--to",
        "host-1",
        "--no-wait",
        "--downtime-limit",
        "60000",
    ]);
    let id = started["id"].as_str().expect("migration id").to_string();
    wait_for_migration_phase(&hosts.hosts[1], &id, "switch-over", Duration::from_secs(60));
    hosts.hosts[2].ok(&["vm", "migrate", "steady", "--cancel"]);
    let ended = poll(
        &format!("migration {id} to end"),
        Duration::from_secs(90),
        || {
            let record = hosts.hosts[1].json(&["migration", "show", &id]);
            record["phase"]
                .as_str()
                .is_some_and(|phase| ["failed", "cancelled", "completed"].contains(&phase))
                .then_some(record)
        },
    );
    assert_eq!(ended["phase"], "cancelled", "{ended}");
    assert!(
        ended["stopped_at_ms"].is_u64(),
        "the guest had stopped: {ended}"
    );
    stays_on_source(&hosts, 1);

    // 5. A cold move of a stopped VM with a local disk, the source's link cut while the base
    //    image goes to the destination: the temporary QEMU the source started for the move
    //    goes, the VM stays stopped on the source with its disk, and the destination keeps
    //    nothing of it.
    hosts.hosts[0].import_guest_image("base");
    let coldie_uuid = create_disk_vm(
        &hosts.hosts[0],
        "coldie",
        "console=ttyS0 panic=-1 novacron.diskmark=NCMARK42",
    );
    hosts.hosts[0].ok(&["vm", "stop", "coldie", "--force"]);
    hosts.hosts[0].wait_for_state("coldie", "stopped");
    let started = hosts.hosts[0].json(&["vm", "migrate", "coldie", "--to", "host-1", "--no-wait"]);
    let id = started["id"].as_str().expect("migration id").to_string();
    poll(
        &format!("cold move {id} under way"),
        Duration::from_secs(60),
        || {
            let record = hosts.hosts[0].json(&["migration", "show", &id]);
            assert!(
                !["failed", "cancelled", "completed"].contains(&record["phase"].as_str()?),
                "the cold move ended before the fault: {record}"
            );
            (record["phase"] != "requested").then_some(())
        },
    );
    let gave_up = "migration ended; the vm stays on the source";
    let given_up_before = hosts.hosts[0].serve_log().matches(gave_up).count();
    hosts.set_link_up(0, false);
    poll(
        "the source to give up the cold move",
        Duration::from_secs(90),
        || (hosts.hosts[0].serve_log().matches(gave_up).count() > given_up_before).then_some(()),
    );
    hosts.set_link_up(0, true);
    wait_for_failed_migration(&hosts.hosts[1], &id, "");
    poll(
        "coldie stopped on host-0, no qemu for it anywhere",
        Duration::from_secs(60),
        || {
            let vm = hosts.hosts[0].vm("coldie");
            (vm["status"]["host"] == "host-0"
                && vm["status"]["state"] == "stopped"
                && vm["migration"].is_null()
                && qemu_processes(&coldie_uuid) == 0
                && !hosts.hosts[1].vm_directory(&coldie_uuid).exists())
            .then_some(())
        },
    );
    assert_disk_marked(
        &hosts.hosts[0],
        &coldie_uuid,
        "coldie's disk is still on host-0 after the failed cold move",
    );
}

/// The memory workload of the post-copy tests: 64 MiB rewritten at 8 MiB/s over a 5 MB/s link,
/// so post-copy switches after the first copy and then has several seconds of pages left.
const POST_COPY_CMDLINE: &str =
    "console=ttyS0 novacron.workload=1 novacron.workload_mib=64 novacron.workload_dirty=2048";

/// Starts `name` on host-0 (restart policy `always`) and moves it to host-1 with post-copy until
/// the switch; `extra` are more `vm migrate` arguments. Returns the VM's uuid and the migration.
fn start_post_copy(hosts: &Hosts, name: &str, extra: &[&str]) -> (String, String) {
    let vm = create_running_vm_with(
        &hosts.hosts[0],
        name,
        Some("host-0"),
        POST_COPY_CMDLINE,
        &["--restart", "always"],
    );
    let uuid = vm["uuid"].as_str().expect("uuid").to_string();
    poll(
        &format!("{name}'s workload ticks"),
        Duration::from_secs(90),
        || last_workload_tick(&hosts.hosts[0].serial_log(name)),
    );
    let mut arguments = vec![
        "vm",
        "migrate",
        name,
        "--to",
        "host-1",
        "--no-wait",
        "--when-not-converging",
        "post-copy",
    ];
    arguments.extend_from_slice(extra);
    let started = hosts.hosts[0].json(&arguments);
    let id = started["id"].as_str().expect("migration id").to_string();
    wait_for_migration_phase(&hosts.hosts[1], &id, "post-copy", Duration::from_secs(180));
    assert_eq!(hosts.hosts[1].vm(name)["status"]["host"], "host-1");
    (uuid, id)
}

/// After the switch of a post-copy migration the destination owns the VM while the source still
/// holds pages it has not sent. The source's link is cut then for longer than a migration before
/// its switch waits for it (TCP gives the connections up after 15 s, precopy after 10 s more),
/// and comes back: both hosts wait for it (`--post-copy-link-wait`, 300 s by default), the
/// migration says the link is down, the guest stalls on the pages it lacks and carries on once
/// they come: the migration completes, the VM was never restarted, and its workload's counter
/// continues with its memory verified. Then two more VMs' post-copies lose their stream for
/// good: the source's `serve`, then the destination's, is killed with `kill -9` and started
/// again; the QEMUs outlive it, paused, and the copy resumes on a new session (QEMU's post-copy
/// recovery), with the same outcome.
#[test]
fn post_copy_waits_for_a_lost_link_or_a_restarted_serve_and_the_guest_carries_on() {
    let hosts = Hosts::start_shaped(3, &[], &forty_mbit_from_host_0());
    form_region(&hosts);
    let (uuid, id) = start_post_copy(&hosts, "patient", &[]);
    let tick_at_cut = last_workload_tick(&hosts.hosts[1].serial_log("patient")).map_or(0, |t| t.0);
    hosts.set_link_up(0, false);
    poll(
        "the migration to say the link has been down for 15 s",
        Duration::from_secs(90),
        || {
            // None while the region elects a new leader (host-0 may have led).
            let record = try_migration(&hosts.hosts[2], &id)?;
            assert_eq!(record["phase"], "post-copy", "{record}");
            let message = record["message"].as_str()?;
            let seconds: u64 = message
                .split_once("is down (")?
                .1
                .split_once(" s)")?
                .0
                .parse()
                .ok()?;
            (seconds >= 15).then(|| eprintln!("while cut: {message}"))
        },
    );
    hosts.set_link_up(0, true);
    let record = poll(
        "the post-copy to complete once the link is back",
        Duration::from_secs(120),
        || {
            let record = try_migration(&hosts.hosts[2], &id)?;
            assert_ne!(record["phase"], "failed", "{record}");
            (record["phase"] == "completed").then_some(record)
        },
    );
    eprintln!("after the cut: {}", record["message"]);
    assert!(
        record["stream_checksum"]
            .as_str()
            .is_some_and(|checksum| checksum.contains("blake3")),
        "{record}"
    );
    let vm = wait_until_owned_by(&hosts.hosts[2], "patient", "host-1", "running");
    assert_eq!(
        vm["status"]["restarts"], 0,
        "never restarted: {}",
        vm["status"]
    );
    assert_workload_continues(&hosts.hosts[1], "patient", tick_at_cut);
    wait_for_one_qemu("patient", &uuid, &hosts.hosts[0], Duration::from_secs(90));

    // The source's serve is killed during post-copy and started again: its QEMU, paused with
    // the pages the destination lacks, outlived it; the new serve resumes the copy on a new
    // session and the guest carries on, never restarted.
    let mut hosts = hosts;
    resume_after_a_serve_restart(&mut hosts, "resilient", 0);

    // The destination's serve is killed during post-copy and started again: its QEMU paused
    // with what it had; the new serve takes it over through the monitor connection the
    // migration's holder process kept (QEMU's main loop may be stuck on a missing page), and
    // the source resumes the copy.
    resume_after_a_serve_restart(&mut hosts, "steadfast", 1);
    assert!(
        hosts.hosts[1]
            .serve_log()
            .contains("qemu left in post-copy by an earlier serve; waiting for the source"),
        "the restarted destination took its post-copy qemu over"
    );
}

/// Moves `name` from host-0 to host-1 with post-copy until the switch, kills host `restarted`'s
/// serve with `kill -9` and starts it again, and checks that the copy resumed on a new session
/// and the guest carried on ([`wait_for_resumed_post_copy`]).
fn resume_after_a_serve_restart(hosts: &mut Hosts, name: &str, restarted: usize) {
    let (uuid, id) = start_post_copy(hosts, name, &[]);
    let tick_at_kill = last_workload_tick(&hosts.hosts[1].serial_log(name)).map_or(0, |t| t.0);
    hosts.hosts[restarted].kill_serve();
    hosts.hosts[restarted].spawn_serve();
    let record = wait_for_resumed_post_copy(hosts, &id, name, &uuid, tick_at_kill);
    assert!(
        record["message"]
            .as_str()
            .is_some_and(|message| message.contains("resumed on a new session")),
        "{record}"
    );
}

/// Waits for post-copy migration `id` of `name` to complete after its stream was resumed,
/// and checks the guest carried on: never restarted, its workload's counter past `tick` with
/// its memory verified, one QEMU. Returns the migration.
fn wait_for_resumed_post_copy(hosts: &Hosts, id: &str, name: &str, uuid: &str, tick: u64) -> Value {
    let record = poll(
        "the post-copy to complete after a serve restarted",
        Duration::from_secs(180),
        || {
            let record = try_migration(&hosts.hosts[2], id)?;
            assert_ne!(record["phase"], "failed", "{record}");
            (record["phase"] == "completed").then_some(record)
        },
    );
    eprintln!("{name} after the restart: {}", record["message"]);
    let vm = wait_until_owned_by(&hosts.hosts[2], name, "host-1", "running");
    assert_eq!(
        vm["status"]["restarts"], 0,
        "never restarted: {}",
        vm["status"]
    );
    assert_workload_continues(&hosts.hosts[1], name, tick);
    wait_for_one_qemu(name, uuid, &hosts.hosts[0], Duration::from_secs(90));
    record
}

/// A fault after the switch of a post-copy migration that loses the guest's running state: a
/// cut that outlasts a 10 s `--post-copy-link-wait`. It leaves the migration failed and saying
/// so, no QEMU or directory on the source, and the VM failed on the destination as after a
/// crash: restarted there by its restart policy (`always`), one QEMU, a fresh boot whose
/// workload verifies.
#[test]
fn faults_during_post_copy_fail_the_vm_on_the_destination_which_restarts_it() {
    let mut hosts = Hosts::start_shaped(3, &[], &forty_mbit_from_host_0());
    form_region(&hosts);

    let mut round = 0;
    let mut post_copy_then = |hosts: &mut Hosts, extra: &[&str], fault: &dyn Fn(&mut Hosts)| {
        round += 1;
        let name = format!("fragile{round}");
        let (uuid, id) = start_post_copy(hosts, &name, extra);
        fault(hosts);
        wait_for_failed_migration(&hosts.hosts[2], &id, "running state is lost");
        assert_restarted_fresh(hosts, &name, &uuid);
    };

    // 1. The link is cut for longer than the migration's link wait, and comes back once both
    //    sides gave up.
    post_copy_then(
        &mut hosts,
        &["--post-copy-link-wait", "10"],
        &|hosts: &mut Hosts| {
            hosts.set_link_up(0, false);
            poll(
                "the source to give up post-copy",
                Duration::from_secs(90),
                || {
                    hosts.hosts[0]
                        .serve_log()
                        .contains("post-copy failed after the switch")
                        .then_some(())
                },
            );
            hosts.set_link_up(0, true);
        },
    );
}

/// `name`, whose post-copy to host-1 failed, was restarted there by its restart policy: one
/// QEMU, a fresh boot whose workload verifies.
fn assert_restarted_fresh(hosts: &Hosts, name: &str, uuid: &str) {
    let vm = poll(
        &format!("{name} restarted on host-1"),
        Duration::from_secs(120),
        || {
            let vm = hosts.hosts[2].vm(name);
            (vm["status"]["host"] == "host-1" && vm["status"]["restarts"].as_u64()? >= 1)
                .then_some(vm)
        },
    );
    eprintln!("{name} after the fault: {}", vm["status"]);
    let log_before = hosts.hosts[1].serial_log(name).len();
    wait_until_owned_by(&hosts.hosts[2], name, "host-1", "running");
    wait_for_one_qemu(name, uuid, &hosts.hosts[0], Duration::from_secs(90));
    let (tick, errors) = poll(
        &format!("{name}'s fresh boot on host-1 to tick"),
        Duration::from_secs(90),
        || {
            let log = hosts.hosts[1].serial_log(name);
            last_workload_tick(log.get(log_before..)?).filter(|(tick, _)| *tick >= 3)
        },
    );
    assert_eq!(
        errors, 0,
        "{name}'s memory verifies after the restart (tick {tick})"
    );
}

/// A guest that dirties memory faster than the link carries it: the plan says precopy does not
/// converge and throttles the guest's vCPUs (QEMU's auto-converge, starting at the throttle the
/// plan computed); the migration then completes and the guest's memory verifies on the
/// destination. With `--when-not-converging keep-copying` the guest is never throttled and the
/// migration's timeout ends it, leaving the VM on the source. With `post-copy` a second guest,
/// with a local disk, moves after its first full copy of memory and finishes copying while it
/// runs on the destination.
#[test]
fn a_guest_that_outruns_the_link_is_throttled_until_it_converges() {
    let hosts = Hosts::start_shaped(3, &[], &forty_mbit_from_host_0());
    form_region(&hosts);
    // 2048 fresh random pages a second: 8 MiB/s against the link's 5 MB/s, nothing for the
    // codec to gain.
    let vm = create_running_vm(
        &hosts.hosts[0],
        "busy",
        Some("host-0"),
        "console=ttyS0 novacron.workload=1 novacron.workload_mib=32 novacron.workload_dirty=2048",
    );
    let uuid = vm["uuid"].as_str().expect("uuid").to_string();
    let before = poll("busy's workload ticks", Duration::from_secs(90), || {
        last_workload_tick(&hosts.hosts[0].serial_log("busy"))
    });

    // keep-copying: never converges, never throttled; the timeout leaves it on the source.
    let started = hosts.hosts[0].json(&[
        "vm",
        "migrate",
        "busy",
        "--to",
        "host-1",
        "--no-wait",
        "--when-not-converging",
        "keep-copying",
        "--timeout",
        "20",
    ]);
    let id = started["id"].as_str().expect("migration id").to_string();
    let mut said_no = false;
    let ended = poll(
        "the unthrottled migration to time out",
        Duration::from_secs(120),
        || {
            let record = hosts.hosts[1].json(&["migration", "show", &id]);
            assert_eq!(
                record["progress"]["throttle_percent"], 0,
                "never throttled: {record}"
            );
            said_no |= record["progress"]["converges"] == false
                && record["progress"]["plan"]
                    .as_str()
                    .is_some_and(|plan| plan.contains("keep-copying"));
            let phase = record["phase"].as_str()?.to_string();
            ["failed", "cancelled", "completed"]
                .contains(&phase.as_str())
                .then_some(record)
        },
    );
    assert_eq!(ended["phase"], "cancelled", "{ended}");
    assert!(
        ended["message"]
            .as_str()
            .unwrap_or_default()
            .contains("timed out"),
        "{ended}"
    );
    assert!(said_no, "the plan said it would not converge: {ended}");
    wait_until_owned_by(&hosts.hosts[0], "busy", "host-0", "running");
    poll("one qemu, on the source", Duration::from_secs(60), || {
        (qemu_processes(&uuid) == 1 && !hosts.hosts[1].vm_directory(&uuid).exists()).then_some(())
    });
    let tick = assert_workload_continues(&hosts.hosts[0], "busy", before.0);

    // throttle (the default): the plan asks for a throttle, QEMU applies it, the move completes.
    let started = hosts.hosts[0].json(&["vm", "migrate", "busy", "--to", "host-1", "--no-wait"]);
    let id = started["id"].as_str().expect("migration id").to_string();
    let mut throttled = 0;
    let mut plans = Vec::new();
    let ended = poll(
        "the throttled migration to end",
        Duration::from_secs(240),
        || {
            let record = hosts.hosts[0].json(&["migration", "show", &id]);
            throttled = throttled.max(record["progress"]["throttle_percent"].as_u64().unwrap_or(0));
            if let Some(plan) = record["progress"]["plan"].as_str()
                && plans.last().is_none_or(|last: &String| last != plan)
            {
                plans.push(plan.to_string());
            }
            let phase = record["phase"].as_str()?.to_string();
            ["failed", "cancelled", "completed"]
                .contains(&phase.as_str())
                .then_some(record)
        },
    );
    eprintln!("plans seen: {plans:#?}\nhighest throttle {throttled} %");
    assert_moved(&ended, "host-0", "host-1");
    assert!(throttled > 0, "qemu throttled the guest: {ended}");
    assert!(
        plans.iter().any(|plan| plan.contains("does not converge")),
        "{plans:?}"
    );
    wait_until_owned_by(&hosts.hosts[0], "busy", "host-1", "running");
    assert_workload_continues(&hosts.hosts[1], "busy", tick);

    // post-copy, with a local disk: the base image goes to host-1 first, the block mirror fills
    // host-1's overlay, and after the first full copy of memory the guest moves and runs on
    // host-1 while the rest of its memory follows (the pages it touches first, asked for over
    // QEMU's return path, which the proxy carries back); never throttled.
    hosts.hosts[0].import_guest_image("base");
    create_disk_vm(
        &hosts.hosts[0],
        "postie",
        "console=ttyS0 panic=-1 novacron.diskmark=NCMARK42 novacron.workload=1 \
         novacron.workload_mib=32 novacron.workload_dirty=2048",
    );
    let vm = wait_until_owned_by(&hosts.hosts[0], "postie", "host-0", "running");
    let uuid = vm["uuid"].as_str().expect("uuid").to_string();
    let before = poll("postie's workload ticks", Duration::from_secs(90), || {
        last_workload_tick(&hosts.hosts[0].serial_log("postie"))
    });
    let started = hosts.hosts[0].json(&[
        "vm",
        "migrate",
        "postie",
        "--to",
        "host-1",
        "--no-wait",
        "--when-not-converging",
        "post-copy",
    ]);
    let id = started["id"].as_str().expect("migration id").to_string();
    let mut plans = Vec::new();
    let ended = poll(
        "the post-copy migration to end",
        Duration::from_secs(240),
        || {
            let record = hosts.hosts[1].json(&["migration", "show", &id]);
            assert_eq!(
                record["progress"]["throttle_percent"], 0,
                "never throttled: {record}"
            );
            if let Some(plan) = record["progress"]["plan"].as_str()
                && plans.last().is_none_or(|last: &String| last != plan)
            {
                plans.push(plan.to_string());
            }
            let phase = record["phase"].as_str()?.to_string();
            ["failed", "cancelled", "completed"]
                .contains(&phase.as_str())
                .then_some(record)
        },
    );
    eprintln!("plans seen: {plans:#?}");
    assert_moved(&ended, "host-0", "host-1");
    assert!(
        ended["message"]
            .as_str()
            .is_some_and(|message| message.contains("post-copy")),
        "{ended}"
    );
    assert!(
        plans
            .iter()
            .any(|plan| plan.contains("switching to post-copy")),
        "{plans:?}"
    );
    let pause = ended["resumed_at_ms"].as_u64().expect("resumed")
        - ended["stopped_at_ms"].as_u64().expect("stopped");
    eprintln!("post-copy real pause {pause} ms");
    wait_until_owned_by(&hosts.hosts[0], "postie", "host-1", "running");
    assert!(
        ended["progress"]["disk_bytes"].as_u64().unwrap_or(0) > 0,
        "the disk was mirrored: {ended}"
    );
    assert_workload_continues(&hosts.hosts[1], "postie", before.0);
    wait_for_one_qemu("postie", &uuid, &hosts.hosts[0], Duration::from_secs(60));
    hosts.hosts[1].ok(&["vm", "stop", "postie", "--force"]);
    hosts.hosts[1].wait_for_state("postie", "stopped");
    assert_disk_marked(
        &hosts.hosts[1],
        &uuid,
        "the mark postie wrote on host-0 is in host-1's overlay",
    );
}

/// One client of the scratch keyspace for the linearizability check: random single-key reads
/// and conditional writes against one host's API, from a thread inside that host's network
/// namespace, recorded until `stop`. A write without an answer (timeout, refused connection,
/// an error status) is recorded with an unknown outcome; a failed read is dropped.
fn scratch_client(
    host: &TestHost,
    client_id: u64,
    recorder: novacron_lincheck::Recorder<novacron_lincheck::KvInput, novacron_lincheck::KvOutput>,
    completed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    completed_here: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    use novacron_lincheck::{Change, Condition, KvInput, KvOutput, Observed};
    use novacron_types::{ScratchCondition, ScratchOutcome, ScratchRead, ScratchWrite};
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::Ordering;
    let namespace = host.namespace.clone().expect("hosts run in namespaces");
    let server = host.server();
    let token = std::fs::read_to_string(host.data_dir.join("admin.token"))
        .expect("the admin token")
        .trim()
        .to_string();
    std::thread::spawn(move || {
        novacron_linkemu::netns::in_namespace(&namespace, || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async {
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(3))
                    .build()
                    .expect("an http client");
                let mut random = rand::rngs::StdRng::seed_from_u64(0x5c4a7c4 ^ client_id);
                let mut seen: std::collections::BTreeMap<String, u64> = Default::default();
                let mut serial = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    serial += 1;
                    let key = format!("k{}", random.random_range(0..3));
                    let url = format!("{server}/api/v1/scratch/{key}");
                    let choice = random.random_range(0..10);
                    let ok = if choice < 4 {
                        let pending = recorder.invoke(client_id, KvInput::Get { key: key.clone() });
                        let answer = async {
                            let response = http.get(&url).bearer_auth(&token).send().await.ok()?;
                            if !response.status().is_success() {
                                return None;
                            }
                            response.json::<ScratchRead>().await.ok()
                        }
                        .await;
                        match answer {
                            Some(read) => {
                                if let Some(value) = &read.value {
                                    seen.insert(key.clone(), value.mod_revision);
                                }
                                pending.complete(KvOutput::Get(read.value.map(|value| Observed {
                                    value: value.value.into_bytes(),
                                    create_revision: value.create_revision,
                                    mod_revision: value.mod_revision,
                                    version: value.version,
                                })));
                                true
                            }
                            None => {
                                pending.discard();
                                false
                            }
                        }
                    } else {
                        let value = format!("c{client_id}-{serial}");
                        let put = Change::Put(value.clone().into_bytes());
                        let (conditions, changes, write) = match choice {
                            4..=5 => (
                                vec![],
                                vec![put],
                                ScratchWrite {
                                    put: Some(value),
                                    ..ScratchWrite::default()
                                },
                            ),
                            6 => (
                                vec![Condition::Absent],
                                vec![put],
                                ScratchWrite {
                                    conditions: vec![ScratchCondition::Absent],
                                    put: Some(value),
                                    ..ScratchWrite::default()
                                },
                            ),
                            7..=8 => {
                                let expected = seen.get(&key).copied().unwrap_or(1);
                                (
                                    vec![Condition::ModRevision(expected)],
                                    vec![put],
                                    ScratchWrite {
                                        conditions: vec![ScratchCondition::ModRevision {
                                            mod_revision: expected,
                                        }],
                                        put: Some(value),
                                        ..ScratchWrite::default()
                                    },
                                )
                            }
                            _ => (
                                vec![Condition::Exists],
                                vec![Change::Delete],
                                ScratchWrite {
                                    conditions: vec![ScratchCondition::Exists],
                                    delete: true,
                                    ..ScratchWrite::default()
                                },
                            ),
                        };
                        let input = KvInput::Transaction {
                            key: key.clone(),
                            conditions,
                            changes,
                        };
                        let pending = recorder.invoke(client_id, input);
                        let answer = async {
                            let response = http
                                .post(&url)
                                .bearer_auth(&token)
                                .json(&write)
                                .send()
                                .await;
                            let response = response.ok()?;
                            let status = response.status();
                            assert!(
                                !status.is_client_error() || status.as_u16() == 401,
                                "a well-formed scratch write was refused: {status}"
                            );
                            if !status.is_success() {
                                return None;
                            }
                            response.json::<ScratchOutcome>().await.ok()
                        }
                        .await;
                        match answer {
                            Some(outcome) => {
                                pending.complete(KvOutput::Transaction {
                                    succeeded: outcome.succeeded,
                                    revision: outcome.revision,
                                    deleted_keys: outcome.deleted_keys,
                                    failed_condition: outcome
                                        .failed_condition
                                        .map(|index| (index, outcome.actual_mod_revision)),
                                });
                                true
                            }
                            None => {
                                // The write may have been applied: its answer never came.
                                pending.unknown();
                                false
                            }
                        }
                    };
                    if ok {
                        completed.fetch_add(1, Ordering::Relaxed);
                        completed_here.fetch_add(1, Ordering::Relaxed);
                    } else {
                        // A host without a leader (or killed): let the election finish.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            });
        })
        .expect("enter the host's namespace");
    })
}

/// Five hosts (five voters). A client per host records reads and conditional writes of the
/// scratch keyspace while the leader is killed with `kill -9` (and started again), then while
/// two hosts are cut off (a minority) and healed. The majority keeps answering in each fault;
/// the whole history, operations with unknown outcomes included, is linearizable. Then the
/// first host (the CA's maker) dies for good and a sixth host joins through another member.
#[test]
fn five_hosts_stay_linearizable_through_a_killed_leader_and_a_cut_minority_and_any_host_admits() {
    use novacron_lincheck::{CheckOptions, Recorder, Verdict, check_history};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let mut hosts = Hosts::start_with(6, &["--scratch-keys"]);
    form_region_of(&hosts, 5);
    // The keyspace is off unless asked for: a host started without the flag refuses it.
    let plain = TestHost::start();
    let token = std::fs::read_to_string(plain.data_dir.join("admin.token")).expect("token");
    let (status, body) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(async {
            let response = reqwest::Client::new()
                .get(format!("{}/api/v1/scratch/k0", plain.server()))
                .bearer_auth(token.trim())
                .send()
                .await
                .expect("the plain host answers");
            (response.status(), response.text().await.unwrap_or_default())
        });
    assert_eq!(status.as_u16(), 404, "{body}");
    assert!(body.contains("--scratch-keys"), "{body}");
    drop(plain);

    let recorder = Recorder::new();
    let completed = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let completed_by: Vec<Arc<AtomicUsize>> =
        (0..5).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let clients: Vec<_> = hosts.hosts[..5]
        .iter()
        .enumerate()
        .map(|(index, host)| {
            scratch_client(
                host,
                index as u64 + 1,
                recorder.clone(),
                completed.clone(),
                completed_by[index].clone(),
                stop.clone(),
            )
        })
        .collect();
    let wait_for = |what: &str, more: usize| {
        let target = completed.load(Ordering::Relaxed) + more;
        poll(what, Duration::from_secs(120), || {
            (completed.load(Ordering::Relaxed) >= target).then_some(())
        });
    };
    wait_for("operations before any fault", 60);

    // The leader killed: the others elect a new one and keep answering.
    let leader = leader_index(&hosts, 0);
    let survivor = (leader + 1) % 5;
    hosts.hosts[leader].kill_serve();
    poll("a new leader", Duration::from_secs(60), || {
        let list = try_cluster_list(&hosts.hosts[survivor])?;
        let name = list["hosts"]
            .as_array()?
            .iter()
            .find(|host| host["node_id"] == list["leader_id"])?["host"]
            .as_str()?
            .to_string();
        (name != format!("host-{leader}")).then_some(())
    });
    wait_for("operations with the old leader dead", 60);
    hosts.hosts[leader].spawn_serve();
    wait_for("operations with the old leader back", 40);

    // Two hosts that do not lead are cut off: the three others keep answering.
    let leader = leader_index(&hosts, survivor);
    let cut: Vec<usize> = (1..=2).map(|step| (leader + step) % 5).collect();
    for &index in &cut {
        hosts.set_link_up(index, false);
    }
    wait_for("operations with a minority cut off", 60);
    let before_healing: Vec<usize> = cut
        .iter()
        .map(|&index| completed_by[index].load(Ordering::Relaxed))
        .collect();
    for &index in &cut {
        hosts.set_link_up(index, true);
    }
    wait_for("operations after healing", 60);
    // The healed hosts answer again (their clients' reads and writes go through the leader).
    for (&index, before) in cut.iter().zip(before_healing) {
        poll(
            &format!("host-{index} answers after healing"),
            Duration::from_secs(60),
            || (completed_by[index].load(Ordering::Relaxed) >= before + 10).then_some(()),
        );
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().expect("a client thread");
    }

    let history = recorder.history();
    let summary = novacron_lincheck::summarize(&history);
    let (writes, unknown) = (summary.successful_writes, summary.unknown_outcomes);
    assert!(
        writes > 50,
        "too few successful writes to mean anything: {writes}"
    );
    let started = Instant::now();
    let verdict = check_history(&history, CheckOptions::default()).expect("a well-formed history");
    eprintln!(
        "history of {} operations ({writes} successful writes, {unknown} with unknown outcome) \
         checked in {:?}: {verdict:?}",
        history.len(),
        started.elapsed()
    );
    assert_eq!(verdict, Verdict::Linearizable);

    // The first host, which made the cluster CA, is gone for good: every member got a copy of
    // the CA, so another one admits a new host.
    hosts.hosts[0].kill_serve();
    let token = poll("a join token from host-3", Duration::from_secs(60), || {
        let output = hosts.hosts[3].cli(&[
            "cluster", "token", "create", "--ttl", "10m", "--output", "json",
        ]);
        let created: Value = serde_json::from_slice(&output.stdout).ok()?;
        Some(created["token"].as_str()?.to_string())
    });
    let via = hosts.raft_address(3);
    let raft = hosts.raft_arguments(5);
    let mut join = vec!["cluster", "join", &via, "--join-token", &token];
    join.extend(raft.iter().map(String::as_str));
    let joined = hosts.hosts[5].json(&join);
    assert_eq!(joined["region"], "test-region", "{joined}");
    poll(
        "host-5 is a healthy member",
        Duration::from_secs(60),
        || {
            let list = try_cluster_list(&hosts.hosts[3])?;
            roles(&list)
                .iter()
                .any(|(name, role, health)| name == "host-5" && role == "learner" && health == "ok")
                .then_some(())
        },
    );
}
