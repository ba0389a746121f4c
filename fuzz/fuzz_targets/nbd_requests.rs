//! Arbitrary bytes as the transmission phase of an NBD client talking to colo-blockd: the
//! request stream, cut at arbitrary points, through `colo_blockd::proto::RequestDecoder` (as
//! the server's `FramedRead` drives it: `decode` after every chunk, `decode_eof` at the end),
//! and every request through `validate` against export limits taken from the input. Checks,
//! besides "never panics":
//! * chunked decoding gives exactly the requests and the error of decoding the whole stream;
//! * every request re-encodes (`RequestHeader::encode`) to the 28 bytes it came from, its
//!   payload is the `length` bytes after them for a write and empty otherwise, and the
//!   requests cover the stream from its start; `RequestHeader::parse` of the encoding gives
//!   the header back;
//! * an error is where the last request ended, and says what is there: a bad magic (the
//!   magic found), a write longer than the decoder's maximum (its handle and length), or a
//!   stream ending inside a request;
//! * `validate` accepts a request exactly when it breaks none of the export's rules (known
//!   command, flags the command allows, `FLUSH` without a range, no modification of a
//!   read-only export, reads and writes within the maximum block size, the range inside the
//!   export), and a refusal carries the errno of one of the rules it breaks; an accepted
//!   request keeps its offset, length and flags.
#![no_main]

use bytes::BytesMut;
use colo_blockd::proto::consts::{REQUEST_MAGIC, cmd, cmd_flags};
use colo_blockd::proto::request::{REQUEST_HEADER_LEN, validate};
use colo_blockd::proto::{
    Command, ExportLimits, NbdErrno, ProtoError, RawRequest, Reply, ReplyStyle, RequestDecoder,
    RequestHeader, ZeroMode,
};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

/// The largest maximum block size the target uses (colo-blockd advertises 32 MiB); the
/// decoder reserves room for a whole write payload, so larger ones would only slow it.
const MAX_BLOCK: u32 = 32 * 1024 * 1024;

/// Decodes `stream` fed in pieces ending at `cuts` (the last is `stream.len()`).
fn decode(
    stream: &[u8],
    cuts: &[usize],
    max_payload: u32,
) -> (Vec<RawRequest>, Option<ProtoError>) {
    let mut decoder = RequestDecoder::new(max_payload);
    let mut buf = BytesMut::new();
    let mut requests = Vec::new();
    let mut previous = 0;
    for &end in cuts {
        buf.extend_from_slice(&stream[previous..end]);
        previous = end;
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(request)) => requests.push(request),
                Ok(None) => break,
                Err(error) => return (requests, Some(error)),
            }
        }
    }
    loop {
        match decoder.decode_eof(&mut buf) {
            Ok(Some(request)) => requests.push(request),
            Ok(None) => return (requests, None),
            Err(error) => return (requests, Some(error)),
        }
    }
}

/// The errnos of the rules `h` breaks, read from the specification independently of
/// `validate`; `None` for `NBD_CMD_DISC` (always accepted).
fn broken_rules(h: &RequestHeader, limits: &ExportLimits) -> Option<Vec<NbdErrno>> {
    let allowed = match h.command {
        cmd::DISC => return None,
        cmd::READ | cmd::FLUSH => 0,
        cmd::WRITE | cmd::TRIM => cmd_flags::FUA,
        cmd::WRITE_ZEROES => cmd_flags::FUA | cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO,
        _ => return Some(vec![NbdErrno::Inval]),
    };
    let mut broken = Vec::new();
    if h.flags & !allowed != 0 {
        broken.push(NbdErrno::Inval);
    }
    if h.command == cmd::FLUSH {
        if h.offset != 0 || h.length != 0 {
            broken.push(NbdErrno::Inval);
        }
        return Some(broken);
    }
    if h.command != cmd::READ && limits.read_only {
        broken.push(NbdErrno::Perm);
    }
    if matches!(h.command, cmd::READ | cmd::WRITE) && h.length > limits.max_length {
        broken.push(NbdErrno::Inval);
    }
    let in_range = h
        .offset
        .checked_add(u64::from(h.length))
        .is_some_and(|end| end <= limits.size);
    if !in_range {
        broken.push(if matches!(h.command, cmd::WRITE | cmd::WRITE_ZEROES) {
            NbdErrno::NoSpc
        } else {
            NbdErrno::Inval
        });
    }
    Some(broken)
}

