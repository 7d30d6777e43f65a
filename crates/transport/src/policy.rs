//! How many parallel bulk connections a session uses, and how its pacing limit follows a
//! forecast: pure policies, no IO and no clock.
//!
//! Start from the bandwidth-delay product divided by what one TCP connection can keep in flight
//! (its maximum send buffer), then probe: add a connection, measure the total rate over the next
//! interval, keep adding while the rate rises by at least `growth_threshold`, and settle when it
//! does not; when the rate fell with the connection just added (`retreat_below` of the rate
//! before it over a decision, or `abort_below` in any one interval), close that connection
//! again. A settled session probes again only if the rate later falls well below what it
//! settled at (the path changed). Measurements taken while the application offered too little
//! data say nothing about the path and are ignored, as is the first interval after a change
//! (a new connection needs a few round trips to ramp up). Rates measured over one interval are
//! noisy (acknowledgements arrive in bursts, the CPU is shared), so every decision compares the
//! mean of `samples_per_decision` intervals.

/// The first stream count: enough connections to cover the bandwidth-delay product when each can
/// keep `per_connection_window_bytes` in flight.
pub fn initial_stream_count(
    bandwidth_bytes_per_second: f64,
    round_trip_seconds: f64,
    per_connection_window_bytes: u64,
    minimum_streams: u32,
    maximum_streams: u32,
) -> u32 {
    let bandwidth_delay_product = (bandwidth_bytes_per_second * round_trip_seconds).max(0.0);
    let window = per_connection_window_bytes.max(1) as f64;
    let estimate = (bandwidth_delay_product / window).ceil();
    let estimate = if estimate.is_finite() {
        estimate.min(f64::from(u32::MAX)) as u32
    } else {
        maximum_streams
    };
    estimate.clamp(
        minimum_streams.max(1),
        maximum_streams.max(minimum_streams.max(1)),
    )
}

/// Connections a session starts with so that a long fast path fills soon: one per
/// `share_bytes` of the bandwidth-delay product, at most [`STARTUP_STREAMS_MAX`] (0 bytes: 1).
///
/// Each TCP connection starts from ten packets and doubles per round trip, and BBR leaves its
/// start-up late when a connection runs short of data; several connections fill the path a
/// round trip or two sooner and share its random losses. At 1 Gbit/s, 50 ms and 0.5 % loss
/// (6.25 MB in flight), 2 GiB took 19.2-19.4 s over one connection, 19.1-19.5 over two, and
/// 18.8-19.0 over four or eight (bench/transport/README.md, "Four connections from the start").
pub fn startup_stream_count(
    bandwidth_bytes_per_second: f64,
    round_trip_seconds: f64,
    share_bytes: u64,
) -> u32 {
    if share_bytes == 0 {
        return 1;
    }
    let bandwidth_delay_product = (bandwidth_bytes_per_second * round_trip_seconds).max(0.0);
    let estimate = (bandwidth_delay_product / share_bytes as f64).ceil();
    if estimate.is_finite() {
        (estimate.min(f64::from(STARTUP_STREAMS_MAX)) as u32).max(1)
    } else {
        STARTUP_STREAMS_MAX
    }
}

/// Bandwidth-delay product per start-up connection: 1 Gbit/s at 50 ms starts four, 100 Mbit/s
/// at 50 ms one.
pub const DEFAULT_STARTUP_SHARE_BYTES: u64 = 3 << 19;

/// Most connections [`startup_stream_count`] asks for: four and eight did equally well at
/// 1 Gbit/s, and each adds queueing delay the control channel shares.
pub const STARTUP_STREAMS_MAX: u32 = 4;

/// The pacing limit for a link forecast to carry `forecast_bytes_per_second` of payload: a
/// little above it ([`PACING_HEADROOM`]). See [`raised_pacing_limit`] for how it follows a link
/// that carries more.
///
/// Why a limit at all: BBR's start-up paces at 2.89 times the rate it has measured until three
/// round trips without growth show the pipe full, and rounds in which the connection ran out of
/// data do not count. A session's connections run out often (the ordered stream waits for a
/// frame lost on another connection; the send window holds), so at 1 Gbit/s, 50 ms RTT and
/// 0.5 % loss they stayed in start-up for seconds, overfilled the link's queue and resent a
/// tenth of what they sent, the link's use dipping to 600-800 Mbit/s every other quarter
/// second; plain TCP connections never short of data (QEMU's multifd behind relays) left
/// start-up within 1.5 s. Capped at 1.1-1.2 times the link, the link stayed at 1000 Mbit/s
/// (bench/migration/README.md, "BBR's start-up and the pacing limit").
///
/// Never below [`PACING_LIMIT_FLOOR`]: the limit guards fast paths against start-up's
/// overshoot, and a forecast far below that (a slow link, or one the model measured while the
/// link was cut) would only hold back a link that recovered, at first by a lot: a limit of a
/// few kilobytes per second takes longer than a measurement interval to send one frame, so no
/// measurement could show it full.
pub fn pacing_limit_for(forecast_bytes_per_second: f64) -> u64 {
    ((forecast_bytes_per_second.max(0.0) * PACING_HEADROOM) as u64).max(PACING_LIMIT_FLOOR)
}

