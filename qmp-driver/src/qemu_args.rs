//! The COLO-specific QEMU arguments of both roles of the **stock** setup
//! (QEMU's own colo-compare, filter-mirror, filter-redirector,
//! filter-rewriter, quorum and replication), generated from a
//! [`PairConfig`].
//!
//! The wiring is the one QEMU's COLO documentation gives, with the changes
//! measured on the test bed (`docs/qemu-versions.md`): `nodelay=on` on every
//! chardev socket, taps with `vhost=off,vnet_hdr=off` (so no filter needs
//! `vnet_hdr_support`), `-incoming defer` on the secondary (x-colo must be
//! set before `migrate-incoming`), and `-S` on the primary (it migrates while
//! still paused, so the guest boots inside COLO and both disks see every
//! write).
//!
//! Left to the caller: `-machine`, `-accel`, `-cpu`, `-m` (the secondary
//! needs about twice the guest RAM free: RAM plus the COLO cache), `-smp`,
//! firmware, kernel or boot disk options, `-name`, serial and display. Both
//! VMs must get the same machine type and device layout.
//!
//! With `vm.memory_backend = "memfd"` both roles also get the guest RAM as a
//! shared memfd object ([`RAM_BACKEND_ID`], `vm.memory_mib` MiB) and a second
//! `-machine memory-backend=` naming it; QEMU merges that into the caller's
//! `-machine pc,...`, and refuses to start unless the caller's `-m` is the same
//! size ("Machine memory size does not match the size of the memory backend").
//!
//! The object and chardev ids are fixed ([`colo_types::qemu_ids`]): the failover sequences in
//! [`crate::pair`] delete exactly these.
//!
//! With `disk.backend = "colo-blockd"` the secondary's disk is an NBD client
//! of colo-blockd's `svm` export instead of the replication overlays, and the
//! primary's quorum child (added at `start`) writes to its `replica` export.
//! With `network.backend = "colo-proxyd"` there is no colo-compare and no
//! filter-rewriter: the filters' chardevs of both roles connect (with
//! `reconnect-ms`) to the host's colo-proxyd on its loopback, which serves only
//! QEMU's uid (docs/security.md).

use crate::config::{
    BLOCKD_SVM_EXPORT, DiskBackend, MemoryBackend, NetworkBackend, PairConfig, TLS_AUTHZ_ID,
    TLS_CREDS_ID, TLS_SERVER_CREDS_ID, TlsHost, VmConfig,
};
use colo_types::{Address, Role};
use std::path::Path;

/// Reconnect period of the secondary's chardev clients (`reconnect-ms`,
/// QEMU ≥ 9.2).
pub const RECONNECT_MS: u32 = 1000;

/// The id of the guest RAM's backend object with `vm.memory_backend = "memfd"`.
pub const RAM_BACKEND_ID: &str = "colo-ram0";

/// Why no arguments could be generated.
#[derive(Debug, thiserror::Error)]
pub enum QemuArgsError {
    /// The config has no `[vm]` section (tap, MAC, image paths).
    #[error(
        "the config has no [vm] section: the command line needs vm.tap, vm.mac and the image \
         paths (see qemu-configs/pair.example.toml)"
    )]
    MissingVm,
    /// The replication backend needs both overlay paths.
    #[error("{0} is required with disk.backend = \"replication\"")]
    MissingOverlay(&'static str),
}

/// The arguments for `role`.
pub fn colo_args(cfg: &PairConfig, role: Role) -> Result<Vec<String>, QemuArgsError> {
    match role {
        Role::Primary => primary_args(cfg),
        Role::Secondary => secondary_args(cfg),
    }
}

/// Escapes a value for QEMU's option syntax (a `,` is written `,,`).
pub fn escape_value(value: &str) -> String {
    value.replace(',', ",,")
}

fn path_value(p: &Path) -> String {
    escape_value(&p.display().to_string())
}

/// `-qmp` argument value for a QMP endpoint: QEMU listens there.
fn qmp_value(ep: &Address) -> String {
    match ep {
        Address::Unix(p) => format!("unix:{},server=on,wait=off", path_value(p)),
        Address::Tcp { .. } => format!("{ep},server=on,wait=off"),
    }
}

/// The options of a server chardev that accepts only the other host's QEMU over TLS.
fn tls_server_options() -> String {
    format!(",tls-creds={TLS_SERVER_CREDS_ID},tls-authz={TLS_AUTHZ_ID}")
}

/// Builds an argument list pair by pair.
struct Args(Vec<String>);

impl Args {
    fn opt(&mut self, flag: &str, value: impl Into<String>) -> &mut Self {
        self.0.push(flag.to_string());
        self.0.push(value.into());
        self
    }

    fn chardev_server(&mut self, id: &str, host: &str, port: u16) -> &mut Self {
        self.chardev_server_tls(id, host, port, "")
    }

    /// A server chardev; `tls` is empty or [`tls_server_options`].
    fn chardev_server_tls(&mut self, id: &str, host: &str, port: u16, tls: &str) -> &mut Self {
        self.opt(
            "-chardev",
            format!("socket,id={id},host={host},port={port},server=on,wait=off,nodelay=on{tls}"),
        )
    }

