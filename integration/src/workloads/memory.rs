//! The memory workload (COLO setups): the primary's checkpoint pauses against the guest's
//! memory-dirtying rate.
//!
//! The guest rewrites an N MiB file in RAM every second (`/cgi-bin/load?N`, `colo-dirty` in the
//! guest), so a checkpoint carries the pages dirtied since the last one. For each rate the
//! workload sets it, lets the guest's dirtier and one checkpoint period pass, then records for
//! a fixed window the primary's pauses (STOP→RESUME in its QMP events, QEMU's timestamps: the
//! same pauses every other bed report uses) and the RAM QEMU sent (`query-migrate`'s
//! `ram.transferred`, which keeps counting through COLO's checkpoints), so the table shows
//! the dirtying the guest really achieved, not only the rate it was asked for. The periodic
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

use super::bed::{Bed, render_reasons};
use super::{Setup, SuiteConfig, cell};
use crate::client::{Fetch, HttpClient};
use crate::stats;
use crate::stock::{PairConfig, StockPair};
use crate::topology::addr;

/// Guest RAM the kernel and the initramfs take before the guest's own `load_max` (half of
/// `MemTotal`, in MiB) is computed: with less than `2 × rate + this`, the guest refuses the
/// rate. Measured on the bed's guest: 160 MiB of RAM gives a `load_max` of 73.
const GUEST_RAM_OVERHEAD_MIB: u32 = 16;

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
    /// RAM the primary sent in the window, MB (10^6 bytes), when QEMU reports it.
    pub ram_mb: Option<f64>,
    /// Why colo-proxyd asked for checkpoints in the window (colo setup), by reason.
    pub reasons: BTreeMap<String, u64>,
}

impl MemoryRow {
    /// RAM sent per checkpoint, MB.
    pub fn ram_mb_per_checkpoint(&self) -> Option<f64> {
        self.ram_mb
            .filter(|_| self.checkpoints > 0)
            .map(|mb| mb / self.checkpoints as f64)
    }
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
        let ram_before = ram_transferred(pair).await;
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(u64::from(config.seconds))).await;
        let pauses: Vec<Duration> = pair
            .checkpoint_pauses(Role::Primary)
            .get(first..)
            .map(<[Duration]>::to_vec)
            .unwrap_or_default();
        let seconds = started.elapsed().as_secs_f64();
        let ram_after = ram_transferred(pair).await;
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
            ram_mb: match (ram_before, ram_after) {
                (Some(b), Some(a)) => Some(a.saturating_sub(b) as f64 / 1e6),
                _ => None,
            },
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

/// `query-migrate`'s `ram.transferred` on the primary, bytes.
async fn ram_transferred(pair: &StockPair) -> Option<u64> {
    let info = pair
        .vm(Role::Primary)
        .ok()?
        .qmp
        .query_migrate()
        .await
        .ok()?;
    info.extra.get("ram")?.get("transferred")?.as_u64()
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
         checkpoint {} ms; RAM = what QEMU sent in the window (query-migrate)\n\n",
        config.seconds, config.period_ms
    );
    out += "| setup | MiB/s | checkpoints | per s | pause p50 ms | p90 ms | max ms | RAM MB per checkpoint | reasons |\n";
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
            f1(r.ram_mb_per_checkpoint()),
            render_reasons(&r.reasons),
        );
    }
    out
}

/// One line per row, for plotting.
pub(super) fn csv(rows: &[MemoryRow]) -> String {
    let mut out = String::from(
        "setup,rate_mib_s,seconds,checkpoints,checkpoints_per_s,pause_p50_ms,pause_p90_ms,\
         pause_max_ms,ram_mb_per_checkpoint\n",
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
            f(r.ram_mb_per_checkpoint()),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::{DownloadConfig, UploadConfig, WebConfig};

    fn row(checkpoints: usize, ram_mb: Option<f64>) -> MemoryRow {
        MemoryRow {
            setup: Setup::Stock,
            rate_mib_s: 16,
            seconds: 20.0,
            checkpoints,
            checkpoints_per_s: checkpoints as f64 / 20.0,
            pause_p50_ms: Some(120.25),
            pause_p90_ms: Some(300.0),
            pause_max_ms: Some(410.0),
            ram_mb,
            reasons: BTreeMap::new(),
        }
    }

    #[test]
    fn ram_per_checkpoint_needs_checkpoints_and_a_figure() {
        assert_eq!(row(10, Some(170.0)).ram_mb_per_checkpoint(), Some(17.0));
        assert_eq!(row(0, Some(170.0)).ram_mb_per_checkpoint(), None);
        assert_eq!(row(10, None).ram_mb_per_checkpoint(), None);
    }

    #[test]
    fn the_table_and_the_csv() {
        let config = MemoryConfig {
            rates: vec![16],
            seconds: 20,
            period_ms: 1000,
        };
        let rows = [row(10, Some(170.0)), row(0, None)];
        let md = render(&config, &rows);
        assert!(
            md.contains("| stock | 16 | 10 | 0.50 | 120.2 | 300.0 | 410.0 | 17.0 | - |"),
            "{md}"
        );
        assert!(md.contains("| stock | 16 | 0 | 0.00 |"), "{md}");
        let text = csv(&rows);
        assert_eq!(
            text.lines().nth(1),
            Some("stock,16,20.0,10,0.500,120.25,300.00,410.00,17.00")
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
            memory: MemoryConfig {
                rates: vec![0, 4, 64],
                seconds: 1,
                period_ms: 1000,
            },
            pair: PairConfig {
                memory_mib: 128,
                ..PairConfig::default()
            },
            equivalent: "none".into(),
        };
        let err = check_guest_ram(&config).unwrap_err().to_string();
        assert!(err.contains("at least 144 MiB"), "{err}");
        config.pair.memory_mib = 160;
        check_guest_ram(&config).unwrap();
    }
}
