//! The `qmp-driver` command line: clap definitions, logging, and dispatch.

mod agent;
mod exit;
mod lowlevel;
mod pair_cmds;
mod pki;
mod relay;
mod render;
mod watch;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use colo_daemon::logging::LogFormat;
use colo_qmp::ConnectOptions;
use colo_types::Role;
use qmp_driver::config::{CONFIG_ENV, ConfigError, PairConfig};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

pub use exit::{EXIT_CODES_HELP, Exit};

const ABOUT: &str = "Drive a QEMU COLO pair (primary VM + hot-standby secondary VM) over QMP";

const LONG_ABOUT: &str = "\
Drive a QEMU COLO pair over QMP: a primary VM and a secondary VM run in lock-step on two \
hosts; QEMU's x-colo migration copies the primary's state to the secondary at every \
checkpoint, and when a host fails the other VM carries on.

The pair commands read the pair's config file (--config or $COLO_CONFIG; example: \
qemu-configs/pair.example.toml) and talk to the QEMUs' QMP sockets named there. Typical \
life cycle: `qemu-args` (command lines) -> start both QEMUs -> `start` -> `status`, \
`checkpoint` -> `failover` when a host dies, or `stop` to end protection. \
docs/operations.md is the operator guide.

Progress goes to stderr, results to stdout (`--json` where offered). Logs: RUST_LOG \
(e.g. RUST_LOG=qmp_driver=debug) and --log-format.";

/// The command line.
#[derive(Parser, Debug)]
#[command(
    name = "qmp-driver",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = EXIT_CODES_HELP,
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub globals: Globals,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command accepts.
#[derive(Args, Debug, Clone)]
pub struct Globals {
    /// The pair's config file (TOML). Needed by every pair command and by
    /// `qemu-args`; `relay` reads its [relay] section from it.
    #[arg(long, global = true, env = CONFIG_ENV, value_name = "PATH", help_heading = "Global options")]
    pub config: Option<PathBuf>,

    /// Log format on stderr. Filter with RUST_LOG (default: warn; info for
    /// `relay`).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = LogFormat::Text,
        env = "COLO_LOG_FORMAT",
        help_heading = "Global options"
    )]
    pub log_format: LogFormat,

    /// Bound on connecting to a QMP socket and its handshake, in seconds.
    #[arg(
        long,
        global = true,
        default_value = "5",
        value_name = "SECS",
        value_parser = parse_secs,
        help_heading = "Global options"
    )]
    pub connect_timeout: Duration,

    /// Bound on each QMP command, in seconds.
    #[arg(
        long,
        global = true,
        default_value = "10",
        value_name = "SECS",
        value_parser = parse_secs,
        help_heading = "Global options"
    )]
    pub command_timeout: Duration,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if secs <= 0.0 {
        return Err("must be more than 0".into());
    }
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

/// The bounds of a move of the running VM (`reprotect`, `failback`): its live disk copy and
/// its memory migration.
#[derive(Args, Debug, Clone, Copy)]
pub struct LiveMoveArgs {
    /// How long the disk copy may take until it is in step, in seconds.
    #[arg(long, default_value = "3600", value_name = "SECS", value_parser = parse_secs)]
    pub copy_timeout: Duration,
    /// Bound on the copy's background rate, in bytes per second (0: none). The guest's
    /// writes during the copy are copied as they happen, whatever this says.
    #[arg(long, default_value = "0", value_name = "BYTES")]
    pub speed: u64,
    /// How long the memory migration may take to the switch (and, for reprotect, then into
    /// COLO), in seconds.
    #[arg(long, default_value = "600", value_name = "SECS", value_parser = parse_secs)]
    pub timeout: Duration,
}

impl LiveMoveArgs {
    /// The options of a move whose disk is copied to `target`.
    pub fn options(self, target: String) -> qmp_driver::pair::ReprotectOptions {
        qmp_driver::pair::ReprotectOptions {
            copy_timeout: self.copy_timeout,
            speed: self.speed,
            migrate_timeout: self.timeout,
            ..qmp_driver::pair::ReprotectOptions::new(target)
        }
    }
}

/// `--json` for commands that print a report.
#[derive(Args, Debug, Clone, Copy)]
pub struct Output {
    /// Print the result as one JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The daemons `daemon-args` knows, as spelled on its command line.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonName {
    /// `colo-blockd secondary`.
    #[value(name = "colo-blockd")]
    Blockd,
    /// `colo-proxyd primary`.
    #[value(name = "colo-proxyd-primary")]
    ProxydPrimary,
    /// `colo-proxyd secondary`.
    #[value(name = "colo-proxyd-secondary")]
    ProxydSecondary,
}

