//! Fakes for the daemon tests. No QEMU runs here: QEMU's net-filter chardevs are TCP servers
//! or clients speaking the same be32-length framing, its QMP monitor is a Unix socket server
//! answering the few commands colo-proxyd sends, and the relay is an in-process
//! `colo_control::hub::ControlHub`. What these fakes cannot show (QEMU's own filter timing,
//! a real guest's TCP stack) is left to the test bed (`integration/`).

#![allow(dead_code)]

pub mod process;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use colo_control::hub::ControlHub;
use colo_control::protocol::RelayState;
use colo_proxyd::codec::{Frame, FrameDecoder, encode};
use colo_testkit::fake_qmp::Answer;
pub use colo_testkit::fake_qmp::FakeMonitor;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};

/// How long anything that should happen may take on a loaded 2-core machine.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A TCP/IPv4 Ethernet frame between the VM (10.0.0.2:80) and a client (10.0.0.9:40000).
/// `from_vm` picks the direction; flags as in the TCP header (0x10 ACK, 0x18 PSH+ACK, ...).
pub fn tcp(from_vm: bool, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let (src, dst, sport, dport, smac, dmac) = if from_vm {
        ([10, 0, 0, 2], [10, 0, 0, 9], 80u16, 40000u16, 2u8, 9u8)
    } else {
        ([10, 0, 0, 9], [10, 0, 0, 2], 40000, 80, 9, 2)
    };
    let mut f = vec![
        0x52, 0x54, 0, 0, 0, dmac, 0x52, 0x54, 0, 0, 0, smac, 0x08, 0x00,
    ];
    let total = (20 + 20 + payload.len()) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 6, 0, 0]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    // IPv4 header checksum, for realism (nothing checks it).
    let mut sum: u32 = f[14..34]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    f[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&ack.to_be_bytes());
    f.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

/// The VM's data segments of `data` starting at `seq`, cut every `size` bytes.
pub fn segments(seq: u32, ack: u32, data: &[u8], size: usize) -> Vec<Vec<u8>> {
    data.chunks(size)
        .enumerate()
        .map(|(i, chunk)| tcp(true, seq + (i * size) as u32, ack, 0x18, chunk))
        .collect()
}

/// One end of a QEMU net-filter chardev socket.
pub struct Chardev {
    stream: TcpStream,
    decoder: FrameDecoder,
}

impl Chardev {
    /// QEMU as chardev server (the primary's compare0, mirror0, compare_out): accepts the
    /// daemon's connection.
    pub async fn accept(listener: &TcpListener) -> Chardev {
        let (stream, _) = tokio::time::timeout(PATIENCE, listener.accept())
            .await
            .expect("the daemon connects to the chardev in time")
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Chardev {
            stream,
            decoder: FrameDecoder::new(false),
        }
    }

    /// QEMU as chardev client with reconnect-ms (the secondary's red0, red1).
    pub async fn connect(addr: &str) -> Chardev {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Chardev {
            stream,
            decoder: FrameDecoder::new(false),
        }
    }

    /// Writes one frame as QEMU does.
    pub async fn send(&mut self, frame: &[u8]) {
        let mut wire = Vec::new();
        encode(&Frame::ethernet(frame.to_vec()), false, &mut wire).unwrap();
        self.stream.write_all(&wire).await.unwrap();
    }

    /// The next frame written by the daemon, or `None` when none came `within`.
    pub async fn recv(&mut self, within: Duration) -> Option<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + within;
        let mut buf = [0u8; 65536];
        loop {
            if let Some(frame) = self.decoder.next_frame().unwrap() {
                return Some(frame.data);
            }
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut buf))
                .await
                .ok()?
                .unwrap();
            assert!(n > 0, "the daemon closed the chardev");
            self.decoder.feed(&buf[..n]);
        }
    }

    /// The next `n` frames; panics when they do not come in time.
    pub async fn recv_n(&mut self, n: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while out.len() < n {
            match self.recv(PATIENCE).await {
                Some(f) => out.push(f),
                None => panic!("got {} of {n} frames", out.len()),
            }
        }
        out
    }
}

/// The checkpoint period the fake primary reports.
pub const DELAY_MS: u64 = 20000;

/// What colo-proxyd only asks of the monitor: [`next_qmp_command`] skips them.
const QUERIES: [&str; 5] = [
    "query-migrate",
    "query-migrate-parameters",
    "migrate-set-parameters",
    "query-chardev",
    "query-colo-status",
];

/// What the fake primary QEMU answers to `query-colo-status`; a test changes it as COLO
/// starts or a failover happens.
#[derive(Debug, Clone)]
pub struct QemuColoMode(Arc<Mutex<(&'static str, &'static str)>>);

impl QemuColoMode {
    /// A COLO primary (`mode` `primary`).
    pub fn in_colo() -> QemuColoMode {
        QemuColoMode(Arc::new(Mutex::new(("primary", "none"))))
    }

    /// From now on QEMU reports `mode` and `last_mode`.
    pub fn set(&self, mode: &'static str, last_mode: &'static str) {
        *self.0.lock().unwrap() = (mode, last_mode);
    }

