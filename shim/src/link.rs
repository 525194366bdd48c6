//! The process's link to its node agent: registration (at load and in every
//! forked child) and one-shot requests such as kill(vpid).
//!
//! The Register frame is encoded once at load time and kept, so a forked child
//! re-registers without allocating; one-shot requests encode into stack buffers.

use crate::raw;
use dvk_protocol::frame::{self, HEADER_LEN};
use dvk_protocol::local::{LocalRequest, LocalResponse, LOCAL_PROTOCOL_VERSION};
use libc::c_int;
use pidvirt::{VirtualAddr, Vpid};
use std::sync::OnceLock;

/// How long the shim waits for its agent before giving up on a request.
const AGENT_TIMEOUT_MS: i64 = 3000;
/// The agent link is moved to the first free fd at or above this.
const LINK_FD_MIN: c_int = 900;
/// Largest response the shim reads (bigger ones are only possible for errors).
const RESPONSE_MAX: usize = 512;

pub struct LinkConfig {
    pub addr: libc::sockaddr_un,
    pub path_display: String,
    pub register_frame: Vec<u8>,
    /// Where virtual listeners are created: `<agent socket dir>/ep`.
    pub listener_dir: String,
}

static CONFIG: OnceLock<LinkConfig> = OnceLock::new();

pub fn configure(socket_path: &[u8], dc: String, endpoint: Option<String>) -> Result<(), &'static str> {
    let mut addr = empty_sockaddr();
    if socket_path.is_empty() || socket_path.len() >= addr.sun_path.len() {
        return Err("DVK_AGENT_SOCK is empty or longer than a unix socket path can be");
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(socket_path) {
        *dst = *src as libc::c_char;
    }
    let request = LocalRequest::Register { version: LOCAL_PROTOCOL_VERSION, dc, endpoint };
    let register_frame =
        frame::encode(&request, frame::LOCAL_MAX_FRAME).map_err(|_| "cannot encode the registration")?;
    let path_display = String::from_utf8_lossy(socket_path).into_owned();
    let listener_dir = match path_display.rsplit_once('/') {
        Some((dir, _)) if !dir.is_empty() => format!("{dir}/ep"),
        Some(_) => "/ep".to_owned(),
        None => "ep".to_owned(),
    };
    CONFIG.set(LinkConfig { addr, path_display, register_frame, listener_dir }).map_err(|_| "configured twice")
}

fn empty_sockaddr() -> libc::sockaddr_un {
    libc::sockaddr_un { sun_family: 0, sun_path: [0; 108] }
}

pub fn config() -> Option<&'static LinkConfig> {
    CONFIG.get()
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
    let fd = raw::connect_unix(&cfg.addr, AGENT_TIMEOUT_MS).map_err(RegisterError::Unreachable)?;
    let mut buf = [0u8; RESPONSE_MAX];
    let result = match round_trip(fd, &cfg.register_frame, &mut buf) {
        Err(e) => Err(RegisterError::Unreachable(e)),
        Ok(body) => match frame::decode::<LocalResponse>(body) {
            Ok(LocalResponse::Registered { vpid, parent, .. }) => Ok((vpid, parent)),
            _ => Err(RegisterError::Refused),
        },
    };
    match result {
        Ok((vpid, parent)) => Ok(Registration { link_fd: raw::move_fd_high(fd, LINK_FD_MIN), vpid, parent }),
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
    let cfg = config().ok_or(libc::EINVAL)?;
    let mut request = [0u8; 64];
    let request =
        frame::encode_into(&LocalRequest::RegisterForked { version: LOCAL_PROTOCOL_VERSION, reserved }, &mut request)
            .map_err(|_| libc::EINVAL)?;
    let fd = raw::connect_unix(&cfg.addr, AGENT_TIMEOUT_MS)?;
    if let Err(e) = raw::write_all(fd, request) {
        raw::close(fd);
        return Err(e);
    }
    Ok(raw::move_fd_high(fd, LINK_FD_MIN))
}

/// A vPID for the child the caller is about to fork. Allocation-free.
pub fn reserve_vpid() -> Option<Vpid> {
    let cfg = config()?;
    let mut request = [0u8; 16];
    let request = frame::encode_into(&LocalRequest::ReserveVpid, &mut request).ok()?;
    let fd = raw::connect_unix(&cfg.addr, AGENT_TIMEOUT_MS).ok()?;
    let mut buf = [0u8; RESPONSE_MAX];
    let vpid = match round_trip(fd, request, &mut buf).map(frame::decode::<LocalResponse>) {
        Ok(Ok(LocalResponse::VpidReserved { vpid })) => Some(vpid),
        _ => None,
    };
    raw::close(fd);
    vpid
}

/// Asks the agent to deliver `signal` to `vpid` wherever it runs. Returns 0 or an errno.
/// Allocation-free: kill() may be called from a signal handler.
pub fn kill(vpid: Vpid, signal: c_int, group: bool) -> c_int {
    let Some(cfg) = config() else {
        return libc::ESRCH;
    };
    let mut request = [0u8; 64];
    let Ok(request) = frame::encode_into(&LocalRequest::Kill { vpid, signal, group }, &mut request) else {
        return libc::EINVAL;
    };
    let fd = match raw::connect_unix(&cfg.addr, AGENT_TIMEOUT_MS) {
        Ok(fd) => fd,
        // No agent: nobody can route a vPID.
        Err(_) => return libc::ESRCH,
    };
    let mut buf = [0u8; RESPONSE_MAX];
    let errno = match round_trip(fd, request, &mut buf) {
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
    let cfg = config().ok_or(libc::ENOENT)?;
    let frame = frame::encode(request, frame::LOCAL_MAX_FRAME).map_err(|_| libc::EINVAL)?;
    let fd = raw::connect_unix(&cfg.addr, AGENT_TIMEOUT_MS)?;
    let mut buf = [0u8; RESPONSE_MAX];
    let response = round_trip(fd, &frame, &mut buf).and_then(|body| frame::decode(body).map_err(|_| libc::EPROTO));
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

pub enum ListenError {
    /// The agent refused as listen(2) would (EADDRINUSE).
    Errno(c_int),
    /// Not possible here (no agent, not registered): the socket stays a plain TCP socket.
    NotVirtual,
}

/// Registers our AF_UNIX listener at `path` as endpoint `<our name>:port`; returns its VIP.
pub fn listen(port: u16, path: &str) -> Result<[u8; 4], ListenError> {
    let (fd, response) =
        call(&LocalRequest::Listen { port, path: path.to_owned() }).map_err(|_| ListenError::NotVirtual)?;
    raw::close(fd);
    match response {
        LocalResponse::Listening { vip } => Ok(vip),
        LocalResponse::Refused { errno } => Err(ListenError::Errno(errno)),
        _ => Err(ListenError::NotVirtual),
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
