//! Image transfers between hosts over DWCP (`novacron image push/pull`): the transfer listener,
//! the pinned-fingerprint trust it enforces, and the list of transfers with their progress (the
//! running `serve`'s in memory, finished ones also in [`history`]). The messages are in
//! [`protocol`]; the sending side in `send`, the receiving side in `receive`.
//!
//! Trust before clustering: a host accepts transport sessions only from the fingerprints in its
//! peer records (plus its own), and a dialer accepts only the fingerprint it was given. Changing
//! the peer list rebinds the listener on the same address with the new list; sessions already
//! open keep running, but one that loses a connection during such a rebind cannot resume inside
//! the session (running the transfer again resends only what the destination lacks).
//!
//! Resume: the receiver keeps every chunk it decodes in its chunk store as frames arrive, and the
//! sender asks which chunks the receiver holds before each frame, so a cancelled or failed
//! transfer, run again, sends only what is missing. A dropped connection inside a session is
//! resumed by the transport itself (within its resume timeout).

mod history;
pub mod protocol;
mod receive;
mod send;

use crate::host::Shared;
use crate::links::LinkMonitor;
use crate::{AgentError, images};
use novacron_bandwidth::ForecastHorizon;
use novacron_codec::ChunkStore;
use novacron_transport::{
    ConnectionPool, ControlIncoming, Fingerprint, HostIdentity, Listener, PeerTrust, Session,
    SessionOptions, TlsSettings, TransportError,
};
use novacron_types::{
    CreateTransferRequest, ErrorCode, ImageName, ImageRecord, PeerRecord, RECORD_FORMAT_VERSION,
    TransferDirection, TransferEstimateBasis, TransferInfo, TransferState, TrustPeerRequest,
    unix_now,
};
use protocol::{FetchReply, ImageOffer, Message, OfferDecision};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Below this much progress the wire-to-raw ratio is not known yet; the ETA assumes 1.
const ETA_MINIMUM_RAW_BYTES: u64 = 1 << 20;
/// Most bytes one link probe sends (a probe of a fast link ends here before its time is up).
pub(crate) const PROBE_MAX_BYTES: u64 = 256 << 20;
/// Longest a probe may be asked to last.
pub(crate) const PROBE_MAX_DURATION: Duration = Duration::from_secs(30);
/// A probe's receiver gives up on a sender that neither sends nor finishes for this long.
const PROBE_RECEIVE_DEADLINE: Duration = Duration::from_secs(60);
/// Rate samples of a probe come this often, so a few seconds give the model enough of them.
const PROBE_MEASUREMENT_INTERVAL: Duration = Duration::from_millis(250);
/// How long a prober waits for the peer's answer to [`Message::ProbeDone`]. Before that
/// message, a probe finished its stream and waited for what it had queued to cross: a probe
/// that queued as fast as it could took 3.3 s for a 1 s probe of a 100 Mbit/s link, and one
/// that queued only half a second of its fastest rate (four measured bandwidth-delay products
/// held a 1 Gbit/s link with 0.5 % loss at 170 Mbit/s) measured TCP's ramp, not the link
/// (329 Mbit/s on 1 Gbit/s before a migration).
const PROBE_END_DEADLINE: Duration = Duration::from_secs(2);

/// Bytes a receiver keeps free beyond the image itself.
const RECEIVE_HEADROOM_BYTES: u64 = 64 << 20;

/// Why a transfer failed, with the stable code the API and CLI report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TransferFailure {
    pub code: ErrorCode,
    pub message: String,
}

impl TransferFailure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn cancelled() -> Self {
        Self::new(ErrorCode::Conflict, "cancelled")
    }

    /// A transport failure in the middle of a transfer.
    pub fn session(error: &TransportError) -> Self {
        match error {
            TransportError::ResumeTimedOut { seconds, .. } => Self::new(
                ErrorCode::Unavailable,
                format!(
                    "lost the connection to the peer and could not resume it within {seconds} s \
                     (is the peer's `novacron serve` still running?); run the command again: \
                     only what the destination lacks is sent again"
                ),
            ),
            other => Self::new(
                ErrorCode::Unavailable,
                format!("the transfer session failed: {}", describe(other)),
            ),
        }
    }

    fn into_agent_error(self) -> AgentError {
        AgentError::Transfer {
            code: self.code,
            message: self.message,
        }
    }
}

impl From<AgentError> for TransferFailure {
    fn from(error: AgentError) -> Self {
        Self::new(error.code(), error.to_string())
    }
}

impl From<protocol::ProtocolError> for TransferFailure {
    fn from(error: protocol::ProtocolError) -> Self {
        Self::new(ErrorCode::Internal, error.to_string())
    }
}

/// An error with its chain of sources, for messages about lower layers.
pub(crate) fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(source) = current {
        text.push_str(": ");
        text.push_str(&source.to_string());
        current = source.source();
    }
    text
}

/// True if an ENOSPC is anywhere in the chain: as an `io::Error`, or in the text of an error
/// that wraps one without exposing it as its source (redb's storage errors do: a chunk store
/// index that could not commit on a full disk was reported as an internal error).
pub(crate) fn is_disk_full(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && io.raw_os_error() == Some(28)
        {
            return true;
        }
        if error.to_string().contains("No space left on device") {
            return true;
        }
        current = error.source();
    }
    false
}

struct Outcome {
    state: TransferState,
    message: Option<String>,
    error_code: Option<ErrorCode>,
    image_id: Option<String>,
    already_present: bool,
    elapsed_at_end: Option<f64>,
    wire_rate: f64,
    reconnections: u64,
}

/// One transfer and its live counters.
pub(crate) struct Transfer {
    id: String,
    direction: TransferDirection,
    initiated_by_peer: bool,
    image: String,
    target_name: String,
    peer_address: String,
    peer_fingerprint: Fingerprint,
    /// The zstd level the sender chose for its latest frame (0 before the first, or receiving).
    pub zstd_level: AtomicI32,
    pub total_bytes: AtomicU64,
    pub raw_bytes_done: AtomicU64,
    pub wire_bytes: AtomicU64,
    started: Instant,
    started_at: u64,
    outcome: Mutex<Outcome>,
    session: Mutex<Option<Arc<Session>>>,
    pub cancel: CancellationToken,
    /// Where the transfer is recorded when it ends (set when it is registered).
    history: std::sync::OnceLock<(Arc<history::TransferHistory>, Arc<LinkMonitor>)>,
}

/// What a transfer moves: the image (its name here and on the other host), its size and id.
struct Moving<'a> {
    image: &'a str,
    target_name: &'a str,
    total_bytes: u64,
    image_id: Option<String>,
}

