//! The adaptive ensemble: several predictors run side by side on one link, weighted by their recent
//! accuracy on that link.
//!
//! Every member forecasts the configured horizon at each decision boundary; once the interval has
//! been observed, each member's absolute error joins an exponentially decayed sum. The forecast is
//! the members' forecasts averaged with weights `(decayed error / decayed actual)^-16`: a sharp
//! weighting that in practice follows the best recent member (1 − WAPE) closely but does not flip
//! hard between near-equal ones. Only checked forecasts count, so the weights never use the future.
//! Until the first check, the first member answers alone.

use std::collections::VecDeque;

use crate::predictor::Predictor;

/// Weight kept by past errors at each new checked forecast (a half-life of about 35 forecasts).
const ERROR_DECAY: f64 = 0.98;
/// Exponent of the inverse relative error in the member weights. Chosen among 4, 16 and "best
/// member only" on the leave-one-drive-out evaluation (all three within 0.005 of each other).
const WEIGHT_SHARPNESS: f64 = 16.0;
/// Relative errors below this are treated as equal, so a perfect member has a finite weight.
const SMALLEST_RELATIVE_ERROR: f64 = 1e-6;

/// Picks, per link, the member predictor with the best recent accuracy.
pub struct AdaptiveEnsemble {
    members: Vec<Box<dyn Predictor>>,
    horizon_steps: usize,
    boundary_steps: usize,
    steps_seen: u64,
    recent_samples: VecDeque<f64>,
    pending: VecDeque<(u64, Vec<Option<f64>>)>,
    decayed_error: Vec<f64>,
    decayed_actual: f64,
    checked: u64,
}

impl AdaptiveEnsemble {
    /// An ensemble of `members` (the first is used until forecasts have been checked), judged on
    /// forecasts over `horizon_steps` made every `boundary_steps` base steps.
    pub fn new(
        members: Vec<Box<dyn Predictor>>,
        horizon_steps: usize,
        boundary_steps: usize,
    ) -> Self {
        let member_count = members.len();
        let horizon_steps = horizon_steps.max(1);
        Self {
            members,
            horizon_steps,
            boundary_steps: boundary_steps.max(1),
            steps_seen: 0,
            recent_samples: VecDeque::with_capacity(horizon_steps),
            pending: VecDeque::new(),
            decayed_error: vec![0.0; member_count],
            decayed_actual: 0.0,
            checked: 0,
        }
    }

    /// Index of the member currently selected.
    fn selected_index(&self) -> usize {
        if self.checked == 0 {
            return 0;
        }
        let mut best = 0;
        for (index, error) in self.decayed_error.iter().enumerate() {
            if *error < self.decayed_error[best] {
                best = index;
            }
        }
        best
    }

    /// Name of the member with the largest weight (the best recent accuracy).
    pub fn selected_member_name(&self) -> String {
        self.members
            .get(self.selected_index())
            .map_or_else(|| "none".to_string(), |member| member.name())
    }

    /// Each member's name and recent accuracy (1 − decayed WAPE), `None` before any check.
    pub fn member_accuracies(&self) -> Vec<(String, Option<f64>)> {
        self.members
            .iter()
            .zip(&self.decayed_error)
            .map(|(member, error)| {
                let accuracy =
                    (self.decayed_actual > 0.0).then(|| 1.0 - error / self.decayed_actual);
                (member.name(), accuracy)
            })
            .collect()
    }
}

impl Predictor for AdaptiveEnsemble {
    fn name(&self) -> String {
        "ensemble".to_string()
    }

    fn observe(&mut self, bits_per_second: f64) {
        for member in &mut self.members {
            member.observe(bits_per_second);
        }
        if self.recent_samples.len() == self.horizon_steps {
            self.recent_samples.pop_front();
        }
        self.recent_samples.push_back(bits_per_second);
        self.steps_seen += 1;
        while self
            .pending
            .front()
            .is_some_and(|(due_step, _)| *due_step <= self.steps_seen)
        {
            let Some((_, forecasts)) = self.pending.pop_front() else {
                break;
            };
            let actual = self.recent_samples.iter().sum::<f64>() / self.horizon_steps as f64;
            self.decayed_actual = self.decayed_actual * ERROR_DECAY + actual;
            for (error, forecast) in self.decayed_error.iter_mut().zip(forecasts) {
                // A member without a forecast is charged as if it had said zero.
                *error = *error * ERROR_DECAY + (actual - forecast.unwrap_or(0.0)).abs();
            }
            self.checked += 1;
        }
        if self.steps_seen.is_multiple_of(self.boundary_steps as u64) {
            let forecasts = self
                .members
                .iter()
                .map(|member| member.forecast(self.horizon_steps))
                .collect();
            self.pending
                .push_back((self.steps_seen + self.horizon_steps as u64, forecasts));
        }
    }

