//! `qmp-driver reprotect` against fake QEMUs (colo-testkit's `FakeMonitor`, a scripted
//! monitor per side that answers from a state machine and logs every command): the exact QMP
//! sequence of an online re-protect, the undo after a failed migration, and that nothing is
//! sent when the pair's layout is not one `reprotect` (or `failback`) does.

use colo_testkit::fake_qmp::Answer;
use serde_json::{Value, json};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

mod common;

use common::{Bed, Script, stderr};

impl Bed {
    /// A pair on colo's daemons (`daemons = true`) or on QEMU's own replication and
    /// colo-compare, with `extra` sections at the end.
    fn config_with(&self, daemons: bool, extra: &str) {
        let d = self.dir.path().display();
        let layout = if daemons {
            format!(
                "[disk]\nbackend = \"colo-blockd\"\nnbd_port = 10809\n\
                 [network]\nbackend = \"colo-proxyd\"\nproxyd_qmp = \"unix:{d}/pp.qmp\"\n"
            )
        } else {
            String::new()
        };
        let text = format!(
            r#"
            name = "t1"
            [primary]
            qmp = "unix:{d}/p.qmp"
            host = "192.168.77.1"
            [secondary]
            qmp = "unix:{d}/s.qmp"
            host = "192.168.77.2"
            [migration]
            secondary_incoming = "unix:{d}/incoming.sock"
            primary_target = "unix:{d}/relay.sock"
            checkpoint_delay_ms = 500
            [relay]
            listen = "unix:{d}/relay.sock"
            control = "{d}/control.sock"
            {layout}
            {extra}
            "#
        );
        std::fs::write(self.path("pair.toml"), text).unwrap();
    }

    /// The commands that change something (no `query-*`), per side, in order.
    fn changes(&self, side: &str) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, c, _)| s == side && !c.starts_with("query-") && c != "qmp_capabilities")
            .map(|(_, c, _)| c.clone())
            .collect()
    }

    /// The arguments of the first `cmd` the primary got.
    fn args_of(&self, cmd: &str) -> Value {
        self.all_args_of(cmd)
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("{cmd} was not sent"))
    }

    /// The arguments of every `cmd` the primary got, in order.
    fn all_args_of(&self, cmd: &str) -> Vec<Value> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, c, _)| s == "primary" && c == cmd)
            .map(|(_, _, a)| a.clone())
            .collect()
    }

    async fn run(&self, args: &[&str]) -> Output {
        self.run_within(args, Duration::from_secs(60)).await
    }
}

fn colo_status(mode: &str, last: &str) -> Answer {
    Answer::ret(json!({"mode": mode, "last-mode": last, "reason": "none"}))
}

fn status(running: bool, status: &str) -> Answer {
    Answer::ret(json!({"running": running, "status": status}))
}

/// A primary serving alone after a failover: its mirror reports half the disk, then ready;
/// its migration goes active, pauses before the switch, and enters COLO after
/// `migrate-continue` (or fails when `fail_migration`).
fn primary(in_colo: Arc<AtomicBool>, fail_migration: bool) -> Script {
    let (mut job, mut job_polls, mut migrating, mut mig_polls) = (false, 0, false, 0);
    Box::new(move |cmd, _| match cmd {
        "query-colo-status" if in_colo.load(Ordering::SeqCst) => colo_status("primary", "primary"),
        "query-colo-status" => colo_status("none", "primary"),
        "query-status" => status(true, "running"),
        "query-migrate-capabilities" => Answer::ret(json!([
            {"capability": "x-colo", "state": true},
            {"capability": "pause-before-switchover", "state": false},
        ])),
        "query-block-jobs" if job => {
            job_polls += 1;
            let ready = job_polls > 1;
            let offset = if ready { 16 << 20 } else { 8 << 20 };
            Answer::ret(json!([{
                "device": "colo-reprotect", "type": "mirror", "len": 16 << 20,
                "offset": offset, "ready": ready, "busy": false, "paused": false,
                "speed": 0, "io-status": "ok",
            }]))
        }
        "query-block-jobs" => Answer::ret(json!([])),
        "blockdev-mirror" => {
            job = true;
            Answer::ok()
        }
        "block-job-cancel" => {
            job = false;
            Answer::ok()
        }
        "migrate" => {
            migrating = true;
            Answer::ok()
        }
        "query-migrate" if in_colo.load(Ordering::SeqCst) => Answer::ret(json!({"status": "colo"})),
        "query-migrate" if migrating => {
            mig_polls += 1;
            let ram = json!({"total": 100 << 20, "remaining": 0, "transferred": 100 << 20});
            if fail_migration {
                Answer::ret(json!({"status": "failed", "error-desc": "the relay went away"}))
            } else if mig_polls < 2 {
                Answer::ret(json!({"status": "active", "ram": ram}))
            } else {
                Answer::ret(json!({"status": "pre-switchover", "ram": ram}))
            }
        }
        "query-migrate" => Answer::ret(json!({"status": "completed"})),
        "migrate-continue" => {
            in_colo.store(true, Ordering::SeqCst);
            Answer::ok()
        }
        _ => Answer::ok(),
    })
}

