//! How much does the checkpoint-barrier relay add to a checkpoint's pause? Measured precisely,
//! without QEMU: the real `qmp-driver relay` process sits between a fake primary and a fake
//! secondary QEMU that play COLO's checkpoint exchange, with a synchronous subscriber (as
//! colo-blockd and colo-proxyd are) acknowledging every barrier at once. Every round runs one
//! checkpoint straight from the fake primary to the fake secondary and one through the relay,
//! in alternating order, so both see the same machine; the report is the median of the
//! per-round differences (pause through the relay − pause without), next to both
//! distributions.
//!
//! The pause is timed as the primary QEMU has it: from the secondary's `checkpoint-reply`
//! (the primary stops its VM on it) to `vmstate-loaded` (it resumes on it). In between, the
//! primary streams `vmstate-send`, the RAM, `vmstate-size` and the device state; the secondary
//! answers `vmstate-received` once it has everything, then `vmstate-loaded`. The relay holds
//! `checkpoint-reply` and `vmstate-received` for their barriers, as it does for QEMU.
//!
//! On the test bed the same difference is measured between real QEMU pairs
//! (`colo-testbed relay-epochs`), where checkpoint pauses vary by tens of milliseconds from one
//! checkpoint and one pair to the next; this isolates what the relay itself costs.
//!
//! ```text
//! cargo build --release -p qmp-driver
//! cargo build --release -p colo-relay --example relay_pause
//! target/release/examples/relay_pause [--rounds 500] [--ram-kib 1200] [--subscribers 1]
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use colo_control::client::{Subscriber, query_status};
use colo_relay::{ColoMessage, QEVM_MAGIC};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// QEMU writes the migration stream through a 32 KiB buffer.
const WRITE_CHUNK: usize = 32 * 1024;
/// Device state per checkpoint (a small PC's is in this order).
const DEVICE_STATE: usize = 64 * 1024;
/// Bound of every wait: a hang is an error, not a stuck benchmark.
const WAIT: Duration = Duration::from_secs(10);

struct Options {
    rounds: usize,
    ram: usize,
    subscribers: usize,
    relay_binary: PathBuf,
}

fn usage() -> &'static str {
    "usage: relay_pause [--rounds N] [--ram-kib N] [--subscribers N] [--relay PATH]\n\
     (build first: cargo build --release -p qmp-driver -p colo-relay --bins --examples)"
}

fn options() -> Result<Options> {
    let mut opts = Options {
        rounds: 500,
        ram: 1200 * 1024,
        subscribers: 1,
        relay_binary: default_relay_binary()?,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value\n{}", usage()))
        };
        match arg.as_str() {
            "--rounds" => opts.rounds = value()?.parse()?,
            "--ram-kib" => opts.ram = value()?.parse::<usize>()? * 1024,
            "--subscribers" => opts.subscribers = value()?.parse()?,
            "--relay" => opts.relay_binary = value()?.into(),
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{}", usage()),
        }
    }
    ensure!(opts.rounds > 0, "--rounds must be at least 1");
    Ok(opts)
}

/// `$COLO_QMP_DRIVER`, or the `qmp-driver` built beside this example.
fn default_relay_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("COLO_QMP_DRIVER") {
        return Ok(path.into());
    }
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("cannot locate the target directory")?;
    Ok(profile_dir.join("qmp-driver"))
}

fn encode(messages: &[ColoMessage]) -> Vec<u8> {
    let mut out = Vec::new();
    for message in messages {
        message.encode(&mut out);
    }
    out
}

async fn expect(stream: &mut UnixStream, message: ColoMessage) -> Result<()> {
    let mut got = vec![0u8; message.wire_len()];
    tokio::time::timeout(WAIT, stream.read_exact(&mut got))
        .await
        .with_context(|| format!("no {message} within {WAIT:?}"))??;
    ensure!(
        got == encode(&[message]),
        "expected {message}, got {got:02x?}"
    );
    Ok(())
}

