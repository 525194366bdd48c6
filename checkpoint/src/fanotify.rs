//! fanotify groups ([`FileKind::Fanotify`]), from /proc/PID/fdinfo: the group's init flags and
//! event file flags (`fanotify flags:… event-flags:…`), and every mark — of an inode (`ino:…
//! sdev:… f_handle:…`, resolved to a path with `open_by_handle_at` as inotify watches are), of
//! a mount (`mnt_id:…`, its mount point from the process's mountinfo) or of a filesystem
//! (`sdev:…`) — with its mask, ignore mask and user flags (ignored-survives-modify, evictable,
//! ignore). Rebuilt by injected `fanotify_init` and `fanotify_mark` calls (CAP_SYS_ADMIN: the
//! restore runs as root).
//!
//! A mark whose masks are both empty (an ignore mask without FAN_MARK_IGNORED_SURV_MODIFY
//! is cleared by the next modification) has no effect and is not made again.
//!
//! Refused: unread events (they cannot be copied without consuming them), a group of the
//! content or pre-content class (permission events read and not answered yet are not shown
//! anywhere), a mark of a deleted file, a mark of a kind this engine does not know.

use std::os::fd::OwnedFd;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::files::FileKind;
use crate::inject::Remote;
use crate::proc::proc_path;
use crate::sys::{self, Pid};

const FAN_MARK_ADD: u64 = 0x1;
const FAN_MARK_DONT_FOLLOW: u64 = 0x4;
const FAN_MARK_MOUNT: u64 = 0x10;
const FAN_MARK_IGNORED_MASK: u64 = 0x20;
const FAN_MARK_FILESYSTEM: u64 = 0x100;
const FAN_MARK_IGNORE: u32 = 0x400;
/// The user flags fdinfo shows (`mflags`): ignored-survives-modify, evictable, ignore.
const MARK_USER_FLAGS: u32 = 0x40 | 0x200 | 0x400;
const FAN_CLASS_BITS: u32 = 0x4 | 0x8;

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum MarkKind {
    Inode,
    Mount,
    Filesystem,
}

/// One fanotify mark, with the path it is added on again.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Mark {
    pub kind: MarkKind,
    pub path: String,
    pub mflags: u32,
    pub mask: u64,
    pub ignored: u64,
}

/// `key:hex` of a fanotify fdinfo line.
fn hex(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)).and_then(|v| u64::from_str_radix(v, 16).ok())
}

/// The mount point of mount `id` in the process's mountinfo.
fn mount_point(pid: Pid, id: u64) -> Option<String> {
    let mi = std::fs::read_to_string(proc_path(pid, "mountinfo")).ok()?;
    mi.lines().find_map(|l| {
        let w: Vec<&str> = l.split(' ').collect();
        (w.first()?.parse::<u64>().ok()? == id).then(|| w.get(4).map(|s| s.to_string()))?
    })
}

/// One mark line, or why it cannot be carried.
fn mark(pid: Pid, line: &str) -> std::result::Result<Mark, String> {
    let mflags = hex(line, "mflags:").ok_or_else(|| format!("cannot read the mark line {line:?}"))? as u32;
    let mask = hex(line, "mask:").ok_or_else(|| format!("cannot read the mark line {line:?}"))?;
    let ignored = hex(line, "ignored_mask:").unwrap_or(0);
    if mflags & !MARK_USER_FLAGS != 0 {
        return Err(format!("a mark with flags {mflags:#x} this engine does not know"));
    }
    let (kind, path) = if let Some(ino) = hex(line, "ino:") {
        let sdev = hex(line, "sdev:").unwrap_or(0);
        let htype = hex(line, "fhandle-type:").ok_or_else(|| format!("a mark without a file handle: {line:?}"))?;
        let h = line.split_whitespace().find_map(|w| w.strip_prefix("f_handle:")).unwrap_or("");
        let bytes: Option<Vec<u8>> =
            (0..h.len() / 2).map(|i| h.get(2 * i..2 * i + 2).and_then(|b| u8::from_str_radix(b, 16).ok())).collect();
        let bytes = bytes.ok_or_else(|| format!("cannot read the file handle in {line:?}"))?;
        (MarkKind::Inode, crate::anonfds::watch_path(ino, sdev, htype as i32, &bytes)?)
    } else if let Some(id) = hex(line, "mnt_id:") {
        (MarkKind::Mount, mount_point(pid, id).ok_or_else(|| format!("a mark of mount {id}, which is not found"))?)
    } else if let Some(sdev) = hex(line, "sdev:") {
        let m = crate::anonfds::mount_of(sdev).ok_or_else(|| {
            format!("a mark of filesystem {}:{}, which is not mounted here", sdev >> 20, sdev & 0xfffff)
        })?;
        (MarkKind::Filesystem, m)
    } else {
        return Err(format!("a mark of a kind this engine does not know: {line:?}"));
    };
    Ok(Mark { kind, path, mflags, mask, ignored })
}

