//! The secondary's network bridge after a failover to the secondary: QEMU's chardevs `red2`
//! (filter-redirector `f3`, queue=rx, indev: what is written there goes to the network) and
//! `red3` (`f4`, queue=tx, outdev: the network's packets, diverted from the SVM), which
//! qmp-driver adds at the failover so that the connections the SVM opened in the last epoch
//! keep working: their sequence numbers are shifted by [`SvmPath`](crate::daemon::svm_path::SvmPath)
//! on the way through this daemon.
//!
//! ```text
//!  SVM ─► red1 ─► SvmPath (out_of_svm) ─► NetworkBridge ─► red2 ─► network
//!  network ─► red3 ─► SvmPath (into_svm) ─► red0 ─► SVM
//! ```
//!
//! QEMU creates `red2` only at the failover and connects a moment later (reconnect-ms), while
//! the SVM already talks: frames for the network wait in a [`NetworkBacklog`] until it is
//! connected, instead of being dropped by the port.

use std::collections::VecDeque;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::daemon::attachment::{
    FrameSink, FrameSource, OnConnect, PortAccess, PortEndpoint, spawn_sink_prepared, spawn_source,
};
use crate::daemon::metrics::Metrics;
use crate::daemon::svm_path::FrameQueue;

/// QEMU's chardev that takes frames to the network.
pub const NET_OUTPUT_PORT: &str = "red2";
/// QEMU's chardev that hands the network's frames to the daemon.
pub const NET_INPUT_PORT: &str = "red3";

/// Frames for the network kept at most while `red2` is not connected, and their bytes;
/// beyond either, the oldest are dropped (TCP retransmits them). QEMU connects `red2` within
/// a second of the failover, so this covers that moment only.
pub const BACKLOG_FRAMES: usize = 1024;
/// See [`BACKLOG_FRAMES`].
pub const BACKLOG_BYTES: usize = 8 << 20;

/// Frames waiting for a port to connect, in order, bounded.
#[derive(Debug)]
pub struct NetworkBacklog {
    frames: FrameQueue,
    dropped: u64,
}

impl NetworkBacklog {
    /// An empty backlog of at most `limit` frames and [`BACKLOG_BYTES`] bytes.
    pub fn new(limit: usize) -> Self {
        Self::with_bytes(limit, BACKLOG_BYTES)
    }

    /// An empty backlog of at most `limit` frames and `bytes` bytes.
    pub fn with_bytes(limit: usize, bytes: usize) -> Self {
        NetworkBacklog {
            frames: FrameQueue::new(limit, bytes),
            dropped: 0,
        }
    }

    /// Keeps `frame`; returns the frames dropped so far (the oldest go first).
    pub fn hold(&mut self, frame: Vec<u8>) -> u64 {
        self.frames.push(frame, &mut self.dropped);
        self.dropped
    }

    /// Whether frames are waiting.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Frames waiting.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Frames dropped because the backlog was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Every waiting frame, oldest first.
    pub fn take(&mut self) -> VecDeque<Vec<u8>> {
        self.frames.take()
    }

    /// Bytes waiting.
    pub fn bytes(&self) -> usize {
        self.frames.bytes()
    }
}

/// The listening sockets of the bridge, bound at start (QEMU connects only after a failover).
#[derive(Debug)]
pub struct BridgeListeners {
    /// For QEMU's `red2` (to the network).
    pub net_output: TcpListener,
    /// For QEMU's `red3` (from the network).
    pub net_input: TcpListener,
}

/// The bridge's output side: `red2` and its backlog. The input side, `red3`, is a plain
/// [`FrameSource`] the role loop reads.
#[derive(Debug)]
pub struct NetworkBridge {
    to_network: FrameSink,
    backlog: NetworkBacklog,
    metrics: Metrics,
}

impl NetworkBridge {
    /// Starts both ports, serving the uids of `access` only; returns the bridge and the source
    /// of `red3`. `red2` is written to only after `on_red2_connect` ran for its connection (it
    /// re-creates `f3`, which QEMU no longer reads once an earlier connection closed).
    pub fn spawn(
        listeners: BridgeListeners,
        access: PortAccess,
        metrics: Metrics,
        shutdown: CancellationToken,
        on_red2_connect: Option<OnConnect>,
    ) -> (NetworkBridge, FrameSource) {
        let to_network = spawn_sink_prepared(
            NET_OUTPUT_PORT,
            PortEndpoint::Listen(listeners.net_output, access.clone()),
            metrics.clone(),
            shutdown.clone(),
            on_red2_connect,
        );
        let from_network = spawn_source(
            NET_INPUT_PORT,
            PortEndpoint::Listen(listeners.net_input, access),
            metrics.clone(),
            shutdown,
        );
        let bridge = NetworkBridge {
            to_network,
            backlog: NetworkBacklog::new(BACKLOG_FRAMES),
            metrics,
        };
        (bridge, from_network)
    }

    /// Sends `frame` to the network, after what waits; keeps it while `red2` is not
    /// connected.
    pub async fn send(&mut self, frame: Vec<u8>) {
        if self.flush().await {
            // A Vec becomes Bytes without a copy.
            self.to_network.send(frame.into()).await;
        } else {
            let before = self.backlog.dropped();
            if self.backlog.hold(frame) > before {
                self.metrics.dropped_frame();
                if before == 0 {
                    tracing::warn!(
                        port = NET_OUTPUT_PORT,
                        limit = BACKLOG_FRAMES,
                        "QEMU's chardev to the network is not connected and the backlog is \
                         full: dropping the oldest frames (TCP retransmits them)"
                    );
                }
            }
        }
    }

    /// Whether frames wait for `red2`.
    pub fn waiting(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Sends what waits once `red2` is connected; returns whether it is.
    pub async fn flush(&mut self) -> bool {
        // The port's task marks the port connected just before it starts writing what it is
        // given, and drops what it is given while it is not: asking first loses nothing but
        // a frame sent in the instant a connection breaks (like any frame on a broken wire).
        if !self.metrics.is_connected(NET_OUTPUT_PORT) {
            return false;
        }
        if !self.backlog.is_empty() {
            let frames = self.backlog.take();
            tracing::info!(
                port = NET_OUTPUT_PORT,
                frames = frames.len(),
                "QEMU's chardev to the network connected: sending the frames that waited"
            );
            for frame in frames {
                self.to_network.send(frame.into()).await;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_keeps_order_and_drops_the_oldest_beyond_its_limit() {
        let mut backlog = NetworkBacklog::new(3);
        for i in 0..3u8 {
            assert_eq!(backlog.hold(vec![i]), 0);
        }
        assert_eq!(backlog.hold(vec![3]), 1);
        assert_eq!(backlog.hold(vec![4]), 2);
        assert_eq!(backlog.len(), 3);
        assert_eq!(
            Vec::from(backlog.take()),
            vec![vec![2], vec![3], vec![4]],
            "the newest, in order"
        );
        assert!(backlog.is_empty());
        assert_eq!(backlog.dropped(), 2);
    }
}
