//! The hook table: every libc function the shim replaces, in one place.
//!
//! Each hook is allocation- and lock-free, never panics, and leaves errno as
//! the real call would. PIDs below `VPID_BASE` are real and pass straight
//! through; vPIDs are resolved through the agent.

use crate::{identity, link, raw};
use libc::{c_int, pid_t};
use pidvirt::{Vpid, VPID_BASE};

/// getpid(): the vPID once registered (from memory: no syscall), else the real PID.
#[no_mangle]
pub extern "C" fn getpid() -> pid_t {
    match identity::vpid() {
        0 => raw::getpid(),
        v => v,
    }
}

/// getppid(): the parent's vPID while that parent (in the cluster) is still our parent.
#[no_mangle]
pub extern "C" fn getppid() -> pid_t {
    let real = raw::getppid();
    identity::parent_vpid_if(real).unwrap_or(real)
}

/// kill(): vPIDs (and -vPID for a process group) are delivered by the agents on
/// whatever node the target runs; real PIDs behave exactly as without the shim.
#[no_mangle]
pub extern "C" fn kill(pid: pid_t, sig: c_int) -> c_int {
    let (target, group) = if pid >= VPID_BASE {
        (pid, false)
    } else if pid <= -VPID_BASE {
        (-pid, true)
    } else {
        return raw::kill(pid, sig);
    };
    // Ourselves or our own child: no need to ask anyone (a child's registration may
    // still be on its way to the agent right after fork()).
    let local = if target == identity::vpid() { Some(raw::getpid()) } else { crate::children::real_of(target) };
    if let Some(real) = local {
        return raw::kill(if group { -real } else { real }, sig);
    }
    let errno = raw::preserving_errno(|| link::kill(Vpid(target), sig, group));
    if errno == 0 {
        0
    } else {
        raw::set_errno(errno);
        -1
    }
}

// ---------------------------------------------------------------------------
// Virtual sockets: only the calls that deal with addresses.

use crate::fdtable::{Entry, Family, Kind, V6Form};
use crate::{names, real, vsock};
use libc::{addrinfo, c_char, c_void, hostent, size_t, sockaddr, socklen_t};
use std::ffi::CStr;

fn fail(errno: c_int) -> c_int {
    raw::set_errno(errno);
    -1
}

/// bind(): a TCP port of a registered process is recorded, not taken from the node.
///
/// # Safety
/// Called by the program with bind(2)'s contract.
#[no_mangle]
pub unsafe extern "C" fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    // SAFETY: the program passed len readable bytes at addr.
    match raw::preserving_errno(|| unsafe { vsock::bind(fd, addr, len) }) {
        Some(Ok(())) => 0,
        Some(Err(errno)) => fail(errno),
        // SAFETY: forwarded unchanged.
        None => unsafe { real::bind()(fd, addr, len) },
    }
}

/// connect(): to a virtual IP, through the agent; anything else, libc's.
///
/// # Safety
/// Called by the program with connect(2)'s contract.
#[no_mangle]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    // SAFETY: the program passed len readable bytes at addr.
    if let Some(target) = unsafe { vsock::virtual_target(addr, len) } {
        match raw::preserving_errno(|| vsock::connect(fd, target)) {
            Ok(()) => return 0,
            Err(libc::EPROTOTYPE) => {} // not a TCP socket: the kernel decides
            Err(errno) => return fail(errno),
        }
    }
    if let Err(errno) = raw::preserving_errno(|| vsock::carry_out_bind(fd)) {
        return fail(errno);
    }
    // SAFETY: forwarded unchanged.
    unsafe { real::connect()(fd, addr, len) }
}

/// listen(): a bound TCP socket becomes endpoint `<name>:<port>` of the process's DC.
#[no_mangle]
pub extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    match raw::preserving_errno(|| vsock::listen(fd, backlog)) {
        Some(Ok(())) => 0,
        Some(Err(errno)) => fail(errno),
        // SAFETY: forwarded unchanged.
        None => unsafe { real::listen()(fd, backlog) },
    }
}

