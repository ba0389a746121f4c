//! Comparator throughput against a plain memory comparison of the same bytes, in one run
//! (issue 4's benchmark: target ratio ≥ 0.5). Not a test: timings depend on the machine.
//!
//!     cargo run --release -p colo-proxyd --example compare_throughput [CONNECTIONS] [MIB_EACH]

use std::hint::black_box;
use std::time::Instant;

use colo_proxyd::compare::{Action, ComparatorLimits, PacketId, Segment, StreamComparator};

fn main() {
    let mut args = std::env::args().skip(1);
    let connections: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(64);
    let mib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(4);
    let stream: Vec<u8> = (0..mib << 20).map(|i| (i * 31 % 251) as u8).collect();
    let copy = stream.clone();
    let total = (connections * stream.len()) as f64;

    let start = Instant::now();
    for _ in 0..connections {
        // Same segment sizes as the comparator's run, so the baseline pays the same loop.
        for (a, b) in stream.chunks(1448).zip(copy.chunks(1448)) {
            black_box(a == b);
        }
    }
    let memcmp = start.elapsed().as_secs_f64();

    // PVM in 1448-byte segments, SVM in 536-byte segments with another ISN, the SVM a few
    // segments behind, connections interleaved.
    let start = Instant::now();
    let mut comparators: Vec<StreamComparator> = (0..connections)
        .map(|_| StreamComparator::new(ComparatorLimits::default()))
        .collect();
    let mut actions = Vec::new();
    let mut released = 0usize;
    let mut next_id = 0u64;
    let syn = |seq| Segment {
        seq,
        ack: Some(1),
        syn: true,
        fin: false,
        rst: false,
        payload: &[],
    };
    for comparator in &mut comparators {
        comparator.push_pvm(PacketId(next_id), &syn(1000), &mut actions);
        comparator.push_svm(&syn(9000), &mut actions);
        next_id += 1;
    }
    let pvm: Vec<(usize, &[u8])> = stream
        .chunks(1448)
        .enumerate()
        .map(|(i, c)| (i * 1448, c))
        .collect();
    let svm: Vec<(usize, &[u8])> = copy
        .chunks(536)
        .enumerate()
        .map(|(i, c)| (i * 536, c))
        .collect();
    let (mut p, mut s) = (0, 0);
    while p < pvm.len() || s < svm.len() {
        if p < pvm.len() && (s >= svm.len() || pvm[p].0 <= svm[s].0 + 8 * 1448) {
            let (offset, data) = pvm[p];
            for comparator in &mut comparators {
                let segment = Segment {
                    seq: 1001u32.wrapping_add(offset as u32),
                    ack: Some(1),
                    syn: false,
                    fin: false,
                    rst: false,
                    payload: data,
                };
                comparator.push_pvm(PacketId(next_id), &segment, &mut actions);
                next_id += 1;
            }
            p += 1;
        } else {
            let (offset, data) = svm[s];
            for comparator in &mut comparators {
                let segment = Segment {
                    seq: 9001u32.wrapping_add(offset as u32),
                    ack: Some(1),
                    syn: false,
                    fin: false,
                    rst: false,
                    payload: data,
                };
                comparator.push_svm(&segment, &mut actions);
            }
            s += 1;
        }
        released += actions
            .drain(..)
            .filter(|a| matches!(a, Action::Release(_)))
            .count();
    }
    let compared = start.elapsed().as_secs_f64();
    assert_eq!(released as u64, next_id, "every PVM packet released");

    println!(
        "{connections} connections x {mib} MiB: memcmp {:.0} MB/s, comparator {:.0} MB/s, ratio {:.2}",
        total / memcmp / 1e6,
        total / compared / 1e6,
        memcmp / compared
    );
}
