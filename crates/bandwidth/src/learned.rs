//! The learned predictor: gradient-boosted regression trees over features of the recent history.
//!
//! Features are computed from the last 60 s of 100 ms samples at several scales (recent means,
//! variability, share of empty steps, harmonic mean, trend, absolute level), each rate divided by a
//! reference rate (the mean over the last horizon, at most 5 s), so one model serves links of any
//! speed. The model predicts the ratio of the next interval's mean rate to that reference. It is
//! trained with least-absolute-deviation boosting (LAD TreeBoost), each trace file weighted equally,
//! which is exactly the objective the evaluation scores (1 − WAPE per file).
//!
//! Training runs offline (`cargo run --release -p novacron-bandwidth --example train_model`) and
//! writes a versioned JSON model into `crates/bandwidth/models/`, which the crate embeds. This module
//! does no IO: training takes series, loading takes text.

use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

use crate::predictor::{Predictor, clean_sample};
use crate::trace::{BASE_STEP, PACKET_BITS};

/// Version of the model file format this build reads and writes.
pub const LEARNED_MODEL_FORMAT_VERSION: u32 = 1;
/// How many 100 ms samples of history the features look at (60 s).
pub const HISTORY_STEPS: usize = 600;
/// The reference rate is the mean over the last `min(horizon, this)` steps.
const REFERENCE_MAX_STEPS: usize = 50;
/// Ratio features are clipped to this, so a burst after an outage stays a finite number.
const RATIO_CLIP: f64 = 50.0;
/// Window lengths (in 100 ms steps) of the mean-rate features.
const MEAN_WINDOWS: [usize; 9] = [1, 3, 5, 10, 20, 50, 100, 300, 600];

/// Names of the features, in the order the trees index them.
pub const FEATURE_NAMES: [&str; 19] = [
    "mean_100ms_ratio",
    "mean_300ms_ratio",
    "mean_500ms_ratio",
    "mean_1s_ratio",
    "mean_2s_ratio",
    "mean_5s_ratio",
    "mean_10s_ratio",
    "mean_30s_ratio",
    "mean_60s_ratio",
    "variation_1s",
    "variation_5s",
    "empty_share_1s",
    "empty_share_5s",
    "harmonic_mean_5x1s_ratio",
    "min_5x1s_ratio",
    "max_5x1s_ratio",
    "trend_1s_ratio",
    "log10_reference_bits_per_second",
    "history_seconds",
];
/// Number of features.
pub const FEATURE_COUNT: usize = FEATURE_NAMES.len();

/// The model embedded in this build.
const SHIPPED_MODEL_JSON: &str = include_str!("../models/bandwidth-gbt-v1.json");

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("learned bandwidth model is not valid json")]
    Json(#[source] serde_json::Error),
    #[error(
        "learned bandwidth model has format version {found}, this build reads version {supported}; retrain it with the train_model example"
    )]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error(
        "learned bandwidth model expects features {found:?}, this build computes {expected:?}; retrain it with the train_model example"
    )]
    FeatureMismatch {
        found: Vec<String>,
        expected: Vec<String>,
    },
    #[error(
        "learned bandwidth model tree {tree} of horizon {horizon_steps} steps is malformed: {reason}"
    )]
    MalformedTree {
        horizon_steps: usize,
        tree: usize,
        reason: String,
    },
    #[error("learned bandwidth model has no horizon")]
    NoHorizon,
}

/// Hyper-parameters of the boosting. Fixed a priori, never tuned on a test file.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainingOptions {
    /// Number of trees per horizon.
    pub trees: usize,
    /// Shrinkage applied to each tree's leaves.
    pub learning_rate: f64,
    /// Maximum depth of a tree (a depth-3 tree has up to 8 leaves).
    pub max_depth: usize,
    /// Fewest training samples a leaf may hold.
    pub min_leaf_samples: usize,
    /// Candidate split points per feature (quantiles of the training data).
    pub bins: usize,
}

impl Default for TrainingOptions {
    fn default() -> Self {
        Self {
            trees: 200,
            learning_rate: 0.05,
            max_depth: 3,
            min_leaf_samples: 100,
            bins: 64,
        }
    }
}

