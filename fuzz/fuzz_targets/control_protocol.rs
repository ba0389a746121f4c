//! Arbitrary lines into the control-protocol decoders (both directions).
//! Besides "never panics": every client message that decodes re-encodes to
//! a line that decodes to the same message, and no decoded line is longer
//! than the limit.
#![no_main]

use colo_control::protocol::{MAX_LINE, decode_client_line, decode_relay_line, encode_line};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    // The hub only ever sees UTF-8 lines (its line codec refuses others).
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    for line in text.split('\n') {
        if let Ok(msg) = decode_client_line(line) {
            assert!(line.len() <= MAX_LINE);
            let again = encode_line(&msg);
            assert_eq!(
                decode_client_line(&again).expect("re-encoded line decodes"),
                msg
            );
        }
        if let Ok(msg) = decode_relay_line(line) {
            assert!(line.len() <= MAX_LINE);
            // Floats may move by one ulp through serde_json, so only check
            // that re-encoding works and decodes again.
            let again = encode_line(&msg);
            decode_relay_line(&again).expect("re-encoded relay line decodes");
        }
    }
});
