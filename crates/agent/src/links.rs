//! The links to other hosts, as this host's transfers measure them: a throughput model per peer
//! (`novacron-bandwidth`'s [`LinkRegistry`]), fed by the transport's rate samples, read by the
//! transfers (zstd level, ETA), the API (`GET /api/v1/links`) and the metrics.
//!
//! Only samples in which this host was sending and kept the link busy measure the link; samples
//! in which the sender ran dry measure the sender (its compressor, its disk). When a sender has
//! been starved for [`PROBE_AFTER_APPLICATION_LIMITED_SAMPLES`] samples in a row, the link asks
//! the sender for a probe: one frame at the fastest setting, so the link's rate shows again.
//!
//! The links outlive a restart: every link's recent step rates (five minutes of active sending
//! at most) and its last address are saved to `<data>/links.json` every
//! [`LINKS_SAVE_INTERVAL`] and at shutdown, and replayed into the models at start-up. This
//! module decides nothing about transfers; its only IO is that file.

use novacron_bandwidth::{Forecast, ForecastHorizon, LinkRegistry};
use novacron_transport::{Fingerprint, RateObserver, RateSample};
use novacron_types::{LinkInfo, unix_now};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, Weak};

/// How often the links are saved (they are also saved at shutdown).
pub(crate) const LINKS_SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

const LINKS_FILE_FORMAT: u32 = 1;

/// `<data>/links.json`.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedLinks {
    format_version: u32,
    links: Vec<SavedLink>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedLink {
    peer_fingerprint: String,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    last_measured_at: u64,
    /// 100 ms step rates, bits per second, oldest first.
    steps: Vec<f32>,
}

/// Samples shorter than this do not set a link's peak: a quarter second of acknowledgements
/// arrives in bursts (after a retransmission) and can exceed the link.
const PEAK_SAMPLE_MIN: std::time::Duration = std::time::Duration::from_millis(500);
/// A peak older than this gives way to the next measuring sample, whatever its rate.
const PEAK_KEPT: std::time::Duration = std::time::Duration::from_secs(600);

/// Starved samples in a row (1 s each by default) before a probe is asked for.
pub(crate) const PROBE_AFTER_APPLICATION_LIMITED_SAMPLES: u32 = 4;

#[derive(Default)]
struct LinkDetail {
    last_address: Option<String>,
    last_measured_at: u64,
    /// The highest rate one sample saw (bytes per second), and when (unix seconds):
    /// see [`LinkMonitor::recent_peak`]. Not saved.
    peak: Option<(f64, u64)>,
    application_limited_samples: u64,
    application_limited_in_a_row: u32,
    probe_requested: bool,
}

