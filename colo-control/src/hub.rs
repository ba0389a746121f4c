//! Relay side of the control protocol: accepts daemons and operator tools on
//! one or more [`ControlListener`]s (the relay's Unix socket, plus TCP for
//! the daemons on the other host), fans events out, runs checkpoint barriers
//! and keeps the relay's [`RelayStatus`]. A client's transport makes no
//! difference to anything the hub does.
//!
//! Every connection has a reader task and a writer task fed by a bounded
//! queue, so publishing never waits on a slow client: a client whose queue
//! is full, or whose socket does not take a line within
//! [`HubOptions::write_timeout`], is disconnected (and, if it is a sync
//! subscriber, fails the barrier it is part of). Nothing is ever dropped
//! silently.

use crate::protocol::{
    ClientMessage, ConnectionRole, DecodeError, Event, EventBody, EventKind, Hello, MAX_LINE,
    PROTOCOL_VERSION, RelayMessage, RelayState, RelayStatus, SUPPORTED_VERSIONS, SubscriberStatus,
    decode_client_line, encode_line, now_micros,
};
use crate::transport::{Accepted, StreamReader, StreamWriter};
use futures_util::StreamExt;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use crate::transport::{ControlListener, Peer};

/// Distinct `checkpoint-requested` reasons kept in status; further new
/// reasons are counted under [`OTHER_REASONS`] so a misbehaving client cannot
/// grow the map without bound.
pub const MAX_REASONS: usize = 64;
/// Bucket for reasons beyond [`MAX_REASONS`].
pub const OTHER_REASONS: &str = "(other)";
/// Longest reason kept verbatim, in bytes; longer ones are cut.
pub const MAX_REASON_LEN: usize = 128;

/// Tuning of a [`ControlHub`].
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// A client that sends no `hello` within this time is disconnected.
    pub hello_timeout: Duration,
    /// A client whose socket does not accept a line within this time is
    /// disconnected.
    pub write_timeout: Duration,
    /// Lines queued per client before it counts as stuck and is
    /// disconnected.
    pub queue_depth: usize,
    /// Who may ask for a `failover` (only ever over a Unix socket).
    pub operators: OperatorPolicy,
    /// Most clients served at once on one Unix listener; a connection
    /// beyond it is closed before a byte of it is read.
    pub max_unix_clients: usize,
    /// Most clients served at once on one TCP listener; a connection beyond
    /// it is closed before a byte of it is read.
    pub max_tcp_clients: usize,
    /// When set, TCP clients are served only from these addresses; any
    /// other is closed before a byte of it is read. An address is not an
    /// identity (anyone who can send from it passes), but it keeps a
    /// stranger elsewhere on the network out until the link is
    /// authenticated.
    pub tcp_peers: Option<Vec<IpAddr>>,
    /// Mutual TLS on every TCP listener: a client must present a
    /// certificate of the pair's CA for an allowed host, or it is closed
    /// before a byte of the protocol is read. Unix listeners are unaffected.
    pub tls: Option<colo_tls::PeerAcceptor>,
}

/// Default [`HubOptions::max_unix_clients`]: a relay's host has two daemons
/// and a few tools.
pub const DEFAULT_MAX_UNIX_CLIENTS: usize = 64;
/// Default [`HubOptions::max_tcp_clients`]: the other host has one or two
/// daemons (and their reconnections overlapping the old connection).
pub const DEFAULT_MAX_TCP_CLIENTS: usize = 8;

impl Default for HubOptions {
    fn default() -> Self {
        HubOptions {
            hello_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            queue_depth: 1024,
            operators: OperatorPolicy::default(),
            max_unix_clients: DEFAULT_MAX_UNIX_CLIENTS,
            max_tcp_clients: DEFAULT_MAX_TCP_CLIENTS,
            tcp_peers: None,
            tls: None,
        }
    }
}

/// Who may ask the relay to announce a `failover`: the local operator.
///
/// A `failover` event makes colo-blockd drop the primary's log and
/// colo-proxyd stop releasing or comparing, so only a process on the
/// relay's host, over the Unix socket, whose kernel-given credentials
/// (`SO_PEERCRED`) name an allowed uid or gid, may ask for it. TCP clients
/// never may: nothing authenticates them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorPolicy {
    /// Allowed user ids (default: root only; the relay adds its own).
    pub uids: BTreeSet<u32>,
    /// Allowed primary group id of the client, if any.
    pub gid: Option<u32>,
}

