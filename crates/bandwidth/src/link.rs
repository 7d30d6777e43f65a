//! The per-link model the rest of NovaCron talks to, and a registry of them keyed by peer.
//!
//! The transport feeds each link with what it measured (`observe(bytes_acknowledged, interval)`
//! while it is sending, `observe_probe` for an active probe); the codec, the migration planner and
//! the API ask for `forecast(horizon)` and `accuracy_so_far()`. Samples are binned into 100 ms
//! steps of active time (an idle link adds no steps: silence is not a zero-rate measurement), so
//! the model never reads a clock and stays deterministic and IO-free.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::band::{DEFAULT_BAND_WINDOW, ForecastTracker};
use crate::ensemble::AdaptiveEnsemble;
use crate::learned::{LearnedModel, LearnedPredictor};
use crate::predictor::{Ewma, HarmonicMean, Holt, LastValue, Predictor};
use crate::trace::BASE_STEP;

/// A single sample longer than this counts as this long (at its mean rate): the model's memory is
/// shorter, and a huge interval must not cost a huge loop.
const LONGEST_SAMPLE: Duration = Duration::from_secs(60);
/// Classic predictors of a link work on blocks as long as the horizon, at most this (5 s): "last
/// value" for the next 5 s is the last 5 s.
const LINK_LONGEST_BLOCK_STEPS: usize = 50;
/// The current rate shown for a link is the mean of the last second.
const LINK_CURRENT_RATE_STEPS: usize = 10;
/// 100 ms steps a link keeps for [`LinkModel::history`]: five minutes of active sending, enough
/// to warm every horizon's predictors again after a restart.
pub const LINK_HISTORY_STEPS: usize = 3000;
/// Forecasts of every horizon are made and checked once per second of active time.
const LINK_DECISION_STEPS: usize = 10;

/// How far ahead a forecast looks.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ForecastHorizon {
    /// The next second.
    OneSecond,
    /// The next five seconds.
    FiveSeconds,
    /// The next thirty seconds.
    ThirtySeconds,
}

impl ForecastHorizon {
    /// Every horizon, shortest first.
    pub const ALL: [ForecastHorizon; 3] = [
        ForecastHorizon::OneSecond,
        ForecastHorizon::FiveSeconds,
        ForecastHorizon::ThirtySeconds,
    ];

    /// The horizon as a duration.
    pub fn duration(self) -> Duration {
        match self {
            ForecastHorizon::OneSecond => Duration::from_secs(1),
            ForecastHorizon::FiveSeconds => Duration::from_secs(5),
            ForecastHorizon::ThirtySeconds => Duration::from_secs(30),
        }
    }

    /// The horizon in 100 ms steps.
    pub fn steps(self) -> usize {
        (self.duration().as_millis() / BASE_STEP.as_millis()) as usize
    }

    /// The shortest horizon at least as long as `duration` (the longest for anything beyond).
    pub fn covering(duration: Duration) -> ForecastHorizon {
        Self::ALL
            .into_iter()
            .find(|horizon| horizon.duration() >= duration)
            .unwrap_or(ForecastHorizon::ThirtySeconds)
    }

    fn index(self) -> usize {
        match self {
            ForecastHorizon::OneSecond => 0,
            ForecastHorizon::FiveSeconds => 1,
            ForecastHorizon::ThirtySeconds => 2,
        }
    }
}

/// Expected throughput of a link over a horizon, with its 80 % band.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Forecast {
    /// How far ahead this forecast looks.
    pub horizon: ForecastHorizon,
    /// Expected mean throughput over the horizon, bits per second.
    pub expected_bits_per_sec: f64,
    /// Lower edge of the 80 % band, bits per second (about 10 % of intervals fall below).
    pub lower: f64,
    /// Upper edge of the 80 % band, bits per second (about 10 % of intervals fall above).
    pub upper: f64,
    /// Trust in the forecast, 0 to 1: grows with the number of checked forecasts, scaled by their
    /// recent accuracy.
    pub confidence: f64,
    /// The predictor that made this forecast (chosen by recent accuracy on this link).
    pub predictor_name: String,
    /// Seconds of active link time observed so far.
    pub observed_seconds: f64,
}

