//! The link's I/O (`docs/proxyd-link.md`; the wire format is [`super::link`]): the primary
//! listens for the secondary's daemon, the secondary connects with a backoff. Both sides
//! exchange hellos, then pass frames between the socket and their role loop.
//!
//! A malformed message or a failed handshake closes the connection with an error log naming
//! the peer and the fault (and counts `link_errors_total`); the listening side waits for the
//! next connection, the connecting side reconnects. Nothing the peer sends can panic the
//! daemon. While the link is down, frames for the peer are dropped and counted: the primary
//! holds the PVM's output meanwhile, and the hold-time bound asks for a checkpoint.

use colo_daemon::RateLimited;
use std::time::Duration;
use tracing::Instrument;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::link::{LINK_VERSION, LinkDecoder, LinkMessage, encode};
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
                c = TcpStream::connect(addr.as_str()) => c,
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
            Ended::Replaced(new) => {
                tracing::warn!(%peer, new_peer = %new, "link: a new connection replaces this one")
            }
        }
        false
    }

    fn was_up(&self) -> bool {
        matches!(self, Ended::Closed { up: true } | Ended::Io(_))
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

async fn serve(
    mut stream: TcpStream,
    local: Role,
    peer: &str,
    metrics: &Metrics,
    in_tx: &mpsc::Sender<LinkMessage>,
    out_rx: &mut mpsc::Receiver<LinkMessage>,
) -> Ended {
    let _ = stream.set_nodelay(true);
    let mut wire = Vec::new();
    let hello = LinkMessage::Hello {
        version: LINK_VERSION,
        role: local,
    };
    // Encoding a hello cannot fail.
    let _ = encode(&hello, &mut wire);
    if let Err(err) = stream.write_all(&wire).await {
        return Ended::Io(err.to_string());
    }
    let mut decoder = LinkDecoder::new(local);
    let mut buf = vec![0u8; 64 * 1024];
    let hello_deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    loop {
        tokio::select! {
            r = stream.read(&mut buf) => {
                let n = match r {
                    Ok(0) => {
                        return match decoder.finish() {
                            Err(err) => Ended::Protocol(format!("malformed link message: {err}")),
                            Ok(()) => Ended::Closed { up: decoder.greeted() },
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
            m = out_rx.recv(), if decoder.greeted() => {
                let Some(message) = m else { return Ended::Finished };
                // Every message already queued goes out with this one, in one write.
                wire.clear();
                let mut batch = encode_for_peer(&message, &mut wire, metrics);
                while wire.len() < WRITE_BATCH {
                    let Ok(message) = out_rx.try_recv() else { break };
                    batch += encode_for_peer(&message, &mut wire, metrics);
                }
                if let Err(err) = stream.write_all(&wire).await {
                    metrics.add_dropped(batch);
                    return Ended::Io(err.to_string());
                }
            }
            _ = tokio::time::sleep_until(hello_deadline), if !decoder.greeted() => {
                return Ended::Protocol(format!("no hello within {HELLO_TIMEOUT:?}"));
            }
        }
    }
}
