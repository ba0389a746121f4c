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
use std::time::Duration;
use tracing::Instrument;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

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
/// Bound of the hello exchange.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
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

/// The primary's end: accepts the secondary's daemon on `listener`; a new connection replaces
/// the current one.
pub fn spawn_primary(
    listener: TcpListener,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> LinkPort {
    let (port, in_tx, mut out_rx) = channels(&metrics);
    metrics.set_connected(LINK_PORT, false);
    tokio::spawn(async move {
        let mut pending: Option<TcpStream> = None;
        loop {
            let stream = match pending.take() {
                Some(s) => s,
                None => loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        a = listener.accept() => match a {
                            Ok((s, _)) => break s,
                            Err(err) => {
                                tracing::warn!(%err, "link: accept failed");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        },
                        m = out_rx.recv() => match m {
                            Some(_) => metrics.dropped_frame(),
                            None => return,
                        },
                    }
                },
            };
            let peer = stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let ended = tokio::select! {
                _ = shutdown.cancelled() => return,
                // Every log line of this connection carries the peer.
                e = serve(stream, Role::Primary, &peer, &metrics, &in_tx, &mut out_rx)
                    .instrument(tracing::info_span!("link", %peer)) => e,
                a = listener.accept() => match a {
                    Ok((s, addr)) => {
                        pending = Some(s);
                        Ended::Replaced(addr.to_string())
                    }
                    Err(err) => Ended::Io(err.to_string()),
                },
            };
            metrics.set_connected(LINK_PORT, false);
            if ended.log(&peer, &metrics) {
                return;
            }
        }
    });
    port
}

