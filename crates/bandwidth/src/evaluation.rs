//! Walk-forward evaluation of every predictor on trace files, and the report it prints.
//!
//! For a granularity `g` (100 ms, 1 s, 5 s), a forecast is made at every multiple `t` of `g` for the
//! interval `(t, t + g]`, from the samples up to `t` only; once the interval has passed it is scored
//! against the actual mean rate. Accuracy is 1 − WAPE (sum of absolute errors over sum of actual
//! rates) per trace; calibration is the share of intervals whose actual rate fell inside the
//! predicted 80 % band. The learned model is either the shipped one (honest on traces it was not
//! fitted on, which the report marks) or retrained per fold, leaving out each drive in turn (the
//! `.up` and `.down` trace of a drive go to the same side).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::band::{CheckedForecast, DEFAULT_BAND_WINDOW, ForecastTracker, ScoreTotals};
use crate::ensemble::AdaptiveEnsemble;
use crate::learned::{
    CoarseHistoryPredictor, LearnedModel, LearnedPredictor, ModelError, TrainingOptions,
    TrainingSeries, coarsen, train, train_on_boundaries,
};
use crate::predictor::{Predictor, classic_predictors};
use crate::trace::{DeliveryTrace, TraceError, drive_name, steps_in, trace_name};

/// Predictor names of the baselines, which the target must beat on every trace.
const BASELINE_NAMES: [&str; 2] = ["last-value", "ewma(0.7)"];
/// The accuracy target at the 1 s horizon.
const TARGET_ACCURACY: f64 = 0.85;

/// Why an evaluation could not run.
#[derive(Debug, thiserror::Error)]
pub enum EvaluationError {
    #[error("no trace file given; pass one or more trace files")]
    NoTraces,
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error("cannot load the learned model")]
    Model(#[source] ModelError),
    #[error(
        "leave-one-drive-out needs traces of at least two drives, got only {drive:?}; use the shipped model instead"
    )]
    SingleDrive { drive: String },
    #[error("granularity {millis} ms is not a positive multiple of 100 ms")]
    Granularity { millis: u128 },
}

/// Which learned model the evaluation uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LearnedModelChoice {
    /// The model shipped in this build; traces it was fitted on are marked in the report.
    Shipped,
    /// Retrain once per drive on every other drive's traces, and test on that drive.
    LeaveOneDriveOut,
    /// Evaluate only the classic predictors.
    Skip,
}

/// What to evaluate.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluationOptions {
    /// Granularities (forecast horizon = step) to evaluate, each a multiple of 100 ms.
    pub granularities: Vec<Duration>,
    /// Which learned model to use.
    pub learned_model: LearnedModelChoice,
    /// Hyper-parameters when retraining (leave-one-drive-out).
    pub training: TrainingOptions,
    /// Checked forecasts a band is computed from.
    pub band_window: usize,
    /// With leave-one-drive-out: also evaluate a learned model that sees only whole seconds of
    /// history (trained and tested on 1 s block means), at granularities of whole seconds, to
    /// measure what the 100 ms history adds.
    pub compare_coarse_history: bool,
}

impl Default for EvaluationOptions {
    fn default() -> Self {
        Self {
            granularities: vec![
                Duration::from_millis(100),
                Duration::from_secs(1),
                Duration::from_secs(5),
            ],
            learned_model: LearnedModelChoice::Shipped,
            training: TrainingOptions::default(),
            band_window: DEFAULT_BAND_WINDOW,
            compare_coarse_history: false,
        }
    }
}

/// One predictor's score on one trace (or the mean over traces).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PredictorScore {
    /// Predictor name.
    pub predictor: String,
    /// 1 − WAPE.
    pub accuracy: f64,
    /// Share of intervals whose actual rate fell inside the 80 % band.
    pub inside_band_share: f64,
}

/// Every predictor's score on one trace at one granularity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TraceScores {
    /// Trace file name.
    pub trace: String,
    /// Intervals forecast and scored.
    pub intervals: u64,
    /// True when the learned model was fitted on this trace (its score here is not honest).
    pub learned_model_fitted_on_trace: bool,
    /// Trace files the learned model used on this trace was fitted on.
    pub learned_model_trained_on: Vec<String>,
    /// Scores, in the report's predictor order.
    pub scores: Vec<PredictorScore>,
    /// Accuracy of the two-sided reference (not a predictor: it sees the future), see
    /// [`two_sided_reference_accuracy`]; `None` when the trace has fewer than three intervals.
    pub two_sided_reference_accuracy: Option<f64>,
}