/// How long sending a number of bytes should take at a forecast rate: what an ETA shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TransferEstimate {
    /// At the expected rate, seconds; absent when the expected rate is zero.
    pub expected_seconds: Option<f64>,
    /// At the upper edge of the band, seconds (about one chance in ten of being faster).
    pub optimistic_seconds: Option<f64>,
    /// At the lower edge of the band, seconds (about one chance in ten of being slower); absent
    /// when the band reaches zero (an outage is plausible).
    pub pessimistic_seconds: Option<f64>,
}

impl Forecast {
    /// Time to send `bytes` at this forecast's rates. The rates are those of the forecast's
    /// horizon; for transfers much longer than it the estimate is only as good as that horizon.
    pub fn time_to_send(&self, bytes: u64) -> TransferEstimate {
        let bits = bytes as f64 * 8.0;
        let seconds_at = |rate: f64| (rate > 0.0 && rate.is_finite()).then(|| bits / rate);
        TransferEstimate {
            expected_seconds: seconds_at(self.expected_bits_per_sec),
            optimistic_seconds: seconds_at(self.upper),
            pessimistic_seconds: seconds_at(self.lower),
        }
    }
}

/// How well one horizon's forecasts have matched reality on a link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HorizonAccuracy {
    /// The horizon.
    pub horizon: ForecastHorizon,
    /// Forecasts checked against what happened.
    pub forecasts_checked: u64,
    /// 1 − WAPE over every checked forecast, absent before the first.
    pub accuracy: Option<f64>,
    /// Share of checked forecasts whose actual rate fell inside the 80 % band.
    pub inside_band_share: Option<f64>,
    /// Predictor answering now.
    pub predictor_name: String,
    /// Recent accuracy of each candidate predictor (1 − decayed WAPE), absent before checks.
    pub candidates: Vec<CandidateAccuracy>,
}

/// Recent accuracy of one candidate predictor on a link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CandidateAccuracy {
    /// Predictor name.
    pub predictor_name: String,
    /// Recent 1 − WAPE, absent before the first check.
    pub recent_accuracy: Option<f64>,
}

/// Accuracy of a link's forecasts so far, per horizon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AccuracyReport {
    /// One entry per horizon, shortest first.
    pub horizons: Vec<HorizonAccuracy>,
}

/// What `novacron link show` needs about one link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LinkSummary {
    /// Mean throughput over the last second of active time, bits per second.
    pub current_bits_per_sec: Option<f64>,
    /// Seconds of active link time observed so far.
    pub observed_seconds: f64,
    /// Bytes acknowledged in all observed samples.
    pub bytes_observed: u64,
    /// Forecast per horizon (absent before the first 100 ms of data).
    pub forecasts: Vec<Forecast>,
    /// Accuracy so far.
    pub accuracy: AccuracyReport,
}

struct HorizonState {
    horizon: ForecastHorizon,
    ensemble: AdaptiveEnsemble,
    tracker: ForecastTracker,
}

/// The throughput model of one link.
pub struct LinkModel {
    horizons: Vec<HorizonState>,
    partial_step_bits: f64,
    partial_step_nanos: u128,
    steps_seen: u64,
    bytes_observed: u64,
    last_second: std::collections::VecDeque<f64>,
    /// The last [`LINK_HISTORY_STEPS`] step rates, bits per second, oldest first.
    history: std::collections::VecDeque<f32>,
}

fn link_members(
    learned_model: Option<&Arc<LearnedModel>>,
    horizon: ForecastHorizon,
) -> Vec<Box<dyn Predictor>> {
    let block_steps = horizon.steps().min(LINK_LONGEST_BLOCK_STEPS);
    let mut members: Vec<Box<dyn Predictor>> = Vec::new();
    if let Some(model) = learned_model {
        members.push(Box::new(LearnedPredictor::new(Arc::clone(model))));
    }
    members.push(Box::new(Ewma::new(0.7, block_steps)));
    members.push(Box::new(LastValue::new(block_steps)));
    members.push(Box::new(Holt::new(block_steps)));
    members.push(Box::new(HarmonicMean::new(5, block_steps)));
    members
}

impl Default for LinkModel {
    fn default() -> Self {
        Self::new()
    }
}

