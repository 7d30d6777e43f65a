//! Parsing of human-written link settings, shared by the CLI and by scripts: rates (`1gbit`,
//! `100mbit`, `12.5Mbps`, `800kbit`, `1000000`), probabilities (`0.5%`, `0.005`), byte sizes
//! (`64k`, `6MB`, `1500`) and durations (`25ms`, via humantime).

use std::time::Duration;

/// Parses a rate into bits per second. Units: bit, kbit, mbit, gbit (also kbps, mbps, gbps,
/// all decimal); a bare number is bits per second.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let lower = text.trim().to_ascii_lowercase();
    let split = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(lower.len());
    let (number, unit) = lower.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("rate {text:?} does not start with a number"))?;
    let multiplier = match unit.trim() {
        "" | "bit" | "bps" | "b/s" => 1.0,
        "k" | "kbit" | "kbps" | "kb/s" => 1e3,
        "m" | "mbit" | "mbps" | "mb/s" => 1e6,
        "g" | "gbit" | "gbps" | "gb/s" => 1e9,
        other => {
            return Err(format!(
                "unknown rate unit {other:?} in {text:?} (use kbit, mbit, gbit)"
            ));
        }
    };
    let bits = value * multiplier;
    if !(1.0..=1e12).contains(&bits) {
        return Err(format!("rate {text:?} is outside 1 bit/s to 1 Tbit/s"));
    }
    Ok(bits as u64)
}

/// Parses a probability: `0.5%` or `0.005`.
pub fn parse_probability(text: &str) -> Result<f64, String> {
    let trimmed = text.trim();
    let (number, scale) = match trimmed.strip_suffix('%') {
        Some(number) => (number, 0.01),
        None => (trimmed, 1.0),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a probability (try 0.5% or 0.005)"))?;
    let probability = value * scale;
    if !(0.0..=1.0).contains(&probability) {
        return Err(format!("probability {text:?} is outside 0 to 100 %"));
    }
    Ok(probability)
}

/// Parses a byte count: a bare number, or with k/m/g (binary: 1k = 1024), optional `b`/`ib`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let lower = text.trim().to_ascii_lowercase();
    let split = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(lower.len());
    let (number, unit) = lower.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("size {text:?} does not start with a number"))?;
    let multiplier = match unit.trim().trim_end_matches('b').trim_end_matches('i') {
        "" => 1.0,
        "k" => 1024.0,
        "m" => 1024.0 * 1024.0,
        "g" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?} (use k, m, g)"
            ));
        }
    };
    Ok((value * multiplier) as u64)
}

/// Parses a duration such as `25ms`, `1.5s`, `0`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text.trim()).map_err(|error| format!("duration {text:?}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_probabilities_sizes_and_durations_parse() {
        assert_eq!(parse_rate("1gbit"), Ok(1_000_000_000));
        assert_eq!(parse_rate("100Mbit"), Ok(100_000_000));
        assert_eq!(parse_rate("12.5mbps"), Ok(12_500_000));
        assert_eq!(parse_rate("800kbit"), Ok(800_000));
        assert_eq!(parse_rate("5000"), Ok(5000));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("1xbit").is_err());
        assert_eq!(parse_probability("0.5%"), Ok(0.005));
        assert_eq!(parse_probability("0.02"), Ok(0.02));
        assert!(parse_probability("150%").is_err());
        assert_eq!(parse_bytes("64k"), Ok(65536));
        assert_eq!(parse_bytes("6MB"), Ok(6 * 1024 * 1024));
        assert_eq!(parse_bytes("1500"), Ok(1500));
        assert_eq!(parse_duration("25ms"), Ok(Duration::from_millis(25)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("soon").is_err());
    }
}
