//! Shared test helpers: an in-process server on a temporary Unix socket or
//! TCP port, a minimal raw NBD client for hostile and protocol tests, and the
//! check that external tools are installed.

#![allow(dead_code)] // each test binary uses a different part

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use colo_blockd::backend::FileBackend;
use colo_blockd::export::{Export, ExportSet};
use colo_blockd::server::{NbdServer, ServerConfig};
use tokio_util::sync::CancellationToken;

pub mod exposition;
pub mod fake_qmp;
pub mod raw;
pub mod recording;
pub mod scripted;

pub use recording::{Op, Recording};

/// Fails the test with what to install when `tool` is missing: these tests
/// must never pass by skipping.
pub fn require_tool(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is not installed; this test needs it: apt-get install -y {package}"
    );
}

/// Runs `program args...`, returning its output.
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Runs `program args...` and asserts it succeeded; returns stdout.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A TCP address on the loopback that was free a moment ago, for a child
/// process to bind (it cannot report a port 0 choice back).
pub fn free_tcp_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// An image file filled with a recognisable pattern (byte `i % 251`), so
/// any stray write shows.
pub fn patterned_image(dir: &Path, name: &str, len: usize) -> PathBuf {
    let path = dir.join(name);
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, data).unwrap();
    path
}

/// Reads `len` bytes of `path` at `offset`.
pub fn file_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// A server running on its own runtime thread; stops when dropped.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub tcp: std::net::SocketAddr,
    pub images: Vec<PathBuf>,
    /// What reached each export's backend, in order of arrival.
    pub recordings: Vec<Recording>,
    /// The server's metrics.
    pub metrics: colo_blockd::metrics::Metrics,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    /// Serves `exports` (name, image size, read-only) on a Unix socket and a
    /// TCP port, with images made by [`patterned_image`].
    pub fn start(exports: &[(&str, usize, bool)]) -> TestServer {
        TestServer::start_with(exports, None)
    }

    /// [`TestServer::start`] with TLS required on the TCP port when `tls` is given.
    pub fn start_with(
        exports: &[(&str, usize, bool)],
        tls: Option<colo_tls::PeerAcceptor>,
    ) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let mut images = Vec::new();
        let mut list = Vec::new();
        let mut recordings = Vec::new();
        for (name, size, read_only) in exports {
            let img = patterned_image(dir.path(), &format!("{name}.raw"), *size);
            let backend = Recording::new(FileBackend::open(&img, *read_only).unwrap());
            recordings.push(backend.clone());
            list.push(Export::new(*name, backend).with_description(format!("test image {name}")));
            images.push(img);
        }
        let metrics = colo_blockd::metrics::Metrics::new();
        let mut server = NbdServer::new(ExportSet::new(list).unwrap(), ServerConfig::default())
            .with_metrics(metrics.clone());
        if let Some(acceptor) = tls {
            server = server.with_tls(acceptor);
        }
        let shutdown = CancellationToken::new();
        let std_tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_tcp.set_nonblocking(true).unwrap();
        let tcp = std_tcp.local_addr().unwrap();
        let std_unix = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        std_unix.set_nonblocking(true).unwrap();
        let stop = shutdown.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let unix = tokio::net::UnixListener::from_std(std_unix).unwrap();
                let tcp = tokio::net::TcpListener::from_std(std_tcp).unwrap();
                tokio::join!(
                    server.serve_unix(unix, stop.clone()),
                    server.serve_tcp(tcp, stop.clone())
                );
            });
        });
        TestServer {
            dir,
            socket,
            tcp,
            images,
            recordings,
            metrics,
            shutdown,
            thread: Some(thread),
        }
    }

    /// The operations export `i`'s backend received.
    pub fn ops(&self, i: usize) -> Vec<Op> {
        self.recordings[i].ops()
    }

    /// `nbd+unix:///NAME?socket=...`
    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// `nbd://127.0.0.1:PORT/NAME`
    pub fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.tcp)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves exactly one client, on one end of a socket pair, with any backend;
/// returns the client's end and the thread that yields how the server's
/// side of the connection ended.
pub fn serve_pair<B: colo_blockd::backend::BlockBackend + std::fmt::Debug>(
    exports: Vec<Export<B>>,
    config: ServerConfig,
) -> (raw::RawClient, std::thread::JoinHandle<Result<(), String>>) {
    serve_pair_until(exports, config, CancellationToken::new())
}

/// [`serve_pair`] that stops serving when `shutdown` is cancelled.
pub fn serve_pair_until<B: colo_blockd::backend::BlockBackend + std::fmt::Debug>(
    exports: Vec<Export<B>>,
    config: ServerConfig,
    shutdown: CancellationToken,
) -> (raw::RawClient, std::thread::JoinHandle<Result<(), String>>) {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    theirs.set_nonblocking(true).unwrap();
    let server = NbdServer::new(ExportSet::new(exports).unwrap(), config);
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let stream = tokio::net::UnixStream::from_std(theirs).unwrap();
            server
                .serve_stream_until(stream, &shutdown)
                .await
                .map_err(|e| e.to_string())
        })
    });
    ours.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    (raw::RawClient { stream: ours }, thread)
}

/// Opens the replica over `image` again after the test dropped the previous one. The image's
/// lock (one replica per image) is held until every task of the old replica let go of the
/// image, and the background writing of a commit may still be finishing: in a daemon that is
/// the dead process, here a few milliseconds. Any other outcome is returned at once.
pub async fn try_reopen(
    image: &Path,
    config: colo_blockd::replica::ReplicaConfig,
) -> std::io::Result<colo_blockd::replica::Replica> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match colo_blockd::replica::Replica::open(image, config) {
            Err(e)
                if e.kind() == std::io::ErrorKind::ResourceBusy
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            opened => return opened,
        }
    }
}

/// The file `suffix` next to `image` (`disk.raw` + `.colo-journal`).
pub fn sibling(image: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(suffix);
    name.into()
}

/// [`try_reopen`], which must succeed.
pub async fn reopen(
    image: &Path,
    config: colo_blockd::replica::ReplicaConfig,
) -> colo_blockd::replica::Replica {
    try_reopen(image, config).await.unwrap()
}
