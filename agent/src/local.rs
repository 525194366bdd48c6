//! The local socket: the shim inside each process and `migrate-cli` talk to
//! the agent here. Identity comes from SO_PEERCRED, never from a message.

use crate::limits::{ANSWER_TIMEOUT, BODY_TIMEOUT, IDLE_BEFORE_REGISTER};
use crate::state::Agent;
use dvk_protocol::frame::{self, FrameError, HEADER_LEN, LOCAL_MAX_FRAME, LOCAL_MAX_REQUEST};
use dvk_protocol::local::{LocalRequest, LocalResponse, LOCAL_PROTOCOL_VERSION};
use dvk_protocol::peer::PeerMessage;
use pidvirt::{ProcessEntry, Vpid};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// Longest DC or endpoint name accepted.
const MAX_NAME: usize = 128;

pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if path.exists() {
        // A live agent answers on it; a stale file from a crashed one does not.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("{}: another agent is already listening there", path.display());
        }
        std::fs::remove_file(path)?;
    }
    let listener =
        UnixListener::bind(path).map_err(|e| anyhow::anyhow!("cannot bind local socket {}: {e}", path.display()))?;
    // Every local user may register its own processes; the agent checks SO_PEERCRED per request.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

pub async fn serve(agent: Arc<Agent>, listener: UnixListener) {
    let limits = crate::limits::get();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Ok(cred) = stream.peer_cred() else { continue };
                // One user cannot take every fd of the agent (then it could not reach listeners).
                let Some(slot) = limits.local_connection(cred.uid()) else {
                    crate::ratelog::warn(
                        &crate::ratelog::LOCAL_CAP,
                        format_args!(
                            "uid {} holds {} local connections, its cap; refusing more",
                            cred.uid(),
                            limits.local_per_uid
                        ),
                    );
                    continue;
                };
                let agent = agent.clone();
                tokio::spawn(async move {
                    if let Err(e) = client(agent, stream).await {
                        tracing::debug!("local connection closed: {e}");
                    }
                    drop(slot);
                });
            }
            Err(e) => {
                crate::ratelog::warn(&crate::ratelog::ACCEPT, format_args!("local accept failed: {e}"));
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Who is at the other end of a local connection: the process that connected (SO_PEERCRED),
/// pinned so that its pid can never come to mean another process.
///
/// SO_PEERCRED is taken when the socket connects and never changes: a process that connects,
/// forks a child that inherits the socket and exits leaves the child speaking with a pid that
/// the kernel may give to any new process, root's included. So every request is checked
/// against the connecting process itself: through its pidfd (SO_PEERPIDFD, Linux ≥ 6.5), or on
/// older kernels through its start time read from /proc at accept (a reused pid has another).
/// A request whose connecting process has exited is refused.
pub(crate) struct Caller {
    pub pid: i32,
    pub uid: u32,
    anchor: Anchor,
}

enum Anchor {
    Pidfd(std::os::fd::OwnedFd),
    /// No SO_PEERPIDFD: the start time of `pid` when the connection was accepted.
    StartTime(u64),
    /// The connecting process was gone before the first request.
    Gone,
}

impl Caller {
    fn of(stream: &UnixStream) -> std::io::Result<Caller> {
        let cred = stream.peer_cred()?;
        let (uid, pid) = (cred.uid(), cred.pid().unwrap_or(0));
        let anchor = match crate::sys::peer_pidfd(stream) {
            Ok(Some(fd)) => Anchor::Pidfd(fd),
            Ok(None) => match crate::procinfo::read(pid) {
                Ok(info) => Anchor::StartTime(info.start_time),
                Err(_) => Anchor::Gone,
            },
            Err(_) => Anchor::Gone,
        };
        Ok(Caller { pid, uid, anchor })
    }

    /// Ok while the process that connected is alive, so `pid` still names it. Anything read
    /// about `pid` before an Ok was read about that process.
    pub fn verify(&self) -> Result<(), String> {
        let alive = match &self.anchor {
            Anchor::Pidfd(fd) => !crate::sys::pidfd_exited(fd),
            Anchor::StartTime(t) => crate::procinfo::read(self.pid).is_ok_and(|i| i.start_time == *t),
            Anchor::Gone => false,
        };
        if alive {
            Ok(())
        } else {
            Err(format!(
                "the process that opened this connection (pid {}) has exited; its pid may belong to \
                 another process now",
                self.pid
            ))
        }
    }

    /// A pidfd that follows the connecting process (to watch for its exit), when there is one.
    fn pidfd(&self) -> Option<std::os::fd::OwnedFd> {
        match &self.anchor {
            Anchor::Pidfd(fd) => fd.try_clone().ok(),
            _ => None,
        }
    }
}

/// Reads one request. Before the connection registered a process it must come within
/// [`IDLE_BEFORE_REGISTER`]; every body within [`BODY_TIMEOUT`] of its header, and only while
/// the request budgets (the uid's, and the agent-wide one) have room for it. None: the peer
/// closed the connection.
async fn read_request(stream: &mut UnixStream, uid: u32, registered: bool) -> Result<Option<LocalRequest>, FrameError> {
    let limits = crate::limits::get();
    let timed_out = || FrameError::Io(std::io::ErrorKind::TimedOut.into());
    let mut header = [0u8; HEADER_LEN];
    let read = stream.read_exact(&mut header);
    let got = if registered {
        read.await
    } else {
        match tokio::time::timeout(IDLE_BEFORE_REGISTER, read).await {
            Ok(r) => r,
            Err(_) => {
                crate::ratelog::warn(
                    &crate::ratelog::LOCAL_IDLE,
                    format_args!("closing a local connection idle for {IDLE_BEFORE_REGISTER:?} before registering"),
                );
                return Err(timed_out());
            }
        }
    };
    match got {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = frame::body_len(header, LOCAL_MAX_REQUEST)?;
    let body = async {
        // The budget is taken before the body is allocated: many half-sent frames wait here
        // instead of each holding its own buffer.
        let _budget = limits.request_bytes(uid, len).await;
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).await?;
        frame::decode::<LocalRequest>(&body)
    };
    match tokio::time::timeout(BODY_TIMEOUT, body).await {
        Ok(r) => r.map(Some),
        Err(_) => Err(timed_out()),
    }
}

/// Writes an answer; a caller that does not read it within [`ANSWER_TIMEOUT`] is dropped, so
/// an answer the kernel cannot buffer (a long process list) is not held in the agent forever.
async fn write_answer(stream: &mut UnixStream, answer: &LocalResponse) -> Result<(), FrameError> {
    let bytes = frame::encode(answer, LOCAL_MAX_FRAME)?;
    match tokio::time::timeout(ANSWER_TIMEOUT, stream.write_all(&bytes)).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(FrameError::Io(std::io::ErrorKind::TimedOut.into())),
    }
}

