//! The kernel of a direct kernel boot, unpacked as the guest unpacks it.
//!
//! A bzImage carries the kernel compressed (the setup header's payload); the guest's boot code
//! unpacks it into RAM, where its text and read-only data stay page for page as they are in the
//! unpacked ELF file (its loadable segments are 4 KiB-aligned in the file as in memory). Both
//! hosts of a migration can unpack the same file the same way, so RAM pages equal to a 4 KiB
//! block of the unpacked kernel need not cross the link (see [`crate::HeldFile`]).
//!
//! Formats: gzip, xz, zstd and LZ4 (the kernel's legacy LZ4 framing), which cover the kernels
//! distributions ship; others (bzip2, lzma, lzo) are left alone. The payload's last four bytes
//! are the unpacked size (little-endian: appended by the kernel's build, or for gzip the end of
//! gzip's own trailer): the result must have exactly that size, at most [`MAX_UNPACKED_BYTES`].

use std::io::{Error, ErrorKind, Read};

/// Largest unpacked kernel accepted (distribution kernels unpack to 30-80 MB).
pub const MAX_UNPACKED_BYTES: usize = 512 << 20;

/// Offsets in the bzImage setup header (Documentation/arch/x86/boot.rst).
const SETUP_SECTS: usize = 0x1f1;
const HEADER_MAGIC_AT: usize = 0x202;
const HEADER_MAGIC: &[u8; 4] = b"HdrS";
const PROTOCOL_VERSION_AT: usize = 0x206;
/// `payload_offset` and `payload_length` exist from boot protocol 2.08.
const PAYLOAD_PROTOCOL: u16 = 0x0208;
const PAYLOAD_OFFSET_AT: usize = 0x248;
const PAYLOAD_LENGTH_AT: usize = 0x24c;

/// The kernel's legacy LZ4 framing: this magic, then blocks of `u32 LE compressed length` and
/// an LZ4 block of at most 8 MiB unpacked.
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// How a bzImage's payload is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Xz,
    Zstd,
    Lz4,
}

impl Compression {
    fn of(payload: &[u8]) -> Option<Self> {
        if payload.starts_with(&[0x1f, 0x8b]) {
            Some(Self::Gzip)
        } else if payload.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            Some(Self::Xz)
        } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Self::Zstd)
        } else if payload.starts_with(&LZ4_LEGACY_MAGIC) {
            Some(Self::Lz4)
        } else {
            None
        }
    }
}

fn invalid(message: String) -> Error {
    Error::new(ErrorKind::InvalidData, message)
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// The compressed payload of a bzImage.
#[derive(Debug)]
pub struct Payload<'a> {
    pub compression: Compression,
    /// Without the size the kernel's build appends (gzip's own trailer, which ends with the
    /// size, stays: the build appends nothing to a gzip payload).
    pub compressed: &'a [u8],
    pub unpacked_size: usize,
}

/// The compressed payload of a bzImage. `Ok(None)` when `image` is not a bzImage (no setup
/// header, or a boot protocol older than 2.08) or its payload is in a format not handled here.
pub fn bzimage_payload(image: &[u8]) -> Result<Option<Payload<'_>>, Error> {
    if image.len() < PAYLOAD_LENGTH_AT + 4
        || &image[HEADER_MAGIC_AT..HEADER_MAGIC_AT + 4] != HEADER_MAGIC
        || u16::from_le_bytes([image[PROTOCOL_VERSION_AT], image[PROTOCOL_VERSION_AT + 1]])
            < PAYLOAD_PROTOCOL
    {
        return Ok(None);
    }
    let setup_sectors = match image[SETUP_SECTS] {
        0 => 4,
        sectors => usize::from(sectors),
    };
    let start = (setup_sectors + 1) * 512 + read_u32(image, PAYLOAD_OFFSET_AT) as usize;
    let length = read_u32(image, PAYLOAD_LENGTH_AT) as usize;
    let payload = start
        .checked_add(length)
        .and_then(|end| image.get(start..end))
        .filter(|payload| payload.len() > 4)
        .ok_or_else(|| {
            invalid(format!(
                "the bzImage's payload ({length} bytes at {start}) is not inside its {} bytes",
                image.len()
            ))
        })?;
    let Some(compression) = Compression::of(payload) else {
        return Ok(None);
    };
    let (without_size, size) = payload.split_at(payload.len() - 4);
    let compressed = match compression {
        Compression::Gzip => payload,
        _ => without_size,
    };
    let unpacked = read_u32(size, 0) as usize;
    if unpacked > MAX_UNPACKED_BYTES {
        return Err(invalid(format!(
            "the bzImage says its kernel unpacks to {unpacked} bytes, above the \
             {MAX_UNPACKED_BYTES} accepted"
        )));
    }
    Ok(Some(Payload {
        compression,
        compressed,
        unpacked_size: unpacked,
    }))
}

