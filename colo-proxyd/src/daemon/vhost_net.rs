//! `colo-proxyd vhost-net`: the vhost-user attachment, next to the filter attachment
//! ([`super::attachment`]). QEMU's virtio-net device of one VM is served over a vhost-user
//! socket by colo-vhost's back-end (the rust-vmm crates behind colo's shim, which holds
//! QEMU's early `SET_VRING_ENABLE` and writes no guest memory before the new dirty log is
//! known: docs/vhost-user.md), and its frames go to and come from a host tap. Stage 1 of
//! issue 16: nothing is mirrored or compared on this path yet; the role loops will take this
//! attachment's frames as they take the filter sockets' ones.
//!
//! Whoever connects to the socket owns the guest's NIC and is handed the guest's memory (the
//! memory table's file descriptors), so the socket is bound owner-only (0600), or 0660 with
//! the group QEMU runs in (`--socket-group`), before anyone can reach it; a live socket at the
//! path is refused, a stale one replaced. QEMU connects as a client
//! (`-chardev socket,id=vu0,path=PATH,reconnect-ms=1000` and `-netdev vhost-user,chardev=vu0`),
//! and after a QEMU restart it connects again: the daemon serves one connection after another
//! until it is stopped.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use tokio_util::sync::CancellationToken;

use colo_control::{ControlListener, bind_private_unix};

/// `colo-proxyd vhost-net` options.
#[derive(Debug, Clone, Args)]
pub struct VhostNetArgs {
    /// The vhost-user socket QEMU connects to. Created 0600 (0660 with --socket-group) before
    /// QEMU can reach it; a live socket there is refused, a stale one replaced.
    #[arg(long, env = "COLO_PROXYD_SOCKET", value_name = "PATH")]
    pub socket: PathBuf,
    /// The host tap the guest's frames go to and come from (created if missing, in this
    /// process's network namespace; bridge it as QEMU's tap netdev would be).
    #[arg(long, env = "COLO_PROXYD_TAP", value_name = "IFNAME")]
    pub tap: String,
    /// The group (numeric gid) allowed to connect besides the owner: QEMU's, when QEMU runs as
    /// another user than this daemon (libvirt's qemu). Without it only the owner and root.
    #[arg(long, env = "COLO_PROXYD_SOCKET_GROUP", value_name = "GID")]
    pub socket_group: Option<u32>,
    /// Append every vhost-user message QEMU sends to this file, one line each
    /// (docs/vhost-user.md, "Recording the message sequence"); created anew.
    #[arg(long, env = "COLO_PROXYD_TRACE", value_name = "FILE")]
    pub trace: Option<PathBuf>,
}

/// Why the vhost-user attachment stopped.
#[derive(Debug, thiserror::Error)]
pub enum VhostNetError {
    /// The socket could not be bound (or another process serves it).
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// The socket's path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The trace file could not be created.
    #[error("cannot create the trace file {path}: {source}")]
    Trace {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The tap or a QEMU connection failed.
    #[error("{0}")]
    Serve(String),
}

/// Serves QEMU's connections on `args.socket` one after the other until `shutdown`.
pub async fn run(args: VhostNetArgs, shutdown: CancellationToken) -> Result<(), VhostNetError> {
    let listener = bind_socket(&args.socket, args.socket_group).await?;
    let trace = match &args.trace {
        Some(path) => {
            colo_vhost::Trace::with_file(std::fs::File::create(path).map_err(|source| {
                VhostNetError::Trace {
                    path: path.clone(),
                    source,
                }
            })?)
        }
        None => colo_vhost::Trace::new(),
    };
    tracing::info!(
        socket = %args.socket.display(),
        tap = %args.tap,
        socket_group = ?args.socket_group,
        "colo-proxyd vhost-net started: waiting for QEMU"
    );
    // The back-end blocks (accept, then the vhost-user session); its own thread, not the
    // runtime's blocking pool, so that the process can exit while it waits for QEMU.
    let tap = colo_vhost::tap::Tap::open(&args.tap)
        .map(|tap| SharedTap(Arc::new(tap)))
        .map_err(|e| VhostNetError::Serve(format!("opening tap {}: {e}", args.tap)))?;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(serve_forever(&listener, &tap, &trace));
    });
    let result = tokio::select! {
        _ = shutdown.cancelled() => Ok(()),
        stopped = done_rx => match stopped {
            Ok(err) => Err(err),
            Err(_) => Err(VhostNetError::Serve("the back-end's thread ended".into())),
        },
    };
    let _ = std::fs::remove_file(&args.socket);
    result
}

/// The tap, open for the daemon's whole life and lent to each QEMU session: a tap whose last
/// file descriptor closes disappears with its address and bridge port, so a restarted QEMU
/// would find a new, unconfigured device.
#[derive(Debug, Clone)]
struct SharedTap(Arc<colo_vhost::tap::Tap>);

impl AsRawFd for SharedTap {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl colo_vhost::Port for SharedTap {
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        self.0.recv(buf)
    }
    fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        self.0.send(frame)
    }
}

/// One QEMU connection after another; returns only on an error.
fn serve_forever(
    listener: &UnixListener,
    tap: &SharedTap,
    trace: &colo_vhost::Trace,
) -> VhostNetError {
    loop {
        match colo_vhost::serve_one(listener, tap.clone(), trace.clone()) {
            Ok(served) => tracing::info!(
                messages = served.messages,
                tx_frames = served.tx_frames,
                rx_frames = served.rx_frames,
                "QEMU hung up; waiting for its next connection"
            ),
            Err(e) => return VhostNetError::Serve(format!("serving QEMU: {e}")),
        }
    }
}

/// The socket at `path`, owner-only (or with `group`) from the moment it exists.
async fn bind_socket(path: &Path, group: Option<u32>) -> Result<UnixListener, VhostNetError> {
    let bind_error = |source| VhostNetError::Bind {
        path: path.to_path_buf(),
        source,
    };
    colo_daemon::socket::remove_stale_socket(path)
        .await
        .map_err(bind_error)?;
    let (listener, _owner) = bind_private_unix(path, group).map_err(bind_error)?;
    let listener = match listener {
        ControlListener::Unix(l) | ControlListener::UnixAt { listener: l, .. } => l,
        ControlListener::Tcp(_) => {
            return Err(bind_error(std::io::Error::other(
                "bound a TCP socket for a Unix path",
            )));
        }
    };
    let listener = listener.into_std().map_err(bind_error)?;
    listener.set_nonblocking(false).map_err(bind_error)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[tokio::test]
    async fn the_socket_is_owner_only_or_for_the_group_and_a_live_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vu.sock");
        let first = bind_socket(&path, None).await.unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Someone serves it: refused, the socket stays.
        let err = bind_socket(&path, None).await.unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
        assert!(path.exists());
        // Stale (its listener gone): replaced, with the group's mode.
        drop(first);
        let gid = std::fs::metadata(dir.path()).unwrap().gid();
        let _second = bind_socket(&path, Some(gid)).await.unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!(meta.gid(), gid);
    }
}
