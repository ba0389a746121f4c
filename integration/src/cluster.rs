//! A real corosync cluster on the bed: one node per VM host namespace, corosync-qdevice on
//! each host and corosync-qnetd on the witness namespace as the third vote (model `net`,
//! algorithm `ffsplit`).
//!
//! ```text
//!   ns pri (host A, nodeid 1)        ns sec (host B, nodeid 2)        ns wit (witness)
//!   corosync -f ◄──── knet ────────► corosync -f                      corosync-qnetd -f -s off
//!   corosync-qdevice -f ──── TCP 5403 ─────────────────────────────►  192.168.77.3
//!                                    corosync-qdevice -f ───────────►
//! ```
//!
//! Every daemon is a child process of the test, started and killed by PID; nothing runs as a
//! service. Each host gets a private tree under the run dir (`<run>/a`, `<run>/b`, `<run>/w`)
//! bind-mounted over `/run` (so also `/var/run`: pid and lock files, qdevice's and qnetd's
//! local sockets), `/var/lib/corosync` and `/etc/corosync` (its `corosync.conf`) inside a
//! private mount namespace: corosync is started as
//! `ip netns exec NS unshare -m --propagation private sh -c 'mount --bind ...; exec corosync -f'`
//! (so the PID we hold is corosync's own), and corosync-qdevice joins that mount and network
//! namespace with `nsenter -t <corosync PID> -m -n corosync-qdevice -f`.
//!
//! # Client processes: the network namespace is enough
//!
//! corosync's clients (`corosync-quorumtool`, `corosync-cpgtool`, `corosync-cmapctl`, and any
//! program linking libcpg / libquorum / libvotequorum / libcmap, such as the HA agent) reach
//! corosync through libqb IPC: the connection starts on an *abstract* Unix socket, which the
//! kernel scopes by network namespace, and the data then flows through files in `/dev/shm`
//! named after the server's and the client's PIDs (`qb-<server>-<client>-...`), which we do not
//! separate and which do not collide. So a client started with plain
//! `ip netns exec <host ns> PROGRAM` talks to that host's corosync and no other, **without**
//! the host's mount namespace. The test `both_hosts_are_quorate_with_the_witness_vote` checks
//! this with `corosync-quorumtool -s` and `corosync-cpgtool` ([`Cluster::exec_in_netns`]).
//! What does need the mount namespace ([`Cluster::exec_in_host`]) is anything using a socket
//! *file* under `/run`: `corosync-qdevice-tool` (`/run/corosync-qdevice/...sock`) and
//! `corosync-qnetd-tool` (`/run/corosync-qnetd/...sock`, see [`Cluster::qnetd_status`]).
//!
//! # Faults
//!
//! [`Cluster::kill_host`] is a silent death (SIGKILL to corosync and qdevice, the host's
//! uplink down, no FIN to anyone); [`crate::topology::Topology::isolate_hosts`] splits the
//! hosts at the switch while both still reach the witness; [`Cluster::stop_node`] is a clean
//! leave (SIGTERM).
//!
//! Declare the [`Topology`] before the [`Cluster`] so the cluster drops first. Drop kills every
//! daemon this cluster started (by PID), removes the `/dev/shm` files its corosyncs left, and
//! removes the run dir (kept when the thread is panicking, for the post-mortem).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::topology::{Topology, addr};

/// One of the two VM hosts (not a VM role: the primary VM may run on either after a failover).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// Host A (namespace `pri`, 192.168.77.1), corosync nodeid 1.
    A,
    /// Host B (namespace `sec`, 192.168.77.2), corosync nodeid 2.
    B,
}

impl Host {
    /// Both hosts, A first.
    pub const BOTH: [Host; 2] = [Host::A, Host::B];

    /// corosync nodeid.
    pub fn node_id(self) -> u32 {
        match self {
            Host::A => 1,
            Host::B => 2,
        }
    }

