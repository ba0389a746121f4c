//! Text output of the pair commands (stdout). `--json` prints the reports
//! themselves instead.

use qmp_driver::config::{DiskBackend, PairConfig};
use qmp_driver::pair::{
    AgentReport, CheckpointReport, CopyReport, FailbackReport, FailoverReport, Outcome, PairStatus,
    Phase, PrepareReport, ReprotectReport, SideStatus, StartReport, Step, StopReport,
};
use std::fmt::Write;

/// Aligned columns; the first row is the header.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::from("  ");
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn steps_table(steps: &[Step]) -> String {
    let mut rows = vec![vec![
        "side".to_string(),
        "step".into(),
        "ms".into(),
        "result".into(),
    ]];
    for s in steps {
        let result = match (s.outcome, &s.detail) {
            (Outcome::Done, _) => "ok".to_string(),
            (Outcome::Skipped, d) => format!("skipped: {}", d.as_deref().unwrap_or("not needed")),
            (Outcome::Failed, d) => format!("FAILED: {}", d.as_deref().unwrap_or("?")),
        };
        rows.push(vec![
            s.side.to_string(),
            s.what.clone(),
            format!("{:.1}", s.ms),
            result,
        ]);
    }
    table(&rows)
}

/// `prepare-secondary`.
pub fn prepare(cfg: &PairConfig, r: &PrepareReport) -> String {
    if r.already_in_colo {
        return "the secondary already runs in COLO: nothing to prepare\n".to_string();
    }
    let disk = match cfg.disk.backend {
        DiskBackend::Replication => format!(
            "disk {} exported on {}:{}",
            cfg.disk.export, cfg.secondary.host, cfg.disk.nbd_port
        ),
        DiskBackend::ColoBlockd => format!(
            "disk served by colo-blockd on {}:{}",
            cfg.secondary.host, cfg.disk.nbd_port
        ),
    };
    format!(
        "secondary prepared: x-colo on, {disk}, listening on {}\n{}",
        cfg.migration.secondary_incoming,
        steps_table(&r.steps)
    )
}

/// `copy-disk`.
pub fn copy(r: &CopyReport) -> String {
    format!(
        "disk copied to {}: {} bytes in {:.1} s\n{}",
        r.target,
        r.bytes,
        r.total_ms / 1000.0,
        steps_table(&r.steps)
    )
}

/// `reprotect`.
pub fn reprotect(cfg: &PairConfig, r: &ReprotectReport) -> String {
    live_move(
        &format!("pair {}: re-protected, COLO running", cfg.name),
        (r.total_ms, &r.phases),
        (r.disk_bytes, r.bytes_copied, r.ram_bytes),
        r.switch_pause_ms,
        "`colo-blockd serve` on the secondary host: stop it now (with --exit-after-client it \
         has exited by itself)",
        &r.steps,
    )
}

/// `failback`.
pub fn failback(cfg: &PairConfig, r: &FailbackReport) -> String {
    live_move(
        &format!("pair {}: the VM runs on the primary again, alone", cfg.name),
        (r.total_ms, &r.phases),
        (r.disk_bytes, r.bytes_copied, r.ram_bytes),
        r.switch_pause_ms,
        "stop `colo-blockd serve` on the primary host (with --exit-after-client it has exited \
         by itself) and the secondary's colo-blockd and colo-proxyd now, then bring the \
         secondary back with `reprotect`",
        &r.steps,
    )
}

/// A move of the running VM (re-protect, failback): its time per phase, the bytes of the disk
/// and the RAM, the pause at the switch, what to do next and the steps.
fn live_move(
    head: &str,
    (total_ms, phases): (f64, &[Phase]),
    (disk, copied, ram): (u64, u64, u64),
    pause_ms: f64,
    next: &str,
    steps: &[Step],
) -> String {
    let phases: Vec<String> = phases
        .iter()
        .map(|p| format!("{} {:.1} s", p.name, p.ms / 1000.0))
        .collect();
    let mib = |b: u64| b as f64 / 1048576.0;
    format!(
        "{head} ({:.1} s in all: {})\n\
         disk {:.1} MiB, {:.1} MiB written by the copy; {:.1} MiB of RAM sent; pause at the \
         switch {pause_ms:.1} ms\n{next}\n{}",
        total_ms / 1000.0,
        phases.join(", "),
        mib(disk),
        mib(copied),
        mib(ram),
        steps_table(steps)
    )
}