    fn chardev_client(&mut self, id: &str, host: &str, port: u16, reconnect: bool) -> &mut Self {
        self.chardev_client_tls(id, host, port, reconnect, "")
    }

    /// A client chardev; `tls` is empty or `,tls-creds=`[`TLS_CREDS_ID`]. QEMU checks the
    /// server's certificate against `host` (an address: `qmp-driver pki --address`).
    fn chardev_client_tls(
        &mut self,
        id: &str,
        host: &str,
        port: u16,
        reconnect: bool,
        tls: &str,
    ) -> &mut Self {
        let reconnect = if reconnect {
            format!(",reconnect-ms={RECONNECT_MS}")
        } else {
            String::new()
        };
        self.opt(
            "-chardev",
            format!("socket,id={id},host={host},port={port}{reconnect},nodelay=on{tls}"),
        )
    }

    /// The TLS client object [`TLS_CREDS_ID`]: QEMU presents `host`'s client-cert.pem.
    fn tls_client(&mut self, host: &TlsHost) -> &mut Self {
        self.opt(
            "-object",
            format!(
                "tls-creds-x509,id={TLS_CREDS_ID},dir={},endpoint=client",
                path_value(&host.dir)
            ),
        )
    }

    /// The TLS server object [`TLS_SERVER_CREDS_ID`] with `host`'s server-cert.pem, which
    /// requires a client certificate of the pair's CA, and the `authz-list` of
    /// [`crate::config::peer_authz`], which allows only `peer`'s.
    fn tls_server(&mut self, host: &TlsHost, peer: &TlsHost) -> &mut Self {
        let authz = crate::config::peer_authz(peer);
        self.opt(
            "-object",
            format!(
                "tls-creds-x509,id={TLS_SERVER_CREDS_ID},dir={},endpoint=server,verify-peer=on",
                path_value(&host.dir)
            ),
        )
        .opt("-object", authz.to_string())
    }

    /// The guest RAM's backend, if not QEMU's default. Migration, and so every COLO
    /// checkpoint, finds the secondary's RAM by RAMBlock name, which is the backend's id
    /// (`colo-ram0`, not the default `pc.ram`): both VMs must get the same backend.
    fn ram(&mut self, vm: &VmConfig) -> &mut Self {
        match vm.memory_backend {
            MemoryBackend::Anonymous => self,
            MemoryBackend::Memfd => self
                .opt(
                    "-object",
                    format!(
                        "memory-backend-memfd,id={RAM_BACKEND_ID},size={}M,share=on",
                        vm.memory_mib
                    ),
                )
                .opt("-machine", format!("memory-backend={RAM_BACKEND_ID}")),
        }
    }

    /// RAM, QMP, the tap netdev and the NIC: identical on both sides but for the
    /// tap and the socket.
    fn common(&mut self, cfg: &PairConfig, vm: &VmConfig, role: Role) -> &mut Self {
        let netdev = &cfg.network.netdev;
        self.ram(vm);
        // A virtio device whose guest clears PCI bus mastering is "disabled"; QEMU migrates
        // that flag only while it is set (subsection `virtio/disabled`). A COLO secondary
        // loads every checkpoint into a live device, so once a checkpoint carried
        // `disabled=true` (the firmware clears bus mastering while it enumerates) a later one
        // without the subsection leaves it set: the SVM's NIC then never sends or receives,
        // and the pair silently degrades to releasing every packet at the periodic checkpoint.
        // Machine types before 4.2 run without the flag; so do both COLO VMs.
        self.opt("-global", "virtio-device.use-disabled-flag=false")
            .opt("-qmp", qmp_value(&cfg.host(role).qmp));
        if let Some(watch) = &cfg.host(role).watch_qmp {
            self.opt("-qmp", qmp_value(watch));
        }
        self.opt(
            "-netdev",
            format!(
                "tap,id={netdev},ifname={},script=no,downscript=no,vhost=off,vnet_hdr=off",
                vm.tap_for(role)
            ),
        )
        .opt(
            "-device",
            format!("virtio-net-pci,netdev={netdev},mac={},romfile=", vm.mac),
        )
    }
}

