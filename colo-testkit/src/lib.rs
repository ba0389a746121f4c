//! What colo's tests share, and nothing ships: a dev-dependency only.
//!
//! * [`fake_qmp`]: the one fake QMP server of every test.
//! * [`qemu`]: the real QEMU of the `qemu` tier (its binary, a paused VM with a QMP monitor).

pub mod fake_qmp;
pub mod qemu;
