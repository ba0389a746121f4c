//! The cost of NBD STARTTLS: libnbd's `nbdcopy` over TCP against one colo-blockd server (in
//! this process) on two loopback ports serving the same raw image, one plaintext and one
//! requiring TLS (the pair's mutual TLS; libnbd's `tls-certificates=DIR` on the client side,
//! the same directory layout QEMU's `tls-creds-x509` reads), in the same run: the whole
//! 128 MiB export read and written in requests of 4 KiB, 64 KiB and 1 MiB, 16 in flight, one
//! connection. Prints MiB/s per case and the ratio TLS / plaintext. Asserts nothing about
//! timing; it fails only if a run fails. (`qemu-img bench` takes no `--object`, so it cannot
//! speak TLS.)
//!
//! ```text
//! cargo run --release -p colo-blockd --example tls_cost -- [--rounds N] [--seconds S] DIR
//!
//!   DIR              where the test image, the source file and the identities go
//!   --rounds N       runs per transport and case, best one reported (default 3)
//! ```
//!
//! Runs alternate the order (plaintext first in odd rounds, TLS first in even ones), so a
//! warming cache or a noisy neighbour does not favour one transport.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use colo_blockd::backend::FileBackend;
use colo_blockd::export::{Export, ExportSet};
use colo_blockd::server::{NbdServer, ServerConfig};
use tokio_util::sync::CancellationToken;

const IMAGE_SIZE: u64 = 128 << 20;
const DEPTH: u32 = 16;
const EXPORT: &str = "disk";
/// The server's host name: libnbd checks the certificate against the URI's host.
const SERVER: &str = "localhost";
const CLIENT: &str = "primary";

#[derive(Debug, Clone, Copy)]
struct Case {
    write: bool,
    block: u64,
}

impl Case {
    fn label(&self) -> String {
        let kind = if self.write { "write" } else { "read" };
        format!("{kind} {:>4} KiB", self.block / 1024)
    }
}

/// One of the two ports.
struct Port {
    name: &'static str,
    port: u16,
    /// The client's identity directory, for TLS.
    tls: Option<PathBuf>,
}

struct Options {
    dir: PathBuf,
    rounds: u32,
}

fn parse_args() -> anyhow::Result<Options> {
    let mut args = std::env::args().skip(1);
    let mut dir = None;
    let mut rounds = 3;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => rounds = args.next().context("--rounds N")?.parse()?,
            other if !other.starts_with('-') && dir.is_none() => dir = Some(PathBuf::from(other)),
            other => bail!("unexpected argument {other:?}"),
        }
    }
    ensure!(rounds >= 1, "--rounds must be at least 1");
    Ok(Options {
        dir: dir.context("usage: tls_cost [--rounds N] DIR")?,
        rounds,
    })
}

fn main() -> anyhow::Result<()> {
    let opts = parse_args()?;
    let work = tempfile::tempdir_in(&opts.dir).context("cannot make a directory in DIR")?;
    let image = work.path().join("disk.raw");
    std::fs::File::create(&image)?.set_len(IMAGE_SIZE)?;
    // Data that is neither zero nor sparse, for the writes.
    let source = work.path().join("source.raw");
    let data: Vec<u8> = (0..IMAGE_SIZE).map(|i| (i % 251) as u8 | 1).collect();
    std::fs::write(&source, data)?;
    let pki = work.path().join("pki");
    colo_tls::pki::create_pair(
        &pki,
        &[SERVER.into(), CLIENT.into()],
        colo_tls::pki::Validity::days(1),
    )?;
    let identity = colo_tls::HostIdentity::load(pki.join(SERVER))?;
    let acceptor =
        colo_tls::PeerAcceptor::new(&identity, &[CLIENT.into()], Duration::from_secs(5))?;

    let backend = FileBackend::open(&image, false)?;
    let plain = NbdServer::new(
        ExportSet::new(vec![Export::new(EXPORT, backend)])?,
        ServerConfig::default(),
    );
    let tls = plain.clone().with_tls(acceptor);
    let plain_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let tls_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let ports = [
        Port {
            name: "plaintext",
            port: plain_listener.local_addr()?.port(),
            tls: None,
        },
        Port {
            name: "TLS",
            port: tls_listener.local_addr()?.port(),
            tls: Some(pki.join(CLIENT)),
        },
    ];
    plain_listener.set_nonblocking(true)?;
    tls_listener.set_nonblocking(true)?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let serving = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async move {
            let a = tokio::net::TcpListener::from_std(plain_listener).expect("listener");
            let b = tokio::net::TcpListener::from_std(tls_listener).expect("listener");
            tokio::join!(
                plain.serve_tcp(a, stop.clone()),
                tls.serve_tcp(b, stop.clone())
            );
        });
    });

    let mut cases = Vec::new();
    for write in [false, true] {
        for block in [4096, 65536, 1 << 20] {
            cases.push(Case { write, block });
        }
    }
    println!(
        "nbdcopy over TCP loopback, {} MiB, {DEPTH} requests in flight, best of {} rounds",
        IMAGE_SIZE >> 20,
        opts.rounds
    );
    println!(
        "{:<16} {:>12} {:>12} {:>10}",
        "case", "plain MiB/s", "TLS MiB/s", "TLS/plain"
    );
    for case in cases {
        let mut best = [f64::MAX; 2];
        for round in 0..opts.rounds {
            let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                best[i] = best[i].min(copy(&ports[i], case, &source)?.as_secs_f64());
            }
        }
        let mib = (IMAGE_SIZE >> 20) as f64;
        let (p, t) = (mib / best[0], mib / best[1]);
        println!("{:<16} {p:>12.1} {t:>12.1} {:>10.2}", case.label(), t / p);
    }
    shutdown.cancel();
    let _ = serving.join();
    Ok(())
}

/// One `nbdcopy` of the whole export on `port` (read: into `null:`; write: from `source`);
/// returns the wall time it took.
fn copy(port: &Port, case: Case, source: &Path) -> anyhow::Result<Duration> {
    let uri = match &port.tls {
        None => format!("nbd://127.0.0.1:{}/{EXPORT}", port.port),
        Some(dir) => format!(
            "nbds://{SERVER}:{}/{EXPORT}?tls-certificates={}",
            port.port,
            dir.display()
        ),
    };
    let (from, to) = if case.write {
        (source.display().to_string(), uri)
    } else {
        (uri, "null:".to_string())
    };
    let started = Instant::now();
    let out = Command::new("nbdcopy")
        .args([
            "-C",
            "1",
            "-R",
            &DEPTH.to_string(),
            "-S",
            "0",
            "--no-extents",
        ])
        .arg(format!("--request-size={}", case.block))
        .args([&from, &to])
        .output()
        .context("cannot run nbdcopy")?;
    let took = started.elapsed();
    ensure!(
        out.status.success(),
        "nbdcopy ({}, {}) failed ({}): {}",
        port.name,
        case.label(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(took)
}