impl Default for OperatorPolicy {
    fn default() -> Self {
        OperatorPolicy {
            uids: BTreeSet::from([0]),
            gid: None,
        }
    }
}

impl OperatorPolicy {
    /// Whether `peer` may ask for a failover; the error says why not.
    pub fn check(&self, peer: &Peer) -> Result<(), String> {
        match peer {
            Peer::Local { uid, gid, .. } => {
                if self.uids.contains(uid) || self.gid == Some(*gid) {
                    Ok(())
                } else {
                    let gid_note = match self.gid {
                        Some(g) => format!(" or gid {g}"),
                        None => String::new(),
                    };
                    Err(format!(
                        "uid {uid} (gid {gid}) is not an operator of this relay (allowed: uid {}{gid_note})",
                        self.uids
                            .iter()
                            .map(u32::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }
            }
            Peer::LocalUnknown => Err("the client's credentials could not be read".to_string()),
            Peer::Remote(addr) | Peer::Authenticated { addr, .. } => Err(format!(
                "a failover is accepted only on the relay's Unix socket, not over TCP (from {addr})"
            )),
        }
    }
}

/// At most one line per second for a message a stranger can cause at will
/// (a refused connection, a refused request), with the count of the ones
/// it stands for.
#[derive(Debug, Default)]
struct LogLimit {
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimit {
    /// `Some(suppressed)` when this occurrence may be logged.
    fn allow(&self) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match st.0 {
            Some(last) if now.duration_since(last) < Duration::from_secs(1) => {
                st.1 += 1;
                None
            }
            _ => {
                st.0 = Some(now);
                Some(std::mem::take(&mut st.1))
            }
        }
    }
}

/// One sync subscriber's answer in a successful barrier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckLatency {
    /// The subscriber's `hello` name.
    pub name: String,
    /// From queueing the event to reading the ack.
    pub latency: Duration,
}

/// Outcome of a successful [`ControlHub::barrier`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BarrierReport {
    /// Whole barrier duration.
    pub elapsed: Duration,
    /// One entry per sync subscriber, in the order the acks arrived. Empty
    /// when there was no sync subscriber.
    pub acks: Vec<AckLatency>,
}

/// Why a barrier failed. The relay treats both variants the same way: COLO
/// can no longer keep its guarantee, so it ends COLO.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BarrierError {
    /// These sync subscribers did not ack within the timeout.
    #[error("no ack within {after:?} from sync subscriber(s) {}", missing.join(", "))]
    Timeout {
        /// Names of the subscribers that did not ack.
        missing: Vec<String>,
        /// The timeout.
        after: Duration,
    },
    /// A sync subscriber disconnected during the barrier, or had left during
    /// the current COLO session before it (its state for this epoch is
    /// unknown, so the barrier cannot pass).
    #[error(
        "sync subscriber(s) {} disconnected (barrier failed after {after:?}{})",
        disconnected.join(", "),
        if missing.is_empty() { String::new() } else { format!("; also waiting for {}", missing.join(", ")) }
    )]
    Disconnected {
        /// Names of the departed sync subscribers.
        disconnected: Vec<String>,
        /// Names of the other sync subscribers that had not acked yet.
        missing: Vec<String>,
        /// Time from the start of the barrier to the failure.
        after: Duration,
    },
    /// The hub was closed.
    #[error("the control hub is closed")]
    Closed,
}

impl BarrierError {
    /// Every sync subscriber that made the barrier fail (missing or gone).
    pub fn culprits(&self) -> Vec<String> {
        match self {
            BarrierError::Timeout { missing, .. } => missing.clone(),
            BarrierError::Disconnected {
                disconnected,
                missing,
                ..
            } => disconnected.iter().chain(missing).cloned().collect(),
            BarrierError::Closed => Vec::new(),
        }
    }
}

/// The relay's control socket server. Cheap to clone (all clones share one
/// hub). Create it inside a Tokio runtime; it runs until
/// [`ControlHub::close`] or [`ControlHub::shutdown`].
#[derive(Debug, Clone)]
pub struct ControlHub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<HubState>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    opts: HubOptions,
    next_id: AtomicU64,
    refused_connection_log: LogLimit,
    refused_request_log: LogLimit,
}

#[derive(Debug, Default)]
struct HubState {
    /// Plain fields of the status; `version`, `subscribers` and
    /// `checkpoint_rate_per_min` are filled in by [`HubState::snapshot`].
    status: RelayStatus,
    checkpoint_times: VecDeque<Instant>,
    conns: BTreeMap<u64, Conn>,
    /// Sync subscribers that left while the state was precopy or colo.
    departed: Vec<SubscriberStatus>,
}

