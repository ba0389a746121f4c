//! Forwarding of the migration channels, and the epoch state machine on the
//! main channel's secondary-to-primary direction.
//!
//! Every accepted connection gets its own connection to the secondary and
//! two pumps (one per direction). A pump reads into its buffer and writes
//! what it read at once: nothing is reordered, merged or delayed, except the
//! last bytes of a `checkpoint-reply` or `vmstate-received`, which wait for
//! the checkpoint barrier.
//!
//! The relay serves **one session at a time**: one main migration channel
//! (magic `QEVM`; COLO's return path, the secondary's COLO messages, travels
//! back on the same socket). Any other connection while a session runs is
//! closed before a byte of it is read, and so is a first connection that
//! does not start with `QEVM` (multifd and postcopy channels are not used
//! with COLO; the secondary is never connected for them). Otherwise a second
//! `QEVM` connection could take over the parsing (no barrier would run for
//! the real one any more) and its close publish a false `colo-exit`. The
//! next session is accepted once the relay has published the end of the
//! previous one (`colo-exit`), so a re-protect needs nothing from the
//! operator. `docs/control-protocol.md`, "One session at a time".

use super::colo_message::{ColoMessage, ColoParser, ParseError, QEVM_MAGIC};
use super::stream::{ReadHalf, RelayListener, Stream, WriteHalf};
use colo_control::hub::{BarrierError, ControlHub};
use colo_control::protocol::{
    EXIT_BARRIER_TIMEOUT, EXIT_CHANNEL_CLOSED, EXIT_RELAY_SHUTDOWN, EXIT_REPLY_TIMEOUT, EventBody,
    EventKind, RelayState,
};
use colo_daemon::RateLimited;
use colo_tls::PeerAcceptor;
use colo_types::Address;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Read buffer of the primary-to-secondary direction (bulk RAM). Each read
/// is forwarded as soon as it returns, whatever its size.
pub(crate) const UP_BUF: usize = 1 << 20;
/// Read buffer of the secondary-to-primary direction.
pub(crate) const DOWN_BUF: usize = 64 << 10;
/// Bound of connecting to the secondary for one channel.
pub(crate) const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound of a half-close (`shutdown(SHUT_WR)`) towards a peer.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a new connection may take to send its 4-byte magic. QEMU sends
/// it at once; a connection that does not holds the session slot (and keeps
/// the real primary out) for at most this long.
pub(crate) const MAGIC_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the secondary-to-primary pump looks whether a checkpoint request is waiting for
/// its reply too long (the bound itself is [`crate::RelayConfig::reply_timeout`]).
const REPLY_CHECK: Duration = Duration::from_millis(100);
/// With `--migration-tls`, how many connections may be in their TLS handshake at once while no
/// session runs. A handshake does not hold the session slot (only an authenticated primary
/// takes it), so a stranger that connects first and stalls cannot keep the real primary out;
/// this bounds what such strangers cost. One more is closed at once.
pub const MAX_PENDING_HANDSHAKES: usize = 8;

/// The refused-connection warning: anyone who can reach the listener can
/// cause it at will, so it costs at most a line a second.
static REFUSED_LOG: RateLimited = RateLimited::new(Duration::from_secs(1));

/// Which QEMU a direction reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Primary,
    Secondary,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Primary => "primary",
            Side::Secondary => "secondary",
        })
    }
}

/// How a pump ended.
#[derive(Debug)]
enum End {
    /// The source closed its side; the other side was half-closed too.
    Eof,
    /// Reading the source failed.
    ReadError(std::io::Error),
    /// Writing to the destination failed.
    WriteError(std::io::Error),
    /// The session or the relay was cancelled.
    Cancelled,
    /// A barrier failed, or a checkpoint request went unanswered; the session was cancelled.
    BarrierFailed,
}

impl End {
    fn describe(&self, from: Side, to: Side) -> String {
        match self {
            End::Eof => format!("the {from} closed the connection"),
            End::ReadError(e) => format!("reading from the {from} failed: {e}"),
            End::WriteError(e) => format!("writing to the {to} failed: {e}"),
            End::Cancelled => "the relay closed the channel".to_string(),
            End::BarrierFailed => {
                "a checkpoint barrier failed, or the secondary left a checkpoint request \
                 unanswered"
                    .to_string()
            }
        }
    }
}

