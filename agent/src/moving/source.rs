//! The source side of a move: the driver of [`dvk_move::Coordinator`]. It runs as one task per
//! move; the machine decides, this code carries out its actions (freeze, detach, dump, transfer,
//! kill or thaw) and feeds back what happened. The ptrace work runs on one thread of its own
//! (`freezer`): only the thread that froze a process may thaw or kill it.

use super::classify::{self, Classified};
use super::plan::{
    ClosedPlan, FdRef, GroupPlan, InternalPlan, InternalSide, ListenerPlan, MovePlan, Redirect, StreamPlan, GROUP_FILE,
    PLAN_FILE,
};
use super::streams::{self, HeldFixed};
use crate::relay::{self, Dir, End, HeldEnd, Inbound, Left};
use crate::state::Agent;
use dvk_checkpoint::sys as ck;
use dvk_checkpoint::{DumpOptions, Frozen, PrecopyRef};
use dvk_move::{CoordAction, CoordEvent, Coordinator, MoveMsg, MoveTag, Outcome};
use dvk_protocol::local::{LocalResponse, MoveOptions, MoveReport, MoveStep, Transfer};
use dvk_protocol::peer::PeerMessage;
use pidvirt::{EndpointEntry, NodeId, ProcessEntry, Vpid};
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Image bytes per MoveImage message.
const IMAGE_CHUNK: usize = dvk_protocol::peer::MAX_IMAGE_CHUNK;
/// At most this many unread bytes are carried per socket.
const MAX_UNREAD: usize = 64 << 20;

pub enum Input {
    Peer(NodeId, MoveMsg),
    Link(NodeId, bool),
}

pub struct Request {
    pub vpid: Vpid,
    /// The other processes of a group move (`move --group`).
    pub group: Vec<Vpid>,
    pub dest: NodeId,
    pub options: MoveOptions,
    /// Who asks (root or the owner may move a process).
    pub uid: u32,
    pub reply: mpsc::UnboundedSender<LocalResponse>,
}

enum FreezeCmd {
    Image(PathBuf, Box<DumpOptions>, oneshot::Sender<Result<dvk_checkpoint::DumpReport, String>>),
    ExitKill(bool),
    Kill(oneshot::Sender<()>),
    Thaw(oneshot::Sender<Result<(), String>>),
}

/// What a freezer thread holds, frozen by it (ptrace is per tracer thread): one process, or a
/// whole process tree.
trait FrozenHere {
    fn image(
        &mut self,
        dir: &std::path::Path,
        opts: &DumpOptions,
    ) -> dvk_checkpoint::Result<dvk_checkpoint::DumpReport>;
    fn exit_kill(&mut self, on: bool) -> dvk_checkpoint::Result<()>;
    fn kill_all(self) -> dvk_checkpoint::Result<()>;
    fn thaw_all(self) -> dvk_checkpoint::Result<()>;
}

impl FrozenHere for Frozen {
    fn image(
        &mut self,
        dir: &std::path::Path,
        opts: &DumpOptions,
    ) -> dvk_checkpoint::Result<dvk_checkpoint::DumpReport> {
        dvk_checkpoint::write_image(self, dir, opts)
    }
    fn exit_kill(&mut self, on: bool) -> dvk_checkpoint::Result<()> {
        self.set_exit_kill(on)
    }
    fn kill_all(self) -> dvk_checkpoint::Result<()> {
        self.kill()
    }
    fn thaw_all(self) -> dvk_checkpoint::Result<()> {
        self.thaw(false)
    }
}

impl FrozenHere for dvk_checkpoint::tree::FrozenTree {
    fn image(
        &mut self,
        dir: &std::path::Path,
        opts: &DumpOptions,
    ) -> dvk_checkpoint::Result<dvk_checkpoint::DumpReport> {
        self.write_image(dir, opts)
    }
    fn exit_kill(&mut self, on: bool) -> dvk_checkpoint::Result<()> {
        self.set_exit_kill(on)
    }
    fn kill_all(self) -> dvk_checkpoint::Result<()> {
        self.kill()
    }
    fn thaw_all(self) -> dvk_checkpoint::Result<()> {
        self.thaw()
    }
}

