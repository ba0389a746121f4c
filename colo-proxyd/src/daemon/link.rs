//! Wire format of the link between the primary's and the secondary's colo-proxyd
//! (`docs/proxyd-link.md`). Pure: bytes in, messages out, no sockets.
//!
//! Every message is a type byte, a big-endian u32 payload length, then the payload. The first
//! message each way is a [`LinkMessage::Hello`]; after it the primary sends
//! [`LinkMessage::Inbound`] (a mirrored frame for the SVM) and the secondary sends
//! [`LinkMessage::SvmOutput`] (a frame the SVM sent, tagged with the SVM epoch it belongs to).
//! Both ends also send heartbeats ([`encode_heartbeat`]) so that a silent peer is noticed; the
//! decoder checks and consumes them and never returns them: they are no frames.
//! Anything else — an unknown type, an over-long or short payload, a second hello, a hello
//! of another version — is a [`LinkError`] that ends the connection: like QEMU's net-filter
//! framing, this stream has no resynchronisation point.

use bytes::Bytes;
use colo_types::Role;
use thiserror::Error;

use crate::codec::MAX_FRAME_LEN;

/// The link protocol version this build speaks. Version 2 added the heartbeat; version 1
/// peers refuse our hello (and we theirs) with an error naming both versions.
pub const LINK_VERSION: u16 = 2;

/// The first four payload bytes of every hello.
pub const LINK_MAGIC: [u8; 4] = *b"CPXL";

const TYPE_HELLO: u8 = 0;
const TYPE_INBOUND: u8 = 1;
const TYPE_SVM_OUTPUT: u8 = 2;
const TYPE_HEARTBEAT: u8 = 3;

const HEADER_LEN: usize = 5;
const HELLO_LEN: usize = 7;
const EPOCH_LEN: usize = 8;

/// The longest payload any message may carry: a maximal frame plus its epoch tag.
pub const MAX_PAYLOAD_LEN: usize = MAX_FRAME_LEN + EPOCH_LEN;

/// The code of each end of the link in a hello: the primary's daemon listens, the secondary's
/// connects.
fn role_code(role: Role) -> u8 {
    match role {
        Role::Primary => 1,
        Role::Secondary => 2,
    }
}

/// One message on the link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkMessage {
    /// First message each way.
    Hello {
        /// The sender's protocol version.
        version: u16,
        /// The sender's role.
        role: Role,
    },
    /// Primary → secondary: an Ethernet frame on its way into the PVM, to inject into the SVM.
    Inbound(Bytes),
    /// Secondary → primary: an Ethernet frame the SVM sent during SVM epoch `epoch`.
    SvmOutput {
        /// The relay's epoch number the SVM was running when it sent the frame.
        epoch: u64,
        /// The Ethernet frame (sequence numbers already rewritten to the PVM's).
        frame: Bytes,
    },
}

/// Why the link's byte stream cannot be read on. Each ends the connection.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LinkError {
    /// A type byte this version does not know.
    #[error("unknown link message type {0}")]
    UnknownType(u8),
    /// A payload longer than its type allows: a frame of [`MAX_FRAME_LEN`] bytes, plus the
    /// epoch for svm-output ([`MAX_PAYLOAD_LEN`]).
    #[error(
        "link message of {len} bytes exceeds the limit ({MAX_FRAME_LEN}-byte frames, plus the epoch in svm-output)"
    )]
    Oversized {
        /// The announced payload length.
        len: u32,
    },
    /// A payload too short for its type.
    #[error("link message of type {kind} has a {len}-byte payload, too short")]
    TooShort {
        /// The message type.
        kind: u8,
        /// The payload length.
        len: usize,
    },
    /// The hello's magic bytes are wrong: the peer is not colo-proxyd.
    #[error("the peer is not a colo-proxyd link (bad magic {0:02x?})")]
    BadMagic([u8; 4]),
    /// The hello's role byte is not 1 or 2.
    #[error("the peer's hello has an unknown role {0}")]
    BadRole(u8),
    /// The peer speaks another version.
    #[error("the peer speaks link version {theirs}, this build speaks {LINK_VERSION}")]
    Version {
        /// The peer's version.
        theirs: u16,
    },
    /// The peer has the same role as we have (two primaries or two secondaries).
    #[error("the peer says it is the {theirs}, but so are we")]
    SameRole {
        /// The peer's role.
        theirs: Role,
    },
    /// The first message was not a hello, or a hello came twice.
    #[error("expected {expected}, got a {got} message")]
    OutOfOrder {
        /// What was expected.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
    /// The peer sent a message only the other direction carries.
    #[error("a {got} message cannot come from the {from}")]
    WrongDirection {
        /// The message kind.
        got: &'static str,
        /// The peer's role.
        from: Role,
    },
    /// A heartbeat with a payload (heartbeats have none).
    #[error("a link heartbeat carries no payload, this one announces {len} bytes")]
    HeartbeatPayload {
        /// The announced payload length.
        len: u32,
    },
    /// The stream ended inside a message.
    #[error("the link ended inside a message ({buffered} bytes of it were received)")]
    Truncated {
        /// Bytes of the unfinished message.
        buffered: usize,
    },
}

