//! `proxyd_bench --loopback-packets N`: the per-packet latency the primary daemon adds,
//! measured through loopback sockets. The primary daemon runs in process against fake QEMU
//! chardev servers (compare0, mirror0, compare_out), a fake secondary daemon on the link and an
//! in-process relay hub already in COLO; no QEMU runs.
//!
//! The daemon runs on a multi-thread runtime of its own with two workers, as `colo-proxyd
//! primary` does; the fakes run on the calling thread with a runtime of their own, like the
//! processes they stand for.
//!
//! Three cases, one packet in flight at a time, interleaved packet by packet (SVM ahead, floor,
//! SVM behind, SVM ahead, floor, ...), so that whatever else the machine does meets all three
//! alike:
//! * **SVM ahead**: the SVM's copy is already in the daemon; the time from writing the PVM's
//!   frame to compare0 until it is read from compare_out;
//! * **SVM behind**: the PVM's frame is already held; the time from writing the SVM's copy to
//!   the link until the PVM's frame is read from compare_out;
//! * **floor**: the same frames through the same kind of sockets and a task on the daemon's
//!   runtime that only copies the bytes across: what loopback TCP and the thread wake-ups cost
//!   without the daemon's work.
//!
//! Then, as context, the machine's raw one-way thread wake-up: two plain threads bouncing one
//! byte over a Unix socketpair, half the round trip.
//!
//! **CPU placement.** By default ([`LoopbackCpus::Same`]) every thread of the measurement (the
//! calling thread and its fakes, the daemon's workers, the runtimes' blocking threads, the
//! wake-up threads) is pinned to one CPU, the first the calling thread may run on, and the
//! calling thread's affinity is restored afterwards. On a VM a wake-up of a thread on another
//! vCPU is an inter-processor interrupt through the hypervisor, tens of microseconds at the
//! median and well over a hundred at p99 on the 2-vCPU development VM, against a few
//! microseconds on the same CPU; unpinned, every packet pays several of them and the machine's
//! cross-CPU wake-ups, not the daemon, make the percentiles. [`LoopbackCpus::Spread`] leaves
//! the threads where the scheduler puts them.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use colo_control::hub::ControlHub;
use colo_control::protocol::RelayState;
use colo_proxyd::codec::{Frame, FrameDecoder, encode};
use colo_proxyd::daemon::config::{PrimaryArgs, PrimaryConfig};
use colo_proxyd::daemon::link::{self, LINK_VERSION, LinkMessage};
use colo_proxyd::daemon::primary;
use colo_types::Role;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::runtime::Handle;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

const EPOCH: u64 = 1;
const PAYLOAD: usize = 100;
/// Untimed round trips of the wake-up ping-pong before its samples.
const WAKE_UP_WARM_UP: usize = 100;

/// Where the threads of the loopback measurement run (`--loopback-cpus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LoopbackCpus {
    /// All of them on one CPU (the first the bench may run on): what the daemon's work costs,
    /// without the machine's cross-CPU wake-ups.
    #[default]
    Same,
    /// Wherever the scheduler puts them: the daemon's work plus the machine's cross-CPU
    /// wake-ups.
    Spread,
}

/// Latencies of the two cases, of the floor and of the machine's raw wake-up, sorted.
pub struct Loopback {
    /// SVM ahead: PVM frame in → released frame out.
    pub svm_ahead: Vec<Duration>,
    /// SVM behind: SVM frame in → released frame out.
    pub svm_behind: Vec<Duration>,
    /// The same frames through a task on the daemon's runtime that only copies the bytes from
    /// one socket to the other: what the machine's loopback and thread wake-ups cost alone.
    pub floor: Vec<Duration>,
    /// One-way wake-up of a plain thread by another over a Unix socketpair (round trip / 2).
    pub wake_up: Vec<Duration>,
    /// The CPU every thread ran on, with [`LoopbackCpus::Same`].
    pub cpu: Option<usize>,
}

