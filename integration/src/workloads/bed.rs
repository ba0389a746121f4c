//! One setup, booted: the guest alone, beside its twin, or one of the COLO pairs. Every
//! workload runs against a `Bed` and asks it the same questions (where the clients run, how
//! many checkpoints a run caused and why), so each workload's code is the same on every setup.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use colo_types::Role;

use super::{Setup, SuiteConfig};
use crate::artifacts::Artifacts;
use crate::guest;
use crate::process::QemuProcess;
use crate::stock::proxyd::proxyd_reasons;
use crate::stock::{DiskBackend, NetworkBackend, PairConfig, StockPair, bed_args};
use crate::topology::{self, Topology, addr};

/// A guest booted without COLO: the bed's machine and guest, a raw disk, a NIC on `tap`.
pub(super) struct PlainGuest {
    qemu: QemuProcess,
    serial: PathBuf,
}

impl PlainGuest {
    fn boot(
        a: &Artifacts,
        netns: &str,
        tap: &str,
        role: Role,
        dir: &Path,
        cfg: &PairConfig,
    ) -> Result<Self> {
        let image = dir.join(format!("{}.raw", role.name()));
        std::fs::File::create(&image)?.set_len(u64::from(cfg.disk_mib) << 20)?;
        let mut args = bed_args(a, role, dir, cfg);
        args.extend([
            "-global".into(),
            "virtio-device.use-disabled-flag=false".into(),
            "-netdev".into(),
            format!("tap,id=hn0,ifname={tap},script=no,downscript=no,vhost=off,vnet_hdr=off"),
            "-device".into(),
            format!("virtio-net-pci,netdev=hn0,mac={},romfile=", addr::GUEST_MAC),
            "-drive".into(),
            format!(
                "if=none,id=disk0,driver=raw,file.filename={}",
                image.display()
            ),
            "-device".into(),
            "virtio-blk-pci,drive=disk0".into(),
        ]);
        let qmp = dir.join(format!("{}-qmp.sock", role.name()));
        let qemu = QemuProcess::spawn(&a.qemu, netns, role.name(), dir, qmp, &args)?;
        Ok(PlainGuest {
            qemu,
            serial: dir.join(format!("{}-serial.log", role.name())),
        })
    }

