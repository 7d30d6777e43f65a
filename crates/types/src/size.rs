//! Human byte sizes (`512MiB`, `2GiB`, `1G`, `4096`) as the CLI and API accept them.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A size in bytes that parses and prints in binary units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ByteSize(pub u64);

/// Why a size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {input:?}: {reason} (examples: 512MiB, 2GiB, 1048576)")]
pub struct ParseSizeError {
    pub input: String,
    pub reason: &'static str,
}

const UNITS: [(&str, u64); 13] = [
    ("kib", 1 << 10),
    ("mib", 1 << 20),
    ("gib", 1 << 30),
    ("tib", 1 << 40),
    ("k", 1 << 10),
    ("m", 1 << 20),
    ("g", 1 << 30),
    ("t", 1 << 40),
    ("kb", 1000),
    ("mb", 1000 * 1000),
    ("gb", 1000 * 1000 * 1000),
    ("tb", 1000 * 1000 * 1000 * 1000),
    ("b", 1),
];

impl std::str::FromStr for ByteSize {
    type Err = ParseSizeError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let error = |reason| ParseSizeError {
            input: input.to_string(),
            reason,
        };
        let trimmed = input.trim();
        let split = trimmed
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(trimmed.len());
        let (digits, unit) = trimmed.split_at(split);
        if digits.is_empty() {
            return Err(error("it does not start with a number"));
        }
        let number: u64 = digits
            .parse()
            .map_err(|_| error("the number is too large"))?;
        let unit = unit.trim().to_ascii_lowercase();
        let multiplier = if unit.is_empty() {
            1
        } else {
            UNITS
                .iter()
                .find(|(name, _)| *name == unit)
                .map(|(_, multiplier)| *multiplier)
                .ok_or_else(|| error("unknown unit; use B, KiB, MiB, GiB or TiB"))?
        };
        number
            .checked_mul(multiplier)
            .map(ByteSize)
            .ok_or_else(|| error("the size overflows 64 bits"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.0;
        for (unit, multiplier) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if bytes >= multiplier {
                if bytes.is_multiple_of(multiplier) {
                    return write!(formatter, "{}{unit}", bytes / multiplier);
                }
                return write!(formatter, "{:.1}{unit}", bytes as f64 / multiplier as f64);
            }
        }
        write!(formatter, "{bytes}B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_and_decimal_units() {
        assert_eq!("512MiB".parse::<ByteSize>().unwrap().0, 512 << 20);
        assert_eq!("2GiB".parse::<ByteSize>().unwrap().0, 2 << 30);
        assert_eq!("2G".parse::<ByteSize>().unwrap().0, 2 << 30);
        assert_eq!("1MB".parse::<ByteSize>().unwrap().0, 1_000_000);
        assert_eq!("4096".parse::<ByteSize>().unwrap().0, 4096);
        assert_eq!(" 8 kib ".parse::<ByteSize>().unwrap().0, 8192);
    }

    #[test]
    fn refuses_garbage_with_a_reason() {
        for bad in [
            "",
            "MiB",
            "12XB",
            "-1",
            "99999999999999999999",
            "18446744073709551615GiB",
        ] {
            let error = bad.parse::<ByteSize>().unwrap_err();
            assert!(error.to_string().contains("examples"), "{error}");
        }
    }

    #[test]
    fn displays_in_binary_units() {
        assert_eq!(ByteSize(512 << 20).to_string(), "512MiB");
        assert_eq!(ByteSize(1536 << 20).to_string(), "1.5GiB");
        assert_eq!(ByteSize(100).to_string(), "100B");
    }
}
