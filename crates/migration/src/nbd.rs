//! The client's half of an NBD connection (QEMU's block mirror writing the VM's disk into the
//! destination's export) taken apart into write payload pages and opaque bytes, so the migration
//! proxy carries the disk with the same page codec as RAM: zero blocks, blocks the destination's
//! copy of the base image holds (sent as their hash), deltas against the block's previous write,
//! zstd. Sans-IO, like [`crate::stream`]; the events it yields rebuild the input byte for byte
//! ([`crate::StreamRebuilder`]).
//!
//! What the client sends (the NBD protocol, fixed newstyle): four bytes of client flags; then
//! options, each `IHAVEOPT`, be32 option, be32 length, data; then requests, either compact (be32
//! magic `0x25609513`, be16 flags, be16 type, be64 cookie, be64 offset, be32 length) or, once
//! extended headers are negotiated, extended (magic `0x21e41c71`, the same with a be64 length).
//! A write request is followed by its payload; with extended headers so is any request with the
//! `PAYLOAD_LEN` flag. Options and requests start with distinct magics, so the client's half
//! parses without the server's replies.
//!
//! Payload pages: the 4 KiB pages of a write whose disk offset is 4 KiB-aligned, keyed by that
//! offset (block name [`DISK_BLOCK`]); a write that is not aligned, and the tail shorter than a
//! page, pass as opaque bytes. Anything that is not one of the above makes the parser pass the
//! rest of the connection through unchanged ([`Passthrough`]): the disk still arrives, without
//! the codec.

use std::sync::Arc;

use crate::input::Input;
use crate::stream::{
    EventParser, MAX_OPAQUE_EVENT, PAGE_SIZE, ParseError, ParseErrorKind, Passthrough, RamPage,
    RecordNaming, StreamEvent,
};

/// The key's block name of every disk page.
pub const DISK_BLOCK: &str = "disk";

pub(crate) const OPTION_MAGIC: &[u8; 8] = b"IHAVEOPT";
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(crate) const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub(crate) const COMPACT_REQUEST_LENGTH: usize = 28;
const EXTENDED_REQUEST_LENGTH: usize = 32;
const OPTION_HEADER_LENGTH: usize = 16;
pub(crate) const COMMAND_WRITE: u16 = 1;
pub(crate) const COMMAND_FLAG_PAYLOAD_LEN: u16 = 1 << 5;
/// Longest option data accepted (the protocol's strings are at most 4 KiB; QEMU sends less).
pub const MAX_OPTION_LENGTH: u64 = 1 << 20;
/// Largest request payload accepted (`NBD_MAX_BUFFER_SIZE`).
pub const MAX_PAYLOAD_LENGTH: u64 = 32 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    ClientFlags,
    Items,
    /// Option data or a payload that is not paged: `remaining` bytes pass through.
    Opaque {
        remaining: u64,
    },
    /// A write payload: `pages` aligned pages from `offset`, then `tail` opaque bytes.
    Payload {
        offset: u64,
        pages: u64,
        tail: u64,
    },
    /// The rest of the connection passes through unchanged.
    Passthrough,
}

/// Counters over what the parser has decoded so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NbdStats {
    /// Bytes consumed (reported in events).
    pub bytes: u64,
    pub options: u64,
    pub requests: u64,
    pub writes: u64,
    /// Write payload pages reported as [`StreamEvent::Page`].
    pub pages: u64,
    /// Bytes reported as [`StreamEvent::Opaque`].
    pub opaque_bytes: u64,
    pub passthrough: Option<Passthrough>,
}

/// Streaming parser of an NBD client's bytes. Feed bytes as they arrive, take events until it
/// returns `None`, call [`NbdParser::finish`] at the end of the connection.
#[derive(Debug)]
pub struct NbdParser {
    input: Input,
    state: State,
    block: Arc<str>,
    stats: NbdStats,
}

impl Default for NbdParser {
    fn default() -> Self {
        Self::new()
    }
}

