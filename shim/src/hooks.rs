//! The hook table: every libc function the shim replaces, in one place.
//!
//! Each hook is allocation- and lock-free, never panics, and leaves errno as
//! the real call would. PIDs below `VPID_BASE` are real and pass straight
//! through; vPIDs are resolved through the agent.

use crate::{identity, link, raw};
use libc::{c_int, pid_t};
use pidvirt::{Vpid, VPID_BASE};

/// getpid(): the vPID once registered (from memory: no syscall), else the real PID.
#[no_mangle]
pub extern "C" fn getpid() -> pid_t {
    match identity::vpid() {
        0 => raw::getpid(),
        v => v,
    }
}

/// getppid(): the parent's vPID while that parent (in the cluster) is still our parent.
#[no_mangle]
pub extern "C" fn getppid() -> pid_t {
    let real = raw::getppid();
    identity::parent_vpid_if(real).unwrap_or(real)
}

/// kill(): vPIDs (and -vPID for a process group) are delivered by the agents on
/// whatever node the target runs; real PIDs behave exactly as without the shim.
#[no_mangle]
pub extern "C" fn kill(pid: pid_t, sig: c_int) -> c_int {
    let (target, group) = if pid >= VPID_BASE {
        (pid, false)
    } else if pid <= -VPID_BASE {
        (-pid, true)
    } else {
        return raw::kill(pid, sig);
    };
    // Ourselves: no need to ask anyone (and works before/without an agent).
    if target == identity::vpid() {
        let me = raw::getpid();
        return raw::kill(if group { -me } else { me }, sig);
    }
    let errno = raw::preserving_errno(|| link::kill(Vpid(target), sig, group));
    if errno == 0 {
        0
    } else {
        raw::set_errno(errno);
        -1
    }
}
