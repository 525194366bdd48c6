//! Anonymous-inode fds that notify: signalfd, inotify and pidfd ([`FileKind::SignalFd`],
//! [`FileKind::Inotify`], [`FileKind::Pidfd`]). Described from /proc/PID/fdinfo (and, for
//! inotify, the file handle of each watch); rebuilt by injected calls in the new process.
//!
//! - signalfd: its mask (`sigmask:`) and flags. The signals it reads are the process's pending
//!   ones, carried by `signals`.
//! - inotify: each watch (`inotify wd:… mask:… f_handle:…`) is resolved to a path with
//!   `open_by_handle_at` and added again with its mask. Watch descriptors are handed out one
//!   after the other (the kernel's `last_wd + 1`), so the restore adds the watches in the order
//!   of their descriptors and, while the kernel answers a lower one than the image's, removes
//!   it and adds the watch again; the `IN_IGNORED` events those removals queue are read away.
//!   Refused: a watch of a deleted file, unread events (they cannot be read without consuming
//!   them).
//! - pidfd: of the process itself (`pidfd_open` of the new process, which has its pid when it
//!   was free) or of a process that has exited and been reaped (`Pid: -1`: the restorer makes a
//!   pidfd of a child of its own that exits at once and hands it over; where the kernel tells
//!   how the process ended — `PIDFD_GET_INFO`, Linux 6.15 — the child takes its ids and ends
//!   with its wait status, so that question gets the same answer too). A pidfd of another
//!   live process is refused, naming it.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::files::FileKind;
use crate::inject::Remote;
use crate::proc::{field, proc_path};
use crate::sys::{self, Pid};

/// One inotify watch.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InotifyWatch {
    pub wd: i32,
    pub path: String,
    pub mask: u32,
}

/// The largest watch descriptor restored (each lower free one costs two injected calls).
pub const MAX_WD: i32 = 1 << 16;

/// `sigmask:` of a signalfd's fdinfo.
pub fn signalfd(info: &str, flags: u32) -> FileKind {
    let mask = field(info, "sigmask").and_then(|v| u64::from_str_radix(v, 16).ok()).unwrap_or(0);
    FileKind::SignalFd { mask, flags }
}

/// One `inotify wd:…` line of an fdinfo: (wd, ino, sdev, mask, handle type, handle bytes).
fn parse_watch(line: &str) -> Option<(i32, u64, u64, u32, i32, Vec<u8>)> {
    let get = |k: &str| line.split_whitespace().find_map(|w| w.strip_prefix(k));
    let hex = |k: &str| get(k).and_then(|v| u64::from_str_radix(v, 16).ok());
    let h = get("f_handle:")?;
    let bytes: Option<Vec<u8>> =
        (0..h.len() / 2).map(|i| h.get(2 * i..2 * i + 2).and_then(|b| u8::from_str_radix(b, 16).ok())).collect();
    Some((hex("wd:")? as i32, hex("ino:")?, hex("sdev:")?, hex("mask:")? as u32, hex("fhandle-type:")? as i32, bytes?))
}

/// A mount point (from our own mountinfo, root of the filesystem preferred) of the device
/// `sdev` (the kernel's encoding: major << 20 | minor).
pub(crate) fn mount_of(sdev: u64) -> Option<String> {
    let want = format!("{}:{}", sdev >> 20, sdev & 0xfffff);
    let mi = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<String> = None;
    for l in mi.lines() {
        let w: Vec<&str> = l.split(' ').collect();
        if w.len() > 4 && w[2] == want {
            if w[3] == "/" {
                return Some(w[4].to_string());
            }
            best.get_or_insert_with(|| w[4].to_string());
        }
    }
    best
}

/// The path of the file an inotify watch names, checked to name that inode still.
pub(crate) fn watch_path(ino: u64, sdev: u64, htype: i32, handle: &[u8]) -> std::result::Result<String, String> {
    let mnt = mount_of(sdev).ok_or_else(|| format!("no mount of device {}:{}", sdev >> 20, sdev & 0xfffff))?;
    let m = std::fs::File::open(&mnt).map_err(|e| format!("cannot open mount {mnt}: {e}"))?;
    let f = sys::open_by_handle(&m, htype, handle).map_err(|e| format!("open_by_handle_at (inode {ino}): {e}"))?;
    let path = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .map_err(|e| e.to_string())?
        .to_string_lossy()
        .into_owned();
    if path.ends_with(" (deleted)") {
        return Err(format!("it watches a deleted file ({path}, inode {ino})"));
    }
    let md = std::fs::metadata(&path).map_err(|e| format!("it watches {path}, which cannot be looked up: {e}"))?;
    if md.ino() != ino {
        return Err(format!("it watches inode {ino}, and {path} now names another file"));
    }
    Ok(path)
}

