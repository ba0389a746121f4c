//! `colo-vhost-net`: serves one QEMU connection on a vhost-user socket with a tap device as the
//! host side, then exits (for tests and demonstrations; colo-proxyd will embed the library).

use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// A vhost-user-net back-end (rust-vmm crates behind the colo shim) bridging one QEMU to a tap.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The vhost-user socket to listen on (QEMU: `-chardev socket,path=...` as the client).
    #[arg(long)]
    socket: PathBuf,
    /// The tap interface to create or attach to, in this process's network namespace.
    #[arg(long)]
    tap: String,
    /// Append every message QEMU sends to this file, one line each, as it arrives:
    /// microseconds since QEMU connected, the request, its gist (ring, number, features),
    /// `need-reply` when QEMU asked for an acknowledgement, `[held]` when the shim held it
    /// (docs/vhost-user.md). The file is created anew; it grows by some 20 lines per device
    /// stop and start (every checkpoint of a protected VM).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// TEST ONLY, BREAKS MIGRATION: do not mark the pages this device writes in QEMU's dirty
    /// log (the log is swapped for a scratch file), so a guest migrated while it receives
    /// misses data. Exists only to show that the dirty-log test detects a broken log.
    #[arg(long)]
    unsafe_no_dirty_log: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let tap = colo_vhost::tap::Tap::open(&args.tap)
        .with_context(|| format!("opening tap {}", args.tap))?;
    let trace = match &args.trace {
        Some(path) => colo_vhost::Trace::with_file(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        ),
        None => colo_vhost::Trace::new(),
    };
    let _ = std::fs::remove_file(&args.socket);
    let listener = UnixListener::bind(&args.socket)
        .with_context(|| format!("binding {}", args.socket.display()))?;
    if args.unsafe_no_dirty_log {
        tracing::error!(
            "UNSAFE: --unsafe-no-dirty-log given: this back-end will NOT mark the guest pages it \
             writes in QEMU's dirty log; migrating this VM loses data. For tests only."
        );
    }
    let options = colo_vhost::ShimOptions {
        unsafe_no_dirty_log: args.unsafe_no_dirty_log,
    };
    let served = colo_vhost::serve_one_with(&listener, tap, trace, options)?;
    let _ = std::fs::remove_file(&args.socket);
    eprintln!(
        "colo-vhost-net: QEMU hung up after {} messages; {} frames out, {} in",
        served.messages, served.tx_frames, served.rx_frames
    );
    Ok(())
}
