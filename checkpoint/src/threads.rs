//! Threads other than the main one (DESIGN §5 step 8).
//!
//! Collect: every thread was seized and interrupted by the freeze; per thread, its registers and
//! xstate, signal mask, private pending signals, name, robust list and rseq (from outside), and
//! what only the thread itself can tell — its sigaltstack and `clear_child_tid` address — by
//! syscalls injected into that thread.
//!
//! Rebuild: after the address space, the fds and the handlers exist, the main thread runs an
//! injected `clone3(CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM)` with `set_tid` = the old tid
//! (`PTRACE_O_TRACECLONE` attaches the new thread); inside the new thread: `set_tid_address`,
//! `set_robust_list`, rseq, sigaltstack, name; then its xstate, registers and mask. The threads
//! stay stopped until the main thread's final step, then all are detached.
//!
//! A main thread that had exited (`pthread_exit` in main; `TaskState::main_exited`): every live
//! thread was collected as a thread, and the rebuilt leader, once they exist, is parked at the
//! entry of its own `exit` ([`park_exiting_leader`]) to leave again as it is detached.

use serde::{Deserialize, Serialize};

use crate::cpu::{self, CpuState};
use crate::error::{pt, Error, Result};
use crate::freeze::Frozen;
use crate::inject::{u64_at, Remote};
use crate::proc::proc_path;
use crate::sys::{self, Pid, RseqConf};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ThreadState {
    pub tid: i32,
    pub comm: String,
    pub cpu: CpuState,
    pub sigmask: u64,
    pub pending: Vec<Vec<u8>>,
    pub altstack: Option<(u64, i32, u64)>,
    pub tid_address: u64,
    pub robust_list: (u64, u64),
    pub rseq: Option<RseqConf>,
    pub affinity: Vec<u64>,
    pub nice: i32,
    /// PR_GET_TIMERSLACK (per thread).
    pub timerslack_ns: u64,
    /// MCE kill policy and speculation controls (see `task::collect_thread_prctls`).
    pub prctls: (u64, Vec<(u64, u64)>),
}

/// Collects every thread but the main one (injection must be prepared on `f`).
pub fn collect(f: &mut Frozen) -> Result<Vec<ThreadState>> {
    let pid = f.pid;
    let mut out = Vec::new();
    for t in f.threads.clone() {
        let tid = t.tid;
        let (mut cpu, _) = cpu::collect(tid, &t.regs)?;
        let (altstack, tid_address, timerslack_ns, prctls) = f.with_thread(tid, |r| {
            r.call("sigaltstack", libc::SYS_sigaltstack, &[0, r.scratch])?;
            let b = r.get(0, 24)?;
            let flags = u64_at(&b, 8) as u32 as i32;
            let alt = (flags & libc::SS_DISABLE == 0).then(|| (u64_at(&b, 0), flags, u64_at(&b, 16)));
            r.call("prctl(PR_GET_TID_ADDRESS)", libc::SYS_prctl, &[libc::PR_GET_TID_ADDRESS as u64, r.scratch])?;
            let tid_address = u64_at(&r.get(0, 8)?, 0);
            let slack =
                r.call("prctl(PR_GET_TIMERSLACK)", libc::SYS_prctl, &[30 /* PR_GET_TIMERSLACK */, 0, 0, 0, 0])?;
            Ok((alt, tid_address, slack, crate::task::collect_thread_prctls(r)?))
        })?;
        let rseq = sys::get_rseq(tid).map_err(pt("PTRACE_GET_RSEQ_CONFIGURATION", tid))?;
        if let Some(rs) = rseq {
            crate::dump::abort_rseq_cs(pid, rs.ptr, &mut cpu.regs);
        }
        out.push(ThreadState {
            tid,
            comm: std::fs::read_to_string(proc_path(pid, &format!("task/{tid}/comm")))
                .unwrap_or_default()
                .trim_end()
                .to_string(),
            cpu,
            sigmask: t.sigmask,
            pending: sys::peek_siginfo(tid, false)
                .map_err(pt("PTRACE_PEEKSIGINFO", tid))?
                .iter()
                .map(|s| s.to_vec())
                .collect(),
            altstack,
            tid_address,
            robust_list: sys::get_robust_list(tid).map_err(pt("get_robust_list", tid))?,
            rseq,
            affinity: sys::get_affinity(tid).map_err(pt("sched_getaffinity", tid))?,
            nice: sys::get_nice(tid).map_err(pt("getpriority", tid))?,
            timerslack_ns,
            prctls,
        });
    }
    Ok(out)
}

