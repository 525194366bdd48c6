//! File descriptors: each open file description once (fds sharing one are found with
//! `kcmp(KCMP_FILE)`), then every fd number that refers to it with its close-on-exec flag.
//!
//! Supported: regular files and directories (path, flags, offset), /dev/null and friends, FIFOs by
//! path with their unread data (when no other process holds them), pipes with both ends in the process (unread data copied with `tee`, not consumed;
//! further descriptions of one, reopened through /proc/PID/fd, when no other process holds it),
//! eventfd (counter), timerfd (clock, remaining time, interval, unread ticks), epoll (every
//! registered fd with its events and data), AF_UNIX listeners bound to a path, AF_UNIX stream
//! pairs with both ends inside (peer from sock_diag, unread bytes with MSG_PEEK), memfds,
//! signalfd, inotify and pidfds (see `anonfds`), files and FIFOs deleted while open (see `ghosts`), and
//! fds left to the caller. Anything else is refused with the fd named, before the process is
//! frozen.
//!
//! Rebuild: every description is created inside the process (injected open/pipe2/eventfd2/…) at a
//! temporary number above all the image's fds, `dup3`'d to each of its numbers, temporaries
//! closed; epoll sets last, once their targets sit at their final numbers.

use std::collections::{HashMap, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::inject::Remote;
use crate::proc::{field, proc_path};
use crate::sys::{self, Pid};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum PathKind {
    Regular,
    Dir,
    CharDev,
    /// A symbolic link itself, held with `O_PATH|O_NOFOLLOW`.
    Symlink,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum FileKind {
    Path {
        path: String,
        kind: PathKind,
        flags: u32,
        pos: u64,
    },
    /// A FIFO (named pipe) opened by path; `data` (unread bytes, copied with `tee`) and `size`
    /// are the pipe's (the same in every description of the FIFO `ino`).
    Fifo {
        path: String,
        ino: u64,
        flags: u32,
        data: Vec<u8>,
        size: u64,
    },
    /// One end of a pipe; `data` (unread bytes) and `size` are carried by the read end.
    Pipe {
        ino: u64,
        write_end: bool,
        flags: u32,
        data: Vec<u8>,
        size: u64,
    },
    EventFd {
        count: u64,
        flags: u32,
        semaphore: bool,
    },
    /// Times in nanoseconds; `value` is what remained until the next expiry.
    TimerFd {
        clockid: i32,
        flags: u32,
        ticks: u64,
        value_ns: u64,
        interval_ns: u64,
    },
    /// `targets`: (fd number it was registered under, events, data, index in
    /// `FilesState::files` of the registered file — which the fd number may no longer name:
    /// closed or re-used since, the registration stays).
    Epoll {
        flags: u32,
        targets: Vec<(i32, u32, u64, usize)>,
    },
    UnixListener {
        path: Vec<u8>,
        sock_type: i32,
        flags: u32,
    },
    /// One end of a connected AF_UNIX stream socket whose peer is also in the process (e.g.
    /// asyncio's self-pipe); `data` is what was queued for this end to read, `shutdown` the
    /// kernel's mask (1 = receive side, 2 = send side).
    UnixPair {
        ino: u64,
        peer: u64,
        flags: u32,
        data: Vec<u8>,
        shutdown: u8,
    },
    /// An fd of a memfd (content saved once per inode, see `memfd`).
    Memfd {
        ino: u64,
        name: String,
        flags: u32,
        pos: u64,
    },
    /// Left to the caller (e.g. the dvk agent link, a virtual socket): not inspected at dump;
    /// at restore the caller hands in a replacement, installed at this fd with these flags.
    External {
        fd: i32,
        what: String,
        flags: u32,
    },
    /// A signalfd: the signals it reads (see `anonfds`).
    SignalFd {
        mask: u64,
        flags: u32,
    },
    /// An inotify instance: its watches, by descriptor (see `anonfds`).
    Inotify {
        flags: u32,
        watches: Vec<crate::anonfds::InotifyWatch>,
    },
    /// A pidfd of the process itself, or (`dead`) of a process that has exited, with its wait
    /// status and ids where the kernel tells them (see `anonfds`).
    Pidfd {
        flags: u32,
        dead: bool,
        exit: Option<(i32, [u32; 8])>,
    },
    /// A directory deleted while open (`is_cwd`: it is also the working directory); see `ghosts`.
    GhostDir {
        path: String,
        dir: crate::ghosts::DeletedDir,
        is_cwd: bool,
        flags: u32,
        pos: u64,
    },
    /// A regular file deleted while open (content saved once per inode, see `ghosts`).
    Ghost {
        ino: u64,
        path: String,
        flags: u32,
        pos: u64,
    },
    /// A connected AF_UNIX stream socket whose peer has closed (every JVM with NIO holds one):
    /// `data` is what is still queued for it to read; after that it reads end of file.
    UnixPeerGone {
        flags: u32,
        data: Vec<u8>,
    },
    /// The master of a pty pair whose slave the process holds too: the pair's settings and
    /// unread data (see `ttys`).
    PtyMaster {
        index: u32,
        flags: u32,
        pty: Box<crate::ttys::Pty>,
    },
    /// A slave of a pty whose master is in the process (`index`: the master's).
    PtySlave {
        index: u32,
        flags: u32,
    },
    /// A fanotify group: init flags, event file flags, marks (see `fanotify`).
    Fanotify {
        init: u32,
        event_flags: u32,
        flags: u32,
        marks: Vec<crate::fanotify::Mark>,
    },
    /// An fd of one of the restorer's own namespaces, by kind (see `nsfds`).
    Namespace {
        kind: String,
        flags: u32,
    },
    /// A FIFO deleted while open (see `ghosts`): made again in its directory at restore and
    /// unlinked at once; `data` and `size` as for [`FileKind::Fifo`]; `mode`, `uid`, `gid` the
    /// inode's.
    GhostFifo {
        path: String,
        ino: u64,
        flags: u32,
        data: Vec<u8>,
        size: u64,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    /// The controlling terminal of a shell job (`path` as it was), dumped with
    /// `DumpOptions::shell_job`: the restorer's terminal takes its place (see `ttys`).
    ShellTerminal {
        path: String,
        flags: u32,
        termios: crate::ttys::Termios,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FdEntry {
    pub fd: i32,
    pub cloexec: bool,
    pub file: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FilesState {
    pub files: Vec<FileKind>,
    pub fds: Vec<FdEntry>,
}

pub(crate) fn list_fds(pid: Pid) -> Result<Vec<i32>> {
    let d = proc_path(pid, "fd");
    let mut v: Vec<i32> = std::fs::read_dir(&d)
        .map_err(|source| Error::NoProcess { pid, err: source })?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    Ok(v)
}

fn octal(s: Option<&str>) -> u32 {
    s.and_then(|v| u32::from_str_radix(v, 8).ok()).unwrap_or(0)
}

fn pair_ns(s: Option<&str>) -> u64 {
    // "(sec, nsec)"
    let s = s.unwrap_or("(0, 0)").trim_matches(|c| c == '(' || c == ')');
    let mut it = s.split(',').map(|x| x.trim().parse::<u64>().unwrap_or(0));
    it.next().unwrap_or(0) * 1_000_000_000 + it.next().unwrap_or(0)
}

const ALLOWED_DEVS: [&str; 5] = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"];

/// The unread bytes and the size of the pipe behind the FIFO at `fd`: through the process's own
/// description when it can read, else a new read-only opener of the FIFO (never waits). Copied
/// with `tee`, not consumed.
fn fifo_contents(
    pid: Pid,
    fd: i32,
    flags: u32,
    pidfd: &std::os::fd::OwnedFd,
) -> std::result::Result<(Vec<u8>, u64), String> {
    let readable = flags & libc::O_ACCMODE as u32 != libc::O_WRONLY as u32;
    let pipe: std::os::fd::OwnedFd = if readable {
        sys::pidfd_getfd(pidfd, fd).map_err(|e| format!("pidfd_getfd: {e}"))?
    } else {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(proc_path(pid, &format!("fd/{fd}")))
            .map_err(|e| format!("cannot open the FIFO to copy its data: {e}"))?
            .into()
    };
    let size = sys::pipe_size(&pipe).map_err(|e| e.to_string())? as u64;
    let data = sys::pipe_peek(&pipe, size as usize).map_err(|e| format!("cannot copy unread data: {e}"))?;
    Ok((data, size))
}

/// Describes one fd, or refuses it naming it.
fn describe(pid: Pid, fd: i32, pidfd: &std::os::fd::OwnedFd) -> Result<FileKind> {
    let link = std::fs::read_link(proc_path(pid, &format!("fd/{fd}")))
        .map_err(|source| Error::NoProcess { pid, err: source })?
        .to_string_lossy()
        .into_owned();
    let info = std::fs::read_to_string(proc_path(pid, &format!("fdinfo/{fd}")))
        .map_err(|source| Error::NoProcess { pid, err: source })?;
    let flags = octal(field(&info, "flags"));
    let pos = field(&info, "pos").and_then(|v| v.parse().ok()).unwrap_or(0);
    let refuse = |why: &str| Error::UnsupportedFd { fd, what: link.clone(), why: why.to_string() };
    if let Some(name) = crate::memfd::name_of(&link) {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(proc_path(pid, &format!("fd/{fd}"))).map_err(|e| refuse(&e.to_string()))?;
        return Ok(FileKind::Memfd { ino: md.ino(), name: name.to_string(), flags, pos });
    }
    if link.starts_with('/') {
        if let Some(why) = crate::ttys::closed_master(&link) {
            return Err(refuse(&why));
        }
        if let Some(path) = crate::ghosts::deleted_path(&link) {
            let fdp = proc_path(pid, &format!("fd/{fd}"));
            if std::fs::metadata(&fdp).map(|m| m.is_dir()).unwrap_or(false) {
                use std::os::unix::fs::MetadataExt;
                crate::ghosts::parent_exists(path).map_err(|why| refuse(&why))?;
                let dir = crate::ghosts::DeletedDir::of(&fdp).map_err(|e| refuse(&e.to_string()))?;
                let cwd = std::fs::metadata(proc_path(pid, "cwd")).ok();
                let is_cwd = cwd.is_some_and(|c| c.ino() == dir.ino && c.nlink() == 0);
                return Ok(FileKind::GhostDir { path: path.to_string(), dir, is_cwd, flags, pos });
            }
            if let Some(md) = std::fs::metadata(&fdp).ok().filter(|m| m.file_type().is_fifo()) {
                use std::os::unix::fs::MetadataExt;
                if md.nlink() != 0 {
                    return Err(refuse(&format!(
                        "the FIFO {path} was removed but has {} other name(s) (not carried)",
                        md.nlink()
                    )));
                }
                crate::ghosts::parent_exists(path).map_err(|why| refuse(&why))?;
                let (data, size) = fifo_contents(pid, fd, flags, pidfd).map_err(|why| refuse(&why))?;
                return Ok(FileKind::GhostFifo {
                    path: path.to_string(),
                    ino: md.ino(),
                    flags,
                    data,
                    size,
                    mode: md.mode() & 0o7777,
                    uid: md.uid(),
                    gid: md.gid(),
                });
            }
            let (_, ino) = crate::ghosts::judge(&fdp, path).map_err(|why| refuse(&why))?;
            return Ok(FileKind::Ghost { ino, path: path.to_string(), flags, pos });
        }
        let own = std::fs::metadata(proc_path(pid, &format!("fd/{fd}"))).map_err(|e| refuse(&e.to_string()))?;
        // An O_PATH|O_NOFOLLOW fd of a symbolic link is the link itself, not what it names.
        let md = if own.file_type().is_symlink() { std::fs::symlink_metadata(&link) } else { std::fs::metadata(&link) }
            .map_err(|e| refuse(&format!("cannot stat the path: {e}")))?;
        use std::os::unix::fs::MetadataExt;
        if (md.ino(), md.dev()) != (own.ino(), own.dev()) {
            return Err(refuse("the path now names another file"));
        }
        let ft = md.file_type();
        let kind = if ft.is_file() {
            PathKind::Regular
        } else if ft.is_dir() {
            PathKind::Dir
        } else if ft.is_symlink() {
            PathKind::Symlink
        } else if ft.is_fifo() {
            let (data, size) = fifo_contents(pid, fd, flags, pidfd).map_err(|why| refuse(&why))?;
            return Ok(FileKind::Fifo { path: link.clone(), ino: own.ino(), flags, data, size });
        } else if ft.is_char_device() && ALLOWED_DEVS.contains(&link.as_str()) {
            PathKind::CharDev
        } else if let Some(k) =
            ft.is_char_device().then(|| crate::ttys::describe(&link, &info, md.rdev(), flags)).flatten()
        {
            return Ok(k);
        } else if ft.is_char_device() && is_tty_path(&link) {
            return Err(refuse(&format!(
                "it is the terminal {link} (a tty cannot follow the process; a shell job's terminal can be \
                 replaced by the restorer's: dump and restore with --shell-job)"
            )));
        } else {
            return Err(refuse("device or special file"));
        };
        let path = own_proc_path(pid, &link).map_err(|why| refuse(&why))?;
        return Ok(FileKind::Path { path, kind, flags, pos });
    }
    if let Some(ino) = link.strip_prefix("pipe:[").and_then(|s| s.strip_suffix(']')) {
        let ino: u64 = ino.parse().unwrap_or(0);
        let write_end = flags & libc::O_ACCMODE as u32 == libc::O_WRONLY as u32;
        let (mut data, mut size) = (Vec::new(), 0);
        if !write_end {
            let dup = sys::pidfd_getfd(pidfd, fd).map_err(|e| refuse(&format!("pidfd_getfd: {e}")))?;
            size = sys::pipe_size(&dup).map_err(|e| refuse(&e.to_string()))? as u64;
            data = sys::pipe_peek(&dup, size as usize).map_err(|e| refuse(&format!("cannot copy unread data: {e}")))?;
        }
        return Ok(FileKind::Pipe { ino, write_end, flags, data, size });
    }
    if let Some(k) = crate::nsfds::describe(&link, flags) {
        return k.map_err(|why| refuse(&why));
    }
    match link.as_str() {
        "anon_inode:[eventfd]" => {
            let count = field(&info, "eventfd-count").and_then(|v| u64::from_str_radix(v, 16).ok()).unwrap_or(0);
            let semaphore = field(&info, "eventfd-semaphore").map(|v| v != "0").unwrap_or(false);
            return Ok(FileKind::EventFd { count, flags, semaphore });
        }
        "anon_inode:[timerfd]" => {
            return Ok(FileKind::TimerFd {
                clockid: field(&info, "clockid").and_then(|v| v.parse().ok()).unwrap_or(0),
                flags,
                ticks: field(&info, "ticks").and_then(|v| v.parse().ok()).unwrap_or(0),
                value_ns: pair_ns(field(&info, "it_value")),
                interval_ns: pair_ns(field(&info, "it_interval")),
            });
        }
        "anon_inode:[signalfd]" => return Ok(crate::anonfds::signalfd(&info, flags)),
        "anon_inode:[fanotify]" => {
            return crate::fanotify::describe(pid, pidfd, fd, &info, flags).map_err(|why| refuse(&why))
        }
        "anon_inode:inotify" => return crate::anonfds::inotify(pidfd, fd, &info, flags).map_err(|why| refuse(&why)),
        "anon_inode:[pidfd]" => {
            let exit = || sys::pidfd_getfd(pidfd, fd).ok().and_then(|d| sys::pidfd_exit_info(&d));
            return crate::anonfds::pidfd(pid, &info, flags, &exit).map_err(|why| refuse(&why));
        }
        "anon_inode:[eventpoll]" => {
            let mut targets = Vec::new();
            for l in info.lines().filter(|l| l.starts_with("tfd:")) {
                let w: Vec<&str> = l.split_whitespace().collect();
                let get = |k: &str| w.iter().position(|x| *x == k).and_then(|i| w.get(i + 1)).copied();
                let tfd = get("tfd:").and_then(|v| v.parse().ok()).unwrap_or(-1);
                let ev = get("events:").and_then(|v| u32::from_str_radix(v, 16).ok()).unwrap_or(0);
                let data = get("data:").and_then(|v| u64::from_str_radix(v, 16).ok()).unwrap_or(0);
                targets.push((tfd, ev, data, usize::MAX)); // file: see `resolve_epoll_targets`
            }
            return Ok(FileKind::Epoll { flags, targets });
        }
        _ => {}
    }
    if link.starts_with("socket:[") {
        let dup = sys::pidfd_getfd(pidfd, fd).map_err(|e| refuse(&format!("pidfd_getfd: {e}")))?;
        let domain = sys::getsockopt_int(&dup, libc::SOL_SOCKET, libc::SO_DOMAIN).unwrap_or(-1);
        let ty = sys::getsockopt_int(&dup, libc::SOL_SOCKET, libc::SO_TYPE).unwrap_or(-1);
        let listening = sys::getsockopt_int(&dup, libc::SOL_SOCKET, libc::SO_ACCEPTCONN).unwrap_or(0) != 0;
        let fam = match domain {
            libc::AF_INET => "AF_INET",
            libc::AF_INET6 => "AF_INET6",
            libc::AF_UNIX => "AF_UNIX",
            libc::AF_NETLINK => "AF_NETLINK",
            libc::AF_PACKET => "AF_PACKET",
            _ => "other family",
        };
        let what = format!("{link}, {fam}");
        let refuse = |why: &str| Error::UnsupportedFd { fd, what: what.clone(), why: why.to_string() };
        if domain == libc::AF_UNIX && listening {
            let Some(mut path) = sys::unix_sock_path(&dup).map_err(|e| refuse(&e.to_string()))? else {
                return Err(refuse("abstract or unnamed AF_UNIX listeners are not supported yet"));
            };
            if path.first() != Some(&b'/') {
                let cwd = std::fs::read_link(proc_path(pid, "cwd")).map_err(|e| refuse(&e.to_string()))?;
                let mut p = cwd.as_os_str().as_encoded_bytes().to_vec();
                p.push(b'/');
                p.extend_from_slice(&path);
                path = p;
            }
            return Ok(FileKind::UnixListener { path, sock_type: ty, flags });
        }
        if domain == libc::AF_UNIX && ty == libc::SOCK_STREAM {
            let ino: u32 = link.trim_start_matches("socket:[").trim_end_matches(']').parse().unwrap_or(0);
            let (peer, shutdown) = sys::unix_peer(ino).map_err(|e| refuse(&format!("sock_diag: {e}")))?;
            if peer != 0 {
                let data =
                    sys::sock_peek(&dup, 4 << 20).map_err(|e| refuse(&format!("cannot copy unread data: {e}")))?;
                return Ok(FileKind::UnixPair { ino: ino as u64, peer: peer as u64, flags, data, shutdown });
            }
            // The peer closed: sock_diag names no peer and the kernel shut both directions down
            // (a socket never connected has no shutdown bits).
            if shutdown == 3 {
                let data =
                    sys::sock_peek(&dup, 4 << 20).map_err(|e| refuse(&format!("cannot copy unread data: {e}")))?;
                return Ok(FileKind::UnixPeerGone { flags, data });
            }
            return Err(refuse("an AF_UNIX stream socket that is not connected is not supported yet"));
        }
        if domain == libc::AF_UNIX {
            let kind = if ty == libc::SOCK_DGRAM { "datagram" } else { "seqpacket" };
            let ino: u32 = link.trim_start_matches("socket:[").trim_end_matches(']').parse().unwrap_or(0);
            let connected = sys::unix_peer(ino).map(|(p, _)| p != 0).unwrap_or(false);
            return Err(refuse(&format!(
                "{}AF_UNIX {kind} sockets are not supported yet",
                if connected { "connected " } else { "" }
            )));
        }
        return Err(refuse(match domain {
            libc::AF_INET | libc::AF_INET6 => {
                "real network sockets cannot be moved (use the dvk shim's virtual sockets)"
            }
            _ => "sockets of this family cannot be moved",
        }));
    }
    Err(refuse("this kind of file is not supported"))
}

/// Describes every fd (also the preflight: nothing in the process is changed). The fds in
/// `external` are recorded as [`FileKind::External`], not inspected. Refuses with the first fd
/// that cannot be moved ([`blockers`] lists them all).
pub fn collect(pid: Pid, external: &[i32]) -> Result<FilesState> {
    collect_with(pid, external, &[])
}

/// [`collect`], `allies` being processes dumped with this one (the other members of its tree):
/// a FIFO or a locked description it shares with them is not refused for that.
pub fn collect_with(pid: Pid, external: &[i32], allies: &[Pid]) -> Result<FilesState> {
    let (st, errs) = collect_impl(pid, external, allies, false)?;
    match errs.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(st),
    }
}

/// Every fd that [`collect`] would refuse (one error per fd; an fd refused for its lock and for
/// another reason too gives two), naming the processes at the other end of pipes and
/// sockets. `Err` only when the process cannot be read at all.
pub fn blockers(pid: Pid, external: &[i32]) -> Result<Vec<Error>> {
    blockers_with(pid, external, &[])
}

/// [`blockers`] with `allies` (see [`collect_with`]).
pub fn blockers_with(pid: Pid, external: &[i32], allies: &[Pid]) -> Result<Vec<Error>> {
    collect_impl(pid, external, allies, true).map(|(_, errs)| errs)
}

/// A refusal whose message names the processes holding the other end (found in one /proc
/// scan, after every fd was looked at).
enum Tie {
    /// One end of a pipe whose other end is outside.
    Pipe { write_end: bool },
    /// A socket pair end whose peer is outside.
    Pair,
    /// Any other refused AF_UNIX socket with a peer.
    Peer,
}

fn collect_impl(pid: Pid, external: &[i32], allies: &[Pid], all: bool) -> Result<(FilesState, Vec<Error>)> {
    let pidfd = sys::pidfd_open(pid).map_err(|source| Error::NoProcess { pid, err: source })?;
    let mut st = FilesState::default();
    let mut errs: Vec<Error> = Vec::new();
    // (index in errs, link of the other end, how to phrase it)
    let mut ties: Vec<(usize, String, Tie)> = Vec::new();
    let mut links: Vec<(i32, String)> = Vec::new();
    // Links of refused fds: their pipes and pairs are not judged again.
    let mut refused: HashSet<String> = HashSet::new();
    for fd in list_fds(pid)? {
        if !all && !errs.is_empty() {
            break;
        }
        // An fd closed since the listing (only possible in the preflight, on a running
        // process) is simply not there.
        let Ok(link) = std::fs::read_link(proc_path(pid, &format!("fd/{fd}"))) else {
            continue;
        };
        let link = link.to_string_lossy().into_owned();
        let info = std::fs::read_to_string(proc_path(pid, &format!("fdinfo/{fd}"))).unwrap_or_default();
        let cloexec = octal(field(&info, "flags")) & libc::O_CLOEXEC as u32 != 0;
        // File locks are carried (see `locks`), but for leases and locks that belong to a
        // description another process shares.
        let lock = if external.contains(&fd) { None } else { crate::locks::blocker(pid, fd, &link, &info, allies) };
        if let Some(why) = lock {
            errs.push(Error::UnsupportedFd { fd, what: link.clone(), why });
            refused.insert(link.clone());
            if !all {
                break;
            }
        }
        // Same open file description as an earlier fd?
        let same = links
            .iter()
            .filter(|(_, l)| *l == link)
            .find(|(f, _)| sys::kcmp_file(pid, *f, fd).unwrap_or(false))
            .map(|(f, _)| st.fds.iter().find(|e| e.fd == *f).unwrap().file);
        let file = match same {
            Some(i) => i,
            None if external.contains(&fd) => {
                let flags = octal(field(&info, "flags"));
                st.files.push(FileKind::External { fd, what: link.clone(), flags });
                st.files.len() - 1
            }
            None => {
                match describe(pid, fd, &pidfd) {
                    Ok(k) => st.files.push(k),
                    Err(Error::NoProcess { err, .. })
                        if err.kind() == std::io::ErrorKind::NotFound && crate::proc::proc_path(pid, "").exists() =>
                    {
                        continue
                    }
                    Err(e) => {
                        if let Some(peer) = unix_peer_link(&link, &e) {
                            ties.push((errs.len(), peer, Tie::Peer));
                        }
                        errs.push(e);
                        refused.insert(link);
                        continue;
                    }
                }
                st.files.len() - 1
            }
        };
        links.push((fd, link));
        st.fds.push(FdEntry { fd, cloexec, file });
    }
    if all || errs.is_empty() {
        // Socket pairs need both ends inside the process.
        for (i, f) in st.files.iter().enumerate() {
            if let FileKind::UnixPair { ino, peer, .. } = f {
                let inside = st.files.iter().any(|g| matches!(g, FileKind::UnixPair { ino: p, .. } if p == peer))
                    || refused.contains(&format!("socket:[{peer}]"));
                if inside {
                    continue;
                }
                for e in st.fds.iter().filter(|e| e.file == i) {
                    ties.push((errs.len(), format!("socket:[{peer}]"), Tie::Pair));
                    errs.push(Error::UnsupportedFd {
                        fd: e.fd,
                        what: format!("socket:[{ino}], AF_UNIX"),
                        why: format!(
                            "connected to socket:[{peer}] outside the process (AF_UNIX sockets are carried only with \
                             both ends in the process)"
                        ),
                    });
                    if !all {
                        break;
                    }
                }
                if !all {
                    break;
                }
            }
        }
    }
    if all || errs.is_empty() {
        // Pipes need both ends inside the process: a description that can read and one that
        // can write. Several descriptions of one end (reopened through /proc/PID/fd) are
        // carried when no other process holds the pipe.
        // Per pipe: (descriptions that can read, that can write, descriptions).
        let mut ends: HashMap<u64, (usize, usize, usize)> = HashMap::new();
        for f in &st.files {
            if let FileKind::Pipe { ino, flags, .. } = f {
                let e = ends.entry(*ino).or_default();
                let acc = flags & libc::O_ACCMODE as u32;
                e.0 += usize::from(acc != libc::O_WRONLY as u32);
                e.1 += usize::from(acc != libc::O_RDONLY as u32);
                e.2 += 1;
            }
        }
        let mut ends: Vec<(u64, (usize, usize, usize))> = ends.into_iter().collect();
        ends.sort_unstable();
        // Pipes reopened through /proc: held by another process too?
        let reopened: Vec<String> = ends
            .iter()
            .filter(|(_, (r, w, n))| *r > 0 && *w > 0 && !(*r == 1 && *w == 1 && *n == 2))
            .map(|(ino, _)| format!("pipe:[{ino}]"))
            .filter(|l| !refused.contains(l))
            .collect();
        let shared = holders_of(&reopened, pid);
        'pipes: for (ino, (r, w, _)) in ends {
            let link = format!("pipe:[{ino}]");
            let outside = r == 0 || w == 0;
            let held = shared.get(&link).filter(|h| !h.is_empty());
            if (!outside && held.is_none()) || refused.contains(&link) {
                continue;
            }
            for e in &st.fds {
                let FileKind::Pipe { ino: i, write_end, .. } = st.files[e.file] else { continue };
                if i != ino {
                    continue;
                }
                if outside {
                    ties.push((errs.len(), link.clone(), Tie::Pipe { write_end }));
                }
                errs.push(Error::UnsupportedFd {
                    fd: e.fd,
                    what: link.clone(),
                    why: match held {
                        Some(h) if !outside => format!(
                            "the pipe was reopened through /proc (several descriptions) and is also open in {} \
                             (carried only when every description is in the process)",
                            name_holders(h)
                        ),
                        _ => "the other end of the pipe is outside the process (pipes are carried only with both \
                              ends inside)"
                            .into(),
                    },
                });
                if !all {
                    break 'pipes;
                }
            }
        }
    }
    if all || errs.is_empty() {
        resolve_epoll_targets(pid, &mut st, &mut errs);
    }
    if all || errs.is_empty() {
        crate::ttys::check_pairs(pid, &st, &mut errs, all);
    }
    if all || errs.is_empty() {
        // A FIFO that another process holds too shares its pipe with it: not carried.
        let fifos: Vec<String> = st
            .files
            .iter()
            .filter_map(|f| if let FileKind::Fifo { path, .. } = f { Some(path.clone()) } else { None })
            .collect();
        if !fifos.is_empty() {
            let mut holders = holders_of(&fifos, pid);
            for h in holders.values_mut() {
                h.retain(|(p, _)| !allies.contains(p));
            }
            for e in &st.fds {
                let FileKind::Fifo { path, .. } = &st.files[e.file] else { continue };
                if let Some(h) = holders.get(path).filter(|h| !h.is_empty()) {
                    errs.push(Error::UnsupportedFd {
                        fd: e.fd,
                        what: path.clone(),
                        why: format!(
                            "the FIFO is also open in {} (FIFOs are carried only when no other process holds them)",
                            name_holders(h)
                        ),
                    });
                    if !all {
                        break;
                    }
                }
            }
        }
    }
    if all || errs.is_empty() {
        // A deleted FIFO is made again per image: one another process holds too (a member of
        // the same tree as well) would become two.
        let links: Vec<String> = st
            .files
            .iter()
            .filter_map(
                |f| if let FileKind::GhostFifo { path, .. } = f { Some(format!("{path} (deleted)")) } else { None },
            )
            .collect();
        let holders = if links.is_empty() { HashMap::new() } else { holders_of(&links, pid) };
        for e in &st.fds {
            let FileKind::GhostFifo { path, .. } = &st.files[e.file] else { continue };
            if let Some(h) = holders.get(&format!("{path} (deleted)")).filter(|h| !h.is_empty()) {
                errs.push(Error::UnsupportedFd {
                    fd: e.fd,
                    what: format!("{path} (deleted)"),
                    why: format!(
                        "the deleted FIFO is also open in {} (carried only when no other process holds it)",
                        name_holders(h)
                    ),
                });
                if !all {
                    break;
                }
            }
        }
    }
    name_other_ends(pid, &mut errs, ties);
    errs.sort_by_key(|e| if let Error::UnsupportedFd { fd, .. } = e { *fd } else { -1 });
    Ok((st, errs))
}
/// A path under the process's own /proc/PID becomes the same under /proc/self (the restore opens
/// it from inside the new process, whatever its pid), /proc/PID/task/PID under /proc/thread-self;
/// another process's /proc files, or another thread's, cannot follow.
fn own_proc_path(pid: Pid, path: &str) -> std::result::Result<String, String> {
    let Some(rest) = path.strip_prefix("/proc/") else { return Ok(path.to_string()) };
    let (first, tail) = rest.split_once('/').map_or((rest, ""), |(a, b)| (a, b));
    if first.parse::<Pid>().is_err() {
        return Ok(path.to_string()); // /proc/sys/…, /proc/meminfo: the same on every machine
    }
    if first != pid.to_string() {
        return Err(format!("a file of another process (/proc/{first}) cannot follow the process"));
    }
    let join = |base: &str, t: &str| if t.is_empty() { base.to_string() } else { format!("{base}/{t}") };
    if let Some(t) = tail.strip_prefix("task/") {
        let (tid, tt) = t.split_once('/').map_or((t, ""), |(a, b)| (a, b));
        if tid == first {
            return Ok(join("/proc/thread-self", tt));
        }
        if !tid.is_empty() {
            return Err(format!("a /proc file of thread {tid} cannot follow the process yet"));
        }
    }
    Ok(join("/proc/self", tail))
}

/// Finds the file description behind every epoll registration (`kcmp(KCMP_EPOLL_TFD)` against
/// the process's fds, the fd of the same number first), or refuses the epoll naming the one
/// whose file the process holds no fd of.
fn resolve_epoll_targets(pid: Pid, st: &mut FilesState, errs: &mut Vec<Error>) {
    for i in 0..st.files.len() {
        let FileKind::Epoll { targets, .. } = &st.files[i] else { continue };
        let Some(epfd) = st.fds.iter().find(|e| e.file == i).map(|e| e.fd) else { continue };
        let mut found = Vec::with_capacity(targets.len());
        for (k, &(tfd, ..)) in targets.iter().enumerate() {
            let toff = targets[..k].iter().filter(|t| t.0 == tfd).count() as u32;
            let mut cands: Vec<&FdEntry> = st.fds.iter().filter(|e| e.fd == tfd).collect();
            cands.extend(st.fds.iter().filter(|e| e.fd != tfd));
            match cands.iter().find(|e| sys::kcmp_epoll_tfd(pid, epfd, tfd, toff, e.fd).unwrap_or(false)) {
                Some(e) => found.push(e.file),
                None => {
                    errs.push(Error::UnsupportedFd {
                        fd: epfd,
                        what: "anon_inode:[eventpoll]".into(),
                        why: format!(
                            "it watches a file registered as fd {tfd} that the process holds no fd of (kept open \
                             by something else)"
                        ),
                    });
                    found.push(usize::MAX);
                }
            }
        }
        if let FileKind::Epoll { targets, .. } = &mut st.files[i] {
            for (t, f) in targets.iter_mut().zip(found) {
                t.3 = f;
            }
        }
    }
}

/// The names a user knows fds 0, 1 and 2 by.
pub fn stdio_name(fd: i32) -> Option<&'static str> {
    match fd {
        0 => Some("stdin"),
        1 => Some("stdout"),
        2 => Some("stderr"),
        _ => None,
    }
}

/// A terminal: `/dev/pts/N`, `/dev/ttyX`, `/dev/console`.
pub fn is_tty_path(path: &str) -> bool {
    path.starts_with("/dev/pts/") || path.starts_with("/dev/tty") || path == "/dev/console"
}

/// The inode in a `socket:[N]` / `pipe:[N]` link.
fn link_ino(link: &str, kind: &str) -> Option<u64> {
    link.strip_prefix(kind)?.strip_prefix(":[")?.strip_suffix(']')?.parse().ok()
}

/// `socket:[peer]` of a refused AF_UNIX socket that has a peer.
fn unix_peer_link(link: &str, e: &Error) -> Option<String> {
    let Error::UnsupportedFd { what, .. } = e else { return None };
    if !what.contains("AF_UNIX") {
        return None;
    }
    let ino = link_ino(link, "socket")?;
    let (peer, _) = sys::unix_peer(u32::try_from(ino).ok()?).ok()?;
    (peer != 0).then(|| format!("socket:[{peer}]"))
}

/// "pid 4242 (python3)", "pids 4242 (python3), 4243 (sh)", at most four named.
pub fn name_holders(h: &[(Pid, String)]) -> String {
    let mut s = String::from(if h.len() == 1 { "pid " } else { "pids " });
    for (i, (p, c)) in h.iter().take(4).enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(&format!("{p} ({c})"));
    }
    if h.len() > 4 {
        s.push_str(&format!(" and {} more", h.len() - 4));
    }
    s
}

/// Rewrites the refusals in `ties` to name the processes at the other end.
fn name_other_ends(pid: Pid, errs: &mut [Error], ties: Vec<(usize, String, Tie)>) {
    if ties.is_empty() {
        return;
    }
    let want: Vec<String> = ties.iter().map(|(_, l, _)| l.clone()).collect();
    let found = scan_holders(&want, pid);
    for (i, link, tie) in ties {
        let h = match tie {
            Tie::Pipe { write_end } => other_end(found.get(&link), write_end),
            _ => found.get(&link).into_iter().flatten().map(|(p, c, _)| (*p, c.clone())).collect(),
        };
        if h.is_empty() {
            continue;
        }
        let Some(Error::UnsupportedFd { why, .. }) = errs.get_mut(i) else { continue };
        let who = name_holders(&h);
        *why = match tie {
            Tie::Pipe { write_end } => format!(
                "pipe {} {who}, outside the process (pipes are carried only with both ends inside)",
                if write_end { "to" } else { "from" }
            ),
            Tie::Pair => format!(
                "connected to {who}, outside the process (AF_UNIX sockets are carried only with both ends in the \
                 process)"
            ),
            Tie::Peer => format!("{why} (connected to {who})"),
        };
    }
}

/// At most this many processes are named per file.
const MAX_HOLDERS: usize = 16;

/// A process holding a file: pid, name, and for a pipe which end(s) (bit 0: read, bit 1: write).
type Holder = (Pid, String, u8);

/// One pass over /proc: the processes other than `skip` that hold any of `links`, by link.
/// Bounded (1 s, a million fds); processes whose fds cannot be read are skipped.
fn scan_holders(links: &[String], skip: Pid) -> HashMap<String, Vec<Holder>> {
    let mut out: HashMap<String, Vec<Holder>> = HashMap::new();
    if links.is_empty() {
        return out;
    }
    let want: HashSet<&str> = links.iter().map(String::as_str).collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    let mut budget: usize = 1_000_000;
    let Ok(procs) = std::fs::read_dir("/proc") else { return out };
    let mut pids: Vec<Pid> = procs.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
    pids.sort_unstable();
    'procs: for p in pids {
        if p == skip {
            continue;
        }
        if budget == 0 || std::time::Instant::now() > deadline {
            break;
        }
        let Some(fds) = fd_dir(p) else { continue };
        let mut hit: HashMap<String, u8> = HashMap::new();
        for e in fds {
            budget = budget.saturating_sub(1);
            if budget == 0 {
                break 'procs;
            }
            let Ok(l) = std::fs::read_link(e.path()) else { continue };
            let Some(l) = l.to_str() else { continue };
            if want.contains(l) {
                let mut end = 0;
                if l.starts_with("pipe:") {
                    let info =
                        std::fs::read_to_string(proc_path(p, &format!("fdinfo/{}", e.file_name().to_string_lossy())))
                            .unwrap_or_default();
                    end = if octal(field(&info, "flags")) & libc::O_ACCMODE as u32 == libc::O_WRONLY as u32 {
                        2
                    } else {
                        1
                    };
                }
                *hit.entry(l.to_string()).or_default() |= end;
            }
        }
        if hit.is_empty() {
            continue;
        }
        let comm = std::fs::read_to_string(proc_path(p, "comm")).map(|c| c.trim_end().to_string()).unwrap_or_default();
        for (l, end) in hit {
            let v = out.entry(l).or_default();
            if v.len() < MAX_HOLDERS {
                v.push((p, comm.clone(), end));
            }
        }
    }
    confirm_holders(&mut out);
    out
}

/// The fd entries of another process: `/proc/P/fd`, or a live thread's when P's main thread
/// has exited (the leader's per-process entries are gone, its threads' are not). Each
/// directory is read once.
pub(crate) fn fd_dir(p: Pid) -> Option<Box<dyn Iterator<Item = std::fs::DirEntry>>> {
    let mut own = std::fs::read_dir(proc_path(p, "fd")).ok()?.flatten().peekable();
    if own.peek().is_some() {
        return Some(Box::new(own));
    }
    let tasks = std::fs::read_dir(proc_path(p, "task")).ok()?;
    for t in tasks.flatten() {
        if let Ok(fds) = std::fs::read_dir(t.path().join("fd")) {
            let mut fds = fds.flatten().peekable();
            if fds.peek().is_some() {
                return Some(Box::new(fds));
            }
        }
    }
    Some(Box::new(own))
}

/// Keeps the holders that still hold their file a little later. A process between fork and
/// exec (or the close of inherited fds after fork) holds copies of its parent's fds for a
/// moment: a program spawning helpers — or a test harness starting programs — must not make
/// another process's file look shared.
fn confirm_holders(out: &mut HashMap<String, Vec<Holder>>) {
    for _ in 0..3 {
        if out.is_empty() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        let mut gone = false;
        for (link, holders) in out.iter_mut() {
            holders.retain(|(p, _, _)| {
                let still = fd_dir(*p).is_some_and(|mut fds| {
                    fds.any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_str() == Some(link.as_str())))
                });
                gone |= !still;
                still
            });
        }
        out.retain(|_, v| !v.is_empty());
        if !gone {
            return;
        }
    }
}

