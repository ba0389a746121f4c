//! The command lines of colo's daemons for a pair, generated from its
//! [`PairConfig`] the way [`crate::qemu_args`] generates QEMU's: the ports,
//! sockets and addresses come from the same config, so the daemons and the
//! QEMUs always agree.
//!
//! * `colo-blockd secondary` (host B, with `disk.backend = "colo-blockd"`);
//! * `colo-proxyd primary` (host A) and `colo-proxyd secondary` (host B), with
//!   `network.backend = "colo-proxyd"`.
//!
//! The relay (`qmp-driver --config FILE relay`) runs on host B, so the daemons
//! there reach its control socket by its path; `colo-proxyd primary` reaches
//! it over `relay.control_tcp` (`tcp:HOST:PORT`) when set, else by the path,
//! which works only when host A shares it, as on the test bed.
//!
//! With `[tls]` both colo-proxyd get `--tls-dir` (their host's identity) and `--tls-peer`
//! (the other host): mutual TLS on their link, and `colo-proxyd primary` follows the relay
//! over mutual TLS when its control address is TCP. colo-blockd gets the secondary host's
//! identity and the primary host as its only peer: its TCP NBD listener then requires
//! `STARTTLS` and the primary's certificate. The relay takes its TLS options from the
//! same config (`qmp-driver --config FILE relay`), the primary QEMU its credentials from
//! `qemu-args` and `start`.

use crate::config::{DiskBackend, NetworkBackend, PairConfig, RelaySettings};
use colo_types::Role;

/// One of colo's daemons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Daemon {
    /// `colo-blockd secondary`, on the secondary host.
    Blockd,
    /// `colo-proxyd primary`, on the primary host.
    ProxydPrimary,
    /// `colo-proxyd secondary`, on the secondary host.
    ProxydSecondary,
}

impl Daemon {
    /// Its binary.
    pub fn binary(self) -> &'static str {
        match self {
            Daemon::Blockd => "colo-blockd",
            Daemon::ProxydPrimary | Daemon::ProxydSecondary => "colo-proxyd",
        }
    }

    /// The host it runs on.
    pub fn host(self) -> Role {
        match self {
            Daemon::ProxydPrimary => Role::Primary,
            Daemon::Blockd | Daemon::ProxydSecondary => Role::Secondary,
        }
    }

    /// The daemons a config calls for, in the order to start them (each host's
    /// before its QEMU; the relay must be up for them to subscribe).
    pub fn needed(cfg: &PairConfig) -> Vec<Daemon> {
        let mut out = Vec::new();
        if cfg.disk.backend == DiskBackend::ColoBlockd {
            out.push(Daemon::Blockd);
        }
        if cfg.network.backend == NetworkBackend::ColoProxyd {
            out.extend([Daemon::ProxydSecondary, Daemon::ProxydPrimary]);
        }
        out
    }
}

/// Why no command line could be generated.
#[derive(Debug, thiserror::Error)]
pub enum DaemonArgsError {
    /// The config does not use that daemon.
    #[error("the config does not use {0}: set {1}")]
    NotConfigured(&'static str, &'static str),
    /// colo's daemons follow the relay's epochs: there must be one.
    #[error("colo's daemons need the checkpoint-barrier relay: add a [relay] section")]
    NoRelay,
    /// A setting the daemon needs is missing.
    #[error("{0} is required for {1}")]
    Missing(&'static str, &'static str),
}

