//! File locks: POSIX record locks (`fcntl` F_SETLK), open file description locks (F_OFD_SETLK)
//! and `flock` locks, re-taken by their owner at restore before the process runs.
//!
//! Where they are found: the `lock:` lines of /proc/PID/fdinfo/N. The kernel lists there the
//! locks of the open file description (OFD) of fd N that belong to that description (flock,
//! OFD locks) or to this process and were taken through it (POSIX locks), one line each:
//!
//! ```text
//! lock:    1: POSIX  ADVISORY  WRITE 5742 fe:00:10027416 0 9       bytes 0..=9
//! lock:    2: POSIX  ADVISORY  READ  5742 fe:00:10027416 20 EOF    bytes 20.. (to EOF)
//! lock:    1: OFDLCK ADVISORY  WRITE -1 fe:00:10027417 5 14
//! lock:    1: FLOCK  ADVISORY  READ  5742 fe:00:10027418 0 EOF     (flock LOCK_SH)
//! ```
//!
//! (/proc/locks says the same for the whole machine but not which fd; reading it waits for an
//! RCU grace period, ~12 ms.) Each description is looked at once (through its first fd), so
//! a lock shown on several dup'ed fds is carried once.
//!
//! Refused at dump, by fd: leases and delegations (F_SETLEASE), kinds of lock this module does
//! not know, and a flock or OFD lock on a description another process shares (inherited or
//! passed over a socket): such a lock belongs to the description, which a process left behind
//! keeps holding, so the copy could not take it and the other process would lose it.
//!
//! Rebuild: once every fd sits at its number and the temporaries are closed (closing *any* fd
//! of a file drops the process's POSIX locks on it), each lock is taken again by an injected
//! `fcntl(fd, F_SETLK / F_OFD_SETLK)` or `flock(fd, LOCK_SH / LOCK_EX | LOCK_NB)` on the fd it
//! was found on: a POSIX lock is then owned by the restored process, an OFD or flock lock by
//! the description at that fd (shared by its dups, as before). Never blocking: a lock someone
//! else took meanwhile fails the restore, naming the file and the holders /proc/locks shows,
//! and the half-built process is killed — it never runs without its lock.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::files::{FileKind, FilesState};
use crate::inject::Remote;
use crate::proc::proc_path;
use crate::sys::{self, Pid};

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum LockKind {
    /// `fcntl(F_SETLK)`: owned by the process.
    Posix,
    /// `fcntl(F_OFD_SETLK)`: owned by the open file description.
    Ofd,
    /// `flock`: owned by the open file description, always the whole file.
    Flock,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileLock {
    /// The fd it is taken through at restore.
    pub fd: i32,
    /// The fd's /proc link at dump (the file's path), to name it.
    pub what: String,
    pub kind: LockKind,
    /// Write (exclusive, LOCK_EX) or read (shared, LOCK_SH).
    pub write: bool,
    /// First byte (0 for flock).
    pub start: u64,
    /// Last byte, inclusive; `None`: to the end of the file, however it grows.
    pub end: Option<u64>,
}

impl FileLock {
    /// "POSIX write lock on bytes 0-9", "flock read (LOCK_SH) lock".
    pub fn describe(&self) -> String {
        let rw = if self.write { "write" } else { "read" };
        let range = match self.end {
            Some(e) => format!("bytes {}-{e}", self.start),
            None if self.start == 0 => "the whole file".to_string(),
            None => format!("bytes {}-EOF", self.start),
        };
        match self.kind {
            LockKind::Posix => format!("POSIX {rw} lock on {range}"),
            LockKind::Ofd => format!("OFD {rw} lock on {range}"),
            LockKind::Flock => format!("flock {} lock", if self.write { "LOCK_EX" } else { "LOCK_SH" }),
        }
    }
}

/// One `lock:` line of an fdinfo (without the "lock:" prefix), or why it cannot be carried.
pub fn parse(line: &str) -> std::result::Result<(LockKind, bool, u64, Option<u64>), String> {
    let t: Vec<&str> = line.split_whitespace().collect();
    // [id:] KIND ADVISORY TYPE PID DEV START END
    let kind = match t.get(1).copied() {
        Some("POSIX") => LockKind::Posix,
        Some("OFDLCK") => LockKind::Ofd,
        Some("FLOCK") => LockKind::Flock,
        Some("LEASE") | Some("DELEG") => return Err("leases (F_SETLEASE) are not carried".into()),
        _ => return Err("this kind of lock is not carried".into()),
    };
    if t.get(2) != Some(&"ADVISORY") || t.len() < 8 {
        return Err("this kind of lock is not carried".into());
    }
    let write = match t[3] {
        "WRITE" => true,
        "READ" => false,
        _ => return Err("a lock in this state is not carried".into()),
    };
    let start: u64 = t[6].parse().map_err(|_| format!("unreadable lock range start {:?}", t[6]))?;
    let end = match t[7] {
        "EOF" => None,
        e => Some(e.parse::<u64>().map_err(|_| format!("unreadable lock range end {e:?}"))?),
    };
    Ok((kind, write, start, end))
}

/// Why the locks in fd `fd`'s fdinfo text `info` (link `link`) cannot be carried, if they
/// cannot: one line per fd, or `None`. Scans /proc for other holders of the description only
/// when the fd holds a flock or OFD lock.
pub fn blocker(pid: Pid, fd: i32, link: &str, info: &str, allies: &[Pid]) -> Option<String> {
    let mut shared_kind = None;
    for l in info.lines().filter_map(|l| l.strip_prefix("lock:")) {
        match parse(l) {
            Err(why) => return Some(format!("holds a file lock ({}): {why}", l.trim())),
            Ok((LockKind::Posix, ..)) => {}
            Ok((k, ..)) => shared_kind = shared_kind.or(Some((k, l.trim().to_string()))),
        }
    }
    let (_, raw) = shared_kind?;
    // Processes dumped with this one (its tree) share the description again after the restore.
    let others: Vec<(Pid, String)> = sharers(pid, fd, link).into_iter().filter(|(p, _)| !allies.contains(p)).collect();
    if others.is_empty() {
        return None;
    }
    Some(format!(
        "holds a file lock ({raw}) on an open file description that {} share{}: the lock belongs to the \
         description, which cannot follow the process",
        crate::files::name_holders(&others),
        if others.len() == 1 { "s" } else { "" }
    ))
}

/// The other processes holding the open file description of `pid`'s fd `fd` (the dumper's own
/// `pidfd_getfd` copies live only while an fd is described, after this check).
fn sharers(pid: Pid, fd: i32, link: &str) -> Vec<(Pid, String)> {
    let found = crate::files::holders_of(&[link.to_string()], pid);
    let mut out = Vec::new();
    for (p, comm) in found.get(link).into_iter().flatten() {
        let Some(mut fds) = crate::files::fd_dir(*p) else { continue };
        let same = fds.any(|e| {
            let Some(ofd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { return false };
            std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == link)
                && sys::kcmp_file_of(pid, fd, *p, ofd).unwrap_or(false)
        });
        if same {
            out.push((*p, comm.clone()));
        }
    }
    out
}

/// The locks of a frozen process, each once per open file description, on the first fd of
/// that description. A lock [`blocker`] refuses is an error (the preflight refused it before).
pub fn collect(pid: Pid, files: &FilesState) -> Result<Vec<FileLock>> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for e in &files.fds {
        if !seen.insert(e.file) || matches!(files.files[e.file], FileKind::External { .. }) {
            continue;
        }
        let info = std::fs::read_to_string(proc_path(pid, &format!("fdinfo/{}", e.fd))).unwrap_or_default();
        let what = std::fs::read_link(proc_path(pid, &format!("fd/{}", e.fd)))
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_default();
        for l in info.lines().filter_map(|l| l.strip_prefix("lock:")) {
            let (kind, write, start, end) = parse(l).map_err(|why| Error::UnsupportedFd {
                fd: e.fd,
                what: what.clone(),
                why: format!("holds a file lock ({}): {why}", l.trim()),
            })?;
            out.push(FileLock { fd: e.fd, what: what.clone(), kind, write, start, end });
        }
    }
    Ok(out)
}

