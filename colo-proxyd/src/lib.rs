//! colo-proxyd: a pure comparison core and the daemon around it.
//!
//! The core has no sockets, no clocks, no threads — bytes in, decisions out. Data flows one way
//! through its modules: [`codec`] cuts a net-filter socket's byte stream into frames,
//! [`packet`] reads the headers of each frame into a borrowed view, [`compare`] decides per TCP
//! connection which of the primary's packets may be released and when a checkpoint is needed,
//! and [`engine`] routes every frame to the comparator of its flow and watches the bounds
//! across flows; on the secondary, [`rewrite`] shifts the sequence numbers of connections the
//! SVM opened with another ISN. None of them knows which attachment (net-filter sockets or
//! vhost-user) delivered the bytes.
//!
//! [`daemon`] is the only module with I/O ([`cli`] is its command line): the filter-mode daemon (`colo-proxyd primary` and
//! `colo-proxyd secondary`) with its sockets, the inter-host link, the relay's epoch events,
//! QMP checkpoint requests and metrics.

#![warn(missing_docs)]

pub mod cli;
pub mod codec;
pub mod compare;
pub mod daemon;
pub mod engine;
pub mod packet;
pub mod rewrite;
#[cfg(test)]
mod test_frames;
