//! The secondary's SVM path: what happens to each mirrored packet, each SVM packet and each
//! epoch event. Pure (no I/O), so the secondary's role loop is only wiring.
//!
//! * Mirrored packets (the client's, copied by the primary) go into the SVM with their
//!   acknowledgement numbers rewritten ([`RewriteTable::into_svm`]); a client ACK whose
//!   connection's SVM ISN is not known yet waits for the SVM's SYN.
//! * SVM output goes to the primary tagged with the SVM epoch it belongs to, in the SVM's own
//!   sequence numbers: the comparator counts each side from its own SYN, and the SVM's SYN-ACK
//!   leaves before its offset can be known. Its SYNs teach the table the SVM's ISN
//!   ([`RewriteTable::out_of_svm`]); after a failover, its output is rewritten to the PVM's
//!   numbers for the client.
//! * `svm-epoch-closed{E}`: the role loop drains the SVM's socket first (that output is
//!   epoch E's); from then on output is tagged E+1 and **held**, as are mirrored packets,
//!   because the SVM may resume the adopted state before this daemon hears
//!   `checkpoint-adopted`, and both need the offsets of the new state.
//! * `checkpoint-adopted{E}`: the SVM is a copy of the PVM, every offset is 0 again; the held
//!   packets go on with the new offsets.
//! * `colo-exit` while held: no adoption is coming (the barrier failed); the held packets go on
//!   with the old offsets.
//! * `failover` with the secondary surviving: from then on the SVM's output goes to the network
//!   (still rewritten, for the connections opened in the last epoch) instead of to the primary.
//!   Carrying it needs a network port the filter-mode topology does not have yet (see
//!   `docs/proxyd-link.md`, "After a failover").

use std::collections::VecDeque;

use crate::rewrite::{ChecksumState, Rewrite, RewriteTable};

/// Packets kept at most while held or waiting for an SVM SYN; beyond, the oldest are dropped
/// (TCP retransmits them).
const MAX_HELD: usize = 8192;

/// What the role loop must do.
#[derive(Debug, PartialEq, Eq)]
pub enum SvmOutput {
    /// Inject this frame into the SVM.
    ToSvm(Vec<u8>),
    /// Send this SVM frame to the primary, tagged with its SVM epoch.
    ToPrimary {
        /// The SVM epoch.
        epoch: u64,
        /// The frame, rewritten.
        frame: Vec<u8>,
    },
    /// After a failover: send this SVM frame to the network.
    ToNetwork(Vec<u8>),
}

/// The secondary's rewriting and epoch state.
#[derive(Debug)]
pub struct SvmPath {
    table: RewriteTable,
    /// The tag of the SVM's output now.
    epoch: u64,
    /// Between `svm-epoch-closed` and `checkpoint-adopted`.
    closed: bool,
    held_inbound: VecDeque<Vec<u8>>,
    held_output: VecDeque<Vec<u8>>,
    /// Client ACKs waiting for their connection's SVM SYN.
    waiting_syn: VecDeque<Vec<u8>>,
    failed_over: bool,
    dropped: u64,
}

impl SvmPath {
    /// A path tagging SVM output with `epoch`.
    pub fn new(epoch: u64) -> Self {
        SvmPath {
            table: RewriteTable::new(),
            epoch,
            closed: false,
            held_inbound: VecDeque::new(),
            held_output: VecDeque::new(),
            waiting_syn: VecDeque::new(),
            failed_over: false,
            dropped: 0,
        }
    }

    /// The tag of the SVM's output now.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether the SVM epoch is closed (packets held until the adoption).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Packets dropped because a bounded queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Connections with rewriting state.
    pub fn connections(&self) -> usize {
        self.table.connections()
    }

    /// A mirrored packet from the primary.
    pub fn inbound(&mut self, frame: Vec<u8>, out: &mut Vec<SvmOutput>) {
        if self.closed {
            push_bounded(&mut self.held_inbound, frame, &mut self.dropped);
            return;
        }
        self.inject(frame, out);
    }

