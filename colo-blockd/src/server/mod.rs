//! The NBD server: accepts clients on Unix or TCP sockets and serves each in
//! its own task, first the handshake (`negotiate.rs`), then the transmission
//! phase (`transmission.rs`). A client's error ends that client's connection
//! only.
//!
//! Bounds, so that no client (hostile, stalled or dead) can hold the daemon or
//! grow its memory without limit:
//!
//! * at most [`ServerConfig::max_connections`] connections at once, over every
//!   socket of the server together (handshaking ones included); one more is
//!   closed at once, before the greeting, and counted
//!   (`colo_blockd_nbd_connections_refused_total{reason="limit"}`), the
//!   connections already open untouched;
//! * [`ServerConfig::handshake_timeout`] from connecting to choosing an export;
//! * in transmission, [`ServerConfig::max_in_flight`] requests and
//!   [`ServerConfig::max_in_flight_bytes`] of data per connection, replies
//!   waiting for the socket included, and [`ServerConfig::write_timeout`]
//!   without the socket taking a byte of a reply before the connection is
//!   dropped (a client that stopped reading);
//! * every TCP connection gets keepalive and `TCP_USER_TIMEOUT`
//!   ([`colo_control::tune_tcp`]): a peer whose host died or whose link was cut
//!   without a FIN is noticed within about 6 s, while reading as well as while
//!   writing.
//!
//! There is no idle timeout in transmission: the primary's NBD child of the
//! `replica` export and the SVM's QEMU are silent as long as their guest
//! does not touch the disk, and must stay connected. A dead peer is found by
//! TCP liveness (a Unix socket's peer cannot vanish without the kernel closing
//! it); an idle live one only takes one of the connection slots.

mod negotiate;
mod transmission;

use std::io;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use colo_daemon::RateLimited;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::BlockBackend;
use crate::export::ExportSet;
use crate::metrics::{DropReason, Metrics, TlsRefusal, Transport};
use crate::proto::ProtoError;
use colo_tls::PeerAcceptor;
use negotiate::{Handshake, TlsState, greet, haggle};

/// Requests in flight per connection. QEMU's NBD client keeps up to 16;
/// more lets `qemu-img bench -d 32` and libnbd clients pipeline further.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 32;

/// Bytes of read data and write payloads in flight per connection: two
/// requests of the maximum block size (32 MiB), or hundreds of ordinary ones.
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: usize = 64 * 1024 * 1024;

/// Time from connecting to choosing an export. QEMU and libnbd need
/// milliseconds; the margin is for loaded hosts.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once, over all of a server's sockets. A pair needs
/// two (the primary's NBD child of `replica`, the SVM's QEMU on `svm`), one
/// more for each reconnect racing the old connection's end, plus the
/// operator's tools (`nbdinfo`, `qemu-img`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 16;

/// Time a reply may wait for the socket to take any byte of it before the
/// connection is dropped: the client stopped reading (its receive window is
/// full) though its host answers, which TCP liveness does not catch. A dead
/// peer is noticed sooner, by `TCP_USER_TIMEOUT`.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why one client's connection ended badly. Logged, never fatal to the
/// server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The client sent bytes that are not NBD.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtoError),
    /// `NBD_OPT_EXPORT_NAME` named no export (this option has no error
    /// reply; the specification says to close).
    #[error("client asked for unknown export {0:?}")]
    UnknownExport(String),
    /// The client kept haggling without choosing an export.
    #[error("too many options without choosing an export")]
    TooManyOptions,
    /// `NBD_OPT_EXPORT_NAME` carried a malformed name (again no error
    /// reply exists, so the server closes).
    #[error("malformed NBD_OPT_EXPORT_NAME: {0}")]
    BadExportName(String),
    /// At shutdown, the client did not take its last replies in time.
    #[error("client did not take its last replies within {0:?} of shutdown")]
    ShutdownGraceExpired(Duration),
    /// TLS is required and the client sent `NBD_OPT_EXPORT_NAME` before
    /// `NBD_OPT_STARTTLS` (no error reply exists: the server closes).
    #[error("client asked for an export before NBD_OPT_STARTTLS; TLS is required")]
    TlsRequired,
    /// The TLS handshake after `NBD_OPT_STARTTLS` failed: no certificate, one
    /// of another CA, one for a name not allowed, or no TLS at all.
    #[error("TLS handshake refused: {0}")]
    TlsHandshake(#[from] colo_tls::HandshakeError),
    /// The client did not finish the handshake in time.
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
    /// The client took no byte of its replies for this long (it stopped
    /// reading); the connection is dropped with whatever was queued.
    #[error("client took no reply data for {0:?} (stopped reading); dropped")]
    WriteTimeout(Duration),
}

