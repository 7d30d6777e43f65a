//! The reconciler: converges QEMU on this host to the VM records in the store.
//!
//! One supervisor watches `vms/` and keeps one actor task per VM; an actor owns that VM's QEMU
//! handle and serializes everything done to it, so VMs never wait for each other. An actor's
//! loop reads the record, takes one step towards it (launch, pause, stop, restart, delete,
//! record an unexpected exit), writes the observed status back (compare-and-swap) and waits for
//! a change of the record, an exit of QEMU or a timer. Every step is idempotent: after a crash of
//! `serve`, the new actor re-attaches to a running QEMU, finishes a half-made create and carries
//! on.

use crate::AgentError;
use crate::host::{Shared, to_record_accelerator};
use crate::records::VM_PREFIX;
use novacron_qemu::{
    DirectKernelBoot, ImageFormat, LaunchSpec, QemuExit, QemuExitReason, QemuVm, RunState,
};
use novacron_store::Consistency;
use novacron_types::{DesiredPower, MigrationRecord, RestartPolicy, VmRecord, VmState, unix_now};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Every actor looks at its record at least this often, even without a change.
const RESYNC_INTERVAL: Duration = Duration::from_secs(5);
/// Longest wait between restarts of a crashing VM.
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(30);
/// How long the first pass waits for the region's store (the leader) before it reconciles
/// this host's VMs without the start-up sweep.
const STARTUP_STORE_WAIT: Duration = Duration::from_secs(60);

