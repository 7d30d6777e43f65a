//! `novacron image push/pull`, `novacron peer ...` and `novacron transfer ...`: thin clients of
//! the local host's transfer API. The host does the transfer; this command starts it, draws a
//! progress bar from `GET /api/v1/transfers/{id}` and prints a summary. Ctrl-C ends only the
//! command: the transfer goes on in `serve` (`novacron transfer cancel ID` stops it).

use crate::cli::{OutputFormat, PeerCommand, TransferArgs, TransferCommand};
use crate::client::{CliError, CliResult, Client};
use crate::image::url_encode;
use crate::output;
use novacron_types::{
    ByteSize, CreateTransferRequest, ErrorCode, PeerRecord, TransferDirection,
    TransferEstimateBasis, TransferInfo, TransferState, TrustPeerRequest,
};
use reqwest::Method;
use std::io::IsTerminal;
use std::time::Duration;

pub async fn start(
    client: &Client,
    format: OutputFormat,
    direction: TransferDirection,
    image: String,
    address: String,
    arguments: TransferArgs,
) -> CliResult<()> {
    let request = CreateTransferRequest {
        direction,
        image,
        address,
        fingerprint: arguments.fingerprint,
        name: arguments.name,
    };
    let info: TransferInfo = client
        .json(
            client
                .request(Method::POST, "/api/v1/transfers")
                .json(&request),
        )
        .await?;
    if arguments.no_wait {
        output::emit(format, &info, show_details);
        return Ok(());
    }
    let info = follow(client, info).await?;
    output::emit(format, &info, summary);
    match (info.state, info.error_code) {
        (TransferState::Succeeded, _) => Ok(()),
        (TransferState::Cancelled, _) => Err(CliError::new(
            ErrorCode::Conflict,
            format!("transfer {} was cancelled", info.id),
        )),
        (_, code) => Err(CliError::new(
            code.unwrap_or(ErrorCode::Internal),
            format!(
                "transfer {} failed: {}",
                info.id,
                info.message.unwrap_or_default()
            ),
        )),
    }
}

/// Polls the transfer until it ends, drawing a progress bar on a terminal.
async fn follow(client: &Client, mut info: TransferInfo) -> CliResult<TransferInfo> {
    let bar = if std::io::stderr().is_terminal() && !info.state.is_finished() {
        let bar = indicatif::ProgressBar::new(info.total_bytes);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        let verb = match info.direction {
            TransferDirection::Push => "pushing",
            TransferDirection::Pull => "pulling",
        };
        bar.set_prefix(format!("{verb} {}", info.image));
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let path = format!("/api/v1/transfers/{}", url_encode(&info.id));
    while !info.state.is_finished() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        info = client.get(&path).await?;
        bar.set_length(info.total_bytes);
        bar.set_position(info.raw_bytes_done);
        bar.set_message(format!(
            "wire {} (saved {}){}{}",
            ByteSize(info.wire_bytes),
            saved_percent(&info),
            info.zstd_level
                .map(|level| format!(" zstd {level}"))
                .unwrap_or_default(),
            eta(&info)
                .map(|eta| format!(" eta {eta}"))
                .unwrap_or_default()
        ));
    }
    bar.finish_and_clear();
    Ok(info)
}

fn saved_percent(info: &TransferInfo) -> String {
    if info.raw_bytes_done == 0 {
        return "-".into();
    }
    let saved = 1.0 - info.wire_bytes as f64 / info.raw_bytes_done as f64;
    format!("{:.1}%", saved * 100.0)
}

/// The host's ETA (from the link forecast while this host sends, else the measured rate).
fn eta(info: &TransferInfo) -> Option<String> {
    let seconds = info.eta_seconds?;
    let basis = match info.eta_basis {
        Some(TransferEstimateBasis::Forecast) => " (forecast)",
        Some(TransferEstimateBasis::MeasuredRate) | None => "",
    };
    let seconds = seconds.round() as u64;
    Some(if seconds >= 3600 {
        format!("{}h{:02}m{basis}", seconds / 3600, seconds % 3600 / 60)
    } else if seconds >= 60 {
        format!("{}m{:02}s{basis}", seconds / 60, seconds % 60)
    } else {
        format!("{seconds}s{basis}")
    })
}

fn rate(bytes_per_second: f64) -> String {
    format!("{}/s", ByteSize(bytes_per_second.max(0.0) as u64))
}

fn summary(info: &TransferInfo) {
    let verb = match info.direction {
        TransferDirection::Push => "pushed",
        TransferDirection::Pull => "pulled",
    };
    match info.state {
        TransferState::Succeeded if info.already_present => println!(
            "{}: {}",
            info.image,
            info.message.clone().unwrap_or_default()
        ),
        TransferState::Succeeded => {
            println!(
                "{verb} {} as {} ({}): {} raw, {} on the wire, saved {}, {:.1} s, {}",
                info.image,
                info.target_name,
                info.image_id
                    .as_deref()
                    .map(|id| &id[..12.min(id.len())])
                    .unwrap_or("-"),
                ByteSize(info.raw_bytes_done),
                ByteSize(info.wire_bytes),
                saved_percent(info),
                info.elapsed_seconds,
                rate(info.rate_bytes_per_second)
            );
        }
        _ => show_details(info),
    }
}

