//! Bulk transfers: downloads of the guest's 1 MiB `/blob` with ApacheBench, and uploads into
//! the guest's echo service (TCP port 7).
//!
//! **Download.** `ab -n N -c C http://guest/blob` at each concurrency: MB/s of bodies, p50/p99
//! per download, failures, and on the COLO pairs checkpoints per 100 downloads with
//! colo-proxyd's reasons. ab checks each body's length against the first, not its bytes, so
//! after every ab run one more download is checked against the guest's `/blob.md5`: a setup
//! that serves wrong bytes fails the run. busybox httpd closes the connection after every
//! response, so there is no larger download in one keep-alive connection to add.
//!
//! **Upload, with the echo.** The guest cannot take a POST body (busybox httpd has no CGI for
//! it), so each client streams N MiB into the echo service (`nc -ll -e cat`) and reads the
//! echo back at the same time, checking every byte. The figure is the client→guest bytes per
//! second while the same bytes come back: an upload and a download of equal size at once, not
//! a pure upload. On COLO the client→guest half is what the pair mirrors to the secondary and
//! the guest→client half is what it compares, so it loads both paths.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::bed::{Bed, enter_netns, on_thread};
use super::{AbResult, Setup, cell, csv_cell, share};
use crate::client::{Fetch, HttpClient, md5_hex};
use crate::stock::proxyd::render_reasons;
use crate::topology::addr;

/// Size of the guest's `/blob`.
pub const BLOB_BYTES: usize = 1 << 20;

/// The guest's echo service.
const ECHO_PORT: u16 = 7;

/// What the download workload is given.
#[derive(Debug, Clone, Serialize)]
pub struct DownloadConfig {
    /// Concurrent clients, one ab run each.
    pub concurrency: Vec<u32>,
    /// Downloads of `/blob` per ab run.
    pub downloads: u32,
    /// ab's timeout per request (`-s`), seconds.
    pub timeout_s: u32,
}

/// One setup at one concurrency.
#[derive(Debug, Clone, Serialize)]
pub struct DownloadRow {
    /// The setup.
    pub setup: Setup,
    /// Concurrent clients.
    pub concurrency: u32,
    /// What ab measured against the guest (on the twin setup: the first guest).
    pub ab: AbResult,
    /// The twin's own figures, on the twin setup.
    pub twin: Option<AbResult>,
    /// The primary's checkpoints during the run (COLO setups).
    pub checkpoints: Option<usize>,
    /// Checkpoints per 100 completed downloads (COLO setups).
    pub checkpoints_per_100: Option<f64>,
    /// Why colo-proxyd asked for checkpoints during the run (colo setup), by reason.
    pub reasons: BTreeMap<String, u64>,
    /// The MD5 of the download checked after the run, equal to the guest's `/blob.md5`.
    pub checked_md5: String,
}

/// Runs the download workload on a booted setup.
pub(super) async fn download(
    bed: &Bed,
    setup: Setup,
    config: &DownloadConfig,
) -> Result<Vec<DownloadRow>> {
    let url = format!("http://{}:80/blob", addr::GUEST);
    let mut rows = Vec::new();
    for &c in &config.concurrency {
        let mark = bed.mark();
        let (ab, twin) = bed
            .on_guests(|ns| super::ab(ns, url.clone(), config.downloads, c, config.timeout_s))
            .await?;
        let cp = bed.checkpoints_since(mark);
        // After the run, so the check's own download is not in the figures.
        let (checked_md5, _) = bed.on_guests(check_blob).await?;
        rows.push(DownloadRow {
            setup,
            concurrency: c,
            ab,
            twin,
            checkpoints: cp.as_ref().map(|cp| cp.count),
            checkpoints_per_100: cp
                .as_ref()
                .map(|cp| cp.count as f64 * 100.0 / ab.complete.max(1) as f64),
            reasons: cp.map(|cp| cp.reasons).unwrap_or_default(),
            checked_md5,
        });
    }
    Ok(rows)
}

