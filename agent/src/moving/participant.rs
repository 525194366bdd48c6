//! Taking part in another node's move: the driver of [`dvk_move::Participant`]. Every peer
//! holds new opens while the process moves; the destination also receives the image, restores
//! the process held, and on commit resumes it with new sockets at its old fd numbers.

use super::plan::{GroupPlan, InternalPlan, InternalSide, MovePlan, Redirect, GROUP_FILE, PLAN_FILE};
use super::streams;
use crate::relay::{self, Dir, End};
use crate::state::Agent;
use dvk_checkpoint::RestoreOptions;
use dvk_move::{MoveMsg, PartAction, PartEvent, Participant};
use dvk_protocol::peer::PeerMessage;
use dvk_protocol::relink::{self, RelinkRecord};
use pidvirt::{EndpointEntry, NodeId, Vpid};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

pub enum Input {
    Msg(MoveMsg),
    /// The held copy's pid, and (a group move) the others' by vPID.
    Restored(Result<(i32, Vec<(Vpid, i32)>), String>),
}

/// `Start` from `from`: a participant machine for the move, run by a task of its own.
pub fn start(agent: &Arc<Agent>, from: NodeId, msg: MoveMsg) {
    let Some(tag) = msg.tag() else { return };
    let now = super::now_ms();
    let Some(mut machine) = Participant::new(agent.node_id(), &msg, super::timeouts(), now) else { return };
    if machine.coordinator != from {
        tracing::warn!(peer = %agent.node_name(from), "move start names another source; ignored");
        return;
    }
    let (tx, rx) = mpsc::unbounded_channel();
    {
        let mut p = agent.moves.participating.lock();
        if p.contains_key(&tag.mid) {
            return;
        }
        p.insert(tag.mid, tx.clone());
    }
    let first = machine.start(&msg);
    if machine.is_destination() {
        // Its image may come by rsync, into the kept image of this vPID (moving::rsync::open).
        agent.moves.rsync_dest.lock().insert(tag.mid, machine.vpid);
    }
    let agent = agent.clone();
    tokio::spawn(async move {
        let mut d = Driver { agent: agent.clone(), from, restore: None, tx };
        let mut queue: std::collections::VecDeque<PartAction> = first.into();
        let mut rx = rx;
        loop {
            while let Some(a) = queue.pop_front() {
                execute(&mut d, &machine, a).await;
            }
            if machine.is_done() {
                break;
            }
            let wait = Duration::from_millis(machine.deadline().saturating_sub(super::now_ms()).max(1));
            let ev = tokio::select! {
                i = rx.recv() => match i {
                    Some(Input::Msg(m)) => PartEvent::Msg(m),
                    Some(Input::Restored(r)) => restore_done(&mut machine, r),
                    None => PartEvent::Tick,
                },
                _ = tokio::time::sleep(wait) => PartEvent::Tick,
            };
            queue.extend(machine.handle(super::now_ms(), ev));
        }
        super::rsync::forget(&agent, tag.mid);
        // Answer late questions about this move for a while (a Query after a lost Committed).
        let lingering = tokio::time::sleep(Duration::from_secs(30));
        tokio::pin!(lingering);
        loop {
            tokio::select! {
                i = rx.recv() => match i {
                    Some(Input::Msg(m)) => {
                        for a in machine.handle(super::now_ms(), PartEvent::Msg(m)) {
                            execute(&mut d, &machine, a).await;
                        }
                    }
                    Some(Input::Restored(r)) => {
                        let ev = restore_done(&mut machine, r);
                        for a in machine.handle(super::now_ms(), ev) {
                            execute(&mut d, &machine, a).await;
                        }
                    }
                    None => break,
                },
                _ = &mut lingering => break,
            }
        }
        agent.moves.participating.lock().remove(&tag.mid);
        drop_incoming(&agent, tag.mid);
    });
}

fn restore_done(machine: &mut Participant, r: Result<(i32, Vec<(Vpid, i32)>), String>) -> PartEvent {
    PartEvent::RestoreDone(r.map(|(pid, group)| {
        machine.set_group_pids(group);
        pid
    }))
}

/// A move message for which this node runs no machine (it missed the start, or the move is
/// long over): answer what can be answered from the routing table.
pub fn without_machine(agent: &Arc<Agent>, from: NodeId, msg: MoveMsg) {
    // Whether the process runs here is the answer to a Query or a late Commit: a destination
    // that resumed it registered it (saved before the resume, so it survives an agent restart).
    let resumed_here = match &msg {
        MoveMsg::Query { vpid, .. } | MoveMsg::Commit { vpid, .. } => {
            agent.tables.lock().routing.get(*vpid).is_some_and(|r| r.entry.node == agent.node_id())
        }
        _ => false,
    };
    match &msg {
        MoveMsg::Commit { tag, vpid, dest, pid, group } if *dest != agent.node_id() => {
            super::route_committed_all(agent, *vpid, *pid, group, tag.mid, *dest);
        }
        MoveMsg::Abort { tag, vpid } => super::route_rolled_back(agent, &[*vpid], tag.mid),
        _ => {}
    }
    for action in Participant::without_machine(agent.node_id(), &msg, resumed_here) {
        if let PartAction::Reply(reply) = action {
            agent.send_to(from, PeerMessage::Move(reply));
        }
    }
}

/// What the destination keeps between restore and commit.
struct Restoring {
    plan: MovePlan,
    dir: PathBuf,
    /// Commands to the thread that holds the restored copy (ptrace is per thread); None for a
    /// member of a process tree (the tree's holder is the copy's).
    holder: Option<std::sync::mpsc::Sender<HoldCmd>>,
    pid: i32,
    /// Our ends of the process's new sockets, by stream id.
    stream_ends: Vec<(u64, UnixStream)>,
    /// New listeners, by port.
    listeners: Vec<(EndpointEntry, crate::listener::ListenerFile, UnixListener)>,
    link_end: UnixStream,
    /// Kept open until the process runs (it has its own copies).
    _replacements: Vec<OwnedFd>,
}

struct ListenerFiles(Vec<PathBuf>);

impl Drop for ListenerFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

enum HoldCmd {
    Resume(oneshot::Sender<Result<(), String>>),
    Kill,
}

/// The held copy: one process, or every member of a group move with the streams between them.
struct HeldCopy {
    members: Vec<Restoring>,
    /// A process tree: the thread that holds every member (resumed or killed as one).
    tree_holder: Option<std::sync::mpsc::Sender<HoldCmd>>,
    /// Streams between members: the plan and our ends of the new sockets (client, server),
    /// None for a side queued in a listen backlog (queued into the new listener at resume).
    internal: Vec<(InternalPlan, Option<UnixStream>, Option<UnixStream>)>,
}

