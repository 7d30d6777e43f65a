//! Raft timing from measured round trips between voters (ACP in the design).
//!
//! The samples are the round trips of raft append-entries exchanges between the leader and the
//! voters that got a reply, as the transport measures them (network RTT plus the follower's log
//! append). An exchange that failed or hit its deadline (at least 500 ms) is not a sample: it
//! says a host is cut off or down, which elections handle, and counted it would slow the
//! region's failure detection for as long as the host stays away.
//!
//! The rule ([`raft_timing_for_round_trips`]):
//! - Take the 99th percentile of the samples (one slow outlier does not set the pace; sustained
//!   jitter or slow appends do).
//! - **Heartbeat = twice that, rounded up to 10 ms, clamped to [50 ms, 1 s].** openraft 0.9
//!   has one append-entries exchange in flight per follower, heartbeats included, so a heartbeat
//!   shorter than a loaded round trip only queues behind the previous one; twice the p99 leaves
//!   room, and no more, since failure detection is a multiple of it. 50 ms keeps a LAN region
//!   from spending its CPU on heartbeats; 1 s bounds detection on absurd links.
//! - **Election timeout = 10 to 15 heartbeats.** A follower campaigns only after about ten
//!   heartbeats in a row failed to arrive, so loss and jitter on a 40 ms link do not cause
//!   elections (the 5-heartbeat width of the random range keeps candidates from splitting the
//!   vote). A LAN region fails over in 0.5 to 0.75 s plus one election; a region over 40 ms
//!   links (heartbeat 100 ms) in 1 to 1.5 s; a 180 ms link (heartbeat 370 ms) in 3.7 to 5.6 s.
//!
//! How it applies: the leader computes it from the RTTs it measures and stores it under
//! [`RAFT_TIMING_KEY`] (only when [`timing_change_is_worth_applying`] says it moved enough);
//! every host reads that record with its heartbeat and runs raft on it at once
//! (`Store::set_timing`: NovaCron, not openraft, drives heartbeats and elections, see
//! `novacron_store::timers`), and mirrors it into `<data dir>/raft-timing.json`
//! ([`write_timing_file`]), read before the store opens at the next start
//! ([`read_timing_file`]); a joining host gets it with its join grant. What only a start sets is
//! the deadline of an append-entries exchange, the longer of the heartbeat and 500 ms
//! (`novacron_store::timers::rpc_deadline`): a round trip longer than 500 ms needs a restart to
//! be waited for. Hosts with different timings in one region are safe (raft's correctness does
//! not depend on timing), only less well tuned.

use std::path::Path;
use std::time::Duration;

use novacron_store::{Consistency, RaftTiming, Transaction};
use serde::{Deserialize, Serialize};

use crate::cluster_store::ClusterStore;
use crate::error::{ClusterError, Result};

/// Shortest heartbeat interval.
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(50);
/// Longest heartbeat interval.
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(1);
/// Election timeout lower bound, in heartbeats.
pub const ELECTION_MIN_HEARTBEATS: u32 = 10;
/// Election timeout upper bound, in heartbeats.
pub const ELECTION_MAX_HEARTBEATS: u32 = 15;
/// Store key of the region's recommended timing.
pub const RAFT_TIMING_KEY: &str = "cluster/raft-timing";
/// File in a host's data directory mirroring the record.
pub const RAFT_TIMING_FILE: &str = "raft-timing.json";

const ROUNDING: Duration = Duration::from_millis(10);

/// The 99th percentile (nearest rank) of `samples`; `None` when there are none.
pub fn round_trip_percentile_99(samples: &[Duration]) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = (sorted.len() * 99).div_ceil(100).max(1);
    Some(sorted[rank - 1])
}

/// Raft timing for the measured round trips between voters (see the module docs for the rule).
/// With no samples (a single host, or nothing measured yet) it is the LAN timing.
pub fn raft_timing_for_round_trips(samples: &[Duration]) -> RaftTiming {
    let round_trip = round_trip_percentile_99(samples).unwrap_or(Duration::ZERO);
    let steps = round_trip
        .saturating_mul(2)
        .as_nanos()
        .div_ceil(ROUNDING.as_nanos());
    let rounded = ROUNDING.saturating_mul(u32::try_from(steps).unwrap_or(u32::MAX));
    let heartbeat = rounded.clamp(MIN_HEARTBEAT, MAX_HEARTBEAT);
    RaftTiming {
        heartbeat_interval: heartbeat,
        election_timeout_min: heartbeat * ELECTION_MIN_HEARTBEATS,
        election_timeout_max: heartbeat * ELECTION_MAX_HEARTBEATS,
    }
}

