//! The memory workload (COLO setups): the primary's checkpoint pauses against the guest's
//! memory-dirtying rate.
//!
//! The guest rewrites an N MiB file in RAM every second (`/cgi-bin/load?N`, `colo-dirty` in the
//! guest), so a checkpoint carries the pages dirtied since the last one. For each rate the
//! workload sets it, lets the guest's dirtier and one checkpoint period pass, then records for
//! a fixed window the primary's pauses (STOP→RESUME in its QMP events, QEMU's timestamps: the
//! same pauses every other bed report uses) and QEMU's own estimate of the guest's dirty rate
//! over the window's first second (`calc-dirty-rate`, page sampling at QEMU's densest), so the table shows the
//! dirtying the guest really achieved under TCG, not only the rate it was asked for.
//! (`query-migrate` has no RAM figures while COLO runs, so the RAM a checkpoint carried is
//! not in the table.) The periodic
//! checkpoint is set to `period_ms` for the workload (QMP `x-checkpoint-delay`) and put back,
//! with the rate, when it is done.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use colo_types::Role;
use serde::Serialize;
use serde_json::json;

use super::bed::Bed;
use super::{Setup, SuiteConfig, cell};
use crate::client::{Fetch, HttpClient};
use crate::stats;
use crate::stock::proxyd::render_reasons;
use crate::stock::{PairConfig, StockPair};
use crate::topology::addr;

/// Guest RAM the kernel and the initramfs take before the guest's own `load_max` (half of
/// `MemTotal`, in MiB) is computed: with less than `2 × rate + this`, the guest refuses the
/// rate. Measured on the bed's guest: 160 MiB of RAM gave a `load_max` of 61 (38 MiB taken).
const GUEST_RAM_OVERHEAD_MIB: u32 = 40;

/// What the memory workload is given.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryConfig {
    /// Dirtying rates, MiB/s.
    pub rates: Vec<u32>,
    /// The measured window at each rate, seconds.
    pub seconds: u32,
    /// The periodic checkpoint during the workload (`x-checkpoint-delay`), ms.
    pub period_ms: u32,
}

/// One setup at one dirtying rate.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryRow {
    /// The setup.
    pub setup: Setup,
    /// The rate the guest was asked for, MiB/s.
    pub rate_mib_s: u32,
    /// The window, seconds (measured).
    pub seconds: f64,
    /// The primary's checkpoints in the window.
    pub checkpoints: usize,
    /// Checkpoints per second.
    pub checkpoints_per_s: f64,
    /// The pauses' median, ms.
    pub pause_p50_ms: Option<f64>,
    /// The pauses' 90th percentile, ms.
    pub pause_p90_ms: Option<f64>,
    /// The longest pause, ms.
    pub pause_max_ms: Option<f64>,
    /// QEMU's estimate of the guest's dirty rate over one second at the window's start
    /// (`calc-dirty-rate`, `query-dirty-rate`'s `dirty-rate`, MB/s as QEMU counts them:
    /// 2^20 bytes), when QEMU gave one.
    pub measured_dirty_mb_s: Option<f64>,
    /// Why colo-proxyd asked for checkpoints in the window (colo setup), by reason.
    pub reasons: BTreeMap<String, u64>,
}

/// Fails before anything boots if the guest's RAM cannot carry the highest rate.
pub(super) fn check_guest_ram(config: &SuiteConfig) -> Result<()> {
    let top = config.memory.rates.iter().copied().max().unwrap_or(0);
    let need = 2 * top + GUEST_RAM_OVERHEAD_MIB;
    if config.pair.memory_mib < need {
        bail!(
            "the memory workload's rate {top} MiB/s needs a guest with at least {need} MiB of \
             RAM (the guest dirties a file in a tmpfs of half its memory); this one has {} \
             (--guest-mib)",
            config.pair.memory_mib
        );
    }
    Ok(())
}

/// Runs the memory workload on a booted pair.
pub(super) async fn run(
    bed: &Bed,
    setup: Setup,
    config: &MemoryConfig,
    base: &PairConfig,
) -> Result<Vec<MemoryRow>> {
    let pair = bed
        .pair()
        .context("the memory workload needs a COLO pair")?;
    set_period(pair, config.period_ms).await?;
    let mut rows = Vec::new();
    let measured = measure_rates(bed, pair, setup, config, &mut rows).await;
    // Put back what the other workloads run with, whether or not the rates ran through.
    let restored = async {
        set_rate(bed.client_ns(), base.guest_load_mib_s).await?;
        set_period(pair, base.checkpoint_delay_ms).await
    }
    .await;
    measured?;
    restored.context("restoring the guest's rate and the pair's checkpoint period")?;
    Ok(rows)
}

