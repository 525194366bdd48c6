//! The dump pipeline: check → freeze → collect (registers, files, memory, injected queries) →
//! write the manifest → kill / thaw. Any failure after the freeze thaws the process (the
//! [`Frozen`] guard puts everything back), so a refused dump leaves it running as it was.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::freeze::Frozen;
use crate::image::{self, Manifest, PageSink};
use crate::precopy::Precopy;
use crate::sys::{self, Pid};
use crate::{cpu, files, ghosts, locks, memfd, memory, proc, signals, sysv, task, threads, timers, vdso};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AfterDump {
    /// Kill the process once the image is complete (a move).
    #[default]
    Kill,
    /// Detach into a job-control stop (SIGSTOP); SIGCONT resumes it.
    LeaveStopped,
    /// Let it run on (a snapshot).
    LeaveRunning,
}

#[derive(Clone, Debug, Default)]
pub struct DumpOptions {
    /// fds not to inspect: recorded as external, replaced by the caller at restore (the dvk
    /// agent link and virtual sockets).
    pub external_fds: Vec<i32>,
    /// Send page data there instead of writing pages.img (the other files are still written).
    pub pages_to: Option<image::PagesTo>,
    /// Pages pre-copied while the process ran: those not written since stay out of the
    /// dump (the image refers to the pre-copy store for them).
    pub precopy: Option<PrecopyRef>,
    /// Asked between the steps of a dump (after the freeze, between collection phases, before
    /// the final kill): `true` stops it with [`Error::Interrupted`], the process put back as it
    /// was and running. `migrate-cli dump` answers whether a stop signal (SIGINT, SIGTERM,
    /// SIGHUP, SIGQUIT), blocked for the duration of the dump, is pending.
    pub interrupted: Option<fn() -> bool>,
    /// A job of an interactive shell: its fds on its controlling terminal are recorded as the
    /// shell job's terminal, which the restorer's replaces (`RestoreOptions::shell_job`).
    pub shell_job: bool,
    /// Take the whole process tree under the pid (see `tree`): every descendant is dumped with
    /// it. Without it, a process with children is refused (a move carries one process).
    pub tree: bool,
    /// Processes dumped together with this one (set by the tree dump for each member: the
    /// others): a FIFO or a locked open file description shared with them is not refused.
    pub allies: Vec<Pid>,
    /// Shared anonymous mappings, by (start, end), whose memory another member of the tree
    /// stores (its owner's image): recorded without page data.
    pub borrowed_maps: Vec<(u64, u64)>,
    /// SysV semaphore sets and message queues (ids) another member of the tree stores: not
    /// stored again (it makes them at restore).
    pub borrowed_sems: Vec<i32>,
    pub borrowed_msgs: Vec<i32>,
    /// A process tree: fds of other members than the root not to inspect either, by member
    /// pid (`external_fds` are the root's): recorded as external in that member's image, left
    /// out of what the members share, replaced at restore by `RestoreOptions::member_external`
    /// (a listening socket a pre-fork server's workers inherited, carried by the caller).
    pub member_external: std::collections::HashMap<Pid, Vec<i32>>,
}

/// The fds not judged as files: the caller's, and a shell job's terminal.
fn unjudged_fds(pid: Pid, opts: &DumpOptions) -> Vec<i32> {
    let mut v = opts.external_fds.clone();
    if opts.shell_job {
        v.extend(crate::ttys::ctty_fds(pid));
    }
    v
}

/// A shared [`Precopy`] tracker for [`DumpOptions`].
#[derive(Clone)]
pub struct PrecopyRef(pub std::sync::Arc<std::sync::Mutex<Precopy>>);

impl std::fmt::Debug for PrecopyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrecopyRef(..)")
    }
}

/// Err([`Error::Interrupted`]) if the caller asked the dump to stop.
pub(crate) fn check_interrupted(pid: Pid, opts: &DumpOptions) -> Result<()> {
    match opts.interrupted {
        Some(asked) if asked() => Err(Error::Interrupted { pid }),
        _ => Ok(()),
    }
}

