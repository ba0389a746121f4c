//! The workload suite (issue 15): the same guest under the same workloads in four setups, in
//! one invocation on the same machine:
//!
//! - **native**: the guest without COLO (one QEMU on host A, its tap on the host bridge);
//! - **twin**: the same, with an identical second guest on host B under the same load at the
//!   same time (its own tap and client address inside host B's namespace). On a 2-core machine
//!   COLO runs two VMs on the CPUs native gives to one, so this is the fair "native" here;
//! - **stock**: QEMU's own COLO (colo-compare and block replication, no relay), as shipped;
//! - **colo**: colo's daemons (colo-proxyd on both hosts, colo-blockd, the relay).
//!
//! Each setup is booted once and runs every selected workload in turn ([`Workload`]):
//!
//! - [`web`]: ApacheBench (`ab`, Debian's apache2-utils) on the guest's small page;
//! - [`bulk`]: `ab` on the guest's 1 MiB `/blob` (download; one body per run checked against
//!   `/blob.md5`), and N MiB streamed into the guest's echo service while the echo is read back
//!   and checked (upload, with the echo on the way back: the guest cannot take a POST body);
//! - [`disk`]: the guest's own writer makes N O_DIRECT 4 KiB writes and a flush per second to
//!   its disk at several offered rates (`/cgi-bin/disk?N`); writes/s achieved, mean time per
//!   write, checkpoints;
//! - [`memory`]: the primary's checkpoint pauses at several memory-dirtying rates (COLO
//!   setups only).
//!
//! On the COLO pairs every run counts the primary's checkpoints (its STOP/RESUME events) and,
//! on colo's daemons, the reasons colo-proxyd gave for asking (QEMU's colo-compare does not
//! say). It is a benchmark, not a test: nothing is asserted about timing; a run that cannot
//! boot its guests, cannot run its clients, or gets wrong bytes back fails with an error.
//!
//! Output: `report.md`, `report.json`, one CSV per workload (`web.csv`, `download.csv`,
//! `upload.csv`, `disk.csv`, `memory.csv`) and, when gnuplot is installed, one PNG per workload
//! drawn from its CSV (module `plot`) in the run directory.

mod bed;
pub mod bulk;
pub mod disk;
pub mod memory;
mod plot;
pub mod web;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::artifacts::run_dir;
use crate::stock::PairConfig;
use bed::Bed;
pub use bulk::{DownloadConfig, DownloadRow, UploadConfig, UploadRow};
pub use disk::{DiskConfig, DiskRow};
pub use memory::{MemoryConfig, MemoryRow};
pub use web::{WebConfig, WebRow};

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

    /// A COLO pair (stock or colo).
    pub fn is_pair(self) -> bool {
        matches!(self, Setup::Stock | Setup::Colo)
    }
}

/// One of the workloads the suite runs on each setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Many small responses (`GET /`).
    Web,
    /// 1 MiB downloads (`GET /blob`).
    Download,
    /// Bytes streamed into the guest's echo service and read back.
    Upload,
    /// The guest's synchronous disk writes at offered rates.
    Disk,
    /// Checkpoint pauses against the guest's memory-dirtying rate (COLO setups only).
    Memory,
}

impl Workload {
    /// Every workload, in the order they run on a setup (memory last: it changes the guest's
    /// dirtying rate and the pair's checkpoint period, and puts both back when it is done).
    pub const ALL: [Workload; 5] = [
        Workload::Web,
        Workload::Download,
        Workload::Upload,
        Workload::Disk,
        Workload::Memory,
    ];

    /// The name on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Web => "web",
            Workload::Download => "download",
            Workload::Upload => "upload",
            Workload::Disk => "disk",
            Workload::Memory => "memory",
        }
    }
}

/// What the suite is given.
#[derive(Debug, Clone, Serialize)]
pub struct SuiteConfig {
    /// The setups to run, in order.
    pub setups: Vec<Setup>,
    /// The workloads to run on each setup (run in the order of [`Workload::ALL`]).
    pub workloads: Vec<Workload>,
    /// The web workload.
    pub web: WebConfig,
    /// The download workload.
    pub download: DownloadConfig,
    /// The upload workload.
    pub upload: UploadConfig,
    /// The disk workload.
    pub disk: DiskConfig,
    /// The memory workload.
    pub memory: MemoryConfig,
    /// The guest and pair settings (guest RAM, memory load, checkpoint period) every setup
    /// shares.
    pub pair: PairConfig,
    /// colo-proxyd's equivalence rules on the colo setup (`none`: every byte compared). The
    /// caller puts them into the environment the daemons inherit (`COLO_PROXYD_EQUIVALENT`).
    pub equivalent: String,
}