#[derive(Debug)]
struct Conn {
    name: String,
    role: ConnectionRole,
    sync: bool,
    receives_events: bool,
    tx: mpsc::Sender<String>,
    kill: CancellationToken,
    /// Last seq sent on this connection.
    seq: u64,
    connected_since_us: u64,
    last_ack_us: Option<u64>,
    last_ack_latency_us: Option<u64>,
    healthy: bool,
    pending: Vec<Pending>,
}

#[derive(Debug)]
struct Pending {
    seq: u64,
    sent_at: Instant,
    barrier: u64,
    signal: mpsc::UnboundedSender<Signal>,
}

/// A connection id and its subscriber's name.
type Named = (u64, String);

#[derive(Debug)]
enum Signal {
    Acked { conn: u64, latency: Duration },
    Gone { conn: u64 },
}

impl Conn {
    fn status(&self) -> SubscriberStatus {
        SubscriberStatus {
            name: self.name.clone(),
            sync: self.sync,
            connected_since_us: self.connected_since_us,
            last_ack_us: self.last_ack_us,
            last_ack_latency_us: self.last_ack_latency_us,
            healthy: self.healthy,
            connected: true,
        }
    }

    /// Queues a line; on a full or closed queue disconnects the client and
    /// returns false.
    fn send(&self, id: u64, line: String) -> bool {
        match self.tx.try_send(line) {
            Ok(()) => true,
            Err(e) => {
                if matches!(e, mpsc::error::TrySendError::Full(_)) {
                    tracing::warn!(conn = id, name = %self.name, "control client does not read its events; disconnecting it");
                }
                self.kill.cancel();
                false
            }
        }
    }
}

fn lock(m: &Mutex<HubState>) -> MutexGuard<'_, HubState> {
    // A panic while holding the lock leaves consistent-enough counters;
    // keep serving rather than poisoning every later call.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl HubState {
    fn snapshot(&mut self) -> RelayStatus {
        let now = Instant::now();
        while let Some(&t) = self.checkpoint_times.front() {
            if now.duration_since(t) > Duration::from_secs(60) {
                self.checkpoint_times.pop_front();
            } else {
                break;
            }
        }
        let mut s = self.status.clone();
        s.version = PROTOCOL_VERSION;
        s.checkpoint_rate_per_min = self.checkpoint_times.len() as f64;
        s.subscribers = self
            .conns
            .values()
            .filter(|c| c.receives_events)
            .map(Conn::status)
            .chain(self.departed.iter().cloned())
            .collect();
        s
    }

    /// Sends `body` to every event receiver. With `barrier`, sync subscribers
    /// get it with `sync: true` and a pending ack is registered for them;
    /// returns (conn id, name) of those, and the ids whose queue failed.
    fn deliver(
        &mut self,
        body: &EventBody,
        barrier: Option<(u64, &mpsc::UnboundedSender<Signal>)>,
    ) -> (Vec<Named>, Vec<Named>) {
        let now_us = now_micros();
        let now = Instant::now();
        let mut waiting = Vec::new();
        let mut failed = Vec::new();
        for (&id, conn) in self.conns.iter_mut() {
            if !conn.receives_events {
                continue;
            }
            let sync = barrier.is_some() && conn.sync;
            conn.seq += 1;
            let ev = Event::from_body(body, conn.seq, sync, now_us);
            let ok = conn.send(id, encode_line(&RelayMessage::Event(ev)));
            if let (true, Some((barrier_id, signal))) = (sync, barrier) {
                if ok {
                    conn.pending.push(Pending {
                        seq: conn.seq,
                        sent_at: now,
                        barrier: barrier_id,
                        signal: signal.clone(),
                    });
                    waiting.push((id, conn.name.clone()));
                } else {
                    conn.healthy = false;
                    failed.push((id, conn.name.clone()));
                }
            }
        }
        (waiting, failed)
    }

    fn set_state_hook(&mut self, before: RelayState) {
        let after = self.status.state;
        // A departed sync subscriber matters only inside the COLO session it
        // left: a new session (precopy) or the end of one forgets it.
        if after != before && after != RelayState::Colo {
            self.departed.clear();
        }
    }
}

/// Removes a barrier's pending acks when the barrier ends, however it ends
/// (including its future being dropped).
struct BarrierGuard<'a> {
    inner: &'a Inner,
    id: u64,
}