/// Whether moving from `current` to `proposed` is worth applying on every host: only when the
/// heartbeat changes by a quarter or more, so RTT noise does not churn the region.
pub fn timing_change_is_worth_applying(current: &RaftTiming, proposed: &RaftTiming) -> bool {
    let now = current.heartbeat_interval.as_secs_f64();
    let next = proposed.heartbeat_interval.as_secs_f64();
    if now <= 0.0 {
        return next > 0.0;
    }
    ((next - now) / now).abs() >= 0.25
}

/// The stored form of a timing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftTimingRecord {
    /// Format version (1).
    pub format_version: u32,
    /// Heartbeat interval.
    pub heartbeat_ms: u64,
    /// Election timeout lower bound.
    pub election_timeout_min_ms: u64,
    /// Election timeout upper bound.
    pub election_timeout_max_ms: u64,
    /// The 99th-percentile RTT it was derived from, microseconds.
    pub measured_round_trip_p99_us: u64,
    /// How many samples.
    pub samples: u64,
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl RaftTimingRecord {
    /// A record for `samples` and the timing derived from them.
    pub fn from_samples(samples: &[Duration]) -> RaftTimingRecord {
        let timing = raft_timing_for_round_trips(samples);
        RaftTimingRecord {
            format_version: 1,
            heartbeat_ms: millis(timing.heartbeat_interval),
            election_timeout_min_ms: millis(timing.election_timeout_min),
            election_timeout_max_ms: millis(timing.election_timeout_max),
            measured_round_trip_p99_us: round_trip_percentile_99(samples)
                .map_or(0, |rtt| u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX)),
            samples: samples.len() as u64,
        }
    }

    /// The timing, checked (a damaged record must not stall raft).
    pub fn timing(&self) -> Result<RaftTiming> {
        let invalid = |reason: &str| ClusterError::InvalidRecord {
            key: RAFT_TIMING_KEY.into(),
            reason: reason.to_string(),
        };
        if self.format_version != 1 {
            return Err(invalid(&format!(
                "format version {} (this build reads 1)",
                self.format_version
            )));
        }
        let heartbeat = Duration::from_millis(self.heartbeat_ms);
        if heartbeat < MIN_HEARTBEAT || heartbeat > MAX_HEARTBEAT {
            return Err(invalid("heartbeat outside 50 ms..1 s"));
        }
        if self.election_timeout_min_ms <= self.heartbeat_ms
            || self.election_timeout_max_ms <= self.election_timeout_min_ms
        {
            return Err(invalid(
                "election timeouts must exceed the heartbeat and form a range",
            ));
        }
        Ok(RaftTiming {
            heartbeat_interval: heartbeat,
            election_timeout_min: Duration::from_millis(self.election_timeout_min_ms),
            election_timeout_max: Duration::from_millis(self.election_timeout_max_ms),
        })
    }
}

/// Stores the region's recommended timing (leader side).
pub async fn store_raft_timing(cluster: &ClusterStore, record: &RaftTimingRecord) -> Result<()> {
    record.timing()?;
    let value = serde_json::to_vec(record).map_err(|error| ClusterError::InvalidRecord {
        key: RAFT_TIMING_KEY.into(),
        reason: error.to_string(),
    })?;
    cluster
        .transaction(Transaction::new().put(RAFT_TIMING_KEY, value))
        .await?;
    Ok(())
}

/// The region's recommended timing, if one was stored.
pub async fn load_raft_timing(cluster: &ClusterStore) -> Result<Option<RaftTimingRecord>> {
    let Some(item) = cluster.get(RAFT_TIMING_KEY, Consistency::Local).await? else {
        return Ok(None);
    };
    let record: RaftTimingRecord =
        serde_json::from_slice(&item.value).map_err(|error| ClusterError::InvalidRecord {
            key: RAFT_TIMING_KEY.into(),
            reason: error.to_string(),
        })?;
    record.timing()?;
    Ok(Some(record))
}

/// Writes the record into `data_dir` (atomically: temp file then rename).
pub fn write_timing_file(data_dir: &Path, record: &RaftTimingRecord) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    let temporary = data_dir.join(format!("{RAFT_TIMING_FILE}.tmp"));
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, data_dir.join(RAFT_TIMING_FILE))
}