/// `struct flock` (x86_64): l_type, l_whence (SEEK_SET), l_start, l_len (0: to EOF), l_pid.
fn flock_struct(l: &FileLock) -> [u8; 32] {
    let mut b = [0u8; 32];
    let ty = if l.write { libc::F_WRLCK } else { libc::F_RDLCK } as i16;
    b[0..2].copy_from_slice(&ty.to_le_bytes());
    b[8..16].copy_from_slice(&(l.start as i64).to_le_bytes());
    let len = l.end.map_or(0, |e| e - l.start + 1) as i64;
    b[16..24].copy_from_slice(&len.to_le_bytes());
    b
}

/// Takes every lock again, in the process being rebuilt, without waiting. Call it once all fds
/// are in place and nothing more will be closed.
pub fn restore(r: &Remote, locks: &[FileLock]) -> Result<()> {
    for l in locks {
        let got = match l.kind {
            LockKind::Flock => {
                let op = if l.write { libc::LOCK_EX } else { libc::LOCK_SH } | libc::LOCK_NB;
                r.raw(libc::SYS_flock, &[l.fd as u64, op as u64])?
            }
            LockKind::Posix | LockKind::Ofd => {
                let cmd = if l.kind == LockKind::Posix { libc::F_SETLK } else { libc::F_OFD_SETLK };
                let p = r.put(0, &flock_struct(l))?;
                r.raw(libc::SYS_fcntl, &[l.fd as u64, cmd as u64, p])?
            }
        };
        if got < 0 {
            let errno = -got as i32;
            let why = if errno == libc::EAGAIN || errno == libc::EACCES {
                match holders(&l.what, r.pid) {
                    h if h.is_empty() => "another process or open file description holds a conflicting lock".into(),
                    h => format!(
                        "{} hold{} a conflicting lock",
                        crate::files::name_holders(&h),
                        if h.len() == 1 { "s" } else { "" }
                    ),
                }
            } else {
                crate::inject::errno_name(errno)
            };
            return Err(Error::Restore(format!(
                "fd {} ({}): its {} cannot be taken again: {why}; the process is not run without it",
                l.fd,
                l.what,
                l.describe()
            )));
        }
    }
    Ok(())
}

