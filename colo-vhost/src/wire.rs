//! The vhost-user message header as it travels on QEMU's socket: pure parsing, no I/O.
//!
//! Every message is a 12-byte header (request code, flags, payload size; all little-endian u32)
//! followed by `size` payload bytes; file descriptors ride along as `SCM_RIGHTS` ancillary data
//! on the first byte. The bytes come from QEMU, so a header is validated before anything trusts
//! its size: the version bits must say 1 and the payload must fit [`MAX_PAYLOAD`].

use thiserror::Error;

/// Bytes in a header.
pub const HEADER_LEN: usize = 12;

/// The largest payload the shim accepts. The largest message QEMU sends a net backend is
/// `SET_MEM_TABLE` with 8 regions (8 + 8 × 32 bytes); `GET_CONFIG`/`SET_CONFIG` carry at most
/// 12 + 256 bytes. The vhost crate's own bound (`MAX_MSG_SIZE`) is 4096 as well.
pub const MAX_PAYLOAD: usize = 4096;

/// The most file descriptors one message may carry (the vhost crate's
/// `MAX_ATTACHED_FD_ENTRIES`).
pub const MAX_FDS: usize = 32;

/// Version bits of `flags` (must be 1).
pub const FLAG_VERSION_MASK: u32 = 0x3;
/// The message is a reply.
pub const FLAG_REPLY: u32 = 0x4;
/// The sender asks for a reply (`VHOST_USER_PROTOCOL_F_REPLY_ACK`).
pub const FLAG_NEED_REPLY: u32 = 0x8;

/// `VHOST_USER_F_PROTOCOL_FEATURES`: bit 30 of the virtio features.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// `VHOST_F_LOG_ALL`: bit 26 of the virtio features; set while QEMU wants writes logged.
pub const F_LOG_ALL: u64 = 1 << 26;

/// Front-end request codes (QEMU's `VhostUserRequest`) the shim looks at or names in a trace.
pub mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_LOG_FD: u32 = 7;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const SEND_RARP: u32 = 19;
    pub const NET_SET_MTU: u32 = 20;
    pub const SET_BACKEND_REQ_FD: u32 = 21;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const RESET_DEVICE: u32 = 34;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;
    pub const SET_STATUS: u32 = 39;
    pub const GET_STATUS: u32 = 40;
}

/// The name of a front-end request code, as the vhost-user specification spells it (without
/// the `VHOST_USER_` prefix); `"UNKNOWN"` for codes this crate does not name.
pub fn request_name(code: u32) -> &'static str {
    match code {
        req::GET_FEATURES => "GET_FEATURES",
        req::SET_FEATURES => "SET_FEATURES",
        req::SET_OWNER => "SET_OWNER",
        req::RESET_OWNER => "RESET_OWNER",
        req::SET_MEM_TABLE => "SET_MEM_TABLE",
        req::SET_LOG_BASE => "SET_LOG_BASE",
        req::SET_LOG_FD => "SET_LOG_FD",
        req::SET_VRING_NUM => "SET_VRING_NUM",
        req::SET_VRING_ADDR => "SET_VRING_ADDR",
        req::SET_VRING_BASE => "SET_VRING_BASE",
        req::GET_VRING_BASE => "GET_VRING_BASE",
        req::SET_VRING_KICK => "SET_VRING_KICK",
        req::SET_VRING_CALL => "SET_VRING_CALL",
        req::SET_VRING_ERR => "SET_VRING_ERR",
        req::GET_PROTOCOL_FEATURES => "GET_PROTOCOL_FEATURES",
        req::SET_PROTOCOL_FEATURES => "SET_PROTOCOL_FEATURES",
        req::GET_QUEUE_NUM => "GET_QUEUE_NUM",
        req::SET_VRING_ENABLE => "SET_VRING_ENABLE",
        req::SEND_RARP => "SEND_RARP",
        req::NET_SET_MTU => "NET_SET_MTU",
        req::SET_BACKEND_REQ_FD => "SET_BACKEND_REQ_FD",
        req::GET_CONFIG => "GET_CONFIG",
        req::SET_CONFIG => "SET_CONFIG",
        req::RESET_DEVICE => "RESET_DEVICE",
        req::GET_MAX_MEM_SLOTS => "GET_MAX_MEM_SLOTS",
        req::ADD_MEM_REG => "ADD_MEM_REG",
        req::REM_MEM_REG => "REM_MEM_REG",
        req::SET_STATUS => "SET_STATUS",
        req::GET_STATUS => "GET_STATUS",
        _ => "UNKNOWN",
    }
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// The version bits of `flags` are not 1.
    #[error("vhost-user header with version {0} (only version 1 exists)")]
    BadVersion(u32),
    /// The payload size exceeds [`MAX_PAYLOAD`].
    #[error("vhost-user payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte bound")]
    TooLarge(u32),
}

/// A validated message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Request code ([`req`]).
    pub request: u32,
    /// Flags: version, [`FLAG_REPLY`], [`FLAG_NEED_REPLY`].
    pub flags: u32,
    /// Payload bytes that follow the header (at most [`MAX_PAYLOAD`]).
    pub size: u32,
}