/// The processes other than `skip` that hold any of `links` (as /proc/PID/fd shows them:
/// `pipe:[N]`, `socket:[N]`), by link, each with its name. One pass over /proc, bounded (1 s,
/// a million fds); processes whose fds cannot be read are skipped.
pub fn holders_of(links: &[String], skip: Pid) -> HashMap<String, Vec<(Pid, String)>> {
    scan_holders(links, skip).into_iter().map(|(l, v)| (l, v.into_iter().map(|(p, c, _)| (p, c)).collect())).collect()
}

fn other_end_any(h: Option<&Vec<Holder>>) -> Vec<(Pid, String)> {
    h.into_iter().flatten().map(|(p, c, _)| (*p, c.clone())).collect()
}

/// The holders of the other end of a pipe than `write_end`.
fn other_end(h: Option<&Vec<Holder>>, write_end: bool) -> Vec<(Pid, String)> {
    let want = if write_end { 1 } else { 2 };
    h.into_iter().flatten().filter(|(_, _, e)| e & want != 0).map(|(p, c, _)| (*p, c.clone())).collect()
}

/// What one fd of a process is, as the user and the dvk agent see it (see [`describe_fds`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FdDescription {
    pub fd: i32,
    /// The /proc/PID/fd link text.
    pub link: String,
    pub class: FdClass,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FdClass {
    /// A terminal (`/dev/pts/N`, `/dev/ttyX`, `/dev/console`).
    Tty { path: String },
    /// One end of a pipe; `other_holders` are the other processes that hold its other end.
    Pipe { ino: u64, write_end: bool, other_holders: Vec<(Pid, String)> },
    /// An AF_UNIX socket. `path` is its bound name (an accepted socket shows its listener's; the
    /// raw bytes, possibly relative), `peer_path` its peer's, `peer_holders` the processes
    /// other than this one that hold the peer.
    UnixSocket {
        ino: u64,
        peer_ino: Option<u64>,
        listening: bool,
        path: Option<Vec<u8>>,
        peer_path: Option<Vec<u8>>,
        peer_holders: Vec<(Pid, String)>,
    },
    /// AF_INET or AF_INET6.
    InetSocket,
    /// A path (regular file, directory, device, FIFO); `exists`: the path still names this file.
    File { path: String, exists: bool },
    /// Anything else (anon inodes, other socket families).
    Other,
}

