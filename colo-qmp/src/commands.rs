//! Typed wrappers for the commands the COLO tooling uses. Each is a thin
//! layer over [`QmpClient::execute_raw`]; commands that return nothing
//! ignore QEMU's `{}` reply.

use super::client::{QmpClient, decode};
use super::error::{QmpError, Result};
use super::schema::{
    AnnounceParameters, ChardevAddArgs, ColoStatus, HumanMonitorCommandArgs, IdArgs,
    MigrateCapability, MigrateSetCapabilitiesArgs, MigrationInfo, NbdServerAddArgs,
    NbdServerStartArgs, NodeNameArgs, SocketAddressLegacy, StatusInfo, UriArgs,
    XBlockdevChangeArgs, YankArgs,
};
use serde::Serialize;
use serde_json::Value;

fn to_args<T: Serialize>(command: &str, args: &T) -> Result<Value> {
    // Our argument structs cannot fail to serialise, but a panic in a
    // library is worse than an error nobody will ever see.
    serde_json::to_value(args).map_err(|e| QmpError::Decode {
        command: command.to_owned(),
        detail: format!("cannot encode arguments: {e}"),
    })
}

impl QmpClient {
    async fn unit(&self, command: &str, arguments: Option<Value>) -> Result<()> {
        self.execute_raw(command, arguments).await.map(drop)
    }

    async fn unit_with<T: Serialize>(&self, command: &str, args: &T) -> Result<()> {
        let args = to_args(command, args)?;
        self.unit(command, Some(args)).await
    }

    /// `query-status`: run state of the VM.
    pub async fn query_status(&self) -> Result<StatusInfo> {
        self.execute("query-status", None).await
    }

    /// `query-colo-status`: COLO mode and last exit reason.
    pub async fn query_colo_status(&self) -> Result<ColoStatus> {
        self.execute("query-colo-status", None).await
    }

    /// `query-migrate`: migration state (`status` is `None` before any
    /// migration).
    pub async fn query_migrate(&self) -> Result<MigrationInfo> {
        self.execute("query-migrate", None).await
    }

    /// `migrate-set-capabilities` with `(capability, state)` pairs, e.g.
    /// `&[("x-colo", true)]`.
    pub async fn migrate_set_capabilities(&self, caps: &[(&str, bool)]) -> Result<()> {
        let args = MigrateSetCapabilitiesArgs {
            capabilities: caps
                .iter()
                .map(|&(capability, state)| MigrateCapability { capability, state })
                .collect(),
        };
        self.unit_with("migrate-set-capabilities", &args).await
    }

    /// `migrate-set-parameters`; `params` is the argument object as is,
    /// e.g. `{"x-checkpoint-delay": 2000}`.
    pub async fn migrate_set_parameters(&self, params: Value) -> Result<()> {
        self.unit("migrate-set-parameters", Some(params)).await
    }

    /// The current `x-checkpoint-delay` (ms), from `query-migrate-parameters`.
    pub async fn checkpoint_delay(&self) -> Result<u32> {
        const COMMAND: &str = "query-migrate-parameters";
        let v = self.execute_raw(COMMAND, None).await?;
        v["x-checkpoint-delay"]
            .as_u64()
            .and_then(|d| u32::try_from(d).ok())
            .ok_or_else(|| QmpError::Decode {
                command: COMMAND.into(),
                detail: format!("no x-checkpoint-delay in {v}"),
            })
    }

    /// Re-sets `x-checkpoint-delay` to its current value and returns it (ms). On a primary in
    /// COLO this starts a checkpoint at once (QEMU has no "checkpoint now" command) and re-arms
    /// the periodic timer without changing the period.
    pub async fn reset_checkpoint_delay(&self) -> Result<u32> {
        let delay = self.checkpoint_delay().await?;
        self.migrate_set_parameters(serde_json::json!({ "x-checkpoint-delay": delay }))
            .await?;
        Ok(delay)
    }

    /// `migrate` to `uri` (e.g. `tcp:10.0.0.2:9998`). Returns once QEMU has
    /// started the migration, not when it completes.
    pub async fn migrate(&self, uri: &str) -> Result<()> {
        self.unit_with("migrate", &UriArgs { uri }).await
    }

    /// `migrate-incoming` on a QEMU started with `-incoming defer`.
    pub async fn migrate_incoming(&self, uri: &str) -> Result<()> {
        self.unit_with("migrate-incoming", &UriArgs { uri }).await
    }

    /// `x-colo-lost-heartbeat`: tell this side its peer is gone (failover).
    pub async fn x_colo_lost_heartbeat(&self) -> Result<()> {
        self.unit("x-colo-lost-heartbeat", None).await
    }

    /// `nbd-server-start` listening on TCP `host:port`.
    pub async fn nbd_server_start_inet(&self, host: &str, port: u16) -> Result<()> {
        self.nbd_server_start_inet_tls(host, port, None).await
    }

