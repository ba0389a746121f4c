//! `qemu-img bench` against `colo-blockd serve` and against `qemu-nbd`
//! serving the same raw image on Unix sockets, in the same run: reads and
//! writes of 4 KiB and 64 KiB at queue depth 16. Prints ops/s per server
//! and the ratio colo-blockd / qemu-nbd per case (the goal is ≥ 1.0,
//! docs/benchmarks.md). Asserts nothing about timing; it fails only if a
//! run fails.
//!
//! ```text
//! cargo build --release -p colo-blockd
//! cargo run --release -p colo-blockd --example qemu_img_bench -- [OPTIONS] DIR
//!
//!   DIR              where the 256 MiB test image goes (the file system to measure)
//!   --blockd PATH    the colo-blockd binary (default: target/release/colo-blockd,
//!                    next to this example's directory; examples cannot depend on
//!                    the package's binary, so build it first)
//!   --rounds N       runs per server and case, best one reported (default 2)
//!   --seconds S      target length of one run (default 3)
//! ```
//!
//! Both servers serve the image the way colo-blockd does: through the page
//! cache, durable only on FLUSH or FUA. colo-blockd uses buffered
//! `pread`/`pwrite` on tokio's blocking pool, so qemu-nbd runs with
//! `--cache=writeback` (no `O_DIRECT`, flushes honoured) and `--aio=threads`
//! (a thread pool; native AIO needs `O_DIRECT`). `--cache=none` would make
//! qemu-nbd bypass the page cache that colo-blockd uses, and the comparison
//! would measure the device instead of the servers.
//!
//! Runs alternate the order (colo-blockd first in odd rounds, qemu-nbd
//! first in even ones), so a warming cache or a noisy neighbour does not
//! favour one server. The request count of each case is calibrated once,
//! on colo-blockd, so that a run takes about `--seconds`; both servers
//! then run that same count.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

/// Size of the test image: large enough that sequential requests do not
/// wrap too often, small enough for any /tmp.
const IMAGE_SIZE: u64 = 256 << 20;
const DEPTH: u32 = 16;
const EXPORT: &str = "disk";
/// Requests of the calibration run.
const CALIBRATION: u64 = 2000;

#[derive(Debug, Clone, Copy)]
struct Case {
    write: bool,
    block: u64,
}

impl Case {
    fn label(&self) -> String {
        let kind = if self.write { "write" } else { "read" };
        format!("{kind} {:>2} KiB", self.block / 1024)
    }
}

#[derive(Debug)]
struct Options {
    dir: PathBuf,
    blockd: PathBuf,
    rounds: usize,
    seconds: f64,
}

fn main() -> anyhow::Result<()> {
    let opts = parse_args()?;
    ensure!(
        opts.blockd.is_file(),
        "no colo-blockd binary at {}: run `cargo build --release -p colo-blockd` first, or pass \
         --blockd PATH",
        opts.blockd.display()
    );
    for tool in ["qemu-img", "qemu-nbd"] {
        ensure!(
            Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "`{tool}` is not installed: apt-get install -y qemu-utils"
        );
    }
    let dir = tempfile::tempdir_in(&opts.dir)
        .with_context(|| format!("cannot create a directory in {}", opts.dir.display()))?;
    let image = dir.path().join("disk.raw");
    create_image(&image)?;

    let blockd_sock = dir.path().join("blockd.sock");
    let qemu_sock = dir.path().join("qemu-nbd.sock");
    let blockd = Server::start(
        "colo-blockd",
        Command::new(&opts.blockd)
            .arg("serve")
            .arg("--export")
            .arg(format!("{EXPORT}={}", image.display()))
            .arg("--unix")
            .arg(&blockd_sock),
        &blockd_sock,
    )?;
    let qemu_nbd = Server::start(
        "qemu-nbd",
        Command::new("qemu-nbd")
            .args(["-f", "raw", "--cache=writeback", "--aio=threads"])
            // Persistent: one client after the other, for every run.
            .args(["-t", "-x", EXPORT, "-k"])
            .arg(&qemu_sock)
            .arg(&image),
        &qemu_sock,
    )?;

    println!(
        "qemu-img bench, queue depth {DEPTH}, image {} MiB in {}, best of {} runs of ~{} s each",
        IMAGE_SIZE >> 20,
        opts.dir.display(),
        opts.rounds,
        opts.seconds
    );
    println!(
        "  {:<14} {:>9} {:>14} {:>14} {:>7}",
        "case", "requests", "colo-blockd/s", "qemu-nbd/s", "ratio"
    );
    let cases = [
        Case {
            write: false,
            block: 4096,
        },
        Case {
            write: false,
            block: 65536,
        },
        Case {
            write: true,
            block: 4096,
        },
        Case {
            write: true,
            block: 65536,
        },
    ];
    for case in cases {
        let probe = bench(&blockd, case, CALIBRATION)?;
        let count = ((CALIBRATION as f64 * opts.seconds / probe.as_secs_f64()) as u64)
            .clamp(CALIBRATION, 50_000_000);
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for round in 0..opts.rounds {
            let order = if round % 2 == 0 {
                [&blockd, &qemu_nbd]
            } else {
                [&qemu_nbd, &blockd]
            };
            for server in order {
                let took = bench(server, case, count)?;
                let rate = count as f64 / took.as_secs_f64();
                if std::ptr::eq(server, &blockd) {
                    ours.push(rate);
                } else {
                    theirs.push(rate);
                }
            }
        }
        let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        let (ours, theirs) = (best(&ours), best(&theirs));
        println!(
            "  {:<14} {count:>9} {ours:>14.0} {theirs:>14.0} {:>7.2}",
            case.label(),
            ours / theirs
        );
        std::io::stdout().flush()?;
    }
    drop(blockd);
    drop(qemu_nbd);
    Ok(())
}

