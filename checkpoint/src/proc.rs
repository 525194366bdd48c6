//! Small parsers for the /proc files the engine reads (maps, stat, status, fdinfo).

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::sys::Pid;

#[derive(Clone, Debug)]
pub struct MapLine {
    pub start: u64,
    pub end: u64,
    pub perms: [u8; 4],
    pub offset: u64,
    pub inode: u64,
    pub path: String,
}

impl MapLine {
    pub fn range(&self) -> String {
        format!("{:#x}-{:#x}", self.start, self.end)
    }
    pub fn prot(&self) -> u32 {
        let mut p = 0;
        if self.perms[0] == b'r' {
            p |= libc::PROT_READ;
        }
        if self.perms[1] == b'w' {
            p |= libc::PROT_WRITE;
        }
        if self.perms[2] == b'x' {
            p |= libc::PROT_EXEC;
        }
        p as u32
    }
    pub fn shared(&self) -> bool {
        self.perms[3] == b's'
    }
}

/// `/proc/PID/what` — or, while a [`ReadThrough`] for `pid` lives (its main thread has exited),
/// `/proc/PID/task/TID/what` of a live thread: a thread-group leader that called `pthread_exit`
/// is a zombie whose per-process entries (maps, fd, fdinfo, mem, cwd, exe, ns, …) are gone or
/// empty, while its live threads show the same address space, fd table and namespaces. Its
/// name (`comm`) and the `task` directory stay the leader's own.
pub fn proc_path(pid: Pid, what: &str) -> PathBuf {
    match live_thread(pid) {
        Some(tid) if what != "comm" && what != "task" && !what.starts_with("task/") => {
            PathBuf::from(format!("/proc/{pid}/task/{tid}/{what}"))
        }
        _ => PathBuf::from(format!("/proc/{pid}/{what}")),
    }
}

/// (leader pid, live thread) of the processes being read through a live thread.
static READ_THROUGH: std::sync::Mutex<Vec<(Pid, Pid)>> = std::sync::Mutex::new(Vec::new());

/// The live thread `pid` is read through while its main thread has exited (see [`proc_path`]);
/// `None` for any other process. The syscall wrappers that need a live task (process_vm_readv,
/// pidfd_open) ask it too.
pub fn live_thread(pid: Pid) -> Option<Pid> {
    let v = READ_THROUGH.lock().unwrap_or_else(|e| e.into_inner());
    v.iter().find(|(p, _)| *p == pid).map(|&(_, t)| t)
}

/// While it lives, `pid` (whose main thread has exited) is read through its thread `tid`.
#[derive(Debug)]
pub struct ReadThrough {
    pid: Pid,
    tid: Pid,
}

impl ReadThrough {
    pub fn new(pid: Pid, tid: Pid) -> ReadThrough {
        READ_THROUGH.lock().unwrap_or_else(|e| e.into_inner()).push((pid, tid));
        ReadThrough { pid, tid }
    }

    /// For a process whose main thread has exited ([`exited_leader`]): read through its live
    /// thread with the lowest tid while the result lives. `None` for any other process.
    pub fn if_leader_exited(pid: Pid) -> Result<Option<ReadThrough>> {
        Ok(exited_leader(pid)?.map(|live| ReadThrough::new(pid, live[0])))
    }
}

impl Drop for ReadThrough {
    fn drop(&mut self) {
        let mut v = READ_THROUGH.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = v.iter().rposition(|&e| e == (self.pid, self.tid)) {
            v.remove(i);
        }
    }
}

/// Whether the main thread of `pid` has exited while other threads run on (`pthread_exit` in
/// main: the leader is a zombie, `Threads` counts the live ones); then the live threads, lowest
/// tid first. Read from the leader's own status and task directory, never through a thread.
pub fn exited_leader(pid: Pid) -> Result<Option<Vec<Pid>>> {
    let p = PathBuf::from(format!("/proc/{pid}/status"));
    let status = std::fs::read_to_string(&p).map_err(|source| Error::NoProcess { pid, err: source })?;
    if !field(&status, "State").is_some_and(|s| s.starts_with('Z')) {
        return Ok(None);
    }
    let d = PathBuf::from(format!("/proc/{pid}/task"));
    let mut live: Vec<Pid> = std::fs::read_dir(&d)
        .map_err(|source| Error::NoProcess { pid, err: source })?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&t: &Pid| t != pid)
        .collect();
    live.sort_unstable();
    Ok((!live.is_empty()).then_some(live))
}

pub fn read_string(pid: Pid, what: &str) -> Result<String> {
    let p = proc_path(pid, what);
    std::fs::read_to_string(&p).map_err(|source| Error::NoProcess { pid, err: source })
}

pub fn parse_maps(text: &str) -> Vec<MapLine> {
    let mut out = Vec::new();
    for l in text.lines() {
        let mut it = l.splitn(6, ' ');
        let (Some(range), Some(perms), Some(off), Some(_dev), Some(ino)) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            continue;
        };
        let path = it.next().unwrap_or("").trim_start().to_string();
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let pb = perms.as_bytes();
        if pb.len() < 4 {
            continue;
        }
        out.push(MapLine {
            start: u64::from_str_radix(a, 16).unwrap_or(0),
            end: u64::from_str_radix(b, 16).unwrap_or(0),
            perms: [pb[0], pb[1], pb[2], pb[3]],
            offset: u64::from_str_radix(off, 16).unwrap_or(0),
            inode: ino.parse().unwrap_or(0),
            path,
        });
    }
    out
}

pub fn maps(pid: Pid) -> Result<Vec<MapLine>> {
    Ok(parse_maps(&read_string(pid, "maps")?))
}

