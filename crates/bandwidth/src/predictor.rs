//! The predictor interface and the classic predictors: last value, EWMA, Holt and harmonic mean.
//!
//! Every predictor is sans-IO: it is fed the measured throughput of each consecutive
//! [`BASE_STEP`] (100 ms) and asked for the expected mean throughput over
//! the next few base steps. It never reads a clock or a file, and it only ever sees the past, so the
//! same code serves the walk-forward evaluation and the live per-link model.
//!
//! The classic predictors work on blocks of base steps (for example 10 steps, one second): they
//! update when a block completes, which makes "last value" mean "the last whole second" as in the
//! issue's baseline. Before the first block completes they answer from the partial block.

use std::collections::VecDeque;

use crate::trace::{BASE_STEP, PACKET_BITS};

/// A throughput forecaster fed one sample per base step (100 ms).
pub trait Predictor: Send {
    /// Short stable name shown in reports, e.g. `ewma(0.7)`.
    fn name(&self) -> String;
    /// Feeds the mean throughput of the base step that just ended, bits per second.
    fn observe(&mut self, bits_per_second: f64);
    /// Expected mean throughput over the next `horizon_steps` base steps, bits per second, using
    /// only what was observed so far; `None` before the first sample.
    fn forecast(&self, horizon_steps: usize) -> Option<f64>;
}

/// Accumulates base samples into blocks of a fixed number of steps.
#[derive(Debug, Clone)]
pub(crate) struct BlockAccumulator {
    block_steps: usize,
    sum: f64,
    count: usize,
}

impl BlockAccumulator {
    pub(crate) fn new(block_steps: usize) -> Self {
        Self {
            block_steps: block_steps.max(1),
            sum: 0.0,
            count: 0,
        }
    }

    /// Adds a sample; returns the block mean when this sample completes a block.
    pub(crate) fn push(&mut self, bits_per_second: f64) -> Option<f64> {
        self.sum += bits_per_second;
        self.count += 1;
        if self.count == self.block_steps {
            let mean = self.sum / self.block_steps as f64;
            self.sum = 0.0;
            self.count = 0;
            Some(mean)
        } else {
            None
        }
    }

    pub(crate) fn partial_mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// Horizon expressed in blocks (at least one).
    pub(crate) fn horizon_blocks(&self, horizon_steps: usize) -> f64 {
        (horizon_steps as f64 / self.block_steps as f64).max(1.0)
    }

    /// Rate of one packet per block: the floor used where a zero would break a ratio.
    pub(crate) fn one_packet_rate(&self) -> f64 {
        PACKET_BITS / (BASE_STEP.as_secs_f64() * self.block_steps as f64)
    }
}

/// Sanitises a sample: negative or non-finite rates count as zero.
pub(crate) fn clean_sample(bits_per_second: f64) -> f64 {
    if bits_per_second.is_finite() && bits_per_second > 0.0 {
        bits_per_second
    } else {
        0.0
    }
}

/// "Same as the last block": the baseline the issue quotes.
#[derive(Debug, Clone)]
pub struct LastValue {
    blocks: BlockAccumulator,
    last_block: Option<f64>,
}

impl LastValue {
    /// Forecasts the mean of the last whole block of `block_steps` base steps.
    pub fn new(block_steps: usize) -> Self {
        Self {
            blocks: BlockAccumulator::new(block_steps),
            last_block: None,
        }
    }
}

impl Predictor for LastValue {
    fn name(&self) -> String {
        "last-value".to_string()
    }

    fn observe(&mut self, bits_per_second: f64) {
        if let Some(mean) = self.blocks.push(clean_sample(bits_per_second)) {
            self.last_block = Some(mean);
        }
    }

    fn forecast(&self, _horizon_steps: usize) -> Option<f64> {
        self.last_block.or_else(|| self.blocks.partial_mean())
    }
}

/// Exponentially weighted moving average over blocks: `value = alpha * newest + (1 - alpha) *
/// value`, so `alpha` is the weight of the newest block (the EWMA(0.7)).
#[derive(Debug, Clone)]
pub struct Ewma {
    alpha: f64,
    blocks: BlockAccumulator,
    value: Option<f64>,
}

impl Ewma {
    /// `alpha` in (0, 1] is the weight of the newest block; values outside are clamped.
    pub fn new(alpha: f64, block_steps: usize) -> Self {
        Self {
            alpha: if alpha.is_finite() {
                alpha.clamp(0.01, 1.0)
            } else {
                0.7
            },
            blocks: BlockAccumulator::new(block_steps),
            value: None,
        }
    }
}

impl Predictor for Ewma {
    fn name(&self) -> String {
        format!("ewma({})", self.alpha)
    }

