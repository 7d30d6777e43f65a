//! Live migration between hosts of a region (issue 5): `vm migrate` writes a migration record;
//! the source host's reconciler actor for the VM runs [`run_source`]; the destination host answers
//! the source's transport session in [`serve_destination`].
//!
//! ```text
//! source agent                                    destination agent
//!  phase requested → preparing (CAS)
//!  dial the destination's transfer listener ────▶ Begin{id}: checks the record, starts QEMU
//!                                      ◀──────── Ready       with -incoming (paused), and the
//!                                                            digests of its kernel and initrd
//!                                                            (held_files); a memory-only move
//!                                                            is answered before its QEMU
//!                                                            starts, from this host's copy of
//!                                                            the store (checked again fresh)
//!  QEMU migrates into a unix socket here;
//!  the proxy re-encodes it (phase memory) ──bulk─▶ the identical stream rebuilt into QEMU
//!  STOP event (phase switch-over)
//!                                      ◀──────── Loaded{pid, checksum} (stream proved equal)
//!  one store transaction: VM host = destination,
//!  migration completed                   ──────▶ Commit: `cont`, RESUME time recorded
//!  source QEMU stopped, its directory removed
//! ```
//!
//! The commit transaction is the only point where the VM changes owner. Before it, any failure
//! (link cut, destination killed, cancel, timeout, a checksum mismatch) ends the migration as
//! failed or cancelled, the source QEMU keeps (or resumes) running and the destination removes its
//! QEMU. When the outcome of the commit write is unknown (the store did not answer), the source
//! keeps its guest paused and asks the store again until it knows: it never resumes a guest the
//! destination may also resume.

use crate::AgentError;
use crate::host::Shared;
use crate::records::{Records, Versioned};
use crate::transfer::TransferService;
use crate::transfer::protocol::{Message, MigrationControl};
use novacron_migration::{
    ConvergencePlanner, DeliveredPages, HeldFile, ImagePageIndex, Plan, PlanInputs, ProxyConfig,
    ProxyError, ProxyReport, SharedImagePages, receive_migration_stream_duplex,
    send_migration_stream_duplex,
};
use novacron_qemu::{MigrationSocketKeeper, QemuVm, RunState};
use novacron_transport::{
    ControlIncoming, Fingerprint, PeerTrust, Session, SessionOptions, TlsSettings,
};
use novacron_types::migration::{CodecTime, ConvergencePolicy, MemoryPipeline};
use novacron_types::{
    DesiredPower, ErrorCode, MigrateVmRequest, MigrationPhase, MigrationProgress, MigrationRecord,
    RECORD_FORMAT_VERSION, VmRecord, VmState, unix_now,
};
use serde_json::{Value, json};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod held_files;
mod postcopy;

use held_files::held_boot_files;
pub(crate) use held_files::{HeldFileKey, keep_boot_files_indexed};
pub(crate) use postcopy::{
    PostcopyRecovery, adopt_orphaned_postcopy, hand_over_recovery, postcopy_sourced_here,
    resume_postcopy_sourced_here,
};

/// A migration plans with the link's forecast only when the link was measured within this
/// long; otherwise (and for a link never measured) its copy starts without one and measures the
/// link itself: the plan follows from its first rate samples. No probe runs before a move: at
/// 1 Gbit/s, 50 ms, 0.5 % loss a probe long enough to get past TCP's start-up took 2.1 s beyond
/// the destination's preparation, more than the copy of a 512 MiB guest it planned, and the
/// decisions a plan makes (the switch-over's moment, a throttle, post-copy) come after the
/// first pass, which measures the link.
const LINK_MEASUREMENT_MAX_AGE: Duration = Duration::from_secs(600);
/// How long QEMU samples the guest's dirty pages before a move is planned.
const DIRTY_RATE_SAMPLE: Duration = Duration::from_millis(500);
/// Ceiling of the memory session's bulk send window. The proxy keeps the window near four
/// measured bandwidth-delay products (from 2 MiB up), larger only while it holds the link back
/// (`novacron_migration::proxy`): QEMU only sees how fast the proxy takes its stream, so
/// everything queued beyond the link is data the final pause waits for (a 32 MiB window made
/// the pause 3.2 s at 100 Mbit/s in the bench), while a window below what the path needs caps
/// the rate (2 MiB on 1 Gbit/s with 50 ms: 9.5 s instead of 3.0 s).
const SEND_WINDOW_CEILING_BYTES: u64 = 64 << 20;
/// QEMU's own cap, far above any link: the transport's backpressure paces QEMU, and QEMU applies
/// its cap before the proxy's compression.
const QEMU_MAX_BANDWIDTH: u64 = 64 << 30;
/// How long the source keeps dialling a destination that refuses or drops its handshake: a host
/// that just joined is trusted by the others' listeners once its heartbeat reached them (a few
/// heartbeat intervals).
const CONNECT_RETRY_WINDOW: Duration = Duration::from_secs(15);
/// How long the source's session waits for a lost connection to come back before the migration
/// fails (the guest keeps running on the source meanwhile; a longer wait only delays the end).
const SESSION_RESUME_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the destination looks at the migration record while it receives (to notice that the
/// source ended it, when the session alone would take the listener's resume timeout to fail).
const DESTINATION_WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// How often the source reads QEMU's progress and the record (cancel).
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// The most the switch to post-copy waits for the migration session to empty (see
/// `SendWindowControl`): about what its window holds at the link's rate.
const POSTCOPY_DRAIN_WAIT: Duration = Duration::from_secs(1);
/// How long the destination may take to load the stream after it ended.
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the destination waits for the commit after it loaded the stream, before asking the
/// store instead.
const COMMIT_WAIT: Duration = Duration::from_secs(30);

/// How a migration ended for the source's actor.
pub(crate) enum SourceOutcome {
    /// The destination owns and runs the VM: stop the QEMU here and remove its directory.
    Moved,
    /// The VM stays here (failed, cancelled, or nothing to do).
    Stayed,
}

fn migration_error(code: ErrorCode, message: impl Into<String>) -> AgentError {
    AgentError::Migration {
        code,
        message: message.into(),
    }
}

fn qmp_error(name: &str, source: novacron_qemu::QmpError) -> AgentError {
    AgentError::Qmp {
        name: name.to_string(),
        source,
    }
}

// ----- the request (any host's API) -----

/// Validates a migration request and records it; the source host's reconciler picks it up. A
/// stopped VM without a disk moves at once (its record changes host: nothing runs to copy). A
/// stopped VM with a local disk moves as a paused one does, from a QEMU its source starts
/// without ever running the guest (see [`moves_cold_with_disk`]), and stays stopped.
pub(crate) async fn request(
    shared: &Shared,
    name: &str,
    request: MigrateVmRequest,
) -> Result<MigrationRecord, AgentError> {
    let name = novacron_types::VmName::new(name)?;
    let Some(region) = &shared.region else {
        return Err(AgentError::InvalidArgument(
            "this host is not in a region: a VM moves between hosts of one region (`novacron \
             cluster init` on one host, `novacron cluster join` on the others)"
                .into(),
        ));
    };
    let downtime_limit_ms = request
        .downtime_limit_ms
        .unwrap_or(novacron_types::migration::DEFAULT_DOWNTIME_LIMIT_MS);
    let (low, high) = novacron_types::migration::DOWNTIME_LIMIT_RANGE_MS;
    if !(low..=high).contains(&downtime_limit_ms) {
        return Err(AgentError::InvalidArgument(format!(
            "--downtime-limit {downtime_limit_ms} ms is out of range: give {low} to {high} ms"
        )));
    }
    let timeout_secs = request
        .timeout_secs
        .unwrap_or(novacron_types::migration::DEFAULT_MIGRATION_TIMEOUT_SECS);
    if !(10..=86_400).contains(&timeout_secs) {
        return Err(AgentError::InvalidArgument(format!(
            "--timeout {timeout_secs} s is out of range: give 10 to 86400 seconds"
        )));
    }
    let post_copy_link_wait_secs = request
        .post_copy_link_wait_secs
        .unwrap_or(novacron_types::migration::DEFAULT_POST_COPY_LINK_WAIT_SECS);
    let (low, high) = novacron_types::migration::POST_COPY_LINK_WAIT_RANGE_SECS;
    if !(low..=high).contains(&post_copy_link_wait_secs) {
        return Err(AgentError::InvalidArgument(format!(
            "--post-copy-link-wait {post_copy_link_wait_secs} s is out of range: give {low} to \
             {high} seconds"
        )));
    }
    let Some(vm) = shared.records.vm(name.as_str()).await? else {
        return Err(AgentError::VmNotFound {
            name: name.to_string(),
        });
    };
    let record = &vm.record;
    if let Some(active) = &record.migration {
        return Err(migration_error(
            ErrorCode::Conflict,
            format!(
                "vm {name} is already being migrated (migration {active}); `novacron migration \
                 show {active}` follows it, `novacron vm migrate {name} --cancel` stops it"
            ),
        ));
    }
    if record.deletion_requested {
        return Err(AgentError::VmWrongState {
            name: name.to_string(),
            state: VmState::Deleting,
            hint: "it is being deleted",
        });
    }
    let source = record.status.host.clone();
    if request.to.as_deref() == Some(source.as_str()) {
        return Err(AgentError::InvalidArgument(format!(
            "vm {name} already runs on host {source}; name another host (`novacron cluster \
             list` shows them) or leave out --to to let placement choose"
        )));
    }
    let running = matches!(record.status.state, VmState::Running | VmState::Paused);
    let cold = moves_cold(record);
    if !running && !cold {
        return Err(AgentError::VmWrongState {
            name: name.to_string(),
            state: record.status.state,
            hint: "a VM moves when it runs (live) or is stopped (cold); wait until it is one or \
                   the other",
        });
    }
    let (destination, explanation) =
        crate::region::place_vm_elsewhere(shared, region, record, request.to.as_deref()).await?;
    let now = unix_now();
    let migration = MigrationRecord {
        format_version: RECORD_FORMAT_VERSION,
        id: new_id(),
        vm: name.to_string(),
        vm_uuid: record.uuid.clone(),
        source: source.clone(),
        destination: destination.clone(),
        placement: request.to.is_none().then_some(explanation),
        phase: MigrationPhase::Requested,
        downtime_limit_ms,
        timeout_secs,
        when_not_converging: request.when_not_converging.unwrap_or_default(),
        post_copy_link_wait_secs,
        cancel_requested: false,
        created_at: now,
        finished_at: None,
        message: None,
        error_code: None,
        progress: MigrationProgress {
            memory_bytes: record.spec.memory_bytes,
            ..MigrationProgress::default()
        },
        stream_checksum: None,
        stopped_at_ms: None,
        resumed_at_ms: None,
        total_seconds: None,
        memory_pipeline: None,
    };
    // Best effort and not the request's business: off its path (a list of every migration).
    let records = shared.records.clone();
    tokio::spawn(async move { forget_old_migrations(&records).await });
    if cold && !crate::storage::moves_disk(record) {
        return record_cold_move(shared, &vm, migration).await;
    }
    if !shared.records.begin_migration(&vm, &migration).await? {
        return Err(migration_error(
            ErrorCode::Conflict,
            format!("vm {name} changed while the migration was being recorded; try again"),
        ));
    }
    tracing::info!(vm = %name, migration = %migration.id, %source, %destination, "migration requested");
    Ok(migration)
}

/// Finished migrations kept in the store (`migration list` / `show`); older ones are forgotten
/// when a migration is requested, so the replicated store and every listing of it (as at each
/// `serve` start) stay bounded.
pub(crate) const MIGRATION_HISTORY: usize = 1000;

/// The finished migrations beyond the newest [`MIGRATION_HISTORY`] (by when they finished).
fn beyond_history(migrations: &[MigrationRecord]) -> Vec<String> {
    let mut finished: Vec<&MigrationRecord> = migrations
        .iter()
        .filter(|migration| migration.phase.is_finished())
        .collect();
    finished.sort_by(|a, b| {
        let when =
            |migration: &MigrationRecord| migration.finished_at.unwrap_or(migration.created_at);
        when(b).cmp(&when(a)).then(b.id.cmp(&a.id))
    });
    finished
        .iter()
        .skip(MIGRATION_HISTORY)
        .map(|migration| migration.id.clone())
        .collect()
}

/// Best effort: a history that could not be trimmed now is trimmed at the next migration.
async fn forget_old_migrations(records: &Records) {
    let forgotten = match records.migrations().await {
        // A few hundred at a time: one store transaction each (a history grown before the
        // limit shrinks over the next migrations).
        Ok(migrations) => beyond_history(&migrations)
            .into_iter()
            .take(256)
            .collect::<Vec<_>>(),
        Err(error) => {
            tracing::debug!(%error, "migration history not trimmed");
            return;
        }
    };
    if forgotten.is_empty() {
        return;
    }
    match records.delete_finished_migrations(&forgotten).await {
        Ok(()) => tracing::info!(
            forgotten = forgotten.len(),
            kept = MIGRATION_HISTORY,
            "oldest finished migrations forgotten"
        ),
        Err(error) => tracing::debug!(%error, "migration history not trimmed"),
    }
}

/// Whether `record` moves cold (stopped and meant to stay so).
fn moves_cold(record: &VmRecord) -> bool {
    matches!(record.status.state, VmState::Stopped | VmState::Failed)
        && record.desired == DesiredPower::Stopped
}

/// Whether a cold move of `record` carries its local disk. Its source starts a QEMU for it that
/// never runs the guest (`-S`) and migrates that, disk and all, exactly as a paused VM moves;
/// the destination then quits its QEMU and the VM stays stopped there.
pub(crate) fn moves_cold_with_disk(record: &VmRecord) -> bool {
    moves_cold(record) && crate::storage::moves_disk(record)
}

/// A stopped VM without a disk of its host's own (none, or one on shared storage): its record
/// changes host and the completed migration is recorded in the same transaction, so no host
/// ever sees the VM marked as migrating.
async fn record_cold_move(
    shared: &Shared,
    vm: &Versioned<VmRecord>,
    mut migration: MigrationRecord,
) -> Result<MigrationRecord, AgentError> {
    let now = unix_now();
    migration.phase = MigrationPhase::Completed;
    migration.finished_at = Some(now);
    migration.total_seconds = Some(0.0);
    migration.message = Some(match &vm.record.spec.storage {
        Some(storage) => format!(
            "cold move: the VM was stopped and its disk is on shared storage {storage}, so only \
             its record moved; it starts on the new host"
        ),
        None => "cold move: the VM was stopped, so only its record moved; it starts on the new \
                 host"
            .into(),
    });
    let mut moved = vm.record.clone();
    moved.migration = None;
    moved.status.host = migration.destination.clone();
    moved.status.since = now;
    if !shared
        .records
        .record_new_migration(vm, &moved, &migration)
        .await?
    {
        return Err(migration_error(
            ErrorCode::Conflict,
            format!(
                "vm {} changed while the migration was being recorded; try again",
                migration.vm
            ),
        ));
    }
    tracing::info!(vm = %migration.vm, migration = %migration.id, source = %migration.source,
        destination = %migration.destination, "vm moved cold");
    Ok(migration)
}

/// `vm migrate NAME --cancel`: asks the source to abort. A migration the source has not picked
/// up yet ends at once.
pub(crate) async fn cancel(shared: &Shared, name: &str) -> Result<MigrationRecord, AgentError> {
    let name = novacron_types::VmName::new(name)?;
    let Some(vm) = shared.records.vm(name.as_str()).await? else {
        return Err(AgentError::VmNotFound {
            name: name.to_string(),
        });
    };
    let Some(id) = vm.record.migration.clone() else {
        return Err(migration_error(
            ErrorCode::Conflict,
            format!(
                "vm {name} is not being migrated; `novacron migration list` shows past migrations"
            ),
        ));
    };
    let ended = shared
        .records
        .update_vm_and_migration(name.as_str(), &id, |vm, record| {
            if record.phase != MigrationPhase::Requested {
                return Ok(false);
            }
            vm.migration = None;
            finish(
                record,
                MigrationPhase::Cancelled,
                None,
                "cancelled before it started",
            );
            Ok(true)
        })
        .await?;
    if let Some((_, record)) = ended {
        return Ok(record);
    }
    shared
        .records
        .update_migration(&id, |record| {
            if record.phase.is_finished() || record.cancel_requested {
                return Ok(false);
            }
            record.cancel_requested = true;
            Ok(true)
        })
        .await
}

/// Every migration, newest first.
pub(crate) async fn list(shared: &Shared) -> Result<Vec<MigrationRecord>, AgentError> {
    let mut migrations = shared.records.migrations().await?;
    migrations.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
    Ok(migrations)
}

/// One migration by id, or the latest of a VM by the VM's name.
pub(crate) async fn get(shared: &Shared, reference: &str) -> Result<MigrationRecord, AgentError> {
    if let Some(found) = shared.records.migration(reference).await? {
        return Ok(found.record);
    }
    list(shared)
        .await?
        .into_iter()
        .find(|migration| migration.vm == reference)
        .ok_or_else(|| AgentError::MigrationNotFound {
            reference: reference.to_string(),
        })
}

fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

fn finish(
    record: &mut MigrationRecord,
    phase: MigrationPhase,
    code: Option<ErrorCode>,
    message: &str,
) {
    record.phase = phase;
    record.finished_at = Some(unix_now());
    record.message = Some(message.to_string());
    record.error_code = code;
}

// ----- the source -----

/// Drives the migration `id` of `record` (on its source host). Never returns an error: whatever
/// fails is written into the migration record, and the VM stays here.
pub(crate) async fn run_source(
    shared: &Arc<Shared>,
    record: &VmRecord,
    id: &str,
    qemu: Option<&QemuVm>,
) -> SourceOutcome {
    let name = record.spec.name.as_str();
    let migration = match shared.records.migration(id).await {
        Ok(Some(migration)) => migration,
        Ok(None) => {
            tracing::warn!(vm = %name, migration = %id, "the vm names a migration that does not exist; clearing it");
            clear_vm_migration(shared, name, id).await;
            return SourceOutcome::Stayed;
        }
        Err(error) => {
            tracing::warn!(vm = %name, %error, "cannot read the migration; will retry");
            tokio::time::sleep(Duration::from_secs(1)).await;
            return SourceOutcome::Stayed;
        }
    };
    if migration.record.phase.is_finished() {
        clear_vm_migration(shared, name, id).await;
        return SourceOutcome::Stayed;
    }
    let Some(qemu) = qemu else {
        end_source(
            shared,
            name,
            id,
            MigrationPhase::Failed,
            Some(ErrorCode::Conflict),
            "the VM was not running on the source when the migration began; nothing moved",
        )
        .await;
        return SourceOutcome::Stayed;
    };
    if migration.record.phase != MigrationPhase::Requested {
        // A previous `serve` on this host was driving it and ended: QEMU's own migration died
        // with the socket, and the destination never got the commit.
        cancel_qemu_migration(qemu).await;
        end_source(
            shared,
            name,
            id,
            MigrationPhase::Failed,
            Some(ErrorCode::Unavailable),
            "the source host's novacron serve restarted during the migration; the VM stayed on \
             the source",
        )
        .await;
        resume_source(qemu, record).await;
        return SourceOutcome::Stayed;
    }
    let mut source = Source {
        shared: shared.clone(),
        name: name.to_string(),
        id: id.to_string(),
        migration: migration.record.clone(),
        record: record.clone(),
        qemu,
        started: Instant::now(),
        last_progress_write: None,
        disk: None,
        planner: ConvergencePlanner::new(),
        initial_dirty_rate: 0.0,
        delivered: Arc::new(DeliveredPages::at_source()),
        postcopy_asked: false,
    };
    match source.run().await {
        Ok(SourceOutcome::Moved) => SourceOutcome::Moved,
        Ok(SourceOutcome::Stayed) => {
            resume_source(qemu, record).await;
            SourceOutcome::Stayed
        }
        Err(failure) => {
            cancel_qemu_migration(qemu).await;
            let (phase, code) = if failure.cancelled {
                (MigrationPhase::Cancelled, None)
            } else {
                (MigrationPhase::Failed, Some(failure.code))
            };
            tracing::warn!(vm = %name, migration = %id, reason = %failure.message, "migration ended; the vm stays on the source");
            // The guest runs again before the store hears of it: without a commit the VM is
            // this one, and a store that does not answer (this host cut off) must not keep it
            // paused.
            resume_source(qemu, record).await;
            end_source(shared, name, id, phase, code, &failure.message).await;
            SourceOutcome::Stayed
        }
    }
}

/// Why a migration stopped before the commit.
struct Failure {
    code: ErrorCode,
    message: String,
    cancelled: bool,
    /// QEMU itself ended the migration (`failed`, `cancelled`): trying again cannot help.
    qemu_ended: bool,
}

impl Failure {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            cancelled: false,
            qemu_ended: false,
        }
    }

    fn qemu_ended(message: impl Into<String>) -> Self {
        Self {
            qemu_ended: true,
            ..Self::new(ErrorCode::Internal, message)
        }
    }

    fn cancelled(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::Conflict,
            message: message.into(),
            cancelled: true,
            qemu_ended: false,
        }
    }
}

