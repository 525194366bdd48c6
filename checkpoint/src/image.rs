//! The image: what a dump writes and a restore reads.
//!
//! ```text
//!  DIR/ (0700)
//!  ├── manifest.img (0600)                    ├── pages.img (0600)
//!  │  0  magic     "DVKCKPT\0"    8 bytes      │  raw page data, every run page-aligned,
//!  │  8  version   u32 le  (= 1)               │  runs back to back in manifest order;
//!  │ 12  arch      u32 le  (62 = EM_X86_64)    │  never-populated pages are absent;
//!  │ 16  length    u64 le  of the payload      │  each run has its own CRC32 in the
//!  │ 24  crc32     u32 le  of the payload      │  manifest (memory.vmas[].runs[].crc)
//!  │ 28  hdr_crc   u32 le  of bytes 0..28      │
//!  │ 32  payload   postcard(Manifest)          │
//! ```
//!
//! Reading checks, in order: length ≥ header, magic, version, architecture, header CRC, payload
//! length, payload CRC, payload decoding, page file length, every run's CRC — each with its own
//! error variant — so a wrong image is refused before anything is created.
//!
//! Version rule: any change to the header or to a serialized struct bumps [`VERSION`] (postcard
//! is not self-describing); a reader accepts exactly its own version.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cpu::{CpuIdent, CpuState};
use crate::error::{io_at, pt, Error, Result};
use crate::files::FilesState;
use crate::locks::FileLock;
use crate::memfd::MemfdState;
use crate::memory::{self, MemoryState, Run};
use crate::signals::SignalState;
use crate::sys::{self, MappedFile, Pid};
use crate::sysv::{MsgQueue, SemSet, ShmSegment};
use crate::task::TaskState;
use crate::threads::ThreadState;
use crate::vdso::VdsoLayout;

pub const MAGIC: [u8; 8] = *b"DVKCKPT\0";
pub const VERSION: u32 = 11;
pub const ARCH_X86_64: u32 = 62;
pub const HEADER_LEN: usize = 32;
pub const MANIFEST: &str = "manifest.img";
pub const PAGES: &str = "pages.img";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub pid: i32,
    pub comm: String,
    pub kernel: String,
    pub cpu_ident: CpuIdent,
    pub vdso: VdsoLayout,
    pub cpu: CpuState,
    pub memory: MemoryState,
    pub files: FilesState,
    /// File locks (POSIX, OFD, flock), taken again once the fds are in place.
    pub locks: Vec<FileLock>,
    pub signals: SignalState,
    pub task: TaskState,
    /// Threads other than the main one.
    pub threads: Vec<ThreadState>,
    /// SysV shared memory segments attached (their pages are in the attachments' runs).
    pub shm: Vec<ShmSegment>,
    /// SysV semaphore sets and message queues the process is seen to use (see `sysv`).
    pub sem: Vec<SemSet>,
    pub msg: Vec<MsgQueue>,
    /// memfds, their content in memfd-<inode>.img.
    pub memfds: Vec<MemfdState>,
    pub pages_len: u64,
    /// Bytes of the pre-copy store the `precopied` runs refer to (0 without pre-copy).
    pub precopy_len: u64,
    /// POSIX timers (`timer_create`).
    pub posix_timers: Vec<crate::timers::PosixTimer>,
    /// Files deleted while open, their data in ghost-<inode>.img.
    pub ghosts: Vec<crate::ghosts::GhostState>,
}

/// Largest manifest a reader accepts (a process with tens of thousands of mappings, fds and
/// threads stays far below); a larger file is refused before it is read.
pub const MAX_MANIFEST: u64 = 64 << 20;

