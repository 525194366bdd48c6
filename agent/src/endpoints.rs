//! Endpoints on this node: listeners registered by the shim, name resolution,
//! opening streams (from the shim, from ingress, from peers), and ingress ports.

use crate::listener::ListenerFile;
use crate::relay::{self, Dir, End};
use crate::state::Agent;
use dvk_config::IngressConfig;
use dvk_protocol::frame::{self, LOCAL_MAX_FRAME};
use dvk_protocol::local::LocalResponse;
use dvk_protocol::peer::PeerMessage;
use dvk_protocol::stream::AcceptHeader;
use pidvirt::endpoint::client_vip;
use pidvirt::{EndpointEntry, EndpointKey, NodeId, ProcessEntry, VirtualAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UnixStream};

/// Directory (inside the runtime dir) where programs put their virtual listeners.
pub const LISTENER_DIR: &str = "ep";

/// Creates the listener directory: world-writable and sticky, like /tmp, so every
/// user's programs can listen and none can remove another's listener.
pub fn prepare_listener_dir(runtime_dir: &Path) -> std::io::Result<PathBuf> {
    let dir = runtime_dir.join(LISTENER_DIR);
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777))?;
    Ok(dir)
}

fn caller(agent: &Agent, pid: i32) -> Result<ProcessEntry, LocalResponse> {
    agent
        .tables
        .lock()
        .routing
        .find_local_by_pid(pid)
        .cloned()
        .ok_or_else(|| LocalResponse::Error { message: format!("pid {pid} is not registered with this agent") })
}

/// `Listen`: the caller's AF_UNIX listener at `path` serves endpoint `<its name>:port`.
pub fn listen(agent: &Agent, pid: i32, uid: u32, port: u16, path: String) -> LocalResponse {
    let me = match caller(agent, pid) {
        Ok(e) => e,
        Err(r) => return r,
    };
    let path = PathBuf::from(path);
    let dir = agent.me.runtime_dir.join(LISTENER_DIR);
    if path.parent() != Some(dir.as_path()) {
        return LocalResponse::Error { message: format!("listener {} is not in {}", path.display(), dir.display()) };
    }
    // Opened once, here: from now on the agent reaches this inode, never the path (which the
    // caller owns and may rename anything over).
    // ...and only if the caller itself listens on it (not some other process's socket file).
    let file = match ListenerFile::open(&path, uid).and_then(|f| f.check_served_by(pid).map(|_| f)) {
        Ok(f) => f,
        Err(e) => return LocalResponse::Error { message: e.to_string() },
    };
    let key = EndpointKey { dc: me.dc.clone(), name: me.endpoint.clone(), port };
    // A name the config reserves for another user is refused (EACCES, as a privileged port).
    if let Err(errno) = crate::policy::may_listen(&agent.config, &key.dc, &key.name, uid) {
        crate::ratelog::warn(
            &crate::ratelog::REGISTER_REFUSED,
            format_args!("listen on {key} by pid {pid} (uid {uid}) refused: the name is reserved for another user"),
        );
        return LocalResponse::Refused { errno };
    }
    let entry = {
        let mut t = agent.tables.lock();
        // A name that a process of another user already listens on (on any port, on any node
        // this agent knows of) is that user's: a second user cannot add ports to it, so
        // clients of the name only ever reach processes of one user.
        let held = t.routing.endpoints().any(|e| {
            e.dc.eq_ignore_ascii_case(&key.dc)
                && e.name.eq_ignore_ascii_case(&key.name)
                && t.routing.get(e.vpid).is_none_or(|r| r.entry.uid != uid)
        });
        if held {
            drop(t);
            crate::ratelog::warn(
                &crate::ratelog::REGISTER_REFUSED,
                format_args!("listen on {key} by pid {pid} (uid {uid}) refused: another user's process holds the name"),
            );
            return LocalResponse::Refused { errno: libc::EADDRINUSE };
        }
        // Names differing only in case are one host name, so one VIP: the port must be free on it.
        let vip = t.routing.choose_vip(&key.dc, &key.name);
        if let Some(existing) = t.routing.endpoint_by_vip(&key.dc, vip, port) {
            if existing.vpid != me.vpid || existing.name != key.name {
                return LocalResponse::Refused { errno: libc::EADDRINUSE };
            }
        }
        let entry = EndpointEntry {
            dc: key.dc.clone(),
            name: key.name.clone(),
            port,
            vip,
            vpid: me.vpid,
            node: agent.node_id(),
        };
        t.routing.upsert_endpoint(entry.clone());
        t.listeners.entry(key.clone()).or_default().push(file);
        entry
    };
    tracing::info!(endpoint = %key, vip = %VirtualAddr { ip: entry.vip, port }, vpid = %me.vpid, "endpoint listening");
    crate::registry::save(agent);
    agent.broadcast(PeerMessage::EndpointUp(entry.clone()));
    LocalResponse::Listening { vip: entry.vip }
}