impl FdDescription {
    pub fn stdio_name(&self) -> Option<&'static str> {
        stdio_name(self.fd)
    }

    /// Why this fd ties the process to something that stays behind when it moves (a terminal,
    /// a pipe or socket whose other end is not among `all`, the process's own fds), or None.
    pub fn outside_tie(&self, all: &[FdDescription]) -> Option<String> {
        match &self.class {
            FdClass::Tty { path } => Some(format!("terminal {path}")),
            FdClass::Pipe { ino, write_end, other_holders } => {
                let other_inside = all.iter().any(
                    |d| matches!(&d.class, FdClass::Pipe { ino: i, write_end: w, .. } if i == ino && w != write_end),
                );
                if other_inside {
                    return None;
                }
                let dir = if *write_end { "to" } else { "from" };
                Some(if other_holders.is_empty() {
                    format!("pipe {dir} outside the process (other end closed or not visible)")
                } else {
                    format!("pipe {dir} {}", name_holders(other_holders))
                })
            }
            FdClass::UnixSocket { peer_ino: Some(peer), peer_holders, peer_path, .. } => {
                let inside = all.iter().any(|d| matches!(&d.class, FdClass::UnixSocket { ino, .. } if ino == peer));
                if inside {
                    return None;
                }
                Some(match (peer_holders.is_empty(), peer_path) {
                    (false, _) => format!("AF_UNIX socket connected to {}", name_holders(peer_holders)),
                    (true, Some(p)) => format!("AF_UNIX socket connected to {}", String::from_utf8_lossy(p)),
                    (true, None) => format!("AF_UNIX socket connected to socket:[{peer}]"),
                })
            }
            FdClass::InetSocket => Some(format!("network socket {}", self.link)),
            _ => None,
        }
    }
}

