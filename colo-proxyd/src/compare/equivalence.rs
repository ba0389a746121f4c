//! Declared equivalence: bytes the operator knows differ between the VMs without changing the
//! stream's length (a `Date:` header's value), tolerated by the comparison of one connection.
//!
//! A [`Pattern`] is a fixed prefix, a value of fixed length whose every byte has a class (a
//! digit, a letter, printable ASCII, or one exact byte), and a fixed suffix. The PVM's stream
//! is scanned in order for the prefix; the value that follows it is a *region* where the two
//! VMs' bytes may differ, as long as both sides' bytes fit the value's classes. Everything
//! outside regions is compared exactly, as without a rule, so the prefix and suffix are equal
//! on both sides and the lengths are equal by construction (a region has a fixed length at a
//! fixed offset of both streams).
//!
//! A region is *tentative* from its prefix until the PVM's suffix is seen (the value may
//! still turn out not to fit, or the suffix not to follow), then *confirmed*. A PVM segment
//! whose bytes differ from the SVM's inside a region is held until the region is confirmed
//! and both sides' prefix and suffix around it are verified; a region refuted after a
//! difference was tolerated in it is a difference after all ([`super::CheckpointReason::PayloadDiffers`]
//! at the first tolerated offset). The scan follows the PVM's bytes in stream order; a PVM
//! segment after a gap restarts it, so a region the scan did not see is compared exactly
//! (a checkpoint too many, never a difference let through).

use std::collections::VecDeque;
use std::sync::Arc;

use super::stream_bytes::{StreamBytes, Tolerance};

/// What one byte of a pattern's value may be, on either side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueByte {
    /// An ASCII digit.
    Digit,
    /// An ASCII letter.
    Letter,
    /// Printable ASCII, space included (0x20..=0x7e): never CR, LF or a control byte, so a
    /// value cannot swallow a line end.
    Printable,
    /// Exactly this byte (both sides have it, so it never differs).
    Exact(u8),
}

impl ValueByte {
    fn admits(self, byte: u8) -> bool {
        match self {
            ValueByte::Digit => byte.is_ascii_digit(),
            ValueByte::Letter => byte.is_ascii_alphabetic(),
            ValueByte::Printable => (0x20..=0x7e).contains(&byte),
            ValueByte::Exact(b) => byte == b,
        }
    }
}

/// The length of an IMF-fixdate (RFC 9110 section 5.6.7), `Sun, 06 Nov 1994 08:49:37 GMT`.
pub const IMF_FIXDATE_LEN: usize = 29;

/// The shortest prefix a pattern may have: a shorter one would find regions everywhere.
pub const MIN_PREFIX_LEN: usize = 4;

/// The longest value a pattern may have.
pub const MAX_VALUE_LEN: usize = 64;

/// A prefix, a fixed-length value that may differ, and a suffix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    prefix: Vec<u8>,
    value: Vec<ValueByte>,
    suffix: Vec<u8>,
    /// The prefix's failure function (Knuth–Morris–Pratt), for a scan that never looks back.
    failure: Vec<usize>,
}

impl Pattern {
    /// A pattern, checked: a prefix of at least [`MIN_PREFIX_LEN`] bytes, a value of 1 to
    /// [`MAX_VALUE_LEN`] bytes with at least one that may differ, a suffix of at least one
    /// byte (the value's end is checked, not assumed).
    pub fn new(prefix: &[u8], value: Vec<ValueByte>, suffix: &[u8]) -> Result<Pattern, String> {
        if prefix.len() < MIN_PREFIX_LEN {
            return Err(format!(
                "the prefix must be at least {MIN_PREFIX_LEN} bytes long"
            ));
        }
        if value.is_empty() || value.len() > MAX_VALUE_LEN {
            return Err(format!("the value must be 1 to {MAX_VALUE_LEN} bytes long"));
        }
        if value.iter().all(|v| matches!(v, ValueByte::Exact(_))) {
            return Err("no byte of the value may differ".into());
        }
        if suffix.is_empty() {
            return Err("the suffix must not be empty".into());
        }
        let mut failure = vec![0; prefix.len()];
        let mut k = 0;
        for i in 1..prefix.len() {
            while k > 0 && prefix[i] != prefix[k] {
                k = failure[k - 1];
            }
            if prefix[i] == prefix[k] {
                k += 1;
            }
            failure[i] = k;
        }
        Ok(Pattern {
            prefix: prefix.to_vec(),
            value,
            suffix: suffix.to_vec(),
            failure,
        })
    }

