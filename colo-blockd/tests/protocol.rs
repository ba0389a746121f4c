//! The server's side of the NBD protocol, driven byte by byte by a minimal
//! client: option haggling, both reply formats, the errors the
//! specification asks for, and requests served concurrently.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use colo_blockd::export::Export;
use colo_blockd::proto::consts::{cmd, cmd_flags, info, opt, rep, reply};
use colo_blockd::server::ServerConfig;
use common::raw::RawClient;
use common::scripted::{ReadScript, Scripted};
use common::{TestServer, file_bytes, serve_pair};

const SIZE: usize = 1 << 20;

fn original(offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len).map(|i| (i % 251) as u8).collect()
}

fn scripted<S: ReadScript>(script: S) -> Scripted<S> {
    Scripted {
        size: SIZE as u64,
        script,
    }
}

fn go_data(name: &str, items: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(items.len() as u16).to_be_bytes());
    for i in items {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

#[test]
fn unknown_options_get_err_unsup_and_the_haggling_goes_on() {
    let s = TestServer::start(&[("a", SIZE, false), ("b", SIZE, true)]);
    let mut c = RawClient::connect(&s.socket);
    assert_eq!(c.greet(3), 3, "FIXED_NEWSTYLE | NO_ZEROES");
    for option in [
        0,
        4,
        opt::STARTTLS,
        opt::LIST_META_CONTEXT,
        opt::SET_META_CONTEXT,
        opt::EXTENDED_HEADERS,
        0xffff_ffff,
    ] {
        c.send_option(option, b"whatever data");
        let (echo, kind, _) = c.read_option_reply();
        assert_eq!((echo, kind), (option, rep::ERR_UNSUP), "option {option}");
    }
    // LIST: one SERVER reply per export, then ACK.
    c.send_option(opt::LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (echo, kind, data) = c.read_option_reply();
        assert_eq!(echo, opt::LIST);
        if kind == rep::ACK {
            break;
        }
        assert_eq!(kind, rep::SERVER);
        let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(data[4..4 + len].to_vec()).unwrap());
    }
    assert_eq!(names, ["a", "b"]);
    // INFO on an unknown name, and malformed INFO data.
    c.send_option(opt::INFO, &go_data("nope", &[]));
    assert_eq!(c.read_option_reply().1, rep::ERR_UNKNOWN);
    c.send_option(opt::INFO, &[0, 0, 0, 9, b'x']);
    assert_eq!(c.read_option_reply().1, rep::ERR_INVALID);
    c.send_option(opt::LIST, b"x");
    assert_eq!(c.read_option_reply().1, rep::ERR_INVALID);
    // INFO with name, description and block sizes stays in the handshake.
    c.send_option(
        opt::INFO,
        &go_data("b", &[info::NAME, info::DESCRIPTION, info::BLOCK_SIZE]),
    );
    let mut items = Vec::new();
    loop {
        let (_, kind, data) = c.read_option_reply();
        if kind == rep::ACK {
            break;
        }
        assert_eq!(kind, rep::INFO);
        items.push(data);
    }
    let export = items.iter().find(|d| d[..2] == [0, 0]).unwrap();
    assert_eq!(
        u64::from_be_bytes(export[2..10].try_into().unwrap()),
        SIZE as u64
    );
    assert!(items.iter().any(|d| d[..2] == [0, 1] && &d[2..] == b"b"));
    assert!(
        items
            .iter()
            .any(|d| d[..2] == [0, 2] && &d[2..] == b"test image b")
    );
    let sizes = items.iter().find(|d| d[..2] == [0, 3]).unwrap();
    assert_eq!(&sizes[2..6], &1u32.to_be_bytes());
    assert_eq!(&sizes[10..14], &(32u32 << 20).to_be_bytes());
    // Still haggling: GO works afterwards and the export serves data.
    let (size, flags) = c.go("a");
    assert_eq!(size, SIZE as u64);
    assert_eq!(flags & 2, 0, "export a is writable");
    c.request(cmd::READ, 0, 1, 100, 10);
    assert_eq!(c.read_simple(10), (0, 1, original(100, 10)));
}

