//! `novacron vm migrate` and `novacron migration list/show`: clients of the migration API. The
//! source host does the migration; this command records it, draws its progress from
//! `GET /api/v1/migrations/{id}` (phase, bytes of QEMU's stream against bytes on the wire, rate,
//! dirty rate, ETA, expected pause) and prints a summary. Ctrl-C ends only the command.

use crate::cli::{MigrateArgs, MigrationCommand, OutputFormat};
use crate::client::{CliError, CliResult, Client};
use crate::image::url_encode;
use crate::output;
use novacron_types::{ByteSize, ErrorCode, MigrateVmRequest, MigrationPhase, MigrationRecord};
use reqwest::Method;
use std::io::IsTerminal;
use std::time::Duration;

pub async fn run(
    client: &Client,
    format: OutputFormat,
    command: MigrationCommand,
) -> CliResult<()> {
    match command {
        MigrationCommand::List => {
            let migrations: Vec<MigrationRecord> = client.get("/api/v1/migrations").await?;
            output::emit(format, &migrations, |migrations| {
                let rows: Vec<Vec<String>> = migrations.iter().map(row).collect();
                output::table(
                    &[
                        "ID", "VM", "FROM", "TO", "PHASE", "MOVED", "WIRE", "TIME", "PAUSE", "AGE",
                    ],
                    &rows,
                );
            });
        }
        MigrationCommand::Show { migration } => {
            let record: MigrationRecord = client
                .get(&format!("/api/v1/migrations/{}", url_encode(&migration)))
                .await?;
            output::emit(format, &record, details);
        }
    }
    Ok(())
}

pub async fn migrate(client: &Client, format: OutputFormat, args: MigrateArgs) -> CliResult<()> {
    let path = format!("/api/v1/vms/{}/migrate", url_encode(&args.name));
    if args.cancel {
        let record: MigrationRecord = client.json(client.request(Method::DELETE, &path)).await?;
        if args.no_wait || record.phase.is_finished() {
            output::emit(format, &record, details);
            return Ok(());
        }
        let record = follow(client, record).await?;
        output::emit(format, &record, summary);
        return Ok(());
    }
    let request = MigrateVmRequest {
        to: args.to,
        downtime_limit_ms: Some(args.downtime_limit),
        timeout_secs: Some(args.timeout),
        when_not_converging: Some(args.when_not_converging.into()),
        post_copy_link_wait_secs: Some(args.post_copy_link_wait),
    };
    let record: MigrationRecord = client
        .json(client.request(Method::POST, &path).json(&request))
        .await?;
    if args.no_wait {
        output::emit(format, &record, details);
        return Ok(());
    }
    let record = follow(client, record).await?;
    output::emit(format, &record, summary);
    outcome(&record)
}

/// Moves `name` to a host placement chooses (defaults for everything else), following it with
/// the progress bar; `Err` unless it moved. For `cluster remove --force`.
pub async fn evacuate(client: &Client, name: &str) -> CliResult<MigrationRecord> {
    let path = format!("/api/v1/vms/{}/migrate", url_encode(name));
    let record: MigrationRecord = client
        .json(
            client
                .request(Method::POST, &path)
                .json(&MigrateVmRequest::default()),
        )
        .await?;
    let record = follow(client, record).await?;
    outcome(&record)?;
    Ok(record)
}

/// The command's exit status: success only when the VM moved.
fn outcome(record: &MigrationRecord) -> CliResult<()> {
    match record.phase {
        MigrationPhase::Completed => Ok(()),
        MigrationPhase::Cancelled => Err(CliError::new(
            ErrorCode::Conflict,
            format!(
                "migration {} was cancelled; vm {} stayed on {}",
                record.id, record.vm, record.source
            ),
        )),
        _ => Err(CliError::new(
            record.error_code.unwrap_or(ErrorCode::Internal),
            format!(
                "migration {} failed: {}; vm {} stayed on {}",
                record.id,
                record.message.clone().unwrap_or_default(),
                record.vm,
                record.source
            ),
        )),
    }
}

