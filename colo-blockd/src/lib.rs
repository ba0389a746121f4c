//! colo-blockd: the NBD server of colo, which keeps the secondary's disk
//! replica with buffered epochs.
//!
//! * [`cli`]: the daemon's command line.
//! * [`proto`]: the NBD wire protocol, pure (parsing of untrusted bytes,
//!   encoding of replies).
//! * [`backend`]: the storage behind an export ([`backend::BlockBackend`]),
//!   with a raw-file implementation.
//! * [`export`]: named exports and what clients see of them.
//! * [`server`]: the async server on Unix and TCP sockets.
//! * [`replica`]: the secondary's disk replica (base image, PVM log, SVM
//!   overlay, journaled commit per checkpoint) and its two views.
//! * [`daemon`]: the secondary daemon's wiring to the relay's epoch events
//!   and the primary's QMP (checkpoint requests), and its `/metrics`
//!   endpoint.
//! * [`metrics`]: counters, gauges and the commit-time histogram, rendered
//!   in the Prometheus text format.
//!
//! What the server speaks (fixed-newstyle NBD):
//!
//! * options `GO`, `INFO` (export size and flags, block sizes, name and
//!   description on request), `LIST`, `ABORT`, `EXPORT_NAME` (with or without
//!   the 124 zero bytes), `STRUCTURED_REPLY`; every other option, including
//!   `STARTTLS`, meta contexts and extended headers, gets `NBD_REP_ERR_UNSUP`;
//! * commands `READ`, `WRITE`, `FLUSH`, `TRIM`, `WRITE_ZEROES` (`NO_HOLE`,
//!   `FAST_ZERO`), `DISC`, with `FUA`; simple or structured replies; `CACHE`,
//!   `BLOCK_STATUS` and unknown commands get `EINVAL`;
//! * up to [`server::DEFAULT_MAX_IN_FLIGHT`] requests and
//!   [`server::DEFAULT_MAX_IN_FLIGHT_BYTES`] of data in flight per
//!   connection, replies in completion order.
//!
//! Serving a raw image on a Unix socket:
//!
//! ```no_run
//! use colo_blockd::backend::FileBackend;
//! use colo_blockd::export::{Export, ExportSet};
//! use colo_blockd::server::{NbdServer, ServerConfig};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn demo() -> anyhow::Result<()> {
//! let backend = FileBackend::open("disk.raw".as_ref(), false)?;
//! let exports = ExportSet::new(vec![Export::new("disk", backend)])?;
//! let server = NbdServer::new(exports, ServerConfig::default());
//! let listener = tokio::net::UnixListener::bind("/run/colo/blockd.sock")?;
//! server.serve_unix(listener, CancellationToken::new()).await;
//! # Ok(())
//! # }
//! ```

pub mod backend;
pub mod cli;
pub mod daemon;
pub mod export;
pub mod metrics;
pub mod proto;
pub mod replica;
pub mod server;
