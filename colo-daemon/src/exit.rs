//! [`Exit`]: the exit codes of every colo binary, one meaning each.

use std::process::ExitCode;

/// Why a colo binary exits. A daemon uses `Success` (stopped by SIGINT or SIGTERM), `Failed`
/// (could not start, or stopped on an error) and `Usage`; the operator CLI uses all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: done, or stopped by SIGINT/SIGTERM.
    Success = 0,
    /// 1: failed: a daemon could not start (a port is busy, an image cannot be opened) or
    /// stopped on an error; QEMU refused a command.
    Failed = 1,
    /// 2: bad command line or configuration.
    Usage = 2,
    /// 3: a precondition does not hold (the pair is in the wrong state): nothing was changed.
    Precondition = 3,
    /// 4: QEMU or the relay cannot be reached (connect or timeout).
    Unreachable = 4,
    /// 5: the operation started but did not finish.
    Incomplete = 5,
}

/// The daemons' exit codes, for `--help` texts.
pub const DAEMON_EXIT_CODES: &str = "Exit codes: 0 stopped by SIGINT/SIGTERM, 1 could not start \
(a socket cannot be bound, an image cannot be opened) or stopped on an error, 2 bad command line \
or configuration.";

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}