/// One regression tree, stored as parallel arrays; node 0 is the root. A node with feature -1 is a
/// leaf whose value (already shrunk by the learning rate) is added to the prediction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tree {
    feature: Vec<i16>,
    threshold: Vec<f32>,
    left: Vec<u16>,
    right: Vec<u16>,
    value: Vec<f32>,
}

impl Tree {
    fn evaluate(&self, features: &[f32; FEATURE_COUNT]) -> f64 {
        let mut node = 0_usize;
        // Validated at load: indices are in range and strictly increase, so this terminates.
        loop {
            let feature = self.feature[node];
            if feature < 0 {
                return f64::from(self.value[node]);
            }
            node = if features[feature as usize] <= self.threshold[node] {
                usize::from(self.left[node])
            } else {
                usize::from(self.right[node])
            };
        }
    }

    fn validate(&self) -> Result<(), String> {
        let nodes = self.feature.len();
        if nodes == 0 {
            return Err("no node".to_string());
        }
        if [
            self.threshold.len(),
            self.left.len(),
            self.right.len(),
            self.value.len(),
        ]
        .iter()
        .any(|&length| length != nodes)
        {
            return Err("arrays of different lengths".to_string());
        }
        for node in 0..nodes {
            let feature = self.feature[node];
            if feature >= 0 {
                if feature as usize >= FEATURE_COUNT {
                    return Err(format!("node {node} uses unknown feature {feature}"));
                }
                for child in [self.left[node], self.right[node]] {
                    let child = usize::from(child);
                    if child <= node || child >= nodes {
                        return Err(format!("node {node} has child {child} out of order"));
                    }
                }
            } else if !self.value[node].is_finite() {
                return Err(format!("leaf {node} has a non-finite value"));
            }
        }
        Ok(())
    }
}

/// The trees for one forecast horizon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HorizonModel {
    /// Forecast horizon in 100 ms steps.
    pub horizon_steps: usize,
    /// Starting ratio before any tree (the weighted median of the training targets).
    pub initial_ratio: f64,
    trees: Vec<Tree>,
}

impl HorizonModel {
    /// Predicted ratio of the next interval's mean rate to the reference rate.
    fn predict_ratio(&self, features: &[f32; FEATURE_COUNT]) -> f64 {
        self.initial_ratio
            + self
                .trees
                .iter()
                .map(|tree| tree.evaluate(features))
                .sum::<f64>()
    }

    /// Number of trees.
    pub fn tree_count(&self) -> usize {
        self.trees.len()
    }
}

/// A trained model: one boosted ensemble per horizon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LearnedModel {
    /// File format version, [`LEARNED_MODEL_FORMAT_VERSION`].
    pub format_version: u32,
    /// What kind of model this is.
    pub kind: String,
    /// Feature names the trees were trained on, checked at load.
    pub feature_names: Vec<String>,
    /// Trace files the model was fitted on; evaluation on these is not honest.
    pub trained_on: Vec<String>,
    /// Hyper-parameters used.
    pub options: TrainingOptions,
    /// One ensemble per horizon, sorted by horizon.
    pub horizons: Vec<HorizonModel>,
}

#[derive(Deserialize)]
struct VersionProbe {
    format_version: u32,
}

