//! The filter-mode attachment: QEMU's `filter-mirror` / `filter-redirector` chardev sockets
//! (be32 length + Ethernet frame; `vnet_hdr_support` off) turned into channels of frames.
//!
//! The role loops see only a [`FrameSource`] (frames a VM sent or that go into it, plus the
//! [`Inbound::Drained`] marker of a drain) and a [`FrameSink`]; they never touch a socket, so a
//! vhost-user attachment can feed the same loops later.
//!
//! Each port runs in its own task and survives its peer: on the primary, QEMU is the chardev
//! *server* and the port reconnects with a backoff ([`PortEndpoint::Connect`]); on the
//! secondary, QEMU's chardevs are clients with `reconnect-ms`, and the port accepts, a new
//! connection replacing the old one ([`PortEndpoint::Listen`]).
//!
//! A listening port is loopback TCP, which any local user can reach. It serves only the uids
//! of its [`PortAccess`] (root, this daemon's, `--qemu-uid`): the owner of the connecting
//! socket is looked up in the kernel's socket table ([`peer_uid`]) as soon as
//! it is accepted, and anyone else is closed before a byte is read or written, logged and
//! counted (`colo_proxyd_port_refused_total{port,reason}`), the current connection untouched.
//! An allowed uid still replaces the current connection: that is QEMU's chardev reconnecting
//! (a restarted QEMU, or one whose old connection's close this port has not read yet), and
//! whoever holds such a uid can already read and write QEMU itself.

use colo_daemon::RateLimited;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::codec::{FrameDecoder, encode_ethernet};
use crate::daemon::metrics::Metrics;
use crate::daemon::peer_uid;

/// Frames queued between a port and its role loop; a full queue back-pressures the socket.
const QUEUE: usize = 1024;

/// An output port writes the frames already queued together, in one system call, up to about
/// this many bytes.
const WRITE_BATCH: usize = 256 * 1024;

/// How long an output port keeps frames queued while its [`OnConnect`] hook runs (a QMP
/// round trip or two) before it drops them.
pub const HOLD_WHILE_PREPARING: Duration = Duration::from_secs(1);

/// Reconnection backoff towards a QEMU chardev server.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// What an input port delivers.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// An Ethernet frame, shared with the port's read buffer (no copy was made: see
    /// [`crate::codec::read_buffer`] for what it keeps alive).
    Frame(Bytes),
    /// Every frame the peer had sent when [`FrameSource::request_drain`] was called has been
    /// delivered before this marker.
    Drained,
}

/// The receiving end of an input port.
#[derive(Debug)]
pub struct FrameSource {
    name: String,
    frames: mpsc::Receiver<Inbound>,
    drain: mpsc::Sender<()>,
}

impl FrameSource {
    /// A source fed by hand (tests, or another attachment): returns the source, the sender of
    /// its frames and the receiver of its drain requests (answer each with
    /// [`Inbound::Drained`] after the frames already sent).
    pub fn channel(name: &str) -> (FrameSource, mpsc::Sender<Inbound>, mpsc::Receiver<()>) {
        let (tx, frames) = mpsc::channel(QUEUE);
        let (drain, drain_rx) = mpsc::channel(4);
        (
            FrameSource {
                name: name.to_owned(),
                frames,
                drain,
            },
            tx,
            drain_rx,
        )
    }

    /// The port's name (QEMU's chardev id), for logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The next frame or marker; `None` when the port's task ended (shutdown).
    pub async fn recv(&mut self) -> Option<Inbound> {
        self.frames.recv().await
    }

    /// Asks the port to deliver, at once, everything its peer has already sent, followed by
    /// [`Inbound::Drained`]. Returns false when the port is gone. Ask again only after the
    /// marker of the previous request arrived.
    pub fn request_drain(&self) -> bool {
        self.drain.try_send(()).is_ok()
    }
}

/// The sending end of an output port.
#[derive(Debug, Clone)]
pub struct FrameSink {
    name: String,
    frames: mpsc::Sender<Bytes>,
    metrics: Metrics,
}

impl FrameSink {
    /// A sink drained by hand (tests, or another attachment).
    pub fn channel(name: &str, metrics: Metrics) -> (FrameSink, mpsc::Receiver<Bytes>) {
        let (frames, rx) = mpsc::channel(QUEUE);
        (
            FrameSink {
                name: name.to_owned(),
                frames,
                metrics,
            },
            rx,
        )
    }

