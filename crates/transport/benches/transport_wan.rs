//! Transfer benchmark of the transport over the WAN link emulator (`novacron-linkemu`), against a
//! single TCP stream (socat, with the system's default congestion control and with CUBIC),
//! rsync (daemon mode), scp, and `iperf3 -P 8` as the ceiling. Prints one markdown table.
//!
//! Run as root: `cargo bench -p novacron-transport --bench transport_wan -- [options]`
//! (see bench/transport/README.md). The same executable is re-run inside the namespaces as the
//! NovaCron sender and receiver (`DWCP_BENCH_ROLE=send|recv`).

use std::io::{BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use novacron_linkemu::{LinkEmulator, RunningLink};
use novacron_transport::{
    HostIdentity, Listener, PeerTrust, RateObserver, Session, SessionOptions, TlsSettings,
};
use rustls::pki_types::CertificateDer;
use std::sync::Arc;

const NOVACRON_PORT: u16 = 7400;
const SOCAT_PORT: u16 = 7401;
const RSYNC_PORT: u16 = 7402;
const SSH_PORT: u16 = 7403;
const IPERF_PORT: u16 = 7404;
const MIB: u64 = 1 << 20;
/// The NovaCron receiver's stdout line when the last byte has arrived: the transfer's end, as a
/// socat receiver's exit is its end.
const RECEIVER_COMPLETE: &str = "complete";
/// Bytes sent by the CUBIC single stream on a lossy link, and the rate its time limit assumes
/// (Mathis: about 4 Mbit/s at 50 ms RTT and 0.5 % loss).
const CUBIC_LOSSY_BYTES: u64 = 16 * MIB;
const CUBIC_LOSSY_FLOOR_BITS_PER_SECOND: f64 = 1e6;
/// `novacron-kept`: the first session's size (an earlier transfer between the same hosts) and
/// the pause before the timed one.
const KEPT_WARM_UP_MIB: u64 = 256;
const KEPT_IDLE: Duration = Duration::from_secs(5);

struct Scenario {
    name: &'static str,
    description: String,
    /// Link rate for the share column (bits/s of IP packets).
    link_bits_per_second: f64,
    size_bytes: u64,
    /// Random loss on the link: CUBIC then collapses (Mathis), so its row moves less data.
    lossy: bool,
    build: Box<dyn Fn() -> anyhow::Result<RunningLink>>,
}

struct Row {
    scenario: String,
    tool: &'static str,
    bytes: u64,
    seconds: Option<f64>,
    link_bits_per_second: f64,
    note: String,
}

fn main() -> anyhow::Result<()> {
    match std::env::var("DWCP_BENCH_ROLE").as_deref() {
        Ok("recv") => return child_receive(),
        Ok("send") => return child_send(),
        _ => {}
    }
    let options = BenchOptions::parse()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(options))
}

struct BenchOptions {
    size_bytes: u64,
    trace_size_bytes: u64,
    scenarios: Vec<String>,
    tools: Vec<String>,
    trace: PathBuf,
    offload: bool,
}

impl BenchOptions {
    fn parse() -> anyhow::Result<BenchOptions> {
        let mut options = BenchOptions {
            size_bytes: 256 * MIB,
            trace_size_bytes: 32 * MIB,
            scenarios: vec!["a".into(), "b".into(), "c".into()],
            tools: [
                "novacron",
                "novacron-forecast",
                "novacron-kept",
                "socat",
                "socat-cubic",
                "rsync",
                "scp",
                "iperf3",
            ]
            .map(String::from)
            .to_vec(),
            trace: PathBuf::from("/work/shared/data/bandwidth-traces/TMobile-LTE-short.down"),
            offload: true,
        };
        let mut arguments = std::env::args().skip(1);
        while let Some(argument) = arguments.next() {
            let mut value = || arguments.next().context("missing value");
            match argument.as_str() {
                // cargo bench passes this to every harness = false target.
                "--bench" => {}
                "--full" => {
                    options.size_bytes = 2048 * MIB;
                    options.trace_size_bytes = 256 * MIB;
                }
                "--size-mib" => options.size_bytes = value()?.parse::<u64>()? * MIB,
                "--trace-size-mib" => options.trace_size_bytes = value()?.parse::<u64>()? * MIB,
                "--scenarios" => {
                    options.scenarios = value()?.split(',').map(String::from).collect()
                }
                "--tools" => options.tools = value()?.split(',').map(String::from).collect(),
                "--trace" => options.trace = PathBuf::from(value()?),
                "--no-offload" => options.offload = false,
                other => bail!("unknown argument {other}"),
            }
        }
        Ok(options)
    }
}