/// Makes `dir` ready for an image, or refuses it. The dumper may be root and the path may come
/// from anyone: a directory another user owns (or could swap, through a parent of theirs) might
/// hold planted symlinks or be replaced under us, so only a directory that is the caller's, in
/// parents that are root's or the caller's, is used. It is made 0700 (through the fd: a symlink
/// is never followed), and image files left in it by an earlier dump are removed (unlink does not
/// follow symlinks either) so every file is then created new, with `O_EXCL|O_NOFOLLOW`.
pub fn create_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_at(dir))?;
    let unsafe_dir = |why: String| Error::Unsafe { path: dir.to_path_buf(), why };
    let me = sys::euid();
    let d = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => unsafe_dir("is a symlink or not a directory; refused".into()),
            _ => Error::Io { path: dir.to_path_buf(), err: e },
        })?;
    let m = d.metadata().map_err(io_at(dir))?;
    if m.uid() != me {
        return Err(unsafe_dir(format!("belongs to uid {}, not to the caller (uid {me}); refused", m.uid())));
    }
    let real = std::fs::canonicalize(dir).map_err(io_at(dir))?;
    for parent in real.ancestors().skip(1) {
        let pm = std::fs::symlink_metadata(parent).map_err(io_at(parent))?;
        if pm.uid() != 0 && pm.uid() != me {
            return Err(unsafe_dir(format!(
                "its parent {} belongs to uid {}, who could swap the directory; refused",
                parent.display(),
                pm.uid()
            )));
        }
    }
    use std::os::unix::fs::PermissionsExt;
    d.set_permissions(std::fs::Permissions::from_mode(0o700)).map_err(io_at(dir))?;
    for e in std::fs::read_dir(dir).map_err(io_at(dir))?.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        // (tree.img too: a process tree's image here before would otherwise be restored instead.)
        if name == MANIFEST
            || name == PAGES
            || name == crate::tree::TREE
            || (name.starts_with("memfd-") && name.ends_with(".img"))
        {
            std::fs::remove_file(e.path()).map_err(io_at(e.path()))?;
        }
    }
    Ok(())
}

/// Creates an image file: new (`O_EXCL`), never through a symlink, 0600.
pub(crate) fn create_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o600)
        .open(path)
        .map_err(io_at(path))
}

/// Opens an image file for reading: not through a symlink, and only a regular file (a FIFO put
/// in its place would block the reader forever; a device could be endless). Returns its size.
pub(crate) fn open_image_file(path: &Path) -> Result<(File, u64)> {
    // O_NONBLOCK: opening a FIFO for reading returns at once instead of waiting for a writer.
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => Error::Unsafe { path: path.to_path_buf(), why: "is a symlink; refused".into() },
            _ => Error::Io { path: path.to_path_buf(), err: e },
        })?;
    let m = f.metadata().map_err(io_at(path))?;
    if !m.file_type().is_file() {
        return Err(Error::Unsafe { path: path.to_path_buf(), why: "is not a regular file; refused".into() });
    }
    Ok((f, m.len()))
}

/// Reads a whole image file of at most `max` bytes (checked before reading).
pub(crate) fn read_image_file(path: &Path, max: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let (f, len) = open_image_file(path)?;
    if len > max {
        return Err(Error::Unsafe { path: path.to_path_buf(), why: format!("{len} bytes, more than {max}; refused") });
    }
    let mut out = Vec::with_capacity(len as usize);
    // take(): a file that grows while being read is still cut at the limit.
    f.take(max + 1).read_to_end(&mut out).map_err(io_at(path))?;
    if out.len() as u64 > max {
        return Err(Error::Unsafe { path: path.to_path_buf(), why: format!("grew past {max} bytes; refused") });
    }
    Ok(out)
}

/// Encodes header + payload.
pub fn encode_manifest(m: &Manifest) -> Result<Vec<u8>> {
    encode_payload(&MAGIC, VERSION, m, MANIFEST)
}

