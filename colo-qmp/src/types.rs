//! Plain data types seen on a QMP connection: greeting and events.

use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// QEMU version as announced in the greeting.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QemuVersion {
    /// Major version, e.g. 10 for 10.0.2.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
    /// Distribution/package string, often empty.
    pub package: String,
}

/// The `{"QMP": ...}` greeting QEMU sends on connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Greeting {
    /// QEMU's version.
    pub version: QemuVersion,
    /// Capabilities QEMU offers, e.g. `["oob"]`.
    pub capabilities: Vec<String>,
}

/// An event timestamp as sent by QEMU (wall clock, split into seconds and
/// microseconds since the Unix epoch).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Timestamp {
    /// Whole seconds since the Unix epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

impl Timestamp {
    /// Microseconds since the Unix epoch; saturates rather than overflowing
    /// on nonsense input.
    pub fn as_micros(&self) -> i64 {
        self.seconds
            .saturating_mul(1_000_000)
            .saturating_add(self.microseconds)
    }

    /// The timestamp as a [`SystemTime`]; `None` if negative (QEMU sends -1
    /// when it could not read the clock).
    pub fn to_system_time(&self) -> Option<SystemTime> {
        let micros = u64::try_from(self.as_micros()).ok()?;
        UNIX_EPOCH.checked_add(Duration::from_micros(micros))
    }
}

/// An asynchronous QMP event. Deliberately generic: unknown event names and
/// data shapes are delivered as they are instead of failing the connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Event name, e.g. `STOP`, `RESUME`, `COLO_EXIT`.
    pub name: String,
    /// The event's `data` member; [`serde_json::Value::Null`] when absent.
    #[serde(default)]
    pub data: serde_json::Value,
    /// When QEMU emitted the event.
    pub timestamp: Timestamp,
}
