//! The client handle: connecting, capability negotiation, command execution.

use super::codec::{LineCodec, LineError};
use super::error::{QmpError, Result};
use super::events::EventStream;
use super::options::ConnectOptions;
use super::state::{Shared, is_disconnect};
use super::types::Greeting;
use super::wire;
use super::writer::Outgoing;
use super::{reader, writer};
use colo_types::Address;
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::codec::FramedRead;

/// A connected QMP session.
///
/// Cheap to clone (all clones share one connection) and usable from many
/// tasks at once: commands are matched to replies by `id`, so concurrent
/// calls are fine. When the last clone is dropped the connection is closed
/// and any [`EventStream`] ends.
#[derive(Clone)]
pub struct QmpClient {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    writer: mpsc::UnboundedSender<Outgoing>,
    greeting: Greeting,
    oob: AtomicBool,
    next_id: AtomicU64,
    command_timeout: Duration,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Nobody can issue commands any more; stop the background tasks
        // instead of keeping the socket open for subscribers alone.
        self.shared.close(super::state::CloseReason::Local);
    }
}

impl fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QmpClient")
            .field("peer", &self.inner.shared.peer())
            .field("connected", &self.is_connected())
            .field("oob", &self.oob_enabled())
            .field("version", &self.inner.greeting.version)
            .finish()
    }
}

/// How one call is made; keeps `call`'s parameter list short.
struct CallSpec<'a> {
    command: &'a str,
    arguments: Option<Value>,
    oob: bool,
    timeout: Duration,
    /// For `quit`: QEMU may close the socket before (or instead of)
    /// replying, so a disconnect after the command was written is success.
    disconnect_is_success: bool,
}

impl QmpClient {
    /// Connects to the monitor at `endpoint` (`unix:PATH` or `tcp:HOST:PORT`)
    /// the way [`QmpClient::connect_unix`] or [`QmpClient::connect_tcp`] does.
    pub async fn connect_to(endpoint: &Address, opts: ConnectOptions) -> Result<QmpClient> {
        match endpoint {
            Address::Unix(path) => Self::connect_unix(path, opts).await,
            Address::Tcp { host, port } => {
                Self::connect_tcp(&Address::host_port(host, *port), opts).await
            }
        }
    }

    /// Connects to a QMP Unix socket, reads the greeting and negotiates
    /// capabilities, all within [`ConnectOptions::connect_timeout`].
    pub async fn connect_unix(path: impl AsRef<Path>, opts: ConnectOptions) -> Result<QmpClient> {
        Ok(Self::connect_unix_with_events(path, opts).await?.0)
    }

    /// Like [`QmpClient::connect_unix`], plus an [`EventStream`] that was
    /// subscribed before capabilities negotiation finished, so it also has
    /// events QEMU sends right after the handshake — which a `subscribe()`
    /// after `connect_unix` returns can miss.
    pub async fn connect_unix_with_events(
        path: impl AsRef<Path>,
        opts: ConnectOptions,
    ) -> Result<(QmpClient, EventStream)> {
        let path = path.as_ref();
        let peer = path.display().to_string();
        let deadline = Instant::now() + opts.connect_timeout;
        let stream = match timeout_at(deadline, tokio::net::UnixStream::connect(path)).await {
            Err(_) => return Err(connect_timeout(&peer, &opts)),
            Ok(Err(source)) => return Err(QmpError::Io { peer, source }),
            Ok(Ok(s)) => s,
        };
        Self::handshake(stream, peer, opts, deadline).await
    }

    /// Connects to a QMP TCP server (`host:port`). Sets `TCP_NODELAY`
    /// because QMP is small request/response lines where Nagle only adds
    /// latency.
    pub async fn connect_tcp(addr: &str, opts: ConnectOptions) -> Result<QmpClient> {
        Ok(Self::connect_tcp_with_events(addr, opts).await?.0)
    }

    /// Like [`QmpClient::connect_tcp`], plus an early-subscribed
    /// [`EventStream`] (see [`QmpClient::connect_unix_with_events`]).
    pub async fn connect_tcp_with_events(
        addr: &str,
        opts: ConnectOptions,
    ) -> Result<(QmpClient, EventStream)> {
        let peer = addr.to_owned();
        let deadline = Instant::now() + opts.connect_timeout;
        let stream = match timeout_at(deadline, tokio::net::TcpStream::connect(addr)).await {
            Err(_) => return Err(connect_timeout(&peer, &opts)),
            Ok(Err(source)) => return Err(QmpError::Io { peer, source }),
            Ok(Ok(s)) => s,
        };
        stream.set_nodelay(true).map_err(|source| QmpError::Io {
            peer: peer.clone(),
            source,
        })?;
        Self::handshake(stream, peer, opts, deadline).await
    }

