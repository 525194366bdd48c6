//! Memory: every VMA of the process, and the pages that must travel as data.
//!
//! Collect: `/proc/PID/maps` lists the VMAs; `/proc/PID/pagemap` says which pages were ever
//! populated. Private memory is data (anonymous pages, and the copied-on-write pages of private
//! file mappings); pages never populated are not stored; unwritten file pages are references to
//! the file (path + identity checked at restore). Pages are read with `process_vm_readv` in large
//! batches (`/proc/PID/mem` only for VMAs without read permission).
//!
//! Rebuild: map every VMA at its address (read+write first), write the pages with
//! `process_vm_writev`, then `mprotect` to the saved protections.
//!
//! What `VmFlags` (/proc/PID/smaps) says beyond the protection is judged flag by flag
//! ([`VM_FLAGS`]): carried as [`advice`] (mlock, madvise, MAP_NORESERVE, mseal, a shared file
//! mapping that may be made writable, MAP_GROWSDOWN) or refused by name; a flag this engine does
//! not know is refused too, so no VMA attribute is lost silently.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;

use serde::{Deserialize, Serialize};

use crate::error::{io_at, pt, Error, Result};
use crate::image::PageSink;
use crate::inject::Remote;
use crate::precopy::Precopy;
use crate::proc::{proc_path, MapLine};
use crate::sys::{self, Pid, PAGE};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileIdent {
    pub ino: u64,
    pub size: u64,
    pub mtime: i64,
    pub mtime_ns: i64,
}