/// Runs `packets` packets per case, and as many wake-up round trips.
pub fn run(packets: usize, cpus: LoopbackCpus) -> anyhow::Result<Loopback> {
    let pinned = match cpus {
        LoopbackCpus::Same => Some(PinnedThread::pin_to_first_cpu()?),
        LoopbackCpus::Spread => None,
    };
    let cpu = pinned.as_ref().map(|p| p.cpu);
    // Threads a runtime starts inherit the pinned thread's affinity already; pinning them
    // again when they start says so, and fails loudly if the kernel disagrees.
    let pin_failed = Arc::new(AtomicBool::new(false));
    let on_start = {
        let pin_failed = pin_failed.clone();
        move || {
            if let Some(cpu) = cpu
                && pin_current_thread(cpu).is_err()
            {
                pin_failed.store(true, Ordering::Relaxed);
            }
        }
    };
    let mut result = {
        // The daemon on a runtime of its own, as `colo-proxyd primary` runs (two workers here).
        let daemon = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .on_thread_start(on_start.clone())
            .enable_all()
            .build()?;
        // QEMU, the secondary's daemon and the relay are other processes in production: their
        // fakes run on this thread with its own I/O driver, so the kernel wakes the fake QEMU
        // when a released frame arrives, and the daemon's workers carry only the daemon's work.
        let peers = tokio::runtime::Builder::new_current_thread()
            .on_thread_start(on_start)
            .enable_all()
            .build()?;
        peers.block_on(measure(daemon.handle(), packets))?
    };
    ensure!(
        !pin_failed.load(Ordering::Relaxed),
        "could not pin a runtime thread to CPU {}",
        cpu.unwrap_or_default()
    );
    result.wake_up = wake_ups(packets, cpu)?;
    result.cpu = cpu;
    drop(pinned);
    Ok(result)
}

/// The calling thread pinned to one CPU; dropping it restores the thread's former affinity.
struct PinnedThread {
    cpu: usize,
    original: libc::cpu_set_t,
}

impl PinnedThread {
    /// Pins the calling thread to the first CPU of its current affinity mask.
    fn pin_to_first_cpu() -> anyhow::Result<PinnedThread> {
        let original = current_affinity().context("reading this thread's CPU affinity")?;
        let cpu = (0..libc::CPU_SETSIZE as usize)
            // SAFETY: `cpu` is below CPU_SETSIZE, the number of CPUs a cpu_set_t holds.
            .find(|&cpu| unsafe { libc::CPU_ISSET(cpu, &original) })
            .context("this thread may run on no CPU")?;
        pin_current_thread(cpu).with_context(|| {
            format!("pinning the bench to CPU {cpu} (--loopback-cpus spread does without)")
        })?;
        Ok(PinnedThread { cpu, original })
    }
}

