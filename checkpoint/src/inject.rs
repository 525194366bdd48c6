//! Running system calls inside a stopped tracee.
//!
//! The tracee executes `syscall; int3` at `gadget` with the argument registers we choose
//! (orig_rax = -1 so the kernel never applies a syscall-restart fixup to our registers, TF and DF
//! cleared); we wait for the SIGTRAP of the `int3`, read rax, and the caller eventually puts every
//! register back. A scratch mapping inside the tracee carries in/out structures.
//!
//! A live process (a dump) is called into differently, so that a tracer that dies at any moment
//! leaves it running as it was: see [`Guard`].

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

/// How a call into a live process leaves it safe at every moment, even if the tracer is
/// SIGKILLed half-way (the kernel then detaches a seized tracee and lets it run).
///
/// Between calls the process holds nothing of ours: its own registers, signal mask and code,
/// in a ptrace stop from which the kernel resumes it as from the freeze (restarting an
/// interrupted system call). During a call, the gadget is not `syscall; int3` (an `int3`
/// without a tracer is a fatal SIGTRAP) but `syscall` followed by a *restorer*: code that puts
/// the thread's signal mask and every general register back and jumps to where it was (as
/// the kernel would resume it). With the tracer there, the thread never runs it: the tracer
/// stops it at the exit of the injected call (PTRACE_SYSCALL), reads the result and puts the
/// registers back itself. Without the tracer it runs on into the restorer and from there its
/// own code. The gadget bytes are written for each call and the original bytes put back
/// after: if the tracer dies in between, they stay (the vDSO's ELF header, which the process
/// does not execute) and nothing else does.
#[derive(Clone, Debug)]
pub struct Guard {
    /// The signal mask the thread had when it was stopped.
    pub sigmask: u64,
    /// The original bytes at `gadget` ([`RESTORER_LEN`] of them).
    pub saved: Vec<u8>,
}

/// Bytes of the guarded gadget: `syscall`, then the restorer.
pub const RESTORER_LEN: usize = 2 + 27 + 10 + 19 + 15 * 10 + 14 + 8;

/// Where the kernel would resume a thread stopped with `r` (no signal delivered): an interrupted
/// system call is restarted (`-ERESTART_RESTARTBLOCK`: through restart_syscall), as on the way
/// out of a ptrace stop.
pub fn resume_point(r: &Regs) -> Regs {
    let mut o = *r;
    if (r.orig_rax as i64) >= 0 {
        match r.rax as i64 {
            // -ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND
            -514..=-512 => {
                o.rax = r.orig_rax;
                o.rip = r.rip - 2;
            }
            // -ERESTART_RESTARTBLOCK
            -516 => {
                o.rax = libc::SYS_restart_syscall as u64;
                o.rip = r.rip - 2;
            }
            _ => {}
        }
    }
    o
}

/// The guarded gadget for a thread stopped with `base` and signal mask `mask`: `syscall`, then
/// rt_sigprocmask(SIG_SETMASK, &mask), every general register and the flags from
/// [`resume_point`]`(base)`, and a jump to its rip. Position-independent.
pub fn guarded_gadget(base: &Regs, mask: u64) -> Vec<u8> {
    let to = resume_point(base);
    let mut c = Vec::with_capacity(RESTORER_LEN);
    c.extend_from_slice(&[0x0f, 0x05]); // syscall (the injected call)
                                        // rt_sigprocmask(SIG_SETMASK, &mask, NULL, 8)
    c.extend_from_slice(&[0xb8, 14, 0, 0, 0]); // mov eax, 14
    c.extend_from_slice(&[0xbf, 2, 0, 0, 0]); // mov edi, SIG_SETMASK
    let lea_end = c.len() + 7;
    let mask_at = RESTORER_LEN - 8;
    c.extend_from_slice(&[0x48, 0x8d, 0x35]); // lea rsi, [rip + disp32]
    c.extend_from_slice(&((mask_at - lea_end) as i32).to_le_bytes());
    c.extend_from_slice(&[0x31, 0xd2]); // xor edx, edx
    c.extend_from_slice(&[0x41, 0xba, 8, 0, 0, 0]); // mov r10d, 8
    c.extend_from_slice(&[0x0f, 0x05]); // syscall
                                        // The flags, through the thread's own stack below its red zone.
    c.extend_from_slice(&[0x48, 0xbc]); // movabs rsp, imm64
    c.extend_from_slice(&to.rsp.to_le_bytes());
    c.extend_from_slice(&[0x48, 0x8d, 0x64, 0x24, 0x80]); // lea rsp, [rsp - 128]
    c.push(0x68); // push imm32 (sign-extended: user rflags fit in 31 bits)
    c.extend_from_slice(&((to.eflags & 0x7fff_ffff) as u32).to_le_bytes());
    c.push(0x9d); // popfq
    c.extend_from_slice(&[0x48, 0x8d, 0xa4, 0x24, 0x80, 0, 0, 0]); // lea rsp, [rsp + 128]
                                                                   // movabs for every register but rsp; neither mov nor lea touches the flags.
    let regs: [(u8, u8, u64); 15] = [
        (0x48, 0xbb, to.rbx),
        (0x48, 0xb9, to.rcx),
        (0x48, 0xba, to.rdx),
        (0x48, 0xbe, to.rsi),
        (0x48, 0xbf, to.rdi),
        (0x48, 0xbd, to.rbp),
        (0x49, 0xb8, to.r8),
        (0x49, 0xb9, to.r9),
        (0x49, 0xba, to.r10),
        (0x49, 0xbb, to.r11),
        (0x49, 0xbc, to.r12),
        (0x49, 0xbd, to.r13),
        (0x49, 0xbe, to.r14),
        (0x49, 0xbf, to.r15),
        (0x48, 0xb8, to.rax),
    ];
    for (rex, op, v) in regs {
        c.extend_from_slice(&[rex, op]);
        c.extend_from_slice(&v.to_le_bytes());
    }
    c.extend_from_slice(&[0xff, 0x25, 0, 0, 0, 0]); // jmp [rip + 0]
    c.extend_from_slice(&to.rip.to_le_bytes());
    c.extend_from_slice(&mask.to_le_bytes());
    assert_eq!(c.len(), RESTORER_LEN, "the restorer's layout");
    c
}

