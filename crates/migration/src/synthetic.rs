//! Synthetic QEMU migration streams, multifd channels and NBD connections for tests, fuzzing
//! seeds and benchmarks (not part of the API).

use crate::nbd;
use crate::stream::{PAGE_SIZE, STREAM_MAGIC, STREAM_VERSION, ram_flag, section_type};

/// A stream of a `pages`-page "guest" sent twice (a second pass with a few pages changed), so every
/// codec tier shows up: zero, literal, known (the same content elsewhere), delta.
pub fn two_pass_stream(pages: u64) -> Vec<u8> {
    let mut stream = stream_header(pages);
    let page_content = |index: u64, pass: u8| -> [u8; PAGE_SIZE] {
        let mut page = [0u8; PAGE_SIZE];
        for (position, byte) in page.iter_mut().enumerate() {
            *byte = (index as usize % 7 + position / 64) as u8;
        }
        if pass == 1 && index.is_multiple_of(3) {
            page[100] ^= 0xff;
        }
        page
    };
    for pass in 0..2u8 {
        stream.push(section_type::PART);
        stream.extend_from_slice(&2u32.to_be_bytes());
        for index in 0..pages {
            let first = pass == 0 && index == 0;
            if index % 4 == 1 {
                push_page_record(&mut stream, index, first, None);
            } else {
                push_page_record(&mut stream, index, first, Some(&page_content(index, pass)));
            }
        }
        stream.extend_from_slice(&ram_flag::EOS.to_be_bytes());
        stream.extend_from_slice(&[section_type::FOOTER, 0, 0, 0, 2]);
    }
    push_stream_end(&mut stream);
    stream
}

/// A stream of one pass over a guest whose pages hold `pages` (each `PAGE_SIZE` bytes).
pub fn one_pass_stream(pages: &[&[u8]]) -> Vec<u8> {
    let mut stream = stream_header(pages.len() as u64);
    stream.push(section_type::PART);
    stream.extend_from_slice(&2u32.to_be_bytes());
    for (index, page) in pages.iter().enumerate() {
        push_page_record(&mut stream, index as u64, index == 0, Some(page));
    }
    stream.extend_from_slice(&ram_flag::EOS.to_be_bytes());
    stream.extend_from_slice(&[section_type::FOOTER, 0, 0, 0, 2]);
    push_stream_end(&mut stream);
    stream
}

/// The stream's magic, version and RAM section start for a `pages`-page block `pc.ram`.
fn stream_header(pages: u64) -> Vec<u8> {
    let mut stream = Vec::new();
    stream.extend_from_slice(&STREAM_MAGIC.to_be_bytes());
    stream.extend_from_slice(&STREAM_VERSION.to_be_bytes());
    stream.push(section_type::START);
    stream.extend_from_slice(&2u32.to_be_bytes());
    stream.push(3);
    stream.extend_from_slice(b"ram");
    stream.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 4]);
    stream.extend_from_slice(&((pages * PAGE_SIZE as u64) | ram_flag::MEM_SIZE).to_be_bytes());
    stream.push(6);
    stream.extend_from_slice(b"pc.ram");
    stream.extend_from_slice(&(pages * PAGE_SIZE as u64).to_be_bytes());
    stream.extend_from_slice(&ram_flag::EOS.to_be_bytes());
    stream.extend_from_slice(&[section_type::FOOTER, 0, 0, 0, 2]);
    stream
}

/// A PAGE record (or a ZERO record, without `content`) for page `index` of `pc.ram`; the
/// `first` record of the stream names its block, the others continue it.
fn push_page_record(stream: &mut Vec<u8>, index: u64, first: bool, content: Option<&[u8]>) {
    let continue_flag = if first { 0 } else { ram_flag::CONTINUE };
    let offset = index * PAGE_SIZE as u64;
    let kind = if content.is_some() {
        ram_flag::PAGE
    } else {
        ram_flag::ZERO
    };
    stream.extend_from_slice(&(offset | kind | continue_flag).to_be_bytes());
    if first {
        stream.push(6);
        stream.extend_from_slice(b"pc.ram");
    }
    match content {
        Some(content) => stream.extend_from_slice(content),
        None => stream.push(0),
    }
}

/// A device section and the stream's end.
fn push_stream_end(stream: &mut Vec<u8>) {
    stream.push(section_type::FULL);
    stream.extend_from_slice(&3u32.to_be_bytes());
    stream.push(5);
    stream.extend_from_slice(b"timer");
    stream.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 2]);
    stream.extend_from_slice(&[9; 40]);
    stream.extend_from_slice(&[section_type::FOOTER, 0, 0, 0, 3, section_type::EOF]);
}

