//! Arbitrary bytes, cut at arbitrary points, into colo-proxyd's link decoder
//! (`colo_proxyd::daemon::link::LinkDecoder`), once as the primary's end and once as the
//! secondary's. A filler of zero bytes, described by five input bytes, lets short inputs carry
//! frames of any size. Checks, besides "never panics":
//! * chunked decoding gives exactly the messages, the error and the end-of-stream verdict
//!   (`finish`) of decoding the whole stream at once; a failed decoder keeps returning its
//!   error, whatever it is fed later;
//! * the messages are a hello from the peer's role in this version, then only frames of the
//!   peer's direction; `greeted()` says whether a message came; heartbeats (`03 00 00 00 00`)
//!   after the hello are consumed and counted (`heartbeats()`), never returned;
//! * every message re-encodes (`encode`) to the bytes it came from (a hello with bytes after
//!   its 7-byte payload, which the decoder accepts, to the same hello without them), and the
//!   re-encoded messages decode to the same messages with nothing left over;
//! * an error is where the last message ended, and says what is there.
#![no_main]

use colo_proxyd::codec::MAX_FRAME_LEN;
use colo_proxyd::daemon::link::{
    LINK_MAGIC, LINK_VERSION, LinkDecoder, LinkError, LinkMessage, MAX_PAYLOAD_LEN, encode,
};
use colo_types::Role;
use libfuzzer_sys::fuzz_target;

struct Outcome {
    messages: Vec<LinkMessage>,
    heartbeats: u64,
    error: Option<LinkError>,
    finish: Result<(), LinkError>,
}

/// Decodes `stream` as the `local` end, fed in pieces ending at `cuts` (the last is
/// `stream.len()`).
fn decode(local: Role, stream: &[u8], cuts: &[usize]) -> Outcome {
    let mut decoder = LinkDecoder::new(local);
    let mut messages = Vec::new();
    let mut error = None;
    let mut previous = 0;
    'feed: for &end in cuts {
        decoder.feed(&stream[previous..end]);
        previous = end;
        loop {
            match decoder.next_message() {
                Ok(Some(message)) => messages.push(message),
                Ok(None) => break,
                Err(e) => {
                    error = Some(e);
                    break 'feed;
                }
            }
        }
    }
    assert_eq!(decoder.greeted(), !messages.is_empty());
    if let Some(e) = &error {
        // A failed decoder stays failed.
        assert_eq!(decoder.next_message().as_ref(), Err(e));
        decoder.feed(&stream[previous..]);
        decoder.feed(&[0, 0, 0, 0, 0]);
        assert_eq!(decoder.next_message().as_ref(), Err(e));
        assert_eq!(decoder.finish().as_ref(), Err(e));
    }
    let finish = decoder.finish();
    Outcome {
        messages,
        heartbeats: decoder.heartbeats(),
        error,
        finish,
    }
}

fn be32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes[..4].try_into().unwrap())
}

/// Past the complete heartbeats at `at` (counted in `beats`).
fn skip_heartbeats(stream: &[u8], mut at: usize, beats: &mut u64) -> usize {
    while stream.len() - at >= 5 && stream[at] == 3 && be32(&stream[at + 1..]) == 0 {
        at += 5;
        *beats += 1;
    }
    at
}

