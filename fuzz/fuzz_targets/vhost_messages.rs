//! Arbitrary bytes as the vhost-user stream QEMU writes to colo-vhost's shim, cut at arbitrary
//! points, through the shim's decoder (`colo_vhost::wire::decode`, the code `recv_message`
//! runs) and every decoded message through the shim's hold/gate policy
//! (`colo_vhost::policy::Policy`) and the trace's line. Checks, besides "never panics":
//! * decoding the whole stream, decoding a buffer the chunks are appended to, and reading
//!   exactly what `decode` asks for (as `recv_message` does) give the same messages and the
//!   same error; `decode` never asks for more than one bounded message (12 + 4,096 bytes) nor
//!   for fewer bytes than it has;
//! * every message's header re-encodes to its 12 bytes, its version is 1, its payload is its
//!   declared size; a refusal names the version found (not 1) or a size over 4,096;
//! * the policy, fed messages with the reply flag as the back-end's and the others as QEMU's,
//!   forwards each of QEMU's messages at most once and never loses one: each is forwarded
//!   at once, or held (only an enable before PROTOCOL_FEATURES is acked, at most `MAX_HELD`)
//!   and then forwarded once, in arrival order, by the SET_FEATURES that acks the bit, or
//!   dropped by one that does not; nothing but its own acknowledgement goes back to QEMU; a
//!   held enable that asked for an acknowledgement gets exactly one and is forwarded without
//!   the request; the log gate is open exactly when LOG_ALL is off or a SET_LOG_BASE reply
//!   came since the last stop or reset.
#![no_main]

use std::collections::HashSet;
use std::time::Duration;

use colo_vhost::TraceEntry;
use colo_vhost::policy::{Disposition, MAX_HELD, Message, Out, Policy};
use colo_vhost::wire::{
    self, Decoded, F_LOG_ALL, F_PROTOCOL_FEATURES, FLAG_NEED_REPLY, FLAG_VERSION_MASK, HEADER_LEN,
    Header, MAX_PAYLOAD, WireError, req,
};
use libfuzzer_sys::fuzz_target;

type Decoding = (Vec<(Header, Vec<u8>)>, Option<WireError>);

/// One `decode` answer on `buf`, checked and owned.
enum Step {
    Message(Header, Vec<u8>),
    Needs(usize),
    Failed(WireError),
}

fn step(buf: &[u8]) -> Step {
    let word = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().unwrap());
    match wire::decode(buf) {
        Ok(Decoded::Message { header, payload }) => {
            assert_eq!(header.flags & FLAG_VERSION_MASK, 1);
            assert!(header.size as usize <= MAX_PAYLOAD);
            assert_eq!(payload.len(), header.size as usize);
            assert_eq!(header.encode()[..], buf[..HEADER_LEN]);
            assert_eq!(payload, &buf[HEADER_LEN..HEADER_LEN + payload.len()]);
            Step::Message(header, payload.to_vec())
        }
        Ok(Decoded::Incomplete { needed }) => {
            assert!(
                needed > buf.len(),
                "asked for {needed} with {} there",
                buf.len()
            );
            assert!(needed <= HEADER_LEN + MAX_PAYLOAD);
            Step::Needs(needed)
        }
        Err(e) => {
            match e {
                WireError::BadVersion(v) => {
                    assert_ne!(v, 1);
                    assert_eq!(v, word(4) & FLAG_VERSION_MASK);
                }
                WireError::TooLarge(s) => {
                    assert!(s as usize > MAX_PAYLOAD);
                    assert_eq!(s, word(8));
                    assert_eq!(word(4) & FLAG_VERSION_MASK, 1);
                }
            }
            Step::Failed(e)
        }
    }
}

fn whole(data: &[u8]) -> Decoding {
    let mut msgs = Vec::new();
    let mut at = 0;
    loop {
        match step(&data[at..]) {
            Step::Message(h, p) => {
                at += HEADER_LEN + p.len();
                msgs.push((h, p));
            }
            Step::Needs(_) => return (msgs, None),
            Step::Failed(e) => return (msgs, Some(e)),
        }
    }
}

/// A reader that appends each chunk to a buffer and decodes what it can.
fn buffered(data: &[u8], cuts: &[usize]) -> Decoding {
    let mut msgs = Vec::new();
    let mut buf = Vec::new();
    let mut prev = 0;
    for &end in cuts.iter().chain(std::iter::once(&data.len())) {
        buf.extend_from_slice(&data[prev..end]);
        prev = end;
        loop {
            match step(&buf) {
                Step::Message(h, p) => {
                    buf.drain(..HEADER_LEN + p.len());
                    msgs.push((h, p));
                }
                Step::Needs(_) => break,
                Step::Failed(e) => return (msgs, Some(e)),
            }
        }
    }
    (msgs, None)
}

/// `recv_message`'s way: read exactly what `decode` asks for, a message at a time.
fn asked(data: &[u8]) -> Decoding {
    let mut msgs = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut at = 0;
    loop {
        match step(&buf) {
            Step::Message(h, p) => {
                msgs.push((h, p));
                buf.clear();
            }
            Step::Needs(needed) => {
                let more = needed - buf.len();
                if data.len() - at < more {
                    return (msgs, None);
                }
                buf.extend_from_slice(&data[at..at + more]);
                at += more;
            }
            Step::Failed(e) => return (msgs, Some(e)),
        }
    }
}

