//! Helpers shared by the migration integration tests: test-guest VMs (source with the memory
//! workload, destination with `-incoming`), QMP polling, console checks.

#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use novacron_qemu::{LaunchSpec, QemuBinaries, QemuVm, TestGuest, wait_for_console_text};
use serde_json::{Value, json};
use uuid::Uuid;

/// Generous: two cores shared with other builds, guests under TCG.
pub const DEADLINE: Duration = Duration::from_secs(240);

/// Guest memory and the workload's region (MiB).
pub const GUEST_MEMORY_MIB: u64 = 256;
pub const WORKLOAD_MIB: u64 = 64;
/// The workload verifies 2048 of its pages per tick: a 64 MiB region (16384 pages) is fully
/// re-verified every 8 ticks.
pub const TICKS_TO_VERIFY_WHOLE_REGION: u64 = 8;

pub fn guest() -> TestGuest {
    TestGuest::locate().unwrap_or_else(|error| panic!("{error}"))
}

pub fn binaries() -> QemuBinaries {
    QemuBinaries::locate().expect("qemu binaries")
}

/// A unique, short run directory (Unix socket paths are limited to 107 bytes).
pub fn run_directory() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ncm-")
        .tempdir_in("/tmp")
        .expect("temp dir")
}

/// The test guest with the memory workload, no disk. `incoming` makes it a migration
/// destination (`-incoming URI`), started paused so it runs only when the test says so.
pub fn guest_spec(name: &str, run_dir: &Path, incoming: Option<&str>) -> LaunchSpec {
    let extra = format!("novacron.workload=1 novacron.workload_mib={WORKLOAD_MIB}");
    let mut spec = LaunchSpec::new(name, Uuid::new_v4(), run_dir)
        .memory_mib(GUEST_MEMORY_MIB)
        .kernel(guest().kernel_boot(&extra));
    if let Some(uri) = incoming {
        spec = spec.start_paused(true);
        spec.extra_arguments = vec!["-incoming".to_owned(), uri.to_owned()];
    }
    spec
}

pub async fn launch(spec: &LaunchSpec) -> (QemuVm, KillOnDrop) {
    let vm = QemuVm::launch(&binaries(), spec)
        .await
        .expect("launch qemu");
    let guard = KillOnDrop::new(&vm);
    (vm, guard)
}

/// Polls `log` until it contains `needle`; returns the log's content.
pub async fn wait_for_console(log: &Path, needle: &str) -> String {
    match wait_for_console_text(log, needle, DEADLINE).await {
        Ok(text) => text,
        Err(error) => panic!(
            "{error}; log so far:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        ),
    }
}

/// One `NOVACRON-WORKLOAD` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkloadTick {
    pub tick: u64,
    pub verified: u64,
    pub errors: u64,
}

/// Every workload line of a console log, in order.
pub fn workload_ticks(log: &str) -> Vec<WorkloadTick> {
    log.lines()
        .filter_map(|line| {
            let start = line.find("NOVACRON-WORKLOAD tick=")?;
            let field = |name: &str| -> Option<u64> {
                let rest = &line[start..];
                let value = rest.split(' ').find_map(|part| part.strip_prefix(name))?;
                value.parse().ok()
            };
            Some(WorkloadTick {
                tick: field("tick=")?,
                verified: field("verified=")?,
                errors: field("errors=")?,
            })
        })
        .collect()
}

