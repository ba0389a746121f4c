//! The writer task: owns the write half so every command reaches the wire
//! whole, even if the caller that queued it is cancelled mid-write.

use super::state::{Shared, io_reason};
use std::sync::Arc;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// One serialised command line plus an acknowledgement fired once it has
/// been written and flushed. The acknowledgement lets `quit` tell "sent, then
/// QEMU hung up" (success) from "never sent" (failure).
pub(crate) struct Outgoing {
    pub(crate) bytes: Vec<u8>,
    pub(crate) written: oneshot::Sender<()>,
}

/// Writes queued lines until the queue closes (all client handles dropped),
/// the connection closes, or a write fails (which closes the connection).
pub(crate) async fn run<W: AsyncWrite + Unpin>(
    mut write: W,
    mut queue: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<Shared>,
) {
    loop {
        let msg = tokio::select! {
            biased;
            () = shared.closed() => return,
            msg = queue.recv() => match msg {
                Some(msg) => msg,
                None => return,
            },
        };
        let result = tokio::select! {
            // A peer that stops reading must not pin this task forever once
            // the reader has noticed the connection is gone.
            () = shared.closed() => return,
            r = async {
                write.write_all(&msg.bytes).await?;
                write.flush().await
            } => r,
        };
        match result {
            Ok(()) => {
                let _ = msg.written.send(());
            }
            Err(e) => {
                shared.close(io_reason(e));
                return;
            }
        }
    }
}