impl Drop for BarrierGuard<'_> {
    fn drop(&mut self) {
        let mut st = lock(&self.inner.state);
        for conn in st.conns.values_mut() {
            conn.pending.retain(|p| p.barrier != self.id);
        }
    }
}

/// One client slot of a listener, given back when its connection ends.
struct ServedSlot(Arc<AtomicUsize>);

impl Drop for ServedSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ControlHub {
    /// Serves the control protocol on `listener` (already bound: a
    /// `UnixListener`, a `TcpListener` or a [`ControlListener`]) with default
    /// options. Must be called inside a Tokio runtime. More listeners can be
    /// added with [`ControlHub::listen`].
    pub fn new(listener: impl Into<ControlListener>) -> ControlHub {
        Self::with_options(listener, HubOptions::default())
    }

    /// Like [`ControlHub::new`] with explicit options.
    pub fn with_options(listener: impl Into<ControlListener>, opts: HubOptions) -> ControlHub {
        let inner = Arc::new(Inner {
            state: Mutex::new(HubState {
                status: RelayStatus {
                    version: PROTOCOL_VERSION,
                    ..RelayStatus::default()
                },
                ..HubState::default()
            }),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            opts,
            next_id: AtomicU64::new(1),
            refused_connection_log: LogLimit::default(),
            refused_request_log: LogLimit::default(),
        });
        let hub = ControlHub { inner };
        hub.listen(listener);
        hub
    }

    /// Also accepts clients on `listener` (e.g. a TCP listener next to the
    /// Unix socket), until the hub closes. Every listener serves the same
    /// hub: a TCP subscriber takes part in barriers exactly like a Unix one.
    /// On a closed hub the listener is dropped at once.
    pub fn listen(&self, listener: impl Into<ControlListener>) {
        let listener = listener.into();
        let accept = self.clone();
        self.inner
            .tasks
            .spawn(async move { accept.accept_loop(listener).await });
    }