impl LinkModel {
    /// A link model using the shipped learned model (and the classic predictors); if the shipped
    /// model cannot be loaded the classic predictors alone are used.
    pub fn new() -> Self {
        Self::with_learned_model(LearnedModel::shipped().ok())
    }

    /// A link model with an explicit learned model, or none.
    pub fn with_learned_model(learned_model: Option<Arc<LearnedModel>>) -> Self {
        let horizons = ForecastHorizon::ALL
            .into_iter()
            .map(|horizon| HorizonState {
                horizon,
                ensemble: AdaptiveEnsemble::new(
                    link_members(learned_model.as_ref(), horizon),
                    horizon.steps(),
                    LINK_DECISION_STEPS,
                ),
                tracker: ForecastTracker::new(horizon.steps(), DEFAULT_BAND_WINDOW),
            })
            .collect();
        Self {
            horizons,
            partial_step_bits: 0.0,
            partial_step_nanos: 0,
            steps_seen: 0,
            bytes_observed: 0,
            last_second: std::collections::VecDeque::with_capacity(LINK_CURRENT_RATE_STEPS),
            history: std::collections::VecDeque::new(),
        }
    }

    /// Records that `bytes_acknowledged` were acknowledged by the peer over `interval` of active
    /// sending. The bytes are spread evenly over the interval and binned into 100 ms steps; a zero
    /// interval adds its bytes to the current step.
    pub fn observe(&mut self, bytes_acknowledged: u64, interval: Duration) {
        self.bytes_observed = self.bytes_observed.saturating_add(bytes_acknowledged);
        let total_bits = bytes_acknowledged as f64 * 8.0;
        if interval.is_zero() {
            self.partial_step_bits += total_bits;
            return;
        }
        let counted = interval.min(LONGEST_SAMPLE);
        let bits_per_nano = total_bits / interval.as_nanos() as f64;
        let step_nanos = BASE_STEP.as_nanos();
        let mut remaining = counted.as_nanos();
        while remaining > 0 {
            let take = remaining.min(step_nanos - self.partial_step_nanos);
            self.partial_step_bits += bits_per_nano * take as f64;
            self.partial_step_nanos += take;
            remaining -= take;
            if self.partial_step_nanos == step_nanos {
                let rate = self.partial_step_bits / BASE_STEP.as_secs_f64();
                self.partial_step_bits = 0.0;
                self.partial_step_nanos = 0;
                self.push_step(rate);
            }
        }
    }

    /// Records an active probe that measured `bits_per_second` over `duration`. Non-finite or
    /// negative measurements are ignored.
    pub fn observe_probe(&mut self, bits_per_second: f64, duration: Duration) {
        if !bits_per_second.is_finite() || bits_per_second < 0.0 || duration.is_zero() {
            return;
        }
        let bytes = (bits_per_second / 8.0 * duration.as_secs_f64()).round() as u64;
        self.observe(bytes, duration);
    }

    /// The link's recent 100 ms step rates (bits per second, oldest first, at most
    /// [`LINK_HISTORY_STEPS`]), for saving across restarts: [`Self::replay`] feeds them back.
    pub fn history(&self) -> Vec<f32> {
        self.history.iter().copied().collect()
    }

    /// Feeds saved step rates (from [`Self::history`]) as if just observed, oldest first;
    /// non-finite or negative ones are skipped.
    pub fn replay(&mut self, steps: &[f32]) {
        for &step in steps {
            if step.is_finite() && step >= 0.0 {
                self.bytes_observed = self
                    .bytes_observed
                    .saturating_add((f64::from(step) / 8.0 * BASE_STEP.as_secs_f64()) as u64);
                self.push_step(f64::from(step));
            }
        }
    }

    fn push_step(&mut self, bits_per_second: f64) {
        if self.history.len() == LINK_HISTORY_STEPS {
            self.history.pop_front();
        }
        self.history.push_back(bits_per_second as f32);
        self.steps_seen += 1;
        if self.last_second.len() == LINK_CURRENT_RATE_STEPS {
            self.last_second.pop_front();
        }
        self.last_second.push_back(bits_per_second);
        let decision_boundary = self.steps_seen.is_multiple_of(LINK_DECISION_STEPS as u64);
        for state in &mut self.horizons {
            state.ensemble.observe(bits_per_second);
            state.tracker.observe(bits_per_second);
            if decision_boundary
                && let Some(expected) = state.ensemble.forecast(state.horizon.steps())
            {
                state.tracker.record(expected);
            }
        }
    }