#[derive(Clone, Debug, Default)]
pub struct DumpReport {
    pub pid: Pid,
    /// (phase, duration) in order.
    pub phases: Vec<(&'static str, Duration)>,
    /// From the freeze until the process was killed or resumed.
    pub frozen: Duration,
    pub total: Duration,
    pub pages_bytes: u64,
    pub manifest_bytes: u64,
    pub vmas: usize,
    pub fds: usize,
    /// Pre-copy rounds before the freeze (empty without pre-copy).
    pub precopy: Vec<crate::precopy::Round>,
    /// Bytes the image refers to in the pre-copy store instead of holding them.
    pub precopied_bytes: u64,
    /// A process tree: every member dumped (the root first, parents before children), zombies
    /// included; empty for a single process.
    pub tree: Vec<Pid>,
}

/// Refuses what cannot be moved, without touching the process: the first of [`blockers`].
pub fn preflight(pid: Pid, opts: &DumpOptions) -> Result<()> {
    match blockers(pid, opts)?.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Every reason `pid` cannot be dumped, each printable as one line, without touching the
/// process (from /proc, sock_diag and `pidfd_getfd` copies): mappings, fds (with the
/// processes at the other end of pipes and sockets named), working directory, executable,
/// seccomp, a tracer, children, POSIX timers on clocks that cannot follow, SysV semaphore undo
/// state and message queues that cannot be read. The fds in `opts.external_fds` are not judged.
/// `Err` only when the process cannot be read at all.
pub fn blockers(pid: Pid, opts: &DumpOptions) -> Result<Vec<Error>> {
    if opts.tree && crate::tree::has_children(pid) {
        return crate::tree::blockers(pid, opts);
    }
    process_blockers(pid, opts, false)
}

/// [`blockers`] of one process; `in_tree`: its children are dumped with it (not a blocker).
pub(crate) fn process_blockers(pid: Pid, opts: &DumpOptions, in_tree: bool) -> Result<Vec<Error>> {
    // A thread-group leader that exited (pthread_exit in main) while other threads run on: its
    // /proc entries (maps, fds) are gone, the process is judged through a live thread.
    let _through = proc::ReadThrough::if_leader_exited(pid)?;
    let status = proc::read_string(pid, "status")?;
    let maps = proc::maps(pid)?;
    let mut flags = proc::vm_flags(pid)?;
    if opts.precopy.is_some() {
        crate::precopy::drop_own_marks(&maps, &mut flags);
    }
    let mut v = memory::blockers(&maps, &flags);
    v.extend(sysv::blockers(pid, &maps));
    // Mappings of deleted files: carried when small enough (their fds are judged in files).
    for m in &maps {
        if let Some(path) = ghosts::deleted_path(&m.path) {
            let src = proc::proc_path(pid, &format!("map_files/{:x}-{:x}", m.start, m.end));
            if let Err(why) = ghosts::judge(&src, path) {
                v.push(Error::UnsupportedMapping { range: m.range(), what: m.path.clone(), why });
            }
        }
    }
    v.extend(files::blockers_with(pid, &unjudged_fds(pid, opts), &opts.allies)?);
    if opts.shell_job {
        v.extend(crate::ttys::shell_job_blockers(pid));
    }
    v.extend(task::blockers(pid)?);
    // Another tracer (a debugger, strace): the freeze (PTRACE_SEIZE) would fail.
    if let Some(t) = proc::field(&status, "TracerPid").and_then(|v| v.parse::<Pid>().ok()) {
        if t != 0 && t != std::process::id() as Pid {
            v.push(Error::Unsupported {
                pid,
                what: format!("a process traced by {} (a debugger or strace)", named(&[t])),
            });
        }
    }
    // Children would be left behind (re-parented) and the copy's wait() would fail: refuse.
    let mut children: Vec<Pid> = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(proc::proc_path(pid, "task")) {
        for t in tasks.flatten() {
            if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                children.extend(c.split_whitespace().filter_map(|x| x.parse::<Pid>().ok()));
            }
        }
    }
    if !children.is_empty() && !in_tree {
        v.push(Error::Unsupported {
            pid,
            what: format!(
                "a process with children ({}): process trees are dumped or moved whole, from their root \
                 (`migrate-cli dump`, or `move` of the root alone), not as one process",
                named(&children)
            ),
        });
    }
    // POSIX timers on clocks that cannot follow (the overrun count is judged at collection).
    v.extend(timers::blockers(pid)?);
    Ok(v)
}

/// "pid 4242 (python3)", "pids 4242 (python3), 4243 (sh)".
pub(crate) fn named(pids: &[Pid]) -> String {
    let h: Vec<(Pid, String)> = pids
        .iter()
        .map(|&p| {
            let c = std::fs::read_to_string(proc::proc_path(p, "comm")).unwrap_or_default();
            (p, c.trim_end().to_string())
        })
        .collect();
    files::name_holders(&h)
}

pub(crate) struct Clock {
    pub(crate) last: Instant,
    pub(crate) phases: Vec<(&'static str, Duration)>,
}
impl Clock {
    pub(crate) fn lap(&mut self, name: &'static str) {
        let now = Instant::now();
        self.phases.push((name, now - self.last));
        self.last = now;
    }
}

/// Dumps `pid` into `dir` (created 0700; files 0600).
pub fn dump(pid: Pid, dir: &Path, after: AfterDump) -> Result<DumpReport> {
    dump_with(pid, dir, after, &DumpOptions::default())
}

/// [`dump`] with options.
pub fn dump_with(pid: Pid, dir: &Path, after: AfterDump, opts: &DumpOptions) -> Result<DumpReport> {
    if opts.tree && crate::tree::has_children(pid) {
        return crate::tree::dump(pid, dir, after, opts);
    }
    let start = Instant::now();
    let mut clk = Clock { last: start, phases: Vec::new() };
    preflight(pid, opts)?;
    image::create_dir(dir)?;
    if opts.precopy.is_none() {
        // A pre-copy store of an earlier dump here is not this image's.
        let _ = std::fs::remove_file(dir.join(crate::precopy::PRECOPY));
    }
    clk.lap("check");

    let frozen_at = Instant::now();
    let mut f = Frozen::freeze(pid)?;
    clk.lap("freeze");

    let mut rep = write_image_timed(&mut f, dir, opts, &mut clk)?;
    // The last moment to change our mind: the image is complete but nothing is killed yet.
    if let Err(e) = check_interrupted(pid, opts) {
        remove_image(dir);
        return Err(e); // `f` thaws the process as it is dropped
    }

    // Frozen time: until the image is complete (kill) or the process runs again (thaw).
    let mut frozen = frozen_at.elapsed();
    match after {
        AfterDump::Kill => f.kill()?,
        AfterDump::LeaveRunning => f.thaw(false)?,
        AfterDump::LeaveStopped => f.thaw(true)?,
    }
    if after != AfterDump::Kill {
        frozen = frozen_at.elapsed();
    }
    clk.lap(match after {
        AfterDump::Kill => "kill",
        _ => "thaw",
    });
    rep.phases = clk.phases;
    rep.frozen = frozen;
    rep.total = start.elapsed();
    Ok(rep)
}

/// [`dump_with`] after pre-copy rounds while the process runs (see [`crate::precopy`]): the
/// process is frozen briefly to start tracking, then its memory is copied into
/// `dir/precopy.img` round after round under `policy`, and the final dump writes only the
/// pages written since the last round. Refuses (naming why) where pre-copy cannot run; the
/// caller may then dump without it.
pub fn dump_precopy(
    pid: Pid,
    dir: &Path,
    after: AfterDump,
    opts: &DumpOptions,
    policy: &crate::precopy::Policy,
) -> Result<DumpReport> {
    if opts.tree && crate::tree::has_children(pid) {
        return Err(Error::Unsupported { pid, what: "pre-copy of a process tree (not yet)".into() });
    }
    let start = Instant::now();
    let mut clk = Clock { last: start, phases: Vec::new() };
    preflight(pid, opts)?;
    image::create_dir(dir)?;
    let mut f = Frozen::freeze(pid)?;
    let started = Precopy::start(&mut f);
    f.thaw(false)?;
    let mut pc = started?;
    clk.lap("track");
    let store = dir.join(crate::precopy::PRECOPY);
    // A store left by an earlier pre-copy dump into this directory (image files are created
    // O_EXCL).
    let _ = std::fs::remove_file(&store);
    let rounds = (|| {
        let out = image::file_out(&store)?;
        while pc.wants_another(policy) {
            // The process runs meanwhile: stopping here leaves nothing to put back.
            check_interrupted(pid, opts)?;
            pc.round(&out)?;
        }
        Ok(())
    })();
    if let Err(e) = rounds {
        let _ = std::fs::remove_file(&store);
        return Err(e);
    }
    clk.lap("precopy");
    let rounds = pc.rounds.clone();
    let opts =
        DumpOptions { precopy: Some(PrecopyRef(std::sync::Arc::new(std::sync::Mutex::new(pc)))), ..opts.clone() };
    let mut rep = match dump_with(pid, dir, after, &opts) {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&store);
            return Err(e);
        }
    };
    clk.phases.append(&mut rep.phases);
    rep.phases = clk.phases;
    rep.precopy = rounds;
    rep.total = start.elapsed();
    Ok(rep)
}

