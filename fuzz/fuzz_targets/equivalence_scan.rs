//! colo-proxyd's declared equivalence (`--equivalent`): arbitrary operator text through the
//! rule parser (`colo_proxyd::engine::EquivalenceRule`), and two byte streams, the PVM's and
//! the SVM's, each cut into segments at arbitrary points and interleaved arbitrarily, through
//! a `StreamComparator` with the parsed rules' patterns (and two built-in ones: the `Date`
//! header and `prefix "tok=" len 8 suffix ";"`). Checks, besides "never panics":
//! * a rule the parser accepts has the normalized text (words joined by one space), a prefix
//!   of at least `MIN_PREFIX_LEN` bytes, a value of 1 to `MAX_VALUE_LEN` bytes and a non-empty
//!   suffix; `header NAME` is exactly `\r\nNAME: `, a 29-byte date, `\r\n`; a rule never
//!   matches a UDP flow; a refusal says why (a non-empty message);
//! * byte-equal streams (with FINs at the same place, or none) never need a checkpoint, and
//!   every PVM packet is released, once, by the time both are fed;
//! * streams that differ at an offset outside every value that follows any pattern's prefix
//!   in the PVM's stream (a superset of the regions the scan declares) need a checkpoint, and
//!   the PVM packet carrying that offset is never released;
//! * no packet is released twice, and the released packets plus those `reset()` hands back
//!   are every PVM packet given.
#![no_main]

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use colo_proxyd::compare::{
    Action, ComparatorLimits, IMF_FIXDATE_LEN, MAX_VALUE_LEN, MIN_PREFIX_LEN, PacketId, Pattern,
    Segment, StreamComparator, ValueByte,
};
use colo_proxyd::engine::EquivalenceRule;
use colo_proxyd::packet::FlowKey;
use libfuzzer_sys::fuzz_target;

/// Reads the input front to back.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// Parses one line of operator text and checks what the parser says.
fn parse_rule(line: &str) -> Option<EquivalenceRule> {
    match line.parse::<EquivalenceRule>() {
        Ok(rule) => {
            let words: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(rule.text(), words.join(" "));
            assert_eq!(rule.to_string(), rule.text());
            let pattern = rule.pattern();
            assert!(pattern.prefix().len() >= MIN_PREFIX_LEN);
            assert!((1..=MAX_VALUE_LEN).contains(&pattern.value_len()));
            assert!(!pattern.suffix().is_empty());
            if words.get(1) == Some(&"header") {
                assert_eq!(words.len(), 3);
                assert_eq!(pattern.prefix(), format!("\r\n{}: ", words[2]).as_bytes());
                assert_eq!(pattern.value_len(), IMF_FIXDATE_LEN);
                assert_eq!(pattern.suffix(), b"\r\n");
            }
            let udp = FlowKey {
                protocol: 17,
                src: "10.0.0.2".parse().unwrap(),
                src_port: 80,
                dst: "10.0.0.9".parse().unwrap(),
                dst_port: 40000,
            };
            assert!(!rule.matches(&udp));
            Some(rule)
        }
        Err(message) => {
            assert!(!message.is_empty());
            None
        }
    }
}

fn builtin() -> Vec<Arc<Pattern>> {
    vec![
        Arc::new(Pattern::http_date_header("Date").unwrap()),
        Arc::new(Pattern::new(b"tok=", vec![ValueByte::Printable; 8], b";").unwrap()),
    ]
}

/// Sorted cut points (mod `len + 1`) into segments, empty ones left out.
fn segments(cuts: &[u16], len: usize) -> Vec<(usize, usize)> {
    let mut points: Vec<usize> = cuts.iter().map(|&c| usize::from(c) % (len + 1)).collect();
    points.sort_unstable();
    points.push(len);
    let mut out = Vec::new();
    let mut prev = 0;
    for p in points {
        if p > prev {
            out.push((prev, p));
            prev = p;
        }
    }
    out
}