/// One main channel's life, from its magic to its `colo-exit`.
#[derive(Debug)]
struct Session {
    id: u64,
    cancel: CancellationToken,
    /// Set when a barrier failed: the relay ended COLO itself.
    failed: AtomicBool,
}

/// The one session slot, taken when a connection is accepted into a free
/// slot and given back when it turns out not to be a main channel, or once
/// its session's end was published. Dropping it (a task that ends or
/// panics) gives it back too.
#[derive(Debug)]
struct SessionSlot(Arc<AtomicBool>);

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// What an accepted connection holds while it is being looked at.
#[derive(Debug)]
enum Admitted {
    /// The session slot (without TLS: taken at accept).
    Slot(SessionSlot),
    /// A place among the handshakes in progress (with TLS: the slot comes after it).
    Handshake(tokio::sync::OwnedSemaphorePermit),
}

/// Shared by every connection task of one [`super::serve`] call.
#[derive(Debug)]
pub(crate) struct Relay {
    hub: ControlHub,
    target: Address,
    ack_timeout: Duration,
    reply_timeout: Duration,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    current: Mutex<Arc<Session>>,
    next_id: AtomicU64,
    /// A connection holds the session slot (see the module's documentation).
    busy: Arc<AtomicBool>,
    /// When set, migration connections over TCP only from these addresses.
    peers: Option<Vec<IpAddr>>,
    /// When set, every migration connection is a TLS client that must
    /// present the primary host's certificate (`--migration-tls`).
    tls: Option<PeerAcceptor>,
    /// Handshakes in progress (with `tls`), at most [`MAX_PENDING_HANDSHAKES`].
    pending: Arc<tokio::sync::Semaphore>,
}

