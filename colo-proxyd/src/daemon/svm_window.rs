//! The secondary paces the client's mirrored segments by the SVM's receive window.
//!
//! The client sends as far as the *PVM's* window lets it: the windows it learns are the
//! PVM's, in the packets colo-proxyd primary releases. The SVM gets the same segments through
//! the mirror, but its receive buffer can be fuller than the PVM's: it runs behind, and under
//! a load that echoes or processes what it receives its application has not read as much yet.
//! The SVM's TCP drops a segment beyond its window. It then waits for the client's
//! retransmission, which comes only after the client's retransmission timeout (the primary
//! releases no acknowledgement the SVM has not given, so the client sees no duplicate ACKs);
//! meanwhile the SVM produces nothing, the PVM's output waits for it, and the primary asks
//! for a checkpoint when its hold bound runs out. A packet trace of the bed's upload with 4
//! echo clients showed exactly that before each `hold-timeout` checkpoint: the SVM
//! advertising a zero window, the client's next segment reaching its NIC and never being
//! acknowledged.
//!
//! [`WindowPacer`] keeps, per connection, the right edge of the window the SVM advertised
//! (its acknowledgement plus its window, scaled by the shift count of the handshake) and
//! holds a mirrored segment whose data would end beyond it until the SVM's output moves the
//! edge; a connection's segments stay in their order. The SVM so gets every byte as soon as
//! it can take it, as if its receive buffer were as large as the PVM's. The client's stream
//! is not touched: this only delays what the SVM, not the client, receives.
//!
//! The shift count comes from the SVM's SYN-ACK. A connection whose client SYN the pacer saw
//! but whose SVM SYN-ACK it did not (a checkpoint came between the client's SYN and the SVM's
//! answer, so the SVM got the PVM's half-open connection and never answered itself) takes
//! the shift count of the VM's other SYN-ACKs if the client offered scaling: the SVM runs the
//! PVM's kernel with the PVM's settings, from the PVM's memory, and Linux picks the count from
//! its default buffer sizes. Where the pacer knows nothing it does not pace: a connection
//! whose client SYN it did not see (it existed before the daemon started). After a checkpoint
//! the SVM is a copy of the PVM: the scale is kept, the edge is forgotten until the SVM
//! advertises again.
//!
//! Bounds: the bytes held by all connections ([`MAX_PACED_BYTES`]; a segment that would pass
//! it goes on at once, and the SVM may drop it as it would without the pacer); the time one
//! waits ([`MAX_PACE_WAIT`], checked every [`OVERDUE_SCAN`]; a window update the pacer
//! missed must not stall a connection for longer); the connections followed ([`MAX_PACED_CONNECTIONS`]; a new one beyond is not
//! paced).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use crate::packet::{FlowKey, Network, Transport, parse_ethernet};

/// The bytes all connections hold at most. A connection holds at most the difference between
/// the PVM's window and the SVM's (a few MiB with Linux's default buffers).
pub const MAX_PACED_BYTES: usize = 32 << 20;

/// A segment waits at most this long for the SVM's window.
pub const MAX_PACE_WAIT: Duration = Duration::from_secs(1);

/// Connections followed at most; at about 100 bytes each, a few MiB.
pub const MAX_PACED_CONNECTIONS: usize = 65_536;

/// A connection silent this long is forgotten (RFC 5382's bound for an established
/// connection through a NAT); a closed one after [`CLOSED_IDLE`].
const IDLE: Duration = Duration::from_secs(7440);
/// See [`IDLE`].
const CLOSED_IDLE: Duration = Duration::from_secs(120);
/// How often the table is scanned for idle connections, at most.
const EXPIRY_SCAN: Duration = Duration::from_secs(1);
/// How often the table is scanned for segments waiting past [`MAX_PACE_WAIT`], at most: the
/// role loop ticks the pacer at every packet, and a scan walks every connection. A segment so
/// waits at most `MAX_PACE_WAIT + OVERDUE_SCAN`.
pub const OVERDUE_SCAN: Duration = Duration::from_millis(100);

