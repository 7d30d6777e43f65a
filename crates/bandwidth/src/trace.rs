//! Field traces of link capacity and the throughput series made from them.
//!
//! A trace file (the Saturator / mahimahi format) holds one line per 1500-byte delivery
//! opportunity, each a millisecond timestamp from the start of the trace; a timestamp repeated on
//! several lines means several packets could cross in that millisecond. This module parses and
//! validates such files and bins them into throughput series (bits per second) at a granularity
//! that is a multiple of [`BASE_STEP`]. It owns no forecasting logic and does no IO beyond
//! reading the files it is handed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The finest step every series and predictor works on: 100 ms.
pub const BASE_STEP: Duration = Duration::from_millis(BASE_STEP_MILLIS);
/// [`BASE_STEP`] in milliseconds.
pub const BASE_STEP_MILLIS: u64 = 100;
/// Bits carried by one delivery opportunity of a trace (one 1500-byte packet).
pub const PACKET_BITS: f64 = 1500.0 * 8.0;

/// Environment variable that overrides where the shared field traces are read from.
pub const TRACE_DIRECTORY_VARIABLE: &str = "NOVACRON_TRACE_DIR";

/// Why a trace could not be turned into a series.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot read trace file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot list trace directory {path}")]
    ListDirectory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "trace file {path} holds no delivery timestamps; give a file with one ms timestamp per line"
    )]
    Empty { path: PathBuf },
    #[error(
        "trace file {path} line {line}: {content:?} is not a millisecond timestamp (expected a non-negative integer)"
    )]
    NotATimestamp {
        path: PathBuf,
        line: usize,
        content: String,
    },
    #[error(
        "trace file {path} line {line}: timestamp {timestamp} ms comes after {previous} ms; timestamps must never decrease"
    )]
    Decreasing {
        path: PathBuf,
        line: usize,
        timestamp: u64,
        previous: u64,
    },
    #[error(
        "trace file {path} covers {duration_millis} ms, shorter than one {step_millis} ms step"
    )]
    TooShort {
        path: PathBuf,
        duration_millis: u64,
        step_millis: u64,
    },
    #[error("granularity of {millis} ms is not a positive multiple of {BASE_STEP_MILLIS} ms")]
    Granularity { millis: u128 },
}

/// One parsed trace: the delivery opportunities of a link over time.
#[derive(Debug, Clone)]
pub struct DeliveryTrace {
    source: PathBuf,
    delivery_millis: Vec<u64>,
}

