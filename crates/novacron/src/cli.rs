//! The command line. `serve` runs a host; every other command is a client of a host's REST API.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "novacron",
    version,
    about = "NovaCron: a control plane for QEMU virtual machines",
    long_about = "NovaCron runs QEMU virtual machines on a cluster of hosts.\n\n\
                  `novacron serve` runs a host (with no cluster configured it is a one-host \
                  cluster). Every other command talks to a host's REST API; on the host itself \
                  it finds the admin token by itself.",
    after_help = "Examples:\n  novacron serve\n  novacron image import disk.qcow2 --name debian\n  \
                  novacron vm create web --image debian --cpus 2 --memory 1GiB\n  \
                  novacron vm list --output json\n\n\
                  Exit codes: 0 ok, 1 internal error, 2 invalid argument, 3 bad token, 4 not found, \
                  5 already exists, 6 conflict (wrong state), 7 insufficient resources, \
                  8 unavailable (server down, QEMU missing)"
)]
pub struct Cli {
    #[command(flatten)]
    pub client: ClientOptions,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct ClientOptions {
    /// URL of the host's API
    #[arg(
        long,
        global = true,
        env = "NOVACRON_SERVER",
        default_value = "http://127.0.0.1:7180"
    )]
    pub server: String,
    /// API token (default: read from the local data directory's admin.token)
    #[arg(long, global = true, env = "NOVACRON_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Data directory to find the local admin token in (and, for `serve`, to keep state in)
    #[arg(long, global = true, env = "NOVACRON_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Output format
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people
    Table,
    /// JSON for scripts
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a NovaCron host (API, store, reconciler) in the foreground
    Serve(ServeArgs),
    /// Create and manage virtual machines
    #[command(subcommand)]
    Vm(VmCommand),
    /// Import and manage disk images
    #[command(subcommand)]
    Image(ImageCommand),
    /// Show this host: capacity, accelerator, QEMU version, transfer fingerprint and address
    Host,
    /// Hosts trusted for image transfers, pinned by certificate fingerprint
    #[command(subcommand)]
    Peer(PeerCommand),
    /// Image transfers (push/pull) this host runs: list, show, cancel
    #[command(subcommand)]
    Transfer(TransferCommand),
    /// The region: init, join tokens, join, list hosts, remove a host
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Live migrations between hosts: list and show (start one with `vm migrate`)
    #[command(subcommand)]
    Migration(MigrationCommand),
    /// Follow VM state changes as they happen
    Events,
    /// Network links between hosts: measured rates, bandwidth forecasts, predictor evaluation
    #[command(subcommand)]
    Link(LinkCommand),
    /// Print a shell completion script (e.g. `novacron completions bash > /etc/bash_completion.d/novacron`)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// (Internal: started by `serve`.) Holds an out-of-band QMP connection to a migration's
    /// incoming QEMU, for a `serve` started later to resume its post-copy
    #[command(name = "qmp-hold", hide = true)]
    QmpHold {
        /// The monitor's socket
        #[arg(long)]
        socket: std::path::PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file (keys: data_dir, listen, host_name, stop_timeout_secs, qemu, qemu_img,
    /// transfer_listen, voter_loss_grace_secs, labels, shared_storages); flags and environment
    /// variables override it
    #[arg(long, env = "NOVACRON_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address the API listens on
    #[arg(long, env = "NOVACRON_LISTEN")]
    pub listen: Option<String>,
    /// This host's name (default: the system hostname)
    #[arg(long, env = "NOVACRON_HOST_NAME")]
    pub host_name: Option<String>,
    /// Path of qemu-system-x86_64 (default: search PATH)
    #[arg(long, env = "NOVACRON_QEMU")]
    pub qemu: Option<PathBuf>,
    /// Path of qemu-img (default: search PATH)
    #[arg(long, env = "NOVACRON_QEMU_IMG")]
    pub qemu_img: Option<PathBuf>,
    /// Address of the DWCP transfer listener that receives pushes and serves pulls (mTLS; only
    /// peers trusted with `novacron peer trust` get in), or `off`. Default 0.0.0.0:7181; if the
    /// default port is taken the listener is disabled with a warning
    #[arg(long, env = "NOVACRON_TRANSFER_LISTEN")]
    pub transfer_listen: Option<String>,
    /// In a region: seconds a voter may be silent before the leader replaces it with a healthy
    /// learner (default 60)
    #[arg(long, env = "NOVACRON_VOTER_LOSS_GRACE_SECS")]
    pub voter_loss_grace: Option<u64>,
    /// A label of this host, KEY=VALUE (repeat for more; replaces the config file's `labels`).
    /// VMs created with `--require-label KEY=VALUE` are placed only on hosts carrying it
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label_arg)]
    pub labels: Vec<(String, String)>,
    /// A shared storage this host mounts, NAME=PATH: a directory on a file system every host
    /// naming it mounts (NFS, CephFS...), at any path. VMs created with `--storage NAME` keep
    /// their disk there and run only on hosts that mount it; a live migration between two of
    /// them moves only memory. Repeat for more; replaces the config file's `shared_storages`
    #[arg(long = "shared-storage", value_name = "NAME=PATH", value_parser = parse_storage_arg)]
    pub shared_storages: Vec<(String, PathBuf)>,
    /// Serve the scratch keyspace, `/api/v1/scratch/KEY`: plain keys in the region's store,
    /// read and written like NovaCron's records (for checking the store from outside, as the
    /// linearizability test does, and for diagnostics). Off by default
    #[arg(long, env = "NOVACRON_SCRATCH_KEYS")]
    pub scratch_keys: bool,
    /// Log as JSON lines instead of text
    #[arg(long)]
    pub log_json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Make the host the first host of a region: creates the cluster CA and its certificate,
    /// starts its cluster (raft) listener. `serve` restarts itself (same pid); VMs keep running
    /// and its VMs and images become the region's
    Init {
        /// Region name
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        addresses: RaftAddressArgs,
    },
    /// Join tokens (one-time, expiring), created on any member of the region
    #[command(subcommand)]
    Token(TokenCommand),
    /// The region's placement policy: `policy show`, `policy set --strategy bin-pack ...`
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Make the host (a fresh one: no VMs, no images) join a region through the cluster
    /// listener of a member (the one that created the token). `serve` restarts itself with an empty store, becomes a
    /// learner and catches up; the leader makes it a voter when the region needs one (1, 3, 5)
    Join {
        /// Cluster listener of a member, HOST:PORT (printed by `token create` there)
        address: String,
        /// The join token printed by `novacron cluster token create` (`--token` is the API
        /// token of every command, hence the longer name)
        #[arg(long, env = "NOVACRON_JOIN_TOKEN", hide_env_values = true)]
        join_token: String,
        #[command(flatten)]
        addresses: RaftAddressArgs,
        /// Give up waiting for the host to become a member after this many seconds
        #[arg(long, default_value_t = 60)]
        wait_timeout: u64,
    },
    /// List the region's hosts: role, raft address, health (heartbeat), capacity
    #[command(visible_alias = "ls")]
    List,
    /// Remove a host from the region (refused while VMs are assigned to it, unless --force,
    /// which first moves them to other hosts)
    #[command(visible_alias = "rm")]
    Remove {
        /// Host name or node id
        host: String,
        /// Evacuate first: move each VM assigned to the host elsewhere (`vm migrate`, the
        /// scheduler picking the destination), then remove the host. Stops at the first VM
        /// that cannot move; the host then stays in the region
        #[arg(long, conflicts_with = "abandon_vms")]
        force: bool,
        /// Remove the host without moving its VMs (for a host that is gone for good): they stay
        /// assigned to the removed host until deleted
        #[arg(long)]
        abandon_vms: bool,
    },
}

