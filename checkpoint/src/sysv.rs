//! SysV IPC: shared memory segments the process has attached are carried (key, id, size,
//! owner, mode, SHM_LOCK, contents, and whether it was marked removed with IPC_RMID);
//! semaphore sets and message queues it is seen to use are refused by name.
//!
//! Found: an attachment shows in /proc/PID/maps as `/SYSV<key in hex>` (`(deleted)` once
//! IPC_RMID-ed), with the segment's id as its inode; the segment itself in /proc/sysvipc/shm.
//! Its pages are stored from the process's mapping like shared anonymous memory (every page
//! of every attachment).
//!
//! Rebuild, from the restorer (before the memory):
//! - a segment with the image's id, key and size still exists (a restore on the same machine,
//!   the segment outliving the process as SysV segments do): it is attached as it is, and its
//!   pages are *not* written (the segment is the live object; others may have written since);
//! - else it is created again under the same id: `/proc/sys/kernel/shm_next_id` is set to the id
//!   and `shmget(key, IPC_CREAT | IPC_EXCL)` must return exactly that id (the kernel takes the
//!   next free slot at or above it otherwise) — the program holds its ids in memory where they
//!   cannot be found and fixed up, so a segment whose id (or key) is taken here is refused,
//!   naming it; then owner and mode (IPC_SET) and SHM_LOCK, and its pages are written into it
//!   by the restorer (attached in its own address space for the copy: an attachment of the
//!   process may be read-only);
//! - each attachment is `shmat(id, address)` injected into the process, SHM_RDONLY where the
//!   mapping could not be made writable (no `mw` in VmFlags); split attachments (mprotect) are
//!   one `shmat` of the whole segment, as they were;
//! - a segment that was IPC_RMID-ed at dump is IPC_RMID-ed again once attached (it goes away
//!   with its last attachment, as before). Segments created by a restore that fails are removed.
//!
//! Not carried: the creator uid/gid (`cuid`/`cgid`: the restorer creates the segment), times
//! and last pids; segments the process does not have attached (it may hold their ids only);
//! a segment partly unmapped (refused).
//!
//! Semaphores and message queues carry no per-process trace in /proc. What is detected: a
//! semaphore set where the process did the last `semop` on any semaphore (`semctl(GETPID)`), a
//! message queue it last sent to or received from (`lspid`/`lrpid` in /proc/sysvipc/msg). A set
//! or queue used only through other processes' operations, and SEM_UNDO adjustments, are not
//! seen.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::memory::{MemoryState, VmaKind};
use crate::proc::{proc_path, MapLine};
use crate::sys::{self, Pid};

const PAGE: u64 = 4096;
/// In `mode`: marked removed (IPC_RMID) / locked in memory (SHM_LOCK).
const SHM_DEST: u32 = 0o1000;
const SHM_LOCKED: u32 = 0o2000;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShmSegment {
    pub id: i32,
    /// 0 (IPC_PRIVATE) for a private segment, and for any once IPC_RMID-ed.
    pub key: i32,
    pub size: u64,
    /// Permission bits, with SHM_DEST and SHM_LOCKED.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl ShmSegment {
    pub fn removed(&self) -> bool {
        self.mode & SHM_DEST != 0
    }
    fn name(&self) -> String {
        format!("SysV shared memory segment {} (key {:#010x}, {} bytes)", self.id, self.key as u32, self.size)
    }
}

/// Is this mapping a SysV attachment?
pub fn is_shm(path: &str) -> bool {
    path.starts_with("/SYSV")
}

/// Every segment in this IPC namespace, by id (from /proc/sysvipc/shm).
fn segments() -> HashMap<i32, ShmSegment> {
    parse_shm(&std::fs::read_to_string("/proc/sysvipc/shm").unwrap_or_default())
}

