//! TCP segmentation offload across the emulator: with `IFF_VNET_HDR`, a TUN device hands over
//! TCP super-packets of up to 64 KiB (one `virtio_net_hdr` in front), which makes forwarding
//! several times cheaper. The link model must still act per wire packet, so this module says
//! which 1500-byte-class segments a super-packet stands for and, when the model drops some of
//! them, rebuilds the surviving runs as smaller super-packets (sequence numbers, lengths, IP ID,
//! flags and the partial checksum fixed up), exactly what the kernel's own segmentation would
//! have produced for those segments. Pure functions over byte slices; no IO.
//!
//! Only TCP over IPv4 and over IPv6 without extension headers is split; any other offloaded
//! packet (rare: the devices only offer TSO) counts as one packet of its full length.

/// Size of the legacy `struct virtio_net_hdr` the TUN device puts in front of each packet.
pub const VIRTIO_HEADER_BYTES: usize = 10;
const NEEDS_CHECKSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCP_V4: u8 = 1;
const GSO_TCP_V6: u8 = 4;
const GSO_ECN: u8 = 0x80;
const TCP: u8 = 6;

/// A parsed TCP super-packet: where its headers end and how it divides into segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SuperPacket {
    ip_version: u8,
    /// Offset of the TCP header from the start of the IP packet.
    tcp_offset: usize,
    /// IP + TCP header bytes, repeated in every segment.
    header_bytes: usize,
    payload_bytes: usize,
    segment_payload: usize,
}

impl SuperPacket {
    /// Number of wire segments.
    pub fn segments(&self) -> usize {
        self.payload_bytes.div_ceil(self.segment_payload).max(1)
    }

    /// Wire length (IP packet bytes) of segment `index`.
    pub fn segment_wire_bytes(&self, index: usize) -> usize {
        let start = index * self.segment_payload;
        self.header_bytes + self.segment_payload.min(self.payload_bytes - start)
    }
}

/// Parses a packet as read from a TUN device with a virtio header. Returns `None` for anything
/// that is not a splittable TCP super-packet (then it is one packet for the model).
pub fn parse(frame: &[u8]) -> Option<SuperPacket> {
    let header = frame.get(..VIRTIO_HEADER_BYTES)?;
    let gso_type = header[1] & !GSO_ECN;
    let segment_payload = usize::from(u16::from_le_bytes([header[4], header[5]]));
    if !(gso_type == GSO_TCP_V4 || gso_type == GSO_TCP_V6)
        || segment_payload == 0
        || header[0] & NEEDS_CHECKSUM == 0
    {
        return None;
    }
    let ip = &frame[VIRTIO_HEADER_BYTES..];
    let version = ip.first()? >> 4;
    let (tcp_offset, ip_total) = match version {
        4 => {
            let header_length = usize::from(ip[0] & 0x0f) * 4;
            if ip.get(9) != Some(&TCP) || header_length < 20 {
                return None;
            }
            (
                header_length,
                usize::from(u16::from_be_bytes([ip[2], ip[3]])),
            )
        }
        6 => {
            if ip.get(6) != Some(&TCP) {
                return None;
            }
            (
                40,
                40 + usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?])),
            )
        }
        _ => return None,
    };
    let data_offset = usize::from(ip.get(tcp_offset + 12)? >> 4) * 4;
    let header_bytes = tcp_offset + data_offset;
    if data_offset < 20 || ip_total != ip.len() || header_bytes > ip_total {
        return None;
    }
    Some(SuperPacket {
        ip_version: version,
        tcp_offset,
        header_bytes,
        payload_bytes: ip_total - header_bytes,
        segment_payload,
    })
}

