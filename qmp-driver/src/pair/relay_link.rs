//! The operator side of the relay's control socket, through `colo-control`.
//! Every call here is best effort for the callers: COLO runs without the
//! relay, so an unreachable relay is reported, never fatal.

use colo_control::client::{ClientOptions, ControlError, Operator};
use colo_types::Role;
use std::path::Path;
use std::time::Duration;

pub use colo_control::protocol::RelayStatus;

/// Bound of a notification (failover, checkpoint reason): a dead relay must
/// not slow a failover down.
pub(crate) const NOTIFY_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound of a status query.
pub(crate) const STATUS_TIMEOUT: Duration = Duration::from_secs(3);

/// `hello` name of this tool on the control socket.
const NAME: &str = "qmp-driver";

async fn operator(path: &Path, timeout: Duration) -> Result<Operator, ControlError> {
    Operator::connect_with(path, NAME, &ClientOptions { timeout }).await
}

/// The relay's status.
pub(crate) async fn query_status(
    path: &Path,
    timeout: Duration,
) -> Result<RelayStatus, ControlError> {
    operator(path, timeout).await?.status().await
}

/// Announces a failover decision (the relay broadcasts it to its
/// subscribers).
pub(crate) async fn notify_failover(
    path: &Path,
    survivor: Role,
    timeout: Duration,
) -> Result<(), ControlError> {
    operator(path, timeout).await?.failover(survivor).await
}

/// Notes why a checkpoint was requested (counted in the relay's status).
pub(crate) async fn note_checkpoint_request(
    path: &Path,
    reason: &str,
    timeout: Duration,
) -> Result<(), ControlError> {
    operator(path, timeout)
        .await?
        .checkpoint_requested(reason)
        .await
}
