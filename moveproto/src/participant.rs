//! Every other agent's side of a move (the destination is one of them).
//!
//! ```text
//!            Start                 Restore            Restored ok
//!  (none) ─────────▶ Started ─────────────▶ Restoring ─────────▶ Held
//!                      │  (destination only)    │ failed             │ Commit
//!                      │                        ▼                    ▼
//!                      │ Commit          Failed (wait Abort)     Committed
//!                      ▼ (not dest)
//!                   Committed        Abort / hold timeout / Query while held ──▶ Aborted
//! ```
//! Stream detaches are answered in any phase: they concern the fixed ends this node holds.

use crate::{Millis, MoveMsg, MoveTag, Timeouts};
use pidvirt::{EndpointKey, NodeId, Vpid};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartPhase {
    Started,
    Restoring,
    RestoreFailed,
    Held { pid: i32 },
    Committed,
    Aborted,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartEvent {
    /// A message from the coordinator (the source node).
    Msg(MoveMsg),
    /// [`PartAction::StartRestore`] done.
    RestoreDone(Result<i32, String>),
    Tick,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartAction {
    /// Send to the coordinator.
    Reply(MoveMsg),
    /// Routes of the process and `endpoints` → Migrating (new opens wait).
    MarkMigrating { endpoints: Vec<EndpointKey> },
    /// Stop relaying the fixed end of `stream` held here and keep it (the reply follows).
    DetachStream(u64),
    /// Restore the received image, held; report RestoreDone.
    StartRestore,
    /// Resume the held copy: register it, reattach its streams, requeue its backlog.
    ResumeHeld,
    /// Kill the held copy (if any) and delete the received image.
    DiscardCopy,
    /// Routes → the destination (pid there; a group's other members' too).
    RouteCommitted { dest: NodeId, pid: i32, group: Vec<(Vpid, i32)> },
    /// Routes back to what they were. (Fixed ends detached for this move stay held: the
    /// source reattaches them right after its Abort; ends nobody reattaches expire.)
    RouteRolledBack,
}

pub struct Participant {
    pub tag: MoveTag,
    pub vpid: Vpid,
    /// The other processes of a group move.
    pub group: Vec<Vpid>,
    /// Destination: their pids in the held copy (set by the driver before RestoreDone).
    group_pids: Vec<(Vpid, i32)>,
    pub coordinator: NodeId,
    pub dest: NodeId,
    me: NodeId,
    phase: PartPhase,
    timeouts: Timeouts,
    /// Rolls back by itself past this (refreshed by every message of the move).
    deadline: Millis,
}

impl Participant {
    /// Made on `Start` (the message is handled by [`Participant::start`]).
    pub fn new(me: NodeId, start: &MoveMsg, timeouts: Timeouts, now: Millis) -> Option<Participant> {
        let MoveMsg::Start { tag, vpid, source, dest, group, .. } = start else { return None };
        Some(Participant {
            tag: *tag,
            vpid: *vpid,
            group: group.clone(),
            group_pids: Vec::new(),
            coordinator: *source,
            dest: *dest,
            me,
            phase: PartPhase::Started,
            timeouts,
            deadline: now + timeouts.hold,
        })
    }

    /// Destination, before reporting RestoreDone(Ok): the held pids of the group's others.
    pub fn set_group_pids(&mut self, pids: Vec<(Vpid, i32)>) {
        self.group_pids = pids;
    }

    pub fn phase(&self) -> &PartPhase {
        &self.phase
    }

    pub fn is_destination(&self) -> bool {
        self.me == self.dest
    }

    pub fn is_done(&self) -> bool {
        matches!(self.phase, PartPhase::Committed | PartPhase::Aborted)
    }

    pub fn deadline(&self) -> Millis {
        self.deadline
    }

    /// What the driver does with a message of a move it runs no machine for (it restarted, or
    /// never received the move's Start, or dropped the finished machine). `resumed_here`: a
    /// process that arrived by the move `msg.tag()` is registered on this node (the agent keeps
    /// the arrival tag with each registered process; like the registration it survives a
    /// restart). A held copy cannot exist here (it dies with the agent that restored it), so a
    /// Query or a late Commit is answered from the registry alone; a StreamDetach is done as
    /// usual (the driver replies `held: false` if it has no such end).
    pub fn without_machine(me: NodeId, msg: &MoveMsg, resumed_here: bool) -> Vec<PartAction> {
        match *msg {
            MoveMsg::StreamDetach { stream, .. } => vec![PartAction::DetachStream(stream)],
            MoveMsg::Query { tag, .. } => vec![PartAction::Reply(MoveMsg::Outcome { tag, committed: resumed_here })],
            MoveMsg::Commit { tag, dest, .. } if dest == me => vec![PartAction::Reply(if resumed_here {
                MoveMsg::Committed { tag }
            } else {
                MoveMsg::Outcome { tag, committed: false }
            })],
            MoveMsg::Restore { tag } => {
                vec![PartAction::Reply(MoveMsg::Failed { tag, why: "the destination knows no such move".into() })]
            }
            _ => Vec::new(),
        }
    }

    pub fn start(&mut self, start: &MoveMsg) -> Vec<PartAction> {
        let MoveMsg::Start { endpoints, .. } = start else { return Vec::new() };
        vec![
            PartAction::MarkMigrating { endpoints: endpoints.clone() },
            PartAction::Reply(MoveMsg::StartAck { tag: self.tag }),
        ]
    }

    pub fn handle(&mut self, now: Millis, ev: PartEvent) -> Vec<PartAction> {
        let tag = self.tag;
        let mut out = Vec::new();
        if let PartEvent::Msg(m) = &ev {
            if m.tag() != Some(tag) {
                return out;
            }
            self.deadline = self.deadline.max(now + self.timeouts.hold);
        }
        match ev {
            PartEvent::Msg(MoveMsg::StreamDetach { stream, .. }) => {
                // Answered in every phase: a late detach of a finished move finds no held end
                // and says so; the coordinator only waits for it.
                out.push(PartAction::DetachStream(stream));
            }
            PartEvent::Msg(MoveMsg::Restore { .. }) => match self.phase {
                PartPhase::Started if self.is_destination() => {
                    self.phase = PartPhase::Restoring;
                    out.push(PartAction::StartRestore);
                }
                PartPhase::Held { pid } => {
                    out.push(PartAction::Reply(MoveMsg::Restored { tag, pid, group: self.group_pids.clone() }))
                }
                _ => out.push(PartAction::Reply(MoveMsg::Failed { tag, why: "not ready to restore".into() })),
            },
            PartEvent::RestoreDone(result) => match (&self.phase, result) {
                (PartPhase::Restoring, Ok(pid)) => {
                    self.phase = PartPhase::Held { pid };
                    out.push(PartAction::Reply(MoveMsg::Restored { tag, pid, group: self.group_pids.clone() }));
                }
                (PartPhase::Restoring, Err(why)) => {
                    self.phase = PartPhase::RestoreFailed;
                    out.push(PartAction::DiscardCopy);
                    out.push(PartAction::Reply(MoveMsg::Failed { tag, why }));
                }
                // Finished (aborted) while restoring: the copy must not survive.
                (_, Ok(_)) => out.push(PartAction::DiscardCopy),
                (_, Err(_)) => {}
            },
            PartEvent::Msg(MoveMsg::Commit { dest, pid, group, .. }) => match self.phase {
                PartPhase::Held { .. } if self.is_destination() => {
                    self.phase = PartPhase::Committed;
                    out.push(PartAction::ResumeHeld);
                    out.push(PartAction::RouteCommitted { dest, pid, group });
                    out.push(PartAction::Reply(MoveMsg::Committed { tag }));
                }
                PartPhase::Committed if self.is_destination() => {
                    out.push(PartAction::Reply(MoveMsg::Committed { tag }));
                }
                _ if self.is_destination() => {
                    // Gave up (or never restored): say so; the source thaws its original.
                    self.abort(&mut out);
                    out.push(PartAction::Reply(MoveMsg::Outcome { tag, committed: false }));
                }
                PartPhase::Started => {
                    self.phase = PartPhase::Committed;
                    out.push(PartAction::RouteCommitted { dest, pid, group });
                }
                _ => {}
            },
            PartEvent::Msg(MoveMsg::Query { .. }) => {
                let committed = self.phase == PartPhase::Committed;
                if !committed {
                    self.abort(&mut out);
                }
                out.push(PartAction::Reply(MoveMsg::Outcome { tag, committed }));
            }
            PartEvent::Msg(MoveMsg::Abort { .. }) if self.phase != PartPhase::Committed => self.abort(&mut out),
            PartEvent::Tick if now >= self.deadline && !self.is_done() => self.abort(&mut out),
            _ => {}
        }
        out
    }

    fn abort(&mut self, out: &mut Vec<PartAction>) {
        if self.is_done() {
            return;
        }
        if self.is_destination() {
            // Even before Restore: image chunks may have arrived.
            out.push(PartAction::DiscardCopy);
        }
        self.phase = PartPhase::Aborted;
        out.push(PartAction::RouteRolledBack);
    }
}