impl std::fmt::Display for FdDescription {
    /// One line: "fd 1 (stdout): pipe to pid 4242 (python3)".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fd {}", self.fd)?;
        if let Some(n) = self.stdio_name() {
            write!(f, " ({n})")?;
        }
        match &self.class {
            FdClass::Tty { path } => write!(f, ": terminal {path}"),
            FdClass::Pipe { write_end, other_holders, .. } if !other_holders.is_empty() => {
                write!(f, ": pipe {} {}", if *write_end { "to" } else { "from" }, name_holders(other_holders))
            }
            FdClass::Pipe { write_end, .. } => {
                write!(f, ": {} ({} end)", self.link, if *write_end { "write" } else { "read" })
            }
            FdClass::UnixSocket { listening: true, path, .. } => match path {
                Some(p) => write!(f, ": AF_UNIX listener {}", String::from_utf8_lossy(p)),
                None => write!(f, ": AF_UNIX listener {}", self.link),
            },
            FdClass::UnixSocket { peer_holders, .. } if !peer_holders.is_empty() => {
                write!(f, ": AF_UNIX socket connected to {}", name_holders(peer_holders))
            }
            FdClass::UnixSocket { peer_path: Some(p), .. } => {
                write!(f, ": AF_UNIX socket connected to {}", String::from_utf8_lossy(p))
            }
            FdClass::UnixSocket { peer_ino: Some(p), .. } => {
                write!(f, ": AF_UNIX socket connected to socket:[{p}]")
            }
            FdClass::UnixSocket { .. } => write!(f, ": AF_UNIX socket {} (not connected)", self.link),
            FdClass::InetSocket => write!(f, ": network socket {}", self.link),
            FdClass::File { path, exists: true } => write!(f, ": {path}"),
            FdClass::File { path, exists: false } => write!(f, ": {path} (deleted or replaced)"),
            FdClass::Other => write!(f, ": {}", self.link),
        }
    }
}

