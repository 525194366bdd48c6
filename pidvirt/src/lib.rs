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
use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

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
/// A vPID comes back when the process that held it is gone from the whole cluster: the
/// agent calls [`VpidAllocator::free`] when a process of this node's range exits (here, or on
/// the node it moved to, which announces it), or when a reservation for a child expires
/// unclaimed. A freed vPID waits [`VpidAllocator::QUARANTINE`] before it is handed out again,
/// so a `kill` or a message that still names the dead process cannot reach a new one. Every
/// step is O(1): the counter, or the oldest freed number once its quarantine is over.
///
/// When the counter has reached the end of the range and nothing freed is ready, the
/// allocator may *wrap*: it looks (a bounded number of steps per call) for a number below the
/// counter that `in_use` says nobody holds. That recovers numbers whose end it never saw
/// (an agent restart forgets the freed list; a process that exited on a node unreachable at
/// the time); the caller allows it only when its view of the cluster is complete.
#[derive(Debug)]
pub struct VpidAllocator {
    node: NodeId,
    next_seq: u32,
    /// The last sequence number of the range (SEQ_MASK but in tests).
    last_seq: u32,
    /// Freed numbers, oldest first, with when they were freed.
    freed: VecDeque<(u32, Instant)>,
    quarantined: HashSet<u32>,
    /// Where the next wrap-around search starts.
    wrap_at: u32,
    /// [`VpidAllocator::QUARANTINE`] but in tests.
    quarantine: Duration,
}

#[derive(Debug, PartialEq, Eq)]
pub struct VpidSpaceExhausted;

impl VpidAllocator {
    /// How long a freed vPID is not handed out again.
    pub const QUARANTINE: Duration = Duration::from_secs(60);
    /// Numbers a wrap-around search looks at per allocation.
    pub const WRAP_STEPS: u32 = 4096;

    /// Starts allocating at `first_seq` (1 for a fresh node).
    pub fn new(node: NodeId, first_seq: u32) -> Self {
        Self::with_range(node, first_seq, SEQ_MASK)
    }

    /// Like [`VpidAllocator::new`], with a range of sequence numbers `1..=last_seq` (tests).
    pub fn with_range(node: NodeId, first_seq: u32, last_seq: u32) -> Self {
        VpidAllocator {
            node,
            next_seq: first_seq.max(1),
            last_seq: last_seq.min(SEQ_MASK),
            freed: VecDeque::new(),
            quarantined: HashSet::new(),
            wrap_at: 1,
            quarantine: Self::QUARANTINE,
        }
    }

    /// A shorter range and quarantine, for tests that must go round the range quickly.
    pub fn limit_for_tests(&mut self, last_seq: u32, quarantine: Duration) {
        self.last_seq = last_seq.min(SEQ_MASK);
        self.quarantine = quarantine;
    }

    /// The sequence number the next allocation from the counter will use.
    pub fn next_seq(&self) -> u32 {
        self.next_seq
    }

    /// A vPID from the counter only (no reuse).
    pub fn allocate(&mut self) -> Result<Vpid, VpidSpaceExhausted> {
        if self.next_seq > self.last_seq {
            return Err(VpidSpaceExhausted);
        }
        let vpid = Vpid::compose(self.node, self.next_seq).ok_or(VpidSpaceExhausted)?;
        self.next_seq += 1;
        Ok(vpid)
    }

    /// A vPID: the oldest freed one whose quarantine is over, else the counter's next, else
    /// (with `may_wrap`) one below the counter that is neither `in_use` nor quarantined.
    pub fn allocate_reusing(
        &mut self,
        now: Instant,
        in_use: impl Fn(Vpid) -> bool,
        may_wrap: bool,
    ) -> Result<Vpid, VpidSpaceExhausted> {
        while let Some(&(seq, at)) = self.freed.front() {
            if now.saturating_duration_since(at) < self.quarantine {
                break;
            }
            self.freed.pop_front();
            self.quarantined.remove(&seq);
            let vpid = Vpid::compose(self.node, seq).ok_or(VpidSpaceExhausted)?;
            // Held again (a wrap handed it out meanwhile): it is freed again when it ends.
            if !in_use(vpid) {
                return Ok(vpid);
            }
        }
        if let Ok(vpid) = self.allocate() {
            return Ok(vpid);
        }
        if !may_wrap {
            return Err(VpidSpaceExhausted);
        }
        let below = self.next_seq.min(self.last_seq + 1);
        for _ in 0..Self::WRAP_STEPS.min(below.saturating_sub(1)) {
            let seq = if self.wrap_at >= below { 1 } else { self.wrap_at };
            self.wrap_at = seq + 1;
            let vpid = Vpid::compose(self.node, seq).ok_or(VpidSpaceExhausted)?;
            if !self.quarantined.contains(&seq) && !in_use(vpid) {
                return Ok(vpid);
            }
        }
        Err(VpidSpaceExhausted)
    }

