//! Command lines of the stock pair: the COLO wiring from `qmp-driver`'s generator
//! ([`qmp_driver::qemu_args`], what an operator gets from `qmp-driver qemu-args`), plus what the
//! bed adds around it (machine, guest kernel, serial log, the bed's own QMP monitor).

use std::path::{Path, PathBuf};

use anyhow::Result;
use colo_types::Role;
use qmp_driver::config::PairConfig as DriverConfig;

use super::PairConfig;
use crate::artifacts::{Artifacts, FIRMWARE_DIRS};
use crate::guest;
use crate::topology::addr;

/// Machine type for both VMs (identical device layout is a COLO requirement).
pub const MACHINE: &str = "pc";

/// The bed's own QMP socket of `role` (events and the harness' commands).
pub(super) fn qmp_path(dir: &Path, role: Role) -> PathBuf {
    dir.join(format!("{}-qmp.sock", role.name()))
}

/// Where [`PairConfig::capture`] writes `role`'s NIC traffic.
pub fn capture_path(dir: &Path, role: Role) -> PathBuf {
    dir.join(format!("{}-nic.pcap", role.name()))
}

/// What the bed adds to the generated COLO arguments: machine, guest, serial log and its
/// own QMP monitor. The workload suite boots its guests without COLO on the same arguments.
pub(crate) fn bed_args(a: &Artifacts, role: Role, dir: &Path, cfg: &PairConfig) -> Vec<String> {
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
        // Timestamps on QEMU's own messages, to line them up with the event log.
        "-msg".into(),
        "timestamp=on".into(),
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
    ]);
    args
}

/// The full command line of `role`: the bed's arguments, then the generated COLO wiring.
pub fn qemu_args(
    a: &Artifacts,
    role: Role,
    dir: &Path,
    cfg: &PairConfig,
    driver: &DriverConfig,
) -> Result<Vec<String>> {
    let mut args = bed_args(a, role, dir, cfg);
    args.extend(qmp_driver::qemu_args::colo_args(driver, role)?);
    if cfg.capture {
        // Last in the chain: a filter sees what the filters before it inject toward the
        // guest (the mirror's and colo-proxyd's packets) and the guest's output before any
        // redirector takes it.
        args.extend([
            "-object".into(),
            format!(
                "filter-dump,id=colo-capture,netdev={},queue=all,file={}",
                driver.network.netdev,
                capture_path(dir, role).display()
            ),
        ]);
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bed_adds_its_monitor_and_guest_to_the_generated_wiring() {
        let a = Artifacts {
            qemu: "/q".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
        };
        let driver = DriverConfig::from_toml(
            r#"
            name = "t"
            [primary]
            qmp = "unix:/run/p-op.sock"
            host = "192.168.77.1"
            [secondary]
            qmp = "unix:/run/s-op.sock"
            host = "192.168.77.2"
            [migration]
            secondary_incoming = "unix:/run/incoming.sock"
            [vm]
            tap = "tap-p"
            secondary_tap = "tap-s"
            mac = "52:54:00:c0:10:01"
            memory_mib = 128
            primary_image = "/run/primary.raw"
            secondary_image = "/run/secondary.raw"
            secondary_active = "/run/a.qcow2"
            secondary_hidden = "/run/h.qcow2"
            "#,
            "test",
        )
        .expect("valid config");
        let cfg = PairConfig::default();
        let dir = Path::new("/run");
        let p = qemu_args(&a, Role::Primary, dir, &cfg, &driver)
            .expect("primary args")
            .join(" ");
        let s = qemu_args(&a, Role::Secondary, dir, &cfg, &driver)
            .expect("secondary args")
            .join(" ");
        assert!(p.contains("-qmp unix:/run/primary-qmp.sock,server=on,wait=off"));
        assert!(p.contains("-qmp unix:/run/p-op.sock,server=on,wait=off"));
        assert!(p.contains("colo-compare,id=comp0,primary_in=compare0-0,secondary_in=compare1"));
        assert!(p.contains("ifname=tap-p") && s.contains("ifname=tap-s"));
        assert!(p.ends_with("-S"));
        assert!(s.contains("-incoming defer"));
        assert!(s.contains("-kernel /k -initrd /i"));
        assert!(!p.contains("memory-backend") && !s.contains("memory-backend"));
    }

    /// With memfd RAM both VMs get the shared backend the size of the bed's `-m` (QEMU refuses
    /// a size mismatch), next to the bed's own `-machine pc,accel=tcg`.
    #[test]
    fn memfd_ram_matches_the_beds_memory_size_on_both_roles() {
        let a = Artifacts {
            qemu: "/q".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
        };
        let cfg = PairConfig {
            memory_mib: 192,
            memfd_ram: true,
            ..PairConfig::default()
        };
        let driver = DriverConfig::from_toml(
            &format!(
                r#"
                name = "t"
                [primary]
                qmp = "unix:/run/p-op.sock"
                host = "192.168.77.1"
                [secondary]
                qmp = "unix:/run/s-op.sock"
                host = "192.168.77.2"
                [migration]
                secondary_incoming = "unix:/run/incoming.sock"
                [vm]
                tap = "tap-p"
                mac = "52:54:00:c0:10:01"
                memory_mib = {}
                memory_backend = "memfd"
                primary_image = "/run/primary.raw"
                secondary_image = "/run/secondary.raw"
                secondary_active = "/run/a.qcow2"
                secondary_hidden = "/run/h.qcow2"
                "#,
                cfg.memory_mib
            ),
            "test",
        )
        .expect("valid config");
        for role in [Role::Primary, Role::Secondary] {
            let line = qemu_args(&a, role, Path::new("/run"), &cfg, &driver)
                .expect("args")
                .join(" ");
            assert!(line.contains("-machine pc,accel=tcg -m 192 "), "{line}");
            assert!(
                line.contains(
                    "-object memory-backend-memfd,id=colo-ram0,size=192M,share=on \
                     -machine memory-backend=colo-ram0"
                ),
                "{line}"
            );
        }
    }
}
