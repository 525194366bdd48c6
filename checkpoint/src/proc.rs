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

pub fn proc_path(pid: Pid, what: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{what}"))
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
}
