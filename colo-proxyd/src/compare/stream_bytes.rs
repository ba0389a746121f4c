//! The bytes of one connection's stream from the release floor up, stored once, whichever VM
//! produced them first, in one contiguous buffer indexed by stream offset.
//!
//! The comparison needs, for every offset not yet released, the bytes one side produced until
//! the other side's bytes for the same offset arrive; then the two are compared once, with one
//! slice comparison (a memcmp), and from then on the offset is known to be equal on both sides.
//! Keeping one copy in one buffer (rather than a copy per packet per side) means a byte is
//! copied once and compared once, and no packet costs an allocation once the buffer has grown
//! to the connection's working size.

/// Who has produced a region's bytes so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    /// Nobody: a gap left by an out-of-order segment; the buffer holds placeholder zeros.
    Hole,
    /// Only the PVM.
    Pvm,
    /// Only the SVM.
    Svm,
}

/// The side a segment came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Pvm,
    Svm,
}

impl Side {
    fn tag(self) -> Tag {
        match self {
            Side::Pvm => Tag::Pvm,
            Side::Svm => Tag::Svm,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    start: i64,
    end: i64,
    tag: Tag,
}

/// Pushes `region`, merging it into the last one when they touch and share a tag, so that
/// in-order traffic keeps at most one region per side.
fn push_region(regions: &mut Vec<Region>, region: Region) {
    if region.start >= region.end {
        return;
    }
    match regions.last_mut() {
        Some(last) if last.end == region.start && last.tag == region.tag => last.end = region.end,
        _ => regions.push(region),
    }
}

/// A buffer that runs empty is always kept up to this capacity: enough for a bulk
/// connection's usual lead of one side, small enough that thousands of idle connections cost
/// little. A larger one is kept only while the connection still uses a quarter of it (freeing
/// and reallocating tens of KiB per packet would cost page faults on every GSO frame); an
/// unused one goes when the connection's traffic shrinks or at the next checkpoint, which
/// rebuilds the comparator.
const KEEP_CAPACITY: usize = 16 * 1024;

/// The stream's bytes at offsets `[base, end)`, with the regions not yet produced by both
/// sides; every byte outside those regions was produced by both, identically.
#[derive(Debug)]
pub(super) struct StreamBytes {
    /// Stream offset of `buf[head]`.
    base: i64,
    buf: Vec<u8>,
    /// Bytes before `head` are below `base`, forgotten; they are reclaimed lazily (when the
    /// buffer would otherwise grow), so forgetting is O(1) per release.
    head: usize,
    /// Sorted, disjoint; usually empty or one region.
    regions: Vec<Region>,
    /// Reused when `regions` is rebuilt, to avoid an allocation per segment.
    scratch: Vec<Region>,
    /// The most bytes kept since the buffer last ran empty.
    peak: usize,
}

impl StreamBytes {
    /// Nothing kept; the first offset that can be kept is `base`.
    pub(super) fn new(base: i64) -> Self {
        StreamBytes {
            base,
            buf: Vec::new(),
            head: 0,
            regions: Vec::new(),
            scratch: Vec::new(),
            peak: 0,
        }
    }

    /// Offset of the first byte kept.
    pub(super) fn base(&self) -> i64 {
        self.base
    }

    /// Bytes kept, gaps included: what the buffer really occupies.
    pub(super) fn len(&self) -> usize {
        self.buf.len() - self.head
    }

    /// Bytes kept that the SVM produced (alone or verified against the PVM's).
    pub(super) fn svm_bytes(&self) -> usize {
        let elsewhere: i64 = self
            .regions
            .iter()
            .filter(|r| r.tag != Tag::Svm)
            .map(|r| r.end - r.start)
            .sum();
        self.len() - elsewhere as usize
    }

    fn end(&self) -> i64 {
        self.base + self.len() as i64
    }

    fn index(&self, offset: i64) -> usize {
        self.head + (offset - self.base) as usize
    }

    /// Forgets everything, keeping nothing below `base` from now on.
    pub(super) fn clear(&mut self, base: i64) {
        self.buf = Vec::new();
        self.head = 0;
        self.regions.clear();
        self.peak = 0;
        self.base = base;
    }

    /// Forgets every byte below `floor` (the PVM's bytes there were all released).
    pub(super) fn forget_below(&mut self, floor: i64) {
        if floor <= self.base {
            return;
        }
        if floor >= self.end() {
            self.buf.clear();
            self.head = 0;
            if self.buf.capacity() > KEEP_CAPACITY && self.peak * 4 < self.buf.capacity() {
                self.buf = Vec::new();
            }
            self.peak = 0;
            self.regions.clear();
        } else {
            self.head = self.index(floor);
            let gone = self.regions.partition_point(|r| r.end <= floor);
            self.regions.drain(..gone);
            if let Some(first) = self.regions.first_mut() {
                first.start = first.start.max(floor);
            }
        }
        self.base = floor;
    }

    /// Whether both sides produced `[start, end)` (which must not begin below the base), and
    /// identically.
    pub(super) fn verified(&self, start: i64, end: i64) -> bool {
        if start >= end {
            return true;
        }
        if start < self.base || end > self.end() {
            return false;
        }
        let i = self.regions.partition_point(|r| r.end <= start);
        self.regions.get(i).is_none_or(|r| r.start >= end)
    }

    /// `side` produced `data` at offset `start` (bytes below the base are ignored). Bytes nobody produced
    /// yet are stored; bytes the other side produced are compared with them and become
    /// verified; the PVM's bytes are also compared with its own earlier copy (a VM that sends
    /// different bytes at one offset is not deterministic either). The SVM's repeated bytes
    /// are not compared: its first copy is the one that counts. Returns the first differing
    /// offset; after a difference the contents are unspecified and the caller must
    /// [`Self::clear`].
    pub(super) fn insert(&mut self, side: Side, start: i64, data: &[u8]) -> Result<(), i64> {
        // The caller clips at the release floor, which is the base; clipping again keeps a
        // broken invariant from indexing below the buffer.
        debug_assert!(start >= self.base);
        let skip = (self.base - start).clamp(0, data.len() as i64);
        let (start, data) = (start + skip, &data[skip as usize..]);
        if data.is_empty() {
            return Ok(());
        }
        let end = start + data.len() as i64;
        let old_end = self.end();
        if start < old_end {
            let within = end.min(old_end);
            self.merge_within(side, start, &data[..(within - start) as usize])?;
        }
        if end > old_end {
            let from = start.max(old_end);
            self.make_room((end - old_end) as usize);
            if from > old_end {
                self.buf
                    .resize(self.buf.len() + (from - old_end) as usize, 0);
                push_region(
                    &mut self.regions,
                    Region {
                        start: old_end,
                        end: from,
                        tag: Tag::Hole,
                    },
                );
            }
            self.buf.extend_from_slice(&data[(from - start) as usize..]);
            push_region(
                &mut self.regions,
                Region {
                    start: from,
                    end,
                    tag: side.tag(),
                },
            );
            self.peak = self.peak.max(self.len());
        }
        Ok(())
    }

    /// Reclaims the forgotten prefix if the buffer would otherwise have to grow by `extra`.
    fn make_room(&mut self, extra: usize) {
        if self.head > 0 && self.buf.len() + extra > self.buf.capacity() {
            self.buf.drain(..self.head);
            self.head = 0;
        }
    }

    /// [`Self::insert`] for `data` lying wholly inside `[base, end)`.
    fn merge_within(&mut self, side: Side, start: i64, data: &[u8]) -> Result<(), i64> {
        let end = start + data.len() as i64;
        let mut rebuilt = std::mem::take(&mut self.scratch);
        rebuilt.clear();
        let first = self.regions.partition_point(|r| r.end <= start);
        rebuilt.extend_from_slice(&self.regions[..first]);
        let mut cursor = start;
        let mut result = Ok(());
        let mut next = first;
        while let Some(&region) = self.regions.get(next) {
            if region.start >= end {
                break;
            }
            next += 1;
            // Verified bytes before the region: only the PVM's are checked again.
            if region.start > cursor {
                result = self.recheck(side, cursor, region.start, start, data);
                if result.is_err() {
                    break;
                }
            }
            let from = region.start.max(start);
            let to = region.end.min(end);
            let piece = &data[(from - start) as usize..(to - start) as usize];
            push_region(
                &mut rebuilt,
                Region {
                    end: from,
                    ..region
                },
            );
            let tag = match (region.tag, side) {
                (Tag::Hole, _) => {
                    let at = self.index(from);
                    self.buf[at..at + piece.len()].copy_from_slice(piece);
                    side.tag()
                }
                (Tag::Svm, Side::Svm) => Tag::Svm,
                (Tag::Pvm, Side::Pvm) => {
                    result = self.compare(from, piece);
                    Tag::Pvm
                }
                // The other side's bytes: compared once, verified from now on.
                (Tag::Pvm, Side::Svm) | (Tag::Svm, Side::Pvm) => {
                    result = self.compare(from, piece);
                    push_region(
                        &mut rebuilt,
                        Region {
                            start: to,
                            end: region.end,
                            tag: region.tag,
                        },
                    );
                    cursor = to;
                    if result.is_err() {
                        break;
                    }
                    continue;
                }
            };
            if result.is_err() {
                break;
            }
            push_region(
                &mut rebuilt,
                Region {
                    start: from,
                    end: to,
                    tag,
                },
            );
            push_region(
                &mut rebuilt,
                Region {
                    start: to,
                    end: region.end,
                    tag: region.tag,
                },
            );
            cursor = to;
        }
        if result.is_ok() && cursor < end {
            result = self.recheck(side, cursor, end, start, data);
        }
        if result.is_ok() {
            for region in &self.regions[next..] {
                push_region(&mut rebuilt, *region);
            }
            std::mem::swap(&mut self.regions, &mut rebuilt);
        }
        self.scratch = rebuilt;
        result
    }

    /// `side` repeated verified bytes `[from, to)` of `data` (which starts at `start`).
    fn recheck(&self, side: Side, from: i64, to: i64, start: i64, data: &[u8]) -> Result<(), i64> {
        match side {
            Side::Pvm => self.compare(from, &data[(from - start) as usize..(to - start) as usize]),
            Side::Svm => Ok(()),
        }
    }

    /// Compares `data` with the stored bytes at `at`.
    fn compare(&self, at: i64, data: &[u8]) -> Result<(), i64> {
        let index = self.index(at);
        let stored = &self.buf[index..index + data.len()];
        // Slice equality is a memcmp; only a difference pays for the byte-wise search.
        if stored == data {
            Ok(())
        } else {
            let position = stored.iter().zip(data).position(|(a, b)| a != b);
            Err(at + position.unwrap_or(0) as i64)
        }
    }

    #[cfg(test)]
    fn region_count(&self) -> usize {
        self.regions.len()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// One step of the model test: a side's bytes at an offset, or forgetting below a floor.
    #[derive(Debug, Clone)]
    enum Step {
        Insert { pvm: bool, start: usize, len: usize },
        Forget { by: usize },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (any::<bool>(), 0usize..300, 0usize..80)
                .prop_map(|(pvm, start, len)| Step::Insert { pvm, start, len }),
            1 => (0usize..40).prop_map(|by| Step::Forget { by }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Against a byte-by-byte model: an offset is verified exactly when both sides
        /// produced it (and it was not forgotten), and a difference is reported, at its
        /// offset, exactly when both sides' bytes for it are in.
        #[test]
        fn matches_a_byte_by_byte_model(
            steps in proptest::collection::vec(step(), 1..60),
            differ_at in proptest::option::of(0usize..380),
        ) {
            const LEN: usize = 380;
            let pvm_data: Vec<u8> = (0..LEN).map(|i| (i * 7 % 251) as u8).collect();
            let mut svm_data = pvm_data.clone();
            if let Some(at) = differ_at {
                svm_data[at] ^= 0x5a;
            }
            let mut stream = StreamBytes::new(0);
            let (mut pvm_seen, mut svm_seen) = (vec![false; LEN], vec![false; LEN]);
            let mut floor = 0usize;
            for step in steps {
                match step {
                    Step::Insert { pvm, start, len } => {
                        let from = start.max(floor);
                        let end = start + len;
                        if from >= end {
                            continue;
                        }
                        let (side, data, seen) = if pvm {
                            (Side::Pvm, &pvm_data, &mut pvm_seen)
                        } else {
                            (Side::Svm, &svm_data, &mut svm_seen)
                        };
                        seen[from..end].iter_mut().for_each(|s| *s = true);
                        let result = stream.insert(side, from as i64, &data[from..end]);
                        let expected = match differ_at {
                            Some(at) if at >= floor && pvm_seen[at] && svm_seen[at] => {
                                Err(at as i64)
                            }
                            _ => Ok(()),
                        };
                        prop_assert_eq!(result, expected);
                        if result.is_err() {
                            return Ok(());
                        }
                    }
                    Step::Forget { by } => {
                        floor = (floor + by).min(LEN);
                        stream.forget_below(floor as i64);
                    }
                }
                for start in floor..LEN {
                    let both = pvm_seen[start] && svm_seen[start];
                    prop_assert_eq!(stream.verified(start as i64, start as i64 + 1), both);
                }
                let svm_kept = (floor..LEN).filter(|o| svm_seen[*o]).count();
                prop_assert_eq!(stream.svm_bytes(), svm_kept);
            }
        }
    }

    #[test]
    fn first_svm_copy_wins_and_gaps_are_filled() {
        let mut stream = StreamBytes::new(0);
        stream.insert(Side::Svm, 10, b"cd").unwrap();
        // Overlaps on both sides; "CD" must not overwrite "cd".
        stream.insert(Side::Svm, 8, b"ABCDEF").unwrap();
        assert_eq!(stream.len(), 14); // offsets 0..8 are a gap, still kept
        assert_eq!(stream.svm_bytes(), 6);
        assert!(!stream.verified(8, 14));
        assert_eq!(stream.insert(Side::Pvm, 8, b"ABcdEF"), Ok(()));
        assert!(stream.verified(8, 14));
        assert!(!stream.verified(7, 14));
        assert_eq!(stream.region_count(), 1); // the gap
        let mut other = StreamBytes::new(0);
        other.insert(Side::Svm, 10, b"cd").unwrap();
        other.insert(Side::Svm, 8, b"ABCDEF").unwrap();
        assert_eq!(other.insert(Side::Pvm, 8, b"ABCDEF"), Err(10));
    }

    #[test]
    fn pvm_bytes_wait_for_the_svm_and_are_compared_once_they_come() {
        let mut stream = StreamBytes::new(0);
        stream.insert(Side::Pvm, 0, b"hello world").unwrap();
        assert!(!stream.verified(0, 5));
        assert_eq!(stream.svm_bytes(), 0);
        stream.insert(Side::Svm, 6, b"world").unwrap();
        assert_eq!(stream.svm_bytes(), 5);
        assert!(stream.verified(6, 11));
        assert!(!stream.verified(0, 11));
        assert_eq!(stream.region_count(), 1);
        stream.insert(Side::Svm, 0, b"hello ").unwrap();
        assert!(stream.verified(0, 11));
        assert_eq!(stream.region_count(), 0);
        // The PVM repeating itself is checked against the verified bytes.
        assert_eq!(stream.insert(Side::Pvm, 4, b"o w"), Ok(()));
        assert_eq!(stream.insert(Side::Pvm, 4, b"o_w"), Err(5));
        let mut other = StreamBytes::new(0);
        other.insert(Side::Pvm, 0, b"hello").unwrap();
        assert_eq!(other.insert(Side::Svm, 0, b"help!"), Err(3));
    }

    #[test]
    fn forgetting_keeps_what_is_above_the_floor() {
        let mut stream = StreamBytes::new(0);
        stream.insert(Side::Svm, 0, b"0123456789").unwrap();
        stream.forget_below(4);
        assert_eq!(stream.len(), 6);
        assert_eq!(stream.base(), 4);
        assert_eq!(stream.insert(Side::Pvm, 4, b"456789"), Ok(()));
        assert!(stream.verified(4, 10));
        stream.forget_below(100);
        assert_eq!(stream.len(), 0);
        assert_eq!(stream.base(), 100);
        // Appending after a forgotten prefix reuses the buffer.
        stream.insert(Side::Pvm, 100, b"ab").unwrap();
        stream.insert(Side::Svm, 100, b"ab").unwrap();
        assert!(stream.verified(100, 102));
    }
}
