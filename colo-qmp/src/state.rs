//! State shared by the client handle and the reader/writer tasks: calls
//! waiting for a reply, event subscribers, and whether the connection is
//! closed. Everything that must change atomically with "closed" lives under
//! one mutex so no call can register after the close and then wait forever.

use super::error::QmpError;
use super::types::Event;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Outcome delivered to a waiting call.
pub(crate) type ReplyResult = Result<Value, QmpError>;

/// Why the connection ended; decides which error pending calls get.
#[derive(Debug)]
pub(crate) enum CloseReason {
    /// EOF, reset, or EOF mid-line.
    PeerClosed,
    /// Unrecoverable framing problem (line too long).
    Protocol(String),
    /// Any other I/O error.
    Io(std::io::Error),
    /// The last client handle was dropped.
    Local,
}

struct Pending {
    command: String,
    reply: oneshot::Sender<ReplyResult>,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    subscribers: Vec<mpsc::UnboundedSender<Event>>,
    closed: bool,
}

/// See the module documentation.
pub(crate) struct Shared {
    peer: String,
    state: Mutex<State>,
    /// Fired on close so both background tasks stop promptly, even if one
    /// of them is blocked on I/O.
    shutdown: CancellationToken,
}

impl Shared {
    pub(crate) fn new(peer: String) -> Self {
        Self {
            peer,
            state: Mutex::new(State::default()),
            shutdown: CancellationToken::new(),
        }
    }

    pub(crate) fn peer(&self) -> &str {
        &self.peer
    }

    pub(crate) fn disconnected(&self) -> QmpError {
        QmpError::Disconnected {
            peer: self.peer.clone(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the maps consistent (each
        // operation is a single insert/remove), so poisoning is ignored.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Resolves once the connection is closed.
    pub(crate) async fn closed(&self) {
        self.shutdown.cancelled().await;
    }

    /// Registers a call waiting for reply `id`; `None` if already closed.
    pub(crate) fn register(
        &self,
        id: u64,
        command: &str,
    ) -> Option<oneshot::Receiver<ReplyResult>> {
        let mut state = self.lock();
        if state.closed {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        state.pending.insert(
            id,
            Pending {
                command: command.to_owned(),
                reply: tx,
            },
        );
        Some(rx)
    }

    /// Forgets a call that stopped waiting (timeout or dropped future), so a
    /// late reply is recognised as stale.
    pub(crate) fn unregister(&self, id: u64) {
        self.lock().pending.remove(&id);
    }

    /// Hands a reply to its caller. Returns the command name, or `None` when
    /// nobody waits for this id any more (it timed out).
    pub(crate) fn complete(
        &self,
        id: u64,
        outcome: Result<Value, super::wire::QemuFault>,
    ) -> Option<String> {
        let pending = self.lock().pending.remove(&id)?;
        let result = outcome.map_err(|fault| QmpError::Qemu {
            command: pending.command.clone(),
            class: fault.class,
            desc: fault.desc,
        });
        // The receiver may have been dropped between our removal and now;
        // that is the same as a timeout and needs no handling.
        let _ = pending.reply.send(result);
        Some(pending.command)
    }

    /// Delivers an event to every live subscriber, pruning dropped ones.
    pub(crate) fn publish(&self, event: &Event) {
        self.lock()
            .subscribers
            .retain(|tx| tx.send(event.clone()).is_ok());
    }

    /// New subscriber. After close the returned receiver is already
    /// finished, so `recv` yields `None` instead of hanging.
    pub(crate) fn subscribe(&self) -> mpsc::UnboundedReceiver<Event> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = self.lock();
        if !state.closed {
            state.subscribers.push(tx);
        }
        rx
    }

    /// Marks the connection closed, fails every pending call and ends every
    /// event stream (after they drain). Idempotent; the first reason wins.
    pub(crate) fn close(&self, reason: CloseReason) {
        let (pending, subscribers) = {
            let mut state = self.lock();
            if state.closed {
                return;
            }
            state.closed = true;
            (
                std::mem::take(&mut state.pending),
                std::mem::take(&mut state.subscribers),
            )
        };
        match &reason {
            CloseReason::Local => {
                tracing::debug!(peer = %self.peer, "QMP connection closed locally")
            }
            CloseReason::PeerClosed => {
                tracing::info!(peer = %self.peer, "QMP peer closed the connection")
            }
            CloseReason::Protocol(detail) => {
                tracing::warn!(peer = %self.peer, %detail, "closing QMP connection: protocol error")
            }
            CloseReason::Io(e) => {
                tracing::warn!(peer = %self.peer, error = %e, "closing QMP connection: I/O error")
            }
        }
        drop(subscribers);
        for (_, p) in pending {
            let _ = p.reply.send(Err(self.error_for(&reason)));
        }
        self.shutdown.cancel();
    }

    fn error_for(&self, reason: &CloseReason) -> QmpError {
        let peer = self.peer.clone();
        match reason {
            CloseReason::PeerClosed | CloseReason::Local => QmpError::Disconnected { peer },
            CloseReason::Protocol(detail) => QmpError::Protocol {
                peer,
                detail: detail.clone(),
            },
            // io::Error is not Clone; every waiter gets an equivalent copy.
            CloseReason::Io(e) => QmpError::Io {
                peer,
                source: std::io::Error::new(e.kind(), e.to_string()),
            },
        }
    }
}

/// I/O error kinds that mean "the peer went away" rather than a local fault.
pub(crate) fn is_disconnect(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        kind,
        BrokenPipe | ConnectionReset | ConnectionAborted | NotConnected | UnexpectedEof
    )
}

/// Close reason for an I/O error.
pub(crate) fn io_reason(e: std::io::Error) -> CloseReason {
    if is_disconnect(e.kind()) {
        CloseReason::PeerClosed
    } else {
        CloseReason::Io(e)
    }
}
