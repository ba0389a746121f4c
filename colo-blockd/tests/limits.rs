//! The NBD server's bounds, against the real `colo-blockd secondary` binary (no relay: it
//! keeps retrying the control socket and serves NBD meanwhile): `--max-connections` refuses
//! one connection more before the greeting and leaves the open ones working,
//! `--handshake-timeout-ms` drops clients that never choose an export but keeps idle ones in
//! transmission, `--write-timeout-ms` drops a client that stopped reading its replies without
//! holding up the others, and many such clients cannot grow the daemon's memory past the
//! per-connection bounds. Each bound shows in `/metrics` and the log.
//!
//! No test measures time: every wait is for an event (a close, a metric), bounded only to
//! turn a hang into a failure.

mod common;

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use colo_blockd::proto::consts::{IHAVEOPT, NBD_MAGIC, OPTION_REPLY_MAGIC, cmd, opt, rep};
use colo_blockd::proto::handshake::OptionHeader;
use colo_blockd::proto::request::RequestHeader;
use common::exposition::{parse, scrape};
use common::raw::RawClient;
use common::{free_tcp_addr, patterned_image, require_tool, run};

/// Only turns a hang into a failure; measures nothing.
const PATIENCE: Duration = Duration::from_secs(60);

const SIZE: usize = 4 << 20;

/// `colo-blockd secondary` on a Unix socket, TCP and a metrics port, with a control socket
/// nobody listens on. Killed when dropped.
struct Daemon {
    child: Child,
    _dir: tempfile::TempDir,
    sock: PathBuf,
    tcp: SocketAddr,
    metrics: SocketAddr,
    log: PathBuf,
}

impl Daemon {
    fn start(options: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let image = patterned_image(dir.path(), "s.raw", SIZE);
        let sock = dir.path().join("nbd.sock");
        let log = dir.path().join("blockd.log");
        let (tcp, metrics) = (free_tcp_addr(), free_tcp_addr());
        let mut child = Command::new(env!("CARGO_BIN_EXE_colo-blockd"))
            .arg("secondary")
            .arg("--image")
            .arg(&image)
            .arg("--unix")
            .arg(&sock)
            .args(["--tcp", &tcp.to_string()])
            .args(["--metrics", &metrics.to_string()])
            .arg("--control")
            .arg(dir.path().join("no-relay.sock"))
            .args(options)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // The metrics socket is bound after the NBD ones.
        let started = Instant::now();
        while scrape(metrics).is_err() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "exited early: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            assert!(started.elapsed() < PATIENCE, "never came up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon {
            child,
            _dir: dir,
            sock,
            tcp,
            metrics,
            log,
        }
    }

    fn samples(&self) -> BTreeMap<String, f64> {
        parse(&scrape(self.metrics).unwrap())
    }

    fn sample(&self, series: &str) -> f64 {
        let samples = self.samples();
        *samples
            .get(series)
            .unwrap_or_else(|| panic!("no {series} in {samples:#?}"))
    }

    /// Scrapes until `series` satisfies `ok`.
    fn until(&self, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let started = Instant::now();
        loop {
            let value = self.samples().get(series).copied();
            if let Some(v) = value.filter(|v| ok(*v)) {
                return v;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "{series} stayed at {value:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `VmHWM` (peak resident set) or `VmRSS` of the daemon, in bytes.
    fn memory(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with(field))
            .unwrap_or_else(|| panic!("no {field} in {status}"));
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap();
        kib * 1024
    }

    fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.tcp)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The original content of the image at `offset`.
fn original(offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len).map(|i| (i % 251) as u8).collect()
}

/// A raw NBD client on any stream (the tests' `RawClient` is Unix-only).
struct Nbd<S> {
    stream: S,
}

impl<S: Read + Write> Nbd<S> {
    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        self.stream.read_exact(&mut buf).unwrap();
        buf
    }

    /// Greeting, fixed newstyle without zeroes, `NBD_OPT_GO` on `export`.
    fn negotiate(mut self, export: &str) -> Nbd<S> {
        let greeting = self.read_n(18);
        assert_eq!(greeting[..8], NBD_MAGIC.to_be_bytes());
        assert_eq!(greeting[8..16], IHAVEOPT.to_be_bytes());
        self.stream.write_all(&3u32.to_be_bytes()).unwrap();
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let header = OptionHeader {
            option: opt::GO,
            length: data.len() as u32,
        };
        self.stream.write_all(&header.encode()).unwrap();
        self.stream.write_all(&data).unwrap();
        loop {
            let h = self.read_n(20);
            assert_eq!(h[..8], OPTION_REPLY_MAGIC.to_be_bytes());
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let data = self.read_n(len as usize);
            match kind {
                rep::ACK => return self,
                rep::INFO => {}
                other => panic!("GO failed: {other:#x} {:?}", String::from_utf8_lossy(&data)),
            }
        }
    }

