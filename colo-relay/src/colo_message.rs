//! Incremental parser of the COLO messages the secondary QEMU sends to the
//! primary on the main migration channel. Pure: no I/O, no clock.
//!
//! With the `return-path` migration capability off (required), the
//! secondary-to-primary direction of the main channel carries nothing but
//! QEMU's `COLOMessage`s, each a big-endian u32 code (`qemu_put_be32`);
//! `vmstate-size` is followed by a big-endian u64 value:
//!
//! | code | message | bytes |
//! |---|---|---|
//! | 0 | checkpoint-ready | 4 |
//! | 1 | checkpoint-request | 4 |
//! | 2 | checkpoint-reply | 4 |
//! | 3 | vmstate-send | 4 |
//! | 4 | vmstate-size | 4 + 8 |
//! | 5 | vmstate-received | 4 |
//! | 6 | vmstate-loaded | 4 |
//!
//! Any other code is an error, after which the parser stays failed: the
//! stream has no resynchronisation point.

/// `QEMU_VM_FILE_MAGIC`, the first 4 bytes of the main migration channel.
pub const QEVM_MAGIC: u32 = 0x5145_564D;
/// `MULTIFD_MAGIC`, the first 4 bytes of a multifd channel.
pub const MULTIFD_MAGIC: u32 = 0x1122_3344;

/// One message of QEMU's `COLOMessage` enum (qapi/migration.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColoMessage {
    /// 0: the secondary entered COLO.
    CheckpointReady,
    /// 1: the primary asks for a checkpoint (primary to secondary).
    CheckpointRequest,
    /// 2: the secondary stopped its VM for the checkpoint.
    CheckpointReply,
    /// 3: the primary starts sending its state (primary to secondary).
    VmstateSend,
    /// 4: size of the device state that follows (primary to secondary).
    VmstateSize(u64),
    /// 5: the secondary received the whole state.
    VmstateReceived,
    /// 6: the secondary loaded the state and runs again.
    VmstateLoaded,
}

impl ColoMessage {
    /// QEMU's numeric code.
    pub fn code(self) -> u32 {
        match self {
            ColoMessage::CheckpointReady => 0,
            ColoMessage::CheckpointRequest => 1,
            ColoMessage::CheckpointReply => 2,
            ColoMessage::VmstateSend => 3,
            ColoMessage::VmstateSize(_) => 4,
            ColoMessage::VmstateReceived => 5,
            ColoMessage::VmstateLoaded => 6,
        }
    }

    /// QEMU's name (qapi `COLOMessage`).
    pub fn name(self) -> &'static str {
        match self {
            ColoMessage::CheckpointReady => "checkpoint-ready",
            ColoMessage::CheckpointRequest => "checkpoint-request",
            ColoMessage::CheckpointReply => "checkpoint-reply",
            ColoMessage::VmstateSend => "vmstate-send",
            ColoMessage::VmstateSize(_) => "vmstate-size",
            ColoMessage::VmstateReceived => "vmstate-received",
            ColoMessage::VmstateLoaded => "vmstate-loaded",
        }
    }

    /// Bytes on the wire (4, or 12 for `vmstate-size`).
    pub fn wire_len(self) -> usize {
        match self {
            ColoMessage::VmstateSize(_) => 12,
            _ => 4,
        }
    }

    /// Appends the wire form to `out`.
    pub fn encode(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.code().to_be_bytes());
        if let ColoMessage::VmstateSize(v) = self {
            out.extend_from_slice(&v.to_be_bytes());
        }
    }

    /// The message with this code (`value` is used by `vmstate-size` only).
    pub fn from_code(code: u32, value: u64) -> Option<ColoMessage> {
        Some(match code {
            0 => ColoMessage::CheckpointReady,
            1 => ColoMessage::CheckpointRequest,
            2 => ColoMessage::CheckpointReply,
            3 => ColoMessage::VmstateSend,
            4 => ColoMessage::VmstateSize(value),
            5 => ColoMessage::VmstateReceived,
            6 => ColoMessage::VmstateLoaded,
            _ => return None,
        })
    }
}

impl std::fmt::Display for ColoMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ColoMessage::VmstateSize(v) => write!(f, "vmstate-size({v})"),
            m => f.write_str(m.name()),
        }
    }
}

/// A code that is not a COLO message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown COLO message code {code:#010x} at byte {offset} of the secondary's stream \
     (is the return-path migration capability on? it must be off)"
)]
pub struct ParseError {
    /// Stream offset (from the first byte ever fed) of the code's first byte.
    pub offset: u64,
    /// The code read there.
    pub code: u32,
}

/// Incremental parser: feed it the stream in chunks of any size, split at
/// any byte.
#[derive(Debug, Clone, Default)]
pub struct ColoParser {
    /// Bytes of the message in progress (at most 12).
    buf: [u8; 12],
    have: usize,
    /// Stream offset of the next byte to be consumed.
    offset: u64,
    failed: Option<ParseError>,
}

