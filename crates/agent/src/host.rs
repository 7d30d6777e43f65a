//! [`Host`]: start-up of one host (data directory lock, store, QEMU probe, reconciler) and the
//! service the API calls.

use crate::AgentError;
use crate::paths::{DataPaths, MAX_DATA_DIR_BYTES};
use crate::records::Records;
use crate::resources::HostCapacity;
use novacron_qemu::{AcceleratorProbe, BinaryError, QemuBinaries, QemuImg};
use novacron_store::Store;
use novacron_types::{Accelerator, HostInfo, VmEvent};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OnceCell, broadcast};

/// Settings of one host.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub data_dir: PathBuf,
    /// This host's name in the cluster (default: the system hostname).
    pub host_name: String,
    /// Explicit QEMU binaries; `None` searches `PATH`.
    pub qemu_system_binary: Option<PathBuf>,
    pub qemu_img_binary: Option<PathBuf>,
    /// How long `vm stop` waits for an ACPI power-down before forcing, unless the request says.
    pub default_stop_timeout: Duration,
    /// Where the DWCP transfer listener binds (`None`: no listener; pushes and pulls this host
    /// starts still work).
    pub transfer_listen: Option<std::net::SocketAddr>,
    /// When true, a transfer address that cannot be bound only disables the listener (with a
    /// warning) instead of failing the start (used for the default address).
    pub transfer_listen_optional: bool,
    /// In a region: how long a voter may be silent before the leader replaces it with a
    /// healthy learner.
    pub voter_loss_grace: Duration,
    /// The host's labels, published in its heartbeats for placement (`zone=eu-1`).
    pub labels: novacron_types::Labels,
    /// Shared storages this host mounts, by name (`serve --shared-storage NAME=PATH`): VMs
    /// created with `--storage NAME` keep their disk there (see [`crate::storage`]).
    pub shared_storages: std::collections::BTreeMap<String, PathBuf>,
    /// Serve the scratch keyspace (`/api/v1/scratch/...`, for store checks and diagnostics).
    pub scratch_keys: bool,
}

impl HostConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            host_name: system_host_name(),
            qemu_system_binary: None,
            qemu_img_binary: None,
            default_stop_timeout: Duration::from_secs(30),
            transfer_listen: None,
            transfer_listen_optional: false,
            voter_loss_grace: Duration::from_secs(60),
            labels: Default::default(),
            shared_storages: Default::default(),
            scratch_keys: false,
        }
    }
}

fn system_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// QEMU on this host: its binaries (looked up again while missing, so installing QEMU while
/// `serve` runs is enough) and the accelerator probe, run once in the background at start-up.
pub struct Hypervisor {
    system_binary: Option<PathBuf>,
    img_binary: Option<PathBuf>,
    located: OnceCell<QemuBinaries>,
    probe: OnceCell<AcceleratorProbe>,
}

impl Hypervisor {
    fn new(config: &HostConfig) -> Self {
        Self {
            system_binary: config.qemu_system_binary.clone(),
            img_binary: config.qemu_img_binary.clone(),
            located: OnceCell::new(),
            probe: OnceCell::new(),
        }
    }

    pub fn binaries(&self) -> Result<&QemuBinaries, AgentError> {
        if let Some(binaries) = self.located.get() {
            return Ok(binaries);
        }
        // One given (`--qemu` alone, say): the other is found in PATH.
        let binaries =
            QemuBinaries::with_paths(self.system_binary.clone(), self.img_binary.clone())
                .map_err(|error: BinaryError| AgentError::MissingBinary(error))?;
        let _ = self.located.set(binaries);
        self.located
            .get()
            .ok_or_else(|| AgentError::InvalidArgument("qemu binaries".into()))
    }

    pub fn qemu_img(&self) -> Result<QemuImg, AgentError> {
        Ok(QemuImg::new(self.binaries()?))
    }

