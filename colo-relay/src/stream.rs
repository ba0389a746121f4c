//! The relay's listener and the byte streams it forwards, over TCP or a Unix socket.

use colo_daemon::socket::remove_stale_socket;
use colo_types::Address;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

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
    pub(crate) async fn connect(ep: &Address, timeout: Duration) -> std::io::Result<Stream> {
        let fut = async {
            match ep {
                Address::Tcp { host, port } => {
                    let s = TcpStream::connect((host.as_str(), *port)).await?;
                    s.set_nodelay(true)?;
                    widen_send_buffer(socket2::SockRef::from(&s));
                    Ok(Stream::Tcp(s))
                }
                Address::Unix(path) => {
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
    pub async fn bind(ep: &Address) -> std::io::Result<RelayListener> {
        match ep {
            Address::Tcp { host, port } => Ok(RelayListener::Tcp(
                TcpListener::bind((host.as_str(), *port)).await?,
            )),
            Address::Unix(path) => {
                remove_stale_socket(path).await?;
                Ok(RelayListener::Unix(UnixListener::bind(path)?))
            }
        }
    }

    /// The bound address (the real port after binding port 0).
    pub fn local_endpoint(&self) -> std::io::Result<Address> {
        match self {
            RelayListener::Tcp(l) => Ok(Address::from(l.local_addr()?)),
            RelayListener::Unix(l) => {
                let addr = l.local_addr()?;
                let path = addr.as_pathname().ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, "unnamed unix socket")
                })?;
                Ok(Address::Unix(path.to_path_buf()))
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