async fn measure_rates(
    bed: &Bed,
    pair: &StockPair,
    setup: Setup,
    config: &MemoryConfig,
    rows: &mut Vec<MemoryRow>,
) -> Result<()> {
    for &rate in &config.rates {
        set_rate(bed.client_ns(), rate).await?;
        // The dirtier reads its rate every second and starts a new file at a new rate; one
        // period more makes the first checkpoint of the window carry the new rate's pages.
        tokio::time::sleep(Duration::from_millis(1500 + u64::from(config.period_ms))).await;
        let mark = bed.mark();
        let first = pair.checkpoint_pauses(Role::Primary).len();
        let dirty_rate_started = start_dirty_rate(pair).await;
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(u64::from(config.seconds))).await;
        let pauses: Vec<Duration> = pair
            .checkpoint_pauses(Role::Primary)
            .get(first..)
            .map(<[Duration]>::to_vec)
            .unwrap_or_default();
        let seconds = started.elapsed().as_secs_f64();
        let measured_dirty_mb_s = if dirty_rate_started {
            dirty_rate(pair).await
        } else {
            None
        };
        let cp = bed.checkpoints_since(mark).unwrap_or_default();
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        rows.push(MemoryRow {
            setup,
            rate_mib_s: rate,
            seconds,
            checkpoints: pauses.len(),
            checkpoints_per_s: pauses.len() as f64 / seconds,
            pause_p50_ms: ms(stats::median(&pauses)),
            pause_p90_ms: ms(stats::quantile(&pauses, 0.9)),
            pause_max_ms: ms(stats::quantile(&pauses, 1.0)),
            measured_dirty_mb_s,
            reasons: cp.reasons,
        });
    }
    Ok(())
}

/// Sets the primary's periodic checkpoint (which also starts a checkpoint now).
async fn set_period(pair: &StockPair, period_ms: u32) -> Result<()> {
    pair.vm(Role::Primary)?
        .qmp
        .migrate_set_parameters(json!({ "x-checkpoint-delay": period_ms }))
        .await
        .context("setting x-checkpoint-delay on the primary")
}

/// Starts QEMU's one-second estimate of the guest's dirty rate on the primary; false if QEMU
/// refused (the figure is then left out, the pauses are still measured).
async fn start_dirty_rate(pair: &StockPair) -> bool {
    let Ok(vm) = pair.vm(Role::Primary) else {
        return false;
    };
    // Page sampling: the dirty-bitmap mode reads 0 while COLO runs (COLO's own dirty log
    // takes the bits). QEMU samples 512 pages per GiB by default: about 100 pages of the bed's guest, too few
    // to tell 16 from 64 MiB/s. 16384 per GiB is QEMU's maximum.
    let args = json!({ "calc-time": 1, "sample-pages": 16384 });
    match vm.qmp.execute_raw("calc-dirty-rate", Some(args)).await {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!("calc-dirty-rate on the primary: {e}");
            false
        }
    }
}

/// The estimate `start_dirty_rate` started, once QEMU has it.
async fn dirty_rate(pair: &StockPair) -> Option<f64> {
    let reply = pair
        .vm(Role::Primary)
        .ok()?
        .qmp
        .execute_raw("query-dirty-rate", None)
        .await
        .ok()?;
    (reply.get("status")?.as_str()? == "measured")
        .then(|| reply.get("dirty-rate")?.as_f64())
        .flatten()
}

/// Asks the guest (through the client's namespace, as any client would) to dirty `rate` MiB/s.
async fn set_rate(netns: &str, rate: u32) -> Result<()> {
    let guest: SocketAddr = format!("{}:80", addr::GUEST).parse()?;
    let fetch = Fetch {
        rate: None,
        read_timeout: Duration::from_secs(30),
    };
    let reply = HttpClient::new(netns, guest)
        .get(&format!("/cgi-bin/load?{rate}"), fetch)
        .await
        .with_context(|| format!("asking the guest for {rate} MiB/s"))?;
    let body = String::from_utf8_lossy(&reply.body);
    if reply.status != 200 || body.trim() != format!("load {rate}") {
        bail!(
            "the guest refused {rate} MiB/s: HTTP {}, {:?} (its maximum is half its RAM: \
             raise --guest-mib)",
            reply.status,
            body.trim()
        );
    }
    Ok(())
}

