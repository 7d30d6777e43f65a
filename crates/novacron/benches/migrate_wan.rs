//! `novacron vm migrate` end to end across an emulated WAN, against QEMU's own migration over
//! the same link, in one run (issue 5).
//!
//! Two real `novacron serve` hosts form a region, each in its own network namespace, on two
//! sites joined by the project's link emulator (rate, one-way delay and loss in each
//! direction). A VM running the test guest's memory workload is created on `host-0` and moved
//! to `host-1` with `novacron vm migrate` (the CLI, the API, the store, the agents, the proxy
//! and the commit: everything a user's move goes through). Then QEMU's own migration moves the
//! same guest between the same namespaces over the same link: a source QEMU in `host-0`'s
//! namespace migrates over TCP straight into a destination QEMU listening in `host-1`'s.
//!
//! Reported per move: the time, the IP bytes that crossed the inter-site link towards the
//! destination (the emulator's counters), the guest's real pause (the source QEMU's STOP event
//! to the destination QEMU's RESUME event, QMP timestamps on one host clock) and whether the
//! guest's workload carried on at the destination with its memory check passing. For `vm
//! migrate` the time is the command's (from its start until it returned: the destination QEMU's
//! launch, the session, the commit) and the migration record's
//! (`total_seconds`); for QEMU's methods from `migrate` until the destination has loaded the
//! stream and `cont` was answered (the destination QEMU was launched before the clock started).

#[path = "../../migration/benches/support/arguments.rs"]
mod arguments;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../../migration/benches/support/qemu_methods.rs"]
mod qemu_methods;

use anyhow::{Context, bail};
use common::{TestHost, last_workload_tick, poll};
use novacron_linkemu::{Capacity, DirectionShape, HostLinkShape, Region, RunningRegion};
use novacron_qemu::{LaunchSpec, QemuBinaries, QemuVm, RunState};
use qemu_methods::first_event;
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};

const USAGE: &str = r#"
novacron vm migrate across an emulated WAN, against QEMU's own migration over the same link.

As root, with the test guest built (scripts/build-guest):

  cargo bench -p novacron --bench migrate_wan -- [OPTIONS]

Options (defaults in brackets):
  --rate-mbit R        link rate each way, Mbit/s [100]
  --delay-ms D         one-way delay each way, ms [25]
  --loss P             loss probability per packet each way [0]
  --memory-mib M       guest memory [512]
  --workload-mib W     the workload's region, rewritten with fresh random data [128]
  --workload-kind K    random (incompressible) or records (application-like text) [random]
  --methods LIST       vm-migrate, multifd (QEMU multifd x4 + zstd), qemu (precopy),
                       xbzrle, comma-separated, in that order per run [vm-migrate,multifd]
  --runs N             every method N times, interleaved [1]

Columns: `time` is the command's own (`vm migrate`: CLI, API, store, session, the
destination's QEMU, the copy, the commit, and the wait for the destination to record its
RESUME moment, to print the pause; QEMU: `migrate` until the destination loaded and `cont`
returned, its destination QEMU started before the clock); `until it ran there` ends at the
destination's RESUME event for both.

Environment: MIGRATE_WAN_LOGS=DIR keeps both hosts' `serve` logs of each run in DIR;
MIGRATE_WAN_LOG_FILTER sets their filter (NOVACRON_LOG, e.g.
"info,novacron_transport=debug"; default "info,openraft=warn").
"#;

/// QEMU's downtime limit, for every method (`vm migrate`'s default).
const DOWNTIME_LIMIT_MS: u64 = 300;
const RAFT_PORT: u16 = 7182;
/// The port the destination QEMU listens on for QEMU's own methods.
const QEMU_MIGRATION_PORT: u16 = 7400;
const DEADLINE: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    VmMigrate,
    QemuMultifdZstd,
    QemuPrecopy,
    QemuXbzrle,
}

