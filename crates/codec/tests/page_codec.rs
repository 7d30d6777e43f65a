//! Page codec: encode → decode round trips on every tier, the mirror kept in step on both sides,
//! and rejection of frames that do not fit the receiver's state.

use novacron_codec::page::{PageDecoder, PageDecoderConfig, PageEncoder, PageEncoderConfig};
use novacron_codec::{
    ContentHash, DecodeError, MemoryRepository, NothingLocal, NothingRemote, PAGE_SIZE, Page,
};
use proptest::prelude::*;

fn pseudo_random_page(seed: u64) -> Page {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut page = [0u8; PAGE_SIZE];
    for word in page.chunks_exact_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        word.copy_from_slice(&state.to_le_bytes());
    }
    page
}

fn text_page(seed: u64) -> Page {
    const WORDS: [&str; 12] = [
        "migration",
        "page ",
        "kernel",
        " the ",
        "buffer",
        "\n",
        "struct ",
        "0x00 ",
        "guest",
        "dirty ",
        "log",
        "=1 ",
    ];
    let mut page = [0u8; PAGE_SIZE];
    let mut state = seed | 1;
    let mut position = 0;
    while position < PAGE_SIZE {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let word = WORDS[(state >> 60) as usize % WORDS.len()].as_bytes();
        let take = word.len().min(PAGE_SIZE - position);
        page[position..position + take].copy_from_slice(&word[..take]);
        position += take;
    }
    page
}

#[derive(Clone, Debug)]
enum Operation {
    /// Send a page of some kind at (block, page index).
    Send {
        block: u8,
        page: u8,
        kind: u8,
        seed: u64,
    },
    /// End the current frame.
    Flush,
    /// Record a page on both sides outside the codec (between frames).
    Observe { block: u8, page: u8, seed: u64 },
}

fn operation() -> impl Strategy<Value = Operation> {
    prop_oneof![
        8 => (0u8..3, 0u8..24, 0u8..6, any::<u64>()).prop_map(|(block, page, kind, seed)| Operation::Send { block, page, kind, seed }),
        1 => Just(Operation::Flush),
        1 => (0u8..4, 0u8..24, any::<u64>()).prop_map(|(block, page, seed)| Operation::Observe { block, page, seed }),
    ]
}

const BLOCKS: [&str; 4] = ["pc.ram", "/rom@etc/acpi/tables", "pc.bios", "observed-only"];

struct Harness {
    encoder: PageEncoder<MemoryRepository>,
    decoder: PageDecoder<MemoryRepository>,
    /// Last content at each key, as the destination should hold it.
    current: std::collections::HashMap<(u8, u8), Page>,
    sent: Vec<(String, u64, Page)>,
    received: Vec<(String, u64, Page)>,
    frame: Vec<u8>,
}

impl Harness {
    fn new(remote: MemoryRepository, config: PageEncoderConfig) -> Self {
        Self::keeping(remote, config, true)
    }

    /// With the decoder keeping copies of pages read from `remote` or not (reading them
    /// again when a later page refers to them).
    fn keeping(
        remote: MemoryRepository,
        config: PageEncoderConfig,
        keep_local_content: bool,
    ) -> Self {
        let decoder = PageDecoderConfig {
            mirror_page_limit: config.mirror_page_limit,
            keep_local_content,
        };
        Self {
            encoder: PageEncoder::new(config, remote.clone()).unwrap(),
            decoder: PageDecoder::new(decoder, remote).unwrap(),
            current: Default::default(),
            sent: Vec::new(),
            received: Vec::new(),
            frame: Vec::new(),
        }
    }

    fn flush(&mut self) {
        self.frame.clear();
        let written = self.encoder.finish_frame(&mut self.frame).unwrap();
        assert_eq!(written, self.frame.len());
        if written > 0 {
            let received = &mut self.received;
            self.decoder
                .decode_frame(&self.frame, |block, offset, page, _| {
                    received.push((block.to_owned(), offset, *page))
                })
                .unwrap();
        }
    }

    fn content_for(&self, block: u8, page: u8, kind: u8, seed: u64) -> Page {
        match kind {
            0 => [0u8; PAGE_SIZE],
            1 => pseudo_random_page(seed),
            2 => pseudo_random_page(seed % 4), // a small pool: duplicates across keys
            3 => {
                let mut content = self
                    .current
                    .get(&(block, page))
                    .copied()
                    .unwrap_or_else(|| text_page(seed));
                for step in 0..(seed % 5 + 1) {
                    let index = ((seed >> (step * 12)) as usize) % PAGE_SIZE;
                    content[index] = content[index].wrapping_add(1 + step as u8);
                }
                content
            }
            4 => text_page(seed),
            _ => text_page(seed % 3),
        }
    }

