//! The virtio-net device: one receive and one transmit queue, frames passed to and from a host
//! [`Port`] (a tap device in the daemon).
//!
//! Guest memory is written in two places, both through vm-memory, whose bitmap
//! ([`BitmapMmapRegion`]) marks the pages in QEMU's dirty log while a log is set: receive
//! buffers (the [`Writer`](virtio_queue::Writer) over a descriptor chain) and the used rings
//! (`add_used`). The device waits on the [`LogGate`] before it touches either.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_MRG_RXBUF};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use crate::gate::LogGate;

/// Guest memory with the dirty-log bitmap.
pub type Memory = GuestMemoryMmap<BitmapMmapRegion>;
/// A vring over [`Memory`].
pub type Vring = VringRwLock<GuestMemoryAtomic<Memory>>;

/// Queue 0 receives (device to guest), queue 1 transmits.
pub const RX: usize = 0;
/// The transmit queue.
pub const TX: usize = 1;
/// Queues of the device (one pair).
pub const NUM_QUEUES: usize = 2;
/// Largest ring the device accepts (QEMU's default for virtio-net is 256).
pub const MAX_QUEUE_SIZE: usize = 1024;
/// The epoll token of the host port: above the queues and the crate's own exit event
/// (`0..=NUM_QUEUES` are reserved).
pub const PORT_TOKEN: u16 = NUM_QUEUES as u16 + 1;

/// The largest frame the device moves (Ethernet plus a VLAN tag, no offloads negotiated).
const MAX_FRAME: usize = 1522;
/// The `virtio_net_hdr_v1` of VERSION_1 (with `num_buffers`).
const HDR_LEN_V1: usize = 12;
/// The legacy header without `num_buffers`.
const HDR_LEN_LEGACY: usize = 10;
/// `VHOST_F_LOG_ALL`.
const VHOST_F_LOG_ALL: u64 = 1 << 26;

/// The host side of the NIC.
pub trait Port: AsRawFd + Send + Sync {
    /// One frame into `buf`; `Ok(None)` when none is waiting (the port is non-blocking).
    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>>;
    /// One frame out.
    fn send(&self, frame: &[u8]) -> io::Result<()>;
}

impl Port for crate::tap::Tap {
    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        crate::tap::Tap::recv(self, buf)
    }
    fn send(&self, frame: &[u8]) -> io::Result<()> {
        crate::tap::Tap::send(self, frame)
    }
}

/// Counters, for tests and metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Frames the guest sent that went out of the port.
    pub tx_frames: AtomicU64,
    /// Frames written into the guest's receive buffers.
    pub rx_frames: AtomicU64,
    /// Frames dropped on the way in: ring not live, or a buffer too small.
    pub rx_dropped: AtomicU64,
}

#[derive(Debug)]
struct RxState {
    buf: Vec<u8>,
    /// A frame read from the port that waits for a receive buffer.
    pending: Option<usize>,
}

/// The device.
#[derive(Debug)]
pub struct NetBackend<P> {
    port: P,
    gate: LogGate,
    mem: RwLock<Option<GuestMemoryAtomic<Memory>>>,
    acked: AtomicU64,
    rx: Mutex<RxState>,
    /// What moved.
    pub counters: Counters,
}

impl<P: Port> NetBackend<P> {
    /// A device on `port` that waits on `gate` before writing guest memory.
    pub fn new(port: P, gate: LogGate) -> Self {
        NetBackend {
            port,
            gate,
            mem: RwLock::new(None),
            acked: AtomicU64::new(0),
            rx: Mutex::new(RxState {
                buf: vec![0; MAX_FRAME],
                pending: None,
            }),
            counters: Counters::default(),
        }
    }

    /// The port's descriptor, for the epoll registration.
    pub fn port_fd(&self) -> RawFd {
        self.port.as_raw_fd()
    }

    fn hdr_len(&self) -> usize {
        let acked = self.acked.load(Ordering::Acquire);
        if acked & (1 << VIRTIO_F_VERSION_1) != 0 || acked & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0 {
            HDR_LEN_V1
        } else {
            HDR_LEN_LEGACY
        }
    }