/// The virtual socket at `fd` that is connected or listening (not a recorded bind).
fn live_virtual(fd: c_int) -> Option<Entry> {
    vsock::lookup(fd).filter(|e| e.kind != Kind::Bound)
}

/// # Safety
/// Called by the program with accept4(2)'s contract.
#[no_mangle]
pub unsafe extern "C" fn accept4(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t, flags: c_int) -> c_int {
    match vsock::lookup(fd) {
        // SAFETY: forwarded from the program.
        Some(l) if l.kind == Kind::Listener => unsafe { vsock::accept(l, fd, addr, len, flags) },
        // SAFETY: forwarded unchanged.
        _ => unsafe { real::accept4()(fd, addr, len, flags) },
    }
}

/// # Safety
/// Called by the program with accept(2)'s contract.
#[no_mangle]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    match vsock::lookup(fd) {
        // SAFETY: forwarded from the program.
        Some(l) if l.kind == Kind::Listener => unsafe { vsock::accept(l, fd, addr, len, 0) },
        // SAFETY: forwarded unchanged.
        _ => unsafe { real::accept()(fd, addr, len) },
    }
}

/// # Safety
/// Called by the program with getsockname(2)'s contract.
#[no_mangle]
pub unsafe extern "C" fn getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    match vsock::lookup(fd) {
        Some(v) => {
            let form = if v.kind == Kind::Bound { v.v6_form } else { V6Form::Mapped };
            // SAFETY: forwarded from the program.
            unsafe { vsock::write_address(v.local, v.family, form, addr, len) };
            0
        }
        // SAFETY: forwarded unchanged.
        None => unsafe { real::getsockname()(fd, addr, len) },
    }
}

/// # Safety
/// Called by the program with getpeername(2)'s contract.
#[no_mangle]
pub unsafe extern "C" fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    match live_virtual(fd) {
        Some(v) if v.kind == Kind::Listener => fail(libc::ENOTCONN),
        Some(v) => {
            // SAFETY: forwarded from the program.
            unsafe { vsock::write_address(v.peer, v.family, V6Form::Mapped, addr, len) };
            0
        }
        // SAFETY: forwarded unchanged.
        None => unsafe { real::getpeername()(fd, addr, len) },
    }
}

fn is_ip_level(level: c_int) -> bool {
    level == libc::IPPROTO_TCP || level == libc::IPPROTO_IP || level == libc::IPPROTO_IPV6
}

/// TCP/IP-level options of a virtual socket are accepted (it is a TCP socket to the
/// program; TCP_NODELAY reads back); socket-level ones go to the real AF_UNIX socket.
///
/// # Safety
/// Called by the program with setsockopt(2)'s contract.
#[no_mangle]
pub unsafe extern "C" fn setsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    value: *const c_void,
    len: socklen_t,
) -> c_int {
    if live_virtual(fd).is_none() {
        // SAFETY: forwarded unchanged.
        return unsafe { real::setsockopt()(fd, level, name, value, len) };
    }
    if is_ip_level(level) {
        if level == libc::IPPROTO_TCP && name == libc::TCP_NODELAY {
            if value.is_null() || (len as usize) < std::mem::size_of::<c_int>() {
                return fail(libc::EINVAL);
            }
            // SAFETY: the program passed len >= sizeof(int) readable bytes at value.
            let on = unsafe { std::ptr::read_unaligned(value as *const c_int) } != 0;
            crate::fdtable::set_nodelay(fd, on);
        }
        return 0;
    }
    // SAFETY: forwarded unchanged.
    let rc = unsafe { real::setsockopt()(fd, level, name, value, len) };
    if rc < 0 && matches!(raw::errno(), libc::ENOPROTOOPT | libc::EOPNOTSUPP) {
        return 0; // e.g. TCP-only SOL_SOCKET options: accepted, no effect
    }
    rc
}

