//! Arbitrary bytes into the HA agents' message decoder (colo-cluster): every CPG member's
//! bytes reach it. Besides "never panics": a message that decodes re-encodes to bytes that
//! decode to the same message, within the size bound.
#![no_main]

use colo_cluster::Message;
use colo_cluster::message::MAX_MESSAGE_BYTES;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    if let Ok(message) = Message::decode(input) {
        assert!(input.len() <= MAX_MESSAGE_BYTES);
        let again = message.encode();
        assert!(again.len() <= MAX_MESSAGE_BYTES);
        assert_eq!(Message::decode(&again), Ok(message));
    }
});
