//! Comparison of one datagram flow (UDP, ICMP): each PVM datagram needs an SVM datagram with
//! the same bytes. Datagrams have no sequence numbers, so order is matched loosely: either
//! side may run up to a small window ahead with datagrams the other has not produced yet.

use std::collections::VecDeque;

use super::{Action, CheckpointReason, PacketId};

/// Datagrams one side may have unmatched while the other also has unmatched ones, before
/// the flows count as diverged.
pub const DEFAULT_REORDER_WINDOW: usize = 8;

#[derive(Debug)]
struct HeldDatagram {
    id: PacketId,
    bytes: Vec<u8>,
    matched: bool,
}

/// The comparator of one datagram flow in the VM-to-client direction.
#[derive(Debug)]
pub struct DatagramComparator {
    window: usize,
    /// PVM datagrams not yet released, in the PVM's order.
    held: VecDeque<HeldDatagram>,
    /// SVM datagrams no PVM datagram has matched yet, oldest first.
    svm_unmatched: VecDeque<Vec<u8>>,
    stalled: bool,
}

impl DatagramComparator {
    /// A comparator letting each side run `window` datagrams ahead.
    pub fn new(window: usize) -> Self {
        DatagramComparator {
            window: window.max(1),
            held: VecDeque::new(),
            svm_unmatched: VecDeque::new(),
            stalled: false,
        }
    }

    /// PVM datagrams held right now.
    pub fn held_packets(&self) -> usize {
        self.held.len()
    }

    /// Bytes kept for comparison right now.
    pub fn buffered_bytes(&self) -> usize {
        self.held.iter().map(|d| d.bytes.len()).sum::<usize>()
            + self.svm_unmatched.iter().map(Vec::len).sum::<usize>()
    }

    /// Whether dropping this comparator loses nothing: nothing held, no SVM datagram waiting
    /// (a fresh comparator then behaves exactly like this one).
    pub fn is_forgettable(&self) -> bool {
        !self.stalled && self.held.is_empty() && self.svm_unmatched.is_empty()
    }

    /// The oldest PVM datagram still held.
    pub fn oldest_held(&self) -> Option<PacketId> {
        self.held.front().map(|d| d.id)
    }

    /// The PVM sent datagram `id` with these bytes (payload, or ICMP type, code and body).
    pub fn push_pvm(&mut self, id: PacketId, bytes: &[u8], actions: &mut Vec<Action>) {
        if self.stalled {
            self.held.push_back(HeldDatagram {
                id,
                bytes: Vec::new(),
                matched: false,
            });
            return;
        }
        let matched = match self.svm_unmatched.iter().position(|svm| svm == bytes) {
            Some(at) => {
                self.svm_unmatched.remove(at);
                true
            }
            None => false,
        };
        self.held.push_back(HeldDatagram {
            id,
            bytes: bytes.to_vec(),
            matched,
        });
        self.settle(actions);
    }

    /// The SVM sent a datagram with these bytes.
    pub fn push_svm(&mut self, bytes: &[u8], actions: &mut Vec<Action>) {
        if self.stalled {
            return;
        }
        match self
            .held
            .iter_mut()
            .find(|pvm| !pvm.matched && pvm.bytes == bytes)
        {
            Some(pvm) => pvm.matched = true,
            None => self.svm_unmatched.push_back(bytes.to_vec()),
        }
        self.settle(actions);
    }

    /// A checkpoint was adopted: hands back every held datagram, oldest first.
    pub fn reset(&mut self) -> Vec<PacketId> {
        let held = self.held.drain(..).map(|d| d.id).collect();
        *self = DatagramComparator::new(self.window);
        held
    }

    fn settle(&mut self, actions: &mut Vec<Action>) {
        while self.held.front().is_some_and(|d| d.matched) {
            if let Some(datagram) = self.held.pop_front() {
                actions.push(Action::Release(datagram.id));
            }
        }
        let pvm_unmatched = self.held.iter().filter(|d| !d.matched).count();
        let svm_unmatched = self.svm_unmatched.len();
        let both_waiting = pvm_unmatched > 0 && svm_unmatched > 0;
        if both_waiting && (pvm_unmatched > self.window || svm_unmatched > self.window) {
            self.stalled = true;
            for datagram in &mut self.held {
                datagram.bytes = Vec::new();
            }
            self.svm_unmatched.clear();
            actions.push(Action::CheckpointNeeded(CheckpointReason::DatagramsDiffer));
        }
        // An SVM that only runs ahead (the PVM is slow) is bounded by the window too: beyond
        // it the oldest unmatched SVM datagram can no longer be waited for.
        if !self.stalled && svm_unmatched > 4 * self.window {
            self.svm_unmatched.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        comparator: &mut DatagramComparator,
        pvm: &[(u64, &[u8])],
        svm: &[&[u8]],
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        for (id, bytes) in pvm {
            comparator.push_pvm(PacketId(*id), bytes, &mut actions);
        }
        for bytes in svm {
            comparator.push_svm(bytes, &mut actions);
        }
        actions
    }

    #[test]
    fn reordered_datagrams_match_and_leave_in_pvm_order() {
        let mut comparator = DatagramComparator::new(4);
        let actions = run(
            &mut comparator,
            &[(1, b"a"), (2, b"b"), (3, b"c")],
            &[b"c", b"a", b"b"],
        );
        assert_eq!(
            actions,
            vec![
                Action::Release(PacketId(1)),
                Action::Release(PacketId(2)),
                Action::Release(PacketId(3))
            ]
        );
        assert_eq!(comparator.buffered_bytes(), 0);
    }

    #[test]
    fn svm_ahead_is_matched_when_the_pvm_catches_up() {
        let mut comparator = DatagramComparator::new(4);
        let actions = run(&mut comparator, &[], &[b"x", b"x"]);
        assert!(actions.is_empty());
        let actions = run(&mut comparator, &[(7, b"x"), (8, b"x")], &[]);
        assert_eq!(
            actions,
            vec![Action::Release(PacketId(7)), Action::Release(PacketId(8))]
        );
    }

    #[test]
    fn differing_datagrams_beyond_the_window_request_a_checkpoint() {
        let mut comparator = DatagramComparator::new(2);
        let actions = run(
            &mut comparator,
            &[(1, b"p1"), (2, b"p2"), (3, b"p3")],
            &[b"s1"],
        );
        assert_eq!(
            actions,
            vec![Action::CheckpointNeeded(CheckpointReason::DatagramsDiffer)]
        );
        assert_eq!(comparator.oldest_held(), Some(PacketId(1)));
        assert_eq!(
            comparator.reset(),
            vec![PacketId(1), PacketId(2), PacketId(3)]
        );
    }
}
