//! The process's link to its node agent: registration (at load and in every
//! forked child) and one-shot requests such as kill(vpid).
//!
//! The Register frame is encoded once at load time and kept, so a forked child
//! re-registers without allocating; one-shot requests encode into stack buffers.
//!
//! Every request first asks [`relink::check`] whether the process was restored on
//! another node (one fstat of the link), and connects to the agent socket path
//! current at that moment.

use crate::{raw, relink};
use dvk_protocol::frame::{self, HEADER_LEN};
use dvk_protocol::local::{LocalRequest, LocalResponse, LOCAL_PROTOCOL_VERSION};
use dvk_protocol::relink::{self as relink_proto, PATH_LEN};
use libc::c_int;
use pidvirt::{VirtualAddr, Vpid};
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;

/// How long the shim waits for its agent (to accept, then to answer) before giving up on a
/// request. A healthy agent answers in well under a millisecond; this only bounds how long
/// a stalled one holds up a starting program or a fork.
pub const AGENT_TIMEOUT_MS: i64 = 1000;
/// After a request timed out, further requests of this process (and of the children it
/// forks meanwhile) fail at once for this long instead of waiting again: a fork loop
/// against a stalled agent costs one timeout, not one (or two) per fork.
const STALL_BACKOFF_MS: u64 = 10_000;
/// The agent link is moved to the first free fd at or above this.
const LINK_FD_MIN: c_int = 900;
/// Largest response the shim reads (bigger ones are only possible for errors).
const RESPONSE_MAX: usize = 512;

pub struct LinkConfig {
    pub register_frame: Vec<u8>,
}

static CONFIG: OnceLock<LinkConfig> = OnceLock::new();

pub fn configure(socket_path: &[u8], dc: String, endpoint: Option<String>) -> Result<(), &'static str> {
    if socket_path.is_empty() || socket_path.len() >= PATH_LEN || socket_path.contains(&0) {
        return Err("DVK_AGENT_SOCK is empty or longer than a unix socket path can be");
    }
    // A relative path would be resolved against whatever directory the program is in at
    // each request, and the listener directory next to it would be relative too: the agent
    // refuses such a listener and the server ends up on a real port. Refused here, loudly.
    if socket_path[0] != b'/' {
        return Err("DVK_AGENT_SOCK must be an absolute path");
    }
    let request = LocalRequest::Register { version: LOCAL_PROTOCOL_VERSION, dc, endpoint };
    let register_frame =
        frame::encode(&request, frame::LOCAL_MAX_FRAME).map_err(|_| "cannot encode the registration")?;
    let mut path = [0u8; PATH_LEN];
    path[..socket_path.len()].copy_from_slice(socket_path);
    // Before CONFIG is set, no request reads the path.
    AGENT_PATH.write(&path);
    CONFIG.set(LinkConfig { register_frame }).map_err(|_| "configured twice")
}

pub fn config() -> Option<&'static LinkConfig> {
    CONFIG.get()
}

// ---------------------------------------------------------------------------
// The agent socket path. It changes when the process is restored on another node
// (crate::relink switches it), while any thread, or a signal handler, may be about to
// connect: so it is read without locks, through a latch.
//
// Why a latch (a seqlock over two copies) rather than one seqlock or a ring of configs
// behind an atomic index: a plain seqlock's reader spins while the writer is inside,
// which never ends for a signal handler that interrupted the writer on its own thread;
// a ring of N immutable configs is torn once N moves happen while a reader is preempted.
// With the latch the writer updates the two copies one after the other and the counter
// tells readers which copy is not being written: a reader never waits for the writer,
// and retries only if a whole step of a write completed while it was copying (a write
// happens once per move, so retries are rare; never capped, since giving up would
// return a torn path). Copies are AtomicU64 words, so a torn read is merely detected
// and retried, never a data race.

/// `sun_path` bytes in 64-bit words (14 × 8 = 112 ≥ 108).
const PATH_WORDS: usize = PATH_LEN.div_ceil(8);

struct PathLatch {
    /// Even: readers use copy 0; odd: copy 1. The writer bumps it before each copy it writes.
    seq: AtomicU32,
    copies: [[AtomicU64; PATH_WORDS]; 2],
}

#[allow(clippy::declare_interior_mutable_const)] // templates for the static below, never used by reference
const ZERO_WORD: AtomicU64 = AtomicU64::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const ZERO_COPY: [AtomicU64; PATH_WORDS] = [ZERO_WORD; PATH_WORDS];
static AGENT_PATH: PathLatch = PathLatch { seq: AtomicU32::new(0), copies: [ZERO_COPY; 2] };