/// A path-bound AF_UNIX name (not abstract, not empty).
fn bound_path(name: Option<Vec<u8>>) -> Option<Vec<u8>> {
    name.filter(|n| !n.is_empty() && n[0] != 0).map(|n| n.into_iter().take_while(|&c| c != 0).collect())
}

/// Classifies every fd of `pid` without changing anything in it (from /proc, sock_diag and a
/// `pidfd_getfd` copy of each socket). Pipe ends and socket peers are looked up in every other
/// process's fds (one bounded /proc scan).
pub fn describe_fds(pid: Pid) -> Result<Vec<FdDescription>> {
    use std::os::unix::fs::MetadataExt;
    let _through = crate::proc::ReadThrough::if_leader_exited(pid)?; // pthread_exit in main
    let pidfd = sys::pidfd_open(pid).map_err(|source| Error::NoProcess { pid, err: source })?;
    let mut out = Vec::new();
    for fd in list_fds(pid)? {
        let Ok(link) = std::fs::read_link(proc_path(pid, &format!("fd/{fd}"))) else {
            continue;
        };
        let link = link.to_string_lossy().into_owned();
        let class = if link.starts_with('/') {
            let path = link.strip_suffix(" (deleted)").unwrap_or(&link).to_string();
            if is_tty_path(&path) && !crate::ttys::slave_of_own_pair(pid, &link) {
                FdClass::Tty { path }
            } else {
                let own = std::fs::metadata(proc_path(pid, &format!("fd/{fd}"))).ok();
                let now = std::fs::metadata(&path).ok();
                let exists = !link.ends_with(" (deleted)")
                    && matches!((own, now), (Some(a), Some(b)) if (a.dev(), a.ino()) == (b.dev(), b.ino()));
                FdClass::File { path, exists }
            }
        } else if let Some(ino) = link_ino(&link, "pipe") {
            let info = std::fs::read_to_string(proc_path(pid, &format!("fdinfo/{fd}"))).unwrap_or_default();
            let write_end = octal(field(&info, "flags")) & libc::O_ACCMODE as u32 == libc::O_WRONLY as u32;
            FdClass::Pipe { ino, write_end, other_holders: Vec::new() }
        } else if let Some(ino) = link_ino(&link, "socket") {
            describe_socket(&pidfd, fd, ino)
        } else {
            FdClass::Other
        };
        out.push(FdDescription { fd, link, class });
    }
    // Who holds the other ends.
    let mut want: Vec<String> = Vec::new();
    for d in &out {
        match &d.class {
            FdClass::Pipe { .. } => want.push(d.link.clone()),
            FdClass::UnixSocket { peer_ino: Some(p), .. } => want.push(format!("socket:[{p}]")),
            _ => {}
        }
    }
    want.sort();
    want.dedup();
    let found = scan_holders(&want, pid);
    for d in &mut out {
        match &mut d.class {
            FdClass::Pipe { other_holders, write_end, .. } => {
                *other_holders = other_end(found.get(&d.link), *write_end)
            }
            FdClass::UnixSocket { peer_ino: Some(p), peer_holders, .. } => {
                *peer_holders = other_end_any(found.get(&format!("socket:[{p}]")))
            }
            _ => {}
        }
    }
    Ok(out)
}

fn describe_socket(pidfd: &std::os::fd::OwnedFd, fd: i32, ino: u64) -> FdClass {
    let diag = u32::try_from(ino).ok().and_then(|i| sys::unix_diag(i).ok());
    let unix = |listening: Option<bool>, path: Option<Vec<u8>>| {
        let d = diag.clone().unwrap_or_default();
        let peer_ino = (d.peer != 0).then_some(d.peer as u64);
        let peer_path = peer_ino.and_then(|p| sys::unix_diag(p as u32).ok()).and_then(|pd| bound_path(pd.name));
        FdClass::UnixSocket {
            ino,
            peer_ino,
            listening: listening.unwrap_or(d.state == 10 /* TCP_LISTEN */),
            path: path.or_else(|| bound_path(d.name.clone())),
            peer_path,
            peer_holders: Vec::new(),
        }
    };
    let Ok(dup) = sys::pidfd_getfd(pidfd, fd) else {
        // No copy (permissions): sock_diag still knows AF_UNIX sockets by inode.
        return if diag.is_some() { unix(None, None) } else { FdClass::Other };
    };
    match sys::getsockopt_int(&dup, libc::SOL_SOCKET, libc::SO_DOMAIN).unwrap_or(-1) {
        libc::AF_UNIX => {
            let listening = sys::getsockopt_int(&dup, libc::SOL_SOCKET, libc::SO_ACCEPTCONN).ok().map(|v| v != 0);
            unix(listening, sys::unix_sock_path(&dup).ok().flatten())
        }
        libc::AF_INET | libc::AF_INET6 => FdClass::InetSocket,
        _ => FdClass::Other,
    }
}

const KEEP_FLAGS: u32 = !((libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY | libc::O_CLOEXEC) as u32);

/// Gives a FIFO just made (held read-write at `h` in the new process) its pipe size and its
/// unread bytes, once.
fn fill_fifo(r: &Remote, h: u64, size: u64, data: &[u8], what: &str) -> Result<()> {
    if size != 0 && size != 65536 {
        r.call("fcntl(F_SETPIPE_SZ)", libc::SYS_fcntl, &[h, libc::F_SETPIPE_SZ as u64, size])?;
    }
    for chunk in data.chunks(r.scratch_len / 2) {
        let a = r.put(0, chunk)?;
        let n = r.call("write (FIFO data)", libc::SYS_write, &[h, a, chunk.len() as u64])?;
        if n != chunk.len() as u64 {
            return Err(Error::Restore(format!("{what}: short write of unread data")));
        }
    }
    Ok(())
}

