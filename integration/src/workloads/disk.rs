//! The disk workload: the guest writes to its disk at a steady offered rate and the table shows
//! what it achieved and the checkpoints it caused.
//!
//! The guest's `/cgi-bin/disk?N` (integration/guest/cgi-disk) starts a writer that, every
//! second, makes N O_DIRECT 4 KiB writes (each completed by the device before the next) and one
//! flush into a ring at bytes 8..16 MiB of its disk (the heartbeat records, sector n for beat n,
//! stay below 8 MiB for 4.5 hours), reads the last block back and compares it. `/cgi-bin/disk`
//! serves its counters: writes completed, the centiseconds spent in them, one-second batches
//! done, batches whose read-back differed. On stock COLO the writes go through QEMU's block
//! replication, on colo through colo-blockd, on native and twin to a raw file.
//!
//! For each rate the workload starts the writer, lets two batches pass, then reads the counters
//! before and after a fixed window. Latency is the mean time per write over the window (the
//! guest's only clock finer than a second is /proc/uptime's 10 ms, so a per-write p50/p99 is not
//! measurable; the mean is the batch's time divided by its writes, flush included). A read-back
//! that differed, or an offered rate with no write completed, fails the run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::bed::Bed;
use super::{Setup, cell, share};
use crate::client::{Fetch, HttpClient};
use crate::stock::proxyd::render_reasons;
use crate::topology::addr;

/// What the disk workload is given.
#[derive(Debug, Clone, Serialize)]
pub struct DiskConfig {
    /// Offered rates, 4 KiB writes per second (0 = the writer stopped; at most 1024).
    pub rates: Vec<u32>,
    /// The measured window at each rate, seconds.
    pub seconds: u32,
}

/// The writer's counters as `/cgi-bin/disk` serves them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DiskCounters {
    /// 4 KiB writes completed since boot.
    pub writes: u64,
    /// Centiseconds spent in those writes (and their flushes).
    pub busy_cs: u64,
    /// One-second batches done.
    pub batches: u64,
    /// Batches whose read-back differed from what was written.
    pub bad: u64,
    /// The rate the writer runs at now.
    pub rate: u32,
}

/// Reads `writes W busy_cs B batches K bad V rate N`.
pub fn parse_counters(text: &str) -> Result<DiskCounters> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let get = |key: &str| -> Result<u64> {
        let i = words
            .iter()
            .position(|w| *w == key)
            .with_context(|| format!("no `{key}` in the disk writer's counters {text:?}"))?;
        let raw = words
            .get(i + 1)
            .with_context(|| format!("no value after `{key}` in {text:?}"))?;
        raw.parse()
            .map_err(|_| anyhow::anyhow!("`{key}` is not a number in {text:?}"))
    };
    Ok(DiskCounters {
        writes: get("writes")?,
        busy_cs: get("busy_cs")?,
        batches: get("batches")?,
        bad: get("bad")?,
        rate: u32::try_from(get("rate")?).context("rate out of range")?,
    })
}

/// What one guest achieved over a window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DiskRun {
    /// Writes completed in the window.
    pub writes: u64,
    /// Writes per second.
    pub writes_per_s: f64,
    /// Mean time per write, ms (batch time / writes, the flush included); none without writes.
    pub mean_write_ms: Option<f64>,
}

impl DiskRun {
    fn between(before: DiskCounters, after: DiskCounters, seconds: f64) -> Self {
        let writes = after.writes.saturating_sub(before.writes);
        let busy = after.busy_cs.saturating_sub(before.busy_cs);
        DiskRun {
            writes,
            writes_per_s: writes as f64 / seconds,
            mean_write_ms: (writes > 0).then(|| busy as f64 * 10.0 / writes as f64),
        }
    }
}

/// One setup at one offered rate.
#[derive(Debug, Clone, Serialize)]
pub struct DiskRow {
    /// The setup.
    pub setup: Setup,
    /// Offered writes per second.
    pub rate: u32,
    /// The window, seconds (measured).
    pub seconds: f64,
    /// The guest (on the twin setup: the first guest).
    pub run: DiskRun,
    /// The twin's own figures, on the twin setup.
    pub twin: Option<DiskRun>,
    /// The primary's checkpoints in the window (COLO setups).
    pub checkpoints: Option<usize>,
    /// Why colo-proxyd asked for checkpoints in the window (colo setup), by reason.
    pub reasons: BTreeMap<String, u64>,
}