impl ColoParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes consumed so far (including those of a message in progress).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The error the parser stopped at, if it did.
    pub fn error(&self) -> Option<ParseError> {
        self.failed
    }

    /// Bytes of an unfinished message held by the parser.
    pub fn partial_len(&self) -> usize {
        self.have
    }

    /// Consumes bytes from the front of `data` until one message is complete
    /// or `data` is exhausted. Returns how many bytes it consumed and the
    /// completed message, if any (the message ends exactly at the returned
    /// count). After an error, consumes nothing and returns the error again.
    pub fn advance(&mut self, data: &[u8]) -> Result<(usize, Option<ColoMessage>), ParseError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let mut used = 0;
        while used < data.len() {
            let need = if self.have < 4 {
                4
            } else {
                // Only vmstate-size gets past 4 bytes.
                12
            };
            let take = (need - self.have).min(data.len() - used);
            self.buf[self.have..self.have + take].copy_from_slice(&data[used..used + take]);
            self.have += take;
            used += take;
            self.offset += take as u64;
            if self.have < need {
                break;
            }
            let code = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
            if self.have == 4 {
                match code {
                    4 => continue, // read the be64 value
                    0..=6 => {
                        self.have = 0;
                        let msg = ColoMessage::from_code(code, 0);
                        return Ok((used, msg));
                    }
                    _ => {
                        let e = ParseError {
                            offset: self.offset - 4,
                            code,
                        };
                        self.failed = Some(e);
                        return Err(e);
                    }
                }
            }
            let mut v = [0u8; 8];
            v.copy_from_slice(&self.buf[4..12]);
            self.have = 0;
            return Ok((used, Some(ColoMessage::VmstateSize(u64::from_be_bytes(v)))));
        }
        Ok((used, None))
    }

    /// Feeds a whole chunk and returns every message completed in it, each
    /// with its end offset inside the chunk. Stops at the first error.
    pub fn feed(&mut self, chunk: &[u8]) -> (Vec<(usize, ColoMessage)>, Option<ParseError>) {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < chunk.len() {
            match self.advance(&chunk[pos..]) {
                Ok((used, msg)) => {
                    pos += used;
                    if let Some(m) = msg {
                        out.push((pos, m));
                    }
                }
                Err(e) => return (out, Some(e)),
            }
        }
        (out, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL: [ColoMessage; 7] = [
        ColoMessage::CheckpointReady,
        ColoMessage::CheckpointRequest,
        ColoMessage::CheckpointReply,
        ColoMessage::VmstateSend,
        ColoMessage::VmstateSize(0x0102_0304_0506_0708),
        ColoMessage::VmstateReceived,
        ColoMessage::VmstateLoaded,
    ];

    fn encode_all(msgs: &[ColoMessage]) -> Vec<u8> {
        let mut v = Vec::new();
        for m in msgs {
            m.encode(&mut v);
        }
        v
    }

    fn parse_chunks(chunks: &[&[u8]]) -> (Vec<ColoMessage>, Option<ParseError>) {
        let mut p = ColoParser::new();
        let mut out = Vec::new();
        for c in chunks {
            let (msgs, err) = p.feed(c);
            out.extend(msgs.into_iter().map(|(_, m)| m));
            if err.is_some() {
                return (out, err);
            }
        }
        (out, None)
    }

    #[test]
    fn each_code_alone() {
        for (code, m) in ALL.iter().enumerate() {
            let wire = encode_all(&[*m]);
            assert_eq!(&wire[..4], &(code as u32).to_be_bytes());
            assert_eq!(wire.len(), m.wire_len());
            let mut p = ColoParser::new();
            assert_eq!(p.advance(&wire), Ok((wire.len(), Some(*m))), "{m}");
            assert_eq!(p.offset(), wire.len() as u64);
            assert_eq!(p.partial_len(), 0);
        }
    }

    #[test]
    fn vmstate_size_value_is_big_endian_u64() {
        let wire = [0, 0, 0, 4, 0, 0, 0, 0, 0, 0x40, 0, 0];
        let mut p = ColoParser::new();
        assert_eq!(
            p.advance(&wire),
            Ok((12, Some(ColoMessage::VmstateSize(0x40_0000))))
        );
        let mut p = ColoParser::new();
        // Code alone: waits for the value.
        assert_eq!(p.advance(&wire[..4]), Ok((4, None)));
        assert_eq!(p.partial_len(), 4);
        assert_eq!(p.advance(&wire[4..11]), Ok((7, None)));
        assert_eq!(
            p.advance(&wire[11..]),
            Ok((1, Some(ColoMessage::VmstateSize(0x40_0000))))
        );
        let max = encode_all(&[ColoMessage::VmstateSize(u64::MAX)]);
        assert_eq!(
            ColoParser::new().advance(&max),
            Ok((12, Some(ColoMessage::VmstateSize(u64::MAX))))
        );
    }

    #[test]
    fn advance_stops_after_each_message_and_reports_its_end() {
        let seq = [
            ColoMessage::CheckpointReply,
            ColoMessage::VmstateSize(9),
            ColoMessage::VmstateReceived,
        ];
        let wire = encode_all(&seq);
        let mut p = ColoParser::new();
        assert_eq!(p.advance(&wire), Ok((4, Some(seq[0]))));
        assert_eq!(p.advance(&wire[4..]), Ok((12, Some(seq[1]))));
        assert_eq!(p.advance(&wire[16..]), Ok((4, Some(seq[2]))));
        assert_eq!(p.advance(&[]), Ok((0, None)));
        let (msgs, err) = ColoParser::new().feed(&wire);
        assert_eq!(err, None);
        assert_eq!(msgs, vec![(4, seq[0]), (16, seq[1]), (20, seq[2])]);
    }

    #[test]
    fn every_split_point_and_byte_by_byte() {
        let seq: Vec<ColoMessage> = ALL.iter().chain(ALL.iter().rev()).copied().collect();
        let wire = encode_all(&seq);
        // Byte by byte.
        let singles: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(parse_chunks(&singles), (seq.clone(), None));
        // Every 2-way split.
        for cut in 0..=wire.len() {
            let (a, b) = wire.split_at(cut);
            assert_eq!(parse_chunks(&[a, b]), (seq.clone(), None), "cut at {cut}");
        }
        // Every 3-way split.
        for i in 0..=wire.len() {
            for j in i..=wire.len() {
                let chunks = [&wire[..i], &wire[i..j], &wire[j..]];
                assert_eq!(parse_chunks(&chunks), (seq.clone(), None), "cuts {i},{j}");
            }
        }
    }

    #[test]
    fn unknown_code_fails_at_its_offset_and_stays_failed() {
        let mut wire = encode_all(&[ColoMessage::CheckpointReady, ColoMessage::VmstateSize(1)]);
        wire.extend_from_slice(&7u32.to_be_bytes());
        wire.extend_from_slice(&encode_all(&[ColoMessage::VmstateLoaded]));
        for cut in 0..=wire.len() {
            let (a, b) = wire.split_at(cut);
            let (msgs, err) = parse_chunks(&[a, b]);
            assert_eq!(
                msgs,
                vec![ColoMessage::CheckpointReady, ColoMessage::VmstateSize(1)]
            );
            assert_eq!(
                err,
                Some(ParseError {
                    offset: 16,
                    code: 7
                }),
                "cut {cut}"
            );
        }
        let mut p = ColoParser::new();
        let (_, err) = p.feed(&wire);
        let err = err.unwrap();
        assert_eq!(p.error(), Some(err));
        assert_eq!(p.advance(&[0, 0, 0, 0]), Err(err));
        assert!(err.to_string().contains("return-path"));
        // A return-path message (be16 type, be16 len) is not a COLO code.
        let mut p = ColoParser::new();
        assert_eq!(
            p.advance(&[0, 3, 0, 4]),
            Err(ParseError {
                offset: 0,
                code: 0x0003_0004
            })
        );
    }

    fn arb_msg() -> impl Strategy<Value = ColoMessage> {
        prop_oneof![
            (0u32..=6, any::<u64>()).prop_map(|(c, v)| ColoMessage::from_code(c, v).unwrap()),
        ]
    }

    proptest! {
        #[test]
        fn random_sequences_split_randomly_parse_back(
            msgs in proptest::collection::vec(arb_msg(), 0..64),
            cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..16),
        ) {
            let wire = encode_all(&msgs);
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
            points.sort_unstable();
            let mut chunks = Vec::new();
            let mut prev = 0;
            for p in points {
                chunks.push(&wire[prev..p]);
                prev = p;
            }
            chunks.push(&wire[prev..]);
            let mut parser = ColoParser::new();
            let mut got = Vec::new();
            let mut base = 0usize;
            for c in &chunks {
                let (msgs, err) = parser.feed(c);
                prop_assert!(err.is_none());
                for (end, m) in msgs {
                    // End offsets are inside the chunk and consistent with the wire.
                    prop_assert!(end <= c.len());
                    let abs_end = base + end;
                    prop_assert!(abs_end >= m.wire_len());
                    let mut one = Vec::new();
                    m.encode(&mut one);
                    prop_assert_eq!(&wire[abs_end - m.wire_len()..abs_end], &one[..]);
                    got.push(m);
                }
                base += c.len();
            }
            prop_assert_eq!(got, msgs);
            prop_assert_eq!(parser.partial_len(), 0);
            prop_assert_eq!(parser.offset(), wire.len() as u64);
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            data in proptest::collection::vec(any::<u8>(), 0..512),
            split in any::<proptest::sample::Index>(),
        ) {
            let cut = split.index(data.len() + 1);
            let mut p = ColoParser::new();
            let (_, e1) = p.feed(&data[..cut]);
            let (_, e2) = p.feed(&data[cut..]);
            if let Some(e) = e1.or(e2) {
                prop_assert!(e.code > 6);
                prop_assert!(e.offset + 4 <= data.len() as u64);
                let at = e.offset as usize;
                prop_assert_eq!(u32::from_be_bytes(data[at..at + 4].try_into().unwrap()), e.code);
            } else {
                prop_assert_eq!(p.offset(), data.len() as u64);
            }
        }
    }
}