impl ServeError {
    /// The bound that ended the connection, if one did.
    pub fn drop_reason(&self) -> Option<DropReason> {
        let timed_out = |kind| kind == io::ErrorKind::TimedOut;
        match self {
            ServeError::HandshakeTimeout(_) => Some(DropReason::HandshakeTimeout),
            ServeError::WriteTimeout(_) => Some(DropReason::WriteTimeout),
            // Only a TCP socket says ETIMEDOUT: keepalive or TCP_USER_TIMEOUT expired.
            ServeError::Io(e) if timed_out(e.kind()) => Some(DropReason::PeerTimeout),
            ServeError::Protocol(ProtoError::Io { kind, .. }) if timed_out(*kind) => {
                Some(DropReason::PeerTimeout)
            }
            _ => None,
        }
    }
}

/// Tunables of a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerConfig {
    /// Requests in flight per connection.
    pub max_in_flight: usize,
    /// Bytes of read data and write payloads in flight per connection
    /// (a single larger request still runs, alone).
    pub max_in_flight_bytes: usize,
    /// Time a client has from connecting to choosing an export, so
    /// connections that never speak do not pile up.
    pub handshake_timeout: Duration,
    /// Connections served at once, over every socket of the server (at
    /// least 1); one more is closed before the greeting.
    pub max_connections: usize,
    /// Time the socket may take no byte of a reply before the connection is
    /// dropped.
    pub write_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
        }
    }
}

/// An NBD server for a set of exports. Cheap to clone; clones share the
/// exports.
#[derive(Debug)]
pub struct NbdServer<B> {
    exports: Arc<ExportSet<B>>,
    config: ServerConfig,
    metrics: Metrics,
    /// One permit per connection served, shared by every socket (and clone).
    connections: Arc<Semaphore>,
    /// Required on TCP connections when set ([`NbdServer::with_tls`]).
    tls: Option<PeerAcceptor>,
    /// Cancelled when a client's transmission ends ([`NbdServer::stop_after_client`]).
    after_client: Option<CancellationToken>,
}

impl<B> Clone for NbdServer<B> {
    fn clone(&self) -> NbdServer<B> {
        NbdServer {
            exports: Arc::clone(&self.exports),
            config: self.config,
            metrics: self.metrics.clone(),
            connections: Arc::clone(&self.connections),
            tls: self.tls.clone(),
            after_client: self.after_client.clone(),
        }
    }
}

impl<B: BlockBackend> NbdServer<B> {
    /// A server for `exports` with `config`.
    pub fn new(exports: ExportSet<B>, mut config: ServerConfig) -> NbdServer<B> {
        config.max_connections = config.max_connections.clamp(1, Semaphore::MAX_PERMITS);
        NbdServer {
            exports: Arc::new(exports),
            config,
            metrics: Metrics::new(),
            connections: Arc::new(Semaphore::new(config.max_connections)),
            tls: None,
            after_client: None,
        }
    }

    /// Cancels `token` when the first client that reached transmission (opened an export)
    /// disconnects: given the serving sockets' shutdown token, the server then stops
    /// (`colo-blockd serve --exit-after-client`). A client that never opened an export (a
    /// port probe, a TLS refusal) does not count.
    pub fn stop_after_client(mut self, token: CancellationToken) -> NbdServer<B> {
        self.after_client = Some(token);
        self
    }

    /// Requires TLS of every TCP client ([`NbdServer::serve_tcp`]): `NBD_OPT_STARTTLS`
    /// before anything else, then a client certificate `acceptor` accepts (the pair's CA, an
    /// allowed name). Unix-socket clients are not asked for it: the socket's permissions
    /// say who may connect.
    pub fn with_tls(mut self, acceptor: PeerAcceptor) -> NbdServer<B> {
        self.tls = Some(acceptor);
        self
    }