impl LinkMessage {
    fn kind(&self) -> &'static str {
        match self {
            LinkMessage::Hello { .. } => "hello",
            LinkMessage::Inbound(_) => "inbound",
            LinkMessage::SvmOutput { .. } => "svm-output",
        }
    }
}

/// Appends `message` to `out`. Frames longer than [`MAX_FRAME_LEN`] cannot be encoded: the
/// codec never produces them, and the caller drops them.
pub fn encode(message: &LinkMessage, out: &mut Vec<u8>) -> Result<(), LinkError> {
    match message {
        LinkMessage::Hello { version, role } => {
            out.push(TYPE_HELLO);
            out.extend_from_slice(&(HELLO_LEN as u32).to_be_bytes());
            out.extend_from_slice(&LINK_MAGIC);
            out.extend_from_slice(&version.to_be_bytes());
            out.push(role_code(*role));
        }
        LinkMessage::Inbound(frame) => {
            let len = frame_len(frame.len(), 0)?;
            out.push(TYPE_INBOUND);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(frame);
        }
        LinkMessage::SvmOutput { epoch, frame } => {
            let len = frame_len(frame.len(), EPOCH_LEN)?;
            out.push(TYPE_SVM_OUTPUT);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&epoch.to_be_bytes());
            out.extend_from_slice(frame);
        }
    }
    Ok(())
}

/// Appends a heartbeat: type 3, an empty payload. Each end sends one after every
/// [`super::peer::HEARTBEAT_INTERVAL`] in which it wrote nothing else; the peer's decoder
/// consumes it.
pub fn encode_heartbeat(out: &mut Vec<u8>) {
    out.push(TYPE_HEARTBEAT);
    out.extend_from_slice(&0u32.to_be_bytes());
}

fn frame_len(frame: usize, extra: usize) -> Result<u32, LinkError> {
    if frame > MAX_FRAME_LEN {
        return Err(LinkError::Oversized {
            len: u32::try_from(frame + extra).unwrap_or(u32::MAX),
        });
    }
    // Bounded by MAX_PAYLOAD_LEN, which fits a u32.
    Ok((frame + extra) as u32)
}

/// Streaming decoder of what one end receives: checks the hello, then the direction of every
/// message.
#[derive(Debug)]
pub struct LinkDecoder {
    /// Our role; the peer must have the other one.
    local: Role,
    buffer: Vec<u8>,
    consumed: usize,
    greeted: bool,
    heartbeats: u64,
    failed: Option<LinkError>,
}

impl LinkDecoder {
    /// A decoder for the end whose role is `local`.
    pub fn new(local: Role) -> Self {
        LinkDecoder {
            local,
            buffer: Vec::new(),
            consumed: 0,
            greeted: false,
            heartbeats: 0,
            failed: None,
        }
    }

    /// Whether the peer's hello has been accepted.
    pub fn greeted(&self) -> bool {
        self.greeted
    }

    /// Heartbeats received (and consumed) so far.
    pub fn heartbeats(&self) -> u64 {
        self.heartbeats
    }

