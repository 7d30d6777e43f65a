//! Does acting on the forecast pay? The same data crosses the WAN link emulator replaying a field
//! trace, once per policy for choosing the zstd level of each block:
//!
//! - `fixed zstd-N`: one level for the whole transfer (what a tool without a forecast does);
//! - `forecast`: before each block, the level [`LevelMeter::choose`] picks for the link's 1 s
//!   forecast (the [`LinkModel`] ensemble fed with the transport's rate samples in which the
//!   sender was backlogged), from compression speeds and ratios measured on this host and this
//!   data; after a run of samples in which the compressor set the pace, one block at the fastest
//!   level probes the link.
//!
//! Every policy gets a new link replaying the trace from its start, so each sees the same capacity
//! over time. Reported per policy: time, bytes on the wire, the raw (uncompressed) bytes
//! delivered per second and that rate as a share of the capacity the trace offered during the
//! transfer. Run as root (network namespaces):
//!
//! ```sh
//! cargo bench -p novacron-bandwidth --bench forecast_transfer -- [--trace FILE] [--scale K] [--size-mib N] [--delay-ms D]
//! ```
//!
//! See bench/bandwidth/README.md.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Buf, Bytes, BytesMut};
use novacron_bandwidth::{ForecastHorizon, LinkModel};
use novacron_codec::LevelMeter;
use novacron_linkemu::{DeliveryTrace, LinkEmulator};
use novacron_transport::{
    HostIdentity, Listener, PeerTrust, RateObserver, Session, SessionOptions, TlsSettings,
};

const MIB: usize = 1 << 20;
const PORT: u16 = 7420;
/// Input bytes per compressed block; the level can change at every block.
const BLOCK_BYTES: usize = 512 << 10;
/// Levels the forecast policy chooses among (measured on the data before the transfers).
const LEVELS: [i32; 7] = [1, 3, 6, 9, 12, 15, 19];
/// The transport's measurement interval: one rate sample each.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(250);
/// How often the controller turns the forecast into a level.
const DECISION_INTERVAL: Duration = Duration::from_millis(100);
/// After this many samples in a row in which the compressor, not the link, set the pace, the
/// next block goes at the fastest level: a probe that fills the link so its rate shows again.
const PROBE_AFTER_APP_LIMITED_SAMPLES: u32 = 8;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Policy {
    Fixed(i32),
    Forecast,
}

impl Policy {
    fn name(self) -> String {
        match self {
            Policy::Fixed(level) => format!("fixed zstd-{level}"),
            Policy::Forecast => "forecast (1 s)".to_string(),
        }
    }
}

struct Options {
    trace: PathBuf,
    scale: u32,
    size_bytes: usize,
    delay: Duration,
    policies: Vec<Policy>,
}

impl Options {
    fn parse() -> anyhow::Result<Options> {
        let mut options = Options {
            trace: default_trace()?,
            scale: 8,
            size_bytes: 192 * MIB,
            delay: Duration::from_millis(20),
            policies: vec![
                Policy::Fixed(1),
                Policy::Fixed(3),
                Policy::Fixed(19),
                Policy::Forecast,
            ],
        };
        let mut arguments = std::env::args().skip(1);
        while let Some(argument) = arguments.next() {
            let mut value = || {
                arguments
                    .next()
                    .with_context(|| format!("{argument} needs a value"))
            };
            match argument.as_str() {
                "--trace" => options.trace = PathBuf::from(value()?),
                "--scale" => options.scale = value()?.parse().context("--scale: a whole number")?,
                "--size-mib" => {
                    options.size_bytes = value()?.parse::<usize>().context("--size-mib")? * MIB
                }
                "--delay-ms" => {
                    options.delay = Duration::from_millis(value()?.parse().context("--delay-ms")?)
                }
                "--policies" => {
                    options.policies = value()?
                        .split(',')
                        .map(|name| match name {
                            "forecast" => Ok(Policy::Forecast),
                            other => other
                                .strip_prefix("zstd-")
                                .and_then(|level| level.parse().ok())
                                .map(Policy::Fixed)
                                .with_context(|| {
                                    format!("unknown policy {other:?}: forecast or zstd-N")
                                }),
                        })
                        .collect::<anyhow::Result<_>>()?
                }
                // cargo bench passes --bench; nothing else is expected.
                "--bench" => {}
                other => bail!(
                    "unknown argument {other:?}; use --trace FILE, --scale K, --size-mib N, --delay-ms D, --policies forecast,zstd-3,..."
                ),
            }
        }
        if options.scale == 0 || options.size_bytes == 0 {
            bail!("--scale and --size-mib must be positive");
        }
        Ok(options)
    }
}