    /// Counts connections and requests in `metrics` (by default in a
    /// registry of the server's own, which nobody reads). Every export's
    /// series exist from the start, at zero.
    pub fn with_metrics(mut self, metrics: Metrics) -> NbdServer<B> {
        for export in self.exports.iter() {
            metrics.export(export.name());
        }
        metrics
            .nbd_max_connections
            .set(self.config.max_connections as u64);
        self.metrics = metrics;
        self
    }

    /// The exports served.
    pub fn exports(&self) -> &ExportSet<B> {
        &self.exports
    }

    /// Serves clients of an already-bound Unix socket until `shutdown`.
    pub async fn serve_unix(&self, listener: UnixListener, shutdown: CancellationToken) {
        let listener = &listener;
        self.serve_accepted(&shutdown, move || async move {
            let (stream, _) = listener.accept().await?;
            Ok((stream, Peer::new(Transport::Unix, "unix".into())))
        })
        .await;
    }

    /// Serves clients of an already-bound TCP socket until `shutdown`.
    /// Every connection gets `TCP_NODELAY` (a reply header held back by
    /// Nagle's algorithm waits for the client's delayed ACK, ~40 ms),
    /// keepalive and `TCP_USER_TIMEOUT` ([`colo_control::tune_tcp`]): a peer
    /// host that died or a link cut without a FIN ends the connection within
    /// about 6 s, idle or not.
    pub async fn serve_tcp(&self, listener: TcpListener, shutdown: CancellationToken) {
        let listener = &listener;
        self.serve_accepted(&shutdown, move || async move {
            let (stream, peer) = listener.accept().await?;
            colo_control::tune_tcp(&stream, "nbd");
            Ok((stream, Peer::new(Transport::Tcp, peer.to_string())))
        })
        .await;
    }