const CLONE_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM) as u64;

/// Creates every thread from the main thread `r`, sets its state, and leaves it stopped. The
/// new tids are pushed to `tids` as soon as they exist (to detach at the end, or to collect if
/// the rebuild fails).
pub fn restore(
    r: &Remote,
    threads: &[ThreadState],
    keep_tids: bool,
    task: &crate::task::TaskState,
    tids: &mut Vec<Pid>,
) -> Result<()> {
    for t in threads {
        let stack = r.scratch + (r.scratch_len as u64) / 2;
        let set_tid = r.put(0x100, &(t.tid as u64).to_le_bytes())?;
        let mut new_tid = -1i64;
        for with_tid in [keep_tids, false] {
            let mut args = Vec::with_capacity(88);
            for v in [
                CLONE_FLAGS,
                0,
                0,
                0,
                0, // exit_signal: none for a thread
                stack,
                0x10000,
                0,
                if with_tid { set_tid } else { 0 },
                with_tid as u64,
                0,
            ] {
                args.extend_from_slice(&v.to_le_bytes());
            }
            let a = r.put(0, &args)?;
            new_tid = r.raw(libc::SYS_clone3, &[a, args.len() as u64])?;
            // EEXIST right after the original exited: a thread that exits frees its tid only
            // after it has left its thread group (Linux frees pids once tasklist_lock is
            // dropped), so its parent may already have reaped the process while the number is
            // still taken for a moment. Wait a little (bounded) before settling for a new tid —
            // only while no task has that tid (a live one, e.g. the original of a
            // --leave-running dump, keeps it: no use waiting).
            let mut waited = 0;
            let releasing = || !std::path::Path::new(&format!("/proc/{}", t.tid)).exists();
            while with_tid && new_tid == -(libc::EEXIST as i64) && waited < 100 && releasing() {
                std::thread::sleep(std::time::Duration::from_millis(2));
                waited += 2;
                new_tid = r.raw(libc::SYS_clone3, &[a, args.len() as u64])?;
            }
            if new_tid > 0 || !with_tid {
                break;
            }
        }
        if new_tid <= 0 {
            return Err(Error::Injected {
                pid: r.pid,
                call: format!("clone3 (thread {})", t.tid),
                errno: -new_tid as i32,
                msg: crate::inject::errno_name(-new_tid as i32),
            });
        }
        let tid = new_tid as Pid;
        tids.push(tid);
        // The new thread is attached (PTRACE_O_TRACECLONE) and starts with a stop.
        let st = sys::wait(tid).map_err(pt("waitpid (new thread)", tid))?;
        if !libc::WIFSTOPPED(st) {
            return Err(Error::UnexpectedStop { pid: tid, during: "starting a thread".into(), status: st });
        }
        let base = sys::get_regs(tid).map_err(pt("PTRACE_GETREGS", tid))?;
        let tr =
            Remote { pid: tid, gadget: r.gadget, base, scratch: r.scratch, scratch_len: r.scratch_len, guard: None };
        if t.tid_address != 0 {
            tr.call("set_tid_address", libc::SYS_set_tid_address, &[t.tid_address])?;
        }
        if t.robust_list.0 != 0 {
            tr.call("set_robust_list", libc::SYS_set_robust_list, &[t.robust_list.0, t.robust_list.1])?;
        }
        if let Some(rs) = t.rseq {
            tr.call("rseq (register)", libc::SYS_rseq, &[rs.ptr, rs.len as u64, 0, rs.sig as u64])?;
        }
        if let Some((sp, flags, size)) = t.altstack {
            let mut b = Vec::with_capacity(24);
            b.extend_from_slice(&sp.to_le_bytes());
            b.extend_from_slice(&((flags & !libc::SS_ONSTACK) as u32 as u64).to_le_bytes());
            b.extend_from_slice(&size.to_le_bytes());
            let p = tr.put(0, &b)?;
            tr.call("sigaltstack", libc::SYS_sigaltstack, &[p, 0])?;
        }
        let mut name = t.comm.as_bytes().to_vec();
        name.truncate(15);
        let p = tr.put_cstr(0, &name)?;
        tr.call("prctl(PR_SET_NAME)", libc::SYS_prctl, &[libc::PR_SET_NAME as u64, p])?;
        if t.timerslack_ns != 0 {
            tr.call(
                "prctl(PR_SET_TIMERSLACK)",
                libc::SYS_prctl,
                &[29 /* PR_SET_TIMERSLACK */, t.timerslack_ns, 0, 0, 0],
            )?;
        }
        crate::task::restore_thread_prctls(&tr, t.prctls.0, &t.prctls.1)?;
        for info in &t.pending {
            let sig = u32::from_le_bytes(info[0..4].try_into().unwrap()) as u64;
            // Queued by the thread itself: only then does the kernel accept any si_code.
            let p = tr.put(0, info)?;
            tr.call(
                &format!("rt_tgsigqueueinfo({sig}) to thread {tid}"),
                libc::SYS_rt_tgsigqueueinfo,
                &[r.pid as u64, tid as u64, sig, p],
            )?;
        }
        // Credentials are per thread in the kernel (glibc's setuid broadcasts them): each thread
        // drops to the process's identity itself; the main thread stays root until every
        // thread exists (clone3 with set_tid needs the privilege).
        crate::task::restore_creds(&tr, task)?;
        crate::task::restore_sched(tid, &t.affinity, t.nice)?;
        cpu::restore(tid, &t.cpu)?;
        sys::set_sigmask(tid, t.sigmask).map_err(pt("PTRACE_SETSIGMASK", tid))?;
    }
    Ok(())
}

