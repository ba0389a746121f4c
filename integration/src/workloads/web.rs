//! The web workload: ApacheBench asks for the guest's small page (`GET /`, 14 bytes) at each
//! concurrency, a fixed number of requests each; requests/s, p50 and p99 (ab's percentiles,
//! whole milliseconds), failures and, on the COLO pairs, the checkpoints per 1000 requests.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Result;
use serde::Serialize;

use super::bed::Bed;
use super::{AbResult, Setup, cell, csv_cell, share};
use crate::stock::proxyd::render_reasons;
use crate::topology::addr;

/// What the web workload is given.
#[derive(Debug, Clone, Serialize)]
pub struct WebConfig {
    /// Concurrent clients, one ab run each.
    pub concurrency: Vec<u32>,
    /// Requests per ab run.
    pub requests: u32,
    /// ab's timeout per request (`-s`), seconds.
    pub timeout_s: u32,
}

/// One row of the report: one setup at one concurrency.
#[derive(Debug, Clone, Serialize)]
pub struct WebRow {
    /// The setup.
    pub setup: Setup,
    /// Concurrent clients.
    pub concurrency: u32,
    /// What ab measured against the guest (on the twin setup: the first guest).
    pub ab: AbResult,
    /// The twin's own figures, on the twin setup.
    pub twin: Option<AbResult>,
    /// The primary's checkpoints during the run (COLO setups).
    pub checkpoints: Option<usize>,
    /// Checkpoints per 1000 completed requests (COLO setups).
    pub checkpoints_per_1000: Option<f64>,
    /// Why colo-proxyd asked for checkpoints during the run (colo setup), by reason.
    pub reasons: BTreeMap<String, u64>,
}

/// Runs the web workload on a booted setup.
pub(super) async fn run(bed: &Bed, setup: Setup, config: &WebConfig) -> Result<Vec<WebRow>> {
    let url = format!("http://{}:80/", addr::GUEST);
    let mut rows = Vec::new();
    for &c in &config.concurrency {
        let mark = bed.mark();
        let (ab, twin) = bed
            .on_guests(|ns| super::ab(ns, url.clone(), config.requests, c, config.timeout_s))
            .await?;
        let cp = bed.checkpoints_since(mark);
        rows.push(WebRow {
            setup,
            concurrency: c,
            ab,
            twin,
            checkpoints: cp.as_ref().map(|cp| cp.count),
            checkpoints_per_1000: cp
                .as_ref()
                .map(|cp| cp.count as f64 * 1000.0 / ab.complete.max(1) as f64),
            reasons: cp.map(|cp| cp.reasons).unwrap_or_default(),
        });
    }
    Ok(rows)
}

/// The failures, with ab's kinds when it failed requests: `9 (receive 6, length 3)`.
fn failed_cell(ab: &AbResult) -> String {
    let kinds = ab.failed_by.describe();
    if kinds.is_empty() {
        ab.failures().to_string()
    } else {
        format!("{} ({kinds})", ab.failures())
    }
}

fn row(rows: &[WebRow], setup: Setup, concurrency: u32) -> Option<&WebRow> {
    rows.iter()
        .find(|r| r.setup == setup && r.concurrency == concurrency)
}

/// A markdown table, with each setup's requests/s as a share of the fair baseline (twin)
/// and colo's against stock COLO where both ran.
pub(super) fn render(config: &WebConfig, rows: &[WebRow]) -> String {
    let mut out = format!(
        "web: `ab -n {} -c C` on `GET /` (14 bytes)\n\n",
        config.requests
    );
    out += "| setup | clients | req/s | vs twin | p50 ms | p99 ms | failed | checkpoints | per 1000 req | reasons |\n";
    out += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n";
    for r in rows {
        let base = row(rows, Setup::Twin, r.concurrency).map(|t| t.ab.requests_per_s);
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} | {} | {} | {} | {} | {} | {} | {} |",
            r.setup.name(),
            r.concurrency,
            r.ab.requests_per_s,
            share(r.ab.requests_per_s, base),
            cell(r.ab.p50_ms),
            cell(r.ab.p99_ms),
            failed_cell(&r.ab),
            cell(r.checkpoints),
            cell(r.checkpoints_per_1000.map(|n| format!("{n:.1}"))),
            render_reasons(&r.reasons),
        );
    }
    let ratios: Vec<String> = config
        .concurrency
        .iter()
        .filter_map(|&c| {
            let colo = row(rows, Setup::Colo, c)?;
            let stock = row(rows, Setup::Stock, c)?;
            (stock.ab.requests_per_s > 0.0).then(|| {
                format!(
                    "{c} clients: {:.2}x req/s, p99 {} vs {} ms",
                    colo.ab.requests_per_s / stock.ab.requests_per_s,
                    cell(colo.ab.p99_ms),
                    cell(stock.ab.p99_ms)
                )
            })
        })
        .collect();
    if !ratios.is_empty() {
        let _ = writeln!(out, "\ncolo against stock COLO: {}", ratios.join("; "));
    }
    out
}

