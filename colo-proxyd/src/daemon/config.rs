//! The daemons' settings and their validation into [`PrimaryConfig`] and [`SecondaryConfig`].
//!
//! Each option is taken from the first of
//!
//! 1. its flag (`--max-hold-ms 50`),
//! 2. its environment variable, `COLO_PROXYD_` and the option in capitals
//!    (`COLO_PROXYD_MAX_HOLD_MS=50`; clap reads both, a flag over its variable),
//! 3. the `--config` file (or `COLO_PROXYD_CONFIG`): TOML with the options' long names as keys
//!    (`max-hold-ms = 50`), unknown keys refused,
//! 4. its default (`[default: ...]` in `--help`),
//!
//! as colo-blockd and `qmp-driver relay` do (the layers and their errors:
//! [`colo_daemon::options`]). An invalid value from the file is reported with the file's name
//! and the key.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Args;
use colo_daemon::options::{OptionError, OptionLayers};
use colo_types::Address;
use serde::Deserialize;

use crate::engine::{
    BypassRule, DEFAULT_FLOW_IDLE, DEFAULT_MAX_FLOWS, DEFAULT_MAX_HANDSHAKE_HOLD,
    DEFAULT_MAX_HOLD_LIMIT, EngineConfig, EquivalenceRule, UncomparedPolicy,
};
use crate::rewrite::RewriteLimits;

/// The prefix of the options' environment variables.
pub const ENV_PREFIX: &str = "COLO_PROXYD_";

/// Parses a bypass rule: comma-separated `proto=tcp|udp|icmp|N`, `addr=IP`, `port=N`, e.g.
/// `proto=udp,port=123` (NTP) or `addr=10.0.0.53`.
pub fn parse_bypass(rule: &str) -> Result<BypassRule, String> {
    let mut out = BypassRule::default();
    for part in rule.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not key=value"))?;
        match key {
            "proto" | "protocol" => {
                out.protocol = Some(match value {
                    "tcp" => 6,
                    "udp" => 17,
                    "icmp" => 1,
                    "icmpv6" => 58,
                    n => n.parse().map_err(|_| format!("unknown protocol {n:?}"))?,
                })
            }
            "addr" | "address" => {
                out.address = Some(
                    value
                        .parse::<IpAddr>()
                        .map_err(|e| format!("address {value:?}: {e}"))?,
                )
            }
            "port" => out.port = Some(value.parse().map_err(|e| format!("port {value:?}: {e}"))?),
            other => return Err(format!("unknown key {other:?} (proto, addr, port)")),
        }
    }
    if out == BypassRule::default() {
        return Err(format!(
            "{rule:?} matches every flow; refusing to bypass everything"
        ));
    }
    Ok(out)
}

/// `value` parsed, an error naming the option.
fn parsed<T: FromStr<Err: fmt::Display>>(
    layers: &OptionLayers,
    value: Option<String>,
    option: &'static str,
) -> Result<Option<T>, OptionError> {
    value
        .map(|v| {
            v.parse()
                .map_err(|e: T::Err| layers.invalid(option, e.to_string()))
        })
        .transpose()
}

/// A listen address for QEMU's chardevs: a loopback address (`127.0.0.1:PORT`, any of
/// 127.0.0.0/8, `[::1]:PORT`) or `localhost:PORT`. These ports carry the guest's traffic in
/// the clear and identify their peers by the owner of the connecting socket on this host
/// (docs/security.md), which means nothing for a connection from another host.
fn loopback(
    layers: &OptionLayers,
    value: Option<String>,
    option: &'static str,
) -> Result<Option<String>, OptionError> {
    let Some(address) = value else {
        return Ok(None);
    };
    let is_loopback = match address.parse::<SocketAddr>() {
        Ok(a) => a.ip().to_canonical().is_loopback(),
        Err(_) => address
            .rsplit_once(':')
            .is_some_and(|(host, port)| host == "localhost" && port.parse::<u16>().is_ok()),
    };
    if is_loopback {
        Ok(Some(address))
    } else {
        Err(layers.invalid(
            option,
            format!(
                "{address:?} is not a loopback address: QEMU's chardev ports must listen on \
                 127.0.0.1, [::1] or localhost (QEMU runs on this host; its peers are identified \
                 by their local uid, docs/security.md)"
            ),
        ))
    }
}

/// A count, at least 1.
fn at_least_one(
    layers: &OptionLayers,
    value: Option<usize>,
    default: usize,
    option: &'static str,
) -> Result<usize, OptionError> {
    match value.unwrap_or(default) {
        0 => Err(layers.invalid(option, "must be at least 1")),
        n => Ok(n),
    }
}

/// A number of seconds, at least 1.
fn seconds(
    layers: &OptionLayers,
    value: Option<u64>,
    default: Duration,
    option: &'static str,
) -> Result<Duration, OptionError> {
    match value {
        None => Ok(default),
        Some(0) => Err(layers.invalid(option, "must be at least 1 s")),
        Some(secs) => Ok(Duration::from_secs(secs)),
    }
}

/// A number of milliseconds, at least 1.
fn millis(
    layers: &OptionLayers,
    value: Option<u64>,
    default: u64,
    option: &'static str,
) -> Result<Duration, OptionError> {
    match value.unwrap_or(default) {
        0 => Err(layers.invalid(option, "must be at least 1 ms")),
        ms => Ok(Duration::from_millis(ms)),
    }
}

/// Bound of a link connection's TLS handshake (the whole authentication, TLS and hello, has
/// its own bound in [`crate::daemon::peer`]).
pub const LINK_TLS_HANDSHAKE: Duration = Duration::from_secs(5);

/// The link's mutual TLS: this host's identity and the one peer it accepts or connects to.
#[derive(Debug, Clone)]
pub struct LinkTls {
    /// This host's identity directory.
    pub dir: PathBuf,
    /// This host's name (its certificates').
    pub local: String,
    /// The peer host's name.
    pub peer: String,
    /// The primary's side: accepts the peer's client certificate only.
    pub acceptor: colo_tls::PeerAcceptor,
    /// The secondary's side: accepts the peer's server certificate only.
    pub connector: colo_tls::PeerConnector,
}

impl LinkTls {
    /// `--tls-dir` and `--tls-peer` (both or neither), the identity loaded and checked now, so
    /// that a bad file is a configuration error naming it.
    fn from_options(
        layers: &OptionLayers,
        dir: Option<PathBuf>,
        peer: Option<String>,
    ) -> Result<Option<LinkTls>, OptionError> {
        let (dir, peer) = match (dir, peer) {
            (None, None) => return Ok(None),
            (Some(dir), Some(peer)) => (dir, peer),
            (Some(_), None) => return Err(layers.missing("tls-peer")),
            (None, Some(_)) => return Err(layers.missing("tls-dir")),
        };
        LinkTls::load(dir, peer)
            .map_err(|e| match e {
                LinkTlsError::Identity(e) => layers.invalid("tls-dir", e.to_string()),
                LinkTlsError::Peer(why) => layers.invalid("tls-peer", why),
            })
            .map(Some)
    }

    /// Loads the identity in `dir` and prepares both sides of a link with `peer`.
    pub fn load(dir: PathBuf, peer: String) -> Result<LinkTls, LinkTlsError> {
        let identity = colo_tls::HostIdentity::load(&dir).map_err(LinkTlsError::Identity)?;
        if identity.name() == peer {
            return Err(LinkTlsError::Peer(format!(
                "{peer:?} is this host's own name (in {})",
                dir.display()
            )));
        }
        let peers = [peer.clone()];
        let peer_error = |e: colo_tls::TlsError| LinkTlsError::Peer(e.to_string());
        let acceptor = colo_tls::PeerAcceptor::new(&identity, &peers, LINK_TLS_HANDSHAKE)
            .map_err(peer_error)?;
        let connector = colo_tls::PeerConnector::new(&identity, &peer, LINK_TLS_HANDSHAKE)
            .map_err(peer_error)?;
        Ok(LinkTls {
            dir,
            local: identity.name().to_owned(),
            peer,
            acceptor,
            connector,
        })
    }
}

/// Why [`LinkTls::load`] failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkTlsError {
    /// The identity directory (the file and the problem).
    #[error(transparent)]
    Identity(colo_tls::TlsError),
    /// The peer's name.
    #[error("{0}")]
    Peer(String),
}