/// Downloads `/blob` and `/blob.md5` from `netns` and fails unless the body is the 1 MiB the
/// guest published the MD5 of. Returns that MD5.
async fn check_blob(netns: String) -> Result<String> {
    let guest: SocketAddr = format!("{}:80", addr::GUEST).parse()?;
    let client = HttpClient::new(&netns, guest);
    let fetch = Fetch {
        rate: None,
        read_timeout: Duration::from_secs(60),
    };
    let md5 = client.get("/blob.md5", fetch).await?;
    if md5.status != 200 {
        bail!("GET /blob.md5 from {netns}: HTTP {}", md5.status);
    }
    let expected = String::from_utf8_lossy(&md5.body).trim().to_string();
    let blob = client.get("/blob", fetch).await?;
    if blob.status != 200 {
        bail!("GET /blob from {netns}: HTTP {}", blob.status);
    }
    let got = md5_hex(&blob.body);
    if blob.body.len() != BLOB_BYTES || got != expected {
        bail!(
            "GET /blob from {netns} served wrong bytes: {} bytes with MD5 {got}, the guest's \
             /blob.md5 says {BLOB_BYTES} bytes with MD5 {expected}",
            blob.body.len()
        );
    }
    Ok(got)
}

/// What the upload workload is given.
#[derive(Debug, Clone, Serialize)]
pub struct UploadConfig {
    /// Concurrent clients, one run each.
    pub concurrency: Vec<u32>,
    /// MiB each client streams into the echo service.
    pub mib_per_client: u32,
    /// The longest wait for any read or write, seconds.
    pub timeout_s: u32,
}

/// What one upload run (all clients at once) achieved against one guest.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct UploadRun {
    /// Clients started.
    pub clients: u32,
    /// Bytes sent and echoed back identical, all clients.
    pub bytes: u64,
    /// From the first connect to the last client's last echoed byte, seconds.
    pub seconds: f64,
    /// The slowest and the fastest client, seconds.
    pub slowest_s: f64,
    /// See `slowest_s`.
    pub fastest_s: f64,
    /// Clients whose connection failed (the errors in `errors`).
    pub failures: u32,
    /// Connections opened again after the guest reset them before echoing a byte.
    pub retries: u32,
    /// The first few failures' messages.
    pub errors: Vec<String>,
}

impl UploadRun {
    /// Client→guest MB/s (10^6 bytes) over the run, all clients.
    pub fn mb_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 / self.seconds / 1e6
        } else {
            0.0
        }
    }
}

/// One setup at one concurrency.
#[derive(Debug, Clone, Serialize)]
pub struct UploadRow {
    /// The setup.
    pub setup: Setup,
    /// Concurrent clients.
    pub concurrency: u32,
    /// What the clients achieved against the guest (on the twin setup: the first guest).
    pub run: UploadRun,
    /// The twin's own figures, on the twin setup.
    pub twin: Option<UploadRun>,
    /// The primary's checkpoints during the run (COLO setups).
    pub checkpoints: Option<usize>,
    /// Why colo-proxyd asked for checkpoints during the run (colo setup), by reason.
    pub reasons: BTreeMap<String, u64>,
}

/// Runs the upload workload on a booted setup.
pub(super) async fn upload(
    bed: &Bed,
    setup: Setup,
    config: &UploadConfig,
) -> Result<Vec<UploadRow>> {
    let mut rows = Vec::new();
    for &c in &config.concurrency {
        let mark = bed.mark();
        let bytes = u64::from(config.mib_per_client) << 20;
        let timeout = Duration::from_secs(u64::from(config.timeout_s));
        let (run, twin) = bed
            .on_guests(|ns| upload_run(ns, c, bytes, timeout))
            .await?;
        let cp = bed.checkpoints_since(mark);
        rows.push(UploadRow {
            setup,
            concurrency: c,
            run,
            twin,
            checkpoints: cp.as_ref().map(|cp| cp.count),
            reasons: cp.map(|cp| cp.reasons).unwrap_or_default(),
        });
    }
    Ok(rows)
}

