//! The relay's listener and the byte streams it forwards, over TCP or a Unix socket.
//!
//! TCP connections to or from another host get [`colo_control::tune_tcp`]: `TCP_NODELAY`,
//! keepalive and `TCP_USER_TIMEOUT` ([`colo_control::TCP_DEAD_PEER`]). When the primary's host
//! dies or the network between the hosts stalls, no FIN comes: without them the main channel
//! would look open for minutes. With them its read or write fails within seconds, and the
//! relay ends the session as on an EOF (`colo-exit`, reason `channel-closed`, the socket error
//! in the detail). A connection to a QEMU on this host (the usual `--target`) only gets
//! `TCP_NODELAY`: its peer cannot vanish without its kernel closing it, and `TCP_USER_TIMEOUT`
//! would also end it when that QEMU merely stops reading for a few seconds (a zero window).

use colo_control::ControlListener;
use colo_daemon::socket::remove_stale_socket;
use colo_tls::{HandshakeError, PeerAcceptor};
use colo_types::Address;
use std::net::{IpAddr, SocketAddr};
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

    /// The server side of a TLS handshake with `acceptor` (bounded by its
    /// timeout), then the decrypted stream's halves and the peer's name.
    pub(crate) async fn accept_tls(
        self,
        acceptor: &PeerAcceptor,
    ) -> Result<((ReadHalf, WriteHalf), String), HandshakeError> {
        fn halves<S>(s: S) -> (ReadHalf, WriteHalf)
        where
            S: AsyncRead + AsyncWrite + Send + 'static,
        {
            let (r, w) = tokio::io::split(s);
            (Box::new(r), Box::new(w))
        }
        match self {
            Stream::Tcp(s) => {
                let (tls, name) = acceptor.accept(s).await?;
                Ok((halves(tls), name))
            }
            Stream::Unix(s) => {
                let (tls, name) = acceptor.accept(s).await?;
                Ok((halves(tls), name))
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
                    tune_inter_host(&s, "relay channel to the secondary")?;
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
    /// A bound Unix-socket listener, owner-only (mode 0600) from the moment it exists: the
    /// migration stream is the guest's RAM and its connection becomes the session, so no other
    /// local user may connect. It was bound under another name and renamed to `path`
    /// ([`colo_control::bind_private_unix`]), so the kernel reports the old name:
    /// `path` is where clients reach it.
    Unix {
        /// The socket.
        listener: UnixListener,
        /// Where clients reach it.
        path: std::path::PathBuf,
    },
}

impl RelayListener {
    /// Binds `ep`. For `unix:`, a stale socket file (one nobody accepts on)
    /// is removed first; a live one is an error; the socket is owner-only
    /// (0600) with no window in which another user could connect (only this
    /// user and root can: a local primary QEMU must run as one of them).
    pub async fn bind(ep: &Address) -> std::io::Result<RelayListener> {
        match ep {
            Address::Tcp { host, port } => Ok(RelayListener::Tcp(
                TcpListener::bind((host.as_str(), *port)).await?,
            )),
            Address::Unix(path) => {
                remove_stale_socket(path).await?;
                match colo_control::bind_private_unix(path, None)?.0 {
                    ControlListener::UnixAt { listener, path } => {
                        Ok(RelayListener::Unix { listener, path })
                    }
                    // bind_private_unix always renames into place.
                    other => Err(std::io::Error::other(format!(
                        "unexpected listener from bind_private_unix: {other:?}"
                    ))),
                }
            }
        }
    }

    /// The bound address (the real port after binding port 0).
    pub fn local_endpoint(&self) -> std::io::Result<Address> {
        match self {
            RelayListener::Tcp(l) => Ok(Address::from(l.local_addr()?)),
            RelayListener::Unix { path, .. } => Ok(Address::Unix(path.clone())),
        }
    }

    /// Accepts one connection (TCP_NODELAY set; keepalive and TCP_USER_TIMEOUT too from
    /// another host) and names its peer (with its address, over TCP).
    pub(crate) async fn accept(&self) -> std::io::Result<(Stream, String, Option<IpAddr>)> {
        match self {
            RelayListener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                tune_inter_host(&s, "relay channel from the primary")?;
                Ok((Stream::Tcp(s), peer.to_string(), Some(peer.ip())))
            }
            RelayListener::Unix { listener, .. } => {
                let (s, _) = listener.accept().await?;
                // Who connected, for the logs (the mode already decided who may).
                let peer = match s.peer_cred() {
                    Ok(c) => format!(
                        "unix peer uid={} pid={}",
                        c.uid(),
                        c.pid().map_or("?".into(), |p| p.to_string())
                    ),
                    Err(_) => "unix peer".to_string(),
                };
                Ok((Stream::Unix(s), peer, None))
            }
        }
    }
}

/// [`colo_control::tune_tcp`] when the peer is on another host, else only `TCP_NODELAY` (see
/// the module's documentation).
fn tune_inter_host(s: &TcpStream, what: &str) -> std::io::Result<()> {
    if on_this_host(s.local_addr()?, s.peer_addr()?) {
        s.set_nodelay(true)
    } else {
        colo_control::tune_tcp(s, what);
        Ok(())
    }
}

/// Whether a connection between `local` and `peer` stays on this host: a loopback peer, or
/// one of this host's own addresses (the kernel routes it over the loopback).
fn on_this_host(local: SocketAddr, peer: SocketAddr) -> bool {
    peer.ip().is_loopback() || peer.ip() == local.ip()
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
    fn only_peers_on_another_host_count_as_inter_host() {
        let at = |a: &str| a.parse::<SocketAddr>().unwrap();
        assert!(on_this_host(at("127.0.0.1:9000"), at("127.0.0.1:41000")));
        assert!(on_this_host(at("[::1]:9000"), at("[::1]:41000")));
        assert!(on_this_host(at("10.0.0.2:9000"), at("10.0.0.2:41000")));
        assert!(!on_this_host(
            at("192.168.77.2:9000"),
            at("192.168.77.1:41000")
        ));
        assert!(!on_this_host(at("[fd00::2]:9000"), at("[fd00::1]:41000")));
    }

    /// Both ends of a loopback channel: accepted by the relay, and connected by it.
    #[tokio::test]
    async fn loopback_channels_get_nodelay_and_no_user_timeout() {
        let listener = RelayListener::bind(&"tcp:127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let target = listener.local_endpoint().unwrap();
        let (connected, accepted) = tokio::join!(
            Stream::connect(&target, Duration::from_secs(5)),
            listener.accept()
        );
        for stream in [connected.unwrap(), accepted.unwrap().0] {
            let Stream::Tcp(s) = stream else {
                panic!("not TCP")
            };
            let sock = socket2::SockRef::from(&s);
            assert!(sock.tcp_nodelay().unwrap());
            assert!(!sock.keepalive().unwrap());
            assert_eq!(sock.tcp_user_timeout().unwrap(), None);
        }
    }

    /// What a connection from the primary's host gets (`tune_tcp`, as `tune_inter_host` calls
    /// it for a peer on another host, which a test on one host cannot make).
    #[tokio::test]
    async fn inter_host_channels_get_keepalive_and_the_dead_peer_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (_connected, (s, _)) = (connected.unwrap(), accepted.unwrap());
        colo_control::tune_tcp(&s, "test");
        let sock = socket2::SockRef::from(&s);
        assert!(sock.tcp_nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(colo_control::TCP_DEAD_PEER)
        );
    }
}