/// `colo-proxyd primary` options. Every one can also be set in its environment variable
/// (`COLO_PROXYD_...`) or in the `--config` file, under the same name (see the module).
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct PrimaryArgs {
    /// TOML file with any of these options as keys (`max-hold-ms = 50`); an option given on
    /// the command line or in its COLO_PROXYD_* variable wins over the file.
    #[arg(long, env = "COLO_PROXYD_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Listen here for QEMU's chardev `compare0` with the PVM's output (filter-redirector
    /// `redire1`, queue=rx, outdev; a TCP client with reconnect-ms, as `qmp-driver qemu-args`
    /// generates). A loopback address; see --qemu-uid for who may connect. Give this or
    /// --pvm-output.
    #[arg(long, env = "COLO_PROXYD_PVM_OUTPUT_LISTEN", value_name = "HOST:PORT")]
    pub pvm_output_listen: Option<String>,
    /// Listen here for QEMU's chardev `mirror0` with the packets going into the PVM
    /// (filter-mirror `m0`, queue=tx, outdev; a TCP client with reconnect-ms). They are
    /// forwarded to the secondary's daemon. A loopback address. Give this or --mirror.
    #[arg(long, env = "COLO_PROXYD_MIRROR_LISTEN", value_name = "HOST:PORT")]
    pub mirror_listen: Option<String>,
    /// Listen here for QEMU's chardev `compare_out`, where released packets go to the network
    /// (filter-redirector `redire0`, queue=rx, indev; a TCP client with reconnect-ms). A
    /// loopback address. Give this or --release.
    #[arg(long, env = "COLO_PROXYD_RELEASE_LISTEN", value_name = "HOST:PORT")]
    pub release_listen: Option<String>,
    /// A uid allowed to connect to the three --*-listen ports (the user QEMU runs as),
    /// besides root and colo-proxyd's own uid, which always are. Repeatable (comma-separated
    /// in the variable). A connection whose socket belongs to any other uid is closed before a
    /// byte is read, logged and counted (colo_proxyd_port_refused_total), the current
    /// connection kept.
    #[arg(
        long = "qemu-uid",
        env = "COLO_PROXYD_QEMU_UID",
        value_name = "UID",
        value_delimiter = ','
    )]
    pub qemu_uid: Vec<u32>,
    /// Instead of --pvm-output-listen: connect to QEMU's chardev `compare0` as a TCP server
    /// (`server=on`) at HOST:PORT, and again after every disconnection. QEMU's server takes
    /// whoever connects first, any local user included (docs/security.md): prefer the listen
    /// form.
    #[arg(long, env = "COLO_PROXYD_PVM_OUTPUT", value_name = "HOST:PORT")]
    pub pvm_output: Option<String>,
    /// Instead of --mirror-listen: connect to QEMU's chardev `mirror0` as a TCP server at
    /// HOST:PORT (first comer wins, as with --pvm-output).
    #[arg(long, env = "COLO_PROXYD_MIRROR", value_name = "HOST:PORT")]
    pub mirror: Option<String>,
    /// Instead of --release-listen: connect to QEMU's chardev `compare_out` as a TCP server
    /// at HOST:PORT (first comer wins, as with --pvm-output).
    #[arg(long, env = "COLO_PROXYD_RELEASE", value_name = "HOST:PORT")]
    pub release: Option<String>,
    /// Where to listen for the secondary's colo-proxyd (the inter-host link).
    #[arg(long, env = "COLO_PROXYD_LINK_LISTEN", value_name = "HOST:PORT")]
    pub link_listen: Option<String>,
    /// Mutual TLS on the inter-host link: this host's identity directory, in QEMU's
    /// tls-creds-x509 layout (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,
    /// client-key.pem; `qmp-driver pki create`; docs/security.md). Only the host named by
    /// --tls-peer is accepted. Without it the link is plaintext and unauthenticated (a
    /// warning at start, the metric link_unauthenticated).
    #[arg(long, env = "COLO_PROXYD_TLS_DIR", value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// With --tls-dir: the peer host's identity, the name in its certificates (the other
    /// host's directory name under `qmp-driver pki create --out`).
    #[arg(long, env = "COLO_PROXYD_TLS_PEER", value_name = "NAME")]
    pub tls_peer: Option<String>,
    /// The checkpoint-barrier relay's control socket: unix:PATH or an absolute path when the
    /// relay runs on this host (`qmp-driver relay --control`), else tcp:HOST:PORT (the relay's
    /// `--control-tcp`, on the replication link).
    #[arg(long, env = "COLO_PROXYD_CONTROL", value_name = "ADDRESS")]
    pub control: Option<Address>,
    /// The primary QEMU's QMP monitor, for checkpoint requests and the fail-open check:
    /// unix:PATH or tcp:HOST:PORT. Give colo-proxyd a monitor of its own (QEMU serves one
    /// client per QMP socket).
    #[arg(long, env = "COLO_PROXYD_QMP", value_name = "ADDRESS")]
    pub qmp: Option<String>,
    /// Serve Prometheus metrics over HTTP on this address.
    #[arg(long, env = "COLO_PROXYD_METRICS", value_name = "HOST:PORT")]
    pub metrics: Option<String>,
    /// Longest a PVM packet may wait for the SVM's match while the SVM sends nothing at all
    /// (it stopped) before a checkpoint is requested [default: 200].
    #[arg(long, env = "COLO_PROXYD_MAX_HOLD_MS", value_name = "MS")]
    pub max_hold_ms: Option<u64>,
    /// Longest a PVM packet may wait for the SVM's match while the SVM keeps sending other
    /// output (it is behind, not stopped): the last resort for a match that never comes. At
    /// least --max-hold-ms [default: 3000 (colo-compare's compare_timeout), or --max-hold-ms if
    /// longer].
    #[arg(long, env = "COLO_PROXYD_MAX_HOLD_LIMIT_MS", value_name = "MS")]
    pub max_hold_limit_ms: Option<u64>,
    /// Longest the VM's answer to a client's SYN (or its own SYN) may wait for the SVM's before
    /// a checkpoint is requested (reason handshake-hold), however busy the SVM is. Below the
    /// client's first SYN retransmission (1 s, RFC 6298): a SYN-ACK released later reaches a
    /// client that has already sent its SYN again, and the VM may answer that SYN as a new
    /// connection and reset the first [default: 500].
    #[arg(long, env = "COLO_PROXYD_MAX_HANDSHAKE_HOLD_MS", value_name = "MS")]
    pub max_handshake_hold_ms: Option<u64>,
    /// At most one checkpoint request per this interval [default: 1000].
    #[arg(long, env = "COLO_PROXYD_CHECKPOINT_INTERVAL_MS", value_name = "MS")]
    pub checkpoint_interval_ms: Option<u64>,
    /// Most flows (connections, datagram flows) with comparison state, about 1 KiB each when
    /// nothing is held; the table's index is sized for this many at the first flow (48 MiB
    /// of address space at the default, 440-880 bytes per flow of the bound as the slots are
    /// rounded up to a power of two; resident as flows spread over it).
    /// Beyond, flows safe to forget and idle for a second are forgotten,
    /// about the longest idle first (a bounded search, not a scan of the table); when none is
    /// found, a checkpoint is requested (reason flow-table-full) and the new flows' output
    /// waits for it (docs/memory-bounds.md) [default: 65536].
    #[arg(long, env = "COLO_PROXYD_MAX_FLOWS", value_name = "N")]
    pub max_flows: Option<usize>,
    /// A flow that kept nothing for this long, with both VMs on the same sequence numbers,
    /// is forgotten [default: 30].
    #[arg(long, env = "COLO_PROXYD_FLOW_IDLE_SECS", value_name = "SECS")]
    pub flow_idle_secs: Option<u64>,
    /// Ask again when no checkpoint followed a request within this time [default: 5000].
    #[arg(long, env = "COLO_PROXYD_CHECKPOINT_RETRY_MS", value_name = "MS")]
    pub checkpoint_retry_ms: Option<u64>,
    /// Release a flow's PVM output uncompared (known non-deterministic traffic). Repeatable;
    /// comma-separated proto=tcp|udp|icmp|N, addr=IP, port=N, e.g. `proto=udp,port=123`.
    #[arg(
        long = "bypass",
        env = "COLO_PROXYD_BYPASS",
        value_name = "RULE",
        value_delimiter = ';'
    )]
    pub bypass: Vec<String>,
    /// Bytes known to differ between the VMs without changing the stream's length, released
    /// as the primary's without a checkpoint (off by default; docs/equivalence.md says when
    /// this is safe and what it must never cover: cookies, tokens, ETags, content).
    /// Repeatable; `tcp:PORT header NAME` (an HTTP date header, e.g. `tcp:80 header Date`)
    /// or `tcp:[ADDR:]PORT prefix "TEXT" len N suffix "TEXT"`; the port and address are the
    /// guest's end of the connection.
    #[arg(
        long = "equivalent",
        env = "COLO_PROXYD_EQUIVALENT",
        value_name = "RULE",
        value_delimiter = ';'
    )]
    pub equivalent: Vec<String>,
    /// What to do with PVM frames that are not compared (ARP, neighbour discovery,
    /// fragments, unknown protocols): `release` at once (default) or `hold` until the next
    /// checkpoint.
    #[arg(long, env = "COLO_PROXYD_UNCOMPARED", value_name = "POLICY")]
    pub uncompared: Option<String>,
    /// QEMU chardev ids checked over QMP for a connected peer (fail-open check),
    /// comma-separated [default: compare0,compare_out,mirror0].
    #[arg(
        long,
        env = "COLO_PROXYD_CHARDEVS",
        value_name = "IDS",
        value_delimiter = ','
    )]
    pub chardevs: Vec<String>,
    /// Interval of the fail-open check [default: 5000].
    #[arg(long, env = "COLO_PROXYD_CHARDEV_CHECK_MS", value_name = "MS")]
    pub chardev_check_ms: Option<u64>,
    /// Our name on the relay's control socket [default: colo-proxyd-primary].
    #[arg(long, env = "COLO_PROXYD_NAME", value_name = "NAME")]
    pub name: Option<String>,
    /// The primary QEMU's netdev of the guest NIC, whose filters colo-proxyd serves: the
    /// netdev of re-created filters and the name given to `set_link` [default: hn0].
    #[arg(long, env = "COLO_PROXYD_NETDEV", value_name = "ID")]
    pub netdev: Option<String>,
    /// The filter-redirector that reads the release chardev (QEMU never reads an indev again
    /// after it closed, so colo-proxyd re-creates this filter over QMP at each of its
    /// connections to --release, before writing to it) [default: redire0].
    #[arg(long, env = "COLO_PROXYD_RELEASE_REDIRECTOR", value_name = "ID")]
    pub release_redirector: Option<String>,
    /// The release redirector's chardev (its indev) [default: compare_out].
    #[arg(long, env = "COLO_PROXYD_RELEASE_CHARDEV", value_name = "ID")]
    pub release_chardev: Option<String>,
    /// The filter-redirector that writes the PVM's output to --pvm-output; the release
    /// redirector is re-created just before it, its place on the command line
    /// [default: redire1].
    #[arg(long, env = "COLO_PROXYD_PVM_OUTPUT_REDIRECTOR", value_name = "ID")]
    pub pvm_output_redirector: Option<String>,
    /// While COLO runs (or held, or fenced) and --pvm-output has no connection, set the
    /// netdev's link down over QMP (`set_link`), up again when it is back, so the PVM's output
    /// cannot reach the network uncompared. `false` leaves the link alone [default: true].
    #[arg(
        long,
        env = "COLO_PROXYD_LINK_DOWN_WITHOUT_PVM_OUTPUT",
        value_name = "BOOL"
    )]
    pub link_down_without_pvm_output: Option<bool>,
}

