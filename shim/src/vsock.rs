//! Virtual sockets (DESIGN §4). A virtual socket is a real AF_UNIX stream
//! socket to the local agent, put at the fd number the program holds, so
//! read/write/poll/epoll/shutdown/close work natively. Only calls that involve
//! addresses need us: connect, listen, accept, get{sock,peer}name, {get,set}sockopt.
//!
//! Which fds are virtual, and their virtual addresses, live in a lock-free
//! table indexed by fd. An entry also records the socket's inode, so an entry
//! left behind by a close()d fd is recognised as stale (we do not hook close).

use crate::{identity, link, raw};
use libc::{c_int, sockaddr, socklen_t};
use pidvirt::endpoint::is_virtual_ip;
use pidvirt::VirtualAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const TABLE_SIZE: usize = 1 << 16;
/// How long accept() waits for the header the agent sends on every new connection.
const HEADER_TIMEOUT_MS: c_int = 2000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Listener,
    Stream,
}

/// The address family the program created the socket with; answers use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

#[derive(Clone, Copy, Debug)]
pub struct VirtualSocket {
    pub kind: Kind,
    pub family: Family,
    pub local: VirtualAddr,
    pub peer: VirtualAddr,
}

struct Slot {
    /// Socket inode + 1 (0: empty).
    ino: AtomicU64,
    local: AtomicU64,
    peer: AtomicU64,
    meta: AtomicU32,
}

#[allow(clippy::declare_interior_mutable_const)] // a template for the array below, never used by reference
const EMPTY: Slot = Slot { ino: AtomicU64::new(0), local: AtomicU64::new(0), peer: AtomicU64::new(0), meta: AtomicU32::new(0) };
static TABLE: [Slot; TABLE_SIZE] = [EMPTY; TABLE_SIZE];

fn pack(a: VirtualAddr) -> u64 {
    (u32::from_be_bytes(a.ip) as u64) << 16 | a.port as u64
}

fn unpack(v: u64) -> VirtualAddr {
    VirtualAddr { ip: ((v >> 16) as u32).to_be_bytes(), port: v as u16 }
}

fn record(fd: c_int, sock: VirtualSocket) {
    let Some(slot) = usize::try_from(fd).ok().and_then(|i| TABLE.get(i)) else { return };
    let Some(ino) = raw::socket_inode(fd) else { return };
    let meta = match sock.kind {
        Kind::Listener => 1,
        Kind::Stream => 2,
    } | match sock.family {
        Family::V4 => 0,
        Family::V6 => 0x100,
    };
    slot.ino.store(0, Ordering::Release);
    slot.local.store(pack(sock.local), Ordering::Relaxed);
    slot.peer.store(pack(sock.peer), Ordering::Relaxed);
    slot.meta.store(meta, Ordering::Relaxed);
    slot.ino.store(ino + 1, Ordering::Release);
}

/// The virtual socket at `fd`, if it is one (and still the same open socket).
pub fn lookup(fd: c_int) -> Option<VirtualSocket> {
    let slot = usize::try_from(fd).ok().and_then(|i| TABLE.get(i))?;
    let ino = slot.ino.load(Ordering::Acquire);
    if ino == 0 || raw::socket_inode(fd)? + 1 != ino {
        return None;
    }
    let meta = slot.meta.load(Ordering::Relaxed);
    Some(VirtualSocket {
        kind: if meta & 0xff == 1 { Kind::Listener } else { Kind::Stream },
        family: if meta & 0x100 != 0 { Family::V6 } else { Family::V4 },
        local: unpack(slot.local.load(Ordering::Relaxed)),
        peer: unpack(slot.peer.load(Ordering::Relaxed)),
    })
}

/// A virtual target address in a sockaddr the program passed (AF_INET, or AF_INET6
/// v4-mapped), or None for every other address.
///
/// # Safety
/// `addr` must point to `len` readable bytes (as connect(2) requires).
pub unsafe fn virtual_target(addr: *const sockaddr, len: socklen_t) -> Option<(VirtualAddr, Family)> {
    if addr.is_null() || (len as usize) < std::mem::size_of::<libc::sa_family_t>() {
        return None;
    }
    // SAFETY: the caller guarantees len readable bytes; each read below checks the size first.
    unsafe {
        match (*addr).sa_family as c_int {
            libc::AF_INET if len as usize >= std::mem::size_of::<libc::sockaddr_in>() => {
                let sin = &*(addr as *const libc::sockaddr_in);
                let ip = sin.sin_addr.s_addr.to_ne_bytes();
                is_virtual_ip(ip).then(|| (VirtualAddr { ip, port: u16::from_be(sin.sin_port) }, Family::V4))
            }
            libc::AF_INET6 if len as usize >= std::mem::size_of::<libc::sockaddr_in6>() => {
                let sin6 = &*(addr as *const libc::sockaddr_in6);
                let b = sin6.sin6_addr.s6_addr;
                let mapped = b[..10].iter().all(|x| *x == 0) && b[10] == 0xff && b[11] == 0xff;
                let ip = [b[12], b[13], b[14], b[15]];
                (mapped && is_virtual_ip(ip))
                    .then(|| (VirtualAddr { ip, port: u16::from_be(sin6.sin6_port) }, Family::V6))
            }
            _ => None,
        }
    }
}

