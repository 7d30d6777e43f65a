//! Store benchmark: durable writes per second and latency on a one-node store, for 1 and 256
//! concurrent writers, against the floor of the same disk: one fsynced redb transaction per
//! write with no raft. Also start-up time with 1 000 VM records and read latency.
//!
//! Run: `cargo bench -p novacron-store --bench store_writes` (about a minute). Options by
//! environment: `STORE_BENCH_SECONDS` (per write scenario, default 5), `STORE_BENCH_WRITERS`
//! (comma-separated writer counts, default `1,256`), `STORE_BENCH_WRITES_ONLY` (skip start-up
//! and reads), `STORE_BENCH_DIR` (where the databases go, default the system temp dir: keep it
//! on the disk you care about, never on tmpfs).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use novacron_store::{Consistency, Store, StoreConfig, Transaction};
use redb::{Database, ReadableDatabase, TableDefinition};

const BASELINE_TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");

fn vm_record(index: usize) -> Vec<u8> {
    format!(
        r#"{{"name":"vm-{index:06}","image":"blake3:{:064x}","cpus":2,"memory_bytes":536870912,"disk_bytes":2147483648,"state":"running","host":"host-1","restart_policy":"always","labels":{{"team":"web","tier":"frontend"}}}}"#,
        index
    )
    .into_bytes()
}