impl PathLatch {
    fn store_copy(&self, copy: usize, path: &[u8; PATH_LEN]) {
        for (i, word) in self.copies[copy].iter().enumerate() {
            let mut w = [0u8; 8];
            for (j, b) in w.iter_mut().enumerate() {
                *b = path.get(i * 8 + j).copied().unwrap_or(0);
            }
            word.store(u64::from_le_bytes(w), Ordering::Relaxed);
        }
    }

    fn load_copy(&self, copy: usize) -> [u8; PATH_LEN] {
        let mut path = [0u8; PATH_LEN];
        for (i, word) in self.copies[copy].iter().enumerate() {
            for (j, b) in word.load(Ordering::Relaxed).to_le_bytes().into_iter().enumerate() {
                if let Some(out) = path.get_mut(i * 8 + j) {
                    *out = b;
                }
            }
        }
        path
    }

    /// Writers are serialised by the caller (load time, or the relink lock).
    fn write(&self, path: &[u8; PATH_LEN]) {
        let mut seq = self.seq.load(Ordering::Relaxed);
        // Two bumps: odd while copy 0 is written (readers use copy 1), even again while
        // copy 1 is written (readers use copy 0, already new).
        for copy in [0, 1] {
            seq = seq.wrapping_add(1);
            self.seq.store(seq, Ordering::Release);
            fence(Ordering::Release);
            self.store_copy(copy, path);
        }
    }

    fn read(&self) -> [u8; PATH_LEN] {
        // A retry means a write step completed while we copied: the writer made progress,
        // so this never spins on a writer that is stopped (a signal handler that
        // interrupted it on its own thread reads the copy it is not writing, at once).
        // No bound: giving up would hand out a torn path; writes happen once per move.
        loop {
            let before = self.seq.load(Ordering::Acquire);
            let path = self.load_copy(before as usize & 1);
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == before {
                return path;
            }
            std::hint::spin_loop();
        }
    }

    /// In a forked child (one thread, no writer): a write the fork cut short (another
    /// thread of the parent was relinking) would never finish. Settle on the copy
    /// readers use now, in both copies, with an even counter.
    fn settle_after_fork(&self) {
        let seq = self.seq.load(Ordering::Relaxed);
        let path = self.load_copy(seq as usize & 1);
        self.store_copy(0, &path);
        self.store_copy(1, &path);
        self.seq.store(seq.wrapping_add(seq & 1), Ordering::Release);
    }
}

/// The agent socket path requests use now (NUL padded). Lock-free, async-signal-safe.
pub fn current_path() -> [u8; PATH_LEN] {
    AGENT_PATH.read()
}

/// Switches every later request to the agent at `path` (NUL padded, at least one NUL).
/// Only crate::relink calls it, holding the relink lock.
pub(crate) fn switch_agent_path(path: &[u8; PATH_LEN]) {
    AGENT_PATH.write(path);
}

pub(crate) fn settle_path_after_fork() {
    AGENT_PATH.settle_after_fork();
}

/// The address of the agent for a request about to be made: first follows a restore on
/// another node if there was one (crate::relink). Allocation-free, async-signal-safe.
fn agent_addr() -> libc::sockaddr_un {
    relink::check();
    let path = current_path();
    let mut addr = libc::sockaddr_un { sun_family: libc::AF_UNIX as libc::sa_family_t, sun_path: [0; PATH_LEN] };
    for (dst, src) in addr.sun_path.iter_mut().zip(path.iter()) {
        *dst = *src as libc::c_char;
    }
    addr
}

/// Where virtual listeners are created now: `<agent socket dir>/ep`. None before configure.
pub fn listener_dir() -> Option<String> {
    config()?;
    relink::check();
    let path = current_path();
    Some(listener_dir_of(relink_proto::path_bytes(&path)))
}

fn listener_dir_of(socket_path: &[u8]) -> String {
    let display = String::from_utf8_lossy(socket_path);
    match display.rsplit_once('/') {
        Some((dir, _)) if !dir.is_empty() => format!("{dir}/ep"),
        Some(_) => "/ep".to_owned(),
        None => "ep".to_owned(),
    }
}

// ---------------------------------------------------------------------------
// A stalled agent (it accepts, or queues, connections but does not answer): after one
// timeout the process stops asking for STALL_BACKOFF_MS and says so once.

/// CLOCK_MONOTONIC milliseconds until which requests are not made (0: none).
static STALLED_UNTIL_MS: AtomicU64 = AtomicU64::new(0);
/// The stall warning was printed (by this process, or by the parent it was forked from).
static STALL_WARNED: AtomicBool = AtomicBool::new(false);

