//! `novacron vm ...`: VM commands. Commands that change a VM wait (with a spinner on a
//! terminal) until the host reports the new state, unless `--no-wait`.

use crate::cli::{OutputFormat, RestartPolicyArg, VmCommand, WaitOptions};
use crate::client::{CliError, CliResult, Client};
use crate::output;
use novacron_types::{
    ByteSize, CreateVmRequest, ErrorCode, RestartPolicy, VmRecord, VmState, VmStatus,
};
use reqwest::Method;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub async fn run(client: &Client, format: OutputFormat, command: VmCommand) -> CliResult<()> {
    match command {
        VmCommand::Create(args) => {
            let memory: ByteSize =
                args.memory
                    .parse()
                    .map_err(|error: novacron_types::ParseSizeError| {
                        CliError::new(ErrorCode::InvalidArgument, error.to_string())
                    })?;
            let disk = args
                .disk
                .as_deref()
                .map(str::parse::<ByteSize>)
                .transpose()
                .map_err(|error| CliError::new(ErrorCode::InvalidArgument, error.to_string()))?;
            let absolute = |path: Option<std::path::PathBuf>| -> CliResult<Option<String>> {
                path.map(|path| {
                    std::path::absolute(&path)
                        .map(|path| path.display().to_string())
                        .map_err(|error| {
                            CliError::new(
                                ErrorCode::InvalidArgument,
                                format!("{}: {error}", path.display()),
                            )
                        })
                })
                .transpose()
            };
            let request = CreateVmRequest {
                name: args.name.clone(),
                image: args.image,
                cpus: args.cpus,
                memory_bytes: memory.0,
                disk_bytes: disk.map(|disk| disk.0),
                kernel: absolute(args.kernel)?,
                initrd: absolute(args.initrd)?,
                cmdline: args.cmdline,
                restart_policy: match args.restart {
                    RestartPolicyArg::Never => RestartPolicy::Never,
                    RestartPolicyArg::OnFailure => RestartPolicy::OnFailure,
                    RestartPolicyArg::Always => RestartPolicy::Always,
                },
                start: !args.no_start,
                host: args.host,
                required_labels: args.require_labels.into_iter().collect(),
                anti_affinity_group: args.anti_affinity,
                storage: args.storage,
            };
            let record: VmRecord = client
                .json(client.request(Method::POST, "/api/v1/vms").json(&request))
                .await?;
            let target = if args.no_start {
                VmState::Stopped
            } else {
                VmState::Running
            };
            let record = settle(
                client,
                &record.spec.name.to_string(),
                &[target],
                &args.wait,
                "creating",
                None,
            )
            .await?
            .unwrap_or(record);
            show(format, &record);
        }
        VmCommand::List => {
            let vms: Vec<VmRecord> = client.get("/api/v1/vms").await?;
            output::emit(format, &vms, |vms| {
                let rows: Vec<Vec<String>> = vms
                    .iter()
                    .map(|vm| {
                        vec![
                            vm.spec.name.to_string(),
                            vm.status.state.to_string(),
                            vm.spec.cpus.to_string(),
                            ByteSize(vm.spec.memory_bytes).to_string(),
                            vm.spec
                                .image_id
                                .as_deref()
                                .map(short_id)
                                .unwrap_or("-")
                                .to_string(),
                            vm.status.host.clone(),
                            output::age(vm.status.since),
                        ]
                    })
                    .collect();
                output::table(
                    &["NAME", "STATE", "CPUS", "MEMORY", "IMAGE", "HOST", "SINCE"],
                    &rows,
                );
            });
        }
        VmCommand::Show { name } => {
            let record: VmRecord = client
                .get(&format!("/api/v1/vms/{}", encode(&name)))
                .await?;
            show(format, &record);
        }
        VmCommand::Start(args) => {
            change(
                client,
                format,
                &args.name,
                &args.wait,
                PowerChange {
                    action: "start",
                    query: String::new(),
                    target: VmState::Running,
                    doing: "starting",
                },
            )
            .await?;
        }
        VmCommand::Stop(args) => {
            let mut query = format!("?force={}", args.force);
            if let Some(timeout) = args.timeout {
                query.push_str(&format!("&timeout_secs={timeout}"));
            }
            change(
                client,
                format,
                &args.name,
                &args.wait,
                PowerChange {
                    action: "stop",
                    query,
                    target: VmState::Stopped,
                    doing: "stopping",
                },
            )
            .await?;
        }
        VmCommand::Restart(args) => {
            let path = format!("/api/v1/vms/{}/restart", encode(&args.name));
            let record: VmRecord = client.json(client.request(Method::POST, &path)).await?;
            let generation = record.restart_generation;
            let stale = stale_failure(&record);
            let record = wait_for(
                client,
                &args.name,
                &args.wait,
                "restarting",
                stale,
                |record| {
                    record.status.observed_restart_generation >= generation
                        && record.status.state == VmState::Running
                },
            )
            .await?
            .unwrap_or(record);
            show(format, &record);
        }
        VmCommand::Pause(args) => {
            change(
                client,
                format,
                &args.name,
                &args.wait,
                PowerChange {
                    action: "pause",
                    query: String::new(),
                    target: VmState::Paused,
                    doing: "pausing",
                },
            )
            .await?;
        }
        VmCommand::Resume(args) => {
            change(
                client,
                format,
                &args.name,
                &args.wait,
                PowerChange {
                    action: "resume",
                    query: String::new(),
                    target: VmState::Running,
                    doing: "resuming",
                },
            )
            .await?;
        }
        VmCommand::Delete(args) => {
            let path = format!("/api/v1/vms/{}?force={}", encode(&args.name), args.force);
            let _: VmRecord = client.json(client.request(Method::DELETE, &path)).await?;
            if !args.wait.no_wait {
                wait_until_gone(client, &args.name, &args.wait).await?;
            }
            if format == OutputFormat::Table {
                println!("vm {} deleted", args.name);
            } else {
                println!("{}", serde_json::json!({ "deleted": args.name }));
            }
        }
        VmCommand::Logs(args) => {
            let mut path = format!(
                "/api/v1/vms/{}/logs?follow={}",
                encode(&args.name),
                args.follow
            );
            if let Some(tail) = args.tail_bytes {
                path.push_str(&format!("&tail_bytes={tail}"));
            }
            let mut response = client.send(client.request(Method::GET, &path)).await?;
            let mut stdout = std::io::stdout();
            while let Some(chunk) = response.chunk().await.map_err(|error| {
                CliError::new(ErrorCode::Unavailable, format!("log stream broke: {error}"))
            })? {
                let _ = stdout.write_all(&chunk);
                let _ = stdout.flush();
            }
        }
        VmCommand::Console { name } => crate::console::attach(client, &name).await?,
        VmCommand::Migrate(args) => crate::migration::migrate(client, format, args).await?,
    }
    Ok(())
}

