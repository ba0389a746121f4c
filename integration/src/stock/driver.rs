//! The pair as an operator's `qmp-driver` sees it.
//!
//! The bed describes each run's pair in a `qmp-driver` config file (`pair.toml` in the run
//! directory) and then drives it with the same code an operator runs: the QEMU command lines
//! come from [`qmp_driver::qemu_args`], COLO is entered and failed over with
//! [`qmp_driver::pair`], the checkpoint-barrier relay is the `qmp-driver relay` binary, and the
//! CLI tests run `qmp-driver --config pair.toml ...` against the file as written. The bed adds
//! only what a real host would have around QEMU: the guest kernel, serial logs, its own QMP
//! monitor for the event log, and the namespaces.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use qmp_driver::config::{DiskBackend, NetworkBackend, PairConfig as DriverConfig};

use super::{PairConfig, Role};
use crate::topology::{self, Topology, addr};

/// The operator's QMP socket of `role`: the one `pair.toml` names. The bed's own connection (for
/// the event log) uses a second monitor, because a QMP socket serves one client at a time.
pub fn operator_qmp_path(dir: &Path, role: Role) -> PathBuf {
    dir.join(format!("{}-qmp-operator.sock", role.name()))
}

/// The QMP socket of `role` for its agent (`qmp-driver watch`, `qmp-driver agent`), a monitor
/// of its own.
pub fn watch_qmp_path(dir: &Path, role: Role) -> PathBuf {
    dir.join(format!("{}-qmp-watch.sock", role.name()))
}

/// The tmpfs under the secondary's image, with [`PairConfig::secondary_fs_mib`].
pub fn secondary_fs_path(dir: &Path) -> PathBuf {
    dir.join("secondary-fs")
}

/// The secondary's image: in the run directory, or on its own tmpfs.
pub fn secondary_image_path(dir: &Path, cfg: &PairConfig) -> PathBuf {
    match cfg.secondary_fs_mib {
        Some(_) => secondary_fs_path(dir).join("secondary.raw"),
        None => dir.join("secondary.raw"),
    }
}

/// Where the secondary QEMU listens for the migration.
fn incoming_path(dir: &Path) -> PathBuf {
    dir.join("incoming.sock")
}

/// Where the relay listens for the primary's migration (with a relay).
fn relay_listen_path(dir: &Path) -> PathBuf {
    dir.join("migration.sock")
}

/// The relay's control socket (with a relay).
pub fn relay_control_path(dir: &Path) -> PathBuf {
    dir.join("relay.sock")
}

/// colo-blockd's Unix socket, where the secondary QEMU's disk connects (with colo-blockd).
pub fn blockd_socket_path(dir: &Path) -> PathBuf {
    dir.join("blockd.sock")
}

/// The config file of this run's pair.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("pair.toml")
}