impl Transfer {
    fn new(
        direction: TransferDirection,
        initiated_by_peer: bool,
        moving: Moving<'_>,
        peer_address: &str,
        peer_fingerprint: Fingerprint,
    ) -> Arc<Self> {
        let Moving {
            image,
            target_name,
            total_bytes,
            image_id,
        } = moving;
        Arc::new(Self {
            id: uuid::Uuid::new_v4().simple().to_string()[..12].to_string(),
            direction,
            initiated_by_peer,
            image: image.to_string(),
            target_name: target_name.to_string(),
            peer_address: peer_address.to_string(),
            peer_fingerprint,
            zstd_level: AtomicI32::new(0),
            total_bytes: AtomicU64::new(total_bytes),
            raw_bytes_done: AtomicU64::new(0),
            wire_bytes: AtomicU64::new(0),
            started: Instant::now(),
            started_at: unix_now(),
            outcome: Mutex::new(Outcome {
                state: TransferState::Running,
                message: None,
                error_code: None,
                image_id,
                already_present: false,
                elapsed_at_end: None,
                wire_rate: 0.0,
                reconnections: 0,
            }),
            session: Mutex::new(None),
            cancel: CancellationToken::new(),
            history: std::sync::OnceLock::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Outcome> {
        self.outcome
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn attach_session(&self, session: &Arc<Session>) {
        *self
            .session
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(session.clone());
    }

    /// True when this host is the sending end (a push it started, or a pull a peer started).
    fn this_host_sends(&self) -> bool {
        (self.direction == TransferDirection::Push) != self.initiated_by_peer
    }

    /// When the rest should arrive: the remaining raw bytes at the wire-to-raw ratio so far,
    /// plus what was encoded but not yet acknowledged, at the link's forecast when this host
    /// sends (it measures the link), else at the session's measured rate.
    fn estimate(
        &self,
        links: &LinkMonitor,
        raw_done: u64,
        wire_done: u64,
        unacknowledged: u64,
        measured_rate: f64,
    ) -> (Option<f64>, Option<f64>, Option<TransferEstimateBasis>) {
        let forecast = self
            .this_host_sends()
            .then(|| links.forecast(self.peer_fingerprint, ForecastHorizon::OneSecond))
            .flatten();
        let total = self.total_bytes.load(Ordering::Relaxed);
        let wire_per_raw = if raw_done >= ETA_MINIMUM_RAW_BYTES && wire_done > 0 {
            wire_done as f64 / raw_done as f64
        } else {
            1.0
        };
        let remaining_wire_bytes =
            total.saturating_sub(raw_done) as f64 * wire_per_raw + unacknowledged as f64;
        let forecast_rate = forecast
            .as_ref()
            .map(|forecast| forecast.expected_bits_per_sec);
        let Some(first_guess) = forecast.as_ref().and_then(|forecast| {
            forecast
                .time_to_send(remaining_wire_bytes as u64)
                .expected_seconds
        }) else {
            let eta = (measured_rate > 0.0).then(|| remaining_wire_bytes / measured_rate);
            return (
                forecast_rate,
                eta,
                eta.map(|_| TransferEstimateBasis::MeasuredRate),
            );
        };
        // A long remainder is better served by a longer horizon's forecast, once it has one.
        let horizon = ForecastHorizon::covering(Duration::from_secs_f64(first_guess));
        let eta = links
            .forecast(self.peer_fingerprint, horizon)
            .and_then(|forecast| {
                forecast
                    .time_to_send(remaining_wire_bytes as u64)
                    .expected_seconds
            })
            .unwrap_or(first_guess);
        (
            forecast_rate,
            Some(eta),
            Some(TransferEstimateBasis::Forecast),
        )
    }

    pub fn info(&self, links: &LinkMonitor) -> TransferInfo {
        let session = self
            .session
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let outcome = self.lock();
        let (wire_rate, reconnections, unacknowledged) = match &session {
            Some(session) => {
                let stats = session.stats();
                (
                    stats.measured_rate_bytes_per_second,
                    stats.reconnections,
                    stats.send_buffered_bytes,
                )
            }
            None => (outcome.wire_rate, outcome.reconnections, 0),
        };
        let elapsed = outcome
            .elapsed_at_end
            .unwrap_or_else(|| self.started.elapsed().as_secs_f64());
        let raw = self.raw_bytes_done.load(Ordering::Relaxed);
        let wire = self.wire_bytes.load(Ordering::Relaxed);
        let (forecast_bits_per_second, eta_seconds, eta_basis) = if outcome.state.is_finished() {
            (None, None, None)
        } else {
            self.estimate(links, raw, wire, unacknowledged, wire_rate)
        };
        let zstd_level = self.zstd_level.load(Ordering::Relaxed);
        TransferInfo {
            id: self.id.clone(),
            direction: self.direction,
            initiated_by_peer: self.initiated_by_peer,
            image: self.image.clone(),
            target_name: self.target_name.clone(),
            image_id: outcome.image_id.clone(),
            peer_address: self.peer_address.clone(),
            peer_fingerprint: self.peer_fingerprint.to_string(),
            state: outcome.state,
            message: outcome.message.clone(),
            error_code: outcome.error_code,
            total_bytes: self.total_bytes.load(Ordering::Relaxed),
            raw_bytes_done: raw,
            wire_bytes: wire,
            already_present: outcome.already_present,
            started_at: self.started_at,
            elapsed_seconds: elapsed,
            rate_bytes_per_second: if elapsed > 0.0 {
                raw as f64 / elapsed
            } else {
                0.0
            },
            wire_rate_bytes_per_second: wire_rate,
            reconnections,
            zstd_level: (zstd_level != 0).then_some(zstd_level),
            forecast_bits_per_second,
            eta_seconds,
            eta_basis,
        }
    }

    /// Records the end of the transfer (once; later calls are ignored), also in the history.
    fn finish(&self, result: Result<String, TransferFailure>) {
        if !self.record_end(result) {
            return;
        }
        if let Some((history, links)) = self.history.get() {
            history.record(self.info(links));
        }
    }

    /// The end of [`Self::finish`] in memory: false when the transfer had ended already.
    fn record_end(&self, result: Result<String, TransferFailure>) -> bool {
        let session = self
            .session
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let mut outcome = self.lock();
        if outcome.state.is_finished() {
            return false;
        }
        if let Some(session) = session {
            let stats = session.stats();
            outcome.wire_rate = stats.measured_rate_bytes_per_second;
            outcome.reconnections = stats.reconnections;
        }
        outcome.elapsed_at_end = Some(self.started.elapsed().as_secs_f64());
        match result {
            Ok(message) => {
                outcome.state = TransferState::Succeeded;
                outcome.message = Some(message);
                tracing::info!(transfer = %self.id, image = %self.image, target = %self.target_name,
                    raw_bytes = self.raw_bytes_done.load(Ordering::Relaxed),
                    wire_bytes = self.wire_bytes.load(Ordering::Relaxed),
                    seconds = outcome.elapsed_at_end.unwrap_or_default(), "transfer succeeded");
            }
            Err(failure) => {
                outcome.state =
                    if self.cancel.is_cancelled() && failure == TransferFailure::cancelled() {
                        TransferState::Cancelled
                    } else {
                        TransferState::Failed
                    };
                tracing::warn!(transfer = %self.id, image = %self.image, error = %failure.message, "transfer ended without success");
                outcome.message = Some(failure.message);
                outcome.error_code = Some(failure.code);
            }
        }
        true
    }

    fn finish_already_present(&self, name: &str, id: &str) {
        {
            let mut outcome = self.lock();
            outcome.already_present = true;
            outcome.image_id = Some(id.to_string());
        }
        self.finish(Ok(format!(
            "already present at the destination as image {name:?}; nothing was sent"
        )));
    }
}

/// The transfer fingerprints the region's hosts publish in their heartbeats.
async fn region_fingerprints(host: &Shared) -> Result<Vec<Fingerprint>, AgentError> {
    Ok(host
        .records
        .heartbeats()
        .await?
        .iter()
        .filter_map(|beat| beat.transfer_fingerprint.as_deref())
        .filter_map(|text| Fingerprint::from_str(text).ok())
        .collect())
}

/// In a region: rebinds the transfer listener whenever the set of member hosts' fingerprints
/// changes (a host joined or left), so migrations and image moves between members are accepted
/// without `peer trust`.
pub(crate) async fn follow_region_trust(service: Arc<TransferService>) {
    let mut interval = tokio::time::interval(crate::region::HEARTBEAT_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        if service.bound_address().is_none() {
            continue;
        }
        let Ok(wanted) = service.trusted_fingerprints().await else {
            continue;
        };
        let current = service
            .listener_trust
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if wanted != current {
            tracing::info!(
                hosts = wanted.len(),
                "the region's hosts changed; the transfer listener now trusts them"
            );
            if let Err(error) = service.start_listener().await {
                tracing::warn!(%error, "transfer listener not rebound");
            }
        }
    }
}

struct RunningListener {
    listener: Arc<Listener>,
    accept_task: tokio::task::JoinHandle<()>,
}

/// Why [`TransferService::run_to_end`] returned without a finished transfer.
pub(crate) enum TransferEnd<E> {
    /// It could not start (or vanished): the error's text.
    NotStarted(String),
    /// The caller's stop condition came first; the transfer was cancelled.
    Stopped(E),
}

/// The transfer side of a host.
pub(crate) struct TransferService {
    host: Arc<Shared>,
    identity: HostIdentity,
    requested_address: Option<SocketAddr>,
    listener: tokio::sync::Mutex<Option<RunningListener>>,
    bound_address: Mutex<Option<SocketAddr>>,
    /// The fingerprints the running listener accepts.
    listener_trust: Mutex<Vec<Fingerprint>>,
    transfers: Mutex<HashMap<String, Arc<Transfer>>>,
    /// Finished transfers, kept across restarts.
    history: Arc<history::TransferHistory>,
    options: SessionOptions,
    /// Throughput models of the links this host sends over (fed by every session's samples).
    pub links: Arc<LinkMonitor>,
    metrics: TransferMetrics,
}

/// Metrics of the transfer service's connections (see [`TransferService::export_metrics`]).
#[derive(Default)]
struct TransferMetrics {
    parked: prometheus_client::metrics::gauge::Gauge,
    sessions_accepted: prometheus_client::metrics::counter::Counter,
    connections_accepted: prometheus_client::metrics::counter::Counter,
    connections_reused: prometheus_client::metrics::counter::Counter,
}

impl TransferService {
    pub fn new(
        host: Arc<Shared>,
        identity: HostIdentity,
        requested_address: Option<SocketAddr>,
    ) -> Arc<Self> {
        let links = LinkMonitor::new();
        let history = Arc::new(history::TransferHistory::open(
            host.paths.transfer_history_file(),
        ));
        Arc::new(Self {
            host,
            identity,
            requested_address,
            listener: tokio::sync::Mutex::new(None),
            bound_address: Mutex::new(None),
            listener_trust: Mutex::new(Vec::new()),
            transfers: Mutex::new(HashMap::new()),
            history,
            options: SessionOptions {
                rate_observer: Some(links.rate_observer()),
                // A finished session's connections carry the next one to the same host at the
                // rate they reached (a migration's copy no longer starts from TCP's start-up).
                connection_pool: Some(ConnectionPool::default()),
                ..SessionOptions::default()
            },
            links,
            metrics: TransferMetrics::default(),
        })
    }

    /// Adds the transfer connections' metrics to `registry`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        let metrics = &self.metrics;
        registry.register(
            "transfer_parked_connections",
            "authenticated connections a finished session left for the next one to the same host",
            metrics.parked.clone(),
        );
        registry.register(
            "transfer_sessions_accepted",
            "transfer sessions other hosts opened to this one",
            metrics.sessions_accepted.clone(),
        );
        registry.register(
            "transfer_connections_accepted",
            "TCP connections other hosts made to this host's transfer listener",
            metrics.connections_accepted.clone(),
        );
        registry.register(
            "transfer_connections_reused",
            "connections a finished session parked that carried another session to this host",
            metrics.connections_reused.clone(),
        );
    }

    /// Copies the pool's size and the listener's counters into the metrics.
    pub fn export_metrics(&self) {
        let metrics = &self.metrics;
        let parked = self
            .options
            .connection_pool
            .as_ref()
            .map_or(0, ConnectionPool::parked);
        metrics.parked.set(parked as i64);
        let Ok(listener) = self.listener.try_lock() else {
            return;
        };
        if let Some(running) = listener.as_ref() {
            let stats = running.listener.stats();
            let catch_up = |counter: &prometheus_client::metrics::counter::Counter, total: u64| {
                counter.inc_by(total.saturating_sub(counter.get()));
            };
            catch_up(&metrics.sessions_accepted, stats.sessions_opened);
            catch_up(&metrics.connections_accepted, stats.connections_accepted);
            catch_up(&metrics.connections_reused, stats.connections_reused);
        }
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.identity.fingerprint()
    }

    pub(crate) fn identity(&self) -> &HostIdentity {
        &self.identity
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.host
    }

    /// Session options for dialling `peer`: the link's forecast, when it has one, is the
    /// transport's first bandwidth estimate (its initial stream count is the bandwidth-delay
    /// product over one connection's window) and limits the connections' pacing a little above
    /// it (BBR's start-up otherwise overfills a lossy path: see
    /// `novacron_transport::policy::pacing_limit_for`; the session raises the limit while the
    /// link carries more).
    pub(crate) fn session_options_for(&self, peer: Fingerprint) -> SessionOptions {
        let rate = self.forecast_bytes_per_second(peer, None);
        self.session_options_with(rate, rate)
    }

    /// [`Self::session_options_for`], with the forecast only when the link to `peer` was
    /// measured within `max_age` (a migration's rule: see `LINK_MEASUREMENT_MAX_AGE` there), and
    /// the pacing limit over the higher of it and the link's recent peak
    /// ([`crate::links::LinkMonitor::recent_peak`]).
    pub(crate) fn session_options_for_recent(
        &self,
        peer: Fingerprint,
        max_age: Duration,
    ) -> SessionOptions {
        let rate = self.forecast_bytes_per_second(peer, Some(max_age));
        let peak = self
            .links
            .recent_peak(peer, max_age, novacron_types::unix_now());
        let pacing_basis = rate.map(|rate| peak.unwrap_or(rate).max(rate));
        self.session_options_with(rate, pacing_basis)
    }

    /// The options with `forecast_bytes_per_second` as the first bandwidth estimate and
    /// `pacing_basis` (bytes per second) under the pacing limit.
    fn session_options_with(
        &self,
        forecast_bytes_per_second: Option<f64>,
        pacing_basis: Option<f64>,
    ) -> SessionOptions {
        SessionOptions {
            bandwidth_hint_bytes_per_second: forecast_bytes_per_second
                .unwrap_or(self.options.bandwidth_hint_bytes_per_second),
            bulk_pacing_limit_bytes_per_second: pacing_basis
                .map(novacron_transport::policy::pacing_limit_for)
                .or(self.options.bulk_pacing_limit_bytes_per_second),
            ..self.options.clone()
        }
    }

    /// The link model's forecast for `peer` (five seconds ahead, else one), bytes per second;
    /// with `max_age`, only when the link was measured that recently.
    fn forecast_bytes_per_second(
        &self,
        peer: Fingerprint,
        max_age: Option<Duration>,
    ) -> Option<f64> {
        let forecast = |horizon| match max_age {
            Some(max_age) => {
                self.links
                    .recent_forecast(peer, horizon, max_age, novacron_types::unix_now())
            }
            None => self.links.forecast(peer, horizon),
        };
        forecast(ForecastHorizon::FiveSeconds)
            .or_else(|| forecast(ForecastHorizon::OneSecond))
            .map(|forecast| forecast.expected_bits_per_sec / 8.0)
            .filter(|rate| *rate > 0.0)
    }

    pub fn bound_address(&self) -> Option<SocketAddr> {
        *self
            .bound_address
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn chunks(&self) -> &Arc<ChunkStore> {
        &self.host.chunks
    }

    /// Own fingerprint plus every trusted peer's and, in a region, every member host's (from
    /// their heartbeats, which only region members can write).
    async fn trusted_fingerprints(&self) -> Result<Vec<Fingerprint>, AgentError> {
        let mut fingerprints = vec![self.fingerprint()];
        for peer in self.host.records.peers().await? {
            match Fingerprint::from_str(&peer.fingerprint) {
                Ok(fingerprint) => fingerprints.push(fingerprint),
                Err(error) => {
                    tracing::warn!(fingerprint = %peer.fingerprint, %error, "ignoring a malformed peer record")
                }
            }
        }
        if self.host.region.is_some() {
            fingerprints.extend(region_fingerprints(&self.host).await?);
        }
        fingerprints.sort();
        fingerprints.dedup();
        Ok(fingerprints)
    }

    /// Binds the transfer listener, or, when it runs, has it trust the current peer list (a
    /// peer trusted or forgotten, a host joined or left the region) in place: its sessions stay.
    pub async fn start_listener(self: &Arc<Self>) -> Result<(), AgentError> {
        let Some(address) = self.requested_address else {
            return Ok(());
        };
        let mut slot = self.listener.lock().await;
        let trusted = self.trusted_fingerprints().await?;
        *self
            .listener_trust
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = trusted.clone();
        let tls = TlsSettings {
            identity: self.identity.clone(),
            trust: PeerTrust::PinnedFingerprints(trusted),
        };
        if let Some(running) = slot.as_ref() {
            running.listener.set_tls(&tls).map_err(|error| {
                AgentError::InvalidArgument(format!(
                    "cannot change whom the transfer listener trusts: {}",
                    describe(&error)
                ))
            })?;
            return Ok(());
        }
        // A `serve` restarted at once may find its predecessor's socket still closing: retry a
        // fixed port while it is busy, for a little while.
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match Listener::bind(address, &tls, self.options.clone()).await {
                Ok(listener) => break Arc::new(listener),
                Err(TransportError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::AddrInUse
                        && address.port() != 0
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(TransportError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::AddrInUse =>
                {
                    return Err(AgentError::InvalidArgument(format!(
                        "cannot listen for transfers on {address}: the port is already in use \
                         (another `novacron serve`?); choose another --transfer-listen"
                    )));
                }
                Err(error) => {
                    return Err(AgentError::InvalidArgument(format!(
                        "cannot listen for transfers on {address}: {}",
                        describe(&error)
                    )));
                }
            }
        };
        let bound = listener.local_addr();
        *self
            .bound_address
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(bound);
        let service = Arc::downgrade(self);
        let accepting = listener.clone();
        let accept_task = tokio::spawn(async move {
            loop {
                let session = match accepting.accept().await {
                    Ok(session) => session,
                    Err(error) => {
                        tracing::warn!(%error, "transfer listener stopped");
                        return;
                    }
                };
                let Some(service) = service.upgrade() else {
                    return;
                };
                tokio::spawn(async move { service.serve_incoming(session).await });
            }
        });
        *slot = Some(RunningListener {
            listener,
            accept_task,
        });
        tracing::info!(address = %bound, fingerprint = %self.fingerprint(), "transfer listener ready");
        Ok(())
    }

    pub async fn shutdown(&self) {
        if let Some(running) = self.listener.lock().await.take() {
            running.accept_task.abort();
        }
        let transfers: Vec<Arc<Transfer>> = self
            .transfers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for transfer in transfers {
            transfer.cancel.cancel();
        }
    }

    // ----- peers -----

    pub async fn trust_peer(
        self: &Arc<Self>,
        request: TrustPeerRequest,
    ) -> Result<PeerRecord, AgentError> {
        let fingerprint = parse_fingerprint(&request.fingerprint)?;
        if fingerprint == self.fingerprint() {
            return Err(AgentError::InvalidArgument(format!(
                "{fingerprint} is this host's own fingerprint; trust the other host's \
                 (`novacron host` on it prints it)"
            )));
        }
        if let Some(name) = &request.name
            && (name.is_empty() || name.len() > 64 || name.chars().any(char::is_control))
        {
            return Err(AgentError::InvalidArgument(format!(
                "peer name {name:?} must be 1 to 64 printable characters"
            )));
        }
        let record = PeerRecord {
            format_version: RECORD_FORMAT_VERSION,
            fingerprint: fingerprint.to_string(),
            name: request.name,
            trusted_at: unix_now(),
        };
        self.host.records.put_peer(&record).await?;
        self.start_listener().await?;
        tracing::info!(fingerprint = %record.fingerprint, name = ?record.name, "peer trusted");
        Ok(record)
    }

    pub async fn peers(&self) -> Result<Vec<PeerRecord>, AgentError> {
        let mut peers = self.host.records.peers().await?;
        peers.sort_by(|a, b| a.name.cmp(&b.name).then(a.fingerprint.cmp(&b.fingerprint)));
        Ok(peers)
    }

    /// Forgets a peer by fingerprint or by its label.
    pub async fn forget_peer(self: &Arc<Self>, reference: &str) -> Result<PeerRecord, AgentError> {
        let peers = self.host.records.peers().await?;
        let wanted = Fingerprint::from_str(reference).ok().map(|f| f.to_string());
        let found = peers.into_iter().find(|peer| {
            Some(&peer.fingerprint) == wanted.as_ref() || peer.name.as_deref() == Some(reference)
        });
        let Some(peer) = found else {
            return Err(AgentError::PeerNotFound {
                fingerprint: reference.to_string(),
            });
        };
        self.host.records.delete_peer(&peer.fingerprint).await?;
        self.start_listener().await?;
        tracing::info!(fingerprint = %peer.fingerprint, "peer forgotten");
        Ok(peer)
    }

    // ----- transfers -----

    /// This `serve`'s transfers and the finished ones of earlier runs, oldest first.
    pub fn list(&self) -> Vec<TransferInfo> {
        let mut list: Vec<TransferInfo> = self
            .transfers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .map(|transfer| transfer.info(&self.links))
            .collect();
        let current: std::collections::HashSet<String> =
            list.iter().map(|info| info.id.clone()).collect();
        list.extend(
            self.history
                .list()
                .into_iter()
                .filter(|info| !current.contains(&info.id)),
        );
        list.sort_by(|a, b| a.started_at.cmp(&b.started_at).then(a.id.cmp(&b.id)));
        list
    }

    fn find(&self, id: &str) -> Result<Arc<Transfer>, AgentError> {
        self.transfers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::TransferNotFound { id: id.to_string() })
    }

    pub fn get(&self, id: &str) -> Result<TransferInfo, AgentError> {
        match self.find(id) {
            Ok(transfer) => Ok(transfer.info(&self.links)),
            Err(not_running) => self.history.get(id).ok_or(not_running),
        }
    }

    pub fn cancel(&self, id: &str) -> Result<TransferInfo, AgentError> {
        let transfer = match self.find(id) {
            Ok(transfer) => transfer,
            // Ended in an earlier run of `serve`: nothing left to cancel.
            Err(not_running) => return self.history.get(id).ok_or(not_running),
        };
        transfer.cancel.cancel();
        Ok(transfer.info(&self.links))
    }

    fn register(&self, transfer: &Arc<Transfer>) {
        let _ = transfer
            .history
            .set((self.history.clone(), self.links.clone()));
        self.transfers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(transfer.id.clone(), transfer.clone());
    }

    /// Starts a transfer this host needs for its own work (a missing image fetched, a base
    /// image copied ahead of a migration) and waits for its end: the finished transfer,
    /// succeeded or not. When `stop` resolves first the transfer is cancelled and its output
    /// returned as [`TransferEnd::Stopped`].
    pub(crate) async fn run_to_end<E>(
        self: &Arc<Self>,
        request: CreateTransferRequest,
        stop: impl std::future::Future<Output = E>,
    ) -> Result<TransferInfo, TransferEnd<E>> {
        let mut info = self
            .start(request)
            .await
            .map_err(|error| TransferEnd::NotStarted(error.to_string()))?;
        let id = info.id.clone();
        let finished = async {
            while !info.state.is_finished() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                info = self
                    .get(&id)
                    .map_err(|error| TransferEnd::NotStarted(error.to_string()))?;
            }
            Ok(info)
        };
        tokio::select! {
            finished = finished => finished,
            stopped = stop => {
                let _ = self.cancel(&id);
                Err(TransferEnd::Stopped(stopped))
            }
        }
    }

    /// Starts a push or pull: validates, connects, negotiates, and returns once the transfer
    /// runs (or ended at once because the image was already there). Errors before that point
    /// are returned here and leave nothing behind on either host.
    /// Measures the link to the peer at `address` (which must present `fingerprint`): sends
    /// incompressible data as fast as the link takes it for `duration` (or [`PROBE_MAX_BYTES`]),
    /// which the peer discards. The session's rate samples feed this host's model of the link,
    /// as any transfer's do, so forecasts exist before a decision needs one.
    pub(crate) async fn probe_link(
        self: &Arc<Self>,
        address: &str,
        fingerprint: Fingerprint,
        duration: Duration,
    ) -> Result<ProbeOutcome, AgentError> {
        if duration.is_zero() || duration > PROBE_MAX_DURATION {
            return Err(probe_duration_error(duration.as_secs_f64()));
        }
        let socket_address = resolve_address(address).await?;
        let tls = TlsSettings {
            identity: self.identity.clone(),
            trust: PeerTrust::PinnedFingerprints(vec![fingerprint]),
        };
        let options = SessionOptions {
            measurement_interval: PROBE_MEASUREMENT_INTERVAL,
            ..self.session_options_for(fingerprint)
        };
        let session = open_session(socket_address, &tls, options)
            .await
            .map_err(|error| {
                connect_failure(&error, address, fingerprint, self.fingerprint()).into_agent_error()
            })?;
        self.links.note_address(fingerprint, address);
        let session = Arc::new(session);
        let reply = session
            .control()
            .request(
                Message::Probe {
                    max_bytes: PROBE_MAX_BYTES,
                }
                .encode(),
            )
            .await
            .map_err(|error| TransferFailure::session(&error).into_agent_error());
        let decision = match reply.map(|bytes| Message::decode(&bytes)) {
            Ok(Ok(Message::OfferReply(decision))) => decision,
            Ok(Ok(other)) => {
                close_quietly(session).await;
                return Err(AgentError::Transfer {
                    code: ErrorCode::Internal,
                    message: format!("the peer answered a link probe with a {}", other.name()),
                });
            }
            Ok(Err(error)) => {
                close_quietly(session).await;
                return Err(AgentError::Transfer {
                    code: ErrorCode::Internal,
                    message: format!("the peer's answer to a link probe is unreadable: {error}"),
                });
            }
            Err(error) => {
                close_quietly(session).await;
                return Err(error);
            }
        };
        if let OfferDecision::Refused { code, message } = decision {
            close_quietly(session).await;
            return Err(AgentError::Transfer {
                code,
                message: format!("the peer refused the link probe: {message}"),
            });
        }
        // Random bytes: no layer below may compress them, so the link, not a codec, is measured.
        let mut chunk = vec![0u8; 256 << 10];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut chunk);
        let chunk = bytes::Bytes::from(chunk);
        let started = Instant::now();
        let mut sent = 0u64;
        let mut result = Ok(());
        let (mut last_sample, mut ramp) = (0.0f64, ProbeRamp::default());
        // The session's send window (not a wait of our own) holds the probe back, so its rate
        // samples count as a sender with more to send: the link's capacity. The window is the
        // session's whole (a smaller one held a lossy long path far below its rate), and what
        // it still holds at the end is dropped, not waited for (`ProbeDone`).
        while started.elapsed() < duration && sent + chunk.len() as u64 <= PROBE_MAX_BYTES {
            let sample = session.stats().measured_rate_bytes_per_second;
            if sample != last_sample {
                ramp.observe(sample);
                last_sample = sample;
            }
            let remaining = duration.saturating_sub(started.elapsed());
            match tokio::time::timeout(remaining, session.send(chunk.clone())).await {
                Err(_) => break,
                Ok(Err(error)) => {
                    result = Err(error);
                    break;
                }
                Ok(Ok(())) => sent += chunk.len() as u64,
            }
        }
        let elapsed = started.elapsed();
        let stats = session.stats();
        if result.is_ok() {
            result = end_probe(&session).await;
        }
        // The peer has dropped its side (or failed): nothing to wait for.
        drop(session);
        result.map_err(|error| TransferFailure::session(&error).into_agent_error())?;
        let outcome = ProbeOutcome {
            bytes_acknowledged: stats.bulk_bytes_acknowledged,
            last_rate_bytes_per_second: ramp.observed(stats.measured_rate_bytes_per_second),
        };
        tracing::info!(
            peer = %fingerprint, %address, sent,
            acknowledged = outcome.bytes_acknowledged,
            seconds = elapsed.as_secs_f64(),
            mbit_per_second = outcome.last_rate_bytes_per_second * 8.0 / 1e6,
            closed_after_seconds = started.elapsed().as_secs_f64(),
            "link probed"
        );
        Ok(outcome)
    }

    pub async fn start(
        self: &Arc<Self>,
        request: CreateTransferRequest,
    ) -> Result<TransferInfo, AgentError> {
        let fingerprint = parse_fingerprint(&request.fingerprint)?;
        if let Some(name) = &request.name {
            ImageName::new(name.as_str())?;
        }
        let local_image = match request.direction {
            TransferDirection::Push => Some(self.host.records.resolve_image(&request.image).await?),
            TransferDirection::Pull => {
                if request.image.is_empty() || request.image.contains('/') {
                    return Err(AgentError::InvalidArgument(format!(
                        "{:?} is not an image name or id",
                        request.image
                    )));
                }
                None
            }
        };
        let address = resolve_address(&request.address).await?;
        let tls = TlsSettings {
            identity: self.identity.clone(),
            trust: PeerTrust::PinnedFingerprints(vec![fingerprint]),
        };
        let session = open_session(address, &tls, self.session_options_for(fingerprint))
            .await
            .map_err(|error| {
                connect_failure(&error, &request.address, fingerprint, self.fingerprint())
                    .into_agent_error()
            })?;
        self.links.note_address(fingerprint, &request.address);
        let session = Arc::new(session);
        let control = session.control();
        match (request.direction, local_image) {
            (TransferDirection::Push, Some(image)) => {
                let target = request
                    .name
                    .clone()
                    .unwrap_or_else(|| image.name.to_string());
                let offer = ImageOffer {
                    name: target.clone(),
                    id: image.id.clone(),
                    size: image.file_bytes,
                    format: image.format,
                };
                let reply = ask(&control, Message::Offer(offer)).await?;
                let Message::OfferReply(decision) = reply else {
                    return Err(unexpected("offer reply", &reply));
                };
                let transfer = Transfer::new(
                    TransferDirection::Push,
                    false,
                    Moving {
                        image: image.name.as_str(),
                        target_name: &target,
                        total_bytes: image.file_bytes,
                        image_id: Some(image.id.clone()),
                    },
                    &request.address,
                    fingerprint,
                );
                match decision {
                    OfferDecision::Proceed => {}
                    OfferDecision::AlreadyPresent { name } => {
                        self.register(&transfer);
                        transfer.finish_already_present(&name, &image.id);
                        close_quietly(session).await;
                        return Ok(transfer.info(&self.links));
                    }
                    OfferDecision::Refused { code, message } => {
                        close_quietly(session).await;
                        return Err(AgentError::Transfer {
                            code,
                            message: format!("the destination refused the image: {message}"),
                        });
                    }
                }
                self.register(&transfer);
                transfer.attach_session(&session);
                let service = self.clone();
                let running = transfer.clone();
                let path = self.host.paths.image_file(&image.id, image.format);
                tokio::spawn(async move {
                    let result = send::send_image(&service, session, running.clone(), path).await;
                    running.finish(result.map(|()| "sent and verified by the destination".into()));
                });
                Ok(transfer.info(&self.links))
            }
            (_, _) => {
                let reply = ask(
                    &control,
                    Message::Fetch {
                        image: request.image.clone(),
                    },
                )
                .await?;
                let offer = match reply {
                    Message::FetchReply(FetchReply::Offer(offer)) => offer,
                    Message::FetchReply(FetchReply::Refused { code, message }) => {
                        close_quietly(session).await;
                        return Err(AgentError::Transfer {
                            code,
                            message: format!("the source host refused: {message}"),
                        });
                    }
                    other => return Err(unexpected("fetch reply", &other)),
                };
                let target = request.name.clone().unwrap_or_else(|| offer.name.clone());
                let decision = self.decide(&target, &offer).await;
                notify(&control, Message::PullDecision(decision.clone())).await?;
                let transfer = Transfer::new(
                    TransferDirection::Pull,
                    false,
                    Moving {
                        image: &offer.name,
                        target_name: &target,
                        total_bytes: offer.size,
                        image_id: Some(offer.id.clone()),
                    },
                    &request.address,
                    fingerprint,
                );
                match decision {
                    OfferDecision::Proceed => {}
                    OfferDecision::AlreadyPresent { name } => {
                        let _ = tokio::time::timeout(Duration::from_secs(2), session.flush()).await;
                        self.register(&transfer);
                        transfer.finish_already_present(&name, &offer.id);
                        return Ok(transfer.info(&self.links));
                    }
                    OfferDecision::Refused { code, message } => {
                        let _ = tokio::time::timeout(Duration::from_secs(2), session.flush()).await;
                        return Err(AgentError::Transfer { code, message });
                    }
                }
                self.register(&transfer);
                transfer.attach_session(&session);
                let service = self.clone();
                let running = transfer.clone();
                let offer = ImageOffer {
                    name: target,
                    ..offer
                };
                tokio::spawn(async move {
                    let result =
                        receive::receive_image(&service, session, running.clone(), offer).await;
                    running.finish(result);
                });
                Ok(transfer.info(&self.links))
            }
        }
    }

    /// Whether this host takes an image offered under `name`.
    async fn decide(&self, name: &str, offer: &ImageOffer) -> OfferDecision {
        let refused = |code, message: String| OfferDecision::Refused { code, message };
        let host_name = &self.host.config.host_name;
        if let Err(error) = ImageName::new(name) {
            return refused(ErrorCode::InvalidArgument, error.to_string());
        }
        if offer.id.len() != 64 || !offer.id.chars().all(|c| c.is_ascii_hexdigit()) {
            return refused(
                ErrorCode::InvalidArgument,
                format!("{:?} is not an image id (64 hex digits)", offer.id),
            );
        }
        match self.host.records.image(&offer.id).await {
            // In a region the record is shared: the image is present only if its file is here.
            Ok(Some(existing))
                if self
                    .host
                    .paths
                    .image_file(&existing.id, existing.format)
                    .exists() =>
            {
                return OfferDecision::AlreadyPresent {
                    name: existing.name.to_string(),
                };
            }
            Ok(Some(_)) => return OfferDecision::Proceed,
            Ok(None) => {}
            Err(error) => return refused(error.code(), error.to_string()),
        }
        match self.host.records.resolve_image(name).await {
            Ok(existing) if existing.name.as_str() == name => {
                return refused(
                    ErrorCode::AlreadyExists,
                    format!(
                        "an image named {name:?} already exists on host {host_name} with a \
                         different id ({}); choose another --name or delete it there",
                        &existing.id[..12]
                    ),
                );
            }
            Ok(_) | Err(AgentError::ImageNotFound { .. }) => {}
            Err(error) => return refused(error.code(), error.to_string()),
        }
        if let Err(error) = self.host.hypervisor.qemu_img() {
            return refused(error.code(), error.to_string());
        }
        if let Err(failure) = check_free_space(&self.host.paths, offer.size, host_name) {
            return refused(failure.code, failure.message);
        }
        OfferDecision::Proceed
    }

    /// A session a peer opened: it pushes to us or pulls from us.
    async fn serve_incoming(self: Arc<Self>, session: Session) {
        let peer = session.peer_fingerprint();
        // What this side sends (a pulled image) is paced as a dialer's would be.
        if let Some(rate) = self.forecast_bytes_per_second(peer, None) {
            session.set_bulk_pacing_limit(Some(novacron_transport::policy::pacing_limit_for(rate)));
        }
        let session = Arc::new(session);
        let control = session.control();
        let first = tokio::time::timeout(Duration::from_secs(30), control.next_incoming()).await;
        let request = match first {
            Ok(Ok(Some(ControlIncoming::Request(request)))) => request,
            Ok(Ok(None)) => return,
            Ok(Err(error)) => {
                tracing::warn!(%peer, %error, "incoming transfer session failed before its request");
                return;
            }
            Ok(Ok(Some(ControlIncoming::Notification(_)))) | Err(_) => {
                tracing::warn!(%peer, "incoming transfer session sent no request; closing it");
                return;
            }
        };
        let message = match Message::decode(&request.body) {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(%peer, %error, "incoming transfer request refused");
                let reply = Message::OfferReply(OfferDecision::Refused {
                    code: ErrorCode::InvalidArgument,
                    message: error.to_string(),
                });
                let _ = request.respond(reply.encode()).await;
                close_quietly(session).await;
                return;
            }
        };
        match message {
            Message::Probe { max_bytes } => {
                if max_bytes > PROBE_MAX_BYTES {
                    let reply = Message::OfferReply(OfferDecision::Refused {
                        code: ErrorCode::InvalidArgument,
                        message: format!(
                            "a link probe may send at most {PROBE_MAX_BYTES} bytes, not {max_bytes}"
                        ),
                    });
                    let _ = request.respond(reply.encode()).await;
                    close_quietly(session).await;
                    return;
                }
                if request
                    .respond(Message::OfferReply(OfferDecision::Proceed).encode())
                    .await
                    .is_err()
                {
                    close_quietly(session).await;
                    return;
                }
                let mut received = 0u64;
                let mut ended_by_prober = false;
                let outcome = tokio::time::timeout(PROBE_RECEIVE_DEADLINE, async {
                    loop {
                        tokio::select! {
                            data = session.recv() => match data {
                                Ok(Some(data)) => {
                                    received += data.len() as u64;
                                    if received > max_bytes {
                                        break;
                                    }
                                }
                                _ => break,
                            },
                            // The prober has measured enough: what it queued is dropped.
                            incoming = control.next_incoming() => {
                                if let Ok(Some(ControlIncoming::Request(done))) = incoming
                                    && matches!(Message::decode(&done.body), Ok(Message::ProbeDone))
                                {
                                    ended_by_prober =
                                        done.respond(Message::ProbeDone.encode()).await.is_ok();
                                }
                                break;
                            }
                        }
                    }
                })
                .await;
                tracing::info!(%peer, received, ended_by_prober, timed_out = outcome.is_err(), "link probe received");
                // Waits (briefly) for the answer to be acknowledged, not for the prober's data.
                close_quietly(session).await;
            }
            Message::Migration(protocol::MigrationControl::Begin { id }) => {
                crate::migration::serve_destination(self, session, request, id).await;
            }
            Message::Migration(protocol::MigrationControl::Recover { id }) => {
                crate::migration::hand_over_recovery(self, session, request, id).await;
            }
            Message::Migration(protocol::MigrationControl::DiskBegin { id }) => {
                crate::migration::serve_destination_disk(self, session, request, id).await;
            }
            Message::Offer(offer) => {
                let decision = self.decide(&offer.name, &offer).await;
                tracing::info!(%peer, image = %offer.name, id = %offer.id, decision = ?decision, "push offered");
                if request
                    .respond(Message::OfferReply(decision.clone()).encode())
                    .await
                    .is_err()
                    || decision != OfferDecision::Proceed
                {
                    close_quietly(session).await;
                    return;
                }
                let transfer = Transfer::new(
                    TransferDirection::Push,
                    true,
                    Moving {
                        image: &offer.name,
                        target_name: &offer.name,
                        total_bytes: offer.size,
                        image_id: Some(offer.id.clone()),
                    },
                    "incoming",
                    peer,
                );
                self.register(&transfer);
                transfer.attach_session(&session);
                let result = receive::receive_image(&self, session, transfer.clone(), offer).await;
                transfer.finish(result);
            }
            Message::Fetch { image } => {
                let reply = match self.host.records.resolve_image(&image).await {
                    Ok(record) => FetchReply::Offer(ImageOffer {
                        name: record.name.to_string(),
                        id: record.id.clone(),
                        size: record.file_bytes,
                        format: record.format,
                    }),
                    Err(error) => FetchReply::Refused {
                        code: error.code(),
                        message: error.to_string(),
                    },
                };
                tracing::info!(%peer, %image, "pull requested");
                let FetchReply::Offer(offer) = reply.clone() else {
                    let _ = request.respond(Message::FetchReply(reply).encode()).await;
                    close_quietly(session).await;
                    return;
                };
                if request
                    .respond(Message::FetchReply(reply).encode())
                    .await
                    .is_err()
                {
                    return;
                }
                let decision =
                    tokio::time::timeout(Duration::from_secs(30), control.next_incoming()).await;
                match decision {
                    Ok(Ok(Some(ControlIncoming::Notification(body)))) => {
                        match Message::decode(&body) {
                            Ok(Message::PullDecision(OfferDecision::Proceed)) => {}
                            Ok(Message::PullDecision(decision)) => {
                                tracing::info!(%peer, %image, ?decision, "pull not needed or refused by the puller");
                                return;
                            }
                            other => {
                                tracing::warn!(%peer, ?other, "unexpected message instead of a pull decision");
                                return;
                            }
                        }
                    }
                    _ => return,
                }
                let Ok(record) = self.host.records.resolve_image(&offer.name).await else {
                    return;
                };
                let transfer = Transfer::new(
                    TransferDirection::Pull,
                    true,
                    Moving {
                        image: record.name.as_str(),
                        target_name: record.name.as_str(),
                        total_bytes: record.file_bytes,
                        image_id: Some(record.id.clone()),
                    },
                    "incoming",
                    peer,
                );
                self.register(&transfer);
                transfer.attach_session(&session);
                let path = self.host.paths.image_file(&record.id, record.format);
                let result = send::send_image(&self, session, transfer.clone(), path).await;
                transfer.finish(result.map(|()| "sent and verified by the destination".into()));
            }
            other => {
                tracing::warn!(%peer, message = other.name(), "unexpected first transfer message");
                close_quietly(session).await;
            }
        }
    }

    /// Checks, stores and indexes a received image (the receiver's last step).
    pub(crate) async fn store_received(
        &self,
        offer: &ImageOffer,
        staged: &mut images::StagedFile,
        file_bytes: u64,
    ) -> Result<ImageRecord, AgentError> {
        let name = ImageName::new(offer.name.as_str())?;
        let qemu_img = self.host.hypervisor.qemu_img()?;
        let record = images::ImageStore {
            paths: &self.host.paths,
            records: &self.host.records,
            qemu_img: &qemu_img,
        }
        .store_staged(
            name,
            staged,
            offer.id.clone(),
            file_bytes,
            &format!("image {:?} received from a peer", offer.name),
        )
        .await?;
        images::index_image(&self.host, &record).await;
        Ok(record)
    }
}

pub(crate) fn parse_fingerprint(text: &str) -> Result<Fingerprint, AgentError> {
    Fingerprint::from_str(text).map_err(|_| {
        AgentError::InvalidArgument(format!(
            "{text:?} is not a host fingerprint: expected sha256: followed by 64 hex digits, as \
             `novacron host` prints it on that host"
        ))
    })
}

async fn resolve_address(text: &str) -> Result<SocketAddr, AgentError> {
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(address);
    }
    if !text.contains(':') {
        return Err(AgentError::InvalidArgument(format!(
            "{text:?} is not a transfer address: give HOST:PORT (the peer's --transfer-listen, \
             default port 7181)"
        )));
    }
    let mut addresses =
        tokio::net::lookup_host(text)
            .await
            .map_err(|error| AgentError::Transfer {
                code: ErrorCode::Unavailable,
                message: format!("cannot resolve {text:?}: {error}"),
            })?;
    addresses.next().ok_or_else(|| AgentError::Transfer {
        code: ErrorCode::Unavailable,
        message: format!("{text:?} resolves to no address"),
    })
}

