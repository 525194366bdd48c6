//! SysV IPC: shared memory segments the process has attached are carried (key, id, size,
//! owner, mode, SHM_LOCK, contents, and whether it was marked removed with IPC_RMID); so are the
//! semaphore sets and message queues it is seen to use (key, id, owner, mode; every semaphore's
//! value; `msg_qbytes` and every message queued, in order, with its type). A process with
//! SEM_UNDO state is refused.
//!
//! Found: an attachment shows in /proc/PID/maps as `/SYSV<key in hex>` (`(deleted)` once
//! IPC_RMID-ed), with the segment's id as its inode; the segment itself in /proc/sysvipc/shm.
//! Its pages are stored from the process's mapping like shared anonymous memory (every page
//! of every attachment).
//!
//! Semaphores and message queues carry no per-process trace in /proc (no mapping, no fd; the
//! program holds bare ids in its memory, where they cannot be told from other numbers). What is
//! seen: a semaphore set where the process did the last `semop` (or SETVAL, SETALL) on any
//! semaphore (`semctl(GETPID)`), a message queue it last sent to or received from (`lspid`/`lrpid` in
//! /proc/sysvipc/msg). A set or queue the process uses but on which another process did the last
//! operation is not seen, and not carried (on the same machine it is still there; elsewhere the
//! program finds its id unknown, or another object under it). Those seen are read at dump, the
//! process frozen: the values with `GETALL`, the messages with `msgrcv(MSG_COPY | IPC_NOWAIT)`
//! by index, which copies without taking (a kernel without CONFIG_CHECKPOINT_RESTORE has no
//! MSG_COPY: a non-empty queue is then refused); a queue that changes while it is read (other
//! processes) is read again, and refused if it keeps changing. Bounds: at most 32000 semaphores
//! a set, 2^20 messages and 64 MiB a queue, messages under 1 MiB.
//!
//! SEM_UNDO: the adjustments the kernel applies to semaphores when a process that did
//! `semop(SEM_UNDO)` ends (semadj) are per process, in the kernel only: nothing in /proc shows
//! them, no call reads or sets them (CRIU does not carry them either). Whether a process has any
//! is detectable: its first SEM_UNDO `semop` gives it an undo list, kept until it ends, and
//! `kcmp(KCMP_SYSVSEM)` compares those lists — a process (any thread) that does not compare
//! equal to the dumper (which has none) has one. Such a process is refused: restored without
//! its adjustments, its semaphores would not be put back when it ends (a lock it holds would
//! stay held for ever). The list stays even once its adjustments are back to 0: a process that
//! ever used SEM_UNDO is refused.
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
//!   with its last attachment, as before).
//!
//! Semaphore sets and message queues the same way: one with the image's id and key (and, a set,
//! as many semaphores) still here is used as it is, not written; else it is created under its id
//! (`sem_next_id`, `msg_next_id`; a taken id or key is refused before anything is created,
//! naming both objects), given its owner and mode (and `msg_qbytes`) with IPC_SET, then its
//! values (`semctl(SETALL)`) and its messages (`msgsnd`, in order, each with its type) by the new
//! process itself, injected: it is then the last to have operated on it (every semaphore's
//! `sempid`, the queue's `lspid`; an empty queue gets one empty message sent and taken back, so
//! `lrpid` too), and a later dump sees it using them again. Per-semaphore last pids are not
//! restorable as they were (set to the process for every semaphore of a set created again; a
//! live set keeps its own, which name the old pid when the process comes back under a new one —
//! a later dump would then not see it), nor the times (`otime`, `stime`, `rtime`, `ctime`) or the
//! creator (`cuid`/`cgid`: the restorer creates the object).
//!
//! Objects created by a restore that fails are removed; a held restore (`restore_held`, every
//! member of a tree) keeps them until the process is let run, and removes them if it is killed.
//! In a tree, an object several members are seen to use is stored once, in the first one's image
//! (parents first), and made (or found) once, by it.
//!
//! Not carried: the creator uid/gid of segments, times and last pids; segments the process does
//! not have attached (it may hold their ids only); a segment partly unmapped (refused); objects
//! of another IPC namespace than the dumper's (not in its /proc/sysvipc: not seen).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::inject::Remote;
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