impl LearnedModel {
    /// Parses and validates a model file's text.
    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let probe: VersionProbe = serde_json::from_str(text).map_err(ModelError::Json)?;
        if probe.format_version != LEARNED_MODEL_FORMAT_VERSION {
            return Err(ModelError::UnsupportedVersion {
                found: probe.format_version,
                supported: LEARNED_MODEL_FORMAT_VERSION,
            });
        }
        let model: LearnedModel = serde_json::from_str(text).map_err(ModelError::Json)?;
        if model
            .feature_names
            .iter()
            .map(String::as_str)
            .ne(FEATURE_NAMES)
        {
            return Err(ModelError::FeatureMismatch {
                found: model.feature_names.clone(),
                expected: FEATURE_NAMES.iter().map(|name| name.to_string()).collect(),
            });
        }
        if model.horizons.is_empty() {
            return Err(ModelError::NoHorizon);
        }
        for horizon in &model.horizons {
            for (index, tree) in horizon.trees.iter().enumerate() {
                tree.validate()
                    .map_err(|reason| ModelError::MalformedTree {
                        horizon_steps: horizon.horizon_steps,
                        tree: index,
                        reason,
                    })?;
            }
        }
        Ok(model)
    }

    /// Serialises the model (compact JSON, the checked-in format).
    pub fn to_json(&self) -> String {
        // A model holds only numbers and strings: serialisation cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The model embedded in this build, parsed once.
    pub fn shipped() -> Result<Arc<LearnedModel>, ModelError> {
        static SHIPPED: OnceLock<Arc<LearnedModel>> = OnceLock::new();
        if let Some(model) = SHIPPED.get() {
            return Ok(Arc::clone(model));
        }
        let model = Arc::new(Self::from_json(SHIPPED_MODEL_JSON)?);
        Ok(Arc::clone(SHIPPED.get_or_init(|| model)))
    }

    /// The horizon model closest (in ratio) to `horizon_steps`.
    fn horizon_for(&self, horizon_steps: usize) -> Option<&HorizonModel> {
        let wanted = (horizon_steps.max(1) as f64).ln();
        self.horizons.iter().min_by(|a, b| {
            let distance_a = ((a.horizon_steps.max(1) as f64).ln() - wanted).abs();
            let distance_b = ((b.horizon_steps.max(1) as f64).ln() - wanted).abs();
            distance_a.total_cmp(&distance_b)
        })
    }

    /// Expected mean rate over the next `horizon_steps` given `history` (oldest first, 100 ms
    /// steps); `None` for an empty history.
    pub fn forecast(&self, history: &[f64], horizon_steps: usize) -> Option<f64> {
        let horizon = self.horizon_for(horizon_steps)?;
        let (reference, features) = compute_features(history, horizon.horizon_steps)?;
        let features = features.map(|value| value as f32);
        Some((reference * horizon.predict_ratio(&features)).max(0.0))
    }
}

fn mean_of_last(history: &[f64], count: usize) -> f64 {
    let count = count.clamp(1, history.len());
    history[history.len() - count..].iter().sum::<f64>() / count as f64
}

/// The reference rate and features for a forecast over `horizon_steps` from `history` (oldest
/// first). `None` when the history is empty.
pub fn compute_features(
    history: &[f64],
    horizon_steps: usize,
) -> Option<(f64, [f64; FEATURE_COUNT])> {
    if history.is_empty() {
        return None;
    }
    let history = &history[history.len().saturating_sub(HISTORY_STEPS)..];
    let step_seconds = BASE_STEP.as_secs_f64();
    let reference_steps = horizon_steps.clamp(1, REFERENCE_MAX_STEPS);
    let reference_floor = PACKET_BITS / (reference_steps as f64 * step_seconds);
    let reference = mean_of_last(history, reference_steps).max(reference_floor);
    let ratio = |rate: f64| (rate / reference).clamp(0.0, RATIO_CLIP);

    let mut features = [0.0; FEATURE_COUNT];
    for (slot, window) in MEAN_WINDOWS.iter().enumerate() {
        features[slot] = ratio(mean_of_last(history, *window));
    }
    let variation = |count: usize| {
        let count = count.clamp(1, history.len());
        let window = &history[history.len() - count..];
        let mean = window.iter().sum::<f64>() / count as f64;
        let variance = window
            .iter()
            .map(|value| (value - mean).powi(2))
            .sum::<f64>()
            / count as f64;
        (variance.sqrt() / mean.max(PACKET_BITS / step_seconds)).min(RATIO_CLIP)
    };
    let empty_share = |count: usize| {
        let count = count.clamp(1, history.len());
        history[history.len() - count..]
            .iter()
            .filter(|&&value| value <= 0.0)
            .count() as f64
            / count as f64
    };
    features[9] = variation(10);
    features[10] = variation(50);
    features[11] = empty_share(10);
    features[12] = empty_share(50);

    // The last five whole seconds (newest aligned to the end), fewer when the history is short.
    let second_floor = PACKET_BITS;
    let seconds: Vec<f64> = history
        .rchunks(10)
        .take(5)
        .map(|chunk| chunk.iter().sum::<f64>() / chunk.len() as f64)
        .collect();
    let reciprocal_sum: f64 = seconds
        .iter()
        .map(|value| 1.0 / value.max(second_floor))
        .sum();
    features[13] = ratio(seconds.len() as f64 / reciprocal_sum);
    features[14] = ratio(seconds.iter().copied().fold(f64::INFINITY, f64::min));
    features[15] = ratio(seconds.iter().copied().fold(0.0, f64::max));
    let newest_second = mean_of_last(history, 10);
    let previous_second = if history.len() > 10 {
        mean_of_last(&history[..history.len() - 10], 10)
    } else {
        newest_second
    };
    features[16] = ((newest_second - previous_second) / reference).clamp(-RATIO_CLIP, RATIO_CLIP);
    features[17] = reference.log10();
    features[18] = history.len() as f64 * step_seconds;
    Some((reference, features))
}

