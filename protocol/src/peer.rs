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

/// Bumped on breaking changes; agents of different versions refuse to link. 2: `LogRead`
/// carries the requester's uid (an agent of version 1 would serve any user's log).
pub const PEER_PROTOCOL_VERSION: u16 = 2;

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
    /// A control message of a move (see `dvk_move`: start, detach, commit, rollback…).
    Move(dvk_move::MoveMsg),
    /// Bytes of file `file` of move `mid`'s image, at `offset` (source → destination).
    MoveImage {
        mid: u64,
        file: String,
        offset: u64,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// `migrate-cli move` run on another node: the sender's agent asks the source to move
    /// `vpid` to `dest` on behalf of `uid` (checked at the source, where the owner is known).
    MoveForward {
        request: u64,
        vpid: Vpid,
        dest: NodeId,
        uid: u32,
        options: crate::local::MoveOptions,
        /// The other processes of a group move.
        group: Vec<Vpid>,
    },
    /// A step (or progress) of a forwarded move, for the requester's CLI.
    MoveForwardEvent {
        request: u64,
        event: crate::local::LocalResponse,
    },
    /// Bytes of the stdout/stderr log of `vpid` kept on the receiver, from `offset`, for
    /// `uid` (the requester's uid from its local connection; checked at the receiver, where the
    /// log's owner is known: only root or the owner may read it).
    LogRead {
        request: u64,
        vpid: Vpid,
        offset: u64,
        uid: u32,
    },
    LogChunk {
        request: u64,
        response: crate::local::LocalResponse,
    },
    /// File `file` of move `mid`'s image will be `len` bytes (sent before its data, so the
    /// receiver can hold it in memory).
    MoveImageSize {
        mid: u64,
        file: String,
        len: u64,
    },
    /// [`PeerMessage::MoveImage`] compressed (`move --compress`): an LZ4 block that
    /// decompresses to exactly `raw_len` bytes (at most [`MAX_IMAGE_CHUNK`]).
    MoveImageLz4 {
        mid: u64,
        file: String,
        offset: u64,
        raw_len: u32,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// `move --transfer rsync` (source → destination): start the receiving rsync for move
    /// `mid`. The destination builds its command itself (confined to that move's image
    /// directory); the bytes of the two rsyncs follow as [`PeerMessage::MoveRsyncData`].
    MoveRsyncOpen {
        mid: u64,
    },
    /// Bytes of move `mid`'s rsync session, either way: at most the credit the receiver
    /// granted ([`RSYNC_WINDOW`] at the start).
    MoveRsyncData {
        mid: u64,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The receiver of rsync data passed `bytes` more on to its rsync.
    MoveRsyncCredit {
        mid: u64,
        bytes: u32,
    },
    /// The sender's direction of the session ended (`why` None: its rsync closed its output),
    /// or the session failed (`why`: the reason; the receiver stops its rsync).
    MoveRsyncEnd {
        mid: u64,
        why: Option<String>,
    },
}

/// Bytes one direction of a move's rsync session may have in flight.
pub const RSYNC_WINDOW: u32 = 1024 * 1024;

/// Largest image chunk a sender puts in one message (the receiver refuses a compressed
/// block that claims more).
pub const MAX_IMAGE_CHUNK: usize = 1 << 20;

/// Bytes a stream direction may have in flight (sent, not yet written to the program).
/// Bounds the agent memory per stream and lets one slow reader stall only its own stream.
pub const STREAM_WINDOW: u32 = 1024 * 1024;
/// Largest payload of one `StreamData`.
pub const STREAM_CHUNK: usize = 256 * 1024;

/// postcard's unsigned varint, for the fast paths below (they write and read postcard's exact
/// encoding without building the message).
mod varint {
    pub(super) fn put(mut v: u64, out: &mut [u8], at: &mut usize) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out[*at] = byte;
                *at += 1;
                return;
            }
            out[*at] = byte | 0x80;
            *at += 1;
        }
    }

    pub(super) fn take(b: &[u8], at: &mut usize) -> Option<u64> {
        let mut v: u64 = 0;
        for shift in (0..70).step_by(7) {
            let byte = *b.get(*at)?;
            *at += 1;
            v |= ((byte & 0x7f) as u64).checked_shl(shift)?;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
}

/// The fast path for image bytes during a move (`MoveImage`), like [`stream_data`]: written as
/// a prefix and the payload straight from the sender's buffer, read back as an offset into the
/// received body. The bytes on the wire are exactly postcard's encoding (tested below).
pub mod move_image {
    use super::PeerMessage;
    use crate::frame::HEADER_LEN;

    /// Longest file name carried.
    pub const MAX_NAME: usize = 64;
    /// Longest prefix: frame header + variant + mid + name (length + bytes) + offset + length.
    pub const MAX_PREFIX: usize = HEADER_LEN + 2 + 10 + 1 + MAX_NAME + 10 + 10;

    fn variant() -> u8 {
        static VARIANT: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
        *VARIANT.get_or_init(|| {
            postcard::to_allocvec(&PeerMessage::MoveImage { mid: 0, file: String::new(), offset: 0, bytes: Vec::new() })
                .expect("encodes")[0]
        })
    }

    /// Frame header and message prefix for `len` payload bytes; None if `file` is too long.
    pub fn prefix(mid: u64, file: &str, offset: u64, len: usize, out: &mut [u8; MAX_PREFIX]) -> Option<usize> {
        if file.len() > MAX_NAME {
            return None;
        }
        let mut at = HEADER_LEN;
        out[at] = variant();
        at += 1;
        super::varint::put(mid, out, &mut at);
        super::varint::put(file.len() as u64, out, &mut at);
        out[at..at + file.len()].copy_from_slice(file.as_bytes());
        at += file.len();
        super::varint::put(offset, out, &mut at);
        super::varint::put(len as u64, out, &mut at);
        let body_len = (at - HEADER_LEN + len) as u32;
        out[..HEADER_LEN].copy_from_slice(&body_len.to_le_bytes());
        Some(at)
    }

    /// If `body` is a `MoveImage`: (mid, file, offset, where the payload starts).
    pub fn parse(body: &[u8]) -> Option<(u64, &str, u64, usize)> {
        if *body.first()? != variant() {
            return None;
        }
        let mut at = 1;
        let mid = super::varint::take(body, &mut at)?;
        let name_len = super::varint::take(body, &mut at)? as usize;
        let name = std::str::from_utf8(body.get(at..at.checked_add(name_len)?)?).ok()?;
        at += name_len;
        let offset = super::varint::take(body, &mut at)?;
        let len = super::varint::take(body, &mut at)?;
        (len == (body.len() - at) as u64).then_some((mid, name, offset, at))
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::frame::{encode, PEER_MAX_FRAME};

        #[test]
        fn fast_path_is_postcards_encoding() {
            for (mid, file, offset, len) in [
                (0u64, "pages.img", 0u64, 0usize),
                (1 << 48 | 7, "manifest.img", 300, 5),
                (u64::MAX, "x", u64::MAX, 1 << 20),
            ] {
                let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let msg = PeerMessage::MoveImage { mid, file: file.into(), offset, bytes: payload.clone() };
                let reference = encode(&msg, PEER_MAX_FRAME).unwrap();
                let mut p = [0u8; MAX_PREFIX];
                let n = prefix(mid, file, offset, len, &mut p).unwrap();
                let mut fast = p[..n].to_vec();
                fast.extend_from_slice(&payload);
                assert_eq!(fast, reference);
                assert_eq!(parse(&reference[HEADER_LEN..]), Some((mid, file, offset, n - HEADER_LEN)));
            }
        }

        #[test]
        fn lies_are_not_move_image() {
            let mut p = [0u8; MAX_PREFIX];
            let n = prefix(1, "pages.img", 0, 10, &mut p).unwrap();
            let mut short = p[HEADER_LEN..n].to_vec();
            short.extend_from_slice(&[0; 9]);
            assert_eq!(parse(&short), None);
            assert!(prefix(1, &"a".repeat(65), 0, 1, &mut p).is_none());
        }
    }
}

/// The fast path for the one message that carries bulk bytes: `StreamData` is
/// written as a small prefix followed by the payload straight from the
/// sender's buffer, and read back as an offset into the received body, so the
/// payload is never copied by encoding or decoding. The bytes on the wire are
/// exactly postcard's encoding of `PeerMessage::StreamData` (tested below).
pub mod stream_data {
    use super::PeerMessage;
    use crate::frame::HEADER_LEN;

    /// Longest prefix: frame header + variant + two u64 varints.
    pub const MAX_PREFIX: usize = HEADER_LEN + 1 + 10 + 10;

    fn variant() -> u8 {
        // postcard encodes the variant index first, as a varint (one byte below 128).
        static VARIANT: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
        *VARIANT.get_or_init(|| {
            postcard::to_allocvec(&PeerMessage::StreamData { stream: 0, bytes: Vec::new() }).expect("encodes")[0]
        })
    }

    /// Writes the frame header and message prefix for `len` payload bytes of `stream`
    /// into `out`; returns the prefix length. Frame = prefix ‖ payload.
    pub fn prefix(stream: u64, len: usize, out: &mut [u8; MAX_PREFIX]) -> usize {
        let mut at = HEADER_LEN;
        out[at] = variant();
        at += 1;
        super::varint::put(stream, out, &mut at);
        super::varint::put(len as u64, out, &mut at);
        let body_len = (at - HEADER_LEN + len) as u32;
        out[..HEADER_LEN].copy_from_slice(&body_len.to_le_bytes());
        at
    }

    /// If `body` (a frame body) is a `StreamData`, its stream id and where the payload starts.
    pub fn parse(body: &[u8]) -> Option<(u64, usize)> {
        if *body.first()? != variant() {
            return None;
        }
        let mut at = 1;
        let stream = super::varint::take(body, &mut at)?;
        let len = super::varint::take(body, &mut at)?;
        (len == (body.len() - at) as u64).then_some((stream, at))
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::frame::{encode, PEER_MAX_FRAME};

        #[test]
        fn fast_path_is_postcards_encoding() {
            for (stream, len) in [(0u64, 0usize), (1, 5), (300, 127), (u64::MAX, 128), (7 << 48 | 9, 262_144)] {
                let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let reference =
                    encode(&PeerMessage::StreamData { stream, bytes: payload.clone() }, PEER_MAX_FRAME).unwrap();
                let mut p = [0u8; MAX_PREFIX];
                let n = prefix(stream, len, &mut p);
                let mut fast = p[..n].to_vec();
                fast.extend_from_slice(&payload);
                assert_eq!(fast, reference, "stream {stream} len {len}");
                assert_eq!(parse(&reference[HEADER_LEN..]), Some((stream, n - HEADER_LEN)));
            }
        }

        #[test]
        fn other_messages_and_lies_are_not_stream_data() {
            let ping = encode(&PeerMessage::Ping, PEER_MAX_FRAME).unwrap();
            assert_eq!(parse(&ping[HEADER_LEN..]), None);
            let mut p = [0u8; MAX_PREFIX];
            let n = prefix(3, 10, &mut p);
            let mut short = p[HEADER_LEN..n].to_vec();
            short.extend_from_slice(&[0; 9]); // one byte less than announced
            assert_eq!(parse(&short), None);
            assert_eq!(parse(&[]), None);
        }
    }
}
