//! The proxy's codec alone, on a real QEMU migration stream: how fast one core encodes (source)
//! and decodes, rebuilds and verifies (destination) it, with no QEMU, link, transport or TLS,
//! against what QEMU's multifd spends on the same bytes (zstd level 1 per 512 KiB packet, its
//! defaults) and one BLAKE3 pass.
//!
//! The stream and the base image come from `migration_wan --save-stream DIR` (QEMU's precopy of
//! the bench guest into a file; with `--disk-mib N` the guest has read its disk, whose base image
//! is saved beside it as `base.raw`): see bench/migration/README.md. Then:
//!
//! ```sh
//! cargo bench -p novacron-migration --bench proxy_codec -- --stream-dir DIR [--rounds N]
//! ```
//!
//! Each round encodes the whole stream into messages in memory, then decodes them into a
//! rebuilt stream that is compared with the original byte for byte (outside the timing). One
//! table, the median round of each row.

#[path = "support/arguments.rs"]
mod arguments;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use novacron_migration::{
    ImagePageIndex, ProxyConfig, ProxyDecoder, ProxyEncoder, ProxyReport, SharedImagePages,
};

/// Bytes the source hands the encoder per call: `ProxyConfig::default().read_size`, what it
/// reads from QEMU's socket at a time.
fn read_size() -> usize {
    ProxyConfig::default().read_size
}

/// QEMU's multifd packet: 128 pages of 4 KiB per channel send.
const MULTIFD_PACKET: usize = 128 * 4096;
/// QEMU's default `multifd-zstd-level`.
const MULTIFD_ZSTD_LEVEL: i32 = 1;

struct Options {
    stream_dir: PathBuf,
    rounds: usize,
    /// Also time multifd's zstd and a BLAKE3 pass (`--baselines false`: the proxy alone, for a
    /// profile).
    baselines: bool,
}

const USAGE: &str = "
The proxy's codec alone on a saved QEMU migration stream (bench/migration/README.md).

cargo bench -p novacron-migration --bench proxy_codec -- --stream-dir DIR [options]

  --stream-dir DIR    a directory `migration_wan --save-stream DIR` filled (required)
  --rounds N          rounds to run; the median of each row is shown (default 3)
  --baselines BOOL    also time multifd's zstd and a BLAKE3 pass (default true)
";

/// The options, or `None` when `--help` was asked for (and printed).
fn parse_options() -> anyhow::Result<Option<Options>> {
    let mut stream_dir = None;
    let mut rounds = 3;
    let mut baselines = true;
    let Some(values) = arguments::named_values(USAGE)? else {
        return Ok(None);
    };
    for (name, value) in values {
        match name.as_str() {
            "--stream-dir" => stream_dir = Some(PathBuf::from(value)),
            "--rounds" => rounds = value.parse()?,
            "--baselines" => baselines = value.parse()?,
            other => bail!("unknown option {other:?}: --help lists the options"),
        }
    }
    let Some(stream_dir) = stream_dir else {
        bail!(
            "--stream-dir DIR is required: a directory `migration_wan --save-stream DIR` \
             filled (see bench/migration/README.md)"
        );
    };
    anyhow::ensure!(rounds >= 1, "--rounds must be at least 1");
    Ok(Some(Options {
        stream_dir,
        rounds,
        baselines,
    }))
}

fn config(image_pages: &SharedImagePages) -> ProxyConfig {
    ProxyConfig {
        image_pages: image_pages.clone(),
        ..ProxyConfig::default()
    }
}

/// Encodes `stream` as the source does; returns the messages, the report and the seconds.
fn encode(
    stream: &[u8],
    image_pages: &SharedImagePages,
) -> anyhow::Result<(Vec<u8>, ProxyReport, f64)> {
    let mut messages = Vec::with_capacity(stream.len() / 4);
    let started = Instant::now();
    let mut encoder = ProxyEncoder::new(&config(image_pages))?;
    for piece in stream.chunks(read_size()) {
        encoder.push(piece, &mut messages)?;
    }
    encoder.finish(&mut messages)?;
    let seconds = started.elapsed().as_secs_f64();
    Ok((messages, encoder.report(), seconds))
}

/// Decodes `messages` as the destination does, handing the rebuilt stream on in pieces (as to
/// QEMU's socket) and comparing it with `original`; returns the report and the seconds.
fn decode(
    messages: &[u8],
    original: &[u8],
    image_pages: &SharedImagePages,
) -> anyhow::Result<(ProxyReport, f64)> {
    let mut rebuilt = Vec::with_capacity(16 << 20);
    let mut position = 0usize;
    let mut mismatch = None;
    let mut seconds = 0.0;
    let mut decoder = ProxyDecoder::new(&config(image_pages))?;
    for piece in messages.chunks(read_size()) {
        let started = Instant::now();
        decoder.push(piece, &mut rebuilt)?;
        seconds += started.elapsed().as_secs_f64();
        // The bench's own byte-for-byte check, not timed: the decoder proves the stream with
        // its digest, which takes each page's hash for its payload.
        let end = position + rebuilt.len();
        if mismatch.is_none() && original.get(position..end) != Some(&rebuilt[..]) {
            mismatch = Some(position);
        }
        position = end;
        rebuilt.clear();
    }
    anyhow::ensure!(decoder.is_complete(), "the decoder did not see the end");
    if let Some(offset) = mismatch {
        bail!("the rebuilt stream differs from the original at or after byte {offset}");
    }
    anyhow::ensure!(
        position == original.len(),
        "rebuilt {position} bytes of {}",
        original.len()
    );
    Ok((decoder.report(), seconds))
}

