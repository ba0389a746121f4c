//! Secondary side: TCP sequence-number rewriting for connections opened since the last
//! checkpoint.
//!
//! The client talks to the PVM; the SVM receives a mirror of the client's packets. For a
//! connection opened during an epoch the SVM picked its own initial sequence number, so the
//! client's acknowledgements (which count the PVM's bytes) mean nothing to it, and after a
//! failover the SVM's own segments would carry numbers the client never agreed to. With
//! `offset = svm_isn - pvm_isn`, packets **into** the SVM get `ack + offset`, packets **out**
//! of it get `seq - offset`, and the TCP checksum follows.
//!
//! The SVM's ISN comes from its SYN or SYN-ACK; the PVM's from the first acknowledgement the
//! client sends (the handshake ACK when the VM accepted the connection, the SYN-ACK when the VM
//! opened it): `ack - 1`. QEMU's filter-rewriter learns the same two numbers but only for
//! connections the VM accepts; this one handles both directions and, when the client's ACK
//! arrives before the SVM's SYN-ACK, asks the caller to hold the ACK instead of guessing.
//! At a checkpoint the SVM becomes a copy of the PVM, so the offset of every connection
//! becomes 0 ([`SequenceRewriter::reset`]).

mod checksum;
mod table;

use thiserror::Error;

use crate::packet::{Network, ParseError, Transport, parse_ethernet};
pub use checksum::ChecksumState;
pub use table::{RewriteCounters, RewriteLimits, RewriteTable};

/// Offsets inside a TCP header.
const TCP_SEQ: usize = 4;
const TCP_ACK: usize = 8;
const TCP_CHECKSUM: usize = 16;
/// The 32-bit word of the data offset, the flags and the window.
const TCP_OFFSET_FLAGS_WINDOW: usize = 12;

/// Why a frame could not be rewritten.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RewriteError {
    /// The frame does not parse.
    #[error("frame does not parse: {0}")]
    Parse(#[from] ParseError),
    /// The frame is not a (whole, unfragmented) TCP segment.
    #[error("frame is not a TCP segment")]
    NotTcp,
    /// The frame opens a connection whose offset would have to be learnt, and the table is
    /// full of connections whose offsets must be kept; the frame was left unchanged and the
    /// connection gets no state (see [`RewriteTable`]).
    #[error("the rewrite table is full ({0} connections whose offsets must be kept)")]
    TableFull(usize),
}

/// What happened to a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewrite {
    /// Nothing needed changing.
    Unchanged,
    /// A sequence or acknowledgement number (and the checksum) changed.
    Rewritten,
    /// A client acknowledgement arrived before the SVM's SYN: its offset is unknown yet. Hold
    /// the frame and pass it again after the SVM's SYN went through
    /// [`SequenceRewriter::out_of_svm`].
    WaitForSvmSyn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OffsetState {
    Learning {
        pvm_isn: Option<u32>,
        svm_isn: Option<u32>,
    },
    Known(u32),
}

/// The rewriting state of one TCP connection on the secondary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceRewriter {
    state: OffsetState,
}

impl Default for SequenceRewriter {
    fn default() -> Self {
        Self::after_checkpoint()
    }
}

impl SequenceRewriter {
    /// A connection that existed at the last checkpoint: both VMs use the same numbers.
    pub fn after_checkpoint() -> Self {
        SequenceRewriter {
            state: OffsetState::Known(0),
        }
    }

    /// The offset `svm_isn - pvm_isn` (mod 2^32), once both are known.
    pub fn offset(&self) -> Option<u32> {
        match self.state {
            OffsetState::Known(offset) => Some(offset),
            OffsetState::Learning { .. } => None,
        }
    }

    /// A checkpoint was adopted: the SVM is a copy of the PVM, the offset is 0.
    pub fn reset(&mut self) {
        self.state = OffsetState::Known(0);
    }

    /// A frame from the client on its way into the SVM (an Ethernet frame, without vnet
    /// header). Rewrites its acknowledgement number in place.
    pub fn into_svm(
        &mut self,
        frame: &mut [u8],
        checksum: ChecksumState,
    ) -> Result<Rewrite, RewriteError> {
        let fields = tcp_fields(frame)?;
        if fields.syn && !fields.ack_flag {
            // The client opens a connection to the VM: a new ISN pair to learn.
            self.state = OffsetState::Learning {
                pvm_isn: None,
                svm_isn: None,
            };
            return Ok(Rewrite::Unchanged);
        }
        if !fields.ack_flag {
            return Ok(Rewrite::Unchanged);
        }
        if let OffsetState::Learning { pvm_isn, svm_isn } = self.state {
            // The client's first acknowledgement acknowledges the PVM's SYN.
            let pvm = pvm_isn.unwrap_or(fields.ack.wrapping_sub(1));
            self.state = match svm_isn {
                Some(svm) => OffsetState::Known(svm.wrapping_sub(pvm)),
                None => OffsetState::Learning {
                    pvm_isn: Some(pvm),
                    svm_isn: None,
                },
            };
            if svm_isn.is_none() {
                return Ok(Rewrite::WaitForSvmSyn);
            }
        }
        let offset = self.offset().unwrap_or(0);
        Ok(rewrite_field(
            frame,
            fields.header_at + TCP_ACK,
            fields.ack.wrapping_add(offset),
            fields.header_at,
            checksum,
        ))
    }