impl NbdParser {
    pub fn new() -> Self {
        Self {
            input: Input::default(),
            state: State::ClientFlags,
            block: Arc::from(DISK_BLOCK),
            stats: NbdStats::default(),
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.input.feed(bytes);
    }

    /// The connection ended: no more input.
    pub fn finish(&mut self) {
        self.input.finish();
    }

    /// Whether the connection ended between two items (not inside a header or payload).
    pub fn is_done(&self) -> bool {
        self.input.is_finished()
            && self.input.available() == 0
            && matches!(self.state, State::Items | State::Passthrough)
    }

    pub fn stats(&self) -> &NbdStats {
        &self.stats
    }

    /// Connection offset of the next byte to parse.
    pub fn offset(&self) -> u64 {
        self.input.offset()
    }

    fn take(&mut self, length: usize) -> &[u8] {
        self.stats.bytes += length as u64;
        self.input.take(length)
    }

    fn opaque(&mut self, length: usize) -> StreamEvent {
        self.stats.opaque_bytes += length as u64;
        StreamEvent::Opaque(self.take(length).to_vec())
    }

    fn pass_through(&mut self, reason: String) {
        self.stats.passthrough = Some(Passthrough {
            offset: self.input.offset(),
            reason,
        });
        self.state = State::Passthrough;
    }

    fn field<const N: usize>(&self, at: usize) -> [u8; N] {
        self.input.field(at)
    }

    /// The next event, `None` when more input is needed (or the connection is over).
    pub fn next_event(&mut self) -> Result<Option<StreamEvent>, ParseError> {
        loop {
            let available = self.input.available();
            match self.state {
                State::ClientFlags => {
                    if available < 4 {
                        return self.need("the client flags");
                    }
                    self.state = State::Items;
                    return Ok(Some(self.opaque(4)));
                }
                State::Passthrough => {
                    if available == 0 {
                        return Ok(None);
                    }
                    return Ok(Some(self.opaque(available.min(MAX_OPAQUE_EVENT))));
                }
                State::Opaque { remaining } => {
                    if remaining == 0 {
                        self.state = State::Items;
                        continue;
                    }
                    if available == 0 {
                        return self.need("an option's data or a request's payload");
                    }
                    let length = available.min(MAX_OPAQUE_EVENT).min(remaining as usize);
                    self.state = State::Opaque {
                        remaining: remaining - length as u64,
                    };
                    return Ok(Some(self.opaque(length)));
                }
                State::Payload {
                    offset,
                    pages,
                    tail,
                } => {
                    if pages == 0 {
                        self.state = State::Opaque { remaining: tail };
                        continue;
                    }
                    if available < PAGE_SIZE {
                        return self.need("a write's payload");
                    }
                    let mut data = Box::new([0u8; PAGE_SIZE]);
                    data.copy_from_slice(self.take(PAGE_SIZE));
                    self.stats.pages += 1;
                    self.state = State::Payload {
                        offset: offset + PAGE_SIZE as u64,
                        pages: pages - 1,
                        tail,
                    };
                    return Ok(Some(StreamEvent::Page(RamPage {
                        block: self.block.clone(),
                        offset,
                        naming: RecordNaming::Bare,
                        data,
                    })));
                }
                State::Items => {
                    if available < 4 {
                        return self.need("an option or request");
                    }
                    let magic = u32::from_be_bytes(self.field(0));
                    if magic == u32::from_be_bytes([b'I', b'H', b'A', b'V']) {
                        if available < OPTION_HEADER_LENGTH {
                            return self.need("an option header");
                        }
                        if &self.field::<8>(0) != OPTION_MAGIC {
                            self.pass_through("an option without the IHAVEOPT magic".into());
                            continue;
                        }
                        let length = u64::from(u32::from_be_bytes(self.field(12)));
                        if length > MAX_OPTION_LENGTH {
                            return Err(self.error(ParseErrorKind::LimitExceeded {
                                what: "nbd option length",
                                value: length,
                                limit: MAX_OPTION_LENGTH,
                            }));
                        }
                        self.stats.options += 1;
                        self.state = State::Opaque { remaining: length };
                        return Ok(Some(self.opaque(OPTION_HEADER_LENGTH)));
                    }
                    let header = match magic {
                        REQUEST_MAGIC => COMPACT_REQUEST_LENGTH,
                        EXTENDED_REQUEST_MAGIC => EXTENDED_REQUEST_LENGTH,
                        other => {
                            self.pass_through(format!(
                                "nbd item with magic {other:#010x}, neither an option nor a request"
                            ));
                            continue;
                        }
                    };
                    if available < header {
                        return self.need("a request header");
                    }
                    let flags = u16::from_be_bytes(self.field(4));
                    let command = u16::from_be_bytes(self.field(6));
                    let offset = u64::from_be_bytes(self.field(16));
                    let length = if header == EXTENDED_REQUEST_LENGTH {
                        u64::from_be_bytes(self.field(24))
                    } else {
                        u64::from(u32::from_be_bytes(self.field(24)))
                    };
                    let write = command == COMMAND_WRITE;
                    let payload = if write
                        || (header == EXTENDED_REQUEST_LENGTH
                            && flags & COMMAND_FLAG_PAYLOAD_LEN != 0)
                    {
                        length
                    } else {
                        0
                    };
                    if payload > MAX_PAYLOAD_LENGTH {
                        return Err(self.error(ParseErrorKind::LimitExceeded {
                            what: "nbd request payload",
                            value: payload,
                            limit: MAX_PAYLOAD_LENGTH,
                        }));
                    }
                    self.stats.requests += 1;
                    self.state = if write && offset.is_multiple_of(PAGE_SIZE as u64) {
                        self.stats.writes += 1;
                        State::Payload {
                            offset,
                            pages: payload / PAGE_SIZE as u64,
                            tail: payload % PAGE_SIZE as u64,
                        }
                    } else {
                        self.stats.writes += u64::from(write);
                        State::Opaque { remaining: payload }
                    };
                    return Ok(Some(self.opaque(header)));
                }
            }
        }
    }

    fn need(&self, what: &'static str) -> Result<Option<StreamEvent>, ParseError> {
        self.input.need(what)
    }

    fn error(&self, kind: ParseErrorKind) -> ParseError {
        self.input.error(kind)
    }
}

impl EventParser for NbdParser {
    fn feed(&mut self, bytes: &[u8]) {
        NbdParser::feed(self, bytes)
    }
    fn next_event(&mut self) -> Result<Option<StreamEvent>, ParseError> {
        NbdParser::next_event(self)
    }
    fn finish(&mut self) {
        NbdParser::finish(self)
    }
    fn is_done(&self) -> bool {
        NbdParser::is_done(self)
    }
    fn offset(&self) -> u64 {
        NbdParser::offset(self)
    }
    fn consumed(&self) -> u64 {
        self.stats().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StreamRebuilder;
    use crate::synthetic::{nbd_request as request, pattern};

    fn parse(input: &[u8], piece: usize) -> (Vec<StreamEvent>, NbdParser) {
        let mut parser = NbdParser::new();
        let mut events = Vec::new();
        for chunk in input.chunks(piece) {
            parser.feed(chunk);
            while let Some(event) = parser.next_event().unwrap() {
                events.push(event);
            }
        }
        parser.finish();
        while let Some(event) = parser.next_event().unwrap() {
            events.push(event);
        }
        (events, parser)
    }

    #[test]
    fn aligned_write_payloads_become_pages_and_everything_rebuilds_identically() {
        let input = crate::synthetic::nbd_connection();
        for piece in [input.len(), 1, 13, 4096] {
            let (events, parser) = parse(&input, piece);
            assert!(parser.is_done());
            let mut rebuilder = StreamRebuilder::new();
            let mut rebuilt = Vec::new();
            for event in &events {
                rebuilder.write_event(event, &mut rebuilt);
            }
            assert_eq!(rebuilt, input, "piece {piece}");
            let pages: Vec<u64> = events
                .iter()
                .filter_map(|event| match event {
                    StreamEvent::Page(page) => {
                        assert_eq!(page.naming, RecordNaming::Bare);
                        assert_eq!(&*page.block, DISK_BLOCK);
                        Some(page.offset)
                    }
                    _ => None,
                })
                .collect();
            assert_eq!(pages, [0x10000, 0x11000, 0x12000, 0x40000, 0x41000]);
            let stats = parser.stats();
            assert_eq!(
                (stats.options, stats.requests, stats.writes),
                (2, 6, 3),
                "{stats:?}"
            );
            assert_eq!(stats.passthrough, None);
        }
    }

    #[test]
    fn an_unknown_item_passes_the_rest_through_and_still_rebuilds() {
        let mut input = crate::synthetic::nbd_connection();
        let garbage_at = input.len();
        input.extend_from_slice(b"not nbd at all, but carried anyway");
        input.extend(request(false, 0, COMMAND_WRITE, 0, &pattern(1, 4)));
        let (events, parser) = parse(&input, 100);
        assert!(parser.is_done());
        let passthrough = parser.stats().passthrough.clone().expect("passthrough");
        assert_eq!(passthrough.offset, garbage_at as u64);
        let mut rebuilder = StreamRebuilder::new();
        let mut rebuilt = Vec::new();
        for event in &events {
            rebuilder.write_event(event, &mut rebuilt);
        }
        assert_eq!(rebuilt, input);
        assert_eq!(
            parser.stats().pages,
            5,
            "nothing after the passthrough is paged"
        );
    }

    #[test]
    fn a_truncated_connection_or_an_oversized_length_is_an_error() {
        let input = crate::synthetic::nbd_connection();
        // Ends inside the first write's payload.
        let cut = 4 + 24 + 16 + COMPACT_REQUEST_LENGTH + 100;
        let mut parser = NbdParser::new();
        parser.feed(&input[..cut]);
        while parser.next_event().unwrap().is_some() {}
        parser.finish();
        assert!(!parser.is_done());
        let error = loop {
            match parser.next_event() {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("truncation not reported"),
                Err(error) => break error,
            }
        };
        assert!(
            matches!(error.kind, ParseErrorKind::Truncated { .. }),
            "{error}"
        );

        let mut huge = 0u32.to_be_bytes().to_vec();
        let mut header = request(true, 0, COMMAND_WRITE, 0, b"");
        header[24..32].copy_from_slice(&(1u64 << 40).to_be_bytes());
        huge.extend(header);
        let mut parser = NbdParser::new();
        parser.feed(&huge);
        parser.next_event().unwrap();
        let error = parser.next_event().unwrap_err();
        assert!(
            matches!(error.kind, ParseErrorKind::LimitExceeded { .. }),
            "{error}"
        );
    }
}