async fn run(options: BenchOptions) -> anyhow::Result<()> {
    let work = tempfile::Builder::new()
        .prefix("transport-bench-")
        .tempdir_in("/var/tmp")?;
    let largest = options.size_bytes.max(options.trace_size_bytes);
    let data_file = work.path().join("payload.bin");
    eprintln!("writing {} MiB of random data", largest / MIB);
    write_random_file(&data_file, largest)?;
    write_identities(work.path())?;

    let trace = options.trace.clone();
    let offload = options.offload;
    let trace_rate = novacron_linkemu::DeliveryTrace::from_file(&trace)?.average_bits_per_second();
    let mut scenarios = Vec::new();
    for name in &options.scenarios {
        let scenario = match name.as_str() {
            "a" => Scenario {
                name: "a",
                description: "1 Gbit/s, 50 ms RTT, 0.5 % loss".into(),
                link_bits_per_second: 1e9,
                size_bytes: options.size_bytes,
                lossy: true,
                build: Box::new(move || {
                    Ok(LinkEmulator::builder()
                        .name_prefix("tra")
                        .segmentation_offload(offload)
                        .delay(Duration::from_millis(25))
                        .loss(0.005)
                        .rate_bits_per_sec(1e9)
                        .seed(11)
                        .spawn()?)
                }),
            },
            "b" => Scenario {
                name: "b",
                description: "100 Mbit/s, 50 ms RTT, 0 % loss".into(),
                link_bits_per_second: 1e8,
                size_bytes: options.size_bytes,
                lossy: false,
                build: Box::new(move || {
                    Ok(LinkEmulator::builder()
                        .name_prefix("trb")
                        .segmentation_offload(offload)
                        .delay(Duration::from_millis(25))
                        .rate_bits_per_sec(1e8)
                        .seed(12)
                        .spawn()?)
                }),
            },
            "c" => {
                let trace = trace.clone();
                Scenario {
                    name: "c",
                    description: format!(
                        "trace {} (mean {:.1} Mbit/s), 50 ms RTT",
                        trace.file_name().unwrap_or_default().to_string_lossy(),
                        trace_rate / 1e6
                    ),
                    link_bits_per_second: trace_rate,
                    size_bytes: options.trace_size_bytes,
                    lossy: false,
                    build: Box::new(move || {
                        Ok(LinkEmulator::builder()
                            .name_prefix("trc")
                            .segmentation_offload(offload)
                            .delay(Duration::from_millis(25))
                            .trace_a_to_b(trace.clone())
                            .seed(13)
                            .spawn()?)
                    }),
                }
            }
            other => bail!("unknown scenario {other}"),
        };
        scenarios.push(scenario);
    }

    let mut rows = Vec::new();
    for scenario in &scenarios {
        let label = format!("({}) {}", scenario.name, scenario.description);
        // The link model's forecast after the last NovaCron transfer on this scenario's link.
        let mut forecast = None;
        for tool in &options.tools {
            let link = (scenario.build)().context("cannot set up the emulated link")?;
            eprintln!("{label}: {tool}, {} MiB", scenario.size_bytes / MIB);
            let outcome = match tool.as_str() {
                "novacron" | "novacron-kept" => {
                    run_novacron(
                        &link,
                        work.path(),
                        &data_file,
                        scenario,
                        None,
                        tool == "novacron-kept",
                        &mut forecast,
                    )
                    .await
                }
                "novacron-forecast" => match forecast {
                    Some(bits_per_second) => {
                        run_novacron(
                            &link,
                            work.path(),
                            &data_file,
                            scenario,
                            Some(bits_per_second),
                            false,
                            &mut forecast,
                        )
                        .await
                    }
                    None => Err(anyhow::anyhow!(
                        "no forecast of this link yet: list the novacron tool before it"
                    )),
                },
                "socat" => run_socat(&link, &data_file, scenario, None).await,
                "socat-cubic" => run_socat(&link, &data_file, scenario, Some("cubic")).await,
                "rsync" => run_rsync(&link, work.path(), &data_file, scenario).await,
                "scp" => run_scp(&link, work.path(), &data_file, scenario).await,
                "iperf3" => run_iperf(&link, scenario).await,
                other => bail!("unknown tool {other}"),
            };
            let counters = link.counters();
            drop(link);
            let (tool_name, bytes, seconds, mut note) = match outcome {
                Ok(measured) => measured,
                Err(error) => (
                    tool_name(tool),
                    scenario.size_bytes,
                    None,
                    format!("failed: {error:#}"),
                ),
            };
            if note.is_empty() {
                note = format!(
                    "link dropped {} pkts A→B",
                    counters.a_to_b.dropped_by_loss + counters.a_to_b.dropped_by_queue
                );
            }
            eprintln!("  -> {:?} s {note}", seconds);
            rows.push(Row {
                scenario: label.clone(),
                tool: tool_name,
                bytes,
                seconds,
                link_bits_per_second: scenario.link_bits_per_second,
                note,
            });
        }
    }
    print_table(&rows);
    Ok(())
}

