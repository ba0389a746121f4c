//! A/B of the network comparison on the identical pair, in one run: QEMU's colo-compare, then
//! colo-proxyd, each pair booted the same way and driven by the same client workload.
//!
//! The periodic checkpoint is set far beyond the workload (`x-checkpoint-delay` 60 s), so every
//! checkpoint during the workload is one the comparison asked for (a divergence, an output
//! held too long, a memory bound): checkpoints per 1000 requests then measures the comparison
//! itself. Both pairs run with the checkpoint-barrier relay (colo-proxyd needs it), so the
//! relay is not a difference between them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use crate::client::{Fetch, HttpClient, md5_hex};
use crate::scenario::{BLOB_BYTES, guest_server, probe};
use crate::stats::{median, quantile};
use crate::stock::{NetworkBackend, PairConfig, Role, StockPair};

/// Periodic checkpoint interval during the A/B: longer than the workload.
pub const AB_CHECKPOINT_DELAY_MS: u32 = 60_000;

/// The workload: `requests` small requests, one every `spacing`, and `blobs` downloads of
/// the 1 MiB blob interleaved.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Workload {
    /// Requests for the small page.
    pub requests: usize,
    /// Pause between them.
    pub spacing: Duration,
    /// Downloads of the 1 MiB blob (every `requests / blobs` requests).
    pub blobs: usize,
}

/// What one side of the A/B measured.
#[derive(Debug, Clone, Serialize)]
pub struct Arm {
    /// `colo-compare` or `colo-proxyd`.
    pub backend: String,
    /// Where its pair's files are.
    pub run_dir: PathBuf,
    /// Requests made (page and blob).
    pub requests: usize,
    /// Failed requests (error, wrong body, wrong checksum).
    pub failures: Vec<String>,
    /// Page latency median, ms.
    pub http_median_ms: Option<f64>,
    /// Page latency p90, ms.
    pub http_p90_ms: Option<f64>,
    /// Checkpoints of the primary during the workload.
    pub checkpoints: usize,
    /// `checkpoints * 1000 / requests`.
    pub checkpoints_per_1000_requests: f64,
    /// Primary pause median over those checkpoints, ms.
    pub pause_median_ms: Option<f64>,
}

/// Both arms.
#[derive(Debug, Clone, Serialize)]
pub struct AbReport {
    /// The workload both ran.
    pub workload: Workload,
    /// QEMU's colo-compare.
    pub colo_compare: Arm,
    /// colo-proxyd.
    pub colo_proxyd: Arm,
}

impl AbReport {
    /// A table for people.
    pub fn render(&self) -> String {
        let opt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
        let mut out = format!(
            "A/B colo-compare vs colo-proxyd: {} page requests ({} ms apart) and {} blob \
             downloads per pair; periodic checkpoint {} s\n",
            self.workload.requests,
            self.workload.spacing.as_millis(),
            self.workload.blobs,
            AB_CHECKPOINT_DELAY_MS / 1000
        );
        out += &format!(
            "  {:<13}{:>10}{:>10}{:>12}{:>10}{:>13}{:>15}\n",
            "", "requests", "failed", "HTTP p50", "p90", "checkpoints", "per 1000 req"
        );
        for side in [&self.colo_compare, &self.colo_proxyd] {
            out += &format!(
                "  {:<13}{:>10}{:>10}{:>9} ms{:>7} ms{:>13}{:>15.1}\n",
                side.backend,
                side.requests,
                side.failures.len(),
                opt(side.http_median_ms),
                opt(side.http_p90_ms),
                side.checkpoints,
                side.checkpoints_per_1000_requests
            );
        }
        out
    }
}

/// Runs the workload on a colo-compare pair, then on a colo-proxyd pair.
pub async fn run(tag: &str, cfg: PairConfig, workload: Workload) -> Result<AbReport> {
    let colo_compare = side(tag, &cfg, NetworkBackend::ColoCompare, workload).await?;
    let colo_proxyd = side(tag, &cfg, NetworkBackend::ColoProxyd, workload).await?;
    let report = AbReport {
        workload,
        colo_compare,
        colo_proxyd,
    };
    let dir = crate::artifacts::run_dir("compare-ab")?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(report)
}

async fn side(
    tag: &str,
    cfg: &PairConfig,
    network: NetworkBackend,
    workload: Workload,
) -> Result<Arm> {
    let name = network.name();
    let dir = crate::artifacts::run_dir(&format!("ab-{name}"))?;
    let cfg = PairConfig {
        checkpoint_delay_ms: AB_CHECKPOINT_DELAY_MS,
        relay: true,
        network,
        ..cfg.clone()
    };
    let short = match network {
        NetworkBackend::ColoCompare => "c",
        NetworkBackend::ColoProxyd => "p",
    };
    let pair = StockPair::start(&format!("{tag}{short}"), dir.clone(), cfg).await?;
    let client = HttpClient::new(&pair.topology.client, guest_server());
    let blob_md5 = {
        let response = client.get("/blob.md5", Fetch::default()).await?;
        String::from_utf8_lossy(&response.body).trim().to_string()
    };
    let before = pair.checkpoint_pauses(Role::Primary).len();
    let mut failures = Vec::new();
    let mut latencies = Vec::new();
    let mut requests = 0;
    let blob_every = workload.requests / workload.blobs.max(1);
    for i in 0..workload.requests {
        let next = Instant::now() + workload.spacing;
        requests += 1;
        match probe(&client, Duration::from_secs(10)).await {
            Ok(latency) => latencies.push(latency),
            Err(e) => failures.push(format!("page {i}: {e:#}")),
        }
        if workload.blobs > 0 && blob_every > 0 && i % blob_every == blob_every - 1 {
            requests += 1;
            match client.get("/blob", Fetch::default()).await {
                Ok(r) if r.body.len() == BLOB_BYTES && md5_hex(&r.body) == blob_md5 => {}
                Ok(r) => failures.push(format!(
                    "blob {i}: {} bytes, md5 {}",
                    r.body.len(),
                    md5_hex(&r.body)
                )),
                Err(e) => failures.push(format!("blob {i}: {e:#}")),
            }
        }
        tokio::time::sleep_until(next.into()).await;
    }
    let pauses = pair.checkpoint_pauses(Role::Primary);
    let during = &pauses[before.min(pauses.len())..];
    if !failures.is_empty() {
        pair.write_diagnostics().await;
    }
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
    Ok(Arm {
        backend: name.to_string(),
        run_dir: dir,
        requests,
        failures,
        http_median_ms: ms(median(&latencies)),
        http_p90_ms: ms(quantile(&latencies, 0.9)),
        checkpoints: during.len(),
        checkpoints_per_1000_requests: during.len() as f64 * 1000.0 / requests.max(1) as f64,
        pause_median_ms: ms(median(during)),
    })
}
