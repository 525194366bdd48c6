//! Virtual sockets (DESIGN §4). A virtual socket is a real AF_UNIX stream
//! socket to the local agent, put at the fd number the program holds, so
//! read/write/poll/epoll/shutdown/close work natively. Only calls that involve
//! addresses need us: bind, connect, listen, accept, get{sock,peer}name and
//! {get,set}sockopt. Which fds are virtual is kept in [`fdtable`].
//!
//! `bind()` of a TCP socket to a port is recorded, not done: an endpoint's port
//! belongs to its DC, not to the node, so two DCs (or a plain service of the
//! node) may use the same port. listen() then makes the endpoint; a connect()
//! to a real address carries the recorded bind out first.

use crate::fdtable::{self, Entry, Family, Kind, V6Form};
use crate::{identity, link, raw};
use libc::{c_int, sockaddr, socklen_t};
use pidvirt::endpoint::is_virtual_ip;
use pidvirt::VirtualAddr;
use std::sync::atomic::{AtomicU32, Ordering};

pub use fdtable::lookup;

/// How long accept() waits for the header the agent sends on every new connection.
const HEADER_TIMEOUT_MS: c_int = 2000;

/// An IPv4 address (or IPv6 wildcard/loopback/v4-mapped) and port in a sockaddr.
///
/// # Safety
/// `addr` must point to `len` readable bytes.
unsafe fn parse_inet(addr: *const sockaddr, len: socklen_t) -> Option<(VirtualAddr, Family, V6Form)> {
    if addr.is_null() || (len as usize) < std::mem::size_of::<libc::sa_family_t>() {
        return None;
    }
    // SAFETY: the caller guarantees len readable bytes; each read below checks the size first.
    unsafe {
        match (*addr).sa_family as c_int {
            libc::AF_INET if len as usize >= std::mem::size_of::<libc::sockaddr_in>() => {
                let sin = &*(addr as *const libc::sockaddr_in);
                let a = VirtualAddr { ip: sin.sin_addr.s_addr.to_ne_bytes(), port: u16::from_be(sin.sin_port) };
                Some((a, Family::V4, V6Form::Mapped))
            }
            libc::AF_INET6 if len as usize >= std::mem::size_of::<libc::sockaddr_in6>() => {
                let sin6 = &*(addr as *const libc::sockaddr_in6);
                let b = sin6.sin6_addr.s6_addr;
                let port = u16::from_be(sin6.sin6_port);
                let zero10 = b[..10].iter().all(|x| *x == 0);
                let (ip, form) = if zero10 && b[10] == 0xff && b[11] == 0xff {
                    ([b[12], b[13], b[14], b[15]], V6Form::Mapped)
                } else if b == [0; 16] {
                    ([0; 4], V6Form::Any)
                } else if b[..15].iter().all(|x| *x == 0) && b[15] == 1 {
                    ([127, 0, 0, 1], V6Form::Loopback)
                } else {
                    return None;
                };
                Some((VirtualAddr { ip, port }, Family::V6, form))
            }
            _ => None,
        }
    }
}

/// A virtual target address in a sockaddr the program passed (AF_INET, or AF_INET6
/// v4-mapped), or None for every other address.
///
/// # Safety
/// `addr` must point to `len` readable bytes (as connect(2) requires).
pub unsafe fn virtual_target(addr: *const sockaddr, len: socklen_t) -> Option<VirtualAddr> {
    // SAFETY: forwarded from the caller.
    let (a, _, form) = unsafe { parse_inet(addr, len) }?;
    (form == V6Form::Mapped && is_virtual_ip(a.ip)).then_some(a)
}

/// Builds the sockaddr for `a` as the program's family would spell it.
fn sockaddr_of(a: VirtualAddr, family: Family, form: V6Form) -> (libc::sockaddr_storage, usize) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match family {
        Family::V4 => {
            // SAFETY: sockaddr_storage is large enough and aligned for sockaddr_in.
            let sin = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port.to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip);
            (ss, std::mem::size_of::<libc::sockaddr_in>())
        }
        Family::V6 => {
            // SAFETY: sockaddr_storage is large enough and aligned for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port.to_be();
            match form {
                V6Form::Any => {}
                V6Form::Loopback => sin6.sin6_addr.s6_addr[15] = 1,
                V6Form::Mapped => {
                    sin6.sin6_addr.s6_addr[10] = 0xff;
                    sin6.sin6_addr.s6_addr[11] = 0xff;
                    sin6.sin6_addr.s6_addr[12..].copy_from_slice(&a.ip);
                }
            }
            (ss, std::mem::size_of::<libc::sockaddr_in6>())
        }
    }
}

