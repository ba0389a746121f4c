//! The filter-mode daemon around the pure core: `colo-proxyd primary` and
//! `colo-proxyd secondary`.
//!
//! Data flows one way through these modules:
//!
//! * [`attachment`]: QEMU's net-filter chardev sockets as channels of frames (the only module
//!   that knows the attachment; a vhost-user one would replace it);
//! * [`peer`] over [`link`]: the inter-host link between the two daemons
//!   (`docs/proxyd-link.md`);
//! * [`epochs`]: the relay's epoch events, acknowledged only when the role loop is done;
//! * [`gate`] (primary) and [`svm_path`] (secondary): the role logic, pure;
//! * [`primary`] and [`secondary`]: the role loops that wire the above together;
//! * [`checkpoint`], [`colo_state`] and [`failopen`]: the primary's QMP side (checkpoint
//!   requests, QEMU's own COLO state, the chardev check);
//! * [`qemu_filters`]: QEMU's filters kept working over QMP (a redirector re-created when its
//!   input chardev reconnects; the guest's link down while the PVM's output has no socket);
//! * [`metrics`] and [`config`].
//!
//! Shutdown: every task stops when the [`CancellationToken`](tokio_util::sync::CancellationToken)
//! given to `run` is cancelled.

pub mod attachment;
pub mod checkpoint;
pub mod colo_state;
pub mod config;
pub mod epochs;
pub mod failopen;
pub mod gate;
pub mod link;
pub mod metrics;
pub mod peer;
pub mod peer_uid;
pub mod primary;
pub mod qemu_filters;
pub mod secondary;
pub mod svm_path;
pub mod svm_window;
pub mod vhost_net;

use std::io;

use tokio::net::TcpListener;

/// Why a daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A listening socket could not be bound.
    #[error("cannot listen for {what} on {address}: {source}")]
    Bind {
        /// What the socket is for.
        what: &'static str,
        /// The address.
        address: String,
        /// The underlying error.
        source: io::Error,
    },
}

/// Binds `address` for `what`.
pub async fn bind(what: &'static str, address: &str) -> Result<TcpListener, DaemonError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| DaemonError::Bind {
            what,
            address: address.to_owned(),
            source,
        })
}
