//! Newline framing with a length bound.
//!
//! Our own codec instead of `LinesCodec` because we want raw bytes (the JSON
//! parser validates UTF-8 itself, so a stray invalid byte costs one skipped
//! line instead of a codec error), and because we must tell "EOF in the middle
//! of a line" apart from other failures.

use bytes::BytesMut;
use tokio_util::codec::Decoder;

/// Why framing stopped.
#[derive(Debug)]
pub(crate) enum LineError {
    /// Read error from the underlying stream.
    Io(std::io::Error),
    /// A line exceeded the limit; the stream cannot be resynchronised.
    TooLong { limit: usize },
    /// The stream ended with an unterminated, non-blank partial line.
    Truncated { bytes: usize },
}

impl From<std::io::Error> for LineError {
    fn from(e: std::io::Error) -> Self {
        LineError::Io(e)
    }
}

/// Splits a byte stream at `\n`, stripping an optional `\r` (QEMU ends its
/// lines with `\r\n`).
#[derive(Debug)]
pub(crate) struct LineCodec {
    max: usize,
    /// How far the current buffer has already been scanned for `\n`, so a
    /// long line arriving in many small reads is not rescanned quadratically.
    scanned: usize,
}

impl LineCodec {
    pub(crate) fn new(max: usize) -> Self {
        Self { max, scanned: 0 }
    }
}

impl Decoder for LineCodec {
    type Item = BytesMut;
    type Error = LineError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>, LineError> {
        let start = self.scanned.min(buf.len());
        match buf[start..].iter().position(|&b| b == b'\n') {
            Some(offset) => {
                let newline = start + offset;
                self.scanned = 0;
                let mut line = buf.split_to(newline + 1);
                line.truncate(newline);
                if line.last() == Some(&b'\r') {
                    line.truncate(newline - 1);
                }
                if line.len() > self.max {
                    return Err(LineError::TooLong { limit: self.max });
                }
                Ok(Some(line))
            }
            None => {
                // Fail as soon as the partial line is over the limit rather
                // than buffering an unbounded amount first. One byte of slack
                // for a `\r` that will be stripped.
                if buf.len() > self.max.saturating_add(1) {
                    return Err(LineError::TooLong { limit: self.max });
                }
                self.scanned = buf.len();
                Ok(None)
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>, LineError> {
        if let Some(line) = self.decode(buf)? {
            return Ok(Some(line));
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            buf.clear();
            Ok(None)
        } else {
            Err(LineError::Truncated { bytes: buf.len() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(codec: &mut LineCodec, input: &[u8]) -> Vec<Result<Vec<u8>, String>> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(l)) => out.push(Ok(l.to_vec())),
                Ok(None) => break,
                Err(e) => {
                    out.push(Err(format!("{e:?}")));
                    break;
                }
            }
        }
        out
    }

    #[test]
    fn splits_and_strips_crlf() {
        let mut c = LineCodec::new(100);
        let got = decode_all(&mut c, b"{\"a\":1}\r\n{\"b\":2}\n{\"c\"");
        assert_eq!(
            got,
            vec![Ok(b"{\"a\":1}".to_vec()), Ok(b"{\"b\":2}".to_vec())]
        );
    }

    #[test]
    fn short_line_after_partially_scanned_long_line() {
        let mut c = LineCodec::new(100);
        let mut buf = BytesMut::from(&b"0123456789abcdef"[..]);
        assert!(c.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(
            b"gh
xy
z",
        );
        assert_eq!(
            &c.decode(&mut buf).unwrap().unwrap()[..],
            b"0123456789abcdefgh"
        );
        assert_eq!(&c.decode(&mut buf).unwrap().unwrap()[..], b"xy");
        assert!(c.decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn rejects_long_line_with_and_without_newline() {
        let mut c = LineCodec::new(4);
        assert!(matches!(
            decode_all(&mut c, b"123456\n").as_slice(),
            [Err(e)] if e.contains("TooLong")
        ));
        let mut c = LineCodec::new(4);
        assert!(matches!(
            decode_all(&mut c, b"1234567").as_slice(),
            [Err(e)] if e.contains("TooLong")
        ));
        let mut c = LineCodec::new(4);
        assert_eq!(decode_all(&mut c, b"1234\r\n"), vec![Ok(b"1234".to_vec())]);
    }

    #[test]
    fn eof_mid_line_is_truncation_but_trailing_blank_is_not() {
        let mut c = LineCodec::new(100);
        let mut buf = BytesMut::from(&b"{\"ret"[..]);
        assert!(matches!(
            c.decode_eof(&mut buf),
            Err(LineError::Truncated { bytes: 5 })
        ));
        let mut buf = BytesMut::from(&b" \r"[..]);
        assert!(matches!(c.decode_eof(&mut buf), Ok(None)));
    }
}
