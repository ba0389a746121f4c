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
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;
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

/// Connects to `address` (a Unix socket, or TCP with `TCP_NODELAY`, and
/// with `tls` the mutual TLS handshake; `tls` is ignored on a Unix socket).
pub(crate) async fn connect(
    address: &Address,
    tls: Option<&colo_tls::PeerConnector>,
) -> io::Result<(StreamReader, StreamWriter)> {
    match address {
        Address::Unix(path) => Ok(split_unix(UnixStream::connect(path).await?)),
        Address::Tcp { host, port } => {
            let s = TcpStream::connect((host.as_str(), *port)).await?;
            match tls {
                None => Ok(split_tcp(s)),
                Some(connector) => {
                    tune_tcp(&s, "control");
                    let (tls, _) = connector
                        .connect(s)
                        .await
                        .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e))?;
                    let (rd, wr) = tokio::io::split(tls);
                    Ok((Box::new(rd), Box::new(wr)))
                }
            }
        }
    }
}

/// A bound socket the hub accepts control connections on.
#[derive(Debug)]
pub enum ControlListener {
    /// A Unix stream socket (clients on the relay's host).
    Unix(UnixListener),
    /// A Unix stream socket bound under another name and renamed to `path`
    /// ([`bind_private_unix`]): the kernel still reports the old name.
    UnixAt {
        /// The socket.
        listener: UnixListener,
        /// Where clients reach it.
        path: std::path::PathBuf,
    },
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
            ControlListener::UnixAt { path, .. } => Ok(Address::unix(path)),
            ControlListener::Tcp(l) => {
                let addr = l.local_addr()?;
                Ok(Address::tcp(addr.ip().to_string(), addr.port()))
            }
        }
    }

    /// Accepts one connection and says who is at its other end. Nothing is
    /// read from it and its socket is not tuned yet: the hub decides first
    /// whether to serve it ([`Accepted::into_halves`]) or drop it.
    pub(crate) async fn accept(&self) -> io::Result<Accepted> {
        match self {
            ControlListener::Unix(l) | ControlListener::UnixAt { listener: l, .. } => {
                let (s, _) = l.accept().await?;
                // SO_PEERCRED: the credentials the kernel recorded when the
                // client connected; a client cannot choose them.
                let peer = match s.peer_cred() {
                    Ok(c) => Peer::Local {
                        uid: c.uid(),
                        gid: c.gid(),
                        pid: c.pid(),
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read a control client's credentials");
                        Peer::LocalUnknown
                    }
                };
                Ok(Accepted {
                    stream: AcceptedStream::Unix(s),
                    peer,
                })
            }
            ControlListener::Tcp(l) => {
                let (s, addr) = l.accept().await?;
                Ok(Accepted {
                    stream: AcceptedStream::Tcp(s),
                    peer: Peer::Remote(addr),
                })
            }
        }
    }
}

/// Who is at the other end of a control connection, as the kernel says (a
/// client's `hello` name is only what it claims).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A process on this host, over the Unix socket, with its `SO_PEERCRED`
    /// credentials (the process's uid and primary gid when it connected).
    Local {
        /// Its effective user id.
        uid: u32,
        /// Its effective (primary) group id; supplementary groups are not
        /// known.
        gid: u32,
        /// Its process id, when the kernel gave one.
        pid: Option<i32>,
    },
    /// A Unix client whose credentials could not be read: it is trusted
    /// with nothing a credential check guards.
    LocalUnknown,
    /// A TCP client: only its address is known, and nothing authenticates it.
    Remote(SocketAddr),
    /// A TCP client that passed the mutual TLS handshake: its certificate,
    /// signed by the pair's CA, names an allowed host.
    Authenticated {
        /// Its address.
        addr: SocketAddr,
        /// The host name in its certificate.
        name: String,
    },
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Local { uid, gid, pid } => {
                write!(f, "unix uid={uid} gid={gid}")?;
                match pid {
                    Some(pid) => write!(f, " pid={pid}"),
                    None => Ok(()),
                }
            }
            Peer::LocalUnknown => f.write_str("unix (credentials unknown)"),
            Peer::Remote(addr) => write!(f, "tcp {addr}"),
            Peer::Authenticated { addr, name } => write!(f, "tls {name} at {addr}"),
        }
    }
}

/// An accepted connection the hub has not read from yet.
#[derive(Debug)]
pub(crate) struct Accepted {
    stream: AcceptedStream,
    /// Who connected.
    pub(crate) peer: Peer,
}

#[derive(Debug)]
enum AcceptedStream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Accepted {
    /// The connection's halves, a TCP socket tuned as every control socket
    /// is and, with `tls`, authenticated by the mutual TLS handshake: the
    /// peer then carries the name in its certificate.
    pub(crate) async fn into_halves(
        self,
        tls: Option<&colo_tls::PeerAcceptor>,
    ) -> Result<(StreamReader, StreamWriter, Peer), colo_tls::HandshakeError> {
        match (self.stream, tls, self.peer) {
            (AcceptedStream::Unix(s), _, peer) => {
                let (rd, wr) = split_unix(s);
                Ok((rd, wr, peer))
            }
            (AcceptedStream::Tcp(s), None, peer) => {
                let (rd, wr) = split_tcp(s);
                Ok((rd, wr, peer))
            }
            (AcceptedStream::Tcp(s), Some(acceptor), peer) => {
                tune_tcp(&s, "control");
                let (tls, name) = acceptor.accept(s).await?;
                let addr = match peer {
                    Peer::Remote(a) | Peer::Authenticated { addr: a, .. } => a,
                    Peer::Local { .. } | Peer::LocalUnknown => {
                        unreachable!("a TCP connection has a remote peer")
                    }
                };
                let (rd, wr) = tokio::io::split(tls);
                Ok((
                    Box::new(rd),
                    Box::new(wr),
                    Peer::Authenticated { addr, name },
                ))
            }
        }
    }
}