/// Polls `query-migrate` until its status is one of `statuses`; returns the reply.
pub async fn wait_for_migration_status(vm: &QemuVm, statuses: &[&str]) -> Value {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let reply = vm.qmp().query_migrate().await.expect("query-migrate");
        let status = reply["status"].as_str().unwrap_or_default();
        if statuses.contains(&status) {
            return reply;
        }
        assert_ne!(status, "failed", "migration failed: {reply}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "migration still {status:?} after {DEADLINE:?}: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `query-status` until the VM left `inmigrate` (the incoming stream was loaded).
pub async fn wait_until_loaded(vm: &QemuVm) -> String {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let status = vm
            .qmp()
            .execute("query-status", None)
            .await
            .expect("query-status");
        let state = status["status"].as_str().unwrap_or_default().to_owned();
        if state != "inmigrate" {
            return state;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "destination still loading after {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Caps QEMU's migration rate (raw bytes/s), so that a live migration takes several passes.
pub async fn set_max_bandwidth(vm: &QemuVm, bytes_per_second: u64) {
    vm.qmp()
        .execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": bytes_per_second })),
        )
        .await
        .expect("migrate-set-parameters");
}

pub async fn start_migration(vm: &QemuVm, uri: &str) {
    vm.qmp()
        .execute("migrate", Some(json!({ "uri": uri })))
        .await
        .expect("migrate");
}

/// Resumes a destination that loaded the stream (started paused), checks that it runs, then
/// [`check_guest_continues`]. Returns the destination's ticks.
pub async fn resume_and_check_guest_continues(
    destination: &QemuVm,
    last_source_tick: u64,
    ticks_after: u64,
) -> Vec<WorkloadTick> {
    destination.qmp().cont().await.expect("cont");
    let status = destination
        .qmp()
        .query_status()
        .await
        .expect("query-status");
    assert!(status.running, "{status:?}");
    check_guest_continues(
        &destination.run_directory().console_log(),
        last_source_tick,
        ticks_after,
    )
    .await
}

/// After the destination resumed: waits until its workload has run `ticks_after` ticks past
/// `last_source_tick` (its counter continues from the source's), and checks that memory stayed
/// intact. Returns the destination's ticks.
pub async fn check_guest_continues(
    console_log: &Path,
    last_source_tick: u64,
    ticks_after: u64,
) -> Vec<WorkloadTick> {
    guest_continues(console_log, last_source_tick, ticks_after, DEADLINE)
        .await
        .unwrap_or_else(|failure| panic!("{failure}"))
}

/// What [`check_guest_continues`] checks, as a result: `Err` says what went wrong (the guest
/// stalled before `ticks_after` more ticks within `deadline`, its counter does not continue the
/// source's, or its memory check failed).
pub async fn guest_continues(
    console_log: &Path,
    last_source_tick: u64,
    ticks_after: u64,
    deadline: Duration,
) -> Result<Vec<WorkloadTick>, String> {
    let target = last_source_tick + ticks_after;
    let log = wait_for_console_text(
        console_log,
        &format!("NOVACRON-WORKLOAD tick={target} "),
        deadline,
    )
    .await
    .map_err(|error| {
        format!(
            "the destination stalled: {error}; log so far:\n{}",
            std::fs::read_to_string(console_log).unwrap_or_default()
        )
    })?;
    if log.contains("NOVACRON-WORKLOAD-CORRUPT") {
        return Err(format!("the workload reported corruption: {log}"));
    }
    let ticks = workload_ticks(&log);
    let Some(first) = ticks.first() else {
        return Err(format!("no workload ticks on the destination: {log}"));
    };
    if first.tick <= last_source_tick || first.tick > last_source_tick + 2 {
        return Err(format!(
            "the destination's counter does not continue the source's ({last_source_tick}): \
             {ticks:?}"
        ));
    }
    if ticks.iter().any(|tick| tick.errors != 0) {
        return Err(format!("memory corrupted after migration: {log}"));
    }
    Ok(ticks)
}

/// Kills a test's QEMU when the test ends while it still runs (a failed assertion): QEMU is
/// detached in its own session and would otherwise outlive the test process.
pub struct KillOnDrop {
    pid: i32,
    uuid: String,
}

impl KillOnDrop {
    pub fn new(vm: &QemuVm) -> Self {
        Self {
            pid: vm.pid(),
            uuid: vm.uuid().to_string(),
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Only if the pid still names this QEMU (never a reused pid).
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.pid)).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&self.uuid) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &self.pid.to_string()])
                .status();
        }
    }
}

/// A destination and a source that pin each other's self-signed certificate: (destination's
/// settings, source's settings).
pub fn pinned_pair() -> (
    novacron_transport::TlsSettings,
    novacron_transport::TlsSettings,
) {
    use novacron_transport::{HostIdentity, PeerTrust, TlsSettings};
    let destination = HostIdentity::generate_self_signed("destination").expect("identity");
    let source = HostIdentity::generate_self_signed("source").expect("identity");
    (
        TlsSettings {
            trust: PeerTrust::PinnedFingerprints(vec![source.fingerprint()]),
            identity: destination.clone(),
        },
        TlsSettings {
            trust: PeerTrust::PinnedFingerprints(vec![destination.fingerprint()]),
            identity: source,
        },
    )
}

/// A splitmix64 sequence: reproducible pseudo-random words.
pub fn words(seed: u64) -> impl Iterator<Item = u64> {
    let mut state = seed;
    std::iter::repeat_with(move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}