    fn inject(&mut self, mut frame: Vec<u8>, out: &mut Vec<SvmOutput>) {
        match self.table.into_svm(&mut frame, ChecksumState::Complete) {
            Ok(Rewrite::WaitForSvmSyn) => {
                push_bounded(&mut self.waiting_syn, frame, &mut self.dropped)
            }
            // Not TCP, or not parseable: the SVM gets it as the PVM did.
            Ok(Rewrite::Unchanged | Rewrite::Rewritten) | Err(_) => {
                out.push(SvmOutput::ToSvm(frame))
            }
        }
    }

    /// A packet the SVM sent.
    pub fn svm_output(&mut self, frame: Vec<u8>, out: &mut Vec<SvmOutput>) {
        if self.closed {
            push_bounded(&mut self.held_output, frame, &mut self.dropped);
            return;
        }
        self.forward(frame, out);
    }

    fn forward(&mut self, mut frame: Vec<u8>, out: &mut Vec<SvmOutput>) {
        let syn = is_syn(&frame);
        if self.failed_over {
            // The client talks to the SVM now: it must see the PVM's numbers.
            let _ = self.table.out_of_svm(&mut frame, ChecksumState::Complete);
            out.push(SvmOutput::ToNetwork(frame));
        } else {
            // The primary's comparator places each side's segments relative to that side's
            // own SYN, so it gets the SVM's numbers untouched: the SYN-ACK leaves the SVM
            // before the offset can be known (the client's ACK teaches it), and rewriting
            // only the later segments would misplace them. Only a SYN teaches the table
            // something (the SVM's ISN, for the ACKs going into the SVM).
            if syn {
                let mut scratch = frame.clone();
                let _ = self.table.out_of_svm(&mut scratch, ChecksumState::Complete);
            }
            out.push(SvmOutput::ToPrimary {
                epoch: self.epoch,
                frame,
            });
        }
        if syn && !self.waiting_syn.is_empty() {
            // An SVM SYN may have taught the offset some waiting ACK needs.
            let waiting = std::mem::take(&mut self.waiting_syn);
            for frame in waiting {
                self.inject(frame, out);
            }
        }
    }

    /// The relay's `svm-epoch-closed{epoch}`, after the SVM's socket was drained.
    pub fn epoch_closed(&mut self, epoch: u64) {
        self.epoch = epoch + 1;
        self.closed = true;
    }

    /// The relay's `checkpoint-adopted`: offsets reset, held packets go on.
    pub fn checkpoint_adopted(&mut self, out: &mut Vec<SvmOutput>) {
        self.table.reset();
        self.reopen(out);
    }

    /// The relay's `colo-started{epoch}`: the SVM is a fresh copy of the PVM.
    pub fn colo_started(&mut self, epoch: u64, out: &mut Vec<SvmOutput>) {
        self.table.reset();
        self.epoch = epoch;
        self.reopen(out);
    }

    /// The relay's `colo-exit`: no adoption is coming for a closed epoch.
    pub fn colo_exit(&mut self, out: &mut Vec<SvmOutput>) {
        if self.closed {
            self.reopen(out);
        }
    }

    /// The relay's `failover` with the secondary surviving.
    pub fn failover(&mut self, out: &mut Vec<SvmOutput>) {
        self.failed_over = true;
        self.reopen(out);
    }

    /// Whether the SVM carries the traffic (after a failover to the secondary).
    pub fn failed_over(&self) -> bool {
        self.failed_over
    }

    fn reopen(&mut self, out: &mut Vec<SvmOutput>) {
        self.closed = false;
        // ACKs that waited for a SYN: with offsets reset they need nothing any more.
        let waiting = std::mem::take(&mut self.waiting_syn);
        for frame in waiting {
            self.inject(frame, out);
        }
        for frame in std::mem::take(&mut self.held_output) {
            self.forward(frame, out);
        }
        for frame in std::mem::take(&mut self.held_inbound) {
            self.inject(frame, out);
        }
    }
}

fn push_bounded(queue: &mut VecDeque<Vec<u8>>, frame: Vec<u8>, dropped: &mut u64) {
    if queue.len() == MAX_HELD {
        queue.pop_front();
        *dropped += 1;
    }
    queue.push_back(frame);
}