/// A semaphore set as /proc/sysvipc/sem lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SemInfo {
    id: i32,
    key: i32,
    mode: u32,
    nsems: usize,
    uid: u32,
    gid: u32,
}

/// A message queue as /proc/sysvipc/msg lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct MsgInfo {
    id: i32,
    key: i32,
    mode: u32,
    cbytes: u64,
    qnum: u64,
    lspid: Pid,
    lrpid: Pid,
    uid: u32,
    gid: u32,
}

/// The text of /proc/sysvipc/sem, by id.
fn parse_sem(text: &str) -> HashMap<i32, SemInfo> {
    let mut out = HashMap::new();
    for l in text.lines().skip(1) {
        // key semid perms nsems uid gid cuid cgid otime ctime
        let t: Vec<&str> = l.split_whitespace().collect();
        if t.len() < 6 {
            continue;
        }
        let (Ok(key), Ok(id), Ok(mode), Ok(nsems), Ok(uid), Ok(gid)) = (
            t[0].parse::<i32>(),
            t[1].parse::<i32>(),
            u32::from_str_radix(t[2], 8),
            t[3].parse::<usize>(),
            t[4].parse::<u32>(),
            t[5].parse::<u32>(),
        ) else {
            continue;
        };
        out.insert(id, SemInfo { id, key, mode, nsems, uid, gid });
    }
    out
}

/// The text of /proc/sysvipc/msg, by id.
fn parse_msg(text: &str) -> HashMap<i32, MsgInfo> {
    let mut out = HashMap::new();
    for l in text.lines().skip(1) {
        // key msqid perms cbytes qnum lspid lrpid uid gid cuid cgid stime rtime ctime
        let t: Vec<&str> = l.split_whitespace().collect();
        if t.len() < 9 {
            continue;
        }
        let (Ok(key), Ok(id), Ok(mode), Ok(cbytes), Ok(qnum), Ok(lspid), Ok(lrpid), Ok(uid), Ok(gid)) = (
            t[0].parse::<i32>(),
            t[1].parse::<i32>(),
            u32::from_str_radix(t[2], 8),
            t[3].parse::<u64>(),
            t[4].parse::<u64>(),
            t[5].parse::<Pid>(),
            t[6].parse::<Pid>(),
            t[7].parse::<u32>(),
            t[8].parse::<u32>(),
        ) else {
            continue;
        };
        out.insert(id, MsgInfo { id, key, mode, cbytes, qnum, lspid, lrpid, uid, gid });
    }
    out
}

fn sem_sets() -> HashMap<i32, SemInfo> {
    parse_sem(&std::fs::read_to_string("/proc/sysvipc/sem").unwrap_or_default())
}

fn msg_queues() -> HashMap<i32, MsgInfo> {
    parse_msg(&std::fs::read_to_string("/proc/sysvipc/msg").unwrap_or_default())
}

fn sem_name(id: i32, key: i32, nsems: usize) -> String {
    format!("SysV semaphore set {id} (key {:#010x}, {})", key as u32, semaphores(nsems))
}

fn semaphores(n: usize) -> String {
    format!("{n} semaphore{}", if n == 1 { "" } else { "s" })
}

fn msg_name(id: i32, key: i32) -> String {
    format!("SysV message queue {id} (key {:#010x})", key as u32)
}

/// The semaphore sets and message queues `pid` is seen to use (see the module doc), by id.
fn seen(pid: Pid) -> (Vec<SemInfo>, Vec<MsgInfo>) {
    let mut sems: Vec<SemInfo> = sem_sets()
        .into_values()
        .filter(|s| (0..s.nsems.min(MAX_SEMS) as i32).any(|i| sys::sem_last_pid(s.id, i).ok() == Some(pid)))
        .collect();
    sems.sort_by_key(|s| s.id);
    let mut msgs: Vec<MsgInfo> = msg_queues().into_values().filter(|q| q.lspid == pid || q.lrpid == pid).collect();
    msgs.sort_by_key(|q| q.id);
    (sems, msgs)
}