/// How the primary daemon reaches one of QEMU's chardevs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuPort {
    /// QEMU's chardev is a client (`reconnect-ms`): listen on this loopback address, for the
    /// allowed uids only.
    Listen(String),
    /// QEMU's chardev is a server (`server=on`): connect to this address.
    Connect(String),
}

impl std::fmt::Display for QemuPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QemuPort::Listen(address) => write!(f, "listen on {address}"),
            QemuPort::Connect(address) => write!(f, "connect to {address}"),
        }
    }
}

/// The port of `listen` (checked to be loopback) or `connect`: exactly one must be given.
fn qemu_port(
    layers: &OptionLayers,
    listen: Option<String>,
    connect: Option<String>,
    listen_option: &'static str,
    connect_option: &'static str,
) -> Result<QemuPort, OptionError> {
    match (loopback(layers, listen, listen_option)?, connect) {
        (Some(address), None) => Ok(QemuPort::Listen(address)),
        (None, Some(address)) => Ok(QemuPort::Connect(address)),
        (Some(_), Some(_)) => Err(layers.invalid(
            listen_option,
            format!("give --{listen_option} or --{connect_option}, not both"),
        )),
        (None, None) => Err(layers.invalid(
            listen_option,
            format!(
                "missing: give --{listen_option} (QEMU's chardev connects to colo-proxyd, as \
                 qmp-driver qemu-args generates) or --{connect_option} (QEMU's chardev is a \
                 server)"
            ),
        )),
    }
}

/// The primary daemon's validated settings.
#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    /// `compare0`: the PVM's output.
    pub pvm_output: QemuPort,
    /// `mirror0`: packets into the PVM.
    pub mirror: QemuPort,
    /// `compare_out`: released packets to the network.
    pub release: QemuPort,
    /// Uids besides root and the daemon's own allowed to connect to the listening QEMU ports.
    pub qemu_uids: Vec<u32>,
    /// The link's listen address.
    pub link_listen: String,
    /// Mutual TLS on the link (`None`: plaintext, unauthenticated).
    pub link_tls: Option<LinkTls>,
    /// The relay's control socket (Unix or TCP).
    pub control: Address,
    /// The primary QEMU's QMP monitor.
    pub qmp: Address,
    /// The metrics endpoint.
    pub metrics: Option<String>,
    /// Comparison settings.
    pub engine: EngineConfig,
    /// At most one checkpoint request per this interval.
    pub checkpoint_interval: Duration,
    /// An unanswered request is repeated after this time.
    pub checkpoint_retry: Duration,
    /// Chardev ids of the fail-open check (empty: no check, for in-process benchmarks; the
    /// command line always gives some).
    pub chardevs: Vec<String>,
    /// Interval of the fail-open check.
    pub chardev_check: Duration,
    /// Our name on the control socket.
    pub name: String,
    /// The guest NIC's netdev.
    pub netdev: String,
    /// `redire0`: reads `compare_out`.
    pub release_redirector: String,
    /// `compare_out`: the release redirector's indev.
    pub release_chardev: String,
    /// `redire1`: writes `compare0`; `redire0` comes just before it.
    pub pvm_output_redirector: String,
    /// Set the link down while `compare0` is down and COLO runs.
    pub link_down_without_pvm_output: bool,
}

impl PrimaryArgs {
    /// Fills what the command line and the environment left out from `file`.
    fn merge(self, file: PrimaryArgs, layers: &mut OptionLayers) -> PrimaryArgs {
        PrimaryArgs {
            config: self.config,
            pvm_output_listen: layers.pick(
                "pvm-output-listen",
                self.pvm_output_listen,
                file.pvm_output_listen,
            ),
            mirror_listen: layers.pick("mirror-listen", self.mirror_listen, file.mirror_listen),
            release_listen: layers.pick("release-listen", self.release_listen, file.release_listen),
            qemu_uid: layers.pick_list("qemu-uid", self.qemu_uid, file.qemu_uid),
            pvm_output: layers.pick("pvm-output", self.pvm_output, file.pvm_output),
            mirror: layers.pick("mirror", self.mirror, file.mirror),
            release: layers.pick("release", self.release, file.release),
            link_listen: layers.pick("link-listen", self.link_listen, file.link_listen),
            tls_dir: layers.pick("tls-dir", self.tls_dir, file.tls_dir),
            tls_peer: layers.pick("tls-peer", self.tls_peer, file.tls_peer),
            control: layers.pick("control", self.control, file.control),
            qmp: layers.pick("qmp", self.qmp, file.qmp),
            metrics: layers.pick("metrics", self.metrics, file.metrics),
            max_hold_ms: layers.pick("max-hold-ms", self.max_hold_ms, file.max_hold_ms),
            max_hold_limit_ms: layers.pick(
                "max-hold-limit-ms",
                self.max_hold_limit_ms,
                file.max_hold_limit_ms,
            ),
            max_handshake_hold_ms: layers.pick(
                "max-handshake-hold-ms",
                self.max_handshake_hold_ms,
                file.max_handshake_hold_ms,
            ),
            checkpoint_interval_ms: layers.pick(
                "checkpoint-interval-ms",
                self.checkpoint_interval_ms,
                file.checkpoint_interval_ms,
            ),
            max_flows: layers.pick("max-flows", self.max_flows, file.max_flows),
            flow_idle_secs: layers.pick("flow-idle-secs", self.flow_idle_secs, file.flow_idle_secs),
            checkpoint_retry_ms: layers.pick(
                "checkpoint-retry-ms",
                self.checkpoint_retry_ms,
                file.checkpoint_retry_ms,
            ),
            bypass: layers.pick_list("bypass", self.bypass, file.bypass),
            equivalent: layers.pick_list("equivalent", self.equivalent, file.equivalent),
            uncompared: layers.pick("uncompared", self.uncompared, file.uncompared),
            chardevs: layers.pick_list("chardevs", self.chardevs, file.chardevs),
            chardev_check_ms: layers.pick(
                "chardev-check-ms",
                self.chardev_check_ms,
                file.chardev_check_ms,
            ),
            name: layers.pick("name", self.name, file.name),
            netdev: layers.pick("netdev", self.netdev, file.netdev),
            release_redirector: layers.pick(
                "release-redirector",
                self.release_redirector,
                file.release_redirector,
            ),
            release_chardev: layers.pick(
                "release-chardev",
                self.release_chardev,
                file.release_chardev,
            ),
            pvm_output_redirector: layers.pick(
                "pvm-output-redirector",
                self.pvm_output_redirector,
                file.pvm_output_redirector,
            ),
            link_down_without_pvm_output: layers.pick(
                "link-down-without-pvm-output",
                self.link_down_without_pvm_output,
                file.link_down_without_pvm_output,
            ),
        }
    }
}

