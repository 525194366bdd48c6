//! The rebuild: a new process from an image.
//!
//! fork (clone3 with `set_tid` = the old pid when free) → `PTRACE_TRACEME` → execve of the stub
//! (see `stub`), then, by syscalls injected into it: a gadget page and a scratch area in the
//! reserved range; the stub's vDSO block parked there; every other stub mapping unmapped; every fd
//! closed; umask/cwd/personality/name; the vDSO block moved onto the image's addresses; SysV
//! segments found or created; every VMA mapped (SysV ones attached) and filled; `PR_SET_MM_MAP`;
//! fds; file locks; signal handlers and altstack; set_tid_address, robust list, rseq; pending
//! signals and itimers; threads; POSIX timers; rlimits (from outside); finally the whole
//! reserved range is unmapped by a `munmap` caught at syscall exit, where the saved xstate,
//! registers and signal mask are written, and the process is detached.

use std::time::{Duration, Instant};

use crate::error::{pt, Error, Result};
use crate::image::Image;
use crate::inject::{Remote, GADGET};
use crate::memory::VmaKind;
use crate::stub::{self, GADGET_PAGE, RESERVED_END, SCRATCH, SCRATCH_LEN, STUB_BASE, VDSO_TEMP};
use crate::sys::{self, Pid};
use crate::{cpu, files, ghosts, locks, memfd, memory, proc, signals, sysv, task, threads, timers};

#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Leave the new process in a job-control stop (SIGCONT resumes it).
    pub stopped: bool,
    /// Do not try to reuse the image's pid.
    pub new_pid: bool,
    /// Replacements for the fds dumped as external: (fd in the image, fd of this process). The
    /// new process gets its own copy (pidfd_getfd) of the same open file description.
    pub external_fds: Vec<(i32, i32)>,
    /// Let the process run before its pre-copied pages are in: a thread of the caller copies
    /// them in behind it and serves those it touches first (see `lazy`). The caller must
    /// outlive that copy (an agent, not a command that exits after the restore).
    pub lazy_precopy: bool,
    /// With `lazy_precopy`: serve only the process's faults until `LazyCopy::release` (tests).
    pub lazy_paused: bool,
    /// The restorer's terminal (an fd of this process) for an image dumped as a shell job: it
    /// replaces the job's terminal, and the process joins this process's session and process
    /// group (see `ttys`).
    pub shell_job: Option<i32>,
}

/// The caller's replacement fds, and the terminal for every fd of a shell job's terminal.
fn replacements(m: &crate::image::Manifest, opts: &RestoreOptions) -> Vec<(i32, i32)> {
    let mut v = opts.external_fds.clone();
    if let Some(t) = opts.shell_job {
        v.extend(crate::ttys::shell_terminal_fds(&m.files).into_iter().map(|fd| (fd, t)));
    }
    v
}

