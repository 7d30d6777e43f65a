//! Post-copy after the switch, and its recovery. After the switch the destination runs the guest
//! while the pages it has not received yet are still on the source: the stream between the two
//! QEMUs is part of the guest's memory. When it breaks for good (either host's `serve` killed
//! and started again), both QEMUs pause their migration (`postcopy-paused`) and keep what they
//! have. QEMU resumes on a new channel: `migrate-recover` makes the destination
//! listen, `migrate` with `resume: true` makes the source ask for the destination's bitmap of
//! received pages and send the rest. This module drives that over a new DWCP session:
//!
//! ```text
//! source agent                                    destination agent
//!  (its serve restarted: QEMU postcopy-paused,
//!   its socket closed with the old process)
//!  new session ──────────────────────────────────▶ Recover{id}: the migration's task here ends
//!                                                   the broken stream (QEMU postcopy-paused),
//!                                                   migrate-recover on a new socket
//!                                      ◀────────── Ready
//!  migrate resume=true into a socket here;
//!  the resumed stream, carried opaque ───bulk───▶ rebuilt into the new socket
//!  (QEMU's return path: received bitmap, page requests, the other way)
//!  QEMU completed: migration completed, source QEMU stopped
//! ```
//!
//! A restarted destination `serve` takes over its paused QEMU ([`adopt_orphaned_postcopy`]) and
//! waits for the source the same way. It cannot open a new QMP connection to that QEMU (under
//! TCG a vCPU waiting for a missing page holds QEMU's main lock, which a new connection's
//! capabilities negotiation needs), so every incoming QEMU that may switch to post-copy has a
//! second monitor whose negotiated connection a holder process keeps for the migration's
//! lifetime ([`MonitorHolder`], [`novacron_qemu::held_monitor`]). If the recovery fails, the
//! post-copy fails as it did before recoveries existed: the guest's running state is lost and
//! the destination restarts the VM.

use super::*;
use novacron_qemu::{HeldMonitor, RunDirectory};
use novacron_transport::ControlRequest;

/// The most each step of a recovery may take: a QEMU pausing after its socket closed, the
/// destination's QEMU listening again, the source's QEMU connecting.
const RECOVERY_STEP: Duration = Duration::from_secs(30);

/// A source's new session for a post-copy whose stream broke (`MigrationControl::Recover`),
/// handed to the migration that drives the incoming QEMU here.
pub(crate) struct PostcopyRecovery {
    session: Arc<Session>,
    request: ControlRequest,
}

/// Destination: hands a `Recover{id}` request to the post-copy of migration `id` this process
/// drives, or refuses it.
pub(crate) async fn hand_over_recovery(
    service: Arc<TransferService>,
    session: Arc<Session>,
    request: ControlRequest,
    id: String,
) {
    let waiting = service
        .shared()
        .postcopy_recoveries
        .lock()
        .ok()
        .and_then(|waiting| waiting.get(&id).cloned());
    let recovery = PostcopyRecovery { session, request };
    let recovery = match waiting {
        Some(waiting) => match waiting.send(recovery).await {
            Ok(()) => return,
            Err(ended) => ended.0,
        },
        None => recovery,
    };
    tracing::warn!(migration = %id, "a post-copy recovery for a migration not driven here; refused");
    let error = migration_error(
        ErrorCode::NotFound,
        format!("no post-copy of migration {id} waits for its stream on this host"),
    );
    refuse(Some(recovery.request), recovery.session, &error).await;
}

/// Lists a post-copy in [`Shared::postcopy_recoveries`] until dropped, for
/// [`hand_over_recovery`] to find.
pub(super) struct RecoveryRegistration<'a> {
    shared: &'a Shared,
    id: String,
    recoveries: tokio::sync::mpsc::Receiver<PostcopyRecovery>,
}

impl<'a> RecoveryRegistration<'a> {
    pub(super) fn new(shared: &'a Shared, id: &str) -> Self {
        let (sender, recoveries) = tokio::sync::mpsc::channel(1);
        if let Ok(mut waiting) = shared.postcopy_recoveries.lock() {
            waiting.insert(id.to_string(), sender);
        }
        Self {
            shared,
            id: id.to_string(),
            recoveries,
        }
    }

