//! The `/metrics` endpoint: just enough HTTP/1.x for a Prometheus scrape.
//!
//! `GET /metrics` (or `HEAD`) is answered with the encoding of the daemon's
//! [`MetricsRegistry`]; any other path gets 404, any other method 405, a request
//! that is not HTTP 400. Every connection carries one request and is closed after the
//! response (`Connection: close`), which every scraper accepts; a client
//! that does not send its request head within [`REQUEST_TIMEOUT`] is
//! dropped, and at most [`MAX_CONNECTIONS`] are served at once, so a slow
//! or hostile client cannot hold the daemon.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{CONTENT_TYPE, MetricsRegistry};

/// Time a client has to send its request and take the response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Scrapes served at once; more wait to be accepted.
pub const MAX_CONNECTIONS: usize = 16;

/// Longest request head read (request line and headers).
const MAX_HEAD: usize = 8 * 1024;

/// Serves `metrics` on an already-bound listener until `shutdown`.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<MetricsRegistry>,
    shutdown: CancellationToken,
) {
    let tasks = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            break;
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let metrics = Arc::clone(&metrics);
                let shutdown = shutdown.clone();
                tasks.spawn(async move {
                    let _slot = slot;
                    let answered = tokio::select! {
                        // A scrape is not worth delaying a shutdown for.
                        () = shutdown.cancelled() => return,
                        answered = tokio::time::timeout(REQUEST_TIMEOUT, respond(stream, &metrics)) => answered,
                    };
                    match answered {
                        Ok(Ok(())) => {}
                        Ok(Err(err)) => tracing::debug!(%peer, %err, "metrics client failed"),
                        Err(_) => tracing::debug!(%peer, "metrics client too slow; dropped"),
                    }
                });
            }
            Err(err) => {
                tracing::warn!(%err, "accept failed on the metrics socket");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    tasks.close();
    tasks.wait().await;
}

/// Reads one request head and answers it.
async fn respond(mut stream: TcpStream, metrics: &MetricsRegistry) -> io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete = loop {
        if head_end(&head).is_some() {
            break true;
        }
        if head.len() >= MAX_HEAD {
            break false;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break false;
        }
        head.extend_from_slice(&buf[..n]);
    };
    let response = if complete {
        answer(&head, metrics)
    } else {
        Response::status(400, "Bad Request")
    };
    stream.write_all(&response.encode()).await?;
    stream.shutdown().await
}

/// Where the head ends (after the empty line), if it has.
fn head_end(data: &[u8]) -> Option<usize> {
    data.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .or_else(|| data.windows(2).position(|w| w == b"\n\n").map(|i| i + 2))
}

struct Response {
    code: u16,
    reason: &'static str,
    extra_headers: &'static str,
    content_type: &'static str,
    body: String,
    /// HEAD: the headers of GET, no body.
    head_only: bool,
}

impl Response {
    fn status(code: u16, reason: &'static str) -> Response {
        Response {
            code,
            reason,
            extra_headers: "",
            content_type: "text/plain; charset=utf-8",
            body: format!("{code} {reason}\n"),
            head_only: false,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
            self.code,
            self.reason,
            self.content_type,
            self.body.len(),
            self.extra_headers
        )
        .into_bytes();
        if !self.head_only {
            out.extend_from_slice(self.body.as_bytes());
        }
        out
    }
}

/// The response to a complete request head.
fn answer(head: &[u8], metrics: &MetricsRegistry) -> Response {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::status(400, "Bad Request");
    };
    if !version.starts_with("HTTP/1.") {
        return Response::status(400, "Bad Request");
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if path != "/metrics" {
        return Response::status(404, "Not Found");
    }
    match method {
        "GET" | "HEAD" => Response {
            code: 200,
            reason: "OK",
            extra_headers: "",
            content_type: CONTENT_TYPE,
            body: metrics.encode(),
            head_only: method == "HEAD",
        },
        _ => Response {
            extra_headers: "Allow: GET, HEAD\r\n",
            ..Response::status(405, "Method Not Allowed")
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::registry::Registry;

    struct Metrics {
        failovers: Counter,
        registry: Arc<MetricsRegistry>,
    }

    impl Metrics {
        fn new() -> Metrics {
            let failovers = Counter::default();
            let mut registry = Registry::default();
            registry.register("colo_test_failovers", "Failovers", failovers.clone());
            Metrics {
                failovers,
                registry: Arc::new(MetricsRegistry::new(registry)),
            }
        }
    }

    async fn start(metrics: Metrics) -> (std::net::SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve_metrics(listener, metrics.registry, stop.clone()));
        (addr, stop)
    }

    async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn get_metrics_returns_the_exposition_text() {
        let metrics = Metrics::new();
        metrics.failovers.inc();
        let (addr, stop) = start(metrics).await;
        let out = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains(&format!("Content-Type: {CONTENT_TYPE}")));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(body.contains("\ncolo_test_failovers_total 1\n"), "{body}");
        // A query string (some scrapers add one) is ignored.
        let out = exchange(addr, b"GET /metrics?x=1 HTTP/1.0\n\n").await;
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        stop.cancel();
    }

    #[tokio::test]
    async fn head_has_the_headers_only() {
        let (addr, stop) = start(Metrics::new()).await;
        let out = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(!head.contains("Content-Length: 0\r\n"), "{head}");
        assert_eq!(body, "");
        stop.cancel();
    }

    #[tokio::test]
    async fn other_paths_methods_and_garbage_are_refused() {
        let (addr, stop) = start(Metrics::new()).await;
        for (request, status) in [
            (&b"GET / HTTP/1.1\r\n\r\n"[..], "404"),
            (b"GET /metricsx HTTP/1.1\r\n\r\n", "404"),
            (b"POST /metrics HTTP/1.1\r\n\r\n", "405"),
            (b"GET /metrics SPDY/3\r\n\r\n", "400"),
            (b"\x00\x01\x02\r\n\r\n", "400"),
        ] {
            let out = exchange(addr, request).await;
            assert!(
                out.starts_with(&format!("HTTP/1.1 {status} ")),
                "{request:?}: {out}"
            );
        }
        let out = exchange(addr, b"PUT /metrics HTTP/1.1\r\n\r\n").await;
        assert!(out.contains("Allow: GET, HEAD\r\n"), "{out}");
        // A request head that never ends is cut off at MAX_HEAD. (Exactly
        // MAX_HEAD bytes: unread bytes would make the close a reset.)
        let mut endless = b"GET /metrics HTTP/1.1\r\n".to_vec();
        endless.resize(MAX_HEAD, b'a');
        let out = exchange(addr, &endless).await;
        assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_silent_client_does_not_block_others() {
        let (addr, stop) = start(Metrics::new()).await;
        let _silent = TcpStream::connect(addr).await.unwrap();
        let out = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        stop.cancel();
    }
}
