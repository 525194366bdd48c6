//! Files deleted while open ("ghost" files, as CRIU calls them): regular files whose last name
//! was removed while the process held an fd or a mapping of them ("/path (deleted)").
//!
//! Collect: each once (by inode), through a new description of it (`/proc/PID/fd/N` or
//! `/proc/PID/map_files/…`, so that the process's own file offset does not move): size, mode,
//! owner and the data extents only (`SEEK_DATA`/`SEEK_HOLE`: holes stay holes), into
//! `ghost-<inode>.img` (CRC in the manifest). Refused naming the file: more than
//! [`GHOST_LIMIT`] bytes of data, a file with other names left (nlink > 0), anything but a
//! regular file.
//!
//! Rebuild (before the memory, like memfds): the new process creates the file again at its path
//! (`O_EXCL`; if the path is taken meanwhile, `.dvk-ghost.<inode>` in the same directory),
//! writes the extents, sets size, owner and mode, and unlinks it at once — so /proc shows it
//! as "/path (deleted)" again. Its helper fd (in the same inode → fd map as the memfds, under
//! [`key`]) backs the mappings and is re-opened through `/proc/self/fd/N` for each description.
//!
//! A FIFO deleted while open ([`FileKind::GhostFifo`], its unread bytes in the manifest) is made
//! again the same way by [`make_fifo`] (`mknod`, held read-write, unlinked at once).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{io_at, Error, Result};
use crate::files::{FileKind, FilesState};
use crate::inject::Remote;
use crate::memory::{MemoryState, VmaKind};
use crate::proc::proc_path;
use crate::sys::{self, Pid};

/// The most data (holes excluded) a deleted file may hold to be carried in the image.
pub const GHOST_LIMIT: u64 = 16 << 20;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GhostState {
    pub ino: u64,
    /// The path it had (without " (deleted)").
    pub path: String,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Data extents (offset in the file, length), stored one after the other in the image file.
    pub extents: Vec<(u64, u64)>,
    pub crc: u32,
}

pub fn file_name(ino: u64) -> String {
    format!("ghost-{ino}.img")
}

/// The key of a ghost's helper fd in the inode → fd map shared with memfds (inode numbers of
/// two filesystems must not collide).
pub fn key(ino: u64) -> u64 {
    ino | 1 << 63
}

/// "/path (deleted)" → "/path" (not memfds, shared anonymous memory's "/dev/zero (deleted)" or
/// SysV shared memory's "/SYSV…", which show the same way).
pub fn deleted_path(link: &str) -> Option<&str> {
    link.strip_suffix(" (deleted)")
        .filter(|p| p.starts_with('/') && !p.starts_with("/memfd:") && *p != "/dev/zero" && !p.starts_with("/SYSV"))
}

/// Whether a deleted file (opened at `proc_file`, a /proc/PID/fd or map_files entry) can be
/// carried: a regular file without other names and at most [`GHOST_LIMIT`] bytes of data.
pub fn judge(proc_file: &Path, path: &str) -> std::result::Result<(File, u64), String> {
    let f = File::open(proc_file).map_err(|e| format!("cannot open the deleted file {path}: {e}"))?;
    let md = f.metadata().map_err(|e| e.to_string())?;
    if !md.file_type().is_file() {
        return Err(format!("{path} was deleted while open and is not a regular file"));
    }
    if md.nlink() != 0 {
        return Err(format!("{path} was removed but the file has {} other name(s) (not carried)", md.nlink()));
    }
    parent_exists(path)?;
    let data = extents(&f, md.size()).map_err(|e| e.to_string())?.iter().map(|e| e.1).sum::<u64>();
    if data > GHOST_LIMIT {
        return Err(format!(
            "{path} was deleted while open and holds {data} bytes of data (size {}): deleted files are carried in \
             the image up to {GHOST_LIMIT} bytes",
            md.size()
        ));
    }
    Ok((f, md.ino()))
}

