//! The per-direction link model, free of IO: given a packet's arrival time and length it decides
//! whether the packet is lost, dropped at the bottleneck queue, or delivered, and when. The
//! forwarder threads drive it with real time; unit tests drive it with made-up time.
//!
//! Order of effects, as in a real path: random loss on entry (a lost packet uses no capacity),
//! then the drop-tail bottleneck queue served at a fixed rate or by trace delivery opportunities,
//! then propagation delay plus jitter. Capacity and loss act per packet as the kernel hands it
//! over; with the TUN MTU at 1500 that is per 1500-byte packet.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use crate::trace::{DeliveryTrace, OPPORTUNITY_BYTES};

/// What limits a direction's throughput.
#[derive(Debug, Clone, Default)]
pub enum Capacity {
    /// No limit besides the forwarder's own speed.
    #[default]
    Unlimited,
    /// A fixed rate, counting IP packet bytes (TUN) or Ethernet frame bytes (TAP).
    BitsPerSecond(u64),
    /// Time-varying capacity replayed from a delivery-opportunity trace (looped).
    Trace(Arc<DeliveryTrace>),
}

impl Capacity {
    /// The mean rate, if limited.
    pub fn average_bits_per_second(&self) -> Option<f64> {
        match self {
            Capacity::Unlimited => None,
            Capacity::BitsPerSecond(rate) => Some(*rate as f64),
            Capacity::Trace(trace) => Some(trace.average_bits_per_second()),
        }
    }
}

/// How one direction of a link behaves.
#[derive(Debug, Clone, Default)]
pub struct DirectionShape {
    /// Fixed one-way propagation delay.
    pub delay: Duration,
    /// Each packet's delay varies uniformly within `delay ± jitter` (never below zero extra).
    pub jitter: Duration,
    /// With jitter, let a packet overtake an earlier one (off: delivery order is kept).
    pub allow_reordering: bool,
    /// Probability in `[0, 1]` that a packet is lost.
    pub loss: f64,
    /// Bottleneck capacity.
    pub capacity: Capacity,
    /// Drop-tail limit of the bottleneck queue, bytes; `None` picks about one bandwidth-delay
    /// product (see [`default_queue_bytes`]).
    pub queue_bytes: Option<u64>,
}

/// The default bottleneck queue: one bandwidth-delay product for `round_trip` at the
/// capacity's mean rate, and never less than 64 full-size packets.
pub fn default_queue_bytes(capacity: &Capacity, round_trip: Duration) -> u64 {
    let minimum = 64 * u64::from(OPPORTUNITY_BYTES);
    match capacity.average_bits_per_second() {
        None => u64::MAX,
        Some(rate) => ((rate / 8.0 * round_trip.as_secs_f64()) as u64).max(minimum),
    }
}

/// What happens to one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver at this time (ns on the model's clock).
    Deliver { release_at_ns: u64 },
    /// Lost at random.
    DropLoss,
    /// The bottleneck queue was full.
    DropQueue,
}

/// A small, reproducible generator (xoshiro256++ seeded by splitmix64), so a seed gives the same
/// loss and jitter pattern on every machine and every version of every dependency.
#[derive(Debug, Clone)]
pub struct SeededRandom {
    state: [u64; 4],
}