/// One trace's 100 ms series, as training input.
#[derive(Debug, Clone)]
pub struct TrainingSeries {
    /// Trace file name, recorded in the model.
    pub name: String,
    /// Throughput per 100 ms step, bits per second.
    pub base_bits_per_second: Vec<f64>,
}

struct TrainingSet {
    features: Vec<[f32; FEATURE_COUNT]>,
    targets: Vec<f64>,
    weights: Vec<f64>,
}

/// Training samples: a forecast at every `stride`-th boundary (aligned to multiples of the
/// stride when `aligned`, otherwise starting after the first step).
fn training_set(
    series: &[TrainingSeries],
    horizon_steps: usize,
    stride: Option<usize>,
) -> TrainingSet {
    let (stride, first_boundary) = match stride {
        Some(stride) => (stride.max(1), stride.max(1)),
        None => ((horizon_steps / 5).clamp(1, 5), 1),
    };
    let mut set = TrainingSet {
        features: Vec::new(),
        targets: Vec::new(),
        weights: Vec::new(),
    };
    for trace in series {
        let samples = &trace.base_bits_per_second;
        let first_sample = set.targets.len();
        let mut actual_total = 0.0;
        let mut boundary = first_boundary;
        while boundary + horizon_steps <= samples.len() {
            let history = &samples[boundary.saturating_sub(HISTORY_STEPS)..boundary];
            if let Some((reference, features)) = compute_features(history, horizon_steps) {
                let actual = samples[boundary..boundary + horizon_steps]
                    .iter()
                    .sum::<f64>()
                    / horizon_steps as f64;
                actual_total += actual;
                set.features.push(features.map(|value| value as f32));
                set.targets.push(actual / reference);
                // Weight so that sum(weight * |target - ratio|) is this file's WAPE contribution.
                set.weights.push(reference);
            }
            boundary += stride;
        }
        if actual_total > 0.0 {
            for weight in &mut set.weights[first_sample..] {
                *weight /= actual_total;
            }
        } else {
            set.weights.truncate(first_sample);
            set.targets.truncate(first_sample);
            set.features.truncate(first_sample);
        }
    }
    set
}

/// Bin edges per feature and every sample's bin.
struct BinnedFeatures {
    thresholds: Vec<Vec<f32>>,
    bins: Vec<Vec<u8>>,
}

fn bin_features(features: &[[f32; FEATURE_COUNT]], bins: usize) -> BinnedFeatures {
    let bins = bins.clamp(2, 256);
    let mut thresholds = Vec::with_capacity(FEATURE_COUNT);
    let mut binned = Vec::with_capacity(FEATURE_COUNT);
    for feature in 0..FEATURE_COUNT {
        let mut values: Vec<f32> = features.iter().map(|row| row[feature]).collect();
        values.sort_by(f32::total_cmp);
        let mut edges: Vec<f32> = (1..bins)
            .map(|index| values[(index * (values.len() - 1)) / bins])
            .collect();
        edges.dedup();
        // The last edge would put everything left; it adds no split.
        if edges.last() == values.last() {
            edges.pop();
        }
        let column = features
            .iter()
            .map(|row| edges.partition_point(|&edge| edge < row[feature]) as u8)
            .collect();
        thresholds.push(edges);
        binned.push(column);
    }
    BinnedFeatures {
        thresholds,
        bins: binned,
    }
}