#[test]
fn export_name_enters_transmission_with_or_without_the_zero_padding() {
    let s = TestServer::start(&[("a", SIZE, false)]);
    for (flags, reply_len) in [(1u32, 134usize), (3, 10)] {
        let mut c = RawClient::connect(&s.socket);
        c.greet(flags);
        c.send_option(opt::EXPORT_NAME, b"a");
        let r = c.read_exact(reply_len);
        assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), SIZE as u64);
        assert!(r[10..].iter().all(|&b| b == 0));
        c.request(cmd::READ, 0, 9, 0, 4);
        assert_eq!(c.read_simple(4), (0, 9, original(0, 4)));
    }
    // An unknown name has no error reply: the server closes.
    let mut c = RawClient::connect(&s.socket);
    c.greet(3);
    c.send_option(opt::EXPORT_NAME, b"nope");
    assert!(c.closed_by_server());
}

#[test]
fn abort_is_acknowledged_then_the_server_closes() {
    let s = TestServer::start(&[("a", SIZE, false)]);
    let mut c = RawClient::connect(&s.socket);
    c.greet(3);
    c.send_option(opt::ABORT, &[]);
    assert_eq!(c.read_option_reply(), (opt::ABORT, rep::ACK, vec![]));
    assert!(c.closed_by_server());
}

#[test]
fn structured_replies_carry_data_chunks_and_error_chunks() {
    let s = TestServer::start(&[("a", SIZE, false)]);
    let (mut c, _) = RawClient::open(&s.socket, "a", true);
    c.request(cmd::READ, 0, 5, 4000, 100);
    let chunk = c.read_chunk();
    assert_eq!(
        (chunk.flags, chunk.kind, chunk.handle),
        (reply::FLAG_DONE, reply::TYPE_OFFSET_DATA, 5)
    );
    assert_eq!(&chunk.payload[..8], &4000u64.to_be_bytes());
    assert_eq!(&chunk.payload[8..], &original(4000, 100)[..]);
    c.request(cmd::READ, 0, 6, SIZE as u64, 1);
    let chunk = c.read_chunk();
    assert_eq!((chunk.kind, chunk.handle), (reply::TYPE_ERROR, 6));
    assert_eq!(&chunk.payload[..4], &22u32.to_be_bytes(), "EINVAL");
    c.request(cmd::FLUSH, 0, 7, 0, 0);
    let chunk = c.read_chunk();
    assert_eq!(
        (chunk.flags, chunk.kind, chunk.handle),
        (reply::FLAG_DONE, reply::TYPE_NONE, 7)
    );
}

#[test]
fn bad_requests_get_the_specified_errors_and_write_nothing() {
    let s = TestServer::start(&[("a", SIZE, false)]);
    let (mut c, size) = RawClient::open(&s.socket, "a", false);
    let end = size;
    let cases: &[(u16, u16, u64, u32, u32)] = &[
        // command, flags, offset, length, expected errno
        (cmd::READ, 0, end, 1, 22),
        (cmd::READ, 0, u64::MAX, 2, 22),
        (cmd::READ, 0, 0, (32 << 20) + 1, 22),
        (cmd::READ, cmd_flags::FUA, 0, 1, 22),
        (cmd::WRITE_ZEROES, 0, end - 1, 2, 28),
        (cmd::TRIM, 0, end, 1, 22),
        (cmd::FLUSH, 0, 0, 1, 22),
        (cmd::CACHE, 0, 0, 1, 22),
        (cmd::BLOCK_STATUS, 0, 0, 1, 22),
        (99, 0, 0, 1, 22),
        (cmd::WRITE_ZEROES, 1 << 15, 0, 1, 22),
    ];
    for (i, &(command, flags, offset, length, errno)) in cases.iter().enumerate() {
        c.request(command, flags, i as u64, offset, length);
        assert_eq!(
            c.read_simple(0),
            (errno, i as u64, vec![]),
            "case {i}: command {command} flags {flags:#x} offset {offset} length {length}"
        );
    }
    // Refused writes still have their payload read, so the stream stays in
    // step: past the end (ENOSPC) and with a flag WRITE does not take.
    c.request(cmd::WRITE, 0, 100, end - 2, 4);
    c.send(b"XXXX");
    assert_eq!(c.read_simple(0), (28, 100, vec![]));
    c.request(cmd::WRITE, cmd_flags::NO_HOLE, 101, 0, 4);
    c.send(b"YYYY");
    assert_eq!(c.read_simple(0), (22, 101, vec![]));
    // FAST_ZERO on the file backend: ENOTSUP at once, nothing zeroed.
    c.request(
        cmd::WRITE_ZEROES,
        cmd_flags::FAST_ZERO | cmd_flags::NO_HOLE,
        102,
        0,
        4096,
    );
    assert_eq!(c.read_simple(0), (95, 102, vec![]));
    // The connection still works and the image is untouched.
    c.request(cmd::READ, 0, 103, 0, 4096);
    assert_eq!(c.read_simple(4096), (0, 103, original(0, 4096)));
    assert_eq!(file_bytes(&s.images[0], 0, SIZE), original(0, SIZE));
    // Disconnect: the server closes after its replies.
    c.request(cmd::DISC, 0, 104, 0, 0);
    assert!(c.closed_by_server());
}