#[derive(Clone, Debug, Default)]
pub struct RestoreReport {
    pub pid: Pid,
    pub same_pid: bool,
    pub phases: Vec<(&'static str, Duration)>,
    pub total: Duration,
    pub pages_bytes: u64,
    /// What the restore could not put back as it was but did not refuse for, one line each
    /// (e.g. the image's cgroup does not exist here: the process stays in the restorer's).
    pub notes: Vec<String>,
    /// Pre-copied bytes left to the lazy copy (0: every page was in before the process ran).
    pub lazy_bytes: u64,
}

/// Everything that can be refused before a process exists.
pub fn check(img: &Image, opts: &RestoreOptions) -> Result<()> {
    let m = &img.manifest;
    m.cpu_ident.check_here()?;
    m.vdso.check_here()?;
    for v in &m.memory.vmas {
        if v.start < RESERVED_END && v.end > STUB_BASE {
            return Err(Error::Mismatch {
                what: "address space".into(),
                detail: format!("mapping {} overlaps the restorer's reserved range", v.describe()),
            });
        }
        if let VmaKind::File { path, ident, .. } = &v.kind {
            ident.check(path)?;
        }
    }
    files::prepare(&m.files, &opts.external_fds)?;
    if let Some(&fd) = crate::ttys::shell_terminal_fds(&m.files).first() {
        let Some(t) = opts.shell_job else {
            return Err(Error::Restore(format!(
                "fd {fd} was the terminal of a shell job (dumped with --shell-job): restore it with --shell-job"
            )));
        };
        crate::ttys::prepare_shell_terminal(&m.files, t)?;
    }
    crate::sysv::check(&m.shm)?;
    std::fs::metadata(&m.task.exe)
        .map_err(|e| Error::FileChanged { path: m.task.exe.clone(), detail: format!("executable missing: {e}") })?;
    Ok(())
}

/// The half-built process: killed (and its traced threads collected) if the rebuild fails.
struct Child {
    pid: Pid,
    threads: Vec<Pid>,
    done: bool,
}
impl Drop for Child {
    fn drop(&mut self) {
        if !self.done {
            kill_all(self.pid, &self.threads);
        }
    }
}

pub fn restore(img: &Image, opts: &RestoreOptions) -> Result<RestoreReport> {
    restore_inner(img, opts, false).map(|(r, _)| r)
}

/// [`restore`], but the process is left complete and ptrace-stopped: see [`Held`].
pub fn restore_held(img: &Image, opts: &RestoreOptions) -> Result<(RestoreReport, Held)> {
    let (r, h) = restore_inner(img, opts, true)?;
    Ok((r, h.expect("held")))
}

fn restore_inner(img: &Image, opts: &RestoreOptions, hold: bool) -> Result<(RestoreReport, Option<Held>)> {
    let start = Instant::now();
    let mut last = start;
    let mut phases = Vec::new();
    let mut lap = |n: &'static str| {
        let now = Instant::now();
        phases.push((n, now - last));
        last = now;
    };
    let m = &img.manifest;
    check(img, opts)?;
    lap("check");

