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