    /// Appends bytes read from the socket.
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.consumed > 0 && self.consumed * 2 >= self.buffer.len() {
            self.buffer.drain(..self.consumed);
            self.consumed = 0;
        }
        self.buffer.extend_from_slice(chunk);
    }

    /// The next complete message (`Ok(None)`: more bytes needed). Heartbeats are checked,
    /// counted ([`Self::heartbeats`]) and skipped, never returned. After an error, every later
    /// call returns it again.
    pub fn next_message(&mut self) -> Result<Option<LinkMessage>, LinkError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        match self.parse_next() {
            Ok(message) => Ok(message),
            Err(error) => {
                self.failed = Some(error.clone());
                self.buffer = Vec::new();
                self.consumed = 0;
                Err(error)
            }
        }
    }

    /// Call at the end of the stream: an error when it ended inside a message.
    pub fn finish(&self) -> Result<(), LinkError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        match self.buffer.len() - self.consumed {
            0 => Ok(()),
            buffered => Err(LinkError::Truncated { buffered }),
        }
    }

    fn parse_next(&mut self) -> Result<Option<LinkMessage>, LinkError> {
        loop {
            let pending = &self.buffer[self.consumed..];
            if pending.len() < HEADER_LEN || pending[0] != TYPE_HEARTBEAT {
                return self.parse_message();
            }
            let len = u32::from_be_bytes([pending[1], pending[2], pending[3], pending[4]]);
            if !self.greeted {
                return Err(LinkError::OutOfOrder {
                    expected: "hello",
                    got: "heartbeat",
                });
            }
            if len != 0 {
                return Err(LinkError::HeartbeatPayload { len });
            }
            self.consumed += HEADER_LEN;
            self.heartbeats += 1;
        }
    }

    fn parse_message(&mut self) -> Result<Option<LinkMessage>, LinkError> {
        let pending = &self.buffer[self.consumed..];
        if pending.len() < HEADER_LEN {
            return Ok(None);
        }
        let kind = pending[0];
        let len = u32::from_be_bytes([pending[1], pending[2], pending[3], pending[4]]);
        if !matches!(kind, TYPE_HELLO | TYPE_INBOUND | TYPE_SVM_OUTPUT) {
            return Err(LinkError::UnknownType(kind));
        }
        // Only svm-output adds the epoch to its frame; an inbound frame over MAX_FRAME_LEN is
        // one `encode` refuses and the SVM's port could not carry.
        let limit = if kind == TYPE_INBOUND {
            MAX_FRAME_LEN
        } else {
            MAX_PAYLOAD_LEN
        };
        if len as usize > limit {
            return Err(LinkError::Oversized { len });
        }
        let total = HEADER_LEN + len as usize;
        if pending.len() < total {
            return Ok(None);
        }
        let payload = &pending[HEADER_LEN..total];
        let message = decode_payload(kind, payload)?;
        self.consumed += total;
        self.check_order(&message)?;
        Ok(Some(message))
    }

    fn check_order(&mut self, message: &LinkMessage) -> Result<(), LinkError> {
        let peer = self.local.other();
        match (self.greeted, message) {
            (false, LinkMessage::Hello { version, role }) => {
                if *version != LINK_VERSION {
                    return Err(LinkError::Version { theirs: *version });
                }
                if *role != peer {
                    return Err(LinkError::SameRole { theirs: *role });
                }
                self.greeted = true;
                Ok(())
            }
            (false, other) => Err(LinkError::OutOfOrder {
                expected: "hello",
                got: other.kind(),
            }),
            (true, LinkMessage::Hello { .. }) => Err(LinkError::OutOfOrder {
                expected: "a frame",
                got: "hello",
            }),
            (true, LinkMessage::Inbound(_)) if peer != Role::Primary => {
                Err(LinkError::WrongDirection {
                    got: "inbound",
                    from: peer,
                })
            }
            (true, LinkMessage::SvmOutput { .. }) if peer != Role::Secondary => {
                Err(LinkError::WrongDirection {
                    got: "svm-output",
                    from: peer,
                })
            }
            (true, _) => Ok(()),
        }
    }
}