fn tool_name(tool: &str) -> &'static str {
    match tool {
        "novacron" => "NovaCron transport",
        "novacron-forecast" => "NovaCron transport, link forecast from the run before",
        "novacron-kept" => "NovaCron transport, on connections an earlier session left",
        "socat" => "single TCP stream (socat, system default cc)",
        "socat-cubic" => "single TCP stream (socat, cubic)",
        "rsync" => "rsync (daemon, one TCP stream)",
        "scp" => "scp",
        "iperf3" => "iperf3 -P 8 (ceiling, 20 s)",
        _ => "unknown",
    }
}

fn print_table(rows: &[Row]) {
    let rate_of = |row: &Row| row.seconds.map(|seconds| row.bytes as f64 * 8.0 / seconds);
    println!();
    println!(
        "| scenario | tool | bytes | seconds | goodput Mbit/s | share of link | share of iperf3 -P 8 | note |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---|");
    for row in rows {
        let ceiling = rows
            .iter()
            .find(|other| other.scenario == row.scenario && other.tool == tool_name("iperf3"))
            .and_then(rate_of);
        let (seconds, rate, share, share_of_ceiling) = match (row.seconds, rate_of(row)) {
            (Some(seconds), Some(rate)) => (
                format!("{seconds:.2}"),
                format!("{:.1}", rate / 1e6),
                format!("{:.1} %", 100.0 * rate / row.link_bits_per_second),
                ceiling.map_or("—".to_string(), |ceiling| {
                    format!("{:.1} %", 100.0 * rate / ceiling)
                }),
            ),
            _ => ("—".into(), "—".into(), "—".into(), "—".into()),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            row.scenario, row.tool, row.bytes, seconds, rate, share, share_of_ceiling, row.note
        );
    }
}

fn write_random_file(path: &Path, size: u64) -> anyhow::Result<()> {
    use rand::{RngCore, SeedableRng};
    let mut generator = rand::rngs::StdRng::seed_from_u64(2026);
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut block = vec![0u8; 8 << 20];
    let mut written = 0;
    while written < size {
        let len = (size - written).min(block.len() as u64) as usize;
        generator.fill_bytes(&mut block[..len]);
        file.write_all(&block[..len])?;
        written += len as u64;
    }
    file.flush()?;
    Ok(())
}

fn write_identities(directory: &Path) -> anyhow::Result<()> {
    for role in ["send", "recv"] {
        let identity = HostIdentity::generate_self_signed(role)?;
        std::fs::write(
            directory.join(format!("{role}.crt")),
            identity.certificate_chain()[0].as_ref(),
        )?;
        std::fs::write(
            directory.join(format!("{role}.key")),
            identity.private_key_pkcs8_der(),
        )?;
    }
    Ok(())
}

fn load_tls(directory: &Path, own: &str, peer: &str) -> anyhow::Result<TlsSettings> {
    let certificate = std::fs::read(directory.join(format!("{own}.crt")))?;
    let key = std::fs::read(directory.join(format!("{own}.key")))?;
    let peer_certificate = std::fs::read(directory.join(format!("{peer}.crt")))?;
    Ok(TlsSettings {
        identity: HostIdentity::from_der(vec![CertificateDer::from(certificate)], key)?,
        trust: PeerTrust::PinnedFingerprints(vec![
            novacron_transport::Fingerprint::of_certificate(&peer_certificate),
        ]),
    })
}

