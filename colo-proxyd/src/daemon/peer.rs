//! The link's I/O (`docs/proxyd-link.md`; the wire format is [`super::link`]): the primary
//! listens for the secondary's daemon, the secondary connects with a backoff. Both sides
//! exchange hellos, then pass frames between the socket and their role loop.
//!
//! A malformed message or a failed handshake closes the connection with an error log naming
//! the peer and the fault (and counts `link_errors_total`); the listening side waits for the
//! next connection, the connecting side reconnects. Nothing the peer sends can panic the
//! daemon. While the link is down, frames for the peer are dropped and counted: the primary
//! holds the PVM's output meanwhile, and the hold-time bound asks for a checkpoint.
//!
//! Authentication (`docs/security.md`): with [`LinkTls`] the link is mutual TLS and only the
//! named peer host's certificate is accepted; without it the link is plaintext, said at start
//! and in `link_unauthenticated`. Either way, a new connection on the primary is
//! **authenticated before it can touch the live link**: its TLS handshake, then the hello
//! exchange (the secondary's role, this version), within [`HELLO_TIMEOUT`], in a task of its
//! own, at most [`MAX_PENDING`] at once. A newcomer that fails is logged (rate-limited),
//! counted in `link_refused_total{reason}` and closed; the live link never noticed it. One
//! that passes takes over once the live link ended (the secondary reconnecting after a
//! restart: its old connection is gone by then), waiting up to [`TAKEOVER_WAIT`] for it; a
//! live link that stays healthy meanwhile is kept and the newcomer refused (`link-busy`), so
//! even in plaintext a stranger's good hello cannot take a working link.
//!
//! Liveness: each end sends a heartbeat after every [`HEARTBEAT_INTERVAL`] in which it wrote
//! nothing else, and closes the connection when nothing at all came from the peer for
//! [`DEAD_AFTER`], or when a write to it could not complete within [`DEAD_AFTER`] (a stalled
//! network without a FIN, a hung peer host): an error log naming the peer, counted in
//! `link_dead_peer_total`, then the same as any other loss of the link. The sockets also get
//! [`colo_control::tune_tcp`] (keepalive, `TCP_USER_TIMEOUT`), so the kernel gives up on a dead
//! host too. Reading and writing run side by side, so a write blocked on a full socket never
//! keeps the reader from seeing the peer's heartbeats, nor a reader waiting for the role loop
//! keeps our heartbeats from leaving.

use colo_daemon::RateLimited;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::LinkTls;
use super::link::{LINK_VERSION, LinkDecoder, LinkMessage, encode, encode_heartbeat};
use super::metrics::Metrics;
use colo_types::Role;

/// Messages queued each way.
const QUEUE: usize = 4096;
/// The port name of the link in metrics and logs.
pub const LINK_PORT: &str = "link";
/// The link writes the messages already queued together, in one system call, up to about
/// this many bytes.
const WRITE_BATCH: usize = 256 * 1024;
/// Bound of a connection's authentication: the TLS handshake (with `--tls-dir`) and the hello
/// exchange together.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections the primary authenticates at once; a connection beyond is closed at once
/// (counted, reason `too-many-pending`). The real secondary makes one at a time.
pub const MAX_PENDING: usize = 8;
/// How long an authenticated newcomer waits for the live link to end before it is refused
/// (`link-busy`). The real secondary reconnects only after its old connection ended, which
/// the primary sees at once (a restarted daemon's FIN) or by the dead-peer bound (a stalled
/// network: both ends detect it within [`DEAD_AFTER`] of the last byte, a second or less
/// apart); shorter than [`DEAD_AFTER`], so that a waiting secondary does not give up on us.
pub const TAKEOVER_WAIT: Duration = Duration::from_secs(2);
/// Each end sends a heartbeat when it wrote nothing to the peer for this long.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// The peer is dead when nothing came from it for this long (three heartbeat intervals), or a
/// write to it could not complete within it. A stall is thus detected `DEAD_AFTER` after the
/// peer's last byte, at most [`HEARTBEAT_INTERVAL`] of which came before the stall.
pub const DEAD_AFTER: Duration = Duration::from_secs(3);
/// Bound of the secondary's TCP connect to the primary (a stalled network drops the SYN: the
/// kernel's own retries would take minutes and back off past the healing).
const CONNECT_TIMEOUT: Duration = DEAD_AFTER;

