//! The pair commands of the `qmp-driver` binary against fake QEMUs: a
//! scripted monitor per side (colo-testkit's `FakeMonitor`) that answers from
//! a state machine and logs every command, so the tests pin the exact QMP
//! sequence the CLI sends (and that nothing is sent when a precondition fails).

use colo_testkit::fake_qmp::{Answer, event};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::net::UnixListener;
use tokio::process::Command;

mod common;

use common::{Bed, Script, stderr};

impl Bed {
    /// Writes the pair config; `extra` is appended.
    fn config(&self, extra: &str) -> PathBuf {
        let d = self.dir.path().display();
        let text = format!(
            r#"
            name = "t1"
            [primary]
            qmp = "unix:{d}/p.qmp"
            watch_qmp = "unix:{d}/pw.qmp"
            host = "127.0.0.1"
            [secondary]
            qmp = "unix:{d}/s.qmp"
            host = "127.0.0.1"
            [migration]
            secondary_incoming = "unix:{d}/incoming.sock"
            {extra}
            "#
        );
        let path = self.path("pair.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// The primary's second monitor, the watch agent's.
    fn primary_watch(&self, script: Script) {
        common::fake_qemu(&self.path("pw.qmp"), "primary", self.log.clone(), script);
    }

    /// Starts `qmp-driver watch` with `args`; the caller stops it.
    fn spawn(&self, args: &[&str]) -> tokio::process::Child {
        Command::new(env!("CARGO_BIN_EXE_qmp-driver"))
            .arg("--config")
            .arg(self.path("pair.toml"))
            .args(args)
            .env_remove("COLO_CONFIG")
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("run qmp-driver")
    }

    /// Waits until `cmd` was sent, up to 30 s.
    async fn wait_sent(&self, cmd: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.sent().iter().any(|(_, c, _)| c == cmd) {
            assert!(
                Instant::now() < deadline,
                "{cmd} never sent: {:?}",
                self.sent()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn run(&self, args: &[&str]) -> Output {
        self.run_within(args, Duration::from_secs(30)).await
    }
}

fn expect(side: &str, cmd: &str, args: Value) -> (String, String, Value) {
    (side.to_string(), cmd.to_string(), args)
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {out:?}"))
}

fn colo_status(mode: &str, last: &str, reason: &str) -> Answer {
    Answer::ret(json!({"mode": mode, "last-mode": last, "reason": reason}))
}

fn running() -> Answer {
    Answer::ret(json!({"running": true, "status": "running"}))
}

/// A secondary whose primary died: in COLO until x-colo-lost-heartbeat.
fn secondary_in_colo() -> Script {
    let mut failed_over = false;
    Box::new(move |cmd, _| match cmd {
        "query-colo-status" if failed_over => colo_status("none", "secondary", "request"),
        "query-colo-status" => colo_status("secondary", "none", "none"),
        "x-colo-lost-heartbeat" => {
            failed_over = true;
            Answer::ok()
        }
        "query-status" => running(),
        _ => Answer::ok(),
    })
}

#[tokio::test]
async fn failover_to_secondary_sends_the_documented_sequence_and_runs_the_hook() {
    let bed = Bed::new();
    let hook_out = bed.path("hook.out");
    bed.config(&format!(
        "[relay]\nlisten = \"tcp:127.0.0.1:1\"\ncontrol = \"{}\"\n\
         [failover]\nsecondary_takeover_hook = \"echo $COLO_PAIR $COLO_SURVIVOR > {}\"",
        bed.path("no-relay.sock").display(),
        hook_out.display()
    ));
    // The relay line makes primary_target required; give it.
    let cfg = std::fs::read_to_string(bed.path("pair.toml"))
        .unwrap()
        .replace("[relay]", "primary_target = \"tcp:127.0.0.1:1\"\n[relay]");
    std::fs::write(bed.path("pair.toml"), cfg).unwrap();
    bed.secondary(secondary_in_colo());

    let out = bed
        .run(&["failover", "--survivor", "secondary", "--json"])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        bed.sent(),
        vec![
            expect("secondary", "query-colo-status", Value::Null),
            expect(
                "secondary",
                "exec-oob:yank",
                json!({"instances": [{"type": "migration"}]})
            ),
            expect("secondary", "nbd-server-stop", Value::Null),
            expect("secondary", "x-colo-lost-heartbeat", Value::Null),
            expect("secondary", "object-del", json!({"id": "f2"})),
            expect("secondary", "object-del", json!({"id": "f1"})),
            expect("secondary", "chardev-remove", json!({"id": "red1"})),
            expect("secondary", "chardev-remove", json!({"id": "red0"})),
            expect(
                "secondary",
                "announce-self",
                json!({"initial": 50, "max": 550, "rounds": 5, "step": 100})
            ),
            expect("secondary", "query-status", Value::Null),
        ]
    );
    assert_eq!(
        std::fs::read_to_string(&hook_out).unwrap(),
        "t1 secondary\n"
    );
    let report = stdout_json(&out);
    assert_eq!(report["survivor"], "secondary");
    assert_eq!(report["already_done"], false);
    assert_eq!(report["runstate"], "running");
    let steps = report["steps"].as_array().unwrap();
    let what: Vec<&str> = steps.iter().map(|s| s["what"].as_str().unwrap()).collect();
    let hook = what.iter().position(|w| w.starts_with("hook")).unwrap();
    let announce = what.iter().position(|w| *w == "announce-self").unwrap();
    assert!(
        hook < announce,
        "the tap must be bridged before announcing: {what:?}"
    );
    // The relay is configured but not running: best effort, noted, not fatal.
    let relay = steps.last().unwrap();
    assert!(
        relay["what"].as_str().unwrap().starts_with("notify relay"),
        "{relay}"
    );
    assert_eq!(relay["outcome"], "failed");
    assert!(steps.iter().all(|s| s["ms"].as_f64().is_some()));
}

#[tokio::test]
async fn failover_to_primary_sends_the_documented_sequence_and_notifies_the_relay() {
    let bed = Bed::new();
    let control = bed.path("relay.sock");
    bed.config(&format!(
        "primary_target = \"tcp:127.0.0.1:1\"\n[relay]\nlisten = \"tcp:127.0.0.1:1\"\ncontrol = \"{}\"",
        control.display()
    ));
    let hub = colo_control::hub::ControlHub::new(UnixListener::bind(&control).unwrap());
    let mut subscriber = colo_control::client::Subscriber::connect(&control, "test", false)
        .await
        .unwrap();
    let mut failed_over = false;
    bed.primary(Box::new(move |cmd, _| match cmd {
        "query-colo-status" if failed_over => colo_status("none", "primary", "request"),
        "query-colo-status" => colo_status("primary", "none", "none"),
        "x-colo-lost-heartbeat" => {
            failed_over = true;
            Answer::ok()
        }
        "human-monitor-command" => Answer::ret(json!("")),
        "query-status" => running(),
        // The replication child's NBD node, as QEMU names a drive_add'ed
        // replication driver's file child.
        "query-yank" => Answer::ret(json!([
            {"type": "migration"},
            {"type": "block-node", "node-name": "#block412"},
            {"type": "chardev", "id": "compare0"},
        ])),
        _ => Answer::ok(),
    }));

    let out = bed.run(&["failover", "--survivor", "primary"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let mut want = vec![
        expect("primary", "query-colo-status", Value::Null),
        expect(
            "primary",
            "exec-oob:yank",
            json!({"instances": [{"type": "migration"}]}),
        ),
        // A hung secondary must not hang the child's removal: its requests
        // are failed first.
        expect("primary", "exec-oob:query-yank", Value::Null),
        expect(
            "primary",
            "exec-oob:yank",
            json!({"instances": [{"type": "block-node", "node-name": "#block412"}]}),
        ),
        expect(
            "primary",
            "x-blockdev-change",
            json!({"parent": "colo-disk0", "child": "children.1"}),
        ),
        expect(
            "primary",
            "human-monitor-command",
            json!({"command-line": "drive_del replication0"}),
        ),
    ];
    for id in ["comp0", "iothread1", "m0", "redire0", "redire1"] {
        want.push(expect("primary", "object-del", json!({"id": id})));
    }
    want.push(expect("primary", "x-colo-lost-heartbeat", Value::Null));
    want.push(expect("primary", "query-status", Value::Null));
    assert_eq!(bed.sent(), want);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("failover to the primary done"), "{text}");
    // Progress (each step) went to stderr.
    assert!(
        stderr(&out).contains("primary: object-del comp0"),
        "{}",
        stderr(&out)
    );
    let ev = subscriber
        .next_event_timeout(Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev.event, colo_control::EventKind::Failover);
    assert_eq!(ev.survivor, Some(colo_types::Role::Primary));
    hub.shutdown().await;
}

#[tokio::test]
async fn failover_already_done_succeeds_and_only_tidies_up() {
    let bed = Bed::new();
    bed.config("");
    bed.secondary(Box::new(|cmd, args| match cmd {
        "query-colo-status" => colo_status("none", "secondary", "request"),
        "nbd-server-stop" => Answer::generic_error("NBD server not running"),
        "object-del" => Answer::generic_error(format!(
            "object '{}' not found",
            args["id"].as_str().unwrap()
        )),
        "chardev-remove" => Answer::generic_error(format!(
            "Chardev '{}' not found",
            args["id"].as_str().unwrap()
        )),
        "query-status" => running(),
        other => panic!("unexpected {other} on an already failed-over secondary"),
    }));
    let out = bed
        .run(&["failover", "--survivor", "secondary", "--json"])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report = stdout_json(&out);
    assert_eq!(report["already_done"], true);
    let cmds: Vec<String> = bed.sent().into_iter().map(|(_, c, _)| c).collect();
    assert!(
        !cmds
            .iter()
            .any(|c| c.contains("yank") || c == "x-colo-lost-heartbeat" || c == "announce-self"),
        "{cmds:?}"
    );
}

#[tokio::test]
async fn failover_refuses_a_side_that_is_not_in_colo_and_changes_nothing() {
    let bed = Bed::new();
    bed.config("");
    bed.secondary(Box::new(|cmd, _| match cmd {
        "query-colo-status" => colo_status("none", "none", "none"),
        other => panic!("sent {other} although the precondition failed"),
    }));
    let out = bed
        .run(&["failover", "--survivor", "secondary", "--json"])
        .await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("not in COLO"), "{}", stderr(&out));
    assert_eq!(stdout_json(&out)["exit_code"], 3);
    assert_eq!(
        bed.sent(),
        vec![expect("secondary", "query-colo-status", Value::Null)]
    );
}

#[tokio::test]
async fn failover_with_qemu_refusing_a_step_exits_one() {
    let bed = Bed::new();
    bed.config("");
    bed.secondary(Box::new(|cmd, _| match cmd {
        "query-colo-status" => colo_status("secondary", "none", "none"),
        "x-colo-lost-heartbeat" => Answer::generic_error("something unexpected"),
        _ => Answer::ok(),
    }));
    let out = bed.run(&["failover", "--survivor", "secondary"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("x-colo-lost-heartbeat"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn start_prepares_both_sides_in_order_and_waits_for_colo() {
    start_sequence("", None).await;
}

/// With `[tls]`, `start` also names the primary's TLS credentials and the secondary host's
/// name before it migrates (to the relay, which terminates TLS), and on the stock stack's
/// disk the secondary's NBD server requires TLS with the authz `qemu-args` gave it while the
/// replication child connects with the primary's credentials, checking the secondary's name.
#[tokio::test]
async fn with_tls_start_sets_the_migrations_tls_credentials_and_hostname() {
    start_sequence(
        r#"primary_target = "unix:{d}/relay-in.sock"
        [relay]
        listen = "unix:{d}/relay-in.sock"
        control = "{d}/relay.sock"
        [tls]
        primary_dir = "/etc/colo/pki-a"
        primary_name = "hosta"
        secondary_dir = "/etc/colo/pki-b"
        secondary_name = "hostb"
        "#,
        Some(json!({"tls-creds": "colo-tls0", "tls-hostname": "hostb"})),
    )
    .await;
}

/// `start` against fake QEMUs with the `[migration]` keys and sections of `extra` (`{d}`: the
/// bed's directory): the exact command sequence, with `tls` (the TLS parameters) set after the
/// checkpoint delay when given.
async fn start_sequence(extra: &str, tls: Option<Value>) {
    let bed = Bed::new();
    let extra = extra.replace("{d}", &bed.dir.path().display().to_string());
    bed.config(&format!("checkpoint_delay_ms = 1500\n{extra}"));
    let target = if extra.is_empty() {
        format!("unix:{}", bed.path("incoming.sock").display())
    } else {
        format!("unix:{}", bed.path("relay-in.sock").display())
    };
    let migrated = Arc::new(AtomicBool::new(false));
    let listening = Arc::new(AtomicBool::new(false));

    let m = migrated.clone();
    let mut polls = 0;
    bed.primary(Box::new(move |cmd, _| {
        let in_colo = m.load(Ordering::SeqCst);
        match cmd {
            "query-colo-status" if in_colo => colo_status("primary", "none", "none"),
            "query-colo-status" => colo_status("none", "none", "none"),
            "query-migrate" if !in_colo => Answer::ok(),
            "query-migrate" => {
                polls += 1;
                if polls == 1 {
                    Answer::ret(json!({"status": "active", "ram": {"total": 200, "remaining": 126}}))
                } else {
                    Answer::ret(json!({"status": "colo"}))
                }
            }
            "query-status" if in_colo => running(),
            "query-status" => Answer::ret(json!({"running": false, "status": "prelaunch"})),
            "query-chardev" => Answer::ret(json!([
                {"label": "mirror0", "filename": "tcp:127.0.0.1:9003,server=on<->127.0.0.1:40000", "frontend-open": true},
                {"label": "compare1", "filename": "tcp:127.0.0.1:9004,server=on<->127.0.0.1:40001", "frontend-open": true},
                {"label": "compare0", "filename": "tcp:127.0.0.1:9001,server=on<->127.0.0.1:40002", "frontend-open": true}
            ])),
            "query-named-block-nodes" => Answer::ret(json!([{"node-name": "#block123"}])),
            "human-monitor-command" => Answer::ret(json!("")),
            "query-migrate-capabilities" => Answer::ret(json!([
                {"capability": "x-colo", "state": false},
                {"capability": "return-path", "state": false}
            ])),
            "migrate" => {
                m.store(true, Ordering::SeqCst);
                Answer::ok()
            }
            _ => Answer::ok(),
        }
    }));
    let (m, l) = (migrated.clone(), listening.clone());
    bed.secondary(Box::new(move |cmd, _| {
        let in_colo = m.load(Ordering::SeqCst);
        match cmd {
            "query-colo-status" if in_colo => colo_status("secondary", "none", "none"),
            "query-colo-status" => colo_status("none", "none", "none"),
            "query-status" if in_colo => running(),
            "query-status" => Answer::ret(json!({"running": false, "status": "inmigrate"})),
            "query-migrate" if l.load(Ordering::SeqCst) => Answer::ret(json!({"status": "setup"})),
            "query-migrate" => Answer::ok(),
            "query-migrate-capabilities" => {
                Answer::ret(json!([{"capability": "x-colo", "state": false}]))
            }
            "migrate-incoming" => {
                l.store(true, Ordering::SeqCst);
                Answer::ok()
            }
            _ => Answer::ok(),
        }
    }));

    let started = Instant::now();
    let out = bed.run(&["start", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(10));
    let incoming = format!("unix:{}", bed.path("incoming.sock").display());
    let mut nbd_server_start =
        json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "9999"}}});
    let mut child_tls = "";
    if tls.is_some() {
        nbd_server_start["tls-creds"] = json!("colo-tls-server0");
        nbd_server_start["tls-authz"] = json!("colo-tls-peer0");
        child_tls = ",file.tls-creds=colo-tls0,file.tls-hostname=hostb";
    }
    assert_eq!(
        bed.sent(),
        vec![
            // Preconditions, read-only.
            expect("primary", "query-colo-status", Value::Null),
            expect("primary", "query-migrate", Value::Null),
            expect("primary", "query-status", Value::Null),
            expect("secondary", "query-colo-status", Value::Null),
            expect("secondary", "query-status", Value::Null),
            expect("secondary", "query-migrate", Value::Null),
            expect("secondary", "query-migrate-capabilities", Value::Null),
            expect("primary", "query-chardev", Value::Null),
            // The secondary.
            expect(
                "secondary",
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "x-colo", "state": true}]})
            ),
            expect("secondary", "nbd-server-start", nbd_server_start),
            expect(
                "secondary",
                "nbd-server-add",
                json!({"device": "parent0", "writable": true})
            ),
            expect("secondary", "migrate-incoming", json!({"uri": incoming})),
            // The primary.
            expect("primary", "query-named-block-nodes", json!({"flat": true})),
            expect(
                "primary",
                "human-monitor-command",
                json!({"command-line": format!(
                    "drive_add -n buddy driver=replication,mode=primary,file.driver=nbd,\
                     file.host=127.0.0.1,file.port=9999,file.export=parent0,\
                     node-name=replication0{child_tls}"
                )})
            ),
            expect(
                "primary",
                "x-blockdev-change",
                json!({"parent": "colo-disk0", "node": "replication0"})
            ),
            expect("primary", "query-migrate-capabilities", Value::Null),
            expect(
                "primary",
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "x-colo", "state": true}]})
            ),
            expect(
                "primary",
                "migrate-set-parameters",
                json!({"x-checkpoint-delay": 1500})
            ),
        ]
        .into_iter()
        .chain(tls.map(|t| expect("primary", "migrate-set-parameters", t)))
        .chain([
            expect("primary", "migrate", json!({"uri": target})),
            // Waiting for COLO.
            expect("primary", "query-migrate", Value::Null),
            expect("primary", "query-migrate", Value::Null),
            expect("primary", "query-status", Value::Null),
            expect("secondary", "query-status", Value::Null),
            expect("primary", "query-colo-status", Value::Null),
            expect("secondary", "query-colo-status", Value::Null),
        ])
        .collect::<Vec<_>>()
    );
    let err = stderr(&out);
    for line in [
        "secondary prepared",
        "replication child added",
        "migrating… 37%",
        "entered COLO in",
    ] {
        assert!(err.contains(line), "progress lacks {line:?}: {err}");
    }
    let report = stdout_json(&out);
    assert_eq!(report["already_in_colo"], false);
    assert_eq!(report["checkpoint_delay_ms"], 1500);
    assert!(report["entered_colo_ms"].as_f64().is_some());
}

