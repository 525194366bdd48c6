//! The agent ↔ agent protocol, one authenticated TCP link per pair of nodes.
//!
//! ```text
//!  dialer (lower node id)                      acceptor (higher node id)
//!    │── Hello{version, node, nonce_d} ────────────▶│  unknown node / version → close
//!    │◀──────────────── Challenge{node, nonce_a} ───│
//!    │── Proof{HMAC(k, dialer ‖ ids ‖ nonces)} ────▶│  wrong MAC → log, close: nothing else sent
//!    │◀──────── Accepted{HMAC(k, acceptor ‖ …)} ────│
//!    │  dialer checks the acceptor's MAC            │
//!    │══ Announce{local processes, endpoints} ════▶ │  (both directions)
//!    │◀═ ProcessUp/Down, EndpointUp/Down, Signal,  ═│
//!    │   Stream{Open,Data,Credit,Fin,Reset}, Ping … │
//! ```
//! The key never crosses the wire; each side proves it over nonces the other
//! chose, with a role label so a proof cannot be reflected back. A dialer
//! that lacks the key receives only a random nonce.

use pidvirt::{EndpointEntry, EndpointKey, NodeId, ProcessEntry, VirtualAddr, Vpid};
use serde::{Deserialize, Serialize};

/// Bumped on breaking changes; agents of different versions refuse to link.
pub const PEER_PROTOCOL_VERSION: u16 = 1;

pub type Nonce = [u8; 32];
pub type Mac = [u8; 32];

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMessage {
    /// Wire value 0: never sent.
    Reserved,
    Hello {
        version: u16,
        node: NodeId,
        nonce: Nonce,
    },
    Challenge {
        node: NodeId,
        nonce: Nonce,
    },
    Proof {
        mac: Mac,
    },
    Accepted {
        mac: Mac,
    },
    /// Liveness; answered with Pong.
    Ping,
    Pong,
    /// The sender's complete list of local processes (replaces what the receiver had for it).
    Announce {
        processes: Vec<ProcessEntry>,
        endpoints: Vec<EndpointEntry>,
    },
    /// A process registered on (or its entry changed at) the sender.
    ProcessUp(ProcessEntry),
    /// A process of the sender exited.
    ProcessDown {
        vpid: Vpid,
    },
    /// Deliver a signal to a process running on the receiver, on behalf of `sender_uid`.
    Signal {
        request: u64,
        vpid: Vpid,
        signal: i32,
        group: bool,
        sender_uid: u32,
    },
    /// Result of `Signal`: 0 or an errno.
    SignalDone {
        request: u64,
        errno: i32,
    },
    /// An endpoint now listens on the sender.
    EndpointUp(EndpointEntry),
    /// An endpoint of the sender stopped listening.
    EndpointDown(EndpointKey),
    /// Open stream `stream` (id chosen by the opener) to endpoint `endpoint` on the receiver.
    /// Both directions start with [`STREAM_WINDOW`] bytes of credit.
    StreamOpen {
        stream: u64,
        endpoint: EndpointKey,
        client: VirtualAddr,
        server: VirtualAddr,
    },
    /// Stream bytes; at most the credit the receiver granted.
    StreamData {
        stream: u64,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The receiver of data wrote `bytes` more to its program: the sender may send that much more.
    StreamCredit {
        stream: u64,
        bytes: u32,
    },
    /// The sender's direction is finished (half-close): no more data will follow.
    StreamFin {
        stream: u64,
    },
    /// The stream is gone (refused, closed, or its link failed).
    StreamReset {
        stream: u64,
    },
}

/// Bytes a stream direction may have in flight (sent, not yet written to the program).
/// Bounds the agent memory per stream and lets one slow reader stall only its own stream.
pub const STREAM_WINDOW: u32 = 512 * 1024;
/// Largest payload of one `StreamData`.
pub const STREAM_CHUNK: usize = 64 * 1024;