/// The role loop's end of the link.
#[derive(Debug)]
pub struct LinkPort {
    /// Frames from the peer (hellos are consumed by the link).
    pub incoming: mpsc::Receiver<LinkMessage>,
    /// Frames for the peer.
    pub outgoing: LinkSender,
}

/// Sends frames to the peer without ever waiting: a slow or absent peer must not stall the
/// role loop, so a full queue drops the frame (counted).
#[derive(Debug, Clone)]
pub struct LinkSender {
    tx: mpsc::Sender<LinkMessage>,
    metrics: Metrics,
}

impl LinkSender {
    /// Queues `message`, or drops and counts it when the queue is full.
    pub fn send(&self, message: LinkMessage) {
        if self.tx.try_send(message).is_err() {
            self.metrics.dropped_frame();
        }
    }
}

fn channels(
    metrics: &Metrics,
) -> (
    LinkPort,
    mpsc::Sender<LinkMessage>,
    mpsc::Receiver<LinkMessage>,
) {
    let (in_tx, incoming) = mpsc::channel(QUEUE);
    let (out_tx, out_rx) = mpsc::channel(QUEUE);
    (
        LinkPort {
            incoming,
            outgoing: LinkSender {
                tx: out_tx,
                metrics: metrics.clone(),
            },
        },
        in_tx,
        out_rx,
    )
}

/// The reading half of a link connection (TCP, or TLS over it).
type LinkReader = Box<dyn AsyncRead + Unpin + Send>;
/// The writing half.
type LinkWriter = Box<dyn AsyncWrite + Unpin + Send>;

/// A connection whose peer passed the handshake: TLS when configured, then a good hello.
struct Greeted {
    rd: LinkReader,
    wr: LinkWriter,
    /// The peer's hello consumed; may hold bytes of the messages after it.
    decoder: LinkDecoder,
    /// The peer's address.
    peer: String,
    /// The peer's certificate name, with TLS.
    name: Option<String>,
    version: u16,
}

/// Why a connection did not become the link.
#[derive(Debug)]
struct Refusal {
    /// The metric's label: `tls`, `hello`, `closed`, `timeout`, `too-many-pending`,
    /// `link-busy`.
    reason: &'static str,
    why: String,
}

impl Refusal {
    fn new(reason: &'static str, why: impl Into<String>) -> Refusal {
        Refusal {
            reason,
            why: why.into(),
        }
    }

    /// Counts it: `link_refused_total{reason}`, and `link_errors_total` for a failed
    /// handshake (a peer that only closed, or one too many, is no error of the link's).
    fn count(&self, metrics: &Metrics) {
        metrics.link_refused(self.reason);
        if !matches!(self.reason, "closed" | "too-many-pending" | "link-busy") {
            metrics.link_error();
        }
    }
}

/// Says at start how the link is protected, and exports it (`link_unauthenticated`).
fn announce_security(tls: Option<&LinkTls>, metrics: &Metrics) {
    metrics.set_link_unauthenticated(tls.is_none());
    match tls {
        Some(tls) => tracing::info!(
            local = %tls.local,
            peer = %tls.peer,
            dir = %tls.dir.display(),
            "link: mutual TLS, only the peer host's certificate is accepted"
        ),
        None => tracing::warn!(
            "link: plaintext and unauthenticated (no --tls-dir): anyone who reaches the link's \
             port can pose as the peer daemon; see docs/security.md"
        ),
    }
}

