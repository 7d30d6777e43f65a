//! Uncertainty bands and the bookkeeping that checks forecasts once their interval has passed.
//!
//! A band comes from the empirical quantiles of recent forecast errors, taken in log space
//! (`ln((actual + c) / (expected + c))`, with `c` one packet per horizon so that outages do not
//! produce infinite ratios). With few checked forecasts the band is widened towards a wide prior,
//! so a fresh link answers with a wide band and a low confidence. Nothing here looks ahead: an
//! error is only learnt once the whole forecast interval has been observed.

use std::collections::VecDeque;

use crate::trace::{BASE_STEP, PACKET_BITS};

/// Share of actual intervals an 80 % band should hold: the 10th and 90th percentiles.
const LOWER_QUANTILE: f64 = 0.1;
const UPPER_QUANTILE: f64 = 0.9;
/// Half-width (log space) of the prior band used when no error has been seen: a factor of 4.
const PRIOR_HALF_WIDTH: f64 = std::f64::consts::LN_2 * 2.0;
/// Pseudo-count of the prior: after this many checked forecasts the prior adds half its width.
const PRIOR_WEIGHT: f64 = 2.0;

/// Default number of recent checked forecasts a band and the recent accuracy are computed from.
pub const DEFAULT_BAND_WINDOW: usize = 150;

/// Learns an 80 % band from the recent errors of one forecast series (one predictor, one horizon).
#[derive(Debug, Clone)]
pub struct BandCalibrator {
    window: usize,
    offset_bits_per_second: f64,
    log_residuals: VecDeque<f64>,
    recent_errors: VecDeque<(f64, f64)>,
}

impl BandCalibrator {
    /// A calibrator for forecasts over `horizon_steps` base steps, remembering `window` errors.
    pub fn new(horizon_steps: usize, window: usize) -> Self {
        let horizon_seconds = BASE_STEP.as_secs_f64() * horizon_steps.max(1) as f64;
        Self {
            window: window.max(1),
            offset_bits_per_second: PACKET_BITS / horizon_seconds,
            log_residuals: VecDeque::with_capacity(window),
            recent_errors: VecDeque::with_capacity(window),
        }
    }

    /// Learns from one checked forecast.
    pub fn record(&mut self, expected: f64, actual: f64) {
        let offset = self.offset_bits_per_second;
        let residual = ((actual.max(0.0) + offset) / (expected.max(0.0) + offset)).ln();
        if self.log_residuals.len() == self.window {
            self.log_residuals.pop_front();
            self.recent_errors.pop_front();
        }
        self.log_residuals.push_back(residual);
        self.recent_errors
            .push_back(((actual - expected).abs(), actual.max(0.0)));
    }

    /// Number of errors the band is currently computed from.
    pub fn samples(&self) -> usize {
        self.log_residuals.len()
    }

    /// 1 − WAPE over the remembered forecasts, `None` before any (or when all actuals were 0).
    pub fn recent_accuracy(&self) -> Option<f64> {
        let (error, actual) = self
            .recent_errors
            .iter()
            .fold((0.0, 0.0), |(error, actual), (e, a)| {
                (error + e, actual + a)
            });
        (actual > 0.0).then(|| 1.0 - error / actual)
    }

    /// The (lower, upper) 80 % band around `expected`, bits per second.
    pub fn band(&self, expected: f64) -> (f64, f64) {
        let expected = expected.max(0.0);
        let count = self.log_residuals.len();
        let (lower_residual, upper_residual) = if count == 0 {
            (0.0, 0.0)
        } else {
            let mut sorted: Vec<f64> = self.log_residuals.iter().copied().collect();
            sorted.sort_by(f64::total_cmp);
            (
                order_statistic(&sorted, LOWER_QUANTILE),
                order_statistic(&sorted, UPPER_QUANTILE),
            )
        };
        let widening = PRIOR_HALF_WIDTH * PRIOR_WEIGHT / (count as f64 + PRIOR_WEIGHT);
        let offset = self.offset_bits_per_second;
        let lower = ((expected + offset) * (lower_residual.min(0.0) - widening).exp() - offset)
            .max(0.0)
            .min(expected);
        let upper = ((expected + offset) * (upper_residual.max(0.0) + widening).exp() - offset)
            .max(expected);
        (lower, upper)
    }