/// The timing to open the store with: the file's if present and valid, else the LAN timing. A
/// damaged file is reported and ignored (timing never decides correctness).
pub fn read_timing_file(data_dir: &Path) -> RaftTiming {
    let path = data_dir.join(RAFT_TIMING_FILE);
    let Ok(bytes) = std::fs::read(&path) else {
        return raft_timing_for_round_trips(&[]);
    };
    match serde_json::from_slice::<RaftTimingRecord>(&bytes)
        .map_err(|error| error.to_string())
        .and_then(|record| record.timing().map_err(|error| error.to_string()))
    {
        Ok(timing) => timing,
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "ignoring invalid raft timing file");
            raft_timing_for_round_trips(&[])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(value: u64) -> Duration {
        Duration::from_millis(value)
    }

    #[test]
    fn a_lan_gets_the_floor_and_fails_over_in_under_a_second() {
        let timing = raft_timing_for_round_trips(&[Duration::from_micros(200); 100]);
        assert_eq!(timing.heartbeat_interval, ms(50));
        assert_eq!(timing.election_timeout_min, ms(500));
        assert_eq!(timing.election_timeout_max, ms(750));
        assert_eq!(raft_timing_for_round_trips(&[]), timing);
    }

    #[test]
    fn a_wan_region_gets_timing_that_tolerates_its_round_trips() {
        // 40 ms links with jitter up to 48 ms: appends keep a 2x margin under their deadline.
        let samples: Vec<Duration> = (0..200).map(|index| ms(40 + index % 9)).collect();
        let timing = raft_timing_for_round_trips(&samples);
        assert_eq!(timing.heartbeat_interval, ms(100));
        assert!(timing.election_timeout_min >= samples.iter().max().unwrap().saturating_mul(10));
        // 180 ms intercontinental links.
        let timing = raft_timing_for_round_trips(&[ms(180), ms(175), ms(183)]);
        assert_eq!(timing.heartbeat_interval, ms(370));
        assert_eq!(timing.election_timeout_min, ms(3700));
        assert_eq!(timing.election_timeout_max, ms(5550));
        // Absurd links are capped.
        let timing = raft_timing_for_round_trips(&[Duration::from_secs(5)]);
        assert_eq!(timing.heartbeat_interval, MAX_HEARTBEAT);
    }

    #[test]
    fn one_outlier_does_not_set_the_pace() {
        let mut samples = vec![ms(20); 199];
        samples.push(ms(900));
        assert_eq!(round_trip_percentile_99(&samples), Some(ms(20)));
        assert_eq!(
            raft_timing_for_round_trips(&samples).heartbeat_interval,
            ms(50)
        );
        // Appends that keep hitting a 50 ms deadline double the heartbeat.
        let mut samples = vec![ms(10); 90];
        samples.extend(vec![ms(50); 10]);
        assert_eq!(
            raft_timing_for_round_trips(&samples).heartbeat_interval,
            ms(100)
        );
    }

    #[test]
    fn every_derived_timing_is_accepted_by_the_store_and_restarts_need_a_real_change() {
        for rtt in [0, 1, 49, 51, 120, 333, 999, 1000, 5000] {
            let record = RaftTimingRecord::from_samples(&[ms(rtt)]);
            let timing = record.timing().expect("valid");
            assert!(timing.election_timeout_min > timing.heartbeat_interval);
        }
        let lan = raft_timing_for_round_trips(&[ms(1)]);
        assert!(!timing_change_is_worth_applying(
            &lan,
            &raft_timing_for_round_trips(&[ms(29)])
        ));
        assert!(timing_change_is_worth_applying(
            &lan,
            &raft_timing_for_round_trips(&[ms(40)])
        ));
    }

    #[test]
    fn the_timing_file_round_trips_and_a_damaged_one_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            read_timing_file(dir.path()),
            raft_timing_for_round_trips(&[])
        );
        let record = RaftTimingRecord::from_samples(&[ms(200)]);
        write_timing_file(dir.path(), &record).expect("write");
        assert_eq!(read_timing_file(dir.path()), record.timing().unwrap());
        std::fs::write(dir.path().join(RAFT_TIMING_FILE), b"{\"heartbeat_ms\":").unwrap();
        assert_eq!(
            read_timing_file(dir.path()),
            raft_timing_for_round_trips(&[])
        );
        let mut bad = record.clone();
        bad.heartbeat_ms = 5;
        assert!(bad.timing().is_err());
    }
}