/// Running totals for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacerCounters {
    /// Segments that waited for the SVM's window.
    pub paced: u64,
    /// Of those, sent on after [`MAX_PACE_WAIT`] without the window having opened.
    pub overdue: u64,
    /// Segments beyond the SVM's window sent on at once because [`MAX_PACED_BYTES`] was
    /// reached.
    pub overflow: u64,
}

#[derive(Debug)]
struct Waiting {
    frame: Vec<u8>,
    /// The client sequence number the segment must fit below or at: the end of its data, or
    /// its sequence number if it carries none (an acknowledgement or a FIN needs no room).
    end: u32,
    since: Duration,
}

#[derive(Debug, Default)]
struct Connection {
    /// The shift count of the SVM's SYN, when the VM opened the connection: in force once the
    /// client's SYN-ACK carries the option too.
    offered: Option<u8>,
    /// The SVM's receive window scale, once the handshake settled it.
    scale: Option<u8>,
    /// The client's SYN offered window scaling (a connection the client opened).
    client_offered: bool,
    /// The furthest right edge of the SVM's receive window, in the client's numbers.
    edge: Option<u32>,
    waiting: VecDeque<Waiting>,
    last_seen: Duration,
    closing: bool,
    /// The opening SYN's sequence number: a retransmitted SYN opens nothing new.
    syn_seq: u32,
    /// The client's SYN opened the connection.
    syn_seq_from_client: bool,
}

impl Connection {
    fn fits(&self, end: u32) -> bool {
        self.edge.is_none_or(|edge| !seq_after(end, edge))
    }
}

/// `a` is after `b` in sequence space.
fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// The parts of a TCP frame the pacer reads.
struct Fields {
    /// Keyed in the VM-to-client direction.
    key: FlowKey,
    seq: u32,
    ack: Option<u32>,
    window: u16,
    window_scale: Option<u8>,
    syn: bool,
    end_flags: bool,
    payload_len: usize,
}

fn fields(frame: &[u8], from_vm: bool) -> Option<Fields> {
    let Network::Ip(ip) = parse_ethernet(frame).ok()?.network else {
        return None;
    };
    let key = ip.flow_key()?;
    let Transport::Tcp(tcp) = ip.transport else {
        return None;
    };
    Some(Fields {
        key: if from_vm { key } else { key.reversed() },
        seq: tcp.seq,
        ack: tcp.flags.ack.then_some(tcp.ack),
        window: tcp.window,
        window_scale: tcp.window_scale,
        syn: tcp.flags.syn,
        end_flags: tcp.flags.fin || tcp.flags.rst,
        payload_len: tcp.payload.len(),
    })
}

/// What waits, over all connections: kept as segments come and go, so that the role loop's
/// per-packet metrics never walk the table.
#[derive(Debug, Default, Clone, Copy)]
struct Held {
    /// Connections with segments waiting.
    connections: usize,
    frames: usize,
    bytes: usize,
}

impl Held {
    fn add(&mut self, w: &Waiting) {
        self.frames += 1;
        self.bytes += w.frame.len();
    }

    fn remove(&mut self, w: &Waiting) {
        self.frames -= 1;
        self.bytes -= w.frame.len();
    }
}

/// Holds mirrored client segments the SVM's receive window cannot take yet; see the module
/// documentation.
#[derive(Debug, Default)]
pub struct WindowPacer {
    connections: HashMap<FlowKey, Connection>,
    /// The shift count of the last SVM SYN or SYN-ACK that carried one: the VM's own, for the
    /// connections whose SYN-ACK the pacer did not see.
    vm_scale: Option<u8>,
    held: Held,
    next_expiry: Duration,
    /// The next scan for segments waiting past [`MAX_PACE_WAIT`] (see [`OVERDUE_SCAN`]).
    next_overdue_scan: Duration,
    counters: PacerCounters,
}

impl WindowPacer {
    /// An empty pacer.
    pub fn new() -> Self {
        WindowPacer::default()
    }

    /// The running totals.
    pub fn counters(&self) -> PacerCounters {
        self.counters
    }