/// Results at one granularity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GranularityReport {
    /// Step and horizon, milliseconds.
    pub granularity_millis: u64,
    /// Predictors, in column order.
    pub predictors: Vec<String>,
    /// One row per trace long enough for two intervals.
    pub traces: Vec<TraceScores>,
    /// Mean over the traces the learned model was not fitted on; empty when it was fitted on
    /// every trace.
    pub mean_over_unseen_traces: Vec<PredictorScore>,
    /// Mean over every trace (in-sample for the learned model where it was fitted on a trace).
    pub mean_over_all_traces: Vec<PredictorScore>,
    /// Traces too short for this granularity, left out.
    pub skipped_traces: Vec<String>,
    /// Mean over the unseen traces of the two-sided reference's accuracy.
    pub two_sided_reference_mean: Option<f64>,
}

/// The whole evaluation; `Display` prints it as markdown tables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EvaluationReport {
    /// How the learned model was obtained.
    pub learned_model: LearnedModelChoice,
    /// One section per granularity.
    pub granularities: Vec<GranularityReport>,
}

/// Forecasts every interval of `block_steps` base steps walk-forward: at each multiple `t` of the
/// block, `predictor` (having seen samples `..t` only) forecasts `(t, t + block]`; each forecast is
/// returned checked against what happened. The first block has no forecast (no history).
pub fn walk_forward(
    base_bits_per_second: &[f64],
    block_steps: usize,
    predictor: &mut dyn Predictor,
    band_window: usize,
) -> (Vec<CheckedForecast>, ScoreTotals) {
    let block_steps = block_steps.max(1);
    let mut tracker = ForecastTracker::new(block_steps, band_window);
    let mut checked = Vec::new();
    let total_steps = base_bits_per_second.len();
    for (index, &sample) in base_bits_per_second.iter().enumerate() {
        checked.extend(tracker.observe(sample));
        predictor.observe(sample);
        let steps_seen = index + 1;
        if steps_seen % block_steps == 0
            && steps_seen + block_steps <= total_steps
            && let Some(expected) = predictor.forecast(block_steps)
        {
            tracker.record(expected);
        }
    }
    (checked, tracker.totals())
}

/// A reference for how predictable a series is, not a predictor: each interval "forecast" as the
/// mean of the interval before it and the interval after it. It knows the local rate on both sides
/// of the interval, which no causal forecaster does, so a forecaster scoring well below it is not
/// evidence of a weak model; a target above it is out of reach of any forecaster that sees only
/// the past, short of one that knows something the neighbouring intervals do not show. Scored
/// like [`walk_forward`] (1 − WAPE) over every interval that has a neighbour on both sides.
pub fn two_sided_reference_accuracy(
    base_bits_per_second: &[f64],
    block_steps: usize,
) -> Option<f64> {
    let block_steps = block_steps.max(1);
    let blocks: Vec<f64> = base_bits_per_second
        .chunks_exact(block_steps)
        .map(|block| block.iter().sum::<f64>() / block_steps as f64)
        .collect();
    if blocks.len() < 3 {
        return None;
    }
    let (mut absolute_error, mut actual) = (0.0, 0.0);
    for window in blocks.windows(3) {
        let reference = (window[0] + window[2]) / 2.0;
        absolute_error += (reference - window[1]).abs();
        actual += window[1];
    }
    (actual > 0.0).then(|| 1.0 - absolute_error / actual)
}

/// Block (in 100 ms steps) of the coarse-history comparison: one second.
const COARSE_BLOCK_STEPS: usize = 10;

fn evaluation_predictors(
    block_steps: usize,
    learned_model: Option<&Arc<LearnedModel>>,
    coarse_model: Option<&Arc<LearnedModel>>,
) -> Vec<Box<dyn Predictor>> {
    let mut predictors = classic_predictors(block_steps);
    if let Some(model) = coarse_model
        && block_steps.is_multiple_of(COARSE_BLOCK_STEPS)
    {
        predictors.push(Box::new(CoarseHistoryPredictor::new(
            Arc::clone(model),
            COARSE_BLOCK_STEPS,
        )));
    }
    let mut members: Vec<Box<dyn Predictor>> = Vec::new();
    if let Some(model) = learned_model {
        predictors.push(Box::new(LearnedPredictor::new(Arc::clone(model))));
        members.push(Box::new(LearnedPredictor::new(Arc::clone(model))));
    }
    members.extend(classic_predictors(block_steps));
    predictors.push(Box::new(AdaptiveEnsemble::new(
        members,
        block_steps,
        block_steps,
    )));
    predictors
}

