//! What colo-proxyd asks checkpoints for: the label of each [`CheckpointReason`] (metrics,
//! logs, and prefixed with `proxy-` the relay's status), and its metrics as the requester's
//! [`RequestObserver`]. The requester itself, with its policy (checked, coalesced, rate
//! limited, retried), is colo-daemon's [`colo_daemon::checkpoint::CheckpointRequester`].

use colo_daemon::checkpoint::RequestObserver;

use super::metrics::Metrics;
use crate::compare::CheckpointReason;

/// The prefix of colo-proxyd's reasons in the relay's status.
pub const RELAY_PREFIX: &str = "proxy-";

/// The label of a reason in metrics and logs, and (prefixed with `proxy-`) to the relay.
pub fn reason_label(reason: &CheckpointReason) -> &'static str {
    match reason {
        CheckpointReason::PayloadDiffers { .. } => "payload-differs",
        CheckpointReason::SynDiffers => "syn-differs",
        CheckpointReason::FinDiffers => "fin-differs",
        CheckpointReason::SegmentBeforeSyn => "segment-before-syn",
        CheckpointReason::MemoryBound { .. } => "connection-memory-bound",
        CheckpointReason::DatagramsDiffer => "datagrams-differ",
        CheckpointReason::HoldTimeout => "hold-timeout",
        CheckpointReason::HoldLimit => "hold-limit",
        CheckpointReason::HandshakeHold => "handshake-hold",
        CheckpointReason::TotalMemoryBound { .. } => "total-memory-bound",
        CheckpointReason::FlowTableFull { .. } => "flow-table-full",
        CheckpointReason::SvmOutputLost => "svm-output-lost",
    }
}

impl RequestObserver for Metrics {
    fn requested(&self, reason: &'static str) {
        self.checkpoint_requested(reason);
    }

    fn failed(&self, _reason: &'static str) {
        // Counted as needed, not requested: `checkpoints_needed_total` minus
        // `checkpoints_requested_total` shows what QMP did not take.
    }
}
