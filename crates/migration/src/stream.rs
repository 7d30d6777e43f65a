//! Sans-IO streaming parser of QEMU's precopy migration stream (QEMU 7.2 format, see the crate
//! README): bytes in, [`StreamEvent`]s out, in stream order, with record boundaries independent of
//! how the input was cut into reads.
//!
//! It decodes the stream framing (header, configuration, section headers and footers, commands,
//! EOF, VM description) and, inside the `ram` section, every record: the block list, ZERO and PAGE
//! records (reported as events keyed by block name and offset), XBZRLE records, EOS. Everything
//! it does not model it reports as opaque bytes. It owns no IO and makes no encoding decision.
//!
//! Device state (FULL sections) carries no length anywhere in the stream: finding its end needs
//! the device's VMState description, which only the source QEMU has. The parser therefore never
//! tries: at the first thing it does not model (a FULL section, a non-RAM iterable section, a
//! postcopy advice for blocks of another page size, an RDMA hook or compressed page, a
//! configuration it cannot size) it switches to **pass-through until the end of the stream**,
//! reporting every later byte as opaque. This is exact, not heuristic: in a precopy stream FULL
//! sections come after the RAM section's END (QEMU 7.2 `qemu_savevm_state_complete_precopy`),
//! so no RAM record follows them, and nothing is lost by not looking further. (Scanning for a
//! `0x7e + section id` footer could stop inside a device body that happens to hold those bytes.)
//!
//! Post-copy is followed: the advice (`POSTCOPY_ADVISE`) is read, and when every RAM block has
//! the target page size (the advice's page-size summary says so) the block list has no extra
//! page-size fields and parsing goes on. The switch-over's packaged device state (`PACKAGED`:
//! a length, then a whole nested stream) is reported as opaque bytes of that length, and the RAM
//! sections the source keeps sending while the destination runs are parsed as before.
//!
//! Hostile input never makes it panic or grow without bound: it keeps at most one record beyond
//! what the caller fed it (the caller bounds its reads), block names and section ids are capped,
//! and every error names the stream offset where the record that failed begins.

use std::collections::HashSet;
use std::sync::Arc;

/// Target page size (x86): the size of a PAGE record's payload.
pub const PAGE_SIZE: usize = 4096;

/// `QEVM`.
pub const STREAM_MAGIC: u32 = 0x5145_564d;
/// The only stream version QEMU loads.
pub const STREAM_VERSION: u32 = 3;

/// Section and record type bytes (`migration/savevm.c`).
pub mod section_type {
    pub const EOF: u8 = 0x00;
    pub const START: u8 = 0x01;
    pub const PART: u8 = 0x02;
    pub const END: u8 = 0x03;
    pub const FULL: u8 = 0x04;
    pub const SUBSECTION: u8 = 0x05;
    pub const VMDESCRIPTION: u8 = 0x06;
    pub const CONFIGURATION: u8 = 0x07;
    pub const COMMAND: u8 = 0x08;
    pub const FOOTER: u8 = 0x7e;
}

/// Flags of a RAM record's leading be64 word (`migration/ram.c`), in its low 12 bits.
pub mod ram_flag {
    pub const ZERO: u64 = 0x02;
    pub const MEM_SIZE: u64 = 0x04;
    pub const PAGE: u64 = 0x08;
    pub const EOS: u64 = 0x10;
    pub const CONTINUE: u64 = 0x20;
    pub const XBZRLE: u64 = 0x40;
    pub const HOOK: u64 = 0x80;
    pub const COMPRESS_PAGE: u64 = 0x100;
    pub const MULTIFD_FLUSH: u64 = 0x200;
}

/// Commands (`MIG_CMD_*`) the parser looks into; any other is skipped by its length.
mod command {
    pub const OPEN_RETURN_PATH: u16 = 1;
    pub const POSTCOPY_ADVISE: u16 = 3;
    pub const PACKAGED: u16 = 7;
}

const FLAG_BITS: u64 = PAGE_SIZE as u64 - 1;
const XBZRLE_ENCODING: u8 = 0x01;
const RAM_SECTION: &str = "ram";

/// Most bytes of a CONFIGURATION section's machine name.
pub const MAX_CONFIGURATION_LENGTH: u32 = 4096;
/// Most distinct section ids started in one stream.
pub const MAX_SECTIONS: usize = 4096;
/// Most RAM blocks (block-list entries, and distinct names in page records).
pub const MAX_BLOCKS: usize = 1024;
/// Most capabilities in the configuration.
pub const MAX_CAPABILITIES: u32 = 64;
/// Largest opaque event while passing bytes through.
pub const MAX_OPAQUE_EVENT: usize = 256 << 10;
/// Largest packaged command (QEMU's `MAX_VM_CMD_PACKAGED_SIZE`).
pub const MAX_PACKAGE_LENGTH: u64 = 1 << 24;

/// Whether a RAM record names its block or continues with the block of the previous record.
/// QEMU's choice depends on its hidden `last_sent_block`, so it is carried, not inferred.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordNaming {
    /// The record carries the block name (no CONTINUE flag).
    Named,
    /// CONTINUE flag: same block as the previous page record.
    Continue,
    /// No record header at all: the page's bytes alone (the payload of an NBD write, see
    /// [`crate::nbd`]; QEMU's migration stream never has it).
    Bare,
}

/// A PAGE record: 4096 bytes of guest RAM at `offset` in RAM block `block`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamPage {
    pub block: Arc<str>,
    pub offset: u64,
    pub naming: RecordNaming,
    pub data: Box<[u8; PAGE_SIZE]>,
}

/// A ZERO record: the page at `offset` in `block` is filled with `fill` (QEMU always sends 0).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZeroPage {
    pub block: Arc<str>,
    pub offset: u64,
    pub naming: RecordNaming,
    pub fill: u8,
}

/// One piece of the stream, in order. Writing every event with
/// [`crate::StreamRebuilder`] gives back the input byte for byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamEvent {
    /// Bytes to pass through unchanged (framing, block list, XBZRLE records, device state...).
    Opaque(Vec<u8>),
    Page(RamPage),
    Zero(ZeroPage),
}

/// What the proxy needs of a parser of the stream it carries: [`StreamParser`] (QEMU's
/// migration stream) or [`crate::nbd::NbdParser`] (an NBD client's half of a connection). Both
/// yield events that [`crate::StreamRebuilder`] turns back into the input byte for byte.
pub trait EventParser: Send {
    /// Takes the next input bytes.
    fn feed(&mut self, bytes: &[u8]);
    /// The next event, `None` when more input is needed.
    fn next_event(&mut self) -> Result<Option<StreamEvent>, ParseError>;
    /// The input ended.
    fn finish(&mut self);
    /// Whether the input ended where the format allows it to.
    fn is_done(&self) -> bool;
    /// Input offset of the next byte to parse.
    fn offset(&self) -> u64;
    /// Input bytes reported in events so far.
    fn consumed(&self) -> u64;
    /// Whether the source asked for answers on the same connection (QEMU's return path).
    fn return_path_requested(&self) -> bool {
        false
    }
    /// Post-copy device-state packages parsed so far (the source switched to post-copy).
    fn postcopy_packages(&self) -> u64 {
        0
    }
}