    /// The port's name, for logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Queues an Ethernet frame, waiting while the queue is full.
    pub async fn send(&self, frame: Bytes) {
        if self.frames.send(frame).await.is_err() {
            self.metrics.dropped_frame();
        }
    }
}

/// Who may connect to a listening port: root, this daemon's own uid, and the uids given with
/// `--qemu-uid` (the user QEMU runs as).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortAccess {
    allowed: Arc<[u32]>,
}

impl PortAccess {
    /// Root, this process's effective uid and `qemu_uids`. When this process's uid cannot be
    /// read (no /proc), it is left out, with a warning: fewer are allowed, not more.
    pub fn new(qemu_uids: &[u32]) -> PortAccess {
        let mut allowed = vec![0];
        match peer_uid::own_uid() {
            Ok(uid) => allowed.push(uid),
            Err(err) => {
                tracing::warn!(%err, "cannot read this process's uid; QEMU's ports allow root and --qemu-uid only")
            }
        }
        allowed.extend_from_slice(qemu_uids);
        allowed.sort_unstable();
        allowed.dedup();
        PortAccess {
            allowed: allowed.into(),
        }
    }

    /// The allowed uids, ascending.
    pub fn allowed(&self) -> &[u32] {
        &self.allowed
    }

    fn admits(&self, uid: u32) -> bool {
        self.allowed.contains(&uid)
    }

    /// Whether the owner of `stream`'s peer socket is allowed. A refused stream is logged
    /// and counted here; the caller only drops it. Synchronous on purpose: the port's loops
    /// await [`PortEndpoint::replacement`] inside `select!`, where an await between the accept
    /// and this decision could drop an accepted connection unseen when another branch wins.
    fn admit(&self, name: &str, stream: &TcpStream, metrics: &Metrics) -> Option<u32> {
        let addresses = stream
            .peer_addr()
            .and_then(|p| Ok((p, stream.local_addr()?)));
        let (peer, found) = match addresses {
            Ok((peer, ours)) => (Some(peer), peer_uid::peer_uid(peer, ours)),
            Err(err) => (None, Err(err)),
        };
        let (reason, uid, err) = match found {
            Ok(Some(uid)) if self.admits(uid) => return Some(uid),
            Ok(Some(uid)) => ("uid", Some(uid), None),
            Ok(None) => ("unknown-peer", None, None),
            Err(err) => ("lookup-failed", None, Some(err)),
        };
        metrics.port_refused(name, reason);
        // A local user can connect in a loop: one line a second at most, with the count of
        // the ones it stands for.
        static LOG: RateLimited = RateLimited::new(Duration::from_secs(1));
        if let Some(suppressed) = LOG.allow() {
            let peer = peer.map(|p| p.to_string()).unwrap_or_default();
            let uid = uid.map_or_else(|| "unknown".to_owned(), |u| u.to_string());
            if let Some(err) = err {
                tracing::error!(port = name, %peer, %err, "cannot read the kernel's socket table: QEMU's ports serve nobody");
            }
            tracing::warn!(
                port = name,
                %peer,
                %uid,
                reason,
                allowed = ?self.allowed,
                suppressed,
                "connection to QEMU's port refused: its socket's owner is not an allowed uid \
                 (root, colo-proxyd's own, --qemu-uid); the current connection is kept"
            );
        }
        None
    }
}

/// How a port finds its peer.
#[derive(Debug)]
pub enum PortEndpoint {
    /// Connect to a QEMU chardev server (`server=on`) at this address, and again after every
    /// disconnection.
    Connect(String),
    /// Accept QEMU chardev clients (`reconnect-ms`) on this listener, from the uids `access`
    /// allows only; a new allowed client replaces the current one.
    Listen(TcpListener, PortAccess),
}

impl PortEndpoint {
    fn describe(&self) -> String {
        match self {
            PortEndpoint::Connect(addr) => format!("connect to {addr}"),
            PortEndpoint::Listen(l, _) => match l.local_addr() {
                Ok(a) => format!("listen on {a}"),
                Err(_) => "listen".to_owned(),
            },
        }
    }