impl DeliveryTrace {
    /// Reads and validates a trace file.
    pub fn load(path: &Path) -> Result<Self, TraceError> {
        let text = std::fs::read_to_string(path).map_err(|source| TraceError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses trace text; `source` names the file in errors. Blank lines are skipped.
    pub fn parse(source: &Path, text: &str) -> Result<Self, TraceError> {
        let mut delivery_millis = Vec::with_capacity(text.len() / 6);
        let mut previous: Option<u64> = None;
        for (index, raw_line) in text.lines().enumerate() {
            let line = raw_line.trim();
            if line.is_empty() {
                continue;
            }
            let timestamp: u64 = line.parse().map_err(|_| TraceError::NotATimestamp {
                path: source.to_path_buf(),
                line: index + 1,
                content: truncate_for_error(line),
            })?;
            if let Some(previous) = previous
                && timestamp < previous
            {
                return Err(TraceError::Decreasing {
                    path: source.to_path_buf(),
                    line: index + 1,
                    timestamp,
                    previous,
                });
            }
            previous = Some(timestamp);
            delivery_millis.push(timestamp);
        }
        if delivery_millis.is_empty() {
            return Err(TraceError::Empty {
                path: source.to_path_buf(),
            });
        }
        Ok(Self {
            source: source.to_path_buf(),
            delivery_millis,
        })
    }

    /// The file this trace came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The file name, e.g. `ATT-LTE-driving.down`.
    pub fn name(&self) -> String {
        trace_name(&self.source)
    }

    /// Milliseconds the trace covers: up to and including its last timestamp.
    pub fn duration_millis(&self) -> u64 {
        self.delivery_millis.last().map_or(0, |last| last + 1)
    }

    /// Number of delivery opportunities (packets) in the trace.
    pub fn packets(&self) -> usize {
        self.delivery_millis.len()
    }

    /// Throughput per [`BASE_STEP`]; only whole steps are kept, so the tail shorter than a step is
    /// dropped.
    pub fn base_series(&self) -> Result<ThroughputSeries, TraceError> {
        let duration_millis = self.duration_millis();
        let steps = usize::try_from(duration_millis / BASE_STEP_MILLIS).unwrap_or(usize::MAX);
        if steps == 0 {
            return Err(TraceError::TooShort {
                path: self.source.clone(),
                duration_millis,
                step_millis: BASE_STEP_MILLIS,
            });
        }
        let mut packets_per_step = vec![0_u32; steps];
        for &timestamp in &self.delivery_millis {
            let step = usize::try_from(timestamp / BASE_STEP_MILLIS).unwrap_or(usize::MAX);
            if let Some(count) = packets_per_step.get_mut(step) {
                *count += 1;
            }
        }
        let seconds_per_step = BASE_STEP.as_secs_f64();
        Ok(ThroughputSeries {
            step: BASE_STEP,
            bits_per_second: packets_per_step
                .into_iter()
                .map(|count| f64::from(count) * PACKET_BITS / seconds_per_step)
                .collect(),
        })
    }

    /// Throughput at `granularity` (a multiple of [`BASE_STEP`]), whole steps only.
    pub fn throughput_series(&self, granularity: Duration) -> Result<ThroughputSeries, TraceError> {
        let base = self.base_series()?;
        let factor = steps_in(granularity)?;
        let series = base.aggregate(factor);
        if series.is_empty() {
            return Err(TraceError::TooShort {
                path: self.source.clone(),
                duration_millis: self.duration_millis(),
                step_millis: u64::try_from(granularity.as_millis()).unwrap_or(u64::MAX),
            });
        }
        Ok(series)
    }
}

/// How many [`BASE_STEP`]s make up `granularity`, or an error if it is not a positive multiple.
pub fn steps_in(granularity: Duration) -> Result<usize, TraceError> {
    let millis = granularity.as_millis();
    let base = u128::from(BASE_STEP_MILLIS);
    if millis == 0
        || !millis.is_multiple_of(base)
        || !granularity.subsec_nanos().is_multiple_of(1_000_000)
    {
        return Err(TraceError::Granularity { millis });
    }
    usize::try_from(millis / base).map_err(|_| TraceError::Granularity { millis })
}

/// A throughput series: the mean rate over each consecutive step.
#[derive(Debug, Clone, PartialEq)]
pub struct ThroughputSeries {
    /// Length of each step.
    pub step: Duration,
    /// Mean rate over each step, bits per second.
    pub bits_per_second: Vec<f64>,
}

impl ThroughputSeries {
    /// Number of steps.
    pub fn len(&self) -> usize {
        self.bits_per_second.len()
    }

    /// True when the series holds no step.
    pub fn is_empty(&self) -> bool {
        self.bits_per_second.is_empty()
    }

    /// Mean rate over the whole series (0 when empty).
    pub fn mean_bits_per_second(&self) -> f64 {
        if self.is_empty() {
            0.0
        } else {
            self.bits_per_second.iter().sum::<f64>() / self.len() as f64
        }
    }

    /// Averages every `factor` consecutive steps into one; a trailing partial group is dropped.
    pub fn aggregate(&self, factor: usize) -> ThroughputSeries {
        let factor = factor.max(1);
        ThroughputSeries {
            step: self.step * u32::try_from(factor).unwrap_or(u32::MAX),
            bits_per_second: self
                .bits_per_second
                .chunks_exact(factor)
                .map(|group| group.iter().sum::<f64>() / factor as f64)
                .collect(),
        }
    }
}

impl fmt::Display for ThroughputSeries {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "{} steps of {} ms, mean {:.3} Mbit/s",
            self.len(),
            self.step.as_millis(),
            self.mean_bits_per_second() / 1e6
        )
    }
}

