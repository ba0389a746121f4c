//! The fake QEMUs (plain sockets in a temp dir) and control-protocol helpers
//! shared by the relay's tests.
#![allow(dead_code)]

use colo_control::client::Subscriber;
use colo_control::hub::ControlHub;
use colo_control::protocol::{Event, RelayStatus};
use colo_relay::{ColoMessage, RelayListener};
use colo_types::Address;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Bound of every wait in these tests: a failure shows as a panic, not a hang.
pub const T: Duration = Duration::from_secs(10);

pub type Rd = Box<dyn AsyncRead + Unpin + Send>;
pub type Wr = Box<dyn AsyncWrite + Unpin + Send>;

pub enum SecListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

pub struct Bed {
    pub hub: ControlHub,
    pub control: PathBuf,
    pub relay_ep: Address,
    pub secondary: SecListener,
    pub shutdown: CancellationToken,
    pub relay: Option<JoinHandle<()>>,
    pub _dir: tempfile::TempDir,
}

impl Bed {
    pub async fn unix(ack_timeout: Duration) -> Bed {
        Self::unix_with((ack_timeout, colo_relay::DEFAULT_REPLY_TIMEOUT)).await
    }

    /// Over Unix sockets, with the barriers' ack timeout and the checkpoint reply's timeout.
    pub async fn unix_with(timeouts: (Duration, Duration)) -> Bed {
        let dir = tempfile::tempdir().unwrap();
        let sec_path = dir.path().join("secondary-incoming.sock");
        let secondary = SecListener::Unix(UnixListener::bind(&sec_path).unwrap());
        let listener = RelayListener::bind(&Address::Unix(dir.path().join("relay.sock")))
            .await
            .unwrap();
        Self::start(dir, listener, secondary, Address::Unix(sec_path), timeouts)
    }

    pub async fn tcp(ack_timeout: Duration) -> Bed {
        let dir = tempfile::tempdir().unwrap();
        let sec = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = Address::from(sec.local_addr().unwrap());
        let listener = RelayListener::bind(&"tcp:127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        Self::start(
            dir,
            listener,
            SecListener::Tcp(sec),
            target,
            (ack_timeout, colo_relay::DEFAULT_REPLY_TIMEOUT),
        )
    }

    pub fn start(
        dir: tempfile::TempDir,
        listener: RelayListener,
        secondary: SecListener,
        target: Address,
        timeouts: (Duration, Duration),
    ) -> Bed {
        let control = dir.path().join("control.sock");
        let hub = ControlHub::new(UnixListener::bind(&control).unwrap());
        let relay_ep = listener.local_endpoint().unwrap();
        let shutdown = CancellationToken::new();
        let relay = tokio::spawn(colo_relay::serve(
            listener,
            target,
            hub.clone(),
            timeouts,
            shutdown.clone(),
        ));
        Bed {
            hub,
            control,
            relay_ep,
            secondary,
            shutdown,
            relay: Some(relay),
            _dir: dir,
        }
    }

    /// The fake primary opens a channel and the fake secondary accepts the
    /// relay's matching connection. Returns (primary, secondary) ends.
    pub async fn open(&self, magic: u32) -> (End, End) {
        let primary: (Rd, Wr) = match &self.relay_ep {
            Address::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port)).await.unwrap();
                s.set_nodelay(true).unwrap();
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Address::Unix(p) => {
                let (r, w) = UnixStream::connect(p).await.unwrap().into_split();
                (Box::new(r), Box::new(w))
            }
        };
        let mut primary = End::new(primary);
        primary.send(&magic.to_be_bytes()).await;
        let secondary: (Rd, Wr) = match &self.secondary {
            SecListener::Tcp(l) => {
                let (s, _) = within(l.accept()).await.unwrap();
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            SecListener::Unix(l) => {
                let (s, _) = within(l.accept()).await.unwrap();
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
        };
        let mut secondary = End::new(secondary);
        assert_eq!(
            secondary.recv_exact(4).await,
            magic.to_be_bytes(),
            "magic forwarded first"
        );
        (primary, secondary)
    }

    pub async fn subscriber(&self, name: &str, sync: bool) -> Subscriber {
        let s = Subscriber::connect(&self.control, name, sync)
            .await
            .unwrap();
        // Registration is visible in status before any event can be missed.
        self.wait(|st| st.subscribers.iter().any(|s| s.name == name && s.connected))
            .await;
        s
    }

    /// Polls the status until `f` holds (the relay's state changes are
    /// asynchronous to the sockets the test sees).
    pub async fn wait(&self, f: impl Fn(&RelayStatus) -> bool) -> RelayStatus {
        let deadline = Instant::now() + T;
        loop {
            let st = self.hub.status();
            if f(&st) {
                return st;
            }
            assert!(Instant::now() < deadline, "status never matched: {st:#?}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        within(self.relay.take().unwrap()).await.unwrap();
        self.hub.shutdown().await;
    }
}

/// One end of a fake QEMU connection.
pub struct End {
    pub rd: Rd,
    pub wr: Wr,
}

impl End {
    pub fn new((rd, wr): (Rd, Wr)) -> End {
        End { rd, wr }
    }
    pub async fn send(&mut self, data: &[u8]) {
        within(self.wr.write_all(data)).await.unwrap();
    }
    pub async fn send_msgs(&mut self, msgs: &[ColoMessage]) {
        self.send(&encode(msgs)).await;
    }
    pub async fn recv_exact(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        within(self.rd.read_exact(&mut v)).await.unwrap();
        v
    }
    /// Reads until EOF (or a reset, which also means "closed").
    pub async fn recv_to_end(&mut self) -> Vec<u8> {
        let mut v = Vec::new();
        let _ = within(self.rd.read_to_end(&mut v)).await;
        v
    }
}

pub fn encode(msgs: &[ColoMessage]) -> Vec<u8> {
    let mut v = Vec::new();
    for m in msgs {
        m.encode(&mut v);
    }
    v
}

pub async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(T, f).await.expect("timed out")
}

pub async fn next(sub: &mut Subscriber) -> Event {
    sub.next_event_timeout(T)
        .await
        .expect("event")
        .expect("relay closed the control connection")
}

/// Acks every synchronous event, after `delay`, until the relay goes away.
pub fn acker(mut sub: Subscriber, delay: Duration) -> JoinHandle<Vec<Event>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Ok(Some(ev)) = sub.next_event().await {
            if ev.sync {
                tokio::time::sleep(delay).await;
                if sub.ack(ev.seq).await.is_err() {
                    break;
                }
            }
            seen.push(ev);
        }
        seen
    })
}

pub fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        // xorshift64*
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        v.extend_from_slice(&seed.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

pub const CHECKPOINT: [ColoMessage; 3] = [
    ColoMessage::CheckpointReply,
    ColoMessage::VmstateReceived,
    ColoMessage::VmstateLoaded,
];
