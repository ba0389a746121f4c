//! The bytes of one connection's stream from the release floor up, kept once, whichever VM
//! produced them first, with the regions not yet produced by both sides.
//!
//! The comparison needs, for every offset not yet released, the bytes one side produced until
//! the other side's bytes for the same offset arrive; then the two are compared once, with one
//! slice comparison (a memcmp), and from then on the offset is known to be equal on both sides.
//!
//! The first-comer's bytes are kept as [`Bytes`] pieces, one per segment. The PVM's are never
//! copied: a PVM piece is a reference into the packet the caller holds anyway until it is
//! released, so the PVM leading (the usual case: the SVM sees its input later) costs no copy
//! at all, and the SVM's later bytes are compared where the PVM's lie. Only the SVM's bytes
//! that arrive first are copied, once, because the SVM's packets are not kept.

use std::collections::VecDeque;

use bytes::{Buf, Bytes};

use super::prefetch::prefetch;

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

/// Decides whether two bytes that differ at one offset may pass as equal (declared
/// equivalence, [`super::equivalence`]); by default none may.
pub(super) trait Tolerance {
    /// `kept` (the first-comer's byte) and `given` differ at `offset`: whether that is
    /// tolerated.
    fn tolerates(&mut self, offset: i64, kept: u8, given: u8) -> bool;
}

/// Every difference is one.
pub(super) struct Exact;

impl Tolerance for Exact {
    fn tolerates(&mut self, _offset: i64, _kept: u8, _given: u8) -> bool {
        false
    }
}

/// The side a segment came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Pvm,
    Svm,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Pvm => Side::Svm,
            Side::Svm => Side::Pvm,
        }
    }

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

/// A side's bytes as the comparator stores them.
pub(super) enum Data<'a> {
    /// The PVM's, in the packet that carries them.
    Shared(Bytes),
    /// The SVM's: its packets are not kept, so what must be kept is copied.
    Borrowed(&'a [u8]),
}

/// What is kept of `data`: a slice of `shared` (which holds it) when there is one, else a
/// copy.
fn keep(data: &[u8], shared: Option<&Bytes>) -> Bytes {
    match shared {
        Some(shared) => shared.slice_ref(data),
        None => Bytes::copy_from_slice(data),
    }
}

/// One side's bytes at `[start, start + bytes.len())`: the first to arrive for those offsets.
#[derive(Debug, Clone)]
struct Piece {
    start: i64,
    bytes: Bytes,
}

impl Piece {
    fn end(&self) -> i64 {
        self.start + self.bytes.len() as i64
    }
}

/// The stream's bytes at offsets `[base, end)`, with the regions not yet produced by both
/// sides; every byte outside those regions was produced by both, identically.
#[derive(Debug)]
pub(super) struct StreamBytes {
    /// The first offset kept.
    base: i64,
    /// One past the furthest byte either side produced (at least `base`).
    end: i64,
    /// The first-comer's bytes, sorted and disjoint, covering `[base, end)` except the
    /// [`Tag::Hole`] regions; usually one piece per PVM segment not yet released.
    pieces: VecDeque<Piece>,
    /// Sorted, disjoint; usually empty or one region.
    regions: Vec<Region>,
    /// Reused when `regions` is rebuilt, to avoid an allocation per segment.
    scratch: Vec<Region>,
}