fn weighted_median(pairs: &mut [(f64, f64)]) -> f64 {
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: f64 = pairs.iter().map(|pair| pair.1).sum();
    let mut cumulative = 0.0;
    for &(value, weight) in pairs.iter() {
        cumulative += weight;
        if cumulative >= total / 2.0 {
            return value;
        }
    }
    pairs.last().map_or(0.0, |pair| pair.0)
}

struct TreeBuilder<'a> {
    binned: &'a BinnedFeatures,
    gradients: &'a [f64],
    weights: &'a [f64],
    residuals: &'a [f64],
    options: TrainingOptions,
    tree: Tree,
}

impl TreeBuilder<'_> {
    fn push_leaf(&mut self, samples: &[u32]) -> usize {
        let mut pairs: Vec<(f64, f64)> = samples
            .iter()
            .map(|&sample| {
                (
                    self.residuals[sample as usize],
                    self.weights[sample as usize],
                )
            })
            .collect();
        let value = weighted_median(&mut pairs) * self.options.learning_rate;
        self.tree.feature.push(-1);
        self.tree.threshold.push(0.0);
        self.tree.left.push(0);
        self.tree.right.push(0);
        self.tree.value.push(value as f32);
        self.tree.feature.len() - 1
    }

    fn best_split(&self, samples: &[u32]) -> Option<(usize, u8, f64)> {
        let min_leaf = self.options.min_leaf_samples.max(1);
        let total_weight: f64 = samples.iter().map(|&s| self.weights[s as usize]).sum();
        let total_gradient: f64 = samples
            .iter()
            .map(|&s| self.weights[s as usize] * self.gradients[s as usize])
            .sum();
        if total_weight <= 0.0 {
            return None;
        }
        let parent_score = total_gradient * total_gradient / total_weight;
        let mut best: Option<(usize, u8, f64)> = None;
        for feature in 0..FEATURE_COUNT {
            let edges = self.binned.thresholds[feature].len();
            if edges == 0 {
                continue;
            }
            let mut weight_per_bin = vec![0.0; edges + 1];
            let mut gradient_per_bin = vec![0.0; edges + 1];
            let mut count_per_bin = vec![0_usize; edges + 1];
            let column = &self.binned.bins[feature];
            for &sample in samples {
                let bin = usize::from(column[sample as usize]);
                let weight = self.weights[sample as usize];
                weight_per_bin[bin] += weight;
                gradient_per_bin[bin] += weight * self.gradients[sample as usize];
                count_per_bin[bin] += 1;
            }
            let (mut left_weight, mut left_gradient, mut left_count) = (0.0, 0.0, 0_usize);
            for bin in 0..edges {
                left_weight += weight_per_bin[bin];
                left_gradient += gradient_per_bin[bin];
                left_count += count_per_bin[bin];
                let right_count = samples.len() - left_count;
                if left_count < min_leaf {
                    continue;
                }
                if right_count < min_leaf {
                    break;
                }
                let right_weight = total_weight - left_weight;
                if left_weight <= 0.0 || right_weight <= 0.0 {
                    continue;
                }
                let right_gradient = total_gradient - left_gradient;
                let gain = left_gradient * left_gradient / left_weight
                    + right_gradient * right_gradient / right_weight
                    - parent_score;
                if gain > best.map_or(1e-12, |(_, _, best_gain)| best_gain) {
                    best = Some((feature, bin as u8, gain));
                }
            }
        }
        best
    }

    fn grow(&mut self, samples: Vec<u32>, depth: usize) -> usize {
        let min_leaf = self.options.min_leaf_samples.max(1);
        if depth >= self.options.max_depth || samples.len() < 2 * min_leaf {
            return self.push_leaf(&samples);
        }
        let Some((feature, bin, _)) = self.best_split(&samples) else {
            return self.push_leaf(&samples);
        };
        let column = &self.binned.bins[feature];
        let (left_samples, right_samples): (Vec<u32>, Vec<u32>) = samples
            .into_iter()
            .partition(|&sample| column[sample as usize] <= bin);
        let node = self.tree.feature.len();
        self.tree.feature.push(feature as i16);
        self.tree
            .threshold
            .push(self.binned.thresholds[feature][usize::from(bin)]);
        self.tree.left.push(0);
        self.tree.right.push(0);
        self.tree.value.push(0.0);
        let left = self.grow(left_samples, depth + 1);
        let right = self.grow(right_samples, depth + 1);
        self.tree.left[node] = left as u16;
        self.tree.right[node] = right as u16;
        node
    }
}