    fn memory(&self) -> Option<GuestMemoryAtomic<Memory>> {
        self.mem.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Guest to port: every available transmit chain.
    fn process_tx(&self, vring: &Vring, mem: &GuestMemoryAtomic<Memory>) -> io::Result<()> {
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return Ok(());
        }
        let guard = mem.memory();
        let hdr_len = self.hdr_len();
        let mut frame = Vec::with_capacity(MAX_FRAME + HDR_LEN_V1);
        let mut used = false;
        while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(guard.clone()) {
            let head = chain.head_index();
            frame.clear();
            match chain.reader(&guard) {
                Ok(mut reader) => {
                    if reader.read_to_end(&mut frame).is_ok() && frame.len() > hdr_len {
                        self.port.send(&frame[hdr_len..])?;
                        self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "bad transmit descriptor chain"),
            }
            state.add_used(head, 0).map_err(io::Error::other)?;
            used = true;
        }
        if used {
            state.signal_used_queue()?;
        }
        Ok(())
    }

    /// Port to guest: frames while there are receive buffers.
    fn process_rx(&self, vring: &Vring, mem: &GuestMemoryAtomic<Memory>) -> io::Result<()> {
        let mut state = vring.get_mut();
        let live = state.get_queue().ready() && state.is_enabled();
        let guard = mem.memory();
        let hdr_len = self.hdr_len();
        let mut rx = self.rx.lock().unwrap_or_else(|p| p.into_inner());
        let RxState { buf, pending } = &mut *rx;
        let mut used = false;
        loop {
            let len = match pending.take() {
                Some(len) => len,
                None => match self.port.recv(buf)? {
                    Some(len) => len,
                    None => break,
                },
            };
            if !live {
                // No ring to put it in: the link is down for the host.
                self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let Some(chain) = state.get_queue_mut().pop_descriptor_chain(guard.clone()) else {
                *pending = Some(len);
                break;
            };
            let head = chain.head_index();
            let written = match chain.writer(&guard) {
                Ok(mut writer) if writer.available_bytes() >= hdr_len + len => {
                    let mut hdr = [0u8; HDR_LEN_V1];
                    // num_buffers = 1 (VERSION_1 header; no mergeable buffers negotiated).
                    hdr[10] = 1;
                    writer.write_all(&hdr[..hdr_len])?;
                    writer.write_all(&buf[..len])?;
                    self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                    (hdr_len + len) as u32
                }
                _ => {
                    self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    0
                }
            };
            state.add_used(head, written).map_err(io::Error::other)?;
            used = true;
        }
        if used {
            state.signal_used_queue()?;
        }
        Ok(())
    }
}

impl<P: Port> VhostUserBackend for NetBackend<P> {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    /// VERSION_1, GUEST_ANNOUNCE, LOG_ALL and PROTOCOL_FEATURES; no offloads, no mergeable
    /// buffers, no `VIRTIO_NET_F_STATUS` (QEMU then reports the link up itself).
    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_NET_F_GUEST_ANNOUNCE)
            | VHOST_F_LOG_ALL
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Release);
    }

    /// `LOG_SHMFD` (and `REPLY_ACK`, which `vhost` always adds): no `RARP` (the crate does not
    /// handle `SEND_RARP`), no `MQ`, no `CONFIG` (QEMU keeps the config space).
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn set_event_idx(&self, _enabled: bool) {}

    /// The worker's exit event: without one, the crate's worker thread never leaves its epoll
    /// loop and dropping the daemon (which joins it) hangs after QEMU hung up.
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
            .inspect_err(|e| tracing::error!(error = %e, "creating the worker's exit event"))
            .ok()
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<Memory>) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    fn handle_event(
        &self,
        _device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        // The log-window rule: no guest memory is touched until the gate opens; `false` means
        // the connection is gone.
        if !self.gate.wait_open() {
            return Ok(());
        }
        let Some(mem) = self.memory() else {
            return Ok(());
        };
        // Whatever woke us (a kick on either queue, a frame on the port), move both ways: a
        // receive kick means new buffers for a frame that may be pending.
        if let Err(e) = self.process_tx(&vrings[TX], &mem) {
            tracing::warn!(error = %e, "transmit");
        }
        if let Err(e) = self.process_rx(&vrings[RX], &mem) {
            tracing::warn!(error = %e, "receive");
        }
        Ok(())
    }
}
