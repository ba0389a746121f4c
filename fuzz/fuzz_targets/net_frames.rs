//! Arbitrary bytes, cut at arbitrary points, through colo-proxyd's packet path: the
//! net-filter frame decoder, the Ethernet/IP/TCP parser and the stream comparator. Checks,
//! besides "never panics":
//! * chunked decoding gives exactly the frames and the error of decoding the whole stream at
//!   once, through `feed` as through the daemon's zero-copy reads (`read_with`,
//!   `next_frame_bytes`), and every frame re-encodes to the bytes it came from;
//! * every frame respects the limits (69,632 bytes, vnet header inside the frame);
//! * the comparison engine (even frames fed as the PVM's output, odd ones as the SVM's; TCP,
//!   UDP, ICMP and uncompared traffic alike) never loses a PVM packet: released plus handed
//!   back by `reset` is every packet given to it, each exactly once, but for SYN-ACKs without
//!   data that the PVM superseded (discarded);
//! * every frame goes through the packet parser on its own as well, and through the
//!   secondary's sequence rewriting: a rewritten frame still parses, any other is untouched;
//! * the secondary's window pacer (even frames as the client's into the SVM, odd ones as the
//!   SVM's own) lets every client frame into the SVM exactly once, whatever the SVM
//!   advertised.
#![no_main]

use bytes::{BufMut, Bytes};
use colo_proxyd::codec::{CodecError, Frame, FrameDecoder, MAX_FRAME_LEN, encode};
use colo_proxyd::compare::{Action, ComparatorLimits, PacketId};
use colo_proxyd::daemon::svm_window::WindowPacer;
use colo_proxyd::engine::{ComparisonEngine, EngineConfig};
use colo_proxyd::packet::{IpPacket, Network, Transport, parse_ethernet};
use colo_proxyd::rewrite::{ChecksumState, Rewrite, RewriteTable};
use libfuzzer_sys::fuzz_target;
use std::time::Duration;

fn is_bare_syn_ack(frame: &[u8]) -> bool {
    let Ok(parsed) = parse_ethernet(frame) else {
        return false;
    };
    match parsed.network {
        Network::Ip(IpPacket {
            transport: Transport::Tcp(tcp),
            ..
        }) => tcp.flags.syn && tcp.flags.ack && tcp.payload.is_empty(),
        _ => false,
    }
}

fn decode_all(decoder: &mut FrameDecoder, frames: &mut Vec<Frame>) -> Option<CodecError> {
    loop {
        match decoder.next_frame() {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => return None,
            Err(error) => return Some(error),
        }
    }
}

/// The sorted cut points of `raw` (little-endian u16s) in a stream of `len` bytes, ending
/// with `len` itself.
fn cuts_of(raw: &[u8], len: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = raw
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (len + 1))
        .collect();
    cuts.sort_unstable();
    cuts.push(len);
    cuts
}