/// `start`.
pub fn start(cfg: &PairConfig, r: &StartReport) -> String {
    let head = if r.already_in_colo {
        format!("pair {}: already in COLO", cfg.name)
    } else {
        match r.entered_colo_ms {
            Some(ms) => format!(
                "pair {}: COLO running (entered in {:.1} s)",
                cfg.name,
                ms / 1000.0
            ),
            None => format!("pair {}: COLO running", cfg.name),
        }
    };
    format!(
        "{head}; checkpoint every {} ms\n{}",
        r.checkpoint_delay_ms,
        steps_table(&r.steps)
    )
}

fn opt(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "-".to_string())
}

fn side_column(s: &SideStatus) -> Vec<String> {
    vec![
        s.qmp.clone(),
        if s.reachable {
            "yes".to_string()
        } else {
            "NO".to_string()
        },
        opt(&s.qemu_version),
        opt(&s.runstate),
        opt(&s.colo_mode),
        opt(&s.colo_last_mode),
        opt(&s.colo_reason),
        opt(&s.migration_status),
        s.checkpoint_delay_ms
            .map(|d| format!("{d} ms"))
            .unwrap_or_else(|| "-".to_string()),
    ]
}

/// `status`.
pub fn status(st: &PairStatus) -> String {
    let labels = [
        "qmp",
        "reachable",
        "qemu",
        "run state",
        "colo mode",
        "last mode",
        "exit reason",
        "migration",
        "checkpoint delay",
    ];
    let p = side_column(&st.primary);
    let s = side_column(&st.secondary);
    let mut rows = vec![vec![String::new(), "primary".into(), "secondary".into()]];
    for (i, label) in labels.iter().enumerate() {
        rows.push(vec![label.to_string(), p[i].clone(), s[i].clone()]);
    }
    let mut out = format!("pair {}\n{}", st.name, table(&rows));
    for open in &st.open_sockets {
        let _ = writeln!(
            out,
            "warning: {} {} (mode {:04o}) accepts every local user: start QEMU with umask 077 \
             or put its sockets in a 0700 directory (docs/security.md, \"Local sockets\")",
            open.key,
            open.path.display(),
            open.mode
        );
    }
    for side in [&st.primary, &st.secondary] {
        if let Some(e) = &side.error {
            let _ = writeln!(out, "  {}: {e}", side.side);
        }
    }
    match &st.relay {
        None => out.push_str("relay: not configured\n"),
        Some(r) => {
            let _ = writeln!(out, "relay ({})", r.control.display());
            match (&r.status, &r.error) {
                (Some(rs), _) => {
                    let pause = rs
                        .last_pause_us
                        .map(|us| format!("{:.1} ms", us as f64 / 1000.0))
                        .unwrap_or_else(|| "-".into());
                    let mut rows = vec![
                        vec!["state".to_string(), rs.state.to_string()],
                        vec!["epoch".into(), rs.epoch.to_string()],
                        vec!["checkpoints".into(), rs.checkpoints.to_string()],
                        vec![
                            "checkpoint rate".into(),
                            format!("{:.1}/min", rs.checkpoint_rate_per_min),
                        ],
                        vec!["last pause".into(), pause],
                        vec![
                            "last request reason".into(),
                            rs.last_request_reason.clone().unwrap_or_else(|| "-".into()),
                        ],
                        vec![
                            "migration channel".into(),
                            if rs.main_channel_connected {
                                "connected".into()
                            } else {
                                "not connected".into()
                            },
                        ],
                        vec!["barrier timeouts".into(), rs.barrier_timeouts.to_string()],
                    ];
                    if let Some(e) = &rs.parse_error {
                        rows.push(vec!["parse error".into(), e.clone()]);
                    }
                    if rs.subscribers.is_empty() {
                        rows.push(vec!["subscribers".into(), "none".into()]);
                    }
                    for sub in &rs.subscribers {
                        let health = match (sub.connected, sub.healthy) {
                            (false, _) => "DISCONNECTED",
                            (true, true) => "healthy",
                            (true, false) => "UNHEALTHY",
                        };
                        let ack = sub
                            .last_ack_latency_us
                            .map(|us| format!(", last ack {:.1} ms", us as f64 / 1000.0))
                            .unwrap_or_default();
                        rows.push(vec![
                            "subscriber".into(),
                            format!(
                                "{} ({}{}){ack}",
                                sub.name,
                                if sub.sync { "sync, " } else { "" },
                                health
                            ),
                        ]);
                    }
                    out.push_str(&table(&rows));
                }
                (None, Some(e)) => {
                    let _ = writeln!(out, "  UNREACHABLE: {e}");
                }
                (None, None) => out.push_str("  no answer\n"),
            }
        }
    }
    out.push_str(&agents(&st.agents));
    out
}

