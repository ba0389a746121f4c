use super::*;
use crate::test_frames::Tcp;
use proptest::prelude::*;

const CLIENT_ISN: u32 = 1_000;
const VM_ISN: u32 = 50_000;
const MS: Duration = Duration::from_millis(1);

/// A TCP/IPv4 frame between the VM and a client on `port` (see [`Tcp`]).
fn frame(
    from_vm: bool,
    port: u16,
    (seq, ack): (u32, u32),
    flags: u8,
    (window, scale): (u16, Option<u8>),
    len: usize,
) -> Vec<u8> {
    Tcp {
        window,
        scale,
        len,
        ..Tcp::new(from_vm, port, seq, ack, flags)
    }
    .frame()
}

const SYN: u8 = 0x02;
const SYN_ACK: u8 = 0x12;
const ACK: u8 = 0x10;
const PSH_ACK: u8 = 0x18;
const FIN_ACK: u8 = 0x11;

fn client_data(port: u16, offset: u32, len: usize) -> Vec<u8> {
    frame(
        false,
        port,
        (CLIENT_ISN + 1 + offset, VM_ISN + 1),
        PSH_ACK,
        (500, None),
        len,
    )
}

/// The SVM acknowledges `offset` bytes of the client's and offers `window` (unscaled field).
fn svm_ack(port: u16, offset: u32, window: u16) -> Vec<u8> {
    frame(
        true,
        port,
        (VM_ISN + 1, CLIENT_ISN + 1 + offset),
        ACK,
        (window, None),
        0,
    )
}

/// A pacer that saw the client open a connection on `port` to the VM, whose SVM answered
/// with shift count 7 and a window of `window` bytes.
fn accepted(port: u16, window: u16) -> WindowPacer {
    let mut pacer = WindowPacer::new();
    let mut out = Vec::new();
    pacer.to_svm(
        frame(false, port, (CLIENT_ISN, 0), SYN, (64240, Some(7)), 0),
        MS,
        &mut out,
    );
    pacer.svm_sent(
        &frame(
            true,
            port,
            (VM_ISN, CLIENT_ISN + 1),
            SYN_ACK,
            (window, Some(7)),
            0,
        ),
        MS,
        &mut out,
    );
    assert_eq!(out.len(), 1, "the SYN passes");
    pacer
}

#[test]
fn a_segment_beyond_the_svms_window_waits_for_it_to_open_and_order_is_kept() {
    // The SYN-ACK's window is unscaled: 3000 bytes.
    let mut pacer = accepted(4000, 3000);
    let mut out = Vec::new();
    let first = client_data(4000, 0, 1448);
    let second = client_data(4000, 1448, 1448);
    let third = client_data(4000, 2896, 1448);
    // A later pure ACK of the client, behind the waiting segment.
    let ack = frame(
        false,
        4000,
        (CLIENT_ISN + 1 + 4344, VM_ISN + 1),
        ACK,
        (500, None),
        0,
    );
    for f in [&first, &second, &third, &ack] {
        pacer.to_svm(f.clone(), 2 * MS, &mut out);
    }
    assert_eq!(
        out,
        vec![first.clone(), second.clone()],
        "the third ends beyond 3000"
    );
    assert!(pacer.is_pacing());
    assert_eq!(pacer.waiting(), (2, third.len() + ack.len()));

    // The SVM read some: 1448 acknowledged, 10 * 128 = 1280 bytes free, edge 2728.
    out.clear();
    pacer.svm_sent(&svm_ack(4000, 1448, 10), 3 * MS, &mut out);
    assert!(out.is_empty(), "the edge went back: ignored");
    // Window 32 * 128 = 4096 from 2896: edge 6992.
    pacer.svm_sent(&svm_ack(4000, 2896, 32), 4 * MS, &mut out);
    assert_eq!(out, vec![third, ack]);
    assert!(!pacer.is_pacing());
    assert_eq!(pacer.waiting(), (0, 0));
    assert_eq!(pacer.counters().paced, 2);
}

