//! The agent's only unsafe code: thin wrappers over the syscalls std and
//! tokio do not offer.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// A pidfd for `pid` (readable once the process exits).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `kill(2)`; returns 0 or the errno.
pub fn kill(pid: i32, signal: i32) -> i32 {
    // SAFETY: kill takes two integers; no memory is passed.
    if unsafe { libc::kill(pid, signal) } == 0 {
        0
    } else {
        io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL)
    }
}

/// Registers a pidfd with tokio's reactor (readable when the process exits).
pub fn async_pidfd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is open and keeps referring to the same file description until
    // dropped, and the AsyncFd takes ownership of it: exactly register()'s contract.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}
