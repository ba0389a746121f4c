//! The fake QMP server every test uses: the server side of one QMP connection over any byte
//! stream (`tokio::io::duplex`, a Unix or TCP socket), scripted by the test command by command.

use colo_qmp::{ConnectOptions, QmpClient};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, Lines};

/// Server side of a fake QMP connection.
pub struct Fake<S> {
    lines: Lines<BufReader<tokio::io::ReadHalf<S>>>,
    write: tokio::io::WriteHalf<S>,
}

impl<S> std::fmt::Debug for Fake<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fake").finish_non_exhaustive()
    }
}

/// How long a fake waits for the client before failing the test, so a
/// client bug shows up as a clear panic rather than a hung test.
pub const FAKE_PATIENCE: Duration = Duration::from_secs(5);

pub fn greeting(capabilities: &[&str]) -> Value {
    json!({"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "fake"}, "capabilities": capabilities}})
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
        let mut line = v.to_string();
        line.push_str("\r\n");
        self.send_raw(line.as_bytes()).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.write.write_all(bytes).await.expect("fake write");
        self.write.flush().await.expect("fake flush");
    }

    pub async fn reply(&mut self, cmd: &Value, ret: Value) {
        self.send(&json!({"return": ret, "id": cmd["id"]})).await;
    }

    pub async fn reply_error(&mut self, cmd: &Value, class: &str, desc: &str) {
        self.send(&json!({"error": {"class": class, "desc": desc}, "id": cmd["id"]}))
            .await;
    }

    pub async fn event(&mut self, name: &str, seconds: i64, micros: i64, data: Option<Value>) {
        let mut ev =
            json!({"event": name, "timestamp": {"seconds": seconds, "microseconds": micros}});
        if let Some(d) = data {
            ev["data"] = d;
        }
        self.send(&ev).await;
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
