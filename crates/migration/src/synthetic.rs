//! Synthetic QEMU migration streams for tests, fuzzing seeds and benchmarks (not part of the API).

use crate::stream::{PAGE_SIZE, STREAM_MAGIC, STREAM_VERSION, ram_flag, section_type};

/// A stream of a `pages`-page "guest" sent twice (a second pass with a few pages changed), so every
/// codec tier shows up: zero, literal, known (the same content elsewhere), delta.
pub fn two_pass_stream(pages: u64) -> Vec<u8> {
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
            let continue_flag = if first { 0 } else { ram_flag::CONTINUE };
            let offset = index * PAGE_SIZE as u64;
            if index % 4 == 1 {
                stream.extend_from_slice(&(offset | ram_flag::ZERO | continue_flag).to_be_bytes());
                if first {
                    stream.push(6);
                    stream.extend_from_slice(b"pc.ram");
                }
                stream.push(0);
                continue;
            }
            stream.extend_from_slice(&(offset | ram_flag::PAGE | continue_flag).to_be_bytes());
            if first {
                stream.push(6);
                stream.extend_from_slice(b"pc.ram");
            }
            stream.extend_from_slice(&page_content(index, pass));
        }
        stream.extend_from_slice(&ram_flag::EOS.to_be_bytes());
        stream.extend_from_slice(&[section_type::FOOTER, 0, 0, 0, 2]);
    }
    stream.push(section_type::FULL);
    stream.extend_from_slice(&3u32.to_be_bytes());
    stream.push(5);
    stream.extend_from_slice(b"timer");
    stream.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 2]);
    stream.extend_from_slice(&[9; 40]);
    stream.extend_from_slice(&[section_type::FOOTER, 0, 0, 0, 3, section_type::EOF]);
    stream
}
