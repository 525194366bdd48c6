//! The shim's syscall layer: every unsafe call of the shim lives here.
//!
//! Everything in this module is async-signal-safe and allocation-free: hooks
//! call it from signal handlers and from the child side of fork().

use libc::{c_int, c_void, pid_t};

pub fn getpid() -> pid_t {
    // SAFETY: getpid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_getpid) as pid_t }
}

pub fn getppid() -> pid_t {
    // SAFETY: getppid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_getppid) as pid_t }
}

/// Raw kill(2): returns 0 or -1 with errno set, exactly like libc's.
pub fn kill(pid: pid_t, sig: c_int) -> c_int {
    // SAFETY: kill takes two integers; errno is set by the syscall() wrapper on failure.
    unsafe { libc::syscall(libc::SYS_kill, pid, sig) as c_int }
}

pub fn errno() -> c_int {
    // SAFETY: __errno_location returns this thread's errno slot, valid for the thread's life.
    unsafe { *libc::__errno_location() }
}

pub fn set_errno(value: c_int) {
    // SAFETY: as above; writing this thread's errno is what libc calls do.
    unsafe { *libc::__errno_location() = value }
}

/// Runs `f` and puts errno back as it was: the program must not see our internal calls.
pub fn preserving_errno<T>(f: impl FnOnce() -> T) -> T {
    let saved = errno();
    let out = f();
    set_errno(saved);
    out
}

pub fn close(fd: c_int) {
    // SAFETY: closing an fd we own; a bad fd only yields EBADF.
    unsafe { libc::close(fd) };
}

/// A blocking, close-on-exec AF_UNIX stream connection to `addr`, with send/receive
/// timeouts so a wedged agent cannot hang the program.
pub fn connect_unix(addr: &libc::sockaddr_un, timeout_ms: i64) -> Result<c_int, c_int> {
    // SAFETY: socket() takes integers and returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(errno());
    }
    let tv = libc::timeval {
        tv_sec: timeout_ms / 1000,
        tv_usec: (timeout_ms % 1000) * 1000,
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: tv is a valid timeval for the duration of the call and its size is passed.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &tv as *const _ as *const c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
    }
    // SAFETY: addr points to a fully initialised sockaddr_un whose size is passed.
    let rc = unsafe {
        libc::connect(
            fd,
            addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_un>() as u32,
        )
    };
    if rc < 0 {
        let e = errno();
        close(fd);
        return Err(e);
    }
    Ok(fd)
}

pub fn write_all(fd: c_int, mut buf: &[u8]) -> Result<(), c_int> {
    while !buf.is_empty() {
        // SAFETY: buf is a valid readable slice of buf.len() bytes.
        let n = unsafe {
            libc::send(
                fd,
                buf.as_ptr() as *const c_void,
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = errno();
            if e == libc::EINTR {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

pub fn read_exact(fd: c_int, buf: &mut [u8]) -> Result<(), c_int> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: rest is a valid writable slice of rest.len() bytes.
        let n = unsafe { libc::read(fd, rest.as_mut_ptr() as *mut c_void, rest.len()) };
        if n < 0 {
            let e = errno();
            if e == libc::EINTR {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(libc::ECONNRESET);
        }
        done += n as usize;
    }
    Ok(())
}

/// Moves `fd` to the lowest free number >= `min` (close-on-exec), so the agent link
/// does not take the low numbers a program expects for its own files.
pub fn move_fd_high(fd: c_int, min: c_int) -> c_int {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) takes integers and returns a new fd or -1.
    let high = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) };
    if high < 0 {
        return fd;
    }
    close(fd);
    high
}

/// Writes a line to stderr (fd 2), ignoring failures.
pub fn warn(line: &[u8]) {
    preserving_errno(|| {
        let _ = write_all_plain(2, line);
    })
}

fn write_all_plain(fd: c_int, mut buf: &[u8]) -> Result<(), ()> {
    while !buf.is_empty() {
        // SAFETY: buf is a valid readable slice of buf.len() bytes.
        let n = unsafe { libc::write(fd, buf.as_ptr() as *const c_void, buf.len()) };
        if n <= 0 {
            return Err(());
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

pub type ForkHandler = unsafe extern "C" fn();

/// Registers `child` to run in the child after every glibc fork().
pub fn at_fork_child(child: ForkHandler) -> bool {
    // SAFETY: the handler is a plain extern "C" fn valid for the life of the library
    // (the shim is never unloaded: it is preloaded).
    unsafe { libc::pthread_atfork(None, None, Some(child)) == 0 }
}

pub fn strerror_into(errnum: c_int, out: &mut [u8]) -> usize {
    // SAFETY: out is a valid writable buffer of out.len() bytes; strerror_r (XSI or GNU)
    // writes at most that many bytes including the NUL.
    let rc = unsafe { libc::strerror_r(errnum, out.as_mut_ptr() as *mut libc::c_char, out.len()) };
    if rc != 0 {
        return 0;
    }
    out.iter().position(|b| *b == 0).unwrap_or(0)
}
