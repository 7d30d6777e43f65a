//! Bandwidth prediction for NovaCron's WAN transfers (the DWCP "PBA" part): per-link forecasts of
//! the throughput over the next 1 s, 5 s and 30 s, with an 80 % band and a confidence, which the
//! transport, the codec and migration planning act on and the API shows.
//!
//! - [`trace`]: field traces (one line per 1500-byte delivery opportunity) → throughput series.
//! - [`predictor`]: the sans-IO [`Predictor`] trait and the classic predictors (last value, EWMA,
//!   Holt, harmonic mean).
//! - [`learned`]: gradient-boosted trees over multi-scale features, trained offline and embedded.
//! - [`ensemble`]: per-link choice of the predictor with the best recent accuracy.
//! - [`band`]: calibrated 80 % bands from recent errors, and the checking of past forecasts.
//! - [`link`]: [`LinkModel`] (one per peer link) and [`LinkRegistry`], the API for other crates.
//! - [`evaluation`]: walk-forward evaluation on trace files and its markdown report.
//!
//! Nothing here does network IO or reads a clock: the transport feeds measurements in and reads
//! forecasts out. File IO happens only in trace loading for the evaluation.

pub mod band;
pub mod ensemble;
pub mod evaluation;
pub mod learned;
pub mod link;
pub mod predictor;
pub mod trace;

pub use band::{BandCalibrator, BandedForecast, CheckedForecast, ForecastTracker, ScoreTotals};
pub use ensemble::AdaptiveEnsemble;
pub use evaluation::{
    EvaluationError, EvaluationOptions, EvaluationReport, GranularityReport, LearnedModelChoice,
    PredictorScore, TargetCheck, TraceScores, evaluate, walk_forward,
};
pub use learned::{
    LEARNED_MODEL_FORMAT_VERSION, LearnedModel, LearnedPredictor, ModelError, TrainingOptions,
    TrainingSeries,
};
pub use link::{
    AccuracyReport, CandidateAccuracy, Forecast, ForecastHorizon, HorizonAccuracy, LinkModel,
    LinkRegistry, LinkSummary, TransferEstimate,
};
pub use predictor::{Ewma, HarmonicMean, Holt, LastValue, Predictor, classic_predictors};
pub use trace::{
    BASE_STEP, DeliveryTrace, ThroughputSeries, TraceError, list_trace_files, trace_directory,
};
