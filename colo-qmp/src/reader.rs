//! The reader task: owns the read half and dispatches every line.

use super::codec::{LineCodec, LineError};
use super::state::{CloseReason, Shared, io_reason};
use super::wire::{Incoming, classify};
use futures_util::StreamExt;
use std::sync::Arc;
use tokio::io::AsyncRead;
use tokio_util::codec::FramedRead;

/// Reads until EOF, an unrecoverable error, or local shutdown, then closes
/// the shared state so every waiter is released.
pub(crate) async fn run<R: AsyncRead + Unpin>(
    mut lines: FramedRead<R, LineCodec>,
    shared: Arc<Shared>,
) {
    let reason = loop {
        let next = tokio::select! {
            biased;
            () = shared.closed() => break CloseReason::Local,
            next = lines.next() => next,
        };
        match next {
            Some(Ok(line)) => dispatch(&shared, &line),
            None => break CloseReason::PeerClosed,
            Some(Err(LineError::TooLong { limit })) => {
                break CloseReason::Protocol(format!("line longer than {limit} bytes"));
            }
            Some(Err(LineError::Truncated { bytes })) => {
                tracing::debug!(peer = shared.peer(), bytes, "QMP peer closed mid-line");
                break CloseReason::PeerClosed;
            }
            Some(Err(LineError::Io(e))) => break io_reason(e),
        }
    };
    shared.close(reason);
}

fn dispatch(shared: &Shared, line: &[u8]) {
    // Blank lines carry nothing and are not worth a warning.
    if line.iter().all(u8::is_ascii_whitespace) {
        return;
    }
    match classify(line) {
        Incoming::Reply { id, outcome } => {
            let ok = outcome.is_ok();
            match shared.complete(id, outcome) {
                Some(command) => {
                    tracing::debug!(peer = shared.peer(), %command, id, ok, "QMP reply")
                }
                None => tracing::debug!(
                    peer = shared.peer(),
                    id,
                    "dropping QMP reply nobody waits for (timed out)"
                ),
            }
        }
        Incoming::Event(event) => {
            tracing::debug!(peer = shared.peer(), event = %event.name, "QMP event");
            shared.publish(&event);
        }
        Incoming::Skip(why) => {
            let shown = &line[..line.len().min(256)];
            tracing::warn!(
                peer = shared.peer(),
                reason = %why,
                line = %String::from_utf8_lossy(shown),
                "skipping unrecognised QMP line"
            );
        }
    }
}