impl From<AgentError> for Failure {
    fn from(error: AgentError) -> Self {
        Failure::new(error.code(), error.to_string())
    }
}

/// Cancels QEMU's outgoing migration and waits (up to [`CANCEL_SETTLE`]) until QEMU says it
/// ended, so a `cont` that follows does not meet a migration still cancelling.
async fn cancel_qemu_migration(qemu: &QemuVm) {
    match qemu.qmp().cancel_migration(CANCEL_SETTLE).await {
        Ok(status) if !novacron_qemu::qmp::cancel_settled(&status) => {
            tracing::warn!(%status, "qemu's migration had not ended {} s after its cancel", CANCEL_SETTLE.as_secs());
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "qemu's migration could not be cancelled"),
    }
}

/// How long the failure path waits for QEMU to end a cancelled migration.
const CANCEL_SETTLE: Duration = Duration::from_secs(10);

/// After a failed migration the source guest runs again (QEMU resumes it after most failures
/// itself; after a completed QEMU migration whose commit was refused it waits in `postmigrate`).
async fn resume_source(qemu: &QemuVm, record: &VmRecord) {
    if record.desired != DesiredPower::Running {
        return;
    }
    if let Ok(status) = qemu.qmp().query_status().await
        && !status.running
        && let Err(error) = qemu.qmp().cont().await
    {
        tracing::warn!(vm = %record.spec.name, %error, "the source guest could not be resumed");
    }
}

async fn clear_vm_migration(shared: &Shared, name: &str, id: &str) {
    let _ = shared
        .records
        .update_vm(name, |vm| {
            if vm.migration.as_deref() != Some(id) {
                return Ok(false);
            }
            vm.migration = None;
            Ok(true)
        })
        .await;
}