/// The fake primary's side of one checkpoint; returns its pause.
async fn primary_checkpoint(stream: &mut UnixStream, ram: &[u8]) -> Result<Duration> {
    stream
        .write_all(&encode(&[ColoMessage::CheckpointRequest]))
        .await?;
    expect(stream, ColoMessage::CheckpointReply).await?;
    let stopped = Instant::now();
    stream
        .write_all(&encode(&[ColoMessage::VmstateSend]))
        .await?;
    for chunk in ram.chunks(WRITE_CHUNK) {
        stream.write_all(chunk).await?;
    }
    stream
        .write_all(&encode(&[ColoMessage::VmstateSize(DEVICE_STATE as u64)]))
        .await?;
    for chunk in ram[..DEVICE_STATE.min(ram.len())].chunks(WRITE_CHUNK) {
        stream.write_all(chunk).await?;
    }
    expect(stream, ColoMessage::VmstateReceived).await?;
    expect(stream, ColoMessage::VmstateLoaded).await?;
    Ok(stopped.elapsed())
}

/// The fake secondary: answers checkpoints on one channel until it closes.
async fn secondary_channel(mut stream: UnixStream, ram: usize) -> Result<()> {
    let mut magic = [0u8; 4];
    stream.read_exact(&mut magic).await?;
    ensure!(
        u32::from_be_bytes(magic) == QEVM_MAGIC,
        "no migration magic"
    );
    stream
        .write_all(&encode(&[ColoMessage::CheckpointReady]))
        .await?;
    let state = 4 + ram + 12 + DEVICE_STATE.min(ram);
    let mut buf = vec![0u8; state];
    loop {
        let mut request = [0u8; 4];
        match stream.read_exact(&mut request).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        ensure!(
            request[..] == encode(&[ColoMessage::CheckpointRequest])[..],
            "expected checkpoint-request"
        );
        stream
            .write_all(&encode(&[ColoMessage::CheckpointReply]))
            .await?;
        stream.read_exact(&mut buf).await?;
        stream
            .write_all(&encode(&[ColoMessage::VmstateReceived]))
            .await?;
        stream
            .write_all(&encode(&[ColoMessage::VmstateLoaded]))
            .await?;
    }
}

/// Runs the fake secondary QEMU on a thread of its own (it is another process in
/// production), accepting the direct channel and the relay's.
fn spawn_secondary(
    direct: std::os::unix::net::UnixListener,
    relayed: std::os::unix::net::UnixListener,
    ram: usize,
) -> std::thread::JoinHandle<Result<()>> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            direct.set_nonblocking(true)?;
            relayed.set_nonblocking(true)?;
            let (direct, relayed) = (
                UnixListener::from_std(direct)?,
                UnixListener::from_std(relayed)?,
            );
            // Each channel is accepted and served on its own: the relay connects to its
            // secondary only once the primary's magic has arrived, so waiting for both
            // connections before serving either would deadlock the direct channel.
            let serve = |listener: UnixListener| async move {
                let (stream, _) = listener.accept().await?;
                secondary_channel(stream, ram).await
            };
            let (a, b) = tokio::join!(serve(direct), serve(relayed));
            a.and(b)
        })
    })
}

/// Synchronous subscribers acknowledging every barrier at once, each on a thread of its own
/// (colo-blockd and colo-proxyd are processes of their own).
fn spawn_subscribers(control: &Path, count: usize) -> Vec<std::thread::JoinHandle<Result<u64>>> {
    (0..count)
        .map(|i| {
            let control = control.to_path_buf();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    let mut sub =
                        Subscriber::connect(control.as_path(), &format!("bench-{i}"), true).await?;
                    let mut acked = 0;
                    while let Ok(Some(event)) = sub.next_event().await {
                        if event.sync {
                            sub.ack(event.seq).await?;
                            acked += 1;
                        }
                    }
                    Ok(acked)
                })
            })
        })
        .collect()
}

