//! Hostile clients: random bytes, sessions cut at every byte, absurd
//! lengths, endless options. The server must answer or drop that client
//! only, keep serving others, and never change a byte of the image.

mod common;

use colo_blockd::proto::consts::{IHAVEOPT, cmd, opt, rep};
use colo_blockd::proto::handshake::OptionHeader;
use colo_blockd::proto::request::RequestHeader;
use common::raw::RawClient;
use common::{Op, TestServer, file_bytes};

const SIZE: usize = 1 << 20;

fn original() -> Vec<u8> {
    (0..SIZE).map(|i| (i % 251) as u8).collect()
}

/// A small deterministic generator, so a failure reproduces.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// The server still serves a well-behaved client correctly.
fn assert_serves(s: &TestServer) {
    let (mut c, size) = RawClient::open(&s.socket, "a", false);
    assert_eq!(size, SIZE as u64);
    c.request(cmd::READ, 0, 42, 1000, 64);
    assert_eq!(c.read_simple(64), (0, 42, original()[1000..1064].to_vec()));
    c.request(cmd::DISC, 0, 43, 0, 0);
}

fn assert_image_unchanged(s: &TestServer) {
    assert_eq!(file_bytes(&s.images[0], 0, SIZE), original());
    let modifying = s
        .ops(0)
        .into_iter()
        .filter(|op| !matches!(op, Op::Read { .. } | Op::Flush))
        .collect::<Vec<_>>();
    assert!(modifying.is_empty(), "backend was asked to {modifying:?}");
}

fn go_option(name: &str) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    let mut out = OptionHeader {
        option: opt::GO,
        length: data.len() as u32,
    }
    .encode()
    .to_vec();
    out.extend_from_slice(&data);
    out
}

#[test]
fn random_bytes_in_the_handshake_and_in_transmission() {
    let s = TestServer::start(&[("a", SIZE, false)]);
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for round in 0..48 {
        let mut c = RawClient::connect(&s.socket);
        let len = (rng.next() % 4096) as usize + 1;
        match round % 3 {
            // Garbage instead of client flags.
            0 => c.send_lossy(&rng.bytes(len)),
            // Valid flags, garbage options.
            1 => {
                c.greet(3);
                c.send_lossy(&rng.bytes(len));
            }
            // A real session, then garbage requests.
            _ => {
                c.greet(3);
                c.go("a");
                c.send_lossy(&rng.bytes(len));
            }
        }
        // Whatever the server answers, it ends this session (garbage never
        // makes a request magic); the client sees the close.
        let _ = c.stream.shutdown(std::net::Shutdown::Write);
        assert!(c.closed_by_server(), "round {round}");
    }
    assert_serves(&s);
    assert_image_unchanged(&s);
}

/// A valid session: flags, structured replies, GO, a 512-byte write, DISC.
fn session() -> (Vec<u8>, usize) {
    let mut out = 3u32.to_be_bytes().to_vec();
    out.extend_from_slice(
        &OptionHeader {
            option: opt::STRUCTURED_REPLY,
            length: 0,
        }
        .encode(),
    );
    out.extend_from_slice(&go_option("a"));
    out.extend_from_slice(
        &RequestHeader {
            flags: 0,
            command: cmd::WRITE,
            handle: 1,
            offset: 4096,
            length: 512,
        }
        .encode(),
    );
    out.extend_from_slice(&[0xee; 512]);
    let write_complete = out.len();
    out.extend_from_slice(
        &RequestHeader {
            flags: 0,
            command: cmd::DISC,
            handle: 2,
            offset: 0,
            length: 0,
        }
        .encode(),
    );
    (out, write_complete)
}

#[test]
fn a_session_cut_at_every_byte_writes_nothing() {
    let s = TestServer::start(&[("a", SIZE, false)]);
    let (bytes, write_complete) = session();
    // Every cut before the write's last payload byte; the cuts inside the
    // payload are sampled (every 7th) to keep the run short.
    let header_end = write_complete - 512;
    let cuts = (0..header_end).chain((header_end..write_complete).step_by(7));
    for cut in cuts {
        let mut c = RawClient::connect(&s.socket);
        c.read_exact(18);
        c.send_lossy(&bytes[..cut]);
        let _ = c.stream.shutdown(std::net::Shutdown::Write);
        assert!(c.closed_by_server(), "cut at {cut}");
    }
    assert_serves(&s);
    assert_image_unchanged(&s);

    // The whole session does write, exactly its 512 bytes.
    let mut c = RawClient::connect(&s.socket);
    c.read_exact(18);
    c.send(&bytes);
    assert!(c.closed_by_server());
    let mut expected = original();
    expected[4096..4608].fill(0xee);
    assert_eq!(file_bytes(&s.images[0], 0, SIZE), expected);
}

