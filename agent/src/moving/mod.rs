//! Moves: the agent's driver of the `dvk_move` state machines (docs/MOVE.md has the whole
//! protocol). `source` coordinates a move of one of this node's processes; `participant` takes
//! part in another node's move (as its destination, or as a node that routes to the process or
//! holds the other end of its streams); `streams` detaches and reattaches stream halves;
//! `plan` is what travels beside the image.

pub mod classify;
pub mod kept;
pub mod participant;
pub mod plan;
pub mod rsync;
pub mod source;
pub mod streams;

use crate::state::Agent;
use dvk_move::{MoveMsg, Timeouts};
use dvk_protocol::local::{LocalResponse, MoveOptions};
use parking_lot::Mutex;
use pidvirt::{MigrationId, NodeId, Vpid};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Failures the end-to-end tests inject (environment variable `DVK_TEST_FAULT` of the agent),
/// each at one step of a move, to prove that step rolls back. Inert unless set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Destination: flip a byte of the received page file (the restore's checksum must catch it).
    CorruptImage,
    /// Destination: the restore fails (as when a mapped file is missing there).
    FailRestore,
    /// Destination: stop reading the link once the image starts arriving (a hung node).
    StallImage,
    /// Source (`--transfer rsync`): its rsync asks the destination's daemon for a path outside
    /// the image directory (a hostile peer).
    RsyncEscape,
    /// Source (`--transfer rsync`): its rsync names a module the daemon does not have.
    RsyncBadModule,
    /// Source: cut the link to the destination just before sending Commit (Commit lost).
    CutBeforeCommit,
    /// Destination: the restore of a group move's last process fails (the others are restored,
    /// held, then killed).
    FailLastMember,
    /// Destination: wait 2 s before restoring (a window in which a test opens new connections).
    HoldRestore,
    /// Source: the first StreamOpen from a `move_client` program is handled only once the
    /// endpoint is moving here (as one from a node that learned the route mid-move would be).
    OpenLate,
    /// Source: the first StreamOpen from a `move_client` program, counted as under way before
    /// the endpoint was marked moving, looks at the endpoint only once it is moving.
    OpenCountedLate,
}

impl Fault {
    pub fn from_env() -> Option<Fault> {
        let v = std::env::var("DVK_TEST_FAULT").ok()?;
        let f = match v.as_str() {
            "corrupt-image" => Fault::CorruptImage,
            "fail-restore" => Fault::FailRestore,
            "fail-last-member" => Fault::FailLastMember,
            "stall-image" => Fault::StallImage,
            "cut-before-commit" => Fault::CutBeforeCommit,
            "hold-restore" => Fault::HoldRestore,
            "open-late" => Fault::OpenLate,
            "open-counted-late" => Fault::OpenCountedLate,
            "rsync-escape" => Fault::RsyncEscape,
            "rsync-bad-module" => Fault::RsyncBadModule,
            other => {
                tracing::warn!("unknown DVK_TEST_FAULT `{other}` ignored");
                return None;
            }
        };
        tracing::warn!(fault = ?f, "test fault injection is on (DVK_TEST_FAULT)");
        Some(f)
    }
}

/// A fixed end nobody reattached for this long is closed.
const HELD_MAX_AGE: Duration = Duration::from_secs(120);