    /// `vpid` is held by nobody in the cluster any more; it is handed out again after the
    /// quarantine. Numbers of other nodes' ranges, or never handed out, are ignored.
    pub fn free(&mut self, vpid: Vpid, now: Instant) {
        let seq = vpid.seq();
        if vpid.allocated_by() != self.node || seq == 0 || seq >= self.next_seq || !self.quarantined.insert(seq) {
            return;
        }
        self.freed.push_back((seq, now));
    }

    /// Freed numbers still in quarantine or waiting to be handed out.
    pub fn freed_len(&self) -> usize {
        self.freed.len()
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

    /// Issue 9 item 9: reserve/free cycles far beyond the size of the range keep working, a
    /// freed number waits out its quarantine, and a number still held is never handed out.
    #[test]
    fn freed_vpids_come_back_after_quarantine_far_beyond_the_range() {
        let node = NodeId(7);
        let mut a = VpidAllocator::with_range(node, 1, 16);
        let t0 = Instant::now();
        let nobody_holds = |_: Vpid| false;
        let first: Vec<Vpid> = (0..16).map(|_| a.allocate_reusing(t0, nobody_holds, false).unwrap()).collect();
        assert_eq!(a.allocate_reusing(t0, nobody_holds, false), Err(VpidSpaceExhausted), "range used up");
        let mut held: std::collections::BTreeSet<Vpid> = first.into_iter().collect();
        let mut now = t0;
        for cycle in 0..1000 {
            // Free one, wait out the quarantine, take one: 1000 cycles of a 16-number range.
            let gone = *held.iter().nth(cycle % held.len()).unwrap();
            held.remove(&gone);
            a.free(gone, now);
            let soon = a.allocate_reusing(now + Duration::from_secs(1), |v| held.contains(&v), false);
            assert_eq!(soon, Err(VpidSpaceExhausted), "a freed vPID came back before its quarantine");
            now += VpidAllocator::QUARANTINE;
            let v = a.allocate_reusing(now, |v| held.contains(&v), false).unwrap();
            assert_eq!(v, gone);
            assert!(held.insert(v), "{v} handed out twice");
        }
        assert_eq!(a.freed_len(), 0);
        // Other nodes' numbers and numbers never handed out are not taken back.
        a.free(Vpid::compose(NodeId(8), 3).unwrap(), now);
        let mut fresh = VpidAllocator::with_range(node, 1, 16);
        fresh.free(Vpid::compose(node, 5).unwrap(), now);
        assert_eq!(a.freed_len() + fresh.freed_len(), 0);
    }

    /// After a restart the freed list is gone; with the cluster's view complete the allocator
    /// wraps around to numbers nobody holds (never to held or quarantined ones).
    #[test]
    fn a_full_range_wraps_to_numbers_nobody_holds() {
        let node = NodeId(2);
        let mut a = VpidAllocator::with_range(node, 17, 16); // restarted past the end
        let now = Instant::now();
        let held = |v: Vpid| !v.seq().is_multiple_of(4); // only 4, 8, 12, 16 are free
        assert_eq!(a.allocate_reusing(now, held, false), Err(VpidSpaceExhausted));
        a.free(Vpid::compose(node, 8).unwrap(), now);
        let got: Vec<u32> = (0..3).map(|_| a.allocate_reusing(now, held, true).unwrap().seq()).collect();
        assert_eq!(got, vec![4, 12, 16], "8 is in quarantine");
        let everything_held = |_: Vpid| true;
        assert_eq!(a.allocate_reusing(now, everything_held, true), Err(VpidSpaceExhausted));
    }

    #[test]
    fn real_pids_are_not_virtual() {
        assert!(!Vpid::is_virtual(1));
        assert!(!Vpid::is_virtual(4_194_303)); // PID_MAX_LIMIT - 1
        assert!(!Vpid::is_virtual(-1));
    }
}