struct Driver {
    agent: Arc<Agent>,
    from: NodeId,
    restore: Option<HeldCopy>,
    tx: mpsc::UnboundedSender<Input>,
}

/// The move id of a staging directory (`move-<mid>-in`, or a group member's directory in it).
fn mid_of(dir: &Path) -> u64 {
    dir.ancestors()
        .take(2)
        .find_map(|d| {
            d.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("move-"))
                .and_then(|n| n.strip_suffix("-in"))
                .and_then(|h| u64::from_str_radix(h, 16).ok())
        })
        .unwrap_or(0)
}

fn image_dir(agent: &Agent, mid: u64) -> PathBuf {
    agent.staging.join(format!("move-{mid:x}-in"))
}

/// Where a moved process's stdout/stderr go when they could not follow it.
pub fn log_path(runtime_dir: &Path, vpid: Vpid) -> PathBuf {
    runtime_dir.join("logs").join(format!("{}.log", vpid.0))
}

/// The log of `vpid` on this node.
pub fn log_path_for(agent: &Agent, vpid: Vpid) -> PathBuf {
    log_path(&agent.me.runtime_dir, vpid)
}

/// Page data larger than this is refused (the agent would have to hold it in memory).
const MAX_PAGES: u64 = 64 << 30;

/// An image file name a source may send: `name`, or `m<vPID>/name` (a group move's member).
fn image_name_ok(file: &str) -> bool {
    let plain = |f: &str| {
        !f.is_empty()
            && f.len() <= 64
            && f.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !f.starts_with('.')
    };
    match file.split_once('/') {
        None => plain(file),
        Some((dir, name)) => {
            // `m<vPID>` (a member's plan and image), or `<pid>` (a tree member's image).
            let digits = dir.strip_prefix('m').unwrap_or(dir);
            !digits.is_empty() && digits.len() <= 10 && digits.bytes().all(|b| b.is_ascii_digit()) && plain(name)
        }
    }
}

fn image_file_ok(agent: &Agent, from: NodeId, mid: u64, file: &str) -> bool {
    let valid = image_name_ok(file);
    let known = agent.moves.participating.lock().contains_key(&mid) && (mid >> 48) as u16 == from.0;
    if !valid || !known {
        tracing::warn!(peer = %agent.node_name(from), file, "image data for no move of that node (or a bad name); dropped");
    }
    valid && known
}

/// Pages pre-copied for a move that has not started yet.
pub struct PrecopyStore {
    pub data: dvk_checkpoint::sys::MappedFile,
    pub from: NodeId,
    touched: std::time::Instant,
}

/// A source's pre-copy that no data renewed for this long is dropped (its move never came).
const PRECOPY_IDLE: Duration = Duration::from_secs(120);
/// Pre-copies in flight from one source node, at most.
const PRECOPY_PER_NODE: usize = 4;

/// `MoveImageSize` for precopy.img: the store of move `mid` is created or grown to `len`.
/// It comes before the move's Start, so it is taken from the node that owns the move id
/// only, bounded in size and number per node, and dropped when idle, when the link to that
/// node goes down, or when the move ends.
fn precopy_size(agent: &Agent, from: NodeId, mid: u64, file: &str, len: u64) {
    if (mid >> 48) as u16 != from.0 || !image_name_ok(file) || len > MAX_PAGES {
        tracing::warn!(peer = %agent.node_name(from), mid, len, "pre-copy store refused (not that node's move, a bad name, or too large)");
        return;
    }
    let mut stores = agent.moves.precopy.lock();
    stores.retain(|_, p| p.touched.elapsed() < PRECOPY_IDLE);
    let key = (mid, file.to_owned());
    let held = stores.iter().map(|((m, f), p)| (*m, f.as_str(), p.from, p.data.bytes().len() as u64));
    if let Err(why) = admit_precopy(held, from, mid, file, len) {
        tracing::warn!(peer = %agent.node_name(from), mid, len, "pre-copy store refused: {why}");
        return;
    }
    let store = stores.entry(key.clone()).or_insert_with(|| PrecopyStore {
        data: dvk_checkpoint::sys::MappedFile::empty(),
        from,
        touched: std::time::Instant::now(),
    });
    store.touched = std::time::Instant::now();
    if let Err(e) = store.data.grow(len as usize) {
        tracing::error!(mid, len, "cannot hold the pre-copied pages in memory: {e}");
        stores.remove(&key);
    }
}

/// Whether a pre-copy store for (`mid`, `file`) of `len` bytes from `from` may be made or
/// grown, given the stores `held` (move, file, source, length): at most PRECOPY_PER_NODE moves
/// per source node, MAX_MEMBERS files and MAX_PAGES bytes per move.
fn admit_precopy<'a>(
    held: impl Iterator<Item = (u64, &'a str, NodeId, u64)>,
    from: NodeId,
    mid: u64,
    file: &str,
    len: u64,
) -> Result<(), &'static str> {
    let (mut moves, mut files, mut others, mut exists) = (std::collections::HashSet::new(), 0, 0u64, false);
    for (m, f, source, bytes) in held {
        if m == mid && f == file {
            exists = true;
            continue;
        }
        if source == from && m != mid {
            moves.insert(m);
        }
        if m == mid {
            files += 1;
            others += bytes;
        }
    }
    // A new move (no store of it yet) from a node that has PRECOPY_PER_NODE others.
    if !exists && files == 0 && moves.len() >= PRECOPY_PER_NODE {
        return Err("too many pre-copies from one node");
    }
    if !exists && files >= MAX_MEMBERS {
        return Err("too many processes in one move");
    }
    if others.saturating_add(len) > MAX_PAGES {
        return Err("too large");
    }
    Ok(())
}

/// Pre-copied pages of a process (`precopy.img`) or of a group move's member
/// (`m<vPID>/precopy.img`).
fn is_precopy(file: &str) -> bool {
    let precopy = dvk_checkpoint::precopy::PRECOPY;
    file == precopy || file.split_once('/').is_some_and(|(_, name)| name == precopy)
}

