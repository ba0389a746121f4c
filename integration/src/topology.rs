//! Hosts as network namespaces: a client and the two VM hosts joined by a switch.
//!
//! ```text
//!   ns client            ns lan (switch)            ns pri (host A)            ns sec (host B)
//!   cl0 10.0.2.2 ── lan-cl ┐                ┌ lan-p ── eth0 ┐                  ┌ eth0 ── lan-s ┘
//!                          └──── br0 ───────┤         brh 192.168.77.1         brh 192.168.77.2
//!                                           └ lan-s         └ tap-p (PVM)      tap-s (SVM, joins brh
//!                                                                               only at failover)
//! ```
//!
//! With [`Topology::create_with_witness`] a fifth namespace, the witness (`wit`, 192.168.77.3 on
//! its `eth0`, a veth `lan-w` to `br0`), carries the cluster's third vote (corosync-qnetd, see
//! [`crate::cluster`]); [`Topology::isolate_hosts`] then cuts hosts A and B apart at the switch
//! while both still reach the client and the witness.
//!
//! The guest is 10.0.2.15 on the same segment. Each host's own address lives on its host
//! bridge `brh`, which is how the secondary reaches the primary's mirror and compare sockets
//! and the primary reaches the secondary's NBD server. The secondary's tap stays off its
//! bridge while COLO runs: the SVM must only see the packets the primary mirrors to it.
//! Deleting the namespaces removes every interface in them, so teardown cannot leak links.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Addresses of the bed, fixed so that command lines stay readable.
pub mod addr {
    /// The client's address.
    pub const CLIENT: &str = "10.0.2.2";
    /// The guest's address (both VMs carry it).
    pub const GUEST: &str = "10.0.2.15";
    /// The guest's address with prefix, passed on the kernel command line.
    pub const GUEST_CIDR: &str = "10.0.2.15/24";
    /// Host A (primary) address on the inter-host segment.
    pub const PRIMARY_HOST: &str = "192.168.77.1";
    /// Host B (secondary) address on the inter-host segment.
    pub const SECONDARY_HOST: &str = "192.168.77.2";
    /// The witness host's address on the inter-host segment (corosync-qnetd listens there).
    pub const WITNESS: &str = "192.168.77.3";
    /// The guest NIC's MAC (identical on both VMs; COLO VMs are one machine to the network).
    pub const GUEST_MAC: &str = "52:54:00:c0:10:01";
}

/// Name of a VM host's tap device inside its namespace.
pub const PRIMARY_TAP: &str = "tap-p";
/// Name of the secondary's tap device inside its namespace.
pub const SECONDARY_TAP: &str = "tap-s";
/// Host bridge inside each VM host namespace.
pub const HOST_BRIDGE: &str = "brh";

/// Switch port (in the lan namespace) of host A's uplink.
pub const PRIMARY_SWITCH_PORT: &str = "lan-p";
/// Switch port of host B's uplink.
pub const SECONDARY_SWITCH_PORT: &str = "lan-s";
/// Switch port of the witness's uplink.
pub const WITNESS_SWITCH_PORT: &str = "lan-w";

/// The four (five with a witness) namespaces of one bed. Dropping it deletes them.
#[derive(Debug)]
pub struct Topology {
    /// Namespace of the client.
    pub client: String,
    /// Namespace of the switch.
    pub lan: String,
    /// Namespace of host A, which runs the primary VM.
    pub primary: String,
    /// Namespace of host B, which runs the secondary VM.
    pub secondary: String,
    /// Namespace of the witness host (corosync-qnetd), if the bed has one.
    pub witness: Option<String>,
    created: Vec<String>,
}

/// Runs `ip` with the arguments, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

