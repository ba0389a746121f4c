use proptest::prelude::*;

use super::checksum::tests::internet_checksum;
use super::*;

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const PSH_ACK: u8 = 0x18;

/// An Ethernet frame carrying one TCP segment with a correct checksum.
fn frame(ipv6: bool, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&40000u16.to_be_bytes());
    tcp.extend_from_slice(&80u16.to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.extend_from_slice(&[0x50, flags, 0xFF, 0xFF, 0, 0, 0, 0]);
    tcp.extend_from_slice(payload);
    let (src, dst): (Vec<u8>, Vec<u8>) = if ipv6 {
        ([0xFD; 16].to_vec(), [0xFE; 16].to_vec())
    } else {
        (vec![10, 0, 0, 1], vec![10, 0, 0, 2])
    };
    let mut pseudo = [src.clone(), dst.clone()].concat();
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&tcp);
    let sum = internet_checksum(&pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());

    let mut frame = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
    if ipv6 {
        frame.extend_from_slice(&[0x86, 0xDD, 0x60, 0, 0, 0]);
        frame.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
        frame.extend_from_slice(&[6, 64]);
    } else {
        frame.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        frame.extend_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
        frame.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0]);
    }
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&tcp);
    frame
}

/// Sequence and acknowledgement numbers of a frame, and whether its checksum is right.
fn inspect(frame: &[u8]) -> (u32, u32, bool) {
    let Network::Ip(ip) = parse_ethernet(frame).unwrap().network else {
        panic!("not IP")
    };
    let Transport::Tcp(tcp) = &ip.transport else {
        panic!("not TCP")
    };
    let (src, dst) = match (ip.src, ip.dst) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
            (s.octets().to_vec(), d.octets().to_vec())
        }
        (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => {
            (s.octets().to_vec(), d.octets().to_vec())
        }
        _ => panic!("mixed addresses"),
    };
    let segment_len = tcp.header_len + tcp.payload.len();
    let segment = &frame[frame.len() - segment_len..];
    let mut pseudo = [src, dst].concat();
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(segment_len as u16).to_be_bytes());
    pseudo.extend_from_slice(segment);
    // A correct checksum makes the sum over everything (checksum included) 0 (or -0).
    let valid = matches!(internet_checksum(&pseudo), 0 | 0xFFFF);
    (tcp.seq, tcp.ack, valid)
}

#[test]
fn vm_accepted_connection_is_rewritten_both_ways() {
    let mut rewriter = SequenceRewriter::default();
    let c = ChecksumState::Complete;
    let mut client_syn = frame(false, 500, 0, SYN, b"");
    assert_eq!(
        rewriter.into_svm(&mut client_syn, c),
        Ok(Rewrite::Unchanged)
    );
    let mut svm_syn_ack = frame(false, 9000, 501, SYN | ACK, b"");
    assert_eq!(
        rewriter.out_of_svm(&mut svm_syn_ack, c),
        Ok(Rewrite::Unchanged)
    );
    // The client acknowledges the PVM's SYN (ISN 1000); the SVM must see its own numbers.
    let mut client_ack = frame(false, 501, 1001, ACK, b"GET /");
    assert_eq!(
        rewriter.into_svm(&mut client_ack, c),
        Ok(Rewrite::Rewritten)
    );
    assert_eq!(inspect(&client_ack), (501, 9001, true));
    assert_eq!(rewriter.offset(), Some(8000));
    let mut svm_data = frame(false, 9001, 506, PSH_ACK, b"200 OK");
    assert_eq!(
        rewriter.out_of_svm(&mut svm_data, c),
        Ok(Rewrite::Rewritten)
    );
    assert_eq!(inspect(&svm_data), (1001, 506, true));
}