/// Ends a migration that did not move the VM: the record says why and the VM is free again.
async fn end_source(
    shared: &Shared,
    name: &str,
    id: &str,
    phase: MigrationPhase,
    code: Option<ErrorCode>,
    message: &str,
) {
    for _ in 0..30 {
        let result = shared
            .records
            .update_vm_and_migration(name, id, |vm, record| {
                if vm.migration.as_deref() == Some(id) {
                    vm.migration = None;
                }
                if !record.phase.is_finished() {
                    finish(record, phase, code, message);
                }
                Ok(true)
            })
            .await;
        match result {
            Ok(_) => return,
            Err(AgentError::VmNotFound { .. } | AgentError::MigrationNotFound { .. }) => {
                clear_vm_migration(shared, name, id).await;
                return;
            }
            Err(error) => {
                tracing::warn!(vm = %name, %error, "cannot record the end of the migration; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

struct Source<'a> {
    shared: Arc<Shared>,
    name: String,
    id: String,
    migration: MigrationRecord,
    record: VmRecord,
    qemu: &'a QemuVm,
    started: Instant,
    last_progress_write: Option<Instant>,
    /// The disk mirror, while it runs.
    disk: Option<DiskMirror>,
    planner: ConvergencePlanner,
    /// The guest's dirty rate (bytes/s) QEMU measured before the move; QEMU's own figure
    /// replaces it after the first pass.
    initial_dirty_rate: f64,
    /// Blocks the disk mirror delivered, which the memory session then sends as hashes.
    delivered: Arc<DeliveredPages>,
    /// QEMU was told to switch to post-copy: precopy's convergence is not planned any more
    /// (QEMU may still say `active` for a moment, and a new plan would hide the switch).
    postcopy_asked: bool,
}

/// How to open another session to the destination.
struct Dial {
    address: std::net::SocketAddr,
    tls: TlsSettings,
    options: SessionOptions,
}

impl Source<'_> {
    async fn run(&mut self) -> Result<SourceOutcome, Failure> {
        self.set_phase(MigrationPhase::Requested, MigrationPhase::Preparing)
            .await?;
        let service = self.shared.transfer_service().ok_or_else(|| {
            Failure::new(
                ErrorCode::Unavailable,
                "this host has no transfer listener, so it cannot migrate (start serve with \
                 --transfer-listen)",
            )
        })?;
        let (address, fingerprint) = destination_endpoint(&self.shared, &self.migration).await?;
        // The guest's dirty rate (QEMU samples it for half a second) is measured while the
        // session opens and the destination prepares, not after. With a disk to mirror first,
        // it is measured after the mirror, closer to the memory phase it plans.
        let qemu = self.qemu;
        let measure_now = !crate::storage::moves_disk(&self.record);
        let dirty_rate = futures::future::maybe_done(async move {
            if measure_now {
                Some(measure_dirty_rate(qemu).await)
            } else {
                None
            }
        });
        let mut dirty_rate = std::pin::pin!(dirty_rate);
        let prepared = async {
            self.copy_base_image(&service, &address, fingerprint)
                .await?;
            // The `Begin` follows the session's hello at once.
            let begin = Message::Migration(MigrationControl::Begin {
                id: self.id.clone(),
            })
            .encode();
            connect_to_destination(
                &service,
                &self.migration,
                &address,
                fingerprint,
                SESSION_RESUME_TIMEOUT,
                Instant::now() + CONNECT_RETRY_WINDOW,
                |session| {
                    let control = session.control();
                    let begin = begin.clone();
                    tokio::spawn(async move {
                        tokio::time::timeout(ANSWER_TIMEOUT, control.request(begin)).await
                    })
                },
            )
            .await
        };
        let (session, dial, begun) = alongside(prepared, dirty_rate.as_mut()).await?;
        let result = self
            .with_session(&session, &dial, begun, dirty_rate.as_mut())
            .await;
        if let Some(disk) = self.disk.take() {
            disk.clean_up(self.qemu, &self.name).await;
        }
        if let Err(failure) = &result {
            let abort = Message::Migration(MigrationControl::Abort {
                message: failure.message.clone(),
            });
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                session.control().notify(abort.encode()),
            )
            .await;
        }
        crate::transfer::close_quietly(session).await;
        result
    }

    /// A VM with a local disk moves onto its base image at the destination: when the
    /// destination's heartbeat does not list the image, this host (which runs the VM on it)
    /// pushes it there first over DWCP, as `novacron image push` would, and the migration's
    /// message says so meanwhile. A cancel or the migration's timeout ends the copy.
    /// Shows `message` in the migration's record (`migration show`) while it is not finished.
    async fn say(&self, message: &str) {
        say_in_record(&self.shared, &self.id, message).await;
    }

    async fn copy_base_image(
        &mut self,
        service: &Arc<TransferService>,
        address: &str,
        fingerprint: novacron_transport::Fingerprint,
    ) -> Result<(), Failure> {
        use novacron_types::{CreateTransferRequest, TransferDirection, TransferState};
        let Some(image_id) = self.record.spec.image_id.clone() else {
            return Ok(());
        };
        if self.record.spec.storage.is_some() {
            // The base image is on the shared storage both hosts mount.
            return Ok(());
        }
        let destination = self.migration.destination.clone();
        let held = self
            .shared
            .records
            .heartbeats()
            .await
            .ok()
            .and_then(|beats| beats.into_iter().find(|beat| beat.host == destination))
            .is_some_and(|beat| beat.images.contains(&image_id));
        if held {
            return Ok(());
        }
        let image = self
            .shared
            .records
            .image(&image_id)
            .await
            .ok()
            .flatten()
            .map(|image| image.name.to_string())
            .unwrap_or_else(|| image_id.clone());
        tracing::info!(vm = %self.name, %destination, %image, "copying the base image to the destination first");
        let copying = format!("copying base image {image} to host {destination}");
        self.say(&copying).await;
        let failed = |detail: String| {
            Failure::new(
                ErrorCode::Unavailable,
                format!(
                    "copying base image {image} to host {destination} failed: {detail}; the VM \
                     stayed on the source"
                ),
            )
        };
        // Ends the copy on a cancel or at the migration's timeout, with the failure to report.
        let deadline = Instant::now() + Duration::from_secs(self.migration.timeout_secs);
        let (shared, id, timeout_secs) = (&self.shared, &self.id, self.migration.timeout_secs);
        let stop = async {
            loop {
                tokio::time::sleep(POLL_INTERVAL).await;
                let cancelled = shared
                    .records
                    .migration(id)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|migration| migration.record.cancel_requested);
                if cancelled {
                    return Failure::cancelled(
                        "cancelled (`vm migrate --cancel`) while copying the base image; the VM \
                         stayed on the source",
                    );
                }
                if Instant::now() > deadline {
                    return Failure::cancelled(format!(
                        "timed out after {timeout_secs} s (--timeout) while copying the base \
                         image; the VM stayed on the source"
                    ));
                }
            }
        };
        let request = CreateTransferRequest {
            direction: TransferDirection::Push,
            image: image_id,
            address: address.to_string(),
            fingerprint: fingerprint.to_string(),
            name: None,
        };
        let info = match service.run_to_end(request, stop).await {
            Ok(info) => info,
            Err(crate::transfer::TransferEnd::NotStarted(error)) => return Err(failed(error)),
            Err(crate::transfer::TransferEnd::Stopped(failure)) => return Err(failure),
        };
        if info.state != TransferState::Succeeded {
            return Err(failed(
                info.message.unwrap_or_else(|| format!("{:?}", info.state)),
            ));
        }
        tracing::info!(vm = %self.name, %destination, %image, wire_bytes = info.wire_bytes, "base image copied");
        Ok(())
    }

    /// `begun` is the destination's answer to the `Begin` sent with the session; `dirty_rate`
    /// is the guest's dirty rate being measured since the move began (`None` when it is to be
    /// measured after the disk mirror).
    async fn with_session<F: Future<Output = Option<f64>>>(
        &mut self,
        session: &Arc<Session>,
        dial: &Dial,
        begun: PendingAnswer,
        mut dirty_rate: std::pin::Pin<&mut futures::future::MaybeDone<F>>,
    ) -> Result<SourceOutcome, Failure> {
        let control = session.control();
        let destination = self.migration.destination.clone();
        let answer = async {
            let reply = begun.await.map_err(|error| {
                Failure::new(
                    ErrorCode::Internal,
                    format!("asking host {destination}: {error}"),
                )
            })?;
            destination_answer(reply, "migration", &destination)
        };
        // While the destination prepares (its QEMU starts), the boot files are indexed, the
        // dirty rate is measured and, when memory comes next, the session's connections warm
        // up on padding (a disk mirror first would share the link with it).
        if !crate::storage::moves_disk(&self.record) {
            session.warm_up(SESSION_WARM_UP_LIMIT);
        }
        // The copy does not wait for the end of the dirty-rate sample: QEMU's downtime limit
        // does not depend on it, and the plan takes it in when it ends (below).
        let (held_there, held_here) = alongside(
            async { tokio::join!(answer, held_boot_files(&self.shared, &self.record),) },
            dirty_rate.as_mut(),
        )
        .await;
        let held_there = held_there?;
        tracing::debug!(vm = %self.name, after_ms = self.started.elapsed().as_millis() as u64, "the destination answered");
        let held: Vec<&Arc<ImagePageIndex>> = held_here
            .iter()
            .flat_map(|file| file.parts())
            .filter(|(identity, _)| held_there.iter().any(|there| there == identity))
            .map(|(_, index)| index)
            .collect();
        if held.len() < held_here.iter().flat_map(|file| file.identities()).count() {
            tracing::info!(vm = %self.name, "the destination's kernel or initrd differs from this host's (or did not unpack there); pages equal to their blocks are sent in full");
        }

        let memory_from = if crate::storage::moves_disk(&self.record) {
            self.mirror_disk(dial).await?;
            MigrationPhase::Disk
        } else {
            if let Some(storage) = &self.record.spec.storage {
                self.say(&format!(
                    "the disk is on shared storage {storage}, which host {} mounts too: no disk \
                     phase, memory only",
                    self.migration.destination
                ))
                .await;
            }
            MigrationPhase::Preparing
        };

        let qmp = self.qemu.qmp();
        // The adaptive send window starts from the link's forecast when this host measured the
        // link recently (see `LINK_MEASUREMENT_MAX_AGE`).
        let forecast = self.shared.transfer_service().and_then(|service| {
            service.links.recent_forecast(
                session.peer_fingerprint(),
                novacron_bandwidth::ForecastHorizon::FiveSeconds,
                LINK_MEASUREMENT_MAX_AGE,
                unix_now(),
            )
        });
        let mut config = ProxyConfig {
            image_pages: self.base_image_pages().await.with_files(held),
            ..ProxyConfig::default()
        };
        let forecast_rate = forecast
            .filter(|forecast| forecast.expected_bits_per_sec > 0.0)
            .map(|forecast| forecast.expected_bits_per_sec / 8.0);
        if let Some(rate) = forecast_rate {
            config.initial_rate_bytes_per_second = rate;
            config.initial_rate_is_measured = true;
            config.pacing_basis_bytes_per_second =
                self.shared.transfer_service().and_then(|service| {
                    service.links.recent_peak(
                        session.peer_fingerprint(),
                        LINK_MEASUREMENT_MAX_AGE,
                        unix_now(),
                    )
                });
        }
        // The plan before the move: the guest's dirty rate measured by QEMU (half a
        // second's sample, 0 until it ends when the destination was ready first), the link's
        // forecast, no compression assumed.
        let mut sampling = false;
        self.initial_dirty_rate = match dirty_rate.as_mut().take_output() {
            Some(Some(rate)) => rate,
            // Measured after the disk's mirror.
            Some(None) => measure_dirty_rate(self.qemu).await,
            None => {
                sampling = true;
                0.0
            }
        };
        let round_trip = session.stats().round_trip_estimate.unwrap_or_default();
        let plan_inputs = PlanInputs {
            remaining_bytes: self.record.spec.memory_bytes,
            dirty_bytes_per_second: self.initial_dirty_rate,
            wire_bytes_per_second: forecast_rate.unwrap_or(0.0),
            encoding_ratio: 1.0,
            in_flight_wire_bytes: novacron_migration::expected_send_window(
                &config,
                forecast_rate.unwrap_or(config.initial_rate_bytes_per_second),
                round_trip,
            ),
            round_trip,
            downtime_limit: Duration::from_millis(self.migration.downtime_limit_ms),
        };
        let (plan, _) = self.planner.update(&plan_inputs);
        self.note_plan(&plan, self.initial_dirty_rate, forecast_rate.is_some());
        let throttle = self.migration.when_not_converging == ConvergencePolicy::Throttle;
        let postcopy = self.migration.when_not_converging == ConvergencePolicy::PostCopy;
        qmp.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [
                { "capability": "auto-converge", "state": throttle },
                // The destination enabled it too (it reads the policy from the record).
                { "capability": "postcopy-ram", "state": postcopy },
                { "capability": "events", "state": true },
                // With a disk: stop after the guest paused, before the last device state, so
                // the mirror finishes first (`pre-switchover`, then `migrate-continue`).
                { "capability": "pause-before-switchover", "state": self.disk.is_some() },
            ]})),
        )
        .await
        .map_err(|error| Failure::from(qmp_error(&self.name, error)))?;
        let mut parameters = json!({
            "downtime-limit": plan.qemu_downtime_limit_ms,
            "max-bandwidth": QEMU_MAX_BANDWIDTH,
        });
        if throttle && plan.throttle_percent > 0 {
            // Start auto-converge at the throttle the plan says is needed rather than
            // QEMU's 20 % and several passes of stepping up.
            parameters["cpu-throttle-initial"] = json!(plan.throttle_percent.clamp(20, 99));
        }
        qmp.execute("migrate-set-parameters", Some(parameters))
            .await
            .map_err(|error| Failure::from(qmp_error(&self.name, error)))?;
        let mut events = self.qemu.subscribe_events();
        let stream = migrate_into_socket(&self.shared, self.qemu, &self.record, false).await?;
        let memory_started = Instant::now();
        tracing::debug!(vm = %self.name, after_ms = self.started.elapsed().as_millis() as u64, "qemu migrates into the proxy");
        // With auto-converge, a proxy that fails (or is dropped) must not close QEMU's socket
        // under it (see `MigrationSocketKeeper`): the keeper, dropped with the sender, drains
        // the socket until the cancel ends QEMU's migration.
        let (stream, keeper) = if throttle {
            let (stream, keeper) = MigrationSocketKeeper::keep(stream).map_err(|error| {
                Failure::new(ErrorCode::Internal, format!("migration socket: {error}"))
            })?;
            (stream, Some(keeper))
        } else {
            (stream, None)
        };

        let sender_session = session.clone();
        let window_control = config.window_control.clone();
        let mut sender = tokio::spawn(async move {
            let _keeper = keeper;
            send_migration_stream_duplex(stream, &sender_session, &config).await
        });
        // Recorded while the first bytes flow: the store's round trip (across the region's
        // link when its leader is there) is not worth holding QEMU's stream for. A cancel or a
        // conflict found here stops the copy as one found later would.
        if let Err(failure) = self.set_phase(memory_from, MigrationPhase::Memory).await {
            sender.abort();
            return Err(failure);
        }
        let mut sent = None;
        let mut qemu_done = false;
        let mut stopped_at_ms = None;
        let mut switch_over_recorded: Option<tokio::task::JoinHandle<()>> = None;
        let mut loaded: Option<(Option<u32>, String, Option<CodecTime>)> = None;
        let deadline = self.started + Duration::from_secs(self.migration.timeout_secs.max(10));
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Post-copy: asked QEMU to switch; then the destination owns the VM (committed).
        let mut postcopy_switched = false;
        let mut postcopy_committed_at: Option<Instant> = None;
        let mut postcopy_link = PostcopyLinkWatch::new(
            &self.migration.destination,
            Duration::from_secs(self.migration.post_copy_link_wait_secs),
        );
        let copied = async {
        loop {
            if qemu_done && sent.is_some() && loaded.is_some() {
                break;
            }
            if postcopy_switched
                && postcopy_committed_at.is_none()
                && let Some((pid, _, _)) = &loaded
            {
                // The destination holds the device state and waits paused: from here on it is
                // the VM (the source's guest can no longer run: its newest pages may be there).
                if let Some(recorded) = switch_over_recorded.take() {
                    let _ = recorded.await;
                }
                self.commit_postcopy(*pid).await?;
                postcopy_committed_at = Some(Instant::now());
                session.set_resume_timeout(postcopy_link.wait);
                let commit = Message::Migration(MigrationControl::Commit);
                if let Err(error) = control.notify(commit.encode()).await {
                    tracing::warn!(vm = %self.name, %error, "the commit notice did not reach the destination; it reads the store");
                }
            }
            tokio::select! {
                result = &mut sender, if sent.is_none() => match sender_outcome(result) {
                    Ok(report) => sent = Some(report),
                    Err(failure) => {
                        return Err(destination_reason(&control, &self.migration.destination, failure).await);
                    }
                },
                () = dirty_rate.as_mut(), if sampling => {
                    sampling = false;
                    if let Some(Some(rate)) = dirty_rate.as_mut().take_output() {
                        self.planned_with_dirty_rate(rate, plan_inputs, throttle, forecast_rate.is_some()).await;
                    }
                }
                event = events.recv() => {
                    if let Ok(event) = &event
                        && event.event == "MIGRATION"
                    {
                        // QEMU's own word on its status, at once: the loop ends when the
                        // stream is sent, loaded and QEMU completed, and a status seen only
                        // at the next poll kept the guest paused up to a poll interval.
                        match event.data["status"].as_str() {
                            Some("completed") => qemu_done = true,
                            Some("failed" | "cancelled" | "pre-switchover" | "postcopy-paused") => {
                                poll.reset_immediately();
                            }
                            _ => {}
                        }
                    }
                    if let Ok(event) = event
                        && event.event == "STOP"
                        && stopped_at_ms.is_none()
                    {
                        let at = event_unix_ms(&event);
                        stopped_at_ms = Some(at);
                        // Recorded while the destination loads, not in the way of its
                        // notice (the commit waits for this write, and records the moment
                        // too).
                        let (shared, id) = (self.shared.clone(), self.id.clone());
                        switch_over_recorded = Some(tokio::spawn(async move {
                            let _ = shared.records.update_migration(&id, |record| {
                                let mut changed = false;
                                if record.phase == MigrationPhase::Memory {
                                    record.phase = MigrationPhase::SwitchOver;
                                    changed = true;
                                }
                                if !record.phase.is_finished() && record.stopped_at_ms.is_none() {
                                    record.stopped_at_ms = Some(at);
                                    changed = true;
                                }
                                Ok(changed)
                            }).await;
                        }));
                    }
                }
                incoming = control.next_incoming(), if loaded.is_none() => {
                    match incoming {
                        Ok(Some(ControlIncoming::Notification(body))) => match Message::decode(&body) {
                            Ok(Message::Migration(MigrationControl::Loaded { pid, stream_checksum, codec })) => {
                                loaded = Some((pid, stream_checksum, codec));
                            }
                            Ok(Message::Migration(MigrationControl::Refused { code, message })) => {
                                return Err(Failure::new(code, format!(
                                    "host {} gave up: {message}", self.migration.destination)));
                            }
                            _ => {}
                        },
                        Ok(Some(ControlIncoming::Request(_))) => {}
                        Ok(None) => return Err(Failure::new(ErrorCode::Unavailable, "the destination closed the session")),
                        Err(error) => return Err(session_failure("the migration session", &error)),
                    }
                }
                _ = poll.tick() => {
                    if postcopy_committed_at.is_some()
                        && let Some(message) = postcopy_link.check(session)
                    {
                        // Said in the log first: this host may be the one cut off from the store.
                        tracing::warn!(vm = %self.name, migration = %self.id, "{message}");
                        let _ = tokio::time::timeout(Duration::from_secs(2), self.say(&message)).await;
                    }
                    let status = self.poll_progress(session, &sent).await?;
                    if postcopy && !postcopy_switched && status == "active" && self.postcopy_due() {
                        // The guest stops at the switch and its device state crosses behind
                        // whatever the session holds: empty it first.
                        if !window_control.drain(POSTCOPY_DRAIN_WAIT).await {
                            tracing::debug!(vm = %self.name, migration = %self.id, "the send window did not drain before the switch to post-copy");
                        }
                        let switched = self.qemu.qmp().execute("migrate-start-postcopy", None).await;
                        window_control.release();
                        if let Err(error) = switched {
                            // QEMU may have gone on to complete the precopy meanwhile.
                            let status = self.qemu.qmp().query_migrate().await.ok()
                                .and_then(|info| info["status"].as_str().map(str::to_string));
                            if status.as_deref() == Some("active") {
                                return Err(Failure::from(qmp_error(&self.name, error)));
                            }
                            tracing::info!(vm = %self.name, migration = %self.id, ?status, "not switched to post-copy: the precopy is completing");
                            continue;
                        }
                        postcopy_switched = true;
                        self.postcopy_asked = true;
                        tracing::info!(vm = %self.name, migration = %self.id, passes = self.migration.progress.passes, "switching to post-copy");
                        if let Some(plan) = &mut self.migration.progress.plan {
                            plan.push_str("; switching to post-copy now");
                        }
                    }
                    match status.as_str() {
                        "completed" => qemu_done = true,
                        // The stream broke during post-copy: QEMU waits for a recovery, which
                        // the post-copy's end below attempts on a new session.
                        "postcopy-paused" => {
                            return Err(Failure::new(ErrorCode::Unavailable,
                                "the migration stream broke during post-copy"));
                        }
                        "pre-switchover" => {
                            if let Some(disk) = &self.disk {
                                disk.finish(self.qemu, &self.name).await?;
                            }
                            self.qemu
                                .qmp()
                                .execute("migrate-continue", Some(json!({ "state": "pre-switchover" })))
                                .await
                                .map_err(|error| Failure::from(qmp_error(&self.name, error)))?;
                        }
                        "failed" | "cancelled" => {
                            // QEMU fails when the proxy drops its socket: the proxy's error (a
                            // lost session, say) is the reason, when there is one.
                            if sent.is_none()
                                && let Ok(result) = tokio::time::timeout(Duration::from_secs(2), &mut sender).await
                            {
                                sender_outcome(result)?;
                            }
                            return Err(Failure::new(ErrorCode::Internal, format!(
                                "qemu reports the migration {status}")));
                        }
                        _ => {}
                    }
                    // Once the destination owns the VM, the copy finishes or the VM is lost:
                    // no timeout ends it.
                    if Instant::now() > deadline && postcopy_committed_at.is_none() {
                        return Err(Failure::cancelled(format!(
                            "timed out after {} s (--timeout); the VM stayed on the source",
                            self.migration.timeout_secs)));
                    }
                }
            }
        }
        Ok::<(), Failure>(())
        }
        .await;
        if let Some(committed_at) = postcopy_committed_at {
            let mut report = sent.unwrap_or_default();
            let mut copied = copied;
            let mut resumed = false;
            if let Err(failure) = &copied {
                // The stream broke for good (the destination's serve restarted, say): QEMU
                // pauses once its socket closes, and the copy resumes on a new session.
                if !sender.is_finished() {
                    sender.abort();
                    let _ = (&mut sender).await;
                }
                let message = format!(
                    "post-copy: the stream to host {} broke ({}); resuming it on a new session",
                    self.migration.destination, failure.message
                );
                tracing::warn!(vm = %self.name, migration = %self.id, "{message}");
                self.say(&message).await;
                // A link lost for the whole link wait was given up by both hosts: the time
                // left is what the session has not waited yet.
                let down = session.stats().disconnected_for.unwrap_or_default();
                let until = Instant::now() + postcopy_link.wait.saturating_sub(down);
                copied = match postcopy::resume_until(
                    &self.shared,
                    self.qemu,
                    &self.record,
                    &self.migration,
                    until,
                )
                .await
                {
                    Ok(Some(resumed_report)) => {
                        report = resumed_report;
                        resumed = true;
                        Ok(())
                    }
                    // QEMU had completed: the session failed as the stream ended.
                    Ok(None) => Ok(()),
                    Err(again) => Err(Failure::new(
                        again.code,
                        format!("{}; resuming it failed: {}", failure.message, again.message),
                    )),
                };
            }
            self.finish_postcopy(copied, &report, committed_at, memory_started, resumed)
                .await;
            return Ok(SourceOutcome::Moved);
        }
        copied?;
        let (pid, stream_checksum, destination_codec) = loaded.unwrap_or_default();
        let report = sent.unwrap_or_default();
        let pipeline = MemoryPipeline {
            source: codec_time(&report.timing),
            destination: destination_codec,
        };
        tracing::info!(vm = %self.name, migration = %self.id, "memory copy's pace: {pipeline}");
        self.migration.memory_pipeline = Some(pipeline);
        let progress = &mut self.migration.progress;
        progress.stream_bytes = report.stream_bytes;
        progress.pages_zero = report.codec.zero_pages;
        progress.pages_known =
            report.codec.known_from_transfer + report.codec.known_from_destination;
        Self::count_known_pages(&self.delivered, progress, &report);
        progress.pages_delta = report.codec.delta_pages;
        progress.pages_literal = report.codec.literal_pages;
        if let Some(recorded) = switch_over_recorded.take() {
            let _ = recorded.await;
        }
        self.commit(
            pid,
            &stream_checksum,
            memory_started.elapsed().as_secs_f64(),
            report.message_bytes,
            stopped_at_ms,
        )
        .await?;
        let commit = Message::Migration(MigrationControl::Commit);
        if let Err(error) = control.notify(commit.encode()).await {
            tracing::warn!(vm = %self.name, %error, "the commit notice did not reach the destination; it reads the store");
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), session.flush()).await;
        tracing::info!(vm = %self.name, migration = %self.id, destination = %self.migration.destination,
            stream_bytes = report.stream_bytes, wire_bytes = report.message_bytes, "vm migrated");
        Ok(SourceOutcome::Moved)
    }

    /// Takes the dirty-rate sample that ended after the copy began into the plan: the rate
    /// stands in for QEMU's until its first pass reports one, and a throttled move starts its
    /// throttle where the plan says (the downtime limit does not depend on it).
    async fn planned_with_dirty_rate(
        &mut self,
        rate: f64,
        inputs: PlanInputs,
        throttle: bool,
        link_known: bool,
    ) {
        self.initial_dirty_rate = rate;
        let (plan, _) = self.planner.update(&PlanInputs {
            dirty_bytes_per_second: rate,
            ..inputs
        });
        tracing::debug!(vm = %self.name, dirty_bytes_per_second = rate, "the dirty-rate sample ended after the copy began");
        self.note_plan(&plan, rate, link_known);
        if throttle && plan.throttle_percent > 0 {
            let parameters = json!({ "cpu-throttle-initial": plan.throttle_percent.clamp(20, 99) });
            if let Err(error) = self
                .qemu
                .qmp()
                .execute("migrate-set-parameters", Some(parameters))
                .await
            {
                tracing::warn!(vm = %self.name, %error, "qemu's initial throttle not set");
            }
        }
    }

    /// Puts the plan into the progress the record shows.
    fn note_plan(&mut self, plan: &Plan, dirty_bytes_per_second: f64, link_known: bool) {
        let progress = &mut self.migration.progress;
        progress.qemu_downtime_limit_ms = Some(plan.qemu_downtime_limit_ms);
        if !link_known {
            progress.plan = Some("no measurement of this link yet: planned once bytes flow".into());
            progress.converges = None;
            return;
        }
        let mut text = plan.summary(dirty_bytes_per_second);
        if !plan.converges {
            text.push_str(match self.migration.when_not_converging {
                ConvergencePolicy::Throttle => "; throttling the guest's vCPUs (auto-converge)",
                ConvergencePolicy::KeepCopying => {
                    "; --when-not-converging keep-copying: copying on until --timeout"
                }
                ConvergencePolicy::PostCopy => {
                    "; --when-not-converging post-copy: the guest moves after the first full copy"
                }
            });
        }
        progress.plan = Some(text);
        progress.converges = Some(plan.converges);
    }

    /// Splits the pages the destination held before this move between the base image, the
    /// boot files and the disk mirror's blocks.
    fn count_known_pages(
        delivered: &DeliveredPages,
        progress: &mut novacron_types::MigrationProgress,
        report: &ProxyReport,
    ) {
        let from_mirror = delivered.used();
        progress.blocks_from_disk_mirror = from_mirror;
        progress.pages_from_boot_files = report.pages_from_files;
        progress.pages_from_image = report
            .codec
            .known_from_destination
            .saturating_sub(from_mirror)
            .saturating_sub(report.pages_from_files);
    }

    /// RAM pages and disk blocks equal to a block of the VM's base image travel as hashes: the
    /// destination holds the image (it indexed it before answering Ready). So do RAM pages
    /// equal to a block the disk mirror delivered. Without an index, image blocks are sent.
    async fn base_image_pages(&self) -> SharedImagePages {
        self.image_index()
            .await
            .with_delivered(self.delivered.clone())
    }

    async fn image_index(&self) -> SharedImagePages {
        let Some(image_id) = &self.record.spec.image_id else {
            return SharedImagePages::default();
        };
        let directory = self.shared.paths.vm_dir(&self.record.uuid);
        match self.shared.records.image(image_id).await {
            Ok(Some(image)) => {
                match index_image_pages(&self.shared, &self.record, &image, &directory).await {
                    Ok(index) => return index,
                    Err(error) => {
                        tracing::warn!(vm = %self.name, %error, "base image not indexed; its pages are sent in full")
                    }
                }
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(vm = %self.name, %error, "base image record unreadable")
            }
        }
        SharedImagePages::default()
    }

    /// Mirrors the VM's disk to the destination's NBD export through a second session, until
    /// QEMU says the mirror is in sync (guest writes keep being mirrored afterwards). The
    /// mirror's NBD connection crosses in the proxy's NBD format: its writes go through the
    /// page codec (blocks of the base image as hashes, zero blocks, deltas, zstd).
    async fn mirror_disk(&mut self, dial: &Dial) -> Result<(), Failure> {
        self.set_phase(MigrationPhase::Preparing, MigrationPhase::Disk)
            .await?;
        let session = Session::connect(dial.address, &dial.tls, dial.options.clone())
            .await
            .map_err(|error| session_failure("opening the disk session", &error))?;
        let session = Arc::new(session);
        let begin = Message::Migration(MigrationControl::DiskBegin {
            id: self.id.clone(),
        });
        let reply = session
            .control()
            .request(begin.encode())
            .await
            .map_err(|error| session_failure("asking the destination for its disk", &error))?;
        match Message::decode(&reply) {
            Ok(Message::Migration(MigrationControl::Ready { .. })) => {}
            Ok(Message::Migration(MigrationControl::Refused { code, message })) => {
                return Err(Failure::new(
                    code,
                    format!(
                        "host {} refused the disk: {message}",
                        self.migration.destination
                    ),
                ));
            }
            _ => {
                return Err(Failure::new(
                    ErrorCode::Internal,
                    "the destination answered the disk request with something else",
                ));
            }
        }
        let socket_path = self
            .shared
            .paths
            .vm_dir(&self.record.uuid)
            .join("nbd-out.sock");
        let _ = std::fs::remove_file(&socket_path);
        let listener = tokio::net::UnixListener::bind(&socket_path).map_err(|error| {
            Failure::new(
                ErrorCode::Internal,
                format!("cannot listen on {}: {error}", socket_path.display()),
            )
        })?;
        let pipe_session = session.clone();
        let config = disk_proxy_config(self.base_image_pages().await);
        let pipe = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.map_err(|source| ProxyError::Io {
                action: "accepting qemu's nbd connection",
                source,
            })?;
            send_migration_stream_duplex(stream, &pipe_session, &config).await
        });
        self.disk = Some(DiskMirror {
            session,
            pipe,
            socket_path: socket_path.clone(),
        });
        let qmp = self.qemu.qmp();
        qmp.execute(
            "blockdev-add",
            Some(json!({
                "driver": "nbd",
                "node-name": MIRROR_TARGET_NODE,
                "server": { "type": "unix", "path": socket_path.display().to_string() },
                "export": DISK_NODE,
            })),
        )
        .await
        .map_err(|error| Failure::from(qmp_error(&self.name, error)))?;
        // `top`: only what the VM's overlay holds; the destination's overlay reads the rest from
        // its own copy of the base image.
        qmp.execute(
            "blockdev-mirror",
            Some(json!({
                "job-id": MIRROR_JOB,
                "device": DISK_NODE,
                "target": MIRROR_TARGET_NODE,
                "sync": "top",
            })),
        )
        .await
        .map_err(|error| Failure::from(qmp_error(&self.name, error)))?;
        let deadline = self.started + Duration::from_secs(self.migration.timeout_secs.max(10));
        loop {
            let job = mirror_job(self.qemu, &self.name).await?.ok_or_else(|| {
                Failure::new(ErrorCode::Internal, "the disk mirror ended by itself")
            })?;
            let (length, offset) = (
                job["len"].as_u64().unwrap_or(0),
                job["offset"].as_u64().unwrap_or(0),
            );
            self.migration.progress.disk_bytes = length;
            self.migration.progress.disk_bytes_done = offset;
            if let Some(disk) = &self.disk {
                self.migration.progress.disk_wire_bytes =
                    disk.session.stats().bulk_bytes_acknowledged;
            }
            if let Some(error) = job["error"].as_str() {
                return Err(Failure::new(
                    ErrorCode::Unavailable,
                    format!("the disk mirror failed: {error}"),
                ));
            }
            // Written before a ready mirror ends the loop too: a small disk is in sync at the
            // first look, and its size was otherwise never recorded (the memory phase starts
            // from the stored record).
            let ready = job["ready"].as_bool() == Some(true);
            let progress = self.migration.progress.clone();
            let _ = self
                .shared
                .records
                .update_migration(&self.id, |record| {
                    record.progress = progress.clone();
                    Ok(!record.phase.is_finished())
                })
                .await
                .map(|record| {
                    if record.cancel_requested {
                        self.migration.cancel_requested = true;
                    }
                });
            if self.migration.cancel_requested {
                return Err(Failure::cancelled(
                    "cancelled (`vm migrate --cancel`); the VM stayed on the source",
                ));
            }
            if ready {
                break;
            }
            if Instant::now() > deadline {
                return Err(Failure::cancelled(format!(
                    "timed out after {} s (--timeout) while mirroring the disk; the VM stayed on \
                     the source",
                    self.migration.timeout_secs
                )));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        tracing::info!(vm = %self.name, bytes = self.migration.progress.disk_bytes, "disk mirror in sync");
        Ok(())
    }

    /// Reads QEMU's progress, writes it into the record about once a second, and notices a
    /// cancel. Returns QEMU's migration status.
    async fn poll_progress(
        &mut self,
        session: &Session,
        sent: &Option<novacron_migration::ProxyReport>,
    ) -> Result<String, Failure> {
        let info = self
            .qemu
            .qmp()
            .query_migrate()
            .await
            .map_err(|error| Failure::from(qmp_error(&self.name, error)))?;
        let status = info["status"].as_str().unwrap_or("none").to_string();
        let ram = &info["ram"];
        let stats = session.stats();
        let number = |value: &Value| value.as_u64().unwrap_or(0);
        let progress = MigrationProgress {
            memory_bytes: self.record.spec.memory_bytes,
            stream_bytes: sent
                .as_ref()
                .map(|report| report.stream_bytes)
                .unwrap_or_else(|| number(&ram["transferred"])),
            wire_bytes: stats.bulk_bytes_sent,
            remaining_bytes: number(&ram["remaining"]),
            passes: number(&ram["dirty-sync-count"]),
            dirty_pages_per_second: number(&ram["dirty-pages-rate"]),
            rate_bits_per_second: stats.measured_rate_bytes_per_second * 8.0,
            expected_downtime_ms: info["expected-downtime"].as_u64(),
            eta_seconds: (stats.measured_rate_bytes_per_second > 0.0).then(|| {
                number(&ram["remaining"]) as f64 / stats.measured_rate_bytes_per_second.max(1.0)
            }),
            ..self.migration.progress.clone()
        };
        let mut progress = progress;
        progress.throttle_percent = number(&info["cpu-throttle-percentage"]);
        if status == "active" && !self.postcopy_asked && stats.measured_rate_bytes_per_second > 0.0
        {
            let qemu_dirty = progress.dirty_pages_per_second as f64 * 4096.0;
            let dirty = if qemu_dirty > 0.0 {
                qemu_dirty
            } else {
                self.initial_dirty_rate
            };
            let ratio = self
                .planner
                .observe_ratio(number(&ram["transferred"]), stats.bulk_bytes_sent);
            let (plan, change) = self.planner.update(&PlanInputs {
                remaining_bytes: progress.remaining_bytes,
                dirty_bytes_per_second: dirty,
                wire_bytes_per_second: stats.measured_rate_bytes_per_second,
                encoding_ratio: ratio,
                in_flight_wire_bytes: novacron_migration::queued_wire_bytes(session),
                round_trip: stats.round_trip_estimate.unwrap_or_default(),
                downtime_limit: Duration::from_millis(self.migration.downtime_limit_ms),
            });
            if let Some(limit) = change {
                tracing::debug!(vm = %self.name, limit, ?plan, "qemu's downtime limit re-planned");
                if let Err(error) = self
                    .qemu
                    .qmp()
                    .execute(
                        "migrate-set-parameters",
                        Some(json!({ "downtime-limit": limit })),
                    )
                    .await
                {
                    tracing::warn!(vm = %self.name, %error, "qemu's downtime limit not changed");
                }
            }
            self.migration.progress = progress;
            self.note_plan(&plan, dirty, true);
            progress = self.migration.progress.clone();
        }
        let due = self
            .last_progress_write
            .is_none_or(|last| last.elapsed() >= Duration::from_secs(1));
        if due {
            self.last_progress_write = Some(Instant::now());
            // Best effort: a store that does not answer (this host cut off from the leader)
            // does not stop the copy; the session's own failure or the commit decides.
            let written = self
                .shared
                .records
                .update_migration(&self.id, |record| {
                    if record.phase.is_finished() {
                        return Ok(false);
                    }
                    record.progress = progress.clone();
                    Ok(true)
                })
                .await;
            match written {
                Ok(current) => self.migration = current,
                Err(error) => {
                    tracing::debug!(vm = %self.name, %error, "migration progress not written");
                    self.migration.progress = progress;
                }
            }
        } else {
            self.migration.progress = progress;
        }
        if self.migration.cancel_requested {
            return Err(Failure::cancelled(
                "cancelled (`vm migrate --cancel`); the VM stayed on the source",
            ));
        }
        Ok(status)
    }

    /// Moves the phase forward if it is still `from` and no cancel was asked for.
    async fn set_phase(&mut self, from: MigrationPhase, to: MigrationPhase) -> Result<(), Failure> {
        let mut cancelled = false;
        let mut unexpected = None;
        let record = self
            .shared
            .records
            .update_migration(&self.id, |record| {
                if record.cancel_requested {
                    cancelled = true;
                    return Ok(false);
                }
                if record.phase != from {
                    unexpected = Some(record.phase);
                    return Ok(false);
                }
                record.phase = to;
                Ok(true)
            })
            .await?;
        if cancelled {
            return Err(Failure::cancelled(
                "cancelled (`vm migrate --cancel`); the VM stayed on the source",
            ));
        }
        if let Some(phase) = unexpected {
            return Err(Failure::new(
                ErrorCode::Conflict,
                format!("the migration is {phase}, not {from}: it was changed elsewhere"),
            ));
        }
        self.migration = record;
        Ok(())
    }

    /// The one store transaction that moves the VM. When its outcome is unknown (no answer
    /// from the store), keeps asking: the guest stays paused meanwhile.
    /// Whether a post-copy migration switches now: once the first full copy is done (QEMU's
    /// second dirty sync), when the plan says precopy would not converge, or after a few passes
    /// that did not.
    fn postcopy_due(&self) -> bool {
        let progress = &self.migration.progress;
        progress.passes >= 2 && (progress.converges == Some(false) || progress.passes >= 5)
    }

    /// Post-copy's commit, at the switch: the destination owns the VM from here on, and the
    /// migration stays open (phase `post-copy`) while the pages it lacks still come from here.
    /// A cancel is no longer possible (the source's guest cannot run again), so none is looked at.
    async fn commit_postcopy(&mut self, pid: Option<u32>) -> Result<(), Failure> {
        let destination = self.migration.destination.clone();
        let source = self.migration.source.clone();
        let progress = self.migration.progress.clone();
        loop {
            let attempt = self
                .shared
                .records
                .update_vm_and_migration(&self.name, &self.id, |vm, record| {
                    if record.phase.is_finished() {
                        return Ok(false);
                    }
                    vm.migration = None;
                    vm.status.host = destination.clone();
                    vm.status.pid = pid;
                    vm.status.since = unix_now();
                    vm.status.state = match vm.desired {
                        DesiredPower::Paused => VmState::Paused,
                        _ => VmState::Running,
                    };
                    record.phase = MigrationPhase::PostCopy;
                    record.progress = progress.clone();
                    record.message = Some(format!(
                        "post-copy: the VM runs on host {destination}; the pages it has not \
                         received yet come from host {source}"
                    ));
                    Ok(true)
                })
                .await;
            match attempt {
                Ok(Some((_, current))) => {
                    self.migration = current;
                    tracing::info!(vm = %self.name, migration = %self.id, %destination, "post-copy: the destination owns the vm");
                    return Ok(());
                }
                Ok(None) => {
                    return Err(Failure::new(
                        ErrorCode::Conflict,
                        "the migration ended elsewhere during the switch to post-copy",
                    ));
                }
                Err(error) => {
                    tracing::warn!(vm = %self.name, %error, "store not answering at the post-copy switch; the guest stays paused until it does");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// After post-copy's commit: records how the copy ended (`resumed`: on a new session, after
    /// the first stream broke). A failure now loses the guest's running state; the destination,
    /// which owns the VM, stops its QEMU and restarts the VM.
    async fn finish_postcopy(
        &mut self,
        copied: Result<(), Failure>,
        report: &novacron_migration::ProxyReport,
        committed_at: Instant,
        memory_started: Instant,
        resumed: bool,
    ) {
        let destination = self.migration.destination.clone();
        let mut progress = self.migration.progress.clone();
        progress.stream_bytes = report.stream_bytes;
        progress.wire_bytes = progress.wire_bytes.max(report.message_bytes);
        progress.remaining_bytes = 0;
        progress.pages_zero = report.codec.zero_pages;
        progress.pages_known =
            report.codec.known_from_transfer + report.codec.known_from_destination;
        Self::count_known_pages(&self.delivered, &mut progress, report);
        progress.pages_delta = report.codec.delta_pages;
        progress.pages_literal = report.codec.literal_pages;
        let after_switch = committed_at.elapsed().as_secs_f64();
        let outcome = copied.map(|()| {
            let resumed = if resumed {
                ", resumed on a new session after the stream broke"
            } else {
                ""
            };
            format!(
                "the VM runs on host {destination} (post-copy{resumed}: its last pages arrived \
                 {after_switch:.1} s after the switch)"
            )
        });
        record_postcopy_end(
            &self.shared,
            &self.migration,
            progress,
            outcome,
            report,
            Some(memory_started.elapsed().as_secs_f64()),
        )
        .await;
    }

    async fn commit(
        &mut self,
        pid: Option<u32>,
        stream_checksum: &str,
        seconds: f64,
        wire_bytes: u64,
        stopped_at_ms: Option<u64>,
    ) -> Result<(), Failure> {
        let destination = self.migration.destination.clone();
        let id = self.id.clone();
        let mut progress = self.migration.progress.clone();
        let memory_pipeline = self.migration.memory_pipeline;
        progress.wire_bytes = progress.wire_bytes.max(wire_bytes);
        progress.remaining_bytes = 0;
        let mut cancelled = false;
        let attempt = self
            .shared
            .records
            .update_vm_and_migration(&self.name, &self.id, |vm, record| {
                if record.cancel_requested || record.phase.is_finished() {
                    cancelled = true;
                    return Ok(false);
                }
                vm.migration = None;
                vm.status.host = destination.clone();
                vm.status.pid = pid;
                vm.status.since = unix_now();
                vm.status.state = match vm.desired {
                    DesiredPower::Paused => VmState::Paused,
                    DesiredPower::Running => VmState::Running,
                    // A cold move: the destination quits the QEMU it loaded the disk with.
                    DesiredPower::Stopped => VmState::Stopped,
                };
                if vm.desired == DesiredPower::Stopped {
                    vm.status.pid = None;
                }
                record.phase = MigrationPhase::Completed;
                record.finished_at = Some(unix_now());
                record.stopped_at_ms = record.stopped_at_ms.or(stopped_at_ms);
                record.stream_checksum = Some(stream_checksum.to_string());
                record.total_seconds = Some(seconds);
                record.progress = progress.clone();
                record.memory_pipeline = memory_pipeline;
                record.message = Some(if vm.desired == DesiredPower::Stopped {
                    format!(
                        "cold move: the VM's disk is on host {destination}; the VM stays \
                         stopped there"
                    )
                } else {
                    format!("the VM runs on host {destination}")
                });
                Ok(true)
            })
            .await;
        match attempt {
            Ok(Some(_)) => return Ok(()),
            Ok(None) if cancelled => {
                return Err(Failure::cancelled(
                    "cancelled during switch-over; the VM stayed on the source",
                ));
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(vm = %self.name, migration = %id, %error, "the commit's outcome is unknown; asking the store until it answers (the guest stays paused)");
            }
        }
        loop {
            match self.shared.records.vm(&self.name).await {
                Ok(Some(vm)) if vm.record.status.host == destination => return Ok(()),
                Ok(Some(vm)) if vm.record.migration.as_deref() == Some(id.as_str()) => {
                    return Err(Failure::new(
                        ErrorCode::Unavailable,
                        "the store refused the commit; the VM stayed on the source",
                    ));
                }
                Ok(_) => {
                    return Err(Failure::new(
                        ErrorCode::Conflict,
                        "the VM record changed during switch-over; the VM stayed on the source",
                    ));
                }
                Err(error) => {
                    tracing::warn!(vm = %self.name, %error, "store not answering; the guest stays paused until it does");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// The node name of a VM's disk (its format layer), as `launch_spec` attaches it.
const DISK_NODE: &str = "disk0";
const MIRROR_TARGET_NODE: &str = "migration-target";
const MIRROR_JOB: &str = "migration-disk";
/// The destination's NBD export of the VM's disk.
const NBD_EXPORT_ID: &str = "migration";

/// The source side of a disk mirror: the second session and the task that pipes QEMU's NBD
/// client connection over it.
struct DiskMirror {
    session: Arc<Session>,
    pipe: tokio::task::JoinHandle<Result<ProxyReport, ProxyError>>,
    socket_path: std::path::PathBuf,
}

/// How the mirror's NBD connection crosses: the proxy's NBD format, flushed as soon as QEMU's
/// NBD client pauses (each write waits for its reply, so a batch must not wait for more).
fn disk_proxy_config(image_pages: SharedImagePages) -> ProxyConfig {
    ProxyConfig {
        format: novacron_migration::StreamFormat::Nbd,
        idle_flush: Duration::from_millis(2),
        image_pages,
        ..ProxyConfig::default()
    }
}

impl DiskMirror {
    /// At `pre-switchover` (the guest is paused): completes the mirror without switching the
    /// source to the target (`block-job-cancel` of a ready job), so every guest write is at the
    /// destination before its QEMU gets the last device state.
    async fn finish(&self, qemu: &QemuVm, name: &str) -> Result<(), Failure> {
        qemu.qmp()
            .execute("block-job-cancel", Some(json!({ "device": MIRROR_JOB })))
            .await
            .map_err(|error| Failure::from(qmp_error(name, error)))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while mirror_job(qemu, name).await?.is_some() {
            if Instant::now() > deadline {
                return Err(Failure::new(
                    ErrorCode::Internal,
                    "the disk mirror did not complete within 60 s of the switch-over",
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Ends whatever is left: the job (forced), the NBD client node, the pipe and the session.
    async fn clean_up(self, qemu: &QemuVm, name: &str) {
        if matches!(mirror_job(qemu, name).await, Ok(Some(_))) {
            let _ = qemu
                .qmp()
                .execute(
                    "block-job-cancel",
                    Some(json!({ "device": MIRROR_JOB, "force": true })),
                )
                .await;
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(mirror_job(qemu, name).await, Ok(Some(_))) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let _ = qemu
            .qmp()
            .execute(
                "blockdev-del",
                Some(json!({ "node-name": MIRROR_TARGET_NODE })),
            )
            .await;
        // Deleting the node disconnects QEMU's NBD client: the connection's end, with its
        // checksum, crosses (the destination verifies it); a failed move may not get there.
        let mut pipe = self.pipe;
        match tokio::time::timeout(Duration::from_secs(5), &mut pipe).await {
            Ok(Ok(Ok(report))) => tracing::info!(vm = %name,
                nbd_bytes = report.stream_bytes, wire_bytes = report.message_bytes,
                blocks_from_image = report.codec.known_from_destination,
                zero_blocks = report.codec.zero_pages, "disk mirror connection carried"),
            Ok(Ok(Err(error))) => {
                tracing::debug!(vm = %name, %error, "disk mirror connection ended")
            }
            Ok(Err(_)) | Err(_) => {}
        }
        pipe.abort();
        let _ = std::fs::remove_file(&self.socket_path);
        crate::transfer::close_quietly(self.session).await;
    }
}

/// The guest's dirty rate (bytes/s) from QEMU's `calc-dirty-rate` over
/// [`DIRTY_RATE_SAMPLE`], or 0 when QEMU cannot measure it (the plan then waits for the first
/// pass's figure).
async fn measure_dirty_rate(qemu: &QemuVm) -> f64 {
    let qmp = qemu.qmp();
    // Half a second, sampling four times QEMU's default 512 pages per GiB: more changed
    // samples than the default second gives, so a slow writer is seen too.
    let sample = json!({
        "calc-time": DIRTY_RATE_SAMPLE.as_millis() as u64,
        "calc-time-unit": "millisecond",
        "sample-pages": 2048,
    });
    let started = match qmp.execute("calc-dirty-rate", Some(sample)).await {
        Ok(_) => true,
        // A QEMU without the unit (before 8.2) measures whole seconds.
        Err(_) => qmp
            .execute("calc-dirty-rate", Some(json!({ "calc-time": 1 })))
            .await
            .inspect_err(|error| tracing::debug!(%error, "calc-dirty-rate refused"))
            .is_ok(),
    };
    if !started {
        return 0.0;
    }
    // Nothing to ask for before the sample's end; then ask often: the move's set-up waits for
    // the answer (polling every 100 ms from the start found it up to 0.1 s late).
    tokio::time::sleep(DIRTY_RATE_SAMPLE).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let Ok(answer) = qmp.execute("query-dirty-rate", None).await else {
            return 0.0;
        };
        if answer["status"] == "measured" {
            // QEMU reports MiB/s.
            return answer["dirty-rate"].as_f64().unwrap_or(0.0) * f64::from(1u32 << 20);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    0.0
}

/// Drives `main` to its end while `side` makes progress too (it may end before or after
/// `main`; whoever needs its output awaits it later).
async fn alongside<T, F: Future<Output = ()>>(
    main: impl Future<Output = T>,
    mut side: std::pin::Pin<&mut F>,
) -> T {
    let mut main = std::pin::pin!(main);
    let mut side_done = false;
    loop {
        tokio::select! {
            biased;
            output = &mut main => return output,
            () = side.as_mut(), if !side_done => side_done = true,
        }
    }
}

/// The migration's mirror job as `query-block-jobs` shows it, if it runs.
async fn mirror_job(qemu: &QemuVm, name: &str) -> Result<Option<Value>, Failure> {
    let jobs = qemu
        .qmp()
        .execute("query-block-jobs", None)
        .await
        .map_err(|error| Failure::from(qmp_error(name, error)))?;
    Ok(jobs
        .as_array()
        .and_then(|jobs| jobs.iter().find(|job| job["device"] == MIRROR_JOB))
        .cloned())
}

/// The proxy sender's result, its error as the migration's reason.
fn sender_outcome(
    result: Result<
        Result<novacron_migration::ProxyReport, novacron_migration::ProxyError>,
        tokio::task::JoinError,
    >,
) -> Result<novacron_migration::ProxyReport, Failure> {
    result
        .map_err(|error| {
            Failure::new(
                ErrorCode::Internal,
                format!("the stream sender ended: {error}"),
            )
        })?
        .map_err(|error| {
            Failure::new(
                ErrorCode::Unavailable,
                format!(
                    "sending the migration stream failed: {}; the VM stayed on the source",
                    crate::transfer::describe(&error)
                ),
            )
        })
}

/// The destination's reason for a copy that broke, when its `Refused` notice arrives within a
/// moment: a destination that answered `Begin` before its QEMU started gives up with a notice,
/// then closes the session, and the broken stream may be seen first. Else `failure`.
async fn destination_reason(
    control: &novacron_transport::ControlChannel,
    destination: &str,
    failure: Failure,
) -> Failure {
    let notice = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            match control.next_incoming().await {
                Ok(Some(ControlIncoming::Notification(body))) => {
                    if let Ok(Message::Migration(MigrationControl::Refused { code, message })) =
                        Message::decode(&body)
                    {
                        return Some((code, message));
                    }
                }
                Ok(Some(ControlIncoming::Request(_))) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    })
    .await;
    match notice {
        Ok(Some((code, message))) => {
            Failure::new(code, format!("host {destination} gave up: {message}"))
        }
        _ => failure,
    }
}

fn event_unix_ms(event: &novacron_qemu::QmpEvent) -> u64 {
    let seconds = u64::try_from(event.timestamp_seconds).unwrap_or(0);
    let micros = u64::try_from(event.timestamp_microseconds).unwrap_or(0);
    seconds * 1000 + micros / 1000
}

fn session_failure(what: &str, error: &novacron_transport::TransportError) -> Failure {
    Failure::new(
        ErrorCode::Unavailable,
        format!(
            "{what} failed: {} (link cut, or the destination's novacron serve ended?); the VM \
             stayed on the source",
            crate::transfer::describe(error)
        ),
    )
}

/// Sends a migration's opening request (`Begin`, `Recover`: `what` names it) to the
/// destination and waits for its `Ready`; returns what it said it holds of the VM's boot files
/// (`MigrationControl::Ready::held_files`).
async fn ask_destination(
    session: &Session,
    request: Message,
    what: &str,
    destination: &str,
) -> Result<Vec<String>, Failure> {
    let reply =
        tokio::time::timeout(ANSWER_TIMEOUT, session.control().request(request.encode())).await;
    destination_answer(reply, what, destination)
}

/// The destination's answer to a `Begin` (its held files) or a refusal.
fn destination_answer(
    reply: Result<
        Result<bytes::Bytes, novacron_transport::TransportError>,
        tokio::time::error::Elapsed,
    >,
    what: &str,
    destination: &str,
) -> Result<Vec<String>, Failure> {
    let reply = reply
        .map_err(|_| {
            Failure::new(
                ErrorCode::Unavailable,
                format!("host {destination} did not answer the {what} within 60 s"),
            )
        })?
        .map_err(|error| session_failure(&format!("asking host {destination}"), &error))?;
    match Message::decode(&reply) {
        Ok(Message::Migration(MigrationControl::Ready { held_files })) => Ok(held_files),
        Ok(Message::Migration(MigrationControl::Refused { code, message })) => Err(Failure::new(
            code,
            format!("host {destination} refused: {message}"),
        )),
        Ok(other) => Err(Failure::new(
            ErrorCode::Internal,
            format!("host {destination} answered {} to the {what}", other.name()),
        )),
        Err(error) => Err(Failure::new(ErrorCode::Internal, error.to_string())),
    }
}

/// Has the source QEMU migrate into a socket this agent owns (`resume`: a paused post-copy's
/// rest) and returns the connection.
async fn migrate_into_socket(
    shared: &Shared,
    qemu: &QemuVm,
    record: &VmRecord,
    resume: bool,
) -> Result<tokio::net::UnixStream, Failure> {
    let socket_path = shared.paths.vm_dir(&record.uuid).join("migrate-out.sock");
    let _ = std::fs::remove_file(&socket_path);
    let listener = tokio::net::UnixListener::bind(&socket_path).map_err(|error| {
        Failure::new(
            ErrorCode::Internal,
            format!("cannot listen on {}: {error}", socket_path.display()),
        )
    })?;
    let mut arguments = json!({ "uri": format!("unix:{}", socket_path.display()) });
    if resume {
        arguments["resume"] = json!(true);
    }
    qemu.qmp()
        .execute("migrate", Some(arguments))
        .await
        .map_err(|error| Failure::from(qmp_error(record.spec.name.as_str(), error)))?;
    let (stream, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
        .await
        .map_err(|_| {
            Failure::new(
                ErrorCode::Internal,
                "qemu did not connect to the migration socket within 30 s",
            )
        })?
        .map_err(|error| Failure::new(ErrorCode::Internal, format!("migration socket: {error}")))?;
    drop(listener);
    let _ = std::fs::remove_file(&socket_path);
    Ok(stream)
}

/// Records how a post-copy ended, after its commit: `outcome` is the completed migration's
/// message, or why the copy failed (which loses the guest's running state: the destination,
/// which owns the VM, stops its QEMU and restarts the VM). `report` is the stream's last
/// session; `seconds` the memory phase's length, when known.
async fn record_postcopy_end(
    shared: &Shared,
    migration: &MigrationRecord,
    progress: MigrationProgress,
    outcome: Result<String, Failure>,
    report: &ProxyReport,
    seconds: Option<f64>,
) {
    let (name, id, destination) = (&migration.vm, &migration.id, &migration.destination);
    let (phase, code, message) = match &outcome {
        Ok(message) => (MigrationPhase::Completed, None, message.clone()),
        Err(failure) => (
            MigrationPhase::Failed,
            Some(failure.code),
            format!(
                "post-copy failed after the VM moved to host {destination}: {}; the \
                 guest's running state is lost; the VM fails there as after a crash (restarted by \
                 its restart policy)",
                // Failures are worded for precopy, where the source keeps the VM.
                failure
                    .message
                    .trim_end_matches("; the VM stayed on the source")
            ),
        ),
    };
    let checksum = format!(
        "{} bytes, blake3 stream digest {}",
        report.stream_bytes,
        blake3::Hash::from(report.stream_checksum).to_hex()
    );
    // Said before the record is written: a source cut off from the store may take a while.
    match &outcome {
        Ok(_) => tracing::info!(vm = %name, migration = %id, %destination,
            stream_bytes = report.stream_bytes, "vm migrated (post-copy)"),
        Err(failure) => tracing::warn!(vm = %name, migration = %id, %destination,
            reason = %failure.message, "post-copy failed after the switch; the vm fails on the destination"),
    }
    for _ in 0..30 {
        let written = shared
            .records
            .update_migration(id, |record| {
                if record.phase.is_finished() {
                    return Ok(false);
                }
                finish(record, phase, code, &message);
                record.progress = progress.clone();
                if outcome.is_ok() {
                    record.stream_checksum = Some(checksum.clone());
                    record.total_seconds = seconds.or(record.total_seconds);
                    // The destination's guest ran before its stream ended: its side says
                    // little, and is not reported. A resumed copy's report is of its last
                    // session only.
                    let timing = &report.timing;
                    if !(timing.working + timing.waiting_for_input + timing.waiting_for_output)
                        .is_zero()
                    {
                        record.memory_pipeline = Some(MemoryPipeline {
                            source: codec_time(timing),
                            destination: None,
                        });
                    }
                }
                Ok(true)
            })
            .await;
        match written {
            Ok(_) => break,
            Err(error) => {
                tracing::warn!(vm = %name, %error, "cannot record the end of post-copy; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Longest a migration's session pads its connections while the destination prepares
/// ([`Session::warm_up`]; the padding stops at the stream's first frame). A cold connection
/// spends its first half second in TCP's start-up: at 1 Gbit/s, 50 ms and 0.5 % loss the copy's
/// first 0.3 s carried 96 Mbit/s and it took 0.9 s to reach 800. The destination's preparation
/// (its QEMU's start) takes about half a second; past this limit the link goes quiet again.
const SESSION_WARM_UP_LIMIT: Duration = Duration::from_secs(5);

/// Opens a migration session to the destination at `address` (from its heartbeat), trying
/// again until `until`: a host that just joined is trusted by the destination's listener only
/// once its heartbeat has been seen there, and a post-copy's recovery waits for a link that is
/// down. Returns the session (`resume_timeout` for a lost connection), how to open another
/// one (for the disk's NBD session), and what `on_session` returned: it runs as soon as a session
/// is made, before the destination's answer to the session (a round trip later; a refusal of
/// this host is retried), so a request it sends follows the session's hello.
async fn connect_to_destination<T>(
    service: &TransferService,
    migration: &MigrationRecord,
    address: &str,
    fingerprint: Fingerprint,
    resume_timeout: Duration,
    until: Instant,
    on_session: impl Fn(&Arc<Session>) -> T,
) -> Result<(Arc<Session>, Dial, T), Failure> {
    let options = novacron_migration::migration_session_options(SessionOptions {
        bulk_send_window_bytes: SEND_WINDOW_CEILING_BYTES,
        resume_timeout,
        ..service.session_options_for_recent(fingerprint, LINK_MEASUREMENT_MAX_AGE)
    });
    let tls = TlsSettings {
        identity: service.identity().clone(),
        trust: PeerTrust::PinnedFingerprints(vec![fingerprint]),
    };
    let destination = &migration.destination;
    let socket_address = tokio::net::lookup_host(address)
        .await
        .ok()
        .and_then(|mut addresses| addresses.next())
        .ok_or_else(|| {
            Failure::new(
                ErrorCode::Unavailable,
                format!("host {destination}'s transfer address {address} does not resolve"),
            )
        })?;
    let started = Instant::now();
    let (session, started_on) = loop {
        // A session dropped here (refused) fails whatever `on_session` started on it.
        let opened = async {
            let session = Arc::new(Session::connect(socket_address, &tls, options.clone()).await?);
            let started_on = on_session(&session);
            session.opened().await.map(|()| (session, started_on))
        };
        match opened.await {
            Ok(opened) => break opened,
            Err(error) if Instant::now() < until => {
                tracing::info!(vm = %migration.vm, %destination,
                    error = %crate::transfer::describe(&error), "destination not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => {
                return Err(Failure::new(
                    ErrorCode::Unavailable,
                    format!(
                        "cannot reach host {destination} at {address} (tried for {} s): {}",
                        started.elapsed().as_secs(),
                        crate::transfer::describe(&error)
                    ),
                ));
            }
        }
    };
    service.links.note_address(fingerprint, address);
    let dial = Dial {
        address: socket_address,
        tls,
        options: SessionOptions {
            // The NBD session carries the disk both ways; its window is not the pause's.
            bulk_send_window_bytes: 16 << 20,
            ..options
        },
    };
    Ok((session, dial, started_on))
}

/// A request's answer on its way: [`ANSWER_TIMEOUT`] elapsed, or the transport's outcome.
type PendingAnswer = tokio::task::JoinHandle<
    Result<Result<bytes::Bytes, novacron_transport::TransportError>, tokio::time::error::Elapsed>,
>;

/// How long the source waits for the destination's answer to a request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// The destination's transfer address and certificate fingerprint, from its heartbeat. A host
/// that just joined or restarted publishes its listener with a heartbeat after its first ones:
/// a heartbeat without it is waited on for [`CONNECT_RETRY_WINDOW`].
async fn destination_endpoint(
    shared: &Shared,
    migration: &MigrationRecord,
) -> Result<(String, Fingerprint), Failure> {
    let give_up = Instant::now() + CONNECT_RETRY_WINDOW;
    let (address, fingerprint) = loop {
        let heartbeats = shared.records.heartbeats().await?;
        let beat = heartbeats
            .iter()
            .find(|beat| beat.host == migration.destination)
            .ok_or_else(|| {
                Failure::new(
                    ErrorCode::Unavailable,
                    format!(
                        "host {} sends no heartbeat; is it up?",
                        migration.destination
                    ),
                )
            })?;
        if let (Some(address), Some(fingerprint)) =
            (&beat.transfer_address, &beat.transfer_fingerprint)
        {
            break (address.clone(), fingerprint.clone());
        }
        if Instant::now() > give_up {
            return Err(Failure::new(
                ErrorCode::Unavailable,
                format!(
                    "host {} publishes no transfer listener (start its serve with \
                     --transfer-listen), so it cannot receive a migration",
                    migration.destination
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let fingerprint = Fingerprint::from_str(&fingerprint).map_err(|error| {
        Failure::new(
            ErrorCode::Internal,
            format!(
                "host {}'s heartbeat carries a bad fingerprint: {error}",
                migration.destination
            ),
        )
    })?;
    Ok((address, fingerprint))
}

// ----- the destination -----

/// Answers a source's `Begin{id}` on an incoming transfer session: starts the incoming QEMU,
/// rebuilds the stream into it, waits for the commit. Removes its QEMU and directory unless the
/// VM became this host's.
pub(crate) async fn serve_destination(
    service: Arc<TransferService>,
    session: Arc<Session>,
    request: novacron_transport::ControlRequest,
    id: String,
) {
    let shared = service.shared().clone();
    // A memory-only move that this host's own copy of the store already shows as one it may
    // take is answered at once: the source's copy starts while this host's QEMU starts, and
    // the stream waits in the session (its receive window) until that QEMU takes it. The
    // checks run again on fresh reads before anything is made; a refusal after the answer is
    // a notice.
    // The fresh checks' fence starts alongside (its round trip to the leader overlaps the
    // early look's wait for the record); the answer goes out as soon as the early look has it,
    // not once the fence is through too (that held a first move's answer back 50 ms).
    let asked_at = Instant::now();
    let (answered, fenced) = tokio::join!(
        async {
            let early = early_held_files(&shared, &session, &id).await;
            let mut request = Some(request);
            if let Some(held) = &early
                && let Some(asked) = request.take()
            {
                tracing::debug!(migration = %id, after_ms = asked_at.elapsed().as_millis() as u64, "answering early");
                asked.respond(ready(held)).await.map(|()| (early, None))
            } else {
                Ok((early, request))
            }
        },
        shared.records.fenced()
    );
    let Ok((early, request)) = answered else {
        crate::transfer::close_quietly(session).await;
        return;
    };
    let prepared = prepare_destination(&shared, &session, &id, early, fenced).await;
    let PreparedDestination {
        migration,
        record,
        qemu,
        image_pages,
        held_files,
    } = match prepared {
        Ok(prepared) => prepared,
        Err(error) => {
            tracing::warn!(migration = %id, %error, "incoming migration refused");
            refuse(request, session, &error).await;
            return;
        }
    };
    let name = record.spec.name.to_string();
    // Released when this function returns; outlives a serve killed during the migration.
    let _holder = postcopy::MonitorHolder::start(&shared, &record).await;
    // Blocks the disk session will deliver, which the memory session may refer to: registered
    // for the disk session (`serve_destination_disk`) while this function runs. A VM without a
    // local disk (none, or one on shared storage) has no disk session, and nothing to record.
    let delivered = match crate::storage::moves_disk(&record) {
        false => None,
        true => match DeliveredPages::at_destination(&shared.paths.vm_dir(&record.uuid)) {
            Ok(delivered) => Some(Arc::new(delivered)),
            Err(error) => {
                let error = AgentError::io("creating the file for the disk mirror's blocks", error);
                tracing::warn!(migration = %id, %error, "incoming migration refused");
                refuse(request, session, &error).await;
                discard_incoming(&shared, &record, qemu).await;
                return;
            }
        },
    };
    let _registered = delivered
        .as_ref()
        .map(|delivered| DeliveredRegistration::new(&shared, &id, delivered.clone()));
    let image_pages = match delivered {
        Some(delivered) => image_pages.with_delivered(delivered),
        None => image_pages,
    };
    // Listed from the post-copy switch until this function returns (its QEMU stopped on a
    // failure): the reconciler leaves the QEMU to the migration meanwhile.
    let driving = PostcopyIncoming::new(&shared, &record.uuid);
    if let Some(asked) = request
        && asked.respond(ready(&held_files)).await.is_err()
    {
        discard_incoming(&shared, &record, qemu).await;
        return;
    }
    let result = tokio::select! {
        result = receive_and_wait(&shared, &session, &migration, &record, &qemu, image_pages, &driving) => result,
        ended = ended_elsewhere(&shared, &id) => Err(ended),
    };
    match result {
        Ok(()) => {
            tracing::info!(vm = %name, migration = %id, "incoming migration committed; the vm runs here");
            crate::transfer::close_quietly(session).await;
        }
        Err(error) => {
            tracing::warn!(vm = %name, migration = %id, %error, "incoming migration abandoned");
            give_up(&session, &error).await;
            crate::transfer::close_quietly(session).await;
            if driving.is_active() {
                // Post-copy: its memory is split between the hosts and the stream is gone, so
                // it is never resumed. If the VM became ours, the reconciler starts it again.
                stop_incomplete(&qemu, &name).await;
                let ours = matches!(shared.records.vm(&name).await,
                    Ok(Some(vm)) if vm.record.status.host == shared.config.host_name);
                if !ours {
                    discard_incoming(&shared, &record, qemu).await;
                }
                return;
            }
            // The VM may still have become ours (a commit whose notice was lost).
            if !settle_after_failure(&shared, &record, &qemu, &id).await {
                discard_incoming(&shared, &record, qemu).await;
            }
        }
    }
}

/// Only host `host` (by its transfer certificate, from its heartbeat) may drive this side of a
/// migration: another host of the region, whose certificate the transfer listener trusts too,
/// may not start, feed or resume it.
async fn check_peer_is(records: &Records, session: &Session, host: &str) -> Result<(), AgentError> {
    let heartbeats = records.heartbeats().await?;
    let expected = heartbeats
        .iter()
        .find(|beat| beat.host == host)
        .and_then(|beat| beat.transfer_fingerprint.as_deref())
        .and_then(|fingerprint| Fingerprint::from_str(fingerprint).ok());
    if expected == Some(session.peer_fingerprint()) {
        return Ok(());
    }
    Err(migration_error(
        ErrorCode::Conflict,
        format!("only host {host}, the migration's source, may drive it"),
    ))
}

/// Returns once the migration's record says it failed or was cancelled (written by the source,
/// or by a source that restarted): the destination stops waiting for a session that may take its
/// resume timeout to fail.
async fn ended_elsewhere(shared: &Shared, id: &str) -> AgentError {
    let mut interval = tokio::time::interval(DESTINATION_WATCH_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        match shared.records.migration(id).await {
            Ok(Some(migration))
                if matches!(
                    migration.record.phase,
                    MigrationPhase::Failed | MigrationPhase::Cancelled
                ) =>
            {
                return migration_error(
                    ErrorCode::Conflict,
                    format!(
                        "the source ended the migration: {}",
                        migration.record.message.unwrap_or_default()
                    ),
                );
            }
            Ok(None) => {
                return AgentError::MigrationNotFound {
                    reference: id.to_string(),
                };
            }
            _ => {}
        }
    }
}

/// Answers a source's request with the reason this host cannot take part (a notice when the
/// request was answered already), and closes the session.
async fn refuse(
    request: Option<novacron_transport::ControlRequest>,
    session: Arc<Session>,
    error: &AgentError,
) {
    match request {
        Some(request) => {
            let _ = request.respond(refusal(error).encode()).await;
        }
        None => give_up(&session, error).await,
    }
    crate::transfer::close_quietly(session).await;
}

fn refusal(error: &AgentError) -> Message {
    Message::Migration(MigrationControl::Refused {
        code: error.code(),
        message: error.to_string(),
    })
}

/// Tells the source why this host gives up a migration it answered (`Refused` as a notice).
async fn give_up(session: &Session, error: &AgentError) {
    let notice = refusal(error).encode();
    let _ = tokio::time::timeout(Duration::from_secs(2), session.control().notify(notice)).await;
}

/// The `Ready` to a `Begin`: the identities of the boot files this host holds.
fn ready(held: &[Arc<HeldFile>]) -> bytes::Bytes {
    let held_files = held
        .iter()
        .flat_map(|file| file.identities())
        .map(str::to_string)
        .collect();
    Message::Migration(MigrationControl::Ready { held_files }).encode()
}

/// The boot files a memory-only move's source may count on, when this host's own copy of the
/// store shows the migration as one it may take ([`serve_destination`] answers before its
/// QEMU starts); `None` otherwise (a disk to mirror, whose export must exist first, or a copy
/// of the store behind the source's last write), and the answer waits for the preparation.
async fn early_held_files(
    shared: &Shared,
    session: &Session,
    id: &str,
) -> Option<Vec<Arc<HeldFile>>> {
    let local = shared.records.local();
    // The `Begin` can come before the migration's record reaches this host's copy of the
    // store: on a session that kept its connections it follows the source's last write by half
    // a round trip, where a write's commit reaches a follower a round trip or more after it
    // started. Wait for it a little. (That last write, the `preparing` phase, may still be on
    // its way: `Early` takes `requested` too.)
    let deadline = Instant::now() + EARLY_RECORD_WAIT;
    while matches!(local.migration(id).await, Ok(None)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let checked = check_destination(shared, &local, Look::Early, session, id)
        .await
        .inspect_err(|error| tracing::debug!(migration = %id, %error, "no early answer: the checks wait for fresh reads"))
        .ok()?;
    if crate::storage::moves_disk(&checked.record) {
        return None;
    }
    Some(held_boot_files(shared, &checked.record).await)
}

/// How long a destination's early look waits for the migration's record to reach its copy of
/// the store (see [`early_held_files`]).
const EARLY_RECORD_WAIT: Duration = Duration::from_millis(150);

/// What a destination checked before it takes a migration.
struct Checked {
    migration: MigrationRecord,
    record: VmRecord,
    image: Option<novacron_types::ImageRecord>,
}

/// Which look a destination's check is (see [`check_destination`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Look {
    /// A guess from this host's own copy of the store, which may lag behind the source's
    /// last write: a migration still `requested` there passes (its source sends the `Begin`
    /// after it wrote `preparing`).
    Early,
    /// On fresh reads, before anything is made.
    Fresh,
}

/// Whether this host may take migration `id` from the session's peer: it is the migration's
/// destination, the peer its source, the migration is being prepared, the VM is its subject,
/// this host holds what the VM's disk needs and has room for its memory. Reads through
/// `records` (fresh, or this host's own copy for an early guess).
async fn check_destination(
    shared: &Shared,
    records: &Records,
    look: Look,
    session: &Session,
    id: &str,
) -> Result<Checked, AgentError> {
    let Some(Versioned {
        record: migration, ..
    }) = records.migration(id).await?
    else {
        return Err(AgentError::MigrationNotFound {
            reference: id.to_string(),
        });
    };
    if migration.destination != shared.config.host_name {
        return Err(migration_error(
            ErrorCode::InvalidArgument,
            format!(
                "migration {id} goes to host {}, not to this host ({})",
                migration.destination, shared.config.host_name
            ),
        ));
    }
    check_peer_is(records, session, &migration.source).await?;
    let startable = migration.phase == MigrationPhase::Preparing
        || (look == Look::Early && migration.phase == MigrationPhase::Requested);
    if !startable || migration.cancel_requested {
        return Err(migration_error(
            ErrorCode::Conflict,
            format!("migration {id} is {} and cannot start", migration.phase),
        ));
    }
    let Some(vm) = records.vm(&migration.vm).await? else {
        return Err(AgentError::VmNotFound {
            name: migration.vm.clone(),
        });
    };
    let record = vm.record;
    if record.migration.as_deref() != Some(id) || record.uuid != migration.vm_uuid {
        return Err(migration_error(
            ErrorCode::Conflict,
            format!("vm {} is not the subject of migration {id}", migration.vm),
        ));
    }
    let image = match &record.spec.image_id {
        None => None,
        Some(id) => {
            let image = records
                .image(id)
                .await?
                .ok_or_else(|| AgentError::ImageNotFound {
                    reference: id.clone(),
                })?;
            if record.spec.storage.is_some() {
                check_shared_disk(shared, &record, &image)?;
            } else if !shared.paths.image_file(&image.id, image.format).exists() {
                return Err(migration_error(
                    ErrorCode::Conflict,
                    format!(
                        "host {} does not hold image {} (the VM's base image); copy it there \
                         first (`novacron image push {} --to ...`)",
                        shared.config.host_name, image.name, image.name
                    ),
                ));
            }
            Some(image)
        }
    };
    let available = crate::resources::memory_available_bytes().unwrap_or(u64::MAX);
    if available < record.spec.memory_bytes {
        return Err(AgentError::InsufficientResources {
            what: "the migrated VM's memory",
            asked: novacron_types::ByteSize(record.spec.memory_bytes).to_string(),
            available: novacron_types::ByteSize(available).to_string(),
        });
    }
    Ok(Checked {
        migration,
        record,
        image,
    })
}

/// Checks the migration on fresh reads ([`check_destination`]; `fenced`: the records after a
/// read fence taken when the request came, then local reads) and makes the incoming VM.
/// `held`: the boot files the source was told of in an early `Ready`, else found here.
async fn prepare_destination(
    shared: &Arc<Shared>,
    session: &Session,
    id: &str,
    held: Option<Vec<Arc<HeldFile>>>,
    fenced: Result<Records, AgentError>,
) -> Result<PreparedDestination, AgentError> {
    let records = fenced?;
    let Checked {
        migration,
        record,
        image,
    } = check_destination(shared, &records, Look::Fresh, session, id).await?;
    let directory = shared.paths.vm_dir(&record.uuid);
    // The kernel and initrd are hashed and indexed (a first migration of a distribution
    // kernel: 0.1-0.3 s) while the VM's directory, disk and QEMU are made ready.
    let (held_files, made) = tokio::join!(
        async {
            match held {
                Some(held) => held,
                None => held_boot_files(shared, &record).await,
            }
        },
        make_incoming_vm(shared, &record, &migration, image.as_ref())
    );
    let (qemu, image_pages) = made?;
    let image_pages = image_pages.with_files(
        held_files
            .iter()
            .flat_map(|file| file.parts())
            .map(|(_, index)| index),
    );
    if migration.when_not_converging == ConvergencePolicy::PostCopy
        && let Err(error) = qemu
            .qmp()
            .execute(
                "migrate-set-capabilities",
                Some(json!({ "capabilities": [
                    { "capability": "postcopy-ram", "state": true },
                ]})),
            )
            .await
    {
        let _ = qemu.force_stop().await;
        let _ = tokio::fs::remove_dir_all(&directory).await;
        return Err(qmp_error(record.spec.name.as_str(), error));
    }
    if crate::storage::moves_disk(&record)
        && let Err(error) = export_disk(&qemu, &directory, &record.spec.name).await
    {
        let _ = qemu.force_stop().await;
        let _ = tokio::fs::remove_dir_all(&directory).await;
        return Err(error);
    }
    tracing::info!(vm = %record.spec.name, migration = %id, pid = qemu.pid(), "incoming qemu waits for the migration");
    Ok(PreparedDestination {
        migration,
        record,
        qemu,
        image_pages,
        held_files,
    })
}

/// The destination's VM directory, its disk (an overlay on the base image), the base image's
/// page index and the QEMU waiting for the stream (`-incoming`, paused). Removes the directory
/// again when a step fails.
async fn make_incoming_vm(
    shared: &Shared,
    record: &VmRecord,
    migration: &MigrationRecord,
    image: Option<&novacron_types::ImageRecord>,
) -> Result<(QemuVm, SharedImagePages), AgentError> {
    let directory = shared.paths.vm_dir(&record.uuid);
    if directory.exists() {
        // Left by an earlier attempt that this host could not clean up.
        remove_vm_directory(shared, record).await;
    }
    tokio::fs::create_dir_all(&directory)
        .await
        .map_err(|error| AgentError::io(format!("creating {}", directory.display()), error))?;
    let making = async {
        if crate::storage::moves_disk(record) {
            crate::vms::prepare_disk(shared, record, image).await?;
        }
        // The base image's blocks, which RAM pages may be sent as: the source assumes this
        // host holds them, so a failure here refuses the migration.
        let image_pages = match image {
            Some(image) => index_image_pages(shared, record, image, &directory).await?,
            None => SharedImagePages::default(),
        };
        let binaries = shared.hypervisor.binaries()?;
        let probe = shared.hypervisor.accelerator().await?;
        let incoming = directory.join("incoming.sock");
        let mut spec =
            crate::reconciler::launch_spec(shared, record, probe.accelerator)?.start_paused(true);
        spec.extra_arguments.extend([
            "-incoming".to_string(),
            format!("unix:{}", incoming.display()),
        ]);
        // A post-copy this host may have to resume after its own serve restarted.
        spec.recovery_monitor = migration.when_not_converging == ConvergencePolicy::PostCopy;
        let qemu = QemuVm::launch(binaries, &spec)
            .await
            .map_err(|error| AgentError::Qemu {
                name: record.spec.name.to_string(),
                source: error,
            })?;
        Ok((qemu, image_pages))
    };
    let made = making.await;
    if made.is_err() {
        let _ = tokio::fs::remove_dir_all(&directory).await;
    }
    made
}

/// A VM on shared storage moves onto the disk it runs on: this host must mount the storage and
/// find the VM's overlay and its base there (a host that names another file system so would
/// not).
fn check_shared_disk(
    shared: &Shared,
    record: &VmRecord,
    image: &novacron_types::ImageRecord,
) -> Result<(), AgentError> {
    let disk = crate::storage::vm_disk(shared, record)?;
    let base = crate::storage::base_image(shared, record, image)?;
    let Some(missing) = [&disk, &base].into_iter().find(|file| !file.exists()) else {
        return Ok(());
    };
    Err(migration_error(
        ErrorCode::Conflict,
        format!(
            "vm {}'s disk is not on shared storage {} as host {} mounts it (no {}): that \
             host's --shared-storage must name the same file system the source's does",
            record.spec.name,
            record.spec.storage.as_deref().unwrap_or_default(),
            shared.config.host_name,
            missing.display()
        ),
    ))
}

/// What [`prepare_destination`] made ready.
struct PreparedDestination {
    /// The migration as the destination checked it.
    migration: MigrationRecord,
    record: VmRecord,
    qemu: QemuVm,
    image_pages: SharedImagePages,
    /// The held files in `image_pages`, for the `Ready`.
    held_files: Vec<Arc<HeldFile>>,
}

/// How long a base image's page index stays in memory after a migration used it, so the next
/// move of a VM on the same image (an evacuation moves many) does not read the image again.
pub(crate) const IMAGE_PAGE_INDEX_KEEP: Duration = Duration::from_secs(600);

/// The 4 KiB page index of the VM's base image, which both hosts of a migration hold: shared
/// with any migration (memory or disk session) on this host using it now or in the last
/// [`IMAGE_PAGE_INDEX_KEEP`], else built.
async fn index_image_pages(
    shared: &Shared,
    record: &VmRecord,
    image: &novacron_types::ImageRecord,
    directory: &std::path::Path,
) -> Result<SharedImagePages, AgentError> {
    let index = shared
        .image_page_indexes
        .get_or_build(image.id.clone(), || {
            build_image_page_index(shared, record, image, directory)
        })
        .await?;
    Ok(SharedImagePages::new(Some(index)))
}

/// Indexes the 4 KiB blocks of `image`'s guest-visible content for the page codec (see
/// `novacron_migration::image_pages`): the index saved with the image in this host's image
/// store, else (a qcow2 with compressed clusters, or a VM on shared storage whose base this
/// host does not store) one of a raw copy in `directory`, unlinked once open so nothing stays
/// behind. Runs off the async threads.
async fn build_image_page_index(
    shared: &Shared,
    record: &VmRecord,
    image: &novacron_types::ImageRecord,
    directory: &std::path::Path,
) -> Result<Arc<ImagePageIndex>, AgentError> {
    let stored = shared.paths.image_file(&image.id, image.format);
    let path = if stored.exists() {
        if let Some(index) = crate::images::stored_page_index(shared, image).await? {
            return Ok(Arc::new(index));
        }
        stored
    } else {
        crate::storage::base_image(shared, record, image)?
    };
    let started = Instant::now();
    let (raw, temporary) = match image.format {
        novacron_types::ImageFormat::Raw => (path, false),
        novacron_types::ImageFormat::Qcow2 => {
            let raw = directory.join("image-pages.raw");
            let _ = tokio::fs::remove_file(&raw).await;
            shared
                .hypervisor
                .qemu_img()?
                .convert_to_raw(&path, novacron_qemu::ImageFormat::Qcow2, &raw)
                .await?;
            (raw, true)
        }
    };
    let opened = raw.clone();
    let index = tokio::task::spawn_blocking(move || ImagePageIndex::build(&opened))
        .await
        .map_err(|error| AgentError::io("indexing the base image", std::io::Error::other(error)))?;
    if temporary {
        let _ = tokio::fs::remove_file(&raw).await;
    }
    let index =
        index.map_err(|error| AgentError::io(format!("indexing {}", raw.display()), error))?;
    tracing::info!(
        image = %image.name,
        distinct_blocks = index.distinct_blocks(),
        seconds = started.elapsed().as_secs_f64(),
        "base image indexed for the migration's page codec"
    );
    Ok(Arc::new(index))
}

async fn receive_and_wait(
    shared: &Arc<Shared>,
    session: &Arc<Session>,
    migration: &MigrationRecord,
    record: &VmRecord,
    qemu: &QemuVm,
    image_pages: SharedImagePages,
    driving: &PostcopyIncoming<'_>,
) -> Result<(), AgentError> {
    let name = record.spec.name.to_string();
    let socket = shared.paths.vm_dir(&record.uuid).join("incoming.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match tokio::net::UnixStream::connect(&socket).await {
            Ok(stream) => break stream,
            Err(error) if Instant::now() < deadline => {
                tracing::debug!(%error, "incoming socket not ready");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => {
                return Err(AgentError::io(
                    format!("connecting to {}", socket.display()),
                    error,
                ));
            }
        }
    };
    let config = ProxyConfig {
        image_pages,
        ..ProxyConfig::default()
    };
    let id = migration.id.as_str();
    let postcopy = migration.when_not_converging == ConvergencePolicy::PostCopy;
    let link_wait = Duration::from_secs(migration.post_copy_link_wait_secs);
    let source = migration.source.clone();
    let receiving = {
        let session = session.clone();
        let config = config.clone();
        tokio::spawn(
            async move { receive_migration_stream_duplex(&session, stream, &config).await },
        )
    };
    let mut receiving = AbortOnDrop(receiving);
    // Precopy: the whole stream arrives, then QEMU has loaded it. Post-copy: QEMU holds the
    // device state and waits paused (`-S`) while pages still arrive; the source then commits
    // and this host runs the guest before the stream ends.
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let report = loop {
        tokio::select! {
            result = &mut receiving.0 => break Some(received(result)?),
            _ = poll.tick(), if postcopy => {
                if incoming_postcopy_running(qemu).await {
                    break None;
                }
            }
        }
    };
    let Some(report) = report else {
        tracing::info!(vm = %name, migration = %id, "post-copy: the device state is here; waiting for the commit");
        driving.activate(id);
        // From here the guest's memory depends on the link: a lost one is waited for (the
        // guest stalls on pages it lacks) rather than given up after the precopy timeout.
        session.set_resume_timeout(link_wait);
        notify_loaded(
            session,
            qemu,
            "post-copy: checked by the source at the end".into(),
            None,
        )
        .await?;
        let desired = await_commit_and_desired_power(session, shared, record).await?;
        resume_here(shared, qemu, record, id, desired).await;
        // The VM is this host's now. The rest of its memory comes in.
        let incoming = postcopy::Incoming {
            shared,
            qemu: Some(qemu),
            record,
            id,
            source: &source,
            link_wait,
            config: &config,
        };
        incoming.follow(Some((session.clone(), receiving))).await;
        return Ok(());
    };
    let checksum = format!(
        "{} bytes, blake3 stream digest {}",
        report.stream_bytes,
        blake3::Hash::from(report.stream_checksum).to_hex()
    );
    // QEMU loads as the stream arrives; it leaves `inmigrate` once the whole state is in.
    let loaded_by = Instant::now() + LOAD_TIMEOUT;
    loop {
        let status = qemu
            .qmp()
            .query_status()
            .await
            .map_err(|error| qmp_error(&name, error))?;
        if status.status != RunState::Inmigrate {
            break;
        }
        if Instant::now() > loaded_by {
            return Err(migration_error(
                ErrorCode::Internal,
                "qemu did not finish loading the migration stream within 60 s",
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(exit) = qemu.exit_status() {
        return Err(migration_error(
            ErrorCode::Internal,
            format!("the incoming qemu exited while loading: {exit}"),
        ));
    }
    notify_loaded(session, qemu, checksum, Some(codec_time(&report.timing))).await?;
    let desired = await_commit_and_desired_power(session, shared, record).await?;
    resume_here(shared, qemu, record, id, desired).await;
    Ok(())
}

/// What the destination's receiving task ended with.
fn received(
    result: Result<Result<ProxyReport, ProxyError>, tokio::task::JoinError>,
) -> Result<ProxyReport, AgentError> {
    result
        .map_err(|error| {
            migration_error(
                ErrorCode::Internal,
                format!("the receiving task failed: {error}"),
            )
        })?
        .map_err(|error| {
            migration_error(
                ErrorCode::Unavailable,
                format!(
                    "receiving the migration stream failed: {}",
                    crate::transfer::describe(&error)
                ),
            )
        })
}

/// Shows `message` in migration `id`'s record (`migration show`) while it is not finished; best
/// effort (a host cut off from the store says it in its log only).
async fn say_in_record(shared: &Shared, id: &str, message: &str) {
    let _ = shared
        .records
        .update_migration(id, |record| {
            record.message = Some(message.to_string());
            Ok(!record.phase.is_finished())
        })
        .await;
}

/// During post-copy, on either host: notices the migration session losing every connection to
/// the other host and getting one back. The session then waits up to the migration's
/// `post_copy_link_wait_secs` (set with [`Session::set_resume_timeout`]) instead of failing
/// after the precopy timeout: the guest on the destination stalls on pages it lacks meanwhile,
/// and resumes when the link is back.
struct PostcopyLinkWatch {
    peer: String,
    wait: Duration,
    /// Whole seconds without connections last said (`None`: connected).
    said_down: Option<u64>,
}

/// How often a link still down is said again.
const LINK_DOWN_REPEAT_SECS: u64 = 5;

impl PostcopyLinkWatch {
    fn new(peer: &str, wait: Duration) -> PostcopyLinkWatch {
        PostcopyLinkWatch {
            peer: peer.to_string(),
            wait,
            said_down: None,
        }
    }

    /// What to say about the link now, when that changed.
    fn check(&mut self, session: &Session) -> Option<String> {
        self.observe(session.stats().disconnected_for)
    }

    fn observe(&mut self, disconnected_for: Option<Duration>) -> Option<String> {
        let peer = &self.peer;
        match (disconnected_for, self.said_down) {
            (Some(down), said) => {
                let seconds = down.as_secs();
                if said.is_some_and(|said| seconds < said + LINK_DOWN_REPEAT_SECS) {
                    return None;
                }
                self.said_down = Some(seconds);
                Some(format!(
                    "post-copy: the link to host {peer} is down ({seconds} s); the guest waits for the \
                     pages it lacks; given up after {} s without the link (--post-copy-link-wait)",
                    self.wait.as_secs()
                ))
            }
            (None, Some(_)) => {
                self.said_down = None;
                Some(format!(
                    "post-copy: the link to host {peer} is back; the rest of the pages are coming"
                ))
            }
            (None, None) => None,
        }
    }
}

/// Lists a VM in [`crate::host::Shared::postcopy_incoming`] from [`PostcopyIncoming::activate`]
/// until dropped, while this process drives its incoming post-copy.
struct PostcopyIncoming<'a> {
    shared: &'a Shared,
    uuid: String,
    active: std::sync::atomic::AtomicBool,
}

impl<'a> PostcopyIncoming<'a> {
    fn new(shared: &'a Shared, uuid: &str) -> Self {
        Self {
            shared,
            uuid: uuid.to_string(),
            active: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// From the switch of migration `id` on.
    fn activate(&self, id: &str) {
        if let Ok(mut incoming) = self.shared.postcopy_incoming.lock() {
            incoming.insert(self.uuid.clone());
            self.active
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        // Outlives this process only if it dies during the post-copy, and then names the
        // migration to the next one: see `adopt_orphaned_postcopy`.
        let _ = std::fs::write(self.marker(), id.as_bytes());
    }

    fn marker(&self) -> std::path::PathBuf {
        postcopy_marker(self.shared, &self.uuid)
    }
}

/// The file in a VM's directory that says its QEMU is an incoming post-copy one, while the
/// migration drives it.
fn postcopy_marker(shared: &Shared, uuid: &str) -> std::path::PathBuf {
    shared.paths.vm_dir(uuid).join("postcopy-incoming")
}

impl PostcopyIncoming<'_> {
    fn is_active(&self) -> bool {
        self.active.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Kills an incoming QEMU whose post-copy broke. Not by QMP: a vCPU waiting for a page that
/// will never come can hold QEMU's main lock, and then its monitor does not answer.
async fn stop_incomplete(qemu: &QemuVm, name: &str) {
    if let Err(error) = qemu.kill() {
        tracing::warn!(vm = %name, %error, "killing the incomplete qemu");
    }
    if let Err(error) = qemu.force_stop().await {
        tracing::warn!(vm = %name, %error, "stopping the incomplete qemu");
    }
}

impl Drop for PostcopyIncoming<'_> {
    fn drop(&mut self) {
        if self.active.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = std::fs::remove_file(self.marker());
            if let Ok(mut incoming) = self.shared.postcopy_incoming.lock() {
                incoming.remove(&self.uuid);
            }
        }
    }
}

/// Whether this process drives the incoming post-copy of the VM `uuid` (its QEMU is the
/// migration's until the last page arrived).
pub(crate) fn drives_postcopy(shared: &Shared, uuid: &str) -> bool {
    shared
        .postcopy_incoming
        .lock()
        .map(|incoming| incoming.contains(uuid))
        .unwrap_or(false)
}

/// A QEMU left in post-copy by an earlier `serve` (its marker is there and no migration of this
/// process drives it) that [`adopt_orphaned_postcopy`] could not take over: its guest's memory
/// is incomplete for good, and its monitor may not even answer (a vCPU waiting for a page can
/// hold QEMU's main lock). It is killed without QMP, and the migration its marker names is
/// failed (so its source stops trying to resume it). Returns whether one was killed.
pub(crate) async fn stop_orphaned_postcopy(shared: &Shared, record: &VmRecord) -> bool {
    let marker = postcopy_marker(shared, &record.uuid);
    if drives_postcopy(shared, &record.uuid) || !marker.exists() {
        return false;
    }
    let Ok(uuid) = uuid::Uuid::parse_str(&record.uuid) else {
        return false;
    };
    let directory = shared.paths.vm_dir(&record.uuid);
    let killed = match QemuVm::kill_in(&directory, uuid).await {
        Ok(killed) => killed,
        Err(error) => {
            tracing::warn!(vm = %record.spec.name, %error, "killing the qemu left in post-copy");
            return false;
        }
    };
    if let Ok(id) = std::fs::read_to_string(&marker)
        && !id.trim().is_empty()
    {
        let host = &shared.config.host_name;
        let message = format!(
            "post-copy failed after the VM moved to host {host}: its novacron serve restarted \
             during the copy and could not take the incoming QEMU over (no process held its \
             recovery monitor); the guest's running state is lost; the VM fails here as after a \
             crash (restarted by its restart policy)"
        );
        let _ = shared
            .records
            .update_migration(id.trim(), |migration| {
                if migration.phase != MigrationPhase::PostCopy {
                    return Ok(false);
                }
                finish(
                    migration,
                    MigrationPhase::Failed,
                    Some(ErrorCode::Unavailable),
                    &message,
                );
                Ok(true)
            })
            .await;
    }
    let _ = std::fs::remove_file(&marker);
    killed
}

/// Lists an incoming migration's [`DeliveredPages`] in [`Shared::delivered_pages`] until
/// dropped, for its disk session to find.
struct DeliveredRegistration<'a> {
    shared: &'a Shared,
    id: String,
}

impl<'a> DeliveredRegistration<'a> {
    fn new(shared: &'a Shared, id: &str, delivered: Arc<DeliveredPages>) -> Self {
        if let Ok(mut registered) = shared.delivered_pages.lock() {
            registered.insert(id.to_string(), delivered);
        }
        Self {
            shared,
            id: id.to_string(),
        }
    }
}

impl Drop for DeliveredRegistration<'_> {
    fn drop(&mut self) {
        if let Ok(mut registered) = self.shared.delivered_pages.lock() {
            registered.remove(&self.id);
        }
    }
}

/// Aborts a task when dropped (the destination's receiving task, when the migration ends
/// elsewhere).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A proxy side's codec timing as the migration record keeps it.
pub(super) fn codec_time(timing: &novacron_migration::CodecTiming) -> CodecTime {
    let milliseconds = |duration: Duration| u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    CodecTime {
        working_ms: milliseconds(timing.working),
        waiting_for_input_ms: milliseconds(timing.waiting_for_input),
        waiting_for_output_ms: milliseconds(timing.waiting_for_output),
    }
}

/// Whether the incoming QEMU switched to post-copy and holds the device state (it left
/// `inmigrate` while its migration is still `postcopy-active`).
async fn incoming_postcopy_running(qemu: &QemuVm) -> bool {
    let Ok(info) = qemu.qmp().query_migrate().await else {
        return false;
    };
    if info["status"].as_str() != Some("postcopy-active") {
        return false;
    }
    matches!(qemu.qmp().query_status().await, Ok(status) if status.status != RunState::Inmigrate)
}

async fn notify_loaded(
    session: &Session,
    qemu: &QemuVm,
    checksum: String,
    codec: Option<CodecTime>,
) -> Result<(), AgentError> {
    let loaded = Message::Migration(MigrationControl::Loaded {
        pid: u32::try_from(qemu.pid()).ok(),
        stream_checksum: checksum,
        codec,
    });
    session
        .control()
        .notify(loaded.encode())
        .await
        .map_err(|error| {
            migration_error(
                ErrorCode::Unavailable,
                format!("telling the source the stream loaded: {error}"),
            )
        })
}

/// The commit notice, or the source's abort.
async fn await_commit(session: &Session) -> Result<(), AgentError> {
    let control = session.control();
    tokio::time::timeout(COMMIT_WAIT, async {
        loop {
            match control.next_incoming().await {
                Ok(Some(ControlIncoming::Notification(body))) => match Message::decode(&body) {
                    Ok(Message::Migration(MigrationControl::Commit)) => return Ok(()),
                    Ok(Message::Migration(MigrationControl::Abort { message })) => {
                        return Err(migration_error(
                            ErrorCode::Conflict,
                            format!("the source abandoned the migration: {message}"),
                        ));
                    }
                    _ => {}
                },
                Ok(Some(ControlIncoming::Request(_))) => {}
                Ok(None) => {
                    return Err(migration_error(
                        ErrorCode::Unavailable,
                        "the source closed the session before the commit",
                    ));
                }
                Err(error) => {
                    return Err(migration_error(
                        ErrorCode::Unavailable,
                        format!("the session failed before the commit: {error}"),
                    ));
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        Err(migration_error(
            ErrorCode::Unavailable,
            "no commit from the source within 30 s",
        ))
    })
}

/// Exports the incoming QEMU's disk over NBD on a unix socket in the VM's directory, writable,
/// for the source's block mirror (QEMU activates the image for it).
async fn export_disk(
    qemu: &QemuVm,
    directory: &std::path::Path,
    name: &novacron_types::VmName,
) -> Result<(), AgentError> {
    let socket = directory.join("nbd.sock");
    qemu.qmp()
        .execute(
            "nbd-server-start",
            Some(json!({
                "addr": { "type": "unix", "data": { "path": socket.display().to_string() } }
            })),
        )
        .await
        .map_err(|error| qmp_error(name.as_str(), error))?;
    qemu.qmp()
        .execute(
            "block-export-add",
            Some(json!({
                "type": "nbd",
                "id": NBD_EXPORT_ID,
                "node-name": DISK_NODE,
                "writable": true,
            })),
        )
        .await
        .map_err(|error| qmp_error(name.as_str(), error))?;
    Ok(())
}

/// Stops the NBD export before the guest runs here (nothing but the guest may write its disk).
async fn close_disk_export(qemu: &QemuVm) {
    let _ = qemu
        .qmp()
        .execute(
            "block-export-del",
            Some(json!({ "id": NBD_EXPORT_ID, "mode": "hard" })),
        )
        .await;
    let _ = qemu.qmp().execute("nbd-server-stop", None).await;
}

/// Answers the source's second session of a migration with a disk: connects it to the incoming
/// QEMU's NBD export and carries NBD both ways until either side ends.
pub(crate) async fn serve_destination_disk(
    service: Arc<TransferService>,
    session: Arc<Session>,
    request: novacron_transport::ControlRequest,
    id: String,
) {
    let shared = service.shared().clone();
    let connected = async {
        let migration = shared
            .records
            .migration(&id)
            .await?
            .ok_or_else(|| AgentError::MigrationNotFound {
                reference: id.clone(),
            })?
            .record;
        if migration.destination != shared.config.host_name || migration.phase.is_finished() {
            return Err(migration_error(
                ErrorCode::Conflict,
                format!("migration {id} does not bring a disk to this host now"),
            ));
        }
        check_peer_is(&shared.records, &session, &migration.source).await?;
        // The index the incoming migration built before answering Ready (shared, not rebuilt).
        let directory = shared.paths.vm_dir(&migration.vm_uuid);
        let record = shared
            .records
            .vm(&migration.vm)
            .await?
            .map(|vm| vm.record)
            .filter(crate::storage::moves_disk);
        let Some((record, image_id)) = record.and_then(|record| {
            let image_id = record.spec.image_id.clone()?;
            Some((record, image_id))
        }) else {
            return Err(migration_error(
                ErrorCode::Conflict,
                format!("vm {} has no local disk to mirror", migration.vm),
            ));
        };
        let image_pages = match shared.records.image(&image_id).await? {
            Some(image) => index_image_pages(&shared, &record, &image, &directory).await?,
            None => SharedImagePages::default(),
        };
        // The incoming migration's record of delivered blocks: its memory session reads them.
        let delivered = shared
            .delivered_pages
            .lock()
            .ok()
            .and_then(|registered| registered.get(&id).cloned())
            .ok_or_else(|| {
                migration_error(
                    ErrorCode::Conflict,
                    format!("migration {id} is not being received on this host"),
                )
            })?;
        let image_pages = image_pages.with_delivered(delivered);
        let socket = directory.join("nbd.sock");
        let stream = tokio::net::UnixStream::connect(&socket)
            .await
            .map_err(|error| {
                AgentError::io(format!("connecting to {}", socket.display()), error)
            })?;
        Ok((stream, image_pages))
    }
    .await;
    let (stream, image_pages) = match connected {
        Ok(connected) => connected,
        Err(error) => {
            tracing::warn!(migration = %id, %error, "disk session refused");
            refuse(Some(request), session, &error).await;
            return;
        }
    };
    if request
        .respond(Message::Migration(MigrationControl::Ready { held_files: vec![] }).encode())
        .await
        .is_err()
    {
        return;
    }
    match receive_migration_stream_duplex(&session, stream, &disk_proxy_config(image_pages)).await {
        Ok(report) => tracing::info!(migration = %id, nbd_bytes = report.stream_bytes,
            wire_bytes = report.message_bytes, "disk mirror connection received and verified"),
        Err(error) => tracing::debug!(migration = %id, %error, "disk session ended"),
    }
    crate::transfer::close_quietly(session).await;
}

/// The VM's desired power as the store has it (as the moved record had it when the store
/// cannot say).
async fn desired_power(shared: &Shared, record: &VmRecord) -> DesiredPower {
    match shared.records.vm(record.spec.name.as_str()).await {
        Ok(Some(vm)) => vm.record.desired,
        _ => record.desired,
    }
}

/// Waits for the source's commit, reading the VM's desired power meanwhile: the read's round
/// trip (to the region's leader) is then not part of the guest's pause. A change of the desired
/// power after this read is the reconciler's to apply, as any other. A commit that fails ends
/// the wait at once, whatever the read is doing.
async fn await_commit_and_desired_power(
    session: &Session,
    shared: &Shared,
    record: &VmRecord,
) -> Result<DesiredPower, AgentError> {
    let commit = await_commit(session);
    let desired = desired_power(shared, record);
    tokio::pin!(commit, desired);
    tokio::select! {
        committed = &mut commit => {
            committed?;
            Ok(desired.await)
        }
        desired = &mut desired => {
            commit.await?;
            Ok(desired)
        }
    }
}

/// The VM is this host's: runs the guest (`desired`: running; it stays paused, or a cold move's
/// QEMU quits, otherwise) and records when it resumed.
async fn resume_here(
    shared: &Shared,
    qemu: &QemuVm,
    record: &VmRecord,
    id: &str,
    desired: DesiredPower,
) {
    if crate::storage::moves_disk(record) {
        close_disk_export(qemu).await;
    }
    let mut events = qemu.subscribe_events();
    match desired {
        DesiredPower::Running => {}
        DesiredPower::Paused => return,
        DesiredPower::Stopped => {
            // A cold move: the guest never ran in this QEMU; it only carried the disk here.
            if let Err(error) = qemu.force_stop().await {
                tracing::warn!(vm = %record.spec.name, %error, "quitting the qemu of a cold move; the reconciler stops it");
            }
            return;
        }
    }
    if let Err(error) = qemu.qmp().cont().await {
        tracing::warn!(vm = %record.spec.name, %error, "cont after migration failed; the reconciler retries");
        return;
    }
    let resumed = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(event) = events.recv().await {
            if event.event == "RESUME" {
                return Some(event_unix_ms(&event));
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    if let Some(at) = resumed {
        let _ = shared
            .records
            .update_migration(id, |migration| {
                migration.resumed_at_ms = Some(at);
                Ok(true)
            })
            .await;
    }
}

/// After the session failed on the destination: asks the store whether the VM became ours (a
/// commit whose notice was lost). True when it did (the guest is resumed here).
async fn settle_after_failure(
    shared: &Arc<Shared>,
    record: &VmRecord,
    qemu: &QemuVm,
    id: &str,
) -> bool {
    let give_up = Instant::now() + Duration::from_secs(600);
    loop {
        let vm = shared.records.vm(record.spec.name.as_str()).await;
        let migration = shared.records.migration(id).await;
        match (vm, migration) {
            (Ok(Some(vm)), _)
                if vm.record.status.host == shared.config.host_name
                    && vm.record.uuid == record.uuid =>
            {
                resume_here(shared, qemu, record, id, vm.record.desired).await;
                return true;
            }
            (Ok(_), Ok(Some(migration))) if migration.record.phase.is_finished() => return false,
            (Ok(None), _) | (Ok(_), Ok(None)) => return false,
            _ if Instant::now() > give_up => return false,
            _ => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

async fn discard_incoming(shared: &Shared, record: &VmRecord, qemu: QemuVm) {
    if let Err(error) = qemu.force_stop().await {
        tracing::warn!(vm = %record.spec.name, %error, "stopping the incoming qemu");
    }
    let directory = shared.paths.vm_dir(&record.uuid);
    let _ = tokio::fs::remove_dir_all(&directory).await;
}

/// Kills a QEMU left in a VM's directory by an earlier attempt, and removes the directory.
async fn remove_vm_directory(shared: &Shared, record: &VmRecord) {
    let directory = shared.paths.vm_dir(&record.uuid);
    if let Ok(uuid) = uuid::Uuid::parse_str(&record.uuid)
        && let Ok(Some(qemu)) = QemuVm::attach(&directory, uuid).await
    {
        let _ = qemu.force_stop().await;
    }
    let _ = tokio::fs::remove_dir_all(&directory).await;
}

/// Live migrations (`novacron vm migrate`, `novacron migration ...`).
impl crate::Host {
    /// Starts moving a VM to another host of the region (`to`, or placement's choice). Returns
    /// the new migration; its record shows the progress.
    pub async fn migrate_vm(
        &self,
        name: &str,
        migrate: MigrateVmRequest,
    ) -> Result<MigrationRecord, AgentError> {
        request(&self.shared, name, migrate).await
    }

    /// Cancels the migration of a VM; the VM stays on its source host.
    pub async fn cancel_migration(&self, name: &str) -> Result<MigrationRecord, AgentError> {
        cancel(&self.shared, name).await
    }

    pub async fn list_migrations(&self) -> Result<Vec<MigrationRecord>, AgentError> {
        list(&self.shared).await
    }

    /// A migration by id, or the latest one of a VM by the VM's name.
    pub async fn get_migration(&self, reference: &str) -> Result<MigrationRecord, AgentError> {
        get(&self.shared, reference).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_history_keeps_the_newest_finished_migrations_and_every_unfinished_one() {
        let record = |index: usize, phase: MigrationPhase| MigrationRecord {
            format_version: RECORD_FORMAT_VERSION,
            id: format!("m{index:05}"),
            vm: "vm".into(),
            vm_uuid: String::new(),
            source: "a".into(),
            destination: "b".into(),
            placement: None,
            phase,
            downtime_limit_ms: 300,
            timeout_secs: 600,
            when_not_converging: Default::default(),
            post_copy_link_wait_secs: 60,
            cancel_requested: false,
            created_at: index as u64,
            finished_at: phase.is_finished().then_some(index as u64 + 1),
            message: None,
            error_code: None,
            progress: MigrationProgress::default(),
            stream_checksum: None,
            stopped_at_ms: None,
            resumed_at_ms: None,
            total_seconds: None,
            memory_pipeline: None,
        };
        let mut migrations: Vec<MigrationRecord> = (0..MIGRATION_HISTORY + 5)
            .map(|index| record(index, MigrationPhase::Completed))
            .collect();
        // Old but unfinished (a post-copy still running): never forgotten.
        migrations.push(record(MIGRATION_HISTORY + 5, MigrationPhase::PostCopy));
        migrations[1].created_at = 0;
        migrations[1].phase = MigrationPhase::Memory;
        migrations[1].finished_at = None;
        let forgotten = beyond_history(&migrations);
        assert_eq!(forgotten, ["m00004", "m00003", "m00002", "m00000"]);
        assert!(beyond_history(&migrations[..MIGRATION_HISTORY]).is_empty());
    }

    #[test]
    fn the_post_copy_link_watch_says_a_loss_its_duration_and_the_return() {
        let mut watch = PostcopyLinkWatch::new("host-0", Duration::from_secs(300));
        assert_eq!(watch.observe(None), None);
        let lost = watch.observe(Some(Duration::from_millis(1200))).unwrap();
        assert!(lost.contains("host host-0 is down (1 s)"), "{lost}");
        assert!(
            lost.contains("waits for the pages it lacks; given up after 300 s"),
            "{lost}"
        );
        assert_eq!(watch.observe(Some(Duration::from_secs(5))), None);
        let still = watch.observe(Some(Duration::from_secs(6))).unwrap();
        assert!(still.contains("down (6 s)"), "{still}");
        assert_eq!(watch.observe(Some(Duration::from_secs(10))), None);
        let back = watch.observe(None).unwrap();
        assert!(back.contains("is back"), "{back}");
        assert_eq!(watch.observe(None), None);
    }
}