/// The lowest pacing limit set from a forecast: 100 Mbit/s (BBR's start-up overshoot hurt at
/// 1 Gbit/s; from this floor a link of 1 Gbit/s is reached in six raises).
pub const PACING_LIMIT_FLOOR: u64 = 12_500_000;

/// The pacing limit over a forecast's rate: a forecast made from earlier transfers runs about a
/// tenth below the link (their start-up is in it), and an even share of 1.1-1.4 times the link
/// per connection kept two connections out of each other's way.
pub const PACING_HEADROOM: f64 = 1.35;
/// Share of the limit a measured rate reaches when the limit, not the link, holds it: payload is
/// at most about 0.95 of what is paced, and at 0.5 % loss 0.8-0.87 (a connection in loss
/// recovery leaves its share of the limit unused); at a link as forecast, about 0.74. (At 0.9,
/// a limit below a lossy link was never raised.)
pub const PACING_FULL: f64 = 0.8;
/// How often the session compares its payload rate with its pacing limit: a few round trips
/// of a long path, so a limit below the link rises within the first second of a transfer
/// instead of once per `measurement_interval` (a second: a 150 MiB transfer at 1 Gbit/s, 50 ms
/// and 0.5 % loss paced at 540 Mbit/s first rose after two seconds and took 2.9 s instead
/// of 2.0).
pub const PACING_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);
/// How much a full limit rises at once: six steps reach eight times the forecast.
pub const PACING_RAISE: f64 = 1.5;

