//! The routing table every agent keeps, and the endpoint state machine of
//! DESIGN §3 (after the DVS paper's PROC_RUNNING / remote / migrating states).
//!
//! ```text
//!                 register here                 register elsewhere
//!   (unknown) ───────────────▶ Local      (unknown) ──────────────▶ Remote(n)
//!                                │  ▲                                 │  ▲
//!                  start(m)      │  │ rollback(m)          start(m)   │  │ rollback(m)
//!                                ▼  │                                 ▼  │
//!                      Migrating{previous, m} ───commit(m, dest)───▶ Local   if dest == this node
//!                                                                    Remote(dest) otherwise
//! ```
//! While an entry is `Migrating`, nothing is delivered to or from it; the
//! agent queues. Every transition names the migration id, so a late or
//! duplicated commit/rollback of another migration is refused, never applied.

use crate::endpoint::{vip_candidates, EndpointEntry, EndpointKey};
use crate::{DcName, NodeId, Vpid};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Identifies one migration attempt; also the routing epoch it produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MigrationId(pub u64);

/// Where, from this node's point of view, a process/endpoint lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndpointState {
    /// Runs on this node.
    Local,
    /// Runs on another node; traffic is relayed there.
    Remote(NodeId),
    /// A passive replica is kept on that node (reserved, not used yet).
    Backup(NodeId),
    /// A move is under way: nothing is delivered, arriving messages queue.
    Migrating { previous: Box<EndpointState>, migration: MigrationId },
}

impl EndpointState {
    /// Short name for tables: `local`, `remote`, `backup`, `migrating`.
    pub fn label(&self) -> &'static str {
        match self {
            EndpointState::Local => "local",
            EndpointState::Remote(_) => "remote",
            EndpointState::Backup(_) => "backup",
            EndpointState::Migrating { .. } => "migrating",
        }
    }
}

/// One registered process as the whole cluster sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessEntry {
    pub vpid: Vpid,
    /// The node it runs on now.
    pub node: NodeId,
    /// Its real PID on that node.
    pub real_pid: i32,
    /// Owner (real uid), as the kernel reported it through SO_PEERCRED.
    pub uid: u32,
    pub dc: DcName,
    pub endpoint: String,
    /// Command line, NUL separators turned into spaces.
    pub command: String,
    /// vPID of its parent, when the parent is in the cluster.
    pub parent: Option<Vpid>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub entry: ProcessEntry,
    pub state: EndpointState,
}

#[derive(Debug, PartialEq, Eq)]
pub enum TransitionError {
    Unknown(Vpid),
    AlreadyMigrating { vpid: Vpid, migration: MigrationId },
    NotMigrating(Vpid),
    WrongMigration { vpid: Vpid, expected: MigrationId, got: MigrationId },
}

impl std::fmt::Display for TransitionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TransitionError::Unknown(v) => write!(f, "vPID {v} is not in the routing table"),
            TransitionError::AlreadyMigrating { vpid, migration } => {
                write!(f, "vPID {vpid} is already migrating (migration {})", migration.0)
            }
            TransitionError::NotMigrating(v) => write!(f, "vPID {v} is not migrating"),
            TransitionError::WrongMigration { vpid, expected, got } => {
                write!(f, "vPID {vpid} is in migration {} but the request names migration {}", expected.0, got.0)
            }
        }
    }
}

impl std::error::Error for TransitionError {}

/// The routing table of one node.
#[derive(Debug)]
pub struct RoutingTable {
    this_node: NodeId,
    routes: BTreeMap<Vpid, Route>,
    /// The vPIDs of the processes of this node by real pid: `find_local_by_pid` in O(1) (it is
    /// on the path of every fork). Kept by every method that adds, removes or moves a route.
    local_pids: HashMap<i32, BTreeSet<Vpid>>,
    /// Endpoints follow their process: its route's state is theirs.
    endpoints: BTreeMap<EndpointKey, EndpointEntry>,
}

impl RoutingTable {
    pub fn new(this_node: NodeId) -> Self {
        RoutingTable { this_node, routes: BTreeMap::new(), local_pids: HashMap::new(), endpoints: BTreeMap::new() }
    }