#[test]
fn read_only_export_refuses_modifications_with_eperm() {
    let s = TestServer::start(&[("ro", SIZE, true)]);
    let (mut c, _) = RawClient::open(&s.socket, "ro", false);
    c.request(cmd::WRITE, 0, 1, 0, 3);
    c.send(b"abc");
    assert_eq!(c.read_simple(0).0, 1);
    c.request(cmd::TRIM, 0, 2, 0, 3);
    assert_eq!(c.read_simple(0).0, 1);
    c.request(cmd::WRITE_ZEROES, 0, 3, 0, 3);
    assert_eq!(c.read_simple(0).0, 1);
    c.request(cmd::FLUSH, 0, 4, 0, 0);
    assert_eq!(c.read_simple(0).0, 0);
    assert_eq!(file_bytes(&s.images[0], 0, SIZE), original(0, SIZE));
    assert!(s.ops(0).iter().all(|op| matches!(op, common::Op::Flush)));
}

/// A backend whose reads all wait until `width` of them are inside it at
/// once: a server with fewer requests in flight never completes any.
#[derive(Debug)]
struct Rendezvous {
    barrier: Arc<tokio::sync::Barrier>,
}

impl ReadScript for Rendezvous {
    async fn read(&self, offset: u64, length: u32) -> std::io::Result<Bytes> {
        self.barrier.wait().await;
        Ok(Bytes::from(vec![(offset / 4096) as u8; length as usize]))
    }
}

#[test]
fn sixteen_requests_are_in_flight_at_once() {
    let backend = Rendezvous {
        barrier: Arc::new(tokio::sync::Barrier::new(16)),
    };
    let (mut c, server) = serve_pair(
        vec![Export::new("r", scripted(backend))],
        ServerConfig::default(),
    );
    c.greet(3);
    c.go("r");
    for i in 0..16u64 {
        c.request(cmd::READ, 0, i, i * 4096, 512);
    }
    let mut seen = Vec::new();
    for _ in 0..16 {
        let (err, handle, data) = c.read_simple(512);
        assert_eq!(err, 0);
        assert_eq!(
            data,
            vec![handle as u8; 512],
            "reply {handle} carries its own data"
        );
        seen.push(handle);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..16).collect::<Vec<_>>());
    c.request(cmd::DISC, 0, 99, 0, 0);
    assert_eq!(server.join().unwrap(), Ok(()));
}

/// Reads at offset 0 wait until a read elsewhere has finished.
#[derive(Debug, Default)]
struct SlowFirst {
    other_done: tokio::sync::Notify,
}

impl ReadScript for SlowFirst {
    async fn read(&self, offset: u64, length: u32) -> std::io::Result<Bytes> {
        if offset == 0 {
            self.other_done.notified().await;
        } else {
            // `notify_one` keeps a permit if the slow read is not waiting yet.
            self.other_done.notify_one();
        }
        Ok(Bytes::from(vec![(offset / 4096) as u8; length as usize]))
    }
}

#[test]
fn a_later_request_overtakes_a_slow_one() {
    let (mut c, _server) = serve_pair(
        vec![Export::new("r", scripted(SlowFirst::default()))],
        ServerConfig::default(),
    );
    c.greet(3);
    c.go("r");
    c.request(cmd::READ, 0, 1, 0, 8);
    c.request(cmd::READ, 0, 2, 8192, 8);
    assert_eq!(
        c.read_simple(8),
        (0, 2, vec![2; 8]),
        "the fast read answers first"
    );
    assert_eq!(c.read_simple(8), (0, 1, vec![0; 8]));
}

