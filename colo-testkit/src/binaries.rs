//! The workspace's own binaries a test runs as child processes (colo-blockd, colo-proxyd):
//! built next to the test executable by the workspace's test run, or named by an environment
//! variable. A test that cannot find one fails with what to do; it never skips.

use std::path::PathBuf;

/// The binary `name` of this build: `$env` when set, else the file next to the test's `deps`
/// directory (`target/<profile>/name`).
pub fn workspace_binary(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable");
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join(name))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{name} is not built (looked at {candidates:?}): run `cargo build -p {name}` or \
                 the workspace's tests, or set {env}"
            )
        })
}

/// `colo-blockd serve --export NAME=IMAGE --tcp 127.0.0.1:PORT` of this build, on a free port,
/// once it accepts connections; killed on drop. Its output goes to `log`.
#[derive(Debug)]
pub struct BlockdServe {
    child: std::process::Child,
    /// The TCP port it serves on.
    pub port: u16,
}

impl BlockdServe {
    /// Starts it; panics (with what is missing) when it cannot.
    pub fn start(export: &str, image: &std::path::Path, log: &std::path::Path) -> BlockdServe {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let out = std::fs::File::create(log).expect("log file");
        let child = std::process::Command::new(workspace_binary("colo-blockd", "COLO_BLOCKD"))
            .args(["serve", "--export"])
            .arg(format!("{export}={}", image.display()))
            .args(["--tcp", &format!("127.0.0.1:{port}")])
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("start colo-blockd serve");
        let mut serve = BlockdServe { child, port };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = serve.child.try_wait() {
                panic!("colo-blockd serve exited ({status}); see {}", log.display());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "colo-blockd serve did not listen within 10 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        serve
    }

    /// Kills it now.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BlockdServe {
    fn drop(&mut self) {
        self.stop();
    }
}
