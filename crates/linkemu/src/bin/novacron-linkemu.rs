//! `novacron-linkemu`: sets up an emulated WAN link between two network namespaces in the
//! foreground and tears it down on Ctrl-C / SIGTERM, or when the command given after `--` ends.
//! Argument parsing and wiring only; the work is in the library.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use novacron_linkemu::{LinkDirection, LinkEmulator, RunningLink, units};
use tokio::signal::unix::{Signal, SignalKind, signal};

#[derive(Debug, Parser)]
#[command(
    name = "novacron-linkemu",
    version,
    about = "userspace WAN link emulator between two network namespaces"
)]
struct Arguments {
    #[command(subcommand)]
    command: Action,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Set up a link, print one JSON line (namespaces, addresses), forward until Ctrl-C/SIGTERM
    /// or until COMMAND (run with LINKEMU_NS_A, LINKEMU_NS_B, LINKEMU_ADDR_A, LINKEMU_ADDR_B set)
    /// exits, then print the counters as one JSON line and tear down.
    Up(Box<UpArguments>),
    /// Remove namespaces left by killed runs (their owning process is gone).
    Cleanup,
}

#[derive(Debug, clap::Args)]
struct UpArguments {
    /// Tag in the namespace names (a-z, 0-9).
    #[arg(long, default_value = "cli")]
    name_prefix: String,
    /// One-way delay per direction, e.g. 25ms (RTT is twice this).
    #[arg(long, value_parser = units::parse_duration, default_value = "0")]
    delay: Duration,
    /// Uniform jitter (±) around the delay, e.g. 1ms; order is kept unless --reorder.
    #[arg(long, value_parser = units::parse_duration, default_value = "0")]
    jitter: Duration,
    /// Let jitter reorder packets.
    #[arg(long)]
    reorder: bool,
    /// Random loss per direction, e.g. 0.5% or 0.005.
    #[arg(long, value_parser = units::parse_probability, default_value = "0")]
    loss: f64,
    /// Rate per direction, e.g. 1gbit, 100mbit (IP bytes counted); unlimited if absent.
    #[arg(long, value_parser = units::parse_rate)]
    rate: Option<u64>,
    /// One-way delay A→B only (overrides --delay for that direction).
    #[arg(long, value_parser = units::parse_duration)]
    delay_a_to_b: Option<Duration>,
    /// One-way delay B→A only.
    #[arg(long, value_parser = units::parse_duration)]
    delay_b_to_a: Option<Duration>,
    /// Loss A→B only (overrides --loss for that direction).
    #[arg(long, value_parser = units::parse_probability)]
    loss_a_to_b: Option<f64>,
    /// Loss B→A only.
    #[arg(long, value_parser = units::parse_probability)]
    loss_b_to_a: Option<f64>,
    /// Rate A→B only (overrides --rate for that direction).
    #[arg(long, value_parser = units::parse_rate)]
    rate_a_to_b: Option<u64>,
    /// Rate B→A only.
    #[arg(long, value_parser = units::parse_rate)]
    rate_b_to_a: Option<u64>,
    /// Capacity trace (one line per 1500-byte delivery opportunity, ms) for both directions.
    #[arg(long, conflicts_with = "rate")]
    trace: Option<PathBuf>,
    /// Trace for A→B only.
    #[arg(long)]
    trace_a_to_b: Option<PathBuf>,
    /// Trace for B→A only.
    #[arg(long)]
    trace_b_to_a: Option<PathBuf>,
    /// Bottleneck queue limit per direction, e.g. 1m (default: about one bandwidth-delay product).
    #[arg(long, value_parser = units::parse_bytes)]
    queue: Option<u64>,
    /// Carry TCP super-packets across the link (less CPU; the model still acts per segment).
    #[arg(long)]
    offload: bool,
    /// Delayed packets leave on multiples of this, up to this late (0 = exact, more CPU).
    #[arg(long, value_parser = units::parse_duration, default_value = "200us")]
    release_granularity: Duration,
    /// Seed for loss and jitter.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Address of namespace A.
    #[arg(long, default_value = "10.77.0.1")]
    addr_a: Ipv4Addr,
    /// Address of namespace B.
    #[arg(long, default_value = "10.77.0.2")]
    addr_b: Ipv4Addr,
    /// Print counters to stderr this often (e.g. 1s); off if absent.
    #[arg(long, value_parser = units::parse_duration)]
    stats_interval: Option<Duration>,
    /// Command to run once the link is up; the link goes down when it exits.
    #[arg(last = true)]
    command: Vec<String>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Arguments::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(arguments: Arguments) -> anyhow::Result<ExitCode> {
    match arguments.command {
        Action::Cleanup => {
            let removed = novacron_linkemu::cleanup_stale().context("cleanup of leftovers")?;
            println!("{}", serde_json::json!({ "removed": removed }));
            Ok(ExitCode::SUCCESS)
        }
        Action::Up(up) => {
            let mut builder = LinkEmulator::builder()
                .name_prefix(&up.name_prefix)
                .delay(up.delay)
                .jitter(up.jitter)
                .allow_reordering(up.reorder)
                .loss(up.loss)
                .seed(up.seed)
                .segmentation_offload(up.offload)
                .release_granularity(up.release_granularity)
                .addresses(up.addr_a, up.addr_b, 24);
            if let Some(rate) = up.rate {
                builder = builder.rate_bits_per_sec(rate as f64);
            }
            for (direction, delay, loss, rate) in [
                (
                    LinkDirection::AToB,
                    up.delay_a_to_b,
                    up.loss_a_to_b,
                    up.rate_a_to_b,
                ),
                (
                    LinkDirection::BToA,
                    up.delay_b_to_a,
                    up.loss_b_to_a,
                    up.rate_b_to_a,
                ),
            ] {
                if let Some(delay) = delay {
                    builder = builder.delay_for(direction, delay);
                }
                if let Some(loss) = loss {
                    builder = builder.loss_for(direction, loss);
                }
                if let Some(rate) = rate {
                    builder = builder.rate_for(direction, rate as f64);
                }
            }
            if let Some(trace) = &up.trace {
                builder = builder.trace(trace);
            }
            if let Some(trace) = &up.trace_a_to_b {
                builder = builder.trace_a_to_b(trace);
            }
            if let Some(trace) = &up.trace_b_to_a {
                builder = builder.trace_b_to_a(trace);
            }
            if let Some(queue) = up.queue {
                builder = builder.queue_bytes(queue);
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            // Watch the signals before the link exists, so a SIGTERM sent as soon as the
            // link is announced still tears it down.
            let signals = runtime.block_on(async {
                anyhow::Ok((
                    signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
                    signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
                ))
            })?;
            let link = builder.spawn().context("cannot set up the emulated link")?;
            println!(
                "{}",
                serde_json::json!({
                    "ns_a": link.ns_a(), "ns_b": link.ns_b(),
                    "addr_a": link.addr_a(), "addr_b": link.addr_b(),
                    "interface": novacron_linkemu::LINK_INTERFACE,
                })
            );
            let code = runtime.block_on(wait_for_end(&link, &up, signals))?;
            println!("{}", serde_json::json!({ "counters": link.counters() }));
            link.shutdown().context("teardown")?;
            Ok(code)
        }
    }
}

async fn wait_for_end(
    link: &RunningLink,
    up: &UpArguments,
    (mut terminate, mut interrupt): (Signal, Signal),
) -> anyhow::Result<ExitCode> {
    let mut child = match up.command.split_first() {
        None => None,
        Some((program, arguments)) => Some(
            tokio::process::Command::new(program)
                .args(arguments)
                .env("LINKEMU_NS_A", link.ns_a())
                .env("LINKEMU_NS_B", link.ns_b())
                .env("LINKEMU_ADDR_A", link.addr_a().to_string())
                .env("LINKEMU_ADDR_B", link.addr_b().to_string())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot run {program:?}"))?,
        ),
    };
    let stats_period = up.stats_interval.unwrap_or(Duration::from_secs(3600));
    let mut stats = tokio::time::interval(stats_period);
    stats.tick().await;
    loop {
        tokio::select! {
            _ = terminate.recv() => {
                tracing::info!("sigterm, tearing down");
                return Ok(ExitCode::SUCCESS);
            }
            _ = interrupt.recv() => {
                tracing::info!("interrupted, tearing down");
                return Ok(ExitCode::SUCCESS);
            }
            status = async { child.as_mut().expect("guarded by the branch condition").wait().await }, if child.is_some() => {
                let status = status.context("waiting for the command")?;
                tracing::info!(%status, "command finished, tearing down");
                let code = status.code().and_then(|code| u8::try_from(code).ok()).unwrap_or(1);
                return Ok(ExitCode::from(code));
            }
            _ = stats.tick(), if up.stats_interval.is_some() => {
                eprintln!("{}", serde_json::json!({ "counters": link.counters() }));
            }
        }
    }
}