/// How one echo client ended.
enum Echoed {
    /// Every byte came back identical, after this long.
    Whole(Duration),
    /// The connection failed (not the bytes).
    Failed(String),
    /// A byte came back different: the setup corrupts data.
    Wrong(String),
}

async fn upload_run(
    netns: String,
    clients: u32,
    bytes: u64,
    timeout: Duration,
) -> Result<UploadRun> {
    let server = SocketAddr::from(([10, 0, 2, 15], ECHO_PORT));
    debug_assert_eq!(server.ip().to_string(), addr::GUEST);
    let started = Instant::now();
    let runs = (0..clients).map(|i| {
        let ns = netns.clone();
        on_thread(&format!("echo-{i}"), move || {
            Ok(echo_client(&ns, server, u64::from(i), bytes, timeout))
        })
    });
    let results = futures_join_all(runs).await;
    let seconds = started.elapsed().as_secs_f64();
    let mut run = UploadRun {
        clients,
        seconds,
        fastest_s: f64::INFINITY,
        ..UploadRun::default()
    };
    for (i, result) in results.into_iter().enumerate() {
        let (echoed, retries) = result?;
        run.retries += retries;
        match echoed {
            Echoed::Whole(took) => {
                run.bytes += bytes;
                run.slowest_s = run.slowest_s.max(took.as_secs_f64());
                run.fastest_s = run.fastest_s.min(took.as_secs_f64());
            }
            Echoed::Failed(e) => {
                run.failures += 1;
                if run.errors.len() < 4 {
                    run.errors.push(format!("client {i}: {e}"));
                }
            }
            Echoed::Wrong(e) => bail!("the echo from {netns}, client {i}: {e}"),
        }
    }
    if !run.fastest_s.is_finite() {
        run.fastest_s = 0.0;
    }
    Ok(run)
}

/// Awaits every future, in order (a handful of clients: no need for a crate).
async fn futures_join_all<T>(futures: impl Iterator<Item = impl Future<Output = T>>) -> Vec<T> {
    let handles: Vec<_> = futures.map(Box::pin).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await);
    }
    out
}

/// Connections an echo client may open again when the guest reset one before echoing a byte.
const ECHO_RETRIES: u32 = 3;

/// One client, on its own thread: joins `netns`, then streams `bytes` of the pattern of `seed`
/// into the echo service. busybox's `nc -ll` sometimes resets a connection that arrives
/// while it is starting the `cat` for another, before any byte is echoed; such a connection is
/// opened again (counted in the report), up to [`ECHO_RETRIES`] times. The time runs from the
/// first attempt.
fn echo_client(
    netns: &str,
    server: SocketAddr,
    seed: u64,
    bytes: u64,
    timeout: Duration,
) -> (Echoed, u32) {
    let started = Instant::now();
    if let Err(e) = enter_netns(netns) {
        return (Echoed::Failed(format!("{e:#}")), 0);
    }
    let mut retries = 0;
    loop {
        match echo_once(server, seed, bytes, timeout) {
            Attempt::Done(Echoed::Whole(_)) => return (Echoed::Whole(started.elapsed()), retries),
            Attempt::Done(other) => return (other, retries),
            Attempt::NothingEchoed(e) if retries < ECHO_RETRIES => {
                tracing::debug!("echo client {seed}: {e}; opening the connection again");
                retries += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            Attempt::NothingEchoed(e) => return (Echoed::Failed(e), retries),
        }
    }
}

/// One connection's outcome.
enum Attempt {
    Done(Echoed),
    /// The connection failed before a byte came back.
    NothingEchoed(String),
}

/// One connection: streams the pattern from a second thread while this one reads the echo and
/// checks it.
fn echo_once(server: SocketAddr, seed: u64, bytes: u64, timeout: Duration) -> Attempt {
    let started = Instant::now();
    let connected = TcpStream::connect_timeout(&server, timeout)
        .with_context(|| format!("connecting to {server}"))
        .and_then(|s| {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            let writer = s.try_clone()?;
            Ok((s, writer))
        });
    let (stream, mut writer) = match connected {
        Ok(s) => s,
        Err(e) => return Attempt::NothingEchoed(format!("{e:#}")),
    };
    // The socket already belongs to the namespace; the writer thread needs no setns.
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let mut pattern = Pattern::new(seed);
        let mut chunk = vec![0u8; 64 * 1024];
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(chunk.len() as u64) as usize;
            pattern.fill(&mut chunk[..n]);
            writer.write_all(&chunk[..n])?;
            sent += n as u64;
        }
        // The guest's `cat` sees end of input, exits, and the echo service closes.
        writer.shutdown(Shutdown::Write)
    });
    let outcome = read_echo(stream, seed, bytes);
    let send_result = sender
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the sending thread panicked")));
    match (outcome, send_result) {
        (Ok(None), Ok(())) => Attempt::Done(Echoed::Whole(started.elapsed())),
        (Ok(Some(wrong)), _) => Attempt::Done(Echoed::Wrong(wrong)),
        (Err((0, e)), _) => Attempt::NothingEchoed(e),
        (Err((_, e)), _) => Attempt::Done(Echoed::Failed(e)),
        (Ok(None), Err(e)) => Attempt::Done(Echoed::Failed(format!("sending: {e}"))),
    }
}