/// Reads meet in pairs (so two are inside at once) and record the most
/// that were ever inside together.
#[derive(Debug)]
struct Pairs {
    barrier: tokio::sync::Barrier,
    inside: std::sync::atomic::AtomicUsize,
    peak: Arc<std::sync::atomic::AtomicUsize>,
}

impl ReadScript for Pairs {
    async fn read(&self, _: u64, length: u32) -> std::io::Result<Bytes> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.inside.fetch_add(1, SeqCst) + 1;
        self.peak.fetch_max(now, SeqCst);
        self.barrier.wait().await;
        self.inside.fetch_sub(1, SeqCst);
        Ok(Bytes::from(vec![7; length as usize]))
    }
}

#[test]
fn bytes_in_flight_are_bounded_per_connection() {
    let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let backend = Pairs {
        barrier: tokio::sync::Barrier::new(2),
        inside: Default::default(),
        peak: Arc::clone(&peak),
    };
    // Room for two 512-byte reads at a time, though 32 slots are free.
    let config = ServerConfig {
        max_in_flight_bytes: 1024,
        ..ServerConfig::default()
    };
    let (mut c, _server) = serve_pair(vec![Export::new("r", scripted(backend))], config);
    c.greet(3);
    c.go("r");
    for i in 0..16u64 {
        c.request(cmd::READ, 0, i, i * 512, 512);
    }
    for _ in 0..16 {
        let (err, _, data) = c.read_simple(512);
        assert_eq!((err, data), (0, vec![7; 512]));
    }
    assert_eq!(peak.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[test]
fn a_client_that_never_finishes_the_handshake_is_dropped() {
    let backend = Pairs {
        barrier: tokio::sync::Barrier::new(1),
        inside: Default::default(),
        peak: Default::default(),
    };
    let config = ServerConfig {
        handshake_timeout: std::time::Duration::from_millis(50),
        ..ServerConfig::default()
    };
    let (mut c, server) = serve_pair(vec![Export::new("r", scripted(backend))], config);
    c.greet(3);
    // Silence: the server gives up and closes.
    assert!(c.closed_by_server());
    let ended = server.join().unwrap().unwrap_err();
    assert!(ended.contains("handshake not finished"), "{ended}");
}

/// Reads at offset 0 panic (a backend bug); others succeed.
#[derive(Debug)]
struct PanicsAtZero;

impl ReadScript for PanicsAtZero {
    async fn read(&self, offset: u64, length: u32) -> std::io::Result<Bytes> {
        assert_ne!(offset, 0, "deliberate backend bug");
        Ok(Bytes::from(vec![1; length as usize]))
    }
}

#[test]
fn a_panicking_backend_answers_eio_and_the_connection_goes_on() {
    let (mut c, _server) = serve_pair(
        vec![Export::new("p", scripted(PanicsAtZero))],
        ServerConfig::default(),
    );
    c.greet(3);
    c.go("p");
    c.request(cmd::READ, 0, 1, 0, 4);
    assert_eq!(c.read_simple(4), (5, 1, vec![]), "EIO");
    c.request(cmd::READ, 0, 2, 8, 4);
    assert_eq!(c.read_simple(4), (0, 2, vec![1; 4]));
}

/// Reads announce themselves, then wait to be released.
#[derive(Debug)]
struct Held {
    entered: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
    release: Arc<tokio::sync::Notify>,
}

impl ReadScript for Held {
    async fn read(&self, _: u64, length: u32) -> std::io::Result<Bytes> {
        let _ = self.entered.lock().unwrap().send(());
        self.release.notified().await;
        Ok(Bytes::from(vec![3; length as usize]))
    }
}

#[test]
fn shutdown_answers_the_requests_already_accepted_then_closes() {
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let release = Arc::new(tokio::sync::Notify::new());
    let held = Held {
        entered: std::sync::Mutex::new(entered_tx),
        release: Arc::clone(&release),
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (mut c, server) = common::serve_pair_until(
        vec![Export::new("h", scripted(held))],
        ServerConfig::default(),
        shutdown.clone(),
    );
    c.greet(3);
    c.go("h");
    c.request(cmd::READ, 0, 1, 0, 16);
    entered.recv().unwrap();
    shutdown.cancel();
    release.notify_one();
    assert_eq!(c.read_simple(16), (0, 1, vec![3; 16]));
    assert!(
        c.closed_by_server(),
        "no DISC was sent: only shutdown closes"
    );
    assert_eq!(server.join().unwrap(), Ok(()));
}
