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
/// A local caller must read each answer within this, or its connection is closed.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Request bytes all local connections together may hold while they are being read.
pub const LOCAL_REQUEST_BUDGET: usize = 16 << 20;
/// Request bytes the connections of one uid may hold: a user who fills hers waits for her own
/// requests, not everyone's (root's come from its share only, not from the shared budget, so
/// `migrate-cli` as root always gets through).
pub const LOCAL_REQUEST_BUDGET_PER_UID: usize = 4 << 20;

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
    /// Request bytes being read, per uid (an entry per uid that ever connected).
    per_uid_bytes: Mutex<HashMap<u32, Arc<Semaphore>>>,
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
            per_uid_bytes: Mutex::new(HashMap::new()),
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

/// Room for one request body being read; given back when dropped.
pub struct RequestBytes {
    _uid: tokio::sync::OwnedSemaphorePermit,
    _all: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Limits {
    /// Waits until `uid`'s share, then (but for root) the shared budget, has room for `len`
    /// bytes. `len` is at most a request's size, far below either budget.
    pub async fn request_bytes(&self, uid: u32, len: usize) -> RequestBytes {
        let own = self
            .per_uid_bytes
            .lock()
            .entry(uid)
            .or_insert_with(|| Arc::new(Semaphore::new(LOCAL_REQUEST_BUDGET_PER_UID)))
            .clone();
        // Never closed, so acquiring cannot fail.
        let uid_permit = own.acquire_many_owned(len as u32).await.expect("budget semaphores are never closed");
        let all = if uid == 0 {
            None
        } else {
            Some(
                self.request_bytes
                    .clone()
                    .acquire_many_owned(len as u32)
                    .await
                    .expect("budget semaphores are never closed"),
            )
        };
        RequestBytes { _uid: uid_permit, _all: all }
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
    fn a_uid_that_filled_its_request_budget_does_not_block_another() {
        let l: &'static Limits = Box::leak(Box::new(Limits::for_nofile(1024)));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut held = Vec::new();
            for _ in 0..LOCAL_REQUEST_BUDGET_PER_UID / (64 << 10) {
                held.push(l.request_bytes(1000, 64 << 10).await);
            }
            // uid 1000 is at its share: its next request waits...
            let more = tokio::time::timeout(std::time::Duration::from_millis(50), l.request_bytes(1000, 1)).await;
            assert!(more.is_err());
            // ...and neither root nor another user does.
            l.request_bytes(0, 64 << 10).await;
            l.request_bytes(1001, 64 << 10).await;
        });
    }

    #[test]
    fn caps_leave_the_agent_most_of_a_small_fd_limit() {
        let l = Limits::for_nofile(1024);
        assert!(l.local_per_uid + l.handshakes_max < 1024 / 2);
    }
}
