//! Benchmark of the link emulator itself (not a test): its forwarding ceiling with no shaping,
//! the round-trip time it adds at zero configured delay, and how closely `iperf3 -P 8` matches
//! the configured rate on shaped links. The baseline is a plain veth pair between two
//! namespaces measured in the same run. Needs root and iperf3. Prints one markdown table.
//!
//! `cargo bench -p novacron-linkemu --bench linkemu_ceiling` (LINKEMU_BENCH_SECONDS sets the
//! length of each iperf3 run, default 10; LINKEMU_BENCH_TRACE the trace replayed, default
//! ../shared/data/bandwidth-traces/TMobile-LTE-short.down).

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use novacron_linkemu::netns;
use novacron_linkemu::{DeliveryTrace, LinkCounters, LinkEmulator};

const IPERF_PORT: &str = "5201";

struct Row {
    measurement: String,
    configured: String,
    baseline: String,
    emulator: String,
    note: String,
}

/// Two namespaces joined by a veth pair: the no-emulator baseline.
struct VethPair {
    namespace_a: String,
    namespace_b: String,
}

impl VethPair {
    fn create() -> anyhow::Result<Self> {
        let base = format!("nle-benchveth-{}-0", std::process::id());
        let pair = Self {
            namespace_a: format!("{base}-a"),
            namespace_b: format!("{base}-b"),
        };
        netns::create_namespace(&pair.namespace_a)?;
        netns::create_namespace(&pair.namespace_b)?;
        netns::ip_in(
            &pair.namespace_a,
            &[
                "link",
                "add",
                "veth0",
                "type",
                "veth",
                "peer",
                "name",
                "veth0",
                "netns",
                &pair.namespace_b,
            ],
        )?;
        for (namespace, address) in [
            (&pair.namespace_a, "10.79.0.1/24"),
            (&pair.namespace_b, "10.79.0.2/24"),
        ] {
            netns::ip_in(namespace, &["addr", "add", address, "dev", "veth0"])?;
            netns::ip_in(namespace, &["link", "set", "veth0", "up"])?;
            netns::set_sysctls(namespace, &[("net.ipv4.tcp_rmem", "4096 131072 67108864")])?;
            netns::set_sysctls(namespace, &[("net.ipv4.tcp_wmem", "4096 16384 67108864")])?;
        }
        Ok(pair)
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        let _ = netns::delete_namespace(&self.namespace_a);
        let _ = netns::delete_namespace(&self.namespace_b);
    }
}

struct IperfResult {
    received_bits_per_second: f64,
    retransmits: u64,
}

