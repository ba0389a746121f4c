use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;

use super::*;

const MAC_A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];

pub(crate) fn ethernet(ethertype: u16, vlan: Option<u16>, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&MAC_B);
    frame.extend_from_slice(&MAC_A);
    if let Some(id) = vlan {
        frame.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
        frame.extend_from_slice(&id.to_be_bytes());
    }
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

pub(crate) fn tcp(seq: u32, ack: u32, flags: u8, options: &[u8], payload: &[u8]) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let mut segment = Vec::new();
    segment.extend_from_slice(&40000u16.to_be_bytes());
    segment.extend_from_slice(&80u16.to_be_bytes());
    segment.extend_from_slice(&seq.to_be_bytes());
    segment.extend_from_slice(&ack.to_be_bytes());
    let words = (20 + options.len()) / 4;
    segment.push((words as u8) << 4);
    segment.push(flags);
    segment.extend_from_slice(&65535u16.to_be_bytes());
    segment.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    segment.extend_from_slice(options);
    segment.extend_from_slice(payload);
    segment
}

pub(crate) fn ipv4(protocol: u8, flags_fragment: u16, payload: &[u8]) -> Vec<u8> {
    let total = (20 + payload.len()) as u16;
    let mut packet = vec![0x45, 0];
    packet.extend_from_slice(&total.to_be_bytes());
    packet.extend_from_slice(&[0x12, 0x34]);
    packet.extend_from_slice(&flags_fragment.to_be_bytes());
    packet.extend_from_slice(&[64, protocol, 0, 0]);
    packet.extend_from_slice(&[10, 0, 0, 1]);
    packet.extend_from_slice(&[10, 0, 0, 2]);
    packet.extend_from_slice(payload);
    packet
}

pub(crate) fn ipv6(next_header: u8, payload: &[u8]) -> Vec<u8> {
    let mut packet = vec![0x60, 0, 0, 0];
    packet.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    packet.extend_from_slice(&[next_header, 64]);
    packet.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
    packet.extend_from_slice(&"fe80::2".parse::<Ipv6Addr>().unwrap().octets());
    packet.extend_from_slice(payload);
    packet
}

/// A UDP datagram 5353 → 53 carrying `payload`.
pub(crate) fn udp(payload: &[u8]) -> Vec<u8> {
    let mut datagram = Vec::new();
    datagram.extend_from_slice(&5353u16.to_be_bytes());
    datagram.extend_from_slice(&53u16.to_be_bytes());
    datagram.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    datagram.extend_from_slice(&[0, 0]);
    datagram.extend_from_slice(payload);
    datagram
}

/// A handful of valid frames of every kind, also the seeds of the mutation property.
pub(crate) fn valid_frames() -> Vec<Vec<u8>> {
    let data_segment = tcp(
        1000,
        2000,
        0x18,
        &[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2],
        b"hello",
    );
    let mut hop_by_hop_then_dest = vec![60, 0, 1, 4, 0, 0, 0, 0]; // hop-by-hop, PadN
    hop_by_hop_then_dest.extend_from_slice(&[PROTO_TCP, 0, 1, 4, 0, 0, 0, 0]); // dest opts
    hop_by_hop_then_dest.extend_from_slice(&data_segment);
    let mut udp = Vec::new();
    udp.extend_from_slice(&5353u16.to_be_bytes());
    udp.extend_from_slice(&53u16.to_be_bytes());
    udp.extend_from_slice(&12u16.to_be_bytes());
    udp.extend_from_slice(&[0, 0, b'p', b'i', b'n', b'g']);
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&MAC_A);
    arp.extend_from_slice(&[10, 0, 0, 1]);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&[10, 0, 0, 2]);
    vec![
        ethernet(
            ETHERTYPE_IPV4,
            None,
            &ipv4(PROTO_TCP, 0x4000, &data_segment),
        ),
        ethernet(ETHERTYPE_IPV4, Some(42), &ipv4(PROTO_UDP, 0, &udp)),
        ethernet(
            ETHERTYPE_IPV4,
            None,
            &ipv4(PROTO_ICMP, 0, &[8, 0, 0, 0, 0, 1, 0, 1]),
        ),
        ethernet(ETHERTYPE_IPV6, None, &ipv6(0, &hop_by_hop_then_dest)),
        ethernet(
            ETHERTYPE_IPV6,
            None,
            &ipv6(PROTO_ICMPV6, &[135, 0, 0, 0, 0, 0, 0, 0]),
        ),
        ethernet(ETHERTYPE_ARP, None, &arp),
    ]
}

fn ip(frame: &[u8]) -> IpPacket<'_> {
    match parse_ethernet(frame).unwrap().network {
        Network::Ip(ip) => ip,
        other => panic!("not IP: {other:?}"),
    }
}

