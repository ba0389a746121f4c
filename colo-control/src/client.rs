//! Daemon and operator side of the control protocol.
//!
//! Every entry point takes a [`Address`] (anything that converts into
//! one: a `&Path` or `PathBuf` is a Unix socket, as before TCP existed;
//! `"tcp:HOST:PORT".parse()` reaches a relay on the other host).
//!
//! Every call is bounded by [`ClientOptions::timeout`] (connect, handshake,
//! writes, request/answer), except [`Subscriber::next_event`], which waits
//! for the next event however long that takes (events are normally seconds
//! apart, and minutes of silence are legal) but returns `Ok(None)` as soon
//! as the relay closes the connection or its process dies. Use
//! [`Subscriber::next_event_timeout`] for a bounded wait.

use crate::protocol::{
    ClientMessage, ConnectionRole, Event, Hello, MAX_LINE, PROTOCOL_VERSION, RelayMessage,
    RelayState, RelayStatus, decode_relay_line, encode_line,
};
use crate::transport::{self, StreamReader, StreamWriter};
use colo_types::Address;
use colo_types::Role;
use futures_util::StreamExt;
use std::future::Future;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

/// Default bound of every client call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// `hello` name used by the one-shot operator helpers.
pub const OPERATOR_NAME: &str = "colo-operator";

/// Everything that can go wrong on the client side.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Connecting to the relay's socket failed (no relay, wrong path or
    /// port, host unreachable...).
    #[error("cannot connect to the relay's control socket {address}: {source}")]
    Connect {
        /// Control socket address.
        address: Address,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("control socket {address}: I/O error: {source}")]
    Io {
        /// Control socket address.
        address: Address,
        /// The underlying error.
        source: std::io::Error,
    },
    /// No answer (or the write did not complete) in time.
    #[error("control socket {address}: {what} timed out after {after:?}")]
    Timeout {
        /// Control socket address.
        address: Address,
        /// What was being waited for.
        what: &'static str,
        /// The bound that expired.
        after: Duration,
    },
    /// The relay closed the connection while an answer was expected.
    #[error("control socket {address}: the relay closed the connection")]
    Closed {
        /// Control socket address.
        address: Address,
    },
    /// The relay answered with an `error` line.
    #[error("control socket {address}: the relay refused: {message}")]
    Rejected {
        /// Control socket address.
        address: Address,
        /// The relay's message.
        message: String,
        /// Versions the relay supports, when it refused our `hello`.
        supported: Option<Vec<u32>>,
    },
    /// The relay sent something this version cannot understand where an
    /// answer was expected, or an over-long line.
    #[error("control socket {address}: protocol error: {detail}")]
    Protocol {
        /// Control socket address.
        address: Address,
        /// What was wrong.
        detail: String,
    },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, ControlError>;

/// Client tuning.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Bound of connect, handshake, each write and each request/answer.
    pub timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// What the relay said in its `welcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    /// The negotiated protocol version.
    pub version: u32,
    /// The epoch when we connected.
    pub epoch: u64,
    /// The relay's state when we connected.
    pub state: RelayState,
}

/// One connection to the relay, after a successful handshake.
struct Conn {
    address: Address,
    lines: FramedRead<StreamReader, LinesCodec>,
    wr: StreamWriter,
    timeout: Duration,
    welcome: Welcome,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The socket halves are boxed trait objects without Debug.
        f.debug_struct("Conn")
            .field("address", &self.address)
            .field("timeout", &self.timeout)
            .field("welcome", &self.welcome)
            .finish_non_exhaustive()
    }
}

impl Conn {
    async fn open(
        address: Address,
        hello: Hello,
        opts: &ClientOptions,
        tls: Option<&colo_tls::PeerConnector>,
    ) -> Result<Conn> {
        let t = opts.timeout;
        let (rd, wr) = bounded(&address, "connect", t, async {
            transport::connect(&address, tls)
                .await
                .map_err(|source| ControlError::Connect {
                    address: address.clone(),
                    source,
                })
        })
        .await?;
        let mut conn = Conn {
            lines: FramedRead::new(rd, LinesCodec::new_with_max_length(MAX_LINE)),
            wr,
            timeout: t,
            welcome: Welcome {
                version: PROTOCOL_VERSION,
                epoch: 0,
                state: RelayState::Waiting,
            },
            address,
        };
        conn.send(&ClientMessage::Hello(hello)).await?;
        let address = conn.address.clone();
        match bounded(&address, "welcome", t, conn.read_message()).await? {
            Some(RelayMessage::Welcome {
                version,
                epoch,
                state,
            }) => {
                conn.welcome = Welcome {
                    version,
                    epoch,
                    state,
                };
                Ok(conn)
            }
            Some(RelayMessage::Error { message, supported }) => Err(ControlError::Rejected {
                address,
                message,
                supported,
            }),
            Some(other) => Err(ControlError::Protocol {
                address,
                detail: format!("expected welcome, got {other:?}"),
            }),
            None => Err(ControlError::Closed { address }),
        }
    }

