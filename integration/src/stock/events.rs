//! QMP events of each VM, recorded with QEMU's timestamps; checkpoint pauses derived from them.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use colo_qmp::{Event, EventStream};

/// Events of one VM, recorded as they arrive (also appended to `<role>-events.jsonl`).
#[derive(Debug, Clone, Default)]
pub struct EventLog(Arc<Mutex<Vec<Event>>>);

impl EventLog {
    pub(super) fn record_from(mut stream: EventStream, file: PathBuf) -> Self {
        let log = EventLog::default();
        let sink = log.clone();
        tokio::spawn(async move {
            let mut out = std::fs::File::create(&file).ok();
            while let Some(event) = stream.recv().await {
                if let (Some(f), Ok(line)) = (out.as_mut(), serde_json::to_string(&event)) {
                    use std::io::Write;
                    let _ = writeln!(f, "{line}");
                }
                sink.0.lock().expect("event log poisoned").push(event);
            }
        });
        log
    }

    /// A copy of every event so far.
    pub fn snapshot(&self) -> Vec<Event> {
        self.0.lock().expect("event log poisoned").clone()
    }

    /// Number of events so far (a mark to slice from later).
    pub fn len(&self) -> usize {
        self.0.lock().expect("event log poisoned").len()
    }

    /// Whether nothing was recorded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Events from index `mark` on.
    pub fn since(&self, mark: usize) -> Vec<Event> {
        let all = self.0.lock().expect("event log poisoned");
        all.get(mark..).map(<[Event]>::to_vec).unwrap_or_default()
    }
}

/// Pauses (STOP→RESUME, QEMU's own timestamps) in an event sequence.
pub fn pauses(events: &[Event]) -> Vec<Duration> {
    pause_windows(events)
        .into_iter()
        .map(|(stop, resume)| Duration::from_micros((resume - stop).max(0) as u64))
        .collect()
}

/// The (STOP, RESUME) timestamps of every pause, in µs since the Unix epoch (QEMU's clock).
pub fn pause_windows(events: &[Event]) -> Vec<(i64, i64)> {
    let mut stopped_at = None;
    let mut out = Vec::new();
    for event in events {
        match event.name.as_str() {
            "STOP" => stopped_at = Some(event.timestamp.as_micros()),
            "RESUME" => {
                if let Some(start) = stopped_at.take() {
                    out.push((start, event.timestamp.as_micros()));
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use colo_qmp::Timestamp;

    fn event(name: &str, micros: i64) -> Event {
        Event {
            name: name.into(),
            data: serde_json::Value::Null,
            timestamp: Timestamp {
                seconds: micros / 1_000_000,
                microseconds: micros % 1_000_000,
            },
        }
    }

    #[test]
    fn pauses_pair_stop_with_next_resume() {
        let events = [
            event("RESUME", 500),
            event("STOP", 1_000_000),
            event("SOMETHING", 1_001_000),
            event("RESUME", 1_012_500),
            event("STOP", 3_000_000),
        ];
        assert_eq!(pauses(&events), vec![Duration::from_micros(12_500)]);
    }
}