#[test]
fn a_zero_window_holds_data_but_not_an_acknowledgement_at_its_edge() {
    let mut pacer = accepted(4001, 3000);
    let mut out = Vec::new();
    pacer.svm_sent(&svm_ack(4001, 3000, 0), 2 * MS, &mut out);
    let data = client_data(4001, 3000, 100);
    pacer.to_svm(data.clone(), 3 * MS, &mut out);
    assert!(out.is_empty());
    // A window probe answer or an ACK of the SVM's data: no room needed.
    let pacer_ack = |p: &mut WindowPacer, out: &mut Vec<Vec<u8>>| {
        let ack = frame(
            false,
            4002,
            (CLIENT_ISN + 1 + 3000, VM_ISN + 1),
            ACK,
            (500, None),
            0,
        );
        p.to_svm(ack, 3 * MS, out);
    };
    let mut other = accepted(4002, 3000);
    other.svm_sent(&svm_ack(4002, 3000, 0), 2 * MS, &mut out);
    pacer_ack(&mut other, &mut out);
    assert_eq!(
        out.len(),
        1,
        "an acknowledgement at the edge of a zero window passes"
    );
    out.clear();
    pacer.svm_sent(&svm_ack(4001, 3000, 1), 4 * MS, &mut out);
    assert_eq!(out, vec![data]);
}

#[test]
fn a_segment_waits_at_most_the_bound_and_takes_its_followers_along() {
    let mut pacer = accepted(4003, 1000);
    let mut out = Vec::new();
    let late = client_data(4003, 0, 1448);
    let behind = client_data(4003, 1448, 10);
    pacer.to_svm(late.clone(), 10 * MS, &mut out);
    pacer.to_svm(behind.clone(), 500 * MS, &mut out);
    pacer.tick(10 * MS + MAX_PACE_WAIT - MS, &mut out);
    assert!(out.is_empty());
    // Overdue now, but the last scan was less than `OVERDUE_SCAN` ago.
    pacer.tick(10 * MS + MAX_PACE_WAIT, &mut out);
    assert!(out.is_empty());
    pacer.tick(10 * MS + MAX_PACE_WAIT - MS + super::OVERDUE_SCAN, &mut out);
    assert_eq!(out, vec![late, behind]);
    assert_eq!(pacer.counters().overdue, 2);
    assert!(!pacer.is_pacing());
}

#[test]
fn a_connection_whose_handshake_was_not_seen_is_not_paced() {
    let mut pacer = WindowPacer::new();
    let mut out = Vec::new();
    pacer.svm_sent(&svm_ack(4004, 0, 0), MS, &mut out);
    let data = client_data(4004, 0, 1448);
    pacer.to_svm(data.clone(), MS, &mut out);
    assert_eq!(out, vec![data]);
    assert_eq!(pacer.connections(), 0);
    // Nor is anything that is not TCP.
    out.clear();
    pacer.to_svm(vec![1, 2, 3], MS, &mut out);
    assert_eq!(out, vec![vec![1, 2, 3]]);
}

#[test]
fn a_checkpoint_sends_everything_on_and_forgets_the_edge_not_the_scale() {
    let mut pacer = accepted(4005, 1000);
    let mut out = Vec::new();
    let waiting = client_data(4005, 0, 1448);
    pacer.to_svm(waiting.clone(), 2 * MS, &mut out);
    pacer.checkpoint(&mut out);
    assert_eq!(out, vec![waiting]);
    out.clear();
    // No edge known: the next segment passes.
    let next = client_data(4005, 1448, 1448);
    pacer.to_svm(next.clone(), 3 * MS, &mut out);
    assert_eq!(out, vec![next]);
    out.clear();
    // The SVM advertises 0 * 128: the scale of the handshake still applies (1 * 128 = 128).
    pacer.svm_sent(&svm_ack(4005, 2896, 1), 4 * MS, &mut out);
    let big = client_data(4005, 2896, 129);
    pacer.to_svm(big.clone(), 5 * MS, &mut out);
    assert!(out.is_empty(), "129 bytes do not fit in 128");
    pacer.svm_sent(&svm_ack(4005, 2896, 2), 6 * MS, &mut out);
    assert_eq!(out, vec![big]);
}