/// Reads the echo until `bytes` came back; `Ok(Some(..))` names the first byte that differs,
/// an error says how many bytes had come back.
fn read_echo(
    mut stream: TcpStream,
    seed: u64,
    bytes: u64,
) -> Result<Option<String>, (u64, String)> {
    let mut pattern = Pattern::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    while got < bytes {
        let n = stream.read(&mut buf).map_err(|e| {
            (
                got,
                format!("reading the echo after {got} of {bytes} bytes: {e}"),
            )
        })?;
        if n == 0 {
            return Err((got, format!("the echo ended after {got} of {bytes} bytes")));
        }
        if got + n as u64 > bytes {
            return Ok(Some(format!(
                "{} bytes came back, {bytes} were sent",
                got + n as u64
            )));
        }
        pattern.fill(&mut want[..n]);
        if let Some(at) = first_difference(&buf[..n], &want[..n]) {
            return Ok(Some(format!(
                "byte {} came back as {:#04x}, {:#04x} was sent",
                got + at as u64,
                buf[at],
                want[at]
            )));
        }
        got += n as u64;
    }
    Ok(None)
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// A reproducible byte stream (splitmix64 of the seed and the 8-byte block's index): what a
/// client sends is what its reader expects back, chunked however the network chunks it.
struct Pattern {
    seed: u64,
    offset: u64,
}

impl Pattern {
    fn new(seed: u64) -> Self {
        Pattern { seed, offset: 0 }
    }

    fn block(&self, index: u64) -> [u8; 8] {
        let mut z = self
            .seed
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(index);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)).to_le_bytes()
    }

    /// The next `out.len()` bytes of the stream.
    fn fill(&mut self, out: &mut [u8]) {
        let mut i = 0;
        while i < out.len() {
            let block = self.block(self.offset / 8);
            let within = (self.offset % 8) as usize;
            let n = (8 - within).min(out.len() - i);
            out[i..i + n].copy_from_slice(&block[within..within + n]);
            i += n;
            self.offset += n as u64;
        }
    }
}

fn download_row(rows: &[DownloadRow], setup: Setup, c: u32) -> Option<&DownloadRow> {
    rows.iter().find(|r| r.setup == setup && r.concurrency == c)
}