    /// A frame the SVM sent (an Ethernet frame, without vnet header). Learns the SVM's ISN
    /// from its SYN and rewrites the sequence number in place once the offset is known.
    pub fn out_of_svm(
        &mut self,
        frame: &mut [u8],
        checksum: ChecksumState,
    ) -> Result<Rewrite, RewriteError> {
        let fields = tcp_fields(frame)?;
        if fields.syn {
            if !fields.ack_flag {
                // The VM opens a connection: a new ISN pair to learn.
                self.state = OffsetState::Learning {
                    pvm_isn: None,
                    svm_isn: Some(fields.seq),
                };
            } else if let OffsetState::Learning { pvm_isn, .. } = self.state {
                self.state = match pvm_isn {
                    Some(pvm) => OffsetState::Known(fields.seq.wrapping_sub(pvm)),
                    None => OffsetState::Learning {
                        pvm_isn: None,
                        svm_isn: Some(fields.seq),
                    },
                };
            }
            // A SYN-ACK of a connection already known is a retransmission: nothing to learn.
        }
        let Some(offset) = self.offset() else {
            return Ok(Rewrite::Unchanged);
        };
        Ok(rewrite_field(
            frame,
            fields.header_at + TCP_SEQ,
            fields.seq.wrapping_sub(offset),
            fields.header_at,
            checksum,
        ))
    }
}

/// Sets a TCP frame's acknowledgement number and window field (an Ethernet frame, without
/// vnet header, its checksum complete), updating the checksum: the primary's release of a PVM
/// segment whose acknowledgement is lowered to the SVM's.
pub fn set_ack_and_window(frame: &mut [u8], ack: u32, window: u16) -> Result<(), RewriteError> {
    let fields = tcp_fields(frame)?;
    let at = fields.header_at;
    rewrite_field(frame, at + TCP_ACK, ack, at, ChecksumState::Complete);
    let word = read_u32(frame, at + TCP_OFFSET_FLAGS_WINDOW);
    let with_window = (word & 0xFFFF_0000) | u32::from(window);
    rewrite_field(
        frame,
        at + TCP_OFFSET_FLAGS_WINDOW,
        with_window,
        at,
        ChecksumState::Complete,
    );
    Ok(())
}

/// The TCP fields rewriting needs, copied out so the frame can be mutated afterwards.
struct TcpFields {
    header_at: usize,
    seq: u32,
    ack: u32,
    syn: bool,
    ack_flag: bool,
}

fn tcp_fields(frame: &[u8]) -> Result<TcpFields, RewriteError> {
    let parsed = parse_ethernet(frame)?;
    let Network::Ip(ip) = parsed.network else {
        return Err(RewriteError::NotTcp);
    };
    let Transport::Tcp(tcp) = ip.transport else {
        return Err(RewriteError::NotTcp);
    };
    // The payload is a subslice of `frame`, so address arithmetic finds the header.
    let payload_at = tcp.payload.as_ptr().addr() - frame.as_ptr().addr();
    Ok(TcpFields {
        header_at: payload_at - tcp.header_len,
        seq: tcp.seq,
        ack: tcp.ack,
        syn: tcp.flags.syn,
        ack_flag: tcp.flags.ack,
    })
}

fn read_u32(frame: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([frame[at], frame[at + 1], frame[at + 2], frame[at + 3]])
}

/// Writes `value` at `at` (inside a TCP header that `tcp_fields` validated) and updates the
/// checksum unless it is partial.
fn rewrite_field(
    frame: &mut [u8],
    at: usize,
    value: u32,
    header_at: usize,
    checksum: ChecksumState,
) -> Rewrite {
    let old = read_u32(frame, at);
    if old == value {
        return Rewrite::Unchanged;
    }
    frame[at..at + 4].copy_from_slice(&value.to_be_bytes());
    if checksum == ChecksumState::Complete {
        let sum_at = header_at + TCP_CHECKSUM;
        let sum = u16::from_be_bytes([frame[sum_at], frame[sum_at + 1]]);
        let updated = checksum::update_for_u32(sum, old, value);
        frame[sum_at..sum_at + 2].copy_from_slice(&updated.to_be_bytes());
    }
    Rewrite::Rewritten
}

#[cfg(test)]
mod tests;
