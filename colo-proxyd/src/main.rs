//! colo-proxyd: compares the primary's and the secondary's network output on the reassembled
//! TCP stream and releases only what both produced.
//!
//! This crate is a placeholder until the comparison engine lands (issue 4): it exists so the
//! workspace has the layout of the design card, and it says so when run instead of pretending.

use clap::Parser;

/// colo-proxyd is not implemented yet; see issue 4. Today QEMU's colo-compare does this job.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {}

fn main() -> anyhow::Result<()> {
    Args::parse();
    anyhow::bail!(
        "colo-proxyd is not implemented yet (issue 4); the stock pair uses QEMU's colo-compare"
    )
}