    let elf = sys::memfd_with("dvk-restore", &stub::elf()).map_err(|e| Error::Restore(format!("memfd: {e}")))?;
    let want = if opts.new_pid { None } else { Some(m.pid) };
    let (pid, same_pid) = sys::spawn_traced_stub(&elf, want).map_err(|e| Error::Restore(format!("fork: {e}")))?;
    drop(elf);
    let mut child = Child { pid, threads: Vec::new(), done: false };
    let st = sys::wait(pid).map_err(pt("waitpid", pid))?;
    if !(libc::WIFSTOPPED(st) && libc::WSTOPSIG(st) == libc::SIGTRAP) {
        return Err(Error::UnexpectedStop { pid, during: "starting the restore stub".into(), status: st });
    }
    sys::set_options(pid, (libc::PTRACE_O_EXITKILL | libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_TRACECLONE) as u64)
        .map_err(pt("PTRACE_SETOPTIONS", pid))?;
    sys::set_sigmask(pid, signals::BLOCK_ALL).map_err(pt("PTRACE_SETSIGMASK", pid))?;
    // Its cgroup first: memory and threads are then charged and created there.
    let mut notes: Vec<String> = task::restore_cgroup(pid, &m.task).into_iter().collect();
    let base = sys::get_regs(pid).map_err(pt("PTRACE_GETREGS", pid))?;
    let mut r = Remote { pid, gadget: STUB_BASE + stub::ENTRY_OFF, base, scratch: 0, scratch_len: 0, guard: None };
    let rwx = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let fixed = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED) as u64;
    r.call("mmap (gadget)", libc::SYS_mmap, &[GADGET_PAGE, 4096, rwx, fixed, u64::MAX, 0])?;
    sys::vm_write(pid, &GADGET, &[(GADGET_PAGE, GADGET.len())]).map_err(pt("process_vm_writev", pid))?;
    r.gadget = GADGET_PAGE;
    r.call("mmap (scratch)", libc::SYS_mmap, &[SCRATCH, SCRATCH_LEN as u64, rw, fixed, u64::MAX, 0])?;
    r.scratch = SCRATCH;
    r.scratch_len = SCRATCH_LEN;
    lap("spawn");

    // The stub's own address space: park its vDSO block, drop everything else.
    let maps = proc::maps(pid)?;
    m.vdso.park(&r, &maps, VDSO_TEMP)?;
    for l in proc::maps(pid)? {
        let keep = l.path == "[vsyscall]"
            || l.start == GADGET_PAGE
            || l.start == SCRATCH
            || (l.start >= VDSO_TEMP && l.end <= RESERVED_END);
        if !keep {
            r.call(&format!("munmap stub {}", l.range()), libc::SYS_munmap, &[l.start, l.end - l.start])?;
        }
    }
    r.call("close_range", libc::SYS_close_range, &[0, u32::MAX as u64, 0])?;
    task::restore_early(&r, &m.task)?;
    // A shell job stays in the restorer's session and group: the foreground of its terminal.
    let shell_job = opts.shell_job.is_some() && !crate::ttys::shell_terminal_fds(&m.files).is_empty();
    if shell_job {
        notes.push(
            "shell job: the process has the restorer's terminal and runs in its session and process group".into(),
        );
    } else {
        task::restore_session(&r, &m.task)?;
    }
    m.vdso.place(&r, VDSO_TEMP)?;
    lap("layout");

    let above_fds = (m.files.fds.iter().map(|e| e.fd).max().unwrap_or(2) + 1).max(3) as u64;
    let mut memfds = memfd::install(&r, &m.memfds, &img.memfd_data, above_fds)?;
    ghosts::install(&r, &m.ghosts, &img.ghost_data, above_fds, &mut memfds)?;
    let shm = sysv::prepare(&m.shm, &m.memory, img.pages.bytes(), img.precopy.bytes())?;
    memory::restore(&r, &m.memory, img.pages.bytes(), img.precopy.bytes(), &memfds, opts.lazy_precopy)?;
    let lazy = if opts.lazy_precopy {
        crate::lazy::start(&r, &m.memory, img.precopy.clone(), opts.lazy_paused)?
    } else {
        None
    };
    task::restore_mm(&r, &m.task)?;
    lap("memory");

    files::restore(&r, &m.files, &replacements(m, opts), &memfds)?;
    memfd::close(&r, &memfds)?;
    // Last of the files: closing any fd of a file would drop the POSIX locks on it.
    locks::restore(&r, &m.locks)?;
    lap("files");

    signals::restore_actions(&r, &m.signals)?;
    task::restore_thread(&r, &m.task)?;
    signals::restore_late(&r, &m.signals)?;
    task::restore_attrs(&r, &m.task)?;
    threads::restore(&r, &m.threads, !opts.new_pid && same_pid, &m.task, &mut child.threads)?;
    let tid_of = |old: Pid| {
        if old == m.pid {
            return pid;
        }
        m.threads.iter().position(|t| t.tid == old).and_then(|i| child.threads.get(i).copied()).unwrap_or(old)
    };
    timers::restore(&r, &m.posix_timers, &tid_of)?;
    task::restore_rlimits(pid, &m.task)?;
    task::restore_sched(pid, &m.task.affinity, m.task.nice)?;
    task::restore_oom(pid, &m.task)?;
    task::restore_creds(&r, &m.task)?;
    task::restore_last(&r, &m.task)?;
    lap("signals");

    finish(&r, m, &child.threads, opts.stopped, hold)?;
    shm.commit()?;
    child.done = true;
    lap("resume");
    let lazy_bytes = lazy.as_ref().map_or(0, |l| l.bytes);
    let report =
        RestoreReport { pid, same_pid, phases, total: start.elapsed(), pages_bytes: m.pages_len, notes, lazy_bytes };
    if hold {
        let held = Held { pid, threads: std::mem::take(&mut child.threads), done: false, lazy };
        return Ok((report, Some(held)));
    }
    // Only a held restore hands the copy to its caller; this caller gets a process that has
    // every page by the time it returns.
    if let Some(l) = lazy {
        l.release();
        l.wait();
    }
    Ok((report, None))
}