    /// An HTTP header line `NAME: ` whose value is an IMF-fixdate, ended by CRLF. The prefix
    /// starts with the CRLF that ends the line before, so `X-NAME:` is not matched.
    pub fn http_date_header(name: &str) -> Result<Pattern, String> {
        let token = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if name.is_empty() || !name.chars().all(token) {
            return Err(format!("{name:?} is not a header name"));
        }
        let prefix = format!("\r\n{name}: ");
        Pattern::new(prefix.as_bytes(), imf_fixdate(), b"\r\n")
    }

    /// The prefix.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// The value's length.
    pub fn value_len(&self) -> usize {
        self.value.len()
    }

    /// The suffix.
    pub fn suffix(&self) -> &[u8] {
        &self.suffix
    }

    /// Whether `byte` fits the value at `position`.
    pub fn admits(&self, position: usize, byte: u8) -> bool {
        self.value.get(position).is_some_and(|v| v.admits(byte))
    }

    /// The prefix's match length after `byte`, from `matched` bytes matched.
    fn advance(&self, matched: usize, byte: u8) -> usize {
        let mut k = if matched == self.prefix.len() {
            self.failure[matched - 1]
        } else {
            matched
        };
        while k > 0 && self.prefix[k] != byte {
            k = self.failure[k - 1];
        }
        if self.prefix[k] == byte { k + 1 } else { k }
    }
}

/// The classes of an IMF-fixdate's bytes: `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn imf_fixdate() -> Vec<ValueByte> {
    use ValueByte::{Digit as D, Exact as E, Letter as L};
    let value = vec![
        L,
        L,
        L,
        E(b','),
        E(b' '),
        D,
        D,
        E(b' '),
        L,
        L,
        L,
        E(b' '),
        D,
        D,
        D,
        D,
        E(b' '),
        D,
        D,
        E(b':'),
        D,
        D,
        E(b':'),
        D,
        D,
        E(b' '),
        E(b'G'),
        E(b'M'),
        E(b'T'),
    ];
    debug_assert_eq!(value.len(), IMF_FIXDATE_LEN);
    value
}

/// What a connection released under one rule: reported to the engine, which sums them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EquivalentRelease {
    /// The rule's id, as given to [`super::StreamComparator::with_equivalence`].
    pub rule: usize,
    /// PVM segments released whose bytes differed from the SVM's inside a region.
    pub segments: u64,
    /// Bytes of the regions (whole values) that differed and were released.
    pub bytes: u64,
}

/// A value in the PVM's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    start: i64,
    end: i64,
    /// Index into [`Equivalence::patterns`].
    pattern: usize,
    /// The PVM's suffix followed the value.
    confirmed: bool,
    /// The first offset where the two sides' bytes differed.
    first_difference: Option<i64>,
}

/// Where the PVM's scan is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Looking for a prefix.
    Searching,
    /// Inside the newest region's value or suffix, at this many bytes after the value start.
    Region { position: usize },
}

/// One connection's equivalence state.
#[derive(Debug)]
pub(super) struct Equivalence {
    /// The rule ids and patterns that apply to the connection.
    patterns: Arc<[(usize, Arc<Pattern>)]>,
    /// Per pattern, how much of its prefix the PVM's last bytes match.
    matched: Vec<usize>,
    scan: Scan,
    /// The next PVM offset the scan expects.
    scanned_to: i64,
    /// Sorted, disjoint; the newest is the one a [`Scan::Region`] is in.
    regions: VecDeque<Region>,
    /// Released since the engine last asked.
    pending: Vec<EquivalentRelease>,
}

