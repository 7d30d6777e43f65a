//! Choice of the zstd level from the measured link rate and the measured speed and ratio of each
//! level. Encoding and sending overlap, so a level delivers input at
//! `min(compression threads × its compression speed, link rate × its ratio)` bytes per second;
//! the chooser takes the level that delivers the most, and among levels within
//! [`NEAR_BEST_FRACTION`] of the best, the one that puts the fewest bytes on the wire (the
//! fastest of those within [`SAME_RATIO_FRACTION`] of the fewest). Fast links
//! therefore get fast levels (compression is the bottleneck) and slow links get hard ones.
//!
//! [`choose_zstd_level`] is a pure function; [`LevelMeter`] keeps the measurements it consumes.

use std::time::Duration;

/// Levels within this fraction of the best delivered rate count as equally fast.
pub const NEAR_BEST_FRACTION: f64 = 0.05;

/// Ratios within this fraction of each other count as the same: the faster level wins.
pub const SAME_RATIO_FRACTION: f64 = 0.01;

/// Level used when nothing is known about the link.
pub const FALLBACK_LEVEL: i32 = 3;

/// What one zstd level achieves on this host and this data.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LevelProfile {
    pub level: i32,
    /// Input bytes compressed per second on one core.
    pub input_bytes_per_second: f64,
    /// Input bytes divided by output bytes (≥ 1 for useful levels).
    pub compression_ratio: f64,
}

/// Typical figures for VM memory and disk content on one core of a 2020s x86 server; used until
/// measurements replace them.
pub const DEFAULT_PROFILES: [LevelProfile; 7] = [
    LevelProfile {
        level: 1,
        input_bytes_per_second: 450e6,
        compression_ratio: 2.8,
    },
    LevelProfile {
        level: 3,
        input_bytes_per_second: 300e6,
        compression_ratio: 3.0,
    },
    LevelProfile {
        level: 6,
        input_bytes_per_second: 110e6,
        compression_ratio: 3.2,
    },
    LevelProfile {
        level: 9,
        input_bytes_per_second: 70e6,
        compression_ratio: 3.3,
    },
    LevelProfile {
        level: 12,
        input_bytes_per_second: 30e6,
        compression_ratio: 3.35,
    },
    LevelProfile {
        level: 15,
        input_bytes_per_second: 15e6,
        compression_ratio: 3.4,
    },
    LevelProfile {
        level: 19,
        input_bytes_per_second: 4e6,
        compression_ratio: 3.6,
    },
];

/// Input bytes per second that `profile` delivers through a link of `link_bytes_per_second`.
pub fn delivered_input_rate(
    profile: &LevelProfile,
    link_bytes_per_second: f64,
    compression_threads: u32,
) -> f64 {
    let compression = profile.input_bytes_per_second * f64::from(compression_threads.max(1));
    let wire = link_bytes_per_second * profile.compression_ratio.max(1.0);
    compression.min(wire)
}

/// The zstd level for a link of `link_bytes_per_second` given what each level achieves.
/// Unknown or nonsensical inputs give [`FALLBACK_LEVEL`].
pub fn choose_zstd_level(
    link_bytes_per_second: f64,
    compression_threads: u32,
    profiles: &[LevelProfile],
) -> i32 {
    let usable = |profile: &&LevelProfile| {
        profile.input_bytes_per_second.is_finite()
            && profile.input_bytes_per_second > 0.0
            && profile.compression_ratio.is_finite()
            && profile.compression_ratio > 0.0
    };
    if !link_bytes_per_second.is_finite() || link_bytes_per_second <= 0.0 {
        return FALLBACK_LEVEL;
    }
    let best_rate = profiles
        .iter()
        .filter(usable)
        .map(|profile| delivered_input_rate(profile, link_bytes_per_second, compression_threads))
        .fold(0.0f64, f64::max);
    if best_rate <= 0.0 {
        return FALLBACK_LEVEL;
    }
    let near_best: Vec<&LevelProfile> = profiles
        .iter()
        .filter(usable)
        .filter(|profile| {
            delivered_input_rate(profile, link_bytes_per_second, compression_threads)
                >= best_rate * (1.0 - NEAR_BEST_FRACTION)
        })
        .collect();
    let best_ratio = near_best
        .iter()
        .map(|profile| profile.compression_ratio)
        .fold(0.0f64, f64::max);
    // The fewest wire bytes, but a harder level must save at least SAME_RATIO_FRACTION more to
    // be worth its CPU (on incompressible data every level is "as good").
    near_best
        .into_iter()
        .filter(|profile| profile.compression_ratio >= best_ratio * (1.0 - SAME_RATIO_FRACTION))
        .min_by_key(|profile| profile.level)
        .map_or(FALLBACK_LEVEL, |profile| profile.level)
}

