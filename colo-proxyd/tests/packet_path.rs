//! The whole pure path, as a daemon will run it: net-filter socket bytes → frames → parsed
//! packets → stream comparator. The two VMs' outputs differ in everything the comparison must
//! ignore (ISN, segmentation, TCP options, window, IP ID, checksums) and must still release
//! every PVM packet; one changed payload byte must stop the release.

use std::net::Ipv6Addr;

use bytes::Bytes;
use colo_proxyd::codec::{Frame, FrameDecoder, encode};
use colo_proxyd::compare::{
    Action, CheckpointReason, ComparatorLimits, PacketId, Segment, StreamComparator,
};
use colo_proxyd::packet::{FlowKey, Network, Transport, parse_ethernet};

/// One VM's way of sending the same stream.
struct Style {
    isn: u32,
    segment_size: usize,
    ip_id: u16,
    window: u16,
    timestamps: bool,
    ipv6: bool,
}

fn tcp(style: &Style, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let options: &[u8] = if style.timestamps {
        &[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 3]
    } else {
        &[]
    };
    let mut segment = Vec::new();
    segment.extend_from_slice(&80u16.to_be_bytes());
    segment.extend_from_slice(&40000u16.to_be_bytes());
    segment.extend_from_slice(&seq.to_be_bytes());
    segment.extend_from_slice(&7001u32.to_be_bytes());
    segment.push((((20 + options.len()) / 4) as u8) << 4);
    segment.push(flags);
    segment.extend_from_slice(&style.window.to_be_bytes());
    segment.extend_from_slice(&style.ip_id.to_be_bytes()); // a checksum nobody checks
    segment.extend_from_slice(&[0, 0]);
    segment.extend_from_slice(options);
    segment.extend_from_slice(payload);
    segment
}

fn frame(style: &Style, transport: &[u8]) -> Frame {
    let mut data = vec![0u8; 12]; // virtio-net header
    data.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 9, 0x52, 0x54, 0, 0, 0, 1]);
    if style.ipv6 {
        data.extend_from_slice(&0x86DDu16.to_be_bytes());
        data.extend_from_slice(&[0x60, 0, 0, 0]);
        data.extend_from_slice(&(transport.len() as u16).to_be_bytes());
        data.extend_from_slice(&[6, 64]);
        data.extend_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        data.extend_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
    } else {
        data.extend_from_slice(&0x0800u16.to_be_bytes());
        data.extend_from_slice(&[0x45, 0]);
        data.extend_from_slice(&((20 + transport.len()) as u16).to_be_bytes());
        data.extend_from_slice(&style.ip_id.to_be_bytes());
        data.extend_from_slice(&[0x40, 0, 64, 6, 0xAB, 0xCD, 10, 0, 0, 2, 10, 0, 0, 1]);
    }
    data.extend_from_slice(transport);
    if data.len() < 12 + 60 {
        data.resize(12 + 60, 0); // Ethernet padding, not stream data
    }
    Frame {
        vnet_hdr_len: 12,
        data,
    }
}

/// What a VM's redirector socket carries: SYN-ACK, the data, a FIN.
fn socket_bytes(style: &Style, data: &[u8]) -> Vec<u8> {
    let mut frames = vec![frame(style, &tcp(style, style.isn, 0x12, b""))];
    for (i, chunk) in data.chunks(style.segment_size).enumerate() {
        let seq = style.isn.wrapping_add(1 + (i * style.segment_size) as u32);
        frames.push(frame(style, &tcp(style, seq, 0x18, chunk)));
    }
    let fin_seq = style.isn.wrapping_add(1 + data.len() as u32);
    frames.push(frame(style, &tcp(style, fin_seq, 0x11, b"")));
    let mut wire = Vec::new();
    for frame in &frames {
        encode(frame, true, &mut wire).unwrap();
    }
    wire
}