/// The `qmp-driver` config of the bed's pair: Unix sockets in the run directory for QMP and
/// migration, the hosts' bridge addresses for the filter and NBD sockets, and a takeover hook
/// that puts the secondary's tap on its host bridge.
pub fn config_toml(dir: &Path, topology: &Topology, cfg: &PairConfig) -> String {
    let unix = |p: PathBuf| format!("unix:{}", p.display());
    let incoming = unix(incoming_path(dir));
    let target = if cfg.relay {
        unix(relay_listen_path(dir))
    } else {
        incoming.clone()
    };
    let relay = if cfg.relay {
        // With [tls] the primary host's daemons reach the relay's control over TCP (mutual
        // TLS), across the bed's network as between two real hosts; the relay then runs in
        // the secondary host's namespace ([`RelayProcess::spawn`]).
        let control_tcp = if cfg.tls {
            format!(
                "control_tcp = \"{}:{RELAY_CONTROL_TCP_PORT}\"\n",
                addr::SECONDARY_HOST
            )
        } else {
            String::new()
        };
        format!(
            "[relay]\nlisten = {listen:?}\ntarget = {incoming:?}\ncontrol = {control:?}\n\
             {control_tcp}ack_timeout_ms = {ack}\n\n",
            listen = unix(relay_listen_path(dir)),
            control = relay_control_path(dir).display().to_string(),
            ack = cfg.relay_ack_timeout_ms,
        )
    } else {
        String::new()
    };
    let hook = format!(
        "ip -n {} link set {} master {}",
        topology.secondary,
        topology::SECONDARY_TAP,
        topology::HOST_BRIDGE
    );
    let file = |name: &str| dir.join(name).display().to_string();
    let (disk, overlays) = match cfg.disk {
        DiskBackend::Replication => (
            String::new(),
            format!(
                "secondary_active = {:?}\nsecondary_hidden = {:?}\n",
                file("secondary-active.qcow2"),
                file("secondary-hidden.qcow2")
            ),
        ),
        // The SVM's disk connects over colo-blockd's Unix socket, the primary's quorum child
        // over TCP to secondary.host:nbd_port.
        DiskBackend::ColoBlockd => (
            format!(
                "[disk]\nbackend = \"colo-blockd\"\nblockd_socket = {:?}\n\
                 blockd_primary_qmp = {:?}\n\n",
                blockd_socket_path(dir).display().to_string(),
                unix(operator_qmp_path(dir, Role::Primary))
            ),
            String::new(),
        ),
    };
    let network = match cfg.network {
        NetworkBackend::ColoCompare => String::new(),
        NetworkBackend::ColoProxyd => format!(
            "[network]\nbackend = \"colo-proxyd\"\nproxyd_qmp = {:?}\n\
             proxyd_secondary_qmp = {:?}\n\n",
            unix(super::proxyd::qmp_path(dir)),
            unix(super::proxyd::secondary_qmp_path(dir))
        ),
    };
    let tls = if cfg.tls {
        let host_dir = |name: &str| pki_dir(dir).join(name).display().to_string();
        format!(
            "[tls]\nprimary_dir = {pdir:?}\nprimary_name = {PRIMARY_TLS_NAME:?}\n\
             secondary_dir = {sdir:?}\nsecondary_name = {SECONDARY_TLS_NAME:?}\n\n",
            pdir = host_dir(PRIMARY_TLS_NAME),
            sdir = host_dir(SECONDARY_TLS_NAME),
        )
    } else {
        String::new()
    };
    format!(
        "# Written by the colo test bed for one run.\n\
         name = \"testbed\"\n\n\
         [primary]\nqmp = {pqmp:?}\nwatch_qmp = {wqmp:?}\nhost = {phost:?}\n\n\
         [secondary]\nqmp = {sqmp:?}\nwatch_qmp = {swqmp:?}\nhost = {shost:?}\n\n\
         [migration]\nsecondary_incoming = {incoming:?}\nprimary_target = {target:?}\n\
         checkpoint_delay_ms = {delay}\n\n\
         {relay}\
         {tls}\
         {disk}\
         {network}\
         [failover]\nsecondary_takeover_hook = {hook:?}\n\n\
         [vm]\ntap = {ptap:?}\nsecondary_tap = {stap:?}\nmac = {mac:?}\nmemory_mib = {mem}\n\
         {memory_backend}primary_image = {pimg:?}\nsecondary_image = {simg:?}\n{overlays}",
        pqmp = unix(operator_qmp_path(dir, Role::Primary)),
        wqmp = unix(watch_qmp_path(dir, Role::Primary)),
        swqmp = unix(watch_qmp_path(dir, Role::Secondary)),
        phost = addr::PRIMARY_HOST,
        sqmp = unix(operator_qmp_path(dir, Role::Secondary)),
        shost = addr::SECONDARY_HOST,
        delay = cfg.checkpoint_delay_ms,
        ptap = topology::PRIMARY_TAP,
        stap = topology::SECONDARY_TAP,
        mac = addr::GUEST_MAC,
        mem = cfg.memory_mib,
        memory_backend = if cfg.memfd_ram {
            "memory_backend = \"memfd\"\n"
        } else {
            ""
        },
        pimg = file("primary.raw"),
        simg = secondary_image_path(dir, cfg).display().to_string(),
    )
}

/// The names of the bed's hosts in their TLS certificates.
pub const PRIMARY_TLS_NAME: &str = "colo-primary";

/// The relay's control port on the secondary host's address, with [`PairConfig::tls`].
pub const RELAY_CONTROL_TCP_PORT: u16 = 9990;
/// See [`PRIMARY_TLS_NAME`].
pub const SECONDARY_TLS_NAME: &str = "colo-secondary";

/// Where the run keeps the pair's CA and host identities (with [`PairConfig::tls`]).
pub fn pki_dir(dir: &Path) -> PathBuf {
    dir.join("pki")
}

/// Makes the pair's keys as an operator does: `qmp-driver pki create`, each host's address in
/// its certificates too (the stock stack's chardevs check the address they connect to).
fn create_pki(dir: &Path) -> Result<()> {
    let out = std::process::Command::new(qmp_driver_binary()?)
        .args(["pki", "create", "--out"])
        .arg(pki_dir(dir))
        .args(["--host", PRIMARY_TLS_NAME, "--host", SECONDARY_TLS_NAME])
        .arg("--address")
        .arg(format!("{PRIMARY_TLS_NAME}={}", addr::PRIMARY_HOST))
        .arg("--address")
        .arg(format!("{SECONDARY_TLS_NAME}={}", addr::SECONDARY_HOST))
        .output()
        .context("running qmp-driver pki create")?;
    if !out.status.success() {
        anyhow::bail!(
            "qmp-driver pki create failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Writes `pair.toml` (and with TLS, first the pair's keys) and loads it back the way
/// `qmp-driver --config` does.
pub fn write_config(dir: &Path, topology: &Topology, cfg: &PairConfig) -> Result<DriverConfig> {
    if cfg.tls && !pki_dir(dir).exists() {
        create_pki(dir)?;
    }
    let path = config_path(dir);
    std::fs::write(&path, config_toml(dir, topology, cfg))
        .with_context(|| format!("writing {}", path.display()))?;
    DriverConfig::load(&path).with_context(|| format!("loading {}", path.display()))
}

/// The `qmp-driver` binary of this build: `$COLO_QMP_DRIVER`, or `qmp-driver` in the Cargo
/// target directory the running test was built into.
pub fn qmp_driver_binary() -> Result<PathBuf> {
    workspace_binary("qmp-driver", "COLO_QMP_DRIVER")
}

/// The binary `name` of this workspace's build: `$env_var`, or `name` in the Cargo target
/// directory the running test was built into. Missing, it is an error that says how to build
/// it; the bed never falls back to another copy.
pub fn workspace_binary(name: &str, env_var: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    let candidates = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join(name))
        .collect::<Vec<_>>();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "the {name} binary is not built (looked at {candidates:?}); run \
                 `cargo build -p {name}` or the whole workspace's tests \
                 (`cargo nextest run --workspace`), or set {env_var}"
            )
        })
}

