//! Command lines of the stock pair: the documented COLO wiring, with the bed's addresses.

use std::path::{Path, PathBuf};

use super::{PairConfig, Role};
use crate::artifacts::{Artifacts, FIRMWARE_DIRS};
use crate::guest;
use crate::topology::{self, addr};

/// TCP ports of the pair (on the hosts' own addresses or their loopback).
pub mod port {
    /// filter-mirror output on the primary (secondary's `red0` connects here).
    pub const MIRROR: u16 = 9003;
    /// colo-compare's secondary input on the primary (secondary's `red1` connects here).
    pub const COMPARE_SECONDARY_IN: u16 = 9004;
    /// Loopback pair redirector → colo-compare primary input, on the primary.
    pub const COMPARE_PRIMARY_IN: u16 = 9001;
    /// Loopback pair colo-compare output → redirector, on the primary.
    pub const COMPARE_OUT: u16 = 9005;
    /// The secondary's NBD server for the replicated disk.
    pub const NBD: u16 = 9999;
}

/// Machine type for both VMs (identical device layout is a COLO requirement).
pub const MACHINE: &str = "pc";

/// Arguments both VMs share: machine, guest, serial log, QMP, and the NIC on the host's tap.
fn common_args(a: &Artifacts, role: Role, dir: &Path, cfg: &PairConfig, tap: &str) -> Vec<String> {
    let r = role.name();
    let mut args: Vec<String> = vec![
        "-name".into(),
        format!("{r},debug-threads=on"),
        "-machine".into(),
        format!("{MACHINE},accel=tcg"),
        "-m".into(),
        cfg.memory_mib.to_string(),
        "-smp".into(),
        "1".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
    ];
    for fw in FIRMWARE_DIRS {
        args.extend(["-L".into(), fw.into()]);
    }
    args.extend([
        "-kernel".into(),
        a.kernel.display().to_string(),
        "-initrd".into(),
        a.initrd.display().to_string(),
        "-append".into(),
        guest::kernel_cmdline(addr::GUEST_CIDR, cfg.guest_load_mib_s),
        "-serial".into(),
        format!("file:{}", dir.join(format!("{r}-serial.log")).display()),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp_path(dir, role).display()),
        // A second monitor for the operator's tools: a QMP socket serves one client at a
        // time, and the bed's own connection stays open for the events.
        "-qmp".into(),
        format!(
            "unix:{},server=on,wait=off",
            operator_qmp_path(dir, role).display()
        ),
        "-netdev".into(),
        format!("tap,id=hn0,ifname={tap},script=no,downscript=no,vhost=off,vnet_hdr=off"),
        "-device".into(),
        format!("virtio-net-pci,netdev=hn0,mac={},romfile=", addr::GUEST_MAC),
    ]);
    args
}

/// The operator's QMP socket of `role` (for `qmp-driver` commands run beside the bed).
pub fn operator_qmp_path(dir: &Path, role: Role) -> PathBuf {
    dir.join(format!("{}-qmp-operator.sock", role.name()))
}

pub(super) fn qmp_path(dir: &Path, role: Role) -> PathBuf {
    dir.join(format!("{}-qmp.sock", role.name()))
}

fn chardev(id: &str, host: &str, port: u16, server: bool) -> [String; 2] {
    let mode = if server { ",server=on,wait=off" } else { "" };
    [
        "-chardev".into(),
        format!("socket,id={id},host={host},port={port}{mode},nodelay=on"),
    ]
}

fn object(spec: String) -> [String; 2] {
    ["-object".into(), spec]
}

