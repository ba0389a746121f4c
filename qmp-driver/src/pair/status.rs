//! The state of both sides and of the relay. Any part may be unreachable:
//! that is reported, never an error.

use super::{connect, relay_link, steps};
use crate::config::PairConfig;
use colo_qmp::{ConnectOptions, QmpClient};
use colo_types::Role;
use serde::Serialize;
use std::path::PathBuf;

/// One side's state as QEMU reports it. Every field but `side`, `qmp` and
/// `reachable` is `None` when QEMU could not be asked.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SideStatus {
    /// The side.
    pub side: Role,
    /// Its QMP address.
    pub qmp: String,
    /// The QMP socket answered.
    pub reachable: bool,
    /// Why it is unreachable, or the first query that failed.
    pub error: Option<String>,
    /// QEMU version from the QMP greeting, e.g. `10.0.2`.
    pub qemu_version: Option<String>,
    /// `query-status`: run state (`running`, `inmigrate`, `prelaunch`,
    /// `colo` while stopped for a checkpoint, `paused`, ...).
    pub runstate: Option<String>,
    /// `query-status`: whether the vCPUs run.
    pub running: Option<bool>,
    /// `query-colo-status`: `primary`, `secondary` or `none`.
    pub colo_mode: Option<String>,
    /// `query-colo-status`: the mode before the last failover (`none` if
    /// there was none).
    pub colo_last_mode: Option<String>,
    /// `query-colo-status`: why COLO last exited: `none`, `request`
    /// (failover), `error`, `processing` (failover under way).
    pub colo_reason: Option<String>,
    /// `query-migrate`: `colo` on a primary in COLO; `setup` on a secondary
    /// that listens; `active` during the first migration; absent before.
    pub migration_status: Option<String>,
    /// The primary's `x-checkpoint-delay` (ms).
    pub checkpoint_delay_ms: Option<u32>,
}

impl SideStatus {
    fn unreachable(side: Role, qmp: String, error: String) -> Self {
        SideStatus {
            side,
            qmp,
            reachable: false,
            error: Some(error),
            qemu_version: None,
            runstate: None,
            running: None,
            colo_mode: None,
            colo_last_mode: None,
            colo_reason: None,
            migration_status: None,
            checkpoint_delay_ms: None,
        }
    }
}

/// The relay's state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RelayReport {
    /// Its control socket.
    pub control: PathBuf,
    /// It answered.
    pub reachable: bool,
    /// Why it did not.
    pub error: Option<String>,
    /// What it said.
    pub status: Option<relay_link::RelayStatus>,
}

/// Both sides and the relay.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairStatus {
    /// The pair's name.
    pub name: String,
    /// The primary.
    pub primary: SideStatus,
    /// The secondary.
    pub secondary: SideStatus,
    /// The relay, when configured.
    pub relay: Option<RelayReport>,
    /// The HA agents whose state files are on this host (`qmp-driver agent`'s default
    /// `--state-file`); each host sees its own agent only.
    pub agents: Vec<AgentReport>,
    /// QEMU's Unix sockets on this host that any local user can connect to (QEMU started
    /// with a loose umask); empty when none.
    pub open_sockets: Vec<super::OpenSocket>,
}

/// One HA agent's state file, as `status` found it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentReport {
    /// Where it was read.
    pub state_file: PathBuf,
    /// What it says.
    pub status: crate::agent::status::AgentStatus,
    /// How long ago the agent wrote it, in ms.
    pub age_ms: u64,
}

/// The agents' state files at their default paths that exist on this host.
pub fn local_agents(cfg: &PairConfig) -> Vec<AgentReport> {
    use crate::agent::status::{default_state_file, read_state_file, unix_ms};
    [Role::Primary, Role::Secondary]
        .into_iter()
        .filter_map(|side| {
            let path = default_state_file(&cfg.name, side.name());
            let status = read_state_file(&path).ok()?;
            Some(AgentReport {
                age_ms: unix_ms().saturating_sub(status.updated_unix_ms),
                state_file: path,
                status,
            })
        })
        .collect()
}

impl PairStatus {
    /// Both QEMUs (and the relay, when configured) answered.
    pub fn all_reachable(&self) -> bool {
        self.primary.reachable
            && self.secondary.reachable
            && self.relay.as_ref().is_none_or(|r| r.reachable)
    }
}

/// Asks one connected QEMU for its state. `address` is shown as its QMP
/// address.
pub async fn side_status(qmp: &QmpClient, side: Role, address: &str) -> SideStatus {
    let v = &qmp.greeting().version;
    let mut st = SideStatus {
        side,
        qmp: address.to_string(),
        reachable: true,
        error: None,
        qemu_version: Some(format!("{}.{}.{}", v.major, v.minor, v.micro)),
        ..SideStatus::unreachable(side, String::new(), String::new())
    };
    match steps::runstate(qmp, side).await {
        Ok(s) => {
            st.runstate = Some(s.status);
            st.running = Some(s.running);
        }
        Err(e) => st.error = Some(e.to_string()),
    }
    match steps::colo_status(qmp, side).await {
        Ok(c) => {
            st.colo_mode = Some(c.mode);
            st.colo_last_mode = c.last_mode;
            st.colo_reason = Some(c.reason);
        }
        Err(e) => {
            st.error.get_or_insert(e.to_string());
        }
    }
    match steps::migration(qmp, side).await {
        Ok(m) => st.migration_status = m.status,
        Err(e) => {
            st.error.get_or_insert(e.to_string());
        }
    }
    if side == Role::Primary {
        match steps::checkpoint_delay(qmp, side).await {
            Ok(d) => st.checkpoint_delay_ms = Some(d),
            Err(e) => {
                st.error.get_or_insert(e.to_string());
            }
        }
    }
    st
}

async fn connect_and_query(cfg: &PairConfig, side: Role, opts: ConnectOptions) -> SideStatus {
    let address = cfg.host(side).qmp.to_string();
    match connect(cfg, side, opts).await {
        Ok(qmp) => side_status(&qmp, side, &address).await,
        Err(e) => SideStatus::unreachable(side, address, e.to_string()),
    }
}

/// The relay's state (when configured).
pub async fn relay_status(cfg: &PairConfig) -> Option<RelayReport> {
    let r = cfg.relay.as_ref()?;
    Some(
        match relay_link::query_status(&r.control, relay_link::STATUS_TIMEOUT).await {
            Ok(s) => RelayReport {
                control: r.control.clone(),
                reachable: true,
                error: None,
                status: Some(s),
            },
            Err(e) => RelayReport {
                control: r.control.clone(),
                reachable: false,
                error: Some(e.to_string()),
                status: None,
            },
        },
    )
}

/// Connects to both QEMUs and the relay (concurrently) and reports what
/// each says.
pub async fn status(cfg: &PairConfig, opts: ConnectOptions) -> PairStatus {
    let (primary, secondary, relay) = tokio::join!(
        connect_and_query(cfg, Role::Primary, opts.clone()),
        connect_and_query(cfg, Role::Secondary, opts),
        relay_status(cfg),
    );
    PairStatus {
        name: cfg.name.clone(),
        primary,
        secondary,
        relay,
        agents: local_agents(cfg),
        open_sockets: super::open_sockets(cfg),
    }
}