impl StreamBytes {
    /// Nothing kept; the first offset that can be kept is `base`.
    pub(super) fn new(base: i64) -> Self {
        StreamBytes {
            base,
            end: base,
            pieces: VecDeque::new(),
            regions: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Whether some side produced bytes beyond `offset`.
    pub(super) fn ends_after(&self, offset: i64) -> bool {
        self.end > offset
    }

    /// Starts loading the kept bytes at `[start, end)` into the CPU's caches, so that the
    /// comparison of a segment about to be stored overlaps their cache misses with its
    /// bookkeeping rather than waiting for them in the memcmp.
    pub(super) fn prefetch(&self, start: i64, end: i64) {
        let first = self.pieces.partition_point(|p| p.end() <= start);
        for piece in self.pieces.range(first..) {
            if piece.start >= end {
                break;
            }
            let from = (start.max(piece.start) - piece.start) as usize;
            let to = (end.min(piece.end()) - piece.start) as usize;
            prefetch(&piece.bytes[from..to]);
        }
    }

    /// Offset of the first byte kept.
    pub(super) fn base(&self) -> i64 {
        self.base
    }

    /// The span kept, gaps included.
    pub(super) fn len(&self) -> usize {
        (self.end - self.base) as usize
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

    /// Forgets everything, keeping nothing below `base` from now on.
    pub(super) fn clear(&mut self, base: i64) {
        self.pieces = VecDeque::new();
        self.regions.clear();
        self.base = base;
        self.end = base;
    }

    /// Forgets every byte below `floor` (the PVM's bytes there were all released).
    pub(super) fn forget_below(&mut self, floor: i64) {
        if floor <= self.base {
            return;
        }
        if floor >= self.end {
            self.pieces.clear();
            self.regions.clear();
            self.end = floor;
        } else {
            while self.pieces.front().is_some_and(|p| p.end() <= floor) {
                self.pieces.pop_front();
            }
            if let Some(first) = self.pieces.front_mut()
                && first.start < floor
            {
                // Dropping the released head of a piece only moves a pointer.
                first.bytes.advance((floor - first.start) as usize);
                first.start = floor;
            }
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
        if start < self.base || end > self.end {
            return false;
        }
        let i = self.regions.partition_point(|r| r.end <= start);
        self.regions.get(i).is_none_or(|r| r.start >= end)
    }

    /// The PVM produced `data` at offset `start`: see [`Self::insert`]. What is kept of it is
    /// `data` itself or a slice of it, never a copy.
    #[cfg(test)]
    pub(super) fn insert_pvm(&mut self, start: i64, data: Bytes) -> Result<(), i64> {
        self.insert(Side::Pvm, start, Data::Shared(data), &mut Exact)
    }

    /// The SVM produced `data` at offset `start`: see [`Self::insert`]. Only bytes the PVM has
    /// not produced yet are copied.
    #[cfg(test)]
    pub(super) fn insert_svm(&mut self, start: i64, data: &[u8]) -> Result<(), i64> {
        self.insert(Side::Svm, start, Data::Borrowed(data), &mut Exact)
    }

    /// `side` produced `data` at offset `start` (bytes below the base are ignored). Bytes
    /// nobody produced yet are kept (as slices of `shared`, which holds `data`, or else as a
    /// copy); bytes the other side produced are compared with them and become verified; the
    /// PVM's bytes are also compared with its own earlier copy (a VM that sends different
    /// bytes at one offset is not deterministic either). The SVM's repeated bytes are not
    /// compared: its first copy is the one that counts. A difference `tolerance` accepts
    /// counts as equal (the first-comer's byte stays kept). Returns the first differing
    /// offset not tolerated; after it the contents are unspecified and the caller must
    /// [`Self::clear`].
    pub(super) fn insert(
        &mut self,
        side: Side,
        start: i64,
        data: Data<'_>,
        tolerance: &mut dyn Tolerance,
    ) -> Result<(), i64> {
        let shared = match &data {
            Data::Shared(bytes) => Some(bytes),
            Data::Borrowed(_) => None,
        };
        let whole: &[u8] = match &data {
            Data::Shared(bytes) => bytes,
            Data::Borrowed(slice) => slice,
        };
        // The caller clips at the release floor, which is the base; clipping again keeps a
        // broken invariant from indexing below the buffer.
        debug_assert!(start >= self.base);
        let skip = (self.base - start).clamp(0, whole.len() as i64) as usize;
        let (start, view) = (start + skip as i64, &whole[skip..]);
        if view.is_empty() {
            return Ok(());
        }
        let end = start + view.len() as i64;
        let old_end = self.end;
        if start < old_end {
            let within = end.min(old_end);
            let within = &view[..(within - start) as usize];
            self.merge_within(side, start, within, shared, tolerance)?;
        }
        if end > old_end {
            let from = start.max(old_end);
            if from > old_end {
                push_region(
                    &mut self.regions,
                    Region {
                        start: old_end,
                        end: from,
                        tag: Tag::Hole,
                    },
                );
            }
            // Kept from here on in `data`; a PVM segment appended whole is moved in, which
            // spares its reference count two atomic updates.
            let kept_from = skip + (from - start) as usize;
            let bytes = match data {
                Data::Shared(bytes) if kept_from == 0 => bytes,
                Data::Shared(bytes) => bytes.slice(kept_from..),
                Data::Borrowed(slice) => Bytes::copy_from_slice(&slice[kept_from..]),
            };
            self.pieces.push_back(Piece { start: from, bytes });
            self.end = end;
            push_region(
                &mut self.regions,
                Region {
                    start: from,
                    end,
                    tag: side.tag(),
                },
            );
        }
        Ok(())
    }

    /// [`Self::insert`] for `data` lying wholly inside `[base, end)`.
    fn merge_within(
        &mut self,
        side: Side,
        start: i64,
        data: &[u8],
        shared: Option<&Bytes>,
        tolerance: &mut dyn Tolerance,
    ) -> Result<(), i64> {
        let end = start + data.len() as i64;
        // In-order traffic: one side leads, and the other's bytes land at the start of the
        // oldest region only the leader produced. They verify its head: compare and shrink it,
        // without rebuilding the regions.
        if let Some(&first) = self.regions.first()
            && first.start == start
            && end <= first.end
            && first.tag == side.other().tag()
        {
            self.compare(start, data, tolerance)?;
            if end == first.end {
                self.regions.remove(0);
            } else {
                self.regions[0].start = end;
            }
            return Ok(());
        }
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
                result = self.recheck(side, cursor, region.start, start, data, tolerance);
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
                    let at = self.pieces.partition_point(|p| p.start < from);
                    let bytes = keep(piece, shared);
                    self.pieces.insert(at, Piece { start: from, bytes });
                    side.tag()
                }
                (Tag::Svm, Side::Svm) => Tag::Svm,
                (Tag::Pvm, Side::Pvm) => {
                    result = self.compare(from, piece, tolerance);
                    Tag::Pvm
                }
                // The other side's bytes: compared once, verified from now on.
                (Tag::Pvm, Side::Svm) | (Tag::Svm, Side::Pvm) => {
                    result = self.compare(from, piece, tolerance);
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
            result = self.recheck(side, cursor, end, start, data, tolerance);
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
    fn recheck(
        &self,
        side: Side,
        from: i64,
        to: i64,
        start: i64,
        data: &[u8],
        tolerance: &mut dyn Tolerance,
    ) -> Result<(), i64> {
        match side {
            Side::Pvm => {
                let part = &data[(from - start) as usize..(to - start) as usize];
                self.compare(from, part, tolerance)
            }
            Side::Svm => Ok(()),
        }
    }

    /// Compares `data` with the kept bytes at `at`, piece by piece.
    fn compare(&self, at: i64, data: &[u8], tolerance: &mut dyn Tolerance) -> Result<(), i64> {
        let end = at + data.len() as i64;
        let mut i = self.pieces.partition_point(|p| p.end() <= at);
        let mut cursor = at;
        while cursor < end {
            // The caller compares only offsets some side produced: they are in a piece.
            let Some(piece) = self.pieces.get(i) else {
                debug_assert!(false, "no piece holds offset {cursor}");
                return Err(cursor);
            };
            debug_assert!(piece.start <= cursor);
            let to = end.min(piece.end());
            let stored = &piece.bytes[(cursor - piece.start) as usize..(to - piece.start) as usize];
            let given = &data[(cursor - at) as usize..(to - at) as usize];
            // Slice equality is a memcmp; only a difference pays for the byte-wise search.
            if stored != given {
                let mut from = 0;
                while let Some(position) = stored[from..]
                    .iter()
                    .zip(&given[from..])
                    .position(|(a, b)| a != b)
                {
                    let i = from + position;
                    let offset = cursor + i as i64;
                    if !tolerance.tolerates(offset, stored[i], given[i]) {
                        return Err(offset);
                    }
                    from = i + 1;
                }
            }
            cursor = to;
            i += 1;
        }
        Ok(())
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

    /// `side`'s bytes, the PVM's passed as the daemon passes them (shared, never copied).
    fn put(stream: &mut StreamBytes, side: Side, start: i64, data: &[u8]) -> Result<(), i64> {
        match side {
            Side::Pvm => stream.insert_pvm(start, Bytes::copy_from_slice(data)),
            Side::Svm => stream.insert_svm(start, data),
        }
    }

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
                        let result = put(&mut stream, side, from as i64, &data[from..end]);
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
        put(&mut stream, Side::Svm, 10, b"cd").unwrap();
        // Overlaps on both sides; "CD" must not overwrite "cd".
        put(&mut stream, Side::Svm, 8, b"ABCDEF").unwrap();
        assert_eq!(stream.len(), 14); // offsets 0..8 are a gap, still kept
        assert_eq!(stream.svm_bytes(), 6);
        assert!(!stream.verified(8, 14));
        assert_eq!(put(&mut stream, Side::Pvm, 8, b"ABcdEF"), Ok(()));
        assert!(stream.verified(8, 14));
        assert!(!stream.verified(7, 14));
        assert_eq!(stream.region_count(), 1); // the gap
        let mut other = StreamBytes::new(0);
        put(&mut other, Side::Svm, 10, b"cd").unwrap();
        put(&mut other, Side::Svm, 8, b"ABCDEF").unwrap();
        assert_eq!(put(&mut other, Side::Pvm, 8, b"ABCDEF"), Err(10));
    }

    #[test]
    fn pvm_bytes_wait_for_the_svm_and_are_compared_once_they_come() {
        let mut stream = StreamBytes::new(0);
        put(&mut stream, Side::Pvm, 0, b"hello world").unwrap();
        assert!(!stream.verified(0, 5));
        assert_eq!(stream.svm_bytes(), 0);
        put(&mut stream, Side::Svm, 6, b"world").unwrap();
        assert_eq!(stream.svm_bytes(), 5);
        assert!(stream.verified(6, 11));
        assert!(!stream.verified(0, 11));
        assert_eq!(stream.region_count(), 1);
        put(&mut stream, Side::Svm, 0, b"hello ").unwrap();
        assert!(stream.verified(0, 11));
        assert_eq!(stream.region_count(), 0);
        // The PVM repeating itself is checked against the verified bytes.
        assert_eq!(put(&mut stream, Side::Pvm, 4, b"o w"), Ok(()));
        assert_eq!(put(&mut stream, Side::Pvm, 4, b"o_w"), Err(5));
        let mut other = StreamBytes::new(0);
        put(&mut other, Side::Pvm, 0, b"hello").unwrap();
        assert_eq!(put(&mut other, Side::Svm, 0, b"help!"), Err(3));
    }

    #[test]
    fn the_pvm_bytes_are_referenced_and_only_the_leading_svm_bytes_copied() {
        let packet = Bytes::from_static(b"headerPAYLOAD");
        let payload = packet.slice(6..);
        let mut stream = StreamBytes::new(0);
        stream.insert_pvm(0, payload.clone()).unwrap();
        assert_eq!(stream.pieces[0].bytes.as_ptr(), payload.as_ptr());
        // The SVM's own bytes beyond the PVM's are kept as a copy: its packets are not kept.
        let svm = b"PAYLOADmore".to_vec();
        stream.insert_svm(0, &svm).unwrap();
        assert!(stream.verified(0, 7));
        assert_eq!(stream.pieces.len(), 2);
        assert_eq!(&stream.pieces[1].bytes[..], b"more");
        assert_ne!(stream.pieces[1].bytes.as_ptr(), svm[7..].as_ptr());
        // Forgetting part of a piece keeps pointing into the same packet.
        stream.forget_below(3);
        assert_eq!(stream.pieces[0].bytes.as_ptr(), payload[3..].as_ptr());
        assert_eq!(put(&mut stream, Side::Pvm, 3, b"LOADmo"), Ok(()));
        assert_eq!(put(&mut stream, Side::Pvm, 3, b"LOADmx"), Err(8));
    }

    #[test]
    fn forgetting_keeps_what_is_above_the_floor() {
        let mut stream = StreamBytes::new(0);
        put(&mut stream, Side::Svm, 0, b"0123456789").unwrap();
        stream.forget_below(4);
        assert_eq!(stream.len(), 6);
        assert_eq!(stream.base(), 4);
        assert_eq!(put(&mut stream, Side::Pvm, 4, b"456789"), Ok(()));
        assert!(stream.verified(4, 10));
        stream.forget_below(100);
        assert_eq!(stream.len(), 0);
        assert_eq!(stream.base(), 100);
        // Appending after a forgotten prefix.
        put(&mut stream, Side::Pvm, 100, b"ab").unwrap();
        put(&mut stream, Side::Svm, 100, b"ab").unwrap();
        assert!(stream.verified(100, 102));
    }
}
