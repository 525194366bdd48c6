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
    let fd = unix_socket()?;
    let tv = libc::timeval { tv_sec: timeout_ms / 1000, tv_usec: (timeout_ms % 1000) * 1000 };
    set_timeouts(fd, tv);
    // SAFETY: addr points to a fully initialised sockaddr_un whose size is passed.
    let rc = unsafe {
        libc::connect(fd, addr as *const _ as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_un>() as u32)
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
        let n = unsafe { libc::send(fd, buf.as_ptr() as *const c_void, buf.len(), libc::MSG_NOSIGNAL) };
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

/// Socket calls below are raw syscalls: the libc symbols of the same names are our hooks.
fn sockcall(nr: libc::c_long, a: usize, b: usize, c: usize, d: usize, e: usize) -> Result<c_int, c_int> {
    // SAFETY: callers pass arguments valid for syscall `nr` (pointers to live buffers of the
    // sizes they pass); the kernel validates the rest and reports EFAULT/EINVAL otherwise.
    let rc = unsafe { libc::syscall(nr, a, b, c, d, e) };
    if rc < 0 {
        Err(errno())
    } else {
        Ok(rc as c_int)
    }
}

pub fn unix_socket() -> Result<c_int, c_int> {
    sockcall(libc::SYS_socket, libc::AF_UNIX as usize, (libc::SOCK_STREAM | libc::SOCK_CLOEXEC) as usize, 0, 0, 0)
}

fn set_timeval(fd: c_int, opt: c_int, tv: &libc::timeval) {
    let _ = sockcall(
        libc::SYS_setsockopt,
        fd as usize,
        libc::SOL_SOCKET as usize,
        opt as usize,
        tv as *const _ as usize,
        std::mem::size_of::<libc::timeval>(),
    );
}

fn set_timeouts(fd: c_int, tv: libc::timeval) {
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        set_timeval(fd, opt, &tv);
    }
}

/// Back to blocking forever: the agent link's request timeouts must not leak into
/// a socket the program owns.
pub fn clear_timeouts(fd: c_int) {
    set_timeouts(fd, libc::timeval { tv_sec: 0, tv_usec: 0 });
}

pub fn getsockopt_int(fd: c_int, level: c_int, name: c_int) -> Result<c_int, c_int> {
    let mut value: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as libc::socklen_t;
    sockcall(
        libc::SYS_getsockopt,
        fd as usize,
        level as usize,
        name as usize,
        &mut value as *mut _ as usize,
        &mut len as *mut _ as usize,
    )?;
    Ok(value)
}

/// getsockname into a sockaddr_storage.
pub fn local_address(fd: c_int) -> Result<libc::sockaddr_storage, c_int> {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    sockcall(libc::SYS_getsockname, fd as usize, &mut ss as *mut _ as usize, &mut len as *mut _ as usize, 0, 0)?;
    Ok(ss)
}

pub fn bind_unix(fd: c_int, addr: &libc::sockaddr_un) -> Result<(), c_int> {
    sockcall(libc::SYS_bind, fd as usize, addr as *const _ as usize, std::mem::size_of::<libc::sockaddr_un>(), 0, 0)
        .map(|_| ())
}

pub fn listen(fd: c_int, backlog: c_int) -> Result<(), c_int> {
    sockcall(libc::SYS_listen, fd as usize, backlog as usize, 0, 0, 0).map(|_| ())
}

/// The inode of `fd` if it is a socket (identifies the open socket, unlike the fd number).
pub fn socket_inode(fd: c_int) -> Option<u64> {
    // SAFETY: stat is plain old data; fstat fills it or fails.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid, writable stat buffer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return None;
    }
    Some(st.st_ino)
}

pub fn fcntl_get(fd: c_int, cmd: c_int) -> Result<c_int, c_int> {
    // SAFETY: F_GETFL/F_GETFD take no argument.
    let rc = unsafe { libc::fcntl(fd, cmd) };
    if rc < 0 {
        Err(errno())
    } else {
        Ok(rc)
    }
}

pub fn fcntl_set(fd: c_int, cmd: c_int, value: c_int) {
    // SAFETY: F_SETFL/F_SETFD take an int argument.
    unsafe { libc::fcntl(fd, cmd, value) };
}

/// Puts `from` at fd number `to` (closing what was there), then closes `from`.
pub fn replace_fd(from: c_int, to: c_int, cloexec: bool) -> Result<(), c_int> {
    // SAFETY: dup3 takes integers; it atomically replaces `to`.
    let rc = unsafe { libc::dup3(from, to, if cloexec { libc::O_CLOEXEC } else { 0 }) };
    let result = if rc < 0 { Err(errno()) } else { Ok(()) };
    close(from);
    result
}

/// Reads exactly `buf.len()` bytes within `timeout_ms`, whether or not `fd` is non-blocking.
pub fn read_exact_within(fd: c_int, buf: &mut [u8], timeout_ms: c_int) -> Result<(), c_int> {
    let mut budget = timeout_ms;
    read_exact_budget(fd, buf, &mut budget)
}

