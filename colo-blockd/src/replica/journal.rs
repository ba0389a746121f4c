//! The write-ahead journal that makes a commit of a layer into the base
//! image S atomic across a `kill -9` (or a power cut, since every step that
//! matters is followed by `fdatasync`).
//!
//! # Format
//!
//! One file next to S (`<S>.colo-journal`). All integers are
//! little-endian.
//!
//! ```text
//! header   "COLOJNL1" | salt: u64 | image size: u64 | body length: u64 (header + records)
//! record*  kind: u8 (1 data, 2 zeroes) | offset: u64 | length: u64 | data (length bytes, kind 1 only)
//! trailer  "COLOJEND" | salt: u64 | body length: u64 | check: u64 = mix(salt, body length)
//! ```
//!
//! Between commits the header's magic is zeroes (or the file is empty).
//! The file is overwritten in place and never shrinks: rewriting blocks it
//! already has keeps `fdatasync` from having to commit file-system metadata
//! (block allocation, size) at every checkpoint. Bytes past the trailer are
//! leftovers of a longer earlier commit and mean nothing.
//!
//! # Protocol
//!
//! 1. write header and records from offset 0, `fdatasync`;
//! 2. write the trailer after them, `fdatasync` — **the commit point**;
//! 3. write the records into S, `fdatasync` S;
//! 4. zero the header's magic, `fdatasync`.
//!
//! On open, a journal whose header and trailer are valid is replayed (step 3
//! again; the records are absolute, so replaying twice is harmless) and
//! invalidated; a valid header without its trailer is a commit that never
//! reached its commit point and is invalidated without touching S. So S is
//! always exactly the old or the new checkpoint.
//!
//! A checkpoint is acknowledged after step 2; steps 3 and 4 run in the
//! background (`super::pending`), and the next commit starts only after
//! step 4: it must be durable before step 1 overwrites the records, or a
//! crash could leave the old header and trailer around records that are
//! partly new.
//!
//! The trailer is written only after the records are durable, so a valid
//! trailer implies valid records. The salt is fresh for every commit, so
//! guest data that happens to contain a trailer-like pattern (at the end of
//! a torn journal) cannot pass for a trailer: it would have to guess the salt.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::disk::Disk;
use super::layer::{Chunk, Layer};

const HEADER_MAGIC: &[u8; 8] = b"COLOJNL1";
const TRAILER_MAGIC: &[u8; 8] = b"COLOJEND";
const HEADER_LEN: u64 = 32;
const TRAILER_LEN: u64 = 32;
const RECORD_HEADER_LEN: usize = 17;
const KIND_DATA: u8 = 1;
const KIND_ZEROES: u8 = 2;
/// Records are gathered into writes of about this size: few system calls,
/// bounded extra memory.
const WRITE_BATCH: usize = 1 << 20;

/// Where the time of one commit went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitTiming {
    /// Steps 1–2: writing and syncing the journal, up to the commit point.
    pub journal: Duration,
    /// Step 3: writing the records into S and syncing it.
    pub image: Duration,
    /// Step 4: invalidating the journal.
    pub invalidate: Duration,
    /// Length of the journal (header, records, trailer).
    pub journal_bytes: u64,
}

impl CommitTiming {
    /// The whole commit.
    pub fn total(&self) -> Duration {
        self.journal + self.image + self.invalidate
    }
}

/// What opening found in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// The journal was empty or invalidated: the last commit finished, or
    /// the next one had not written its header yet (S is the old one).
    Clean,
    /// A commit had not reached its commit point: S is the old checkpoint.
    Discarded,
    /// A commit had passed its commit point: it was finished, S is the new
    /// checkpoint.
    Replayed,
}

/// Commits `layer` into `base` through `journal` (steps 1–4 above);
/// `None` when the layer is empty and there was nothing to do.
pub(crate) fn commit(
    disk: &mut Disk<'_>,
    journal: &File,
    base: &File,
    image_size: u64,
    layer: &Layer,
) -> io::Result<Option<CommitTiming>> {
    if layer.is_empty() {
        return Ok(None);
    }
    let start = Instant::now();
    let journal_bytes = write_journal(disk, journal, image_size, layer)?;
    let (image, invalidate) = apply_committed(disk, journal, base, layer)?;
    Ok(Some(CommitTiming {
        journal: start.elapsed() - image - invalidate,
        image,
        invalidate,
        journal_bytes,
    }))
}

