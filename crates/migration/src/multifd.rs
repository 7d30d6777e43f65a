//! One of QEMU's multifd channels taken apart into page payloads and opaque bytes, so the proxy
//! carries each channel with the page codec while the channel stays its own ordered byte pipe
//! (a segment lost on one channel's connection holds up that channel only, and the destination
//! QEMU loads the channels in parallel). Sans-IO, like [`crate::stream`]; the events it yields
//! rebuild the input byte for byte ([`crate::StreamRebuilder`]).
//!
//! What a multifd channel carries (QEMU 9.0 to 10.x, `migration/multifd.h`, all fields
//! big-endian; checked against QEMU 10.0's channels on this project's machine):
//!
//! - once, the channel's hello (`MultiFDInit_t`, 64 bytes): be32 magic `0x11223344`, be32
//!   version 1, the VM's 16-byte UUID, u8 channel id, 39 bytes unused;
//! - then packets. A RAM packet (`MultiFDPacket_t`): be32 magic, be32 version, be32 flags, be32
//!   `pages_alloc`, be32 `normal_pages`, be32 `next_packet_size`, be64 `packet_num`, be32
//!   `zero_pages`, 28 bytes unused, the RAM block's name (256 bytes, NUL-padded), then 128 be64
//!   offsets in the block (the normal pages first, then the zero pages, then unused slots; 128
//!   whatever `pages_alloc` says: it is 128, or 0 in a SYNC packet);
//!   after the packet, `next_packet_size` bytes of payload. Without compression the payload is
//!   the normal pages' 4 KiB contents in the order of their offsets. A packet with the SYNC flag
//!   and no pages marks the end of a round.
//!
//! Payload pages are keyed by (block name, offset), like the main stream's PAGE records. Anything
//! this does not model — a compressed packet (`multifd-compression` other than `none`), a
//! device-state packet (flag `0x40`), a payload whose size does not match its pages, an offset
//! that is not page-aligned, a slot count other than 0 or 128, a wrong magic or version — makes
//! the parser pass the rest of the channel through unchanged ([`Passthrough`]): the pages still
//! arrive, without the codec.

use std::sync::Arc;

use crate::input::Input;
use crate::stream::{
    EventParser, MAX_OPAQUE_EVENT, PAGE_SIZE, ParseError, Passthrough, RamPage, RecordNaming,
    StreamEvent,
};

/// First four bytes of a multifd channel's hello and of each of its packets.
pub const MULTIFD_MAGIC: u32 = 0x1122_3344;
/// The multifd version QEMU 4.0 to 10.x speak.
pub const MULTIFD_VERSION: u32 = 1;
/// Length of the channel's hello (`MultiFDInit_t`).
pub const MULTIFD_HELLO_LENGTH: usize = 64;
/// Length of a RAM packet before its offsets.
pub const PACKET_FIXED_LENGTH: usize = 320;
/// Flag: the packet ends a round (QEMU's `MULTIFD_FLAG_SYNC`).
pub const FLAG_SYNC: u32 = 1;
/// Flags naming a compression method (`none` is 0).
pub const FLAG_COMPRESSION_MASK: u32 = 0x1f << 1;
/// Flag: the packet carries device state, not RAM (`MULTIFD_FLAG_DEVICE_STATE`).
pub const FLAG_DEVICE_STATE: u32 = 0x40;
/// Page slots of every RAM packet (QEMU's `MULTIFD_PACKET_SIZE` of 512 KiB over 4 KiB pages).
/// The packet always holds this many offsets, used or not: a SYNC packet announces 0 slots yet
/// is as long as the others (QEMU's receiver reads a fixed length).
pub const PAGES_PER_PACKET: u32 = 128;
/// Length of every RAM packet, its offsets included (1 344 bytes).
pub const PACKET_LENGTH: usize = PACKET_FIXED_LENGTH + 8 * PAGES_PER_PACKET as usize;
pub(crate) const BLOCK_NAME_LENGTH: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Hello,
    Packet,
    /// A packet's payload: its normal pages in order, `next` of them done.
    Payload {
        block: Arc<str>,
        offsets: Arc<[u64]>,
        next: usize,
    },
    Passthrough,
}