/// Writes `code` at `addr` in `pid` through /proc/<pid>/mem (which, unlike
/// process_vm_writev, writes read-only mappings such as the vDSO, as a debugger does).
pub fn write_code(pid: Pid, addr: u64, code: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let path = crate::proc::proc_path(pid, "mem");
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).map_err(crate::error::io_at(&path))?;
    f.write_all_at(code, addr).map_err(crate::error::io_at(&path))
}

/// Reads `len` bytes at `addr` in `pid` through /proc/<pid>/mem.
pub fn read_code(pid: Pid, addr: u64, len: usize) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let path = crate::proc::proc_path(pid, "mem");
    let f = std::fs::File::open(&path).map_err(crate::error::io_at(&path))?;
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, addr).map_err(crate::error::io_at(&path))?;
    Ok(b)
}

/// Guarded calls made by this process so far (numbers them for [`die_here_if_asked`]).
static GUARDED_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Test hook: with `DVK_TEST_DUMPER_DIES=N:S` in its environment, the dumper SIGKILLs itself at
/// step S (0 to 6, see run_guarded) of its guarded call number N (from 0): the end-to-end tests
/// prove a dumper that dies at any point of a call leaves the process running as it was.
fn die_here_if_asked(call: usize, step: u8) {
    static ASKED: std::sync::OnceLock<Option<(usize, u8)>> = std::sync::OnceLock::new();
    let asked = ASKED.get_or_init(|| {
        let v = std::env::var("DVK_TEST_DUMPER_DIES").ok()?;
        let (n, s) = v.split_once(':')?;
        Some((n.parse().ok()?, s.parse().ok()?))
    });
    if *asked == Some((call, step)) {
        let _ = sys::kill(std::process::id() as Pid, libc::SIGKILL);
    }
}

pub fn errno_name(e: i32) -> String {
    std::io::Error::from_raw_os_error(e).to_string()
}

impl Remote {
    /// Runs one system call; returns rax as a signed value (negative errno on failure).
    pub fn raw(&self, nr: i64, a: &[u64]) -> Result<i64> {
        match &self.guard {
            None => self.run(nr, a),
            Some(g) => self.run_guarded(g, nr, a),
        }
    }

    /// The registers that run system call `nr` with arguments `a` at the gadget.
    fn call_regs(&self, nr: i64, a: &[u64]) -> Regs {
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
        r
    }