    async fn send(&mut self, msg: &ClientMessage) -> Result<()> {
        let line = encode_line(msg);
        let address = &self.address;
        let wr = &mut self.wr;
        bounded(address, "write", self.timeout, async {
            wr.write_all(line.as_bytes())
                .await
                .map_err(|source| ControlError::Io {
                    address: address.clone(),
                    source,
                })
        })
        .await
    }

    /// Next decodable line; `None` at EOF. Lines this version cannot decode
    /// (a later relay's new message types) are skipped with a debug log.
    async fn read_message(&mut self) -> Result<Option<RelayMessage>> {
        loop {
            match self.lines.next().await {
                None => return Ok(None),
                Some(Ok(line)) => match decode_relay_line(&line) {
                    Ok(m) => return Ok(Some(m)),
                    Err(e) => tracing::debug!(error = %e, "skipping undecodable control line"),
                },
                Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                    return Err(ControlError::Protocol {
                        address: self.address.clone(),
                        detail: format!("line longer than {MAX_LINE} bytes"),
                    });
                }
                Some(Err(LinesCodecError::Io(e))) => {
                    return if is_disconnect(&e) {
                        Ok(None)
                    } else {
                        Err(ControlError::Io {
                            address: self.address.clone(),
                            source: e,
                        })
                    };
                }
            }
        }
    }

    /// Sends a request and returns the first non-event answer.
    async fn request(&mut self, msg: ClientMessage) -> Result<RelayMessage> {
        let address = self.address.clone();
        let t = self.timeout;
        bounded(&address, "request", t, async {
            self.send(&msg).await?;
            loop {
                match self.read_message().await? {
                    None => {
                        return Err(ControlError::Closed {
                            address: address.clone(),
                        });
                    }
                    Some(RelayMessage::Event(_)) => continue,
                    Some(RelayMessage::Error { message, supported }) => {
                        return Err(ControlError::Rejected {
                            address: address.clone(),
                            message,
                            supported,
                        });
                    }
                    Some(answer) => return Ok(answer),
                }
            }
        })
        .await
    }
}

fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
    )
}

async fn bounded<T>(
    address: &Address,
    what: &'static str,
    after: Duration,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(after, fut).await {
        Ok(r) => r,
        Err(_) => Err(ControlError::Timeout {
            address: address.clone(),
            what,
            after,
        }),
    }
}

/// A daemon's event subscription.
#[derive(Debug)]
pub struct Subscriber {
    conn: Conn,
}

impl Subscriber {
    /// Connects to the relay's control socket at `address` (Unix or TCP;
    /// a path is a Unix socket) as subscriber `name`. With `sync`, every
    /// checkpoint barrier waits for this subscriber's [`Subscriber::ack`] of
    /// the synchronous events.
    pub async fn connect(
        address: impl Into<Address>,
        name: &str,
        sync: bool,
    ) -> Result<Subscriber> {
        Self::connect_with(address, name, sync, &ClientOptions::default()).await
    }

    /// Like [`Subscriber::connect`] with explicit options.
    pub async fn connect_with(
        address: impl Into<Address>,
        name: &str,
        sync: bool,
        opts: &ClientOptions,
    ) -> Result<Subscriber> {
        Self::connect_tls(address, name, sync, opts, None).await
    }

    /// Like [`Subscriber::connect_with`], over mutual TLS when `tls` is
    /// given and `address` is TCP (a relay started with `--tls-dir`): the
    /// relay's certificate must name `tls`'s peer, and ours is presented.
    pub async fn connect_tls(
        address: impl Into<Address>,
        name: &str,
        sync: bool,
        opts: &ClientOptions,
        tls: Option<&colo_tls::PeerConnector>,
    ) -> Result<Subscriber> {
        let hello = Hello {
            version: PROTOCOL_VERSION,
            name: name.to_string(),
            role: ConnectionRole::Subscriber,
            sync,
        };
        let conn = Conn::open(address.into(), hello, opts, tls).await?;
        tracing::debug!(address = %conn.address, name, sync, "subscribed to the relay");
        Ok(Subscriber { conn })
    }

    /// The relay's `welcome`.
    pub fn welcome(&self) -> Welcome {
        self.conn.welcome
    }

