//! Following a restore on another node (docs/MOVE.md, "The shim after a restore").
//!
//! A moved process resumes with new sockets at its old fd numbers: its agent link,
//! its virtual listeners and streams. The destination agent queues a Relink frame
//! (`dvk_protocol::relink`) on the new link before the process resumes. [`check`]
//! notices the link's inode changed (one fstat), reads the frame, gives every fd-table
//! entry its new inode and switches the agent socket path (and with it the listener
//! directory) that later requests use.
//!
//! Called before every agent request, where an fd-table entry looks stale, and before the
//! table of children is used (the wait family, kill), from any thread and from signal
//! handlers: allocation-free, async-signal-safe,
//! errno-preserving, and lock-free for readers. Relinks are serialised by a try-lock
//! holding the owner's thread id: another thread waits (bounded) for the owner, a
//! signal handler that interrupted the owner on its own thread goes on without.

use crate::{fdtable, link, raw};
use dvk_protocol::relink::{self as proto, HEADER_LEN, MAGIC, RECORD_LEN};
use libc::c_int;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

/// How long the shim waits for the frame (it is queued before the process resumes).
const FRAME_TIMEOUT_MS: c_int = 1000;
/// Records read per recv (stack buffer of 32 × 20 bytes).
const CHUNK_RECORDS: usize = 32;
/// A thread that finds another one relinking yields this many times…
const WAIT_YIELDS: u32 = 100;
/// …then sleeps 1 ms at a time, this many times: longer than an owner can hold the lock
/// (two reads of at most FRAME_TIMEOUT_MS each). An owner still holding it after that
/// has left its relink for good (a signal handler that longjmp'ed out of it): taken over.
const WAIT_SLEEPS: u32 = 3 * FRAME_TIMEOUT_MS as u32;

/// The agent link (-1: none) and its socket inode when we last looked.
static LINK_FD: AtomicI32 = AtomicI32::new(-1);
static LINK_INO: AtomicU64 = AtomicU64::new(0);
/// Thread id of the thread relinking; 0: none (the try-lock).
static OWNER: AtomicI32 = AtomicI32::new(0);

/// Remembers the agent link just registered on (and its inode).
pub fn remember_link(fd: c_int) {
    LINK_INO.store(raw::socket_inode(fd).unwrap_or(0), Ordering::Release);
    LINK_FD.store(fd, Ordering::Release);
}

/// No agent link any more (forked child before it registers).
pub fn forget_link() {
    LINK_FD.store(-1, Ordering::Release);
    LINK_INO.store(0, Ordering::Release);
}

/// The link fd and its current inode, if that inode is not the one we know.
fn link_changed() -> Option<(c_int, u64)> {
    let fd = LINK_FD.load(Ordering::Acquire);
    if fd < 0 {
        return None;
    }
    let ino = raw::socket_inode(fd)?;
    (ino != LINK_INO.load(Ordering::Acquire)).then_some((fd, ino))
}

/// Follows a restore if there was one. True if a relink was applied (by this thread,
/// or by another one it waited for): a caller that missed an fd-table entry may look
/// again. Costs one fstat when nothing happened. Preserves errno.
pub fn check() -> bool {
    raw::preserving_errno(|| {
        if link_changed().is_none() {
            return false;
        }
        let me = raw::gettid();
        match OWNER.compare_exchange(0, me, Ordering::Acquire, Ordering::Acquire) {
            Ok(_) => relink_owned(me),
            // A signal handler that interrupted our own relink: go on without.
            Err(owner) if owner == me => false,
            Err(_) => wait_for_owner(me),
        }
    })
}

/// Runs the relink as lock owner `me` and releases the lock.
fn relink_owned(me: c_int) -> bool {
    let done = relink_locked();
    let _ = OWNER.compare_exchange(me, 0, Ordering::Release, Ordering::Relaxed);
    done
}

fn wait_for_owner(me: c_int) -> bool {
    let mut owner = OWNER.load(Ordering::Acquire);
    for i in 0..WAIT_YIELDS + WAIT_SLEEPS {
        owner = OWNER.load(Ordering::Acquire);
        if owner == 0 {
            return true;
        }
        if i < WAIT_YIELDS {
            raw::sched_yield();
        } else {
            raw::sleep_ms(1);
        }
    }
    // The owner cannot still be working: take the lock over.
    if OWNER.compare_exchange(owner, me, Ordering::Acquire, Ordering::Acquire).is_ok() {
        return relink_owned(me);
    }
    true
}

