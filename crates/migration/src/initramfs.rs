//! The files of an initramfs, laid out as the guest's page cache holds them.
//!
//! At boot the kernel unpacks the initrd (a sequence of cpio archives in the `newc` format,
//! each plain or compressed, zero padding between) into a tmpfs, where each file's contents
//! sit in page-cache pages starting at the file's offset 0, the last page zero-filled past the
//! end. A guest booted from an initramfs (a small appliance, or one that never leaves its
//! initramfs) keeps those pages in RAM. [`file_blocks`] lays every regular file of the archive
//! out the same way, each from a 4 KiB boundary, so both hosts of a migration can index the
//! same blocks (see [`crate::HeldFile`]).
//!
//! Compression: a compressed segment (gzip, zstd or xz: what `update-initramfs`, dracut and
//! `cpio | gzip` produce) is taken to run to the end of the file, as they write it (an
//! uncompressed early-microcode archive may come first). Others (bzip2, lzma, lzo, LZ4) are
//! left alone: `Ok(None)`.

use std::io::{Error, ErrorKind, Read};

/// Largest unpacked archive accepted.
pub const MAX_UNPACKED_BYTES: usize = 1 << 30;

const PAGE: usize = 4096;
const HEADER_LEN: usize = 110;
const TRAILER_NAME: &[u8] = b"TRAILER!!!";
const FILE_TYPE_MASK: u32 = 0o170_000;
const REGULAR_FILE: u32 = 0o100_000;

fn invalid(message: String) -> Error {
    Error::new(ErrorKind::InvalidData, message)
}

fn is_cpio(bytes: &[u8]) -> bool {
    bytes.starts_with(b"070701") || bytes.starts_with(b"070702")
}

/// Every regular file of the initramfs `archive`, each from a 4 KiB boundary and zero-padded
/// to one. `Ok(None)` when `archive` is not an initramfs this module reads (not cpio, or
/// compressed in a format not handled here); an error when it is one but damaged.
pub fn file_blocks(archive: &[u8]) -> Result<Option<Vec<u8>>, Error> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut any = false;
    loop {
        while archive.get(at) == Some(&0) {
            at += 1;
        }
        let rest = &archive[at..];
        if rest.is_empty() {
            break;
        }
        if is_cpio(rest) {
            at += read_archives(rest, &mut out)?;
            any = true;
            continue;
        }
        let Some(unpacked) = decompress(rest)? else {
            // A format not read here: what came before it is still laid out.
            return Ok(any.then_some(out));
        };
        if !is_cpio(&unpacked) {
            return Ok(any.then_some(out));
        }
        let mut inner = 0;
        loop {
            while unpacked.get(inner) == Some(&0) {
                inner += 1;
            }
            if inner >= unpacked.len() {
                break;
            }
            inner += read_archives(&unpacked[inner..], &mut out)?;
        }
        return Ok(Some(out));
    }
    Ok(any.then_some(out))
}

/// Unpacks a compressed segment running to the end of `bytes`; `Ok(None)` for a format not
/// handled here.
fn decompress(bytes: &[u8]) -> Result<Option<Vec<u8>>, Error> {
    let mut out = Vec::new();
    let limit = MAX_UNPACKED_BYTES as u64 + 1;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        flate2::read::MultiGzDecoder::new(bytes)
            .take(limit)
            .read_to_end(&mut out)?;
    } else if bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        zstd::stream::read::Decoder::new(bytes)?
            .take(limit)
            .read_to_end(&mut out)?;
    } else if bytes.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        let mut input = std::io::BufReader::new(bytes);
        let mut limited = crate::kernel_image::LimitedWriter {
            out: &mut out,
            limit: MAX_UNPACKED_BYTES + 1,
            what: "the initramfs",
        };
        lzma_rs::xz_decompress(&mut input, &mut limited)
            .map_err(|error| invalid(format!("the initramfs's xz data: {error}")))?;
    } else {
        return Ok(None);
    }
    if out.len() > MAX_UNPACKED_BYTES {
        return Err(invalid(format!(
            "the initramfs unpacks to more than {MAX_UNPACKED_BYTES} bytes"
        )));
    }
    Ok(Some(out))
}

fn hex_field(header: &[u8], index: usize) -> Result<usize, Error> {
    let field = &header[6 + index * 8..6 + (index + 1) * 8];
    std::str::from_utf8(field)
        .ok()
        .and_then(|text| usize::from_str_radix(text, 16).ok())
        .ok_or_else(|| invalid(format!("a cpio header field is not hexadecimal: {field:?}")))
}