/// Part of move `mid`'s page data could not be taken: everything received for it is dropped,
/// so its restore fails (and the move rolls back) instead of running with a hole.
pub fn image_lost(agent: &Agent, from: NodeId, mid: u64, what: &str) {
    if (mid >> 48) as u16 != from.0 {
        return;
    }
    tracing::warn!(peer = %agent.node_name(from), mid, "{what}: the move's page data is dropped");
    drop_incoming(agent, mid);
}

/// `MoveImageSize`: the page data of move `mid` is received into memory (no file on the way).
pub fn image_size(agent: &Agent, from: NodeId, mid: u64, file: &str, len: u64) {
    if is_precopy(file) {
        return precopy_size(agent, from, mid, file, len);
    }
    if !is_pages(file) || !image_file_ok(agent, from, mid, file) {
        return;
    }
    let mut incoming = agent.moves.incoming.lock();
    // Every member's page data of one move together: at most MAX_PAGES, in at most
    // MAX_MEMBERS files.
    let (held, files) = incoming
        .iter()
        .filter(|((m, f), _)| *m == mid && f != file)
        .fold((0u64, 0usize), |(b, n), (_, data)| (b + data.bytes().len() as u64, n + 1));
    if len.saturating_add(held) > MAX_PAGES || files >= MAX_MEMBERS {
        tracing::warn!(mid, len, "page data beyond {MAX_PAGES} bytes or {MAX_MEMBERS} processes in one move refused");
        return;
    }
    match dvk_checkpoint::sys::MappedFile::anonymous(len as usize) {
        Ok(m) => {
            incoming.insert((mid, file.to_owned()), m);
        }
        Err(e) => tracing::error!(mid, len, "cannot hold the page data in memory: {e}"),
    }
}

/// A group move's members at most (each one's page data is held in memory until the restore).
const MAX_MEMBERS: usize = 256;

/// The page data of a process (`pages.img`) or of a group move's member (`m<vPID>/pages.img`).
fn is_pages(file: &str) -> bool {
    let pages = dvk_checkpoint::image::PAGES;
    file == pages || file.split_once('/').is_some_and(|(_, name)| name == pages)
}

/// Drops every page data of move `mid` received here (pre-copied too).
fn drop_incoming(agent: &Agent, mid: u64) {
    agent.moves.incoming.lock().retain(|(m, _), _| *m != mid);
    agent.moves.precopy.lock().retain(|(m, _), _| *m != mid);
}

/// `MoveImage` bytes from the move's source: page data into memory, other files into the
/// move's staging directory (names are checked: the sender can only write files of that one
/// directory).
pub fn receive_image(agent: &Agent, from: NodeId, mid: u64, file: &str, offset: u64, bytes: &[u8]) -> bool {
    use std::io::{Seek, SeekFrom, Write};
    if is_precopy(file) {
        let mut stores = agent.moves.precopy.lock();
        return match stores.get_mut(&(mid, file.to_owned())).filter(|p| p.from == from) {
            Some(p) => {
                p.touched = std::time::Instant::now();
                p.data
                    .write_at(offset as usize, bytes)
                    .map_err(|e| tracing::warn!(mid, "pre-copied page out of bounds: {e}"))
                    .is_ok()
            }
            None => false,
        };
    }
    if !image_file_ok(agent, from, mid, file) {
        return false;
    }
    if is_pages(file) {
        if let Some(m) = agent.moves.incoming.lock().get_mut(&(mid, file.to_owned())) {
            if let Err(e) = m.write_at(offset as usize, bytes) {
                tracing::warn!(mid, "page data out of bounds: {e}");
                return false;
            }
            return true;
        }
    }
    let dir = image_dir(agent, mid);
    if agent.fault == Some(super::Fault::StallImage) {
        tracing::warn!(mid, "test fault: stalling the image transfer (this node stops reading its link)");
        tokio::task::block_in_place(|| std::thread::sleep(Duration::from_secs(60)));
    }
    if offset.saturating_add(bytes.len() as u64) > MAX_PAGES {
        tracing::warn!(mid, file, "image file beyond {MAX_PAGES} bytes refused");
        return false;
    }
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        if let Some((member, _)) = file.split_once('/') {
            let sub = dir.join(member);
            if std::fs::create_dir(&sub).is_ok() {
                std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o700))?;
            }
        }
        let mut f =
            std::fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(dir.join(file))?;
        f.seek(SeekFrom::Start(offset))?;
        f.write_all(bytes)
    };
    // The small files (manifest, memfds, plan) go to tmpfs: off the reactor's hands, but in
    // order with the next frame. (Page data above is a memcpy into memory, done inline.)
    if let Err(e) = tokio::task::block_in_place(write) {
        tracing::error!(dir = %dir.display(), "cannot write image data: {e}");
        return false;
    }
    true
}

async fn execute(d: &mut Driver, m: &Participant, action: PartAction) {
    let agent = d.agent.clone();
    match action {
        PartAction::Reply(msg) => {
            if let Some(link) = agent.link(d.from) {
                let _ = link.write_now(PeerMessage::Move(msg)).await;
            }
        }
        PartAction::MarkMigrating { .. } => super::mark_migrating(&agent, &all_vpids(m), m.tag.mid).await,
        PartAction::DetachStream(stream) => {
            // Answered by on_message directly (it concerns ends, not the machine).
            let _ = stream;
        }
        PartAction::StartRestore => {
            let tx = d.tx.clone();
            // An image that came by rsync is in the kept image dir of the process.
            let dir = match super::rsync::received(&agent, m.tag.mid).await {
                None => image_dir(&agent, m.tag.mid),
                Some(Ok(dir)) => dir,
                Some(Err(e)) => {
                    let _ = tx.send(Input::Restored(Err(format!("the image did not arrive: {e}"))));
                    return;
                }
            };
            match prepare_copy(&agent, &dir).await {
                Ok(r) => {
                    let pid = r.members[0].pid;
                    let group = r.members[1..].iter().map(|m| (m.plan.entry.vpid, m.pid)).collect();
                    d.restore = Some(r);
                    let _ = tx.send(Input::Restored(Ok((pid, group))));
                }
                Err(e) => {
                    tracing::warn!(tag = %m.tag, "restore failed: {e}");
                    let _ = std::fs::remove_dir_all(&dir);
                    let _ = tx.send(Input::Restored(Err(e)));
                }
            }
        }
        PartAction::ResumeHeld => {
            if let Some(copy) = d.restore.take() {
                resume_copy(&agent, m, copy).await;
            }
        }
        PartAction::DiscardCopy => {
            drop_incoming(&agent, m.tag.mid);
            if let Some(copy) = d.restore.take() {
                copy.members.iter().for_each(discard);
                if let Some(h) = &copy.tree_holder {
                    let _ = h.send(HoldCmd::Kill);
                }
            }
            let _ = std::fs::remove_dir_all(image_dir(&agent, m.tag.mid));
        }
        PartAction::RouteCommitted { dest, pid, group } => {
            super::route_committed_all(&agent, m.vpid, pid, &group, m.tag.mid, dest)
        }
        PartAction::RouteRolledBack => super::route_rolled_back(&agent, &all_vpids(m), m.tag.mid),
    }
}