#[test]
fn an_ack_before_the_svm_syn_ack_waits_for_it() {
    let mut rewriter = SequenceRewriter::default();
    let c = ChecksumState::Complete;
    rewriter
        .into_svm(&mut frame(true, 500, 0, SYN, b""), c)
        .unwrap();
    let mut early_ack = frame(true, 501, 1001, ACK, b"");
    let untouched = early_ack.clone();
    assert_eq!(
        rewriter.into_svm(&mut early_ack, c),
        Ok(Rewrite::WaitForSvmSyn)
    );
    assert_eq!(early_ack, untouched);
    rewriter
        .out_of_svm(&mut frame(true, u32::MAX, 501, SYN | ACK, b""), c)
        .unwrap();
    assert_eq!(rewriter.into_svm(&mut early_ack, c), Ok(Rewrite::Rewritten));
    assert_eq!(inspect(&early_ack), (501, 0, true)); // u32::MAX + 1 wraps
}

#[test]
fn vm_opened_connection_learns_from_the_client_syn_ack() {
    let mut rewriter = SequenceRewriter::default();
    let c = ChecksumState::Complete;
    let mut svm_syn = frame(false, 7000, 0, SYN, b"");
    assert_eq!(rewriter.out_of_svm(&mut svm_syn, c), Ok(Rewrite::Unchanged));
    let mut client_syn_ack = frame(false, 300, 101, SYN | ACK, b"");
    assert_eq!(
        rewriter.into_svm(&mut client_syn_ack, c),
        Ok(Rewrite::Rewritten)
    );
    assert_eq!(inspect(&client_syn_ack), (300, 7001, true));
}

#[test]
fn after_a_checkpoint_nothing_is_rewritten() {
    let mut rewriter = SequenceRewriter::default();
    let c = ChecksumState::Complete;
    rewriter
        .out_of_svm(&mut frame(false, 7000, 0, SYN, b""), c)
        .unwrap();
    rewriter
        .into_svm(&mut frame(false, 300, 101, SYN | ACK, b""), c)
        .unwrap();
    rewriter.reset();
    assert_eq!(rewriter.offset(), Some(0));
    let mut data = frame(false, 101, 301, PSH_ACK, b"x");
    assert_eq!(rewriter.out_of_svm(&mut data, c), Ok(Rewrite::Unchanged));
    assert_eq!(rewriter.into_svm(&mut data, c), Ok(Rewrite::Unchanged));
}