/// With the lock held: reads the Relink frame from the link and applies it.
fn relink_locked() -> bool {
    // Another thread may have finished while we took the lock.
    let Some((fd, ino)) = link_changed() else { return true };
    let is_frame = raw::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN) == Ok(libc::AF_UNIX) && {
        let mut magic = [0u8; 4];
        raw::peek_within(fd, &mut magic, FRAME_TIMEOUT_MS).is_ok() && magic == MAGIC
    };
    if !is_frame {
        // Not a restored link: the program put a socket of its own at the link's number
        // (its bytes were only peeked). Known from now on; never looked at again.
        LINK_INO.store(ino, Ordering::Release);
        return false;
    }
    let mut budget = FRAME_TIMEOUT_MS;
    let mut header = [0u8; HEADER_LEN];
    let decoded =
        raw::read_exact_budget(fd, &mut header, &mut budget).ok().and_then(|_| proto::decode_header(&header).ok());
    if let Some((count, path)) = decoded {
        let mut left = count as usize;
        let mut chunk = [0u8; CHUNK_RECORDS * RECORD_LEN];
        while left > 0 {
            let n = left.min(CHUNK_RECORDS);
            let Some(bytes) = chunk.get_mut(..n * RECORD_LEN) else { break };
            if raw::read_exact_budget(fd, bytes, &mut budget).is_err() {
                break;
            }
            apply_records(bytes);
            left -= n;
        }
        link::switch_agent_path(&path);
    }
    LINK_INO.store(ino, Ordering::Release);
    decoded.is_some()
}

/// Gives the fd-table entries in `bytes` (whole records) their new inodes, and children
/// restored under other real pids their new pids.
fn apply_records(bytes: &[u8]) {
    for record in bytes.chunks_exact(RECORD_LEN) {
        if let Ok(record) = <&[u8; RECORD_LEN]>::try_from(record) {
            let r = proto::decode_record(record);
            match r.as_child_pid() {
                Some((old, new)) => crate::children::remap(old, new),
                None if r.fd >= 0 => {
                    fdtable::relink(r.fd, r.old_ino, r.new_ino);
                }
                None => {}
            }
        }
    }
}

/// In the child of fork(), before it drops the inherited link: if the parent had a relink
/// pending (restored between reserving the child's vPID and forking), the child holds the
/// same new sockets and needs the same relink. It peeks at the frame (the parent reads it
/// later), applies it to its own copy of the table and path, then forgets the link.
pub fn after_fork_child() {
    raw::preserving_errno(|| {
        // The fork may have cut another thread's relink short: it will never finish here.
        OWNER.store(0, Ordering::Release);
        link::settle_path_after_fork();
        if let Some((fd, _)) = link_changed() {
            relink_by_peek(fd);
        }
        forget_link();
    })
}