    fn answer(&self) -> Value {
        let (mode, last) = *self.0.lock().unwrap();
        json!({"mode": mode, "last-mode": last, "reason": "none"})
    }
}

/// A QMP monitor of a primary in COLO: `query-migrate` says `colo`, `query-colo-status` says
/// mode `primary`, `query-migrate-parameters` has `x-checkpoint-delay` [`DELAY_MS`],
/// `query-chardev` shows `chardevs` connected, every other command returns `{}`.
pub fn fake_qmp(path: &Path, chardevs: &[&str]) -> FakeMonitor {
    fake_qmp_with(path, chardevs, QemuColoMode::in_colo())
}

/// [`fake_qmp`] whose `query-colo-status` answers what `colo` holds at the time.
pub fn fake_qmp_with(path: &Path, chardevs: &[&str], colo: QemuColoMode) -> FakeMonitor {
    let chardevs: Vec<Value> = chardevs
        .iter()
        .map(|id| {
            json!({"label": id, "filename": "tcp:127.0.0.1:1,server=on <-> 127.0.0.1:2",
                   "frontend-open": true})
        })
        .collect();
    FakeMonitor::serve_unix(path, &[], move |cmd| match cmd.name.as_str() {
        "query-migrate" => Answer::ret(json!({"status": "colo"})),
        "query-migrate-parameters" => {
            Answer::ret(json!({"x-checkpoint-delay": DELAY_MS, "max-bandwidth": 1}))
        }
        "query-chardev" => Answer::ret(Value::Array(chardevs.clone())),
        "query-colo-status" => Answer::ret(colo.answer()),
        _ => Answer::ok(),
    })
}

/// The next checkpoint request (`migrate-set-parameters`'s arguments) the fake QMP monitor
/// saw, or `None` within `within`.
pub async fn next_checkpoint_request(qmp: &mut FakeMonitor, within: Duration) -> Option<Value> {
    let cmd = qmp.recv_named("migrate-set-parameters", within).await?;
    Some(cmd.args)
}

/// The next command other than checkpoint requests and queries that the fake QMP monitor saw
/// (`object-del`, `object-add`, `set_link`, ...), with its arguments (`null` without), or
/// `None` within `within`.
pub async fn next_qmp_command(qmp: &mut FakeMonitor, within: Duration) -> Option<(String, Value)> {
    let cmd = qmp
        .recv_where(within, |c| !QUERIES.contains(&c.name.as_str()))
        .await?;
    Some((cmd.name, cmd.args))
}

/// An in-process relay hub on a socket in `dir`, already in COLO at `epoch`.
pub fn hub_in_colo(dir: &Path, epoch: u64) -> (ControlHub, PathBuf) {
    let path = dir.join("control.sock");
    let hub = ControlHub::new(UnixListener::bind(&path).unwrap());
    hub.update_status(|s| {
        s.state = RelayState::Colo;
        s.epoch = epoch;
    });
    (hub, path)
}

/// Waits until `n` subscribers are connected to `hub`.
pub async fn wait_subscribers(hub: &ControlHub, n: usize) {
    let deadline = Instant::now() + PATIENCE;
    while hub
        .status()
        .subscribers
        .iter()
        .filter(|s| s.connected)
        .count()
        < n
    {
        assert!(Instant::now() < deadline, "subscribers never reached {n}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The metrics exposition from a daemon's endpoint.
pub async fn scrape(addr: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

/// Waits until the metrics at `addr` contain `line`.
pub async fn wait_metric(addr: &str, line: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = scrape(addr).await;
        if text.lines().any(|l| l == line) {
            return;
        }
        assert!(Instant::now() < deadline, "never saw {line:?} in\n{text}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The QEMU-facing sockets of a primary daemon under test: the test listens where QEMU would.
pub struct PrimaryPorts {
    /// `compare0`: the PVM's output.
    pub compare0: TcpListener,
    /// `mirror0`: the packets into the PVM.
    pub mirror0: TcpListener,
    /// `compare_out`: released output.
    pub compare_out: TcpListener,
}

impl PrimaryPorts {
    /// Three listeners on free loopback ports.
    pub async fn bind() -> PrimaryPorts {
        let any = || TcpListener::bind("127.0.0.1:0");
        PrimaryPorts {
            compare0: any().await.unwrap(),
            mirror0: any().await.unwrap(),
            compare_out: any().await.unwrap(),
        }
    }

    /// `colo-proxyd primary`'s command line for these ports, the link at `link`, the relay at
    /// `control`, QMP at `qmp` and metrics at `metrics`.
    pub fn primary_args(
        &self,
        link: &str,
        control: &Path,
        qmp: &Path,
        metrics: &str,
    ) -> Vec<String> {
        let addr = |l: &TcpListener| l.local_addr().unwrap().to_string();
        vec![
            "primary".to_string(),
            "--pvm-output".into(),
            addr(&self.compare0),
            "--mirror".into(),
            addr(&self.mirror0),
            "--release".into(),
            addr(&self.compare_out),
            "--link-listen".into(),
            link.to_owned(),
            "--control".into(),
            control.display().to_string(),
            "--qmp".into(),
            format!("unix:{}", qmp.display()),
            "--metrics".into(),
            metrics.to_owned(),
        ]
    }
}