impl EventParser for StreamParser {
    fn feed(&mut self, bytes: &[u8]) {
        StreamParser::feed(self, bytes)
    }
    fn next_event(&mut self) -> Result<Option<StreamEvent>, ParseError> {
        StreamParser::next_event(self)
    }
    fn finish(&mut self) {
        StreamParser::finish(self)
    }
    fn is_done(&self) -> bool {
        StreamParser::is_done(self)
    }
    fn offset(&self) -> u64 {
        StreamParser::offset(self)
    }
    fn consumed(&self) -> u64 {
        self.stats().bytes
    }
    fn return_path_requested(&self) -> bool {
        self.stats().return_path_requested
    }
    fn postcopy_packages(&self) -> u64 {
        self.stats().postcopy_packages
    }
}

/// Where and why the parser stopped decoding and passes the rest through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Passthrough {
    /// Stream offset of the first byte passed through.
    pub offset: u64,
    pub reason: String,
}

/// Counters over what the parser has decoded so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Bytes consumed (reported in events).
    pub bytes: u64,
    pub ram_sections: u64,
    pub pages: u64,
    pub zero_pages: u64,
    pub xbzrle_pages: u64,
    pub named_records: u64,
    pub end_of_section_records: u64,
    pub commands: u64,
    /// Bytes reported as [`StreamEvent::Opaque`].
    pub opaque_bytes: u64,
    /// The source asked for a return path (`OPEN_RETURN_PATH`): the destination will answer on
    /// the same connection, which a one-way proxy cannot carry.
    pub return_path_requested: bool,
    /// The source advised post-copy (`POSTCOPY_ADVISE` for RAM).
    pub postcopy_advised: bool,
    /// Packaged device state seen: the source switched to post-copy here.
    pub postcopy_packages: u64,
    pub passthrough: Option<Passthrough>,
}

/// Why the stream could not be parsed, at which stream offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} at stream offset {offset}")]
pub struct ParseError {
    /// Offset of the record (or field) that failed.
    pub offset: u64,
    pub kind: ParseErrorKind,
}