/// The download table, MB/s as a share of the twin's.
pub(super) fn render_download(config: &DownloadConfig, rows: &[DownloadRow]) -> String {
    let mut out = format!(
        "download: `ab -n {} -c C` on `GET /blob` (1 MiB; one more download per run checked \
         against /blob.md5); MB/s = 10^6 bytes of bodies per second, all clients\n\n",
        config.downloads
    );
    out += "| setup | clients | MB/s | vs twin | p50 ms | p99 ms | failed | checkpoints | per 100 downloads | reasons |\n";
    out += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n";
    for r in rows {
        let base =
            download_row(rows, Setup::Twin, r.concurrency).and_then(|t| t.ab.body_mb_per_s());
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.setup.name(),
            r.concurrency,
            cell(r.ab.body_mb_per_s().map(|v| format!("{v:.2}"))),
            r.ab.body_mb_per_s()
                .map_or_else(|| "-".into(), |v| share(v, base)),
            cell(r.ab.p50_ms),
            cell(r.ab.p99_ms),
            r.ab.failures(),
            cell(r.checkpoints),
            cell(r.checkpoints_per_100.map(|n| format!("{n:.1}"))),
            render_reasons(&r.reasons),
        );
    }
    out
}

fn upload_row(rows: &[UploadRow], setup: Setup, c: u32) -> Option<&UploadRow> {
    rows.iter().find(|r| r.setup == setup && r.concurrency == c)
}

/// The upload table, MB/s as a share of the twin's.
pub(super) fn render_upload(config: &UploadConfig, rows: &[UploadRow]) -> String {
    let mut out = format!(
        "upload (with the echo): each client streams {} MiB into the guest's echo service (port \
         7) and reads it back, every byte checked; MB/s = 10^6 bytes client→guest per second, \
         all clients (the same bytes come back at the same time)\n\n",
        config.mib_per_client
    );
    out += "| setup | clients | MB/s | vs twin | slowest s | fastest s | failed | reconnects | checkpoints | reasons |\n";
    out += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n";
    for r in rows {
        let base = upload_row(rows, Setup::Twin, r.concurrency).map(|t| t.run.mb_per_s());
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} | {} | {:.1} | {:.1} | {} | {} | {} | {} |",
            r.setup.name(),
            r.concurrency,
            r.run.mb_per_s(),
            share(r.run.mb_per_s(), base),
            r.run.slowest_s,
            r.run.fastest_s,
            r.run.failures,
            r.run.retries,
            cell(r.checkpoints),
            render_reasons(&r.reasons),
        );
    }
    let errors: Vec<String> = rows
        .iter()
        .flat_map(|r| {
            r.run
                .errors
                .iter()
                .map(move |e| format!("{}: {e}", r.setup.name()))
        })
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(out, "\nfailed clients: {}", errors.join("; "));
    }
    out
}

/// One line per row, for plotting.
pub(super) fn download_csv(rows: &[DownloadRow]) -> String {
    let mut out = String::from(
        "setup,clients,mb_per_s,p50_ms,p99_ms,failed,checkpoints,checkpoints_per_100,twin_mb_per_s\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{}",
            r.setup.name(),
            r.concurrency,
            csv_cell(r.ab.body_mb_per_s().map(|v| format!("{v:.3}"))),
            csv_cell(r.ab.p50_ms),
            csv_cell(r.ab.p99_ms),
            r.ab.failures(),
            r.checkpoints.map_or(String::new(), |n| n.to_string()),
            r.checkpoints_per_100
                .map_or(String::new(), |n| format!("{n:.2}")),
            r.twin
                .and_then(|t| t.body_mb_per_s())
                .map_or(String::new(), |v| format!("{v:.3}")),
        );
    }
    out
}