    /// Whether a segment waits (the caller's timer then calls [`Self::tick`]).
    pub fn is_pacing(&self) -> bool {
        self.held.connections > 0
    }

    /// Segments and bytes waiting now.
    pub fn waiting(&self) -> (usize, usize) {
        (self.held.frames, self.held.bytes)
    }

    /// Connections followed.
    pub fn connections(&self) -> usize {
        self.connections.len()
    }

    /// A mirrored client frame on its way into the SVM, at `now`: appended to `out` at once,
    /// or held until the SVM's window has room for it. `out` gets frames in the order the SVM
    /// must receive them.
    pub fn to_svm(&mut self, frame: Vec<u8>, now: Duration, out: &mut Vec<Vec<u8>>) {
        let Some(f) = fields(&frame, false) else {
            out.push(frame);
            return;
        };
        if f.syn && f.ack.is_none() {
            // The client opens a connection: whatever was known of one on these addresses
            // is over.
            self.open(f.key, f.seq, now, out);
            if let Some(connection) = self.connections.get_mut(&f.key) {
                connection.syn_seq_from_client = true;
                connection.client_offered = f.window_scale.is_some();
            }
        }
        let Some(connection) = self.connections.get_mut(&f.key) else {
            out.push(frame);
            return;
        };
        connection.last_seen = now;
        connection.closing |= f.end_flags;
        if f.syn && f.ack.is_some() {
            // The client's SYN-ACK to a connection the VM opened: scaling is in force only if
            // both SYNs carry the option.
            connection.scale = Some(match f.window_scale {
                Some(_) => connection.offered.unwrap_or(0),
                None => 0,
            });
        }
        let end = f.seq.wrapping_add(f.payload_len as u32);
        if connection.waiting.is_empty() && connection.fits(end) {
            out.push(frame);
            return;
        }
        if self.held.bytes + frame.len() > MAX_PACED_BYTES {
            // Over the bound: this connection's segments go on, in their order, and the SVM
            // takes what it can.
            self.counters.overflow += 1 + connection.waiting.len() as u64;
            Self::release_all_of(connection, &mut self.held, out);
            out.push(frame);
            return;
        }
        if connection.waiting.is_empty() {
            self.held.connections += 1;
        }
        self.counters.paced += 1;
        let waiting = Waiting {
            frame,
            end,
            since: now,
        };
        self.held.add(&waiting);
        connection.waiting.push_back(waiting);
    }

    /// A frame the SVM sent, at `now`: learns its window; appends to `out` the segments that
    /// now fit.
    pub fn svm_sent(&mut self, frame: &[u8], now: Duration, out: &mut Vec<Vec<u8>>) {
        let Some(f) = fields(frame, true) else {
            return;
        };
        if f.syn && f.ack.is_none() {
            // The VM opens a connection.
            self.open(f.key, f.seq, now, out);
        } else if f.syn && !self.connections.contains_key(&f.key) {
            // A SYN-ACK whose SYN the pacer missed (a full table then, or a restart).
            self.open(f.key, f.seq, now, out);
        }
        let Some(connection) = self.connections.get_mut(&f.key) else {
            return;
        };
        connection.last_seen = now;
        connection.closing |= f.end_flags;
        let edge = match (f.syn, f.ack) {
            (true, None) => {
                connection.offered = f.window_scale;
                if f.window_scale.is_some() {
                    self.vm_scale = f.window_scale;
                }
                None
            }
            // The SYN-ACK's own window is never scaled (RFC 7323 2.2); its option, present
            // only if the client's SYN had one, settles the scale.
            (true, Some(ack)) => {
                connection.scale = Some(f.window_scale.unwrap_or(0));
                if f.window_scale.is_some() {
                    self.vm_scale = f.window_scale;
                }
                Some(ack.wrapping_add(u32::from(f.window)))
            }
            (false, Some(ack)) => {
                if connection.scale.is_none() && connection.syn_seq_from_client {
                    // The SYN-ACK was not seen (see the module documentation).
                    connection.scale = if connection.client_offered {
                        self.vm_scale
                    } else {
                        Some(0)
                    };
                }
                connection
                    .scale
                    .map(|scale| ack.wrapping_add(u32::from(f.window) << scale))
            }
            (false, None) => None,
        };
        if let Some(edge) = edge
            && connection.edge.is_none_or(|known| seq_after(edge, known))
        {
            connection.edge = Some(edge);
            Self::release_fitting(connection, &mut self.held, out);
        }
    }

