//! Byte-level helpers for the codec's wire format: a bounds-checked reader over a decoded body
//! and the matching writers (LEB128 varints, fixed-width little-endian integers, hashes).
//!
//! The reader never indexes out of range and never allocates: every read returns a slice of the
//! input or a [`DecodeError`]. Callers check lengths against their own limits before using them.

use crate::error::DecodeError;
use crate::hash::ContentHash;

/// Longest LEB128 encoding of a `u64`.
const MAX_VARINT_BYTES: usize = 10;

/// Appends `value` as an unsigned LEB128 varint.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A cursor over untrusted bytes.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, position: 0 }
    }

    pub(crate) fn position(&self) -> usize {
        self.position
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.position
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    pub(crate) fn take(
        &mut self,
        length: usize,
        what: &'static str,
    ) -> Result<&'a [u8], DecodeError> {
        if length > self.remaining() {
            return Err(DecodeError::Truncated {
                what,
                offset: self.position,
                needed: length,
                available: self.remaining(),
            });
        }
        let slice = &self.bytes[self.position..self.position + length];
        self.position += length;
        Ok(slice)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    pub(crate) fn hash(&mut self, what: &'static str) -> Result<ContentHash, DecodeError> {
        let bytes = self.take(32, what)?;
        let mut hash = [0u8; 32];
        hash.copy_from_slice(bytes);
        Ok(ContentHash(hash))
    }

    pub(crate) fn varint(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let start = self.position;
        let mut value: u64 = 0;
        for index in 0..MAX_VARINT_BYTES {
            let byte = self.u8(what)?;
            let bits = u64::from(byte & 0x7f);
            // The tenth byte may only carry the top bit of a u64.
            if index == MAX_VARINT_BYTES - 1 && bits > 1 {
                return Err(DecodeError::Malformed {
                    what,
                    offset: start,
                    reason: "varint overflows 64 bits",
                });
            }
            value |= bits << (7 * index);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::Malformed {
            what,
            offset: start,
            reason: "varint longer than 10 bytes",
        })
    }

    /// Reads a varint that must fit in `usize` and be at most `limit`.
    pub(crate) fn length(
        &mut self,
        what: &'static str,
        limit: usize,
    ) -> Result<usize, DecodeError> {
        let offset = self.position;
        let value = self.varint(what)?;
        match usize::try_from(value) {
            Ok(length) if length <= limit => Ok(length),
            _ => Err(DecodeError::LimitExceeded {
                what,
                offset,
                value,
                limit: limit as u64,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_round_trips_edge_values() {
        for value in [
            0u64,
            1,
            127,
            128,
            255,
            16_383,
            16_384,
            u32::MAX as u64,
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            let mut reader = Reader::new(&out);
            assert_eq!(reader.varint("test").unwrap(), value);
            assert!(reader.is_empty());
        }
    }

    #[test]
    fn varint_rejects_overlong_and_truncated_input() {
        let overlong = [0xffu8; 11];
        assert!(Reader::new(&overlong).varint("test").is_err());
        let too_big = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert!(Reader::new(&too_big).varint("test").is_err());
        assert!(Reader::new(&[0x80]).varint("test").is_err());
    }
}
