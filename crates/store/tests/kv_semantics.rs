//! Key-value semantics of a single-node store: revisions, conditions, prefix deletes, reads and
//! watches.

mod common;

use std::time::Duration;

use common::{DEADLINE, open_single, single_node_config};
use novacron_store::{Condition, Consistency, Store, StoreError, Transaction, WatchEvent};

async fn next_event(watcher: &mut novacron_store::Watcher) -> WatchEvent {
    tokio::time::timeout(DEADLINE, watcher.next())
        .await
        .expect("watch event within the deadline")
        .expect("watch event")
}

#[tokio::test]
async fn every_change_bumps_the_global_revision_and_keys_track_theirs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_single(dir.path()).await;

    let start = store.current_revision().expect("revision");
    let first = store.put("vms/a", b"1".to_vec()).await.expect("put a");
    assert_eq!(first, start + 1);
    let second = store.put("vms/b", b"2".to_vec()).await.expect("put b");
    assert_eq!(second, first + 1);
    let third = store.put("vms/a", b"3".to_vec()).await.expect("update a");
    assert_eq!(third, second + 1);

    let a = store
        .get("vms/a", Consistency::Linearizable)
        .await
        .expect("get")
        .expect("a exists");
    assert_eq!(a.value, b"3");
    assert_eq!(a.create_revision, first);
    assert_eq!(a.mod_revision, third);
    assert_eq!(a.version, 2);

    // A transaction of several operations is one revision.
    let outcome = store
        .transaction(
            Transaction::new()
                .put("vms/c", b"c".to_vec())
                .put("vms/d", b"d".to_vec()),
        )
        .await
        .expect("txn");
    assert!(outcome.succeeded);
    assert_eq!(outcome.revision, third + 1);
    let c = store
        .get("vms/c", Consistency::Local)
        .await
        .expect("get")
        .expect("c");
    let d = store
        .get("vms/d", Consistency::Local)
        .await
        .expect("get")
        .expect("d");
    assert_eq!(c.mod_revision, d.mod_revision);

    // Deleting a missing key changes nothing and does not bump the revision.
    assert!(!store.delete("vms/missing").await.expect("delete"));
    assert_eq!(store.current_revision().expect("revision"), third + 1);

    // Re-created keys start over.
    assert!(store.delete("vms/a").await.expect("delete a"));
    let recreated = store.put("vms/a", b"new".to_vec()).await.expect("recreate");
    let a = store
        .get("vms/a", Consistency::Local)
        .await
        .expect("get")
        .expect("a");
    assert_eq!(a.create_revision, recreated);
    assert_eq!(a.version, 1);
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn conditions_gate_the_whole_transaction_and_report_which_failed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_single(dir.path()).await;

    let created = store
        .create("vms/web", b"v1".to_vec())
        .await
        .expect("create");
    let error = store
        .create("vms/web", b"again".to_vec())
        .await
        .expect_err("create of an existing key must fail");
    assert!(
        matches!(error, StoreError::ConditionFailed { ref key, .. } if key == "vms/web"),
        "{error}"
    );

    let revision_before = store.current_revision().expect("revision");
    let outcome = store
        .transaction(
            Transaction::new()
                .when_exists("vms/web")
                .when_mod_revision("vms/web", created + 100)
                .put("vms/web", b"v2".to_vec())
                .put("vms/other", b"x".to_vec()),
        )
        .await
        .expect("txn");
    assert!(!outcome.succeeded);
    assert_eq!(
        outcome.revision, revision_before,
        "a failed transaction does not bump the revision"
    );
    let failed = outcome.failed_condition.clone().expect("failed condition");
    assert_eq!(failed.index, 1);
    assert_eq!(
        failed.condition,
        Condition::ModRevisionEquals {
            key: "vms/web".into(),
            mod_revision: created + 100
        }
    );
    assert_eq!(failed.actual_mod_revision, Some(created));
    assert!(
        store
            .get("vms/other", Consistency::Local)
            .await
            .expect("get")
            .is_none(),
        "no operation of a failed transaction is applied"
    );
    assert!(outcome.into_result().is_err());

    // Compare-and-swap succeeds with the right revision, then fails with the stale one.
    let updated = store
        .update("vms/web", b"v2".to_vec(), created)
        .await
        .expect("cas");
    let stale = store.update("vms/web", b"v3".to_vec(), created).await;
    assert!(matches!(stale, Err(StoreError::ConditionFailed { .. })));
    let web = store
        .get("vms/web", Consistency::Local)
        .await
        .expect("get")
        .expect("web");
    assert_eq!(
        (web.value.as_slice(), web.mod_revision),
        (b"v2".as_slice(), updated)
    );

    // Key absent condition on a missing key holds.
    let outcome = store
        .transaction(
            Transaction::new()
                .when_absent("vms/nope")
                .put("vms/nope", b"1".to_vec()),
        )
        .await
        .expect("txn");
    assert!(outcome.succeeded);
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn prefix_delete_and_ordered_listing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_single(dir.path()).await;
    for name in ["c", "a", "b"] {
        store
            .put(format!("vms/{name}"), name.as_bytes().to_vec())
            .await
            .expect("put");
    }
    store
        .put("vmsx/not-a-vm", b"x".to_vec())
        .await
        .expect("put");
    store.put("images/i1", b"i".to_vec()).await.expect("put");

    let listing = store
        .list("vms/", Consistency::Linearizable)
        .await
        .expect("list");
    let keys: Vec<_> = listing.items.iter().map(|item| item.key.as_str()).collect();
    assert_eq!(keys, ["vms/a", "vms/b", "vms/c"]);
    assert_eq!(
        listing.revision,
        store.current_revision().expect("revision")
    );

    let limited = store
        .list_limited("vms/", 2, Consistency::Local)
        .await
        .expect("list");
    assert_eq!(limited.items.len(), 2);

    let deleted = store.delete_prefix("vms/").await.expect("delete prefix");
    assert_eq!(deleted, 3);
    assert!(
        store
            .list("vms/", Consistency::Local)
            .await
            .expect("list")
            .items
            .is_empty()
    );
    assert!(
        store
            .get("vmsx/not-a-vm", Consistency::Local)
            .await
            .expect("get")
            .is_some()
    );
    assert_eq!(
        store
            .list("", Consistency::Local)
            .await
            .expect("list all")
            .items
            .len(),
        2
    );
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn invalid_input_is_refused_before_raft() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_single(dir.path()).await;
    let revision = store.current_revision().expect("revision");
    for key in ["", "/vms/a", "vms//a", "vms/\u{0}"] {
        let error = store
            .put(key, b"x".to_vec())
            .await
            .expect_err("invalid key refused");
        assert!(
            matches!(error, StoreError::InvalidKey { .. }),
            "{key:?}: {error}"
        );
    }
    let error = store
        .put(
            "vms/huge",
            vec![0u8; novacron_store::kv::MAX_VALUE_BYTES + 1],
        )
        .await
        .expect_err("too large");
    assert!(matches!(error, StoreError::ValueTooLarge { .. }), "{error}");
    assert_eq!(store.current_revision().expect("revision"), revision);
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn watch_delivers_changes_in_order_filtered_by_prefix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_single(dir.path()).await;
    let mut watcher = store.watch("vms/", 0).expect("watch");

    let put_a = store.put("vms/a", b"1".to_vec()).await.expect("put");
    store
        .put("images/x", b"ignored".to_vec())
        .await
        .expect("put");
    let both = store
        .transaction(
            Transaction::new()
                .put("vms/b", b"2".to_vec())
                .delete("vms/a"),
        )
        .await
        .expect("txn")
        .revision;

    match next_event(&mut watcher).await {
        WatchEvent::Put { key_value } => {
            assert_eq!(
                (key_value.key.as_str(), key_value.mod_revision),
                ("vms/a", put_a)
            );
            assert_eq!(key_value.value, b"1");
        }
        other => panic!("expected put of vms/a, got {other:?}"),
    }
    let second = next_event(&mut watcher).await;
    assert_eq!((second.key(), second.revision()), ("vms/b", both));
    let third = next_event(&mut watcher).await;
    assert_eq!(
        third,
        WatchEvent::Delete {
            key: "vms/a".into(),
            revision: both
        }
    );
    store.shutdown().await.expect("shutdown");
    let ended = tokio::time::timeout(DEADLINE, watcher.next())
        .await
        .expect("watch ends");
    assert!(matches!(ended, Err(StoreError::ShuttingDown)), "{ended:?}");
}