impl Header {
    /// Parses and validates the 12 header bytes.
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let header = Header {
            request: word(0),
            flags: word(4),
            size: word(8),
        };
        if header.flags & FLAG_VERSION_MASK != 1 {
            return Err(WireError::BadVersion(header.flags & FLAG_VERSION_MASK));
        }
        if header.size as usize > MAX_PAYLOAD {
            return Err(WireError::TooLarge(header.size));
        }
        Ok(header)
    }

    /// The 12 bytes on the wire.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&self.request.to_le_bytes());
        out[4..8].copy_from_slice(&self.flags.to_le_bytes());
        out[8..12].copy_from_slice(&self.size.to_le_bytes());
        out
    }

    /// Whether this is a reply (back-end to front-end).
    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_REPLY != 0
    }

    /// Whether the sender waits for an acknowledgement.
    pub fn needs_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }
}

/// What [`decode`] found at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// The buffer holds less than one message: `needed` bytes in all (more than the buffer
    /// has, at most [`HEADER_LEN`] + [`MAX_PAYLOAD`]) must be there before it can say more.
    Incomplete {
        /// The buffer's length at which decoding can go on.
        needed: usize,
    },
    /// A whole message, taking the first [`HEADER_LEN`] + `payload.len()` bytes.
    Message {
        /// The validated header.
        header: Header,
        /// Its `header.size` payload bytes.
        payload: &'a [u8],
    },
}

/// Decodes the message at the start of `bytes`: the one decoder of the shim
/// ([`crate::shim::recv_message`] reads exactly the `needed` bytes it asks for) and of the
/// fuzz target. The header is validated before its size is believed, so `needed` never
/// exceeds [`HEADER_LEN`] + [`MAX_PAYLOAD`] whatever the peer declares.
pub fn decode(bytes: &[u8]) -> Result<Decoded<'_>, WireError> {
    let Some(head) = bytes.first_chunk::<HEADER_LEN>() else {
        return Ok(Decoded::Incomplete { needed: HEADER_LEN });
    };
    let header = Header::parse(head)?;
    let total = HEADER_LEN + header.size as usize;
    Ok(match bytes.get(HEADER_LEN..total) {
        Some(payload) => Decoded::Message { header, payload },
        None => Decoded::Incomplete { needed: total },
    })
}

/// The `u64` payload of `SET_FEATURES` / `GET_FEATURES` replies and the like; `None` when the
/// payload is not exactly 8 bytes.
pub fn payload_u64(payload: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(payload.try_into().ok()?))
}

/// The `(index, num)` payload of the vring-state messages (`SET_VRING_NUM`, `SET_VRING_BASE`,
/// `GET_VRING_BASE`, `SET_VRING_ENABLE`); `None` when it is not exactly 8 bytes.
pub fn payload_vring_state(payload: &[u8]) -> Option<(u32, u32)> {
    if payload.len() != 8 {
        return None;
    }
    let index = u32::from_le_bytes(payload[0..4].try_into().ok()?);
    let num = u32::from_le_bytes(payload[4..8].try_into().ok()?);
    Some((index, num))
}