/// `vpid`'s sides of the streams between members of a group (stream id, the connecting
/// side?), those it holds fds on (a side queued in a listen backlog has none).
fn sides_of(group: &GroupPlan, vpid: Vpid) -> Vec<(u64, bool, InternalSide)> {
    group
        .internal
        .iter()
        .flat_map(|p| [(p.id, true, &p.client), (p.id, false, &p.server)])
        .filter(|(_, _, s)| s.vpid == vpid && !s.fds.is_empty())
        .map(|(id, client, s)| (id, client, s.clone()))
        .collect()
}

/// Kills a held copy and removes the listener files made for it.
fn discard(r: &Restoring) {
    if let Some(h) = &r.holder {
        let _ = h.send(HoldCmd::Kill);
    }
    for (_, l, _) in &r.listeners {
        l.remove();
    }
}

/// Restores the received image held: one process, or (`group.bin` beside `m<vPID>/`
/// directories) every member of a group move, all at once; if one fails, the others are killed.
async fn prepare_copy(agent: &Arc<Agent>, dir: &Path) -> Result<HeldCopy, String> {
    let group_bytes = match std::fs::read(dir.join(GROUP_FILE)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (r, _) = prepare_restore(agent, dir, String::new(), &[]).await?;
            return Ok(HeldCopy { members: vec![r], tree_holder: None, internal: Vec::new() });
        }
        Err(e) => return Err(format!("the group plan cannot be read: {e}")),
    };
    let group: GroupPlan = postcard::from_bytes(&group_bytes).map_err(|e| format!("the group plan is corrupt: {e}"))?;
    if group.members.is_empty() {
        return Err("the group plan names no process".into());
    }
    if group.tree {
        return prepare_tree(agent, dir, group).await;
    }
    // Every member restored at once (each by a thread of its own), held; if any fails, the
    // others are killed once they are complete.
    let last = group.members.len() - 1;
    let mut tasks = Vec::new();
    for (i, vpid) in group.members.iter().copied().enumerate() {
        let sides = sides_of(&group, vpid);
        let member = super::source::member_dir_name(vpid);
        let (agent, member_dir) = (agent.clone(), dir.join(&member));
        let fail = i == last && i > 0 && agent.fault == Some(super::Fault::FailLastMember);
        tasks.push(tokio::spawn(async move {
            if fail {
                return Err("test fault: the restore of the group's last process fails on this node".to_string());
            }
            let (r, ends) = prepare_restore(&agent, &member_dir, format!("{member}/"), &sides).await?;
            if r.plan.entry.vpid != vpid {
                discard(&r);
                return Err(format!("its image is of vPID {}", r.plan.entry.vpid));
            }
            Ok((r, ends))
        }));
    }
    let mut members: Vec<Restoring> = Vec::new();
    let mut ours: std::collections::HashMap<(u64, bool), UnixStream> = std::collections::HashMap::new();
    let mut failed = None;
    for (vpid, task) in group.members.iter().zip(tasks) {
        match task.await.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok((r, ends)) => {
                ours.extend(ends);
                members.push(r);
            }
            Err(e) => {
                failed.get_or_insert(format!("vPID {vpid} of the group: {e}"));
            }
        }
    }
    if let Some(e) = failed {
        members.iter().for_each(discard);
        return Err(e);
    }
    let internal = group
        .internal
        .into_iter()
        .map(|p| {
            let (c, s) = (ours.remove(&(p.id, true)), ours.remove(&(p.id, false)));
            (p, c, s)
        })
        .collect();
    Ok(HeldCopy { members, tree_holder: None, internal })
}