/// An inotify instance: its watches with paths, or why it cannot be carried.
pub fn inotify(pidfd: &OwnedFd, fd: i32, info: &str, flags: u32) -> std::result::Result<FileKind, String> {
    let mut watches = Vec::new();
    for l in info.lines().filter(|l| l.starts_with("inotify ")) {
        let (wd, ino, sdev, mask, htype, handle) =
            parse_watch(l).ok_or_else(|| format!("cannot read the watch line {l:?}"))?;
        if wd > MAX_WD {
            return Err(format!("watch descriptor {wd} is above {MAX_WD}"));
        }
        let path = watch_path(ino, sdev, htype, &handle)?;
        watches.push(InotifyWatch { wd, path, mask });
    }
    watches.sort_by_key(|w| w.wd);
    let dup = sys::pidfd_getfd(pidfd, fd).map_err(|e| format!("pidfd_getfd: {e}"))?;
    let unread = sys::fionread(&dup).map_err(|e| format!("FIONREAD: {e}"))?;
    if unread != 0 {
        return Err(format!(
            "{unread} bytes of unread inotify events (events cannot be copied without consuming them)"
        ));
    }
    Ok(FileKind::Inotify { flags, watches })
}

/// A pidfd: of the process itself, or of a process that is gone; another live process's is
/// refused naming it.
/// `exit` asks the kernel how a dead one ended ([`sys::pidfd_exit_info`]).
pub fn pidfd(
    pid: Pid,
    info: &str,
    flags: u32,
    exit: &dyn Fn() -> Option<(i32, [u32; 8])>,
) -> std::result::Result<FileKind, String> {
    let target: i64 = field(info, "Pid").and_then(|v| v.parse().ok()).unwrap_or(0);
    match target {
        -1 => Ok(FileKind::Pidfd { flags, dead: true, exit: exit() }),
        t if t == pid as i64 => Ok(FileKind::Pidfd { flags, dead: false, exit: None }),
        0 => Err("a pidfd of a process in another pid namespace".into()),
        t if proc_path(pid, &format!("task/{t}")).exists() => {
            Err(format!("a pidfd of thread {t} of the process itself (PIDFD_THREAD; not carried yet)"))
        }
        t => {
            let comm = std::fs::read_to_string(proc_path(t as Pid, "comm")).unwrap_or_default();
            Err(format!(
                "a pidfd of pid {t} ({}), another live process (only pidfds of the process itself or of a \
                 process that has exited are carried)",
                comm.trim_end()
            ))
        }
    }
}

/// Rebuilds a signalfd; returns its fd in the new process.
pub fn restore_signalfd(r: &Remote, mask: u64, flags: u32) -> Result<u64> {
    let a = r.put(0, &mask.to_le_bytes())?;
    let fl = (flags & libc::O_NONBLOCK as u32) as u64 | libc::O_CLOEXEC as u64;
    r.call("signalfd4", libc::SYS_signalfd4, &[u64::MAX, a, 8, fl])
}

/// Rebuilds an inotify instance with its watches at their descriptors.
pub fn restore_inotify(r: &Remote, flags: u32, watches: &[InotifyWatch]) -> Result<u64> {
    let fd = r.call("inotify_init1", libc::SYS_inotify_init1, &[(libc::O_NONBLOCK | libc::O_CLOEXEC) as u64])?;
    let mut removed = false;
    for w in watches {
        let p = r.put_cstr(0, w.path.as_bytes())?;
        let what = format!("inotify_add_watch {} (wd {})", w.path, w.wd);
        let mut got = r.call(&what, libc::SYS_inotify_add_watch, &[fd, p, w.mask as u64])? as i32;
        // Bounded: each turn the kernel hands out the next descriptor.
        for _ in 0..MAX_WD {
            if got >= w.wd {
                break;
            }
            r.call("inotify_rm_watch", libc::SYS_inotify_rm_watch, &[fd, got as u64])?;
            removed = true;
            got = r.call(&what, libc::SYS_inotify_add_watch, &[fd, p, w.mask as u64])? as i32;
        }
        if got != w.wd {
            return Err(Error::Restore(format!("inotify watch of {}: got descriptor {got}, not {}", w.path, w.wd)));
        }
    }
    if removed {
        // Read away the IN_IGNORED events of the removed stand-ins (non-blocking: ends at EAGAIN).
        let len = (r.scratch_len / 2) as u64;
        for _ in 0..MAX_WD {
            if r.raw(libc::SYS_read, &[fd, r.scratch, len])? <= 0 {
                break;
            }
        }
    }
    let fl = (flags & libc::O_NONBLOCK as u32) as u64;
    r.call("fcntl(F_SETFL) (inotify)", libc::SYS_fcntl, &[fd, libc::F_SETFL as u64, fl])?;
    Ok(fd)
}