async fn client(agent: Arc<Agent>, mut stream: UnixStream) -> Result<(), FrameError> {
    let caller = Caller::of(&stream)?;
    let (uid, pid) = (caller.uid, caller.pid);
    let mut registered = false;
    loop {
        let request = match read_request(&mut stream, uid, registered).await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e) => {
                if !matches!(e, FrameError::Io(_)) {
                    crate::ratelog::warn(
                        &crate::ratelog::BAD_LOCAL,
                        format_args!(
                            "bad request on the local socket from pid {pid} uid {uid}, closing that connection: {e}"
                        ),
                    );
                }
                return Err(e);
            }
        };
        // Every request acts as, or on behalf of, the connecting process: refused once it is gone.
        if let Err(message) = caller.verify() {
            // A child that exits right after fork() is often gone before its registration is
            // read: routine. Anything else from a process that is gone is worth a warning.
            if matches!(request, LocalRequest::RegisterForked { .. }) {
                tracing::debug!(pid, uid, "request refused: {message}");
            } else {
                crate::ratelog::warn(
                    &crate::ratelog::REGISTER_REFUSED,
                    format_args!("request of pid {pid} (uid {uid}) refused: {message}"),
                );
            }
            write_answer(&mut stream, &LocalResponse::Error { message }).await?;
            continue;
        }
        if let LocalRequest::OpenStream { vip, port } = request {
            // From here on this connection is the program's virtual socket.
            crate::endpoints::open_from_shim(agent, stream, pid, vip, port).await;
            return Ok(());
        }
        if let LocalRequest::Move { target, dest, options, group } = request {
            // Answered step by step until the move is over.
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            crate::moving::request_move(&agent, target, &group, &dest, options, uid, tx);
            while let Some(event) = rx.recv().await {
                let last = matches!(event, LocalResponse::MoveDone(_) | LocalResponse::Error { .. });
                write_answer(&mut stream, &event).await?;
                if last {
                    break;
                }
            }
            continue;
        }
        let registering = matches!(request, LocalRequest::Register { .. } | LocalRequest::RegisterForked { .. });
        let response = handle(&agent, request, &caller).await;
        if let (true, LocalResponse::Registered { vpid, .. }) = (registering, &response) {
            registered = true;
            // The agent's end of the process's link: how a move finds the link among its fds.
            if let Ok(ino) = crate::sys::inode(&stream) {
                agent.tables.lock().link_inodes.insert(*vpid, ino);
            }
        }
        write_answer(&mut stream, &response).await?;
    }
}