/// Counters over what the parser has decoded so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MultifdStats {
    /// Bytes consumed (reported in events).
    pub bytes: u64,
    /// The channel's id from its hello.
    pub channel: Option<u8>,
    pub packets: u64,
    pub sync_packets: u64,
    /// Normal pages, reported as [`StreamEvent::Page`].
    pub pages: u64,
    /// Zero pages (offsets only; they travel inside the packet's opaque bytes).
    pub zero_pages: u64,
    /// Bytes reported as [`StreamEvent::Opaque`].
    pub opaque_bytes: u64,
    pub passthrough: Option<Passthrough>,
}

/// Streaming parser of one multifd channel, from its hello on. Feed bytes as they arrive, take
/// events until it returns `None`, call [`MultifdParser::finish`] when the channel closes.
#[derive(Debug)]
pub struct MultifdParser {
    input: Input,
    state: State,
    /// The last block name seen, shared by the pages that name it.
    block: Option<Arc<str>>,
    stats: MultifdStats,
}

impl Default for MultifdParser {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether a connection's first bytes are a multifd channel's hello (QEMU's destination tells
/// its connections apart the same way: the main channel starts with `QEVM`).
pub fn is_multifd_hello(first_bytes: &[u8; 4]) -> bool {
    u32::from_be_bytes(*first_bytes) == MULTIFD_MAGIC
}

impl MultifdParser {
    pub fn new() -> Self {
        Self {
            input: Input::default(),
            state: State::Hello,
            block: None,
            stats: MultifdStats::default(),
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.input.feed(bytes);
    }

    /// The channel closed: no more input.
    pub fn finish(&mut self) {
        self.input.finish();
    }

    /// Whether the channel ended between two packets (QEMU closes a channel after its last
    /// packet), or anywhere once passing through.
    pub fn is_done(&self) -> bool {
        self.input.is_finished()
            && self.input.available() == 0
            && matches!(self.state, State::Packet | State::Passthrough)
    }

    pub fn stats(&self) -> &MultifdStats {
        &self.stats
    }

    /// Channel offset of the next byte to parse.
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

    fn be32(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.input.field(at))
    }

    fn be64(&self, at: usize) -> u64 {
        u64::from_be_bytes(self.input.field(at))
    }

    /// The block named at `at` (256 bytes, NUL-padded), reusing the last one's allocation.
    fn block_name(&mut self, at: usize) -> Result<Arc<str>, String> {
        let field = self.input.peek(at, BLOCK_NAME_LENGTH);
        let length = field
            .iter()
            .position(|&byte| byte == 0)
            .ok_or("a RAM block name without its terminating NUL")?;
        let name =
            std::str::from_utf8(&field[..length]).map_err(|_| "a RAM block name not in UTF-8")?;
        if name.is_empty() {
            return Err("pages without a RAM block name".into());
        }
        match &self.block {
            Some(block) if &**block == name => Ok(block.clone()),
            _ => {
                let block: Arc<str> = Arc::from(name);
                self.block = Some(block.clone());
                Ok(block)
            }
        }
    }

    /// The next event, `None` when more input is needed (or the channel is over).
    pub fn next_event(&mut self) -> Result<Option<StreamEvent>, ParseError> {
        loop {
            let available = self.input.available();
            match &self.state {
                State::Passthrough => {
                    if available == 0 {
                        return Ok(None);
                    }
                    return Ok(Some(self.opaque(available.min(MAX_OPAQUE_EVENT))));
                }
                State::Hello => {
                    if available < MULTIFD_HELLO_LENGTH {
                        return self.need("a multifd channel's hello");
                    }
                    if self.be32(0) != MULTIFD_MAGIC || self.be32(4) != MULTIFD_VERSION {
                        self.pass_through(format!(
                            "a multifd hello with magic {:#010x} and version {}",
                            self.be32(0),
                            self.be32(4)
                        ));
                        continue;
                    }
                    self.stats.channel = Some(self.input.field::<1>(24)[0]);
                    self.state = State::Packet;
                    return Ok(Some(self.opaque(MULTIFD_HELLO_LENGTH)));
                }
                State::Payload {
                    block,
                    offsets,
                    next,
                } => {
                    let (block, offsets, next) = (block.clone(), offsets.clone(), *next);
                    if next == offsets.len() {
                        self.state = State::Packet;
                        continue;
                    }
                    if available < PAGE_SIZE {
                        return self.need("a multifd packet's pages");
                    }
                    let mut data = Box::new([0u8; PAGE_SIZE]);
                    data.copy_from_slice(self.take(PAGE_SIZE));
                    self.stats.pages += 1;
                    let offset = offsets[next];
                    self.state = State::Payload {
                        block: block.clone(),
                        offsets,
                        next: next + 1,
                    };
                    return Ok(Some(StreamEvent::Page(RamPage {
                        block,
                        offset,
                        naming: RecordNaming::Bare,
                        data,
                    })));
                }
                State::Packet => {
                    if available < 16 {
                        return self.need("a multifd packet");
                    }
                    let (magic, version, flags) = (self.be32(0), self.be32(4), self.be32(8));
                    if magic != MULTIFD_MAGIC || version != MULTIFD_VERSION {
                        self.pass_through(format!(
                            "a multifd packet with magic {magic:#010x} and version {version}"
                        ));
                        continue;
                    }
                    if flags & FLAG_DEVICE_STATE != 0 {
                        self.pass_through("a multifd device-state packet".into());
                        continue;
                    }
                    if flags & FLAG_COMPRESSION_MASK != 0 {
                        self.pass_through(format!(
                            "a compressed multifd packet (flags {flags:#x}): the channel passes \
                             through as it is"
                        ));
                        continue;
                    }
                    let length = PACKET_LENGTH;
                    if available < length {
                        return self.need("a multifd packet");
                    }
                    let pages_alloc = self.be32(12);
                    if pages_alloc != 0 && pages_alloc != PAGES_PER_PACKET {
                        self.pass_through(format!(
                            "a multifd packet of {pages_alloc} page slots, not \
                             {PAGES_PER_PACKET}"
                        ));
                        continue;
                    }
                    let normal = self.be32(16);
                    let payload = self.be32(20);
                    let zero = self.be32(32);
                    if u64::from(normal) + u64::from(zero) > u64::from(pages_alloc) {
                        self.pass_through(format!(
                            "a multifd packet with {normal} normal and {zero} zero pages in \
                             {pages_alloc} slots"
                        ));
                        continue;
                    }
                    if u64::from(payload) != u64::from(normal) * PAGE_SIZE as u64 {
                        self.pass_through(format!(
                            "a multifd packet of {normal} pages with a {payload}-byte payload"
                        ));
                        continue;
                    }
                    let offsets: Vec<u64> = (0..normal as usize)
                        .map(|index| self.be64(PACKET_FIXED_LENGTH + 8 * index))
                        .collect();
                    if let Some(offset) = offsets
                        .iter()
                        .find(|offset| !offset.is_multiple_of(PAGE_SIZE as u64))
                    {
                        self.pass_through(format!(
                            "a multifd page at offset {offset:#x}, not page-aligned"
                        ));
                        continue;
                    }
                    let block = if normal > 0 {
                        match self.block_name(64) {
                            Ok(block) => block,
                            Err(reason) => {
                                self.pass_through(reason);
                                continue;
                            }
                        }
                    } else {
                        Arc::from("")
                    };
                    self.stats.packets += 1;
                    self.stats.sync_packets += u64::from(flags & FLAG_SYNC != 0);
                    self.stats.zero_pages += u64::from(zero);
                    self.state = State::Payload {
                        block,
                        offsets: offsets.into(),
                        next: 0,
                    };
                    return Ok(Some(self.opaque(length)));
                }
            }
        }
    }

    fn need(&self, what: &'static str) -> Result<Option<StreamEvent>, ParseError> {
        self.input.need(what)
    }
}

impl EventParser for MultifdParser {
    fn feed(&mut self, bytes: &[u8]) {
        MultifdParser::feed(self, bytes)
    }
    fn next_event(&mut self) -> Result<Option<StreamEvent>, ParseError> {
        MultifdParser::next_event(self)
    }
    fn finish(&mut self) {
        MultifdParser::finish(self)
    }
    fn is_done(&self) -> bool {
        MultifdParser::is_done(self)
    }
    fn offset(&self) -> u64 {
        MultifdParser::offset(self)
    }
    fn consumed(&self) -> u64 {
        self.stats.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StreamRebuilder;
    use crate::stream::ParseErrorKind;
    use crate::synthetic::multifd_channel as channel;

    fn parse_in_pieces(bytes: &[u8], piece: usize) -> (Vec<StreamEvent>, MultifdParser) {
        let mut parser = MultifdParser::new();
        let mut events = Vec::new();
        for chunk in bytes.chunks(piece) {
            parser.feed(chunk);
            while let Some(event) = parser.next_event().expect("parses") {
                events.push(event);
            }
        }
        parser.finish();
        while let Some(event) = parser.next_event().expect("parses") {
            events.push(event);
        }
        (events, parser)
    }

    fn rebuild(events: &[StreamEvent]) -> Vec<u8> {
        let mut rebuilder = StreamRebuilder::new();
        let mut out = Vec::new();
        for event in events {
            rebuilder.write_event(event, &mut out);
        }
        out
    }

    #[test]
    fn pages_are_keyed_by_block_and_offset_and_the_channel_rebuilds_byte_for_byte() {
        let bytes = channel(&[
            ("pc.ram", vec![(0x1000, 1), (0x5000, 2)], vec![0x2000], 0),
            ("pc.ram", vec![], vec![], FLAG_SYNC),
            ("vga.vram", vec![(0, 9)], vec![], 0),
        ]);
        for piece in [1, 7, 4096, bytes.len()] {
            let (events, parser) = parse_in_pieces(&bytes, piece);
            assert!(parser.is_done());
            assert_eq!(rebuild(&events), bytes, "piece {piece}");
            let pages: Vec<(String, u64, u8)> = events
                .iter()
                .filter_map(|event| match event {
                    StreamEvent::Page(page) => {
                        Some((page.block.to_string(), page.offset, page.data[0]))
                    }
                    _ => None,
                })
                .collect();
            assert_eq!(
                pages,
                vec![
                    ("pc.ram".into(), 0x1000, 1),
                    ("pc.ram".into(), 0x5000, 2),
                    ("vga.vram".into(), 0, 9)
                ]
            );
            let stats = parser.stats();
            assert_eq!(stats.channel, Some(3));
            assert_eq!((stats.packets, stats.sync_packets), (3, 1));
            assert_eq!((stats.pages, stats.zero_pages), (3, 1));
            assert_eq!(stats.bytes, bytes.len() as u64);
            assert!(stats.passthrough.is_none());
        }
    }

    #[test]
    fn what_it_does_not_model_passes_through_unchanged() {
        let compressed = channel(&[("pc.ram", vec![(0x1000, 1)], vec![], 2 << 1)]);
        let device_state = channel(&[("pc.ram", vec![(0x1000, 1)], vec![], FLAG_DEVICE_STATE)]);
        let mut unaligned = channel(&[("pc.ram", vec![(0x1000, 1)], vec![], 0)]);
        unaligned[MULTIFD_HELLO_LENGTH + PACKET_FIXED_LENGTH + 7] = 0x01;
        let mut short_payload = channel(&[("pc.ram", vec![(0x1000, 1)], vec![], 0)]);
        short_payload[MULTIFD_HELLO_LENGTH + 22] = 0x08;
        let mut unnamed = channel(&[("pc.ram", vec![(0x1000, 1)], vec![], 0)]);
        unnamed[MULTIFD_HELLO_LENGTH + 64] = 0;
        let mut odd_slots = channel(&[("pc.ram", vec![(0x1000, 1)], vec![], 0)]);
        odd_slots[MULTIFD_HELLO_LENGTH + 15] = 64;
        let mut wrong_hello = channel(&[]);
        wrong_hello[7] = 2;
        for (what, bytes) in [
            ("compressed", compressed),
            ("device state", device_state),
            ("unaligned", unaligned),
            ("short payload", short_payload),
            ("unnamed", unnamed),
            ("odd slot count", odd_slots),
            ("wrong hello", wrong_hello),
        ] {
            let (events, parser) = parse_in_pieces(&bytes, 1000);
            assert_eq!(rebuild(&events), bytes, "{what}");
            assert!(parser.stats().passthrough.is_some(), "{what}");
            assert_eq!(parser.stats().pages, 0, "{what}");
            assert!(parser.is_done(), "{what}");
        }
    }

    #[test]
    fn a_truncated_channel_is_an_error() {
        let bytes = channel(&[("pc.ram", vec![(0x1000, 1)], vec![], 0)]);
        let mut parser = MultifdParser::new();
        parser.feed(&bytes[..bytes.len() - 1]);
        parser.finish();
        let error = loop {
            match parser.next_event() {
                Ok(Some(_)) => {}
                Ok(None) => panic!("a truncated channel must fail"),
                Err(error) => break error,
            }
        };
        assert!(matches!(error.kind, ParseErrorKind::Truncated { .. }));
    }

    #[test]
    fn the_hello_is_told_apart_from_the_main_channel() {
        assert!(is_multifd_hello(&MULTIFD_MAGIC.to_be_bytes()));
        assert!(!is_multifd_hello(b"QEVM"));
    }
}
