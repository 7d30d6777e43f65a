//! A source QEMU whose migration stream stalls and is then given up on survives, when the
//! reader gives up through [`MigrationSocketKeeper`] and
//! [`novacron_qemu::QmpClient::cancel_migration`].
//!
//! The hazard (QEMU 10 under TCG, with `auto-converge`): QEMU's 5-second dirty-bitmap sync
//! timer blocks QEMU's main loop while the migration thread's write into the socket blocks;
//! closing the socket then races the failed migration's clean-up against that timer, which
//! re-arms itself and aborts QEMU on its next tick (`Assertion 'ram_state' failed`). Closing
//! instead of draining here aborted QEMU in three of three runs.

mod common;

use std::time::Duration;

use common::{run_directory, wait_for_console};
use novacron_qemu::MigrationSocketKeeper;
use serde_json::json;
use tokio::io::AsyncReadExt;

/// How long the stream stalls: past two of QEMU's 5-second sync ticks, so one finds the
/// dirty-sync count unchanged and blocks.
const STALL_LIMIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_migration_given_up_through_the_keeper_leaves_the_source_running() {
    let run_dir = run_directory();
    let (vm, _cleanup) = common::launch_workload_guest("stalled", run_dir.path(), 16).await;
    let console = vm.run_directory().console_log();
    wait_for_console(&console, "NOVACRON-WORKLOAD tick=1 ").await;
    let qmp = vm.qmp();
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [{ "capability": "auto-converge", "state": true }] })),
    )
    .await
    .expect("auto-converge");
    // A downtime limit no pass meets: the migration runs until it is given up on.
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": 1u64 << 40, "downtime-limit": 1 })),
    )
    .await
    .expect("parameters");
    let socket_path = run_dir.path().join("out.sock");
    let listener = tokio::net::UnixListener::bind(&socket_path).expect("listen");
    qmp.execute(
        "migrate",
        Some(json!({ "uri": format!("unix:{}", socket_path.display()) })),
    )
    .await
    .expect("migrate");
    let (stream, _) = tokio::time::timeout(common::GUEST_DEADLINE, listener.accept())
        .await
        .expect("qemu connects")
        .expect("accept");
    let (mut reader, keeper) = MigrationSocketKeeper::keep(stream).expect("keep");

    // Read, at about 20 MB/s, until QEMU began its third pass.
    let mut buffer = vec![0u8; 64 << 10];
    let deadline = tokio::time::Instant::now() + common::GUEST_DEADLINE;
    let mut read_since_look = 0usize;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "no third pass");
        let read = reader.read(&mut buffer).await.expect("read the stream");
        assert!(read > 0, "qemu ended the stream");
        read_since_look += read;
        tokio::time::sleep(Duration::from_micros(read as u64 / 20)).await;
        if read_since_look >= 4 << 20 {
            read_since_look = 0;
            let info = qmp.query_migrate().await.expect("query-migrate");
            if info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 3 {
                break;
            }
        }
    }

    // The stream stalls until QEMU's main loop stops answering (its sync tick waits for the
    // blocked writer), or for STALL_LIMIT if it never does.
    let stalled = tokio::time::Instant::now();
    while stalled.elapsed() < STALL_LIMIT {
        let answered = tokio::time::timeout(Duration::from_secs(1), qmp.query_status()).await;
        if answered.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Given up on as the source's proxy gives up: its handle goes, the keeper drains, and
    // the migration is cancelled.
    drop(reader);
    drop(keeper);
    let status = qmp
        .cancel_migration(Duration::from_secs(60))
        .await
        .expect("cancel");
    assert_eq!(status, "cancelled");

    // Past three of QEMU's sync ticks the guest still runs and its memory checks pass.
    let ticks_before = std::fs::read_to_string(&console)
        .expect("console")
        .matches("NOVACRON-WORKLOAD tick=")
        .count();
    let watched = tokio::time::Instant::now();
    while watched.elapsed() < Duration::from_secs(16) {
        let status = qmp
            .query_status()
            .await
            .expect("qemu answers after the cancelled migration");
        assert!(status.running, "the guest runs: {status:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let log = std::fs::read_to_string(&console).expect("console");
    assert!(
        log.matches("NOVACRON-WORKLOAD tick=").count() > ticks_before,
        "the workload went on: {log}"
    );
    assert!(!log.contains("NOVACRON-WORKLOAD-CORRUPT"), "{log}");
    assert!(
        log.lines()
            .filter(|line| line.contains("NOVACRON-WORKLOAD tick="))
            .all(|line| line.contains(" errors=0 ")),
        "{log}"
    );
    vm.force_stop().await.expect("force stop");
}