fn check_validate(request: &RawRequest, limits: &ExportLimits) {
    let h = &request.header;
    let result = validate(h, limits);
    let fua = h.flags & cmd_flags::FUA != 0;
    match broken_rules(h, limits) {
        None => assert_eq!(result, Ok(Command::Disconnect)),
        Some(broken) if broken.is_empty() => {
            let command = result.unwrap_or_else(|e| panic!("{h:?} refused with {e}"));
            let (offset, length) = (h.offset, h.length);
            let expected = match h.command {
                cmd::READ => Command::Read { offset, length },
                cmd::WRITE => Command::Write { offset, fua },
                cmd::FLUSH => Command::Flush,
                cmd::TRIM => Command::Trim {
                    offset,
                    length,
                    fua,
                },
                _ => Command::WriteZeroes {
                    offset,
                    length,
                    fua,
                    mode: ZeroMode {
                        may_trim: h.flags & cmd_flags::NO_HOLE == 0,
                        fast_only: h.flags & cmd_flags::FAST_ZERO != 0,
                    },
                },
            };
            assert_eq!(command, expected);
            if h.command == cmd::WRITE {
                assert_eq!(request.payload.len(), length as usize);
            }
        }
        Some(broken) => {
            let errno = result.expect_err("a request breaking a rule was accepted");
            assert!(
                broken.contains(&errno),
                "{h:?}: {errno} is none of {broken:?}"
            );
            assert_eq!(NbdErrno::from_code(errno.code()), Some(errno));
            // The answer the server sends, in either style.
            let simple = Reply::error(ReplyStyle::Simple, h.handle, errno, "refused");
            assert_eq!(simple.head.len(), 16);
            assert_eq!(simple.head[4..8], errno.code().to_be_bytes());
            assert_eq!(simple.head[8..16], h.handle.to_be_bytes());
            let structured = Reply::error(ReplyStyle::Structured, h.handle, errno, "refused");
            assert_eq!(structured.head.len(), 20 + 6 + "refused".len());
            assert_eq!(structured.head[8..16], h.handle.to_be_bytes());
        }
    }
}

fuzz_target!(|input: &[u8]| {
    // Layout: [flags: bit 0 = read-only][export size: u64 LE][maximum block size: u32 LE]
    //         [k][k little-endian u16 cut points][request stream].
    let Some((head, rest)) = input.split_first_chunk::<14>() else {
        return;
    };
    let read_only = head[0] & 1 != 0;
    let size = u64::from_le_bytes(head[1..9].try_into().unwrap());
    let max_length = u32::from_le_bytes(head[9..13].try_into().unwrap()) % (MAX_BLOCK + 1);
    let limits = ExportLimits {
        size,
        max_length,
        read_only,
    };
    let k = usize::from(head[13] % 16);
    if rest.len() < 2 * k {
        return;
    }
    let (cuts_raw, stream) = rest.split_at(2 * k);
    let mut cuts: Vec<usize> = cuts_raw
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (stream.len() + 1))
        .collect();
    cuts.sort_unstable();
    cuts.push(stream.len());

    // The server gives the decoder the export's maximum block size, as `validate` gets it.
    let (expected, expected_error) = decode(stream, &[stream.len()], max_length);
    let (requests, error) = decode(stream, &cuts, max_length);
    assert_eq!(requests, expected);
    assert_eq!(error, expected_error);

    // The requests cover the stream from its start, each as it was sent.
    let mut at = 0;
    for request in &requests {
        let h = request.header;
        let wire = h.encode();
        assert_eq!(stream[at..at + REQUEST_HEADER_LEN], wire);
        assert_eq!(RequestHeader::parse(&wire), Ok(h));
        assert_eq!(RequestHeader::parse(&stream[at..]), Ok(h));
        at += REQUEST_HEADER_LEN;
        if h.has_payload() {
            assert_eq!(h.command, cmd::WRITE);
            assert!(h.length <= max_length);
            let end = at + h.length as usize;
            assert_eq!(request.payload[..], stream[at..end]);
            at = end;
        } else {
            assert!(request.payload.is_empty());
        }
        check_validate(request, &limits);
    }

    // The error is where the last request ended.
    let left = &stream[at..];
    match error {
        None => assert!(left.is_empty()),
        Some(ProtoError::BadMagic { expected, found }) => {
            assert!(left.len() >= REQUEST_HEADER_LEN);
            assert_eq!(expected, u64::from(REQUEST_MAGIC));
            assert_eq!(found.to_be_bytes()[4..], left[..4]);
            assert_ne!(found, expected);
        }
        Some(ProtoError::PayloadTooLarge { handle, length }) => {
            let h = RequestHeader::parse(left).expect("a too-large write has a valid header");
            assert_eq!(h.command, cmd::WRITE);
            assert_eq!((h.handle, h.length), (handle, length));
            assert!(length > max_length);
        }
        Some(ProtoError::Truncated { need, have }) => {
            assert!(!left.is_empty());
            assert!(have < need);
            match RequestHeader::parse(left) {
                // Inside a write's payload: the header was taken, the payload was not.
                Ok(h) => {
                    assert!(h.has_payload());
                    assert!(left.len() < REQUEST_HEADER_LEN + h.length as usize);
                    assert_eq!(have, left.len() - REQUEST_HEADER_LEN);
                }
                Err(_) => {
                    assert!(left.len() < REQUEST_HEADER_LEN);
                    assert_eq!(have, left.len());
                }
            }
        }
        Some(other) => panic!("unexpected decoder error {other:?}"),
    }

    // The stream's first bytes as a header, whatever the decoder made of them.
    if let Ok(h) = RequestHeader::parse(stream) {
        assert_eq!(stream[..REQUEST_HEADER_LEN], h.encode());
    }
});