    fn request(&mut self, command: u16, handle: u64, offset: u64, length: u32) {
        let h = RequestHeader {
            flags: 0,
            command,
            handle,
            offset,
            length,
        };
        self.stream.write_all(&h.encode()).unwrap();
    }

    /// A simple reply without error; its data.
    fn reply(&mut self, handle: u64, len: usize) -> Vec<u8> {
        let h = self.read_n(16);
        let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
        assert_eq!(
            (error, u64::from_be_bytes(h[8..16].try_into().unwrap())),
            (0, handle)
        );
        self.read_n(len)
    }

    fn read(&mut self, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(cmd::READ, handle, offset, len);
        self.reply(handle, len as usize)
    }

    fn write(&mut self, handle: u64, offset: u64, data: &[u8]) {
        self.request(cmd::WRITE, handle, offset, data.len() as u32);
        self.stream.write_all(data).unwrap();
        self.reply(handle, 0);
    }
}

fn tcp(addr: SocketAddr) -> Nbd<TcpStream> {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    Nbd { stream }
}

fn unix(sock: &std::path::Path) -> Nbd<UnixStream> {
    let stream = UnixStream::connect(sock).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    Nbd { stream }
}

/// Reads until the server closes; returns what came before. A reset (the server closed with
/// our data unread) counts as closed.
fn until_closed(stream: &mut impl Read) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("waiting for the server to close: {e}"),
        }
    }
}