/// The kernel unpacked from the bzImage `image`, or `Ok(None)` (see [`bzimage_payload`]). An
/// error when the payload does not unpack, or not to the size it declares.
pub fn unpack_bzimage(image: &[u8]) -> Result<Option<Vec<u8>>, Error> {
    let Some(Payload {
        compression,
        compressed,
        unpacked_size: size,
    }) = bzimage_payload(image)?
    else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(size);
    match compression {
        Compression::Gzip => {
            read_at_most(flate2::read::GzDecoder::new(compressed), size, &mut out)?
        }
        Compression::Zstd => read_at_most(
            zstd::stream::read::Decoder::new(compressed)?,
            size,
            &mut out,
        )?,
        Compression::Xz => {
            let mut input = std::io::BufReader::new(compressed);
            let mut limited = LimitedWriter {
                out: &mut out,
                limit: size,
                what: "the bzImage's payload",
            };
            lzma_rs::xz_decompress(&mut input, &mut limited)
                .map_err(|error| invalid(format!("the bzImage's xz payload: {error}")))?;
        }
        Compression::Lz4 => unpack_lz4_legacy(compressed, size, &mut out)?,
    }
    if out.len() != size {
        return Err(invalid(format!(
            "the bzImage's {compression:?} payload unpacked to {} bytes, not the {size} it declares",
            out.len()
        )));
    }
    Ok(Some(out))
}

/// Reads `reader` into `out`, failing beyond `limit` bytes.
fn read_at_most(reader: impl Read, limit: usize, out: &mut Vec<u8>) -> Result<(), Error> {
    reader.take(limit as u64 + 1).read_to_end(out)?;
    if out.len() > limit {
        return Err(invalid(format!(
            "the bzImage's payload unpacks to more than the {limit} bytes it declares"
        )));
    }
    Ok(())
}

/// A writer into a vector that fails beyond `limit` bytes (`what` names the data in the
/// error).
pub(crate) struct LimitedWriter<'a> {
    pub(crate) out: &'a mut Vec<u8>,
    pub(crate) limit: usize,
    pub(crate) what: &'static str,
}

