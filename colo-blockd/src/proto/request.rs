//! Transmission-phase requests: the 28-byte header, the decoder that cuts a
//! byte stream into requests (with the payload of `NBD_CMD_WRITE`), and the
//! check of a request against its export. All pure; the server feeds the
//! decoder from the socket.

use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::Decoder;

use super::ProtoError;
use super::consts::{REQUEST_MAGIC, cmd, cmd_flags};
use super::errno::NbdErrno;
use super::handshake::Reader;

/// Length of a request header.
pub const REQUEST_HEADER_LEN: usize = 28;

/// The fixed part of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// `NBD_CMD_FLAG_*` bits.
    pub flags: u16,
    /// `NBD_CMD_*` number.
    pub command: u16,
    /// The client's cookie, echoed in the reply.
    pub handle: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Length of the range (and of the payload for writes).
    pub length: u32,
}

impl RequestHeader {
    /// Parses the first [`REQUEST_HEADER_LEN`] bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<RequestHeader, ProtoError> {
        let mut r = Reader::new(bytes);
        let magic = r.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic {
                expected: u64::from(REQUEST_MAGIC),
                found: u64::from(magic),
            });
        }
        Ok(RequestHeader {
            flags: r.u16()?,
            command: r.u16()?,
            handle: r.u64()?,
            offset: r.u64()?,
            length: r.u32()?,
        })
    }

    /// The header as a client sends it (tests, fuzzers).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut out = [0u8; REQUEST_HEADER_LEN];
        out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.handle.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// Whether a payload of `length` bytes follows the header. Only
    /// `NBD_CMD_WRITE`: without extended headers no other command carries
    /// one, whatever flags it has, so the stream stays in step.
    pub fn has_payload(&self) -> bool {
        self.command == cmd::WRITE
    }
}

/// A request as read off the wire, not yet checked against the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRequest {
    /// The header.
    pub header: RequestHeader,
    /// The write payload (empty for other commands).
    pub payload: Bytes,
}

/// Cuts a byte stream into [`RawRequest`]s.
///
/// A write whose payload is longer than `max_payload` is an error, not a
/// request: the server cannot skip gigabytes without reading them, so it
/// answers the handle and closes the connection.
#[derive(Debug, Clone)]
pub struct RequestDecoder {
    max_payload: u32,
    pending: Option<RequestHeader>,
}

impl RequestDecoder {
    /// A decoder that accepts write payloads up to `max_payload` bytes.
    pub fn new(max_payload: u32) -> RequestDecoder {
        RequestDecoder {
            max_payload,
            pending: None,
        }
    }
}

impl Decoder for RequestDecoder {
    type Item = RawRequest;
    type Error = ProtoError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<RawRequest>, ProtoError> {
        let header = match self.pending {
            Some(h) => h,
            None => {
                if src.len() < REQUEST_HEADER_LEN {
                    return Ok(None);
                }
                let h = RequestHeader::parse(&src[..REQUEST_HEADER_LEN])?;
                if h.has_payload() && h.length > self.max_payload {
                    return Err(ProtoError::PayloadTooLarge {
                        handle: h.handle,
                        length: h.length,
                    });
                }
                src.advance(REQUEST_HEADER_LEN);
                h
            }
        };
        let payload_len = if header.has_payload() {
            header.length as usize
        } else {
            0
        };
        if src.len() < payload_len {
            self.pending = Some(header);
            src.reserve(payload_len - src.len());
            return Ok(None);
        }
        self.pending = None;
        let payload = src.split_to(payload_len).freeze();
        Ok(Some(RawRequest { header, payload }))
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<RawRequest>, ProtoError> {
        match self.decode(buf)? {
            Some(req) => Ok(Some(req)),
            None if buf.is_empty() && self.pending.is_none() => Ok(None),
            None => Err(ProtoError::Truncated {
                need: REQUEST_HEADER_LEN.max(buf.len() + 1),
                have: buf.len(),
            }),
        }
    }
}

/// What the export allows, for [`validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportLimits {
    /// Export size in bytes.
    pub size: u64,
    /// Largest read or write length (the advertised maximum block size).
    pub max_length: u32,
    /// Writes, trims and zeroing are refused with `EPERM`.
    pub read_only: bool,
}

