//! The secondary's rewriting state for all connections, keyed by connection, bounded.
//!
//! Only what differs from the default is kept: a connection the table does not know has
//! offset 0 (it existed at the last checkpoint, when both VMs were identical), so an entry
//! whose offset is known to be 0 is dropped at once. What stays is a connection learning its
//! offset (a handshake in progress) and one whose offset is not 0 (opened in the current
//! epoch, or, after a failover, in the last one). At a checkpoint every offset becomes 0 and
//! the table empties.
//!
//! After a failover ([`RewriteTable::freeze`]) no connection learns a non-zero offset any
//! more (the SVM talks to the client with its own numbers), so new connections get no entry
//! and the table only shrinks: an entry leaves when its connection closed (a FIN each way, or
//! an RST) and was then idle for [`RewriteLimits::transitory_idle`], when a handshake stayed
//! unfinished that long, or when an established connection was idle for
//! [`RewriteLimits::idle`] (RFC 5382's bound for NATs: a connection silent longer than that
//! through a NAT would break too). Idle time is measured in the caller's ticks.
//!
//! The table holds at most [`RewriteLimits::max_connections`] entries. When a new connection
//! needs one and the table is full, closed connections are evicted (their offsets are no
//! longer needed for data); live connections with a non-zero or unknown offset never are,
//! since giving one offset 0 would corrupt its stream. If nothing can go, the new connection
//! is refused ([`RewriteError::TableFull`]): the caller drops its SYN (the client retries,
//! as with a full listen backlog) rather than let it run with a wrong offset.

use std::collections::HashMap;
use std::time::Duration;

use super::{ChecksumState, Rewrite, RewriteError, SequenceRewriter};
use crate::packet::{FlowKey, Network, Transport, parse_ethernet};

/// The bounds of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RewriteLimits {
    /// Most connections with state.
    pub max_connections: usize,
    /// An established connection with a non-zero offset idle this long is forgotten.
    pub idle: Duration,
    /// A closed connection, or an unfinished handshake, idle this long is forgotten.
    pub transitory_idle: Duration,
}

impl RewriteLimits {
    /// The default bound on connections: at about 100 bytes an entry, a few MiB.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 65_536;
    /// RFC 5382 (REQ-5): a NAT keeps an established TCP connection at least 2 h 4 min.
    pub const DEFAULT_IDLE: Duration = Duration::from_secs(7440);
    /// About Linux's SYN retries (127 s) and longer than a TIME-WAIT of 60 s.
    pub const DEFAULT_TRANSITORY_IDLE: Duration = Duration::from_secs(120);
}

impl Default for RewriteLimits {
    fn default() -> Self {
        RewriteLimits {
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            idle: Self::DEFAULT_IDLE,
            transitory_idle: Self::DEFAULT_TRANSITORY_IDLE,
        }
    }
}

/// Running totals for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RewriteCounters {
    /// Entries forgotten after their idle bound.
    pub expired: u64,
    /// Closed connections' entries evicted early to make room.
    pub evicted: u64,
    /// New connections refused because the table was full.
    pub refused: u64,
}

#[derive(Debug)]
struct Entry {
    rewriter: SequenceRewriter,
    last_seen: Duration,
    fin_from_vm: bool,
    fin_from_client: bool,
    rst: bool,
}

impl Entry {
    fn closed(&self) -> bool {
        self.rst || (self.fin_from_vm && self.fin_from_client)
    }

    fn shifted(&self) -> bool {
        self.rewriter.offset().is_some_and(|offset| offset != 0)
    }
}

/// The flags the table follows.
#[derive(Debug, Clone, Copy)]
struct Flags {
    syn: bool,
    ack: bool,
    fin: bool,
    rst: bool,
}

/// One [`SequenceRewriter`] per TCP connection, keyed in the VM-to-client direction; see the
/// module documentation for what is kept and for how long.
#[derive(Debug, Default)]
pub struct RewriteTable {
    connections: HashMap<FlowKey, Entry>,
    limits: RewriteLimits,
    /// The caller's clock at its last tick.
    now: Duration,
    /// After a failover: new connections have offset 0.
    frozen: bool,
    /// Entries with a known non-zero offset.
    shifted: usize,
    /// Set when a full table found nothing to evict: no rescan until an entry leaves.
    full: bool,
    counters: RewriteCounters,
}

impl RewriteTable {
    /// An empty table with the default limits.
    pub fn new() -> Self {
        RewriteTable::default()
    }

    /// An empty table with these limits.
    pub fn with_limits(limits: RewriteLimits) -> Self {
        RewriteTable {
            limits,
            ..RewriteTable::default()
        }
    }

    /// Connections with rewriting state.
    pub fn connections(&self) -> usize {
        self.connections.len()
    }

    /// Connections whose SVM sequence numbers differ from the PVM's (offset known, not 0).
    pub fn connections_with_offset(&self) -> usize {
        self.shifted
    }

    /// The running totals.
    pub fn counters(&self) -> RewriteCounters {
        self.counters
    }

    /// A failover to the secondary: from now on no new connection learns an offset.
    pub fn freeze(&mut self) {
        self.frozen = true;
    }