/// Runs `qmp-driver --config pair.toml ARGS...` and returns its output (any exit status).
pub fn run_cli(dir: &Path, args: &[&str]) -> Result<Output> {
    let bin = qmp_driver_binary()?;
    let out = Command::new(&bin)
        .arg("--config")
        .arg(config_path(dir))
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} {args:?}", bin.display()))?;
    let log = dir.join("qmp-driver-cli.log");
    let mut text = std::fs::read_to_string(&log).unwrap_or_default();
    text.push_str(&format!(
        "$ qmp-driver {}\n[exit {:?}]\n--- stdout\n{}--- stderr\n{}\n",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ));
    std::fs::write(&log, text)?;
    Ok(out)
}

/// Like [`run_cli`], but a non-zero exit is an error carrying its stderr.
pub fn run_cli_ok(dir: &Path, args: &[&str]) -> Result<Output> {
    let out = run_cli(dir, args)?;
    if !out.status.success() {
        bail!(
            "qmp-driver {} exited {:?}: {}",
            args.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// A long-running `qmp-driver` command of the pair (the relay, the watch agent), owned by PID.
/// It runs in the root namespace: every socket it touches is a Unix socket in the run
/// directory.
#[derive(Debug)]
pub struct DriverProcess {
    child: Option<Child>,
    /// Its log (stderr).
    pub log: PathBuf,
}

/// The checkpoint-barrier relay (`qmp-driver relay`).
pub type RelayProcess = DriverProcess;

impl DriverProcess {
    /// Starts `qmp-driver --config pair.toml ARGS...`, its stderr in `NAME.log`.
    fn start(dir: &Path, name: &str, args: &[&str]) -> Result<DriverProcess> {
        DriverProcess::start_in(None, dir, name, args)
    }

    /// The same, in the network namespace `netns` when given (`ip netns exec` execs the
    /// program: the child is `qmp-driver` itself).
    fn start_in(
        netns: Option<&str>,
        dir: &Path,
        name: &str,
        args: &[&str],
    ) -> Result<DriverProcess> {
        let bin = qmp_driver_binary()?;
        let log = dir.join(format!("{name}.log"));
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let child = command
            .arg("--config")
            .arg(config_path(dir))
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(File::create(dir.join(format!("{name}.stdout")))?)
            .stderr(File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {} {args:?} (netns {netns:?})", bin.display()))?;
        Ok(DriverProcess {
            child: Some(child),
            log,
        })
    }

    /// Starts `qmp-driver relay --config pair.toml`, in the network namespace `netns` when
    /// given (a relay with a TCP control listener belongs on the secondary host), and waits
    /// for its control socket.
    pub fn spawn(dir: &Path, netns: Option<&str>) -> Result<DriverProcess> {
        let control = relay_control_path(dir);
        let mut relay = DriverProcess::start_in(netns, dir, "relay", &["relay"])?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !control.exists() {
            if let Some(status) = relay
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("the relay exited ({status}): {}", relay.log_tail());
            }
            if Instant::now() > deadline {
                bail!(
                    "the relay's control socket did not appear: {}",
                    relay.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(relay)
    }

    /// Starts the primary's watch agent (`qmp-driver watch`) with `args`, its log `watch.log`.
    pub fn watch(dir: &Path, args: &[&str]) -> Result<DriverProcess> {
        let mut all = vec!["watch"];
        all.extend_from_slice(args);
        DriverProcess::start(dir, "watch", &all)
    }

    /// Starts `qmp-driver agent --side ROLE ARGS...` (the HA agent) in the network namespace
    /// `ns` of that side's host, where it reaches the host's corosync; its log `NAME.log`.
    pub fn agent(
        dir: &Path,
        ns: &str,
        role: Role,
        name: &str,
        args: &[&str],
    ) -> Result<DriverProcess> {
        let mut all = vec!["agent", "--side", role.name()];
        all.extend_from_slice(args);
        DriverProcess::start_in(Some(ns), dir, name, &all)
    }

    /// Its process id (`ip netns exec` execs the program: the same process), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it has exited.
    pub fn has_exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for DriverProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
