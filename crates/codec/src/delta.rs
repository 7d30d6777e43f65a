//! Delta of a page against its previous version: XOR of the two, run-length encoded, in the
//! spirit of QEMU's XBZRLE. The encoding is a sequence of runs, each
//! `varint unchanged_length, varint changed_length, changed_length XOR bytes`; bytes after the last
//! run are unchanged. Unchanged gaps shorter than 4 bytes are folded into the
//! changed run, because a run header costs about as much as the bytes it would skip.
//!
//! The decoder applies a delta in place and checks every run against the page bounds.

use crate::PAGE_SIZE;
use crate::error::DecodeError;
use crate::wire::{Reader, put_varint};

/// Equal stretches shorter than this stay inside a changed run.
const MIN_UNCHANGED_GAP: usize = 4;

/// Position of the first byte at or after `from` where `old` and `new` differ.
fn first_difference(old: &[u8; PAGE_SIZE], new: &[u8; PAGE_SIZE], from: usize) -> Option<usize> {
    let mut position = from;
    // Word at a time until aligned to 8, then 8 bytes per step.
    while position < PAGE_SIZE && !position.is_multiple_of(8) {
        if old[position] != new[position] {
            return Some(position);
        }
        position += 1;
    }
    while position + 8 <= PAGE_SIZE {
        let left = u64::from_ne_bytes(old[position..position + 8].try_into().unwrap_or([0; 8]));
        let right = u64::from_ne_bytes(new[position..position + 8].try_into().unwrap_or([0; 8]));
        let difference = left ^ right;
        if difference != 0 {
            let byte = if cfg!(target_endian = "little") {
                difference.trailing_zeros() / 8
            } else {
                difference.leading_zeros() / 8
            };
            return Some(position + byte as usize);
        }
        position += 8;
    }
    (position..PAGE_SIZE).find(|&index| old[index] != new[index])
}

/// Appends the delta from `old` to `new` to `out`, or returns `false` (leaving `out` as it was)
/// as soon as the delta would exceed `limit` bytes.
pub fn encode_delta(
    old: &[u8; PAGE_SIZE],
    new: &[u8; PAGE_SIZE],
    limit: usize,
    out: &mut Vec<u8>,
) -> bool {
    let start_length = out.len();
    let mut position = 0;
    while let Some(changed_start) = first_difference(old, new, position) {
        let mut changed_end = changed_start + 1;
        loop {
            while changed_end < PAGE_SIZE && old[changed_end] != new[changed_end] {
                changed_end += 1;
            }
            let next_change = first_difference(old, new, changed_end).unwrap_or(PAGE_SIZE);
            if next_change == PAGE_SIZE || next_change - changed_end >= MIN_UNCHANGED_GAP {
                break;
            }
            changed_end = next_change;
        }
        put_varint(out, (changed_start - position) as u64);
        put_varint(out, (changed_end - changed_start) as u64);
        out.extend(
            old[changed_start..changed_end]
                .iter()
                .zip(&new[changed_start..changed_end])
                .map(|(a, b)| a ^ b),
        );
        if out.len() - start_length > limit {
            out.truncate(start_length);
            return false;
        }
        position = changed_end;
    }
    true
}

/// Applies `delta` to `page` in place. On error `page` may be partly changed.
pub fn apply_delta(page: &mut [u8; PAGE_SIZE], delta: &[u8]) -> Result<(), DecodeError> {
    let mut reader = Reader::new(delta);
    let mut position = 0usize;
    while !reader.is_empty() {
        let unchanged = reader.length("delta unchanged run", PAGE_SIZE - position)?;
        position += unchanged;
        let run_offset = reader.position();
        let changed = reader.length("delta changed run", PAGE_SIZE - position)?;
        if changed == 0 {
            return Err(DecodeError::Malformed {
                what: "delta changed run",
                offset: run_offset,
                reason: "empty changed run",
            });
        }
        let bytes = reader.take(changed, "delta changed bytes")?;
        for (target, byte) in page[position..position + changed].iter_mut().zip(bytes) {
            *target ^= byte;
        }
        position += changed;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_change_gives_small_delta_that_applies() {
        let old = [7u8; PAGE_SIZE];
        let mut new = old;
        new[100] = 1;
        new[101] = 2;
        new[4095] = 9;
        let mut delta = Vec::new();
        assert!(encode_delta(&old, &new, PAGE_SIZE, &mut delta));
        assert!(delta.len() < 16, "delta is {} bytes", delta.len());
        let mut page = old;
        apply_delta(&mut page, &delta).unwrap();
        assert_eq!(page, new);
    }

    #[test]
    fn identical_pages_give_empty_delta() {
        let page = [3u8; PAGE_SIZE];
        let mut delta = Vec::new();
        assert!(encode_delta(&page, &page, 0, &mut delta));
        assert!(delta.is_empty());
    }

    #[test]
    fn limit_is_respected() {
        let old = [0u8; PAGE_SIZE];
        let new = [1u8; PAGE_SIZE];
        let mut delta = vec![42];
        assert!(!encode_delta(&old, &new, 100, &mut delta));
        assert_eq!(delta, vec![42]);
    }

    #[test]
    fn out_of_bounds_runs_are_errors() {
        let mut page = [0u8; PAGE_SIZE];
        let mut delta = Vec::new();
        put_varint(&mut delta, 4095);
        put_varint(&mut delta, 2);
        delta.extend([1, 1]);
        assert!(apply_delta(&mut page, &delta).is_err());
        let mut delta = Vec::new();
        put_varint(&mut delta, 0);
        put_varint(&mut delta, 10);
        delta.extend([1, 1]);
        assert!(apply_delta(&mut page, &delta).is_err());
    }
}
