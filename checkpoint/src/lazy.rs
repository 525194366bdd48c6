//! Lazy restore of pre-copied memory: the restored process runs before the pages a pre-copy
//! left in the destination's store are in it. They are already on this machine, so what is
//! left is a memory copy, not a transfer: a thread of the restorer copies them in behind the
//! process (`UFFDIO_COPY`, in 2 MiB pieces) and serves at once any page the process touches
//! first (a missing fault on a userfaultfd registered over those mappings). Without it the
//! restore writes every pre-copied page while the process is frozen: at 1 GB that write, not
//! the network, is the downtime.
//!
//! Only private anonymous read-write mappings are served this way (no mlock, no fork advice,
//! not the stack); everything else is written before the process runs, as without pre-copy.
//! The userfaultfd is made inside the restored process (`/dev/userfaultfd`, so that faults
//! taken by the kernel — a `read` into a buffer not copied yet — wait for the page rather than
//! fail with EFAULT), copied out with `pidfd_getfd` and closed there: the process never holds
//! it. Its events keep the list of pages still to copy true: a fork gives the child's
//! userfaultfd (the child needs the same pages), an mremap moves pages, MADV_DONTNEED and
//! munmap drop them (those ranges must read as zeros, not get old data). Once a process has
//! every page, its userfaultfd is closed, which unregisters the mappings (the `um` VmFlags
//! go away); a process that exits ends its part too.

use crate::error::{Error, Result};
use crate::inject::Remote;
use crate::memory::{advice, MemoryState, Vma, VmaKind};
use crate::sys::{self, MappedFile, UffdEvent};
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;
/// Copied per background step: small enough that a fault waits little behind it.
const PIECE: u64 = 2 << 20;
/// Copied for a fault: the page and what follows it in its run (programs read on).
const FAULT_PIECE: u64 = 64 << 10;

/// Whether the restore leaves the pre-copied pages of `v` to the lazy copy.
pub fn eligible(v: &Vma) -> bool {
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u32;
    let excluded = advice::LOCKED | advice::DONTFORK | advice::WIPEONFORK | advice::DROPPABLE;
    matches!(v.kind, VmaKind::Anon { .. })
        && !v.shared
        && !v.growsdown
        && v.prot == rw
        && v.advice & excluded == 0
        && !v.precopied.is_empty()
}

/// What the copy did, when it ended.
#[derive(Clone, Debug, Default)]
pub struct LazyStats {
    /// Bytes copied in the background.
    pub copied: u64,
    /// Bytes copied because the process touched them first (faults served).
    pub faulted: u64,
    pub faults: u64,
    /// Processes served (the restored one and the children it forked meanwhile).
    pub processes: u64,
    /// Bytes given up: the process discarded or unmapped them, or exited first.
    pub dropped: u64,
    pub took: Duration,
    /// The process exited while guarded.
    pub exited_guarded: bool,
}

/// The thread copying pages in; [`LazyCopy::wait`] returns when every process has its pages.
pub struct LazyCopy {
    handle: std::thread::JoinHandle<LazyStats>,
    pub bytes: u64,
    background: Arc<AtomicBool>,
}

impl LazyCopy {
    /// Lets a copy started paused (`RestoreOptions::lazy_paused`) copy in the background.
    pub fn release(&self) {
        self.background.store(true, Ordering::Release);
    }

