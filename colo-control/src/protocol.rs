//! Wire types of the control protocol, version [`PROTOCOL_VERSION`].
//!
//! One JSON object per line (`\n`-terminated, at most [`MAX_LINE`] bytes),
//! tagged by its `"type"` field. Unknown fields are ignored everywhere, so a
//! later relay or daemon may add fields without bumping the version; adding a
//! message type or an event, or changing what one means, bumps it. The full
//! description, with examples, is `docs/control-protocol.md`.
//!
//! Nothing here does I/O: [`decode_client_line`], [`decode_relay_line`] and
//! [`encode_line`] are pure, so they can be fuzzed and unit-tested directly.

use colo_types::Role;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Every version the relay side accepts in a `hello`.
pub const SUPPORTED_VERSIONS: &[u32] = &[PROTOCOL_VERSION];

/// Longest accepted line in bytes, without its `\n`. A longer line ends the
/// connection.
pub const MAX_LINE: usize = 64 * 1024;

/// What a connection is for, declared in its `hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConnectionRole {
    /// A daemon (colo-blockd, colo-proxyd, a monitor) that receives every
    /// event from the `welcome` on.
    Subscriber,
    /// A tool that sends requests and reads their answers. It receives
    /// events only after a `subscribe` request.
    Operator,
}

/// Where the relay is in the life of a COLO pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RelayState {
    /// No migration channel has connected yet.
    #[default]
    Waiting,
    /// A main migration channel is connected; the secondary has not sent
    /// `checkpoint-ready` yet (RAM is being copied).
    Precopy,
    /// COLO is running: the secondary sent `checkpoint-ready`.
    Colo,
    /// The main channel closed or the relay cut it (barrier failure). A new
    /// migration moves the relay back to `precopy`.
    Exited,
}

impl std::fmt::Display for RelayState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RelayState::Waiting => "waiting",
            RelayState::Precopy => "precopy",
            RelayState::Colo => "colo",
            RelayState::Exited => "exited",
        })
    }
}

/// The first line a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol version the client speaks.
    pub version: u32,
    /// Who is connecting (`colo-blockd`, `colo-proxyd`, `qmp-driver`...),
    /// used in logs, status and barrier errors.
    pub name: String,
    /// Subscriber or operator.
    pub role: ConnectionRole,
    /// Subscribers only: the relay waits for this subscriber's `ack` of every
    /// synchronous event before it lets the checkpoint go on.
    #[serde(default)]
    pub sync: bool,
}

/// Every line a client (daemon or operator tool) sends to the relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ClientMessage {
    /// First line of every connection.
    Hello(Hello),
    /// Acknowledges the event with this `seq` (meaningful for `sync: true`
    /// events only; ignored otherwise).
    Ack {
        /// The acknowledged event's `seq`.
        seq: u64,
    },
    /// Asks for a [`RelayStatus`].
    Status,
    /// Asks the relay to send events on this connection too (asynchronous;
    /// an operator never takes part in a barrier).
    Subscribe,
    /// An operator decided on a failover: the relay broadcasts a `failover`
    /// event. The relay itself does not touch QEMU.
    Failover {
        /// The side that continues.
        survivor: Role,
    },
    /// Someone asked QEMU for a checkpoint, and says why (counted in status).
    CheckpointRequested {
        /// Free-form reason, e.g. `proxy-mismatch`, `block-log-full`, `cli`.
        reason: String,
    },
}

/// Kinds of [`Event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// The secondary stopped and drained the SVM for a checkpoint
    /// (`checkpoint-reply`). Synchronous: hold new SVM I/O.
    SvmEpochClosed,
    /// The secondary has the primary's whole state and will adopt it
    /// (`vmstate-received`). Synchronous: commit the PVM's epoch, drop the
    /// SVM's.
    CheckpointAdopted,
    /// The secondary runs the new state (`vmstate-loaded`).
    CheckpointComplete,
    /// The secondary entered COLO (`checkpoint-ready`); epoch 1 begins (or
    /// the next epoch after a re-protect).
    ColoStarted,
    /// The main migration channel is gone; see `reason` and `detail`.
    ColoExit,
    /// An operator decided on a failover; see `survivor`.
    Failover,
    /// The relay hit a problem that does not end COLO by itself (for
    /// example it cannot parse the channel any more); see `detail`.
    RelayError,
    /// An event this version does not know (sent by a later relay).
    #[serde(other)]
    Unknown,
}