/// Header (`magic`, `version`, architecture, length, CRCs) + postcard payload: the manifest's
/// format, also used by the process tree's `tree.img`.
pub(crate) fn encode_payload<T: Serialize>(magic: &[u8; 8], version: u32, m: &T, name: &str) -> Result<Vec<u8>> {
    let payload = postcard::to_allocvec(m).map_err(|e| Error::Decode { path: name.into(), msg: e.to_string() })?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&ARCH_X86_64.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    let hcrc = crc32fast::hash(&out[..28]);
    out.extend_from_slice(&hcrc.to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes and checks header + payload, in the documented order.
pub fn decode_manifest(b: &[u8], path: &Path) -> Result<Manifest> {
    decode_payload(&MAGIC, VERSION, b, path)
}

/// Checks and decodes what [`encode_payload`] wrote, in the documented order.
pub(crate) fn decode_payload<T: serde::de::DeserializeOwned>(
    magic: &[u8; 8],
    want: u32,
    b: &[u8],
    path: &Path,
) -> Result<T> {
    let p = || path.to_path_buf();
    if b.len() < HEADER_LEN {
        if b.len() >= 8 && b[..8] != magic[..] {
            return Err(Error::BadMagic { path: p() });
        }
        return Err(Error::Truncated { path: p(), what: format!("header: {} of {HEADER_LEN} bytes", b.len()) });
    }
    if b[..8] != magic[..] {
        return Err(Error::BadMagic { path: p() });
    }
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let version = u32_at(8);
    if version != want {
        return Err(Error::BadVersion { path: p(), found: version, supported: want });
    }
    let arch = u32_at(12);
    if arch != ARCH_X86_64 {
        return Err(Error::BadArch { path: p(), found: arch, here: ARCH_X86_64 });
    }
    if crc32fast::hash(&b[..28]) != u32_at(28) {
        return Err(Error::Checksum { path: p(), what: "header".into() });
    }
    let len = u64::from_le_bytes(b[16..24].try_into().unwrap()) as usize;
    let payload = &b[HEADER_LEN..];
    if payload.len() < len {
        return Err(Error::Truncated { path: p(), what: format!("manifest: {} of {len} bytes", payload.len()) });
    }
    if payload.len() > len {
        return Err(Error::Decode { path: p(), msg: format!("{} bytes after the manifest", payload.len() - len) });
    }
    if crc32fast::hash(payload) != u32_at(24) {
        return Err(Error::Checksum { path: p(), what: "manifest".into() });
    }
    match postcard::take_from_bytes(payload) {
        Ok((m, [])) => Ok(m),
        Ok((_, rest)) => {
            Err(Error::Decode { path: p(), msg: format!("{} bytes after the manifest's last field", rest.len()) })
        }
        Err(e) => Err(Error::Decode { path: p(), msg: e.to_string() }),
    }
}

pub fn write_manifest(dir: &Path, m: &Manifest) -> Result<u64> {
    let bytes = encode_manifest(m)?;
    let path = dir.join(MANIFEST);
    let mut f = create_file(&path)?;
    f.write_all(&bytes).map_err(io_at(&path))?;
    f.sync_data().ok();
    Ok(bytes.len() as u64)
}

/// A read image: the checked manifest and the mapped, checked page data.
pub struct Image {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub pages: MappedFile,
    /// The pre-copy store (empty without pre-copy); shared with a lazy restore's copy thread.
    pub precopy: std::sync::Arc<MappedFile>,
    /// Content of each memfd, in manifest order (checked).
    pub memfd_data: Vec<Vec<u8>>,
    /// The data of each deleted file, in manifest order.
    pub ghost_data: Vec<Vec<u8>>,
}

/// Reads and verifies an image (manifest header and checksum, page file length and every run's
/// checksum) without creating anything.
pub fn read(dir: &Path) -> Result<Image> {
    // The manifest is the image: a directory without one is named by it.
    let mpath = dir.join(MANIFEST);
    open_image_file(&mpath)?;
    let ppath = dir.join(PAGES);
    let (f, len) = open_image_file(&ppath)?;
    let pages = MappedFile::map(&f, len as usize).map_err(io_at(&ppath))?;
    let cpath = dir.join(crate::precopy::PRECOPY);
    let precopy = match open_image_file(&cpath) {
        Ok((f, len)) => MappedFile::map(&f, len as usize).map_err(io_at(&cpath))?,
        Err(Error::Io { err, .. }) if err.kind() == std::io::ErrorKind::NotFound => MappedFile::empty(),
        Err(e) => return Err(e),
    };
    read_with_pages(dir, pages, precopy)
}

/// [`read`], with the page data already in memory (received over the network into an
/// anonymous mapping) instead of in pages.img. Every check is the same.
/// `precopy` is the pre-copy store (empty without pre-copy); its runs are bounds-checked
/// only (it was filled while the process ran, so there is no checksum of it).
pub fn read_with_pages(dir: &Path, pages: MappedFile, precopy: MappedFile) -> Result<Image> {
    let mpath = dir.join(MANIFEST);
    let bytes = read_image_file(&mpath, MAX_MANIFEST)?;
    let manifest = decode_manifest(&bytes, &mpath)?;
    let ppath = dir.join(PAGES);
    let len = pages.bytes().len() as u64;
    if len < manifest.pages_len {
        return Err(Error::Truncated {
            path: ppath,
            what: format!("page data: {len} of {} bytes", manifest.pages_len),
        });
    }
    let b = &pages.bytes()[..manifest.pages_len as usize];
    for v in &manifest.memory.vmas {
        for r in &v.runs {
            let end = r.off.checked_add(r.len).filter(|&e| e <= manifest.pages_len);
            let Some(end) = end else {
                return Err(Error::Truncated { path: ppath, what: format!("run at {:#x}", r.addr) });
            };
            if crc32fast::hash(&b[r.off as usize..end as usize]) != r.crc {
                return Err(Error::Checksum {
                    path: ppath,
                    what: format!("pages {:#x}-{:#x} of mapping {}", r.addr, r.addr + r.len, v.describe()),
                });
            }
        }
    }
    let cpath = dir.join(crate::precopy::PRECOPY);
    let have = precopy.bytes().len() as u64;
    if have < manifest.precopy_len {
        return Err(Error::Truncated {
            path: cpath,
            what: format!("pre-copied page data: {have} of {} bytes", manifest.precopy_len),
        });
    }
    for v in &manifest.memory.vmas {
        for r in &v.precopied {
            if r.off.checked_add(r.len).is_none_or(|e| e > manifest.precopy_len) {
                return Err(Error::Truncated { path: cpath, what: format!("pre-copied run at {:#x}", r.addr) });
            }
        }
    }
    let memfd_data = crate::memfd::read_all(dir, &manifest.memfds)?;
    let ghost_data = crate::ghosts::read_all(dir, &manifest.ghosts)?;
    let precopy = std::sync::Arc::new(precopy);
    Ok(Image { dir: dir.to_path_buf(), manifest, pages, precopy, memfd_data, ghost_data })
}

/// Writes page data into pages.img. Runs are planned first (at most [`MAX_RUN`] bytes each,
/// offsets assigned in order), then filled: `process_vm_readv` of up to 512 runs into an 8 MiB
/// buffer, CRC32 of each run, `pwrite` at its offset — by two threads on disjoint halves above
/// 64 MiB (reading another process's memory and filling the page cache both scale with cores).
pub struct PageSink {
    out: Box<dyn PageOut>,
    path: PathBuf,
    off: u64,
}

/// Where page data goes: pages.img by default, or anything else that takes it by offset (the
/// dvk agent streams it straight onto the link to the destination during a move, so pages never
/// pass through a file on the source).
pub trait PageOut: Send + Sync {
    /// Called once the runs are planned, before any data: the page data is `len` bytes.
    fn reserve(&self, _len: u64) -> std::io::Result<()> {
        Ok(())
    }
    /// `buf` belongs at offset `off` of the page data (calls may come from two threads, for
    /// disjoint ranges).
    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()>;
}

struct FileOut(File);

/// A [`PageOut`] into a new file at `path` (0600): a local pre-copy's store.
pub fn file_out(path: &Path) -> Result<PagesTo> {
    Ok(PagesTo(std::sync::Arc::new(FileOut(create_file(path)?))))
}

impl PageOut for FileOut {
    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.0.write_all_at(buf, off)
    }
}

/// A [`PageOut`] a caller provides through [`crate::DumpOptions::pages_to`].
#[derive(Clone)]
pub struct PagesTo(pub std::sync::Arc<dyn PageOut>);

impl std::fmt::Debug for PagesTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PagesTo(..)")
    }
}

