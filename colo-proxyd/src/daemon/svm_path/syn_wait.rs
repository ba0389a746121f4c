//! Client ACKs waiting for their connection's SVM SYN, found by connection.
//!
//! Under a flood of connections thousands of ACKs can wait (the SVM answers late, or the
//! rewrite table refused its SYN), and every SVM SYN looks for its own connection's. A scan
//! of the whole queue at each SYN cost more than everything else the secondary does per
//! packet; the set of keys lets a SYN with nothing waiting skip it.

use std::collections::{HashSet, VecDeque};

use super::FrameQueue;
use crate::packet::FlowKey;

/// The queue, and the keys that may have an ACK in it.
#[derive(Debug)]
pub(super) struct SynWait {
    queue: FrameQueue<(FlowKey, Vec<u8>)>,
    /// Every key with an ACK in the queue, and some whose ACKs the queue's bound dropped
    /// since: those cost one scan that finds nothing. Rebuilt from the queue when stale keys
    /// outnumber it, so that it stays within twice the queue's bound.
    keys: HashSet<FlowKey>,
}

impl SynWait {
    /// An empty queue of at most `max_frames` frames and `max_bytes` bytes.
    pub(super) fn new(max_frames: usize, max_bytes: usize) -> Self {
        SynWait {
            queue: FrameQueue::new(max_frames, max_bytes),
            keys: HashSet::new(),
        }
    }

    /// Appends `frame` of connection `key` (VM-to-client direction); at a bound the oldest
    /// go, counted by `dropped`.
    pub(super) fn push(&mut self, key: FlowKey, frame: Vec<u8>, dropped: &mut u64) {
        let before = *dropped;
        self.queue.push((key, frame), dropped);
        self.keys.insert(key);
        if *dropped != before && self.keys.len() > 2 * self.queue.len() + 64 {
            self.keys = self.queue.iter().map(|(key, _)| *key).collect();
        }
    }

    /// The frames waiting for connection `key`, oldest first, taken out of the queue.
    pub(super) fn take_for(&mut self, key: &FlowKey) -> Vec<Vec<u8>> {
        if !self.keys.remove(key) {
            return Vec::new();
        }
        self.queue
            .extract(|(waiting, _)| waiting == key)
            .into_iter()
            .map(|(_, frame)| frame)
            .collect()
    }

    /// Every frame, oldest first; the queue is empty afterwards.
    pub(super) fn take(&mut self) -> VecDeque<(FlowKey, Vec<u8>)> {
        self.keys.clear();
        self.queue.take()
    }

    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }

    pub(super) fn bytes(&self) -> usize {
        self.queue.bytes()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            protocol: 6,
            src: [10, 0, 0, 2].into(),
            src_port: 80,
            dst: [10, 0, 0, 9].into(),
            dst_port: port,
        }
    }

    #[test]
    fn a_syn_takes_only_its_own_connections_frames_in_order() {
        let mut wait = SynWait::new(16, 1 << 20);
        let mut dropped = 0;
        wait.push(key(1), vec![1], &mut dropped);
        wait.push(key(2), vec![2], &mut dropped);
        wait.push(key(1), vec![3], &mut dropped);
        assert_eq!(wait.take_for(&key(1)), vec![vec![1], vec![3]]);
        assert!(wait.take_for(&key(1)).is_empty());
        assert_eq!(wait.len(), 1);
        assert_eq!(wait.take_for(&key(2)), vec![vec![2]]);
        assert!(wait.is_empty());
        assert_eq!(dropped, 0);
    }

    #[test]
    fn the_keys_of_dropped_frames_do_not_pile_up() {
        let mut wait = SynWait::new(4, 1 << 20);
        let mut dropped = 0;
        for port in 0..10_000 {
            wait.push(key(port), vec![0; 10], &mut dropped);
        }
        assert_eq!(wait.len(), 4);
        assert_eq!(dropped, 10_000 - 4);
        assert!(wait.keys.len() <= 2 * 4 + 64 + 1, "{}", wait.keys.len());
        // The newest still wake their connections.
        for port in 10_000 - 4..10_000 {
            assert_eq!(wait.take_for(&key(port)), vec![vec![0; 10]]);
        }
        assert!(wait.is_empty());
        assert_eq!(wait.bytes(), 0);
    }
}