impl SuiteConfig {
    fn runs(&self, workload: Workload) -> bool {
        self.workloads.contains(&workload)
    }
}

/// What ab printed for one run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AbResult {
    /// `Complete requests`.
    pub complete: u64,
    /// `Failed requests` (connect, receive, length and exception errors).
    pub failed: u64,
    /// The same by kind, from the line below it.
    pub failed_by: FailedKinds,
    /// `Non-2xx responses` (0 when ab does not print the line).
    pub non_2xx: u64,
    /// `Requests per second` (mean).
    pub requests_per_s: f64,
    /// `Time taken for tests`, seconds.
    pub time_taken_s: f64,
    /// `HTML transferred`: the bodies' bytes (`None`: ab stopped at its timeout).
    pub body_bytes: Option<u64>,
    /// 50 % of the requests were served within this time, ms (`None`: ab stopped at its
    /// timeout, printing no percentiles).
    pub p50_ms: Option<u64>,
    /// 99 % of the requests were served within this time, ms (see `p50_ms`).
    pub p99_ms: Option<u64>,
    /// Requests never answered: ab stopped when no connection had moved for its timeout
    /// (`-s`), as it does when the last requests all wait on the guest (SYNs the guest's full
    /// listen queue dropped, retransmitted 1, 3, 7, 15, 31 s later).
    pub unanswered: u64,
}

/// ab's `(Connect: C, Receive: R, Length: L, Exceptions: E)`: a connection refused or reset
/// before the request went, one broken while the response came, a body of another length than
/// the first response's, anything else.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FailedKinds {
    /// `Connect`.
    pub connect: u64,
    /// `Receive`.
    pub receive: u64,
    /// `Length`.
    pub length: u64,
    /// `Exceptions`.
    pub exceptions: u64,
}

impl FailedKinds {
    /// Reads the breakdown line of ab's report; all 0 when it is missing (no failures).
    fn parse(text: &str) -> Self {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with("(Connect:"))
            .unwrap_or("");
        let count = |label: &str| -> u64 {
            line.split(label)
                .nth(1)
                .and_then(|rest| {
                    let digits: String = rest
                        .trim_start()
                        .chars()
                        .take_while(char::is_ascii_digit)
                        .collect();
                    digits.parse().ok()
                })
                .unwrap_or(0)
        };
        FailedKinds {
            connect: count("(Connect:"),
            receive: count("Receive:"),
            length: count("Length:"),
            exceptions: count("Exceptions:"),
        }
    }

    /// `receive 6, length 3`: the kinds that occurred.
    pub fn describe(&self) -> String {
        [
            ("connect", self.connect),
            ("receive", self.receive),
            ("length", self.length),
            ("exceptions", self.exceptions),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(kind, n)| format!("{kind} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
    }
}

impl AbResult {
    /// Body bytes per second over the whole run, MB/s (10^6 bytes).
    /// `None` when ab did not say how many bytes it got.
    pub fn body_mb_per_s(&self) -> Option<f64> {
        let bytes = self.body_bytes?;
        Some(if self.time_taken_s > 0.0 {
            bytes as f64 / self.time_taken_s / 1e6
        } else {
            0.0
        })
    }

    /// Requests that failed, were not answered 2xx, or were not answered at all.
    pub fn failures(&self) -> u64 {
        self.failed + self.non_2xx + self.unanswered
    }
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
        failed_by: FailedKinds::parse(text),
        non_2xx: match field(text, "Non-2xx responses:") {
            Some(_) => number(text, "Non-2xx responses:")?,
            None => 0,
        },
        requests_per_s: number(text, "Requests per second:")?,
        time_taken_s: number(text, "Time taken for tests:")?,
        body_bytes: Some(number(text, "HTML transferred:")?),
        p50_ms: Some(number(text, "50%")?),
        p99_ms: Some(number(text, "99%")?),
        unanswered: 0,
    })
}