    fn observe(&mut self, bits_per_second: f64) {
        if let Some(mean) = self.blocks.push(clean_sample(bits_per_second)) {
            self.value = Some(match self.value {
                Some(value) => self.alpha * mean + (1.0 - self.alpha) * value,
                None => mean,
            });
        }
    }

    fn forecast(&self, _horizon_steps: usize) -> Option<f64> {
        self.value.or_else(|| self.blocks.partial_mean())
    }
}

/// Holt's linear trend method with a damped trend, over blocks. The forecast for a horizon of `h`
/// blocks is the mean of the damped-trend path over those blocks, never below zero.
#[derive(Debug, Clone)]
pub struct Holt {
    level_smoothing: f64,
    trend_smoothing: f64,
    trend_damping: f64,
    blocks: BlockAccumulator,
    state: Option<(f64, f64)>,
}

impl Holt {
    /// Holt with the fixed parameters used throughout: level 0.6, trend 0.2, damping 0.8.
    pub fn new(block_steps: usize) -> Self {
        Self::with_parameters(0.6, 0.2, 0.8, block_steps)
    }

    /// Holt with explicit smoothing weights (newest-sample weight) and trend damping in (0, 1].
    pub fn with_parameters(
        level_smoothing: f64,
        trend_smoothing: f64,
        trend_damping: f64,
        block_steps: usize,
    ) -> Self {
        Self {
            level_smoothing: level_smoothing.clamp(0.01, 1.0),
            trend_smoothing: trend_smoothing.clamp(0.0, 1.0),
            trend_damping: trend_damping.clamp(0.0, 1.0),
            blocks: BlockAccumulator::new(block_steps),
            state: None,
        }
    }
}

impl Predictor for Holt {
    fn name(&self) -> String {
        "holt".to_string()
    }

    fn observe(&mut self, bits_per_second: f64) {
        let Some(mean) = self.blocks.push(clean_sample(bits_per_second)) else {
            return;
        };
        self.state = Some(match self.state {
            None => (mean, 0.0),
            Some((level, trend)) => {
                let damped_trend = self.trend_damping * trend;
                let new_level = self.level_smoothing * mean
                    + (1.0 - self.level_smoothing) * (level + damped_trend);
                let new_trend = self.trend_smoothing * (new_level - level)
                    + (1.0 - self.trend_smoothing) * damped_trend;
                (new_level, new_trend)
            }
        });
    }

    fn forecast(&self, horizon_steps: usize) -> Option<f64> {
        let Some((level, trend)) = self.state else {
            return self.blocks.partial_mean();
        };
        let horizon_blocks = self.blocks.horizon_blocks(horizon_steps);
        let whole_blocks = horizon_blocks.ceil() as usize;
        // Mean over the horizon of level + trend * (phi + phi^2 + ... + phi^j).
        let mut cumulative_damping = 0.0;
        let mut power = 1.0;
        let mut sum_of_cumulative = 0.0;
        for _ in 0..whole_blocks {
            power *= self.trend_damping;
            cumulative_damping += power;
            sum_of_cumulative += cumulative_damping;
        }
        let mean_damping = sum_of_cumulative / whole_blocks as f64;
        Some((level + trend * mean_damping).max(0.0))
    }
}

/// Harmonic mean of the last `window` blocks, as used by video rate adaptation (FESTIVE): robust
/// against single high outliers, pulled down by dips. A zero block counts as one packet per block.
#[derive(Debug, Clone)]
pub struct HarmonicMean {
    window: usize,
    blocks: BlockAccumulator,
    recent: VecDeque<f64>,
}

impl HarmonicMean {
    /// Harmonic mean over the last `window` blocks of `block_steps` base steps.
    pub fn new(window: usize, block_steps: usize) -> Self {
        let window = window.max(1);
        Self {
            window,
            blocks: BlockAccumulator::new(block_steps),
            recent: VecDeque::with_capacity(window),
        }
    }
}

impl Predictor for HarmonicMean {
    fn name(&self) -> String {
        format!("harmonic-mean({})", self.window)
    }

    fn observe(&mut self, bits_per_second: f64) {
        if let Some(mean) = self.blocks.push(clean_sample(bits_per_second)) {
            if self.recent.len() == self.window {
                self.recent.pop_front();
            }
            self.recent.push_back(mean);
        }
    }

    fn forecast(&self, _horizon_steps: usize) -> Option<f64> {
        if self.recent.is_empty() {
            return self.blocks.partial_mean();
        }
        let floor = self.blocks.one_packet_rate();
        let reciprocal_sum: f64 = self.recent.iter().map(|value| 1.0 / value.max(floor)).sum();
        let harmonic = self.recent.len() as f64 / reciprocal_sum;
        // A window of zero blocks means zero, not one packet per block.
        if self.recent.iter().all(|&value| value == 0.0) {
            Some(0.0)
        } else {
            Some(harmonic)
        }
    }
}

