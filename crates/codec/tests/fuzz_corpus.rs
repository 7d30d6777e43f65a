//! Replays the committed cargo-fuzz corpus (`crates/codec/fuzz/corpus/<target>/`) through the same
//! entry points the fuzz targets call, so every stable test run checks that no corpus input
//! panics. `regenerate_fuzz_seeds` (ignored) rewrites the seed files from real encoder output.

use std::path::{Path, PathBuf};

use novacron_codec::chunk::{ChunkEncoder, ChunkEncoderConfig};
use novacron_codec::fuzzing::{apply_delta_input, decode_chunk_stream, decode_page_stream};
use novacron_codec::page::{PageEncoder, PageEncoderConfig};
use novacron_codec::{MemoryRepository, NothingRemote, PAGE_SIZE};

fn corpus_directory(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut inputs: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(corpus_directory(target))
        .unwrap_or_else(|error| panic!("corpus of {target} missing: {error}"))
        .map(|entry| {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    inputs.sort();
    inputs
}

#[test]
fn page_frame_corpus_decodes_without_panicking() {
    let inputs = corpus("page_frames");
    assert!(
        inputs.len() >= 4,
        "page corpus has only {} inputs",
        inputs.len()
    );
    for (_, bytes) in &inputs {
        decode_page_stream(bytes);
    }
}

#[test]
fn chunk_frame_corpus_decodes_without_panicking() {
    let inputs = corpus("chunk_frames");
    assert!(
        inputs.len() >= 3,
        "chunk corpus has only {} inputs",
        inputs.len()
    );
    for (_, bytes) in &inputs {
        decode_chunk_stream(bytes);
    }
}

#[test]
fn delta_corpus_applies_without_panicking() {
    let inputs = corpus("delta");
    assert!(!inputs.is_empty());
    for (_, bytes) in &inputs {
        apply_delta_input(bytes);
    }
}

fn text(length: usize, seed: u64) -> Vec<u8> {
    let words: [&[u8]; 6] = [
        b"kernel ",
        b"page ",
        b"0000 ",
        b"\n",
        b"migration ",
        b"ffff ",
    ];
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(length);
    while out.len() < length {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        out.extend_from_slice(words[(state >> 61) as usize % words.len()]);
    }
    out.truncate(length);
    out
}

fn write_seed(target: &str, name: &str, bytes: &[u8]) {
    let directory = corpus_directory(target);
    std::fs::create_dir_all(&directory).unwrap();
    std::fs::write(directory.join(name), bytes).unwrap();
}

#[test]
#[ignore = "rewrites the committed seed corpus; run by hand after a frame format change"]
fn regenerate_fuzz_seeds() {
    // Page streams: every tier, several frames, compressed and plain bodies.
    let page = |seed: u64| -> [u8; PAGE_SIZE] { text(PAGE_SIZE, seed).try_into().unwrap() };
    let mut stream = Vec::new();
    let mut encoder = PageEncoder::new(
        PageEncoderConfig {
            pages_per_frame: 4,
            ..Default::default()
        },
        NothingRemote,
    )
    .unwrap();
    for (index, content) in [[0u8; PAGE_SIZE], page(1), page(2), page(1)]
        .iter()
        .enumerate()
    {
        encoder
            .push_page("pc.ram", index as u64 * PAGE_SIZE as u64, content)
            .unwrap();
    }
    encoder.finish_frame(&mut stream).unwrap();
    let mut changed = page(2);
    changed[100] ^= 1;
    encoder
        .push_page("pc.ram", 2 * PAGE_SIZE as u64, &changed)
        .unwrap();
    encoder
        .push_page("/rom@etc/acpi/tables", 0, &page(3))
        .unwrap();
    encoder.finish_frame(&mut stream).unwrap();
    write_seed("page_frames", "seed-all-tiers", &stream);

    let mut single = Vec::new();
    let mut encoder = PageEncoder::new(PageEncoderConfig::default(), NothingRemote).unwrap();
    encoder.push_page("pc.ram", 0, &[0u8; PAGE_SIZE]).unwrap();
    encoder.finish_frame(&mut single).unwrap();
    write_seed("page_frames", "seed-one-zero-page-plain-body", &single);

    let mut literal = Vec::new();
    let mut encoder = PageEncoder::new(PageEncoderConfig::default(), NothingRemote).unwrap();
    encoder.push_page("pc.bios", 8192, &page(9)).unwrap();
    encoder.finish_frame(&mut literal).unwrap();
    write_seed("page_frames", "seed-literal", &literal);
    write_seed(
        "page_frames",
        "seed-truncated",
        &literal[..literal.len() / 2],
    );

    // Chunk streams: literal, zero, known-in-transfer, split.
    let mut base = text(100_000, 5);
    base[40_000..60_000].fill(0);
    let mut chunks = Vec::new();
    let mut encoder = ChunkEncoder::new(
        ChunkEncoderConfig {
            frame_input_target: 64 << 10,
            ..Default::default()
        },
        NothingRemote,
    )
    .unwrap();
    let mut doubled = base.clone();
    doubled.extend_from_slice(&base);
    encoder
        .encode_reader(&doubled[..], |frame| {
            chunks.extend_from_slice(frame);
            Ok(())
        })
        .unwrap();
    write_seed("chunk_frames", "seed-literal-zero-known", &chunks);

    let mut destination = MemoryRepository::new();
    for block in base.chunks_exact(PAGE_SIZE) {
        destination.insert(block);
    }
    let mut modified = base.clone();
    modified[70_000] ^= 0xff;
    let mut split = Vec::new();
    let mut encoder = ChunkEncoder::new(ChunkEncoderConfig::default(), destination).unwrap();
    encoder
        .encode_reader(&modified[..], |frame| {
            split.extend_from_slice(frame);
            Ok(())
        })
        .unwrap();
    write_seed("chunk_frames", "seed-split-with-blocks", &split);
    let mut small = Vec::new();
    let mut encoder = ChunkEncoder::new(ChunkEncoderConfig::default(), NothingRemote).unwrap();
    encoder
        .encode_reader(&b"tiny file"[..], |frame| {
            small.extend_from_slice(frame);
            Ok(())
        })
        .unwrap();
    write_seed("chunk_frames", "seed-tiny-plain", &small);

    // Deltas.
    let old: [u8; PAGE_SIZE] = page(1);
    let mut new = old;
    new[10] ^= 0x55;
    new[4000..4010].fill(7);
    let mut delta = Vec::new();
    assert!(novacron_codec::delta::encode_delta(
        &old, &new, PAGE_SIZE, &mut delta
    ));
    write_seed("delta", "seed-two-runs", &delta);
    write_seed("delta", "seed-empty", &[]);
}
