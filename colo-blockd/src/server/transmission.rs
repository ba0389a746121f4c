//! The transmission phase of one connection: a reader that decodes and
//! checks requests, one task per request (at most `max_in_flight` at once),
//! and one writer that sends replies in completion order. Replies may
//! overtake each other; the client matches them by handle.
//!
//! Memory per connection is bounded: at most `max_in_flight` requests are
//! read ahead (a slot is taken before each read), their data (read results
//! and write payloads) by `max_in_flight_bytes` until their replies are
//! written, one write payload being read (at most the export's maximum
//! block size, checked from the header before the payload is buffered), the
//! read buffer and the write buffer. A client that stops reading its
//! replies fills those bounds and then stalls only itself; after
//! `write_timeout` without the socket taking a byte it is dropped.

use colo_daemon::RateLimited;
use std::future::Future;
use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Sleep;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::{ServeError, ServerConfig};
use crate::backend::BlockBackend;
use crate::export::Export;
use crate::metrics::{ExportMetrics, NbdCommand};
use crate::proto::consts::cmd;
use crate::proto::request::validate;
use crate::proto::{Command, NbdErrno, ProtoError, RawRequest, Reply, ReplyStyle, RequestDecoder};

/// How long a shutting-down connection may take to deliver the replies of
/// the requests it had accepted.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Bytes the writer gathers before it flushes on its own; smaller batches
/// are flushed as soon as no further reply is ready.
const WRITE_BUFFER: usize = 256 * 1024;

/// Initial capacity of a connection's request buffer. Write payloads are
/// split off it without copying; a buffer several requests large lets one
/// read take in several of them and keeps the allocation for the next ones
/// (the default 8 KiB meant a fresh allocation, and more reads, per 64 KiB
/// write).
const READ_BUFFER: usize = 1024 * 1024;

/// A reply on its way to the socket, with the request's share of the
/// connection's limits: they are given back only once the reply is written,
/// so replies waiting for a slow client count against the limits too.
#[derive(Debug)]
struct Queued {
    reply: Reply,
    _slot: Option<OwnedSemaphorePermit>,
    _bytes: Option<OwnedSemaphorePermit>,
}

impl Queued {
    fn bare(reply: Reply) -> Queued {
        Queued {
            reply,
            _slot: None,
            _bytes: None,
        }
    }
}

