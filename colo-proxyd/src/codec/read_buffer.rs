//! The byte buffer a [`FrameDecoder`](super::FrameDecoder) reads a socket into, and hands
//! frames out of without copying them.
//!
//! A frame handed out is a [`Bytes`] split off the buffer: it shares the buffer's allocation,
//! and keeps the *whole* allocation alive for as long as it lives. The primary holds a PVM
//! frame until the SVM matched it or a checkpoint released it, so one held frame could pin
//! every byte read with it. Two rules bound that:
//!
//! * **Chunks.** The buffer is allocated in chunks of [`CHUNK`] bytes (64 KiB, the size of
//!   one read), never grown in place past that: when a chunk is full, the next read goes
//!   into a fresh chunk, the unfinished frame at the end of the old one copied over (a frame
//!   must be contiguous). A frame longer than a chunk gets a chunk of its own size. So a
//!   frame pins at most one chunk: 64 KiB, or the frame itself with its prefixes when it is
//!   longer (at most [`MAX_CHUNK`], `MAX_FRAME_LEN` + 8).
//! * **Small frames are copied into small chunks.** A frame shorter than [`COPY_BELOW`] bytes
//!   (pure ACKs, small requests and answers) is copied into a separate buffer allocated in
//!   chunks of [`SMALL_CHUNK`] bytes, and shared from there: split off a read chunk, such a
//!   frame would pin 64 KiB, a thousand times its size for an ACK. The copy is a `memcpy`
//!   of under 1 KiB into a chunk that is already allocated; a copy in an allocation of its
//!   own would cost that allocation, and a second one when the comparison first shares the
//!   frame (`docs/benchmarks.md` has the measurement behind this choice).
//!
//! So a held frame pins one chunk: at most [`SMALL_CHUNK`] (4 KiB) when it is shorter than
//! [`COPY_BELOW`] (1 KiB), at most [`MAX_CHUNK`] (64 KiB; `MAX_FRAME_LEN` + 8 for the
//! largest frame QEMU sends) otherwise: for any frame of 60 bytes or more (an Ethernet
//! frame's minimum), at most about 68 times its size. That is the worst case, every held frame
//! alone in its chunk among released ones, and what the gate's `held_bytes` (the frames'
//! own bytes) can understate. In the common case held frames are consecutive in the stream
//! (the SVM lags behind the PVM), so the chunks they pin are full of held frames and the
//! overhead is under two chunks per socket. The hold itself is bounded in time: a frame held
//! longer than `max_hold` makes the gate ask for a checkpoint, whose adoption releases
//! everything held. A chunk nothing is split off any more is reused in place.

use bytes::buf::Limit;
use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::MAX_FRAME_LEN;

/// Bytes allocated at once for reads, and the most one read takes from the socket.
pub const CHUNK: usize = 64 * 1024;

/// The largest allocation a frame can pin: a maximal frame with both length prefixes.
pub const MAX_CHUNK: usize = MAX_FRAME_LEN + 8;

/// Frames shorter than this are copied into a small chunk rather than split off a read chunk
/// (see the module comment): every ACK or small request is, no full-size (1514-byte) frame.
/// With [`SMALL_CHUNK`], it bounds what a held frame pins to the same ratio either way:
/// `MAX_CHUNK / COPY_BELOW` = 68 ≈ `SMALL_CHUNK / 60`.
pub const COPY_BELOW: usize = 1024;

/// Bytes allocated at once for copies of small frames.
pub const SMALL_CHUNK: usize = 4 * 1024;

/// A read smaller than this is not worth a system call: with less room left in the chunk,
/// the next read starts a new one.
const MIN_READ: usize = 4 * 1024;

/// The unconsumed bytes of one stream, in a chunk that frames are split off.
#[derive(Debug, Default)]
pub struct ReadBuffer {
    bytes: BytesMut,
    /// Where frames shorter than [`COPY_BELOW`] are copied to.
    small: BytesMut,
}

impl ReadBuffer {
    /// Bytes received and not consumed yet.
    pub fn pending(&self) -> &[u8] {
        &self.bytes
    }

    /// Drops the first `n` pending bytes (at most all of them).
    pub fn consume(&mut self, n: usize) {
        // `advance`, not `split_to`: it keeps the chunk unshared, so it can be reused.
        self.bytes.advance(n.min(self.bytes.len()));
    }