    /// The first connection, or the next after one ended, with its peer's uid when this port
    /// listens. Refused connections are closed and waited past.
    async fn next(
        &mut self,
        name: &str,
        retry: &mut Duration,
        metrics: &Metrics,
    ) -> io::Result<(TcpStream, Option<u32>)> {
        match self {
            PortEndpoint::Connect(addr) => loop {
                match TcpStream::connect(addr.as_str()).await {
                    Ok(stream) => {
                        *retry = RETRY_MIN;
                        return Ok((stream, None));
                    }
                    Err(err) => {
                        tracing::debug!(port = name, %addr, %err, retry_in = ?*retry, "cannot connect to QEMU's chardev");
                        tokio::time::sleep(*retry).await;
                        *retry = (*retry * 2).min(RETRY_MAX);
                    }
                }
            },
            PortEndpoint::Listen(listener, access) => loop {
                let (stream, _) = listener.accept().await?;
                if let Some(uid) = access.admit(name, &stream, metrics) {
                    return Ok((stream, Some(uid)));
                }
            },
        }
    }

    /// A new connection that replaces the current one (listening ports only), with its peer's
    /// uid; `None` for a connection refused (closed, the current one untouched). Cancel-safe:
    /// its only await is the accept.
    async fn replacement(
        &mut self,
        name: &str,
        metrics: &Metrics,
    ) -> io::Result<Option<(TcpStream, u32)>> {
        match self {
            PortEndpoint::Connect(_) => std::future::pending().await,
            PortEndpoint::Listen(listener, access) => {
                let (stream, _) = listener.accept().await?;
                Ok(access
                    .admit(name, &stream, metrics)
                    .map(|uid| (stream, uid)))
            }
        }
    }
}

/// What an output port awaits at each new connection before it writes to it: the future of
/// `hook(n)`, `n` counting the port's connections from 0 (the first this daemon made or
/// accepted). Frames given to the port meanwhile wait in its queue for up to
/// [`HOLD_WHILE_PREPARING`], then are dropped and counted until the hook is done, as while the
/// port has no peer. Used to re-create the QEMU filter that reads the chardev
/// ([`qemu_filters`](super::qemu_filters)).
#[derive(Clone)]
pub struct OnConnect(Arc<dyn Fn(u64) -> PortFuture + Send + Sync>);

/// The future an [`OnConnect`] hook returns.
pub type PortFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

impl OnConnect {
    /// Wraps `hook`.
    pub fn new(hook: impl Fn(u64) -> PortFuture + Send + Sync + 'static) -> Self {
        OnConnect(Arc::new(hook))
    }

    /// The future to await before writing to the port's connection number `connection`.
    pub fn run(&self, connection: u64) -> PortFuture {
        (self.0)(connection)
    }
}

impl fmt::Debug for OnConnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OnConnect(..)")
    }
}

/// Waits for `hook(connection)`, the frames given to the port queued meanwhile, after
/// [`HOLD_WHILE_PREPARING`] dropped; false when the port's sink is gone.
async fn prepare(
    name: &str,
    hook: Option<&OnConnect>,
    connection: u64,
    rx: &mut mpsc::Receiver<Bytes>,
    metrics: &Metrics,
) -> bool {
    let Some(hook) = hook else { return true };
    let ready = hook.run(connection);
    tokio::pin!(ready);
    if tokio::time::timeout(HOLD_WHILE_PREPARING, &mut ready)
        .await
        .is_ok()
    {
        return true;
    }
    tracing::warn!(
        port = name,
        "QEMU's filter for this connection is not ready yet: dropping frames until it is"
    );
    loop {
        tokio::select! {
            _ = &mut ready => return true,
            frame = rx.recv() => match frame {
                Some(_) => {
                    metrics.dropped_frame();
                    tracing::debug!(port = name, "frame dropped: QEMU's filter is not ready for this connection");
                }
                None => return false,
            },
        }
    }
}

fn connected(
    name: &str,
    endpoint: &PortEndpoint,
    stream: &TcpStream,
    uid: Option<u32>,
    metrics: &Metrics,
) {
    let _ = stream.set_nodelay(true);
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let uid = uid.map_or_else(|| "-".to_owned(), |u| u.to_string());
    tracing::info!(port = name, %peer, %uid, endpoint = %endpoint.describe(), "QEMU chardev connected");
    metrics.set_connected(name, true);
}

