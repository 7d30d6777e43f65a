//! Chunk codec: pinned FastCDC cut points, encode → decode round trips on every tier, and the
//! dedup that matters for images (a modified copy of something the destination holds).

use novacron_codec::chunk::{
    BLOCK_SIZE, ChunkDecoder, ChunkDecoderConfig, ChunkEncoder, ChunkEncoderConfig,
};
use novacron_codec::{
    ChunkBoundary, DEFAULT_CHUNKING, MemoryRepository, NothingRemote, chunk_boundaries,
};
use proptest::prelude::*;

/// Deterministic, platform-independent input: xorshift64 bytes with runs of repeated text, so
/// that cut points depend on content the way real files do.
fn deterministic_input(length: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut data = Vec::with_capacity(length);
    while data.len() < length {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        if state.is_multiple_of(7) {
            data.extend_from_slice(b"the quick brown fox jumps over the lazy dog. ");
        } else {
            data.extend_from_slice(&state.to_le_bytes());
        }
    }
    data.truncate(length);
    data
}

/// Regression pin for `fastcdc = "=5.0.0"` v2020 with [`DEFAULT_CHUNKING`]: if a version bump or
/// a parameter change moves these cut points, every stored image stops deduplicating against
/// new transfers. Update the list only together with a store format version bump.
#[test]
fn fastcdc_cut_points_are_pinned() {
    let data = deterministic_input(1 << 20, 0x6e6f_7661_6372_6f6e);
    let boundaries: Vec<(u64, usize)> = chunk_boundaries(&data, DEFAULT_CHUNKING)
        .into_iter()
        .map(|ChunkBoundary { offset, length }| (offset, length))
        .collect();
    let expected: Vec<(u64, usize)> = PINNED_BOUNDARIES.to_vec();
    assert_eq!(
        boundaries, expected,
        "FastCDC cut points moved: {boundaries:?}"
    );
    // Same cut points when read as a stream.
    let mut streamed = Vec::new();
    novacron_codec::chunk::for_each_chunk(
        &data[..],
        DEFAULT_CHUNKING,
        |offset, bytes| {
            streamed.push((offset, bytes.len()));
            Ok::<(), std::io::Error>(())
        },
        |_, error| error,
    )
    .unwrap();
    assert_eq!(streamed, expected);
}

const PINNED_BOUNDARIES: [(u64, usize); 25] = [
    (0, 11844),
    (11844, 37896),
    (49740, 10136),
    (59876, 76280),
    (136156, 9260),
    (145416, 12353),
    (157769, 42532),
    (200301, 63614),
    (263915, 42490),
    (306405, 14248),
    (320653, 131072),
    (451725, 21245),
    (472970, 40845),
    (513815, 23419),
    (537234, 33844),
    (571078, 53141),
    (624219, 51248),
    (675467, 43359),
    (718826, 36483),
    (755309, 28438),
    (783747, 102687),
    (886434, 60185),
    (946619, 48954),
    (995573, 41654),
    (1037227, 11349),
];

fn decode_all(frames: &[Vec<u8>], repository: MemoryRepository) -> (Vec<u8>, MemoryRepository) {
    let mut decoder = ChunkDecoder::new(ChunkDecoderConfig::default(), repository).unwrap();
    let mut output = Vec::new();
    for frame in frames {
        decoder
            .decode_frame(frame, |bytes| {
                output.extend_from_slice(bytes);
                Ok(())
            })
            .unwrap();
    }
    (output, decoder.into_repository())
}

fn encode_all<Q: novacron_codec::RemoteHashQuery>(
    data: &[u8],
    config: ChunkEncoderConfig,
    query: Q,
) -> (Vec<Vec<u8>>, novacron_codec::ChunkStats) {
    let mut encoder = ChunkEncoder::new(config, query).unwrap();
    let mut frames = Vec::new();
    encoder
        .encode_reader(data, |frame| {
            frames.push(frame.to_vec());
            Ok(())
        })
        .unwrap();
    (frames, encoder.stats().clone())
}