/// Shrinks the socket's receive buffer, so that a client that does not read stops the
/// server's writes after little data (the kernel would otherwise take megabytes).
fn small_receive_buffer(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 16 * 1024;
    // SAFETY: a valid socket descriptor, and a pointer to a c_int with its size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const size).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

const REFUSED: &str = "colo_blockd_nbd_connections_refused_total{reason=\"limit\"}";
const HANDSHAKE_DROPPED: &str =
    "colo_blockd_nbd_connections_dropped_total{reason=\"handshake-timeout\"}";
const WRITE_DROPPED: &str = "colo_blockd_nbd_connections_dropped_total{reason=\"write-timeout\"}";
const PEER_DROPPED: &str = "colo_blockd_nbd_connections_dropped_total{reason=\"peer-timeout\"}";
const OPEN_TCP: &str = "colo_blockd_nbd_connections{transport=\"tcp\"}";
const OPEN_UNIX: &str = "colo_blockd_nbd_connections{transport=\"unix\"}";
const READS: &str = "colo_blockd_nbd_requests_total{export=\"replica\",command=\"read\"}";

/// Three connections fill `--max-connections 3`; five more (TCP and Unix) are closed before
/// the greeting, counted and logged; the three keep reading and writing; one leaving frees a
/// slot for the next client.
#[test]
fn connections_past_the_cap_are_refused_and_the_open_ones_keep_working() {
    let d = Daemon::start(&["--max-connections", "3"]);
    assert_eq!(d.sample("colo_blockd_nbd_max_connections"), 3.0);
    assert_eq!(d.sample(REFUSED), 0.0);
    let (mut u1, _) = RawClient::open(&d.sock, "replica", false);
    let (mut u2, _) = RawClient::open(&d.sock, "svm", false);
    let mut t1 = tcp(d.tcp).negotiate("replica");

    for _ in 0..4 {
        let mut extra = tcp(d.tcp);
        assert_eq!(
            until_closed(&mut extra.stream),
            b"",
            "refused before the greeting"
        );
    }
    let mut extra = unix(&d.sock);
    assert_eq!(until_closed(&mut extra.stream), b"");
    d.until(REFUSED, |v| v == 5.0);
    assert_eq!(d.sample(OPEN_TCP), 1.0);
    assert_eq!(d.sample(OPEN_UNIX), 2.0);
    let log = d.log();
    assert!(
        log.lines()
            .any(|l| l.contains("NBD connection refused") && l.contains("limit=3")),
        "{log}"
    );

    // The open ones are untouched.
    t1.write(1, 8192, &[0x5a; 4096]);
    assert_eq!(t1.read(2, 8192, 4096), vec![0x5a; 4096]);
    u1.request(cmd::READ, 0, 3, 8192, 4096);
    assert_eq!(u1.read_simple(4096), (0, 3, vec![0x5a; 4096]));
    u2.request(cmd::READ, 0, 4, 0, 4096);
    assert_eq!(u2.read_simple(4096), (0, 4, original(0, 4096)));

    // One leaves: the next client is served.
    u1.request(cmd::DISC, 0, 5, 0, 0);
    drop(u1);
    d.until(OPEN_UNIX, |v| v == 1.0);
    let mut t2 = tcp(d.tcp).negotiate("svm");
    assert_eq!(t2.read(6, 4096, 512), original(4096, 512));
    assert_eq!(d.sample(REFUSED), 5.0);
}

/// With `--handshake-timeout-ms 1000`: a client that sends nothing, one that stops inside an
/// option header and one that never reads the greeting are closed and counted; a client in
/// transmission that sends nothing for as long is kept and still served.
#[test]
fn clients_that_never_choose_an_export_are_dropped_and_idle_ones_are_kept() {
    let d = Daemon::start(&[
        "--handshake-timeout-ms",
        "1000",
        "--write-timeout-ms",
        "1000",
    ]);
    let mut idle = tcp(d.tcp).negotiate("replica");

    let mut silent = tcp(d.tcp);
    let mut halfway = tcp(d.tcp);
    assert_eq!(halfway.read_n(18)[..8], NBD_MAGIC.to_be_bytes());
    halfway.stream.write_all(&3u32.to_be_bytes()).unwrap();
    halfway.stream.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
    let mut deaf = unix(&d.sock);
    // The greeting is all they get.
    assert_eq!(until_closed(&mut halfway.stream), b"");
    assert_eq!(until_closed(&mut silent.stream).len(), 18);
    assert_eq!(until_closed(&mut deaf.stream).len(), 18);
    d.until(HANDSHAKE_DROPPED, |v| v == 3.0);
    let log = d.log();
    assert!(log.contains("handshake not finished within 1s"), "{log}");

    // Silent for longer than either timeout, and still served.
    assert_eq!(idle.read(1, 100, 100), original(100, 100));
    assert_eq!(d.sample(OPEN_TCP), 1.0);
    assert_eq!(d.sample(WRITE_DROPPED), 0.0);
}

/// A client asks for 256 MiB of reads and reads none of it: it fills its own bounds, holds
/// up nobody else (two clients on both exports and both sockets keep reading and writing),
/// and is dropped once its socket took nothing for `--write-timeout-ms`.
#[test]
fn a_client_that_never_reads_its_replies_stalls_only_itself_and_is_dropped() {
    let d = Daemon::start(&["--write-timeout-ms", "2000"]);
    let mut stalled = tcp(d.tcp).negotiate("replica");
    small_receive_buffer(&stalled.stream);
    for handle in 0..256 {
        stalled.request(cmd::READ, handle, 0, 1 << 20);
    }
    // Its in-flight requests have been read (the server holds their replies).
    d.until(READS, |v| v >= 32.0);

    let mut other = tcp(d.tcp).negotiate("replica");
    let (mut svm, _) = RawClient::open(&d.sock, "svm", false);
    for i in 0..50u64 {
        let data = vec![i as u8; 4096];
        other.write(2 * i, 65536 + i * 4096, &data);
        assert_eq!(other.read(2 * i + 1, 65536 + i * 4096, 4096), data);
        svm.request(cmd::READ, 0, i, i * 512, 512);
        assert_eq!(
            svm.read_simple(512),
            (0, i, original(i as usize * 512, 512))
        );
    }

    d.until(WRITE_DROPPED, |v| v == 1.0);
    d.until(OPEN_TCP, |v| v == 1.0);
    let log = d.log();
    assert!(log.contains("stopped reading"), "{log}");
    // What the kernel had buffered, then the end: far less than asked for.
    let got = until_closed(&mut stalled.stream);
    assert!(got.len() < 256 << 20, "{}", got.len());
    // The other client is still there.
    assert_eq!(other.read(1000, 65536, 4096), vec![0; 4096]);
    assert_eq!(d.sample(HANDSHAKE_DROPPED), 0.0);
}

/// Every accepted TCP socket has `TCP_USER_TIMEOUT` (colo_control::tune_tcp): with the
/// write timeout out of the way (10 minutes), a client whose receive window stays closed is
/// cut by the kernel (ETIMEDOUT, Linux 5.10 and later also for a window closed while the
/// peer answers the probes) and counted as `peer-timeout`; the same path ends a connection
/// to a host that died without a FIN.
#[test]
fn tcp_user_timeout_ends_a_connection_whose_window_stays_closed() {
    let d = Daemon::start(&["--write-timeout-ms", "600000"]);
    let mut stalled = tcp(d.tcp).negotiate("replica");
    small_receive_buffer(&stalled.stream);
    for handle in 0..256 {
        stalled.request(cmd::READ, handle, 0, 1 << 20);
    }
    d.until(PEER_DROPPED, |v| v == 1.0);
    d.until(OPEN_TCP, |v| v == 0.0);
    assert_eq!(d.sample(WRITE_DROPPED), 0.0);
    let log = d.log();
    assert!(log.contains("timed out"), "{log}");
    until_closed(&mut stalled.stream);
}

/// 24 clients each ask for 128 MiB of reads (3 GiB together) and read none of it. With
/// `--max-in-flight 4` each holds at most 4 replies of 2 MiB (plus its read and write
/// buffers): the daemon's peak resident memory stays within those bounds, far below what
/// was asked, and every client is dropped by the write timeout.
#[test]
fn many_stalled_clients_cannot_grow_the_daemons_memory_past_the_bounds() {
    const CLIENTS: usize = 24;
    const READ: u32 = 2 << 20;
    let d = Daemon::start(&[
        "--max-connections",
        "32",
        "--max-in-flight",
        "4",
        "--write-timeout-ms",
        "3000",
    ]);
    let before = d.memory("VmRSS");
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let mut client = tcp(d.tcp).negotiate("replica");
        small_receive_buffer(&client.stream);
        for handle in 0..64u64 {
            client.request(cmd::READ, handle, (c as u64 % 2) * u64::from(READ), READ);
        }
        clients.push(client);
    }
    d.until(WRITE_DROPPED, |v| v == CLIENTS as f64);
    d.until(OPEN_TCP, |v| v == 0.0);
    let peak = d.memory("VmHWM");
    // Per client: 4 replies of 2 MiB, the 1 MiB request buffer, the 256 KiB reply buffer;
    // 4 MiB of slack each for the allocator, 64 MiB for the rest of the daemon.
    let bound = before + CLIENTS as u64 * (8 + 1 + 1 + 4) * (1 << 20) + (64 << 20);
    assert!(
        peak < bound,
        "peak RSS {} MiB, bound {} MiB (before: {} MiB)",
        peak >> 20,
        bound >> 20,
        before >> 20
    );
    eprintln!(
        "peak RSS {} MiB, bound {} MiB, before {} MiB",
        peak >> 20,
        bound >> 20,
        before >> 20
    );
    let answered = d.sample(READS);
    assert!(answered < (CLIENTS * 64) as f64, "{answered}");
    // Still serving.
    let mut fresh = tcp(d.tcp).negotiate("svm");
    assert_eq!(fresh.read(1, 0, 4096), original(0, 4096));
}