impl TryFrom<PrimaryArgs> for PrimaryConfig {
    type Error = OptionError;

    fn try_from(args: PrimaryArgs) -> Result<Self, OptionError> {
        let mut layers = OptionLayers::new(ENV_PREFIX, args.config.clone());
        let file = layers.read_file()?;
        let merged = args.merge(file, &mut layers);
        PrimaryConfig::validate(merged, &layers)
    }
}

impl PrimaryConfig {
    /// How to follow the relay. The relay runs on the secondary host, the link's peer: over
    /// TCP (`--control tcp:...`) with `--tls-dir`, the connection is mutual TLS and only the
    /// `--tls-peer` host's certificate is accepted (the relay's `--tls-dir`/`--tls-peer`
    /// require it). A Unix control socket is local and stays as it is.
    pub fn relay_options(&self) -> colo_control::follow::FollowOptions {
        let mut opts = colo_control::follow::FollowOptions::new(self.control.clone(), &self.name);
        if self.control.is_tcp() {
            opts.tls = self.link_tls.as_ref().map(|t| t.connector.clone());
        }
        opts
    }

    /// Validates the merged options.
    fn validate(a: PrimaryArgs, layers: &OptionLayers) -> Result<PrimaryConfig, OptionError> {
        let bypass = a
            .bypass
            .iter()
            .map(|r| parse_bypass(r))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|reason| layers.invalid("bypass", reason))?;
        let equivalent = a
            .equivalent
            .iter()
            .map(|r| r.parse::<EquivalenceRule>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|reason| layers.invalid("equivalent", reason))?;
        let uncompared = match a.uncompared.as_deref() {
            None | Some("release") => UncomparedPolicy::ReleasePrimary,
            Some("hold") => UncomparedPolicy::HoldUntilCheckpoint,
            Some(other) => {
                let reason = format!("{other:?} is neither `release` nor `hold`");
                return Err(layers.invalid("uncompared", reason));
            }
        };
        let max_hold = millis(layers, a.max_hold_ms, 200, "max-hold-ms")?;
        // Not given: the default, or --max-hold-ms where that is longer.
        let max_hold_limit = millis(
            layers,
            a.max_hold_limit_ms,
            DEFAULT_MAX_HOLD_LIMIT.max(max_hold).as_millis() as u64,
            "max-hold-limit-ms",
        )?;
        if max_hold_limit < max_hold {
            let reason = format!(
                "{} ms is less than --max-hold-ms ({} ms)",
                max_hold_limit.as_millis(),
                max_hold.as_millis()
            );
            return Err(layers.invalid("max-hold-limit-ms", reason));
        }
        let max_handshake_hold = millis(
            layers,
            a.max_handshake_hold_ms,
            DEFAULT_MAX_HANDSHAKE_HOLD.as_millis() as u64,
            "max-handshake-hold-ms",
        )?;
        let engine = EngineConfig {
            max_hold,
            max_hold_limit,
            max_handshake_hold,
            bypass,
            equivalent,
            uncompared,
            max_flows: at_least_one(layers, a.max_flows, DEFAULT_MAX_FLOWS, "max-flows")?,
            flow_idle: seconds(
                layers,
                a.flow_idle_secs,
                DEFAULT_FLOW_IDLE,
                "flow-idle-secs",
            )?,
            ..EngineConfig::default()
        };
        let chardevs = if a.chardevs.is_empty() {
            ["compare0", "compare_out", "mirror0"]
                .map(String::from)
                .to_vec()
        } else {
            a.chardevs
        };
        Ok(PrimaryConfig {
            pvm_output: qemu_port(
                layers,
                a.pvm_output_listen,
                a.pvm_output,
                "pvm-output-listen",
                "pvm-output",
            )?,
            mirror: qemu_port(layers, a.mirror_listen, a.mirror, "mirror-listen", "mirror")?,
            release: qemu_port(
                layers,
                a.release_listen,
                a.release,
                "release-listen",
                "release",
            )?,
            qemu_uids: a.qemu_uid,
            link_listen: layers.required("link-listen", a.link_listen)?,
            link_tls: LinkTls::from_options(layers, a.tls_dir, a.tls_peer)?,
            control: layers.required("control", a.control)?,
            qmp: layers.required("qmp", parsed(layers, a.qmp, "qmp")?)?,
            metrics: a.metrics,
            engine,
            checkpoint_interval: millis(
                layers,
                a.checkpoint_interval_ms,
                1000,
                "checkpoint-interval-ms",
            )?,
            checkpoint_retry: millis(layers, a.checkpoint_retry_ms, 5000, "checkpoint-retry-ms")?,
            chardevs,
            chardev_check: millis(layers, a.chardev_check_ms, 5000, "chardev-check-ms")?,
            name: a.name.unwrap_or_else(|| "colo-proxyd-primary".into()),
            netdev: a.netdev.unwrap_or_else(|| "hn0".into()),
            release_redirector: a.release_redirector.unwrap_or_else(|| "redire0".into()),
            release_chardev: a.release_chardev.unwrap_or_else(|| "compare_out".into()),
            pvm_output_redirector: a.pvm_output_redirector.unwrap_or_else(|| "redire1".into()),
            link_down_without_pvm_output: a.link_down_without_pvm_output.unwrap_or(true),
        })
    }
}

