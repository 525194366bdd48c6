//! What one user, or anyone who can reach the peer port, may make the agent hold: connections,
//! handshakes in flight, request bytes. Derived once at start from the fd limit (which the
//! agent first raises to its hard limit), so a flood hits a cap long before the agent runs out
//! of fds and cannot open its own connections to listeners. "Security model" in
//! docs/ARCHITECTURE.md says why each exists.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::Semaphore;

/// A local connection that has not registered a process must send each request within this
/// (the CLI and the shim send theirs at once); then it is closed.
pub const IDLE_BEFORE_REGISTER: Duration = Duration::from_secs(10);
/// Once its header arrived, a request's body must arrive within this (also for registered
/// processes: a half-sent body must not hold its memory budget forever).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Request bytes all local connections together may hold while they are being read.
pub const LOCAL_REQUEST_BUDGET: usize = 16 << 20;

pub struct Limits {
    /// fd limit after raising it.
    pub nofile: u64,
    /// Local connections one uid may hold open at once (links, streams, CLI calls).
    pub local_per_uid: usize,
    /// Peer connections accepted but not yet authenticated, at once.
    pub handshakes: Arc<Semaphore>,
    pub handshakes_max: usize,
    /// Request bytes being read on the local socket, all connections together.
    pub request_bytes: Arc<Semaphore>,
    per_uid: Mutex<HashMap<u32, usize>>,
}

static LIMITS: OnceLock<Limits> = OnceLock::new();

/// Raises the soft fd limit to the hard one and derives the caps from it (once, at start).
pub fn init() -> &'static Limits {
    LIMITS.get_or_init(|| {
        let nofile = crate::sys::raise_nofile();
        Limits::for_nofile(nofile)
    })
}

pub fn get() -> &'static Limits {
    init()
}

impl Limits {
    fn for_nofile(nofile: u64) -> Limits {
        let n = nofile.min(usize::MAX as u64) as usize;
        // A quarter of the fds per uid: two users flooding at once still leave the agent half.
        let local_per_uid = (n / 4).max(16);
        let handshakes_max = (n / 16).clamp(4, 64);
        Limits {
            nofile,
            local_per_uid,
            handshakes: Arc::new(Semaphore::new(handshakes_max)),
            handshakes_max,
            request_bytes: Arc::new(Semaphore::new(LOCAL_REQUEST_BUDGET)),
            per_uid: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a new local connection of `uid`; None when the uid is at its cap.
    pub fn local_connection(&'static self, uid: u32) -> Option<UidSlot> {
        let mut m = self.per_uid.lock();
        let n = m.entry(uid).or_insert(0);
        if *n >= self.local_per_uid {
            return None;
        }
        *n += 1;
        Some(UidSlot { limits: self, uid })
    }
}

/// One open local connection of a uid; counted until dropped.
pub struct UidSlot {
    limits: &'static Limits,
    uid: u32,
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut m = self.limits.per_uid.lock();
        if let Some(n) = m.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_at_its_cap_is_refused_until_one_closes() {
        let l: &'static Limits = Box::leak(Box::new(Limits::for_nofile(256)));
        assert_eq!(l.local_per_uid, 64);
        let held: Vec<_> = (0..64).map(|_| l.local_connection(1000).unwrap()).collect();
        assert!(l.local_connection(1000).is_none());
        // Another user is not affected.
        assert!(l.local_connection(1001).is_some());
        drop(held);
        assert!(l.local_connection(1000).is_some());
    }

    #[test]
    fn caps_leave_the_agent_most_of_a_small_fd_limit() {
        let l = Limits::for_nofile(1024);
        assert!(l.local_per_uid + l.handshakes_max < 1024 / 2);
    }
}