/// A fanotify group with its marks, or why it cannot be carried.
pub fn describe(pid: Pid, pidfd: &OwnedFd, fd: i32, info: &str, flags: u32) -> std::result::Result<FileKind, String> {
    let head = info.lines().find(|l| l.starts_with("fanotify flags:")).ok_or("no fanotify line in its fdinfo")?;
    let init = hex(head, "flags:").ok_or("cannot read its flags")? as u32;
    let event_flags = hex(head, "event-flags:").unwrap_or(0) as u32;
    if init & FAN_CLASS_BITS != 0 {
        return Err(format!(
            "a fanotify group of the content or pre-content class (flags {init:#x}): permission events read and \
             not answered yet are not shown anywhere"
        ));
    }
    let marks = info
        .lines()
        .filter(|l| l.starts_with("fanotify ") && !l.starts_with("fanotify flags:"))
        .map(|l| mark(pid, l))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let dup = sys::pidfd_getfd(pidfd, fd).map_err(|e| format!("pidfd_getfd: {e}"))?;
    let unread = sys::fionread(&dup).map_err(|e| format!("FIONREAD: {e}"))?;
    if unread != 0 {
        return Err(format!(
            "{unread} bytes of unread fanotify events (events cannot be copied without consuming them)"
        ));
    }
    Ok(FileKind::Fanotify { init, event_flags, flags, marks })
}

/// Rebuilds a fanotify group with its marks; returns its fd in the new process.
pub fn restore(r: &Remote, init: u32, event_flags: u32, flags: u32, marks: &[Mark]) -> Result<u64> {
    // With the flags it was made with (the group shows them, FAN_CLOEXEC and FAN_NONBLOCK
    // too); the description's own flags and close-on-exec are set after.
    let fd = r.call("fanotify_init", libc::SYS_fanotify_init, &[init as u64, event_flags as u64])?;
    let fl = (flags & libc::O_NONBLOCK as u32) as u64;
    r.call("fcntl(F_SETFL) (fanotify)", libc::SYS_fcntl, &[fd, libc::F_SETFL as u64, fl])?;
    r.call("fcntl(F_SETFD) (fanotify)", libc::SYS_fcntl, &[fd, libc::F_SETFD as u64, libc::FD_CLOEXEC as u64])?;
    // fdinfo lists the newest mark first: added oldest first, they list as before.
    for m in marks.iter().rev() {
        let p = r.put_cstr(0, m.path.as_bytes())?;
        let kind = match m.kind {
            MarkKind::Inode => FAN_MARK_DONT_FOLLOW,
            MarkKind::Mount => FAN_MARK_MOUNT,
            MarkKind::Filesystem => FAN_MARK_FILESYSTEM,
        };
        let user = (m.mflags & !FAN_MARK_IGNORE) as u64;
        let what = format!("fanotify_mark {} ({:?})", m.path, m.kind);
        if m.mask != 0 {
            let f = FAN_MARK_ADD | kind | user;
            r.call(&what, libc::SYS_fanotify_mark, &[fd, f, m.mask, libc::AT_FDCWD as u64, p])?;
        }
        if m.ignored != 0 {
            let ig = if m.mflags & FAN_MARK_IGNORE != 0 { FAN_MARK_IGNORE as u64 } else { FAN_MARK_IGNORED_MASK };
            let f = FAN_MARK_ADD | kind | user | ig;
            r.call(&what, libc::SYS_fanotify_mark, &[fd, f, m.ignored, libc::AT_FDCWD as u64, p])?;
        }
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fanotify_lines() {
        let l = "fanotify mnt_id:1a mflags:40 mask:8 ignored_mask:2";
        assert_eq!(
            (hex(l, "mnt_id:"), hex(l, "mflags:"), hex(l, "mask:"), hex(l, "ignored_mask:")),
            (Some(0x1a), Some(0x40), Some(8), Some(2))
        );
        assert_eq!(hex(l, "ino:"), None);
        let me = std::process::id() as Pid;
        assert!(mark(me, "fanotify mflags:1000 mask:8 ignored_mask:0").unwrap_err().contains("flags 0x1000"));
        assert!(mark(me, "fanotify mntns:7 mflags:0 mask:8 ignored_mask:0").unwrap_err().contains("does not know"));
        // The root mount of our own mountinfo is found by its id.
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let id: u64 = mi.lines().next().unwrap().split(' ').next().unwrap().parse().unwrap();
        let m = mark(me, &format!("fanotify mnt_id:{id:x} mflags:0 mask:8 ignored_mask:0")).unwrap();
        assert_eq!(m.kind, MarkKind::Mount);
    }
}