#[test]
fn absurd_lengths_are_refused_without_buffering() {
    let s = TestServer::start(&[("a", SIZE, false)]);
    // An option claiming 4 GiB of data: the server hangs up.
    let mut c = RawClient::connect(&s.socket);
    c.greet(3);
    c.send(
        &OptionHeader {
            option: opt::GO,
            length: u32::MAX,
        }
        .encode(),
    );
    assert!(c.closed_by_server());

    // A write announcing 4 GiB: EINVAL for that handle, then the close (the
    // payload cannot be skipped unread).
    let (mut c, _) = RawClient::open(&s.socket, "a", false);
    c.request(cmd::WRITE, 0, 7, 0, u32::MAX);
    c.send_lossy(&[0xff; 4096]);
    assert_eq!(c.read_simple(0), (22, 7, vec![]));
    assert!(c.closed_by_server());

    // Just over the maximum block size: the same.
    let (mut c, _) = RawClient::open(&s.socket, "a", false);
    c.request(cmd::WRITE, 0, 8, 0, (32 << 20) + 1);
    assert_eq!(c.read_simple(0), (22, 8, vec![]));
    assert!(c.closed_by_server());

    // A 4 GiB read or zeroing moves no payload: EINVAL, session goes on.
    let (mut c, _) = RawClient::open(&s.socket, "a", false);
    c.request(cmd::READ, 0, 9, 0, u32::MAX);
    assert_eq!(c.read_simple(0), (22, 9, vec![]));
    c.request(cmd::WRITE_ZEROES, 0, 10, 0, u32::MAX);
    assert_eq!(c.read_simple(0), (28, 10, vec![]));
    c.request(cmd::READ, 0, 11, 0, 16);
    assert_eq!(c.read_simple(16), (0, 11, original()[..16].to_vec()));

    assert_serves(&s);
    assert_image_unchanged(&s);
}

#[test]
fn unknown_client_flags_and_endless_options_end_the_session() {
    let s = TestServer::start(&[("a", SIZE, false)]);
    let mut c = RawClient::connect(&s.socket);
    c.greet(0x8000_0003);
    assert!(c.closed_by_server());

    // Options forever, each answered ERR_UNSUP, until the server gives up.
    let mut c = RawClient::connect(&s.socket);
    c.greet(3);
    let mut answered = 0;
    loop {
        let mut header = IHAVEOPT.to_be_bytes().to_vec();
        header.extend_from_slice(&0x7777u32.to_be_bytes());
        header.extend_from_slice(&0u32.to_be_bytes());
        c.send_lossy(&header);
        let mut reply = [0u8; 20];
        match std::io::Read::read_exact(&mut c.stream, &mut reply) {
            Ok(()) => {
                assert_eq!(&reply[12..16], &rep::ERR_UNSUP.to_be_bytes());
                let len = u32::from_be_bytes(reply[16..20].try_into().unwrap());
                c.read_exact(len as usize);
                answered += 1;
            }
            Err(_) => break,
        }
        assert!(answered <= 10_000, "the server never stops haggling");
    }
    assert!(
        answered >= 16,
        "the server gave up after {answered} options"
    );
    assert_serves(&s);
    assert_image_unchanged(&s);
}

#[test]
fn a_hostile_client_does_not_disturb_a_good_one() {
    let s = TestServer::start(&[("a", SIZE, false)]);
    let (mut good, _) = RawClient::open(&s.socket, "a", false);
    let mut rng = XorShift(7);
    for handle in 0..20u64 {
        let mut bad = RawClient::connect(&s.socket);
        bad.greet(3);
        bad.go("a");
        bad.send_lossy(&rng.bytes(300));
        drop(bad);
        good.request(cmd::READ, 0, handle, handle * 100, 100);
        let start = handle as usize * 100;
        assert_eq!(
            good.read_simple(100),
            (0, handle, original()[start..start + 100].to_vec())
        );
    }
    assert_image_unchanged(&s);
}