/// # Safety
/// Called by the program with getsockopt(2)'s contract.
#[no_mangle]
pub unsafe extern "C" fn getsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    value: *mut c_void,
    len: *mut socklen_t,
) -> c_int {
    let Some(v) = live_virtual(fd) else {
        // SAFETY: forwarded unchanged.
        return unsafe { real::getsockopt()(fd, level, name, value, len) };
    };
    let answer = if level == libc::SOL_SOCKET && name == libc::SO_DOMAIN {
        Some(if v.family == Family::V6 { libc::AF_INET6 } else { libc::AF_INET })
    } else if level == libc::SOL_SOCKET && name == libc::SO_PROTOCOL {
        Some(libc::IPPROTO_TCP)
    } else if level == libc::IPPROTO_TCP && name == libc::TCP_NODELAY {
        Some(v.nodelay as c_int)
    } else if is_ip_level(level) {
        Some(0)
    } else {
        None
    };
    match answer {
        Some(int) => {
            if value.is_null() || len.is_null() {
                return fail(libc::EFAULT);
            }
            // SAFETY: the program passed *len writable bytes at value; we write no more.
            unsafe {
                let n = *len as usize;
                std::ptr::write_bytes(value as *mut u8, 0, n);
                let bytes = int.to_ne_bytes();
                let copied = n.min(bytes.len());
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), value as *mut u8, copied);
                if n >= bytes.len() {
                    *len = bytes.len() as socklen_t;
                }
            }
            0
        }
        // SAFETY: forwarded unchanged.
        None => unsafe { real::getsockopt()(fd, level, name, value, len) },
    }
}

/// getaddrinfo(): `<name>.<dc>.dvk` becomes the endpoint's VIP, resolved by libc as a
/// numeric host so the result list is libc's own (freeaddrinfo frees it as usual).
///
/// # Safety
/// Called by the program with getaddrinfo(3)'s contract.
#[no_mangle]
pub unsafe extern "C" fn getaddrinfo(
    node: *const c_char,
    service: *const c_char,
    hints: *const addrinfo,
    res: *mut *mut addrinfo,
) -> c_int {
    // SAFETY: node, when not null, is a NUL-terminated string.
    let lookup = if node.is_null() { None } else { names::lookup(unsafe { CStr::from_ptr(node) }) };
    match lookup {
        // SAFETY: forwarded unchanged.
        None => unsafe { real::getaddrinfo()(node, service, hints, res) },
        Some(None) => libc::EAI_NONAME,
        Some(Some(vip)) => {
            let mut text = [0u8; 16];
            let numeric = names::dotted(vip, &mut text);
            // SAFETY: addrinfo is plain old data; hints, when not null, points to one.
            let mut h: addrinfo = if hints.is_null() { unsafe { std::mem::zeroed() } } else { unsafe { *hints } };
            h.ai_flags |= libc::AI_NUMERICHOST;
            if h.ai_family == libc::AF_INET6 {
                h.ai_flags |= libc::AI_V4MAPPED;
            }
            // SAFETY: numeric is NUL-terminated; the other arguments are the program's.
            unsafe { real::getaddrinfo()(numeric.as_ptr(), service, &h, res) }
        }
    }
}

/// Storage for gethostbyname()'s static result, as libc's own (not thread-safe by contract).
struct HostentStorage {
    /// Pointer-aligned space for the entry's arrays, address and name.
    buf: [u64; 64],
    entry: hostent,
}

static mut HOSTENT: HostentStorage = HostentStorage {
    buf: [0; 64],
    entry: hostent {
        h_name: std::ptr::null_mut(),
        h_aliases: std::ptr::null_mut(),
        h_addrtype: 0,
        h_length: 0,
        h_addr_list: std::ptr::null_mut(),
    },
};