/// The handshake on a fresh connection, all of it before `deadline`: TLS (the primary accepts,
/// the secondary connects), our hello, the peer's hello.
async fn handshake(
    stream: TcpStream,
    local: Role,
    tls: Option<&LinkTls>,
    peer: String,
    deadline: Instant,
) -> Result<Greeted, Refusal> {
    colo_control::tune_tcp(&stream, "proxyd link");
    let (rd, wr, name): (LinkReader, LinkWriter, Option<String>) = match tls {
        None => {
            let (rd, wr) = stream.into_split();
            (Box::new(rd), Box::new(wr), None)
        }
        Some(tls) => {
            let tls_failed = |e: colo_tls::HandshakeError| {
                let reason = match &e {
                    colo_tls::HandshakeError::Timeout(_) => "timeout",
                    // A connect and close (a port scan), as without TLS.
                    colo_tls::HandshakeError::Failed(io)
                        if io.kind() == std::io::ErrorKind::UnexpectedEof =>
                    {
                        "closed"
                    }
                    _ => "tls",
                };
                Refusal::new(reason, e.to_string())
            };
            let timed_out = |_| {
                Refusal::new(
                    "timeout",
                    format!("no TLS handshake within {HELLO_TIMEOUT:?}"),
                )
            };
            match local {
                Role::Primary => {
                    let (s, name) = tokio::time::timeout_at(deadline, tls.acceptor.accept(stream))
                        .await
                        .map_err(timed_out)?
                        .map_err(tls_failed)?;
                    let (rd, wr) = tokio::io::split(s);
                    (Box::new(rd), Box::new(wr), Some(name))
                }
                Role::Secondary => {
                    let (s, name) =
                        tokio::time::timeout_at(deadline, tls.connector.connect(stream))
                            .await
                            .map_err(timed_out)?
                            .map_err(tls_failed)?;
                    let (rd, wr) = tokio::io::split(s);
                    (Box::new(rd), Box::new(wr), Some(name))
                }
            }
        }
    };
    let mut greeted = Greeted {
        rd,
        wr,
        decoder: LinkDecoder::new(local),
        peer,
        name,
        version: 0,
    };
    // Our hello leaves before anything is read, so that a peer we refuse (another version, say)
    // still learns ours and can say why.
    let mut hello = Vec::new();
    // Encoding a hello cannot fail.
    let _ = encode(
        &LinkMessage::Hello {
            version: LINK_VERSION,
            role: local,
        },
        &mut hello,
    );
    match tokio::time::timeout_at(deadline, write_flushed(&mut greeted.wr, &hello)).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return Err(Refusal::new("closed", format!("writing our hello: {err}"))),
        Err(_) => {
            return Err(Refusal::new(
                "timeout",
                "our hello could not be written in time",
            ));
        }
    }
    let mut buf = vec![0u8; 4096];
    loop {
        match greeted.decoder.next_message() {
            Ok(Some(LinkMessage::Hello { version, .. })) => {
                greeted.version = version;
                return Ok(greeted);
            }
            // The decoder refuses anything but a hello first.
            Ok(Some(other)) => {
                return Err(Refusal::new("hello", format!("{other:?} before the hello")));
            }
            Ok(None) => {}
            Err(err) => {
                return Err(Refusal::new(
                    "hello",
                    format!("malformed link message: {err}"),
                ));
            }
        }
        let n = match tokio::time::timeout_at(deadline, greeted.rd.read(&mut buf)).await {
            Err(_) => {
                return Err(Refusal::new(
                    "timeout",
                    format!("no hello within {HELLO_TIMEOUT:?}"),
                ));
            }
            Ok(Err(err)) => return Err(Refusal::new("closed", err.to_string())),
            Ok(Ok(0)) => {
                return Err(match greeted.decoder.finish() {
                    Err(err) => Refusal::new("hello", format!("malformed link message: {err}")),
                    Ok(()) => Refusal::new("closed", "closed before its hello"),
                });
            }
            Ok(Ok(n)) => n,
        };
        greeted.decoder.feed(&buf[..n]);
    }
}