impl LinkDetail {
    /// Makes `sample`'s rate the link's peak when the sample is at least half a second long
    /// and its rate at least the peak, or the peak is older than [`PEAK_KEPT`].
    fn note_peak(&mut self, sample: &RateSample, now: u64) {
        let interval = sample.interval.as_secs_f64();
        if interval < PEAK_SAMPLE_MIN.as_secs_f64() {
            return;
        }
        let rate = sample.bytes_acknowledged as f64 / interval;
        let replaces = self
            .peak
            .is_none_or(|(peak, at)| rate >= peak || now.saturating_sub(at) > PEAK_KEPT.as_secs());
        if replaces {
            self.peak = Some((rate, now));
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerHorizonLabels {
    peer: String,
    horizon: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// The links' Prometheus gauges, refreshed by [`LinkMonitor::export_metrics`].
#[derive(Default)]
struct LinkMetrics {
    rate: Family<PeerLabels, FloatGauge>,
    observed_seconds: Family<PeerLabels, FloatGauge>,
    forecast: Family<PeerHorizonLabels, FloatGauge>,
    forecast_lower: Family<PeerHorizonLabels, FloatGauge>,
    forecast_upper: Family<PeerHorizonLabels, FloatGauge>,
    accuracy: Family<PeerHorizonLabels, FloatGauge>,
}

/// Every link this host has sent over, with its model.
#[derive(Default)]
pub(crate) struct LinkMonitor {
    registry: LinkRegistry<Fingerprint>,
    details: Mutex<HashMap<Fingerprint, LinkDetail>>,
    metrics: LinkMetrics,
    /// Bumped by every change worth saving; `save` skips the write when nothing changed since
    /// the last one.
    changes: AtomicU64,
    saved_changes: AtomicU64,
}

impl LinkMonitor {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn details(&self) -> std::sync::MutexGuard<'_, HashMap<Fingerprint, LinkDetail>> {
        self.details
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An observer for a session's options: every session of a dialler or a listener can share
    /// it, since each sample names its peer.
    pub fn rate_observer(self: &Arc<Self>) -> RateObserver {
        let monitor: Weak<LinkMonitor> = Arc::downgrade(self);
        RateObserver::new(move |sample| {
            if let Some(monitor) = monitor.upgrade() {
                monitor.observe(&sample);
            }
        })
    }

    /// Feeds one transport sample to its link.
    pub fn observe(&self, sample: &RateSample) {
        let peer = sample.peer_fingerprint;
        if sample.sender_backlogged {
            self.changes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.registry
                .observe(&peer, sample.bytes_acknowledged, sample.interval);
            let now = unix_now();
            let mut details = self.details();
            let detail = details.entry(peer).or_default();
            detail.last_measured_at = now;
            detail.application_limited_in_a_row = 0;
            detail.note_peak(sample, now);
        } else if sample.bytes_acknowledged > 0 {
            // Sending, but the sender ran dry: a lower bound of the link, not a measurement.
            // Above the peak it still raises the peak: the link carried that much (a move
            // whose source codec set the pace left its start-up's rate as the peak, and the
            // next move's pacing limit started below half the link).
            let mut details = self.details();
            let detail = details.entry(peer).or_default();
            detail.note_peak(sample, unix_now());
            detail.application_limited_samples += 1;
            detail.application_limited_in_a_row += 1;
            if detail.application_limited_in_a_row >= PROBE_AFTER_APPLICATION_LIMITED_SAMPLES {
                detail.probe_requested = true;
                detail.application_limited_in_a_row = 0;
            }
        }
    }

    /// Writes every link's history to `path` (a temporary file renamed over it).
    pub fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        let changes = self.changes.load(Relaxed);
        if changes == self.saved_changes.load(Relaxed) && path.exists() {
            return Ok(());
        }
        let details = self.details();
        let mut links: Vec<SavedLink> = self
            .registry
            .histories()
            .into_iter()
            .filter(|(_, steps)| !steps.is_empty())
            .map(|(peer, steps)| {
                let detail = details.get(&peer);
                SavedLink {
                    peer_fingerprint: peer.to_string(),
                    address: detail.and_then(|detail| detail.last_address.clone()),
                    last_measured_at: detail.map_or(0, |detail| detail.last_measured_at),
                    steps,
                }
            })
            .collect();
        drop(details);
        links.sort_by(|left, right| left.peer_fingerprint.cmp(&right.peer_fingerprint));
        let bytes = serde_json::to_vec(&SavedLinks {
            format_version: LINKS_FILE_FORMAT,
            links,
        })
        .map_err(std::io::Error::other)?;
        let temporary = path.with_extension("json.tmp");
        std::fs::write(&temporary, bytes)?;
        std::fs::rename(&temporary, path)?;
        self.saved_changes.store(changes, Relaxed);
        Ok(())
    }

    /// Replays the links saved at `path` (none when it does not exist). A file that cannot be
    /// read is reported and ignored: the links start empty, as before the feature.
    pub fn load(&self, path: &std::path::Path) -> usize {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return 0,
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "saved links unreadable; starting without them");
                return 0;
            }
        };
        let saved: SavedLinks = match serde_json::from_slice::<SavedLinks>(&bytes) {
            Ok(saved) if saved.format_version == LINKS_FILE_FORMAT => saved,
            Ok(saved) => {
                tracing::warn!(path = %path.display(), format = saved.format_version, "saved links in an unknown format; starting without them");
                return 0;
            }
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "saved links unreadable; starting without them");
                return 0;
            }
        };
        let mut loaded = 0;
        for link in saved.links {
            let Ok(peer) = link.peer_fingerprint.parse::<Fingerprint>() else {
                continue;
            };
            self.registry.replay(&peer, &link.steps);
            let mut details = self.details();
            let detail = details.entry(peer).or_default();
            detail.last_address = link.address;
            detail.last_measured_at = link.last_measured_at;
            loaded += 1;
        }
        loaded
    }

    /// Remembers the address `peer` was dialled at (shown by `link list`).
    pub fn note_address(&self, peer: Fingerprint, address: &str) {
        let mut details = self.details();
        let detail = details.entry(peer).or_default();
        if detail.last_address.as_deref() != Some(address) {
            detail.last_address = Some(address.to_string());
            self.changes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The address `peer` was last dialled at, if it ever was.
    pub fn last_address(&self, peer: Fingerprint) -> Option<String> {
        self.details()
            .get(&peer)
            .and_then(|detail| detail.last_address.clone())
    }

    /// When the link to `peer` was last measured (unix seconds), if ever.
    pub fn last_measured_at(&self, peer: Fingerprint) -> Option<u64> {
        self.details()
            .get(&peer)
            .map(|detail| detail.last_measured_at)
            .filter(|at| *at > 0)
    }

    /// True once after the link asked for a probe (see the module documentation).
    pub fn take_probe_request(&self, peer: Fingerprint) -> bool {
        self.details()
            .get_mut(&peer)
            .is_some_and(|detail| std::mem::take(&mut detail.probe_requested))
    }

    /// The highest rate (bytes per second) a sample of at least half a second saw on the link
    /// to `peer` (a measuring one, or a starved sender's above the measuring ones), if
    /// within `max_age` before `now` (unix seconds). A forecast averages what transfers moved,
    /// their TCP ramps and their own send windows included, so it sits below the link after a
    /// few short transfers (a migration's copy: 467, 328, then 312 Mbit/s forecast on a 1 Gbit/s
    /// link over three moves, each move's pacing limit held by the last one's forecast); the
    /// peak is what the link was seen to carry.
    pub fn recent_peak(
        &self,
        peer: Fingerprint,
        max_age: std::time::Duration,
        now: u64,
    ) -> Option<f64> {
        self.details()
            .get(&peer)
            .and_then(|detail| detail.peak)
            .filter(|(_, at)| now.saturating_sub(*at) <= max_age.as_secs())
            .map(|(rate, _)| rate)
    }

    pub fn forecast(&self, peer: Fingerprint, horizon: ForecastHorizon) -> Option<Forecast> {
        self.registry.forecast(&peer, horizon)
    }

    /// The forecast, only when the link was last measured at most `max_age` before `now`
    /// (unix seconds): an old measurement may describe another path or another load.
    pub fn recent_forecast(
        &self,
        peer: Fingerprint,
        horizon: ForecastHorizon,
        max_age: std::time::Duration,
        now: u64,
    ) -> Option<Forecast> {
        let measured_at = self.last_measured_at(peer)?;
        if now.saturating_sub(measured_at) > max_age.as_secs() {
            return None;
        }
        self.forecast(peer, horizon)
    }

    /// Adds the link gauges to `registry`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        let metrics = &self.metrics;
        registry.register(
            "link_rate_bits_per_second",
            "throughput of the link to a peer over the last second of sending",
            metrics.rate.clone(),
        );
        registry.register(
            "link_observed_seconds",
            "seconds of sending that measured the link to a peer",
            metrics.observed_seconds.clone(),
        );
        registry.register(
            "link_forecast_bits_per_second",
            "expected throughput of the link to a peer over the horizon",
            metrics.forecast.clone(),
        );
        registry.register(
            "link_forecast_lower_bits_per_second",
            "lower edge of the forecast's 80 % band",
            metrics.forecast_lower.clone(),
        );
        registry.register(
            "link_forecast_upper_bits_per_second",
            "upper edge of the forecast's 80 % band",
            metrics.forecast_upper.clone(),
        );
        registry.register(
            "link_forecast_accuracy",
            "1 - WAPE of the checked forecasts of the link so far",
            metrics.accuracy.clone(),
        );
    }

    /// Copies every link's current state into the gauges.
    pub fn export_metrics(&self) {
        let metrics = &self.metrics;
        for (peer, summary) in self.registry.summaries() {
            let peer = peer.to_string();
            let labels = PeerLabels { peer: peer.clone() };
            if let Some(rate) = summary.current_bits_per_sec {
                metrics.rate.get_or_create(&labels).set(rate);
            }
            metrics
                .observed_seconds
                .get_or_create(&labels)
                .set(summary.observed_seconds);
            let horizon_labels = |horizon: ForecastHorizon| PeerHorizonLabels {
                peer: peer.clone(),
                horizon: horizon_name(horizon).into(),
            };
            for forecast in &summary.forecasts {
                let labels = horizon_labels(forecast.horizon);
                metrics
                    .forecast
                    .get_or_create(&labels)
                    .set(forecast.expected_bits_per_sec);
                metrics
                    .forecast_lower
                    .get_or_create(&labels)
                    .set(forecast.lower);
                metrics
                    .forecast_upper
                    .get_or_create(&labels)
                    .set(forecast.upper);
            }
            for horizon in &summary.accuracy.horizons {
                if let Some(accuracy) = horizon.accuracy {
                    metrics
                        .accuracy
                        .get_or_create(&horizon_labels(horizon.horizon))
                        .set(accuracy);
                }
            }
        }
    }

    /// Every measured link; `name_of` gives a peer's label.
    pub fn list(&self, name_of: impl Fn(&str) -> Option<String>) -> Vec<LinkInfo> {
        let summaries = self.registry.summaries();
        let details = self.details();
        let mut links: Vec<LinkInfo> = summaries
            .into_iter()
            .map(|(peer, summary)| {
                let fingerprint = peer.to_string();
                let detail = details.get(&peer);
                LinkInfo {
                    peer_name: name_of(&fingerprint),
                    peer_fingerprint: fingerprint,
                    peer_address: detail.and_then(|detail| detail.last_address.clone()),
                    last_measured_at: detail.map_or(0, |detail| detail.last_measured_at),
                    application_limited_samples: detail
                        .map_or(0, |detail| detail.application_limited_samples),
                    summary,
                }
            })
            .collect();
        links.sort_by(|left, right| {
            (&left.peer_name, &left.peer_fingerprint)
                .cmp(&(&right.peer_name, &right.peer_fingerprint))
        });
        links
    }
}