fn relink_by_peek(fd: c_int) {
    // The frame is either queued whole, or being read by the parent: no waiting.
    let mut header = [0u8; HEADER_LEN];
    if raw::peek_within(fd, &mut header, 0).is_err() {
        return;
    }
    let Ok((count, path)) = proto::decode_header(&header) else { return };
    if count > 0 {
        // Peeking always starts at the frame's first byte: the whole frame in one buffer
        // (up to 20 KiB), from mmap rather than malloc or the stack.
        let len = HEADER_LEN + count as usize * RECORD_LEN;
        let peeked = raw::with_pages(len, |frame| {
            let ok = raw::peek_within(fd, frame, 0).is_ok();
            if ok {
                apply_records(frame.get(HEADER_LEN..).unwrap_or(&[]));
            }
            ok
        });
        if peeked != Some(true) {
            return;
        }
    }
    link::switch_agent_path(&path);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fdtable::{Entry, Family, Kind};
    use dvk_protocol::relink::{encode, path_bytes, RelinkRecord};
    use pidvirt::VirtualAddr;
    use std::sync::Mutex;

    /// The relink state, the fd table and the agent path are process-wide.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn pair() -> (c_int, c_int) {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid array of two ints.
        assert_eq!(
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) },
            0
        );
        (fds[0], fds[1])
    }

    fn ino(fd: c_int) -> u64 {
        raw::socket_inode(fd).unwrap()
    }

    /// Puts a new socket at `fd` (as the restore does); returns the new inode.
    fn replace(fd: c_int, new: c_int) -> u64 {
        // SAFETY: dup2 takes integers.
        assert_eq!(unsafe { libc::dup2(new, fd) }, fd);
        raw::close(new);
        ino(fd)
    }

    fn write(fd: c_int, bytes: &[u8]) {
        raw::write_all(fd, bytes).unwrap();
    }

    fn queued(fd: c_int) -> Vec<u8> {
        let mut buf = [0u8; 64];
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), libc::MSG_DONTWAIT) };
        buf[..n.max(0) as usize].to_vec()
    }

    fn addr(ip: [u8; 4], port: u16) -> VirtualAddr {
        VirtualAddr { ip, port }
    }

    fn set_path(path: &[u8]) {
        let mut p = [0u8; proto::PATH_LEN];
        p[..path.len()].copy_from_slice(path);
        link::switch_agent_path(&p);
    }

    #[test]
    fn a_restored_process_follows_the_relink_frame() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let original_path = link::current_path();
        set_path(b"/tmp/x/node1/agent.sock");

        let (link_fd, _agent1) = pair();
        remember_link(link_fd);
        let (stream, _s_peer) = pair();
        let (listener, _l_peer) = pair();
        // SAFETY: dup takes an integer.
        let dup = unsafe { libc::dup(stream) };
        let stream_entry =
            Entry::new(Kind::Stream, Family::V4, addr([127, 77, 0, 1], 40000), addr([127, 77, 0, 2], 80));
        let listener_entry = Entry::new(Kind::Listener, Family::V6, addr([127, 77, 0, 1], 80), VirtualAddr::default());
        fdtable::record(stream, stream_entry);
        fdtable::record(listener, listener_entry);
        assert_eq!(fdtable::lookup(dup).unwrap().peer, stream_entry.peer); // the dup gets its own entry
        assert!(!check(), "nothing was restored");

        // The restore: new sockets at the same numbers (the dup a separate one, as a
        // restore that does not keep sharing would make), the frame queued on the new link.
        let old = [ino(stream), ino(listener), ino(dup)];
        let new_stream = replace(stream, pair().0);
        let new_listener = replace(listener, pair().0);
        let new_dup = replace(dup, pair().0);
        let (new_link, agent2) = pair();
        replace(link_fd, new_link);
        let records = [
            RelinkRecord { fd: stream, old_ino: old[0], new_ino: new_stream },
            RelinkRecord { fd: listener, old_ino: old[1], new_ino: new_listener },
            RelinkRecord { fd: dup, old_ino: old[2], new_ino: new_dup },
        ];
        write(agent2, &encode(b"/tmp/x/node2/agent.sock", &records).unwrap());
        write(agent2, b"after"); // anything later on the link is not the shim's to read

        // A stale-looking entry triggers the relink; errno is kept.
        raw::set_errno(libc::EDOM);
        let e = fdtable::lookup(stream).expect("the stream follows");
        assert_eq!(raw::errno(), libc::EDOM);
        assert_eq!((e.kind, e.local, e.peer), (Kind::Stream, stream_entry.local, stream_entry.peer));
        let l = fdtable::lookup(listener).expect("the listener follows");
        assert_eq!((l.kind, l.family, l.local), (Kind::Listener, Family::V6, listener_entry.local));
        assert_eq!(fdtable::lookup(dup).unwrap().peer, stream_entry.peer);
        assert_eq!(path_bytes(&link::current_path()), b"/tmp/x/node2/agent.sock");
        assert_eq!(link::listener_dir().as_deref(), Some("/tmp/x/node2/ep"));
        assert_eq!(queued(link_fd), b"after");
        assert!(!check(), "relinked once");

        for fd in [stream, listener, dup, link_fd] {
            fdtable::forget(fd);
            raw::close(fd);
        }
        forget_link();
        link::switch_agent_path(&original_path);
    }

    #[test]
    fn children_restored_under_new_pids_keep_their_vpids() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let original_path = link::current_path();
        let (link_fd, _agent1) = pair();
        remember_link(link_fd);
        // Two children known by vPID; one of them restored under another real pid, one not.
        let (moved, stays) = ((4_900_001, 31_001), (4_900_002, 31_002));
        assert!(crate::children::record(moved.0, moved.1) && crate::children::record(stays.0, stays.1));
        let (new_link, agent2) = pair();
        replace(link_fd, new_link);
        let records = [RelinkRecord::child_pid(moved.1, 32_001), RelinkRecord { fd: -2, old_ino: 0, new_ino: 9 }];
        write(agent2, &encode(b"/tmp/z/agent.sock", &records).unwrap());
        assert!(check());
        assert_eq!(crate::children::real_of(moved.0), Some(32_001));
        assert_eq!(crate::children::vpid_of(32_001), Some(moved.0));
        assert_eq!(crate::children::vpid_of(moved.1), None, "the old pid is nobody's now");
        assert_eq!(crate::children::real_of(stays.0), Some(stays.1), "a record that maps nothing is ignored");
        crate::children::forget(32_001);
        crate::children::forget(stays.1);
        link::switch_agent_path(&original_path);
        raw::close(link_fd);
        forget_link();
    }

    #[test]
    fn a_program_socket_at_the_link_number_is_not_read() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let original_path = link::current_path();
        let (link_fd, _agent) = pair();
        remember_link(link_fd);
        let (mine, peer) = pair();
        replace(link_fd, mine);
        write(peer, b"program data");
        assert!(!check());
        assert!(!check(), "adopted: no second look");
        assert_eq!(queued(link_fd), b"program data");
        assert_eq!(link::current_path(), original_path);
        raw::close(link_fd);
        forget_link();
    }

    #[test]
    fn a_signal_handler_inside_our_own_relink_goes_on_without() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let (link_fd, _agent) = pair();
        remember_link(link_fd);
        let (new_link, agent2) = pair();
        replace(link_fd, new_link);
        write(agent2, &encode(b"/tmp/y/agent.sock", &[]).unwrap());
        let original_path = link::current_path();
        // As if this thread were interrupted in the middle of its relink.
        OWNER.store(raw::gettid(), Ordering::Release);
        assert!(!check());
        assert_eq!(link::current_path(), original_path);
        OWNER.store(0, Ordering::Release);
        assert!(check());
        assert_eq!(path_bytes(&link::current_path()), b"/tmp/y/agent.sock");
        link::switch_agent_path(&original_path);
        raw::close(link_fd);
        forget_link();
    }

    #[test]
    fn another_thread_waits_for_the_relink_in_progress() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let original_path = link::current_path();
        let (link_fd, _agent) = pair();
        remember_link(link_fd);
        let (new_link, agent2) = pair();
        replace(link_fd, new_link);
        write(agent2, &encode(b"/tmp/w/agent.sock", &[]).unwrap());
        OWNER.store(1, Ordering::Release); // some other thread is relinking
        let started = std::time::Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(std::time::Duration::from_millis(50));
                OWNER.store(0, Ordering::Release);
            });
            assert!(check(), "waited for the owner");
        });
        assert!(started.elapsed() >= std::time::Duration::from_millis(50));
        assert!(check(), "then relinks (the fake owner did not)");
        assert_eq!(path_bytes(&link::current_path()), b"/tmp/w/agent.sock");
        link::switch_agent_path(&original_path);
        raw::close(link_fd);
        forget_link();
    }

    #[test]
    fn a_forked_child_peeks_and_leaves_the_frame_to_its_parent() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let original_path = link::current_path();
        let (link_fd, _agent) = pair();
        remember_link(link_fd);
        let (stream, _peer) = pair();
        let entry = Entry::new(Kind::Stream, Family::V4, addr([127, 77, 0, 9], 1), addr([127, 77, 0, 8], 2));
        fdtable::record(stream, entry);
        let old = ino(stream);
        let new = replace(stream, pair().0);
        let (new_link, agent2) = pair();
        replace(link_fd, new_link);
        let frame = encode(b"/tmp/z/agent.sock", &[RelinkRecord { fd: stream, old_ino: old, new_ino: new }]).unwrap();
        write(agent2, &frame);
        // What the child's after-fork handler does (run here, in the "child").
        after_fork_child();
        assert_eq!(fdtable::lookup(stream).unwrap().peer, entry.peer);
        assert_eq!(path_bytes(&link::current_path()), b"/tmp/z/agent.sock");
        let mut left = vec![0u8; frame.len()];
        raw::read_exact_within(link_fd, &mut left, 100).unwrap();
        assert_eq!(left, frame, "the frame is still there for the parent");
        assert_eq!(LINK_FD.load(Ordering::Acquire), -1);
        fdtable::forget(stream);
        raw::close(stream);
        raw::close(link_fd);
        link::switch_agent_path(&original_path);
    }

    #[test]
    fn readers_never_see_a_torn_path() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let original_path = link::current_path();
        let a = [b'a'; 100];
        let b = [b'b'; 107];
        set_path(&a);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        let p = link::current_path();
                        let got = path_bytes(&p);
                        assert!(got == &a[..] || got == &b[..], "torn: {:?}", String::from_utf8_lossy(got));
                    }
                });
            }
            for i in 0..20000 {
                set_path(if i % 2 == 0 { &b } else { &a });
            }
            stop.store(true, Ordering::Relaxed);
        });
        link::switch_agent_path(&original_path);
    }
}
