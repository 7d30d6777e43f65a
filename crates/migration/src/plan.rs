//! Convergence planning: will precopy finish under the downtime limit over this link, and what
//! to tell QEMU so that it does.
//!
//! Pure arithmetic over measurements (no IO), re-run by the source agent before the move and on
//! every progress poll. The model is precopy's geometric series: QEMU's stream drains through
//! the proxy at `S` bytes/s (the wire rate times the codec's measured ratio of stream bytes to
//! wire bytes); while a pass of `r` bytes crosses, the guest dirties `D · r / S` more, so passes
//! shrink by `q = D / S` and precopy converges when `q < 1`, in the number of passes it takes for
//! a pass to fit in the pause QEMU is allowed.
//!
//! Two corrections make QEMU's own switch-over rule (remaining ≤ its measured bandwidth × its
//! downtime limit) keep the user's limit:
//!
//! - the proxy's send window is still in flight when QEMU stops the guest, and the guest stays
//!   stopped until it has crossed, so QEMU gets the user's limit minus that drain time;
//! - half a round trip for the last byte and the destination's load (QEMU's figure covers only
//!   writing its stream).
//!
//! QEMU's max-bandwidth is deliberately not set from the link (DESIGN.md §2.5 suggested the
//! forecast wire rate times the encoding ratio): QEMU applies its cap before the codec, and the
//! ratio changes from pass to pass (the first pass over a mostly empty guest compresses hundreds
//! of times, later passes of rewritten pages barely), so any cap from an average ratio throttles
//! exactly the passes that compress well. The transport's backpressure already paces QEMU at the
//! real end-to-end rate.

use std::time::Duration;

/// Passes shrink by at most this factor for the plan to call precopy convergent (a margin for
/// dirty rates that vary; QEMU's auto-converge steps in at 0.5).
pub const CONVERGENT_RATIO: f64 = 0.8;
/// The dirty rate auto-converge aims at, as a share of the stream rate.
const THROTTLE_TARGET_RATIO: f64 = 0.5;
/// QEMU never gets a downtime limit below this (ms), whatever the drain time: a smaller limit
/// only makes precopy run longer without shortening the pause.
pub const MIN_QEMU_DOWNTIME_MS: u64 = 10;
/// Fixed part of the pause QEMU's estimate does not see: loading the device state and starting
/// the destination's vCPUs (measured here: 20-60 ms under TCG).
const LOAD_ALLOWANCE: Duration = Duration::from_millis(40);
/// No more passes than this are predicted; beyond it the plan says "does not converge".
const MAX_PASSES: u32 = 30;

/// What the planner knows at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanInputs {
    /// Bytes QEMU still has to send in this pass (the whole RAM before the first).
    pub remaining_bytes: u64,
    /// The guest's dirty rate (QEMU's measurement, pages × page size per second).
    pub dirty_bytes_per_second: f64,
    /// The link's rate for this transfer: the transport's measurement once bytes flow, the
    /// forecast before. Zero when nothing is known yet.
    pub wire_bytes_per_second: f64,
    /// QEMU stream bytes per wire byte so far (1.0 before anything was sent).
    pub encoding_ratio: f64,
    /// Bytes the proxy may have queued on the wire when QEMU stops the guest (its send window).
    pub in_flight_wire_bytes: u64,
    /// The link's round trip.
    pub round_trip: Duration,
    /// The user's limit on the guest's pause.
    pub downtime_limit: Duration,
}

/// What to do about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The rate at which QEMU's stream crosses: wire rate × encoding ratio (bytes/s).
    pub stream_bytes_per_second: f64,
    /// Dirty rate over stream rate: passes shrink by this factor.
    pub shrink_ratio: f64,
    /// Whether precopy reaches a pass that fits the pause without help.
    pub converges: bool,
    /// Passes still to go, and seconds until the switch-over, when it converges.
    pub expected_passes: Option<u32>,
    pub expected_seconds: Option<f64>,
    /// The downtime limit to give QEMU (its share of the user's limit).
    pub qemu_downtime_limit_ms: u64,
    /// The guest CPU throttle (percent) that would bring the dirty rate to half the stream rate;
    /// 0 when no throttle is needed.
    pub throttle_percent: u8,
}

