//! What the shim does with each message: a state machine with no I/O.
//!
//! Two rules, both about QEMU's order of messages at a device start, which the rust-vmm crates
//! do not accept or do not know about (docs/vhost-user.md):
//!
//! 1. **Early `SET_VRING_ENABLE`.** QEMU sends `SET_VRING_ENABLE` before `SET_FEATURES` (on the
//!    first start and after a reset). `vhost` (`BackendReqHandler`, the `SET_VRING_ENABLE` arm)
//!    and `vhost-user-backend` (`VhostUserHandler::set_vring_enable`) both require
//!    `VHOST_USER_F_PROTOCOL_FEATURES` to be acked already, and answer an early one with an
//!    error that ends the connection. The shim holds such a message and hands it on right after
//!    the `SET_FEATURES` that acks the bit. If QEMU asked for an acknowledgement, the shim gives
//!    it at once (success) and forwards the held message without the request.
//! 2. **The log window.** At a start with `VHOST_F_LOG_ALL` negotiated, `SET_VRING_KICK` makes a
//!    ring live before `SET_LOG_BASE` brings the new log; a write into guest memory in between
//!    would be logged in the log QEMU already freed, and the page would never be copied. The
//!    shim closes the [`LogGate`](crate::gate::LogGate) from the stop (`GET_VRING_BASE`) until
//!    the back-end has answered the next `SET_LOG_BASE`, whenever `LOG_ALL` is negotiated; the
//!    device does not touch guest memory while the gate is closed.

use crate::wire::{self, F_LOG_ALL, F_PROTOCOL_FEATURES, FLAG_NEED_REPLY, FLAG_REPLY, Header, req};

/// The most `SET_VRING_ENABLE`s the shim holds. QEMU sends one per ring and start (a device
/// has at most 1,024 rings, QEMU's `VIRTIO_QUEUE_MAX`), and the recorded starts repeat them a
/// few times; twice the ring limit is far beyond that. An early enable past the bound is handed
/// on as it is: the crates refuse it and end the connection, as they would without the shim,
/// rather than the shim holding whatever a peer sends.
pub const MAX_HELD: usize = 2 * 1024;

/// One message: header, payload, and whatever rides along (file descriptors in the shim,
/// nothing in the tests).
#[derive(Debug)]
pub struct Message<F> {
    /// The validated header.
    pub header: Header,
    /// `header.size` bytes.
    pub payload: Vec<u8>,
    /// Ancillary data (file descriptors).
    pub fds: Vec<F>,
}

impl<F> Message<F> {
    /// A message with no file descriptors.
    pub fn new(request: u32, flags: u32, payload: Vec<u8>) -> Self {
        Message {
            header: Header {
                request,
                flags,
                size: payload.len() as u32,
            },
            payload,
            fds: Vec::new(),
        }
    }
}

/// Where a message goes.
#[derive(Debug)]
pub enum Out<F> {
    /// To the crate's request handler.
    ToBackend(Message<F>),
    /// Back to QEMU (an acknowledgement the shim gives itself).
    ToFrontend(Message<F>),
}

/// What the shim did with a front-end message (for the trace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Handed on at once.
    Forwarded,
    /// Held until `SET_FEATURES` acks `VHOST_USER_F_PROTOCOL_FEATURES`.
    Held,
}

/// The shim's state of one connection.
#[derive(Debug, Default)]
pub struct Policy<F> {
    /// Whether the crates' view of the acked features includes `PROTOCOL_FEATURES`.
    protocol_acked: bool,
    /// Early `SET_VRING_ENABLE`s, in arrival order.
    held: Vec<Message<F>>,
    /// `LOG_ALL` in the last `SET_FEATURES`.
    log_all: bool,
    /// A `SET_LOG_BASE` was answered since the last stop.
    log_fresh: bool,
}

impl<F> Policy<F> {
    /// A fresh connection.
    pub fn new() -> Self {
        Policy {
            protocol_acked: false,
            held: Vec::new(),
            log_all: false,
            log_fresh: false,
        }
    }

