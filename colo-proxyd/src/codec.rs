//! Framing of QEMU's net-filter sockets (`filter-mirror`, `filter-redirector`, colo-compare's
//! chardevs).
//!
//! On the wire every frame is a big-endian u32 length, then — only when the filter has
//! `vnet_hdr_support=on` — a big-endian u32 vnet-header length, then `length` bytes. The vnet
//! header, when present, is the *first* `vnet_hdr_len` bytes of those `length` bytes (QEMU's
//! `_filter_send` counts it in the frame length), the Ethernet frame follows it.
//!
//! QEMU's reader (`net_fill_rstate`) accepts frames up to `NET_BUFSIZE` (4096 + 65536 bytes) and
//! drops the whole connection on a longer one; a zero-length frame is legal on its side, so it
//! is here too.

pub mod read_buffer;

use bytes::buf::Limit;
use bytes::{Bytes, BytesMut};
use thiserror::Error;

use self::read_buffer::ReadBuffer;

/// The largest frame QEMU reads or writes on a net-filter socket (`NET_BUFSIZE`).
pub const MAX_FRAME_LEN: usize = 4096 + 65536;

/// Size of the length prefix, and of the vnet-header length that may follow it.
const PREFIX_LEN: usize = 4;

/// What went wrong on one net-filter stream. Every error ends that stream: the framing has no
/// resynchronisation point, so the only safe recovery is a new connection.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodecError {
    /// The length prefix announces more than QEMU would ever send.
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME_LEN} bytes")]
    Oversized {
        /// The announced frame length.
        len: u32,
    },
    /// The vnet header cannot be longer than the frame that carries it.
    #[error("vnet header of {vnet_hdr_len} bytes is longer than its {frame_len}-byte frame")]
    VnetHeaderTooLong {
        /// The announced vnet-header length.
        vnet_hdr_len: u32,
        /// The announced frame length.
        frame_len: u32,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({buffered} bytes of it were received)")]
    Truncated {
        /// Bytes of the unfinished frame (prefixes included) that had arrived.
        buffered: usize,
    },
    /// A frame with a vnet header was to be sent on a stream without `vnet_hdr_support`.
    #[error("frame has a {vnet_hdr_len}-byte vnet header but the stream has no vnet_hdr_support")]
    VnetHeaderNotNegotiated {
        /// The frame's vnet-header length.
        vnet_hdr_len: u32,
    },
}

/// One frame as QEMU sends it: an optional virtio-net header followed by an Ethernet frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// How many leading bytes of `data` are the virtio-net header (0 without vnet_hdr_support).
    pub vnet_hdr_len: u32,
    /// The vnet header and the Ethernet frame, as on the wire.
    pub data: Vec<u8>,
}

impl Frame {
    /// A frame without a vnet header.
    pub fn ethernet(data: Vec<u8>) -> Self {
        Frame {
            vnet_hdr_len: 0,
            data,
        }
    }

    /// The Ethernet frame (everything after the vnet header).
    pub fn ethernet_bytes(&self) -> &[u8] {
        // The decoder and `encode` both guarantee vnet_hdr_len <= data.len(); `get` keeps a
        // hand-built inconsistent Frame from panicking.
        self.data.get(self.vnet_hdr_len as usize..).unwrap_or(&[])
    }

    /// The virtio-net header (empty without vnet_hdr_support).
    pub fn vnet_header(&self) -> &[u8] {
        let end = (self.vnet_hdr_len as usize).min(self.data.len());
        &self.data[..end]
    }
}

/// A frame borrowed from a [`FrameDecoder`]'s buffer, valid until the decoder is used again:
/// what a daemon that compares a frame and forwards it at once needs, without the copy and
/// allocation of an owned [`Frame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef<'a> {
    /// How many leading bytes of `data` are the virtio-net header.
    pub vnet_hdr_len: u32,
    /// The vnet header and the Ethernet frame, as on the wire.
    pub data: &'a [u8],
}