impl Method {
    fn parse(text: &str) -> anyhow::Result<Method> {
        Ok(match text {
            "vm-migrate" => Method::VmMigrate,
            "multifd" => Method::QemuMultifdZstd,
            "qemu" => Method::QemuPrecopy,
            "xbzrle" => Method::QemuXbzrle,
            other => bail!("unknown method {other:?}: use vm-migrate, multifd, qemu or xbzrle"),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Method::VmMigrate => "novacron vm migrate",
            Method::QemuMultifdZstd => "qemu multifd x4 + zstd",
            Method::QemuPrecopy => "qemu precopy",
            Method::QemuXbzrle => "qemu precopy + xbzrle",
        }
    }

    /// Capabilities and parameters set on both QEMUs (QEMU's methods).
    fn settings(self) -> (Value, Value) {
        match self {
            Method::QemuMultifdZstd => qemu_methods::multifd_zstd(),
            Method::QemuXbzrle => qemu_methods::xbzrle(),
            Method::QemuPrecopy | Method::VmMigrate => (json!([]), json!({})),
        }
    }
}

struct Options {
    rate_mbit: f64,
    delay_ms: u64,
    loss: f64,
    memory_mib: u64,
    workload_mib: u64,
    workload_kind: String,
    methods: Vec<Method>,
    runs: usize,
}

fn parse_options() -> anyhow::Result<Option<Options>> {
    let mut options = Options {
        rate_mbit: 100.0,
        delay_ms: 25,
        loss: 0.0,
        memory_mib: 512,
        workload_mib: 128,
        workload_kind: "random".to_string(),
        methods: vec![Method::VmMigrate, Method::QemuMultifdZstd],
        runs: 1,
    };
    let Some(values) = arguments::named_values(USAGE)? else {
        return Ok(None);
    };
    for (name, value) in values {
        match name.as_str() {
            "--rate-mbit" => options.rate_mbit = value.parse()?,
            "--delay-ms" => options.delay_ms = value.parse()?,
            "--loss" => options.loss = value.parse()?,
            "--memory-mib" => options.memory_mib = value.parse()?,
            "--workload-mib" => options.workload_mib = value.parse()?,
            "--workload-kind" => {
                anyhow::ensure!(
                    value == "random" || value == "records",
                    "--workload-kind is random or records, not {value}"
                );
                options.workload_kind = value;
            }
            "--methods" => {
                options.methods = value
                    .split(',')
                    .map(Method::parse)
                    .collect::<anyhow::Result<_>>()?;
            }
            "--runs" => options.runs = value.parse()?,
            other => bail!("unknown option {other:?}: --help lists the options"),
        }
    }
    anyhow::ensure!(
        options.rate_mbit > 0.0 && (0.0..1.0).contains(&options.loss),
        "--rate-mbit must be above 0 and --loss in [0, 1)"
    );
    anyhow::ensure!(
        options.workload_mib * 2 <= options.memory_mib,
        "--workload-mib must be at most half of --memory-mib"
    );
    anyhow::ensure!(options.runs > 0, "--runs must be at least 1");
    Ok(Some(options))
}

/// One move's figures.
struct Outcome {
    method: Method,
    /// `vm migrate`: the command's time; QEMU: `migrate` until the destination ran.
    seconds: f64,
    /// From the command (QEMU: `migrate`) until the guest ran at the destination: its RESUME
    /// event there (QMP timestamps on this host's clock). `vm migrate`'s own time goes on
    /// while it waits for the destination to record that moment, to show the pause.
    running_seconds: Option<f64>,
    /// `vm migrate`: the migration record's own time.
    record_seconds: Option<f64>,
    wire_bytes: u64,
    pause_ms: Option<f64>,
    guest_continued: bool,
}

fn main() -> anyhow::Result<()> {
    let Some(options) = parse_options()? else {
        return Ok(());
    };
    let guest = common::guest();
    let direction = DirectionShape {
        delay: Duration::from_millis(options.delay_ms),
        loss: options.loss,
        capacity: Capacity::BitsPerSecond((options.rate_mbit * 1e6) as u64),
        ..DirectionShape::default()
    };
    let region = Region::builder()
        .name_prefix("ncmwan")
        .hosts(2)
        .sites(&[0, 1])
        .inter_site_shape(HostLinkShape {
            outbound: direction.clone(),
            inbound: direction,
        })
        .spawn()
        .context("create the namespaces and the link (the bench needs root)")?;
    let hosts = start_region(&region);
    eprintln!(
        "link: {} Mbit/s, {} ms RTT, {} % loss each way; guest {} MiB, workload {} MiB ({})",
        options.rate_mbit,
        2 * options.delay_ms,
        options.loss * 100.0,
        options.memory_mib,
        options.workload_mib,
        options.workload_kind
    );
    let runtime = tokio::runtime::Runtime::new()?;
    let mut outcomes = Vec::new();
    for run in 0..options.runs {
        for &method in &options.methods {
            eprintln!("== run {}: {}", run + 1, method.name());
            let outcome = match method {
                Method::VmMigrate => vm_migrate(&hosts, &region, &options, &guest, run)?,
                _ => runtime.block_on(qemu_migrate(method, &region, &options, &guest))?,
            };
            eprintln!(
                "   {:.2} s, {:.1} MB on the link, pause {} ms, guest continued: {}",
                outcome.seconds,
                outcome.wire_bytes as f64 / 1e6,
                outcome
                    .pause_ms
                    .map_or("?".to_string(), |pause| format!("{pause:.0}")),
                outcome.guest_continued
            );
            outcomes.push(outcome);
        }
    }
    print_table(&options, &outcomes);
    Ok(())
}

/// `serve` on both hosts, formed into a region whose one voter (and leader) is `host-0`.
fn start_region(region: &RunningRegion) -> Vec<TestHost> {
    let mut hosts = Vec::new();
    for index in 0..2 {
        let host = region.host(index).expect("host");
        let mut test_host = TestHost::in_namespace(host.namespace(), &host.address().to_string());
        test_host
            .extra_args
            .extend(["--host-name".to_string(), format!("host-{index}")]);
        // `serve`'s log filter (`NOVACRON_LOG`), for logs kept with `MIGRATE_WAN_LOGS`.
        if let Ok(filter) = std::env::var("MIGRATE_WAN_LOG_FILTER") {
            test_host
                .extra_env
                .push(("NOVACRON_LOG".to_string(), filter));
        }
        test_host.spawn_serve();
        hosts.push(test_host);
    }
    let raft = |host: &TestHost| format!("{}:{RAFT_PORT}", host.bind_ip);
    let first_raft = raft(&hosts[0]);
    hosts[0].json(&[
        "cluster",
        "init",
        "--name",
        "bench",
        "--raft-listen",
        &first_raft,
        "--advertise",
        &first_raft,
    ]);
    let token = hosts[0].json(&["cluster", "token", "create", "--ttl", "10m"]);
    let token = token["token"].as_str().expect("token").to_string();
    let second_raft = raft(&hosts[1]);
    hosts[1].json(&[
        "cluster",
        "join",
        &first_raft,
        "--join-token",
        &token,
        "--raft-listen",
        &second_raft,
        "--advertise",
        &second_raft,
    ]);
    poll(
        "both hosts in the region with fresh heartbeats",
        Duration::from_secs(60),
        || {
            let list = hosts[0].json(&["cluster", "list"]);
            let healthy = list["hosts"]
                .as_array()?
                .iter()
                .all(|host| host["health"] == "ok");
            (list["hosts"].as_array()?.len() == 2 && healthy).then_some(())
        },
    );
    hosts
}

/// The guest's kernel command line: the test guest's, with the memory workload.
fn cmdline(options: &Options) -> String {
    format!(
        "{} novacron.workload=1 novacron.workload_mib={} novacron.workload_kind={}",
        novacron_qemu::test_guest::DEFAULT_CMDLINE,
        options.workload_mib,
        options.workload_kind
    )
}

/// Whether the guest's workload carried on at the destination: its counter continues past
/// `before` (the source's tick before the move: the counter lives in the guest's memory) and
/// runs three more ticks there with no page found corrupted. `log` reads the destination's
/// console.
fn workload_carried_on(mut log: impl FnMut() -> String, before: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut first = None;
    loop {
        if let Some((tick, errors)) = last_workload_tick(&log()) {
            let first = *first.get_or_insert(tick);
            if first <= before {
                return false;
            }
            if tick >= first + 3 {
                return errors == 0;
            }
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::park_timeout(Duration::from_millis(200));
    }
}

/// Inter-site link bytes towards `host-1` (site 0 → site 1).
fn wire_bytes(region: &RunningRegion) -> u64 {
    region
        .site_link_counters(1)
        .map_or(0, |(_, from_site_0)| from_site_0.bytes_forwarded)
}

fn vm_migrate(
    hosts: &[TestHost],
    region: &RunningRegion,
    options: &Options,
    guest: &common::Guest,
    run: usize,
) -> anyhow::Result<Outcome> {
    let (source, destination) = (&hosts[0], &hosts[1]);
    let name = format!("mover-{run}");
    let memory = format!("{}MiB", options.memory_mib);
    let kernel = guest.kernel.display().to_string();
    let initrd = guest.initrd.display().to_string();
    let cmdline = cmdline(options);
    source.json(&[
        "vm",
        "create",
        &name,
        "--memory",
        &memory,
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--cmdline",
        &cmdline,
        "--host",
        "host-0",
        "--wait-timeout",
        "120",
    ]);
    source.wait_for_console(&name, "NOVACRON-WORKLOAD tick=2 ");
    let before = last_workload_tick(&source.serial_log(&name)).map_or(0, |(tick, _)| tick);
    let wire_before = wire_bytes(region);
    let started = Instant::now();
    let started_unix = unix_seconds();
    let output = source.cli(&["vm", "migrate", &name, "--to", "host-1", "-o", "json"]);
    let seconds = started.elapsed().as_secs_f64();
    let wire = wire_bytes(region) - wire_before;
    if !output.status.success() {
        bail!(
            "vm migrate failed: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            common::tail(&source.serve_log(), 4000)
        );
    }
    let record: Value = serde_json::from_slice(&output.stdout)?;
    anyhow::ensure!(record["phase"] == "completed", "not completed: {record}");
    let id = record["id"].as_str().context("migration id")?.to_string();
    // The destination records its RESUME event after the commit, maybe after the command
    // returned.
    let record = poll(
        "the migration's RESUME moment",
        Duration::from_secs(30),
        || {
            let record = source.json(&["migration", "show", &id]);
            record["resumed_at_ms"].as_u64().is_some().then_some(record)
        },
    );
    let pause_ms = record["resumed_at_ms"]
        .as_u64()
        .zip(record["stopped_at_ms"].as_u64())
        .map(|(resumed, stopped)| resumed.saturating_sub(stopped) as f64);
    let running_seconds = record["resumed_at_ms"]
        .as_u64()
        .map(|resumed| resumed as f64 / 1e3 - started_unix);
    let guest_continued = workload_carried_on(|| destination.serial_log(&name), before);
    destination.json(&["vm", "delete", &name, "--force"]);
    if let Some(directory) = std::env::var_os("MIGRATE_WAN_LOGS") {
        // Both hosts' `serve` logs, to see where a move's time went.
        for host in hosts {
            let path = Path::new(&directory).join(format!("{}-run{run}.log", host.name()));
            std::fs::write(path, host.serve_log())?;
        }
    }
    Ok(Outcome {
        method: Method::VmMigrate,
        seconds,
        running_seconds,
        record_seconds: record["total_seconds"].as_f64(),
        wire_bytes: wire,
        pause_ms,
        guest_continued,
    })
}

/// A `qemu-system-x86_64` that runs inside `namespace`.
fn qemu_in(namespace: &str, directory: &Path) -> anyhow::Result<QemuBinaries> {
    use std::os::unix::fs::PermissionsExt;
    let located = QemuBinaries::locate()?;
    let wrapper = directory.join(format!("qemu-in-{namespace}"));
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec ip netns exec {namespace} {} \"$@\"\n",
            located.system.display()
        ),
    )?;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    Ok(QemuBinaries::from_paths(wrapper, located.img)?)
}