#[derive(Default)]
pub struct Moves {
    /// Moves this node coordinates, by vPID (one at a time per process) → their event queue.
    pub coordinating: Mutex<HashMap<Vpid, (u64, mpsc::UnboundedSender<source::Input>)>>,
    /// Moves of other nodes this node takes part in, by move id.
    pub participating: Mutex<HashMap<u64, mpsc::UnboundedSender<participant::Input>>>,
    /// Fixed ends waiting for a reattach, by stream id.
    pub held: Mutex<HashMap<u64, streams::HeldFixed>>,
    /// Moves forwarded from this node to a source: request id → the CLI's reply queue.
    pub forwarded: Mutex<HashMap<u64, (NodeId, mpsc::UnboundedSender<LocalResponse>)>>,
    /// Log reads forwarded to another node.
    pub log_reads: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<LocalResponse>>>,
    next_move: std::sync::atomic::AtomicU64,
    /// Moves completed per vPID that left this node (the next epoch).
    pub epochs: Mutex<HashMap<Vpid, u64>>,
    /// Page data of incoming moves, received into memory, by move id and file (`pages.img`, or
    /// `m<vPID>/pages.img` for each member of a group move).
    pub incoming: Mutex<HashMap<(u64, String), dvk_checkpoint::sys::MappedFile>>,
    /// Pages pre-copied to this node while a process still ran on its source, by move id and
    /// file (`precopy.img`, or `m<vPID>/precopy.img` for a group's member; they arrive before
    /// the move's Start; see participant::image_size).
    pub precopy: Mutex<HashMap<(u64, String), participant::PrecopyStore>>,
    /// Fixed ends being detached: a reattach of the same stream waits for it.
    pub detaching: Mutex<HashMap<u64, tokio::sync::watch::Receiver<bool>>>,
    next_request: std::sync::atomic::AtomicU64,
    /// Processes (real pids) that run while their pre-copied pages are still being copied in
    /// (a lazy restore): their mappings are registered with a userfaultfd until it ends, so a
    /// move of them waits for it.
    pub filling: Mutex<std::collections::HashSet<i32>>,
    /// rsync sessions of moves (`--transfer rsync`), by move id.
    pub rsync: Mutex<HashMap<u64, rsync::Session>>,
    /// Moves this node is the destination of → their vPID (an rsync may write its kept image).
    pub rsync_dest: Mutex<HashMap<u64, Vpid>>,
    /// Destination: how each move's receiving rsync ended (the image dir, or why it failed).
    pub rsync_results: Mutex<HashMap<u64, tokio::sync::watch::Receiver<rsync::Received>>>,
}

impl Moves {
    /// A move id no earlier run of this agent used: node id above bit 48, below it a counter
    /// that starts at a random point (a restarted agent must not reuse the tag of a move its
    /// peers still remember).
    pub fn new_move_id(&self, node: NodeId) -> u64 {
        use std::sync::atomic::Ordering;
        let _ = self.next_move.compare_exchange(0, random_start(), Ordering::Relaxed, Ordering::Relaxed);
        (node.0 as u64) << 48 | (self.next_move.fetch_add(1, Ordering::Relaxed) & ((1 << 48) - 1))
    }
}

fn random_start() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::getrandom(&mut b);
    // 40 random bits: 2^8 moves' room above, never 0.
    (u64::from_le_bytes(b) >> 24).max(1)
}

pub fn timeouts() -> Timeouts {
    Timeouts::default()
}

/// Milliseconds on the agent's move clock.
pub fn now_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// A move message from peer `from` (in the link reader: must not block).
pub fn on_message(agent: &Arc<Agent>, from: NodeId, msg: MoveMsg) {
    let Some(tag) = msg.tag() else { return };
    match &msg {
        MoveMsg::StartAck { .. }
        | MoveMsg::StreamDetached { .. }
        | MoveMsg::Restored { .. }
        | MoveMsg::Failed { .. }
        | MoveMsg::Committed { .. }
        | MoveMsg::Outcome { .. } => {
            let c = agent.moves.coordinating.lock();
            if let Some((_, tx)) = c.values().find(|(mid, _)| *mid == tag.mid) {
                let _ = tx.send(source::Input::Peer(from, msg));
            }
        }
        MoveMsg::StreamReattach { stream, .. } => streams::reattach_fixed_remote(agent, from, tag, *stream),
        MoveMsg::StreamDetach { stream, .. } => {
            // Concerns the fixed ends held here, whether or not this node heard the Start.
            let (agent, stream) = (agent.clone(), *stream);
            let (done_tx, done_rx) = tokio::sync::watch::channel(false);
            agent.moves.detaching.lock().insert(stream, done_rx);
            tokio::spawn(async move {
                let held = streams::detach_fixed(&agent, tag, stream).await;
                agent.moves.detaching.lock().remove(&stream);
                let _ = done_tx.send(true);
                if let Some(link) = agent.link(from) {
                    let _ = link
                        .write_now(dvk_protocol::peer::PeerMessage::Move(MoveMsg::StreamDetached { tag, stream, held }))
                        .await;
                }
            });
        }
        MoveMsg::Start { .. } => participant::start(agent, from, msg),
        _ => {
            let p = agent.moves.participating.lock();
            if let Some(tx) = p.get(&tag.mid) {
                let _ = tx.send(participant::Input::Msg(msg));
            } else {
                drop(p);
                participant::without_machine(agent, from, msg);
            }
        }
    }
}