/// A destination holding `image`: its chunks and its 4 KiB-aligned blocks.
fn destination_holding(image: &[u8]) -> MemoryRepository {
    let mut repository = MemoryRepository::new();
    for boundary in chunk_boundaries(image, DEFAULT_CHUNKING) {
        repository
            .insert(&image[boundary.offset as usize..boundary.offset as usize + boundary.length]);
    }
    for block in image.chunks_exact(BLOCK_SIZE) {
        if block.iter().any(|&byte| byte != 0) {
            repository.insert(block);
        }
    }
    repository
}

#[test]
fn modified_image_sends_little_more_than_the_change() {
    let mut base = deterministic_input(4 << 20, 11);
    base[1 << 20..(1 << 20) + 300_000].fill(0); // a zero region
    let mut modified = base.clone();
    // Overwrite 64 KiB in place, insert 10 KiB (shifts everything after), move a 40 KiB file's
    // worth of aligned blocks elsewhere.
    modified[2_000_000..2_065_536].copy_from_slice(&deterministic_input(65_536, 99));
    modified.splice(3_000_000..3_000_000, deterministic_input(10_240, 7));
    let moved = base[8192..8192 + 40_960].to_vec();
    modified[3_500_032 - 3_500_032 % 4096..][..40_960].copy_from_slice(&moved);

    let destination = destination_holding(&base);
    let config = ChunkEncoderConfig {
        frame_input_target: 1 << 20,
        ..Default::default()
    };
    let (frames, stats) = encode_all(&modified, config, destination.clone());
    let wire: usize = frames.iter().map(Vec::len).sum();
    let (output, _) = decode_all(&frames, destination);
    assert!(output == modified, "round trip differs");
    assert!(
        stats.known_from_destination > 0 && stats.zero_chunks > 0,
        "{stats:?}"
    );
    assert!(
        stats.known_blocks > 0,
        "moved blocks were not found: {stats:?}"
    );
    // The change is ~115 KiB of incompressible bytes plus neighbouring chunk pieces.
    assert!(
        wire < 400_000,
        "sent {wire} bytes for a ~115 KiB change; {stats:?}"
    );

    let (frames_without_destination, _) =
        encode_all(&modified, ChunkEncoderConfig::default(), NothingRemote);
    let wire_without: usize = frames_without_destination.iter().map(Vec::len).sum();
    assert!(
        wire * 5 < wire_without,
        "dedup saved too little: {wire} vs {wire_without}"
    );
}

/// A transfer that changes its zstd level between frames (as the link forecast moves) decodes
/// to the same bytes, and the level asked for is the one that compresses each frame.
#[test]
fn the_level_can_change_between_frames() {
    // Text-like input (words drawn from a small vocabulary), where zstd levels differ.
    let words = [
        "migration",
        "page",
        "dirty",
        "link",
        "forecast",
        "chunk",
        "store",
        "raft",
        "leader",
        "region",
        "host",
        "guest",
        "memory",
        "disk",
        "image",
        "stream",
        "frame",
        "level",
    ];
    let mut state = 0x5eed_u64;
    let mut data = Vec::with_capacity(6 << 20);
    while data.len() < 6 << 20 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        data.extend_from_slice(words[(state % words.len() as u64) as usize].as_bytes());
        data.push(if state.is_multiple_of(11) {
            b'\n'
        } else {
            b' '
        });
    }
    let config = ChunkEncoderConfig {
        frame_input_target: 1 << 20,
        ..ChunkEncoderConfig::default()
    };
    let mut encoder = ChunkEncoder::new(config.clone(), NothingRemote).unwrap();
    let levels = [1, 19, -3, 6, 3, 12, 1];
    let mut asked = Vec::new();
    let mut frames = Vec::new();
    encoder
        .encode_reader_choosing_level(
            &data[..],
            |stats| {
                // Statistics so far are handed over: one more frame each time.
                assert_eq!(stats.frames as usize, asked.len());
                let level = levels[asked.len() % levels.len()];
                asked.push(level);
                level
            },
            |frame| {
                frames.push(frame.to_vec());
                Ok(())
            },
        )
        .unwrap();
    assert_eq!(asked.len(), frames.len());
    assert!(frames.len() >= 5, "{} frames", frames.len());
    let (decoded, _) = decode_all(&frames, MemoryRepository::new());
    assert_eq!(decoded, data);
    // The hardest level made a smaller frame than the fastest one would have on the same input.
    let (fixed_fast, _) = encode_all(
        &data,
        ChunkEncoderConfig {
            zstd_level: -3,
            ..config
        },
        NothingRemote,
    );
    let total = |frames: &[Vec<u8>]| frames.iter().map(Vec::len).sum::<usize>();
    assert!(
        total(&frames) < total(&fixed_fast),
        "{} >= {}",
        total(&frames),
        total(&fixed_fast)
    );
}