/// A deleted file or directory is made again in its directory: it must still exist.
pub fn parent_exists(path: &str) -> std::result::Result<(), String> {
    let parent = path.rsplit_once('/').map_or("/", |(d, _)| if d.is_empty() { "/" } else { d });
    if std::fs::metadata(parent).is_ok_and(|m| m.is_dir()) {
        return Ok(());
    }
    Err(format!("{path} was deleted and its directory {parent} is gone too (it is made again in its directory)"))
}

/// The data extents of `f` (holes skipped), within `size`.
fn extents(f: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < size && out.len() < 1 << 20 {
        let Some(d) = sys::seek_data(f, off)? else { break };
        if d >= size {
            break;
        }
        let h = sys::seek_hole(f, d)?.min(size);
        out.push((d, h - d));
        off = h;
    }
    Ok(out)
}

/// Saves every deleted file the fds and mappings refer to.
pub fn collect(pid: Pid, files: &FilesState, memory: &MemoryState, dir: &Path) -> Result<Vec<GhostState>> {
    let mut want: Vec<(u64, String, std::path::PathBuf)> = Vec::new();
    for e in &files.fds {
        if let FileKind::Ghost { ino, path, .. } = &files.files[e.file] {
            if !want.iter().any(|w| w.0 == *ino) {
                want.push((*ino, path.clone(), proc_path(pid, &format!("fd/{}", e.fd))));
            }
        }
    }
    for v in &memory.vmas {
        if let VmaKind::Ghost { ino, path, .. } = &v.kind {
            if !want.iter().any(|w| w.0 == *ino) {
                want.push((*ino, path.clone(), proc_path(pid, &format!("map_files/{:x}-{:x}", v.start, v.end))));
            }
        }
    }
    let mut out = Vec::new();
    for (ino, path, src) in want {
        let (f, got) = judge(&src, &path).map_err(|what| Error::Unsupported { pid, what })?;
        if got != ino {
            return Err(Error::Unsupported { pid, what: format!("deleted file {path} (inode changed while reading)") });
        }
        let md = f.metadata().map_err(io_at(&src))?;
        let ext = extents(&f, md.size()).map_err(io_at(&src))?;
        let img = dir.join(file_name(ino));
        let mut o = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&img)
            .map_err(io_at(&img))?;
        let mut crc = crc32fast::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        for &(off, len) in &ext {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                f.read_exact_at(&mut buf[..n], off + done).map_err(io_at(&src))?;
                crc.update(&buf[..n]);
                o.write_all(&buf[..n]).map_err(io_at(&img))?;
                done += n as u64;
            }
        }
        out.push(GhostState {
            ino,
            path,
            size: md.size(),
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            extents: ext,
            crc: crc.finalize(),
        });
    }
    Ok(out)
}

/// Reads and checks every saved deleted file (before anything is created).
pub fn read_all(dir: &Path, ghosts: &[GhostState]) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for g in ghosts {
        let path = dir.join(file_name(g.ino));
        let mut d = Vec::new();
        File::open(&path).and_then(|mut f| f.read_to_end(&mut d)).map_err(io_at(&path))?;
        let want: u64 = g.extents.iter().map(|e| e.1).sum();
        if d.len() as u64 != want {
            return Err(Error::Truncated {
                path,
                what: format!("deleted file {}: {} of {want} bytes", g.path, d.len()),
            });
        }
        if crc32fast::hash(&d) != g.crc {
            return Err(Error::Checksum { path, what: format!("deleted file {}", g.path) });
        }
        out.push(d);
    }
    Ok(out)
}

