//! `colo-proxyd bench --loopback-packets N`: the per-packet latency the primary daemon adds,
//! measured through loopback sockets. The primary daemon runs in process against fake QEMU
//! chardev servers (compare0, mirror0, compare_out), a fake secondary daemon on the link and an
//! in-process relay hub already in COLO; no QEMU runs.
//!
//! The fakes run on a thread and runtime of their own, like the processes they stand for.
//!
//! Two cases, one packet in flight at a time:
//! * **SVM ahead**: the SVM's copy is already in the daemon; the time from writing the PVM's
//!   frame to compare0 until it is read from compare_out;
//! * **SVM behind**: the PVM's frame is already held; the time from writing the SVM's copy to
//!   the link until the PVM's frame is read from compare_out.

use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use colo_control::hub::ControlHub;
use colo_control::protocol::RelayState;
use colo_proxyd::codec::{Frame, FrameDecoder, encode};
use colo_proxyd::daemon::config::{PrimaryArgs, PrimaryConfig};
use colo_proxyd::daemon::link::{self, LINK_VERSION, LinkMessage, LinkRole};
use colo_proxyd::daemon::metrics::{Metrics, serve as serve_metrics};
use colo_proxyd::daemon::primary;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::runtime::Handle;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

const EPOCH: u64 = 1;
const PAYLOAD: usize = 100;

/// Latencies of the two cases, and of the floor, sorted.
pub struct Loopback {
    /// SVM ahead: PVM frame in → released frame out.
    pub svm_ahead: Vec<Duration>,
    /// SVM behind: SVM frame in → released frame out.
    pub svm_behind: Vec<Duration>,
    /// The same frames through a task on the daemon's runtime that only copies the bytes from
    /// one socket to the other: what the machine's loopback and thread wake-ups cost alone.
    pub floor: Vec<Duration>,
}

/// Runs `packets` packets per case.
pub fn run(packets: usize) -> anyhow::Result<Loopback> {
    // The daemon on a runtime of its own, as `colo-proxyd primary` runs (two workers here).
    let daemon = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // QEMU, the secondary's daemon and the relay are other processes in production: their
    // fakes run on another thread with its own I/O driver, so the kernel wakes the fake QEMU
    // when a released frame arrives, and the daemon's workers carry only the daemon's work.
    let peers = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut result = peers.block_on(measure(daemon.handle(), packets))?;
    result.floor = peers.block_on(measure_floor(daemon.handle(), packets))?;
    Ok(result)
}

/// The floor: frames written to one socket and read from another, with a task on the
/// daemon's runtime copying the bytes across (no decoding, no comparison, no channels).
async fn measure_floor(daemon: &Handle, packets: usize) -> anyhow::Result<Vec<Duration>> {
    let input = TcpListener::bind("127.0.0.1:0").await?;
    let output = TcpListener::bind("127.0.0.1:0").await?;
    let (input_addr, output_addr) = (input.local_addr()?, output.local_addr()?);
    let copier = daemon.spawn(async move {
        let mut from = TcpStream::connect(input_addr).await?;
        let mut to = TcpStream::connect(output_addr).await?;
        from.set_nodelay(true)?;
        to.set_nodelay(true)?;
        let mut buf = vec![0u8; 65536];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return anyhow::Ok(());
            }
            to.write_all(&buf[..n]).await?;
        }
    });
    // Before each timed packet the daemon's cases scrape its metrics, which its workers
    // serve; the same metrics server scraped the same way leaves the workers in the same state.
    let stop = CancellationToken::new();
    let metrics = {
        let stop = stop.clone();
        daemon
            .spawn(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await?;
                let address = listener.local_addr()?.to_string();
                tokio::spawn(serve_metrics(listener, Metrics::new("primary"), stop));
                anyhow::Ok(address)
            })
            .await??
    };
    let mut into = Chardev::accept(&input).await?;
    let mut out = Chardev::accept(&output).await?;
    let mut deadline = run_deadline(packets);
    let mut times = Vec::with_capacity(packets);
    for round in 0..packets {
        let frame = tcp(round as u32);
        scrape(&metrics).await?;
        let start = Instant::now();
        into.send(&frame).await?;
        let copied = out.recv(&mut deadline).await?;
        times.push(start.elapsed());
        if copied != frame {
            bail!("the floor's copier changed a frame");
        }
    }
    drop(into);
    copier.await??;
    stop.cancel();
    times.sort_unstable();
    Ok(times)
}