#[test]
fn repeated_content_within_one_transfer_is_sent_once() {
    let piece = deterministic_input(512 << 10, 3);
    let mut data = piece.clone();
    data.extend_from_slice(&piece);
    data.extend_from_slice(&piece);
    let (frames, stats) = encode_all(
        &data,
        ChunkEncoderConfig {
            frame_input_target: 256 << 10,
            ..Default::default()
        },
        NothingRemote,
    );
    let wire: usize = frames.iter().map(Vec::len).sum();
    assert!(stats.known_from_transfer > 0);
    assert!(
        wire < piece.len() * 3 / 2,
        "sent {wire} bytes for 3 copies of {} bytes",
        piece.len()
    );
    let (output, _) = decode_all(&frames, MemoryRepository::new());
    assert!(output == data);
}

#[test]
fn frames_are_rejected_against_a_destination_that_lost_content() {
    let base = deterministic_input(1 << 20, 5);
    let (frames, _) = encode_all(
        &base,
        ChunkEncoderConfig::default(),
        destination_holding(&base),
    );
    let mut decoder =
        ChunkDecoder::new(ChunkDecoderConfig::default(), MemoryRepository::new()).unwrap();
    assert!(decoder.decode_frame(&frames[0], |_| Ok(())).is_err());
}

fn edit() -> impl Strategy<Value = (u8, u32, u32, u64)> {
    (0u8..4, any::<u32>(), 1u32..20_000, any::<u64>())
}

fn apply_edits(base: &[u8], edits: &[(u8, u32, u32, u64)]) -> Vec<u8> {
    let mut data = base.to_vec();
    for &(kind, position, length, seed) in edits {
        let position = position as usize % (data.len() + 1);
        let length = length as usize;
        match kind {
            0 => {
                let insert = deterministic_input(length, seed);
                data.splice(position..position, insert);
            }
            1 => {
                let end = (position + length).min(data.len());
                data.drain(position..end);
            }
            2 => {
                let end = (position + length).min(data.len());
                data[position..end].fill(0);
            }
            _ => {
                let end = (position + length).min(data.len());
                let fresh = deterministic_input(end - position, seed);
                data[position..end].copy_from_slice(&fresh);
            }
        }
    }
    data
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn chunks_round_trip_on_every_tier(
        base_seed in any::<u64>(),
        base_length in 0usize..600_000,
        edits in proptest::collection::vec(edit(), 0..6),
        frame_input_target in prop_oneof![Just(64usize << 10), Just(1usize << 20)],
        split in any::<bool>(),
        level in prop_oneof![Just(1), Just(3)],
    ) {
        let base = deterministic_input(base_length, base_seed);
        let modified = apply_edits(&base, &edits);
        let destination = destination_holding(&base);
        let config = ChunkEncoderConfig { frame_input_target, split_into_blocks: split, zstd_level: level, ..Default::default() };
        let (frames, _) = encode_all(&modified, config, destination.clone());
        let (output, _) = decode_all(&frames, destination);
        prop_assert!(output == modified);
    }

    #[test]
    fn corrupted_chunk_frames_never_panic(position in any::<prop::sample::Index>(), value in any::<u8>(), truncate in any::<bool>()) {
        let base = deterministic_input(200_000, 1);
        let modified = apply_edits(&base, &[(3, 50_000, 30_000, 5), (2, 120_000, 20_000, 0)]);
        let destination = destination_holding(&base);
        let (frames, _) = encode_all(&modified, ChunkEncoderConfig { zstd_level: 1, ..Default::default() }, destination.clone());
        let mut frame = frames[0].clone();
        let at = position.index(frame.len());
        if truncate { frame.truncate(at); } else { frame[at] = value; }
        let mut decoder = ChunkDecoder::new(ChunkDecoderConfig::default(), destination).unwrap();
        let _ = decoder.decode_frame(&frame, |_| Ok(()));
    }
}
