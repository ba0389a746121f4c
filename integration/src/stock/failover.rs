//! Failover of the stock pair in either direction: the ordered QMP sequences from QEMU's COLO
//! documentation, each step timed.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use qmp_driver::qmp::QmpClient;
use serde::Serialize;
use serde_json::json;

use super::{Role, StockPair};

/// A failover step and how long it took.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// What was done.
    pub what: String,
    /// Its duration in ms.
    pub ms: f64,
    /// The error, when the step failed but was allowed to (yank on a dead peer).
    pub error: Option<String>,
}

async fn timed<T>(
    steps: &mut Vec<Step>,
    what: &str,
    fut: impl std::future::Future<Output = qmp_driver::qmp::Result<T>>,
) -> Result<T> {
    let start = Instant::now();
    let result = fut.await;
    steps.push(Step {
        what: what.to_string(),
        ms: start.elapsed().as_secs_f64() * 1000.0,
        error: result.as_ref().err().map(ToString::to_string),
    });
    result.with_context(|| format!("failover step `{what}`"))
}

impl StockPair {
    /// The secondary takes over after the primary died: drop the migration stream (out of
    /// band, it may hang), stop serving the replica, leave COLO, remove the redirectors, put
    /// its tap on the network and announce the guest's MAC.
    pub async fn failover_to_secondary(&mut self) -> Result<Vec<Step>> {
        let qmp = self.vm(Role::Secondary)?.qmp.clone();
        let mut steps = Vec::new();
        yank_migration(&qmp, &mut steps).await;
        timed(&mut steps, "nbd-server-stop", qmp.nbd_server_stop()).await?;
        timed(
            &mut steps,
            "x-colo-lost-heartbeat",
            qmp.x_colo_lost_heartbeat(),
        )
        .await?;
        for id in ["f2", "f1"] {
            timed(&mut steps, &format!("object-del {id}"), qmp.object_del(id)).await?;
        }
        for id in ["red1", "red0"] {
            timed(
                &mut steps,
                &format!("chardev-remove {id}"),
                qmp.chardev_remove(id),
            )
            .await?;
        }
        let start = Instant::now();
        self.topology.bridge_secondary_tap()?;
        steps.push(Step {
            what: "bridge the secondary's tap".into(),
            ms: start.elapsed().as_secs_f64() * 1000.0,
            error: None,
        });
        timed(&mut steps, "announce-self", qmp.announce_self()).await?;
        wait_running(&qmp, Duration::from_secs(10)).await?;
        Ok(steps)
    }

    /// The primary carries on alone after the secondary died: drop the migration stream, remove
    /// the NBD child from the quorum, delete compare and filters, leave COLO.
    pub async fn failover_to_primary(&mut self) -> Result<Vec<Step>> {
        let qmp = self.vm(Role::Primary)?.qmp.clone();
        let mut steps = Vec::new();
        yank_migration(&qmp, &mut steps).await;
        timed(
            &mut steps,
            "x-blockdev-change colo-disk0 -children.1",
            qmp.x_blockdev_change_remove("colo-disk0", "children.1"),
        )
        .await?;
        timed(
            &mut steps,
            "drive_del replication0",
            qmp.human_monitor_command("drive_del replication0"),
        )
        .await?;
        for id in ["comp0", "iothread1", "m0", "redire0", "redire1"] {
            timed(&mut steps, &format!("object-del {id}"), qmp.object_del(id)).await?;
        }
        timed(
            &mut steps,
            "x-colo-lost-heartbeat",
            qmp.x_colo_lost_heartbeat(),
        )
        .await?;
        wait_running(&qmp, Duration::from_secs(10)).await?;
        Ok(steps)
    }
}

/// Yanks the migration stream out of band so that a hung peer cannot block the next commands.
/// Best effort: when the peer died cleanly the stream may already be gone, which is fine.
async fn yank_migration(qmp: &QmpClient, steps: &mut Vec<Step>) {
    let start = Instant::now();
    let result = qmp.yank(json!([{ "type": "migration" }])).await;
    steps.push(Step {
        what: "yank migration (out of band)".into(),
        ms: start.elapsed().as_secs_f64() * 1000.0,
        error: result.err().map(|e| e.to_string()),
    });
}

async fn wait_running(qmp: &QmpClient, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let status = qmp.query_status().await?;
        if status.running {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "VM not running {within:?} after failover (status {})",
                status.status
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