/// Polls the migration until it ends, drawing a progress bar on a terminal.
async fn follow(client: &Client, mut record: MigrationRecord) -> CliResult<MigrationRecord> {
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(record.progress.memory_bytes.max(1));
        bar.set_style(
            indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{} → {}", record.vm, record.destination));
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let path = format!("/api/v1/migrations/{}", url_encode(&record.id));
    while !record.phase.is_finished() {
        tokio::time::sleep(FOLLOW_INTERVAL).await;
        record = client.get(&path).await?;
        let progress = &record.progress;
        let total = progress.memory_bytes.max(1);
        bar.set_position(total.saturating_sub(progress.remaining_bytes).min(total));
        bar.set_message(progress_line(&record));
    }
    // The store marks a live move completed when ownership changes; the destination resumes
    // the guest right after and records when. Wait briefly for that so the summary can show
    // the pause.
    let resume_deadline = tokio::time::Instant::now() + RESUME_RECORD_WAIT;
    while record.phase == MigrationPhase::Completed
        && record.stopped_at_ms.is_some()
        && record.resumed_at_ms.is_none()
        && tokio::time::Instant::now() < resume_deadline
    {
        tokio::time::sleep(RESUME_RECORD_POLL).await;
        record = client.get(&path).await?;
    }
    bar.finish_and_clear();
    Ok(record)
}

/// How often `vm migrate` asks for the migration's record: its end shows within this (a move
/// across a fast link takes a few seconds).
const FOLLOW_INTERVAL: Duration = Duration::from_millis(100);

/// How long a finished live move's summary waits for the destination's RESUME time.
const RESUME_RECORD_WAIT: Duration = Duration::from_secs(6);

/// How often it asks meanwhile: the record comes a store write after the guest resumed, and
/// the command's own time is what a user waits for.
const RESUME_RECORD_POLL: Duration = Duration::from_millis(25);

/// One line of progress: phase, stream vs wire bytes, rate, dirty rate, ETA, expected pause.
fn progress_line(record: &MigrationRecord) -> String {
    let progress = &record.progress;
    let mut line = format!(
        "{} pass {} | stream {} wire {} | {}/s",
        record.phase,
        progress.passes,
        ByteSize(progress.stream_bytes),
        ByteSize(progress.wire_bytes),
        ByteSize((progress.rate_bits_per_second / 8.0) as u64),
    );
    if progress.dirty_pages_per_second > 0 {
        line.push_str(&format!(
            " | dirty {}/s",
            ByteSize(progress.dirty_pages_per_second * 4096)
        ));
    }
    if let Some(eta) = progress.eta_seconds {
        line.push_str(&format!(" | eta {eta:.0}s"));
    }
    if let Some(downtime) = progress.expected_downtime_ms {
        line.push_str(&format!(" | expected pause {downtime} ms"));
    }
    if progress.throttle_percent > 0 {
        line.push_str(&format!(
            " | guest throttled {} %",
            progress.throttle_percent
        ));
    }
    if let Some(plan) = &progress.plan {
        line.push_str(&format!(" | {plan}"));
    }
    if record.cancel_requested {
        line.push_str(" | cancelling");
    }
    line
}

fn row(record: &MigrationRecord) -> Vec<String> {
    vec![
        record.id.clone(),
        record.vm.clone(),
        record.source.clone(),
        record.destination.clone(),
        record.phase.to_string(),
        ByteSize(record.progress.stream_bytes).to_string(),
        ByteSize(record.progress.wire_bytes).to_string(),
        record
            .total_seconds
            .map(|seconds| format!("{seconds:.1}s"))
            .unwrap_or_else(|| "-".into()),
        record
            .pause_ms()
            .map(|pause| format!("{pause} ms"))
            .unwrap_or_else(|| "-".into()),
        output::age(record.created_at),
    ]
}

fn summary(record: &MigrationRecord) {
    match record.phase {
        MigrationPhase::Completed => {
            let progress = &record.progress;
            let saved = if progress.stream_bytes > 0 {
                format!(
                    " ({:.0}% less than qemu's stream of {})",
                    100.0 * (1.0 - progress.wire_bytes as f64 / progress.stream_bytes as f64),
                    ByteSize(progress.stream_bytes)
                )
            } else {
                String::new()
            };
            println!(
                "vm {} moved from {} to {} in {}: {} on the wire{saved}, guest paused {}",
                record.vm,
                record.source,
                record.destination,
                record
                    .total_seconds
                    .map(|seconds| format!("{seconds:.1} s"))
                    .unwrap_or_else(|| "-".into()),
                ByteSize(progress.wire_bytes),
                record
                    .pause_ms()
                    .map(|pause| format!("{pause} ms"))
                    .unwrap_or_else(|| "(not measured)".into()),
            );
            if let Some(pipeline) = &record.memory_pipeline {
                println!("pace set by {}", pipeline.pace());
            }
        }
        _ => details(record),
    }
}

fn details(record: &MigrationRecord) {
    let progress = &record.progress;
    output::details(&[
        ("id", record.id.clone()),
        ("vm", record.vm.clone()),
        ("from", record.source.clone()),
        ("to", record.destination.clone()),
        (
            "placement",
            record.placement.clone().unwrap_or_else(|| "-".into()),
        ),
        ("phase", record.phase.to_string()),
        (
            "message",
            record.message.clone().unwrap_or_else(|| "-".into()),
        ),
        ("cancel requested", record.cancel_requested.to_string()),
        ("memory", ByteSize(progress.memory_bytes).to_string()),
        ("qemu stream", ByteSize(progress.stream_bytes).to_string()),
        ("on the wire", ByteSize(progress.wire_bytes).to_string()),
        (
            "disk",
            if progress.disk_bytes == 0 {
                "-".to_string()
            } else {
                format!(
                    "{} of {} mirrored, {} on the wire",
                    ByteSize(progress.disk_bytes_done),
                    ByteSize(progress.disk_bytes),
                    ByteSize(progress.disk_wire_bytes)
                )
            },
        ),
        ("passes", progress.passes.to_string()),
        (
            "pages",
            format!(
                "{} zero, {} known ({} from the base image at the destination, {} from the \
                 kernel and initrd there, {} blocks the disk mirror delivered), {} delta, {} \
                 literal",
                progress.pages_zero,
                progress.pages_known,
                progress.pages_from_image,
                progress.pages_from_boot_files,
                progress.blocks_from_disk_mirror,
                progress.pages_delta,
                progress.pages_literal
            ),
        ),
        (
            "dirty rate",
            format!("{}/s", ByteSize(progress.dirty_pages_per_second * 4096)),
        ),
        (
            "downtime limit",
            match progress.qemu_downtime_limit_ms {
                Some(qemu) => format!(
                    "{} ms ({qemu} ms for QEMU, the rest for the bytes in flight)",
                    record.downtime_limit_ms
                ),
                None => format!("{} ms", record.downtime_limit_ms),
            },
        ),
        (
            "when not converging",
            match record.when_not_converging {
                novacron_types::migration::ConvergencePolicy::PostCopy => format!(
                    "post-copy (a lost link is waited for up to {} s after the switch)",
                    record.post_copy_link_wait_secs
                ),
                policy => policy.as_str().to_string(),
            },
        ),
        ("plan", progress.plan.clone().unwrap_or_else(|| "-".into())),
        ("guest throttle", format!("{} %", progress.throttle_percent)),
        (
            "guest pause",
            record
                .pause_ms()
                .map(|pause| format!("{pause} ms (source STOP to destination RESUME)"))
                .unwrap_or_else(|| "-".into()),
        ),
        (
            "total time",
            record
                .total_seconds
                .map(|seconds| format!("{seconds:.1} s"))
                .unwrap_or_else(|| "-".into()),
        ),
        (
            "stream check",
            record.stream_checksum.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "pace set by",
            record
                .memory_pipeline
                .map(|pipeline| pipeline.to_string())
                .unwrap_or_else(|| "-".into()),
        ),
        ("age", output::age(record.created_at)),
    ]);
}