/// Fills a hostent for `name` → `vip` using `buf` for its strings and arrays.
/// Returns false if `buf` is too small.
///
/// # Safety
/// `entry` writable; `buf` valid for `buf_len` bytes and outliving the entry's use.
unsafe fn fill_hostent(entry: *mut hostent, name: &CStr, vip: [u8; 4], buf: *mut u8, buf_len: usize) -> bool {
    let ptr_size = std::mem::size_of::<*mut c_char>();
    let name_bytes = name.to_bytes_with_nul();
    // Layout in buf: [addr_list: 2 ptrs][aliases: 1 ptr][addr: 4][name]
    let need = 3 * ptr_size + 4 + name_bytes.len();
    if buf_len < need || !(buf as usize).is_multiple_of(ptr_size) {
        return false;
    }
    // SAFETY: buf has `need` writable, pointer-aligned bytes (checked above).
    unsafe {
        let addr_list = buf as *mut *mut c_char;
        let aliases = addr_list.add(2);
        let addr = buf.add(3 * ptr_size);
        let name_out = addr.add(4);
        std::ptr::copy_nonoverlapping(vip.as_ptr(), addr, 4);
        std::ptr::copy_nonoverlapping(name_bytes.as_ptr(), name_out, name_bytes.len());
        *addr_list = addr as *mut c_char;
        *addr_list.add(1) = std::ptr::null_mut();
        *aliases = std::ptr::null_mut();
        (*entry).h_name = name_out as *mut c_char;
        (*entry).h_aliases = aliases;
        (*entry).h_addrtype = libc::AF_INET;
        (*entry).h_length = 4;
        (*entry).h_addr_list = addr_list;
    }
    true
}

/// # Safety
/// Called by the program with gethostbyname(3)'s contract.
#[no_mangle]
pub unsafe extern "C" fn gethostbyname(name: *const c_char) -> *mut hostent {
    // SAFETY: name, when not null, is a NUL-terminated string.
    let lookup = if name.is_null() { None } else { names::lookup(unsafe { CStr::from_ptr(name) }) };
    match lookup {
        // SAFETY: forwarded unchanged.
        None => unsafe { real::gethostbyname()(name) },
        Some(None) => {
            raw::set_h_errno(raw::HOST_NOT_FOUND);
            std::ptr::null_mut()
        }
        Some(Some(vip)) => {
            // SAFETY: gethostbyname's result is static storage by contract (not thread-safe),
            // exactly like libc's; we only touch it here.
            unsafe {
                let storage = &mut *std::ptr::addr_of_mut!(HOSTENT);
                let ok = fill_hostent(
                    &mut storage.entry,
                    CStr::from_ptr(name),
                    vip,
                    storage.buf.as_mut_ptr() as *mut u8,
                    std::mem::size_of_val(&storage.buf),
                );
                if !ok {
                    raw::set_h_errno(raw::NO_RECOVERY);
                    return std::ptr::null_mut();
                }
                &mut storage.entry
            }
        }
    }
}

/// # Safety
/// Called by the program with gethostbyname_r(3)'s contract.
#[no_mangle]
pub unsafe extern "C" fn gethostbyname_r(
    name: *const c_char,
    ret: *mut hostent,
    buf: *mut c_char,
    buf_len: size_t,
    result: *mut *mut hostent,
    h_errnop: *mut c_int,
) -> c_int {
    // SAFETY: name, when not null, is a NUL-terminated string.
    let lookup = if name.is_null() { None } else { names::lookup(unsafe { CStr::from_ptr(name) }) };
    // SAFETY: all pointers are the program's, valid per gethostbyname_r's contract.
    unsafe {
        match lookup {
            None => real::gethostbyname_r()(name, ret, buf, buf_len, result, h_errnop),
            Some(None) => {
                *result = std::ptr::null_mut();
                *h_errnop = raw::HOST_NOT_FOUND;
                0
            }
            Some(Some(vip)) => {
                // Align the caller's buffer for the pointer arrays.
                let align = (buf as usize).wrapping_neg() % std::mem::align_of::<*mut c_char>();
                if buf_len < align
                    || !fill_hostent(ret, CStr::from_ptr(name), vip, buf.add(align) as *mut u8, buf_len - align)
                {
                    *result = std::ptr::null_mut();
                    return libc::ERANGE;
                }
                *result = ret;
                0
            }
        }
    }
}

