//! QMP client: the JSON protocol QEMU speaks on its monitor socket.
//!
//! One [`QmpClient`] owns one connection: it reads QEMU's greeting, negotiates capabilities,
//! matches replies to commands by `id`, and broadcasts asynchronous events. Typed helpers cover the
//! commands NovaCron uses; [`QmpClient::execute`] is the raw-JSON path for everything else
//! (DESIGN.md §5: QMP schemas move faster than crates that wrap them). It does not interpret what
//! events mean for a VM's lifecycle: [`crate::vm`] does.
//!
//! QEMU accepts one client per QMP socket at a time: dropping the client closes the connection so
//! that a later `novacron serve` can connect.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{broadcast, oneshot, watch};

/// How long a command may wait for its reply before [`QmpError::Timeout`].
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Events kept for a slow subscriber before it sees [`broadcast::error::RecvError::Lagged`].
const EVENT_CHANNEL_CAPACITY: usize = 256;

/// A QMP operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Connecting to the socket failed.
    #[error("cannot connect to qmp socket {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Reading from or writing to the socket failed.
    #[error("qmp socket {} i/o error", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// QEMU sent something that is not QMP, or closed the connection during the handshake.
    #[error("qmp protocol error on {}: {detail}", path.display())]
    Protocol { path: PathBuf, detail: String },
    /// QEMU answered the command with an error.
    #[error("qmp command {command} failed: {class}: {description}")]
    Command {
        command: String,
        class: String,
        description: String,
    },
    /// The connection closed before the reply arrived (QEMU exited or the client was dropped).
    #[error("qmp connection closed before {command} was answered")]
    Disconnected { command: String },
    /// No reply within the timeout.
    #[error("qmp command {command} not answered within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QmpEvent {
    /// Event name, e.g. `SHUTDOWN`, `STOP`, `RESUME`.
    pub event: String,
    /// The event's `data` member (`null` when absent).
    pub data: Value,
    /// QEMU's timestamp: seconds since the Unix epoch.
    pub timestamp_seconds: i64,
    /// QEMU's timestamp: microseconds part.
    pub timestamp_microseconds: i64,
}

/// The events NovaCron reacts to, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpEventKind {
    /// QEMU is shutting down. `guest` is true when the guest asked (power-off, halt).
    Shutdown { guest: bool, reason: String },
    /// The VM was reset.
    Reset { guest: bool, reason: String },
    /// The guest was asked to power down (ACPI power button).
    Powerdown,
    /// Execution stopped (paused, migration switch-over, I/O error, ...).
    Stop,
    /// Execution resumed.
    Resume,
    /// A migration changed state (`setup`, `active`, `completed`, `failed`, ...).
    Migration { status: String },
    /// Any other event: see [`QmpEvent::event`] and [`QmpEvent::data`].
    Other,
}

impl QmpEvent {
    /// This event, typed.
    pub fn kind(&self) -> QmpEventKind {
        let text = |key: &str| {
            self.data
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let guest = self
            .data
            .get("guest")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        match self.event.as_str() {
            "SHUTDOWN" => QmpEventKind::Shutdown {
                guest,
                reason: text("reason"),
            },
            "RESET" => QmpEventKind::Reset {
                guest,
                reason: text("reason"),
            },
            "POWERDOWN" => QmpEventKind::Powerdown,
            "STOP" => QmpEventKind::Stop,
            "RESUME" => QmpEventKind::Resume,
            "MIGRATION" => QmpEventKind::Migration {
                status: text("status"),
            },
            _ => QmpEventKind::Other,
        }
    }
}

/// QEMU's run state (`query-status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    Debug,
    Inmigrate,
    InternalError,
    IoError,
    Paused,
    Postmigrate,
    Prelaunch,
    FinishMigrate,
    RestoreVm,
    Running,
    SaveVm,
    Shutdown,
    Suspended,
    Watchdog,
    GuestPanicked,
    Colo,
    /// A state this driver does not know (a newer QEMU).
    #[serde(other)]
    Unknown,
}

/// Reply of `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// Whether vCPUs are running.
    pub running: bool,
    /// The detailed run state.
    pub status: RunState,
}

type Pending = HashMap<u64, oneshot::Sender<Result<Value, QmpError>>>;

/// State shared between the client and its reader task.
struct Shared {
    path: PathBuf,
    pending: Mutex<Pending>,
    events: broadcast::Sender<QmpEvent>,
    last_shutdown: Mutex<Option<QmpEvent>>,
    closed: watch::Sender<bool>,
}

