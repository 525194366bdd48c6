//! The rebuild: a new process from an image.
//!
//! fork (clone3 with `set_tid` = the old pid when free) → `PTRACE_TRACEME` → execve of the stub
//! (see `stub`), then, by syscalls injected into it: a gadget page and a scratch area in the
//! reserved range; the stub's vDSO block parked there; every other stub mapping unmapped; every fd
//! closed; umask/cwd/personality/name; the vDSO block moved onto the image's addresses; SysV
//! segments, semaphore sets and message queues found or created (the sets and queues filled by
//! the process); every VMA mapped (SysV ones attached) and filled; `PR_SET_MM_MAP`;
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
    /// A process tree: replacements for the fds dumped as external in other members than the
    /// root (`DumpOptions::member_external`; `external_fds` are the root's): (the member's pid
    /// in the image, fd in the image, fd of this process). Each member gets its own copy of the
    /// same open file description: members given the same fd share it.
    pub member_external: Vec<(Pid, i32, i32)>,
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
    /// A process tree: every member restored (the root first), zombies included; empty for a
    /// single process.
    pub tree: Vec<Pid>,
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
    crate::sysv::check_sem_msg(&m.sem, &m.msg)?;
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
    let mut laps = Laps::new();
    check(img, opts)?;
    laps.lap("check");
    let mut stub = spawn(img, opts)?;
    laps.lap("spawn");
    let m = &img.manifest;
    task::restore_early(&stub.r, &m.task)?;
    // A shell job stays in the restorer's session and group: the foreground of its terminal.
    if opts.shell_job.is_some() && !crate::ttys::shell_terminal_fds(&m.files).is_empty() {
        stub.notes.push(
            "shell job: the process has the restorer's terminal and runs in its session and process group".into(),
        );
    } else {
        task::restore_session(&stub.r, &m.task)?;
    }
    complete(stub, img, opts, &FromTree::default(), hold, laps)
}

/// What a member of a process tree takes from the members restored before it instead of making
/// its own.
#[derive(Default)]
pub(crate) struct FromTree {
    /// Shared anonymous mappings, by (start, end): the object's path (`/proc/PID/map_files/…`
    /// of a member restored before) and the offset into it.
    pub(crate) maps: std::collections::HashMap<(u64, u64), (std::path::PathBuf, u64)>,
    /// memfds, by inode: the object, opened here from a member restored before.
    pub(crate) memfds: std::collections::HashMap<u64, std::os::fd::OwnedFd>,
    /// Files deleted while open, by inode: the path of the file a member restored before holds.
    pub(crate) ghosts: std::collections::HashMap<u64, std::path::PathBuf>,
    /// SysV segments (ids) a member restored before found or made: attached as they are.
    pub(crate) shm: std::collections::HashSet<i32>,
    /// SysV semaphore sets and message queues (ids) a member restored before found or made.
    pub(crate) sem: std::collections::HashSet<i32>,
    pub(crate) msg: std::collections::HashSet<i32>,
}