fn nbd_option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut out = nbd::OPTION_MAGIC.to_vec();
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// One NBD request (compact or extended header) with its payload.
pub fn nbd_request(
    extended: bool,
    flags: u16,
    command: u16,
    offset: u64,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    let magic = if extended {
        nbd::EXTENDED_REQUEST_MAGIC
    } else {
        nbd::REQUEST_MAGIC
    };
    out.extend_from_slice(&magic.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&command.to_be_bytes());
    out.extend_from_slice(&7u64.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    if extended {
        out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    } else {
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    }
    out.extend_from_slice(payload);
    out
}

/// `pages` pages of a byte pattern.
pub fn pattern(pages: usize, seed: u8) -> Vec<u8> {
    (0..pages * PAGE_SIZE)
        .map(|index| (index / 7) as u8 ^ seed)
        .collect()
}

/// A client's connection: flags, two options, compact and extended writes (aligned, with a
/// tail, unaligned), a flush, a block-status request with a payload, a disconnect.
pub fn nbd_connection() -> Vec<u8> {
    let mut out = 3u32.to_be_bytes().to_vec();
    out.extend(nbd_option(7, b"\x00\x00\x00\x05disk0\x00\x00"));
    out.extend(nbd_option(11, b""));
    out.extend(nbd_request(
        false,
        0,
        nbd::COMMAND_WRITE,
        0x10000,
        &pattern(3, 1),
    ));
    let mut tailed = pattern(2, 2);
    tailed.extend_from_slice(&[9u8; 100]);
    out.extend(nbd_request(true, 0, nbd::COMMAND_WRITE, 0x40000, &tailed));
    out.extend(nbd_request(
        false,
        0,
        nbd::COMMAND_WRITE,
        0x200,
        &pattern(1, 3),
    ));
    out.extend(nbd_request(false, 0, 3, 0, b""));
    out.extend(nbd_request(
        true,
        nbd::COMMAND_FLAG_PAYLOAD_LEN,
        7,
        0,
        &[1u8; 24],
    ));
    out.extend(nbd_request(false, 0, 2, 0, b""));
    out
}

/// A packet of a multifd channel: its block, its normal pages (offset, fill byte), its zero
/// pages' offsets and its flags.
pub type MultifdPacket<'a> = (&'a str, Vec<(u64, u8)>, Vec<u64>, u32);

/// A multifd channel as QEMU 10 writes one ([`crate::multifd`]): the hello, then the packets
/// (each 128 offset slots long; a SYNC packet without pages announces 0 slots).
pub fn multifd_channel(packets: &[MultifdPacket<'_>]) -> Vec<u8> {
    use crate::multifd::{
        BLOCK_NAME_LENGTH, FLAG_SYNC, MULTIFD_MAGIC, MULTIFD_VERSION, PAGES_PER_PACKET,
    };
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&MULTIFD_MAGIC.to_be_bytes());
    bytes.extend_from_slice(&MULTIFD_VERSION.to_be_bytes());
    bytes.extend_from_slice(&[7u8; 16]);
    bytes.push(3);
    bytes.extend_from_slice(&[0u8; 39]);
    for (number, (block, normal, zero, flags)) in packets.iter().enumerate() {
        let slots = if normal.is_empty() && zero.is_empty() && flags & FLAG_SYNC != 0 {
            0
        } else {
            PAGES_PER_PACKET
        };
        bytes.extend_from_slice(&MULTIFD_MAGIC.to_be_bytes());
        bytes.extend_from_slice(&MULTIFD_VERSION.to_be_bytes());
        bytes.extend_from_slice(&flags.to_be_bytes());
        bytes.extend_from_slice(&slots.to_be_bytes());
        bytes.extend_from_slice(&(normal.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&((normal.len() * PAGE_SIZE) as u32).to_be_bytes());
        bytes.extend_from_slice(&(number as u64).to_be_bytes());
        bytes.extend_from_slice(&(zero.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&[0u8; 28]);
        let mut name = [0u8; BLOCK_NAME_LENGTH];
        name[..block.len()].copy_from_slice(block.as_bytes());
        bytes.extend_from_slice(&name);
        let mut slots_used = 0;
        for offset in normal.iter().map(|(offset, _)| offset).chain(zero) {
            bytes.extend_from_slice(&offset.to_be_bytes());
            slots_used += 1;
        }
        bytes.extend(std::iter::repeat_n(
            0u8,
            8 * (PAGES_PER_PACKET as usize - slots_used),
        ));
        for (_, fill) in normal {
            bytes.extend(std::iter::repeat_n(*fill, PAGE_SIZE));
        }
    }
    bytes
}

/// A multifd channel with every kind of packet: a SYNC without pages, normal and zero pages of
/// two blocks, a page sent again.
pub fn multifd_seed_channel() -> Vec<u8> {
    multifd_channel(&[
        ("", vec![], vec![], crate::multifd::FLAG_SYNC),
        ("pc.ram", vec![(0x1000, 1), (0x5000, 2)], vec![0x2000], 0),
        ("vga.vram", vec![(0, 9)], vec![], 0),
        ("pc.ram", vec![(0x1000, 4)], vec![0x3000, 0x4000], 0),
        ("", vec![], vec![], crate::multifd::FLAG_SYNC),
    ])
}