/// Runs `iperf3 -P streams` from `client_namespace` to `server_address` in `server_namespace`.
fn iperf(
    client_namespace: &str,
    server_namespace: &str,
    server_address: Ipv4Addr,
    streams: u32,
    seconds: u64,
) -> anyhow::Result<IperfResult> {
    let mut server = netns::command_in(server_namespace, "iperf3")
        .args(["-s", "-1", "--forceflush", "-p", IPERF_PORT])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("start iperf3 server (is iperf3 installed?)")?;
    let mut server_output = BufReader::new(server.stdout.take().context("server stdout")?);
    let mut line = String::new();
    while !line.contains("listening") {
        line.clear();
        if server_output
            .read_line(&mut line)
            .context("iperf3 server start-up")?
            == 0
        {
            bail!("iperf3 server exited before listening");
        }
    }
    let output = netns::command_in(client_namespace, "iperf3")
        .args([
            "-c",
            &server_address.to_string(),
            "-p",
            IPERF_PORT,
            "-J",
            "-O",
            "2",
            "-t",
        ])
        .arg(seconds.to_string())
        .arg("-P")
        .arg(streams.to_string())
        .output()
        .context("run iperf3 client")?;
    let _ = server.kill();
    let _ = server.wait();
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("iperf3 json report")?;
    if let Some(error) = report.get("error") {
        bail!("iperf3 failed: {error}");
    }
    Ok(IperfResult {
        received_bits_per_second: report["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .context("received rate in report")?,
        retransmits: report["end"]["sum_sent"]["retransmits"]
            .as_u64()
            .unwrap_or(0),
    })
}

/// Median UDP round trip of `count` sequential 64-byte probes.
fn udp_round_trip(
    client_namespace: &str,
    client_address: Ipv4Addr,
    server_namespace: &str,
    server_address: Ipv4Addr,
    count: usize,
) -> anyhow::Result<Duration> {
    let server = netns::in_namespace(server_namespace, move || {
        UdpSocket::bind((server_address, 0))
    })??;
    let client = netns::in_namespace(client_namespace, move || {
        UdpSocket::bind((client_address, 0))
    })??;
    let to: SocketAddr = server.local_addr()?;
    server.set_read_timeout(Some(Duration::from_secs(2)))?;
    client.set_read_timeout(Some(Duration::from_secs(2)))?;
    let echo = std::thread::spawn(move || {
        let mut buffer = [0u8; 128];
        for _ in 0..count {
            let Ok((length, peer)) = server.recv_from(&mut buffer) else {
                return;
            };
            let _ = server.send_to(&buffer[..length], peer);
        }
    });
    let mut round_trips = Vec::with_capacity(count);
    let mut buffer = [0u8; 128];
    for _ in 0..count {
        let started = Instant::now();
        client.send_to(&[7u8; 64], to)?;
        client.recv(&mut buffer).context("probe answer")?;
        round_trips.push(started.elapsed());
    }
    let _ = echo.join();
    round_trips.sort();
    Ok(round_trips[round_trips.len() / 2])
}

fn megabits(bits_per_second: f64) -> String {
    format!("{:.1} Mbit/s", bits_per_second / 1e6)
}

/// Waits a fixed time: a benchmark's measurement window is time itself.
#[allow(clippy::disallowed_methods)]
fn pause(duration: Duration) {
    std::thread::sleep(duration);
}

/// iperf3 on a shaped link; the link's own IP-level rate is sampled from its counters over the
/// steady-state window (after iperf3's 2 s omitted warm-up).
/// CPU time this process has used (its forwarder threads; iperf3 runs in child processes).
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&index| fields.get(index)?.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

struct ShapedResult {
    iperf: IperfResult,
    ip_rate: f64,
    measured_loss: f64,
    idle_round_trip: Duration,
    forwarder_cores: f64,
}

fn shaped_run(
    rate: f64,
    one_way: Duration,
    loss: f64,
    seconds: u64,
    offload: bool,
) -> anyhow::Result<ShapedResult> {
    let streams = 8;
    let link = LinkEmulator::builder()
        .name_prefix("bench")
        .delay(one_way)
        .loss(loss)
        .rate_bits_per_sec(rate)
        .segmentation_offload(offload)
        .seed(1)
        .spawn()?;
    let idle_round_trip =
        udp_round_trip(link.ns_a(), link.addr_a(), link.ns_b(), link.addr_b(), 50)?;
    let (result, window) = std::thread::scope(|scope| {
        let running =
            scope.spawn(|| iperf(link.ns_a(), link.ns_b(), link.addr_b(), streams, seconds));
        let started = Instant::now();
        while link.counters().a_to_b.packets_received < 1000
            && started.elapsed() < Duration::from_secs(10)
        {
            pause(Duration::from_millis(5));
        }
        pause(Duration::from_secs(2));
        let before: LinkCounters = link.counters();
        let cpu_before = process_cpu_seconds();
        let window_start = Instant::now();
        pause(Duration::from_secs(seconds.saturating_sub(1).max(1)));
        let after = link.counters();
        let cpu = process_cpu_seconds() - cpu_before;
        let window = (before, after, window_start.elapsed().as_secs_f64(), cpu);
        (running.join(), window)
    });
    let result = result.map_err(|_| anyhow::anyhow!("iperf3 thread panicked"))??;
    let (before, after, elapsed, cpu) = window;
    let ip_rate =
        (after.a_to_b.bytes_forwarded - before.a_to_b.bytes_forwarded) as f64 * 8.0 / elapsed;
    let received = after.a_to_b.packets_received - before.a_to_b.packets_received;
    let measured_loss = (after.a_to_b.dropped_by_loss - before.a_to_b.dropped_by_loss) as f64
        / received.max(1) as f64;
    Ok(ShapedResult {
        iperf: result,
        ip_rate,
        measured_loss,
        idle_round_trip,
        forwarder_cores: cpu / elapsed,
    })
}

/// iperf3 -P 8 over a replayed trace (both directions), 50 ms RTT: bytes the link delivered
/// in a steady window against the trace's delivery opportunities in that same window.
fn trace_run(path: &Path, seconds: u64) -> anyhow::Result<Row> {
    let trace = DeliveryTrace::from_file(path)?;
    let link = LinkEmulator::builder()
        .name_prefix("bench")
        .delay(Duration::from_millis(25))
        .trace(path)
        .spawn()?;
    let (result, window) = std::thread::scope(|scope| {
        let running = scope.spawn(|| iperf(link.ns_a(), link.ns_b(), link.addr_b(), 8, seconds));
        pause(Duration::from_secs(3));
        let (before, start) = (link.counters(), link.elapsed());
        pause(Duration::from_secs(seconds.saturating_sub(2).max(1)));
        let (after, end) = (link.counters(), link.elapsed());
        (running.join(), (before, start, after, end))
    });
    let result = result.map_err(|_| anyhow::anyhow!("iperf3 thread panicked"))??;
    let (before, start, after, end) = window;
    let offered = trace.opportunities_between(
        u64::try_from(start.as_nanos())?,
        u64::try_from(end.as_nanos())?,
    ) as f64
        * 1500.0
        * 8.0
        / (end - start).as_secs_f64();
    let delivered = (after.a_to_b.bytes_forwarded - before.a_to_b.bytes_forwarded) as f64 * 8.0
        / (end - start).as_secs_f64();
    Ok(Row {
        measurement: format!(
            "iperf3 -P 8 over trace {}, 50 ms RTT",
            path.file_name().unwrap_or_default().to_string_lossy()
        ),
        configured: format!("{} (trace, same window)", megabits(offered)),
        baseline: "-".into(),
        emulator: megabits(delivered),
        note: format!(
            "{:.1} % of the window's opportunities used (link IP bytes); iperf3 goodput {}; trace mean {}",
            100.0 * delivered / offered,
            megabits(result.received_bits_per_second),
            megabits(trace.average_bits_per_second())
        ),
    })
}

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|argument| argument == "--list") {
        return Ok(()); // cargo test --benches asks for a list; this bench is not a test
    }
    let seconds: u64 = std::env::var("LINKEMU_BENCH_SECONDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(10);
    let _ = novacron_linkemu::cleanup_stale();
    let mut rows = Vec::new();

    // 1. Ceiling: no shaping, iperf3 -P 8, emulator against a plain veth pair.
    let veth = VethPair::create()?;
    let veth_address_a = Ipv4Addr::new(10, 79, 0, 1);
    let veth_address_b = Ipv4Addr::new(10, 79, 0, 2);
    let baseline = iperf(
        &veth.namespace_a,
        &veth.namespace_b,
        veth_address_b,
        8,
        seconds,
    )?;
    let baseline_round_trip = udp_round_trip(
        &veth.namespace_a,
        veth_address_a,
        &veth.namespace_b,
        veth_address_b,
        2000,
    )?;
    drop(veth);
    let link = LinkEmulator::builder()
        .name_prefix("bench")
        .segmentation_offload(true)
        .spawn()?;
    let offloaded = iperf(link.ns_a(), link.ns_b(), link.addr_b(), 8, seconds)?;
    drop(link);
    let link = LinkEmulator::builder().name_prefix("bench").spawn()?;
    let unshaped = iperf(link.ns_a(), link.ns_b(), link.addr_b(), 8, seconds)?;
    let emulator_round_trip =
        udp_round_trip(link.ns_a(), link.addr_a(), link.ns_b(), link.addr_b(), 2000)?;
    let single = iperf(link.ns_a(), link.ns_b(), link.addr_b(), 1, seconds)?;
    drop(link);
    rows.push(Row {
        measurement: "max forwarding rate, iperf3 -P 8, no shaping".into(),
        configured: "unlimited".into(),
        baseline: megabits(baseline.received_bits_per_second),
        emulator: megabits(unshaped.received_bits_per_second),
        note: format!("{} retransmits", unshaped.retransmits),
    });
    rows.push(Row {
        measurement: "max forwarding rate, iperf3 -P 8, no shaping, segmentation offload".into(),
        configured: "unlimited".into(),
        baseline: megabits(baseline.received_bits_per_second),
        emulator: megabits(offloaded.received_bits_per_second),
        note: format!("{} retransmits", offloaded.retransmits),
    });
    rows.push(Row {
        measurement: "max forwarding rate, 1 TCP stream, no shaping".into(),
        configured: "unlimited".into(),
        baseline: "-".into(),
        emulator: megabits(single.received_bits_per_second),
        note: format!("{} retransmits", single.retransmits),
    });
    rows.push(Row {
        measurement: "UDP round trip at zero configured delay (median of 2000)".into(),
        configured: "0 ms".into(),
        baseline: format!("{:.3} ms", baseline_round_trip.as_secs_f64() * 1e3),
        emulator: format!("{:.3} ms", emulator_round_trip.as_secs_f64() * 1e3),
        note: format!(
            "added {:.3} ms",
            (emulator_round_trip.as_secs_f64() - baseline_round_trip.as_secs_f64()) * 1e3
        ),
    });

    // 2. Accuracy on shaped links.
    for (rate, loss, offload) in [(1e9, 0.005, false), (1e9, 0.005, true), (100e6, 0.0, false)] {
        let shaped = shaped_run(rate, Duration::from_millis(25), loss, seconds, offload)?;
        let (result, ip_rate, measured_loss, round_trip) = (
            shaped.iperf,
            shaped.ip_rate,
            shaped.measured_loss,
            shaped.idle_round_trip,
        );
        // A 1500-byte IP packet carries 1448 bytes of TCP payload (timestamps on).
        let goodput_ceiling = rate * 1448.0 / 1500.0;
        rows.push(Row {
            measurement: format!(
                "iperf3 -P 8 goodput, {} 50 ms RTT {} % loss{}",
                megabits(rate),
                loss * 100.0,
                if offload { ", segmentation offload" } else { "" }
            ),
            configured: megabits(goodput_ceiling),
            baseline: "-".into(),
            emulator: megabits(result.received_bits_per_second),
            note: format!(
                "{:.1} % of payload ceiling (first 2 s omitted); link IP rate {} = {:.1} % of configured; loss applied {:.3} %; idle RTT {:.2} ms; forwarder CPU {:.2} cores",
                100.0 * result.received_bits_per_second / goodput_ceiling,
                megabits(ip_rate),
                100.0 * ip_rate / rate,
                measured_loss * 100.0,
                round_trip.as_secs_f64() * 1e3,
                shaped.forwarder_cores
            ),
        });
    }

    // 3. Trace replay: how much of the trace's capacity in the window iperf3 -P 8 gets.
    let trace_path = std::env::var("LINKEMU_BENCH_TRACE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../../shared/data/bandwidth-traces/TMobile-LTE-short.down")
        });
    if trace_path.exists() {
        rows.push(trace_run(&trace_path, seconds)?);
    } else {
        eprintln!("no trace at {}, trace row skipped", trace_path.display());
    }

    println!("| measurement | configured | baseline (veth pair) | emulator | note |");
    println!("|---|---|---|---|---|");
    for row in rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            row.measurement, row.configured, row.baseline, row.emulator, row.note
        );
    }
    Ok(())
}