struct Figures {
    operations: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Figures {
    fn rate(&self) -> f64 {
        self.operations as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&mut self, fraction: f64) -> Duration {
        self.latencies.sort_unstable();
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let index = ((self.latencies.len() as f64 - 1.0) * fraction).round() as usize;
        self.latencies[index]
    }
}

fn bench_root() -> PathBuf {
    std::env::var_os("STORE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

fn scenario_duration() -> Duration {
    let seconds = std::env::var("STORE_BENCH_SECONDS")
        .ok()
        .and_then(|value| value.parse::<f64>().ok())
        .unwrap_or(5.0);
    Duration::from_secs_f64(seconds)
}

async fn store_writes(dir: &Path, writers: usize, duration: Duration) -> Figures {
    let store = Store::open(StoreConfig::new(dir, 1, "127.0.0.1:0"))
        .await
        .expect("open store");
    // Warm-up: a few writes so the first fsyncs of a fresh file are not counted.
    for index in 0..20 {
        if let Err(error) = store.put(format!("warmup/{index}"), vm_record(index)).await {
            panic!(
                "warm-up write {index}: {error}; metrics {:?}",
                store.metrics()
            );
        }
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut index = 0;
            while started.elapsed() < duration {
                let key = format!("vms/w{writer}-{index}");
                let begin = Instant::now();
                store.put(key, vm_record(index)).await.expect("put");
                latencies.push(begin.elapsed());
                index += 1;
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("writer task"));
    }
    let elapsed = started.elapsed();
    store.shutdown().await.expect("shutdown");
    Figures {
        operations: latencies.len(),
        elapsed,
        latencies,
    }
}

/// The baseline: the same writes straight into redb, one fsynced transaction each, no raft.
/// Concurrent writers share the database; redb serializes its write transactions.
async fn redb_writes(dir: &Path, writers: usize, duration: Duration) -> Figures {
    std::fs::create_dir_all(dir).expect("baseline dir");
    let database = Arc::new(Database::create(dir.join("baseline.redb")).expect("create redb"));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let database = database.clone();
        tasks.push(tokio::task::spawn_blocking(move || {
            let mut latencies = Vec::new();
            let mut index = 0;
            while started.elapsed() < duration {
                let key = format!("vms/w{writer}-{index}");
                let begin = Instant::now();
                let transaction = database.begin_write().expect("begin");
                transaction
                    .open_table(BASELINE_TABLE)
                    .expect("table")
                    .insert(key.as_str(), vm_record(index).as_slice())
                    .expect("insert");
                transaction.commit().expect("commit");
                latencies.push(begin.elapsed());
                index += 1;
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("writer task"));
    }
    Figures {
        operations: latencies.len(),
        elapsed: started.elapsed(),
        latencies,
    }
}

/// Median time to open a fresh directory: create the database, initialize a one-voter cluster,
/// elect itself, and serve a first linearizable read.
async fn fresh_open(root: &Path) -> Duration {
    let mut times = Vec::new();
    for attempt in 0..10 {
        let dir = root.join(format!("fresh-{attempt}"));
        let begin = Instant::now();
        let store = Store::open(StoreConfig::new(&dir, 1, "127.0.0.1:0"))
            .await
            .expect("open fresh");
        store
            .list("vms/", Consistency::Linearizable)
            .await
            .expect("list");
        times.push(begin.elapsed());
        store.shutdown().await.expect("shutdown");
    }
    times.sort_unstable();
    times[5]
}

async fn startup(dir: &Path) -> (Duration, Duration, Duration) {
    {
        let store = Store::open(StoreConfig::new(dir, 1, "127.0.0.1:0"))
            .await
            .expect("open");
        for batch in 0..10 {
            let mut transaction = Transaction::new();
            for index in batch * 100..(batch + 1) * 100 {
                transaction = transaction.put(format!("vms/vm-{index:04}"), vm_record(index));
            }
            store.transaction(transaction).await.expect("batch");
        }
        store.shutdown().await.expect("shutdown");
    }
    let mut store_times = Vec::new();
    for _ in 0..10 {
        let begin = Instant::now();
        let store = Store::open(StoreConfig::new(dir, 1, "127.0.0.1:0"))
            .await
            .expect("reopen");
        let listing = store
            .list("vms/", Consistency::Linearizable)
            .await
            .expect("list");
        assert_eq!(listing.items.len(), 1000);
        store_times.push(begin.elapsed());
        store.shutdown().await.expect("shutdown");
    }
    // Baseline: open the same redb file and read the 1 000 records, no raft.
    let mut redb_times = Vec::new();
    let path = dir.join(novacron_store::DATABASE_FILE_NAME);
    for _ in 0..10 {
        let begin = Instant::now();
        let database = Database::open(&path).expect("open redb");
        let transaction = database.begin_read().expect("read");
        let table = transaction.open_table(BASELINE_TABLE).expect("kv table");
        let count = table
            .range::<&str>("vms/"..)
            .expect("range")
            .filter_map(|item| item.ok())
            .filter(|(key, _)| key.value().starts_with("vms/"))
            .count();
        assert_eq!(count, 1000);
        redb_times.push(begin.elapsed());
    }
    store_times.sort_unstable();
    redb_times.sort_unstable();
    (store_times[5], store_times[9], redb_times[5])
}

async fn reads(dir: &Path, consistency: Consistency, count: usize) -> Figures {
    let store = Store::open(StoreConfig::new(dir, 1, "127.0.0.1:0"))
        .await
        .expect("open");
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(count);
    for index in 0..count {
        let key = format!("vms/vm-{:04}", index % 1000);
        let begin = Instant::now();
        let item = store.get(&key, consistency).await.expect("get");
        assert!(item.is_some());
        latencies.push(begin.elapsed());
    }
    let elapsed = started.elapsed();
    store.shutdown().await.expect("shutdown");
    Figures {
        operations: count,
        elapsed,
        latencies,
    }
}

fn millis(duration: Duration) -> String {
    format!("{:.2}", duration.as_secs_f64() * 1000.0)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let root = tempfile::tempdir_in(bench_root()).expect("bench dir");
    let duration = scenario_duration();
    runtime.block_on(async {
        println!(
            "## novacron-store: one-node store on this machine ({duration:?} per write scenario)\n"
        );
        println!("| scenario | writers | writes/s | p50 ms | p99 ms |");
        println!("|---|---:|---:|---:|---:|");
        let writer_counts: Vec<usize> = std::env::var("STORE_BENCH_WRITERS")
            .ok()
            .map(|list| {
                list.split(',')
                    .filter_map(|item| item.trim().parse().ok())
                    .collect()
            })
            .unwrap_or_else(|| vec![1, 256]);
        for writers in writer_counts {
            let mut store_figures = store_writes(
                &root.path().join(format!("store-{writers}")),
                writers,
                duration,
            )
            .await;
            let mut redb_figures = redb_writes(
                &root.path().join(format!("redb-{writers}")),
                writers,
                duration,
            )
            .await;
            for (name, figures) in [
                (
                    "novacron store put (raft + redb, fsync)",
                    &mut store_figures,
                ),
                (
                    "baseline: redb, one fsynced txn per write",
                    &mut redb_figures,
                ),
            ] {
                let p50 = figures.percentile(0.50);
                let p99 = figures.percentile(0.99);
                println!(
                    "| {name} | {writers} | {:.0} | {} | {} |",
                    figures.rate(),
                    millis(p50),
                    millis(p99)
                );
            }
        }
        if std::env::var("STORE_BENCH_WRITES_ONLY").is_ok() {
            return;
        }

        let startup_dir = root.path().join("startup");
        let (store_p50, store_max, redb_p50) = startup(&startup_dir).await;
        println!("\n| start-up with 1 000 VM records | median ms | max ms |");
        println!("|---|---:|---:|");
        println!(
            "| Store::open + linearizable list of vms/ | {} | {} |",
            millis(store_p50),
            millis(store_max)
        );
        println!(
            "| baseline: redb open + read of vms/ | {} | |",
            millis(redb_p50)
        );
        let fresh = fresh_open(root.path()).await;
        println!(
            "| first start: open an empty directory + linearizable list | {} | |",
            millis(fresh)
        );

        println!("\n| read (1 000 VM records, 1 reader) | reads/s | p50 ms | p99 ms |");
        println!("|---|---:|---:|---:|");
        for (name, consistency) in [
            ("get, local", Consistency::Local),
            ("get, linearizable (read-index)", Consistency::Linearizable),
        ] {
            let mut figures = reads(&startup_dir, consistency, 20_000).await;
            let p50 = figures.percentile(0.50);
            let p99 = figures.percentile(0.99);
            println!(
                "| {name} | {:.0} | {} | {} |",
                figures.rate(),
                millis(p50),
                millis(p99)
            );
        }
    });
}