fn tcp(seq: u32) -> Vec<u8> {
    let mut f = vec![0x52, 0x54, 0, 0, 0, 9, 0x52, 0x54, 0, 0, 0, 2, 0x08, 0x00];
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&((40 + PAYLOAD) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 2, 10, 0, 0, 9]);
    f.extend_from_slice(&80u16.to_be_bytes());
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&1u32.to_be_bytes());
    f.extend_from_slice(&[0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    f.extend((0..PAYLOAD).map(|i| (seq as usize + i) as u8));
    f
}

struct Chardev {
    stream: TcpStream,
    decoder: FrameDecoder,
    buf: Vec<u8>,
}

/// The whole run's bound, registered once: a timer armed for every packet would make the
/// runtime's driver re-arm its wait inside the measured interval (an extra wake-up and a lock
/// shared with the daemon's tasks), which is the bench's cost, not the daemon's.
fn run_deadline(packets: usize) -> Pin<Box<Sleep>> {
    let bound = Duration::from_secs(10) + Duration::from_millis(5) * packets as u32;
    Box::pin(tokio::time::sleep(bound))
}

impl Chardev {
    async fn accept(listener: &TcpListener) -> anyhow::Result<Chardev> {
        let (stream, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .context("the daemon did not connect to a chardev")??;
        stream.set_nodelay(true)?;
        Ok(Chardev {
            stream,
            decoder: FrameDecoder::new(false),
            buf: vec![0; 65536],
        })
    }

    async fn send(&mut self, frame: &[u8]) -> anyhow::Result<()> {
        let mut wire = Vec::with_capacity(frame.len() + 4);
        encode(&Frame::ethernet(frame.to_vec()), false, &mut wire)?;
        self.stream.write_all(&wire).await?;
        Ok(())
    }

    async fn recv(&mut self, deadline: &mut Pin<Box<Sleep>>) -> anyhow::Result<Vec<u8>> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(frame.data);
            }
            let n = tokio::select! {
                n = self.stream.read(&mut self.buf) => n?,
                _ = deadline.as_mut() => bail!("the run's frames were not all released in time"),
            };
            if n == 0 {
                bail!("the daemon closed compare_out");
            }
            self.decoder.feed(&self.buf[..n]);
        }
    }
}

async fn scrape(addr: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    Ok(text)
}

/// Waits until the daemon's metrics show `line`.
async fn wait_metric(addr: &str, line: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !scrape(addr).await?.lines().any(|l| l == line) {
        if Instant::now() > deadline {
            bail!("the daemon never showed {line:?}");
        }
        tokio::task::yield_now().await;
    }
    Ok(())
}