/// What was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    #[error(
        "not a qemu migration stream: magic is {found:#010x}, expected {STREAM_MAGIC:#010x} (QEVM)"
    )]
    BadMagic { found: u32 },
    #[error(
        "unsupported migration stream version {found} (only version {STREAM_VERSION} is loadable)"
    )]
    UnsupportedVersion { found: u32 },
    #[error("unknown section type {found:#04x}")]
    UnknownSectionType { found: u8 },
    #[error("{what} is {value}, above the limit of {limit}")]
    LimitExceeded {
        what: &'static str,
        value: u64,
        limit: u64,
    },
    #[error("section id {section_id} was never started")]
    UnknownSectionId { section_id: u32 },
    #[error("section footer names section {found}, expected {expected}")]
    FooterMismatch { expected: u32, found: u32 },
    #[error("ram record continues the previous block but no block was named before")]
    ContinueWithoutBlock,
    #[error("ram record names a block that is empty or not utf-8")]
    BadBlockName,
    #[error("ram record has the flag combination {flags:#x}, which qemu does not send")]
    BadRamFlags { flags: u64 },
    #[error("xbzrle record has encoding {found:#04x}, expected 0x01")]
    BadXbzrleEncoding { found: u8 },
    #[error(
        "ram block list entry of {length} bytes exceeds the {remaining} bytes left of the announced total"
    )]
    BlockListOverrun { length: u64, remaining: u64 },
    #[error("stream ends inside {what} (truncated)")]
    Truncated { what: &'static str },
    #[error("bytes after the end of the stream (vm description)")]
    TrailingBytes,
    #[error("more input after finish")]
    InputAfterFinish,
    #[error("command {command} is malformed: {reason}")]
    MalformedCommand { command: u16, reason: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Header,
    Configuration,
    ConfigurationSubsection,
    Top,
    RamRecord {
        section_id: u32,
    },
    BlockList {
        section_id: u32,
        remaining: u64,
    },
    Footer {
        section_id: u32,
    },
    AfterEof,
    VmDescription {
        remaining: u64,
    },
    /// Inside a `PACKAGED` command's nested stream.
    Package {
        remaining: u64,
    },
    Done,
    Passthrough,
}

/// Result of looking for `n` bytes.
enum Need {
    Ready,
    More,
}

/// The parser. Feed it bytes with [`StreamParser::feed`], drain events with
/// [`StreamParser::next_event`] until it returns `Ok(None)`, call [`StreamParser::finish`] at the
/// end of input and drain again; [`StreamParser::is_done`] then says whether the stream was
/// complete. After an error it keeps returning that error.
#[derive(Debug)]
pub struct StreamParser {
    buffer: Vec<u8>,
    position: usize,
    /// Stream offset of `buffer[0]`.
    base: u64,
    finished: bool,
    state: State,
    failed: Option<ParseError>,
    ram_sections: HashSet<u32>,
    started_sections: usize,
    last_block: Option<Arc<str>>,
    block_names: Vec<Arc<str>>,
    block_list_entries: usize,
    ignore_shared: bool,
    stats: StreamStats,
}

impl Default for StreamParser {
    fn default() -> Self {
        Self::new()
    }
}

fn be16(bytes: &[u8]) -> u16 {
    u16::from_be_bytes([bytes[0], bytes[1]])
}

fn be32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

fn be64(bytes: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(word)
}

impl StreamParser {
    pub fn new() -> Self {
        Self {
            buffer: Vec::new(),
            position: 0,
            base: 0,
            finished: false,
            state: State::Header,
            failed: None,
            ram_sections: HashSet::new(),
            started_sections: 0,
            last_block: None,
            block_names: Vec::new(),
            block_list_entries: 0,
            ignore_shared: false,
            stats: StreamStats::default(),
        }
    }

    /// A parser for the stream a source QEMU sends when a paused post-copy resumes (`migrate`
    /// with `resume: true`): it has no header and continues sections started in the stream
    /// that broke (checked on QEMU 10.0: `RECV_BITMAP` commands, `POSTCOPY_RESUME`, then RAM
    /// `PART` sections whose START this side never saw). It is passed through whole, as opaque
    /// bytes: a RAM section id can only be learnt from its START, and guessing one would not
    /// be exact.
    pub fn resumed_postcopy() -> Self {
        let mut parser = Self::new();
        parser.start_passthrough(
            "a resumed post-copy stream continues sections this side did not see start".into(),
        );
        parser
    }

    /// Appends input. The parser keeps it until events consume it.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.finished {
            if !bytes.is_empty() && self.failed.is_none() {
                self.failed = Some(self.error(ParseErrorKind::InputAfterFinish));
            }
            return;
        }
        if self.position > 0 && self.position * 2 >= self.buffer.len() {
            self.buffer.drain(..self.position);
            self.base += self.position as u64;
            self.position = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// Marks the end of input: a stream cut short now fails with [`ParseErrorKind::Truncated`].
    pub fn finish(&mut self) {
        self.finished = true;
    }

    /// Whether the whole stream was consumed: the end of the VM description (or of the stream
    /// after EOF), or the end of input while passing through.
    pub fn is_done(&self) -> bool {
        self.failed.is_none()
            && self.finished
            && self.available().is_empty()
            && matches!(
                self.state,
                State::Done | State::AfterEof | State::Passthrough
            )
    }

    pub fn stats(&self) -> &StreamStats {
        &self.stats
    }

    /// Stream offset of the next byte to parse.
    pub fn offset(&self) -> u64 {
        self.base + self.position as u64
    }

    /// Bytes fed but not yet reported in events.
    pub fn buffered(&self) -> usize {
        self.available().len()
    }

    fn available(&self) -> &[u8] {
        &self.buffer[self.position..]
    }

    fn error(&self, kind: ParseErrorKind) -> ParseError {
        ParseError {
            offset: self.offset(),
            kind,
        }
    }

    fn fail(&mut self, kind: ParseErrorKind) -> ParseError {
        let error = self.error(kind);
        self.failed = Some(error.clone());
        error
    }

    fn need(&mut self, length: usize, what: &'static str) -> Result<Need, ParseError> {
        if self.available().len() >= length {
            Ok(Need::Ready)
        } else if self.finished {
            Err(self.fail(ParseErrorKind::Truncated { what }))
        } else {
            Ok(Need::More)
        }
    }

    fn take(&mut self, length: usize) -> Vec<u8> {
        let bytes = self.available()[..length].to_vec();
        self.consume(length);
        bytes
    }

    fn consume(&mut self, length: usize) {
        self.position += length;
        self.stats.bytes += length as u64;
    }

    fn opaque(&mut self, length: usize) -> StreamEvent {
        self.stats.opaque_bytes += length as u64;
        StreamEvent::Opaque(self.take(length))
    }

    fn start_passthrough(&mut self, reason: String) {
        tracing::debug!(offset = self.offset(), reason = %reason, "migration stream passed through from here");
        self.stats.passthrough = Some(Passthrough {
            offset: self.offset(),
            reason,
        });
        self.state = State::Passthrough;
    }

    /// The next event, `Ok(None)` when more input is needed (or the stream is done).
    pub fn next_event(&mut self) -> Result<Option<StreamEvent>, ParseError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        loop {
            let step = match self.state {
                State::Header => self.parse_header(),
                State::Configuration => self.parse_configuration(),
                State::ConfigurationSubsection => self.parse_configuration_subsection(),
                State::Top => self.parse_top(),
                State::RamRecord { section_id } => self.parse_ram_record(section_id),
                State::BlockList {
                    section_id,
                    remaining,
                } => self.parse_block_list(section_id, remaining),
                State::Footer { section_id } => self.parse_footer(section_id),
                State::AfterEof => self.parse_after_eof(),
                State::VmDescription { remaining } => self.parse_vm_description(remaining),
                State::Package { remaining } => self.parse_package(remaining),
                State::Done => {
                    if self.available().is_empty() {
                        return Ok(None);
                    }
                    Err(self.fail(ParseErrorKind::TrailingBytes))
                }
                State::Passthrough => {
                    let length = self.available().len().min(MAX_OPAQUE_EVENT);
                    if length == 0 {
                        return Ok(None);
                    }
                    return Ok(Some(self.opaque(length)));
                }
            };
            match step? {
                Step::Event(event) => return Ok(Some(event)),
                Step::NeedMore => return Ok(None),
                Step::Continue => {}
            }
        }
    }

    fn parse_header(&mut self) -> Result<Step, ParseError> {
        if let Need::More = self.need(8, "the stream header")? {
            return Ok(Step::NeedMore);
        }
        let magic = be32(self.available());
        if magic != STREAM_MAGIC {
            return Err(self.fail(ParseErrorKind::BadMagic { found: magic }));
        }
        let version = be32(&self.available()[4..]);
        if version != STREAM_VERSION {
            let error = ParseError {
                offset: self.offset() + 4,
                kind: ParseErrorKind::UnsupportedVersion { found: version },
            };
            self.failed = Some(error.clone());
            return Err(error);
        }
        self.state = State::Configuration;
        Ok(Step::Event(self.opaque(8)))
    }

    fn parse_configuration(&mut self) -> Result<Step, ParseError> {
        if let Need::More = self.need(1, "the section after the header")? {
            return Ok(Step::NeedMore);
        }
        if self.available()[0] != section_type::CONFIGURATION {
            self.state = State::Top;
            return Ok(Step::Continue);
        }
        if let Need::More = self.need(5, "the configuration section")? {
            return Ok(Step::NeedMore);
        }
        let length = be32(&self.available()[1..]);
        if length > MAX_CONFIGURATION_LENGTH {
            return Err(self.fail(ParseErrorKind::LimitExceeded {
                what: "configuration machine name length",
                value: length.into(),
                limit: MAX_CONFIGURATION_LENGTH.into(),
            }));
        }
        if let Need::More = self.need(5 + length as usize, "the configuration section")? {
            return Ok(Step::NeedMore);
        }
        self.state = State::ConfigurationSubsection;
        Ok(Step::Event(self.opaque(5 + length as usize)))
    }

    fn parse_configuration_subsection(&mut self) -> Result<Step, ParseError> {
        if let Need::More = self.need(1, "the section after the configuration")? {
            return Ok(Step::NeedMore);
        }
        if self.available()[0] != section_type::SUBSECTION {
            self.state = State::Top;
            return Ok(Step::Continue);
        }
        if let Need::More = self.need(2, "a configuration subsection")? {
            return Ok(Step::NeedMore);
        }
        let name_length = self.available()[1] as usize;
        let header = 2 + name_length + 4;
        if let Need::More = self.need(header, "a configuration subsection")? {
            return Ok(Step::NeedMore);
        }
        let name = String::from_utf8_lossy(&self.available()[2..2 + name_length]).into_owned();
        let body_length = match name.as_str() {
            "configuration/target-page-bits" => 4,
            "configuration/uuid" => 16,
            "configuration/capabilities" => {
                if let Need::More = self.need(header + 4, "the configuration capabilities")? {
                    return Ok(Step::NeedMore);
                }
                let count = be32(&self.available()[header..]);
                if count > MAX_CAPABILITIES {
                    return Err(self.fail(ParseErrorKind::LimitExceeded {
                        what: "configuration capability count",
                        value: count.into(),
                        limit: MAX_CAPABILITIES.into(),
                    }));
                }
                let mut cursor = header + 4;
                let mut capabilities = Vec::new();
                for _ in 0..count {
                    if let Need::More = self.need(cursor + 1, "the configuration capabilities")? {
                        return Ok(Step::NeedMore);
                    }
                    let length = self.available()[cursor] as usize;
                    if let Need::More =
                        self.need(cursor + 1 + length, "the configuration capabilities")?
                    {
                        return Ok(Step::NeedMore);
                    }
                    capabilities.push(
                        String::from_utf8_lossy(&self.available()[cursor + 1..cursor + 1 + length])
                            .into_owned(),
                    );
                    cursor += 1 + length;
                }
                for capability in &capabilities {
                    match capability.as_str() {
                        "x-ignore-shared" => self.ignore_shared = true,
                        other => {
                            self.start_passthrough(format!(
                                "migration capability {other:?} changes the ram format"
                            ));
                            return Ok(Step::Continue);
                        }
                    }
                }
                cursor - header
            }
            other => {
                self.start_passthrough(format!("unknown configuration subsection {other:?}"));
                return Ok(Step::Continue);
            }
        };
        if let Need::More = self.need(header + body_length, "a configuration subsection")? {
            return Ok(Step::NeedMore);
        }
        if name == "configuration/target-page-bits" {
            let bits = be32(&self.available()[header..]);
            if 1u64.checked_shl(bits) != Some(PAGE_SIZE as u64) {
                self.start_passthrough(format!(
                    "target page bits {bits}: only {PAGE_SIZE}-byte pages are decoded"
                ));
                return Ok(Step::Continue);
            }
        }
        Ok(Step::Event(self.opaque(header + body_length)))
    }

    fn parse_top(&mut self) -> Result<Step, ParseError> {
        if let Need::More = self.need(1, "a section header")? {
            return Ok(Step::NeedMore);
        }
        let kind = self.available()[0];
        match kind {
            section_type::EOF => {
                self.state = State::AfterEof;
                Ok(Step::Event(self.opaque(1)))
            }
            section_type::START | section_type::FULL => {
                if let Need::More = self.need(6, "a section header")? {
                    return Ok(Step::NeedMore);
                }
                let section_id = be32(&self.available()[1..]);
                let name_length = self.available()[5] as usize;
                let header = 6 + name_length + 8;
                if let Need::More = self.need(header, "a section header")? {
                    return Ok(Step::NeedMore);
                }
                let name =
                    String::from_utf8_lossy(&self.available()[6..6 + name_length]).into_owned();
                if kind == section_type::FULL {
                    self.start_passthrough(format!(
                        "device state of {name:?} (full section {section_id}) has no length"
                    ));
                    return Ok(Step::Continue);
                }
                if name != RAM_SECTION {
                    self.start_passthrough(format!(
                        "iterable section {name:?} (section {section_id}) is not decoded"
                    ));
                    return Ok(Step::Continue);
                }
                if !self.ram_sections.contains(&section_id) {
                    if self.started_sections >= MAX_SECTIONS {
                        return Err(self.fail(ParseErrorKind::LimitExceeded {
                            what: "number of sections",
                            value: self.started_sections as u64 + 1,
                            limit: MAX_SECTIONS as u64,
                        }));
                    }
                    self.started_sections += 1;
                    self.ram_sections.insert(section_id);
                }
                self.stats.ram_sections += 1;
                self.state = State::RamRecord { section_id };
                Ok(Step::Event(self.opaque(header)))
            }
            section_type::PART | section_type::END => {
                if let Need::More = self.need(5, "a section header")? {
                    return Ok(Step::NeedMore);
                }
                let section_id = be32(&self.available()[1..]);
                if !self.ram_sections.contains(&section_id) {
                    return Err(self.fail(ParseErrorKind::UnknownSectionId { section_id }));
                }
                self.stats.ram_sections += 1;
                self.state = State::RamRecord { section_id };
                Ok(Step::Event(self.opaque(5)))
            }
            section_type::COMMAND => {
                if let Need::More = self.need(5, "a command")? {
                    return Ok(Step::NeedMore);
                }
                let command = be16(&self.available()[1..]);
                let length = be16(&self.available()[3..]) as usize;
                if let Need::More = self.need(5 + length, "a command")? {
                    return Ok(Step::NeedMore);
                }
                let body = &self.available()[5..5 + length];
                match command {
                    command::PACKAGED => {
                        if length != 4 {
                            return Err(self.fail(ParseErrorKind::MalformedCommand {
                                command,
                                reason: format!("a package length of {length} bytes, not 4"),
                            }));
                        }
                        let package = u64::from(be32(body));
                        if package > MAX_PACKAGE_LENGTH {
                            return Err(self.fail(ParseErrorKind::LimitExceeded {
                                what: "packaged command length",
                                value: package,
                                limit: MAX_PACKAGE_LENGTH,
                            }));
                        }
                        self.stats.postcopy_packages += 1;
                        self.stats.commands += 1;
                        self.state = State::Package { remaining: package };
                        return Ok(Step::Event(self.opaque(5 + length)));
                    }
                    command::POSTCOPY_ADVISE if length == 16 => {
                        // Only blocks whose page size differs from the host's carry a page-size
                        // field in the block list; the summary ORs every block's page size.
                        let summary = be64(body);
                        let target = be64(&body[8..]);
                        if summary != PAGE_SIZE as u64 || target != PAGE_SIZE as u64 {
                            self.start_passthrough(format!(
                                "postcopy advice with page-size summary {summary:#x} and target \
                                 page size {target}: the block list then has page sizes"
                            ));
                            return Ok(Step::Continue);
                        }
                        self.stats.postcopy_advised = true;
                    }
                    command::OPEN_RETURN_PATH => self.stats.return_path_requested = true,
                    _ => {}
                }
                self.stats.commands += 1;
                Ok(Step::Event(self.opaque(5 + length)))
            }
            other => Err(self.fail(ParseErrorKind::UnknownSectionType { found: other })),
        }
    }

    fn parse_footer(&mut self, section_id: u32) -> Result<Step, ParseError> {
        if let Need::More = self.need(1, "a section footer")? {
            return Ok(Step::NeedMore);
        }
        // Machines with `send_section_footer` off have none; a section type byte is never 0x7e.
        if self.available()[0] != section_type::FOOTER {
            self.state = State::Top;
            return Ok(Step::Continue);
        }
        if let Need::More = self.need(5, "a section footer")? {
            return Ok(Step::NeedMore);
        }
        let found = be32(&self.available()[1..]);
        if found != section_id {
            return Err(self.fail(ParseErrorKind::FooterMismatch {
                expected: section_id,
                found,
            }));
        }
        self.state = State::Top;
        Ok(Step::Event(self.opaque(5)))
    }

    fn parse_block_list(&mut self, section_id: u32, remaining: u64) -> Result<Step, ParseError> {
        if remaining == 0 {
            self.state = State::RamRecord { section_id };
            return Ok(Step::Continue);
        }
        if let Need::More = self.need(1, "the ram block list")? {
            return Ok(Step::NeedMore);
        }
        let name_length = self.available()[0] as usize;
        let entry = 1 + name_length + 8 + if self.ignore_shared { 8 } else { 0 };
        if let Need::More = self.need(entry, "the ram block list")? {
            return Ok(Step::NeedMore);
        }
        let length = be64(&self.available()[1 + name_length..]);
        if length > remaining {
            return Err(self.fail(ParseErrorKind::BlockListOverrun { length, remaining }));
        }
        if self.block_list_entries >= MAX_BLOCKS {
            return Err(self.fail(ParseErrorKind::LimitExceeded {
                what: "number of ram block list entries",
                value: self.block_list_entries as u64 + 1,
                limit: MAX_BLOCKS as u64,
            }));
        }
        self.block_list_entries += 1;
        self.state = State::BlockList {
            section_id,
            remaining: remaining - length,
        };
        Ok(Step::Event(self.opaque(entry)))
    }

    fn intern_block(&mut self, name: &[u8]) -> Result<Arc<str>, ParseError> {
        if let Some(block) = &self.last_block
            && block.as_bytes() == name
        {
            return Ok(block.clone());
        }
        if let Some(block) = self
            .block_names
            .iter()
            .find(|block| block.as_bytes() == name)
        {
            return Ok(block.clone());
        }
        let Ok(text) = std::str::from_utf8(name) else {
            return Err(self.fail(ParseErrorKind::BadBlockName));
        };
        if text.is_empty() {
            return Err(self.fail(ParseErrorKind::BadBlockName));
        }
        if self.block_names.len() >= MAX_BLOCKS {
            return Err(self.fail(ParseErrorKind::LimitExceeded {
                what: "number of distinct ram block names",
                value: self.block_names.len() as u64 + 1,
                limit: MAX_BLOCKS as u64,
            }));
        }
        let block: Arc<str> = Arc::from(text);
        self.block_names.push(block.clone());
        Ok(block)
    }

    fn parse_ram_record(&mut self, section_id: u32) -> Result<Step, ParseError> {
        if let Need::More = self.need(8, "a ram record")? {
            return Ok(Step::NeedMore);
        }
        let word = be64(self.available());
        let flags = word & FLAG_BITS;
        let offset = word & !FLAG_BITS;
        match flags & !ram_flag::CONTINUE {
            ram_flag::MEM_SIZE => {
                self.state = State::BlockList {
                    section_id,
                    remaining: offset,
                };
                Ok(Step::Event(self.opaque(8)))
            }
            ram_flag::EOS => {
                self.stats.end_of_section_records += 1;
                self.state = State::Footer { section_id };
                Ok(Step::Event(self.opaque(8)))
            }
            ram_flag::MULTIFD_FLUSH => Ok(Step::Event(self.opaque(8))),
            kind @ (ram_flag::ZERO | ram_flag::PAGE | ram_flag::XBZRLE) => {
                let naming = if flags & ram_flag::CONTINUE == 0 {
                    RecordNaming::Named
                } else {
                    RecordNaming::Continue
                };
                let mut cursor = 8;
                let name_range = if naming == RecordNaming::Named {
                    if let Need::More = self.need(9, "a ram record")? {
                        return Ok(Step::NeedMore);
                    }
                    let length = self.available()[8] as usize;
                    cursor = 9 + length;
                    Some(9..cursor)
                } else {
                    None
                };
                let payload = match kind {
                    ram_flag::ZERO => 1,
                    ram_flag::PAGE => PAGE_SIZE,
                    _ => {
                        if let Need::More = self.need(cursor + 3, "an xbzrle record")? {
                            return Ok(Step::NeedMore);
                        }
                        let encoding = self.available()[cursor];
                        if encoding != XBZRLE_ENCODING {
                            return Err(
                                self.fail(ParseErrorKind::BadXbzrleEncoding { found: encoding })
                            );
                        }
                        let length = be16(&self.available()[cursor + 1..]) as usize;
                        if length > PAGE_SIZE {
                            return Err(self.fail(ParseErrorKind::LimitExceeded {
                                what: "xbzrle delta length",
                                value: length as u64,
                                limit: PAGE_SIZE as u64,
                            }));
                        }
                        3 + length
                    }
                };
                if let Need::More = self.need(cursor + payload, "a ram record")? {
                    return Ok(Step::NeedMore);
                }
                let block = match name_range {
                    Some(range) => {
                        let name = self.available()[range].to_vec();
                        let block = self.intern_block(&name)?;
                        self.stats.named_records += 1;
                        self.last_block = Some(block.clone());
                        block
                    }
                    None => match &self.last_block {
                        Some(block) => block.clone(),
                        None => return Err(self.fail(ParseErrorKind::ContinueWithoutBlock)),
                    },
                };
                let event = match kind {
                    ram_flag::ZERO => {
                        let fill = self.available()[cursor];
                        self.consume(cursor + 1);
                        self.stats.zero_pages += 1;
                        StreamEvent::Zero(ZeroPage {
                            block,
                            offset,
                            naming,
                            fill,
                        })
                    }
                    ram_flag::PAGE => {
                        let mut data = Box::new([0u8; PAGE_SIZE]);
                        data.copy_from_slice(&self.available()[cursor..cursor + PAGE_SIZE]);
                        self.consume(cursor + PAGE_SIZE);
                        self.stats.pages += 1;
                        StreamEvent::Page(RamPage {
                            block,
                            offset,
                            naming,
                            data,
                        })
                    }
                    _ => {
                        self.stats.xbzrle_pages += 1;
                        self.opaque(cursor + payload)
                    }
                };
                Ok(Step::Event(event))
            }
            ram_flag::HOOK => {
                self.start_passthrough("ram hook record (rdma)".into());
                Ok(Step::Continue)
            }
            ram_flag::COMPRESS_PAGE => {
                self.start_passthrough("compressed ram page (compress capability)".into());
                Ok(Step::Continue)
            }
            _ => Err(self.fail(ParseErrorKind::BadRamFlags { flags })),
        }
    }

    fn parse_after_eof(&mut self) -> Result<Step, ParseError> {
        if self.available().is_empty() {
            return Ok(Step::NeedMore);
        }
        if self.available()[0] != section_type::VMDESCRIPTION {
            self.start_passthrough("bytes after the end of device state".into());
            return Ok(Step::Continue);
        }
        if let Need::More = self.need(5, "the vm description header")? {
            return Ok(Step::NeedMore);
        }
        let length = be32(&self.available()[1..]);
        self.state = State::VmDescription {
            remaining: length.into(),
        };
        Ok(Step::Event(self.opaque(5)))
    }

    fn parse_vm_description(&mut self, remaining: u64) -> Result<Step, ParseError> {
        self.counted_run(
            remaining,
            "the vm description",
            |remaining| State::VmDescription { remaining },
            State::Done,
        )
    }

    fn parse_package(&mut self, remaining: u64) -> Result<Step, ParseError> {
        self.counted_run(
            remaining,
            "a packaged command",
            |remaining| State::Package { remaining },
            State::Top,
        )
    }

    /// Reports the next bytes of a run of known length as opaque: `within` is the state while
    /// `remaining` bytes are left, `after` the state once none are.
    fn counted_run(
        &mut self,
        remaining: u64,
        what: &'static str,
        within: fn(u64) -> State,
        after: State,
    ) -> Result<Step, ParseError> {
        if remaining == 0 {
            self.state = after;
            return Ok(Step::Continue);
        }
        let available = self.available().len() as u64;
        if available == 0 {
            if self.finished {
                return Err(self.fail(ParseErrorKind::Truncated { what }));
            }
            return Ok(Step::NeedMore);
        }
        let length = available.min(remaining).min(MAX_OPAQUE_EVENT as u64);
        self.state = within(remaining - length);
        Ok(Step::Event(self.opaque(length as usize)))
    }
}