/// Deepest tree the file format can hold comfortably (node indices are 16-bit).
const DEEPEST_TREE: usize = 12;

fn train_horizon(
    series: &[TrainingSeries],
    horizon_steps: usize,
    options: TrainingOptions,
    boundary_steps: Option<usize>,
) -> HorizonModel {
    let options = TrainingOptions {
        max_depth: options.max_depth.min(DEEPEST_TREE),
        ..options
    };
    let set = training_set(series, horizon_steps, boundary_steps);
    if set.targets.is_empty() {
        return HorizonModel {
            horizon_steps,
            initial_ratio: 1.0,
            trees: Vec::new(),
        };
    }
    let binned = bin_features(&set.features, options.bins);
    let mut pairs: Vec<(f64, f64)> = set
        .targets
        .iter()
        .copied()
        .zip(set.weights.iter().copied())
        .collect();
    let initial_ratio = weighted_median(&mut pairs);
    let mut predictions = vec![initial_ratio; set.targets.len()];
    let mut trees = Vec::with_capacity(options.trees);
    let all_samples: Vec<u32> = (0..set.targets.len() as u32).collect();
    for _ in 0..options.trees {
        let residuals: Vec<f64> = set
            .targets
            .iter()
            .zip(&predictions)
            .map(|(target, prediction)| target - prediction)
            .collect();
        let gradients: Vec<f64> = residuals.iter().map(|residual| residual.signum()).collect();
        let mut builder = TreeBuilder {
            binned: &binned,
            gradients: &gradients,
            weights: &set.weights,
            residuals: &residuals,
            options,
            tree: Tree {
                feature: Vec::new(),
                threshold: Vec::new(),
                left: Vec::new(),
                right: Vec::new(),
                value: Vec::new(),
            },
        };
        builder.grow(all_samples.clone(), 0);
        let tree = builder.tree;
        for (prediction, features) in predictions.iter_mut().zip(&set.features) {
            *prediction += tree.evaluate(features);
        }
        trees.push(tree);
    }
    HorizonModel {
        horizon_steps,
        initial_ratio,
        trees,
    }
}

/// Trains one boosted ensemble per horizon on the given series, with a training sample at every
/// few 100 ms steps (every step for the shortest horizons). Deterministic.
pub fn train(
    series: &[TrainingSeries],
    horizons_steps: &[usize],
    options: TrainingOptions,
) -> LearnedModel {
    train_with_boundaries(series, horizons_steps, options, None)
}

/// Like [`train`], but with training samples only at multiples of `boundary_steps`: for series
/// whose samples are only known at that resolution (a sample in the middle of a block would
/// otherwise see the block's later part).
pub fn train_on_boundaries(
    series: &[TrainingSeries],
    horizons_steps: &[usize],
    options: TrainingOptions,
    boundary_steps: usize,
) -> LearnedModel {
    train_with_boundaries(series, horizons_steps, options, Some(boundary_steps))
}

fn train_with_boundaries(
    series: &[TrainingSeries],
    horizons_steps: &[usize],
    options: TrainingOptions,
    boundary_steps: Option<usize>,
) -> LearnedModel {
    let mut horizons: Vec<HorizonModel> = horizons_steps
        .iter()
        .map(|&horizon_steps| train_horizon(series, horizon_steps.max(1), options, boundary_steps))
        .collect();
    horizons.sort_by_key(|horizon| horizon.horizon_steps);
    LearnedModel {
        format_version: LEARNED_MODEL_FORMAT_VERSION,
        kind: "gradient-boosted-trees, least absolute deviation".to_string(),
        feature_names: FEATURE_NAMES.iter().map(|name| name.to_string()).collect(),
        trained_on: series.iter().map(|trace| trace.name.clone()).collect(),
        options,
        horizons,
    }
}