struct LoadedTrace {
    name: String,
    drive: String,
    base: Vec<f64>,
}

/// Evaluates every predictor on `paths` walk-forward, per granularity.
pub fn evaluate(
    paths: &[PathBuf],
    options: &EvaluationOptions,
) -> Result<EvaluationReport, EvaluationError> {
    if paths.is_empty() {
        return Err(EvaluationError::NoTraces);
    }
    let mut block_sizes = Vec::with_capacity(options.granularities.len());
    for granularity in &options.granularities {
        block_sizes.push(
            steps_in(*granularity).map_err(|_| EvaluationError::Granularity {
                millis: granularity.as_millis(),
            })?,
        );
    }
    let mut traces = Vec::with_capacity(paths.len());
    for path in paths {
        let trace = DeliveryTrace::load(path)?;
        traces.push(LoadedTrace {
            name: trace_name(path),
            drive: drive_name(path),
            base: trace.base_series()?.bits_per_second,
        });
    }

    // The learned model to use for each trace, and whether it was fitted on that trace.
    let mut models: Vec<Option<(Arc<LearnedModel>, bool)>> = vec![None; traces.len()];
    let mut coarse_models: Vec<Option<Arc<LearnedModel>>> = vec![None; traces.len()];
    match options.learned_model {
        LearnedModelChoice::Skip => {}
        LearnedModelChoice::Shipped => {
            let model = LearnedModel::shipped().map_err(EvaluationError::Model)?;
            for (slot, trace) in models.iter_mut().zip(&traces) {
                let fitted = model.trained_on.contains(&trace.name);
                *slot = Some((Arc::clone(&model), fitted));
            }
        }
        LearnedModelChoice::LeaveOneDriveOut => {
            let drives: BTreeMap<&str, ()> = traces
                .iter()
                .map(|trace| (trace.drive.as_str(), ()))
                .collect();
            if drives.len() < 2 {
                return Err(EvaluationError::SingleDrive {
                    drive: traces[0].drive.clone(),
                });
            }
            for held_out in drives.keys() {
                let training: Vec<TrainingSeries> = traces
                    .iter()
                    .filter(|trace| trace.drive != *held_out)
                    .map(|trace| TrainingSeries {
                        name: trace.name.clone(),
                        base_bits_per_second: trace.base.clone(),
                    })
                    .collect();
                let model = Arc::new(train(&training, &block_sizes, options.training));
                let coarse_model = options.compare_coarse_history.then(|| {
                    let coarse_training: Vec<TrainingSeries> = training
                        .iter()
                        .map(|series| TrainingSeries {
                            name: series.name.clone(),
                            base_bits_per_second: coarsen(
                                &series.base_bits_per_second,
                                COARSE_BLOCK_STEPS,
                            ),
                        })
                        .collect();
                    let coarse_horizons: Vec<usize> = block_sizes
                        .iter()
                        .copied()
                        .filter(|steps| steps.is_multiple_of(COARSE_BLOCK_STEPS))
                        .collect();
                    Arc::new(train_on_boundaries(
                        &coarse_training,
                        &coarse_horizons,
                        options.training,
                        COARSE_BLOCK_STEPS,
                    ))
                });
                for (index, trace) in traces.iter().enumerate() {
                    if trace.drive == *held_out {
                        models[index] = Some((Arc::clone(&model), false));
                        coarse_models[index] = coarse_model.clone();
                    }
                }
            }
        }
    }

    let mut sections = Vec::with_capacity(block_sizes.len());
    for &block_steps in &block_sizes {
        let mut section = GranularityReport {
            granularity_millis: block_steps as u64 * crate::trace::BASE_STEP_MILLIS,
            predictors: evaluation_predictors(
                block_steps,
                models[0].as_ref().map(|(m, _)| m),
                coarse_models[0].as_ref(),
            )
            .iter()
            .map(|predictor| predictor.name())
            .collect(),
            traces: Vec::new(),
            mean_over_unseen_traces: Vec::new(),
            mean_over_all_traces: Vec::new(),
            skipped_traces: Vec::new(),
            two_sided_reference_mean: None,
        };
        for ((trace, model), coarse_model) in traces.iter().zip(&models).zip(&coarse_models) {
            if trace.base.len() < 2 * block_steps {
                section.skipped_traces.push(trace.name.clone());
                continue;
            }
            let mut intervals = 0;
            let scores = evaluation_predictors(
                block_steps,
                model.as_ref().map(|(m, _)| m),
                coarse_model.as_ref(),
            )
            .into_iter()
            .map(|mut predictor| {
                let (_, totals) = walk_forward(
                    &trace.base,
                    block_steps,
                    predictor.as_mut(),
                    options.band_window,
                );
                intervals = totals.checked;
                PredictorScore {
                    predictor: predictor.name(),
                    accuracy: totals.accuracy().unwrap_or(0.0),
                    inside_band_share: totals.inside_band_share().unwrap_or(0.0),
                }
            })
            .collect();
            section.traces.push(TraceScores {
                trace: trace.name.clone(),
                intervals,
                learned_model_fitted_on_trace: model.as_ref().is_some_and(|(_, fitted)| *fitted),
                learned_model_trained_on: model
                    .as_ref()
                    .map(|(model, _)| model.trained_on.clone())
                    .unwrap_or_default(),
                scores,
                two_sided_reference_accuracy: two_sided_reference_accuracy(
                    &trace.base,
                    block_steps,
                ),
            });
        }
        let references: Vec<f64> = section
            .traces
            .iter()
            .filter(|trace| !trace.learned_model_fitted_on_trace)
            .filter_map(|trace| trace.two_sided_reference_accuracy)
            .collect();
        section.two_sided_reference_mean = (!references.is_empty())
            .then(|| references.iter().sum::<f64>() / references.len() as f64);
        section.mean_over_unseen_traces = mean_scores(&section, true);
        section.mean_over_all_traces = mean_scores(&section, false);
        sections.push(section);
    }
    Ok(EvaluationReport {
        learned_model: options.learned_model,
        granularities: sections,
    })
}

