//! The `novacron` binary: argument parsing and wiring only. `serve` runs a host; every other
//! command is a client of a host's REST API. Errors leave through one place, which picks the exit
//! code from the API's stable error code.

mod cli;
mod client;
mod cluster;
mod console;
mod image;
mod link;
mod migration;
mod output;
mod serve;
mod transfer;
mod vm;

use clap::{CommandFactory, Parser};
use cli::{Cli, Command};
use client::{CliError, Client};
use novacron_types::{ErrorCode, HostInfo, VmEvent};
use std::process::ExitCode;

fn main() -> ExitCode {
    // The only TLS provider in the build: aws-lc-rs, which offers the X25519MLKEM768 hybrid.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        Command::QmpHold { socket } => match novacron_qemu::held_monitor::hold(&socket) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!(
                    "error: holding the monitor at {}: {error}",
                    socket.display()
                );
                ExitCode::from(1)
            }
        },
        Command::Serve(args) => {
            init_tracing(args.log_json);
            match runtime.block_on(serve::run(&cli.client, args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("error: {error:#}");
                    ExitCode::from(1)
                }
            }
        }
        command => match runtime.block_on(client_command(&cli.client, command)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::from(u8::try_from(error.code.exit_code()).unwrap_or(1))
            }
        },
    }
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NOVACRON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn client_command(options: &cli::ClientOptions, command: Command) -> Result<(), CliError> {
    if let Command::Completions { shell } = command {
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "novacron",
            &mut std::io::stdout(),
        );
        return Ok(());
    }
    if let Command::Link(cli::LinkCommand::Eval { files, model }) = command {
        return link_eval(files, model);
    }
    let client = Client::new(options)?;
    match command {
        Command::Vm(command) => vm::run(&client, options.output, command).await,
        Command::Image(command) => image::run(&client, options.output, command).await,
        Command::Host => {
            let info: HostInfo = client.get("/api/v1/host").await?;
            output::emit(options.output, &info, |info| {
                output::details(&[
                    ("host", info.host.clone()),
                    ("version", info.version.clone()),
                    ("cpus", info.cpus.to_string()),
                    (
                        "memory",
                        novacron_types::ByteSize(info.memory_bytes).to_string(),
                    ),
                    (
                        "accelerator",
                        format!("{:?} ({})", info.accelerator, info.accelerator_reason)
                            .to_lowercase(),
                    ),
                    ("qemu", info.qemu_version.clone()),
                    ("data dir", info.data_dir.clone()),
                    ("vms", info.vms.to_string()),
                    ("images", info.images.to_string()),
                    ("fingerprint", info.fingerprint.clone()),
                    (
                        "transfers on",
                        info.transfer_address
                            .clone()
                            .unwrap_or_else(|| "- (no transfer listener)".into()),
                    ),
                ]);
            });
            Ok(())
        }
        Command::Events => follow_events(&client, options.output).await,
        Command::Cluster(command) => cluster::run(&client, options.output, command).await,
        Command::Peer(command) => transfer::peer_command(&client, options.output, command).await,
        Command::Transfer(command) => {
            transfer::transfer_command(&client, options.output, command).await
        }
        Command::Migration(command) => migration::run(&client, options.output, command).await,
        Command::Link(cli::LinkCommand::List) => link::list(&client, options.output).await,
        Command::Link(cli::LinkCommand::Show { peer }) => {
            link::show(&client, options.output, &peer).await
        }
        Command::Link(cli::LinkCommand::Probe {
            peer,
            seconds,
            address,
        }) => {
            let request = novacron_types::ProbeLinkRequest {
                seconds: Some(seconds),
                address,
            };
            link::probe(&client, options.output, &peer, &request).await
        }
        Command::Serve(_)
        | Command::Completions { .. }
        | Command::Link(_)
        | Command::QmpHold { .. } => Ok(()),
    }
}

async fn follow_events(client: &Client, format: cli::OutputFormat) -> Result<(), CliError> {
    let mut response = client
        .send(client.request(reqwest::Method::GET, "/api/v1/events"))
        .await?;
    let mut pending = String::new();
    while let Some(chunk) = response.chunk().await.map_err(|error| {
        CliError::new(
            ErrorCode::Unavailable,
            format!("event stream broke: {error}"),
        )
    })? {
        pending.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = pending.find("\n\n") {
            let block: String = pending.drain(..end + 2).collect();
            let Some(data) = block.lines().find_map(|line| line.strip_prefix("data:")) else {
                continue;
            };
            match format {
                cli::OutputFormat::Json => println!("{}", data.trim()),
                cli::OutputFormat::Table => {
                    if let Ok(event) = serde_json::from_str::<VmEvent>(data.trim()) {
                        let state = event
                            .state
                            .map(|state| state.to_string())
                            .unwrap_or_else(|| "deleted".into());
                        match event.reason {
                            Some(reason) => {
                                println!("{}  {}  {state}  ({reason})", event.revision, event.vm)
                            }
                            None => println!("{}  {}  {state}", event.revision, event.vm),
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

fn link_eval(files: Vec<std::path::PathBuf>, model: cli::LearnedModelArg) -> Result<(), CliError> {
    use novacron_bandwidth::{EvaluationOptions, LearnedModelChoice};
    let options = EvaluationOptions {
        learned_model: match model {
            cli::LearnedModelArg::Shipped => LearnedModelChoice::Shipped,
            cli::LearnedModelArg::LeaveOneDriveOut => LearnedModelChoice::LeaveOneDriveOut,
            cli::LearnedModelArg::Skip => LearnedModelChoice::Skip,
        },
        ..EvaluationOptions::default()
    };
    let report = novacron_bandwidth::evaluate(&files, &options)
        .map_err(|error| CliError::new(ErrorCode::InvalidArgument, error.to_string()))?;
    println!("{report}");
    Ok(())
}