    /// The next recovery a source asks for.
    pub(super) async fn next(&mut self) -> PostcopyRecovery {
        match self.recoveries.recv().await {
            Some(recovery) => recovery,
            // The sender is listed until this is dropped.
            None => std::future::pending().await,
        }
    }
}

impl Drop for RecoveryRegistration<'_> {
    fn drop(&mut self) {
        if let Ok(mut waiting) = self.shared.postcopy_recoveries.lock() {
            waiting.remove(&self.id);
        }
    }
}

/// Destination, after the switch: the incoming post-copy of a VM this host now owns.
pub(super) struct Incoming<'a> {
    pub(super) shared: &'a Arc<Shared>,
    /// The incoming QEMU, when this process started it (not after a restart of `serve`: its
    /// monitor may not answer then, and the held one is used).
    pub(super) qemu: Option<&'a QemuVm>,
    pub(super) record: &'a VmRecord,
    pub(super) id: &'a str,
    /// The source host.
    pub(super) source: &'a str,
    /// How long a lost link, or a broken stream's recovery, is waited for.
    pub(super) link_wait: Duration,
    pub(super) config: &'a ProxyConfig,
}

impl Incoming<'_> {
    /// The rest of the guest's memory comes in: on `receiving`'s session, or, once that
    /// stream broke (`None`: it broke with an earlier `serve`), on a new session the source
    /// opens to resume it, for up to the link wait. Ends when the stream does. When the rest
    /// cannot come (the link lost beyond its wait, no recovery within it, a recovery that
    /// failed) the guest cannot run on: its QEMU is stopped and the migration failed, and the
    /// reconciler starts the VM again.
    pub(super) async fn follow(&self, receiving: Option<(Arc<Session>, Receiving)>) {
        let (name, id, source) = (&self.record.spec.name, self.id, self.source);
        let mut link = PostcopyLinkWatch::new(source, self.link_wait);
        let mut watch = tokio::time::interval(Duration::from_secs(1));
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut recoveries = RecoveryRegistration::new(self.shared, id);
        let mut recover_by = receiving.is_none().then(|| Instant::now() + self.link_wait);
        let (mut session, mut receiving) = receiving.unzip();
        let mut recovered = false;
        let result = loop {
            tokio::select! {
                result = async { (&mut receiving.as_mut().expect("checked").0).await },
                    if receiving.is_some() => break received(result),
                recovery = recoveries.next() => {
                    // Only the source holds the pages the guest lacks.
                    if let Err(error) = check_peer_is(&self.shared.records, &recovery.session, source).await {
                        tracing::warn!(vm = %name, migration = %id, %error, "a post-copy recovery refused");
                        refuse(Some(recovery.request), recovery.session, &error).await;
                        continue;
                    }
                    tracing::info!(vm = %name, migration = %id, "the source asks to resume the post-copy on a new session");
                    drop(receiving.take());
                    if let Some(session) = session.take() {
                        crate::transfer::close_quietly(session).await;
                    }
                    match take_recovery(self.shared, recovery, self.qemu, self.record, self.config).await {
                        Ok((resumed, resumed_receiving)) => {
                            recovered = true;
                            resumed.set_resume_timeout(self.link_wait);
                            session = Some(resumed);
                            receiving = Some(resumed_receiving);
                            recover_by = None;
                            link = PostcopyLinkWatch::new(source, self.link_wait);
                            self.say(&format!(
                                "post-copy: resumed on a new session from host {source}; the rest \
                                 of the pages are coming"
                            ))
                            .await;
                        }
                        Err(error) => break Err(error),
                    }
                }
                _ = watch.tick() => {
                    if let Some(session) = &session
                        && let Some(message) = link.check(session)
                    {
                        self.say(&message).await;
                    }
                    if recover_by.is_some_and(|by| Instant::now() > by) {
                        break Err(migration_error(
                            ErrorCode::Unavailable,
                            format!(
                                "host {source} did not resume the broken stream within {} s \
                                 (--post-copy-link-wait)",
                                self.link_wait.as_secs()
                            ),
                        ));
                    }
                }
            }
        };
        match result {
            Ok(report) => {
                tracing::info!(vm = %name, migration = %id, stream_bytes = report.stream_bytes, "post-copy finished");
            }
            Err(error) => self.fail(&error).await,
        }
        // A resumed session ends here (the first one with the caller).
        if recovered && let Some(session) = session {
            crate::transfer::close_quietly(session).await;
        }
    }

    /// Said in the log first (this host may be the one cut off from the store), then in the
    /// migration's record.
    async fn say(&self, message: &str) {
        tracing::warn!(vm = %self.record.spec.name, migration = %self.id, "{message}");
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            say_in_record(self.shared, self.id, message),
        )
        .await;
    }

    /// The rest of the memory cannot come: stops the guest, fails the migration.
    pub(super) async fn fail(&self, error: &AgentError) {
        let name = &self.record.spec.name;
        tracing::warn!(vm = %name, migration = %self.id, %error, "post-copy failed: the guest's memory is incomplete; stopping it so the vm restarts here");
        match self.qemu {
            Some(qemu) => stop_incomplete(qemu, name.as_str()).await,
            None => {
                if let Ok(uuid) = uuid::Uuid::parse_str(&self.record.uuid)
                    && let Err(error) =
                        QemuVm::kill_in(&self.shared.paths.vm_dir(&self.record.uuid), uuid).await
                {
                    tracing::warn!(vm = %name, %error, "killing the incomplete qemu");
                }
            }
        }
        let host = self.shared.config.host_name.clone();
        let _ = self
            .shared
            .records
            .update_migration(self.id, |migration| {
                if migration.phase.is_finished() {
                    return Ok(false);
                }
                finish(
                    migration,
                    MigrationPhase::Failed,
                    Some(ErrorCode::Unavailable),
                    &format!(
                        "post-copy failed after the VM moved to host {host}: {error}; the \
                         guest's running state is lost; the VM fails here as after a crash \
                         (restarted by its restart policy)"
                    ),
                );
                Ok(true)
            })
            .await;
    }
}

