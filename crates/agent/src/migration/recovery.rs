//! Post-copy recovery. After the switch the destination runs the guest while the pages it has
//! not received yet are still on the source: the stream between the two QEMUs is part of the
//! guest's memory. When it breaks for good (the source's `serve` killed and started again, or
//! a session lost beyond its resume), both QEMUs pause their migration (`postcopy-paused`) and
//! keep what they have. QEMU resumes on a new channel: `migrate-recover` makes the destination
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
//! If the recovery fails, the post-copy fails as it did before recoveries existed: the guest's
//! running state is lost and the destination restarts the VM.

use super::*;
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
    refuse(recovery.request, recovery.session, &error).await;
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

/// The destination's task receiving the stream into its QEMU.
pub(super) type Receiving = AbortOnDrop<Result<ProxyReport, novacron_migration::ProxyError>>;

/// Destination, after the switch: takes a source's recovery. Ends the broken stream (its
/// QEMU then pauses its post-copy), has QEMU listen on a new socket, answers `Ready` and
/// returns the new session with the task that rebuilds the resumed stream into that socket.
/// On an error the recovery is refused and the post-copy cannot go on.
pub(super) async fn take_recovery(
    shared: &Shared,
    recovery: PostcopyRecovery,
    receiving: Receiving,
    qemu: &QemuVm,
    record: &VmRecord,
    config: &ProxyConfig,
) -> Result<(Arc<Session>, Receiving), AgentError> {
    let name = record.spec.name.as_str();
    drop(receiving);
    let directory = shared.paths.vm_dir(&record.uuid);
    let reopened = async {
        let socket = directory.join("recover.sock");
        let _ = std::fs::remove_file(&socket);
        // Out of band: the main loop of a QEMU whose post-copy paused may itself wait for a
        // page (a device reading guest memory), and then no other command is answered. QEMU
        // refuses it until it noticed the closed socket and paused.
        let recover = json!({ "uri": format!("unix:{}", socket.display()) });
        let recover_by = Instant::now() + RECOVERY_STEP;
        loop {
            match qemu
                .qmp()
                .execute_oob("migrate-recover", Some(recover.clone()))
                .await
            {
                Ok(_) => break,
                Err(novacron_qemu::QmpError::Command { description, .. })
                    if Instant::now() < recover_by =>
                {
                    tracing::debug!(vm = %name, %description, "migrate-recover refused; trying again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => return Err(qmp_error(name, error)),
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
            refuse(recovery.request, recovery.session, &error).await;
            return Err(error);
        }
    };
    if recovery
        .request
        .respond(Message::Migration(MigrationControl::Ready).encode())
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

/// Waits for QEMU's migration to reach `wanted` (`query-migrate`), for [`RECOVERY_STEP`].
async fn wait_for_migration_status(
    qemu: &QemuVm,
    name: &str,
    wanted: &str,
) -> Result<(), AgentError> {
    let give_up = Instant::now() + RECOVERY_STEP;
    loop {
        let status = tokio::time::timeout(RECOVERY_STEP, qemu.qmp().query_migrate())
            .await
            .ok()
            .and_then(Result::ok)
            .and_then(|info| info["status"].as_str().map(str::to_string))
            .unwrap_or_else(|| "unknown (no answer)".to_string());
        if status == wanted {
            return Ok(());
        }
        if Instant::now() > give_up {
            return Err(migration_error(
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

/// Source: resumes the paused post-copy of `migration` from `qemu` over a new session to the
/// destination, trying to reach it until `until`. Returns once QEMU sent its last page and the
/// destination received it.
pub(super) async fn resume_outgoing(
    shared: &Arc<Shared>,
    qemu: &QemuVm,
    record: &VmRecord,
    migration: &MigrationRecord,
    until: Instant,
) -> Result<ProxyReport, Failure> {
    let service = shared.transfer_service().ok_or_else(|| {
        Failure::new(
            ErrorCode::Unavailable,
            "this host has no transfer listener, so it cannot resume the post-copy",
        )
    })?;
    wait_for_migration_status(qemu, &migration.vm, "postcopy-paused").await?;
    let (address, fingerprint) = destination_endpoint(shared, migration).await?;
    let link_wait = Duration::from_secs(migration.post_copy_link_wait_secs);
    let (session, _) =
        connect_to_destination(&service, migration, &address, fingerprint, link_wait, until)
            .await?;
    let result = resume_on(shared, qemu, record, migration, &session).await;
    crate::transfer::close_quietly(session).await;
    result
}

async fn resume_on(
    shared: &Shared,
    qemu: &QemuVm,
    record: &VmRecord,
    migration: &MigrationRecord,
    session: &Arc<Session>,
) -> Result<ProxyReport, Failure> {
    let (name, destination) = (&migration.vm, &migration.destination);
    let control = session.control();
    let recover = Message::Migration(MigrationControl::Recover {
        id: migration.id.clone(),
    });
    let reply = tokio::time::timeout(Duration::from_secs(60), control.request(recover.encode()))
        .await
        .map_err(|_| {
            Failure::new(
                ErrorCode::Unavailable,
                format!("host {destination} did not answer the recovery within 60 s"),
            )
        })?
        .map_err(|error| session_failure("asking the destination to recover", &error))?;
    match Message::decode(&reply) {
        Ok(Message::Migration(MigrationControl::Ready)) => {}
        Ok(Message::Migration(MigrationControl::Refused { code, message })) => {
            return Err(Failure::new(
                code,
                format!("host {destination} refused to resume: {message}"),
            ));
        }
        Ok(other) => {
            return Err(Failure::new(
                ErrorCode::Internal,
                format!(
                    "host {destination} answered {} to the recovery",
                    other.name()
                ),
            ));
        }
        Err(error) => return Err(Failure::new(ErrorCode::Internal, error.to_string())),
    }
    let socket_path = shared.paths.vm_dir(&record.uuid).join("migrate-out.sock");
    let _ = std::fs::remove_file(&socket_path);
    let listener = tokio::net::UnixListener::bind(&socket_path).map_err(|error| {
        Failure::new(
            ErrorCode::Internal,
            format!("cannot listen on {}: {error}", socket_path.display()),
        )
    })?;
    qemu.qmp()
        .execute(
            "migrate",
            Some(json!({ "uri": format!("unix:{}", socket_path.display()), "resume": true })),
        )
        .await
        .map_err(|error| Failure::from(qmp_error(name, error)))?;
    let (stream, _) = tokio::time::timeout(RECOVERY_STEP, listener.accept())
        .await
        .map_err(|_| {
            Failure::new(
                ErrorCode::Internal,
                "qemu did not connect to the migration socket to resume within 30 s",
            )
        })?
        .map_err(|error| Failure::new(ErrorCode::Internal, format!("migration socket: {error}")))?;
    drop(listener);
    let _ = std::fs::remove_file(&socket_path);
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
            result = &mut sender.0, if sent.is_none() => sent = Some(sender_outcome(result)?),
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
                    status @ ("failed" | "cancelled") => {
                        return Err(Failure::new(
                            ErrorCode::Internal,
                            format!("qemu reports the resumed migration {status}"),
                        ));
                    }
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
        (Some(record), Some(qemu)) => loop {
            say_in_record(
                &shared,
                &id,
                &format!(
                    "post-copy: the source host {host}'s novacron serve restarted; resuming \
                     the copy of the pages host {} lacks",
                    migration.destination
                ),
            )
            .await;
            match resume_outgoing(&shared, qemu, record, &migration, until).await {
                Ok(report) => break Ok(report),
                Err(failure)
                    if Instant::now() < until && !migration_finished(&shared, &id).await =>
                {
                    tracing::warn!(vm = %name, migration = %id, reason = %failure.message,
                        "resuming the post-copy failed; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(failure) => break Err(failure),
            }
        },
        _ => Err(Failure::new(
            ErrorCode::Unavailable,
            format!(
                "the source host {host}'s novacron serve restarted during the copy and the \
                 source qemu, with the pages the destination lacked, is gone"
            ),
        )),
    };
    let report = outcome.as_ref().cloned().unwrap_or_default();
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

/// Whether migration `id` ended (the destination gave the post-copy up, say).
async fn migration_finished(shared: &Shared, id: &str) -> bool {
    matches!(shared.records.migration(id).await,
        Ok(Some(migration)) if migration.record.phase.is_finished())
}

/// At start-up: the post-copy migrations whose source is this host and whose switch happened
/// (phase `post-copy`), listed before the start-up sweep, which would otherwise remove their
/// source QEMU with the directory of a VM another host owns. Waits for the store for up to a
/// minute.
pub(crate) async fn postcopy_sourced_here(shared: &Shared) -> Vec<MigrationRecord> {
    if shared.region.is_none() {
        return Vec::new();
    }
    let host = &shared.config.host_name;
    for _ in 0..60 {
        match shared.records.migrations().await {
            Ok(migrations) => {
                return migrations
                    .into_iter()
                    .filter(|migration| {
                        migration.phase == MigrationPhase::PostCopy && &migration.source == host
                    })
                    .collect();
            }
            Err(error) => {
                tracing::debug!(%error, "cannot list migrations yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    Vec::new()
}
