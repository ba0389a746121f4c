//! Which stream offsets of the PVM's output have been released. The contiguous prefix (the
//! floor) is what lets retransmissions through without the SVM's bytes, and what the SVM's
//! stored bytes can be forgotten below; ranges released out of order wait above it.

use std::collections::BTreeMap;

#[derive(Debug)]
pub(super) struct ReleasedRanges {
    floor: i64,
    /// Disjoint, non-adjacent ranges above the floor, start → end.
    above: BTreeMap<i64, i64>,
}

impl ReleasedRanges {
    /// Nothing at or above `floor` is released yet.
    pub(super) fn new(floor: i64) -> Self {
        ReleasedRanges {
            floor,
            above: BTreeMap::new(),
        }
    }

    /// Every offset below this was released.
    pub(super) fn floor(&self) -> i64 {
        self.floor
    }

    pub(super) fn insert(&mut self, start: i64, end: i64) {
        if end <= self.floor || start >= end {
            return;
        }
        let (mut start, mut end) = (start.max(self.floor), end);
        // Absorb every range that overlaps or touches [start, end).
        let touching: Vec<(i64, i64)> = self
            .above
            .range(..=end)
            .rev()
            .take_while(|(_, e)| **e >= start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in touching {
            self.above.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        if start <= self.floor {
            self.floor = end;
        } else {
            self.above.insert(start, end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_order_ranges_join_the_floor_when_the_gap_closes() {
        let mut released = ReleasedRanges::new(0);
        released.insert(20, 30);
        released.insert(10, 15);
        assert_eq!(released.floor(), 0);
        released.insert(15, 20);
        assert_eq!(released.floor(), 0);
        released.insert(0, 10);
        assert_eq!(released.floor(), 30);
        assert!(released.above.is_empty());
        released.insert(5, 25); // a retransmission below the floor changes nothing
        assert_eq!(released.floor(), 30);
    }
}
