//! Writes a migration stream back from [`StreamEvent`]s: the inverse of [`crate::stream`].
//!
//! Every non-payload byte travels in the events (opaque bytes, the record naming, the ZERO fill
//! byte), so the rebuilt stream is byte-identical to the parsed one. It owns no IO.
//!
//! The **stream digest** proves that cheaply: BLAKE3 over the stream with each PAGE payload
//! (4 KiB) replaced by that page's own BLAKE3 (32 bytes). Both ends of a proxy hold every page's
//! hash already (the source's codec hashes each page it reads; the destination's decoder hashes
//! or verifies each page it rebuilds), so the digest hashes about a hundredth of the stream
//! instead of all of it again: a second BLAKE3 pass over a 1 GB stream cost each side about as
//! much as the codec's zstd. Equal digests mean equal streams as long as BLAKE3 resists
//! collisions, the bytes between pages compared whole. [`stream_digest`] computes it for a
//! whole stream (tests).

use crate::stream::{
    EventParser, PAGE_SIZE, ParseError, ParseErrorKind, RecordNaming, StreamEvent, ram_flag,
};

/// Bytes of digest input gathered before they are hashed: BLAKE3 runs at a fraction of its
/// speed over small pieces (a page record's header and hash are 40-odd bytes).
const DIGEST_BATCH: usize = 64 << 10;

/// Builds a [`stream digest`](self): feed it the stream's bytes between pages and each page's
/// header and hash, in stream order.
#[derive(Debug, Default)]
pub struct StreamDigest {
    hasher: blake3::Hasher,
    pending: Vec<u8>,
}

impl StreamDigest {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes of the stream that are not a PAGE payload.
    pub fn bytes(&mut self, bytes: &[u8]) {
        if bytes.len() >= DIGEST_BATCH {
            self.catch_up();
            self.hasher.update(bytes);
        } else {
            self.pending.extend_from_slice(bytes);
            if self.pending.len() >= DIGEST_BATCH {
                self.catch_up();
            }
        }
    }

    /// A PAGE record: its header as in the stream, then the BLAKE3 of its 4 KiB payload.
    pub fn page(&mut self, block: &str, offset: u64, naming: RecordNaming, hash: &[u8; 32]) {
        write_record_header(&mut self.pending, offset, ram_flag::PAGE, naming, block);
        self.pending.extend_from_slice(hash);
        if self.pending.len() >= DIGEST_BATCH {
            self.catch_up();
        }
    }

    /// An event as the stream holds it; a page's payload is hashed here.
    pub fn event(&mut self, event: &StreamEvent) {
        match event {
            StreamEvent::Page(page) => self.page(
                &page.block,
                page.offset,
                page.naming,
                blake3::hash(&page.data[..]).as_bytes(),
            ),
            other => {
                write_event(other, &mut self.pending);
                if self.pending.len() >= DIGEST_BATCH {
                    self.catch_up();
                }
            }
        }
    }

    fn catch_up(&mut self) {
        self.hasher.update(&self.pending);
        self.pending.clear();
    }

    /// The digest of everything fed so far.
    pub fn finalize(&mut self) -> blake3::Hash {
        self.catch_up();
        self.hasher.finalize()
    }
}

/// The [`stream digest`](self) of a whole stream, parsed with `parser` (which must accept all of
/// it).
pub fn stream_digest(
    mut parser: impl EventParser,
    stream: &[u8],
) -> Result<blake3::Hash, ParseError> {
    let mut digest = StreamDigest::new();
    parser.feed(stream);
    parser.finish();
    while let Some(event) = parser.next_event()? {
        digest.event(&event);
    }
    if !parser.is_done() {
        return Err(ParseError {
            offset: parser.offset(),
            kind: ParseErrorKind::Truncated { what: "the stream" },
        });
    }
    Ok(digest.finalize())
}

/// Appends the bytes of events to a buffer and keeps the length of everything written and its
/// [`stream digest`](self) (a page's hash comes with it, or is taken from its payload).
#[derive(Debug, Default)]
pub struct StreamRebuilder {
    digest: StreamDigest,
    length: u64,
}