impl EventKind {
    /// The wire name, e.g. `svm-epoch-closed`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::SvmEpochClosed => "svm-epoch-closed",
            EventKind::CheckpointAdopted => "checkpoint-adopted",
            EventKind::CheckpointComplete => "checkpoint-complete",
            EventKind::ColoStarted => "colo-started",
            EventKind::ColoExit => "colo-exit",
            EventKind::Failover => "failover",
            EventKind::RelayError => "relay-error",
            EventKind::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `reason` of a `colo-exit` caused by a failed barrier (a sync subscriber
/// did not ack in time or disconnected).
pub const EXIT_BARRIER_TIMEOUT: &str = "barrier-timeout";
/// `reason` of a `colo-exit` caused by a secondary QEMU that did not answer a checkpoint
/// request (`checkpoint-reply`) in time: frozen, or stuck stopping its VM.
pub const EXIT_REPLY_TIMEOUT: &str = "reply-timeout";
/// `reason` of a `colo-exit` caused by either QEMU closing the main channel.
pub const EXIT_CHANNEL_CLOSED: &str = "channel-closed";
/// `reason` of a `colo-exit` caused by the relay shutting down.
pub const EXIT_RELAY_SHUTDOWN: &str = "relay-shutdown";

/// What an event says, before the hub numbers and stamps it for a
/// connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventBody {
    /// The event.
    pub event: EventKind,
    /// The epoch it concerns (see `docs/control-protocol.md`, "Epochs").
    pub epoch: u64,
    /// `colo-exit`: why.
    pub reason: Option<String>,
    /// `failover`: the side that continues.
    pub survivor: Option<Role>,
    /// Free text for humans and logs.
    pub detail: Option<String>,
}

impl EventBody {
    /// An event with no extra fields.
    pub fn new(event: EventKind, epoch: u64) -> Self {
        EventBody {
            event,
            epoch,
            reason: None,
            survivor: None,
            detail: None,
        }
    }

    /// Sets `reason`.
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// Sets `survivor`.
    pub fn with_survivor(mut self, survivor: Role) -> Self {
        self.survivor = Some(survivor);
        self
    }

    /// Sets `detail`.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// One event as it travels from the relay to a subscriber.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Per-connection sequence number: 1 for the first event on a
    /// connection, then one more for each event.
    pub seq: u64,
    /// What happened.
    pub event: EventKind,
    /// The epoch it concerns.
    pub epoch: u64,
    /// True when the relay waits for this connection's `ack` before it lets
    /// the checkpoint continue.
    pub sync: bool,
    /// When the relay sent it, microseconds since the Unix epoch.
    pub time_us: u64,
    /// `colo-exit`: `barrier-timeout`, `channel-closed` or `relay-shutdown`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `failover`: the side that continues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub survivor: Option<Role>,
    /// Free text for humans and logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Event {
    /// Numbers and stamps `body` for one connection.
    pub fn from_body(body: &EventBody, seq: u64, sync: bool, time_us: u64) -> Self {
        Event {
            seq,
            event: body.event,
            epoch: body.epoch,
            sync,
            time_us,
            reason: body.reason.clone(),
            survivor: body.survivor,
            detail: body.detail.clone(),
        }
    }
}

/// One connected (or, during a COLO session, departed) event receiver, as
/// shown in [`RelayStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriberStatus {
    /// Its `hello` name.
    pub name: String,
    /// Whether barriers wait for it.
    pub sync: bool,
    /// When it connected, microseconds since the Unix epoch.
    pub connected_since_us: u64,
    /// When its last ack of a synchronous event arrived.
    pub last_ack_us: Option<u64>,
    /// How long its last ack took, from the event being queued to the ack
    /// being read.
    pub last_ack_latency_us: Option<u64>,
    /// Connected, and acknowledged its last synchronous event in time.
    pub healthy: bool,
    /// False for a sync subscriber that left during the current COLO
    /// session: it stays listed (unhealthy) because the next barrier fails
    /// on it.
    #[serde(default = "default_true")]
    pub connected: bool,
}

fn default_true() -> bool {
    true
}