    fn index(&mut self, entry: &ProcessEntry, add: bool) {
        if entry.node != self.this_node {
            return;
        }
        if add {
            self.local_pids.entry(entry.real_pid).or_default().insert(entry.vpid);
        } else if let Some(set) = self.local_pids.get_mut(&entry.real_pid) {
            set.remove(&entry.vpid);
            if set.is_empty() {
                self.local_pids.remove(&entry.real_pid);
            }
        }
    }

    pub fn this_node(&self) -> NodeId {
        self.this_node
    }

    fn state_for(&self, node: NodeId) -> EndpointState {
        if node == self.this_node {
            EndpointState::Local
        } else {
            EndpointState::Remote(node)
        }
    }

    /// Adds or replaces the entry for `entry.vpid`; the state follows from where it runs.
    /// A process announced on another node takes its endpoints along in the same step: a
    /// moved process is announced before its endpoints, and an open decided in between must not
    /// see the process settled but its endpoints still on the node it left.
    pub fn upsert(&mut self, entry: ProcessEntry) {
        let state = self.state_for(entry.node);
        let (vpid, node) = (entry.vpid, entry.node);
        self.index(&entry, true);
        if let Some(old) = self.routes.insert(vpid, Route { entry, state }) {
            let new = &self.routes[&vpid].entry;
            if (old.entry.node, old.entry.real_pid) != (new.node, new.real_pid) {
                self.index(&old.entry, false);
            }
            if old.entry.node != node {
                for e in self.endpoints.values_mut().filter(|e| e.vpid == vpid) {
                    e.node = node;
                }
            }
        }
    }

    /// Removes a process and every endpoint it listened on.
    pub fn remove(&mut self, vpid: Vpid) -> Option<Route> {
        self.endpoints.retain(|_, e| e.vpid != vpid);
        let route = self.routes.remove(&vpid);
        if let Some(r) = &route {
            self.index(&r.entry, false);
        }
        route
    }

    /// Drops every entry that runs on `node` (its link went down; it re-announces on reconnect).
    pub fn remove_node(&mut self, node: NodeId) -> Vec<Vpid> {
        let gone: Vec<Vpid> = self.routes.values().filter(|r| r.entry.node == node).map(|r| r.entry.vpid).collect();
        for v in &gone {
            if let Some(r) = self.routes.remove(v) {
                self.index(&r.entry, false);
            }
        }
        self.endpoints.retain(|_, e| e.node != node);
        gone
    }

    /// Adds or replaces an endpoint. Its process must be known (else it is ignored
    /// and false is returned): an endpoint without a process cannot be routed.
    pub fn upsert_endpoint(&mut self, entry: EndpointEntry) -> bool {
        if !self.routes.contains_key(&entry.vpid) {
            return false;
        }
        self.endpoints.insert(entry.key(), entry);
        true
    }

    pub fn remove_endpoint(&mut self, key: &EndpointKey) -> Option<EndpointEntry> {
        self.endpoints.remove(key)
    }

    pub fn endpoint(&self, key: &EndpointKey) -> Option<&EndpointEntry> {
        self.endpoints.get(key)
    }

    pub fn endpoints(&self) -> impl Iterator<Item = &EndpointEntry> {
        self.endpoints.values()
    }

    pub fn local_endpoints(&self) -> impl Iterator<Item = &EndpointEntry> {
        let me = self.this_node;
        self.endpoints.values().filter(move |e| e.node == me)
    }

    /// The endpoint a program reaches by connecting to `vip:port` from DC `dc`.
    pub fn endpoint_by_vip(&self, dc: &str, vip: [u8; 4], port: u16) -> Option<&EndpointEntry> {
        self.endpoints.values().find(|e| e.dc == dc && e.vip == vip && e.port == port)
    }

    /// The VIP of endpoint name `name` in `dc`, if any endpoint of that name exists.
    /// Names are matched without regard to ASCII case, as host names are.
    pub fn vip_of(&self, dc: &str, name: &str) -> Option<[u8; 4]> {
        self.endpoints
            .values()
            .find(|e| e.dc.eq_ignore_ascii_case(dc) && e.name.eq_ignore_ascii_case(name))
            .map(|e| e.vip)
    }

