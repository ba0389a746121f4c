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