/// Starts an input port: frames QEMU writes to the chardev `name` come out of the returned
/// source.
pub fn spawn_source(
    name: &str,
    endpoint: PortEndpoint,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> FrameSource {
    spawn_source_watched(name, endpoint, metrics, shutdown, None)
}

/// [`spawn_source`], also telling `state` whether the port has a peer.
pub fn spawn_source_watched(
    name: &str,
    endpoint: PortEndpoint,
    metrics: Metrics,
    shutdown: CancellationToken,
    state: Option<watch::Sender<bool>>,
) -> FrameSource {
    let (source, tx, drain_rx) = FrameSource::channel(name);
    let name = name.to_owned();
    metrics.set_connected(&name, false);
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = run_source(&name, endpoint, &metrics, tx, drain_rx, state.as_ref()) => {}
        }
    });
    source
}

async fn run_source(
    name: &str,
    mut endpoint: PortEndpoint,
    metrics: &Metrics,
    tx: mpsc::Sender<Inbound>,
    mut drain_rx: mpsc::Receiver<()>,
    state: Option<&watch::Sender<bool>>,
) {
    let set_state = |up: bool| {
        if let Some(state) = state {
            state.send_replace(up);
        }
    };
    let mut retry = RETRY_MIN;
    loop {
        // Without a peer there is nothing to drain: answer drains at once.
        let (mut stream, uid) = loop {
            tokio::select! {
                s = endpoint.next(name, &mut retry, metrics) => match s {
                    Ok(s) => break s,
                    Err(err) => {
                        tracing::warn!(port = name, %err, "accept failed");
                        tokio::time::sleep(RETRY_MIN).await;
                    }
                },
                Some(()) = drain_rx.recv() => {
                    if tx.send(Inbound::Drained).await.is_err() { return; }
                }
            }
        };
        connected(name, &endpoint, &stream, uid, metrics);
        set_state(true);
        let mut decoder = FrameDecoder::new(false);
        let why = loop {
            tokio::select! {
                // Straight into the decoder's buffer, which frames are split off.
                r = decoder.read_from(&mut stream) => match r {
                    Ok(0) => break decoder.finish().err().map_or_else(|| "closed by QEMU".to_owned(), |e| e.to_string()),
                    Ok(_) => {
                        if let Err(err) = deliver(&mut decoder, &tx).await {
                            break err;
                        }
                    }
                    Err(err) => break err.to_string(),
                },
                Some(()) = drain_rx.recv() => {
                    // Take what the kernel already has, without waiting for more.
                    let mut why = None;
                    loop {
                        // A full buffer is delivered before the next read, so that it does
                        // not grow.
                        if let Err(err) = deliver(&mut decoder, &tx).await { why = Some(err); break; }
                        match decoder.read_with(|space| stream.try_read_buf(space)) {
                            Ok(0) => { why = Some("closed by QEMU".to_owned()); break; }
                            Ok(_) => {}
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => { why = Some(e.to_string()); break; }
                        }
                    }
                    let delivered = deliver(&mut decoder, &tx).await;
                    if tx.send(Inbound::Drained).await.is_err() { return; }
                    if let Err(err) = delivered { break err; }
                    if let Some(why) = why { break why; }
                }
                s = endpoint.replacement(name, metrics) => match s {
                    Ok(Some((s, uid))) => {
                        tracing::warn!(port = name, "QEMU reconnected; the old connection is dropped");
                        stream = s;
                        decoder = FrameDecoder::new(false);
                        connected(name, &endpoint, &stream, Some(uid), metrics);
                    }
                    Ok(None) => {}
                    Err(err) => tracing::warn!(port = name, %err, "accept failed"),
                },
            }
            if tx.is_closed() {
                return;
            }
        };
        metrics.set_connected(name, false);
        set_state(false);
        tracing::warn!(port = name, reason = %why, "QEMU chardev disconnected; waiting for it again");
    }
}

/// Sends every complete frame to the role loop. An error names a codec failure.
async fn deliver(decoder: &mut FrameDecoder, tx: &mpsc::Sender<Inbound>) -> Result<(), String> {
    loop {
        let frame = match decoder.next_frame_bytes() {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(()),
            Err(err) => return Err(format!("bad net-filter framing: {err}")),
        };
        if tx.send(Inbound::Frame(frame)).await.is_err() {
            return Ok(());
        }
    }
}