    /// Seconds of active link time observed (whole 100 ms steps).
    pub fn observed_seconds(&self) -> f64 {
        self.steps_seen as f64 * BASE_STEP.as_secs_f64()
    }

    /// Mean throughput over the last second of active time.
    pub fn current_bits_per_sec(&self) -> Option<f64> {
        (!self.last_second.is_empty())
            .then(|| self.last_second.iter().sum::<f64>() / self.last_second.len() as f64)
    }

    /// The forecast for `horizon`; `None` until the first 100 ms of active time was observed.
    pub fn forecast(&self, horizon: ForecastHorizon) -> Option<Forecast> {
        let state = &self.horizons[horizon.index()];
        let expected = state.ensemble.forecast(horizon.steps())?;
        let band = state.tracker.band(expected);
        Some(Forecast {
            horizon,
            expected_bits_per_sec: band.expected,
            lower: band.lower,
            upper: band.upper,
            confidence: state.tracker.calibrator().confidence(),
            predictor_name: state.ensemble.selected_member_name(),
            observed_seconds: self.observed_seconds(),
        })
    }

    /// How well forecasts matched reality so far, per horizon.
    pub fn accuracy_so_far(&self) -> AccuracyReport {
        AccuracyReport {
            horizons: self
                .horizons
                .iter()
                .map(|state| {
                    let totals = state.tracker.totals();
                    HorizonAccuracy {
                        horizon: state.horizon,
                        forecasts_checked: totals.checked,
                        accuracy: totals.accuracy(),
                        inside_band_share: totals.inside_band_share(),
                        predictor_name: state.ensemble.selected_member_name(),
                        candidates: state
                            .ensemble
                            .member_accuracies()
                            .into_iter()
                            .map(|(predictor_name, recent_accuracy)| CandidateAccuracy {
                                predictor_name,
                                recent_accuracy,
                            })
                            .collect(),
                    }
                })
                .collect(),
        }
    }

    /// Everything `link show` prints.
    pub fn summary(&self) -> LinkSummary {
        LinkSummary {
            current_bits_per_sec: self.current_bits_per_sec(),
            observed_seconds: self.observed_seconds(),
            bytes_observed: self.bytes_observed,
            forecasts: ForecastHorizon::ALL
                .into_iter()
                .filter_map(|horizon| self.forecast(horizon))
                .collect(),
            accuracy: self.accuracy_so_far(),
        }
    }
}

/// One [`LinkModel`] per peer, shared between the transport (writer) and readers. Each link has its
/// own lock, so feeding one link never blocks reading another.
pub struct LinkRegistry<PeerId = String> {
    links: RwLock<HashMap<PeerId, Arc<Mutex<LinkModel>>>>,
    learned_model: Option<Arc<LearnedModel>>,
}

impl<PeerId: Eq + Hash + Clone> Default for LinkRegistry<PeerId> {
    fn default() -> Self {
        Self::new()
    }
}

impl<PeerId: Eq + Hash + Clone> LinkRegistry<PeerId> {
    /// An empty registry whose links use the shipped learned model.
    pub fn new() -> Self {
        Self::with_learned_model(LearnedModel::shipped().ok())
    }

    /// An empty registry whose links use `learned_model` (or only the classic predictors).
    pub fn with_learned_model(learned_model: Option<Arc<LearnedModel>>) -> Self {
        Self {
            links: RwLock::new(HashMap::new()),
            learned_model,
        }
    }

    /// The model of `peer`, created on first use.
    pub fn link(&self, peer: &PeerId) -> Arc<Mutex<LinkModel>> {
        if let Some(link) = self
            .links
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(peer)
        {
            return Arc::clone(link);
        }
        let mut links = self
            .links
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Arc::clone(links.entry(peer.clone()).or_insert_with(|| {
            Arc::new(Mutex::new(LinkModel::with_learned_model(
                self.learned_model.clone(),
            )))
        }))
    }

    fn with_existing<T>(&self, peer: &PeerId, read: impl FnOnce(&LinkModel) -> T) -> Option<T> {
        let link = self
            .links
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(peer)
            .cloned()?;
        let model = link.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        Some(read(&model))
    }