struct Relay(Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn connect_when_ready(path: &Path) -> Result<UnixStream> {
    let deadline = Instant::now() + WAIT;
    loop {
        match UnixStream::connect(path).await {
            Ok(stream) => return Ok(stream),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => return Err(e).with_context(|| format!("connecting {}", path.display())),
        }
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn summary(values: &[f64]) -> String {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    format!(
        "p10 {:>7.3}   p50 {:>7.3}   p90 {:>7.3}   p99 {:>7.3} ms",
        percentile(&sorted, 0.10),
        percentile(&sorted, 0.50),
        percentile(&sorted, 0.90),
        percentile(&sorted, 0.99)
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let opts = options()?;
    ensure!(
        opts.relay_binary.exists(),
        "no relay binary at {} (build it: cargo build --release -p qmp-driver -p colo-relay --bins --examples, \
         or set COLO_QMP_DRIVER)",
        opts.relay_binary.display()
    );
    let dir = tempfile::tempdir()?;
    let (listen, incoming, direct, control) = (
        dir.path().join("migration.sock"),
        dir.path().join("incoming.sock"),
        dir.path().join("direct.sock"),
        dir.path().join("control.sock"),
    );
    let secondary = spawn_secondary(
        std::os::unix::net::UnixListener::bind(&direct)?,
        std::os::unix::net::UnixListener::bind(&incoming)?,
        opts.ram,
    );
    let _relay = Relay(
        Command::new(&opts.relay_binary)
            .args(["relay", "--listen"])
            .arg(format!("unix:{}", listen.display()))
            .arg("--target")
            .arg(format!("unix:{}", incoming.display()))
            .arg("--control")
            .arg(&control)
            .args(["--ack-timeout-ms", "5000"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", opts.relay_binary.display()))?,
    );
    let mut through_relay = connect_when_ready(&listen).await?;
    let mut straight = connect_when_ready(&direct).await?;
    let subscribers = spawn_subscribers(&control, opts.subscribers);
    let deadline = Instant::now() + WAIT;
    while query_status(control.as_path()).await?.subscribers.len() < opts.subscribers {
        ensure!(
            Instant::now() < deadline,
            "the subscribers never registered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for stream in [&mut straight, &mut through_relay] {
        stream.write_all(&QEVM_MAGIC.to_be_bytes()).await?;
        expect(stream, ColoMessage::CheckpointReady).await?;
    }

    let ram: Vec<u8> = (0..opts.ram).map(|i| (i * 131 % 251) as u8).collect();
    // Warm-up: first checkpoints fault in buffers on every side.
    for _ in 0..5 {
        primary_checkpoint(&mut straight, &ram).await?;
        primary_checkpoint(&mut through_relay, &ram).await?;
    }
    let (mut without, mut with, mut added) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..opts.rounds {
        let (direct_pause, relay_pause) = if round % 2 == 0 {
            let d = primary_checkpoint(&mut straight, &ram).await?;
            (d, primary_checkpoint(&mut through_relay, &ram).await?)
        } else {
            let r = primary_checkpoint(&mut through_relay, &ram).await?;
            (primary_checkpoint(&mut straight, &ram).await?, r)
        };
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        without.push(ms(direct_pause));
        with.push(ms(relay_pause));
        added.push(ms(relay_pause) - ms(direct_pause));
    }
    let status = query_status(control.as_path()).await?;
    drop((straight, through_relay));
    secondary
        .join()
        .map_err(|_| anyhow::anyhow!("the fake secondary panicked"))??;
    ensure!(
        status.checkpoints as usize == opts.rounds + 5,
        "the relay counted {} checkpoints, the bench ran {}",
        status.checkpoints,
        opts.rounds + 5
    );
    ensure!(status.barrier_timeouts == 0, "a barrier timed out");
    drop(_relay);
    for subscriber in subscribers {
        let acked = subscriber
            .join()
            .map_err(|_| anyhow::anyhow!("a subscriber panicked"))??;
        ensure!(
            acked as usize == 2 * (opts.rounds + 5),
            "a subscriber acknowledged {acked} barriers, expected two per checkpoint"
        );
    }

    println!(
        "relay pause bench: {} checkpoints each way, alternating; per checkpoint {} KiB of RAM \
         and {} KiB of device state in {} KiB writes; {} synchronous subscriber(s) acking at \
         once; relay {}",
        opts.rounds,
        opts.ram / 1024,
        DEVICE_STATE.min(opts.ram) / 1024,
        WRITE_CHUNK / 1024,
        opts.subscribers,
        opts.relay_binary.display()
    );
    println!("  pause without relay   {}", summary(&without));
    println!("  pause through relay   {}", summary(&with));
    println!("  added per checkpoint  {}", summary(&added));
    let mut sorted = added.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "  the relay adds {:.3} ms per checkpoint (median of the {} per-round differences)",
        percentile(&sorted, 0.5),
        added.len()
    );
    Ok(())
}