    /// [`LazyCopy::release`] for another thread.
    pub fn releaser(&self) -> impl Fn() + Send + 'static {
        let b = self.background.clone();
        move || b.store(true, Ordering::Release)
    }

    pub fn wait(self) -> LazyStats {
        self.handle.join().unwrap_or_default()
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

/// Registers the eligible mappings of the process being restored (through `r`) and starts the
/// thread that fills them from `store`. Call after the other pages are written and before
/// anything could touch these mappings; `None` when nothing is eligible.
/// `paused`: only faults are served until [`LazyCopy::release`] (tests use it to make sure
/// the process meets missing pages).
pub fn start(r: &Remote, memory: &MemoryState, store: Arc<MappedFile>, paused: bool) -> Result<Option<LazyCopy>> {
    let vmas: Vec<&Vma> = memory.vmas.iter().filter(|v| eligible(v)).collect();
    if vmas.is_empty() {
        return Ok(None);
    }
    let pid = r.pid;
    let fail = |what: String| Error::Restore(format!("lazy restore of pre-copied memory: {what}"));
    let uffd = {
        let dev = r.open("/dev/userfaultfd", libc::O_RDWR | libc::O_CLOEXEC)?;
        let made = r.call(
            "ioctl(USERFAULTFD_IOC_NEW)",
            libc::SYS_ioctl,
            &[dev, sys::USERFAULTFD_IOC_NEW, (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64],
        );
        r.call("close /dev/userfaultfd", libc::SYS_close, &[dev])?;
        let fd = made?;
        let pidfd = sys::pidfd_open(pid).map_err(|e| fail(format!("pidfd_open: {e}")))?;
        let copy = sys::pidfd_getfd(&pidfd, fd as i32);
        r.call("close (userfaultfd)", libc::SYS_close, &[fd])?;
        copy.map_err(|e| fail(format!("pidfd_getfd: {e}")))?
    };
    sys::uffd_api(&uffd, sys::UFFD_FEATURE_EVENTS).map_err(|e| fail(format!("UFFDIO_API: {e}")))?;
    let mut todo = BTreeMap::new();
    for v in &vmas {
        sys::uffd_register_missing(&uffd, v.start, v.end - v.start)
            .map_err(|e| fail(format!("UFFDIO_REGISTER {}: {e}", v.describe())))?;
        for run in &v.precopied {
            todo.insert(run.addr, (run.len, run.off));
        }
    }
    let bytes = todo.values().map(|(len, _)| len).sum();
    let target = Target { uffd, todo, retry: Vec::new() };
    let background = Arc::new(AtomicBool::new(!paused));
    let bg = background.clone();
    let handle = std::thread::Builder::new()
        .name("dvk-lazy-copy".into())
        .spawn(move || serve(vec![target], &store, &bg))
        .map_err(|e| fail(format!("cannot start the copy thread: {e}")))?;
    Ok(Some(LazyCopy { handle, bytes, background }))
}

/// One process being filled: its userfaultfd and the pages it still lacks, as runs
/// addr → (len, offset in the store).
struct Target {
    uffd: OwnedFd,
    todo: BTreeMap<u64, (u64, u64)>,
    /// Faults to serve again: their copy met a layout change (EAGAIN) not read yet.
    retry: Vec<u64>,
}

impl Target {
    /// Takes `start..end` out of the runs still to copy; returns the bytes taken.
    fn take(&mut self, start: u64, end: u64) -> u64 {
        let mut taken = 0;
        let first = self.todo.range(..start).next_back().map(|(a, _)| *a);
        let keys: Vec<u64> = first.into_iter().chain(self.todo.range(start..end).map(|(a, _)| *a)).collect();
        for a in keys {
            let Some((len, off)) = self.todo.get(&a).copied() else { continue };
            let e = a + len;
            if e <= start || a >= end {
                continue;
            }
            self.todo.remove(&a);
            if a < start {
                self.todo.insert(a, (start - a, off));
            }
            if e > end {
                self.todo.insert(end, (e - end, off + (end - a)));
            }
            taken += e.min(end) - a.max(start);
        }
        taken
    }

    /// The run piece holding `addr`, at most `max` bytes from its page on.
    fn piece_at(&self, addr: u64, max: u64) -> Option<(u64, u64, u64)> {
        let (&a, &(len, off)) = self.todo.range(..=addr).next_back()?;
        if addr >= a + len {
            return None;
        }
        let at = addr & !(PAGE - 1);
        let n = (a + len - at).min(max);
        Some((at, n, off + (at - a)))
    }

    /// Moves the runs inside `from..from+len` to `to` (the process mremap'ed them).
    fn remap(&mut self, from: u64, to: u64, len: u64) {
        let end = from + len;
        // The runs that overlap the range: the one starting before it, and those inside.
        let first = self.todo.range(..from).next_back().map(|(&a, &v)| (a, v));
        let moved: Vec<(u64, u64, u64)> = first
            .into_iter()
            .chain(self.todo.range(from..end).map(|(&a, &v)| (a, v)))
            .filter_map(|(a, (l, off))| {
                let (s, e) = (a.max(from), (a + l).min(end));
                (s < e).then(|| (to + (s - from), e - s, off + (s - a)))
            })
            .collect();
        self.take(from, end);
        for (a, l, off) in moved {
            self.todo.insert(a, (l, off));
        }
    }
}

/// What copying a piece into a process came to.
enum Copied {
    /// The piece is in (or was there already, page by page).
    Done,
    /// The layout is changing (a fork or mremap under way): read the events, then try again.
    Again,
    /// The process is gone.
    Gone,
}

/// Copies `len` bytes at store offset `off` to `addr`, page by page past pages already there.
fn copy_piece(t: &Target, store: &[u8], addr: u64, len: u64, off: u64) -> Copied {
    let mut done = 0;
    while done < len {
        let src = &store[(off + done) as usize..(off + len) as usize];
        match sys::uffd_copy(&t.uffd, addr + done, src) {
            Ok(_) => return Copied::Done,
            Err((libc::EEXIST, n)) => {
                // A page of the piece is there (the process wrote it, or a fault got it):
                // keep it, wake whoever waits on it, go on after it.
                let at = addr + done + n;
                sys::uffd_wake(&t.uffd, at, PAGE);
                done += n + PAGE;
            }
            Err((libc::EAGAIN, _)) => return Copied::Again,
            Err((libc::ESRCH, _)) => return Copied::Gone,
            // ENOENT/EINVAL: the range is no longer registered (unmapped or remapped in a way
            // an event will tell): nothing to fill there.
            Err(_) => return Copied::Done,
        }
    }
    Copied::Done
}

/// Serves a fault at `address`; true if the process is gone.
fn fault(t: &mut Target, store: &[u8], address: u64, st: &mut LazyStats) -> bool {
    match t.piece_at(address, FAULT_PIECE) {
        Some((at, n, off)) => match copy_piece(t, store, at, n, off) {
            Copied::Done => {
                t.take(at, at + n);
                st.faulted += n;
                false
            }
            Copied::Again => {
                t.retry.push(address);
                false
            }
            Copied::Gone => true,
        },
        None => {
            // Not pre-copied data: a page the process never had (or discarded since), which
            // reads as zeros; or one that got there meanwhile (then just wake the waiter).
            let page = address & !(PAGE - 1);
            match sys::uffd_zeropage(&t.uffd, page, PAGE) {
                Ok(()) => false,
                Err(libc::EAGAIN) => {
                    t.retry.push(address);
                    false
                }
                Err(libc::ESRCH) => true,
                Err(_) => {
                    sys::uffd_wake(&t.uffd, page, PAGE);
                    false
                }
            }
        }
    }
}

fn serve(mut targets: Vec<Target>, store: &MappedFile, background: &AtomicBool) -> LazyStats {
    let t0 = Instant::now();
    let store = store.bytes();
    let mut st = LazyStats { processes: 1, ..Default::default() };
    let mut events = Vec::new();
    let mut turn = 0usize;
    while !targets.is_empty() {
        let fds: Vec<_> = targets.iter().map(|t| t.uffd.as_raw_fd()).collect();
        let copying = background.load(Ordering::Acquire);
        let ready = sys::poll_readable(&fds, if copying { 0 } else { 5 }).unwrap_or_default();
        let mut gone = vec![false; targets.len()];
        for i in ready {
            events.clear();
            if sys::uffd_read(&targets[i].uffd, &mut events).is_err() {
                gone[i] = true;
                continue;
            }
            for &ev in &events {
                match ev {
                    UffdEvent::PageFault { address } => {
                        st.faults += 1;
                        if fault(&mut targets[i], store, address, &mut st) {
                            gone[i] = true;
                        }
                    }
                    UffdEvent::Fork { ufd } => {
                        // SAFETY: the kernel installed this fd in our table for the message.
                        let uffd = unsafe { OwnedFd::from_raw_fd(ufd) };
                        let todo = targets[i].todo.clone();
                        st.processes += 1;
                        targets.push(Target { uffd, todo, retry: Vec::new() });
                        gone.push(false);
                    }
                    UffdEvent::Remap { from, to, len } => targets[i].remap(from, to, len),
                    UffdEvent::Remove { start, end } | UffdEvent::Unmap { start, end } => {
                        st.dropped += targets[i].take(start, end);
                    }
                    UffdEvent::Other(_) => {}
                }
            }
        }
        for (i, t) in targets.iter_mut().enumerate() {
            for address in std::mem::take(&mut t.retry) {
                if fault(t, store, address, &mut st) {
                    gone[i] = true;
                }
            }
        }
        // One background piece, taking turns between the processes.
        if copying && !targets.is_empty() {
            turn = (turn + 1) % targets.len();
            let t = &mut targets[turn];
            if let Some((&a, &(len, off))) = t.todo.iter().next() {
                let n = len.min(PIECE);
                match copy_piece(t, store, a, n, off) {
                    Copied::Done => {
                        t.take(a, a + n);
                        st.copied += n;
                    }
                    Copied::Again => {}
                    Copied::Gone => gone[turn] = true,
                }
            }
        }
        for (i, g) in gone.iter().enumerate().rev() {
            if *g {
                st.dropped += targets[i].todo.values().map(|(l, _)| l).sum::<u64>();
                targets.remove(i);
            }
        }
        // A process with every page: closing its userfaultfd unregisters its mappings.
        targets.retain(|t| !t.todo.is_empty());
    }
    st.took = t0.elapsed();
    st
}

/// A lazily restored process that runs while its pages are copied in, kept under `ptrace`
/// (`PTRACE_SEIZE` of every thread with `PTRACE_O_EXITKILL`) for that long: if the copying
/// process dies first, the kernel kills it — pages never copied would otherwise read as zeros
/// once the userfaultfd is gone, and a process must never run on with its memory lost. The
/// threads and children it makes meanwhile are traced the same way (children are served from
/// the same pages). Seize does not stop a thread; the tracer passes on every signal it intercepts
/// and keeps job-control stops (`PTRACE_LISTEN`). Only the thread that made it may call
/// [`Guarded::finish`].
pub struct Guarded {
    pid: crate::sys::Pid,
    lazy: LazyCopy,
    /// The threads seized (every thread of the process: ptrace options are per thread, and a
    /// fork by any of them must be traced too).
    seized: Vec<crate::sys::Pid>,
    /// No thread could be seized (the copy still runs, unguarded).
    unguarded: Option<String>,
}

const PTRACE_EVENT_FORK: i32 = 1;
const PTRACE_EVENT_VFORK: i32 = 2;
const PTRACE_EVENT_CLONE: i32 = 3;
const PTRACE_EVENT_STOP: i32 = 128;

impl Guarded {
    /// Called with every thread of `pid` (`threads`: the others than the main one) just
    /// detached (running). A main thread that has exited cannot be seized; its live threads are.
    pub(crate) fn new(pid: crate::sys::Pid, threads: &[crate::sys::Pid], lazy: LazyCopy) -> Guarded {
        let opts =
            libc::PTRACE_O_EXITKILL | libc::PTRACE_O_TRACEFORK | libc::PTRACE_O_TRACEVFORK | libc::PTRACE_O_TRACECLONE;
        let mut seized = Vec::new();
        let mut why = None;
        for &t in std::iter::once(&pid).chain(threads) {
            match sys::seize(t, opts as u64) {
                Ok(()) => seized.push(t),
                Err(e) => why = Some(format!("PTRACE_SEIZE of {t}: {e}")),
            }
        }
        let unguarded = if seized.is_empty() { why } else { None };
        Guarded { pid, lazy, seized, unguarded }
    }

    /// Why the process runs unguarded, if it does.
    pub fn unguarded(&self) -> Option<&str> {
        self.unguarded.as_deref()
    }

    /// Lets the copy copy in the background (see `RestoreOptions::lazy_paused`).
    pub fn release(&self) {
        self.lazy.release();
    }

    pub fn releaser(&self) -> impl Fn() + Send + 'static {
        self.lazy.releaser()
    }

    /// Serves the ptrace stops of the process (and of the children it forked meanwhile) until
    /// its pages are all in, then lets them go.
    pub fn finish(self) -> LazyStats {
        if self.unguarded.is_some() {
            return self.lazy.wait();
        }
        let mut tracees = self.seized.clone();
        let mut exited = false;
        let mut letting_go = false;
        while !tracees.is_empty() {
            if !letting_go && self.lazy.is_finished() {
                letting_go = true;
                for &t in &tracees {
                    let _ = sys::interrupt(t);
                }
            }
            let mut busy = false;
            for t in tracees.clone() {
                let st = match sys::wait_nohang(t) {
                    Ok(Some(st)) => st,
                    Ok(None) => continue,
                    Err(_) => {
                        tracees.retain(|&x| x != t);
                        continue;
                    }
                };
                busy = true;
                if libc::WIFEXITED(st) || libc::WIFSIGNALED(st) {
                    exited |= t == self.pid;
                    tracees.retain(|&x| x != t);
                    continue;
                }
                if !libc::WIFSTOPPED(st) {
                    continue;
                }
                let sig = libc::WSTOPSIG(st);
                match st >> 16 {
                    PTRACE_EVENT_FORK | PTRACE_EVENT_VFORK | PTRACE_EVENT_CLONE => {
                        // The child (or new thread) is traced from its first instruction; its
                        // first stop comes on its own.
                        if let Ok(child) = sys::event_msg(t) {
                            tracees.push(child as crate::sys::Pid);
                        }
                        let _ = sys::cont(t, 0);
                    }
                    PTRACE_EVENT_STOP if letting_go => {
                        // Our interrupt (or a job-control stop, which it keeps): let go.
                        let _ = sys::detach(t, 0);
                        tracees.retain(|&x| x != t);
                    }
                    PTRACE_EVENT_STOP if sig == libc::SIGTRAP => {
                        // A new child's first stop (or an interrupt that raced the copy's end).
                        let _ = sys::cont(t, 0);
                    }
                    PTRACE_EVENT_STOP => {
                        // A job-control stop: it stays stopped until SIGCONT, as without us.
                        let _ = sys::listen(t);
                    }
                    _ => {
                        // A signal on its way to the process: deliver it.
                        let _ = sys::cont(t, sig);
                    }
                }
            }
            // A child forked while letting go: interrupt it too.
            if letting_go {
                for &t in &tracees {
                    let _ = sys::interrupt(t);
                }
            }
            if !busy {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        // A paused copy only learns that its process is gone when it copies.
        self.lazy.release();
        let mut st = self.lazy.wait();
        st.exited_guarded = exited;
        st
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(runs: &[(u64, u64, u64)]) -> Target {
        // Any fd will do: these tests only exercise the bookkeeping.
        let uffd = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        Target { uffd, todo: runs.iter().map(|&(a, l, o)| (a, (l, o))).collect(), retry: Vec::new() }
    }

    #[test]
    fn taking_a_range_splits_the_runs_it_cuts() {
        let mut t = target(&[(0x1000, 0x4000, 0), (0x8000, 0x2000, 0x4000)]);
        assert_eq!(t.take(0x2000, 0x9000), 0x3000 + 0x1000);
        let left: Vec<_> = t.todo.iter().map(|(a, (l, o))| (*a, *l, *o)).collect();
        assert_eq!(left, vec![(0x1000, 0x1000, 0), (0x9000, 0x1000, 0x5000)]);
    }

    #[test]
    fn a_fault_gets_its_page_and_what_follows_in_its_run() {
        let t = target(&[(0x10000, 0x40000, 0x100000)]);
        assert_eq!(t.piece_at(0x10000 + 0x1234, FAULT_PIECE), Some((0x11000, FAULT_PIECE, 0x101000)));
        assert_eq!(t.piece_at(0x4f000, FAULT_PIECE), Some((0x4f000, 0x1000, 0x13f000)));
        assert_eq!(t.piece_at(0x50000, FAULT_PIECE), None);
        assert_eq!(t.piece_at(0xf000, FAULT_PIECE), None);
    }

    #[test]
    fn a_remap_moves_the_runs_inside_it_with_their_offsets() {
        let mut t = target(&[(0x10000, 0x4000, 0), (0x20000, 0x1000, 0x4000)]);
        t.remap(0x12000, 0x80000, 0x4000);
        let left: Vec<_> = t.todo.iter().map(|(a, (l, o))| (*a, *l, *o)).collect();
        assert_eq!(left, vec![(0x10000, 0x2000, 0), (0x20000, 0x1000, 0x4000), (0x80000, 0x2000, 0x2000)]);
    }
}