    /// corosync node name (`hosta`, `hostb`).
    pub fn name(self) -> &'static str {
        match self {
            Host::A => "hosta",
            Host::B => "hostb",
        }
    }

    /// The host's address on the inter-host segment (its corosync `ring0_addr`).
    pub fn addr(self) -> &'static str {
        match self {
            Host::A => addr::PRIMARY_HOST,
            Host::B => addr::SECONDARY_HOST,
        }
    }

    /// The other host.
    pub fn other(self) -> Host {
        match self {
            Host::A => Host::B,
            Host::B => Host::A,
        }
    }

    fn index(self) -> usize {
        match self {
            Host::A => 0,
            Host::B => 1,
        }
    }

    fn dir_name(self) -> &'static str {
        match self {
            Host::A => "a",
            Host::B => "b",
        }
    }
}

/// Settings of the test cluster. The defaults are short timeouts for tests.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// `totem.cluster_name`.
    pub cluster_name: String,
    /// `totem.token` in ms: how long without the token before a node is declared lost.
    pub token_ms: u32,
    /// `totem.consensus` in ms; `None` keeps corosync's default (1.2 × token).
    pub consensus_ms: Option<u32>,
    /// `quorum.device.timeout` in ms (corosync-qdevice's poll interval and the net model's
    /// heartbeat base; default 10000, the net model accepts heartbeats down to 1000 ms).
    pub qdevice_timeout_ms: u32,
    /// `quorum.device.sync_timeout` in ms (the same during a membership change; default 30000).
    pub qdevice_sync_timeout_ms: u32,
    /// `quorum.device.net.tie_breaker`: `lowest`, `highest` or a node id.
    pub tie_breaker: String,
    /// Root for the run dir; `None` means `$COLO_RUN_DIR` or `/tmp/colo-cl`.
    pub run_root: Option<PathBuf>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            cluster_name: "colo".to_string(),
            token_ms: 1000,
            consensus_ms: None,
            qdevice_timeout_ms: 2000,
            qdevice_sync_timeout_ms: 3000,
            tie_breaker: "lowest".to_string(),
            run_root: None,
        }
    }
}

impl ClusterOptions {
    /// The defaults, with `COLO_CLUSTER_TOKEN_MS` overriding the token (to measure others).
    pub fn from_env() -> Self {
        let mut o = ClusterOptions::default();
        if let Some(token) = std::env::var("COLO_CLUSTER_TOKEN_MS")
            .ok()
            .and_then(|t| t.parse().ok())
        {
            o.token_ms = token;
        }
        o
    }

    /// The timeouts, for printing beside measured times.
    pub fn describe(&self) -> String {
        format!(
            "token {} ms, consensus {}, qdevice timeout {} ms, sync_timeout {} ms",
            self.token_ms,
            self.consensus_ms
                .map_or("default (1.2 × token)".to_string(), |c| format!("{c} ms")),
            self.qdevice_timeout_ms,
            self.qdevice_sync_timeout_ms
        )
    }
}

/// `corosync-quorumtool -s` as seen by one node, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuorumInfo {
    /// `Nodes:` — members of this node's current membership.
    pub nodes: usize,
    /// `Quorate: Yes`.
    pub quorate: bool,
    /// `Total votes:` (node votes plus the qdevice's while it gives its vote).
    pub total_votes: u32,
    /// `Expected votes:`.
    pub expected_votes: u32,
    /// `Flags:` line contains `Qdevice`.
    pub qdevice: bool,
}

impl QuorumInfo {
    /// Parses the text of `corosync-quorumtool -s`.
    pub fn parse(text: &str) -> Result<QuorumInfo> {
        let field = |key: &str| -> Option<&str> {
            text.lines()
                .find_map(|l| l.trim_start().strip_prefix(key))
                .map(str::trim)
        };
        let number = |key: &str| -> Result<u32> {
            field(key)
                .with_context(|| format!("no `{key}` in quorumtool output: {text}"))?
                .parse()
                .with_context(|| format!("`{key}` is not a number in: {text}"))
        };
        Ok(QuorumInfo {
            nodes: number("Nodes:")? as usize,
            quorate: field("Quorate:") == Some("Yes"),
            total_votes: number("Total votes:")?,
            expected_votes: number("Expected votes:")?,
            qdevice: field("Flags:").is_some_and(|f| f.split_whitespace().any(|w| w == "Qdevice")),
        })
    }
}