    async fn wait_ready(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        while !guest::read_serial(&self.serial).ready {
            if self.qemu.has_exited() {
                bail!(
                    "QEMU exited before the guest booted: {}",
                    self.qemu.stderr_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the guest did not boot within {within:?} ({})",
                    self.serial.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }
}

impl Drop for PlainGuest {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
    }
}

/// The native or twin setup. Fields drop in declaration order: the guests before their
/// namespaces.
pub(super) struct PlainBed {
    twin: Option<PlainGuest>,
    /// Held only to be killed (dropped) before the namespaces.
    _first: PlainGuest,
    topo: Topology,
}

/// A booted setup.
pub(super) enum Bed {
    /// native or twin.
    Plain(Box<PlainBed>),
    /// stock or colo.
    Pair(Box<StockPair>),
}

/// Where a run started: the primary's pauses and colo-proxyd's log length at that moment.
#[derive(Debug, Clone, Copy)]
pub(super) struct Mark {
    pauses: usize,
    log_at: u64,
}

/// The checkpoints one run caused on a COLO pair.
#[derive(Debug, Clone, Default)]
pub(super) struct Checkpoints {
    /// The primary's pauses during the run.
    pub count: usize,
    /// Why colo-proxyd asked for them, by reason (empty on stock COLO: colo-compare does not
    /// say).
    pub reasons: BTreeMap<String, u64>,
}

impl Bed {
    /// Boots `setup` with the suite's guest and pair settings.
    pub async fn boot(tag: &str, dir: &Path, config: &SuiteConfig, setup: Setup) -> Result<Bed> {
        match setup {
            Setup::Native | Setup::Twin => {
                let a = Artifacts::locate()?;
                let topo = Topology::create(&format!("{tag}n"))?;
                let mut first = PlainGuest::boot(
                    &a,
                    &topo.primary,
                    topology::PRIMARY_TAP,
                    Role::Primary,
                    dir,
                    &config.pair,
                )?;
                let mut twin = None;
                if setup == Setup::Twin {
                    // The twin's own segment: host B's tap, with the client's address on host
                    // B's side, so the same guest address answers there without meeting the
                    // first guest.
                    let cidr = format!("{}/24", addr::CLIENT);
                    topology::ip(&[
                        "-n",
                        &topo.secondary,
                        "addr",
                        "add",
                        &cidr,
                        "dev",
                        topology::SECONDARY_TAP,
                    ])?;
                    twin = Some(PlainGuest::boot(
                        &a,
                        &topo.secondary,
                        topology::SECONDARY_TAP,
                        Role::Secondary,
                        dir,
                        &config.pair,
                    )?);
                }
                first.wait_ready(Duration::from_secs(120)).await?;
                if let Some(t) = twin.as_mut() {
                    t.wait_ready(Duration::from_secs(120)).await?;
                }
                Ok(Bed::Plain(Box::new(PlainBed {
                    twin,
                    _first: first,
                    topo,
                })))
            }
            Setup::Stock | Setup::Colo => {
                let cfg = match setup {
                    Setup::Stock => PairConfig {
                        network: NetworkBackend::ColoCompare,
                        disk: DiskBackend::Replication,
                        relay: false,
                        ..config.pair.clone()
                    },
                    _ => PairConfig {
                        network: NetworkBackend::ColoProxyd,
                        disk: DiskBackend::ColoBlockd,
                        relay: true,
                        ..config.pair.clone()
                    },
                };
                let short = if setup == Setup::Stock { "s" } else { "c" };
                let pair =
                    StockPair::start(&format!("{tag}{short}"), dir.to_path_buf(), cfg).await?;
                Ok(Bed::Pair(Box::new(pair)))
            }
        }
    }

    /// The client's namespace (the one that reaches the guest, or the primary of a pair).
    pub fn client_ns(&self) -> &str {
        match self {
            Bed::Plain(plain) => &plain.topo.client,
            Bed::Pair(pair) => &pair.topology.client,
        }
    }

    /// The namespace whose clients load the twin, on the twin setup.
    pub fn twin_ns(&self) -> Option<&str> {
        match self {
            Bed::Plain(plain) if plain.twin.is_some() => Some(&plain.topo.secondary),
            _ => None,
        }
    }

    /// The pair, on the stock and colo setups.
    pub fn pair(&self) -> Option<&StockPair> {
        match self {
            Bed::Pair(pair) => Some(pair),
            Bed::Plain(_) => None,
        }
    }

    fn proxyd_log(pair: &StockPair) -> PathBuf {
        crate::stock::proxyd::primary_log(&pair.dir)
    }

    /// Where a run starts (`None` without COLO).
    pub fn mark(&self) -> Option<Mark> {
        let pair = self.pair()?;
        Some(Mark {
            pauses: pair.checkpoint_pauses(Role::Primary).len(),
            log_at: file_len(&Self::proxyd_log(pair)),
        })
    }

    /// The checkpoints since `mark` (`None` without COLO).
    pub fn checkpoints_since(&self, mark: Option<Mark>) -> Option<Checkpoints> {
        let (pair, mark) = (self.pair()?, mark?);
        Some(Checkpoints {
            count: pair
                .checkpoint_pauses(Role::Primary)
                .len()
                .saturating_sub(mark.pauses),
            reasons: proxyd_reasons(&Self::proxyd_log(pair), mark.log_at),
        })
    }

    /// Runs `work` against the guest from the client's namespace and, on the twin setup, the
    /// same work against the twin at the same time; returns both results (the twin's `None`
    /// elsewhere). `work` gets the namespace its clients must run in.
    pub async fn on_guests<T, F, Fut>(&self, work: F) -> Result<(T, Option<T>)>
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let first = work(self.client_ns().to_string());
        match self.twin_ns() {
            Some(ns) => {
                let (a, b) = tokio::join!(first, work(ns.to_string()));
                Ok((a?, Some(b.context("on the twin")?)))
            }
            None => Ok((first.await?, None)),
        }
    }
}

/// Runs `f` on a fresh OS thread, started at once, and returns its result to await. Fresh, not
/// tokio's blocking pool: a client that joins a network namespace (`setns`) must not leave a
/// pooled thread in it.
pub(super) fn on_thread<T, F>(name: &str, f: F) -> impl Future<Output = Result<T>> + use<T, F>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let name = name.to_string();
    let spawned = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let _ = tx.send(f());
        });
    async move {
        spawned.with_context(|| format!("spawning thread {name}"))?;
        rx.await
            .with_context(|| format!("thread {name} vanished"))?
    }
}

/// Moves the calling thread into network namespace `name`; only for threads of our own (see
/// [`on_thread`]). The bed's HTTP client does the same for its requests (`client.rs`); this one
/// serves the echo clients, which need a plain socket.
pub(super) fn enter_netns(name: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(format!("/run/netns/{name}"))
        .with_context(|| format!("opening namespace {name}"))?;
    // SAFETY: the fd is a valid namespace file for the duration of the call; setns only
    // changes this thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns({name}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}
