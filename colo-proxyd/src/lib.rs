//! colo-proxyd's pure core: no sockets, no clocks, no threads — bytes in, decisions out.
//!
//! Data flows one way through the modules: [`codec`] cuts a net-filter socket's byte stream into
//! frames, [`packet`] reads the headers of each frame into a borrowed view, and [`compare`]
//! decides per TCP connection which of the primary's packets may be released and when a
//! checkpoint is needed, and [`engine`] routes every frame to the comparator of its flow and
//! watches the bounds across flows; on the secondary, [`rewrite`] shifts the sequence numbers of
//! connections the SVM opened with another ISN. None of them knows which attachment (net-filter sockets or
//! vhost-user) delivered the bytes.

#![warn(missing_docs)]

pub mod codec;
pub mod compare;
pub mod engine;
pub mod packet;
pub mod rewrite;