    /// Feeds a transfer sample to `peer`'s link (see [`LinkModel::observe`]).
    pub fn observe(&self, peer: &PeerId, bytes_acknowledged: u64, interval: Duration) {
        let link = self.link(peer);
        link.lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .observe(bytes_acknowledged, interval);
    }

    /// Feeds a probe result to `peer`'s link (see [`LinkModel::observe_probe`]).
    pub fn observe_probe(&self, peer: &PeerId, bits_per_second: f64, duration: Duration) {
        let link = self.link(peer);
        link.lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .observe_probe(bits_per_second, duration);
    }

    /// `peer`'s forecast; `None` for an unknown peer or one without data yet.
    pub fn forecast(&self, peer: &PeerId, horizon: ForecastHorizon) -> Option<Forecast> {
        self.with_existing(peer, |model| model.forecast(horizon))
            .flatten()
    }

    /// `peer`'s accuracy so far; `None` for an unknown peer.
    pub fn accuracy_so_far(&self, peer: &PeerId) -> Option<AccuracyReport> {
        self.with_existing(peer, LinkModel::accuracy_so_far)
    }

    /// `peer`'s summary; `None` for an unknown peer.
    pub fn summary(&self, peer: &PeerId) -> Option<LinkSummary> {
        self.with_existing(peer, LinkModel::summary)
    }

    /// Every known peer with `read` of its model (order unspecified). The registry's lock is
    /// not held while the models are read.
    fn map_links<T>(&self, read: impl Fn(&LinkModel) -> T) -> Vec<(PeerId, T)> {
        let links: Vec<(PeerId, Arc<Mutex<LinkModel>>)> = self
            .links
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .map(|(peer, link)| (peer.clone(), Arc::clone(link)))
            .collect();
        links
            .into_iter()
            .map(|(peer, link)| {
                let model = link.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                (peer, read(&model))
            })
            .collect()
    }

    /// Every known peer with its summary (order unspecified).
    pub fn summaries(&self) -> Vec<(PeerId, LinkSummary)> {
        self.map_links(LinkModel::summary)
    }

