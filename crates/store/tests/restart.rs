//! Restarts: state survives a clean restart, a drop without shutdown, a snapshot and log purge,
//! and a store with 1 000 VM records opens quickly.

mod common;

use std::time::{Duration, Instant};

use common::{DEADLINE, eventually, open_single, single_node_config};
use novacron_store::{Consistency, NodeRole, Store, StoreError, Transaction};

fn vm_record(index: usize) -> Vec<u8> {
    format!(
        r#"{{"name":"vm-{index:04}","image":"blake3:{:064x}","cpus":2,"memory_bytes":536870912,"disk_bytes":2147483648,"state":"running","host":"host-1","restart_policy":"always","labels":{{"team":"web","tier":"frontend"}}}}"#,
        index
    )
    .into_bytes()
}

#[tokio::test]
async fn restart_keeps_keys_revisions_and_leadership() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (revision, applied) = {
        let store = open_single(dir.path()).await;
        store.put("vms/a", b"1".to_vec()).await.expect("put");
        store.put("vms/b", b"2".to_vec()).await.expect("put");
        store.delete("vms/a").await.expect("delete");
        let revision = store.current_revision().expect("revision");
        let applied = store.metrics().last_applied_index;
        store.shutdown().await.expect("shutdown");
        (revision, applied)
    };

    let store = open_single(dir.path()).await;
    let metrics = store.metrics();
    assert_eq!(metrics.role, NodeRole::Leader);
    assert_eq!(metrics.leader_id, Some(1));
    assert!(
        metrics.last_applied_index >= applied,
        "applied state is persistent: {:?} < {applied:?}",
        metrics.last_applied_index
    );
    assert_eq!(store.current_revision().expect("revision"), revision);
    assert!(
        store
            .get("vms/a", Consistency::Linearizable)
            .await
            .expect("get")
            .is_none()
    );
    let b = store
        .get("vms/b", Consistency::Linearizable)
        .await
        .expect("get")
        .expect("b");
    assert_eq!(b.value, b"2");
    let next = store
        .put("vms/c", b"3".to_vec())
        .await
        .expect("put after restart");
    assert_eq!(next, revision + 1);
    // The watch history survives too.
    let mut watcher = store
        .watch("vms/", revision)
        .expect("watch from before restart");
    let event = tokio::time::timeout(DEADLINE, watcher.next())
        .await
        .expect("event")
        .expect("event");
    assert_eq!(event.revision(), revision);
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn dropping_without_shutdown_releases_the_directory_and_keeps_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open_single(dir.path()).await;
        store.put("vms/kept", b"yes".to_vec()).await.expect("put");
        // No shutdown: the last handle is dropped.
    }
    let store = eventually("the dropped store to release its database", || {
        let config = single_node_config(dir.path());
        async move {
            match Store::open(config).await {
                Ok(store) => Some(store),
                Err(StoreError::AlreadyOpen { .. }) => None,
                Err(other) => panic!("unexpected open error: {other}"),
            }
        }
    })
    .await;
    let kept = store
        .get("vms/kept", Consistency::Linearizable)
        .await
        .expect("get");
    assert_eq!(kept.expect("kept").value, b"yes");
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn snapshot_and_log_purge_then_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = single_node_config(dir.path());
    config.snapshot_after_log_entries = 50;
    let revision = {
        let store = Store::open(config.clone()).await.expect("open");
        for index in 0..200 {
            store
                .put(format!("vms/{index:03}"), vm_record(index))
                .await
                .expect("put");
        }
        let metrics = store
            .wait_for("a snapshot and a log purge", DEADLINE, |metrics| {
                metrics.snapshot_index.is_some() && metrics.purged_index.is_some()
            })
            .await
            .expect("snapshot");
        assert!(metrics.purged_index <= metrics.snapshot_index);
        let snapshot_index = store.snapshot_now(DEADLINE).await.expect("snapshot now");
        assert!(snapshot_index >= metrics.snapshot_index.unwrap_or_default());
        let revision = store.current_revision().expect("revision");
        store.shutdown().await.expect("shutdown");
        revision
    };
    let store = Store::open(config).await.expect("reopen");
    assert_eq!(store.current_revision().expect("revision"), revision);
    let listing = store
        .list("vms/", Consistency::Linearizable)
        .await
        .expect("list");
    assert_eq!(listing.items.len(), 200);
    assert_eq!(listing.items[7].value, vm_record(7));
    store
        .put("vms/after", b"x".to_vec())
        .await
        .expect("write after restart");
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn store_with_a_thousand_vm_records_reopens_quickly() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open_single(dir.path()).await;
        for batch in 0..10 {
            let mut transaction = Transaction::new();
            for index in batch * 100..(batch + 1) * 100 {
                transaction = transaction.put(format!("vms/vm-{index:04}"), vm_record(index));
            }
            store.transaction(transaction).await.expect("batch");
        }
        store.shutdown().await.expect("shutdown");
    }
    let started = Instant::now();
    let store = open_single(dir.path()).await;
    let open_time = started.elapsed();
    let listing = store
        .list("vms/", Consistency::Linearizable)
        .await
        .expect("list");
    let ready_time = started.elapsed();
    assert_eq!(listing.items.len(), 1000);
    eprintln!("open with 1000 vm records: {open_time:?}, open + linearizable list: {ready_time:?}");
    // The figure belongs to the benchmark; this only catches a pathological start-up (such as
    // replaying the whole log or an election timeout per start).
    assert!(ready_time < Duration::from_secs(5), "{ready_time:?}");
    store.shutdown().await.expect("shutdown");
}
