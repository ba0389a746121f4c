//! How the pair commands' errors map onto colo-daemon's [`Exit`] codes (one meaning each,
//! shared by every colo binary).

pub use colo_daemon::Exit;
use qmp_driver::pair::PairError;

/// The exit code of a failed pair command.
pub fn for_pair_error(e: &PairError) -> Exit {
    match e {
        PairError::Unreachable { .. } => Exit::Unreachable,
        PairError::Qmp { .. } if e.is_qemu_refusal() => Exit::Failed,
        PairError::Qmp { .. } => Exit::Unreachable,
        PairError::Precondition { .. } => Exit::Precondition,
        PairError::Incomplete { .. } => Exit::Incomplete,
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