/// The text of /proc/sysvipc/shm, by id.
fn parse_shm(text: &str) -> HashMap<i32, ShmSegment> {
    let mut out = HashMap::new();
    for l in text.lines().skip(1) {
        // key shmid perms size cpid lpid nattch uid gid cuid cgid …
        let t: Vec<&str> = l.split_whitespace().collect();
        if t.len() < 11 {
            continue;
        }
        let (Ok(key), Ok(id), Ok(mode), Ok(size), Ok(uid), Ok(gid)) = (
            t[0].parse::<i32>(),
            t[1].parse::<i32>(),
            u32::from_str_radix(t[2], 8),
            t[3].parse::<u64>(),
            t[7].parse::<u32>(),
            t[8].parse::<u32>(),
        ) else {
            continue;
        };
        out.insert(id, ShmSegment { id, key, size, mode, uid, gid });
    }
    out
}

fn ipc_ns(pid: Pid) -> Option<std::path::PathBuf> {
    std::fs::read_link(proc_path(pid, "ns/ipc")).ok()
}

/// Every reason the process's SysV IPC objects cannot be carried, without touching it.
pub fn blockers(pid: Pid, maps: &[MapLine]) -> Vec<Error> {
    let mut v = Vec::new();
    let attached: Vec<&MapLine> = maps.iter().filter(|m| is_shm(&m.path)).collect();
    if !attached.is_empty() {
        if ipc_ns(pid) != ipc_ns(std::process::id() as Pid) {
            v.push(Error::Unsupported {
                pid,
                what: "SysV shared memory in another IPC namespace than the dumper's".into(),
            });
        } else {
            let segs = segments();
            for m in &attached {
                let refuse = |why: String| Error::UnsupportedMapping { range: m.range(), what: m.path.clone(), why };
                let Some(s) = segs.get(&(m.inode as i32)) else {
                    v.push(refuse(format!("SysV segment {} is not in /proc/sysvipc/shm", m.inode)));
                    continue;
                };
                // The whole segment must still be attached where this attachment starts.
                let base = m.start - m.offset;
                let want = s.size.div_ceil(PAGE) * PAGE;
                let mut at = base;
                for p in attached.iter().filter(|p| p.inode == m.inode && p.start - p.offset == base) {
                    if p.start == at {
                        at = p.end;
                    }
                }
                if at - base != want {
                    v.push(refuse(format!(
                        "{} is attached only in part (munmap of part of it): not carried",
                        s.name()
                    )));
                }
            }
        }
    }
    v.extend(sem_msg_blockers(pid));
    v
}

/// Semaphore sets and message queues the process is seen to use (see the module doc).
fn sem_msg_blockers(pid: Pid) -> Vec<Error> {
    let mut v = Vec::new();
    let sem = std::fs::read_to_string("/proc/sysvipc/sem").unwrap_or_default();
    for l in sem.lines().skip(1) {
        // key semid perms nsems …
        let t: Vec<&str> = l.split_whitespace().collect();
        let (Some(key), Some(id), Some(n)) = (
            t.first().and_then(|x| x.parse::<i32>().ok()),
            t.get(1).and_then(|x| x.parse::<i32>().ok()),
            t.get(3).and_then(|x| x.parse::<i32>().ok()),
        ) else {
            continue;
        };
        if (0..n.min(4096)).any(|i| sys::sem_last_pid(id, i).ok() == Some(pid)) {
            v.push(Error::Unsupported {
                pid,
                what: format!(
                    "SysV semaphore set {id} (key {:#010x}), on which it did the last semop: semaphores",
                    key as u32
                ),
            });
        }
    }
    let msg = std::fs::read_to_string("/proc/sysvipc/msg").unwrap_or_default();
    for l in msg.lines().skip(1) {
        // key msqid perms cbytes qnum lspid lrpid …
        let t: Vec<&str> = l.split_whitespace().collect();
        let num = |i: usize| t.get(i).and_then(|x| x.parse::<i32>().ok());
        let (Some(key), Some(id), Some(s), Some(r)) = (num(0), num(1), num(5), num(6)) else { continue };
        if s == pid || r == pid {
            v.push(Error::Unsupported {
                pid,
                what: format!(
                    "SysV message queue {id} (key {:#010x}), which it last {}: message queues",
                    key as u32,
                    if s == pid { "sent to" } else { "received from" }
                ),
            });
        }
    }
    v
}