/// Runs in the link reader before a message is handled: a reattach waits until a detach of
/// the same stream (requested earlier on this link) is complete.
pub async fn before_message(agent: &Agent, msg: &dvk_protocol::peer::PeerMessage) {
    if let dvk_protocol::peer::PeerMessage::Move(MoveMsg::StreamReattach { stream, .. }) = msg {
        let pending = agent.moves.detaching.lock().get(stream).cloned();
        if let Some(mut rx) = pending {
            let _ = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|done| *done)).await;
        }
    }
}

/// Starts a move asked for on this node: run here if the process is local, else forwarded to
/// the node it runs on. `group`: processes that move with `target` as one (all on its node).
/// Every step and the end go to `reply`.
pub fn request_move(
    agent: &Arc<Agent>,
    target: i32,
    group: &[i32],
    dest: &str,
    options: MoveOptions,
    uid: u32,
    reply: mpsc::UnboundedSender<LocalResponse>,
) {
    let fail = |message: String| {
        let _ = reply.send(LocalResponse::Error { message });
    };
    let Some(dest_node) = agent.config.nodes.iter().find(|n| n.name == dest).map(|n| NodeId(n.id)) else {
        let known: Vec<&str> = agent.config.nodes.iter().map(|n| n.name.as_str()).collect();
        return fail(format!("unknown node `{dest}` (the cluster has: {})", known.join(", ")));
    };
    let me = agent.node_id();
    let mut members: Vec<(Vpid, NodeId)> = Vec::new();
    for &t in std::iter::once(&target).chain(group) {
        let route = {
            let tables = agent.tables.lock();
            if Vpid::is_virtual(t) {
                tables.routing.get(Vpid(t)).map(|r| (r.entry.vpid, r.entry.node))
            } else {
                tables.routing.find_local_by_pid(t).map(|e| (e.vpid, e.node))
            }
        };
        let Some(found) = route else {
            return fail(if Vpid::is_virtual(t) {
                format!("no process with vPID {t} in the cluster (see `migrate-cli ps`)")
            } else {
                format!("pid {t} is not a process under the dvk shim on this node (see `migrate-cli ps`)")
            });
        };
        if members.iter().any(|(v, _)| *v == found.0) {
            return fail(format!("vPID {} is named twice in the group", found.0));
        }
        members.push(found);
    }
    let (vpid, node) = members[0];
    if let Some((other, on)) = members.iter().find(|(_, n)| *n != node) {
        return fail(format!(
            "a group moves from one node: vPID {vpid} runs on {}, vPID {other} on {} (move them there first)",
            agent.node_name(node),
            agent.node_name(*on)
        ));
    }
    let group: Vec<Vpid> = members[1..].iter().map(|(v, _)| *v).collect();
    if node == me {
        let req = source::Request { vpid, group, dest: dest_node, options, uid, reply };
        tokio::spawn(source::run(agent.clone(), req));
        return;
    }
    let request = agent.moves.next_request.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    agent.moves.forwarded.lock().insert(request, (node, reply.clone()));
    if !agent.send_to(
        node,
        dvk_protocol::peer::PeerMessage::MoveForward { request, vpid, dest: dest_node, uid, options, group },
    ) {
        agent.moves.forwarded.lock().remove(&request);
        fail(format!("vPID {vpid} runs on {}, which is not linked to this node", agent.node_name(node)));
    }
}

