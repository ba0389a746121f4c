//! Property: batches of pipelined commands (random reads, writes with and
//! without FUA, zeroing, trims, flushes) give the same results as a plain
//! in-memory model, whichever reply format is negotiated. Requests within a
//! batch never overlap: NBD leaves the order of overlapping requests in
//! flight to the client, so a client that wants an order must wait.

mod common;

use std::collections::HashMap;

use colo_blockd::backend::FileBackend;
use colo_blockd::export::Export;
use colo_blockd::proto::consts::{SIMPLE_REPLY_MAGIC, cmd, cmd_flags, reply};
use colo_blockd::server::ServerConfig;
use common::raw::RawClient;
use common::{patterned_image, serve_pair};
use proptest::prelude::*;

const SIZE: u64 = 256 * 1024;

#[derive(Debug, Clone, Copy)]
enum Kind {
    Read,
    Write { fill: u8, fua: bool },
    Zero { no_hole: bool },
    Trim,
    Flush,
}

#[derive(Debug, Clone, Copy)]
struct Op {
    kind: Kind,
    offset: u64,
    length: u32,
}

impl Op {
    fn range(&self) -> Option<(u64, u64)> {
        match self.kind {
            Kind::Flush => None,
            _ => Some((self.offset, self.offset + u64::from(self.length))),
        }
    }

    fn overlaps(&self, other: &Op) -> bool {
        match (self.range(), other.range()) {
            (Some((a0, a1)), Some((b0, b1))) => a0 < b1 && b0 < a1,
            _ => false,
        }
    }
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let kind = prop_oneof![
        3 => Just(Kind::Read),
        3 => (any::<u8>(), any::<bool>()).prop_map(|(fill, fua)| Kind::Write { fill, fua }),
        1 => any::<bool>().prop_map(|no_hole| Kind::Zero { no_hole }),
        1 => Just(Kind::Trim),
        1 => Just(Kind::Flush),
    ];
    (kind, 0..SIZE, 0u32..=65536).prop_map(|(kind, offset, length)| {
        let length = length.min((SIZE - offset) as u32);
        Op {
            kind,
            offset,
            length,
        }
    })
}

/// Reads one reply of either format: (handle, error, read data).
fn read_reply(c: &mut RawClient, read_lengths: &HashMap<u64, u32>) -> (u64, u32, Vec<u8>) {
    let magic = u32::from_be_bytes(c.read_exact(4).try_into().unwrap());
    if magic == SIMPLE_REPLY_MAGIC {
        let rest = c.read_exact(12);
        let error = u32::from_be_bytes(rest[..4].try_into().unwrap());
        let handle = u64::from_be_bytes(rest[4..].try_into().unwrap());
        let len = read_lengths.get(&handle).copied().unwrap_or(0);
        let data = if error == 0 {
            c.read_exact(len as usize)
        } else {
            Vec::new()
        };
        return (handle, error, data);
    }
    let rest = c.read_exact(16);
    let flags = u16::from_be_bytes([rest[0], rest[1]]);
    assert_eq!(flags, reply::FLAG_DONE, "every reply is a single chunk");
    let kind = u16::from_be_bytes([rest[2], rest[3]]);
    let handle = u64::from_be_bytes(rest[4..12].try_into().unwrap());
    let len = u32::from_be_bytes(rest[12..16].try_into().unwrap());
    let payload = c.read_exact(len as usize);
    match kind {
        reply::TYPE_NONE => (handle, 0, Vec::new()),
        reply::TYPE_OFFSET_DATA => (handle, 0, payload[8..].to_vec()),
        reply::TYPE_ERROR => (
            handle,
            u32::from_be_bytes(payload[..4].try_into().unwrap()),
            Vec::new(),
        ),
        other => panic!("unexpected chunk type {other}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn pipelined_commands_match_an_in_memory_model(
        batches in prop::collection::vec(prop::collection::vec(op_strategy(), 1..24), 1..6),
        structured in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let img = patterned_image(dir.path(), "m.raw", SIZE as usize);
        let mut model = std::fs::read(&img).unwrap();
        let backend = FileBackend::open(&img, false).unwrap();
        let (mut c, server) = serve_pair(vec![Export::new("m", backend)], ServerConfig::default());
        c.greet(3);
        if structured {
            c.send_option(colo_blockd::proto::consts::opt::STRUCTURED_REPLY, &[]);
            c.read_option_reply();
        }
        c.go("m");
        let mut handle = 0u64;
        for batch in batches {
            let mut chosen: Vec<Op> = Vec::new();
            for op in batch {
                if !chosen.iter().any(|o| o.overlaps(&op)) {
                    chosen.push(op);
                }
            }
            let mut sent = HashMap::new();
            let mut read_lengths = HashMap::new();
            for op in &chosen {
                handle += 1;
                let (command, flags) = match op.kind {
                    Kind::Read => (cmd::READ, 0),
                    Kind::Write { fua, .. } => (cmd::WRITE, if fua { cmd_flags::FUA } else { 0 }),
                    Kind::Zero { no_hole } => (cmd::WRITE_ZEROES, if no_hole { cmd_flags::NO_HOLE } else { 0 }),
                    Kind::Trim => (cmd::TRIM, 0),
                    Kind::Flush => (cmd::FLUSH, 0),
                };
                let (offset, length) = match op.kind {
                    Kind::Flush => (0, 0),
                    _ => (op.offset, op.length),
                };
                c.request(command, flags, handle, offset, length);
                if let Kind::Write { fill, .. } = op.kind {
                    c.send(&vec![fill; op.length as usize]);
                }
                if let Kind::Read = op.kind {
                    read_lengths.insert(handle, op.length);
                }
                sent.insert(handle, *op);
            }
            // Every request answered exactly once, reads with the model's
            // bytes (no write in the batch overlaps them).
            for _ in 0..sent.len() {
                let (h, error, data) = read_reply(&mut c, &read_lengths);
                let op = sent.remove(&h).expect("reply to an unknown or repeated handle");
                prop_assert_eq!(error, 0, "{:?} failed", op);
                if let Kind::Read = op.kind {
                    let (start, end) = (op.offset as usize, op.offset as usize + op.length as usize);
                    prop_assert_eq!(&data[..], &model[start..end], "read {:?}", op);
                }
            }
            for op in &chosen {
                let (start, end) = (op.offset as usize, op.offset as usize + op.length as usize);
                match op.kind {
                    Kind::Write { fill, .. } => model[start..end].fill(fill),
                    // The file backend zeroes trimmed ranges.
                    Kind::Zero { .. } | Kind::Trim => model[start..end].fill(0),
                    Kind::Read | Kind::Flush => {}
                }
            }
        }
        c.request(cmd::DISC, 0, 0, 0, 0);
        prop_assert!(c.closed_by_server());
        prop_assert_eq!(server.join().unwrap(), Ok(()));
        prop_assert_eq!(std::fs::read(&img).unwrap(), model);
    }
}
