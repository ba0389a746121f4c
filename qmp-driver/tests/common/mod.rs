//! What the pair-command tests share: fake QEMUs (colo-testkit's `FakeMonitor`, one scripted
//! monitor per side that answers from a state machine) that log every command into one list,
//! so a test pins the exact QMP sequence across both sides, and the `qmp-driver` binary run
//! against them. Each test file adds its own config and scripts.

#![allow(dead_code)]

use colo_testkit::fake_qmp::{Answer, FakeMonitor};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::process::Command;

/// A fake QEMU's answers, by command name and arguments.
pub type Script = Box<dyn FnMut(&str, &Value) -> Answer + Send>;

/// `(side, command, arguments)`; out-of-band commands are `exec-oob:NAME`.
pub type Log = Arc<Mutex<Vec<(String, String, Value)>>>;

/// Serves QMP on `path` from `script`, logging every command with `side` in `log`, which both
/// sides share so that it keeps the order across them.
pub fn fake_qemu(path: &Path, side: &'static str, log: Log, mut script: Script) {
    FakeMonitor::serve_unix(path, &["oob"], move |cmd| {
        let logged = if cmd.oob {
            format!("exec-oob:{}", cmd.name)
        } else {
            cmd.name.clone()
        };
        log.lock()
            .unwrap()
            .push((side.to_string(), logged, cmd.args.clone()));
        script(&cmd.name, &cmd.args)
    });
}

/// A private directory for the pair's config and sockets, and the shared command log.
pub struct Bed {
    pub dir: tempfile::TempDir,
    pub log: Log,
}

impl Bed {
    pub fn new() -> Bed {
        Bed {
            dir: tempfile::tempdir().unwrap(),
            log: Arc::default(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The primary's monitor, at `p.qmp`.
    pub fn primary(&self, script: Script) {
        fake_qemu(&self.path("p.qmp"), "primary", self.log.clone(), script);
    }

    /// The secondary's monitor, at `s.qmp`.
    pub fn secondary(&self, script: Script) {
        fake_qemu(&self.path("s.qmp"), "secondary", self.log.clone(), script);
    }

    /// Every command sent so far, both sides in order.
    pub fn sent(&self) -> Vec<(String, String, Value)> {
        self.log.lock().unwrap().clone()
    }

    /// Runs `qmp-driver --config pair.toml ARGS` to its end, within `limit`.
    pub async fn run_within(&self, args: &[&str], limit: Duration) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_qmp-driver"))
            .arg("--config")
            .arg(self.path("pair.toml"))
            .args(args)
            .env_remove("COLO_CONFIG")
            .kill_on_drop(true)
            .output();
        tokio::time::timeout(limit, out)
            .await
            .expect("qmp-driver hung")
            .expect("run qmp-driver")
    }
}

/// What the command printed on stderr.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