async fn handle(agent: &Arc<Agent>, request: LocalRequest, caller: &Caller) -> LocalResponse {
    let (pid, uid) = (caller.pid, caller.uid);
    match request {
        LocalRequest::Reserved => LocalResponse::Error { message: "reserved request".into() },
        LocalRequest::Register { version, dc, endpoint } => {
            if version != LOCAL_PROTOCOL_VERSION {
                return LocalResponse::Error {
                    message: format!("shim speaks protocol {version}, agent {LOCAL_PROTOCOL_VERSION}"),
                };
            }
            register(agent, caller, dc, endpoint, None).unwrap_or_else(|message| {
                crate::ratelog::warn(
                    &crate::ratelog::REGISTER_REFUSED,
                    format_args!("registration of pid {pid} (uid {uid}) refused: {message}"),
                );
                LocalResponse::Error { message }
            })
        }
        LocalRequest::Kill { vpid, signal, group } => {
            LocalResponse::KillDone { errno: agent.signal(vpid, signal, group, uid).await }
        }
        LocalRequest::ListProcesses => LocalResponse::Processes(agent.process_rows()),
        LocalRequest::ListNodes => LocalResponse::Nodes(agent.node_statuses()),
        LocalRequest::Resolve { dc, name } => crate::endpoints::resolve(agent, pid, &dc, &name),
        LocalRequest::Listen { port, path } => crate::endpoints::listen(agent, pid, uid, port, path),
        LocalRequest::ListEndpoints => {
            LocalResponse::Endpoints(agent.tables.lock().routing.endpoints().cloned().collect())
        }
        LocalRequest::OpenStream { .. } | LocalRequest::Move { .. } => {
            LocalResponse::Error { message: "handled by the connection loop".into() }
        }
        LocalRequest::MoveCheck { target, dest } => crate::moving::check(agent, target, dest.as_deref()).await,
        LocalRequest::Logs { vpid, offset } => crate::moving::logs(agent, vpid, offset, uid).await,
        LocalRequest::ReserveVpid => reserve_vpid(agent, pid, uid),
        LocalRequest::RegisterForked { version, reserved } => {
            if version != LOCAL_PROTOCOL_VERSION {
                return LocalResponse::Error {
                    message: format!("shim speaks protocol {version}, agent {LOCAL_PROTOCOL_VERSION}"),
                };
            }
            register_forked(agent, caller, reserved).unwrap_or_else(|message| {
                // A child that exits right after fork() is often gone before its registration
                // is read: nothing to register then.
                if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    crate::ratelog::warn(
                        &crate::ratelog::REGISTER_REFUSED,
                        format_args!("registration of forked child pid {pid} (uid {uid}) refused: {message}"),
                    );
                }
                LocalResponse::Error { message }
            })
        }
    }
}