/// The secondary's end: connects to the primary's daemon at `addr`, again after every loss,
/// with a backoff from `retry_min` to `retry_max`.
pub fn spawn_secondary(
    addr: String,
    retry_min: Duration,
    retry_max: Duration,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> LinkPort {
    let (port, in_tx, mut out_rx) = channels(&metrics);
    metrics.set_connected(LINK_PORT, false);
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
                    let ended = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        e = serve(stream, Role::Secondary, &addr, &metrics, &in_tx, &mut out_rx)
                            .instrument(tracing::info_span!("link", peer = %addr)) => e,
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
    /// A newer connection took over (primary only).
    Replaced(String),
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
            Ended::Replaced(new) => {
                tracing::warn!(%peer, new_peer = %new, "link: a new connection replaces this one")
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

/// One connection: the hello exchange, then frames both ways and heartbeats, until the peer
/// closes, fails, goes silent, or the role loop is gone.
async fn serve(
    stream: TcpStream,
    local: Role,
    peer: &str,
    metrics: &Metrics,
    in_tx: &mpsc::Sender<LinkMessage>,
    out_rx: &mut mpsc::Receiver<LinkMessage>,
) -> Ended {
    colo_control::tune_tcp(&stream, "proxyd link");
    let (rd, mut wr) = stream.into_split();
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
    if let Err(end) = write_bounded(&mut wr, &hello, false).await {
        return end;
    }
    let (greeted_tx, greeted_rx) = oneshot::channel();
    tokio::select! {
        // The reader first: when both end at once, its reason (say, the peer's close) is the one
        // to report.
        biased;
        e = read_side(rd, local, peer, metrics, in_tx, greeted_tx) => e,
        e = write_side(wr, metrics, out_rx, greeted_rx) => e,
    }
}

/// Reads the peer's messages: the hello within [`HELLO_TIMEOUT`], then frames for the role
/// loop. Any bytes at all within [`DEAD_AFTER`] keep the connection (heartbeats are consumed
/// by the decoder).
async fn read_side(
    mut rd: OwnedReadHalf,
    local: Role,
    peer: &str,
    metrics: &Metrics,
    in_tx: &mpsc::Sender<LinkMessage>,
    greeted_tx: oneshot::Sender<()>,
) -> Ended {
    let mut greeted_tx = Some(greeted_tx);
    let mut decoder = LinkDecoder::new(local);
    let mut buf = vec![0u8; 64 * 1024];
    let hello_deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    loop {
        // Until the hello, its bound applies. After it, the deadline runs only while we wait
        // for the peer: time spent handing frames to a slow role loop is not its silence.
        let waiting_since = tokio::time::Instant::now();
        let greeted = decoder.greeted();
        let deadline = if greeted {
            waiting_since + DEAD_AFTER
        } else {
            hello_deadline
        };
        let r = match tokio::time::timeout_at(deadline, rd.read(&mut buf)).await {
            Ok(r) => r,
            Err(_) if !greeted => {
                return Ended::Protocol(format!("no hello within {HELLO_TIMEOUT:?}"));
            }
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
        let n = match r {
            Ok(0) => {
                return match decoder.finish() {
                    Err(err) => Ended::Protocol(format!("malformed link message: {err}")),
                    Ok(()) => Ended::Closed {
                        up: decoder.greeted(),
                    },
                };
            }
            Ok(n) => n,
            Err(err) => return Ended::Io(err.to_string()),
        };
        decoder.feed(&buf[..n]);
        loop {
            match decoder.next_message() {
                Ok(None) => break,
                Ok(Some(LinkMessage::Hello { version, .. })) => {
                    metrics.set_connected(LINK_PORT, true);
                    tracing::info!(%peer, local = %local, version, "link: connected");
                    if let Some(tx) = greeted_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Some(message)) => {
                    if in_tx.send(message).await.is_err() {
                        return Ended::Finished;
                    }
                }
                Err(err) => return Ended::Protocol(format!("malformed link message: {err}")),
            }
        }
    }
}

/// After our hello: the role loop's frames (once the peer's hello was accepted), batched, and a
/// heartbeat after every [`HEARTBEAT_INTERVAL`] without a write. Every write must complete
/// within [`DEAD_AFTER`].
async fn write_side(
    mut wr: OwnedWriteHalf,
    metrics: &Metrics,
    out_rx: &mut mpsc::Receiver<LinkMessage>,
    mut greeted_rx: oneshot::Receiver<()>,
) -> Ended {
    let mut wire = Vec::new();
    let mut greeted = false;
    loop {
        let idle = tokio::time::sleep(HEARTBEAT_INTERVAL);
        wire.clear();
        let mut batch = 0;
        tokio::select! {
            g = &mut greeted_rx, if !greeted => {
                match g {
                    Ok(()) => greeted = true,
                    // The reader ended; `serve` returns its reason.
                    Err(_) => std::future::pending::<()>().await,
                }
                continue;
            }
            m = out_rx.recv(), if greeted => {
                let Some(message) = m else { return Ended::Finished };
                // Every message already queued goes out with this one, in one write.
                batch = encode_for_peer(&message, &mut wire, metrics);
                while wire.len() < WRITE_BATCH {
                    let Ok(message) = out_rx.try_recv() else { break };
                    batch += encode_for_peer(&message, &mut wire, metrics);
                }
            }
            // The peer hears from us at least once an interval, also before its hello came
            // (it already has ours).
            _ = idle => encode_heartbeat(&mut wire),
        }
        if wire.is_empty() {
            continue;
        }
        if let Err(end) = write_bounded(&mut wr, &wire, greeted).await {
            metrics.add_dropped(batch);
            return end;
        }
    }
}

/// Writes `data` within [`DEAD_AFTER`]: a write that cannot complete is a dead peer.
async fn write_bounded(wr: &mut OwnedWriteHalf, data: &[u8], up: bool) -> Result<(), Ended> {
    match tokio::time::timeout(DEAD_AFTER, wr.write_all(data)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(Ended::Io(err.to_string())),
        Err(_) => Err(Ended::DeadPeer {
            why: format!(
                "a write of {} bytes did not complete within {} s",
                data.len(),
                DEAD_AFTER.as_secs()
            ),
            up,
        }),
    }
}