    /// One call into a live process (see [`Guard`]). The order of the steps is what keeps it
    /// safe at every point: the restorer is in place before the registers point at it, and
    /// the mask and registers are back before the restorer is taken away.
    fn run_guarded(&self, g: &Guard, nr: i64, a: &[u64]) -> Result<i64> {
        let pid = self.pid;
        let call = GUARDED_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let step = |n: u8| die_here_if_asked(call, n);
        write_code(pid, self.gadget, &guarded_gadget(&self.base, g.sigmask))?;
        step(0);
        let ran = sys::set_regs(pid, &self.call_regs(nr, a))
            .map_err(pt("PTRACE_SETREGS", pid))
            .inspect(|_| step(1))
            .and_then(|_| sys::set_sigmask(pid, crate::signals::BLOCK_ALL).map_err(pt("PTRACE_SETSIGMASK", pid)))
            .inspect(|_| step(2))
            .and_then(|_| self.to_syscall_stop(nr, "entry"))
            .inspect(|_| step(3))
            .and_then(|_| self.to_syscall_stop(nr, "exit"))
            .inspect(|_| step(4))
            .and_then(|_| sys::get_regs(pid).map_err(pt("PTRACE_GETREGS", pid)));
        // Back as it was, each step tried whatever happened before it. Stopped at the exit of
        // the call (or wherever it failed), with `base` the thread resumes as from the freeze.
        let mask = sys::set_sigmask(pid, g.sigmask).map_err(pt("PTRACE_SETSIGMASK", pid));
        step(5);
        let regs = sys::set_regs(pid, &self.base).map_err(pt("PTRACE_SETREGS", pid));
        step(6);
        let code = write_code(pid, self.gadget, &g.saved);
        let out = ran?;
        mask?;
        regs?;
        code?;
        Ok(out.rax as i64)
    }

    /// Resumes to the next syscall stop (PTRACE_SYSCALL), passing over ptrace events (a
    /// job-control stop reported again); `which` names it in an error.
    fn to_syscall_stop(&self, nr: i64, which: &str) -> Result<()> {
        let pid = self.pid;
        for _ in 0..16 {
            sys::cont_syscall(pid).map_err(pt("PTRACE_SYSCALL", pid))?;
            let st = sys::wait(pid).map_err(pt("waitpid", pid))?;
            if libc::WIFSTOPPED(st) && libc::WSTOPSIG(st) == libc::SIGTRAP | 0x80 {
                return Ok(());
            }
            if !(libc::WIFSTOPPED(st) && st >> 16 != 0) {
                return Err(Error::UnexpectedStop {
                    pid,
                    during: format!("running injected syscall {nr} (to its {which})"),
                    status: st,
                });
            }
        }
        Err(Error::UnexpectedStop { pid, during: format!("running injected syscall {nr} (to its {which})"), status: 0 })
    }

    /// The call in a process of our own (the restore stub): run to the `int3`, rax read.
    fn run(&self, nr: i64, a: &[u64]) -> Result<i64> {
        let r = self.call_regs(nr, a);
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

    /// `openat(AT_FDCWD, path, flags)` in the process (the path goes to the scratch area).
    pub fn open(&self, path: &str, flags: i32) -> Result<u64> {
        let p = self.put_cstr(0, path.as_bytes())?;
        self.call(&format!("open {path}"), libc::SYS_openat, &[libc::AT_FDCWD as u64, p, flags as u64, 0])
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_restorer_resumes_where_the_kernel_would() {
        let base = Regs {
            rax: (-512i64) as u64,
            orig_rax: 7,
            rip: 0x1002,
            rsp: 0x7ffd_0000,
            eflags: 0x246,
            rbx: 0x1111_2222_3333_4444,
            r15: 0xdead_beef,
            ..Default::default()
        };
        let code = guarded_gadget(&base, 0x8000);
        assert_eq!(code.len(), RESTORER_LEN);
        assert_eq!(&code[..2], &[0x0f, 0x05]);
        // The interrupted call is restarted: rax = its number, rip back on its `syscall`.
        let find = |op: [u8; 2]| code.windows(2).position(|w| w == op).unwrap() + 2;
        let at = find([0x48, 0xb8]);
        assert_eq!(u64::from_le_bytes(code[at..at + 8].try_into().unwrap()), 7);
        let at = find([0x48, 0xbb]);
        assert_eq!(u64::from_le_bytes(code[at..at + 8].try_into().unwrap()), 0x1111_2222_3333_4444);
        let at = find([0xff, 0x25]) + 4;
        assert_eq!(u64::from_le_bytes(code[at..at + 8].try_into().unwrap()), 0x1000);
        // lea rsi, [rip + disp] points at the mask, the last 8 bytes.
        let lea = code.windows(3).position(|w| w == [0x48, 0x8d, 0x35]).unwrap();
        let disp = i32::from_le_bytes(code[lea + 3..lea + 7].try_into().unwrap()) as usize;
        assert_eq!(lea + 7 + disp, RESTORER_LEN - 8);
        assert_eq!(u64::from_le_bytes(code[RESTORER_LEN - 8..].try_into().unwrap()), 0x8000);
    }

    #[test]
    fn a_restart_block_call_resumes_through_restart_syscall() {
        let r = Regs { rax: (-516i64) as u64, orig_rax: 35, rip: 0x2002, ..Default::default() };
        let o = resume_point(&r);
        assert_eq!((o.rax, o.rip), (libc::SYS_restart_syscall as u64, 0x2000));
        let user = Regs { rax: 5, orig_rax: u64::MAX, rip: 0x3000, ..Default::default() };
        assert_eq!(resume_point(&user).rip, 0x3000);
    }
}