impl Relay {
    pub(crate) fn new(
        hub: ControlHub,
        target: Address,
        (ack_timeout, reply_timeout): (Duration, Duration),
        peers: Option<Vec<IpAddr>>,
        tls: Option<PeerAcceptor>,
        shutdown: CancellationToken,
    ) -> Arc<Relay> {
        let first = Arc::new(Session {
            id: 1,
            cancel: shutdown.child_token(),
            failed: AtomicBool::new(false),
        });
        Arc::new(Relay {
            hub,
            target,
            ack_timeout,
            reply_timeout,
            shutdown,
            tasks: TaskTracker::new(),
            current: Mutex::new(first),
            next_id: AtomicU64::new(2),
            busy: Arc::new(AtomicBool::new(false)),
            peers,
            tls,
            pending: Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES)),
        })
    }

    fn current(&self) -> Arc<Session> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn is_current(&self, s: &Session) -> bool {
        self.current().id == s.id
    }

    fn fresh_session(&self) -> Arc<Session> {
        Arc::new(Session {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            cancel: self.shutdown.child_token(),
            failed: AtomicBool::new(false),
        })
    }

    /// The session of a new main channel (the slot is held: no other one
    /// can exist).
    fn begin_main(&self) -> Arc<Session> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        *cur = self.fresh_session();
        cur.clone()
    }

    /// Takes the session slot for a new connection, or says why it is
    /// refused (nothing has been read from it).
    fn admit(&self, peer_ip: Option<IpAddr>) -> Result<SessionSlot, String> {
        self.allowed_peer(peer_ip)?;
        self.take_slot()
    }

    /// Whether `--migration-peer` lets `peer_ip` in.
    fn allowed_peer(&self, peer_ip: Option<IpAddr>) -> Result<(), String> {
        match (peer_ip, &self.peers) {
            (Some(ip), Some(allowed)) if !allowed.contains(&ip) => {
                Err(format!("{ip} is not an allowed migration peer"))
            }
            _ => Ok(()),
        }
    }

    /// Takes the session slot, or says why not.
    fn take_slot(&self) -> Result<SessionSlot, String> {
        self.busy
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .map(|_| SessionSlot(self.busy.clone()))
            .map_err(|_| {
                "a migration session is running; the relay serves one at a time".to_string()
            })
    }

    /// Counts and logs (rate-limited) a migration connection the relay closed.
    fn refused(&self, peer: &str, why: &str) {
        self.hub
            .update_status(|s| s.refused_migration_channels += 1);
        if let Some(suppressed) = REFUSED_LOG.allow() {
            tracing::warn!(%peer, suppressed, "refused a migration connection: {why}");
        }
    }

    /// After a main channel ended: later channels start a new session.
    fn end_session(&self, s: &Session) {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.id == s.id {
            *cur = self.fresh_session();
        }
    }

    /// Accepts until `shutdown`, then closes every channel.
    pub(crate) async fn accept_loop(self: &Arc<Self>, listener: RelayListener) {
        let local = listener
            .local_endpoint()
            .map(|e| e.to_string())
            .unwrap_or_else(|_| "?".into());
        tracing::info!(listen = %local, target = %self.target, "relay accepting migration channels");
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((stream, peer, peer_ip)) => {
                    // Refused before a byte is read, and before the
                    // secondary is connected: the running session, and the
                    // secondary QEMU's one incoming migration, stay untouched.
                    // With TLS the slot is taken only once the handshake
                    // authenticated the primary (`handle_connection`); a
                    // running session still refuses everyone unread here.
                    let admitted = match &self.tls {
                        None => self.admit(peer_ip).map(Admitted::Slot),
                        Some(_) => self.allowed_peer(peer_ip).and_then(|()| {
                            if self.busy.load(Ordering::SeqCst) {
                                return Err("a migration session is running; the relay serves one at a time".to_string());
                            }
                            self.pending.clone().try_acquire_owned().map(Admitted::Handshake).map_err(|_| {
                                format!("{MAX_PENDING_HANDSHAKES} connections are in their TLS handshake already")
                            })
                        }),
                    };
                    let slot = match admitted {
                        Ok(a) => a,
                        Err(why) => {
                            drop(stream);
                            self.refused(&peer, &why);
                            continue;
                        }
                    };
                    let relay = self.clone();
                    // Every log line of this channel carries the primary's end of it.
                    let span = tracing::info_span!("migration_channel", peer = %peer);
                    self.tasks.spawn(
                        async move { relay.handle_connection(stream, peer, slot).await }
                            .instrument(span),
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a migration channel failed");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            }
        }
        drop(listener);
        // Every session token is a child of `shutdown`: the channels close,
        // and their tasks publish colo-exit (reason relay-shutdown).
        self.tasks.close();
        self.tasks.wait().await;
        tracing::info!("relay stopped");
    }

    async fn handle_connection(self: Arc<Self>, primary: Stream, peer: String, admitted: Admitted) {
        let chan = self.next_id.fetch_add(1, Ordering::Relaxed);
        // With --migration-tls, the handshake comes first: a client that
        // fails it is refused like any stranger, before the secondary is
        // connected. It holds a pending permit meanwhile, not the session
        // slot: a stranger that stalls its handshake cannot keep the real
        // primary out. The slot goes to the first authenticated connection.
        let (slot, (mut pr, mut pw)) = match (&self.tls, admitted) {
            (_, Admitted::Slot(slot)) => (slot, primary.into_split()),
            (None, Admitted::Handshake(_)) => {
                unreachable!("a pending permit is only given with TLS")
            }
            (Some(acceptor), Admitted::Handshake(permit)) => {
                let handshake = tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    r = primary.accept_tls(acceptor) => r,
                };
                drop(permit);
                let halves = match handshake {
                    Ok((halves, name)) => {
                        tracing::info!(chan, %peer, tls_peer = %name, "migration connection authenticated (TLS)");
                        halves
                    }
                    Err(e) => {
                        self.refused(&peer, &format!("the TLS handshake failed: {e}"));
                        return;
                    }
                };
                match self.take_slot() {
                    Ok(slot) => (slot, halves),
                    Err(why) => {
                        drop(halves);
                        self.refused(&peer, &format!("authenticated, but {why}"));
                        return;
                    }
                }
            }
        };

        // Tell the channel kind from its first 4 bytes, before the secondary
        // is connected: QEMU's incoming side takes one migration and fails
        // on anything else, so a stranger's bytes must never reach it.
        // QEMU's incoming side never speaks first, so nothing is held back
        // meanwhile.
        let mut magic = [0u8; 4];
        let mut got = 0;
        let read_magic = async {
            while got < 4 {
                match pr.read(&mut magic[got..]).await {
                    Ok(0) => return Err("it closed".to_string()),
                    Ok(n) => got += n,
                    Err(e) => return Err(format!("reading it failed: {e}")),
                }
            }
            Ok(())
        };
        let read = tokio::select! {
            _ = self.shutdown.cancelled() => return,
            r = tokio::time::timeout(MAGIC_TIMEOUT, read_magic) => r,
        };
        let why = match read {
            Ok(Ok(())) if u32::from_be_bytes(magic) == QEVM_MAGIC => None,
            Ok(Ok(())) => Some(format!(
                "it starts with {:#010x}, not QEVM: only a main migration channel is relayed (multifd and postcopy channels are not used with COLO)",
                u32::from_be_bytes(magic)
            )),
            Ok(Err(e)) => Some(format!("{e} before its 4-byte magic")),
            Err(_) => Some(format!("no 4-byte magic within {MAGIC_TIMEOUT:?}")),
        };
        if let Some(why) = why {
            drop((pr, pw));
            self.refused(&peer, &why);
            return;
        }

        let secondary = match Stream::connect(&self.target, TARGET_CONNECT_TIMEOUT).await {
            Ok(s) => s,
            Err(e) => {
                let detail = format!(
                    "cannot connect to the secondary at {} for a channel from {peer}: {e}",
                    self.target
                );
                tracing::error!(chan, "{detail}");
                let epoch = self.hub.status().epoch;
                self.hub
                    .publish(EventBody::new(EventKind::RelayError, epoch).with_detail(detail))
                    .await;
                return;
            }
        };
        let (sr, mut sw) = secondary.into_split();
        if let Err(e) = sw.write_all(&magic).await {
            tracing::info!(chan, %peer, error = %e, "cannot forward to the secondary");
            return;
        }
        let session = self.begin_main();
        self.run_main(session, chan, peer, pr, &mut pw, sr, sw, slot)
            .await;
        // Make sure both peers see the end even if a pump left a half open.
        let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, pw.shutdown()).await;
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_main(
        &self,
        session: Arc<Session>,
        chan: u64,
        peer: String,
        pr: ReadHalf,
        pw: &mut WriteHalf,
        sr: ReadHalf,
        sw: WriteHalf,
        slot: SessionSlot,
    ) {
        tracing::info!(chan, %peer, session = session.id, target = %self.target, "main migration channel connected");
        self.hub.update_status(|s| {
            s.main_channel_connected = true;
            s.state = RelayState::Precopy;
            s.parse_error = None;
        });
        let over = AtomicBool::new(false);
        // Bytes forwarded to the secondary, so that each checkpoint's size can be logged.
        let forwarded = AtomicU64::new(0);
        let up = pump_raw(pr, sw, &session.cancel, UP_BUF, Some(&forwarded));
        let down = self.pump_colo(sr, pw, &session, &over, &forwarded);
        tokio::pin!(up, down);
        let (first, rest) = tokio::select! {
            e = &mut up => (e.describe(Side::Primary, Side::Secondary), Rest::Down),
            e = &mut down => (e.describe(Side::Secondary, Side::Primary), Rest::Up),
        };
        over.store(true, Ordering::SeqCst);
        let current = self.is_current(&session);
        if !session.failed.load(Ordering::SeqCst) && current {
            let epoch = self.hub.update_status(|s| {
                s.main_channel_connected = false;
                s.state = RelayState::Exited;
                s.epoch
            });
            let reason = if self.shutdown.is_cancelled() {
                EXIT_RELAY_SHUTDOWN
            } else {
                EXIT_CHANNEL_CLOSED
            };
            tracing::info!(chan, epoch, reason, detail = %first, "main migration channel closed: COLO exit");
            self.hub
                .publish(
                    EventBody::new(EventKind::ColoExit, epoch)
                        .with_reason(reason)
                        .with_detail(first),
                )
                .await;
        } else {
            tracing::info!(chan, reason = %first, "main migration channel closed");
        }
        self.end_session(&session);
        // The end is published: the next session (a re-protect) may come.
        drop(slot);
        // Let the other direction drain: the peer still gets every byte the
        // other side sent before it closed.
        match rest {
            Rest::Down => drop(down.await),
            Rest::Up => drop(up.await),
        }
    }

    /// The secondary-to-primary pump of the main channel: forwards every
    /// byte in order, parses COLO messages, and holds `checkpoint-reply` and
    /// `vmstate-received` until their barrier has passed.
    async fn pump_colo(
        &self,
        mut rd: ReadHalf,
        wr: &mut WriteHalf,
        session: &Session,
        over: &AtomicBool,
        forwarded: &AtomicU64,
    ) -> End {
        let cancel = &session.cancel;
        let mut forwarded_at_reply = 0;
        let mut buf = vec![0u8; DOWN_BUF];
        let mut parser = ColoParser::new();
        let mut parsing = true;
        let mut reply_at: Option<Instant> = None;
        // Between checkpoints the primary sends nothing but its next `checkpoint-request`,
        // so bytes going up after the secondary's `checkpoint-ready` or `vmstate-loaded` are
        // that request, and its reply is due. A secondary QEMU that never answers (frozen,
        // stuck stopping its VM) would otherwise keep the primary waiting for ever, its VM
        // running and its output held: no barrier runs without the reply.
        let mut request = ReplyDeadline::default();
        let mut check = tokio::time::interval(REPLY_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let n = tokio::select! {
                // A reply already waiting in the socket is read before the deadline is looked at.
                biased;
                _ = cancel.cancelled() => return End::Cancelled,
                r = rd.read(&mut buf) => match r {
                    Ok(0) => {
                        let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, wr.shutdown()).await;
                        return End::Eof;
                    }
                    Ok(n) => n,
                    Err(e) => return End::ReadError(e),
                },
                _ = check.tick(), if parsing && request.armed() => {
                    if over.load(Ordering::SeqCst) || !self.is_current(session) {
                        // The session already ended (its end is published): the rest of this
                        // direction only drains.
                        parsing = false;
                        continue;
                    }
                    let sent = forwarded.load(Ordering::Relaxed);
                    if let Some(waited) = request.overdue(sent, Instant::now(), self.reply_timeout) {
                        let epoch = self.hub.update_status(|s| s.epoch);
                        self.fail_unanswered(session, epoch, waited).await;
                        return End::BarrierFailed;
                    }
                    continue;
                }
            };
            let chunk = &buf[..n];
            let mut cursor = 0;
            if parsing && (over.load(Ordering::SeqCst) || !self.is_current(session)) {
                parsing = false;
                tracing::debug!(
                    session = session.id,
                    "main channel no longer current; forwarding without parsing"
                );
            }
            let mut pos = 0;
            while parsing && pos < n {
                let msg = match parser.advance(&chunk[pos..]) {
                    Ok((used, msg)) => {
                        pos += used;
                        match msg {
                            Some(m) => m,
                            None => continue,
                        }
                    }
                    Err(e) => {
                        parsing = false;
                        self.on_parse_error(e).await;
                        break;
                    }
                };
                tracing::debug!(session = session.id, message = %msg, "secondary -> primary");
                match msg {
                    ColoMessage::CheckpointReady => {
                        request.expect_after(forwarded.load(Ordering::Relaxed));
                        let epoch = self.hub.update_status(|s| {
                            s.epoch += 1;
                            s.state = RelayState::Colo;
                            s.epoch
                        });
                        tracing::info!(epoch, "secondary is in COLO: colo-started");
                        self.hub
                            .publish(EventBody::new(EventKind::ColoStarted, epoch))
                            .await;
                    }
                    ColoMessage::CheckpointReply | ColoMessage::VmstateReceived => {
                        let kind = if msg == ColoMessage::CheckpointReply {
                            request.answered();
                            reply_at = Some(Instant::now());
                            forwarded_at_reply = forwarded.load(Ordering::Relaxed);
                            EventKind::SvmEpochClosed
                        } else {
                            EventKind::CheckpointAdopted
                        };
                        // Everything before the message leaves now; the
                        // message's last bytes (and what follows) wait.
                        let start = pos.saturating_sub(msg.wire_len()).max(cursor);
                        if let Err(end) = write_all(wr, &chunk[cursor..start], cancel).await {
                            return end;
                        }
                        cursor = start;
                        let (epoch, state) = self.hub.update_status(|s| (s.epoch, s.state));
                        if state != RelayState::Colo {
                            tracing::warn!(message = %msg, %state, "COLO message outside COLO; holding it for its barrier anyway");
                        }
                        let barrier = self
                            .hub
                            .barrier(EventBody::new(kind, epoch), self.ack_timeout);
                        let outcome = tokio::select! {
                            // Relay shutdown (or a superseding failure) does
                            // not wait out the ack timeout.
                            _ = cancel.cancelled() => return End::Cancelled,
                            r = barrier => r,
                        };
                        match outcome {
                            Ok(report) => {
                                tracing::debug!(
                                    event = %kind, epoch,
                                    elapsed_us = report.elapsed.as_micros() as u64,
                                    acks = ?report.acks.iter().map(|a| (a.name.as_str(), a.latency.as_micros() as u64)).collect::<Vec<_>>(),
                                    "barrier passed"
                                );
                            }
                            Err(err) => {
                                self.fail_session(session, kind, epoch, err).await;
                                return End::BarrierFailed;
                            }
                        }
                    }
                    ColoMessage::VmstateLoaded => {
                        if let Err(end) = write_all(wr, &chunk[cursor..pos], cancel).await {
                            return end;
                        }
                        cursor = pos;
                        // Everything the primary sent for this checkpoint was forwarded
                        // before the secondary could load it.
                        request.expect_after(forwarded.load(Ordering::Relaxed));
                        let pause = reply_at.take().map(|t| t.elapsed());
                        self.hub.record_checkpoint(pause);
                        let epoch = self.hub.update_status(|s| {
                            let e = s.epoch;
                            s.epoch += 1;
                            e
                        });
                        tracing::debug!(
                            epoch,
                            pause_us = pause.map(|p| p.as_micros() as u64),
                            // What the primary sent from checkpoint-reply to vmstate-loaded:
                            // the checkpoint's RAM and device state.
                            bytes_to_secondary =
                                forwarded.load(Ordering::Relaxed) - forwarded_at_reply,
                            "checkpoint complete"
                        );
                        self.hub
                            .publish(EventBody::new(EventKind::CheckpointComplete, epoch))
                            .await;
                    }
                    ColoMessage::CheckpointRequest
                    | ColoMessage::VmstateSend
                    | ColoMessage::VmstateSize(_) => {
                        tracing::warn!(message = %msg, "primary-side COLO message seen from the secondary; forwarding it");
                    }
                }
            }
            if let Err(end) = write_all(wr, &chunk[cursor..n], cancel).await {
                return end;
            }
        }
    }

    async fn on_parse_error(&self, e: ParseError) {
        let detail = format!(
            "{e}; the relay stops parsing this channel and forwards it untouched, so checkpoint barriers no longer run"
        );
        tracing::error!(offset = e.offset, code = e.code, "{detail}");
        let epoch = self.hub.update_status(|s| {
            s.parse_error = Some(e.to_string());
            s.epoch
        });
        self.hub
            .publish(EventBody::new(EventKind::RelayError, epoch).with_detail(detail))
            .await;
    }

    async fn fail_session(
        &self,
        session: &Session,
        kind: EventKind,
        epoch: u64,
        err: BarrierError,
    ) {
        let culprits = err.culprits();
        let detail = format!(
            "{kind} barrier of epoch {epoch} failed: {err}; the relay closed the migration channels, both QEMUs leave COLO (COLO_EXIT reason=error)"
        );
        tracing::error!(culprits = ?culprits, epoch, event = %kind, "{detail}");
        self.hub.update_status(|s| s.barrier_timeouts += 1);
        self.end_colo(session, epoch, EXIT_BARRIER_TIMEOUT, detail)
            .await;
    }

    /// The secondary QEMU did not answer the primary's checkpoint request within
    /// `reply_timeout`: COLO ends as after a failed barrier, so that the primary serves on.
    async fn fail_unanswered(&self, session: &Session, epoch: u64, waited: Duration) {
        let detail = format!(
            "the secondary QEMU did not answer the checkpoint request of epoch {epoch} within {waited:?} (frozen, or stuck stopping its VM); the relay closed the migration channels, both QEMUs leave COLO (COLO_EXIT reason=error)"
        );
        tracing::error!(epoch, "{detail}");
        self.end_colo(session, epoch, EXIT_REPLY_TIMEOUT, detail)
            .await;
    }

    /// Ends the session's COLO: marks it failed, publishes `colo-exit` with `reason`, and
    /// closes both migration channels.
    async fn end_colo(&self, session: &Session, epoch: u64, reason: &str, detail: String) {
        session.failed.store(true, Ordering::SeqCst);
        let current = self.is_current(session);
        self.hub.update_status(|s| {
            if current {
                s.state = RelayState::Exited;
                s.main_channel_connected = false;
            }
        });
        self.hub
            .publish(
                EventBody::new(EventKind::ColoExit, epoch)
                    .with_reason(reason)
                    .with_detail(detail),
            )
            .await;
        self.end_session(session);
        session.cancel.cancel();
    }
}