impl Plan {
    /// One line for the progress output.
    pub fn summary(&self, dirty_bytes_per_second: f64) -> String {
        let rates = format!(
            "guest dirties {}/s, the link carries {}/s of QEMU's stream",
            mib(dirty_bytes_per_second),
            mib(self.stream_bytes_per_second)
        );
        match (self.converges, self.expected_passes, self.expected_seconds) {
            (true, Some(passes), Some(seconds)) => format!(
                "converges: about {passes} more pass{} and {seconds:.0} s to switch-over ({rates})",
                if passes == 1 { "" } else { "es" }
            ),
            _ => format!(
                "does not converge on its own ({rates}); it needs a guest CPU throttle of about {} %",
                self.throttle_percent
            ),
        }
    }
}

fn mib(bytes_per_second: f64) -> String {
    format!("{:.1} MiB", bytes_per_second / f64::from(1u32 << 20))
}

/// Plans the rest of a precopy migration. Without a known link rate it predicts nothing and
/// holds QEMU at the smallest limit while anything is queued (the user's limit otherwise).
pub fn plan(inputs: &PlanInputs) -> Plan {
    let limit_ms = inputs.downtime_limit.as_millis() as u64;
    let ratio = if inputs.encoding_ratio.is_finite() {
        inputs.encoding_ratio.clamp(0.1, 1000.0)
    } else {
        1.0
    };
    let wire = inputs.wire_bytes_per_second.max(0.0);
    if wire <= 0.0 {
        return Plan {
            stream_bytes_per_second: 0.0,
            shrink_ratio: f64::NAN,
            converges: false,
            expected_passes: None,
            expected_seconds: None,
            // How long the queued window takes to cross is unknown: QEMU may not stop the
            // guest before the link is measured (a window queued at the guessed rate, with a
            // first pass of page hashes that fits in it, would otherwise switch over at once
            // and pause for the whole queue). With nothing queued the user's limit stands.
            qemu_downtime_limit_ms: if inputs.in_flight_wire_bytes > 0 {
                MIN_QEMU_DOWNTIME_MS
            } else {
                limit_ms.max(MIN_QEMU_DOWNTIME_MS)
            },
            throttle_percent: 0,
        };
    }
    let stream = wire * ratio;
    let drain = Duration::from_secs_f64(inputs.in_flight_wire_bytes as f64 / wire)
        + inputs.round_trip / 2
        + LOAD_ALLOWANCE;
    let qemu_downtime_limit_ms = (limit_ms.saturating_sub(drain.as_millis() as u64))
        .max(MIN_QEMU_DOWNTIME_MS)
        .min(limit_ms.max(MIN_QEMU_DOWNTIME_MS));
    let dirty = inputs.dirty_bytes_per_second.max(0.0);
    let shrink_ratio = dirty / stream;
    let throttle_percent = if shrink_ratio <= THROTTLE_TARGET_RATIO {
        0
    } else {
        ((1.0 - THROTTLE_TARGET_RATIO / shrink_ratio) * 100.0)
            .ceil()
            .clamp(1.0, 99.0) as u8
    };
    // The pass that fits: what QEMU may still send while the guest is stopped.
    let final_pass = stream * qemu_downtime_limit_ms as f64 / 1000.0;
    let remaining = inputs.remaining_bytes as f64;
    let (converges, expected_passes, expected_seconds) = if remaining <= final_pass {
        (true, Some(0), Some(0.0))
    } else if shrink_ratio < CONVERGENT_RATIO {
        // Passes n with remaining · q^n ≤ final_pass; the time is the sum of the passes.
        let passes = if shrink_ratio <= f64::EPSILON {
            1
        } else {
            ((final_pass / remaining).ln() / shrink_ratio.ln())
                .ceil()
                .max(1.0) as u32
        };
        if passes > MAX_PASSES {
            (false, None, None)
        } else {
            let series = if shrink_ratio <= f64::EPSILON {
                1.0
            } else {
                (1.0 - shrink_ratio.powi(passes as i32)) / (1.0 - shrink_ratio)
            };
            (true, Some(passes), Some(remaining / stream * series))
        }
    } else {
        (false, None, None)
    };
    Plan {
        stream_bytes_per_second: stream,
        shrink_ratio,
        converges,
        expected_passes,
        expected_seconds,
        qemu_downtime_limit_ms,
        throttle_percent,
    }
}