/// The raised limit when the payload rate measured over an interval (`rate_bytes_per_second`)
/// shows the limit holding the session back (the link carries more than forecast); `None`
/// keeps it.
pub fn raised_pacing_limit(limit: u64, rate_bytes_per_second: f64) -> Option<u64> {
    (rate_bytes_per_second >= PACING_FULL * limit as f64)
        .then_some((limit as f64 * PACING_RAISE) as u64)
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StreamCountPolicyConfig {
    pub minimum_streams: u32,
    pub maximum_streams: u32,
    /// Relative rate gain that justifies the connection just added (1.15 = +15 %). Set well above
    /// the noise of a mean of `samples_per_decision` intervals: a needless connection adds queueing
    /// delay that the control channel shares.
    pub growth_threshold: f64,
    /// A settled session probes again when the rate falls below this share of its settled rate.
    pub reprobe_below_share: f64,
    /// Intervals averaged into one decision (at least 1).
    pub samples_per_decision: u32,
    /// A decision's mean rate below this share of the rate before the last addition closes
    /// that connection again (0.95: it cost 5 %).
    pub retreat_below: f64,
    /// One interval's rate below this share of the rate before the last addition closes that
    /// connection at once, without waiting for a whole decision: a probe that hurts costs the
    /// transfer every second it lasts (a second BBR connection at 1 Gbit/s with 0.5 % loss cut
    /// a migration's rate by 15-35 %).
    pub abort_below: f64,
}

impl Default for StreamCountPolicyConfig {
    fn default() -> StreamCountPolicyConfig {
        StreamCountPolicyConfig {
            minimum_streams: 1,
            maximum_streams: 16,
            growth_threshold: 1.15,
            reprobe_below_share: 0.6,
            samples_per_decision: 3,
            retreat_below: 0.95,
            abort_below: 0.75,
        }
    }
}

/// One rate measurement over an interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateMeasurement {
    /// Bulk connections open during the whole interval.
    pub streams: u32,
    pub bytes_per_second: f64,
    /// The application had more data than the transport could carry (the send window was full at
    /// some point, or data kept arriving): only then does the rate reflect the path.
    pub demand_exceeded_capacity: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamCountDecision {
    Hold,
    /// Open this many more bulk connections.
    Add(u32),
    /// Close this many of the bulk connections added last.
    Remove(u32),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PolicyPhase {
    /// Adding connections; holds the rate measured before the last addition.
    Probing { rate_before_addition: Option<f64> },
    /// Adding no more; holds the rate it settled at.
    Settled { settled_rate: f64 },
}

#[derive(Clone, Debug)]
pub struct StreamCountPolicy {
    config: StreamCountPolicyConfig,
    phase: PolicyPhase,
    skip_next_measurement: bool,
    samples: Vec<f64>,
}

impl StreamCountPolicy {
    pub fn new(config: StreamCountPolicyConfig) -> StreamCountPolicy {
        StreamCountPolicy {
            config,
            phase: PolicyPhase::Probing {
                rate_before_addition: None,
            },
            skip_next_measurement: true,
            samples: Vec::new(),
        }
    }

    pub fn phase(&self) -> PolicyPhase {
        self.phase
    }

    pub fn on_measurement(&mut self, measurement: RateMeasurement) -> StreamCountDecision {
        if !measurement.demand_exceeded_capacity || !measurement.bytes_per_second.is_finite() {
            return StreamCountDecision::Hold;
        }
        if self.skip_next_measurement {
            self.skip_next_measurement = false;
            return StreamCountDecision::Hold;
        }
        self.samples.push(measurement.bytes_per_second);
        if let PolicyPhase::Probing {
            rate_before_addition: Some(before),
        } = self.phase
            && measurement.bytes_per_second < before * self.config.abort_below
        {
            return self.retreat(before, measurement.streams);
        }
        if self.samples.len() < self.config.samples_per_decision.max(1) as usize {
            return StreamCountDecision::Hold;
        }
        let rate = self.samples.iter().sum::<f64>() / self.samples.len() as f64;
        self.samples.clear();
        let at_maximum = measurement.streams >= self.config.maximum_streams;
        match self.phase {
            PolicyPhase::Probing {
                rate_before_addition,
            } => {
                let improved = match rate_before_addition {
                    None => true,
                    Some(before) => rate >= before * self.config.growth_threshold,
                };
                if improved && !at_maximum {
                    self.phase = PolicyPhase::Probing {
                        rate_before_addition: Some(rate),
                    };
                    self.skip_next_measurement = true;
                    StreamCountDecision::Add(1)
                } else if let Some(before) = rate_before_addition
                    && rate < before * self.config.retreat_below
                {
                    self.retreat(before, measurement.streams)
                } else {
                    self.phase = PolicyPhase::Settled {
                        settled_rate: rate.max(rate_before_addition.unwrap_or(0.0)),
                    };
                    StreamCountDecision::Hold
                }
            }
            PolicyPhase::Settled { settled_rate } => {
                if rate < settled_rate * self.config.reprobe_below_share && !at_maximum {
                    self.phase = PolicyPhase::Probing {
                        rate_before_addition: Some(rate),
                    };
                    self.skip_next_measurement = true;
                    StreamCountDecision::Add(1)
                } else {
                    StreamCountDecision::Hold
                }
            }
        }
    }
}

impl StreamCountPolicy {
    /// Closes the connection added last (when above the minimum) and settles at the rate
    /// measured before it.
    fn retreat(&mut self, before: f64, streams: u32) -> StreamCountDecision {
        self.samples.clear();
        self.phase = PolicyPhase::Settled {
            settled_rate: before,
        };
        if streams > self.config.minimum_streams.max(1) {
            self.skip_next_measurement = true;
            StreamCountDecision::Remove(1)
        } else {
            StreamCountDecision::Hold
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacing_limit_starts_above_the_forecast_and_rises_only_while_it_holds_the_rate() {
        // 1 Gbit/s forecast (bytes per second of payload).
        let first = pacing_limit_for(125e6);
        assert!(
            first > 125_000_000 && first < 200_000_000,
            "a little above the forecast: {first}"
        );
        // A forecast of a cut or crawling link does not hold a recovered one back for long.
        assert_eq!(pacing_limit_for(0.0), PACING_LIMIT_FLOOR);
        assert_eq!(pacing_limit_for(1e3), PACING_LIMIT_FLOOR);
        // A link as forecast (or slower): the limit stays.
        for rate in [0.0, 125e6, 0.78 * first as f64] {
            assert_eq!(raised_pacing_limit(first, rate), None, "{rate}");
        }
        // A faster link fills the limit: it rises by half, step after step, until the link
        // (10 Gbit/s here) stops filling it.
        let link: f64 = 1.25e9;
        let mut limit = first;
        let mut steps = 0;
        while let Some(raised) = raised_pacing_limit(limit, link.min(0.95 * limit as f64)) {
            assert_eq!(raised, (limit as f64 * PACING_RAISE) as u64);
            limit = raised;
            steps += 1;
        }
        assert!(
            steps <= 6,
            "{steps} steps to a link eight times the forecast"
        );
        assert!(
            link < PACING_FULL * limit as f64,
            "the limit ends above the link: {limit}"
        );
    }

    /// One decision's worth of identical samples; returns the last decision.
    fn decide(policy: &mut StreamCountPolicy, streams: u32, rate: f64) -> StreamCountDecision {
        let mut decision = StreamCountDecision::Hold;
        for _ in 0..StreamCountPolicyConfig::default().samples_per_decision {
            decision = policy.on_measurement(measured(streams, rate));
        }
        decision
    }

    fn measured(streams: u32, bytes_per_second: f64) -> RateMeasurement {
        RateMeasurement {
            streams,
            bytes_per_second,
            demand_exceeded_capacity: true,
        }
    }

    #[test]
    fn a_long_fast_path_starts_with_more_connections() {
        let share = DEFAULT_STARTUP_SHARE_BYTES;
        // 1 Gbit/s at 50 ms: 6.25 MB in flight.
        assert_eq!(startup_stream_count(125e6, 0.05, share), 4);
        // 100 Mbit/s at 50 ms, and a LAN: one connection fills them soon enough.
        assert_eq!(startup_stream_count(12.5e6, 0.05, share), 1);
        assert_eq!(startup_stream_count(125e6, 0.0005, share), 1);
        // 300 Mbit/s at 50 ms: 1.9 MB.
        assert_eq!(startup_stream_count(37.5e6, 0.05, share), 2);
        // Capped; and nonsense input still gives a usable count.
        assert_eq!(
            startup_stream_count(1.25e9, 0.2, share),
            STARTUP_STREAMS_MAX
        );
        assert_eq!(
            startup_stream_count(f64::INFINITY, 1.0, share),
            STARTUP_STREAMS_MAX
        );
        assert_eq!(startup_stream_count(f64::NAN, 0.05, share), 1);
        assert_eq!(startup_stream_count(-1.0, 0.05, share), 1);
        // Turned off.
        assert_eq!(startup_stream_count(125e6, 0.05, 0), 1);
    }

    #[test]
    fn initial_estimate_covers_the_bandwidth_delay_product() {
        // 1 Gbit/s, 50 ms: 6.25 MB in flight; 4 MiB per connection needs 2.
        assert_eq!(initial_stream_count(125e6, 0.05, 4 << 20, 1, 16), 2);
        // 100 Mbit/s, 50 ms: 625 kB fits in one connection.
        assert_eq!(initial_stream_count(12.5e6, 0.05, 4 << 20, 1, 16), 1);
        // 10 Gbit/s, 200 ms, clamped to the maximum.
        assert_eq!(initial_stream_count(1.25e9, 0.2, 4 << 20, 1, 16), 16);
        assert_eq!(initial_stream_count(f64::NAN, 0.05, 0, 2, 8), 2);
        assert_eq!(initial_stream_count(f64::INFINITY, 1.0, 1, 1, 8), 8);
    }

    #[test]
    fn adds_streams_while_the_rate_rises_and_settles_when_it_stops() {
        let mut policy = StreamCountPolicy::new(StreamCountPolicyConfig::default());
        assert_eq!(
            policy.on_measurement(measured(2, 9e6)),
            StreamCountDecision::Hold,
            "warm-up"
        );
        assert_eq!(decide(&mut policy, 2, 50e6), StreamCountDecision::Add(1));
        assert_eq!(
            policy.on_measurement(measured(3, 60e6)),
            StreamCountDecision::Hold,
            "ramp"
        );
        assert_eq!(decide(&mut policy, 3, 75e6), StreamCountDecision::Add(1));
        assert_eq!(
            policy.on_measurement(measured(4, 75e6)),
            StreamCountDecision::Hold,
            "ramp"
        );
        assert_eq!(decide(&mut policy, 4, 78e6), StreamCountDecision::Hold);
        assert_eq!(policy.phase(), PolicyPhase::Settled { settled_rate: 78e6 });
        assert_eq!(decide(&mut policy, 4, 80e6), StreamCountDecision::Hold);
    }

    #[test]
    fn one_noisy_interval_does_not_justify_a_stream() {
        let mut policy = StreamCountPolicy::new(StreamCountPolicyConfig::default());
        policy.on_measurement(measured(1, 10e6));
        assert_eq!(decide(&mut policy, 1, 90e6), StreamCountDecision::Add(1));
        policy.on_measurement(measured(2, 60e6));
        // 125, 70, 90: a spike, mean 95, not 15 % above 90.
        assert_eq!(
            policy.on_measurement(measured(2, 125e6)),
            StreamCountDecision::Hold
        );
        assert_eq!(
            policy.on_measurement(measured(2, 70e6)),
            StreamCountDecision::Hold
        );
        assert_eq!(
            policy.on_measurement(measured(2, 90e6)),
            StreamCountDecision::Hold
        );
        assert!(matches!(policy.phase(), PolicyPhase::Settled { .. }));
    }

    #[test]
    fn idle_application_measurements_are_ignored() {
        let mut policy = StreamCountPolicy::new(StreamCountPolicyConfig::default());
        let idle = RateMeasurement {
            streams: 1,
            bytes_per_second: 1.0,
            demand_exceeded_capacity: false,
        };
        for _ in 0..10 {
            assert_eq!(policy.on_measurement(idle), StreamCountDecision::Hold);
        }
        assert_eq!(
            policy.phase(),
            PolicyPhase::Probing {
                rate_before_addition: None
            }
        );
    }

    #[test]
    fn never_exceeds_the_maximum() {
        let config = StreamCountPolicyConfig {
            maximum_streams: 3,
            ..StreamCountPolicyConfig::default()
        };
        let mut policy = StreamCountPolicy::new(config);
        let mut streams = 1;
        let mut rate = 10e6;
        for _ in 0..20 {
            if let StreamCountDecision::Add(count) = policy.on_measurement(measured(streams, rate))
            {
                streams += count;
            }
            rate *= 2.0;
        }
        assert_eq!(streams, 3);
    }

    #[test]
    fn a_connection_that_lowered_the_rate_is_closed_again() {
        // Over a whole decision: 100 before, 90 with the probe.
        let mut policy = StreamCountPolicy::new(StreamCountPolicyConfig::default());
        policy.on_measurement(measured(1, 50e6));
        assert_eq!(decide(&mut policy, 1, 100e6), StreamCountDecision::Add(1));
        policy.on_measurement(measured(2, 80e6));
        assert_eq!(decide(&mut policy, 2, 90e6), StreamCountDecision::Remove(1));
        assert_eq!(
            policy.phase(),
            PolicyPhase::Settled {
                settled_rate: 100e6
            }
        );
        // Settled at one connection: nothing more, unless the rate collapses.
        policy.on_measurement(measured(1, 100e6));
        assert_eq!(decide(&mut policy, 1, 98e6), StreamCountDecision::Hold);

        // One interval far below: closed at once.
        let mut policy = StreamCountPolicy::new(StreamCountPolicyConfig::default());
        policy.on_measurement(measured(1, 50e6));
        assert_eq!(decide(&mut policy, 1, 100e6), StreamCountDecision::Add(1));
        policy.on_measurement(measured(2, 60e6));
        assert_eq!(
            policy.on_measurement(measured(2, 65e6)),
            StreamCountDecision::Remove(1)
        );
        assert!(matches!(policy.phase(), PolicyPhase::Settled { .. }));
        // A small gain keeps it: only a loss closes it.
        let mut policy = StreamCountPolicy::new(StreamCountPolicyConfig::default());
        policy.on_measurement(measured(1, 50e6));
        decide(&mut policy, 1, 100e6);
        policy.on_measurement(measured(2, 60e6));
        assert_eq!(decide(&mut policy, 2, 104e6), StreamCountDecision::Hold);
        assert_eq!(
            policy.phase(),
            PolicyPhase::Settled {
                settled_rate: 104e6
            }
        );
    }

    #[test]
    fn probes_again_after_a_large_drop() {
        let mut policy = StreamCountPolicy::new(StreamCountPolicyConfig::default());
        policy.on_measurement(measured(4, 100e6));
        decide(&mut policy, 4, 100e6);
        policy.on_measurement(measured(5, 100e6));
        decide(&mut policy, 5, 100e6);
        assert!(matches!(policy.phase(), PolicyPhase::Settled { .. }));
        assert_eq!(decide(&mut policy, 5, 30e6), StreamCountDecision::Add(1));
    }
}