    /// How much to trust the forecast, 0 to 1: grows with the number of checked forecasts (half
    /// after 10) and is scaled by their recent accuracy.
    pub fn confidence(&self) -> f64 {
        let count = self.log_residuals.len() as f64;
        let accuracy = self.recent_accuracy().unwrap_or(0.0).clamp(0.0, 1.0);
        count / (count + 10.0) * accuracy
    }
}

/// Empirical quantile with linear interpolation between order statistics (the common "type 7"
/// estimator). `sorted` must not be empty.
fn order_statistic(sorted: &[f64], quantile: f64) -> f64 {
    let position = quantile.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let below = position.floor() as usize;
    let above = (below + 1).min(sorted.len() - 1);
    let fraction = position - below as f64;
    sorted[below] * (1.0 - fraction) + sorted[above] * fraction
}

/// A forecast with its band, as recorded for later checking.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BandedForecast {
    /// Expected mean throughput over the horizon, bits per second.
    pub expected: f64,
    /// Lower edge of the 80 % band, bits per second.
    pub lower: f64,
    /// Upper edge of the 80 % band, bits per second.
    pub upper: f64,
}

/// A forecast whose interval has passed, with what actually happened.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CheckedForecast {
    /// Base step count at which the forecast was made (only steps before it were known).
    pub made_at_step: u64,
    /// The forecast as made.
    pub forecast: BandedForecast,
    /// Actual mean throughput over the forecast interval, bits per second.
    pub actual: f64,
}

impl CheckedForecast {
    /// True when the actual rate fell inside the band.
    pub fn inside_band(&self) -> bool {
        self.forecast.lower <= self.actual && self.actual <= self.forecast.upper
    }
}

/// Running totals of checked forecasts: accuracy (1 − WAPE) and calibration.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ScoreTotals {
    /// Sum of absolute errors, bits per second.
    pub absolute_error: f64,
    /// Sum of actual rates, bits per second.
    pub actual: f64,
    /// Forecasts whose actual fell inside the band.
    pub inside_band: u64,
    /// Forecasts checked.
    pub checked: u64,
}

impl ScoreTotals {
    /// Adds one checked forecast.
    pub fn add(&mut self, checked: &CheckedForecast) {
        self.absolute_error += (checked.actual - checked.forecast.expected).abs();
        self.actual += checked.actual;
        self.inside_band += u64::from(checked.inside_band());
        self.checked += 1;
    }

    /// 1 − WAPE, `None` when nothing (or only zero traffic) was checked.
    pub fn accuracy(&self) -> Option<f64> {
        (self.actual > 0.0).then(|| 1.0 - self.absolute_error / self.actual)
    }

    /// Share of checked forecasts whose actual fell inside the band.
    pub fn inside_band_share(&self) -> Option<f64> {
        (self.checked > 0).then(|| self.inside_band as f64 / self.checked as f64)
    }
}

/// Records forecasts of one horizon, checks them once their interval has been observed, and keeps
/// the band calibrator and totals up to date.
#[derive(Debug, Clone)]
pub struct ForecastTracker {
    horizon_steps: usize,
    steps_seen: u64,
    recent_samples: VecDeque<f64>,
    pending: VecDeque<(u64, CheckedForecast)>,
    calibrator: BandCalibrator,
    totals: ScoreTotals,
}

impl ForecastTracker {
    /// A tracker for forecasts over the next `horizon_steps` base steps.
    pub fn new(horizon_steps: usize, band_window: usize) -> Self {
        let horizon_steps = horizon_steps.max(1);
        Self {
            horizon_steps,
            steps_seen: 0,
            recent_samples: VecDeque::with_capacity(horizon_steps),
            pending: VecDeque::new(),
            calibrator: BandCalibrator::new(horizon_steps, band_window),
            totals: ScoreTotals::default(),
        }
    }

    /// Forecast horizon in base steps.
    pub fn horizon_steps(&self) -> usize {
        self.horizon_steps
    }

    /// Base steps observed so far.
    pub fn steps_seen(&self) -> u64 {
        self.steps_seen
    }

    /// Feeds the next base sample; returns the forecasts whose interval just completed.
    pub fn observe(&mut self, bits_per_second: f64) -> Vec<CheckedForecast> {
        if self.recent_samples.len() == self.horizon_steps {
            self.recent_samples.pop_front();
        }
        self.recent_samples.push_back(bits_per_second);
        self.steps_seen += 1;
        let mut completed = Vec::new();
        while let Some((due_step, _)) = self.pending.front() {
            if *due_step > self.steps_seen {
                break;
            }
            let Some((_, mut checked)) = self.pending.pop_front() else {
                break;
            };
            checked.actual = self.recent_samples.iter().sum::<f64>() / self.horizon_steps as f64;
            self.calibrator
                .record(checked.forecast.expected, checked.actual);
            self.totals.add(&checked);
            completed.push(checked);
        }
        completed
    }