fn default_trace() -> anyhow::Result<PathBuf> {
    let directory = match std::env::var_os("NOVACRON_TRACE_DIR") {
        Some(directory) => PathBuf::from(directory),
        None => {
            let beside =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/bandwidth-traces");
            if beside.is_dir() {
                beside
            } else {
                PathBuf::from("/work/shared/data/bandwidth-traces")
            }
        }
    };
    Ok(directory.join("ATT-LTE-driving.down"))
}

fn main() -> anyhow::Result<()> {
    let options = Options::parse()?;
    let work = tempfile::Builder::new()
        .prefix("novacron-forecast-bench")
        .tempdir()?;
    let data = Arc::new(collect_system_files(options.size_bytes)?);
    let scaled_trace = work.path().join("trace");
    scale_trace(&options.trace, options.scale, &scaled_trace)?;
    let trace = DeliveryTrace::from_file(&scaled_trace)?;
    eprintln!(
        "data: {} MiB of files from /usr; trace {} ×{} (mean {:.1} Mbit/s); one-way delay {} ms",
        data.len() / MIB,
        options.trace.display(),
        options.scale,
        trace.average_bits_per_second() / 1e6,
        options.delay.as_millis()
    );
    let mut meter = LevelMeter::new();
    let sample = &data[..data.len().min(8 * MIB)];
    meter.measure(sample, &LEVELS, BLOCK_BYTES)?;
    for profile in meter.profiles() {
        eprintln!(
            "  zstd-{:<2} {:>7.1} MB/s  ratio {:.2}",
            profile.level,
            profile.input_bytes_per_second / 1e6,
            profile.compression_ratio
        );
    }

    let mut rows = Vec::new();
    for policy in &options.policies {
        eprintln!("running {} ...", policy.name());
        let row = run_policy(*policy, &options, &scaled_trace, &trace, &data, &meter)
            .with_context(|| format!("policy {}", policy.name()))?;
        rows.push(row);
    }
    print_table(&options, &trace, &rows);
    Ok(())
}

/// Real, mixed content: the regular files under /usr (libraries, programs, documentation) in a
/// fixed order, concatenated up to `size` bytes.
fn collect_system_files(size: usize) -> anyhow::Result<Vec<u8>> {
    let mut data = Vec::with_capacity(size);
    let mut pending = vec![PathBuf::from("/usr/lib"), PathBuf::from("/usr/share")];
    while let Some(directory) = pending.pop() {
        let mut entries: Vec<PathBuf> = match std::fs::read_dir(&directory) {
            Ok(entries) => entries
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .collect(),
            Err(_) => continue,
        };
        entries.sort();
        entries.reverse();
        for path in entries {
            let Ok(metadata) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if metadata.is_dir() {
                pending.push(path);
            } else if metadata.is_file() {
                let Ok(file) = std::fs::File::open(&path) else {
                    continue;
                };
                let room = size - data.len();
                file.take(room as u64).read_to_end(&mut data)?;
                if data.len() == size {
                    return Ok(data);
                }
            }
        }
    }
    bail!(
        "/usr holds only {} bytes, fewer than the {size} asked",
        data.len()
    )
}