/// Re-plans on every measurement and says when QEMU's downtime limit should change: the first
/// time, and then only on a change of more than a tenth (the measurements are noisy and each
/// change is a QMP round trip).
#[derive(Debug, Default)]
pub struct ConvergencePlanner {
    applied_downtime_ms: Option<u64>,
    /// Stream and wire bytes at the previous update, for the recent encoding ratio.
    previous: Option<(u64, u64)>,
    recent_ratio: Option<f64>,
}

impl ConvergencePlanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// The encoding ratio of the bytes sent since the previous call (smoothed), from the
    /// cumulative stream and wire byte counts: later passes compress differently from the
    /// first, so the cumulative ratio would mislead.
    pub fn observe_ratio(&mut self, stream_bytes: u64, wire_bytes: u64) -> f64 {
        if let Some((stream_before, wire_before)) = self.previous {
            let stream = stream_bytes.saturating_sub(stream_before);
            let wire = wire_bytes.saturating_sub(wire_before);
            // Only enough bytes for a meaningful ratio (a few pages' worth of frames).
            if wire >= 64 << 10 {
                let ratio = stream as f64 / wire as f64;
                self.recent_ratio = Some(match self.recent_ratio {
                    Some(before) => 0.5 * before + 0.5 * ratio,
                    None => ratio,
                });
                self.previous = Some((stream_bytes, wire_bytes));
            }
        } else {
            self.previous = Some((stream_bytes, wire_bytes));
        }
        self.recent_ratio.unwrap_or(if wire_bytes > 0 {
            stream_bytes as f64 / wire_bytes as f64
        } else {
            1.0
        })
    }

    /// The plan for `inputs`, and the downtime limit to give QEMU now, if it should change.
    pub fn update(&mut self, inputs: &PlanInputs) -> (Plan, Option<u64>) {
        let plan = plan(inputs);
        let wanted = plan.qemu_downtime_limit_ms;
        let change = match self.applied_downtime_ms {
            None => true,
            Some(applied) => applied.abs_diff(wanted) * 10 > applied,
        };
        if change {
            self.applied_downtime_ms = Some(wanted);
        }
        (plan, change.then_some(wanted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: f64 = 1024.0 * 1024.0;

    fn inputs() -> PlanInputs {
        // 100 Mbit/s, 50 ms, a 512 MiB guest dirtying 4 MiB/s, the proxy's 2.5 MB window.
        PlanInputs {
            remaining_bytes: 512 << 20,
            dirty_bytes_per_second: 4.0 * MIB,
            wire_bytes_per_second: 12.5e6,
            encoding_ratio: 1.0,
            in_flight_wire_bytes: 2_500_000,
            round_trip: Duration::from_millis(50),
            downtime_limit: Duration::from_millis(300),
        }
    }

    #[test]
    fn a_slow_dirtier_over_a_wan_converges_in_a_few_passes() {
        let plan = plan(&inputs());
        assert!(plan.converges, "{plan:?}");
        // q = 4 MiB/s / 12.5 MB/s = 0.34; 512 MiB down to 12.5 MB/s × 35 ms takes 7 passes.
        assert!((plan.shrink_ratio - 0.3355).abs() < 0.001, "{plan:?}");
        assert_eq!(plan.expected_passes, Some(7), "{plan:?}");
        let seconds = plan.expected_seconds.unwrap();
        // 42.9 s for the first pass, then the geometric tail: 42.9 / (1 - q) ≈ 64.6 s.
        assert!((64.0..65.5).contains(&seconds), "{seconds}");
        assert_eq!(plan.throttle_percent, 0);
    }

    #[test]
    fn the_in_flight_window_comes_out_of_qemus_downtime_limit() {
        // 2.5 MB at 12.5 MB/s is 200 ms, + 25 ms (half the round trip) + 40 ms of loading.
        assert_eq!(plan(&inputs()).qemu_downtime_limit_ms, 35);
        let mut small = inputs();
        small.in_flight_wire_bytes = 0;
        small.round_trip = Duration::ZERO;
        assert_eq!(plan(&small).qemu_downtime_limit_ms, 260);
        // A window that alone takes longer than the limit: QEMU still gets the floor.
        let mut big = inputs();
        big.in_flight_wire_bytes = 64 << 20;
        assert_eq!(plan(&big).qemu_downtime_limit_ms, MIN_QEMU_DOWNTIME_MS);
        // The limit is never raised: a 5 ms user limit stays 5 ms... at the floor.
        let mut tiny = inputs();
        tiny.downtime_limit = Duration::from_millis(5);
        assert_eq!(plan(&tiny).qemu_downtime_limit_ms, MIN_QEMU_DOWNTIME_MS);
    }

    #[test]
    fn compression_raises_the_stream_rate_and_lets_a_faster_dirtier_converge() {
        let mut fast = inputs();
        fast.dirty_bytes_per_second = 20.0 * MIB;
        let raw = plan(&fast);
        assert!(!raw.converges, "{raw:?}");
        // Needs q = 0.5: 1 - 0.5 / 1.68 = 71 %.
        assert_eq!(raw.throttle_percent, 71, "{raw:?}");
        assert!(
            raw.summary(fast.dirty_bytes_per_second)
                .contains("does not converge")
        );
        fast.encoding_ratio = 4.0;
        let compressed = plan(&fast);
        assert!(compressed.converges, "{compressed:?}");
        assert_eq!(compressed.throttle_percent, 0, "{compressed:?}");
        let summary = compressed.summary(fast.dirty_bytes_per_second);
        assert!(summary.starts_with("converges: about"), "{summary}");
    }

    #[test]
    fn a_last_pass_that_fits_switches_over_now() {
        let mut end = inputs();
        end.remaining_bytes = 100_000;
        let plan = plan(&end);
        assert!(plan.converges);
        assert_eq!(plan.expected_passes, Some(0));
    }

    #[test]
    fn an_idle_guest_needs_one_pass_and_nothing_known_predicts_nothing() {
        let mut idle = inputs();
        idle.dirty_bytes_per_second = 0.0;
        assert_eq!(plan(&idle).expected_passes, Some(1));
        let mut unknown = inputs();
        unknown.wire_bytes_per_second = 0.0;
        let plan = plan(&unknown);
        assert!(!plan.converges && plan.expected_passes.is_none());
        assert_eq!(plan.throttle_percent, 0);
        // A window is queued whose crossing time is unknown: QEMU may not stop the guest yet.
        assert_eq!(plan.qemu_downtime_limit_ms, MIN_QEMU_DOWNTIME_MS);
        unknown.in_flight_wire_bytes = 0;
        assert_eq!(super::plan(&unknown).qemu_downtime_limit_ms, 300);
    }

    #[test]
    fn the_planner_changes_qemus_limit_only_on_a_real_change_and_follows_the_recent_ratio() {
        let mut planner = ConvergencePlanner::new();
        let (_, first) = planner.update(&inputs());
        assert_eq!(first, Some(35));
        let (_, same) = planner.update(&inputs());
        assert_eq!(same, None);
        let mut slower = inputs();
        slower.wire_bytes_per_second = 6.25e6; // the window now takes 400 ms: the floor
        let (_, changed) = planner.update(&slower);
        assert_eq!(changed, Some(MIN_QEMU_DOWNTIME_MS));

        // A first pass of zero pages (100:1), then rewritten pages (1:1): the ratio follows.
        assert_eq!(planner.observe_ratio(0, 0), 1.0);
        let first_pass = planner.observe_ratio(100 << 20, 1 << 20);
        assert!((first_pass - 100.0).abs() < 1e-9, "{first_pass}");
        let mut ratio = first_pass;
        let (mut stream, mut wire) = (100u64 << 20, 1u64 << 20);
        for _ in 0..8 {
            stream += 4 << 20;
            wire += 4 << 20;
            ratio = planner.observe_ratio(stream, wire);
        }
        assert!(
            ratio < 1.5,
            "the recent ratio, not the cumulative 12: {ratio}"
        );
        // Too few new bytes to measure: the ratio stays.
        assert_eq!(planner.observe_ratio(stream + 10, wire + 10), ratio);
    }

    #[test]
    fn hostile_numbers_give_a_plan_not_a_panic() {
        for ratio in [f64::NAN, f64::INFINITY, 0.0, -3.0, 1e12] {
            for dirty in [f64::NAN, -1.0, 0.0, 1e15] {
                let mut odd = inputs();
                odd.encoding_ratio = ratio;
                odd.dirty_bytes_per_second = dirty;
                let plan = plan(&odd);
                assert!(plan.qemu_downtime_limit_ms >= MIN_QEMU_DOWNTIME_MS);
                assert!(plan.throttle_percent <= 99);
            }
        }
    }
}
