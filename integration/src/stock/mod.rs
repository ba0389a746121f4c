//! The stock QEMU COLO pair, wired as QEMU's COLO documentation describes, on the test bed.
//!
//! Primary (host A): `filter-mirror` copies client→guest packets to the secondary, two
//! `filter-redirector`s route the PVM's output through `colo-compare`, which releases it only
//! when the SVM produced the same; the disk is a `quorum` over the local image plus an NBD
//! child (through the `replication` filter) to the secondary. Secondary (host B): redirectors
//! feed it the mirrored packets and return its output to the primary's `colo-compare`,
//! `filter-rewriter` maps its TCP sequence numbers, and `replication,mode=secondary` keeps its
//! writes in an active/hidden overlay pair above the NBD-exported image.
//!
//! Deviations from the documentation, each for a measured reason (see
//! `../shared/research/stock-colo.md`): migration over a Unix socket (TCP loopback costs ~40 ms
//! per checkpoint through Nagle and delayed ACK), `nodelay=on` on every chardev socket,
//! `vnet_hdr=off` taps so no filter needs `vnet_hdr_support`, `-incoming defer`, and the
//! secondary's tap off the bridge until failover.

mod blockd;
mod cmdline;
mod daemon;
mod diagnostics;
pub mod driver;
mod events;
pub mod proxyd;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use colo_qmp::QmpClient;
use qmp_driver::config::PairConfig as DriverConfig;
pub use qmp_driver::config::{DiskBackend, NetworkBackend};
use qmp_driver::pair::{self, FailoverOptions, StartOptions};
use serde::Serialize;
use serde_json::json;

pub(crate) use cmdline::bed_args;
pub use cmdline::{MACHINE, qemu_args};
pub use daemon::DaemonProcess;
pub use driver::{DriverProcess, RelayProcess, operator_qmp_path};
pub use events::{EventLog, pause_windows, pauses};
pub use qmp_driver::pair::Step;

use crate::artifacts::Artifacts;
use crate::guest;
use crate::process::QemuProcess;
use crate::topology::{self, Topology};
use cmdline::qmp_path;

/// One of colo's daemons on the bed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Daemon {
    /// colo-proxyd on that host.
    Proxyd(Role),
    /// colo-blockd (on the secondary's host).
    Blockd,
}

#[derive(Debug, Clone, Serialize)]
pub struct PairConfig {
    /// `x-checkpoint-delay`: the periodic checkpoint interval, in ms.
    pub checkpoint_delay_ms: u32,
    /// Memory the guest dirties per second (MiB/s).
    pub guest_load_mib_s: u32,
    /// Guest RAM (MiB). The secondary needs twice this (RAM plus the COLO cache).
    pub memory_mib: u32,
    /// Size of the replicated disk (MiB).
    pub disk_mib: u32,
    /// Migrate through the checkpoint-barrier relay (`qmp-driver relay`) instead of straight
    /// to the secondary.
    pub relay: bool,
    /// The relay's bound on a subscriber's acknowledgement (ms).
    pub relay_ack_timeout_ms: u64,
    /// Who keeps the secondary's disk: QEMU's block replication, or colo-blockd (which needs
    /// the relay: `launch` turns it on).
    pub disk: DiskBackend,
    /// Who compares the VMs' output: QEMU's colo-compare, or colo-proxyd on both hosts (which
    /// needs the relay: `launch` turns it on).
    pub network: NetworkBackend,
    /// Put the secondary's image (and colo-blockd's journal and spill files next to it) on a
    /// tmpfs of this many MiB, so that a test can fill that file system.
    pub secondary_fs_mib: Option<u32>,
    /// Add the witness namespace (the corosync quorum device's host) to the topology, for the
    /// HA agents' cluster ([`crate::ha`]).
    pub witness: bool,
    /// Mutual TLS between the hosts: the run makes the pair's keys with `qmp-driver pki
    /// create` and gives `pair.toml` a `[tls]` section (`docs/security.md`).
    pub tls: bool,
    /// Guest RAM as a shared memfd on both VMs (`vm.memory_backend = "memfd"` in `pair.toml`),
    /// the RAM vhost-user needs; otherwise QEMU's default anonymous RAM.
    pub memfd_ram: bool,
    /// Record each VM's NIC traffic, both directions, in `<role>-nic.pcap` in the run
    /// directory (QEMU's `filter-dump`, last in the filter chain): what the guest sent, and
    /// what reached it, including the packets colo-proxyd or the mirror injected.
    pub capture: bool,
}