enum Step {
    Event(StreamEvent),
    NeedMore,
    Continue,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StreamRebuilder;
    use proptest::prelude::*;

    /// Writes crafted streams the way QEMU 7.2 lays them out.
    #[derive(Default)]
    struct Craft {
        bytes: Vec<u8>,
    }

    impl Craft {
        fn header(mut self) -> Self {
            self.bytes.extend_from_slice(&STREAM_MAGIC.to_be_bytes());
            self.bytes.extend_from_slice(&STREAM_VERSION.to_be_bytes());
            self
        }
        fn configuration(mut self, machine: &str) -> Self {
            self.bytes.push(section_type::CONFIGURATION);
            self.bytes
                .extend_from_slice(&(machine.len() as u32).to_be_bytes());
            self.bytes.extend_from_slice(machine.as_bytes());
            self
        }
        fn section_start(mut self, kind: u8, id: u32, name: &str) -> Self {
            self.bytes.push(kind);
            self.bytes.extend_from_slice(&id.to_be_bytes());
            self.bytes.push(name.len() as u8);
            self.bytes.extend_from_slice(name.as_bytes());
            self.bytes.extend_from_slice(&0u32.to_be_bytes());
            self.bytes.extend_from_slice(&4u32.to_be_bytes());
            self
        }
        fn section(mut self, kind: u8, id: u32) -> Self {
            self.bytes.push(kind);
            self.bytes.extend_from_slice(&id.to_be_bytes());
            self
        }
        fn footer(mut self, id: u32) -> Self {
            self.bytes.push(section_type::FOOTER);
            self.bytes.extend_from_slice(&id.to_be_bytes());
            self
        }
        fn word(mut self, offset: u64, flags: u64) -> Self {
            self.bytes
                .extend_from_slice(&(offset | flags).to_be_bytes());
            self
        }
        fn name(mut self, name: &str) -> Self {
            self.bytes.push(name.len() as u8);
            self.bytes.extend_from_slice(name.as_bytes());
            self
        }
        fn raw(mut self, bytes: &[u8]) -> Self {
            self.bytes.extend_from_slice(bytes);
            self
        }
        fn block_list(self, blocks: &[(&str, u64)]) -> Self {
            let total: u64 = blocks.iter().map(|(_, length)| length).sum();
            let mut craft = self.word(total, ram_flag::MEM_SIZE);
            for (name, length) in blocks {
                craft = craft.name(name).raw(&length.to_be_bytes());
            }
            craft
        }
        fn page(self, block: Option<&str>, offset: u64, fill: u8) -> Self {
            let craft = match block {
                Some(block) => self.word(offset, ram_flag::PAGE).name(block),
                None => self.word(offset, ram_flag::PAGE | ram_flag::CONTINUE),
            };
            craft.raw(&[fill; PAGE_SIZE])
        }
        fn zero(self, block: Option<&str>, offset: u64) -> Self {
            let craft = match block {
                Some(block) => self.word(offset, ram_flag::ZERO).name(block),
                None => self.word(offset, ram_flag::ZERO | ram_flag::CONTINUE),
            };
            craft.raw(&[0])
        }
        fn eos(self) -> Self {
            self.word(0, ram_flag::EOS)
        }
    }