/// Starts `receiver` (already configured), waits for its first stdout line ("ready"), starts
/// `sender`, and times from the sender's start until the receiver holds every byte: its
/// `complete` line if it prints one (NovaCron's receiver, which then stays to answer the
/// sender's close), else its exit (socat, rsync and scp exit at the end of the stream).
async fn timed_transfer(
    mut receiver: std::process::Command,
    mut sender: std::process::Command,
    limit: Duration,
) -> anyhow::Result<(f64, String, String)> {
    receiver.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut receiver = tokio::process::Command::from(receiver)
        .kill_on_drop(true)
        .spawn()?;
    let stdout = receiver.stdout.take().context("receiver stdout")?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let ready = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .context("receiver did not become ready")??;
    if ready.as_deref() != Some("ready") {
        bail!("receiver said {ready:?} instead of ready");
    }
    sender.stdout(Stdio::piped()).stderr(Stdio::piped());
    let started = Instant::now();
    let sender = tokio::process::Command::from(sender)
        .kill_on_drop(true)
        .spawn()?;
    let receiver_output = async {
        let mut rest = String::new();
        let mut complete = None;
        while let Some(line) = lines.next_line().await? {
            if line == RECEIVER_COMPLETE && complete.is_none() {
                complete = Some(started.elapsed());
            }
            rest.push_str(&line);
            rest.push('\n');
        }
        let status = receiver.wait().await?;
        let seconds = complete.unwrap_or_else(|| started.elapsed()).as_secs_f64();
        Ok::<_, anyhow::Error>((status, seconds, rest))
    };
    let (status, seconds, receiver_text) = tokio::time::timeout(limit, receiver_output)
        .await
        .context("transfer exceeded its time limit")??;
    let sender_output = tokio::time::timeout(Duration::from_secs(30), sender.wait_with_output())
        .await
        .context("sender did not exit")??;
    if std::env::var_os("DWCP_BENCH_VERBOSE").is_some() {
        eprint!("{}", String::from_utf8_lossy(&sender_output.stderr));
    }
    if !status.success() {
        bail!("receiver failed: {status}");
    }
    if !sender_output.status.success() {
        bail!(
            "sender failed: {} {}",
            sender_output.status,
            String::from_utf8_lossy(&sender_output.stderr)
        );
    }
    Ok((
        seconds,
        receiver_text,
        String::from_utf8_lossy(&sender_output.stdout).into_owned(),
    ))
}

fn time_limit(scenario: &Scenario) -> Duration {
    // Generous: a tenth of the link rate, plus set-up.
    let seconds = scenario.size_bytes as f64 * 8.0 / (scenario.link_bits_per_second * 0.1) + 30.0;
    Duration::from_secs_f64(seconds.min(3600.0))
}

type Measured = (&'static str, u64, Option<f64>, String);

/// One NovaCron transfer. With `forecast` (bits per second, the link model's after an earlier
/// transfer on this link) the sender's session starts from it as the agent's does for a link it
/// has measured: the first bandwidth estimate, and the connections' pacing limited a little
/// above it. `measured` receives the link model's forecast after this transfer.
async fn run_novacron(
    link: &RunningLink,
    work: &Path,
    data_file: &Path,
    scenario: &Scenario,
    forecast: Option<f64>,
    kept: bool,
    measured: &mut Option<f64>,
) -> anyhow::Result<Measured> {
    let executable = std::env::current_exe()?;
    let executable = executable.to_string_lossy();
    let mut receiver = link.command_in_b(&executable);
    receiver
        .env("DWCP_BENCH_ROLE", "recv")
        .env("DWCP_BENCH_DIR", work)
        .env("DWCP_BENCH_LISTEN", format!("0.0.0.0:{NOVACRON_PORT}"));
    let mut sender = link.command_in_a(&executable);
    sender
        .env("DWCP_BENCH_ROLE", "send")
        .env("DWCP_BENCH_DIR", work)
        .env("DWCP_BENCH_FILE", data_file)
        .env("DWCP_BENCH_BYTES", scenario.size_bytes.to_string())
        .env(
            "DWCP_BENCH_RATE_HINT",
            scenario.link_bits_per_second.to_string(),
        )
        .env(
            "DWCP_BENCH_PEER",
            format!("{}:{NOVACRON_PORT}", link.addr_b()),
        );
    if let Some(bits_per_second) = forecast {
        sender.env("DWCP_BENCH_FORECAST", bits_per_second.to_string());
    }
    if kept {
        // A first session of KEPT_WARM_UP_MIB, then KEPT_IDLE idle, then the timed one on the
        // connections the first parked.
        receiver.env("DWCP_BENCH_KEPT", "1");
        sender.env("DWCP_BENCH_KEPT", "1");
    }
    let (mut seconds, receiver_text, sender_text) =
        timed_transfer(receiver, sender, time_limit(scenario) + KEPT_IDLE * 4).await?;
    if kept {
        // From the timed session's connect (the sender's clock) to its last byte's arrival (the
        // receiver's: the same host's clock).
        let nanos = |text: &str, key: &str| -> anyhow::Result<u128> {
            field(text, key)
                .with_context(|| format!("no {key}"))?
                .parse()
                .with_context(|| format!("bad {key}"))
        };
        seconds = (nanos(&receiver_text, "complete_unix_ns")?
            - nanos(&sender_text, "timed_start_unix_ns")?) as f64
            / 1e9;
    }
    let expected = hash_prefix(data_file, scenario.size_bytes)?;
    let received_hash = field(&receiver_text, "blake3").unwrap_or_default();
    if received_hash != expected.to_hex().as_str() {
        bail!("received data differs (blake3 {received_hash}, expected {expected})");
    }
    *measured = field(&sender_text, "forecast_bits_per_second").and_then(|text| text.parse().ok());
    let note = format!(
        "blake3 ok; {}{}control request round trip during the transfer (ms): {}; {} bulk connections (chosen adaptively; connect RTT {} ms), cc {}, kx {}; {} MB sent twice (overdue frames, hedged)",
        forecast.map_or(String::new(), |bits_per_second| format!(
            "forecast {:.0} Mbit/s, pacing limit {:.0} Mbit/s at first; ",
            bits_per_second / 1e6,
            novacron_transport::policy::pacing_limit_for(bits_per_second / 8.0) as f64 * 8e-6
        )),
        if kept {
            format!(
                "after a first session of {KEPT_WARM_UP_MIB} MiB and {} s idle, {} connections kept; ",
                KEPT_IDLE.as_secs(),
                field(&sender_text, "parked_taken").unwrap_or_default()
            )
        } else {
            String::new()
        },
        field(&sender_text, "control_round_trip_ms").unwrap_or_default(),
        field(&sender_text, "bulk_connections").unwrap_or_default(),
        field(&sender_text, "round_trip_estimate_ms").unwrap_or_default(),
        field(&sender_text, "congestion_control").unwrap_or_default(),
        field(&sender_text, "key_exchange_group").unwrap_or_default(),
        field(&sender_text, "hedged")
            .and_then(|bytes| bytes.parse::<f64>().ok())
            .map_or_else(|| "?".to_string(), |bytes| format!("{:.1}", bytes / 1e6)),
    );
    Ok((
        tool_name(if forecast.is_some() {
            "novacron-forecast"
        } else if kept {
            "novacron-kept"
        } else {
            "novacron"
        }),
        scenario.size_bytes,
        Some(seconds),
        note,
    ))
}

fn unix_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

fn field(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{key}=")).map(str::to_string))
}

fn hash_prefix(path: &Path, len: u64) -> anyhow::Result<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    let file = std::fs::File::open(path)?;
    std::io::copy(&mut file.take(len), &mut hasher)?;
    Ok(hasher.finalize())
}