impl Shared {
    fn close(&self) {
        self.closed.send_replace(true);
        let pending = std::mem::take(
            &mut *self
                .pending
                .lock()
                .unwrap_or_else(|poison| poison.into_inner()),
        );
        for (_, reply) in pending {
            // The command name is not known here; the waiter replaces it.
            let _ = reply.send(Err(QmpError::Disconnected {
                command: String::new(),
            }));
        }
    }
}

/// A connected QMP client. Dropping it closes the connection.
pub struct QmpClient {
    shared: Arc<Shared>,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    next_id: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
    command_timeout: Duration,
    /// The monitor runs out-of-band commands (QEMU's `oob` capability, enabled at connect):
    /// [`QmpClient::execute_oob`] is answered even while QEMU's main loop is stuck.
    out_of_band: bool,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("QmpClient")
            .field("path", &self.shared.path)
            .finish_non_exhaustive()
    }
}

impl Drop for QmpClient {
    fn drop(&mut self) {
        // The reader task holds the read half: stop it so the socket really closes.
        self.reader.abort();
    }
}

/// A handle that observes a client's connection without owning it (used by exit watching).
#[derive(Clone)]
pub(crate) struct QmpObserver {
    shared: Arc<Shared>,
}

impl QmpObserver {
    /// Waits until the connection has closed (QEMU gone, or the client dropped).
    pub(crate) async fn closed(&self) {
        let mut closed = self.shared.closed.subscribe();
        let _ = closed.wait_for(|closed| *closed).await;
    }

    /// The last `SHUTDOWN` event seen on this connection.
    pub(crate) fn last_shutdown(&self) -> Option<QmpEvent> {
        self.shared
            .last_shutdown
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }
}

