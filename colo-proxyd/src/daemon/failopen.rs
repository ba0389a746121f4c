//! The fail-open check. A QEMU `filter-redirector` whose output chardev has no client must
//! not pass the PVM's packets to the network uncompared (QEMU 10.0.2 drops them: the write
//! fails with EIO), one whose input chardev closed never reads it again, and a
//! `filter-mirror` without a client drops the copies the SVM needs. So the primary daemon asks QEMU (`query-chardev`) whether each of
//! its chardevs has a peer — QEMU shows `" <-> "` in a connected socket chardev's `filename`
//! — logs an error for each that has none, and checks again every `interval` until they all do
//! (then it keeps checking, less loudly). The state is also the metric
//! `qemu_chardev_connected{chardev}`.
//!
//! What is done about it lives in [`qemu_filters`](super::qemu_filters): the release
//! redirector is re-created after its chardev reconnects, and the guest's link is down while
//! `compare0` has no connection during COLO. This check only reports QEMU's view.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;
use colo_daemon::qmp_session::QmpSession;

/// Which of `ids` QEMU's `query-chardev` answer shows connected (`None`: not found).
pub fn connected_chardevs(answer: &Value, ids: &[String]) -> BTreeMap<String, Option<bool>> {
    ids.iter()
        .map(|id| {
            let found = answer
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c.get("label").and_then(Value::as_str) == Some(id.as_str()));
            let state = found.map(|c| {
                c.get("filename")
                    .and_then(Value::as_str)
                    .is_some_and(|f| f.contains(" <-> "))
            });
            (id.clone(), state)
        })
        .collect()
}

/// Checks the chardevs `ids` every `interval` until `shutdown`.
pub async fn watch(
    qmp: QmpSession,
    ids: Vec<String>,
    interval: Duration,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut all_ok_before = false;
    loop {
        let answer = qmp
            .with_client(|c| async move {
                c.execute_raw("query-chardev", None)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await;
        match answer {
            Ok(answer) => {
                let states = connected_chardevs(&answer, &ids);
                let mut all_ok = true;
                for (id, state) in &states {
                    metrics.set_chardev_connected(id, *state == Some(true));
                    match state {
                        Some(true) => {}
                        Some(false) => {
                            all_ok = false;
                            tracing::error!(
                                chardev = %id,
                                retry_in = ?interval,
                                "QEMU's chardev has no peer: its redirector's packets do not \
                                 reach colo-proxyd, or its mirror drops the SVM's copy"
                            );
                        }
                        None => {
                            all_ok = false;
                            tracing::error!(
                                chardev = %id,
                                "QEMU has no chardev of this id: check the primary's command \
                                 line against colo-proxyd's --chardevs"
                            );
                        }
                    }
                }
                if all_ok && !all_ok_before {
                    tracing::info!(chardevs = ?ids, "every QEMU filter chardev has its peer");
                }
                all_ok_before = all_ok;
            }
            Err(err) => {
                all_ok_before = false;
                tracing::warn!(%err, primary = %qmp.address(), "fail-open check: query-chardev failed")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_filename_with_a_peer_is_connected() {
        let answer = json!([
            {"label": "compare0", "filename": "tcp:127.0.0.1:9004,server=on <-> 127.0.0.1:51234", "frontend-open": true},
            {"label": "mirror0", "filename": "disconnected:tcp:0.0.0.0:9003,server=on", "frontend-open": true},
        ]);
        let ids: Vec<String> = ["compare0", "mirror0", "compare_out"]
            .map(String::from)
            .to_vec();
        let states = connected_chardevs(&answer, &ids);
        assert_eq!(states["compare0"], Some(true));
        assert_eq!(states["mirror0"], Some(false));
        assert_eq!(states["compare_out"], None);
    }
}