/// Rebuilds a pidfd: of the new process itself, or of a reaped child of the restorer.
pub fn restore_pidfd(r: &Remote, flags: u32, dead: bool, exit: Option<(i32, [u32; 8])>) -> Result<u64> {
    // PIDFD_NONBLOCK = O_NONBLOCK, PIDFD_THREAD = O_EXCL.
    let fl = (flags & (libc::O_NONBLOCK | libc::O_EXCL) as u32) as u64;
    if !dead {
        return r.call("pidfd_open (itself)", libc::SYS_pidfd_open, &[r.pid as u64, fl]);
    }
    let local = sys::dead_pidfd(exit).map_err(|e| Error::Restore(format!("a pidfd of an exited process: {e}")))?;
    let me = r.call("pidfd_open (restorer)", libc::SYS_pidfd_open, &[std::process::id() as u64, 0])?;
    let got =
        r.call("pidfd_getfd (pidfd of an exited process)", libc::SYS_pidfd_getfd, &[me, local.as_raw_fd() as u64, 0]);
    r.call("close", libc::SYS_close, &[me])?;
    let got = got?;
    r.call("fcntl(F_SETFL) (pidfd)", libc::SYS_fcntl, &[got, libc::F_SETFL as u64, fl & libc::O_NONBLOCK as u64])?;
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_inotify_watch_lines() {
        let l = "inotify wd:2 ino:263 sdev:fe00000 mask:80000002 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 \
                 f_handle:6302000000000000";
        let (wd, ino, sdev, mask, ty, h) = parse_watch(l).unwrap();
        assert_eq!((wd, ino, sdev, mask, ty), (2, 0x263, 0xfe00000, 0x8000_0002, 1));
        assert_eq!(h, vec![0x63, 2, 0, 0, 0, 0, 0, 0]);
        assert!(parse_watch("inotify wd:2").is_none());
    }

    #[test]
    fn describes_own_signalfd_pidfd_and_inotify() {
        let me = std::process::id() as Pid;
        assert_eq!(
            signalfd("pos:\t0\nsigmask:\t0000000800000200\n", 0o4002),
            FileKind::SignalFd { mask: 0x8_0000_0200, flags: 0o4002 }
        );
        let gone = || Some((7 << 8, [0; 8]));
        assert_eq!(
            pidfd(me, &format!("Pid:\t{me}\n"), 2, &gone).unwrap(),
            FileKind::Pidfd { flags: 2, dead: false, exit: None }
        );
        assert_eq!(pidfd(me, "Pid:\t-1\n", 2, &gone).unwrap(), FileKind::Pidfd { flags: 2, dead: true, exit: gone() });
        assert!(pidfd(me, "Pid:\t1\n", 2, &gone).unwrap_err().contains("pid 1 ("));
        // A pidfd of one of its own threads (PIDFD_THREAD) is named as such.
        let (tx, rx) = std::sync::mpsc::channel();
        let (hold, release) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // Its tid, from /proc/thread-self ("PID/task/TID").
            let tid = std::fs::read_link("/proc/thread-self").unwrap();
            tx.send(tid.file_name().unwrap().to_string_lossy().into_owned()).unwrap();
            let _ = release.recv();
        });
        let tid = rx.recv().unwrap();
        let why = pidfd(me, &format!("Pid:\t{tid}\n"), 2, &gone).unwrap_err();
        assert!(why.contains(&format!("thread {tid} of the process itself")), "{why}");
        drop(hold);
        t.join().unwrap();
        // A dead process's pidfd made here tells the exit it was given (it forks: see FORK_LOCK).
        let _fork = crate::FORK_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let fd = sys::dead_pidfd(Some((9 << 8, [0; 8]))).unwrap();
        assert_eq!(sys::pidfd_exit_info(&fd).map(|e| e.0), Some(9 << 8));
        let fd = sys::dead_pidfd(Some((libc::SIGTERM, [0; 8]))).unwrap();
        assert_eq!(sys::pidfd_exit_info(&fd).map(|e| e.0), Some(libc::SIGTERM));
        // A watch of a real directory resolves to its path (root: CAP_DAC_READ_SEARCH).
        if is_root() {
            let d = tempfile::tempdir().unwrap();
            let ino = std::fs::metadata(d.path()).unwrap().ino();
            let info = watch_line_of(d.path());
            let (_, i, sdev, _, ty, h) = parse_watch(&info).unwrap();
            assert_eq!(i, ino);
            assert_eq!(watch_path(i, sdev, ty, &h).unwrap(), d.path().to_str().unwrap());
        }
    }

    fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")))
            .unwrap_or(false)
    }

    /// The fdinfo watch line of a new inotify instance watching `p`.
    fn watch_line_of(p: &std::path::Path) -> String {
        let fd = sys::inotify_watching(p).unwrap();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap();
        info.lines().find(|l| l.starts_with("inotify ")).unwrap().to_string()
    }
}