    /// A frame from the client into the SVM; see [`SequenceRewriter::into_svm`].
    pub fn into_svm(
        &mut self,
        frame: &mut [u8],
        checksum: ChecksumState,
    ) -> Result<Rewrite, RewriteError> {
        // The client's packets travel the other way; key them like the VM's.
        let (key, flags) = tcp_flow(frame)?;
        self.apply(key.reversed(), flags, false, |r| {
            r.into_svm(frame, checksum)
        })
    }

    /// A frame out of the SVM; see [`SequenceRewriter::out_of_svm`].
    pub fn out_of_svm(
        &mut self,
        frame: &mut [u8],
        checksum: ChecksumState,
    ) -> Result<Rewrite, RewriteError> {
        let (key, flags) = tcp_flow(frame)?;
        self.apply(key, flags, true, |r| r.out_of_svm(frame, checksum))
    }

    /// Runs `rewrite` on the connection's rewriter (a default one when unknown) and keeps the
    /// entry only when it differs from the default.
    fn apply(
        &mut self,
        key: FlowKey,
        flags: Flags,
        from_vm: bool,
        rewrite: impl FnOnce(&mut SequenceRewriter) -> Result<Rewrite, RewriteError>,
    ) -> Result<Rewrite, RewriteError> {
        let opens = flags.syn && !flags.ack;
        if self.frozen && opens {
            // A new connection after the failover: the SVM's own numbers, offset 0.
            self.remove(&key);
        }
        if let Some(entry) = self.connections.get_mut(&key) {
            let (was_shifted, was_closed) = (entry.shifted(), entry.closed());
            let result = rewrite(&mut entry.rewriter);
            entry.last_seen = self.now;
            entry.rst |= flags.rst;
            if from_vm {
                entry.fin_from_vm |= flags.fin;
            } else {
                entry.fin_from_client |= flags.fin;
            }
            let (shifted, zero) = (entry.shifted(), entry.rewriter.offset() == Some(0));
            // A connection that just closed can be evicted: worth another scan when full.
            self.full &= was_closed || !entry.closed();
            self.shifted = self.shifted + usize::from(shifted) - usize::from(was_shifted);
            if zero {
                self.remove(&key);
            }
            return result;
        }
        // An opening SYN is the only frame that gives an unknown connection state (its
        // offset to learn); refused, it is left as it was.
        if opens
            && !self.frozen
            && self.connections.len() >= self.limits.max_connections
            && !self.make_room()
        {
            self.counters.refused += 1;
            return Err(RewriteError::TableFull(self.connections.len()));
        }
        let mut rewriter = SequenceRewriter::default();
        let result = rewrite(&mut rewriter);
        if !self.frozen && rewriter.offset() != Some(0) {
            let entry = Entry {
                rewriter,
                last_seen: self.now,
                fin_from_vm: from_vm && flags.fin,
                fin_from_client: !from_vm && flags.fin,
                rst: flags.rst,
            };
            self.shifted += usize::from(entry.shifted());
            self.connections.insert(key, entry);
        }
        result
    }

    fn remove(&mut self, key: &FlowKey) {
        if let Some(entry) = self.connections.remove(key) {
            self.shifted -= usize::from(entry.shifted());
            self.full = false;
        }
    }

    /// The table is full: evicts every closed connection. Returns whether there is room now.
    fn make_room(&mut self) -> bool {
        if self.full {
            return false;
        }
        let before = self.connections.len();
        self.connections.retain(|_, entry| !entry.closed());
        // Closed entries can still have an offset (the last ACKs used it).
        self.shifted = self.connections.values().filter(|e| e.shifted()).count();
        self.counters.evicted += (before - self.connections.len()) as u64;
        let room = self.connections.len() < self.limits.max_connections;
        self.full = !room;
        room
    }

    /// The caller's clock (a monotonic reading) at a tick: forgets what was idle too long.
    /// An O(connections) pass; call it every second or so.
    pub fn expire(&mut self, now: Duration) {
        self.now = now;
        let limits = self.limits;
        let before = self.connections.len();
        self.connections.retain(|_, entry| {
            let bound = if entry.closed() || entry.rewriter.offset().is_none() {
                limits.transitory_idle
            } else {
                limits.idle
            };
            now.saturating_sub(entry.last_seen) < bound
        });
        if self.connections.len() != before {
            self.counters.expired += (before - self.connections.len()) as u64;
            self.shifted = self.connections.values().filter(|e| e.shifted()).count();
            self.full = false;
        }
    }

    /// A checkpoint was adopted: every offset is 0 again, which is what an unknown
    /// connection gets, so the table simply forgets everything.
    pub fn reset(&mut self) {
        self.connections.clear();
        self.shifted = 0;
        self.full = false;
    }
}

fn tcp_flow(frame: &[u8]) -> Result<(FlowKey, Flags), RewriteError> {
    let parsed = parse_ethernet(frame)?;
    match parsed.network {
        Network::Ip(ip) => {
            let Transport::Tcp(tcp) = &ip.transport else {
                return Err(RewriteError::NotTcp);
            };
            let flags = Flags {
                syn: tcp.flags.syn,
                ack: tcp.flags.ack,
                fin: tcp.flags.fin,
                rst: tcp.flags.rst,
            };
            Ok((ip.flow_key().ok_or(RewriteError::NotTcp)?, flags))
        }
        _ => Err(RewriteError::NotTcp),
    }
}
