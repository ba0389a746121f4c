//! The crate defect the shim works around (docs/upstream/vhost-set-vring-enable.md), shown
//! without QEMU: QEMU's order — `SET_VRING_ENABLE` (with `NEED_REPLY`) before `SET_FEATURES` —
//! sent by hand, once straight to the rust-vmm daemon (it hangs up) and once through the shim
//! (acknowledged, and the connection goes on). When upstream accepts the early enable, the
//! first test fails: then the shim's hold can go.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use colo_vhost::wire::{FLAG_NEED_REPLY, FLAG_REPLY, Header, req};
use colo_vhost::{LogGate, NetBackend, Port};

/// A host port that never has a frame (one end of a datagram pair).
struct NullPort(UnixDatagram, #[allow(dead_code)] UnixDatagram);

impl AsRawFd for NullPort {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Port for NullPort {
    fn recv(&self, _buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        Ok(None)
    }
    fn send(&self, _frame: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
}

fn null_port() -> NullPort {
    let (a, b) = UnixDatagram::pair().unwrap();
    NullPort(a, b)
}

fn send(s: &mut UnixStream, request: u32, flags: u32, payload: &[u8]) {
    let h = Header {
        request,
        flags: 1 | flags,
        size: payload.len() as u32,
    };
    s.write_all(&h.encode()).unwrap();
    s.write_all(payload).unwrap();
}

/// One reply, or `None` if the peer hung up instead.
fn reply(s: &mut UnixStream) -> Option<(Header, Vec<u8>)> {
    let mut h = [0u8; 12];
    if s.read_exact(&mut h).is_err() {
        return None;
    }
    let h = Header::parse(&h).unwrap();
    let mut p = vec![0; h.size as usize];
    s.read_exact(&mut p).ok()?;
    Some((h, p))
}

/// QEMU's opening up to the first early enable; returns the reply to the enable.
fn qemu_opening(s: &mut UnixStream) -> (u64, Option<(Header, Vec<u8>)>) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    send(s, req::GET_FEATURES, 0, &[]);
    let (_, f) = reply(s).expect("GET_FEATURES reply");
    let features = u64::from_le_bytes(f[..8].try_into().unwrap());
    send(s, req::GET_PROTOCOL_FEATURES, 0, &[]);
    reply(s).expect("GET_PROTOCOL_FEATURES reply");
    // LOG_SHMFD and REPLY_ACK, as QEMU acks them.
    send(s, req::SET_PROTOCOL_FEATURES, 0, &0xa_u64.to_le_bytes());
    send(s, req::SET_OWNER, 0, &[]);
    let mut enable = 0u32.to_le_bytes().to_vec();
    enable.extend_from_slice(&1u32.to_le_bytes());
    send(s, req::SET_VRING_ENABLE, FLAG_NEED_REPLY, &enable);
    (features, reply(s))
}

#[test]
fn the_crates_hang_up_on_an_enable_before_set_features() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.sock");
    let backend = Arc::new(NetBackend::new(null_port(), LogGate::new()));
    let mem = vm_memory::GuestMemoryAtomic::new(vm_memory::GuestMemoryMmap::new());
    let mut daemon =
        vhost_user_backend::VhostUserDaemon::new("early-enable".into(), backend, mem).unwrap();
    let mut listener = vhost::vhost_user::Listener::new(&path, true).unwrap();
    let mut qemu = UnixStream::connect(&path).unwrap();
    daemon.start(&mut listener).unwrap();
    let (features, answer) = qemu_opening(&mut qemu);
    assert_ne!(features & (1 << 30), 0, "PROTOCOL_FEATURES offered");
    assert!(
        answer.is_none(),
        "the crates acknowledged an early SET_VRING_ENABLE ({answer:?}): upstream fixed it, \
         the shim's hold can go (docs/upstream/vhost-set-vring-enable.md)"
    );
    daemon.request_shutdown();
    let _ = daemon.wait();
}

#[test]
fn through_the_shim_the_early_enable_is_acknowledged_and_the_connection_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shim.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        colo_vhost::serve_one(&listener, null_port(), colo_vhost::Trace::new())
    });
    let mut qemu = UnixStream::connect(&path).unwrap();
    let (features, answer) = qemu_opening(&mut qemu);
    let (h, p) = answer.expect("the shim acknowledges the held enable");
    assert_eq!(h.request, req::SET_VRING_ENABLE);
    assert_ne!(h.flags & FLAG_REPLY, 0);
    assert_eq!(p, 0u64.to_le_bytes(), "ack with success");
    // SET_FEATURES (acking PROTOCOL_FEATURES) releases the held enable to the crates; the
    // connection is alive afterwards.
    let acked = features & ((1 << 32) | (1 << 30));
    send(&mut qemu, req::SET_FEATURES, 0, &acked.to_le_bytes());
    send(&mut qemu, req::GET_FEATURES, 0, &[]);
    let (h, _) = reply(&mut qemu).expect("the connection goes on after SET_FEATURES");
    assert_eq!(h.request, req::GET_FEATURES);
    drop(qemu);
    let served = server.join().unwrap().expect("served until hang-up");
    assert!(
        served
            .trace
            .iter()
            .any(|e| e.request == req::SET_VRING_ENABLE),
        "the enable is in the trace"
    );
}
