//! The record of every message QEMU sent, in order, as the shim saw it.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::policy::Disposition;
use crate::wire::{self, Header, req};

/// One front-end message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEntry {
    /// Since the connection was accepted.
    pub at: Duration,
    /// Request code.
    pub request: u32,
    /// Header flags.
    pub flags: u32,
    /// File descriptors that came with it.
    pub fds: usize,
    /// The payload's gist: vring index and number, features, log size.
    pub detail: String,
    /// What the shim did with it.
    pub disposition: Disposition,
}

impl TraceEntry {
    /// The entry of a message, forwarded unless told otherwise.
    pub fn of(header: &Header, payload: &[u8], fds: usize, at: Duration) -> Self {
        let detail = match header.request {
            req::SET_VRING_NUM
            | req::SET_VRING_BASE
            | req::GET_VRING_BASE
            | req::SET_VRING_ENABLE => {
                wire::payload_vring_state(payload).map(|(i, n)| format!("ring={i} num={n}"))
            }
            req::SET_VRING_KICK | req::SET_VRING_CALL | req::SET_VRING_ERR => {
                wire::payload_vring_fd_index(payload).map(|i| format!("ring={i}"))
            }
            req::SET_VRING_ADDR => (payload.len() >= 8).then(|| {
                let index = u32::from_le_bytes(payload[0..4].try_into().unwrap_or_default());
                let flags = u32::from_le_bytes(payload[4..8].try_into().unwrap_or_default());
                format!("ring={index} log={}", flags & 1)
            }),
            req::SET_FEATURES | req::SET_PROTOCOL_FEATURES => wire::payload_u64(payload).map(|f| {
                let mut s = format!("{f:#x}");
                if f & wire::F_LOG_ALL != 0 {
                    s.push_str(" LOG_ALL");
                }
                s
            }),
            req::SET_LOG_BASE => (payload.len() == 16).then(|| {
                format!(
                    "size={}",
                    u64::from_le_bytes(payload[0..8].try_into().unwrap_or_default())
                )
            }),
            req::SET_MEM_TABLE => (payload.len() >= 4).then(|| {
                format!(
                    "regions={}",
                    u32::from_le_bytes(payload[0..4].try_into().unwrap_or_default())
                )
            }),
            _ => None,
        }
        .unwrap_or_default();
        TraceEntry {
            at,
            request: header.request,
            flags: header.flags,
            fds,
            detail,
            disposition: Disposition::Forwarded,
        }
    }

    /// The request's name.
    pub fn name(&self) -> &'static str {
        wire::request_name(self.request)
    }

    /// One line: `<µs> <NAME> <detail> [held|dropped]`.
    pub fn line(&self) -> String {
        let mut s = format!("{:>10} {}", self.at.as_micros(), self.name());
        if !self.detail.is_empty() {
            let _ = write!(s, " {}", self.detail);
        }
        match self.disposition {
            Disposition::Forwarded => {}
            Disposition::Held => s.push_str(" [held]"),
        }
        s
    }
}

/// Shared, append-only; optionally mirrored line by line into a file.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    entries: Arc<Mutex<Vec<TraceEntry>>>,
    sink: Option<Arc<Mutex<std::fs::File>>>,
}

impl Trace {
    /// A trace kept in memory only.
    pub fn new() -> Self {
        Self::default()
    }

    /// A trace that also appends each line to `file` as it happens.
    pub fn with_file(file: std::fs::File) -> Self {
        Trace {
            entries: Arc::default(),
            sink: Some(Arc::new(Mutex::new(file))),
        }
    }

    /// Appends an entry.
    pub fn push(&self, entry: TraceEntry) {
        if let Some(sink) = &self.sink {
            let mut f = sink.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(f, "{}", entry.line());
            let _ = f.flush();
        }
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(entry);
    }

    /// Everything so far.
    pub fn entries(&self) -> Vec<TraceEntry> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