fn is_timeout(errno: c_int) -> bool {
    errno == libc::EAGAIN || errno == libc::EWOULDBLOCK || errno == libc::ETIMEDOUT
}

/// Whether requests are being skipped because the agent stalled a moment ago.
fn stalled() -> bool {
    let until = STALLED_UNTIL_MS.load(Ordering::Relaxed);
    until != 0 && raw::monotonic_ms() < until
}

/// Records the outcome of a request that failed with `errno`: a timeout starts the
/// back-off and, the first time, warns (a registered process only: an unregistered one is
/// at load time, where register_or_warn says why it runs without vPIDs).
fn note_failure(errno: c_int) {
    if !is_timeout(errno) {
        return;
    }
    STALLED_UNTIL_MS.store(raw::monotonic_ms() + STALL_BACKOFF_MS, Ordering::Relaxed);
    if crate::identity::vpid() != 0 && !STALL_WARNED.swap(true, Ordering::Relaxed) {
        let path = current_path();
        crate::warn_parts(&[
            b"dvk: the agent at ",
            relink_proto::path_bytes(&path),
            b" did not answer within 1 s; children forked meanwhile keep real PIDs \
              (the agent is asked again in 10 s)\n",
        ]);
    }
}

/// A connection to the agent for one request, or the errno: ETIMEDOUT at once while the
/// agent counts as stalled. Allocation-free, async-signal-safe.
fn connect_agent() -> Result<c_int, c_int> {
    if stalled() {
        return Err(libc::ETIMEDOUT);
    }
    raw::connect_unix(&agent_addr(), AGENT_TIMEOUT_MS).inspect_err(|e| note_failure(*e))
}

/// [`round_trip`], noting a timeout.
fn exchange<'b>(fd: c_int, request: &[u8], buf: &'b mut [u8; RESPONSE_MAX]) -> Result<&'b [u8], c_int> {
    round_trip(fd, request, buf).inspect_err(|e| note_failure(*e))
}

pub enum RegisterError {
    /// Could not reach the agent (errno).
    Unreachable(c_int),
    /// The agent answered with an error or something unexpected.
    Refused,
}

pub struct Registration {
    pub link_fd: c_int,
    pub vpid: Vpid,
    pub parent: Option<Vpid>,
}

/// Sends one frame and reads one response frame into `buf`; returns the body.
fn round_trip<'b>(fd: c_int, request: &[u8], buf: &'b mut [u8; RESPONSE_MAX]) -> Result<&'b [u8], c_int> {
    raw::write_all(fd, request)?;
    let mut header = [0u8; HEADER_LEN];
    raw::read_exact(fd, &mut header)?;
    let len = frame::body_len(header, RESPONSE_MAX).map_err(|_| libc::EPROTO)?;
    let body = &mut buf[..len];
    raw::read_exact(fd, body)?;
    Ok(body)
}

/// Registers this process with its agent. Keeps the connection as the process's
/// agent link (returned) on success.
pub fn register() -> Result<Registration, RegisterError> {
    let cfg = config().ok_or(RegisterError::Unreachable(libc::EINVAL))?;
    let fd = connect_agent().map_err(RegisterError::Unreachable)?;
    let mut buf = [0u8; RESPONSE_MAX];
    let result = match exchange(fd, &cfg.register_frame, &mut buf) {
        Err(e) => Err(RegisterError::Unreachable(e)),
        Ok(body) => match frame::decode::<LocalResponse>(body) {
            Ok(LocalResponse::Registered { vpid, parent, .. }) => Ok((vpid, parent)),
            _ => Err(RegisterError::Refused),
        },
    };
    match result {
        Ok((vpid, parent)) => {
            let link_fd = raw::move_fd_high(fd, LINK_FD_MIN);
            relink::remember_link(link_fd);
            Ok(Registration { link_fd, vpid, parent })
        }
        Err(e) => {
            raw::close(fd);
            Err(e)
        }
    }
}

/// Registers a forked child under the vPID its parent reserved, without waiting for the
/// answer: the child already knows its vPID and its parent's, so fork() returns in the
/// child at once. Returns the agent link. Allocation-free.
pub fn register_forked(reserved: Vpid) -> Result<c_int, c_int> {
    config().ok_or(libc::EINVAL)?;
    let mut request = [0u8; 64];
    let request =
        frame::encode_into(&LocalRequest::RegisterForked { version: LOCAL_PROTOCOL_VERSION, reserved }, &mut request)
            .map_err(|_| libc::EINVAL)?;
    let fd = connect_agent()?;
    if let Err(e) = raw::write_all(fd, request) {
        raw::close(fd);
        return Err(e);
    }
    let link_fd = raw::move_fd_high(fd, LINK_FD_MIN);
    relink::remember_link(link_fd);
    Ok(link_fd)
}

