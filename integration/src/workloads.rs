//! The workload suite (issue 15): one standard load generator, ApacheBench (`ab`, Debian's
//! apache2-utils), against the same guest in four setups, in one invocation on the same
//! machine:
//!
//! - **native**: the guest without COLO (one QEMU on host A, its tap on the host bridge);
//! - **twin**: the same, with an identical second guest on host B under the same load at the
//!   same time (its own tap and client address inside host B's namespace). On a 2-core machine
//!   COLO runs two VMs on the CPUs native gives to one, so this is the fair "native" here;
//! - **stock**: QEMU's own COLO (colo-compare and block replication, no relay), as shipped;
//! - **colo**: colo's daemons (colo-proxyd on both hosts, colo-blockd, the relay).
//!
//! The web workload asks for the guest's small page (`GET /`, 14 bytes) at each concurrency,
//! a fixed number of requests each, and reports requests/s, p50 and p99 (ab's percentiles,
//! whole milliseconds), failures and, on the COLO pairs, the checkpoints the run caused per
//! 1000 requests (the primary's pauses) and, on colo's daemons, the reasons colo-proxyd gave
//! for asking (QEMU's colo-compare does not say). It is a benchmark, not a test: nothing is
//! asserted about timing; a run that cannot boot its guests or run `ab` fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use colo_types::Role;
use serde::Serialize;

use crate::artifacts::{Artifacts, run_dir};
use crate::guest;
use crate::process::QemuProcess;
use crate::stock::{DiskBackend, NetworkBackend, PairConfig, StockPair, bed_args};
use crate::topology::{self, Topology, addr};

/// One of the setups the suite compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Setup {
    /// The guest alone, without COLO.
    Native,
    /// The guest without COLO beside an identical, equally loaded twin.
    Twin,
    /// QEMU's own COLO: colo-compare and block replication.
    Stock,
    /// colo's daemons: colo-proxyd, colo-blockd, the relay.
    Colo,
}

impl Setup {
    /// Every setup, in the order of the report.
    pub const ALL: [Setup; 4] = [Setup::Native, Setup::Twin, Setup::Stock, Setup::Colo];

    /// The name in tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Setup::Native => "native",
            Setup::Twin => "twin",
            Setup::Stock => "stock",
            Setup::Colo => "colo",
        }
    }
}

/// What the web workload is given.
#[derive(Debug, Clone, Serialize)]
pub struct WebConfig {
    /// Concurrent clients, one ab run each.
    pub concurrency: Vec<u32>,
    /// Requests per ab run.
    pub requests: u32,
    /// ab's timeout per request (`-s`), seconds.
    pub timeout_s: u32,
    /// The setups to run, in order.
    pub setups: Vec<Setup>,
    /// The guest and pair settings (memory load, checkpoint period) every setup shares.
    #[serde(skip)]
    pub pair: PairConfig,
    /// The periodic checkpoint of the COLO pairs, ms.
    pub checkpoint_delay_ms: u32,
    /// colo-proxyd's equivalence rules on the colo setup (`none`: every byte compared). The
    /// caller puts them into the environment the daemons inherit (`COLO_PROXYD_EQUIVALENT`).
    pub equivalent: String,
}

/// What ab printed for one run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AbResult {
    /// `Complete requests`.
    pub complete: u64,
    /// `Failed requests` (connect, receive, length and exception errors).
    pub failed: u64,
    /// `Non-2xx responses` (0 when ab does not print the line).
    pub non_2xx: u64,
    /// `Requests per second` (mean).
    pub requests_per_s: f64,
    /// 50 % of the requests were served within this time, ms.
    pub p50_ms: u64,
    /// 99 % of the requests were served within this time, ms.
    pub p99_ms: u64,
}

/// Reads ab's report (`ab -q`); an error names the line that is missing.
pub fn parse_ab(text: &str) -> Result<AbResult> {
    fn field<'a>(text: &'a str, label: &str) -> Option<&'a str> {
        text.lines()
            .find_map(|l| l.trim_start().strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next())
    }
    fn number<T: std::str::FromStr>(text: &str, label: &str) -> Result<T> {
        let raw = field(text, label).with_context(|| format!("ab printed no `{label}` line"))?;
        raw.parse()
            .map_err(|_| anyhow::anyhow!("ab's `{label}` is not a number: {raw:?}"))
    }
    Ok(AbResult {
        complete: number(text, "Complete requests:")?,
        failed: number(text, "Failed requests:")?,
        non_2xx: match field(text, "Non-2xx responses:") {
            Some(_) => number(text, "Non-2xx responses:")?,
            None => 0,
        },
        requests_per_s: number(text, "Requests per second:")?,
        p50_ms: number(text, "50%")?,
        p99_ms: number(text, "99%")?,
    })
}