fn mean_scores(section: &GranularityReport, unseen_only: bool) -> Vec<PredictorScore> {
    let unseen: Vec<&TraceScores> = section
        .traces
        .iter()
        .filter(|trace| !(unseen_only && trace.learned_model_fitted_on_trace))
        .collect();
    if unseen.is_empty() {
        return Vec::new();
    }
    section
        .predictors
        .iter()
        .enumerate()
        .map(|(column, predictor)| {
            let count = unseen.len() as f64;
            PredictorScore {
                predictor: predictor.clone(),
                accuracy: unseen
                    .iter()
                    .map(|t| t.scores[column].accuracy)
                    .sum::<f64>()
                    / count,
                inside_band_share: unseen
                    .iter()
                    .map(|t| t.scores[column].inside_band_share)
                    .sum::<f64>()
                    / count,
            }
        })
        .collect()
}

impl GranularityReport {
    /// Whether `predictor` beats every baseline on every unseen trace, and its mean accuracy.
    pub fn target_check(&self, predictor: &str) -> Option<TargetCheck> {
        let column = self.predictors.iter().position(|name| name == predictor)?;
        let baseline_columns: Vec<usize> = BASELINE_NAMES
            .iter()
            .filter_map(|baseline| self.predictors.iter().position(|name| name == baseline))
            .collect();
        let unseen: Vec<&TraceScores> = self
            .traces
            .iter()
            .filter(|trace| !trace.learned_model_fitted_on_trace)
            .collect();
        let traces_beating_baselines = unseen
            .iter()
            .filter(|trace| {
                baseline_columns.iter().all(|&baseline| {
                    trace.scores[column].accuracy > trace.scores[baseline].accuracy
                })
            })
            .count();
        Some(TargetCheck {
            predictor: predictor.to_string(),
            mean_accuracy: self
                .mean_over_unseen_traces
                .get(column)
                .map_or(0.0, |score| score.accuracy),
            unseen_traces: unseen.len(),
            traces_beating_baselines,
        })
    }
}

/// The target, checked for one predictor at one granularity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TargetCheck {
    /// Predictor checked.
    pub predictor: String,
    /// Mean 1 − WAPE over unseen traces.
    pub mean_accuracy: f64,
    /// Traces the learned model was not fitted on.
    pub unseen_traces: usize,
    /// Unseen traces on which the predictor beat both last-value and EWMA(0.7).
    pub traces_beating_baselines: usize,
}