#[test]
fn ipv4_tcp_payload_is_trimmed_to_the_ip_length_not_the_ethernet_padding() {
    let segment = tcp(7, 9, 0x12, &[], b"");
    let mut frame = ethernet(ETHERTYPE_IPV4, None, &ipv4(PROTO_TCP, 0, &segment));
    frame.resize(60, 0); // minimum Ethernet frame, padded with zeros
    let packet = ip(&frame);
    let Transport::Tcp(tcp) = &packet.transport else {
        panic!("not TCP")
    };
    assert_eq!((tcp.seq, tcp.ack), (7, 9));
    assert!(tcp.flags.syn && tcp.flags.ack && !tcp.flags.fin);
    assert!(tcp.payload.is_empty());
    assert_eq!(
        packet.flow_key(),
        Some(FlowKey {
            protocol: PROTO_TCP,
            src: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            src_port: 40000,
            dst: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
            dst_port: 80,
        })
    );
    assert_eq!(packet.flow_key().unwrap().reversed().src_port, 80);
}

#[test]
fn tcp_options_are_skipped() {
    let frames = valid_frames();
    let Transport::Tcp(tcp) = ip(&frames[0]).transport else {
        panic!("not TCP")
    };
    assert_eq!(tcp.payload, b"hello");
}

fn tcp_window_scale(flags: u8, options: &[u8]) -> Option<u8> {
    let frame = ethernet(0x0800, None, &ipv4(6, 0, &tcp(1, 0, flags, options, b"")));
    let Transport::Tcp(tcp) = ip(&frame).transport else {
        panic!("not TCP")
    };
    tcp.window_scale
}

#[test]
fn the_window_scale_is_read_from_a_syn_only() {
    // Linux's SYN-ACK options: MSS, SACK permitted, timestamps, NOP, window scale 7.
    let linux = [
        2, 4, 5, 180, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
    ];
    assert_eq!(tcp_window_scale(0x12, &linux), Some(7));
    assert_eq!(tcp_window_scale(0x02, &[1, 3, 3, 9]), Some(9));
    assert_eq!(tcp_window_scale(0x10, &linux), None, "not a SYN");
    assert_eq!(
        tcp_window_scale(0x02, &[2, 4, 5, 180]),
        None,
        "no scale option"
    );
    assert_eq!(
        tcp_window_scale(0x02, &[1, 3, 3, 15]),
        Some(14),
        "RFC 7323: at most 14"
    );
    // After the end of the list, or behind a malformed length, nothing more is read.
    assert_eq!(tcp_window_scale(0x02, &[0, 3, 3, 7]), None);
    assert_eq!(tcp_window_scale(0x02, &[8, 1, 3, 3, 3, 7, 0, 0]), None);
    assert_eq!(tcp_window_scale(0x02, &[8, 9, 3, 3, 7, 1, 1, 1]), None);
    assert_eq!(tcp_window_scale(0x02, &[1, 1, 3, 3]), None, "cut short");
}

#[test]
fn vlan_tag_is_read() {
    let frames = valid_frames();
    let parsed = parse_ethernet(&frames[1]).unwrap();
    assert_eq!(parsed.vlan, Some(42));
    assert_eq!(parsed.ethertype, ETHERTYPE_IPV4);
    let Network::Ip(IpPacket {
        transport: Transport::Udp(udp),
        ..
    }) = parsed.network
    else {
        panic!("not UDP")
    };
    assert_eq!(
        (udp.src_port, udp.dst_port, udp.payload),
        (5353, 53, &b"ping"[..])
    );
}

#[test]
fn ipv6_extension_headers_are_walked_to_tcp() {
    let frames = valid_frames();
    let packet = ip(&frames[3]);
    assert_eq!(packet.protocol, PROTO_TCP);
    assert_eq!(packet.src, IpAddr::V6(Ipv6Addr::LOCALHOST));
    let Transport::Tcp(tcp) = packet.transport else {
        panic!("not TCP")
    };
    assert_eq!(tcp.payload, b"hello");
}

#[test]
fn icmp_icmpv6_and_arp_are_recognised() {
    let frames = valid_frames();
    assert!(matches!(
        ip(&frames[2]).transport,
        Transport::Icmp(IcmpMessage { icmp_type: 8, .. })
    ));
    assert!(matches!(
        ip(&frames[4]).transport,
        Transport::Icmpv6(IcmpMessage { icmp_type: 135, .. })
    ));
    let Network::Arp(arp) = parse_ethernet(&frames[5]).unwrap().network else {
        panic!("not ARP")
    };
    assert_eq!(
        (arp.operation, arp.sender_proto, arp.target_proto),
        (1, &[10, 0, 0, 1][..], &[10, 0, 0, 2][..])
    );
}