/// The learned model as a [`Predictor`]: keeps the last 60 s of samples.
#[derive(Debug, Clone)]
pub struct LearnedPredictor {
    model: Arc<LearnedModel>,
    history: Vec<f64>,
}

impl LearnedPredictor {
    /// A predictor using `model`.
    pub fn new(model: Arc<LearnedModel>) -> Self {
        Self {
            model,
            history: Vec::with_capacity(2 * HISTORY_STEPS),
        }
    }
}

impl Predictor for LearnedPredictor {
    fn name(&self) -> String {
        "learned-gbt".to_string()
    }

    fn observe(&mut self, bits_per_second: f64) {
        if self.history.len() >= 2 * HISTORY_STEPS {
            self.history.drain(..HISTORY_STEPS);
        }
        self.history.push(clean_sample(bits_per_second));
    }

    fn forecast(&self, horizon_steps: usize) -> Option<f64> {
        self.model.forecast(&self.history, horizon_steps)
    }
}

/// Replaces every sample by the mean of its block of `block_steps` (a trailing partial block is
/// dropped): the same series as seen by a measurement with only block resolution.
pub fn coarsen(base_bits_per_second: &[f64], block_steps: usize) -> Vec<f64> {
    let block_steps = block_steps.max(1);
    base_bits_per_second
        .chunks_exact(block_steps)
        .flat_map(|block| {
            let mean = block.iter().sum::<f64>() / block_steps as f64;
            std::iter::repeat_n(mean, block_steps)
        })
        .collect()
}

/// The learned model fed only whole blocks (for example whole seconds): used to measure what the
/// finer 100 ms history is worth. It forecasts from the history up to the last complete block.
#[derive(Debug, Clone)]
pub struct CoarseHistoryPredictor {
    inner: LearnedPredictor,
    block: crate::predictor::BlockAccumulator,
    block_steps: usize,
}

impl CoarseHistoryPredictor {
    /// `model` (trained on [`coarsen`]ed series) fed blocks of `block_steps`.
    pub fn new(model: Arc<LearnedModel>, block_steps: usize) -> Self {
        Self {
            inner: LearnedPredictor::new(model),
            block: crate::predictor::BlockAccumulator::new(block_steps),
            block_steps: block_steps.max(1),
        }
    }
}

impl Predictor for CoarseHistoryPredictor {
    fn name(&self) -> String {
        format!(
            "learned-gbt({} ms history)",
            self.block_steps as u128 * BASE_STEP.as_millis()
        )
    }

    fn observe(&mut self, bits_per_second: f64) {
        if let Some(mean) = self.block.push(clean_sample(bits_per_second)) {
            for _ in 0..self.block_steps {
                self.inner.observe(mean);
            }
        }
    }