impl FileIdent {
    pub fn of(path: &str) -> std::io::Result<FileIdent> {
        let m = std::fs::metadata(path)?;
        Ok(FileIdent { ino: m.ino(), size: m.size(), mtime: m.mtime(), mtime_ns: m.mtime_nsec() })
    }
    /// Refuses if the file at `path` is not the one recorded.
    pub fn check(&self, path: &str) -> Result<()> {
        let now = FileIdent::of(path)
            .map_err(|e| Error::FileChanged { path: path.into(), detail: format!("cannot stat it: {e}") })?;
        let detail = if now.size != self.size {
            format!("size {} ≠ {}", self.size, now.size)
        } else if (now.mtime, now.mtime_ns) != (self.mtime, self.mtime_ns) {
            format!("mtime {}.{:09} ≠ {}.{:09}", self.mtime, self.mtime_ns, now.mtime, now.mtime_ns)
        } else if now.ino != self.ino {
            format!("inode {} ≠ {}", self.ino, now.ino)
        } else {
            return Ok(());
        };
        Err(Error::FileChanged { path: path.into(), detail })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum VmaKind {
    /// Private anonymous memory; `name` is "", "[heap]", "[stack]" or "[anon:…]".
    Anon { name: String },
    /// MAP_SHARED|MAP_ANONYMOUS (shows as "/dev/zero (deleted)", or "[anon_shmem:NAME]" once
    /// named: `name` is then that whole string).
    SharedAnon { name: String },
    /// A mapping of a memfd (saved with its content, see `memfd`).
    Memfd { ino: u64, name: String, offset: u64 },
    /// A file mapping (private or shared), re-mapped from the file at restore.
    File { path: String, offset: u64, ident: FileIdent },
    /// An attachment of SysV shared memory segment `id` (see `sysv`); `offset` into the
    /// segment (non-zero for the later parts of an attachment split by mprotect).
    SysvShm { id: i32, offset: u64 },
    /// A mapping of a regular file deleted since (saved with its content, see `ghosts`).
    Ghost { ino: u64, path: String, offset: u64 },
}

/// A run of consecutive stored pages: `len` bytes at `addr`, stored at `off` in pages.img.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Run {
    pub addr: u64,
    pub len: u64,
    pub off: u64,
    pub crc: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub prot: u32,
    pub shared: bool,
    /// `gd` (MAP_GROWSDOWN): the main stack, or any other mapping made so.
    pub growsdown: bool,
    /// [`advice`] bits from the VMA's VmFlags.
    pub advice: u32,
    /// Guard regions (MADV_GUARD_INSTALL) as (addr, len), from pagemap (private mappings).
    pub guards: Vec<(u64, u64)>,
    pub kind: VmaKind,
    pub runs: Vec<Run>,
    /// Runs whose data is in the pre-copy store (offsets there; not checksummed: the store
    /// was filled while the process ran, see `precopy`).
    pub precopied: Vec<Run>,
}

/// VmFlags carried at restore, one bit each.
pub mod advice {
    /// `lo`: mlock'ed.
    pub const LOCKED: u32 = 1 << 0;
    /// `lf`: mlock2(MLOCK_ONFAULT).
    pub const LOCK_ONFAULT: u32 = 1 << 1;
    /// `dc`: MADV_DONTFORK.
    pub const DONTFORK: u32 = 1 << 2;
    /// `dd`: MADV_DONTDUMP.
    pub const DONTDUMP: u32 = 1 << 3;
    /// `wf`: MADV_WIPEONFORK.
    pub const WIPEONFORK: u32 = 1 << 4;
    /// `hg`: MADV_HUGEPAGE.
    pub const HUGEPAGE: u32 = 1 << 5;
    /// `nh`: MADV_NOHUGEPAGE.
    pub const NOHUGEPAGE: u32 = 1 << 6;
    /// `mg`: MADV_MERGEABLE (KSM).
    pub const MERGEABLE: u32 = 1 << 7;
    /// `sr`: MADV_SEQUENTIAL.
    pub const SEQUENTIAL: u32 = 1 << 8;
    /// `rr`: MADV_RANDOM.
    pub const RANDOM: u32 = 1 << 9;
    /// `nr`: MAP_NORESERVE.
    pub const NORESERVE: u32 = 1 << 10;
    /// `mw` on a shared file mapping: the file was open for writing, a later mprotect may add
    /// PROT_WRITE (the file is re-opened read-write).
    pub const MAYWRITE: u32 = 1 << 11;
    /// `sl`: mseal'ed.
    pub const SEALED: u32 = 1 << 12;
    /// `dp`: MAP_DROPPABLE (e.g. glibc's vDSO getrandom state).
    pub const DROPPABLE: u32 = 1 << 13;
}

/// How each VmFlags mnemonic (proc(5)) is handled. Anything not listed is refused.
pub enum FlagUse {
    /// Follows from the protection, the kind of mapping or the kernel's own bookkeeping.
    Implied,
    /// Carried as this [`advice`] bit.
    Carried(u32),
    /// Refused, saying why.
    Refused(&'static str),
}

pub const VM_FLAGS: &[(&str, FlagUse)] = &[
    ("rd", FlagUse::Implied),
    ("wr", FlagUse::Implied),
    ("ex", FlagUse::Implied),
    ("sh", FlagUse::Implied),
    ("mr", FlagUse::Implied),
    ("mw", FlagUse::Carried(advice::MAYWRITE)),
    ("me", FlagUse::Implied),
    ("ms", FlagUse::Implied),
    ("gd", FlagUse::Implied), // Vma::growsdown
    ("ac", FlagUse::Implied), // accounting follows MAP_NORESERVE and the protection
    ("sd", FlagUse::Implied), // soft-dirty tracking
    ("lo", FlagUse::Carried(advice::LOCKED)),
    ("lf", FlagUse::Carried(advice::LOCK_ONFAULT)),
    ("dc", FlagUse::Carried(advice::DONTFORK)),
    ("dd", FlagUse::Carried(advice::DONTDUMP)),
    ("wf", FlagUse::Carried(advice::WIPEONFORK)),
    ("hg", FlagUse::Carried(advice::HUGEPAGE)),
    ("nh", FlagUse::Carried(advice::NOHUGEPAGE)),
    ("mg", FlagUse::Carried(advice::MERGEABLE)),
    ("sr", FlagUse::Carried(advice::SEQUENTIAL)),
    ("rr", FlagUse::Carried(advice::RANDOM)),
    ("nr", FlagUse::Carried(advice::NORESERVE)),
    ("sl", FlagUse::Carried(advice::SEALED)),
    ("dp", FlagUse::Carried(advice::DROPPABLE)),
    ("gu", FlagUse::Implied), // may hold guard regions: carried page by page (Vma::guards)
    ("ht", FlagUse::Refused("hugetlb memory (VmFlags ht) is not supported yet")),
    ("io", FlagUse::Refused("a device mapping (VmFlags io)")),
    ("pf", FlagUse::Refused("a device mapping (VmFlags pf, PFNMAP)")),
    ("mm", FlagUse::Refused("a device mapping (VmFlags mm, MIXEDMAP)")),
    ("ar", FlagUse::Refused("an architecture-specific mapping (VmFlags ar)")),
    ("de", FlagUse::Refused("a driver mapping that cannot be expanded (VmFlags de)")),
    ("sf", FlagUse::Refused("synchronous page faults (VmFlags sf, MAP_SYNC on DAX)")),
    ("um", FlagUse::Refused("registered with userfaultfd (VmFlags um)")),
    ("uw", FlagUse::Refused("registered with userfaultfd (VmFlags uw)")),
    ("ui", FlagUse::Refused("registered with userfaultfd (VmFlags ui)")),
    ("ss", FlagUse::Refused("a shadow stack (VmFlags ss)")),
];

/// (advice bits, growsdown) of a VMA from its VmFlags, or the refusal naming the flag.
pub fn judge_flags(m: &MapLine, flags: &[String]) -> Result<(u32, bool)> {
    let refuse = |why: String| Error::UnsupportedMapping { range: m.range(), what: m.path.clone(), why };
    let mut bits = 0;
    for f in flags {
        if let Some(k) = f.strip_prefix("pkey:") {
            return Err(refuse(format!("memory protection key {k} (pkey_mprotect) is not carried yet")));
        }
        match VM_FLAGS.iter().find(|(n, _)| n == f).map(|(_, u)| u) {
            Some(FlagUse::Implied) => {}
            Some(FlagUse::Carried(b)) => bits |= b,
            Some(FlagUse::Refused(why)) => return Err(refuse((*why).to_string())),
            None => return Err(refuse(format!("VmFlags `{f}` is not known to this engine"))),
        }
    }
    // `mw` matters only for a shared file mapping (private ones can always be made writable).
    if !(m.shared() && !m.path.is_empty() && m.path.starts_with('/')) {
        bits &= !advice::MAYWRITE;
    }
    Ok((bits, flags.iter().any(|f| f == "gd")))
}

impl Vma {
    /// Whether restore writes data into it (from the image or the pre-copy store).
    pub fn has_data(&self) -> bool {
        !self.runs.is_empty() || !self.precopied.is_empty()
    }

