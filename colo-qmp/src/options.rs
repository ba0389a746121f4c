//! Connection tuning knobs.

use std::time::Duration;

/// Options for [`crate::QmpClient`]'s `connect_*` functions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Default per-command timeout (`execute_raw` and every typed call).
    /// Default 10 s: long enough for a loaded host, short enough that a
    /// wedged QEMU is noticed by the failover logic.
    pub command_timeout: Duration,
    /// Bound on connecting, reading the greeting and negotiating
    /// capabilities, all together. Default 5 s.
    pub connect_timeout: Duration,
    /// Enable the `oob` capability when the greeting offers it. Default
    /// true: `yank` must be able to overtake a stuck in-band command.
    pub enable_oob: bool,
    /// Longest accepted line in bytes (without the newline). A longer line
    /// closes the connection because there is no safe way to resynchronise
    /// inside it. Default 16 MiB, far above any real QMP reply.
    pub max_line_bytes: usize,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            command_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            enable_oob: true,
            max_line_bytes: 16 * 1024 * 1024,
        }
    }
}