/// Does `pid` (any of its threads) have a SysV undo list? The kernel gives a process one at its
/// first `semop` with SEM_UNDO — and at its first thread made with CLONE_SYSVSEM, as glibc's
/// `pthread_create` does —, kept until it ends; `kcmp(KCMP_SYSVSEM)` tells whether two tasks
/// have the same one: a task that compares unequal to one without any has one.
fn has_undo_list(pid: Pid) -> std::io::Result<bool> {
    const KCMP_SYSVSEM: i32 = 6;
    let tids: Vec<Pid> = std::fs::read_dir(proc_path(pid, "task"))
        .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    sys::with_task_without_undo_list(|none| {
        for t in tids.into_iter().chain([pid]) {
            match sys::kcmp(t, none, KCMP_SYSVSEM) {
                Ok(0) => {}
                Ok(_) => return Ok(true),
                // A thread that ended meanwhile.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) && t != pid => {}
                Err(e) => return Err(std::io::Error::new(e.kind(), format!("kcmp(KCMP_SYSVSEM) of {t}: {e}"))),
            }
        }
        Ok(false)
    })?
}

/// SEM_UNDO, and the semaphore sets and message queues the process is seen to use that
/// cannot be carried (see the module doc).
fn sem_msg_blockers(pid: Pid) -> Vec<Error> {
    let mut v = Vec::new();
    let (sems, msgs) = seen(pid);
    let names: Vec<String> = sems.iter().map(|s| sem_name(s.id, s.key, s.nsems)).collect();
    match if sems.is_empty() { Ok(false) } else { has_undo_list(pid) } {
        Ok(false) => {}
        Err(e) => v.push(Error::Unsupported {
            pid,
            what: format!(
                "SysV semaphore undo state: it uses {}, and whether it may hold SEM_UNDO adjustments cannot be \
                 told ({e})",
                names.join(", ")
            ),
        }),
        Ok(true) => v.push(Error::Unsupported {
            pid,
            what: format!(
                "SysV semaphore undo state: it uses {} and has an undo list (a semop with SEM_UNDO, or a thread \
                 started with CLONE_SYSVSEM as pthread_create does), so it may hold SEM_UNDO adjustments, which \
                 cannot be read or set from outside",
                names.join(", ")
            ),
        }),
    }
    for s in &sems {
        if s.nsems > MAX_SEMS {
            v.push(Error::Unsupported {
                pid,
                what: format!("{}: more than {MAX_SEMS} semaphores", sem_name(s.id, s.key, s.nsems)),
            });
        }
    }
    for q in &msgs {
        let name = msg_name(q.id, q.key);
        if q.cbytes > MAX_QUEUE_BYTES || q.qnum > MAX_MESSAGES {
            v.push(Error::Unsupported {
                pid,
                what: format!(
                    "{name}: {} messages, {} bytes queued (at most {MAX_MESSAGES} messages and {MAX_QUEUE_BYTES} \
                     bytes are carried)",
                    q.qnum, q.cbytes
                ),
            });
        } else if q.qnum > 0
            && matches!(sys::msg_copy(q.id, 0, &mut [0u8; 8]), Err(e) if e.raw_os_error() == Some(libc::ENOSYS))
        {
            v.push(Error::Unsupported {
                pid,
                what: format!(
                    "{name}: its messages cannot be read without taking them (msgrcv MSG_COPY needs a kernel with \
                     CONFIG_CHECKPOINT_RESTORE)"
                ),
            });
        }
    }
    v
}

/// Largest semaphore set carried (the kernel's own limit, SEMMSL, is at most 32000).
const MAX_SEMS: usize = 32000;
/// Largest message queue carried: bytes queued, messages.
const MAX_QUEUE_BYTES: u64 = 64 << 20;
const MAX_MESSAGES: u64 = 1 << 20;
/// Largest message carried (it is sent again from the restorer's scratch area).
const MAX_MESSAGE: usize = crate::stub::SCRATCH_LEN - 8;

/// A semaphore set: every semaphore's value (`values.len()` is the set's size).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SemSet {
    pub id: i32,
    pub key: i32,
    /// Permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub values: Vec<u16>,
}

impl SemSet {
    fn name(&self) -> String {
        sem_name(self.id, self.key, self.values.len())
    }
}