/// The primary: mirror, redirectors, colo-compare (or the chardevs that connect
/// to colo-proxyd), the quorum disk; starts paused (`-S`) and migrates into
/// COLO before the guest runs.
pub fn primary_args(cfg: &PairConfig) -> Result<Vec<String>, QemuArgsError> {
    use colo_types::qemu_ids::*;
    let vm = cfg.vm.as_ref().ok_or(QemuArgsError::MissingVm)?;
    let net = &cfg.network;
    let netdev = &net.netdev;
    let host = &cfg.primary.host;
    let lo = "127.0.0.1";
    let mut a = Args(Vec::new());
    a.common(cfg, vm, Role::Primary);
    match net.backend {
        NetworkBackend::ColoCompare => {
            // The two sockets the secondary's QEMU connects to, across the hosts: with [tls]
            // only its certificate may (the loopback pair below stays inside this QEMU).
            let tls = match &cfg.tls {
                Some(tls) => {
                    a.tls_server(&tls.primary, &tls.secondary);
                    tls_server_options()
                }
                None => String::new(),
            };
            a.chardev_server_tls(MIRROR_CHARDEV, host, net.mirror_port, &tls)
                .chardev_server_tls(COMPARE_SECONDARY_IN, host, net.compare_port, &tls)
                .chardev_server(COMPARE_PRIMARY_IN_SERVER, lo, net.compare_primary_in_port)
                .chardev_client(
                    COMPARE_PRIMARY_IN_CLIENT,
                    lo,
                    net.compare_primary_in_port,
                    false,
                )
                .chardev_server(COMPARE_OUT_SERVER, lo, net.compare_out_port)
                .chardev_client(COMPARE_OUT_CLIENT, lo, net.compare_out_port, false);
        }
        // All three connect to colo-proxyd primary on the primary's loopback, which serves
        // only QEMU's uid (a server chardev of QEMU's would take any local user that
        // connects first); the SVM's output reaches the daemon over the daemons' link, not
        // through QEMU.
        NetworkBackend::ColoProxyd => {
            if let Some(qmp) = &net.proxyd_qmp {
                a.opt("-qmp", qmp_value(qmp));
            }
            a.chardev_client(MIRROR_CHARDEV, lo, net.mirror_port, true)
                .chardev_client(
                    COMPARE_PRIMARY_IN_SERVER,
                    lo,
                    net.compare_primary_in_port,
                    true,
                )
                .chardev_client(COMPARE_OUT_SERVER, lo, net.compare_out_port, true);
        }
    }
    a.opt(
        "-object",
        format!(
            "filter-mirror,id={MIRROR_FILTER},netdev={netdev},queue=tx,outdev={MIRROR_CHARDEV}"
        ),
    )
    .opt(
        "-object",
        format!(
            "filter-redirector,id={COMPARE_OUT_REDIRECTOR},netdev={netdev},queue=rx,\
             indev={COMPARE_OUT_SERVER}"
        ),
    )
    .opt(
        "-object",
        format!(
            "filter-redirector,id={COMPARE_IN_REDIRECTOR},netdev={netdev},queue=rx,\
             outdev={COMPARE_PRIMARY_IN_SERVER}"
        ),
    );
    if net.backend == NetworkBackend::ColoCompare {
        a.opt("-object", format!("iothread,id={COMPARE_IOTHREAD}"))
            .opt(
                "-object",
                format!(
                    "colo-compare,id={COMPARE},primary_in={COMPARE_PRIMARY_IN_CLIENT},\
                     secondary_in={COMPARE_SECONDARY_IN},outdev={COMPARE_OUT_CLIENT},\
                     iothread={COMPARE_IOTHREAD}"
                ),
            );
    }
    if let Some(tls) = &cfg.tls {
        // The primary's one TLS client object, named in `tls-creds` by `start` for the
        // migration and for the NBD child (colo-blockd's `replica`, or the secondary QEMU's
        // export): QEMU presents the primary host's client-cert.pem and checks the relay's and
        // the NBD server's certificate against `tls-hostname` (the secondary host's name).
        a.tls_client(&tls.primary);
    }
    a.opt(
        "-drive",
        format!(
            "if=none,id={},driver=quorum,read-pattern=fifo,vote-threshold=1,\
             children.0.file.filename={},children.0.driver={}",
            cfg.disk.device,
            path_value(&vm.primary_image),
            vm.image_format.driver()
        ),
    )
    .opt(
        "-device",
        format!("virtio-blk-pci,drive={}", cfg.disk.device),
    );
    a.0.push("-S".to_string());
    Ok(a.0)
}

/// The secondary: redirectors (to the primary's colo-compare, or to the local
/// colo-proxyd), the rewriter (colo-compare only: colo-proxyd rewrites
/// itself), the disk (replication overlays, or colo-blockd's export); waits
/// for `migrate-incoming` (`-incoming defer`).
pub fn secondary_args(cfg: &PairConfig) -> Result<Vec<String>, QemuArgsError> {
    use colo_types::qemu_ids::*;
    let vm = cfg.vm.as_ref().ok_or(QemuArgsError::MissingVm)?;
    let net = &cfg.network;
    let netdev = &net.netdev;
    let disk = &cfg.disk;
    // Where the redirectors' sockets are served: the primary's colo-compare, or
    // colo-proxyd secondary on this host's loopback.
    let peer = match net.backend {
        NetworkBackend::ColoCompare => cfg.primary.host.as_str(),
        NetworkBackend::ColoProxyd => "127.0.0.1",
    };
    let mut a = Args(Vec::new());
    a.common(cfg, vm, Role::Secondary);
    if net.backend == NetworkBackend::ColoProxyd
        && let Some(qmp) = &net.proxyd_secondary_qmp
    {
        a.opt("-qmp", qmp_value(qmp));
    }
    // With [tls] on the stock stack: the client object for the chardevs to the primary's
    // colo-compare, and the server object for QEMU's NBD server, which `start` names.
    let mut chardev_tls = String::new();
    if let Some(tls) = &cfg.tls {
        if net.backend == NetworkBackend::ColoCompare {
            a.tls_client(&tls.secondary);
            chardev_tls = format!(",tls-creds={TLS_CREDS_ID}");
        }
        if disk.backend == DiskBackend::Replication {
            a.tls_server(&tls.secondary, &tls.primary);
        }
    }
    a.chardev_client_tls(
        SECONDARY_MIRROR_IN,
        peer,
        net.mirror_port,
        true,
        &chardev_tls,
    )
    .chardev_client_tls(SECONDARY_OUT, peer, net.compare_port, true, &chardev_tls)
    .opt(
        "-object",
        format!(
            "filter-redirector,id={SECONDARY_IN_REDIRECTOR},netdev={netdev},queue=tx,\
                 indev={SECONDARY_MIRROR_IN}"
        ),
    )
    .opt(
        "-object",
        format!(
            "filter-redirector,id={SECONDARY_OUT_REDIRECTOR},netdev={netdev},queue=rx,\
                 outdev={SECONDARY_OUT}"
        ),
    );
    if net.backend == NetworkBackend::ColoCompare {
        a.opt(
            "-object",
            format!("filter-rewriter,id={REWRITER},netdev={netdev},queue=all"),
        );
    }
    match disk.backend {
        DiskBackend::Replication => replication_disk(&mut a, cfg, vm)?,
        DiskBackend::ColoBlockd => blockd_disk(&mut a, cfg),
    }
    a.opt("-device", format!("virtio-blk-pci,drive={}", disk.device))
        .opt("-incoming", "defer");
    Ok(a.0)
}