fn show_details(info: &TransferInfo) {
    output::details(&[
        ("id", info.id.clone()),
        (
            "direction",
            format!(
                "{}{}",
                match info.direction {
                    TransferDirection::Push => "push",
                    TransferDirection::Pull => "pull",
                },
                if info.initiated_by_peer {
                    " (started by the peer)"
                } else {
                    ""
                }
            ),
        ),
        ("image", info.image.clone()),
        ("arrives as", info.target_name.clone()),
        (
            "image id",
            info.image_id.clone().unwrap_or_else(|| "-".into()),
        ),
        ("peer", info.peer_address.clone()),
        ("peer fingerprint", info.peer_fingerprint.clone()),
        ("state", state_name(info.state).into()),
        (
            "message",
            info.message.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "progress",
            format!(
                "{} of {}",
                ByteSize(info.raw_bytes_done),
                ByteSize(info.total_bytes)
            ),
        ),
        (
            "on the wire",
            format!(
                "{} (saved {})",
                ByteSize(info.wire_bytes),
                saved_percent(info)
            ),
        ),
        ("time", format!("{:.1} s", info.elapsed_seconds)),
        ("rate", rate(info.rate_bytes_per_second)),
        (
            "link forecast",
            info.forecast_bits_per_second
                .map(crate::link::bits_per_second)
                .unwrap_or_else(|| "-".into()),
        ),
        (
            "zstd level",
            info.zstd_level
                .map(|level| level.to_string())
                .unwrap_or_else(|| "-".into()),
        ),
        ("eta", eta(info).unwrap_or_else(|| "-".into())),
        ("reconnections", info.reconnections.to_string()),
    ]);
}

fn state_name(state: TransferState) -> &'static str {
    match state {
        TransferState::Running => "running",
        TransferState::Succeeded => "succeeded",
        TransferState::Failed => "failed",
        TransferState::Cancelled => "cancelled",
    }
}

pub async fn transfer_command(
    client: &Client,
    format: OutputFormat,
    command: TransferCommand,
) -> CliResult<()> {
    match command {
        TransferCommand::List => {
            let transfers: Vec<TransferInfo> = client.get("/api/v1/transfers").await?;
            output::emit(format, &transfers, |transfers| {
                let rows: Vec<Vec<String>> = transfers
                    .iter()
                    .map(|info| {
                        vec![
                            info.id.clone(),
                            format!("{:?}", info.direction).to_lowercase(),
                            info.image.clone(),
                            info.peer_address.clone(),
                            state_name(info.state).into(),
                            format!(
                                "{}/{}",
                                ByteSize(info.raw_bytes_done),
                                ByteSize(info.total_bytes)
                            ),
                            ByteSize(info.wire_bytes).to_string(),
                        ]
                    })
                    .collect();
                output::table(
                    &["ID", "DIRECTION", "IMAGE", "PEER", "STATE", "DONE", "WIRE"],
                    &rows,
                );
            });
        }
        TransferCommand::Show { id } => {
            let info: TransferInfo = client
                .get(&format!("/api/v1/transfers/{}", url_encode(&id)))
                .await?;
            output::emit(format, &info, show_details);
        }
        TransferCommand::Cancel { id } => {
            let info: TransferInfo = client
                .json(client.request(
                    Method::DELETE,
                    &format!("/api/v1/transfers/{}", url_encode(&id)),
                ))
                .await?;
            output::emit(format, &info, |info| {
                println!("transfer {} cancelling", info.id)
            });
        }
    }
    Ok(())
}

pub async fn peer_command(
    client: &Client,
    format: OutputFormat,
    command: PeerCommand,
) -> CliResult<()> {
    match command {
        PeerCommand::Trust { fingerprint, name } => {
            let record: PeerRecord = client
                .json(
                    client
                        .request(Method::POST, "/api/v1/peers")
                        .json(&TrustPeerRequest { fingerprint, name }),
                )
                .await?;
            output::emit(format, &record, |record| {
                println!("trusting {}", describe_peer(record))
            });
        }
        PeerCommand::List => {
            let peers: Vec<PeerRecord> = client.get("/api/v1/peers").await?;
            output::emit(format, &peers, |peers| {
                let rows: Vec<Vec<String>> = peers
                    .iter()
                    .map(|peer| {
                        vec![
                            peer.name.clone().unwrap_or_else(|| "-".into()),
                            peer.fingerprint.clone(),
                            output::age(peer.trusted_at),
                        ]
                    })
                    .collect();
                output::table(&["NAME", "FINGERPRINT", "AGE"], &rows);
            });
        }
        PeerCommand::Forget { peer } => {
            let record: PeerRecord = client
                .json(client.request(
                    Method::DELETE,
                    &format!("/api/v1/peers/{}", url_encode(&peer)),
                ))
                .await?;
            output::emit(format, &record, |record| {
                println!("no longer trusting {}", describe_peer(record))
            });
        }
    }
    Ok(())
}

fn describe_peer(record: &PeerRecord) -> String {
    match &record.name {
        Some(name) => format!("{name} ({})", record.fingerprint),
        None => record.fingerprint.clone(),
    }
}