/// Reads one cpio archive (up to and with its trailer) from the start of `bytes`, appending its
/// regular files to `out`; returns the bytes read.
fn read_archives(bytes: &[u8], out: &mut Vec<u8>) -> Result<usize, Error> {
    let mut at = 0;
    loop {
        let header = bytes
            .get(at..at + HEADER_LEN)
            .filter(|header| is_cpio(header))
            .ok_or_else(|| invalid(format!("no cpio header at offset {at} of the initramfs")))?;
        let mode = hex_field(header, 1)? as u32;
        let size = hex_field(header, 6)?;
        let name_size = hex_field(header, 11)?;
        let name_at = at + HEADER_LEN;
        let name = bytes
            .get(name_at..name_at + name_size)
            .ok_or_else(|| invalid(format!("a cpio name at offset {name_at} runs past the end")))?;
        let data_at = (name_at + name_size).next_multiple_of(4);
        let data = bytes
            .get(data_at..data_at + size)
            .ok_or_else(|| invalid(format!("cpio data at offset {data_at} runs past the end")))?;
        at = (data_at + size).next_multiple_of(4);
        if name.strip_suffix(&[0]).unwrap_or(name) == TRAILER_NAME {
            return Ok(at.min(bytes.len()));
        }
        if mode & FILE_TYPE_MASK == REGULAR_FILE && size > 0 {
            if out.len() + size.next_multiple_of(PAGE) > MAX_UNPACKED_BYTES {
                return Err(invalid(format!(
                    "the initramfs's files take more than {MAX_UNPACKED_BYTES} bytes"
                )));
            }
            out.extend_from_slice(data);
            out.resize(out.len().next_multiple_of(PAGE), 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn entry(name: &str, mode: u32, data: &[u8]) -> Vec<u8> {
        let name = format!("{name}\0");
        let mut bytes = format!(
            "070701{:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            1,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len(),
            0
        )
        .into_bytes();
        bytes.extend_from_slice(name.as_bytes());
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        bytes.extend_from_slice(data);
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        bytes
    }

    fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut bytes = entry("bin", 0o040_755, &[]);
        for (name, data) in files {
            bytes.extend(entry(name, 0o100_644, data));
        }
        bytes.extend(entry("bin/sh", 0o120_777, b"busybox"));
        bytes.extend(entry("TRAILER!!!", 0, &[]));
        bytes.resize(bytes.len().next_multiple_of(512), 0);
        bytes
    }

    fn laid_out(files: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for data in files {
            out.extend_from_slice(data);
            out.resize(out.len().next_multiple_of(PAGE), 0);
        }
        out
    }

    #[test]
    fn regular_files_start_at_page_boundaries_in_every_form() {
        let big: Vec<u8> = (0..3 * PAGE + 100).map(|i| (i * 7 % 251) as u8).collect();
        let small = b"#!/bin/sh\necho hello\n".to_vec();
        let plain = archive(&[("bin/busybox", &big), ("init", &small)]);
        let expected = laid_out(&[&big, &small]);
        assert_eq!(file_blocks(&plain).unwrap(), Some(expected.clone()));

        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gzip.write_all(&plain).unwrap();
        let gzip = gzip.finish().unwrap();
        assert_eq!(file_blocks(&gzip).unwrap(), Some(expected.clone()));
        let zstd = zstd::encode_all(plain.as_slice(), 3).unwrap();
        assert_eq!(file_blocks(&zstd).unwrap(), Some(expected.clone()));
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut plain.as_slice(), &mut xz).unwrap();
        assert_eq!(file_blocks(&xz).unwrap(), Some(expected.clone()));

        // An uncompressed early archive (microcode) before the compressed main one.
        let microcode = b"GenuineIntel.bin contents".to_vec();
        let mut early = archive(&[("kernel/x86/microcode/GenuineIntel.bin", &microcode)]);
        early.extend_from_slice(&zstd);
        assert_eq!(
            file_blocks(&early).unwrap(),
            Some(laid_out(&[&microcode, &big, &small]))
        );
    }

    #[test]
    fn other_files_are_not_initramfs_and_damaged_archives_are_errors() {
        assert_eq!(file_blocks(b"").unwrap(), None);
        assert_eq!(file_blocks(b"\x7fELF not an archive").unwrap(), None);
        let not_cpio = zstd::encode_all(&b"just some text"[..], 3).unwrap();
        assert_eq!(file_blocks(&not_cpio).unwrap(), None);
        let plain = archive(&[("init", b"#!/bin/sh\n")]);
        assert!(file_blocks(&plain[..plain.len() / 2]).is_err());
        let mut bad = plain.clone();
        bad[20] = b'x';
        assert!(file_blocks(&bad).is_err());
        // An archive in a format not read here after a plain one: the plain one's files.
        let mut mixed = plain.clone();
        mixed.extend_from_slice(b"BZh91AY&SY");
        assert_eq!(
            file_blocks(&mixed).unwrap(),
            Some(laid_out(&[b"#!/bin/sh\n"]))
        );
    }

    #[test]
    fn the_test_guests_initrd_lays_out_its_files_and_is_held() {
        let Ok(guest) = novacron_qemu::TestGuest::locate() else {
            eprintln!("skipped: no test guest (scripts/build-guest)");
            return;
        };
        let initrd = std::fs::read(&guest.initrd).unwrap();
        let blocks = file_blocks(&initrd).unwrap().expect("an initramfs");
        assert!(blocks.len() > 100 * PAGE, "{} bytes", blocks.len());
        assert_eq!(blocks.len() % PAGE, 0);
        // Held, it is the file's blocks and its files'.
        let held = crate::HeldFile::open(&guest.initrd).unwrap();
        let digest = blake3::hash(&initrd).to_hex();
        assert_eq!(
            held.identities().collect::<Vec<_>>(),
            [
                digest.to_string(),
                format!("{digest}{}", crate::image_pages::UNPACKED_SUFFIX)
            ]
        );
        let (_, files) = held.parts().nth(1).unwrap();
        assert!(files.distinct_blocks() > 100, "{files:?}");
    }
}