/// Opens a session and waits until the peer has accepted it: a peer that does not trust this
/// host refuses after the TLS handshake, a round trip after `connect` returns.
async fn open_session(
    address: SocketAddr,
    tls: &TlsSettings,
    options: SessionOptions,
) -> Result<Session, TransportError> {
    let session = Session::connect(address, tls, options).await?;
    session.opened().await?;
    Ok(session)
}

/// Maps a failed dial to what the user should do about it.
fn connect_failure(
    error: &TransportError,
    address: &str,
    expected: Fingerprint,
    own: Fingerprint,
) -> TransferFailure {
    let text = describe(error);
    let untrusted = || {
        TransferFailure::new(
            ErrorCode::Unauthenticated,
            format!(
                "the host at {address} does not trust this host; run `novacron peer trust {own}` \
                 on that host, then try again"
            ),
        )
    };
    match error {
        TransportError::Handshake { .. }
            if text.contains("invalid peer certificate") || text.contains("Certificate") =>
        {
            TransferFailure::new(
                ErrorCode::Unauthenticated,
                format!(
                    "the host at {address} is not the host with fingerprint {expected} (it \
                     presented another certificate); check the fingerprint with `novacron host` \
                     on that host"
                ),
            )
        }
        TransportError::Handshake { .. } if text.contains("alert") => untrusted(),
        TransportError::Io { action, .. }
            if (*action == "reading hello reply" || *action == "sending hello")
                && (text.contains("alert") || text.contains("reset") || text.contains("eof")) =>
        {
            untrusted()
        }
        TransportError::Io { action, .. } if *action == "connecting" => TransferFailure::new(
            ErrorCode::Unavailable,
            format!(
                "cannot connect to {address} ({}); is `novacron serve` running there, and is \
                 {address} its transfer address (`novacron host` there shows it)?",
                root_cause(error)
            ),
        ),
        _ => TransferFailure::new(
            ErrorCode::Unavailable,
            format!("cannot open a transfer session with {address}: {text}"),
        ),
    }
}