/// Rebuild side (every fd of the stub was closed before). `external` maps the image's external
/// fds to fds of this (the restoring) process, pulled into the new one with `pidfd_getfd`.
pub fn restore(r: &Remote, st: &FilesState, external: &[(i32, i32)], memfds: &HashMap<u64, u64>) -> Result<()> {
    let top = st.fds.iter().map(|e| e.fd).max().unwrap_or(-1);
    let temp_base = (top + 1).max(3) as u64;
    let mut temps: Vec<Option<u64>> = vec![None; st.files.len()];
    let mut helper_used: HashSet<u64> = HashSet::new();
    let mut fifo_holders: HashMap<u64, u64> = HashMap::new();
    // Deleted directories made again: inode → index of the first description of each.
    let mut ghost_dirs: HashMap<u64, usize> = HashMap::new();
    let to_temp = |fd: u64| -> Result<u64> {
        let t = r.call("fcntl(F_DUPFD_CLOEXEC)", libc::SYS_fcntl, &[fd, libc::F_DUPFD_CLOEXEC as u64, temp_base])?;
        r.call("close", libc::SYS_close, &[fd])?;
        Ok(t)
    };
    let setfl = |fd: u64, flags: u32| -> Result<()> {
        r.call("fcntl(F_SETFL)", libc::SYS_fcntl, &[fd, libc::F_SETFL as u64, (flags & KEEP_FLAGS) as u64]).map(drop)
    };
    for (i, f) in st.files.iter().enumerate() {
        if temps[i].is_some() {
            continue;
        }
        let fd = match f {
            FileKind::Fifo { path, ino, flags, data, size } => {
                let p = r.put_cstr(0, path.as_bytes())?;
                if !fifo_holders.contains_key(ino) {
                    // A read-write opener held until every fd exists: the pipe lives on, its
                    // data goes in once, write-only opens find a reader.
                    let fl = (libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) as u64;
                    let h =
                        r.call(&format!("open FIFO {path}"), libc::SYS_openat, &[libc::AT_FDCWD as u64, p, fl, 0])?;
                    let h = to_temp(h)?;
                    fifo_holders.insert(*ino, h);
                    // Unless the pipe is still alive with data (a copy restored beside its original).
                    let q = r.put(0, &[0u8; 4])?;
                    r.call("ioctl(FIONREAD)", libc::SYS_ioctl, &[h, libc::FIONREAD, q])?;
                    if u32::from_le_bytes(r.get(0, 4)?.try_into().unwrap()) == 0 {
                        fill_fifo(r, h, *size, data, &format!("FIFO {path}"))?;
                    }
                }
                let p = r.put_cstr(0, path.as_bytes())?;
                let fl = (flags & KEEP_FLAGS) | libc::O_NONBLOCK as u32; // never wait for a peer
                let fd =
                    r.call(&format!("open {path}"), libc::SYS_openat, &[libc::AT_FDCWD as u64, p, fl as u64, 0])?;
                setfl(fd, *flags)?;
                fd
            }
            FileKind::GhostFifo { path, ino, flags, data, size, mode, uid, gid } => {
                // Made again once, held read-write (the pipe lives on, its data goes in once)
                // and unlinked (see `ghosts`); each description opened through the holder.
                let h = match fifo_holders.get(&crate::ghosts::key(*ino)) {
                    Some(&h) => h,
                    None => {
                        let h = to_temp(crate::ghosts::make_fifo(r, path, *ino, *mode, *uid, *gid)?)?;
                        fifo_holders.insert(crate::ghosts::key(*ino), h);
                        fill_fifo(r, h, *size, data, &format!("deleted FIFO {path}"))?;
                        h
                    }
                };
                let p = r.put_cstr(0, format!("/proc/self/fd/{h}").as_bytes())?;
                let fl = (flags & KEEP_FLAGS) | (libc::O_NONBLOCK | libc::O_CLOEXEC) as u32; // never wait for a peer
                let fd = r.call(
                    &format!("open deleted FIFO {path}"),
                    libc::SYS_openat,
                    &[libc::AT_FDCWD as u64, p, fl as u64, 0],
                )?;
                setfl(fd, *flags)?;
                fd
            }
            FileKind::Path { path, kind, flags, pos } => {
                let p = r.put_cstr(0, path.as_bytes())?;
                let fl = flags & KEEP_FLAGS;
                let fd =
                    r.call(&format!("open {path}"), libc::SYS_openat, &[libc::AT_FDCWD as u64, p, fl as u64, 0])?;
                if matches!(kind, PathKind::Regular | PathKind::Dir) && *pos != 0 {
                    r.call(&format!("lseek {path}"), libc::SYS_lseek, &[fd, *pos, libc::SEEK_SET as u64])?;
                }
                fd
            }
            FileKind::Pipe { ino, .. } => {
                // Create the pipe once, for every description: the first read-only and the
                // first write-only description are its two ends, any other (the process had
                // reopened the pipe through /proc) a new description of it, opened the same way.
                let p = r.put(0, &[0u8; 8])?;
                r.call("pipe2", libc::SYS_pipe2, &[p, libc::O_CLOEXEC as u64])?;
                let b = r.get(0, 8)?;
                let (rfd, wfd) = (
                    u32::from_le_bytes(b[0..4].try_into().unwrap()) as u64,
                    u32::from_le_bytes(b[4..8].try_into().unwrap()) as u64,
                );
                // The unread bytes once (every readable description carries the same copy).
                let first = st.files.iter().find_map(|g| match g {
                    FileKind::Pipe { ino: i2, write_end: false, data, size, .. } if i2 == ino => Some((data, *size)),
                    _ => None,
                });
                if let Some((data, size)) = first {
                    if size != 0 && size != 65536 {
                        r.call("fcntl(F_SETPIPE_SZ)", libc::SYS_fcntl, &[wfd, libc::F_SETPIPE_SZ as u64, size])?;
                    }
                    for chunk in data.chunks(r.scratch_len / 2) {
                        let a = r.put(0, chunk)?;
                        let n = r.call("write (pipe data)", libc::SYS_write, &[wfd, a, chunk.len() as u64])?;
                        if n != chunk.len() as u64 {
                            return Err(Error::Restore(format!("pipe:[{ino}]: short write of unread data")));
                        }
                    }
                }
                let (mut r_used, mut w_used) = (false, false);
                // Moved above the image's fds once every description exists (`rfd` is reopened
                // at its number until then).
                let mut made: Vec<(usize, u64)> = Vec::new();
                for (j, g) in st.files.iter().enumerate() {
                    let FileKind::Pipe { ino: i2, flags, .. } = g else { continue };
                    if i2 != ino {
                        continue;
                    }
                    let acc = flags & libc::O_ACCMODE as u32;
                    let end = if acc == libc::O_RDONLY as u32 && !r_used {
                        r_used = true;
                        rfd
                    } else if acc == libc::O_WRONLY as u32 && !w_used {
                        w_used = true;
                        wfd
                    } else {
                        // Both ends are open: never waits, never ENXIO.
                        let a = r.put_cstr(0, format!("/proc/self/fd/{rfd}").as_bytes())?;
                        let fl = (flags & KEEP_FLAGS) | (libc::O_NONBLOCK | libc::O_CLOEXEC) as u32;
                        r.call(
                            &format!("open pipe:[{ino}] again through /proc"),
                            libc::SYS_openat,
                            &[libc::AT_FDCWD as u64, a, fl as u64, 0],
                        )?
                    };
                    setfl(end, *flags)?;
                    made.push((j, end));
                }
                for (j, end) in made {
                    temps[j] = Some(to_temp(end)?);
                }
                // An end no description kept (the process had only reopened descriptions of it).
                for (used, fd) in [(r_used, rfd), (w_used, wfd)] {
                    if !used {
                        r.call("close", libc::SYS_close, &[fd])?;
                    }
                }
                continue;
            }
            FileKind::EventFd { count, flags, semaphore } => {
                let fl = (flags & libc::O_NONBLOCK as u32) as u64 | if *semaphore { 1 } else { 0 };
                let fd = r.call("eventfd2", libc::SYS_eventfd2, &[0, fl | libc::O_CLOEXEC as u64])?;
                if *count != 0 {
                    let a = r.put(0, &count.to_le_bytes())?;
                    r.call("write (eventfd count)", libc::SYS_write, &[fd, a, 8])?;
                }
                fd
            }
            FileKind::TimerFd { clockid, flags, ticks, value_ns, interval_ns } => {
                let fl = (flags & libc::O_NONBLOCK as u32) as u64 | libc::O_CLOEXEC as u64;
                let fd = r.call("timerfd_create", libc::SYS_timerfd_create, &[*clockid as u64, fl])?;
                if *value_ns != 0 || *interval_ns != 0 {
                    // A periodic timer whose expiry was not read yet shows it_value 0 (the kernel
                    // re-arms it on read): arm it to expire at once, it then runs on its interval.
                    let value_ns = (*value_ns).max(1);
                    let mut b = Vec::new();
                    for v in [
                        interval_ns / 1_000_000_000,
                        interval_ns % 1_000_000_000,
                        value_ns / 1_000_000_000,
                        value_ns % 1_000_000_000,
                    ] {
                        b.extend_from_slice(&v.to_le_bytes());
                    }
                    let a = r.put(0, &b)?;
                    r.call("timerfd_settime", libc::SYS_timerfd_settime, &[fd, 0, a, 0])?;
                }
                if *ticks != 0 {
                    let a = r.put(0, &ticks.to_le_bytes())?;
                    r.call("ioctl(TFD_IOC_SET_TICKS)", libc::SYS_ioctl, &[fd, 0x4008_5400, a])?;
                }
                fd
            }
            FileKind::UnixPair { ino, peer, .. } => {
                // Create the pair once, for both ends.
                let (here, there) = stream_pair(r)?;
                let j = st
                    .files
                    .iter()
                    .position(|g| matches!(g, FileKind::UnixPair { ino: x, .. } if x == peer))
                    .ok_or_else(|| Error::Restore(format!("socket:[{ino}]: peer missing")))?;
                // What each end had queued to read is written by the other end.
                for (idx, other) in [(i, there), (j, here)] {
                    if let FileKind::UnixPair { data, .. } = &st.files[idx] {
                        room_for(r, other, data.len())?;
                        for chunk in data.chunks(r.scratch_len / 2) {
                            let a = r.put(0, chunk)?;
                            let n = r.call("write (socket data)", libc::SYS_write, &[other, a, chunk.len() as u64])?;
                            if n != chunk.len() as u64 {
                                return Err(Error::Restore(format!("socket:[{ino}]: short write of unread data")));
                            }
                        }
                    }
                }
                for (idx, fd) in [(i, here), (j, there)] {
                    if let FileKind::UnixPair { flags, shutdown, .. } = &st.files[idx] {
                        // SEND_SHUTDOWN on an end = SHUT_WR there (the kernel mirrors it).
                        if shutdown & 2 != 0 {
                            r.call("shutdown", libc::SYS_shutdown, &[fd, libc::SHUT_WR as u64])?;
                        }
                        setfl(fd, *flags)?;
                        temps[idx] = Some(to_temp(fd)?);
                    }
                }
                continue;
            }
            FileKind::Epoll { .. } => continue,
            FileKind::PtyMaster { .. } | FileKind::PtySlave { .. } => {
                // The pair at once: its master and every slave description.
                let index = match f {
                    FileKind::PtyMaster { index, .. } | FileKind::PtySlave { index, .. } => *index,
                    _ => unreachable!(),
                };
                let Some((mi, mflags, pty)) = st.files.iter().enumerate().find_map(|(j, g)| match g {
                    FileKind::PtyMaster { index: x, flags, pty } if *x == index => Some((j, *flags, pty)),
                    _ => None,
                }) else {
                    return Err(Error::Restore(format!("pty {index}: its master is not in the image")));
                };
                let slaves: Vec<(usize, u32)> = st
                    .files
                    .iter()
                    .enumerate()
                    .filter_map(|(j, g)| match g {
                        FileKind::PtySlave { index: x, flags } if *x == index => Some((j, *flags)),
                        _ => None,
                    })
                    .collect();
                let (m, made) = crate::ttys::restore_pair(r, pty, mflags, &slaves)?;
                for (j, fd) in made {
                    temps[j] = Some(to_temp(fd)?);
                }
                temps[mi] = Some(to_temp(m)?);
                continue;
            }
            FileKind::SignalFd { mask, flags } => crate::anonfds::restore_signalfd(r, *mask, *flags)?,
            FileKind::Inotify { flags, watches } => crate::anonfds::restore_inotify(r, *flags, watches)?,
            FileKind::Pidfd { flags, dead, exit } => crate::anonfds::restore_pidfd(r, *flags, *dead, *exit)?,
            FileKind::GhostDir { path, dir, is_cwd, flags, pos } => {
                let fl = (flags & KEEP_FLAGS) as u64;
                let open = |p: &str| -> Result<u64> {
                    let a = r.put_cstr(0, p.as_bytes())?;
                    r.call(
                        &format!("open deleted directory {path} ({p})"),
                        libc::SYS_openat,
                        &[libc::AT_FDCWD as u64, a, fl, 0],
                    )
                };
                let fd = match ghost_dirs.get(&dir.ino).and_then(|&j| temps[j]) {
                    Some(t) => open(&format!("/proc/self/fd/{t}"))?,
                    None if *is_cwd => open("/proc/self/cwd")?,
                    None => {
                        let used = dir.make(r, path)?;
                        let fd = open(&used)?;
                        crate::ghosts::remove_dir(r, &used)?;
                        fd
                    }
                };
                ghost_dirs.entry(dir.ino).or_insert(i);
                if *pos != 0 {
                    r.call("lseek (deleted directory)", libc::SYS_lseek, &[fd, *pos, libc::SEEK_SET as u64])?;
                }
                fd
            }
            FileKind::Ghost { ino, path, flags, pos } => {
                // A new description of the file created again (see `ghosts`).
                let helper = *memfds
                    .get(&crate::ghosts::key(*ino))
                    .ok_or_else(|| Error::Restore(format!("deleted file {path} was not saved")))?;
                let p = r.put_cstr(0, format!("/proc/self/fd/{helper}").as_bytes())?;
                let fd = r.call(
                    &format!("open deleted file {path}"),
                    libc::SYS_openat,
                    &[libc::AT_FDCWD as u64, p, (flags & KEEP_FLAGS) as u64, 0],
                )?;
                if *pos != 0 {
                    r.call("lseek (deleted file)", libc::SYS_lseek, &[fd, *pos, libc::SEEK_SET as u64])?;
                }
                fd
            }
            FileKind::Memfd { ino, name, flags, pos } => {
                let helper = *memfds.get(ino).ok_or_else(|| Error::Restore(format!("memfd {name} was not saved")))?;
                let rdwr = flags & libc::O_ACCMODE as u32 == libc::O_RDWR as u32;
                let fd = if rdwr && helper_used.insert(*ino) {
                    // memfd_create's own description (see `memfd`): not a writer of the inode.
                    let fd =
                        r.call("fcntl(F_DUPFD_CLOEXEC)", libc::SYS_fcntl, &[helper, libc::F_DUPFD_CLOEXEC as u64, 0])?;
                    setfl(fd, *flags)?;
                    fd
                } else {
                    // A new description of the same memfd, as the original's own re-open of it.
                    let p = r.put_cstr(0, format!("/proc/self/fd/{helper}").as_bytes())?;
                    r.call(
                        &format!("open memfd {name}"),
                        libc::SYS_openat,
                        &[libc::AT_FDCWD as u64, p, (flags & KEEP_FLAGS) as u64, 0],
                    )?
                };
                if *pos != 0 {
                    r.call("lseek (memfd)", libc::SYS_lseek, &[fd, *pos, libc::SEEK_SET as u64])?;
                }
                fd
            }
            FileKind::External { fd, what, flags } => {
                let Some(&(_, local)) = external.iter().find(|(f, _)| f == fd) else {
                    return Err(missing_external(*fd, what));
                };
                let pidfd = r.call("pidfd_open (restorer)", libc::SYS_pidfd_open, &[std::process::id() as u64, 0])?;
                let got = r.call(
                    &format!("pidfd_getfd (replacement of fd {fd})"),
                    libc::SYS_pidfd_getfd,
                    &[pidfd, local as u64, 0],
                );
                r.call("close", libc::SYS_close, &[pidfd])?;
                let got = got?;
                // A replacement opened for appending (a log standing in for a pipe) stays so:
                // the recorded flags of what it replaces would make it overwrite from offset 0.
                let appending = sys::fd_status_flags(local).map(|f| f & libc::O_APPEND as u32).unwrap_or(0);
                setfl(got, *flags | appending)?;
                got
            }
            FileKind::Fanotify { init, event_flags, flags, marks } => {
                crate::fanotify::restore(r, *init, *event_flags, *flags, marks)?
            }
            FileKind::Namespace { kind, flags } => crate::nsfds::restore(r, kind, *flags)?,
            FileKind::ShellTerminal { path, flags, .. } => {
                let fd0 = st.fds.iter().find(|e| e.file == i).map_or(-1, |e| e.fd);
                let Some(&(_, local)) = external.iter().find(|(f, _)| *f == fd0) else {
                    return Err(Error::Restore(format!(
                        "fd {fd0} was the terminal {path} of a shell job: restore it with --shell-job"
                    )));
                };
                crate::ttys::pull_terminal(r, path, local, *flags)?
            }
            FileKind::UnixPeerGone { flags, data } => {
                // The same shape: one end of a pair, its unread bytes written by the other end,
                // which is then closed (the kernel shuts both directions down, as it had).
                let (here, there) = stream_pair(r)?;
                room_for(r, there, data.len())?;
                for chunk in data.chunks(r.scratch_len / 2) {
                    let a = r.put(0, chunk)?;
                    let n = r.call("write (socket data)", libc::SYS_write, &[there, a, chunk.len() as u64])?;
                    if n != chunk.len() as u64 {
                        return Err(Error::Restore("a socket whose peer closed: short write of unread data".into()));
                    }
                }
                r.call("close", libc::SYS_close, &[there])?;
                setfl(here, *flags)?;
                here
            }
            FileKind::UnixListener { path, sock_type, flags } => {
                let fl = (flags & libc::O_NONBLOCK as u32) as u64 | libc::SOCK_CLOEXEC as u64;
                let fd =
                    r.call("socket(AF_UNIX)", libc::SYS_socket, &[libc::AF_UNIX as u64, *sock_type as u64 | fl, 0])?;
                let mut sa = vec![0u8; 110];
                sa[0..2].copy_from_slice(&(libc::AF_UNIX as u16).to_le_bytes());
                sa[2..2 + path.len()].copy_from_slice(path);
                let a = r.put(0, &sa)?;
                let name = String::from_utf8_lossy(path).into_owned();
                r.call(&format!("bind {name}"), libc::SYS_bind, &[fd, a, (2 + path.len() + 1) as u64])?;
                r.call(&format!("listen {name}"), libc::SYS_listen, &[fd, 4096])?;
                fd
            }
        };
        temps[i] = Some(to_temp(fd)?);
    }
    let place = |temps: &[Option<u64>], only_epoll: bool| -> Result<()> {
        for e in &st.fds {
            let is_ep = matches!(st.files[e.file], FileKind::Epoll { .. });
            if is_ep != only_epoll {
                continue;
            }
            let t = temps[e.file].ok_or_else(|| Error::Restore(format!("fd {} has no file", e.fd)))?;
            let fl = if e.cloexec { libc::O_CLOEXEC } else { 0 } as u64;
            r.call(&format!("dup3 to fd {}", e.fd), libc::SYS_dup3, &[t, e.fd as u64, fl])?;
        }
        Ok(())
    };
    place(&temps, false)?;
    for (i, f) in st.files.iter().enumerate() {
        if let FileKind::Epoll { flags, targets } = f {
            let fd = r.call("epoll_create1", libc::SYS_epoll_create1, &[libc::O_CLOEXEC as u64])?;
            for &(tfd, ev, data, file) in targets {
                let mut b = Vec::with_capacity(12);
                b.extend_from_slice(&ev.to_le_bytes());
                b.extend_from_slice(&data.to_le_bytes());
                // The number names another file now (or none): lend it the registered file
                // for the epoll_ctl, then put back what was there.
                let owner = st.fds.iter().find(|e| e.fd == tfd);
                let lend = owner.map(|e| e.file) != Some(file);
                let mut saved = None;
                if lend {
                    let t = temps
                        .get(file)
                        .copied()
                        .flatten()
                        .ok_or_else(|| Error::Restore(format!("epoll target fd {tfd} has no file")))?;
                    if owner.is_some() {
                        saved = Some(r.call(
                            "fcntl(F_DUPFD_CLOEXEC)",
                            libc::SYS_fcntl,
                            &[tfd as u64, libc::F_DUPFD_CLOEXEC as u64, temp_base],
                        )?);
                    }
                    r.call(&format!("dup3 to fd {tfd} (epoll target)"), libc::SYS_dup3, &[t, tfd as u64, 0])?;
                }
                let a = r.put(0, &b)?;
                r.call(
                    &format!("epoll_ctl(ADD, fd {tfd})"),
                    libc::SYS_epoll_ctl,
                    &[fd, libc::EPOLL_CTL_ADD as u64, tfd as u64, a],
                )?;
                if lend {
                    match (saved, owner) {
                        (Some(sv), Some(e)) => {
                            let fl = if e.cloexec { libc::O_CLOEXEC } else { 0 } as u64;
                            r.call(&format!("dup3 to fd {tfd}"), libc::SYS_dup3, &[sv, tfd as u64, fl])?;
                            r.call("close", libc::SYS_close, &[sv])?;
                        }
                        _ => {
                            r.call("close", libc::SYS_close, &[tfd as u64])?;
                        }
                    }
                }
            }
            let _ = flags;
            temps[i] = Some(to_temp(fd)?);
        }
    }
    place(&temps, true)?;
    for t in temps.into_iter().flatten().chain(fifo_holders.into_values()) {
        r.call("close", libc::SYS_close, &[t])?;
    }
    Ok(())
}