/// A new secondary waiting with `-incoming defer`, its redirectors connected; it runs in COLO
/// once the primary continued its migration.
fn secondary(in_colo: Arc<AtomicBool>) -> Script {
    Box::new(move |cmd, _| match cmd {
        "query-colo-status" if in_colo.load(Ordering::SeqCst) => colo_status("secondary", "none"),
        "query-colo-status" => colo_status("none", "none"),
        "query-status" if in_colo.load(Ordering::SeqCst) => status(true, "running"),
        "query-status" => status(false, "inmigrate"),
        "query-migrate" => Answer::ret(json!({})),
        "query-migrate-capabilities" => Answer::ret(json!([])),
        "query-chardev" => Answer::ret(json!([
            {"label": "red0", "filename": "tcp:127.0.0.1:40000<->127.0.0.1:9003", "frontend-open": true},
            {"label": "red1", "filename": "tcp:127.0.0.1:40001<->127.0.0.1:9004", "frontend-open": true},
        ])),
        _ => Answer::ok(),
    })
}

/// A bed with the config (`daemons`, `extra` sections), the scripted primary (its migration
/// failing when `fail_migration`) and the waiting secondary.
fn scripted_pair(daemons: bool, extra: &str, fail_migration: bool) -> Bed {
    let bed = Bed::new();
    bed.config_with(daemons, extra);
    let in_colo = Arc::new(AtomicBool::new(false));
    bed.primary(primary(in_colo.clone(), fail_migration));
    bed.secondary(secondary(in_colo));
    bed
}

#[tokio::test]
async fn reprotect_copies_migrates_and_switches_in_the_documented_order() {
    let bed = scripted_pair(true, "", false);
    let out = bed
        .run(&["reprotect", "--json", "--speed", "4194304"])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        bed.changes("secondary"),
        ["migrate-set-capabilities", "migrate-incoming"]
    );
    assert_eq!(
        bed.changes("primary"),
        [
            "blockdev-add",
            "blockdev-mirror",
            "migrate-set-capabilities",
            "migrate-set-parameters",
            "migrate",
            "block-job-cancel",
            "blockdev-del",
            "blockdev-add",
            "x-blockdev-change",
            "object-add",
            "object-add",
            "object-add",
            "migrate-continue",
        ]
    );
    // The copy's target: an NBD node on colo-blockd serve (nbd_port + 1, export base),
    // deleted once the job ended.
    let target = &bed.all_args_of("blockdev-add")[0];
    assert_eq!(
        target,
        &json!({"driver": "nbd", "node-name": "colo-reprotect-target",
                "server": {"type": "inet", "host": "192.168.77.2", "port": "10810"},
                "export": "base"})
    );
    assert_eq!(
        bed.args_of("blockdev-del"),
        json!({"node-name": "colo-reprotect-target"})
    );
    let mirror = bed.args_of("blockdev-mirror");
    assert_eq!(mirror["target"], "colo-reprotect-target");
    assert_eq!(mirror["device"], "colo-disk0");
    assert_eq!(mirror["sync"], "full");
    assert_eq!(mirror["copy-mode"], "write-blocking");
    assert_eq!(mirror["speed"], 4 << 20);
    assert_eq!(
        bed.args_of("migrate-set-capabilities")["capabilities"],
        json!([{"capability": "pause-before-switchover", "state": true}])
    );
    assert_eq!(
        bed.all_args_of("blockdev-add")[1]["export"],
        "replica",
        "the NBD child goes to colo-blockd's replica export"
    );
    assert_eq!(
        bed.args_of("migrate-continue"),
        json!({"state": "pre-switchover"})
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("the report is JSON");
    let phases: Vec<&str> = report["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        ["prepare", "copy", "memory", "switch", "enter-colo"]
    );
    assert_eq!(report["disk_bytes"], 16 << 20);
    assert_eq!(report["bytes_copied"], 16 << 20);
    assert_eq!(report["ram_bytes"], 100 << 20);
    let progress = stderr(&out);
    assert!(
        progress.contains("the copy: 50% (8.0 of 16.0 MiB)"),
        "no copy progress: {progress}"
    );
}

