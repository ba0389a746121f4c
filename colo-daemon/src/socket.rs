//! Binding Unix sockets safely: a socket file left by a crashed run is replaced, anything else
//! at the path (a live socket, a regular file, a directory) is an error, never deleted.

use std::path::Path;

use tokio::net::{UnixListener, UnixStream};

/// Removes a Unix socket file nobody listens on (left by a crashed run). Refuses to touch a
/// socket someone accepts on, or a file that is not a socket.
pub async fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    match UnixStream::connect(path).await {
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("{} is in use by another process", path.display()),
        )),
        Err(_) => std::fs::remove_file(path),
    }
}

/// Listens on the Unix socket `path`, replacing a stale socket file first
/// ([`remove_stale_socket`]).
pub async fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    remove_stale_socket(path).await?;
    UnixListener::bind(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replaces_a_stale_socket_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        // Nothing there: bound.
        let live = bind_unix(&path).await.unwrap();
        // Someone listens: refused, the socket stays.
        let e = bind_unix(&path).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
        assert!(path.exists());
        // The listener is gone but its file is left: replaced.
        drop(live);
        assert!(path.exists());
        let _again = bind_unix(&path).await.unwrap();
        // A regular file is never deleted.
        let file = dir.path().join("image.raw");
        std::fs::write(&file, b"data").unwrap();
        let e = bind_unix(&file).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
    }
}