#[tokio::test]
async fn start_refuses_a_secondary_that_is_not_waiting_for_a_migration() {
    let bed = Bed::new();
    bed.config("");
    bed.primary(Box::new(|cmd, _| match cmd {
        "query-colo-status" => colo_status("none", "none", "none"),
        "query-migrate" => Answer::ok(),
        "query-status" => Answer::ret(json!({"running": false, "status": "prelaunch"})),
        other => panic!("sent {other} to the primary although the secondary is wrong"),
    }));
    bed.secondary(Box::new(|cmd, _| match cmd {
        "query-colo-status" => colo_status("none", "none", "none"),
        "query-status" => running(),
        other => panic!("sent {other} to the secondary although it is wrong"),
    }));
    let out = bed.run(&["start"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("inmigrate"), "{}", stderr(&out));
}

#[tokio::test]
async fn checkpoint_resets_the_current_delay_notes_the_reason_and_reports_the_pause() {
    let bed = Bed::new();
    let control = bed.path("relay.sock");
    bed.config(&format!(
        "primary_target = \"tcp:127.0.0.1:1\"\n[relay]\nlisten = \"tcp:127.0.0.1:1\"\ncontrol = \"{}\"",
        control.display()
    ));
    let hub = colo_control::hub::ControlHub::new(UnixListener::bind(&control).unwrap());
    bed.primary(Box::new(|cmd, _| match cmd {
        "query-migrate" => Answer::ret(json!({"status": "colo"})),
        // The delay the operator set by hand, not the config's default 2000.
        "query-migrate-parameters" => {
            Answer::ret(json!({"x-checkpoint-delay": 1500, "max-bandwidth": 1}))
        }
        // A RESUME of an earlier checkpoint first: it must be skipped.
        "migrate-set-parameters" => Answer::ok().then_events([
            event("RESUME", 99, 0, None),
            event("STOP", 100, 100, None),
            event("RESUME", 100, 12_600, None),
        ]),
        other => panic!("unexpected {other}"),
    }));
    let out = bed.run(&["checkpoint", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        bed.sent(),
        vec![
            expect("primary", "query-migrate", Value::Null),
            expect("primary", "query-migrate-parameters", Value::Null),
            expect(
                "primary",
                "migrate-set-parameters",
                json!({"x-checkpoint-delay": 1500})
            ),
        ]
    );
    let report = stdout_json(&out);
    assert_eq!(report["pause_ms"], 12.5);
    assert_eq!(report["checkpoint_delay_ms"], 1500);
    assert_eq!(report["relay"]["epoch"], 0);
    let status = hub.status();
    assert_eq!(status.last_request_reason.as_deref(), Some("operator"));
    assert_eq!(status.requests_by_reason.get("operator"), Some(&1));
    hub.shutdown().await;
}

#[tokio::test]
async fn checkpoint_outside_colo_is_refused() {
    let bed = Bed::new();
    bed.config("");
    bed.primary(Box::new(|cmd, _| match cmd {
        "query-migrate" => Answer::ret(json!({"status": "completed"})),
        other => panic!("unexpected {other}"),
    }));
    let out = bed.run(&["checkpoint"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
}

#[tokio::test]
async fn status_json_reports_both_sides_and_an_unreachable_relay() {
    let bed = Bed::new();
    bed.config(&format!(
        "primary_target = \"tcp:127.0.0.1:1\"\n[relay]\nlisten = \"tcp:127.0.0.1:1\"\ncontrol = \"{}\"",
        bed.path("gone.sock").display()
    ));
    bed.primary(Box::new(|cmd, _| match cmd {
        "query-status" => running(),
        "query-colo-status" => colo_status("primary", "none", "none"),
        "query-migrate" => Answer::ret(json!({"status": "colo"})),
        "query-migrate-parameters" => Answer::ret(json!({"x-checkpoint-delay": 2000})),
        other => panic!("unexpected {other}"),
    }));
    bed.secondary(Box::new(|cmd, _| match cmd {
        "query-status" => Answer::ret(json!({"running": false, "status": "colo"})),
        "query-colo-status" => colo_status("secondary", "none", "none"),
        "query-migrate" => Answer::ret(json!({"status": "colo"})),
        other => panic!("unexpected {other}"),
    }));
    let out = bed.run(&["status", "--json"]).await;
    // Everything but the relay answered: exit 4, full report anyway.
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let st = stdout_json(&out);
    assert_eq!(st["name"], "t1");
    assert_eq!(st["primary"]["colo_mode"], "primary");
    assert_eq!(st["primary"]["runstate"], "running");
    assert_eq!(st["primary"]["migration_status"], "colo");
    assert_eq!(st["primary"]["checkpoint_delay_ms"], 2000);
    assert_eq!(st["primary"]["qemu_version"], "10.0.2");
    assert_eq!(st["secondary"]["colo_mode"], "secondary");
    assert_eq!(st["secondary"]["runstate"], "colo");
    assert_eq!(st["secondary"]["reachable"], true);
    assert_eq!(st["relay"]["reachable"], false);
    assert!(st["relay"]["error"].as_str().unwrap().contains("gone.sock"));
    // The bed's directory is 0700: no QEMU socket is open to other users.
    assert_eq!(st["open_sockets"], json!([]));
    // Human form: a table with both sides.
    let out = bed.run(&["status"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("colo mode") && text.contains("secondary") && text.contains("UNREACHABLE"),
        "{text}"
    );
    assert!(!text.contains("warning:"), "{text}");
    // A QEMU started with umask 000 in a directory others can enter: its monitor is open to
    // every local user, and status says so with the fix.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    mode(bed.dir.path(), 0o755);
    mode(&bed.path("p.qmp"), 0o777);
    let out = bed.run(&["status", "--json"]).await;
    let st = stdout_json(&out);
    assert_eq!(st["open_sockets"][0]["key"], "primary.qmp", "{st}");
    assert_eq!(st["open_sockets"][0]["mode"], 0o777);
    assert_eq!(st["open_sockets"].as_array().unwrap().len(), 1, "{st}");
    let out = bed.run(&["status"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("warning: primary.qmp") && text.contains("umask 077"),
        "{text}"
    );
}

#[tokio::test]
async fn stop_runs_the_primary_sequence_without_yank_then_quits_the_secondary() {
    let bed = Bed::new();
    bed.config("");
    let mut done = false;
    bed.primary(Box::new(move |cmd, _| match cmd {
        "query-colo-status" if done => colo_status("none", "primary", "request"),
        "query-colo-status" => colo_status("primary", "none", "none"),
        "x-colo-lost-heartbeat" => {
            done = true;
            Answer::ok()
        }
        "human-monitor-command" => Answer::ret(json!("")),
        "query-status" => running(),
        _ => Answer::ok(),
    }));
    bed.secondary(Box::new(|cmd, _| match cmd {
        "query-colo-status" => colo_status("secondary", "none", "none"),
        "query-status" => running(),
        "quit" => Answer::ok(),
        other => panic!("unexpected {other}"),
    }));
    let out = bed.run(&["stop", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let sent = bed.sent();
    assert!(!sent.iter().any(|(_, c, _)| c.contains("yank")), "{sent:?}");
    let last = sent.last().unwrap();
    assert_eq!((last.0.as_str(), last.1.as_str()), ("secondary", "quit"));
    let lost = sent
        .iter()
        .position(|(s, c, _)| s == "primary" && c == "x-colo-lost-heartbeat")
        .unwrap();
    let comp = sent
        .iter()
        .position(|(_, _, a)| a["id"] == "comp0")
        .unwrap();
    assert!(comp < lost);
    assert_eq!(stdout_json(&out)["secondary"], "quit");
}

#[tokio::test]
async fn start_waits_for_a_migration_already_under_way_without_touching_anything() {
    let bed = Bed::new();
    bed.config("");
    let mut polls = 0;
    bed.primary(Box::new(move |cmd, _| match cmd {
        "query-colo-status" if polls >= 2 => colo_status("primary", "none", "none"),
        "query-colo-status" => colo_status("none", "none", "none"),
        "query-migrate" => {
            polls += 1;
            if polls <= 2 {
                Answer::ret(json!({"status": "active"}))
            } else {
                Answer::ret(json!({"status": "colo"}))
            }
        }
        "query-status" => running(),
        other => panic!("unexpected {other} while a migration is under way"),
    }));
    bed.secondary(Box::new(|cmd, _| match cmd {
        "query-status" => running(),
        "query-colo-status" => colo_status("secondary", "none", "none"),
        other => panic!("unexpected {other} while a migration is under way"),
    }));
    let out = bed.run(&["start", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report = stdout_json(&out);
    assert_eq!(report["entered_colo_ms"], Value::Null);
    let cmds: Vec<String> = bed
        .sent()
        .into_iter()
        .map(|(s, c, _)| format!("{s} {c}"))
        .collect();
    assert_eq!(
        cmds,
        [
            "primary query-colo-status",
            "primary query-migrate",
            "primary query-migrate",
            "primary query-migrate",
            "primary query-status",
            "secondary query-status",
            "primary query-colo-status",
            "secondary query-colo-status",
        ]
    );
}

#[tokio::test]
async fn relay_takes_its_settings_from_the_config_and_stops_on_sigterm() {
    let bed = Bed::new();
    let control = bed.path("relay.sock");
    bed.config(&format!(
        "primary_target = \"unix:{}\"\n[relay]\nlisten = \"unix:{}\"\ncontrol = \"{}\"\nack_timeout_ms = 750",
        bed.path("relay-in.sock").display(),
        bed.path("relay-in.sock").display(),
        control.display()
    ));
    let mut relay = Command::new(env!("CARGO_BIN_EXE_qmp-driver"))
        .arg("--config")
        .arg(bed.path("pair.toml"))
        .arg("relay")
        .env_remove("COLO_CONFIG")
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Ok(s) = colo_control::client::query_status(&control).await {
            break s;
        }
        assert!(Instant::now() < deadline, "the relay did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.state, colo_control::RelayState::Waiting);
    assert!(bed.path("relay-in.sock").exists());
    let pid = relay.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let exit = tokio::time::timeout(Duration::from_secs(10), relay.wait())
        .await
        .expect("the relay did not stop on SIGTERM")
        .unwrap();
    assert_eq!(exit.code(), Some(0));
    assert!(
        !control.exists(),
        "the relay left its control socket behind"
    );

    // Without a [relay] section and without options: a usage error naming it.
    bed.config("");
    let out = bed.run(&["relay"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("[relay]"), "{}", stderr(&out));
}

/// `qmp-driver --config FILE relay` with `[tls]`: the relay loads the secondary host's
/// identity and terminates migration TLS, so a plaintext migration connection is refused and
/// counted; the primary host's certificate gets through the handshake.
#[tokio::test]
async fn with_tls_in_the_config_the_relay_refuses_a_plaintext_migration() {
    use colo_tls::pki::{Validity, create_pair};
    use colo_tls::{DEFAULT_HANDSHAKE_TIMEOUT, HostIdentity, PeerConnector};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let bed = Bed::new();
    let pki = bed.path("pki");
    let pair = create_pair(
        &pki,
        &["hosta".to_string(), "hostb".to_string()],
        Validity::days(1),
    )
    .unwrap();
    let control = bed.path("relay.sock");
    let listen = bed.path("relay-in.sock");
    bed.config(&format!(
        "primary_target = \"unix:{l}\"\n[relay]\nlisten = \"unix:{l}\"\ncontrol = \"{c}\"\n\
         [tls]\nprimary_dir = \"{a}\"\nprimary_name = \"hosta\"\n\
         secondary_dir = \"{b}\"\nsecondary_name = \"hostb\"\n",
        l = listen.display(),
        c = control.display(),
        a = pair.host_dirs[0].display(),
        b = pair.host_dirs[1].display(),
    ));
    let mut relay = Command::new(env!("CARGO_BIN_EXE_qmp-driver"))
        .arg("--config")
        .arg(bed.path("pair.toml"))
        .arg("relay")
        .env_remove("COLO_CONFIG")
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while colo_control::client::query_status(&control).await.is_err() {
        assert!(Instant::now() < deadline, "the relay did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut plain = tokio::net::UnixStream::connect(&listen).await.unwrap();
    plain.write_all(b"QEVM").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut buf))
        .await
        .expect("the relay closes a plaintext connection");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = colo_control::client::query_status(&control).await.unwrap();
        if st.refused_migration_channels == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "not refused: {st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The primary host's identity is accepted (the session then waits for its magic).
    let hosta = HostIdentity::load(&pair.host_dirs[0]).unwrap();
    let tls = PeerConnector::new(&hosta, "hostb", DEFAULT_HANDSHAKE_TIMEOUT).unwrap();
    let io = tokio::net::UnixStream::connect(&listen).await.unwrap();
    let (_session, peer) = tls.connect(io).await.expect("handshake with the relay");
    assert_eq!(peer, "hostb");
    relay.start_kill().unwrap();
    let _ = relay.wait().await;
}

/// A primary in COLO until `x-colo-lost-heartbeat`; `status` answers `query-status` while in
/// COLO (the count of earlier answers is given).
fn primary_in_colo(mut status: impl FnMut(usize) -> Answer + Send + 'static) -> Script {
    let mut failed_over = false;
    let mut probes = 0;
    Box::new(move |cmd, _| match cmd {
        "query-colo-status" if failed_over => colo_status("none", "primary", "request"),
        "query-colo-status" => colo_status("primary", "none", "none"),
        "x-colo-lost-heartbeat" => {
            failed_over = true;
            Answer::ok()
        }
        "query-status" if failed_over => running(),
        "query-status" => {
            probes += 1;
            status(probes - 1)
        }
        "query-yank" => Answer::ret(json!([{"type": "migration"}])),
        "human-monitor-command" => Answer::ret(json!("")),
        _ => Answer::ok(),
    })
}

/// Stops the agent with SIGTERM; its exit status and stderr.
async fn stop_agent(agent: tokio::process::Child) -> (Option<i32>, String) {
    let pid = agent.id().unwrap().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let out = tokio::time::timeout(Duration::from_secs(10), agent.wait_with_output())
        .await
        .expect("the agent ignores SIGTERM")
        .unwrap();
    (out.status.code(), stderr(&out))
}

fn position(sent: &[(String, String, Value)], cmd: &str) -> usize {
    sent.iter()
        .position(|(_, c, _)| c == cmd)
        .unwrap_or_else(|| panic!("{cmd} not sent: {sent:?}"))
}

#[tokio::test]
async fn watch_fails_over_to_the_primary_on_colo_exit() {
    let bed = Bed::new();
    bed.config("");
    // The third probe's answer is followed by QEMU's COLO_EXIT (the stream broke).
    bed.primary_watch(primary_in_colo(|n| {
        let answer = Answer::ret(json!({"running": true, "status": "running"}));
        if n == 2 {
            answer.then_events([event(
                "COLO_EXIT",
                1,
                0,
                Some(json!({"mode": "primary", "reason": "error"})),
            )])
        } else {
            answer
        }
    }));
    let agent = bed.spawn(&["watch", "--probe-ms", "20", "--no-relay"]);
    bed.wait_sent("x-colo-lost-heartbeat").await;
    bed.wait_sent("query-status").await;
    let (code, err) = stop_agent(agent).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("colo-exit"), "{err}");
    assert!(err.contains("failover to the primary done"), "{err}");
    let sent = bed.sent();
    // Let go of the dead peer first, then the documented sequence.
    let yank = position(&sent, "exec-oob:yank");
    assert!(yank < position(&sent, "x-blockdev-change"), "{sent:?}");
    assert!(
        position(&sent, "x-blockdev-change") < position(&sent, "x-colo-lost-heartbeat"),
        "{sent:?}"
    );
    // Nothing went to the operator's monitor: the agent has its own.
    assert!(
        !bed.path("p.qmp").exists(),
        "the operator's monitor was never served"
    );
}

#[tokio::test]
async fn watch_fails_over_when_a_checkpoint_keeps_the_primary_stopped() {
    let bed = Bed::new();
    bed.config("");
    // From the second probe on, the primary is stopped for a checkpoint that never ends.
    bed.primary_watch(primary_in_colo(|n| {
        let status = if n == 0 { "running" } else { "colo" };
        Answer::ret(json!({"running": n == 0, "status": status}))
    }));
    let agent = bed.spawn(&[
        "watch",
        "--probe-ms",
        "20",
        "--stall-ms",
        "300",
        "--no-relay",
        "--no-hook",
    ]);
    bed.wait_sent("x-colo-lost-heartbeat").await;
    let (code, err) = stop_agent(agent).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("checkpoint-stalled"), "{err}");
    let sent = bed.sent();
    let probes = sent.iter().filter(|(_, c, _)| c == "query-status").count();
    assert!(
        probes >= 3,
        "the stall was seen over several probes: {sent:?}"
    );
}

#[tokio::test]
async fn watch_yanks_and_fails_over_when_the_primary_monitor_hangs() {
    let bed = Bed::new();
    bed.config("");
    // The second query-status is never answered (the big lock is held on a dead peer).
    bed.primary_watch(primary_in_colo(|n| {
        if n == 1 { Answer::nothing() } else { running() }
    }));
    let agent = bed.spawn(&[
        "watch",
        "--probe-ms",
        "20",
        "--stall-ms",
        "300",
        "--no-relay",
        "--no-hook",
        "--metrics",
        "127.0.0.1:0",
    ]);
    bed.wait_sent("x-colo-lost-heartbeat").await;
    let (code, err) = stop_agent(agent).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("monitor-hung"), "{err}");
    let sent = bed.sent();
    assert_eq!(
        sent[position(&sent, "exec-oob:yank")].2,
        json!({"instances": [{"type": "migration"}]})
    );
}

#[tokio::test]
async fn watch_without_its_own_monitor_is_a_config_error() {
    let bed = Bed::new();
    let config = bed.config("");
    let text = std::fs::read_to_string(&config).unwrap();
    let without: String = text
        .lines()
        .filter(|l| !l.contains("watch_qmp"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&config, without).unwrap();
    let out = bed.run(&["watch"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("primary.watch_qmp"),
        "{}",
        stderr(&out)
    );
}
