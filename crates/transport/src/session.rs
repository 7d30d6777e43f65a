//! Sessions: one bulk byte stream and one control channel between two authenticated hosts,
//! carried by one control connection and N bulk connections, all TLS over TCP, resumed after
//! connection loss.
//!
//! This module owns the executor around the sans-IO pieces (`frame`, `reliable`, `policy`):
//! dialing and accepting connections, the hello that binds a connection to a session, the reader
//! and writer tasks of every connection, reconnection, the resume deadline and stream-count
//! adaptation. It must not decide what the bytes mean: callers (the codec, migration, image
//! push) own their payloads.
//!
//! Roles: the dialer opens every connection and re-opens lost ones; the listener accepts them and
//! attaches each to its session by session id, only if the connection authenticates as the same
//! peer certificate that opened the session. Either side may send bulk data and control messages.
//!
//! Memory per session, by construction (see `reliable`): at most `bulk_send_window_bytes +
//! control_window_bytes` held for sending and `bulk_receive_window_bytes + control_window_bytes`
//! held for receiving (payload plus 128 bytes per frame), plus per connection one read buffer and
//! one write buffer of `IO_BUFFER_BYTES` and one frame being read (at most `MAX_FRAME_PAYLOAD`),
//! plus the kernel's socket buffers.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};

use crate::error::TransportError;
use crate::frame::{
    Acknowledgement, Channel, ConnectionPurpose, EARLY_WINDOW_BYTES, FRAME_HEADER_LEN,
    FRAME_TAG_LEN, FrameHeader, FrameKind, HELLO_LEN, Hello, HelloStatus, MAX_FRAME_PAYLOAD,
    frame_tag,
};
use crate::identity::Fingerprint;
use crate::policy::{
    RateMeasurement, StreamCountDecision, StreamCountPolicy, StreamCountPolicyConfig,
    initial_stream_count, startup_stream_count,
};
use crate::pool::{ConnectionPool, LISTENER_PARKED_IDLE, PoolKey};
use crate::reliable::{InboundChannel, OutboundChannel, Reception, Transmission};
use crate::socket;
use crate::tls::{PINNED_SERVER_NAME, PeerTrust, TlsSettings};

/// Read and write buffer per connection.
pub const IO_BUFFER_BYTES: usize = 256 << 10;

/// Whether a bulk connection with nothing to send pads at `now` ([`Session::warm_up`]): an
/// open session, before its first frame was queued, until the warm-up's end.
fn warming_up(core: &SessionCore, now: Instant) -> bool {
    core.state == SessionState::Open
        && !core.bulk_out.anything_enqueued()
        && core.warm_up_until.is_some_and(|until| now < until)
}

/// One padding frame's payload ([`Session::warm_up`]).
static PADDING: [u8; 64 << 10] = [0; 64 << 10];

/// Default bound on a session's bulk data in each direction (send window and receive window).
///
/// The stream is ordered, so while one connection recovers a lost segment the receiver holds
/// what the others delivered behind it, and the sender holds it unacknowledged: the window must
/// cover several round trips of the whole link, not one connection's share. At 1 Gbit/s, 50 ms
/// and 0.5 % loss, 32 MiB (a quarter second) held four and eight connections to 85-88 % of the
/// link; 64 MiB let them reach 91 % (bench/transport/README.md).
pub const DEFAULT_BULK_WINDOW_BYTES: u64 = 64 << 20;

/// A session's identifier, chosen at random by the dialer.
pub type SessionId = [u8; 16];

/// Tunables of a session. Both sides announce their receive windows in the hello.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Bound on bulk data queued or in flight and not yet acknowledged by the peer.
    pub bulk_send_window_bytes: u64,
    /// Bound on bulk data received and not yet consumed by the application.
    pub bulk_receive_window_bytes: u64,
    /// Bound on control messages in each direction (both send and receive side).
    pub control_window_bytes: u64,
    /// Largest payload per bulk frame; `send` splits larger buffers.
    pub max_frame_payload: usize,
    /// TCP congestion control set on every socket (`None` keeps the system default).
    pub congestion_control: Option<String>,
    /// Bound on bytes each connection's socket holds unsent (`TCP_NOTSENT_LOWAT`; 0 keeps the
    /// kernel's default), so queued frames stay where any connection can take them.
    pub unsent_limit_bytes: u32,
    /// Bulk connections to open first; `None` estimates from the bandwidth-delay product.
    pub initial_bulk_connections: Option<u32>,
    /// With an estimated first count (`initial_bulk_connections` `None`), open at least this
    /// many, dialed with the session itself: parallel connections ramp up together, which a
    /// short transfer (a migration's few seconds) needs more than a long one.
    pub parallel_start_connections: u32,
    /// With an estimated first count, at least one bulk connection per this many bytes of the
    /// bandwidth-delay product (bandwidth hint times the round trip the control connection
    /// measured), dialed as soon as that round trip is known: see
    /// [`crate::policy::startup_stream_count`]. 0 leaves the first count to the windows alone.
    pub startup_share_bytes: u64,
    pub minimum_bulk_connections: u32,
    pub maximum_bulk_connections: u32,
    /// Expected path bandwidth, for the first estimate only (the forecast, when one exists).
    pub bandwidth_hint_bytes_per_second: f64,
    /// What one TCP connection can keep in flight; defaults to the kernel's largest send buffer.
    pub per_connection_window_bytes: u64,
    /// Add bulk connections while the measured rate rises.
    pub adapt_stream_count: bool,
    /// Interval between rate measurements.
    pub measurement_interval: Duration,
    /// How long a session survives without any connection before failing.
    pub resume_timeout: Duration,
    /// Limit on TCP connect, TLS handshake and hello together.
    pub handshake_timeout: Duration,
    /// Called with every rate measurement (each `measurement_interval`), for a link model.
    pub rate_observer: Option<RateObserver>,
    /// Cap on the rate this side's bulk connections together send at, bytes per second (IP
    /// packets), shared evenly between them as the kernel's per-socket pacing cap (`None`: no
    /// cap; with a forecast of the link, [`crate::policy::pacing_limit_for`] of it). See
    /// [`Session::set_bulk_pacing_limit`].
    pub bulk_pacing_limit_bytes_per_second: Option<u64>,
    /// How often the payload rate is compared with the pacing limit, which rises when the
    /// rate fills it ([`crate::policy::raised_pacing_limit`]).
    pub pacing_check_interval: Duration,
    /// At the end of the bulk stream, send an overdue frame once more on a connection that has
    /// nothing else to send (see [`crate::reliable::OutboundChannel::next_hedge`]).
    pub hedge_overdue_frames: bool,
    /// Name of the listener in its certificate (cluster CA trust only; ignored when pinned).
    pub server_name: String,
    /// Dialer: where this session's connections are parked when it shuts down, and where it
    /// looks for connections a finished session to the same peer left (see [`ConnectionPool`]).
    /// `None`: every session dials its own and closes them.
    pub connection_pool: Option<ConnectionPool>,
}

impl Default for SessionOptions {
    fn default() -> SessionOptions {
        SessionOptions {
            bulk_send_window_bytes: DEFAULT_BULK_WINDOW_BYTES,
            bulk_receive_window_bytes: DEFAULT_BULK_WINDOW_BYTES,
            control_window_bytes: 4 << 20,
            max_frame_payload: 128 << 10,
            congestion_control: Some("bbr".to_string()),
            unsent_limit_bytes: socket::DEFAULT_UNSENT_LIMIT_BYTES,
            initial_bulk_connections: None,
            parallel_start_connections: 1,
            startup_share_bytes: crate::policy::DEFAULT_STARTUP_SHARE_BYTES,
            minimum_bulk_connections: 1,
            maximum_bulk_connections: 16,
            bandwidth_hint_bytes_per_second: 125e6,
            per_connection_window_bytes: socket::per_connection_window_bytes(),
            adapt_stream_count: true,
            measurement_interval: Duration::from_secs(1),
            resume_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            hedge_overdue_frames: true,
            server_name: PINNED_SERVER_NAME.to_string(),
            rate_observer: None,
            bulk_pacing_limit_bytes_per_second: None,
            pacing_check_interval: crate::policy::PACING_CHECK_INTERVAL,
            connection_pool: None,
        }
    }
}

/// What the session moved over one measurement interval: the input of a per-link throughput
/// model (bytes acknowledged per interval).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateSample {
    /// The peer at the other end: one observer (e.g. a listener's) can serve many sessions and
    /// keep a model per link.
    pub peer_fingerprint: Fingerprint,
    /// Length of the interval.
    pub interval: Duration,
    /// Bulk payload the peer acknowledged during the interval (this side sending).
    pub bytes_acknowledged: u64,
    /// Bulk payload received during the interval (this side receiving).
    pub bytes_received: u64,
    /// The sender had more to send than the link took during the interval (it waited for the
    /// send window, or data was still queued at its end): `bytes_acknowledged` measures the
    /// path, not the application. Samples without it are at most a lower bound of the path's
    /// rate.
    pub sender_backlogged: bool,
}

/// Receives a session's [`RateSample`]s; it runs on the session's supervisor, so it must be
/// quick (update a model, never block).
#[derive(Clone)]
pub struct RateObserver(Arc<dyn Fn(RateSample) + Send + Sync>);

impl RateObserver {
    pub fn new(observe: impl Fn(RateSample) + Send + Sync + 'static) -> RateObserver {
        RateObserver(Arc::new(observe))
    }
}

impl std::fmt::Debug for RateObserver {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("RateObserver")
    }
}

impl SessionOptions {
    fn validate(&self) -> Result<(), TransportError> {
        let invalid = |reason: String| Err(TransportError::InvalidOptions { reason });
        if self.max_frame_payload == 0 || self.max_frame_payload > MAX_FRAME_PAYLOAD {
            return invalid(format!(
                "max_frame_payload must be between 1 and {MAX_FRAME_PAYLOAD}"
            ));
        }
        let smallest_window = crate::reliable::charge_of(self.max_frame_payload);
        for (name, value) in [
            ("bulk_send_window_bytes", self.bulk_send_window_bytes),
            ("bulk_receive_window_bytes", self.bulk_receive_window_bytes),
        ] {
            if value < smallest_window {
                return invalid(format!(
                    "{name} must hold at least one frame ({smallest_window} bytes)"
                ));
            }
        }
        // A dialer sends this much before this side's hello reply announces its windows.
        if self.bulk_receive_window_bytes < EARLY_WINDOW_BYTES {
            return invalid(format!(
                "bulk_receive_window_bytes must be at least {EARLY_WINDOW_BYTES} bytes (what a \
                 peer may send before the hello reply)"
            ));
        }
        let smallest_control = crate::reliable::charge_of(MAX_FRAME_PAYLOAD);
        if self.control_window_bytes < smallest_control {
            return invalid(format!(
                "control_window_bytes must hold at least {smallest_control} bytes"
            ));
        }
        if self.minimum_bulk_connections == 0
            || self.maximum_bulk_connections < self.minimum_bulk_connections
        {
            return invalid(
                "need 1 <= minimum_bulk_connections <= maximum_bulk_connections".into(),
            );
        }
        Ok(())
    }
}

/// A control-channel message from the peer.
#[derive(Debug)]
pub enum ControlIncoming {
    Notification(Bytes),
    Request(ControlRequest),
}

/// A request from the peer; answer it with [`ControlRequest::respond`].
#[derive(Debug)]
pub struct ControlRequest {
    pub body: Bytes,
    request_id: u64,
    shared: Weak<SessionShared>,
}

