//! Evaluates every bandwidth predictor walk-forward on the shared field traces (or the trace files
//! given on the command line) and prints the markdown table, then the cost of the live link model.
//!
//! `cargo bench -p novacron-bandwidth --bench trace_eval` runs the leave-one-drive-out
//! cross-validation (the learned model is retrained for each drive on the other drives' traces, and
//! a variant that sees only whole seconds of history is evaluated beside it).
//! `-- --shipped FILES...` evaluates the shipped model instead (honest only on traces it was not
//! trained on, which the table marks with *); `-- --classic-only` leaves the learned model out.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use novacron_bandwidth::evaluation::{EvaluationOptions, LearnedModelChoice, evaluate};
use novacron_bandwidth::link::{ForecastHorizon, LinkModel};
use novacron_bandwidth::trace::{
    BASE_STEP, DeliveryTrace, list_trace_files, trace_directory, trace_name,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut learned_model = LearnedModelChoice::LeaveOneDriveOut;
    let mut files = Vec::new();
    for argument in std::env::args().skip(1) {
        match argument.as_str() {
            "--shipped" => learned_model = LearnedModelChoice::Shipped,
            "--classic-only" => learned_model = LearnedModelChoice::Skip,
            // cargo bench passes --bench to every bench target.
            "--bench" => {}
            other if other.starts_with("--") => {
                return Err(format!("unknown option {other}").into());
            }
            file => files.push(PathBuf::from(file)),
        }
    }
    if files.is_empty() {
        files = list_trace_files(&trace_directory())?;
    }
    let options = EvaluationOptions {
        // The library's default steps plus the link model's longest horizon (few intervals per
        // trace there: its calibration figures are rough).
        granularities: vec![
            Duration::from_millis(100),
            Duration::from_secs(1),
            Duration::from_secs(5),
            Duration::from_secs(30),
        ],
        learned_model,
        compare_coarse_history: learned_model == LearnedModelChoice::LeaveOneDriveOut,
        ..EvaluationOptions::default()
    };
    let started = Instant::now();
    let report = evaluate(&files, &options)?;
    println!("{report}");
    println!(
        "\nevaluated {} trace files in {:.1} s",
        files.len(),
        started.elapsed().as_secs_f64()
    );
    link_model_cost(&files[0])?;
    Ok(())
}

/// Feeds one trace through the live link model (as the transport would, 100 ms samples) and
/// reports the cost of `observe` and `forecast`.
fn link_model_cost(path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let base = DeliveryTrace::load(path)?.base_series()?.bits_per_second;
    let mut model = LinkModel::new();
    let started = Instant::now();
    for rate in &base {
        model.observe(
            (rate * BASE_STEP.as_secs_f64() / 8.0).round() as u64,
            BASE_STEP,
        );
    }
    let observe_cost = started.elapsed() / base.len().max(1) as u32;
    let calls = 10_000_u32;
    let started = Instant::now();
    let mut checksum = 0.0;
    for call in 0..calls {
        let horizon = ForecastHorizon::ALL[call as usize % ForecastHorizon::ALL.len()];
        if let Some(forecast) = model.forecast(horizon) {
            checksum += forecast.expected_bits_per_sec;
        }
    }
    let forecast_cost = started.elapsed() / calls;
    println!(
        "\n| link model ({}) | cost |\n|---|---:|\n| observe, per 100 ms sample | {} |\n| forecast, per call | {} |",
        trace_name(path),
        micros(observe_cost),
        micros(forecast_cost),
    );
    println!("(checksum {checksum:.0})");
    Ok(())
}

fn micros(duration: Duration) -> String {
    format!("{:.1} µs", duration.as_secs_f64() * 1e6)
}
