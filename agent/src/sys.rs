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

/// The signal that interrupts a relay thread blocked in read/write when its stream is
/// detached for a move (its handler does nothing; without SA_RESTART the call returns EINTR).
const INTERRUPT_SIGNAL: i32 = libc::SIGUSR2;

extern "C" fn on_interrupt(_: libc::c_int) {}

/// Installs the do-nothing handler of [`INTERRUPT_SIGNAL`] (once, at start-up).
pub fn install_interrupt_handler() -> io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; we set a plain handler (no SA_SIGINFO) that touches
    // nothing, and pass valid pointers to sigemptyset/sigaction.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        sa.sa_flags = 0;
        if libc::sigaction(INTERRUPT_SIGNAL, &sa, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The calling thread, for [`interrupt_thread`].
pub fn current_thread() -> libc::pthread_t {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() }
}

/// Makes a blocking call of `thread` return EINTR. The caller guarantees the thread has not
/// exited (relay threads unregister themselves under the same lock before they end).
pub fn interrupt_thread(thread: libc::pthread_t) {
    // SAFETY: the thread is alive (see above); the signal's handler is installed at start-up.
    unsafe { libc::pthread_kill(thread, INTERRUPT_SIGNAL) };
}

/// The inode of an fd (a socket's number in `socket:[N]`).
pub fn inode(fd: &impl std::os::fd::AsRawFd) -> io::Result<u64> {
    // SAFETY: a zeroed stat is valid; fstat writes into it and we pass a live fd.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st.st_ino)
    }
}

/// One non-blocking `recv` (MSG_DONTWAIT): Ok(0) is end of stream, WouldBlock when empty.
pub fn recv_now(fd: &impl std::os::fd::AsRawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// accept4 without waiting: a queued connection of the listener `fd`, or WouldBlock. The
/// listener may be in blocking mode (another process's, taken with pidfd_getfd: its mode is
/// that process's, not ours to change), so readiness is polled first.
pub fn accept_now(fd: &impl std::os::fd::AsRawFd) -> io::Result<OwnedFd> {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, timeout 0 (never blocks).
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if r == 0 || p.revents & libc::POLLIN == 0 {
        return Err(io::Error::from(io::ErrorKind::WouldBlock));
    }
    // SAFETY: null address pointers are allowed by accept4; the flags are valid.
    let c = unsafe {
        libc::accept4(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    if c < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(c) })
}

/// Reaps `pid` if it is an exited child of the agent (a process a move restored here).
pub fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: status is a valid out pointer; WNOHANG never blocks; a non-child gives ECHILD.
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
}

/// A close-on-exec duplicate of `fd` (an fd the caller keeps open meanwhile).
pub fn dup(fd: std::os::fd::RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC takes an fd and a minimum number; no memory is passed.
    let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if d < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(d) })
}

/// Sets the backlog of a listening socket (listen(2) again only changes it).
pub fn listen_backlog(fd: &impl std::os::fd::AsRawFd, backlog: i32) {
    // SAFETY: listen takes an fd and an integer.
    unsafe { libc::listen(fd.as_raw_fd(), backlog) };
}

/// Changes the owner of the file an `O_PATH` fd refers to (fchownat with AT_EMPTY_PATH: the
/// inode itself, not whatever its name refers to by now).
pub fn fchown_path_fd(fd: &impl std::os::fd::AsRawFd, uid: u32) -> io::Result<()> {
    // SAFETY: the path is a valid NUL-terminated empty string; the fd is open for the call.
    let rc = unsafe { libc::fchownat(fd.as_raw_fd(), c"".as_ptr(), uid, u32::MAX, libc::AT_EMPTY_PATH) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Raises the soft fd limit to the hard limit (systemd's default soft limit, 1024, is far
/// too few for an agent that holds two fds per stream); returns the limit now in force.
pub fn raise_nofile() -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the valid struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 1024;
    }
    if r.rlim_cur < r.rlim_max {
        let raised = libc::rlimit { rlim_cur: r.rlim_max, rlim_max: r.rlim_max };
        // SAFETY: setrlimit reads one valid rlimit struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            r.rlim_cur = r.rlim_max;
        }
    }
    r.rlim_cur
}