#[test]
fn a_connection_the_vm_opened_is_scaled_only_if_the_client_agreed() {
    for (client_scale, expected_room) in [(None, 10usize), (Some(5), 10 << 7)] {
        let mut pacer = WindowPacer::new();
        let mut out = Vec::new();
        // The SVM's SYN offers 7; the client's SYN-ACK carries the option or not.
        pacer.svm_sent(
            &frame(true, 4006, (VM_ISN, 0), SYN, (64240, Some(7)), 0),
            MS,
            &mut out,
        );
        pacer.to_svm(
            frame(
                false,
                4006,
                (CLIENT_ISN, VM_ISN + 1),
                SYN_ACK,
                (500, client_scale),
                0,
            ),
            MS,
            &mut out,
        );
        pacer.svm_sent(&svm_ack(4006, 0, 10), MS, &mut out);
        out.clear();
        let fits = client_data(4006, 0, expected_room);
        let beyond = client_data(4006, expected_room as u32, 1);
        pacer.to_svm(fits.clone(), MS, &mut out);
        pacer.to_svm(beyond, MS, &mut out);
        assert_eq!(out, vec![fits], "client scale {client_scale:?}");
    }
}

#[test]
fn a_connection_whose_svm_syn_ack_was_not_seen_takes_the_vms_scale() {
    // Another connection taught the VM's shift count: 7.
    let mut pacer = accepted(4011, 1000);
    // A checkpoint came between this client's SYN and the SVM's SYN-ACK: the SVM never sent
    // its own. Its first acknowledgement offers 10 units: 1280 bytes.
    assert_first_window(&mut pacer, 4012, Some(10), 1280);
    // A client that offered no scaling: the window is not scaled.
    assert_first_window(&mut pacer, 4013, None, 10);
}

/// A client's SYN offering `client_scale`, then the SVM's first acknowledgement (no SYN-ACK
/// of its own seen) offering 10 window units: `bytes` of data fit, one more byte waits.
fn assert_first_window(pacer: &mut WindowPacer, port: u16, client_scale: Option<u8>, bytes: usize) {
    let mut out = Vec::new();
    pacer.to_svm(
        frame(false, port, (CLIENT_ISN, 0), SYN, (64240, client_scale), 0),
        MS,
        &mut out,
    );
    pacer.svm_sent(&svm_ack(port, 0, 10), MS, &mut out);
    out.clear();
    let fits = client_data(port, 0, bytes);
    pacer.to_svm(fits.clone(), MS, &mut out);
    pacer.to_svm(client_data(port, bytes as u32, 1), MS, &mut out);
    assert_eq!(out, vec![fits], "client scale {client_scale:?}");
}

#[test]
fn a_retransmitted_syn_keeps_what_the_handshake_taught() {
    let mut pacer = accepted(4007, 1000);
    let mut out = Vec::new();
    pacer.to_svm(
        frame(false, 4007, (CLIENT_ISN, 0), SYN, (64240, Some(7)), 0),
        MS,
        &mut out,
    );
    out.clear();
    pacer.to_svm(client_data(4007, 0, 1448), MS, &mut out);
    assert!(out.is_empty(), "still paced by the edge of the SYN-ACK");
    // A new connection on the same addresses (another ISN) starts afresh, sending on what
    // the old one held.
    pacer.to_svm(
        frame(
            false,
            4007,
            (CLIENT_ISN + 99_999, 0),
            SYN,
            (64240, Some(7)),
            0,
        ),
        MS,
        &mut out,
    );
    assert_eq!(out.len(), 2);
}

#[test]
fn past_the_byte_bound_a_connections_segments_go_on_in_order() {
    let mut pacer = accepted(4008, 0);
    let mut out = Vec::new();
    let segment = 60_000;
    let fit = MAX_PACED_BYTES / (segment + 54);
    let frames: Vec<Vec<u8>> = (0..=fit as u32)
        .map(|i| client_data(4008, i * segment as u32, segment))
        .collect();
    for f in &frames {
        pacer.to_svm(f.clone(), MS, &mut out);
    }
    assert_eq!(out, frames, "all of them, in their order");
    assert_eq!(pacer.counters().overflow, frames.len() as u64);
    assert_eq!(pacer.waiting(), (0, 0));
}

