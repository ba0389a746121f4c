//! Addresses in QEMU's migration URI syntax (`tcp:HOST:PORT`,
//! `unix:PATH`), the relay's listener, and byte streams over either.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// A TCP or Unix-socket address, written like QEMU's migration URIs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `tcp:HOST:PORT`; stored as `HOST:PORT` (IPv6 hosts in brackets).
    Tcp(String),
    /// `unix:PATH`.
    Unix(PathBuf),
}

/// Why an endpoint string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid endpoint {input:?}: {reason} (expected tcp:HOST:PORT or unix:PATH)")]
pub struct EndpointParseError {
    /// The string given.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl FromStr for Endpoint {
    type Err = EndpointParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| EndpointParseError {
            input: s.to_string(),
            reason,
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(err("empty socket path"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        let Some(addr) = s.strip_prefix("tcp:") else {
            return Err(err("unknown scheme"));
        };
        let Some((host, port)) = addr.rsplit_once(':') else {
            return Err(err("missing :PORT"));
        };
        if host.is_empty() {
            return Err(err("empty host"));
        }
        if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
            return Err(err("IPv6 hosts must be in brackets, e.g. tcp:[::1]:4444"));
        }
        if port.is_empty() || port.parse::<u16>().is_err() {
            return Err(err("port must be a number from 0 to 65535"));
        }
        if s.contains(',') {
            return Err(err("QEMU socket options (,opt=...) are not supported here"));
        }
        Ok(Endpoint::Tcp(addr.to_string()))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A read or write half of a relayed connection.
pub(crate) type ReadHalf = Box<dyn AsyncRead + Unpin + Send>;
pub(crate) type WriteHalf = Box<dyn AsyncWrite + Unpin + Send>;

/// A connected byte stream over TCP or a Unix socket.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub(crate) fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Stream::Unix(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
        }
    }

    /// Connects with TCP_NODELAY and a wide send buffer (every forwarded read must leave at once:
    /// COLO's 4-byte messages would otherwise wait for Nagle).
    pub(crate) async fn connect(ep: &Endpoint, timeout: Duration) -> std::io::Result<Stream> {
        let fut = async {
            match ep {
                Endpoint::Tcp(addr) => {
                    let s = TcpStream::connect(addr.as_str()).await?;
                    s.set_nodelay(true)?;
                    widen_send_buffer(socket2::SockRef::from(&s));
                    Ok(Stream::Tcp(s))
                }
                Endpoint::Unix(path) => {
                    let s = UnixStream::connect(path).await?;
                    widen_send_buffer(socket2::SockRef::from(&s));
                    Ok(Stream::Unix(s))
                }
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect timed out after {timeout:?}"),
                ))
            })
    }
}

/// The socket the primary QEMU migrates to.
#[derive(Debug)]
pub enum RelayListener {
    /// A bound TCP listener.
    Tcp(TcpListener),
    /// A bound Unix-socket listener.
    Unix(UnixListener),
}

impl RelayListener {
    /// Binds `ep`. For `unix:`, a stale socket file (one nobody accepts on)
    /// is removed first; a live one is an error.
    pub async fn bind(ep: &Endpoint) -> std::io::Result<RelayListener> {
        match ep {
            Endpoint::Tcp(addr) => Ok(RelayListener::Tcp(TcpListener::bind(addr.as_str()).await?)),
            Endpoint::Unix(path) => {
                remove_stale_socket(path).await?;
                Ok(RelayListener::Unix(UnixListener::bind(path)?))
            }
        }
    }

    /// The bound address (the real port after binding port 0).
    pub fn local_endpoint(&self) -> std::io::Result<Endpoint> {
        match self {
            RelayListener::Tcp(l) => Ok(Endpoint::Tcp(l.local_addr()?.to_string())),
            RelayListener::Unix(l) => {
                let addr = l.local_addr()?;
                let path = addr.as_pathname().ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, "unnamed unix socket")
                })?;
                Ok(Endpoint::Unix(path.to_path_buf()))
            }
        }
    }

    /// Accepts one connection (TCP_NODELAY set) and names its peer.
    pub(crate) async fn accept(&self) -> std::io::Result<(Stream, String)> {
        match self {
            RelayListener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                s.set_nodelay(true)?;
                Ok((Stream::Tcp(s), peer.to_string()))
            }
            RelayListener::Unix(l) => {
                let (s, _) = l.accept().await?;
                Ok((Stream::Unix(s), "unix peer".to_string()))
            }
        }
    }
}

/// Removes a Unix socket file nobody listens on (left by a crashed run).
/// Refuses to touch a socket someone accepts on, or a non-socket file.
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

/// Send buffer the relay asks for towards the secondary: a checkpoint's RAM
/// (megabytes) then fits in the socket, so the relay never blocks in a write
/// while the primary waits for it to read; each hand-off costs a wake-up on
/// hosts whose cores the two QEMUs keep busy. The kernel caps it at
/// `net.core.wmem_max`.
const SEND_BUFFER: usize = 4 << 20;

fn widen_send_buffer(sock: socket2::SockRef<'_>) {
    if let Err(e) = sock.set_send_buffer_size(SEND_BUFFER) {
        tracing::debug!(error = %e, "cannot widen the relay's send buffer; keeping the default");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_style_uris() {
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(
            "tcp:[::1]:0".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("[::1]:0".into())
        );
        assert_eq!(
            "tcp:secondary.example:8888".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("secondary.example:8888".into())
        );
        assert_eq!(
            "unix:/run/colo/mig.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/run/colo/mig.sock".into())
        );
        for s in ["tcp:127.0.0.1:4444", "unix:/a b/c", "tcp:[::1]:1"] {
            assert_eq!(s.parse::<Endpoint>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn refuses_with_a_reason() {
        for (s, why) in [
            ("", "unknown scheme"),
            ("/run/mig.sock", "unknown scheme"),
            ("rdma:1.2.3.4:5", "unknown scheme"),
            ("unix:", "empty socket path"),
            ("tcp:host", "missing :PORT"),
            ("tcp::4444", "empty host"),
            ("tcp:1.2.3.4:http", "port must be"),
            ("tcp:1.2.3.4:65536", "port must be"),
            ("tcp:1.2.3.4:", "port must be"),
            ("tcp:::1:4444", "brackets"),
            ("tcp:h:1,nodelay=on", "port must be"),
        ] {
            let e = s.parse::<Endpoint>().unwrap_err();
            assert!(e.to_string().contains(why), "{s}: {e}");
            assert!(e.to_string().contains("tcp:HOST:PORT or unix:PATH"), "{e}");
        }
    }
}