impl TargetCheck {
    /// True when the mean reaches 0.85 and every unseen trace beats both baselines.
    pub fn met(&self) -> bool {
        self.mean_accuracy >= TARGET_ACCURACY
            && self.unseen_traces > 0
            && self.traces_beating_baselines == self.unseen_traces
    }
}

fn reference_cell(accuracy: Option<f64>) -> String {
    accuracy.map_or_else(|| "–".to_string(), |accuracy| format!("{accuracy:.3}"))
}

fn describe_granularity(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        format!("{} s", millis / 1000)
    } else {
        format!("{millis} ms")
    }
}

impl fmt::Display for EvaluationReport {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let model = match self.learned_model {
            LearnedModelChoice::Shipped => "shipped model (traces it was fitted on are marked *)",
            LearnedModelChoice::LeaveOneDriveOut => {
                "retrained per fold, leaving out the tested drive (.up and .down together)"
            }
            LearnedModelChoice::Skip => "not evaluated",
        };
        writeln!(formatter, "learned model: {model}")?;
        writeln!(
            formatter,
            "cells: accuracy (1 − WAPE) / share of intervals inside the 80 % band; forecast at t for (t, t + step] from data up to t only"
        )?;
        for section in &self.granularities {
            let step = describe_granularity(section.granularity_millis);
            writeln!(formatter)?;
            writeln!(formatter, "### horizon {step} (series at {step})")?;
            writeln!(formatter)?;
            write!(formatter, "| trace | intervals |")?;
            for predictor in &section.predictors {
                write!(formatter, " {predictor} |")?;
            }
            writeln!(formatter, " two-sided reference † |")?;
            write!(formatter, "|---|---:|")?;
            for _ in &section.predictors {
                write!(formatter, "---:|")?;
            }
            writeln!(formatter, "---:|")?;
            for trace in &section.traces {
                let marker = if trace.learned_model_fitted_on_trace {
                    " *"
                } else {
                    ""
                };
                write!(
                    formatter,
                    "| {}{marker} | {} |",
                    trace.trace, trace.intervals
                )?;
                for score in &trace.scores {
                    write!(
                        formatter,
                        " {:.3} / {:.0} % |",
                        score.accuracy,
                        score.inside_band_share * 100.0
                    )?;
                }
                writeln!(
                    formatter,
                    " {} |",
                    reference_cell(trace.two_sided_reference_accuracy)
                )?;
            }
            let fitted_on_some = section
                .traces
                .iter()
                .any(|trace| trace.learned_model_fitted_on_trace);
            let mean_rows = [
                ("mean (unseen)", &section.mean_over_unseen_traces),
                ("mean (all, * in-sample)", &section.mean_over_all_traces),
            ];
            for (label, scores) in mean_rows {
                if scores.is_empty() || (label.starts_with("mean (all") && !fitted_on_some) {
                    continue;
                }
                write!(formatter, "| **{label}** | |")?;
                for score in scores {
                    write!(
                        formatter,
                        " **{:.3}** / {:.0} % |",
                        score.accuracy,
                        score.inside_band_share * 100.0
                    )?;
                }
                let reference = if label.starts_with("mean (unseen") {
                    reference_cell(section.two_sided_reference_mean)
                } else {
                    String::new()
                };
                writeln!(formatter, " {reference} |")?;
            }
            writeln!(
                formatter,
                "\n† not a predictor: the mean of the intervals before and after, so it sees the future; how well the local rate explains an interval"
            )?;
            if !section.skipped_traces.is_empty() {
                writeln!(
                    formatter,
                    "\ntoo short for this step, left out: {}",
                    section.skipped_traces.join(", ")
                )?;
            }
            if section.granularity_millis == 1000 {
                for candidate in ["learned-gbt", "ensemble"] {
                    if let Some(check) = section.target_check(candidate) {
                        if check.unseen_traces == 0 {
                            writeln!(
                                formatter,
                                "\ntarget (1 s): not checked for {}, the learned model was fitted on every trace given; give other traces or use leave-one-drive-out",
                                check.predictor
                            )?;
                            continue;
                        }
                        writeln!(
                            formatter,
                            "\ntarget (1 s, unseen traces): {} mean {:.3} (target ≥ {TARGET_ACCURACY}), beats last-value and ewma(0.7) on {} of {} traces: {}",
                            check.predictor,
                            check.mean_accuracy,
                            check.traces_beating_baselines,
                            check.unseen_traces,
                            if check.met() { "met" } else { "not met" }
                        )?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predictor::{Ewma, Holt, LastValue};

    fn synthetic_series(length: usize, seed: u64) -> Vec<f64> {
        let mut state = seed;
        (0..length)
            .map(|step| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let noise = (state >> 33) as f64 / (1_u64 << 31) as f64;
                let level = if (step / 150) % 2 == 0 { 4.0e6 } else { 1.0e6 };
                level * (0.5 + noise)
            })
            .collect()
    }

    #[test]
    fn two_sided_reference_scores_each_inner_interval_against_its_neighbours() {
        // Blocks of two steps with means 10, 20, 40, 40: inner blocks 20 (neighbours 10 and 40 →
        // 25, error 5) and 40 (neighbours 20 and 40 → 30, error 10); a partial tail is ignored.
        let base = [10.0, 10.0, 10.0, 30.0, 40.0, 40.0, 40.0, 40.0, 99.0];
        let accuracy = two_sided_reference_accuracy(&base, 2).unwrap();
        assert!((accuracy - (1.0 - 15.0 / 60.0)).abs() < 1e-12, "{accuracy}");
        assert_eq!(two_sided_reference_accuracy(&base[..4], 2), None);
        assert_eq!(two_sided_reference_accuracy(&[0.0; 6], 2), None);
    }

    #[test]
    fn walk_forward_never_looks_ahead() {
        let original = synthetic_series(3000, 11);
        let cut = 1700;
        let mut perturbed = original.clone();
        for sample in &mut perturbed[cut..] {
            *sample = *sample * 7.0 + 3.0e6;
        }
        let model = LearnedModel::shipped().expect("shipped model");
        for block_steps in [1, 10, 50] {
            let original_run = evaluation_predictors(block_steps, Some(&model), Some(&model));
            let perturbed_run = evaluation_predictors(block_steps, Some(&model), Some(&model));
            for (mut a, mut b) in original_run.into_iter().zip(perturbed_run) {
                let (checked_a, _) = walk_forward(&original, block_steps, a.as_mut(), 150);
                let (checked_b, _) = walk_forward(&perturbed, block_steps, b.as_mut(), 150);
                let made_before_cut = |checked: &[CheckedForecast]| -> Vec<_> {
                    checked
                        .iter()
                        .filter(|c| c.made_at_step as usize <= cut)
                        .map(|c| (c.made_at_step, c.forecast))
                        .collect()
                };
                let before_a = made_before_cut(&checked_a);
                assert!(!before_a.is_empty());
                assert_eq!(
                    before_a,
                    made_before_cut(&checked_b),
                    "{} looked ahead",
                    a.name()
                );
                // And the perturbation is visible afterwards, so the test can see a difference.
                assert_ne!(checked_a.last(), checked_b.last(), "{}", a.name());
            }
        }
    }

    #[test]
    fn walk_forward_scores_each_interval_once_against_its_mean() {
        // 10 steps per block; blocks alternate 1 and 3 Mbit/s. Last value is always wrong by 2.
        let series: Vec<f64> = (0..100)
            .map(|step| if (step / 10) % 2 == 0 { 1.0e6 } else { 3.0e6 })
            .collect();
        let (checked, totals) = walk_forward(&series, 10, &mut LastValue::new(10), 150);
        assert_eq!(checked.len(), 9, "blocks 2..=10 are forecast");
        assert_eq!(totals.checked, 9);
        assert!(
            checked
                .iter()
                .all(|c| (c.actual - c.forecast.expected).abs() == 2.0e6)
        );
        let actual_sum: f64 = checked.iter().map(|c| c.actual).sum();
        let expected_accuracy = 1.0 - 9.0 * 2.0e6 / actual_sum;
        assert!((totals.accuracy().expect("accuracy") - expected_accuracy).abs() < 1e-12);
        // Holt and EWMA score the same intervals.
        assert_eq!(
            walk_forward(&series, 10, &mut Ewma::new(0.7, 10), 150)
                .1
                .checked,
            9
        );
        assert_eq!(
            walk_forward(&series, 10, &mut Holt::new(10), 150).1.checked,
            9
        );
    }

    fn shared_traces() -> Vec<PathBuf> {
        let directory = crate::trace::trace_directory();
        crate::trace::list_trace_files(&directory).expect("shared traces are readable")
    }

    #[test]
    fn shipped_model_report_marks_fitted_traces_and_prints_markdown() {
        let paths: Vec<PathBuf> = shared_traces()
            .into_iter()
            .filter(|path| trace_name(path).starts_with("TMobile-LTE-short"))
            .collect();
        assert_eq!(paths.len(), 1);
        let options = EvaluationOptions {
            granularities: vec![Duration::from_secs(1), Duration::from_secs(5)],
            ..EvaluationOptions::default()
        };
        let report = evaluate(&paths, &options).expect("evaluation runs");
        assert_eq!(report.granularities.len(), 2);
        let one_second = &report.granularities[0];
        assert_eq!(one_second.traces.len(), 1);
        assert!(one_second.traces[0].learned_model_fitted_on_trace);
        assert_eq!(one_second.traces[0].intervals, 138);
        assert!(one_second.predictors.contains(&"learned-gbt".to_string()));
        let last_value = &one_second.traces[0].scores[0];
        assert_eq!(last_value.predictor, "last-value");
        // The issue quotes 0.65–0.86 for last value at 1 s on these traces.
        assert!(
            (0.6..0.9).contains(&last_value.accuracy),
            "{}",
            last_value.accuracy
        );
        let table = report.to_string();
        assert!(
            table.contains("| TMobile-LTE-short.down * | 138 |"),
            "{table}"
        );
        assert!(table.contains("### horizon 5 s"), "{table}");
        // Its only trace was fitted on: no honest mean exists, the in-sample one is labelled.
        assert!(one_second.mean_over_unseen_traces.is_empty());
        assert!(!table.contains("mean (unseen)"), "{table}");
        assert!(table.contains("mean (all, * in-sample)"), "{table}");
        assert_eq!(
            one_second
                .target_check("ensemble")
                .expect("check")
                .unseen_traces,
            0
        );
    }

    #[test]
    fn leave_one_drive_out_never_tests_on_a_training_drive() {
        let paths: Vec<PathBuf> = shared_traces()
            .into_iter()
            .filter(|path| {
                let name = trace_name(path);
                name == "TMobile-LTE-short.down" || name.starts_with("ATT-LTE-driving")
            })
            .collect();
        assert_eq!(paths.len(), 3);
        // A tiny model keeps this fast in debug builds; the bench runs the real one.
        let options = EvaluationOptions {
            granularities: vec![Duration::from_secs(1)],
            learned_model: LearnedModelChoice::LeaveOneDriveOut,
            training: TrainingOptions {
                trees: 5,
                bins: 16,
                ..TrainingOptions::default()
            },
            compare_coarse_history: true,
            ..EvaluationOptions::default()
        };
        let report = evaluate(&paths, &options).expect("evaluation runs");
        let section = &report.granularities[0];
        assert!(
            section
                .predictors
                .contains(&"learned-gbt(1000 ms history)".to_string())
        );
        assert_eq!(section.traces.len(), 3);
        for trace in &section.traces {
            assert!(!trace.learned_model_fitted_on_trace);
            assert!(
                !trace.learned_model_trained_on.is_empty(),
                "{}",
                trace.trace
            );
            let tested_drive = drive_name(std::path::Path::new(&trace.trace));
            for trained in &trace.learned_model_trained_on {
                assert_ne!(
                    drive_name(std::path::Path::new(trained)),
                    tested_drive,
                    "{} was tested with a model trained on {trained}",
                    trace.trace
                );
            }
        }
        assert!(section.target_check("ensemble").is_some());
    }

    #[test]
    fn errors_are_clear() {
        assert!(matches!(
            evaluate(&[], &EvaluationOptions::default()),
            Err(EvaluationError::NoTraces)
        ));
        let missing = evaluate(
            &[PathBuf::from("/nonexistent/trace.up")],
            &EvaluationOptions::default(),
        )
        .expect_err("missing file");
        assert!(missing.to_string().contains("/nonexistent/trace.up"));
        let one_drive: Vec<PathBuf> = shared_traces()
            .into_iter()
            .filter(|path| drive_name(path) == "ATT-LTE-driving")
            .collect();
        let options = EvaluationOptions {
            learned_model: LearnedModelChoice::LeaveOneDriveOut,
            ..EvaluationOptions::default()
        };
        assert!(matches!(
            evaluate(&one_drive, &options),
            Err(EvaluationError::SingleDrive { .. })
        ));
    }
}