fn loopback(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

fn relay(cfg: &PairConfig) -> Result<&RelaySettings, DaemonArgsError> {
    cfg.relay.as_ref().ok_or(DaemonArgsError::NoRelay)
}

/// The relay's control socket as a daemon on the other host than the relay
/// reaches it: `relay.control_tcp` when set, else the Unix path (which works
/// only when the hosts share it, as on the test bed).
fn remote_control(relay: &RelaySettings) -> String {
    match &relay.control_tcp {
        Some(tcp) => tcp.to_string(),
        None => relay.control.display().to_string(),
    }
}

/// The arguments of `daemon` (after its binary name).
pub fn daemon_args(cfg: &PairConfig, daemon: Daemon) -> Result<Vec<String>, DaemonArgsError> {
    match daemon {
        Daemon::Blockd => blockd_args(cfg),
        Daemon::ProxydPrimary => proxyd_primary_args(cfg),
        Daemon::ProxydSecondary => proxyd_secondary_args(cfg),
    }
}

fn blockd_args(cfg: &PairConfig) -> Result<Vec<String>, DaemonArgsError> {
    if cfg.disk.backend != DiskBackend::ColoBlockd {
        return Err(DaemonArgsError::NotConfigured(
            "colo-blockd",
            "disk.backend = \"colo-blockd\"",
        ));
    }
    let vm = cfg.vm.as_ref().ok_or(DaemonArgsError::Missing(
        "[vm] secondary_image",
        "colo-blockd",
    ))?;
    let mut args = vec![
        "secondary".to_string(),
        "--image".into(),
        vm.secondary_image.display().to_string(),
        "--tcp".into(),
        format!("{}:{}", cfg.secondary.host, cfg.disk.nbd_port),
    ];
    if let Some(socket) = &cfg.disk.blockd_socket {
        args.extend(["--unix".into(), socket.display().to_string()]);
    }
    args.extend([
        "--control".into(),
        relay(cfg)?.control.display().to_string(),
    ]);
    if let Some(qmp) = &cfg.disk.blockd_primary_qmp {
        args.extend(["--primary-qmp".into(), qmp.to_string()]);
    }
    // The TCP listener's only client is the primary QEMU's NBD child (`start` gives it
    // `tls-creds` and the secondary's name); the Unix socket stays the local QEMU's, no TLS.
    if let Some(tls) = &cfg.tls {
        args.extend(tls_args(&tls.secondary.dir, &tls.primary.name));
    }
    Ok(args)
}

fn proxyd_primary_args(cfg: &PairConfig) -> Result<Vec<String>, DaemonArgsError> {
    let net = &cfg.network;
    if net.backend != NetworkBackend::ColoProxyd {
        return Err(DaemonArgsError::NotConfigured(
            "colo-proxyd",
            "network.backend = \"colo-proxyd\"",
        ));
    }
    let qmp = net.proxyd_qmp.as_ref().ok_or(DaemonArgsError::Missing(
        "network.proxyd_qmp",
        "colo-proxyd primary",
    ))?;
    let mut args = vec![
        "primary".to_string(),
        // QEMU's three chardevs connect to these (`qemu-args`), so the daemon decides who
        // is served: a server chardev of QEMU's would take whoever connects first.
        "--pvm-output-listen".into(),
        loopback(net.compare_primary_in_port),
        "--mirror-listen".into(),
        loopback(net.mirror_port),
        "--release-listen".into(),
        loopback(net.compare_out_port),
        "--link-listen".into(),
        format!("{}:{}", cfg.primary.host, net.link_port),
        "--control".into(),
        remote_control(relay(cfg)?),
        "--qmp".into(),
        qmp.to_string(),
        "--netdev".into(),
        net.netdev.clone(),
    ];
    args.extend(qemu_uid_args(&net.qemu_uids));
    // The link's peer and the relay (over `control_tcp`) are both the secondary host.
    if let Some(tls) = &cfg.tls {
        args.extend(tls_args(&tls.primary.dir, &tls.secondary.name));
    }
    Ok(args)
}

/// `--qemu-uid UID` for each of `uids`. colo-proxyd lets root and its own uid connect to
/// QEMU's ports; a QEMU running as another user (libvirt's `qemu`) must be named, or its
/// chardevs are refused.
fn qemu_uid_args(uids: &[u32]) -> impl Iterator<Item = String> + '_ {
    uids.iter()
        .flat_map(|uid| ["--qemu-uid".to_string(), uid.to_string()])
}

/// `--tls-dir DIR --tls-peer NAME`: this host's identity, the one peer it accepts.
fn tls_args(dir: &std::path::Path, peer: &str) -> [String; 4] {
    [
        "--tls-dir".into(),
        dir.display().to_string(),
        "--tls-peer".into(),
        peer.to_string(),
    ]
}

