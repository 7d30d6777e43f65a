//! Trains the learned bandwidth model on trace files and writes the versioned JSON model file.
//!
//! `cargo run --release -p novacron-bandwidth --example train_model -- [OUTPUT] [TRACE_FILE...]`
//! OUTPUT defaults to `crates/bandwidth/models/bandwidth-gbt-v1.json`; trace files default to every
//! trace in the shared directory (`$NOVACRON_TRACE_DIR` overrides it). The model is trained on all
//! given traces, so its evaluation is honest only on other traces; the bench's leave-one-drive-out
//! mode retrains per fold instead.

use std::path::PathBuf;

use novacron_bandwidth::learned::{TrainingOptions, TrainingSeries, train};
use novacron_bandwidth::trace::{DeliveryTrace, list_trace_files, trace_directory, trace_name};

/// Horizons (in 100 ms steps) the shipped model serves: 100 ms, 1 s, 5 s, 30 s.
const HORIZONS: [usize; 4] = [1, 10, 50, 300];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut arguments = std::env::args().skip(1);
    let output = arguments.next().map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/bandwidth-gbt-v1.json")
    });
    let mut files: Vec<PathBuf> = arguments.map(PathBuf::from).collect();
    if files.is_empty() {
        files = list_trace_files(&trace_directory())?;
    }
    let mut series = Vec::with_capacity(files.len());
    for file in &files {
        let trace = DeliveryTrace::load(file)?;
        series.push(TrainingSeries {
            name: trace_name(file),
            base_bits_per_second: trace.base_series()?.bits_per_second,
        });
    }
    let model = train(&series, &HORIZONS, TrainingOptions::default());
    let json = model.to_json();
    std::fs::write(&output, &json)
        .map_err(|error| format!("cannot write model file {}: {error}", output.display()))?;
    println!(
        "wrote {} ({} bytes, {} horizons, trained on {})",
        output.display(),
        json.len(),
        model.horizons.len(),
        model.trained_on.join(", ")
    );
    Ok(())
}