/// A process tree (`group.bin` says so): every member's sockets made from its plan (a
/// listener several members hold made once), then the tree image (`tree.img`, `<pid>/`)
/// restored held as one, under new pids (the frozen original may hold the old ones); each
/// member's Relink frame maps its children's pids for its shim.
async fn prepare_tree(agent: &Arc<Agent>, dir: &Path, group: GroupPlan) -> Result<HeldCopy, String> {
    if agent.fault == Some(super::Fault::FailRestore) {
        return Err("test fault: the restore fails on this node".into());
    }
    let mut shared = std::collections::HashMap::new();
    let mut built = Vec::new();
    for vpid in &group.members {
        let sides = sides_of(&group, *vpid);
        let b = build_sockets(agent, &dir.join(super::source::member_dir_name(*vpid)), &sides, &mut shared)
            .map_err(|e| format!("vPID {vpid} of the tree: {e}"))?;
        if b.plan.entry.vpid != *vpid {
            return Err(format!("vPID {vpid} of the tree: its plan is of vPID {}", b.plan.entry.vpid));
        }
        built.push(b);
    }
    let mut opts = RestoreOptions { new_pid: true, ..Default::default() };
    for (i, b) in built.iter().enumerate() {
        if i == 0 {
            opts.external_fds = b.external.clone();
        } else {
            opts.member_external.extend(b.external.iter().map(|(fd, ours)| (b.plan.entry.real_pid, *fd, *ours)));
        }
    }
    let (holder, cmds) = std::sync::mpsc::channel::<HoldCmd>();
    let (ready_tx, ready_rx) = oneshot::channel::<Result<Vec<(i32, i32)>, String>>();
    let tree_dir = dir.to_path_buf();
    std::thread::Builder::new()
        .name("restore-tree-held".into())
        .spawn(move || {
            let held = match dvk_checkpoint::tree::restore_held(&tree_dir, &opts) {
                Ok((report, held)) => {
                    let phases: Vec<String> =
                        report.phases.iter().map(|(n, t)| format!("{n} {:.1}", t.as_secs_f64() * 1000.0)).collect();
                    tracing::info!(pids = ?held.pids(), "process tree restored (held): {} ms", phases.join(", "));
                    let _ = ready_tx.send(Ok(held.pids().to_vec()));
                    held
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            match cmds.recv() {
                Ok(HoldCmd::Resume(done)) => {
                    let _ = done.send(held.resume().map_err(|e| e.to_string()));
                }
                // Kill, or the driver went away: the copy must not run.
                _ => {
                    let _ = held.kill();
                }
            }
        })
        .map_err(|e| format!("cannot start the restore thread: {e}"))?;
    let pids = ready_rx.await.map_err(|_| "the restore thread died".to_string())??;
    // Each member's shim knows its children by their old real pids: the frame maps them.
    let moved: Vec<RelinkRecord> =
        pids.iter().filter(|(old, new)| old != new).map(|(old, new)| RelinkRecord::child_pid(*old, *new)).collect();
    let mut members = Vec::new();
    let mut ours: std::collections::HashMap<(u64, bool), UnixStream> = std::collections::HashMap::new();
    for b in built {
        let old = b.plan.entry.real_pid;
        let Some(&(_, pid)) = pids.iter().find(|(o, _)| *o == old) else {
            let _ = holder.send(HoldCmd::Kill);
            return Err(format!("vPID {} (pid {old}) is not in the restored tree", b.plan.entry.vpid));
        };
        if let Err(e) = write_relink(agent, &b, &moved) {
            let _ = holder.send(HoldCmd::Kill);
            return Err(e);
        }
        let Built { plan, keep, stream_ends, listeners, mut made, link_end, internal_ends, .. } = b;
        made.0.clear();
        ours.extend(internal_ends);
        let member_dir = dir.join(super::source::member_dir_name(plan.entry.vpid));
        members.push(Restoring {
            plan,
            dir: member_dir,
            holder: None,
            pid,
            stream_ends,
            listeners,
            link_end,
            _replacements: keep,
        });
    }
    let internal = group
        .internal
        .into_iter()
        .map(|p| {
            let (c, s) = (ours.remove(&(p.id, true)), ours.remove(&(p.id, false)));
            (p, c, s)
        })
        .collect();
    Ok(HeldCopy { members, tree_holder: Some(holder), internal })
}

/// Commit on the destination: every member is registered and resumed; the streams between
/// members get their relay here, each side owed its unread bytes first.
async fn resume_copy(agent: &Arc<Agent>, m: &Participant, copy: HeldCopy) {
    let listeners: std::collections::HashMap<(Vpid, u16), crate::listener::ListenerFile> = copy
        .members
        .iter()
        .flat_map(|r| r.listeners.iter().map(|(e, l, _)| ((r.plan.entry.vpid, e.port), l.clone())))
        .collect();
    for (p, client, server) in copy.internal {
        let mut ends = Vec::new();
        for (side, ours, mut owed) in
            [(&p.client, client, p.to_client.clone()), (&p.server, server, p.to_server.clone())]
        {
            let end = match (ours, side.backlog_of) {
                (Some(s), _) => {
                    let _ = s.set_nonblocking(true);
                    tokio::net::UnixStream::from_std(s).ok().map(End::Unix)
                }
                // Queued in the backlog at the freeze: queued into the new listener.
                (None, Some(port)) => match listeners.get(&(side.vpid, port)) {
                    Some(l) => l.connect().await.ok().map(End::Unix),
                    None => None,
                },
                (None, None) => None,
            };
            let mut first = Dir { pending: side.unread.clone(), ended: false };
            first.append(std::mem::take(&mut owed));
            ends.push((end, first));
        }
        let mut sides = ends.into_iter();
        let (Some((Some(c), to_client)), Some((Some(s), to_server))) = (sides.next(), sides.next()) else {
            tracing::warn!(stream = p.id, "a stream between members of the group cannot be rebuilt here; it ends");
            continue;
        };
        relay::spawn_local(agent, p.id, c, s, to_server, to_client);
    }
    // Every member registered (and saved) before any runs: the group is committed here as one.
    let entries: Vec<pidvirt::ProcessEntry> = copy.members.iter().map(|r| register_here(agent, m, r)).collect();
    crate::registry::save_now(agent);
    for (r, entry) in copy.members.into_iter().zip(entries) {
        resume_registered(agent, m, r, entry).await;
    }
    if let Some(holder) = copy.tree_holder {
        let (tx, rx) = oneshot::channel();
        let _ = holder.send(HoldCmd::Resume(tx));
        match rx.await {
            Ok(Ok(())) => tracing::info!(vpid = %m.vpid, tag = %m.tag, "moved process tree resumed here"),
            Ok(Err(e)) => tracing::error!(vpid = %m.vpid, "resume of the process tree failed: {e}"),
            Err(_) => tracing::error!(vpid = %m.vpid, "the restore thread died before resuming the tree"),
        }
    }
    // A group move's own directory (each member's was removed with it).
    let _ = std::fs::remove_dir_all(image_dir(agent, m.tag.mid));
}

/// The process of the move and the others of a group move.
fn all_vpids(m: &Participant) -> Vec<Vpid> {
    std::iter::once(m.vpid).chain(m.group.iter().copied()).collect()
}

/// Builds the process's new sockets, queues the Relink frame, and restores the image held.
/// A process's new sockets, made from its move plan before its image is restored: the fds to
/// replace (image fd → ours), the Relink records, and our ends.
struct Built {
    plan: MovePlan,
    external: Vec<(i32, i32)>,
    keep: Vec<OwnedFd>,
    records: Vec<RelinkRecord>,
    stream_ends: Vec<(u64, UnixStream)>,
    listeners: Vec<(EndpointEntry, crate::listener::ListenerFile, UnixListener)>,
    /// Listener files made here (removed again if the restore does not get to the end).
    made: ListenerFiles,
    link_end: UnixStream,
    internal_ends: Vec<((u64, bool), UnixStream)>,
}

/// Reads the plan in `dir` and makes the process's new sockets (`internal`: its sides of
/// streams between members of a group move). `shared`: listeners already made for another
/// member of the same tree, by (endpoint vPID, port) → (our fd, its inode).
fn build_sockets(
    agent: &Arc<Agent>,
    dir: &Path,
    internal: &[(u64, bool, InternalSide)],
    shared: &mut std::collections::HashMap<(Vpid, u16), (i32, u64)>,
) -> Result<Built, String> {
    let plan_bytes = std::fs::read(dir.join(PLAN_FILE)).map_err(|e| format!("the move plan is missing: {e}"))?;
    let plan: MovePlan = postcard::from_bytes(&plan_bytes).map_err(|e| format!("the move plan is corrupt: {e}"))?;
    let uid = plan.entry.uid;
    let mut external: Vec<(i32, i32)> = Vec::new();
    let mut keep: Vec<OwnedFd> = Vec::new();
    let mut records: Vec<RelinkRecord> = Vec::new();
    let ino = |fd: &dyn AsRawFd| crate::sys::inode(&fd.as_raw_fd()).unwrap_or(0);

    let (link_end, link_prog) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    if let Some(l) = &plan.link {
        records.push(RelinkRecord { fd: l.fd, old_ino: l.old_ino, new_ino: ino(&link_prog) });
        external.push((l.fd, link_prog.as_raw_fd()));
    }
    keep.push(OwnedFd::from(link_prog));

    let ep_dir = agent.me.runtime_dir.join(crate::endpoints::LISTENER_DIR);
    let mut listeners = Vec::new();
    // Listener files made here are removed again if the restore does not get to the end.
    let mut made = ListenerFiles(Vec::new());
    for l in &plan.listeners {
        // In a process tree, a listener another member holds too was made once, by the first.
        if let Some((raw, new_ino)) = shared.get(&(l.endpoint.vpid, l.endpoint.port)).copied() {
            for f in &l.fds {
                records.push(RelinkRecord { fd: f.fd, old_ino: f.old_ino, new_ino });
                external.push((f.fd, raw));
            }
            continue;
        }
        let path = ep_dir.join(format!("moved-{}-{}-{:x}.sock", plan.entry.vpid.0, l.endpoint.port, plan.tag.mid));
        let _ = std::fs::remove_file(&path);
        let sock = UnixListener::bind(&path).map_err(|e| format!("cannot listen at {}: {e}", path.display()))?;
        made.0.push(path.clone());
        // Opened before it is given away: once it is the user's she may rename things over it.
        let mut file = crate::listener::ListenerFile::open(&path, 0).map_err(|e| e.to_string())?;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        file.chown(uid).map_err(|e| format!("chown {}: {e}", path.display()))?;
        crate::sys::listen_backlog(&sock, 4096);
        for f in &l.fds {
            records.push(RelinkRecord { fd: f.fd, old_ino: f.old_ino, new_ino: ino(&sock) });
            external.push((f.fd, sock.as_raw_fd()));
        }
        shared.insert((l.endpoint.vpid, l.endpoint.port), (sock.as_raw_fd(), ino(&sock)));
        listeners.push((l.endpoint.clone(), file, sock));
    }
    let mut stream_ends = Vec::new();
    for s in plan.streams.iter().filter(|s| !s.fds.is_empty()) {
        let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
        for f in &s.fds {
            records.push(RelinkRecord { fd: f.fd, old_ino: f.old_ino, new_ino: ino(&theirs) });
            external.push((f.fd, theirs.as_raw_fd()));
        }
        keep.push(OwnedFd::from(theirs));
        stream_ends.push((s.id, ours));
    }
    let mut internal_ends = Vec::new();
    for (id, client, side) in internal {
        let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
        for f in &side.fds {
            records.push(RelinkRecord { fd: f.fd, old_ino: f.old_ino, new_ino: ino(&theirs) });
            external.push((f.fd, theirs.as_raw_fd()));
        }
        keep.push(OwnedFd::from(theirs));
        internal_ends.push(((*id, *client), ours));
    }
    for c in &plan.closed {
        let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
        for f in &c.fds {
            records.push(RelinkRecord { fd: f.fd, old_ino: f.old_ino, new_ino: ino(&theirs) });
            external.push((f.fd, theirs.as_raw_fd()));
        }
        keep.push(OwnedFd::from(theirs));
        // Its bytes, then EOF (written by a thread: the process reads them once it runs).
        let unread = c.unread.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut ours = ours;
            let _ = ours.write_all(&unread);
            let _ = ours.shutdown(std::net::Shutdown::Write);
        });
    }
    if let Some(carried) = &plan.log {
        // The log it had on the source, continued here.
        let path = log_path_for(agent, plan.entry.vpid);
        tracing::info!(bytes = carried.len(), log = %path.display(), "the process's log follows it here");
        let _ = std::fs::create_dir_all(path.parent().unwrap_or(Path::new("/")));
        let written = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, carried));
        if let Err(e) = written {
            return Err(format!("cannot write the log {}: {e}", path.display()));
        }
        let _ = std::os::unix::fs::chown(&path, Some(uid), None);
    }
    for (fd, r) in &plan.stdio {
        let f = match r {
            Redirect::Null => std::fs::OpenOptions::new().read(true).write(true).open("/dev/null"),
            Redirect::Log => {
                let path = log_path_for(agent, plan.entry.vpid);
                let _ = std::fs::create_dir_all(path.parent().unwrap_or(Path::new("/")));
                // vPIDs are reused: a log left by an earlier holder of this vPID of another
                // user is not this process's to append to (its owner could then read it).
                if std::fs::symlink_metadata(&path).is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) != uid) {
                    let _ = std::fs::remove_file(&path);
                }
                let f = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&path);
                if f.is_ok() {
                    let _ = std::os::unix::fs::chown(&path, Some(uid), None);
                }
                f
            }
        }
        .map_err(|e| format!("cannot open the redirection of fd {fd}: {e}"))?;
        external.push((*fd, f.as_raw_fd()));
        keep.push(OwnedFd::from(f));
    }
    Ok(Built { plan, external, keep, records, stream_ends, listeners, made, link_end, internal_ends })
}

