//! The header the agent writes first on every connection it makes to a
//! program's virtual listener; the shim's `accept` consumes it. Fixed binary
//! layout so the shim decodes it without allocating:
//!
//! ```text
//!  0      4         8        10        12        16             24
//!  | DVK1 | peer ip | peer port | local port | local ip | stream id (LE) |
//! ```
//! Ports and addresses in network byte order.

use pidvirt::VirtualAddr;

pub const ACCEPT_HEADER_LEN: usize = 24;
const MAGIC: [u8; 4] = *b"DVK1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcceptHeader {
    /// The client's virtual address (what getpeername answers).
    pub peer: VirtualAddr,
    /// The endpoint's virtual address (what getsockname answers).
    pub local: VirtualAddr,
    pub stream: u64,
}

impl AcceptHeader {
    pub fn encode(&self) -> [u8; ACCEPT_HEADER_LEN] {
        let mut b = [0u8; ACCEPT_HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&self.peer.ip);
        b[8..10].copy_from_slice(&self.peer.port.to_be_bytes());
        b[10..12].copy_from_slice(&self.local.port.to_be_bytes());
        b[12..16].copy_from_slice(&self.local.ip);
        b[16..24].copy_from_slice(&self.stream.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; ACCEPT_HEADER_LEN]) -> Option<AcceptHeader> {
        if b[0..4] != MAGIC {
            return None;
        }
        let ip =
            |r: std::ops::Range<usize>| -> [u8; 4] { [b[r.start], b[r.start + 1], b[r.start + 2], b[r.start + 3]] };
        Some(AcceptHeader {
            peer: VirtualAddr { ip: ip(4..8), port: u16::from_be_bytes([b[8], b[9]]) },
            local: VirtualAddr { ip: ip(12..16), port: u16::from_be_bytes([b[10], b[11]]) },
            stream: u64::from_le_bytes([b[16], b[17], b[18], b[19], b[20], b[21], b[22], b[23]]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_magic() {
        let h = AcceptHeader {
            peer: VirtualAddr { ip: [127, 77, 1, 2], port: 40000 },
            local: VirtualAddr { ip: [127, 77, 3, 4], port: 6379 },
            stream: 0x0102_0304_0506_0708,
        };
        let mut b = h.encode();
        assert_eq!(AcceptHeader::decode(&b), Some(h));
        b[0] = b'X';
        assert_eq!(AcceptHeader::decode(&b), None);
    }
}
