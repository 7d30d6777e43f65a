//! `novacron serve` start to API ready, with a warm store holding 1 000 VMs (target < 300 ms).
//!
//! Creates 1 000 stopped VMs through the API once, then restarts `serve` several times and
//! measures from spawning the process to (a) the health endpoint answering and (b) an
//! authenticated `GET /api/v1/vms` returning all 1 000 records.

#[path = "../tests/common/mod.rs"]
mod common;

use common::TestHost;
use std::time::{Duration, Instant};

const VMS: usize = 1000;
const RUNS: usize = 10;

fn main() {
    let guest = common::guest();
    let mut host = TestHost::start();
    let token = std::fs::read_to_string(host.data_dir.join("admin.token")).expect("token");
    let client = reqwest::Client::new();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let server = host.server();
    runtime.block_on(async {
        for index in 0..VMS {
            let body = serde_json::json!({
                "name": format!("vm-{index:04}"),
                "kernel": guest.kernel,
                "memory_bytes": 256u64 << 20,
                "start": false,
            });
            let response = client
                .post(format!("{server}/api/v1/vms"))
                .bearer_auth(token.trim())
                .json(&body)
                .send()
                .await
                .expect("create");
            assert!(
                response.status().is_success(),
                "create vm-{index}: {}",
                response.status()
            );
        }
    });
    let mut health = Vec::new();
    let mut listed = Vec::new();
    for _ in 0..RUNS {
        host.kill_serve();
        let started = Instant::now();
        host.spawn_serve_without_waiting();
        runtime.block_on(async {
            let deadline = started + Duration::from_secs(30);
            loop {
                let answered = client.get(format!("{server}/api/v1/health")).send().await;
                if answered.is_ok_and(|response| response.status().is_success()) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "serve did not come up: {}",
                    host.serve_log()
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        health.push(started.elapsed());
        let count = runtime.block_on(async {
            client
                .get(format!("{server}/api/v1/vms"))
                .bearer_auth(token.trim())
                .send()
                .await
                .expect("list")
                .json::<Vec<serde_json::Value>>()
                .await
                .expect("json")
                .len()
        });
        listed.push(started.elapsed());
        assert_eq!(count, VMS);
    }
    let summary = |samples: &mut Vec<Duration>| {
        samples.sort();
        (
            samples[samples.len() / 2],
            samples[samples.len() * 9 / 10],
            samples[samples.len() - 1],
        )
    };
    let (health_p50, health_p90, health_max) = summary(&mut health);
    let (list_p50, list_p90, list_max) = summary(&mut listed);
    println!("## serve start-up, warm store with {VMS} VMs ({RUNS} restarts)\n");
    println!("| measured from process spawn to | p50 | p90 | max | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| health endpoint answers (polled every 2 ms) | {health_p50:.0?} | {health_p90:.0?} | {health_max:.0?} | < 300 ms |"
    );
    println!(
        "| authenticated list of {VMS} VMs returned | {list_p50:.0?} | {list_p90:.0?} | {list_max:.0?} | |"
    );
}
