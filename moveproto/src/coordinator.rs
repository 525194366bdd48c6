//! The source agent's side of a move: decides commit or rollback.
//!
//! ```text
//!  Starting ──all StartAck──▶ Freezing ──Frozen──▶ Detaching ──all Detached──▶ Transferring
//!     │                          │                    │                            │ ImageSent
//!     │                          │                    │                            ▼
//!     └──────── timeout, failure, D's link down ──────┴──────────────▶ RolledBack ◀─ Restoring
//!                                                                          ▲          │ Restored
//!                                                          Outcome{false}  │          ▼
//!                                              Committed ◀── Committed ── InDoubt (Commit sent)
//! ```

use crate::{Millis, MoveMsg, MoveTag, Timeouts};
use pidvirt::{EndpointKey, NodeId, Vpid};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    Starting,
    Freezing,
    Detaching,
    Transferring,
    Restoring,
    /// Commit sent to D; waiting to learn whether the copy resumed.
    InDoubt,
    Done(Outcome),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The copy runs on the destination (real pid there); the original was killed.
    Committed { pid: i32 },
    /// The original runs on at the source.
    RolledBack { reason: String },
}

/// What happened, as the driver reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoordEvent {
    /// A message from a peer.
    Msg(NodeId, MoveMsg),
    LinkDown(NodeId),
    LinkUp(NodeId),
    /// [`CoordAction::Freeze`] done.
    Frozen,
    FreezeFailed(String),
    /// Some image bytes left (resets the transfer's idle timer).
    Progress,
    /// [`CoordAction::DumpAndSend`] done: D has the whole image and plan.
    ImageSent,
    DumpFailed(String),
    /// The clock moved (the driver calls this at least every [`Coordinator::deadline`]).
    Tick,
}

/// What the driver must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoordAction {
    /// Send on the link to a peer (in order with the stream data the driver sent before).
    Send(NodeId, MoveMsg),
    /// Routes of the process and its endpoints here → Migrating (new opens wait), once every
    /// open already under way here has reached the process's listener.
    MarkMigrating,
    /// Freeze the process (ptrace), then report Frozen / FreezeFailed. Report Frozen even if the
    /// move ended meanwhile (the freeze outlived its timeout): the machine answers Thaw.
    Freeze,
    /// Stop this node's half of every stream of the process and read the process's unsent
    /// tails (it is frozen). Sends of StreamDetach follow this action.
    DetachLocal,
    /// Dump the frozen process and send image and plan to the destination; report ImageSent /
    /// DumpFailed (and Progress meanwhile).
    DumpAndSend,
    /// From now on, if the source agent dies, the frozen original must die with it (a commit
    /// is under way: it may run on the destination).
    KillOriginalOnExit,
    /// Kill the frozen original and forget the process here (it runs on the destination).
    KillOriginal,
    /// Routes here → the destination (the pids there of the process and of a group's others).
    RouteCommitted { dest: NodeId, pid: i32, group: Vec<(Vpid, i32)> },
    /// Reattach this node's halves of the streams (StreamReattach sends follow) and requeue
    /// accepted backlog connections into the process's own listeners.
    ReattachLocal,
    /// Undo KillOriginalOnExit and let the original run.
    Thaw,
    /// Routes here back to what they were.
    RouteRolledBack,
    /// The move is over.
    Finish(Outcome),
}

pub struct Coordinator {
    pub tag: MoveTag,
    pub vpid: Vpid,
    pub source: NodeId,
    pub dest: NodeId,
    /// The other processes of a group move (they freeze, move and commit with `vpid`).
    pub group: Vec<Vpid>,
    endpoints: Vec<EndpointKey>,
    timeouts: Timeouts,
    phase: Phase,
    /// Peers that were sent Start (they get Abort or Commit).
    started: BTreeSet<NodeId>,
    awaiting_ack: BTreeSet<NodeId>,
    /// Streams of the process whose fixed end is on another node: stream → that node.
    remote_streams: BTreeMap<u64, NodeId>,
    awaiting_detach: BTreeSet<u64>,
    frozen: bool,
    detached: bool,
    restored_pid: Option<i32>,
    restored_group: Vec<(Vpid, i32)>,
    now: Millis,
    deadline: Millis,
    /// In doubt: when to ask again.
    next_query: Millis,
}