/// What is left of ab's report when it stopped at its timeout (`apr_pollset_poll: The timeout
/// specified has expired`, then `Total of N requests completed`): the requests completed, and
/// the rate over `elapsed`; `None` for any other failure.
pub fn parse_ab_timeout(output: &str, requests: u32, elapsed: Duration) -> Option<AbResult> {
    if !output.contains("The timeout specified has expired") {
        return None;
    }
    let complete: u64 = output
        .split("Total of ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let seconds = elapsed.as_secs_f64();
    Some(AbResult {
        complete,
        failed: 0,
        failed_by: FailedKinds::default(),
        non_2xx: 0,
        requests_per_s: if seconds > 0.0 {
            complete as f64 / seconds
        } else {
            0.0
        },
        time_taken_s: seconds,
        body_bytes: None,
        p50_ms: None,
        p99_ms: None,
        unanswered: u64::from(requests).saturating_sub(complete),
    })
}

/// Runs `ab` inside `netns` against `url`.
pub fn run_ab(
    netns: &str,
    url: &str,
    requests: u32,
    concurrency: u32,
    timeout_s: u32,
) -> Result<AbResult> {
    let started = Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "ab", "-q", "-r"])
        .args(["-s", &timeout_s.to_string()])
        .args(["-n", &requests.to_string()])
        .args(["-c", &concurrency.to_string()])
        .arg(url)
        .output()
        .context("running ab (package apache2-utils; integration/setup.sh installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let both = format!("{}{text}", String::from_utf8_lossy(&out.stderr));
        if let Some(result) = parse_ab_timeout(&both, requests, started.elapsed()) {
            eprintln!(
                "bench: ab -n {requests} -c {concurrency} {url}: stopped after {timeout_s} s \
                 without progress, {} requests unanswered",
                result.unanswered
            );
            return Ok(result);
        }
        bail!(
            "ab -n {requests} -c {concurrency} {url} in {netns} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            text
        );
    }
    parse_ab(&text).with_context(|| format!("reading ab's report:\n{text}"))
}

/// `run_ab` on a thread of tokio's blocking pool (ab is a child process; the thread never
/// joins a namespace, `ip netns exec` does that for the child).
async fn ab(netns: String, url: String, requests: u32, c: u32, timeout_s: u32) -> Result<AbResult> {
    tokio::task::spawn_blocking(move || run_ab(&netns, &url, requests, c, timeout_s)).await?
}

/// The suite's report.
#[derive(Debug, Clone, Serialize)]
pub struct SuiteReport {
    /// What it was given.
    pub config: SuiteConfig,
    /// `/proc/loadavg` before and after the run: the machine's load.
    pub load_before: String,
    /// See `load_before`.
    pub load_after: String,
    /// The web workload, every setup at every concurrency.
    pub web: Vec<WebRow>,
    /// The download workload.
    pub download: Vec<DownloadRow>,
    /// The upload workload.
    pub upload: Vec<UploadRow>,
    /// The disk workload.
    pub disk: Vec<DiskRow>,
    /// The memory workload (COLO setups).
    pub memory: Vec<MemoryRow>,
    /// Where the run's files are (`report.json`, `report.md`, the CSVs, each setup's logs).
    pub run_dir: PathBuf,
}

impl SuiteReport {
    /// Every run completed some work: each ab run some requests, each upload some bytes, each
    /// memory window some checkpoints.
    pub fn all_ran(&self) -> bool {
        self.web
            .iter()
            .all(|r| r.ab.complete > 0 && r.twin.as_ref().is_none_or(|t| t.complete > 0))
            && self
                .download
                .iter()
                .all(|r| r.ab.complete > 0 && r.twin.as_ref().is_none_or(|t| t.complete > 0))
            && self.upload.iter().all(|r| r.run.bytes > 0)
            && self.disk.iter().all(|r| r.rate == 0 || r.run.writes > 0)
            && self.memory.iter().all(|r| r.checkpoints > 0)
    }