    fn forecast(&self, horizon_steps: usize) -> Option<f64> {
        self.inner.forecast(horizon_steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarsened_history_is_block_means() {
        assert_eq!(
            coarsen(&[1.0, 3.0, 5.0, 7.0, 9.0], 2),
            vec![2.0, 2.0, 6.0, 6.0]
        );
    }

    #[test]
    fn shipped_model_loads_and_has_the_supported_version() {
        let model = LearnedModel::shipped().expect("shipped model loads");
        assert_eq!(model.format_version, LEARNED_MODEL_FORMAT_VERSION);
        let horizons: Vec<usize> = model.horizons.iter().map(|h| h.horizon_steps).collect();
        for needed in [1, 10, 50, 300] {
            assert!(
                horizons.contains(&needed),
                "horizon {needed} missing: {horizons:?}"
            );
        }
        assert!(
            model
                .horizons
                .iter()
                .all(|horizon| horizon.tree_count() > 0)
        );
        assert!(!model.trained_on.is_empty());
    }

    #[test]
    fn other_versions_are_refused_clearly() {
        let mut model = (*LearnedModel::shipped().expect("shipped model")).clone();
        model.format_version = LEARNED_MODEL_FORMAT_VERSION + 1;
        let error = LearnedModel::from_json(&model.to_json()).expect_err("newer version refused");
        assert!(matches!(error, ModelError::UnsupportedVersion { .. }));
        assert!(error.to_string().contains("format version"));
        assert!(matches!(
            LearnedModel::from_json("{\"format_version\": 1}"),
            Err(ModelError::Json(_))
        ));
        assert!(matches!(
            LearnedModel::from_json("nonsense"),
            Err(ModelError::Json(_))
        ));
    }

    #[test]
    fn malformed_trees_are_refused() {
        let mut model = (*LearnedModel::shipped().expect("shipped model")).clone();
        let tree = &mut model.horizons[0].trees[0];
        tree.feature[0] = 0;
        tree.left[0] = 0; // a cycle back to the root
        assert!(matches!(
            LearnedModel::from_json(&model.to_json()),
            Err(ModelError::MalformedTree { .. })
        ));
    }

    #[test]
    fn model_round_trips_through_json() {
        let model = LearnedModel::shipped().expect("shipped model");
        let again = LearnedModel::from_json(&model.to_json()).expect("round trip");
        assert_eq!(*model, again);
    }

    #[test]
    fn features_scale_with_the_rate() {
        let slow: Vec<f64> = (0..100)
            .map(|step| 1.0e5 * (1.0 + (step % 7) as f64))
            .collect();
        let fast: Vec<f64> = slow.iter().map(|value| value * 10.0).collect();
        let (slow_reference, slow_features) = compute_features(&slow, 10).expect("features");
        let (fast_reference, fast_features) = compute_features(&fast, 10).expect("features");
        assert!((fast_reference / slow_reference - 10.0).abs() < 1e-9);
        for index in 0..FEATURE_COUNT {
            if FEATURE_NAMES[index] == "log10_reference_bits_per_second" {
                assert!((fast_features[index] - slow_features[index] - 1.0).abs() < 1e-9);
            } else {
                assert!(
                    (fast_features[index] - slow_features[index]).abs() < 1e-9,
                    "{} differs",
                    FEATURE_NAMES[index]
                );
            }
        }
        assert_eq!(compute_features(&[], 10), None);
    }

    #[test]
    fn training_learns_a_predictable_pattern() {
        // A link that alternates 2 s at 8 Mbit/s and 2 s at 2 Mbit/s: "last second" is wrong at
        // every switch (half the forecasts), a model seeing the 2-second history can know better.
        // The model is trained on every 100 ms phase, not only the tested whole-second one, so it
        // does not reach a perfect score.
        let pattern: Vec<f64> = (0..6000)
            .map(|step| if (step / 20) % 2 == 0 { 8.0e6 } else { 2.0e6 })
            .collect();
        let series = vec![TrainingSeries {
            name: "square-wave".to_string(),
            base_bits_per_second: pattern.clone(),
        }];
        let options = TrainingOptions {
            trees: 100,
            learning_rate: 0.3,
            max_depth: 4,
            min_leaf_samples: 20,
            bins: 32,
        };
        let model = Arc::new(train(&series, &[10], options));
        let mut learned = LearnedPredictor::new(Arc::clone(&model));
        let mut last_value = crate::predictor::LastValue::new(10);
        let (mut learned_error, mut last_error, mut total) = (0.0, 0.0, 0.0);
        for (step, &sample) in pattern.iter().enumerate().take(2000) {
            if step >= 100 && step % 10 == 0 {
                let actual = pattern[step..step + 10].iter().sum::<f64>() / 10.0;
                learned_error += (learned.forecast(10).expect("forecast") - actual).abs();
                last_error += (last_value.forecast(10).expect("forecast") - actual).abs();
                total += actual;
            }
            learned.observe(sample);
            last_value.observe(sample);
        }
        let learned_accuracy = 1.0 - learned_error / total;
        let last_accuracy = 1.0 - last_error / total;
        assert!(
            learned_accuracy > 0.85 && learned_accuracy > last_accuracy + 0.3,
            "learned {learned_accuracy}, last value {last_accuracy}"
        );
    }
}