impl PageOut for PagesTo {
    fn reserve(&self, len: u64) -> std::io::Result<()> {
        self.0.reserve(len)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.0.write_at(buf, off)
    }
}

/// Largest run: one run always fits one read buffer, so its CRC is computed in one go.
pub const MAX_RUN: u64 = 8 << 20;
const MAX_IOV: usize = 512;

impl PageSink {
    pub fn create(dir: &Path) -> Result<PageSink> {
        let path = dir.join(PAGES);
        let file = create_file(&path)?;
        Ok(PageSink { out: Box::new(FileOut(file)), path, off: 0 })
    }

    /// Page data goes to `out` instead of pages.img in `dir`.
    pub fn to(dir: &Path, out: PagesTo) -> PageSink {
        PageSink { out: Box::new(out), path: dir.join(PAGES), off: 0 }
    }

    pub fn len(&self) -> u64 {
        self.off
    }

    pub fn is_empty(&self) -> bool {
        self.off == 0
    }

    /// Plans the page runs `(addr, len)`: split to at most [`MAX_RUN`] bytes, offsets assigned.
    pub fn plan(&mut self, runs: &[(u64, u64)]) -> Vec<Run> {
        let mut out = Vec::with_capacity(runs.len());
        for &(addr, len) in runs {
            let mut o = 0;
            while o < len {
                let n = (len - o).min(MAX_RUN);
                out.push(Run { addr: addr + o, len: n, off: self.off, crc: 0 });
                self.off += n;
                o += n;
            }
        }
        out
    }