/// A horizon as the metrics and the CLI name it.
pub(crate) fn horizon_name(horizon: ForecastHorizon) -> &'static str {
    match horizon {
        ForecastHorizon::OneSecond => "1s",
        ForecastHorizon::FiveSeconds => "5s",
        ForecastHorizon::ThirtySeconds => "30s",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_survive_a_save_and_a_load() {
        let monitor = LinkMonitor::new();
        let peer: Fingerprint = format!("sha256:{}", "ab".repeat(32))
            .parse()
            .expect("fingerprint");
        for _ in 0..50 {
            monitor.observe(&RateSample {
                peer_fingerprint: peer,
                bytes_acknowledged: 1_250_000,
                interval: std::time::Duration::from_millis(100),
                bytes_received: 0,
                sender_backlogged: true,
            });
        }
        monitor.note_address(peer, "10.0.0.2:7181");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("links.json");
        monitor.save(&path).expect("save");
        let restored = LinkMonitor::new();
        assert_eq!(restored.load(&path), 1);
        let (before, after) = (monitor.list(|_| None), restored.list(|_| None));
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].peer_address.as_deref(), Some("10.0.0.2:7181"));
        assert_eq!(
            after[0].summary.observed_seconds,
            before[0].summary.observed_seconds
        );
        assert!(after[0].summary.current_bits_per_sec.is_some());
        // Nothing changed since: the file is not written again.
        let written = std::fs::metadata(&path)
            .expect("saved")
            .modified()
            .expect("mtime");
        std::fs::write(&path, b"{\"format_version\":1,\"links\":[]}").expect("write");
        monitor.save(&path).expect("save");
        assert_eq!(
            LinkMonitor::new().load(&path),
            0,
            "an unchanged monitor skips the write"
        );
        monitor.note_address(peer, "10.0.0.3:7181");
        monitor.save(&path).expect("save");
        assert_eq!(LinkMonitor::new().load(&path), 1, "a change is written");
        assert!(
            std::fs::metadata(&path)
                .expect("saved")
                .modified()
                .expect("mtime")
                >= written
        );
        // A damaged file is ignored, not fatal.
        std::fs::write(&path, b"{not json").expect("write");
        assert_eq!(LinkMonitor::new().load(&path), 0);
        assert_eq!(LinkMonitor::new().load(&dir.path().join("absent.json")), 0);
    }
    use std::time::Duration;

    fn sample(peer: Fingerprint, bytes: u64, backlogged: bool) -> RateSample {
        RateSample {
            peer_fingerprint: peer,
            interval: Duration::from_secs(1),
            bytes_acknowledged: bytes,
            bytes_received: 0,
            sender_backlogged: backlogged,
        }
    }

    #[test]
    fn backlogged_samples_measure_the_link_and_name_their_peer() {
        let monitor = LinkMonitor::new();
        let (near, far) = (Fingerprint([1; 32]), Fingerprint([2; 32]));
        for _ in 0..10 {
            monitor.observe(&sample(near, 12_500_000, true)); // 100 Mbit/s
            monitor.observe(&sample(far, 1_250_000, true)); // 10 Mbit/s
        }
        let near_rate = monitor
            .forecast(near, ForecastHorizon::OneSecond)
            .unwrap()
            .expected_bits_per_sec;
        let far_rate = monitor
            .forecast(far, ForecastHorizon::OneSecond)
            .unwrap()
            .expected_bits_per_sec;
        assert!((near_rate - 100e6).abs() < 1e6, "{near_rate}");
        assert!((far_rate - 10e6).abs() < 1e5, "{far_rate}");
        monitor.note_address(far, "192.0.2.7:7181");
        let links = monitor
            .list(|fingerprint| (fingerprint == far.to_string()).then(|| "far-site".to_string()));
        assert_eq!(links.len(), 2);
        let far_link = links
            .iter()
            .find(|link| link.peer_name.as_deref() == Some("far-site"))
            .unwrap();
        assert_eq!(far_link.peer_address.as_deref(), Some("192.0.2.7:7181"));
        assert_eq!(far_link.summary.bytes_observed, 12_500_000);

        let mut registry = Registry::default();
        monitor.register_metrics(&mut registry);
        monitor.export_metrics();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let far_rate_line = format!("link_rate_bits_per_second{{peer=\"{far}\"}} 10000000");
        assert!(text.contains(&far_rate_line), "{text}");
        assert!(
            text.contains(&format!(
                "link_forecast_bits_per_second{{peer=\"{near}\",horizon=\"1s\"}}"
            )),
            "{text}"
        );
    }

    #[test]
    fn a_forecast_is_recent_only_within_its_age_limit() {
        let monitor = LinkMonitor::new();
        let peer = Fingerprint([4; 32]);
        let max_age = Duration::from_secs(600);
        assert!(
            monitor
                .recent_forecast(peer, ForecastHorizon::FiveSeconds, max_age, unix_now())
                .is_none(),
            "never measured"
        );
        for _ in 0..10 {
            monitor.observe(&sample(peer, 12_500_000, true));
        }
        let measured_at = monitor.last_measured_at(peer).expect("measured");
        let recent = monitor
            .recent_forecast(
                peer,
                ForecastHorizon::FiveSeconds,
                max_age,
                measured_at + 600,
            )
            .expect("a forecast within the limit");
        assert_eq!(
            Some(recent),
            monitor.forecast(peer, ForecastHorizon::FiveSeconds)
        );
        assert!(
            monitor
                .recent_forecast(
                    peer,
                    ForecastHorizon::FiveSeconds,
                    max_age,
                    measured_at + 601
                )
                .is_none(),
            "older than the limit"
        );
    }

    #[test]
    fn a_link_keeps_its_peak_rate_for_a_while() {
        let monitor = LinkMonitor::new();
        let peer = Fingerprint([5; 32]);
        let max_age = Duration::from_secs(600);
        assert_eq!(monitor.recent_peak(peer, max_age, unix_now()), None);
        monitor.observe(&sample(peer, 50_000_000, true));
        monitor.observe(&sample(peer, 110_000_000, true));
        monitor.observe(&sample(peer, 40_000_000, true));
        // A starved sender below the peak, and a sample too short to trust.
        monitor.observe(&sample(peer, 100_000_000, false));
        monitor.observe(&RateSample {
            interval: Duration::from_millis(250),
            ..sample(peer, 300_000_000, true)
        });
        let now = unix_now();
        assert_eq!(monitor.recent_peak(peer, max_age, now), Some(110e6));
        // A starved sender above it: the link carried at least that.
        monitor.observe(&sample(peer, 120_000_000, false));
        assert_eq!(monitor.recent_peak(peer, max_age, now), Some(120e6));
        assert_eq!(
            monitor.recent_peak(peer, max_age, now + 601),
            None,
            "too old for the caller"
        );
    }

    #[test]
    fn a_starved_sender_does_not_measure_the_link_and_asks_for_a_probe() {
        let monitor = LinkMonitor::new();
        let peer = Fingerprint([3; 32]);
        for _ in 0..PROBE_AFTER_APPLICATION_LIMITED_SAMPLES - 1 {
            monitor.observe(&sample(peer, 1_000, false));
        }
        assert!(!monitor.take_probe_request(peer));
        monitor.observe(&sample(peer, 1_000, false));
        assert!(monitor.take_probe_request(peer));
        assert!(!monitor.take_probe_request(peer), "a request is taken once");
        // Nothing measured: no model, no listed link.
        assert!(monitor.forecast(peer, ForecastHorizon::OneSecond).is_none());
        assert!(monitor.list(|_| None).is_empty());
        // Idle samples (nothing sent) are neither.
        for _ in 0..10 {
            monitor.observe(&sample(peer, 0, false));
        }
        assert!(!monitor.take_probe_request(peer));
    }
}