/// Appends `frame` to `wire` in QEMU's framing; returns 1 when it was, 0 when it was dropped
/// (counted).
fn encode_for_qemu(name: &str, frame: &[u8], wire: &mut Vec<u8>, metrics: &Metrics) -> u64 {
    match encode_ethernet(frame, false, wire) {
        Ok(()) => 1,
        Err(err) => {
            // Per frame: one line a second at most, with the count of the ones it stands for.
            static LOG: RateLimited = RateLimited::new(Duration::from_secs(1));
            if let Some(suppressed) = LOG.allow() {
                tracing::warn!(port = name, %err, suppressed, "frame not sent");
            }
            metrics.dropped_frame();
            0
        }
    }
}

/// Starts an output port: frames sent to the returned sink are written to QEMU's chardev
/// `name`. While it has no peer, frames are dropped and counted (a released packet is then
/// lost like on a broken wire; TCP retransmits it).
pub fn spawn_sink(
    name: &str,
    endpoint: PortEndpoint,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> FrameSink {
    spawn_sink_prepared(name, endpoint, metrics, shutdown, None)
}

/// [`spawn_sink`], awaiting `on_connect` at each new connection before writing to it.
pub fn spawn_sink_prepared(
    name: &str,
    endpoint: PortEndpoint,
    metrics: Metrics,
    shutdown: CancellationToken,
    on_connect: Option<OnConnect>,
) -> FrameSink {
    let (sink, rx) = FrameSink::channel(name, metrics.clone());
    let name = name.to_owned();
    metrics.set_connected(&name, false);
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = run_sink(&name, endpoint, &metrics, rx, on_connect.as_ref()) => {}
        }
    });
    sink
}

async fn run_sink(
    name: &str,
    mut endpoint: PortEndpoint,
    metrics: &Metrics,
    mut rx: mpsc::Receiver<Bytes>,
    on_connect: Option<&OnConnect>,
) {
    let mut connections = 0u64;
    let mut retry = RETRY_MIN;
    let mut wire = Vec::new();
    let mut probe = [0u8; 256];
    loop {
        let (mut stream, uid) = loop {
            tokio::select! {
                s = endpoint.next(name, &mut retry, metrics) => match s {
                    Ok(s) => break s,
                    Err(err) => {
                        tracing::warn!(port = name, %err, "accept failed");
                        tokio::time::sleep(RETRY_MIN).await;
                    }
                },
                frame = rx.recv() => match frame {
                    Some(_) => {
                        metrics.dropped_frame();
                        tracing::debug!(port = name, "frame dropped: QEMU's chardev is not connected");
                    }
                    None => return,
                },
            }
        };
        connected(name, &endpoint, &stream, uid, metrics);
        if !prepare(name, on_connect, connections, &mut rx, metrics).await {
            return;
        }
        connections += 1;
        let why = loop {
            tokio::select! {
                frame = rx.recv() => {
                    let Some(frame) = frame else { return };
                    // Every frame already queued goes out with this one, in one write.
                    wire.clear();
                    let mut batch = encode_for_qemu(name, &frame, &mut wire, metrics);
                    while wire.len() < WRITE_BATCH {
                        let Ok(frame) = rx.try_recv() else { break };
                        batch += encode_for_qemu(name, &frame, &mut wire, metrics);
                    }
                    if let Err(err) = stream.write_all(&wire).await {
                        metrics.add_dropped(batch);
                        break err.to_string();
                    }
                }
                // QEMU never writes to an output chardev; a read returns only at its close.
                r = stream.read(&mut probe) => match r {
                    Ok(0) => break "closed by QEMU".to_owned(),
                    Ok(_) => {}
                    Err(err) => break err.to_string(),
                },
                s = endpoint.replacement(name, metrics) => match s {
                    Ok(Some((s, uid))) => {
                        tracing::warn!(port = name, "QEMU reconnected; the old connection is dropped");
                        stream = s;
                        connected(name, &endpoint, &stream, Some(uid), metrics);
                        if !prepare(name, on_connect, connections, &mut rx, metrics).await {
                            return;
                        }
                        connections += 1;
                    }
                    Ok(None) => {}
                    Err(err) => tracing::warn!(port = name, %err, "accept failed"),
                },
            }
        };
        metrics.set_connected(name, false);
        tracing::warn!(port = name, reason = %why, "QEMU chardev disconnected; waiting for it again");
    }
}
