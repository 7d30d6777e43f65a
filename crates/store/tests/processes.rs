//! Tests across processes: `kill -9` in the middle of writes loses no acknowledged write, and a
//! second process cannot open a data directory in use.
//!
//! The child processes are this test binary run again on an ignored test
//! (`--exact NAME --ignored`), told what to do by an environment variable.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{DEADLINE, open_single};
use novacron_store::{Consistency, StoreError};

const CHILD_DIR_ENV: &str = "NOVACRON_STORE_TEST_CHILD_DIR";

fn spawn_child(test_name: &str, dir: &Path) -> Child {
    Command::new(std::env::current_exe().expect("test binary path"))
        .args([
            "--exact",
            test_name,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child test process")
}

/// Child: writes concurrently forever, printing `acked KEY REVISION` after each acknowledged
/// write, until it is killed (or a minute passes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of crash_during_writes_loses_no_acknowledged_write"]
async fn child_writes_until_killed() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return;
    };
    let store = open_single(Path::new(&dir)).await;
    let generation = store.current_revision().expect("revision");
    println!("ready");
    let started = Instant::now();
    let mut writers = Vec::new();
    for writer in 0..8 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut index = 0u64;
            while started.elapsed() < Duration::from_secs(60) {
                let key = format!("crash/{generation}/{writer}/{index}");
                let revision = store
                    .put(key.clone(), key.clone().into_bytes())
                    .await
                    .expect("put");
                println!("acked {key} {revision}");
                index += 1;
            }
        }));
    }
    for writer in writers {
        writer.await.expect("writer");
    }
}

/// Child: tries to open a directory the parent holds and reports the error.
#[tokio::test]
#[ignore = "child process of a_second_process_cannot_open_the_same_directory"]
async fn child_tries_to_open() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return;
    };
    match novacron_store::Store::open(common::single_node_config(Path::new(&dir))).await {
        Err(error @ StoreError::AlreadyOpen { .. }) => println!("already-open: {error}"),
        Err(other) => println!("other-error: {other}"),
        Ok(_) => println!("opened"),
    }
}

/// Runs one writer child, kills it with SIGKILL after `acks` acknowledged writes, and returns
/// the acknowledged keys with their revisions.
fn run_and_kill_writer(dir: &Path, acks: usize) -> BTreeMap<String, u64> {
    let mut child = spawn_child("child_writes_until_killed", dir);
    let stdout = child.stdout.take().expect("child stdout");
    let mut acked = BTreeMap::new();
    let started = Instant::now();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read child output");
        // libtest may print "test NAME ... " in front of the child's first line.
        if let Some(rest) = line.split_once("acked ").map(|(_, rest)| rest) {
            let (key, revision) = rest.split_once(' ').expect("acked line");
            acked.insert(key.to_string(), revision.parse::<u64>().expect("revision"));
            if acked.len() >= acks {
                break;
            }
        }
        assert!(started.elapsed() < DEADLINE * 3, "child too slow");
    }
    assert!(
        acked.len() >= acks,
        "child stopped after {} acks",
        acked.len()
    );
    // Child::kill sends SIGKILL: no destructor, no shutdown, writes in flight.
    child.kill().expect("kill -9 the child");
    child.wait().expect("reap the child");
    acked
}

#[test]
fn crash_during_writes_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut all_acked = BTreeMap::new();
    for round in 0..2 {
        let acked = run_and_kill_writer(dir.path(), 300);
        all_acked.extend(acked.clone());
        runtime.block_on(async {
            let store = open_single(dir.path()).await;
            let revision = store.current_revision().expect("revision");
            let highest_acked = acked.values().copied().max().unwrap_or_default();
            assert!(
                revision >= highest_acked,
                "round {round}: revision {revision} after restart is below acknowledged {highest_acked}"
            );
            for (key, acked_revision) in &all_acked {
                let stored = store
                    .get(key, Consistency::Linearizable)
                    .await
                    .expect("get")
                    .unwrap_or_else(|| panic!("round {round}: acknowledged write {key} lost"));
                assert_eq!(stored.value, key.as_bytes());
                assert_eq!(stored.mod_revision, *acked_revision, "{key}");
            }
            // Revisions stay dense and unique across the crash.
            let listing = store.list("crash/", Consistency::Linearizable).await.expect("list");
            let mut revisions: Vec<u64> = listing.items.iter().map(|item| item.mod_revision).collect();
            revisions.sort_unstable();
            revisions.dedup();
            assert_eq!(revisions.len(), listing.items.len());
            let after = store.put("crash/after", b"ok".to_vec()).await.expect("write after crash");
            assert!(after > revision);
            store.shutdown().await.expect("shutdown");
        });
    }
}

#[test]
fn a_second_process_cannot_open_the_same_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let store = runtime.block_on(open_single(dir.path()));
    let child = spawn_child("child_tries_to_open", dir.path());
    let output = child.wait_with_output().expect("child output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "child failed: {stdout}");
    let line = stdout
        .lines()
        .find(|line| {
            line.contains("already-open: ")
                || line.contains("other-error: ")
                || line.ends_with("opened")
        })
        .unwrap_or_else(|| panic!("child printed no result: {stdout}"));
    assert!(line.contains("already-open: "), "{line}");
    assert!(
        line.contains("another process"),
        "the message tells the operator what to do: {line}"
    );
    let store = Arc::new(store);
    runtime.block_on(async {
        store
            .put("vms/still-mine", b"1".to_vec())
            .await
            .expect("the owner keeps working");
        store.shutdown().await.expect("shutdown");
    });
}
