//! TCP sequence arithmetic: 32-bit sequence numbers that wrap, turned into 64-bit stream
//! offsets that do not.

/// `a` is at or after `b` in sequence space (RFC 1982 serial arithmetic).
pub(super) fn seq_at_or_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) >= 0
}

/// Maps one side's sequence numbers to stream offsets. It keeps a reference point that
/// follows the stream, so offsets keep growing past 4 GiB; a segment more than 2 GiB away from
/// the reference point would be misplaced, far beyond any TCP window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SequenceMap {
    reference_seq: u32,
    reference_offset: i64,
}

impl SequenceMap {
    /// Sequence number `seq` is stream offset `offset`.
    pub(super) fn new(seq: u32, offset: i64) -> Self {
        SequenceMap {
            reference_seq: seq,
            reference_offset: offset,
        }
    }

    pub(super) fn offset(&self, seq: u32) -> i64 {
        self.reference_offset + i64::from(seq.wrapping_sub(self.reference_seq) as i32)
    }

    pub(super) fn seq(&self, offset: i64) -> u32 {
        // Truncation is the point: sequence numbers are offsets modulo 2^32.
        self.reference_seq
            .wrapping_add((offset - self.reference_offset) as u32)
    }

    /// Whether `other` maps every sequence number to the same offset as this map.
    pub(super) fn same_numbers(&self, other: &SequenceMap) -> bool {
        other.offset(self.reference_seq) == self.reference_offset
    }

    /// Moves the reference point forward to `offset` if it is ahead of it.
    pub(super) fn advance_to(&mut self, offset: i64) {
        if offset > self.reference_offset {
            self.reference_seq = self.seq(offset);
            self.reference_offset = offset;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_continue_across_the_wrap() {
        let mut map = SequenceMap::new(u32::MAX - 9, 0);
        assert_eq!(map.offset(u32::MAX), 9);
        assert_eq!(map.offset(5), 15);
        map.advance_to(15);
        assert_eq!(map.offset(u32::MAX - 9), 0);
        assert_eq!(map.seq(15), 5);
        // Two full wraps later (8 steps of 2^30) the offset still grows.
        let mut offset = 15;
        for _ in 0..8 {
            offset += 1 << 30;
            map.advance_to(offset);
        }
        assert_eq!(offset, 15 + (1 << 33));
        assert_eq!(map.seq(offset), 5);
        assert_eq!(map.offset(5), offset);
        assert_eq!(map.offset(4), offset - 1);
    }

    #[test]
    fn serial_comparison_wraps() {
        assert!(seq_at_or_after(5, u32::MAX - 5));
        assert!(!seq_at_or_after(u32::MAX - 5, 5));
        assert!(seq_at_or_after(7, 7));
    }
}