// ---------------------------------------------------------------------------
// fork and the wait family: a child is known to its parent by its vPID.

/// fork(): the child's vPID is reserved before the fork, claimed by the child as it
/// starts, and returned to the parent at once. Without an agent: the real PID.
#[no_mangle]
pub extern "C" fn fork() -> pid_t {
    let reserved = if identity::vpid() != 0 { raw::preserving_errno(link::reserve_vpid) } else { None };
    let outer = crate::set_reserved_for_child(reserved.map(|v| v.0).unwrap_or(0));
    // SAFETY: forwarded; the atfork handlers (ours among them) run inside.
    let pid = unsafe { real::fork()() };
    if pid != 0 {
        // Back to what an interrupted fork hook of this thread (signal handler) had set.
        crate::set_reserved_for_child(outer);
        if let (true, Some(v)) = (pid > 0, reserved) {
            if crate::children::record(v.0, pid) {
                return v.0;
            }
        }
    }
    pid
}

/// A vPID of one of our children becomes its real PID for the kernel; other values pass.
/// The real PID behind a vPID of ourselves or one of our children.
fn local_real(vpid: pid_t) -> Option<pid_t> {
    // A restore under new pids maps the children's real pids in its Relink frame.
    crate::relink::check();
    if vpid == identity::vpid() {
        Some(raw::getpid())
    } else {
        crate::children::real_of(vpid)
    }
}

/// A PID argument as the kernel needs it: vPIDs of ourselves or our children (and of
/// their process groups, negated) become real; real PIDs pass; other vPIDs are `unknown`.
fn to_real(pid: pid_t, unknown: c_int) -> Result<pid_t, c_int> {
    if pid >= VPID_BASE {
        local_real(pid).ok_or(unknown)
    } else if pid <= -VPID_BASE {
        local_real(-pid).map(|r| -r).ok_or(unknown)
    } else {
        Ok(pid)
    }
}

fn real_target(pid: pid_t) -> Result<pid_t, c_int> {
    to_real(pid, libc::ECHILD)
}

/// The kernel's answer (a real PID) as the program knows that child; forgets it once reaped.
fn reported(real: pid_t, status: Option<c_int>) -> pid_t {
    if real <= 0 {
        return real;
    }
    crate::relink::check();
    match crate::children::vpid_of(real) {
        Some(v) => {
            let reaped = status.is_none_or(|s| libc::WIFEXITED(s) || libc::WIFSIGNALED(s));
            if reaped {
                crate::children::forget(real);
            }
            v
        }
        None => real,
    }
}