/// The segments attached in `maps` (checked by [`blockers`]), each once.
pub fn collect(maps: &[MapLine]) -> Result<Vec<ShmSegment>> {
    let segs = segments();
    let mut out: Vec<ShmSegment> = Vec::new();
    for m in maps.iter().filter(|m| is_shm(&m.path)) {
        let id = m.inode as i32;
        if out.iter().any(|s| s.id == id) {
            continue;
        }
        let s = segs.get(&id).ok_or_else(|| Error::UnsupportedMapping {
            range: m.range(),
            what: m.path.clone(),
            why: format!("SysV segment {id} is not in /proc/sysvipc/shm"),
        })?;
        out.push(s.clone());
    }
    Ok(out)
}

/// The segments a restore created (removed again if it fails, see [`Segments::commit`]).
pub struct Segments {
    created: Vec<i32>,
    removed: Vec<i32>,
    done: bool,
}

impl Drop for Segments {
    fn drop(&mut self) {
        if !self.done {
            for id in &self.created {
                let _ = sys::shm_ctl(*id, libc::IPC_RMID);
            }
        }
    }
}

impl Segments {
    /// The restore succeeded: segments removed at dump are removed again (they live on while
    /// attached); created ones stay.
    pub fn commit(mut self) -> Result<()> {
        self.done = true;
        for id in &self.removed {
            sys::shm_ctl(*id, libc::IPC_RMID)
                .map_err(|e| Error::Restore(format!("IPC_RMID of SysV segment {id}: {e}")))?;
        }
        Ok(())
    }
}

/// Finds or creates every segment under its id, filling those it creates from the page data of
/// the attachments in `mem` (see the module doc), before the memory is rebuilt.
pub fn prepare(segs: &[ShmSegment], mem: &MemoryState, pages: &[u8], precopy: &[u8]) -> Result<Segments> {
    let mut out = Segments { created: Vec::new(), removed: Vec::new(), done: false };
    if segs.is_empty() {
        return Ok(out);
    }
    let here = segments();
    for s in segs {
        if s.removed() {
            out.removed.push(s.id);
        }
        if !to_create(s, &here)? {
            continue;
        }
        let got = create_at(s.id, s.key, s.size, s.mode).map_err(|e| Error::Restore(format!("{}: {e}", s.name())))?;
        out.created.push(got);
        if got != s.id {
            return Err(Error::Restore(format!(
                "{}: could not be created under its id (got {got}: that slot is taken); the program holds the id, \
                 which cannot be changed",
                s.name()
            )));
        }
        sys::shm_set_owner(got, s.uid, s.gid, s.mode)
            .map_err(|e| Error::Restore(format!("{}: IPC_SET (owner, mode): {e}", s.name())))?;
        if s.mode & SHM_LOCKED != 0 {
            sys::shm_ctl(got, libc::SHM_LOCK).map_err(|e| Error::Restore(format!("{}: SHM_LOCK: {e}", s.name())))?;
        }
        fill(s, mem, pages, precopy)?;
    }
    Ok(out)
}

/// Refuses, before anything is created, the segments whose id or key another segment holds here.
pub fn check(segs: &[ShmSegment]) -> Result<()> {
    if segs.is_empty() {
        return Ok(());
    }
    let here = segments();
    segs.iter().try_for_each(|s| to_create(s, &here).map(drop))
}

