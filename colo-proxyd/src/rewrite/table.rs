//! The secondary's rewriting state for all connections, keyed by connection.

use std::collections::HashMap;

use super::{ChecksumState, Rewrite, RewriteError, SequenceRewriter};
use crate::packet::{FlowKey, Network, Transport, parse_ethernet};

/// One [`SequenceRewriter`] per TCP connection, keyed in the VM-to-client direction. A
/// connection the table has not seen gets offset 0: it existed at the last checkpoint, when
/// both VMs were identical, or its SYN will teach it otherwise.
#[derive(Debug, Default)]
pub struct RewriteTable {
    connections: HashMap<FlowKey, SequenceRewriter>,
}

impl RewriteTable {
    /// An empty table.
    pub fn new() -> Self {
        RewriteTable::default()
    }

    /// Connections with rewriting state.
    pub fn connections(&self) -> usize {
        self.connections.len()
    }

    /// A frame from the client into the SVM; see [`SequenceRewriter::into_svm`].
    pub fn into_svm(
        &mut self,
        frame: &mut [u8],
        checksum: ChecksumState,
    ) -> Result<Rewrite, RewriteError> {
        // The client's packets travel the other way; key them like the VM's.
        let key = tcp_flow_key(frame)?.reversed();
        self.connections
            .entry(key)
            .or_default()
            .into_svm(frame, checksum)
    }

    /// A frame out of the SVM; see [`SequenceRewriter::out_of_svm`].
    pub fn out_of_svm(
        &mut self,
        frame: &mut [u8],
        checksum: ChecksumState,
    ) -> Result<Rewrite, RewriteError> {
        let key = tcp_flow_key(frame)?;
        self.connections
            .entry(key)
            .or_default()
            .out_of_svm(frame, checksum)
    }

    /// A checkpoint was adopted: every offset is 0 again, which is what an unknown
    /// connection gets, so the table simply forgets everything.
    pub fn reset(&mut self) {
        self.connections.clear();
    }
}

fn tcp_flow_key(frame: &[u8]) -> Result<FlowKey, RewriteError> {
    let parsed = parse_ethernet(frame)?;
    match parsed.network {
        Network::Ip(ip) if matches!(ip.transport, Transport::Tcp(_)) => {
            ip.flow_key().ok_or(RewriteError::NotTcp)
        }
        _ => Err(RewriteError::NotTcp),
    }
}