/// The primary's end: accepts the secondary's daemon on `listener`. Every connection is
/// authenticated on its own, at most [`MAX_PENDING`] at once. One that passes while a link is
/// live waits up to [`TAKEOVER_WAIT`] for that link to end and then takes over; while the live
/// link stays healthy it is refused (`link-busy`).
pub fn spawn_primary(
    listener: TcpListener,
    tls: Option<LinkTls>,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> LinkPort {
    let (port, in_tx, mut out_rx) = channels(&metrics);
    metrics.set_connected(LINK_PORT, false);
    announce_security(tls.as_ref(), &metrics);
    let (greeted_tx, mut greeted_rx) = mpsc::channel(MAX_PENDING);
    tokio::spawn(accept_newcomers(
        listener,
        tls,
        metrics.clone(),
        greeted_tx,
        shutdown.clone(),
    ));
    tokio::spawn(async move {
        // An authenticated newcomer waiting for the live link to end, and until when.
        let mut waiting: Option<(Greeted, Instant)> = None;
        loop {
            let greeted = match waiting.take() {
                Some((g, _)) => g,
                None => loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        g = greeted_rx.recv() => match g {
                            Some(g) => break g,
                            None => return,
                        },
                        m = out_rx.recv() => match m {
                            Some(_) => metrics.dropped_frame(),
                            None => return,
                        },
                    }
                },
            };
            let peer = greeted.peer.clone();
            // Every log line of this connection carries the peer.
            let serving = serve(greeted, Role::Primary, &metrics, &in_tx, &mut out_rx)
                .instrument(tracing::info_span!("link", %peer));
            tokio::pin!(serving);
            let ended = loop {
                let wait_until = waiting.as_ref().map(|(_, until)| *until);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    e = &mut serving => break e,
                    g = greeted_rx.recv() => match g {
                        None => return,
                        Some(g) if waiting.is_some() => refused(
                            &g.peer,
                            &Refusal::new("link-busy", "another authenticated connection waits already"),
                            &metrics,
                        ),
                        Some(g) => {
                            tracing::info!(%peer, new_peer = %g.peer, "link: an authenticated new connection waits for the live link to end");
                            waiting = Some((g, Instant::now() + TAKEOVER_WAIT));
                        }
                    },
                    _ = tokio::time::sleep_until(wait_until.unwrap_or_else(Instant::now)), if wait_until.is_some() => {
                        if let Some((g, _)) = waiting.take() {
                            let why = format!(
                                "the live link with {peer} stayed healthy for {TAKEOVER_WAIT:?}"
                            );
                            refused(&g.peer, &Refusal::new("link-busy", why), &metrics);
                        }
                    }
                }
            };
            metrics.set_connected(LINK_PORT, false);
            if ended.log(&peer, &metrics) {
                return;
            }
        }
    });
    port
}

/// Accepts connections and authenticates each in a task of its own, at most [`MAX_PENDING`]
/// at once, within [`HELLO_TIMEOUT`]; hands the ones that passed to the link.
async fn accept_newcomers(
    listener: TcpListener,
    tls: Option<LinkTls>,
    metrics: Metrics,
    greeted_tx: mpsc::Sender<Greeted>,
    shutdown: CancellationToken,
) {
    let tls = tls.map(Arc::new);
    let slots = Arc::new(Semaphore::new(MAX_PENDING));
    loop {
        let (stream, addr) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(%err, "link: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let peer = addr.to_string();
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused(
                &peer,
                &Refusal::new(
                    "too-many-pending",
                    format!("{MAX_PENDING} connections are authenticating already"),
                ),
                &metrics,
            );
            continue;
        };
        let (tls, metrics, greeted_tx, shutdown) = (
            tls.clone(),
            metrics.clone(),
            greeted_tx.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            let _slot = slot;
            let _pending = Pending::new(&metrics);
            let deadline = Instant::now() + HELLO_TIMEOUT;
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => return,
                o = handshake(stream, Role::Primary, tls.as_deref(), peer.clone(), deadline) => o,
            };
            match outcome {
                Ok(greeted) => {
                    let _ = greeted_tx.send(greeted).await;
                }
                Err(refusal) => refused(&peer, &refusal, &metrics),
            }
        });
    }
}

/// `link_pending` while a newcomer authenticates.
struct Pending(Metrics);

impl Pending {
    fn new(metrics: &Metrics) -> Pending {
        metrics.link_pending_started();
        Pending(metrics.clone())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.link_pending_ended();
    }
}

/// A newcomer refused: counted, logged at most once a second (a scan or a flood must not
/// flood the log), and closed (dropped by the caller).
fn refused(peer: &str, refusal: &Refusal, metrics: &Metrics) {
    refusal.count(metrics);
    static LOG: RateLimited = RateLimited::new(Duration::from_secs(1));
    if let Some(suppressed) = LOG.allow() {
        tracing::warn!(
            %peer,
            reason = refusal.reason,
            error = %refusal.why,
            suppressed,
            "link: refused a connection; the live link is unchanged"
        );
    }
}