    /// The accelerator VMs get: KVM when it really runs a guest here, TCG otherwise.
    pub async fn accelerator(&self) -> Result<&AcceleratorProbe, AgentError> {
        let binaries = self.binaries()?;
        Ok(self
            .probe
            .get_or_init(|| novacron_qemu::probe_accelerator_cached(binaries))
            .await)
    }
}

pub(crate) fn to_record_accelerator(accelerator: novacron_qemu::Accelerator) -> Accelerator {
    match accelerator {
        novacron_qemu::Accelerator::Kvm => Accelerator::Kvm,
        novacron_qemu::Accelerator::Tcg => Accelerator::Tcg,
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StateLabel {
    pub state: String,
}

/// Metrics of the agent; each one is updated by the reconciler or the image store.
#[derive(Default)]
pub(crate) struct AgentMetrics {
    pub state_transitions: Family<StateLabel, Counter>,
    pub qemu_launches: Counter,
    pub qemu_unexpected_exits: Counter,
    pub store_is_leader: Gauge,
    pub store_term: Gauge,
    pub store_last_log_index: Gauge,
    pub store_last_applied_index: Gauge,
    /// Boot files (kernels, initrds) indexed ahead of migrations
    /// (`crate::migration::keep_boot_files_indexed`).
    pub boot_files_indexed: Gauge,
}

/// Copies the store's raft metrics into the gauges once a second.
async fn export_store_metrics(store: Store, shared: Arc<Shared>) {
    let as_gauge = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    loop {
        interval.tick().await;
        let metrics = store.metrics();
        let gauges = &shared.metrics;
        gauges
            .store_is_leader
            .set(i64::from(metrics.leader_id == Some(metrics.node_id)));
        gauges.store_term.set(as_gauge(metrics.term));
        gauges
            .store_last_log_index
            .set(as_gauge(metrics.last_log_index.unwrap_or(0)));
        gauges
            .store_last_applied_index
            .set(as_gauge(metrics.last_applied_index.unwrap_or(0)));
    }
}

/// Saves the links every [`crate::links::LINKS_SAVE_INTERVAL`], so a host killed without a
/// shutdown loses at most that much of their history.
async fn save_links(links: Arc<crate::links::LinkMonitor>, path: std::path::PathBuf) {
    let mut interval = tokio::time::interval(crate::links::LINKS_SAVE_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        interval.tick().await;
        let (links, path) = (links.clone(), path.clone());
        match tokio::task::spawn_blocking(move || links.save(&path)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "links not saved"),
            Err(error) => tracing::warn!(%error, "links not saved"),
        }
    }
}

/// Copies the links' models and the transfer connections' counts into their metrics once a
/// second.
async fn export_transfer_metrics(transfers: Arc<crate::transfer::TransferService>) {
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    loop {
        interval.tick().await;
        transfers.links.export_metrics();
        transfers.export_metrics();
    }
}

/// What the service and the reconciler share.
pub(crate) struct Shared {
    pub config: HostConfig,
    pub paths: DataPaths,
    pub records: Records,
    pub hypervisor: Arc<Hypervisor>,
    pub capacity: HostCapacity,
    pub metrics: AgentMetrics,
    /// The chunk store every image is indexed in (`<data>/chunks/`).
    pub chunks: Arc<novacron_codec::ChunkStore>,
    /// The region this host is a member of; `None` for a one-host cluster.
    pub region: Option<Arc<crate::region::Region>>,
    /// This host's transfer listener as the region reaches it: (address, certificate
    /// fingerprint), set once the listener is bound; published in the heartbeat.
    pub transfer_endpoint: std::sync::OnceLock<(Option<String>, String)>,
    /// The transfer service (migrations dial through it); weak, as it holds this.
    pub transfer_service: std::sync::OnceLock<std::sync::Weak<crate::transfer::TransferService>>,
    /// The blocks each incoming migration's disk mirror delivered, by migration id, while the
    /// migration is received here (its memory and disk sessions share them).
    pub delivered_pages: std::sync::Mutex<
        std::collections::HashMap<String, Arc<novacron_migration::DeliveredPages>>,
    >,
    /// VMs (uuid) whose incoming post-copy this process drives. A QEMU in post-copy that is
    /// not listed here lost its stream with an earlier `serve`: it can never run its guest.
    pub postcopy_incoming: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Incoming post-copy migrations this process drives after their switch, by migration id:
    /// a source whose stream broke hands its new session over here
    /// (`MigrationControl::Recover`).
    pub postcopy_recoveries: std::sync::Mutex<
        std::collections::HashMap<
            String,
            tokio::sync::mpsc::Sender<crate::migration::PostcopyRecovery>,
        >,
    >,
    /// Base images' 4 KiB page indexes (by image id) while a migration uses one and for ten
    /// minutes after: the memory and the disk of a migration, and the next migrations of VMs on
    /// the same image, share one instead of each reading the whole image.
    pub image_page_indexes: crate::kept::KeptCache<String, novacron_migration::ImagePageIndex>,
    /// The same for a direct kernel boot's kernel and initrd (hashed and indexed with what the
    /// guest unpacks from them), by file identity (`crate::migration::HeldFileKey`): both hosts
    /// of every migration of a VM booted from them need them.
    pub held_file_indexes:
        crate::kept::KeptCache<crate::migration::HeldFileKey, novacron_migration::HeldFile>,
    /// Imported images whose chunk-store and page indexes are still being built.
    pub indexing_images: crate::images::IndexingImages,
}

impl Shared {
    pub fn transfer_service(&self) -> Option<Arc<crate::transfer::TransferService>> {
        self.transfer_service
            .get()
            .and_then(std::sync::Weak::upgrade)
    }
}

/// How long `link probe` sends when not told.
const DEFAULT_PROBE_SECONDS: f64 = 3.0;

/// One running host. Dropping it stops the reconciler; QEMU processes keep running.
pub struct Host {
    pub(crate) shared: Arc<Shared>,
    events: broadcast::Sender<VmEvent>,
    pub(crate) transfers: Arc<crate::transfer::TransferService>,
    background: Vec<tokio::task::JoinHandle<()>>,
    store: Store,
    /// Set by cluster init and join: `serve` must restart to open the store in the region.
    restart: tokio::sync::watch::Sender<bool>,
    _lock: std::fs::File,
}

impl Drop for Host {
    fn drop(&mut self) {
        let transfers = self.transfers.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { transfers.shutdown().await });
        }
        for task in &self.background {
            task.abort();
        }
    }
}