/// `MoveForward` from `from`: run the move here and send every step back.
#[allow(clippy::too_many_arguments)]
pub fn serve_forwarded(
    agent: &Arc<Agent>,
    from: NodeId,
    request: u64,
    vpid: Vpid,
    group: Vec<Vpid>,
    dest: NodeId,
    uid: u32,
    options: MoveOptions,
) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let req = source::Request { vpid, group, dest, options, uid, reply: tx };
    tokio::spawn(source::run(agent.clone(), req));
    let agent = agent.clone();
    tokio::spawn(async move {
        while let Some(event) = rx.recv().await {
            let last = matches!(event, LocalResponse::MoveDone(_) | LocalResponse::Error { .. });
            agent.send_to(from, dvk_protocol::peer::PeerMessage::MoveForwardEvent { request, event });
            if last {
                return;
            }
        }
    });
}

pub fn forwarded_event(agent: &Agent, from: NodeId, request: u64, event: LocalResponse) {
    let last = matches!(event, LocalResponse::MoveDone(_) | LocalResponse::Error { .. });
    let mut f = agent.moves.forwarded.lock();
    if let Some((node, tx)) = f.get(&request) {
        if *node == from {
            let _ = tx.send(event);
            if last {
                f.remove(&request);
            }
        }
    }
}

/// Log bytes of `vpid` on this node from `offset` (64 KiB at most), for `uid`: only root or
/// the process's owner may read them. The agent makes the log file 0600 and gives it to the
/// process's user, so the file's owner is the owner even after the process exited or moved on;
/// a process still registered under that vPID must be `uid`'s as well. The file is opened
/// without following a symlink and checked by what was opened.
pub fn read_log(agent: &Agent, vpid: Vpid, offset: u64, uid: u32) -> LocalResponse {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let path = participant::log_path_for(agent, vpid);
    let node = agent.node_name(agent.node_id());
    let denied = || LocalResponse::Error {
        message: format!("vPID {vpid}'s log on {node} belongs to another user (only its owner or root may read it)"),
    };
    let owner = agent.tables.lock().routing.get(vpid).map(|r| r.entry.uid);
    if uid != 0 && owner.is_some_and(|o| o != uid) {
        return denied();
    }
    let opened = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(&path);
    let mut f = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return LocalResponse::Error {
                message: format!("no log for vPID {vpid} on {node} (its stdout/stderr were not redirected there)"),
            }
        }
        Err(e) => return LocalResponse::Error { message: format!("{}: {e}", path.display()) },
    };
    match f.metadata() {
        Ok(m) if !m.is_file() => {
            return LocalResponse::Error { message: format!("{} is not a regular file", path.display()) }
        }
        Ok(m) if uid != 0 && m.uid() != uid => return denied(),
        Ok(_) => {}
        Err(e) => return LocalResponse::Error { message: format!("{}: {e}", path.display()) },
    }
    let mut bytes = Vec::new();
    let read = f.seek(SeekFrom::Start(offset)).and_then(|_| f.take(64 * 1024).read_to_end(&mut bytes));
    match read {
        Ok(n) => LocalResponse::LogChunk { node, bytes, next: offset + n as u64 },
        Err(e) => LocalResponse::Error { message: format!("{}: {e}", path.display()) },
    }
}