/// The secondary's end: connects to the primary's daemon at `addr`, again after every loss,
/// with a backoff from `retry_min` to `retry_max`.
pub fn spawn_secondary(
    addr: String,
    tls: Option<LinkTls>,
    retry_min: Duration,
    retry_max: Duration,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> LinkPort {
    let (port, in_tx, mut out_rx) = channels(&metrics);
    metrics.set_connected(LINK_PORT, false);
    announce_security(tls.as_ref(), &metrics);
    tokio::spawn(async move {
        let mut retry = retry_min;
        loop {
            let connect = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr.as_str())) => {
                    c.unwrap_or_else(|_| Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("connect timed out after {CONNECT_TIMEOUT:?}"),
                    )))
                }
            };
            match connect {
                Ok(stream) => {
                    let span = tracing::info_span!("link", peer = %addr);
                    let deadline = Instant::now() + HELLO_TIMEOUT;
                    let ended = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        e = async {
                            match handshake(stream, Role::Secondary, tls.as_ref(), addr.clone(), deadline).await {
                                Ok(greeted) => serve(greeted, Role::Secondary, &metrics, &in_tx, &mut out_rx).await,
                                Err(refusal) => {
                                    metrics.link_refused(refusal.reason);
                                    match refusal.reason {
                                        "closed" => Ended::Closed { up: false },
                                        _ => Ended::Protocol(refusal.why),
                                    }
                                }
                            }
                        }.instrument(span) => e,
                    };
                    metrics.set_connected(LINK_PORT, false);
                    if ended.log(&addr, &metrics) {
                        return;
                    }
                    if ended.was_up() {
                        retry = retry_min;
                    }
                }
                Err(err) => {
                    tracing::debug!(primary = %addr, %err, retry_in = ?retry, "link: cannot connect to the primary's colo-proxyd")
                }
            }
            // Frames produced while the link is down are dropped, not queued for later: they
            // would arrive after frames of a later epoch.
            let sleep = tokio::time::sleep(retry);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = &mut sleep => break,
                    m = out_rx.recv() => match m {
                        Some(_) => metrics.dropped_frame(),
                        None => return,
                    },
                }
            }
            retry = (retry * 2).min(retry_max);
        }
    });
    port
}

/// Why one link connection ended.
enum Ended {
    /// The role loop is gone (shutdown).
    Finished,
    /// The peer closed the connection (after a good hello when `up`).
    Closed { up: bool },
    /// A malformed message or a failed handshake.
    Protocol(String),
    /// A socket error.
    Io(String),
    /// The peer went silent: nothing came for [`DEAD_AFTER`], or a write did not complete
    /// within it (after a good hello when `up`).
    DeadPeer { why: String, up: bool },
}

impl Ended {
    /// Logs the end; true when the link task should stop.
    fn log(&self, peer: &str, metrics: &Metrics) -> bool {
        match self {
            Ended::Finished => return true,
            Ended::Closed { .. } => {
                tracing::warn!(%peer, "link: the peer closed the connection")
            }
            Ended::Protocol(why) => {
                metrics.link_error();
                tracing::error!(%peer, error = %why, "link: closing the connection")
            }
            Ended::Io(why) => tracing::warn!(%peer, error = %why, "link: connection lost"),
            Ended::DeadPeer { why, .. } => {
                metrics.link_dead_peer();
                tracing::error!(%peer, error = %why, "link: the peer is dead, closing the connection")
            }
        }
        false
    }

    fn was_up(&self) -> bool {
        matches!(
            self,
            Ended::Closed { up: true } | Ended::Io(_) | Ended::DeadPeer { up: true, .. }
        )
    }
}

/// Appends `message` to `wire`; returns 1 when it was, 0 when it was dropped (counted).
fn encode_for_peer(message: &LinkMessage, wire: &mut Vec<u8>, metrics: &Metrics) -> u64 {
    match encode(message, wire) {
        Ok(()) => 1,
        Err(err) => {
            // Per frame: one line a second at most, with the count of the ones it stands for.
            static LOG: RateLimited = RateLimited::new(Duration::from_secs(1));
            if let Some(suppressed) = LOG.allow() {
                tracing::warn!(%err, suppressed, "link: frame not sent");
            }
            metrics.dropped_frame();
            0
        }
    }
}

/// One authenticated connection: frames both ways and heartbeats, until the peer closes,
/// fails, goes silent, or the role loop is gone.
async fn serve(
    greeted: Greeted,
    local: Role,
    metrics: &Metrics,
    in_tx: &mpsc::Sender<LinkMessage>,
    out_rx: &mut mpsc::Receiver<LinkMessage>,
) -> Ended {
    let Greeted {
        rd,
        wr,
        decoder,
        peer,
        name,
        version,
    } = greeted;
    metrics.set_connected(LINK_PORT, true);
    tracing::info!(%peer, local = %local, version, tls_peer = %name.as_deref().unwrap_or("-"), "link: connected");
    tokio::select! {
        // The reader first: when both end at once, its reason (say, the peer's close) is the one
        // to report.
        biased;
        e = read_side(rd, decoder, in_tx) => e,
        e = write_side(wr, metrics, out_rx) => e,
    }
}