impl Equivalence {
    pub(super) fn new(patterns: Arc<[(usize, Arc<Pattern>)]>) -> Self {
        Equivalence {
            matched: vec![0; patterns.len()],
            patterns,
            scan: Scan::Searching,
            scanned_to: 0,
            regions: VecDeque::new(),
            pending: Vec::new(),
        }
    }

    /// The same rules, nothing scanned (after a checkpoint: the stream restarts at offset 0).
    pub(super) fn restarted(&self) -> Self {
        Equivalence::new(self.patterns.clone())
    }

    fn pattern(&self, index: usize) -> &Pattern {
        &self.patterns[index].1
    }

    /// The PVM's bytes `data` at `start`, before they are compared: finds, confirms and
    /// refutes regions. Returns the first tolerated offset of a refuted region.
    pub(super) fn scan_pvm(&mut self, start: i64, data: &[u8]) -> Result<(), i64> {
        let end = start + data.len() as i64;
        if end <= self.scanned_to {
            return Ok(());
        }
        if start > self.scanned_to {
            // A gap: what the scan knew does not continue here.
            self.abandon()?;
            self.matched.iter_mut().for_each(|m| *m = 0);
            self.scanned_to = start;
        }
        let skip = (self.scanned_to - start) as usize;
        for (i, &byte) in data[skip..].iter().enumerate() {
            let offset = self.scanned_to + i as i64;
            self.step(offset, byte)?;
        }
        self.scanned_to = end;
        Ok(())
    }

    fn step(&mut self, offset: i64, byte: u8) -> Result<(), i64> {
        if let Scan::Region { position } = self.scan {
            let Some(region) = self.regions.back() else {
                self.scan = Scan::Searching;
                return self.step(offset, byte);
            };
            let pattern = self.pattern(region.pattern);
            let (len, suffix_len) = (pattern.value_len(), pattern.suffix().len());
            let fits = if position < len {
                pattern.admits(position, byte)
            } else {
                pattern.suffix()[position - len] == byte
            };
            if !fits {
                self.abandon()?;
            } else if position + 1 == len + suffix_len {
                if let Some(region) = self.regions.back_mut() {
                    region.confirmed = true;
                }
                self.scan = Scan::Searching;
            } else {
                self.scan = Scan::Region {
                    position: position + 1,
                };
            }
        }
        // The prefixes are followed through values and suffixes too, so that a prefix that
        // begins inside a suffix (a header right after another) is found.
        let searching = self.scan == Scan::Searching;
        let mut found = None;
        for (index, matched) in self.matched.iter_mut().enumerate() {
            let pattern = &self.patterns[index].1;
            *matched = pattern.advance(*matched, byte);
            if searching && found.is_none() && *matched == pattern.prefix().len() {
                found = Some(index);
            }
        }
        if let Some(pattern) = found {
            let len = self.pattern(pattern).value_len() as i64;
            self.regions.push_back(Region {
                start: offset + 1,
                end: offset + 1 + len,
                pattern,
                confirmed: false,
                first_difference: None,
            });
            self.scan = Scan::Region { position: 0 };
        }
        Ok(())
    }

    /// The region being scanned is not one: forgotten, or, when a difference was tolerated in
    /// it, the difference is reported.
    fn abandon(&mut self) -> Result<(), i64> {
        if self.scan == Scan::Searching {
            return Ok(());
        }
        self.scan = Scan::Searching;
        match self.regions.pop_back() {
            Some(Region {
                first_difference: Some(offset),
                ..
            }) => Err(offset),
            _ => Ok(()),
        }
    }

    /// Whether a PVM segment's bytes `[start, end)` must wait: they differ from the SVM's in
    /// a region that is not confirmed yet, or whose prefix and suffix are not yet verified on
    /// both sides (bytes below `floor` were released, so verified).
    pub(super) fn holds_back(&self, start: i64, end: i64, floor: i64, bytes: &StreamBytes) -> bool {
        self.regions
            .iter()
            .filter(|r| r.first_difference.is_some() && r.start < end && start < r.end)
            .any(|r| {
                let pattern = self.pattern(r.pattern);
                let from = (r.start - pattern.prefix().len() as i64).max(floor);
                let to = r.end + pattern.suffix().len() as i64;
                !r.confirmed || !bytes.verified(from, to)
            })
    }