impl Host {
    /// Starts a host on `config.data_dir`: takes the directory's lock, opens the store and, in
    /// parallel, probes QEMU; then starts the reconciler. Returns once the API can be served.
    pub async fn start(config: HostConfig) -> Result<Arc<Host>, AgentError> {
        let paths = DataPaths::new(&config.data_dir);
        let data_dir_display = config.data_dir.display().to_string();
        if config.data_dir.as_os_str().len() > MAX_DATA_DIR_BYTES {
            return Err(AgentError::InvalidArgument(format!(
                "data directory {data_dir_display} is longer than {MAX_DATA_DIR_BYTES} bytes; VM \
                 sockets inside it would exceed the Unix socket path limit — choose a shorter \
                 --data-dir"
            )));
        }
        std::fs::create_dir_all(&config.data_dir).map_err(|error| {
            AgentError::io(format!("creating data directory {data_dir_display}"), error)
        })?;
        let lock = lock_data_dir(&paths)?;
        crate::storage::check_shared_storages(&config)?;

        let hypervisor = Arc::new(Hypervisor::new(&config));
        let store_paths = paths.clone();
        let store_host_name = config.host_name.clone();
        let store_task =
            tokio::spawn(
                async move { crate::region::open_store(&store_paths, &store_host_name).await },
            );
        // The accelerator probe runs QEMU for a moment: start it now, beside the store. The
        // reconciler waits for its result before it launches anything.
        let probe_hypervisor = hypervisor.clone();
        tokio::spawn(async move {
            match probe_hypervisor.accelerator().await {
                Ok(probe) => tracing::info!(
                    accelerator = probe.accelerator.qemu_name(),
                    reason = %probe.reason,
                    "accelerator probed"
                ),
                Err(error) => tracing::warn!(%error, "qemu is not usable; vms cannot start"),
            }
        });
        let chunks_dir = paths.chunks_dir();
        let chunks_task =
            tokio::task::spawn_blocking(move || novacron_codec::ChunkStore::open(&chunks_dir));
        let identity_paths = paths.clone();
        let identity_host_name = config.host_name.clone();
        let identity_task = tokio::task::spawn_blocking(move || {
            crate::identity::load_or_create(&identity_paths, &identity_host_name)
        });
        let (store, region) = store_task.await.map_err(|error| {
            AgentError::InvalidArgument(format!("store start-up failed: {error}"))
        })??;
        let chunks = chunks_task
            .await
            .map_err(|error| {
                AgentError::InvalidArgument(format!("chunk store start-up failed: {error}"))
            })?
            .map_err(|error| AgentError::CorruptRecord {
                key: paths.chunks_dir().display().to_string(),
                reason: format!("cannot open the chunk store: {error}"),
            })?;
        let identity = identity_task.await.map_err(|error| {
            AgentError::InvalidArgument(format!("identity start-up failed: {error}"))
        })??;

        let records = match &region {
            Some(region) => Records::in_region(region.cluster.clone()),
            None => Records::new(store.clone()),
        };
        let shared = Arc::new(Shared {
            paths,
            records,
            region: region.clone(),
            hypervisor,
            capacity: HostCapacity::read(),
            metrics: AgentMetrics::default(),
            chunks: Arc::new(chunks),
            config,
            transfer_endpoint: std::sync::OnceLock::new(),
            transfer_service: std::sync::OnceLock::new(),
            postcopy_incoming: Default::default(),
            postcopy_recoveries: Default::default(),
            delivered_pages: Default::default(),
            image_page_indexes: crate::kept::KeptCache::new(
                crate::migration::IMAGE_PAGE_INDEX_KEEP,
            ),
            held_file_indexes: crate::kept::KeptCache::new(crate::migration::IMAGE_PAGE_INDEX_KEEP),
            indexing_images: Default::default(),
        });
        let mut background = Vec::new();
        match &region {
            // One host: its store answers at once.
            None => {
                crate::images::sweep(&shared.paths, &shared.records).await?;
                crate::images::index_unindexed_images(&shared).await?;
            }
            // A region member may not reach a leader yet (joining, or a minority after a
            // restart): sweep once it can read, without holding up the start.
            Some(region) => {
                let sweep_shared = shared.clone();
                background.push(tokio::spawn(async move {
                    while let Err(error) =
                        crate::images::sweep(&sweep_shared.paths, &sweep_shared.records).await
                    {
                        tracing::info!(%error, "image sweep waits for the region's store");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                    if let Err(error) = crate::images::index_unindexed_images(&sweep_shared).await {
                        tracing::warn!(%error, "images not checked for a missing index");
                    }
                }));
                background.push(tokio::spawn(region.clone().become_learner()));
                background.push(tokio::spawn(crate::region::heartbeat(
                    shared.clone(),
                    region.clone(),
                )));
                background.push(tokio::spawn(crate::region::leader_loop(
                    shared.clone(),
                    region.clone(),
                )));
            }
        }
        tokio::fs::create_dir_all(shared.paths.vms_dir())
            .await
            .map_err(|error| AgentError::io("creating the vms directory", error))?;

        let transfers = crate::transfer::TransferService::new(
            shared.clone(),
            identity,
            shared.config.transfer_listen,
        );
        let restored = transfers.links.load(&shared.paths.links_file());
        if restored > 0 {
            tracing::info!(links = restored, "link measurements restored");
        }
        if let Err(error) = transfers.start_listener().await {
            if !shared.config.transfer_listen_optional {
                return Err(error);
            }
            tracing::warn!(%error, "transfer listener not started; this host cannot receive pushes or serve pulls (pass --transfer-listen to choose an address)");
        }
        let _ = shared.transfer_service.set(Arc::downgrade(&transfers));
        let advertised = transfers
            .bound_address()
            .map(|bound| crate::region::advertised_transfer_address(&shared, bound));
        let _ = shared
            .transfer_endpoint
            .set((advertised, transfers.fingerprint().to_string()));
        if shared.region.is_some() {
            background.push(tokio::spawn(crate::transfer::follow_region_trust(
                transfers.clone(),
            )));
            background.push(tokio::spawn(crate::migration::keep_boot_files_indexed(
                shared.clone(),
                store.clone(),
            )));
        }
        let (events, _) = broadcast::channel(1024);
        background.extend([
            tokio::spawn(crate::events::publish(store.clone(), events.clone())),
            tokio::spawn(crate::reconciler::run(shared.clone())),
            tokio::spawn(export_store_metrics(store.clone(), shared.clone())),
            tokio::spawn(export_transfer_metrics(transfers.clone())),
            tokio::spawn(save_links(
                transfers.links.clone(),
                shared.paths.links_file(),
            )),
        ]);
        let (restart, _) = tokio::sync::watch::channel(false);
        Ok(Arc::new(Host {
            shared,
            events,
            transfers,
            background,
            store,
            restart,
            _lock: lock,
        }))
    }

    /// Stops the reconciler and closes the store. QEMU processes keep running; the next start
    /// re-attaches to them.
    pub async fn shutdown(&self) {
        if let Err(error) = self.transfers.links.save(&self.shared.paths.links_file()) {
            tracing::warn!(%error, "links not saved");
        }
        self.transfers.shutdown().await;
        for task in &self.background {
            task.abort();
        }
        if let Some(region) = &self.shared.region {
            region.shutdown().await;
        }
        if let Err(error) = self.store.shutdown().await {
            tracing::warn!(%error, "store shutdown");
        }
    }

    pub fn paths(&self) -> &DataPaths {
        &self.shared.paths
    }

    /// Becomes true when `serve` must restart itself (after cluster init or join) to open the
    /// store in the region.
    pub fn restart_requested(&self) -> tokio::sync::watch::Receiver<bool> {
        self.restart.subscribe()
    }

    pub(crate) fn request_restart(&self) {
        self.restart.send_replace(true);
    }

    pub fn subscribe_events(&self) -> broadcast::Receiver<VmEvent> {
        self.events.subscribe()
    }

    /// Adds the agent's and the store's metrics to a registry.
    pub fn register_metrics(&self, registry: &mut Registry) {
        let metrics = &self.shared.metrics;
        registry.register(
            "vm_state_transitions",
            "VM state changes written by the reconciler, by new state",
            metrics.state_transitions.clone(),
        );
        registry.register(
            "qemu_launches",
            "QEMU processes started",
            metrics.qemu_launches.clone(),
        );
        registry.register(
            "qemu_unexpected_exits",
            "QEMU processes that ended without being asked to",
            metrics.qemu_unexpected_exits.clone(),
        );
        registry.register(
            "store_is_leader",
            "1 while this host leads the store's raft group",
            metrics.store_is_leader.clone(),
        );
        registry.register(
            "store_term",
            "current raft term",
            metrics.store_term.clone(),
        );
        registry.register(
            "store_last_log_index",
            "index of the last entry in this host's raft log",
            metrics.store_last_log_index.clone(),
        );
        registry.register(
            "store_last_applied_index",
            "index of the last raft entry applied to this host's state machine",
            metrics.store_last_applied_index.clone(),
        );
        registry.register(
            "migration_boot_files_indexed",
            "kernels and initrds of the region's VMs this host keeps indexed for migrations",
            metrics.boot_files_indexed.clone(),
        );
        self.transfers.links.register_metrics(registry);
        self.transfers.register_metrics(registry);
    }

    pub async fn info(&self) -> Result<HostInfo, AgentError> {
        let shared = &self.shared;
        let probe = shared.hypervisor.accelerator().await?;
        let qemu_version = novacron_qemu_version(shared.hypervisor.binaries()?).await;
        Ok(HostInfo {
            host: shared.config.host_name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            cpus: shared.capacity.cpus,
            memory_bytes: shared.capacity.memory_bytes,
            accelerator: to_record_accelerator(probe.accelerator),
            accelerator_reason: probe.reason.lines().next().unwrap_or_default().to_string(),
            qemu_version,
            data_dir: shared.paths.root().display().to_string(),
            vms: shared.records.vms().await?.len(),
            images: shared.records.images().await?.len(),
            fingerprint: self.transfers.fingerprint().to_string(),
            transfer_address: self
                .transfers
                .bound_address()
                .map(|address| address.to_string()),
        })
    }
}

async fn novacron_qemu_version(binaries: &QemuBinaries) -> String {
    let output = tokio::process::Command::new(&binaries.system)
        .arg("--version")
        .output()
        .await;
    match output {
        Ok(output) => String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string(),
        Err(error) => format!("unknown ({error})"),
    }
}

/// Takes `serve.lock` so that two `serve` processes never share a data directory.
fn lock_data_dir(paths: &DataPaths) -> Result<std::fs::File, AgentError> {
    let path = paths.lock_file();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|error| AgentError::io(format!("opening {}", path.display()), error))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(_) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(AgentError::DataDirInUse {
                directory: paths.root().display().to_string(),
                holder: holder.trim().to_string(),
            });
        }
    }
    file.set_len(0)
        .map_err(|error| AgentError::io("writing serve.lock", error))?;
    write!(file, "{}", std::process::id())
        .map_err(|error| AgentError::io("writing serve.lock", error))?;
    Ok(file)
}

