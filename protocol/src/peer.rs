//! The agent ↔ agent protocol, one authenticated TCP link per pair of nodes.
//!
//! ```text
//!  dialer (lower node id)                      acceptor (higher node id)
//!    │── Hello{version, node, nonce_d} ────────────▶│  unknown node / version → close
//!    │◀──────────────── Challenge{node, nonce_a} ───│
//!    │── Proof{HMAC(k, dialer ‖ ids ‖ nonces)} ────▶│  wrong MAC → log, close: nothing else sent
//!    │◀──────── Accepted{HMAC(k, acceptor ‖ …)} ────│
//!    │  dialer checks the acceptor's MAC            │
//!    │══ Announce{all local processes} ═══════════▶ │  (both directions)
//!    │◀═ ProcessUp / ProcessDown / Signal / Ping … ═│
//! ```
//! The key never crosses the wire; each side proves it over nonces the other
//! chose, with a role label so a proof cannot be reflected back. A dialer
//! that lacks the key receives only a random nonce.

use pidvirt::{NodeId, ProcessEntry, Vpid};
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
}