fn root_cause(error: &dyn std::error::Error) -> String {
    let mut current = error;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

fn check_free_space(
    paths: &crate::paths::DataPaths,
    size: u64,
    host_name: &str,
) -> Result<(), TransferFailure> {
    let stats = rustix::fs::statvfs(paths.root()).map_err(|error| {
        TransferFailure::new(
            ErrorCode::Internal,
            format!(
                "cannot check free space in {}: {error}",
                paths.root().display()
            ),
        )
    })?;
    let free = stats.f_bavail.saturating_mul(stats.f_frsize);
    let needed = size.saturating_add(RECEIVE_HEADROOM_BYTES);
    if free < needed {
        return Err(TransferFailure::new(
            ErrorCode::InsufficientResources,
            format!(
                "not enough disk space on host {host_name} ({}) for the image: {} free, {} \
                 needed",
                paths.root().display(),
                novacron_types::ByteSize(free),
                novacron_types::ByteSize(needed)
            ),
        ));
    }
    Ok(())
}

async fn ask(
    control: &novacron_transport::ControlChannel,
    message: Message,
) -> Result<Message, AgentError> {
    let answer = control
        .request(message.encode())
        .await
        .map_err(|error| TransferFailure::session(&error).into_agent_error())?;
    Message::decode(&answer).map_err(|error| TransferFailure::from(error).into_agent_error())
}

async fn notify(
    control: &novacron_transport::ControlChannel,
    message: Message,
) -> Result<(), AgentError> {
    control
        .notify(message.encode())
        .await
        .map_err(|error| TransferFailure::session(&error).into_agent_error())
}

fn unexpected(expected: &'static str, got: &Message) -> AgentError {
    TransferFailure::from(protocol::ProtocolError::Unexpected {
        expected,
        got: got.name(),
    })
    .into_agent_error()
}

/// The refusal of a probe duration outside (0, [`PROBE_MAX_DURATION`]].
pub(crate) fn probe_duration_error(seconds: f64) -> AgentError {
    AgentError::InvalidArgument(format!(
        "a link probe lasts more than 0 and at most {} seconds, not {seconds}",
        PROBE_MAX_DURATION.as_secs()
    ))
}

/// What one link probe did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProbeOutcome {
    /// Bytes the peer had acknowledged when the probe's time was up.
    pub bytes_acknowledged: u64,
    /// The session's last rate sample (bytes acknowledged per measurement interval).
    pub last_rate_bytes_per_second: f64,
}