/// The be64 word (+ block name) that starts a ZERO or PAGE record.
fn write_record_header(
    out: &mut Vec<u8>,
    offset: u64,
    flag: u64,
    naming: RecordNaming,
    block: &str,
) {
    match naming {
        RecordNaming::Named => {
            out.extend_from_slice(&(offset | flag).to_be_bytes());
            // The parser only produces names of 1 to 255 bytes (a length byte holds them).
            out.push(block.len() as u8);
            out.extend_from_slice(block.as_bytes());
        }
        RecordNaming::Continue => {
            out.extend_from_slice(&(offset | flag | ram_flag::CONTINUE).to_be_bytes());
        }
        RecordNaming::Bare => {}
    }
}

/// Appends the bytes of `event` to `out` as they were in the stream; returns how many. (What a
/// [`StreamRebuilder`] writes, without its length and checksum.)
pub fn write_event(event: &StreamEvent, out: &mut Vec<u8>) -> usize {
    let start = out.len();
    match event {
        StreamEvent::Opaque(bytes) => out.extend_from_slice(bytes),
        StreamEvent::Page(page) => {
            write_record_header(out, page.offset, ram_flag::PAGE, page.naming, &page.block);
            out.extend_from_slice(&page.data[..]);
        }
        StreamEvent::Zero(zero) => {
            write_record_header(out, zero.offset, ram_flag::ZERO, zero.naming, &zero.block);
            out.push(zero.fill);
        }
    }
    out.len() - start
}

impl StreamRebuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the bytes of `event` to `out`; returns how many.
    pub fn write_event(&mut self, event: &StreamEvent, out: &mut Vec<u8>) -> usize {
        self.digest.event(event);
        let written = write_event(event, out);
        self.length += written as u64;
        written
    }

    /// Appends bytes that pass through unchanged.
    pub fn write_opaque(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        self.digest.bytes(bytes);
        out.extend_from_slice(bytes);
        self.length += bytes.len() as u64;
    }

    /// Appends a PAGE record whose payload is given apart from its header (a decoded page),
    /// with the payload's BLAKE3 (`hash`), which the caller has checked against it.
    pub fn write_page(
        &mut self,
        block: &str,
        offset: u64,
        naming: RecordNaming,
        data: &[u8; PAGE_SIZE],
        hash: &[u8; 32],
        out: &mut Vec<u8>,
    ) -> usize {
        self.digest.page(block, offset, naming, hash);
        let start = out.len();
        write_record_header(out, offset, ram_flag::PAGE, naming, block);
        out.extend_from_slice(data);
        let written = out.len() - start;
        self.length += written as u64;
        written
    }

    /// Bytes written so far.
    pub fn length(&self) -> u64 {
        self.length
    }

    /// The [`stream digest`](self) of everything written so far.
    pub fn checksum(&mut self) -> blake3::Hash {
        self.digest.finalize()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::StreamParser;

    #[test]
    fn the_digest_is_blake3_of_the_stream_with_each_page_replaced_by_its_hash() {
        let first = [7u8; PAGE_SIZE];
        let second: Vec<u8> = (0..PAGE_SIZE).map(|index| (index % 251) as u8).collect();
        let stream = crate::synthetic::one_pass_stream(&[&first, &second]);
        // Replace each payload by its hash, by position: the payloads occur once each.
        let mut expected = Vec::new();
        let mut rest = &stream[..];
        for page in [&first[..], &second[..]] {
            let at = rest
                .windows(PAGE_SIZE)
                .position(|window| window == page)
                .expect("the page is in the stream");
            expected.extend_from_slice(&rest[..at]);
            expected.extend_from_slice(blake3::hash(page).as_bytes());
            rest = &rest[at + PAGE_SIZE..];
        }
        expected.extend_from_slice(rest);
        let digest = stream_digest(StreamParser::new(), &stream).expect("parses");
        assert_eq!(digest, blake3::hash(&expected));

        // One changed byte of a page changes it; a cut stream has none.
        let mut changed = stream.clone();
        let at = stream
            .windows(PAGE_SIZE)
            .position(|window| window == second.as_slice())
            .expect("second page");
        changed[at + 100] ^= 1;
        assert_ne!(
            stream_digest(StreamParser::new(), &changed).expect("parses"),
            digest
        );
        assert!(stream_digest(StreamParser::new(), &stream[..at + 100]).is_err());
    }
}
