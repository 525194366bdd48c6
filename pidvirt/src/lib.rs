//! Virtual identities of dvk: vPIDs, endpoints, nodes, and the routing-table
//! types every agent keeps (DESIGN §1, §3).
//!
//! A vPID is cluster-unique without coordination: the allocating node's id sits
//! in the high bits, a per-node counter in the low [`VPID_SEQ_BITS`] bits. Every
//! vPID is `>= VPID_BASE` (2^22), which is the kernel's hard ceiling for real PIDs
//! (`PID_MAX_LIMIT` on 64-bit), so a number passed to `kill()` can always be told
//! apart: below `VPID_BASE` it is a real PID, at or above it a vPID.

pub mod endpoint;
pub mod routing;

pub use endpoint::{EndpointEntry, EndpointKey, VirtualAddr};
pub use routing::{EndpointState, MigrationId, ProcessEntry, RoutingTable};

use serde::{Deserialize, Serialize};
use std::fmt;

/// Bits of a vPID that hold the per-node sequence number.
pub const VPID_SEQ_BITS: u32 = 22;
/// The smallest vPID; also one above the largest real PID Linux can hand out.
pub const VPID_BASE: i32 = 1 << VPID_SEQ_BITS;
/// Node ids are 1..=MAX_NODE_ID so that every vPID stays a positive `pid_t`.
pub const MAX_NODE_ID: u16 = 255;
const SEQ_MASK: u32 = (1 << VPID_SEQ_BITS) - 1;

/// A node's small numeric id (1..=255), fixed in the cluster config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub u16);

impl NodeId {
    pub fn is_valid(self) -> bool {
        self.0 >= 1 && self.0 <= MAX_NODE_ID
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A cluster-unique virtual PID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Vpid(pub i32);

impl Vpid {
    /// Builds the vPID for `seq` allocated at `node`; `None` if either is out of range.
    pub fn compose(node: NodeId, seq: u32) -> Option<Vpid> {
        if !node.is_valid() || seq == 0 || seq > SEQ_MASK {
            return None;
        }
        Some(Vpid(((node.0 as i32) << VPID_SEQ_BITS) | seq as i32))
    }

    /// Whether `pid` (as a program passes it to `kill`) names a vPID rather than a real PID.
    pub fn is_virtual(pid: i32) -> bool {
        pid >= VPID_BASE
    }

    /// The node that allocated this vPID (not necessarily where it runs now).
    pub fn allocated_by(self) -> NodeId {
        NodeId((self.0 as u32 >> VPID_SEQ_BITS) as u16)
    }

    pub fn seq(self) -> u32 {
        self.0 as u32 & SEQ_MASK
    }
}

impl fmt::Display for Vpid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Hands out vPIDs for one node. Allocation is local: no other node is asked,
/// since the node id in the high bits already makes the number unique.
///
/// `reserved_until` supports persistence: an agent records a high-water mark on
/// disk before using numbers below it, so a restarted agent never reuses a vPID
/// that a still-running process may hold.
#[derive(Debug)]
pub struct VpidAllocator {
    node: NodeId,
    next_seq: u32,
}

#[derive(Debug, PartialEq, Eq)]
pub struct VpidSpaceExhausted;

impl VpidAllocator {
    /// Starts allocating at `first_seq` (1 for a fresh node).
    pub fn new(node: NodeId, first_seq: u32) -> Self {
        VpidAllocator { node, next_seq: first_seq.max(1) }
    }

    /// The sequence number the next allocation will use.
    pub fn next_seq(&self) -> u32 {
        self.next_seq
    }

    pub fn allocate(&mut self) -> Result<Vpid, VpidSpaceExhausted> {
        let vpid = Vpid::compose(self.node, self.next_seq).ok_or(VpidSpaceExhausted)?;
        self.next_seq += 1;
        Ok(vpid)
    }
}

/// The name of a DC (isolation domain), e.g. `dc0`.
pub type DcName = String;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vpids_of_different_nodes_never_collide_and_are_above_real_pids() {
        let mut a = VpidAllocator::new(NodeId(1), 1);
        let mut b = VpidAllocator::new(NodeId(2), 1);
        let va: Vec<_> = (0..1000).map(|_| a.allocate().unwrap()).collect();
        let vb: Vec<_> = (0..1000).map(|_| b.allocate().unwrap()).collect();
        for v in va.iter().chain(&vb) {
            assert!(Vpid::is_virtual(v.0), "{v} must be >= VPID_BASE");
        }
        assert!(va.iter().all(|v| !vb.contains(v)));
        assert_eq!(va[0].allocated_by(), NodeId(1));
        assert_eq!(vb[999].allocated_by(), NodeId(2));
        assert_eq!(vb[999].seq(), 1000);
    }

    #[test]
    fn largest_vpid_is_a_positive_pid_t() {
        let v = Vpid::compose(NodeId(MAX_NODE_ID), SEQ_MASK).unwrap();
        assert!(v.0 > 0);
        assert_eq!(v.allocated_by(), NodeId(MAX_NODE_ID));
    }

    #[test]
    fn invalid_nodes_and_sequences_are_rejected() {
        assert_eq!(Vpid::compose(NodeId(0), 1), None);
        assert_eq!(Vpid::compose(NodeId(256), 1), None);
        assert_eq!(Vpid::compose(NodeId(1), 0), None);
        assert_eq!(Vpid::compose(NodeId(1), SEQ_MASK + 1), None);
        let mut full = VpidAllocator::new(NodeId(3), SEQ_MASK);
        assert!(full.allocate().is_ok());
        assert_eq!(full.allocate(), Err(VpidSpaceExhausted));
    }

    #[test]
    fn real_pids_are_not_virtual() {
        assert!(!Vpid::is_virtual(1));
        assert!(!Vpid::is_virtual(4_194_303)); // PID_MAX_LIMIT - 1
        assert!(!Vpid::is_virtual(-1));
    }
}
