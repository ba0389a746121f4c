//! Locating and launching the QEMU the real-QEMU tests use (the `qemu` tier): the patched build
//! `integration/setup.sh` installs, or `$COLO_QEMU`.

use colo_qmp::{ConnectOptions, QmpClient, QmpError};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// The QEMU binary: `$COLO_QEMU`, else the patched build installed by
/// `integration/setup.sh` under `${COLO_CACHE:-/var/cache/colo}`.
pub fn qemu_binary() -> Result<PathBuf, String> {
    if let Some(explicit) = std::env::var_os("COLO_QEMU") {
        let path = PathBuf::from(explicit);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "COLO_QEMU={} does not exist; unset it or run integration/setup.sh",
                path.display()
            ))
        };
    }
    let cache = std::env::var_os("COLO_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/colo"));
    let path = cache.join("qemu/bin/qemu-system-x86_64");
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "no QEMU found: COLO_QEMU is unset and {} does not exist. \
             Run integration/setup.sh to build the patched QEMU, or set COLO_QEMU \
             to a qemu-system-x86_64 binary",
            path.display()
        ))
    }
}

/// A QEMU process with a QMP socket in a private temp dir. Killed on drop.
#[derive(Debug)]
pub struct Qemu {
    pub child: Child,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Qemu {
    /// Starts `qemu -nodefaults -display none -S -qmp unix:...` with the
    /// given machine arguments and waits for the socket to appear.
    pub async fn start(machine_args: &[&str]) -> Qemu {
        let binary = qemu_binary().unwrap_or_else(|msg| panic!("{msg}"));
        let dir = tempfile::Builder::new()
            .prefix("qmp-test")
            .tempdir()
            .expect("tempdir");
        let socket = dir.path().join("qmp.sock");
        let mut child = Command::new(&binary)
            .args(machine_args)
            .args(["-nodefaults", "-display", "none", "-S", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        wait_for_socket(&mut child, &socket).await;
        Qemu {
            child,
            socket,
            _dir: dir,
        }
    }

    /// `-machine none` QEMU, the cheapest thing that speaks QMP.
    pub async fn start_none() -> Qemu {
        Self::start(&["-machine", "none"]).await
    }

    /// Connects, retrying "connection refused": QEMU creates the socket
    /// file at bind() and listens a moment later, so the file existing does
    /// not yet mean connect() succeeds.
    pub async fn connect(&self) -> QmpClient {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match QmpClient::connect_unix(&self.socket, ConnectOptions::default()).await {
                Ok(client) => return client,
                Err(QmpError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::ConnectionRefused
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("connect to {}: {e}", self.socket.display()),
            }
        }
    }

    /// Waits for QEMU to exit by itself, returning whether it did in time.
    pub async fn exited_within(&mut self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.child.wait()).await.is_ok()
    }
}

async fn wait_for_socket(child: &mut Child, socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("QEMU exited before creating its QMP socket: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "QEMU did not create {} within 20 s",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCG QEMU (`qemu`) for the tiny guest of `integration/make-guest.sh`
/// (`${COLO_CACHE:-/var/cache/colo}/guest`): `mib` MiB of RAM, the guest's console in `serial`,
/// its address `colo_ip` (CIDR), no NIC and no disk yet. Add devices, `-qmp` and the like
/// before spawning.
pub fn tiny_guest(qemu: &Path, mib: u32, serial: &Path, colo_ip: &str) -> std::process::Command {
    let guest = std::env::var_os("COLO_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/colo"))
        .join("guest");
    let mut q = std::process::Command::new(qemu);
    q.args([
        "-machine",
        "pc,accel=tcg",
        "-m",
        &mib.to_string(),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-L",
        "/usr/share/qemu",
        "-L",
        "/usr/share/seabios",
    ])
    .arg("-kernel")
    .arg(guest.join("vmlinuz"))
    .arg("-initrd")
    .arg(guest.join("initrd.img"))
    .args([
        "-append",
        // no_timer_check: the IO-APIC timer test can panic a TCG guest on a loaded host.
        &format!("console=ttyS0 quiet panic=-1 no_timer_check colo_ip={colo_ip} colo_load=0"),
    ])
    .arg("-serial")
    .arg(format!("file:{}", serial.display()))
    .stdout(std::process::Stdio::null());
    q
}

/// [`tiny_guest`] with its NIC on a vhost-user back-end: `mib` MiB of shared memfd RAM
/// (vhost-user maps it), the virtio-net device with `mac` on the socket `socket` (QEMU the
/// client, reconnecting every second when `reconnect`).
pub fn tiny_guest_on_vhost_user(
    qemu: &Path,
    mib: u32,
    serial: &Path,
    colo_ip: &str,
    socket: &Path,
    reconnect: bool,
    mac: &str,
) -> std::process::Command {
    let reconnect = if reconnect { ",reconnect-ms=1000" } else { "" };
    let mut q = tiny_guest(qemu, mib, serial, colo_ip);
    q.args([
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mib}M,share=on"),
        "-numa",
        "node,memdev=mem",
    ])
    .arg("-chardev")
    .arg(format!("socket,id=c,path={}{reconnect}", socket.display()))
    .args([
        "-netdev",
        "vhost-user,id=n,chardev=c",
        "-device",
        &format!("virtio-net-pci,netdev=n,mac={mac}"),
    ]);
    q
}
