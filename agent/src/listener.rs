//! A program's virtual listener, as the agent holds it: the socket file the shim made in the
//! listener directory, opened once with `O_PATH|O_NOFOLLOW`.
//!
//! The agent is root and the file belongs to the program's user, who may rename anything over
//! its name at any time (the directory is sticky, but the file is hers). So the agent never
//! connects to the *name*: it checks the inode it opened when `Listen` registered it (a socket,
//! owned by the caller) and connects through `/proc/self/fd/N`, which reaches that inode and
//! nothing else — a symlink or another socket renamed over the path is never followed. Type
//! and owner are checked again (fstat) before every connect. See "Security model" in
//! docs/ARCHITECTURE.md.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::UnixStream;

#[derive(Clone, Debug)]
pub struct ListenerFile {
    /// Where the shim made it (for classification, display and clean-up only: never connected to).
    pub path: PathBuf,
    file: Arc<File>,
    dev: u64,
    ino: u64,
    owner: u32,
}

/// Why a listener cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("{path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("{path} is not a socket (a symlink or another file is not followed)")]
    NotSocket { path: String },
    #[error("{path} belongs to uid {owner}, not to uid {caller}")]
    Owner { path: String, owner: u32, caller: u32 },
    #[error("{path} is not a socket that pid {pid} listens on")]
    NotServed { path: String, pid: i32 },
}

