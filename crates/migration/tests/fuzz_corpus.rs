//! Replays the committed cargo-fuzz corpus (`crates/migration/fuzz/corpus/<target>/`) through the
//! same entry points the fuzz targets call, so every stable test run checks that no corpus input
//! panics. `regenerate_fuzz_seeds` (ignored) rewrites the seed files from synthetic streams.

use std::path::{Path, PathBuf};

use novacron_migration::fuzzing::{
    decode_proxy_input, parse_multifd_input, parse_nbd_input, parse_stream_input,
};
use novacron_migration::synthetic::{multifd_seed_channel, nbd_connection, two_pass_stream};
use novacron_migration::{ProxyConfig, ProxyEncoder, StreamFormat};

fn corpus_directory(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(corpus_directory(target))
        .unwrap_or_else(|error| panic!("corpus of {target} missing: {error}"))
        .map(|entry| entry.unwrap().path())
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|path| std::fs::read(path).unwrap())
        .collect()
}

#[test]
fn stream_corpus_parses_without_panicking() {
    let inputs = corpus("stream");
    assert!(
        inputs.len() >= 2,
        "stream corpus has {} inputs",
        inputs.len()
    );
    for bytes in &inputs {
        parse_stream_input(bytes);
    }
}

#[test]
fn nbd_corpus_parses_without_panicking() {
    let inputs = corpus("nbd");
    assert!(!inputs.is_empty());
    for bytes in &inputs {
        parse_nbd_input(bytes);
    }
}

#[test]
fn multifd_corpus_parses_without_panicking() {
    let inputs = corpus("multifd");
    assert!(!inputs.is_empty());
    for bytes in &inputs {
        parse_multifd_input(bytes);
    }
}

#[test]
fn proxy_message_corpus_decodes_without_panicking() {
    let inputs = corpus("proxy_messages");
    assert!(!inputs.is_empty());
    for bytes in &inputs {
        decode_proxy_input(bytes);
    }
}

/// The fuzz input of `proxy_messages`: a format byte (0 migration stream, 1 NBD, 2 a multifd
/// channel), then the proxy's messages for `stream`.
fn proxy_messages(format: StreamFormat, stream: &[u8]) -> Vec<u8> {
    let mut config = ProxyConfig {
        format,
        ..ProxyConfig::default()
    };
    config.encoder.mirror_page_limit = 4096;
    let mut encoder = ProxyEncoder::new(&config).unwrap();
    let mut messages = vec![match format {
        StreamFormat::Migration => 0,
        StreamFormat::Nbd => 1,
        StreamFormat::Multifd => 2,
    }];
    encoder.push(stream, &mut messages).unwrap();
    encoder.finish(&mut messages).unwrap();
    messages
}

/// Rewrites the seeds: `cargo test -p novacron-migration --test fuzz_corpus -- --ignored`.
#[test]
#[ignore]
fn regenerate_fuzz_seeds() {
    for (name, pages) in [("seed-small", 2u64), ("seed-medium", 8)] {
        let stream = two_pass_stream(pages);
        let mut input = vec![3u8];
        input.extend_from_slice(&stream);
        std::fs::write(corpus_directory("stream").join(name), &input).unwrap();
        std::fs::write(
            corpus_directory("proxy_messages").join(name),
            proxy_messages(StreamFormat::Migration, &stream),
        )
        .unwrap();
    }
    let connection = nbd_connection();
    let mut input = vec![3u8];
    input.extend_from_slice(&connection);
    std::fs::create_dir_all(corpus_directory("nbd")).unwrap();
    std::fs::write(corpus_directory("nbd").join("seed-connection"), &input).unwrap();
    std::fs::write(
        corpus_directory("proxy_messages").join("seed-nbd"),
        proxy_messages(StreamFormat::Nbd, &connection),
    )
    .unwrap();
    let channel = multifd_seed_channel();
    let mut input = vec![3u8];
    input.extend_from_slice(&channel);
    std::fs::create_dir_all(corpus_directory("multifd")).unwrap();
    std::fs::write(corpus_directory("multifd").join("seed-channel"), &input).unwrap();
    std::fs::write(
        corpus_directory("proxy_messages").join("seed-multifd"),
        proxy_messages(StreamFormat::Multifd, &channel),
    )
    .unwrap();
}