impl QmpClient {
    /// Connects to a QMP socket, reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let (read_half, write_half) = stream.into_split();
        let mut lines = BufReader::new(read_half).lines();
        let greeting = lines
            .next_line()
            .await
            .map_err(|source| QmpError::Io {
                path: path.to_owned(),
                source,
            })?
            .ok_or_else(|| QmpError::Protocol {
                path: path.to_owned(),
                detail: "connection closed before the greeting".to_owned(),
            })?;
        let greeting: Value =
            serde_json::from_str(&greeting).map_err(|error| QmpError::Protocol {
                path: path.to_owned(),
                detail: format!("greeting is not json: {error}"),
            })?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol {
                path: path.to_owned(),
                detail: format!("unexpected greeting {greeting}"),
            });
        }
        let out_of_band = greeting["QMP"]["capabilities"]
            .as_array()
            .is_some_and(|capabilities| capabilities.iter().any(|name| name == "oob"));
        let (events, _) = broadcast::channel(EVENT_CHANNEL_CAPACITY);
        let shared = Arc::new(Shared {
            path: path.to_owned(),
            pending: Mutex::new(HashMap::new()),
            events,
            last_shutdown: Mutex::new(None),
            closed: watch::Sender::new(false),
        });
        let reader = tokio::spawn(read_loop(lines, shared.clone()));
        let client = Self {
            shared,
            writer: tokio::sync::Mutex::new(write_half),
            next_id: AtomicU64::new(1),
            reader,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            out_of_band,
        };
        let capabilities = out_of_band.then(|| json!({ "enable": ["oob"] }));
        client.execute("qmp_capabilities", capabilities).await?;
        Ok(client)
    }

    /// The socket this client is connected to.
    pub fn socket_path(&self) -> &Path {
        &self.shared.path
    }

    /// Subscribes to events received from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.shared.events.subscribe()
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        *self.shared.closed.borrow()
    }

    pub(crate) fn observer(&self) -> QmpObserver {
        QmpObserver {
            shared: self.shared.clone(),
        }
    }

    /// Runs any QMP command and returns its `return` value (the raw-JSON path).
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.send("execute", command, arguments).await
    }

    /// Runs a command out of band (`exec-oob`) when the monitor can: QEMU runs it on the
    /// monitor's own thread, so it is answered while the main loop waits (for a post-copy page
    /// that has not arrived, say). Only commands QEMU allows out of band (`migrate-recover`,
    /// `migrate-pause`, ...) can be sent so; otherwise the same as [`QmpClient::execute`].
    pub async fn execute_oob(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let key = if self.out_of_band {
            "exec-oob"
        } else {
            "execute"
        };
        self.send(key, command, arguments).await
    }

    async fn send(
        &self,
        key: &str,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut request = json!({ key: command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        let (reply_sender, reply_receiver) = oneshot::channel();
        {
            let mut pending = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            if self.is_closed() {
                return Err(QmpError::Disconnected {
                    command: command.to_owned(),
                });
            }
            pending.insert(id, reply_sender);
        }
        let written = {
            let mut writer = self.writer.lock().await;
            writer.write_all(line.as_bytes()).await
        };
        if let Err(source) = written {
            self.forget(id);
            return Err(if self.is_closed() {
                QmpError::Disconnected {
                    command: command.to_owned(),
                }
            } else {
                QmpError::Io {
                    path: self.shared.path.clone(),
                    source,
                }
            });
        }
        match tokio::time::timeout(self.command_timeout, reply_receiver).await {
            Err(_elapsed) => {
                self.forget(id);
                Err(QmpError::Timeout {
                    command: command.to_owned(),
                    timeout: self.command_timeout,
                })
            }
            Ok(Err(_)) | Ok(Ok(Err(QmpError::Disconnected { .. }))) => {
                Err(QmpError::Disconnected {
                    command: command.to_owned(),
                })
            }
            Ok(Ok(Err(QmpError::Command {
                class, description, ..
            }))) => Err(QmpError::Command {
                command: command.to_owned(),
                class,
                description,
            }),
            Ok(Ok(result)) => result,
        }
    }

    fn forget(&self, id: u64) {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .remove(&id);
    }

    /// `query-status`.
    pub async fn query_status(&self) -> Result<StatusInfo, QmpError> {
        let value = self.execute("query-status", None).await?;
        serde_json::from_value(value.clone()).map_err(|error| QmpError::Protocol {
            path: self.shared.path.clone(),
            detail: format!("unexpected query-status reply {value}: {error}"),
        })
    }

    /// `stop`: pause the vCPUs.
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.execute("stop", None).await.map(drop)
    }

    /// `cont`: resume the vCPUs.
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.execute("cont", None).await.map(drop)
    }

    /// `system_powerdown`: press the ACPI power button (the guest decides what to do).
    pub async fn system_powerdown(&self) -> Result<(), QmpError> {
        self.execute("system_powerdown", None).await.map(drop)
    }

    /// `system_reset`: hard reset of the machine.
    pub async fn system_reset(&self) -> Result<(), QmpError> {
        self.execute("system_reset", None).await.map(drop)
    }

    /// `quit`: QEMU exits at once (the guest gets no chance to shut down). QEMU may close the
    /// connection before replying: that counts as success.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute("quit", None).await {
            Ok(_) | Err(QmpError::Disconnected { .. }) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// `query-migrate`, raw: its shape depends on the migration's state.
    pub async fn query_migrate(&self) -> Result<Value, QmpError> {
        self.execute("query-migrate", None).await
    }

    /// `migrate_cancel` of the outgoing migration, then `query-migrate` until
    /// [`cancel_settled`] or `settle` passed. Returns the status last seen: a `cont` that
    /// follows an ended migration does not meet one still cancelling.
    pub async fn cancel_migration(&self, settle: Duration) -> Result<String, QmpError> {
        // Refused only when there is nothing to cancel or it is a post-copy; the status says.
        let _ = self.execute("migrate_cancel", None).await;
        let deadline = tokio::time::Instant::now() + settle;
        loop {
            let info = self.query_migrate().await?;
            let status = info["status"].as_str().unwrap_or("none").to_string();
            if cancel_settled(&status) || tokio::time::Instant::now() >= deadline {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Whether a migration in `status` (`query-migrate`'s) is as a cancel leaves it: ended
/// (`completed`, `failed`, `cancelled`, or none ran), or a post-copy (which cannot be
/// cancelled).
pub fn cancel_settled(status: &str) -> bool {
    ["completed", "failed", "cancelled", "none"].contains(&status) || status.starts_with("postcopy")
}

async fn read_loop(
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    shared: Arc<Shared>,
) {
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(error) => {
                tracing::debug!(path = %shared.path.display(), %error, "qmp read failed");
                break;
            }
        };
        let message: Value = match serde_json::from_str(&line) {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(path = %shared.path.display(), %error, "qmp sent a line that is not json");
                continue;
            }
        };
        if let Some(event) = message.get("event").and_then(Value::as_str) {
            let timestamp = message.get("timestamp");
            let field = |key: &str| {
                timestamp
                    .and_then(|t| t.get(key))
                    .and_then(Value::as_i64)
                    .unwrap_or(0)
            };
            let event = QmpEvent {
                event: event.to_owned(),
                data: message.get("data").cloned().unwrap_or(Value::Null),
                timestamp_seconds: field("seconds"),
                timestamp_microseconds: field("microseconds"),
            };
            tracing::debug!(path = %shared.path.display(), event = %event.event, "qmp event");
            if event.event == "SHUTDOWN" {
                *shared
                    .last_shutdown
                    .lock()
                    .unwrap_or_else(|poison| poison.into_inner()) = Some(event.clone());
            }
            let _ = shared.events.send(event);
            continue;
        }
        let Some(id) = message.get("id").and_then(Value::as_u64) else {
            tracing::warn!(path = %shared.path.display(), %message, "qmp reply without id");
            continue;
        };
        let reply = shared
            .pending
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .remove(&id);
        let Some(reply) = reply else { continue };
        let result = if let Some(value) = message.get("return") {
            Ok(value.clone())
        } else if let Some(error) = message.get("error") {
            let text = |key: &str| {
                error
                    .get(key)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            Err(QmpError::Command {
                command: String::new(),
                class: text("class"),
                description: text("desc"),
            })
        } else {
            Err(QmpError::Protocol {
                path: shared.path.clone(),
                detail: format!("reply without return or error: {message}"),
            })
        };
        let _ = reply.send(result);
    }
    shared.close();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    #[test]
    fn a_cancel_settles_at_an_end_or_a_post_copy_and_not_before() {
        for status in [
            "completed",
            "failed",
            "cancelled",
            "none",
            "postcopy-active",
            "postcopy-paused",
        ] {
            assert!(cancel_settled(status), "{status}");
        }
        for status in [
            "setup",
            "active",
            "cancelling",
            "device",
            "pre-switchover",
            "wait-unplug",
        ] {
            assert!(!cancel_settled(status), "{status}");
        }
    }

    /// A scripted QMP server: greeting, capabilities, then replies to each command by name.
    async fn fake_server(listener: UnixListener) {
        let (stream, _) = listener.accept().await.unwrap();
        let (read_half, mut write_half) = stream.into_split();
        let mut lines = BufReader::new(read_half).lines();
        write_half
            .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": [\"oob\"]}}\n")
            .await
            .unwrap();
        while let Some(line) = lines.next_line().await.unwrap() {
            let request: Value = serde_json::from_str(&line).unwrap();
            let id = request["id"].clone();
            let command = request["execute"]
                .as_str()
                .or(request["exec-oob"].as_str())
                .unwrap();
            let reply = match command {
                "qmp_capabilities" => {
                    assert_eq!(request["arguments"]["enable"], json!(["oob"]));
                    json!({"return": {}, "id": id})
                }
                "cont" => json!({"return": {}, "id": id}),
                "migrate-recover" => {
                    assert!(request.get("exec-oob").is_some(), "{request}");
                    json!({"return": {}, "id": id})
                }
                "stop" => {
                    let event =
                        json!({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}});
                    write_half
                        .write_all(format!("{event}\n").as_bytes())
                        .await
                        .unwrap();
                    json!({"return": {}, "id": id})
                }
                "query-status" => {
                    json!({"return": {"status": "paused", "running": false, "singlestep": false}, "id": id})
                }
                other => {
                    json!({"error": {"class": "CommandNotFound", "desc": format!("The command {other} has not been found")}, "id": id})
                }
            };
            write_half
                .write_all(format!("{reply}\n").as_bytes())
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn commands_events_errors_and_disconnect() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(fake_server(listener));
        let client = QmpClient::connect(&path).await.unwrap();
        let mut events = client.subscribe();

        client.stop().await.unwrap();
        let event = events.recv().await.unwrap();
        assert_eq!(event.kind(), QmpEventKind::Stop);
        assert_eq!(event.timestamp_seconds, 1);

        client
            .execute_oob("migrate-recover", Some(json!({"uri": "unix:/x"})))
            .await
            .unwrap();

        let status = client.query_status().await.unwrap();
        assert_eq!(
            status,
            StatusInfo {
                running: false,
                status: RunState::Paused
            }
        );

        let error = client
            .execute("no-such-command", Some(json!({"x": 1})))
            .await
            .unwrap_err();
        match &error {
            QmpError::Command { command, class, .. } => {
                assert_eq!(command, "no-such-command");
                assert_eq!(class, "CommandNotFound");
            }
            other => panic!("unexpected error {other:?}"),
        }

        server.abort();
        let _ = server.await;
        let observer = client.observer();
        tokio::time::timeout(Duration::from_secs(10), observer.closed())
            .await
            .unwrap();
        assert!(client.is_closed());
        assert!(matches!(
            client.cont().await,
            Err(QmpError::Disconnected { .. })
        ));
    }

    #[test]
    fn shutdown_event_kind() {
        let event = QmpEvent {
            event: "SHUTDOWN".into(),
            data: json!({"guest": true, "reason": "guest-shutdown"}),
            timestamp_seconds: 0,
            timestamp_microseconds: 0,
        };
        assert_eq!(
            event.kind(),
            QmpEventKind::Shutdown {
                guest: true,
                reason: "guest-shutdown".into()
            }
        );
    }

    #[test]
    fn unknown_run_state_parses() {
        let status: StatusInfo =
            serde_json::from_value(json!({"running": false, "status": "brand-new"})).unwrap();
        assert_eq!(status.status, RunState::Unknown);
    }
}