/// Reads the peer's frames (its hello is consumed) for the role loop. Any bytes at all within
/// [`DEAD_AFTER`] keep the connection (heartbeats are consumed by the decoder).
async fn read_side(
    mut rd: LinkReader,
    mut decoder: LinkDecoder,
    in_tx: &mpsc::Sender<LinkMessage>,
) -> Ended {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // What the decoder holds first: the handshake may have read past the hello.
        loop {
            match decoder.next_message() {
                Ok(None) => break,
                Ok(Some(message)) => {
                    if in_tx.send(message).await.is_err() {
                        return Ended::Finished;
                    }
                }
                Err(err) => return Ended::Protocol(format!("malformed link message: {err}")),
            }
        }
        // The deadline runs only while we wait for the peer: time spent handing frames to a
        // slow role loop is not its silence.
        let waiting_since = Instant::now();
        let r = match tokio::time::timeout(DEAD_AFTER, rd.read(&mut buf)).await {
            Ok(r) => r,
            Err(_) => {
                return Ended::DeadPeer {
                    why: format!(
                        "no message for {:.1} s (the bound is {} s, heartbeats every {} s)",
                        waiting_since.elapsed().as_secs_f32(),
                        DEAD_AFTER.as_secs(),
                        HEARTBEAT_INTERVAL.as_secs()
                    ),
                    up: true,
                };
            }
        };
        match r {
            Ok(0) => {
                return match decoder.finish() {
                    Err(err) => Ended::Protocol(format!("malformed link message: {err}")),
                    Ok(()) => Ended::Closed { up: true },
                };
            }
            Ok(n) => decoder.feed(&buf[..n]),
            Err(err) => return Ended::Io(err.to_string()),
        }
    }
}

/// The role loop's frames, batched, and a heartbeat after every [`HEARTBEAT_INTERVAL`] without
/// a write. Every write must complete within [`DEAD_AFTER`].
async fn write_side(
    mut wr: LinkWriter,
    metrics: &Metrics,
    out_rx: &mut mpsc::Receiver<LinkMessage>,
) -> Ended {
    let mut wire = Vec::new();
    // A heartbeat at once: a connection that waited for the live link to end
    // ([`TAKEOVER_WAIT`]) had nothing from us since its hello.
    let mut next_beat = Duration::ZERO;
    loop {
        let idle = tokio::time::sleep(std::mem::replace(&mut next_beat, HEARTBEAT_INTERVAL));
        wire.clear();
        let mut batch = 0;
        tokio::select! {
            m = out_rx.recv() => {
                let Some(message) = m else { return Ended::Finished };
                // Every message already queued goes out with this one, in one write.
                batch = encode_for_peer(&message, &mut wire, metrics);
                while wire.len() < WRITE_BATCH {
                    let Ok(message) = out_rx.try_recv() else { break };
                    batch += encode_for_peer(&message, &mut wire, metrics);
                }
            }
            // The peer hears from us at least once an interval.
            _ = idle => encode_heartbeat(&mut wire),
        }
        if wire.is_empty() {
            continue;
        }
        if let Err(end) = write_bounded(&mut wr, &wire).await {
            metrics.add_dropped(batch);
            return end;
        }
    }
}

/// Writes `data` and flushes it (TLS keeps records until flushed; TCP's flush is nothing).
async fn write_flushed(wr: &mut LinkWriter, data: &[u8]) -> std::io::Result<()> {
    wr.write_all(data).await?;
    wr.flush().await
}

/// Writes `data` within [`DEAD_AFTER`]: a write that cannot complete is a dead peer.
async fn write_bounded(wr: &mut LinkWriter, data: &[u8]) -> Result<(), Ended> {
    match tokio::time::timeout(DEAD_AFTER, write_flushed(wr, data)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(Ended::Io(err.to_string())),
        Err(_) => Err(Ended::DeadPeer {
            why: format!(
                "a write of {} bytes did not complete within {} s",
                data.len(),
                DEAD_AFTER.as_secs()
            ),
            up: true,
        }),
    }
}
