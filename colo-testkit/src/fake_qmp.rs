//! The fake QMP server every test uses, in two shapes over one implementation of the server
//! side (greeting, capabilities negotiation, replies framed with the command's id, events):
//!
//! * [`FakeMonitor`]: a scripted QEMU monitor on a Unix socket. It accepts any number of
//!   connections, greets, answers `qmp_capabilities` itself and hands every other command to
//!   the test's script, which says what to [`Answer`]; the test sees every command it got
//!   ([`FakeMonitor::recv`] and friends).
//! * [`Fake`]: the server side of one connection over any byte stream (`tokio::io::duplex`, a
//!   Unix or TCP socket), driven by the test step by step: for the client's own tests, which
//!   pin the exact bytes and timing of each exchange.

use colo_qmp::{ConnectOptions, QmpClient};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, Lines};
use tokio::net::UnixListener;
use tokio::sync::mpsc;

/// How long a fake waits for the client before failing the test, so a
/// client bug shows up as a clear panic rather than a hung test.
pub const FAKE_PATIENCE: Duration = Duration::from_secs(5);

/// How long [`FakeMonitor::recv`] waits for a daemon's command: long, as daemons under test
/// run on a loaded 2-core machine.
pub const MONITOR_PATIENCE: Duration = Duration::from_secs(20);

/// QEMU 10.0.2's greeting, offering `capabilities` (`"oob"` or none).
pub fn greeting(capabilities: &[&str]) -> Value {
    json!({"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "fake"}, "capabilities": capabilities}})
}

/// A successful reply to the command with `id` (`Null`: the command had none).
pub fn return_reply(id: &Value, ret: Value) -> Value {
    with_id(json!({ "return": ret }), id)
}

/// An error reply to the command with `id` (`Null`: the command had none).
pub fn error_reply(id: &Value, class: &str, desc: &str) -> Value {
    with_id(json!({"error": {"class": class, "desc": desc}}), id)
}

/// An event as QEMU sends it; `data` is left out when `None`.
pub fn event(name: &str, seconds: i64, micros: i64, data: Option<Value>) -> Value {
    let mut ev = json!({"event": name, "timestamp": {"seconds": seconds, "microseconds": micros}});
    if let Some(d) = data {
        ev["data"] = d;
    }
    ev
}

/// QEMU echoes a command's id only when it had one.
fn with_id(mut reply: Value, id: &Value) -> Value {
    if !id.is_null() {
        reply["id"] = id.clone();
    }
    reply
}

/// One message on the wire: JSON and `\r\n`, as QEMU writes it.
fn wire(message: &Value) -> String {
    let mut line = message.to_string();
    line.push_str("\r\n");
    line
}

/// A command the client sent to a [`FakeMonitor`].
#[derive(Debug, Clone, PartialEq)]
pub struct QmpCommand {
    /// `execute` or `exec-oob`.
    pub name: String,
    /// `arguments`, or `Null` without.
    pub args: Value,
    /// Sent with `exec-oob`.
    pub oob: bool,
}

impl QmpCommand {
    /// The command in `message`, its id (`Null` without), or why it is none.
    fn parse(message: &Value) -> Result<(QmpCommand, Value), &'static str> {
        let (name, oob) = match (message["execute"].as_str(), message["exec-oob"].as_str()) {
            (Some(n), _) => (n, false),
            (None, Some(n)) => (n, true),
            (None, None) => return Err("QMP input lacks member 'execute'"),
        };
        let command = QmpCommand {
            name: name.to_owned(),
            args: message.get("arguments").cloned().unwrap_or(Value::Null),
            oob,
        };
        Ok((command, message.get("id").cloned().unwrap_or(Value::Null)))
    }
}

/// What a [`FakeMonitor`] does with one command: its reply, then any events.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The reply (or none, or closing the connection).
    pub reply: Reply,
    /// Events sent right after the reply, in order (built with [`event`]).
    pub events: Vec<Value>,
}

/// The reply part of an [`Answer`].
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `{"return": …}`.
    Return(Value),
    /// `{"error": {"class": …, "desc": …}}`.
    Error {
        /// QEMU's error class (`GenericError`, `CommandNotFound`, …).
        class: String,
        /// The message.
        desc: String,
    },
    /// No reply at all (a command QEMU is still busy with); the events are sent.
    Nothing,
    /// Close the connection instead of replying (QEMU going away); no events.
    Close,
}

impl Answer {
    /// Returns `value`.
    pub fn ret(value: Value) -> Answer {
        Reply::Return(value).into()
    }

    /// Returns `{}`, as most QMP commands do.
    pub fn ok() -> Answer {
        Answer::ret(json!({}))
    }