/// `colo-proxyd secondary` options. Every one can also be set in its environment variable
/// (`COLO_PROXYD_...`) or in the `--config` file, under the same name (see the module).
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct SecondaryArgs {
    /// TOML file with any of these options as keys (`max-hold-ms = 50`); an option given on
    /// the command line or in its COLO_PROXYD_* variable wins over the file.
    #[arg(long, env = "COLO_PROXYD_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Listen here for QEMU's chardev `red0` (filter-redirector `f1`, queue=tx, indev; a TCP
    /// client with reconnect-ms): packets written to it go into the SVM. A loopback address
    /// (`127.0.0.1`, `[::1]`, `localhost`); see --qemu-uid for who may connect.
    #[arg(long, env = "COLO_PROXYD_SVM_INPUT_LISTEN", value_name = "HOST:PORT")]
    pub svm_input_listen: Option<String>,
    /// Listen here for QEMU's chardev `red1` (filter-redirector `f2`, queue=rx, outdev; a TCP
    /// client with reconnect-ms): the SVM's output. A loopback address.
    #[arg(long, env = "COLO_PROXYD_SVM_OUTPUT_LISTEN", value_name = "HOST:PORT")]
    pub svm_output_listen: Option<String>,
    /// After a failover to the secondary: listen here for QEMU's chardev `red2`
    /// (filter-redirector `f3`, queue=rx, indev; a TCP client with reconnect-ms that
    /// qmp-driver adds at the failover): frames written to it go to the network. With
    /// --net-input-listen, the daemon carries the SVM's traffic after a failover, rewriting
    /// the sequence numbers of the connections opened in the last epoch; without both, those
    /// connections break at a failover. A loopback address.
    #[arg(long, env = "COLO_PROXYD_NET_OUTPUT_LISTEN", value_name = "HOST:PORT")]
    pub net_output_listen: Option<String>,
    /// After a failover to the secondary: listen here for QEMU's chardev `red3`
    /// (filter-redirector `f4`, queue=tx, outdev; a TCP client with reconnect-ms that
    /// qmp-driver adds at the failover): the network's frames for the SVM, which the daemon
    /// rewrites and writes to `red0`. Goes with --net-output-listen. A loopback address.
    #[arg(long, env = "COLO_PROXYD_NET_INPUT_LISTEN", value_name = "HOST:PORT")]
    pub net_input_listen: Option<String>,
    /// A uid allowed to connect to the four QEMU ports above (the user QEMU runs as), besides
    /// root and colo-proxyd's own uid, which always are. Repeatable (comma-separated in the
    /// variable). The ports must be loopback addresses; a connection whose socket belongs to
    /// any other uid is closed before a byte is read, logged and counted
    /// (colo_proxyd_port_refused_total), the current connection kept.
    #[arg(
        long = "qemu-uid",
        env = "COLO_PROXYD_QEMU_UID",
        value_name = "UID",
        value_delimiter = ','
    )]
    pub qemu_uid: Vec<u32>,
    /// The primary's colo-proxyd link address (its --link-listen).
    #[arg(long, env = "COLO_PROXYD_PRIMARY_LINK", value_name = "HOST:PORT")]
    pub primary_link: Option<String>,
    /// Mutual TLS on the inter-host link: this host's identity directory, in QEMU's
    /// tls-creds-x509 layout (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,
    /// client-key.pem; `qmp-driver pki create`; docs/security.md). Only the host named by
    /// --tls-peer is accepted. Without it the link is plaintext and unauthenticated (a
    /// warning at start, the metric link_unauthenticated).
    #[arg(long, env = "COLO_PROXYD_TLS_DIR", value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// With --tls-dir: the peer host's identity, the name in its certificates (the other
    /// host's directory name under `qmp-driver pki create --out`).
    #[arg(long, env = "COLO_PROXYD_TLS_PEER", value_name = "NAME")]
    pub tls_peer: Option<String>,
    /// The checkpoint-barrier relay's control socket: unix:PATH or an absolute path when the
    /// relay runs on this host (`qmp-driver relay --control`), else tcp:HOST:PORT (the relay's
    /// `--control-tcp`, on the replication link).
    #[arg(long, env = "COLO_PROXYD_CONTROL", value_name = "ADDRESS")]
    pub control: Option<Address>,
    /// Serve Prometheus metrics over HTTP on this address.
    #[arg(long, env = "COLO_PROXYD_METRICS", value_name = "HOST:PORT")]
    pub metrics: Option<String>,
    /// Our name on the relay's control socket [default: colo-proxyd-secondary].
    #[arg(long, env = "COLO_PROXYD_NAME", value_name = "NAME")]
    pub name: Option<String>,
    /// The secondary QEMU's QMP monitor (a monitor of colo-proxyd's own): unix:PATH or
    /// tcp:HOST:PORT. With it, colo-proxyd re-creates the filter that reads red0 at each
    /// connection of red0 (QEMU never reads an indev again after it closed). Without it, a
    /// reconnection of red0 leaves the SVM without its input until the filter is re-created
    /// by hand (logged).
    #[arg(long, env = "COLO_PROXYD_QMP", value_name = "ADDRESS")]
    pub qmp: Option<String>,
    /// The secondary QEMU's netdev of the guest NIC [default: hn0].
    #[arg(long, env = "COLO_PROXYD_NETDEV", value_name = "ID")]
    pub netdev: Option<String>,
    /// The filter-redirector that reads red0 (queue=tx), re-created with --qmp
    /// [default: f1].
    #[arg(long, env = "COLO_PROXYD_SVM_INPUT_REDIRECTOR", value_name = "ID")]
    pub svm_input_redirector: Option<String>,
    /// Its chardev (indev) [default: red0].
    #[arg(long, env = "COLO_PROXYD_SVM_INPUT_CHARDEV", value_name = "ID")]
    pub svm_input_chardev: Option<String>,
    /// The filter-redirector that writes red1 (queue=rx); the input redirector is re-created
    /// just before it, its place on the command line [default: f2].
    #[arg(long, env = "COLO_PROXYD_SVM_OUTPUT_REDIRECTOR", value_name = "ID")]
    pub svm_output_redirector: Option<String>,
    /// After a failover, the filter-redirector that reads red2 (queue=rx, the SVM's output to
    /// the network), which qmp-driver adds just before the output redirector; re-created
    /// with --qmp at each connection of red2, as the input redirector is [default: f3].
    #[arg(long, env = "COLO_PROXYD_NET_OUTPUT_REDIRECTOR", value_name = "ID")]
    pub net_output_redirector: Option<String>,
    /// Most connections with sequence-rewriting state (a handshake in progress, or an offset
    /// that is not 0), about 100 bytes each. Beyond, closed connections are evicted; when
    /// none is closed, a new connection's SYN into the SVM is refused (dropped, logged,
    /// counted) rather than run with a wrong offset (docs/memory-bounds.md)
    /// [default: 65536].
    #[arg(long, env = "COLO_PROXYD_REWRITE_MAX_CONNECTIONS", value_name = "N")]
    pub rewrite_max_connections: Option<usize>,
    /// An established connection with a sequence offset, idle this long, is forgotten (its
    /// later packets would carry wrong numbers; RFC 5382's bound for NATs) [default: 7440].
    #[arg(long, env = "COLO_PROXYD_REWRITE_IDLE_SECS", value_name = "SECS")]
    pub rewrite_idle_secs: Option<u64>,
}

/// The secondary daemon's validated settings.
#[derive(Debug, Clone)]
pub struct SecondaryConfig {
    /// `red0`'s listen address (into the SVM).
    pub svm_input_listen: String,
    /// `red1`'s listen address (the SVM's output).
    pub svm_output_listen: String,
    /// The network bridge after a failover (`red2`, `red3`), when configured.
    pub bridge: Option<BridgeAddresses>,
    /// Uids besides root and the daemon's own allowed to connect to the QEMU ports.
    pub qemu_uids: Vec<u32>,
    /// The primary daemon's link address.
    pub primary_link: String,
    /// Mutual TLS on the link (`None`: plaintext, unauthenticated).
    pub link_tls: Option<LinkTls>,
    /// The relay's control socket (Unix or TCP).
    pub control: Address,
    /// The metrics endpoint.
    pub metrics: Option<String>,
    /// Our name on the control socket.
    pub name: String,
    /// First wait before reconnecting the link; doubled up to `link_retry_max`.
    pub link_retry_min: Duration,
    /// Longest wait between link reconnection attempts.
    pub link_retry_max: Duration,
    /// The secondary QEMU's QMP monitor, to re-create `f1`.
    pub qmp: Option<Address>,
    /// The guest NIC's netdev.
    pub netdev: String,
    /// `f1`: reads `red0`.
    pub svm_input_redirector: String,
    /// `red0`: its indev.
    pub svm_input_chardev: String,
    /// `f2`: `f1` comes just before it.
    pub svm_output_redirector: String,
    /// `f3`: reads `red2` after a failover, just before `f2`.
    pub net_output_redirector: String,
    /// The bounds of the rewrite table.
    pub rewrite: RewriteLimits,
}

/// Where the secondary's network bridge listens (both or neither are given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeAddresses {
    /// `red2`: frames to the network.
    pub net_output_listen: String,
    /// `red3`: frames from the network.
    pub net_input_listen: String,
}

impl SecondaryArgs {
    /// Fills what the command line and the environment left out from `file`.
    fn merge(self, file: SecondaryArgs, layers: &mut OptionLayers) -> SecondaryArgs {
        SecondaryArgs {
            config: self.config,
            svm_input_listen: layers.pick(
                "svm-input-listen",
                self.svm_input_listen,
                file.svm_input_listen,
            ),
            svm_output_listen: layers.pick(
                "svm-output-listen",
                self.svm_output_listen,
                file.svm_output_listen,
            ),
            net_output_listen: layers.pick(
                "net-output-listen",
                self.net_output_listen,
                file.net_output_listen,
            ),
            net_input_listen: layers.pick(
                "net-input-listen",
                self.net_input_listen,
                file.net_input_listen,
            ),
            qemu_uid: layers.pick_list("qemu-uid", self.qemu_uid, file.qemu_uid),
            primary_link: layers.pick("primary-link", self.primary_link, file.primary_link),
            tls_dir: layers.pick("tls-dir", self.tls_dir, file.tls_dir),
            tls_peer: layers.pick("tls-peer", self.tls_peer, file.tls_peer),
            control: layers.pick("control", self.control, file.control),
            metrics: layers.pick("metrics", self.metrics, file.metrics),
            name: layers.pick("name", self.name, file.name),
            qmp: layers.pick("qmp", self.qmp, file.qmp),
            netdev: layers.pick("netdev", self.netdev, file.netdev),
            svm_input_redirector: layers.pick(
                "svm-input-redirector",
                self.svm_input_redirector,
                file.svm_input_redirector,
            ),
            svm_input_chardev: layers.pick(
                "svm-input-chardev",
                self.svm_input_chardev,
                file.svm_input_chardev,
            ),
            svm_output_redirector: layers.pick(
                "svm-output-redirector",
                self.svm_output_redirector,
                file.svm_output_redirector,
            ),
            net_output_redirector: layers.pick(
                "net-output-redirector",
                self.net_output_redirector,
                file.net_output_redirector,
            ),
            rewrite_max_connections: layers.pick(
                "rewrite-max-connections",
                self.rewrite_max_connections,
                file.rewrite_max_connections,
            ),
            rewrite_idle_secs: layers.pick(
                "rewrite-idle-secs",
                self.rewrite_idle_secs,
                file.rewrite_idle_secs,
            ),
        }
    }
}