/// Runs the disk workload on a booted setup; stops the writer when done.
pub(super) async fn run(bed: &Bed, setup: Setup, config: &DiskConfig) -> Result<Vec<DiskRow>> {
    let mut rows = Vec::new();
    let measured = measure(bed, setup, config, &mut rows).await;
    let stopped = bed
        .on_guests(|ns| async move { set_rate(&ns, 0).await })
        .await;
    measured?;
    stopped.context("stopping the guest's disk writer")?;
    Ok(rows)
}

async fn measure(
    bed: &Bed,
    setup: Setup,
    config: &DiskConfig,
    rows: &mut Vec<DiskRow>,
) -> Result<()> {
    for &rate in &config.rates {
        bed.on_guests(|ns| async move { set_rate(&ns, rate).await })
            .await?;
        // Two batches: the writer's first one (which also builds its 4 MiB source) is past.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let before = bed
            .on_guests(|ns| async move { counters(&ns).await })
            .await?;
        let mark = bed.mark();
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(u64::from(config.seconds))).await;
        let after = bed
            .on_guests(|ns| async move { counters(&ns).await })
            .await?;
        let seconds = started.elapsed().as_secs_f64();
        let cp = bed.checkpoints_since(mark);
        let check = |b: DiskCounters, a: DiskCounters, which: &str| -> Result<DiskRun> {
            if a.bad > b.bad {
                bail!(
                    "{which}: {} batches of the disk writer at {rate}/s read back other bytes \
                     than they wrote (the guest's console has the block)",
                    a.bad - b.bad
                );
            }
            let r = DiskRun::between(b, a, seconds);
            if rate > 0 && r.writes == 0 {
                bail!(
                    "{which}: the disk writer completed no write in {seconds:.0} s at {rate}/s \
                     (counters {a:?}; the guest's console says why)"
                );
            }
            Ok(r)
        };
        let run = check(before.0, after.0, "guest")?;
        let twin = match (before.1, after.1) {
            (Some(b), Some(a)) => Some(check(b, a, "twin")?),
            _ => None,
        };
        rows.push(DiskRow {
            setup,
            rate,
            seconds,
            run,
            twin,
            checkpoints: cp.as_ref().map(|cp| cp.count),
            reasons: cp.map(|cp| cp.reasons).unwrap_or_default(),
        });
    }
    Ok(())
}

fn client(netns: &str) -> Result<HttpClient> {
    let guest: SocketAddr = format!("{}:80", addr::GUEST).parse()?;
    Ok(HttpClient::new(netns, guest))
}

const FETCH: Fetch = Fetch {
    rate: None,
    read_timeout: Duration::from_secs(30),
};

/// Starts (or stops, with 0) the guest's writer at `rate` writes/s.
async fn set_rate(netns: &str, rate: u32) -> Result<()> {
    let reply = client(netns)?
        .get(&format!("/cgi-bin/disk?{rate}"), FETCH)
        .await
        .with_context(|| format!("asking the guest for {rate} disk writes/s"))?;
    let body = String::from_utf8_lossy(&reply.body);
    if reply.status != 200 || body.trim() != format!("disk {rate}") {
        bail!(
            "the guest refused {rate} disk writes/s: HTTP {}, {:?}",
            reply.status,
            body.trim()
        );
    }
    Ok(())
}

/// The writer's counters.
async fn counters(netns: &str) -> Result<DiskCounters> {
    let reply = client(netns)?
        .get("/cgi-bin/disk", FETCH)
        .await
        .context("reading the guest's disk counters")?;
    if reply.status != 200 {
        bail!("/cgi-bin/disk answered HTTP {}", reply.status);
    }
    parse_counters(&String::from_utf8_lossy(&reply.body))
}

fn find(rows: &[DiskRow], setup: Setup, rate: u32) -> Option<&DiskRow> {
    rows.iter().find(|r| r.setup == setup && r.rate == rate)
}

