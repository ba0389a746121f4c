//! Exit codes, one meaning each, shared by every pair command.

use qmp_driver::config::ConfigError;
use qmp_driver::pair::PairError;
use qmp_driver::qemu_args::QemuArgsError;
use std::process::ExitCode;

/// Exit codes of the pair commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: done (or already done).
    Success = 0,
    /// 1: QEMU refused a command (a QMP error).
    QemuRefused = 1,
    /// 2: bad usage or config.
    Usage = 2,
    /// 3: a precondition does not hold; nothing was changed.
    Precondition = 3,
    /// 4: QEMU or the relay cannot be reached (connect or timeout).
    Unreachable = 4,
    /// 5: the operation started but did not finish.
    Incomplete = 5,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}

impl From<&PairError> for Exit {
    fn from(e: &PairError) -> Exit {
        match e {
            PairError::Unreachable { .. } => Exit::Unreachable,
            PairError::Qmp { .. } if e.is_qemu_refusal() => Exit::QemuRefused,
            PairError::Qmp { .. } => Exit::Unreachable,
            PairError::Precondition { .. } => Exit::Precondition,
            PairError::Incomplete { .. } => Exit::Incomplete,
        }
    }
}

impl From<&ConfigError> for Exit {
    fn from(_: &ConfigError) -> Exit {
        Exit::Usage
    }
}

impl From<&QemuArgsError> for Exit {
    fn from(_: &QemuArgsError) -> Exit {
        Exit::Usage
    }
}

/// The table shown in `--help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success (also when the pair was already in the wanted state)
  1  QEMU refused a command (QMP error)
  2  usage or config error
  3  a precondition does not hold (wrong state): nothing was changed
  4  cannot reach QEMU or the relay (connect or timeout)
  5  the operation started but did not finish (e.g. COLO not entered in time)";