impl Coordinator {
    /// A move of `vpid` from `source` (this node) to `dest`. `peers`: the nodes linked now
    /// (`dest` must be one). `remote_streams`: the streams of the process whose other end is
    /// on another node.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tag: MoveTag,
        vpid: Vpid,
        source: NodeId,
        dest: NodeId,
        endpoints: Vec<EndpointKey>,
        peers: BTreeSet<NodeId>,
        remote_streams: BTreeMap<u64, NodeId>,
        timeouts: Timeouts,
        now: Millis,
    ) -> Coordinator {
        Coordinator {
            tag,
            vpid,
            source,
            dest,
            group: Vec::new(),
            endpoints,
            timeouts,
            phase: Phase::Starting,
            started: peers.iter().copied().filter(|n| *n != source).collect(),
            awaiting_ack: BTreeSet::new(),
            remote_streams,
            awaiting_detach: BTreeSet::new(),
            frozen: false,
            detached: false,
            restored_pid: None,
            restored_group: Vec::new(),
            now,
            deadline: now,
            next_query: now,
        }
    }

    /// A group move: `group` (the other processes) move and commit with the process.
    pub fn with_group(mut self, group: Vec<Vpid>) -> Coordinator {
        self.group = group;
        self
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done(_))
    }

    /// When the driver must call [`Coordinator::handle`] with Tick at the latest.
    pub fn deadline(&self) -> Millis {
        if self.phase == Phase::InDoubt {
            self.next_query
        } else {
            self.deadline
        }
    }

    /// The first actions: Start to every peer.
    pub fn start(&mut self) -> Vec<CoordAction> {
        let mut out = Vec::new();
        if !self.started.contains(&self.dest) {
            return self.rollback(format!("the destination node {} is not linked", self.dest), out);
        }
        for &n in &self.started {
            out.push(CoordAction::Send(
                n,
                MoveMsg::Start {
                    tag: self.tag,
                    vpid: self.vpid,
                    source: self.source,
                    dest: self.dest,
                    endpoints: self.endpoints.clone(),
                    group: self.group.clone(),
                },
            ));
        }
        self.awaiting_ack = self.started.clone();
        self.deadline = self.now + self.timeouts.start;
        out
    }

    pub fn handle(&mut self, now: Millis, ev: CoordEvent) -> Vec<CoordAction> {
        self.now = self.now.max(now);
        if self.is_done() {
            // The freeze outlived its timeout and the move rolled back without it: let P run.
            if ev == CoordEvent::Frozen && !self.frozen {
                return vec![CoordAction::Thaw];
            }
            return Vec::new();
        }
        if let CoordEvent::Msg(_, m) = &ev {
            if m.tag() != Some(self.tag) {
                return Vec::new();
            }
        }
        let mut out = Vec::new();
        match (self.phase.clone(), ev) {
            (Phase::Starting, CoordEvent::Msg(from, MoveMsg::StartAck { .. })) => {
                self.awaiting_ack.remove(&from);
                self.after_acks(&mut out);
            }
            (Phase::Starting, CoordEvent::LinkDown(n)) if n != self.dest => {
                // Its routes to us went with the link; it relearns them from the next Announce.
                self.awaiting_ack.remove(&n);
                self.started.remove(&n);
                self.after_acks(&mut out);
            }
            (Phase::Freezing, CoordEvent::Frozen) => {
                self.frozen = true;
                self.detached = true;
                out.push(CoordAction::DetachLocal);
                for (&stream, &node) in &self.remote_streams {
                    out.push(CoordAction::Send(node, MoveMsg::StreamDetach { tag: self.tag, stream }));
                }
                self.awaiting_detach = self.remote_streams.keys().copied().collect();
                self.phase = Phase::Detaching;
                self.after_detach(&mut out);
            }
            (Phase::Freezing, CoordEvent::FreezeFailed(why)) => {
                return self.rollback(format!("freeze failed: {why}"), out);
            }
            (Phase::Detaching, CoordEvent::Msg(_, MoveMsg::StreamDetached { stream, .. })) => {
                self.awaiting_detach.remove(&stream);
                self.after_detach(&mut out);
            }
            (Phase::Transferring, CoordEvent::Progress) => {
                self.deadline = self.now + self.timeouts.transfer_idle;
            }
            (Phase::Transferring, CoordEvent::ImageSent) => {
                out.push(CoordAction::Send(self.dest, MoveMsg::Restore { tag: self.tag }));
                self.phase = Phase::Restoring;
                self.deadline = self.now + self.timeouts.restore;
            }
            (Phase::Transferring, CoordEvent::DumpFailed(why)) => {
                return self.rollback(format!("dump or transfer failed: {why}"), out);
            }
            (Phase::Restoring, CoordEvent::Msg(from, MoveMsg::Restored { pid, group, .. })) if from == self.dest => {
                self.restored_pid = Some(pid);
                self.restored_group = group.clone();
                out.push(CoordAction::KillOriginalOnExit);
                out.push(CoordAction::Send(
                    self.dest,
                    MoveMsg::Commit { tag: self.tag, vpid: self.vpid, dest: self.dest, pid, group },
                ));
                self.phase = Phase::InDoubt;
                self.next_query = self.now + self.timeouts.query_every;
            }
            (Phase::Restoring, CoordEvent::Msg(from, MoveMsg::Failed { why, .. })) if from == self.dest => {
                return self.rollback(format!("restore on the destination failed: {why}"), out);
            }
            (Phase::InDoubt, CoordEvent::Msg(from, MoveMsg::Committed { .. })) if from == self.dest => {
                return self.commit(out);
            }
            (Phase::InDoubt, CoordEvent::Msg(from, MoveMsg::Outcome { committed, .. })) if from == self.dest => {
                if committed {
                    return self.commit(out);
                }
                return self.rollback("the destination gave up before the commit reached it".into(), out);
            }
            (Phase::InDoubt, CoordEvent::LinkUp(n)) if n == self.dest => {
                out.push(CoordAction::Send(self.dest, MoveMsg::Query { tag: self.tag, vpid: self.vpid }));
                self.next_query = self.now + self.timeouts.query_every;
            }
            (Phase::InDoubt, CoordEvent::Tick) if self.now >= self.next_query => {
                out.push(CoordAction::Send(self.dest, MoveMsg::Query { tag: self.tag, vpid: self.vpid }));
                self.next_query = self.now + self.timeouts.query_every;
            }
            (Phase::InDoubt, _) => {}
            (_, CoordEvent::LinkDown(n)) if n == self.dest => {
                return self.rollback(format!("lost the link to the destination node {n}"), out);
            }
            (_, CoordEvent::LinkDown(n)) => {
                // A fixed end on that node was reset with its link: nothing to wait for.
                self.started.remove(&n);
                let gone: Vec<u64> = self.remote_streams.iter().filter(|(_, f)| **f == n).map(|(s, _)| *s).collect();
                for s in gone {
                    self.remote_streams.remove(&s);
                    self.awaiting_detach.remove(&s);
                }
                if self.phase == Phase::Detaching {
                    self.after_detach(&mut out);
                }
            }
            (_, CoordEvent::Tick) if self.now >= self.deadline => {
                let step = match self.phase {
                    Phase::Starting => "peers to acknowledge the start",
                    Phase::Freezing => "the freeze",
                    Phase::Detaching => "the streams' other ends to detach",
                    Phase::Transferring => "the image transfer (no progress)",
                    Phase::Restoring => "the restore on the destination",
                    _ => "the move",
                };
                return self.rollback(format!("timed out waiting for {step}"), out);
            }
            _ => {}
        }
        out
    }

    /// Every peer holds new opens: mark our own routes (after any open already under way here
    /// has reached the process's listener) and freeze.
    fn after_acks(&mut self, out: &mut Vec<CoordAction>) {
        if self.phase == Phase::Starting && self.awaiting_ack.is_empty() {
            self.phase = Phase::Freezing;
            self.deadline = self.now + self.timeouts.detach;
            out.push(CoordAction::MarkMigrating);
            out.push(CoordAction::Freeze);
        }
    }

    /// The streams found on the frozen process whose other end is on another node (call before
    /// reporting Frozen; replaces what `new` was given).
    pub fn streams_found(&mut self, remote_streams: BTreeMap<u64, NodeId>) {
        if matches!(self.phase, Phase::Starting | Phase::Freezing) {
            self.remote_streams = remote_streams;
        }
    }

    fn after_detach(&mut self, out: &mut Vec<CoordAction>) {
        if self.phase == Phase::Detaching && self.awaiting_detach.is_empty() {
            self.phase = Phase::Transferring;
            self.deadline = self.now + self.timeouts.transfer_idle;
            out.push(CoordAction::DumpAndSend);
        }
    }

    fn commit(&mut self, mut out: Vec<CoordAction>) -> Vec<CoordAction> {
        let pid = self.restored_pid.unwrap_or(0);
        // Routes first: the original's death must find it already routed to the destination.
        let group = self.restored_group.clone();
        out.push(CoordAction::RouteCommitted { dest: self.dest, pid, group: group.clone() });
        out.push(CoordAction::KillOriginal);
        for &n in &self.started {
            if n != self.dest {
                out.push(CoordAction::Send(
                    n,
                    MoveMsg::Commit { tag: self.tag, vpid: self.vpid, dest: self.dest, pid, group: group.clone() },
                ));
            }
        }
        let o = Outcome::Committed { pid };
        self.phase = Phase::Done(o.clone());
        out.push(CoordAction::Finish(o));
        out
    }

    fn rollback(&mut self, reason: String, mut out: Vec<CoordAction>) -> Vec<CoordAction> {
        for &n in &self.started {
            out.push(CoordAction::Send(n, MoveMsg::Abort { tag: self.tag, vpid: self.vpid }));
        }
        if self.detached {
            out.push(CoordAction::ReattachLocal);
            for (&stream, &node) in &self.remote_streams {
                out.push(CoordAction::Send(node, MoveMsg::StreamReattach { tag: self.tag, stream }));
            }
        }
        if self.frozen && !out.contains(&CoordAction::Thaw) {
            out.push(CoordAction::Thaw);
        }
        out.push(CoordAction::RouteRolledBack);
        let o = Outcome::RolledBack { reason };
        self.phase = Phase::Done(o.clone());
        out.push(CoordAction::Finish(o));
        out
    }
}