    /// The VIP a new endpoint named `name` gets: the name's existing VIP, else the first
    /// candidate no other name of the DC uses.
    pub fn choose_vip(&self, dc: &str, name: &str) -> [u8; 4] {
        if let Some(vip) = self.vip_of(dc, name) {
            return vip;
        }
        vip_candidates(dc, name)
            .find(|vip| !self.endpoints.values().any(|e| e.dc == dc && e.vip == *vip))
            .expect("fewer than 65534 endpoint names in a DC")
    }

    pub fn get(&self, vpid: Vpid) -> Option<&Route> {
        self.routes.get(&vpid)
    }

    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.routes.values()
    }

    pub fn local_entries(&self) -> impl Iterator<Item = &ProcessEntry> {
        let me = self.this_node;
        self.routes.values().map(|r| &r.entry).filter(move |e| e.node == me)
    }

    pub fn count_on(&self, node: NodeId) -> usize {
        self.routes.values().filter(|r| r.entry.node == node).count()
    }

    pub fn find_local_by_pid(&self, real_pid: i32) -> Option<&ProcessEntry> {
        let vpids = self.local_pids.get(&real_pid)?;
        vpids.iter().filter_map(|v| self.routes.get(v)).map(|r| &r.entry).find(|e| e.node == self.this_node)
    }

    /// start: stop delivering to/from `vpid` and queue.
    pub fn start_migration(&mut self, vpid: Vpid, migration: MigrationId) -> Result<(), TransitionError> {
        let route = self.routes.get_mut(&vpid).ok_or(TransitionError::Unknown(vpid))?;
        if let EndpointState::Migrating { migration: m, .. } = route.state {
            return Err(TransitionError::AlreadyMigrating { vpid, migration: m });
        }
        let previous = Box::new(route.state.clone());
        route.state = EndpointState::Migrating { previous, migration };
        Ok(())
    }

    fn finish(&mut self, vpid: Vpid, migration: MigrationId) -> Result<&mut Route, TransitionError> {
        let route = self.routes.get_mut(&vpid).ok_or(TransitionError::Unknown(vpid))?;
        match &route.state {
            EndpointState::Migrating { migration: m, .. } if *m == migration => Ok(route),
            EndpointState::Migrating { migration: m, .. } => {
                Err(TransitionError::WrongMigration { vpid, expected: *m, got: migration })
            }
            _ => Err(TransitionError::NotMigrating(vpid)),
        }
    }

    /// commit: the process now runs on `destination` with real PID `real_pid`.
    pub fn commit_migration(
        &mut self,
        vpid: Vpid,
        migration: MigrationId,
        destination: NodeId,
        real_pid: i32,
    ) -> Result<(), TransitionError> {
        let state = self.state_for(destination);
        let route = self.finish(vpid, migration)?;
        let before = route.entry.clone();
        route.state = state;
        route.entry.node = destination;
        route.entry.real_pid = real_pid;
        let after = route.entry.clone();
        self.index(&before, false);
        self.index(&after, true);
        for e in self.endpoints.values_mut().filter(|e| e.vpid == vpid) {
            e.node = destination;
        }
        Ok(())
    }

    /// rollback: back to the state before `start`.
    pub fn rollback_migration(&mut self, vpid: Vpid, migration: MigrationId) -> Result<(), TransitionError> {
        let route = self.finish(vpid, migration)?;
        if let EndpointState::Migrating { previous, .. } = &route.state {
            route.state = (**previous).clone();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(vpid: i32, node: u16) -> ProcessEntry {
        ProcessEntry {
            vpid: Vpid(vpid),
            node: NodeId(node),
            real_pid: 100,
            uid: 0,
            dc: "dc0".into(),
            endpoint: "srv".into(),
            command: "srv".into(),
            parent: None,
        }
    }

    const VPID_A: i32 = 1 << 22 | 1;

    /// The destination announces a moved process before its endpoints; from the first
    /// announcement on, its endpoints are routed to the destination (an open decided between the
    /// two went to the node the process had left, which refused it).
    #[test]
    fn a_process_announced_elsewhere_takes_its_endpoints_along() {
        let mut t = RoutingTable::new(NodeId(3));
        t.upsert(entry(VPID_A, 1));
        let ep = EndpointEntry {
            vpid: Vpid(VPID_A),
            node: NodeId(1),
            dc: "dc0".into(),
            name: "srv".into(),
            port: 80,
            vip: [127, 77, 0, 1],
        };
        assert!(t.upsert_endpoint(ep.clone()));
        t.start_migration(Vpid(VPID_A), MigrationId(7)).unwrap();
        t.upsert(entry(VPID_A, 2)); // ProcessUp from the destination, before its EndpointUp
        assert_eq!(t.endpoint(&ep.key()).unwrap().node, NodeId(2));
        assert!(matches!(t.get(Vpid(VPID_A)).unwrap().state, EndpointState::Remote(NodeId(2))));
        // The same node re-announcing leaves the endpoints alone.
        t.upsert(ProcessEntry { real_pid: 5, ..entry(VPID_A, 2) });
        assert_eq!(t.endpoint(&ep.key()).unwrap().node, NodeId(2));
    }

    /// The pid index follows every change of a route (ReserveVpid finds its caller through it).
    #[test]
    fn local_processes_are_found_by_pid_through_every_change() {
        let mut t = RoutingTable::new(NodeId(1));
        let mut a = entry(VPID_A, 1);
        a.real_pid = 500;
        t.upsert(a.clone());
        t.upsert(ProcessEntry { real_pid: 500, ..entry(VPID_A + 1, 2) }); // remote: not indexed
        assert_eq!(t.find_local_by_pid(500).map(|e| e.vpid), Some(Vpid(VPID_A)));
        t.upsert(ProcessEntry { real_pid: 501, ..a.clone() }); // re-registered under another pid
        assert!(t.find_local_by_pid(500).is_none());
        assert_eq!(t.find_local_by_pid(501).map(|e| e.vpid), Some(Vpid(VPID_A)));
        t.start_migration(Vpid(VPID_A), MigrationId(1)).unwrap();
        t.commit_migration(Vpid(VPID_A), MigrationId(1), NodeId(2), 700).unwrap();
        assert!(t.find_local_by_pid(501).is_none(), "moved away");
        let mut b = entry(VPID_A + 2, 2);
        b.real_pid = 900;
        t.upsert(b);
        t.start_migration(Vpid(VPID_A + 2), MigrationId(2)).unwrap();
        t.commit_migration(Vpid(VPID_A + 2), MigrationId(2), NodeId(1), 901).unwrap();
        assert_eq!(t.find_local_by_pid(901).map(|e| e.vpid), Some(Vpid(VPID_A + 2)), "moved here");
        t.remove(Vpid(VPID_A + 2));
        assert!(t.find_local_by_pid(901).is_none());
        t.upsert(ProcessEntry { real_pid: 42, ..entry(VPID_A + 3, 1) });
        t.remove_node(NodeId(1));
        assert!(t.find_local_by_pid(42).is_none());
    }

    #[test]
    fn state_follows_location() {
        let mut t = RoutingTable::new(NodeId(1));
        t.upsert(entry(1 << 22 | 1, 1));
        t.upsert(entry(2 << 22 | 1, 2));
        assert_eq!(t.get(Vpid(1 << 22 | 1)).unwrap().state, EndpointState::Local);
        assert_eq!(t.get(Vpid(2 << 22 | 1)).unwrap().state, EndpointState::Remote(NodeId(2)));
        assert_eq!(t.count_on(NodeId(2)), 1);
        assert_eq!(t.remove_node(NodeId(2)), vec![Vpid(2 << 22 | 1)]);
        assert_eq!(t.count_on(NodeId(2)), 0);
    }

    #[test]
    fn migration_start_commit_moves_the_route() {
        let mut t = RoutingTable::new(NodeId(1));
        let v = Vpid(1 << 22 | 7);
        t.upsert(entry(v.0, 1));
        t.start_migration(v, MigrationId(9)).unwrap();
        assert_eq!(t.get(v).unwrap().state.label(), "migrating");
        assert_eq!(
            t.start_migration(v, MigrationId(10)),
            Err(TransitionError::AlreadyMigrating { vpid: v, migration: MigrationId(9) })
        );
        assert_eq!(
            t.commit_migration(v, MigrationId(8), NodeId(2), 55),
            Err(TransitionError::WrongMigration { vpid: v, expected: MigrationId(9), got: MigrationId(8) })
        );
        t.commit_migration(v, MigrationId(9), NodeId(2), 55).unwrap();
        let r = t.get(v).unwrap();
        assert_eq!(r.state, EndpointState::Remote(NodeId(2)));
        assert_eq!((r.entry.node, r.entry.real_pid), (NodeId(2), 55));
        assert_eq!(t.commit_migration(v, MigrationId(9), NodeId(2), 55), Err(TransitionError::NotMigrating(v)));
    }

    fn endpoint(name: &str, port: u16, vpid: i32, node: u16, t: &RoutingTable) -> EndpointEntry {
        EndpointEntry {
            dc: "dc0".into(),
            name: name.into(),
            port,
            vip: t.choose_vip("dc0", name),
            vpid: Vpid(vpid),
            node: NodeId(node),
        }
    }

    #[test]
    fn endpoints_follow_their_process() {
        let mut t = RoutingTable::new(NodeId(1));
        let v = Vpid(2 << 22 | 1);
        let orphan = endpoint("web", 80, v.0, 2, &t);
        assert!(!t.upsert_endpoint(orphan), "no process, no endpoint");
        t.upsert(entry(v.0, 2));
        let web80 = endpoint("web", 80, v.0, 2, &t);
        assert!(t.upsert_endpoint(web80.clone()));
        let web81 = endpoint("web", 81, v.0, 2, &t);
        assert_eq!(web81.vip, web80.vip, "one VIP per name");
        assert_eq!(t.vip_of("DC0", "WEB"), Some(web80.vip), "host names are case-insensitive");
        t.upsert_endpoint(web81);
        assert_eq!(t.endpoint_by_vip("dc0", web80.vip, 81).unwrap().port, 81);
        assert!(t.endpoint_by_vip("dc1", web80.vip, 80).is_none(), "DCs are isolated");
        assert_ne!(t.choose_vip("dc0", "db"), web80.vip);
        t.start_migration(v, MigrationId(1)).unwrap();
        t.commit_migration(v, MigrationId(1), NodeId(3), 9).unwrap();
        assert!(t.endpoints().all(|e| e.node == NodeId(3)));
        t.remove(v);
        assert_eq!(t.endpoints().count(), 0);
    }

    #[test]
    fn vip_collisions_are_probed_past() {
        let mut t = RoutingTable::new(NodeId(1));
        t.upsert(entry(1 << 22 | 1, 1));
        // Occupy "b"'s first candidate with name "a".
        let taken = crate::endpoint::vip_candidates("dc0", "b").next().unwrap();
        t.upsert_endpoint(EndpointEntry {
            dc: "dc0".into(),
            name: "a".into(),
            port: 1,
            vip: taken,
            vpid: Vpid(1 << 22 | 1),
            node: NodeId(1),
        });
        assert_ne!(t.choose_vip("dc0", "b"), taken);
    }

    #[test]
    fn rollback_restores_previous_state() {
        let mut t = RoutingTable::new(NodeId(3));
        let v = Vpid(1 << 22 | 1);
        t.upsert(entry(v.0, 1));
        t.start_migration(v, MigrationId(1)).unwrap();
        t.rollback_migration(v, MigrationId(1)).unwrap();
        assert_eq!(t.get(v).unwrap().state, EndpointState::Remote(NodeId(1)));
        assert_eq!(
            t.rollback_migration(Vpid(5 << 22 | 1), MigrationId(1)),
            Err(TransitionError::Unknown(Vpid(5 << 22 | 1)))
        );
    }
}