/// Steps 3 and 4, once `layer` is journaled; returns how long each took.
pub(crate) fn apply_committed(
    disk: &mut Disk<'_>,
    journal: &File,
    base: &File,
    layer: &Layer,
) -> io::Result<(Duration, Duration)> {
    let start = Instant::now();
    layer.for_each_chunk(|offset, chunk| apply(disk, base, offset, chunk))?;
    disk.sync(base)?;
    let applied = Instant::now();
    invalidate(disk, journal)?;
    Ok((applied - start, applied.elapsed()))
}

/// Step 4.
fn invalidate(disk: &mut Disk<'_>, journal: &File) -> io::Result<()> {
    disk.write_at(journal, &[0u8; 8], 0)?;
    disk.sync(journal)
}

/// Steps 1 and 2; returns the journal's length. After it the commit is
/// decided: a crash from here on ends with the layer in S.
pub(crate) fn write_journal(
    disk: &mut Disk<'_>,
    journal: &File,
    image_size: u64,
    layer: &Layer,
) -> io::Result<u64> {
    let salt = fresh_salt();
    let (extents, data_bytes) = layer.extents_and_data_bytes();
    let body_len = HEADER_LEN + extents * RECORD_HEADER_LEN as u64 + data_bytes;
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    batch.extend_from_slice(HEADER_MAGIC);
    batch.extend_from_slice(&salt.to_le_bytes());
    batch.extend_from_slice(&image_size.to_le_bytes());
    batch.extend_from_slice(&body_len.to_le_bytes());
    let mut written = 0u64;
    layer.for_each_chunk(|offset, chunk| {
        let (kind, len, data) = match &chunk {
            Chunk::Data(b) => (KIND_DATA, b.len() as u64, &b[..]),
            Chunk::Zeroes(n) => (KIND_ZEROES, *n, &[][..]),
        };
        batch.push(kind);
        batch.extend_from_slice(&offset.to_le_bytes());
        batch.extend_from_slice(&len.to_le_bytes());
        batch.extend_from_slice(data);
        if batch.len() >= WRITE_BATCH {
            disk.write_at(journal, &batch, written)?;
            written += batch.len() as u64;
            batch.clear();
        }
        Ok(())
    })?;
    if !batch.is_empty() {
        disk.write_at(journal, &batch, written)?;
        written += batch.len() as u64;
    }
    if written != body_len {
        // The header promised another length: the trailer would be looked
        // for in the wrong place and the commit silently never replayed.
        return Err(io::Error::other(format!(
            "journal body of {written} bytes, header says {body_len}"
        )));
    }
    disk.sync(journal)?;
    disk.write_at(journal, &trailer(salt, written), written)?;
    disk.sync(journal)?;
    Ok(written + TRAILER_LEN)
}

fn apply(disk: &mut Disk<'_>, base: &File, offset: u64, chunk: Chunk) -> io::Result<()> {
    match chunk {
        Chunk::Data(b) => disk.write_at(base, &b, offset),
        Chunk::Zeroes(n) => disk.write_zeroes_at(base, offset, n),
    }
}

/// Brings S to a checkpoint after a crash: replays a journal that passed its
/// commit point, discards one that did not, and leaves the journal
/// invalidated.
pub(crate) fn recover(
    disk: &mut Disk<'_>,
    journal: &File,
    base: &File,
    image_size: u64,
) -> io::Result<Recovery> {
    let len = journal.metadata()?.len();
    if len < HEADER_LEN {
        return Ok(Recovery::Clean);
    }
    let mut header = [0u8; HEADER_LEN as usize];
    journal.read_exact_at(&mut header, 0)?;
    if &header[..8] != HEADER_MAGIC {
        return Ok(Recovery::Clean);
    }
    // Up to the trailer the header announces; what follows is leftovers.
    let wanted = u64_at(&header, 24).saturating_add(TRAILER_LEN).min(len);
    let mut bytes = vec![0u8; wanted as usize];
    journal.read_exact_at(&mut bytes, 0)?;
    let outcome = match committed_body(&bytes) {
        Some(body) => {
            for (offset, chunk) in parse_records(body, image_size)? {
                apply(disk, base, offset, chunk)?;
            }
            disk.sync(base)?;
            Recovery::Replayed
        }
        None => Recovery::Discarded,
    };
    invalidate(disk, journal)?;
    Ok(outcome)
}

/// The journal's header and records if header and trailer are valid.
fn committed_body(journal: &[u8]) -> Option<&[u8]> {
    if journal.len() < HEADER_LEN as usize || &journal[..8] != HEADER_MAGIC {
        return None;
    }
    let salt = u64_at(journal, 8);
    let body_len = u64_at(journal, 24);
    let body_end = usize::try_from(body_len).ok()?;
    let trailer_end = body_end.checked_add(TRAILER_LEN as usize)?;
    let trailer_bytes = journal.get(body_end..trailer_end)?;
    (trailer_bytes == trailer(salt, body_len)).then_some(&journal[..body_end])
}