/// The file name of a trace path (what reports show).
pub fn trace_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// The drive (recording session) a trace belongs to: the file name without its direction suffix,
/// so `ATT-LTE-driving.up` and `ATT-LTE-driving.down` share the drive `ATT-LTE-driving`. Traces of
/// one drive are correlated and must stay on the same side of a train/test split.
pub fn drive_name(path: &Path) -> String {
    let name = trace_name(path);
    match name.rsplit_once('.') {
        Some((stem, suffix)) if suffix == "up" || suffix == "down" => stem.to_string(),
        _ => name,
    }
}

/// Where the shared field traces live: `$NOVACRON_TRACE_DIR`, else `shared/data/bandwidth-traces`
/// beside the repository, else the workplace's `/work/shared/data/bandwidth-traces` (a checkout
/// elsewhere, as in CI).
pub fn trace_directory() -> PathBuf {
    if let Some(directory) = std::env::var_os(TRACE_DIRECTORY_VARIABLE)
        && !directory.is_empty()
    {
        return PathBuf::from(directory);
    }
    let beside_repository =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/bandwidth-traces");
    let workplace = PathBuf::from("/work/shared/data/bandwidth-traces");
    if !beside_repository.is_dir() && workplace.is_dir() {
        return workplace;
    }
    beside_repository
}

/// The trace files of a directory (every regular file except READMEs and hidden files), sorted by
/// name.
pub fn list_trace_files(directory: &Path) -> Result<Vec<PathBuf>, TraceError> {
    let entries = std::fs::read_dir(directory).map_err(|source| TraceError::ListDirectory {
        path: directory.to_path_buf(),
        source,
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| TraceError::ListDirectory {
            path: directory.to_path_buf(),
            source,
        })?;
        let path = entry.path();
        let name = trace_name(&path);
        if name.starts_with('.') || name.to_ascii_uppercase().contains("README") || !path.is_file()
        {
            continue;
        }
        files.push(path);
    }
    files.sort();
    Ok(files)
}