    /// `nbd-server-start` listening on TCP; with `tls` = `(creds, authz)` clients must speak
    /// NBD `STARTTLS` with a certificate that the `tls-creds-x509` object `creds`
    /// (`endpoint=server`) verifies and the authz object `authz` allows.
    pub async fn nbd_server_start_inet_tls(
        &self,
        host: &str,
        port: u16,
        tls: Option<(&str, &str)>,
    ) -> Result<()> {
        let addr = SocketAddressLegacy::Inet {
            host,
            port: port.to_string(),
        };
        let args = NbdServerStartArgs {
            addr,
            tls_creds: tls.map(|(creds, _)| creds),
            tls_authz: tls.map(|(_, authz)| authz),
        };
        self.unit_with("nbd-server-start", &args).await
    }

    /// `nbd-server-start` listening on a Unix socket.
    pub async fn nbd_server_start_unix(&self, path: &str) -> Result<()> {
        let addr = SocketAddressLegacy::Unix { path };
        let args = NbdServerStartArgs {
            addr,
            tls_creds: None,
            tls_authz: None,
        };
        self.unit_with("nbd-server-start", &args).await
    }

    /// `nbd-server-add`: export a block device/node over the running NBD
    /// server (the COLO secondary exports its hidden/active disk this way).
    pub async fn nbd_server_add(&self, device: &str, writable: bool) -> Result<()> {
        self.unit_with("nbd-server-add", &NbdServerAddArgs { device, writable })
            .await
    }

    /// `nbd-server-stop`.
    pub async fn nbd_server_stop(&self) -> Result<()> {
        self.unit("nbd-server-stop", None).await
    }

    /// `blockdev-add` with the options object as is.
    pub async fn blockdev_add(&self, options: Value) -> Result<()> {
        self.unit("blockdev-add", Some(options)).await
    }

    /// `blockdev-del` of the node called `node_name`.
    pub async fn blockdev_del(&self, node_name: &str) -> Result<()> {
        self.unit_with("blockdev-del", &NodeNameArgs { node_name })
            .await
    }

    /// `x-blockdev-change` adding `node` as a new child of quorum `parent`.
    pub async fn x_blockdev_change_add(&self, parent: &str, node: &str) -> Result<()> {
        let args = XBlockdevChangeArgs {
            parent,
            child: None,
            node: Some(node),
        };
        self.unit_with("x-blockdev-change", &args).await
    }

    /// `x-blockdev-change` removing `child` (e.g. `children.1`) from quorum
    /// `parent`.
    pub async fn x_blockdev_change_remove(&self, parent: &str, child: &str) -> Result<()> {
        let args = XBlockdevChangeArgs {
            parent,
            child: Some(child),
            node: None,
        };
        self.unit_with("x-blockdev-change", &args).await
    }

    /// `object-add`; `props` is the flat object including `qom-type` and
    /// `id` (QEMU >= 6 syntax).
    pub async fn object_add(&self, props: Value) -> Result<()> {
        self.unit("object-add", Some(props)).await
    }

    /// `object-del` of object `id`.
    pub async fn object_del(&self, id: &str) -> Result<()> {
        self.unit_with("object-del", &IdArgs { id }).await
    }

    /// `chardev-add` with `backend` as is, e.g.
    /// `{"type": "socket", "data": {...}}`.
    pub async fn chardev_add(&self, id: &str, backend: Value) -> Result<()> {
        self.unit_with("chardev-add", &ChardevAddArgs { id, backend })
            .await
    }

    /// `chardev-remove` of chardev `id`.
    pub async fn chardev_remove(&self, id: &str) -> Result<()> {
        self.unit_with("chardev-remove", &IdArgs { id }).await
    }

    /// `yank` the given instances (a JSON array of `YankInstance`s). Sent
    /// out-of-band when OOB is negotiated, because yank exists precisely to
    /// unstick a QEMU whose in-band commands hang on a dead peer.
    pub async fn yank(&self, instances: Value) -> Result<()> {
        let args = to_args("yank", &YankArgs { instances })?;
        if self.oob_enabled() {
            self.execute_oob_raw("yank", Some(args)).await.map(drop)
        } else {
            self.unit("yank", Some(args)).await
        }
    }

    /// `announce-self` with QEMU's default timing (see
    /// [`AnnounceParameters::default`]).
    pub async fn announce_self(&self) -> Result<()> {
        self.announce_self_with(&AnnounceParameters::default())
            .await
    }

    /// `announce-self` with explicit timing.
    pub async fn announce_self_with(&self, params: &AnnounceParameters) -> Result<()> {
        self.unit_with("announce-self", params).await
    }

    /// `stop`: pause the vCPUs.
    pub async fn stop(&self) -> Result<()> {
        self.unit("stop", None).await
    }

    /// `cont`: resume the vCPUs.
    pub async fn cont(&self) -> Result<()> {
        self.unit("cont", None).await
    }

    /// `quit`: terminate QEMU. QEMU may close the socket right after (or
    /// before flushing) its reply, so a disconnect once the command was
    /// written counts as success.
    pub async fn quit(&self) -> Result<()> {
        self.execute_expecting_hangup("quit").await
    }

    /// `human-monitor-command`: run an HMP command line and return its
    /// text output.
    pub async fn human_monitor_command(&self, command_line: &str) -> Result<String> {
        let command = "human-monitor-command";
        let args = to_args(command, &HumanMonitorCommandArgs { command_line })?;
        let value = self.execute_raw(command, Some(args)).await?;
        decode(command, value)
    }
}
