//! `qmp-driver pki`: a pair's keys and certificates for mutual TLS between its hosts
//! (colo-tls's `pki`; docs/security.md).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use colo_tls::pki::{self, HOST_VALID_DAYS, HostAddress, Validity, Written};

use super::{Exit, fail};

/// The layout, permissions and rotation, for `--help`.
pub const PKI_LONG_ABOUT: &str = "\
Keys and certificates for mutual TLS between the pair's hosts. One directory per host, in \
the layout of QEMU's tls-creds-x509 object, so that QEMU (dir=...) and colo's daemons \
(--tls-dir) use the same files:\n\n\
  OUT/ca/ca-cert.pem, ca-key.pem     the pair's CA; its key stays here, never in a host dir\n\
  OUT/NAME/ca-cert.pem               the CA certificate (what a peer must chain to)\n\
  OUT/NAME/server-cert.pem, server-key.pem   presented when NAME accepts a connection\n\
  OUT/NAME/client-cert.pem, client-key.pem   presented when NAME connects\n\n\
A host's identity is the DNS name in its certificates (subjectAltName and CN), the same in \
both: daemons name their peer by it (--tls-peer NAME); --address adds the host's IP address \
(for QEMU's stock colo-compare chardevs, which check the address they connect to). Keys are \
ECDSA P-256, written 0600, \
directories 0700, certificates 0644; the daemons refuse a key that its group or others may \
read. Copy OUT/NAME/ to host NAME only (e.g. /etc/colo/pki/), keep OUT/ca/ offline. Nothing \
existing is ever overwritten. Operators may bring certificates of their own CA in the same \
layout instead.\n\n\
Rotation: `issue` new identities with the same CA into a new directory, install them on one \
host, restart its daemons (and QEMU's tls-creds object), check the link is up, then the other \
host. A peer's old certificate stays valid until it expires, so the pair never loses its link. \
A new CA: `create` a new OUT, install both hosts' new directories, restart one host's daemons \
after the other (the link is down from the first restart until the second).";

/// `--address`, for `--help`.
const ADDRESS_HELP: &str = "Also name host NAME by ADDRESS (its address on the replication \
link) in its certificates; repeatable. Needed with [tls] on QEMU's stock stack \
(network.backend = \"colo-compare\"): the secondary's chardevs check the primary's \
certificate against the address they connect to. Give it for both hosts, so either can be the \
primary after a failover";

/// `qmp-driver pki`.
#[derive(Args, Debug)]
pub struct PkiArgs {
    #[command(subcommand)]
    pub command: PkiCommand,
}

/// The pki subcommands.
#[derive(Subcommand, Debug)]
pub enum PkiCommand {
    /// Create a new CA in OUT/ca/ and an identity directory OUT/NAME/ for each --host.
    #[command(long_about = PKI_LONG_ABOUT)]
    Create {
        /// The output directory (created 0700 if missing; nothing in it is overwritten).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// A host's name (a DNS name, e.g. its hostname); once per host.
        #[arg(long = "host", value_name = "NAME", required = true)]
        hosts: Vec<String>,
        #[arg(long = "address", value_name = "NAME=ADDRESS", help = ADDRESS_HELP)]
        addresses: Vec<HostAddress>,
        /// Validity of the hosts' certificates, in days (the CA's is 3650).
        #[arg(long, value_name = "DAYS", default_value_t = HOST_VALID_DAYS,
              value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
    },
    /// Issue new identities for --host with an existing CA (rotation, a replaced host) into
    /// OUT/NAME/.
    #[command(long_about = PKI_LONG_ABOUT)]
    Issue {
        /// The CA directory (`create`'s OUT/ca, with ca-cert.pem and ca-key.pem).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The output directory; OUT/NAME/ must not exist yet.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// A host's name; once per host.
        #[arg(long = "host", value_name = "NAME", required = true)]
        hosts: Vec<String>,
        #[arg(long = "address", value_name = "NAME=ADDRESS", help = ADDRESS_HELP)]
        addresses: Vec<HostAddress>,
        /// Validity of the certificates, in days.
        #[arg(long, value_name = "DAYS", default_value_t = HOST_VALID_DAYS,
              value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
    },
}

/// Runs `qmp-driver pki ...`.
pub fn run(args: PkiArgs) -> ExitCode {
    let written = match args.command {
        PkiCommand::Create {
            out,
            hosts,
            addresses,
            days,
        } => pki::create_pair_with_addresses(&out, &hosts, &addresses, Validity::days(days)),
        PkiCommand::Issue {
            ca,
            out,
            hosts,
            addresses,
            days,
        } => pki::issue(&ca, &hosts, &addresses, &out, Validity::days(days)),
    };
    match written {
        Ok(written) => {
            report(&written);
            ExitCode::SUCCESS
        }
        Err(e @ pki::PkiError::Io { .. }) => fail(&e, Exit::Failed),
        Err(e) => fail(&e, Exit::Usage),
    }
}

fn report(written: &Written) {
    println!("CA: {}", written.ca_dir.display());
    for dir in &written.host_dirs {
        println!("host identity: {}", dir.display());
    }
    eprintln!(
        "Copy each host's directory to that host only (--tls-dir for colo-proxyd, dir= of \
         QEMU's tls-creds-x509); keep the CA directory off the hosts."
    );
}