/// Writes `source` with every delivery opportunity repeated `scale` times: the same capacity
/// changes at the same moments, `scale` times the rate.
fn scale_trace(source: &Path, scale: u32, target: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(source)
        .with_context(|| format!("reading trace {}", source.display()))?;
    let mut scaled = String::with_capacity(text.len() * scale as usize);
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        for _ in 0..scale {
            scaled.push_str(line.trim());
            scaled.push('\n');
        }
    }
    std::fs::write(target, scaled)?;
    Ok(())
}

struct Row {
    policy: Policy,
    seconds: f64,
    raw_bytes: u64,
    wire_bytes: u64,
    capacity_bits_per_second: f64,
    blocks_per_level: Vec<(i32, u32)>,
    probes: u32,
}

fn run_policy(
    policy: Policy,
    options: &Options,
    trace_path: &Path,
    trace: &DeliveryTrace,
    data: &Arc<Vec<u8>>,
    meter: &LevelMeter,
) -> anyhow::Result<Row> {
    let link = LinkEmulator::builder()
        .name_prefix("fcast")
        .delay(options.delay)
        .trace_a_to_b(trace_path)
        .spawn()?;
    let identities = [
        HostIdentity::generate_self_signed("sender")?,
        HostIdentity::generate_self_signed("receiver")?,
    ];
    let tls = |own: usize| TlsSettings {
        identity: identities[own].clone(),
        trust: PeerTrust::PinnedFingerprints(vec![identities[1 - own].fingerprint()]),
    };
    let (sender_tls, receiver_tls) = (tls(0), tls(1));
    let session_options = SessionOptions {
        // About a second of the mean rate: a level change reaches the wire soon.
        bulk_send_window_bytes: ((trace.average_bits_per_second() / 8.0) as u64).max(MIB as u64),
        bandwidth_hint_bytes_per_second: trace.average_bits_per_second() / 8.0,
        ..SessionOptions::default()
    };
    let listen: SocketAddr = format!("0.0.0.0:{PORT}").parse()?;
    let peer: SocketAddr = format!("{}:{PORT}", link.addr_b()).parse()?;
    let expected_hash = blake3::hash(data);
    let (ready_sender, ready) = std::sync::mpsc::channel();

    std::thread::scope(|scope| -> anyhow::Result<Row> {
        let receiver = scope.spawn(|| {
            link.in_ns_b(|| receive(listen, &receiver_tls, session_options.clone(), ready_sender))
        });
        ready
            .recv_timeout(Duration::from_secs(30))
            .context("receiver did not start listening")??;
        let started_on_link_clock = link.elapsed();
        let started = Instant::now();
        let sent = link.in_ns_a(|| {
            send(
                peer,
                &sender_tls,
                session_options.clone(),
                policy,
                data,
                meter,
            )
        })??;
        let (raw_bytes, hash) = receiver.join().expect("receiver thread")??;
        let seconds = started.elapsed().as_secs_f64();
        let ended_on_link_clock = link.elapsed();
        if hash != expected_hash {
            bail!("received data differs from what was sent");
        }
        let opportunities = trace.opportunities_between(
            started_on_link_clock.as_nanos() as u64,
            ended_on_link_clock.as_nanos() as u64,
        );
        let capacity_bits_per_second = opportunities as f64 * 1500.0 * 8.0
            / (ended_on_link_clock - started_on_link_clock).as_secs_f64();
        Ok(Row {
            policy,
            seconds,
            raw_bytes,
            wire_bytes: sent.wire_bytes,
            capacity_bits_per_second,
            blocks_per_level: sent.blocks_per_level,
            probes: sent.probes,
        })
    })
}