#[test]
fn a_partial_checksum_is_left_alone() {
    let mut rewriter = SequenceRewriter::default();
    rewriter
        .out_of_svm(&mut frame(false, 7000, 0, SYN, b""), ChecksumState::Partial)
        .unwrap();
    let mut syn_ack = frame(false, 300, 101, SYN | ACK, b"");
    let checksum_before = syn_ack[14 + 20 + 16..14 + 20 + 18].to_vec();
    rewriter
        .into_svm(&mut syn_ack, ChecksumState::Partial)
        .unwrap();
    assert_eq!(inspect(&syn_ack).1, 7001);
    assert_eq!(&syn_ack[14 + 20 + 16..14 + 20 + 18], &checksum_before[..]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// The primary's lowered acknowledgement: both fields set, the checksum still right, the
    /// rest of the frame untouched.
    #[test]
    fn setting_ack_and_window_keeps_the_checksum_right(
        ipv6 in any::<bool>(),
        seq in any::<u32>(),
        ack in any::<u32>(),
        new_ack in any::<u32>(),
        window in any::<u16>(),
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let original = frame(ipv6, seq, ack, PSH_ACK, &payload);
        let mut lowered = original.clone();
        set_ack_and_window(&mut lowered, new_ack, window).unwrap();
        let (seq_after, ack_after, valid) = inspect(&lowered);
        prop_assert_eq!((seq_after, ack_after, valid), (seq, new_ack, true));
        let Network::Ip(ip) = parse_ethernet(&lowered).unwrap().network else { panic!() };
        let Transport::Tcp(tcp) = ip.transport else { panic!() };
        prop_assert_eq!(tcp.window, window);
        prop_assert_eq!(tcp.payload, &payload[..]);
        prop_assert_eq!(lowered.len(), original.len());
    }
}

#[test]
fn frames_that_are_not_tcp_are_errors() {
    let mut rewriter = SequenceRewriter::default();
    let mut udp = frame(false, 0, 0, 0, b"");
    udp[14 + 9] = 17; // protocol UDP; its "length" field is then the TCP seq's low half
    assert!(
        rewriter
            .into_svm(&mut udp, ChecksumState::Complete)
            .is_err()
    );
    assert_eq!(
        rewriter.out_of_svm(&mut [0u8; 10], ChecksumState::Complete),
        Err(RewriteError::Parse(ParseError::Truncated {
            layer: crate::packet::Layer::Ethernet
        }))
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Whatever the ISNs, the SVM sees the client's acks in its own numbers, the client sees
    /// the SVM's data in the PVM's numbers, and every checksum stays right.
    #[test]
    fn rewritten_frames_carry_the_right_numbers_and_checksums(
        ipv6 in any::<bool>(),
        client_isn in any::<u32>(),
        pvm_isn in any::<u32>(),
        svm_isn in any::<u32>(),
        sent in 0u32..100_000,
        payload in proptest::collection::vec(any::<u8>(), 0..100),
    ) {
        let c = ChecksumState::Complete;
        let mut rewriter = SequenceRewriter::default();
        rewriter.into_svm(&mut frame(ipv6, client_isn, 0, SYN, b""), c).unwrap();
        rewriter.out_of_svm(&mut frame(ipv6, svm_isn, client_isn.wrapping_add(1), SYN | ACK, b""), c).unwrap();
        // The handshake ACK teaches the PVM's ISN; a later one carries data.
        let mut handshake = frame(ipv6, client_isn.wrapping_add(1), pvm_isn.wrapping_add(1), ACK, b"");
        rewriter.into_svm(&mut handshake, c).unwrap();
        prop_assert_eq!(inspect(&handshake).1, svm_isn.wrapping_add(1));
        let mut ack = frame(ipv6, client_isn.wrapping_add(1), pvm_isn.wrapping_add(1 + sent), ACK, &payload);
        rewriter.into_svm(&mut ack, c).unwrap();
        prop_assert_eq!(inspect(&ack), (client_isn.wrapping_add(1), svm_isn.wrapping_add(1 + sent), true));
        let mut out = frame(ipv6, svm_isn.wrapping_add(1 + sent), 7, PSH_ACK, &payload);
        rewriter.out_of_svm(&mut out, c).unwrap();
        prop_assert_eq!(inspect(&out), (pvm_isn.wrapping_add(1 + sent), 7, true));
    }
}

#[test]
fn the_table_keys_both_directions_to_one_connection_and_forgets_at_a_checkpoint() {
    let c = ChecksumState::Complete;
    let mut table = RewriteTable::new();
    // The test frames all go 10.0.0.1:40000 -> 10.0.0.2:80; for the client's frames swap
    // addresses and ports so that they travel the other way.
    let from_client = |seq, ack, flags| {
        let mut f = frame(false, seq, ack, flags, b"");
        for i in 0..4 {
            f.swap(26 + i, 30 + i);
        }
        f.swap(34, 36);
        f.swap(35, 37);
        // Swapping keeps the one's-complement sums unchanged: no checksum to fix.
        f
    };
    table.into_svm(&mut from_client(500, 0, SYN), c).unwrap();
    table
        .out_of_svm(&mut frame(false, 9000, 501, SYN | ACK, b""), c)
        .unwrap();
    let mut ack = from_client(501, 1001, ACK);
    assert_eq!(table.into_svm(&mut ack, c), Ok(Rewrite::Rewritten));
    assert_eq!(inspect(&ack), (501, 9001, true));
    assert_eq!(table.connections(), 1);
    table.reset();
    assert_eq!(table.connections(), 0);
    let mut later = from_client(501, 1001, ACK);
    assert_eq!(table.into_svm(&mut later, c), Ok(Rewrite::Unchanged));
}

/// A frame of the connection whose client port is `port`: the VM's (out of the SVM), or the
/// client's (into it). The checksum is not fixed: the table does not read it.
fn conn(port: u16, from_client: bool, seq: u32, ack: u32, flags: u8) -> Vec<u8> {
    let mut f = frame(false, seq, ack, flags, b"");
    f[34..36].copy_from_slice(&port.to_be_bytes());
    if from_client {
        for i in 0..4 {
            f.swap(26 + i, 30 + i);
        }
        f.swap(34, 36);
        f.swap(35, 37);
    }
    f
}

const FIN_ACK: u8 = 0x11;

fn small_table() -> RewriteTable {
    RewriteTable::with_limits(RewriteLimits {
        max_connections: 4,
        idle: std::time::Duration::from_secs(1000),
        transitory_idle: std::time::Duration::from_secs(100),
    })
}

/// Opens the connection of `port` with SVM ISN `svm_isn` (the PVM's is 1000).
fn handshake(table: &mut RewriteTable, port: u16, svm_isn: u32) {
    let c = ChecksumState::Complete;
    table
        .into_svm(&mut conn(port, true, 500, 0, SYN), c)
        .unwrap();
    table
        .out_of_svm(&mut conn(port, false, svm_isn, 501, SYN | ACK), c)
        .unwrap();
    table
        .into_svm(&mut conn(port, true, 501, 1001, ACK), c)
        .unwrap();
}

#[test]
fn the_table_keeps_only_offsets_that_are_not_zero_and_refuses_rather_than_corrupt() {
    let c = ChecksumState::Complete;
    let mut table = small_table();
    handshake(&mut table, 1, 1000);
    assert_eq!(
        table.connections(),
        0,
        "offset 0 is what an unknown connection gets"
    );
    for port in 1..=4 {
        handshake(&mut table, port, 9000);
    }
    assert_eq!(
        (table.connections(), table.connections_with_offset()),
        (4, 4)
    );
    // Full of live connections with an offset: a new one is refused, its SYN untouched.
    let syn = conn(5, true, 500, 0, SYN);
    let mut refused = syn.clone();
    assert_eq!(
        table.into_svm(&mut refused, c),
        Err(RewriteError::TableFull(4))
    );
    assert_eq!(refused, syn);
    // Existing connections keep working.
    let mut ack = conn(2, true, 501, 1001, ACK);
    assert_eq!(table.into_svm(&mut ack, c), Ok(Rewrite::Rewritten));
    assert_eq!(inspect(&ack).1, 9001);
    // A closed connection (a FIN each way) is the one evicted for a new connection.
    table
        .out_of_svm(&mut conn(3, false, 9001, 501, FIN_ACK), c)
        .unwrap();
    table
        .into_svm(&mut conn(3, true, 501, 9002, FIN_ACK), c)
        .unwrap();
    assert_eq!(table.into_svm(&mut syn.clone(), c), Ok(Rewrite::Unchanged));
    assert_eq!(table.connections(), 4);
    assert_eq!(
        table.counters(),
        RewriteCounters {
            expired: 0,
            evicted: 1,
            refused: 1
        }
    );
}

#[test]
fn idle_connections_expire_and_after_a_failover_new_ones_take_no_room() {
    let c = ChecksumState::Complete;
    let mut table = small_table();
    table.expire(std::time::Duration::ZERO);
    handshake(&mut table, 1, 9000);
    // A handshake the client never finished.
    table.into_svm(&mut conn(2, true, 500, 0, SYN), c).unwrap();
    assert_eq!(table.connections(), 2);
    table.expire(std::time::Duration::from_secs(150));
    assert_eq!(table.connections(), 1, "the half-open one went");
    table.freeze();
    for port in 10..100 {
        handshake(&mut table, port, 7000 + u32::from(port));
    }
    assert_eq!(
        table.connections(),
        1,
        "after a failover new connections have offset 0"
    );
    let mut data = conn(1, false, 9001, 501, PSH_ACK);
    assert_eq!(table.out_of_svm(&mut data, c), Ok(Rewrite::Rewritten));
    assert_eq!(inspect(&data).0, 1001);
    table.expire(std::time::Duration::from_secs(1149));
    assert_eq!(
        table.connections(),
        1,
        "used at 150 s: idle for less than 1000 s"
    );
    table.expire(std::time::Duration::from_secs(1151));
    assert_eq!(
        (table.connections(), table.connections_with_offset()),
        (0, 0)
    );
    assert_eq!(table.counters().expired, 2);
}
