//! colo-proxyd's command line (clap), in the library so that tools and tests parse exactly what
//! the daemon parses (qmp-driver's `daemon-args` output is checked against it).

use clap::{Parser, Subcommand};
use colo_daemon::logging::LogOptions;

use crate::daemon::config::{PrimaryArgs, SecondaryArgs};

/// Compares the PVM's and the SVM's network output per TCP connection (COLO).
///
/// Filter mode: QEMU's filter-mirror and filter-redirector objects hand frames to colo-proxyd
/// over socket chardevs (be32 length + frame, vnet_hdr_support off). Run `colo-proxyd primary`
/// on the primary host and `colo-proxyd secondary` on the secondary host; both follow the
/// checkpoint-barrier relay's epochs (`qmp-driver relay --control`).
///
/// Every option can also be set in its environment variable (COLO_PROXYD_ and the option in
/// capitals, e.g. COLO_PROXYD_MAX_HOLD_MS) or in the --config file (TOML, the options' long
/// names as keys); a flag beats its variable, which beats the file, which beats the default.
///
/// Exit codes: 0 stopped by SIGINT or SIGTERM; 1 could not start; 2 bad command line or
/// configuration. Logs go to stderr; set RUST_LOG (e.g. `info`, `colo_proxyd=debug`) and
/// --log-format json (or COLO_LOG_FORMAT=json) for one JSON object per line.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
pub struct Cli {
    /// `--log-format` (`COLO_LOG_FORMAT`), before or after the subcommand.
    #[command(flatten)]
    pub logging: LogOptions,
    /// The role to run.
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
/// The two roles of the daemon, and the vhost-user attachment.
// Parsed once at start and moved into the role's config: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run on the primary host: compare the PVM's output with the SVM's, release what
    /// matches, ask for checkpoints, mirror inbound packets to the secondary.
    ///
    /// Serves the primary QEMU's chardevs compare0 (PVM output), mirror0 (packets into the
    /// PVM) and compare_out (to the network) on loopback ports for QEMU's uid only
    /// (--*-listen; or connects to them as QEMU's servers), listens for the secondary's
    /// colo-proxyd, subscribes to the relay and uses its own QMP monitor of the primary QEMU:
    /// checkpoint requests, the chardev check, re-creating the redirector that reads
    /// compare_out at each connection (QEMU never reads an indev again after it closed), and
    /// setting the netdev's link down while compare0 has no connection during COLO.
    Primary(PrimaryArgs),
    /// Run on the secondary host: inject the mirrored packets into the SVM and send the SVM's
    /// output to the primary's colo-proxyd, rewriting TCP sequence numbers.
    ///
    /// Listens for the secondary QEMU's chardev clients red0 (into the SVM) and red1 (the
    /// SVM's output), connects to the primary's colo-proxyd and subscribes to the relay. With
    /// --qmp it re-creates the redirector that reads red0 at each connection of red0.
    Secondary(SecondaryArgs),
    /// Serve one VM's virtio-net device over vhost-user (QEMU's `-netdev vhost-user`) with a
    /// host tap as its network: the vhost-user attachment, stage 1 (no mirroring or
    /// comparison on this path yet; docs/vhost-user.md).
    ///
    /// The socket is created owner-only (or for --socket-group) before QEMU can reach it; QEMU
    /// connects as a client and may reconnect after a restart: connections are served one
    /// after the other until SIGINT/SIGTERM.
    VhostNet(crate::daemon::vhost_net::VhostNetArgs),
}

#[cfg(test)]
mod tests {
    use super::*;
    use colo_daemon::logging::LogFormat;

    /// `--log-format` (colo_daemon's `LogOptions`) is taken before and after the role.
    #[test]
    fn the_log_format_stands_before_or_after_the_role() {
        let secondary = ["secondary", "--svm-input-listen", "127.0.0.1:1"];
        let format = |before: &[&str], after: &[&str]| {
            let argv = [&["colo-proxyd"], before, &secondary[..], after].concat();
            Cli::try_parse_from(argv).map(|c| c.logging.log_format)
        };
        assert_eq!(
            format(&[], &["--log-format", "json"]).unwrap(),
            LogFormat::Json
        );
        assert_eq!(
            format(&["--log-format", "json"], &[]).unwrap(),
            LogFormat::Json
        );
        assert!(format(&["--log-format", "yaml"], &[]).is_err());
    }
}