struct ActorHandle {
    wake: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

pub(crate) async fn run(shared: Arc<Shared>) {
    let mut actors: HashMap<String, ActorHandle> = HashMap::new();
    let mut first_pass = true;
    loop {
        let listing = match shared
            .records
            .store()
            .list(VM_PREFIX, Consistency::Local)
            .await
        {
            Ok(listing) => listing,
            Err(error) => {
                tracing::warn!(%error, "reconciler cannot list vms; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let names: Vec<String> = listing
            .items
            .iter()
            .map(|item| item.key.trim_start_matches(VM_PREFIX).to_string())
            .collect();
        if first_pass {
            // Listed before the sweep, which would remove their source QEMU. Both wait for the
            // store until one deadline.
            let deadline = Instant::now() + STARTUP_STORE_WAIT;
            if let Some(postcopy_sources) =
                crate::migration::postcopy_sourced_here(&shared, deadline.into_std()).await
            {
                sweep_orphans(&shared, &postcopy_sources, deadline).await;
                tokio::spawn(crate::migration::resume_postcopy_sourced_here(
                    shared.clone(),
                    postcopy_sources,
                ));
            }
        }
        for name in &names {
            ensure_actor(&shared, &mut actors, name, first_pass);
        }
        first_pass = false;
        let mut watcher = match shared
            .records
            .store()
            .watch(VM_PREFIX, listing.revision + 1)
        {
            Ok(watcher) => watcher,
            Err(error) => {
                tracing::warn!(%error, "reconciler cannot watch vms; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut resync = tokio::time::interval(RESYNC_INTERVAL);
        loop {
            tokio::select! {
                change = watcher.next() => match change {
                    Ok(change) => {
                        let name = change.key().trim_start_matches(VM_PREFIX).to_string();
                        ensure_actor(&shared, &mut actors, &name, false);
                    }
                    Err(error) => {
                        tracing::info!(%error, "reconciler watch ended; re-listing");
                        break;
                    }
                },
                _ = resync.tick() => {
                    actors.retain(|_, actor| !actor.task.is_finished());
                    for actor in actors.values() {
                        actor.wake.notify_one();
                    }
                }
            }
        }
    }
}

fn ensure_actor(
    shared: &Arc<Shared>,
    actors: &mut HashMap<String, ActorHandle>,
    name: &str,
    recovering: bool,
) {
    if let Some(actor) = actors.get(name)
        && !actor.task.is_finished()
    {
        actor.wake.notify_one();
        return;
    }
    let wake = Arc::new(Notify::new());
    let actor = VmActor {
        shared: shared.clone(),
        name: name.to_string(),
        wake: wake.clone(),
        qemu: None,
        recovering,
        attached_once: false,
        restart_not_before: None,
    };
    let task = tokio::spawn(actor.run());
    actors.insert(name.to_string(), ActorHandle { wake, task });
}

/// At start-up: VM directories that no record names (a delete interrupted after the record was
/// removed) are torn down, killing a QEMU still running there. The records are read from the
/// region's leader (this host's copy may lag: a VM that moved here just before this process
/// started would look like another host's); without an answer by `deadline` nothing is swept.
async fn sweep_orphans(shared: &Shared, postcopy_sources: &[MigrationRecord], deadline: Instant) {
    let records = loop {
        match shared.records.vms().await {
            Ok(current) => break current,
            Err(error) if Instant::now() < deadline => {
                tracing::debug!(%error, "cannot list vms for the start-up sweep yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => {
                tracing::warn!(%error, "the store did not list the vms in time; vm directories are not swept");
                return;
            }
        }
    };
    // A directory of a VM that another host owns is left from a migration (a source that
    // stopped before removing it, or a destination whose incoming QEMU lost its migration when
    // this process ended): the owner runs the VM, so this copy goes. Except the source of a
    // post-copy that switched: its QEMU holds pages the owner lacks, and the copy resumes.
    let known: HashSet<String> = records
        .into_iter()
        .map(|versioned| versioned.record)
        .filter(|record| {
            shared.region.is_none()
                || record.status.host == shared.config.host_name
                || postcopy_sources
                    .iter()
                    .any(|migration| migration.vm_uuid == record.uuid)
        })
        .map(|record| record.uuid.replace('-', ""))
        .collect();
    let Ok(mut entries) = tokio::fs::read_dir(shared.paths.vms_dir()).await else {
        return;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let directory_name = entry.file_name().to_string_lossy().to_string();
        if known.contains(&directory_name) {
            continue;
        }
        tracing::warn!(directory = %entry.path().display(), "removing vm directory without a record");
        // Killed without QMP: a QEMU whose monitor does not answer (one left in post-copy,
        // say) would otherwise outlive its directory.
        if let Ok(uuid) = uuid::Uuid::parse_str(&directory_name)
            && let Err(error) = QemuVm::kill_in(&entry.path(), uuid).await
        {
            tracing::warn!(directory = %entry.path().display(), %error, "killing the qemu of a vm directory without a record");
        }
        let _ = tokio::fs::remove_dir_all(entry.path()).await;
    }
}

/// How QEMU is started for a VM on this host (a migration's incoming QEMU uses the same, so the
/// two machines match).
pub(crate) fn launch_spec(
    shared: &Shared,
    record: &VmRecord,
    accelerator: novacron_qemu::Accelerator,
) -> Result<LaunchSpec, AgentError> {
    let uuid = uuid::Uuid::parse_str(&record.uuid).map_err(|error| AgentError::CorruptRecord {
        key: record.spec.name.to_string(),
        reason: error.to_string(),
    })?;
    let mut spec = LaunchSpec::new(
        record.spec.name.as_str(),
        uuid,
        shared.paths.vm_dir(&record.uuid),
    )
    .cpus(record.spec.cpus)
    .memory_mib(record.spec.memory_bytes >> 20)
    .accelerator(accelerator);
    if record.spec.image_id.is_some() {
        // The overlay is qcow2 whatever the image's format. O_DIRECT where the file systems of
        // the overlay and its base allow it (a missing base fails the launch anyway).
        let overlay = crate::storage::vm_disk(shared, record)?;
        let direct_io = match crate::storage::existing_base_image(shared, record)? {
            Some(base) => novacron_qemu::supports_direct_io(&[&overlay, &base]),
            None => false,
        };
        spec = spec
            .disk(overlay, ImageFormat::Qcow2)
            .disk_direct_io(direct_io);
    }
    if let Some(kernel) = &record.spec.kernel {
        spec = spec.kernel(DirectKernelBoot {
            kernel: kernel.clone(),
            initrd: record.spec.initrd.clone(),
            cmdline: record.spec.cmdline.clone(),
        });
    }
    Ok(spec)
}

enum Next {
    /// Look at the record again at once.
    Again,
    /// Wait for a change, an exit or the timer.
    Wait(Option<Instant>),
    /// The VM is gone; the actor ends.
    Done,
}

struct VmActor {
    shared: Arc<Shared>,
    name: String,
    wake: Arc<Notify>,
    qemu: Option<QemuVm>,
    /// This actor started with `serve`: it may finish work a previous process left half-done.
    recovering: bool,
    attached_once: bool,
    restart_not_before: Option<Instant>,
}

impl VmActor {
    async fn run(mut self) {
        loop {
            let next = match self.shared.records.vm(&self.name).await {
                Ok(None) => Next::Done,
                Ok(Some(current)) => match self.step(current.record, current.mod_revision).await {
                    Ok(next) => next,
                    Err(error) => {
                        tracing::warn!(vm = %self.name, %error, "reconcile step failed; will retry");
                        Next::Wait(Some(Instant::now() + Duration::from_secs(2)))
                    }
                },
                Err(error) => {
                    tracing::warn!(vm = %self.name, %error, "cannot read vm record; will retry");
                    Next::Wait(Some(Instant::now() + Duration::from_secs(1)))
                }
            };
            let deadline = match next {
                Next::Done => return,
                Next::Again => continue,
                Next::Wait(deadline) => deadline,
            };
            let mut exit = self.qemu.as_ref().map(|qemu| qemu.exit_receiver());
            let wait_for_exit = async {
                match exit.as_mut() {
                    Some(exit) => {
                        let _ = exit.wait_for(Option::is_some).await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let timer = async {
                match deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = self.wake.notified() => {},
                () = wait_for_exit => {},
                () = timer => {},
            }
        }
    }

    async fn step(&mut self, record: VmRecord, mod_revision: u64) -> Result<Next, AgentError> {
        // In a region every host sees every VM; each runs only those assigned to it. (A VM
        // moved away while running here is migration's business, issue 5: it is left alone.)
        if record.status.host != self.shared.config.host_name {
            return Ok(Next::Done);
        }
        if !self.attached_once {
            if crate::migration::drives_postcopy(&self.shared, &record.uuid)
                || crate::migration::adopt_orphaned_postcopy(&self.shared, &record).await
            {
                // Its incoming post-copy runs here (or ran with an earlier serve, and its
                // source may resume it): the QEMU is the migration's (which resumed the guest)
                // until the last page arrived or the copy failed.
                return Ok(Next::Wait(Some(
                    Instant::now() + Duration::from_millis(500),
                )));
            }
            // Only once it succeeded: a failed first look (a disk that could not be made yet)
            // is tried again at the next step.
            let next = self.recover(&record).await?;
            self.attached_once = true;
            if let Some(next) = next {
                return Ok(next);
            }
        }
        if record.deletion_requested {
            return self.delete(&record, mod_revision).await;
        }
        if let Some(id) = record.migration.clone() {
            return self.migrate_out(&record, &id).await;
        }
        if let Some(qemu) = &self.qemu
            && let Some(exit) = qemu.exit_status()
        {
            self.qemu = None;
            self.record_unexpected_exit(&record, &exit).await?;
            return Ok(Next::Again);
        }
        match record.status.state {
            // The API is still creating the disk; it flips the state when done.
            VmState::Creating => return Ok(Next::Wait(None)),
            VmState::Deleting => return Ok(Next::Wait(None)),
            _ => {}
        }
        match (record.desired, self.qemu.is_some()) {
            (DesiredPower::Running | DesiredPower::Paused, false) => self.launch(&record).await,
            (DesiredPower::Running, true)
                if record.restart_generation > record.status.observed_restart_generation =>
            {
                self.restart(&record).await
            }
            (DesiredPower::Running, true) => self.ensure_run_state(&record, false).await,
            (DesiredPower::Paused, true) => self.ensure_run_state(&record, true).await,
            (DesiredPower::Stopped, true) => self.stop(&record).await,
            (DesiredPower::Stopped, false) => {
                if !matches!(record.status.state, VmState::Stopped | VmState::Failed) {
                    self.set_state(VmState::Stopped, None, |_| {}).await?;
                }
                Ok(Next::Wait(None))
            }
        }
    }

    /// First look after `serve` started: re-attach to a QEMU left running, notice one that died
    /// while nobody watched, finish a create that a crash interrupted.
    async fn recover(&mut self, record: &VmRecord) -> Result<Option<Next>, AgentError> {
        let directory = self.shared.paths.vm_dir(&record.uuid);
        let uuid =
            uuid::Uuid::parse_str(&record.uuid).map_err(|error| AgentError::CorruptRecord {
                key: self.name.clone(),
                reason: error.to_string(),
            })?;
        if crate::migration::stop_orphaned_postcopy(&self.shared, record).await {
            // Its post-copy stream ended with an earlier `serve`: the guest would hang on the
            // first page it lacks. It was killed; the VM is handled as crashed below.
            tracing::warn!(vm = %self.name, "qemu left in post-copy without its stream; killed it");
        }
        match QemuVm::attach(&directory, uuid).await {
            Ok(Some(qemu)) => {
                tracing::info!(vm = %self.name, pid = qemu.pid(), "re-attached to running qemu");
                // A holder of its recovery monitor left by a serve killed at the end of a
                // migration: no post-copy needs it now (one this process took over is driven,
                // and not looked at here), and QEMU would keep the events it sends there.
                if let Some(held) = novacron_qemu::HeldMonitor::find(
                    &novacron_qemu::RunDirectory::new(&directory).recovery_socket(),
                ) {
                    held.release();
                }
                self.qemu = Some(qemu);
                return Ok(None);
            }
            Ok(None) => {}
            Err(error) => tracing::warn!(vm = %self.name, %error, "cannot re-attach to qemu"),
        }
        if record.status.state.has_process() && !record.deletion_requested {
            let exit = QemuExit {
                reason: QemuExitReason::Vanished,
                qemu_log_tail: String::new(),
                console_log_tail: String::new(),
            };
            self.record_unexpected_exit(record, &exit).await?;
            return Ok(Some(Next::Again));
        }
        if record.status.state == VmState::Creating
            && (self.recovering || record.disk_by_assigned_host)
            && !record.deletion_requested
        {
            tracing::info!(vm = %self.name, "making the disk of a vm created for this host, or finishing a create interrupted by a restart");
            let image = match &record.spec.image_id {
                Some(id) => self.shared.records.image(id).await?,
                None => None,
            };
            if let Some(image) = &image
                && self.shared.region.is_some()
                && !self
                    .shared
                    .paths
                    .image_file(&image.id, image.format)
                    .exists()
            {
                // One status write per outcome: the retry after a failure keeps the failure's
                // reason (a write would wake this actor at once instead of after the back-off).
                let fetching = format!("fetching image {} from another host", image.name);
                if !record
                    .status
                    .reason
                    .as_deref()
                    .is_some_and(|reason| reason.starts_with(&fetching))
                {
                    self.set_state(VmState::Creating, Some(fetching.clone()), |_| {})
                        .await?;
                }
                if let Err(error) = crate::region::fetch_image(&self.shared, image).await {
                    let reason = format!("{fetching}: {error}; retrying");
                    self.set_state(VmState::Creating, Some(reason), |_| {})
                        .await?;
                    return Err(error);
                }
            }
            crate::vms::prepare_disk(&self.shared, record, image.as_ref()).await?;
            self.set_state(VmState::Stopped, None, |_| {}).await?;
            return Ok(Some(Next::Again));
        }
        Ok(None)
    }

    async fn launch(&mut self, record: &VmRecord) -> Result<Next, AgentError> {
        if let Some(not_before) = self.restart_not_before
            && Instant::now() < not_before
        {
            return Ok(Next::Wait(Some(not_before)));
        }
        self.restart_not_before = None;
        let shared = self.shared.clone();
        let binaries = shared.hypervisor.binaries()?;
        let probe = shared.hypervisor.accelerator().await?;
        let spec = launch_spec(&shared, record, probe.accelerator)?
            .start_paused(record.desired == DesiredPower::Paused);
        self.set_state(VmState::Starting, None, |_| {}).await?;
        shared.metrics.qemu_launches.inc();
        match QemuVm::launch(binaries, &spec).await {
            Ok(qemu) => {
                let pid = u32::try_from(qemu.pid()).ok();
                let accelerator = to_record_accelerator(qemu.accelerator());
                // One line: the probe's reason may carry QEMU's multi-line stderr.
                let reason = probe.reason.lines().next().unwrap_or_default().to_string();
                self.qemu = Some(qemu);
                let state = if record.desired == DesiredPower::Paused {
                    VmState::Paused
                } else {
                    VmState::Running
                };
                let generation = record.restart_generation;
                self.set_state(state, None, |record| {
                    record.status.pid = pid;
                    record.status.accelerator = Some(accelerator);
                    record.status.accelerator_reason = Some(reason.clone());
                    record.status.observed_restart_generation = generation;
                })
                .await?;
                tracing::info!(vm = %self.name, pid, "vm started");
                Ok(Next::Wait(None))
            }
            Err(error) => {
                let reason = format!("qemu failed to start: {error}");
                tracing::warn!(vm = %self.name, %reason, "vm start failed");
                self.set_state(VmState::Failed, Some(reason), |record| {
                    record.desired = DesiredPower::Stopped;
                    record.status.pid = None;
                })
                .await?;
                Ok(Next::Wait(None))
            }
        }
    }

    async fn ensure_run_state(
        &mut self,
        record: &VmRecord,
        paused: bool,
    ) -> Result<Next, AgentError> {
        let Some(qemu) = &self.qemu else {
            return Ok(Next::Again);
        };
        let status = qemu
            .qmp()
            .query_status()
            .await
            .map_err(|source| AgentError::Qmp {
                name: self.name.clone(),
                source,
            })?;
        let is_paused = matches!(status.status, RunState::Paused);
        if paused && status.running {
            qemu.qmp().stop().await.map_err(|source| AgentError::Qmp {
                name: self.name.clone(),
                source,
            })?;
        } else if !paused && is_paused {
            qemu.qmp().cont().await.map_err(|source| AgentError::Qmp {
                name: self.name.clone(),
                source,
            })?;
        }
        let want = if paused {
            VmState::Paused
        } else {
            VmState::Running
        };
        if record.status.state != want {
            let pid = u32::try_from(qemu.pid()).ok();
            let accelerator = to_record_accelerator(qemu.accelerator());
            self.set_state(want, None, |record| {
                record.status.pid = pid;
                record.status.accelerator.get_or_insert(accelerator);
            })
            .await?;
        }
        Ok(Next::Wait(None))
    }

    async fn stop(&mut self, record: &VmRecord) -> Result<Next, AgentError> {
        let Some(qemu) = self.qemu.take() else {
            return Ok(Next::Again);
        };
        self.set_state(VmState::Stopping, None, |_| {}).await?;
        let result = if record.stop_force {
            qemu.force_stop().await
        } else {
            qemu.stop(Duration::from_secs(record.stop_timeout_secs))
                .await
        };
        let exit = result.map_err(|source| AgentError::Qemu {
            name: self.name.clone(),
            source,
        })?;
        tracing::info!(vm = %self.name, %exit, "vm stopped");
        self.set_state(VmState::Stopped, None, |record| record.status.pid = None)
            .await?;
        Ok(Next::Wait(None))
    }

    async fn restart(&mut self, record: &VmRecord) -> Result<Next, AgentError> {
        if let Some(qemu) = self.qemu.take() {
            self.set_state(VmState::Stopping, Some("restarting".into()), |_| {})
                .await?;
            qemu.stop(Duration::from_secs(record.stop_timeout_secs))
                .await
                .map_err(|source| AgentError::Qemu {
                    name: self.name.clone(),
                    source,
                })?;
        }
        let generation = record.restart_generation;
        self.set_state(VmState::Stopped, Some("restarting".into()), |record| {
            record.status.pid = None;
            record.status.observed_restart_generation = generation;
        })
        .await?;
        Ok(Next::Again)
    }

    async fn delete(&mut self, record: &VmRecord, mod_revision: u64) -> Result<Next, AgentError> {
        if let Some(qemu) = self.qemu.take() {
            qemu.force_stop().await.map_err(|source| AgentError::Qemu {
                name: self.name.clone(),
                source,
            })?;
        }
        let directory = self.shared.paths.vm_dir(&record.uuid);
        match tokio::fs::remove_dir_all(&directory).await {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(AgentError::io(
                    format!("removing {}", directory.display()),
                    error,
                ));
            }
        }
        crate::storage::remove_shared_disk(&self.shared, record).await;
        if self
            .shared
            .records
            .delete_vm(&self.name, mod_revision)
            .await?
        {
            self.shared
                .metrics
                .state_transitions
                .get_or_create(&crate::host::StateLabel {
                    state: "deleted".into(),
                })
                .inc();
            tracing::info!(vm = %self.name, "vm deleted");
            Ok(Next::Done)
        } else {
            Ok(Next::Again)
        }
    }

    /// QEMU ended without being asked to: record why, then restart it if the policy says so.
    async fn record_unexpected_exit(
        &mut self,
        record: &VmRecord,
        exit: &QemuExit,
    ) -> Result<(), AgentError> {
        self.shared.metrics.qemu_unexpected_exits.inc();
        let clean_shutdown = matches!(&exit.reason, QemuExitReason::GuestShutdown { reason } if reason == "guest-shutdown");
        let restart = match record.spec.restart_policy {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => !clean_shutdown,
            RestartPolicy::Always => true,
        };
        let (state, reason) = if clean_shutdown {
            (VmState::Stopped, "the guest powered off".to_string())
        } else {
            (VmState::Failed, exit.to_string())
        };
        tracing::warn!(vm = %self.name, %reason, restart, "qemu exited unexpectedly");
        if restart {
            let backoff =
                Duration::from_secs(1u64 << record.status.restarts.min(5)).min(MAX_RESTART_BACKOFF);
            self.restart_not_before = Some(Instant::now() + backoff);
        }
        self.set_state(state, Some(reason), |record| {
            record.status.pid = None;
            if restart {
                record.status.restarts += 1;
            } else {
                record.desired = DesiredPower::Stopped;
            }
        })
        .await?;
        Ok(())
    }

    /// The VM is to move to another host: the migration runs here, on the source, while this
    /// actor waits (nothing else may touch the VM meanwhile). Afterwards the VM either runs on
    /// the destination (its QEMU here is stopped and its directory removed) or still runs here.
    async fn migrate_out(&mut self, record: &VmRecord, id: &str) -> Result<Next, AgentError> {
        if crate::migration::moves_cold_with_disk(record) {
            return self.migrate_cold_with_disk(record, id).await;
        }
        let outcome =
            crate::migration::run_source(&self.shared, record, id, self.qemu.as_ref()).await;
        match outcome {
            crate::migration::SourceOutcome::Moved => {
                if let Some(qemu) = self.qemu.take()
                    && let Err(error) = qemu.force_stop().await
                {
                    tracing::warn!(vm = %self.name, %error, "stopping the migrated source qemu");
                }
                self.remove_moved_directory(record).await;
                Ok(Next::Done)
            }
            crate::migration::SourceOutcome::Stayed => Ok(Next::Again),
        }
    }

    /// A stopped VM with a local disk moves from a QEMU started for the move alone: paused from
    /// the start (`-S`), so the guest never runs, and migrated as a paused VM is, disk and all.
    /// Whatever the outcome, that QEMU ends here; the VM's state stays `stopped`. (A QEMU found
    /// running for a stopped VM after a restart of `serve` is such a QEMU, left over.)
    async fn migrate_cold_with_disk(
        &mut self,
        record: &VmRecord,
        id: &str,
    ) -> Result<Next, AgentError> {
        let qemu = match self.qemu.take() {
            Some(qemu) => Some(qemu),
            None => match self.launch_for_cold_move(record).await {
                Ok(qemu) => Some(qemu),
                Err(error) => {
                    tracing::warn!(vm = %self.name, %error, "cannot start qemu for a cold move");
                    None
                }
            },
        };
        let outcome = crate::migration::run_source(&self.shared, record, id, qemu.as_ref()).await;
        if let Some(qemu) = qemu
            && let Err(error) = qemu.force_stop().await
        {
            tracing::warn!(vm = %self.name, %error, "stopping the qemu of a cold move");
        }
        match outcome {
            crate::migration::SourceOutcome::Moved => {
                self.remove_moved_directory(record).await;
                Ok(Next::Done)
            }
            crate::migration::SourceOutcome::Stayed => Ok(Next::Again),
        }
    }

    /// The VM lives on another host now: its directory here (a local disk included) goes; a
    /// disk on shared storage stays, the new host runs the VM on it.
    async fn remove_moved_directory(&self, record: &VmRecord) {
        let directory = self.shared.paths.vm_dir(&record.uuid);
        if let Err(error) = tokio::fs::remove_dir_all(&directory).await
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(vm = %self.name, %error, "removing the migrated vm's directory");
        }
    }

    async fn launch_for_cold_move(&self, record: &VmRecord) -> Result<QemuVm, AgentError> {
        let binaries = self.shared.hypervisor.binaries()?;
        let probe = self.shared.hypervisor.accelerator().await?;
        let spec = launch_spec(&self.shared, record, probe.accelerator)?.start_paused(true);
        QemuVm::launch(binaries, &spec)
            .await
            .map_err(|source| AgentError::Qemu {
                name: self.name.clone(),
                source,
            })
    }

    /// Writes the observed state (and whatever `extra` changes) with compare-and-swap.
    async fn set_state(
        &self,
        state: VmState,
        reason: Option<String>,
        extra: impl Fn(&mut VmRecord),
    ) -> Result<VmRecord, AgentError> {
        let record = self
            .shared
            .records
            .update_vm(&self.name, |record| {
                let before = record.clone();
                if record.status.state != state {
                    record.status.since = unix_now();
                }
                record.status.state = state;
                record.status.reason = reason.clone();
                extra(record);
                Ok(*record != before)
            })
            .await?;
        self.shared
            .metrics
            .state_transitions
            .get_or_create(&crate::host::StateLabel {
                state: state.as_str().into(),
            })
            .inc();
        Ok(record)
    }
}