fn decode_payload(kind: u8, payload: &[u8]) -> Result<LinkMessage, LinkError> {
    let short = || LinkError::TooShort {
        kind,
        len: payload.len(),
    };
    match kind {
        TYPE_HELLO => {
            if payload.len() < HELLO_LEN {
                return Err(short());
            }
            let magic = [payload[0], payload[1], payload[2], payload[3]];
            if magic != LINK_MAGIC {
                return Err(LinkError::BadMagic(magic));
            }
            let version = u16::from_be_bytes([payload[4], payload[5]]);
            // The version is checked before the role, so a later version that changes the
            // hello's tail still gets a clear "version" error.
            if version != LINK_VERSION {
                return Err(LinkError::Version { theirs: version });
            }
            let role = match payload[6] {
                1 => Role::Primary,
                2 => Role::Secondary,
                other => return Err(LinkError::BadRole(other)),
            };
            Ok(LinkMessage::Hello { version, role })
        }
        TYPE_INBOUND => Ok(LinkMessage::Inbound(Bytes::copy_from_slice(payload))),
        TYPE_SVM_OUTPUT => {
            let Some((epoch, frame)) = payload.split_first_chunk::<EPOCH_LEN>() else {
                return Err(short());
            };
            Ok(LinkMessage::SvmOutput {
                epoch: u64::from_be_bytes(*epoch),
                frame: Bytes::copy_from_slice(frame),
            })
        }
        other => Err(LinkError::UnknownType(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hello(role: Role) -> LinkMessage {
        LinkMessage::Hello {
            version: LINK_VERSION,
            role,
        }
    }

    fn wire(messages: &[LinkMessage]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in messages {
            encode(m, &mut out).unwrap();
        }
        out
    }

    fn decode_all(decoder: &mut LinkDecoder) -> Result<Vec<LinkMessage>, LinkError> {
        let mut out = Vec::new();
        while let Some(m) = decoder.next_message()? {
            out.push(m);
        }
        Ok(out)
    }

    #[test]
    fn the_secondary_reads_the_primarys_hello_and_frames() {
        let messages = vec![
            hello(Role::Primary),
            LinkMessage::Inbound(Bytes::from(vec![1, 2, 3])),
            LinkMessage::Inbound(Bytes::from(vec![])),
        ];
        let mut decoder = LinkDecoder::new(Role::Secondary);
        decoder.feed(&wire(&messages));
        assert_eq!(decode_all(&mut decoder).unwrap(), messages);
        assert!(decoder.greeted());
        assert_eq!(decoder.finish(), Ok(()));
    }

    #[test]
    fn frames_before_the_hello_or_in_the_wrong_direction_are_errors() {
        let mut decoder = LinkDecoder::new(Role::Primary);
        decoder.feed(&wire(&[LinkMessage::Inbound(Bytes::from(vec![1]))]));
        assert!(matches!(
            decoder.next_message(),
            Err(LinkError::OutOfOrder { .. })
        ));
        let mut decoder = LinkDecoder::new(Role::Primary);
        decoder.feed(&wire(&[
            hello(Role::Secondary),
            LinkMessage::Inbound(Bytes::from(vec![1])),
        ]));
        assert!(matches!(
            decoder.next_message(),
            Ok(Some(LinkMessage::Hello { .. }))
        ));
        assert!(matches!(
            decoder.next_message(),
            Err(LinkError::WrongDirection { .. })
        ));
        let mut decoder = LinkDecoder::new(Role::Primary);
        decoder.feed(&wire(&[hello(Role::Primary)]));
        assert_eq!(
            decoder.next_message(),
            Err(LinkError::SameRole {
                theirs: Role::Primary
            })
        );
    }

    #[test]
    fn bad_hellos_say_what_is_wrong() {
        let mut bytes = wire(&[hello(Role::Primary)]);
        bytes[5] = b'X';
        let mut decoder = LinkDecoder::new(Role::Secondary);
        decoder.feed(&bytes);
        assert!(matches!(
            decoder.next_message(),
            Err(LinkError::BadMagic(_))
        ));

        let mut decoder = LinkDecoder::new(Role::Secondary);
        decoder.feed(&wire(&[LinkMessage::Hello {
            version: 9,
            role: Role::Primary,
        }]));
        assert_eq!(
            decoder.next_message(),
            Err(LinkError::Version { theirs: 9 })
        );
    }

    #[test]
    fn unknown_types_oversized_and_short_payloads_fail_and_stay_failed() {
        let mut decoder = LinkDecoder::new(Role::Primary);
        decoder.feed(&[7, 0, 0, 0, 0]);
        assert_eq!(decoder.next_message(), Err(LinkError::UnknownType(7)));
        decoder.feed(&wire(&[hello(Role::Secondary)]));
        assert_eq!(decoder.next_message(), Err(LinkError::UnknownType(7)));

        let mut decoder = LinkDecoder::new(Role::Primary);
        decoder.feed(&[1, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            decoder.next_message(),
            Err(LinkError::Oversized { .. })
        ));

        let mut decoder = LinkDecoder::new(Role::Primary);
        let mut bytes = wire(&[hello(Role::Secondary)]);
        bytes.extend_from_slice(&[TYPE_SVM_OUTPUT, 0, 0, 0, 3, 1, 2, 3]);
        decoder.feed(&bytes);
        decoder.next_message().unwrap();
        assert!(matches!(
            decoder.next_message(),
            Err(LinkError::TooShort { .. })
        ));
    }

    #[test]
    fn inbound_frames_are_bounded_by_the_frame_limit_without_the_epoch() {
        // Found by the proxyd_link fuzz target: inbound payloads were bounded by
        // MAX_PAYLOAD_LEN, which counts svm-output's epoch, so the decoder accepted frames
        // of up to 8 bytes more than `encode` (and the SVM's port) can carry.
        let max = LinkMessage::Inbound(Bytes::from(vec![0; MAX_FRAME_LEN]));
        let mut decoder = LinkDecoder::new(Role::Secondary);
        decoder.feed(&wire(&[hello(Role::Primary), max.clone()]));
        assert_eq!(
            decode_all(&mut decoder).unwrap(),
            vec![hello(Role::Primary), max]
        );

        let over = MAX_FRAME_LEN as u32 + 1;
        let mut bytes = wire(&[hello(Role::Primary)]);
        bytes.push(TYPE_INBOUND);
        bytes.extend_from_slice(&over.to_be_bytes());
        bytes.extend_from_slice(&vec![0; over as usize]);
        let mut decoder = LinkDecoder::new(Role::Secondary);
        decoder.feed(&bytes);
        assert!(decoder.next_message().unwrap().is_some());
        assert_eq!(
            decoder.next_message(),
            Err(LinkError::Oversized { len: over })
        );

        // svm-output still carries a maximal frame plus its epoch.
        let max = LinkMessage::SvmOutput {
            epoch: 1,
            frame: Bytes::from(vec![0; MAX_FRAME_LEN]),
        };
        let mut decoder = LinkDecoder::new(Role::Primary);
        decoder.feed(&wire(&[hello(Role::Secondary), max.clone()]));
        assert_eq!(
            decode_all(&mut decoder).unwrap(),
            vec![hello(Role::Secondary), max]
        );
    }

    #[test]
    fn a_stream_ending_inside_a_message_is_truncated() {
        let mut decoder = LinkDecoder::new(Role::Secondary);
        let bytes = wire(&[
            hello(Role::Primary),
            LinkMessage::Inbound(Bytes::from(vec![1; 10])),
        ]);
        decoder.feed(&bytes[..bytes.len() - 1]);
        decode_all(&mut decoder).unwrap();
        assert!(matches!(decoder.finish(), Err(LinkError::Truncated { .. })));
    }

    #[test]
    fn heartbeats_are_five_bytes_consumed_and_counted_never_returned() {
        let mut beat = Vec::new();
        encode_heartbeat(&mut beat);
        assert_eq!(beat, [TYPE_HEARTBEAT, 0, 0, 0, 0]);
        let frame = LinkMessage::Inbound(Bytes::from(vec![1, 2, 3]));
        let mut bytes = wire(&[hello(Role::Primary)]);
        bytes.extend_from_slice(&beat);
        bytes.extend_from_slice(&wire(std::slice::from_ref(&frame)));
        bytes.extend_from_slice(&beat);
        bytes.extend_from_slice(&beat);
        let mut decoder = LinkDecoder::new(Role::Secondary);
        decoder.feed(&bytes);
        assert_eq!(
            decode_all(&mut decoder).unwrap(),
            vec![hello(Role::Primary), frame]
        );
        assert_eq!(decoder.heartbeats(), 3);
        assert_eq!(decoder.finish(), Ok(()));

        // Both directions carry them.
        let mut bytes = wire(&[hello(Role::Secondary)]);
        bytes.extend_from_slice(&beat);
        let mut decoder = LinkDecoder::new(Role::Primary);
        decoder.feed(&bytes[..bytes.len() - 1]);
        assert_eq!(
            decode_all(&mut decoder).unwrap(),
            vec![hello(Role::Secondary)]
        );
        assert_eq!(decoder.heartbeats(), 0);
        assert!(matches!(
            decoder.finish(),
            Err(LinkError::Truncated { buffered: 4 })
        ));
        decoder.feed(&bytes[bytes.len() - 1..]);
        assert_eq!(decode_all(&mut decoder).unwrap(), vec![]);
        assert_eq!(decoder.heartbeats(), 1);
        assert_eq!(decoder.finish(), Ok(()));
    }

    #[test]
    fn a_heartbeat_before_the_hello_or_with_a_payload_is_an_error() {
        let mut beat = Vec::new();
        encode_heartbeat(&mut beat);
        let mut decoder = LinkDecoder::new(Role::Primary);
        decoder.feed(&beat);
        assert_eq!(
            decoder.next_message(),
            Err(LinkError::OutOfOrder {
                expected: "hello",
                got: "heartbeat"
            })
        );

        let mut bytes = wire(&[hello(Role::Secondary)]);
        bytes.extend_from_slice(&[TYPE_HEARTBEAT, 0, 0, 0, 1]);
        let mut decoder = LinkDecoder::new(Role::Primary);
        decoder.feed(&bytes);
        decoder.next_message().unwrap();
        // Refused from the header alone: nothing waits for the announced payload.
        assert_eq!(
            decoder.next_message(),
            Err(LinkError::HeartbeatPayload { len: 1 })
        );
    }

    #[test]
    fn a_version_1_peer_is_refused_naming_both_versions() {
        let mut bytes = wire(&[hello(Role::Primary)]);
        bytes[9..11].copy_from_slice(&1u16.to_be_bytes());
        let mut decoder = LinkDecoder::new(Role::Secondary);
        decoder.feed(&bytes);
        let error = decoder.next_message().unwrap_err();
        assert_eq!(error, LinkError::Version { theirs: 1 });
        assert_eq!(
            error.to_string(),
            "the peer speaks link version 1, this build speaks 2"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn heartbeats_anywhere_after_the_hello_leave_the_frames_unchanged(
            items in proptest::collection::vec(
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..100)), 0..16),
            chunk in 1usize..30,
        ) {
            // `None` is a heartbeat, `Some` an inbound frame.
            let mut bytes = wire(&[hello(Role::Primary)]);
            let mut frames = vec![hello(Role::Primary)];
            let mut beats = 0;
            for item in items {
                match item {
                    None => {
                        encode_heartbeat(&mut bytes);
                        beats += 1;
                    }
                    Some(frame) => {
                        let message = LinkMessage::Inbound(frame.into());
                        encode(&message, &mut bytes).unwrap();
                        frames.push(message);
                    }
                }
            }
            let mut decoder = LinkDecoder::new(Role::Secondary);
            let mut got = Vec::new();
            for piece in bytes.chunks(chunk) {
                decoder.feed(piece);
                got.extend(decode_all(&mut decoder).unwrap());
            }
            prop_assert_eq!(got, frames);
            prop_assert_eq!(decoder.heartbeats(), beats);
            prop_assert_eq!(decoder.finish(), Ok(()));
        }

        #[test]
        fn roundtrip_under_any_chunking(
            frames in proptest::collection::vec(
                (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..200)), 0..8),
            chunk in 1usize..50,
        ) {
            let mut messages = vec![hello(Role::Secondary)];
            messages.extend(frames.into_iter().map(|(epoch, frame)| LinkMessage::SvmOutput { epoch, frame: frame.into() }));
            let bytes = wire(&messages);
            let mut decoder = LinkDecoder::new(Role::Primary);
            let mut got = Vec::new();
            for piece in bytes.chunks(chunk) {
                decoder.feed(piece);
                got.extend(decode_all(&mut decoder).unwrap());
            }
            prop_assert_eq!(got, messages);
            prop_assert_eq!(decoder.finish(), Ok(()));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            for local in [Role::Primary, Role::Secondary] {
                let mut decoder = LinkDecoder::new(local);
                decoder.feed(&bytes);
                let _ = decode_all(&mut decoder);
                let _ = decoder.finish();
            }
        }
    }
}