/// Accepts one session and decodes blocks (`u32` raw length, `u32` compressed length, zstd
/// frame) until the sender finishes; returns the raw bytes and their hash.
fn receive(
    listen: SocketAddr,
    tls: &TlsSettings,
    options: SessionOptions,
    ready: std::sync::mpsc::Sender<anyhow::Result<()>>,
) -> anyhow::Result<(u64, blake3::Hash)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = match Listener::bind(listen, tls, options).await {
            Ok(listener) => {
                let _ = ready.send(Ok(()));
                listener
            }
            Err(error) => {
                let _ = ready.send(Err(anyhow::anyhow!("bind: {error}")));
                bail!("bind failed");
            }
        };
        let session = listener.accept().await?;
        let mut pending = BytesMut::new();
        let mut hasher = blake3::Hasher::new();
        let mut raw_total = 0u64;
        let mut decompressor = zstd::bulk::Decompressor::new()?;
        while let Some(piece) = session.recv().await? {
            pending.extend_from_slice(&piece);
            while pending.len() >= 8 {
                let raw_length = u32::from_le_bytes(pending[..4].try_into()?) as usize;
                let compressed_length = u32::from_le_bytes(pending[4..8].try_into()?) as usize;
                if raw_length > 4 * BLOCK_BYTES {
                    bail!("block of {raw_length} bytes is larger than any sent");
                }
                if pending.len() < 8 + compressed_length {
                    break;
                }
                pending.advance(8);
                let block = pending.split_to(compressed_length);
                let raw = decompressor.decompress(&block, raw_length)?;
                if raw.len() != raw_length {
                    bail!(
                        "block decompressed to {} bytes, not {raw_length}",
                        raw.len()
                    );
                }
                hasher.update(&raw);
                raw_total += raw.len() as u64;
            }
        }
        if !pending.is_empty() {
            bail!("{} bytes left after the last whole block", pending.len());
        }
        Ok((raw_total, hasher.finalize()))
    })
}

struct Sent {
    wire_bytes: u64,
    blocks_per_level: Vec<(i32, u32)>,
    probes: u32,
}

/// Compresses `data` block by block at the level the policy gives and sends it. For the forecast
/// policy, the session's rate samples feed the link model and a controller turns its 1 s
/// forecast into the level every 100 ms.
fn send(
    peer: SocketAddr,
    tls: &TlsSettings,
    options: SessionOptions,
    policy: Policy,
    data: &Arc<Vec<u8>>,
    meter: &LevelMeter,
) -> anyhow::Result<Sent> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // The transport's rate samples feed the link model; only samples in which the sender
        // was backlogged measure the link (the others measure the compressor).
        let model = Arc::new(Mutex::new(LinkModel::new()));
        let probe_requested = Arc::new(AtomicBool::new(false));
        let app_limited_in_a_row = Arc::new(AtomicU32::new(0));
        let options = SessionOptions {
            measurement_interval: SAMPLE_INTERVAL,
            rate_observer: (policy == Policy::Forecast).then(|| {
                let model = Arc::clone(&model);
                let probe_requested = Arc::clone(&probe_requested);
                let app_limited_in_a_row = Arc::clone(&app_limited_in_a_row);
                RateObserver::new(move |sample| {
                    if sample.sender_backlogged {
                        model
                            .lock()
                            .expect("model")
                            .observe(sample.bytes_acknowledged, sample.interval);
                        app_limited_in_a_row.store(0, Ordering::Relaxed);
                    } else if app_limited_in_a_row.fetch_add(1, Ordering::Relaxed) + 1
                        >= PROBE_AFTER_APP_LIMITED_SAMPLES
                    {
                        probe_requested.store(true, Ordering::Relaxed);
                        app_limited_in_a_row.store(0, Ordering::Relaxed);
                    }
                })
            }),
            ..options
        };
        let session = Session::connect(peer, tls, options).await?;
        let level = Arc::new(AtomicI32::new(match policy {
            Policy::Fixed(level) => level,
            Policy::Forecast => novacron_codec::level::FALLBACK_LEVEL,
        }));
        let meter = Arc::new(Mutex::new(meter.clone()));

        // The compressor runs on its own thread and hands blocks to the sending task.
        let (blocks, mut incoming) = tokio::sync::mpsc::channel::<(i32, Bytes)>(2);
        let compressor = {
            let data = Arc::clone(data);
            let level = Arc::clone(&level);
            let probe_requested = Arc::clone(&probe_requested);
            let meter = Arc::clone(&meter);
            std::thread::spawn(move || -> anyhow::Result<(Vec<(i32, u32)>, u32)> {
                let mut counts: Vec<(i32, u32)> = Vec::new();
                let mut probes = 0;
                for block in data.chunks(BLOCK_BYTES) {
                    let chosen = if probe_requested.swap(false, Ordering::Relaxed) {
                        probes += 1;
                        LEVELS[0]
                    } else {
                        level.load(Ordering::Relaxed)
                    };
                    let started = Instant::now();
                    let compressed = zstd::bulk::compress(block, chosen)?;
                    meter.lock().expect("meter").observe(
                        chosen,
                        block.len(),
                        compressed.len(),
                        started.elapsed(),
                    );
                    let mut framed = Vec::with_capacity(compressed.len() + 8);
                    framed.extend_from_slice(&(block.len() as u32).to_le_bytes());
                    framed.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
                    framed.extend_from_slice(&compressed);
                    match counts.iter_mut().find(|(level, _)| *level == chosen) {
                        Some((_, count)) => *count += 1,
                        None => counts.push((chosen, 1)),
                    }
                    if blocks.blocking_send((chosen, Bytes::from(framed))).is_err() {
                        bail!("sending task stopped");
                    }
                }
                Ok((counts, probes))
            })
        };

        let controller = (policy == Policy::Forecast).then(|| {
            let level = Arc::clone(&level);
            let meter = Arc::clone(&meter);
            let model = Arc::clone(&model);
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(DECISION_INTERVAL);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticker.tick().await;
                    let forecast = model
                        .lock()
                        .expect("model")
                        .forecast(ForecastHorizon::OneSecond);
                    if let Some(forecast) = forecast {
                        let chosen = meter
                            .lock()
                            .expect("meter")
                            .choose(forecast.expected_bits_per_sec / 8.0, 1);
                        level.store(chosen, Ordering::Relaxed);
                    }
                }
            })
        });

        let mut wire_bytes = 0u64;
        while let Some((_, block)) = incoming.recv().await {
            wire_bytes += block.len() as u64;
            session.send(block).await?;
        }
        session.finish().await?;
        session.flush().await?;
        if let Some(controller) = controller {
            controller.abort();
        }
        let (blocks_per_level, probes) = compressor.join().expect("compressor thread")?;
        session.close().await?;
        Ok(Sent {
            wire_bytes,
            blocks_per_level,
            probes,
        })
    })
}