/// The stock secondary disk: the exported base image, the replication
/// driver's overlays above it, and a quorum on top (the failover sequence
/// works on the quorum of both sides alike).
fn replication_disk(a: &mut Args, cfg: &PairConfig, vm: &VmConfig) -> Result<(), QemuArgsError> {
    use colo_types::qemu_ids::*;
    let disk = &cfg.disk;
    let overlay = |p: &Option<std::path::PathBuf>, key: &'static str| {
        p.as_deref()
            .map(path_value)
            .ok_or(QemuArgsError::MissingOverlay(key))
    };
    let active = overlay(&vm.secondary_active, "vm.secondary_active")?;
    let hidden = overlay(&vm.secondary_hidden, "vm.secondary_hidden")?;
    a.opt(
        "-drive",
        format!(
            "if=none,id={},driver={},file.filename={}",
            disk.export,
            vm.image_format.driver(),
            path_value(&vm.secondary_image)
        ),
    )
    .opt(
        "-drive",
        format!(
            "if=none,id={SECONDARY_REPLICATION_DRIVE},driver=replication,mode=secondary,\
             file.driver=qcow2,top-id={},file.file.filename={active},file.backing.driver=qcow2,\
             file.backing.file.filename={hidden},file.backing.backing={}",
            disk.device, disk.export
        ),
    )
    .opt(
        "-drive",
        format!(
            "if=none,id={},driver=quorum,read-pattern=fifo,vote-threshold=1,\
             children.0={SECONDARY_REPLICATION_DRIVE}",
            disk.device
        ),
    );
    Ok(())
}

/// How long the SVM's disk requests wait for colo-blockd to come back (`reconnect-delay`):
/// a colo-blockd restarted by its supervisor (after a failover, when the SVM is the VM) must
/// not fail the guest's I/O. QEMU retries the connection and replays the paused requests.
pub const SVM_DISK_RECONNECT_SECS: u32 = 15;

/// The colo-blockd secondary disk: an NBD client of colo-blockd's `svm`
/// export, over its Unix socket when one is configured, under a quorum of one
/// child as on the primary. The image itself belongs to colo-blockd
/// (`vm.secondary_image` is its `--image`).
///
/// Why the quorum: after a failover this VM is the one that serves, and a re-protect from it
/// (failback) must add a replication child to its disk with `x-blockdev-change`, which only a
/// quorum takes; QEMU cannot put a node above a device's root while the guest runs. Reads
/// and writes pass through to the one child (vote-threshold=1, read-pattern=fifo).
fn blockd_disk(a: &mut Args, cfg: &PairConfig) {
    use colo_types::qemu_ids::SECONDARY_BLOCKD_DRIVE;
    let disk = &cfg.disk;
    let server = match &disk.blockd_socket {
        Some(path) => format!("server.type=unix,server.path={}", path_value(path)),
        None => format!(
            "server.type=inet,server.host={},server.port={}",
            cfg.secondary.host, disk.nbd_port
        ),
    };
    a.opt(
        "-drive",
        format!(
            "if=none,id={SECONDARY_BLOCKD_DRIVE},driver=nbd,{server},\
             export={BLOCKD_SVM_EXPORT},reconnect-delay={SVM_DISK_RECONNECT_SECS}"
        ),
    )
    .opt(
        "-drive",
        format!(
            "if=none,id={},driver=quorum,read-pattern=fifo,vote-threshold=1,\
             children.0={SECONDARY_BLOCKD_DRIVE}",
            disk.device
        ),
    );
}