fn parse_args() -> anyhow::Result<Options> {
    let mut args = std::env::args().skip(1);
    let mut dir = None;
    let mut blockd = None;
    let mut rounds = 2;
    let mut seconds = 3.0;
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--blockd" => blockd = Some(PathBuf::from(value("--blockd")?)),
            "--rounds" => rounds = value("--rounds")?.parse().context("--rounds")?,
            "--seconds" => seconds = value("--seconds")?.parse().context("--seconds")?,
            "-h" | "--help" => {
                println!("usage: qemu_img_bench [--blockd PATH] [--rounds N] [--seconds S] DIR");
                std::process::exit(0);
            }
            s if s.starts_with('-') => bail!("unknown option {s}"),
            _ if dir.is_none() => dir = Some(PathBuf::from(arg)),
            _ => bail!("one DIR only"),
        }
    }
    ensure!(rounds >= 1, "--rounds must be at least 1");
    ensure!(seconds > 0.0, "--seconds must be positive");
    let blockd = match blockd {
        Some(path) => path,
        // target/release/examples/qemu_img_bench -> target/release/colo-blockd
        None => std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .context("cannot locate the target directory")?
            .join("colo-blockd"),
    };
    Ok(Options {
        dir: dir.context("usage: qemu_img_bench [--blockd PATH] [--rounds N] [--seconds S] DIR")?,
        blockd,
        rounds,
        seconds,
    })
}

/// A fully allocated image, as a guest's disk would be: writing into
/// holes would time the file system's block allocation too.
fn create_image(path: &Path) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path)?;
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..IMAGE_SIZE / chunk.len() as u64 {
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    Ok(())
}

/// A server process, killed when dropped.
struct Server {
    name: &'static str,
    socket: PathBuf,
    child: Child,
}

impl Server {
    fn start(name: &'static str, cmd: &mut Command, socket: &Path) -> anyhow::Result<Server> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let mut server = Server {
            name,
            socket: socket.to_owned(),
            child,
        };
        let started = Instant::now();
        // Wait until it listens; the probe connection is closed at once
        // (both servers take the next client after it).
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if let Some(status) = server.child.try_wait()? {
                bail!("{name} exited at start ({status})");
            }
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "{name} does not listen on {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `qemu-img bench` run; returns the time it reports.
fn bench(server: &Server, case: Case, count: u64) -> anyhow::Result<Duration> {
    let image_opts = format!(
        "driver=nbd,server.type=unix,server.path={},export={EXPORT}",
        server.socket.display()
    );
    let mut cmd = Command::new("qemu-img");
    cmd.args(["bench", "--image-opts", "-d", &DEPTH.to_string()])
        .args(["-c", &count.to_string(), "-s", &case.block.to_string()]);
    if case.write {
        cmd.args(["-w", "--pattern", "165"]);
    }
    let out = cmd
        .arg(&image_opts)
        .output()
        .context("cannot run qemu-img")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "qemu-img bench ({}, {}) failed ({}): {stdout}{}",
        server.name,
        case.label(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // "Run completed in 2.345 seconds."
    let secs: f64 = stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("Run completed in ")?
                .strip_suffix(" seconds.")
        })
        .and_then(|s| s.trim().parse().ok())
        .with_context(|| format!("no run time in qemu-img's output: {stdout}"))?;
    Ok(Duration::from_secs_f64(secs.max(1e-6)))
}