/// Collects and writes the image of a process that is already frozen, and leaves it frozen:
/// for a caller that decides later whether to kill or thaw it (the agent during a move). On an
/// error the partial image files are removed and the process is still frozen.
pub fn write_image(f: &mut Frozen, dir: &Path, opts: &DumpOptions) -> Result<DumpReport> {
    image::create_dir(dir)?;
    let start = Instant::now();
    let mut clk = Clock { last: start, phases: Vec::new() };
    let mut rep = write_image_timed(f, dir, opts, &mut clk)?;
    rep.phases = clk.phases;
    rep.total = start.elapsed();
    Ok(rep)
}

fn write_image_timed(f: &mut Frozen, dir: &Path, opts: &DumpOptions, clk: &mut Clock) -> Result<DumpReport> {
    let (manifest, pages_len) = match collect_all(f, dir, opts, clk) {
        Ok(v) => v,
        Err(e) => {
            remove_image(dir);
            return Err(e);
        }
    };
    let manifest_bytes = image::write_manifest(dir, &manifest)?;
    clk.lap("write");
    Ok(DumpReport {
        pid: f.pid,
        pages_bytes: pages_len,
        manifest_bytes,
        vmas: manifest.memory.vmas.len(),
        precopied_bytes: manifest.memory.precopied_bytes(),
        fds: manifest.files.fds.len(),
        ..Default::default()
    })
}