    /// Every known peer.
    pub fn peers(&self) -> Vec<PeerId> {
        self.links
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Every link's [`LinkModel::history`].
    pub fn histories(&self) -> Vec<(PeerId, Vec<f32>)> {
        self.map_links(LinkModel::history)
    }

    /// Feeds saved step rates to `peer`'s link (see [`LinkModel::replay`]).
    pub fn replay(&self, peer: &PeerId, steps: &[f32]) {
        let link = self.link(peer);
        link.lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .replay(steps);
    }

    /// Forgets `peer` (for example when a host leaves the cluster); true if it was known.
    pub fn remove(&self, peer: &PeerId) -> bool {
        self.links
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(peer)
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replayed_history_forecasts_like_the_original() {
        let mut original = LinkModel::with_learned_model(None);
        for step in 0..600u64 {
            let rate = 40e6 + 10e6 * ((step / 50) % 2) as f64;
            original.observe((rate / 8.0 * 0.1) as u64, Duration::from_millis(100));
        }
        let history = original.history();
        assert_eq!(history.len(), 600);
        let mut restored = LinkModel::with_learned_model(None);
        restored.replay(&history);
        restored.replay(&[f32::NAN, -1.0]);
        assert_eq!(restored.observed_seconds(), original.observed_seconds());
        for horizon in ForecastHorizon::ALL {
            let (a, b) = (
                original.forecast(horizon).expect("forecast"),
                restored.forecast(horizon).expect("forecast"),
            );
            assert!(
                (a.expected_bits_per_sec - b.expected_bits_per_sec).abs() < 1e3,
                "{horizon:?}: {a:?} against {b:?}"
            );
        }
        let mut long = LinkModel::with_learned_model(None);
        long.replay(&vec![1e6; LINK_HISTORY_STEPS + 10]);
        assert_eq!(long.history().len(), LINK_HISTORY_STEPS, "bounded");
    }

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn registry_is_send_and_sync() {
        assert_send_sync::<LinkRegistry<String>>();
        assert_send_sync::<LinkRegistry<u64>>();
    }

    #[test]
    fn no_forecast_before_data() {
        let model = LinkModel::new();
        assert_eq!(model.forecast(ForecastHorizon::OneSecond), None);
        assert_eq!(model.current_bits_per_sec(), None);
    }

    #[test]
    fn bytes_over_intervals_become_rates() {
        let mut model = LinkModel::with_learned_model(None);
        // 10 Mbit/s delivered in uneven samples: 125 000 bytes per 100 ms.
        for _ in 0..20 {
            model.observe(312_500, Duration::from_millis(250));
        }
        assert!((model.observed_seconds() - 5.0).abs() < 1e-9);
        let current = model.current_bits_per_sec().expect("rate");
        assert!((current - 10.0e6).abs() < 1.0, "{current}");
        let forecast = model
            .forecast(ForecastHorizon::OneSecond)
            .expect("forecast");
        assert!((forecast.expected_bits_per_sec - 10.0e6).abs() < 1.0);
        assert!(forecast.lower <= forecast.expected_bits_per_sec);
        assert!(forecast.upper >= forecast.expected_bits_per_sec);
    }

    #[test]
    fn few_samples_mean_wide_band_and_low_confidence() {
        let mut model = LinkModel::new();
        model.observe(125_000, Duration::from_millis(1000));
        let early = model
            .forecast(ForecastHorizon::OneSecond)
            .expect("forecast");
        for _ in 0..120 {
            model.observe(125_000, Duration::from_millis(1000));
        }
        let late = model
            .forecast(ForecastHorizon::OneSecond)
            .expect("forecast");
        let early_width = (early.upper - early.lower) / early.expected_bits_per_sec;
        let late_width = (late.upper - late.lower) / late.expected_bits_per_sec;
        assert!(
            early.confidence < 0.1,
            "early confidence {}",
            early.confidence
        );
        assert!(late.confidence > 0.8, "late confidence {}", late.confidence);
        assert!(
            early_width > 3.0 * late_width,
            "{early_width} vs {late_width}"
        );
    }

    #[test]
    fn accuracy_is_reported_per_horizon() {
        let mut model = LinkModel::new();
        for second in 0..90 {
            let bytes = if second % 20 < 10 { 500_000 } else { 250_000 };
            model.observe(bytes, Duration::from_secs(1));
        }
        let report = model.accuracy_so_far();
        assert_eq!(report.horizons.len(), 3);
        let one_second = &report.horizons[0];
        assert_eq!(one_second.horizon, ForecastHorizon::OneSecond);
        assert!(
            one_second.forecasts_checked >= 85,
            "{}",
            one_second.forecasts_checked
        );
        assert!(one_second.accuracy.expect("accuracy") > 0.5);
        assert!(!one_second.candidates.is_empty());
        let thirty = &report.horizons[2];
        assert!(thirty.forecasts_checked >= 55 && thirty.forecasts_checked <= 61);
        let json = serde_json::to_string(&model.summary()).expect("summary serialises");
        assert!(json.contains("\"one_second\""), "{json}");
    }

    #[test]
    fn probes_and_garbage_probes() {
        let mut model = LinkModel::with_learned_model(None);
        model.observe_probe(f64::NAN, Duration::from_secs(1));
        model.observe_probe(-1.0, Duration::from_secs(1));
        assert_eq!(model.observed_seconds(), 0.0);
        model.observe_probe(4.0e6, Duration::from_millis(500));
        let forecast = model
            .forecast(ForecastHorizon::FiveSeconds)
            .expect("forecast");
        assert!((forecast.expected_bits_per_sec - 4.0e6).abs() < 1.0);
    }

    #[test]
    fn registry_keeps_links_apart() {
        let registry: LinkRegistry<String> = LinkRegistry::with_learned_model(None);
        let fast = "host-a".to_string();
        let slow = "host-b".to_string();
        assert_eq!(registry.forecast(&fast, ForecastHorizon::OneSecond), None);
        registry.observe(&fast, 1_250_000, Duration::from_secs(1));
        registry.observe(&slow, 12_500, Duration::from_secs(1));
        let fast_rate = registry
            .forecast(&fast, ForecastHorizon::OneSecond)
            .expect("fast forecast")
            .expected_bits_per_sec;
        let slow_rate = registry
            .forecast(&slow, ForecastHorizon::OneSecond)
            .expect("slow forecast")
            .expected_bits_per_sec;
        assert!((fast_rate - 10.0e6).abs() < 1.0);
        assert!((slow_rate - 0.1e6).abs() < 1.0);
        let mut peers = registry.peers();
        peers.sort();
        assert_eq!(peers, vec![fast.clone(), slow.clone()]);
        assert_eq!(registry.summaries().len(), 2);
        assert!(registry.remove(&slow));
        assert!(registry.summary(&slow).is_none());
    }

    #[test]
    fn registry_is_usable_from_many_threads() {
        let registry: Arc<LinkRegistry<u32>> = Arc::new(LinkRegistry::with_learned_model(None));
        let workers: Vec<_> = (0..4_u32)
            .map(|peer| {
                let registry = Arc::clone(&registry);
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        registry.observe(&peer, 10_000, Duration::from_millis(100));
                        let _ = registry.forecast(&(3 - peer), ForecastHorizon::OneSecond);
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().expect("worker finished");
        }
        for peer in 0..4 {
            let summary = registry.summary(&peer).expect("summary");
            assert!((summary.observed_seconds - 5.0).abs() < 1e-9);
            assert_eq!(summary.bytes_observed, 500_000);
        }
    }

    #[test]
    fn link_model_fed_a_field_trace_forecasts_like_the_evaluation() {
        // The transport's view of a trace: bytes acknowledged per 100 ms of sending.
        let path = crate::trace::trace_directory().join("Verizon-EVDO-driving.up");
        let trace = crate::trace::DeliveryTrace::load(&path).expect("shared trace");
        let base = trace.base_series().expect("series").bits_per_second;
        let mut model = LinkModel::new();
        for rate in &base {
            model.observe(
                (rate * BASE_STEP.as_secs_f64() / 8.0).round() as u64,
                BASE_STEP,
            );
        }
        let (_, last_value) = crate::evaluation::walk_forward(
            &base,
            10,
            &mut LastValue::new(10),
            DEFAULT_BAND_WINDOW,
        );
        let report = model.accuracy_so_far();
        let one_second = &report.horizons[0];
        let accuracy = one_second.accuracy.expect("accuracy");
        let last_value_accuracy = last_value.accuracy().expect("accuracy");
        // The shipped model was fitted on this trace: this checks the wiring, not generalisation.
        assert!(
            accuracy > last_value_accuracy,
            "link model {accuracy} vs last value {last_value_accuracy}"
        );
        let inside = one_second.inside_band_share.expect("calibration");
        assert!((0.7..=0.9).contains(&inside), "inside band {inside}");
        let forecast = model
            .forecast(ForecastHorizon::ThirtySeconds)
            .expect("forecast");
        assert!(forecast.lower <= forecast.expected_bits_per_sec);
        assert!(forecast.expected_bits_per_sec <= forecast.upper);
        assert!(forecast.confidence > 0.3, "{}", forecast.confidence);
    }

    #[test]
    fn transfer_time_from_a_forecast() {
        let forecast = Forecast {
            horizon: ForecastHorizon::ThirtySeconds,
            expected_bits_per_sec: 8.0e6,
            lower: 0.0,
            upper: 16.0e6,
            confidence: 0.5,
            predictor_name: "ewma(0.7)".to_string(),
            observed_seconds: 60.0,
        };
        let estimate = forecast.time_to_send(10_000_000);
        assert_eq!(estimate.expected_seconds, Some(10.0));
        assert_eq!(estimate.optimistic_seconds, Some(5.0));
        assert_eq!(estimate.pessimistic_seconds, None);
    }

    #[test]
    fn horizon_covering_a_duration() {
        assert_eq!(
            ForecastHorizon::covering(Duration::from_millis(300)),
            ForecastHorizon::OneSecond
        );
        assert_eq!(
            ForecastHorizon::covering(Duration::from_secs(2)),
            ForecastHorizon::FiveSeconds
        );
        assert_eq!(
            ForecastHorizon::covering(Duration::from_secs(600)),
            ForecastHorizon::ThirtySeconds
        );
        assert_eq!(ForecastHorizon::ThirtySeconds.steps(), 300);
    }
}