/// One line per row, for plotting.
pub(super) fn upload_csv(rows: &[UploadRow]) -> String {
    let mut out = String::from(
        "setup,clients,mb_per_s,slowest_s,fastest_s,failed,reconnects,checkpoints,twin_mb_per_s\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{},{},{:.3},{:.2},{:.2},{},{},{},{}",
            r.setup.name(),
            r.concurrency,
            r.run.mb_per_s(),
            r.run.slowest_s,
            r.run.fastest_s,
            r.run.failures,
            r.run.retries,
            r.checkpoints.map_or(String::new(), |n| n.to_string()),
            r.twin
                .as_ref()
                .map_or(String::new(), |t| format!("{:.3}", t.mb_per_s())),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn the_pattern_is_the_same_however_it_is_chunked() {
        let mut whole = vec![0u8; 1000];
        Pattern::new(7).fill(&mut whole);
        let mut pieces = Pattern::new(7);
        let mut chunked = Vec::new();
        for n in [1, 7, 8, 3, 500, 481] {
            let mut part = vec![0u8; n];
            pieces.fill(&mut part);
            chunked.extend(part);
        }
        assert_eq!(chunked, whole);
        let mut other = vec![0u8; 1000];
        Pattern::new(8).fill(&mut other);
        assert_ne!(other, whole, "each client sends its own bytes");
        assert!(whole.iter().any(|&b| b != whole[0]));
    }

    /// An echo server on loopback: returns what it reads, with `corrupt` applied.
    fn echo_server(corrupt: Option<usize>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 4096];
            let mut seen = 0usize;
            loop {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                if let Some(c) = corrupt
                    && (seen..seen + n).contains(&c)
                {
                    buf[c - seen] ^= 0xff;
                }
                seen += n;
                s.write_all(&buf[..n]).unwrap();
            }
        });
        at
    }

    fn client(server: SocketAddr, bytes: u64) -> Result<Option<String>, String> {
        let stream = TcpStream::connect(server).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            let mut p = Pattern::new(3);
            let mut data = vec![0u8; bytes as usize];
            p.fill(&mut data);
            // A server that gives up early resets the connection: not this test's concern.
            let _ = writer.write_all(&data);
            let _ = writer.shutdown(Shutdown::Write);
        });
        let out = read_echo(stream, 3, bytes).map_err(|(_, e)| e);
        sender.join().unwrap();
        out
    }

    #[test]
    fn an_identical_echo_passes_and_a_changed_byte_is_named() {
        assert_eq!(client(echo_server(None), 300_000), Ok(None));
        let wrong = client(echo_server(Some(123_456)), 300_000)
            .unwrap()
            .expect("a changed byte is found");
        assert!(wrong.starts_with("byte 123456 came back as"), "{wrong}");
    }

    #[test]
    fn a_short_echo_is_a_failure_not_a_pass() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 100];
            s.read_exact(&mut buf).unwrap();
            s.write_all(&buf).unwrap();
            // Then close: the rest never comes back.
        });
        // A close with bytes unread may reach the client as an end or as a reset.
        let err = client(at, 1000).unwrap_err();
        assert!(err.contains("after 100 of 1000 bytes"), "{err}");
    }

    #[test]
    fn upload_figures() {
        let run = UploadRun {
            clients: 2,
            bytes: 8 << 20,
            seconds: 2.0,
            slowest_s: 2.0,
            fastest_s: 1.5,
            failures: 0,
            retries: 1,
            errors: vec![],
        };
        assert!((run.mb_per_s() - 4.194304).abs() < 1e-9);
        assert_eq!(UploadRun::default().mb_per_s(), 0.0);
        let rows = vec![
            UploadRow {
                setup: Setup::Twin,
                concurrency: 2,
                run: run.clone(),
                twin: Some(run.clone()),
                checkpoints: None,
                reasons: BTreeMap::new(),
            },
            UploadRow {
                setup: Setup::Colo,
                concurrency: 2,
                run: UploadRun {
                    seconds: 4.0,
                    ..run.clone()
                },
                twin: None,
                checkpoints: Some(3),
                reasons: BTreeMap::from([("payload-differs".into(), 1)]),
            },
        ];
        let config = UploadConfig {
            concurrency: vec![2],
            mib_per_client: 4,
            timeout_s: 60,
        };
        let md = render_upload(&config, &rows);
        assert!(
            md.contains("| colo | 2 | 2.10 | 0.50 | 2.0 | 1.5 | 0 | 1 | 3 | payload-differs 1 |"),
            "{md}"
        );
        let csv = upload_csv(&rows);
        assert_eq!(csv.lines().nth(2), Some("colo,2,2.097,2.00,1.50,0,1,3,"));
    }
}