/// Unmaps the reserved range from inside (the gadget goes with it, so the `munmap` is caught at
/// syscall exit), writes the final CPU state and signal mask there, and detaches.
fn finish(r: &Remote, m: &crate::image::Manifest, threads: &[Pid], stopped: bool, hold: bool) -> Result<()> {
    let pid = r.pid;
    let mut regs = r.base;
    regs.rax = libc::SYS_munmap as u64;
    regs.orig_rax = u64::MAX;
    regs.rip = GADGET_PAGE;
    regs.rdi = STUB_BASE;
    regs.rsi = RESERVED_END - STUB_BASE;
    regs.eflags &= !(0x100 | 0x400);
    sys::set_regs(pid, &regs).map_err(pt("PTRACE_SETREGS", pid))?;
    for stage in ["entry", "exit"] {
        sys::cont_syscall(pid).map_err(pt("PTRACE_SYSCALL", pid))?;
        let st = sys::wait(pid).map_err(pt("waitpid", pid))?;
        if !(libc::WIFSTOPPED(st) && libc::WSTOPSIG(st) == (libc::SIGTRAP | 0x80)) {
            return Err(Error::UnexpectedStop { pid, during: format!("final munmap ({stage})"), status: st });
        }
    }
    let ret = sys::get_regs(pid).map_err(pt("PTRACE_GETREGS", pid))?.rax as i64;
    if ret != 0 {
        return Err(Error::Injected {
            pid,
            call: "munmap (restorer)".into(),
            errno: -ret as i32,
            msg: crate::inject::errno_name(-ret as i32),
        });
    }
    if m.task.main_exited {
        // The main thread had exited: it exits again, as it is detached (the threads carry on).
        threads::park_exiting_leader(pid)?;
    } else {
        cpu::restore(pid, &m.cpu)?;
        sys::set_sigmask(pid, m.signals.blocked).map_err(pt("PTRACE_SETSIGMASK", pid))?;
    }
    if hold {
        return Ok(());
    }
    detach_all(pid, threads, stopped)
}

fn detach_all(pid: Pid, threads: &[Pid], stopped: bool) -> Result<()> {
    for &t in threads {
        sys::detach(t, if stopped { libc::SIGSTOP } else { 0 }).map_err(pt("PTRACE_DETACH", t))?;
    }
    sys::detach(pid, if stopped { libc::SIGSTOP } else { 0 }).map_err(pt("PTRACE_DETACH", pid))
}

/// A restored process kept in a ptrace stop, complete but not yet running — invisible to it
/// and to its parent, unlike SIGSTOP (the commit point of a move). Only the thread that
/// restored it may resume or kill it. Dropped without either, it is killed (a rolled-back move).
pub struct Held {
    pid: Pid,
    threads: Vec<Pid>,
    done: bool,
    lazy: Option<crate::lazy::LazyCopy>,
}

impl Held {
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The thread still copying pre-copied pages in (a lazy restore), for the caller to keep
    /// an eye on; it ends by itself once the process has them all, or is gone.
    pub fn take_lazy(&mut self) -> Option<crate::lazy::LazyCopy> {
        self.lazy.take()
    }

    /// Lets the process run; with a lazy copy still running, under its guard (see
    /// [`crate::lazy::Guarded`]), which the caller must `finish`.
    pub fn resume_guarded(mut self) -> Result<Option<crate::lazy::Guarded>> {
        let lazy = self.lazy.take();
        let pid = self.pid;
        self.resume()?;
        Ok(lazy.map(|l| crate::lazy::Guarded::new(pid, l)))
    }

    /// Lets the process run (detaches every thread).
    pub fn resume(mut self) -> Result<()> {
        self.done = true;
        detach_all(self.pid, &self.threads, false)
    }

    /// Kills the held process and collects its threads.
    pub fn kill(mut self) -> Result<()> {
        self.done = true;
        kill_all(self.pid, &self.threads);
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.done {
            kill_all(self.pid, &self.threads);
        }
    }
}

fn kill_all(pid: Pid, threads: &[Pid]) {
    let _ = sys::kill(pid, libc::SIGKILL);
    for t in threads.iter().chain([&pid]) {
        let _ = sys::wait(*t);
    }
}
