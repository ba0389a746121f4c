//! `proxyd_bench_link`: what mutual TLS costs colo-proxyd's inter-host link, plaintext and TLS
//! measured in the same run and printed as ratios:
//!
//! ```sh
//! cargo run --release -p colo-proxyd --example proxyd_bench_link -- [OPTIONS]
//! ```
//!
//! Both ends of the link run in this process over loopback TCP, with the daemon's own link code
//! (`peer::spawn_primary`, `peer::spawn_secondary`: framing, batching, heartbeats, and with
//! `--tls-dir` rustls with the ring provider) and identities from `colo_tls::pki` made for the
//! run. Both links stay up for the whole run and the passes alternate between them, so that
//! whatever else the machine does meets both alike:
//!
//! * **throughput**: `--frames` mirrored frames of `--size` bytes from the primary's end to the
//!   secondary's, at most `--window` in flight (the link's queue drops beyond 4096, and a drop
//!   would make the number meaningless: the run fails if one happens);
//! * **latency**: one frame at a time, primary → secondary → primary (an `Inbound` answered by
//!   an `SvmOutput` of the same bytes): the round trip through both ends' link code, p50/p99,
//!   plaintext and TLS alternating frame by frame.
//!
//! The best round's throughput and the percentiles over all round trips are printed. No QEMU, no
//! comparison: only the link. Exit codes: 0 the report was printed, 1 the benchmark failed,
//! 2 bad command line.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use clap::Parser;
use colo_proxyd::daemon::config::LinkTls;
use colo_proxyd::daemon::link::LinkMessage;
use colo_proxyd::daemon::metrics::Metrics;
use colo_proxyd::daemon::peer::{self, LINK_PORT, LinkPort};
use colo_tls::pki::{Validity, create_pair};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Measure colo-proxyd's link with and without TLS, in one run.
#[derive(Parser, Debug)]
struct Args {
    /// Frames of the throughput pass.
    #[arg(long, default_value_t = 100_000)]
    frames: usize,
    /// Bytes per frame (1514: a full Ethernet frame at MTU 1500).
    #[arg(long, default_value_t = 1514)]
    size: usize,
    /// Frames in flight at most in the throughput pass (below the link's queue of 4096).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..4096))]
    window: u64,
    /// Round trips of the latency pass.
    #[arg(long, default_value_t = 5_000)]
    pings: usize,
    /// Rounds; each measures plaintext then TLS.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("proxyd_bench_link: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("proxyd_bench_link: {err:#}");
            ExitCode::from(1)
        }
    }
}