async fn run_socat(
    link: &RunningLink,
    data_file: &Path,
    scenario: &Scenario,
    congestion_control: Option<&str>,
) -> anyhow::Result<Measured> {
    let size = if congestion_control == Some("cubic") && scenario.lossy {
        scenario.size_bytes.min(CUBIC_LOSSY_BYTES)
    } else {
        scenario.size_bytes
    };
    let mut receiver = link.command_in_b("sh");
    receiver.args([
        "-c",
        &format!("echo ready; exec socat -u TCP-LISTEN:{SOCAT_PORT},reuseaddr OPEN:/dev/null"),
    ]);
    // The listener may print "ready" just before it listens: let the client retry the connect.
    let mut target = format!("TCP:{}:{SOCAT_PORT},retry=100,interval=0.05", link.addr_b());
    if let Some(name) = congestion_control {
        // IPPROTO_TCP = 6, TCP_CONGESTION = 13.
        target.push_str(&format!(",setsockopt-string=6:13:{name}"));
    }
    let mut sender = link.command_in_a("sh");
    sender.args([
        "-c",
        &format!(
            "head -c {} {} | socat -u STDIN {target}",
            size,
            data_file.display()
        ),
    ]);
    let limit = time_limit(scenario).max(Duration::from_secs_f64(
        size as f64 * 8.0 / CUBIC_LOSSY_FLOOR_BITS_PER_SECOND,
    ));
    let (seconds, _, _) = timed_transfer(receiver, sender, limit).await?;
    let tool = if congestion_control.is_some() {
        "socat-cubic"
    } else {
        "socat"
    };
    let note = if size < scenario.size_bytes {
        format!(
            "only {} MiB: CUBIC under random loss is too slow for the full size",
            size / MIB
        )
    } else {
        String::new()
    };
    Ok((tool_name(tool), size, Some(seconds), note))
}