/// QEMU multifd's source-side work on the same bytes: zstd per packet.
fn multifd_zstd(stream: &[u8]) -> anyhow::Result<(u64, f64)> {
    let started = Instant::now();
    let mut compressor = zstd::bulk::Compressor::new(MULTIFD_ZSTD_LEVEL)?;
    let mut out = 0u64;
    for packet in stream.chunks(MULTIFD_PACKET) {
        out += compressor.compress(packet)?.len() as u64;
    }
    Ok((out, started.elapsed().as_secs_f64()))
}

fn blake3_pass(stream: &[u8]) -> f64 {
    let started = Instant::now();
    let hash = blake3::hash(stream);
    std::hint::black_box(hash);
    started.elapsed().as_secs_f64()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn load_index(base: &Path) -> anyhow::Result<(SharedImagePages, Option<f64>)> {
    if !base.exists() {
        return Ok((SharedImagePages::default(), None));
    }
    let started = Instant::now();
    let index = ImagePageIndex::build(base)
        .with_context(|| format!("indexing the base image {}", base.display()))?;
    Ok((
        SharedImagePages::new(Some(Arc::new(index))),
        Some(started.elapsed().as_secs_f64()),
    ))
}

fn main() -> anyhow::Result<()> {
    let Some(options) = parse_options()? else {
        return Ok(());
    };
    let stream_path = options.stream_dir.join("stream.bin");
    let stream = std::fs::read(&stream_path).with_context(|| {
        format!(
            "reading {} (made by `migration_wan --save-stream DIR`)",
            stream_path.display()
        )
    })?;
    let (image_pages, index_seconds) = load_index(&options.stream_dir.join("base.raw"))?;
    let megabytes = stream.len() as f64 / 1e6;
    println!(
        "stream: {} ({megabytes:.1} MB){}",
        stream_path.display(),
        match index_seconds {
            Some(seconds) => format!(
                "; base image indexed in {seconds:.2} s (once per image, not counted below)"
            ),
            None => "; no base.raw: no base image".to_string(),
        }
    );

    let mut encode_seconds = Vec::new();
    let mut decode_seconds = Vec::new();
    let mut multifd_seconds = Vec::new();
    let mut blake3_seconds = Vec::new();
    let mut last = None;
    let mut multifd_bytes = 0;
    for round in 0..options.rounds {
        let (messages, source, encoded) = encode(&stream, &image_pages)?;
        let (destination, decoded) = decode(&messages, &stream, &image_pages)?;
        anyhow::ensure!(
            source.stream_checksum == destination.stream_checksum,
            "round {round}: the two sides' checksums differ"
        );
        encode_seconds.push(encoded);
        decode_seconds.push(decoded);
        if options.baselines {
            let (compressed, multifd) = multifd_zstd(&stream)?;
            multifd_seconds.push(multifd);
            blake3_seconds.push(blake3_pass(&stream));
            multifd_bytes = compressed;
        }
        last = Some((messages.len(), source));
    }
    let (message_bytes, source) = last.expect("at least one round");
    let codec = &source.codec;
    println!(
        "pages: {} ({} zero, {} sent earlier, {} held at the destination, {} delta, {} literal); \
         opaque {:.1} MB",
        codec.pages,
        codec.zero_pages,
        codec.known_from_transfer,
        codec.known_from_destination,
        codec.delta_pages,
        codec.literal_pages,
        source.opaque_bytes as f64 / 1e6
    );
    println!(
        "median of {} round(s), one core, stream {megabytes:.1} MB; the rebuilt stream matched \
         the original in every round",
        options.rounds
    );
    println!("| work | output (MB) | seconds | stream MB/s |");
    println!("|---|---:|---:|---:|");
    let mut rows = vec![
        (
            "novacron proxy source: parse, hash, encode",
            message_bytes as f64 / 1e6,
            median(&mut encode_seconds),
        ),
        (
            "novacron proxy destination: decode, rebuild, verify",
            megabytes,
            median(&mut decode_seconds),
        ),
    ];
    if options.baselines {
        rows.push((
            "qemu multifd source: zstd -1 per 512 KiB packet",
            multifd_bytes as f64 / 1e6,
            median(&mut multifd_seconds),
        ));
        rows.push((
            "one BLAKE3 pass over the stream",
            0.0,
            median(&mut blake3_seconds),
        ));
    }
    for (work, output, seconds) in rows {
        println!(
            "| {work} | {output:.1} | {seconds:.2} | {:.0} |",
            megabytes / seconds
        );
    }
    Ok(())
}
