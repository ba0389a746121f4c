//! colo-proxyd: compares the primary's and the secondary's network output on the reassembled
//! TCP stream and releases only what both produced.
//!
//! The pure comparison core (frame codec, packet parsing, stream comparator) is the library
//! of this crate; the daemon around it (sockets, epochs, QMP) is not written yet (issue 4),
//! and the binary says so when run instead of pretending. `colo-proxyd bench` measures the
//! pure core.

mod bench;

use clap::{Parser, Subcommand};

/// Compares the PVM's and the SVM's network output per TCP connection (COLO).
///
/// Without a subcommand this would run the daemon, which is not implemented yet (issue 4);
/// today QEMU's colo-compare does this job.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure the comparison path on generated traffic (issue 4's benchmark).
    ///
    /// Generates TCP connections as the PVM's and the SVM's net-filter sockets carry them
    /// (other ISNs, other segmentation, the SVM behind or ahead), runs them through the frame
    /// codec, the packet parser and the comparison engine, and prints the throughput as a
    /// ratio to a raw memcmp of the same payload bytes measured in the same run, and the
    /// per-frame processing time (p50, p99) of that in-process path — not the latency over
    /// loopback sockets, which needs the daemon. Every pass must release every PVM packet
    /// with no checkpoint, or the command fails. Timings vary with the machine and its load;
    /// use a release build.
    Bench(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Some(Command::Bench(args)) => bench::run(&args),
        None => anyhow::bail!(
            "colo-proxyd is not implemented yet (issue 4); the stock pair uses QEMU's colo-compare"
        ),
    }
}