/// `migrate-cli logs` of user `uid`: read here if the process runs here (or its log is here),
/// else ask the node it runs on, which checks `uid` against the owner it knows.
pub async fn logs(agent: &Arc<Agent>, vpid: Vpid, offset: u64, uid: u32) -> LocalResponse {
    let node = agent.tables.lock().routing.get(vpid).map(|r| r.entry.node);
    let here = participant::log_path_for(agent, vpid).exists();
    match node {
        Some(n) if n != agent.node_id() && !here => {
            let request = agent.moves.next_request.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (tx, rx) = tokio::sync::oneshot::channel();
            agent.moves.log_reads.lock().insert(request, tx);
            if !agent.send_to(n, dvk_protocol::peer::PeerMessage::LogRead { request, vpid, offset, uid }) {
                agent.moves.log_reads.lock().remove(&request);
                return LocalResponse::Error { message: format!("{} is not linked to this node", agent.node_name(n)) };
            }
            match tokio::time::timeout(Duration::from_secs(5), rx).await {
                Ok(Ok(r)) => r,
                _ => {
                    agent.moves.log_reads.lock().remove(&request);
                    LocalResponse::Error { message: format!("{} did not answer", agent.node_name(n)) }
                }
            }
        }
        _ => read_log(agent, vpid, offset, uid),
    }
}

/// The link to `node` went down or came up: coordinators care.
pub fn on_link(agent: &Agent, node: NodeId, up: bool) {
    for (_, tx) in agent.moves.coordinating.lock().values() {
        let _ = tx.send(source::Input::Link(node, up));
    }
    if !up {
        rsync::on_link_down(agent, node);
        // Pre-copied pages of that node's moves: the move rolls back without its link.
        agent.moves.precopy.lock().retain(|_, p| p.from != node);
        // Fixed ends held for a move of that node: nobody can account for their bytes now.
        agent.moves.held.lock().retain(|stream, f| {
            let keep = (f.tag.mid >> 48) as u16 != node.0;
            if !keep {
                tracing::info!(stream, tag = %f.tag, "link to the move's source lost; closing the held stream");
            }
            keep
        });
        let mut f = agent.moves.forwarded.lock();
        f.retain(|_, (n, tx)| {
            if *n == node {
                let _ = tx.send(LocalResponse::Error {
                    message: format!(
                        "lost the link to the source node {node} during the move; its outcome is decided there \
                         (see `migrate-cli ps`)"
                    ),
                });
                false
            } else {
                true
            }
        });
    }
}

/// Periodic housekeeping: expire fixed ends nobody reattached.
pub async fn housekeeping(agent: Arc<Agent>) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        streams::expire_held(&agent, HELD_MAX_AGE);
    }
}

/// Routes of `vpids` (and their endpoints) → Migrating, once no stream open is under way here.
pub async fn mark_migrating(agent: &Agent, vpids: &[Vpid], mid: u64) {
    {
        let mut t = agent.tables.lock();
        for v in vpids {
            let _ = t.routing.start_migration(*v, MigrationId(mid));
        }
    }
    agent.opens.quiesce().await;
}

/// Routes of `vpid` → `dest` (real pid there), whether or not this node saw the start.
pub fn route_committed(agent: &Agent, vpid: Vpid, mid: u64, dest: NodeId, pid: i32) {
    let mut t = agent.tables.lock();
    if t.routing.commit_migration(vpid, MigrationId(mid), dest, pid).is_err() {
        if let Some(r) = t.routing.get(vpid) {
            let mut e = r.entry.clone();
            e.node = dest;
            e.real_pid = pid;
            t.routing.upsert(e);
        }
        let eps: Vec<_> = t.routing.endpoints().filter(|e| e.vpid == vpid).cloned().collect();
        for mut e in eps {
            e.node = dest;
            t.routing.upsert_endpoint(e);
        }
    }
}

pub fn route_rolled_back(agent: &Agent, vpids: &[Vpid], mid: u64) {
    let mut t = agent.tables.lock();
    for v in vpids {
        let _ = t.routing.rollback_migration(*v, MigrationId(mid));
    }
}