/// Keeps an exponentially weighted average of measured speed and ratio per level, starting from
/// [`DEFAULT_PROFILES`], so the encoder's own frames refine the choice as a transfer goes on.
#[derive(Clone, Debug)]
pub struct LevelMeter {
    profiles: Vec<LevelProfile>,
    weight_of_new_sample: f64,
    /// How compressible the data is compared with the data [`DEFAULT_PROFILES`] describe: 1
    /// means as compressible, 0 incompressible. Every observation moves it, whatever the level,
    /// and it sets the ratio of every default level: the data decides how much any level can
    /// gain, and a transfer measures only the level it uses. Without it, random data measured at
    /// level 3 would still let level 12 promise its default ratio.
    compressibility: f64,
    /// Levels measured at least once (their first measurement replaces the default).
    measured_levels: Vec<i32>,
}

/// Weight of a new observation of the data's compressibility: content changes from frame to
/// frame, and a transfer of a few frames must follow it.
const COMPRESSIBILITY_WEIGHT: f64 = 0.5;

impl Default for LevelMeter {
    fn default() -> Self {
        Self {
            profiles: DEFAULT_PROFILES.to_vec(),
            weight_of_new_sample: 0.2,
            compressibility: 1.0,
            measured_levels: Vec::new(),
        }
    }
}

/// The default ratio of `level`, when it is one of [`DEFAULT_PROFILES`].
fn default_ratio(level: i32) -> Option<f64> {
    DEFAULT_PROFILES
        .iter()
        .find(|profile| profile.level == level)
        .map(|profile| profile.compression_ratio)
}