/// Kills a QEMU when dropped, also when a move fails half-way.
struct KillOnDrop<'a>(&'a QemuVm);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

async fn qemu_migrate(
    method: Method,
    region: &RunningRegion,
    options: &Options,
    guest: &common::Guest,
) -> anyhow::Result<Outcome> {
    let scratch = tempfile::Builder::new()
        .prefix("ncmwan")
        .tempdir_in("/tmp")?;
    let uuid = uuid::Uuid::new_v4();
    let spec = |name: &str| {
        LaunchSpec::new(name, uuid, scratch.path().join(name))
            .memory_mib(options.memory_mib)
            .kernel(novacron_qemu::DirectKernelBoot {
                kernel: guest.kernel.clone(),
                initrd: Some(guest.initrd.clone()),
                cmdline: Some(cmdline(options)),
            })
    };
    let source_binaries = qemu_in(region.host(0)?.namespace(), scratch.path())?;
    let destination_binaries = qemu_in(region.host(1)?.namespace(), scratch.path())?;
    let source = QemuVm::launch(&source_binaries, &spec("source")).await?;
    let _source_guard = KillOnDrop(&source);
    let source_console = source.run_directory().console_log();
    novacron_qemu::test_guest::wait_for_console_text(
        &source_console,
        "NOVACRON-WORKLOAD tick=2 ",
        Duration::from_secs(120),
    )
    .await?;
    let before = last_workload_tick(&std::fs::read_to_string(&source_console).unwrap_or_default())
        .map_or(0, |(tick, _)| tick);
    let mut incoming = spec("destination").start_paused(true);
    incoming.extra_arguments = vec!["-incoming".to_owned(), "defer".to_owned()];
    let destination = QemuVm::launch(&destination_binaries, &incoming).await?;
    let _destination_guard = KillOnDrop(&destination);
    let (capabilities, parameters) = method.settings();
    qemu_methods::configure([&source, &destination], &capabilities, &parameters).await?;
    // QEMU applies its cap before compression: far above the link, the link sets the pace.
    source
        .qmp()
        .execute(
            "migrate-set-parameters",
            Some(json!({
                "max-bandwidth": 64u64 << 30,
                "downtime-limit": DOWNTIME_LIMIT_MS,
            })),
        )
        .await?;
    let uri = format!("tcp:{}:{QEMU_MIGRATION_PORT}", region.host(1)?.address());
    destination
        .qmp()
        .execute("migrate-incoming", Some(json!({ "uri": uri })))
        .await?;
    let mut source_events = source.subscribe_events();
    let mut destination_events = destination.subscribe_events();
    let wire_before = wire_bytes(region);
    let started = Instant::now();
    let started_unix = unix_seconds();
    source
        .qmp()
        .execute("migrate", Some(json!({ "uri": uri })))
        .await?;
    qemu_methods::wait_for_completion(&source, "QEMU's migration", started, DEADLINE).await?;
    while matches!(
        destination.qmp().query_status().await?.status,
        RunState::Inmigrate
    ) {
        if started.elapsed() > DEADLINE {
            bail!("the destination still loading after {DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    destination.qmp().cont().await?;
    let seconds = started.elapsed().as_secs_f64();
    let wire = wire_bytes(region) - wire_before;
    let stopped = first_event(&mut source_events, "STOP").await;
    let resumed = first_event(&mut destination_events, "RESUME").await;
    let destination_console = destination.run_directory().console_log();
    let guest_continued = tokio::task::block_in_place(|| {
        workload_carried_on(
            || std::fs::read_to_string(&destination_console).unwrap_or_default(),
            before,
        )
    });
    Ok(Outcome {
        method,
        seconds,
        running_seconds: resumed.map(|resumed| resumed - started_unix),
        record_seconds: None,
        wire_bytes: wire,
        pause_ms: stopped
            .zip(resumed)
            .map(|(stopped, resumed)| (resumed - stopped) * 1e3),
        guest_continued,
    })
}

/// Now, in seconds since the Unix epoch (QMP events' clock).
fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

fn print_table(options: &Options, outcomes: &[Outcome]) {
    println!(
        "\n{} Mbit/s, {} ms RTT, {} % loss; guest {} MiB, workload {} MiB ({}); floor (the \
         workload's region at the link rate) {:.1} s\n",
        options.rate_mbit,
        2 * options.delay_ms,
        options.loss * 100.0,
        options.memory_mib,
        options.workload_mib,
        options.workload_kind,
        (options.workload_mib << 20) as f64 * 8.0 / (options.rate_mbit * 1e6)
    );
    println!(
        "| method | time (s) | until it ran there (s) | migration record (s) | on the link (MB) | real pause STOP→RESUME (ms) | guest continued |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|");
    for outcome in outcomes {
        println!(
            "| {} | {:.2} | {} | {} | {:.1} | {} | {} |",
            outcome.method.name(),
            outcome.seconds,
            outcome
                .running_seconds
                .map_or("?".to_string(), |seconds| format!("{seconds:.2}")),
            outcome
                .record_seconds
                .map_or("—".to_string(), |seconds| format!("{seconds:.2}")),
            outcome.wire_bytes as f64 / 1e6,
            outcome
                .pause_ms
                .map_or("?".to_string(), |pause| format!("{pause:.0}")),
            if outcome.guest_continued { "yes" } else { "no" }
        );
    }
    for method in &options.methods {
        let mean = |seconds: &dyn Fn(&Outcome) -> Option<f64>| {
            let times: Vec<f64> = outcomes
                .iter()
                .filter(|outcome| outcome.method == *method)
                .filter_map(seconds)
                .collect();
            (times.len() > 1).then(|| (times.iter().sum::<f64>() / times.len() as f64, times.len()))
        };
        if let Some((time, runs)) = mean(&|outcome| Some(outcome.seconds)) {
            let running = mean(&|outcome| outcome.running_seconds)
                .map_or(String::new(), |(running, _)| {
                    format!(", until it ran there {running:.2} s")
                });
            println!(
                "\n{}: mean {time:.2} s{running} over {runs} runs",
                method.name()
            );
        }
    }
}
