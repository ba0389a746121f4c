//! Pacemaker on the bed's corosync cluster ([`crate::cluster`]): `pacemakerd -f` on each host,
//! inside the network **and mount** namespace of that host's corosync.
//!
//! ```text
//!   ns pri (host A "hosta")                      ns sec (host B "hostb")
//!   corosync -f + corosync-qdevice -f            corosync -f + corosync-qdevice -f
//!   pacemakerd -f  (based fenced execd attrd     pacemakerd -f  (...)
//!                   schedulerd controld)
//! ```
//!
//! Pacemaker talks to corosync over libqb (abstract sockets: the network namespace is enough),
//! but keeps files under `/run` (`/run/crm`), `/var/lib/pacemaker` (the CIB, the scheduler's
//! inputs) and `/var/log/pacemaker`, which must be the host's own. [`Pacemaker::start`] joins
//! the mount namespace [`crate::cluster::Cluster`] made for corosync (`nsenter -t <corosync PID>
//! -m -n`, the way corosync-qdevice joins it), bind-mounts a per-host directory over
//! `/var/lib/pacemaker` and `/var/log/pacemaker` there (the private `/run` is corosync's), and
//! execs `pacemakerd -f`; so the PID we hold is pacemakerd's. The mounts stay inside that
//! private mount namespace and vanish with its last process.
//!
//! The host's own network namespace gets its name back under the private `/run`
//! (`/run/netns/<ns>`, a bind mount of the namespace, what `ip netns attach` does): the bed
//! pair's failover hook, run by the agent that Pacemaker started, runs `ip -n <ns> ...`. (The
//! machine's `/run/netns` cannot be bind-mounted in from another mount namespace; the other
//! hosts' namespaces stay unnamed there.)
//!
//! Resource agents: Pacemaker 2.1 looks for OCF agents only under `/usr/lib/ocf/resource.d`
//! (compiled in). With [`PacemakerOptions::ocf_providers`] the same namespace gets a
//! `resource.d` of its own: every provider directory of the machine bind-mounted in, plus ours
//! (e.g. `colo` → the repository's `ha/ocf`, so `ocf:colo:colo-vm` is this checkout's agent),
//! and that tree is bind-mounted over `/usr/lib/ocf/resource.d`. Nothing is installed on the
//! machine.
//!
//! Fence agents: pacemaker-fenced runs `fence_*` from `/usr/sbin`. With
//! [`PacemakerOptions::fence_agents`] a read-only overlay (that directory over `/usr/sbin`) adds
//! them in the hosts' mount namespaces only, e.g. `ha/fence/fence_colo_bed`, which fences a
//! bed host by SIGKILLing every process in its network namespace ([`netns_inode`]).
//!
//! Cluster tools (`crm_mon`, `crm_attribute`, `cibadmin`, `crm_resource`, `crm_node`) run in
//! the same namespaces ([`Pacemaker::tool`]): they reach the daemons over libqb and read
//! `/var/lib/pacemaker` for some commands.
//!
//! Drop stops pacemakerd with SIGTERM (a clean shutdown stops the node's resources), waits,
//! then SIGKILLs pacemakerd and every Pacemaker daemon it started (by PID), and removes the
//! libqb files they left in `/dev/shm`. Declare the [`Pacemaker`] after the
//! [`crate::cluster::Cluster`] so that it drops first.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cluster::{Cluster, Host};

/// Where Pacemaker's own OCF agents live on the machine.
const OCF_RESOURCE_D: &str = "/usr/lib/ocf/resource.d";

/// Settings of the bed's Pacemaker.
#[derive(Clone, Debug, Default)]
pub struct PacemakerOptions {
    /// Extra OCF providers: (provider name, directory holding its agents). Each appears as
    /// `/usr/lib/ocf/resource.d/<name>` inside the hosts' mount namespaces.
    pub ocf_providers: Vec<(String, PathBuf)>,
    /// A directory of extra fence agents (`fence_*`, e.g. the repository's `ha/fence`): laid
    /// over `/usr/sbin` (a read-only overlay, that directory first) inside the hosts' mount
    /// namespaces, where pacemaker-fenced looks for them.
    pub fence_agents: Option<PathBuf>,
    /// How long a clean shutdown (SIGTERM to pacemakerd) may take before SIGKILL, at drop.
    /// `None`: 60 s.
    pub shutdown_grace: Option<Duration>,
}