impl FrameRef<'_> {
    /// The Ethernet frame (everything after the vnet header).
    pub fn ethernet_bytes(&self) -> &[u8] {
        self.data.get(self.vnet_hdr_len as usize..).unwrap_or(&[])
    }

    /// An owned copy, to keep beyond the decoder's next use.
    pub fn to_frame(&self) -> Frame {
        Frame {
            vnet_hdr_len: self.vnet_hdr_len,
            data: self.data.to_vec(),
        }
    }
}

/// Streaming decoder for one net-filter socket: feed it whatever the socket returned, in chunks
/// split anywhere, and take frames out as they complete.
///
/// Two ways in: [`Self::feed`] copies bytes read elsewhere; [`Self::read_from`] (and
/// [`Self::read_with`]) read straight into the decoder's buffer. Three ways out:
/// [`Self::next_frame`] (an owned copy), [`Self::next_frame_ref`] (borrowed until the next
/// call) and [`Self::next_frame_bytes`] (shared with the buffer, no copy; see
/// [`read_buffer`] for the memory that keeps alive).
#[derive(Debug)]
pub struct FrameDecoder {
    vnet_hdr_support: bool,
    buffer: ReadBuffer,
    /// Bytes at the start of `buffer` of the frame last lent by [`Self::next_frame_ref`],
    /// consumed at the decoder's next use.
    lent: usize,
    failed: Option<CodecError>,
}

/// Where the next frame lies in the pending bytes.
struct FrameLayout {
    vnet_hdr_len: u32,
    /// Length prefixes.
    header_len: usize,
    /// Prefixes and frame.
    total: usize,
}

impl FrameDecoder {
    /// A decoder for a stream whose filter has `vnet_hdr_support` set as given.
    pub fn new(vnet_hdr_support: bool) -> Self {
        FrameDecoder {
            vnet_hdr_support,
            buffer: ReadBuffer::default(),
            lent: 0,
            failed: None,
        }
    }

