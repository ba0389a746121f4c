//! The SVM's output bytes of one connection, placed at their stream offsets, kept until the
//! PVM's bytes at the same offsets have been released.

use std::collections::BTreeMap;
use std::ops::Bound::Excluded;

/// How the SVM's bytes compare with a run of the PVM's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Coverage {
    /// The SVM produced every byte, identically.
    Equal,
    /// Some bytes are still missing; the ones present are equal.
    Incomplete,
    /// The SVM produced a different byte at this offset.
    Differs(i64),
}

/// Non-overlapping chunks keyed by their first offset. A retransmission never overwrites:
/// the first copy of a byte is the one compared.
#[derive(Debug, Default)]
pub(super) struct SvmStream {
    chunks: BTreeMap<i64, Vec<u8>>,
    bytes: usize,
}

impl SvmStream {
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(super) fn clear(&mut self) {
        self.chunks.clear();
        self.bytes = 0;
    }

    /// Chunks that overlap `[start, end)`, in offset order, as `(offset, bytes)`.
    fn overlapping(&self, start: i64, end: i64) -> impl Iterator<Item = (i64, &[u8])> {
        let first = self
            .chunks
            .range(..=start)
            .next_back()
            .filter(|(offset, chunk)| end > start && **offset + chunk.len() as i64 > start);
        // BTreeMap::range panics on an empty excluded range, so ask only for a real one.
        let rest = (end > start)
            .then(|| self.chunks.range((Excluded(start), Excluded(end))))
            .into_iter()
            .flatten();
        first
            .into_iter()
            .chain(rest)
            .map(|(offset, chunk)| (*offset, chunk.as_slice()))
    }

    /// Stores the bytes of `data` (starting at `start`) that no earlier chunk holds.
    pub(super) fn insert(&mut self, start: i64, data: &[u8]) {
        let end = start + data.len() as i64;
        let covered: Vec<(i64, i64)> = self
            .overlapping(start, end)
            .map(|(offset, chunk)| (offset, offset + chunk.len() as i64))
            .collect();
        let mut cursor = start;
        for (chunk_start, chunk_end) in covered.into_iter().chain([(end, end)]) {
            if chunk_start > cursor {
                let gap = &data[(cursor - start) as usize..(chunk_start.min(end) - start) as usize];
                self.bytes += gap.len();
                self.chunks.insert(cursor, gap.to_vec());
            }
            cursor = cursor.max(chunk_end);
        }
    }

    /// Compares the PVM's `data` at `start` with what the SVM produced there.
    pub(super) fn compare(&self, start: i64, data: &[u8]) -> Coverage {
        let end = start + data.len() as i64;
        let mut covered = 0usize;
        for (chunk_start, chunk) in self.overlapping(start, end) {
            let from = chunk_start.max(start);
            let to = (chunk_start + chunk.len() as i64).min(end);
            let svm = &chunk[(from - chunk_start) as usize..(to - chunk_start) as usize];
            let pvm = &data[(from - start) as usize..(to - start) as usize];
            // Slice equality is a memcmp; only a difference pays for the byte-wise search.
            if svm != pvm {
                let at = svm.iter().zip(pvm).position(|(a, b)| a != b).unwrap_or(0);
                return Coverage::Differs(from + at as i64);
            }
            covered += svm.len();
        }
        if covered == data.len() {
            Coverage::Equal
        } else {
            Coverage::Incomplete
        }
    }

    /// Forgets every byte below `offset`: the PVM's bytes there were all released.
    pub(super) fn forget_below(&mut self, offset: i64) {
        let kept = self.chunks.split_off(&offset);
        let dropped = std::mem::replace(&mut self.chunks, kept);
        for (chunk_start, mut chunk) in dropped {
            self.bytes -= chunk.len();
            let chunk_end = chunk_start + chunk.len() as i64;
            if chunk_end > offset {
                let tail = chunk.split_off((offset - chunk_start) as usize);
                self.bytes += tail.len();
                self.chunks.insert(offset, tail);
            }
        }
    }

    #[cfg(test)]
    fn chunk_count(&self) -> usize {
        self.chunks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_copy_wins_and_gaps_are_filled() {
        let mut stream = SvmStream::default();
        stream.insert(10, b"cd");
        stream.insert(8, b"ABCDEF"); // overlaps on both sides; "CD" must not overwrite "cd"
        assert_eq!(stream.bytes(), 6);
        assert_eq!(stream.compare(8, b"ABcdEF"), Coverage::Equal);
        assert_eq!(stream.compare(8, b"ABCDEF"), Coverage::Differs(10));
        assert_eq!(stream.compare(12, b"EFG"), Coverage::Incomplete);
        assert_eq!(stream.compare(20, b""), Coverage::Equal);
        assert_eq!(stream.chunk_count(), 3);
    }

    #[test]
    fn forgetting_splits_a_straddling_chunk() {
        let mut stream = SvmStream::default();
        stream.insert(0, b"0123456789");
        stream.forget_below(4);
        assert_eq!(stream.bytes(), 6);
        assert_eq!(stream.compare(4, b"456789"), Coverage::Equal);
        assert_eq!(stream.compare(3, b"3"), Coverage::Incomplete);
        stream.forget_below(100);
        assert_eq!(stream.bytes(), 0);
    }
}