/// Real clients against the cap: with `--max-connections 2` filled, nbdinfo and qemu-io
/// fail (the connection ends before the NBD magic) and the daemon says why; once a slot is
/// free they work.
#[test]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
fn real_clients_past_the_cap_fail_cleanly_and_succeed_once_a_slot_is_free() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("nbdinfo", "libnbd-bin");
    let d = Daemon::start(&["--max-connections", "2"]);
    let (a, _) = RawClient::open(&d.sock, "svm", false);
    let (_b, _) = RawClient::open(&d.sock, "replica", false);
    let info = run("nbdinfo", &[&d.tcp_uri("replica")]);
    assert!(!info.status.success(), "nbdinfo got in past the cap");
    eprintln!("nbdinfo: {}", String::from_utf8_lossy(&info.stderr).trim());
    let io = run(
        "qemu-io",
        &["-f", "raw", &d.tcp_uri("replica"), "-c", "read 0 4k"],
    );
    assert!(
        !io.status.success() || String::from_utf8_lossy(&io.stdout).contains("failed"),
        "qemu-io got in past the cap: {io:?}"
    );
    eprintln!("qemu-io: {}", String::from_utf8_lossy(&io.stderr).trim());
    d.until(REFUSED, |v| v >= 2.0);
    assert!(d.log().contains("NBD connection refused"));

    drop(a);
    d.until(OPEN_UNIX, |v| v == 1.0);
    let io = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &d.tcp_uri("replica"),
            "-c",
            "write -P 0x66 0 64k",
            "-c",
            "read -P 0x66 0 64k",
        ],
    );
    let out = String::from_utf8_lossy(&io.stdout);
    assert!(io.status.success() && !out.contains("failed"), "{io:?}");
    d.until(OPEN_TCP, |v| v == 0.0);
    let info = run("nbdinfo", &["--list", &format!("nbd://{}/", d.tcp)]);
    assert!(info.status.success(), "{info:?}");
}