impl Default for PairConfig {
    fn default() -> Self {
        PairConfig {
            checkpoint_delay_ms: 1000,
            guest_load_mib_s: 4,
            memory_mib: 128,
            disk_mib: 16,
            relay: false,
            relay_ack_timeout_ms: 2000,
            disk: DiskBackend::Replication,
            network: NetworkBackend::ColoCompare,
            secondary_fs_mib: None,
            witness: false,
            tls: false,
            memfd_ram: false,
            capture: false,
        }
    }
}

pub use colo_types::Role;

/// One VM of the pair.
#[derive(Debug)]
pub struct Vm {
    /// Its role.
    pub role: Role,
    /// The QEMU process.
    pub process: QemuProcess,
    /// QMP connection.
    pub qmp: QmpClient,
    /// Every QMP event it sent.
    pub events: EventLog,
    /// Serial console log (heartbeats).
    pub serial: PathBuf,
    /// Its raw disk image (the base image under the replication overlays on the secondary).
    pub image: PathBuf,
    /// Index into `events` where the guest had booted in COLO; checkpoints are counted from there.
    pub colo_mark: usize,
}

impl Vm {
    /// Checkpoint pauses since COLO was entered.
    pub fn checkpoint_pauses(&self) -> Vec<Duration> {
        pauses(&self.events.since(self.colo_mark))
    }

    /// What its serial console says.
    pub fn serial_summary(&self) -> guest::SerialSummary {
        guest::read_serial(&self.serial)
    }
}

/// The running stock pair. Dropping it kills both QEMUs and deletes the namespaces.
#[derive(Debug)]
pub struct StockPair {
    /// This run's directory (sockets, images, logs, command lines, events).
    pub dir: PathBuf,
    /// Settings.
    pub config: PairConfig,
    /// The primary VM (`None` once it is gone).
    pub primary: Option<Vm>,
    /// The secondary VM (`None` once it is gone).
    pub secondary: Option<Vm>,
    /// VMs that were killed, kept for their events and logs.
    pub dead: Vec<Vm>,
    /// The pair as `qmp-driver` sees it (`pair.toml` in `dir`).
    pub driver: DriverConfig,
    /// The checkpoint-barrier relay, when the pair migrates through one.
    pub relay: Option<RelayProcess>,
    /// colo-blockd on the secondary host, when it keeps the secondary's disk.
    pub blockd: Option<DaemonProcess>,
    /// colo-proxyd on each host, when they compare the output.
    pub proxyd: Vec<(Role, DaemonProcess)>,
    /// The tmpfs under the secondary's image, with [`PairConfig::secondary_fs_mib`]; after the
    /// daemons, so that they are gone when it is unmounted.
    pub small_fs: Option<SmallFs>,
    // Declared last so that it drops after the VMs: QEMU must exit before its tap disappears.
    /// The namespaces.
    pub topology: Topology,
}