    /// A PVM segment with bytes `[start, end)` was released.
    pub(super) fn released(&mut self, start: i64, end: i64) {
        let mut counted: Option<usize> = None;
        for r in &self.regions {
            if r.first_difference.is_some()
                && r.start < end
                && start < r.end
                && counted != Some(r.pattern)
            {
                counted = Some(r.pattern);
                let rule = self.patterns[r.pattern].0;
                add(&mut self.pending, rule, 1, 0);
            }
        }
    }

    /// Everything below `floor` was released: regions wholly below it are done.
    pub(super) fn forget_below(&mut self, floor: i64) {
        while let Some(r) = self.regions.front() {
            if r.end > floor || (self.scan != Scan::Searching && self.regions.len() == 1) {
                break;
            }
            if r.first_difference.is_some() {
                let rule = self.patterns[r.pattern].0;
                add(&mut self.pending, rule, 0, (r.end - r.start) as u64);
            }
            self.regions.pop_front();
        }
    }

    /// What was released under each rule since the last call, appended to `out`.
    pub(super) fn drain(&mut self, out: &mut Vec<EquivalentRelease>) {
        out.append(&mut self.pending);
    }
}

fn add(pending: &mut Vec<EquivalentRelease>, rule: usize, segments: u64, bytes: u64) {
    match pending.iter_mut().find(|p| p.rule == rule) {
        Some(p) => {
            p.segments += segments;
            p.bytes += bytes;
        }
        None => pending.push(EquivalentRelease {
            rule,
            segments,
            bytes,
        }),
    }
}

impl Tolerance for Equivalence {
    fn tolerates(&mut self, offset: i64, kept: u8, given: u8) -> bool {
        // The newest regions are the likeliest.
        let Some(region) = self
            .regions
            .iter_mut()
            .rev()
            .find(|r| r.start <= offset && offset < r.end)
        else {
            return false;
        };
        let pattern = &self.patterns[region.pattern].1;
        let position = (offset - region.start) as usize;
        if !pattern.admits(position, kept) || !pattern.admits(position, given) {
            return false;
        }
        region.first_difference.get_or_insert(offset);
        true
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use proptest::prelude::*;

    use super::super::{
        Action, CheckpointReason, ComparatorLimits, PacketId, Segment, StreamComparator,
    };
    use super::*;

    const PVM: &[u8] =
        b"HTTP/1.1 200 OK\r\nDate: Sat, 05 Dec 2026 17:13:54 GMT\r\nServer: x\r\n\r\nbody";
    const SVM: &[u8] =
        b"HTTP/1.1 200 OK\r\nDate: Sat, 05 Dec 2026 17:13:55 GMT\r\nServer: x\r\n\r\nbody";

    fn comparator() -> StreamComparator {
        let pattern = Arc::new(Pattern::http_date_header("Date").unwrap());
        StreamComparator::with_equivalence(ComparatorLimits::default(), vec![(0, pattern)].into())
    }

    fn segment(seq: u32, payload: &[u8]) -> Segment<'_> {
        Segment {
            seq,
            ack: None,
            syn: false,
            fin: false,
            rst: false,
            window: 0,
            window_scale: None,
            payload,
        }
    }