    /// The next event. `Ok(None)` when the relay closed the connection (it
    /// stopped, or its process died). Not bounded in time: see the module
    /// documentation. Non-event lines are skipped.
    pub async fn next_event(&mut self) -> Result<Option<Event>> {
        loop {
            match self.conn.read_message().await? {
                None => return Ok(None),
                Some(RelayMessage::Event(ev)) => return Ok(Some(ev)),
                Some(RelayMessage::Error { message, .. }) => {
                    tracing::warn!(%message, "the relay refused a line of ours");
                }
                Some(other) => tracing::debug!(?other, "skipping non-event control line"),
            }
        }
    }

    /// [`Subscriber::next_event`] bounded by `timeout`
    /// ([`ControlError::Timeout`] when no event arrived in time).
    pub async fn next_event_timeout(&mut self, timeout: Duration) -> Result<Option<Event>> {
        let address = self.conn.address.clone();
        bounded(&address, "next event", timeout, self.next_event()).await
    }

    /// Acknowledges the event `seq` (and, cumulatively, every earlier one).
    pub async fn ack(&mut self, seq: u64) -> Result<()> {
        self.conn.send(&ClientMessage::Ack { seq }).await
    }
}

/// An operator connection: requests and their answers.
#[derive(Debug)]
pub struct Operator {
    conn: Conn,
}

impl Operator {
    /// Connects to the relay at `address` (Unix or TCP; a path is a Unix
    /// socket) as operator `name`.
    pub async fn connect(address: impl Into<Address>, name: &str) -> Result<Operator> {
        Self::connect_with(address, name, &ClientOptions::default()).await
    }

    /// Like [`Operator::connect`] with explicit options.
    pub async fn connect_with(
        address: impl Into<Address>,
        name: &str,
        opts: &ClientOptions,
    ) -> Result<Operator> {
        Self::connect_tls(address, name, opts, None).await
    }

    /// Like [`Operator::connect_with`], over mutual TLS when `tls` is given
    /// and `address` is TCP.
    pub async fn connect_tls(
        address: impl Into<Address>,
        name: &str,
        opts: &ClientOptions,
        tls: Option<&colo_tls::PeerConnector>,
    ) -> Result<Operator> {
        let hello = Hello {
            version: PROTOCOL_VERSION,
            name: name.to_string(),
            role: ConnectionRole::Operator,
            sync: false,
        };
        Ok(Operator {
            conn: Conn::open(address.into(), hello, opts, tls).await?,
        })
    }

    /// The relay's `welcome`.
    pub fn welcome(&self) -> Welcome {
        self.conn.welcome
    }

    /// Asks for the relay's status.
    pub async fn status(&mut self) -> Result<RelayStatus> {
        match self.conn.request(ClientMessage::Status).await? {
            RelayMessage::Status(s) => Ok(s),
            other => Err(self.unexpected("status", other)),
        }
    }

    /// Announces a failover decision; the relay broadcasts a `failover`
    /// event.
    pub async fn failover(&mut self, survivor: Role) -> Result<()> {
        self.expect_ok(ClientMessage::Failover { survivor }).await
    }

    /// Notes why a checkpoint was requested.
    pub async fn checkpoint_requested(&mut self, reason: &str) -> Result<()> {
        self.expect_ok(ClientMessage::CheckpointRequested {
            reason: reason.to_string(),
        })
        .await
    }

    async fn expect_ok(&mut self, msg: ClientMessage) -> Result<()> {
        match self.conn.request(msg).await? {
            RelayMessage::Ok => Ok(()),
            other => Err(self.unexpected("ok", other)),
        }
    }

    fn unexpected(&self, wanted: &str, got: RelayMessage) -> ControlError {
        ControlError::Protocol {
            address: self.conn.address.clone(),
            detail: format!("expected {wanted}, got {got:?}"),
        }
    }
}

/// One-shot: connects as an operator, asks for the status, disconnects.
pub async fn query_status(address: impl Into<Address>) -> Result<RelayStatus> {
    Operator::connect(address, OPERATOR_NAME)
        .await?
        .status()
        .await
}

/// One-shot: announces a failover decision (the relay broadcasts a
/// `failover` event to every subscriber).
pub async fn notify_failover(address: impl Into<Address>, survivor: Role) -> Result<()> {
    Operator::connect(address, OPERATOR_NAME)
        .await?
        .failover(survivor)
        .await
}

/// One-shot: notes why a checkpoint was requested.
pub async fn note_checkpoint_request(address: impl Into<Address>, reason: &str) -> Result<()> {
    Operator::connect(address, OPERATOR_NAME)
        .await?
        .checkpoint_requested(reason)
        .await
}