    fn release_fitting(connection: &mut Connection, held: &mut Held, out: &mut Vec<Vec<u8>>) {
        let had = !connection.waiting.is_empty();
        while let Some(first) = connection.waiting.front() {
            if !connection.fits(first.end) {
                break;
            }
            if let Some(w) = connection.waiting.pop_front() {
                held.remove(&w);
                out.push(w.frame);
            }
        }
        if had && connection.waiting.is_empty() {
            held.connections -= 1;
        }
    }

    /// The caller's clock: sends on what waited [`MAX_PACE_WAIT`] (with everything behind it
    /// on its connection; one scan every [`OVERDUE_SCAN`] at most), and forgets idle
    /// connections (one scan a second at most).
    pub fn tick(&mut self, now: Duration, out: &mut Vec<Vec<u8>>) {
        if self.held.connections > 0 && now >= self.next_overdue_scan {
            self.next_overdue_scan = now + OVERDUE_SCAN;
            for connection in self.connections.values_mut() {
                let overdue = connection
                    .waiting
                    .front()
                    .is_some_and(|w| now.saturating_sub(w.since) >= MAX_PACE_WAIT);
                if overdue {
                    self.counters.overdue += connection.waiting.len() as u64;
                    Self::release_all_of(connection, &mut self.held, out);
                }
            }
        }
        if now < self.next_expiry {
            return;
        }
        self.next_expiry = now + EXPIRY_SCAN;
        self.connections.retain(|_, c| {
            let bound = if c.closing { CLOSED_IDLE } else { IDLE };
            !c.waiting.is_empty() || now.saturating_sub(c.last_seen) < bound
        });
    }

    fn release_all_of(connection: &mut Connection, held: &mut Held, out: &mut Vec<Vec<u8>>) {
        if connection.waiting.is_empty() {
            return;
        }
        held.connections -= 1;
        for w in connection.waiting.drain(..) {
            held.remove(&w);
            out.push(w.frame);
        }
    }

    /// Sends on every waiting segment (a failover, or COLO ending: the SVM's window no longer
    /// matters, or is the client's to respect).
    pub fn release_all(&mut self, out: &mut Vec<Vec<u8>>) {
        for connection in self.connections.values_mut() {
            Self::release_all_of(connection, &mut self.held, out);
        }
    }

    /// A checkpoint was adopted: the SVM is a copy of the PVM, whose window the client
    /// respects. Sends on every waiting segment and forgets the edges; the scales stay.
    pub fn checkpoint(&mut self, out: &mut Vec<Vec<u8>>) {
        self.release_all(out);
        for connection in self.connections.values_mut() {
            connection.edge = None;
        }
    }

    /// A SYN with sequence number `syn_seq` opens a connection on `key`, unless it
    /// retransmits the one that opened the connection followed there.
    fn open(&mut self, key: FlowKey, syn_seq: u32, now: Duration, out: &mut Vec<Vec<u8>>) {
        if self
            .connections
            .get(&key)
            .is_some_and(|c| c.syn_seq == syn_seq)
        {
            return;
        }
        self.forget(&key, out);
        if self.connections.len() < MAX_PACED_CONNECTIONS {
            self.connections.insert(
                key,
                Connection {
                    last_seen: now,
                    syn_seq,
                    ..Connection::default()
                },
            );
        }
    }

    fn forget(&mut self, key: &FlowKey, out: &mut Vec<Vec<u8>>) {
        if let Some(mut connection) = self.connections.remove(key) {
            Self::release_all_of(&mut connection, &mut self.held, out);
        }
    }
}

#[cfg(test)]
mod tests;