    /// A stream with every record kind the parser models, then device state, EOF and vmdesc.
    fn sample_stream() -> Vec<u8> {
        Craft::default()
            .header()
            .configuration("pc-q35-7.2")
            .section_start(section_type::START, 2, "ram")
            .block_list(&[("pc.ram", 1 << 20), ("/rom@etc/acpi/tables", 0x20000)])
            .eos()
            .footer(2)
            .section(section_type::PART, 2)
            .page(Some("pc.ram"), 0x1000, 0xab)
            .page(None, 0x2000, 0xcd)
            .zero(None, 0x3000)
            // XBZRLE: encoding 1, 4-byte delta
            .word(0x2000, ram_flag::XBZRLE | ram_flag::CONTINUE)
            .raw(&[1, 0, 4, 0x10, 0x02, 0xaa, 0xbb])
            .zero(Some("/rom@etc/acpi/tables"), 0)
            .page(Some("pc.ram"), 0x5000, 0x01)
            .eos()
            .footer(2)
            .section(section_type::END, 2)
            .page(None, 0x1000, 0xee)
            .eos()
            .footer(2)
            .section_start(section_type::FULL, 3, "timer")
            .raw(&[0x7e, 0, 0, 0, 2, 0x01, 0x02])
            .footer(3)
            .raw(&[
                section_type::EOF,
                section_type::VMDESCRIPTION,
                0,
                0,
                0,
                2,
                b'{',
                b'}',
            ])
            .bytes
    }

