//! colo-vhost: a vhost-user-net back-end for QEMU on the rust-vmm crates, with a shim in front
//! of the crates' request handler that makes QEMU's message order acceptable to them and
//! enforces the log-window rule (docs/vhost-user.md).
//!
//! ```text
//! QEMU ──unix socket──► shim (wire, policy, trace) ──private socket──► vhost BackendReqHandler
//!                         │ log gate                                   └► VhostUserHandler
//!                         └──────────────────────────────► NetBackend (rings) ◄──► tap
//! ```
//!
//! colo-proxyd will attach to this crate (colo-proxyd → colo-vhost) as its second attachment
//! next to the net filters; for now the device feeds a host port (a tap device).

pub mod gate;
pub mod net;
pub mod policy;
pub mod shim;
pub mod tap;
pub mod trace;
pub mod wire;

use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

pub use gate::LogGate;
pub use net::{NetBackend, Port};
pub use shim::{Shim, ShimOptions};
pub use trace::{Trace, TraceEntry};

/// Why serving a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Socket or file-system error around the connection.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The rust-vmm daemon refused to start.
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    /// The shim stopped on a message it refused or a socket error.
    #[error("vhost-user shim")]
    Shim(#[source] shim::ShimError),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// What one served connection did.
#[derive(Debug)]
pub struct Served {
    /// The messages QEMU sent: the newest [`trace::MAX_KEPT`].
    pub trace: Vec<TraceEntry>,
    /// How many messages QEMU sent in all.
    pub messages: u64,
    /// Frames the guest sent out of the port.
    pub tx_frames: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
}

/// A directory only this process can enter, for the crate's end of the private socket.
fn private_dir() -> Result<PathBuf, Error> {
    static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("colo-vhost-{}-{n}-{nanos}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(io("creating the private socket directory"))?;
    Ok(dir)
}

/// Accepts one connection from QEMU on `listener` and serves it until QEMU hangs up: the
/// rust-vmm daemon behind the shim, the device on `port`.
pub fn serve_one<P: Port + 'static>(
    listener: &UnixListener,
    port: P,
    trace: Trace,
) -> Result<Served, Error> {
    serve_one_with(listener, port, trace, ShimOptions::default())
}

/// [`serve_one`] with the shim's options (only tests change them: [`ShimOptions`]).
pub fn serve_one_with<P: Port + 'static>(
    listener: &UnixListener,
    port: P,
    trace: Trace,
    options: ShimOptions,
) -> Result<Served, Error> {
    let (qemu, _) = listener
        .accept()
        .map_err(io("accepting QEMU's connection"))?;
    let gate = LogGate::new();
    let backend = Arc::new(NetBackend::new(port, gate.clone()));
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new("colo-vhost-net".into(), backend.clone(), mem)
        .map_err(|e| Error::Daemon(format!("{e:?}")))?;

    // The crate's handler takes a listener, not a stream: give it one in a private directory,
    // connect the shim's end, and remove the path once accepted.
    let dir = private_dir()?;
    let path = dir.join("backend.sock");
    let inner = UnixListener::bind(&path).map_err(io("binding the private socket"))?;
    let shim_end = UnixStream::connect(&path).map_err(io("connecting the private socket"))?;
    let mut inner = Listener::from(inner);
    let started = daemon.start(&mut inner);
    drop(inner);
    let _ = std::fs::remove_dir_all(&dir);
    started.map_err(|e| Error::Daemon(format!("{e:?}")))?;

    let handlers = daemon.get_epoll_handlers();
    handlers[0]
        .register_listener(
            backend.port_fd().as_raw_fd(),
            EventSet::IN | EventSet::EDGE_TRIGGERED,
            u64::from(net::PORT_TOKEN),
        )
        .map_err(io("registering the host port"))?;

    let shim = Shim::start_with(qemu, shim_end, gate.clone(), trace.clone(), options)
        .map_err(io("starting the shim"))?;
    let shim_result = shim.join();
    gate.shut();
    daemon.request_shutdown();
    let _ = daemon.wait();
    drop(handlers);
    drop(daemon);
    let served = Served {
        trace: trace.entries(),
        messages: trace.total(),
        tx_frames: backend
            .counters
            .tx_frames
            .load(std::sync::atomic::Ordering::Relaxed),
        rx_frames: backend
            .counters
            .rx_frames
            .load(std::sync::atomic::Ordering::Relaxed),
    };
    shim_result.map_err(Error::Shim)?;
    Ok(served)
}
