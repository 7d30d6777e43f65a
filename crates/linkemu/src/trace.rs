//! Delivery-opportunity traces in the mahimahi / Saturator format: one line per opportunity for
//! one 1500-byte packet to leave the bottleneck, as milliseconds since the trace start; a
//! repeated timestamp means several opportunities in that millisecond. The trace repeats with a
//! period equal to its last timestamp, as `mm-link` does. This module only parses and answers
//! "when is opportunity k"; it does no IO besides reading the file.

use std::path::{Path, PathBuf};

use crate::error::LinkError;

/// Bytes one delivery opportunity may carry.
pub const OPPORTUNITY_BYTES: u32 = 1500;

const NANOSECONDS_PER_MILLISECOND: u64 = 1_000_000;

/// A parsed trace: sorted opportunity timestamps (ms) and the loop period (ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryTrace {
    origin: PathBuf,
    opportunities_ms: Vec<u64>,
    period_ms: u64,
}

impl DeliveryTrace {
    /// Reads and parses a trace file.
    pub fn from_file(path: &Path) -> Result<Self, LinkError> {
        let text = std::fs::read_to_string(path).map_err(|source| LinkError::TraceRead {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses trace text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, LinkError> {
        let mut opportunities_ms = Vec::new();
        for (line_index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let timestamp: u64 = line.parse().map_err(|_| LinkError::TraceFormat {
                path: origin.to_owned(),
                line: line_index + 1,
                reason: format!("{line:?} is not a whole number of milliseconds"),
            })?;
            if let Some(&previous) = opportunities_ms.last()
                && timestamp < previous
            {
                return Err(LinkError::TraceFormat {
                    path: origin.to_owned(),
                    line: line_index + 1,
                    reason: format!("timestamp {timestamp} is earlier than {previous}"),
                });
            }
            opportunities_ms.push(timestamp);
        }
        let period_ms = opportunities_ms.last().copied().unwrap_or(0);
        if period_ms == 0 {
            return Err(LinkError::TraceFormat {
                path: origin.to_owned(),
                line: 0,
                reason: "trace is empty or its last timestamp is 0, so it cannot loop".to_owned(),
            });
        }
        Ok(Self {
            origin: origin.to_owned(),
            opportunities_ms,
            period_ms,
        })
    }

    /// Where the trace came from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// Number of opportunities in one period.
    pub fn opportunities_per_period(&self) -> u64 {
        self.opportunities_ms.len() as u64
    }

    /// Length of one period.
    pub fn period_ms(&self) -> u64 {
        self.period_ms
    }

    /// Mean capacity over one period, counting 1500 bytes per opportunity.
    pub fn average_bits_per_second(&self) -> f64 {
        self.opportunities_per_period() as f64 * f64::from(OPPORTUNITY_BYTES) * 8.0
            / (self.period_ms as f64 / 1000.0)
    }

    /// Time of opportunity `index` (counting across loops), in ns since the trace start.
    pub fn opportunity_time_ns(&self, index: u64) -> u64 {
        let per_period = self.opportunities_per_period();
        let loop_number = index / per_period;
        let within = (index % per_period) as usize;
        (loop_number * self.period_ms + self.opportunities_ms[within]) * NANOSECONDS_PER_MILLISECOND
    }

    /// Index of the first opportunity at or after `time_ns`.
    pub fn first_opportunity_at_or_after(&self, time_ns: u64) -> u64 {
        let period_ns = self.period_ms * NANOSECONDS_PER_MILLISECOND;
        // The last opportunity of loop L is at (L + 1) * period, so pick the loop whose end is
        // the first at or after `time_ns`.
        let loop_number = time_ns.saturating_sub(1) / period_ns;
        let within_ns = time_ns - loop_number * period_ns;
        let within = self
            .opportunities_ms
            .partition_point(|&ms| ms * NANOSECONDS_PER_MILLISECOND < within_ns);
        loop_number * self.opportunities_per_period() + within as u64
    }

    /// Number of opportunities whose time falls in `[start_ns, end_ns)`.
    pub fn opportunities_between(&self, start_ns: u64, end_ns: u64) -> u64 {
        self.first_opportunity_at_or_after(end_ns)
            .saturating_sub(self.first_opportunity_at_or_after(start_ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(text: &str) -> DeliveryTrace {
        DeliveryTrace::parse(text, Path::new("test")).expect("valid trace")
    }

    #[test]
    fn single_line_trace_is_one_packet_per_millisecond() {
        let trace = trace("1\n");
        assert_eq!(trace.opportunity_time_ns(0), 1_000_000);
        assert_eq!(trace.opportunity_time_ns(9), 10_000_000);
        assert!((trace.average_bits_per_second() - 12_000_000.0).abs() < 1.0);
        assert_eq!(trace.opportunities_between(0, 1_000_000_000), 999);
    }

    #[test]
    fn repeated_timestamps_are_several_opportunities_and_the_trace_loops() {
        let trace = trace("2\n2\n2\n5\n");
        assert_eq!(trace.opportunity_time_ns(2), 2_000_000);
        assert_eq!(trace.opportunity_time_ns(3), 5_000_000);
        assert_eq!(trace.opportunity_time_ns(4), 7_000_000);
        assert_eq!(trace.first_opportunity_at_or_after(2_000_001), 3);
        assert_eq!(trace.first_opportunity_at_or_after(5_500_000), 4);
    }

    #[test]
    fn malformed_traces_are_errors_naming_the_line() {
        let error = DeliveryTrace::parse("1\nx\n", Path::new("t")).expect_err("bad line");
        assert!(error.to_string().contains("line 2"), "{error}");
        assert!(DeliveryTrace::parse("5\n3\n", Path::new("t")).is_err());
        assert!(DeliveryTrace::parse("", Path::new("t")).is_err());
        assert!(DeliveryTrace::parse("0\n0\n", Path::new("t")).is_err());
    }

    #[test]
    fn shipped_cellular_traces_parse() {
        let beside =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/bandwidth-traces");
        let directory = std::env::var_os("NOVACRON_TRACE_DIR")
            .map(std::path::PathBuf::from)
            .into_iter()
            .chain([beside, "/work/shared/data/bandwidth-traces".into()])
            .find(|directory| directory.is_dir())
            .expect("the shared traces: set NOVACRON_TRACE_DIR to shared/data/bandwidth-traces");
        let entries = std::fs::read_dir(&directory).expect("list the traces");
        let mut parsed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if extension == "up" || extension == "down" {
                let trace = DeliveryTrace::from_file(&path).expect("shipped trace parses");
                assert!(trace.average_bits_per_second() > 10_000.0, "{path:?}");
                parsed += 1;
            }
        }
        assert!(
            parsed >= 7,
            "found {parsed} traces in {}",
            directory.display()
        );
    }
}