    /// The band the tracker would give `expected` now, without recording it.
    pub fn band(&self, expected: f64) -> BandedForecast {
        let (lower, upper) = self.calibrator.band(expected);
        BandedForecast {
            expected: expected.max(0.0),
            lower,
            upper,
        }
    }

    /// Records a forecast made now for the next `horizon_steps` base steps; returns it with its
    /// band.
    pub fn record(&mut self, expected: f64) -> BandedForecast {
        let forecast = self.band(expected);
        self.pending.push_back((
            self.steps_seen + self.horizon_steps as u64,
            CheckedForecast {
                made_at_step: self.steps_seen,
                forecast,
                actual: f64::NAN,
            },
        ));
        forecast
    }

    /// Totals over every checked forecast.
    pub fn totals(&self) -> ScoreTotals {
        self.totals
    }

    /// The band calibrator (recent accuracy, confidence).
    pub fn calibrator(&self) -> &BandCalibrator {
        &self.calibrator
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random numbers for tests (SplitMix64).
    fn uniform_sequence(seed: u64, count: usize) -> Vec<f64> {
        let mut state = seed;
        (0..count)
            .map(|_| {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                (z >> 11) as f64 / (1_u64 << 53) as f64
            })
            .collect()
    }

    #[test]
    fn fresh_band_is_wide_and_narrows_with_evidence() {
        let mut calibrator = BandCalibrator::new(10, 100);
        let (lower, upper) = calibrator.band(1.0e6);
        assert!(
            lower < 0.3e6 && upper > 3.5e6,
            "fresh band {lower}..{upper}"
        );
        assert_eq!(calibrator.confidence(), 0.0);
        for _ in 0..100 {
            calibrator.record(1.0e6, 1.0e6);
        }
        let (lower, upper) = calibrator.band(1.0e6);
        assert!(
            lower > 0.9e6 && upper < 1.1e6,
            "band after perfect forecasts {lower}..{upper}"
        );
        assert!(calibrator.confidence() > 0.9);
    }

    #[test]
    fn band_always_contains_the_expected_value() {
        let mut calibrator = BandCalibrator::new(10, 50);
        // Forecasts that are always too high: residuals all negative.
        for _ in 0..50 {
            calibrator.record(2.0e6, 1.0e6);
        }
        let (lower, upper) = calibrator.band(2.0e6);
        assert!(lower <= 1.0e6 + 1.0 && upper >= 2.0e6);
    }

    #[test]
    fn calibration_on_synthetic_noise_hits_eighty_percent() {
        // A constant 4 Mbit/s link with multiplicative log-uniform noise; the forecast is the true
        // level. After warm-up the share of actuals inside the band must be close to 80 %.
        let mut tracker = ForecastTracker::new(1, 150);
        let noise = uniform_sequence(7, 20_000);
        let mut inside_after_warmup = 0_u64;
        let mut checked_after_warmup = 0_u64;
        for (step, uniform) in noise.iter().enumerate() {
            tracker.record(4.0e6);
            let sample = 4.0e6 * ((uniform - 0.5) * 2.0).exp();
            for checked in tracker.observe(sample) {
                if step >= 500 {
                    checked_after_warmup += 1;
                    inside_after_warmup += u64::from(checked.inside_band());
                }
            }
        }
        let share = inside_after_warmup as f64 / checked_after_warmup as f64;
        assert!(
            (0.75..=0.87).contains(&share),
            "share inside the 80 % band was {share}"
        );
    }

    #[test]
    fn tracker_checks_a_forecast_only_after_its_whole_interval() {
        let mut tracker = ForecastTracker::new(3, 10);
        tracker.observe(5.0);
        tracker.record(10.0);
        assert!(tracker.observe(9.0).is_empty());
        assert!(tracker.observe(12.0).is_empty());
        let checked = tracker.observe(12.0);
        assert_eq!(checked.len(), 1);
        assert_eq!(checked[0].made_at_step, 1);
        assert!((checked[0].actual - 11.0).abs() < 1e-12);
        let totals = tracker.totals();
        assert_eq!(totals.checked, 1);
        assert!((totals.accuracy().expect("accuracy") - (1.0 - 1.0 / 11.0)).abs() < 1e-12);
    }
}
