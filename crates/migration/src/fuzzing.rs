//! Entry points shared by the cargo-fuzz targets (`crates/migration/fuzz`) and the stable test
//! that replays the committed corpus, so both exercise exactly the same code. Each takes
//! arbitrary bytes; any outcome but a panic, an out-of-bounds access or unbounded allocation is
//! acceptable, and what was accepted must rebuild to exactly the bytes consumed.

use crate::multifd::MultifdParser;
use crate::nbd::NbdParser;
use crate::proxy::{ProxyConfig, ProxyDecoder, StreamFormat};
use crate::rebuild::StreamRebuilder;
use crate::stream::{EventParser, StreamParser};

/// Parses `data` as a migration stream, fed in pieces whose sizes come from the first byte, and
/// checks that the events rebuild the consumed prefix byte for byte.
pub fn parse_stream_input(data: &[u8]) {
    parse_input(StreamParser::new(), data);
}

/// The same for the client's half of an NBD connection ([`crate::nbd`]).
pub fn parse_nbd_input(data: &[u8]) {
    parse_input(NbdParser::new(), data);
}

/// The same for one of QEMU's multifd channels ([`crate::multifd`]).
pub fn parse_multifd_input(data: &[u8]) {
    parse_input(MultifdParser::new(), data);
}

fn parse_input(mut parser: impl EventParser, data: &[u8]) {
    let Some((&cut, data)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut).max(1) * 37;
    let mut rebuilder = StreamRebuilder::new();
    let mut out = Vec::new();
    let mut failed = false;
    'feed: for chunk in data.chunks(cut) {
        parser.feed(chunk);
        loop {
            match parser.next_event() {
                Ok(Some(event)) => {
                    rebuilder.write_event(&event, &mut out);
                }
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break 'feed;
                }
            }
        }
    }
    if !failed {
        parser.finish();
        while let Ok(Some(event)) = parser.next_event() {
            rebuilder.write_event(&event, &mut out);
        }
    }
    let consumed = parser.consumed() as usize;
    assert_eq!(
        &out[..],
        &data[..consumed],
        "rebuilt bytes differ from consumed input"
    );
}

/// Decodes `data` as proxy messages (as the destination would receive them) with a small page
/// mirror, in the format the first byte picks modulo 3 (QEMU's migration stream, NBD, a
/// multifd channel).
pub fn decode_proxy_input(data: &[u8]) {
    let Some((&format, data)) = data.split_first() else {
        return;
    };
    let mut config = ProxyConfig {
        format: match format % 3 {
            0 => StreamFormat::Migration,
            1 => StreamFormat::Nbd,
            _ => StreamFormat::Multifd,
        },
        ..ProxyConfig::default()
    };
    config.encoder.mirror_page_limit = 4096;
    let Ok(mut decoder) = ProxyDecoder::new(&config) else {
        return;
    };
    let mut out = Vec::new();
    for chunk in data.chunks(4096) {
        if decoder.push(chunk, &mut out).is_err() {
            return;
        }
        out.clear();
    }
}