    /// The accept loop of either socket: every accepted client served in its own task until
    /// `shutdown`, then waited for.
    async fn serve_accepted<S, Accept>(
        &self,
        shutdown: &CancellationToken,
        mut accept: impl FnMut() -> Accept,
    ) where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
        Accept: Future<Output = io::Result<(S, Peer)>>,
    {
        let connections = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => match Arc::clone(&self.connections).try_acquire_owned() {
                    Ok(slot) => self.spawn_connection(&connections, stream, slot, peer, shutdown),
                    Err(_) => self.refuse(stream, &peer),
                },
                Err(e) => accept_failed(&e).await,
            }
        }
        connections.close();
        connections.wait().await;
    }

    /// One connection past [`ServerConfig::max_connections`]: closed before
    /// the greeting (NBD has no way to say "busy" earlier than an option
    /// reply, and answering options would take a task per refused client).
    /// The client sees the connection end before the magic; the operator a
    /// warning (at most one a second, with the count of the ones it stands
    /// for) and `colo_blockd_nbd_connections_refused_total{reason="limit"}`.
    fn refuse<S>(&self, stream: S, peer: &Peer) {
        drop(stream);
        self.metrics.connection_refused_limit();
        static LOG: RateLimited = RateLimited::new(Duration::from_secs(1));
        if let Some(suppressed) = LOG.allow() {
            tracing::warn!(
                peer = %peer.name,
                limit = self.config.max_connections,
                suppressed,
                "NBD connection refused: the server already serves --max-connections clients"
            );
        }
    }

    fn spawn_connection<S>(
        &self,
        connections: &TaskTracker,
        stream: S,
        slot: OwnedSemaphorePermit,
        peer: Peer,
        shutdown: &CancellationToken,
    ) where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let server = self.clone();
        let shutdown = shutdown.clone();
        let open = self.metrics.connection_opened(peer.transport);
        // Every log line of this client carries its peer.
        let span = tracing::info_span!("nbd_connection", peer = %peer.name);
        connections.spawn(
            async move {
                let (_open, _slot) = (open, slot);
                let tls = match peer.transport {
                    Transport::Tcp => server.tls.clone(),
                    Transport::Unix => None,
                };
                match server
                    .serve_connection(stream, &shutdown, tls.as_ref())
                    .await
                {
                    Ok(()) => tracing::debug!("client left"),
                    Err(e) => {
                        if let Some(reason) = e.drop_reason() {
                            server.metrics.connection_dropped(reason);
                        }
                        tracing::info!(error = %e, "client connection ended");
                    }
                }
            }
            .instrument(span),
        );
    }

    /// Serves one client on `stream`, handshake then transmission, until it
    /// disconnects. Public so tests and other transports can drive it.
    pub async fn serve_stream<S>(&self, stream: S) -> Result<(), ServeError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        self.serve_stream_until(stream, &CancellationToken::new())
            .await
    }

    /// Like [`NbdServer::serve_stream`], but stops at `shutdown`: a client
    /// still in the handshake is dropped; in transmission no new request is
    /// read, and the requests already accepted complete and are answered
    /// before the connection closes.
    pub async fn serve_stream_until<S>(
        &self,
        stream: S,
        shutdown: &CancellationToken,
    ) -> Result<(), ServeError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        self.serve_connection(stream, shutdown, None).await
    }

    /// Like [`NbdServer::serve_stream_until`], with TLS required as on this server's TCP
    /// socket (when [`NbdServer::with_tls`] was given; else exactly the same). Public so
    /// tests can drive it over any stream.
    pub async fn serve_stream_tls_until<S>(
        &self,
        stream: S,
        shutdown: &CancellationToken,
    ) -> Result<(), ServeError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let tls = self.tls.clone();
        self.serve_connection(stream, shutdown, tls.as_ref()).await
    }

    /// Handshake (through TLS when `tls` is given) then transmission. The whole handshake,
    /// TLS included, is bounded by [`ServerConfig::handshake_timeout`].
    async fn serve_connection<S>(
        &self,
        mut stream: S,
        shutdown: &CancellationToken,
        tls: Option<&PeerAcceptor>,
    ) -> Result<(), ServeError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let limit = self.config.handshake_timeout;
        let deadline = tokio::time::Instant::now() + limit;
        let state = match tls {
            Some(_) => TlsState::Required,
            None => TlsState::NotOffered,
        };
        let plain = async {
            let flags = greet(&mut stream).await?;
            let handshake = haggle(&mut stream, &self.exports, flags, state, &self.metrics).await?;
            Ok::<_, ServeError>((flags, handshake))
        };
        let (flags, handshake) = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            handshake = tokio::time::timeout_at(deadline, plain) => {
                handshake.map_err(|_| ServeError::HandshakeTimeout(limit))??
            }
        };
        let acceptor = match (handshake, tls) {
            (Handshake::StartTls, Some(acceptor)) => acceptor,
            (Handshake::StartTls, None) => {
                unreachable!("STARTTLS is acknowledged only where TLS is required")
            }
            (done, _) => return self.enter(stream, done, shutdown).await,
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            accepted = tokio::time::timeout_at(deadline, acceptor.accept(stream)) => {
                accepted.map_err(|_| ServeError::HandshakeTimeout(limit))?
            }
        };
        let (mut stream, peer) = accepted.inspect_err(|_| {
            self.metrics.tls_refused(TlsRefusal::Handshake);
        })?;
        tracing::info!(%peer, "NBD client authenticated by TLS");
        let inside = haggle(
            &mut stream,
            &self.exports,
            flags,
            TlsState::Established,
            &self.metrics,
        );
        let handshake = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            handshake = tokio::time::timeout_at(deadline, inside) => {
                handshake.map_err(|_| ServeError::HandshakeTimeout(limit))??
            }
        };
        self.enter(stream, handshake, shutdown).await
    }

    /// Where the handshake ended: transmission on the chosen export, or nothing.
    async fn enter<S>(
        &self,
        stream: S,
        handshake: Handshake<B>,
        shutdown: &CancellationToken,
    ) -> Result<(), ServeError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        match handshake {
            // Inside TLS (or without it) STARTTLS is never acknowledged.
            Handshake::Aborted | Handshake::StartTls => Ok(()),
            Handshake::Transmit { export, style } => {
                tracing::debug!(export = export.name(), ?style, "transmission");
                let counters = self.metrics.export(export.name());
                let done =
                    transmission::transmit(stream, export, counters, style, self.config, shutdown)
                        .await;
                if let Some(token) = &self.after_client {
                    tracing::info!("the client left its export: the server stops");
                    token.cancel();
                }
                done
            }
        }
    }
}

/// Who is connected, for logs and metrics.
struct Peer {
    transport: Transport,
    name: String,
}

impl Peer {
    fn new(transport: Transport, name: String) -> Peer {
        Peer { transport, name }
    }
}

/// Accept fails for lack of file descriptors or memory, which passes; the
/// pause keeps the loop from spinning while it lasts.
async fn accept_failed(error: &io::Error) {
    tracing::warn!(%error, "accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}