/// # Safety
/// Called by the program with waitpid(2)'s contract.
#[no_mangle]
pub unsafe extern "C" fn waitpid(pid: pid_t, status: *mut c_int, options: c_int) -> pid_t {
    let target = match real_target(pid) {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let mut local: c_int = 0;
    let out = if status.is_null() { &mut local as *mut c_int } else { status };
    // SAFETY: forwarded, with a valid status pointer.
    let r = unsafe { real::waitpid()(target, out, options) };
    // SAFETY: out points to a status the kernel wrote when r > 0.
    reported(r, (r > 0).then(|| unsafe { *out }))
}

/// # Safety
/// Called by the program with wait(2)'s contract.
#[no_mangle]
pub unsafe extern "C" fn wait(status: *mut c_int) -> pid_t {
    let mut local: c_int = 0;
    let out = if status.is_null() { &mut local as *mut c_int } else { status };
    // SAFETY: forwarded, with a valid status pointer.
    let r = unsafe { real::wait()(out) };
    // SAFETY: as in waitpid.
    reported(r, (r > 0).then(|| unsafe { *out }))
}

/// # Safety
/// Called by the program with wait4(2)'s contract.
#[no_mangle]
pub unsafe extern "C" fn wait4(pid: pid_t, status: *mut c_int, options: c_int, usage: *mut libc::rusage) -> pid_t {
    let target = match real_target(pid) {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let mut local: c_int = 0;
    let out = if status.is_null() { &mut local as *mut c_int } else { status };
    // SAFETY: forwarded, with a valid status pointer.
    let r = unsafe { real::wait4()(target, out, options, usage) };
    // SAFETY: as in waitpid.
    reported(r, (r > 0).then(|| unsafe { *out }))
}

/// # Safety
/// Called by the program with waitid(2)'s contract.
#[no_mangle]
pub unsafe extern "C" fn waitid(
    idtype: libc::idtype_t,
    id: libc::id_t,
    info: *mut libc::siginfo_t,
    options: c_int,
) -> c_int {
    let id = if idtype == libc::P_PID {
        match real_target(id as pid_t) {
            Ok(t) => t as libc::id_t,
            Err(e) => return fail(e),
        }
    } else {
        id
    };
    // SAFETY: forwarded unchanged.
    let rc = unsafe { real::waitid()(idtype, id, info, options) };
    if rc == 0 && !info.is_null() {
        // SAFETY: the kernel filled *info; si_pid is 0 when nothing was waitable (WNOHANG).
        unsafe {
            let real = (*info).si_pid();
            if real > 0 {
                let code = (*info).si_code;
                let gone = code == libc::CLD_EXITED || code == libc::CLD_KILLED || code == libc::CLD_DUMPED;
                let kept = options & libc::WNOWAIT != 0;
                if let Some(v) = crate::children::vpid_of(real) {
                    if gone && !kept {
                        crate::children::forget(real);
                    }
                    set_si_pid(info, v);
                }
            }
        }
    }
    rc
}

/// Writes si_pid of a SIGCHLD-style siginfo (libc exposes only a getter).
///
/// # Safety
/// `info` points to a siginfo_t the kernel filled for a child.
unsafe fn set_si_pid(info: *mut libc::siginfo_t, pid: pid_t) {
    // Layout (x86_64): si_signo, si_errno, si_code (3 ints), padding, then si_pid.
    // SAFETY: offset 16 is si_pid inside the 128-byte siginfo_t.
    unsafe { std::ptr::write_unaligned((info as *mut u8).add(16) as *mut pid_t, pid) };
}

// Process groups and sessions: their ids are real PIDs, but a program names the group
// of a child it forked by the PID fork() gave it (as shells with job control do).

/// # Safety
/// Called by the program with setpgid(2)'s contract.
#[no_mangle]
pub unsafe extern "C" fn setpgid(pid: pid_t, pgid: pid_t) -> c_int {
    match (to_real(pid, libc::ESRCH), to_real(pgid, libc::EPERM)) {
        // SAFETY: forwarded with real ids.
        (Ok(p), Ok(g)) => unsafe { real::setpgid()(p, g) },
        (Err(e), _) | (_, Err(e)) => fail(e),
    }
}

/// # Safety
/// Called by the program with getpgid(2)'s contract.
#[no_mangle]
pub unsafe extern "C" fn getpgid(pid: pid_t) -> pid_t {
    match to_real(pid, libc::ESRCH) {
        // SAFETY: forwarded with a real id.
        Ok(p) => unsafe { real::getpgid()(p) },
        Err(e) => fail(e),
    }
}

/// # Safety
/// Called by the program with getsid(2)'s contract.
#[no_mangle]
pub unsafe extern "C" fn getsid(pid: pid_t) -> pid_t {
    match to_real(pid, libc::ESRCH) {
        // SAFETY: forwarded with a real id.
        Ok(p) => unsafe { real::getsid()(p) },
        Err(e) => fail(e),
    }
}

/// # Safety
/// Called by the program with tcsetpgrp(3)'s contract.
#[no_mangle]
pub unsafe extern "C" fn tcsetpgrp(fd: c_int, pgrp: pid_t) -> c_int {
    match to_real(pgrp, libc::EPERM) {
        // SAFETY: forwarded with a real id.
        Ok(g) => unsafe { real::tcsetpgrp()(fd, g) },
        Err(e) => fail(e),
    }
}