#[tokio::test]
async fn a_failed_migration_is_undone_on_the_primary() {
    let bed = scripted_pair(true, "", true);
    let out = bed.run(&["reprotect"]).await;
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the relay went away"),
        "{}",
        stderr(&out)
    );
    let changes = bed.changes("primary");
    assert!(
        !changes
            .iter()
            .any(|c| c == "migrate-continue" || c == "object-add"),
        "the switch began: {changes:?}"
    );
    let undo = &changes[changes.iter().position(|c| c == "migrate").unwrap() + 1..];
    assert_eq!(
        undo,
        [
            "block-job-cancel",
            "blockdev-del",
            "x-blockdev-change",
            "blockdev-del",
            "object-del",
            "object-del",
            "object-del",
        ]
    );
    assert_eq!(
        bed.args_of("block-job-cancel"),
        json!({"device": "colo-reprotect", "force": true})
    );
}

/// With `[tls]` the copy's NBD client and the migration both use the primary's credentials
/// object and accept only the secondary host's certificate.
#[tokio::test]
async fn with_tls_the_copy_and_the_migration_are_authenticated() {
    let bed = scripted_pair(
        true,
        "[tls]\nprimary_dir = \"/etc/colo/pki-a\"\nprimary_name = \"hosta\"\n\
         secondary_dir = \"/etc/colo/pki-b\"\nsecondary_name = \"hostb\"\n",
        false,
    );
    let out = bed.run(&["reprotect"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let adds = bed.all_args_of("blockdev-add");
    for (what, node) in [
        ("the copy target", &adds[0]),
        ("the replica child", &adds[1]),
    ] {
        assert_eq!(node["tls-creds"], "colo-tls0", "{what}: {node}");
        assert_eq!(node["tls-hostname"], "hostb", "{what}: {node}");
    }
    assert!(
        bed.all_args_of("migrate-set-parameters")
            .contains(&json!({"tls-creds": "colo-tls0", "tls-hostname": "hostb"})),
        "the migration's TLS parameters were not set"
    );
}

/// A copy target that is not `nbd://HOST:PORT/EXPORT` is refused before anything is sent.
#[tokio::test]
async fn a_target_that_is_not_an_nbd_address_is_refused() {
    let bed = scripted_pair(true, "", false);
    let out = bed
        .run(&["reprotect", "--target", "nbd://hostb/base"])
        .await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("names no port"), "{}", stderr(&out));
    assert!(bed.changes("primary").is_empty() && bed.changes("secondary").is_empty());
}

#[tokio::test]
async fn a_pair_on_qemus_own_replication_is_refused_before_anything_is_sent() {
    let bed = scripted_pair(false, "", false);
    let out = bed.run(&["reprotect"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("colo-blockd"), "{}", stderr(&out));
    assert!(bed.changes("primary").is_empty() && bed.changes("secondary").is_empty());
    assert!(
        !bed.log
            .lock()
            .unwrap()
            .iter()
            .any(|(_, c, _)| c.starts_with("query-")),
        "queried a pair it refuses"
    );
}

/// `failback` refuses, before anything changes: QEMU's own stack, a primary incoming address
/// it cannot derive (the config's migration addresses are Unix sockets), and a secondary that
/// did not take over (here it waits for a migration).
#[tokio::test]
async fn failback_refuses_what_it_cannot_move_before_anything_is_sent() {
    let bed = scripted_pair(false, "", false);
    let out = bed.run(&["failback"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("colo-blockd"), "{}", stderr(&out));

    let bed = scripted_pair(true, "", false);
    let out = bed.run(&["failback"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("--incoming"), "{}", stderr(&out));
    assert!(bed.changes("primary").is_empty() && bed.changes("secondary").is_empty());

    let out = bed
        .run(&["failback", "--incoming", "tcp:192.168.77.1:9999"])
        .await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("does not serve alone"),
        "{}",
        stderr(&out)
    );
    assert!(bed.changes("primary").is_empty() && bed.changes("secondary").is_empty());
}
