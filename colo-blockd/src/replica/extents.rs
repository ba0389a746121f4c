//! Which byte ranges of the disk an epoch layer (the PVM log or the SVM
//! overlay) has written, and where that data lives. A later write replaces
//! whatever it overlaps, byte for byte, so the map always holds the newest
//! data of every range and never more than one extent per byte.

use std::collections::BTreeMap;

use bytes::Bytes;

/// Where the data of one extent lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    /// In memory; exactly as long as the extent.
    Memory(Bytes),
    /// In the layer's spill file, starting at this file offset.
    Spill(u64),
    /// The range reads as zeroes (WRITE_ZEROES or TRIM); costs nothing.
    Zero,
}

impl Source {
    /// The source of the same extent without its first `n` bytes.
    fn skip(&self, n: u64) -> Source {
        match self {
            Source::Memory(b) => Source::Memory(b.slice(n as usize..)),
            Source::Spill(at) => Source::Spill(at + n),
            Source::Zero => Source::Zero,
        }
    }

    /// The source of the first `n` bytes of the same extent.
    fn take(&self, n: u64) -> Source {
        match self {
            Source::Memory(b) => Source::Memory(b.slice(..n as usize)),
            other => other.clone(),
        }
    }
}

/// One written range `[start, end)`; the start is the map's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Extent {
    pub(crate) end: u64,
    pub(crate) source: Source,
}

/// A piece of a looked-up range: written by the layer (`Some`) or not
/// (`None`, the base image shows through).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Segment {
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) source: Option<Source>,
}

/// Non-overlapping extents keyed by their start offset.
#[derive(Debug, Default)]
pub(crate) struct ExtentMap {
    extents: BTreeMap<u64, Extent>,
    /// Bytes of `Source::Memory` extents: what the memory budget limits.
    memory_bytes: u64,
}

impl ExtentMap {
    /// Records that `[start, end)` now holds `source`, replacing any older
    /// data in that range.
    pub(crate) fn insert(&mut self, start: u64, end: u64, source: Source) {
        debug_assert!(start < end);
        self.punch(start, end);
        self.put(start, end, source);
    }

    /// Bytes held in memory.
    pub(crate) fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    pub(crate) fn clear(&mut self) {
        self.extents.clear();
        self.memory_bytes = 0;
    }

    /// Every extent in disk order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &Extent)> {
        self.extents.iter().map(|(&start, e)| (start, e))
    }

    /// `[start, end)` cut into contiguous segments, in order.
    pub(crate) fn segments(&self, start: u64, end: u64) -> Vec<Segment> {
        let mut out = Vec::new();
        let mut at = start;
        // The extent that starts before `start` may reach into the range.
        let before = self.extents.range(..start).next_back();
        let inside = self.extents.range(start..end);
        for (&s, e) in before.into_iter().chain(inside) {
            if e.end <= at {
                continue;
            }
            if s > at {
                out.push(Segment {
                    start: at,
                    end: s,
                    source: None,
                });
                at = s;
            }
            let seg_end = e.end.min(end);
            out.push(Segment {
                start: at,
                end: seg_end,
                source: Some(e.source.skip(at - s).take(seg_end - at)),
            });
            at = seg_end;
        }
        if at < end {
            out.push(Segment {
                start: at,
                end,
                source: None,
            });
        }
        out
    }

    /// Removes `[start, end)` from every extent, keeping what lies outside.
    fn punch(&mut self, start: u64, end: u64) {
        if let Some((&s, e)) = self.extents.range(..start).next_back()
            && e.end > start
        {
            let old = self.remove(s);
            self.put(s, start, old.source.take(start - s));
            if old.end > end {
                self.put(end, old.end, old.source.skip(end - s));
            }
        }
        let inside: Vec<u64> = self.extents.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            let old = self.remove(s);
            if old.end > end {
                self.put(end, old.end, old.source.skip(end - s));
            }
        }
    }

    fn put(&mut self, start: u64, end: u64, source: Source) {
        if matches!(source, Source::Memory(_)) {
            self.memory_bytes += end - start;
        }
        self.extents.insert(start, Extent { end, source });
    }

    fn remove(&mut self, start: u64) -> Extent {
        let old = self
            .extents
            .remove(&start)
            .expect("punch only removes extents it found");
        if matches!(old.source, Source::Memory(_)) {
            self.memory_bytes -= old.end - start;
        }
        old
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(s: &'static [u8]) -> Source {
        Source::Memory(Bytes::from_static(s))
    }

    #[test]
    fn overwrite_in_the_middle_splits_the_old_extent() {
        let mut m = ExtentMap::default();
        m.insert(10, 20, mem(b"abcdefghij"));
        m.insert(13, 15, Source::Zero);
        let got: Vec<_> = m.iter().map(|(s, e)| (s, e.clone())).collect();
        assert_eq!(
            got,
            vec![
                (
                    10,
                    Extent {
                        end: 13,
                        source: mem(b"abc")
                    }
                ),
                (
                    13,
                    Extent {
                        end: 15,
                        source: Source::Zero
                    }
                ),
                (
                    15,
                    Extent {
                        end: 20,
                        source: mem(b"fghij")
                    }
                ),
            ]
        );
        assert_eq!(m.memory_bytes(), 8);
    }

    #[test]
    fn overwrite_covering_several_extents_replaces_them() {
        let mut m = ExtentMap::default();
        m.insert(0, 4, mem(b"aaaa"));
        m.insert(6, 8, Source::Spill(100));
        m.insert(9, 12, mem(b"ccc"));
        m.insert(2, 10, Source::Spill(0));
        let got: Vec<_> = m
            .iter()
            .map(|(s, e)| (s, e.end, e.source.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 2, mem(b"aa")),
                (2, 10, Source::Spill(0)),
                (10, 12, mem(b"cc"))
            ]
        );
        assert_eq!(m.memory_bytes(), 4);
    }

    #[test]
    fn segments_fill_gaps_with_the_base() {
        let mut m = ExtentMap::default();
        m.insert(4, 8, Source::Spill(40));
        let segs = m.segments(2, 6);
        assert_eq!(
            segs,
            vec![
                Segment {
                    start: 2,
                    end: 4,
                    source: None
                },
                Segment {
                    start: 4,
                    end: 6,
                    source: Some(Source::Spill(40))
                },
            ]
        );
        let segs = m.segments(5, 12);
        assert_eq!(segs[0].source, Some(Source::Spill(41)));
        assert_eq!(
            (segs[1].start, segs[1].end, &segs[1].source),
            (8, 12, &None)
        );
        assert!(ExtentMap::default().segments(0, 3)[0].source.is_none());
    }
}