/// The last step for the main thread of a process whose main thread had exited
/// (`TaskState::main_exited`): stopped at the exit of the restorer's final `munmap` (the
/// gadget is gone with the reserved range), the leader is sent into `exit(0)` — the thread's
/// exit, as `pthread_exit` ends the main thread, never `exit_group` — through a `syscall`
/// instruction of the process's own code, and left stopped at the entry of that call. When it
/// is detached with the others, it exits: a zombie while the other threads run on, and the
/// process's exit status is what its last thread chooses, reported to its parent as before.
/// It registered no tid address, robust list or rseq area, so its exit changes no memory.
pub fn park_exiting_leader(pid: Pid) -> Result<()> {
    let site = syscall_site(pid)?;
    let mut regs = sys::get_regs(pid).map_err(pt("PTRACE_GETREGS", pid))?;
    regs.rax = libc::SYS_exit as u64;
    regs.orig_rax = u64::MAX;
    regs.rdi = 0;
    regs.rip = site;
    regs.eflags &= !(0x100 | 0x400);
    sys::set_regs(pid, &regs).map_err(pt("PTRACE_SETREGS", pid))?;
    sys::cont_syscall(pid).map_err(pt("PTRACE_SYSCALL", pid))?;
    let st = sys::wait(pid).map_err(pt("waitpid", pid))?;
    let at = sys::get_regs(pid).map_err(pt("PTRACE_GETREGS", pid))?;
    if !(libc::WIFSTOPPED(st) && libc::WSTOPSIG(st) == (libc::SIGTRAP | 0x80)) || at.orig_rax != libc::SYS_exit as u64 {
        return Err(Error::UnexpectedStop { pid, during: "sending the main thread into exit".into(), status: st });
    }
    Ok(())
}

/// The address of a `syscall` instruction (0f 05) in an executable mapping of `pid`, the vDSO
/// first (its contents were checked equal to the image's): the CPU decodes from wherever rip
/// points, so any such pair of bytes serves.
fn syscall_site(pid: Pid) -> Result<u64> {
    let maps = crate::proc::maps(pid)?;
    let code = maps.iter().filter(|m| m.perms[0] == b'r' && m.perms[2] == b'x' && m.path != "[vsyscall]");
    for m in code.clone().filter(|m| m.path == "[vdso]").chain(code.filter(|m| m.path != "[vdso]")) {
        let mut at = m.start;
        while at < m.end {
            let len = (m.end - at).min(1 << 20) as usize;
            let mut b = vec![0u8; len];
            let n = sys::vm_read(pid, &mut b, &[(at, len)]).unwrap_or(0);
            if let Some(i) = b[..n].windows(2).position(|w| w == [0x0f, 0x05]) {
                return Ok(at + i as u64);
            }
            if n < 2 {
                break;
            }
            // The next window starts one byte back: a pair may straddle the two.
            at += n as u64 - 1;
        }
    }
    Err(Error::Restore(format!(
        "pid {pid}: no syscall instruction in any executable mapping to end the main thread with"
    )))
}