    fn forecast(&self, horizon_steps: usize) -> Option<f64> {
        if self.checked > 0 && self.decayed_actual > 0.0 {
            let best_relative_error = self
                .decayed_error
                .iter()
                .fold(f64::INFINITY, |best, error| best.min(*error))
                / self.decayed_actual;
            let (mut weighted_sum, mut weight_sum) = (0.0, 0.0);
            for (member, error) in self.members.iter().zip(&self.decayed_error) {
                if let Some(value) = member.forecast(horizon_steps) {
                    // Relative to the best member, so the powers stay within floating range.
                    let relative_error = (error / self.decayed_actual).max(SMALLEST_RELATIVE_ERROR);
                    let weight = (relative_error
                        / best_relative_error.max(SMALLEST_RELATIVE_ERROR))
                    .powf(-WEIGHT_SHARPNESS);
                    weighted_sum += weight * value;
                    weight_sum += weight;
                }
            }
            if weight_sum > 0.0 && weighted_sum.is_finite() {
                return Some(weighted_sum / weight_sum);
            }
        }
        let selected = self.selected_index();
        self.members
            .get(selected)
            .and_then(|member| member.forecast(horizon_steps))
            .or_else(|| {
                self.members
                    .iter()
                    .find_map(|member| member.forecast(horizon_steps))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predictor::{Ewma, LastValue};

    /// Always forecasts a fixed rate.
    struct Constant(f64);

    impl Predictor for Constant {
        fn name(&self) -> String {
            format!("constant({})", self.0)
        }
        fn observe(&mut self, _bits_per_second: f64) {}
        fn forecast(&self, _horizon_steps: usize) -> Option<f64> {
            Some(self.0)
        }
    }

    #[test]
    fn selects_the_member_that_was_right_recently() {
        let mut ensemble = AdaptiveEnsemble::new(
            vec![Box::new(Constant(1.0e6)), Box::new(Constant(5.0e6))],
            10,
            10,
        );
        assert_eq!(ensemble.selected_member_name(), "constant(1000000)");
        for _ in 0..200 {
            ensemble.observe(5.0e6);
        }
        assert_eq!(ensemble.selected_member_name(), "constant(5000000)");
        assert_eq!(ensemble.forecast(10), Some(5.0e6));
        // The link changes: the other member becomes right and takes over.
        for _ in 0..2000 {
            ensemble.observe(1.0e6);
        }
        assert_eq!(ensemble.selected_member_name(), "constant(1000000)");
        let accuracies = ensemble.member_accuracies();
        assert!(accuracies[0].1.expect("checked") > accuracies[1].1.expect("checked"));
    }

    #[test]
    fn forecast_follows_the_accurate_member() {
        let mut ensemble = AdaptiveEnsemble::new(
            vec![Box::new(Constant(2.0e6)), Box::new(LastValue::new(10))],
            10,
            10,
        );
        assert_eq!(
            ensemble.forecast(10),
            Some(2.0e6),
            "first member before any check"
        );
        // A link at 5 Mbit/s: last value is exact, the constant is 60 % off.
        for _ in 0..100 {
            ensemble.observe(5.0e6);
        }
        assert_eq!(ensemble.selected_member_name(), "last-value");
        let forecast = ensemble.forecast(10).expect("forecast");
        assert!((forecast - 5.0e6).abs() < 1.0, "{forecast}");
        // Two members of similar accuracy share the weight: the blend lies between them.
        let mut blend = AdaptiveEnsemble::new(
            vec![Box::new(LastValue::new(10)), Box::new(Ewma::new(0.7, 10))],
            10,
            10,
        );
        for step in 0..400 {
            blend.observe(if (step / 10) % 3 == 0 { 3.0e6 } else { 2.0e6 });
        }
        let forecast = blend.forecast(10).expect("forecast");
        assert!((2.0e6..=3.0e6).contains(&forecast), "{forecast}");
    }
}
