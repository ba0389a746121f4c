//! The primary QEMU's QMP monitor, for the checkpoint requests: colo-testkit's scripted
//! [`FakeMonitor`] with a primary in COLO.

use std::path::Path;
use std::time::Duration;

use colo_testkit::fake_qmp::{Answer, FakeMonitor};
use serde_json::{Value, json};

/// The primary's `x-checkpoint-delay` (ms).
pub const DELAY_MS: u64 = 2000;

/// A primary in COLO: `query-migrate` says `colo`, `query-migrate-parameters` has
/// `x-checkpoint-delay` = [`DELAY_MS`], everything else returns `{}`.
pub fn fake_primary(path: &Path) -> FakeMonitor {
    FakeMonitor::serve_unix(path, &[], |cmd| match cmd.name.as_str() {
        "query-migrate" => Answer::ret(json!({"status": "colo"})),
        "query-migrate-parameters" => {
            Answer::ret(json!({"x-checkpoint-delay": DELAY_MS, "max-bandwidth": 1}))
        }
        _ => Answer::ok(),
    })
}

/// The arguments of the next checkpoint request (`migrate-set-parameters`) the primary got,
/// or `None` within `within`.
pub async fn next_request(primary: &mut FakeMonitor, within: Duration) -> Option<Value> {
    let cmd = primary.recv_named("migrate-set-parameters", within).await?;
    Some(cmd.args)
}
