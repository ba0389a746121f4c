//! Transmission-phase replies, simple or structured. A [`Reply`] is a header
//! plus an optional data block kept apart, so read data goes to the socket
//! without being copied behind the header.

use bytes::Bytes;

use super::consts::{SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, reply};
use super::errno::NbdErrno;

/// Which reply format the connection negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStyle {
    /// 16-byte simple replies (the default).
    Simple,
    /// Structured reply chunks (after `NBD_OPT_STRUCTURED_REPLY`).
    Structured,
}

/// One reply, ready for the socket: `head` then `data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The client's cookie (for logs and ordering checks).
    pub handle: u64,
    /// Header bytes (and, for structured errors, the whole chunk).
    pub head: Vec<u8>,
    /// Read data following the header; empty otherwise.
    pub data: Bytes,
}

impl Reply {
    /// Success without data (writes, flush, trim, zeroing).
    pub fn done(style: ReplyStyle, handle: u64) -> Reply {
        let head = match style {
            ReplyStyle::Simple => simple_header(handle, 0),
            ReplyStyle::Structured => chunk_header(reply::TYPE_NONE, handle, 0),
        };
        Reply {
            handle,
            head,
            data: Bytes::new(),
        }
    }

    /// A failed request. Structured replies carry a short message, which
    /// clients such as nbdinfo and qemu-io print.
    pub fn error(style: ReplyStyle, handle: u64, errno: NbdErrno, message: &str) -> Reply {
        let head = match style {
            ReplyStyle::Simple => simple_header(handle, errno.code()),
            ReplyStyle::Structured => {
                // The specification caps messages at 4096 bytes; ours are
                // short constants, cut at a character boundary to be safe.
                let msg = truncate_utf8(message, 4096);
                let mut head = chunk_header(reply::TYPE_ERROR, handle, 6 + msg.len() as u32);
                head.extend_from_slice(&errno.code().to_be_bytes());
                head.extend_from_slice(&(msg.len() as u16).to_be_bytes());
                head.extend_from_slice(msg.as_bytes());
                head
            }
        };
        Reply {
            handle,
            head,
            data: Bytes::new(),
        }
    }

    /// The data of a successful read of `data.len()` bytes at `offset`.
    pub fn read(style: ReplyStyle, handle: u64, offset: u64, data: Bytes) -> Reply {
        let head = match style {
            ReplyStyle::Simple => simple_header(handle, 0),
            ReplyStyle::Structured => {
                // Reads are bounded by the maximum block size (far below
                // 4 GiB), so the chunk length cannot overflow.
                let len = 8 + data.len() as u32;
                let mut head = chunk_header(reply::TYPE_OFFSET_DATA, handle, len);
                head.extend_from_slice(&offset.to_be_bytes());
                head
            }
        };
        Reply { handle, head, data }
    }

    /// Total bytes on the wire.
    pub fn wire_len(&self) -> usize {
        self.head.len() + self.data.len()
    }
}

fn simple_header(handle: u64, error: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
    out
}

/// Every reply colo-blockd sends is a single chunk, so each carries `DONE`.
fn chunk_header(chunk_type: u16, handle: u64, length: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + 8);
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&reply::FLAG_DONE.to_be_bytes());
    out.extend_from_slice(&chunk_type.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    out
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_replies_carry_errno_and_handle() {
        let r = Reply::error(ReplyStyle::Simple, 0x0102, NbdErrno::NoSpc, "ignored");
        assert_eq!(r.head.len(), 16);
        assert_eq!(&r.head[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r.head[4..8], &28u32.to_be_bytes());
        assert_eq!(&r.head[8..], &0x0102u64.to_be_bytes());
    }

    #[test]
    fn structured_read_is_one_offset_data_chunk_marked_done() {
        let r = Reply::read(ReplyStyle::Structured, 9, 512, Bytes::from_static(b"abc"));
        assert_eq!(r.head.len(), 28);
        assert_eq!(&r.head[4..6], &reply::FLAG_DONE.to_be_bytes());
        assert_eq!(&r.head[6..8], &reply::TYPE_OFFSET_DATA.to_be_bytes());
        assert_eq!(&r.head[16..20], &11u32.to_be_bytes());
        assert_eq!(&r.head[20..], &512u64.to_be_bytes());
        assert_eq!(r.wire_len(), 31);
    }

    #[test]
    fn structured_error_chunk_length_covers_errno_and_message() {
        let r = Reply::error(ReplyStyle::Structured, 1, NbdErrno::Inval, "bad");
        assert_eq!(&r.head[6..8], &reply::TYPE_ERROR.to_be_bytes());
        assert_eq!(&r.head[16..20], &9u32.to_be_bytes());
        assert_eq!(&r.head[20..24], &22u32.to_be_bytes());
        assert_eq!(&r.head[24..26], &3u16.to_be_bytes());
        assert_eq!(&r.head[26..], b"bad");
    }

    #[test]
    fn long_messages_are_cut_at_a_char_boundary() {
        let s = "é".repeat(3000);
        let t = truncate_utf8(&s, 4096);
        assert!(t.len() <= 4096 && t.chars().all(|c| c == 'é'));
    }
}