fn truncate_for_error(line: &str) -> String {
    const LIMIT: usize = 40;
    if line.chars().count() <= LIMIT {
        line.to_string()
    } else {
        let mut short: String = line.chars().take(LIMIT).collect();
        short.push('…');
        short
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<DeliveryTrace, TraceError> {
        DeliveryTrace::parse(Path::new("inline.trace"), text)
    }

    #[test]
    fn repeated_timestamps_are_several_packets_in_one_millisecond() {
        // 3 packets in the first 100 ms, 1 in the second, none in the third; last ts 299 closes it.
        let trace = parse("0\n0\n50\n150\n299\n").expect("valid trace");
        let series = trace.base_series().expect("series");
        assert_eq!(series.len(), 3);
        assert_eq!(series.step, BASE_STEP);
        assert_eq!(series.bits_per_second[0], 3.0 * PACKET_BITS * 10.0);
        assert_eq!(series.bits_per_second[1], PACKET_BITS * 10.0);
        assert_eq!(series.bits_per_second[2], PACKET_BITS * 10.0);
    }

    #[test]
    fn one_packet_per_millisecond_is_twelve_megabits() {
        let text: String = (0..2000).map(|ms| format!("{ms}\n")).collect();
        let trace = parse(&text).expect("valid trace");
        let one_second = trace
            .throughput_series(Duration::from_secs(1))
            .expect("series");
        assert_eq!(one_second.bits_per_second, vec![12_000_000.0, 12_000_000.0]);
        let five_seconds = trace.throughput_series(Duration::from_secs(5));
        assert!(matches!(five_seconds, Err(TraceError::TooShort { .. })));
    }

    #[test]
    fn partial_last_step_is_dropped_and_blank_lines_skipped() {
        let trace = parse("10\n\n  \n120\n150\n").expect("valid trace");
        assert_eq!(trace.packets(), 3);
        let series = trace.base_series().expect("series");
        assert_eq!(series.len(), 1, "151 ms cover one whole 100 ms step");
    }

    #[test]
    fn garbage_names_file_and_line() {
        let error = parse("1\n2\nbanana\n4\n").expect_err("garbage must fail");
        assert!(matches!(error, TraceError::NotATimestamp { line: 3, .. }));
        let message = error.to_string();
        assert!(message.contains("inline.trace"), "{message}");
        assert!(message.contains("line 3"), "{message}");
        assert!(message.contains("banana"), "{message}");
        assert!(matches!(
            parse("-5\n"),
            Err(TraceError::NotATimestamp { line: 1, .. })
        ));
        assert!(matches!(
            parse("1.5\n"),
            Err(TraceError::NotATimestamp { .. })
        ));
    }

    #[test]
    fn empty_file_is_rejected() {
        let error = parse("").expect_err("empty must fail");
        assert!(matches!(error, TraceError::Empty { .. }));
        assert!(error.to_string().contains("inline.trace"));
        assert!(matches!(parse("\n \n"), Err(TraceError::Empty { .. })));
    }

    #[test]
    fn decreasing_timestamps_are_rejected_with_line() {
        let error = parse("5\n7\n6\n").expect_err("decrease must fail");
        match &error {
            TraceError::Decreasing {
                line,
                timestamp,
                previous,
                ..
            } => assert_eq!((*line, *timestamp, *previous), (3, 6, 7)),
            other => panic!("unexpected error {other:?}"),
        }
        assert!(error.to_string().contains("line 3"));
    }

    #[test]
    fn too_short_trace_is_an_error_not_an_empty_series() {
        let trace = parse("0\n5\n").expect("valid trace");
        assert!(matches!(
            trace.base_series(),
            Err(TraceError::TooShort { .. })
        ));
    }

    #[test]
    fn missing_file_error_names_the_path() {
        let error = DeliveryTrace::load(Path::new("/nonexistent/novacron/trace.down"))
            .expect_err("missing file");
        assert!(
            error
                .to_string()
                .contains("/nonexistent/novacron/trace.down")
        );
    }

    #[test]
    fn granularity_must_be_a_multiple_of_the_base_step() {
        assert_eq!(steps_in(Duration::from_secs(5)).expect("5 s"), 50);
        assert_eq!(steps_in(Duration::from_millis(100)).expect("100 ms"), 1);
        assert!(steps_in(Duration::from_millis(150)).is_err());
        assert!(steps_in(Duration::ZERO).is_err());
    }

    #[test]
    fn drive_groups_up_and_down_traces() {
        assert_eq!(
            drive_name(Path::new("/x/ATT-LTE-driving.up")),
            "ATT-LTE-driving"
        );
        assert_eq!(
            drive_name(Path::new("ATT-LTE-driving.down")),
            "ATT-LTE-driving"
        );
        assert_eq!(drive_name(Path::new("fixed-12mbit")), "fixed-12mbit");
    }

    #[test]
    fn shared_traces_parse_into_series() {
        let directory = trace_directory();
        let files = list_trace_files(&directory).expect("shared trace directory must be readable");
        assert!(
            files.len() >= 2,
            "expected field traces in {}",
            directory.display()
        );
        for file in files {
            let trace = DeliveryTrace::load(&file).expect("shared trace parses");
            let one_second = trace
                .throughput_series(Duration::from_secs(1))
                .expect("1 s series");
            let expected_steps = trace.duration_millis() / 1000;
            assert_eq!(one_second.len() as u64, expected_steps, "{}", trace.name());
            // Every delivery opportunity in whole seconds is counted exactly once.
            let whole_packets = trace
                .delivery_millis
                .iter()
                .filter(|&&ms| ms < expected_steps * 1000)
                .count() as f64;
            let counted: f64 = one_second.bits_per_second.iter().sum::<f64>() / PACKET_BITS;
            assert!((counted - whole_packets).abs() < 1e-6, "{}", trace.name());
        }
    }
}
