//! Writes a migration stream back from [`StreamEvent`]s: the inverse of [`crate::stream`].
//!
//! Every non-payload byte travels in the events (opaque bytes, the record naming, the ZERO fill
//! byte), so the rebuilt stream is byte-identical to the parsed one, which the BLAKE3 checksum it
//! keeps lets a test or the destination of a proxy prove. It owns no IO.

use crate::stream::{PAGE_SIZE, RecordNaming, StreamEvent, ram_flag};

/// Appends the bytes of events to a buffer and keeps a running BLAKE3 and length of everything
/// written.
#[derive(Debug, Default)]
pub struct StreamRebuilder {
    hasher: blake3::Hasher,
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

impl StreamRebuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the bytes of `event` to `out`; returns how many.
    pub fn write_event(&mut self, event: &StreamEvent, out: &mut Vec<u8>) -> usize {
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
        self.hasher.update(&out[start..]);
        let written = out.len() - start;
        self.length += written as u64;
        written
    }

    /// Appends bytes that pass through unchanged.
    pub fn write_opaque(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(bytes);
        self.hasher.update(bytes);
        self.length += bytes.len() as u64;
    }

    /// Appends a PAGE record whose payload is given apart from its header (a decoded page).
    pub fn write_page(
        &mut self,
        block: &str,
        offset: u64,
        naming: RecordNaming,
        data: &[u8; PAGE_SIZE],
        out: &mut Vec<u8>,
    ) -> usize {
        let start = out.len();
        write_record_header(out, offset, ram_flag::PAGE, naming, block);
        out.extend_from_slice(data);
        self.hasher.update(&out[start..]);
        let written = out.len() - start;
        self.length += written as u64;
        written
    }

    /// Bytes written so far.
    pub fn length(&self) -> u64 {
        self.length
    }

    /// BLAKE3 of everything written so far.
    pub fn checksum(&self) -> blake3::Hash {
        self.hasher.finalize()
    }
}