fn is_syn(frame: &[u8]) -> bool {
    use crate::packet::{Network, Transport, parse_ethernet};
    matches!(
        parse_ethernet(frame).map(|p| p.network),
        Ok(Network::Ip(ip)) if matches!(&ip.transport, Transport::Tcp(t) if t.flags.syn)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP/IPv4 frame; `from_vm` picks the direction.
    fn tcp(from_vm: bool, seq: u32, ack: u32, flags: u8) -> Vec<u8> {
        let (src, dst, sport, dport) = if from_vm {
            ([10, 0, 0, 2], [10, 0, 0, 9], 80u16, 40000u16)
        } else {
            ([10, 0, 0, 9], [10, 0, 0, 2], 40000, 80)
        };
        let mut f = vec![0x52, 0x54, 0, 0, 0, 9, 0x52, 0x54, 0, 0, 0, 1, 0x08, 0x00];
        f.extend_from_slice(&[0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0]);
        f.extend_from_slice(&src);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(&ack.to_be_bytes());
        f.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        f
    }

    fn seq_of(frame: &[u8]) -> u32 {
        u32::from_be_bytes(frame[38..42].try_into().unwrap())
    }

    fn ack_of(frame: &[u8]) -> u32 {
        u32::from_be_bytes(frame[42..46].try_into().unwrap())
    }

    #[test]
    fn a_new_connection_is_rewritten_both_ways_and_reset_at_adoption() {
        let mut path = SvmPath::new(1);
        let mut out = Vec::new();
        // Client SYN, then the SVM's SYN-ACK with ISN 5000 (the PVM chose 1000).
        path.inbound(tcp(false, 100, 0, 0x02), &mut out);
        path.svm_output(tcp(true, 5000, 101, 0x12), &mut out);
        // The client's handshake ACK acknowledges the PVM's ISN 1000.
        path.inbound(tcp(false, 101, 1001, 0x10), &mut out);
        let [
            SvmOutput::ToSvm(_),
            SvmOutput::ToPrimary { epoch: 1, .. },
            SvmOutput::ToSvm(ack),
        ] = out.as_slice()
        else {
            panic!("{out:?}")
        };
        assert_eq!(ack_of(ack), 5001);
        out.clear();
        path.svm_output(tcp(true, 5001, 101, 0x18), &mut out);
        let [SvmOutput::ToPrimary { frame, .. }] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(
            seq_of(frame),
            5001,
            "the primary compares the SVM's own numbers"
        );
        out.clear();

        path.epoch_closed(1);
        path.svm_output(tcp(true, 1001, 101, 0x18), &mut out);
        path.inbound(tcp(false, 101, 1001, 0x10), &mut out);
        assert!(out.is_empty(), "held while the epoch is closed");
        path.checkpoint_adopted(&mut out);
        let [
            SvmOutput::ToPrimary { epoch: 2, frame },
            SvmOutput::ToSvm(ack),
        ] = out.as_slice()
        else {
            panic!("{out:?}")
        };
        assert_eq!(seq_of(frame), 1001, "offset 0 after the adoption");
        assert_eq!(ack_of(ack), 1001);
    }

    #[test]
    fn after_a_failover_the_svms_output_goes_to_the_network_in_the_pvms_numbers() {
        let mut path = SvmPath::new(1);
        let mut out = Vec::new();
        path.inbound(tcp(false, 100, 0, 0x02), &mut out);
        path.svm_output(tcp(true, 5000, 101, 0x12), &mut out);
        path.inbound(tcp(false, 101, 1001, 0x10), &mut out);
        out.clear();
        path.failover(&mut out);
        path.svm_output(tcp(true, 5001, 101, 0x18), &mut out);
        let [SvmOutput::ToNetwork(frame)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(seq_of(frame), 1001);
    }

    #[test]
    fn a_client_ack_before_the_svms_syn_waits_for_it() {
        let mut path = SvmPath::new(1);
        let mut out = Vec::new();
        path.inbound(tcp(false, 100, 0, 0x02), &mut out);
        // The PVM answered faster than the SVM: the client's ACK arrives first.
        path.inbound(tcp(false, 101, 1001, 0x10), &mut out);
        assert_eq!(out.len(), 1, "only the SYN went in: {out:?}");
        path.svm_output(tcp(true, 5000, 101, 0x12), &mut out);
        let [_, SvmOutput::ToPrimary { .. }, SvmOutput::ToSvm(ack)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(ack_of(ack), 5001);
    }
}