/// Whether `s` must be created (`false`: it is alive here and attached as it is), or why it
/// cannot be restored.
fn to_create(s: &ShmSegment, here: &HashMap<i32, ShmSegment>) -> Result<bool> {
    match here.get(&s.id) {
        Some(h) if h.key == s.key && h.size == s.size && !s.removed() => return Ok(false),
        Some(h) => {
            return Err(Error::Restore(format!(
                "{}: its id is taken here by another segment (key {:#010x}, {} bytes); the program holds the id, \
                 which cannot be changed",
                s.name(),
                h.key as u32,
                h.size
            )))
        }
        None => {}
    }
    if s.key != 0 {
        if let Some(h) = here.values().find(|h| h.key == s.key) {
            return Err(Error::Restore(format!(
                "{}: its key is taken here by segment {} ({} bytes)",
                s.name(),
                h.id,
                h.size
            )));
        }
    }
    Ok(true)
}

/// Creates a segment (`shmget(key, size, IPC_CREAT | IPC_EXCL | mode)`) asking for id `id`
/// through /proc/sys/kernel/shm_next_id; returns the id it got, which is `id` unless that slot
/// is taken (the kernel then takes the next free one). Calls are serialized within this
/// process (the setting applies to the next segment anyone creates in the IPC namespace).
pub fn create_at(id: i32, key: i32, size: u64, mode: u32) -> std::io::Result<i32> {
    static NEXT_ID: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = NEXT_ID.lock().unwrap_or_else(|e| e.into_inner());
    let next = "/proc/sys/kernel/shm_next_id";
    std::fs::write(next, id.to_string()).map_err(|e| std::io::Error::new(e.kind(), format!("{next}: {e}")))?;
    let got = sys::shm_create(key, size, mode);
    let _ = std::fs::write(next, "-1");
    got.map_err(|e| std::io::Error::new(e.kind(), format!("shmget: {e}")))
}

/// Writes the stored pages of every attachment of `s` into the segment (attachments of one
/// segment hold the same bytes: written once per attachment, the last wins, all equal).
fn fill(s: &ShmSegment, mem: &MemoryState, pages: &[u8], precopy: &[u8]) -> Result<()> {
    for v in &mem.vmas {
        let VmaKind::SysvShm { id, offset } = v.kind else { continue };
        if id != s.id {
            continue;
        }
        for (runs, data) in [(&v.runs, pages), (&v.precopied, precopy)] {
            for r in runs.iter() {
                let bytes = data.get(r.off as usize..(r.off + r.len) as usize).ok_or_else(|| {
                    Error::Restore(format!("{}: page data of {} outside the image", s.name(), v.describe()))
                })?;
                sys::shm_write(s.id, s.size, offset + (r.addr - v.start), bytes)
                    .map_err(|e| Error::Restore(format!("{}: writing its contents: {e}", s.name())))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sysvipc_shm() {
        let text = "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid      atime      dtime      ctime                   rss                  swap\n\
                    1146507595          2   640                 12288 12707 12707      4 65534 65534     0     0 1796184713          0 1796184713                  4096                     0\n\
                    0          3  1600                  5000 12707 12707      1     0     0     0     0 1796184713          0 1796184713                  4096                     0\n";
        let m = parse_shm(text);
        assert_eq!(m[&2], ShmSegment { id: 2, key: 1146507595, size: 12288, mode: 0o640, uid: 65534, gid: 65534 });
        assert!(!m[&2].removed());
        assert_eq!(m[&3].mode, 0o1600);
        assert!(m[&3].removed() && m[&3].key == 0);
    }

    #[test]
    fn removed_and_named() {
        let s = ShmSegment { id: 32769, key: 0x4456_0001, size: 8192, mode: 0o1640, uid: 0, gid: 0 };
        assert!(s.removed());
        assert_eq!(s.name(), "SysV shared memory segment 32769 (key 0x44560001, 8192 bytes)");
        assert!(is_shm("/SYSV44560001") && is_shm("/SYSV00000000 (deleted)") && !is_shm("/dev/shm/x"));
    }
}