/// `crm_mon -1` as seen by one node, parsed (the console format of Pacemaker 2.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrmMon {
    /// `Current DC: NAME (...)`; `None` while no DC is elected.
    pub dc: Option<String>,
    /// The DC line says `partition with quorum`.
    pub quorate: bool,
    /// Names in `Online: [ ... ]`.
    pub online: Vec<String>,
    /// The whole text.
    pub text: String,
}

impl CrmMon {
    /// Parses the text of `crm_mon -1`.
    pub fn parse(text: &str) -> CrmMon {
        let dc_line = text.lines().map(str::trim).find_map(|l| {
            l.strip_prefix("* Current DC:")
                .or(l.strip_prefix("Current DC:"))
        });
        let dc = dc_line.and_then(|l| {
            let name = l.split_whitespace().next()?;
            (name != "NONE").then(|| name.to_string())
        });
        let quorate = dc_line.is_some_and(|l| l.contains("partition with quorum"));
        let online = text
            .lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix("* Online:").or(l.strip_prefix("Online:")))
            .map(|l| {
                l.trim()
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .split_whitespace()
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        CrmMon {
            dc,
            quorate,
            online,
            text: text.to_string(),
        }
    }

    /// Both hosts online, a DC elected, the partition quorate.
    pub fn formed(&self) -> bool {
        self.dc.is_some()
            && self.quorate
            && Host::BOTH
                .iter()
                .all(|h| self.online.iter().any(|n| n == h.name()))
    }
}

#[derive(Debug)]
struct Daemon {
    child: Option<Child>,
    dir: PathBuf,
    /// Every PID seen as a child of pacemakerd (its sub-daemons), for the kill and cleanup.
    seen_pids: Vec<u32>,
}

/// Pacemaker running on both hosts of a [`Cluster`]. See the module docs.
#[derive(Debug)]
pub struct Pacemaker {
    nodes: [Daemon; 2],
    grace: Duration,
}

fn find(name: &str, package: &str) -> Result<PathBuf> {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("`{name}` not found: install the Debian package {package} (integration/setup.sh does)")
}

fn log_file(path: &Path) -> Result<File> {
    File::options()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

fn index(host: Host) -> usize {
    match host {
        Host::A => 0,
        Host::B => 1,
    }
}

/// The children of `pid` (from `/proc/*/stat`).
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `chown hacluster:haclient` (Pacemaker's daemons run as hacluster and write these dirs).
fn chown_hacluster(paths: &[PathBuf]) -> Result<()> {
    let out = Command::new("chown")
        .arg("hacluster:haclient")
        .args(paths)
        .output()
        .context("running chown")?;
    if !out.status.success() {
        bail!(
            "chown hacluster:haclient failed (is the package pacemaker installed? it creates \
             the user): {}",
            output_text(&out).trim()
        );
    }
    Ok(())
}

impl Pacemaker {
    /// Starts `pacemakerd -f` on both hosts of a running cluster (see the module docs) and
    /// returns at once; [`Pacemaker::wait_formed`] waits for the cluster.
    pub fn start(cluster: &Cluster, options: &PacemakerOptions) -> Result<Pacemaker> {
        let pacemakerd = find("pacemakerd", "pacemaker")?;
        find("crm_mon", "pacemaker-cli-utils")?;
        let mut nodes = Vec::new();
        for host in Host::BOTH {
            let corosync = cluster
                .corosync_pid(host)
                .with_context(|| format!("corosync does not run on {host:?}"))?;
            let dir = cluster.dir().join(format!("pcmk-{}", host.name()));
            let lib = dir.join("lib");
            let log = dir.join("log");
            let lib_dirs = ["cib", "pengine", "blackbox", "cores"].map(|d| lib.join(d));
            for d in lib_dirs.iter().chain([&log]) {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            }
            let mut owned = vec![lib.clone(), log.clone()];
            owned.extend(lib_dirs.iter().cloned());
            chown_hacluster(&owned)?;
            let mut script = format!(
                "set -e; mount --bind {lib} /var/lib/pacemaker; \
                 mount --bind {log} /var/log/pacemaker; \
                 mkdir -p /run/crm; chown hacluster:haclient /run/crm; \
                 mkdir -p /run/netns; touch /run/netns/{ns}; \
                 mount --bind /proc/self/ns/net /run/netns/{ns}; ",
                lib = lib.display(),
                log = log.display(),
                ns = cluster.namespace(host),
            );
            if !options.ocf_providers.is_empty() {
                let ocf = dir.join("resource.d");
                std::fs::create_dir_all(&ocf)?;
                // The machine's providers first, then ours, then the tree over the original.
                let mut providers = Vec::new();
                for e in std::fs::read_dir(OCF_RESOURCE_D)
                    .with_context(|| format!("reading {OCF_RESOURCE_D} (package resource-agents)"))?
                    .flatten()
                {
                    if e.path().is_dir() {
                        providers.push((e.file_name().to_string_lossy().into_owned(), e.path()));
                    }
                }
                for (name, path) in &options.ocf_providers {
                    if !path.is_dir() {
                        bail!("OCF provider {name}: {} is not a directory", path.display());
                    }
                    providers.retain(|(n, _)| n != name);
                    providers.push((name.clone(), path.clone()));
                }
                for (name, path) in &providers {
                    let target = ocf.join(name);
                    std::fs::create_dir_all(&target)?;
                    script.push_str(&format!(
                        "mount --bind {} {}; ",
                        path.display(),
                        target.display()
                    ));
                }
                // --rbind: the provider mounts under the tree come along (--bind would not).
                script.push_str(&format!(
                    "mount --rbind {} {OCF_RESOURCE_D}; ",
                    ocf.display()
                ));
            }
            if let Some(fence) = &options.fence_agents {
                if !fence.is_dir() {
                    bail!("fence agents: {} is not a directory", fence.display());
                }
                script.push_str(&format!(
                    "mount -t overlay colo-fence-agents -o lowerdir={}:/usr/sbin /usr/sbin; ",
                    fence.display()
                ));
            }
            script.push_str(&format!(
                "export PCMK_logfile={plog} PCMK_logfacility=none; exec {pacemakerd} -f",
                plog = dir.join("pacemaker.log").display(),
                pacemakerd = pacemakerd.display(),
            ));
            let out = dir.join("pacemakerd.out");
            // nsenter without --fork execs sh, which execs pacemakerd: the PID is pacemakerd's.
            let child = Command::new("nsenter")
                .args(["-t", &corosync.to_string(), "-m", "-n", "sh", "-c"])
                .arg(&script)
                .stdin(Stdio::null())
                .stdout(log_file(&out)?)
                .stderr(log_file(&out)?)
                .spawn()
                .with_context(|| format!("starting pacemakerd on {host:?}"))?;
            nodes.push(Daemon {
                child: Some(child),
                dir,
                seen_pids: Vec::new(),
            });
        }
        let nodes: [Daemon; 2] = nodes.try_into().map_err(|_| anyhow::anyhow!("two hosts"))?;
        Ok(Pacemaker {
            nodes,
            grace: options.shutdown_grace.unwrap_or(Duration::from_secs(60)),
        })
    }

    /// PID of a host's pacemakerd.
    pub fn pacemakerd_pid(&self, host: Host) -> Option<u32> {
        self.nodes[index(host)].child.as_ref().map(Child::id)
    }

    /// Whether a host's pacemakerd has exited (e.g. killed by a fence), reaping it if so.
    pub fn has_exited(&mut self, host: Host) -> bool {
        match self.nodes[index(host)].child.as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// The host's Pacemaker directory (`lib/` = its `/var/lib/pacemaker`, `pacemaker.log`).
    pub fn dir(&self, host: Host) -> &Path {
        &self.nodes[index(host)].dir
    }

    /// The last lines of a host's Pacemaker log, for error messages.
    pub fn log_tail(&self, host: Host, lines: usize) -> String {
        let d = self.dir(host);
        let mut text = std::fs::read_to_string(d.join("pacemaker.log")).unwrap_or_default();
        text.push_str(&std::fs::read_to_string(d.join("pacemakerd.out")).unwrap_or_default());
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Fails when a host's pacemakerd has exited; records its sub-daemons' PIDs.
    fn check_running(&mut self, host: Host) -> Result<()> {
        let tail = self.log_tail(host, 15);
        let node = &mut self.nodes[index(host)];
        let Some(child) = node.child.as_mut() else {
            bail!("pacemakerd does not run on {host:?}");
        };
        if let Ok(Some(status)) = child.try_wait() {
            bail!("pacemakerd on {host:?} exited ({status}):\n{tail}");
        }
        for pid in children_of(child.id()) {
            if !node.seen_pids.contains(&pid) {
                node.seen_pids.push(pid);
            }
        }
        Ok(())
    }

    /// Runs a cluster tool on a host (its network and mount namespace). A tool name without a
    /// `/` is looked up in the sbin directories.
    pub fn tool(
        &self,
        cluster: &Cluster,
        host: Host,
        program: &str,
        args: &[&str],
    ) -> Result<Output> {
        let path = if program.contains('/') {
            PathBuf::from(program)
        } else {
            find(program, "pacemaker-cli-utils")?
        };
        cluster.exec_in_host(host, &path.display().to_string(), args)
    }

    /// Like [`Pacemaker::tool`], failing with the tool's output when it exits non-zero.
    pub fn tool_ok(
        &self,
        cluster: &Cluster,
        host: Host,
        program: &str,
        args: &[&str],
    ) -> Result<String> {
        let out = self.tool(cluster, host, program, args)?;
        if !out.status.success() {
            bail!(
                "{program} {} on {host:?} failed ({}): {}",
                args.join(" "),
                out.status,
                output_text(&out).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `crm_mon -1` on a host, parsed. Errors while the cluster is starting are errors.
    pub fn crm_mon(&self, cluster: &Cluster, host: Host) -> Result<CrmMon> {
        let out = self.tool(cluster, host, "crm_mon", &["-1"])?;
        let text = output_text(&out);
        if !out.status.success() {
            bail!(
                "crm_mon -1 on {host:?} failed ({}): {}",
                out.status,
                text.trim()
            );
        }
        Ok(CrmMon::parse(&text))
    }

    /// Polls `crm_mon -1` on a host every 250 ms until `done` holds; returns the time taken.
    pub fn wait_until(
        &mut self,
        cluster: &Cluster,
        host: Host,
        within: Duration,
        what: &str,
        mut done: impl FnMut(&CrmMon) -> bool,
    ) -> Result<Duration> {
        let start = Instant::now();
        loop {
            self.check_running(host)?;
            let last = match self.crm_mon(cluster, host) {
                Ok(mon) if done(&mon) => return Ok(start.elapsed()),
                Ok(mon) => mon.text,
                Err(e) => format!("{e:#}"),
            };
            if start.elapsed() > within {
                bail!(
                    "{host:?}: Pacemaker not {what} within {within:?}; last crm_mon:\n{last}\n\
                     pacemaker log of {host:?}:\n{}",
                    self.log_tail(host, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits until `crm_mon -1` on both hosts shows both online, a DC, and quorum.
    pub fn wait_formed(&mut self, cluster: &Cluster, within: Duration) -> Result<Duration> {
        let start = Instant::now();
        for host in Host::BOTH {
            let left = within.saturating_sub(start.elapsed());
            self.wait_until(cluster, host, left, "formed", CrmMon::formed)?;
        }
        Ok(start.elapsed())
    }

    /// Sets a cluster property (`crm_attribute -t crm_config -n NAME -v VALUE`) from a host.
    pub fn set_property(
        &self,
        cluster: &Cluster,
        host: Host,
        name: &str,
        value: &str,
    ) -> Result<()> {
        self.tool_ok(
            cluster,
            host,
            "crm_attribute",
            &["-t", "crm_config", "-n", name, "-v", value],
        )
        .map(drop)
    }

    /// Adds XML to a CIB section (`cibadmin -C -o SECTION -X XML`) from a host.
    pub fn cib_create(
        &self,
        cluster: &Cluster,
        host: Host,
        section: &str,
        xml: &str,
    ) -> Result<()> {
        self.tool_ok(cluster, host, "cibadmin", &["-C", "-o", section, "-X", xml])
            .map(drop)
    }

    fn stop_host(&mut self, host: Host) {
        let _ = self.check_running(host);
        let grace = self.grace;
        let node = &mut self.nodes[index(host)];
        let Some(mut child) = node.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            // SAFETY: kill has no memory preconditions; the PID is our unreaped child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // Sub-daemons still alive (pacemakerd was SIGKILLed, or did not finish): SIGKILL them,
        // by the PIDs recorded while pacemakerd was their parent.
        if matches!(child.try_wait(), Ok(None)) {
            eprintln!("pacemakerd on {host:?} did not stop within {grace:?}: SIGKILL");
            for pid in children_of(child.id()) {
                if !node.seen_pids.contains(&pid) {
                    node.seen_pids.push(pid);
                }
            }
            let _ = child.kill();
        }
        let _ = child.wait();
        // Its daemons normally exit before it; one that outlives it (reparented) gets a few
        // seconds, then SIGKILL. Only PIDs that still run a Pacemaker daemon (no reuse).
        let is_daemon = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains("(pacemaker") && !s.contains(") Z "))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while node.seen_pids.iter().any(|&p| is_daemon(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        for &pid in &node.seen_pids {
            if is_daemon(pid) {
                // SAFETY: as above; the PID was pacemakerd's child and still runs its daemon.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
        let mut pids = node.seen_pids.clone();
        pids.push(child.id());
        remove_shm_files(&pids);
    }
}

/// The inode of a named network namespace (`/run/netns/NAME`): what `/proc/PID/ns/net` of its
/// processes reads as `net:[INODE]` (`fence_colo_bed`'s `ns_map`).
pub fn netns_inode(ns: &str) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let path = Path::new("/run/netns").join(ns);
    Ok(std::fs::metadata(&path)
        .with_context(|| format!("stat {}", path.display()))?
        .ino())
}

/// Removes libqb's `/dev/shm` files named after these server PIDs.
fn remove_shm_files(pids: &[u32]) {
    let prefixes: Vec<String> = pids.iter().map(|p| format!("qb-{p}-")).collect();
    if let Ok(entries) = std::fs::read_dir("/dev/shm") {
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
}

impl Drop for Pacemaker {
    fn drop(&mut self) {
        // Both at once: a clean shutdown of one node would otherwise move its resources to the
        // other first. SIGTERM to both, then wait for each.
        for host in Host::BOTH {
            // Their daemons' PIDs first: once pacemakerd exits they are nobody's children.
            let _ = self.check_running(host);
        }
        for node in &mut self.nodes {
            if let Some(c) = node.child.as_mut()
                && matches!(c.try_wait(), Ok(None))
            {
                // SAFETY: as in stop_host.
                unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            }
        }
        for host in Host::BOTH {
            self.stop_host(host);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_crm_mon() {
        let text = "Cluster Summary:\n  * Stack: corosync\n  * Current DC: hosta (version \
                    2.1.5-a3f44794f94) - partition with quorum\n  * Last updated: x\n  * 2 nodes \
                    configured\n  * 0 resource instances configured\n\nNode List:\n  * Online: [ \
                    hosta hostb ]\n\nFull List of Resources:\n  * No resources\n";
        let m = CrmMon::parse(text);
        assert_eq!(m.dc.as_deref(), Some("hosta"));
        assert!(m.quorate);
        assert_eq!(m.online, vec!["hosta", "hostb"]);
        assert!(m.formed());
        let none = CrmMon::parse("  * Current DC: NONE\n  * Online: [ hosta ]\n");
        assert_eq!(none.dc, None);
        assert!(!none.formed());
    }
}