/// Runs `freeze` on a thread of its own, then serves commands on what it froze until kill or
/// thaw (dropping the sender thaws: the guards put everything back). `pid` is the process (the
/// tree's root) reaped after a kill.
fn spawn_freezer_with<F: FrozenHere + 'static>(
    pid: i32,
    name: String,
    freeze: impl FnOnce() -> Result<F, String> + Send + 'static,
) -> (std::sync::mpsc::Sender<FreezeCmd>, oneshot::Receiver<Result<(), String>>) {
    let (tx, rx) = std::sync::mpsc::channel::<FreezeCmd>();
    let (ready_tx, ready_rx) = oneshot::channel();
    let spawned = std::thread::Builder::new().name(name).spawn(move || {
        let mut frozen = match freeze() {
            Ok(f) => {
                let _ = ready_tx.send(Ok(()));
                f
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        while let Ok(cmd) = rx.recv() {
            match cmd {
                FreezeCmd::Image(dir, opts, done) => {
                    let _ = done.send(frozen.image(&dir, &opts).map_err(|e| e.to_string()));
                }
                FreezeCmd::ExitKill(on) => {
                    if let Err(e) = frozen.exit_kill(on) {
                        tracing::warn!(pid, "cannot set PTRACE_O_EXITKILL: {e}");
                    }
                }
                FreezeCmd::Kill(done) => {
                    let _ = frozen.kill_all();
                    crate::sys::reap(pid);
                    let _ = done.send(());
                    return;
                }
                FreezeCmd::Thaw(done) => {
                    let _ = frozen.exit_kill(false);
                    let _ = done.send(frozen.thaw_all().map_err(|e| e.to_string()));
                    return;
                }
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!("cannot start the freezer thread: {e}");
    }
    (tx, ready_rx)
}

/// Freezes `pid` on a thread of its own (see [`spawn_freezer_with`]).
fn spawn_freezer(pid: i32) -> (std::sync::mpsc::Sender<FreezeCmd>, oneshot::Receiver<Result<(), String>>) {
    spawn_freezer_with(pid, format!("freeze-{pid}"), move || Frozen::freeze(pid).map_err(|e| e.to_string()))
}

/// Freezes the process tree under `root` on a thread of its own (the tracer of every member).
/// `expected`: the live members' pids the preflight saw, in tree order; a tree that changed
/// since is thawed and the freeze fails (the move rolls back: try again).
fn spawn_tree_freezer(
    root: i32,
    expected: Vec<i32>,
) -> (std::sync::mpsc::Sender<FreezeCmd>, oneshot::Receiver<Result<(), String>>) {
    spawn_freezer_with(root, format!("freeze-tree-{root}"), move || {
        let frozen = dvk_checkpoint::tree::FrozenTree::freeze(root).map_err(|e| e.to_string())?;
        let live: Vec<i32> = frozen.members().iter().filter(|m| m.zombie.is_none()).map(|m| m.pid).collect();
        if live != expected {
            // Dropping `frozen` thaws every member.
            return Err(format!(
                "the process tree changed since the preflight (processes {expected:?}, now {live:?}); try again"
            ));
        }
        Ok(frozen)
    })
}

/// One stream of the moving process, as the source handles it.
struct StreamWork {
    plan: StreamPlan,
    /// The agent's end facing the process (original socket) — reattached on rollback.
    moving_end: Option<HeldEnd>,
    /// A connection taken out of a listen backlog (its bytes are in `plan.unread`).
    backlog_conn: Option<OwnedFd>,
    /// The stream's inbound queue, drained once the fixed end confirmed it stopped.
    rx: Option<mpsc::UnboundedReceiver<Inbound>>,
}

/// A stream between two processes of a group move: both ends move, and the relay between
/// them is made again on whichever node they run on next.
struct InternalWork {
    plan: InternalPlan,
    /// The agent's ends of the original sockets (client, server) — reattached on rollback.
    ends: Option<(HeldEnd, HeldEnd)>,
    /// A side still queued in a listen backlog: the connection taken out of it.
    backlog_conn: [Option<OwnedFd>; 2],
}

/// One process of the move: the one asked for, or another of a group move.
struct Member {
    entry: ProcessEntry,
    /// The pre-copy tracker, from the end of the rounds until the dump (dropping it removes
    /// every trace of tracking from the process).
    precopy: Option<PrecopyRef>,
    freezer: Option<std::sync::mpsc::Sender<FreezeCmd>>,
    classified: Classified,
    endpoints: Vec<EndpointEntry>,
    streams: BTreeMap<u64, StreamWork>,
    closed: Vec<ClosedPlan>,
}

impl Member {
    fn freezer(&self, cmd: FreezeCmd) {
        if let Some(f) = &self.freezer {
            let _ = f.send(cmd);
        }
    }
}

struct Driver {
    agent: Arc<Agent>,
    /// The process asked for first; for a group move, the others follow it; for a process
    /// tree, its root and then every descendant, parents first.
    members: Vec<Member>,
    /// The members are a process tree: frozen, dumped and restored as one (the root's freezer
    /// thread holds the whole tree; the others have none).
    tree: bool,
    /// Streams between members of a group move, by stream id.
    internal: BTreeMap<u64, InternalWork>,
    tag: MoveTag,
    dest: NodeId,
    reply: mpsc::UnboundedSender<LocalResponse>,
    image_dir: PathBuf,
    image_bytes: u64,
    /// Bytes sent by pre-copy rounds (part of the image size reported).
    precopy_bytes: u64,
    /// Page data goes as LZ4 blocks (`move --compress`).
    compress: bool,
    /// How the image travels (`move --transfer`).
    transfer: Transfer,
    /// Bytes the transfer put on the agent link (pre-copy included).
    sent_bytes: u64,
    steps: Vec<MoveStep>,
    started: Instant,
    step_start: Instant,
    frozen_at: Option<Instant>,
    frozen_for: Option<Duration>,
    log_path: Option<String>,
    /// A group move: the others' pids on the destination, as it restored them.
    restored_group: Vec<(Vpid, i32)>,
}

impl Driver {
    fn step(&mut self, name: &str, detail: String) {
        let now = Instant::now();
        let s = MoveStep { name: name.into(), micros: (now - self.step_start).as_micros() as u64, detail };
        self.step_start = now;
        let _ = self.reply.send(LocalResponse::MoveStep(s.clone()));
        self.steps.push(s);
    }

    /// The process asked for (the first of a group).
    fn lead(&self) -> &ProcessEntry {
        &self.members[0].entry
    }

    fn is_group(&self) -> bool {
        self.members.len() > 1
    }

    fn vpids(&self) -> Vec<Vpid> {
        self.members.iter().map(|m| m.entry.vpid).collect()
    }

    /// A member's image directory in a group move's (each is a process image of its own).
    fn member_dir(&self, i: usize) -> PathBuf {
        if self.is_group() {
            self.image_dir.join(member_dir_name(self.members[i].entry.vpid))
        } else {
            self.image_dir.clone()
        }
    }
}

/// `m<vPID>`: the directory of a group member's image in the move's image directory.
pub fn member_dir_name(vpid: Vpid) -> String {
    format!("m{}", vpid.0)
}

/// Runs a move requested on this node (or forwarded here) to its end; the last message on
/// `reply` is `MoveDone` or `Error`.
pub async fn run(agent: Arc<Agent>, req: Request) {
    let reply = req.reply.clone();
    match prepare(&agent, &req).await {
        Err(message) => {
            let _ = reply.send(LocalResponse::Error { message });
        }
        Ok((driver, coordinator, rx)) => {
            let vpids = driver.vpids();
            drive(driver, coordinator, rx).await;
            let mut c = agent.moves.coordinating.lock();
            for v in vpids {
                c.remove(&v);
            }
        }
    }
}

/// The live processes of the tree under `root` (zombies go in the tree image), root first,
/// parents before children, by vPID: every one must be under the shim, registered here.
pub fn tree_members(agent: &Agent, root: i32) -> Result<Vec<Vpid>, String> {
    let members = dvk_checkpoint::tree::members(root).map_err(|e| e.to_string())?;
    let t = agent.tables.lock();
    let mut out = Vec::new();
    for m in members.iter().filter(|m| m.zombie.is_none()) {
        match t.routing.find_local_by_pid(m.pid) {
            Some(e) => out.push(e.vpid),
            None => {
                return Err(format!(
                    "pid {} ({}), a child of pid {}, is not a process under the dvk shim here: a process tree \
                     moves only when every process in it is",
                    m.pid, m.comm, m.ppid
                ))
            }
        }
    }
    Ok(out)
}

/// Checks, classifies and registers the move; nothing is changed in the process.
async fn prepare(
    agent: &Arc<Agent>,
    req: &Request,
) -> Result<(Driver, Coordinator, mpsc::UnboundedReceiver<Input>), String> {
    let started = Instant::now();
    let me = agent.node_id();
    let mut all: Vec<Vpid> = std::iter::once(req.vpid).chain(req.group.iter().copied()).collect();
    // A process with children moves with its whole tree (a group whose members are the root
    // and every descendant; zombies go in the tree image).
    let root_pid = agent.tables.lock().routing.get(req.vpid).map(|r| r.entry.real_pid);
    let tree = req.group.is_empty() && root_pid.is_some_and(|p| p > 0 && dvk_checkpoint::tree::has_children(p));
    if tree {
        all = tree_members(agent, root_pid.unwrap_or(0))?;
    }
    let group = all.len() > 1;
    let (found, peers) = {
        let t = agent.tables.lock();
        let mut found = Vec::new();
        for vpid in &all {
            let r = t.routing.get(*vpid).ok_or_else(|| format!("no process with vPID {vpid} in the cluster"))?;
            if r.entry.node != me {
                return Err(format!("vPID {vpid} runs on {}, not here", agent.node_name(r.entry.node)));
            }
            if let pidvirt::EndpointState::Migrating { migration, .. } = &r.state {
                return Err(format!("vPID {vpid} is already moving (move {:x})", migration.0));
            }
            let eps: Vec<EndpointEntry> = t.routing.endpoints().filter(|e| e.vpid == *vpid).cloned().collect();
            found.push((r.entry.clone(), eps));
        }
        let peers: BTreeSet<NodeId> = t.links.keys().copied().collect();
        (found, peers)
    };
    for (entry, _) in &found {
        if req.uid != 0 && req.uid != entry.uid {
            return Err(format!(
                "permission denied: vPID {} (pid {}) belongs to uid {}; only root or its owner may move it",
                entry.vpid, entry.real_pid, entry.uid
            ));
        }
    }
    if req.dest == me {
        return Err(format!("vPID {} already runs on {}", req.vpid, agent.node_name(me)));
    }
    if req.options.transfer == Transfer::Rsync && req.options.precopy == Some(true) {
        return Err("--precopy and --transfer rsync do not go together: rsync sends the image once the process \
                    is frozen"
            .into());
    }
    if group && req.options.transfer == Transfer::Rsync {
        return Err("--transfer rsync is not available with --group yet, nor for a process tree".into());
    }
    if tree && (req.options.precopy == Some(true) || req.options.compress) {
        return Err("--precopy and --compress are not available for a process tree yet (its image is sent as \
                    files once it is frozen)"
            .into());
    }
    if !peers.contains(&req.dest) {
        return Err(format!(
            "node {} is not linked to {} (see `migrate-cli nodes`)",
            agent.node_name(req.dest),
            agent.node_name(me)
        ));
    }
    // Moved here with pre-copy, it may still be getting its memory copied in: wait for that.
    let deadline = Instant::now() + Duration::from_secs(30);
    while found.iter().any(|(e, _)| agent.moves.filling.lock().contains(&e.real_pid)) {
        if Instant::now() >= deadline {
            return Err(format!(
                "vPID {} still has pre-copied memory being copied in from its last move; try again",
                req.vpid
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Every member's blockers, all listed at once (nothing is frozen before all are clear).
    let ids: Vec<(Vpid, i32)> = found.iter().map(|(e, _)| (e.vpid, e.real_pid)).collect();
    let a = agent.clone();
    let classified = tokio::task::spawn_blocking(move || -> Result<Vec<Classified>, String> {
        let mut out = Vec::new();
        let mut list: Vec<String> = Vec::new();
        if tree {
            // The engine names the member of each blocker.
            let (c, blockers) = classify::preflight_tree(&a, &ids)?;
            list.extend(blockers.iter().map(|b| format!("  - {b}")));
            out = c;
        } else {
            for (vpid, pid) in ids.iter().copied() {
                let (c, blockers) = classify::preflight(&a, vpid, pid)?;
                let prefix = if ids.len() > 1 { format!("vPID {vpid} (pid {pid}): ") } else { String::new() };
                list.extend(blockers.iter().map(|b| format!("  - {prefix}{b}")));
                out.push(c);
            }
        }
        if !list.is_empty() {
            let what = if tree {
                format!("the process tree of vPID {} ({} processes) cannot move", ids[0].0, ids.len())
            } else if ids.len() > 1 {
                format!("the group of {} processes cannot move", ids.len())
            } else {
                format!("vPID {} (pid {}) cannot move", ids[0].0, ids[0].1)
            };
            return Err(format!("{what}; {} blocker(s), nothing was frozen:\n{}", list.len(), list.join("\n")));
        }
        Ok(out)
    })
    .await
    .map_err(|e| format!("preflight failed: {e}"))??;

    let (tx, rx) = mpsc::unbounded_channel();
    let mid = agent.moves.new_move_id(me);
    {
        let mut c = agent.moves.coordinating.lock();
        if let Some(v) = all.iter().find(|v| c.contains_key(v)) {
            return Err(format!("vPID {v} is already moving"));
        }
        for v in &all {
            c.insert(*v, (mid, tx.clone()));
        }
    }
    let epoch = agent.moves.epochs.lock().get(&req.vpid).copied().unwrap_or(0);
    let tag = MoveTag { mid, epoch };
    // On tmpfs: nothing waits for disk writeback while the process is frozen. (With rsync the
    // whole dump goes there, and becomes this node's kept image once the move commits.)
    let image_dir = agent.staging.join(format!("move-{mid:x}-out"));
    let keys = found.iter().flat_map(|(_, eps)| eps.iter().map(|e| e.key())).collect();
    let members: Vec<Member> = found
        .into_iter()
        .zip(classified)
        .map(|((entry, endpoints), classified)| Member {
            entry,
            precopy: None,
            freezer: None,
            classified,
            endpoints,
            streams: BTreeMap::new(),
            closed: Vec::new(),
        })
        .collect();
    let mut d = Driver {
        agent: agent.clone(),
        members,
        tree,
        internal: BTreeMap::new(),
        tag,
        dest: req.dest,
        reply: req.reply.clone(),
        image_dir,
        image_bytes: 0,
        precopy_bytes: 0,
        compress: req.options.compress,
        transfer: req.options.transfer,
        sent_bytes: 0,
        steps: Vec::new(),
        started,
        step_start: started,
        frozen_at: None,
        frozen_for: None,
        log_path: None,
        restored_group: Vec::new(),
    };
    let described: Vec<String> = d
        .members
        .iter()
        .map(|m| {
            let c = &m.classified;
            format!(
                "vPID {} (pid {}): {} fd(s) carried by the agents{}",
                m.entry.vpid,
                m.entry.real_pid,
                c.carried.len(),
                if c.stdio.is_empty() {
                    String::new()
                } else {
                    let s: Vec<String> = c.stdio.iter().map(|(fd, _, what)| format!("fd {fd}: {what}")).collect();
                    format!("; redirected: {}", s.join(", "))
                }
            )
        })
        .collect();
    let detail = format!(
        "{}{} → {}; {}",
        if tree {
            format!("process tree of {}: ", d.members.len())
        } else if group {
            format!("group of {}: ", d.members.len())
        } else {
            String::new()
        },
        agent.node_name(me),
        agent.node_name(req.dest),
        described.join("; ")
    );
    d.step("preflight", detail);
    tracing::info!(vpid = %d.lead().vpid, group = ?req.group, %tag, dest = %agent.node_name(req.dest), "move started");
    if d.transfer == Transfer::Rsync {
        // rsync sends a complete image directory after the freeze; pre-copy sends pages before.
        d.step("pre-copy", "not with --transfer rsync: the whole image is sent while frozen".into());
    } else if tree {
        d.step("pre-copy", "not for a process tree yet: it is copied while frozen".into());
    } else {
        // A group's members one after the other (each runs and serves meanwhile).
        for i in 0..d.members.len() {
            if let Some(why) = wants_precopy(req.options, d.members[i].entry.real_pid) {
                precopy(&mut d, i, why).await;
            }
        }
    }
    // The protocol's clock starts here: pre-copy ran while nothing was held.
    let coordinator = Coordinator::new(
        tag,
        d.lead().vpid,
        me,
        req.dest,
        keys,
        peers,
        BTreeMap::new(),
        super::timeouts(),
        super::now_ms(),
    )
    .with_group(all[1..].to_vec());
    Ok((d, coordinator, rx))
}

async fn drive(mut d: Driver, mut m: Coordinator, mut rx: mpsc::UnboundedReceiver<Input>) {
    let mut queue: std::collections::VecDeque<CoordAction> = m.start().into();
    loop {
        while let Some(action) = queue.pop_front() {
            if let Some(ev) = execute(&mut d, &mut m, action).await {
                queue.extend(m.handle(super::now_ms(), ev));
            }
        }
        if m.is_done() {
            return;
        }
        let deadline = m.deadline();
        let now = super::now_ms();
        let wait = Duration::from_millis(deadline.saturating_sub(now).max(1));
        let ev = tokio::select! {
            input = rx.recv() => match input {
                Some(Input::Peer(from, msg)) => CoordEvent::Msg(from, msg),
                Some(Input::Link(node, true)) => CoordEvent::LinkUp(node),
                Some(Input::Link(node, false)) => CoordEvent::LinkDown(node),
                None => CoordEvent::Tick,
            },
            _ = tokio::time::sleep(wait) => CoordEvent::Tick,
        };
        if let CoordEvent::Msg(_, MoveMsg::StartAck { .. }) = &ev {
        } else if let CoordEvent::Msg(from, MoveMsg::Restored { group, .. }) = &ev {
            if *from == d.dest {
                d.restored_group = group.clone();
            }
            d.step("restore", format!("held on {}", d.agent.node_name(d.dest)));
        }
        queue.extend(m.handle(super::now_ms(), ev));
    }
}

/// Carries out one action; returns the event it produced, if any.
async fn execute(d: &mut Driver, m: &mut Coordinator, action: CoordAction) -> Option<CoordEvent> {
    let agent = d.agent.clone();
    match action {
        // reattach_here sent it already, right after making the stream's new relay and before
        // any of its data: a second one would find the end taken and reset the stream.
        CoordAction::Send(_, MoveMsg::StreamReattach { .. }) => None,
        CoordAction::Send(node, msg) => {
            if agent.fault == Some(super::Fault::CutBeforeCommit)
                && matches!(msg, MoveMsg::Commit { .. })
                && node == d.dest
            {
                tracing::warn!("test fault: the Commit is lost with the link to the destination");
                agent.cut_link(node);
                return None;
            }
            let ok = match agent.link(node) {
                Some(link) => link.write_now(PeerMessage::Move(msg)).await.is_ok(),
                None => false,
            };
            if !ok {
                tracing::info!(node = %agent.node_name(node), "move message not sent: no link");
            }
            None
        }
        CoordAction::MarkMigrating => {
            super::mark_migrating(&agent, &d.vpids(), d.tag.mid).await;
            d.step("start", "every agent holds new connections to the process".into());
            None
        }
        CoordAction::Freeze => Some(freeze(d, m).await),
        CoordAction::DetachLocal => {
            detach_local(d).await;
            None
        }
        CoordAction::DumpAndSend => Some(dump_and_send(d).await),
        CoordAction::KillOriginalOnExit => {
            for m in &d.members {
                m.freezer(FreezeCmd::ExitKill(true));
            }
            None
        }
        CoordAction::KillOriginal => {
            d.frozen_for = d.frozen_at.map(|t| t.elapsed());
            d.step("commit", format!("runs on {}", agent.node_name(d.dest)));
            for m in d.members.iter_mut() {
                let (tx, rx) = oneshot::channel();
                m.freezer(FreezeCmd::Kill(tx));
                let _ = rx.await;
                m.freezer = None;
            }
            forget_here(d);
            None
        }
        CoordAction::RouteCommitted { dest, pid, group } => {
            super::route_committed_all(&agent, d.lead().vpid, pid, &group, d.tag.mid, dest);
            crate::registry::save(&agent);
            None
        }
        CoordAction::ReattachLocal => {
            reattach_here(d).await;
            None
        }
        CoordAction::Thaw => {
            for m in d.members.iter_mut() {
                let (tx, rx) = oneshot::channel();
                m.freezer(FreezeCmd::Thaw(tx));
                m.freezer = None;
                if let Ok(Err(e)) = rx.await {
                    tracing::error!(vpid = %m.entry.vpid, "thaw failed: {e}");
                }
            }
            d.frozen_for = d.frozen_at.map(|t| t.elapsed());
            None
        }
        CoordAction::RouteRolledBack => {
            super::route_rolled_back(&agent, &d.vpids(), d.tag.mid);
            None
        }
        CoordAction::Finish(outcome) => {
            if d.transfer == Transfer::Rsync && matches!(outcome, Outcome::Committed { .. }) {
                keep_dump(d).await;
            }
            let group = match &outcome {
                Outcome::Committed { .. } => d.restored_group.clone(),
                Outcome::RolledBack { .. } => Vec::new(),
            };
            finish(d, outcome, &group);
            None
        }
    }
}

/// Freeze, then find every stream of the frozen process (its fds may have changed since the
/// preflight) and take the connections waiting in its listen backlogs. A group move freezes
/// every member first, then looks at them.
async fn freeze(d: &mut Driver, m: &mut Coordinator) -> CoordEvent {
    d.step_start = Instant::now();
    d.frozen_at = Some(Instant::now());
    // A freeze that hangs (a thread stuck in the kernel) is given up: dropping `tx` makes the
    // freezer thread thaw whatever it froze, whenever it gets there (the members frozen before
    // it too: their senders are dropped with `freezers`).
    let mut freezers = Vec::new();
    if d.tree {
        // One thread freezes and holds the whole tree; it is the root's freezer.
        let pids = d.members.iter().map(|m| m.entry.real_pid).collect();
        let (tx, ready) = spawn_tree_freezer(d.lead().real_pid, pids);
        if let Err(e) = frozen_in_time(ready, String::new(), "the process tree").await {
            return e;
        }
        freezers.push(tx);
    }
    for member in d.members.iter().filter(|_| !d.tree) {
        let (tx, ready) = spawn_freezer(member.entry.real_pid);
        let who = if d.members.len() > 1 { format!("vPID {}: ", member.entry.vpid) } else { String::new() };
        if let Err(e) = frozen_in_time(ready, who, "the process").await {
            return e;
        }
        freezers.push(tx);
    }
    for (member, tx) in d.members.iter_mut().zip(freezers) {
        member.freezer = Some(tx);
    }
    let mut remote = BTreeMap::new();
    // A tree's members count each other's listeners (a pre-fork server's children hold the
    // root's).
    let owners: Vec<Vpid> = if d.tree { d.vpids() } else { Vec::new() };
    for i in 0..d.members.len() {
        let (agent, vpid, pid) = (d.agent.clone(), d.members[i].entry.vpid, d.members[i].entry.real_pid);
        let owners = if d.tree { owners.clone() } else { vec![vpid] };
        let found = tokio::task::spawn_blocking(move || frozen_fds(&agent, vpid, pid, &owners)).await;
        let (c, backlog) = match found {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => return CoordEvent::FreezeFailed(e),
            Err(e) => return CoordEvent::FreezeFailed(e.to_string()),
        };
        let by_inode = d.agent.relays.by_inode();
        let pidfd = ck::pidfd_open(pid).ok();
        let member = &mut d.members[i];
        // Unread bytes are taken in detach_local, once the relays stopped writing into the sockets.
        for (id, (fds, moving_is_client)) in &c.streams {
            member.streams.insert(*id, StreamWork::new(*id, fds.clone(), None, *moving_is_client));
        }
        for (port, conn) in backlog {
            let Ok(ino) = crate::sys::inode(&conn) else { continue };
            let peer = ck::unix_diag(ino as u32).map(|x| x.peer as u64).unwrap_or(0);
            let Some((id, _)) = by_inode.get(&peer) else { continue };
            let mut w = StreamWork::new(*id, Vec::new(), Some(port), false);
            w.backlog_conn = Some(conn);
            member.streams.insert(*id, w);
        }
        for fds in &c.closed {
            let unread = match (&pidfd, fds.first()) {
                (Some(p), Some(f)) => {
                    ck::pidfd_getfd(p, f.fd).and_then(|s| ck::sock_peek(&s, MAX_UNREAD)).unwrap_or_default()
                }
                _ => Vec::new(),
            };
            member.closed.push(ClosedPlan { fds: fds.clone(), unread });
        }
        member.classified = c;
    }
    find_internal(d);
    for member in &d.members {
        for id in member.streams.keys() {
            if let Some(Some(peer)) = d.agent.relays.peer_of(*id) {
                remote.insert(*id, peer);
            }
        }
    }
    m.streams_found(remote);
    let n_streams: usize = d.members.iter().map(|m| m.streams.len()).sum();
    let n_backlog: usize =
        d.members.iter().flat_map(|m| m.streams.values()).filter(|w| w.plan.backlog_of.is_some()).count();
    let internal =
        if d.is_group() { format!(", {} between members of the group", d.internal.len()) } else { String::new() };
    d.step("freeze", format!("{n_streams} stream(s){internal}, {n_backlog} queued connection(s)"));
    CoordEvent::Frozen
}

/// Waits (at most the detach timeout) for a freezer thread to report its freeze; the
/// FreezeFailed event if it did not, its message starting with `who`.
async fn frozen_in_time(
    ready: oneshot::Receiver<Result<(), String>>,
    who: String,
    what: &str,
) -> Result<(), CoordEvent> {
    match tokio::time::timeout(Duration::from_millis(super::timeouts().detach), ready).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(CoordEvent::FreezeFailed(format!("{who}{e}"))),
        Ok(Err(_)) => Err(CoordEvent::FreezeFailed(format!("{who}the freezer thread died"))),
        Err(_) => Err(CoordEvent::FreezeFailed(format!("{who}{what} did not stop in time"))),
    }
}

/// The fds of a frozen process, classified, with the connections taken out of its listen
/// backlogs (port, connection).
fn frozen_fds(
    agent: &Agent,
    vpid: Vpid,
    pid: i32,
    owners: &[Vpid],
) -> Result<(Classified, Vec<(u16, OwnedFd)>), String> {
    // A stream the agent is setting up (connected, its relay not registered yet) settles
    // within moments; the process is frozen, so no new one starts.
    let mut c = classify::classify_in(agent, vpid, pid, owners).map_err(|e| e.to_string())?;
    for _ in 0..100 {
        if c.pending.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
        c = classify::classify_in(agent, vpid, pid, owners).map_err(|e| e.to_string())?;
    }
    if let Some(r) = c.pending.first() {
        return Err(format!("fd {} of pid {pid} is a connection to the agent still being set up; try again", r.fd));
    }
    let pidfd = ck::pidfd_open(pid).map_err(|e| format!("pidfd_open: {e}"))?;
    unread_relink(&pidfd, &mut c);
    let mut backlog = Vec::new();
    for (ep, fds) in &c.listeners {
        let Some(first) = fds.first() else { continue };
        let l = ck::pidfd_getfd(&pidfd, first.fd).map_err(|e| format!("pidfd_getfd(fd {}): {e}", first.fd))?;
        while let Ok(conn) = crate::sys::accept_now(&l) {
            backlog.push((ep.port, conn));
        }
    }
    Ok((c, backlog))
}

/// Streams whose two ends are both in the group (found in two members) become internal: both
/// ends move.
fn find_internal(d: &mut Driver) {
    if !d.is_group() {
        return;
    }
    let mut sides: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, m) in d.members.iter().enumerate() {
        for id in m.streams.keys() {
            sides.entry(*id).or_default().push(i);
        }
    }
    for (id, holders) in sides {
        let [a, b] = holders[..] else { continue };
        let (wa, wb) = match (d.members[a].streams.remove(&id), d.members[b].streams.remove(&id)) {
            (Some(x), Some(y)) => (x, y),
            _ => continue,
        };
        // The backlog side is the server's; otherwise the classification says who connected.
        let a_is_client = wb.plan.backlog_of.is_some() || (wa.plan.backlog_of.is_none() && wa.plan.moving_is_client);
        let ((ci, c), (si, s)) = if a_is_client { ((a, wa), (b, wb)) } else { ((b, wb), (a, wa)) };
        let side = |i: usize, w: &StreamWork| InternalSide {
            vpid: d.members[i].entry.vpid,
            fds: w.plan.fds.clone(),
            backlog_of: w.plan.backlog_of,
            unread: Vec::new(),
        };
        let plan = InternalPlan {
            id,
            client: side(ci, &c),
            server: side(si, &s),
            to_client: Dir::default(),
            to_server: Dir::default(),
        };
        d.internal.insert(id, InternalWork { plan, ends: None, backlog_conn: [c.backlog_conn, s.backlog_conn] });
    }
}

/// The carried part of a log: its last 64 MiB.
fn read_log_tail(path: &std::path::Path) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    const MAX: u64 = 64 << 20;
    let Ok(mut f) = std::fs::File::open(path) else { return Vec::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(MAX)));
    let mut out = Vec::new();
    let _ = f.take(MAX).read_to_end(&mut out);
    out
}

/// A Relink frame an earlier move queued on the process's link that the shim has not read yet
/// (the process made no agent request since): the shim still knows the inodes from before that
/// move, so this move's records must name those.
fn unread_relink(pidfd: &OwnedFd, c: &mut Classified) {
    use dvk_protocol::relink;
    let Some(link) = &c.link else { return };
    let Ok(bytes) = ck::pidfd_getfd(pidfd, link.fd).and_then(|s| ck::sock_peek(&s, relink::MAX_FRAME_LEN)) else {
        return;
    };
    let Some(header) = bytes.get(..relink::HEADER_LEN).and_then(|h| <&[u8; relink::HEADER_LEN]>::try_from(h).ok())
    else {
        return;
    };
    let Ok((count, _)) = relink::decode_header(header) else { return };
    let mut earlier = std::collections::HashMap::new();
    for i in 0..count as usize {
        let at = relink::HEADER_LEN + i * relink::RECORD_LEN;
        let Some(rec) =
            bytes.get(at..at + relink::RECORD_LEN).and_then(|r| <&[u8; relink::RECORD_LEN]>::try_from(r).ok())
        else {
            return;
        };
        let r = relink::decode_record(rec);
        earlier.insert(r.fd, (r.old_ino, r.new_ino));
    }
    let fix = |r: &mut FdRef| {
        if let Some((old, new)) = earlier.get(&r.fd) {
            if *new == r.old_ino {
                r.old_ino = *old;
            }
        }
    };
    if let Some(l) = c.link.as_mut() {
        fix(l);
    }
    c.listeners.iter_mut().flat_map(|(_, f)| f.iter_mut()).for_each(fix);
    c.streams.values_mut().flat_map(|(f, _)| f.iter_mut()).for_each(fix);
    c.closed.iter_mut().flatten().for_each(fix);
}

impl StreamWork {
    fn new(id: u64, fds: Vec<FdRef>, backlog_of: Option<u16>, moving_is_client: bool) -> StreamWork {
        StreamWork {
            plan: StreamPlan {
                id,
                fds,
                backlog_of,
                moving_is_client,
                fixed_node: NodeId(0),
                // Taken in detach_local, once the relays stopped writing into the socket.
                unread: Vec::new(),
                to_program: Dir::default(),
                to_fixed: Dir::default(),
                reset: false,
            },
            moving_end: None,
            backlog_conn: None,
            rx: None,
        }
    }
}

/// Stops this node's relay of every stream of the frozen processes and reads their tails.
async fn detach_local(d: &mut Driver) {
    for i in 0..d.members.len() {
        detach_member(d, i).await;
    }
    detach_internal(d).await;
    let n: usize = d.members.iter().map(|m| m.streams.len()).sum::<usize>() + d.internal.len();
    d.step("detach", format!("{n} stream(s) held, bytes in flight accounted for"));
}

/// What is unread in a frozen process's socket (peeked: it stays there), or in a connection
/// taken out of a listen backlog (read out of it).
fn unread_of(backlog_conn: Option<&OwnedFd>, pidfd: Option<&OwnedFd>, fd: Option<&FdRef>) -> Vec<u8> {
    match (backlog_conn, pidfd, fd) {
        (Some(conn), _, _) => {
            let mut unread = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = crate::sys::recv_now(conn, &mut buf) {
                if n == 0 {
                    break;
                }
                unread.extend_from_slice(&buf[..n]);
            }
            unread
        }
        (None, Some(p), Some(f)) => {
            ck::pidfd_getfd(p, f.fd).and_then(|s| ck::sock_peek(&s, MAX_UNREAD)).unwrap_or_default()
        }
        _ => Vec::new(),
    }
}

async fn detach_member(d: &mut Driver, i: usize) {
    let me = d.agent.node_id();
    let pidfd = ck::pidfd_open(d.members[i].entry.real_pid).ok();
    let ids: Vec<u64> = d.members[i].streams.keys().copied().collect();
    for id in ids {
        let detached = d.agent.relays.detach(id).await;
        let w = d.members[i].streams.get_mut(&id).expect("listed");
        // Now nothing writes into the process's socket any more: what is unread there is final.
        w.plan.unread = unread_of(w.backlog_conn.as_ref(), pidfd.as_ref(), w.plan.fds.first());
        let Some(det) = detached else {
            // The relay had ended: both directions closed. The process keeps its bytes, then EOF.
            w.plan.reset = true;
            w.plan.fixed_node = me;
            continue;
        };
        let moving_is_client = w.plan.moving_is_client;
        let Some(moving) = det.ends.iter().find(|e| e.client == moving_is_client).cloned() else {
            w.plan.reset = true;
            continue;
        };
        let tail = streams::read_tail(&moving);
        match det.left {
            Left::Local { to_server, to_client } => {
                let (to_program, toward_fixed) =
                    if moving_is_client { (to_client, to_server) } else { (to_server, to_client) };
                if let Some(fixed) = det.ends.iter().find(|e| e.client != moving_is_client).cloned() {
                    let from_fixed = Dir { pending: Vec::new(), ended: to_program.ended };
                    d.agent.moves.held.lock().insert(
                        id,
                        HeldFixed { tag: d.tag, end: fixed, to_fixed: toward_fixed, from_fixed, since: Instant::now() },
                    );
                }
                w.plan.to_program = to_program;
                w.plan.to_fixed = tail;
                w.plan.fixed_node = me;
            }
            Left::Remote { mut out, inb, rx, .. } => {
                out.append(tail);
                w.plan.to_fixed = out;
                w.plan.to_program = inb;
                w.plan.fixed_node = det.peer.unwrap_or(me);
                w.rx = Some(rx);
            }
        }
        w.moving_end = Some(moving);
    }
}

/// Streams between members: both processes are frozen; stop the relay, read both tails, and
/// peek what each side has unread. Each side is owed what the relay held for it, then the
/// other side's tail.
async fn detach_internal(d: &mut Driver) {
    let pidfds: BTreeMap<Vpid, OwnedFd> =
        d.members.iter().filter_map(|m| ck::pidfd_open(m.entry.real_pid).ok().map(|p| (m.entry.vpid, p))).collect();
    let ids: Vec<u64> = d.internal.keys().copied().collect();
    for id in ids {
        let detached = d.agent.relays.detach(id).await;
        let w = d.internal.get_mut(&id).expect("listed");
        for (k, side) in [&mut w.plan.client, &mut w.plan.server].into_iter().enumerate() {
            side.unread = unread_of(w.backlog_conn[k].as_ref(), pidfds.get(&side.vpid), side.fds.first());
        }
        let Some(det) = detached else {
            // The relay had ended: each side gets its unread bytes, then EOF.
            w.plan.to_client.ended = true;
            w.plan.to_server.ended = true;
            continue;
        };
        let client = det.ends.iter().find(|e| e.client).cloned();
        let server = det.ends.iter().find(|e| !e.client).cloned();
        let (Some(client), Some(server), Left::Local { to_server, to_client }) = (client, server, det.left) else {
            w.plan.to_client.ended = true;
            w.plan.to_server.ended = true;
            continue;
        };
        let (client_tail, server_tail) = (streams::read_tail(&client), streams::read_tail(&server));
        w.plan.to_client = to_client;
        w.plan.to_client.append(server_tail);
        w.plan.to_server = to_server;
        w.plan.to_server.append(client_tail);
        w.ends = Some((client, server));
    }
}

/// The fixed ends all confirmed: what they sent before is in our queues now.
fn drain_remote_queues(d: &mut Driver) {
    for m in d.members.iter_mut() {
        for (id, w) in m.streams.iter_mut() {
            if let Some(mut rx) = w.rx.take() {
                if relay::drain_inbound(&mut rx, &mut w.plan.to_program) {
                    w.plan.reset = true;
                }
                d.agent.remove_stream(*id);
            }
        }
    }
}

/// Dumps frozen member `i` (by its freezer thread, into its image directory or where `opts`
/// send the pages) and writes its move plan beside the image: the dump's report and the
/// plan's length.
async fn dump_with_plan(d: &Driver, i: usize, opts: DumpOptions) -> Result<(dvk_checkpoint::DumpReport, u64), String> {
    let (tx, rx) = oneshot::channel();
    d.members[i].freezer(FreezeCmd::Image(d.member_dir(i), Box::new(opts), tx));
    let report = rx.await.map_err(|_| "the freezer thread died".to_string())??;
    Ok((report, write_plan(d, i)?))
}

/// Writes member `i`'s move plan beside its image; its length.
fn write_plan(d: &Driver, i: usize) -> Result<u64, String> {
    let plan = postcard::to_allocvec(&build_plan(d, i)).map_err(|e| format!("cannot encode the move plan: {e}"))?;
    write_private(&d.member_dir(i).join(PLAN_FILE), &plan).map_err(|e| format!("cannot write the move plan: {e}"))?;
    Ok(plan.len() as u64)
}

fn build_plan(d: &Driver, i: usize) -> MovePlan {
    let m = &d.members[i];
    let c = &m.classified;
    MovePlan {
        tag: d.tag,
        entry: m.entry.clone(),
        source: d.agent.node_id(),
        link: c.link.clone(),
        listeners: c.listeners.iter().map(|(e, fds)| ListenerPlan { fds: fds.clone(), endpoint: e.clone() }).collect(),
        streams: m.streams.values().map(|w| w.plan.clone()).collect(),
        closed: m.closed.clone(),
        stdio: c.stdio.iter().map(|(fd, r, _)| (*fd, *r)).collect(),
        log: c.own_log.as_ref().map(|p| read_log_tail(p)),
        endpoints: m.endpoints.clone(),
    }
}

/// A group move: every member is dumped at once, its page data streamed to the destination
/// and the rest written into `m<vPID>/` of the move's image directory (tmpfs) with its plan;
/// `group.bin` says who they are and what streams run between them; then those files go.
async fn dump_group_and_send(d: &mut Driver) -> CoordEvent {
    drain_remote_queues(d);
    let _ = std::fs::remove_dir_all(&d.image_dir);
    let mut details = Vec::new();
    let mut total = 0u64;
    let Some(link) = d.agent.link(d.dest) else {
        return CoordEvent::DumpFailed(format!("no link to {}", d.agent.node_name(d.dest)));
    };
    // Every member's freezer thread dumps its own process, all at once, each one's page data
    // going onto the link as it is read (`m<vPID>/pages.img`); the rest is written here.
    let mut pending = Vec::new();
    let mut outs = Vec::new();
    for i in 0..d.members.len() {
        let file = format!("{}/{}", member_dir_name(d.members[i].entry.vpid), dvk_checkpoint::image::PAGES);
        let pages = Arc::new(LinkPages::new(d, link.clone(), &file));
        // Each member's tracker goes with its dump (and is dropped with it, whatever its outcome).
        let opts = DumpOptions {
            external_fds: d.members[i].classified.external(),
            pages_to: Some(dvk_checkpoint::image::PagesTo(pages.clone())),
            precopy: d.members[i].precopy.take(),
            ..Default::default()
        };
        let (tx, rx) = oneshot::channel();
        d.members[i].freezer(FreezeCmd::Image(d.member_dir(i), Box::new(opts), tx));
        pending.push(rx);
        outs.push(pages);
    }
    let mut failed = None;
    for (i, rx) in pending.into_iter().enumerate() {
        let vpid = d.members[i].entry.vpid;
        let dumped = match rx.await {
            Ok(r) => r,
            Err(_) => Err("the freezer thread died".to_string()),
        };
        match dumped.and_then(|r| Ok((write_plan(d, i)?, r))) {
            Ok((plan_len, r)) => {
                total += r.pages_bytes + r.manifest_bytes + plan_len;
                let kept = if r.precopied_bytes > 0 {
                    format!(" ({:.1} MB left to the pre-copy)", r.precopied_bytes as f64 / 1e6)
                } else {
                    String::new()
                };
                details.push(format!(
                    "vPID {vpid}: {:.1} MB of pages{kept}, {} mappings, {} fds",
                    r.pages_bytes as f64 / 1e6,
                    r.vmas,
                    r.fds
                ));
            }
            Err(e) => {
                failed.get_or_insert(format!("vPID {vpid}: {e}"));
            }
        }
    }
    if let Some(e) = failed {
        return CoordEvent::DumpFailed(e);
    }
    match write_group_plan(d, false) {
        Ok(n) => total += n,
        Err(e) => return CoordEvent::DumpFailed(e),
    }
    d.image_bytes = d.precopy_bytes + total;
    use std::sync::atomic::Ordering;
    let pages_sent: u64 = outs.iter().map(|o| o.on_wire.load(Ordering::Relaxed)).sum();
    let zeros = outs.iter().map(|o| o.sent.load(Ordering::Relaxed)).sum::<u64>() - pages_sent;
    d.step("dump", format!("{} streamed to the destination", details.join("; ")));
    send_the_rest(d, pages_sent, zeros).await
}

/// The engine's page output during a move: every buffer it filled with process_vm_readv is
/// written onto the agent link to the destination from that buffer (the freezer thread blocks on
/// the async writer), never into a file or another copy here.
struct LinkPages {
    runtime: tokio::runtime::Handle,
    link: crate::state::LinkHandle,
    mid: u64,
    /// pages.img (the dump; `m<vPID>/pages.img` for a group's member) or precopy.img (pre-copy
    /// rounds).
    file: String,
    /// Progress goes to the CLI (not for the members of a group move, dumped all at once).
    progress: bool,
    /// Page data handed over (progress).
    sent: std::sync::atomic::AtomicU64,
    /// Bytes of it that went on the link (pages of zeros stay behind; compressed blocks count
    /// their compressed size).
    on_wire: std::sync::atomic::AtomicU64,
    /// `move --compress`.
    compress: bool,
    total: std::sync::atomic::AtomicU64,
    last_report: parking_lot::Mutex<Instant>,
    reply: mpsc::UnboundedSender<LocalResponse>,
}

impl LinkPages {
    fn run<F: std::future::Future<Output = Result<(), dvk_protocol::FrameError>>>(&self, f: F) -> std::io::Result<()> {
        let idle = Duration::from_millis(super::timeouts().transfer_idle);
        match self.runtime.block_on(async { tokio::time::timeout(idle, f).await }) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(std::io::Error::other(format!("the link to the destination failed: {e}"))),
            Err(_) => Err(std::io::Error::other(format!("the destination took no data for {idle:?}"))),
        }
    }
}

/// The spans of `buf` (page-aligned, in whole pages) that are not all zeros, as byte ranges.
fn nonzero_spans(buf: &[u8]) -> Vec<(usize, usize)> {
    const PAGE: usize = 4096;
    let mut spans: Vec<(usize, usize)> = Vec::new();
    for (i, page) in buf.chunks(PAGE).enumerate() {
        if page.iter().all(|&b| b == 0) {
            continue;
        }
        let (from, to) = (i * PAGE, i * PAGE + page.len());
        match spans.last_mut() {
            Some(s) if s.1 == from => s.1 = to,
            _ => spans.push((from, to)),
        }
    }
    spans
}

impl LinkPages {
    fn new(d: &Driver, link: crate::state::LinkHandle, file: &str) -> LinkPages {
        LinkPages {
            runtime: tokio::runtime::Handle::current(),
            link,
            mid: d.tag.mid,
            file: file.to_owned(),
            progress: !d.is_group(),
            sent: Default::default(),
            on_wire: Default::default(),
            compress: d.compress,
            total: Default::default(),
            last_report: parking_lot::Mutex::new(Instant::now()),
            reply: d.reply.clone(),
        }
    }
}

impl LinkPages {
    /// Sends `data` for offset `off`: as it is, or (`--compress`) as LZ4 blocks of at most
    /// [`IMAGE_CHUNK`] bytes each, every block that does not shrink going as it is.
    fn send(&self, data: &[u8], off: u64) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        if !self.compress {
            self.run(self.link.write_image(self.mid, &self.file, off, data, IMAGE_CHUNK))?;
            self.on_wire.fetch_add(data.len() as u64, Ordering::Relaxed);
            return Ok(());
        }
        for (i, chunk) in data.chunks(IMAGE_CHUNK).enumerate() {
            let at = off + (i * IMAGE_CHUNK) as u64;
            let packed = lz4_flex::block::compress(chunk);
            if packed.len() < chunk.len() {
                self.on_wire.fetch_add(packed.len() as u64, Ordering::Relaxed);
                let msg = PeerMessage::MoveImageLz4 {
                    mid: self.mid,
                    file: self.file.clone(),
                    offset: at,
                    raw_len: chunk.len() as u32,
                    bytes: packed,
                };
                self.run(self.link.write_now(msg))?;
            } else {
                self.run(self.link.write_image(self.mid, &self.file, at, chunk, IMAGE_CHUNK))?;
                self.on_wire.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

impl dvk_checkpoint::image::PageOut for LinkPages {
    fn reserve(&self, len: u64) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        self.total.store(len, Ordering::Relaxed);
        let msg = PeerMessage::MoveImageSize { mid: self.mid, file: self.file.clone(), len };
        self.run(self.link.write_now(msg))
    }

    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        if self.file != dvk_checkpoint::precopy::PRECOPY {
            // Each offset of the page data is written once, into memory the destination
            // zeroed: pages of zeros need not travel.
            for (from, to) in nonzero_spans(buf) {
                self.send(&buf[from..to], off + from as u64)?;
            }
        } else {
            // The pre-copy store is rewritten in place: every page goes.
            self.send(buf, off)?;
        }
        let sent = self.sent.fetch_add(buf.len() as u64, Ordering::Relaxed) + buf.len() as u64;
        let mut last = self.last_report.lock();
        if self.progress && last.elapsed() > Duration::from_millis(100) {
            *last = Instant::now();
            let _ = self.reply.send(LocalResponse::MoveProgress { sent, total: self.total.load(Ordering::Relaxed) });
        }
        Ok(())
    }
}

async fn dump_and_send(d: &mut Driver) -> CoordEvent {
    if d.tree {
        return dump_tree_and_send(d).await;
    }
    if d.is_group() {
        return dump_group_and_send(d).await;
    }
    if d.transfer == Transfer::Rsync {
        return dump_and_rsync(d).await;
    }
    drain_remote_queues(d);
    let _ = std::fs::remove_dir_all(&d.image_dir);
    let Some(link) = d.agent.link(d.dest) else {
        return CoordEvent::DumpFailed(format!("no link to {}", d.agent.node_name(d.dest)));
    };
    let pages = Arc::new(LinkPages::new(d, link, dvk_checkpoint::image::PAGES));
    let out = dvk_checkpoint::image::PagesTo(pages.clone());
    // The tracker goes with the dump (and is dropped with it, whatever its outcome).
    let opts = DumpOptions {
        external_fds: d.members[0].classified.external(),
        pages_to: Some(out),
        precopy: d.members[0].precopy.take(),
        ..Default::default()
    };
    let precopied = opts.precopy.is_some();
    let dumped = dump_with_plan(d, 0, opts).await;
    let pages_sent = pages.on_wire.load(std::sync::atomic::Ordering::Relaxed);
    let zeros = pages.sent.load(std::sync::atomic::Ordering::Relaxed) - pages_sent;
    let (report, plan_len) = match dumped {
        Ok(r) => r,
        Err(e) => return CoordEvent::DumpFailed(e),
    };
    d.image_bytes = d.precopy_bytes + report.pages_bytes + report.manifest_bytes + plan_len;
    let phases: Vec<String> =
        report.phases.iter().map(|(n, t)| format!("{n} {:.1}", t.as_secs_f64() * 1000.0)).collect();
    let kept = if precopied {
        format!(", {:.1} MB left to the pre-copy", report.precopied_bytes as f64 / 1e6)
    } else {
        String::new()
    };
    d.step(
        "dump",
        format!(
            "{:.1} MB of pages streamed to the destination{kept}, {} mappings, {} fds ({} ms)",
            report.pages_bytes as f64 / 1e6,
            report.vmas,
            report.fds,
            phases.join(", ")
        ),
    );
    send_the_rest(d, pages_sent, zeros).await
}

/// Writes `group.bin` (the members, whether they are a tree, the streams between them); its
/// length.
fn write_group_plan(d: &Driver, tree: bool) -> Result<u64, String> {
    let group = GroupPlan { members: d.vpids(), tree, internal: d.internal.values().map(|w| w.plan.clone()).collect() };
    let bytes = postcard::to_allocvec(&group).map_err(|e| format!("cannot encode the group plan: {e}"))?;
    write_private(&d.image_dir.join(GROUP_FILE), &bytes).map_err(|e| format!("cannot write the group plan: {e}"))?;
    Ok(bytes.len() as u64)
}

/// A process tree: one tree image (`tree.img`, `<pid>/` per process) written by the tree's
/// freezer thread with every member's agent fds left out, each member's plan in `m<vPID>/`,
/// `group.bin` beside them; then the files go (page data included: a tree's page data is not
/// streamed yet).
async fn dump_tree_and_send(d: &mut Driver) -> CoordEvent {
    drain_remote_queues(d);
    let _ = std::fs::remove_dir_all(&d.image_dir);
    let opts = classify::tree_dump_options(d.members.iter().map(|m| (m.entry.real_pid, &m.classified)));
    let (tx, rx) = oneshot::channel();
    // The root's freezer thread holds the whole tree.
    d.members[0].freezer(FreezeCmd::Image(d.image_dir.clone(), Box::new(opts), tx));
    let report = match rx.await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return CoordEvent::DumpFailed(e),
        Err(_) => return CoordEvent::DumpFailed("the freezer thread died".into()),
    };
    let mut total = report.pages_bytes + report.manifest_bytes;
    for i in 0..d.members.len() {
        let dir = d.member_dir(i);
        let made = std::fs::create_dir(&dir).and_then(|_| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        });
        match made.map_err(|e| format!("{}: {e}", dir.display())).and_then(|_| write_plan(d, i)) {
            Ok(n) => total += n,
            Err(e) => return CoordEvent::DumpFailed(e),
        }
    }
    match write_group_plan(d, true) {
        Ok(n) => total += n,
        Err(e) => return CoordEvent::DumpFailed(e),
    }
    d.image_bytes = total;
    let phases: Vec<String> =
        report.phases.iter().map(|(n, t)| format!("{n} {:.1}", t.as_secs_f64() * 1000.0)).collect();
    d.step(
        "dump",
        format!(
            "a tree of {} processes: {:.1} MB of pages, {} mappings, {} fds ({} ms)",
            d.members.len(),
            report.pages_bytes as f64 / 1e6,
            report.vmas,
            report.fds,
            phases.join(", ")
        ),
    );
    send_the_rest(d, 0, 0).await
}

/// After a dump that streamed its page data (`pages_sent` bytes on the link, `zeros` bytes of
/// zero pages left behind): the image files and plans go, then the move's image dir here.
async fn send_the_rest(d: &mut Driver, pages_sent: u64, zeros: u64) -> CoordEvent {
    let sent = send_image(d).await;
    let _ = std::fs::remove_dir_all(&d.image_dir);
    match sent {
        Ok(sent) => {
            let sent = sent + pages_sent;
            d.sent_bytes += sent;
            d.step(
                "transfer",
                format!(
                    "{:.1} MB in all over the agent link ({:.1} MB of pages sent during the dump, {:.1} MB of \
                     zero pages not sent)",
                    sent as f64 / 1e6,
                    pages_sent as f64 / 1e6,
                    zeros as f64 / 1e6
                ),
            );
            CoordEvent::ImageSent
        }
        Err(e) => CoordEvent::DumpFailed(format!("transfer to {}: {e}", d.agent.node_name(d.dest))),
    }
}

/// `--transfer rsync`: the dump (a complete image: page data in pages.img, zero pages too) and
/// the plan go into the move's out dir, and rsync sends the directory; the destination keeps
/// it as its image of the process, which a later move back there sends only the delta against.
async fn dump_and_rsync(d: &mut Driver) -> CoordEvent {
    drain_remote_queues(d);
    let _ = std::fs::remove_dir_all(&d.image_dir);
    let opts = DumpOptions { external_fds: d.members[0].classified.external(), ..Default::default() };
    let (report, plan_len) = match dump_with_plan(d, 0, opts).await {
        Ok(r) => r,
        Err(e) => return CoordEvent::DumpFailed(e),
    };
    d.image_bytes = report.pages_bytes + report.manifest_bytes + plan_len;
    let phases: Vec<String> =
        report.phases.iter().map(|(n, t)| format!("{n} {:.1}", t.as_secs_f64() * 1000.0)).collect();
    d.step(
        "dump",
        format!(
            "{:.1} MB of pages written to {}, {} mappings, {} fds ({} ms)",
            report.pages_bytes as f64 / 1e6,
            d.image_dir.display(),
            report.vmas,
            report.fds,
            phases.join(", ")
        ),
    );
    let dest = d.agent.node_name(d.dest);
    match super::rsync::send(&d.agent, d.dest, d.tag.mid, &d.image_dir, d.compress).await {
        Ok(st) => {
            d.sent_bytes += st.sent;
            d.step(
                "transfer",
                format!(
                    "rsync over the agent link: {:.1} MB image, {:.1} MB literal data, {:.1} MB matched in {dest}'s \
                     older image; {} bytes sent, {} bytes received",
                    st.total_size as f64 / 1e6,
                    st.literal as f64 / 1e6,
                    st.matched as f64 / 1e6,
                    st.sent,
                    st.received
                ),
            );
            CoordEvent::ImageSent
        }
        Err(e) => CoordEvent::DumpFailed(format!("rsync to {dest}: {e}")),
    }
}

/// After a committed `--transfer rsync` move (the process runs on the destination): the dump
/// becomes this node's kept image of the process, so a move of it back here sends only what
/// changed since. Done before the report, so that a move back asked after it finds the image.
async fn keep_dump(d: &mut Driver) {
    let started = Instant::now();
    let (agent, vpid, mid, dir) = (d.agent.clone(), d.lead().vpid, d.tag.mid, d.image_dir.clone());
    let kept = tokio::task::spawn_blocking(move || super::kept::keep_dump(&agent, vpid, mid, &dir)).await;
    let detail = match kept {
        Ok(Ok(bytes)) => format!(
            "{:.1} MB kept in {} for a move back ({} ms)",
            bytes as f64 / 1e6,
            super::kept::KeptImages::of(&d.agent).dir(vpid).display(),
            started.elapsed().as_millis()
        ),
        Ok(Err(e)) => format!("the image is not kept: {e}"),
        Err(e) => format!("the image is not kept: {e}"),
    };
    d.step("keep", detail);
}

/// Private memory from which a move pre-copies unless told otherwise: below it the extra round
/// costs more than the copy it saves (docs/PERFORMANCE.md, "Moving a process").
const PRECOPY_FROM: u64 = 64 << 20;

/// Whether to pre-copy, and why (for the step line).
fn wants_precopy(options: MoveOptions, pid: i32) -> Option<String> {
    match options.precopy {
        Some(true) => Some("asked for".into()),
        Some(false) => None,
        None => {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let anon_kib: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix("RssAnon:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
            (anon_kib << 10 >= PRECOPY_FROM)
                .then(|| format!("{} MiB of private memory ≥ {} MiB", anon_kib >> 10, PRECOPY_FROM >> 20))
        }
    }
}

/// Pre-copy, before Start (the process runs and serves, nothing is held): a brief freeze to
/// start dirty tracking, then rounds of pages sent to the destination's pre-copy store until
/// the set written per round is small or stops shrinking. On any failure the move goes on as
/// stop-and-copy and says why.
async fn precopy(d: &mut Driver, i: usize, why: String) {
    let who = if d.is_group() { format!("vPID {}: ", d.members[i].entry.vpid) } else { String::new() };
    let Some(link) = d.agent.link(d.dest) else {
        return d.step("pre-copy", format!("{who}skipped ({why}): no link to {}", d.agent.node_name(d.dest)));
    };
    let file = if d.is_group() {
        format!("{}/{}", member_dir_name(d.members[i].entry.vpid), dvk_checkpoint::precopy::PRECOPY)
    } else {
        dvk_checkpoint::precopy::PRECOPY.to_owned()
    };
    let out = Arc::new(LinkPages::new(d, link, &file));
    let pid = d.members[i].entry.real_pid;
    let run = {
        let out = out.clone();
        move || -> Result<dvk_checkpoint::precopy::Precopy, String> {
            let mut f = Frozen::freeze(pid).map_err(|e| e.to_string())?;
            let started = dvk_checkpoint::precopy::Precopy::start(&mut f);
            f.thaw(false).map_err(|e| e.to_string())?;
            let mut pc = started.map_err(|e| e.to_string())?;
            let policy = dvk_checkpoint::precopy::Policy::default();
            while pc.wants_another(&policy) {
                pc.round(out.as_ref()).map_err(|e| e.to_string())?;
            }
            Ok(pc)
        }
    };
    match tokio::task::spawn_blocking(run).await {
        Ok(Ok(pc)) => {
            let rounds: Vec<String> = pc
                .rounds
                .iter()
                .map(|r| format!("{:.1} MB in {} ms", r.bytes as f64 / 1e6, r.took.as_millis()))
                .collect();
            d.precopy_bytes += pc.copied();
            let wire = out.on_wire.load(std::sync::atomic::Ordering::Relaxed);
            d.sent_bytes += wire;
            let why =
                if d.compress { format!("{why}; {:.1} MB on the link, compressed", wire as f64 / 1e6) } else { why };
            d.step(
                "pre-copy",
                format!("{who}{} round(s) while the process ran ({why}): {}", pc.rounds.len(), rounds.join(", ")),
            );
            d.members[i].precopy = Some(PrecopyRef(Arc::new(std::sync::Mutex::new(pc))));
        }
        Ok(Err(e)) => d.step("pre-copy", format!("{who}skipped ({why}), it is copied while frozen: {e}")),
        Err(e) => d.step("pre-copy", format!("{who}skipped ({why}), it is copied while frozen: {e}")),
    }
}

fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(bytes)
}

/// Sends the image files written here (manifest, memfds, the plan; page data went during the
/// dump) to the destination over the agent link.
async fn send_image(d: &mut Driver) -> std::io::Result<u64> {
    use std::io::Read;
    let link = d.agent.link(d.dest).ok_or_else(|| std::io::Error::other("no link"))?;
    // Files of the image directory, and (a group move) of its members' directories one below.
    let mut names: Vec<String> = Vec::new();
    for e in std::fs::read_dir(&d.image_dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type()?.is_dir() {
            for f in std::fs::read_dir(e.path())? {
                names.push(format!("{name}/{}", f?.file_name().to_string_lossy()));
            }
        } else {
            names.push(name);
        }
    }
    // The plan goes last: the destination restores once it has it and Restore.
    names.sort_by_key(|n| n == PLAN_FILE);
    let idle = Duration::from_millis(super::timeouts().transfer_idle);
    let mut sent = 0u64;
    let mut buf = vec![0u8; 8 << 20];
    for name in names {
        let mut f = std::fs::File::open(d.image_dir.join(&name))?;
        let mut offset = 0u64;
        loop {
            let n = tokio::task::block_in_place(|| f.read(&mut buf))?;
            // An empty file is still made on the other side.
            if n == 0 && offset > 0 {
                break;
            }
            let write = link.write_image(d.tag.mid, &name, offset, &buf[..n], IMAGE_CHUNK);
            match tokio::time::timeout(idle, write).await {
                Ok(r) => r.map_err(|e| std::io::Error::other(e.to_string()))?,
                Err(_) => return Err(std::io::Error::other(format!("no progress for {idle:?}"))),
            }
            offset += n as u64;
            sent += n as u64;
            if n == 0 {
                break;
            }
        }
    }
    Ok(sent)
}

/// Rollback: the processes stay here. Their streams go back to where they were; connections
/// taken out of their listen backlogs are queued into their listeners again.
async fn reattach_here(d: &mut Driver) {
    drain_remote_queues(d);
    let listeners: BTreeMap<(Vpid, u16), crate::listener::ListenerFile> = {
        let t = d.agent.tables.lock();
        d.members
            .iter()
            .flat_map(|m| m.endpoints.iter())
            .filter_map(|e| t.listeners.get(&e.key()).and_then(|p| p.first()).map(|p| ((e.vpid, e.port), p.clone())))
            .collect()
    };
    for i in 0..d.members.len() {
        let vpid = d.members[i].entry.vpid;
        let streams = std::mem::take(&mut d.members[i].streams);
        for (id, w) in streams {
            let p = w.plan;
            let (end, to_program) = match (p.backlog_of, &w.moving_end) {
                (Some(port), _) => {
                    let Some(listener) = listeners.get(&(vpid, port)) else { continue };
                    match listener.connect().await {
                        Ok(s) => {
                            let mut owed = Dir { pending: p.unread.clone(), ended: false };
                            owed.append(p.to_program.clone());
                            (End::Unix(s), owed)
                        }
                        Err(e) => {
                            tracing::warn!(stream = id, "cannot requeue a backlog connection: {e}");
                            continue;
                        }
                    }
                }
                (None, Some(h)) => match End::from_held(h) {
                    Ok(e) => (e, p.to_program.clone()),
                    Err(_) => continue,
                },
                (None, None) => continue,
            };
            if p.reset {
                streams::finish_alone(end, to_program);
                continue;
            }
            streams::reattach_moving(
                &d.agent,
                d.tag,
                id,
                end,
                p.moving_is_client,
                p.fixed_node,
                to_program,
                p.to_fixed,
            )
            .await;
        }
    }
    // Streams between members: the relay between their original sockets, made again.
    for (id, w) in std::mem::take(&mut d.internal) {
        let p = w.plan;
        let [client_conn, server_conn] = w.backlog_conn;
        let side_end = |k: usize| -> Option<End> {
            let held = w.ends.as_ref().map(|(c, s)| if k == 0 { c } else { s })?;
            End::from_held(held).ok()
        };
        let mut ends = Vec::new();
        for (k, side, conn) in [(0, &p.client, client_conn), (1, &p.server, server_conn)] {
            // A side that was queued in a backlog: the connection was taken out of it, with its
            // bytes; a new one is queued into the same listener and owed them first.
            let (end, mut owed) = match (side.backlog_of, conn) {
                (Some(port), Some(_)) => {
                    let Some(listener) = listeners.get(&(side.vpid, port)) else { break };
                    match listener.connect().await {
                        Ok(s) => (Some(End::Unix(s)), Dir { pending: side.unread.clone(), ended: false }),
                        Err(_) => (None, Dir::default()),
                    }
                }
                _ => (side_end(k), Dir::default()),
            };
            let Some(end) = end else { break };
            owed.append(if k == 0 { p.to_client.clone() } else { p.to_server.clone() });
            ends.push((end, owed));
        }
        let [(client, to_client), (server, to_server)]: [(End, Dir); 2] = match ends.try_into() {
            Ok(e) => e,
            Err(left) => {
                tracing::warn!(stream = id, "a stream between members cannot be rebuilt; it ends");
                for (end, owed) in left {
                    streams::finish_alone(end, owed);
                }
                continue;
            }
        };
        relay::spawn_local(&d.agent, id, client, server, to_server, to_client);
    }
}

/// Commit: the processes live on the destination now; this node forgets them.
fn forget_here(d: &mut Driver) {
    let agent = &d.agent;
    for m in d.members.iter_mut() {
        {
            let mut t = agent.tables.lock();
            for e in &m.endpoints {
                for l in t.listeners.remove(&e.key()).unwrap_or_default() {
                    l.remove();
                }
            }
            t.start_times.remove(&m.entry.vpid);
            t.link_inodes.remove(&m.entry.vpid);
        }
        agent.moves.epochs.lock().remove(&m.entry.vpid);
        // Its log went with it.
        if let Some(log) = &m.classified.own_log {
            let _ = std::fs::remove_file(log);
        }
        m.streams.clear();
    }
    d.internal.clear();
    crate::registry::save(agent);
}

fn finish(d: &mut Driver, outcome: Outcome, restored_group: &[(Vpid, i32)]) {
    let _ = std::fs::remove_dir_all(&d.image_dir);
    let (committed, new_pid, reason) = match &outcome {
        Outcome::Committed { pid } => (true, *pid, None),
        Outcome::RolledBack { reason } => (false, 0, Some(reason.clone())),
    };
    if !committed {
        d.step("rollback", reason.clone().unwrap_or_default());
    }
    if committed {
        if let Some(node) = d.agent.config.node_by_id(d.dest.0) {
            let logs: Vec<String> = d
                .members
                .iter()
                .filter(|m| m.classified.stdio.iter().any(|(_, r, _)| *r == Redirect::Log))
                .map(|m| super::participant::log_path(&node.runtime_dir, m.entry.vpid).display().to_string())
                .collect();
            if !logs.is_empty() {
                d.log_path = Some(format!("{} on {}", logs.join(", "), node.name));
            }
        }
    }
    let group = d.members[1..]
        .iter()
        .map(|m| dvk_protocol::local::MovedMember {
            vpid: m.entry.vpid,
            old_pid: m.entry.real_pid,
            new_pid: restored_group.iter().find(|(v, _)| *v == m.entry.vpid).map(|(_, p)| *p).unwrap_or(0),
        })
        .collect();
    let report = MoveReport {
        vpid: d.lead().vpid,
        from: d.agent.node_name(d.agent.node_id()),
        to: d.agent.node_name(d.dest),
        old_pid: d.lead().real_pid,
        new_pid,
        committed,
        reason,
        steps: d.steps.clone(),
        image_bytes: d.image_bytes,
        sent_bytes: d.sent_bytes,
        frozen_micros: d.frozen_for.map(|f| f.as_micros() as u64).unwrap_or(0),
        total_micros: d.started.elapsed().as_micros() as u64,
        group,
        log: d.log_path.clone(),
    };
    tracing::info!(vpid = %d.lead().vpid, tag = %d.tag, committed, frozen_ms = report.frozen_micros / 1000, total_ms = report.total_micros / 1000, reason = ?report.reason, "move finished");
    let _ = d.reply.send(LocalResponse::MoveDone(Box::new(report)));
}

#[cfg(test)]
mod tests {
    use super::nonzero_spans;

    #[test]
    fn zero_pages_are_left_out_and_the_rest_merged() {
        let mut buf = vec![0u8; 6 * 4096];
        buf[4096] = 1; // page 1
        buf[2 * 4096 + 4095] = 7; // page 2 (its last byte)
        buf[5 * 4096] = 3; // page 5
        assert_eq!(nonzero_spans(&buf), vec![(4096, 3 * 4096), (5 * 4096, 6 * 4096)]);
        assert!(nonzero_spans(&[0u8; 8192]).is_empty());
        assert_eq!(nonzero_spans(&[1u8; 4096]), vec![(0, 4096)]);
    }
}