/// Decodes a socket's bytes read in awkward chunks, returning the flow key and TCP segment of
/// every frame, owned.
fn read_socket(wire: &[u8], chunk: usize) -> Vec<(FlowKey, Vec<u8>)> {
    let mut decoder = FrameDecoder::new(true);
    let mut frames = Vec::new();
    for piece in wire.chunks(chunk) {
        decoder.feed(piece);
        while let Some(frame) = decoder.next_frame().unwrap() {
            frames.push(frame);
        }
    }
    decoder.finish().unwrap();
    frames
        .iter()
        .map(|frame| {
            let parsed = parse_ethernet(frame.ethernet_bytes()).unwrap();
            let Network::Ip(ip) = parsed.network else {
                panic!("not IP")
            };
            (ip.flow_key().unwrap(), frame.ethernet_bytes().to_vec())
        })
        .collect()
}

fn with_segment<R>(ethernet: &[u8], f: impl FnOnce(&Segment<'_>) -> R) -> R {
    let parsed = parse_ethernet(ethernet).unwrap();
    let Network::Ip(ip) = parsed.network else {
        panic!("not IP")
    };
    let Transport::Tcp(tcp) = &ip.transport else {
        panic!("not TCP")
    };
    f(&Segment::from(tcp))
}

/// Runs both sockets through one comparator, the SVM partly behind the PVM.
fn compare(pvm: &Style, svm: &Style, pvm_data: &[u8], svm_data: &[u8]) -> (usize, Vec<Action>) {
    let pvm_packets = read_socket(&socket_bytes(pvm, pvm_data), 7);
    let svm_packets = read_socket(&socket_bytes(svm, svm_data), 1000);
    assert_eq!(pvm_packets[0].0, svm_packets[0].0, "same connection key");
    let mut comparator = StreamComparator::new(ComparatorLimits::default());
    let mut actions = Vec::new();
    // The SVM runs behind: half its output, then all the PVM's, then the rest.
    let half = svm_packets.len() / 2;
    for (_, ethernet) in &svm_packets[..half] {
        with_segment(ethernet, |s| comparator.push_svm(s, &mut actions));
    }
    for (i, (_, ethernet)) in pvm_packets.iter().enumerate() {
        let packet = Bytes::copy_from_slice(ethernet);
        with_segment(&packet, |s| {
            comparator.push_pvm(PacketId(i as u64), s, &packet, &mut actions)
        });
    }
    for (_, ethernet) in &svm_packets[half..] {
        with_segment(ethernet, |s| comparator.push_svm(s, &mut actions));
    }
    (pvm_packets.len(), actions)
}

fn styles(ipv6: bool) -> (Style, Style) {
    let pvm = Style {
        isn: 1_000,
        segment_size: 1448,
        ip_id: 1,
        window: 501,
        timestamps: true,
        ipv6,
    };
    let svm = Style {
        isn: u32::MAX - 300, // wraps inside the stream
        segment_size: 536,
        ip_id: 999,
        window: 64000,
        timestamps: false,
        ipv6,
    };
    (pvm, svm)
}

fn body() -> Vec<u8> {
    (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect()
}

#[test]
fn identical_output_differently_framed_is_released_whole_and_in_order() {
    for ipv6 in [false, true] {
        let (pvm, svm) = styles(ipv6);
        let (count, actions) = compare(&pvm, &svm, &body(), &body());
        let expected: Vec<Action> = (0..count as u64)
            .map(|i| Action::Release(PacketId(i)))
            .collect();
        assert_eq!(actions, expected, "ipv6={ipv6}");
    }
}

#[test]
fn one_changed_byte_stops_the_release_at_its_segment() {
    for ipv6 in [false, true] {
        let (pvm, svm) = styles(ipv6);
        let mut svm_body = body();
        svm_body[5000] ^= 0x20;
        let (_, actions) = compare(&pvm, &svm, &body(), &svm_body);
        let released: Vec<u64> = actions
            .iter()
            .filter_map(|a| a.released().map(|PacketId(i)| i))
            .collect();
        // Byte 5000 is in the PVM's 4th data segment (1448-byte segments), packet 4.
        assert_eq!(released, vec![0, 1, 2, 3], "ipv6={ipv6}");
        assert!(actions.contains(&Action::CheckpointNeeded(
            CheckpointReason::PayloadDiffers { offset: 5000 }
        )));
    }
}