/// Writes `a` into (addr, len) with the truncation rules of getsockname(2): copies
/// at most *len bytes, sets *len to the full size.
///
/// # Safety
/// `addr`/`len` as the program passed them to a socket call: null, or valid for *len bytes.
pub unsafe fn write_address(a: VirtualAddr, family: Family, form: V6Form, addr: *mut sockaddr, len: *mut socklen_t) {
    if addr.is_null() || len.is_null() {
        return;
    }
    let (ss, size) = sockaddr_of(a, family, form);
    // SAFETY: the caller guarantees *len writable bytes at addr; we copy no more than that.
    unsafe {
        let n = (*len as usize).min(size);
        std::ptr::copy_nonoverlapping(&ss as *const _ as *const u8, addr as *mut u8, n);
        *len = size as socklen_t;
    }
}

/// Whether `fd` is a TCP-type socket of the program (AF_INET/AF_INET6, SOCK_STREAM).
fn tcp_family(fd: c_int) -> Option<Family> {
    if raw::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE).ok()? != libc::SOCK_STREAM {
        return None;
    }
    match raw::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN).ok()? {
        libc::AF_INET => Some(Family::V4),
        libc::AF_INET6 => Some(Family::V6),
        _ => None,
    }
}

/// Installs agent connection `conn` at the program's `fd`, keeping the fd's flags and
/// the socket options the program set that still mean something (timeouts).
/// Returns the TCP_NODELAY setting the program had made.
fn install(conn: c_int, fd: c_int) -> Result<bool, c_int> {
    let status = raw::fcntl_get(fd, libc::F_GETFL)?;
    let cloexec = raw::fcntl_get(fd, libc::F_GETFD)? & libc::FD_CLOEXEC != 0;
    raw::copy_timeouts(fd, conn);
    let nodelay = raw::getsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY).unwrap_or(0) != 0;
    raw::replace_fd(conn, fd, cloexec)?;
    raw::fcntl_set(fd, libc::F_SETFL, status);
    Ok(nodelay)
}

/// bind(): recorded for TCP sockets of a registered process (see the module doc).
/// None: not for us; the real bind() runs.
///
/// # Safety
/// `addr` must point to `len` readable bytes (as bind(2) requires).
pub unsafe fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> Option<Result<(), c_int>> {
    if identity::vpid() == 0 {
        return None;
    }
    // SAFETY: forwarded from the caller.
    let (local, family, form) = unsafe { parse_inet(addr, len) }?;
    if local.port == 0 || tcp_family(fd)? != family {
        return None; // ephemeral ports need the kernel; a family mismatch is the kernel's to refuse
    }
    if lookup(fd).is_some() || bound_port(fd).is_some() {
        return Some(Err(libc::EINVAL)); // already bound, as the kernel says
    }
    fdtable::record(fd, Entry { v6_form: form, ..Entry::new(Kind::Bound, family, local, VirtualAddr::default()) });
    Some(Ok(()))
}

/// Before a real connect() of a socket whose bind was only recorded: bind it for real.
pub fn carry_out_bind(fd: c_int) -> Result<(), c_int> {
    let Some(e) = lookup(fd).filter(|e| e.kind == Kind::Bound) else { return Ok(()) };
    let (ss, size) = sockaddr_of(e.local, e.family, e.v6_form);
    fdtable::forget(fd);
    raw::bind_inet(fd, &ss, size)
}

/// connect() to a virtual address. Ok, or the errno connect(2) reports.
pub fn connect(fd: c_int, target: VirtualAddr) -> Result<(), c_int> {
    let family = match lookup(fd) {
        Some(e) if e.kind == Kind::Bound => e.family,
        Some(_) => return Err(libc::EISCONN),
        None => tcp_family(fd).ok_or(libc::EPROTOTYPE)?,
    };
    let nonblocking = raw::fcntl_get(fd, libc::F_GETFL)? & libc::O_NONBLOCK != 0;
    let (conn, local, peer) = link::open_stream(target)?;
    raw::clear_timeouts(conn);
    let nodelay = install(conn, fd)?;
    fdtable::record(fd, Entry { nodelay, ..Entry::new(Kind::Stream, family, local, peer) });
    // A non-blocking connect reports "in progress" as TCP does; the socket is already
    // writable and SO_ERROR is 0, which is what the program checks next.
    if nonblocking {
        Err(libc::EINPROGRESS)
    } else {
        Ok(())
    }
}

static LISTENER_SEQ: AtomicU32 = AtomicU32::new(0);

