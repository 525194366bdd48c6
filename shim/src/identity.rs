//! The process's virtual identity, held in atomics so hooks read it without
//! locks or syscalls.

use libc::pid_t;
use std::sync::atomic::{AtomicI32, Ordering};

static VPID: AtomicI32 = AtomicI32::new(0);
static PARENT_VPID: AtomicI32 = AtomicI32::new(0);
/// Real PID of the parent at registration: the parent vPID is reported only
/// while getppid() still returns it (after the parent dies, init adopts us).
static PARENT_REAL: AtomicI32 = AtomicI32::new(0);
static LINK_FD: AtomicI32 = AtomicI32::new(-1);

/// Our vPID, or 0 when not registered.
pub fn vpid() -> pid_t {
    VPID.load(Ordering::Relaxed)
}

pub fn parent_vpid_if(real_parent: pid_t) -> Option<pid_t> {
    let v = PARENT_VPID.load(Ordering::Relaxed);
    (v != 0 && PARENT_REAL.load(Ordering::Relaxed) == real_parent).then_some(v)
}

pub fn set(vpid: pid_t, parent_vpid: Option<pid_t>, parent_real: pid_t, link_fd: i32) {
    PARENT_VPID.store(parent_vpid.unwrap_or(0), Ordering::Relaxed);
    PARENT_REAL.store(parent_real, Ordering::Relaxed);
    LINK_FD.store(link_fd, Ordering::Relaxed);
    VPID.store(vpid, Ordering::Release);
}

/// Forgets the identity (fork child before it registers, or no agent).
/// Returns the agent link fd that was held, if any.
pub fn clear() -> Option<i32> {
    VPID.store(0, Ordering::Release);
    PARENT_VPID.store(0, Ordering::Relaxed);
    PARENT_REAL.store(0, Ordering::Relaxed);
    let fd = LINK_FD.swap(-1, Ordering::Relaxed);
    (fd >= 0).then_some(fd)
}