async fn measure(daemon: &Handle, packets: usize) -> anyhow::Result<Loopback> {
    let dir = std::env::temp_dir().join(format!("colo-proxyd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let control = dir.join("control.sock");
    let _ = std::fs::remove_file(&control);
    let hub = {
        let _relay_beside_the_daemon = daemon.enter();
        ControlHub::new(UnixListener::bind(&control)?)
    };
    hub.update_status(|s| {
        s.state = RelayState::Colo;
        s.epoch = EPOCH;
    });
    let compare0 = TcpListener::bind("127.0.0.1:0").await?;
    let mirror0 = TcpListener::bind("127.0.0.1:0").await?;
    let compare_out = TcpListener::bind("127.0.0.1:0").await?;
    let mut config = PrimaryConfig::try_from(PrimaryArgs {
        pvm_output: Some(compare0.local_addr()?.to_string()),
        mirror: Some(mirror0.local_addr()?.to_string()),
        release: Some(compare_out.local_addr()?.to_string()),
        link_listen: Some("127.0.0.1:0".into()),
        control: Some(control.clone().into()),
        qmp: Some(format!("unix:{}", dir.join("no-qmp.sock").display())),
        metrics: Some("127.0.0.1:0".into()),
        max_hold_ms: Some(60_000),
        // No QEMU behind the fake sockets: nothing to set a link on.
        link_down_without_pvm_output: Some(false),
        ..PrimaryArgs::default()
    })?;
    config.chardevs.clear();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let (link_addr, metrics, daemon) = daemon
        .spawn(async move {
            let listeners = primary::PrimaryListeners::bind(&config).await?;
            let link_addr = listeners.link.local_addr()?.to_string();
            let metrics = listeners
                .metrics
                .as_ref()
                .context("metrics listener")?
                .local_addr()?
                .to_string();
            let daemon = tokio::spawn(primary::run(config, listeners, stop));
            anyhow::Ok((link_addr, metrics, daemon))
        })
        .await??;
    let mut pvm = Chardev::accept(&compare0).await?;
    let _mirror = Chardev::accept(&mirror0).await?;
    let mut out = Chardev::accept(&compare_out).await?;
    wait_metric(&metrics, "colo_proxyd_comparing 1").await?;

    // The fake secondary daemon.
    let mut secondary = TcpStream::connect(&link_addr).await?;
    secondary.set_nodelay(true)?;
    let mut wire = Vec::new();
    link::encode(
        &LinkMessage::Hello {
            version: LINK_VERSION,
            role: LinkRole::Secondary,
        },
        &mut wire,
    )?;
    secondary.write_all(&wire).await?;
    wait_metric(&metrics, "colo_proxyd_connection_up{port=\"link\"} 1").await?;

    let mut result = Loopback {
        svm_ahead: Vec::with_capacity(packets),
        svm_behind: Vec::with_capacity(packets),
        floor: Vec::new(),
    };
    let mut seq = 1000u32;
    let mut svm_frames = 0u64;
    let mut deadline = run_deadline(2 * packets);
    for round in 0..2 * packets {
        let frame = tcp(seq);
        seq = seq.wrapping_add(PAYLOAD as u32);
        wire.clear();
        link::encode(
            &LinkMessage::SvmOutput {
                epoch: EPOCH,
                frame: frame.clone(),
            },
            &mut wire,
        )?;
        let elapsed = if round % 2 == 0 {
            secondary.write_all(&wire).await?;
            svm_frames += 1;
            wait_metric(
                &metrics,
                &format!("colo_proxyd_svm_frames_total {svm_frames}"),
            )
            .await?;
            let start = Instant::now();
            pvm.send(&frame).await?;
            let released = out.recv(&mut deadline).await?;
            let elapsed = start.elapsed();
            if released != frame {
                bail!("released frame differs from the PVM's");
            }
            elapsed
        } else {
            pvm.send(&frame).await?;
            wait_metric(&metrics, "colo_proxyd_held_packets 1").await?;
            let start = Instant::now();
            secondary.write_all(&wire).await?;
            svm_frames += 1;
            let released = out.recv(&mut deadline).await?;
            let elapsed = start.elapsed();
            if released != frame {
                bail!("released frame differs from the PVM's");
            }
            elapsed
        };
        if round % 2 == 0 {
            result.svm_ahead.push(elapsed);
        } else {
            result.svm_behind.push(elapsed);
        }
    }
    let text = scrape(&metrics).await?;
    if !text.contains("colo_proxyd_held_packets 0") || text.contains("checkpoints_needed_total{") {
        bail!("the daemon held packets or asked for a checkpoint:\n{text}");
    }
    // Leave COLO first, so the daemon's departure is no barrier failure worth a warning.
    hub.update_status(|s| s.state = RelayState::Exited);
    shutdown.cancel();
    daemon.await??;
    hub.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    result.svm_ahead.sort_unstable();
    result.svm_behind.sort_unstable();
    Ok(result)
}