/// The relay's answer to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RelayStatus {
    /// Protocol version of the relay.
    pub version: u32,
    /// Life-cycle state.
    pub state: RelayState,
    /// The epoch the pair is in (0 before COLO started; never goes back).
    pub epoch: u64,
    /// Checkpoints completed (`vmstate-loaded` seen) since the relay started.
    pub checkpoints: u64,
    /// Pause of the last checkpoint as the relay saw it: from
    /// `checkpoint-reply` to `vmstate-loaded`, barriers included.
    pub last_pause_us: Option<u64>,
    /// Checkpoints completed over the last 60 seconds.
    pub checkpoint_rate_per_min: f64,
    /// Reason given by the last `checkpoint-requested`.
    pub last_request_reason: Option<String>,
    /// Count of `checkpoint-requested` per reason.
    pub requests_by_reason: BTreeMap<String, u64>,
    /// Set when the relay stopped parsing the current main channel.
    pub parse_error: Option<String>,
    /// A main migration channel (one that began with `QEVM`) is connected.
    pub main_channel_connected: bool,
    /// Connected channels passed through untouched (multifd, ...).
    pub passthrough_channels: u32,
    /// Barriers that failed (timeout or sync subscriber lost) since start.
    pub barrier_timeouts: u64,
    /// Migration connections the relay closed unread since start: another
    /// one while a session ran, or one that was not a main migration
    /// channel (see `docs/control-protocol.md`, "One session at a time").
    #[serde(default)]
    pub refused_migration_channels: u64,
    /// Control connections closed unread since start: over a listener's
    /// client limit, or from a TCP address not allowed.
    #[serde(default)]
    pub refused_control_connections: u64,
    /// Requests refused for who sent them since start (a `failover` not
    /// from the local operator).
    #[serde(default)]
    pub refused_requests: u64,
    /// Event receivers.
    pub subscribers: Vec<SubscriberStatus>,
}

/// Every line the relay sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum RelayMessage {
    /// Accepts a `hello`.
    Welcome {
        /// The version both sides now speak.
        version: u32,
        /// The current epoch.
        epoch: u64,
        /// The current state.
        state: RelayState,
    },
    /// Refuses a line. After a refused `hello` (or a line that is too long)
    /// the relay closes the connection; otherwise it stays open.
    Error {
        /// What was wrong.
        message: String,
        /// Versions the relay accepts; sent with a refused `hello`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        supported: Option<Vec<u32>>,
    },
    /// An event.
    Event(Event),
    /// Answer to `status`.
    Status(RelayStatus),
    /// Answer to `subscribe`, `failover` and `checkpoint-requested`.
    Ok,
}

/// A line that is not a valid message.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Longer than [`MAX_LINE`].
    #[error("line of {len} bytes exceeds the limit of {MAX_LINE} bytes")]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// Not JSON, not an object, unknown `type`, or a field of the wrong type.
    #[error("invalid message: {0}")]
    Invalid(#[from] serde_json::Error),
}

fn check_len(line: &str) -> Result<&str, DecodeError> {
    let line = line.strip_suffix('\n').unwrap_or(line);
    if line.len() > MAX_LINE {
        return Err(DecodeError::TooLong { len: line.len() });
    }
    Ok(line)
}

/// Decodes one line from a client (an optional trailing `\n` is allowed).
pub fn decode_client_line(line: &str) -> Result<ClientMessage, DecodeError> {
    Ok(serde_json::from_str(check_len(line)?)?)
}

/// Decodes one line from the relay (an optional trailing `\n` is allowed).
pub fn decode_relay_line(line: &str) -> Result<RelayMessage, DecodeError> {
    Ok(serde_json::from_str(check_len(line)?)?)
}

/// Encodes a message as one line, with its `\n`.
pub fn encode_line<T: Serialize>(msg: &T) -> String {
    // Serializing these types cannot fail: no maps with non-string keys, and
    // every f64 is produced finite by the relay (a non-finite one becomes
    // `null`, which serde_json does itself).
    let mut s = serde_json::to_string(msg).unwrap_or_else(|e| {
        serde_json::json!({"type": "error", "message": format!("cannot encode: {e}")}).to_string()
    });
    s.push('\n');
    s
}