/// The records of a committed journal. A committed journal that does not
/// parse is not a crash leftover but damage: opening fails rather than
/// guess.
fn parse_records(body: &[u8], image_size: u64) -> io::Result<Vec<(u64, Chunk)>> {
    let corrupt = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("committed journal is corrupt: {what}"),
        )
    };
    if u64_at(body, 16) != image_size {
        return Err(corrupt("written for an image of another size"));
    }
    let mut records = Vec::new();
    let mut at = HEADER_LEN as usize;
    while at < body.len() {
        if body.len() - at < RECORD_HEADER_LEN {
            return Err(corrupt("truncated record header"));
        }
        let kind = body[at];
        let offset = u64_at(body, at + 1);
        let len = u64_at(body, at + 9);
        at += RECORD_HEADER_LEN;
        if offset.checked_add(len).is_none_or(|end| end > image_size) {
            return Err(corrupt("record beyond the end of the image"));
        }
        let chunk = match kind {
            KIND_DATA => {
                let end = at
                    .checked_add(len as usize)
                    .filter(|&end| end <= body.len())
                    .ok_or_else(|| corrupt("truncated record data"))?;
                let data = Bytes::copy_from_slice(&body[at..end]);
                at = end;
                Chunk::Data(data)
            }
            KIND_ZEROES => Chunk::Zeroes(len),
            _ => return Err(corrupt("unknown record kind")),
        };
        records.push((offset, chunk));
    }
    Ok(records)
}

fn trailer(salt: u64, body_len: u64) -> [u8; TRAILER_LEN as usize] {
    let mut t = [0u8; TRAILER_LEN as usize];
    t[..8].copy_from_slice(TRAILER_MAGIC);
    t[8..16].copy_from_slice(&salt.to_le_bytes());
    t[16..24].copy_from_slice(&body_len.to_le_bytes());
    t[24..].copy_from_slice(&mix(salt, body_len).to_le_bytes());
    t
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// splitmix64's finalizer over both values: any change of either changes
/// the check.
fn mix(salt: u64, body_len: u64) -> u64 {
    let mut z = salt ^ body_len.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Different for every commit of every process: the clock, the process id
/// and a counter, mixed.
fn fresh_salt() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    mix(nanos ^ u64::from(std::process::id()) << 32, count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trailer_only_matches_its_own_salt_and_length() {
        let body = {
            let mut b = Vec::new();
            b.extend_from_slice(HEADER_MAGIC);
            b.extend_from_slice(&7u64.to_le_bytes());
            b.extend_from_slice(&4096u64.to_le_bytes());
            b.extend_from_slice(&100u64.to_le_bytes());
            b.resize(100, 0);
            b
        };
        let mut journal = body.clone();
        journal.extend_from_slice(&trailer(7, 100));
        assert_eq!(committed_body(&journal), Some(&body[..]));
        // Leftovers of an earlier, longer commit after the trailer are
        // ignored.
        journal.extend_from_slice(&[0xee; 300]);
        assert_eq!(committed_body(&journal), Some(&body[..]));
        // A torn trailer (any prefix of it) never validates.
        for cut in 0..TRAILER_LEN as usize {
            assert_eq!(committed_body(&journal[..body.len() + cut]), None);
        }
        // Nor does the trailer of another commit at the same place.
        let mut other_salt = body.clone();
        other_salt.extend_from_slice(&trailer(8, 100));
        assert_eq!(committed_body(&other_salt), None);
        // Nor anything once the header is invalidated.
        journal[..8].fill(0);
        assert_eq!(committed_body(&journal), None);
    }

    #[test]
    fn records_beyond_the_image_are_refused() {
        let body = |image_size: u64| {
            let mut b = Vec::new();
            b.extend_from_slice(HEADER_MAGIC);
            b.extend_from_slice(&1u64.to_le_bytes());
            b.extend_from_slice(&image_size.to_le_bytes());
            b.extend_from_slice(&(HEADER_LEN + RECORD_HEADER_LEN as u64).to_le_bytes());
            b.push(KIND_ZEROES);
            b.extend_from_slice(&4000u64.to_le_bytes());
            b.extend_from_slice(&200u64.to_le_bytes());
            b
        };
        let err = parse_records(&body(4096), 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(parse_records(&body(4200), 4200).unwrap().len(), 1);
        // A journal written for another image is not replayed into this one.
        assert!(parse_records(&body(4200), 8192).is_err());
    }
}
