//! Entry points shared by the cargo-fuzz targets (`crates/codec/fuzz`) and the stable test that
//! replays the committed corpus, so both exercise exactly the same code. Each takes arbitrary
//! bytes, splits them into frames the way a receiver would, and decodes them; any outcome but a
//! panic, an out-of-bounds access or an abort on allocation is acceptable.

use crate::chunk::{ChunkDecoder, ChunkDecoderConfig};
use crate::frame::frame_length;
use crate::hash::{MemoryRepository, NothingLocal};
use crate::page::{PageDecoder, PageDecoderConfig};

/// Splits `data` into frames with [`frame_length`]; stops at the first bad or partial header.
fn frames(mut data: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let length = frame_length(data).ok().flatten()?;
        // A partial last frame is still handed to the decoder, which must reject it cleanly.
        let length = length.min(data.len());
        let (frame, rest) = data.split_at(length);
        data = rest;
        (!frame.is_empty()).then_some(frame)
    })
}

/// Decodes `data` as a stream of page frames with a small mirror.
pub fn decode_page_stream(data: &[u8]) {
    let Ok(mut decoder) = PageDecoder::new(
        PageDecoderConfig {
            mirror_page_limit: 4096,
            ..PageDecoderConfig::default()
        },
        NothingLocal,
    ) else {
        return;
    };
    for frame in frames(data) {
        if decoder.decode_frame(frame, |_, _, _, _| {}).is_err() {
            return;
        }
    }
}

/// Decodes `data` as a stream of chunk frames into memory, with tight limits.
pub fn decode_chunk_stream(data: &[u8]) {
    let config = ChunkDecoderConfig {
        max_chunk_length: 1 << 20,
        max_frame_body: 8 << 20,
    };
    let Ok(mut decoder) = ChunkDecoder::new(config, MemoryRepository::new()) else {
        return;
    };
    let mut produced = 0u64;
    for frame in frames(data) {
        let result = decoder.decode_frame(frame, |bytes| {
            produced += bytes.len() as u64;
            Ok(())
        });
        if result.is_err() {
            return;
        }
    }
}

/// Applies `data` as a delta to a page of a fixed pattern.
pub fn apply_delta_input(data: &[u8]) {
    let mut page = [0x5au8; crate::PAGE_SIZE];
    let _ = crate::delta::apply_delta(&mut page, data);
}