impl DaemonName {
    /// The spelling.
    pub fn name(self) -> &'static str {
        match self {
            DaemonName::Blockd => "colo-blockd",
            DaemonName::ProxydPrimary => "colo-proxyd-primary",
            DaemonName::ProxydSecondary => "colo-proxyd-secondary",
        }
    }
}

impl From<DaemonName> for qmp_driver::daemon_args::Daemon {
    fn from(d: DaemonName) -> Self {
        use qmp_driver::daemon_args::Daemon;
        match d {
            DaemonName::Blockd => Daemon::Blockd,
            DaemonName::ProxydPrimary => Daemon::ProxydPrimary,
            DaemonName::ProxydSecondary => Daemon::ProxydSecondary,
        }
    }
}

impl From<qmp_driver::daemon_args::Daemon> for DaemonName {
    fn from(d: qmp_driver::daemon_args::Daemon) -> Self {
        use qmp_driver::daemon_args::Daemon;
        match d {
            Daemon::Blockd => DaemonName::Blockd,
            Daemon::ProxydPrimary => DaemonName::ProxydPrimary,
            Daemon::ProxydSecondary => DaemonName::ProxydSecondary,
        }
    }
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Prepare the SECONDARY QEMU to receive COLO: x-colo on, NBD server and disk export, listen
    /// for the migration.
    #[command(
        long_about = "Prepare the SECONDARY QEMU (started with `-incoming defer`) to receive COLO, \
        on the secondary's QMP socket: turn the x-colo capability on (and return-path off), \
        start the NBD server on secondary.host:disk.nbd_port, export disk.export writable \
        (with disk.backend = \"colo-blockd\" these two are skipped: colo-blockd serves the \
        disk), and listen on migration.secondary_incoming (migrate-incoming).\n\n\
        Use it when the secondary should be made ready before the primary is: `start` runs \
        these same steps itself. Every step is skipped when already done; a secondary already \
        in COLO is left alone. Refuses (exit 3) a secondary that is not waiting for an \
        incoming migration.",
        after_help = EXIT_CODES_HELP
    )]
    PrepareSecondary(Output),

    /// Start COLO: prepare the secondary, add the replication child on the primary, migrate the
    /// paused primary into COLO and wait until both run.
    #[command(
        long_about = "Start COLO on both QEMUs. Checks that the primary is still paused (`-S`, \
        run state prelaunch) and the secondary waits for a migration, waits for the \
        secondary's redirectors to connect to the primary's filter sockets, prepares the \
        secondary (as `prepare-secondary`), then on the primary: adds the replication child \
        to the disk's quorum (`drive_add -n buddy driver=replication,...`, or with \
        disk.backend = \"colo-blockd\" `blockdev-add` of an NBD client of its `replica` \
        export, then x-blockdev-change), turns x-colo on, sets x-checkpoint-delay, migrates to \
        migration.primary_target, and waits until the migration status is `colo` and both \
        VMs run. The guest boots inside COLO.\n\n\
        Use it once both QEMUs run with the arguments of `qemu-args`. A pair already in \
        COLO is reported as such (exit 0); a migration already under way is waited for. \
        Progress (\"migrating… 37%\", \"entered COLO in 0.7 s\") goes to stderr.",
        after_help = EXIT_CODES_HELP
    )]
    Start {
        #[command(flatten)]
        output: Output,
        /// How long the first migration may take until both VMs run in COLO, in seconds.
        #[arg(long, default_value = "120", value_name = "SECS", value_parser = parse_secs)]
        timeout: Duration,
        /// How long to wait for the secondary's redirectors to connect to the primary, in
        /// seconds.
        #[arg(long, default_value = "15", value_name = "SECS", value_parser = parse_secs)]
        chardev_timeout: Duration,
    },

    /// Copy the PRIMARY's disk to a new secondary's NBD export (drive-mirror), before `start`.
    #[command(
        long_about = "The initial full copy of the disk to a new secondary, on the primary's \
        QMP socket: drive-mirror (sync=full, mode=existing, format=raw) of disk.device into \
        the NBD export --target, progress on stderr until the job is ready (source and target \
        identical), then block-job-cancel, which leaves the target as the copy and the \
        primary on its own disk.\n\n\
        With colo-blockd, serve the secondary's image first with `colo-blockd serve --export \
        base=S.raw --tcp SECONDARY:PORT` (the default target is \
        nbd://secondary.host:disk.nbd_port/base), stop it after the copy, then start \
        `colo-blockd secondary --image S.raw` and the secondary QEMU. The image must be at \
        least as large as the disk. Refuses (exit 3) a primary whose guest runs: the copy \
        would not be exact; start the primary with -S and copy before `start`.",
        after_help = EXIT_CODES_HELP
    )]
    CopyDisk {
        #[command(flatten)]
        output: Output,
        /// The NBD export to copy to: nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH
        /// (default: nbd://secondary.host:disk.nbd_port/base).
        #[arg(long, value_name = "URI")]
        target: Option<String>,
        /// How long the copy may take, in seconds.
        #[arg(long, default_value = "3600", value_name = "SECS", value_parser = parse_secs)]
        timeout: Duration,
    },

    /// Bring a new secondary into COLO while the PRIMARY (a failover's survivor) keeps running.
    #[command(
        long_about = "Online re-protect, on both QMP sockets: the primary serves alone after a \
        failover; a new secondary QEMU waits (-incoming defer) on the secondary host, with the \
        relay, colo-proxyd secondary, `colo-blockd secondary --image S.raw` and `colo-blockd \
        serve --export base=S.raw --tcp SECONDARY:PORT` (the copy's target, on a port of its \
        own, default disk.nbd_port + 1) running there.\n\n\
        Copies the running guest's disk into the target (an NBD node, with [tls] over \
        STARTTLS; blockdev-mirror sync=full, copy-mode=write-blocking; progress with bytes, rate and ETA on stderr), migrates its \
        memory through the relay with pause-before-switchover, and at the switch (VM \
        stopped) cancels the ready mirror, adds the NBD child of colo-blockd's `replica` to \
        the quorum and the primary's network filters, and lets the migration go on into \
        COLO. Prints the time per phase, the bytes copied and the pause at the switch. Stop \
        `colo-blockd serve` afterwards.\n\n\
        Only for disk.backend = \"colo-blockd\" and network.backend = \"colo-proxyd\" \
        with the primary as the survivor (exit 3 otherwise); with [tls] start colo-blockd \
        serve with --tls-dir and --tls-peer as colo-blockd secondary. A failure before \
        COLO is undone on the primary (migration and copy cancelled, child and filters \
        removed): the guest serves on; restart the secondary QEMU and run it again.",
        after_help = EXIT_CODES_HELP
    )]
    Reprotect {
        #[command(flatten)]
        output: Output,
        /// The NBD export the disk is copied to (default:
        /// nbd://secondary.host:(disk.nbd_port+1)/base).
        #[arg(long, value_name = "URI")]
        target: Option<String>,
        #[command(flatten)]
        live: LiveMoveArgs,
    },

    /// Move the VM the SECONDARY took over home to the primary host while it runs (failback).
    #[command(
        long_about = "Failback, on both QMP sockets: the secondary serves alone after a \
        failover to it (`failover --survivor secondary`); on the primary host run `colo-blockd \
        serve --export base=P.raw --tcp PRIMARY:PORT` (the primary QEMU's own image, default \
        port disk.nbd_port + 1), colo-proxyd primary, and the primary QEMU with its `qemu-args \
        --role primary` line plus `-incoming defer`.\n\n\
        Copies the running guest's disk into the primary's image (blockdev-mirror sync=full, \
        copy-mode=write-blocking; progress on stderr), migrates its memory to the primary QEMU \
        with pause-before-switchover, and at the switch (VM stopped) cancels the ready mirror, \
        lets the migration finish, removes the primary's network filters (a primary serving \
        alone has none), resumes the VM there, announces it and quits the secondary's QEMU \
        (the old copy must never run again). The VM then serves alone on the primary, as \
        after a failover to the primary: stop `colo-blockd serve`, colo-blockd secondary and \
        colo-proxyd secondary, and bring the secondary host back with `reprotect`. The config \
        does not change: the roles stay with the hosts.\n\n\
        Connections the VM opened in the epoch before the failover are kept alive by \
        colo-proxyd secondary's sequence shifts, which the primary does not apply: with \
        --offsets-metrics it waits until there are none. Only for colo's daemons without \
        [tls] (exit 3 otherwise). A failure before the switch is undone on the secondary \
        (migration and copy cancelled): the guest serves on there.",
        after_help = EXIT_CODES_HELP
    )]
    Failback {
        #[command(flatten)]
        output: Output,
        /// The NBD export the disk is copied to (default:
        /// nbd://primary.host:(disk.nbd_port+1)/base).
        #[arg(long, value_name = "URI")]
        target: Option<String>,
        /// Where the primary QEMU listens for the migration (default: tcp:primary.host and
        /// the port of migration.secondary_incoming).
        #[arg(long, value_name = "URI")]
        incoming: Option<String>,
        /// colo-proxyd secondary's metrics endpoint (HOST:PORT of its --metrics): wait until
        /// no connection needs its sequence shifts.
        #[arg(long, value_name = "HOST:PORT")]
        offsets_metrics: Option<String>,
        /// How long to wait for those connections to end, in seconds.
        #[arg(long, default_value = "300", value_name = "SECS", value_parser = parse_secs)]
        offsets_timeout: Duration,
        #[command(flatten)]
        live: LiveMoveArgs,
    },

    /// Show both QEMUs (COLO mode, run state, migration status) and the relay.
    #[command(
        long_about = "Query both QEMUs and, when configured, the relay, and print what each \
        says: per side the QMP address, QEMU version, run state, COLO mode / last mode / exit \
        reason and migration status (plus the primary's x-checkpoint-delay); for the relay \
        its state, epoch, checkpoints, checkpoint rate, last pause, last checkpoint-request \
        reason and the health of every subscriber. Read-only; safe at any time. \
        docs/operations.md explains every field.\n\n\
        A side that cannot be reached is reported as such; the exit code is then 4 (0 when \
        everything configured answered).",
        after_help = EXIT_CODES_HELP
    )]
    Status(Output),

    /// Force one checkpoint now on the PRIMARY and print how long it paused.
    #[command(
        long_about = "Force one checkpoint now: on the primary's QMP socket, re-set its current \
        x-checkpoint-delay (QEMU then checkpoints at once, and the period does not change), \
        after noting the reason to the relay when one is configured. Then wait for the next \
        STOP/RESUME pair on the primary and print the pause (QEMU's own timestamps) and the \
        relay's new epoch.\n\n\
        Use it to test the pair, or to make the secondary current before maintenance. \
        Refuses (exit 3) unless COLO runs.",
        after_help = EXIT_CODES_HELP
    )]
    Checkpoint {
        #[command(flatten)]
        output: Output,
        /// Reason noted to the relay (counted in its status).
        #[arg(long, default_value = "operator")]
        reason: String,
        /// How long to wait for the checkpoint, in seconds (default: the checkpoint period plus
        /// 10 s).
        #[arg(long, value_name = "SECS", value_parser = parse_secs)]
        timeout: Option<Duration>,
        /// Do not talk to the relay.
        #[arg(long)]
        no_relay: bool,
    },

    /// Fail over: the SURVIVOR's QEMU leaves COLO and runs on alone. Run it on the survivor's host.
    #[command(
        long_about = "Fail over to the SURVIVOR, on the survivor's QMP socket only (the other side \
        is presumed dead). Run it on the survivor's host: the hook runs locally.\n\n\
        --survivor secondary (the primary's host died): out-of-band yank of the migration \
        stream, nbd-server-stop, x-colo-lost-heartbeat, object-del f2 f1, chardev-remove red1 \
        red0, failover.secondary_takeover_hook (e.g. put the tap on the bridge), \
        announce-self.\n\
        --survivor primary (the secondary's host died): out-of-band yank, x-blockdev-change \
        (remove the replication child), drive_del, object-del comp0 iothread1 m0 redire0 \
        redire1, x-colo-lost-heartbeat, failover.primary_continue_hook.\n\n\
        Then it waits until the VM runs and tells the relay (best effort). Every step is \
        timed and printed. Refuses (exit 3) a survivor that is not in COLO; a failover \
        already done succeeds again (exit 0). QEMU never fails over by itself: after a \
        COLO_EXIT with reason error it waits for exactly this.",
        after_help = EXIT_CODES_HELP
    )]
    Failover {
        #[command(flatten)]
        output: Output,
        /// The side that carries on.
        #[arg(long, value_enum)]
        survivor: Role,
        /// Do not run the config's failover hook.
        #[arg(long)]
        no_hook: bool,
        /// Do not notify the relay.
        #[arg(long)]
        no_relay: bool,
    },

    /// The HA agent of one side: decides failovers with its peer over corosync, by itself.
    #[command(
        long_about = "The HA agent of one side of the pair: run one on each host (systemd unit, \
        libvirt hook or the Pacemaker resource agent ha/ocf/colo-vm), until SIGINT or SIGTERM. \
        It needs corosync running on the host (with a quorum device or a third node: a \
        two-node cluster without one never lets a survivor decide) and its own QMP socket of \
        this side's QEMU ({side}.watch_qmp in the config).\n\n\
        It watches its QEMU (process gone, monitor hung, COLO_EXIT, run state; on the primary \
        the watch agent's triggers) and joins the corosync CPG group colo-<name>, where both \
        agents tell each other their VM's state. When the peer's VM is gone or its node leaves \
        the membership, or the primary sees the secondary fail, an agent claims the VM; the \
        first claim corosync delivers wins on both sides (total order), and only a quorate \
        side claims. The winner runs the failover sequence of its side (`failover --survivor \
        <side>`, hook and relay notification included); a loser still in COLO fences its VM \
        (QMP stop, then SIGKILL of the QEMU named by --qemu-pidfile). A side that loses \
        quorum while in COLO fences its VM after --quorum-grace-ms; one that loses corosync \
        at once. A fenced VM stays stopped: restart the agent after an operator restored the \
        pair. docs/ha.md explains why this never makes two primaries.\n\n\
        With --auto-reprotect the primary's agent, its VM serving alone after a take-over, \
        brings a new secondary into COLO by itself (`reprotect`'s sequence, the guest serving \
        throughout) once the peer agent reports a fresh secondary QEMU waiting for its \
        migration; a failed attempt is undone and retried after --reprotect-retry-ms, doubled \
        per failure in a row (docs/ha.md, \"Automatic re-protect\"). Failback stays the \
        operator's `failback`.\n\n\
        The agent writes its state as JSON to --state-file (for Pacemaker's resource agent \
        and `status`), logs every decision with its reason, and serves colo_agent_* metrics.",
        after_help = "Exit codes: 0 stopped by a signal, 2 usage or config error, 4 corosync \
        cannot be reached."
    )]
    Agent {
        /// This host's side of the pair.
        #[arg(long, value_enum, env = "COLO_AGENT_SIDE")]
        side: Role,
        /// The primary's stall bound, in ms: a checkpoint that keeps it stopped, or its monitor
        /// silent, this long counts as the secondary gone. Keep it above the longest pause.
        #[arg(long, default_value = "3000", value_name = "MS", env = "COLO_AGENT_STALL_MS",
              value_parser = clap::value_parser!(u64).range(100..))]
        stall_ms: u64,
        /// How often the agent probes its QEMU, in ms.
        #[arg(long, default_value = "250", value_name = "MS", env = "COLO_AGENT_PROBE_MS",
              value_parser = clap::value_parser!(u64).range(10..))]
        probe_ms: u64,
        /// How long a side in COLO waits for quorum of a new membership before it fences its
        /// VM, in ms. Above the quorum device's sync_timeout.
        #[arg(long, default_value = "5000", value_name = "MS", env = "COLO_AGENT_QUORUM_GRACE_MS",
              value_parser = clap::value_parser!(u64).range(100..))]
        quorum_grace_ms: u64,
        /// The corosync CPG group (default colo-<name>).
        #[arg(long, value_name = "NAME")]
        group: Option<String>,
        /// Where the agent writes its state (default /run/colo/<name>/agent-<side>.json).
        #[arg(long, value_name = "PATH")]
        state_file: Option<PathBuf>,
        /// The QEMU's pid file (QEMU's -pidfile): a fence kills that process after QMP stop.
        #[arg(long, value_name = "PATH")]
        qemu_pidfile: Option<PathBuf>,
        /// Serve Prometheus metrics (colo_agent_*) on HOST:PORT.
        #[arg(long, value_name = "HOST:PORT", env = "COLO_AGENT_METRICS")]
        metrics: Option<std::net::SocketAddr>,
        /// Do not run the config's failover hook on a take-over.
        #[arg(long)]
        no_hook: bool,
        /// Do not notify the relay of a take-over.
        #[arg(long)]
        no_relay: bool,
        /// On the primary: when its VM serves alone and the peer agent reports a new
        /// secondary QEMU waiting for its migration, run `reprotect`'s sequence by itself
        /// (docs/ha.md, "Automatic re-protect"). The new secondary host must run its relay,
        /// colo-blockd secondary, colo-proxyd secondary and `colo-blockd serve` for the copy.
        #[arg(long, env = "COLO_AGENT_AUTO_REPROTECT")]
        auto_reprotect: bool,
        /// With --auto-reprotect: the copy's target, nbd://HOST:PORT/EXPORT [default:
        /// nbd://<secondary.host>:<disk.nbd_port + 1>/base].
        #[arg(long, value_name = "URI", requires = "auto_reprotect")]
        reprotect_target: Option<String>,
        /// With --auto-reprotect: bound on the copy's background rate, bytes/s (0: none).
        #[arg(
            long,
            default_value = "0",
            value_name = "BYTES",
            requires = "auto_reprotect"
        )]
        reprotect_speed: u64,
        /// With --auto-reprotect: the wait after a failed attempt, in ms, doubled after every
        /// failure in a row up to 10 minutes.
        #[arg(long, default_value = "30000", value_name = "MS", requires = "auto_reprotect",
              value_parser = clap::value_parser!(u64).range(100..))]
        reprotect_retry_ms: u64,
    },

    /// Watch the PRIMARY and fail over to it by itself when the secondary stops taking part.
    #[command(
        long_about = "The primary's watch agent: runs until SIGINT or SIGTERM, on its own QMP \
        socket of the primary (primary.watch_qmp in the config; `qemu-args` adds it to \
        QEMU's command line). Run it on the primary's host, e.g. as a systemd unit next to \
        the QEMU.\n\n\
        While the primary is in COLO it probes it every --probe-ms. When QEMU reports \
        COLO_EXIT on the primary, when its monitor does not answer within --stall-ms, or when \
        a checkpoint keeps the VM stopped for longer than --stall-ms (the secondary's host \
        went silent), it yanks the migration stream and the NBD replication child out of band \
        and runs the sequence of `failover --survivor primary` (hook and relay notification \
        included): the VM then serves alone, unprotected. The client-visible stall is about \
        --stall-ms plus the failover's own time (tens of ms).\n\n\
        It never makes the secondary take over: that needs quorum and fencing, so it stays the \
        operator's `failover --survivor secondary` after fencing the primary. Logs go to \
        stderr (info by default); --metrics serves colo_watch_* for Prometheus.",
        after_help = "Exit codes: 0 stopped by a signal, 2 usage or config error, 4 the \
        primary's monitor cannot be reached or went away (QEMU exited)."
    )]
    Watch {
        /// How long a checkpoint may keep the primary stopped, or its monitor silent, before
        /// the secondary counts as gone, in ms. Keep it above the longest checkpoint pause.
        #[arg(long, default_value = "3000", value_name = "MS", env = "COLO_WATCH_STALL_MS",
              value_parser = clap::value_parser!(u64).range(100..))]
        stall_ms: u64,
        /// How often the primary is probed, in ms.
        #[arg(long, default_value = "250", value_name = "MS", env = "COLO_WATCH_PROBE_MS",
              value_parser = clap::value_parser!(u64).range(10..))]
        probe_ms: u64,
        /// Serve Prometheus metrics (colo_watch_*) on HOST:PORT.
        #[arg(long, value_name = "HOST:PORT", env = "COLO_WATCH_METRICS")]
        metrics: Option<std::net::SocketAddr>,
        /// Do not run the config's failover.primary_continue_hook.
        #[arg(long)]
        no_hook: bool,
        /// Do not notify the relay.
        #[arg(long)]
        no_relay: bool,
    },

    /// Planned end of COLO keeping the PRIMARY; quit the secondary QEMU.
    #[command(
        long_about = "End protection on purpose, keeping the primary: on the primary, remove the \
        replication child, the colo-compare and the filters and leave COLO (the primary's \
        failover sequence, without the yank: the secondary is alive), run \
        failover.primary_continue_hook, then `quit` the secondary QEMU if it is reachable \
        and still a COLO secondary.\n\n\
        Use it before maintenance of the secondary's host, or to stop protecting a VM. \
        Refuses (exit 3) when the secondary has taken over (both VMs would run). Stopping \
        again is a no-op (exit 0).",
        after_help = EXIT_CODES_HELP
    )]
    Stop {
        #[command(flatten)]
        output: Output,
        /// Do not run failover.primary_continue_hook.
        #[arg(long)]
        no_hook: bool,
        /// Do not notify the relay.
        #[arg(long)]
        no_relay: bool,
    },

    /// Print the command line of one of colo's daemons (colo-blockd, colo-proxyd) for this pair.
    #[command(
        long_about = "Print the command line of one of colo's daemons, generated from the \
        same config as `qemu-args`, so the daemon and QEMU agree on every port and socket: \
        colo-blockd (secondary host; disk.backend = \"colo-blockd\"), colo-proxyd-primary \
        (primary host) and colo-proxyd-secondary (secondary host; network.backend = \
        \"colo-proxyd\"). Talks to nothing.\n\n\
        Start the secondary host's daemons before its QEMU (its disk and its redirectors \
        connect to them), the relay before `start`, and check with `status` that every \
        daemon is subscribed before `start`. --list prints the daemons the config needs, one \
        per line, in that order.",
        after_help = EXIT_CODES_HELP
    )]
    DaemonArgs {
        /// Which daemon.
        #[arg(long, value_enum, required_unless_present = "list")]
        daemon: Option<DaemonName>,
        /// Print the daemons this config needs instead, one per line.
        #[arg(long, conflicts_with = "daemon")]
        list: bool,
        /// Print one shell-quoted line (binary included) instead of one argument per line.
        #[arg(long)]
        shell: bool,
    },

    /// Print the COLO-specific QEMU arguments of one role.
    #[command(
        long_about = "Print the COLO-specific QEMU arguments of one role, generated from the \
        config: QMP socket, the tap netdev (vhost=off, vnet_hdr=off) and virtio-net NIC, every \
        chardev (nodelay=on), filter-mirror/filter-redirector/colo-compare (primary) or \
        filter-redirector/filter-rewriter (secondary), the quorum disk (primary) or the \
        replication overlays over the exported image (secondary), `-S` (primary) or \
        `-incoming defer` (secondary). With network.backend = \"colo-proxyd\" the filter \
        sockets are served on each host's loopback for colo-proxyd (no colo-compare, no \
        filter-rewriter); with disk.backend = \"colo-blockd\" the secondary's disk is \
        colo-blockd's `svm` export. With [tls]: the primary's tls-creds-x509 client object \
        (migration, NBD child), and on QEMU's stock stack the server object and authz-list \
        that admit only the other host's certificate (the secondary's NBD server, the \
        primary's two colo-compare sockets) and the secondary's client object for its \
        chardevs (docs/security.md). Talks to no QEMU.\n\n\
        Not included, add them yourself identically on both sides: -machine, -accel/-cpu, -m \
        (the secondary needs about twice the guest RAM free), -smp, firmware and boot \
        options. `daemon-args` prints the daemons' command lines.",
        after_help = EXIT_CODES_HELP
    )]
    QemuArgs {
        /// Which VM's arguments.
        #[arg(long, value_enum)]
        role: Role,
        /// Print one shell-quoted line instead of one argument per line.
        #[arg(long)]
        shell: bool,
    },

    /// Low level: run one QMP command on a socket and print its "return" value as JSON.
    #[command(after_help = lowlevel::LOWLEVEL_EXIT_CODES)]
    Raw(lowlevel::RawArgs),

    /// Low level: print every QMP event of a socket as one JSON line until QEMU closes it.
    #[command(after_help = lowlevel::LOWLEVEL_EXIT_CODES)]
    Events(lowlevel::EventsArgs),

    /// Run the checkpoint-barrier relay between the primary's migration stream and the secondary
    /// QEMU (on the secondary's host).
    #[command(
        long_about = "Run the checkpoint-barrier relay (a daemon, on the secondary's host): the \
        primary migrates to --listen, the relay forwards to the secondary QEMU's --target and \
        turns the secondary's COLO messages into events on the --control socket for \
        colo-blockd/colo-proxyd, and answers `status`, `checkpoint` and `failover`.\n\n\
        Options not given on the command line (or in their COLO_RELAY_* variables) come from \
        the [relay] section of --config. Runs until SIGINT or SIGTERM.",
        after_help = "Exit codes: 0 stopped by a signal, 1 the relay failed, 2 usage or config error."
    )]
    Relay(colo_relay::RelayArgs),

    /// Create a pair's CA and host identities for mutual TLS, or issue new ones (rotation).
    #[command(long_about = pki::PKI_LONG_ABOUT, after_help = "Exit codes: 0 written, 1 a file \
        could not be written, 2 usage error (a target exists, a bad host name, an unusable CA).")]
    Pki(pki::PkiArgs),
}

