//! Pre-copy: the memory of a running process copied in rounds, each round only the pages it
//! wrote since the previous one, so that the final (frozen) dump sends only what changed last.
//!
//! Dirty tracking without soft-dirty bits (this kernel has no CONFIG_MEM_SOFT_DIRTY): a
//! userfaultfd in write-protect *async* mode (`UFFD_FEATURE_WP_ASYNC`), created inside the
//! process by one injected syscall (the process is frozen for that only), copied out with
//! `pidfd_getfd` and closed in the process at once. Registration and scans are done from here:
//! `UFFDIO_REGISTER` acts on the memory of the process that created the fd, and
//! `PAGEMAP_SCAN` on `/proc/PID/pagemap` reports the pages written since they were last
//! write-protected and write-protects them again in the same walk (`PM_SCAN_WP_MATCHING`).
//! A write to a protected page costs the process one minor fault, resolved by the kernel.
//!
//! What is tracked: private anonymous readable mappings (heap, stacks, anonymous mmaps:
//! what grows with a server's memory). Everything else is dumped whole at the freeze, as
//! without pre-copy. Each round re-reads the mapping list: a mapping that is not registered
//! (new, re-created over an old range, or moved by mremap, which drops the registration) is
//! registered and copied whole. At the freeze, a page of a tracked mapping is left to the
//! copy already sent ("kept") only if it is present, was copied by a round, and was not
//! written since; everything else is dumped as usual. Pages mapped to the shared zero page
//! are never sent: they read as zeros, like the never-touched pages they are restored as.
//!
//! Why not `UFFD_FEATURE_WP_UNPOPULATED`: it makes write-protection install markers in empty
//! page tables, which allocates page tables for every never-touched page of a large sparse
//! reservation. Without it, a page populated after registration simply shows as written,
//! which is what pre-copy wants.
//!
//! Leaving no trace: the process's own copy of the fd is closed right after it is taken;
//! dropping [`Precopy`] closes the last one, and the kernel then unregisters every range
//! (write-protect bits left in page tables are ignored once a mapping is not registered).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use crate::error::{io_at, Error, Result};
use crate::freeze::Frozen;
use crate::image::PageOut;
use crate::memory::Run;
use crate::proc::{self, proc_path, MapLine};
use crate::sys::{self, PagemapScan, Pid, PAGE};

/// Page address → offset of its copy in the store. Looked up once per page at the freeze (a
/// quarter of a million times per GB), so the hash is one multiply: the keys are the process's
/// own page addresses, nothing an attacker picks, and SipHash's cost bought nothing here.
type Slots = HashMap<u64, u64, std::hash::BuildHasherDefault<PageHasher>>;

#[derive(Default)]
struct PageHasher(u64);

impl std::hash::Hasher for PageHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, page: u64) {
        self.0 = (page >> 12).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// The file a local pre-copy writes its rounds to, beside pages.img.
pub const PRECOPY: &str = "precopy.img";

/// When to stop copying while the process runs.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Rounds after the first full copy, at most.
    pub max_rounds: u32,
    /// Stop once a round copied less than this.
    pub small_enough: u64,
    /// Stop when a round copied more than this fraction (percent) of the one before: the
    /// process writes as fast as we copy.
    pub not_shrinking_pct: u64,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy { max_rounds: 8, small_enough: 1 << 20, not_shrinking_pct: 80 }
    }
}

/// One round: what it copied and how long it took.
#[derive(Clone, Debug, Default)]
pub struct Round {
    pub bytes: u64,
    /// Mappings registered for tracking in this round (all of them in the first).
    pub registered: usize,
    pub took: Duration,
}

/// A tracker on one running process (see the module documentation).
pub struct Precopy {
    pid: Pid,
    uffd: OwnedFd,
    pagemap: File,
    /// Page address → offset of its copy in the pre-copy store.
    slots: Slots,
    store_len: u64,
    pub rounds: Vec<Round>,
    /// A process whose main thread has exited is read through a live thread (`proc_path`).
    _through: Option<proc::ReadThrough>,
}