/// The `VmFlags` of every VMA in /proc/PID/smaps, by start address: two-letter mnemonics
/// ("rd", "lo", "dc", …; see proc(5)).
pub fn vm_flags(pid: Pid) -> Result<std::collections::HashMap<u64, Vec<String>>> {
    Ok(parse_vm_flags(&read_string(pid, "smaps")?))
}

pub fn parse_vm_flags(text: &str) -> std::collections::HashMap<u64, Vec<String>> {
    let mut out = std::collections::HashMap::new();
    let mut at: Option<u64> = None;
    let mut pkeys: Vec<(u64, String)> = Vec::new();
    for l in text.lines() {
        if let Some(f) = l.strip_prefix("VmFlags:") {
            if let Some(a) = at.take() {
                out.insert(a, f.split_whitespace().map(str::to_string).collect());
            }
            continue;
        }
        // A protection key other than the default shows as a pseudo flag "pkey:N".
        if let Some(k) = l.strip_prefix("ProtectionKey:").map(str::trim).filter(|k| *k != "0") {
            if let Some(a) = at {
                pkeys.push((a, format!("pkey:{k}")));
            }
            continue;
        }
        // A VMA's first line: "start-end perms …" (field lines start with "Name:").
        let first = l.split(' ').next().unwrap_or("");
        if !first.ends_with(':') {
            if let Some((a, _)) = first.split_once('-') {
                at = u64::from_str_radix(a, 16).ok();
            }
        }
    }
    for (a, k) in pkeys {
        out.entry(a).or_insert_with(Vec::new).push(k);
    }
    out
}

/// Fields of /proc/PID/stat, numbered as in proc(5) (1 = pid).
pub fn stat_fields(pid: Pid) -> Result<Vec<String>> {
    let s = read_string(pid, "stat")?;
    let close = s.rfind(')').unwrap_or(0);
    let mut v = vec![String::new(), String::new(), String::new()];
    v.extend(s[close + 1..].split_whitespace().map(str::to_string));
    Ok(v)
}

/// A `Key:\tvalue` line of /proc/PID/status or fdinfo.
pub fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')).map(str::trim))
}

pub fn threads(pid: Pid) -> Result<usize> {
    let d = proc_path(pid, "task");
    Ok(std::fs::read_dir(&d).map_err(|source| Error::NoProcess { pid, err: source })?.count())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn parses_maps_with_spaces_in_paths() {
        let m = parse_maps(
            "55d0c0000000-55d0c0001000 r-xp 00001000 fd:00 1234                       /tmp/a b/c\n\
             7ffd1000-7ffd2000 rw-p 00000000 00:00 0                          [stack]\n\
             7f0000000000-7f0000001000 rw-s 00000000 00:01 77 /dev/zero (deleted)\n",
        );
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].path, "/tmp/a b/c");
        assert_eq!(m[0].offset, 0x1000);
        assert_eq!(m[0].inode, 1234);
        assert_eq!(m[1].path, "[stack]");
        assert!(m[2].shared());
        assert_eq!(m[0].prot(), (libc::PROT_READ | libc::PROT_EXEC) as u32);
    }

    #[test]
    fn a_process_whose_main_thread_exited_is_read_through_a_live_thread() {
        // (Pids no process here has: the registry is global, other tests read real ones.)
        let (pid, tid) = (i32::MAX - 7, i32::MAX - 6);
        assert_eq!(proc_path(pid, "maps"), PathBuf::from(format!("/proc/{pid}/maps")));
        {
            let _t = ReadThrough::new(pid, tid);
            assert_eq!(live_thread(pid), Some(tid));
            assert_eq!(proc_path(pid, "maps"), PathBuf::from(format!("/proc/{pid}/task/{tid}/maps")));
            assert_eq!(proc_path(pid, "fd/3"), PathBuf::from(format!("/proc/{pid}/task/{tid}/fd/3")));
            // The leader's own name and its task directory stay its own.
            assert_eq!(proc_path(pid, "comm"), PathBuf::from(format!("/proc/{pid}/comm")));
            assert_eq!(proc_path(pid, "task"), PathBuf::from(format!("/proc/{pid}/task")));
            assert_eq!(proc_path(pid, &format!("task/{tid}")), PathBuf::from(format!("/proc/{pid}/task/{tid}")));
            assert_eq!(proc_path(pid - 1, "maps"), PathBuf::from(format!("/proc/{}/maps", pid - 1)));
        }
        assert_eq!(live_thread(pid), None);
        assert_eq!(proc_path(pid, "maps"), PathBuf::from(format!("/proc/{pid}/maps")));
    }

    #[test]
    fn a_live_leader_is_not_an_exited_one() {
        let me = std::process::id() as Pid;
        assert_eq!(exited_leader(me).unwrap(), None);
        assert!(ReadThrough::if_leader_exited(me).unwrap().is_none());
    }

    #[test]
    fn parses_vm_flags_of_smaps() {
        let f = parse_vm_flags(
            "7f0000000000-7f0000004000 rw-p 00000000 00:00 0 \n\
             Size:                 16 kB\n\
             VmFlags: rd wr mr mw me lo lf ac \n\
             7f0000010000-7f0000011000 r--s 00000000 fd:00 12 /tmp/a-b c\n\
             Rss:                   0 kB\n\
             VmFlags: rd mr mw me ms sd\n",
        );
        assert_eq!(f[&0x7f0000000000], ["rd", "wr", "mr", "mw", "me", "lo", "lf", "ac"]);
        assert_eq!(f[&0x7f0000010000], ["rd", "mr", "mw", "me", "ms", "sd"]);
    }
}