/// The programs the cluster runs, resolved once so that a missing package fails loudly.
#[derive(Debug, Clone)]
struct Programs {
    corosync: PathBuf,
    qdevice: PathBuf,
    qnetd: PathBuf,
    quorumtool: PathBuf,
    cmapctl: PathBuf,
    qnetd_tool: PathBuf,
}

#[derive(Debug)]
struct Node {
    ns: String,
    dir: PathBuf,
    corosync: Option<Child>,
    qdevice: Option<Child>,
    link_cut: bool,
}

/// A running two-node corosync cluster with a qnetd witness. See the module docs.
#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    options: ClusterOptions,
    programs: Programs,
    nodes: [Node; 2],
    witness_ns: String,
    qnetd: Option<Child>,
    /// Every corosync PID we started, for cleaning libqb's `/dev/shm` files after them.
    corosync_pids: Vec<u32>,
}

/// Finds `name` on `PATH` or in the sbin directories (root's tools live there).
fn find_program(name: &str, package: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("`{name}` not found: install the Debian package {package} (integration/setup.sh does)")
}

impl Programs {
    fn find() -> Result<Programs> {
        // nsenter and unshare (util-linux) are essential on Debian; checked all the same.
        find_program("nsenter", "util-linux")?;
        find_program("unshare", "util-linux")?;
        Ok(Programs {
            corosync: find_program("corosync", "corosync")?,
            quorumtool: find_program("corosync-quorumtool", "corosync")?,
            cmapctl: find_program("corosync-cmapctl", "corosync")?,
            qdevice: find_program("corosync-qdevice", "corosync-qdevice")?,
            qnetd: find_program("corosync-qnetd", "corosync-qnetd")?,
            qnetd_tool: find_program("corosync-qnetd-tool", "corosync-qnetd")?,
        })
    }
}

/// The corosync.conf of both nodes.
fn corosync_conf(o: &ClusterOptions) -> String {
    let consensus = o
        .consensus_ms
        .map(|c| format!("    consensus: {c}\n"))
        .unwrap_or_default();
    let mut nodes = String::new();
    for host in Host::BOTH {
        nodes.push_str(&format!(
            "    node {{\n        nodeid: {}\n        name: {}\n        ring0_addr: {}\n    }}\n",
            host.node_id(),
            host.name(),
            host.addr()
        ));
    }
    // One key per line: corosync's parser does not accept `{ a: b }` on one line.
    format!(
        "# Written by colo-testbed (integration/src/cluster.rs) for one test run.\n\
         totem {{\n\
         \x20   version: 2\n\
         \x20   cluster_name: {name}\n\
         \x20   transport: knet\n\
         \x20   # No encryption or authentication: a test bed on private veths, and no authkey\n\
         \x20   # to generate and distribute. Never do this on a real network.\n\
         \x20   crypto_cipher: none\n\
         \x20   crypto_hash: none\n\
         \x20   token: {token}\n\
         {consensus}\
         }}\n\
         nodelist {{\n\
         {nodes}\
         }}\n\
         quorum {{\n\
         \x20   provider: corosync_votequorum\n\
         \x20   # two_node stays off: the qdevice is the third vote.\n\
         \x20   device {{\n\
         \x20       model: net\n\
         \x20       votes: 1\n\
         \x20       timeout: {qd_timeout}\n\
         \x20       sync_timeout: {qd_sync}\n\
         \x20       net {{\n\
         \x20           host: {witness}\n\
         \x20           algorithm: ffsplit\n\
         \x20           tie_breaker: {tie}\n\
         \x20           # The witness's qnetd runs with -s off (no NSS database needed).\n\
         \x20           tls: off\n\
         \x20       }}\n\
         \x20   }}\n\
         }}\n\
         logging {{\n\
         \x20   to_stderr: yes\n\
         \x20   to_syslog: no\n\
         \x20   to_logfile: no\n\
         \x20   timestamp: hires\n\
         }}\n",
        name = o.cluster_name,
        token = o.token_ms,
        qd_timeout = o.qdevice_timeout_ms,
        qd_sync = o.qdevice_sync_timeout_ms,
        witness = addr::WITNESS,
        tie = o.tie_breaker,
    )
}

