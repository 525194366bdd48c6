//! Freeze and thaw: `PTRACE_SEIZE` + `PTRACE_INTERRUPT` (never SIGSTOP, which the parent would see
//! as a job-control stop), and the syscall-restart fixup of DESIGN §5.
//!
//! A [`Frozen`] process can run injected system calls (for what /proc cannot tell). Thawing puts
//! every register, the signal mask and the patched gadget bytes back and detaches; the kernel then
//! restarts an interrupted system call exactly as it would have without us.

use crate::error::{pt, Error, Result};
use crate::inject::{Guard, Remote};
use crate::sys::{self, Pid, Regs};

const PTRACE_EVENT_STOP: i32 = 128;
const DUMP_SCRATCH: usize = 64 * 1024;

pub struct Frozen {
    pub pid: Pid,
    /// The thread the dump calls into: the main thread, or — when the main thread has exited
    /// (`leader_exited`) — the live thread with the lowest tid.
    pub main: Pid,
    /// Registers of `main` exactly as stopped (before any restart fixup).
    pub regs: Regs,
    pub sigmask: u64,
    /// The other threads, stopped the same way; with `leader_exited`, every live thread
    /// (`main` too: each is carried as a thread, the leader is made again only to exit).
    pub threads: Vec<ThreadStop>,
    /// The main thread called `pthread_exit` while other threads run on: the leader is a zombie
    /// (it cannot be seized), /proc is read through `main` meanwhile (see `proc::proc_path`).
    pub leader_exited: bool,
    remote: Option<Remote>,
    finished: bool,
    _through: Option<crate::proc::ReadThrough>,
}

#[derive(Clone, Copy, Debug)]
pub struct ThreadStop {
    pub tid: Pid,
    pub regs: Regs,
    pub sigmask: u64,
}

