//! `colo-proxyd bench --loopback-packets N`: the per-packet latency the primary daemon adds,
//! measured through loopback sockets. The primary daemon runs in process against fake QEMU
//! chardev servers (compare0, mirror0, compare_out), a fake secondary daemon on the link and an
//! in-process relay hub already in COLO; no QEMU runs.
//!
//! Two cases, one packet in flight at a time:
//! * **SVM ahead**: the SVM's copy is already in the daemon; the time from writing the PVM's
//!   frame to compare0 until it is read from compare_out;
//! * **SVM behind**: the PVM's frame is already held; the time from writing the SVM's copy to
//!   the link until the PVM's frame is read from compare_out.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use colo_control::hub::ControlHub;
use colo_control::protocol::RelayState;
use colo_proxyd::codec::{Frame, FrameDecoder, encode};
use colo_proxyd::daemon::config::{PrimaryArgs, PrimaryConfig};
use colo_proxyd::daemon::link::{self, LINK_VERSION, LinkMessage, LinkRole};
use colo_proxyd::daemon::primary;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio_util::sync::CancellationToken;

const EPOCH: u64 = 1;
const PAYLOAD: usize = 100;

/// Latencies of the two cases, sorted.
pub struct Loopback {
    /// SVM ahead: PVM frame in → released frame out.
    pub svm_ahead: Vec<Duration>,
    /// SVM behind: SVM frame in → released frame out.
    pub svm_behind: Vec<Duration>,
}

/// Runs `packets` packets per case.
pub fn run(packets: usize) -> anyhow::Result<Loopback> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(measure(packets))
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

    async fn recv(&mut self) -> anyhow::Result<Vec<u8>> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(frame.data);
            }
            let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut self.buf))
                .await
                .context("no frame released within 10 s")??;
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

async fn measure(packets: usize) -> anyhow::Result<Loopback> {
    let dir = std::env::temp_dir().join(format!("colo-proxyd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let control = dir.join("control.sock");
    let _ = std::fs::remove_file(&control);
    let hub = ControlHub::new(UnixListener::bind(&control)?);
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
        control: Some(control.clone()),
        qmp: Some(format!("unix:{}", dir.join("no-qmp.sock").display())),
        metrics: Some("127.0.0.1:0".into()),
        max_hold_ms: Some(60_000),
        ..PrimaryArgs::default()
    })?;
    config.chardevs.clear();
    let listeners = primary::PrimaryListeners::bind(&config).await?;
    let link_addr = listeners.link.local_addr()?.to_string();
    let metrics = listeners
        .metrics
        .as_ref()
        .context("metrics listener")?
        .local_addr()?
        .to_string();
    let shutdown = CancellationToken::new();
    let daemon = tokio::spawn(primary::run(config, listeners, shutdown.clone()));
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
    };
    let mut seq = 1000u32;
    let mut svm_frames = 0u64;
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
            let released = out.recv().await?;
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
            let released = out.recv().await?;
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