impl LevelMeter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `level` turned `input_bytes` into `output_bytes` in `elapsed`.
    pub fn observe(
        &mut self,
        level: i32,
        input_bytes: usize,
        output_bytes: usize,
        elapsed: Duration,
    ) {
        if input_bytes < 64 * 1024 || output_bytes == 0 || elapsed.is_zero() {
            return; // too small to say anything about speed
        }
        let speed = input_bytes as f64 / elapsed.as_secs_f64();
        let ratio = input_bytes as f64 / output_bytes as f64;
        let first_of_level = !self.measured_levels.contains(&level);
        let first_of_all = self.measured_levels.is_empty();
        if first_of_level {
            self.measured_levels.push(level);
        }
        // A first measurement replaces the default guess.
        let speed_weight = if first_of_level {
            1.0
        } else {
            self.weight_of_new_sample
        };
        let Some(default) = default_ratio(level) else {
            // A level without a default: its own measurements only.
            match self
                .profiles
                .iter_mut()
                .find(|profile| profile.level == level)
            {
                Some(profile) => {
                    let weight = self.weight_of_new_sample;
                    profile.input_bytes_per_second =
                        profile.input_bytes_per_second * (1.0 - weight) + speed * weight;
                    profile.compression_ratio =
                        profile.compression_ratio * (1.0 - weight) + ratio * weight;
                }
                None => {
                    self.profiles.push(LevelProfile {
                        level,
                        input_bytes_per_second: speed,
                        compression_ratio: ratio,
                    });
                    self.profiles.sort_by_key(|profile| profile.level);
                }
            }
            return;
        };
        let compressibility = ((ratio - 1.0) / (default - 1.0)).clamp(0.0, 4.0);
        let compressibility_weight = if first_of_all {
            1.0
        } else {
            COMPRESSIBILITY_WEIGHT
        };
        self.compressibility = self.compressibility * (1.0 - compressibility_weight)
            + compressibility * compressibility_weight;
        for profile in &mut self.profiles {
            if let Some(default) = default_ratio(profile.level) {
                profile.compression_ratio = 1.0 + (default - 1.0) * self.compressibility;
            }
            if profile.level == level {
                profile.input_bytes_per_second =
                    profile.input_bytes_per_second * (1.0 - speed_weight) + speed * speed_weight;
            }
        }
    }

    /// Replaces every profile with a fresh measurement of `levels` on `sample` (a few MiB of
    /// representative data), compressing it in `frame_size` pieces as the encoder would.
    pub fn measure(
        &mut self,
        sample: &[u8],
        levels: &[i32],
        frame_size: usize,
    ) -> std::io::Result<()> {
        let mut measured = Vec::with_capacity(levels.len());
        for &level in levels {
            let mut compressor = zstd::bulk::Compressor::new(level)?;
            let started = std::time::Instant::now();
            let mut output_bytes = 0usize;
            for piece in sample.chunks(frame_size.max(1)) {
                output_bytes += compressor.compress(piece)?.len();
            }
            let elapsed = started.elapsed().max(Duration::from_nanos(1));
            measured.push(LevelProfile {
                level,
                input_bytes_per_second: sample.len() as f64 / elapsed.as_secs_f64(),
                compression_ratio: sample.len() as f64 / output_bytes.max(1) as f64,
            });
        }
        if !measured.is_empty() {
            self.measured_levels = measured.iter().map(|profile| profile.level).collect();
            self.profiles = measured;
            self.compressibility = 1.0;
        }
        Ok(())
    }

    pub fn profiles(&self) -> &[LevelProfile] {
        &self.profiles
    }

    /// [`choose_zstd_level`] over the current profiles.
    pub fn choose(&self, link_bytes_per_second: f64, compression_threads: u32) -> i32 {
        choose_zstd_level(link_bytes_per_second, compression_threads, &self.profiles)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEGABIT: f64 = 1e6 / 8.0;

    #[test]
    fn fast_link_gets_fastest_level() {
        assert_eq!(
            choose_zstd_level(10_000.0 * MEGABIT, 1, &DEFAULT_PROFILES),
            1
        );
        assert_eq!(
            choose_zstd_level(1_000.0 * MEGABIT, 1, &DEFAULT_PROFILES),
            1
        );
    }

    #[test]
    fn slow_link_gets_harder_level() {
        let level_at_100_megabit = choose_zstd_level(100.0 * MEGABIT, 1, &DEFAULT_PROFILES);
        let level_at_10_megabit = choose_zstd_level(10.0 * MEGABIT, 1, &DEFAULT_PROFILES);
        let level_at_1_megabit = choose_zstd_level(1.0 * MEGABIT, 1, &DEFAULT_PROFILES);
        assert!(
            level_at_100_megabit > 3,
            "100 Mbit/s chose {level_at_100_megabit}"
        );
        assert!(level_at_10_megabit >= level_at_100_megabit);
        assert_eq!(level_at_1_megabit, 19);
    }

    #[test]
    fn level_never_decreases_as_link_slows() {
        let mut previous = i32::MIN;
        for megabits in [
            100_000.0, 10_000.0, 1_000.0, 300.0, 100.0, 30.0, 10.0, 3.0, 1.0, 0.1,
        ] {
            let level = choose_zstd_level(megabits * MEGABIT, 1, &DEFAULT_PROFILES);
            assert!(
                level >= previous,
                "{megabits} Mbit/s chose {level} after {previous}"
            );
            previous = level;
        }
    }

    #[test]
    fn more_threads_allow_harder_levels() {
        let one = choose_zstd_level(300.0 * MEGABIT, 1, &DEFAULT_PROFILES);
        let eight = choose_zstd_level(300.0 * MEGABIT, 8, &DEFAULT_PROFILES);
        assert!(eight > one, "1 thread {one}, 8 threads {eight}");
    }

    #[test]
    fn incompressible_data_prefers_fast_level_on_any_link() {
        let profiles: Vec<LevelProfile> = DEFAULT_PROFILES
            .iter()
            .map(|profile| LevelProfile {
                compression_ratio: 1.0,
                ..*profile
            })
            .collect();
        assert_eq!(choose_zstd_level(1.0 * MEGABIT, 1, &profiles), 1);
    }

    #[test]
    fn unknown_link_rate_gives_fallback() {
        assert_eq!(
            choose_zstd_level(f64::NAN, 1, &DEFAULT_PROFILES),
            FALLBACK_LEVEL
        );
        assert_eq!(choose_zstd_level(0.0, 1, &DEFAULT_PROFILES), FALLBACK_LEVEL);
        assert_eq!(choose_zstd_level(1e9, 1, &[]), FALLBACK_LEVEL);
    }

    #[test]
    fn incompressible_data_seen_at_one_level_stops_every_level_promising_gains() {
        let mut meter = LevelMeter::new();
        let slow_link = 50.0 * MEGABIT;
        assert!(
            meter.choose(slow_link, 1) > 3,
            "defaults favour a harder level"
        );
        // Level 3 measured once on random data: no gain. Harder levels cannot gain either.
        meter.observe(3, 8 << 20, (8 << 20) + 1024, Duration::from_millis(20));
        assert_eq!(meter.choose(slow_link, 1), 1);
        // The data turns compressible again (level 1 measures a good ratio): within a few
        // frames harder levels pay again.
        for _ in 0..3 {
            meter.observe(1, 8 << 20, (8 << 20) / 3, Duration::from_millis(20));
        }
        assert!(meter.choose(slow_link, 1) > 3);
    }

    #[test]
    fn meter_measurements_move_the_choice() {
        let mut meter = LevelMeter::new();
        // Pretend level 19 turns out very fast: it should then win on a fast link too.
        for _ in 0..50 {
            meter.observe(19, 100_000_000, 20_000_000, Duration::from_millis(50));
        }
        assert_eq!(meter.choose(1_000.0 * MEGABIT, 1), 19);
    }
}
