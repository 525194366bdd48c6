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

/// `SO_PEERPIDFD` (Linux ≥ 6.5; not in every libc crate yet): a pidfd of the process that
/// created the peer socket.
const SO_PEERPIDFD: libc::c_int = 77;

/// A pidfd of the process that connected `sock` (the one SO_PEERCRED names, unlike that
/// pid, it can never come to mean another process). `Ok(None)`: the kernel is too old for
/// SO_PEERPIDFD. `Err(ESRCH)`: that process has already exited and been reaped.
pub fn peer_pidfd(sock: &impl std::os::fd::AsRawFd) -> io::Result<Option<OwnedFd>> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: fd and len are valid, writable and sized for the int the option returns.
    let rc = unsafe {
        libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, SO_PEERPIDFD, &mut fd as *mut _ as *mut _, &mut len)
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOPROTOOPT) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: the kernel just installed this fd for us and nothing else owns it.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Whether the process behind `pidfd` has exited (zombie or reaped): its pidfd polls readable.
pub fn pidfd_exited(pidfd: &OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, timeout 0 (never blocks).
    let rc = unsafe { libc::poll(&mut p, 1, 0) };
    rc != 0 && p.revents != 0
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

/// The socket inodes of the listening AF_UNIX sockets bound to the file `(dev, ino)` (as
/// `stat` reports them), from the kernel's sock_diag interface (what `ss -xl` reads).
/// Err when sock_diag is not available (kernel without CONFIG_UNIX_DIAG).
pub fn unix_listeners_bound_to(dev: u64, ino: u64) -> io::Result<Vec<u32>> {
    // linux/sock_diag.h, linux/unix_diag.h, linux/netlink.h
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_DUMP: u16 = 0x300;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const TCP_LISTEN: u32 = 10;
    const UDIAG_SHOW_VFS: u32 = 0x2;
    const UNIX_DIAG_VFS: u16 = 1;
    // The kernel reports the device as its internal dev_t (major << 20 | minor).
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let kdev = ((major << 20) | minor) as u32;

    // SAFETY: socket takes integers and returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = Vec::with_capacity(40);
    req.extend_from_slice(&40u32.to_ne_bytes()); // nlmsg_len
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    req.extend_from_slice(&[libc::AF_UNIX as u8, 0, 0, 0]); // family, protocol, pad
    req.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes()); // states
    req.extend_from_slice(&0u32.to_ne_bytes()); // ino: all
    req.extend_from_slice(&UDIAG_SHOW_VFS.to_ne_bytes());
    req.extend_from_slice(&[0xff; 8]); // cookie: none
                                       // SAFETY: req is a valid buffer of req.len() bytes for the duration of the call.
    if unsafe { libc::send(std::os::fd::AsRawFd::as_raw_fd(&fd), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let u16_at = |b: &[u8], o: usize| u16::from_ne_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    loop {
        // SAFETY: buf is a valid writable buffer of buf.len() bytes for the duration of the call.
        let n = unsafe { libc::recv(std::os::fd::AsRawFd::as_raw_fd(&fd), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let b = &buf[..n as usize];
        if b.is_empty() {
            return Ok(found);
        }
        let mut off = 0;
        while off + 16 <= b.len() {
            let len = u32_at(b, off) as usize;
            let kind = u16_at(b, off + 4);
            if len < 16 || off + len > b.len() {
                return Err(io::Error::other("malformed sock_diag answer"));
            }
            match kind {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => {
                    let errno = if len >= 20 { -(u32_at(b, off + 16) as i32) } else { libc::EIO };
                    return Err(io::Error::from_raw_os_error(errno));
                }
                _ if len >= 32 => {
                    let sock_ino = u32_at(b, off + 16 + 4);
                    let mut a = off + 32; // after nlmsghdr (16) and unix_diag_msg (16)
                    while a + 4 <= off + len {
                        let alen = u16_at(b, a) as usize;
                        let akind = u16_at(b, a + 2);
                        if alen < 4 || a + alen > off + len {
                            break;
                        }
                        if akind == UNIX_DIAG_VFS && alen >= 12 {
                            let (vino, vdev) = (u32_at(b, a + 4), u32_at(b, a + 8));
                            if vino == ino as u32 && vdev == kdev {
                                found.push(sock_ino);
                            }
                        }
                        a += (alen + 3) & !3;
                    }
                }
                _ => {}
            }
            off += (len + 3) & !3;
        }
    }
}

/// Whether process `pid` holds one of the sockets `inodes` among its fds.
pub fn holds_socket(pid: i32, inodes: &[u32]) -> bool {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    dir.flatten().any(|e| {
        std::fs::read_link(e.path()).ok().and_then(|t| {
            let t = t.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse::<u64>().ok()?;
            Some(inodes.iter().any(|&i| i as u64 == t))
        }) == Some(true)
    })
}