    pub fn describe(&self) -> String {
        let what = match &self.kind {
            VmaKind::Anon { name } if name.is_empty() => "anonymous".to_string(),
            VmaKind::Anon { name } => name.clone(),
            VmaKind::SharedAnon { name } if name.is_empty() => "shared anonymous".into(),
            VmaKind::SharedAnon { name } => name.clone(),
            VmaKind::File { path, .. } => path.clone(),
            VmaKind::Memfd { name, .. } => format!("/memfd:{name}"),
            VmaKind::SysvShm { id, .. } => format!("SysV shm {id}"),
            VmaKind::Ghost { path, .. } => format!("{path} (deleted)"),
        };
        format!("{:#x}-{:#x} {}", self.start, self.end, what)
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemoryState {
    pub vmas: Vec<Vma>,
}

impl MemoryState {
    pub fn stored_bytes(&self) -> u64 {
        self.vmas.iter().flat_map(|v| &v.runs).map(|r| r.len).sum()
    }
    pub fn precopied_bytes(&self) -> u64 {
        self.vmas.iter().flat_map(|v| &v.precopied).map(|r| r.len).sum()
    }
}

/// Mappings the engine leaves to the kernel (vDSO block handled in `vdso`).
pub fn is_special(path: &str) -> bool {
    matches!(path, "[vvar]" | "[vvar_vclock]" | "[vdso]" | "[vsyscall]" | "[uprobes]")
}

/// Classifies one VMA, or refuses it naming the mapping.
pub fn classify(m: &MapLine) -> Result<VmaKind> {
    let p = m.path.as_str();
    let refuse = |why: &str| Error::UnsupportedMapping { range: m.range(), what: p.to_string(), why: why.into() };
    if p.is_empty() || p == "[heap]" || p == "[stack]" || p.starts_with("[anon:") {
        if m.shared() {
            return Ok(VmaKind::SharedAnon { name: String::new() });
        }
        return Ok(VmaKind::Anon { name: p.to_string() });
    }
    if p == "/dev/zero (deleted)" {
        return Ok(VmaKind::SharedAnon { name: String::new() });
    }
    if p == "/[aio] (deleted)" {
        // A ring could be made again at its address (io_setup, then mremap, which the kernel
        // follows), but requests still in flight show nowhere outside the kernel (the ring
        // holds only completed events): carrying it could drop one unseen.
        return Err(refuse(
            "an AIO context (io_setup): its requests in flight cannot be seen from outside the kernel, so the ring \
             is not carried (io_destroy it before the dump)",
        ));
    }
    if p.starts_with("[anon_shmem:") {
        return Ok(VmaKind::SharedAnon { name: p.to_string() });
    }
    if p.starts_with('[') {
        return Err(refuse("special kernel mapping"));
    }
    if let Some(name) = crate::memfd::name_of(p) {
        return Ok(VmaKind::Memfd { ino: m.inode, name: name.to_string(), offset: m.offset });
    }
    if crate::sysv::is_shm(p) {
        return Ok(VmaKind::SysvShm { id: m.inode as i32, offset: m.offset });
    }
    if let Some(path) = crate::ghosts::deleted_path(p) {
        return Ok(VmaKind::Ghost { ino: m.inode, path: path.to_string(), offset: m.offset });
    }
    if !p.starts_with('/') {
        return Err(refuse("not a regular file mapping"));
    }
    let md = std::fs::metadata(p).map_err(|e| refuse(&format!("cannot stat the file: {e}")))?;
    if !md.file_type().is_file() {
        return Err(refuse("device or special file mapping"));
    }
    if md.ino() != m.inode {
        return Err(refuse("the path now names a different file (inode changed)"));
    }
    Ok(VmaKind::File {
        path: p.to_string(),
        offset: m.offset,
        ident: FileIdent { ino: md.ino(), size: md.size(), mtime: md.mtime(), mtime_ns: md.mtime_nsec() },
    })
}

/// Checks every mapping can be moved, without touching the process.
pub fn preflight(maps: &[MapLine]) -> Result<()> {
    for m in maps.iter().filter(|m| !is_special(&m.path)) {
        classify(m)?;
    }
    Ok(())
}

/// Every mapping that cannot be moved (one error each), without touching the process.
/// `flags`: VmFlags by start address ([`crate::proc::vm_flags`]).
pub fn blockers(maps: &[MapLine], flags: &HashMap<u64, Vec<String>>) -> Vec<Error> {
    maps.iter()
        .filter(|m| !is_special(&m.path))
        .filter_map(|m| classify(m).err().or_else(|| judge_flags(m, flags.get(&m.start).map_or(&[][..], |v| v)).err()))
        .collect()
}

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAP: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;
/// A guard region page (Linux 6.15+; shows with PM_SWAP set, as the marker it is).
const PM_GUARD: u64 = 1 << 58;

/// Collects all VMAs and streams their data pages into `sink`; with `precopy`, the pages it
/// already holds (and that were not written since) are referred to, not streamed.
/// `borrowed`: shared anonymous mappings whose memory another process's image stores.
pub fn collect(
    pid: Pid,
    maps: &[MapLine],
    sink: &mut PageSink,
    precopy: Option<&Precopy>,
    borrowed: &[(u64, u64)],
) -> Result<MemoryState> {
    // VmFlags come from smaps, whose read walks every page table (~18 ms per resident GiB, all
    // of it frozen time): read on another thread while the pages are copied.
    let (vmas, vm_flags) = std::thread::scope(|s| {
        let h = s.spawn(|| crate::proc::vm_flags(pid));
        let vmas = collect_pages(pid, maps, sink, precopy, borrowed);
        let flags = h.join().unwrap_or_else(|_| {
            Err(Error::NoProcess { pid, err: std::io::Error::other("the smaps reader thread panicked") })
        });
        (vmas, flags)
    });
    let (mut vmas, mut vm_flags) = (vmas?, vm_flags?);
    if precopy.is_some() {
        crate::precopy::drop_own_marks(maps, &mut vm_flags);
    }
    for (v, m) in vmas.iter_mut().zip(maps.iter().filter(|m| !is_special(&m.path))) {
        let flags = vm_flags.get(&m.start).ok_or_else(|| Error::UnsupportedMapping {
            range: m.range(),
            what: m.path.clone(),
            why: "not found in /proc/PID/smaps (its VmFlags cannot be read)".into(),
        })?;
        (v.advice, v.growsdown) = judge_flags(m, flags)?;
        // Shared file mappings were not looked at in pagemap (no page of theirs is data): look
        // for guard pages where the VMA says it may hold some.
        if m.shared()
            && matches!(v.kind, VmaKind::File { .. } | VmaKind::Memfd { .. } | VmaKind::Ghost { .. })
            && flags.iter().any(|f| f == "gu")
        {
            v.guards = guard_runs(pid, m.start, m.end)?;
        }
    }
    Ok(MemoryState { vmas })
}

/// The guard pages of `start..end`, as runs of (addr, len), from pagemap.
fn guard_runs(pid: Pid, start: u64, end: u64) -> Result<Vec<(u64, u64)>> {
    let pm_path = proc_path(pid, "pagemap");
    let pagemap = File::open(&pm_path).map_err(io_at(&pm_path))?;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut ents = vec![0u8; 8 << 16];
    let mut a = start;
    while a < end {
        let n = (((end - a) / PAGE) as usize).min(1 << 16);
        sys::pread_exact(&pagemap, &mut ents[..n * 8], a / PAGE * 8).map_err(io_at(&pm_path))?;
        for i in 0..n {
            if u64::from_le_bytes(ents[i * 8..i * 8 + 8].try_into().unwrap()) & PM_GUARD != 0 {
                let p = a + i as u64 * PAGE;
                match out.last_mut() {
                    Some((s, l)) if *s + *l == p => *l += PAGE,
                    _ => out.push((p, PAGE)),
                }
            }
        }
        a += n as u64 * PAGE;
    }
    Ok(out)
}

/// Every VMA (advice and growsdown not yet known) with its data pages streamed into `sink`.
fn collect_pages(
    pid: Pid,
    maps: &[MapLine],
    sink: &mut PageSink,
    precopy: Option<&Precopy>,
    borrowed: &[(u64, u64)],
) -> Result<Vec<Vma>> {
    let pm_path = proc_path(pid, "pagemap");
    let pagemap = File::open(&pm_path).map_err(io_at(&pm_path))?;
    let mut vmas = Vec::new();
    let mut ents: Vec<u8> = Vec::new();
    for m in maps.iter().filter(|m| !is_special(&m.path)) {
        let kind = classify(m)?;
        let npages = ((m.end - m.start) / PAGE) as usize;
        let lent = matches!(kind, VmaKind::SharedAnon { .. }) && borrowed.contains(&(m.start, m.end));
        let want: Box<dyn Fn(u64) -> bool> = match (&kind, m.shared()) {
            // Another member of the tree stores this memory.
            (VmaKind::SharedAnon { .. }, _) if lent => Box::new(|_| false),
            (VmaKind::SharedAnon { .. } | VmaKind::SysvShm { .. }, _) => Box::new(|_| true),
            (VmaKind::File { .. } | VmaKind::Memfd { .. } | VmaKind::Ghost { .. }, true) => Box::new(|_| false),
            (VmaKind::File { .. } | VmaKind::Memfd { .. } | VmaKind::Ghost { .. }, false) => {
                Box::new(|e| (e & PM_PRESENT != 0 && e & PM_FILE == 0) || e & PM_SWAP != 0)
            }
            (VmaKind::Anon { .. }, _) => Box::new(|e| e & (PM_PRESENT | PM_SWAP) != 0),
        };
        let split = match precopy {
            Some(p) => p.split(m)?,
            None => None,
        };
        let mut pages: Vec<(u64, u64)> = Vec::new(); // runs of (addr, len)
        let mut guards: Vec<(u64, u64)> = Vec::new();
        // (Shared anonymous memory is stored whole, but its guard pages must be skipped.)
        let needs_pagemap = !matches!(
            (&kind, m.shared()),
            (VmaKind::File { .. } | VmaKind::Memfd { .. } | VmaKind::Ghost { .. }, true)
        );
        let mut precopied = Vec::new();
        if let Some(split) = split {
            // Pre-copy: one PAGEMAP_SCAN already said which pages are new since the last
            // round, which the store holds, and where the guard pages are.
            (pages, precopied, guards) = (split.fresh, split.kept, split.guards);
        } else if !(matches!(kind, VmaKind::File { .. } | VmaKind::Memfd { .. } | VmaKind::Ghost { .. }) && m.shared())
        {
            // pagemap in chunks of 64 Ki pages (512 KiB of entries): a huge sparse reservation
            // costs time, not memory.
            const CHUNK: usize = 64 << 10;
            let mut first = 0usize;
            while first < npages {
                let n = (npages - first).min(CHUNK);
                if needs_pagemap {
                    ents.resize(n * 8, 0);
                    let at = (m.start / PAGE + first as u64) * 8;
                    sys::pread_exact(&pagemap, &mut ents, at).map_err(io_at(&pm_path))?;
                }
                for i in 0..n {
                    let e =
                        if needs_pagemap { u64::from_le_bytes(ents[i * 8..i * 8 + 8].try_into().unwrap()) } else { 0 };
                    if e & PM_GUARD != 0 {
                        // A guard page (MADV_GUARD_INSTALL): no data, installed again at restore.
                        let a = m.start + (first + i) as u64 * PAGE;
                        match guards.last_mut() {
                            Some((s, l)) if *s + *l == a => *l += PAGE,
                            _ => guards.push((a, PAGE)),
                        }
                    } else if want(e) {
                        let a = m.start + (first + i) as u64 * PAGE;
                        match pages.last_mut() {
                            Some((s, l)) if *s + *l == a => *l += PAGE,
                            _ => pages.push((a, PAGE)),
                        }
                    }
                }
                first += n;
            }
        }
        let runs = sink.plan(&pages);
        vmas.push(Vma {
            start: m.start,
            end: m.end,
            prot: m.prot(),
            shared: m.shared(),
            growsdown: false,
            advice: 0,
            guards,
            kind,
            runs,
            precopied,
        });
    }
    let mut jobs: Vec<(&mut Run, bool)> = vmas
        .iter_mut()
        .flat_map(|v| {
            let readable = v.prot & libc::PROT_READ as u32 != 0;
            v.runs.iter_mut().map(move |r| (r, readable))
        })
        .collect();
    sink.fill(pid, &mut jobs)?;
    Ok(vmas)
}

/// Rebuild side: maps every VMA into the stub (read+write where data will be written), writes the
/// pages from the image and sets the final protections.
/// `precopy` holds the data of the `precopied` runs (empty without pre-copy). SysV
/// attachments get no data here: `sysv::prepare` filled the segments it created.
/// `aliases`: shared anonymous mappings, by (start, end), that map an object another process of
/// the same tree restored already (fd in the process, offset): they get no data here either.
pub fn restore(
    r: &Remote,
    state: &MemoryState,
    pages: &[u8],
    precopy: &[u8],
    memfds: &HashMap<u64, u64>,
    lazy: bool,
    aliases: &HashMap<(u64, u64), (u64, u64)>,
) -> Result<()> {
    let pid = r.pid;
    let mut fds: HashMap<(String, bool), u64> = HashMap::new();
    for v in &state.vmas {
        let len = v.end - v.start;
        let mut prot = v.prot as u64;
        if v.has_data() {
            prot |= (libc::PROT_READ | libc::PROT_WRITE) as u64;
        }
        let what = format!("mmap {}", v.describe());
        let noreserve = if v.advice & advice::NORESERVE != 0 { libc::MAP_NORESERVE } else { 0 };
        match &v.kind {
            VmaKind::SharedAnon { .. } if aliases.contains_key(&(v.start, v.end)) => {
                let (fd, off) = aliases[&(v.start, v.end)];
                let fl = noreserve | libc::MAP_FIXED | libc::MAP_SHARED;
                r.call(&what, libc::SYS_mmap, &[v.start, len, prot, fl as u64, fd, off])?;
            }
            VmaKind::Anon { .. } | VmaKind::SharedAnon { .. } => {
                let mut fl = libc::MAP_ANONYMOUS | libc::MAP_FIXED | noreserve;
                fl |= if v.shared {
                    libc::MAP_SHARED
                } else if v.advice & advice::DROPPABLE != 0 {
                    0x08 // MAP_DROPPABLE, a mapping type of its own
                } else {
                    libc::MAP_PRIVATE
                };
                if v.growsdown {
                    fl |= libc::MAP_GROWSDOWN;
                }
                r.call(&what, libc::SYS_mmap, &[v.start, len, prot, fl as u64, u64::MAX, 0])?;
            }
            VmaKind::Memfd { ino, name, offset } => {
                let fd = *memfds.get(ino).ok_or_else(|| Error::Restore(format!("memfd {name} was not saved")))?;
                let fl = noreserve | libc::MAP_FIXED | if v.shared { libc::MAP_SHARED } else { libc::MAP_PRIVATE };
                r.call(&what, libc::SYS_mmap, &[v.start, len, prot, fl as u64, fd, *offset])?;
            }
            VmaKind::Ghost { ino, path, offset } => {
                let fd = *memfds
                    .get(&crate::ghosts::key(*ino))
                    .ok_or_else(|| Error::Restore(format!("deleted file {path} was not saved")))?;
                let fl = noreserve | libc::MAP_FIXED | if v.shared { libc::MAP_SHARED } else { libc::MAP_PRIVATE };
                r.call(&what, libc::SYS_mmap, &[v.start, len, prot, fl as u64, fd, *offset])?;
            }
            VmaKind::File { path, offset, .. } => {
                // Open read-write also when the mapping is read-only now but may be made
                // writable (`mw`: the original fd was open for writing).
                let rw = v.shared && (v.prot & libc::PROT_WRITE as u32 != 0 || v.advice & advice::MAYWRITE != 0);
                let fd = match fds.get(&(path.clone(), rw)) {
                    Some(fd) => *fd,
                    None => {
                        let a = r.put_cstr(0, path.as_bytes())?;
                        let fl = if rw { libc::O_RDWR } else { libc::O_RDONLY } | libc::O_CLOEXEC;
                        let fd = r.call(
                            &format!("open {path}"),
                            libc::SYS_openat,
                            &[libc::AT_FDCWD as u64, a, fl as u64, 0],
                        )?;
                        fds.insert((path.clone(), rw), fd);
                        fd
                    }
                };
                let fl = noreserve | libc::MAP_FIXED | if v.shared { libc::MAP_SHARED } else { libc::MAP_PRIVATE };
                r.call(&what, libc::SYS_mmap, &[v.start, len, prot, fl as u64, fd, *offset])?;
            }
            // One shmat per attachment, of the whole segment (read-write until the final
            // protections); its later parts (offset > 0) are mapped with it.
            VmaKind::SysvShm { id, offset: 0 } => {
                const SHM_RDONLY: u64 = 0o10000;
                const SHM_EXEC: u64 = 0o100000;
                let mut fl = if v.prot & libc::PROT_EXEC as u32 != 0 { SHM_EXEC } else { 0 };
                if v.advice & advice::MAYWRITE == 0 {
                    fl |= SHM_RDONLY;
                }
                let at = r.call(&format!("shmat {}", v.describe()), libc::SYS_shmat, &[*id as u64, v.start, fl])?;
                if at != v.start {
                    return Err(Error::Restore(format!("shmat {} attached at {at:#x}", v.describe())));
                }
            }
            VmaKind::SysvShm { .. } => {}
        }
        restore_name_and_advice(r, v)?;
    }
    for fd in fds.values() {
        r.call("close", libc::SYS_close, &[*fd])?;
    }
    let written = |v: &&Vma| !matches!(v.kind, VmaKind::SysvShm { .. }) && !aliases.contains_key(&(v.start, v.end));
    write_pages(pid, state.vmas.iter().filter(written).flat_map(|v| &v.runs), pages)?;
    let now = |v: &&Vma| written(v) && !(lazy && crate::lazy::eligible(v));
    write_pages(pid, state.vmas.iter().filter(now).flat_map(|v| &v.precopied), precopy)?;
    for v in &state.vmas {
        let attached_rw = matches!(v.kind, VmaKind::SysvShm { .. });
        if (v.has_data() || attached_rw) && v.prot != (libc::PROT_READ | libc::PROT_WRITE) as u32 {
            r.call(
                &format!("mprotect {}", v.describe()),
                libc::SYS_mprotect,
                &[v.start, v.end - v.start, v.prot as u64],
            )?;
        }
    }
    // Locks and seals last: with the final contents and protections.
    for v in &state.vmas {
        if v.advice & advice::LOCKED != 0 {
            let fl = if v.advice & advice::LOCK_ONFAULT != 0 { 1 } else { 0 }; // MLOCK_ONFAULT
            r.call(&format!("mlock2 {}", v.describe()), libc::SYS_mlock2, &[v.start, v.end - v.start, fl])?;
        }
    }
    for v in &state.vmas {
        if v.advice & advice::SEALED != 0 {
            r.call(&format!("mseal {}", v.describe()), 462 /* SYS_mseal */, &[v.start, v.end - v.start, 0])?;
        }
    }
    Ok(())
}

/// The VMA's name (`[anon:NAME]`, `[anon_shmem:NAME]`: `PR_SET_VMA_ANON_NAME`) and its madvise
/// advice, right after it was mapped.
fn restore_name_and_advice(r: &Remote, v: &Vma) -> Result<()> {
    let len = v.end - v.start;
    let name = match &v.kind {
        VmaKind::Anon { name } => name.strip_prefix("[anon:"),
        VmaKind::SharedAnon { name } => name.strip_prefix("[anon_shmem:"),
        _ => None,
    }
    .and_then(|n| n.strip_suffix(']'));
    if let Some(n) = name {
        let p = r.put_cstr(0, n.as_bytes())?;
        const PR_SET_VMA: u64 = 0x53564d41;
        r.call(
            &format!("prctl(PR_SET_VMA_ANON_NAME) {}", v.describe()),
            libc::SYS_prctl,
            &[PR_SET_VMA, 0, v.start, len, p],
        )?;
    }
    for (bit, adv, what) in [
        (advice::DONTFORK, libc::MADV_DONTFORK, "MADV_DONTFORK"),
        (advice::DONTDUMP, libc::MADV_DONTDUMP, "MADV_DONTDUMP"),
        (advice::WIPEONFORK, libc::MADV_WIPEONFORK, "MADV_WIPEONFORK"),
        (advice::HUGEPAGE, libc::MADV_HUGEPAGE, "MADV_HUGEPAGE"),
        (advice::NOHUGEPAGE, libc::MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE"),
        (advice::MERGEABLE, libc::MADV_MERGEABLE, "MADV_MERGEABLE"),
        (advice::SEQUENTIAL, libc::MADV_SEQUENTIAL, "MADV_SEQUENTIAL"),
        (advice::RANDOM, libc::MADV_RANDOM, "MADV_RANDOM"),
    ] {
        if v.advice & bit != 0 {
            r.call(&format!("madvise({what}) {}", v.describe()), libc::SYS_madvise, &[v.start, len, adv as u64])?;
        }
    }
    for &(a, l) in &v.guards {
        r.call(&format!("madvise(MADV_GUARD_INSTALL) {a:#x}+{l:#x}"), libc::SYS_madvise, &[a, l, 102])?;
    }
    Ok(())
}

/// Writes all stored runs. The runs are consecutive in pages.img, so each call takes one local
/// span and up to 512 remote ranges. Above 64 MiB the work is split in two halves written by two
/// threads: most of the time goes into faulting fresh pages in, which scales with cores.
fn write_pages<'a>(pid: Pid, runs: impl Iterator<Item = &'a Run>, pages: &[u8]) -> Result<()> {
    const PIECE: u64 = 16 << 20;
    let mut pieces: Vec<(u64, u64, u64)> = Vec::new(); // (addr, len, offset in pages)
    for r in runs {
        let mut o = 0;
        while o < r.len {
            let n = (r.len - o).min(PIECE);
            pieces.push((r.addr + o, n, r.off + o));
            o += n;
        }
    }
    let total: u64 = pieces.iter().map(|p| p.1).sum();
    if total < (64 << 20) {
        return write_pieces(pid, &pieces, pages);
    }
    let mut acc = 0;
    let split = pieces
        .iter()
        .position(|p| {
            acc += p.1;
            acc >= total / 2
        })
        .map_or(pieces.len(), |i| i + 1);
    let (a, b) = pieces.split_at(split);
    std::thread::scope(|s| {
        let h = s.spawn(|| write_pieces(pid, b, pages));
        let ra = write_pieces(pid, a, pages);
        let rb = h.join().unwrap_or_else(|_| Err(Error::Restore("page writer thread panicked".into())));
        ra.and(rb)
    })
}

fn write_pieces(pid: Pid, pieces: &[(u64, u64, u64)], pages: &[u8]) -> Result<()> {
    const MAX_IOV: usize = 512;
    const MAX_BYTES: u64 = 64 << 20;
    let mut i = 0;
    while i < pieces.len() {
        let first = pieces[i].2;
        let mut remote: Vec<(u64, usize)> = Vec::new();
        let mut total = 0u64;
        while i < pieces.len() && remote.len() < MAX_IOV && total < MAX_BYTES && pieces[i].2 == first + total {
            remote.push((pieces[i].0, pieces[i].1 as usize));
            total += pieces[i].1;
            i += 1;
        }
        let local = &pages[first as usize..(first + total) as usize];
        // process_vm_writev may stop early; continue from where it stopped.
        let mut done = 0usize;
        while done < local.len() {
            let mut skip = done;
            let mut rem: Vec<(u64, usize)> = Vec::new();
            for &(a, l) in &remote {
                if skip >= l {
                    skip -= l;
                    continue;
                }
                rem.push((a + skip as u64, l - skip));
                skip = 0;
            }
            let n = sys::vm_write(pid, &local[done..], &rem).map_err(pt("process_vm_writev", pid))?;
            if n == 0 {
                return Err(Error::Restore(format!("cannot write memory at {:#x}", rem[0].0)));
            }
            done += n;
        }
    }
    Ok(())
}

/// Reads pages through /proc/PID/mem (for VMAs without read permission).
pub fn read_mem(pid: Pid, addr: u64, buf: &mut [u8]) -> Result<()> {
    let p = proc_path(pid, "mem");
    let f = File::open(&p).map_err(io_at(&p))?;
    sys::pread_exact(&f, buf, addr).map_err(io_at(&p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(perms: &[u8; 4], path: &str) -> MapLine {
        MapLine { start: 0x1000, end: 0x3000, perms: *perms, offset: 0, inode: 0, path: path.into() }
    }
    fn flags(f: &str) -> Vec<String> {
        f.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn vm_flags_are_carried_or_refused_by_name() {
        let anon = line(b"rw-p", "");
        let (bits, gd) = judge_flags(&anon, &flags("rd wr mr mw me ac lo lf dc dd wf hg mg sr nr sd gd")).unwrap();
        assert!(gd);
        for b in [advice::LOCKED, advice::LOCK_ONFAULT, advice::DONTFORK, advice::DONTDUMP, advice::WIPEONFORK] {
            assert_ne!(bits & b, 0);
        }
        // `mw` matters only on a shared file mapping.
        assert_eq!(bits & advice::MAYWRITE, 0);
        let (bits, _) = judge_flags(&line(b"r--s", "/tmp/data"), &flags("rd mr mw me ms")).unwrap();
        assert_ne!(bits & advice::MAYWRITE, 0);
        // Refused, naming the flag: hugetlb, userfaultfd, a flag this engine does not know, a pkey.
        for (f, want) in [("rd ht", "hugetlb"), ("rd um", "userfaultfd"), ("rd zz", "`zz`"), ("rd pkey:3", "key 3")] {
            let e = judge_flags(&anon, &flags(f)).unwrap_err().to_string();
            assert!(e.contains("0x1000-0x3000") && e.contains(want), "{f}: {e}");
        }
    }
}