/// Removes the image files a dump wrote into `dir` (a dump that failed or was interrupted).
pub(crate) fn remove_image(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(image::PAGES));
    let _ = std::fs::remove_file(dir.join(image::MANIFEST));
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("memfd-") || name.starts_with("ghost-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Everything but the final manifest write, from a frozen process.
fn collect_all(f: &mut Frozen, dir: &Path, opts: &DumpOptions, clk: &mut Clock) -> Result<(Manifest, u64)> {
    let pid = f.pid;
    check_interrupted(pid, opts)?;
    let maps = proc::maps(pid)?;
    let vdso = vdso::collect(&maps);
    let (mut cpu, cpu_ident) = cpu::collect(f.main, &f.regs)?;
    let mut files = files::collect_with(pid, &unjudged_fds(pid, opts), &opts.allies)?;
    crate::ttys::capture(pid, &mut files)?;
    if opts.shell_job {
        crate::ttys::shell_terminals(pid, &mut files, &crate::ttys::ctty_fds(pid))?;
    }
    let locks = locks::collect(pid, &files)?;
    clk.lap("collect");

    let mut sink = match &opts.pages_to {
        Some(out) => PageSink::to(dir, out.clone()),
        None => PageSink::create(dir)?,
    };
    let precopy = opts.precopy.as_ref().map(|p| p.0.lock().unwrap_or_else(|e| e.into_inner()));
    let memory = memory::collect(pid, &maps, &mut sink, precopy.as_deref(), &opts.borrowed_maps)?;
    let precopy_len = precopy.as_ref().map_or(0, |p| p.store_len());
    drop(precopy);
    let memfds = memfd::collect(pid, &files, &memory, dir)?;
    let shm = sysv::collect(&maps)?;
    let (sem, msg) = sysv::collect_sem_msg(pid, &opts.borrowed_sems, &opts.borrowed_msgs)?;
    let ghosts = ghosts::collect(pid, &files, &memory, dir)?;
    clk.lap("pages");
    check_interrupted(pid, opts)?;

    let gadget_at = gadget_address(pid, &maps)?;
    let sigmask = f.sigmask;
    let r = f.remote(gadget_at)?;
    let mut sig = signals::collect(r, sigmask)?;
    let task = task::collect(r)?;
    if let Some(e) = task::pdeathsig_refusal(pid, &task, &opts.allies) {
        return Err(e);
    }
    let posix_timers = timers::collect(r)?;
    signals::collect_pending(f.main, &mut sig)?;
    if f.leader_exited {
        // The main thread's own state is gone with it; `main`'s is carried as its thread's.
        sig.pending_private.clear();
        sig.altstack = None;
    }
    let threads = threads::collect(f)?;
    f.end_injection()?;
    check_interrupted(pid, opts)?;
    if let Some(rs) = task.rseq {
        abort_rseq_cs(pid, rs.ptr, &mut cpu.regs);
    }
    clk.lap("inject");

    let comm = task.comm.clone();
    let m = Manifest {
        pid,
        comm,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
        cpu_ident,
        vdso,
        cpu,
        memory,
        files,
        locks,
        signals: sig,
        task,
        threads,
        shm,
        sem,
        msg,
        memfds,
        pages_len: sink.len(),
        precopy_len,
        posix_timers,
        ghosts,
    };
    Ok((m, sink.len()))
}

/// Where injected syscalls run: see [`gadget_site`] (in the vDSO, or the first executable
/// mapping).
pub(crate) fn gadget_address(pid: Pid, maps: &[proc::MapLine]) -> Result<u64> {
    maps.iter()
        .find(|m| m.path == "[vdso]")
        .or_else(|| maps.iter().find(|m| m.perms[2] == b'x' && m.path != "[vsyscall]"))
        .map(|m| gadget_site(pid, m.start, m.end))
        .ok_or_else(|| Error::Unsupported { pid, what: "process without executable mappings".into() })
}

/// Where in the executable ELF image at `start..end` (the vDSO) the injection gadget goes: over
/// its section header table, which nothing reads at run time (the loader and unwinders use the
/// ELF and program headers), so that gadget bytes a dumper killed during a call leaves behind
/// (inject::Guard) harm nobody; else at `start`.
fn gadget_site(pid: Pid, start: u64, end: u64) -> u64 {
    let mut h = [0u8; 64];
    if sys::vm_read(pid, &mut h, &[(start, 64)]).ok() != Some(64) || &h[..4] != b"\x7fELF" {
        return start;
    }
    let shoff = u64::from_le_bytes(h[40..48].try_into().unwrap());
    let shentsize = u16::from_le_bytes(h[58..60].try_into().unwrap()) as u64;
    let shnum = u16::from_le_bytes(h[60..62].try_into().unwrap()) as u64;
    let need = crate::inject::RESTORER_LEN as u64;
    match start.checked_add(shoff) {
        Some(at) if shoff >= 64 && shentsize * shnum >= need && at.checked_add(need).is_some_and(|e| e <= end) => at,
        _ => start,
    }
}

/// If the process stopped inside an rseq critical section, resume it at the abort handler (as
/// the kernel would on preemption).
pub(crate) fn abort_rseq_cs(pid: Pid, rseq: u64, regs: &mut sys::Regs) {
    let mut b = [0u8; 8];
    if sys::vm_read(pid, &mut b, &[(rseq + 8, 8)]).ok() != Some(8) {
        return;
    }
    let cs = u64::from_le_bytes(b);
    if cs == 0 {
        return;
    }
    let mut c = [0u8; 32];
    if sys::vm_read(pid, &mut c, &[(cs, 32)]).ok() != Some(32) {
        return;
    }
    let start = u64::from_le_bytes(c[8..16].try_into().unwrap());
    let post = u64::from_le_bytes(c[16..24].try_into().unwrap());
    let abort = u64::from_le_bytes(c[24..32].try_into().unwrap());
    if regs.rip >= start && regs.rip < start + post {
        regs.rip = abort;
    }
}
