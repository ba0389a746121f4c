//! What the agents tell each other through the group, and its wire form.
//!
//! Messages arrive from every member of the cluster, so decoding is bounded and total: any
//! byte string gives a message or a [`DecodeError`], never a panic.

use serde::{Deserialize, Serialize};

/// The largest message accepted (they are a few dozen bytes).
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// The longest `reason` a claim may carry.
pub const MAX_REASON_BYTES: usize = 128;

/// The wire format's version; a message of another version is refused.
pub const VERSION: u32 = 1;

/// One agent's VM, as its agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// In COLO, as the primary.
    Primary,
    /// In COLO, as the secondary.
    Secondary,
    /// Running, not in COLO (never protected, or the survivor of a failover).
    Alone,
    /// QEMU exited or its monitor went away.
    Gone,
    /// Stopped by its own agent after it lost a claim or quorum.
    Fenced,
    /// A fresh QEMU that has not run yet: a secondary waiting for its migration (a new
    /// secondary the survivor can re-protect with), a primary before `start`. Agents older
    /// than this variant refuse the message as malformed and ignore it.
    Waiting,
}

impl VmState {
    /// In COLO (either role).
    pub fn protected(self) -> bool {
        matches!(self, VmState::Primary | VmState::Secondary)
    }
}

/// A message between the agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Message {
    /// The sender's VM is now in this state.
    State {
        /// The state.
        vm: VmState,
    },
    /// The sender takes the VM over (its side serves alone) unless another claim came first.
    Claim {
        /// Why, for logs.
        reason: String,
    },
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    v: u32,
    #[serde(flatten)]
    message: Message,
}

/// A message that could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Longer than [`MAX_MESSAGE_BYTES`].
    #[error("message of {0} bytes, more than {MAX_MESSAGE_BYTES}")]
    TooLong(usize),
    /// Not a message of this format.
    #[error("not an agent message: {0}")]
    Malformed(String),
    /// Another version of the format.
    #[error("message version {0}, this agent speaks {VERSION}")]
    Version(u32),
    /// A claim's reason longer than [`MAX_REASON_BYTES`].
    #[error("claim reason of {0} bytes, more than {MAX_REASON_BYTES}")]
    ReasonTooLong(usize),
}

impl Message {
    /// The wire form.
    pub fn encode(&self) -> Vec<u8> {
        let envelope = Envelope {
            v: VERSION,
            message: self.clone(),
        };
        serde_json::to_vec(&envelope).expect("an agent message always serializes")
    }

    /// Decodes a message received from the group.
    pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(DecodeError::TooLong(bytes.len()));
        }
        let envelope: Envelope =
            serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if envelope.v != VERSION {
            return Err(DecodeError::Version(envelope.v));
        }
        if let Message::Claim { reason } = &envelope.message
            && reason.len() > MAX_REASON_BYTES
        {
            return Err(DecodeError::ReasonTooLong(reason.len()));
        }
        Ok(envelope.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn messages_survive_the_wire() {
        for m in [
            Message::State {
                vm: VmState::Primary,
            },
            Message::State {
                vm: VmState::Fenced,
            },
            Message::State {
                vm: VmState::Waiting,
            },
            Message::Claim {
                reason: "peer-host-down".into(),
            },
        ] {
            assert_eq!(Message::decode(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn foreign_and_oversized_messages_are_refused() {
        assert_eq!(
            Message::decode(br#"{"v":2,"kind":"state","vm":"alone"}"#),
            Err(DecodeError::Version(2))
        );
        assert!(matches!(
            Message::decode(br#"{"v":1,"kind":"promote"}"#),
            Err(DecodeError::Malformed(_))
        ));
        assert_eq!(
            Message::decode(&vec![b' '; MAX_MESSAGE_BYTES + 1]),
            Err(DecodeError::TooLong(MAX_MESSAGE_BYTES + 1))
        );
        let long = Message::Claim {
            reason: "x".repeat(MAX_REASON_BYTES + 1),
        };
        assert_eq!(
            Message::decode(&long.encode()),
            Err(DecodeError::ReasonTooLong(MAX_REASON_BYTES + 1))
        );
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Message::decode(&bytes);
        }
    }
}