    fn run(&mut self, operations: &[Operation]) {
        for operation in operations {
            match *operation {
                Operation::Send {
                    block,
                    page,
                    kind,
                    seed,
                } => {
                    let content = self.content_for(block, page, kind, seed);
                    let offset = u64::from(page) * PAGE_SIZE as u64;
                    let name = BLOCKS[block as usize];
                    self.sent.push((name.to_owned(), offset, content));
                    self.current.insert((block, page), content);
                    if self.encoder.push_page(name, offset, &content).unwrap() {
                        self.flush();
                    }
                }
                Operation::Flush => self.flush(),
                Operation::Observe { block, page, seed } => {
                    self.flush();
                    let content = self.content_for(block, page, 3, seed);
                    let offset = u64::from(page) * PAGE_SIZE as u64;
                    let name = BLOCKS[block as usize];
                    self.current.insert((block, page), content);
                    self.encoder.observe_page(name, offset, &content).unwrap();
                    self.decoder.observe_page(name, offset, &content).unwrap();
                }
            }
        }
        self.flush();
    }
}

fn remote_with_pool() -> MemoryRepository {
    let mut remote = MemoryRepository::new();
    remote.insert(&pseudo_random_page(0));
    remote.insert(&pseudo_random_page(1));
    remote.insert(&text_page(2));
    remote
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn pages_round_trip_on_every_tier(
        operations in proptest::collection::vec(operation(), 1..160),
        pages_per_frame in 1usize..40,
        level in prop_oneof![Just(1), Just(3), Just(9)],
        delta_cache_pages in prop_oneof![Just(0usize), 1usize..8, Just(16_384usize)],
        keep_local_content in any::<bool>(),
    ) {
        let config = PageEncoderConfig { pages_per_frame, zstd_level: level, delta_cache_pages, ..PageEncoderConfig::default() };
        let mut harness = Harness::keeping(remote_with_pool(), config, keep_local_content);
        harness.run(&operations);
        prop_assert_eq!(harness.sent.len(), harness.received.len());
        for (index, (sent, received)) in harness.sent.iter().zip(&harness.received).enumerate() {
            prop_assert!(sent == received, "page {} differs: sent {}+{:#x}, received {}+{:#x}", index, sent.0, sent.1, received.0, received.1);
        }
        let encoded = harness.encoder.stats();
        let decoded = harness.decoder.stats();
        prop_assert_eq!(encoded.zero_pages, decoded.zero_pages);
        prop_assert_eq!(encoded.delta_pages, decoded.delta_pages);
        prop_assert_eq!(encoded.literal_pages, decoded.literal_pages);
        prop_assert_eq!(encoded.known_from_transfer + encoded.known_from_destination,
            decoded.known_from_transfer + decoded.known_from_destination);
    }
}

#[test]
fn every_tier_is_used_and_round_trips() {
    let mut harness = Harness::new(
        remote_with_pool(),
        PageEncoderConfig {
            pages_per_frame: 8,
            ..Default::default()
        },
    );
    let operations = vec![
        Operation::Send {
            block: 0,
            page: 0,
            kind: 0,
            seed: 0,
        }, // zero
        Operation::Send {
            block: 0,
            page: 1,
            kind: 2,
            seed: 1,
        }, // held by the destination
        Operation::Send {
            block: 0,
            page: 2,
            kind: 4,
            seed: 77,
        }, // literal text
        Operation::Send {
            block: 1,
            page: 0,
            kind: 1,
            seed: 9,
        }, // literal random
        Operation::Flush,
        Operation::Send {
            block: 0,
            page: 3,
            kind: 4,
            seed: 77,
        }, // same as page 2: known from transfer
        Operation::Send {
            block: 0,
            page: 2,
            kind: 3,
            seed: 5,
        }, // small change of page 2: delta
        Operation::Flush,
    ];
    harness.run(&operations);
    assert_eq!(harness.sent, harness.received);
    let stats = harness.encoder.stats();
    assert_eq!(stats.zero_pages, 1);
    assert_eq!(stats.known_from_destination, 1);
    assert_eq!(stats.known_from_transfer, 1);
    assert_eq!(stats.delta_pages, 1);
    assert_eq!(stats.literal_pages, 2);
    assert_eq!(harness.decoder.stats().known_from_destination, 1);
}

#[test]
fn batches_compress_text_pages_well() {
    let mut encoder = PageEncoder::new(PageEncoderConfig::default(), NothingRemote).unwrap();
    let mut frame = Vec::new();
    for index in 0..256u64 {
        encoder
            .push_page("pc.ram", index * PAGE_SIZE as u64, &text_page(index + 1000))
            .unwrap();
    }
    encoder.finish_frame(&mut frame).unwrap();
    let ratio = (256 * PAGE_SIZE) as f64 / frame.len() as f64;
    assert!(ratio > 3.0, "text pages compressed only {ratio:.2}x");
}

