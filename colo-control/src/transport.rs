//! The byte streams under the protocol: Unix and TCP sockets, behind one
//! reader/writer type so that the hub and the client do not care which.
//!
//! Every TCP socket gets `TCP_NODELAY`: an ack is one small line, and
//! Nagle's algorithm would hold it back for up to a round trip while a
//! checkpoint waits for it. It also gets keepalive probes and a
//! `TCP_USER_TIMEOUT` ([`TCP_DEAD_PEER`]): when the other *host* dies no FIN
//! ever comes, and a subscriber would otherwise wait for its next event, and
//! the relay keep a dead subscriber, for the kernel's default of minutes to
//! hours.

use colo_types::Address;
use std::io;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// Read half of a control connection, whatever the transport.
pub(crate) type StreamReader = Box<dyn AsyncRead + Send + Unpin>;
/// Write half of a control connection, whatever the transport.
pub(crate) type StreamWriter = Box<dyn AsyncWrite + Send + Unpin>;

fn split_unix(s: UnixStream) -> (StreamReader, StreamWriter) {
    let (rd, wr) = s.into_split();
    (Box::new(rd), Box::new(wr))
}

/// About how long a TCP control connection survives its peer host
/// vanishing (no FIN, no RST): idle, keepalive probes start after 2 s and
/// give up after 4 more unanswered ones 1 s apart; with unacknowledged data
/// in flight, `TCP_USER_TIMEOUT` ends it after this long.
pub const TCP_DEAD_PEER: Duration = Duration::from_secs(6);

fn split_tcp(s: TcpStream) -> (StreamReader, StreamWriter) {
    tune_tcp(&s, "control");
    let (rd, wr) = s.into_split();
    (Box::new(rd), Box::new(wr))
}

/// `TCP_NODELAY`, keepalive and `TCP_USER_TIMEOUT` ([`TCP_DEAD_PEER`]) on an inter-host
/// connection (`what` names it in the warning); a failure is logged, not fatal. Every
/// daemon's inter-host TCP socket gets this, so a peer host that vanishes without a FIN is
/// noticed within seconds, not the kernel's minutes.
pub fn tune_tcp(s: &TcpStream, what: &str) {
    if let Err(e) = s.set_nodelay(true) {
        // Still correct, only slower: every ack may wait for Nagle.
        tracing::warn!(error = %e, connection = what, "cannot set TCP_NODELAY");
    }
    let sock = socket2::SockRef::from(&s);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(2))
        .with_interval(Duration::from_secs(1))
        .with_retries(4);
    if let Err(e) = sock
        .set_tcp_keepalive(&keepalive)
        .and_then(|()| sock.set_tcp_user_timeout(Some(TCP_DEAD_PEER)))
    {
        // Still correct while both hosts live; a dead peer host is noticed late.
        tracing::warn!(error = %e, connection = what, "cannot set TCP keepalive");
    }
}

/// Connects to `address` (a Unix socket, or TCP with `TCP_NODELAY`).
pub(crate) async fn connect(address: &Address) -> io::Result<(StreamReader, StreamWriter)> {
    match address {
        Address::Unix(path) => Ok(split_unix(UnixStream::connect(path).await?)),
        Address::Tcp { host, port } => {
            Ok(split_tcp(TcpStream::connect((host.as_str(), *port)).await?))
        }
    }
}

/// A bound socket the hub accepts control connections on.
#[derive(Debug)]
pub enum ControlListener {
    /// A Unix stream socket (clients on the relay's host).
    Unix(UnixListener),
    /// A TCP socket (clients on the other host, over the replication link).
    Tcp(TcpListener),
}

impl From<UnixListener> for ControlListener {
    fn from(l: UnixListener) -> ControlListener {
        ControlListener::Unix(l)
    }
}

impl From<TcpListener> for ControlListener {
    fn from(l: TcpListener) -> ControlListener {
        ControlListener::Tcp(l)
    }
}

impl ControlListener {
    /// Binds `address`. A Unix socket file that already exists is an error
    /// here; the relay removes a stale one first
    /// (`colo_daemon::socket::remove_stale_socket`).
    pub async fn bind(address: &Address) -> io::Result<ControlListener> {
        Ok(match address {
            Address::Unix(path) => ControlListener::Unix(UnixListener::bind(path)?),
            Address::Tcp { host, port } => {
                ControlListener::Tcp(TcpListener::bind((host.as_str(), *port)).await?)
            }
        })
    }

    /// The address clients reach this listener at (for TCP, the port
    /// actually bound, so port 0 in [`ControlListener::bind`] is usable).
    pub fn local_address(&self) -> io::Result<Address> {
        match self {
            ControlListener::Unix(l) => {
                let addr = l.local_addr()?;
                let path = addr.as_pathname().ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "unnamed Unix socket")
                })?;
                Ok(Address::unix(path))
            }
            ControlListener::Tcp(l) => {
                let addr = l.local_addr()?;
                Ok(Address::tcp(addr.ip().to_string(), addr.port()))
            }
        }
    }

    /// Accepts one connection: its halves and, for TCP, the peer's address.
    pub(crate) async fn accept(&self) -> io::Result<(StreamReader, StreamWriter, Option<String>)> {
        match self {
            ControlListener::Unix(l) => {
                let (s, _) = l.accept().await?;
                let (rd, wr) = split_unix(s);
                Ok((rd, wr, None))
            }
            ControlListener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                let (rd, wr) = split_tcp(s);
                Ok((rd, wr, Some(peer.to_string())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_connections_are_tuned_on_both_ends() {
        let listener = ControlListener::bind(&Address::tcp("127.0.0.1", 0))
            .await
            .unwrap();
        let address = listener.local_address().unwrap();
        let Address::Tcp { port, .. } = address else {
            panic!("not tcp: {address}")
        };
        assert_ne!(port, 0);
        let client = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (_rd, _wr, peer) = listener.accept().await.unwrap();
        assert_eq!(peer, Some(client.local_addr().unwrap().to_string()));
        tune_tcp(&client, "control");
        assert!(client.nodelay().unwrap());
        let sock = socket2::SockRef::from(&client);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(TCP_DEAD_PEER));
    }
}