/// Writes `a` as the program's family into (addr, len) with the truncation rules of
/// getsockname(2): copies at most *len bytes, sets *len to the full size.
///
/// # Safety
/// `addr`/`len` as the program passed them to a socket call: null, or valid for *len bytes.
pub unsafe fn write_address(a: VirtualAddr, family: Family, addr: *mut sockaddr, len: *mut socklen_t) {
    if addr.is_null() || len.is_null() {
        return;
    }
    // SAFETY: sockaddr_in6 is plain old data; all-zero is valid.
    let mut sin6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let (src, size) = match family {
        Family::V4 => {
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port.to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip);
            (&sin as *const _ as *const u8, std::mem::size_of::<libc::sockaddr_in>())
        }
        Family::V6 => {
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port.to_be();
            sin6.sin6_addr.s6_addr[10] = 0xff;
            sin6.sin6_addr.s6_addr[11] = 0xff;
            sin6.sin6_addr.s6_addr[12..].copy_from_slice(&a.ip);
            (&sin6 as *const _ as *const u8, std::mem::size_of::<libc::sockaddr_in6>())
        }
    };
    // SAFETY: the caller guarantees *len writable bytes at addr; we copy no more than that.
    unsafe {
        let n = (*len as usize).min(size);
        std::ptr::copy_nonoverlapping(src, addr as *mut u8, n);
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

/// Installs agent connection `conn` at the program's `fd`, keeping its flags.
fn install(conn: c_int, fd: c_int) -> Result<(), c_int> {
    let status = raw::fcntl_get(fd, libc::F_GETFL)?;
    let cloexec = raw::fcntl_get(fd, libc::F_GETFD)? & libc::FD_CLOEXEC != 0;
    raw::replace_fd(conn, fd, cloexec)?;
    raw::fcntl_set(fd, libc::F_SETFL, status);
    Ok(())
}

/// connect() to a virtual address. Returns connect(2)'s result with errno set.
pub fn connect(fd: c_int, target: VirtualAddr) -> Result<(), c_int> {
    if lookup(fd).is_some() {
        return Err(libc::EISCONN);
    }
    let family = tcp_family(fd).ok_or(libc::EPROTOTYPE)?;
    let nonblocking = raw::fcntl_get(fd, libc::F_GETFL)? & libc::O_NONBLOCK != 0;
    let (conn, local, peer) = link::open_stream(target)?;
    raw::clear_timeouts(conn);
    install(conn, fd)?;
    record(fd, VirtualSocket { kind: Kind::Stream, family, local, peer });
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
pub fn listen(fd: c_int, backlog: c_int) -> Option<Result<(), c_int>> {
    if identity::vpid() == 0 || lookup(fd).is_some() {
        return None;
    }
    let family = tcp_family(fd)?;
    let port = bound_port(fd)?;
    let cfg = link::config()?;
    let path = format!(
        "{}/{}-{}-{}.sock",
        cfg.listener_dir,
        raw::getpid(),
        fd,
        LISTENER_SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let cpath = std::ffi::CString::new(path.clone()).ok()?;
    let mut addr = libc::sockaddr_un { sun_family: libc::AF_UNIX as libc::sa_family_t, sun_path: [0; 108] };
    if path.len() >= addr.sun_path.len() {
        return None;
    }
    for (d, s) in addr.sun_path.iter_mut().zip(path.as_bytes()) {
        *d = *s as libc::c_char;
    }
    let sock = raw::unix_socket().ok()?;
    raw::unlink(&cpath);
    let made = raw::bind_unix(sock, &addr).and_then(|_| {
        // Only our owner (and the agent, root) may connect to the listener.
        raw::chmod(&cpath, 0o600);
        raw::listen(sock, backlog)
    });
    if made.is_err() {
        raw::close(sock);
        raw::unlink(&cpath);
        return None;
    }
    let vip = match link::listen(port, &path) {
        Ok(vip) => vip,
        Err(e) => {
            raw::close(sock);
            raw::unlink(&cpath);
            return match e {
                link::ListenError::Errno(errno) => Some(Err(errno)),
                link::ListenError::NotVirtual => None,
            };
        }
    };
    if let Err(e) = install(sock, fd) {
        raw::unlink(&cpath);
        return Some(Err(e));
    }
    let local = VirtualAddr { ip: vip, port };
    record(fd, VirtualSocket { kind: Kind::Listener, family, local, peer: VirtualAddr::default() });
    Some(Ok(()))
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
pub unsafe fn accept(
    listener: VirtualSocket,
    fd: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
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
                record(conn, VirtualSocket { kind: Kind::Stream, family: listener.family, local: h.local, peer: h.peer });
                // SAFETY: forwarded from the program's accept call.
                unsafe { write_address(h.peer, listener.family, addr, len) };
                return conn;
            }
            // Not from the agent (or it gave up): drop it and wait for the next one.
            None => raw::close(conn),
        }
    }
}
