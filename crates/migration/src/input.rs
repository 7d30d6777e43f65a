//! The unparsed input of the sans-IO parsers of a connection's bytes ([`crate::nbd`],
//! [`crate::multifd`]): bytes fed in as they arrive, taken from the front as records are
//! recognized, and where in the connection the parser stands.

use crate::stream::{ParseError, ParseErrorKind, StreamEvent};

#[derive(Debug, Default)]
pub(crate) struct Input {
    buffer: Vec<u8>,
    position: usize,
    /// Connection offset of `buffer[position]`.
    offset: u64,
    finished: bool,
}

impl Input {
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        if self.position > 0 && self.position * 2 >= self.buffer.len() {
            self.buffer.drain(..self.position);
            self.position = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// The connection ended: no more input.
    pub(crate) fn finish(&mut self) {
        self.finished = true;
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.finished
    }

    /// Connection offset of the next byte to parse.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes fed and not taken yet.
    pub(crate) fn available(&self) -> usize {
        self.buffer.len() - self.position
    }

    /// Takes the next `length` bytes (at most [`Self::available`]).
    pub(crate) fn take(&mut self, length: usize) -> &[u8] {
        let start = self.position;
        self.position += length;
        self.offset += length as u64;
        &self.buffer[start..start + length]
    }

    /// The `length` bytes `at` bytes past the next one, left in place.
    pub(crate) fn peek(&self, at: usize, length: usize) -> &[u8] {
        let start = self.position + at;
        &self.buffer[start..start + length]
    }

    /// The `N` bytes `at` bytes past the next one, left in place.
    pub(crate) fn field<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut field = [0u8; N];
        field.copy_from_slice(self.peek(at, N));
        field
    }

    /// `None` (more input needed), or a truncation error naming `what` once the connection
    /// ended in the middle of it.
    pub(crate) fn need(&self, what: &'static str) -> Result<Option<StreamEvent>, ParseError> {
        if self.finished && self.available() > 0 {
            return Err(self.error(ParseErrorKind::Truncated { what }));
        }
        Ok(None)
    }

    pub(crate) fn error(&self, kind: ParseErrorKind) -> ParseError {
        ParseError {
            offset: self.offset,
            kind,
        }
    }
}