async fn run_rsync(
    link: &RunningLink,
    work: &Path,
    data_file: &Path,
    scenario: &Scenario,
) -> anyhow::Result<Measured> {
    let destination = work.join("rsync-destination");
    let _ = std::fs::remove_dir_all(&destination);
    std::fs::create_dir_all(&destination)?;
    let source = work.join("rsync-source");
    let _ = std::fs::remove_dir_all(&source);
    std::fs::create_dir_all(&source)?;
    let source_file = source.join("payload.bin");
    std::io::copy(
        &mut std::fs::File::open(data_file)?.take(scenario.size_bytes),
        &mut std::fs::File::create(&source_file)?,
    )?;
    let config = work.join("rsyncd.conf");
    std::fs::write(
        &config,
        format!(
            "use chroot = no\nuid = root\ngid = root\n[bench]\npath = {}\nread only = no\n",
            destination.display()
        ),
    )?;
    // One file per run: the daemon exits after the client disconnects (via the wrapper loop).
    let mut receiver = link.command_in_b("sh");
    receiver.args([
        "-c",
        &format!(
            "rsync --daemon --no-detach --port {RSYNC_PORT} --config {} & pid=$!; \
             while ! ss -ltn | grep -q :{RSYNC_PORT}; do :; done; echo ready; \
             while [ ! -f {}/payload.bin ] || [ $(stat -c %s {}/payload.bin) -ne {} ]; do sleep 0.05; done; \
             kill $pid",
            config.display(),
            destination.display(),
            destination.display(),
            scenario.size_bytes
        ),
    ]);
    let mut sender = link.command_in_a("rsync");
    sender.args([
        "--whole-file",
        &source_file.to_string_lossy(),
        &format!("rsync://{}:{RSYNC_PORT}/bench/", link.addr_b()),
    ]);
    let (seconds, _, _) = timed_transfer(receiver, sender, time_limit(scenario)).await?;
    let _ = std::fs::remove_dir_all(&destination);
    let _ = std::fs::remove_dir_all(&source);
    Ok((
        tool_name("rsync"),
        scenario.size_bytes,
        Some(seconds),
        String::new(),
    ))
}

async fn run_scp(
    link: &RunningLink,
    work: &Path,
    data_file: &Path,
    scenario: &Scenario,
) -> anyhow::Result<Measured> {
    if !Path::new("/usr/sbin/sshd").exists() {
        bail!("openssh-server is not installed");
    }
    let ssh = work.join("ssh");
    if !ssh.exists() {
        std::fs::create_dir_all(&ssh)?;
        for (name, kind) in [("host_key", "ed25519"), ("client_key", "ed25519")] {
            let status = std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", kind, "-N", "", "-f"])
                .arg(ssh.join(name))
                .status()?;
            if !status.success() {
                bail!("ssh-keygen failed");
            }
        }
        std::fs::copy(ssh.join("client_key.pub"), ssh.join("authorized_keys"))?;
        std::fs::write(
            ssh.join("sshd_config"),
            format!(
                "Port {SSH_PORT}\nHostKey {0}/host_key\nAuthorizedKeysFile {0}/authorized_keys\n\
                 PermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\n\
                 StrictModes no\nPidFile {0}/sshd.pid\n\
                 Subsystem sftp /usr/lib/openssh/sftp-server\n",
                ssh.display()
            ),
        )?;
        std::fs::create_dir_all("/run/sshd")?;
    }
    let part = work.join("scp-source.bin");
    std::io::copy(
        &mut std::fs::File::open(data_file)?.take(scenario.size_bytes),
        &mut std::fs::File::create(&part)?,
    )?;
    // sshd -D -e serves until killed; the wrapper ends it once the client is done (`-o` below
    // makes the one session the last).
    let mut receiver = link.command_in_b("sh");
    receiver.args([
        "-c",
        &format!(
            "/usr/sbin/sshd -D -e -f {}/sshd_config & pid=$!; \
             while ! ss -ltn | grep -q :{SSH_PORT}; do :; done; echo ready; \
             while [ ! -f {}/scp-done ]; do sleep 0.02; done; pkill -P $pid; kill $pid",
            ssh.display(),
            ssh.display()
        ),
    ]);
    let mut sender = link.command_in_a("sh");
    sender.args([
        "-c",
        &format!(
            "scp -q -P {SSH_PORT} -i {0}/client_key -o BatchMode=yes \
             -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null {1} root@{2}:/dev/null; \
             status=$?; touch {0}/scp-done; exit $status",
            ssh.display(),
            part.display(),
            link.addr_b()
        ),
    ]);
    let outcome = timed_transfer(receiver, sender, time_limit(scenario)).await;
    let _ = std::fs::remove_file(ssh.join("scp-done"));
    let _ = std::fs::remove_file(&part);
    let (seconds, _, _) = outcome?;
    Ok((
        tool_name("scp"),
        scenario.size_bytes,
        Some(seconds),
        String::new(),
    ))
}