/// The two ends of one link, connected.
struct Link {
    primary: LinkPort,
    secondary: LinkPort,
    primary_metrics: Metrics,
    secondary_metrics: Metrics,
    stop: CancellationToken,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn connect(tls: Option<(LinkTls, LinkTls)>) -> anyhow::Result<Link> {
    let (tls_primary, tls_secondary) = match tls {
        Some((p, s)) => (Some(p), Some(s)),
        None => (None, None),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let stop = CancellationToken::new();
    let primary_metrics = Metrics::new("primary");
    let secondary_metrics = Metrics::new("secondary");
    let primary = peer::spawn_primary(listener, tls_primary, primary_metrics.clone(), stop.clone());
    let secondary = peer::spawn_secondary(
        addr,
        tls_secondary,
        Duration::from_millis(10),
        Duration::from_millis(100),
        secondary_metrics.clone(),
        stop.clone(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(primary_metrics.is_connected(LINK_PORT) && secondary_metrics.is_connected(LINK_PORT)) {
        ensure!(Instant::now() < deadline, "the link did not come up");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(Link {
        primary,
        secondary,
        primary_metrics,
        secondary_metrics,
        stop,
    })
}

fn frame(size: usize, n: usize) -> Bytes {
    (0..size).map(|i| (i + n) as u8).collect::<Vec<u8>>().into()
}

/// Seconds for `frames` frames through the link, at most `window` in flight.
async fn throughput(
    link: &mut Link,
    frames: usize,
    size: usize,
    window: u64,
) -> anyhow::Result<Duration> {
    let payload = frame(size, 7);
    let (mut sent, mut received) = (0u64, 0u64);
    let total = frames as u64;
    let start = Instant::now();
    while received < total {
        while sent < total && sent - received < window {
            link.primary
                .outgoing
                .send(LinkMessage::Inbound(payload.clone()));
            sent += 1;
        }
        match tokio::time::timeout(Duration::from_secs(10), link.secondary.incoming.recv()).await {
            Ok(Some(LinkMessage::Inbound(f))) => ensure!(f.len() == size, "a frame changed size"),
            Ok(other) => bail!("unexpected {other:?}"),
            Err(_) => bail!(
                "frames stopped arriving ({received} of {total}; dropped {})",
                link.primary_metrics.dropped_frames()
            ),
        }
        received += 1;
    }
    let elapsed = start.elapsed();
    ensure!(
        link.primary_metrics.dropped_frames() == 0,
        "the link dropped frames: the window is too large"
    );
    Ok(elapsed)
}

/// One round trip primary → secondary → primary of a frame of `size` bytes.
async fn ping(link: &mut Link, size: usize, n: usize) -> anyhow::Result<Duration> {
    let payload = frame(size, n);
    let start = Instant::now();
    link.primary
        .outgoing
        .send(LinkMessage::Inbound(payload.clone()));
    let Some(LinkMessage::Inbound(f)) = link.secondary.incoming.recv().await else {
        bail!("the secondary's end closed");
    };
    link.secondary
        .outgoing
        .send(LinkMessage::SvmOutput { epoch: 1, frame: f });
    let Some(LinkMessage::SvmOutput { frame: back, .. }) = link.primary.incoming.recv().await
    else {
        bail!("the primary's end closed");
    };
    let elapsed = start.elapsed();
    ensure!(back == payload, "the frame came back changed");
    Ok(elapsed)
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * fraction).round() as usize]
}

/// One mode's results.
#[derive(Default)]
struct Results {
    /// Each round's throughput pass.
    throughput: Vec<Duration>,
    /// Every round trip, sorted at the end.
    rtt: Vec<Duration>,
}

impl Results {
    fn best_throughput(&self) -> Duration {
        *self.throughput.iter().min().expect("at least one round")
    }
}

fn pair_tls(dir: &Path) -> anyhow::Result<(LinkTls, LinkTls)> {
    create_pair(dir, &["hosta".into(), "hostb".into()], Validity::days(1))?;
    Ok((
        LinkTls::load(dir.join("hosta"), "hostb".into())?,
        LinkTls::load(dir.join("hostb"), "hosta".into())?,
    ))
}

async fn run(args: &Args) -> anyhow::Result<()> {
    ensure!(
        args.rounds > 0 && args.frames > 0 && args.pings > 0,
        "nothing to measure"
    );
    let dir = std::env::temp_dir().join(format!("colo-proxyd-bench-link-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let tls = pair_tls(&dir).context("making the run's identities")?;
    let mut plain = Results::default();
    let mut secure = Results::default();
    // Both links stay up for the whole run: passes alternate between them, and round trips
    // alternate frame by frame, so that the machine's other work meets both alike.
    let mut plain_link = connect(None).await?;
    let mut tls_link = connect(Some(tls)).await?;
    for round in 0..args.rounds {
        for (name, link, results) in [
            ("plaintext", &mut plain_link, &mut plain),
            ("tls", &mut tls_link, &mut secure),
        ] {
            let t = throughput(link, args.frames, args.size, args.window).await?;
            eprintln!(
                "round {round} {name}: {:.0} frames/s",
                args.frames as f64 / t.as_secs_f64()
            );
            results.throughput.push(t);
        }
        for n in 0..args.pings {
            plain.rtt.push(ping(&mut plain_link, args.size, n).await?);
            secure.rtt.push(ping(&mut tls_link, args.size, n).await?);
        }
    }
    for link in [&plain_link, &tls_link] {
        ensure!(
            link.secondary_metrics.dropped_frames() == 0,
            "the secondary's end dropped frames"
        );
    }
    plain.rtt.sort();
    secure.rtt.sort();
    let _ = std::fs::remove_dir_all(&dir);
    let rate = |r: &Results| args.frames as f64 / r.best_throughput().as_secs_f64();
    let mbps = |r: &Results| rate(r) * args.size as f64 * 8.0 / 1e6;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "link, {} frames of {} B, window {}, best of {} rounds; {} round trips interleaved",
        args.frames,
        args.size,
        args.window,
        args.rounds,
        args.pings * args.rounds
    );
    println!("mode       frames/s     Mbit/s   rtt p50 µs  rtt p99 µs");
    for (name, r) in [("plaintext", &plain), ("tls", &secure)] {
        println!(
            "{name:<10} {:>9.0} {:>10.0} {:>12.1} {:>11.1}",
            rate(r),
            mbps(r),
            us(percentile(&r.rtt, 0.5)),
            us(percentile(&r.rtt, 0.99))
        );
    }
    println!(
        "tls/plaintext: throughput {:.2}x, rtt p50 {:.2}x, rtt p99 {:.2}x",
        rate(&secure) / rate(&plain),
        us(percentile(&secure.rtt, 0.5)) / us(percentile(&plain.rtt, 0.5)),
        us(percentile(&secure.rtt, 0.99)) / us(percentile(&plain.rtt, 0.99)),
    );
    Ok(())
}
