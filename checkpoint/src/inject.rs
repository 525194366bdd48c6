//! Running system calls inside a stopped tracee.
//!
//! The tracee executes `syscall; int3` at `gadget` with the argument registers we choose
//! (orig_rax = -1 so the kernel never applies a syscall-restart fixup to our registers, TF and DF
//! cleared); we wait for the SIGTRAP of the `int3`, read rax, and the caller eventually puts every
//! register back. A scratch mapping inside the tracee carries in/out structures.

use crate::error::{pt, Error, Result};
use crate::sys::{self, Pid, Regs};

/// The machine code of the gadget: `syscall; int3`.
pub const GADGET: [u8; 3] = [0x0f, 0x05, 0xcc];

pub struct Remote {
    pub pid: Pid,
    pub gadget: u64,
    pub base: Regs,
    pub scratch: u64,
    pub scratch_len: usize,
    /// For a live process (a dump): each call leaves it as it found it.
    pub guard: Option<Guard>,
}

/// How a call into a live process puts it back, so that between two calls nothing of the
/// injection is left in it: if the tracer dies then (the kernel detaches a seized tracee and
/// lets it run), the process runs on from its own registers, with its own signal mask and its
/// own code, and never reaches the gadget.
///
/// Each call patches the gadget over `gadget_word`'s first bytes, blocks every signal but
/// SIGTRAP, runs, then writes back `base`, `sigmask` and `gadget_word`. Only while one call is
/// in flight (microseconds) does the process hold anything of ours.
#[derive(Clone, Copy, Debug)]
pub struct Guard {
    /// The signal mask the thread had when it was stopped.
    pub sigmask: u64,
    /// The original 8 bytes at `gadget`.
    pub gadget_word: u64,
}

impl Guard {
    fn patched_word(&self) -> u64 {
        let mut b = self.gadget_word.to_le_bytes();
        b[..GADGET.len()].copy_from_slice(&GADGET);
        u64::from_le_bytes(b)
    }
}

pub fn errno_name(e: i32) -> String {
    std::io::Error::from_raw_os_error(e).to_string()
}

impl Remote {
    /// Runs one system call; returns rax as a signed value (negative errno on failure).
    pub fn raw(&self, nr: i64, a: &[u64]) -> Result<i64> {
        let Some(g) = self.guard else {
            return self.run(nr, a);
        };
        sys::poke_data(self.pid, self.gadget, g.patched_word()).map_err(pt("PTRACE_POKEDATA", self.pid))?;
        let out = sys::set_sigmask(self.pid, crate::signals::BLOCK_ALL)
            .map_err(pt("PTRACE_SETSIGMASK", self.pid))
            .and_then(|_| self.run(nr, a));
        // Back as it was, whatever happened (each step on its own: one failing must not keep
        // the others from being tried).
        let regs = sys::set_regs(self.pid, &self.base).map_err(pt("PTRACE_SETREGS", self.pid));
        let mask = sys::set_sigmask(self.pid, g.sigmask).map_err(pt("PTRACE_SETSIGMASK", self.pid));
        let code = sys::poke_data(self.pid, self.gadget, g.gadget_word).map_err(pt("PTRACE_POKEDATA", self.pid));
        let v = out?;
        regs?;
        mask?;
        code?;
        Ok(v)
    }

    /// The call itself: registers set for the gadget, run to the `int3`, rax read.
    fn run(&self, nr: i64, a: &[u64]) -> Result<i64> {
        let mut r = self.base;
        r.rax = nr as u64;
        r.orig_rax = u64::MAX;
        r.rip = self.gadget;
        r.eflags &= !(0x100 | 0x400);
        let g = |i: usize| a.get(i).copied().unwrap_or(0);
        r.rdi = g(0);
        r.rsi = g(1);
        r.rdx = g(2);
        r.r10 = g(3);
        r.r8 = g(4);
        r.r9 = g(5);
        sys::set_regs(self.pid, &r).map_err(pt("PTRACE_SETREGS", self.pid))?;
        sys::cont(self.pid, 0).map_err(pt("PTRACE_CONT", self.pid))?;
        let mut st = sys::wait(self.pid).map_err(pt("waitpid", self.pid))?;
        // A process that was in a job-control stop reports its group-stop again first
        // (PTRACE_EVENT_STOP with the stop signal): a tracer may resume it through that.
        for _ in 0..16 {
            // (Also PTRACE_EVENT_CLONE when the injected call made a thread.)
            if !(libc::WIFSTOPPED(st) && st >> 16 != 0) {
                break;
            }
            sys::cont(self.pid, 0).map_err(pt("PTRACE_CONT", self.pid))?;
            st = sys::wait(self.pid).map_err(pt("waitpid", self.pid))?;
        }
        if !(libc::WIFSTOPPED(st) && libc::WSTOPSIG(st) == libc::SIGTRAP) {
            return Err(Error::UnexpectedStop {
                pid: self.pid,
                during: format!("running injected syscall {nr}"),
                status: st,
            });
        }
        let out = sys::get_regs(self.pid).map_err(pt("PTRACE_GETREGS", self.pid))?;
        Ok(out.rax as i64)
    }

    /// Runs one system call; a negative result becomes an error naming `what`.
    pub fn call(&self, what: &str, nr: i64, a: &[u64]) -> Result<u64> {
        let v = self.raw(nr, a)?;
        if (-4095..0).contains(&v) {
            return Err(Error::Injected {
                pid: self.pid,
                call: what.to_string(),
                errno: (-v) as i32,
                msg: errno_name((-v) as i32),
            });
        }
        Ok(v as u64)
    }

    /// Copies `data` into the scratch area at `off`; returns its address in the tracee.
    pub fn put(&self, off: usize, data: &[u8]) -> Result<u64> {
        if off + data.len() > self.scratch_len {
            return Err(Error::Restore(format!("{} bytes do not fit the scratch area", data.len())));
        }
        let addr = self.scratch + off as u64;
        let n = sys::vm_write(self.pid, data, &[(addr, data.len())])
            .map_err(pt("process_vm_writev (scratch)", self.pid))?;
        if n != data.len() {
            return Err(Error::Restore("short write to scratch".into()));
        }
        Ok(addr)
    }

    /// Copies a NUL-terminated path into the scratch area at `off`.
    pub fn put_cstr(&self, off: usize, s: &[u8]) -> Result<u64> {
        let mut v = s.to_vec();
        v.push(0);
        self.put(off, &v)
    }

    pub fn get(&self, off: usize, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let n = sys::vm_read(self.pid, &mut buf, &[(self.scratch + off as u64, len)])
            .map_err(pt("process_vm_readv (scratch)", self.pid))?;
        if n != len {
            return Err(Error::Restore("short read from scratch".into()));
        }
        Ok(buf)
    }
}

pub fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}