/// A vPID for the child the caller is about to fork. Allocation-free.
pub fn reserve_vpid() -> Option<Vpid> {
    config()?;
    let mut request = [0u8; 16];
    let request = frame::encode_into(&LocalRequest::ReserveVpid, &mut request).ok()?;
    let fd = connect_agent().ok()?;
    let mut buf = [0u8; RESPONSE_MAX];
    let vpid = match exchange(fd, request, &mut buf).map(frame::decode::<LocalResponse>) {
        Ok(Ok(LocalResponse::VpidReserved { vpid })) => Some(vpid),
        _ => None,
    };
    raw::close(fd);
    vpid
}

/// Asks the agent to deliver `signal` to `vpid` wherever it runs. Returns 0 or an errno.
/// Allocation-free: kill() may be called from a signal handler.
pub fn kill(vpid: Vpid, signal: c_int, group: bool) -> c_int {
    if config().is_none() {
        return libc::ESRCH;
    }
    let mut request = [0u8; 64];
    let Ok(request) = frame::encode_into(&LocalRequest::Kill { vpid, signal, group }, &mut request) else {
        return libc::EINVAL;
    };
    let fd = match connect_agent() {
        Ok(fd) => fd,
        // No agent: nobody can route a vPID.
        Err(_) => return libc::ESRCH,
    };
    let mut buf = [0u8; RESPONSE_MAX];
    let errno = match exchange(fd, request, &mut buf) {
        Ok(body) => match frame::decode::<LocalResponse>(body) {
            Ok(LocalResponse::KillDone { errno }) => errno,
            _ => libc::EIO,
        },
        Err(_) => libc::EIO,
    };
    raw::close(fd);
    errno
}

/// One request on a fresh connection to the agent; returns the connection (still open)
/// and the answer. Allocates: for hooks that never run in signal handlers.
fn call(request: &LocalRequest) -> Result<(c_int, LocalResponse), c_int> {
    config().ok_or(libc::ENOENT)?;
    let frame = frame::encode(request, frame::LOCAL_MAX_FRAME).map_err(|_| libc::EINVAL)?;
    let fd = connect_agent()?;
    let mut buf = [0u8; RESPONSE_MAX];
    let response = exchange(fd, &frame, &mut buf).and_then(|body| frame::decode(body).map_err(|_| libc::EPROTO));
    match response {
        Ok(r) => Ok((fd, r)),
        Err(e) => {
            raw::close(fd);
            Err(e)
        }
    }
}

/// Opens a stream to the endpoint at `target`. On success returns the connection that
/// now carries the stream, our virtual address and the endpoint's. Err(errno) as connect(2).
pub fn open_stream(target: VirtualAddr) -> Result<(c_int, VirtualAddr, VirtualAddr), c_int> {
    let (fd, response) =
        call(&LocalRequest::OpenStream { vip: target.ip, port: target.port }).map_err(|_| libc::ECONNREFUSED)?;
    match response {
        LocalResponse::StreamOpened { local, peer, .. } => Ok((fd, local, peer)),
        other => {
            raw::close(fd);
            Err(match other {
                LocalResponse::Refused { errno } => errno,
                _ => libc::ECONNREFUSED,
            })
        }
    }
}

/// Registers our AF_UNIX listener at `path` as endpoint `<our name>:port`; returns its VIP,
/// or the errno listen(2) fails with: the agent's own (EADDRINUSE: the name and port are taken,
/// EACCES: the name is another user's), EACCES for any other refusal, EADDRNOTAVAIL when the
/// agent cannot be asked. A registered process never falls back to a real listener: its
/// socket was never really bound (bind was only recorded), so the kernel would listen on a
/// random port of every address.
pub fn listen(port: u16, path: &str) -> Result<[u8; 4], c_int> {
    let (fd, response) =
        call(&LocalRequest::Listen { port, path: path.to_owned() }).map_err(|_| libc::EADDRNOTAVAIL)?;
    raw::close(fd);
    match response {
        LocalResponse::Listening { vip } => Ok(vip),
        LocalResponse::Refused { errno } => Err(errno),
        _ => Err(libc::EACCES),
    }
}

/// The VIP of `name` in `dc`; None if it does not resolve (unknown, or another DC).
pub fn resolve(dc: &str, name: &str) -> Option<[u8; 4]> {
    let (fd, response) = call(&LocalRequest::Resolve { dc: dc.to_owned(), name: name.to_owned() }).ok()?;
    raw::close(fd);
    match response {
        LocalResponse::Resolved { vip } => Some(vip),
        _ => None,
    }
}