fuzz_target!(|input: &[u8]| {
    // Layout: [flags: bit 0 = vnet_hdr_support][k][k little-endian u16 cut points][stream].
    let [flags, k, rest @ ..] = input else {
        return;
    };
    let vnet = flags & 1 != 0;
    let k = usize::from(k % 16);
    if rest.len() < 2 * k {
        return;
    }
    let (cuts_raw, stream) = rest.split_at(2 * k);
    let cuts = cuts_of(cuts_raw, stream.len());

    let mut whole = FrameDecoder::new(vnet);
    whole.feed(stream);
    let mut expected = Vec::new();
    let expected_error = decode_all(&mut whole, &mut expected);

    let mut chunked = FrameDecoder::new(vnet);
    let mut frames = Vec::new();
    let mut error = None;
    let mut previous = 0;
    for end in cuts.iter().copied() {
        chunked.feed(&stream[previous..end]);
        previous = end;
        error = decode_all(&mut chunked, &mut frames);
        if error.is_some() {
            break;
        }
    }
    assert_eq!(frames, expected);
    assert_eq!(error, expected_error);

    // The daemon's path: the socket read straight into the decoder's buffer at the same cuts,
    // frames split off it as shared Ethernet bytes. Same frames, same error.
    let mut zero_copy = FrameDecoder::new(vnet);
    let mut shared: Vec<Bytes> = Vec::new();
    let mut shared_error = None;
    let mut previous = 0;
    'reads: for end in cuts_of(cuts_raw, stream.len()) {
        let mut chunk = &stream[previous..end];
        previous = end;
        while !chunk.is_empty() {
            let taken = zero_copy.read_with(|space| {
                let n = chunk.len().min(space.remaining_mut());
                space.put_slice(&chunk[..n]);
                n
            });
            chunk = &chunk[taken..];
            loop {
                match zero_copy.next_frame_bytes() {
                    Ok(Some(frame)) => shared.push(frame),
                    Ok(None) => break,
                    Err(e) => {
                        shared_error = Some(e);
                        break 'reads;
                    }
                }
            }
            if taken == 0 {
                break;
            }
        }
    }
    let expected_ethernet: Vec<&[u8]> = expected.iter().map(Frame::ethernet_bytes).collect();
    let shared_ethernet: Vec<&[u8]> = shared.iter().map(|b| &b[..]).collect();
    assert_eq!(shared_ethernet, expected_ethernet);
    assert_eq!(shared_error, expected_error);

    let mut wire = Vec::new();
    for frame in &frames {
        assert!(frame.data.len() <= MAX_FRAME_LEN);
        assert!(frame.vnet_hdr_len as usize <= frame.data.len());
        encode(frame, vnet, &mut wire).expect("a decoded frame re-encodes");
        let _ = parse_ethernet(frame.ethernet_bytes());
    }
    assert_eq!(&stream[..wire.len()], &wire[..]);

    // The comparison, with a table as large as the input can fill, then with a table of two
    // flows (evictions, a full table) and a checkpoint every eight frames, then with frames
    // far enough apart that flows are forgotten and opened again within an epoch: every PVM
    // packet is settled exactly once, by an action or by a checkpoint.
    let limits = EngineConfig {
        max_total_buffered_bytes: 8192,
        per_connection: ComparatorLimits {
            max_buffered_bytes: 4096,
        },
        ..EngineConfig::default()
    };
    let (mut out, pushed) = compare(&frames, limits.clone(), FRAMES_APART, None);
    let small_table = EngineConfig {
        max_flows: 2,
        ..limits
    };
    for (apart, checkpoint_every) in [(FRAMES_APART, 8), (Duration::from_millis(600), 16)] {
        let (mut small_out, _) =
            compare(&frames, small_table.clone(), apart, Some(checkpoint_every));
        small_out.sort_unstable();
        assert_eq!(small_out, pushed);
    }

    // The secondary's rewriting: even frames as the client's into the SVM, odd ones as the
    // SVM's own. A frame it accepts must still parse, and one it leaves alone must be intact.
    let mut table = RewriteTable::new();
    for (index, frame) in frames.iter().enumerate() {
        let mut bytes = frame.ethernet_bytes().to_vec();
        let checksum = ChecksumState::from_vnet_header(frame.vnet_header());
        let result = if index % 2 == 0 {
            table.into_svm(&mut bytes, checksum)
        } else {
            table.out_of_svm(&mut bytes, checksum)
        };
        match result {
            Ok(Rewrite::Rewritten) => assert!(parse_ethernet(&bytes).is_ok()),
            Ok(Rewrite::Unchanged | Rewrite::WaitForSvmSyn) | Err(_) => {
                assert_eq!(bytes, frame.ethernet_bytes())
            }
        }
    }
    table.reset();

    let mut pacer = WindowPacer::new();
    let mut into_svm = Vec::new();
    let mut given = Vec::new();
    for (index, frame) in frames.iter().enumerate() {
        let now = Duration::from_millis(index as u64 * 300);
        let bytes = frame.ethernet_bytes().to_vec();
        if index % 2 == 0 {
            given.push(bytes.clone());
            pacer.to_svm(bytes, now, &mut into_svm);
        } else {
            pacer.svm_sent(&bytes, now, &mut into_svm);
        }
        pacer.tick(now, &mut into_svm);
    }
    pacer.release_all(&mut into_svm);
    assert_eq!(pacer.waiting(), (0, 0));
    given.sort_unstable();
    into_svm.sort_unstable();
    assert_eq!(into_svm, given);

    out.sort_unstable();
    assert_eq!(out, pushed);
});

/// The time between two frames given to the comparison engine, unless a run says otherwise.
const FRAMES_APART: Duration = Duration::from_millis(50);

/// Runs `frames` through a comparison engine (even ones as the PVM's, odd ones as the SVM's,
/// `apart` from each other), with a checkpoint every `checkpoint_every` frames and one at the
/// end; returns the packets settled (by an action or a checkpoint, in that order) and the
/// packets pushed. Asserts that a packet is dropped only as a bare SYN-ACK the PVM superseded.
fn compare(
    frames: &[Frame],
    config: EngineConfig,
    apart: Duration,
    checkpoint_every: Option<usize>,
) -> (Vec<PacketId>, Vec<PacketId>) {
    let mut engine = ComparisonEngine::new(config);
    let mut actions = Vec::new();
    let mut pushed = Vec::new();
    let mut settled_by_checkpoints = Vec::new();
    for (index, frame) in frames.iter().enumerate() {
        let now = apart * index as u32;
        if index % 2 == 0 {
            let id = PacketId(index as u64);
            pushed.push(id);
            let packet = Bytes::copy_from_slice(frame.ethernet_bytes());
            engine.push_pvm(id, &packet, now, &mut actions);
        } else {
            engine.push_svm(frame.ethernet_bytes(), &mut actions);
        }
        engine.check_hold_time(now, &mut actions);
        if checkpoint_every.is_some_and(|every| index % every == every - 1) {
            settled_by_checkpoints.extend(engine.reset());
        }
    }
    for action in &actions {
        if let Action::Discard(PacketId(index)) = action {
            let frame = frames[*index as usize].ethernet_bytes();
            assert!(
                is_bare_syn_ack(frame),
                "discarded packet {index}, no bare SYN-ACK: {:?}",
                parse_ethernet(frame)
            );
        }
    }
    settled_by_checkpoints.extend(engine.reset());
    assert_eq!(engine.held_packets(), 0);
    let mut settled: Vec<PacketId> = actions.iter().filter_map(Action::settled).collect();
    settled.extend(settled_by_checkpoints);
    (settled, pushed)
}