/// Names are validated by the server; escaping what would break the URL lets a bad name get
/// the server's clear error instead of a routing miss.
fn encode(name: &str) -> String {
    crate::image::url_encode(name)
}

fn short_id(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// A power action of `vm start|stop|pause|resume`.
struct PowerChange {
    /// The API's action (`/api/v1/vms/NAME/ACTION`).
    action: &'static str,
    /// The request's query string (`?...`), or empty.
    query: String,
    /// The state the VM settles in.
    target: VmState,
    /// What the spinner says meanwhile.
    doing: &'static str,
}

async fn change(
    client: &Client,
    format: OutputFormat,
    name: &str,
    wait: &WaitOptions,
    power: PowerChange,
) -> CliResult<()> {
    let PowerChange {
        action,
        query,
        target,
        doing,
    } = power;
    let path = format!("/api/v1/vms/{}/{action}{query}", encode(name));
    let record: VmRecord = client.json(client.request(Method::POST, &path)).await?;
    let record = settle(client, name, &[target], wait, doing, stale_failure(&record))
        .await?
        .unwrap_or(record);
    show(format, &record);
    Ok(())
}

/// The failure a VM was in when a request was made: until the host reacts to the request the VM
/// still shows it, and it must not end the wait (regression: `vm start` of a failed VM reported
/// the old failure when it polled before the reconciler moved the VM to `starting`).
fn stale_failure(record: &VmRecord) -> Option<VmStatus> {
    (record.status.state == VmState::Failed).then(|| record.status.clone())
}

/// Waits until the VM is in one of `targets`; a `failed` VM (other than `stale`) ends the wait
/// with its reason.
async fn settle(
    client: &Client,
    name: &str,
    targets: &[VmState],
    wait: &WaitOptions,
    doing: &str,
    stale: Option<VmStatus>,
) -> CliResult<Option<VmRecord>> {
    wait_for(client, name, wait, doing, stale, |record| {
        targets.contains(&record.status.state)
    })
    .await
}

async fn wait_for(
    client: &Client,
    name: &str,
    wait: &WaitOptions,
    doing: &str,
    stale: Option<VmStatus>,
    done: impl Fn(&VmRecord) -> bool,
) -> CliResult<Option<VmRecord>> {
    if wait.no_wait {
        return Ok(None);
    }
    let spinner = spinner(&format!("{name}: {doing}"));
    let deadline = Instant::now() + Duration::from_secs(wait.wait_timeout);
    let path = format!("/api/v1/vms/{}", encode(name));
    loop {
        let record: VmRecord = client.get(&path).await?;
        if done(&record) {
            spinner.finish_and_clear();
            return Ok(Some(record));
        }
        if record.status.state == VmState::Failed && stale.as_ref() != Some(&record.status) {
            spinner.finish_and_clear();
            return Err(CliError::new(
                ErrorCode::Internal,
                format!(
                    "vm {name} failed: {}\n(`novacron vm logs {name}` shows its console)",
                    record
                        .status
                        .reason
                        .unwrap_or_else(|| "no reason recorded".into())
                ),
            ));
        }
        spinner.set_message(format!("{name}: {doing} ({})", record.status.state));
        if Instant::now() > deadline {
            spinner.finish_and_clear();
            return Err(CliError::new(
                ErrorCode::Unavailable,
                format!(
                    "vm {name} is still {} after {}s; it may get there later (`novacron vm show {name}`)",
                    record.status.state, wait.wait_timeout
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_until_gone(client: &Client, name: &str, wait: &WaitOptions) -> CliResult<()> {
    let spinner = spinner(&format!("{name}: deleting"));
    let deadline = Instant::now() + Duration::from_secs(wait.wait_timeout);
    let path = format!("/api/v1/vms/{}", encode(name));
    loop {
        match client.get::<VmRecord>(&path).await {
            Err(error) if error.code == ErrorCode::NotFound => {
                spinner.finish_and_clear();
                return Ok(());
            }
            Err(error) => return Err(error),
            Ok(_) if Instant::now() > deadline => {
                spinner.finish_and_clear();
                return Err(CliError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "vm {name} is still being deleted after {}s",
                        wait.wait_timeout
                    ),
                ));
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn spinner(message: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_message(message.to_string());
    spinner.enable_steady_tick(Duration::from_millis(100));
    spinner
}

fn show(format: OutputFormat, record: &VmRecord) {
    output::emit(format, record, |vm| {
        let status = &vm.status;
        let accelerator = match (status.accelerator, &status.accelerator_reason) {
            (Some(accelerator), Some(reason)) => {
                format!("{accelerator:?} ({reason})").to_lowercase()
            }
            (Some(accelerator), None) => format!("{accelerator:?}").to_lowercase(),
            _ => "-".into(),
        };
        output::details(&[
            ("name", vm.spec.name.to_string()),
            ("uuid", vm.uuid.clone()),
            ("state", status.state.to_string()),
            (
                "reason",
                status.reason.clone().unwrap_or_else(|| "-".into()),
            ),
            ("desired", format!("{:?}", vm.desired).to_lowercase()),
            ("host", status.host.clone()),
            (
                "placement",
                vm.placement.clone().unwrap_or_else(|| "-".into()),
            ),
            ("required labels", output::labels(&vm.spec.required_labels)),
            (
                "anti-affinity",
                vm.spec
                    .anti_affinity_group
                    .clone()
                    .unwrap_or_else(|| "-".into()),
            ),
            (
                "disk storage",
                match (&vm.spec.image_id, &vm.spec.storage) {
                    (None, _) => "-".into(),
                    (Some(_), None) => "local (its host's data directory)".into(),
                    (Some(_), Some(storage)) => format!("shared storage {storage}"),
                },
            ),
            (
                "migration",
                vm.migration.clone().unwrap_or_else(|| "-".into()),
            ),
            ("accelerator", accelerator),
            (
                "pid",
                status
                    .pid
                    .map(|pid| pid.to_string())
                    .unwrap_or_else(|| "-".into()),
            ),
            ("cpus", vm.spec.cpus.to_string()),
            ("memory", ByteSize(vm.spec.memory_bytes).to_string()),
            (
                "image",
                vm.spec.image_id.clone().unwrap_or_else(|| "-".into()),
            ),
            (
                "disk",
                vm.spec
                    .disk_bytes
                    .map(|disk| ByteSize(disk).to_string())
                    .unwrap_or_else(|| "image size".into()),
            ),
            (
                "kernel",
                vm.spec
                    .kernel
                    .as_ref()
                    .map(|path| path.display().to_string())
                    .unwrap_or_else(|| "-".into()),
            ),
            (
                "restart policy",
                format!("{:?}", vm.spec.restart_policy).to_lowercase(),
            ),
            ("restarts", status.restarts.to_string()),
            ("since", format!("{} ago", output::age(status.since))),
        ]);
    });
}