/// The primary's command line: mirror, redirectors, colo-compare, quorum disk; starts paused.
pub fn primary_args(a: &Artifacts, dir: &Path, cfg: &PairConfig) -> Vec<String> {
    use port::*;
    let host = addr::PRIMARY_HOST;
    let lo = "127.0.0.1";
    let mut args = common_args(a, Role::Primary, dir, cfg, topology::PRIMARY_TAP);
    args.extend(chardev("mirror0", host, MIRROR, true));
    args.extend(chardev("compare1", host, COMPARE_SECONDARY_IN, true));
    args.extend(chardev("compare0", lo, COMPARE_PRIMARY_IN, true));
    args.extend(chardev("compare0-0", lo, COMPARE_PRIMARY_IN, false));
    args.extend(chardev("compare_out", lo, COMPARE_OUT, true));
    args.extend(chardev("compare_out0", lo, COMPARE_OUT, false));
    args.extend(object(
        "filter-mirror,id=m0,netdev=hn0,queue=tx,outdev=mirror0".into(),
    ));
    args.extend(object(
        "filter-redirector,id=redire0,netdev=hn0,queue=rx,indev=compare_out".into(),
    ));
    args.extend(object(
        "filter-redirector,id=redire1,netdev=hn0,queue=rx,outdev=compare0".into(),
    ));
    args.extend(object("iothread,id=iothread1".into()));
    args.extend(object(
        "colo-compare,id=comp0,primary_in=compare0-0,secondary_in=compare1,\
         outdev=compare_out0,iothread=iothread1"
            .into(),
    ));
    args.extend([
        "-drive".into(),
        format!(
            "if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,\
             children.0.file.filename={},children.0.driver=raw",
            dir.join("primary.raw").display()
        ),
        "-device".into(),
        "virtio-blk-pci,drive=colo-disk0".into(),
        "-S".into(),
    ]);
    args
}

/// The secondary's command line: redirectors, rewriter, replication overlays; waits for the
/// incoming migration.
pub fn secondary_args(a: &Artifacts, dir: &Path, cfg: &PairConfig) -> Vec<String> {
    use port::*;
    let primary = addr::PRIMARY_HOST;
    let mut args = common_args(a, Role::Secondary, dir, cfg, topology::SECONDARY_TAP);
    for (id, port) in [("red0", MIRROR), ("red1", COMPARE_SECONDARY_IN)] {
        args.extend([
            "-chardev".into(),
            format!("socket,id={id},host={primary},port={port},reconnect-ms=1000,nodelay=on"),
        ]);
    }
    args.extend(object(
        "filter-redirector,id=f1,netdev=hn0,queue=tx,indev=red0".into(),
    ));
    args.extend(object(
        "filter-redirector,id=f2,netdev=hn0,queue=rx,outdev=red1".into(),
    ));
    args.extend(object(
        "filter-rewriter,id=rew0,netdev=hn0,queue=all".into(),
    ));
    args.extend([
        "-drive".into(),
        format!(
            "if=none,id=parent0,driver=raw,file.filename={}",
            dir.join("secondary.raw").display()
        ),
        "-drive".into(),
        format!(
            "if=none,id=childs0,driver=replication,mode=secondary,file.driver=qcow2,\
             top-id=colo-disk0,file.file.filename={},file.backing.driver=qcow2,\
             file.backing.file.filename={},file.backing.backing=parent0",
            dir.join("secondary-active.qcow2").display(),
            dir.join("secondary-hidden.qcow2").display()
        ),
        "-drive".into(),
        "if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0=childs0"
            .into(),
        "-device".into(),
        "virtio-blk-pci,drive=colo-disk0".into(),
        "-incoming".into(),
        "defer".into(),
    ]);
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_keep_the_documented_topology() {
        let a = Artifacts {
            qemu: "/q".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
        };
        let cfg = PairConfig::default();
        let p = primary_args(&a, Path::new("/run"), &cfg).join(" ");
        let s = secondary_args(&a, Path::new("/run"), &cfg).join(" ");
        assert!(p.contains("colo-compare,id=comp0,primary_in=compare0-0,secondary_in=compare1"));
        assert!(p.contains("vnet_hdr=off") && s.contains("vnet_hdr=off"));
        assert!(s.contains("filter-rewriter,id=rew0,netdev=hn0,queue=all"));
        assert!(s.contains("-incoming defer"));
        for line in p
            .split(" -chardev ")
            .skip(1)
            .chain(s.split(" -chardev ").skip(1))
        {
            let spec = line.split(' ').next().unwrap_or_default();
            assert!(
                spec.contains("nodelay=on"),
                "chardev without nodelay: {spec}"
            );
        }
    }
}