impl Drop for PinnedThread {
    fn drop(&mut self) {
        // SAFETY: a valid cpu_set_t of the size passed; pid 0 is the calling thread, the one
        // that was pinned (the guard is a local of `run`, dropped on the thread that made it).
        let rc =
            unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &self.original) };
        if rc != 0 {
            eprintln!(
                "proxyd_bench: could not restore the CPU affinity: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn current_affinity() -> std::io::Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a writable cpu_set_t of the size passed; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(set)
}

/// Restricts the calling thread (not the process) to `cpu`.
fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: callers pass a CPU found in an affinity mask, so below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The machine's one-way wake-up: this thread writes one byte to a Unix socketpair, another
/// thread blocked on reading it writes it back; half of each round trip, sorted.
fn wake_ups(samples: usize, cpu: Option<usize>) -> anyhow::Result<Vec<Duration>> {
    let (mut here, mut there) = UnixStream::pair()?;
    let echo = std::thread::Builder::new()
        .name("bench-echo".into())
        .spawn(move || -> std::io::Result<()> {
            if let Some(cpu) = cpu {
                pin_current_thread(cpu)?;
            }
            let mut byte = [0u8; 1];
            while there.read(&mut byte)? == 1 {
                there.write_all(&byte)?;
            }
            Ok(())
        })?;
    let mut times = Vec::with_capacity(samples);
    let mut byte = [0u8; 1];
    for round in 0..WAKE_UP_WARM_UP + samples {
        let start = Instant::now();
        here.write_all(&[round as u8])?;
        here.read_exact(&mut byte)?;
        let elapsed = start.elapsed();
        ensure!(byte[0] == round as u8, "the echo thread changed a byte");
        if round >= WAKE_UP_WARM_UP {
            times.push(elapsed / 2);
        }
    }
    drop(here);
    echo.join()
        .map_err(|_| anyhow::anyhow!("the echo thread panicked"))?
        .context("the echo thread")?;
    times.sort_unstable();
    Ok(times)
}

/// The floor: frames written to one socket and read from another, with a task on the
/// daemon's runtime copying the bytes across (no decoding, no comparison, no channels).
struct Floor {
    into: Chardev,
    out: Chardev,
    copier: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Floor {
    async fn start(daemon: &Handle) -> anyhow::Result<Floor> {
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
        Ok(Floor {
            into: Chardev::accept(&input).await?,
            out: Chardev::accept(&output).await?,
            copier,
        })
    }

    /// One timed frame. Before it, the daemon's metrics are scraped once, as before each of
    /// the daemon's timed packets: the same workers then wake from the same state.
    async fn packet(
        &mut self,
        seq: u32,
        metrics: &str,
        deadline: &mut Pin<Box<Sleep>>,
    ) -> anyhow::Result<Duration> {
        let frame = tcp(seq);
        scrape(metrics).await?;
        let start = Instant::now();
        self.into.send(&frame).await?;
        let copied = self.out.recv(deadline).await?;
        let elapsed = start.elapsed();
        ensure!(copied == frame, "the floor's copier changed a frame");
        Ok(elapsed)
    }

    async fn stop(self) -> anyhow::Result<()> {
        drop(self.into);
        self.copier.await?
    }
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

/// The fake peers of the primary daemon: its chardevs and the secondary on the link.
struct Peers {
    pvm: Chardev,
    out: Chardev,
    secondary: TcpStream,
    metrics: String,
    seq: u32,
    svm_frames: u64,
    wire: Vec<u8>,
}

impl Peers {
    /// The next frame of the stream, and the SVM's copy of it as the link carries it.
    fn next_frame(&mut self) -> anyhow::Result<Vec<u8>> {
        let frame = tcp(self.seq);
        self.seq = self.seq.wrapping_add(PAYLOAD as u32);
        self.wire.clear();
        link::encode(
            &LinkMessage::SvmOutput {
                epoch: EPOCH,
                frame: frame.clone().into(),
            },
            &mut self.wire,
        )?;
        Ok(frame)
    }

    /// SVM ahead: the SVM's copy first (untimed, until the daemon counted it), then the PVM's
    /// frame, timed until its release.
    async fn svm_ahead(&mut self, deadline: &mut Pin<Box<Sleep>>) -> anyhow::Result<Duration> {
        let frame = self.next_frame()?;
        self.secondary.write_all(&self.wire).await?;
        self.svm_frames += 1;
        let counted = format!("colo_proxyd_svm_frames_total {}", self.svm_frames);
        wait_metric(&self.metrics, &counted).await?;
        let start = Instant::now();
        self.pvm.send(&frame).await?;
        let released = self.out.recv(deadline).await?;
        let elapsed = start.elapsed();
        ensure!(released == frame, "released frame differs from the PVM's");
        Ok(elapsed)
    }

    /// SVM behind: the PVM's frame first (untimed, until the daemon holds it), then the SVM's
    /// copy, timed until the PVM's frame is released.
    async fn svm_behind(&mut self, deadline: &mut Pin<Box<Sleep>>) -> anyhow::Result<Duration> {
        let frame = self.next_frame()?;
        self.pvm.send(&frame).await?;
        wait_metric(&self.metrics, "colo_proxyd_held_packets 1").await?;
        let start = Instant::now();
        self.secondary.write_all(&self.wire).await?;
        self.svm_frames += 1;
        let released = self.out.recv(deadline).await?;
        let elapsed = start.elapsed();
        ensure!(released == frame, "released frame differs from the PVM's");
        Ok(elapsed)
    }
}

async fn measure(daemon: &Handle, packets: usize) -> anyhow::Result<Loopback> {
    let dir = std::env::temp_dir().join(format!(
        "colo-proxyd-bench-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
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
    let (link_addr, metrics, daemon_task) = daemon
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
    let pvm = Chardev::accept(&compare0).await?;
    let _mirror = Chardev::accept(&mirror0).await?;
    let out = Chardev::accept(&compare_out).await?;
    wait_metric(&metrics, "colo_proxyd_comparing 1").await?;

    // The fake secondary daemon.
    let mut secondary = TcpStream::connect(&link_addr).await?;
    secondary.set_nodelay(true)?;
    let mut wire = Vec::new();
    link::encode(
        &LinkMessage::Hello {
            version: LINK_VERSION,
            role: Role::Secondary,
        },
        &mut wire,
    )?;
    secondary.write_all(&wire).await?;
    wait_metric(&metrics, "colo_proxyd_connection_up{port=\"link\"} 1").await?;
    let mut peers = Peers {
        pvm,
        out,
        secondary,
        metrics,
        seq: 1000,
        svm_frames: 0,
        wire,
    };
    // The floor's copier beside the daemon, on its runtime, before the first timed packet.
    let mut floor = Floor::start(daemon).await?;

    let mut result = Loopback {
        svm_ahead: Vec::with_capacity(packets),
        svm_behind: Vec::with_capacity(packets),
        floor: Vec::with_capacity(packets),
        wake_up: Vec::new(),
        cpu: None,
    };
    let mut deadline = run_deadline(3 * packets);
    for round in 0..packets {
        result.svm_ahead.push(peers.svm_ahead(&mut deadline).await?);
        let seq = 7_000_000u32.wrapping_add(round as u32);
        result
            .floor
            .push(floor.packet(seq, &peers.metrics, &mut deadline).await?);
        result
            .svm_behind
            .push(peers.svm_behind(&mut deadline).await?);
    }
    floor.stop().await?;
    let text = scrape(&peers.metrics).await?;
    if !text.contains("colo_proxyd_held_packets 0") || text.contains("checkpoints_needed_total{") {
        bail!("the daemon held packets or asked for a checkpoint:\n{text}");
    }
    // Leave COLO first, so the daemon's departure is no barrier failure worth a warning.
    hub.update_status(|s| s.state = RelayState::Exited);
    shutdown.cancel();
    daemon_task.await??;
    hub.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    result.svm_ahead.sort_unstable();
    result.svm_behind.sort_unstable();
    result.floor.sort_unstable();
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny run in both placements: every case gets its samples, and the daemon released
    /// every frame (or `run` fails); the calling thread's affinity is as it was.
    #[test]
    fn a_tiny_run_has_every_sample_in_both_placements() {
        for cpus in [LoopbackCpus::Same, LoopbackCpus::Spread] {
            let before = current_affinity().unwrap();
            let loopback = run(20, cpus).unwrap();
            for (case, times) in [
                ("SVM ahead", &loopback.svm_ahead),
                ("SVM behind", &loopback.svm_behind),
                ("floor", &loopback.floor),
                ("wake-up", &loopback.wake_up),
            ] {
                assert_eq!(times.len(), 20, "{case} with {cpus:?}");
                assert!(times.is_sorted(), "{case} with {cpus:?}");
            }
            assert_eq!(loopback.cpu.is_some(), cpus == LoopbackCpus::Same);
            let after = current_affinity().unwrap();
            // SAFETY: both are valid cpu_set_t values.
            assert!(unsafe { libc::CPU_EQUAL(&before, &after) }, "{cpus:?}");
        }
    }
}