fn create_images(dir: &Path, cfg: &PairConfig) -> Result<Option<SmallFs>> {
    let bytes = u64::from(cfg.disk_mib) * 1024 * 1024;
    let small_fs = match cfg.secondary_fs_mib {
        Some(mib) => Some(SmallFs::mount(&driver::secondary_fs_path(dir), mib)?),
        None => None,
    };
    for path in [
        dir.join("primary.raw"),
        driver::secondary_image_path(dir, cfg),
    ] {
        let file = std::fs::File::create(path)?;
        file.set_len(bytes)?;
    }
    if cfg.disk == DiskBackend::ColoBlockd {
        // colo-blockd keeps the secondary's overlay itself.
        return Ok(small_fs);
    }
    for name in ["secondary-active.qcow2", "secondary-hidden.qcow2"] {
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(dir.join(name))
            .arg(bytes.to_string())
            .output()
            .context("running qemu-img (package qemu-utils)")?;
        if !out.status.success() {
            bail!(
                "qemu-img create {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(small_fs)
}

/// A tmpfs the bed mounted (for [`PairConfig::secondary_fs_mib`]); unmounted when dropped.
#[derive(Debug)]
pub struct SmallFs {
    path: PathBuf,
}

impl SmallFs {
    fn mount(path: &Path, mib: u32) -> Result<SmallFs> {
        std::fs::create_dir_all(path)?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "colo-bed"])
            .arg(path)
            .output()
            .context("running mount")?;
        if !out.status.success() {
            bail!(
                "mount tmpfs on {}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(SmallFs {
            path: path.to_path_buf(),
        })
    }

    /// Fills the file system with one file until it is full; returns the bytes written.
    pub fn fill(&self) -> Result<u64> {
        use std::io::Write;
        let mut file = std::fs::File::create(self.path.join("filler"))?;
        let block = vec![0xa5u8; 64 * 1024];
        let mut written = 0;
        loop {
            match file.write(&block) {
                Ok(0) => return Ok(written),
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => return Ok(written),
                Err(e) => return Err(e).context("filling the secondary's file system"),
            }
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // Lazy: a daemon that still holds a file there lets go when it exits.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

impl StockPair {
    /// Brings up the namespaces and both QEMUs, boots the guest on the primary, and migrates
    /// it into COLO with [`qmp_driver::pair::start`]. Returns once both sides run in COLO mode
    /// and the guest serves.
    pub async fn start(tag: &str, dir: PathBuf, cfg: PairConfig) -> Result<Self> {
        let mut pair = StockPair::launch(tag, dir, cfg).await?;
        pair.enter_colo().await?;
        Ok(pair)
    }

    /// Brings up the namespaces, writes `pair.toml`, and starts both QEMUs (the primary
    /// paused, the secondary waiting for `migrate-incoming`) and the relay if configured. COLO
    /// is not started: [`StockPair::enter_colo`] does that, or `qmp-driver start`.
    pub async fn launch(tag: &str, dir: PathBuf, mut cfg: PairConfig) -> Result<Self> {
        // colo's daemons learn the epochs from the relay only.
        cfg.relay |=
            cfg.disk == DiskBackend::ColoBlockd || cfg.network == NetworkBackend::ColoProxyd;
        let artifacts = Artifacts::locate()?;
        let topology = if cfg.witness {
            Topology::create_with_witness(tag)?
        } else {
            Topology::create(tag)?
        };
        let small_fs = create_images(&dir, &cfg)?;
        let driver = driver::write_config(&dir, &topology, &cfg)?;
        // The secondary's disk must be served before the secondary QEMU opens it.
        let blockd = match cfg.disk {
            DiskBackend::ColoBlockd => Some(blockd::spawn(&dir, &topology, &driver)?),
            DiskBackend::Replication => None,
        };

        let mut pri_proc = QemuProcess::spawn(
            &artifacts.qemu,
            &topology.primary,
            "primary",
            &dir,
            qmp_path(&dir, Role::Primary),
            &qemu_args(&artifacts, Role::Primary, &dir, &cfg, &driver)?,
        )?;
        let (pri_qmp, pri_stream) = pri_proc.connect_qmp(Duration::from_secs(20)).await?;
        let pri_events = EventLog::record_from(pri_stream, dir.join("primary-events.jsonl"));

        let mut sec_proc = QemuProcess::spawn(
            &artifacts.qemu,
            &topology.secondary,
            "secondary",
            &dir,
            qmp_path(&dir, Role::Secondary),
            &qemu_args(&artifacts, Role::Secondary, &dir, &cfg, &driver)?,
        )?;
        let (sec_qmp, sec_stream) = sec_proc.connect_qmp(Duration::from_secs(20)).await?;
        let sec_events = EventLog::record_from(sec_stream, dir.join("secondary-events.jsonl"));
        let relay = if cfg.relay {
            let netns = cfg.tls.then_some(topology.secondary.as_str());
            Some(RelayProcess::spawn(&dir, netns)?)
        } else {
            None
        };
        let mut proxyd = Vec::new();
        if cfg.network == NetworkBackend::ColoProxyd {
            proxyd.push((
                Role::Secondary,
                proxyd::spawn_secondary(&dir, &topology, &driver)?,
            ));
            proxyd.push((
                Role::Primary,
                proxyd::spawn_primary(&dir, &topology, &driver)?,
            ));
        }
        for (role, daemon) in &proxyd {
            let name = match role {
                Role::Primary => proxyd::PRIMARY_SUBSCRIBER,
                Role::Secondary => proxyd::SECONDARY_SUBSCRIBER,
            };
            daemon
                .wait_subscribed(
                    &driver::relay_control_path(&dir),
                    name,
                    Duration::from_secs(20),
                )
                .await?;
        }
        if let Some(blockd) = &blockd {
            // Its first barrier must already wait for it, or the first epoch's disk writes
            // would be adopted without it.
            blockd
                .wait_subscribed(
                    &driver::relay_control_path(&dir),
                    blockd::SUBSCRIBER_NAME,
                    Duration::from_secs(20),
                )
                .await?;
        }

        Ok(StockPair {
            primary: Some(Vm {
                role: Role::Primary,
                process: pri_proc,
                qmp: pri_qmp,
                events: pri_events,
                serial: dir.join("primary-serial.log"),
                image: dir.join("primary.raw"),
                colo_mark: 0,
            }),
            secondary: Some(Vm {
                role: Role::Secondary,
                process: sec_proc,
                qmp: sec_qmp,
                events: sec_events,
                serial: dir.join("secondary-serial.log"),
                image: driver::secondary_image_path(&dir, &cfg),
                colo_mark: 0,
            }),
            dead: Vec::new(),
            driver,
            relay,
            blockd,
            proxyd,
            small_fs,
            topology,
            dir,
            config: cfg,
        })
    }

    /// The VM in `role`; an error if it is gone.
    pub fn vm(&self, role: Role) -> Result<&Vm> {
        match role {
            Role::Primary => self.primary.as_ref(),
            Role::Secondary => self.secondary.as_ref(),
        }
        .with_context(|| format!("the {} VM is gone", role.name()))
    }

    fn vm_mut(&mut self, role: Role) -> Result<&mut Vm> {
        match role {
            Role::Primary => self.primary.as_mut(),
            Role::Secondary => self.secondary.as_mut(),
        }
        .with_context(|| format!("the {} VM is gone", role.name()))
    }

    /// Starts COLO the way `qmp-driver start` does ([`qmp_driver::pair::start`]: the
    /// secondary prepared, the replication child added, the paused primary migrated, so the
    /// guest boots inside COLO and both disks see every write), then waits for the guest.
    pub async fn enter_colo(&mut self) -> Result<()> {
        let pri = self.vm(Role::Primary)?.qmp.clone();
        let sec = self.vm(Role::Secondary)?.qmp.clone();
        let started = pair::start(
            &pri,
            &sec,
            &self.driver,
            &StartOptions {
                colo_timeout: Duration::from_secs(60),
                ..StartOptions::default()
            },
            &mut |_| {},
        )
        .await;
        if let Err(e) = started {
            bail!(
                "the pair did not enter COLO: {e}; primary: {}; secondary: {}",
                self.vm(Role::Primary)?.process.stderr_tail(),
                self.vm(Role::Secondary)?.process.stderr_tail()
            );
        }
        self.wait_guest_in_colo().await
    }

    /// After COLO was entered (by [`StockPair::enter_colo`] or `qmp-driver start`): checks
    /// both COLO modes, waits until the guest serves, and starts counting checkpoints there.
    pub async fn wait_guest_in_colo(&mut self) -> Result<()> {
        for role in [Role::Primary, Role::Secondary] {
            let mode = self.vm(role)?.qmp.query_colo_status().await?.mode;
            if mode != role.name() {
                bail!("{} reports COLO mode {mode:?}", role.name());
            }
        }
        // A heartbeat means booted too: the guest starts them after COLO-READY, and after a
        // failback the primary's console is a new QEMU's, which never saw the boot.
        self.wait_serial(Role::Primary, Duration::from_secs(90), |s| {
            s.ready || s.last_heartbeat.is_some()
        })
        .await
        .context("the guest did not boot in COLO")?;
        for role in [Role::Primary, Role::Secondary] {
            let vm = self.vm_mut(role)?;
            vm.colo_mark = vm.events.len();
        }
        Ok(())
    }

    /// The secondary takes over after the primary died, with [`qmp_driver::pair`]'s sequence
    /// (the takeover hook of `pair.toml` puts its tap on the host bridge).
    pub async fn failover_to_secondary(&mut self) -> Result<Vec<Step>> {
        let qmp = self.vm(Role::Secondary)?.qmp.clone();
        let report = pair::failover_to_secondary(
            &qmp,
            &self.driver,
            FailoverOptions::default(),
            &mut |_| {},
        )
        .await
        .context("failover to the secondary")?;
        Ok(report.steps)
    }

    /// The primary carries on alone after the secondary died ([`qmp_driver::pair`]).
    pub async fn failover_to_primary(&mut self) -> Result<Vec<Step>> {
        let qmp = self.vm(Role::Primary)?.qmp.clone();
        let report =
            pair::failover_to_primary(&qmp, &self.driver, FailoverOptions::default(), &mut |_| {})
                .await
                .context("failover to the primary")?;
        Ok(report.steps)
    }

    /// Waits until the serial log of `role` satisfies `done`.
    pub async fn wait_serial(
        &self,
        role: Role,
        within: Duration,
        done: impl Fn(&guest::SerialSummary) -> bool,
    ) -> Result<guest::SerialSummary> {
        let deadline = Instant::now() + within;
        let vm = self.vm(role)?;
        loop {
            let summary = vm.serial_summary();
            if done(&summary) {
                return Ok(summary);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} serial log {} did not reach the expected state within {within:?} \
                     (last: {summary:?})",
                    role.name(),
                    vm.serial.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Forces a checkpoint now by re-setting the same `x-checkpoint-delay` on the primary.
    pub async fn request_checkpoint(&self) -> Result<()> {
        let delay = self.config.checkpoint_delay_ms;
        self.vm(Role::Primary)?
            .qmp
            .migrate_set_parameters(json!({ "x-checkpoint-delay": delay }))
            .await?;
        Ok(())
    }

    /// Waits until both sides have completed at least `count` checkpoints since COLO began.
    pub async fn wait_checkpoints(&self, count: usize, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let p = self.vm(Role::Primary)?.checkpoint_pauses().len();
            let s = self.vm(Role::Secondary)?.checkpoint_pauses().len();
            if p >= count && s >= count {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("only {p} (primary) / {s} (secondary) of {count} checkpoints in {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILLs the QEMU of `role`: a fail-stop failure of that host's VM. colo's daemons on
    /// that host die with it, as they would with the host, but after the QEMU: killed first,
    /// a daemon makes the relay end COLO a few milliseconds before the QEMU dies, and the
    /// primary's agent, seeing `COLO_EXIT` with its VM still running, could claim the VM for
    /// itself and then die in its take-over (a double failure the test does not mean; a
    /// crashed daemon is tested on its own, `Failure::RestartDaemon`).
    pub fn kill(&mut self, role: Role) -> Result<()> {
        let mut vm = match role {
            Role::Primary => self.primary.take(),
            Role::Secondary => self.secondary.take(),
        }
        .with_context(|| format!("the {} VM is already gone", role.name()))?;
        vm.process.kill()?;
        self.dead.push(vm);
        if role == Role::Secondary
            && let Some(mut blockd) = self.blockd.take()
        {
            blockd.kill();
        }
        for (host, daemon) in &mut self.proxyd {
            if *host == role {
                daemon.kill();
            }
        }
        Ok(())
    }

    /// The primary's host comes back after a failover to the secondary, for `qmp-driver
    /// failback`: `colo-blockd serve --export base=IMAGE` on `primary.host:(disk.nbd_port + 1)`
    /// (the primary's own, stale image: the copy's target), colo-proxyd primary (subscribed to
    /// the relay, which kept running), and the primary QEMU with its command line and
    /// `-incoming defer` on [`StockPair::failback_incoming`]. Returns the `serve` process
    /// (`--exit-after-client`: it exits once the copy's NBD node is deleted at the switch).
    pub async fn restart_primary_host_for_failback(&mut self) -> Result<DaemonProcess> {
        if self.primary.is_some() {
            bail!("the primary VM still runs");
        }
        let dir = self.dir.clone();
        let relay = driver::relay_control_path(&dir);
        let image = dir.join("primary.raw");
        let mut serve_args = vec![
            "serve".to_string(),
            "--exit-after-client".to_string(),
            "--export".to_string(),
            format!("base={}", image.display()),
            "--tcp".to_string(),
            format!(
                "{}:{}",
                self.driver.primary.host,
                self.driver.disk.nbd_port + 1
            ),
        ];
        // With [tls] the copy arrives under mutual TLS: the primary host's identity, the
        // secondary host the one client allowed.
        if let Some(tls) = &self.driver.tls {
            serve_args.extend([
                "--tls-dir".to_string(),
                tls.primary.dir.display().to_string(),
                "--tls-peer".to_string(),
                tls.secondary.name.clone(),
            ]);
        }
        let mut serve = DaemonProcess::spawn(
            "colo-blockd serve",
            &self.topology.primary,
            &driver::workspace_binary("colo-blockd", "COLO_BLOCKD")?,
            &serve_args,
            dir.join("blockd-serve-primary.log"),
        )?;
        serve.wait_log("serving NBD", Duration::from_secs(10))?;
        self.proxyd.retain(|(host, _)| *host != Role::Primary);
        let proxyd = proxyd::spawn_primary(&dir, &self.topology, &self.driver)?;
        proxyd
            .wait_subscribed(&relay, proxyd::PRIMARY_SUBSCRIBER, Duration::from_secs(20))
            .await?;
        self.proxyd.push((Role::Primary, proxyd));
        let artifacts = Artifacts::locate()?;
        let mut args = qemu_args(&artifacts, Role::Primary, &dir, &self.config, &self.driver)?;
        args.extend(["-incoming".to_string(), "defer".to_string()]);
        let mut process = QemuProcess::spawn(
            &artifacts.qemu,
            &self.topology.primary,
            "primary",
            &dir,
            qmp_path(&dir, Role::Primary),
            &args,
        )?;
        let (qmp, stream) = process.connect_qmp(Duration::from_secs(20)).await?;
        let events = EventLog::record_from(stream, dir.join("primary-events-2.jsonl"));
        self.primary = Some(Vm {
            role: Role::Primary,
            process,
            qmp,
            events,
            serial: dir.join("primary-serial.log"),
            image,
            colo_mark: 0,
        });
        Ok(serve)
    }

    /// Where the primary QEMU of [`StockPair::restart_primary_host_for_failback`] waits for
    /// the migration: a Unix socket in the run directory, as the bed's other migration
    /// sockets.
    pub fn failback_incoming(&self) -> String {
        format!("unix:{}", self.dir.join("primary-incoming.sock").display())
    }

    /// Takes the uplink of `role`'s host down (`eth0` in its namespace): the host goes silent,
    /// with no FIN or RST for anything, while its QEMU and daemons keep running. The relay and
    /// the migration stream are not cut: on the bed they are Unix sockets in the run directory.
    pub fn cut_uplink(&self, role: Role) -> Result<()> {
        let ns = match role {
            Role::Primary => &self.topology.primary,
            Role::Secondary => &self.topology.secondary,
        };
        topology::ip(&["-n", ns, "link", "set", "eth0", "down"])
    }

    /// The processes of `role`'s host the pair runs: its QEMU, colo-proxyd, and on the
    /// secondary's host colo-blockd and the relay (which sits in front of the secondary QEMU's
    /// incoming migration, ARCHITECTURE.md).
    pub fn host_pids(&self, role: Role) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .vm(role)
            .ok()
            .and_then(|vm| vm.process.pid())
            .into_iter()
            .collect();
        pids.extend(
            self.proxyd
                .iter()
                .filter(|(host, _)| *host == role)
                .filter_map(|(_, d)| d.pid()),
        );
        if role == Role::Secondary {
            pids.extend(self.blockd.as_ref().and_then(DaemonProcess::pid));
            pids.extend(self.relay.as_ref().and_then(DriverProcess::pid));
        }
        pids
    }

    /// SIGKILLs one of colo's daemons and starts it again with the same command line.
    pub fn restart_daemon(&mut self, which: Daemon) -> Result<()> {
        let daemon = match which {
            Daemon::Blockd => self.blockd.as_mut(),
            Daemon::Proxyd(role) => self
                .proxyd
                .iter_mut()
                .find(|(host, _)| *host == role)
                .map(|(_, d)| d),
        }
        .with_context(|| format!("the pair runs no {which:?}"))?;
        daemon.restart()
    }

    /// The secondary's host comes back after [`StockPair::kill`] of the secondary (its old
    /// image still there), as an operator brings in a new secondary for an online re-protect
    /// (`qmp-driver reprotect`): `colo-blockd secondary` on the image (it recovers its journal
    /// first), `colo-blockd serve --export base=IMAGE` on `disk.nbd_port + 1` for the copy,
    /// colo-proxyd secondary, and a secondary QEMU waiting with `-incoming defer`, each
    /// subscribed to the relay (which kept running). Returns the `serve` process: stop it
    /// once the re-protect is done.
    pub async fn restart_secondary_host(&mut self) -> Result<DaemonProcess> {
        if self.secondary.is_some() {
            bail!("the secondary VM still runs");
        }
        let dir = self.dir.clone();
        let relay = driver::relay_control_path(&dir);
        let blockd = blockd::spawn(&dir, &self.topology, &self.driver)?;
        blockd
            .wait_subscribed(&relay, blockd::SUBSCRIBER_NAME, Duration::from_secs(20))
            .await?;
        self.blockd = Some(blockd);
        let image = driver::secondary_image_path(&dir, &self.config);
        let target = format!(
            "{}:{}",
            self.driver.secondary.host,
            self.driver.disk.nbd_port + 1
        );
        let mut serve_args = vec![
            "serve".to_string(),
            "--exit-after-client".to_string(),
            "--export".to_string(),
            format!("base={}", image.display()),
            "--tcp".to_string(),
            target,
        ];
        // With [tls] the copy's NBD link is authenticated as the replication child's is: the
        // secondary host's identity, the primary host the one client allowed.
        if let Some(tls) = &self.driver.tls {
            serve_args.extend([
                "--tls-dir".to_string(),
                tls.secondary.dir.display().to_string(),
                "--tls-peer".to_string(),
                tls.primary.name.clone(),
            ]);
        }
        let mut serve = DaemonProcess::spawn(
            "colo-blockd serve",
            &self.topology.secondary,
            &driver::workspace_binary("colo-blockd", "COLO_BLOCKD")?,
            &serve_args,
            dir.join("blockd-serve.log"),
        )?;
        serve.wait_log("serving NBD", Duration::from_secs(10))?;
        self.proxyd.retain(|(host, _)| *host != Role::Secondary);
        let proxyd = proxyd::spawn_secondary(&dir, &self.topology, &self.driver)?;
        proxyd
            .wait_subscribed(
                &relay,
                proxyd::SECONDARY_SUBSCRIBER,
                Duration::from_secs(20),
            )
            .await?;
        self.proxyd.push((Role::Secondary, proxyd));
        let artifacts = Artifacts::locate()?;
        let mut process = QemuProcess::spawn(
            &artifacts.qemu,
            &self.topology.secondary,
            "secondary",
            &dir,
            qmp_path(&dir, Role::Secondary),
            &qemu_args(
                &artifacts,
                Role::Secondary,
                &dir,
                &self.config,
                &self.driver,
            )?,
        )?;
        let (qmp, stream) = process.connect_qmp(Duration::from_secs(20)).await?;
        let events = EventLog::record_from(stream, dir.join("secondary-events-2.jsonl"));
        self.secondary = Some(Vm {
            role: Role::Secondary,
            process,
            qmp,
            events,
            serial: dir.join("secondary-serial.log"),
            image,
            colo_mark: 0,
        });
        Ok(serve)
    }

    /// Checkpoint pauses of `role` since the guest booted, whether it is alive or was killed.
    pub fn checkpoint_pauses(&self, role: Role) -> Vec<Duration> {
        let alive = match role {
            Role::Primary => self.primary.as_ref(),
            Role::Secondary => self.secondary.as_ref(),
        };
        alive
            .or_else(|| self.dead.iter().find(|vm| vm.role == role))
            .map(Vm::checkpoint_pauses)
            .unwrap_or_default()
    }

    /// Stops the survivor's guest, waits for its disk to settle, quits QEMU and checks its
    /// image against the heartbeats it printed.
    pub async fn stop_and_check_disk(&mut self, role: Role) -> Result<guest::DiskCheck> {
        let vm = self.vm(role)?;
        vm.qmp.stop().await?;
        // The serial file is written by QEMU synchronously; a short pause lets the last line
        // that was in flight when the vCPU stopped land.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let last = vm.serial_summary().last_heartbeat.unwrap_or(0);
        let _ = vm.qmp.quit().await;
        let image = vm.image.clone();
        let vm = self.vm_mut(role)?;
        vm.process.wait_exit(Duration::from_secs(20))?;
        if role == Role::Secondary
            && let Some(blockd) = self.blockd.as_mut()
        {
            // The secondary's image is colo-blockd's: it must finish writing it first.
            blockd.stop(Duration::from_secs(20))?;
        }
        guest::check_disk(&image, last)
    }
}