/// Quotes one argument for a POSIX shell (only when needed).
pub fn shell_quote(arg: &str) -> String {
    let safe = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c));
    if safe {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// The arguments as one shell line, each quoted when needed.
pub fn shell_line(args: &[String]) -> String {
    args.iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> PairConfig {
        let text = format!(
            r#"
            name = "vm1"
            [primary]
            qmp = "unix:/run/colo/vm1/primary.qmp"
            host = "192.168.77.1"
            [secondary]
            qmp = "tcp:192.168.77.2:4444"
            host = "192.168.77.2"
            [migration]
            secondary_incoming = "tcp:192.168.77.2:9998"
            [vm]
            tap = "tap-p"
            secondary_tap = "tap-s"
            mac = "52:54:00:12:34:56"
            memory_mib = 128
            primary_image = "/img/primary.raw"
            secondary_image = "/img/secondary.raw"
            secondary_active = "/img/active.qcow2"
            secondary_hidden = "/img/hidden,weird.qcow2"
            {extra}
            "#
        );
        PairConfig::from_toml(&text, "test").unwrap()
    }

    /// `(flag, value)` pairs; lone flags get an empty value.
    fn pairs(args: &[String]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut it = args.iter().peekable();
        while let Some(flag) = it.next() {
            assert!(flag.starts_with('-'), "value without flag: {flag}");
            let value = match it.peek() {
                Some(v) if !v.starts_with('-') => it.next().cloned().unwrap_or_default(),
                _ => String::new(),
            };
            out.push((flag.clone(), value));
        }
        out
    }

    fn values<'a>(pairs: &'a [(String, String)], flag: &str) -> Vec<&'a str> {
        pairs
            .iter()
            .filter(|(f, _)| f == flag)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn id_of(spec: &str) -> &str {
        spec.split(',')
            .find_map(|kv| kv.strip_prefix("id="))
            .unwrap_or_default()
    }

    #[test]
    fn memfd_ram_is_the_same_shared_backend_on_both_roles() {
        let cfg = config("memory_backend = \"memfd\"");
        for role in [Role::Primary, Role::Secondary] {
            let p = pairs(&colo_args(&cfg, role).unwrap());
            let memfd: Vec<&str> = values(&p, "-object")
                .into_iter()
                .filter(|o| o.starts_with("memory-backend-"))
                .collect();
            assert_eq!(
                memfd,
                ["memory-backend-memfd,id=colo-ram0,size=128M,share=on"],
                "{role}"
            );
            assert_eq!(
                values(&p, "-machine"),
                ["memory-backend=colo-ram0"],
                "{role}"
            );
        }
    }

    #[test]
    fn default_ram_adds_no_backend_and_no_machine_option() {
        for cfg in [config(""), config("memory_backend = \"anonymous\"")] {
            for role in [Role::Primary, Role::Secondary] {
                let args = colo_args(&cfg, role).unwrap();
                let p = pairs(&args);
                assert!(values(&p, "-machine").is_empty(), "{role}: {args:?}");
                assert!(
                    !args.iter().any(|a| a.contains("memory-backend")),
                    "{role}: {args:?}"
                );
            }
        }
    }

    #[test]
    fn every_chardev_socket_has_nodelay() {
        let cfg = config("");
        for role in [Role::Primary, Role::Secondary] {
            let p = pairs(&colo_args(&cfg, role).unwrap());
            let chardevs = values(&p, "-chardev");
            assert!(!chardevs.is_empty());
            for spec in chardevs {
                assert!(spec.starts_with("socket,"), "{spec}");
                assert!(
                    spec.split(',').any(|kv| kv == "nodelay=on"),
                    "{role}: {spec}"
                );
            }
        }
    }

    #[test]
    fn both_roles_run_virtio_without_the_stale_disabled_flag() {
        let cfg = config("");
        for role in [Role::Primary, Role::Secondary] {
            let p = pairs(&colo_args(&cfg, role).unwrap());
            assert_eq!(
                values(&p, "-global"),
                ["virtio-device.use-disabled-flag=false"],
                "{role}"
            );
        }
    }

    #[test]
    fn ids_match_what_the_failover_sequences_delete() {
        let cfg = config("");
        let p = pairs(&primary_args(&cfg).unwrap());
        let objects: Vec<&str> = values(&p, "-object").into_iter().map(id_of).collect();
        for id in ["comp0", "iothread1", "m0", "redire0", "redire1"] {
            assert!(
                objects.contains(&id),
                "primary lacks object {id}: {objects:?}"
            );
        }
        let chardevs: Vec<&str> = values(&p, "-chardev").into_iter().map(id_of).collect();
        assert_eq!(
            chardevs,
            [
                "mirror0",
                "compare1",
                "compare0",
                "compare0-0",
                "compare_out",
                "compare_out0"
            ]
        );
        let drives = values(&p, "-drive");
        assert_eq!(drives.len(), 1);
        assert_eq!(id_of(drives[0]), cfg.disk.device);

        let s = pairs(&secondary_args(&cfg).unwrap());
        let objects: Vec<&str> = values(&s, "-object").into_iter().map(id_of).collect();
        assert_eq!(objects, ["f1", "f2", "rew0"]);
        let chardevs: Vec<&str> = values(&s, "-chardev").into_iter().map(id_of).collect();
        assert_eq!(chardevs, ["red0", "red1"]);
        let drives: Vec<&str> = values(&s, "-drive").into_iter().map(id_of).collect();
        assert_eq!(drives, ["parent0", "childs0", "colo-disk0"]);
    }

    #[test]
    fn the_documented_topology_is_kept() {
        let cfg = config("");
        let p = primary_args(&cfg).unwrap().join(" ");
        let s = secondary_args(&cfg).unwrap().join(" ");
        assert!(p.contains(
            "colo-compare,id=comp0,primary_in=compare0-0,secondary_in=compare1,\
             outdev=compare_out0,iothread=iothread1"
        ));
        assert!(p.contains("filter-mirror,id=m0,netdev=hn0,queue=tx,outdev=mirror0"));
        assert!(p.contains("filter-redirector,id=redire0,netdev=hn0,queue=rx,indev=compare_out"));
        assert!(p.contains("filter-redirector,id=redire1,netdev=hn0,queue=rx,outdev=compare0"));
        assert!(p.contains(
            "if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,\
             children.0.file.filename=/img/primary.raw,children.0.driver=raw"
        ));
        assert!(s.contains("filter-redirector,id=f1,netdev=hn0,queue=tx,indev=red0"));
        assert!(s.contains("filter-redirector,id=f2,netdev=hn0,queue=rx,outdev=red1"));
        assert!(s.contains("filter-rewriter,id=rew0,netdev=hn0,queue=all"));
        assert!(s.contains("top-id=colo-disk0"));
        assert!(s.contains("file.backing.backing=parent0"));
        // A comma in a path is doubled, as QEMU's option parser wants.
        assert!(s.contains("file.backing.file.filename=/img/hidden,,weird.qcow2"));
        for args in [&p, &s] {
            assert!(args.contains("vhost=off,vnet_hdr=off"));
            assert!(args.contains("virtio-net-pci,netdev=hn0,mac=52:54:00:12:34:56,romfile="));
            assert!(args.contains("-device virtio-blk-pci,drive=colo-disk0"));
        }
        assert!(p.contains("ifname=tap-p,") && s.contains("ifname=tap-s,"));
        // The caller adds machine, memory and guest.
        for flag in ["-machine", "-m", "-kernel", "-smp", "-name"] {
            assert!(!primary_args(&cfg).unwrap().iter().any(|a| a == flag));
            assert!(!secondary_args(&cfg).unwrap().iter().any(|a| a == flag));
        }
    }

    #[test]
    fn start_modes_and_qmp() {
        let cfg = config("");
        let p = primary_args(&cfg).unwrap();
        let s = secondary_args(&cfg).unwrap();
        assert_eq!(p.last().map(String::as_str), Some("-S"));
        assert!(!p.iter().any(|a| a == "-incoming"));
        assert!(s.ends_with(&["-incoming".to_string(), "defer".to_string()]));
        assert!(!s.iter().any(|a| a == "-S"));
        assert_eq!(
            values(&pairs(&p), "-qmp"),
            ["unix:/run/colo/vm1/primary.qmp,server=on,wait=off"]
        );
        assert_eq!(
            values(&pairs(&s), "-qmp"),
            ["tcp:192.168.77.2:4444,server=on,wait=off"]
        );
    }

    #[test]
    fn ports_and_ids_come_from_the_config() {
        let cfg = config(
            r#"
            [disk]
            device = "d0"
            export = "base0"
            [network]
            netdev = "net7"
            mirror_port = 7003
            compare_port = 7004
            compare_primary_in_port = 7001
            compare_out_port = 7005
            "#,
        );
        let p = primary_args(&cfg).unwrap().join(" ");
        let s = secondary_args(&cfg).unwrap().join(" ");
        assert!(p.contains(
            "socket,id=mirror0,host=192.168.77.1,port=7003,server=on,wait=off,nodelay=on"
        ));
        assert!(p.contains(
            "socket,id=compare1,host=192.168.77.1,port=7004,server=on,wait=off,nodelay=on"
        ));
        assert!(
            p.contains("socket,id=compare0,host=127.0.0.1,port=7001,server=on,wait=off,nodelay=on")
        );
        assert!(p.contains("socket,id=compare0-0,host=127.0.0.1,port=7001,nodelay=on"));
        assert!(p.contains(
            "socket,id=compare_out,host=127.0.0.1,port=7005,server=on,wait=off,nodelay=on"
        ));
        assert!(p.contains("socket,id=compare_out0,host=127.0.0.1,port=7005,nodelay=on"));
        assert!(
            s.contains("socket,id=red0,host=192.168.77.1,port=7003,reconnect-ms=1000,nodelay=on")
        );
        assert!(
            s.contains("socket,id=red1,host=192.168.77.1,port=7004,reconnect-ms=1000,nodelay=on")
        );
        assert!(p.contains("netdev=net7") && s.contains("tap,id=net7,"));
        assert!(p.contains("id=d0,driver=quorum") && s.contains("id=d0,driver=quorum"));
        assert!(s.contains("id=base0,driver=raw") && s.contains("top-id=d0"));
        assert!(s.contains("file.backing.backing=base0"));
    }

    #[test]
    fn qcow2_images_use_the_qcow2_driver() {
        let cfg = config("").clone();
        let mut cfg = cfg;
        if let Some(vm) = cfg.vm.as_mut() {
            vm.image_format = crate::config::ImageFormat::Qcow2;
        }
        assert!(
            primary_args(&cfg)
                .unwrap()
                .join(" ")
                .contains("children.0.driver=qcow2")
        );
        assert!(
            secondary_args(&cfg)
                .unwrap()
                .join(" ")
                .contains("id=parent0,driver=qcow2,")
        );
    }

    /// The `[vm]` block of [`config`] without the replication overlays.
    fn blockd_config(disk: &str) -> PairConfig {
        let text = format!(
            r#"
            name = "vm1"
            [primary]
            qmp = "unix:/run/p.qmp"
            host = "192.168.77.1"
            [secondary]
            qmp = "unix:/run/s.qmp"
            host = "192.168.77.2"
            [migration]
            secondary_incoming = "tcp:192.168.77.2:9998"
            [disk]
            backend = "colo-blockd"
            nbd_port = 10809
            {disk}
            [vm]
            tap = "tap-p"
            mac = "52:54:00:12:34:56"
            memory_mib = 128
            primary_image = "/img/primary.raw"
            secondary_image = "/img/secondary.raw"
            "#
        );
        PairConfig::from_toml(&text, "test").unwrap()
    }

    #[test]
    fn with_colo_blockd_the_svm_disk_is_its_nbd_export_under_a_quorum() {
        let cfg = blockd_config("");
        let s = pairs(&secondary_args(&cfg).unwrap());
        assert_eq!(
            values(&s, "-drive"),
            [
                "if=none,id=svm0,driver=nbd,server.type=inet,server.host=192.168.77.2,\
                 server.port=10809,export=svm,reconnect-delay=15",
                "if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,\
                 children.0=svm0"
            ]
        );
        assert_eq!(
            values(&s, "-device").last().copied(),
            Some("virtio-blk-pci,drive=colo-disk0")
        );
        // The network side is unchanged.
        let objects: Vec<&str> = values(&s, "-object").into_iter().map(id_of).collect();
        assert_eq!(objects, ["f1", "f2", "rew0"]);
        // The primary's disk is the same quorum; its NBD child is added at start.
        let p = pairs(&primary_args(&cfg).unwrap());
        let stock = pairs(&primary_args(&config("")).unwrap());
        assert_eq!(values(&p, "-drive"), values(&stock, "-drive"));

        let cfg = blockd_config(r#"blockd_socket = "/run/colo/vm1/blockd,1.sock""#);
        let s = secondary_args(&cfg).unwrap().join(" ");
        assert!(s.contains(
            "driver=nbd,server.type=unix,server.path=/run/colo/vm1/blockd,,1.sock,export=svm"
        ));
    }

    #[test]
    fn with_colo_proxyd_there_is_no_colo_compare_and_no_rewriter() {
        let cfg = config(
            r#"
            [network]
            backend = "colo-proxyd"
            proxyd_qmp = "unix:/run/colo/vm1/proxyd.qmp"
            "#,
        );
        let p = pairs(&primary_args(&cfg).unwrap());
        let objects: Vec<&str> = values(&p, "-object").into_iter().map(id_of).collect();
        assert_eq!(objects, ["m0", "redire0", "redire1"]);
        // Every filter socket connects to the local daemon's loopback port: QEMU serves none
        // that another local user could take first.
        assert_eq!(
            values(&p, "-chardev"),
            [
                "socket,id=mirror0,host=127.0.0.1,port=9003,reconnect-ms=1000,nodelay=on",
                "socket,id=compare0,host=127.0.0.1,port=9001,reconnect-ms=1000,nodelay=on",
                "socket,id=compare_out,host=127.0.0.1,port=9005,reconnect-ms=1000,nodelay=on",
            ]
        );
        assert_eq!(
            values(&p, "-qmp"),
            [
                "unix:/run/colo/vm1/primary.qmp,server=on,wait=off",
                "unix:/run/colo/vm1/proxyd.qmp,server=on,wait=off"
            ]
        );
        let s = pairs(&secondary_args(&cfg).unwrap());
        let objects: Vec<&str> = values(&s, "-object").into_iter().map(id_of).collect();
        assert_eq!(objects, ["f1", "f2"]);
        assert_eq!(
            values(&s, "-chardev"),
            [
                "socket,id=red0,host=127.0.0.1,port=9003,reconnect-ms=1000,nodelay=on",
                "socket,id=red1,host=127.0.0.1,port=9004,reconnect-ms=1000,nodelay=on",
            ]
        );
        // The disk side does not change.
        assert_eq!(
            values(&s, "-drive"),
            values(&pairs(&secondary_args(&config("")).unwrap()), "-drive")
        );
    }

    /// With `[tls]` the primary gets the migration's TLS client object (the primary host's
    /// directory, for the migration and the NBD child). On the stock stack the primary's two
    /// chardevs that the secondary reaches need TLS and the secondary's certificate; the
    /// secondary's chardevs connect with its client object and its NBD server gets a server
    /// object with an authz naming the primary. On colo's daemons the secondary gets nothing
    /// (the relay terminates the migration's TLS, colo-blockd the NBD child's). Without
    /// `[tls]`, nothing.
    #[test]
    fn with_tls_every_socket_between_the_qemus_needs_the_peers_certificate() {
        const TLS_SECTION: &str = "[tls]\nprimary_dir = \"/etc/colo/pki-a\"\n\
            primary_name = \"hosta\"\nsecondary_dir = \"/etc/colo/pki-b\"\n\
            secondary_name = \"hostb\"\n";
        let text = |tls: &str| {
            format!(
                r#"
                name = "vm1"
                [primary]
                qmp = "unix:/run/p.qmp"
                host = "192.168.77.1"
                [secondary]
                qmp = "unix:/run/s.qmp"
                host = "192.168.77.2"
                [migration]
                secondary_incoming = "unix:/run/colo/vm1/incoming.sock"
                primary_target = "tcp:192.168.77.2:9997"
                [relay]
                listen = "tcp:192.168.77.2:9997"
                control = "/run/colo/vm1/relay.sock"
                {tls}
                [vm]
                tap = "tap-p"
                mac = "52:54:00:12:34:56"
                memory_mib = 128
                primary_image = "/img/primary.raw"
                secondary_image = "/img/secondary.raw"
                secondary_active = "/img/active.qcow2"
                secondary_hidden = "/img/hidden.qcow2"
                "#
            )
        };
        let tls = PairConfig::from_toml(&text(TLS_SECTION), "test").unwrap();
        let tls_objects = |args: &[(String, String)]| -> Vec<String> {
            values(args, "-object")
                .into_iter()
                .filter(|o| o.starts_with("tls-creds") || o.contains("authz"))
                .map(str::to_string)
                .collect()
        };
        // Compared as JSON values: the key order is serde_json's, not the test's concern.
        let authz = |peer: &str| {
            serde_json::json!({
                "qom-type": "authz-list", "id": "colo-tls-peer0", "policy": "deny",
                "rules": [
                    { "match": format!("CN={peer}"), "policy": "allow", "format": "exact" },
                    { "match": format!("CN={peer},*"), "policy": "allow", "format": "glob" },
                ],
            })
            .to_string()
        };
        let p = pairs(&primary_args(&tls).unwrap());
        assert_eq!(
            tls_objects(&p),
            [
                "tls-creds-x509,id=colo-tls-server0,dir=/etc/colo/pki-a,endpoint=server,\
                 verify-peer=on"
                    .to_string(),
                authz("hostb"),
                "tls-creds-x509,id=colo-tls0,dir=/etc/colo/pki-a,endpoint=client".to_string(),
            ]
        );
        let tls_on = ",tls-creds=colo-tls-server0,tls-authz=colo-tls-peer0";
        let chardevs = values(&p, "-chardev");
        for (id, port) in [("mirror0", 9003), ("compare1", 9004)] {
            let listen = format!(
                "socket,id={id},host=192.168.77.1,port={port},server=on,wait=off,nodelay=on\
                 {tls_on}"
            );
            assert!(chardevs.contains(&listen.as_str()), "{chardevs:?}");
        }
        // The loopback sockets inside the primary QEMU stay plaintext.
        assert_eq!(chardevs.iter().filter(|c| c.contains("tls")).count(), 2);

        let s = pairs(&secondary_args(&tls).unwrap());
        assert_eq!(
            tls_objects(&s),
            [
                "tls-creds-x509,id=colo-tls0,dir=/etc/colo/pki-b,endpoint=client".to_string(),
                "tls-creds-x509,id=colo-tls-server0,dir=/etc/colo/pki-b,endpoint=server,\
                 verify-peer=on"
                    .to_string(),
                authz("hosta"),
            ]
        );
        assert_eq!(
            values(&s, "-chardev"),
            [
                "socket,id=red0,host=192.168.77.1,port=9003,reconnect-ms=1000,nodelay=on,\
                 tls-creds=colo-tls0",
                "socket,id=red1,host=192.168.77.1,port=9004,reconnect-ms=1000,nodelay=on,\
                 tls-creds=colo-tls0",
            ]
        );

        // On colo's daemons the secondary QEMU talks to no other host.
        let daemons = PairConfig::from_toml(
            &text(&format!(
                "{TLS_SECTION}\n[network]\nbackend = \"colo-proxyd\"\n\
                     [disk]\nbackend = \"colo-blockd\"\n"
            ))
            .replace(r#"secondary_active = "/img/active.qcow2""#, "")
            .replace(r#"secondary_hidden = "/img/hidden.qcow2""#, ""),
            "test",
        )
        .unwrap();
        let p = pairs(&primary_args(&daemons).unwrap());
        assert_eq!(
            tls_objects(&p),
            ["tls-creds-x509,id=colo-tls0,dir=/etc/colo/pki-a,endpoint=client"]
        );
        let s = secondary_args(&daemons).unwrap().join(" ");
        assert!(!s.contains("tls"), "{s}");

        let plain = PairConfig::from_toml(&text(""), "test").unwrap();
        for role in [Role::Primary, Role::Secondary] {
            let args = colo_args(&plain, role).unwrap().join(" ");
            assert!(!args.contains("tls"), "{args}");
        }
    }

    #[test]
    fn without_a_vm_section_there_is_a_clear_error() {
        let mut cfg = config("");
        cfg.vm = None;
        let err = colo_args(&cfg, Role::Primary).unwrap_err();
        assert!(err.to_string().contains("[vm]"));
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("-S"), "-S");
        assert_eq!(
            shell_quote("virtio-net-pci,netdev=hn0,romfile="),
            "virtio-net-pci,netdev=hn0,romfile="
        );
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(
            shell_line(&["-incoming".into(), "defer".into()]),
            "-incoming defer"
        );
    }
}