#[test]
fn a_closed_connection_is_forgotten_sooner_than_an_idle_one() {
    let mut pacer = accepted(4009, 1000);
    let mut out = Vec::new();
    let mut idle = accepted(4010, 1000);
    pacer.to_svm(
        frame(
            false,
            4009,
            (CLIENT_ISN + 1, VM_ISN + 1),
            FIN_ACK,
            (500, None),
            0,
        ),
        MS,
        &mut out,
    );
    pacer.tick(MS + CLOSED_IDLE, &mut out);
    idle.tick(MS + CLOSED_IDLE, &mut out);
    assert_eq!((pacer.connections(), idle.connections()), (0, 1));
    idle.tick(MS + IDLE + EXPIRY_SCAN, &mut out);
    assert_eq!(idle.connections(), 0);
}

/// What a test run does to a pacer.
#[derive(Debug, Clone)]
enum Op {
    Client { port: u16, offset: u32, len: usize },
    Svm { port: u16, offset: u32, window: u16 },
    Tick { ms: u64 },
    Checkpoint,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u16..3, 0u32..20_000, 0usize..1500).prop_map(|(port, offset, len)| Op::Client { port: 5000 + port, offset, len }),
        2 => (0u16..3, 0u32..20_000, 0u16..100).prop_map(|(port, offset, window)| Op::Svm { port: 5000 + port, offset, window }),
        1 => (0u64..1500).prop_map(|ms| Op::Tick { ms }),
        1 => Just(Op::Checkpoint),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Every client frame reaches the SVM exactly once, and a connection's frames in the
    /// order they came, whatever the SVM advertises and whenever time passes.
    #[test]
    fn no_frame_is_lost_duplicated_or_reordered(ops in proptest::collection::vec(op(), 1..200)) {
        let mut pacer = WindowPacer::new();
        let mut out = Vec::new();
        let mut sent: Vec<Vec<u8>> = Vec::new();
        let mut now = MS;
        for port in 5000..5003 {
            pacer.to_svm(frame(false, port, (CLIENT_ISN, 0), SYN, (64240, Some(7)), 0), now, &mut out);
            pacer.svm_sent(&frame(true, port, (VM_ISN, CLIENT_ISN + 1), SYN_ACK, (2000, Some(7)), 0), now, &mut out);
        }
        sent.extend(out.iter().cloned());
        for op in ops {
            match op {
                Op::Client { port, offset, len } => {
                    let f = client_data(port, offset, len);
                    sent.push(f.clone());
                    pacer.to_svm(f, now, &mut out);
                }
                Op::Svm { port, offset, window } => pacer.svm_sent(&svm_ack(port, offset, window), now, &mut out),
                Op::Tick { ms } => {
                    now += Duration::from_millis(ms);
                    pacer.tick(now, &mut out);
                }
                Op::Checkpoint => pacer.checkpoint(&mut out),
            }
            let (frames, bytes) = pacer.waiting();
            prop_assert!(bytes <= MAX_PACED_BYTES);
            prop_assert_eq!(frames == 0, !pacer.is_pacing());
        }
        pacer.release_all(&mut out);
        prop_assert_eq!(pacer.waiting(), (0, 0));
        // Same multiset, and each connection's subsequence in the order sent.
        let port_of = |f: &Vec<u8>| u16::from_be_bytes([f[34], f[35]]);
        for port in 5000..5003 {
            let sent_of: Vec<&Vec<u8>> = sent.iter().filter(|f| port_of(f) == port).collect();
            let out_of: Vec<&Vec<u8>> = out.iter().filter(|f| port_of(f) == port).collect();
            prop_assert_eq!(sent_of, out_of);
        }
        prop_assert_eq!(sent.len(), out.len());
    }
}
