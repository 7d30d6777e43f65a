//! Evaluates every bandwidth predictor walk-forward on the shared field traces (or the trace files
//! given on the command line) and prints the markdown table.
//!
//! `cargo bench -p novacron-bandwidth --bench trace_eval` runs the leave-one-drive-out
//! cross-validation (the learned model is retrained for each drive on the other drives' traces).
//! `-- --shipped FILES...` evaluates the shipped model instead (honest only on traces it was not
//! trained on, which the table marks with *).

use std::path::PathBuf;
use std::time::Instant;

use novacron_bandwidth::evaluation::{EvaluationOptions, LearnedModelChoice, evaluate};
use novacron_bandwidth::trace::{list_trace_files, trace_directory};

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
    Ok(())
}