/// Runs `ab` inside `netns` against `target` (`HOST:PORT`).
pub fn run_ab(
    netns: &str,
    target: &str,
    requests: u32,
    concurrency: u32,
    timeout_s: u32,
) -> Result<AbResult> {
    let url = format!("http://{target}/");
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "ab", "-q", "-r"])
        .args(["-s", &timeout_s.to_string()])
        .args(["-n", &requests.to_string()])
        .args(["-c", &concurrency.to_string()])
        .arg(&url)
        .output()
        .context("running ab (package apache2-utils; integration/setup.sh installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "ab -n {requests} -c {concurrency} {url} in {netns} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            text
        );
    }
    parse_ab(&text).with_context(|| format!("reading ab's report:\n{text}"))
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

/// The suite's report.
#[derive(Debug, Clone, Serialize)]
pub struct WebReport {
    /// What it was given.
    pub config: WebConfig,
    /// `/proc/loadavg` before and after the run: the machine's load.
    pub load_before: String,
    /// See `load_before`.
    pub load_after: String,
    /// Every setup at every concurrency.
    pub rows: Vec<WebRow>,
    /// Where the run's files are (`report.json`, `report.md`, each setup's logs).
    pub run_dir: PathBuf,
}

impl WebReport {
    /// The row of `setup` at `concurrency`.
    pub fn row(&self, setup: Setup, concurrency: u32) -> Option<&WebRow> {
        self.rows
            .iter()
            .find(|r| r.setup == setup && r.concurrency == concurrency)
    }

    /// A markdown table, with each setup's requests/s as a share of the fair baseline (twin)
    /// and colo's against stock COLO where both ran.
    pub fn render_markdown(&self) -> String {
        let mut out = format!(
            "web: `ab -n {} -c C` on `GET /` (14 bytes), periodic checkpoint {} ms, colo-proxyd \
             equivalence `{}`; load before {} / after {}\n\n",
            self.config.requests,
            self.config.checkpoint_delay_ms,
            self.config.equivalent,
            self.load_before.trim(),
            self.load_after.trim()
        );
        out += "| setup | clients | req/s | vs twin | p50 ms | p99 ms | failed | checkpoints | per 1000 req | reasons |\n";
        out += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n";
        for row in &self.rows {
            let base = self
                .row(Setup::Twin, row.concurrency)
                .map(|t| t.ab.requests_per_s);
            let share = match base {
                Some(b) if b > 0.0 => format!("{:.2}", row.ab.requests_per_s / b),
                _ => "-".into(),
            };
            let reasons = row
                .reasons
                .iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect::<Vec<_>>()
                .join(", ");
            out += &format!(
                "| {} | {} | {:.1} | {} | {} | {} | {} | {} | {} | {} |\n",
                row.setup.name(),
                row.concurrency,
                row.ab.requests_per_s,
                share,
                row.ab.p50_ms,
                row.ab.p99_ms,
                row.ab.failed + row.ab.non_2xx,
                row.checkpoints.map_or("-".into(), |n| n.to_string()),
                row.checkpoints_per_1000
                    .map_or("-".into(), |n| format!("{n:.1}")),
                if reasons.is_empty() {
                    "-".into()
                } else {
                    reasons
                },
            );
        }
        let ratios: Vec<String> = self
            .config
            .concurrency
            .iter()
            .filter_map(|&c| {
                let colo = self.row(Setup::Colo, c)?;
                let stock = self.row(Setup::Stock, c)?;
                (stock.ab.requests_per_s > 0.0).then(|| {
                    format!(
                        "{c} clients: {:.2}x req/s, p99 {} vs {} ms",
                        colo.ab.requests_per_s / stock.ab.requests_per_s,
                        colo.ab.p99_ms,
                        stock.ab.p99_ms
                    )
                })
            })
            .collect();
        if !ratios.is_empty() {
            out += &format!("\ncolo against stock COLO: {}\n", ratios.join("; "));
        }
        out
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default()
}

/// Runs the web workload on every configured setup and writes `report.json` and `report.md`
/// into a run directory.
pub async fn web(tag: &str, config: WebConfig) -> Result<WebReport> {
    let dir = run_dir("bench-web")?;
    let load_before = loadavg();
    let mut rows = Vec::new();
    for setup in config.setups.clone() {
        let setup_dir = dir.join(setup.name());
        std::fs::create_dir_all(&setup_dir)?;
        eprintln!("bench web: {} ...", setup.name());
        let started = Instant::now();
        let mut got = match setup {
            Setup::Native | Setup::Twin => native(tag, &setup_dir, &config, setup).await,
            Setup::Stock | Setup::Colo => colo_pair(tag, &setup_dir, &config, setup).await,
        }
        .with_context(|| format!("setup {}", setup.name()))?;
        eprintln!(
            "bench web: {} done in {:.0} s",
            setup.name(),
            started.elapsed().as_secs_f64()
        );
        rows.append(&mut got);
    }
    let report = WebReport {
        config,
        load_before,
        load_after: loadavg(),
        rows,
        run_dir: dir.clone(),
    };
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(dir.join("report.md"), report.render_markdown())?;
    Ok(report)
}

/// A guest booted without COLO: the bed's machine and guest, a raw disk, a NIC on `tap`.
struct PlainGuest {
    qemu: QemuProcess,
    serial: PathBuf,
}

impl PlainGuest {
    fn boot(
        a: &Artifacts,
        netns: &str,
        tap: &str,
        role: Role,
        dir: &Path,
        cfg: &PairConfig,
    ) -> Result<Self> {
        let image = dir.join(format!("{}.raw", role.name()));
        std::fs::File::create(&image)?.set_len(u64::from(cfg.disk_mib) << 20)?;
        let mut args = bed_args(a, role, dir, cfg);
        args.extend([
            "-global".into(),
            "virtio-device.use-disabled-flag=false".into(),
            "-netdev".into(),
            format!("tap,id=hn0,ifname={tap},script=no,downscript=no,vhost=off,vnet_hdr=off"),
            "-device".into(),
            format!("virtio-net-pci,netdev=hn0,mac={},romfile=", addr::GUEST_MAC),
            "-drive".into(),
            format!(
                "if=none,id=disk0,driver=raw,file.filename={}",
                image.display()
            ),
            "-device".into(),
            "virtio-blk-pci,drive=disk0".into(),
        ]);
        let qmp = dir.join(format!("{}-qmp.sock", role.name()));
        let qemu = QemuProcess::spawn(&a.qemu, netns, role.name(), dir, qmp, &args)?;
        Ok(PlainGuest {
            qemu,
            serial: dir.join(format!("{}-serial.log", role.name())),
        })
    }