/// Endpoint names may contain dots; DC names may not (in `<name>.<dc>.dvk` the DC is
/// the last label before `.dvk`).
fn valid_name(s: &str, dots: bool) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || (dots && c == '.'))
}

/// How long a vPID reserved for a child waits to be claimed.
const RESERVATION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(60);
/// Reservations a uid may hold unclaimed at once (children forked and not yet registered).
pub const RESERVE_OUTSTANDING: u32 = 1024;
/// Reservations a uid may make in a burst, and per second after it.
const RESERVE_BURST: f64 = 2048.0;
const RESERVE_PER_SEC: f64 = 1024.0;

/// One uid's reservations: a token bucket (the rate) and a count of unclaimed ones (what
/// its reservations hold of the node's vPIDs).
pub struct ReserveBudget {
    tokens: f64,
    at: std::time::Instant,
    outstanding: u32,
}

/// A vPID for a new process: see `VpidStore::allocate`. A wrap-around (looking below the
/// counter for numbers nobody holds) needs the whole cluster's view: every configured peer
/// linked, and the agent up for a quarantine (numbers freed just before a restart).
pub(crate) fn allocate_vpid(
    agent: &Agent,
    t: &mut crate::state::Tables,
    now: std::time::Instant,
) -> Result<Vpid, String> {
    let may_wrap = now.saturating_duration_since(agent.started) >= pidvirt::VpidAllocator::QUARANTINE
        && agent.config.nodes.iter().all(|n| n.id == agent.me.id || t.links.contains_key(&pidvirt::NodeId(n.id)));
    let crate::state::Tables { routing, vpids, reservations, .. } = t;
    vpids
        .allocate(now, |v| routing.get(v).is_some() || reservations.contains_key(&v), may_wrap)
        .map_err(|e| e.to_string())
}

/// Expires reservations older than their lifetime (oldest first: O(1) per reservation); their
/// vPIDs go back to the allocator.
fn expire_reservations(t: &mut crate::state::Tables, now: std::time::Instant) {
    while let Some(&(vpid, at)) = t.reservation_order.front() {
        if now.saturating_duration_since(at) < RESERVATION_LIFETIME {
            break;
        }
        t.reservation_order.pop_front();
        if t.reservations.get(&vpid).is_some_and(|(_, made)| *made == at) {
            t.reservations.remove(&vpid);
            release_reservation(t, vpid);
            t.vpids.free(vpid, now);
        }
    }
}

/// The reservation of `vpid` is gone (claimed or expired): its uid holds one less.
fn release_reservation(t: &mut crate::state::Tables, vpid: Vpid) {
    if let Some(uid) = t.reserved_by.remove(&vpid) {
        if let Some(b) = t.reserve_budgets.get_mut(&uid) {
            b.outstanding = b.outstanding.saturating_sub(1);
        }
    }
}