impl std::io::Write for LimitedWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + bytes.len() > self.limit {
            return Err(invalid(format!(
                "{} unpacks to more than {} bytes",
                self.what, self.limit
            )));
        }
        self.out.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn unpack_lz4_legacy(compressed: &[u8], size: usize, out: &mut Vec<u8>) -> Result<(), Error> {
    let mut at = LZ4_LEGACY_MAGIC.len();
    out.resize(size, 0);
    let mut written = 0;
    while written < size {
        let length = compressed
            .get(at..at + 4)
            .map(|bytes| read_u32(bytes, 0) as usize)
            .ok_or_else(|| {
                invalid(format!(
                    "the bzImage's LZ4 payload ends after {written} of {size} bytes"
                ))
            })?;
        at += 4;
        if length == u32::from_le_bytes(LZ4_LEGACY_MAGIC) as usize {
            // Concatenated streams repeat the magic.
            continue;
        }
        let block = compressed.get(at..at + length).ok_or_else(|| {
            invalid(format!(
                "an LZ4 block of {length} bytes at {at} runs past the payload's end"
            ))
        })?;
        at += length;
        let room = (size - written).min(LZ4_LEGACY_BLOCK);
        let unpacked = lz4_flex::block::decompress_into(block, &mut out[written..written + room])
            .map_err(|error| invalid(format!("an LZ4 block at {at}: {error}")))?;
        written += unpacked;
        if unpacked == 0 {
            return Err(invalid(format!("an empty LZ4 block at {at}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bzImage whose setup header points at `compressed` followed by the size the kernel's
    /// build appends.
    fn bzimage(compressed: &[u8], unpacked_size: usize) -> Vec<u8> {
        let mut payload = compressed.to_vec();
        payload.extend_from_slice(&(unpacked_size as u32).to_le_bytes());
        bzimage_with_payload(&payload)
    }

    /// A bzImage whose setup header points at `payload` as it is.
    fn bzimage_with_payload(payload: &[u8]) -> Vec<u8> {
        let setup_sectors = 3usize;
        let mut image = vec![0u8; (setup_sectors + 1) * 512];
        image[SETUP_SECTS] = setup_sectors as u8;
        image[HEADER_MAGIC_AT..HEADER_MAGIC_AT + 4].copy_from_slice(HEADER_MAGIC);
        image[PROTOCOL_VERSION_AT..PROTOCOL_VERSION_AT + 2]
            .copy_from_slice(&0x020fu16.to_le_bytes());
        let offset = 100u32;
        image[PAYLOAD_OFFSET_AT..PAYLOAD_OFFSET_AT + 4].copy_from_slice(&offset.to_le_bytes());
        let length = payload.len() as u32;
        image[PAYLOAD_LENGTH_AT..PAYLOAD_LENGTH_AT + 4].copy_from_slice(&length.to_le_bytes());
        image.extend(std::iter::repeat_n(0xAA, offset as usize));
        image.extend_from_slice(payload);
        image.extend_from_slice(&[0x55; 300]);
        image
    }

    fn kernel() -> Vec<u8> {
        // Text-like and some incompressible bytes, more than one 8 MiB LZ4 block's worth.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut kernel = Vec::new();
        while kernel.len() < 9 << 20 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            if state.is_multiple_of(3) {
                kernel.extend_from_slice(&state.to_le_bytes());
            } else {
                kernel.extend_from_slice(b"mov %rax, %rbx; call schedule;\n");
            }
        }
        kernel
    }

    fn lz4_legacy(kernel: &[u8]) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_vec();
        for block in kernel.chunks(LZ4_LEGACY_BLOCK) {
            let compressed = lz4_flex::block::compress(block);
            out.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
            out.extend_from_slice(&compressed);
        }
        out
    }

    #[test]
    fn every_supported_format_unpacks_to_the_declared_kernel() {
        use std::io::Write;
        let kernel = kernel();
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gzip.write_all(&kernel).unwrap();
        let gzip = gzip.finish().unwrap();
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut &kernel[..1 << 20], &mut xz).unwrap();
        let zstd = zstd::bulk::compress(&kernel, 1).unwrap();
        for (compression, payload, expected) in [
            (Compression::Gzip, gzip, &kernel[..]),
            (Compression::Xz, xz, &kernel[..1 << 20]),
            (Compression::Zstd, zstd, &kernel[..]),
            (Compression::Lz4, lz4_legacy(&kernel), &kernel[..]),
        ] {
            // The kernel's build appends the size to every format but gzip, whose trailer ends
            // with it.
            let image = match compression {
                Compression::Gzip => bzimage_with_payload(&payload),
                _ => bzimage(&payload, expected.len()),
            };
            let payload = bzimage_payload(&image).unwrap().unwrap();
            assert_eq!(
                (payload.compression, payload.unpacked_size),
                (compression, expected.len())
            );
            let unpacked = unpack_bzimage(&image).unwrap().unwrap();
            assert!(unpacked == expected, "{compression:?}");
        }
    }

    #[test]
    fn other_files_are_not_kernels_and_damaged_payloads_are_errors() {
        assert_eq!(unpack_bzimage(b"an initrd, not a kernel").unwrap(), None);
        assert_eq!(unpack_bzimage(&[0u8; 4096]).unwrap(), None);
        // A payload in a format not handled (bzip2).
        assert_eq!(unpack_bzimage(&bzimage(b"BZh91AY&SY", 100)).unwrap(), None);
        let kernel = kernel();
        let lz4 = lz4_legacy(&kernel);
        // Declared size larger or smaller than what the payload holds.
        assert!(unpack_bzimage(&bzimage(&lz4, kernel.len() + 1)).is_err());
        let zstd = zstd::bulk::compress(&kernel, 1).unwrap();
        assert!(unpack_bzimage(&bzimage(&zstd, kernel.len() - 1)).is_err());
        assert!(unpack_bzimage(&bzimage(&zstd, MAX_UNPACKED_BYTES + 1)).is_err());
        // Truncated and corrupted payloads.
        assert!(unpack_bzimage(&bzimage(&lz4[..lz4.len() / 2], kernel.len())).is_err());
        let mut corrupt = lz4.clone();
        corrupt[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(unpack_bzimage(&bzimage(&corrupt, kernel.len())).is_err());
        // A header pointing past the file's end.
        let mut image = bzimage(&zstd, kernel.len());
        image[PAYLOAD_LENGTH_AT..PAYLOAD_LENGTH_AT + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(unpack_bzimage(&image).is_err());
    }

    #[test]
    fn the_test_guests_kernel_unpacks_to_an_elf_file() {
        let Ok(guest) = novacron_qemu::TestGuest::locate() else {
            eprintln!("skipped: no test guest (scripts/build-guest)");
            return;
        };
        let image = std::fs::read(&guest.vmlinuz).unwrap();
        let kernel = unpack_bzimage(&image).unwrap().expect("a bzImage");
        assert_eq!(&kernel[..4], b"\x7fELF");
        // Held, it is the file's blocks and the unpacked kernel's.
        let held = crate::HeldFile::open(&guest.vmlinuz).unwrap();
        let identities: Vec<&str> = held.identities().collect();
        let digest = blake3::hash(&image).to_hex();
        assert_eq!(
            identities,
            [
                digest.to_string(),
                format!("{digest}{}", crate::image_pages::UNPACKED_SUFFIX)
            ]
        );
        let (_, unpacked) = held.parts().nth(1).unwrap();
        assert!(unpacked.distinct_blocks() > 1000, "{unpacked:?}");
    }
}
