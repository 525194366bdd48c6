//! The local socket of an agent (`<runtime_dir>/agent.sock`): requests from
//! the shim inside a process and from `migrate-cli`, one response each.
//!
//! The agent never trusts identities in these messages: the caller's pid and
//! uid come from `SO_PEERCRED` of the connection.

use pidvirt::{EndpointState, NodeId, ProcessEntry, VirtualAddr, Vpid};
use serde::{Deserialize, Serialize};

/// Bumped on breaking changes to [`LocalRequest`]/[`LocalResponse`]; additive
/// variants at the end of an enum do not bump it. The agent accepts exactly
/// its own version in `Register` and answers others with an error.
pub const LOCAL_PROTOCOL_VERSION: u16 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LocalRequest {
    /// Wire value 0: never sent.
    Reserved,
    /// The connecting process registers itself (shim constructor, or a forked child).
    /// `endpoint` None: the agent uses the program name.
    Register { version: u16, dc: String, endpoint: Option<String> },
    /// Deliver `signal` to the process (or, with `group`, its process group) named by `vpid`,
    /// wherever it runs. Only root or the owner may.
    Kill { vpid: Vpid, signal: i32, group: bool },
    /// Every registered process of the cluster.
    ListProcesses,
    /// Every configured node and its link state.
    ListNodes,
    /// The VIP of endpoint name `name` in DC `dc` (the caller's own DC only).
    Resolve { dc: String, name: String },
    /// Connect to the endpoint at `vip:port` in the caller's DC. On `StreamOpened`
    /// this connection carries the stream's bytes from then on.
    OpenStream { vip: [u8; 4], port: u16 },
    /// The caller listens for endpoint `<its name>:port` on the AF_UNIX listener at `path`;
    /// the agent connects there per incoming stream and first sends an [`crate::stream::AcceptHeader`].
    Listen { port: u16, path: String },
    /// Every endpoint of the cluster.
    ListEndpoints,
    /// The caller is about to fork(): reserve a vPID for the child, so fork() can return it
    /// to the parent at once (the child claims it with `RegisterForked`).
    ReserveVpid,
    /// A forked child registers with the vPID its parent reserved (DC and endpoint are the parent's).
    RegisterForked { version: u16, reserved: Vpid },
    /// Move the process `target` (a vPID, or a real pid of this node) to node `dest`. Answered
    /// by `MoveStep`/`MoveProgress` frames, then one `MoveDone` (or `Error`). `group`: other
    /// processes (vPIDs or real pids) that move with it as one (`move --group`): all are
    /// restored before any runs on `dest`, and a failure of any rolls all back.
    Move { target: i32, dest: String, options: MoveOptions, group: Vec<i32> },
    /// Could `target` move to `dest` (or anywhere)? Nothing is frozen.
    MoveCheck { target: i32, dest: Option<String> },
    /// The stdout/stderr log that a moved process writes on the node it runs on, from `offset`.
    Logs { vpid: Vpid, offset: u64 },
}

/// How a move is made (`migrate-cli move` flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveOptions {
    /// Copy memory in rounds while the process still runs, before it is frozen: `Some(true)`
    /// always, `Some(false)` never, `None` when its private memory is large enough to gain.
    pub precopy: Option<bool>,
    /// Compress page data on the link (LZ4 blocks; a block that does not shrink goes as is).
    pub compress: bool,
    /// How the image travels to the destination.
    pub transfer: Transfer,
}

/// How a move's image travels (`migrate-cli move --transfer`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Transfer {
    /// Image frames on the agent link, page data from the dump straight into the destination's
    /// memory (zero pages skipped).
    #[default]
    Stream,
    /// The dump goes to an image directory and rsync, tunnelled through the agent link, sends
    /// it: only the delta against an older image of the process the destination still holds.
    Rsync,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LocalResponse {
    Reserved,
    Registered {
        vpid: Vpid,
        parent: Option<Vpid>,
        node: NodeId,
    },
    /// 0 on success, else the errno `kill(2)` would have set (ESRCH, EPERM, EINVAL, EHOSTUNREACH).
    KillDone {
        errno: i32,
    },
    Processes(Vec<ProcessRow>),
    Nodes(Vec<NodeStatus>),
    Error {
        message: String,
    },
    Resolved {
        vip: [u8; 4],
    },
    /// `errno`-style refusal for calls that mimic a syscall (ECONNREFUSED, EADDRINUSE, …).
    Refused {
        errno: i32,
    },
    StreamOpened {
        stream: u64,
        local: VirtualAddr,
        peer: VirtualAddr,
    },
    Listening {
        vip: [u8; 4],
    },
    Endpoints(Vec<pidvirt::EndpointEntry>),
    VpidReserved {
        vpid: Vpid,
    },
    /// One finished step of a move.
    MoveStep(MoveStep),
    /// Image bytes sent so far of `total`.
    MoveProgress {
        sent: u64,
        total: u64,
    },
    /// The move is over (committed or rolled back).
    MoveDone(Box<MoveReport>),
    MoveChecked(Box<MoveCheck>),
    /// Log bytes from the requested offset; `next` is the offset to ask for next.
    LogChunk {
        node: String,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
        next: u64,
    },
}

/// One step of a move as `migrate-cli move` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveStep {
    pub name: String,
    /// How long the step took.
    pub micros: u64,
    pub detail: String,
}

/// A process of a group move other than the first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedMember {
    pub vpid: Vpid,
    pub old_pid: i32,
    /// The real pid on the destination (0 if rolled back).
    pub new_pid: i32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveReport {
    pub vpid: Vpid,
    pub from: String,
    pub to: String,
    pub old_pid: i32,
    /// The real pid on the destination (0 if rolled back).
    pub new_pid: i32,
    pub committed: bool,
    /// Why the move rolled back.
    pub reason: Option<String>,
    pub steps: Vec<MoveStep>,
    pub image_bytes: u64,
    /// Bytes the image transfer put on the agent link (for rsync: its whole protocol traffic
    /// from the source, literal data and checksums; for the stream: image frames' payload).
    pub sent_bytes: u64,
    /// From the freeze until the process ran again (on either node).
    pub frozen_micros: u64,
    pub total_micros: u64,
    /// The other processes of a group move (`move --group`), in the order asked.
    pub group: Vec<MovedMember>,
    /// Where stdout/stderr that could not follow now go (on the destination).
    pub log: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveCheck {
    pub vpid: Vpid,
    pub pid: i32,
    pub node: String,
    /// What would stop the move, each as a user knows it.
    pub blockers: Vec<String>,
    /// fds that would be redirected (stdio that cannot follow).
    pub redirects: Vec<String>,
    /// fds the agents carry (virtual sockets, listeners, the agent link).
    pub carried: Vec<String>,
}

/// One line of `migrate-cli ps`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRow {
    pub entry: ProcessEntry,
    pub node_name: String,
    /// State as the answering agent sees it.
    pub state: EndpointState,
}

/// One line of `migrate-cli nodes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub id: NodeId,
    pub address: String,
    /// This is the agent that answered.
    pub is_self: bool,
    /// Authenticated link up (always true for self).
    pub up: bool,
    /// Milliseconds since the last frame from that node (None: never heard from it).
    pub last_contact_ms: Option<u64>,
    pub processes: u32,
}