    /// Feeds the PVM's stream cut at `pvm_cut` and the SVM's at `svm_cut`, the SVM first when
    /// `svm_first`; returns the actions.
    fn run(pvm: &[u8], svm: &[u8], pvm_cut: usize, svm_cut: usize, svm_first: bool) -> Vec<Action> {
        let mut c = comparator();
        let mut actions = Vec::new();
        let pvm_parts = [(0, &pvm[..pvm_cut]), (pvm_cut, &pvm[pvm_cut..])];
        let svm_parts = [(0, &svm[..svm_cut]), (svm_cut, &svm[svm_cut..])];
        let mut id = 0;
        let mut feed_pvm =
            |c: &mut StreamComparator, actions: &mut Vec<Action>, (at, part): (usize, &[u8])| {
                if part.is_empty() {
                    return;
                }
                let frame = Bytes::copy_from_slice(part);
                c.push_pvm(
                    PacketId(id),
                    &segment(1000 + at as u32, &frame),
                    &frame,
                    actions,
                );
                id += 1;
            };
        let feed_svm =
            |c: &mut StreamComparator, actions: &mut Vec<Action>, (at, part): (usize, &[u8])| {
                if !part.is_empty() {
                    c.push_svm(&segment(1000 + at as u32, part), actions);
                }
            };
        if svm_first {
            svm_parts
                .into_iter()
                .for_each(|p| feed_svm(&mut c, &mut actions, p));
            pvm_parts
                .into_iter()
                .for_each(|p| feed_pvm(&mut c, &mut actions, p));
        } else {
            feed_pvm(&mut c, &mut actions, pvm_parts[0]);
            feed_svm(&mut c, &mut actions, svm_parts[0]);
            feed_pvm(&mut c, &mut actions, pvm_parts[1]);
            feed_svm(&mut c, &mut actions, svm_parts[1]);
        }
        actions
    }

    fn needs_checkpoint(actions: &[Action]) -> bool {
        actions
            .iter()
            .any(|a| matches!(a, Action::CheckpointNeeded(_)))
    }

    #[test]
    fn a_date_that_differs_is_released_as_the_pvms() {
        let actions = run(PVM, SVM, 30, 50, false);
        assert!(!needs_checkpoint(&actions), "{actions:?}");
        assert_eq!(actions.len(), 2);
        let mut c = comparator();
        let mut actions = Vec::new();
        let frame = Bytes::from_static(PVM);
        c.push_pvm(PacketId(0), &segment(0, PVM), &frame, &mut actions);
        c.push_svm(&segment(0, SVM), &mut actions);
        assert_eq!(actions, vec![Action::Release(PacketId(0))]);
        let mut released = Vec::new();
        c.drain_equivalent(&mut released);
        assert_eq!(
            released,
            vec![EquivalentRelease {
                rule: 0,
                segments: 1,
                bytes: 29
            }]
        );
    }

    #[test]
    fn a_difference_in_the_body_still_needs_a_checkpoint() {
        let mut svm = SVM.to_vec();
        *svm.last_mut().unwrap() = b'X';
        let actions = run(PVM, &svm, 30, 50, false);
        assert!(actions.contains(&Action::CheckpointNeeded(
            CheckpointReason::PayloadDiffers {
                offset: PVM.len() as i64 - 1
            }
        )));
    }

    proptest! {
        /// Equal-length values that fit the date's shape never need a checkpoint, at every cut
        /// of either stream; a difference outside the value, or one that breaks the shape,
        /// always does.
        #[test]
        fn differences_are_tolerated_exactly_inside_the_value(
            pvm_cut in 0..PVM.len(),
            svm_cut in 0..PVM.len(),
            svm_first in any::<bool>(),
            at in 0..PVM.len(),
            byte in any::<u8>(),
        ) {
            prop_assert!(!needs_checkpoint(&run(PVM, SVM, pvm_cut, svm_cut, svm_first)));
            let mut svm = SVM.to_vec();
            svm[at] = byte;
            let value = 23..23 + IMF_FIXDATE_LEN;
            let tolerated = svm[at] == PVM[at]
                || (value.contains(&at) && imf_fixdate()[at - 23].admits(byte));
            prop_assert_eq!(!needs_checkpoint(&run(PVM, &svm, pvm_cut, svm_cut, svm_first)), tolerated);
            // A length change is never equivalent: one byte more in the SVM's value.
            let mut longer = SVM[..40].to_vec();
            longer.push(b'1');
            longer.extend_from_slice(&SVM[40..]);
            let actions = run(PVM, &longer, pvm_cut, svm_cut.min(longer.len() - 1), svm_first);
            prop_assert!(needs_checkpoint(&actions) || actions.len() < 2);
        }
    }
}