/// Phases timed as they end.
pub(crate) struct Laps {
    pub(crate) start: Instant,
    last: Instant,
    pub(crate) phases: Vec<(&'static str, Duration)>,
}
impl Laps {
    pub(crate) fn new() -> Laps {
        let now = Instant::now();
        Laps { start: now, last: now, phases: Vec::new() }
    }
    pub(crate) fn lap(&mut self, n: &'static str) {
        let now = Instant::now();
        self.phases.push((n, now - self.last));
        self.last = now;
    }
}

/// A new process in the restore stub: its own address space emptied but for the gadget page,
/// the scratch area and the parked vDSO block, no fds, every signal blocked, traced by us.
pub(crate) struct Stub {
    child: Child,
    pub(crate) r: Remote,
    same_pid: bool,
    notes: Vec<String>,
}

/// Forks and executes the stub (with the image's pid when free) and empties it.
pub(crate) fn spawn(img: &Image, opts: &RestoreOptions) -> Result<Stub> {
    let m = &img.manifest;
    let elf = sys::memfd_with("dvk-restore", &stub::elf()).map_err(|e| Error::Restore(format!("memfd: {e}")))?;
    let want = if opts.new_pid { None } else { Some(m.pid) };
    let (pid, same_pid) = sys::spawn_traced_stub(&elf, want).map_err(|e| Error::Restore(format!("fork: {e}")))?;
    drop(elf);
    let child = Child { pid, threads: Vec::new(), done: false };
    let st = sys::wait(pid).map_err(pt("waitpid", pid))?;
    if !(libc::WIFSTOPPED(st) && libc::WSTOPSIG(st) == libc::SIGTRAP) {
        return Err(Error::UnexpectedStop { pid, during: "starting the restore stub".into(), status: st });
    }
    sys::set_options(pid, (libc::PTRACE_O_EXITKILL | libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_TRACECLONE) as u64)
        .map_err(pt("PTRACE_SETOPTIONS", pid))?;
    sys::set_sigmask(pid, signals::BLOCK_ALL).map_err(pt("PTRACE_SETSIGMASK", pid))?;
    // Its cgroup first: memory and threads are then charged and created there.
    let notes: Vec<String> = task::restore_cgroup(pid, &m.task).into_iter().collect();
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
    Ok(Stub { child, r, same_pid, notes })
}

/// A child of the stub `parent` (a fork injected there, `clone3` with `set_tid` = `pid` when
/// given, and `exit_signal`): a stub in the same state, traced by us. `pid` must be free;
/// without it the child gets a new pid.
pub(crate) fn fork_stub(parent: &Remote, want: Option<Pid>, exit_signal: i32) -> Result<Stub> {
    // The new child is attached at once and starts in a stop (PTRACE_O_TRACEFORK).
    sys::set_options(
        parent.pid,
        (libc::PTRACE_O_EXITKILL | libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_TRACECLONE | libc::PTRACE_O_TRACEFORK)
            as u64,
    )
    .map_err(pt("PTRACE_SETOPTIONS", parent.pid))?;
    let (set_tid, set_tid_size) = match want {
        Some(pid) => (parent.put(0x100, &(pid as u64).to_le_bytes())?, 1),
        None => (0, 0),
    };
    let mut args = Vec::with_capacity(88);
    for v in [0, 0, 0, 0, exit_signal as u64, 0, 0, 0, set_tid, set_tid_size, 0] {
        args.extend_from_slice(&v.to_le_bytes());
    }
    let a = parent.put(0, &args)?;
    let got = parent.raw(libc::SYS_clone3, &[a, args.len() as u64])?;
    if got <= 0 {
        return Err(Error::Restore(match want {
            Some(pid) => format!(
                "pid {pid} cannot be given again to a process of the tree (fork in pid {}: {}){}",
                parent.pid,
                crate::inject::errno_name(-got as i32),
                if got == -(libc::EEXIST as i64) { "; it is taken here" } else { "" }
            ),
            None => format!(
                "a process of the tree cannot be forked (in pid {}: {})",
                parent.pid,
                crate::inject::errno_name(-got as i32)
            ),
        }));
    }
    let pid = got as Pid;
    let child = Child { pid, threads: Vec::new(), done: false };
    let st = sys::wait(pid).map_err(pt("waitpid (new process)", pid))?;
    if !libc::WIFSTOPPED(st) {
        return Err(Error::UnexpectedStop { pid, during: "starting a process of the tree".into(), status: st });
    }
    let base = sys::get_regs(pid).map_err(pt("PTRACE_GETREGS", pid))?;
    let r = Remote {
        pid,
        gadget: parent.gadget,
        base,
        scratch: parent.scratch,
        scratch_len: parent.scratch_len,
        guard: None,
    };
    Ok(Stub { child, r, same_pid: want.is_some(), notes: Vec::new() })
}

impl Stub {
    /// Ends a stub that stands for a zombie: it exits with the wait status `status` (an exit
    /// code, or death by a signal), and is then collected by us as its tracer only, so it stays
    /// a zombie for its parent to wait for.
    pub(crate) fn die_as(mut self, status: i32) -> Result<()> {
        let pid = self.r.pid;
        let got = if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            // No core file (its flag would be set): the core limit is 0 for it.
            sys::prlimit(pid, libc::RLIMIT_CORE, Some((0, 0))).map_err(pt("prlimit(RLIMIT_CORE)", pid))?;
            sys::set_sigmask(pid, 0).map_err(pt("PTRACE_SETSIGMASK", pid))?;
            sys::kill(pid, sig).map_err(pt("kill", pid))?;
            let (mut st, mut pass) = (0, 0);
            for _ in 0..16 {
                // The signal is reported to us first (signal-delivery-stop), then passed on and
                // delivered; SIGKILL ends it at once (the resume may then find it gone).
                let _ = sys::cont(pid, pass);
                st = sys::wait(pid).map_err(pt("waitpid", pid))?;
                if !libc::WIFSTOPPED(st) {
                    break;
                }
                pass = if libc::WSTOPSIG(st) == sig { sig } else { 0 };
            }
            st
        } else {
            let mut regs = self.r.base;
            regs.rax = libc::SYS_exit_group as u64;
            regs.orig_rax = u64::MAX;
            regs.rip = self.r.gadget;
            regs.rdi = libc::WEXITSTATUS(status) as u64;
            sys::set_regs(pid, &regs).map_err(pt("PTRACE_SETREGS", pid))?;
            sys::cont(pid, 0).map_err(pt("PTRACE_CONT", pid))?;
            sys::wait(pid).map_err(pt("waitpid", pid))?
        };
        self.child.done = true;
        if got & 0xffff != status & 0xffff {
            return Err(Error::Restore(format!(
                "pid {pid} should have ended with wait status {status:#x} (a zombie), it ended with {got:#x}"
            )));
        }
        Ok(())
    }
}