fn mkdirs(dirs: &[PathBuf]) -> Result<()> {
    for d in dirs {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    Ok(())
}

fn log_file(path: &Path) -> Result<File> {
    File::options()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let t = lines[lines.len().saturating_sub(8)..].join(" | ");
    if t.is_empty() {
        "(no output)".to_string()
    } else {
        t
    }
}

/// SIGTERM (or SIGKILL) a child we started, then reap it, SIGKILLing after `grace`.
fn stop_child(child: &mut Child, signal: i32, grace: Duration) {
    let pid = child.id() as libc::pid_t;
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    // SAFETY: kill has no memory preconditions; pid is our own unreaped child.
    unsafe { libc::kill(pid, signal) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

impl Cluster {
    /// Starts qnetd on the witness, then corosync and corosync-qdevice on both hosts, and
    /// returns once both corosyncs answer IPC (not yet quorate: see [`Cluster::wait_quorate`]).
    /// The topology must have a witness ([`Topology::create_with_witness`]).
    pub fn start(topo: &Topology, options: &ClusterOptions) -> Result<Cluster> {
        let programs = Programs::find()?;
        let witness_ns = topo
            .witness
            .clone()
            .context("the cluster needs a witness: use Topology::create_with_witness")?;
        let root = options.run_root.clone().unwrap_or_else(|| {
            std::env::var_os("COLO_RUN_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/tmp"))
                .join("colo-cl")
        });
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() % 1_000_000)
            .unwrap_or_default();
        let dir = root.join(format!("{}-{stamp}", std::process::id()));
        let conf = corosync_conf(options);
        let node = |host: Host, ns: &str| -> Result<Node> {
            let d = dir.join(host.dir_name());
            mkdirs(&[d.join("run"), d.join("lib"), d.join("etc")])?;
            std::fs::write(d.join("etc/corosync.conf"), &conf)?;
            Ok(Node {
                ns: ns.to_string(),
                dir: d,
                corosync: None,
                qdevice: None,
                link_cut: false,
            })
        };
        let nodes = [
            node(Host::A, &topo.primary)?,
            node(Host::B, &topo.secondary)?,
        ];
        mkdirs(&[dir.join("w/run"), dir.join("w/etc")])?;
        let mut cluster = Cluster {
            dir,
            options: options.clone(),
            programs,
            nodes,
            witness_ns,
            qnetd: None,
            corosync_pids: Vec::new(),
        };
        cluster.start_qnetd()?;
        for host in Host::BOTH {
            cluster.start_corosync(host)?;
        }
        for host in Host::BOTH {
            cluster.wait_ipc(host, Duration::from_secs(10))?;
            cluster.start_qdevice(host)?;
        }
        Ok(cluster)
    }

    /// The run dir (config, logs: `a/corosync.log`, `a/qdevice.log`, `w/qnetd.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The options the cluster was started with.
    pub fn options(&self) -> &ClusterOptions {
        &self.options
    }

    /// The network namespace of a host.
    pub fn namespace(&self, host: Host) -> &str {
        &self.nodes[host.index()].ns
    }

    /// PID of a host's running corosync.
    pub fn corosync_pid(&self, host: Host) -> Option<u32> {
        self.nodes[host.index()].corosync.as_ref().map(Child::id)
    }

    /// PID of a host's running corosync-qdevice.
    pub fn qdevice_pid(&self, host: Host) -> Option<u32> {
        self.nodes[host.index()].qdevice.as_ref().map(Child::id)
    }

    /// PID of the witness's corosync-qnetd.
    pub fn qnetd_pid(&self) -> Option<u32> {
        self.qnetd.as_ref().map(Child::id)
    }

    fn start_qnetd(&mut self) -> Result<()> {
        let w = self.dir.join("w");
        let script = format!(
            "set -e; mount --bind {run} /run; mount --bind {etc} /etc/corosync; \
             mkdir -p /run/corosync-qnetd; exec {qnetd} -f -s off",
            run = w.join("run").display(),
            etc = w.join("etc").display(),
            qnetd = self.programs.qnetd.display(),
        );
        let log = w.join("qnetd.log");
        let child = spawn_with_private_mounts(&self.witness_ns, &script, &log)
            .context("starting corosync-qnetd")?;
        self.qnetd = Some(child);
        Ok(())
    }

    fn start_corosync(&mut self, host: Host) -> Result<()> {
        let corosync = self.programs.corosync.clone();
        let node = &mut self.nodes[host.index()];
        if node.corosync.is_some() {
            bail!("corosync already runs on {host:?}");
        }
        let script = format!(
            "set -e; mount --bind {run} /run; mount --bind {lib} /var/lib/corosync; \
             mount --bind {etc} /etc/corosync; mkdir -p /run/corosync-qdevice; \
             exec {corosync} -f",
            run = node.dir.join("run").display(),
            lib = node.dir.join("lib").display(),
            etc = node.dir.join("etc").display(),
            corosync = corosync.display(),
        );
        let log = node.dir.join("corosync.log");
        let child = spawn_with_private_mounts(&node.ns, &script, &log)
            .with_context(|| format!("starting corosync on {host:?}"))?;
        self.corosync_pids.push(child.id());
        node.corosync = Some(child);
        Ok(())
    }

    fn start_qdevice(&mut self, host: Host) -> Result<()> {
        let pid = self
            .corosync_pid(host)
            .with_context(|| format!("no corosync on {host:?} for qdevice to join"))?;
        let qdevice = self.programs.qdevice.clone();
        let node = &mut self.nodes[host.index()];
        let log = node.dir.join("qdevice.log");
        // nsenter without --fork execs the program: the PID is qdevice's own.
        let child = Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-m", "-n"])
            .arg(&qdevice)
            .arg("-f")
            .stdin(Stdio::null())
            .stdout(log_file(&log)?)
            .stderr(log_file(&log)?)
            .spawn()
            .with_context(|| format!("starting corosync-qdevice on {host:?}"))?;
        node.qdevice = Some(child);
        Ok(())
    }

    /// Waits until the host's corosync answers IPC (cmap), failing early if it exited.
    fn wait_ipc(&mut self, host: Host, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let node = &mut self.nodes[host.index()];
            let log = node.dir.join("corosync.log");
            if let Some(c) = node.corosync.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                bail!("corosync on {host:?} exited ({status}): {}", tail(&log));
            }
            let cmapctl = self.programs.cmapctl.display().to_string();
            let out = self.exec_in_netns(host, &cmapctl, &["-g", "totem.cluster_name"]);
            if out.as_ref().is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "corosync on {host:?} did not answer IPC within {within:?}: {}",
                    tail(&log)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a program in the host's network namespace only (`ip netns exec NS`), as an HA
    /// agent started beside the VM would run. Enough for every libqb client of corosync
    /// (cpg, quorum, votequorum, cmap): see the module docs.
    pub fn exec_in_netns(&self, host: Host, program: &str, args: &[&str]) -> Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", self.namespace(host), program])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program} in {host:?}'s namespace"))
    }

    /// Runs a program in the host's network *and* mount namespace (those of its running
    /// corosync: `nsenter -t PID -m -n`), so it also sees the host's private `/run`,
    /// `/var/lib/corosync` and `/etc/corosync`.
    pub fn exec_in_host(&self, host: Host, program: &str, args: &[&str]) -> Result<Output> {
        let pid = self
            .corosync_pid(host)
            .with_context(|| format!("corosync does not run on {host:?}"))?;
        Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-m", "-n", program])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program} in {host:?}'s namespaces"))
    }

    /// The text of `corosync-quorumtool -s` on a host (run from its network namespace only).
    /// The tool exits non-zero when the node is not quorate; that is not an error here, a
    /// corosync that does not answer is.
    pub fn quorum_status(&self, host: Host) -> Result<String> {
        let tool = self.programs.quorumtool.display().to_string();
        let out = self.exec_in_netns(host, &tool, &["-s"])?;
        let text = output_text(&out);
        if !text.contains("Quorate:") {
            bail!("corosync-quorumtool -s on {host:?} failed: {}", text.trim());
        }
        Ok(text)
    }

    /// [`Cluster::quorum_status`], parsed.
    pub fn quorum(&self, host: Host) -> Result<QuorumInfo> {
        QuorumInfo::parse(&self.quorum_status(host)?)
    }

    /// `corosync-qnetd-tool -l -v` on the witness (needs qnetd's mount namespace: its socket
    /// is a file under its private `/run`).
    pub fn qnetd_status(&self) -> Result<String> {
        let pid = self.qnetd_pid().context("qnetd does not run")?;
        let out = Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-m", "-n"])
            .arg(&self.programs.qnetd_tool)
            .args(["-l", "-v"])
            .output()
            .context("running corosync-qnetd-tool")?;
        Ok(output_text(&out))
    }

    /// Polls the host's quorum state every 50 ms until `done` holds; returns the time taken.
    /// Errors while polling (corosync busy or restarting) count as "not yet".
    pub fn wait_until(
        &self,
        host: Host,
        within: Duration,
        what: &str,
        mut done: impl FnMut(&QuorumInfo) -> bool,
    ) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let last = match self.quorum_status(host) {
                Ok(text) => {
                    if QuorumInfo::parse(&text).is_ok_and(|q| done(&q)) {
                        return Ok(start.elapsed());
                    }
                    text
                }
                Err(e) => format!("{e:#}"),
            };
            if start.elapsed() > within {
                bail!("{host:?}: not {what} within {within:?}; last status:\n{last}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the host is quorate; returns how long it took.
    pub fn wait_quorate(&self, host: Host, within: Duration) -> Result<Duration> {
        self.wait_until(host, within, "quorate", |q| q.quorate)
    }

    /// Waits until the host's membership has exactly `members` nodes; returns how long it took.
    pub fn wait_membership(
        &self,
        host: Host,
        members: usize,
        within: Duration,
    ) -> Result<Duration> {
        self.wait_until(host, within, &format!("{members} members"), |q| {
            q.nodes == members
        })
    }

    /// The host dies silently: its uplink goes down first (so nothing more leaves it, no FIN
    /// reaches anyone), then its corosync and qdevice get SIGKILL. The caller kills the
    /// host's VM and other daemons itself. (qdevice's heuristics worker, orphaned, may stay a
    /// zombie of PID 1 when PID 1 does not reap.)
    pub fn kill_host(&mut self, host: Host) -> Result<()> {
        let ns = self.namespace(host).to_string();
        crate::topology::ip(&["-n", &ns, "link", "set", "eth0", "down"])?;
        let node = &mut self.nodes[host.index()];
        node.link_cut = true;
        for mut child in [node.qdevice.take(), node.corosync.take()]
            .into_iter()
            .flatten()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(())
    }

    /// A clean leave: SIGTERM to qdevice, then corosync (SIGKILL after 5 s each).
    pub fn stop_node(&mut self, host: Host) -> Result<()> {
        let node = &mut self.nodes[host.index()];
        if let Some(mut q) = node.qdevice.take() {
            stop_child(&mut q, libc::SIGTERM, Duration::from_secs(5));
        }
        if let Some(mut c) = node.corosync.take() {
            stop_child(&mut c, libc::SIGTERM, Duration::from_secs(5));
        }
        Ok(())
    }

    /// Starts a stopped or killed node again (bringing its uplink back up if
    /// [`Cluster::kill_host`] took it down), and returns once its corosync answers IPC.
    pub fn start_node(&mut self, host: Host) -> Result<()> {
        if self.nodes[host.index()].link_cut {
            let ns = self.namespace(host).to_string();
            crate::topology::ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            self.nodes[host.index()].link_cut = false;
        }
        self.start_corosync(host)?;
        self.wait_ipc(host, Duration::from_secs(10))?;
        self.start_qdevice(host)
    }

    /// [`Cluster::stop_node`] then [`Cluster::start_node`].
    pub fn restart_node(&mut self, host: Host) -> Result<()> {
        self.stop_node(host)?;
        self.start_node(host)
    }

    /// A host's corosync log (stderr, `timestamp: hires`, wall-clock times).
    pub fn corosync_log(&self, host: Host) -> PathBuf {
        self.nodes[host.index()].dir.join("corosync.log")
    }

    /// The last lines of a host's corosync and qdevice logs, for error messages.
    pub fn log_tail(&self, host: Host) -> String {
        let d = &self.nodes[host.index()].dir;
        format!(
            "corosync: {}\nqdevice: {}",
            tail(&d.join("corosync.log")),
            tail(&d.join("qdevice.log"))
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // qdevice gets SIGTERM so that it reaps its heuristics worker (a SIGKILLed qdevice
        // leaves the worker to PID 1, which here is no init and leaves a zombie).
        for node in &mut self.nodes {
            if let Some(q) = node.qdevice.as_mut() {
                stop_child(q, libc::SIGTERM, Duration::from_secs(2));
            }
        }
        for node in &mut self.nodes {
            if let Some(c) = node.corosync.as_mut() {
                stop_child(c, libc::SIGKILL, Duration::from_secs(2));
            }
        }
        if let Some(q) = self.qnetd.as_mut() {
            stop_child(q, libc::SIGKILL, Duration::from_secs(2));
        }
        // A SIGKILLed corosync leaves libqb's files in /dev/shm: its blackbox
        // (`qb-corosync-PID-blackbox-*`) and its clients' IPC (`qb-PID-CLIENT-*`).
        if let Ok(entries) = std::fs::read_dir("/dev/shm") {
            let prefixes: Vec<String> = self
                .corosync_pids
                .iter()
                .flat_map(|p| [format!("qb-{p}-"), format!("qb-corosync-{p}-")])
                .collect();
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if prefixes.iter().any(|p| name.starts_with(p.as_str())) {
                    let path = e.path();
                    let _ = if path.is_dir() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                }
            }
        }
        if std::thread::panicking() {
            eprintln!("cluster run dir kept: {}", self.dir.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("warning: could not remove {}: {e}", self.dir.display());
        }
    }
}

/// Runs `script` with `sh -c` in network namespace `ns` and a private mount namespace of its
/// own (its bind mounts stay invisible to the rest of the machine), output to `log`.
fn spawn_with_private_mounts(ns: &str, script: &str, log: &Path) -> Result<Child> {
    Ok(Command::new("ip")
        .args(["netns", "exec", ns])
        .args(["unshare", "-m", "--propagation", "private", "sh", "-c"])
        .arg(script)
        .stdin(Stdio::null())
        .stdout(log_file(log)?)
        .stderr(log_file(log)?)
        .spawn()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_quorumtool_status() {
        let text = "Quorum information\n------------------\nDate:             Sat Dec  5 06:08:09 2026\n\
                    Quorum provider:  corosync_votequorum\nNodes:            2\nNode ID:          1\n\
                    Ring ID:          1.9\nQuorate:          Yes\n\nVotequorum information\n\
                    ----------------------\nExpected votes:   3\nHighest expected: 3\n\
                    Total votes:      3\nQuorum:           2  \nFlags:            Quorate Qdevice \n";
        let q = QuorumInfo::parse(text).unwrap();
        assert_eq!(
            q,
            QuorumInfo {
                nodes: 2,
                quorate: true,
                total_votes: 3,
                expected_votes: 3,
                qdevice: true
            }
        );
    }

    #[test]
    fn config_has_one_key_per_line_and_no_two_node() {
        let conf = corosync_conf(&ClusterOptions::default());
        assert!(conf.contains("token: 1000\n"));
        assert!(conf.contains("host: 192.168.77.3\n"));
        assert!(!conf.contains("two_node:"));
        for line in conf.lines() {
            let l = line.trim();
            assert!(!(l.contains('{') && l.contains(':')), "{l}");
        }
    }
}