    /// Every selected workload's table, in markdown.
    pub fn render_markdown(&self) -> String {
        let c = &self.config;
        let mut out = format!(
            "colo-testbed bench: guest {} MiB RAM dirtying {} MiB/s, periodic checkpoint {} ms, \
             colo-proxyd equivalence `{}`; load average before {} / after {}\n",
            c.pair.memory_mib,
            c.pair.guest_load_mib_s,
            c.pair.checkpoint_delay_ms,
            c.equivalent,
            self.load_before.trim(),
            self.load_after.trim()
        );
        if c.runs(Workload::Web) {
            out += "\n";
            out += &web::render(&c.web, &self.web);
        }
        if c.runs(Workload::Download) {
            out += "\n";
            out += &bulk::render_download(&c.download, &self.download);
        }
        if c.runs(Workload::Upload) {
            out += "\n";
            out += &bulk::render_upload(&c.upload, &self.upload);
        }
        if c.runs(Workload::Disk) {
            out += "\n";
            out += &disk::render(&c.disk, &self.disk);
        }
        if c.runs(Workload::Memory) {
            out += "\n";
            out += &memory::render(&c.memory, &self.memory);
        }
        out
    }

    fn write(&self) -> Result<()> {
        let dir = &self.run_dir;
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(self)?)?;
        std::fs::write(dir.join("report.md"), self.render_markdown())?;
        let c = &self.config;
        if c.runs(Workload::Web) {
            std::fs::write(dir.join("web.csv"), web::csv(&self.web))?;
        }
        if c.runs(Workload::Download) {
            std::fs::write(dir.join("download.csv"), bulk::download_csv(&self.download))?;
        }
        if c.runs(Workload::Upload) {
            std::fs::write(dir.join("upload.csv"), bulk::upload_csv(&self.upload))?;
        }
        if c.runs(Workload::Disk) {
            std::fs::write(dir.join("disk.csv"), disk::csv(&self.disk))?;
        }
        if c.runs(Workload::Memory) {
            std::fs::write(dir.join("memory.csv"), memory::csv(&self.memory))?;
        }
        Ok(())
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default()
}

/// A value for a table cell: the number, or "-" when there is none.
fn cell<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

/// A CSV cell: the value, or empty.
fn csv_cell<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(String::new, |v| v.to_string())
}

/// `part / whole` with two decimals, or "-".
fn share(part: f64, whole: Option<f64>) -> String {
    match whole {
        Some(w) if w > 0.0 => format!("{:.2}", part / w),
        _ => "-".into(),
    }
}

