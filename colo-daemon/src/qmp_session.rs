//! [`QmpSession`]: a daemon's own QMP connection to its QEMU, opened on first use and again
//! after a failure.

use std::sync::Arc;
use std::time::Duration;

use colo_qmp::{ConnectOptions, QmpClient};
use colo_types::Address;
use tokio::sync::Mutex;

/// How long one QMP command of a daemon may take before the session is dropped and reopened.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// A QMP connection shared by a daemon's tasks (checkpoint requests, the fail-open check,
/// re-creating filters). QEMU's monitor serves one client at a time, so a daemon should have a
/// monitor of its own (`-qmp`) rather than share the operator's.
#[derive(Debug, Clone)]
pub struct QmpSession {
    address: Address,
    client: Arc<Mutex<Option<QmpClient>>>,
}

impl QmpSession {
    /// A session with the monitor at `address` (not connected yet).
    pub fn new(address: Address) -> Self {
        QmpSession {
            address,
            client: Arc::new(Mutex::new(None)),
        }
    }

    /// The monitor's address.
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// Runs `f` with a connected client; a failure drops the connection so the next call
    /// reconnects.
    pub async fn with_client<T, F, Fut>(&self, f: F) -> Result<T, String>
    where
        F: FnOnce(QmpClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, String>>,
    {
        let mut guard = self.client.lock().await;
        let client = match guard.as_ref() {
            Some(c) if c.is_connected() => c.clone(),
            _ => {
                let opts = ConnectOptions {
                    command_timeout: COMMAND_TIMEOUT,
                    ..ConnectOptions::default()
                };
                let c = QmpClient::connect_to(&self.address, opts)
                    .await
                    .map_err(|e| format!("cannot connect to QMP at {}: {e}", self.address))?;
                *guard = Some(c.clone());
                c
            }
        };
        let r = f(client).await;
        if r.is_err() {
            *guard = None;
        }
        r
    }
}