    async fn wait_ready(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        while !guest::read_serial(&self.serial).ready {
            if self.qemu.has_exited() {
                bail!(
                    "QEMU exited before the guest booted: {}",
                    self.qemu.stderr_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the guest did not boot within {within:?} ({})",
                    self.serial.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }
}

impl Drop for PlainGuest {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
    }
}

/// The native and twin setups.
async fn native(tag: &str, dir: &Path, config: &WebConfig, setup: Setup) -> Result<Vec<WebRow>> {
    let a = Artifacts::locate()?;
    let topo = Topology::create(&format!("{tag}n"))?;
    let mut first = PlainGuest::boot(
        &a,
        &topo.primary,
        topology::PRIMARY_TAP,
        Role::Primary,
        dir,
        &config.pair,
    )?;
    let mut twin = None;
    if setup == Setup::Twin {
        // The twin's own segment: host B's tap, with the client's address on host B's side,
        // so the same guest address answers there without meeting the first guest.
        let cidr = format!("{}/24", addr::CLIENT);
        topology::ip(&[
            "-n",
            &topo.secondary,
            "addr",
            "add",
            &cidr,
            "dev",
            topology::SECONDARY_TAP,
        ])?;
        twin = Some(PlainGuest::boot(
            &a,
            &topo.secondary,
            topology::SECONDARY_TAP,
            Role::Secondary,
            dir,
            &config.pair,
        )?);
    }
    first.wait_ready(Duration::from_secs(120)).await?;
    if let Some(t) = twin.as_mut() {
        t.wait_ready(Duration::from_secs(120)).await?;
    }
    let target = format!("{}:80", addr::GUEST);
    let mut rows = Vec::new();
    for &c in &config.concurrency {
        let (client, secondary) = (topo.client.clone(), topo.secondary.clone());
        let (n, t, target1, target2) = (
            config.requests,
            config.timeout_s,
            target.clone(),
            target.clone(),
        );
        let first_run = tokio::task::spawn_blocking(move || run_ab(&client, &target1, n, c, t));
        let twin_run = twin
            .is_some()
            .then(|| tokio::task::spawn_blocking(move || run_ab(&secondary, &target2, n, c, t)));
        let ab = first_run.await??;
        let twin_ab = match twin_run {
            Some(run) => Some(run.await??),
            None => None,
        };
        rows.push(WebRow {
            setup,
            concurrency: c,
            ab,
            twin: twin_ab,
            checkpoints: None,
            checkpoints_per_1000: None,
            reasons: BTreeMap::new(),
        });
    }
    drop(twin);
    drop(first);
    drop(topo);
    Ok(rows)
}

/// colo-proxyd's requests for a checkpoint in its log from byte `from` on, by reason.
fn proxyd_reasons(log: &Path, from: u64) -> BTreeMap<String, u64> {
    let text = std::fs::read(log).unwrap_or_default();
    count_reasons(&String::from_utf8_lossy(
        &text[(from as usize).min(text.len())..],
    ))
}

/// The `reason=` of each "the comparison needs a checkpoint" line, counted.
fn count_reasons(log: &str) -> BTreeMap<String, u64> {
    let mut reasons = BTreeMap::new();
    for line in log
        .lines()
        .filter(|l| l.contains("the comparison needs a checkpoint"))
    {
        let reason = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("reason="))
            .unwrap_or("unknown")
            .trim_matches('"')
            .to_string();
        *reasons.entry(reason).or_default() += 1;
    }
    reasons
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The stock and colo setups.
async fn colo_pair(tag: &str, dir: &Path, config: &WebConfig, setup: Setup) -> Result<Vec<WebRow>> {
    let cfg = match setup {
        Setup::Stock => PairConfig {
            network: NetworkBackend::ColoCompare,
            disk: DiskBackend::Replication,
            relay: false,
            ..config.pair.clone()
        },
        _ => PairConfig {
            network: NetworkBackend::ColoProxyd,
            disk: DiskBackend::ColoBlockd,
            relay: true,
            ..config.pair.clone()
        },
    };
    let short = if setup == Setup::Stock { "s" } else { "c" };
    let pair = StockPair::start(&format!("{tag}{short}"), dir.to_path_buf(), cfg).await?;
    let log = pair.dir.join("proxyd-primary.log");
    let target = format!("{}:80", addr::GUEST);
    let mut rows = Vec::new();
    for &c in &config.concurrency {
        let before = pair.checkpoint_pauses(Role::Primary).len();
        let log_at = file_len(&log);
        let (client, n, t, target) = (
            pair.topology.client.clone(),
            config.requests,
            config.timeout_s,
            target.clone(),
        );
        let ab = tokio::task::spawn_blocking(move || run_ab(&client, &target, n, c, t)).await??;
        let checkpoints = pair
            .checkpoint_pauses(Role::Primary)
            .len()
            .saturating_sub(before);
        rows.push(WebRow {
            setup,
            concurrency: c,
            ab,
            twin: None,
            checkpoints: Some(checkpoints),
            checkpoints_per_1000: Some(checkpoints as f64 * 1000.0 / ab.complete.max(1) as f64),
            reasons: proxyd_reasons(&log, log_at),
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `ab -q -r -n 200 -c 4` printed against the bed's guest.
    const AB: &str = "This is ApacheBench, Version 2.3 <$Revision: 1903618 $>
Benchmarking 10.0.2.15 (be patient).....done


Server Software:
Server Hostname:        10.0.2.15
Server Port:            80

Document Path:          /
Document Length:        14 bytes

Concurrency Level:      4
Time taken for tests:   1.234 seconds
Complete requests:      200
Failed requests:        3
   (Connect: 0, Receive: 0, Length: 3, Exceptions: 0)
Non-2xx responses:      2
Total transferred:      20000 bytes
HTML transferred:       2800 bytes
Requests per second:    162.07 [#/sec] (mean)
Time per request:       24.681 [ms] (mean)

Percentage of the requests served within a certain time (ms)
  50%     21
  66%     24
  75%     26
  80%     28
  90%     35
  95%     41
  98%     52
  99%     60
 100%     77 (longest request)
";

    #[test]
    fn ab_reports_are_read() {
        assert_eq!(
            parse_ab(AB).unwrap(),
            AbResult {
                complete: 200,
                failed: 3,
                non_2xx: 2,
                requests_per_s: 162.07,
                p50_ms: 21,
                p99_ms: 60,
            }
        );
        let without_non_2xx = AB.replace("Non-2xx responses:      2\n", "");
        assert_eq!(parse_ab(&without_non_2xx).unwrap().non_2xx, 0);
    }

    #[test]
    fn a_report_without_a_figure_is_an_error_naming_it() {
        let err = parse_ab(&AB.replace("Requests per second:", "Requests:")).unwrap_err();
        assert!(err.to_string().contains("Requests per second:"), "{err}");
        let err = parse_ab(&AB.replace("  99%     60", "  99%     lots")).unwrap_err();
        assert!(err.to_string().contains("99%"), "{err}");
    }

    #[test]
    fn proxyd_reasons_are_counted() {
        let line = |r: &str| {
            format!(
                "2026-12-06T03:00:00Z  INFO colo_proxyd::daemon::primary: the comparison needs \
                 a checkpoint reason={r} detail=X epoch=3\n"
            )
        };
        let text = format!(
            "{}{}{}other line reason=ignored\n",
            line("payload-differs"),
            line("payload-differs"),
            line("\"hold-timeout\"")
        );
        assert_eq!(
            count_reasons(&text),
            BTreeMap::from([("hold-timeout".into(), 1), ("payload-differs".into(), 2)])
        );
        assert!(proxyd_reasons(Path::new("/nonexistent/proxyd-primary.log"), 0).is_empty());
    }
}