fn run(input: &[u8]) -> Option<()> {
    let mut input = Input(input);
    let flags = input.u8()?;
    let text_len = usize::from(input.u8()?);
    let text = String::from_utf8_lossy(input.take(text_len)?).into_owned();
    let mut patterns: Vec<Arc<Pattern>> = text
        .split('\n')
        .filter_map(parse_rule)
        .take(4)
        .map(|rule| rule.pattern().clone())
        .collect();
    if patterns.is_empty() || flags & 0x10 != 0 {
        patterns.extend(builtin());
    }
    let cut_counts = input.u8()?;
    let (pvm_k, svm_k) = (usize::from(cut_counts & 0x0f), usize::from(cut_counts >> 4));
    let pvm_cuts: Vec<u16> = (0..pvm_k).map(|_| input.u16()).collect::<Option<_>>()?;
    let svm_cuts: Vec<u16> = (0..svm_k).map(|_| input.u16()).collect::<Option<_>>()?;
    let mut order = input.u32()?;
    let (pvm_isn, svm_isn) = (input.u32()?, input.u32()?);
    let handshake = flags & 0x04 != 0;
    let fin = flags & 0x08 != 0;

    let (pvm, svm): (Vec<u8>, Vec<u8>) = match flags & 0x03 {
        0 => {
            let s = input.0.to_vec();
            (s.clone(), s)
        }
        2 => {
            let split = usize::from(input.u16()?);
            let s = input.0;
            let split = split % (s.len() + 1);
            (s[..split].to_vec(), s[split..].to_vec())
        }
        _ => {
            let n = input.u8()? % 16;
            let changes: Vec<(u16, u8)> = (0..n)
                .map(|_| Some((input.u16()?, input.u8()?)))
                .collect::<Option<_>>()?;
            let pvm = input.0.to_vec();
            let mut svm = pvm.clone();
            if !svm.is_empty() {
                for (at, byte) in changes {
                    let at = usize::from(at) % svm.len();
                    svm[at] = byte;
                }
            }
            (pvm, svm)
        }
    };

    // Offsets that lie in a value after some occurrence of some prefix in the PVM's stream.
    let mut in_value = vec![false; pvm.len()];
    for pattern in &patterns {
        let prefix = pattern.prefix();
        for end in prefix.len()..=pvm.len() {
            if &pvm[end - prefix.len()..end] == prefix {
                let stop = (end + pattern.value_len()).min(pvm.len());
                in_value[end..stop].iter_mut().for_each(|v| *v = true);
            }
        }
    }
    let common = pvm.len().min(svm.len());
    let outside: Vec<usize> = (0..common)
        .filter(|&o| pvm[o] != svm[o] && !in_value[o])
        .collect();
    let equal = pvm == svm;

    let rules: Arc<[(usize, Arc<Pattern>)]> = patterns.into_iter().enumerate().collect();
    let mut comparator = StreamComparator::with_equivalence(ComparatorLimits::default(), rules);

    // Each side's segments: an optional SYN, the data, an optional FIN (on the last one, or
    // alone for an empty stream). Offsets are data offsets; `None` for the SYN.
    struct Seg {
        seq: u32,
        syn: bool,
        fin: bool,
        range: (usize, usize),
    }
    let plan = |isn: u32, cuts: &[u16], len: usize| -> Vec<Seg> {
        let base = if handshake { isn.wrapping_add(1) } else { isn };
        let mut out = Vec::new();
        if handshake {
            out.push(Seg {
                seq: isn,
                syn: true,
                fin: false,
                range: (0, 0),
            });
        }
        for (a, b) in segments(cuts, len) {
            out.push(Seg {
                seq: base.wrapping_add(a as u32),
                syn: false,
                fin: false,
                range: (a, b),
            });
        }
        if fin {
            match out.last_mut() {
                Some(last) if !last.syn => last.fin = true,
                _ => out.push(Seg {
                    seq: base.wrapping_add(len as u32),
                    syn: false,
                    fin: true,
                    range: (len, len),
                }),
            }
        }
        out
    };
    // Without a handshake both sides run on the same numbers (a connection met mid-stream).
    let svm_isn = if handshake { svm_isn } else { pvm_isn };
    let pvm_segs = plan(pvm_isn, &pvm_cuts, pvm.len());
    let svm_segs = plan(svm_isn, &svm_cuts, svm.len());

    let pvm_frame = Bytes::from(pvm.clone());
    let mut actions = Vec::new();
    let (mut next_pvm, mut next_svm) = (0, 0);
    while next_pvm < pvm_segs.len() || next_svm < svm_segs.len() {
        let pvm_turn = if next_pvm == pvm_segs.len() {
            false
        } else if next_svm == svm_segs.len() {
            true
        } else {
            let bit = order & 1 != 0;
            order = order.rotate_right(1);
            bit
        };
        if pvm_turn {
            let s = &pvm_segs[next_pvm];
            let payload = &pvm_frame[s.range.0..s.range.1];
            let segment = Segment {
                seq: s.seq,
                ack: None,
                syn: s.syn,
                fin: s.fin,
                rst: false,
                window: 0,
                window_scale: None,
                payload,
            };
            comparator.push_pvm(
                PacketId(next_pvm as u64),
                &segment,
                &pvm_frame,
                &mut actions,
            );
            next_pvm += 1;
        } else {
            let s = &svm_segs[next_svm];
            let segment = Segment {
                seq: s.seq,
                ack: None,
                syn: s.syn,
                fin: s.fin,
                rst: false,
                window: 0,
                window_scale: None,
                payload: &svm[s.range.0..s.range.1],
            };
            comparator.push_svm(&segment, &mut actions);
            next_svm += 1;
        }
    }
    let mut counts = Vec::new();
    comparator.drain_equivalent(&mut counts);

    let mut released = HashSet::new();
    let mut checkpoint = false;
    for action in &actions {
        match action {
            // No acknowledgements here (`ack: None`): nothing to lower.
            Action::ReleaseLoweredAck { .. } => panic!("lowered without acknowledgements"),
            Action::Release(PacketId(id)) => {
                assert!(released.insert(*id), "packet {id} released twice");
                let s = &pvm_segs[*id as usize];
                assert!(
                    !outside.iter().any(|&o| s.range.0 <= o && o < s.range.1),
                    "packet {id} released with a difference outside every value: {:?} in {:?}",
                    outside,
                    s.range
                );
            }
            // No acknowledgements here: no SYN-ACK to supersede.
            Action::Discard(_) => panic!("discarded without a SYN-ACK"),
            Action::CheckpointNeeded(_) => checkpoint = true,
        }
    }
    if equal {
        assert!(
            !checkpoint,
            "equal streams needed a checkpoint: {actions:?}"
        );
        assert_eq!(
            released.len(),
            pvm_segs.len(),
            "equal streams held: {actions:?}"
        );
    }
    if !outside.is_empty() {
        assert!(
            checkpoint,
            "a difference at {outside:?} outside every value was not reported"
        );
    }
    let handed_back = comparator.reset();
    for PacketId(id) in handed_back {
        assert!(released.insert(id), "packet {id} released and handed back");
    }
    assert_eq!(released.len(), pvm_segs.len(), "a PVM packet was lost");
    Some(())
}

fuzz_target!(|input: &[u8]| {
    let _ = run(input);
});