/// [`route_committed`] for a group move: the first process and the others, each with its pid.
pub fn route_committed_all(agent: &Agent, vpid: Vpid, pid: i32, group: &[(Vpid, i32)], mid: u64, dest: NodeId) {
    route_committed(agent, vpid, mid, dest, pid);
    for (v, p) in group {
        route_committed(agent, *v, mid, dest, *p);
    }
}

/// `migrate-cli check <pid|vpid> [node]`: what a move would carry, redirect, or be stopped by.
pub async fn check(agent: &Arc<Agent>, target: i32, dest: Option<&str>) -> LocalResponse {
    use dvk_protocol::local::MoveCheck;
    let me = agent.node_id();
    let found = {
        let t = agent.tables.lock();
        if Vpid::is_virtual(target) {
            t.routing.get(Vpid(target)).map(|r| r.entry.clone())
        } else {
            t.routing.find_local_by_pid(target).cloned()
        }
    };
    let Some(entry) = found else {
        return LocalResponse::Error {
            message: format!("{target} is not a process under the dvk shim (see `migrate-cli ps`)"),
        };
    };
    if entry.node != me {
        return LocalResponse::Error {
            message: format!(
                "vPID {} runs on {}: run the check there (`--node {}`)",
                entry.vpid,
                agent.node_name(entry.node),
                agent.node_name(entry.node)
            ),
        };
    }
    let mut blockers = Vec::new();
    if let Some(dest) = dest {
        match agent.config.nodes.iter().find(|n| n.name == dest) {
            None => blockers.push(format!("unknown node `{dest}`")),
            Some(n) if NodeId(n.id) == me => blockers.push(format!("the process already runs on {dest}")),
            Some(n) if agent.link(NodeId(n.id)).is_none() => {
                blockers.push(format!("node {dest} is not linked to this node"))
            }
            _ => {}
        }
    }
    let (a, vpid, pid) = (agent.clone(), entry.vpid, entry.real_pid);
    // A process with children moves with its tree: every member is looked at.
    let tree = if dvk_checkpoint::tree::has_children(pid) {
        match source::tree_members(agent, pid) {
            Ok(v) => Some(v),
            Err(e) => {
                blockers.push(e);
                None
            }
        }
    } else {
        None
    };
    type Looked = (Vec<(Vpid, i32, classify::Classified)>, Vec<String>);
    let result = tokio::task::spawn_blocking(move || -> Result<Looked, String> {
        let Some(vpids) = tree else {
            let (c, b) = classify::preflight(&a, vpid, pid)?;
            return Ok((vec![(vpid, pid, c)], b.iter().map(|e| e.to_string()).collect()));
        };
        let ids: Vec<(Vpid, i32)> = {
            let t = a.tables.lock();
            vpids.iter().filter_map(|v| t.routing.get(*v).map(|r| (*v, r.entry.real_pid))).collect()
        };
        let (c, b) = classify::preflight_tree(&a, &ids)?;
        let looked = ids.iter().zip(c).map(|(&(v, p), c)| (v, p, c)).collect();
        Ok((looked, b.iter().map(|e| e.to_string()).collect()))
    })
    .await;
    match result {
        Ok(Ok((looked, b))) => {
            blockers.extend(b);
            let several = looked.len() > 1;
            let who = |v: Vpid, p: i32| if several { format!("vPID {v} (pid {p}) ") } else { String::new() };
            LocalResponse::MoveChecked(Box::new(MoveCheck {
                vpid,
                pid,
                node: agent.node_name(me),
                blockers,
                redirects: looked
                    .iter()
                    .flat_map(|(v, p, c)| {
                        c.stdio.iter().map(move |(fd, _, what)| format!("{}fd {fd}: {what}", who(*v, *p)))
                    })
                    .collect(),
                carried: looked
                    .iter()
                    .flat_map(|(v, p, c)| c.carried.iter().map(move |what| format!("{}{what}", who(*v, *p))))
                    .collect(),
            }))
        }
        Ok(Err(e)) => LocalResponse::Error { message: e },
        Err(e) => LocalResponse::Error { message: e.to_string() },
    }
}