pub(crate) async fn transmit<S, B>(
    stream: S,
    export: Arc<Export<B>>,
    counters: Arc<ExportMetrics>,
    style: ReplyStyle,
    config: ServerConfig,
    shutdown: &CancellationToken,
) -> Result<(), ServeError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    B: BlockBackend,
{
    let max_in_flight = config.max_in_flight.max(1);
    // A request moving more bytes than the whole budget takes all of it.
    let byte_budget = u32::try_from(config.max_in_flight_bytes.max(1)).unwrap_or(u32::MAX);
    let (rd, wr) = tokio::io::split(stream);
    let (replies, queue) = mpsc::channel::<Queued>(max_in_flight);
    let write_timeout = config.write_timeout;
    let writer = tokio::spawn(write_replies(Stalling::new(wr, write_timeout), queue));
    let mut requests = FramedRead::with_capacity(
        rd,
        RequestDecoder::new(export.block_sizes().maximum),
        READ_BUFFER,
    );
    let slots = Arc::new(Semaphore::new(max_in_flight));
    let bytes = Arc::new(Semaphore::new(byte_budget as usize));
    let limits = export.limits();
    let mut running = JoinSet::new();

    let outcome: Result<(), ServeError> = loop {
        // A slot before reading: a client cannot make the server buffer
        // more than `max_in_flight` requests.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            break Ok(());
        };
        while running.try_join_next().is_some() {}
        let next = tokio::select! {
            // Shutdown first: a client that keeps sending must not keep a
            // stopping server reading.
            biased;
            () = shutdown.cancelled() => break Ok(()),
            // The writer ended (the client stopped reading or vanished).
            () = replies.closed() => break Ok(()),
            next = requests.next() => next,
        };
        let raw = match next {
            None => break Ok(()),
            Some(Ok(raw)) => raw,
            Some(Err(ProtoError::PayloadTooLarge { handle, length })) => {
                // Answer, then close: the payload cannot be skipped unread.
                let msg = format!("write of {length} bytes exceeds the maximum block size");
                let reply = Reply::error(style, handle, NbdErrno::Inval, &msg);
                counters.request(NbdCommand::Write, false, 0);
                let _ = replies.send(Queued::bare(reply)).await;
                break Err(ProtoError::PayloadTooLarge { handle, length }.into());
            }
            Some(Err(e)) => break Err(e.into()),
        };
        match validate(&raw.header, &limits) {
            Ok(Command::Disconnect) => break Ok(()),
            Ok(command) => {
                // Read data and write payloads are bounded by bytes too:
                // 32 slots of 32 MiB each would be a gigabyte per client.
                let moved = match command {
                    Command::Read { length, .. } => length,
                    Command::Write { .. } => raw.payload.len() as u32,
                    _ => 0,
                };
                let bytes = if moved == 0 {
                    None
                } else {
                    let Ok(permit) = Arc::clone(&bytes)
                        .acquire_many_owned(moved.min(byte_budget))
                        .await
                    else {
                        break Ok(());
                    };
                    Some(permit)
                };
                let export = Arc::clone(&export);
                let counters = Arc::clone(&counters);
                let replies = replies.clone();
                running.spawn(async move {
                    let handle = raw.header.handle;
                    let counted = counted_as(&command);
                    // A panicking backend must not leave the client waiting
                    // for a reply forever: it gets EIO like any failure.
                    let reply = AssertUnwindSafe(execute(&export, &counters, command, raw, style))
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|_| {
                            tracing::error!(export = export.name(), handle, "backend panicked");
                            counters.request(counted, false, 0);
                            Reply::error(style, handle, NbdErrno::Io, "internal error")
                        });
                    // A closed channel means the client is gone; nobody
                    // is left to tell.
                    let _ = replies
                        .send(Queued {
                            reply,
                            _slot: Some(slot),
                            _bytes: bytes,
                        })
                        .await;
                });
            }
            Err(errno) => {
                tracing::debug!(handle = raw.header.handle, command = raw.header.command, %errno, "request refused");
                let msg = refusal_message(errno);
                counters.request(counted_as_raw(raw.header.command), false, 0);
                let reply = Reply::error(style, raw.header.handle, errno, msg);
                let _ = replies.send(Queued::bare(reply)).await;
            }
        }
    };
    // Requests already accepted finish (their writes land and their replies
    // go out) before the connection closes.
    let mut writer = writer;
    let drain = async {
        while running.join_next().await.is_some() {}
        drop(replies);
        (&mut writer).await
    };
    let written = if shutdown.is_cancelled() {
        // At shutdown a client that stopped reading must not hold the
        // server: past the grace period its replies are dropped (the
        // backend operations themselves have finished or run to their end
        // on the blocking pool).
        match tokio::time::timeout(SHUTDOWN_GRACE, drain).await {
            Ok(written) => written,
            Err(_) => {
                writer.abort();
                return Err(ServeError::ShutdownGraceExpired(SHUTDOWN_GRACE));
            }
        }
    } else {
        drain.await
    };
    let written = written.map_err(std::io::Error::other)?;
    if let Err(e) = &written
        && stalled(e)
    {
        return Err(ServeError::WriteTimeout(write_timeout));
    }
    outcome?;
    written.map_err(ServeError::from)
}

/// A writer that fails with [`io::ErrorKind::TimedOut`] once the socket has
/// taken no byte for `limit` while a write, flush or shutdown waited on it:
/// the client stopped reading (its receive window is full). Any progress
/// restarts the clock, so a long reply on a slow but moving link is fine.
#[derive(Debug)]
struct Stalling<W> {
    inner: W,
    limit: Duration,
    /// Armed by the first `Pending`, cleared by any completed call.
    deadline: Option<Pin<Box<Sleep>>>,
}

/// The error [`Stalling`] ends with, told apart from a socket's own
/// `ETIMEDOUT` (`TCP_USER_TIMEOUT`, a dead peer).
#[derive(Debug, thiserror::Error)]
#[error("no reply data taken for {0:?}")]
struct Stalled(Duration);

/// Whether `e` is a [`Stalling`] writer's timeout.
fn stalled(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Stalled>())
}