/// The table: achieved writes/s, mean latency, checkpoints, and each setup's writes/s as a
/// share of the fair baseline (twin) and colo's against stock.
pub(super) fn render(config: &DiskConfig, rows: &[DiskRow]) -> String {
    let mut out = format!(
        "disk: N O_DIRECT 4 KiB writes and one flush per second into the guest's disk, {} s per \
         rate; ms/write = mean time per write, flush included\n\n",
        config.seconds
    );
    out += "| setup | offered/s | writes/s | ms/write | twin's writes/s | vs twin | colo vs stock | checkpoints | reasons |\n";
    out += "|---|---:|---:|---:|---:|---:|---:|---:|---|\n";
    for r in rows {
        let twin = find(rows, Setup::Twin, r.rate).map(|t| t.run.writes_per_s);
        let stock = find(rows, Setup::Stock, r.rate).map(|s| s.run.writes_per_s);
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} | {} | {} | {} | {} | {} | {} |",
            r.setup.name(),
            r.rate,
            r.run.writes_per_s,
            cell(r.run.mean_write_ms.map(|v| format!("{v:.1}"))),
            cell(r.twin.map(|t| format!("{:.1}", t.writes_per_s))),
            if r.rate > 0 && r.setup != Setup::Twin {
                share(r.run.writes_per_s, twin)
            } else {
                "-".into()
            },
            if r.rate > 0 && r.setup == Setup::Colo {
                share(r.run.writes_per_s, stock)
            } else {
                "-".into()
            },
            cell(r.checkpoints),
            render_reasons(&r.reasons),
        );
    }
    out
}

/// One line per row, for plotting.
pub(super) fn csv(rows: &[DiskRow]) -> String {
    let mut out = String::from(
        "setup,rate,seconds,writes,writes_per_s,mean_write_ms,twin_writes_per_s,checkpoints\n",
    );
    let f = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.2}"));
    for r in rows {
        let _ = writeln!(
            out,
            "{},{},{:.1},{},{:.2},{},{},{}",
            r.setup.name(),
            r.rate,
            r.seconds,
            r.run.writes,
            r.run.writes_per_s,
            f(r.run.mean_write_ms),
            f(r.twin.map(|t| t.writes_per_s)),
            r.checkpoints.map_or(String::new(), |c| c.to_string()),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_read_and_a_missing_one_is_named() {
        let c = parse_counters("writes 640 busy_cs 250 batches 12 bad 0 rate 64\n").unwrap();
        assert_eq!(
            c,
            DiskCounters {
                writes: 640,
                busy_cs: 250,
                batches: 12,
                bad: 0,
                rate: 64
            }
        );
        let err = parse_counters("writes 640 busy_cs 250 batches 12 rate 64")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`bad`"), "{err}");
        let err = parse_counters("writes x busy_cs 250 batches 12 bad 0 rate 64")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`writes` is not a number"), "{err}");
        // What a broken guest or a proxy's error page could send: errors, never a panic.
        for text in [
            "",
            "writes",
            "<HTML>404</HTML>",
            "writes 1 busy_cs 1 batches 1 bad 1 rate 99999999999",
            "writes -1 busy_cs 1 batches 1 bad 0 rate 1",
            "writes 18446744073709551616 busy_cs 1 batches 1 bad 0 rate 1",
        ] {
            assert!(parse_counters(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn a_window_and_its_table() {
        let c = |writes, busy_cs| DiskCounters {
            writes,
            busy_cs,
            batches: 0,
            bad: 0,
            rate: 64,
        };
        let run = DiskRun::between(c(100, 50), c(740, 370), 10.0);
        assert_eq!(run.writes, 640);
        assert!((run.writes_per_s - 64.0).abs() < 1e-9);
        assert!((run.mean_write_ms.unwrap() - 5.0).abs() < 1e-9);
        assert_eq!(DiskRun::between(c(5, 5), c(5, 5), 10.0).mean_write_ms, None);
        let row = |setup, writes_per_s, checkpoints| DiskRow {
            setup,
            rate: 64,
            seconds: 10.0,
            run: DiskRun {
                writes: 0,
                writes_per_s,
                mean_write_ms: Some(5.0),
            },
            twin: None,
            checkpoints,
            reasons: BTreeMap::new(),
        };
        let rows = [
            row(Setup::Twin, 60.0, None),
            row(Setup::Stock, 20.0, Some(3)),
            row(Setup::Colo, 40.0, Some(2)),
        ];
        let md = render(
            &DiskConfig {
                rates: vec![64],
                seconds: 10,
            },
            &rows,
        );
        assert!(
            md.contains("| colo | 64 | 40.0 | 5.0 | - | 0.67 | 2.00 | 2 | - |"),
            "{md}"
        );
        assert!(
            md.contains("| twin | 64 | 60.0 | 5.0 | - | - | - | - | - |"),
            "{md}"
        );
        let text = csv(&rows);
        assert_eq!(text.lines().nth(3), Some("colo,64,10.0,0,40.00,5.00,,2"));
    }
}