/// The table: pauses and checkpoint rate at each dirtying rate.
pub(super) fn render(config: &MemoryConfig, rows: &[MemoryRow]) -> String {
    let mut out = format!(
        "memory: the primary's checkpoint pauses over {} s at each dirtying rate, periodic \
         checkpoint {} ms; measured = QEMU's estimate of the guest's dirty rate \
         (calc-dirty-rate over 1 s, 16384 sampled pages per GiB, MB = 2^20 bytes)\n\n",
        config.seconds, config.period_ms
    );
    out += "| setup | MiB/s | checkpoints | per s | pause p50 ms | p90 ms | max ms | measured MB/s | reasons |\n";
    out += "|---|---:|---:|---:|---:|---:|---:|---:|---|\n";
    let f1 = |v: Option<f64>| cell(v.map(|v| format!("{v:.1}")));
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.2} | {} | {} | {} | {} | {} |",
            r.setup.name(),
            r.rate_mib_s,
            r.checkpoints,
            r.checkpoints_per_s,
            f1(r.pause_p50_ms),
            f1(r.pause_p90_ms),
            f1(r.pause_max_ms),
            f1(r.measured_dirty_mb_s),
            render_reasons(&r.reasons),
        );
    }
    out
}

/// One line per row, for plotting.
pub(super) fn csv(rows: &[MemoryRow]) -> String {
    let mut out = String::from(
        "setup,rate_mib_s,seconds,checkpoints,checkpoints_per_s,pause_p50_ms,pause_p90_ms,\
         pause_max_ms,measured_dirty_mb_s\n",
    );
    let f = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.2}"));
    for r in rows {
        let _ = writeln!(
            out,
            "{},{},{:.1},{},{:.3},{},{},{},{}",
            r.setup.name(),
            r.rate_mib_s,
            r.seconds,
            r.checkpoints,
            r.checkpoints_per_s,
            f(r.pause_p50_ms),
            f(r.pause_p90_ms),
            f(r.pause_max_ms),
            f(r.measured_dirty_mb_s),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::{DownloadConfig, UploadConfig, WebConfig};

    fn row(checkpoints: usize, measured_dirty_mb_s: Option<f64>) -> MemoryRow {
        MemoryRow {
            setup: Setup::Stock,
            rate_mib_s: 16,
            seconds: 20.0,
            checkpoints,
            checkpoints_per_s: checkpoints as f64 / 20.0,
            pause_p50_ms: Some(120.25),
            pause_p90_ms: Some(300.0),
            pause_max_ms: Some(410.0),
            measured_dirty_mb_s,
            reasons: BTreeMap::new(),
        }
    }

    #[test]
    fn the_table_and_the_csv() {
        let config = MemoryConfig {
            rates: vec![16],
            seconds: 20,
            period_ms: 1000,
        };
        let rows = [row(10, Some(15.5)), row(0, None)];
        let md = render(&config, &rows);
        assert!(
            md.contains("| stock | 16 | 10 | 0.50 | 120.2 | 300.0 | 410.0 | 15.5 | - |"),
            "{md}"
        );
        assert!(md.contains("| stock | 16 | 0 | 0.00 |"), "{md}");
        let text = csv(&rows);
        assert_eq!(
            text.lines().nth(1),
            Some("stock,16,20.0,10,0.500,120.25,300.00,410.00,15.50")
        );
        assert_eq!(
            text.lines().nth(2),
            Some("stock,16,20.0,0,0.000,120.25,300.00,410.00,")
        );
    }

    #[test]
    fn a_guest_too_small_for_the_top_rate_is_refused_before_booting() {
        let mut config = SuiteConfig {
            setups: vec![Setup::Stock],
            workloads: vec![super::super::Workload::Memory],
            web: WebConfig {
                concurrency: vec![],
                requests: 1,
                timeout_s: 1,
            },
            download: DownloadConfig {
                concurrency: vec![],
                downloads: 1,
                timeout_s: 1,
            },
            upload: UploadConfig {
                concurrency: vec![],
                mib_per_client: 1,
                timeout_s: 1,
            },
            disk: super::super::DiskConfig {
                rates: vec![],
                seconds: 1,
            },
            memory: MemoryConfig {
                rates: vec![0, 4, 64],
                seconds: 1,
                period_ms: 1000,
            },
            pair: PairConfig {
                memory_mib: 160,
                ..PairConfig::default()
            },
            equivalent: "none".into(),
        };
        let err = check_guest_ram(&config).unwrap_err().to_string();
        assert!(err.contains("at least 168 MiB"), "{err}");
        config.pair.memory_mib = 192;
        check_guest_ram(&config).unwrap();
    }
}
