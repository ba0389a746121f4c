//! Encoding commands and classifying incoming lines. Pure functions, no I/O.

use super::types::{Event, Greeting, QemuVersion, Timestamp};
use serde::Deserialize;
use serde_json::{Map, Value};

/// QEMU's `{"error": {...}}` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QemuFault {
    pub(crate) class: String,
    pub(crate) desc: String,
}

/// What one incoming line turned out to be.
#[derive(Debug, PartialEq)]
pub(crate) enum Incoming {
    /// A reply to the command we sent with this `id`.
    Reply {
        id: u64,
        outcome: Result<Value, QemuFault>,
    },
    /// An asynchronous event.
    Event(Event),
    /// Anything else; the string says why, for the log.
    Skip(String),
}

/// Serialises one command as a single line. `oob` selects `exec-oob`, which
/// QEMU only accepts with an `id` — we always send one anyway so every reply
/// can be routed.
pub(crate) fn encode_command(
    id: u64,
    command: &str,
    arguments: Option<&Value>,
    oob: bool,
) -> Vec<u8> {
    let mut obj = Map::with_capacity(3);
    let key = if oob { "exec-oob" } else { "execute" };
    obj.insert(key.to_owned(), Value::String(command.to_owned()));
    if let Some(args) = arguments {
        obj.insert("arguments".to_owned(), args.clone());
    }
    obj.insert("id".to_owned(), Value::from(id));
    let mut bytes = Value::Object(obj).to_string().into_bytes();
    bytes.push(b'\n');
    bytes
}

/// Classifies a line. Never fails: anything unexpected becomes
/// [`Incoming::Skip`] because one odd line must not end the connection.
pub(crate) fn classify(line: &[u8]) -> Incoming {
    let value: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return Incoming::Skip(format!("not JSON: {e}")),
    };
    let Value::Object(mut obj) = value else {
        return Incoming::Skip("not a JSON object".to_owned());
    };
    if obj.contains_key("return") || obj.contains_key("error") {
        let id = match obj.get("id").map(|v| v.as_u64()) {
            Some(Some(id)) => id,
            Some(None) => return Incoming::Skip("reply with an id we did not send".to_owned()),
            // QEMU replies without an id only when it could not parse the
            // request; we never send unparsable requests, so nobody waits.
            None => return Incoming::Skip("reply without id".to_owned()),
        };
        let outcome = match obj.remove("return") {
            Some(ret) => Ok(ret),
            None => Err(fault(obj.remove("error").unwrap_or(Value::Null))),
        };
        return Incoming::Reply { id, outcome };
    }
    if let Some(name) = obj.get("event") {
        let Some(name) = name.as_str() else {
            return Incoming::Skip("event name is not a string".to_owned());
        };
        let name = name.to_owned();
        // A missing or odd timestamp does not justify losing the event;
        // deliver it with a zero timestamp instead.
        let timestamp = obj
            .remove("timestamp")
            .and_then(|t| serde_json::from_value::<Timestamp>(t).ok())
            .unwrap_or_else(|| {
                tracing::warn!(event = %name, "QMP event without a valid timestamp");
                Timestamp::default()
            });
        let data = obj.remove("data").unwrap_or(Value::Null);
        return Incoming::Event(Event {
            name,
            data,
            timestamp,
        });
    }
    if obj.contains_key("QMP") {
        return Incoming::Skip("unexpected second greeting".to_owned());
    }
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    Incoming::Skip(format!("unknown message with keys {keys:?}"))
}

fn fault(error: Value) -> QemuFault {
    let field = |name: &str| error.get(name).and_then(Value::as_str).map(str::to_owned);
    match (field("class"), field("desc")) {
        (Some(class), Some(desc)) => QemuFault { class, desc },
        // Keep whatever QEMU sent so the caller still sees something useful.
        (class, _) => QemuFault {
            class: class.unwrap_or_else(|| "GenericError".to_owned()),
            desc: error.to_string(),
        },
    }
}

#[derive(Deserialize)]
struct RawGreeting {
    #[serde(rename = "QMP")]
    qmp: RawGreetingBody,
}

#[derive(Deserialize)]
struct RawGreetingBody {
    version: RawVersion,
    #[serde(default)]
    capabilities: Vec<String>,
}

#[derive(Deserialize)]
struct RawVersion {
    qemu: RawQemuVersion,
    #[serde(default)]
    package: String,
}

#[derive(Deserialize)]
struct RawQemuVersion {
    major: u32,
    minor: u32,
    micro: u32,
}

/// Parses the `{"QMP": {...}}` greeting line.
pub(crate) fn parse_greeting(line: &[u8]) -> Result<Greeting, String> {
    let raw: RawGreeting = serde_json::from_slice(line).map_err(|e| {
        format!(
            "malformed greeting ({e}): {}",
            String::from_utf8_lossy(&line[..line.len().min(200)])
        )
    })?;
    Ok(Greeting {
        version: QemuVersion {
            major: raw.qmp.version.qemu.major,
            minor: raw.qmp.version.qemu.minor,
            micro: raw.qmp.version.qemu.micro,
            package: raw.qmp.version.package,
        },
        capabilities: raw.qmp.capabilities,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn encodes_execute_and_exec_oob() {
        let line = encode_command(7, "yank", Some(&json!({"instances": []})), true);
        assert_eq!(line.last(), Some(&b'\n'));
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v,
            json!({"exec-oob": "yank", "arguments": {"instances": []}, "id": 7})
        );
        let v: Value = serde_json::from_slice(&encode_command(1, "stop", None, false)).unwrap();
        assert_eq!(v, json!({"execute": "stop", "id": 1}));
    }

    #[test]
    fn classifies_replies_events_and_junk() {
        assert_eq!(
            classify(br#"{"return": {}, "id": 3}"#),
            Incoming::Reply {
                id: 3,
                outcome: Ok(json!({}))
            }
        );
        assert_eq!(
            classify(br#"{"id": 4, "error": {"class": "CommandNotFound", "desc": "nope"}}"#),
            Incoming::Reply {
                id: 4,
                outcome: Err(QemuFault {
                    class: "CommandNotFound".into(),
                    desc: "nope".into()
                })
            }
        );
        assert_eq!(
            classify(br#"{"timestamp": {"seconds": 5, "microseconds": 6}, "event": "STOP"}"#),
            Incoming::Event(Event {
                name: "STOP".into(),
                data: Value::Null,
                timestamp: Timestamp {
                    seconds: 5,
                    microseconds: 6
                }
            })
        );
        for junk in [
            &b"{not json"[..],
            b"[1,2]",
            b"\"str\"",
            br#"{"foo":1}"#,
            br#"{"return": {}}"#,
            br#"{"return": {}, "id": "abc"}"#,
            b"",
        ] {
            assert!(matches!(classify(junk), Incoming::Skip(_)), "{junk:?}");
        }
    }

    #[test]
    fn parses_real_greeting() {
        let g = parse_greeting(br#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2"}, "capabilities": ["oob"]}}"#).unwrap();
        assert_eq!(g.version.major, 10);
        assert_eq!(g.version.micro, 2);
        assert_eq!(g.version.package, "Debian 1:10.0.2");
        assert_eq!(g.capabilities, vec!["oob".to_string()]);
        assert!(parse_greeting(br#"{"return": {}}"#).is_err());
    }
}