/// Creates each deleted file again inside the new process, unlinked at once; its fd (above
/// `above`) goes into `map` under [`key`].
/// `existing`: files, by inode, that another process of the same tree made again (their path
/// under /proc): opened instead of made.
pub fn install(
    r: &Remote,
    ghosts: &[GhostState],
    contents: &[Vec<u8>],
    above: u64,
    map: &mut HashMap<u64, u64>,
    existing: &HashMap<u64, std::path::PathBuf>,
) -> Result<()> {
    for (g, data) in ghosts.iter().zip(contents) {
        // The file another process of the same tree made again: opened as it is.
        if let Some(p) = existing.get(&g.ino) {
            let a = r.put_cstr(0, p.as_os_str().as_encoded_bytes())?;
            let fl = (libc::O_RDWR | libc::O_CLOEXEC) as u64;
            let fd = r.call(
                &format!("open {} (deleted file {} of the tree)", p.display(), g.path),
                libc::SYS_openat,
                &[libc::AT_FDCWD as u64, a, fl, 0],
            )?;
            let high = r.call("fcntl(F_DUPFD_CLOEXEC)", libc::SYS_fcntl, &[fd, libc::F_DUPFD_CLOEXEC as u64, above])?;
            r.call("close", libc::SYS_close, &[fd])?;
            map.insert(key(g.ino), high);
            continue;
        }
        let fl = (libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | libc::O_CLOEXEC) as u64;
        let (p, a, fd) = make_at_free_name(r, &g.path, g.ino, "open", "deleted file", |a| {
            r.raw(libc::SYS_openat, &[libc::AT_FDCWD as u64, a, fl, 0o600])
        })?;
        r.call(&format!("unlink {p} (deleted file)"), libc::SYS_unlink, &[a])?;
        let mut at = 0usize;
        for &(off, len) in &g.extents {
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min((r.scratch_len / 2) as u64) as usize;
                let a = r.put(0, &data[at..at + n])?;
                let w = r.call("pwrite64 (deleted file)", libc::SYS_pwrite64, &[fd, a, n as u64, off + done])?;
                if w != n as u64 {
                    return Err(Error::Restore(format!("deleted file {}: short write", g.path)));
                }
                at += n;
                done += n as u64;
            }
        }
        r.call("ftruncate (deleted file)", libc::SYS_ftruncate, &[fd, g.size])?;
        r.call("fchown (deleted file)", libc::SYS_fchown, &[fd, g.uid as u64, g.gid as u64])?;
        r.call("fchmod (deleted file)", libc::SYS_fchmod, &[fd, g.mode as u64])?;
        let high = r.call("fcntl(F_DUPFD_CLOEXEC)", libc::SYS_fcntl, &[fd, libc::F_DUPFD_CLOEXEC as u64, above])?;
        r.call("close", libc::SYS_close, &[fd])?;
        map.insert(key(g.ino), high);
    }
    Ok(())
}

/// Makes a deleted FIFO again in the new process: `mknod` at `path` (a `.dvk-ghost.<inode>` name
/// beside it if the path is taken), owner and mode set, opened read-write and non-blocking (the
/// returned fd holds the pipe open), unlinked at once.
pub fn make_fifo(r: &Remote, path: &str, ino: u64, mode: u32, uid: u32, gid: u32) -> Result<u64> {
    let (p, a, _) = make_at_free_name(r, path, ino, "mknod", "deleted FIFO", |a| {
        r.raw(libc::SYS_mknodat, &[libc::AT_FDCWD as u64, a, (libc::S_IFIFO | 0o600) as u64, 0])
    })?;
    let fl = (libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) as u64;
    let fd = r.call(&format!("open {p} (deleted FIFO)"), libc::SYS_openat, &[libc::AT_FDCWD as u64, a, fl, 0]);
    r.call(&format!("unlink {p} (deleted FIFO)"), libc::SYS_unlink, &[a])?;
    let fd = fd?;
    r.call("fchown (deleted FIFO)", libc::SYS_fchown, &[fd, uid as u64, gid as u64])?;
    r.call("fchmod (deleted FIFO)", libc::SYS_fchmod, &[fd, mode as u64])?;
    Ok(fd)
}