    /// Fails with `class` and `desc`.
    pub fn error(class: &str, desc: impl Into<String>) -> Answer {
        Reply::Error {
            class: class.to_owned(),
            desc: desc.into(),
        }
        .into()
    }

    /// Fails with a `GenericError` saying `desc`, QEMU's usual refusal.
    pub fn generic_error(desc: impl Into<String>) -> Answer {
        Answer::error("GenericError", desc)
    }

    /// Does not reply.
    pub fn nothing() -> Answer {
        Reply::Nothing.into()
    }

    /// Closes the connection.
    pub fn close() -> Answer {
        Reply::Close.into()
    }

    /// Sends `events` (built with [`event`]) after the reply.
    pub fn then_events(mut self, events: impl IntoIterator<Item = Value>) -> Answer {
        self.events.extend(events);
        self
    }
}

impl From<Reply> for Answer {
    fn from(reply: Reply) -> Answer {
        Answer {
            reply,
            events: Vec::new(),
        }
    }
}

/// A script: what the monitor answers to each command. Shared by every connection, called
/// once per command in the order they arrive.
pub type Script = Box<dyn FnMut(&QmpCommand) -> Answer + Send>;

/// A scripted fake QEMU monitor serving on a Unix socket until the test's runtime ends.
///
/// ```no_run
/// use colo_testkit::fake_qmp::{Answer, FakeMonitor};
/// use serde_json::json;
/// use std::time::Duration;
///
/// # async fn demo(path: std::path::PathBuf) {
/// let mut qmp = FakeMonitor::serve_unix(&path, &[], |cmd| match cmd.name.as_str() {
///     "query-migrate" => Answer::ret(json!({"status": "colo"})),
///     "object-del" => Answer::generic_error("object not found"),
///     _ => Answer::ok(),
/// });
/// let del = qmp.recv_named("object-del", Duration::from_secs(5)).await;
/// assert_eq!(del.unwrap().args, json!({"id": "f1"}));
/// # }
/// ```
#[derive(Debug)]
pub struct FakeMonitor {
    path: PathBuf,
    seen: mpsc::UnboundedReceiver<QmpCommand>,
}

impl FakeMonitor {
    /// Binds `path` and serves every connection: greets offering `capabilities`, answers
    /// `qmp_capabilities` with `{}`, and answers every other command as `script` says. Every
    /// command but `qmp_capabilities` is passed on to the receiving methods before the script
    /// sees it. Must be called inside a tokio runtime.
    pub fn serve_unix(
        path: impl AsRef<Path>,
        capabilities: &[&str],
        script: impl FnMut(&QmpCommand) -> Answer + Send + 'static,
    ) -> FakeMonitor {
        let path = path.as_ref().to_owned();
        let listener = UnixListener::bind(&path)
            .unwrap_or_else(|e| panic!("fake QMP monitor cannot bind {}: {e}", path.display()));
        let (tx, seen) = mpsc::unbounded_channel();
        let greeting = wire(&greeting(capabilities));
        let script: Arc<Mutex<Script>> = Arc::new(Mutex::new(Box::new(script)));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_connection(
                    stream,
                    greeting.clone(),
                    script.clone(),
                    tx.clone(),
                ));
            }
        });
        FakeMonitor { path, seen }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next command; panics when none came within [`MONITOR_PATIENCE`].
    pub async fn recv(&mut self) -> QmpCommand {
        self.recv_within(MONITOR_PATIENCE)
            .await
            .expect("the fake QMP monitor got no command in time")
    }

    /// The next command, or `None` when none came `within`.
    pub async fn recv_within(&mut self, within: Duration) -> Option<QmpCommand> {
        self.recv_where(within, |_| true).await
    }

    /// The next command called `name`, skipping others, or `None` when none came `within`.
    pub async fn recv_named(&mut self, name: &str, within: Duration) -> Option<QmpCommand> {
        self.recv_where(within, |c| c.name == name).await
    }

    /// The next command for which `wanted` holds, skipping others, or `None` when none came
    /// `within`.
    pub async fn recv_where(
        &mut self,
        within: Duration,
        mut wanted: impl FnMut(&QmpCommand) -> bool,
    ) -> Option<QmpCommand> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.seen.recv()).await {
                Ok(Some(c)) if wanted(&c) => return Some(c),
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// A command already received, without waiting.
    pub fn try_recv(&mut self) -> Option<QmpCommand> {
        self.seen.try_recv().ok()
    }
}