/// The rest of a restore, from a stub whose early task state (cwd, umask, session) is set.
pub(crate) fn complete(
    stub: Stub,
    img: &Image,
    opts: &RestoreOptions,
    from_tree: &FromTree,
    hold: bool,
    mut laps: Laps,
) -> Result<(RestoreReport, Option<Held>)> {
    let m = &img.manifest;
    let Stub { mut child, r, same_pid, notes } = stub;
    let pid = r.pid;
    m.vdso.place(&r, VDSO_TEMP)?;
    laps.lap("layout");

    let above_fds = (m.files.fds.iter().map(|e| e.fd).max().unwrap_or(2) + 1).max(3) as u64;
    let mut memfds = memfd::install(&r, &m.memfds, &img.memfd_data, above_fds, &from_tree.memfds)?;
    ghosts::install(&r, &m.ghosts, &img.ghost_data, above_fds, &mut memfds, &from_tree.ghosts)?;
    let segs: Vec<sysv::ShmSegment> = m.shm.iter().filter(|s| !from_tree.shm.contains(&s.id)).cloned().collect();
    let mut sysv_made = sysv::prepare(&segs, &m.memory, img.pages.bytes(), img.precopy.bytes())?;
    let sems: Vec<sysv::SemSet> = m.sem.iter().filter(|s| !from_tree.sem.contains(&s.id)).cloned().collect();
    let msgs: Vec<sysv::MsgQueue> = m.msg.iter().filter(|q| !from_tree.msg.contains(&q.id)).cloned().collect();
    sysv::prepare_sem_msg(&r, &sems, &msgs, &mut sysv_made)?;
    // Shared anonymous memory of a process of the same tree restored before: opened here.
    let mut alias_fds = std::collections::HashMap::new();
    for (range, (path, off)) in &from_tree.maps {
        let a = r.put_cstr(0, path.as_os_str().as_encoded_bytes())?;
        let fl = (libc::O_RDWR | libc::O_CLOEXEC) as u64;
        let fd = r.call(
            &format!("open {} (shared memory of the tree)", path.display()),
            libc::SYS_openat,
            &[libc::AT_FDCWD as u64, a, fl, 0],
        )?;
        alias_fds.insert(*range, (fd, *off));
    }
    memory::restore(&r, &m.memory, img.pages.bytes(), img.precopy.bytes(), &memfds, opts.lazy_precopy, &alias_fds)?;
    for (fd, _) in alias_fds.values() {
        r.call("close", libc::SYS_close, &[*fd])?;
    }
    let lazy = if opts.lazy_precopy {
        crate::lazy::start(&r, &m.memory, img.precopy.clone(), opts.lazy_paused)?
    } else {
        None
    };
    task::restore_mm(&r, &m.task)?;
    laps.lap("memory");

    files::restore(&r, &m.files, &replacements(m, opts), &memfds)?;
    memfd::close(&r, &memfds)?;
    // Last of the files: closing any fd of a file would drop the POSIX locks on it.
    locks::restore(&r, &m.locks)?;
    laps.lap("files");

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
    laps.lap("signals");

    finish(&r, m, &child.threads, opts.stopped, hold)?;
    // A held process keeps the SysV objects made for it until it is let run (a tree: until
    // every member is complete); they are removed if it is killed instead.
    let sysv_made = if hold {
        Some(sysv_made)
    } else {
        sysv_made.commit()?;
        None
    };
    child.done = true;
    laps.lap("resume");
    let lazy_bytes = lazy.as_ref().map_or(0, |l| l.bytes);
    let total = laps.start.elapsed();
    let report = RestoreReport {
        pid,
        same_pid,
        phases: laps.phases,
        total,
        pages_bytes: m.pages_len,
        notes,
        lazy_bytes,
        tree: Vec::new(),
    };
    if hold {
        let held = Held { pid, threads: std::mem::take(&mut child.threads), done: false, lazy, sysv: sysv_made };
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
    /// SysV objects made for it: kept once it runs, removed if it is killed.
    sysv: Option<sysv::Created>,
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
        let (pid, threads) = (self.pid, self.threads.clone());
        self.resume()?;
        Ok(lazy.map(|l| crate::lazy::Guarded::new(pid, &threads, l)))
    }

    /// Lets the process run (detaches every thread).
    pub fn resume(mut self) -> Result<()> {
        self.commit_sysv()?;
        self.done = true;
        detach_all(self.pid, &self.threads, false)
    }

    /// Lets the process run, or (`stopped`) detaches it into a job-control stop.
    pub(crate) fn release(mut self, stopped: bool) -> Result<()> {
        self.commit_sysv()?;
        self.done = true;
        detach_all(self.pid, &self.threads, stopped)
    }

    fn commit_sysv(&mut self) -> Result<()> {
        self.sysv.take().map_or(Ok(()), sysv::Created::commit)
    }

    /// Reaps its exited child `child` (a `wait4(child, WNOHANG)` injected into it, every
    /// register and its signal mask put back after): true if reaped. For a tree given up:
    /// killed members are reaped by their parents, not left to whoever reaps orphans.
    pub(crate) fn reap_child(&self, child: Pid) -> Result<bool> {
        let pid = self.pid;
        let maps = proc::maps(pid)?;
        let at = crate::dump::gadget_address(pid, &maps)?;
        let saved = crate::inject::read_code(pid, at, crate::inject::RESTORER_LEN)?;
        let sigmask = sys::get_sigmask(pid).map_err(pt("PTRACE_GETSIGMASK", pid))?;
        let base = sys::get_regs(pid).map_err(pt("PTRACE_GETREGS", pid))?;
        let guard = Some(crate::inject::Guard { sigmask, saved });
        let r = Remote { pid, gadget: at, base, scratch: 0, scratch_len: 0, guard };
        let got = r.raw(libc::SYS_wait4, &[child as u64, 0, (libc::WNOHANG | libc::__WALL) as u64, 0])?;
        Ok(got == child as i64)
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