/// When the secondary's answer to a checkpoint request is due: armed when the secondary has
/// done its part of COLO's exchange (`checkpoint-ready`, `vmstate-loaded`), with the count of
/// bytes forwarded to it then; the first bytes after that are the primary's next request.
#[derive(Debug, Default)]
struct ReplyDeadline {
    /// Bytes forwarded to the secondary when the primary's next request became the next
    /// thing it sends.
    sent_before: Option<u64>,
    /// When the relay first saw bytes beyond `sent_before` (the request).
    requested_at: Option<Instant>,
}

impl ReplyDeadline {
    fn expect_after(&mut self, sent: u64) {
        *self = ReplyDeadline {
            sent_before: Some(sent),
            requested_at: None,
        };
    }

    fn answered(&mut self) {
        *self = ReplyDeadline::default();
    }

    fn armed(&self) -> bool {
        self.sent_before.is_some()
    }

    /// How long the request has waited, once that is `timeout` or more; `sent` is the count
    /// of bytes forwarded to the secondary now.
    fn overdue(&mut self, sent: u64, now: Instant, timeout: Duration) -> Option<Duration> {
        let before = self.sent_before?;
        if self.requested_at.is_none() && sent > before {
            self.requested_at = Some(now);
        }
        let waited = now.saturating_duration_since(self.requested_at?);
        (waited >= timeout).then_some(waited)
    }
}