/// Reads the admin token, creating it (mode 0600) on first start. Returns the token and whether
/// it was created now.
pub fn ensure_admin_token(paths: &DataPaths) -> Result<(String, bool), AgentError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = paths.token_file();
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => return Ok((token.trim().to_string(), false)),
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(AgentError::io(format!("reading {}", path.display()), error)),
    }
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    let token: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(|error| AgentError::io(format!("creating {}", path.display()), error))?;
    writeln!(file, "{token}")
        .and_then(|()| file.sync_all())
        .map_err(|error| AgentError::io(format!("writing {}", path.display()), error))?;
    Ok((token, true))
}

/// Peers and image transfers (`novacron peer ...`, `novacron image push/pull`).
impl Host {
    /// The SHA-256 fingerprint of this host's transfer certificate.
    pub fn fingerprint(&self) -> String {
        self.transfers.fingerprint().to_string()
    }

    pub async fn trust_peer(
        &self,
        request: novacron_types::TrustPeerRequest,
    ) -> Result<novacron_types::PeerRecord, AgentError> {
        self.transfers.trust_peer(request).await
    }

    pub async fn list_peers(&self) -> Result<Vec<novacron_types::PeerRecord>, AgentError> {
        self.transfers.peers().await
    }

    /// Forgets a peer, by fingerprint or label.
    pub async fn forget_peer(
        &self,
        reference: &str,
    ) -> Result<novacron_types::PeerRecord, AgentError> {
        self.transfers.forget_peer(reference).await
    }