#[test]
fn fragments_are_not_read_as_transport() {
    let later_fragment = ethernet(ETHERTYPE_IPV4, None, &ipv4(PROTO_TCP, 0x0010, b"12345678"));
    assert!(matches!(
        ip(&later_fragment).transport,
        Transport::Fragment {
            protocol: PROTO_TCP,
            ..
        }
    ));
    assert_eq!(ip(&later_fragment).flow_key(), None);
    let mut fragment_header = vec![PROTO_UDP, 0, 0, 1, 0, 0, 0, 9]; // offset 0, more fragments
    fragment_header.extend_from_slice(&[0; 8]);
    let v6_fragment = ethernet(ETHERTYPE_IPV6, None, &ipv6(44, &fragment_header));
    assert!(matches!(
        ip(&v6_fragment).transport,
        Transport::Fragment {
            protocol: PROTO_UDP,
            ..
        }
    ));
}

#[test]
fn malformed_headers_are_errors() {
    let frames = valid_frames();
    let mut cut = frames[0].clone();
    cut.truncate(30);
    assert_eq!(
        parse_ethernet(&cut),
        Err(ParseError::Truncated { layer: Layer::Ipv4 })
    );
    let mut bad_ihl = frames[0].clone();
    bad_ihl[14] = 0x44;
    assert!(matches!(
        parse_ethernet(&bad_ihl),
        Err(ParseError::Malformed {
            layer: Layer::Ipv4,
            ..
        })
    ));
    let mut bad_offset = frames[0].clone();
    bad_offset[14 + 20 + 12] = 0x40; // data offset 16 bytes
    assert!(matches!(
        parse_ethernet(&bad_offset),
        Err(ParseError::Malformed {
            layer: Layer::Tcp,
            ..
        })
    ));
    assert_eq!(
        parse_ethernet(&[0; 13]),
        Err(ParseError::Truncated {
            layer: Layer::Ethernet
        })
    );
    let triple_tag = ethernet(ETHERTYPE_VLAN, Some(1), &[0, 2, 0x81, 0, 0, 3, 8, 0]);
    assert!(matches!(
        parse_ethernet(&triple_tag),
        Err(ParseError::Malformed {
            layer: Layer::Ethernet,
            ..
        })
    ));
}

/// Whatever parses must be a view into the frame it came from, never past its end.
fn check_borrowed_views(frame: &[u8]) {
    if let Ok(parsed) = parse_ethernet(frame)
        && let Network::Ip(ip) = parsed.network
    {
        let payload = match ip.transport {
            Transport::Tcp(t) => t.payload,
            Transport::Udp(u) => u.payload,
            Transport::Icmp(i) | Transport::Icmpv6(i) => i.body,
            Transport::Fragment { payload, .. } | Transport::Other { payload, .. } => payload,
        };
        let frame_range = frame.as_ptr_range();
        let payload_range = payload.as_ptr_range();
        assert!(frame_range.start <= payload_range.start && payload_range.end <= frame_range.end);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(frame in proptest::collection::vec(any::<u8>(), 0..200)) {
        check_borrowed_views(&frame);
    }

    #[test]
    fn mutated_valid_frames_never_panic(
        which in 0usize..6,
        mutations in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<usize>(),
    ) {
        let mut frame = valid_frames().swap_remove(which);
        for (at, value) in mutations {
            let at = at % frame.len();
            frame[at] = value;
        }
        check_borrowed_views(&frame);
        frame.truncate(cut % (frame.len() + 1));
        check_borrowed_views(&frame);
    }
}

#[test]
fn a_flow_key_reads_as_protocol_source_and_destination() {
    let v4 = FlowKey {
        protocol: 6,
        src: [10, 0, 0, 2].into(),
        src_port: 80,
        dst: [10, 0, 0, 9].into(),
        dst_port: 40_000,
    };
    assert_eq!(v4.to_string(), "tcp 10.0.0.2:80 > 10.0.0.9:40000");
    let v6 = FlowKey {
        protocol: 17,
        src: "fe80::2".parse::<Ipv6Addr>().unwrap().into(),
        src_port: 53,
        dst: Ipv6Addr::LOCALHOST.into(),
        dst_port: 5353,
    };
    assert_eq!(v6.to_string(), "udp [fe80::2]:53 > [::1]:5353");
    assert_eq!(
        FlowKey {
            protocol: 132,
            ..v4
        }
        .to_string(),
        "ip-proto-132 10.0.0.2:80 > 10.0.0.9:40000"
    );
    assert_eq!(
        FlowKey { protocol: 1, ..v4 }.to_string(),
        "icmp 10.0.0.2 > 10.0.0.9"
    );
}