/// What became of one of QEMU's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Forwarded,
    Held,
    Dropped,
}

/// Feeds the messages to the policy and checks it against a model of its rules.
fn policy(msgs: &[(Header, Vec<u8>)]) {
    let mut p = Policy::<usize>::new();
    // The model.
    let mut acked = false;
    let mut log_all = false;
    let mut fresh = false;
    let mut held: Vec<(usize, bool)> = Vec::new();
    let mut fates: Vec<Fate> = Vec::new();
    let mut forwarded = HashSet::new();

    for (header, payload) in msgs {
        let _ = TraceEntry::of(header, payload, 0, Duration::ZERO).line();
        if header.is_reply() {
            let msg = Message {
                header: *header,
                payload: payload.clone(),
                fds: Vec::new(),
            };
            let changed = p.on_backend(&msg);
            let opens = header.request == req::SET_LOG_BASE;
            assert_eq!(changed, opens);
            fresh |= opens;
            assert_eq!(p.gate_open(), !log_all || fresh);
            continue;
        }
        // The message's id rides where the shim's file descriptors would.
        let id = fates.len();
        fates.push(Fate::Forwarded);
        let msg = Message {
            header: *header,
            payload: payload.clone(),
            fds: vec![id],
        };
        let (disposition, outs) = p.on_frontend(msg);

        let mut expect_held_out = Vec::new();
        let expect_disposition =
            if header.request == req::SET_VRING_ENABLE && !acked && held.len() < MAX_HELD {
                held.push((id, header.needs_reply()));
                fates[id] = Fate::Held;
                Disposition::Held
            } else {
                match header.request {
                    req::SET_FEATURES => {
                        if let Some(features) = wire::payload_u64(payload) {
                            acked = features & F_PROTOCOL_FEATURES != 0;
                            log_all = features & F_LOG_ALL != 0;
                        }
                        for (held_id, need_reply) in held.drain(..) {
                            if acked {
                                expect_held_out.push((held_id, need_reply));
                                fates[held_id] = Fate::Forwarded;
                            } else {
                                fates[held_id] = Fate::Dropped;
                            }
                        }
                    }
                    req::RESET_OWNER | req::RESET_DEVICE => {
                        acked = false;
                        log_all = false;
                        fresh = false;
                    }
                    req::GET_VRING_BASE => fresh = false,
                    _ => {}
                }
                Disposition::Forwarded
            };
        assert_eq!(disposition, expect_disposition);

        let mut to_backend = Vec::new();
        let mut acks = 0;
        for out in outs {
            match out {
                Out::ToBackend(m) => {
                    assert_eq!(
                        m.fds.len(),
                        1,
                        "a message the shim made went to the back-end"
                    );
                    let fid = m.fds[0];
                    assert!(forwarded.insert(fid), "message {fid} forwarded twice");
                    assert_eq!(m.header.size as usize, m.payload.len());
                    to_backend.push((fid, m.header.flags));
                }
                Out::ToFrontend(m) => {
                    assert!(m.fds.is_empty());
                    assert!(m.header.is_reply());
                    assert_eq!(m.header.request, req::SET_VRING_ENABLE);
                    assert_eq!(wire::payload_u64(&m.payload), Some(0));
                    acks += 1;
                }
            }
        }
        match disposition {
            Disposition::Held => {
                assert!(to_backend.is_empty());
                assert_eq!(acks, usize::from(header.needs_reply()));
            }
            Disposition::Forwarded => {
                assert_eq!(acks, 0);
                // The message itself first, unchanged, then the held ones in arrival order,
                // without the acknowledgement request the shim already answered.
                assert_eq!(to_backend.first(), Some(&(id, header.flags)));
                let rest: Vec<usize> = to_backend[1..].iter().map(|&(fid, _)| fid).collect();
                let expect: Vec<usize> = expect_held_out.iter().map(|&(fid, _)| fid).collect();
                assert_eq!(rest, expect);
                for &(_, flags) in &to_backend[1..] {
                    assert_eq!(flags & FLAG_NEED_REPLY, 0);
                }
            }
        }
        assert_eq!(p.held(), held.len());
        assert!(p.held() <= MAX_HELD);
        assert_eq!(p.protocol_features_acked(), acked);
        assert_eq!(p.gate_open(), !log_all || fresh);
    }
    // Nothing lost: every message of QEMU's is forwarded (once), held now, or was dropped by a
    // SET_FEATURES without PROTOCOL_FEATURES.
    for (id, fate) in fates.iter().enumerate() {
        match fate {
            Fate::Forwarded => assert!(forwarded.contains(&id), "message {id} lost"),
            Fate::Held | Fate::Dropped => assert!(!forwarded.contains(&id)),
        }
    }
    assert_eq!(fates.iter().filter(|f| **f == Fate::Held).count(), p.held());
}

fuzz_target!(|input: &[u8]| {
    // Layout: [k][k little-endian u16 cut points][stream bytes].
    let Some((&k, rest)) = input.split_first() else {
        return;
    };
    let k = usize::from(k % 16);
    if rest.len() < 2 * k {
        return;
    }
    let (cuts_raw, data) = rest.split_at(2 * k);
    let mut cuts: Vec<usize> = cuts_raw
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (data.len() + 1))
        .collect();
    cuts.sort_unstable();

    let expect = whole(data);
    assert_eq!(buffered(data, &cuts), expect);
    assert_eq!(asked(data), expect);
    policy(&expect.0);
});
