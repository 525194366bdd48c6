//! Which of the program's fds are virtual sockets, and their virtual addresses.
//!
//! A lock-free table indexed by fd (no allocation, no locks: hooks read it from
//! any thread). Each entry records the socket's inode, so an entry left behind
//! by a close()d fd is recognised as stale and close/dup need no hook; a
//! duplicate (dup, dup2, F_DUPFD) of a virtual socket is found by its inode.

use crate::raw;
use libc::c_int;
use pidvirt::VirtualAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

const TABLE_SIZE: usize = 1 << 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// bind() was recorded but not done: the socket is still a plain, unbound TCP socket.
    Bound,
    Listener,
    Stream,
}

/// The address family the program created the socket with; answers use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    /// IPv6 socket; addresses are v4-mapped, except the wildcard/loopback a program bound to.
    V6,
}

/// How an IPv6 program spelled the address it bound to (so getsockname gives it back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum V6Form {
    Mapped,
    Any,
    Loopback,
}

#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub kind: Kind,
    pub family: Family,
    pub v6_form: V6Form,
    pub local: VirtualAddr,
    pub peer: VirtualAddr,
    /// TCP_NODELAY as the program last set it (read back by getsockopt).
    pub nodelay: bool,
}

impl Entry {
    pub fn new(kind: Kind, family: Family, local: VirtualAddr, peer: VirtualAddr) -> Entry {
        Entry { kind, family, v6_form: V6Form::Mapped, local, peer, nodelay: false }
    }
}

struct Slot {
    /// Socket inode + 1 (0: empty).
    ino: AtomicU64,
    local: AtomicU64,
    peer: AtomicU64,
    meta: AtomicU32,
}

#[allow(clippy::declare_interior_mutable_const)] // a template for the array below, never used by reference
const EMPTY: Slot =
    Slot { ino: AtomicU64::new(0), local: AtomicU64::new(0), peer: AtomicU64::new(0), meta: AtomicU32::new(0) };
static TABLE: [Slot; TABLE_SIZE] = [EMPTY; TABLE_SIZE];
/// One above the highest fd ever recorded: bounds the search for duplicates.
static HIGH_WATER: AtomicUsize = AtomicUsize::new(0);

fn pack(a: VirtualAddr) -> u64 {
    (u32::from_be_bytes(a.ip) as u64) << 16 | a.port as u64
}

fn unpack(v: u64) -> VirtualAddr {
    VirtualAddr { ip: ((v >> 16) as u32).to_be_bytes(), port: v as u16 }
}

fn encode_meta(e: &Entry) -> u32 {
    let kind = match e.kind {
        Kind::Bound => 3,
        Kind::Listener => 1,
        Kind::Stream => 2,
    };
    let family = if e.family == Family::V6 { 1 << 8 } else { 0 };
    let form = match e.v6_form {
        V6Form::Mapped => 0,
        V6Form::Any => 1 << 9,
        V6Form::Loopback => 2 << 9,
    };
    kind | family | form | if e.nodelay { 1 << 16 } else { 0 }
}

fn decode(meta: u32, local: u64, peer: u64) -> Entry {
    Entry {
        kind: match meta & 0xff {
            1 => Kind::Listener,
            3 => Kind::Bound,
            _ => Kind::Stream,
        },
        family: if meta & (1 << 8) != 0 { Family::V6 } else { Family::V4 },
        v6_form: match (meta >> 9) & 3 {
            1 => V6Form::Any,
            2 => V6Form::Loopback,
            _ => V6Form::Mapped,
        },
        local: unpack(local),
        peer: unpack(peer),
        nodelay: meta & (1 << 16) != 0,
    }
}

fn slot(fd: c_int) -> Option<&'static Slot> {
    usize::try_from(fd).ok().and_then(|i| TABLE.get(i))
}

fn store(slot: &Slot, ino: u64, e: &Entry) {
    slot.ino.store(0, Ordering::Release);
    slot.local.store(pack(e.local), Ordering::Relaxed);
    slot.peer.store(pack(e.peer), Ordering::Relaxed);
    slot.meta.store(encode_meta(e), Ordering::Relaxed);
    slot.ino.store(ino + 1, Ordering::Release);
}

/// Records `fd` (which must be open) as `entry`.
pub fn record(fd: c_int, entry: Entry) {
    let (Some(slot), Some(ino)) = (slot(fd), raw::socket_inode(fd)) else { return };
    store(slot, ino, &entry);
    HIGH_WATER.fetch_max(fd as usize + 1, Ordering::Relaxed);
}

/// Forgets `fd` (it stopped being virtual, e.g. a recorded bind was carried out).
pub fn forget(fd: c_int) {
    if let Some(slot) = slot(fd) {
        slot.ino.store(0, Ordering::Release);
    }
}

/// The entry for `fd`, if it is (a duplicate of) a virtual socket still open.
///
/// After a restore on another node every socket has a new inode, so every entry looks
/// stale until the shim reads the Relink frame ([`crate::relink::check`]): a miss looks
/// again once after that check (one more fstat, on the miss paths only).
pub fn lookup(fd: c_int) -> Option<Entry> {
    let own = slot(fd)?;
    let ino = raw::socket_inode(fd)? + 1;
    let read = |s: &Slot| {
        let e = decode(s.meta.load(Ordering::Relaxed), s.local.load(Ordering::Relaxed), s.peer.load(Ordering::Relaxed));
        (s.ino.load(Ordering::Acquire) == ino).then_some(e)
    };
    let stored = own.ino.load(Ordering::Acquire);
    if stored == ino {
        return read(own);
    }
    let stale = stored != 0;
    if stale {
        // Stale: the fd was closed and its number reused, or the process was restored.
        crate::relink::check();
        if own.ino.load(Ordering::Acquire) == ino {
            return read(own);
        }
    }
    // Not recorded under this number: a duplicate of a virtual socket is an AF_UNIX
    // socket whose inode some entry holds. Real TCP/UDP sockets stop here.
    if raw::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN).ok()? != libc::AF_UNIX {
        return None;
    }
    let scan = || {
        let high = HIGH_WATER.load(Ordering::Relaxed);
        TABLE[..high.min(TABLE_SIZE)].iter().find_map(read)
    };
    // A duplicate never looked up before a restore has no entry of its own: the entry
    // it duplicates gets its new inode from the Relink frame.
    let found = match scan() {
        Some(e) => e,
        None if !stale && crate::relink::check() => scan()?,
        None => return None,
    };
    store(own, ino - 1, &found);
    HIGH_WATER.fetch_max(fd as usize + 1, Ordering::Relaxed);
    Some(found)
}

/// After a restore: the socket at `fd` had inode `old` and now has inode `new`. Only
/// the entry of `fd` itself changes, and only if it holds `old` (a duplicate gets its
/// own record). Allocation- and lock-free.
pub fn relink(fd: c_int, old: u64, new: u64) -> bool {
    let Some(s) = slot(fd) else { return false };
    let (Some(old1), Some(new1)) = (old.checked_add(1), new.checked_add(1)) else { return false };
    s.ino.compare_exchange(old1, new1, Ordering::AcqRel, Ordering::Relaxed).is_ok()
}

/// Updates the TCP_NODELAY flag of a recorded virtual socket.
pub fn set_nodelay(fd: c_int, on: bool) {
    if let Some(s) = slot(fd) {
        let bit = 1 << 16;
        if on {
            s.meta.fetch_or(bit, Ordering::Relaxed);
        } else {
            s.meta.fetch_and(!bit, Ordering::Relaxed);
        }
    }
}
