//! The agent's shared state: routing table, vPID store, peer links, and the
//! operations the local socket and the peer links both use.

use crate::relay::RemoteStream;
use crate::vpid_store::VpidStore;
use dvk_config::{Config, NodeConfig};
use dvk_protocol::auth::ClusterKey;
use dvk_protocol::local::{NodeStatus, ProcessRow};
use dvk_protocol::peer::PeerMessage;
use parking_lot::Mutex;
use pidvirt::{EndpointEntry, EndpointKey, NodeId, ProcessEntry, RoutingTable, Vpid};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// How long a signal relayed to another node may take before the caller gets EHOSTUNREACH.
pub const RELAY_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Agent {
    pub config: Config,
    pub me: NodeConfig,
    pub key: ClusterKey,
    pub tables: Mutex<Tables>,
    /// Streams whose other end is on another node, by stream id.
    pub streams: Mutex<HashMap<u64, RemoteStream>>,
    /// Signals the registry saver that this node's processes or endpoints changed.
    pub registry_changed: tokio::sync::Notify,
    /// Every relay this agent runs (for a move to detach).
    pub relays: crate::relay::Relays,
    /// Stream opens under way (a move's start waits for them).
    pub opens: Arc<OpenGate>,
    /// Moves this agent coordinates or takes part in.
    pub moves: crate::moving::Moves,
    /// Where moves stage images: a private directory on tmpfs (/dev/shm) when there is one,
    /// else the node's image dir. Page data must not go through a disk on the way.
    pub staging: PathBuf,
    /// A failure the tests ask for (`DVK_TEST_FAULT`), to prove each step rolls back.
    pub fault: Option<crate::moving::Fault>,
    /// When this agent started (a vPID wrap-around waits a quarantine after it).
    pub started: Instant,
    next_request: AtomicU64,
    next_link: AtomicU64,
    next_stream: AtomicU64,
    next_client_port: AtomicU32,
}

pub struct Tables {
    pub routing: RoutingTable,
    pub vpids: VpidStore,
    pub links: HashMap<NodeId, PeerLink>,
    /// Last frame seen from each node, kept after its link drops (for `nodes`).
    pub last_contact: HashMap<NodeId, Instant>,
    pending_signals: HashMap<u64, oneshot::Sender<i32>>,
    /// AF_UNIX listeners of the endpoints that listen on this node (opened, never followed by path).
    pub listeners: HashMap<EndpointKey, Vec<crate::listener::ListenerFile>>,
    /// vPIDs reserved by a parent for the child it is forking: vPID -> (parent pid, when).
    pub reservations: HashMap<Vpid, (i32, Instant)>,
    /// The reservations in the order they were made (to expire them in O(1)); an entry whose
    /// reservation was claimed meanwhile is skipped.
    pub reservation_order: std::collections::VecDeque<(Vpid, Instant)>,
    /// Per uid: outstanding reservations and the rate budget (see local::reserve_vpid).
    pub reserve_budgets: HashMap<u32, crate::local::ReserveBudget>,
    /// Which uid made each outstanding reservation.
    pub reserved_by: HashMap<Vpid, u32>,
    /// Start time (clock ticks since boot) of each local process: with the pid, its identity.
    pub start_times: HashMap<Vpid, u64>,
    /// Inode of the agent's end of each local process's registration link (its fd ≥ 900).
    pub link_inodes: HashMap<Vpid, u64>,
}

/// Counts stream opens that decided where to go but have not reached the listener (or put
/// their StreamOpen on the link) yet.
#[derive(Default)]
pub struct OpenGate {
    under_way: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

pub struct OpenGuard(Arc<OpenGate>);

impl OpenGate {
    pub fn enter(self: &Arc<Self>) -> OpenGuard {
        self.under_way.fetch_add(1, Ordering::AcqRel);
        OpenGuard(self.clone())
    }