fn tasks(pid: Pid) -> Result<Vec<Pid>> {
    let d = crate::proc::proc_path(pid, "task");
    let mut v: Vec<Pid> = std::fs::read_dir(&d)
        .map_err(|source| Error::NoProcess { pid, err: source })?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// Seizes and interrupts one thread; returns its registers and mask once it stopped for us.
fn stop_one(tid: Pid) -> Result<ThreadStop> {
    sys::seize(tid, libc::PTRACE_O_TRACESYSGOOD as u64).map_err(pt("PTRACE_SEIZE", tid))?;
    sys::interrupt(tid).map_err(pt("PTRACE_INTERRUPT", tid))?;
    for _ in 0..1000 {
        let st = sys::wait(tid).map_err(pt("waitpid", tid))?;
        if libc::WIFEXITED(st) || libc::WIFSIGNALED(st) {
            return Err(Error::UnexpectedStop { pid: tid, during: "freezing (exited)".into(), status: st });
        }
        if !libc::WIFSTOPPED(st) {
            continue;
        }
        if st >> 16 == PTRACE_EVENT_STOP {
            let regs = sys::get_regs(tid).map_err(pt("PTRACE_GETREGS", tid))?;
            let sigmask = sys::get_sigmask(tid).map_err(pt("PTRACE_GETSIGMASK", tid))?;
            return Ok(ThreadStop { tid, regs, sigmask });
        }
        // A signal-delivery-stop: let the signal through and keep waiting for our stop.
        let sig = libc::WSTOPSIG(st);
        let pass = if sig == libc::SIGTRAP || (sig & 0x80) != 0 { 0 } else { sig };
        sys::cont(tid, pass).map_err(pt("PTRACE_CONT", tid))?;
    }
    Err(Error::UnexpectedStop { pid: tid, during: "freezing (no stop after 1000 events)".into(), status: 0 })
}

/// The registers a resumed copy must start with: an interrupted system call is restarted the way
/// the kernel restarts it (`-ERESTARTSYS/-ERESTARTNOINTR/-ERESTARTNOHAND` → run it again;
/// `-ERESTART_RESTARTBLOCK` → `-EINTR`, as the restart block is kernel state we cannot carry).
pub fn restart_fixup(r: &Regs) -> Regs {
    let mut o = *r;
    if (r.orig_rax as i64) >= 0 {
        match r.rax as i64 {
            // -ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND
            -514..=-512 => {
                o.rax = r.orig_rax;
                o.rip = r.rip - 2;
            }
            -516 => o.rax = (-libc::EINTR) as i64 as u64,
            _ => {}
        }
    }
    o.orig_rax = u64::MAX;
    o
}

impl Frozen {
    /// Seizes every thread of `pid` and stops it with PTRACE_INTERRUPT (the thread list is read
    /// again until no new thread appeared). Signals that arrive meanwhile are delivered
    /// normally (passed through), never lost.
    pub fn freeze(pid: Pid) -> Result<Frozen> {
        // A zombie leader (pthread_exit in main) cannot be seized: only its live threads are.
        let leader_exited = crate::proc::exited_leader(pid)?.is_some();
        let mut stopped: Vec<ThreadStop> = Vec::new();
        let undo = |stopped: &[ThreadStop]| {
            for t in stopped {
                let _ = sys::detach(t.tid, 0);
            }
        };
        for _round in 0..100 {
            let all = tasks(pid)?;
            let new: Vec<Pid> = all
                .into_iter()
                .filter(|&t| (t != pid || !leader_exited) && stopped.iter().all(|s| s.tid != t))
                .collect();
            if new.is_empty() {
                break;
            }
            for tid in new {
                match stop_one(tid) {
                    Ok(t) => stopped.push(t),
                    // A thread that exited meanwhile (a server ending a worker thread) is simply
                    // not there any more; the next listing shows who is.
                    Err(_) if tid != pid && !crate::proc::proc_path(pid, &format!("task/{tid}")).exists() => {
                        let _ = sys::detach(tid, 0);
                    }
                    Err(e) => {
                        let _ = sys::detach(tid, 0);
                        undo(&stopped);
                        return Err(e);
                    }
                }
            }
        }
        // The thread calls are injected into: the main one, or when it has exited the first live
        // one (which stays among `threads`, and through which /proc is read).
        let (main, through) = if leader_exited {
            let Some(main) = stopped.first().copied() else {
                return Err(Error::Unsupported { pid, what: "a process whose threads have all exited".into() });
            };
            (main, Some(crate::proc::ReadThrough::new(pid, main.tid)))
        } else {
            let Some(i) = stopped.iter().position(|t| t.tid == pid) else {
                undo(&stopped);
                return Err(Error::Unsupported { pid, what: "a process whose main thread has exited".into() });
            };
            (stopped.remove(i), None)
        };
        Ok(Frozen {
            pid,
            main: main.tid,
            regs: main.regs,
            sigmask: main.sigmask,
            threads: stopped,
            leader_exited,
            remote: None,
            finished: false,
            _through: through,
        })
    }

    /// The stopped threads to put back and detach: the other threads, then the main one (its
    /// registers in `regs`) unless it has exited (then it is one of `threads`).
    fn all_stops(&self) -> Vec<ThreadStop> {
        let mut v = self.threads.clone();
        if !self.leader_exited {
            v.push(ThreadStop { tid: self.pid, regs: self.regs, sigmask: self.sigmask });
        }
        v
    }

    /// Runs `f` with an injector on thread `tid` (another thread than the main one); each call
    /// leaves the thread as it found it (see [`Guard`]).
    pub fn with_thread<T>(&mut self, tid: Pid, f: impl FnOnce(&Remote) -> Result<T>) -> Result<T> {
        let t = *self
            .threads
            .iter()
            .find(|t| t.tid == tid)
            .ok_or_else(|| Error::Restore(format!("no frozen thread {tid}")))?;
        let main = self.remote.as_ref().ok_or_else(|| Error::Restore("injection not prepared".into()))?;
        let r = Remote {
            pid: tid,
            gadget: main.gadget,
            base: t.regs,
            scratch: main.scratch,
            scratch_len: main.scratch_len,
            guard: main.guard.as_ref().map(|g| Guard { sigmask: t.sigmask, saved: g.saved.clone() }),
        };
        let out = f(&r);
        sys::set_regs(tid, &t.regs).map_err(pt("PTRACE_SETREGS", tid))?;
        sys::set_sigmask(tid, t.sigmask).map_err(pt("PTRACE_SETSIGMASK", tid))?;
        out
    }

    /// Prepares syscall injection: a gadget at `gadget_at` (the vDSO's ELF header, never
    /// executed) and a scratch mapping. The gadget is written, and every signal blocked, only
    /// for the duration of each call, and the gadget restores the process by itself if this
    /// tracer dies during one ([`Guard`]): a SIGKILLed dumper leaves the process running as it
    /// was, with a scratch mapping more at worst (and, dead during a call, the gadget bytes in
    /// the vDSO's ELF header).
    pub fn remote(&mut self, gadget_at: u64) -> Result<&Remote> {
        if self.remote.is_none() {
            let pid = self.main;
            let saved = crate::inject::read_code(pid, gadget_at, crate::inject::RESTORER_LEN)?;
            let guard = Some(Guard { sigmask: self.sigmask, saved });
            let mut r = Remote { pid, gadget: gadget_at, base: self.regs, scratch: 0, scratch_len: 0, guard };
            let p = r.call(
                "mmap (scratch)",
                libc::SYS_mmap,
                &[
                    0,
                    DUMP_SCRATCH as u64,
                    (libc::PROT_READ | libc::PROT_WRITE) as u64,
                    (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                    u64::MAX,
                    0,
                ],
            )?;
            r.scratch = p;
            r.scratch_len = DUMP_SCRATCH;
            self.remote = Some(r);
        }
        Ok(self.remote.as_ref().unwrap())
    }

    /// Removes the injection helpers (scratch mapping, gadget bytes, all-blocked mask): the
    /// process is frozen exactly as it was stopped, and can be collected again.
    pub fn end_injection(&mut self) -> Result<()> {
        self.undo_injection()?;
        sys::set_sigmask(self.main, self.sigmask).map_err(pt("PTRACE_SETSIGMASK", self.main))?;
        sys::set_regs(self.main, &self.regs).map_err(pt("PTRACE_SETREGS", self.main))
    }

    fn undo_injection(&mut self) -> Result<()> {
        if let Some(r) = self.remote.take() {
            if r.scratch != 0 {
                r.call("munmap (scratch)", libc::SYS_munmap, &[r.scratch, r.scratch_len as u64])?;
            }
        }
        Ok(())
    }

    /// With `on`, the frozen process is killed if this tracer exits before it is thawed
    /// (`PTRACE_O_EXITKILL`): a move's source sets it once a copy may resume elsewhere, so a
    /// crash of the source can never leave two copies running.
    pub fn set_exit_kill(&mut self, on: bool) -> Result<()> {
        let mut opts = libc::PTRACE_O_TRACESYSGOOD as u64;
        if on {
            opts |= libc::PTRACE_O_EXITKILL as u64;
        }
        for tid in self.all_stops().iter().map(|t| t.tid) {
            sys::set_options(tid, opts).map_err(pt("PTRACE_SETOPTIONS", tid))?;
        }
        Ok(())
    }

    /// Puts everything back and lets the process run on (`stop`: detach into a job-control stop).
    pub fn thaw(mut self, stop: bool) -> Result<()> {
        self.finished = true;
        self.undo_injection()?;
        let all = self.all_stops();
        for (i, t) in all.iter().enumerate() {
            sys::set_regs(t.tid, &t.regs).map_err(pt("PTRACE_SETREGS", t.tid))?;
            sys::set_sigmask(t.tid, t.sigmask).map_err(pt("PTRACE_SETSIGMASK", t.tid))?;
            // The job-control stop with the last one (a signal to the process, not the thread).
            let sig = if stop && i + 1 == all.len() { libc::SIGSTOP } else { 0 };
            sys::detach(t.tid, sig).map_err(pt("PTRACE_DETACH", t.tid))?;
        }
        Ok(())
    }

    /// Kills the frozen process (after a successful dump) and collects its ptrace exit report.
    /// If the caller is also its parent, this reaps it.
    pub fn kill(mut self) -> Result<()> {
        self.finished = true;
        let pid = self.pid;
        sys::kill(pid, libc::SIGKILL).map_err(pt("kill", pid))?;
        // Collect every traced thread's exit, the main thread (reported last) at the end.
        for tid in self.threads.iter().map(|t| t.tid).chain([pid]) {
            for _ in 0..100 {
                match sys::wait(tid) {
                    Ok(st) if libc::WIFEXITED(st) || libc::WIFSIGNALED(st) => break,
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
        Ok(())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.finished {
            // Best effort: an error path must leave the process running as it was.
            let _ = self.undo_injection();
            for t in self.all_stops() {
                let _ = sys::set_regs(t.tid, &t.regs);
                let _ = sys::set_sigmask(t.tid, t.sigmask);
                let _ = sys::detach(t.tid, 0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(rax: i64, orig: i64, rip: u64) -> Regs {
        Regs { rax: rax as u64, orig_rax: orig as u64, rip, ..Default::default() }
    }

    #[test]
    fn restartable_syscalls_are_rerun() {
        for code in [-512, -513, -514] {
            let o = restart_fixup(&regs(code, 0, 0x1002));
            assert_eq!((o.rax, o.rip, o.orig_rax), (0, 0x1000, u64::MAX));
        }
    }

    #[test]
    fn restart_block_becomes_eintr() {
        let o = restart_fixup(&regs(-516, 230, 0x1002));
        assert_eq!(o.rax as i64, -(libc::EINTR as i64));
        assert_eq!(o.rip, 0x1002);
    }

    #[test]
    fn finished_syscalls_and_user_code_are_untouched() {
        let o = restart_fixup(&regs(-11, 0, 0x1002));
        assert_eq!((o.rax as i64, o.rip), (-11, 0x1002));
        let o = restart_fixup(&regs(-512, -1, 0x1002));
        assert_eq!((o.rax as i64, o.rip), (-512, 0x1002));
    }
}