    /// Whether the device may write guest memory now.
    pub fn gate_open(&self) -> bool {
        !self.log_all || self.log_fresh
    }

    /// How many messages are held.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// A message from QEMU: what to send where, in order, and what happened to the message.
    pub fn on_frontend(&mut self, mut msg: Message<F>) -> (Disposition, Vec<Out<F>>) {
        let mut out = Vec::new();
        match msg.header.request {
            req::SET_VRING_ENABLE if !self.protocol_acked && self.held.len() < MAX_HELD => {
                if msg.header.needs_reply() {
                    msg.header.flags &= !FLAG_NEED_REPLY;
                    out.push(Out::ToFrontend(ack(req::SET_VRING_ENABLE)));
                }
                self.held.push(msg);
                return (Disposition::Held, out);
            }
            req::SET_FEATURES => {
                if let Some(features) = wire::payload_u64(&msg.payload) {
                    self.protocol_acked = features & F_PROTOCOL_FEATURES != 0;
                    self.log_all = features & F_LOG_ALL != 0;
                }
                out.push(Out::ToBackend(msg));
                if self.protocol_acked {
                    out.extend(self.held.drain(..).map(Out::ToBackend));
                } else {
                    // Without PROTOCOL_FEATURES, SET_FEATURES itself enables every ring (the
                    // specification's "ring states"); the held enables have nothing to say.
                    self.held.clear();
                }
                return (Disposition::Forwarded, out);
            }
            // vhost-user-backend forgets the acked features on both (`reset_owner`,
            // `reset_device`), so an enable after them is early again.
            req::RESET_OWNER | req::RESET_DEVICE => {
                self.protocol_acked = false;
                self.log_all = false;
                self.log_fresh = false;
            }
            // The device stops: the log QEMU gave for this run is freed after the stop, so no
            // write may go to it once the device runs again.
            req::GET_VRING_BASE => self.log_fresh = false,
            _ => {}
        }
        out.push(Out::ToBackend(msg));
        (Disposition::Forwarded, out)
    }

    /// A message from the back-end on its way to QEMU. Returns whether the gate state may
    /// have changed.
    pub fn on_backend(&mut self, msg: &Message<F>) -> bool {
        if msg.header.is_reply() && msg.header.request == req::SET_LOG_BASE {
            self.log_fresh = true;
            return true;
        }
        false
    }

    /// Whether the crates' view of the acked features includes `PROTOCOL_FEATURES`.
    pub fn protocol_features_acked(&self) -> bool {
        self.protocol_acked
    }
}