/// One line per row, for plotting.
pub(super) fn csv(rows: &[WebRow]) -> String {
    let mut out = String::from(
        "setup,clients,requests_per_s,p50_ms,p99_ms,failed,checkpoints,checkpoints_per_1000,\
         twin_requests_per_s\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{},{},{:.2},{},{},{},{},{},{}",
            r.setup.name(),
            r.concurrency,
            r.ab.requests_per_s,
            csv_cell(r.ab.p50_ms),
            csv_cell(r.ab.p99_ms),
            r.ab.failures(),
            r.checkpoints.map_or(String::new(), |n| n.to_string()),
            r.checkpoints_per_1000
                .map_or(String::new(), |n| format!("{n:.2}")),
            r.twin
                .map_or(String::new(), |t| format!("{:.2}", t.requests_per_s)),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::parse_ab;
    use crate::workloads::tests::AB;

    fn rows() -> Vec<WebRow> {
        let ab = parse_ab(AB).unwrap();
        let slower = AbResult {
            requests_per_s: 81.0,
            ..ab
        };
        vec![
            WebRow {
                setup: Setup::Twin,
                concurrency: 4,
                ab: slower,
                twin: Some(slower),
                checkpoints: None,
                checkpoints_per_1000: None,
                reasons: BTreeMap::new(),
            },
            WebRow {
                setup: Setup::Stock,
                concurrency: 4,
                ab: slower,
                twin: None,
                checkpoints: Some(6),
                checkpoints_per_1000: Some(30.0),
                reasons: BTreeMap::new(),
            },
            WebRow {
                setup: Setup::Colo,
                concurrency: 4,
                ab,
                twin: None,
                checkpoints: Some(1),
                checkpoints_per_1000: Some(5.0),
                reasons: BTreeMap::from([("hold-timeout".into(), 1)]),
            },
        ]
    }

    #[test]
    fn the_table_shares_the_twin_and_compares_colo_with_stock() {
        let config = WebConfig {
            concurrency: vec![4],
            requests: 200,
            timeout_s: 30,
        };
        let md = render(&config, &rows());
        assert!(
            md.contains(
                "| colo | 4 | 162.1 | 2.00 | 21 | 60 | 5 (length 3) | 1 | 5.0 | hold-timeout 1 |"
            ),
            "{md}"
        );
        assert!(md.contains("| twin | 4 | 81.0 | 1.00 |"), "{md}");
        assert!(
            md.contains("4 clients: 2.00x req/s, p99 60 vs 60 ms"),
            "{md}"
        );
    }

    #[test]
    fn a_run_ab_stopped_at_its_timeout_shows_its_unanswered_requests_and_no_percentiles() {
        let stopped = crate::workloads::parse_ab_timeout(
            "apr_pollset_poll: The timeout specified has expired (70007)\n\
             Total of 997 requests completed\n",
            1000,
            std::time::Duration::from_secs(50),
        )
        .unwrap();
        let row = WebRow {
            setup: Setup::Colo,
            concurrency: 64,
            ab: stopped,
            twin: None,
            checkpoints: Some(4),
            checkpoints_per_1000: Some(4.0),
            reasons: BTreeMap::new(),
        };
        let config = WebConfig {
            concurrency: vec![64],
            requests: 1000,
            timeout_s: 30,
        };
        let md = render(&config, std::slice::from_ref(&row));
        assert!(
            md.contains("| colo | 64 | 19.9 | - | - | - | 3 | 4 |"),
            "{md}"
        );
        assert!(csv(&[row]).contains("colo,64,19.94,,,3,4,"));
    }

    #[test]
    fn the_csv_has_a_line_per_row_and_empty_cells_where_nothing_was_measured() {
        let text = csv(&rows());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[1], "twin,4,81.00,21,60,5,,,81.00");
        assert_eq!(lines[3], "colo,4,162.07,21,60,5,1,5.00,");
    }
}
