//! An HTTP/1.0 client that runs inside the client namespace.
//!
//! Sockets belong to the network namespace of the thread that creates them, so each request
//! runs on a fresh OS thread that first joins the client namespace (`setns`). Pooled threads
//! (tokio's blocking pool) must never do this: they would stay in the namespace.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Socket, Type};

/// One answered request.
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
    /// From the connect to the last byte.
    pub elapsed: Duration,
}

/// How to fetch: normal speed, or throttled by reading slowly from a small receive buffer so
/// that a download stays in flight for seconds (across a failover).
#[derive(Debug, Clone, Copy)]
pub struct Fetch {
    /// Limit on the read rate, bytes per second; `None` reads as fast as possible.
    pub rate: Option<u64>,
    /// Longest wait for any single read; a failover must finish within it.
    pub read_timeout: Duration,
}

impl Default for Fetch {
    fn default() -> Self {
        Fetch {
            rate: None,
            read_timeout: Duration::from_secs(10),
        }
    }
}

/// A client bound to a namespace and a server.
#[derive(Debug, Clone)]
pub struct HttpClient {
    netns: String,
    server: SocketAddr,
}

impl HttpClient {
    /// A client in `netns` talking to `server` (for example `10.0.2.15:80`).
    pub fn new(netns: &str, server: SocketAddr) -> Self {
        HttpClient {
            netns: netns.to_string(),
            server,
        }
    }

    /// GET `path`, on a fresh thread inside the namespace; never blocks the async runtime.
    pub async fn get(&self, path: &str, fetch: Fetch) -> Result<Response> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (netns, server, path) = (self.netns.clone(), self.server, path.to_string());
        std::thread::Builder::new()
            .name(format!("http-{path}"))
            .spawn(move || {
                let result = enter_netns(&netns).and_then(|()| get_blocking(server, &path, fetch));
                let _ = tx.send(result);
            })
            .context("spawning an HTTP client thread")?;
        rx.await.context("HTTP client thread vanished")?
    }
}

fn enter_netns(name: &str) -> Result<()> {
    let file = File::open(format!("/run/netns/{name}"))
        .with_context(|| format!("opening namespace {name}"))?;
    // SAFETY: the fd is a valid namespace file for the duration of the call; setns only
    // changes this thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns({name}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn get_blocking(server: SocketAddr, path: &str, fetch: Fetch) -> Result<Response> {
    let start = Instant::now();
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    if fetch.rate.is_some() {
        // A small window makes the server wait for us, so the transfer really is slow.
        socket.set_recv_buffer_size(16 * 1024)?;
    }
    socket.set_tcp_nodelay(true)?;
    socket
        .connect_timeout(
            &server.into(),
            fetch.read_timeout.min(Duration::from_secs(3)),
        )
        .with_context(|| format!("connecting to {server}"))?;
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(fetch.read_timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n")?;

    let mut raw = Vec::new();
    let mut chunk = vec![0u8; 4096];
    loop {
        let n = stream
            .read(&mut chunk)
            .with_context(|| format!("reading {path} after {} bytes", raw.len()))?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
        if let Some(rate) = fetch.rate {
            let due = Duration::from_secs_f64(raw.len() as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    let elapsed = start.elapsed();
    let (status, body) = parse_response(&raw)?;
    Ok(Response {
        status,
        body,
        elapsed,
    })
}

/// Splits an HTTP/1.x response into status and body, checking Content-Length when present.
pub fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>)> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("response has no end of headers")?;
    let head = std::str::from_utf8(&raw[..head_end]).context("headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let body = raw[head_end + 4..].to_vec();
    for line in lines {
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            let expected: usize = value.trim().parse().context("bad Content-Length")?;
            if expected != body.len() {
                bail!(
                    "body has {} bytes, Content-Length says {expected}",
                    body.len()
                );
            }
        }
    }
    Ok((status, body))
}

/// Lower-case hex MD5 of `data` (the guest publishes its blob's MD5).
pub fn md5_hex(data: &[u8]) -> String {
    use md5::{Digest, Md5};
    Md5::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_checks_length() {
        let raw = b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nabc";
        let (status, body) = parse_response(raw).unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, b"abc");
        let short = b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nabc";
        assert!(parse_response(short).is_err());
        assert!(parse_response(b"HTTP/1.0 200 OK\r\n").is_err());
    }

    #[test]
    fn md5_matches_known_vector() {
        assert_eq!(md5_hex(b"abc"), "900150983cd24fb0d6963f7d28e17f72");
    }
}

/// A long-lived connection to the guest's echo server (port 7) that carries data both ways for
/// as long as it runs: it sends a numbered 32-byte line every `interval`, waits for the same
/// bytes back, and stops at the first difference or error. Across a failover the line in
/// flight must come back whole from the survivor.
#[derive(Debug)]
pub struct EchoSession {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<EchoReport>,
}

/// What an [`EchoSession`] saw.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EchoReport {
    /// Lines sent.
    pub sent: u64,
    /// Lines that came back identical.
    pub echoed: u64,
    /// The longest wait for a line's echo, in ms (the outage, seen on this connection).
    pub longest_wait_ms: f64,
    /// The first error or difference, if any.
    pub error: Option<String>,
}

impl EchoReport {
    /// Every line sent came back identical, and at least one did.
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.echoed == self.sent && self.sent > 0
    }
}

/// How long one line's echo may take: longer than any failover.
const ECHO_TIMEOUT: Duration = Duration::from_secs(30);

impl EchoSession {
    /// Connects from `netns` to `server` (the guest's port 7) and starts the exchange.
    pub fn start(netns: &str, server: SocketAddr, interval: Duration) -> Result<EchoSession> {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let netns = netns.to_string();
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("echo".into())
            .spawn(move || {
                let stream = enter_netns(&netns).and_then(|()| {
                    let s = TcpStream::connect_timeout(&server, Duration::from_secs(3))
                        .with_context(|| format!("connecting to {server}"))?;
                    s.set_read_timeout(Some(ECHO_TIMEOUT))?;
                    s.set_nodelay(true)?;
                    Ok(s)
                });
                match stream {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        exchange(s, interval, &flag)
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        EchoReport::default()
                    }
                }
            })
            .context("spawning the echo thread")?;
        ready_rx.recv().context("echo thread vanished")??;
        Ok(EchoSession { stop, thread })
    }

    /// Stops after the line in flight and returns what was seen.
    pub fn finish(self) -> EchoReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or_else(|_| EchoReport {
            error: Some("the echo thread panicked".into()),
            ..EchoReport::default()
        })
    }
}

fn exchange(
    mut stream: TcpStream,
    interval: Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> EchoReport {
    let mut report = EchoReport::default();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let line = format!("colo echo line {:015}\n", report.sent);
        let started = Instant::now();
        if let Err(e) = stream.write_all(line.as_bytes()) {
            report.error = Some(format!("sending line {}: {e}", report.sent));
            break;
        }
        report.sent += 1;
        let mut back = vec![0u8; line.len()];
        if let Err(e) = stream.read_exact(&mut back) {
            report.error = Some(format!("reading the echo of line {}: {e}", report.sent - 1));
            break;
        }
        if back != line.as_bytes() {
            report.error = Some(format!(
                "line {} came back as {:?}",
                report.sent - 1,
                String::from_utf8_lossy(&back)
            ));
            break;
        }
        report.echoed += 1;
        report.longest_wait_ms = report
            .longest_wait_ms
            .max(started.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(interval);
    }
    report
}