/// The classic predictors on blocks of `block_steps`, in report order.
pub fn classic_predictors(block_steps: usize) -> Vec<Box<dyn Predictor>> {
    vec![
        Box::new(LastValue::new(block_steps)),
        Box::new(Ewma::new(0.7, block_steps)),
        Box::new(Holt::new(block_steps)),
        Box::new(HarmonicMean::new(5, block_steps)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(predictor: &mut dyn Predictor, samples: &[f64]) {
        for &sample in samples {
            predictor.observe(sample);
        }
    }

    fn close(actual: f64, expected: f64) -> bool {
        (actual - expected).abs() <= 1e-9 * expected.abs().max(1.0)
    }

    #[test]
    fn nothing_observed_means_no_forecast() {
        for predictor in classic_predictors(10) {
            assert_eq!(predictor.forecast(10), None, "{}", predictor.name());
        }
    }

    #[test]
    fn last_value_is_the_last_whole_block() {
        let mut predictor = LastValue::new(2);
        feed(&mut predictor, &[1.0]);
        assert_eq!(
            predictor.forecast(2),
            Some(1.0),
            "partial block before the first"
        );
        feed(&mut predictor, &[3.0, 10.0, 20.0, 99.0]);
        // Blocks: (1,3)=2, (10,20)=15; 99 is a partial block and is not used yet.
        assert_eq!(predictor.forecast(2), Some(15.0));
    }

    #[test]
    fn ewma_weights_the_newest_block_by_alpha() {
        let mut predictor = Ewma::new(0.7, 1);
        feed(&mut predictor, &[10.0, 20.0, 0.0]);
        // 10 → 0.7*20 + 0.3*10 = 17 → 0.7*0 + 0.3*17 = 5.1
        assert!(close(predictor.forecast(1).expect("value"), 5.1));
        assert_eq!(predictor.name(), "ewma(0.7)");
    }

    #[test]
    fn holt_follows_a_linear_ramp() {
        let mut predictor = Holt::with_parameters(0.8, 0.5, 1.0, 1);
        let ramp: Vec<f64> = (0..200).map(|step| 100.0 + 5.0 * step as f64).collect();
        feed(&mut predictor, &ramp);
        // Undamped Holt on a perfect ramp converges to level = last, trend = slope; the mean over
        // the next 4 steps is last + slope * 2.5.
        let expected = 100.0 + 5.0 * 199.0 + 5.0 * 2.5;
        let forecast = predictor.forecast(4).expect("value");
        assert!(
            (forecast - expected).abs() < 1e-6,
            "{forecast} vs {expected}"
        );
    }

    #[test]
    fn holt_never_forecasts_negative_rates() {
        let mut predictor = Holt::new(1);
        feed(&mut predictor, &[1000.0, 500.0, 10.0, 0.0]);
        assert!(predictor.forecast(50).expect("value") >= 0.0);
    }

    #[test]
    fn harmonic_mean_of_last_window() {
        let mut predictor = HarmonicMean::new(3, 1);
        feed(&mut predictor, &[1000.0, 1.0e6, 2.0e6, 4.0e6]);
        // Last three: 1, 2, 4 Mbit/s → 3 / (1 + 0.5 + 0.25) Mbit/s.
        let expected = 3.0e6 / 1.75;
        assert!(close(predictor.forecast(1).expect("value"), expected));
    }

    #[test]
    fn harmonic_mean_treats_zero_as_one_packet_and_all_zero_as_zero() {
        let mut predictor = HarmonicMean::new(2, 10);
        let floor = PACKET_BITS; // one packet per 1 s block
        feed(&mut predictor, &[0.0; 10]);
        assert_eq!(predictor.forecast(10), Some(0.0));
        feed(&mut predictor, &[1.0e6; 10]);
        let expected = 2.0 / (1.0 / floor + 1.0 / 1.0e6);
        assert!(close(predictor.forecast(10).expect("value"), expected));
    }

    #[test]
    fn garbage_samples_count_as_zero() {
        let mut predictor = LastValue::new(1);
        feed(&mut predictor, &[f64::NAN]);
        assert_eq!(predictor.forecast(1), Some(0.0));
        feed(&mut predictor, &[-5.0]);
        assert_eq!(predictor.forecast(1), Some(0.0));
        feed(&mut predictor, &[f64::INFINITY]);
        assert_eq!(predictor.forecast(1), Some(0.0));
    }
}