    async fn accept_loop(self, listener: ControlListener) {
        let local = listener
            .local_address()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let limit = match listener {
            ControlListener::Tcp(_) => self.inner.opts.max_tcp_clients,
            ControlListener::Unix(_) | ControlListener::UnixAt { .. } => {
                self.inner.opts.max_unix_clients
            }
        };
        // Clients of this listener being served; each task holds one unit.
        let served = Arc::new(AtomicUsize::new(0));
        loop {
            let accepted = tokio::select! {
                _ = self.inner.cancel.cancelled() => break,
                r = listener.accept() => r,
            };
            match accepted {
                Ok(accepted) => {
                    let peer = accepted.peer.clone();
                    if let Err(why) = self.admit(&peer, &served, limit) {
                        // Dropped unread: the client sees its connection closed.
                        drop(accepted);
                        self.refused_connection(&peer, &local, &why);
                        continue;
                    }
                    let slot = ServedSlot(served.clone());
                    let hub = self.clone();
                    // Every log line of this client carries where it came from.
                    let span = tracing::info_span!(
                        "control_connection",
                        peer = %peer,
                        listener = %local
                    );
                    self.inner.tasks.spawn(
                        async move {
                            hub.serve_conn(accepted, peer).await;
                            drop(slot);
                        }
                        .instrument(span),
                    );
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, listener = %local, "control socket accept failed");
                    tokio::select! {
                        _ = self.inner.cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            }
        }
        tracing::debug!(listener = %local, "control socket closed");
    }

    /// Takes one of the listener's `limit` client slots for `peer`, or says
    /// why it is refused.
    fn admit(&self, peer: &Peer, served: &AtomicUsize, limit: usize) -> Result<(), String> {
        if let (Peer::Remote(addr), Some(allowed)) = (peer, &self.inner.opts.tcp_peers)
            && !allowed.contains(&addr.ip())
        {
            return Err(format!("{} is not an allowed TCP control peer", addr.ip()));
        }
        served
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .map(drop)
            .map_err(|_| format!("already {limit} clients on this listener"))
    }

    fn refused_connection(&self, peer: &Peer, listener: &str, why: &str) {
        lock(&self.inner.state).status.refused_control_connections += 1;
        if let Some(suppressed) = self.inner.refused_connection_log.allow() {
            tracing::warn!(%peer, %listener, suppressed, "refused a control connection: {why}");
        }
    }

    /// Stops accepting and disconnects every client. Barriers in progress
    /// fail with [`BarrierError::Closed`] or a disconnect.
    pub fn close(&self) {
        self.inner.cancel.cancel();
    }

    /// [`ControlHub::close`], then waits until every connection task ended.
    pub async fn shutdown(&self) {
        self.close();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    /// True once [`ControlHub::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }

    /// Sends an asynchronous event (`sync: false`) to every event receiver.
    /// Never waits for a client.
    pub async fn publish(&self, body: EventBody) {
        let mut st = lock(&self.inner.state);
        tracing::debug!(event = %body.event, epoch = body.epoch, "publish");
        st.deliver(&body, None);
    }

    /// Sends `body` to every event receiver, with `sync: true` to the sync
    /// subscribers, and waits until each of those has acked it.
    ///
    /// Fails with [`BarrierError::Timeout`] when one has not acked within
    /// `timeout`, and at once with [`BarrierError::Disconnected`] when one
    /// disconnects meanwhile or a sync subscriber has left during the
    /// current COLO session (see `docs/control-protocol.md`). Returns at once
    /// when there is no sync subscriber.
    pub async fn barrier(
        &self,
        body: EventBody,
        timeout: Duration,
    ) -> Result<BarrierReport, BarrierError> {
        if self.is_closed() {
            return Err(BarrierError::Closed);
        }
        let start = Instant::now();
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (signal_tx, mut signal_rx) = mpsc::unbounded_channel();
        let _guard = BarrierGuard {
            inner: &self.inner,
            id,
        };
        let (mut waiting, failed, departed) = {
            let mut st = lock(&self.inner.state);
            tracing::debug!(event = %body.event, epoch = body.epoch, "barrier");
            let (waiting, failed) = st.deliver(&body, Some((id, &signal_tx)));
            let departed: Vec<String> = st.departed.iter().map(|d| d.name.clone()).collect();
            (waiting, failed, departed)
        };
        if !failed.is_empty() || !departed.is_empty() {
            return Err(BarrierError::Disconnected {
                disconnected: departed
                    .into_iter()
                    .chain(failed.into_iter().map(|(_, n)| n))
                    .collect(),
                missing: waiting.into_iter().map(|(_, n)| n).collect(),
                after: start.elapsed(),
            });
        }
        let mut acks = Vec::with_capacity(waiting.len());
        let deadline = start + timeout;
        while !waiting.is_empty() {
            let signal = tokio::select! {
                _ = self.inner.cancel.cancelled() => return Err(BarrierError::Closed),
                s = tokio::time::timeout_at(deadline, signal_rx.recv()) => s,
            };
            match signal {
                Ok(Some(Signal::Acked { conn, latency })) => {
                    if let Some(pos) = waiting.iter().position(|(id, _)| *id == conn) {
                        let (_, name) = waiting.remove(pos);
                        acks.push(AckLatency { name, latency });
                    }
                }
                Ok(Some(Signal::Gone { conn })) => {
                    if let Some(pos) = waiting.iter().position(|(id, _)| *id == conn) {
                        let (_, name) = waiting.remove(pos);
                        return Err(BarrierError::Disconnected {
                            disconnected: vec![name],
                            missing: waiting.into_iter().map(|(_, n)| n).collect(),
                            after: start.elapsed(),
                        });
                    }
                }
                // We hold a sender ourselves, so the channel never closes.
                Ok(None) => return Err(BarrierError::Closed),
                Err(_elapsed) => {
                    let mut st = lock(&self.inner.state);
                    for (id, _) in &waiting {
                        if let Some(c) = st.conns.get_mut(id) {
                            c.healthy = false;
                        }
                    }
                    return Err(BarrierError::Timeout {
                        missing: waiting.into_iter().map(|(_, n)| n).collect(),
                        after: timeout,
                    });
                }
            }
        }
        Ok(BarrierReport {
            elapsed: start.elapsed(),
            acks,
        })
    }

    /// The current status, as an operator's `status` request sees it.
    pub fn status(&self) -> RelayStatus {
        lock(&self.inner.state).snapshot()
    }

    /// Changes the relay's part of the status (state, epoch, counters...).
    /// `version`, `subscribers` and `checkpoint_rate_per_min` are computed
    /// by the hub; changing them here has no effect. Leaving `colo` for any
    /// other state forgets departed sync subscribers.
    pub fn update_status<R>(&self, f: impl FnOnce(&mut RelayStatus) -> R) -> R {
        let mut st = lock(&self.inner.state);
        let before = st.status.state;
        let r = f(&mut st.status);
        st.set_state_hook(before);
        r
    }

    /// Counts a completed checkpoint (status `checkpoints`, the rate, and
    /// `last_pause_us` when `pause` is known).
    pub fn record_checkpoint(&self, pause: Option<Duration>) {
        let mut st = lock(&self.inner.state);
        st.status.checkpoints += 1;
        if let Some(p) = pause {
            st.status.last_pause_us = Some(micros(p));
        }
        st.checkpoint_times.push_back(Instant::now());
        if st.checkpoint_times.len() > 100_000 {
            st.checkpoint_times.pop_front();
        }
    }

    async fn serve_conn(self, accepted: Accepted, peer: Peer) {
        // The TLS handshake runs here, in the connection's task (the accept
        // loop never waits on a client), bounded by its timeout.
        let (rd, wr, peer) = match accepted.into_halves(self.inner.opts.tls.as_ref()).await {
            Ok(halves) => halves,
            Err(e) => {
                self.refused_connection(&peer, "tls", &e.to_string());
                return;
            }
        };
        if let Peer::Authenticated { name, .. } = &peer {
            tracing::debug!(%name, "control client authenticated");
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut lines = FramedRead::new(rd, LinesCodec::new_with_max_length(MAX_LINE));
        let (tx, rx) = mpsc::channel::<String>(self.inner.opts.queue_depth.max(1));
        // `kill` drops this client at once (stuck or gone); the hub closing
        // stops the reader but lets the writer flush what is queued, so the
        // last events (a colo-exit) still reach the client.
        let kill = CancellationToken::new();
        let closing = self.inner.cancel.clone();
        let writer = tokio::spawn(write_loop(
            wr,
            rx,
            kill.clone(),
            closing.clone(),
            self.inner.opts.write_timeout,
        ));

        let hello = tokio::select! {
            _ = kill.cancelled() => None,
            _ = closing.cancelled() => None,
            r = tokio::time::timeout(self.inner.opts.hello_timeout, lines.next()) => match r {
                Err(_) => {
                    tracing::debug!(conn = id, "control client sent no hello in time");
                    let _ = tx.try_send(error_line("no hello within the time limit", None));
                    None
                }
                Ok(None) | Ok(Some(Err(LinesCodecError::Io(_)))) => None,
                Ok(Some(Err(LinesCodecError::MaxLineLengthExceeded))) => {
                    let _ = tx.try_send(error_line(&format!("line longer than {MAX_LINE} bytes"), None));
                    None
                }
                Ok(Some(Ok(line))) => match decode_client_line(&line) {
                    Ok(ClientMessage::Hello(h)) => self.check_hello(h, &tx),
                    Ok(_) => {
                        let _ = tx.try_send(error_line("the first line must be a hello", None));
                        None
                    }
                    Err(e) => {
                        let _ = tx.try_send(error_line(&format!("the first line must be a hello: {e}"), None));
                        None
                    }
                },
            },
        };

        if let Some(hello) = hello {
            self.register(id, &hello, &peer, tx, kill.clone());
            self.read_loop(id, &hello, &peer, &mut lines, &kill).await;
            self.unregister(id);
        } else {
            drop(tx);
        }
        // The writer ends once every sender is gone (after flushing a final
        // error line) or at once when killed.
        let _ = tokio::time::timeout(self.inner.opts.write_timeout, writer).await;
        kill.cancel();
    }

    fn check_hello(&self, hello: Hello, tx: &mpsc::Sender<String>) -> Option<Hello> {
        if !SUPPORTED_VERSIONS.contains(&hello.version) {
            let supported: Vec<String> = SUPPORTED_VERSIONS.iter().map(u32::to_string).collect();
            tracing::warn!(name = %hello.name, version = hello.version, "control client speaks an unsupported protocol version");
            let _ = tx.try_send(error_line(
                &format!(
                    "unsupported protocol version {}; this relay supports version(s) {}",
                    hello.version,
                    supported.join(", ")
                ),
                Some(SUPPORTED_VERSIONS.to_vec()),
            ));
            return None;
        }
        if hello.name.is_empty() || hello.name.len() > 256 {
            let _ = tx.try_send(error_line("name must be 1 to 256 bytes", None));
            return None;
        }
        Some(hello)
    }

    fn register(
        &self,
        id: u64,
        hello: &Hello,
        peer: &Peer,
        tx: mpsc::Sender<String>,
        kill: CancellationToken,
    ) {
        let mut st = lock(&self.inner.state);
        let sync = hello.role == ConnectionRole::Subscriber && hello.sync;
        let conn = Conn {
            name: hello.name.clone(),
            role: hello.role,
            sync,
            receives_events: hello.role == ConnectionRole::Subscriber,
            tx,
            kill,
            seq: 0,
            connected_since_us: now_micros(),
            last_ack_us: None,
            last_ack_latency_us: None,
            healthy: true,
            pending: Vec::new(),
        };
        // Queued under the lock: no event can overtake the welcome.
        conn.send(
            id,
            encode_line(&RelayMessage::Welcome {
                version: hello.version,
                epoch: st.status.epoch,
                state: st.status.state,
            }),
        );
        // Who connected, as the kernel says: the name is only a claim.
        let level_info = hello.role == ConnectionRole::Subscriber;
        if level_info {
            tracing::info!(conn = id, name = %hello.name, sync, %peer, "control subscriber connected");
        } else {
            tracing::debug!(conn = id, name = %hello.name, %peer, "control operator connected");
        }
        st.conns.insert(id, conn);
    }

    fn unregister(&self, id: u64) {
        let mut st = lock(&self.inner.state);
        let Some(conn) = st.conns.remove(&id) else {
            return;
        };
        // Dropping `conn` drops its queue's sender: the writer flushes what
        // is queued (a final error line) and ends.
        for p in &conn.pending {
            let _ = p.signal.send(Signal::Gone { conn: id });
        }
        if conn.role == ConnectionRole::Subscriber {
            tracing::info!(conn = id, name = %conn.name, sync = conn.sync, "control subscriber disconnected");
        }
        if conn.sync && matches!(st.status.state, RelayState::Precopy | RelayState::Colo) {
            tracing::warn!(
                name = %conn.name,
                "sync subscriber left during a COLO session; the next checkpoint barrier will fail"
            );
            let mut s = conn.status();
            s.connected = false;
            s.healthy = false;
            st.departed.push(s);
        }
    }

    async fn read_loop(
        &self,
        id: u64,
        hello: &Hello,
        peer: &Peer,
        lines: &mut FramedRead<StreamReader, LinesCodec>,
        kill: &CancellationToken,
    ) {
        loop {
            let next = tokio::select! {
                _ = kill.cancelled() => return,
                _ = self.inner.cancel.cancelled() => return,
                l = lines.next() => l,
            };
            let line = match next {
                None => return,
                Some(Ok(line)) => line,
                Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                    self.reply(
                        id,
                        error_line(&format!("line longer than {MAX_LINE} bytes; closing"), None),
                    );
                    return;
                }
                Some(Err(LinesCodecError::Io(e))) => {
                    tracing::debug!(conn = id, name = %hello.name, error = %e, "control client read error");
                    return;
                }
            };
            match decode_client_line(&line) {
                Ok(msg) => self.handle(id, hello, peer, msg),
                Err(e) => {
                    tracing::debug!(conn = id, name = %hello.name, error = %e, "bad control line");
                    let message = match e {
                        DecodeError::TooLong { .. } => e.to_string(),
                        DecodeError::Invalid(e) => format!("cannot decode line: {e}"),
                    };
                    self.reply(id, error_line(&message, None));
                }
            }
        }
    }

    fn reply(&self, id: u64, line: String) {
        let st = lock(&self.inner.state);
        if let Some(c) = st.conns.get(&id) {
            c.send(id, line);
        }
    }

    fn handle(&self, id: u64, hello: &Hello, peer: &Peer, msg: ClientMessage) {
        let mut st = lock(&self.inner.state);
        let reply = match msg {
            ClientMessage::Hello(_) => error_line("hello was already received", None),
            ClientMessage::Ack { seq } => {
                let Some(conn) = st.conns.get_mut(&id) else {
                    return;
                };
                if seq > conn.seq {
                    error_line(
                        &format!(
                            "ack of seq {seq}, but the last event sent had seq {}",
                            conn.seq
                        ),
                        None,
                    )
                } else {
                    // Cumulative: acking S acknowledges every pending event up to S.
                    let now = Instant::now();
                    let mut last_latency = None;
                    conn.pending.retain(|p| {
                        if p.seq <= seq {
                            let latency = now.duration_since(p.sent_at);
                            let _ = p.signal.send(Signal::Acked { conn: id, latency });
                            last_latency = Some(latency);
                            false
                        } else {
                            true
                        }
                    });
                    if let Some(latency) = last_latency {
                        conn.last_ack_us = Some(now_micros());
                        conn.last_ack_latency_us = Some(micros(latency));
                        conn.healthy = true;
                    }
                    tracing::trace!(conn = id, seq, acked = last_latency.is_some(), "ack");
                    return;
                }
            }
            ClientMessage::Status => encode_line(&RelayMessage::Status(st.snapshot())),
            ClientMessage::Subscribe => {
                if let Some(conn) = st.conns.get_mut(&id) {
                    conn.receives_events = true;
                }
                encode_line(&RelayMessage::Ok)
            }
            ClientMessage::Failover { survivor } => {
                if let Err(why) = self.inner.opts.operators.check(peer) {
                    // Nothing is published: only the local operator decides a failover.
                    st.status.refused_requests += 1;
                    if let Some(suppressed) = self.inner.refused_request_log.allow() {
                        tracing::warn!(conn = id, name = %hello.name, %peer, %survivor, suppressed, "refused a failover request: {why}");
                    }
                    let line = error_line(&format!("failover refused: {why}"), None);
                    if let Some(c) = st.conns.get(&id) {
                        c.send(id, line);
                    }
                    return;
                }
                let epoch = st.status.epoch;
                tracing::info!(by = %hello.name, %peer, %survivor, epoch, "operator announced a failover");
                // Answer first, then broadcast, so an operator that also
                // subscribed reads `ok` before its own event.
                if let Some(c) = st.conns.get(&id) {
                    c.send(id, encode_line(&RelayMessage::Ok));
                }
                st.deliver(
                    &EventBody::new(EventKind::Failover, epoch)
                        .with_survivor(survivor)
                        .with_detail(format!("announced by {} ({peer})", hello.name)),
                    None,
                );
                return;
            }
            ClientMessage::CheckpointRequested { reason } => {
                let mut reason = reason;
                if reason.len() > MAX_REASON_LEN {
                    let mut cut = MAX_REASON_LEN;
                    while !reason.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    reason.truncate(cut);
                }
                tracing::debug!(by = %hello.name, %reason, "checkpoint requested");
                let map = &mut st.status.requests_by_reason;
                let key = if map.contains_key(&reason) || map.len() < MAX_REASONS {
                    reason.clone()
                } else {
                    OTHER_REASONS.to_string()
                };
                *map.entry(key).or_insert(0) += 1;
                st.status.last_request_reason = Some(reason);
                encode_line(&RelayMessage::Ok)
            }
        };
        if let Some(c) = st.conns.get(&id) {
            c.send(id, reply);
        }
    }
}

fn error_line(message: &str, supported: Option<Vec<u32>>) -> String {
    encode_line(&RelayMessage::Error {
        message: message.to_string(),
        supported,
    })
}

/// Bound of flushing a client's queue when the hub closes.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

async fn write_loop(
    mut wr: StreamWriter,
    mut rx: mpsc::Receiver<String>,
    kill: CancellationToken,
    closing: CancellationToken,
    write_timeout: Duration,
) {
    loop {
        let line = tokio::select! {
            biased;
            _ = kill.cancelled() => break,
            _ = closing.cancelled() => {
                let flush = async {
                    while let Ok(line) = rx.try_recv() {
                        if wr.write_all(line.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                };
                let _ = tokio::time::timeout(CLOSE_FLUSH.min(write_timeout), flush).await;
                break;
            }
            l = rx.recv() => match l { Some(l) => l, None => break },
        };
        match tokio::time::timeout(write_timeout, wr.write_all(line.as_bytes())).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "control client write failed");
                kill.cancel();
                break;
            }
            Err(_) => {
                tracing::warn!(
                    "control client did not take a line within {write_timeout:?}; disconnecting it"
                );
                kill.cancel();
                break;
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_millis(100), wr.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_policy_allows_listed_uids_and_the_group_on_unix_only() {
        let policy = OperatorPolicy {
            uids: BTreeSet::from([0, 1000]),
            gid: Some(27),
        };
        let local = |uid, gid| Peer::Local {
            uid,
            gid,
            pid: Some(1),
        };
        assert!(policy.check(&local(0, 0)).is_ok());
        assert!(policy.check(&local(1000, 1000)).is_ok());
        assert!(policy.check(&local(1001, 27)).is_ok());
        let e = policy.check(&local(1001, 1001)).unwrap_err();
        assert!(
            e.contains("uid 1001") && e.contains("0, 1000") && e.contains("gid 27"),
            "{e}"
        );
        assert!(policy.check(&Peer::LocalUnknown).is_err());
        let e = policy
            .check(&Peer::Remote("192.168.77.1:4000".parse().unwrap()))
            .unwrap_err();
        assert!(e.contains("not over TCP"), "{e}");
        // The default: root only.
        assert!(OperatorPolicy::default().check(&local(0, 0)).is_ok());
        assert!(OperatorPolicy::default().check(&local(1000, 0)).is_err());
    }
}