#[tokio::test]
async fn watch_resumes_from_a_past_revision_without_gaps_or_repeats() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_single(dir.path()).await;
    let mut revisions = Vec::new();
    for index in 0..5 {
        revisions.push(
            store
                .put(format!("vms/{index}"), vec![index])
                .await
                .expect("put"),
        );
    }
    // Resume from the third write: history first, then live changes.
    let mut watcher = store.watch("vms/", revisions[2]).expect("watch");
    let live = store.put("vms/live", b"l".to_vec()).await.expect("put");
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(next_event(&mut watcher).await.revision());
    }
    assert_eq!(seen, [revisions[2], revisions[3], revisions[4], live]);

    // List, then watch from the listing's revision + 1: the next change is the first event.
    let listing = store
        .list("vms/", Consistency::Linearizable)
        .await
        .expect("list");
    let mut follower = store.watch("vms/", listing.revision + 1).expect("watch");
    let after = store.put("vms/after", b"a".to_vec()).await.expect("put");
    let first = next_event(&mut follower).await;
    assert_eq!((first.key(), first.revision()), ("vms/after", after));
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn watch_from_a_compacted_revision_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = single_node_config(dir.path());
    config.watch_history_revisions = 8;
    let store = Store::open(config).await.expect("open");
    let first = store.put("vms/0", b"0".to_vec()).await.expect("put");
    for index in 1..40u8 {
        store
            .put(format!("vms/{index}"), vec![index])
            .await
            .expect("put");
    }
    let error = store.watch("vms/", first).expect_err("history is gone");
    assert!(
        matches!(error, StoreError::Compacted { requested, compacted_revision } if requested == first && compacted_revision >= first),
        "{error}"
    );
    // Recent history is still there.
    let current = store.current_revision().expect("revision");
    let mut watcher = store.watch("vms/", current - 3).expect("recent watch");
    assert_eq!(next_event(&mut watcher).await.revision(), current - 3);
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_slow_watcher_catches_up_from_the_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = single_node_config(dir.path());
    config.watch_buffer = 2;
    let store = Store::open(config).await.expect("open");
    let mut watcher = store.watch("vms/", 0).expect("watch");
    let mut revisions = Vec::new();
    for index in 0..30u8 {
        revisions.push(
            store
                .put(format!("vms/{index}"), vec![index])
                .await
                .expect("put"),
        );
    }
    let mut seen = Vec::new();
    for _ in 0..30 {
        seen.push(next_event(&mut watcher).await.revision());
    }
    assert_eq!(
        seen, revisions,
        "every change, in order, despite a 2-notice buffer"
    );
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_watcher_behind_the_kept_history_is_told_to_relist() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = single_node_config(dir.path());
    config.watch_buffer = 2;
    config.watch_history_revisions = 8;
    let store = Store::open(config).await.expect("open");
    let mut watcher = store.watch("vms/", 0).expect("watch");
    for index in 0..40u8 {
        store
            .put(format!("vms/{index}"), vec![index])
            .await
            .expect("put");
    }
    let result = tokio::time::timeout(DEADLINE, watcher.next())
        .await
        .expect("answer");
    assert!(
        matches!(result, Err(StoreError::WatchLagged { .. })),
        "{result:?}"
    );
    // It stays failed rather than resuming with a gap.
    let again = tokio::time::timeout(Duration::from_secs(1), watcher.next())
        .await
        .expect("answer");
    assert!(
        matches!(again, Err(StoreError::WatchLagged { .. })),
        "{again:?}"
    );
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn concurrent_writers_get_distinct_revisions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_single(dir.path()).await;
    let mut tasks = Vec::new();
    for writer in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut revisions = Vec::new();
            for index in 0..20 {
                revisions.push(
                    store
                        .put(format!("vms/{writer}-{index}"), b"x".to_vec())
                        .await
                        .expect("put"),
                );
            }
            revisions
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("writer"));
    }
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 16 * 20, "every write has its own revision");
    assert_eq!(
        store
            .list("vms/", Consistency::Local)
            .await
            .expect("list")
            .items
            .len(),
        320
    );
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn calls_after_shutdown_fail_with_shutting_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_single(dir.path()).await;
    store.shutdown().await.expect("shutdown");
    store.shutdown().await.expect("second shutdown is a no-op");
    assert!(matches!(
        store.put("vms/a", b"1".to_vec()).await,
        Err(StoreError::ShuttingDown)
    ));
    assert!(matches!(
        store.get("vms/a", Consistency::Linearizable).await,
        Err(StoreError::ShuttingDown)
    ));
    assert!(matches!(
        store.watch("vms/", 0),
        Err(StoreError::ShuttingDown)
    ));
}