#[test]
fn known_page_missing_at_destination_is_an_error() {
    // The encoder believes the destination holds a page; the decoder's store does not.
    let remote = remote_with_pool();
    let mut encoder = PageEncoder::new(PageEncoderConfig::default(), remote).unwrap();
    let mut decoder = PageDecoder::new(PageDecoderConfig::default(), NothingLocal).unwrap();
    let mut frame = Vec::new();
    encoder
        .push_page("pc.ram", 0, &pseudo_random_page(0))
        .unwrap();
    encoder.finish_frame(&mut frame).unwrap();
    let error = decoder.decode_frame(&frame, |_, _, _, _| {}).unwrap_err();
    assert!(
        matches!(error, DecodeError::UnknownHash { hash } if hash == ContentHash::of(&pseudo_random_page(0)))
    );
}

#[test]
fn delta_against_a_page_the_decoder_never_saw_is_an_error() {
    let mut encoder = PageEncoder::new(PageEncoderConfig::default(), NothingRemote).unwrap();
    let mut frame = Vec::new();
    let first = text_page(1);
    encoder.push_page("pc.ram", 0, &first).unwrap();
    encoder.finish_frame(&mut frame).unwrap();
    let mut second = first;
    second[10] ^= 0xff;
    frame.clear();
    encoder.push_page("pc.ram", 0, &second).unwrap();
    encoder.finish_frame(&mut frame).unwrap();
    assert_eq!(encoder.stats().delta_pages, 1);
    // A fresh decoder gets only the second frame: it refers to block 0 it never heard of.
    let mut decoder = PageDecoder::new(PageDecoderConfig::default(), NothingLocal).unwrap();
    assert!(decoder.decode_frame(&frame, |_, _, _, _| {}).is_err());
}

#[test]
fn mirror_limit_is_enforced_on_both_sides() {
    let config = PageEncoderConfig {
        mirror_page_limit: 4,
        ..Default::default()
    };
    let mut encoder = PageEncoder::new(config, NothingRemote).unwrap();
    for index in 0..4u64 {
        encoder
            .push_page("pc.ram", index * PAGE_SIZE as u64, &text_page(index))
            .unwrap();
    }
    // A fifth key does not fit; a known key still does.
    assert!(matches!(
        encoder.push_page("pc.ram", 4 * PAGE_SIZE as u64, &text_page(4)),
        Err(novacron_codec::EncodeError::MirrorFull { limit: 4 })
    ));
    encoder.push_page("pc.ram", 0, &text_page(9)).unwrap();
    let mut frame = Vec::new();

    let mut encoder = PageEncoder::new(PageEncoderConfig::default(), NothingRemote).unwrap();
    for index in 0..5u64 {
        encoder
            .push_page("pc.ram", index * PAGE_SIZE as u64, &text_page(index))
            .unwrap();
    }
    frame.clear();
    encoder.finish_frame(&mut frame).unwrap();
    let mut decoder = PageDecoder::new(
        PageDecoderConfig {
            mirror_page_limit: 4,
            ..PageDecoderConfig::default()
        },
        NothingLocal,
    )
    .unwrap();
    assert!(matches!(
        decoder.decode_frame(&frame, |_, _, _, _| {}),
        Err(DecodeError::MirrorFull { limit: 4 })
    ));
}

