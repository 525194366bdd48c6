//! Signals: handlers (raw `rt_sigaction`, both ways: glibc's wrapper rewrites `sa_restorer`),
//! the blocked mask, pending signals of both queues (`PTRACE_PEEKSIGINFO`), the alternate signal
//! stack and the three interval timers.
//!
//! Handlers, altstack and itimers are read by injected syscalls; pending signals are re-queued in
//! the new process by itself (`rt_sigqueueinfo` / `rt_tgsigqueueinfo` to itself keep any si_code)
//! while every signal is blocked; the saved mask is set last, so what is deliverable is delivered
//! once the process runs.

use serde::{Deserialize, Serialize};

use crate::error::{pt, Result};
use crate::inject::{u64_at, Remote};
use crate::sys::{self, Pid};

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SigAction {
    pub sig: u32,
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SignalState {
    /// Every action that is not the default.
    pub actions: Vec<SigAction>,
    pub blocked: u64,
    pub pending_private: Vec<Vec<u8>>,
    pub pending_shared: Vec<Vec<u8>>,
    /// (ss_sp, ss_flags, ss_size) unless disabled.
    pub altstack: Option<(u64, i32, u64)>,
    /// ITIMER_REAL, _VIRTUAL, _PROF: (interval s, interval µs, value s, value µs).
    pub itimers: Vec<[u64; 4]>,
}

/// All signals blocked except SIGTRAP (our `int3` must not reset its disposition: the kernel
/// forces a blocked SIGTRAP back to SIG_DFL).
pub const BLOCK_ALL: u64 = !(1u64 << (libc::SIGTRAP - 1));

pub fn collect(r: &Remote, blocked: u64) -> Result<SignalState> {
    let mut st = SignalState { blocked, ..Default::default() };
    // Only signals whose disposition is not the default need reading (SigCgt: caught, SigIgn:
    // ignored), plus SIGCHLD, whose SA_NOCLDWAIT/SA_NOCLDSTOP matter even with SIG_DFL: a few
    // injected calls instead of 62 (each is two ptrace stops).
    let status = crate::proc::read_string(r.pid, "status")?;
    let mask = |k: &str| crate::proc::field(&status, k).and_then(|v| u64::from_str_radix(v, 16).ok());
    let wanted = match (mask("SigCgt"), mask("SigIgn")) {
        (Some(c), Some(i)) => c | i | 1 << (libc::SIGCHLD - 1),
        _ => !0,
    };
    for sig in 1..=64u64 {
        if sig == libc::SIGKILL as u64 || sig == libc::SIGSTOP as u64 || wanted & (1 << (sig - 1)) == 0 {
            continue;
        }
        r.call(&format!("rt_sigaction({sig})"), libc::SYS_rt_sigaction, &[sig, 0, r.scratch, 8])?;
        let b = r.get(0, 32)?;
        let a = SigAction {
            sig: sig as u32,
            handler: u64_at(&b, 0),
            flags: u64_at(&b, 8),
            restorer: u64_at(&b, 16),
            mask: u64_at(&b, 24),
        };
        if a.handler != 0 || a.flags != 0 || a.mask != 0 {
            st.actions.push(a);
        }
    }
    r.call("sigaltstack", libc::SYS_sigaltstack, &[0, r.scratch])?;
    let b = r.get(0, 24)?;
    let flags = u64_at(&b, 8) as u32 as i32;
    if flags & libc::SS_DISABLE == 0 {
        st.altstack = Some((u64_at(&b, 0), flags, u64_at(&b, 16)));
    }
    for which in 0..3u64 {
        r.call("getitimer", libc::SYS_getitimer, &[which, r.scratch])?;
        let b = r.get(0, 32)?;
        st.itimers.push([u64_at(&b, 0), u64_at(&b, 8), u64_at(&b, 16), u64_at(&b, 24)]);
    }
    Ok(st)
}

/// Pending signals, read once nothing else will be dequeued (after the injections).
pub fn collect_pending(pid: Pid, st: &mut SignalState) -> Result<()> {
    st.pending_private =
        sys::peek_siginfo(pid, false).map_err(pt("PTRACE_PEEKSIGINFO", pid))?.iter().map(|s| s.to_vec()).collect();
    st.pending_shared =
        sys::peek_siginfo(pid, true).map_err(pt("PTRACE_PEEKSIGINFO", pid))?.iter().map(|s| s.to_vec()).collect();
    Ok(())
}

/// Handlers and altstack (early: nothing is delivered while the stub has every signal blocked).
pub fn restore_actions(r: &Remote, st: &SignalState) -> Result<()> {
    for a in &st.actions {
        let mut b = Vec::with_capacity(32);
        for v in [a.handler, a.flags, a.restorer, a.mask] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let p = r.put(0, &b)?;
        r.call(&format!("rt_sigaction({})", a.sig), libc::SYS_rt_sigaction, &[a.sig as u64, p, 0, 8])?;
    }
    if let Some((sp, flags, size)) = st.altstack {
        let mut b = Vec::with_capacity(24);
        b.extend_from_slice(&sp.to_le_bytes());
        b.extend_from_slice(&((flags & !libc::SS_ONSTACK) as u32 as u64).to_le_bytes());
        b.extend_from_slice(&size.to_le_bytes());
        let p = r.put(0, &b)?;
        r.call("sigaltstack", libc::SYS_sigaltstack, &[p, 0])?;
    }
    Ok(())
}

/// Pending signals and itimers (late: just before the registers are set).
pub fn restore_late(r: &Remote, st: &SignalState) -> Result<()> {
    for (shared, q) in [(true, &st.pending_shared), (false, &st.pending_private)] {
        for info in q {
            let sig = u32::from_le_bytes(info[0..4].try_into().unwrap()) as u64;
            let p = r.put(0, info)?;
            if shared {
                r.call(&format!("rt_sigqueueinfo({sig})"), libc::SYS_rt_sigqueueinfo, &[r.pid as u64, sig, p])?;
            } else {
                r.call(
                    &format!("rt_tgsigqueueinfo({sig})"),
                    libc::SYS_rt_tgsigqueueinfo,
                    &[r.pid as u64, r.pid as u64, sig, p],
                )?;
            }
        }
    }
    for (which, t) in st.itimers.iter().enumerate() {
        if t.iter().all(|&v| v == 0) {
            continue;
        }
        let mut b = Vec::with_capacity(32);
        for v in t {
            b.extend_from_slice(&v.to_le_bytes());
        }
        // A timer that was about to fire keeps at least 1 µs (0 would disarm it).
        if t[2] == 0 && t[3] == 0 {
            b[24..32].copy_from_slice(&1u64.to_le_bytes());
        }
        let p = r.put(0, &b)?;
        r.call("setitimer", libc::SYS_setitimer, &[which as u64, p, 0])?;
    }
    Ok(())
}