/// `Resolve`: only names of the caller's own DC resolve.
pub fn resolve(agent: &Agent, pid: i32, dc: &str, name: &str) -> LocalResponse {
    let me = match caller(agent, pid) {
        Ok(e) => e,
        Err(r) => return r,
    };
    if !me.dc.eq_ignore_ascii_case(dc) {
        return LocalResponse::Refused { errno: libc::ENOENT };
    }
    match agent.tables.lock().routing.vip_of(&me.dc, name) {
        Some(vip) => LocalResponse::Resolved { vip },
        None => LocalResponse::Refused { errno: libc::ENOENT },
    }
}

/// Removes the listeners of an endpoint; it disappears from the cluster.
fn endpoint_gone(agent: &Agent, key: &EndpointKey) {
    let removed = {
        let mut t = agent.tables.lock();
        for l in t.listeners.remove(key).unwrap_or_default() {
            l.remove();
        }
        t.routing.remove_endpoint(key).is_some()
    };
    if removed {
        crate::registry::save(agent);
        tracing::info!(endpoint = %key, "endpoint no longer listening");
        agent.broadcast(PeerMessage::EndpointDown(key.clone()));
    }
}

/// Forgets the listener files of a process that exited (its endpoints left the
/// routing table with it).
pub fn process_exited(agent: &Agent, gone: &[EndpointKey]) {
    let mut t = agent.tables.lock();
    for key in gone {
        for l in t.listeners.remove(key).unwrap_or_default() {
            l.remove();
        }
    }
}

/// How long a new stream waits for room in a listener's backlog before it is refused.
/// A full backlog means a busy program, not a closed listener (TCP would retry its SYN).
const BACKLOG_PATIENCE: Duration = Duration::from_secs(5);