/// The processes /proc/locks shows holding a lock on the file at `path` (not `skip`); OFD
/// locks show no process.
fn holders(path: &str, skip: Pid) -> Vec<(Pid, String)> {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::metadata(path) else { return Vec::new() };
    let dev = md.dev();
    let (major, minor) = (((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff), (dev & 0xff) | ((dev >> 12) & !0xff));
    let id = format!("{major:02x}:{minor:02x}:{}", md.ino());
    let text = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let mut out: Vec<(Pid, String)> = Vec::new();
    for l in text.lines().filter(|l| !l.contains("->")) {
        let t: Vec<&str> = l.split_whitespace().collect();
        let (Some(p), Some(d)) = (t.get(4).and_then(|p| p.parse::<Pid>().ok()), t.get(5)) else { continue };
        if *d == id && p > 0 && p != skip && !out.iter().any(|(q, _)| *q == p) {
            let comm = std::fs::read_to_string(proc_path(p, "comm")).unwrap_or_default();
            out.push((p, comm.trim_end().to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind_and_refuses_leases() {
        assert_eq!(
            parse("\t1: POSIX  ADVISORY  WRITE 5742 fe:00:10027416 0 9"),
            Ok((LockKind::Posix, true, 0, Some(9)))
        );
        assert_eq!(
            parse("\t2: POSIX  ADVISORY  READ 5742 fe:00:10027416 20 EOF"),
            Ok((LockKind::Posix, false, 20, None))
        );
        assert_eq!(parse("\t1: OFDLCK ADVISORY  WRITE -1 fe:00:10027417 5 14"), Ok((LockKind::Ofd, true, 5, Some(14))));
        assert_eq!(
            parse("\t1: FLOCK  ADVISORY  READ 5742 fe:00:10027418 0 EOF"),
            Ok((LockKind::Flock, false, 0, None))
        );
        assert!(parse("\t1: LEASE  ACTIVE    READ 5742 fe:00:10027418 0 EOF").unwrap_err().contains("F_SETLEASE"));
        assert!(parse("\t1: POSIX  *NOINODE* WRITE 5742 <none>:0 0 EOF").is_err());
    }

    #[test]
    fn flock_struct_layout() {
        let l = FileLock { fd: 3, what: "/f".into(), kind: LockKind::Posix, write: true, start: 20, end: Some(29) };
        let b = flock_struct(&l);
        assert_eq!(i16::from_le_bytes([b[0], b[1]]), libc::F_WRLCK as i16);
        assert_eq!(i64::from_le_bytes(b[8..16].try_into().unwrap()), 20);
        assert_eq!(i64::from_le_bytes(b[16..24].try_into().unwrap()), 10);
        let l = FileLock { end: None, write: false, ..l };
        let b = flock_struct(&l);
        assert_eq!(i16::from_le_bytes([b[0], b[1]]), libc::F_RDLCK as i16);
        assert_eq!(i64::from_le_bytes(b[16..24].try_into().unwrap()), 0);
        assert_eq!(std::mem::size_of::<libc::flock>(), 32);
    }
}
