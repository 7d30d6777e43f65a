//! Printing: aligned tables for people, JSON for scripts.

use crate::cli::OutputFormat;
use serde::Serialize;

/// Prints rows under a header with columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|title| title.len()).collect();
    for row in rows {
        for (index, cell) in row.iter().enumerate() {
            if let Some(width) = widths.get_mut(index) {
                *width = (*width).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut text = String::new();
        for (index, cell) in cells.iter().enumerate() {
            if index + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let pad = widths[index].saturating_sub(cell.chars().count());
                text.push_str(cell);
                text.push_str(&" ".repeat(pad + 2));
            }
        }
        println!("{}", text.trim_end());
    };
    line(header.iter().map(|title| title.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// Prints `value` as JSON, or calls `human` for the table form.
pub fn emit<T: Serialize>(format: OutputFormat, value: &T, human: impl FnOnce(&T)) {
    match format {
        OutputFormat::Json => match serde_json::to_string_pretty(value) {
            Ok(json) => println!("{json}"),
            Err(error) => eprintln!("error: cannot encode output: {error}"),
        },
        OutputFormat::Table => human(value),
    }
}

/// Key/value lines for `show` commands.
pub fn details(pairs: &[(&str, String)]) {
    let width = pairs.iter().map(|(key, _)| key.len()).max().unwrap_or(0);
    for (key, value) in pairs {
        println!("{key:<width$}  {value}");
    }
}

pub fn age(since_unix_seconds: u64) -> String {
    let now = novacron_types::unix_now();
    let seconds = now.saturating_sub(since_unix_seconds);
    match seconds {
        0..=59 => format!("{seconds}s"),
        60..=3599 => format!("{}m", seconds / 60),
        3600..=86_399 => format!("{}h", seconds / 3600),
        _ => format!("{}d", seconds / 86_400),
    }
}

/// `zone=eu-1,disk=ssd`, or `-` for none.
pub fn labels(labels: &novacron_types::Labels) -> String {
    if labels.is_empty() {
        return "-".into();
    }
    labels
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}
