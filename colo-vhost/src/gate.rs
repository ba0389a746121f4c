//! The log gate: the device writes guest memory only while it is open (the log-window rule in
//! [`crate::policy`]).

use std::sync::{Arc, Condvar, Mutex};

#[derive(Debug)]
struct State {
    open: bool,
    closed_for_good: bool,
}

/// Shared between the shim (which opens and closes it) and the device's worker thread (which
/// waits on it before touching guest memory). Clones share the gate.
#[derive(Debug, Clone)]
pub struct LogGate {
    inner: Arc<(Mutex<State>, Condvar)>,
}

impl Default for LogGate {
    fn default() -> Self {
        Self::new()
    }
}

impl LogGate {
    /// An open gate.
    pub fn new() -> Self {
        LogGate {
            inner: Arc::new((
                Mutex::new(State {
                    open: true,
                    closed_for_good: false,
                }),
                Condvar::new(),
            )),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Opens or closes the gate.
    pub fn set(&self, open: bool) {
        let mut state = self.lock();
        state.open = open;
        if open {
            self.inner.1.notify_all();
        }
    }

    /// The connection ended: waiters return `false` from now on.
    pub fn shut(&self) {
        self.lock().closed_for_good = true;
        self.inner.1.notify_all();
    }

    /// Whether the gate is open now.
    pub fn is_open(&self) -> bool {
        let state = self.lock();
        state.open && !state.closed_for_good
    }

    /// Blocks until the gate is open (`true`) or shut for good (`false`).
    pub fn wait_open(&self) -> bool {
        let mut state = self.lock();
        loop {
            if state.closed_for_good {
                return false;
            }
            if state.open {
                return true;
            }
            state = self
                .inner
                .1
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiter_is_released_by_open_and_by_shut() {
        let gate = LogGate::new();
        assert!(gate.wait_open());
        gate.set(false);
        assert!(!gate.is_open());
        let g = gate.clone();
        let waiter = std::thread::spawn(move || g.wait_open());
        gate.set(true);
        assert!(waiter.join().unwrap());

        gate.set(false);
        let g = gate.clone();
        let waiter = std::thread::spawn(move || g.wait_open());
        gate.shut();
        assert!(!waiter.join().unwrap());
        assert!(!gate.is_open());
    }
}
