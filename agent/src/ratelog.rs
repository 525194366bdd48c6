//! Rate-limited warnings for what an outsider can trigger at will (bad frames, refused
//! handshakes, connections over a cap): one line per kind every [`INTERVAL`], saying how many
//! were left out, so a flood cannot fill the disk or drown the log.

use parking_lot::Mutex;
use std::time::{Duration, Instant};

pub const INTERVAL: Duration = Duration::from_secs(10);

pub struct RateLog {
    state: Mutex<Option<(Instant, u64)>>,
}

impl RateLog {
    pub const fn new() -> RateLog {
        RateLog { state: Mutex::new(None) }
    }

    /// Whether to log now; if so, also how many were left out since the last line.
    fn admit(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock();
        match &mut *s {
            Some((last, left_out)) if now.duration_since(*last) < INTERVAL => {
                *left_out += 1;
                None
            }
            Some((last, left_out)) => {
                let n = *left_out;
                *last = now;
                *left_out = 0;
                Some(n)
            }
            None => {
                *s = Some((now, 0));
                Some(0)
            }
        }
    }
}

impl Default for RateLog {
    fn default() -> Self {
        Self::new()
    }
}

pub static BAD_LOCAL: RateLog = RateLog::new();
pub static LOCAL_CAP: RateLog = RateLog::new();
pub static LOCAL_IDLE: RateLog = RateLog::new();
pub static BAD_PEER: RateLog = RateLog::new();
pub static KEYLESS_PEER: RateLog = RateLog::new();
pub static PEER_CAP: RateLog = RateLog::new();
pub static LISTENER_CONNECT: RateLog = RateLog::new();
pub static ACCEPT: RateLog = RateLog::new();
pub static REGISTER_REFUSED: RateLog = RateLog::new();
pub static BACKLOG_FULL: RateLog = RateLog::new();
pub static NO_SOCK_DIAG: RateLog = RateLog::new();
pub static RESERVE_LIMIT: RateLog = RateLog::new();

pub fn warn(log: &RateLog, msg: std::fmt::Arguments) {
    match log.admit(Instant::now()) {
        Some(0) => tracing::warn!("{msg}"),
        Some(n) => tracing::warn!("{msg} ({n} more like it in the last {INTERVAL:?} not logged)"),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_counting_the_rest() {
        let log = RateLog::new();
        let t0 = Instant::now();
        assert_eq!(log.admit(t0), Some(0));
        for i in 1..1000 {
            assert_eq!(log.admit(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(log.admit(t0 + INTERVAL), Some(999));
        assert_eq!(log.admit(t0 + INTERVAL), None);
    }
}
