//! Per-subscriber event streams.

use super::error::{QmpError, Result};
use super::types::Event;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout_at};

/// Events from one [`crate::QmpClient::subscribe`] call, in arrival
/// order. Unbounded so a slow consumer never makes the reader drop events
/// or stall replies for everyone else.
#[derive(Debug)]
pub struct EventStream {
    rx: mpsc::UnboundedReceiver<Event>,
    peer: String,
}

impl EventStream {
    pub(crate) fn new(rx: mpsc::UnboundedReceiver<Event>, peer: String) -> Self {
        Self { rx, peer }
    }

    /// Next event; `None` once the connection is gone and every buffered
    /// event has been returned.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// Next buffered event without waiting; `None` if there is none right
    /// now (or the stream has ended).
    pub fn try_recv(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }

    /// Waits for the next event called `name`, consuming (and discarding)
    /// any other events before it. Fails with [`QmpError::Timeout`] (its
    /// `command` is `event NAME`) or, if the connection ends first,
    /// [`QmpError::Disconnected`]. Events already buffered before the
    /// connection closed are still searched.
    pub async fn wait_for(&mut self, name: &str, timeout: Duration) -> Result<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            match timeout_at(deadline, self.rx.recv()).await {
                Err(_) => {
                    return Err(QmpError::Timeout {
                        peer: self.peer.clone(),
                        command: format!("event {name}"),
                        after: timeout,
                    });
                }
                Ok(None) => {
                    return Err(QmpError::Disconnected {
                        peer: self.peer.clone(),
                    });
                }
                Ok(Some(event)) if event.name == name => return Ok(event),
                Ok(Some(event)) => {
                    tracing::trace!(wanted = name, got = %event.name, "skipping event");
                }
            }
        }
    }
}