enum Rest {
    Up,
    Down,
}

async fn write_all(wr: &mut WriteHalf, data: &[u8], cancel: &CancellationToken) -> Result<(), End> {
    if data.is_empty() {
        return Ok(());
    }
    // The flush is free on a socket; over TLS it sends what the TLS layer
    // still holds, so a 4-byte COLO message never waits for the next write.
    let write = async {
        wr.write_all(data).await?;
        wr.flush().await
    };
    tokio::select! {
        _ = cancel.cancelled() => Err(End::Cancelled),
        r = write => r.map_err(End::WriteError),
    }
}

/// Forwards `rd` to `wr` until EOF, an error or cancellation; on EOF
/// half-closes `wr` so the peer sees the end too.
async fn pump_raw(
    rd: ReadHalf,
    mut wr: WriteHalf,
    cancel: &CancellationToken,
    size: usize,
    forwarded: Option<&AtomicU64>,
) -> End {
    let end = pump_raw_ref(rd, &mut wr, cancel, size, forwarded).await;
    if !matches!(end, End::Eof) {
        let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, wr.shutdown()).await;
    }
    end
}

async fn pump_raw_ref(
    mut rd: ReadHalf,
    wr: &mut WriteHalf,
    cancel: &CancellationToken,
    size: usize,
    forwarded: Option<&AtomicU64>,
) -> End {
    let mut buf = vec![0u8; size];
    loop {
        let n = tokio::select! {
            _ = cancel.cancelled() => return End::Cancelled,
            r = rd.read(&mut buf) => match r {
                Ok(0) => {
                    let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, wr.shutdown()).await;
                    return End::Eof;
                }
                Ok(n) => n,
                Err(e) => return End::ReadError(e),
            },
        };
        if let Err(end) = write_all(wr, &buf[..n], cancel).await {
            return end;
        }
        if let Some(forwarded) = forwarded {
            forwarded.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}