/// Connects to a live listener of a local endpoint and sends the accept header.
async fn connect_listener(agent: &Agent, key: &EndpointKey, header: AcceptHeader) -> Option<UnixStream> {
    let deadline = Instant::now() + BACKLOG_PATIENCE;
    let mut pause = Duration::from_millis(1);
    loop {
        let files = agent.tables.lock().listeners.get(key).cloned().unwrap_or_default();
        if files.is_empty() {
            endpoint_gone(agent, key);
            return None;
        }
        let mut busy = false;
        for l in files {
            match l.connect().await {
                Ok(mut s) => {
                    if s.write_all(&header.encode()).await.is_ok() {
                        return Some(s);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => busy = true,
                Err(e) if crate::listener::is_gone(&e) => {
                    // The program closed that listener (or died): drop it, try the next.
                    tracing::info!(endpoint = %key, path = %l.path.display(), "listener gone: {e}");
                    let mut t = agent.tables.lock();
                    if let Some(list) = t.listeners.get_mut(key) {
                        list.retain(|p| p.path != l.path);
                        if list.is_empty() {
                            t.listeners.remove(key);
                        }
                    }
                    l.remove();
                }
                Err(e) => {
                    // Out of fds or memory (a flood, say): this stream is refused, but the
                    // listener is healthy and stays.
                    crate::ratelog::warn(
                        &crate::ratelog::LISTENER_CONNECT,
                        format_args!("cannot connect to a listener of {key}: {e}; refusing the stream"),
                    );
                    return None;
                }
            }
        }
        if !busy {
            if agent.tables.lock().listeners.contains_key(key) {
                return None;
            }
            continue; // every listener is gone: the next pass retires the endpoint
        }
        if Instant::now() >= deadline {
            crate::ratelog::warn(
                &crate::ratelog::BACKLOG_FULL,
                format_args!("listener backlog of {key} full for {BACKLOG_PATIENCE:?}; refusing the stream"),
            );
            return None;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Where a new stream goes, decided before the opener is told it is connected.
enum Route {
    Local(UnixStream),
    Remote(NodeId),
}

struct Opening {
    id: u64,
    key: EndpointKey,
    client: VirtualAddr,
    server: VirtualAddr,
    route: Route,
    _guard: crate::state::OpenGuard,
}

/// How long a new stream waits for an endpoint that is moving (instead of being refused).
pub const MOVE_PATIENCE: Duration = Duration::from_secs(10);

/// Where an endpoint is once no move of its process is under way.
pub struct Settled {
    /// Its current entry (it may now be on another node); None if it is gone.
    pub entry: Option<EndpointEntry>,
    /// Counts this open as under way until the stream reached the listener or its StreamOpen is
    /// on the link, so a move's start can wait for it.
    pub guard: crate::state::OpenGuard,
    /// The endpoint was moving when the open arrived (it waited for the move's end).
    pub waited: bool,
}

/// Waits while the process serving `key` is moving; then where the endpoint is.
pub async fn settled_endpoint(agent: &Agent, key: &EndpointKey) -> Settled {
    let deadline = Instant::now() + MOVE_PATIENCE;
    let mut waited = false;
    loop {
        let guard = agent.opens.enter();
        let (entry, moving) = endpoint_now(agent, key);
        if !moving || Instant::now() >= deadline {
            if moving {
                tracing::warn!(endpoint = %key, "endpoint still moving after {MOVE_PATIENCE:?}; refusing the stream");
                return Settled { entry: None, guard, waited };
            }
            return Settled { entry, guard, waited };
        }
        waited = true;
        drop(guard);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Finds the endpoint and, if it is local, connects to it. Err(errno) as connect(2) would fail.
async fn prepare(agent: &Agent, entry: Option<EndpointEntry>, client: VirtualAddr) -> Result<Opening, i32> {
    let entry = entry.ok_or(libc::ECONNREFUSED)?;
    let Settled { entry, guard, .. } = settled_endpoint(agent, &entry.key()).await;
    let entry = entry.ok_or(libc::ECONNREFUSED)?;
    let key = entry.key();
    let server = VirtualAddr { ip: entry.vip, port: entry.port };
    let id = agent.new_stream_id();
    let route = if entry.node == agent.node_id() {
        let header = AcceptHeader { peer: client, local: server, stream: id };
        Route::Local(connect_listener(agent, &key, header).await.ok_or(libc::ECONNREFUSED)?)
    } else {
        Route::Remote(entry.node)
    };
    Ok(Opening { id, key, client, server, route, _guard: guard })
}

/// Relays an opened stream until both directions end.
async fn run(agent: Arc<Agent>, opening: Opening, client_end: End) {
    match opening.route {
        Route::Local(server) => {
            relay::spawn_local(&agent, opening.id, client_end, End::Unix(server), Dir::default(), Dir::default())
        }
        Route::Remote(node) => {
            let (stream, pumps) = relay::remote_stream(node);
            agent.streams.lock().insert(opening.id, stream);
            let open = PeerMessage::StreamOpen {
                stream: opening.id,
                endpoint: opening.key,
                client: opening.client,
                server: opening.server,
            };
            // Written at once, like the stream's data after it, so it cannot be overtaken.
            let sent = match agent.link(node) {
                Some(link) => link.write_now(open).await.is_ok(),
                None => false,
            };
            if !sent {
                agent.remove_stream(opening.id);
                return; // dropping the client end closes it: the program sees EOF
            }
            relay::spawn_remote(&agent, opening.id, node, client_end, pumps, true, Dir::default(), Dir::default());
        }
    }
}

/// `OpenStream` from the shim: answers on `conn`, then `conn` carries the stream.
pub async fn open_from_shim(agent: Arc<Agent>, mut conn: UnixStream, pid: i32, vip: [u8; 4], port: u16) {
    let me = match caller(&agent, pid) {
        Ok(e) => e,
        Err(response) => {
            let _ = write_response(&mut conn, &response).await;
            return;
        }
    };
    let entry = agent.tables.lock().routing.endpoint_by_vip(&me.dc, vip, port).cloned();
    let client = VirtualAddr { ip: client_vip(&me.dc, &me.endpoint), port: agent.client_port() };
    match prepare(&agent, entry, client).await {
        Err(errno) => {
            let _ = write_response(&mut conn, &LocalResponse::Refused { errno }).await;
        }
        Ok(opening) => {
            let reply = LocalResponse::StreamOpened { stream: opening.id, local: client, peer: opening.server };
            if write_response(&mut conn, &reply).await.is_ok() {
                tracing::debug!(stream = opening.id, endpoint = %opening.key, %client, "stream opened");
                run(agent, opening, End::Unix(conn)).await;
            }
        }
    }
}

async fn write_response(conn: &mut UnixStream, response: &LocalResponse) -> std::io::Result<()> {
    let bytes = frame::encode(response, LOCAL_MAX_FRAME).map_err(std::io::Error::other)?;
    conn.write_all(&bytes).await
}

/// `StreamOpen` from a peer: register the stream at once (its data may follow
/// right behind), then connect to the local listener.
///
/// An open that reached this node while the endpoint was moving away from it (its sender chose
/// the route before it heard of the move) is carried on to where the endpoint settled: this node
/// then relays the stream as if a local program had opened it there, so the client is served,
/// never refused, by the move.
pub fn accept_remote_stream(
    agent: &Arc<Agent>,
    peer: NodeId,
    id: u64,
    key: EndpointKey,
    client: VirtualAddr,
    server: VirtualAddr,
) {
    let (stream, pumps) = relay::remote_stream(peer);
    agent.streams.lock().insert(id, stream);
    // Counted as under way from now. If the endpoint is not moving yet, a move that starts
    // here waits (its quiesce) until this open reached the listener, so it must go there at
    // once — waiting for that move would deadlock with it. If it is moving already, the move
    // did not count it: it waits for the move's outcome like any new open.
    let early = agent.opens.enter();
    let counted = !moving(agent, &key);
    let agent = agent.clone();
    tokio::spawn(async move {
        let fault = agent.fault.filter(|_| client.ip == client_vip(&key.dc, "move_client"));
        if fault == Some(crate::moving::Fault::OpenLate) {
            drop(early);
            hold_first_open_until_moving(&agent, id, &key).await;
            return accept_settled(agent, peer, id, key, client, server, pumps, None).await;
        }
        if fault == Some(crate::moving::Fault::OpenCountedLate) && counted {
            hold_first_open_until_moving(&agent, id, &key).await;
        }
        let early = if counted {
            Some(early)
        } else {
            drop(early);
            None
        };
        accept_settled(agent, peer, id, key, client, server, pumps, early).await
    });
}

/// Test faults `open-late` and `open-counted-late`: the first open from a `move_client`
/// program waits until its endpoint is moving here. With `open-late` it is not counted as under
/// way: it reaches the node as if its StreamOpen had arrived after the node marked the endpoint
/// moving (as an open does from a node that learned the route while the move was under way).
/// With `open-counted-late` it stays counted: it arrived before the mark, and the move's start
/// waits for it while it looks.
async fn hold_first_open_until_moving(agent: &Agent, id: u64, key: &EndpointKey) {
    static HELD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if HELD.swap(true, std::sync::atomic::Ordering::AcqRel) {
        return;
    }
    tracing::warn!(stream = id, endpoint = %key, "test fault: holding a stream open until its endpoint moves");
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && !moving(agent, key) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tracing::warn!(stream = id, endpoint = %key, "test fault: the endpoint is moving; the held open goes on");
}

/// The endpoint's entry, and whether its process is moving (one look at the table).
fn endpoint_now(agent: &Agent, key: &EndpointKey) -> (Option<EndpointEntry>, bool) {
    let t = agent.tables.lock();
    let entry = t.routing.endpoint(key).cloned();
    let moving = entry.as_ref().is_some_and(|e| {
        t.routing.get(e.vpid).is_some_and(|r| matches!(r.state, pidvirt::EndpointState::Migrating { .. }))
    });
    (entry, moving)
}

fn moving(agent: &Agent, key: &EndpointKey) -> bool {
    endpoint_now(agent, key).1
}

#[allow(clippy::too_many_arguments)]
async fn accept_settled(
    agent: Arc<Agent>,
    peer: NodeId,
    id: u64,
    key: EndpointKey,
    client: VirtualAddr,
    server: VirtualAddr,
    pumps: relay::RemotePumps,
    counted: Option<crate::state::OpenGuard>,
) {
    let settled = match counted {
        // A move's start waits for this open: where the endpoint is now is where it goes.
        Some(guard) => {
            let entry = agent.tables.lock().routing.endpoint(&key).cloned();
            Settled { entry, guard, waited: false }
        }
        None => settled_endpoint(&agent, &key).await,
    };
    let here = agent.node_id();
    match settled.entry {
        Some(e) if e.node == here => {
            let header = AcceptHeader { peer: client, local: server, stream: id };
            let conn = connect_listener(&agent, &key, header).await;
            drop(settled.guard);
            match conn {
                Some(conn) => {
                    relay::spawn_remote(&agent, id, peer, End::Unix(conn), pumps, false, Dir::default(), Dir::default())
                }
                None => refuse_remote_stream(&agent, peer, id, &key),
            }
        }
        Some(e) if settled.waited => {
            tracing::info!(stream = id, endpoint = %key, node = %e.node, "stream opened during a move: relayed to where the endpoint went");
            let (near, far) = match UnixStream::pair() {
                Ok(pair) => pair,
                Err(err) => {
                    tracing::warn!(stream = id, "cannot relay a stream on: {err}");
                    return refuse_remote_stream(&agent, peer, id, &key);
                }
            };
            relay::spawn_remote(&agent, id, peer, End::Unix(near), pumps, false, Dir::default(), Dir::default());
            let opening = Opening {
                id: agent.new_stream_id(),
                key,
                client,
                server,
                route: Route::Remote(e.node),
                _guard: settled.guard,
            };
            run(agent, opening, End::Unix(far)).await;
        }
        _ => refuse_remote_stream(&agent, peer, id, &key),
    }
}

fn refuse_remote_stream(agent: &Agent, peer: NodeId, id: u64, key: &EndpointKey) {
    tracing::info!(stream = id, endpoint = %key, "stream refused: no listener here");
    if let Some(s) = agent.streams.lock().remove(&id) {
        s.reset();
    }
    agent.send_to(peer, PeerMessage::StreamReset { stream: id });
}

/// Binds the ingress ports of this node (before the agent reports itself started).
pub async fn bind_ingress(ingress: &[IngressConfig]) -> anyhow::Result<Vec<(IngressConfig, TcpListener)>> {
    let mut out = Vec::new();
    for ing in ingress {
        let listener = TcpListener::bind(ing.listen).await.map_err(|e| {
            anyhow::anyhow!("cannot listen for ingress {}:{} on {}: {e}", ing.name, ing.port, ing.listen)
        })?;
        out.push((ing.clone(), listener));
    }
    Ok(out)
}

/// Accepts plain TCP clients on an ingress port and relays each to the endpoint.
pub async fn serve_ingress(agent: Arc<Agent>, ing: IngressConfig, listener: TcpListener) {
    let key = EndpointKey { dc: ing.dc.clone(), name: ing.name.clone(), port: ing.port };
    tracing::info!(endpoint = %key, listen = %ing.listen, "ingress open");
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                crate::ratelog::warn(&crate::ratelog::ACCEPT, format_args!("ingress accept failed: {e}"));
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let agent = agent.clone();
        let key = key.clone();
        tokio::spawn(async move {
            let client = match from {
                std::net::SocketAddr::V4(v4) => VirtualAddr { ip: v4.ip().octets(), port: v4.port() },
                std::net::SocketAddr::V6(v6) => VirtualAddr { ip: [0; 4], port: v6.port() },
            };
            let entry = agent.tables.lock().routing.endpoint(&key).cloned();
            match prepare(&agent, entry, client).await {
                Ok(opening) => run(agent, opening, End::Tcp(tcp)).await,
                Err(_) => tracing::info!(endpoint = %key, %from, "ingress client refused: endpoint not listening"),
            }
        });
    }
}