/// Microseconds since the Unix epoch (0 if the clock is before 1970).
pub fn unix_micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// [`unix_micros`] of now.
pub fn now_micros() -> u64 {
    unix_micros(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn round_trip_client(m: &ClientMessage) {
        let line = encode_line(m);
        assert!(line.ends_with('\n'));
        assert_eq!(&decode_client_line(&line).unwrap(), m);
    }

    #[test]
    fn client_messages_match_the_documented_json() {
        let hello = decode_client_line(
            r#"{"type":"hello","version":1,"name":"colo-blockd","role":"subscriber","sync":true}"#,
        )
        .unwrap();
        assert_eq!(
            hello,
            ClientMessage::Hello(Hello {
                version: 1,
                name: "colo-blockd".into(),
                role: ConnectionRole::Subscriber,
                sync: true
            })
        );
        let op = decode_client_line(
            r#"{"type":"hello","version":1,"name":"qmp-driver","role":"operator"}"#,
        )
        .unwrap();
        assert!(matches!(
            op,
            ClientMessage::Hello(Hello {
                role: ConnectionRole::Operator,
                sync: false,
                ..
            })
        ));
        assert_eq!(
            decode_client_line(r#"{"type":"ack","seq":7}"#).unwrap(),
            ClientMessage::Ack { seq: 7 }
        );
        assert_eq!(
            decode_client_line(r#"{"type":"status"}"#).unwrap(),
            ClientMessage::Status
        );
        assert_eq!(
            decode_client_line(r#"{"type":"failover","survivor":"secondary"}"#).unwrap(),
            ClientMessage::Failover {
                survivor: Role::Secondary
            }
        );
        assert_eq!(
            decode_client_line(r#"{"type":"checkpoint-requested","reason":"proxy-mismatch"}"#)
                .unwrap(),
            ClientMessage::CheckpointRequested {
                reason: "proxy-mismatch".into()
            }
        );
        for m in [
            hello,
            op,
            ClientMessage::Ack { seq: u64::MAX },
            ClientMessage::Subscribe,
            ClientMessage::Status,
        ] {
            round_trip_client(&m);
        }
    }

    #[test]
    fn unknown_fields_are_ignored_unknown_types_are_not() {
        let m = decode_client_line(r#"{"type":"ack","seq":3,"from-version-2":[1,2]}"#).unwrap();
        assert_eq!(m, ClientMessage::Ack { seq: 3 });
        assert!(decode_client_line(r#"{"type":"teleport"}"#).is_err());
        assert!(decode_client_line(r#"{"seq":3}"#).is_err());
        assert!(decode_client_line(r#"{"type":"ack","seq":-1}"#).is_err());
        assert!(decode_client_line("[1,2]").is_err());
        assert!(decode_client_line("").is_err());
    }

    #[test]
    fn too_long_lines_are_refused_before_parsing() {
        let long = format!(
            r#"{{"type":"checkpoint-requested","reason":"{}"}}"#,
            "x".repeat(MAX_LINE)
        );
        assert!(matches!(
            decode_client_line(&long),
            Err(DecodeError::TooLong { .. })
        ));
    }

    #[test]
    fn event_json_has_the_documented_shape() {
        let body = EventBody::new(EventKind::ColoExit, 4)
            .with_reason(EXIT_BARRIER_TIMEOUT)
            .with_detail("colo-blockd did not ack");
        let ev = Event::from_body(&body, 9, false, 1_700_000_000_000_000);
        let line = encode_line(&RelayMessage::Event(ev.clone()));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            v,
            json!({"type":"event","seq":9,"event":"colo-exit","epoch":4,"sync":false,
                   "time_us":1_700_000_000_000_000u64,"reason":"barrier-timeout",
                   "detail":"colo-blockd did not ack"})
        );
        assert_eq!(decode_relay_line(&line).unwrap(), RelayMessage::Event(ev));
    }

    #[test]
    fn unknown_event_kinds_decode_as_unknown() {
        let m = decode_relay_line(
            r#"{"type":"event","seq":1,"event":"disk-on-fire","epoch":2,"sync":true,"time_us":5}"#,
        )
        .unwrap();
        let RelayMessage::Event(ev) = m else {
            panic!("not an event")
        };
        assert_eq!(ev.event, EventKind::Unknown);
        assert!(ev.sync);
    }

    #[test]
    fn relay_messages_round_trip() {
        let mut status = RelayStatus {
            version: 1,
            state: RelayState::Colo,
            epoch: 12,
            checkpoints: 11,
            last_pause_us: Some(41_000),
            checkpoint_rate_per_min: 3.5,
            ..RelayStatus::default()
        };
        status.requests_by_reason.insert("cli".into(), 2);
        status.subscribers.push(SubscriberStatus {
            name: "colo-blockd".into(),
            sync: true,
            connected_since_us: 1,
            last_ack_us: Some(2),
            last_ack_latency_us: Some(300),
            healthy: true,
            connected: true,
        });
        for m in [
            RelayMessage::Welcome {
                version: 1,
                epoch: 3,
                state: RelayState::Precopy,
            },
            RelayMessage::Error {
                message: "no".into(),
                supported: Some(vec![1]),
            },
            RelayMessage::Error {
                message: "no".into(),
                supported: None,
            },
            RelayMessage::Ok,
            RelayMessage::Status(status),
        ] {
            let line = encode_line(&m);
            assert_eq!(decode_relay_line(&line).unwrap(), m, "{line}");
        }
        let v: Value = serde_json::from_str(&encode_line(&RelayMessage::Welcome {
            version: 1,
            epoch: 0,
            state: RelayState::Waiting,
        }))
        .unwrap();
        assert_eq!(
            v,
            json!({"type":"welcome","version":1,"epoch":0,"state":"waiting"})
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_lines_never_panic(s in ".{0,200}") {
            let _ = decode_client_line(&s);
            let _ = decode_relay_line(&s);
        }
    }
}