    fn parse_all(chunks: &[&[u8]]) -> Result<(Vec<StreamEvent>, StreamParser), ParseError> {
        let mut parser = StreamParser::new();
        let mut events = Vec::new();
        for chunk in chunks {
            parser.feed(chunk);
            while let Some(event) = parser.next_event()? {
                events.push(event);
            }
        }
        parser.finish();
        while let Some(event) = parser.next_event()? {
            events.push(event);
        }
        Ok((events, parser))
    }

    fn rebuild(events: &[StreamEvent]) -> Vec<u8> {
        let mut rebuilder = StreamRebuilder::new();
        let mut out = Vec::new();
        for event in events {
            rebuilder.write_event(event, &mut out);
        }
        assert_eq!(rebuilder.length(), out.len() as u64);
        // A whole stream's digest, taken from the rebuilt bytes alone, is the rebuilder's.
        if let Ok(digest) = crate::rebuild::stream_digest(StreamParser::new(), &out) {
            assert_eq!(rebuilder.checksum(), digest);
        }
        out
    }

    #[test]
    fn every_record_kind_is_decoded_and_rebuilt_byte_for_byte() {
        let stream = sample_stream();
        let (events, parser) = parse_all(&[&stream]).unwrap();
        assert!(parser.is_done());
        assert_eq!(rebuild(&events), stream);
        let pages: Vec<(&str, u64, RecordNaming, u8)> = events
            .iter()
            .filter_map(|event| match event {
                StreamEvent::Page(page) => {
                    Some((&*page.block, page.offset, page.naming, page.data[0]))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            pages,
            vec![
                ("pc.ram", 0x1000, RecordNaming::Named, 0xab),
                ("pc.ram", 0x2000, RecordNaming::Continue, 0xcd),
                ("pc.ram", 0x5000, RecordNaming::Named, 0x01),
                ("pc.ram", 0x1000, RecordNaming::Continue, 0xee),
            ]
        );
        let zeros: Vec<(&str, u64, RecordNaming)> = events
            .iter()
            .filter_map(|event| match event {
                StreamEvent::Zero(zero) => Some((&*zero.block, zero.offset, zero.naming)),
                _ => None,
            })
            .collect();
        assert_eq!(
            zeros,
            vec![
                ("pc.ram", 0x3000, RecordNaming::Continue),
                ("/rom@etc/acpi/tables", 0, RecordNaming::Named),
            ]
        );
        let stats = parser.stats();
        assert_eq!(stats.pages, 4);
        assert_eq!(stats.zero_pages, 2);
        assert_eq!(stats.xbzrle_pages, 1);
        assert_eq!(stats.end_of_section_records, 3);
        assert_eq!(stats.ram_sections, 3);
        assert_eq!(stats.bytes, stream.len() as u64);
        let passthrough = stats
            .passthrough
            .as_ref()
            .expect("device state passes through");
        assert!(passthrough.reason.contains("timer"), "{passthrough:?}");
        assert_eq!(
            &stream[passthrough.offset as usize..passthrough.offset as usize + 5],
            &[section_type::FULL, 0, 0, 0, 3]
        );
    }

    #[test]
    fn events_do_not_depend_on_how_the_input_is_cut() {
        let stream = sample_stream();
        let (whole, _) = parse_all(&[&stream]).unwrap();
        for cut in [1usize, 3, 7, 13, 4095, 4097] {
            let chunks: Vec<&[u8]> = stream.chunks(cut).collect();
            let (events, parser) = parse_all(&chunks).unwrap();
            assert!(parser.is_done());
            // Opaque events may be cut differently; pages and their order may not.
            assert_eq!(rebuild(&events), stream, "cut {cut}");
            let records = |events: &[StreamEvent]| -> Vec<StreamEvent> {
                events
                    .iter()
                    .filter(|event| !matches!(event, StreamEvent::Opaque(_)))
                    .cloned()
                    .collect()
            };
            assert_eq!(records(&events), records(&whole), "cut {cut}");
        }
    }

    #[test]
    fn every_truncation_is_an_error_naming_where_it_stopped() {
        let stream = sample_stream();
        let passthrough_offset = parse_all(&[&stream])
            .unwrap()
            .1
            .stats()
            .passthrough
            .clone()
            .unwrap()
            .offset as usize;
        for length in 0..passthrough_offset {
            let error = parse_all(&[&stream[..length]]).unwrap_err();
            assert!(
                matches!(error.kind, ParseErrorKind::Truncated { .. }),
                "length {length}: {error}"
            );
            assert!(error.offset <= length as u64, "length {length}: {error}");
        }
    }

    #[test]
    fn a_stream_that_is_not_qemus_is_refused_at_offset_zero() {
        let error = parse_all(&[b"GET / HTTP/1.1\r\n"]).unwrap_err();
        assert_eq!(error.offset, 0);
        assert!(matches!(error.kind, ParseErrorKind::BadMagic { .. }));
        assert!(
            error.to_string().contains("not a qemu migration stream"),
            "{error}"
        );

        let mut stream = Craft::default().header().bytes;
        stream[7] = 2;
        let error = parse_all(&[&stream]).unwrap_err();
        assert_eq!(error.offset, 4);
        assert_eq!(error.kind, ParseErrorKind::UnsupportedVersion { found: 2 });
    }

    #[test]
    fn continue_without_a_named_block_is_an_error_at_the_record() {
        let craft = Craft::default()
            .header()
            .section_start(section_type::START, 2, "ram");
        let record_offset = craft.bytes.len() as u64;
        let stream = craft.page(None, 0, 1).bytes;
        let error = parse_all(&[&stream]).unwrap_err();
        assert_eq!(error.kind, ParseErrorKind::ContinueWithoutBlock);
        assert_eq!(error.offset, record_offset);
    }

    #[test]
    fn malformed_records_are_errors() {
        let start = || {
            Craft::default()
                .header()
                .section_start(section_type::START, 2, "ram")
        };
        let cases: Vec<(Vec<u8>, ParseErrorKind)> = vec![
            (
                start().eos().footer(9).bytes,
                ParseErrorKind::FooterMismatch {
                    expected: 2,
                    found: 9,
                },
            ),
            (
                start().eos().footer(2).section(section_type::PART, 5).bytes,
                ParseErrorKind::UnknownSectionId { section_id: 5 },
            ),
            (
                start()
                    .word(0, ram_flag::XBZRLE)
                    .name("pc.ram")
                    .raw(&[1, 0x10, 0x01])
                    .bytes,
                ParseErrorKind::LimitExceeded {
                    what: "xbzrle delta length",
                    value: 0x1001,
                    limit: 4096,
                },
            ),
            (
                start()
                    .word(0, ram_flag::XBZRLE)
                    .name("pc.ram")
                    .raw(&[2, 0, 0])
                    .bytes,
                ParseErrorKind::BadXbzrleEncoding { found: 2 },
            ),
            (
                start().word(0, ram_flag::PAGE | ram_flag::ZERO).bytes,
                ParseErrorKind::BadRamFlags { flags: 0x0a },
            ),
            (
                start()
                    .word(0, ram_flag::PAGE)
                    .name("")
                    .raw(&[0; PAGE_SIZE])
                    .bytes,
                ParseErrorKind::BadBlockName,
            ),
            (
                start()
                    .word(0x1000, ram_flag::MEM_SIZE)
                    .name("pc.ram")
                    .raw(&0x2000u64.to_be_bytes())
                    .bytes,
                ParseErrorKind::BlockListOverrun {
                    length: 0x2000,
                    remaining: 0x1000,
                },
            ),
            (
                Craft::default().header().raw(&[0x42]).bytes,
                ParseErrorKind::UnknownSectionType { found: 0x42 },
            ),
            (
                Craft::default()
                    .header()
                    .raw(&[section_type::CONFIGURATION, 0xff, 0xff, 0xff, 0xff])
                    .bytes,
                ParseErrorKind::LimitExceeded {
                    what: "configuration machine name length",
                    value: 0xffff_ffff,
                    limit: MAX_CONFIGURATION_LENGTH.into(),
                },
            ),
        ];
        for (stream, expected) in cases {
            let error = parse_all(&[&stream]).unwrap_err();
            assert_eq!(error.kind, expected, "{error}");
            // Sticky: the parser keeps failing the same way.
            let mut parser = StreamParser::new();
            parser.feed(&stream);
            let mut first = None;
            loop {
                match parser.next_event() {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("no error for {expected:?}"),
                    Err(error) => {
                        first = first.or(Some(error.clone()));
                        if first.as_ref() != Some(&error) {
                            panic!("error changed");
                        }
                        break;
                    }
                }
            }
            assert_eq!(parser.next_event().unwrap_err(), first.unwrap());
        }
    }

    #[test]
    fn a_block_list_of_empty_blocks_hits_the_limit() {
        let mut craft = Craft::default()
            .header()
            .section_start(section_type::START, 2, "ram")
            .word(0x1000, ram_flag::MEM_SIZE);
        for _ in 0..=MAX_BLOCKS {
            craft = craft.name("x").raw(&0u64.to_be_bytes());
        }
        let error = parse_all(&[&craft.bytes]).unwrap_err();
        assert!(
            matches!(error.kind, ParseErrorKind::LimitExceeded { .. }),
            "{error}"
        );
    }

    #[test]
    fn sections_without_footers_are_accepted() {
        let stream = Craft::default()
            .header()
            .section_start(section_type::START, 2, "ram")
            .block_list(&[("pc.ram", 1 << 20)])
            .eos()
            .section(section_type::END, 2)
            .page(Some("pc.ram"), 0, 7)
            .eos()
            .raw(&[section_type::EOF])
            .bytes;
        let (events, parser) = parse_all(&[&stream]).unwrap();
        assert!(parser.is_done());
        assert_eq!(parser.stats().pages, 1);
        assert!(parser.stats().passthrough.is_none());
        assert_eq!(rebuild(&events), stream);
    }

    #[test]
    fn commands_pass_and_a_package_is_skipped_by_its_length() {
        let stream = Craft::default()
            .header()
            .raw(&[section_type::COMMAND, 0, 1, 0, 0]) // open return path
            .raw(&[section_type::COMMAND, 0, 2, 0, 4, 0, 0, 0, 1]) // ping 1
            .raw(&[section_type::COMMAND, 0, 7, 0, 4, 0, 0, 0, 3, 1, 2, 3])
            .raw(&[section_type::EOF])
            .bytes;
        let (events, parser) = parse_all(&[&stream]).unwrap();
        assert!(parser.is_done());
        assert!(parser.stats().return_path_requested);
        assert_eq!(parser.stats().commands, 3);
        assert_eq!(parser.stats().postcopy_packages, 1);
        assert!(parser.stats().passthrough.is_none());
        assert_eq!(rebuild(&events), stream);
    }

    /// A post-copy stream as QEMU writes it: the advice before the RAM section, precopy pages,
    /// then the switch (discard, the package holding device state and RUN), then the pages the
    /// destination still needs. Every page is parsed, on both sides of the package, and a
    /// package cut across reads is still skipped exactly.
    #[test]
    fn a_post_copy_stream_is_followed_through_the_switch() {
        let mut advise = vec![section_type::COMMAND, 0, 3, 0, 16];
        advise.extend_from_slice(&4096u64.to_be_bytes());
        advise.extend_from_slice(&4096u64.to_be_bytes());
        let package_body = [
            section_type::FULL,
            0,
            0,
            0,
            9,
            3,
            b'c',
            b'p',
            b'u',
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            1,
            0x55,
            section_type::EOF,
            section_type::COMMAND,
            0,
            5,
            0,
            0,
        ];
        let mut package = vec![section_type::COMMAND, 0, 7, 0, 4];
        package.extend_from_slice(&(package_body.len() as u32).to_be_bytes());
        package.extend_from_slice(&package_body);
        let stream = Craft::default()
            .header()
            .raw(&[section_type::COMMAND, 0, 1, 0, 0])
            .raw(&advise)
            .section_start(section_type::START, 2, "ram")
            .block_list(&[("pc.ram", 1 << 20)])
            .eos()
            .footer(2)
            .section(section_type::PART, 2)
            .page(Some("pc.ram"), 0, 7)
            .page(None, 4096, 8)
            .eos()
            .footer(2)
            .raw(&[section_type::COMMAND, 0, 6, 0, 3, 0, 1, b'x']) // discard
            .raw(&[section_type::COMMAND, 0, 4, 0, 0]) // listen
            .raw(&package)
            .section(section_type::PART, 2)
            .page(Some("pc.ram"), 8192, 9)
            .eos()
            .footer(2)
            .section(section_type::END, 2)
            .eos()
            .footer(2)
            .raw(&[section_type::EOF])
            .bytes;
        for cut in [stream.len(), 7, 1] {
            let pieces: Vec<&[u8]> = stream.chunks(cut).collect();
            let (events, parser) = parse_all(&pieces).unwrap();
            assert!(parser.is_done());
            let stats = parser.stats();
            assert!(stats.passthrough.is_none(), "{:?}", stats.passthrough);
            assert!(stats.postcopy_advised);
            assert_eq!(stats.postcopy_packages, 1);
            assert_eq!(stats.pages, 3);
            assert_eq!(rebuild(&events), stream);
        }

        // Blocks of another page size (huge pages) put a page size in the block list: not
        // modelled, so the rest passes through untouched.
        let mut huge = vec![section_type::COMMAND, 0, 3, 0, 16];
        huge.extend_from_slice(&(4096u64 | (2 << 20)).to_be_bytes());
        huge.extend_from_slice(&4096u64.to_be_bytes());
        let stream = Craft::default().header().raw(&huge).bytes;
        let (events, parser) = parse_all(&[&stream]).unwrap();
        let reason = &parser.stats().passthrough.as_ref().unwrap().reason;
        assert!(reason.contains("page sizes"), "{reason}");
        assert_eq!(rebuild(&events), stream);

        // A package longer than QEMU ever writes is refused before anything is buffered.
        let mut oversized = vec![section_type::COMMAND, 0, 7, 0, 4];
        oversized.extend_from_slice(&(1u32 << 30).to_be_bytes());
        let stream = Craft::default().header().raw(&oversized).bytes;
        let error = parse_all(&[&stream]).unwrap_err();
        assert!(
            matches!(error.kind, ParseErrorKind::LimitExceeded { .. }),
            "{error}"
        );
    }

    #[test]
    fn trailing_bytes_after_the_vm_description_are_an_error() {
        let stream = Craft::default()
            .header()
            .raw(&[
                section_type::EOF,
                section_type::VMDESCRIPTION,
                0,
                0,
                0,
                1,
                b'x',
                b'!',
            ])
            .bytes;
        let error = parse_all(&[&stream]).unwrap_err();
        assert_eq!(error.kind, ParseErrorKind::TrailingBytes);
        assert_eq!(error.offset, stream.len() as u64 - 1);
    }

    #[test]
    fn buffered_input_stays_within_one_record_of_what_was_fed() {
        // A hostile length field does not make the parser reserve memory for it.
        let stream = Craft::default()
            .header()
            .raw(&[
                section_type::EOF,
                section_type::VMDESCRIPTION,
                0xff,
                0xff,
                0xff,
                0xff,
            ])
            .bytes;
        let mut parser = StreamParser::new();
        parser.feed(&stream);
        while parser.next_event().unwrap().is_some() {}
        for _ in 0..64 {
            parser.feed(&[b'a'; 1024]);
            while parser.next_event().unwrap().is_some() {}
            assert_eq!(parser.buffered(), 0);
        }
        assert!(parser.buffer.capacity() < 64 * 1024);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever is fed, the parser never panics, and what it reported before any error
        /// rebuilds to exactly the bytes it consumed.
        #[test]
        fn mutated_streams_never_panic_and_rebuild_what_was_consumed(
            mutations in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
            cut in 1usize..9000,
            truncate in any::<prop::sample::Index>(),
        ) {
            let mut stream = sample_stream();
            for (index, byte) in mutations {
                let index = index.index(stream.len());
                stream[index] = byte;
            }
            let length = truncate.index(stream.len() + 1);
            let stream = &stream[..length];
            let mut parser = StreamParser::new();
            let mut events = Vec::new();
            let mut failed = false;
            'feed: for chunk in stream.chunks(cut) {
                parser.feed(chunk);
                loop {
                    match parser.next_event() {
                        Ok(Some(event)) => events.push(event),
                        Ok(None) => break,
                        Err(_) => { failed = true; break 'feed; }
                    }
                }
            }
            if !failed {
                parser.finish();
                loop {
                    match parser.next_event() {
                        Ok(Some(event)) => events.push(event),
                        Ok(None) => break,
                        Err(_) => break,
                    }
                }
            }
            let consumed = parser.stats().bytes as usize;
            prop_assert_eq!(rebuild(&events), stream[..consumed].to_vec());
        }

        #[test]
        fn random_bytes_after_a_valid_header_never_panic(
            tail in proptest::collection::vec(any::<u8>(), 0..20000),
        ) {
            let mut stream = Craft::default()
                .header()
                .section_start(section_type::START, 2, "ram")
                .bytes;
            stream.extend_from_slice(&tail);
            let _ = parse_all(&[&stream]);
        }
    }
}
