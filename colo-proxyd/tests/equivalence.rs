//! Declared equivalence through the comparison engine, on Ethernet frames: HTTP responses
//! that differ only in their `Date:` value are released without a checkpoint request, a
//! difference in the body still requests one, and without a rule the Date difference does.

use std::time::Duration;

use bytes::Bytes;
use colo_proxyd::compare::{Action, CheckpointReason, PacketId};
use colo_proxyd::engine::{ComparisonEngine, EngineConfig};

const PVM: &[u8] =
    b"HTTP/1.1 200 OK\r\nDate: Sat, 05 Dec 2026 17:13:54 GMT\r\nContent-Length: 5\r\n\r\nhello";
const SVM: &[u8] =
    b"HTTP/1.1 200 OK\r\nDate: Sat, 05 Dec 2026 17:13:55 GMT\r\nContent-Length: 5\r\n\r\nhello";

/// The guest's (10.0.0.2:80) TCP segment with PSH|ACK at `seq`.
fn frame(seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x52, 0x54, 0, 0, 0, 2, 0x52, 0x54, 0, 0, 0, 1, 0x08, 0x00];
    let total = (40 + payload.len()) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 2, 10, 0, 0, 9]);
    f.extend_from_slice(&80u16.to_be_bytes());
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&7u32.to_be_bytes());
    f.extend_from_slice(&[0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

/// Both responses, each cut at `cut`, PVM segments first; the actions.
fn exchange(config: EngineConfig, pvm: &[u8], svm: &[u8], cut: usize) -> Vec<Action> {
    let mut engine = ComparisonEngine::new(config);
    let mut actions = Vec::new();
    let seq = 1000u32;
    for (id, (at, part)) in [(0, &pvm[..cut]), (cut, &pvm[cut..])]
        .into_iter()
        .enumerate()
    {
        let bytes = Bytes::from(frame(seq + at as u32, part));
        engine.push_pvm(PacketId(id as u64), &bytes, Duration::ZERO, &mut actions);
    }
    for (at, part) in [(0, &svm[..cut]), (cut, &svm[cut..])] {
        engine.push_svm(&frame(seq + at as u32, part), &mut actions);
    }
    actions
}

fn with_date_rule() -> EngineConfig {
    EngineConfig {
        equivalent: vec!["tcp:80 header Date".parse().unwrap()],
        ..EngineConfig::default()
    }
}

#[test]
fn responses_differing_only_in_date_are_released_without_a_checkpoint() {
    // Every cut, including inside the prefix, the value and the suffix.
    for cut in 1..PVM.len() {
        let actions = exchange(with_date_rule(), PVM, SVM, cut);
        assert_eq!(
            actions,
            vec![Action::Release(PacketId(0)), Action::Release(PacketId(1))],
            "cut at {cut}"
        );
    }
    let mut engine = ComparisonEngine::new(with_date_rule());
    let mut actions = Vec::new();
    engine.push_pvm(
        PacketId(0),
        &Bytes::from(frame(1, PVM)),
        Duration::ZERO,
        &mut actions,
    );
    engine.push_svm(&frame(1, SVM), &mut actions);
    assert_eq!(actions, vec![Action::Release(PacketId(0))]);
    assert_eq!(engine.equivalent_counters()[0].segments, 1);
    assert_eq!(engine.equivalent_counters()[0].bytes, 29);
}

#[test]
fn a_body_difference_still_requests_a_checkpoint() {
    let mut svm = SVM.to_vec();
    *svm.last_mut().unwrap() = b'!';
    let actions = exchange(with_date_rule(), PVM, &svm, 40);
    assert!(actions.contains(&Action::CheckpointNeeded(
        CheckpointReason::PayloadDiffers {
            offset: PVM.len() as i64 - 1
        }
    )));
}

#[test]
fn without_a_rule_the_date_requests_a_checkpoint() {
    // Offset 47: the seconds digit, where the bed saw it.
    let actions = exchange(EngineConfig::default(), PVM, SVM, 40);
    assert!(actions.contains(&Action::CheckpointNeeded(
        CheckpointReason::PayloadDiffers { offset: 47 }
    )));
}