    pub async fn start_transfer(
        &self,
        request: novacron_types::CreateTransferRequest,
    ) -> Result<novacron_types::TransferInfo, AgentError> {
        self.transfers.start(request).await
    }

    /// The links this host has sent over, with their measured rates and forecasts.
    pub async fn list_links(&self) -> Result<Vec<novacron_types::LinkInfo>, AgentError> {
        let peers = self.transfers.peers().await?;
        Ok(self.transfers.links.list(|fingerprint| {
            peers
                .iter()
                .find(|peer| peer.fingerprint == fingerprint)
                .and_then(|peer| peer.name.clone())
        }))
    }

    /// One link, by the peer's fingerprint or its peer label.
    pub async fn get_link(&self, peer: &str) -> Result<novacron_types::LinkInfo, AgentError> {
        self.list_links()
            .await?
            .into_iter()
            .find(|link| link.peer_fingerprint == peer || link.peer_name.as_deref() == Some(peer))
            .ok_or_else(|| AgentError::LinkNotFound {
                peer: peer.to_string(),
            })
    }

    /// Measures the link to `peer` (fingerprint, peer label or region host name) now, and
    /// returns it as measured.
    pub async fn probe_link(
        &self,
        peer: &str,
        request: &novacron_types::ProbeLinkRequest,
    ) -> Result<novacron_types::LinkInfo, AgentError> {
        let seconds = request.seconds.unwrap_or(DEFAULT_PROBE_SECONDS);
        // Negative, NaN or huge: not a duration at all. The range is the probe's to check.
        let duration = Duration::try_from_secs_f64(seconds)
            .map_err(|_| crate::transfer::probe_duration_error(seconds))?;
        // Only an address is wanted: a local read works without a quorum.
        let heartbeats = self.shared.records.heartbeats_local().await?;
        let region_host = heartbeats
            .iter()
            .find(|beat| beat.host == peer || beat.transfer_fingerprint.as_deref() == Some(peer));
        let fingerprint_text =
            if let Some(beat) = region_host {
                beat.transfer_fingerprint.clone().ok_or_else(|| {
                    AgentError::InvalidArgument(format!(
                        "host {} publishes no transfer listener, so its link cannot be probed",
                        beat.host
                    ))
                })?
            } else if let Some(record) =
                self.transfers.peers().await?.into_iter().find(|record| {
                    record.fingerprint == peer || record.name.as_deref() == Some(peer)
                })
            {
                record.fingerprint
            } else {
                return Err(AgentError::LinkNotFound {
                    peer: peer.to_string(),
                });
            };
        let fingerprint = crate::transfer::parse_fingerprint(&fingerprint_text)?;
        let known_address = self.transfers.links.last_address(fingerprint);
        let address = request
            .address
            .clone()
            .or_else(|| region_host.and_then(|beat| beat.transfer_address.clone()))
            .or(known_address)
            .ok_or_else(|| {
                AgentError::InvalidArgument(format!(
                    "no transfer address is known for {peer}; give it (`--address HOST:PORT`, \
                     the peer's --transfer-listen)"
                ))
            })?;
        self.transfers
            .probe_link(&address, fingerprint, duration)
            .await?;
        self.get_link(&fingerprint_text).await
    }

    pub fn list_transfers(&self) -> Vec<novacron_types::TransferInfo> {
        self.transfers.list()
    }

    pub fn get_transfer(&self, id: &str) -> Result<novacron_types::TransferInfo, AgentError> {
        self.transfers.get(id)
    }

    /// Asks a running transfer to stop; it ends as `cancelled` shortly after, leaving nothing.
    pub fn cancel_transfer(&self, id: &str) -> Result<novacron_types::TransferInfo, AgentError> {
        self.transfers.cancel(id)
    }
}

impl Host {
    /// The address the transfer listener is bound to, if it runs.
    pub fn info_transfer_address(&self) -> Option<String> {
        self.transfers
            .bound_address()
            .map(|address| address.to_string())
    }
}