/// Makes something deleted again in the new process: `make` (an injected call given the address
/// of the name in the scratch area, returning the raw result) at `path`, or at a
/// `.dvk-ghost.<ino>` name beside it when `path` is taken. `call` and `what` name it in errors
/// ("open", "deleted file"). Returns the name used, its address (valid until the next `put`)
/// and what `make` returned.
fn make_at_free_name(
    r: &Remote,
    path: &str,
    ino: u64,
    call: &str,
    what: &str,
    make: impl Fn(u64) -> Result<i64>,
) -> Result<(String, u64, u64)> {
    let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
    for p in [path.to_string(), format!("{dir}/.dvk-ghost.{ino}")] {
        let a = r.put_cstr(0, p.as_bytes())?;
        let ret = make(a)?;
        if ret == -(libc::EEXIST as i64) {
            continue;
        }
        if ret < 0 {
            return Err(Error::Injected {
                pid: r.pid,
                call: format!("{call} {p} ({what}, created again)"),
                errno: -ret as i32,
                msg: crate::inject::errno_name(-ret as i32),
            });
        }
        return Ok((p, a, ret as u64));
    }
    Err(Error::Restore(format!("{what} {path}: its path and a stand-in name are both taken")))
}

/// A directory deleted while the process was in it or held it open (it was empty: only an
/// empty directory can be removed).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeletedDir {
    pub ino: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl DeletedDir {
    /// The directory `proc_link` (/proc/PID/cwd or /proc/PID/fd/N) leads to.
    pub fn of(proc_link: &Path) -> std::io::Result<DeletedDir> {
        let md = std::fs::metadata(proc_link)?;
        Ok(DeletedDir { ino: md.ino(), mode: md.mode() & 0o7777, uid: md.uid(), gid: md.gid() })
    }

    /// Creates the directory again at `path` in the new process (a `.dvk-ghost.<inode>` name
    /// beside it if the path is taken), with its owner and mode; returns the path used. The
    /// caller goes into it or opens it, then removes it with [`remove_dir`].
    pub fn make(&self, r: &Remote, path: &str) -> Result<String> {
        let (p, a, _) = make_at_free_name(r, path, self.ino, "mkdir", "deleted directory", |a| {
            r.raw(libc::SYS_mkdir, &[a, 0o700])
        })?;
        r.call("chown (deleted directory)", libc::SYS_chown, &[a, self.uid as u64, self.gid as u64])?;
        r.call("chmod (deleted directory)", libc::SYS_chmod, &[a, self.mode as u64])?;
        Ok(p)
    }
}

/// Removes a directory made by [`DeletedDir::make`] once it is in use.
pub fn remove_dir(r: &Remote, path: &str) -> Result<()> {
    let a = r.put_cstr(0, path.as_bytes())?;
    r.call(&format!("rmdir {path} (deleted directory)"), libc::SYS_rmdir, &[a]).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_skipped_and_linked_files_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sparse");
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
        f.write_all_at(b"ab", 0).unwrap();
        f.write_all_at(b"cd", 1 << 20).unwrap();
        let size = (1 << 20) + 2;
        let e = extents(&f, size).unwrap();
        assert_eq!(e.first().map(|x| x.0), Some(0));
        assert_eq!(e.last().map(|x| x.0 + x.1), Some(size));
        assert!(e.iter().map(|x| x.1).sum::<u64>() < 1 << 19, "{e:?}");
        // Still linked: refused with the count of its names.
        let why = judge(&p, "/x/sparse").unwrap_err();
        assert!(why.contains("1 other name"), "{why}");
        assert_eq!(deleted_path("/tmp/a (deleted)"), Some("/tmp/a"));
        assert_eq!(deleted_path("/dev/zero (deleted)"), None);
        assert_eq!(deleted_path("/memfd:x (deleted)"), None);
        assert_eq!(deleted_path("/tmp/a"), None);
        assert_ne!(key(5), 5);
    }
}