/// Serves one connection of a [`FakeMonitor`] until the client closes it or the script says
/// [`Reply::Close`].
async fn serve_connection<S: AsyncRead + AsyncWrite>(
    stream: S,
    greeting: String,
    script: Arc<Mutex<Script>>,
    seen: mpsc::UnboundedSender<QmpCommand>,
) {
    let (read, mut write) = tokio::io::split(stream);
    if write.write_all(greeting.as_bytes()).await.is_err() {
        return;
    }
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let (reply, events) = match serde_json::from_str::<Value>(&line)
            .map_err(|_| "JSON parse error")
            .and_then(|m| QmpCommand::parse(&m))
        {
            Err(desc) => (
                Some(error_reply(&Value::Null, "GenericError", desc)),
                vec![],
            ),
            Ok((cmd, id)) if cmd.name == "qmp_capabilities" => {
                (Some(return_reply(&id, json!({}))), vec![])
            }
            Ok((cmd, id)) => {
                // The receiver may be gone: a test that only scripts.
                let _ = seen.send(cmd.clone());
                let answer = (script.lock().unwrap())(&cmd);
                let reply = match answer.reply {
                    Reply::Return(ret) => Some(return_reply(&id, ret)),
                    Reply::Error { class, desc } => Some(error_reply(&id, &class, &desc)),
                    Reply::Nothing => None,
                    Reply::Close => return,
                };
                (reply, answer.events)
            }
        };
        let out: String = reply.iter().chain(&events).map(wire).collect();
        if write.write_all(out.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Server side of a fake QMP connection, driven step by step.
pub struct Fake<S> {
    lines: Lines<BufReader<tokio::io::ReadHalf<S>>>,
    write: tokio::io::WriteHalf<S>,
}

impl<S> std::fmt::Debug for Fake<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fake").finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite> Fake<S> {
    pub fn new(stream: S) -> Self {
        let (read, write) = tokio::io::split(stream);
        Self {
            lines: BufReader::new(read).lines(),
            write,
        }
    }

    /// Next command the client sent, parsed; panics on EOF or timeout.
    pub async fn recv_cmd(&mut self) -> Value {
        let line = tokio::time::timeout(FAKE_PATIENCE, self.lines.next_line())
            .await
            .expect("client sent no command in time")
            .expect("read error")
            .expect("client closed the connection");
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("client sent invalid JSON {line:?}: {e}"))
    }

    /// Waits until the client closes its side; true on EOF.
    pub async fn client_closed(&mut self) -> bool {
        matches!(
            tokio::time::timeout(FAKE_PATIENCE, self.lines.next_line()).await,
            Ok(Ok(None)) | Ok(Err(_))
        )
    }

    pub async fn send(&mut self, v: &Value) {
        self.send_raw(wire(v).as_bytes()).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.write.write_all(bytes).await.expect("fake write");
        self.write.flush().await.expect("fake flush");
    }

    pub async fn reply(&mut self, cmd: &Value, ret: Value) {
        self.send(&return_reply(&cmd["id"], ret)).await;
    }

    pub async fn reply_error(&mut self, cmd: &Value, class: &str, desc: &str) {
        self.send(&error_reply(&cmd["id"], class, desc)).await;
    }

    pub async fn event(&mut self, name: &str, seconds: i64, micros: i64, data: Option<Value>) {
        self.send(&event(name, seconds, micros, data)).await;
    }

    /// Expects the next command to be `name` and returns it.
    pub async fn expect(&mut self, name: &str) -> Value {
        let cmd = self.recv_cmd().await;
        assert_eq!(cmd["execute"], name, "unexpected command {cmd}");
        assert!(cmd["id"].is_u64(), "command without numeric id: {cmd}");
        cmd
    }

    /// Greets, answers `qmp_capabilities`, and returns that command.
    pub async fn handshake(&mut self, capabilities: &[&str]) -> Value {
        self.send(&greeting(capabilities)).await;
        let caps = self.expect("qmp_capabilities").await;
        self.reply(&caps, json!({})).await;
        caps
    }
}

/// Connects a client to a fresh fake over a duplex pipe and completes the
/// handshake. Returns the client, the fake, and the `qmp_capabilities`
/// command the client sent.
pub async fn connect(
    capabilities: &[&str],
    opts: ConnectOptions,
) -> (QmpClient, Fake<tokio::io::DuplexStream>, Value) {
    let (client_side, server_side) = tokio::io::duplex(64 * 1024);
    let mut fake = Fake::new(server_side);
    let connecting = tokio::spawn(QmpClient::connect_stream(
        client_side,
        "fake".to_owned(),
        opts,
    ));
    let caps = fake.handshake(capabilities).await;
    let client = connecting.await.expect("join").expect("connect");
    (client, fake, caps)
}

/// Options with short timeouts so failures show up fast.
pub fn quick_opts() -> ConnectOptions {
    ConnectOptions {
        command_timeout: Duration::from_secs(3),
        connect_timeout: Duration::from_secs(3),
        ..ConnectOptions::default()
    }
}