    /// Runs the QMP handshake over an already-connected stream. `peer` is
    /// only used in errors and logs.
    pub async fn connect_stream<S>(
        stream: S,
        peer: String,
        opts: ConnectOptions,
    ) -> Result<QmpClient>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        Ok(Self::connect_stream_with_events(stream, peer, opts)
            .await?
            .0)
    }

    /// Like [`QmpClient::connect_stream`], plus an early-subscribed
    /// [`EventStream`] (see [`QmpClient::connect_unix_with_events`]).
    pub async fn connect_stream_with_events<S>(
        stream: S,
        peer: String,
        opts: ConnectOptions,
    ) -> Result<(QmpClient, EventStream)>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let deadline = Instant::now() + opts.connect_timeout;
        Self::handshake(stream, peer, opts, deadline).await
    }

    async fn handshake<S>(
        stream: S,
        peer: String,
        opts: ConnectOptions,
        deadline: Instant,
    ) -> Result<(QmpClient, EventStream)>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (read, write) = tokio::io::split(stream);
        let mut lines = FramedRead::new(read, LineCodec::new(opts.max_line_bytes));
        let greeting = match timeout_at(deadline, read_greeting(&mut lines, &peer)).await {
            Err(_) => {
                return Err(QmpError::Timeout {
                    peer,
                    command: "greeting".to_owned(),
                    after: opts.connect_timeout,
                });
            }
            Ok(g) => g?,
        };
        tracing::debug!(%peer, version = ?greeting.version, capabilities = ?greeting.capabilities, "QMP greeting");

        let shared = Arc::new(Shared::new(peer));
        let (queue_tx, queue_rx) = mpsc::unbounded_channel();
        tokio::spawn(reader::run(lines, Arc::clone(&shared)));
        tokio::spawn(writer::run(write, queue_rx, Arc::clone(&shared)));

        let want_oob = opts.enable_oob && greeting.capabilities.iter().any(|c| c == "oob");
        let client = QmpClient {
            inner: Arc::new(Inner {
                shared,
                writer: queue_tx,
                greeting,
                oob: AtomicBool::new(false),
                next_id: AtomicU64::new(0),
                command_timeout: opts.command_timeout,
            }),
        };
        // Subscribed before negotiation completes: QEMU may send events as
        // soon as it has answered qmp_capabilities, and the reader task can
        // dispatch them before our caller gets to run again.
        let early_events = client.subscribe();
        let remaining = deadline.saturating_duration_since(Instant::now());
        client
            .call(CallSpec {
                command: "qmp_capabilities",
                arguments: want_oob.then(|| json!({ "enable": ["oob"] })),
                oob: false,
                timeout: remaining,
                disconnect_is_success: false,
            })
            .await
            .map_err(|e| match e {
                // Report the configured bound, not the leftover slice of it.
                QmpError::Timeout { peer, command, .. } => QmpError::Timeout {
                    peer,
                    command,
                    after: opts.connect_timeout,
                },
                other => other,
            })?;
        client.inner.oob.store(want_oob, Ordering::Release);
        Ok((client, early_events))
    }

    /// The greeting QEMU sent on connect.
    pub fn greeting(&self) -> &Greeting {
        &self.inner.greeting
    }

    /// Whether out-of-band execution was negotiated.
    pub fn oob_enabled(&self) -> bool {
        self.inner.oob.load(Ordering::Acquire)
    }

    /// Socket path or address this client is connected to.
    pub fn peer(&self) -> &str {
        self.inner.shared.peer()
    }

    /// Subscribes to events. The stream receives every event that arrives
    /// after this call, in order, without loss (the buffer is unbounded, so a
    /// subscriber that never reads grows memory — drop it when done). To
    /// also catch events sent right after the handshake, use one of the
    /// `connect_*_with_events` constructors.
    pub fn subscribe(&self) -> EventStream {
        EventStream::new(
            self.inner.shared.subscribe(),
            self.inner.shared.peer().to_owned(),
        )
    }

    /// False once the connection is closed for any reason.
    pub fn is_connected(&self) -> bool {
        !self.inner.shared.is_closed()
    }

    /// Runs `command` and returns QEMU's `"return"` value, with the default
    /// command timeout.
    pub async fn execute_raw(&self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.execute_raw_timeout(command, arguments, self.inner.command_timeout)
            .await
    }

    /// Like [`QmpClient::execute_raw`] with an explicit timeout.
    pub async fn execute_raw_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        self.call(CallSpec {
            command,
            arguments,
            oob: false,
            timeout,
            disconnect_is_success: false,
        })
        .await
    }

    /// Runs `command` out-of-band (`exec-oob`), so it is handled even while
    /// an in-band command is stuck. Fails with [`QmpError::OobUnavailable`]
    /// if OOB was not negotiated. QEMU only allows this for commands marked
    /// `allow-oob` (e.g. `yank`, `migrate-recover`, `migrate-pause`).
    pub async fn execute_oob_raw(&self, command: &str, arguments: Option<Value>) -> Result<Value> {
        if !self.oob_enabled() {
            return Err(QmpError::OobUnavailable);
        }
        self.call(CallSpec {
            command,
            arguments,
            oob: true,
            timeout: self.inner.command_timeout,
            disconnect_is_success: false,
        })
        .await
    }

    /// Runs `command` and decodes the `"return"` value into `R`.
    pub async fn execute<R: serde::de::DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<R> {
        let value = self.execute_raw(command, arguments).await?;
        decode(command, value)
    }

    /// `quit`-style execution: success also when QEMU hangs up after the
    /// command was written.
    pub(crate) async fn execute_expecting_hangup(&self, command: &str) -> Result<()> {
        self.call(CallSpec {
            command,
            arguments: None,
            oob: false,
            timeout: self.inner.command_timeout,
            disconnect_is_success: true,
        })
        .await
        .map(drop)
    }

    async fn call(&self, spec: CallSpec<'_>) -> Result<Value> {
        let shared = &self.inner.shared;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let Some(reply) = shared.register(id, spec.command) else {
            return Err(shared.disconnected());
        };
        // Unregisters on every exit path, including this future being
        // dropped by the caller, so late replies are recognised as stale.
        let _guard = PendingGuard { shared, id };
        let bytes = wire::encode_command(id, spec.command, spec.arguments.as_ref(), spec.oob);
        tracing::debug!(
            peer = shared.peer(),
            command = spec.command,
            id,
            oob = spec.oob,
            "QMP command"
        );

        let mut sent = false;
        let exchange = async {
            let (written_tx, written_rx) = oneshot::channel();
            let queued = self.inner.writer.send(Outgoing {
                bytes,
                written: written_tx,
            });
            if queued.is_err() {
                return Err(shared.disconnected());
            }
            sent = written_rx.await.is_ok();
            reply.await.unwrap_or_else(|_| Err(shared.disconnected()))
        };
        let outcome = timeout(spec.timeout, exchange).await;
        match outcome {
            Err(_) => {
                tracing::debug!(
                    peer = shared.peer(),
                    command = spec.command,
                    id,
                    "QMP command timed out"
                );
                Err(QmpError::Timeout {
                    peer: shared.peer().to_owned(),
                    command: spec.command.to_owned(),
                    after: spec.timeout,
                })
            }
            Ok(Err(QmpError::Disconnected { .. })) if spec.disconnect_is_success && sent => {
                tracing::debug!(
                    peer = shared.peer(),
                    command = spec.command,
                    "peer hung up after command, as expected"
                );
                Ok(Value::Null)
            }
            Ok(result) => result,
        }
    }
}

struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.unregister(self.id);
    }
}

/// Decodes a `"return"` value into a typed reply.
pub(crate) fn decode<R: serde::de::DeserializeOwned>(command: &str, value: Value) -> Result<R> {
    serde_json::from_value(value).map_err(|e| QmpError::Decode {
        command: command.to_owned(),
        detail: e.to_string(),
    })
}

fn connect_timeout(peer: &str, opts: &ConnectOptions) -> QmpError {
    QmpError::Timeout {
        peer: peer.to_owned(),
        command: "connect".to_owned(),
        after: opts.connect_timeout,
    }
}

/// Reads the first non-blank line, which must be the greeting.
async fn read_greeting<R: AsyncRead + Unpin>(
    lines: &mut FramedRead<R, LineCodec>,
    peer: &str,
) -> Result<Greeting> {
    loop {
        let line = match lines.next().await {
            None => {
                return Err(QmpError::Disconnected {
                    peer: peer.to_owned(),
                });
            }
            Some(Ok(line)) => line,
            Some(Err(LineError::Truncated { .. })) => {
                return Err(QmpError::Disconnected {
                    peer: peer.to_owned(),
                });
            }
            Some(Err(LineError::TooLong { limit })) => {
                return Err(QmpError::Protocol {
                    peer: peer.to_owned(),
                    detail: format!("greeting longer than {limit} bytes"),
                });
            }
            Some(Err(LineError::Io(e))) if is_disconnect(e.kind()) => {
                return Err(QmpError::Disconnected {
                    peer: peer.to_owned(),
                });
            }
            Some(Err(LineError::Io(source))) => {
                return Err(QmpError::Io {
                    peer: peer.to_owned(),
                    source,
                });
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        return wire::parse_greeting(&line).map_err(|detail| QmpError::Protocol {
            peer: peer.to_owned(),
            detail,
        });
    }
}
