//! 1 000 concurrent API clients listing and reading VMs against one `novacron serve` (the
//! project's own load tool: one tokio task and one connection per client). Reports errors,
//! throughput and latency percentiles. Target: no errors, p99 reported.

#[path = "../tests/common/mod.rs"]
mod common;

use common::TestHost;
use std::time::Instant;

const CLIENTS: usize = 1000;
const REQUESTS_PER_CLIENT: usize = 20;
const VMS: usize = 20;

fn raise_open_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    let _ = setrlimit(Resource::Nofile, limit);
}

fn main() {
    raise_open_file_limit();
    let guest = common::guest();
    let host = TestHost::start();
    let token = std::fs::read_to_string(host.data_dir.join("admin.token"))
        .expect("token")
        .trim()
        .to_string();
    for index in 0..VMS {
        host.ok(&[
            "vm",
            "create",
            &format!("load-{index}"),
            "--kernel",
            guest.kernel.to_str().expect("utf-8"),
            "--no-start",
        ]);
    }
    let server = host.server();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (latencies, errors, elapsed) = runtime.block_on(async move {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for client_index in 0..CLIENTS {
            let server = server.clone();
            let token = token.clone();
            tasks.push(tokio::spawn(async move {
                // One connection per client, as 1 000 separate programs would have.
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .build()
                    .expect("client");
                let mut latencies = Vec::with_capacity(REQUESTS_PER_CLIENT);
                let mut errors = 0usize;
                for request_index in 0..REQUESTS_PER_CLIENT {
                    let url = if request_index % 2 == 0 {
                        format!("{server}/api/v1/vms")
                    } else {
                        format!(
                            "{server}/api/v1/vms/load-{}",
                            (client_index + request_index) % VMS
                        )
                    };
                    let sent = Instant::now();
                    match client.get(&url).bearer_auth(&token).send().await {
                        Ok(response) if response.status().is_success() => {
                            if response.bytes().await.is_err() {
                                errors += 1;
                            }
                        }
                        _ => errors += 1,
                    }
                    latencies.push(sent.elapsed());
                }
                (latencies, errors)
            }));
        }
        let mut latencies = Vec::new();
        let mut errors = 0;
        for task in tasks {
            let (task_latencies, task_errors) = task.await.expect("client task");
            latencies.extend(task_latencies);
            errors += task_errors;
        }
        (latencies, errors, started.elapsed())
    });
    let mut latencies = latencies;
    latencies.sort();
    let percentile =
        |fraction: f64| latencies[((latencies.len() as f64 - 1.0) * fraction) as usize];
    let total = latencies.len();
    println!(
        "## API load: {CLIENTS} concurrent clients, {REQUESTS_PER_CLIENT} requests each (half list of {VMS} VMs, half get one VM)\n"
    );
    println!("| requests | errors | throughput | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {total} | {errors} | {:.0} req/s | {:.1?} | {:.1?} | {:.1?} | {:.1?} |",
        total as f64 / elapsed.as_secs_f64(),
        percentile(0.5),
        percentile(0.9),
        percentile(0.99),
        latencies[total - 1]
    );
}