impl ControlRequest {
    pub async fn respond(self, body: Bytes) -> Result<(), TransportError> {
        let shared = self.shared.upgrade().ok_or(TransportError::SessionClosed {
            session: "dropped".to_string(),
        })?;
        shared
            .send_control(ControlMessageKind::Response, self.request_id, body)
            .await
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ControlMessageKind {
    Notification = 0,
    Request = 1,
    Response = 2,
}

const CONTROL_MESSAGE_HEADER_LEN: usize = 9;

/// Request/response and notification messages alongside the bulk stream, on their own connection
/// so they never wait behind bulk data. Ordered and resumed like the bulk stream.
#[derive(Clone)]
pub struct ControlChannel {
    shared: Arc<SessionShared>,
}

impl ControlChannel {
    /// Sends a request and waits for the peer's response.
    pub async fn request(&self, body: Bytes) -> Result<Bytes, TransportError> {
        let (sender, receiver) = oneshot::channel();
        let request_id = {
            let mut core = self.shared.lock();
            let id = core.next_request_id;
            core.next_request_id += 1;
            core.pending_requests.insert(id, sender);
            id
        };
        self.shared
            .send_control(ControlMessageKind::Request, request_id, body)
            .await?;
        receiver.await.map_err(|_| self.shared.terminal_error())
    }

    /// Sends a message that needs no answer (progress, for example).
    pub async fn notify(&self, body: Bytes) -> Result<(), TransportError> {
        self.shared
            .send_control(ControlMessageKind::Notification, 0, body)
            .await
    }

    /// The next request or notification from the peer; `None` once the peer closed the session.
    pub async fn next_incoming(&self) -> Result<Option<ControlIncoming>, TransportError> {
        let shared = &self.shared;
        loop {
            let notified = pin!(shared.control_readers.notified());
            let mut notified = notified;
            notified.as_mut().enable();
            {
                let mut core = shared.lock();
                if let Some((kind, request_id, body, charge)) = core.control_incoming.pop_front() {
                    core.control_in.mark_consumed(charge);
                    drop(core);
                    shared.control_writer.notify_waiters();
                    return Ok(Some(match kind {
                        ControlMessageKind::Request => ControlIncoming::Request(ControlRequest {
                            body,
                            request_id,
                            shared: Arc::downgrade(shared),
                        }),
                        _ => ControlIncoming::Notification(body),
                    }));
                }
                match &core.state {
                    SessionState::Open => {}
                    SessionState::PeerClosed | SessionState::Closed => return Ok(None),
                    SessionState::Failed(_) => return Err(shared.terminal_error_locked(&core)),
                }
            }
            notified.await;
        }
    }
}

/// Counters and choices of a session, for metrics, logs and progress displays.
#[derive(Clone, Debug)]
pub struct SessionStats {
    pub session_id: String,
    pub peer_fingerprint: Fingerprint,
    /// The TLS key exchange group of the first connection (X25519MLKEM768 expected).
    pub key_exchange_group: Option<String>,
    /// The TCP congestion control in effect on the first connection.
    pub congestion_control: Option<String>,
    pub bulk_connections: u32,
    /// Bulk connection slots the session maintains (the adaptive choice).
    pub target_bulk_connections: u32,
    pub control_connected: bool,
    pub bulk_bytes_sent: u64,
    pub bulk_bytes_acknowledged: u64,
    pub bulk_bytes_received: u64,
    pub bulk_bytes_retransmitted: u64,
    /// Bulk payload sent a second time on another connection while the first copy was overdue
    /// (`OutboundChannel::next_hedge`); the peer counts the copy that arrives second among its
    /// `duplicate_frames_received`.
    pub bulk_bytes_hedged: u64,
    pub duplicate_frames_received: u64,
    pub send_buffered_bytes: u64,
    /// The part of `send_buffered_bytes` (charged) waiting for a connection; the rest was
    /// written and is on its way to the peer.
    pub bulk_unsent_bytes: u64,
    pub receive_buffered_bytes: u64,
    /// Connections opened again after one of the session's connections was lost (a connection
    /// the stream-count policy adds is not one).
    pub reconnections: u64,
    /// How long the session has been without any connection (`None` while it has one); it
    /// fails once this passes its resume timeout.
    pub disconnected_for: Option<Duration>,
    pub round_trip_estimate: Option<Duration>,
    /// Bulk payload per second (acknowledged by the peer plus received) over the last interval.
    pub measured_rate_bytes_per_second: f64,
    /// Times a bulk connection free to send found the next frame held back by the send window
    /// (cumulative): while this grows, a larger window would carry more.
    pub bulk_send_window_holds: u64,
    /// Times a bulk connection free to send found nothing queued because the send window was
    /// full (cumulative; `OutboundChannel::send_window_starved`).
    pub bulk_send_window_starved: u64,
    /// Times a bulk connection free to send found the next frame beyond the peer's receive
    /// window (cumulative; `OutboundChannel::credit_holds`).
    pub bulk_credit_holds: u64,
    /// The cap on the bulk connections' total sending rate, bytes per second (see
    /// [`Session::set_bulk_pacing_limit`]).
    pub bulk_pacing_limit_bytes_per_second: Option<u64>,
    /// Padding sent to warm the bulk connections up ([`Session::warm_up`]), and received.
    pub bulk_padding_bytes_sent: u64,
    pub bulk_padding_bytes_received: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum SessionState {
    Open,
    /// The peer ended its control stream: it is closing; lost connections are not an error.
    PeerClosed,
    Closed,
    Failed(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lane {
    Control,
    Bulk,
}

struct SessionCore {
    bulk_out: OutboundChannel,
    control_out: OutboundChannel,
    bulk_in: InboundChannel,
    control_in: InboundChannel,
    bulk_end_delivered: bool,
    control_incoming: VecDeque<(ControlMessageKind, u64, Bytes, u64)>,
    pending_requests: HashMap<u64, oneshot::Sender<Bytes>>,
    next_request_id: u64,
    live_connections: HashMap<u64, Lane>,
    disconnected_since: Option<Instant>,
    /// How long the session survives without connections: `SessionOptions::resume_timeout`
    /// until [`Session::set_resume_timeout`] changes it.
    resume_timeout: Duration,
    state: SessionState,
    last_bulk_ack_sent: Option<Acknowledgement>,
    last_control_ack_sent: Option<Acknowledgement>,
    key_exchange_group: Option<String>,
    congestion_control: Option<String>,
    target_bulk_connections: u32,
    /// Indices of bulk connections (dialer side) told to close once their frames are
    /// acknowledged: the stream-count policy took back a connection that did not help.
    retiring: std::collections::HashSet<u32>,
    /// Indices of the bulk connections the policy added (dialer side), last added last.
    added_bulk: Vec<u32>,
    reconnections: u64,
    round_trip_estimate: Option<Duration>,
    sender_blocked_since_measurement: bool,
    measured_rate_bytes_per_second: f64,
    bulk_pacing_limit: Option<u64>,
    /// Bulk connections send padding until then while nothing was queued (see
    /// [`Session::warm_up`]).
    warm_up_until: Option<Instant>,
    padding_bytes_sent: u64,
    padding_bytes_received: u64,
    /// The listener accepted the session (its hello reply arrived); always true on the
    /// listener's side.
    peer_opened: bool,
    /// Why the session's first connection ended before the listener accepted the session.
    open_error: Option<TransportError>,
    /// The session shut down and parks its connections (see [`SessionShared::shut_down`]).
    parking: bool,
    /// Connections whose peer parked them: they park here too.
    parking_connections: std::collections::HashSet<u64>,
    /// Dialer: the session's first connection was a parked one (see `maintain_connection`).
    first_control_reused: bool,
}

#[derive(Clone)]
struct DialerContext {
    address: SocketAddr,
    connector: TlsConnector,
    server_name: ServerName<'static>,
    /// Which parked connections this dialer may use (see [`ConnectionPool`]).
    pool_key: PoolKey,
}

/// How long a connection waits for its peer's park frame once it has sent its own (or for its
/// writer to send one after the peer's), and how long a session that shut down gives its
/// connections to park before closing them.
const PARK_WAIT: Duration = Duration::from_secs(3);

/// How a connection's writer stopped without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriterEnd {
    /// The session ended (or the connection retired): close the connection.
    Closed,
    /// A park frame went out last: the connection may carry another session.
    Parked,
}

struct SessionShared {
    session_id: SessionId,
    session_name: String,
    peer_fingerprint: Fingerprint,
    options: SessionOptions,
    dialer: Option<DialerContext>,
    core: Mutex<SessionCore>,
    next_connection_id: AtomicU64,
    bulk_writers: Notify,
    control_writer: Notify,
    bulk_readers: Notify,
    control_readers: Notify,
    senders: Notify,
    shutdown: watch::Sender<bool>,
    /// Each bulk connection's share of the pacing limit (`None`: no cap).
    bulk_pacing_share: watch::Sender<Option<u64>>,
}

impl std::fmt::Debug for SessionShared {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SessionShared")
            .field("session", &self.session_name)
            .finish_non_exhaustive()
    }
}

fn session_name(session_id: &SessionId) -> String {
    session_id
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

impl SessionShared {
    fn new(
        session_id: SessionId,
        peer_fingerprint: Fingerprint,
        options: SessionOptions,
        peer_bulk_receive_window: u64,
        peer_control_receive_window: u64,
        dialer: Option<DialerContext>,
    ) -> Arc<SessionShared> {
        let core = SessionCore {
            bulk_out: OutboundChannel::new(
                options.bulk_send_window_bytes,
                peer_bulk_receive_window,
            ),
            control_out: OutboundChannel::new(
                options.control_window_bytes,
                peer_control_receive_window,
            ),
            bulk_in: InboundChannel::new(options.bulk_receive_window_bytes),
            control_in: InboundChannel::new(options.control_window_bytes),
            bulk_end_delivered: false,
            control_incoming: VecDeque::new(),
            pending_requests: HashMap::new(),
            next_request_id: 0,
            live_connections: HashMap::new(),
            disconnected_since: Some(Instant::now()),
            resume_timeout: options.resume_timeout,
            state: SessionState::Open,
            last_bulk_ack_sent: None,
            last_control_ack_sent: None,
            key_exchange_group: None,
            congestion_control: None,
            target_bulk_connections: 0,
            retiring: Default::default(),
            added_bulk: Vec::new(),
            reconnections: 0,
            round_trip_estimate: None,
            sender_blocked_since_measurement: false,
            measured_rate_bytes_per_second: 0.0,
            bulk_pacing_limit: options.bulk_pacing_limit_bytes_per_second,
            warm_up_until: None,
            padding_bytes_sent: 0,
            padding_bytes_received: 0,
            peer_opened: dialer.is_none(),
            open_error: None,
            parking: false,
            parking_connections: std::collections::HashSet::new(),
            first_control_reused: false,
        };
        let (shutdown, _) = watch::channel(false);
        let (bulk_pacing_share, _) = watch::channel(None);
        Arc::new(SessionShared {
            session_id,
            session_name: session_name(&session_id),
            peer_fingerprint,
            options,
            dialer,
            core: Mutex::new(core),
            next_connection_id: AtomicU64::new(1),
            bulk_writers: Notify::new(),
            control_writer: Notify::new(),
            bulk_readers: Notify::new(),
            control_readers: Notify::new(),
            senders: Notify::new(),
            shutdown,
            bulk_pacing_share,
        })
    }

    fn lock(&self) -> MutexGuard<'_, SessionCore> {
        // A panic while holding the lock would be a bug; keep serving the state rather than
        // cascading panics into every task.
        self.core
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wake_everyone(&self) {
        self.bulk_writers.notify_waiters();
        self.control_writer.notify_waiters();
        self.bulk_readers.notify_waiters();
        self.control_readers.notify_waiters();
        self.senders.notify_waiters();
    }

    fn fail(&self, reason: String) {
        {
            let mut core = self.lock();
            if !matches!(core.state, SessionState::Open | SessionState::PeerClosed) {
                return;
            }
            tracing::warn!(session = %self.session_name, %reason, "transport session failed");
            core.state = SessionState::Failed(reason);
            core.pending_requests.clear();
        }
        self.shutdown.send_replace(true);
        self.wake_everyone();
    }

    /// The listener accepted a connection (so the session) and announced its receive windows.
    fn on_hello_reply(&self, reply: &Hello) {
        let changed = {
            let mut core = self.lock();
            let bulk = core
                .bulk_out
                .raise_peer_receive_window(reply.bulk_receive_window);
            let control = core
                .control_out
                .raise_peer_receive_window(reply.control_receive_window);
            let opened = !std::mem::replace(&mut core.peer_opened, true);
            bulk || control || opened
        };
        if changed {
            self.wake_everyone();
        }
    }

    /// The session's first connection ended before the listener accepted the session.
    fn fail_to_open(&self, error: TransportError) {
        let cause = std::error::Error::source(&error)
            .map(|source| format!(": {source}"))
            .unwrap_or_default();
        let reason = format!("the peer did not open the session: {error}{cause}");
        self.lock().open_error.get_or_insert(error);
        self.fail(reason);
    }

    /// Ends the session here. Its connections park (see `frame`) when this side may keep
    /// them (a listener, or a dialer with a [`ConnectionPool`]), else close.
    fn shut_down(&self) {
        {
            let mut core = self.lock();
            if matches!(core.state, SessionState::Open | SessionState::PeerClosed) {
                core.state = SessionState::Closed;
                core.parking = self.may_park();
            }
            core.pending_requests.clear();
        }
        self.shutdown.send_replace(true);
        self.wake_everyone();
    }

    fn terminal_error(&self) -> TransportError {
        let core = self.lock();
        self.terminal_error_locked(&core)
    }

    fn terminal_error_locked(&self, core: &SessionCore) -> TransportError {
        match &core.state {
            SessionState::Failed(reason) => TransportError::SessionFailed {
                session: self.session_name.clone(),
                reason: reason.clone(),
            },
            _ => TransportError::SessionClosed {
                session: self.session_name.clone(),
            },
        }
    }

    /// Waits for room in an outbound channel, then queues the payload.
    async fn enqueue(
        &self,
        lane: Lane,
        payload: Bytes,
        end_of_stream: bool,
    ) -> Result<(), TransportError> {
        loop {
            let notified = pin!(self.senders.notified());
            let mut notified = notified;
            notified.as_mut().enable();
            {
                let mut core = self.lock();
                if core.state != SessionState::Open {
                    return Err(self.terminal_error_locked(&core));
                }
                let channel = match lane {
                    Lane::Bulk => &mut core.bulk_out,
                    Lane::Control => &mut core.control_out,
                };
                if channel.has_room_for(payload.len()) {
                    channel.enqueue(payload, end_of_stream)?;
                    drop(core);
                    match lane {
                        Lane::Bulk => self.bulk_writers.notify_waiters(),
                        Lane::Control => self.control_writer.notify_waiters(),
                    }
                    return Ok(());
                }
                if lane == Lane::Bulk {
                    core.sender_blocked_since_measurement = true;
                }
            }
            notified.await;
        }
    }

    async fn send_control(
        &self,
        kind: ControlMessageKind,
        request_id: u64,
        body: Bytes,
    ) -> Result<(), TransportError> {
        if body.len() + CONTROL_MESSAGE_HEADER_LEN > MAX_FRAME_PAYLOAD {
            return Err(TransportError::InvalidOptions {
                reason: format!(
                    "control message of {} bytes exceeds the {} byte limit",
                    body.len(),
                    MAX_FRAME_PAYLOAD - CONTROL_MESSAGE_HEADER_LEN
                ),
            });
        }
        let mut message = BytesMut::with_capacity(body.len() + CONTROL_MESSAGE_HEADER_LEN);
        message.put_u8(kind as u8);
        message.put_u64(request_id);
        message.put_slice(&body);
        self.enqueue(Lane::Control, message.freeze(), false).await
    }

    /// Applies one verified frame from the peer.
    fn on_frame(&self, header: FrameHeader, payload: Bytes) -> Result<(), TransportError> {
        let mut core = self.lock();
        match (header.kind, header.channel) {
            (FrameKind::Data, Channel::Bulk) => {
                let reception =
                    core.bulk_in
                        .on_data(header.sequence, payload, header.end_of_stream)?;
                drop(core);
                if reception == Reception::Stored {
                    self.bulk_readers.notify_waiters();
                    self.control_writer.notify_waiters();
                }
            }
            (FrameKind::Data, Channel::Control) => {
                let reception =
                    core.control_in
                        .on_data(header.sequence, payload, header.end_of_stream)?;
                if reception == Reception::Stored {
                    dispatch_control(&mut core)?;
                    drop(core);
                    self.control_readers.notify_waiters();
                    self.control_writer.notify_waiters();
                    // A peer that closed may also have ended the bulk stream.
                    self.bulk_readers.notify_waiters();
                }
            }
            // `read_frames` ends the connection's reading there.
            (FrameKind::Park, _) => {}
            // Decoding let only the bulk channel's through.
            (FrameKind::Padding, _) => {
                core.padding_bytes_received += payload.len() as u64;
            }
            (FrameKind::Ack, channel) => {
                let ack = Acknowledgement::decode(&payload)?;
                let now = Instant::now();
                let changed = match channel {
                    Channel::Bulk => core.bulk_out.on_acknowledgement(ack, now)?,
                    Channel::Control => core.control_out.on_acknowledgement(ack, now)?,
                };
                drop(core);
                if changed {
                    self.senders.notify_waiters();
                    match channel {
                        Channel::Bulk => self.bulk_writers.notify_waiters(),
                        Channel::Control => self.control_writer.notify_waiters(),
                    }
                }
            }
        }
        Ok(())
    }

    fn register_connection(&self, lane: Lane) -> u64 {
        let connection_id = self.next_connection_id.fetch_add(1, Ordering::Relaxed);
        let mut core = self.lock();
        core.live_connections.insert(connection_id, lane);
        core.disconnected_since = None;
        self.share_pacing_limit(&core);
        if lane == Lane::Control {
            // The new control connection starts by telling the peer where we are.
            core.last_bulk_ack_sent = None;
            core.last_control_ack_sent = None;
        }
        drop(core);
        self.control_writer.notify_waiters();
        connection_id
    }

    fn connection_lost(&self, connection_id: u64) {
        let mut core = self.lock();
        core.live_connections.remove(&connection_id);
        core.parking_connections.remove(&connection_id);
        self.share_pacing_limit(&core);
        let requeued_bulk = core.bulk_out.on_connection_lost(connection_id);
        let requeued_control = core.control_out.on_connection_lost(connection_id);
        if core.live_connections.is_empty() {
            core.disconnected_since = Some(Instant::now());
        }
        drop(core);
        tracing::debug!(
            session = %self.session_name,
            connection_id,
            requeued_bulk,
            requeued_control,
            "transport connection lost"
        );
        self.bulk_writers.notify_waiters();
        self.control_writer.notify_waiters();
    }

    /// Splits the bulk pacing limit evenly over the live bulk connections: frames go to
    /// whichever connection is free, so an even split caps the total without starving one.
    fn share_pacing_limit(&self, core: &SessionCore) {
        let connections = core
            .live_connections
            .values()
            .filter(|lane| **lane == Lane::Bulk)
            .count()
            .max(1) as u64;
        let share = core
            .bulk_pacing_limit
            .map(|limit| (limit / connections).max(1));
        self.bulk_pacing_share.send_if_modified(|current| {
            let changed = *current != share;
            *current = share;
            changed
        });
    }

    /// Whether this side keeps connections after the session: the listener always (the
    /// dialer decides whether to use them again), a dialer with a pool.
    fn may_park(&self) -> bool {
        self.dialer.is_none() || self.options.connection_pool.is_some()
    }

    /// The peer parked a connection: its writer parks it too.
    fn on_peer_park(&self, connection_id: u64) {
        self.lock().parking_connections.insert(connection_id);
        self.bulk_writers.notify_waiters();
        self.control_writer.notify_waiters();
    }

    fn is_terminal(&self) -> bool {
        matches!(
            self.lock().state,
            SessionState::Closed | SessionState::Failed(_)
        )
    }
}

fn dispatch_control(core: &mut SessionCore) -> Result<(), TransportError> {
    while let Some(delivery) = core.control_in.take_next() {
        if delivery.end_of_stream {
            core.control_in.mark_consumed(delivery.charge);
            if core.state == SessionState::Open {
                core.state = SessionState::PeerClosed;
            }
            continue;
        }
        let mut message = delivery.payload;
        if message.len() < CONTROL_MESSAGE_HEADER_LEN {
            return Err(TransportError::Protocol {
                reason: format!("control message of {} bytes", message.len()),
            });
        }
        let kind = match message.get_u8() {
            0 => ControlMessageKind::Notification,
            1 => ControlMessageKind::Request,
            2 => ControlMessageKind::Response,
            other => {
                return Err(TransportError::Protocol {
                    reason: format!("unknown control message kind {other}"),
                });
            }
        };
        let request_id = message.get_u64();
        if kind == ControlMessageKind::Response {
            core.control_in.mark_consumed(delivery.charge);
            match core.pending_requests.remove(&request_id) {
                Some(waiter) => {
                    // The requester may have given up; nothing else to do then.
                    let _ = waiter.send(message);
                }
                None => {
                    return Err(TransportError::Protocol {
                        reason: format!("response to unknown request {request_id}"),
                    });
                }
            }
        } else {
            core.control_incoming
                .push_back((kind, request_id, message, delivery.charge));
        }
    }
    Ok(())
}

/// One end of a session. Dropping it shuts the session down at once (use [`Session::close`]
/// to finish cleanly).
#[derive(Debug)]
pub struct Session {
    shared: Arc<SessionShared>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shared.shut_down();
    }
}

impl Session {
    /// Dials `address`, authenticates both sides with `tls`, opens a session, and starts its bulk
    /// connections in the background. Returns once this side's TLS handshake is done and its
    /// hello is sent, without waiting a round trip for the listener's answer: data sent at
    /// once follows the hello. A listener that refuses this host fails the session a round trip
    /// later; [`Session::opened`] waits for its answer and returns that refusal.
    pub async fn connect(
        address: SocketAddr,
        tls: &TlsSettings,
        options: SessionOptions,
    ) -> Result<Session, TransportError> {
        options.validate()?;
        let _ = crate::tls::warm_up_random();
        let server_name = match &tls.trust {
            PeerTrust::PinnedFingerprints(_) => PINNED_SERVER_NAME.to_string(),
            PeerTrust::ClusterCertificateAuthority { .. } => options.server_name.clone(),
        };
        let pool_key = PoolKey::new(address, &server_name, tls);
        let server_name = ServerName::try_from(server_name.clone()).map_err(|_| {
            TransportError::InvalidOptions {
                reason: format!("invalid server name {server_name:?}"),
            }
        })?;
        let dialer = DialerContext {
            address,
            connector: TlsConnector::from(tls.client_config()?),
            server_name,
            pool_key,
        };
        let session_id: SessionId = rand::random();
        let dial_started = Instant::now();
        // The first bulk connections are dialed alongside the control connection (the listener
        // holds them until the session exists), so data can flow one handshake earlier; more
        // follow as soon as the control connection's TCP handshake has measured the round trip
        // (see `startup_stream_count`), one round trip behind. Connections a finished session
        // to this peer parked are all taken: each carries its share of the rate they reached.
        let parked = options
            .connection_pool
            .as_ref()
            .map_or(0, |pool| pool.available(&dialer.pool_key));
        // (A count the caller set stays: a multifd channel's session has one bulk connection.)
        let first_wave = options
            .initial_bulk_connections
            .unwrap_or(
                options
                    .minimum_bulk_connections
                    .max(options.parallel_start_connections)
                    .max(parked.saturating_sub(1) as u32),
            )
            .clamp(
                options.minimum_bulk_connections,
                options.maximum_bulk_connections,
            );
        let dial_bulk = |index: u32, round_trip: Option<Duration>| {
            let dialer = dialer.clone();
            let options = options.clone();
            tokio::spawn(async move {
                let hello = Hello {
                    code: ConnectionPurpose::Bulk as u8,
                    session_id,
                    connection_index: index,
                    bulk_receive_window: options.bulk_receive_window_bytes,
                    control_receive_window: options.control_window_bytes,
                };
                dial(&dialer, &options, hello, round_trip, None, true).await
            })
        };
        let mut early_bulk: Vec<_> = (1..=first_wave)
            .map(|index| dial_bulk(index, None))
            .collect();
        let (round_trip_measured, round_trip) = oneshot::channel();
        let second_wave = async {
            let Ok(round_trip) = round_trip.await else {
                return (first_wave, Vec::new());
            };
            let wanted = initial_bulk_count(&options, round_trip).max(first_wave);
            (
                wanted,
                (first_wave + 1..=wanted)
                    .map(|index| dial_bulk(index, Some(round_trip)))
                    .collect::<Vec<_>>(),
            )
        };
        let control = dial(
            &dialer,
            &options,
            Hello {
                code: ConnectionPurpose::OpenSession as u8,
                session_id,
                connection_index: 0,
                bulk_receive_window: options.bulk_receive_window_bytes,
                control_receive_window: options.control_window_bytes,
            },
            None,
            Some(round_trip_measured),
            true,
        );
        let (established, (initial_bulk_connections, second_wave)) =
            tokio::join!(control, second_wave);
        early_bulk.extend(second_wave);
        let established = match established {
            Ok(established) => established,
            Err(error) => {
                for handle in &early_bulk {
                    handle.abort();
                }
                return Err(error);
            }
        };
        // The listener's windows arrive with its hello reply; until then the protocol's early
        // window bounds what is sent (see `frame`).
        let shared = SessionShared::new(
            session_id,
            established.peer_fingerprint,
            options.clone(),
            EARLY_WINDOW_BYTES,
            EARLY_WINDOW_BYTES,
            Some(dialer),
        );
        {
            let mut core = shared.lock();
            core.key_exchange_group = established.key_exchange_group.clone();
            core.congestion_control = established.congestion_control.clone();
            core.round_trip_estimate = Some(established.tcp_connect_time);
            core.target_bulk_connections = initial_bulk_connections;
            core.first_control_reused = established.reused;
        }
        tracing::info!(
            session = %shared.session_name,
            peer = %address,
            peer_fingerprint = %shared.peer_fingerprint,
            key_exchange_group = ?established.key_exchange_group,
            congestion_control = ?established.congestion_control,
            round_trip_ms = established.tcp_connect_time.as_secs_f64() * 1e3,
            bulk_connections = initial_bulk_connections,
            parked_connections = parked,
            per_connection_window = options.per_connection_window_bytes,
            bandwidth_hint = options.bandwidth_hint_bytes_per_second,
            setup_ms = dial_started.elapsed().as_secs_f64() * 1e3,
            "transport session opened"
        );
        tokio::spawn(maintain_connection(
            shared.clone(),
            Lane::Control,
            0,
            Some((established.stream, established.hello, established.reused)),
        ));
        // The session is open with its control connection: a bulk connection still on its way
        // (a lost packet in its handshake costs a retransmission) joins when it is up, instead
        // of holding the session's first frames back until every one is.
        for (position, handle) in early_bulk.into_iter().enumerate() {
            let shared = shared.clone();
            tokio::spawn(async move {
                let first = match handle.await {
                    Ok(Ok(bulk)) if bulk.peer_fingerprint == shared.peer_fingerprint => {
                        Some((bulk.stream, bulk.hello, bulk.reused))
                    }
                    Ok(Ok(_)) => {
                        tracing::warn!(session = %shared.session_name, "bulk connection reached a different peer");
                        None
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(session = %shared.session_name, error = %error, "early bulk connection failed");
                        None
                    }
                    Err(_) => None,
                };
                maintain_connection(shared, Lane::Bulk, position as u32 + 1, first).await;
            });
        }
        tokio::spawn(supervise(shared.clone()));
        Ok(Session { shared })
    }

    /// Waits until the listener has accepted the session. `connect` returns as soon as the
    /// dialer's side of the TLS handshake is done and its hello is sent (data may follow at
    /// once); a listener that refuses this host (an untrusted certificate, a refused hello)
    /// says so a round trip later. The error is then the one that closed the session's first
    /// connection (as `connect` returned it before protocol version 4). Returns at once on the
    /// listener's side.
    pub async fn opened(&self) -> Result<(), TransportError> {
        let shared = &self.shared;
        self.wait_on_senders(|core| {
            if core.peer_opened {
                Some(Ok(()))
            } else if let Some(error) = &core.open_error {
                Some(Err(error.replica()))
            } else if !matches!(core.state, SessionState::Open) {
                Some(Err(shared.terminal_error_locked(core)))
            } else {
                None
            }
        })
        .await
    }

    /// Queues bulk data; waits while the send window is full (backpressure from the receiver).
    pub async fn send(&self, data: Bytes) -> Result<(), TransportError> {
        let mut data = data;
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(self.shared.options.max_frame_payload));
            self.shared.enqueue(Lane::Bulk, chunk, false).await?;
        }
        Ok(())
    }

    /// Ends the bulk stream: the peer's `recv` returns `None` after the last byte.
    pub async fn finish(&self) -> Result<(), TransportError> {
        if self.shared.lock().bulk_out.end_of_stream_queued() {
            return Ok(());
        }
        self.shared.enqueue(Lane::Bulk, Bytes::new(), true).await
    }

    /// The next bulk data in order; `None` after the peer called `finish`.
    pub async fn recv(&self) -> Result<Option<Bytes>, TransportError> {
        let shared = &self.shared;
        loop {
            let notified = pin!(shared.bulk_readers.notified());
            let mut notified = notified;
            notified.as_mut().enable();
            {
                let mut core = shared.lock();
                if core.bulk_end_delivered {
                    return Ok(None);
                }
                if let SessionState::Failed(_) = core.state {
                    return Err(shared.terminal_error_locked(&core));
                }
                if let Some(delivery) = core.bulk_in.take_next() {
                    core.bulk_in.mark_consumed(delivery.charge);
                    if delivery.end_of_stream {
                        core.bulk_end_delivered = true;
                    }
                    drop(core);
                    shared.control_writer.notify_waiters();
                    if delivery.end_of_stream {
                        return Ok(None);
                    }
                    return Ok(Some(delivery.payload));
                }
                if matches!(core.state, SessionState::PeerClosed | SessionState::Closed) {
                    return Err(shared.terminal_error_locked(&core));
                }
            }
            notified.await;
        }
    }

    /// Waits until the peer has received everything queued so far (bulk and control).
    pub async fn flush(&self) -> Result<(), TransportError> {
        self.wait_for_acknowledgements(|core| {
            core.bulk_out.all_acknowledged() && core.control_out.all_acknowledged()
        })
        .await
    }

    /// Waits until the bulk data this side holds (queued, or sent and not yet acknowledged:
    /// [`SessionStats::send_buffered_bytes`]) is at most `bytes`.
    pub async fn bulk_buffered_at_most(&self, bytes: u64) -> Result<(), TransportError> {
        self.wait_for_acknowledgements(|core| core.bulk_out.buffered_bytes() <= bytes)
            .await
    }

    /// Waits until `done` holds, checking again after each acknowledgement that freed room;
    /// fails with the session.
    async fn wait_for_acknowledgements(
        &self,
        done: impl Fn(&SessionCore) -> bool,
    ) -> Result<(), TransportError> {
        let shared = &self.shared;
        self.wait_on_senders(|core| {
            if done(core) {
                Some(Ok(()))
            } else if matches!(core.state, SessionState::Failed(_) | SessionState::Closed) {
                Some(Err(shared.terminal_error_locked(core)))
            } else {
                None
            }
        })
        .await
    }

    /// Checks `outcome` under the session's lock whenever senders are woken (an
    /// acknowledgement, the listener's answer, a failure) until it gives a result.
    async fn wait_on_senders(
        &self,
        outcome: impl Fn(&SessionCore) -> Option<Result<(), TransportError>>,
    ) -> Result<(), TransportError> {
        loop {
            let notified = pin!(self.shared.senders.notified());
            let mut notified = notified;
            notified.as_mut().enable();
            if let Some(result) = outcome(&self.shared.lock()) {
                return result;
            }
            notified.await;
        }
    }

    /// Ends the bulk stream if not done yet, waits until the peer has received everything sent,
    /// tells the peer the session is closing, and shuts the session down. The goodbye itself is
    /// best effort (bounded by a short wait): everything that matters was acknowledged before it.
    pub async fn close(self) -> Result<(), TransportError> {
        if self.shared.lock().state == SessionState::Open {
            self.finish().await?;
            self.flush().await?;
            self.shared
                .enqueue(Lane::Control, Bytes::new(), true)
                .await?;
            let goodbye_wait = self
                .shared
                .lock()
                .round_trip_estimate
                .unwrap_or(Duration::from_millis(100))
                .saturating_mul(4)
                .clamp(Duration::from_millis(50), Duration::from_secs(2));
            let _ = tokio::time::timeout(goodbye_wait, self.flush()).await;
        }
        self.shared.shut_down();
        Ok(())
    }

    /// Changes the bulk send window while the session runs, within the configured
    /// `bulk_send_window_bytes` (so the memory bound stays). A sender that must not queue much
    /// beyond the path (a live migration: queued data is what the guest's final pause waits for)
    /// keeps it near twice the bandwidth-delay product it measures. Returns the window set.
    pub fn set_bulk_send_window(&self, bytes: u64) -> u64 {
        let bytes = bytes.clamp(1, self.shared.options.bulk_send_window_bytes);
        self.shared.lock().bulk_out.set_send_window(bytes);
        // Senders waiting for room may fit now.
        self.shared.senders.notify_waiters();
        bytes
    }

    /// Changes how long the session waits for a lost connection to come back before it fails
    /// (`SessionOptions::resume_timeout`), from now on; a wait already under way is measured
    /// against the new limit. Each side keeps its own: a peer whose limit ends first fails the
    /// session for both. A post-copy migration, say, waits far longer once the guest depends on
    /// the link than while it could still fall back to the source.
    pub fn set_resume_timeout(&self, timeout: Duration) {
        self.shared.lock().resume_timeout = timeout;
    }

    /// Keeps the bulk connections sending padding, for at most `duration`, until the first
    /// frame is queued: a session opened before its data is ready (a migration's, while the
    /// destination prepares) then starts with connections whose congestion control has ramped
    /// up, instead of spending its first round trips in TCP's start-up. Padding is paced like
    /// data, follows each socket's backpressure (so at most a socket's unsent limit of it waits
    /// ahead of the first frame), is dropped by the peer and never resent. Counted in
    /// [`SessionStats::bulk_padding_bytes_sent`]. A connection a finished session parked (see
    /// [`ConnectionPool`]) sends none: it has ramped up, and its window of padding in flight
    /// (two bandwidth-delay products of BBR's) would hold the first frames back.
    pub fn warm_up(&self, duration: Duration) {
        self.shared.lock().warm_up_until = Some(Instant::now() + duration);
        self.shared.bulk_writers.notify_waiters();
    }

    /// Caps the rate this side's bulk connections send at together, bytes per second of IP
    /// packets (`None` lifts the cap), from now on; the cap is shared evenly between the live
    /// connections and follows their number, and the session raises it by half whenever the
    /// rate over a pacing check (`SessionOptions::pacing_check_interval`) fills
    /// [`crate::policy::PACING_FULL`] of it (the link carries more than forecast). A sender
    /// with a forecast of the link sets it to [`crate::policy::pacing_limit_for`] of the
    /// forecast: see there for why.
    pub fn set_bulk_pacing_limit(&self, bytes_per_second: Option<u64>) {
        let mut core = self.shared.lock();
        core.bulk_pacing_limit = bytes_per_second;
        self.shared.share_pacing_limit(&core);
    }

    /// The bulk send window in effect.
    pub fn bulk_send_window(&self) -> u64 {
        self.shared.lock().bulk_out.send_window()
    }

    pub fn control(&self) -> ControlChannel {
        ControlChannel {
            shared: self.shared.clone(),
        }
    }

    pub fn session_id(&self) -> SessionId {
        self.shared.session_id
    }

    pub fn peer_fingerprint(&self) -> Fingerprint {
        self.shared.peer_fingerprint
    }

    pub fn stats(&self) -> SessionStats {
        let core = self.shared.lock();
        SessionStats {
            session_id: self.shared.session_name.clone(),
            peer_fingerprint: self.shared.peer_fingerprint,
            key_exchange_group: core.key_exchange_group.clone(),
            congestion_control: core.congestion_control.clone(),
            bulk_connections: core
                .live_connections
                .values()
                .filter(|lane| **lane == Lane::Bulk)
                .count() as u32,
            target_bulk_connections: core.target_bulk_connections,
            control_connected: core
                .live_connections
                .values()
                .any(|lane| *lane == Lane::Control),
            bulk_bytes_sent: core.bulk_out.payload_bytes_enqueued,
            bulk_bytes_acknowledged: core.bulk_out.payload_bytes_acknowledged,
            bulk_bytes_received: core.bulk_in.payload_bytes_received,
            bulk_bytes_retransmitted: core.bulk_out.payload_bytes_retransmitted,
            bulk_bytes_hedged: core.bulk_out.payload_bytes_hedged,
            duplicate_frames_received: core.bulk_in.duplicate_frames
                + core.control_in.duplicate_frames,
            send_buffered_bytes: core.bulk_out.buffered_bytes(),
            bulk_unsent_bytes: core.bulk_out.unsent_bytes(),
            receive_buffered_bytes: core.bulk_in.held_bytes(),
            reconnections: core.reconnections,
            disconnected_for: core.disconnected_since.map(|since| since.elapsed()),
            round_trip_estimate: core.round_trip_estimate,
            measured_rate_bytes_per_second: core.measured_rate_bytes_per_second,
            bulk_send_window_holds: core.bulk_out.send_window_holds,
            bulk_send_window_starved: core.bulk_out.send_window_starved,
            bulk_credit_holds: core.bulk_out.credit_holds,
            bulk_pacing_limit_bytes_per_second: core.bulk_pacing_limit,
            bulk_padding_bytes_sent: core.padding_bytes_sent,
            bulk_padding_bytes_received: core.padding_bytes_received,
        }
    }
}

/// A connection whose hello is sent; its reply is read by [`read_frames`] before any frame.
struct EstablishedConnection {
    stream: TlsStream<TcpStream>,
    hello: Hello,
    peer_fingerprint: Fingerprint,
    key_exchange_group: Option<String>,
    congestion_control: Option<String>,
    /// The TCP handshake's duration, or for a parked connection the last known round trip.
    tcp_connect_time: Duration,
    /// A connection a finished session parked (see [`ConnectionPool`]).
    reused: bool,
}

/// The bulk connections a dialer starts with once the round trip is known: `options`'
/// `initial_bulk_connections`, else enough to cover the bandwidth-delay product by the
/// connections' windows and by the start-up share, within the minimum and maximum.
fn initial_bulk_count(options: &SessionOptions, round_trip: Duration) -> u32 {
    let wanted = options.initial_bulk_connections.unwrap_or_else(|| {
        let round_trip = round_trip.as_secs_f64();
        initial_stream_count(
            options.bandwidth_hint_bytes_per_second,
            round_trip,
            options.per_connection_window_bytes,
            options.minimum_bulk_connections,
            options.maximum_bulk_connections,
        )
        .max(startup_stream_count(
            options.bandwidth_hint_bytes_per_second,
            round_trip,
            options.startup_share_bytes,
        ))
    });
    wanted.clamp(
        options.minimum_bulk_connections,
        options.maximum_bulk_connections,
    )
}

/// Opens one connection of a session: TCP (a second SYN beside the first when its answer is
/// late, see [`socket::hedge_after`]; `round_trip` is the one known to the peer, if any), TLS,
/// hello. Does not wait for the hello's reply: the connection's frames follow the hello at once
/// and [`read_frames`] reads the reply first. `round_trip_measured` hears the TCP handshake's
/// duration (a round trip) as soon as it is known. With `parked`, a connection a finished
/// session parked is used when there is one (a session's first connections; one dialed again
/// after a loss is new: a parked connection that looked open may not be).
async fn dial(
    dialer: &DialerContext,
    options: &SessionOptions,
    hello: Hello,
    round_trip: Option<Duration>,
    round_trip_measured: Option<oneshot::Sender<Duration>>,
    parked: bool,
) -> Result<EstablishedConnection, TransportError> {
    let peer = dialer.address;
    if let Some(pool) = options.connection_pool.as_ref().filter(|_| parked) {
        while let Some(parked) = pool.take(&dialer.pool_key) {
            match reuse_parked(parked, options, hello, peer).await {
                Ok(established) => {
                    if let Some(measured) = round_trip_measured {
                        let _ = measured.send(established.tcp_connect_time);
                    }
                    return Ok(established);
                }
                Err(error) => {
                    tracing::debug!(%peer, error = %error, "parked transport connection unusable")
                }
            }
        }
    }
    let attempt = async {
        let (tcp, tcp_connect_time, second_won) = socket::connect_hedged(
            peer,
            options.congestion_control.as_deref(),
            socket::hedge_after(round_trip),
        )
        .await
        .map_err(|source| TransportError::Io {
            action: "connecting",
            peer,
            source,
        })?;
        if second_won {
            tracing::debug!(
                %peer,
                connection_index = hello.connection_index,
                "transport connection made by a second attempt: the first SYN's answer was late"
            );
        }
        if let Some(measured) = round_trip_measured {
            let _ = measured.send(tcp_connect_time);
        }
        let congestion_control = socket::configure_connected(
            &tcp,
            options.congestion_control.as_deref(),
            options.unsent_limit_bytes,
        );
        let mut stream = dialer
            .connector
            .connect(dialer.server_name.clone(), tcp)
            .await
            .map_err(|source| TransportError::Handshake { peer, source })?;
        let (_, connection) = stream.get_ref();
        let (peer_fingerprint, key_exchange_group) =
            peer_identity(connection, peer, "no peer certificate")?;
        let io_error = |action| {
            move |source| TransportError::Io {
                action,
                peer,
                source,
            }
        };
        stream
            .write_all(&hello.encode())
            .await
            .map_err(io_error("sending hello"))?;
        stream.flush().await.map_err(io_error("sending hello"))?;
        Ok(EstablishedConnection {
            stream: TlsStream::Client(stream),
            hello,
            peer_fingerprint,
            key_exchange_group,
            congestion_control,
            tcp_connect_time,
            reused: false,
        })
    };
    tokio::time::timeout(options.handshake_timeout, attempt)
        .await
        .map_err(|_| TransportError::Io {
            action: "establishing a connection",
            peer,
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"),
        })?
}

/// The peer's certificate fingerprint on an authenticated connection (refused with `missing`
/// without one), and the key exchange group its TLS handshake negotiated.
fn peer_identity(
    connection: &rustls::CommonState,
    peer: SocketAddr,
    missing: &str,
) -> Result<(Fingerprint, Option<String>), TransportError> {
    let fingerprint = connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|certificate| Fingerprint::of_certificate(certificate.as_ref()))
        .ok_or_else(|| TransportError::Refused {
            peer,
            reason: missing.to_string(),
        })?;
    let key_exchange_group = connection
        .negotiated_key_exchange_group()
        .map(|group| format!("{:?}", group.name()));
    Ok((fingerprint, key_exchange_group))
}