/// How `NBD_CMD_WRITE_ZEROES` may zero the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroMode {
    /// The server may deallocate instead of writing zeroes (`NO_HOLE` unset).
    pub may_trim: bool,
    /// Fail with `ENOTSUP` rather than zero slowly (`FAST_ZERO`).
    pub fast_only: bool,
}

/// A request that passed [`validate`]: its range lies inside the export and
/// its flags fit the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `length` bytes at `offset`.
    Read {
        /// Start of the range.
        offset: u64,
        /// Bytes to read.
        length: u32,
    },
    /// Write the payload at `offset`.
    Write {
        /// Start of the range.
        offset: u64,
        /// Durable before the reply (`FUA`).
        fua: bool,
    },
    /// Make every completed write durable.
    Flush,
    /// The range may be discarded.
    Trim {
        /// Start of the range.
        offset: u64,
        /// Bytes to discard.
        length: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// The range must read back as zeroes.
    WriteZeroes {
        /// Start of the range.
        offset: u64,
        /// Bytes to zero.
        length: u32,
        /// Durable before the reply.
        fua: bool,
        /// How zeroes may be produced.
        mode: ZeroMode,
    },
    /// The client leaves; no reply.
    Disconnect,
}

/// Checks a request against its export. The error is what the client gets;
/// nothing is executed for a refused request.
pub fn validate(h: &RequestHeader, limits: &ExportLimits) -> Result<Command, NbdErrno> {
    let allowed = match h.command {
        cmd::READ | cmd::FLUSH | cmd::DISC => 0,
        cmd::WRITE | cmd::TRIM => cmd_flags::FUA,
        cmd::WRITE_ZEROES => cmd_flags::FUA | cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO,
        // CACHE, BLOCK_STATUS and unknown numbers are not advertised or not
        // negotiated: the specification asks for EINVAL.
        _ => return Err(NbdErrno::Inval),
    };
    if h.command == cmd::DISC {
        return Ok(Command::Disconnect);
    }
    if h.flags & !allowed != 0 {
        return Err(NbdErrno::Inval);
    }
    let fua = h.flags & cmd_flags::FUA != 0;
    if h.command == cmd::FLUSH {
        if h.offset != 0 || h.length != 0 {
            return Err(NbdErrno::Inval);
        }
        return Ok(Command::Flush);
    }
    let writes = h.command != cmd::READ;
    if writes && limits.read_only {
        return Err(NbdErrno::Perm);
    }
    // Only data-carrying commands are bounded by the maximum block size; a
    // trim or zeroing of a large range moves no bytes over the wire.
    if matches!(h.command, cmd::READ | cmd::WRITE) && h.length > limits.max_length {
        return Err(NbdErrno::Inval);
    }
    let end = h.offset.checked_add(u64::from(h.length));
    match end {
        Some(end) if end <= limits.size => {}
        // The specification asks for ENOSPC on writes past the end, EINVAL
        // for everything else out of range.
        _ if matches!(h.command, cmd::WRITE | cmd::WRITE_ZEROES) => return Err(NbdErrno::NoSpc),
        _ => return Err(NbdErrno::Inval),
    }
    Ok(match h.command {
        cmd::READ => Command::Read {
            offset: h.offset,
            length: h.length,
        },
        cmd::WRITE => Command::Write {
            offset: h.offset,
            fua,
        },
        cmd::TRIM => Command::Trim {
            offset: h.offset,
            length: h.length,
            fua,
        },
        _ => Command::WriteZeroes {
            offset: h.offset,
            length: h.length,
            fua,
            mode: ZeroMode {
                may_trim: h.flags & cmd_flags::NO_HOLE == 0,
                fast_only: h.flags & cmd_flags::FAST_ZERO != 0,
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ExportLimits = ExportLimits {
        size: 1 << 20,
        max_length: 1 << 16,
        read_only: false,
    };

    fn header(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            handle: 7,
            offset,
            length,
        }
    }

    #[test]
    fn decoder_waits_for_the_whole_write_payload() {
        let h = header(cmd::WRITE, 0, 0, 4);
        let mut buf = BytesMut::from(&h.encode()[..]);
        buf.extend_from_slice(b"ab");
        let mut d = RequestDecoder::new(16);
        assert_eq!(d.decode(&mut buf), Ok(None));
        buf.extend_from_slice(b"cd");
        let req = d.decode(&mut buf).unwrap().unwrap();
        assert_eq!(req.header, h);
        assert_eq!(&req.payload[..], b"abcd");
        assert!(buf.is_empty());
    }

    #[test]
    fn decoder_refuses_absurd_write_lengths_before_buffering() {
        let h = header(cmd::WRITE, 0, 0, u32::MAX);
        let mut buf = BytesMut::from(&h.encode()[..]);
        assert_eq!(
            RequestDecoder::new(1 << 20).decode(&mut buf),
            Err(ProtoError::PayloadTooLarge {
                handle: 7,
                length: u32::MAX
            })
        );
    }

    #[test]
    fn a_read_of_any_length_has_no_payload() {
        let h = header(cmd::READ, 0, 0, u32::MAX);
        let mut buf = BytesMut::from(&h.encode()[..]);
        let req = RequestDecoder::new(16).decode(&mut buf).unwrap().unwrap();
        assert!(req.payload.is_empty());
    }

    #[test]
    fn eof_inside_a_request_is_truncation() {
        let mut buf = BytesMut::from(&header(cmd::READ, 0, 0, 1).encode()[..10]);
        assert!(matches!(
            RequestDecoder::new(16).decode_eof(&mut buf),
            Err(ProtoError::Truncated { .. })
        ));
    }

    #[test]
    fn validate_accepts_in_range_commands() {
        assert_eq!(
            validate(&header(cmd::READ, 0, 4096, 4096), &LIMITS),
            Ok(Command::Read {
                offset: 4096,
                length: 4096
            })
        );
        assert_eq!(
            validate(
                &header(
                    cmd::WRITE_ZEROES,
                    cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO,
                    0,
                    1 << 20
                ),
                &LIMITS
            ),
            Ok(Command::WriteZeroes {
                offset: 0,
                length: 1 << 20,
                fua: false,
                mode: ZeroMode {
                    may_trim: false,
                    fast_only: true
                }
            })
        );
        assert_eq!(
            validate(&header(cmd::WRITE, cmd_flags::FUA, 0, 1), &LIMITS),
            Ok(Command::Write {
                offset: 0,
                fua: true
            })
        );
    }

    #[test]
    fn validate_refuses_out_of_range_with_the_specified_errno() {
        let end = LIMITS.size;
        assert_eq!(
            validate(&header(cmd::READ, 0, end, 1), &LIMITS),
            Err(NbdErrno::Inval)
        );
        assert_eq!(
            validate(&header(cmd::WRITE, 0, end - 1, 2), &LIMITS),
            Err(NbdErrno::NoSpc)
        );
        assert_eq!(
            validate(&header(cmd::WRITE_ZEROES, 0, u64::MAX, 2), &LIMITS),
            Err(NbdErrno::NoSpc)
        );
        assert_eq!(
            validate(&header(cmd::TRIM, 0, u64::MAX, 1), &LIMITS),
            Err(NbdErrno::Inval)
        );
    }

    #[test]
    fn validate_refuses_bad_flags_unknown_commands_and_long_reads() {
        assert_eq!(
            validate(&header(cmd::READ, cmd_flags::FUA, 0, 1), &LIMITS),
            Err(NbdErrno::Inval)
        );
        assert_eq!(
            validate(&header(cmd::WRITE, cmd_flags::NO_HOLE, 0, 1), &LIMITS),
            Err(NbdErrno::Inval)
        );
        assert_eq!(
            validate(&header(cmd::FLUSH, 0, 0, 1), &LIMITS),
            Err(NbdErrno::Inval)
        );
        for c in [cmd::CACHE, cmd::BLOCK_STATUS, 99, u16::MAX] {
            assert_eq!(validate(&header(c, 0, 0, 1), &LIMITS), Err(NbdErrno::Inval));
        }
        assert_eq!(
            validate(&header(cmd::READ, 0, 0, LIMITS.max_length + 1), &LIMITS),
            Err(NbdErrno::Inval)
        );
    }

    #[test]
    fn read_only_exports_refuse_every_modification() {
        let ro = ExportLimits {
            read_only: true,
            ..LIMITS
        };
        for c in [cmd::WRITE, cmd::TRIM, cmd::WRITE_ZEROES] {
            assert_eq!(validate(&header(c, 0, 0, 1), &ro), Err(NbdErrno::Perm));
        }
        assert!(validate(&header(cmd::READ, 0, 0, 1), &ro).is_ok());
        assert_eq!(
            validate(&header(cmd::FLUSH, 0, 0, 0), &ro),
            Ok(Command::Flush)
        );
    }
}