/// The HA agents' part of `status`.
fn agents(agents: &[AgentReport]) -> String {
    if agents.is_empty() {
        return "HA agent: no state file on this host\n".into();
    }
    let mut out = String::new();
    for a in agents {
        let s = &a.status;
        let _ = writeln!(out, "HA agent {} ({})", s.side, a.state_file.display());
        let peer = s
            .peer
            .as_ref()
            .map_or("unknown".into(), |p| format!("node {}: {}", p.node, p.vm));
        let decision = s.last_decision.as_ref().map_or("none".into(), |d| {
            let ms = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.0} ms"));
            let failed = d
                .error
                .as_ref()
                .map_or(String::new(), |e| format!("; FAILED: {e}"));
            format!(
                "{}: {} (detection {}, failover {}){failed}",
                d.action,
                d.reason,
                ms(d.detection_ms),
                ms(d.failover_ms)
            )
        });
        let daemons = s
            .daemons
            .as_ref()
            .map_or("not watched on this host".into(), |d| {
                let mut parts = vec![if d.relay_up {
                    "relay up".to_string()
                } else {
                    format!("relay DOWN ({})", d.relay_error.as_deref().unwrap_or("-"))
                }];
                parts.extend(d.subscribers.iter().map(|sub| {
                    let state = match (sub.connected, sub.healthy) {
                        (false, _) => "DISCONNECTED",
                        (true, true) => "healthy",
                        (true, false) => "UNHEALTHY",
                    };
                    format!("{} {state}", sub.name)
                }));
                parts.join(", ")
            });
        let rows = vec![
            vec!["node".to_string(), s.node.to_string()],
            vec!["daemons".into(), daemons],
            vec!["vm".into(), s.vm.clone()],
            vec![
                "quorate".into(),
                if s.quorate { "yes" } else { "NO" }.into(),
            ],
            vec!["peer".into(), peer],
            vec!["last decision".into(), decision],
            vec!["auto re-protect".into(), auto_reprotect(s)],
            vec![
                "written".into(),
                format!("{:.1} s ago by pid {}", a.age_ms as f64 / 1000.0, s.pid),
            ],
        ];
        out.push_str(&table(&rows));
    }
    out
}

/// The agent's last automatic re-protect, in one line.
fn auto_reprotect(s: &qmp_driver::agent::status::AgentStatus) -> String {
    let Some(r) = &s.reprotect else {
        return "none".into();
    };
    let mut line = format!("{} (attempt {})", r.state, r.attempts);
    if let Some(report) = &r.report {
        let _ = write!(
            line,
            ": {:.1} s, pause at the switch {:.0} ms",
            report.total_ms / 1000.0,
            report.switch_pause_ms
        );
    }
    if let Some(e) = &r.error {
        let _ = write!(line, ": {e} ({} failed in a row)", r.failures_in_a_row);
    }
    line
}

/// `checkpoint`.
pub fn checkpoint(r: &CheckpointReport) -> String {
    let mut out = format!(
        "checkpoint: primary paused {:.1} ms (STOP {}.{:06} -> RESUME {}.{:06}), {:.1} ms after \
         the request; period unchanged at {} ms\n",
        r.pause_ms,
        r.stop_us.div_euclid(1_000_000),
        r.stop_us.rem_euclid(1_000_000),
        r.resume_us.div_euclid(1_000_000),
        r.resume_us.rem_euclid(1_000_000),
        r.waited_ms,
        r.checkpoint_delay_ms
    );
    if let Some(e) = &r.relay {
        let pause = e
            .last_pause_us
            .map(|us| format!(", its last pause {:.1} ms", us as f64 / 1000.0))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "relay: epoch {}, {} checkpoints{pause}",
            e.epoch, e.checkpoints
        );
    }
    if let Some(e) = &r.relay_error {
        let _ = writeln!(out, "relay: not used: {e}");
    }
    out
}

/// `failover`.
pub fn failover(r: &FailoverReport) -> String {
    let head = if r.already_done {
        format!(
            "the failover to the {} was already done; it runs (run state {})",
            r.survivor, r.runstate
        )
    } else {
        format!(
            "failover to the {} done in {:.1} ms; run state {}",
            r.survivor, r.total_ms, r.runstate
        )
    };
    format!("{head}\n{}", steps_table(&r.steps))
}

/// `stop`.
pub fn stop(r: &StopReport) -> String {
    let head = if r.already_stopped {
        "COLO had already ended on the primary".to_string()
    } else {
        format!(
            "COLO stopped in {:.1} ms; the primary runs alone",
            r.total_ms
        )
    };
    format!(
        "{head}; secondary: {}\n{}",
        r.secondary,
        steps_table(&r.steps)
    )
}
