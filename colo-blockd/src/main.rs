//! colo-blockd: NBD server that keeps the secondary's disk replica with buffered epochs.
//!
//! This crate is a placeholder until the replica lands (issue 5): it exists so the workspace
//! has the layout of the design card, and it says so when run instead of pretending.

use clap::Parser;

/// colo-blockd is not implemented yet; see issue 5. Today QEMU's replication driver does this job.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {}

fn main() -> anyhow::Result<()> {
    Args::parse();
    anyhow::bail!(
        "colo-blockd is not implemented yet (issue 5); the stock pair uses QEMU's block replication"
    )
}
