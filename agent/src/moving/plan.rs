//! What the source sends the destination beside the image: how to rebuild the process's
//! fds that the agents own (agent link, listeners, streams, stdio that cannot follow), and
//! the bytes each stream owes. Written as `plan.bin` in the image directory.

use crate::relay::Dir;
use dvk_move::MoveTag;
use pidvirt::{EndpointEntry, NodeId, ProcessEntry};
use serde::{Deserialize, Serialize};

pub const PLAN_FILE: &str = "plan.bin";
/// A group move's own file beside its members' image directories (`m<vPID>/`, each with the
/// member's image and `plan.bin`).
pub const GROUP_FILE: &str = "group.bin";

/// What a group move sends beside its members' images.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupPlan {
    /// Every member, the process asked for first.
    pub members: Vec<pidvirt::Vpid>,
    /// The members are a process tree (the first is its root): one tree image (`tree.img`,
    /// `<pid>/` per process) beside the members' plans, restored as one.
    pub tree: bool,
    /// Streams between members: both ends move, the relay is made again where they run.
    pub internal: Vec<InternalPlan>,
}

/// A stream between two members of a group move.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InternalPlan {
    pub id: u64,
    pub client: InternalSide,
    pub server: InternalSide,
    /// Owed to each side once it runs again, after its `unread` (which the destination writes
    /// first): what the relay held for it, then what the other side wrote that the agent had
    /// not read (+ EOF).
    pub to_client: Dir,
    pub to_server: Dir,
}

/// One end of a stream between members.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InternalSide {
    pub vpid: pidvirt::Vpid,
    /// The member's fds on it. Empty: a connection queued in the backlog of its listener on
    /// `backlog_of` (port), queued again into the new listener.
    pub fds: Vec<FdRef>,
    pub backlog_of: Option<u16>,
    /// Bytes in the member's socket, unread, at the freeze (peeked: they stay there if the move
    /// rolls back; for a backlog connection, read out of it).
    pub unread: Vec<u8>,
}

/// An fd number of the process and the inode its socket had (for the shim's Relink frame).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FdRef {
    pub fd: i32,
    pub old_ino: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MovePlan {
    pub tag: MoveTag,
    /// The process as the source had it (vPID, owner, DC, endpoint name, command, parent).
    pub entry: ProcessEntry,
    pub source: NodeId,
    pub link: Option<FdRef>,
    pub listeners: Vec<ListenerPlan>,
    pub streams: Vec<StreamPlan>,
    /// Connections whose other end had already closed: rebuilt with their unread bytes and EOF.
    pub closed: Vec<ClosedPlan>,
    pub stdio: Vec<(i32, Redirect)>,
    /// What the process had written to its log on the source (the log follows the process).
    pub log: Option<Vec<u8>>,
    pub endpoints: Vec<EndpointEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ListenerPlan {
    pub fds: Vec<FdRef>,
    pub endpoint: EndpointEntry,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StreamPlan {
    pub id: u64,
    /// The process's fds on this stream (dups share it). Empty: a connection still queued in
    /// a listen backlog of `backlog_of` (port), re-queued into the new listener.
    pub fds: Vec<FdRef>,
    pub backlog_of: Option<u16>,
    /// The process is the connecting side.
    pub moving_is_client: bool,
    /// Where the other end is held.
    pub fixed_node: NodeId,
    /// Bytes that were in the process's socket, unread, at the freeze (peeked: they are still
    /// there if the move rolls back; for a backlog connection, read out of it).
    pub unread: Vec<u8>,
    /// Bytes the source agent had received for the process and not written to it (+ EOF).
    pub to_program: Dir,
    /// What the process wrote that the source agent had not sent on (+ EOF): the tail.
    pub to_fixed: Dir,
    /// The stream was reset meanwhile: the process gets its bytes, then EOF.
    pub reset: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClosedPlan {
    pub fds: Vec<FdRef>,
    pub unread: Vec<u8>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Redirect {
    /// stdin that cannot follow: /dev/null.
    Null,
    /// stdout/stderr that cannot follow: the process's log on the destination.
    Log,
}