/// A successful `REPLY_ACK` acknowledgement of `request`.
fn ack<F>(request: u32) -> Message<F> {
    Message::new(request, 1 | FLAG_REPLY, 0u64.to_le_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type M = Message<()>;

    fn state(request: u32, index: u32, num: u32) -> M {
        let mut p = index.to_le_bytes().to_vec();
        p.extend_from_slice(&num.to_le_bytes());
        Message::new(request, 1, p)
    }

    fn features(bits: u64) -> M {
        Message::new(req::SET_FEATURES, 1, bits.to_le_bytes().to_vec())
    }

    fn requests(out: &[Out<()>]) -> Vec<(bool, u32)> {
        out.iter()
            .map(|o| match o {
                Out::ToBackend(m) => (true, m.header.request),
                Out::ToFrontend(m) => (false, m.header.request),
            })
            .collect()
    }

    #[test]
    fn early_enable_is_held_until_features_ack_protocol_features() {
        let mut p = Policy::<()>::new();
        let (d, out) = p.on_frontend(state(req::SET_VRING_ENABLE, 0, 1));
        assert_eq!(d, Disposition::Held);
        assert!(out.is_empty());
        let (d, out) = p.on_frontend(state(req::SET_VRING_ENABLE, 1, 1));
        assert_eq!(d, Disposition::Held);
        assert!(out.is_empty());
        assert_eq!(p.held(), 2);
        let (_, out) = p.on_frontend(features(F_PROTOCOL_FEATURES | 1 << 32));
        assert_eq!(
            requests(&out),
            vec![
                (true, req::SET_FEATURES),
                (true, req::SET_VRING_ENABLE),
                (true, req::SET_VRING_ENABLE)
            ]
        );
        match &out[1] {
            Out::ToBackend(m) => assert_eq!(wire::payload_vring_state(&m.payload), Some((0, 1))),
            Out::ToFrontend(_) => panic!("held enable went to QEMU"),
        }
        // Later enables pass straight through.
        let (d, out) = p.on_frontend(state(req::SET_VRING_ENABLE, 0, 1));
        assert_eq!(d, Disposition::Forwarded);
        assert_eq!(requests(&out), vec![(true, req::SET_VRING_ENABLE)]);
        // After a reset they are early again.
        p.on_frontend(Message::new(req::RESET_DEVICE, 1, vec![]));
        assert_eq!(
            p.on_frontend(state(req::SET_VRING_ENABLE, 0, 1)).0,
            Disposition::Held
        );
    }

    #[test]
    fn held_enable_asking_for_an_ack_is_acked_by_the_shim_and_forwarded_without_the_request() {
        let mut p = Policy::<()>::new();
        let mut m = state(req::SET_VRING_ENABLE, 0, 1);
        m.header.flags |= FLAG_NEED_REPLY;
        let (d, out) = p.on_frontend(m);
        assert_eq!(d, Disposition::Held);
        assert_eq!(requests(&out), vec![(false, req::SET_VRING_ENABLE)]);
        match &out[0] {
            Out::ToFrontend(a) => {
                assert!(a.header.is_reply());
                assert_eq!(wire::payload_u64(&a.payload), Some(0));
            }
            Out::ToBackend(_) => unreachable!(),
        }
        let (_, out) = p.on_frontend(features(F_PROTOCOL_FEATURES));
        match &out[1] {
            Out::ToBackend(m) => assert!(!m.header.needs_reply()),
            Out::ToFrontend(_) => panic!("wrong direction"),
        }
    }

    #[test]
    fn early_enables_past_the_bound_are_handed_on_not_held() {
        let mut p = Policy::<()>::new();
        for _ in 0..MAX_HELD {
            assert_eq!(
                p.on_frontend(state(req::SET_VRING_ENABLE, 0, 1)).0,
                Disposition::Held
            );
        }
        let (d, out) = p.on_frontend(state(req::SET_VRING_ENABLE, 1, 1));
        assert_eq!(d, Disposition::Forwarded);
        assert_eq!(requests(&out), vec![(true, req::SET_VRING_ENABLE)]);
        assert_eq!(p.held(), MAX_HELD);
    }

    #[test]
    fn features_without_protocol_features_drop_held_enables() {
        let mut p = Policy::<()>::new();
        p.on_frontend(state(req::SET_VRING_ENABLE, 0, 1));
        let (_, out) = p.on_frontend(features(1 << 32));
        assert_eq!(requests(&out), vec![(true, req::SET_FEATURES)]);
        assert_eq!(p.held(), 0);
        assert!(!p.protocol_features_acked());
    }

    #[test]
    fn log_window_closes_at_stop_and_opens_at_the_log_base_reply() {
        let mut p = Policy::<()>::new();
        assert!(p.gate_open(), "no logging: open");
        p.on_frontend(features(F_PROTOCOL_FEATURES));
        assert!(p.gate_open());
        // Migration starts while running: SET_LOG_BASE (answered), then LOG_ALL.
        p.on_frontend(Message::new(req::SET_LOG_BASE, 1, vec![0; 16]));
        assert!(p.on_backend(&Message::new(
            req::SET_LOG_BASE,
            1 | FLAG_REPLY,
            vec![0; 16]
        )));
        p.on_frontend(features(F_PROTOCOL_FEATURES | F_LOG_ALL));
        assert!(p.gate_open(), "log base already in place");
        // A checkpoint: stop, start with LOG_ALL; closed until the new log base is answered.
        p.on_frontend(state(req::GET_VRING_BASE, 0, 0));
        assert!(!p.gate_open());
        p.on_frontend(state(req::SET_VRING_ENABLE, 0, 1));
        p.on_frontend(features(F_PROTOCOL_FEATURES | F_LOG_ALL));
        p.on_frontend(Message::new(
            req::SET_VRING_KICK,
            1,
            0u64.to_le_bytes().to_vec(),
        ));
        assert!(!p.gate_open(), "ring live, but no log yet");
        p.on_frontend(Message::new(req::SET_LOG_BASE, 1, vec![0; 16]));
        assert!(
            !p.gate_open(),
            "log base sent but not yet taken by the back-end"
        );
        p.on_backend(&Message::new(
            req::SET_LOG_BASE,
            1 | FLAG_REPLY,
            vec![0; 16],
        ));
        assert!(p.gate_open());
        // Migration over: LOG_ALL off opens the gate even across a stop.
        p.on_frontend(features(F_PROTOCOL_FEATURES));
        p.on_frontend(state(req::GET_VRING_BASE, 0, 0));
        assert!(p.gate_open());
    }

    #[test]
    fn a_request_from_the_frontend_with_the_log_base_code_does_not_open_the_gate() {
        let mut p = Policy::<()>::new();
        p.on_frontend(features(F_LOG_ALL));
        assert!(!p.gate_open());
        assert!(!p.on_backend(&Message::new(req::SET_LOG_BASE, 1, vec![])));
        assert!(!p.gate_open());
    }

    proptest! {
        /// Whatever QEMU sends, every message is either forwarded once (in order) or held, an
        /// enable is never forwarded before protocol features were acked, and the gate is
        /// closed exactly when LOG_ALL is on and no log base was answered since the last stop.
        #[test]
        fn invariants(steps in proptest::collection::vec((0u32..40, any::<u64>(), any::<bool>(), any::<bool>()), 0..60)) {
            let mut p = Policy::<()>::new();
            let mut acked = false;
            let mut log_all = false;
            let mut fresh = false;
            for (code, value, need_reply, reply_from_backend) in steps {
                if reply_from_backend {
                    p.on_backend(&Message::new(code, 1 | FLAG_REPLY, vec![]));
                    if code == req::SET_LOG_BASE { fresh = true; }
                    prop_assert_eq!(p.gate_open(), !log_all || fresh);
                    continue;
                }
                let payload = if code == req::SET_FEATURES { value.to_le_bytes().to_vec() } else { value.to_le_bytes()[..(value % 9) as usize].to_vec() };
                let flags = if need_reply { 1 | FLAG_NEED_REPLY } else { 1 };
                let held_before = p.held();
                let (d, out) = p.on_frontend(Message::new(code, flags, payload));
                for o in &out {
                    if let Out::ToBackend(m) = o
                        && m.header.request == req::SET_VRING_ENABLE
                    {
                        prop_assert!(acked || code == req::SET_FEATURES);
                    }
                }
                match code {
                    req::SET_FEATURES => {
                        acked = value & F_PROTOCOL_FEATURES != 0;
                        log_all = value & F_LOG_ALL != 0;
                        let expected = if acked { 1 + held_before } else { 1 };
                        prop_assert_eq!(out.len(), expected);
                        prop_assert_eq!(p.held(), 0);
                    }
                    req::SET_VRING_ENABLE if !acked => {
                        prop_assert_eq!(d, Disposition::Held);
                        prop_assert_eq!(out.len(), usize::from(need_reply));
                    }
                    _ => {
                        if code == req::RESET_OWNER || code == req::RESET_DEVICE { acked = false; log_all = false; fresh = false; }
                        if code == req::GET_VRING_BASE { fresh = false; }
                        prop_assert_eq!(d, Disposition::Forwarded);
                        prop_assert_eq!(out.len(), 1);
                    }
                }
                prop_assert_eq!(p.gate_open(), !log_all || fresh);
            }
        }
    }
}
