//! memfd files (`memfd_create`): anonymous files that exist only in memory, reached through
//! fds ("/memfd:NAME (deleted)") and mappings of the same name.
//!
//! Collect: each memfd once (by inode) — its name, size, seals, mode, owner and whole content, read through
//! one of the process's fds (`pidfd_getfd`) or, if only mapped, `/proc/PID/map_files/…` — into
//! `memfd-<inode>.img` (CRC in the manifest). Private mappings' copied-on-write pages travel as
//! page data, like a file's.
//!
//! Rebuild: the restorer creates each memfd with its name, content and seals, the new process
//! pulls it in (`pidfd_getfd`) at a number above the image's fds; mappings use it. The first
//! read-write description of each memfd *is* that one (as `memfd_create`'s own, it does not count
//! as a writer of the inode, so `execveat` of the memfd works; a re-open through /proc would make
//! it fail with ETXTBSY); other descriptions re-open it (`/proc/self/fd/N`, like the original's
//! own re-opens); then the helper fd is closed.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{io_at, Error, Result};
use crate::files::{FileKind, FilesState};
use crate::inject::Remote;
use crate::memory::{MemoryState, VmaKind};
use crate::proc::proc_path;
use crate::sys::{self, Pid};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemfdState {
    pub ino: u64,
    pub name: String,
    pub size: u64,
    pub seals: u32,
    /// Permission bits (`fchmod`) and owner.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub crc: u32,
}

pub fn file_name(ino: u64) -> String {
    format!("memfd-{ino}.img")
}

/// "/memfd:NAME (deleted)" → NAME
pub fn name_of(path: &str) -> Option<&str> {
    path.strip_prefix("/memfd:").map(|r| r.strip_suffix(" (deleted)").unwrap_or(r))
}

/// Saves every memfd the fds and mappings refer to.
pub fn collect(pid: Pid, files: &FilesState, memory: &MemoryState, dir: &Path) -> Result<Vec<MemfdState>> {
    let mut out: Vec<MemfdState> = Vec::new();
    let pidfd = sys::pidfd_open(pid).map_err(|err| Error::NoProcess { pid, err })?;
    // (inode, name, an fd of the process, a mapping of it): where to read each memfd from.
    type Source = (u64, String, Option<i32>, Option<(u64, u64)>);
    let mut want: Vec<Source> = Vec::new();
    for e in &files.fds {
        if let FileKind::Memfd { ino, name, .. } = &files.files[e.file] {
            if !want.iter().any(|w| w.0 == *ino) {
                want.push((*ino, name.clone(), Some(e.fd), None));
            }
        }
    }
    for v in &memory.vmas {
        if let VmaKind::Memfd { ino, name, .. } = &v.kind {
            if !want.iter().any(|w| w.0 == *ino) {
                want.push((*ino, name.clone(), None, Some((v.start, v.end))));
            }
        }
    }
    for (ino, name, fd, range) in want {
        let file: File = match (fd, range) {
            (Some(fd), _) => File::from(sys::pidfd_getfd(&pidfd, fd).map_err(|err| Error::NoProcess { pid, err })?),
            (None, Some((s, e))) => {
                let p = proc_path(pid, &format!("map_files/{s:x}-{e:x}"));
                File::open(&p).map_err(io_at(p))?
            }
            _ => unreachable!(),
        };
        let md = file.metadata().map_err(io_at(format!("memfd {name}")))?;
        if md.ino() != ino {
            return Err(Error::Unsupported { pid, what: format!("memfd {name} (inode changed while reading)") });
        }
        let seals = sys::memfd_seals(&file).unwrap_or(0);
        // Positional reads: the offset the process shares through its fd does not move.
        let mut data = Vec::with_capacity(md.size() as usize);
        let mut buf = vec![0u8; 1 << 20];
        while (data.len() as u64) < md.size() {
            let n = file.read_at(&mut buf, data.len() as u64).map_err(io_at(format!("memfd {name}")))?;
            if n == 0 {
                break;
            }
            data.extend_from_slice(&buf[..n]);
        }
        let path = dir.join(file_name(ino));
        let mut out_f = crate::image::create_file(&path)?;
        out_f.write_all(&data).map_err(io_at(&path))?;
        out.push(MemfdState {
            ino,
            name,
            size: data.len() as u64,
            seals,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            crc: crc32fast::hash(&data),
        });
    }
    Ok(out)
}

/// Reads and checks every saved memfd (before anything is created).
pub fn read_all(dir: &Path, memfds: &[MemfdState]) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for m in memfds {
        let path = dir.join(file_name(m.ino));
        // Never more than the manifest says (a bigger file is refused, not read into memory).
        let d = crate::image::read_image_file(&path, m.size)?;
        if d.len() as u64 != m.size {
            return Err(Error::Truncated { path, what: format!("memfd {}: {} of {} bytes", m.name, d.len(), m.size) });
        }
        if crc32fast::hash(&d) != m.crc {
            return Err(Error::Checksum { path, what: format!("memfd {}", m.name) });
        }
        out.push(d);
    }
    Ok(out)
}

/// Creates the memfds here and pulls them into the new process above fd `above`; returns
/// inode → fd in the new process. A memfd in `existing` (by inode: the object another process of
/// the same tree restored, opened here) is pulled in as it is instead.
pub fn install(
    r: &Remote,
    memfds: &[MemfdState],
    contents: &[Vec<u8>],
    above: u64,
    existing: &HashMap<u64, OwnedFd>,
) -> Result<HashMap<u64, u64>> {
    let mut map = HashMap::new();
    if memfds.is_empty() {
        return Ok(map);
    }
    let pidfd = r.call("pidfd_open (restorer)", libc::SYS_pidfd_open, &[std::process::id() as u64, 0])?;
    for (m, data) in memfds.iter().zip(contents) {
        let made: OwnedFd;
        let local = match existing.get(&m.ino) {
            Some(fd) => fd,
            None => {
                made = sys::memfd_with_seals(&m.name, data, m.seals, (m.mode, m.uid, m.gid))
                    .map_err(|e| Error::Restore(format!("memfd {}: {e}", m.name)))?;
                &made
            }
        };
        let got = r.call(
            &format!("pidfd_getfd (memfd {})", m.name),
            libc::SYS_pidfd_getfd,
            &[pidfd, local.as_raw_fd() as u64, 0],
        )?;
        let high = r.call("fcntl(F_DUPFD_CLOEXEC)", libc::SYS_fcntl, &[got, libc::F_DUPFD_CLOEXEC as u64, above])?;
        r.call("close", libc::SYS_close, &[got])?;
        map.insert(m.ino, high);
    }
    r.call("close", libc::SYS_close, &[pidfd])?;
    Ok(map)
}

pub fn close(r: &Remote, map: &HashMap<u64, u64>) -> Result<()> {
    for fd in map.values() {
        r.call("close (memfd helper)", libc::SYS_close, &[*fd])?;
    }
    Ok(())
}