/// `ReserveVpid`: O(1) but for finding the caller among this node's processes. A uid may
/// reserve [`RESERVE_BURST`] at once, then [`RESERVE_PER_SEC`] per second, and hold at most
/// [`RESERVE_OUTSTANDING`] unclaimed: one user's flood cannot take the node's vPIDs, and
/// every other uid keeps its own budget. A refused reservation costs a child its vPID (it
/// keeps its real PID), nothing else.
fn reserve_vpid(agent: &Agent, pid: i32, uid: u32) -> LocalResponse {
    let now = std::time::Instant::now();
    let mut t = agent.tables.lock();
    if t.routing.find_local_by_pid(pid).is_none() {
        return LocalResponse::Error { message: format!("pid {pid} is not registered with this agent") };
    }
    expire_reservations(&mut t, now);
    let budget =
        t.reserve_budgets.entry(uid).or_insert(ReserveBudget { tokens: RESERVE_BURST, at: now, outstanding: 0 });
    budget.tokens =
        (budget.tokens + now.saturating_duration_since(budget.at).as_secs_f64() * RESERVE_PER_SEC).min(RESERVE_BURST);
    budget.at = now;
    if budget.tokens < 1.0 || budget.outstanding >= RESERVE_OUTSTANDING {
        let outstanding = budget.outstanding;
        drop(t);
        crate::ratelog::warn(
            &crate::ratelog::RESERVE_LIMIT,
            format_args!(
                "uid {uid} reserves vPIDs faster than {RESERVE_PER_SEC}/s or holds {outstanding} unclaimed                  (at most {RESERVE_OUTSTANDING}); refusing (its children keep real PIDs)"
            ),
        );
        return LocalResponse::Error { message: format!("uid {uid} reserves vPIDs too fast; try again later") };
    }
    match allocate_vpid(agent, &mut t, now) {
        Ok(vpid) => {
            if let Some(b) = t.reserve_budgets.get_mut(&uid) {
                b.tokens -= 1.0;
                b.outstanding += 1;
            }
            t.reservations.insert(vpid, (pid, now));
            t.reservation_order.push_back((vpid, now));
            t.reserved_by.insert(vpid, uid);
            LocalResponse::VpidReserved { vpid }
        }
        Err(message) => LocalResponse::Error { message },
    }
}

/// A forked child claims the vPID its parent reserved; it takes the parent's DC and endpoint.
fn register_forked(agent: &Arc<Agent>, caller: &Caller, reserved: Vpid) -> Result<LocalResponse, String> {
    let pid = caller.pid;
    let info = crate::procinfo::read(pid).map_err(|e| format!("cannot read /proc/{pid}: {e}"))?;
    caller.verify()?;
    let (dc, endpoint) = {
        let mut t = agent.tables.lock();
        match t.reservations.remove(&reserved) {
            Some((parent, _)) if parent == info.ppid => release_reservation(&mut t, reserved),
            Some(other) => {
                t.reservations.insert(reserved, other);
                return Err(format!("vPID {reserved} was not reserved by pid {pid}'s parent"));
            }
            None => return Err(format!("vPID {reserved} is not reserved")),
        }
        let parent = t.routing.find_local_by_pid(info.ppid).ok_or("the parent is not registered")?;
        (parent.dc.clone(), parent.endpoint.clone())
    };
    register(agent, caller, dc, Some(endpoint), Some(reserved))
}

