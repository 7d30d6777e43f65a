//! The benches' command lines: `--name value` pairs, after cargo's own `--bench` flag.

use anyhow::Context;

/// The `--name value` pairs of this bench's command line, in order (cargo's `--bench` left
/// out).
pub fn named_values() -> anyhow::Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut arguments = std::env::args()
        .skip(1)
        .filter(|argument| argument != "--bench");
    while let Some(name) = arguments.next() {
        let value = arguments
            .next()
            .with_context(|| format!("{name} needs a value"))?;
        pairs.push((name, value));
    }
    Ok(pairs)
}