/// Mode of the control socket without a group: only its owner (the relay's
/// user, and root) may connect.
pub const OWNER_ONLY: u32 = 0o600;
/// Mode of the control socket with a group: its owner and that group.
pub const OWNER_AND_GROUP: u32 = 0o660;

/// Binds the Unix socket `path` with mode [`OWNER_ONLY`], or
/// [`OWNER_AND_GROUP`] and group `group`, such that nobody else can ever
/// connect to it, not even for an instant.
///
/// `bind(2)` creates the file with the process's umask, which is wider by
/// default, and changing the umask would affect every thread of the
/// process. So the socket is bound inside a fresh directory only its owner
/// can enter (mode 0700), given its mode and group there, and then renamed
/// into place (atomic; the listening socket stays reachable under its new
/// name). A file already at `path` is replaced: remove or refuse a live one
/// first (`colo_daemon::socket::remove_stale_socket`).
///
/// Returns the listener and the uid that owns the socket (this process's
/// effective uid).
pub fn bind_private_unix(path: &Path, group: Option<u32>) -> io::Result<(ControlListener, u32)> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // Short, so that the temporary path stays within sun_path's 108 bytes
    // whenever the final one does (up to a few bytes).
    let private = parent.join(format!(".cs{}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let result = (|| {
        let tmp = private.join("s");
        let listener = UnixListener::bind(&tmp)?;
        if let Some(gid) = group {
            std::os::unix::fs::chown(&tmp, None, Some(gid))?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(OWNER_AND_GROUP))?;
        } else {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(OWNER_ONLY))?;
        }
        let owner = std::fs::symlink_metadata(&tmp)?.uid();
        std::fs::rename(&tmp, path)?;
        let listener = ControlListener::UnixAt {
            listener,
            path: path.to_path_buf(),
        };
        Ok((listener, owner))
    })();
    let _ = std::fs::remove_file(private.join("s"));
    let _ = std::fs::remove_dir(&private);
    result
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
        let accepted = listener.accept().await.unwrap();
        assert_eq!(accepted.peer, Peer::Remote(client.local_addr().unwrap()));
        let (_rd, _wr, _) = accepted.into_halves(None).await.unwrap();
        tune_tcp(&client, "control");
        assert!(client.nodelay().unwrap());
        let sock = socket2::SockRef::from(&client);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(TCP_DEAD_PEER));
    }

    #[tokio::test]
    async fn unix_clients_are_known_by_their_kernel_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let listener = ControlListener::bind(&Address::unix(&path)).await.unwrap();
        let _client = UnixStream::connect(&path).await.unwrap();
        let accepted = listener.accept().await.unwrap();
        let me = std::fs::symlink_metadata(&path).unwrap().uid();
        match accepted.peer {
            Peer::Local { uid, pid, .. } => {
                assert_eq!(uid, me);
                assert_eq!(pid, Some(std::process::id() as i32));
            }
            other => panic!("not a local peer: {other:?}"),
        }
        assert!(
            accepted
                .peer
                .to_string()
                .starts_with(&format!("unix uid={me} "))
        );
    }

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[tokio::test]
    async fn the_private_socket_is_owner_only_or_owner_and_group_and_leaves_no_trace() {
        let dir = tempfile::tempdir().unwrap();
        // Owner only.
        let path = dir.path().join("relay.sock");
        let (listener, owner) = bind_private_unix(&path, None).unwrap();
        assert_eq!(mode(&path), OWNER_ONLY);
        assert_eq!(owner, std::fs::symlink_metadata(&path).unwrap().uid());
        assert_eq!(listener.local_address().unwrap(), Address::unix(&path));
        // Reachable under its final name.
        let _client = UnixStream::connect(&path).await.unwrap();
        assert!(listener.accept().await.is_ok());
        // With a group (the socket's current group: any process may give a
        // file its own group).
        let grouped = dir.path().join("grouped.sock");
        let gid = std::fs::symlink_metadata(dir.path()).unwrap().gid();
        let (_l, _) = bind_private_unix(&grouped, Some(gid)).unwrap();
        assert_eq!(mode(&grouped), OWNER_AND_GROUP);
        assert_eq!(std::fs::symlink_metadata(&grouped).unwrap().gid(), gid);
        // Only the two sockets are left in the directory: no private
        // directory, no temporary name.
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["grouped.sock", "relay.sock"]);
    }

    #[tokio::test]
    async fn a_private_socket_that_cannot_be_bound_leaves_no_trace() {
        let dir = tempfile::tempdir().unwrap();
        // A directory in the way: rename(2) cannot replace it.
        let path = dir.path().join("taken");
        std::fs::create_dir(&path).unwrap();
        assert!(bind_private_unix(&path, None).is_err());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["taken"]);
    }
}