impl ListenerFile {
    /// Opens the socket file at `path` without following a symlink. `caller` is the uid that
    /// registers it: the file must be its own, unless the caller is root.
    pub fn open(path: &Path, caller: u32) -> Result<ListenerFile, ListenerError> {
        let shown = || path.display().to_string();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| ListenerError::Open { path: shown(), source })?;
        let m = file.metadata().map_err(|source| ListenerError::Open { path: shown(), source })?;
        if !m.file_type().is_socket() {
            return Err(ListenerError::NotSocket { path: shown() });
        }
        if caller != 0 && m.uid() != caller {
            return Err(ListenerError::Owner { path: shown(), owner: m.uid(), caller });
        }
        Ok(ListenerFile { path: path.to_owned(), file: Arc::new(file), dev: m.dev(), ino: m.ino(), owner: m.uid() })
    }

    /// Checks that process `pid` itself listens on this file: the listening socket bound to the
    /// inode is among its fds. A socket file of the caller's that another process serves (say
    /// a root daemon's per-user socket, hard-linked into the listener dir) is refused: the
    /// agent would reach that daemon with root's credentials. A socket file stays bound to the
    /// socket that made it, so this holds for as long as the file is held.
    pub fn check_served_by(&self, pid: i32) -> Result<(), ListenerError> {
        match crate::sys::unix_listeners_bound_to(self.dev, self.ino) {
            Ok(socks) if crate::sys::holds_socket(pid, &socks) => Ok(()),
            Ok(_) => Err(ListenerError::NotServed { path: self.path.display().to_string(), pid }),
            Err(e) => {
                // Without sock_diag (a kernel without CONFIG_UNIX_DIAG) the owner check is all.
                crate::ratelog::warn(
                    &crate::ratelog::NO_SOCK_DIAG,
                    format_args!("cannot ask the kernel who serves {}: {e}; owner check only", self.path.display()),
                );
                Ok(())
            }
        }
    }

    /// Gives the file (made by the agent, still root's) to `uid`, through the fd: the inode we
    /// hold, whatever is at the path by now.
    pub fn chown(&mut self, uid: u32) -> io::Result<()> {
        crate::sys::fchown_path_fd(&*self.file, uid)?;
        self.owner = uid;
        Ok(())
    }

    /// Connects to the listener this file was when registered. ECONNREFUSED when nothing
    /// listens on it any more (the program closed it or exited).
    pub async fn connect(&self) -> io::Result<UnixStream> {
        // The inode cannot change under an fd, but its owner or mode could: check again.
        let m = self.file.metadata()?;
        if !m.file_type().is_socket() || m.uid() != self.owner || m.dev() != self.dev || m.ino() != self.ino {
            return Err(io::Error::from_raw_os_error(libc::ECONNREFUSED));
        }
        // The Arc held by `self` keeps the fd number valid while connect() looks it up.
        UnixStream::connect(format!("/proc/self/fd/{}", self.file.as_raw_fd())).await
    }

    /// Removes the file from the listener directory, if the name still refers to it (never
    /// something the user renamed over it).
    pub fn remove(&self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Whether a failed connect to a listener means it is gone for good. Only "nothing listens
/// there" does; running out of fds, memory or backlog room is the agent's (or the program's)
/// momentary trouble, and a healthy endpoint must survive it.
pub fn is_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ECONNREFUSED) | Some(libc::ENOENT))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn a_symlink_renamed_over_the_listener_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sock");
        let elsewhere = dir.path().join("private.sock");
        let ours = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let theirs = std::os::unix::net::UnixListener::bind(&elsewhere).unwrap();
        theirs.set_nonblocking(true).unwrap();
        let me = my_uid();
        let l = ListenerFile::open(&path, me).unwrap();
        // The attack: a symlink to another socket renamed over the registered name.
        let link = dir.path().join("tmp-link");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        std::fs::rename(&link, &path).unwrap();
        rt().block_on(async { l.connect().await.unwrap() });
        assert!(theirs.accept().is_err(), "the agent connected to the socket the symlink names");
        ours.set_nonblocking(true).unwrap();
        assert!(ours.accept().is_ok(), "the registered listener did not get the connection");
        // Clean-up does not remove what was renamed over the name.
        l.remove();
        assert!(std::fs::symlink_metadata(&path).is_ok());
    }

    #[test]
    fn registration_refuses_a_symlink_or_a_plain_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("real.sock");
        let _s = std::os::unix::net::UnixListener::bind(&target).unwrap();
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(ListenerFile::open(&link, my_uid()), Err(ListenerError::NotSocket { .. })));
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        assert!(matches!(ListenerFile::open(&plain, my_uid()), Err(ListenerError::NotSocket { .. })));
        if my_uid() == 0 {
            assert!(matches!(ListenerFile::open(&target, 65534), Err(ListenerError::Owner { .. })));
        }
    }

    #[test]
    fn a_closed_listener_is_gone_and_a_full_fd_table_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sock");
        let s = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let l = ListenerFile::open(&path, my_uid()).unwrap();
        drop(s);
        let e = rt().block_on(async { l.connect().await.unwrap_err() });
        assert!(is_gone(&e), "{e}");
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOMEM, libc::ENOBUFS, libc::EAGAIN] {
            assert!(!is_gone(&io::Error::from_raw_os_error(errno)), "errno {errno} taken for a closed listener");
        }
    }

    #[test]
    fn only_the_process_that_listens_on_the_file_may_register_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sock");
        let _ours = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let me = std::process::id() as i32;
        ListenerFile::open(&path, my_uid()).unwrap().check_served_by(me).unwrap();
        // A second name of the same socket file is the same socket.
        let linked = dir.path().join("linked.sock");
        std::fs::hard_link(&path, &linked).unwrap();
        ListenerFile::open(&linked, my_uid()).unwrap().check_served_by(me).unwrap();
        // Another process (our parent) does not listen on it.
        let parent = std::os::unix::process::parent_id() as i32;
        assert!(matches!(
            ListenerFile::open(&linked, my_uid()).unwrap().check_served_by(parent),
            Err(ListenerError::NotServed { .. })
        ));
        // A socket file nothing listens on any more is served by nobody.
        let closed = dir.path().join("closed.sock");
        drop(std::os::unix::net::UnixListener::bind(&closed).unwrap());
        assert!(ListenerFile::open(&closed, my_uid()).unwrap().check_served_by(me).is_err());
    }

    fn my_uid() -> u32 {
        std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0)
    }
}