    /// The first `n` pending bytes (at most all of them), without a copy unless they are
    /// fewer than [`COPY_BELOW`].
    pub fn take(&mut self, n: usize) -> Bytes {
        let n = n.min(self.bytes.len());
        if n < COPY_BELOW {
            if self.small.capacity() < n && !self.small.try_reclaim(SMALL_CHUNK) {
                self.small = BytesMut::with_capacity(SMALL_CHUNK);
            }
            self.small.extend_from_slice(&self.bytes[..n]);
            self.consume(n);
            self.small.split().freeze()
        } else {
            self.bytes.split_to(n).freeze()
        }
    }

    /// Appends `chunk`, within the chunk discipline.
    pub fn append(&mut self, chunk: &[u8]) {
        self.make_room(self.bytes.len() + chunk.len());
        self.bytes.extend_from_slice(chunk);
    }

    /// Forgets everything and gives the allocations back.
    pub fn clear(&mut self) {
        self.bytes = BytesMut::new();
        self.small = BytesMut::new();
    }

    /// Makes room for a read that completes a frame of `frame_total` bytes (prefixes
    /// included; 0 when its length is not known yet) and returns the free space to read
    /// into, never empty.
    pub fn read_space(&mut self, frame_total: usize) -> Limit<&mut BytesMut> {
        let wanted = (self.bytes.len() + MIN_READ).max(frame_total);
        self.make_room(wanted);
        let spare = self.bytes.capacity() - self.bytes.len();
        (&mut self.bytes).limit(spare)
    }

    /// Ensures the buffer can hold `total` bytes without growing: reuses the chunk when no
    /// frame split off it is alive any more, else starts a new one and copies the pending
    /// bytes (part of one frame) into it.
    fn make_room(&mut self, total: usize) {
        if self.bytes.capacity() >= total {
            return;
        }
        let len = self.bytes.len();
        // `try_reclaim` never allocates: it succeeds only when this buffer is the sole owner
        // of its allocation and the allocation is large enough.
        if self.bytes.try_reclaim(total.max(CHUNK) - len) {
            return;
        }
        let mut fresh = BytesMut::with_capacity(total.max(CHUNK));
        fresh.extend_from_slice(&self.bytes);
        self.bytes = fresh;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_frame_pins_one_chunk_and_small_frames_pin_none() {
        let mut buffer = ReadBuffer::default();
        buffer.append(&[1; 2000]);
        let shared = buffer.take(2000);
        // Fill the rest of the chunk: the next append must not grow it in place.
        buffer.append(&vec![2; CHUNK - 2000]);
        let start = buffer.pending().as_ptr();
        buffer.append(&[3; 10]);
        assert_ne!(
            start,
            buffer.pending().as_ptr(),
            "a new chunk for the new bytes"
        );
        assert_eq!(&buffer.pending()[..2], &[2, 2]);
        assert!(buffer.bytes.capacity() <= CHUNK);
        assert_eq!(shared, vec![1; 2000]);

        // Small frames are copied to small chunks: the read chunk stays the buffer's own
        // and is reused.
        let mut buffer = ReadBuffer::default();
        buffer.append(&vec![4; CHUNK]);
        let chunk = buffer.pending().as_ptr();
        let small: Vec<Bytes> = (0..CHUNK / 64).map(|_| buffer.take(64)).collect();
        buffer.append(&[5; 100]);
        assert_eq!(
            chunk,
            buffer.pending().as_ptr(),
            "reclaimed, not reallocated"
        );
        assert!(small.iter().all(|f| f.len() == 64 && f[0] == 4));
        // Copied next to each other, SMALL_CHUNK / 64 of them in each small chunk.
        let new_chunks = small
            .windows(2)
            .filter(|pair| pair[0].as_ptr().wrapping_add(64) != pair[1].as_ptr())
            .count();
        assert_eq!(new_chunks, CHUNK / SMALL_CHUNK - 1);
    }

    #[test]
    fn read_space_holds_the_whole_announced_frame() {
        let mut buffer = ReadBuffer::default();
        buffer.append(&[0; 10]);
        let space = buffer.read_space(MAX_CHUNK);
        assert!(space.remaining_mut() >= MAX_CHUNK - 10);
        let space = buffer.read_space(0);
        assert!(space.remaining_mut() >= MIN_READ);
    }
}