#[tokio::test]
async fn concurrent_transactions_are_group_committed_in_one_log_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_single(dir.path()).await;
    let before = store.metrics().last_log_index.expect("log index");
    let revision_before = store.current_revision().expect("revision");
    // On this single-threaded test runtime, join_all queues all 100 writes before the batcher
    // runs, so they form one batch.
    let writes = (0..100).map(|index| store.put(format!("vms/{index:03}"), vec![1u8]));
    let revisions: Vec<u64> = futures::future::join_all(writes)
        .await
        .into_iter()
        .map(|result| result.expect("put"))
        .collect();
    let after = store.metrics().last_log_index.expect("log index");
    assert_eq!(after - before, 1, "100 writes, one log entry");
    // Each transaction still has its own revision, in order.
    let expected: Vec<u64> = (revision_before + 1..=revision_before + 100).collect();
    assert_eq!(revisions, expected);
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_watcher_works_as_a_stream_and_ends_with_its_error() {
    use futures::StreamExt;

    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_single(dir.path()).await;
    let first = store.put("vms/a", b"1".to_vec()).await.expect("put");
    let second = store.put("vms/b", b"2".to_vec()).await.expect("put");
    let mut stream = Box::pin(store.watch("vms/", first).expect("watch").into_stream());
    let revisions = [
        stream
            .next()
            .await
            .expect("item")
            .expect("event")
            .revision(),
        stream
            .next()
            .await
            .expect("item")
            .expect("event")
            .revision(),
    ];
    assert_eq!(revisions, [first, second]);
    store.shutdown().await.expect("shutdown");
    let last = tokio::time::timeout(DEADLINE, stream.next())
        .await
        .expect("answer");
    assert!(
        matches!(last, Some(Err(StoreError::ShuttingDown))),
        "{last:?}"
    );
    assert!(
        stream.next().await.is_none(),
        "the stream ends after its error"
    );
}