fn print_table(options: &Options, trace: &DeliveryTrace, rows: &[Row]) {
    println!(
        "\nforecast-driven vs fixed zstd level: {} MiB of /usr files over {} ×{} (mean {:.1} Mbit/s), one-way delay {} ms\n",
        options.size_bytes / MIB,
        options.trace.file_name().map_or_else(
            || options.trace.display().to_string(),
            |name| name.to_string_lossy().into_owned()
        ),
        options.scale,
        trace.average_bits_per_second() / 1e6,
        options.delay.as_millis()
    );
    println!(
        "| policy | time (s) | wire MiB | ratio | raw delivered (Mbit/s) | trace capacity during transfer (Mbit/s) | raw rate / capacity | wire rate / capacity | blocks per level |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for row in rows {
        let raw_rate = row.raw_bytes as f64 * 8.0 / row.seconds;
        let wire_rate = row.wire_bytes as f64 * 8.0 / row.seconds;
        let mut levels: Vec<String> = row
            .blocks_per_level
            .iter()
            .map(|(level, count)| format!("{level}:{count}"))
            .collect();
        levels.sort();
        let probes = if row.probes > 0 {
            format!(" ({} probes)", row.probes)
        } else {
            String::new()
        };
        println!(
            "| {} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} | {:.2} | {:.2} | {}{} |",
            row.policy.name(),
            row.seconds,
            row.wire_bytes as f64 / MIB as f64,
            row.raw_bytes as f64 / row.wire_bytes.max(1) as f64,
            raw_rate / 1e6,
            row.capacity_bits_per_second / 1e6,
            raw_rate / row.capacity_bits_per_second,
            wire_rate / row.capacity_bits_per_second,
            levels.join(" "),
            probes
        );
    }
}