/// Parses the command line, exiting with 2 on bad usage. `relay` may take
/// its settings from the config file, so its address arguments are
/// optional here and completed from `[relay]`.
pub fn parse() -> Cli {
    let mut cmd = Cli::command().mut_subcommand("relay", |s| {
        s.mut_arg("listen", |a| a.required(false))
            .mut_arg("target", |a| a.required(false))
            .mut_arg("control", |a| a.required(false))
    });
    let mut matches = cmd.get_matches_mut();
    let parsed = match matches.subcommand() {
        Some(("relay", sub)) => relay::parse(&matches, sub).map_err(|e| e.format(&mut cmd)),
        _ => Cli::from_arg_matches_mut(&mut matches).map_err(|e| e.format(&mut cmd)),
    };
    parsed.unwrap_or_else(|e| e.exit())
}

/// Sets up logging on stderr.
pub fn init_logging(cli: &Cli) {
    let default = match cli.command {
        Command::Relay(_) | Command::Watch { .. } | Command::Agent { .. } => "info",
        _ => "warn",
    };
    colo_daemon::logging::init(default, cli.globals.log_format);
}

impl Globals {
    /// Loads the config named by `--config` / `$COLO_CONFIG`.
    pub fn load_config(&self) -> Result<PairConfig, ConfigError> {
        let path = self.config.as_ref().ok_or(ConfigError::Missing)?;
        PairConfig::load(path)
    }