/// Follows a probe's rate samples (bytes per second, one per measurement interval).
#[derive(Debug, Default, Clone)]
struct ProbeRamp {
    last: Option<f64>,
    /// The best mean of two samples in a row.
    best_pair: f64,
}

impl ProbeRamp {
    fn observe(&mut self, sample: f64) {
        if let Some(last) = self.last {
            self.best_pair = self.best_pair.max((last + sample) / 2.0);
        }
        self.last = Some(sample);
    }

    /// What the link carries: the best rate the probe held over two samples in a row, with
    /// `final_sample` (the session's last) counted if it is new. Not the last sample: one
    /// sample is an interval of acknowledgements, bursty after a retransmission, and a probe
    /// whose stream waited for one at its end reported 14 Mbit/s of a 1 Gbit/s link.
    fn observed(&self, final_sample: f64) -> f64 {
        let mut ramp = self.clone();
        if self.last != Some(final_sample) {
            ramp.observe(final_sample);
        }
        if ramp.best_pair > 0.0 {
            ramp.best_pair
        } else {
            ramp.last.unwrap_or(0.0)
        }
    }
}

/// Tells the probed peer the probe is over ([`Message::ProbeDone`]) and waits, at most
/// [`PROBE_END_DEADLINE`], for its answer: after it the peer drops what is still on its way.
async fn end_probe(session: &Session) -> Result<(), novacron_transport::TransportError> {
    let answer = tokio::time::timeout(
        PROBE_END_DEADLINE,
        session.control().request(Message::ProbeDone.encode()),
    )
    .await;
    match answer {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(error),
        // A peer that does not answer in time is left to its own deadline.
        Err(_) => Ok(()),
    }
}