async fn run_iperf(link: &RunningLink, scenario: &Scenario) -> anyhow::Result<Measured> {
    let mut receiver = link.command_in_b("sh");
    receiver.args([
        "-c",
        &format!("echo ready; exec iperf3 -s -1 -p {IPERF_PORT} >/dev/null"),
    ]);
    let mut sender = link.command_in_a("sh");
    sender.args([
        "-c",
        &format!(
            "until iperf3 -c {} -p {IPERF_PORT} -P 8 -t 20 -J; do sleep 0.1; done",
            link.addr_b()
        ),
    ]);
    let (_, _, output) = timed_transfer(receiver, sender, Duration::from_secs(90)).await?;
    // Take the receiver-side sum from iperf3's JSON without a JSON dependency.
    let received = output
        .split("\"sum_received\"")
        .nth(1)
        .and_then(|rest| rest.split("\"bits_per_second\":").nth(1))
        .and_then(|rest| rest.split([',', '}']).next())
        .and_then(|number| number.trim().parse::<f64>().ok())
        .context("no sum_received in iperf3 output")?;
    // Express as the time the same number of bytes would take, for the table's columns.
    let seconds = scenario.size_bytes as f64 * 8.0 / received;
    Ok((
        tool_name("iperf3"),
        scenario.size_bytes,
        Some(seconds),
        "rate measured over 20 s; seconds = size / rate".into(),
    ))
}

// ---- the NovaCron sender and receiver, run inside the namespaces ----

fn environment(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set"))
}

fn child_receive() -> anyhow::Result<()> {
    let directory = PathBuf::from(environment("DWCP_BENCH_DIR")?);
    let listen: SocketAddr = environment("DWCP_BENCH_LISTEN")?.parse()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let tls = load_tls(&directory, "recv", "send")?;
        let mut options = SessionOptions::default();
        if let Ok(hint) = std::env::var("DWCP_BENCH_HINT_MBIT") {
            options.bandwidth_hint_bytes_per_second = hint.parse::<f64>()? * 1e6 / 8.0;
        }
        if let Ok(window) = std::env::var("DWCP_BENCH_WINDOW_MIB") {
            options.bulk_receive_window_bytes = window.parse::<u64>()? * MIB;
        }
        let listener = Listener::bind(listen, &tls, options).await?;
        println!("ready");
        std::io::stdout().flush()?;
        if std::env::var_os("DWCP_BENCH_KEPT").is_some() {
            // The earlier transfer: read and dropped.
            let first = listener.accept().await?;
            while first.recv().await?.is_some() {}
            let _ =
                tokio::time::timeout(Duration::from_secs(5), first.control().next_incoming()).await;
        }
        let session = listener.accept().await?;
        // Answers the sender's control requests (the return path a migration needs) until the
        // sender closes the session.
        let control = session.control();
        let responder = tokio::spawn(async move {
            while let Ok(Some(incoming)) = control.next_incoming().await {
                if let novacron_transport::ControlIncoming::Request(request) = incoming {
                    let body = request.body.clone();
                    if request.respond(body).await.is_err() {
                        return;
                    }
                }
            }
        });
        let mut hasher = blake3::Hasher::new();
        let mut total = 0u64;
        while let Some(chunk) = session.recv().await? {
            total += chunk.len() as u64;
            hasher.update(&chunk);
        }
        println!("complete_unix_ns={}", unix_nanos());
        println!("{RECEIVER_COMPLETE}");
        println!("bytes={total}");
        println!("blake3={}", hasher.finalize().to_hex());
        // Wait for the sender's close so its final acknowledgements get through.
        let _ = tokio::time::timeout(Duration::from_secs(5), responder).await;
        Ok(())
    })
}