fn proxyd_secondary_args(cfg: &PairConfig) -> Result<Vec<String>, DaemonArgsError> {
    let net = &cfg.network;
    if net.backend != NetworkBackend::ColoProxyd {
        return Err(DaemonArgsError::NotConfigured(
            "colo-proxyd",
            "network.backend = \"colo-proxyd\"",
        ));
    }
    let mut args = vec![
        "secondary".to_string(),
        "--svm-input-listen".into(),
        loopback(net.mirror_port),
        "--svm-output-listen".into(),
        loopback(net.compare_port),
        "--primary-link".into(),
        format!("{}:{}", cfg.primary.host, net.link_port),
        "--control".into(),
        relay(cfg)?.control.display().to_string(),
        // After a failover to the secondary, QEMU's red2/red3 connect here
        // (`pair::failover_to_secondary`).
        "--net-output-listen".into(),
        loopback(net.net_output_port),
        "--net-input-listen".into(),
        loopback(net.net_input_port),
        "--netdev".into(),
        net.netdev.clone(),
    ];
    args.extend(qemu_uid_args(&net.qemu_uids));
    // With its own monitor of the secondary QEMU it re-creates f1 after red0 reconnects.
    if let Some(qmp) = &net.proxyd_secondary_qmp {
        args.extend(["--qmp".into(), qmp.to_string()]);
    }
    if let Some(tls) = &cfg.tls {
        args.extend(tls_args(&tls.secondary.dir, &tls.primary.name));
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> PairConfig {
        PairConfig::from_toml(
            &format!(
                r#"
                name = "vm1"
                [primary]
                qmp = "tcp:192.168.77.1:4444"
                host = "192.168.77.1"
                [secondary]
                qmp = "unix:/run/colo/vm1/secondary.qmp"
                host = "192.168.77.2"
                [migration]
                secondary_incoming = "unix:/run/colo/vm1/incoming.sock"
                [vm]
                tap = "tap-vm1"
                mac = "52:54:00:12:34:56"
                memory_mib = 512
                primary_image = "/var/lib/colo/vm1/disk.raw"
                secondary_image = "/var/lib/colo/vm1/disk.raw"
                {extra}
                "#
            ),
            "test",
        )
        .unwrap()
    }

    const DAEMONS: &str = r#"
        [relay]
        listen = "tcp:192.168.77.2:9998"
        target = "unix:/run/colo/vm1/incoming.sock"
        control = "/run/colo/vm1/relay.sock"
        [disk]
        backend = "colo-blockd"
        blockd_socket = "/run/colo/vm1/blockd.sock"
        blockd_primary_qmp = "tcp:192.168.77.1:4445"
        [network]
        backend = "colo-proxyd"
        proxyd_qmp = "unix:/run/colo/vm1/proxyd.qmp"
        proxyd_secondary_qmp = "unix:/run/colo/vm1/secondary-proxyd.qmp"
    "#;

    #[test]
    fn every_daemon_gets_the_ports_and_sockets_qemu_gets() {
        let cfg = config_with(DAEMONS);
        assert_eq!(
            Daemon::needed(&cfg),
            [
                Daemon::Blockd,
                Daemon::ProxydSecondary,
                Daemon::ProxydPrimary
            ]
        );
        assert_eq!(
            daemon_args(&cfg, Daemon::Blockd).unwrap().join(" "),
            "secondary --image /var/lib/colo/vm1/disk.raw --tcp 192.168.77.2:9999 \
             --unix /run/colo/vm1/blockd.sock --control /run/colo/vm1/relay.sock \
             --primary-qmp tcp:192.168.77.1:4445"
        );
        assert_eq!(
            daemon_args(&cfg, Daemon::ProxydPrimary).unwrap().join(" "),
            "primary --pvm-output-listen 127.0.0.1:9001 --mirror-listen 127.0.0.1:9003 \
             --release-listen 127.0.0.1:9005 --link-listen 192.168.77.1:9006 --control \
             /run/colo/vm1/relay.sock --qmp unix:/run/colo/vm1/proxyd.qmp --netdev hn0"
        );
        assert_eq!(
            daemon_args(&cfg, Daemon::ProxydSecondary)
                .unwrap()
                .join(" "),
            "secondary --svm-input-listen 127.0.0.1:9003 --svm-output-listen 127.0.0.1:9004 \
             --primary-link 192.168.77.1:9006 --control /run/colo/vm1/relay.sock \
             --net-output-listen 127.0.0.1:9007 --net-input-listen 127.0.0.1:9008 \
             --netdev hn0 --qmp unix:/run/colo/vm1/secondary-proxyd.qmp"
        );
        assert_eq!(Daemon::ProxydPrimary.host(), Role::Primary);
        // Without network.qemu_uid the daemons allow only root and their own uid.
        assert!(!s_args(&cfg).contains(&"--qemu-uid".to_string()));

        // With a TCP control address the primary's daemon (the other host) uses it.
        let tcp = config_with(&DAEMONS.replace(
            "control = \"/run/colo/vm1/relay.sock\"",
            "control = \"/run/colo/vm1/relay.sock\"\ncontrol_tcp = \"192.168.77.2:9990\"",
        ));
        let args = daemon_args(&tcp, Daemon::ProxydPrimary).unwrap();
        let at = args.iter().position(|a| a == "--control").unwrap();
        assert_eq!(args[at + 1], "tcp:192.168.77.2:9990");
        let args = daemon_args(&tcp, Daemon::Blockd).unwrap();
        let at = args.iter().position(|a| a == "--control").unwrap();
        assert_eq!(args[at + 1], "/run/colo/vm1/relay.sock");
        assert_eq!(Daemon::Blockd.binary(), "colo-blockd");
    }

    #[test]
    fn with_tls_each_daemon_gets_its_hosts_identity_and_the_other_host() {
        let tls = config_with(&format!(
            "{}{}",
            DAEMONS.replace(
                "control = \"/run/colo/vm1/relay.sock\"",
                "control = \"/run/colo/vm1/relay.sock\"\ncontrol_tcp = \"192.168.77.2:9990\"",
            ),
            "[tls]\nprimary_dir = \"/etc/colo/pki-a\"\nprimary_name = \"hosta\"\n\
             secondary_dir = \"/etc/colo/pki-b\"\nsecondary_name = \"hostb\"\n"
        ));
        let tail = |d| {
            let args = daemon_args(&tls, d).unwrap();
            args[args.len() - 4..].join(" ")
        };
        assert_eq!(
            tail(Daemon::ProxydPrimary),
            "--tls-dir /etc/colo/pki-a --tls-peer hostb"
        );
        assert_eq!(
            tail(Daemon::ProxydSecondary),
            "--tls-dir /etc/colo/pki-b --tls-peer hosta"
        );
        // colo-blockd runs on the secondary host; its NBD client is the primary QEMU.
        assert_eq!(
            tail(Daemon::Blockd),
            "--tls-dir /etc/colo/pki-b --tls-peer hosta"
        );
        // Without [tls] nothing is added.
        let plain = config_with(DAEMONS);
        for d in [
            Daemon::ProxydPrimary,
            Daemon::ProxydSecondary,
            Daemon::Blockd,
        ] {
            let args = daemon_args(&plain, d).unwrap();
            assert!(!args.iter().any(|a| a.starts_with("--tls")), "{args:?}");
        }
    }

    fn s_args(cfg: &PairConfig) -> Vec<String> {
        daemon_args(cfg, Daemon::ProxydSecondary).unwrap()
    }

    #[test]
    fn both_daemons_let_their_qemus_uids_connect() {
        let one = config_with(&DAEMONS.replace(
            "backend = \"colo-proxyd\"",
            "backend = \"colo-proxyd\"\nqemu_uid = 107",
        ));
        let args = s_args(&one);
        let at = args.iter().position(|a| a == "--qemu-uid").unwrap();
        assert_eq!(args[at + 1], "107");
        assert_eq!(args.iter().filter(|a| *a == "--qemu-uid").count(), 1);
        // Both roles listen for their QEMU's chardevs.
        let primary = daemon_args(&one, Daemon::ProxydPrimary).unwrap().join(" ");
        assert!(primary.contains("--netdev hn0 --qemu-uid 107"), "{primary}");
        let blockd = daemon_args(&one, Daemon::Blockd).unwrap();
        assert!(!blockd.iter().any(|a| a == "--qemu-uid"), "{blockd:?}");

        let two = config_with(&DAEMONS.replace(
            "backend = \"colo-proxyd\"",
            "backend = \"colo-proxyd\"\nqemu_uid = [107, 64055]",
        ));
        let joined = s_args(&two).join(" ");
        assert!(
            joined.contains("--netdev hn0 --qemu-uid 107 --qemu-uid 64055 --qmp "),
            "{joined}"
        );
    }

    /// A config with `sections` (before `[vm]`, which must stay last).
    fn config_with(sections: &str) -> PairConfig {
        let text = format!(
            r#"
            name = "vm1"
            [primary]
            qmp = "tcp:192.168.77.1:4444"
            host = "192.168.77.1"
            [secondary]
            qmp = "unix:/run/colo/vm1/secondary.qmp"
            host = "192.168.77.2"
            [migration]
            secondary_incoming = "unix:/run/colo/vm1/incoming.sock"
            primary_target = "tcp:192.168.77.2:9998"
            {sections}
            [vm]
            tap = "tap-vm1"
            mac = "52:54:00:12:34:56"
            memory_mib = 512
            primary_image = "/var/lib/colo/vm1/disk.raw"
            secondary_image = "/var/lib/colo/vm1/disk.raw"
            "#
        );
        PairConfig::from_toml(&text, "test").unwrap()
    }

    #[test]
    fn a_stock_config_needs_no_daemon_and_says_which_setting_is_missing() {
        let cfg = config(
            r#"
            secondary_active = "/var/lib/colo/vm1/a.qcow2"
            secondary_hidden = "/var/lib/colo/vm1/h.qcow2"
            "#,
        );
        assert!(Daemon::needed(&cfg).is_empty());
        let err = daemon_args(&cfg, Daemon::Blockd).unwrap_err();
        assert!(err.to_string().contains("disk.backend"), "{err}");
        let err = daemon_args(&cfg, Daemon::ProxydPrimary).unwrap_err();
        assert!(err.to_string().contains("network.backend"), "{err}");

        let no_relay = config_with("[disk]\nbackend = \"colo-blockd\"\n");
        let err = daemon_args(&no_relay, Daemon::Blockd).unwrap_err();
        assert!(err.to_string().contains("[relay]"), "{err}");
    }
}