/// Boots every configured setup in turn, runs every configured workload on it, and writes
/// `report.json`, `report.md` and the CSVs into a run directory.
pub async fn suite(tag: &str, config: SuiteConfig) -> Result<SuiteReport> {
    if config.runs(Workload::Memory) {
        memory::check_guest_ram(&config)?;
    }
    let dir = run_dir("bench")?;
    let mut report = SuiteReport {
        load_before: loadavg(),
        load_after: String::new(),
        web: Vec::new(),
        download: Vec::new(),
        upload: Vec::new(),
        disk: Vec::new(),
        memory: Vec::new(),
        run_dir: dir.clone(),
        config,
    };
    for setup in report.config.setups.clone() {
        let setup_dir = dir.join(setup.name());
        std::fs::create_dir_all(&setup_dir)?;
        eprintln!("bench: {} booting ...", setup.name());
        let started = Instant::now();
        let bed = Bed::boot(tag, &setup_dir, &report.config, setup)
            .await
            .with_context(|| format!("booting setup {}", setup.name()))?;
        let c = report.config.clone();
        for workload in Workload::ALL {
            if !c.runs(workload) || (workload == Workload::Memory && !setup.is_pair()) {
                continue;
            }
            eprintln!("bench: {} {} ...", setup.name(), workload.name());
            let run = async {
                match workload {
                    Workload::Web => report.web.extend(web::run(&bed, setup, &c.web).await?),
                    Workload::Download => report
                        .download
                        .extend(bulk::download(&bed, setup, &c.download).await?),
                    Workload::Upload => report
                        .upload
                        .extend(bulk::upload(&bed, setup, &c.upload).await?),
                    Workload::Disk => report.disk.extend(disk::run(&bed, setup, &c.disk).await?),
                    Workload::Memory => report
                        .memory
                        .extend(memory::run(&bed, setup, &c.memory, &c.pair).await?),
                }
                anyhow::Ok(())
            };
            run.await
                .with_context(|| format!("setup {}, workload {}", setup.name(), workload.name()))?;
            // Keep what has been measured so far on disk: a later setup that fails to boot
            // must not lose an hour of figures.
            report.write()?;
        }
        drop(bed);
        eprintln!(
            "bench: {} done in {:.0} s",
            setup.name(),
            started.elapsed().as_secs_f64()
        );
    }
    report.load_after = loadavg();
    report.write()?;
    // The plots last, from the CSVs just written; a missing gnuplot is said, never fatal.
    for problem in plot::draw_all(&dir) {
        eprintln!("bench: {problem}");
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `ab -q -r -n 200 -c 4` printed against the bed's guest.
    pub(super) const AB: &str = "This is ApacheBench, Version 2.3 <$Revision: 1903618 $>
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
        let ab = parse_ab(AB).unwrap();
        assert_eq!(
            ab,
            AbResult {
                complete: 200,
                failed: 3,
                failed_by: FailedKinds {
                    length: 3,
                    ..FailedKinds::default()
                },
                non_2xx: 2,
                requests_per_s: 162.07,
                time_taken_s: 1.234,
                body_bytes: Some(2800),
                p50_ms: Some(21),
                p99_ms: Some(60),
                unanswered: 0,
            }
        );
        assert_eq!(ab.failures(), 5);
        assert!((ab.body_mb_per_s().unwrap() - 2800.0 / 1.234 / 1e6).abs() < 1e-12);
        let without_non_2xx = AB.replace("Non-2xx responses:      2\n", "");
        assert_eq!(parse_ab(&without_non_2xx).unwrap().non_2xx, 0);
    }

    /// What ab 2.3 printed when the last requests of `-n 1000 -c 64` waited on the guest for
    /// longer than `-s 30` (stderr, then stdout).
    const AB_TIMEOUT: &str = "apr_pollset_poll: The timeout specified has expired (70007)\n\
        This is ApacheBench, Version 2.3 <$Revision$>\n\
        Benchmarking 10.0.2.15 (be patient)...Total of 997 requests completed\n";

    #[test]
    fn an_ab_stopped_at_its_timeout_counts_the_unanswered_and_has_no_percentiles() {
        let ab = parse_ab_timeout(AB_TIMEOUT, 1000, Duration::from_secs(50)).unwrap();
        assert_eq!(ab.complete, 997);
        assert_eq!(ab.unanswered, 3);
        assert_eq!(ab.failures(), 3);
        assert!((ab.requests_per_s - 997.0 / 50.0).abs() < 1e-9);
        assert_eq!(
            (ab.p50_ms, ab.p99_ms, ab.body_mb_per_s()),
            (None, None, None)
        );
        // Any other failure is not read as a timeout.
        let refused = "apr_socket_connect(): Connection refused (111)\n";
        assert_eq!(
            parse_ab_timeout(refused, 1000, Duration::from_secs(1)),
            None
        );
        let no_total = AB_TIMEOUT.replace("Total of 997", "Total");
        assert_eq!(
            parse_ab_timeout(&no_total, 1000, Duration::from_secs(1)),
            None
        );
    }

    #[test]
    fn a_report_without_a_figure_is_an_error_naming_it() {
        let err = parse_ab(&AB.replace("Requests per second:", "Requests:")).unwrap_err();
        assert!(err.to_string().contains("Requests per second:"), "{err}");
        let err = parse_ab(&AB.replace("  99%     60", "  99%     lots")).unwrap_err();
        assert!(err.to_string().contains("99%"), "{err}");
        let err = parse_ab(&AB.replace("HTML transferred:", "HTML:")).unwrap_err();
        assert!(err.to_string().contains("HTML transferred:"), "{err}");
    }

    #[test]
    fn cells_and_shares() {
        assert_eq!(cell(Some(3)), "3");
        assert_eq!(cell::<u32>(None), "-");
        assert_eq!(share(1.0, Some(4.0)), "0.25");
        assert_eq!(share(1.0, Some(0.0)), "-");
        assert_eq!(share(1.0, None), "-");
    }
}
