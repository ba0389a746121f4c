//! What the agent knows, as one JSON document: written to its state file on every change
//! (for the OCF resource agent, `qmp-driver status` and humans), mirrored in its metrics.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The agent's state file, as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The pair's name.
    pub pair: String,
    /// This agent's side.
    pub side: String,
    /// This node's corosync node id (0 before it joined).
    pub node: u32,
    /// Its VM: `waiting`, `primary`, `secondary`, `alone`, `gone` or `fenced`.
    pub vm: String,
    /// Quorate for the current membership.
    pub quorate: bool,
    /// The peer agent, once it said something.
    pub peer: Option<PeerStatus>,
    /// The VM is in COLO (its secondary holds a full, checkpointed copy).
    pub in_sync: bool,
    /// The last decision the agent took, with its reason.
    pub last_decision: Option<Decision>,
    /// colo's daemons as the relay on this host reports them (the secondary's host only).
    #[serde(default)]
    pub daemons: Option<super::daemons::DaemonsStatus>,
    /// The last automatic re-protect (`--auto-reprotect`, the primary's agent only).
    #[serde(default)]
    pub reprotect: Option<super::reprotect::ReprotectStatus>,
    /// The agent's process id.
    pub pid: u32,
    /// When this document was written (Unix ms).
    pub updated_unix_ms: u64,
}

/// The peer as this agent knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Its node id.
    pub node: u32,
    /// The VM state it reported last (`primary`, …), or `left` once its agent left the group.
    pub vm: String,
}

/// A decision of the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// `claim`, `take-over` or `fence`.
    pub action: String,
    /// Why.
    pub reason: String,
    /// When (Unix ms).
    pub unix_ms: u64,
    /// From the first sign of the failure the agent saw to this decision, in ms.
    pub detection_ms: Option<f64>,
    /// How long the failover sequence took (take-overs), in ms.
    pub failover_ms: Option<f64>,
    /// Why the decision could not be carried out (a take-over whose failover sequence failed:
    /// the pair may have no serving VM; see the agent's log and `qmp-driver status`).
    #[serde(default)]
    pub error: Option<String>,
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The default state file of a pair's agent: `/run/colo/<pair>/agent-<side>.json`.
pub fn default_state_file(pair: &str, side: &str) -> PathBuf {
    PathBuf::from(format!("/run/colo/{pair}/agent-{side}.json"))
}

/// Writes `status` to `path` atomically (a temporary file renamed over it), so a reader never
/// sees half a document.
pub fn write_state_file(path: &Path, status: &AgentStatus) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    serde_json::to_writer_pretty(&mut file, status)?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Reads a state file back.
pub fn read_state_file(path: &Path) -> std::io::Result<AgentStatus> {
    let text = std::fs::read(path)?;
    serde_json::from_slice(&text).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/agent-primary.json");
        let status = AgentStatus {
            pair: "vm1".into(),
            side: "primary".into(),
            node: 1,
            vm: "primary".into(),
            quorate: true,
            peer: Some(PeerStatus {
                node: 2,
                vm: "secondary".into(),
            }),
            in_sync: true,
            last_decision: Some(Decision {
                action: "take-over".into(),
                reason: "node 2 left the membership".into(),
                unix_ms: 1,
                detection_ms: Some(2.5),
                failover_ms: Some(40.0),
                error: None,
            }),
            daemons: None,
            reprotect: None,
            pid: 42,
            updated_unix_ms: unix_ms(),
        };
        write_state_file(&path, &status).unwrap();
        assert_eq!(read_state_file(&path).unwrap(), status);
        assert!(!path.with_extension("json.tmp").exists());
    }
}