/// Runs a command inside a namespace with `ip netns exec`.
pub fn in_netns(ns: &str, program: &str, args: &[&str]) -> Result<()> {
    let mut full = vec!["netns", "exec", ns, program];
    full.extend_from_slice(args);
    run("ip", &full)
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (is iproute2 installed?)"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Topology {
    /// Creates the namespaces and links. `tag` keeps concurrent beds apart (keep it short:
    /// namespace names appear in error messages).
    pub fn create(tag: &str) -> Result<Self> {
        Self::build(tag, false)
    }

    /// Like [`Topology::create`], plus a witness namespace `colo-{tag}-wit` at
    /// [`addr::WITNESS`] on the switch, for a quorum device.
    pub fn create_with_witness(tag: &str) -> Result<Self> {
        Self::build(tag, true)
    }

    fn build(tag: &str, with_witness: bool) -> Result<Self> {
        if effective_uid() != 0 {
            bail!("the test bed needs root for network namespaces, bridges and taps");
        }
        let name = |role: &str| format!("colo-{tag}-{role}");
        let mut topo = Topology {
            client: name("cl"),
            lan: name("lan"),
            primary: name("pri"),
            secondary: name("sec"),
            witness: with_witness.then(|| name("wit")),
            created: Vec::new(),
        };
        let mut all = vec![
            topo.client.clone(),
            topo.lan.clone(),
            topo.primary.clone(),
            topo.secondary.clone(),
        ];
        all.extend(topo.witness.clone());
        for ns in all {
            // A namespace left by a crashed earlier run with the same tag is ours to replace.
            let _ = ip(&["netns", "del", &ns]);
            ip(&["netns", "add", &ns])?;
            topo.created.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            // IPv6 autoconfiguration chatter would only add uncompared noise to the pair.
            in_netns(&ns, "sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
            in_netns(
                &ns,
                "sysctl",
                &["-qw", "net.ipv6.conf.default.disable_ipv6=1"],
            )?;
        }
        topo.wire()?;
        Ok(topo)
    }

    fn wire(&self) -> Result<()> {
        let lan = self.lan.as_str();
        ip(&[
            "-n",
            lan,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
        ])?;
        ip(&["-n", lan, "link", "set", "br0", "up"])?;

        // Client: a plain interface on the guest's segment.
        self.veth_to_switch("lan-cl", &self.client, "cl0")?;
        let cidr = format!("{}/24", addr::CLIENT);
        ip(&["-n", &self.client, "addr", "add", &cidr, "dev", "cl0"])?;
        ip(&["-n", &self.client, "link", "set", "cl0", "up"])?;

        // VM hosts: uplink and tap on a host bridge that carries the host's own address.
        for (ns, uplink, host_addr, tap, tap_bridged) in [
            (
                &self.primary,
                PRIMARY_SWITCH_PORT,
                addr::PRIMARY_HOST,
                PRIMARY_TAP,
                true,
            ),
            (
                &self.secondary,
                SECONDARY_SWITCH_PORT,
                addr::SECONDARY_HOST,
                SECONDARY_TAP,
                false,
            ),
        ] {
            self.veth_to_switch(uplink, ns, "eth0")?;
            ip(&[
                "-n",
                ns,
                "link",
                "add",
                HOST_BRIDGE,
                "type",
                "bridge",
                "stp_state",
                "0",
            ])?;
            ip(&["-n", ns, "link", "set", "eth0", "master", HOST_BRIDGE])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            let cidr = format!("{host_addr}/24");
            ip(&["-n", ns, "addr", "add", &cidr, "dev", HOST_BRIDGE])?;
            ip(&["-n", ns, "link", "set", HOST_BRIDGE, "up"])?;
            ip(&["-n", ns, "tuntap", "add", "dev", tap, "mode", "tap"])?;
            ip(&["-n", ns, "link", "set", tap, "up"])?;
            if tap_bridged {
                ip(&["-n", ns, "link", "set", tap, "master", HOST_BRIDGE])?;
            }
        }

        // Witness: a plain interface on the inter-host segment.
        if let Some(wit) = &self.witness {
            self.veth_to_switch(WITNESS_SWITCH_PORT, wit, "eth0")?;
            let cidr = format!("{}/24", addr::WITNESS);
            ip(&["-n", wit, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", wit, "link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    /// A veth pair: `switch_end` on the switch bridge, `host_end` inside `ns`.
    fn veth_to_switch(&self, switch_end: &str, ns: &str, host_end: &str) -> Result<()> {
        let lan = self.lan.as_str();
        ip(&[
            "-n", lan, "link", "add", switch_end, "type", "veth", "peer", "name", host_end,
            "netns", ns,
        ])?;
        ip(&["-n", lan, "link", "set", switch_end, "master", "br0"])?;
        ip(&["-n", lan, "link", "set", switch_end, "up"])
    }

    /// Puts the secondary's tap on its host bridge: the SVM now talks to the network itself.
    pub fn bridge_secondary_tap(&self) -> Result<()> {
        ip(&[
            "-n",
            &self.secondary,
            "link",
            "set",
            SECONDARY_TAP,
            "master",
            HOST_BRIDGE,
        ])
    }

    /// Cuts a host off the switch (a partition, not a crash).
    pub fn set_host_link(&self, ns: &str, up: bool) -> Result<()> {
        ip(&[
            "-n",
            ns,
            "link",
            "set",
            "eth0",
            if up { "up" } else { "down" },
        ])
    }

    /// Cuts (`true`) or heals (`false`) only the path between host A and host B, at the
    /// switch: both uplink ports become isolated bridge ports, which cannot talk to each other
    /// but still reach every other port (the client and the witness). Both hosts stay up and
    /// see their links up; this is a split, not a crash.
    pub fn isolate_hosts(&self, isolated: bool) -> Result<()> {
        let state = if isolated { "on" } else { "off" };
        for port in [PRIMARY_SWITCH_PORT, SECONDARY_SWITCH_PORT] {
            in_netns(
                &self.lan,
                "bridge",
                &["link", "set", "dev", port, "isolated", state],
            )?;
        }
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.created.drain(..).rev() {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                eprintln!("warning: could not delete namespace {ns}: {e:#}");
            }
        }
    }
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}