fn add_words(bytes: &[u8], mut sum: u64) -> u64 {
    let mut chunks = bytes.chunks_exact(2);
    for pair in &mut chunks {
        sum += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Builds the packet (virtio header + IP packet) carrying segments `first..end` of `frame`.
pub fn build_run(frame: &[u8], packet: &SuperPacket, first: usize, end: usize) -> Vec<u8> {
    let ip = &frame[VIRTIO_HEADER_BYTES..];
    let segments = packet.segments();
    let payload_start = first * packet.segment_payload;
    let payload_end = (end * packet.segment_payload).min(packet.payload_bytes);
    let ip_length = packet.header_bytes + payload_end - payload_start;
    let mut out = Vec::with_capacity(VIRTIO_HEADER_BYTES + ip_length);
    out.extend_from_slice(&frame[..VIRTIO_HEADER_BYTES]);
    out.extend_from_slice(&ip[..packet.header_bytes]);
    out.extend_from_slice(
        &ip[packet.header_bytes + payload_start..packet.header_bytes + payload_end],
    );
    if end - first == 1 {
        // A single segment is an ordinary packet (checksum still completed by the kernel).
        out[1] = GSO_NONE;
        out[4..6].copy_from_slice(&0u16.to_le_bytes());
    }
    let ip_out = &mut out[VIRTIO_HEADER_BYTES..];
    let tcp = packet.tcp_offset;
    let tcp_length = ip_length - tcp;
    if packet.ip_version == 4 {
        ip_out[2..4].copy_from_slice(&(ip_length as u16).to_be_bytes());
        let id = u16::from_be_bytes([ip_out[4], ip_out[5]]).wrapping_add(first as u16);
        ip_out[4..6].copy_from_slice(&id.to_be_bytes());
        ip_out[10..12].copy_from_slice(&[0, 0]);
        let checksum = !fold(add_words(&ip_out[..tcp], 0));
        ip_out[10..12].copy_from_slice(&checksum.to_be_bytes());
    } else {
        ip_out[4..6].copy_from_slice(&((ip_length - 40) as u16).to_be_bytes());
    }
    let sequence = u32::from_be_bytes([
        ip_out[tcp + 4],
        ip_out[tcp + 5],
        ip_out[tcp + 6],
        ip_out[tcp + 7],
    ])
    .wrapping_add((payload_start) as u32);
    ip_out[tcp + 4..tcp + 8].copy_from_slice(&sequence.to_be_bytes());
    const FIN: u8 = 0x01;
    const PSH: u8 = 0x08;
    const CWR: u8 = 0x80;
    if first > 0 {
        ip_out[tcp + 13] &= !CWR;
    }
    if end < segments {
        ip_out[tcp + 13] &= !(FIN | PSH);
    }
    // Partial checksum: the kernel completes it from the pseudo-header sum left in the field.
    let pseudo = if packet.ip_version == 4 {
        add_words(&ip_out[12..20], u64::from(TCP) + tcp_length as u64)
    } else {
        add_words(&ip_out[8..40], u64::from(TCP) + tcp_length as u64)
    };
    ip_out[tcp + 16..tcp + 18].copy_from_slice(&fold(pseudo).to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCPv4 super-packet of `payload` bytes cut at `mss`, as the kernel hands it over.
    fn ipv4_super_packet(payload: usize, mss: u16) -> Vec<u8> {
        let mut frame = vec![NEEDS_CHECKSUM, GSO_TCP_V4];
        frame.extend_from_slice(&52u16.to_le_bytes()); // hdr_len
        frame.extend_from_slice(&mss.to_le_bytes());
        frame.extend_from_slice(&20u16.to_le_bytes()); // csum_start
        frame.extend_from_slice(&16u16.to_le_bytes()); // csum_offset
        let total = (20 + 32 + payload) as u16;
        let mut ip = vec![
            0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, TCP, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        let mut tcp = vec![0u8; 32];
        tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
        tcp[12] = 8 << 4;
        tcp[13] = 0x80 | 0x10 | 0x08 | 0x01; // CWR ACK PSH FIN
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&tcp);
        frame.extend((0..payload).map(|i| i as u8));
        frame
    }

    #[test]
    fn super_packets_divide_into_wire_segments() {
        let frame = ipv4_super_packet(4000, 1448);
        let packet = parse(&frame).expect("tcp super-packet");
        assert_eq!(packet.segments(), 3);
        assert_eq!(packet.segment_wire_bytes(0), 1500);
        assert_eq!(packet.segment_wire_bytes(2), 52 + 4000 - 2 * 1448);
        let mut plain = frame.clone();
        plain[1] = GSO_NONE;
        assert_eq!(parse(&plain), None);
        assert_eq!(parse(&frame[..5]), None);
    }

    #[test]
    fn a_run_is_what_segmentation_would_have_sent() {
        let frame = ipv4_super_packet(4000, 1448);
        let packet = parse(&frame).expect("tcp super-packet");
        // Segments 1 and 2 survive, segment 0 was lost.
        let run = build_run(&frame, &packet, 1, 3);
        let ip = &run[VIRTIO_HEADER_BYTES..];
        assert_eq!(usize::from(u16::from_be_bytes([ip[2], ip[3]])), ip.len());
        assert_eq!(ip.len(), 52 + 4000 - 1448);
        assert_eq!(
            u16::from_be_bytes([ip[4], ip[5]]),
            0x1235,
            "ip id advanced by one"
        );
        assert_eq!(
            fold(add_words(&ip[..20], 0)),
            0xffff,
            "ipv4 header checksum valid"
        );
        assert_eq!(
            u32::from_be_bytes([ip[24], ip[25], ip[26], ip[27]]),
            1000 + 1448
        );
        assert_eq!(ip[33] & 0x80, 0, "cwr only on the first segment");
        assert_eq!(ip[33] & 0x09, 0x09, "psh and fin stay on the last");
        assert_eq!(
            ip[52],
            (1448 % 256) as u8,
            "payload starts at the second segment"
        );
        assert_eq!(run[1], GSO_TCP_V4);
        // The first segment alone is an ordinary packet without fin.
        let single = build_run(&frame, &packet, 0, 1);
        assert_eq!(single[1], GSO_NONE);
        assert_eq!(single.len(), VIRTIO_HEADER_BYTES + 1500);
        assert_eq!(single[VIRTIO_HEADER_BYTES + 33] & 0x09, 0);
        // The pseudo-header sum matches the one for the new length.
        let tcp_length = 1500 - 20;
        let expected = fold(add_words(
            &single[VIRTIO_HEADER_BYTES + 12..VIRTIO_HEADER_BYTES + 20],
            6 + tcp_length,
        ));
        let stored = u16::from_be_bytes([
            single[VIRTIO_HEADER_BYTES + 36],
            single[VIRTIO_HEADER_BYTES + 37],
        ]);
        assert_eq!(stored, expected);
    }
}
