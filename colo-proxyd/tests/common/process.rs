//! The real `colo-proxyd` binary as a child process of a test, its log collected, and small
//! helpers around it (a free port, one metric's value).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{PATIENCE, scrape};

/// A free TCP port on the loopback (bound and released: the daemon binds it a moment later).
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// A `colo-proxyd` process; its log lines are collected (and echoed to the test's stderr).
pub struct Daemon {
    name: &'static str,
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    pub fn spawn(name: &'static str, args: &[String]) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_colo-proxyd"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                eprintln!("[{name}] {line}");
                sink.lock().unwrap().push(line);
            }
        });
        Daemon { name, child, logs }
    }

    /// The first log line containing every one of `needles`; panics when none came in time.
    pub async fn wait_line(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let found = self
                .logs
                .lock()
                .unwrap()
                .iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .cloned();
            if let Some(line) = found {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "the {} never logged {needles:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The count in the metrics line starting with `name ` (0 when absent).
pub async fn metric(addr: &str, name: &str) -> u64 {
    scrape(addr)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

impl Daemon {
    /// How many log lines so far contain every one of `needles`.
    pub fn count_lines(&self, needles: &[&str]) -> usize {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }
}