impl std::fmt::Debug for Precopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Precopy").field("pid", &self.pid).field("store_len", &self.store_len).finish()
    }
}

/// The memory pre-copy tracks: private anonymous, readable (process_vm_readv can read it).
pub(crate) fn tracked(m: &MapLine) -> bool {
    let anon = m.path.is_empty() || m.path == "[heap]" || m.path == "[stack]" || m.path.starts_with("[anon:");
    anon && !m.shared() && m.perms[0] == b'r'
}

/// A page split at the freeze: what must be dumped now, and what the store already holds.
pub(crate) struct FinalSplit {
    /// (addr, len) runs to dump now.
    pub fresh: Vec<(u64, u64)>,
    /// Runs whose data is in the store (`off` = offset there; crc unused).
    pub kept: Vec<Run>,
    /// Guard pages (MADV_GUARD_INSTALL): no data, installed again at restore.
    pub guards: Vec<(u64, u64)>,
}

impl Precopy {
    /// Starts tracking `f`'s process (frozen by the caller, who thaws it afterwards): one
    /// injected `userfaultfd`, its fd copied out and closed in the process. Refuses, naming the
    /// reason, a process that uses userfaultfd itself or a kernel without async write-protect.
    pub fn start(f: &mut Frozen) -> Result<Precopy> {
        let pid = f.pid;
        let unsupported = |what: String| Error::Unsupported { pid, what };
        if uses_userfaultfd(pid) {
            return Err(unsupported("pre-copy of a process that uses userfaultfd itself".into()));
        }
        let maps = proc::maps(pid)?;
        let gadget_at = crate::dump::gadget_address(pid, &maps)?;
        let pidfd = sys::pidfd_open(pid).map_err(|err| Error::NoProcess { pid, err })?;
        let made = {
            let r = f.remote(gadget_at)?;
            let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64 | sys::UFFD_USER_MODE_ONLY;
            let fd = r.call("userfaultfd", libc::SYS_userfaultfd, &[flags])?;
            let copy = sys::pidfd_getfd(&pidfd, fd as i32);
            r.call("close (userfaultfd)", libc::SYS_close, &[fd])?;
            copy
        };
        f.end_injection()?;
        let uffd = made.map_err(|e| unsupported(format!("pre-copy: pidfd_getfd of the userfaultfd: {e}")))?;
        sys::uffd_api(&uffd, sys::UFFD_FEATURE_WP_ASYNC).map_err(|e| {
            unsupported(format!(
                "pre-copy: this kernel has no asynchronous userfaultfd write-protect (UFFD_FEATURE_WP_ASYNC, Linux ≥ 6.7): {e}"
            ))
        })?;
        let pm = proc_path(pid, "pagemap");
        let pagemap = File::open(&pm).map_err(io_at(&pm))?;
        // The main thread has exited: the rounds read the process through the same live thread.
        let through = f.leader_exited.then(|| proc::ReadThrough::new(pid, f.main));
        Ok(Precopy { pid, uffd, pagemap, slots: Slots::default(), store_len: 0, rounds: Vec::new(), _through: through })
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Bytes of the pre-copy store (what `out` was asked to hold).
    pub fn store_len(&self) -> u64 {
        self.store_len
    }

    /// Bytes copied by all rounds so far.
    pub fn copied(&self) -> u64 {
        self.rounds.iter().map(|r| r.bytes).sum()
    }

    /// Whether another round is worth it under `policy`.
    pub fn wants_another(&self, policy: &Policy) -> bool {
        let n = self.rounds.len();
        if n == 0 {
            return true;
        }
        if n > policy.max_rounds as usize {
            return false;
        }
        let last = self.rounds[n - 1].bytes;
        if last < policy.small_enough {
            return false;
        }
        n < 2 || last * 100 <= self.rounds[n - 2].bytes * policy.not_shrinking_pct
    }

    /// One round while the process runs: registers mappings not tracked yet, takes (and
    /// write-protects again) the pages written since the last round, reads them and writes
    /// them to `out` at their slots, growing the store (`out.reserve`) for new pages.
    pub fn round(&mut self, out: &dyn PageOut) -> Result<Round> {
        let t = Instant::now();
        let maps = proc::maps(self.pid)?;
        let mut registered = 0;
        let mut dirty: Vec<(u64, u64)> = Vec::new();
        let scan = PagemapScan {
            flags: sys::PM_SCAN_WP_MATCHING | sys::PM_SCAN_CHECK_WPASYNC,
            category_mask: sys::PAGE_IS_WRITTEN,
            category_anyof_mask: 0,
            return_mask: sys::PAGE_IS_WRITTEN | sys::PAGE_IS_PFNZERO | sys::PAGE_IS_GUARD,
        };
        for m in maps.iter().filter(|m| tracked(m)) {
            let mut regions = Vec::new();
            let mut res = sys::pagemap_scan(&self.pagemap, m.start, m.end, scan, &mut regions);
            if matches!(&res, Err(e) if e.raw_os_error() == Some(libc::EPERM)) {
                // Not registered (new, or re-created): register, then everything populated
                // shows as written and is copied whole.
                if sys::uffd_register_wp(&self.uffd, m.start, m.end - m.start).is_ok() {
                    registered += 1;
                    regions.clear();
                    res = sys::pagemap_scan(&self.pagemap, m.start, m.end, scan, &mut regions);
                }
            }
            if res.is_err() {
                // The layout changed under the scan (or registration failed): whatever it
                // write-protected before failing was not reported, so nothing copied of this
                // range can be trusted; the freeze dumps it.
                self.forget(m.start, m.end);
                continue;
            }
            for (s, e, cat) in regions {
                if cat & (sys::PAGE_IS_PFNZERO | sys::PAGE_IS_GUARD) != 0 {
                    self.forget(s, e);
                } else {
                    dirty.push((s, e));
                }
            }
        }
        let bytes = self.copy(&dirty, out)?;
        let round = Round { bytes, registered, took: t.elapsed() };
        self.rounds.push(round.clone());
        Ok(round)
    }

    fn forget(&mut self, start: u64, end: u64) {
        if ((end - start) / PAGE) as usize > self.slots.len() {
            self.slots.retain(|&a, _| a < start || a >= end);
        } else {
            let mut a = start;
            while a < end {
                self.slots.remove(&a);
                a += PAGE;
            }
        }
    }

    /// Reads `runs` from the running process and writes each page at its slot.
    fn copy(&mut self, runs: &[(u64, u64)], out: &dyn PageOut) -> Result<u64> {
        // Slots first (new pages get the next ones, in address order, so a fresh mapping is
        // one contiguous piece of the store), then one reservation for the growth.
        let before = self.store_len;
        for &(s, e) in runs {
            let mut a = s;
            while a < e {
                if !self.slots.contains_key(&a) {
                    self.slots.insert(a, self.store_len);
                    self.store_len += PAGE;
                }
                a += PAGE;
            }
        }
        let store = proc_path(self.pid, "pagemap");
        if self.store_len > before {
            out.reserve(self.store_len).map_err(io_at(&store))?;
        }
        const BATCH: u64 = 8 << 20;
        let mut buf = vec![0u8; BATCH as usize];
        let mut copied = 0u64;
        let mut pieces: Vec<(u64, u64)> = Vec::new(); // page-sized and larger runs ≤ BATCH
        for &(s, e) in runs {
            let mut a = s;
            while a < e {
                let n = (e - a).min(BATCH);
                pieces.push((a, n));
                a += n;
            }
        }
        let mut i = 0;
        while i < pieces.len() {
            let mut fill = 0u64;
            let mut j = i;
            while j < pieces.len() && j - i < 512 && fill + pieces[j].1 <= BATCH {
                fill += pieces[j].1;
                j += 1;
            }
            let remote: Vec<(u64, usize)> = pieces[i..j].iter().map(|p| (p.0, p.1 as usize)).collect();
            let n = sys::vm_read(self.pid, &mut buf[..fill as usize], &remote).unwrap_or(0) as u64;
            // Whatever could not be read (unmapped meanwhile) loses its slot: the freeze dumps
            // it if it still exists.
            let mut o = 0u64;
            for &(a, l) in &pieces[i..j] {
                let readable = o + l <= n;
                let mut p = 0;
                while p < l {
                    let page = a + p;
                    if !readable {
                        self.slots.remove(&page);
                        p += PAGE;
                        continue;
                    }
                    // Write the longest span whose slots are consecutive in one go.
                    let slot = self.slots[&page];
                    let mut q = p + PAGE;
                    while q < l && self.slots.get(&(a + q)) == Some(&(slot + q - p)) {
                        q += PAGE;
                    }
                    let from = (o + p) as usize;
                    out.write_at(&buf[from..from + (q - p) as usize], slot).map_err(io_at(&store))?;
                    copied += q - p;
                    p = q;
                }
                o += l;
            }
            i = j;
        }
        Ok(copied)
    }

    /// At the freeze, for a tracked mapping: which pages to dump and which the store holds.
    /// `None` if the mapping is not registered (new since the last round): dump it whole.
    pub(crate) fn split(&self, m: &MapLine) -> Result<Option<FinalSplit>> {
        if !tracked(m) {
            return Ok(None);
        }
        let scan = PagemapScan {
            flags: sys::PM_SCAN_CHECK_WPASYNC,
            category_mask: 0,
            category_anyof_mask: sys::PAGE_IS_PRESENT | sys::PAGE_IS_SWAPPED | sys::PAGE_IS_GUARD,
            return_mask: sys::PAGE_IS_WRITTEN | sys::PAGE_IS_PFNZERO | sys::PAGE_IS_GUARD,
        };
        let mut regions = Vec::new();
        match sys::pagemap_scan(&self.pagemap, m.start, m.end, scan, &mut regions) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => return Ok(None),
            Err(e) => return Err(io_at(&proc_path(self.pid, "pagemap"))(e)),
        }
        let mut split = FinalSplit { fresh: Vec::new(), kept: Vec::new(), guards: Vec::new() };
        for (s, e, cat) in regions {
            if cat & sys::PAGE_IS_GUARD != 0 {
                match split.guards.last_mut() {
                    Some(g) if g.0 + g.1 == s => g.1 += e - s,
                    _ => split.guards.push((s, e - s)),
                }
                continue;
            }
            // Zero pages read as the never-touched memory they are restored as.
            if cat & sys::PAGE_IS_PFNZERO != 0 {
                continue;
            }
            let mut a = s;
            while a < e {
                let slot = if cat & sys::PAGE_IS_WRITTEN == 0 { self.slots.get(&a).copied() } else { None };
                match slot {
                    Some(off) => match split.kept.last_mut() {
                        Some(r) if r.addr + r.len == a && r.off + r.len == off => r.len += PAGE,
                        _ => split.kept.push(Run { addr: a, len: PAGE, off, crc: 0 }),
                    },
                    None => match split.fresh.last_mut() {
                        Some((fa, fl)) if *fa + *fl == a => *fl += PAGE,
                        _ => split.fresh.push((a, PAGE)),
                    },
                }
                a += PAGE;
            }
        }
        Ok(Some(split))
    }
}

/// The `uw` VmFlags mark (registered for userfaultfd write-protect) on the mappings pre-copy
/// tracks is its own, not the process's: removed before the flags are judged.
pub(crate) fn drop_own_marks(maps: &[MapLine], flags: &mut HashMap<u64, Vec<String>>) {
    for m in maps.iter().filter(|m| tracked(m)) {
        if let Some(f) = flags.get_mut(&m.start) {
            f.retain(|x| x != "uw");
        }
    }
}

/// Whether the process holds a userfaultfd of its own (its fds, or mappings registered).
fn uses_userfaultfd(pid: Pid) -> bool {
    let Ok(dir) = std::fs::read_dir(proc_path(pid, "fd")) else { return false };
    dir.flatten()
        .any(|e| std::fs::read_link(e.path()).map(|t| t.to_string_lossy().contains("[userfaultfd]")).unwrap_or(false))
}