impl SeededRandom {
    /// Seeds the generator.
    pub fn new(seed: u64) -> Self {
        let mut mix = seed;
        let mut next = || {
            mix = mix.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = mix;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Self {
            state: [next(), next(), next(), next()],
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, bound]`.
    pub fn up_to(&mut self, bound: u64) -> u64 {
        if bound == u64::MAX {
            return self.next_u64();
        }
        ((u128::from(self.next_u64()) * (u128::from(bound) + 1)) >> 64) as u64
    }
}

#[derive(Debug)]
enum Bottleneck {
    Unlimited,
    Fixed {
        bits_per_second: u64,
        /// When the last admitted packet finishes serialization.
        busy_until_ns: u64,
    },
    Trace {
        trace: Arc<DeliveryTrace>,
        /// The opportunity that served the last admitted packet's last byte, and what it has left.
        cursor: Option<(u64, u32)>,
    },
}

/// One direction's model state.
#[derive(Debug)]
pub struct DirectionModel {
    delay_ns: u64,
    jitter_ns: u64,
    allow_reordering: bool,
    /// A packet is lost when a random u64 falls below this; `None` means always lost.
    loss_threshold: Option<u64>,
    random: SeededRandom,
    bottleneck: Bottleneck,
    queue_limit_bytes: u64,
    /// Packets admitted to the bottleneck and not yet fully sent: (departure ns, bytes).
    backlog: VecDeque<(u64, u32)>,
    backlog_bytes: u64,
    last_release_ns: u64,
}

impl DirectionModel {
    /// Builds the model; `round_trip` sizes the default queue.
    pub fn new(shape: &DirectionShape, round_trip: Duration, seed: u64) -> Self {
        let loss = if shape.loss.is_nan() {
            0.0
        } else {
            shape.loss.clamp(0.0, 1.0)
        };
        let loss_threshold = if loss >= 1.0 {
            None
        } else {
            Some((loss * 18_446_744_073_709_551_616.0) as u64)
        };
        let bottleneck = match &shape.capacity {
            Capacity::Unlimited => Bottleneck::Unlimited,
            Capacity::BitsPerSecond(0) => Bottleneck::Fixed {
                bits_per_second: 1,
                busy_until_ns: 0,
            },
            Capacity::BitsPerSecond(rate) => Bottleneck::Fixed {
                bits_per_second: *rate,
                busy_until_ns: 0,
            },
            Capacity::Trace(trace) => Bottleneck::Trace {
                trace: Arc::clone(trace),
                cursor: None,
            },
        };
        Self {
            delay_ns: duration_ns(shape.delay),
            jitter_ns: duration_ns(shape.jitter),
            allow_reordering: shape.allow_reordering,
            loss_threshold,
            random: SeededRandom::new(seed),
            bottleneck,
            queue_limit_bytes: shape
                .queue_bytes
                .unwrap_or_else(|| default_queue_bytes(&shape.capacity, round_trip)),
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            last_release_ns: 0,
        }
    }

    /// The drop-tail limit in force.
    pub fn queue_limit_bytes(&self) -> u64 {
        self.queue_limit_bytes
    }

    /// Bytes waiting at the bottleneck at `now_ns` (after [`Self::admit`] calls up to now).
    pub fn backlog_bytes(&mut self, now_ns: u64) -> u64 {
        self.expire_backlog(now_ns);
        self.backlog_bytes
    }

    /// Decides the fate of a packet of `length` bytes arriving at `now_ns`. Calls must come in
    /// non-decreasing `now_ns` order.
    pub fn admit(&mut self, now_ns: u64, length: usize) -> Verdict {
        let length = u32::try_from(length).unwrap_or(u32::MAX);
        let lost = match self.loss_threshold {
            None => true,
            Some(0) => false,
            Some(threshold) => self.random.next_u64() < threshold,
        };
        if lost {
            return Verdict::DropLoss;
        }
        let limited = !matches!(self.bottleneck, Bottleneck::Unlimited);
        if limited {
            self.expire_backlog(now_ns);
        }
        let departure_ns = match &mut self.bottleneck {
            Bottleneck::Unlimited => now_ns,
            bottleneck => {
                if self.backlog_bytes + u64::from(length) > self.queue_limit_bytes
                    && !self.backlog.is_empty()
                {
                    return Verdict::DropQueue;
                }
                let departure_ns = serve(bottleneck, now_ns, length);
                self.backlog.push_back((departure_ns, length));
                self.backlog_bytes += u64::from(length);
                departure_ns
            }
        };
        let mut release_ns = departure_ns + self.delay_ns;
        if self.jitter_ns > 0 {
            let offset = self.random.up_to(2 * self.jitter_ns);
            release_ns = (release_ns + offset)
                .saturating_sub(self.jitter_ns)
                .max(departure_ns);
        }
        if !self.allow_reordering {
            release_ns = release_ns.max(self.last_release_ns);
        }
        self.last_release_ns = self.last_release_ns.max(release_ns);
        Verdict::Deliver {
            release_at_ns: release_ns,
        }
    }

    fn expire_backlog(&mut self, now_ns: u64) {
        while let Some(&(departure_ns, length)) = self.backlog.front() {
            if departure_ns > now_ns {
                break;
            }
            self.backlog.pop_front();
            self.backlog_bytes -= u64::from(length);
        }
    }
}

/// Serves `length` bytes arriving at `now_ns` after everything admitted before; returns when the
/// last byte leaves the bottleneck.
fn serve(bottleneck: &mut Bottleneck, now_ns: u64, length: u32) -> u64 {
    match bottleneck {
        Bottleneck::Unlimited => now_ns,
        Bottleneck::Fixed {
            bits_per_second,
            busy_until_ns,
        } => {
            let serialization_ns =
                (u128::from(length) * 8 * 1_000_000_000).div_ceil(u128::from(*bits_per_second));
            let start = (*busy_until_ns).max(now_ns);
            *busy_until_ns =
                start.saturating_add(u64::try_from(serialization_ns).unwrap_or(u64::MAX));
            *busy_until_ns
        }
        Bottleneck::Trace { trace, cursor } => {
            // An opportunity that passed while the queue was empty is wasted, as in mm-link.
            let (mut index, mut remaining) = match *cursor {
                Some((index, remaining)) if trace.opportunity_time_ns(index) >= now_ns => {
                    (index, remaining)
                }
                _ => (
                    trace.first_opportunity_at_or_after(now_ns),
                    OPPORTUNITY_BYTES,
                ),
            };
            let mut to_send = length.max(1);
            loop {
                if remaining == 0 {
                    index += 1;
                    remaining = OPPORTUNITY_BYTES;
                }
                let taken = remaining.min(to_send);
                remaining -= taken;
                to_send -= taken;
                if to_send == 0 {
                    break;
                }
            }
            *cursor = Some((index, remaining));
            trace.opportunity_time_ns(index)
        }
    }
}

fn duration_ns(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const MS: u64 = 1_000_000;

    fn shape(capacity: Capacity) -> DirectionShape {
        DirectionShape {
            capacity,
            ..DirectionShape::default()
        }
    }

    #[test]
    fn fixed_rate_serializes_back_to_back_packets() {
        let mut model = DirectionModel::new(
            &DirectionShape {
                delay: Duration::from_millis(10),
                ..shape(Capacity::BitsPerSecond(12_000_000))
            },
            Duration::from_millis(20),
            1,
        );
        // 1500 bytes at 12 Mbit/s take exactly 1 ms.
        assert_eq!(
            model.admit(0, 1500),
            Verdict::Deliver {
                release_at_ns: 11 * MS
            }
        );
        assert_eq!(
            model.admit(0, 1500),
            Verdict::Deliver {
                release_at_ns: 12 * MS
            }
        );
        assert_eq!(
            model.admit(0, 750),
            Verdict::Deliver {
                release_at_ns: 12 * MS + MS / 2
            }
        );
        // An idle link starts serializing at arrival.
        assert_eq!(
            model.admit(100 * MS, 1500),
            Verdict::Deliver {
                release_at_ns: 111 * MS
            }
        );
    }

    #[test]
    fn full_queue_drops_the_tail_and_bounds_queueing_delay() {
        let mut model = DirectionModel::new(
            &DirectionShape {
                queue_bytes: Some(15_000),
                ..shape(Capacity::BitsPerSecond(12_000_000))
            },
            Duration::ZERO,
            1,
        );
        let verdicts: Vec<Verdict> = (0..20).map(|_| model.admit(0, 1500)).collect();
        let delivered = verdicts
            .iter()
            .filter(|v| matches!(v, Verdict::Deliver { .. }))
            .count();
        assert_eq!(delivered, 10);
        assert_eq!(verdicts[10], Verdict::DropQueue);
        // After 3 ms three packets have left, so three more fit.
        let later: Vec<Verdict> = (0..5).map(|_| model.admit(3 * MS, 1500)).collect();
        assert_eq!(
            later
                .iter()
                .filter(|v| matches!(v, Verdict::Deliver { .. }))
                .count(),
            3
        );
        assert_eq!(model.backlog_bytes(3 * MS), 15_000);
    }

    #[test]
    fn loss_follows_the_seed_and_the_configured_probability() {
        let run = |seed| {
            let mut model = DirectionModel::new(
                &DirectionShape {
                    loss: 0.005,
                    ..DirectionShape::default()
                },
                Duration::ZERO,
                seed,
            );
            (0..200_000)
                .map(|i| model.admit(i, 1500) == Verdict::DropLoss)
                .collect::<Vec<bool>>()
        };
        let first = run(7);
        assert_eq!(first, run(7), "same seed, same losses");
        assert_ne!(first, run(8), "another seed, other losses");
        let lost = first.iter().filter(|&&lost| lost).count() as f64 / first.len() as f64;
        assert!((lost - 0.005).abs() < 0.0005, "loss rate {lost}");
    }

    #[test]
    fn jitter_stays_in_bounds_and_keeps_order_unless_reordering_is_allowed() {
        let jittery = |allow_reordering| DirectionShape {
            delay: Duration::from_millis(20),
            jitter: Duration::from_millis(5),
            allow_reordering,
            ..DirectionShape::default()
        };
        let mut ordered = DirectionModel::new(&jittery(false), Duration::ZERO, 3);
        let mut reordering = DirectionModel::new(&jittery(true), Duration::ZERO, 3);
        let (mut last, mut overtakes) = (0, 0);
        let mut previous_reordered = 0;
        for i in 0..10_000u64 {
            let now = i * MS / 10;
            let Verdict::Deliver { release_at_ns } = ordered.admit(now, 100) else {
                panic!("no loss configured")
            };
            assert!(release_at_ns >= last, "order kept");
            assert!(release_at_ns >= now + 15 * MS);
            last = release_at_ns;
            let Verdict::Deliver { release_at_ns } = reordering.admit(now, 100) else {
                panic!("no loss configured")
            };
            assert!((now + 15 * MS..=now + 25 * MS).contains(&release_at_ns));
            if release_at_ns < previous_reordered {
                overtakes += 1;
            }
            previous_reordered = release_at_ns;
        }
        assert!(
            overtakes > 1000,
            "reordering allowed: {overtakes} overtakes"
        );
    }

    #[test]
    fn trace_capacity_is_replayed_and_looped() {
        // 3 opportunities at 1 ms, 1 at 4 ms; period 4 ms.
        let trace = DeliveryTrace::parse("1\n1\n1\n4\n", Path::new("t")).expect("valid");
        let mut model = DirectionModel::new(
            &DirectionShape {
                queue_bytes: Some(u64::MAX),
                ..shape(Capacity::Trace(Arc::new(trace)))
            },
            Duration::ZERO,
            1,
        );
        let releases: Vec<u64> = (0..9)
            .map(|_| match model.admit(0, 1500) {
                Verdict::Deliver { release_at_ns } => release_at_ns / MS,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(releases, vec![1, 1, 1, 4, 5, 5, 5, 8, 9]);
        // Two 750-byte packets share one opportunity.
        let mut model = DirectionModel::new(
            &shape(Capacity::Trace(Arc::new(
                DeliveryTrace::parse("1\n", Path::new("t")).expect("valid"),
            ))),
            Duration::ZERO,
            1,
        );
        assert_eq!(model.admit(0, 750), Verdict::Deliver { release_at_ns: MS });
        assert_eq!(model.admit(0, 750), Verdict::Deliver { release_at_ns: MS });
        assert_eq!(
            model.admit(0, 750),
            Verdict::Deliver {
                release_at_ns: 2 * MS
            }
        );
        // Opportunities that passed with an empty queue are wasted.
        assert_eq!(
            model.admit(10 * MS + 1, 1500),
            Verdict::Deliver {
                release_at_ns: 11 * MS
            }
        );
    }

    #[test]
    fn default_queue_is_about_one_bandwidth_delay_product() {
        let queue = default_queue_bytes(
            &Capacity::BitsPerSecond(1_000_000_000),
            Duration::from_millis(50),
        );
        assert_eq!(queue, 6_250_000);
        assert_eq!(
            default_queue_bytes(
                &Capacity::BitsPerSecond(1_000_000),
                Duration::from_millis(1)
            ),
            96_000
        );
    }
}
