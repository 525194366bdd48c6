//! The move protocol (DESIGN §3, after the DVS paper's start/commit/rollback), as two state
//! machines that perform no I/O: the agent feeds them events (messages, link changes, results of
//! the work it did, the clock) and carries out the actions they return, the way quinn-proto sits
//! under quinn. A seeded simulation (`tests/sim.rs`) drives them through reordered, delayed and
//! lost messages, cut links and restarted agents.
//!
//! ```text
//!  S = source (coordinator)          D = destination              F = other peers
//!   │── Start{tag,vpid,dest,eps} ──────▶│──────────────────────────────▶│  endpoints → Migrating
//!   │◀──────────────── StartAck{tag} ───│◀──────────────────────────────│  (new opens wait)
//!   │ freeze P; stop S's half of each stream, read P's unsent tail
//!   │── StreamDetach{tag,s} ───────────▶│ (or F) stop its half, keep its end
//!   │◀──────────── StreamDetached{tag,s}│ (after its last StreamData)
//!   │ dump → image chunks ─────────────▶│ (MoveImage, outside this machine: bulk bytes)
//!   │── Restore{tag} ──────────────────▶│ restore held (ptrace stop)
//!   │◀──────────── Restored{tag,pid} ───│   or Failed{tag,why} ──▶ rollback
//!   │── Commit{tag,dest,pid} ──────────▶│ resume P, reattach streams (StreamReattach ▶ F)
//!   │   (in doubt until the answer)     │
//!   │◀──────────────── Committed{tag} ──│   (lost? S asks Query, D answers Outcome)
//!   │── Commit{tag,dest,pid} ──────────────────────────────────────────▶│ routes → D
//!   │ kill the frozen original
//!
//!  rollback (before Commit was sent, or D answers Outcome{committed: false}):
//!   │── Abort{tag} ────────────────────▶│ kill held copy ──────────────▶│ routes back
//!   │ reattach S's halves (StreamReattach ▶ F), thaw P
//! ```
//!
//! Exactly one copy runs: D resumes only on `Commit`; S kills its original only once D said it
//! resumed (`Committed`, or `Outcome{committed: true}`), and thaws it only once D said it will
//! never resume (`Failed`, `Outcome{committed: false}`) or before `Commit` was ever sent. A
//! participant that hears nothing for [`Timeouts::hold`] rolls back by itself (a held copy is
//! killed first, so a later `Query` is answered "aborted").
//!
//! Every message carries a [`MoveTag`]: the move id (unique in the cluster: the source's node id
//! in the high bits) and the vPID's move epoch (how many moves it has completed). A message whose
//! tag is not the one a machine runs is ignored, so a late message of an earlier attempt can never
//! be applied to a later one.

pub mod coordinator;
pub mod participant;
#[cfg(test)]
mod tests;

use pidvirt::{EndpointKey, NodeId, Vpid};
use serde::{Deserialize, Serialize};

pub use coordinator::{CoordAction, CoordEvent, Coordinator, Outcome, Phase};
pub use participant::{PartAction, PartEvent, PartPhase, Participant};

/// Milliseconds on the driver's monotonic clock (simulated in tests).
pub type Millis = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MoveTag {
    /// Unique per attempt: `source node id << 48 | counter`.
    pub mid: u64,
    /// Moves this vPID completed before this one.
    pub epoch: u64,
}

impl std::fmt::Display for MoveTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "move {:x}.{}", self.mid, self.epoch)
    }
}

/// The control messages of a move between agents. Bulk image bytes travel beside them
/// (`PeerMessage::MoveImage`), outside the machines.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MoveMsg {
    /// Wire value 0: never sent.
    Reserved,
    /// S → every peer: the process and its endpoints start moving to `dest`. `group`: the
    /// other processes of a group move (`vpid` leads it; `endpoints` are all of theirs).
    Start { tag: MoveTag, vpid: Vpid, source: NodeId, dest: NodeId, endpoints: Vec<EndpointKey>, group: Vec<Vpid> },
    /// Peer → S: its routes are Migrating; no stream open to the endpoints is in flight.
    StartAck { tag: MoveTag },
    /// S → F: stop relaying `stream` (S sent its last data before this) and keep the end.
    StreamDetach { tag: MoveTag, stream: u64 },
    /// F → S: stopped (its last data for the stream was sent before this). `held`: false if F no
    /// longer had the stream (it had closed).
    StreamDetached { tag: MoveTag, stream: u64, held: bool },
    /// S → D: the image and the plan are complete: restore, and hold the copy.
    Restore { tag: MoveTag },
    /// D → S: the copy is complete and held (real pid on D; a group's other members' too).
    Restored { tag: MoveTag, pid: i32, group: Vec<(Vpid, i32)> },
    /// D → S: the restore failed (nothing is left on D).
    Failed { tag: MoveTag, why: String },
    /// S → D: resume the copy (the commit point); later S → every other peer: route to `dest`.
    Commit { tag: MoveTag, vpid: Vpid, dest: NodeId, pid: i32, group: Vec<(Vpid, i32)> },
    /// D → S: the copy runs.
    Committed { tag: MoveTag },
    /// S → every peer: roll back (D kills its held copy and deletes the image).
    Abort { tag: MoveTag, vpid: Vpid },
    /// S → D, while in doubt (Commit sent, no Committed): did the copy resume?
    Query { tag: MoveTag, vpid: Vpid },
    /// D → S: the answer to Query (or to a Commit that came after D had given up).
    Outcome { tag: MoveTag, committed: bool },
    /// New holder of the moving end → F: resume the held fixed end of `stream` with the sender
    /// as its peer; the sender's data for it follows on the same link.
    StreamReattach { tag: MoveTag, stream: u64 },
}

impl MoveMsg {
    pub fn tag(&self) -> Option<MoveTag> {
        use MoveMsg::*;
        match self {
            Reserved => None,
            Start { tag, .. }
            | StartAck { tag }
            | StreamDetach { tag, .. }
            | StreamDetached { tag, .. }
            | Restore { tag }
            | Restored { tag, .. }
            | Failed { tag, .. }
            | Commit { tag, .. }
            | Committed { tag }
            | Abort { tag, .. }
            | Query { tag, .. }
            | Outcome { tag, .. }
            | StreamReattach { tag, .. } => Some(*tag),
        }
    }
}

/// How long each step may take before the move rolls back.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Every peer acknowledges Start.
    pub start: Millis,
    /// The freeze, and every fixed end detached.
    pub detach: Millis,
    /// The image transfer, counted from the last progress.
    pub transfer_idle: Millis,
    /// The restore on D, until Restored.
    pub restore: Millis,
    /// In doubt: how often D is asked.
    pub query_every: Millis,
    /// A participant that hears nothing about a move for this long rolls back by itself.
    pub hold: Millis,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { start: 3_000, detach: 3_000, transfer_idle: 10_000, restore: 30_000, query_every: 500, hold: 60_000 }
    }
}