/// listen() on a TCP socket bound to port P: it becomes endpoint `<name>:P`.
/// None: not for us (unregistered, unbound, not TCP…): the real listen() runs.
/// Once it is for us, every failure is an errno (see [`link::listen`]): never the real
/// listen(), which would listen on a random port of 0.0.0.0 (the bind was only recorded).
pub fn listen(fd: c_int, backlog: c_int) -> Option<Result<(), c_int>> {
    if identity::vpid() == 0 {
        return None;
    }
    let (family, port) = match lookup(fd) {
        Some(e) if e.kind == Kind::Bound => (e.family, e.local.port),
        Some(_) => return None, // already a virtual listener: the real listen() adjusts the backlog
        None => (tcp_family(fd)?, bound_port(fd)?),
    };
    Some(make_listener(fd, backlog, family, port))
}

fn make_listener(fd: c_int, backlog: c_int, family: Family, port: u16) -> Result<(), c_int> {
    // The directory follows a restore on another node (link::listener_dir checks).
    let dir = link::listener_dir().ok_or(libc::EADDRNOTAVAIL)?;
    let path = format!("{dir}/{}-{}-{}.sock", raw::getpid(), fd, LISTENER_SEQ.fetch_add(1, Ordering::Relaxed));
    let cpath = std::ffi::CString::new(path.clone()).map_err(|_| libc::EADDRNOTAVAIL)?;
    let mut addr = libc::sockaddr_un { sun_family: libc::AF_UNIX as libc::sa_family_t, sun_path: [0; 108] };
    if path.len() >= addr.sun_path.len() {
        return Err(libc::EADDRNOTAVAIL);
    }
    for (d, s) in addr.sun_path.iter_mut().zip(path.as_bytes()) {
        *d = *s as libc::c_char;
    }
    let sock = raw::unix_socket()?;
    raw::unlink(&cpath);
    let made = raw::bind_unix(sock, &addr).and_then(|_| {
        // Only our owner (and the agent, root) may connect to the listener.
        raw::chmod(&cpath, 0o600);
        raw::listen(sock, backlog)
    });
    if let Err(e) = made {
        raw::close(sock);
        raw::unlink(&cpath);
        return Err(e);
    }
    let vip = match link::listen(port, &path) {
        Ok(vip) => vip,
        Err(errno) => {
            raw::close(sock);
            raw::unlink(&cpath);
            return Err(errno);
        }
    };
    let nodelay = match install(sock, fd) {
        Ok(n) => n,
        Err(e) => {
            raw::unlink(&cpath);
            return Err(e);
        }
    };
    let local = VirtualAddr { ip: vip, port };
    fdtable::record(fd, Entry { nodelay, ..Entry::new(Kind::Listener, family, local, VirtualAddr::default()) });
    Ok(())
}

fn bound_port(fd: c_int) -> Option<u16> {
    let ss = raw::local_address(fd).ok()?;
    let port = match ss.ss_family as c_int {
        // SAFETY: the kernel wrote a sockaddr of this family into the storage.
        libc::AF_INET => u16::from_be(unsafe { (*(&ss as *const _ as *const libc::sockaddr_in)).sin_port }),
        // SAFETY: as above.
        libc::AF_INET6 => u16::from_be(unsafe { (*(&ss as *const _ as *const libc::sockaddr_in6)).sin6_port }),
        _ => return None,
    };
    (port != 0).then_some(port)
}

/// accept4() on a virtual listener: takes the agent's connection, reads the header
/// that names the client, answers with the client's virtual address.
///
/// # Safety
/// `addr`/`len` as the program passed them to accept(2).
pub unsafe fn accept(listener: Entry, fd: c_int, addr: *mut sockaddr, len: *mut socklen_t, flags: c_int) -> c_int {
    loop {
        // SAFETY: null address arguments are allowed by accept4.
        let conn = unsafe { crate::real::accept4()(fd, std::ptr::null_mut(), std::ptr::null_mut(), flags) };
        if conn < 0 {
            return conn;
        }
        let mut header = [0u8; dvk_protocol::stream::ACCEPT_HEADER_LEN];
        let decoded = raw::read_exact_within(conn, &mut header, HEADER_TIMEOUT_MS)
            .ok()
            .and_then(|_| dvk_protocol::stream::AcceptHeader::decode(&header));
        match decoded {
            Some(h) => {
                let entry =
                    Entry { nodelay: listener.nodelay, ..Entry::new(Kind::Stream, listener.family, h.local, h.peer) };
                fdtable::record(conn, entry);
                // SAFETY: forwarded from the program's accept call.
                unsafe { write_address(h.peer, listener.family, V6Form::Mapped, addr, len) };
                return conn;
            }
            // Not from the agent (or it gave up): drop it and wait for the next one.
            None => raw::close(conn),
        }
    }
}