/// Queues the Relink frame of `built` (and `extra` records) on the process's new link.
fn write_relink(agent: &Agent, built: &Built, extra: &[RelinkRecord]) -> Result<(), String> {
    let agent_socket = agent.me.socket_path();
    let mut records = built.records.clone();
    records.extend_from_slice(extra);
    let frame = relink::encode(agent_socket.as_os_str().as_encoded_bytes(), &records)
        .map_err(|e| format!("cannot build the relink frame: {e:?}"))?;
    use std::io::Write;
    (&built.link_end).write_all(&frame).map_err(|e| format!("cannot queue the relink frame: {e}"))
}

/// `internal`: the process's sides of streams between members of a group move (stream id, the
/// connecting side?): a new socket each, whose other end is returned.
#[allow(clippy::type_complexity)]
async fn prepare_restore(
    agent: &Arc<Agent>,
    dir: &Path,
    prefix: String,
    internal: &[(u64, bool, InternalSide)],
) -> Result<(Restoring, Vec<((u64, bool), UnixStream)>), String> {
    if agent.fault == Some(super::Fault::HoldRestore) {
        tracing::warn!("test fault: holding the restore for 2 s");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let pages_key = (mid_of(dir), format!("{prefix}{}", dvk_checkpoint::image::PAGES));
    match agent.fault {
        Some(super::Fault::FailRestore) => return Err("test fault: the restore fails on this node".into()),
        Some(super::Fault::CorruptImage) if agent.moves.incoming.lock().contains_key(&pages_key) => {
            tracing::warn!("test fault: corrupting the received page data");
            if let Some(m) = agent.moves.incoming.lock().get_mut(&pages_key) {
                let at = m.bytes().len() / 2;
                let b = m.bytes().get(at).copied().unwrap_or(0);
                let _ = m.write_at(at, &[b ^ 0x5a]);
            }
        }
        Some(super::Fault::CorruptImage) => {
            use std::io::{Read, Seek, SeekFrom, Write};
            tracing::warn!("test fault: corrupting the received page file");
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(dir.join("pages.img"))
                .map_err(|e| format!("pages.img: {e}"))?;
            let mut b = [0u8; 1];
            let at = f.metadata().map(|m| m.len() / 2).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(at)).and_then(|_| f.read_exact(&mut b));
            b[0] ^= 0x5a;
            let _ = f.seek(SeekFrom::Start(at)).and_then(|_| f.write_all(&b));
        }
        _ => {}
    }
    let built = build_sockets(agent, dir, internal, &mut std::collections::HashMap::new())?;
    write_relink(agent, &built, &[])?;
    let Built { plan, keep, external, stream_ends, listeners, mut made, link_end, internal_ends, .. } = built;
    let (holder, cmds) = std::sync::mpsc::channel::<HoldCmd>();
    let (ready_tx, ready_rx) = oneshot::channel();
    let dir2 = dir.to_path_buf();
    let pages =
        agent.moves.incoming.lock().remove(&(plan.tag.mid, format!("{prefix}{}", dvk_checkpoint::image::PAGES)));
    let precopy_key = (plan.tag.mid, format!("{prefix}{}", dvk_checkpoint::precopy::PRECOPY));
    let precopy = agent.moves.precopy.lock().remove(&precopy_key).map(|p| p.data);
    // Pre-copied pages are already here: the process may run before they are all in it.
    let opts = RestoreOptions { external_fds: external, lazy_precopy: precopy.is_some(), ..Default::default() };
    let agent2 = agent.clone();
    std::thread::Builder::new()
        .name("restore-held".into())
        .spawn(move || {
            let restored = match pages {
                Some(pages) => {
                    let precopy = precopy.unwrap_or_else(dvk_checkpoint::sys::MappedFile::empty);
                    dvk_checkpoint::restore_held_with_pages(&dir2, pages, precopy, &opts)
                }
                None => dvk_checkpoint::restore_held(&dir2, &opts),
            };
            let held = match restored {
                Ok((report, held)) => {
                    let phases: Vec<String> =
                        report.phases.iter().map(|(n, t)| format!("{n} {:.1}", t.as_secs_f64() * 1000.0)).collect();
                    tracing::info!(
                        pid = held.pid(),
                        lazy_mb = report.lazy_bytes as f64 / 1048576.0,
                        "restored (held): {} ms",
                        phases.join(", ")
                    );
                    for n in &report.notes {
                        tracing::warn!(pid = held.pid(), "restore: {n}");
                    }
                    let _ = ready_tx.send(Ok(held.pid()));
                    held
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            match cmds.recv() {
                Ok(HoldCmd::Resume(done)) => {
                    let pid = held.pid();
                    agent2.moves.filling.lock().insert(pid);
                    let resumed = held.resume_guarded();
                    let guarded = match resumed {
                        Ok(g) => {
                            let _ = done.send(Ok(()));
                            g
                        }
                        Err(e) => {
                            let _ = done.send(Err(e.to_string()));
                            None
                        }
                    };
                    if guarded.is_none() {
                        agent2.moves.filling.lock().remove(&pid);
                    }
                    if let Some(guarded) = guarded {
                        if let Some(why) = guarded.unguarded() {
                            tracing::warn!(pid, "the copy-in of pre-copied memory runs unguarded: {why}");
                        }
                        // This thread is the tracer: it passes the process's signals on until
                        // its memory is in (if the agent died meanwhile, the kernel kills it).
                        let st = guarded.finish();
                        tracing::info!(
                            pid,
                            copied_mb = st.copied as f64 / 1048576.0,
                            faulted_mb = st.faulted as f64 / 1048576.0,
                            faults = st.faults,
                            processes = st.processes,
                            dropped_mb = st.dropped as f64 / 1048576.0,
                            exited = st.exited_guarded,
                            "pre-copied memory copied in behind the running process in {:.1} ms",
                            st.took.as_secs_f64() * 1000.0
                        );
                        agent2.moves.filling.lock().remove(&pid);
                    }
                }
                // Kill, or the driver went away: the copy must not run.
                _ => {
                    let _ = held.kill();
                }
            }
        })
        .map_err(|e| format!("cannot start the restore thread: {e}"))?;
    let pid = ready_rx.await.map_err(|_| "the restore thread died".to_string())??;
    made.0.clear();
    Ok((
        Restoring {
            plan,
            dir: dir.to_path_buf(),
            holder: Some(holder),
            pid,
            stream_ends,
            listeners,
            link_end,
            _replacements: keep,
        },
        internal_ends,
    ))
}

/// The held copy's process in this node's tables (as running here, under its vPID): before
/// it is resumed, so that a Query after a crash of this agent finds it committed.
fn register_here(agent: &Arc<Agent>, m: &Participant, r: &Restoring) -> pidvirt::ProcessEntry {
    let plan = &r.plan;
    let vpid = plan.entry.vpid;
    let me = agent.node_id();
    let start_time = crate::procinfo::read(r.pid).map(|i| i.start_time).unwrap_or(0);
    let mut entry = plan.entry.clone();
    entry.node = me;
    entry.real_pid = r.pid;
    let link_ino = crate::sys::inode(&r.link_end).unwrap_or(0);
    {
        let mut t = agent.tables.lock();
        t.routing.upsert(entry.clone());
        t.start_times.insert(vpid, start_time);
        t.link_inodes.insert(vpid, link_ino);
        for (ep, file, _) in &r.listeners {
            let mut e = ep.clone();
            e.node = me;
            t.routing.upsert_endpoint(e.clone());
            t.listeners.insert(e.key(), vec![file.clone()]);
        }
    }
    agent.moves.epochs.lock().insert(vpid, m.tag.epoch + 1);
    entry
}

/// Commit on the destination, once registered: reattach the process's streams, requeue its
/// backlog, then let it run.
async fn resume_registered(agent: &Arc<Agent>, m: &Participant, r: Restoring, entry: pidvirt::ProcessEntry) {
    let plan = &r.plan;
    let vpid = plan.entry.vpid;
    let me = agent.node_id();

    // Streams: our new ends, with the bytes owed first.
    let mut ends: std::collections::HashMap<u64, UnixStream> = r.stream_ends.into_iter().collect();
    let listener_files: std::collections::HashMap<u16, crate::listener::ListenerFile> =
        r.listeners.iter().map(|(e, l, _)| (e.port, l.clone())).collect();
    for s in &plan.streams {
        let mut owed = Dir { pending: s.unread.clone(), ended: false };
        owed.append(s.to_program.clone());
        let end = if s.fds.is_empty() {
            // Queued in a listen backlog at the freeze: queue it into the new listener, in order.
            let Some(listener) = s.backlog_of.and_then(|p| listener_files.get(&p)) else { continue };
            match listener.connect().await {
                Ok(c) => End::Unix(c),
                Err(e) => {
                    tracing::warn!(stream = s.id, "cannot requeue a backlog connection: {e}");
                    continue;
                }
            }
        } else {
            let Some(std_end) = ends.remove(&s.id) else { continue };
            let _ = std_end.set_nonblocking(true);
            match tokio::net::UnixStream::from_std(std_end) {
                Ok(e) => End::Unix(e),
                Err(_) => continue,
            }
        };
        if s.reset {
            streams::finish_alone(end, owed);
            continue;
        }
        streams::reattach_moving(agent, m.tag, s.id, end, s.moving_is_client, s.fixed_node, owed, s.to_fixed.clone())
            .await;
    }
    drop(r._replacements);

    // The link: the agent's end of the process's new registration connection.
    tokio::spawn(hold_link(r.link_end));
    // A tree member is resumed with the tree, once every member is reattached.
    if let Some(holder) = &r.holder {
        let (tx, rx) = oneshot::channel();
        let _ = holder.send(HoldCmd::Resume(tx));
        match rx.await {
            Ok(Ok(())) => tracing::info!(%vpid, pid = r.pid, tag = %m.tag, "moved process resumed here"),
            Ok(Err(e)) => tracing::error!(%vpid, pid = r.pid, "resume failed: {e}"),
            Err(_) => tracing::error!(%vpid, "the restore thread died before resuming"),
        }
    }
    let kept = super::kept::KeptImages::of(agent);
    if r.dir == kept.dir(vpid) {
        // The image it came with stays: a move of it back here sends only the delta.
        super::kept::enforce_cap(agent);
    } else {
        let _ = std::fs::remove_dir_all(&r.dir);
    }
    if let Ok(pidfd) = crate::sys::pidfd_open(r.pid) {
        tokio::spawn(crate::local::watch_exit(agent.clone(), vpid, r.pid, pidfd));
    }
    agent.broadcast(PeerMessage::ProcessUp(entry));
    for (ep, _, _) in &r.listeners {
        let mut e = ep.clone();
        e.node = me;
        agent.broadcast(PeerMessage::EndpointUp(e));
    }
    crate::registry::save(agent);
}

/// Keeps the agent's end of a moved process's link open (the shim reads its Relink frame from
/// it) until the process closes it.
async fn hold_link(end: UnixStream) {
    let _ = end.set_nonblocking(true);
    let Ok(end) = tokio::net::UnixStream::from_std(end) else { return };
    let mut buf = [0u8; 512];
    loop {
        let _ = end.readable().await;
        match end.try_read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::image_name_ok;

    #[test]
    fn pre_copy_stores_are_bounded_per_node_and_per_move() {
        use super::{admit_precopy, MAX_MEMBERS, MAX_PAGES, PRECOPY_PER_NODE};
        use pidvirt::NodeId;
        let (a, b) = (NodeId(1), NodeId(2));
        let files: Vec<String> = (0..MAX_MEMBERS + 1).map(|i| format!("m{i}/precopy.img")).collect();
        // Moves of node a: PRECOPY_PER_NODE of them are taken, one more is not; node b's are its own.
        let held: Vec<(u64, &str, NodeId, u64)> =
            (0..PRECOPY_PER_NODE as u64).map(|m| (m, "precopy.img", a, 4096)).collect();
        let next = PRECOPY_PER_NODE as u64;
        assert!(admit_precopy(held.iter().copied(), a, next, "precopy.img", 4096).is_err());
        assert!(admit_precopy(held.iter().copied(), b, next, "precopy.img", 4096).is_ok());
        // A store already held may grow; another member's file of a held move may be added.
        assert!(admit_precopy(held.iter().copied(), a, 0, "precopy.img", 1 << 20).is_ok());
        assert!(admit_precopy(held.iter().copied(), a, 0, "m7/precopy.img", 4096).is_ok());
        // One move: at most MAX_MEMBERS files, at most MAX_PAGES bytes in all.
        let group: Vec<(u64, &str, NodeId, u64)> =
            files[..MAX_MEMBERS].iter().map(|f| (9, f.as_str(), a, 4096)).collect();
        assert!(admit_precopy(group.iter().copied(), a, 9, &files[MAX_MEMBERS], 4096).is_err());
        assert!(admit_precopy(group.iter().copied(), a, 9, &files[0], 8192).is_ok());
        let big = [(9, "m1/precopy.img", a, MAX_PAGES - 4096)];
        assert!(admit_precopy(big.iter().copied(), a, 9, "m2/precopy.img", 8192).is_err());
        assert!(admit_precopy(big.iter().copied(), a, 9, "m2/precopy.img", 4096).is_ok());
        assert!(admit_precopy(std::iter::empty(), a, 9, "precopy.img", MAX_PAGES + 1).is_err());
    }

    #[test]
    fn a_source_names_files_of_the_move_directory_or_of_a_member_directory_only() {
        for ok in ["pages.img", "plan.bin", "group.bin", "m4194305/pages.img", "m1/manifest.img", "4242/pages.img"] {
            assert!(image_name_ok(ok), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "../x",
            "m4194305/../x",
            "m/x",
            "mx1/x",
            "m1/",
            "m1/.x",
            "m1/a/b",
            "/etc/passwd",
            "m12345678901/x",
            "a b",
        ] {
            assert!(!image_name_ok(bad), "{bad}");
        }
    }
}