impl TryFrom<SecondaryArgs> for SecondaryConfig {
    type Error = OptionError;

    fn try_from(args: SecondaryArgs) -> Result<Self, OptionError> {
        let mut layers = OptionLayers::new(ENV_PREFIX, args.config.clone());
        let file = layers.read_file()?;
        let merged = args.merge(file, &mut layers);
        SecondaryConfig::validate(merged, &layers)
    }
}

impl SecondaryConfig {
    /// Validates the merged options.
    fn validate(a: SecondaryArgs, layers: &OptionLayers) -> Result<SecondaryConfig, OptionError> {
        // One port without the other would carry one direction only: refused.
        let net_output_listen = loopback(layers, a.net_output_listen, "net-output-listen")?;
        let net_input_listen = loopback(layers, a.net_input_listen, "net-input-listen")?;
        let bridge = match (net_output_listen, net_input_listen) {
            (None, None) => None,
            (Some(net_output_listen), Some(net_input_listen)) => Some(BridgeAddresses {
                net_output_listen,
                net_input_listen,
            }),
            (Some(_), None) => return Err(layers.missing("net-input-listen")),
            (None, Some(_)) => return Err(layers.missing("net-output-listen")),
        };
        Ok(SecondaryConfig {
            bridge,
            qemu_uids: a.qemu_uid,
            svm_input_listen: layers.required(
                "svm-input-listen",
                loopback(layers, a.svm_input_listen, "svm-input-listen")?,
            )?,
            svm_output_listen: layers.required(
                "svm-output-listen",
                loopback(layers, a.svm_output_listen, "svm-output-listen")?,
            )?,
            primary_link: layers.required("primary-link", a.primary_link)?,
            link_tls: LinkTls::from_options(layers, a.tls_dir, a.tls_peer)?,
            control: layers.required("control", a.control)?,
            metrics: a.metrics,
            name: a.name.unwrap_or_else(|| "colo-proxyd-secondary".into()),
            link_retry_min: Duration::from_millis(100),
            link_retry_max: Duration::from_secs(2),
            qmp: parsed(layers, a.qmp, "qmp")?,
            netdev: a.netdev.unwrap_or_else(|| "hn0".into()),
            svm_input_redirector: a.svm_input_redirector.unwrap_or_else(|| "f1".into()),
            svm_input_chardev: a.svm_input_chardev.unwrap_or_else(|| "red0".into()),
            svm_output_redirector: a.svm_output_redirector.unwrap_or_else(|| "f2".into()),
            net_output_redirector: a.net_output_redirector.unwrap_or_else(|| "f3".into()),
            rewrite: RewriteLimits {
                max_connections: at_least_one(
                    layers,
                    a.rewrite_max_connections,
                    RewriteLimits::DEFAULT_MAX_CONNECTIONS,
                    "rewrite-max-connections",
                )?,
                idle: seconds(
                    layers,
                    a.rewrite_idle_secs,
                    RewriteLimits::DEFAULT_IDLE,
                    "rewrite-idle-secs",
                )?,
                ..RewriteLimits::default()
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use colo_testkit::cli::assert_every_option_reads_its_env_var;
    use colo_testkit::rerun::{Case, child_case, rerun_with_env};

    fn primary_args() -> PrimaryArgs {
        PrimaryArgs {
            pvm_output: Some("127.0.0.1:9004".into()),
            mirror: Some("127.0.0.1:9003".into()),
            release: Some("127.0.0.1:9005".into()),
            link_listen: Some("0.0.0.0:9100".into()),
            control: Some("/run/colo/relay.sock".parse().unwrap()),
            qmp: Some("unix:/run/colo/proxyd.qmp".into()),
            ..PrimaryArgs::default()
        }
    }

    #[test]
    fn defaults_fill_a_minimal_primary() {
        let c = PrimaryConfig::try_from(primary_args()).unwrap();
        assert_eq!(c.engine.max_hold, Duration::from_millis(200));
        assert_eq!(c.engine.max_hold_limit, DEFAULT_MAX_HOLD_LIMIT);
        assert_eq!(c.chardevs, ["compare0", "compare_out", "mirror0"]);
        assert_eq!(c.checkpoint_interval, Duration::from_secs(1));
        assert_eq!(c.qmp, Address::Unix("/run/colo/proxyd.qmp".into()));
        assert_eq!(
            (
                c.netdev.as_str(),
                c.release_redirector.as_str(),
                c.release_chardev.as_str(),
                c.pvm_output_redirector.as_str()
            ),
            ("hn0", "redire0", "compare_out", "redire1")
        );
        assert!(c.link_down_without_pvm_output);
    }

    #[test]
    fn the_table_bounds_default_and_refuse_zero() {
        let c = PrimaryConfig::try_from(primary_args()).unwrap();
        assert_eq!(c.engine.max_flows, 65_536);
        assert_eq!(c.engine.flow_idle, Duration::from_secs(30));
        let c = SecondaryConfig::try_from(secondary_args()).unwrap();
        assert_eq!(c.rewrite, RewriteLimits::default());
        let mut a = primary_args();
        a.max_flows = Some(100);
        a.flow_idle_secs = Some(5);
        let c = PrimaryConfig::try_from(a.clone()).unwrap();
        assert_eq!(
            (c.engine.max_flows, c.engine.flow_idle),
            (100, Duration::from_secs(5))
        );
        a.max_flows = Some(0);
        let err = PrimaryConfig::try_from(a).unwrap_err().to_string();
        assert!(err.contains("max-flows"), "{err}");
        let mut a = secondary_args();
        a.rewrite_max_connections = Some(10);
        a.rewrite_idle_secs = Some(60);
        let c = SecondaryConfig::try_from(a.clone()).unwrap();
        assert_eq!(
            (c.rewrite.max_connections, c.rewrite.idle),
            (10, Duration::from_secs(60))
        );
        a.rewrite_idle_secs = Some(0);
        let err = SecondaryConfig::try_from(a).unwrap_err().to_string();
        assert!(err.contains("rewrite-idle-secs"), "{err}");
    }

    #[test]
    fn the_secondary_takes_an_optional_qmp_and_filter_ids() {
        let c = SecondaryConfig::try_from(secondary_args()).unwrap();
        assert_eq!(c.qmp, None);
        assert_eq!(
            (
                c.netdev.as_str(),
                c.svm_input_redirector.as_str(),
                c.svm_input_chardev.as_str(),
                c.svm_output_redirector.as_str(),
                c.net_output_redirector.as_str()
            ),
            ("hn0", "f1", "red0", "f2", "f3")
        );
        let mut a = secondary_args();
        a.qmp = Some("tcp:127.0.0.1:4445".into());
        a.svm_input_redirector = Some("in0".into());
        let c = SecondaryConfig::try_from(a).unwrap();
        assert_eq!(c.qmp, Some(Address::tcp("127.0.0.1", 4445)));
        assert_eq!(c.svm_input_redirector, "in0");
        let mut a = secondary_args();
        a.qmp = Some("run/qmp".into());
        assert!(matches!(
            SecondaryConfig::try_from(a),
            Err(OptionError::Invalid { option: "qmp", .. })
        ));
    }

    #[test]
    fn missing_and_invalid_settings_name_the_option() {
        let mut a = primary_args();
        a.release = None;
        let err = PrimaryConfig::try_from(a).unwrap_err();
        assert!(
            matches!(
                err,
                OptionError::Invalid {
                    option: "release-listen",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("--release"), "{err}");
        let mut a = primary_args();
        a.qmp = Some("run/qmp".into());
        assert!(matches!(
            PrimaryConfig::try_from(a),
            Err(OptionError::Invalid { option: "qmp", .. })
        ));
        let mut a = primary_args();
        a.max_hold_ms = Some(0);
        assert!(PrimaryConfig::try_from(a).is_err());
        let mut a = primary_args();
        a.max_hold_ms = Some(300);
        a.max_hold_limit_ms = Some(250);
        assert!(matches!(
            PrimaryConfig::try_from(a),
            Err(OptionError::Invalid {
                option: "max-hold-limit-ms",
                ..
            })
        ));
        let mut a = primary_args();
        a.uncompared = Some("drop".into());
        assert!(PrimaryConfig::try_from(a).is_err());
    }

    #[test]
    fn each_qemu_port_is_listened_on_or_connected_to_never_both() {
        let mut a = primary_args();
        a.pvm_output = None;
        a.pvm_output_listen = Some("127.0.0.1:9001".into());
        a.qemu_uid = vec![107];
        let c = PrimaryConfig::try_from(a).unwrap();
        assert_eq!(c.pvm_output, QemuPort::Listen("127.0.0.1:9001".into()));
        assert!(matches!(c.mirror, QemuPort::Connect(_)));
        assert_eq!(c.qemu_uids, [107]);

        let mut a = primary_args();
        a.mirror_listen = Some("127.0.0.1:9003".into());
        let err = PrimaryConfig::try_from(a).unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");

        // QEMU's ports identify their peers by local uid: only loopback may listen.
        let mut a = primary_args();
        a.release = None;
        a.release_listen = Some("0.0.0.0:9005".into());
        assert!(matches!(
            PrimaryConfig::try_from(a),
            Err(OptionError::Invalid {
                option: "release-listen",
                ..
            })
        ));
    }

    #[test]
    fn bypass_rules_parse_and_an_empty_rule_is_refused() {
        assert_eq!(
            parse_bypass("proto=udp,port=123").unwrap(),
            BypassRule {
                protocol: Some(17),
                port: Some(123),
                address: None
            }
        );
        assert!(parse_bypass("addr=10.0.0.53").unwrap().address.is_some());
        assert!(parse_bypass("").is_err());
        assert!(parse_bypass("colour=blue").is_err());
        assert!(parse_bypass("port=http").is_err());
    }

    #[test]
    fn the_file_fills_what_the_command_line_leaves_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "release = \"10.0.0.1:1\"\nmax-hold-ms = 50\nbypass = [\"proto=udp,port=123\"]\n",
        )
        .unwrap();
        let mut a = primary_args();
        a.release = None;
        a.config = Some(path.clone());
        let c = PrimaryConfig::try_from(a).unwrap();
        assert_eq!(c.release, QemuPort::Connect("10.0.0.1:1".into()));
        assert_eq!(c.engine.max_hold, Duration::from_millis(50));
        assert_eq!(c.engine.bypass.len(), 1);
        assert!(
            c.engine.equivalent.is_empty(),
            "equivalence is off by default"
        );
        std::fs::write(&path, "equivalent = [\"tcp:80 header Date\"]\n").unwrap();
        let mut a = primary_args();
        a.config = Some(path.clone());
        let c = PrimaryConfig::try_from(a).unwrap();
        assert_eq!(c.engine.equivalent[0].text(), "tcp:80 header Date");
        std::fs::write(&path, "equivalent = [\"tcp:80 cookie x\"]\n").unwrap();
        let mut a = primary_args();
        a.config = Some(path.clone());
        assert!(PrimaryConfig::try_from(a).is_err());
        std::fs::write(&path, "relase = \"x\"\n").unwrap();
        let mut a = primary_args();
        a.config = Some(path);
        assert!(matches!(
            PrimaryConfig::try_from(a),
            Err(OptionError::File { .. })
        ));
    }
    fn secondary_args() -> SecondaryArgs {
        SecondaryArgs {
            svm_input_listen: Some("127.0.0.1:9003".into()),
            svm_output_listen: Some("127.0.0.1:9004".into()),
            primary_link: Some("192.168.77.1:9100".into()),
            control: Some("/run/colo/relay.sock".parse().unwrap()),
            ..SecondaryArgs::default()
        }
    }

    #[test]
    fn the_network_bridge_takes_both_listen_addresses_or_neither() {
        assert_eq!(
            SecondaryConfig::try_from(secondary_args()).unwrap().bridge,
            None
        );
        let mut a = secondary_args();
        a.net_output_listen = Some("127.0.0.1:9006".into());
        assert_eq!(
            SecondaryConfig::try_from(a.clone()).unwrap_err(),
            OptionError::Missing {
                option: "net-input-listen",
                env: "COLO_PROXYD_NET_INPUT_LISTEN".into()
            }
        );
        a.net_input_listen = Some("127.0.0.1:9007".into());
        let want = Some(BridgeAddresses {
            net_output_listen: "127.0.0.1:9006".into(),
            net_input_listen: "127.0.0.1:9007".into(),
        });
        assert_eq!(SecondaryConfig::try_from(a).unwrap().bridge, want);
        // The same from the file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(
            &path,
            "net-output-listen = \"127.0.0.1:9006\"\nnet-input-listen = \"127.0.0.1:9007\"\n",
        )
        .unwrap();
        let mut a = secondary_args();
        a.config = Some(path);
        assert_eq!(SecondaryConfig::try_from(a).unwrap().bridge, want);
        let mut a = secondary_args();
        a.net_input_listen = Some("127.0.0.1:9007".into());
        assert_eq!(
            SecondaryConfig::try_from(a).unwrap_err(),
            OptionError::Missing {
                option: "net-output-listen",
                env: "COLO_PROXYD_NET_OUTPUT_LISTEN".into()
            }
        );
    }

    #[test]
    fn qemu_ports_listen_on_loopback_only() {
        for good in [
            "127.0.0.1:9003",
            "127.0.0.2:0",
            "[::1]:9003",
            "localhost:9003",
        ] {
            let mut a = secondary_args();
            a.svm_output_listen = Some(good.into());
            assert!(SecondaryConfig::try_from(a).is_ok(), "{good}");
        }
        for (bad, set) in [
            ("0.0.0.0:9003", 0),
            ("192.168.77.2:9003", 1),
            ("[::]:9003", 2),
            ("example.org:9003", 3),
            ("localhost", 0),
        ] {
            let mut a = secondary_args();
            a.net_output_listen = Some("127.0.0.1:9006".into());
            a.net_input_listen = Some("127.0.0.1:9007".into());
            let (option, field) = match set {
                0 => ("svm-input-listen", &mut a.svm_input_listen),
                1 => ("svm-output-listen", &mut a.svm_output_listen),
                2 => ("net-output-listen", &mut a.net_output_listen),
                _ => ("net-input-listen", &mut a.net_input_listen),
            };
            *field = Some(bad.into());
            let err = SecondaryConfig::try_from(a).unwrap_err();
            assert!(
                matches!(err, OptionError::Invalid { option: o, .. } if o == option),
                "{bad}: {err}"
            );
            assert!(
                err.to_string().contains("is not a loopback address"),
                "{err}"
            );
        }
    }

    #[test]
    fn qemu_uids_come_from_the_flags_or_the_file() {
        assert!(
            SecondaryConfig::try_from(secondary_args())
                .unwrap()
                .qemu_uids
                .is_empty()
        );
        let mut a = secondary_args();
        a.qemu_uid = vec![107, 64055];
        assert_eq!(
            SecondaryConfig::try_from(a).unwrap().qemu_uids,
            [107, 64055]
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(&path, "qemu-uid = [107]\n").unwrap();
        let mut a = secondary_args();
        a.config = Some(path.clone());
        assert_eq!(SecondaryConfig::try_from(a).unwrap().qemu_uids, [107]);
        std::fs::write(&path, "qemu-uid = [\"qemu\"]\n").unwrap();
        let mut a = secondary_args();
        a.config = Some(path);
        assert!(SecondaryConfig::try_from(a).is_err());
    }

    /// The primary follows a relay on TCP over mutual TLS with its link's identity and peer
    /// (the relay runs on the secondary host); a Unix control socket, or no --tls-dir, stays
    /// as it was.
    #[test]
    fn the_primary_follows_a_tcp_relay_over_tls_with_the_links_identity() {
        use colo_tls::pki::{Validity, create_pair};
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        create_pair(&pki, &["hosta".into(), "hostb".into()], Validity::days(1)).unwrap();
        let tcp: Address = "tcp:192.168.77.2:9990".parse().unwrap();
        let with = |control: &Address, tls: bool| {
            let mut a = primary_args();
            a.control = Some(control.clone());
            if tls {
                a.tls_dir = Some(pki.join("hosta"));
                a.tls_peer = Some("hostb".into());
            }
            PrimaryConfig::try_from(a).unwrap().relay_options()
        };
        let opts = with(&tcp, true);
        assert_eq!(opts.control, tcp);
        assert_eq!(opts.tls.map(|c| c.peer()).as_deref(), Some("hostb"));
        assert!(with(&tcp, false).tls.is_none());
        let unix: Address = "/run/colo/relay.sock".parse().unwrap();
        assert!(with(&unix, true).tls.is_none());
    }

    #[test]
    fn link_tls_takes_a_directory_and_a_peer_from_the_flags_or_the_file() {
        use colo_tls::pki::{Validity, create_pair};
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        create_pair(&pki, &["hosta".into(), "hostb".into()], Validity::days(1)).unwrap();
        assert!(
            SecondaryConfig::try_from(secondary_args())
                .unwrap()
                .link_tls
                .is_none()
        );

        let mut a = primary_args();
        a.tls_dir = Some(pki.join("hosta"));
        a.tls_peer = Some("hostb".into());
        let tls = PrimaryConfig::try_from(a).unwrap().link_tls.unwrap();
        assert_eq!((tls.local.as_str(), tls.peer.as_str()), ("hosta", "hostb"));

        let path = dir.path().join("s.toml");
        let file = format!(
            "tls-dir = \"{}\"\ntls-peer = \"hosta\"\n",
            pki.join("hostb").display()
        );
        std::fs::write(&path, file).unwrap();
        let mut a = secondary_args();
        a.config = Some(path);
        let tls = SecondaryConfig::try_from(a).unwrap().link_tls.unwrap();
        assert_eq!((tls.local.as_str(), tls.peer.as_str()), ("hostb", "hosta"));
        assert_eq!(tls.connector.peer(), "hosta");

        let mut a = secondary_args();
        a.tls_peer = Some("hosta".into());
        assert_eq!(
            SecondaryConfig::try_from(a).unwrap_err(),
            OptionError::Missing {
                option: "tls-dir",
                env: "COLO_PROXYD_TLS_DIR".into()
            }
        );
        let mut a = secondary_args();
        a.tls_dir = Some(dir.path().join("nowhere"));
        a.tls_peer = Some("hosta".into());
        let err = SecondaryConfig::try_from(a).unwrap_err().to_string();
        assert!(err.contains("nowhere/ca-cert.pem"), "{err}");
    }

    #[test]
    fn control_is_unix_tcp_or_a_path_on_the_command_line_and_in_the_file() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            secondary: SecondaryArgs,
        }
        use clap::Parser;
        let parse = |control: &str| {
            Cli::try_parse_from(["secondary", "--control", control]).map(|c| c.secondary.control)
        };
        for (given, want) in [
            (
                "/run/colo/relay.sock",
                Address::unix("/run/colo/relay.sock"),
            ),
            (
                "unix:/run/colo/relay.sock",
                Address::unix("/run/colo/relay.sock"),
            ),
            ("tcp:192.168.77.2:9990", Address::tcp("192.168.77.2", 9990)),
        ] {
            assert_eq!(parse(given).unwrap(), Some(want), "{given}");
        }
        let e = parse("192.168.77.2:9990").unwrap_err().to_string();
        assert!(e.contains("write tcp:192.168.77.2:9990"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "control = \"tcp:192.168.77.2:9990\"\n").unwrap();
        let mut a = primary_args();
        a.control = None;
        a.config = Some(path.clone());
        let c = PrimaryConfig::try_from(a).unwrap();
        assert_eq!(c.control, Address::tcp("192.168.77.2", 9990));
        std::fs::write(&path, "control = \"relay.sock\"\n").unwrap();
        let mut a = primary_args();
        a.control = None;
        a.config = Some(path);
        let e = PrimaryConfig::try_from(a).unwrap_err().to_string();
        assert!(e.contains("relative path needs the unix: prefix"), "{e}");
    }

    #[test]
    fn every_option_has_its_colo_proxyd_env_var() {
        use clap::CommandFactory;
        // --config's too: COLO_PROXYD_CONFIG.
        assert_every_option_reads_its_env_var(&crate::cli::Cli::command(), ENV_PREFIX);
    }

    /// flag > env > file > default for `primary --max-hold-ms` (`COLO_PROXYD_MAX_HOLD_MS`,
    /// `max-hold-ms`, 200) and `secondary --netdev` (`COLO_PROXYD_NETDEV`, `netdev`, hn0). The
    /// environment is process-wide and tests run beside each other, so each case runs this
    /// test again in a child process with its own variables, where clap reads them as it does
    /// in the daemon.
    #[test]
    fn a_flag_beats_its_env_var_which_beats_the_file_which_beats_the_default() {
        use clap::Parser;
        if let Some(case) = child_case() {
            let mut full = vec!["colo-proxyd"];
            full.extend(case.args.iter().map(String::as_str));
            let cli = crate::cli::Cli::try_parse_from(&full).unwrap_or_else(|e| panic!("{e}"));
            let got = match cli.command {
                crate::cli::Command::Primary(a) => {
                    let c = PrimaryConfig::try_from(a).unwrap();
                    c.engine.max_hold.as_millis().to_string()
                }
                crate::cli::Command::Secondary(a) => SecondaryConfig::try_from(a).unwrap().netdev,
                crate::cli::Command::VhostNet(a) => a.tap,
            };
            assert_eq!(got, case.want, "{case}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // One file per role: each refuses the other's keys.
        let primary_file = dir.path().join("primary.toml");
        std::fs::write(&primary_file, "max-hold-ms = 300\n").unwrap();
        let secondary_file = dir.path().join("secondary.toml");
        std::fs::write(&secondary_file, "netdev = \"file0\"\n").unwrap();
        let (pfile, sfile) = (
            primary_file.to_str().unwrap(),
            secondary_file.to_str().unwrap(),
        );
        let primary = "primary --pvm-output 127.0.0.1:1 --mirror 127.0.0.1:2 --release \
                       127.0.0.1:3 --link-listen 127.0.0.1:4 --control /relay.sock --qmp /qmp";
        let secondary = "secondary --svm-input-listen 127.0.0.1:1 --svm-output-listen \
                         127.0.0.1:2 --primary-link 127.0.0.1:3 --control /relay.sock";
        let env: &[(&str, &str)] = &[
            ("COLO_PROXYD_MAX_HOLD_MS", "200"),
            ("COLO_PROXYD_NETDEV", "env0"),
        ];
        let secondary_config: &[(&str, &str)] = &[("COLO_PROXYD_CONFIG", sfile)];
        let with_config = [env, secondary_config].concat();
        let cases: &[Case] = &[
            // The flag wins over the variable and the file.
            (
                format!("{primary} --config {pfile} --max-hold-ms 100"),
                env,
                "100",
            ),
            (
                format!("{secondary} --config {sfile} --netdev flag0"),
                env,
                "flag0",
            ),
            // The variable wins over the file (named by --config or COLO_PROXYD_CONFIG).
            (format!("{primary} --config {pfile}"), env, "200"),
            (secondary.to_string(), &with_config, "env0"),
            // The file wins over the default.
            (format!("{primary} --config {pfile}"), &[], "300"),
            (secondary.to_string(), secondary_config, "file0"),
            // The default.
            (primary.to_string(), &[], "200"),
            (secondary.to_string(), &[], "hn0"),
        ];
        rerun_with_env(
            "daemon::config::tests::a_flag_beats_its_env_var_which_beats_the_file_which_beats_the_default",
            &[ENV_PREFIX],
            cases,
        );
    }

    #[test]
    fn an_invalid_value_names_where_it_came_from() {
        let mut a = primary_args();
        a.max_hold_ms = Some(0);
        assert_eq!(
            PrimaryConfig::try_from(a).unwrap_err().to_string(),
            "--max-hold-ms (or COLO_PROXYD_MAX_HOLD_MS): must be at least 1 ms"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "max-hold-ms = 0\n").unwrap();
        let mut a = primary_args();
        a.config = Some(path.clone());
        let err = PrimaryConfig::try_from(a).unwrap_err();
        assert_eq!(
            err,
            OptionError::InvalidInFile {
                path: path.clone(),
                option: "max-hold-ms",
                reason: "must be at least 1 ms".into(),
            }
        );
        assert_eq!(
            err.to_string(),
            format!(
                "config file {}: `max-hold-ms`: must be at least 1 ms",
                path.display()
            )
        );
        // The file's value is not used when the command line gives one.
        let mut a = primary_args();
        a.config = Some(path);
        a.max_hold_ms = Some(5);
        assert!(PrimaryConfig::try_from(a).is_ok());
        assert_eq!(
            OptionLayers::new(ENV_PREFIX, None)
                .missing("primary-link")
                .to_string(),
            "missing --primary-link (or COLO_PROXYD_PRIMARY_LINK, or `primary-link` in the \
             config file)"
        );
    }
}