/// Sends `hello` on a connection a finished session parked: no TCP or TLS handshake, and the
/// socket's congestion state (its rate) is the one that session left.
async fn reuse_parked(
    parked: crate::pool::Parked,
    options: &SessionOptions,
    hello: Hello,
    peer: SocketAddr,
) -> Result<EstablishedConnection, TransportError> {
    let mut stream = parked.stream;
    let (tcp, connection) = stream.get_ref();
    let congestion_control = socket::configure_connected(
        tcp,
        options.congestion_control.as_deref(),
        options.unsent_limit_bytes,
    );
    let (peer_fingerprint, key_exchange_group) =
        peer_identity(connection, peer, "no peer certificate")?;
    let sent = async {
        stream.write_all(&hello.encode()).await?;
        stream.flush().await
    };
    tokio::time::timeout(options.handshake_timeout, sent)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
        .map_err(|source| TransportError::Io {
            action: "sending hello",
            peer,
            source,
        })?;
    Ok(EstablishedConnection {
        stream,
        hello,
        peer_fingerprint,
        key_exchange_group,
        congestion_control,
        tcp_connect_time: parked.round_trip,
        reused: true,
    })
}

/// Dialer side: keeps one connection slot alive, re-dialing after a loss, until the session ends.
async fn maintain_connection(
    shared: Arc<SessionShared>,
    lane: Lane,
    index: u32,
    mut first: Option<(TlsStream<TcpStream>, Hello, bool)>,
) {
    let Some(dialer) = shared.dialer.as_ref() else {
        return;
    };
    let mut backoff = Duration::from_millis(20);
    let mut shutdown = shared.shutdown.subscribe();
    // A connection the policy added (or one whose first dial failed) is not a reconnection
    // until this slot has had one and lost it.
    let mut had_connection = first.is_some();
    loop {
        if shared.is_terminal() || shared.lock().state == SessionState::PeerClosed {
            return;
        }
        let stream = match first.take() {
            Some(stream) => Some(stream),
            None => {
                let purpose = match lane {
                    // A parked first connection that turned out dead never reached the
                    // listener: the session is opened again on a new one.
                    Lane::Control
                        if {
                            let core = shared.lock();
                            core.first_control_reused && !core.peer_opened
                        } =>
                    {
                        ConnectionPurpose::OpenSession
                    }
                    Lane::Control => ConnectionPurpose::ResumeControl,
                    Lane::Bulk => ConnectionPurpose::Bulk,
                };
                let hello = Hello {
                    code: purpose as u8,
                    session_id: shared.session_id,
                    connection_index: index,
                    bulk_receive_window: shared.options.bulk_receive_window_bytes,
                    control_receive_window: shared.options.control_window_bytes,
                };
                let round_trip = shared.lock().round_trip_estimate;
                match dial(dialer, &shared.options, hello, round_trip, None, false).await {
                    Ok(established) if established.peer_fingerprint != shared.peer_fingerprint => {
                        shared.fail("peer identity changed on reconnection".to_string());
                        return;
                    }
                    Ok(established) => {
                        if had_connection {
                            shared.lock().reconnections += 1;
                        }
                        had_connection = true;
                        Some((established.stream, established.hello, false))
                    }
                    Err(error) => {
                        tracing::debug!(
                            session = %shared.session_name, index, error = %error,
                            "transport reconnection attempt failed"
                        );
                        None
                    }
                }
            }
        };
        if let Some((stream, hello, reused)) = stream {
            backoff = Duration::from_millis(20);
            let parked =
                run_connection(&shared, stream, lane, Some(index), Some(hello), reused).await;
            if let (Some(stream), Some(pool)) = (parked, &shared.options.connection_pool) {
                let round_trip = shared
                    .lock()
                    .round_trip_estimate
                    .unwrap_or(Duration::from_millis(100));
                pool.put(dialer.pool_key.clone(), stream, round_trip);
            }
        }
        if shared.is_terminal() || shared.lock().retiring.remove(&index) {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = wait_for_shutdown(&mut shutdown) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Runs one authenticated connection until it fails or the session ends. Returns the
/// connection when both sides parked it (see `frame`), for another session.
/// `index` is the dialer's connection index (`None` on the listener's side, which never
/// retires a connection: the dialer closes it). `hello` is the dialer's hello whose reply is
/// still to be read (`None` on the listener's side). `reused`: a connection a finished
/// session parked, whose congestion control needs no warm-up (see [`Session::warm_up`]).
async fn run_connection(
    shared: &Arc<SessionShared>,
    stream: TlsStream<TcpStream>,
    lane: Lane,
    index: Option<u32>,
    hello: Option<Hello>,
    reused: bool,
) -> Option<TlsStream<TcpStream>> {
    let connection_id = shared.register_connection(lane);
    let peer = stream
        .get_ref()
        .0
        .peer_addr()
        .unwrap_or_else(|_| unspecified_peer());
    // The pacing cap is set through a second descriptor of the same socket (the stream is
    // split below); it is closed with this function, right after the stream's halves.
    let pacing_handle = (lane == Lane::Bulk)
        .then(|| socket2::SockRef::from(stream.get_ref().0).try_clone())
        .and_then(|handle| {
            handle
                .inspect_err(|error| tracing::debug!(%error, "cannot pace transport socket"))
                .ok()
        });
    let (reader, writer) = tokio::io::split(stream);
    let mut reader = BufReader::with_capacity(IO_BUFFER_BYTES, reader);
    let mut writer = BufWriter::with_capacity(IO_BUFFER_BYTES, writer);
    let mut shutdown = shared.shutdown.subscribe();
    let may_park = shared.may_park();
    let replied = AtomicBool::new(hello.is_none());
    let (outcome, parked) = {
        let reading = pin!(read_frames(
            shared,
            &mut reader,
            peer,
            hello,
            &replied,
            connection_id
        ));
        let writing = pin!(async {
            match lane {
                Lane::Bulk => {
                    write_bulk(shared, &mut writer, connection_id, index, peer, !reused).await
                }
                Lane::Control => write_control(shared, &mut writer, connection_id, peer).await,
            }
        });
        let (mut reading, mut writing) = (reading, writing);
        let first = tokio::select! {
            _ = pace_connection(shared, pacing_handle.as_ref()) => ConnectionStep::Other,
            result = &mut reading => ConnectionStep::Read(result),
            result = &mut writing => ConnectionStep::Wrote(result),
            // A session that parks its connections gives them a moment to (its writers send
            // the park frames), then closes those still open.
            _ = async {
                wait_for_shutdown(&mut shutdown).await;
                if may_park {
                    tokio::time::sleep(PARK_WAIT).await;
                }
            } => ConnectionStep::Other,
        };
        match first {
            // The peer parked the connection: so does this side's writer, once it has
            // finished the frame it may be writing.
            ConnectionStep::Read(Ok(())) => {
                let parked = tokio::time::timeout(PARK_WAIT, &mut writing).await;
                (Ok(()), matches!(parked, Ok(Ok(WriterEnd::Parked))))
            }
            // This side parked it: read on until the peer's park frame.
            ConnectionStep::Wrote(Ok(WriterEnd::Parked)) => {
                match tokio::time::timeout(PARK_WAIT, &mut reading).await {
                    Ok(Ok(())) => (Ok(()), true),
                    Ok(Err(error)) => (Err(error), false),
                    Err(_) => (Ok(()), false),
                }
            }
            ConnectionStep::Wrote(Ok(WriterEnd::Closed)) | ConnectionStep::Other => (Ok(()), false),
            ConnectionStep::Read(Err(error)) | ConnectionStep::Wrote(Err(error)) => {
                (Err(error), false)
            }
        }
    };
    shared.connection_lost(connection_id);
    let opened = shared.lock().peer_opened;
    let bulk = hello.and_then(|hello| hello.purpose()) == Some(ConnectionPurpose::Bulk);
    let refusal = |error: &TransportError| match error {
        // A bulk connection may reach the listener before the session's first connection
        // does (it waits for it a while): dialed again, as any lost connection.
        TransportError::Refused { .. } => opened || !bulk,
        // A listener that does not trust this host's certificate says so once the dialer's
        // side of the TLS handshake is done (TLS 1.3), instead of the hello's reply.
        _ => !replied.load(Ordering::Relaxed) && is_tls_alert(error),
    };
    match outcome {
        // Refused: nothing to resume. Other losses, before the reply too, are resumed like
        // any (the listener may hold the session already).
        Err(error) if refusal(&error) => {
            if opened {
                let cause = std::error::Error::source(&error)
                    .map(|source| format!(": {source}"))
                    .unwrap_or_default();
                shared.fail(format!("{error}{cause}"));
            } else {
                shared.fail_to_open(error);
            }
        }
        Ok(()) => {}
        Err(error @ (TransportError::Protocol { .. } | TransportError::FrameIntegrity { .. })) => {
            shared.fail(error.to_string());
        }
        Err(error) => {
            tracing::debug!(session = %shared.session_name, connection_id, error = %error, "transport connection ended");
        }
    }
    // Both park frames crossed: nothing of this session follows on the connection.
    if !parked || !reader.buffer().is_empty() || !writer.buffer().is_empty() {
        return None;
    }
    if let Some(handle) = &pacing_handle
        && let Err(error) = crate::sys::set_max_pacing_rate(handle, None)
    {
        tracing::debug!(%error, "cannot lift a parked connection's pacing cap");
        return None;
    }
    tracing::debug!(session = %shared.session_name, connection_id, "transport connection parked");
    Some(reader.into_inner().unsplit(writer.into_inner()))
}

/// What ended the first part of a connection's run (see `run_connection`).
enum ConnectionStep {
    /// The reader: an error, or the peer's park frame (`Ok`).
    Read(Result<(), TransportError>),
    Wrote(Result<WriterEnd, TransportError>),
    /// The session's end, or its pacing task.
    Other,
}

/// Whether an I/O error is the peer's TLS alert (a refusal, not a lost connection).
fn is_tls_alert(error: &TransportError) -> bool {
    let (TransportError::Io { source, .. } | TransportError::Handshake { source, .. }) = error
    else {
        return false;
    };
    source
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|inner| matches!(inner, rustls::Error::AlertReceived(_)))
}

/// Keeps a bulk connection's pacing cap at its share of the session's limit; never returns
/// while the session lives.
async fn pace_connection(shared: &SessionShared, socket: Option<&socket2::Socket>) {
    let Some(socket) = socket else {
        return std::future::pending().await;
    };
    let mut share = shared.bulk_pacing_share.subscribe();
    let mut applied = None;
    loop {
        let wanted = *share.borrow_and_update();
        if wanted != applied {
            match crate::sys::set_max_pacing_rate(socket, wanted) {
                Ok(()) => applied = wanted,
                Err(error) => {
                    tracing::debug!(%error, "cannot set the pacing cap of a transport socket");
                }
            }
        }
        if share.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Reads the hello's reply (dialer) and then frames, until an error or the peer's park frame
/// (`Ok`: the peer sends nothing more on this connection).
async fn read_frames(
    shared: &SessionShared,
    reader: &mut BufReader<ReadHalf<TlsStream<TcpStream>>>,
    peer: SocketAddr,
    hello: Option<Hello>,
    replied: &AtomicBool,
    connection_id: u64,
) -> Result<(), TransportError> {
    if let Some(hello) = hello {
        let mut reply = [0u8; HELLO_LEN];
        tokio::time::timeout(
            shared.options.handshake_timeout,
            reader.read_exact(&mut reply),
        )
        .await
        .map_err(|_| TransportError::Io {
            action: "reading hello reply",
            peer,
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "no hello reply"),
        })?
        .map_err(|source| TransportError::Io {
            action: "reading hello reply",
            peer,
            source,
        })?;
        let reply = Hello::decode(&reply).map_err(|status| TransportError::Refused {
            peer,
            reason: format!("bad hello reply: {}", status.describe()),
        })?;
        if reply.status() != HelloStatus::Accepted || reply.session_id != hello.session_id {
            return Err(TransportError::Refused {
                peer,
                reason: reply.status().describe().to_string(),
            });
        }
        replied.store(true, Ordering::Relaxed);
        shared.on_hello_reply(&reply);
    }
    let io_error = |source| TransportError::Io {
        action: "reading frames",
        peer,
        source,
    };
    loop {
        let mut header_bytes = [0u8; FRAME_HEADER_LEN];
        reader
            .read_exact(&mut header_bytes)
            .await
            .map_err(io_error)?;
        let header = FrameHeader::decode(&header_bytes)?;
        if header.kind == FrameKind::Park {
            let mut tag = [0u8; FRAME_TAG_LEN];
            reader.read_exact(&mut tag).await.map_err(io_error)?;
            if frame_tag(&header_bytes, &[]) != tag {
                return Err(TransportError::FrameIntegrity {
                    channel: header.channel as u8,
                    sequence: header.sequence,
                });
            }
            shared.on_peer_park(connection_id);
            return Ok(());
        }
        // Read into spare capacity: a frame's megabyte is not zeroed before it is overwritten.
        let length = header.payload_len as usize;
        let mut payload = BytesMut::with_capacity(length);
        while payload.len() < length {
            let read = (&mut *reader)
                .take((length - payload.len()) as u64)
                .read_buf(&mut payload)
                .await
                .map_err(io_error)?;
            if read == 0 {
                return Err(io_error(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
        let mut tag = [0u8; FRAME_TAG_LEN];
        reader.read_exact(&mut tag).await.map_err(io_error)?;
        if frame_tag(&header_bytes, &payload) != tag {
            return Err(TransportError::FrameIntegrity {
                channel: header.channel as u8,
                sequence: header.sequence,
            });
        }
        shared.on_frame(header, payload.freeze())?;
    }
}

/// Resolves once the session or listener is shut down (or its sender is gone).
async fn wait_for_shutdown(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stopped| *stopped).await;
}

fn unspecified_peer() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

async fn write_frame(
    writer: &mut ConnectionWriter,
    header: FrameHeader,
    payload: &[u8],
    peer: SocketAddr,
) -> Result<(), TransportError> {
    let header_bytes = header.encode();
    let tag = frame_tag(&header_bytes, payload);
    let io_error = |source| TransportError::Io {
        action: "writing frames",
        peer,
        source,
    };
    writer.write_all(&header_bytes).await.map_err(io_error)?;
    writer.write_all(payload).await.map_err(io_error)?;
    writer.write_all(&tag).await.map_err(io_error)?;
    Ok(())
}

fn data_header(channel: Channel, transmission: &Transmission) -> FrameHeader {
    FrameHeader {
        kind: FrameKind::Data,
        channel,
        end_of_stream: transmission.end_of_stream,
        payload_len: transmission.payload.len() as u32,
        sequence: transmission.sequence,
    }
}

type ConnectionWriter = BufWriter<WriteHalf<TlsStream<TcpStream>>>;

/// Whether a connection's writer stops, and how: a failed session closes its connections; one
/// that shut down parks them when it may (see [`SessionShared::shut_down`]), as does any
/// connection the peer parked.
fn writer_end(core: &SessionCore, connection_id: u64) -> Option<WriterEnd> {
    match core.state {
        SessionState::Failed(_) => Some(WriterEnd::Closed),
        _ if core.parking || core.parking_connections.contains(&connection_id) => {
            Some(WriterEnd::Parked)
        }
        SessionState::Closed => Some(WriterEnd::Closed),
        SessionState::Open | SessionState::PeerClosed => None,
    }
}

/// Flushes what the writer holds, then sends the park frame: the last this side sends on the
/// connection for its session.
async fn write_park(
    writer: &mut ConnectionWriter,
    peer: SocketAddr,
) -> Result<WriterEnd, TransportError> {
    let header = FrameHeader {
        kind: FrameKind::Park,
        channel: Channel::Control,
        end_of_stream: false,
        payload_len: 0,
        sequence: 0,
    };
    write_frame(writer, header, &[], peer).await?;
    writer.flush().await.map_err(|source| TransportError::Io {
        action: "flushing frames",
        peer,
        source,
    })?;
    Ok(WriterEnd::Parked)
}

/// Sends the bulk frames this connection takes; while the session warms up (and `may_pad`:
/// a new connection, not a parked one that kept its rate), padding.
async fn write_bulk(
    shared: &SessionShared,
    writer: &mut ConnectionWriter,
    connection_id: u64,
    index: Option<u32>,
    peer: SocketAddr,
    may_pad: bool,
) -> Result<WriterEnd, TransportError> {
    loop {
        let notified = pin!(shared.bulk_writers.notified());
        let mut notified = notified;
        notified.as_mut().enable();
        let end = writer_end(&shared.lock(), connection_id);
        match end {
            Some(WriterEnd::Parked) => return write_park(writer, peer).await,
            Some(WriterEnd::Closed) => return Ok(WriterEnd::Closed),
            None => {}
        }
        let (transmission, retired, hedge_due, pad) = {
            let mut core = shared.lock();
            let pad = may_pad && warming_up(&core, Instant::now());
            if index.is_some_and(|index| core.retiring.contains(&index)) {
                // Retiring: no new frames; close once the peer has every frame sent here.
                (
                    None,
                    !core.bulk_out.unacknowledged_on(connection_id),
                    None,
                    false,
                )
            } else {
                let now = Instant::now();
                let hedge = shared.options.hedge_overdue_frames;
                // Nothing new to send at the stream's end: an overdue frame of another
                // connection, sent again here.
                match core
                    .bulk_out
                    .next_transmission(connection_id, now)
                    .or_else(|| {
                        hedge
                            .then(|| core.bulk_out.next_hedge(connection_id, now))
                            .flatten()
                    }) {
                    Some(transmission) => (Some(transmission), false, None, false),
                    None => (
                        None,
                        false,
                        hedge
                            .then(|| core.bulk_out.next_hedge_due(connection_id))
                            .flatten(),
                        pad,
                    ),
                }
            }
        };
        if retired {
            writer.flush().await.map_err(|source| TransportError::Io {
                action: "flushing frames",
                peer,
                source,
            })?;
            tracing::info!(session = %shared.session_name, connection_id, "transport bulk connection closed: it did not raise the rate");
            return Ok(WriterEnd::Closed);
        }
        match transmission {
            Some(transmission) => {
                write_frame(
                    writer,
                    data_header(Channel::Bulk, &transmission),
                    &transmission.payload,
                    peer,
                )
                .await?;
            }
            None if pad => {
                let padding = &PADDING[..PADDING.len().min(shared.options.max_frame_payload)];
                let header = FrameHeader {
                    kind: FrameKind::Padding,
                    channel: Channel::Bulk,
                    end_of_stream: false,
                    payload_len: padding.len() as u32,
                    sequence: 0,
                };
                write_frame(writer, header, padding, peer).await?;
                // Onto the socket now: its backpressure, not this buffer, paces the padding.
                writer.flush().await.map_err(|source| TransportError::Io {
                    action: "flushing frames",
                    peer,
                    source,
                })?;
                shared.lock().padding_bytes_sent += padding.len() as u64;
            }
            None => {
                writer.flush().await.map_err(|source| TransportError::Io {
                    action: "flushing frames",
                    peer,
                    source,
                })?;
                match hedge_due {
                    Some(due) => {
                        tokio::select! {
                            () = notified => {}
                            () = tokio::time::sleep_until(due.into()) => {}
                        }
                    }
                    None => notified.await,
                }
            }
        }
    }
}

enum ControlWork {
    Data(Transmission),
    Ack(Channel, Acknowledgement),
}

async fn write_control(
    shared: &SessionShared,
    writer: &mut ConnectionWriter,
    connection_id: u64,
    peer: SocketAddr,
) -> Result<WriterEnd, TransportError> {
    loop {
        let notified = pin!(shared.control_writer.notified());
        let mut notified = notified;
        notified.as_mut().enable();
        let end = writer_end(&shared.lock(), connection_id);
        match end {
            Some(WriterEnd::Parked) => return write_park(writer, peer).await,
            Some(WriterEnd::Closed) => return Ok(WriterEnd::Closed),
            None => {}
        }
        let work = {
            let mut core = shared.lock();
            let bulk_ack = core.bulk_in.acknowledgement();
            let control_ack = core.control_in.acknowledgement();
            if core.last_control_ack_sent != Some(control_ack) {
                core.last_control_ack_sent = Some(control_ack);
                Some(ControlWork::Ack(Channel::Control, control_ack))
            } else if core.last_bulk_ack_sent != Some(bulk_ack) {
                core.last_bulk_ack_sent = Some(bulk_ack);
                Some(ControlWork::Ack(Channel::Bulk, bulk_ack))
            } else {
                core.control_out
                    .next_transmission(connection_id, Instant::now())
                    .map(ControlWork::Data)
            }
        };
        match work {
            Some(ControlWork::Data(transmission)) => {
                write_frame(
                    writer,
                    data_header(Channel::Control, &transmission),
                    &transmission.payload,
                    peer,
                )
                .await?;
            }
            Some(ControlWork::Ack(channel, ack)) => {
                let header = FrameHeader {
                    kind: FrameKind::Ack,
                    channel,
                    end_of_stream: false,
                    payload_len: crate::frame::ACK_PAYLOAD_LEN as u32,
                    sequence: 0,
                };
                write_frame(writer, header, &ack.encode(), peer).await?;
            }
            None => {
                writer.flush().await.map_err(|source| TransportError::Io {
                    action: "flushing frames",
                    peer,
                    source,
                })?;
                notified.await;
            }
        }
    }
}

/// Both roles: fails the session when it stays without connections past the resume timeout.
/// Dialer: measures the bulk rate and adds connections as the policy decides.
async fn supervise(shared: Arc<SessionShared>) {
    let mut shutdown = shared.shutdown.subscribe();
    let tick = Duration::from_millis(100).min(shared.options.measurement_interval);
    let mut policy = StreamCountPolicy::new(StreamCountPolicyConfig {
        minimum_streams: shared.options.minimum_bulk_connections,
        maximum_streams: shared.options.maximum_bulk_connections,
        ..StreamCountPolicyConfig::default()
    });
    let mut last_measurement = Instant::now();
    let mut last_bytes = 0u64;
    let (mut last_pacing_check, mut last_pacing_acknowledged) = (Instant::now(), 0u64);
    let (mut last_acknowledged, mut last_received) = (0u64, 0u64);
    let mut next_index = u32::MAX / 2;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = wait_for_shutdown(&mut shutdown) => return,
        }
        let mut core = shared.lock();
        match core.state {
            SessionState::Open => {}
            SessionState::PeerClosed => continue,
            SessionState::Closed | SessionState::Failed(_) => return,
        }
        if let Some(since) = core.disconnected_since
            && since.elapsed() > core.resume_timeout
        {
            let seconds = core.resume_timeout.as_secs();
            drop(core);
            shared.fail(
                TransportError::ResumeTimedOut {
                    session: shared.session_name.clone(),
                    seconds,
                }
                .to_string(),
            );
            return;
        }
        // Rates count from the first bulk byte: the time a session sat open before (a
        // migration's opens while the destination prepares) says nothing about the path, and
        // a first measurement diluted by it cut a migration's send window to a third.
        if core.bulk_out.payload_bytes_enqueued == 0 && core.bulk_in.payload_bytes_received == 0 {
            last_measurement = Instant::now();
            last_pacing_check = last_measurement;
            continue;
        }
        let pacing_elapsed = last_pacing_check.elapsed();
        if pacing_elapsed >= shared.options.pacing_check_interval {
            let acknowledged = core.bulk_out.payload_bytes_acknowledged;
            let rate =
                (acknowledged - last_pacing_acknowledged) as f64 / pacing_elapsed.as_secs_f64();
            if let Some(raised) = core
                .bulk_pacing_limit
                .and_then(|limit| crate::policy::raised_pacing_limit(limit, rate))
            {
                core.bulk_pacing_limit = Some(raised);
                shared.share_pacing_limit(&core);
                tracing::debug!(session = %shared.session_name, limit = raised, rate_mbit_per_second = rate * 8e-6, "transport pacing limit raised: the link carries more than forecast");
            }
            tracing::trace!(
                session = %shared.session_name,
                rate_mbit_per_second = rate * 8e-6,
                limit = core.bulk_pacing_limit,
                send_buffered = core.bulk_out.buffered_bytes(),
                "transport pacing check"
            );
            (last_pacing_check, last_pacing_acknowledged) = (Instant::now(), acknowledged);
        }
        let elapsed = last_measurement.elapsed();
        if elapsed < shared.options.measurement_interval {
            continue;
        }
        let bytes = core.bulk_out.payload_bytes_acknowledged + core.bulk_in.payload_bytes_received;
        let rate = (bytes - last_bytes) as f64 / elapsed.as_secs_f64();
        let received_any = core.bulk_in.payload_bytes_received > 0;
        let demand_exceeded_capacity = core.sender_blocked_since_measurement
            || core.bulk_out.has_pending()
            || (received_any && bytes > last_bytes);
        if let Some(observer) = &shared.options.rate_observer {
            let acknowledged = core.bulk_out.payload_bytes_acknowledged;
            let received = core.bulk_in.payload_bytes_received;
            (observer.0)(RateSample {
                peer_fingerprint: shared.peer_fingerprint,
                interval: elapsed,
                bytes_acknowledged: acknowledged - last_acknowledged,
                bytes_received: received - last_received,
                sender_backlogged: core.sender_blocked_since_measurement
                    || core.bulk_out.has_pending(),
            });
            (last_acknowledged, last_received) = (acknowledged, received);
        }
        core.sender_blocked_since_measurement = false;
        core.measured_rate_bytes_per_second = rate;
        last_measurement = Instant::now();
        last_bytes = bytes;
        let streams = core
            .live_connections
            .values()
            .filter(|lane| **lane == Lane::Bulk)
            .count() as u32;
        let target = core.target_bulk_connections;
        tracing::debug!(
            session = %shared.session_name, streams, rate_mbit_per_second = rate * 8e-6,
            demand_exceeded_capacity, phase = ?policy.phase(),
            send_buffered = core.bulk_out.buffered_bytes(),
            receive_held = core.bulk_in.held_bytes(),
            "transport rate measured"
        );
        if shared.dialer.is_none() || !shared.options.adapt_stream_count || streams < target {
            continue;
        }
        let decision = policy.on_measurement(RateMeasurement {
            streams,
            bytes_per_second: rate,
            demand_exceeded_capacity,
        });
        if let StreamCountDecision::Remove(count) = decision {
            let removed = (0..count)
                .take_while(|_| retire_last_added(&mut core))
                .count() as u32;
            drop(core);
            if removed > 0 {
                shared.bulk_writers.notify_waiters();
                tracing::info!(
                    session = %shared.session_name,
                    bulk_connections = target - removed,
                    rate_mbit_per_second = rate * 8e-6,
                    "transport closing the bulk connection added last: the rate fell with it"
                );
            }
            continue;
        }
        if let StreamCountDecision::Add(count) = decision {
            let count = count.min(
                shared
                    .options
                    .maximum_bulk_connections
                    .saturating_sub(target),
            );
            core.target_bulk_connections += count;
            let first = next_index + 1;
            next_index += count;
            core.added_bulk.extend(first..=next_index);
            drop(core);
            tracing::info!(
                session = %shared.session_name,
                bulk_connections = target + count,
                rate_mbit_per_second = rate * 8e-6,
                "transport adding bulk connections"
            );
            for index in first..=next_index {
                tokio::spawn(maintain_connection(shared.clone(), Lane::Bulk, index, None));
            }
        }
    }
}

/// Marks the bulk connection the policy added last to close once its frames are acknowledged
/// (see `write_bulk`); false when the policy added none that is still open.
fn retire_last_added(core: &mut SessionCore) -> bool {
    match core.added_bulk.pop() {
        Some(index) => {
            core.retiring.insert(index);
            core.target_bulk_connections = core.target_bulk_connections.saturating_sub(1);
            true
        }
        None => false,
    }
}

/// Counters of a listener.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerStats {
    pub connections_accepted: u64,
    /// TLS handshakes that failed (unpinned or missing certificate, garbage) or bad hellos.
    pub connections_refused: u64,
    pub sessions_opened: u64,
    /// Connections attached to an existing session (bulk connections and resumptions).
    pub connections_attached: u64,
    /// Connections closed by their peer before it sent a byte: a dialer's spare attempt that
    /// lost to its first (see `socket::connect_hedged`), or a port check.
    pub connections_abandoned: u64,
    /// Connections parked at the end of their session (see [`ConnectionPool`]).
    pub connections_parked: u64,
    /// Parked connections that carried the hello of another session.
    pub connections_reused: u64,
}

#[derive(Default)]
struct ListenerCounters {
    connections_accepted: AtomicU64,
    connections_refused: AtomicU64,
    sessions_opened: AtomicU64,
    connections_attached: AtomicU64,
    connections_abandoned: AtomicU64,
    connections_parked: AtomicU64,
    connections_reused: AtomicU64,
}

type SessionRegistry = Mutex<HashMap<(Fingerprint, SessionId), Weak<SessionShared>>>;

struct ListenerContext {
    /// Replaced in place when whom the listener trusts changes ([`Listener::set_tls`]), so the
    /// sessions it holds stay resumable.
    acceptor: Mutex<TlsAcceptor>,
    options: SessionOptions,
    registry: SessionRegistry,
    counters: ListenerCounters,
    new_sessions: mpsc::Sender<Session>,
    /// Woken whenever a session is registered.
    registered: Notify,
    /// Counts the changes of whom the listener trusts: a parked connection authenticated
    /// before the last change is closed instead of carrying another session.
    trust_generation: AtomicU64,
    /// The listener's end (parked connections stop waiting for a hello).
    shutdown: watch::Receiver<bool>,
}

/// Looks a session up; a connection may arrive just before the one that opens its session
/// (the dialer opens them together), so wait briefly for it. Only authenticated peers get here.
async fn find_session(
    context: &ListenerContext,
    key: &(Fingerprint, SessionId),
) -> Option<Arc<SessionShared>> {
    let deadline = tokio::time::Instant::now()
        + context
            .options
            .handshake_timeout
            .min(Duration::from_secs(2));
    loop {
        let notified = pin!(context.registered.notified());
        let mut notified = notified;
        notified.as_mut().enable();
        let found = context
            .registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(key)
            .and_then(Weak::upgrade);
        if found.is_some() || tokio::time::Instant::now() >= deadline {
            return found;
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

/// Accepts sessions from authenticated peers. Keep it alive as long as its sessions: dropping it
/// stops accepting connections, so its sessions can no longer be resumed after a connection loss.
pub struct Listener {
    local_address: SocketAddr,
    context: Arc<ListenerContext>,
    incoming: tokio::sync::Mutex<mpsc::Receiver<Session>>,
    shutdown: watch::Sender<bool>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

impl Listener {
    pub async fn bind(
        address: SocketAddr,
        tls: &TlsSettings,
        options: SessionOptions,
    ) -> Result<Listener, TransportError> {
        options.validate()?;
        let _ = crate::tls::warm_up_random();
        let tcp = TcpListener::bind(address)
            .await
            .map_err(|source| TransportError::Io {
                action: "binding the listener",
                peer: address,
                source,
            })?;
        let local_address = tcp.local_addr().map_err(|source| TransportError::Io {
            action: "reading the listener address",
            peer: address,
            source,
        })?;
        let (new_sessions, incoming) = mpsc::channel(64);
        let (shutdown, _) = watch::channel(false);
        let context = Arc::new(ListenerContext {
            acceptor: Mutex::new(TlsAcceptor::from(tls.server_config()?)),
            options,
            registry: Mutex::new(HashMap::new()),
            counters: ListenerCounters::default(),
            new_sessions,
            registered: Notify::new(),
            trust_generation: AtomicU64::new(0),
            shutdown: shutdown.subscribe(),
        });
        tokio::spawn(accept_loop(tcp, context.clone(), shutdown.subscribe()));
        Ok(Listener {
            local_address,
            context,
            incoming: tokio::sync::Mutex::new(incoming),
            shutdown,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_address
    }

    /// Changes whom this listener accepts (its identity and trust), for connections from now
    /// on. Sessions already open stay, and a peer still trusted can resume them; one no longer
    /// trusted cannot connect again. (Binding a new listener instead would forget every
    /// session of the old one: a connection arriving for it would be refused as unknown.)
    pub fn set_tls(&self, tls: &TlsSettings) -> Result<(), TransportError> {
        let acceptor = TlsAcceptor::from(tls.server_config()?);
        *self
            .context
            .acceptor
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = acceptor;
        self.context
            .trust_generation
            .fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// The next session opened by an authenticated peer.
    pub async fn accept(&self) -> Result<Session, TransportError> {
        self.incoming
            .lock()
            .await
            .recv()
            .await
            .ok_or(TransportError::ListenerClosed)
    }

    pub fn stats(&self) -> ListenerStats {
        let counters = &self.context.counters;
        ListenerStats {
            connections_accepted: counters.connections_accepted.load(Ordering::Relaxed),
            connections_refused: counters.connections_refused.load(Ordering::Relaxed),
            sessions_opened: counters.sessions_opened.load(Ordering::Relaxed),
            connections_attached: counters.connections_attached.load(Ordering::Relaxed),
            connections_abandoned: counters.connections_abandoned.load(Ordering::Relaxed),
            connections_parked: counters.connections_parked.load(Ordering::Relaxed),
            connections_reused: counters.connections_reused.load(Ordering::Relaxed),
        }
    }
}

async fn accept_loop(
    tcp: TcpListener,
    context: Arc<ListenerContext>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = tcp.accept() => match accepted {
                Ok((stream, peer)) => {
                    context.counters.connections_accepted.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(handle_incoming(context.clone(), stream, peer));
                }
                Err(error) => {
                    tracing::warn!(%error, "transport listener accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = wait_for_shutdown(&mut shutdown) => return,
        }
    }
}

async fn handle_incoming(context: Arc<ListenerContext>, tcp: TcpStream, peer: SocketAddr) {
    let options = &context.options;
    let congestion_control = socket::configure_connected(
        &tcp,
        options.congestion_control.as_deref(),
        options.unsent_limit_bytes,
    );
    // Read before the acceptor (`set_tls` replaces the acceptor, then counts): a connection
    // made with an acceptor older than this count is never taken for a newer one's.
    let trust_generation = context.trust_generation.load(Ordering::Acquire);
    let acceptor = context
        .acceptor
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    let handshake = async {
        // A dialer's spare attempt that lost to its first (`socket::connect_hedged`) connects
        // and closes without a byte: not a refusal, nothing to warn about.
        let mut first_byte = [0u8; 1];
        let read = tcp
            .peek(&mut first_byte)
            .await
            .map_err(|source| TransportError::Io {
                action: "reading the handshake",
                peer,
                source,
            })?;
        if read == 0 {
            return Ok(None);
        }
        let mut stream = match acceptor.accept(tcp).into_fallible().await {
            Ok(stream) => stream,
            Err((source, tcp)) => {
                // Its alert is sent; the dialer's hello and first frames may follow it (see
                // `frame`): read them away before closing, which would otherwise reset the
                // connection and could lose the alert.
                tokio::spawn(drain_before_close(tcp));
                return Err(TransportError::Handshake { peer, source });
            }
        };
        let (_, connection) = stream.get_ref();
        let (peer_fingerprint, key_exchange_group) =
            peer_identity(connection, peer, "no client certificate")?;
        let mut hello = [0u8; HELLO_LEN];
        stream
            .read_exact(&mut hello)
            .await
            .map_err(|source| TransportError::Io {
                action: "reading hello",
                peer,
                source,
            })?;
        Ok::<_, TransportError>(Some((stream, peer_fingerprint, key_exchange_group, hello)))
    };
    let (mut stream, peer_fingerprint, key_exchange_group, mut hello_bytes) =
        match tokio::time::timeout(options.handshake_timeout, handshake).await {
            Ok(Ok(Some(accepted))) => accepted,
            Ok(Ok(None)) => {
                context
                    .counters
                    .connections_abandoned
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, "transport connection closed before its handshake");
                return;
            }
            Ok(Err(error)) => {
                context
                    .counters
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, error = %error, source = ?std::error::Error::source(&error).map(ToString::to_string), "transport connection refused");
                return;
            }
            Err(_) => {
                context
                    .counters
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, "transport handshake timed out");
                return;
            }
        };
    let connection = AcceptedConnection {
        peer,
        peer_fingerprint,
        key_exchange_group,
        congestion_control,
    };
    // A parked connection waits for the dialer's next hello (see `ConnectionPool`).
    loop {
        let Some(TlsStream::Server(parked)) =
            serve_hello(&context, &connection, stream, hello_bytes).await
        else {
            return;
        };
        stream = parked;
        context
            .counters
            .connections_parked
            .fetch_add(1, Ordering::Relaxed);
        let mut shutdown = context.shutdown.clone();
        let mut next = [0u8; HELLO_LEN];
        let waited = tokio::select! {
            read = tokio::time::timeout(LISTENER_PARKED_IDLE, stream.read_exact(&mut next)) => {
                matches!(read, Ok(Ok(_)))
            }
            _ = wait_for_shutdown(&mut shutdown) => false,
        };
        if !waited {
            tracing::debug!(%peer, "parked transport connection closed");
            return;
        }
        if context.trust_generation.load(Ordering::Acquire) != trust_generation {
            // Its peer was authenticated under trust since changed: it must authenticate again.
            tracing::info!(%peer, %peer_fingerprint, "parked transport connection closed: whom this host trusts changed since its handshake");
            return;
        }
        context
            .counters
            .connections_reused
            .fetch_add(1, Ordering::Relaxed);
        hello_bytes = next;
    }
}

/// What the listener knows of an authenticated connection.
struct AcceptedConnection {
    peer: SocketAddr,
    peer_fingerprint: Fingerprint,
    key_exchange_group: Option<String>,
    congestion_control: Option<String>,
}

/// Answers a dialer's hello on an authenticated connection: opens its session or attaches the
/// connection to one, then runs the connection. Returns it when it was parked.
async fn serve_hello(
    context: &Arc<ListenerContext>,
    connection: &AcceptedConnection,
    mut stream: tokio_rustls::server::TlsStream<TcpStream>,
    hello_bytes: [u8; HELLO_LEN],
) -> Option<TlsStream<TcpStream>> {
    let options = &context.options;
    let AcceptedConnection {
        peer,
        peer_fingerprint,
        ..
    } = *connection;
    let refuse = |status: HelloStatus, session_id: SessionId| Hello {
        code: status as u8,
        session_id,
        connection_index: 0,
        bulk_receive_window: 0,
        control_receive_window: 0,
    };
    let hello = match Hello::decode(&hello_bytes) {
        Ok(hello) if hello.purpose().is_some() => hello,
        Ok(hello) => {
            refuse_connection(
                context,
                stream,
                refuse(HelloStatus::Malformed, hello.session_id),
                peer,
            )
            .await;
            return None;
        }
        Err(status) => {
            refuse_connection(context, stream, refuse(status, [0; 16]), peer).await;
            return None;
        }
    };
    let reply = Hello {
        code: HelloStatus::Accepted as u8,
        session_id: hello.session_id,
        connection_index: hello.connection_index,
        bulk_receive_window: options.bulk_receive_window_bytes,
        control_receive_window: options.control_window_bytes,
    };
    let key = (peer_fingerprint, hello.session_id);
    let (shared, lane, new_session) = match hello.purpose() {
        Some(ConnectionPurpose::OpenSession) => {
            let created = {
                let mut registry = context
                    .registry
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                registry.retain(|_, session| session.strong_count() > 0);
                match registry.entry(key) {
                    std::collections::hash_map::Entry::Occupied(_) => None,
                    std::collections::hash_map::Entry::Vacant(vacant) => {
                        let shared = SessionShared::new(
                            hello.session_id,
                            peer_fingerprint,
                            options.clone(),
                            hello.bulk_receive_window,
                            hello.control_receive_window,
                            None,
                        );
                        {
                            let mut core = shared.lock();
                            core.key_exchange_group = connection.key_exchange_group.clone();
                            core.congestion_control = connection.congestion_control.clone();
                        }
                        vacant.insert(Arc::downgrade(&shared));
                        Some(shared)
                    }
                }
            };
            context.registered.notify_waiters();
            let Some(shared) = created else {
                refuse_connection(
                    context,
                    stream,
                    refuse(HelloStatus::Malformed, hello.session_id),
                    peer,
                )
                .await;
                return None;
            };
            (shared, Lane::Control, true)
        }
        Some(purpose) => {
            let found = find_session(context, &key).await;
            let Some(shared) = found.filter(|shared| !shared.is_terminal()) else {
                tracing::warn!(%peer, %peer_fingerprint, "connection for an unknown session refused");
                refuse_connection(
                    context,
                    stream,
                    refuse(HelloStatus::UnknownSession, hello.session_id),
                    peer,
                )
                .await;
                return None;
            };
            let lane = if purpose == ConnectionPurpose::Bulk {
                Lane::Bulk
            } else {
                Lane::Control
            };
            context
                .counters
                .connections_attached
                .fetch_add(1, Ordering::Relaxed);
            (shared, lane, false)
        }
        None => return None,
    };
    if let Err(error) = async {
        stream.write_all(&reply.encode()).await?;
        stream.flush().await
    }
    .await
    {
        tracing::debug!(%peer, %error, "cannot send hello reply");
        return None;
    }
    if new_session {
        context
            .counters
            .sessions_opened
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(session = %shared.session_name, %peer, %peer_fingerprint, "transport session accepted");
        tokio::spawn(supervise(shared.clone()));
        let session = Session {
            shared: shared.clone(),
        };
        if context.new_sessions.send(session).await.is_err() {
            return None;
        }
    }
    run_connection(&shared, TlsStream::Server(stream), lane, None, None, false).await
}

async fn refuse_connection(
    context: &ListenerContext,
    mut stream: tokio_rustls::server::TlsStream<TcpStream>,
    reply: Hello,
    peer: SocketAddr,
) {
    context
        .counters
        .connections_refused
        .fetch_add(1, Ordering::Relaxed);
    tracing::warn!(%peer, status = HelloStatus::describe(reply.status()), "transport hello refused");
    let _ = stream.write_all(&reply.encode()).await;
    let _ = stream.shutdown().await;
    drain_before_close(stream).await;
}

/// Reads what a refused dialer sent behind its hello (see `frame`) until it closes, for a
/// moment at most: closing with unread bytes resets the connection, which can discard the
/// refusal before the dialer reads it.
async fn drain_before_close(mut stream: impl tokio::io::AsyncRead + Unpin) {
    let mut discard = [0u8; 16 << 10];
    let _ = tokio::time::timeout(REFUSAL_DRAIN_TIME, async {
        while matches!(stream.read(&mut discard).await, Ok(read) if read > 0) {}
    })
    .await;
}

/// How long a refusing listener reads what the dialer sent behind its hello.
const REFUSAL_DRAIN_TIME: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_warm_up_pads_until_the_first_frame_or_its_end() {
        let shared = SessionShared::new(
            [7; 16],
            Fingerprint([1; 32]),
            SessionOptions::default(),
            1 << 20,
            1 << 20,
            None,
        );
        let now = Instant::now();
        let mut core = shared.lock();
        assert!(!warming_up(&core, now), "only when asked");
        core.warm_up_until = Some(now + Duration::from_secs(1));
        assert!(warming_up(&core, now));
        assert!(!warming_up(&core, now + Duration::from_secs(1)), "its end");
        core.state = SessionState::PeerClosed;
        assert!(!warming_up(&core, now), "the peer closed");
        core.state = SessionState::Open;
        // The end of an empty stream is a frame too.
        core.bulk_out.enqueue(Bytes::new(), true).unwrap();
        assert!(!warming_up(&core, now), "a frame is queued");
    }
}