impl<W> Stalling<W> {
    fn new(inner: W, limit: Duration) -> Stalling<W> {
        Stalling {
            inner,
            limit,
            deadline: None,
        }
    }

    /// Passes a completed call through (and disarms the clock), or arms the
    /// clock for a pending one and fails once it has run out.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.deadline = None;
            return polled;
        }
        let limit = self.limit;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, Stalled(limit))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Stalling<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, polled)
    }
}

async fn execute<B: BlockBackend>(
    export: &Export<B>,
    counters: &ExportMetrics,
    command: Command,
    raw: RawRequest,
    style: ReplyStyle,
) -> Reply {
    let backend = export.backend();
    let handle = raw.header.handle;
    let counted = counted_as(&command);
    let mut moved = 0;
    let result = match command {
        Command::Read { offset, length } => match backend.read_at(offset, length).await {
            Ok(data) => {
                counters.request(counted, true, data.len() as u64);
                return Reply::read(style, handle, offset, data);
            }
            Err(e) => Err(e),
        },
        Command::Write { offset, fua } => {
            moved = raw.payload.len() as u64;
            backend.write_at(offset, raw.payload, fua).await
        }
        Command::Flush => backend.flush().await,
        Command::Trim {
            offset,
            length,
            fua,
        } => backend.trim(offset, length, fua).await,
        Command::WriteZeroes {
            offset,
            length,
            fua,
            mode,
        } => backend.write_zeroes(offset, length, fua, mode).await,
        // Handled by the reader; never spawned.
        Command::Disconnect => Ok(()),
    };
    counters.request(counted, result.is_ok(), moved);
    match result {
        Ok(()) => Reply::done(style, handle),
        Err(e) => {
            let errno = NbdErrno::from_io(&e);
            // ENOTSUP for FAST_ZERO is an answer, not a fault.
            // Per request: a failing disk fails every request; one line a second at most, with
            // the count of the ones it stands for.
            static LOG: RateLimited = RateLimited::new(std::time::Duration::from_secs(1));
            if errno != NbdErrno::NotSup
                && let Some(suppressed) = LOG.allow()
            {
                tracing::warn!(export = export.name(), handle, error = %e, suppressed, "backend failed");
            }
            Reply::error(style, handle, errno, &e.to_string())
        }
    }
}

/// The metrics' name of a command.
fn counted_as(command: &Command) -> NbdCommand {
    match command {
        Command::Read { .. } => NbdCommand::Read,
        Command::Write { .. } => NbdCommand::Write,
        Command::Flush => NbdCommand::Flush,
        Command::Trim { .. } => NbdCommand::Trim,
        Command::WriteZeroes { .. } => NbdCommand::WriteZeroes,
        Command::Disconnect => NbdCommand::Other,
    }
}

/// The metrics' name of a command type that was refused.
fn counted_as_raw(command: u16) -> NbdCommand {
    match command {
        cmd::READ => NbdCommand::Read,
        cmd::WRITE => NbdCommand::Write,
        cmd::FLUSH => NbdCommand::Flush,
        cmd::TRIM => NbdCommand::Trim,
        cmd::WRITE_ZEROES => NbdCommand::WriteZeroes,
        _ => NbdCommand::Other,
    }
}

fn refusal_message(errno: NbdErrno) -> &'static str {
    match errno {
        NbdErrno::Perm => "export is read-only",
        NbdErrno::NoSpc => "write beyond the end of the export",
        _ => "invalid request (command, flags, range or length)",
    }
}

async fn write_replies<W: AsyncWrite + Unpin>(
    wr: W,
    mut queue: mpsc::Receiver<Queued>,
) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(WRITE_BUFFER, wr);
    while let Some(queued) = queue.recv().await {
        write_reply(&mut out, &queued.reply).await?;
        // Batch replies that are already waiting into one flush.
        while let Ok(queued) = queue.try_recv() {
            write_reply(&mut out, &queued.reply).await?;
        }
        out.flush().await?;
    }
    out.shutdown().await
}

async fn write_reply<W: AsyncWrite + Unpin>(
    out: &mut BufWriter<W>,
    reply: &Reply,
) -> std::io::Result<()> {
    out.write_all(&reply.head).await?;
    out.write_all(&reply.data).await
}
