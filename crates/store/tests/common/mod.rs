//! Helpers shared by the store's integration tests.

#![allow(dead_code)]

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use novacron_store::{Store, StoreConfig};

/// Generous bound for anything that should take milliseconds; only hit when a test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A single-node config in `dir`.
pub fn single_node_config(dir: &Path) -> StoreConfig {
    StoreConfig::new(dir, 1, "127.0.0.1:0")
}

/// Opens a single-node store in `dir`.
pub async fn open_single(dir: &Path) -> Store {
    Store::open(single_node_config(dir))
        .await
        .expect("open single-node store")
}

/// Polls `check` until it returns `Some`, failing the test after `DEADLINE`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