fn missing_external(fd: i32, what: &str) -> Error {
    Error::Restore(format!("fd {fd} ({what}) was left to the caller at dump, and no replacement was given"))
}

/// Before a restore: every external fd has a replacement, every path the fds need exists; AF_UNIX
/// listener paths are freed.
pub fn prepare(st: &FilesState, external: &[(i32, i32)]) -> Result<()> {
    for f in &st.files {
        match f {
            FileKind::External { fd, what, .. } if !external.iter().any(|(f, _)| f == fd) => {
                return Err(missing_external(*fd, what));
            }
            FileKind::Path { path, kind, .. } => {
                let md =
                    if *kind == PathKind::Symlink { std::fs::symlink_metadata(path) } else { std::fs::metadata(path) };
                let md =
                    md.map_err(|e| Error::FileChanged { path: path.clone(), detail: format!("cannot open it: {e}") })?;
                if *kind == PathKind::Symlink && !md.file_type().is_symlink() {
                    return Err(Error::FileChanged {
                        path: path.clone(),
                        detail: "it is not a symbolic link any more".into(),
                    });
                }
            }
            FileKind::Fifo { path, .. } => {
                let md = std::fs::metadata(path)
                    .map_err(|e| Error::FileChanged { path: path.clone(), detail: format!("cannot open it: {e}") })?;
                if !md.file_type().is_fifo() {
                    return Err(Error::FileChanged { path: path.clone(), detail: "it is not a FIFO any more".into() });
                }
            }
            FileKind::GhostFifo { path, .. } => {
                crate::ghosts::parent_exists(path)
                    .map_err(|detail| Error::FileChanged { path: path.clone(), detail })?;
            }
            FileKind::UnixListener { path, .. } => {
                let p = std::path::Path::new(std::ffi::OsStr::from_bytes(path));
                if let Ok(md) = std::fs::symlink_metadata(p) {
                    if md.file_type().is_socket() {
                        let _ = std::fs::remove_file(p);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// A connected AF_UNIX stream socket pair in the stub (close-on-exec until placed).
fn stream_pair(r: &Remote) -> Result<(u64, u64)> {
    let p = r.put(0, &[0u8; 8])?;
    r.call(
        "socketpair(AF_UNIX)",
        libc::SYS_socketpair,
        &[libc::AF_UNIX as u64, (libc::SOCK_STREAM | libc::SOCK_CLOEXEC) as u64, 0, p],
    )?;
    let b = r.get(0, 8)?;
    Ok((u32::from_le_bytes(b[0..4].try_into().unwrap()) as u64, u32::from_le_bytes(b[4..8].try_into().unwrap()) as u64))
}

/// Makes the send buffer of AF_UNIX socket `fd` (in the stub, still root) big enough for `len`
/// unread bytes to be queued without a reader: a write beyond it would block the restore.
fn room_for(r: &Remote, fd: u64, len: usize) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    // The kernel doubles the value (bookkeeping overhead); ask for twice the data plus slack.
    let size = (2 * len + (256 << 10)).min(i32::MAX as usize) as i32;
    let a = r.put(0, &size.to_le_bytes())?;
    r.call(
        "setsockopt(SO_SNDBUFFORCE)",
        libc::SYS_setsockopt,
        &[fd, libc::SOL_SOCKET as u64, libc::SO_SNDBUFFORCE as u64, a, 4],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fd tests look at this very process's fd table: one at a time.

    #[test]
    fn own_proc_files_are_named_through_self() {
        assert_eq!(own_proc_path(74, "/proc/74/maps").unwrap(), "/proc/self/maps");
        assert_eq!(own_proc_path(74, "/proc/74").unwrap(), "/proc/self");
        assert_eq!(own_proc_path(74, "/proc/74/task/74/stat").unwrap(), "/proc/thread-self/stat");
        assert_eq!(own_proc_path(74, "/proc/meminfo").unwrap(), "/proc/meminfo");
        assert_eq!(own_proc_path(74, "/tmp/proc/74").unwrap(), "/tmp/proc/74");
        assert!(own_proc_path(74, "/proc/75/maps").unwrap_err().contains("/proc/75"));
        assert!(own_proc_path(74, "/proc/74/task/76/stat").unwrap_err().contains("thread 76"));
    }

    #[test]
    fn parses_fdinfo_fields() {
        assert_eq!(octal(Some("02004002")), 0o2004002);
        assert_eq!(octal(None), 0);
        assert_eq!(pair_ns(Some("(1, 500)")), 1_000_000_500);
        assert_eq!(pair_ns(Some("(0, 100000000)")), 100_000_000);
        assert_eq!(pair_ns(None), 0);
    }

    #[test]
    fn own_fds_are_described() {
        let _g = crate::FORK_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        use std::os::fd::AsRawFd;
        let me = std::process::id() as i32;
        let f = std::fs::File::open("/dev/null").unwrap();
        let k = describe(me, f.as_raw_fd(), &sys::pidfd_open(me).unwrap()).unwrap();
        assert!(matches!(&k, FileKind::Path { path, kind: PathKind::CharDev, .. } if path == "/dev/null"));
        let [r, w] = {
            let mut p = [0; 2];
            // SAFETY: test-only pipe creation into a valid array.
            assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
            p
        };
        // SAFETY: test-only write of 3 bytes from a static buffer.
        assert_eq!(unsafe { libc::write(w, b"abc".as_ptr().cast(), 3) }, 3);
        let k = describe(me, r, &sys::pidfd_open(me).unwrap()).unwrap();
        assert!(matches!(&k, FileKind::Pipe { write_end: false, data, .. } if data == b"abc"));
        // The data was copied, not consumed.
        let mut b = [0u8; 3];
        // SAFETY: test-only read into a local buffer.
        assert_eq!(unsafe { libc::read(r, b.as_mut_ptr().cast(), 3) }, 3);
        // SAFETY: closing the test's own fds.
        unsafe {
            libc::close(r);
            libc::close(w);
        }
    }

    #[test]
    fn external_fds_are_not_inspected() {
        let _g = crate::FORK_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        use std::os::fd::AsRawFd;
        let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let fd = a.as_raw_fd();
        let me = std::process::id() as i32;
        // A connected AF_UNIX datagram socket is refused …
        match describe(me, fd, &sys::pidfd_open(me).unwrap()) {
            Err(Error::UnsupportedFd { fd: f, why, what }) => {
                assert_eq!(f, fd);
                assert!(what.contains("AF_UNIX") && why.contains("connected"), "{what}: {why}");
            }
            other => panic!("a connected AF_UNIX datagram socket must be refused: {other:?}"),
        }
        // … unless left to the caller (every fd of this harness is, so nothing else is judged).
        // (Other tests open and close files concurrently: retry until one pass sees a stable table.)
        let mut last = None;
        let st = (0..200)
            .find_map(|_| {
                // Every number up to past the highest open fd (collect's own pidfd and directory fd
                // take the lowest free numbers).
                let top = list_fds(me).unwrap().into_iter().max().unwrap_or(0);
                let ext: Vec<i32> = (0..top + 16).collect();
                match collect(me, &ext) {
                    Ok(st) => Some(st),
                    Err(e) => {
                        last = Some(e.to_string());
                        None
                    }
                }
            })
            .unwrap_or_else(|| panic!("fd table never stable: {last:?}"));
        let e = st.fds.iter().find(|e| e.fd == fd).unwrap();
        assert!(
            matches!(&st.files[e.file], FileKind::External { fd: f, what, .. } if *f == fd && what.starts_with("socket:["))
        );
    }

    #[test]
    fn names_links_and_holders() {
        assert_eq!(stdio_name(0), Some("stdin"));
        assert_eq!(stdio_name(2), Some("stderr"));
        assert_eq!(stdio_name(3), None);
        assert_eq!(link_ino("pipe:[123]", "pipe"), Some(123));
        assert_eq!(link_ino("socket:[7]", "socket"), Some(7));
        assert_eq!(link_ino("socket:[7]", "pipe"), None);
        assert_eq!(link_ino("/tmp/x", "pipe"), None);
        assert!(is_tty_path("/dev/pts/3") && is_tty_path("/dev/tty1") && !is_tty_path("/dev/null"));
        assert_eq!(name_holders(&[(4242, "python3".into())]), "pid 4242 (python3)");
        assert_eq!(name_holders(&[(1, "a".into()), (2, "b".into())]), "pids 1 (a), 2 (b)");
        let many: Vec<(Pid, String)> = (1..=6).map(|p| (p, "x".to_string())).collect();
        assert_eq!(name_holders(&many), "pids 1 (x), 2 (x), 3 (x), 4 (x) and 2 more");
        assert_eq!(bound_path(Some(b"/run/a.sock".to_vec())), Some(b"/run/a.sock".to_vec()));
        assert_eq!(bound_path(Some(b"\0abstract".to_vec())), None);
        assert_eq!(bound_path(None), None);
    }

    #[test]
    fn refusals_name_stdio() {
        let e = Error::UnsupportedFd { fd: 1, what: "pipe:[9]".into(), why: "pipe to pid 4242 (python3)".into() };
        assert_eq!(e.to_string(), "fd 1 (stdout, pipe:[9]) cannot be moved: pipe to pid 4242 (python3)");
        let e = Error::UnsupportedFd { fd: 3, what: "socket:[9], AF_INET".into(), why: "x".into() };
        assert_eq!(e.to_string(), "fd 3 (socket:[9], AF_INET) cannot be moved: x");
        assert_eq!(e.fd(), Some(3));
    }

    #[test]
    fn fd_descriptions_print_and_judge() {
        let d = |fd, class| FdDescription { fd, link: "pipe:[5]".into(), class };
        let out = d(1, FdClass::Pipe { ino: 5, write_end: true, other_holders: vec![(4242, "python3".into())] });
        assert_eq!(out.to_string(), "fd 1 (stdout): pipe to pid 4242 (python3)");
        assert_eq!(out.outside_tie(std::slice::from_ref(&out)).unwrap(), "pipe to pid 4242 (python3)");
        // Both ends in the process: nothing ties it outside (even if a child holds it too).
        let r = d(3, FdClass::Pipe { ino: 5, write_end: false, other_holders: vec![] });
        assert_eq!(out.outside_tie(&[out.clone(), r.clone()]), None);
        assert_eq!(r.to_string(), "fd 3: pipe:[5] (read end)");
        let tty = FdDescription { fd: 0, link: "/dev/pts/3".into(), class: FdClass::Tty { path: "/dev/pts/3".into() } };
        assert_eq!(tty.to_string(), "fd 0 (stdin): terminal /dev/pts/3");
        assert_eq!(tty.outside_tie(&[]).unwrap(), "terminal /dev/pts/3");
        let sock = |ino, peer: Option<u64>, holders: Vec<(Pid, String)>| FdDescription {
            fd: 4,
            link: format!("socket:[{ino}]"),
            class: FdClass::UnixSocket {
                ino,
                peer_ino: peer,
                listening: false,
                path: None,
                peer_path: Some(b"/run/dvk/agent.sock".to_vec()),
                peer_holders: holders,
            },
        };
        let a = sock(10, Some(11), vec![(7, "dvk-agent".into())]);
        assert_eq!(a.to_string(), "fd 4: AF_UNIX socket connected to pid 7 (dvk-agent)");
        assert_eq!(a.outside_tie(std::slice::from_ref(&a)).unwrap(), "AF_UNIX socket connected to pid 7 (dvk-agent)");
        let b = sock(11, Some(10), vec![]);
        assert_eq!(a.outside_tie(&[a.clone(), b.clone()]), None);
        assert_eq!(b.to_string(), "fd 4: AF_UNIX socket connected to /run/dvk/agent.sock");
        let f = FdDescription {
            fd: 5,
            link: "/tmp/x".into(),
            class: FdClass::File { path: "/tmp/x".into(), exists: true },
        };
        assert_eq!(f.outside_tie(&[]), None);
    }

    /// A child holding the other end of our pipe and of our socket pair is found and named.
    #[test]
    fn describe_fds_finds_the_other_ends() {
        let _g = crate::FORK_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        use std::os::fd::AsRawFd;
        use std::process::{Command, Stdio};
        let me = std::process::id() as i32;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::piped())
            .stdout(std::fs::File::from(std::os::fd::OwnedFd::from(theirs)))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let (wfd, sfd) = (stdin.as_raw_fd(), ours.as_raw_fd());
        let ds = describe_fds(me);
        // The child's view: blockers name us at the other ends, stdin/stdout by their names.
        let cpid = child.id() as i32;
        let t = std::time::Instant::now();
        while std::fs::read_link(proc_path(cpid, "exe")).map(|p| !p.ends_with("sleep")).unwrap_or(true)
            && t.elapsed() < std::time::Duration::from_secs(5)
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // (Only stdio: the child inherits whatever stray fds the test runner left open.)
        let errs = blockers(cpid, &[])
            .map(|v| v.iter().filter(|e| e.fd().is_some_and(|f| f < 3)).map(|e| e.to_string()).collect::<Vec<_>>());
        let _ = child.kill();
        let _ = child.wait();
        let ds = ds.unwrap();
        let w = ds.iter().find(|d| d.fd == wfd).unwrap();
        assert!(
            matches!(&w.class, FdClass::Pipe { write_end: true, other_holders, .. }
                if other_holders.iter().any(|(p, c)| *p == cpid && c == "sleep")),
            "{w:?}"
        );
        let s = ds.iter().find(|d| d.fd == sfd).unwrap();
        assert!(
            matches!(&s.class, FdClass::UnixSocket { peer_ino: Some(_), listening: false, peer_holders, .. }
                if peer_holders.iter().any(|(p, _)| *p == cpid)),
            "{s:?}"
        );
        assert_eq!(s.outside_tie(&ds).unwrap(), format!("AF_UNIX socket connected to pid {cpid} (sleep)"));
        let errs = errs.unwrap();
        let me_named = format!("pid {me} (");
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0].starts_with("fd 0 (stdin, pipe:[") && errs[0].contains(&format!("pipe from {me_named}")),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("fd 1 (stdout, socket:[")
                && errs[1].contains(&format!("connected to {me_named}"))
                && errs[1].contains("both ends"),
            "{errs:?}"
        );
    }
}