#[test]
fn caller_mistakes_are_errors() {
    let mut encoder = PageEncoder::new(
        PageEncoderConfig {
            pages_per_frame: 1,
            ..Default::default()
        },
        NothingRemote,
    )
    .unwrap();
    assert!(encoder.push_page("pc.ram", 17, &[0u8; PAGE_SIZE]).is_err());
    assert!(encoder.push_page("", 0, &[0u8; PAGE_SIZE]).is_err());
    assert!(encoder.push_page("pc.ram", 0, &[0u8; PAGE_SIZE]).unwrap());
    assert!(
        encoder
            .push_page("pc.ram", 4096, &[0u8; PAGE_SIZE])
            .is_err()
    );
    assert!(
        encoder
            .observe_page("pc.ram", 0, &[0u8; PAGE_SIZE])
            .is_err()
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Corrupting any byte of a valid frame yields an error or a (different) decode, never a panic.
    #[test]
    fn corrupted_frames_never_panic(position in any::<prop::sample::Index>(), value in any::<u8>(), truncate in any::<bool>()) {
        let mut encoder = PageEncoder::new(PageEncoderConfig::default(), remote_with_pool()).unwrap();
        let mut frame = Vec::new();
        for index in 0..12u64 {
            let page = match index % 4 { 0 => [0u8; PAGE_SIZE], 1 => pseudo_random_page(index % 2), 2 => text_page(index), _ => pseudo_random_page(index) };
            encoder.push_page(if index < 6 { "pc.ram" } else { "pc.rom" }, index * PAGE_SIZE as u64, &page).unwrap();
        }
        encoder.finish_frame(&mut frame).unwrap();
        let at = position.index(frame.len());
        if truncate { frame.truncate(at); } else { frame[at] = value; }
        let mut decoder = PageDecoder::new(PageDecoderConfig::default(), remote_with_pool()).unwrap();
        let _ = decoder.decode_frame(&frame, |_, _, _, _| {});
    }
}

/// The migration proxy and the transport move codec state between threads and tasks.
#[test]
fn codec_state_can_move_between_threads() {
    fn assert_send<T: Send>() {}
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send::<PageEncoder<MemoryRepository>>();
    assert_send::<PageDecoder<MemoryRepository>>();
    assert_send::<novacron_codec::ChunkEncoder<MemoryRepository>>();
    assert_send::<novacron_codec::ChunkDecoder<MemoryRepository>>();
    assert_send_sync::<novacron_codec::ChunkStore>();
}

/// A decoder that does not keep pages read from its source reads them again for a later known
/// reference and for a delta against them, and rebuilds the same pages.
#[test]
fn pages_from_the_source_are_read_again_when_not_kept() {
    for keep_local_content in [true, false] {
        let mut harness = Harness::keeping(
            remote_with_pool(),
            PageEncoderConfig {
                pages_per_frame: 1,
                ..Default::default()
            },
            keep_local_content,
        );
        let operations = [
            // Held by the destination, at two keys: the second refers to the first's hash.
            Operation::Send {
                block: 0,
                page: 1,
                kind: 2,
                seed: 1,
            },
            Operation::Send {
                block: 0,
                page: 2,
                kind: 2,
                seed: 1,
            },
            // A small change to the first: a delta against the page read from the source.
            Operation::Send {
                block: 0,
                page: 1,
                kind: 3,
                seed: 9,
            },
            Operation::Flush,
        ];
        harness.run(&operations);
        assert_eq!(harness.sent, harness.received, "keep {keep_local_content}");
        let decoded = harness.decoder.stats();
        assert_eq!(decoded.delta_pages, 1, "keep {keep_local_content}");
        assert_eq!(
            decoded.known_from_transfer + decoded.known_from_destination,
            2,
            "keep {keep_local_content}"
        );
    }
}

/// A destination index the encoder can consult itself, counting the pages it was asked about
/// in frame batches.
struct LocalIndex {
    held: MemoryRepository,
    batched_questions: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl novacron_codec::RemoteHashQuery for LocalIndex {
    fn which_of(&mut self, hashes: &[ContentHash]) -> Result<Vec<bool>, novacron_codec::BoxError> {
        self.batched_questions
            .fetch_add(hashes.len(), std::sync::atomic::Ordering::Relaxed);
        self.held.which_of(hashes)
    }

    fn holds_locally(&mut self, hash: &ContentHash) -> Option<bool> {
        Some(self.held.which_of(&[*hash]).expect("memory")[0])
    }
}

#[test]
fn pages_a_local_index_holds_are_settled_as_pushed_and_decode() {
    let held = remote_with_pool();
    let batched_questions = std::sync::Arc::default();
    let mut encoder = PageEncoder::new(
        PageEncoderConfig::default(),
        LocalIndex {
            held: held.clone(),
            batched_questions: std::sync::Arc::clone(&batched_questions),
        },
    )
    .unwrap();
    let mut decoder = PageDecoder::new(
        PageDecoderConfig {
            mirror_page_limit: PageEncoderConfig::default().mirror_page_limit,
            keep_local_content: false,
        },
        held,
    )
    .unwrap();
    let pages = [pseudo_random_page(0), text_page(2), pseudo_random_page(77)];
    for (index, page) in pages.iter().enumerate() {
        encoder
            .push_page("pc.ram", index as u64 * PAGE_SIZE as u64, page)
            .unwrap();
    }
    let mut frame = Vec::new();
    encoder.finish_frame(&mut frame).unwrap();
    let stats = encoder.stats().clone();
    assert_eq!(stats.known_from_destination, 2);
    assert_eq!(stats.literal_pages, 1);
    assert_eq!(
        batched_questions.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the index answered every page as it was pushed: nothing is left for the frame's batch"
    );
    let mut received = Vec::new();
    decoder
        .decode_frame(&frame, |_, offset, page, hash| {
            assert_eq!(*hash, ContentHash::of(&page[..]));
            received.push((offset, *page));
        })
        .unwrap();
    let expected: Vec<(u64, Page)> = pages
        .iter()
        .enumerate()
        .map(|(index, page)| (index as u64 * PAGE_SIZE as u64, *page))
        .collect();
    assert_eq!(received, expected);
    assert_eq!(decoder.stats().known_from_destination, 2);
}
