//! `novacron serve`: runs one host. Settings come from, in order of precedence, flags,
//! environment variables, the TOML config file and defaults.

use crate::cli::{ClientOptions, ServeArgs};
use crate::client::default_data_dir;
use anyhow::{Context, bail};
use novacron_agent::{Host, HostConfig, ensure_admin_token};
use novacron_api::{ApiMetrics, ApiState};
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7180";
pub const DEFAULT_TRANSFER_LISTEN: &str = "0.0.0.0:7181";

/// The config file. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    host_name: Option<String>,
    stop_timeout_secs: Option<u64>,
    qemu: Option<PathBuf>,
    qemu_img: Option<PathBuf>,
    transfer_listen: Option<String>,
    voter_loss_grace_secs: Option<u64>,
    /// `labels = { zone = "eu-1" }`
    labels: Option<novacron_types::Labels>,
    /// `shared_storages = { nfs1 = "/mnt/novacron" }`
    shared_storages: Option<std::collections::BTreeMap<String, PathBuf>>,
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<ConfigFile> {
    let Some(path) = path else {
        return Ok(ConfigFile::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config file {} is invalid", path.display()))
}

/// Raises the open-file limit to its maximum: every API client and every VM's QMP and console
/// sockets take a descriptor.
fn raise_open_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(error) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(%error, "cannot raise the open-file limit");
        }
    }
}

pub async fn run(client: &ClientOptions, args: ServeArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    raise_open_file_limit();
    let file = load_config(args.config.as_ref())?;
    let data_dir = client
        .data_dir
        .clone()
        .or(file.data_dir)
        .unwrap_or_else(default_data_dir);
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let mut config = HostConfig::new(&data_dir);
    if let Some(host_name) = args.host_name.or(file.host_name) {
        config.host_name = host_name;
    }
    config.qemu_system_binary = args.qemu.or(file.qemu);
    config.qemu_img_binary = args.qemu_img.or(file.qemu_img);
    if let Some(seconds) = file.stop_timeout_secs {
        config.default_stop_timeout = Duration::from_secs(seconds);
    }
    if let Some(seconds) = args.voter_loss_grace.or(file.voter_loss_grace_secs) {
        if seconds == 0 {
            bail!("--voter-loss-grace must be at least 1 second");
        }
        config.voter_loss_grace = Duration::from_secs(seconds);
    }
    config.labels = if args.labels.is_empty() {
        file.labels.unwrap_or_default()
    } else {
        args.labels.into_iter().collect()
    };
    if let Err(error) = novacron_types::validate_labels(&config.labels) {
        bail!("host labels: {error}");
    }
    config.shared_storages = if args.shared_storages.is_empty() {
        file.shared_storages.unwrap_or_default()
    } else {
        args.shared_storages.into_iter().collect()
    };
    for (name, path) in &config.shared_storages {
        if let Err(error) = crate::cli::parse_storage_arg(&format!("{name}={}", path.display())) {
            bail!("shared storage: {error}");
        }
    }
    config.scratch_keys = args.scratch_keys;
    let transfer_listen = args.transfer_listen.or(file.transfer_listen);
    config.transfer_listen_optional = transfer_listen.is_none();
    let transfer_listen = transfer_listen.unwrap_or_else(|| DEFAULT_TRANSFER_LISTEN.to_string());
    config.transfer_listen = if transfer_listen == "off" {
        None
    } else {
        match transfer_listen.parse() {
            Ok(address) => Some(address),
            Err(_) => bail!(
                "--transfer-listen {transfer_listen:?} is not an address like 0.0.0.0:7181 (or off)"
            ),
        }
    };

    let address: std::net::SocketAddr = match listen.parse() {
        Ok(address) => address,
        Err(_) => bail!("--listen {listen:?} is not an address like 127.0.0.1:7180"),
    };
    let listener = match tokio::net::TcpListener::bind(address).await {
        Ok(listener) => listener,
        Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => bail!(
            "cannot listen on {address}: the port is already in use (another `novacron serve`?); \
             stop it or choose another --listen"
        ),
        Err(error) => bail!("cannot listen on {address}: {error}"),
    };

    let host = Host::start(config)
        .await
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    let (token, created) =
        ensure_admin_token(host.paths()).map_err(|error| anyhow::anyhow!("{error}"))?;
    if created {
        eprintln!(
            "created the admin API token in {} (mode 0600); the CLI on this host reads it by itself",
            host.paths().token_file().display()
        );
    }
    let mut registry = prometheus_client::registry::Registry::with_prefix("novacron");
    host.register_metrics(&mut registry);
    let state = ApiState {
        host: host.clone(),
        admin_token: Arc::new(token),
        metrics: Arc::new(ApiMetrics::new(registry)),
    };
    let app = novacron_api::app(state);
    tracing::info!(
        %address,
        data_dir = %data_dir.display(),
        ready_ms = started.elapsed().as_millis() as u64,
        "novacron api ready"
    );
    eprintln!(
        "novacron serve: API on http://{address}, data in {}",
        data_dir.display()
    );
    match host.info_transfer_address() {
        Some(transfer_address) => eprintln!(
            "novacron serve: transfers on {transfer_address}, fingerprint {}",
            host.fingerprint()
        ),
        None => eprintln!(
            "novacron serve: no transfer listener; fingerprint {}",
            host.fingerprint()
        ),
    }
    let restart = host.restart_requested();
    let stopping = Arc::new(tokio::sync::Notify::new());
    let server = axum::serve(listener, app).with_graceful_shutdown({
        let stopping = stopping.clone();
        let restart = restart.clone();
        async move {
            shutdown_signal(restart).await;
            stopping.notify_one();
        }
    });
    // Open streams (events, logs -f) would hold a graceful shutdown forever: give in-flight
    // requests a moment, then stop anyway.
    tokio::select! {
        result = server => result.context("api server failed")?,
        () = async {
            stopping.notified().await;
            tokio::time::sleep(GRACEFUL_SHUTDOWN_LIMIT).await;
        } => {}
    }
    let restarting = *restart.borrow();
    if restarting {
        tracing::info!(
            "restarting to take the host's new role in the region; running vms keep running"
        );
    } else {
        tracing::info!("shutting down; running vms keep running");
    }
    host.shutdown().await;
    drop(host);
    if restarting {
        return restart_self();
    }
    Ok(())
}

/// How long a stopping `serve` waits for open requests.
const GRACEFUL_SHUTDOWN_LIMIT: Duration = Duration::from_secs(3);

/// Replaces this process with a new `serve` with the same arguments (same pid, so supervisors and
/// `serve.lock` readers keep tracking it). Every descriptor is close-on-exec, so the data
/// directory lock and the listeners are released for the new image.
fn restart_self() -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let mut arguments = std::env::args_os();
    let program_name = arguments.next().unwrap_or_else(|| "novacron".into());
    let error = std::process::Command::new("/proc/self/exe")
        .arg0(program_name)
        .args(arguments)
        .exec();
    bail!("cannot restart novacron serve: {error}; start it again by hand")
}

async fn shutdown_signal(mut restart: tokio::sync::watch::Receiver<bool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let restart_requested = async move {
        if restart.wait_for(|requested| *requested).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(stream) => stream,
        Err(_) => return restart_requested.await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = terminate.recv() => {},
        () = restart_requested => {},
    }
}