fn child_send() -> anyhow::Result<()> {
    let directory = PathBuf::from(environment("DWCP_BENCH_DIR")?);
    let file = PathBuf::from(environment("DWCP_BENCH_FILE")?);
    let bytes: u64 = environment("DWCP_BENCH_BYTES")?.parse()?;
    let rate_hint: f64 = environment("DWCP_BENCH_RATE_HINT")?.parse()?;
    let peer: SocketAddr = environment("DWCP_BENCH_PEER")?.parse()?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    // A reader thread keeps file IO off the runtime; the bounded channel is the backpressure.
    let (chunks, mut incoming) = tokio::sync::mpsc::channel::<Bytes>(4);
    let reader = std::thread::spawn(move || -> anyhow::Result<()> {
        let mut file = BufReader::with_capacity(4 << 20, std::fs::File::open(&file)?).take(bytes);
        loop {
            let mut block = vec![0u8; 4 << 20];
            let mut filled = 0;
            while filled < block.len() {
                let read = file.read(&mut block[filled..])?;
                if read == 0 {
                    break;
                }
                filled += read;
            }
            if filled == 0 {
                return Ok(());
            }
            block.truncate(filled);
            if chunks.blocking_send(Bytes::from(block)).is_err() {
                return Ok(());
            }
        }
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let tls = load_tls(&directory, "send", "recv")?;
        // The sender's link model, fed as the agent's link monitor feeds it.
        let model = Arc::new(std::sync::Mutex::new(novacron_bandwidth::LinkModel::new()));
        let observer = {
            let model = model.clone();
            RateObserver::new(move |sample| {
                if sample.sender_backlogged {
                    model
                        .lock()
                        .expect("the model's lock")
                        .observe(sample.bytes_acknowledged, sample.interval);
                }
            })
        };
        let mut options = SessionOptions {
            bandwidth_hint_bytes_per_second: rate_hint / 8.0,
            rate_observer: Some(observer),
            ..SessionOptions::default()
        };
        // As the agent dials a link it has a forecast for.
        if let Ok(forecast) = std::env::var("DWCP_BENCH_FORECAST") {
            let bytes_per_second = forecast.parse::<f64>()? / 8.0;
            options.bandwidth_hint_bytes_per_second = bytes_per_second;
            options.bulk_pacing_limit_bytes_per_second = Some(
                novacron_transport::policy::pacing_limit_for(bytes_per_second),
            );
        }
        if let Ok(window) = std::env::var("DWCP_BENCH_WINDOW_MIB") {
            options.bulk_send_window_bytes = window.parse::<u64>()? * MIB;
        }
        if let Ok(limit) = std::env::var("DWCP_BENCH_UNSENT_LIMIT_KIB") {
            options.unsent_limit_bytes = limit.parse::<u32>()? << 10;
        }
        if let Ok(limit) = std::env::var("DWCP_BENCH_PACING_MBIT") {
            options.bulk_pacing_limit_bytes_per_second =
                Some((limit.parse::<f64>()? * 1e6 / 8.0) as u64);
        }
        if std::env::var_os("DWCP_BENCH_NO_HEDGE").is_some() {
            options.hedge_overdue_frames = false;
        }
        if let Ok(streams) = std::env::var("DWCP_BENCH_STREAMS") {
            options.initial_bulk_connections = Some(streams.parse()?);
            options.adapt_stream_count = false;
        }
        if std::env::var_os("DWCP_BENCH_KEPT").is_some() {
            let pool = novacron_transport::ConnectionPool::default();
            options.connection_pool = Some(pool.clone());
            let first = Session::connect(peer, &tls, options.clone()).await?;
            let mut block = vec![0u8; 4 << 20];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut block);
            let block = Bytes::from(block);
            for _ in 0..KEPT_WARM_UP_MIB / 4 {
                first.send(block.clone()).await?;
            }
            first.close().await?;
            tokio::time::sleep(KEPT_IDLE).await;
            println!("parked_taken={}", pool.parked_to(peer));
            println!("timed_start_unix_ns={}", unix_nanos());
        }
        let session = Session::connect(peer, &tls, options).await?;
        // Control round trips while the bulk data flows: every 100 ms, a small request the
        // receiver echoes.
        let control = session.control();
        let (stop_pings, mut ping_stop) = tokio::sync::watch::channel(false);
        let pinger = tokio::spawn(async move {
            let mut round_trips = Vec::new();
            loop {
                let started = Instant::now();
                if control.request(Bytes::from_static(b"ping")).await.is_err() {
                    break;
                }
                round_trips.push(started.elapsed().as_secs_f64() * 1e3);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = ping_stop.changed() => break,
                }
            }
            round_trips
        });
        while let Some(chunk) = incoming.recv().await {
            session.send(chunk).await?;
        }
        session.finish().await?;
        session.flush().await?;
        stop_pings.send_replace(true);
        let mut round_trips = pinger.await?;
        round_trips.sort_by(f64::total_cmp);
        if !round_trips.is_empty() {
            let percentile =
                |share: f64| round_trips[((round_trips.len() - 1) as f64 * share).round() as usize];
            println!(
                "control_round_trip_ms=p50 {:.0}, p99 {:.0}, max {:.0} over {}",
                percentile(0.5),
                percentile(0.99),
                percentile(1.0),
                round_trips.len()
            );
        }
        let stats = session.stats();
        println!("bulk_connections={}", stats.target_bulk_connections);
        println!(
            "round_trip_estimate_ms={:.1}",
            stats.round_trip_estimate.unwrap_or_default().as_secs_f64() * 1e3
        );
        println!(
            "congestion_control={}",
            stats.congestion_control.unwrap_or_default()
        );
        println!(
            "key_exchange_group={}",
            stats.key_exchange_group.unwrap_or_default()
        );
        println!("retransmitted={}", stats.bulk_bytes_retransmitted);
        println!("hedged={}", stats.bulk_bytes_hedged);
        if let Some(forecast) = model
            .lock()
            .expect("the model's lock")
            .forecast(novacron_bandwidth::ForecastHorizon::FiveSeconds)
        {
            println!(
                "forecast_bits_per_second={}",
                forecast.expected_bits_per_sec
            );
        }
        session.close().await?;
        Ok::<_, anyhow::Error>(())
    })?;
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("file reader panicked"))??;
    Ok(())
}