/// As [`read_exact_within`], waiting at most `*budget_ms` in all and taking what it
/// waited off `*budget_ms` (several reads can share one budget).
pub fn read_exact_budget(fd: c_int, buf: &mut [u8], budget_ms: &mut c_int) -> Result<(), c_int> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: rest is a valid writable slice of rest.len() bytes.
        let n = unsafe { libc::recv(fd, rest.as_mut_ptr() as *mut c_void, rest.len(), libc::MSG_DONTWAIT) };
        if n > 0 {
            done += n as usize;
            continue;
        }
        if n == 0 {
            return Err(libc::ECONNRESET);
        }
        match errno() {
            libc::EINTR => continue,
            libc::EAGAIN => {
                if *budget_ms <= 0 {
                    return Err(libc::ETIMEDOUT);
                }
                let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
                // SAFETY: pfd is one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 50) };
                *budget_ms -= 50;
            }
            e => return Err(e),
        }
    }
    Ok(())
}

/// Copies the first `buf.len()` queued bytes of `fd` into `buf` without consuming them
/// (MSG_PEEK), waiting at most `timeout_ms` for that many to be queued.
pub fn peek_within(fd: c_int, buf: &mut [u8], timeout_ms: c_int) -> Result<(), c_int> {
    let mut waited = 0;
    loop {
        // SAFETY: buf is a valid writable slice of buf.len() bytes.
        let n =
            unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut c_void, buf.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT) };
        if n >= 0 && n as usize >= buf.len() {
            return Ok(());
        }
        if n == 0 {
            return Err(libc::ECONNRESET);
        }
        if n < 0 {
            match errno() {
                libc::EINTR | libc::EAGAIN => {}
                e => return Err(e),
            }
        }
        if waited >= timeout_ms {
            return Err(libc::ETIMEDOUT);
        }
        // Part of it may be queued already (poll would not wait then): sleep instead.
        sleep_ms(10);
        waited += 10;
    }
}

/// This thread's kernel id.
pub fn gettid() -> pid_t {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as pid_t }
}

pub fn sched_yield() {
    // SAFETY: sched_yield has no arguments.
    unsafe { libc::syscall(libc::SYS_sched_yield) };
}

/// Sleeps about `ms` milliseconds (less if a signal interrupts it).
pub fn sleep_ms(ms: c_int) {
    let ts = libc::timespec { tv_sec: (ms / 1000) as libc::time_t, tv_nsec: ((ms % 1000) * 1_000_000) as _ };
    // SAFETY: ts is a valid timespec; the remainder pointer may be null.
    unsafe { libc::syscall(libc::SYS_nanosleep, &ts as *const libc::timespec, std::ptr::null_mut::<libc::timespec>()) };
}

/// Runs `f` on `len` zeroed bytes of fresh anonymous pages (a buffer without malloc,
/// unmapped afterwards). None if they cannot be mapped.
pub fn with_pages<T>(len: usize, f: impl FnOnce(&mut [u8]) -> T) -> Option<T> {
    // SAFETY: an anonymous private mapping at an address of the kernel's choosing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    // SAFETY: p is `len` writable bytes that only this slice refers to until the munmap.
    let out = f(unsafe { std::slice::from_raw_parts_mut(p as *mut u8, len) });
    // SAFETY: the mapping made above; the slice is gone.
    unsafe { libc::munmap(p, len) };
    Some(out)
}

pub fn unlink(path: &std::ffi::CStr) {
    // SAFETY: path is a valid NUL-terminated string.
    unsafe { libc::unlink(path.as_ptr()) };
}

pub fn chmod(path: &std::ffi::CStr, mode: libc::mode_t) {
    // SAFETY: path is a valid NUL-terminated string.
    unsafe { libc::chmod(path.as_ptr(), mode) };
}

/// <netdb.h> values libc does not export to Rust.
pub const HOST_NOT_FOUND: c_int = 1;
pub const NO_RECOVERY: c_int = 3;

extern "C" {
    fn __h_errno_location() -> *mut c_int;
}

/// Sets this thread's resolver error (h_errno).
pub fn set_h_errno(value: c_int) {
    // SAFETY: __h_errno_location returns this thread's h_errno slot (glibc).
    unsafe { *__h_errno_location() = value }
}

/// Copies SO_RCVTIMEO/SO_SNDTIMEO from `from` to `to` (a program's timeouts survive
/// the replacement of its socket).
pub fn copy_timeouts(from: c_int, to: c_int) {
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        let mut tv = libc::timeval { tv_sec: 0, tv_usec: 0 };
        let mut len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
        let got = sockcall(
            libc::SYS_getsockopt,
            from as usize,
            libc::SOL_SOCKET as usize,
            opt as usize,
            &mut tv as *mut _ as usize,
            &mut len as *mut _ as usize,
        );
        if got.is_ok() && (tv.tv_sec != 0 || tv.tv_usec != 0) {
            set_timeval(to, opt, &tv);
        }
    }
}

pub fn bind_inet(fd: c_int, addr: &libc::sockaddr_storage, len: usize) -> Result<(), c_int> {
    sockcall(libc::SYS_bind, fd as usize, addr as *const _ as usize, len, 0, 0).map(|_| ())
}

/// CLOCK_MONOTONIC in milliseconds (the vDSO's clock_gettime: async-signal-safe).
pub fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}
