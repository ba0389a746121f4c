//! Arbitrary bytes, cut at arbitrary points, into the COLO message parser of
//! the relay. Checks, besides "never panics":
//! * chunked parsing gives exactly the messages and the error of parsing the
//!   whole stream at once (split points never matter);
//! * the messages re-encode to the bytes they were parsed from, and every
//!   end offset lies inside its chunk;
//! * an error points at a 4-byte code greater than 6, right after the last
//!   complete message.
#![no_main]

use colo_relay::{ColoMessage, ColoParser, ParseError};
use libfuzzer_sys::fuzz_target;

fn whole(data: &[u8]) -> (Vec<ColoMessage>, Option<ParseError>) {
    let (msgs, err) = ColoParser::new().feed(data);
    (msgs.into_iter().map(|(_, m)| m).collect(), err)
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

    let (expect_msgs, expect_err) = whole(data);

    let mut parser = ColoParser::new();
    let mut got = Vec::new();
    let mut got_err = None;
    let mut base = 0;
    let mut prev = 0;
    for end in cuts.into_iter().chain(std::iter::once(data.len())) {
        let chunk = &data[prev..end];
        let (msgs, err) = parser.feed(chunk);
        for (at, m) in msgs {
            assert!(at <= chunk.len());
            let abs = base + at;
            let mut wire = Vec::new();
            m.encode(&mut wire);
            assert_eq!(&data[abs - wire.len()..abs], &wire[..]);
            got.push(m);
        }
        base += chunk.len();
        prev = end;
        if err.is_some() {
            got_err = err;
            break;
        }
    }
    assert_eq!(got, expect_msgs);
    assert_eq!(got_err, expect_err);
    match expect_err {
        Some(e) => {
            assert!(e.code > 6);
            let consumed: usize = expect_msgs.iter().map(|m| m.wire_len()).sum();
            assert_eq!(e.offset, consumed as u64);
            let at = consumed;
            assert_eq!(
                u32::from_be_bytes(data[at..at + 4].try_into().unwrap()),
                e.code
            );
            // A failed parser stays failed.
            assert_eq!(parser.advance(&[0, 0, 0, 0]), Err(e));
        }
        None => assert_eq!(parser.offset(), data.len() as u64),
    }
});