/// Registers `pid`; `reserved` is the vPID its parent reserved for it, if any.
fn register(
    agent: &Arc<Agent>,
    caller: &Caller,
    dc: String,
    endpoint: Option<String>,
    reserved: Option<Vpid>,
) -> Result<LocalResponse, String> {
    let (pid, uid) = (caller.pid, caller.uid);
    if pid <= 0 {
        return Err("the kernel did not report the caller's pid".into());
    }
    if !valid_name(&dc, false) {
        return Err(format!("DC name `{dc}` must be 1..={MAX_NAME} of letters, digits, `-`, `_`"));
    }
    if let Some(e) = &endpoint {
        if !valid_name(e, true) {
            return Err(format!("endpoint name `{e}` must be 1..={MAX_NAME} of letters, digits, `-`, `_`, `.`"));
        }
    }
    let info = crate::procinfo::read(pid).map_err(|e| format!("cannot read /proc/{pid}: {e}"))?;
    // The config says who may run in the DC (a forked child or an execve stays in its DC:
    // checked again all the same, the uid is the caller's now).
    crate::policy::may_join(&agent.config, &dc, uid, pid)?;
    // Alive after the reads: what /proc said was about the caller, not about a process that
    // took over its pid. The exit watcher follows the caller itself (its pidfd) when it can.
    let watcher = caller.pidfd();
    caller.verify()?;
    let endpoint = endpoint.unwrap_or_else(|| sanitize(&info.comm));
    let node = agent.node_id();

    let (entry, fresh) = {
        let mut t = agent.tables.lock();
        let parent = t.routing.find_local_by_pid(info.ppid).map(|p| p.vpid);
        // The same process registering again: it called execve and the shim loaded anew.
        // It keeps its vPID (the pidfd watcher already follows it).
        if let Some(existing) = t.routing.find_local_by_pid(pid).cloned() {
            let entry =
                ProcessEntry { dc, endpoint, command: info.command, parent: existing.parent.or(parent), ..existing };
            t.routing.upsert(entry.clone());
            (entry, false)
        } else {
            let vpid = match reserved {
                Some(v) => v,
                None => allocate_vpid(agent, &mut t, std::time::Instant::now())?,
            };
            let entry = ProcessEntry { vpid, node, real_pid: pid, uid, dc, endpoint, command: info.command, parent };
            t.routing.upsert(entry.clone());
            t.start_times.insert(vpid, info.start_time);
            (entry, true)
        }
    };
    if fresh {
        let opened = match watcher {
            Some(fd) => Ok(fd),
            None => crate::sys::pidfd_open(pid),
        };
        let pidfd = match opened {
            Ok(fd) => fd,
            Err(e) => {
                let mut t = agent.tables.lock();
                t.routing.remove(entry.vpid);
                t.vpids.free(entry.vpid, std::time::Instant::now());
                return Err(format!("pidfd_open({pid}): {e}"));
            }
        };
        tokio::spawn(watch_exit(agent.clone(), entry.vpid, pid, pidfd));
    }
    tracing::info!(vpid = %entry.vpid, pid, uid, dc = %entry.dc, endpoint = %entry.endpoint, "process registered");
    crate::registry::save(agent);
    agent.broadcast(PeerMessage::ProcessUp(entry.clone()));
    Ok(LocalResponse::Registered { vpid: entry.vpid, parent: entry.parent, node })
}

fn sanitize(comm: &str) -> String {
    let s: String =
        comm.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    if s.is_empty() {
        "process".into()
    } else {
        s
    }
}

/// Removes the process from the cluster's tables when it exits.
pub(crate) async fn watch_exit(agent: Arc<Agent>, vpid: Vpid, pid: i32, pidfd: std::os::fd::OwnedFd) {
    match crate::sys::async_pidfd(pidfd) {
        Ok(fd) => {
            let _ = fd.readable().await;
            // A process a move restored here is the agent's child: collect it.
            crate::sys::reap(pid);
        }
        Err(e) => {
            tracing::error!(%vpid, pid, "cannot watch for exit: {e}; polling instead");
            while crate::sys::kill(pid, 0) != libc::ESRCH {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
    let removed = {
        let mut t = agent.tables.lock();
        match t.routing.get(vpid) {
            Some(r) if r.entry.node == agent.node_id() && r.entry.real_pid == pid => {
                let endpoints: Vec<_> = t.routing.endpoints().filter(|e| e.vpid == vpid).map(|e| e.key()).collect();
                t.routing.remove(vpid);
                t.start_times.remove(&vpid);
                // It ran here, so this is where its end is known: its vPID is free (if this
                // node handed it out; else its node frees it on our ProcessDown).
                t.vpids.free(vpid, std::time::Instant::now());
                Some(endpoints)
            }
            _ => None,
        }
    };
    if let Some(endpoints) = removed {
        crate::endpoints::process_exited(&agent, &endpoints);
        crate::registry::save(&agent);
        tracing::info!(%vpid, pid, "process exited");
        crate::moving::kept::forget(&agent, vpid);
        agent.broadcast(PeerMessage::ProcessDown { vpid });
    }
}
