//! The benches' command lines: `--name value` pairs, after cargo's own `--bench` flag.

use anyhow::Context;

/// The `--name value` pairs of this bench's command line, in order (cargo's `--bench` left
/// out). `--help` (or `-h`) anywhere prints `usage` instead: `None`, the bench has nothing
/// more to do.
pub fn named_values(usage: &str) -> anyhow::Result<Option<Vec<(String, String)>>> {
    let arguments: Vec<String> = std::env::args()
        .skip(1)
        .filter(|argument| argument != "--bench")
        .collect();
    if arguments
        .iter()
        .any(|argument| argument == "--help" || argument == "-h")
    {
        println!("{}", usage.trim());
        return Ok(None);
    }
    let mut pairs = Vec::new();
    let mut arguments = arguments.into_iter();
    while let Some(name) = arguments.next() {
        let value = arguments
            .next()
            .with_context(|| format!("{name} needs a value (--help lists the options)"))?;
        pairs.push((name, value));
    }
    Ok(Some(pairs))
}