    /// Appends bytes read from the socket.
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        self.return_lent();
        self.buffer.append(chunk);
    }

    /// Reads once from `reader` straight into the decoder's buffer (at most one chunk, see
    /// [`read_buffer`]); `Ok(0)` is the end of the stream. Cancel-safe: dropped before it
    /// completes, it has read nothing.
    pub async fn read_from<R>(&mut self, reader: &mut R) -> std::io::Result<usize>
    where
        R: tokio::io::AsyncRead + Unpin,
    {
        use tokio::io::AsyncReadExt;
        let mut space = self.read_space();
        reader.read_buf(&mut space).await
    }

    /// Lets `read` append to the decoder's buffer, as [`Self::read_from`] does, for a
    /// non-blocking read (`TcpStream::try_read_buf`) or bytes from elsewhere. The space
    /// given is never empty, so a read of 0 bytes still means the end of the stream.
    pub fn read_with<T>(&mut self, read: impl FnOnce(&mut Limit<&mut BytesMut>) -> T) -> T {
        read(&mut self.read_space())
    }

    fn read_space(&mut self) -> Limit<&mut BytesMut> {
        self.return_lent();
        if self.failed.is_some() {
            // Whatever is read now is discarded: the stream has failed.
            self.buffer.clear();
        }
        // Room for the whole unfinished frame when its length is known, so that it ends up
        // contiguous without being copied again.
        let frame_total = match self.layout() {
            Ok(Some(layout)) => layout.total,
            Ok(None) | Err(_) => 0,
        };
        self.buffer.read_space(frame_total)
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed. After an error every
    /// later call returns the same error: the stream cannot be resynchronised.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, CodecError> {
        Ok(self.next_frame_ref()?.map(|frame| frame.to_frame()))
    }

    /// [`Self::next_frame`], borrowed from the decoder's buffer instead of copied out.
    pub fn next_frame_ref(&mut self) -> Result<Option<FrameRef<'_>>, CodecError> {
        let Some(layout) = self.next_layout()? else {
            return Ok(None);
        };
        self.lent = layout.total;
        Ok(Some(FrameRef {
            vnet_hdr_len: layout.vnet_hdr_len,
            data: &self.buffer.pending()[layout.header_len..layout.total],
        }))
    }

    /// The next complete frame's Ethernet bytes (its vnet header, if any, is skipped), split
    /// off the decoder's buffer without a copy (frames under
    /// [`COPY_BELOW`](read_buffer::COPY_BELOW) bytes are copied: see [`read_buffer`]).
    /// `Ok(None)` and errors as for [`Self::next_frame`].
    pub fn next_frame_bytes(&mut self) -> Result<Option<Bytes>, CodecError> {
        let Some(layout) = self.next_layout()? else {
            return Ok(None);
        };
        self.buffer
            .consume(layout.header_len + layout.vnet_hdr_len as usize);
        let ethernet = layout.total - layout.header_len - layout.vnet_hdr_len as usize;
        Ok(Some(self.buffer.take(ethernet)))
    }

    /// Call when the stream reached its end: an error if it ended inside a frame.
    pub fn finish(&self) -> Result<(), CodecError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        match self.buffer.pending().len() - self.lent {
            0 => Ok(()),
            buffered => Err(CodecError::Truncated { buffered }),
        }
    }

    fn return_lent(&mut self) {
        self.buffer.consume(std::mem::take(&mut self.lent));
    }

    /// The next complete frame's layout; an error fails the stream for good.
    fn next_layout(&mut self) -> Result<Option<FrameLayout>, CodecError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        self.return_lent();
        match self.layout() {
            Ok(Some(layout)) if layout.total <= self.buffer.pending().len() => Ok(Some(layout)),
            Ok(_) => Ok(None),
            Err(error) => {
                self.failed = Some(error.clone());
                self.buffer.clear();
                Err(error)
            }
        }
    }

    /// The layout of the frame at the start of the pending bytes, as far as its prefixes
    /// have arrived (`Ok(None)`: not yet); its body may still be missing.
    fn layout(&self) -> Result<Option<FrameLayout>, CodecError> {
        let pending = &self.buffer.pending()[self.lent..];
        let Some(frame_len) = read_be32(pending, 0) else {
            return Ok(None);
        };
        // Checked before the body arrives, so an absurd length never makes us buffer it.
        if frame_len as usize > MAX_FRAME_LEN {
            return Err(CodecError::Oversized { len: frame_len });
        }
        let (vnet_hdr_len, header_len) = if self.vnet_hdr_support {
            let Some(vnet_hdr_len) = read_be32(pending, PREFIX_LEN) else {
                return Ok(None);
            };
            if vnet_hdr_len > frame_len {
                return Err(CodecError::VnetHeaderTooLong {
                    vnet_hdr_len,
                    frame_len,
                });
            }
            (vnet_hdr_len, 2 * PREFIX_LEN)
        } else {
            (0, PREFIX_LEN)
        };
        Ok(Some(FrameLayout {
            vnet_hdr_len,
            header_len,
            total: header_len + frame_len as usize,
        }))
    }
}

fn read_be32(bytes: &[u8], at: usize) -> Option<u32> {
    let word: [u8; 4] = bytes.get(at..at + PREFIX_LEN)?.try_into().ok()?;
    Some(u32::from_be_bytes(word))
}

/// Appends `frame` to `out` as QEMU expects it on a stream with `vnet_hdr_support` as given.
pub fn encode(frame: &Frame, vnet_hdr_support: bool, out: &mut Vec<u8>) -> Result<(), CodecError> {
    encode_parts(frame.vnet_hdr_len, &frame.data, vnet_hdr_support, out)
}

/// [`encode`] for an Ethernet frame without a vnet header, wherever its bytes lie (a shared
/// [`Bytes`] needs no [`Frame`] of its own).
pub fn encode_ethernet(
    ethernet: &[u8],
    vnet_hdr_support: bool,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    encode_parts(0, ethernet, vnet_hdr_support, out)
}