#[derive(Debug, Args)]
pub struct RaftAddressArgs {
    /// Address the cluster (raft) listener binds [default: 0.0.0.0:7182]
    #[arg(long)]
    pub raft_listen: Option<String>,
    /// Address other hosts reach the cluster listener at (needed when --raft-listen binds every
    /// interface)
    #[arg(long)]
    pub advertise: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a one-time join token (printed once)
    Create {
        /// Lifetime, e.g. 30m, 1h, 2d (at most 7d)
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Show the placement policy every host of the region places VMs with
    Show,
    /// Change some of its settings (the others keep their values); VMs already placed stay
    Set(PolicySetArgs),
    /// Back to the defaults: spread, CPU overcommit 4, memory 1, hard anti-affinity
    Reset,
}

#[derive(Debug, Args)]
pub struct PolicySetArgs {
    /// Spread VMs over the emptiest hosts, or bin-pack them onto the fullest that fit
    #[arg(long, value_enum)]
    pub strategy: Option<StrategyArg>,
    /// Allocatable vCPUs per host CPU (4 lets four vCPUs share a CPU), in (0, 1000]
    #[arg(long, value_name = "RATIO")]
    pub cpu_overcommit: Option<f64>,
    /// Allocatable memory per byte of host memory, in (0, 1000]
    #[arg(long, value_name = "RATIO")]
    pub memory_overcommit: Option<f64>,
    /// hard: a host running a VM of the group is excluded; soft: it only scores lower
    #[arg(long, value_enum)]
    pub anti_affinity: Option<AntiAffinityArg>,
    /// Score lost per VM of the group on a host, with soft anti-affinity, in [0, 1000]
    #[arg(long, value_name = "WEIGHT")]
    pub anti_affinity_weight: Option<f64>,
    /// Score bonus of a host that already holds the VM's image, in [0, 1000]
    #[arg(long, value_name = "WEIGHT")]
    pub image_locality_weight: Option<f64>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StrategyArg {
    Spread,
    BinPack,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AntiAffinityArg {
    Hard,
    Soft,
}

#[derive(Debug, Subcommand)]
pub enum PeerCommand {
    /// Trust a host for image transfers, by the fingerprint `novacron host` prints on it. Both
    /// hosts must trust each other: run it on each side with the other's fingerprint
    Trust {
        /// sha256:<64 hex digits>
        fingerprint: String,
        /// A label for people
        #[arg(long)]
        name: Option<String>,
    },
    /// List trusted hosts
    #[command(visible_alias = "ls")]
    List,
    /// Stop trusting a host (by fingerprint or label); its new sessions are refused
    #[command(visible_alias = "rm")]
    Forget { peer: String },
}

#[derive(Debug, Subcommand)]
pub enum TransferCommand {
    /// List this host's transfers: running ones and the last 1000 finished (kept across restarts)
    #[command(visible_alias = "ls")]
    List,
    /// Show one transfer
    Show { id: String },
    /// Cancel a running transfer (nothing is left half-made at the destination)
    Cancel { id: String },
}

#[derive(Debug, Args)]
pub struct TransferArgs {
    /// The peer's fingerprint (`novacron host` on it); the connection is refused unless the peer
    /// presents exactly this certificate
    #[arg(long)]
    pub fingerprint: String,
    /// Name of the image where it arrives (default: the same name)
    #[arg(long)]
    pub name: Option<String>,
    /// Start the transfer and return at once, without a progress bar (follow it with
    /// `novacron transfer show ID`)
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a VM (and start it, unless --no-start)
    Create(Box<CreateArgs>),
    /// List VMs
    #[command(visible_alias = "ls")]
    List,
    /// Show one VM in detail
    Show { name: String },
    /// Start a stopped or failed VM
    Start(WaitArgs),
    /// Stop a VM: ACPI power-down, then force after --timeout
    Stop(StopArgs),
    /// Restart a VM (power-down and start again)
    Restart(WaitArgs),
    /// Pause a running VM's CPUs
    Pause(WaitArgs),
    /// Resume a paused VM
    Resume(WaitArgs),
    /// Delete a VM with its disk and logs (a running VM needs --force)
    #[command(visible_alias = "rm")]
    Delete(DeleteArgs),
    /// Print the VM's serial console output
    Logs(LogsArgs),
    /// Attach to the VM's serial console (detach with Ctrl-])
    Console { name: String },
    /// Move a VM to another host of the region, live: memory is carried by DWCP while the guest
    /// runs, then it pauses briefly and resumes on the destination. A stopped VM moves cold: at
    /// once without a disk, with its disk otherwise, and stays stopped. Ctrl-C ends only the
    /// command; `--cancel` stops the migration.
    Migrate(MigrateArgs),
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    pub name: String,
    /// Destination host (`novacron cluster list` shows them); without it placement chooses
    #[arg(long, conflicts_with = "cancel")]
    pub to: Option<String>,
    /// Cancel the VM's migration under way; the VM stays on its source host
    #[arg(long)]
    pub cancel: bool,
    /// Longest pause of the guest at switch-over, in milliseconds
    #[arg(long, value_name = "MS", default_value_t = novacron_types::migration::DEFAULT_DOWNTIME_LIMIT_MS)]
    pub downtime_limit: u64,
    /// Give up after this many seconds; the VM then stays on its source host
    #[arg(long, value_name = "SECONDS", default_value_t = novacron_types::migration::DEFAULT_MIGRATION_TIMEOUT_SECS)]
    pub timeout: u64,
    /// When the guest dirties memory faster than the link carries it: `throttle` slows its
    /// vCPUs (QEMU's auto-converge, starting at the throttle the plan needs), `keep-copying`
    /// never slows it and lets --timeout end a migration that cannot converge, `post-copy`
    /// runs the guest on the destination after the first full copy and fetches the rest on
    /// demand (short pause whatever the dirty rate; but if a host fails before the last page
    /// arrived, or the link stays down longer than --post-copy-link-wait, the guest's running
    /// state is lost and the VM fails on the destination as after a crash, restarting there by
    /// its --restart policy)
    #[arg(long, value_name = "POLICY", value_enum, default_value_t = ConvergeArg::Throttle)]
    pub when_not_converging: ConvergeArg,
    /// With post-copy: how long the VM waits for a lost link to its source to come back (the
    /// guest stalls meanwhile on pages it has not received) before it is given up
    #[arg(long, value_name = "SECONDS", default_value_t = novacron_types::migration::DEFAULT_POST_COPY_LINK_WAIT_SECS)]
    pub post_copy_link_wait: u64,
    /// Return once the migration is recorded instead of following it
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConvergeArg {
    Throttle,
    KeepCopying,
    PostCopy,
}

impl From<ConvergeArg> for novacron_types::migration::ConvergencePolicy {
    fn from(argument: ConvergeArg) -> Self {
        match argument {
            ConvergeArg::Throttle => Self::Throttle,
            ConvergeArg::KeepCopying => Self::KeepCopying,
            ConvergeArg::PostCopy => Self::PostCopy,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum MigrationCommand {
    /// Migrations of the region, newest first (finished ones included)
    #[command(visible_alias = "ls")]
    List,
    /// One migration in detail: by id, or the latest of a VM by the VM's name
    Show { migration: String },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// VM name: lowercase letters, digits and '-'
    pub name: String,
    /// Image (name or id) the VM's disk is backed by
    #[arg(long)]
    pub image: Option<String>,
    /// Virtual CPUs
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Memory, e.g. 512MiB or 2GiB
    #[arg(long, default_value = "512MiB")]
    pub memory: String,
    /// Disk size (default: the image's size), e.g. 10GiB
    #[arg(long)]
    pub disk: Option<String>,
    /// Kernel for a direct boot (a path on the host)
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initrd for a direct boot (a path on the host)
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line
    #[arg(long)]
    pub cmdline: Option<String>,
    /// What to do when QEMU exits on its own
    #[arg(long, value_enum, default_value_t = RestartPolicyArg::Never)]
    pub restart: RestartPolicyArg,
    /// Create the VM without starting it
    #[arg(long)]
    pub no_start: bool,
    /// Run the VM on this host of the region (default: in a region placement chooses, alone the
    /// host that serves the request). The host must still pass placement's filters
    #[arg(long)]
    pub host: Option<String>,
    /// Place the VM only on hosts carrying this label (`serve --label`), KEY=VALUE; repeat for
    /// more. Kept with the VM: `vm migrate` respects it too
    #[arg(long = "require-label", value_name = "KEY=VALUE", value_parser = parse_label_arg)]
    pub require_labels: Vec<(String, String)>,
    /// Anti-affinity group: no two VMs of the group run on one host (placement refuses a host
    /// that already runs one)
    #[arg(long, value_name = "GROUP")]
    pub anti_affinity: Option<String>,
    /// Keep the VM's disk on this shared storage (`serve --shared-storage NAME=PATH`) instead
    /// of its host's data directory: the VM is placed only on hosts that mount it, and
    /// `vm migrate` between them moves memory only (default: a local disk)
    #[arg(long, value_name = "NAME")]
    pub storage: Option<String>,
    #[command(flatten)]
    pub wait: WaitOptions,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RestartPolicyArg {
    Never,
    OnFailure,
    Always,
}

#[derive(Debug, Args)]
pub struct WaitOptions {
    /// Return at once instead of waiting for the VM to reach its new state
    #[arg(long)]
    pub no_wait: bool,
    /// Give up waiting after this many seconds
    #[arg(long, default_value_t = 120)]
    pub wait_timeout: u64,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    pub name: String,
    #[command(flatten)]
    pub wait: WaitOptions,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    pub name: String,
    /// End QEMU at once, without an ACPI power-down
    #[arg(long)]
    pub force: bool,
    /// Seconds to wait for the guest to power off before forcing
    #[arg(long)]
    pub timeout: Option<u64>,
    #[command(flatten)]
    pub wait: WaitOptions,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    pub name: String,
    /// Delete even if the VM is running (it is stopped at once)
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub wait: WaitOptions,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    pub name: String,
    /// Keep printing new output
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only the last N bytes
    #[arg(long)]
    pub tail_bytes: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Import a qcow2 or raw disk image file
    Import {
        /// The image file (on this machine; it is uploaded)
        file: PathBuf,
        /// Image name (default: the file name)
        #[arg(long)]
        name: Option<String>,
    },
    /// List images
    #[command(visible_alias = "ls")]
    List,
    /// Show one image
    Show { image: String },
    /// Delete an image (refused while a VM uses it)
    #[command(visible_alias = "rm")]
    Delete { image: String },
    /// Send an image to another host over DWCP (only chunks it lacks travel). Ctrl-C stops
    /// watching, not the transfer: `novacron transfer cancel ID` stops it
    Push {
        /// Local image (name or id)
        image: String,
        /// The peer's transfer address, HOST:PORT (its `serve --transfer-listen`, default port 7181)
        #[arg(long)]
        to: String,
        #[command(flatten)]
        transfer: TransferArgs,
    },
    /// Fetch an image from another host over DWCP (only chunks this host lacks travel). Ctrl-C
    /// stops watching, not the transfer: `novacron transfer cancel ID` stops it
    Pull {
        /// The image's name (or id) on the peer
        image: String,
        /// The peer's transfer address, HOST:PORT
        #[arg(long)]
        from: String,
        #[command(flatten)]
        transfer: TransferArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum LinkCommand {
    /// Links to peers this host has sent over: current rate, 1 s forecast with its 80 % band,
    /// the predictor in use and its accuracy so far (only sending measures a link)
    #[command(visible_alias = "ls")]
    List,
    /// One link with its forecasts for the next 1 s, 5 s and 30 s
    Show {
        /// The peer's fingerprint or its label (`novacron peer list`)
        peer: String,
    },
    /// Measure the link to a peer now: send it incompressible data for a few seconds (the peer
    /// discards it), then show the link. Migrations probe an unmeasured link by themselves.
    Probe {
        /// The peer's fingerprint, its label (`novacron peer list`) or a region host's name
        peer: String,
        /// How long to send, in seconds (at most 30)
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// The peer's transfer address (HOST:PORT); default: from the region or the last dial
        #[arg(long)]
        address: Option<String>,
    },
    /// Evaluate the bandwidth predictors on throughput trace files (mahimahi format: one line
    /// per 1500-byte delivery opportunity, in ms) and print accuracy (1 - WAPE) and band
    /// calibration per trace and horizon. Runs locally; needs no server.
    Eval {
        /// Trace files
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Learned model: the one shipped in this build, or retrained leaving each drive out
        #[arg(long, value_enum, default_value_t = LearnedModelArg::Shipped)]
        model: LearnedModelArg,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LearnedModelArg {
    /// The model shipped in this build (traces it was fitted on are marked in the table)
    Shipped,
    /// Retrain on the other drives for each drive tested
    LeaveOneDriveOut,
    /// Only the classic predictors
    Skip,
}

/// Parses a `NAME=PATH` shared storage argument.
pub fn parse_storage_arg(text: &str) -> Result<(String, PathBuf), String> {
    let Some((name, path)) = text.split_once('=') else {
        return Err(format!(
            "{text:?} is not NAME=PATH (for example nfs1=/mnt/novacron)"
        ));
    };
    novacron_types::validate_storage_name(name).map_err(|error| error.to_string())?;
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(format!(
            "the path of shared storage {name}, {}, must be absolute",
            path.display()
        ));
    }
    Ok((name.to_string(), path))
}

/// Parses a `KEY=VALUE` label argument.
pub fn parse_label_arg(text: &str) -> Result<(String, String), String> {
    novacron_types::parse_label(text).map_err(|error| error.to_string())
}