/// A message queue: its size limit and every message queued, in order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MsgQueue {
    pub id: i32,
    pub key: i32,
    /// Permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// `msg_qbytes`: the most bytes it may hold.
    pub qbytes: u64,
    pub messages: Vec<Message>,
}

impl MsgQueue {
    fn name(&self) -> String {
        msg_name(self.id, self.key)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Message {
    pub mtype: i64,
    pub text: Vec<u8>,
}

/// The ids of the semaphore sets and message queues `pid` is seen to use.
pub(crate) fn seen_ids(pid: Pid) -> (Vec<i32>, Vec<i32>) {
    let (s, m) = seen(pid);
    (s.iter().map(|s| s.id).collect(), m.iter().map(|q| q.id).collect())
}

/// The semaphore sets and message queues `pid` (frozen) is seen to use but those in `skip_sems`
/// and `skip_msgs` (another member of its tree stores them), read (checked by [`blockers`]). The messages are copied, not taken; a queue that changes while it is read
/// (another process sending or receiving) is read again, a few times at most.
pub fn collect_sem_msg(pid: Pid, skip_sems: &[i32], skip_msgs: &[i32]) -> Result<(Vec<SemSet>, Vec<MsgQueue>)> {
    let (mut sems, mut msgs) = seen(pid);
    sems.retain(|s| !skip_sems.contains(&s.id));
    msgs.retain(|q| !skip_msgs.contains(&q.id));
    let fail =
        |name: String, what: &str, e: std::io::Error| Error::Unsupported { pid, what: format!("{name}: {what}: {e}") };
    let mut out_sems = Vec::new();
    for s in sems {
        let name = sem_name(s.id, s.key, s.nsems);
        let n = sys::sem_count(s.id).map_err(|e| fail(name.clone(), "IPC_STAT", e))?;
        let values = sys::sem_get_all(s.id, n).map_err(|e| fail(name.clone(), "GETALL", e))?;
        out_sems.push(SemSet { id: s.id, key: s.key, mode: s.mode & 0o777, uid: s.uid, gid: s.gid, values });
    }
    let mut out_msgs = Vec::new();
    for q in msgs {
        let name = msg_name(q.id, q.key);
        let mut got = None;
        for _ in 0..4 {
            let before = sys::msg_stat(q.id).map_err(|e| fail(name.clone(), "IPC_STAT", e))?;
            if before.cbytes > MAX_QUEUE_BYTES || before.qnum > MAX_MESSAGES {
                return Err(Error::Unsupported {
                    pid,
                    what: format!("{name}: {} bytes queued: too large", before.cbytes),
                });
            }
            let mut buf = vec![0u8; 8 + (before.cbytes as usize).min(MAX_MESSAGE)];
            let mut messages = Vec::with_capacity(before.qnum as usize);
            for i in 0..before.qnum {
                match sys::msg_copy(q.id, i, &mut buf) {
                    Ok((mtype, n)) => messages.push(Message { mtype, text: buf[8..8 + n].to_vec() }),
                    // Taken meanwhile by another process: read again.
                    Err(e) if e.raw_os_error() == Some(libc::ENOMSG) => break,
                    Err(e) if e.raw_os_error() == Some(libc::E2BIG) => {
                        return Err(Error::Unsupported {
                            pid,
                            what: format!(
                                "{name}: message {i} cannot be copied whole (longer than {} bytes, or than this \
                                 kernel's msgmax, which bounds MSG_COPY)",
                                buf.len() - 8
                            ),
                        })
                    }
                    Err(e) => return Err(fail(name.clone(), &format!("msgrcv(MSG_COPY) of message {i}"), e)),
                }
            }
            let after = sys::msg_stat(q.id).map_err(|e| fail(name.clone(), "IPC_STAT", e))?;
            if after == before && messages.len() as u64 == before.qnum {
                got = Some((before.qbytes, messages));
                break;
            }
        }
        let Some((qbytes, messages)) = got else {
            return Err(Error::Unsupported {
                pid,
                what: format!("{name}: it changed each time its messages were read (other processes use it)"),
            });
        };
        out_msgs.push(MsgQueue {
            id: q.id,
            key: q.key,
            mode: q.mode & 0o777,
            uid: q.uid,
            gid: q.gid,
            qbytes,
            messages,
        });
    }
    Ok((out_sems, out_msgs))
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

/// The SysV objects a restore created (removed again if it fails, see [`Created::commit`]).
pub struct Created {
    shm: Vec<i32>,
    sems: Vec<i32>,
    msgs: Vec<i32>,
    removed: Vec<i32>,
    done: bool,
}

impl Drop for Created {
    fn drop(&mut self) {
        if !self.done {
            for id in &self.shm {
                let _ = sys::shm_ctl(*id, libc::IPC_RMID);
            }
            for id in &self.sems {
                let _ = sys::sem_remove(*id);
            }
            for id in &self.msgs {
                let _ = sys::msg_remove(*id);
            }
        }
    }
}

impl Created {
    /// The restore succeeded: segments removed at dump are removed again (they live on while
    /// attached); created objects stay.
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
pub fn prepare(segs: &[ShmSegment], mem: &MemoryState, pages: &[u8], precopy: &[u8]) -> Result<Created> {
    let mut out = Created { shm: Vec::new(), sems: Vec::new(), msgs: Vec::new(), removed: Vec::new(), done: false };
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
        out.shm.push(got);
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
/// is taken (the kernel then takes the next free one).
pub fn create_at(id: i32, key: i32, size: u64, mode: u32) -> std::io::Result<i32> {
    with_next_id("shm", id, || sys::shm_create(key, size, mode))
}

/// [`create_at`] for a semaphore set (`semget`, /proc/sys/kernel/sem_next_id).
pub fn create_sem_at(id: i32, key: i32, nsems: usize, mode: u32) -> std::io::Result<i32> {
    with_next_id("sem", id, || sys::sem_create(key, nsems, mode))
}

/// [`create_at`] for a message queue (`msgget`, /proc/sys/kernel/msg_next_id).
pub fn create_msg_at(id: i32, key: i32, mode: u32) -> std::io::Result<i32> {
    with_next_id("msg", id, || sys::msg_create(key, mode))
}

/// Runs `create` (a `*get` of kind `kind`) with /proc/sys/kernel/<kind>_next_id set to `id`
/// (reset to -1 after). Calls are serialized within this process (the setting applies to the
/// next object of that kind anyone creates in the IPC namespace).
fn with_next_id(kind: &str, id: i32, create: impl FnOnce() -> std::io::Result<i32>) -> std::io::Result<i32> {
    static NEXT_ID: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = NEXT_ID.lock().unwrap_or_else(|e| e.into_inner());
    let next = format!("/proc/sys/kernel/{kind}_next_id");
    std::fs::write(&next, id.to_string()).map_err(|e| std::io::Error::new(e.kind(), format!("{next}: {e}")))?;
    let got = create();
    let _ = std::fs::write(&next, "-1");
    got.map_err(|e| std::io::Error::new(e.kind(), format!("{kind}get: {e}")))
}

/// Refuses, before anything is created, the semaphore sets and queues whose id or key another
/// object holds here, or that this kernel's limits would not let be created again.
pub fn check_sem_msg(sems: &[SemSet], msgs: &[MsgQueue]) -> Result<()> {
    if sems.is_empty() && msgs.is_empty() {
        return Ok(());
    }
    let (here_sem, here_msg) = (sem_sets(), msg_queues());
    let limit = |f: &str, i: usize| -> Option<u64> {
        std::fs::read_to_string(format!("/proc/sys/kernel/{f}")).ok()?.split_whitespace().nth(i)?.parse().ok()
    };
    for s in sems {
        if sem_to_create(s, &here_sem)? {
            if let Some(max) = limit("sem", 0).filter(|&m| (s.values.len() as u64) > m) {
                return Err(Error::Restore(format!(
                    "{}: more semaphores than a set may have here (SEMMSL {max})",
                    s.name()
                )));
            }
        }
    }
    const CAP_SYS_RESOURCE: u32 = 24;
    let cap_sys_resource = crate::host::cap_eff() & (1u64 << CAP_SYS_RESOURCE) != 0;
    for q in msgs {
        if msg_to_create(q, &here_msg)? {
            if let Some(why) = qbytes_refusal(q, limit("msgmnb", 0), cap_sys_resource) {
                return Err(Error::Restore(why));
            }
            let longest = q.messages.iter().map(|m| m.text.len()).max().unwrap_or(0) as u64;
            if let Some(max) = limit("msgmax", 0).filter(|&m| longest > m) {
                return Err(Error::Restore(format!(
                    "{}: a message of {longest} bytes is longer than a message may be here (msgmax {max})",
                    q.name()
                )));
            }
        }
    }
    Ok(())
}

/// The most bytes queue `q` must be let hold while its messages are sent again (its
/// `msg_qbytes`, or more if that was lowered below what it holds), and why this restorer cannot
/// set that here: above `msgmnb` takes CAP_SYS_RESOURCE.
fn qbytes_refusal(q: &MsgQueue, msgmnb: Option<u64>, cap_sys_resource: bool) -> Option<String> {
    let need = q.qbytes.max(queue_need(q));
    let mnb = msgmnb?;
    (need > mnb && !cap_sys_resource).then(|| {
        format!(
            "{}: its msg_qbytes ({need} bytes) is above this machine's msgmnb ({mnb}), which takes \
             CAP_SYS_RESOURCE the restorer lacks",
            q.name()
        )
    })
}

/// What queue `q`'s messages need of `msg_qbytes` (which bounds their number too).
fn queue_need(q: &MsgQueue) -> u64 {
    q.messages.iter().map(|m| m.text.len() as u64).sum::<u64>().max(q.messages.len() as u64)
}

/// Whether `s` must be created (`false`: it is alive here, used as it is), or why it cannot be.
fn sem_to_create(s: &SemSet, here: &HashMap<i32, SemInfo>) -> Result<bool> {
    let taken = "the program holds the id, which cannot be changed";
    match here.get(&s.id) {
        Some(h) if h.key == s.key && h.nsems == s.values.len() => return Ok(false),
        Some(h) => {
            return Err(Error::Restore(format!(
                "{}: its id is taken here by another set (key {:#010x}, {}); {taken}",
                s.name(),
                h.key as u32,
                semaphores(h.nsems)
            )))
        }
        None => {}
    }
    match here.values().find(|h| s.key != 0 && h.key == s.key) {
        Some(h) => {
            Err(Error::Restore(format!("{}: its key is taken here by {}", s.name(), sem_name(h.id, h.key, h.nsems))))
        }
        None => Ok(true),
    }
}

/// [`sem_to_create`] for a message queue.
fn msg_to_create(q: &MsgQueue, here: &HashMap<i32, MsgInfo>) -> Result<bool> {
    match here.get(&q.id) {
        Some(h) if h.key == q.key => return Ok(false),
        Some(h) => {
            return Err(Error::Restore(format!(
                "{}: its id is taken here by another queue (key {:#010x}); the program holds the id, which cannot \
                 be changed",
                q.name(),
                h.key as u32
            )))
        }
        None => {}
    }
    match here.values().find(|h| q.key != 0 && h.key == q.key) {
        Some(h) => Err(Error::Restore(format!("{}: its key is taken here by {}", q.name(), msg_name(h.id, h.key)))),
        None => Ok(true),
    }
}

/// Finds or creates every semaphore set and message queue under its id (see the module doc):
/// a live one is used as it is; one created is given its owner, mode and size limit from here,
/// and its values and messages by the new process `r` itself (`semctl(SETALL)`, `msgsnd`),
/// which then did the last operation on it, as it had (a later dump sees it using it).
pub fn prepare_sem_msg(r: &Remote, sems: &[SemSet], msgs: &[MsgQueue], out: &mut Created) -> Result<()> {
    if sems.is_empty() && msgs.is_empty() {
        return Ok(());
    }
    let (here_sem, here_msg) = (sem_sets(), msg_queues());
    let not_its_id = |name: String, got: i32| {
        Error::Restore(format!(
            "{name}: could not be created under its id (got {got}: that slot is taken); the program holds the id, \
             which cannot be changed"
        ))
    };
    for s in sems {
        if !sem_to_create(s, &here_sem)? {
            continue;
        }
        let got = create_sem_at(s.id, s.key, s.values.len(), s.mode)
            .map_err(|e| Error::Restore(format!("{}: {e}", s.name())))?;
        out.sems.push(got);
        if got != s.id {
            return Err(not_its_id(s.name(), got));
        }
        sys::sem_set_owner(got, s.uid, s.gid, s.mode)
            .map_err(|e| Error::Restore(format!("{}: IPC_SET (owner, mode): {e}", s.name())))?;
        let bytes: Vec<u8> = s.values.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let a = r.put(0, &bytes)?;
        r.call(&format!("semctl(SETALL) of {}", s.name()), libc::SYS_semctl, &[got as u64, 0, libc::SETALL as u64, a])?;
    }
    for q in msgs {
        if !msg_to_create(q, &here_msg)? {
            continue;
        }
        let got = create_msg_at(q.id, q.key, q.mode).map_err(|e| Error::Restore(format!("{}: {e}", q.name())))?;
        out.msgs.push(got);
        if got != q.id {
            return Err(not_its_id(q.name(), got));
        }
        // The messages must fit while they are sent (msg_qbytes may have been lowered below what
        // was queued, and bounds the number of messages too): the limit is set after them then.
        let need = queue_need(q);
        let set = |qbytes: u64| {
            sys::msg_set(got, q.uid, q.gid, q.mode, qbytes)
                .map_err(|e| Error::Restore(format!("{}: IPC_SET (owner, mode, msg_qbytes {qbytes}): {e}", q.name())))
        };
        set(q.qbytes.max(need))?;
        let nowait = libc::IPC_NOWAIT as u64;
        for (i, m) in q.messages.iter().enumerate() {
            let mut b = m.mtype.to_ne_bytes().to_vec();
            b.extend_from_slice(&m.text);
            let a = r.put(0, &b)?;
            let what = format!("msgsnd of message {i} (type {}) to {}", m.mtype, q.name());
            r.call(&what, libc::SYS_msgsnd, &[got as u64, a, m.text.len() as u64, nowait])?;
        }
        if q.messages.is_empty() {
            // An empty message sent and taken back: the process is the last sender and receiver.
            let a = r.put(0, &1i64.to_ne_bytes())?;
            r.call(&format!("msgsnd to {}", q.name()), libc::SYS_msgsnd, &[got as u64, a, 0, nowait])?;
            r.call(&format!("msgrcv from {}", q.name()), libc::SYS_msgrcv, &[got as u64, a, 0, 0, nowait])?;
        }
        if need > q.qbytes {
            set(q.qbytes)?;
        }
    }
    Ok(())
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
    #[test]
    fn parses_sysvipc_sem_and_msg() {
        let sem = "       key      semid perms      nsems   uid   gid  cuid  cgid      otime      ctime\n\
                   0      32768   600          2     0     0     0     0 1796184713 1796184713\n\
                   1146507595      32769   640          5  1000   100     0     0          0 1796184713\n";
        let m = parse_sem(sem);
        assert_eq!(m[&32768], SemInfo { id: 32768, key: 0, mode: 0o600, nsems: 2, uid: 0, gid: 0 });
        assert_eq!(m[&32769], SemInfo { id: 32769, key: 1146507595, mode: 0o640, nsems: 5, uid: 1000, gid: 100 });
        let msg = "       key      msqid perms      cbytes       qnum lspid lrpid   uid   gid  cuid  cgid      stime      rtime      ctime\n\
                   0          3   600          21          3  4242     0     0     0     0     0 1796184713          0 1796184713\n\
                   -559038737          4   666           0          0     0  4243  1000  1000     0     0          0 1796184713 1796184713\n\
                   garbage line\n";
        let q = parse_msg(msg);
        assert_eq!(q.len(), 2);
        assert_eq!(
            q[&3],
            MsgInfo { id: 3, key: 0, mode: 0o600, cbytes: 21, qnum: 3, lspid: 4242, lrpid: 0, uid: 0, gid: 0 }
        );
        assert_eq!((q[&4].key as u32, q[&4].lrpid, q[&4].mode), (0xdeadbeef, 4243, 0o666));
    }

    fn set(id: i32, key: i32, n: usize) -> SemSet {
        SemSet { id, key, mode: 0o600, uid: 0, gid: 0, values: vec![0; n] }
    }

    #[test]
    fn sem_live_created_or_refused() {
        let here = parse_sem(
            "key semid perms nsems uid gid\n\
             0 32768 600 2 0 0 0 0 0 0\n\
             305419896 32770 600 1 0 0 0 0 0 0\n",
        );
        // Alive with the same key and size: used as it is.
        assert!(!sem_to_create(&set(32768, 0, 2), &here).unwrap());
        // Gone: made again.
        assert!(sem_to_create(&set(32771, 7, 2), &here).unwrap());
        // The id holds another set (other size, other key): refused, naming both.
        let e = sem_to_create(&set(32768, 0, 3), &here).unwrap_err().to_string();
        assert!(e.contains("SysV semaphore set 32768 (key 0x00000000, 3 semaphores)"), "{e}");
        assert!(e.contains("taken here by another set (key 0x00000000, 2 semaphores)"), "{e}");
        let e = sem_to_create(&set(32770, 1, 1), &here).unwrap_err().to_string();
        assert!(e.contains("key 0x12345678"), "{e}");
        // Its key is another set's.
        let e = sem_to_create(&set(40000, 0x12345678, 1), &here).unwrap_err().to_string();
        assert!(e.contains("its key is taken here by SysV semaphore set 32770 (key 0x12345678, 1 semaphore)"), "{e}");
        // Private sets (key 0) never clash by key.
        assert!(sem_to_create(&set(40000, 0, 4), &here).unwrap());
    }

    #[test]
    fn msg_live_created_or_refused() {
        let here = parse_msg("h\n0 3 600 0 0 0 0 0 0 0 0 0 0 0\n16 4 600 0 0 0 0 0 0 0 0 0 0 0\n");
        let q = |id, key| MsgQueue { id, key, mode: 0o600, uid: 0, gid: 0, qbytes: 16384, messages: vec![] };
        assert!(!msg_to_create(&q(3, 0), &here).unwrap());
        assert!(msg_to_create(&q(5, 0), &here).unwrap());
        let e = msg_to_create(&q(3, 9), &here).unwrap_err().to_string();
        assert!(
            e.contains("SysV message queue 3 (key 0x00000009): its id is taken here by another queue (key 0x00000000)"),
            "{e}"
        );
        let e = msg_to_create(&q(7, 16), &here).unwrap_err().to_string();
        assert!(e.contains("its key is taken here by SysV message queue 4 (key 0x00000010)"), "{e}");
    }

    #[test]
    fn qbytes_above_msgmnb_needs_cap_sys_resource() {
        let m = |n: usize| Message { mtype: 1, text: vec![7; n] };
        let q = |qbytes, messages| MsgQueue { id: 5, key: 0, mode: 0o600, uid: 0, gid: 0, qbytes, messages };
        assert_eq!(qbytes_refusal(&q(16384, vec![m(100)]), Some(16384), false), None);
        let e = qbytes_refusal(&q(20000, vec![]), Some(16384), false).unwrap();
        assert!(e.contains("SysV message queue 5 (key 0x00000000): its msg_qbytes (20000 bytes)"), "{e}");
        assert!(e.contains("msgmnb (16384)") && e.contains("CAP_SYS_RESOURCE"), "{e}");
        assert_eq!(qbytes_refusal(&q(20000, vec![]), Some(16384), true), None);
        // Lowered below what it holds: what it holds counts.
        assert!(qbytes_refusal(&q(100, vec![m(10000), m(10000)]), Some(16384), false).is_some());
        assert_eq!(queue_need(&q(100, vec![m(0), m(0), m(0)])), 3);
        assert_eq!(qbytes_refusal(&q(20000, vec![]), None, false), None);
    }

    #[test]
    fn sem_msg_image_round_trip() {
        let s = set(32768, 5, 3);
        let q = MsgQueue {
            id: 2,
            key: 0,
            mode: 0o640,
            uid: 1,
            gid: 2,
            qbytes: 1 << 20,
            messages: vec![Message { mtype: 7, text: b"seven".to_vec() }, Message { mtype: 1, text: vec![] }],
        };
        let b = postcard::to_allocvec(&(vec![s.clone()], vec![q.clone()])).unwrap();
        let back: (Vec<SemSet>, Vec<MsgQueue>) = postcard::from_bytes(&b).unwrap();
        assert_eq!(back, (vec![s], vec![q]));
    }
}