fn encode_parts(
    vnet_hdr_len: u32,
    data: &[u8],
    vnet_hdr_support: bool,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let frame_len = data.len();
    if frame_len > MAX_FRAME_LEN {
        return Err(CodecError::Oversized {
            len: u32::try_from(frame_len).unwrap_or(u32::MAX),
        });
    }
    // MAX_FRAME_LEN fits in a u32, so this cannot truncate.
    let frame_len = frame_len as u32;
    if vnet_hdr_len > frame_len {
        return Err(CodecError::VnetHeaderTooLong {
            vnet_hdr_len,
            frame_len,
        });
    }
    if !vnet_hdr_support && vnet_hdr_len != 0 {
        return Err(CodecError::VnetHeaderNotNegotiated { vnet_hdr_len });
    }
    out.extend_from_slice(&frame_len.to_be_bytes());
    if vnet_hdr_support {
        out.extend_from_slice(&vnet_hdr_len.to_be_bytes());
    }
    out.extend_from_slice(data);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;
    use proptest::prelude::*;

    fn decode_all(decoder: &mut FrameDecoder) -> Result<Vec<Frame>, CodecError> {
        let mut frames = Vec::new();
        while let Some(frame) = decoder.next_frame()? {
            frames.push(frame);
        }
        Ok(frames)
    }

    #[test]
    fn borrowed_frames_are_the_owned_ones() {
        let mut wire = Vec::new();
        for (i, len) in [0usize, 1, 60, 1514].into_iter().enumerate() {
            let frame = Frame {
                vnet_hdr_len: (i % 2) as u32,
                data: vec![i as u8; len.max(1)],
            };
            encode(&frame, true, &mut wire).unwrap();
        }
        let mut owned = FrameDecoder::new(true);
        owned.feed(&wire);
        let expected = decode_all(&mut owned).unwrap();
        let mut borrowed = FrameDecoder::new(true);
        let mut frames = Vec::new();
        for piece in wire.chunks(7) {
            borrowed.feed(piece);
            while let Some(frame) = borrowed.next_frame_ref().unwrap() {
                assert_eq!(frame.ethernet_bytes(), frame.to_frame().ethernet_bytes());
                frames.push(frame.to_frame());
            }
        }
        assert_eq!(frames, expected);
        assert_eq!(frames.len(), 4);
    }

    #[test]
    fn decodes_a_frame_with_vnet_header() {
        let mut decoder = FrameDecoder::new(true);
        decoder.feed(&[0, 0, 0, 5, 0, 0, 0, 2, 0xAA, 0xBB, 1, 2, 3]);
        let frame = decoder.next_frame().unwrap().unwrap();
        assert_eq!(frame.vnet_header(), &[0xAA, 0xBB]);
        assert_eq!(frame.ethernet_bytes(), &[1, 2, 3]);
        assert_eq!(decoder.next_frame(), Ok(None));
        assert_eq!(decoder.finish(), Ok(()));
    }

    #[test]
    fn largest_frame_passes_and_one_more_byte_fails() {
        let mut decoder = FrameDecoder::new(false);
        let mut wire = Vec::new();
        encode(&Frame::ethernet(vec![7; MAX_FRAME_LEN]), false, &mut wire).unwrap();
        decoder.feed(&wire);
        assert_eq!(
            decode_all(&mut decoder).unwrap()[0].data.len(),
            MAX_FRAME_LEN
        );

        decoder.feed(&(MAX_FRAME_LEN as u32 + 1).to_be_bytes());
        let error = CodecError::Oversized {
            len: MAX_FRAME_LEN as u32 + 1,
        };
        assert_eq!(decoder.next_frame(), Err(error.clone()));
        // The stream stays failed, whatever comes next.
        decoder.feed(&[0, 0, 0, 0]);
        assert_eq!(decoder.next_frame(), Err(error.clone()));
        assert_eq!(decoder.finish(), Err(error));
        assert!(
            encode(
                &Frame::ethernet(vec![0; MAX_FRAME_LEN + 1]),
                false,
                &mut wire
            )
            .is_err()
        );
    }

    #[test]
    fn vnet_header_longer_than_frame_is_an_error() {
        let mut decoder = FrameDecoder::new(true);
        decoder.feed(&[0, 0, 0, 1, 0, 0, 0, 2]);
        assert_eq!(
            decoder.next_frame(),
            Err(CodecError::VnetHeaderTooLong {
                vnet_hdr_len: 2,
                frame_len: 1
            })
        );
    }

    #[test]
    fn stream_ending_inside_a_frame_is_truncated() {
        let mut decoder = FrameDecoder::new(false);
        decoder.feed(&[0, 0, 0, 4, 1, 2]);
        assert_eq!(decoder.next_frame(), Ok(None));
        assert_eq!(decoder.finish(), Err(CodecError::Truncated { buffered: 6 }));
    }

    #[test]
    fn zero_length_frames_are_legal_as_in_qemu() {
        let mut decoder = FrameDecoder::new(false);
        decoder.feed(&[0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(decode_all(&mut decoder).unwrap().len(), 2);
    }

    #[test]
    fn vnet_header_on_a_plain_stream_is_refused_by_the_encoder() {
        let frame = Frame {
            vnet_hdr_len: 1,
            data: vec![0, 1],
        };
        assert_eq!(
            encode(&frame, false, &mut Vec::new()),
            Err(CodecError::VnetHeaderNotNegotiated { vnet_hdr_len: 1 })
        );
    }

    /// Decodes `pieces` with `next` after each; `read_into`: the pieces are read into the
    /// decoder's buffer (in reads as large as it offers) instead of fed. Returns the frames
    /// and the first error or the end's verdict.
    fn decode_pieces(
        vnet: bool,
        pieces: &[&[u8]],
        mut next: impl FnMut(&mut FrameDecoder) -> Result<Option<Vec<u8>>, CodecError>,
        read_into: bool,
    ) -> (Vec<Vec<u8>>, Result<(), CodecError>) {
        let mut decoder = FrameDecoder::new(vnet);
        let mut frames = Vec::new();
        for piece in pieces {
            let mut rest = *piece;
            while !rest.is_empty() {
                if read_into {
                    let n = decoder.read_with(|space| {
                        let n = rest.len().min(space.remaining_mut());
                        space.put_slice(&rest[..n]);
                        n
                    });
                    rest = &rest[n..];
                } else {
                    decoder.feed(rest);
                    rest = &[];
                }
                loop {
                    match next(&mut decoder) {
                        Ok(Some(frame)) => frames.push(frame),
                        Ok(None) => break,
                        Err(error) => return (frames, Err(error)),
                    }
                }
            }
        }
        let end = decoder.finish();
        (frames, end)
    }

    /// Frames copied out and split off (see [`read_buffer::COPY_BELOW`]), enough of them to
    /// cross chunks.
    fn frames_of_any_size() -> impl Strategy<Value = Vec<Frame>> {
        let len = prop_oneof![0usize..600, 600usize..20_000];
        let frame = (len, any::<u8>(), any::<u32>()).prop_map(|(len, byte, hdr)| Frame {
            vnet_hdr_len: hdr % (len as u32 + 1),
            data: (0..len).map(|i| byte.wrapping_add(i as u8)).collect(),
        });
        proptest::collection::vec(frame, 0..16)
    }

    fn frames() -> impl Strategy<Value = Vec<Frame>> {
        let frame = (proptest::collection::vec(any::<u8>(), 0..300), any::<u32>()).prop_map(
            |(data, hdr)| Frame {
                vnet_hdr_len: hdr % (data.len() as u32 + 1),
                data,
            },
        );
        proptest::collection::vec(frame, 0..8)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Every possible single split point, plus a random multi-chunking, gives back exactly
        /// the encoded frames.
        #[test]
        fn roundtrip_under_any_chunking(
            vnet in any::<bool>(),
            frames in frames(),
            cuts in proptest::collection::vec(any::<usize>(), 0..20),
        ) {
            // Without vnet_hdr_support there is no header to carry.
            let frames: Vec<Frame> = frames
                .into_iter()
                .map(|f| if vnet { f } else { Frame::ethernet(f.data) })
                .collect();
            let mut wire = Vec::new();
            for frame in &frames {
                encode(frame, vnet, &mut wire).unwrap();
            }
            // Every single split point.
            for split in 0..=wire.len() {
                let mut decoder = FrameDecoder::new(vnet);
                decoder.feed(&wire[..split]);
                let mut got = decode_all(&mut decoder).unwrap();
                decoder.feed(&wire[split..]);
                got.extend(decode_all(&mut decoder).unwrap());
                prop_assert_eq!(&got, &frames);
                prop_assert_eq!(decoder.finish(), Ok(()));
            }
            // Many random cuts at once.
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
            points.push(0);
            points.push(wire.len());
            points.sort_unstable();
            let mut decoder = FrameDecoder::new(vnet);
            let mut got = Vec::new();
            for pair in points.windows(2) {
                decoder.feed(&wire[pair[0]..pair[1]]);
                got.extend(decode_all(&mut decoder).unwrap());
            }
            prop_assert_eq!(got, frames);
        }

        /// Frames split off the buffer (fed, or read into it in arbitrary pieces) are the
        /// Ethernet bytes of the copied-out frames, and errors are the same, at the same
        /// frame.
        #[test]
        fn shared_frames_are_the_copied_ones(
            vnet in any::<bool>(),
            frames in frames_of_any_size(),
            tail in proptest::collection::vec(any::<u8>(), 0..16),
            cuts in proptest::collection::vec(any::<usize>(), 0..20),
            read_into in any::<bool>(),
        ) {
            let mut wire = Vec::new();
            for frame in &frames {
                let frame = if vnet { frame.clone() } else { Frame::ethernet(frame.data.clone()) };
                encode(&frame, vnet, &mut wire).unwrap();
            }
            // Garbage after the frames: a truncated frame or a framing error.
            wire.extend_from_slice(&tail);
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
            points.push(0);
            points.push(wire.len());
            points.sort_unstable();
            let pieces: Vec<&[u8]> = points.windows(2).map(|p| &wire[p[0]..p[1]]).collect();
            let (expected, expected_error) = decode_pieces(vnet, &pieces, |d| {
                d.next_frame().map(|f| f.map(|f| f.ethernet_bytes().to_vec()))
            }, false);
            let (got, error) = decode_pieces(vnet, &pieces, |d| {
                d.next_frame_bytes().map(|f| f.map(|f| f.to_vec()))
            }, read_into);
            prop_assert_eq!(got, expected);
            prop_assert_eq!(error, expected_error);
        }

        /// Garbage never panics, every frame respects the limits, and a failed stream stays
        /// failed.
        #[test]
        fn garbage_never_panics(
            vnet in any::<bool>(),
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16),
        ) {
            let mut decoder = FrameDecoder::new(vnet);
            let mut failed = None;
            for chunk in &chunks {
                decoder.feed(chunk);
                loop {
                    match decoder.next_frame() {
                        Ok(Some(frame)) => {
                            prop_assert!(failed.is_none());
                            prop_assert!(frame.data.len() <= MAX_FRAME_LEN);
                            prop_assert!(frame.vnet_hdr_len as usize <= frame.data.len());
                        }
                        Ok(None) => break,
                        Err(error) => {
                            if let Some(earlier) = &failed {
                                prop_assert_eq!(earlier, &error);
                            }
                            failed = Some(error);
                            break;
                        }
                    }
                }
            }
            let _ = decoder.finish();
        }
    }
}