/// The vring index of `SET_VRING_KICK` / `SET_VRING_CALL` / `SET_VRING_ERR` (the low byte of
/// the `u64` payload; bit 8 says "no file descriptor": polling mode).
pub fn payload_vring_fd_index(payload: &[u8]) -> Option<u32> {
    payload_u64(payload).map(|v| (v & 0xff) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_header_round_trips() {
        let h = Header {
            request: req::SET_VRING_ENABLE,
            flags: 1 | FLAG_NEED_REPLY,
            size: 8,
        };
        let bytes = h.encode();
        assert_eq!(bytes, [18, 0, 0, 0, 9, 0, 0, 0, 8, 0, 0, 0]);
        assert_eq!(Header::parse(&bytes), Ok(h));
        assert!(h.needs_reply());
        assert!(!h.is_reply());
        assert_eq!(request_name(h.request), "SET_VRING_ENABLE");
    }

    #[test]
    fn bad_version_and_oversize_are_refused() {
        let mut bytes = Header {
            request: 1,
            flags: 1,
            size: 0,
        }
        .encode();
        bytes[4] = 2;
        assert_eq!(Header::parse(&bytes), Err(WireError::BadVersion(2)));
        let bytes = Header {
            request: 1,
            flags: 1,
            size: MAX_PAYLOAD as u32 + 1,
        }
        .encode();
        assert_eq!(
            Header::parse(&bytes),
            Err(WireError::TooLarge(MAX_PAYLOAD as u32 + 1))
        );
    }

    #[test]
    fn payload_helpers() {
        assert_eq!(payload_u64(&7u64.to_le_bytes()), Some(7));
        assert_eq!(payload_u64(&[1, 2, 3]), None);
        let mut p = 1u32.to_le_bytes().to_vec();
        p.extend_from_slice(&256u32.to_le_bytes());
        assert_eq!(payload_vring_state(&p), Some((1, 256)));
        assert_eq!(payload_vring_state(&p[..7]), None);
        assert_eq!(payload_vring_fd_index(&0x101u64.to_le_bytes()), Some(1));
    }

    #[test]
    fn decode_asks_for_the_header_then_the_payload() {
        let mut bytes = Header {
            request: req::SET_FEATURES,
            flags: 1,
            size: 8,
        }
        .encode()
        .to_vec();
        assert_eq!(decode(&[]), Ok(Decoded::Incomplete { needed: HEADER_LEN }));
        assert_eq!(
            decode(&bytes[..11]),
            Ok(Decoded::Incomplete { needed: HEADER_LEN })
        );
        assert_eq!(decode(&bytes), Ok(Decoded::Incomplete { needed: 20 }));
        bytes.extend_from_slice(&7u64.to_le_bytes());
        bytes.push(0xff);
        match decode(&bytes) {
            Ok(Decoded::Message { header, payload }) => {
                assert_eq!(header.request, req::SET_FEATURES);
                assert_eq!(payload_u64(payload), Some(7));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_declared_size_over_the_bound_is_refused_before_any_payload_is_awaited() {
        let bytes = Header {
            request: req::SET_MEM_TABLE,
            flags: 1,
            size: u32::MAX,
        }
        .encode();
        assert_eq!(decode(&bytes), Err(WireError::TooLarge(u32::MAX)));
        let largest = Header {
            request: req::SET_CONFIG,
            flags: 1,
            size: MAX_PAYLOAD as u32,
        }
        .encode();
        assert_eq!(
            decode(&largest),
            Ok(Decoded::Incomplete {
                needed: HEADER_LEN + MAX_PAYLOAD
            })
        );
    }

    proptest! {
        /// Decoding a stream message by message, with the buffer grown exactly to what
        /// `decode` asks for (as the shim reads), gives the messages that decoding the whole
        /// stream does, and never asks for more than one bounded message.
        #[test]
        fn decoding_what_is_asked_for_matches_decoding_the_whole(
            stream in proptest::collection::vec(any::<u8>(), 0..200),
            version_one in any::<bool>(),
            small in any::<bool>(),
        ) {
            let mut stream = stream;
            // Make valid headers likely: version 1 and a short payload.
            if stream.len() >= HEADER_LEN {
                if version_one { stream[4] = (stream[4] & !3) | 1; }
                if small { stream[8] %= 40; stream[9] = 0; stream[10] = 0; stream[11] = 0; }
            }
            let mut whole = Vec::new();
            let mut at = 0;
            let whole_end = loop {
                match decode(&stream[at..]) {
                    Ok(Decoded::Message { header, payload }) => {
                        prop_assert_eq!(payload.len(), header.size as usize);
                        whole.push((header, payload.to_vec()));
                        at += HEADER_LEN + payload.len();
                    }
                    Ok(Decoded::Incomplete { needed }) => {
                        prop_assert!(needed > stream.len() - at);
                        prop_assert!(needed <= HEADER_LEN + MAX_PAYLOAD);
                        break Ok(());
                    }
                    Err(e) => break Err(e),
                }
            };
            let mut asked = Vec::new();
            let mut buf: Vec<u8> = Vec::new();
            let mut at = 0;
            let asked_end = loop {
                match decode(&buf) {
                    Ok(Decoded::Message { header, payload }) => {
                        asked.push((header, payload.to_vec()));
                        buf.clear();
                    }
                    Ok(Decoded::Incomplete { needed }) => {
                        let more = needed - buf.len();
                        if stream.len() - at < more {
                            break Ok(());
                        }
                        buf.extend_from_slice(&stream[at..at + more]);
                        at += more;
                    }
                    Err(e) => break Err(e),
                }
            };
            prop_assert_eq!(whole, asked);
            prop_assert_eq!(whole_end, asked_end);
        }

        /// Any 12 bytes either parse into a header that is within bounds and re-encodes to the
        /// same bytes, or are refused; nothing panics.
        #[test]
        fn parse_is_total_and_bounded(bytes in proptest::array::uniform12(any::<u8>())) {
            match Header::parse(&bytes) {
                Ok(h) => {
                    prop_assert!(h.size as usize <= MAX_PAYLOAD);
                    prop_assert_eq!(h.flags & FLAG_VERSION_MASK, 1);
                    prop_assert_eq!(h.encode(), bytes);
                }
                Err(WireError::BadVersion(v)) => prop_assert_ne!(v, 1),
                Err(WireError::TooLarge(s)) => prop_assert!(s as usize > MAX_PAYLOAD),
            }
        }

        #[test]
        fn payload_parsers_never_panic(p in proptest::collection::vec(any::<u8>(), 0..32)) {
            let _ = payload_u64(&p);
            let _ = payload_vring_fd_index(&p);
            prop_assert_eq!(payload_vring_state(&p).is_some(), p.len() == 8);
        }
    }
}