/// The destination's task receiving the stream into its QEMU.
pub(super) type Receiving = AbortOnDrop<Result<ProxyReport, novacron_migration::ProxyError>>;

/// Destination, after the switch: takes a source's recovery once the broken stream's socket
/// is closed (QEMU then pauses its post-copy): has QEMU listen on a new socket, answers `Ready`
/// and returns the new session with the task that rebuilds the resumed stream into that
/// socket. On an error the recovery is refused and the post-copy cannot go on.
async fn take_recovery(
    shared: &Shared,
    recovery: PostcopyRecovery,
    qemu: Option<&QemuVm>,
    record: &VmRecord,
    config: &ProxyConfig,
) -> Result<(Arc<Session>, Receiving), AgentError> {
    let name = record.spec.name.as_str();
    let directory = shared.paths.vm_dir(&record.uuid);
    let reopened = async {
        let socket = directory.join("recover.sock");
        let _ = std::fs::remove_file(&socket);
        // Out of band, on the held connection when there is one: the main loop of a QEMU whose
        // post-copy paused may wait for the main lock that a vCPU holds while it waits for a
        // page, and then no in-band command is answered. QEMU refuses it until it noticed the
        // closed socket and paused.
        let recover = json!({ "uri": format!("unix:{}", socket.display()) });
        let held = HeldMonitor::find(&RunDirectory::new(&directory).recovery_socket());
        let recover_by = Instant::now() + RECOVERY_STEP;
        loop {
            let answer = match (held, qemu) {
                (Some(held), _) => held
                    .execute_oob("migrate-recover", Some(recover.clone()), RECOVERY_STEP)
                    .await
                    .map(|_| ())
                    .map_err(|error| error.to_string()),
                (None, Some(qemu)) => qemu
                    .qmp()
                    .execute_oob("migrate-recover", Some(recover.clone()))
                    .await
                    .map(|_| ())
                    .map_err(|error| error.to_string()),
                (None, None) => Err("no monitor of the incoming qemu answers".to_string()),
            };
            match answer {
                Ok(()) => break,
                Err(error) if Instant::now() < recover_by => {
                    tracing::debug!(vm = %name, %error, "migrate-recover refused; trying again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => {
                    return Err(migration_error(
                        ErrorCode::Internal,
                        format!("vm {name}'s incoming qemu did not listen again: {error}"),
                    ));
                }
            }
        }
        let connect_by = Instant::now() + RECOVERY_STEP;
        loop {
            match tokio::net::UnixStream::connect(&socket).await {
                Ok(stream) => return Ok(stream),
                Err(error) if Instant::now() < connect_by => {
                    tracing::debug!(%error, "recovery socket not ready");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => {
                    return Err(AgentError::io(
                        format!("connecting to {}", socket.display()),
                        error,
                    ));
                }
            }
        }
    }
    .await;
    let stream = match reopened {
        Ok(stream) => stream,
        Err(error) => {
            refuse(Some(recovery.request), recovery.session, &error).await;
            return Err(error);
        }
    };
    if recovery
        .request
        .respond(Message::Migration(MigrationControl::Ready { held_files: vec![] }).encode())
        .await
        .is_err()
    {
        return Err(migration_error(
            ErrorCode::Unavailable,
            "the source that asked to resume the post-copy went away before the stream resumed",
        ));
    }
    let session = recovery.session;
    let receiving = {
        let session = session.clone();
        let config = config.clone();
        AbortOnDrop(tokio::spawn(async move {
            receive_migration_stream_duplex(&session, stream, &config).await
        }))
    };
    Ok((session, receiving))
}

/// Waits for the source QEMU's migration to pause (`query-migrate`), for [`RECOVERY_STEP`].
/// Returns whether it completed instead: a post-copy source completes only once the
/// destination QEMU said on the return path that it has everything, so a stream whose session
/// failed after that (the destination closing it as the stream ended) needs no recovery. A
/// migration QEMU ended itself (`failed`, `cancelled`) fails at once: there is nothing to
/// resume, and trying again cannot help.
async fn wait_until_paused(qemu: &QemuVm, name: &str) -> Result<bool, Failure> {
    let wanted = "postcopy-paused";
    let give_up = Instant::now() + RECOVERY_STEP;
    loop {
        let status = tokio::time::timeout(RECOVERY_STEP, qemu.qmp().query_migrate())
            .await
            .ok()
            .and_then(Result::ok)
            .and_then(|info| info["status"].as_str().map(str::to_string))
            .unwrap_or_else(|| "unknown (no answer)".to_string());
        match status.as_str() {
            "postcopy-paused" => return Ok(false),
            "completed" => return Ok(true),
            "failed" | "cancelled" => return Err(qemu_ended(name, &status)),
            _ => {}
        }
        if Instant::now() > give_up {
            return Err(Failure::new(
                ErrorCode::Internal,
                format!(
                    "vm {name}'s qemu reports its migration {status}, not {wanted}, after {} s",
                    RECOVERY_STEP.as_secs()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn qemu_ended(name: &str, status: &str) -> Failure {
    Failure::qemu_ended(format!(
        "vm {name}'s source qemu reports its post-copy {status}: the pages the destination \
         lacked are lost, so the copy cannot be resumed"
    ))
}

/// Source: resumes the paused post-copy of `migration` from `qemu` over a new session to the
/// destination, trying to reach it until `until`. Returns once QEMU sent its last page and the
/// destination received it: the resumed stream's report, or `None` when QEMU had completed
/// the migration already (nothing to resume).
async fn resume_outgoing(
    shared: &Arc<Shared>,
    qemu: &QemuVm,
    record: &VmRecord,
    migration: &MigrationRecord,
    until: Instant,
) -> Result<Option<ProxyReport>, Failure> {
    let service = shared.transfer_service().ok_or_else(|| {
        Failure::new(
            ErrorCode::Unavailable,
            "this host has no transfer listener, so it cannot resume the post-copy",
        )
    })?;
    if wait_until_paused(qemu, &migration.vm).await? {
        tracing::info!(vm = %migration.vm, migration = %migration.id, "the source qemu completed the post-copy; nothing to resume");
        return Ok(None);
    }
    let (address, fingerprint) = destination_endpoint(shared, migration).await?;
    let link_wait = Duration::from_secs(migration.post_copy_link_wait_secs);
    let (session, _, _) = connect_to_destination(
        &service,
        migration,
        &address,
        fingerprint,
        link_wait,
        until,
        |_| (),
    )
    .await?;
    let result = resume_on(shared, qemu, record, migration, &session).await;
    crate::transfer::close_quietly(session).await;
    result.map(Some)
}

async fn resume_on(
    shared: &Shared,
    qemu: &QemuVm,
    record: &VmRecord,
    migration: &MigrationRecord,
    session: &Arc<Session>,
) -> Result<ProxyReport, Failure> {
    let (name, destination) = (&migration.vm, &migration.destination);
    let recover = Message::Migration(MigrationControl::Recover {
        id: migration.id.clone(),
    });
    ask_destination(session, recover, "recovery", destination).await?;
    let stream = migrate_into_socket(shared, qemu, record, true).await?;
    tracing::info!(vm = %name, migration = %migration.id, %destination, "post-copy resumed on a new session");
    let config = ProxyConfig {
        resumed_postcopy: true,
        ..ProxyConfig::default()
    };
    let mut sender = {
        let session = session.clone();
        AbortOnDrop(tokio::spawn(async move {
            send_migration_stream_duplex(stream, &session, &config).await
        }))
    };
    let mut link = PostcopyLinkWatch::new(
        destination,
        Duration::from_secs(migration.post_copy_link_wait_secs),
    );
    let mut sent = None;
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            result = &mut sender.0, if sent.is_none() => match sender_outcome(result) {
                Ok(report) => sent = Some(report),
                // The destination may close the session as the stream ends, before this side
                // saw the last acknowledgement: QEMU's completion says whether it got it all.
                Err(failure) => {
                    return match wait_until_paused(qemu, name).await {
                        Ok(true) => Ok(ProxyReport::default()),
                        _ => Err(failure),
                    };
                }
            },
            _ = poll.tick() => {
                if let Some(message) = link.check(session) {
                    tracing::warn!(vm = %name, migration = %migration.id, "{message}");
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        say_in_record(shared, &migration.id, &message),
                    )
                    .await;
                }
                let status = qemu
                    .qmp()
                    .query_migrate()
                    .await
                    .map_err(|error| Failure::from(qmp_error(name, error)))?;
                match status["status"].as_str().unwrap_or_default() {
                    "completed" => {
                        if let Some(report) = sent.take() {
                            return Ok(report);
                        }
                    }
                    "postcopy-paused" => {
                        return Err(Failure::new(
                            ErrorCode::Unavailable,
                            "the resumed post-copy stream broke as well",
                        ));
                    }
                    status @ ("failed" | "cancelled") => return Err(qemu_ended(name, status)),
                    _ => {}
                }
            }
        }
    }
}

/// At start-up, on the source host: post-copy migrations from this host whose `serve` ended
/// after the switch. Their source QEMU outlived it, paused with the pages the destination has
/// not received yet: each is resumed on a new session (the destination's guest stalls on those
/// pages meanwhile, up to the migration's `post_copy_link_wait_secs`), then stopped. One whose
/// QEMU is gone, or that cannot be resumed, fails: the destination restarts the VM.
pub(crate) async fn resume_postcopy_sourced_here(
    shared: Arc<Shared>,
    migrations: Vec<MigrationRecord>,
) {
    for migration in migrations {
        tokio::spawn(resume_after_restart(shared.clone(), migration));
    }
}

async fn resume_after_restart(shared: Arc<Shared>, migration: MigrationRecord) {
    let host = shared.config.host_name.clone();
    let (name, id) = (migration.vm.clone(), migration.id.clone());
    tracing::warn!(vm = %name, migration = %id, "post-copy from this host outlived the serve that drove it; resuming it");
    let started = Instant::now();
    let until = started + Duration::from_secs(migration.post_copy_link_wait_secs);
    let record = match shared.records.vm(&name).await {
        Ok(Some(vm)) => Some(vm.record),
        _ => None,
    };
    let directory = record
        .as_ref()
        .map(|record| shared.paths.vm_dir(&record.uuid));
    let qemu = match (&record, &directory) {
        (Some(record), Some(directory)) => match uuid::Uuid::parse_str(&record.uuid) {
            Ok(uuid) => QemuVm::attach(directory, uuid).await.ok().flatten(),
            Err(_) => None,
        },
        _ => None,
    };
    let outcome = match (&record, &qemu) {
        (Some(record), Some(qemu)) => {
            let message = format!(
                "post-copy: the source host {host}'s novacron serve restarted; resuming the copy \
                 of the pages host {} lacks",
                migration.destination
            );
            say_in_record(&shared, &id, &message).await;
            resume_until(&shared, qemu, record, &migration, until).await
        }
        _ => Err(Failure::new(
            ErrorCode::Unavailable,
            format!(
                "the source host {host}'s novacron serve restarted during the copy and the \
                 source qemu, with the pages the destination lacked, is gone"
            ),
        )),
    };
    let report = outcome
        .as_ref()
        .cloned()
        .unwrap_or_default()
        .unwrap_or_default();
    let progress = MigrationProgress {
        stream_bytes: migration.progress.stream_bytes + report.stream_bytes,
        wire_bytes: migration.progress.wire_bytes + report.message_bytes,
        remaining_bytes: 0,
        ..migration.progress.clone()
    };
    let outcome = outcome.map(|_| {
        format!(
            "the VM runs on host {} (post-copy: resumed on a new session after the source \
             host {host}'s novacron serve restarted; its last pages arrived {:.1} s after the \
             restart)",
            migration.destination,
            started.elapsed().as_secs_f64()
        )
    });
    // The memory copy's start went with the earlier serve: no total time is recorded.
    record_postcopy_end(&shared, &migration, progress, outcome, &report, None).await;
    if let Some(qemu) = qemu
        && let Err(error) = qemu.force_stop().await
    {
        tracing::warn!(vm = %name, %error, "stopping the post-copy's source qemu");
    }
    if let Some(directory) = directory {
        let _ = tokio::fs::remove_dir_all(&directory).await;
    }
}

/// Source: [`resume_outgoing`] again after each failure until `until` (the link wait from the
/// break): the destination may be unreachable, or not yet ready (its `serve` restarting).
pub(super) async fn resume_until(
    shared: &Arc<Shared>,
    qemu: &QemuVm,
    record: &VmRecord,
    migration: &MigrationRecord,
    until: Instant,
) -> Result<Option<ProxyReport>, Failure> {
    loop {
        match resume_outgoing(shared, qemu, record, migration, until).await {
            Ok(report) => return Ok(report),
            Err(failure)
                if !failure.qemu_ended
                    && Instant::now() < until
                    && !migration_finished(shared, &migration.id).await =>
            {
                tracing::warn!(vm = %migration.vm, migration = %migration.id, reason = %failure.message,
                    "resuming the post-copy failed; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(failure) => return Err(failure),
        }
    }
}

/// Whether migration `id` ended (the destination gave the post-copy up, say).
async fn migration_finished(shared: &Shared, id: &str) -> bool {
    matches!(shared.records.migration(id).await,
        Ok(Some(migration)) if migration.record.phase.is_finished())
}

/// At start-up: the post-copy migrations whose source is this host and whose switch happened
/// (phase `post-copy`), listed before the start-up sweep, which would otherwise remove their
/// source QEMU with the directory of a VM another host owns. Waits for the store until
/// `deadline`; `None` without an answer (then nothing may be swept: a QEMU it would have named
/// could be among the directories).
pub(crate) async fn postcopy_sourced_here(
    shared: &Shared,
    deadline: Instant,
) -> Option<Vec<MigrationRecord>> {
    if shared.region.is_none() {
        return Some(Vec::new());
    }
    let host = &shared.config.host_name;
    loop {
        match shared.records.migrations().await {
            Ok(migrations) => {
                return Some(
                    migrations
                        .into_iter()
                        .filter(|migration| {
                            migration.phase == MigrationPhase::PostCopy && &migration.source == host
                        })
                        .collect(),
                );
            }
            Err(error) if Instant::now() < deadline => {
                tracing::debug!(%error, "cannot list migrations yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => {
                tracing::warn!(%error, "the store did not list the migrations in time; post-copies from this host are not resumed and vm directories are not swept");
                return None;
            }
        }
    }
}

/// At start-up, on the destination host: the QEMU of an incoming post-copy that an earlier
/// `serve` drove (its marker names the migration). Its stream broke with that process and it
/// paused its post-copy, the guest waiting for the pages it lacks. While the migration is still
/// in post-copy and the earlier serve's holder keeps its recovery monitor, this process takes
/// it over: it waits for the source to resume the stream ([`Incoming::follow`] without one) and
/// returns true; the VM's reconciler leaves the QEMU alone meanwhile ([`drives_postcopy`]).
/// Also true while the store cannot say (asked again at the next step). Otherwise returns
/// false: the QEMU is orphaned.
pub(crate) async fn adopt_orphaned_postcopy(shared: &Arc<Shared>, record: &VmRecord) -> bool {
    if drives_postcopy(shared, &record.uuid) {
        return false;
    }
    let Ok(id) = std::fs::read_to_string(postcopy_marker(shared, &record.uuid)) else {
        return false;
    };
    let migration = match shared.records.migration(id.trim()).await {
        Ok(Some(migration))
            if migration.record.phase == MigrationPhase::PostCopy
                && migration.record.destination == shared.config.host_name
                && migration.record.vm_uuid == record.uuid =>
        {
            migration.record
        }
        Ok(_) => return false,
        Err(error) => {
            // Asked again at the actor's next step: the QEMU is left alone meanwhile.
            tracing::debug!(vm = %record.spec.name, %error, "cannot read the post-copy's migration yet");
            return true;
        }
    };
    // Not through its QMP socket: a new connection's capabilities negotiation needs QEMU's
    // main loop, which a vCPU waiting for a page may hold. The earlier serve's holder keeps a
    // negotiated one (and exits with QEMU).
    let socket = RunDirectory::new(shared.paths.vm_dir(&record.uuid)).recovery_socket();
    let Some(held) = HeldMonitor::find(&socket) else {
        return false;
    };
    if let Ok(mut incoming) = shared.postcopy_incoming.lock() {
        incoming.insert(record.uuid.clone());
    }
    tracing::warn!(vm = %record.spec.name, migration = %migration.id, "qemu left in post-copy by an earlier serve; waiting for the source to resume the copy");
    tokio::spawn(take_over(shared.clone(), record.clone(), held, migration));
    true
}

async fn take_over(
    shared: Arc<Shared>,
    record: VmRecord,
    held: HeldMonitor,
    migration: MigrationRecord,
) {
    let _holder = MonitorHolder(Some(held));
    let driving = PostcopyIncoming::new(&shared, &record.uuid);
    driving.activate(&migration.id);
    let config = ProxyConfig::default();
    let incoming = Incoming {
        shared: &shared,
        qemu: None,
        record: &record,
        id: &migration.id,
        source: &migration.source,
        link_wait: Duration::from_secs(migration.post_copy_link_wait_secs),
        config: &config,
    };
    incoming
        .say(&format!(
            "post-copy: host {}'s novacron serve restarted during the copy; waiting for host {} \
             to resume the stream",
            shared.config.host_name, migration.source
        ))
        .await;
    tokio::select! {
        () = incoming.follow(None) => {}
        ended = ended_elsewhere(&shared, &migration.id) => incoming.fail(&ended).await,
    }
}

/// The holder of an incoming QEMU's recovery monitor ([`novacron_qemu::held_monitor`]),
/// released when dropped: by the migration that started it, or by the `serve` that took its
/// post-copy over after a restart. A `serve` killed meanwhile leaves it running for the next.
pub(super) struct MonitorHolder(Option<HeldMonitor>);

impl MonitorHolder {
    /// Starts `novacron qmp-hold` on the recovery monitor of `record`'s incoming QEMU (one
    /// launched with it) and waits up to 10 s for it to hold the connection. Without it, a
    /// post-copy cannot survive a restart of this host's `serve` under TCG; said in the log.
    pub(super) async fn start(shared: &Shared, record: &VmRecord) -> MonitorHolder {
        let directory = shared.paths.vm_dir(&record.uuid);
        let socket = RunDirectory::new(&directory).recovery_socket();
        if !socket.exists() {
            return MonitorHolder(None);
        }
        let started = async {
            let program = std::env::current_exe()?;
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(directory.join("qmp-hold.log"))?;
            let mut child = tokio::process::Command::new(program)
                .arg("qmp-hold")
                .arg("--socket")
                .arg(&socket)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()?;
            // Reaped while this process lives; it outlives a killed serve.
            tokio::spawn(async move {
                let _ = child.wait().await;
            });
            let give_up = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(held) = HeldMonitor::find(&socket) {
                    return Ok(held);
                }
                if Instant::now() > give_up {
                    return Err(std::io::Error::other(
                        "the holder did not hold the monitor within 10 s (see qmp-hold.log)",
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        .await;
        match started {
            Ok(held) => MonitorHolder(Some(held)),
            Err(error) => {
                tracing::warn!(vm = %record.spec.name, %error, "cannot hold the incoming qemu's recovery monitor; its post-copy will not survive a restart of this serve");
                MonitorHolder(None)
            }
        }
    }
}

impl Drop for MonitorHolder {
    fn drop(&mut self) {
        if let Some(held) = self.0.take() {
            held.release();
        }
    }
}