fn check(local: Role, stream: &[u8], cuts: &[usize]) {
    let whole = decode(local, stream, &[stream.len()]);
    let chunked = decode(local, stream, cuts);
    assert_eq!(chunked.messages, whole.messages);
    assert_eq!(chunked.heartbeats, whole.heartbeats);
    assert_eq!(chunked.error, whole.error);
    assert_eq!(chunked.finish, whole.finish);
    let peer = local.other();

    // Each message re-encodes to its bytes; `at` walks the stream, over the heartbeats
    // between messages after the hello.
    let mut at = 0;
    let mut beats = 0;
    let mut rewire = Vec::new();
    for (i, message) in whole.messages.iter().enumerate() {
        if i > 0 {
            at = skip_heartbeats(stream, at, &mut beats);
        }
        match message {
            LinkMessage::Hello { version, role } => {
                assert_eq!(i, 0);
                assert_eq!((*version, *role), (LINK_VERSION, peer));
            }
            LinkMessage::Inbound(_) => assert!(i > 0 && peer == Role::Primary),
            LinkMessage::SvmOutput { .. } => assert!(i > 0 && peer == Role::Secondary),
        }
        let total = 5 + be32(&stream[at + 1..]) as usize;
        let mut wire = Vec::new();
        if let Err(e) = encode(message, &mut wire) {
            panic!(
                "a decoded {}-byte message does not re-encode: {e}",
                total - 5
            );
        }
        if matches!(message, LinkMessage::Hello { .. }) && total > wire.len() {
            // The decoder ignores bytes after a hello's 7; the encoder writes none.
            assert_eq!(wire[..5], [0, 0, 0, 0, 7]);
            assert_eq!(wire[5..], stream[at + 5..at + 12]);
        } else {
            assert_eq!(wire[..], stream[at..at + total]);
        }
        rewire.extend_from_slice(&wire);
        at += total;
    }
    if !whole.messages.is_empty() {
        at = skip_heartbeats(stream, at, &mut beats);
    }
    assert_eq!(beats, whole.heartbeats);
    let again = decode(local, &rewire, &[rewire.len()]);
    assert_eq!(again.messages, whole.messages);
    assert_eq!(again.error, None);
    assert_eq!(again.finish, Ok(()));

    // The error is where the last message ended.
    let left = &stream[at..];
    let Some(error) = whole.error else {
        match whole.finish {
            Ok(()) => assert!(left.is_empty()),
            Err(LinkError::Truncated { buffered }) => {
                assert!(buffered > 0);
                assert_eq!(buffered, left.len());
            }
            Err(other) => panic!("finish failed with {other:?}"),
        }
        return;
    };
    assert_eq!(whole.finish.as_ref(), Err(&error));
    let kind = left[0];
    let len = be32(&left[1..]) as usize;
    match error {
        LinkError::UnknownType(k) => assert!(k == kind && k > 3),
        LinkError::Oversized { len: l } => {
            // An inbound frame has no epoch, so its limit is the frame limit.
            assert_eq!(l as usize, len);
            assert!(len > MAX_PAYLOAD_LEN || (kind == 1 && len > MAX_FRAME_LEN));
        }
        LinkError::TooShort { kind: k, len: l } => {
            assert_eq!((k, l), (kind, len));
            assert!((kind == 0 && len < 7) || (kind == 2 && len < 8));
        }
        LinkError::BadMagic(magic) => {
            assert_eq!(kind, 0);
            assert_eq!(magic, left[5..9]);
            assert_ne!(magic, LINK_MAGIC);
        }
        LinkError::Version { theirs } => {
            assert_eq!(kind, 0);
            assert_eq!(theirs.to_be_bytes(), left[9..11]);
            assert_ne!(theirs, LINK_VERSION);
        }
        LinkError::BadRole(role) => {
            assert_eq!(kind, 0);
            assert_eq!(role, left[11]);
            assert!(role != 1 && role != 2);
        }
        LinkError::SameRole { theirs } => {
            assert!(kind == 0 && whole.messages.is_empty());
            assert_eq!(theirs, local);
        }
        LinkError::OutOfOrder { .. } => assert_eq!(kind == 0, !whole.messages.is_empty()),
        LinkError::HeartbeatPayload { len: l } => {
            assert!(kind == 3 && !whole.messages.is_empty());
            assert_eq!(l as usize, len);
            assert!(len > 0);
        }
        LinkError::WrongDirection { from, .. } => {
            assert_eq!(from, peer);
            // Inbound (1) comes only from the primary, svm-output (2) only from the secondary.
            assert_eq!(kind, if peer == Role::Primary { 2 } else { 1 });
        }
        LinkError::Truncated { .. } => panic!("next_message reported a truncation"),
    }
}

fuzz_target!(|input: &[u8]| {
    // Layout: [b][k little-endian u16 cut points][filler: u16 LE position, u24 LE length,
    // only when b & 0x10][stream]. k = b & 0x0f. The filler inserts (length mod 2^17) zero bytes
    // into the stream at the position (scaled to the stream), so a few input bytes reach
    // frames of any size, up to and past the 69,640-byte limit. The stream is decoded as each end.
    let Some((&b, rest)) = input.split_first() else {
        return;
    };
    let k = usize::from(b & 0x0f);
    if rest.len() < 2 * k {
        return;
    }
    let (cuts_raw, rest) = rest.split_at(2 * k);
    let stream: std::borrow::Cow<'_, [u8]> = if b & 0x10 != 0 {
        let Some((filler, rest)) = rest.split_first_chunk::<5>() else {
            return;
        };
        let at = usize::from(u16::from_le_bytes([filler[0], filler[1]])) * (rest.len() + 1) / 65536;
        let len = (u32::from_le_bytes([filler[2], filler[3], filler[4], 0]) & 0x1_ffff) as usize;
        let mut stream = Vec::with_capacity(rest.len() + len);
        stream.extend_from_slice(&rest[..at]);
        stream.resize(at + len, 0);
        stream.extend_from_slice(&rest[at..]);
        stream.into()
    } else {
        rest.into()
    };
    // The cuts scale to the stream, so the 16-bit points reach into long (large-frame) ones.
    let mut cuts: Vec<usize> = cuts_raw
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) * (stream.len() + 1) / 65536)
        .collect();
    cuts.sort_unstable();
    cuts.push(stream.len());
    for local in [Role::Primary, Role::Secondary] {
        check(local, &stream, &cuts);
    }
});
