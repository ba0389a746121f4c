//! The record of every message QEMU sent, in order, as the shim saw it: each line goes to the
//! operator's file (`colo-vhost-net --trace FILE`) as it happens; memory keeps only the newest
//! [`MAX_KEPT`] entries, because a protected VM stops and starts its device at every checkpoint
//! (some 20 messages each) for as long as it runs.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::policy::Disposition;
use crate::wire::{self, FLAG_NEED_REPLY, Header, req};

/// The most entries a [`Trace`] keeps in memory (the newest); the file gets every one.
pub const MAX_KEPT: usize = 4096;

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

    /// One line: `<µs> <NAME> <detail> [need-reply] [held]`; `need-reply` when QEMU asked
    /// for an acknowledgement (`REPLY_ACK`), `[held]` last.
    pub fn line(&self) -> String {
        let mut s = format!("{:>10} {}", self.at.as_micros(), self.name());
        if !self.detail.is_empty() {
            let _ = write!(s, " {}", self.detail);
        }
        if self.flags & FLAG_NEED_REPLY != 0 {
            s.push_str(" need-reply");
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
    kept: Arc<Mutex<Kept>>,
    sink: Option<Arc<Mutex<std::fs::File>>>,
}

/// The newest entries and how many there were in all.
#[derive(Debug, Default)]
struct Kept {
    entries: VecDeque<TraceEntry>,
    total: u64,
}

impl Trace {
    /// A trace kept in memory only.
    pub fn new() -> Self {
        Self::default()
    }

    /// A trace that also appends each line to `file` as it happens.
    pub fn with_file(file: std::fs::File) -> Self {
        Trace {
            kept: Arc::default(),
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
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if kept.entries.len() == MAX_KEPT {
            kept.entries.pop_front();
        }
        kept.entries.push_back(entry);
        kept.total += 1;
    }

    /// The newest entries (at most [`MAX_KEPT`]), oldest first.
    pub fn entries(&self) -> Vec<TraceEntry> {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.entries.iter().cloned().collect()
    }

    /// How many entries were pushed in all.
    pub fn total(&self) -> u64 {
        self.kept.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enable(flags: u32) -> TraceEntry {
        let header = Header {
            request: req::SET_VRING_ENABLE,
            flags,
            size: 8,
        };
        let mut payload = 1u32.to_le_bytes().to_vec();
        payload.extend_from_slice(&1u32.to_le_bytes());
        TraceEntry::of(&header, &payload, 0, Duration::from_micros(29887))
    }

    #[test]
    fn a_line_names_the_request_its_gist_the_ack_request_and_the_hold() {
        assert_eq!(enable(1).line(), "     29887 SET_VRING_ENABLE ring=1 num=1");
        let mut held = enable(1 | FLAG_NEED_REPLY);
        held.disposition = Disposition::Held;
        assert_eq!(
            held.line(),
            "     29887 SET_VRING_ENABLE ring=1 num=1 need-reply [held]"
        );
    }

    #[test]
    fn memory_keeps_the_newest_entries_and_the_file_gets_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.txt");
        let trace = Trace::with_file(std::fs::File::create(&path).unwrap());
        for i in 0..MAX_KEPT as u64 + 10 {
            let mut e = enable(1);
            e.at = Duration::from_micros(i);
            trace.push(e);
        }
        assert_eq!(trace.total(), MAX_KEPT as u64 + 10);
        let entries = trace.entries();
        assert_eq!(entries.len(), MAX_KEPT);
        assert_eq!(entries[0].at, Duration::from_micros(10));
        let file = std::fs::read_to_string(&path).unwrap();
        assert_eq!(file.lines().count(), MAX_KEPT + 10);
        assert!(
            file.lines()
                .next()
                .unwrap()
                .ends_with(" 0 SET_VRING_ENABLE ring=1 num=1")
        );
    }
}