    /// QMP connection options from the timeouts.
    pub fn connect_options(&self) -> ConnectOptions {
        ConnectOptions {
            connect_timeout: self.connect_timeout,
            command_timeout: self.command_timeout,
            ..ConnectOptions::default()
        }
    }
}

/// Serves `registry` for Prometheus on `listen` until `cancel` (the long-running commands'
/// `--metrics`); a listener that cannot be bound is a usage error.
pub(crate) async fn serve_metrics_on(
    listen: std::net::SocketAddr,
    registry: colo_daemon::metrics::MetricsRegistry,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<(), ExitCode> {
    match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => {
            tokio::spawn(colo_daemon::metrics::serve_metrics(
                l,
                std::sync::Arc::new(registry),
                cancel.clone(),
            ));
            Ok(())
        }
        Err(e) => Err(fail(
            &format!("cannot listen for metrics on {listen}: {e}"),
            Exit::Usage,
        )),
    }
}

/// Prints an error on stderr and returns its exit code.
pub(crate) fn fail(e: &dyn std::fmt::Display, code: Exit) -> ExitCode {
    eprintln!("qmp-driver: {e}");
    code.into()
}

/// Runs the command.
pub async fn run(cli: Cli) -> ExitCode {
    let g = cli.globals;
    match cli.command {
        Command::Raw(args) => lowlevel::raw(args).await,
        Command::Events(args) => lowlevel::events(args).await,
        Command::Relay(args) => relay::run(args).await,
        Command::Pki(args) => pki::run(args),
        Command::DaemonArgs {
            daemon,
            list,
            shell,
        } => match g.load_config() {
            Ok(cfg) => pair_cmds::daemon_args(&cfg, daemon, list, shell),
            Err(e) => fail(&e, Exit::Usage),
        },
        Command::QemuArgs { role, shell } => match g.load_config() {
            Ok(cfg) => pair_cmds::qemu_args(&cfg, role, shell),
            Err(e) => fail(&e, Exit::Usage),
        },
        Command::Watch {
            stall_ms,
            probe_ms,
            metrics,
            no_hook,
            no_relay,
        } => {
            let cfg = match g.load_config() {
                Ok(cfg) => cfg,
                Err(e) => return fail(&e, Exit::Usage),
            };
            let opts = qmp_driver::pair::WatchOptions {
                stall: Duration::from_millis(stall_ms),
                probe: Duration::from_millis(probe_ms),
                run_hook: !no_hook,
                notify_relay: !no_relay,
            };
            watch::run(&cfg, &g, opts, metrics).await
        }
        Command::Agent {
            side,
            stall_ms,
            probe_ms,
            quorum_grace_ms,
            group,
            state_file,
            qemu_pidfile,
            metrics,
            no_hook,
            no_relay,
            auto_reprotect,
            reprotect_target,
            reprotect_speed,
            reprotect_retry_ms,
        } => {
            let cfg = match g.load_config() {
                Ok(cfg) => cfg,
                Err(e) => return fail(&e, Exit::Usage),
            };
            let state_file = state_file.unwrap_or_else(|| {
                qmp_driver::agent::status::default_state_file(&cfg.name, side.name())
            });
            let opts = qmp_driver::agent::AgentOptions {
                side,
                probe: Duration::from_millis(probe_ms),
                stall: Duration::from_millis(stall_ms),
                quorum_grace: Duration::from_millis(quorum_grace_ms),
                run_hook: !no_hook,
                notify_relay: !no_relay,
                qemu_pidfile,
                state_file: Some(state_file),
                connect: ConnectOptions::default(),
                auto_reprotect: auto_reprotect.then(|| {
                    qmp_driver::agent::reprotect::AutoReprotect {
                        target: reprotect_target,
                        speed: reprotect_speed,
                        retry: Duration::from_millis(reprotect_retry_ms),
                    }
                }),
            };
            agent::run(&cfg, &g, opts, group, metrics).await
        }
        command => {
            let cfg = match g.load_config() {
                Ok(cfg) => cfg,
                Err(e) => return fail(&e, Exit::Usage),
            };
            pair_cmds::run(command, &cfg, &g).await
        }
    }
}