/// Closes a session cleanly if nobody else holds it, within a short bound.
pub(crate) async fn close_quietly(session: Arc<Session>) {
    match Arc::try_unwrap(session) {
        Ok(session) => {
            let _ = tokio::time::timeout(Duration::from_secs(2), session.close()).await;
        }
        Err(shared) => {
            let _ = tokio::time::timeout(Duration::from_secs(2), shared.flush()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that keeps the OS error only in its text, as redb's storage errors do.
    #[derive(Debug, thiserror::Error)]
    #[error("I/O error: {0}")]
    struct TextOnly(String);

    #[derive(Debug, thiserror::Error)]
    #[error("chunk store index")]
    struct Wrapper(#[source] TextOnly);

    #[test]
    fn a_full_disk_is_recognised_however_deep_and_however_wrapped() {
        let full = std::io::Error::from_raw_os_error(28);
        assert!(is_disk_full(&full));
        let text = TextOnly(full.to_string());
        assert!(
            is_disk_full(&Wrapper(text)),
            "the OS error only in a source's text"
        );
        let other = Wrapper(TextOnly(std::io::Error::from_raw_os_error(5).to_string()));
        assert!(!is_disk_full(&other));
    }

    fn ramp_of(samples: &[f64]) -> ProbeRamp {
        let mut ramp = ProbeRamp::default();
        for sample in samples {
            ramp.observe(*sample);
        }
        ramp
    }

    #[test]
    fn a_probe_reports_its_best_half_second() {
        // Megabits per second, one sample per quarter second: TCP's start-up with a pause.
        let ramp = ramp_of(&[40.0, 120.0, 300.0, 310.0, 620.0, 640.0, 600.0]);
        assert_eq!(ramp.observed(600.0), 630.0, "the best two samples in a row");
        assert_eq!(ramp.observed(700.0), 650.0, "a newer final sample counts");
        // A stall at the end (the stream waiting for a retransmission) is not the link.
        let ramp = ramp_of(&[120.0, 310.0, 620.0, 640.0, 600.0, 14.0, 14.0]);
        assert_eq!(ramp.observed(14.0), 630.0);
        // One sample alone, and nothing acknowledged yet.
        assert_eq!(ramp_of(&[80.0]).observed(80.0), 80.0);
        let ramp = ramp_of(&[0.0, 0.0]);
        assert_eq!(ramp.observed(0.0), 0.0);
    }
}