    /// Reads every planned run from `pid`, fills in its CRC and writes it at its offset.
    /// `readable`: false for runs of VMAs without read permission (read through /proc/PID/mem).
    pub fn fill(&self, pid: Pid, jobs: &mut [(&mut Run, bool)]) -> Result<()> {
        self.out.reserve(self.off).map_err(io_at(&self.path))?;
        let total: u64 = jobs.iter().map(|j| j.0.len).sum();
        if total < (64 << 20) {
            return self.fill_part(pid, jobs);
        }
        let mut acc = 0;
        let split = jobs
            .iter()
            .position(|j| {
                acc += j.0.len;
                acc >= total / 2
            })
            .map_or(jobs.len(), |i| i + 1);
        let (a, b) = jobs.split_at_mut(split);
        std::thread::scope(|s| {
            let h = s.spawn(|| self.fill_part(pid, b));
            let ra = self.fill_part(pid, a);
            let rb = h.join().unwrap_or_else(|_| Err(Error::Restore("page reader thread panicked".into())));
            ra.and(rb)
        })
    }

    fn fill_part(&self, pid: Pid, jobs: &mut [(&mut Run, bool)]) -> Result<()> {
        let need: u64 = jobs.iter().map(|j| j.0.len).sum();
        let mut buf = vec![0u8; need.min(MAX_RUN) as usize];
        let mut i = 0;
        while i < jobs.len() {
            // A batch: consecutive runs (in the file), same readability, fitting the buffer.
            let first = jobs[i].0.off;
            let readable = jobs[i].1;
            let mut j = i;
            let mut fill = 0u64;
            while j < jobs.len()
                && j - i < MAX_IOV
                && jobs[j].1 == readable
                && jobs[j].0.off == first + fill
                && fill + jobs[j].0.len <= MAX_RUN
            {
                fill += jobs[j].0.len;
                j += 1;
            }
            let total = fill as usize;
            if readable {
                let remote: Vec<(u64, usize)> = jobs[i..j].iter().map(|r| (r.0.addr, r.0.len as usize)).collect();
                let n = sys::vm_read(pid, &mut buf[..total], &remote).map_err(pt("process_vm_readv", pid))?;
                if n != total {
                    return Err(Error::Restore(format!(
                        "process {pid}: memory at {:#x} could not be read ({n} of {total} bytes)",
                        remote[0].0
                    )));
                }
            } else {
                let mut o = 0;
                for r in &jobs[i..j] {
                    memory::read_mem(pid, r.0.addr, &mut buf[o..o + r.0.len as usize])?;
                    o += r.0.len as usize;
                }
            }
            let mut o = 0;
            for r in &mut jobs[i..j] {
                let l = r.0.len as usize;
                r.0.crc = crc32fast::hash(&buf[o..o + l]);
                o += l;
            }
            self.out.write_at(&buf[..total], first).map_err(io_at(&self.path))?;
            i = j;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{FileIdent, Vma, VmaKind};

    fn sample(pages_len: u64, runs: Vec<Run>) -> Manifest {
        Manifest {
            pid: 4242,
            comm: "sample".into(),
            kernel: "6.18".into(),
            cpu_ident: Default::default(),
            vdso: Default::default(),
            cpu: Default::default(),
            memory: MemoryState {
                vmas: vec![
                    Vma {
                        start: 0x10000,
                        end: 0x20000,
                        prot: 3,
                        shared: false,
                        growsdown: false,
                        advice: 0,
                        guards: vec![],
                        kind: VmaKind::Anon { name: "[heap]".into() },
                        runs,
                        precopied: vec![],
                    },
                    Vma {
                        start: 0x40000,
                        end: 0x41000,
                        prot: 5,
                        shared: false,
                        growsdown: false,
                        advice: 0,
                        guards: vec![],
                        kind: VmaKind::File {
                            path: "/bin/true".into(),
                            offset: 0,
                            ident: FileIdent { ino: 1, size: 2, mtime: 3, mtime_ns: 4 },
                        },
                        runs: vec![],
                        precopied: vec![],
                    },
                ],
            },
            files: Default::default(),
            locks: vec![],
            shm: vec![],
            sem: vec![],
            msg: vec![],
            signals: Default::default(),
            task: Default::default(),
            threads: vec![],
            memfds: vec![],
            pages_len,
            precopy_len: 0,
            posix_timers: vec![],
            ghosts: vec![],
        }
    }

    /// Writes an image with two stored pages; returns its directory.
    fn write_sample() -> (tempfile::TempDir, Manifest) {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("img");
        create_dir(&dir).unwrap();
        let mut data = vec![0u8; 8192];
        data[..4096].fill(1);
        data[4096..].fill(2);
        let run = Run { addr: 0x10000, len: 8192, off: 0, crc: crc32fast::hash(&data) };
        let m = sample(8192, vec![run]);
        write_manifest(&dir, &m).unwrap();
        std::fs::write(dir.join(PAGES), &data).unwrap();
        (d, m)
    }

    fn dir(d: &tempfile::TempDir) -> PathBuf {
        d.path().join("img")
    }

    fn patch(d: &tempfile::TempDir, file: &str, f: impl FnOnce(&mut Vec<u8>)) {
        let p = dir(d).join(file);
        let mut b = std::fs::read(&p).unwrap();
        f(&mut b);
        std::fs::write(&p, b).unwrap();
    }

    #[test]
    fn round_trip() {
        let (d, m) = write_sample();
        let img = read(&dir(&d)).unwrap();
        assert_eq!(img.manifest, m);
        assert_eq!(img.pages.bytes()[4096], 2);
    }

    #[test]
    fn permissions_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let (d, _) = write_sample();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir(&d)), 0o700);
        assert_eq!(mode(&dir(&d).join(MANIFEST)), 0o600);
    }

    #[test]
    fn refuses_bad_magic() {
        let (d, _) = write_sample();
        patch(&d, MANIFEST, |b| b[0] = b'X');
        assert!(matches!(read(&dir(&d)), Err(Error::BadMagic { .. })));
    }

    #[test]
    fn refuses_other_version() {
        let (d, _) = write_sample();
        patch(&d, MANIFEST, |b| b[8..12].copy_from_slice(&99u32.to_le_bytes()));
        match read(&dir(&d)) {
            Err(Error::BadVersion { found: 99, supported: VERSION, .. }) => {}
            other => panic!("{:?}", other.err()),
        }
    }

    #[test]
    fn refuses_other_arch() {
        let (d, _) = write_sample();
        patch(&d, MANIFEST, |b| b[12..16].copy_from_slice(&183u32.to_le_bytes()));
        assert!(matches!(read(&dir(&d)), Err(Error::BadArch { found: 183, .. })));
    }

    #[test]
    fn refuses_corrupt_header() {
        let (d, _) = write_sample();
        patch(&d, MANIFEST, |b| b[20] ^= 1); // inside the length field
        assert!(matches!(read(&dir(&d)), Err(Error::Checksum { what, .. }) if what == "header"));
    }

    #[test]
    fn refuses_truncated_header_and_manifest() {
        let (d, _) = write_sample();
        patch(&d, MANIFEST, |b| b.truncate(20));
        assert!(matches!(read(&dir(&d)), Err(Error::Truncated { .. })));
        let (d, _) = write_sample();
        patch(&d, MANIFEST, |b| {
            let n = b.len() - 5;
            b.truncate(n)
        });
        let e = read(&dir(&d)).err().unwrap();
        assert!(matches!(e, Error::Truncated { .. }), "{e}");
    }

    #[test]
    fn refuses_corrupt_manifest() {
        let (d, _) = write_sample();
        patch(&d, MANIFEST, |b| {
            let n = b.len() - 3;
            b[n] ^= 0x40
        });
        assert!(matches!(read(&dir(&d)), Err(Error::Checksum { what, .. }) if what == "manifest"));
    }

    #[test]
    fn refuses_truncated_pages() {
        let (d, _) = write_sample();
        patch(&d, PAGES, |b| b.truncate(4096));
        assert!(matches!(read(&dir(&d)), Err(Error::Truncated { what, .. }) if what.starts_with("page data")));
    }

    #[test]
    fn refuses_corrupt_pages_naming_the_mapping() {
        let (d, _) = write_sample();
        patch(&d, PAGES, |b| b[5000] ^= 0xff);
        let e = read(&dir(&d)).err().unwrap();
        assert!(matches!(e, Error::Checksum { .. }));
        assert!(e.to_string().contains("[heap]"), "{e}");
    }

    #[test]
    fn missing_image_is_an_io_error_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let e = read(d.path()).err().unwrap();
        assert!(e.to_string().contains(MANIFEST), "{e}");
    }

    // ---- image directories another user could have prepared (issue 9 item 8)

    #[test]
    fn refuses_trailing_bytes_after_the_manifest() {
        let (d, _) = write_sample();
        patch(&d, MANIFEST, |b| b.extend_from_slice(b"extra"));
        match read(&dir(&d)) {
            Err(Error::Decode { msg, .. }) => assert!(msg.contains("5 bytes after the manifest"), "{msg}"),
            other => panic!("{:?}", other.err()),
        }
    }

    #[test]
    fn refuses_an_oversized_manifest_without_reading_it() {
        let (d, _) = write_sample();
        let f = OpenOptions::new().write(true).open(dir(&d).join(MANIFEST)).unwrap();
        f.set_len(MAX_MANIFEST + 1).unwrap(); // sparse: nothing is written
        match read(&dir(&d)) {
            Err(Error::Unsafe { why, .. }) => assert!(why.contains("more than"), "{why}"),
            other => panic!("{:?}", other.err()),
        }
    }

    /// A FIFO in place of an image file is refused at once; the reader used to wait forever
    /// for a writer. Read on a thread so that a regression fails instead of hanging.
    fn refused_not_waited_on(d: &tempfile::TempDir, file: &str) {
        let p = dir(d).join(file);
        std::fs::remove_file(&p).unwrap();
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let dir = dir(d);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(read(&dir).map(|_| ()));
        });
        match rx.recv_timeout(std::time::Duration::from_secs(20)) {
            Ok(Err(Error::Unsafe { why, .. })) => assert!(why.contains("not a regular file"), "{why}"),
            Ok(other) => panic!("a FIFO as {file}: {:?}", other.err()),
            Err(_) => panic!("reading an image with a FIFO as {file} blocked"),
        }
    }

    #[test]
    fn refuses_a_fifo_as_pages_or_manifest() {
        let (d, _) = write_sample();
        refused_not_waited_on(&d, PAGES);
        let (d, _) = write_sample();
        refused_not_waited_on(&d, MANIFEST);
    }

    #[test]
    fn refuses_a_symlinked_image_file_on_read() {
        let (d, _) = write_sample();
        let p = dir(&d).join(PAGES);
        let elsewhere = d.path().join("pages-elsewhere");
        std::fs::rename(&p, &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &p).unwrap();
        assert!(matches!(read(&dir(&d)), Err(Error::Unsafe { .. })));
    }

    #[test]
    fn image_files_are_created_new_and_never_through_a_symlink() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let dir = d.path().join("img");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink(&victim, dir.join(PAGES)).unwrap();
        assert!(create_file(&dir.join(PAGES)).is_err(), "created a file through a symlink");
        // A new dump into the directory drops what an earlier one (or anyone) left there.
        create_dir(&dir).unwrap();
        PageSink::create(&dir).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(std::fs::symlink_metadata(dir.join(PAGES)).unwrap().file_type().is_file());
    }

    #[test]
    fn refuses_a_symlink_as_the_image_directory() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(matches!(create_dir(&link), Err(Error::Unsafe { .. })));
    }

    #[test]
    fn refuses_a_directory_of_another_user_or_under_one() {
        if sys::euid() != 0 {
            eprintln!("SKIP refuses_a_directory_of_another_user_or_under_one: needs root to chown");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let theirs = d.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        match create_dir(&theirs) {
            Err(Error::Unsafe { why, .. }) => assert!(why.contains("belongs to uid 65534"), "{why}"),
            other => panic!("{:?}", other.err()),
        }
        // Ours, but inside theirs: they could rename it away and put anything in its place.
        match create_dir(&theirs.join("ours")) {
            Err(Error::Unsafe { why, .. }) => assert!(why.contains("parent"), "{why}"),
            other => panic!("{:?}", other.err()),
        }
    }
}