    /// Waits until no open is under way (new ones see the Migrating state and wait).
    pub async fn quiesce(&self) {
        loop {
            let idle = self.idle.notified();
            if self.under_way.load(Ordering::Acquire) == 0 {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(5), idle).await;
        }
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if self.0.under_way.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// An authenticated link to a peer.
pub struct PeerLink {
    pub id: u64,
    pub handle: LinkHandle,
}

/// The write side of a peer link, shared by everything that sends on it.
pub type LinkWriter = tokio::io::BufWriter<tokio::net::tcp::OwnedWriteHalf>;

/// How to send on a link: queue a message for the link's writer task (control
/// messages, batched), or write it at once under the writer's lock (stream traffic:
/// one task hop less on the latency path, and ordered with the sender's own writes).
#[derive(Clone)]
pub struct LinkHandle {
    pub tx: mpsc::Sender<PeerMessage>,
    pub out: Arc<tokio::sync::Mutex<LinkWriter>>,
    /// Closes the link (its reader stops).
    pub cut: Arc<tokio::sync::Notify>,
}

impl LinkHandle {
    /// Writes `data` as `MoveImage` frames of at most `chunk` bytes straight from the caller's
    /// buffer (no copy into a message), under one hold of the writer.
    pub async fn write_image(
        &self,
        mid: u64,
        file: &str,
        offset: u64,
        data: &[u8],
        chunk: usize,
    ) -> Result<(), dvk_protocol::FrameError> {
        use dvk_protocol::peer::move_image;
        use tokio::io::AsyncWriteExt;
        let mut w = self.out.lock().await;
        let mut at = offset;
        // An empty file is one empty frame (the receiver still creates it).
        let pieces: Vec<&[u8]> = if data.is_empty() { vec![data] } else { data.chunks(chunk.max(1)).collect() };
        for piece in pieces {
            let mut prefix = [0u8; move_image::MAX_PREFIX];
            let n = move_image::prefix(mid, file, at, piece.len(), &mut prefix)
                .ok_or_else(|| dvk_protocol::FrameError::Io(std::io::Error::other("image file name too long")))?;
            w.write_all(&prefix[..n]).await?;
            w.write_all(piece).await?;
            at += piece.len() as u64;
        }
        w.flush().await?;
        Ok(())
    }

    pub async fn write_now(&self, msg: PeerMessage) -> Result<(), dvk_protocol::FrameError> {
        use tokio::io::AsyncWriteExt;
        let mut w = self.out.lock().await;
        crate::peer::write_any(&mut *w, msg).await?;
        w.flush().await?;
        Ok(())
    }
}

impl Agent {
    pub fn new(config: Config, me: NodeConfig, key: ClusterKey, vpids: VpidStore, staging: PathBuf) -> Self {
        let node = NodeId(me.id);
        Agent {
            config,
            me,
            key,
            tables: Mutex::new(Tables {
                routing: RoutingTable::new(node),
                vpids,
                links: HashMap::new(),
                last_contact: HashMap::new(),
                pending_signals: HashMap::new(),
                listeners: HashMap::new(),
                reservations: HashMap::new(),
                reservation_order: Default::default(),
                reserve_budgets: HashMap::new(),
                reserved_by: HashMap::new(),
                start_times: HashMap::new(),
                link_inodes: HashMap::new(),
            }),
            registry_changed: tokio::sync::Notify::new(),
            relays: Default::default(),
            opens: Arc::new(OpenGate::default()),
            moves: Default::default(),
            fault: crate::moving::Fault::from_env(),
            started: Instant::now(),
            staging,
            streams: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            next_link: AtomicU64::new(1),
            next_stream: AtomicU64::new(1),
            next_client_port: AtomicU32::new(0),
        }
    }

    pub fn node_id(&self) -> NodeId {
        NodeId(self.me.id)
    }

    pub fn node_name(&self, id: NodeId) -> String {
        self.config.node_by_id(id.0).map(|n| n.name.clone()).unwrap_or_else(|| format!("node#{id}"))
    }

    /// Installs a freshly authenticated link, replacing (and so closing) an older one
    /// to the same node. Returns the link id.
    pub fn link_up(&self, node: NodeId, handle: LinkHandle) -> u64 {
        let id = self.next_link.fetch_add(1, Ordering::Relaxed);
        let mut t = self.tables.lock();
        t.links.insert(node, PeerLink { id, handle });
        t.last_contact.insert(node, Instant::now());
        id
    }

    /// Forgets link `link_id` to `node` (if it is still the current one) and the processes
    /// known through it; they come back with the next `Announce`.
    pub fn link_down(&self, node: NodeId, link_id: u64) {
        let mut t = self.tables.lock();
        if t.links.get(&node).map(|l| l.id) == Some(link_id) {
            t.links.remove(&node);
            t.routing.remove_node(node);
            drop(t);
            self.reset_streams_of(node);
        }
    }

    /// Closes the link to `node` now (it reconnects as after any failure).
    pub fn cut_link(&self, node: NodeId) {
        if let Some(l) = self.tables.lock().links.get(&node) {
            l.handle.cut.notify_one();
        }
    }

    /// The link to `node`, for stream traffic.
    pub fn link(&self, node: NodeId) -> Option<LinkHandle> {
        self.tables.lock().links.get(&node).map(|l| l.handle.clone())
    }

    /// A cluster-unique stream id: this node's id above bit 48.
    pub fn new_stream_id(&self) -> u64 {
        ((self.me.id as u64) << 48) | self.next_stream.fetch_add(1, Ordering::Relaxed)
    }

    /// An ephemeral port for a client's virtual address (32768..=60999, like Linux's default range).
    pub fn client_port(&self) -> u16 {
        (32768 + self.next_client_port.fetch_add(1, Ordering::Relaxed) % (60999 - 32768 + 1)) as u16
    }

    pub fn remove_stream(&self, id: u64) {
        self.streams.lock().remove(&id);
    }

    fn reset_streams_of(&self, node: NodeId) {
        let mut streams = self.streams.lock();
        streams.retain(|_, s| {
            if s.peer == node {
                s.reset();
                false
            } else {
                true
            }
        });
    }

    pub fn touch(&self, node: NodeId) {
        self.tables.lock().last_contact.insert(node, Instant::now());
    }

    /// Queues `msg` for every peer. A peer whose queue is full is cut off: it will
    /// reconnect and resynchronise from a fresh `Announce`, so nothing is silently lost.
    pub fn broadcast(&self, msg: PeerMessage) {
        let mut t = self.tables.lock();
        let mut overflowing = Vec::new();
        for (node, link) in &t.links {
            if link.handle.tx.try_send(msg.clone()).is_err() {
                overflowing.push(*node);
            }
        }
        for node in overflowing {
            tracing::warn!(node = %node, "peer link queue full or closed; dropping the link to resynchronise");
            t.links.remove(&node);
            t.routing.remove_node(node);
        }
    }

    pub fn send_to(&self, node: NodeId, msg: PeerMessage) -> bool {
        let t = self.tables.lock();
        t.links.get(&node).map(|l| l.handle.tx.try_send(msg).is_ok()).unwrap_or(false)
    }

    /// The announcement of everything local, sent first on every new link.
    pub fn announcement(&self) -> PeerMessage {
        let t = self.tables.lock();
        PeerMessage::Announce {
            processes: t.routing.local_entries().cloned().collect(),
            endpoints: t.routing.local_endpoints().cloned().collect(),
        }
    }

    /// Applies a peer's complete list of processes and endpoints.
    pub fn apply_announce(&self, from: NodeId, processes: Vec<ProcessEntry>, endpoints: Vec<EndpointEntry>) {
        let mut t = self.tables.lock();
        t.routing.remove_node(from);
        for p in processes.into_iter().filter(|p| p.node == from) {
            t.routing.upsert(p);
        }
        for e in endpoints.into_iter().filter(|e| e.node == from) {
            t.routing.upsert_endpoint(e);
        }
    }

    pub fn apply_endpoint_up(&self, from: NodeId, entry: EndpointEntry) {
        if entry.node != from {
            tracing::warn!(node = %from, endpoint = %entry.key(), "peer announced an endpoint of another node; ignored");
            return;
        }
        self.tables.lock().routing.upsert_endpoint(entry);
    }

    pub fn apply_endpoint_down(&self, from: NodeId, key: EndpointKey) {
        let mut t = self.tables.lock();
        if t.routing.endpoint(&key).map(|e| e.node) == Some(from) {
            t.routing.remove_endpoint(&key);
        }
    }

    pub fn apply_process_up(&self, from: NodeId, entry: ProcessEntry) {
        if entry.node != from {
            tracing::warn!(node = %from, vpid = %entry.vpid, "peer announced a process of another node; ignored");
            return;
        }
        self.tables.lock().routing.upsert(entry);
    }

    pub fn apply_process_down(&self, from: NodeId, vpid: Vpid) {
        let mut t = self.tables.lock();
        if t.routing.get(vpid).map(|r| r.entry.node) == Some(from) {
            t.routing.remove(vpid);
            // Only the node it ran on says it ended: if this node handed the vPID out, nobody
            // holds it now (after the quarantine it is handed out again).
            t.vpids.free(vpid, Instant::now());
            // Images of it kept here for a move back are of no use any more.
            crate::moving::kept::forget(self, vpid);
        }
    }

    /// Delivers a signal to a process of this node, checking that `sender_uid` may.
    pub fn signal_local(&self, vpid: Vpid, signal: i32, group: bool, sender_uid: u32) -> i32 {
        if !(0..=64).contains(&signal) {
            return libc::EINVAL;
        }
        let target = {
            let t = self.tables.lock();
            match t.routing.get(vpid) {
                Some(r) if r.entry.node == self.node_id() => r.entry.clone(),
                _ => return libc::ESRCH,
            }
        };
        if sender_uid != 0 && sender_uid != target.uid {
            return libc::EPERM;
        }
        let pid = if group { -target.real_pid } else { target.real_pid };
        crate::sys::kill(pid, signal)
    }

    /// kill(vpid) from a local caller: delivered here or relayed to the node it runs on.
    pub async fn signal(&self, vpid: Vpid, signal: i32, group: bool, sender_uid: u32) -> i32 {
        let node = match self.tables.lock().routing.get(vpid) {
            Some(r) => r.entry.node,
            None => return libc::ESRCH,
        };
        if node == self.node_id() {
            return self.signal_local(vpid, signal, group, sender_uid);
        }
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.tables.lock().pending_signals.insert(request, tx);
        let sent = self.send_to(node, PeerMessage::Signal { request, vpid, signal, group, sender_uid });
        let result = if sent {
            match tokio::time::timeout(RELAY_TIMEOUT, rx).await {
                Ok(Ok(errno)) => errno,
                _ => libc::EHOSTUNREACH,
            }
        } else {
            libc::EHOSTUNREACH
        };
        self.tables.lock().pending_signals.remove(&request);
        result
    }

    pub fn complete_signal(&self, request: u64, errno: i32) {
        if let Some(tx) = self.tables.lock().pending_signals.remove(&request) {
            let _ = tx.send(errno);
        }
    }

    pub fn process_rows(&self) -> Vec<ProcessRow> {
        let t = self.tables.lock();
        t.routing
            .routes()
            .map(|r| ProcessRow {
                node_name: self.node_name(r.entry.node),
                entry: r.entry.clone(),
                state: r.state.clone(),
            })
            .collect()
    }

    pub fn node_statuses(&self) -> Vec<NodeStatus> {
        let t = self.tables.lock();
        self.config
            .nodes
            .iter()
            .map(|n| {
                let id = NodeId(n.id);
                let is_self = id == self.node_id();
                NodeStatus {
                    name: n.name.clone(),
                    id,
                    address: n.peer_addr.to_string(),
                    is_self,
                    up: is_self || t.links.contains_key(&id),
                    last_contact_ms: if is_self {
                        Some(0)
                    } else {
                        t.last_contact.get(&id).map(|at| at.elapsed().as_millis() as u64)
                    },
                    processes: t.routing.count_on(id) as u32,
                }
            })
            .collect()
    }
}
