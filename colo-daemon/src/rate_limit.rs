//! [`RateLimited`]: a warning that may fire per packet or per request, logged at most once per
//! interval with the count of the ones it stood for.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets one log line through per `interval` and counts the rest, so a hostile client or a
/// flood of bad packets costs a line a second, not a line a packet.
///
/// ```
/// use colo_daemon::RateLimited;
/// use std::time::Duration;
///
/// static BAD_FRAME: RateLimited = RateLimited::new(Duration::from_secs(1));
/// for _ in 0..1000 {
///     if let Some(suppressed) = BAD_FRAME.allow() {
///         tracing::warn!(suppressed, "dropped a frame that is not Ethernet");
///     }
/// }
/// ```
#[derive(Debug)]
pub struct RateLimited {
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    /// At most one line per `interval`.
    pub const fn new(interval: Duration) -> RateLimited {
        RateLimited {
            interval,
            state: Mutex::new(State {
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` when this occurrence may be logged, `n` being how many were held back since
    /// the last line; `None` when it is to be dropped (and counted).
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        // A poisoned lock only means a panic elsewhere while counting: the count stays usable.
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                s.suppressed += 1;
                None
            }
            _ => {
                s.last = Some(now);
                Some(std::mem::take(&mut s.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_of_the_rest() {
        let limit = RateLimited::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(limit.allow_at(t0), Some(0));
        for ms in [1, 10, 999] {
            assert_eq!(limit.allow_at(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(limit.allow_at(t0 + Duration::from_secs(1)), Some(3));
        assert_eq!(limit.allow_at(t0 + Duration::from_millis(1500)), None);
        assert_eq!(limit.allow_at(t0 + Duration::from_secs(5)), Some(1));
    }
}
