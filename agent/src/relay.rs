//! Moving a stream's bytes. Both ends on this node: two blocking copy threads between the
//! sockets, nothing crosses the network. Ends on two nodes: each agent runs the
//! same pair of pumps against the peer link, with per-stream credit:
//!
//! ```text
//!  program ─▶ [outbound pump] ── StreamData (≤ credit) ──▶ [inbound pump] ─▶ program
//!                    ▲                                           │
//!                    └───────── StreamCredit (bytes written) ◀───┘
//! ```
//! A direction may have at most `STREAM_WINDOW` bytes in flight, so a program
//! that stops reading stalls only its own stream, and agent memory per stream
//! is bounded. Half-close travels as StreamFin, abort as StreamReset.
//!
//! Every relay is registered in [`Relays`] with its [`Stop`] switch and a duplicate of each
//! socket it holds, so a move can *detach* it: the pumps stop between two system calls and
//! hand back, per direction, what they had read and not yet written ([`Dir`]); the sockets
//! stay open (the duplicates), and a new relay can later be started over them with those bytes
//! first (*reattach*), towards another node if the process moved.

use crate::state::{Agent, LinkHandle};
use dvk_protocol::peer::{PeerMessage, STREAM_CHUNK, STREAM_WINDOW};
use parking_lot::Mutex;
use pidvirt::NodeId;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot, Notify};

/// Credit is returned once this much has been written to the program.
const CREDIT_BATCH: u64 = STREAM_WINDOW as u64 / 4;

/// Copy buffer for same-node relaying.
const LOCAL_CHUNK: usize = 256 * 1024;

/// One side of a stream that the agent holds a socket for.
pub enum End {
    /// A program under the shim (its virtual socket or listener connection).
    Unix(UnixStream),
    /// A plain TCP client that came in through ingress.
    Tcp(TcpStream),
}

type Reader<'a> = Box<dyn AsyncRead + Unpin + Send + 'a>;
type Writer<'a> = Box<dyn AsyncWrite + Unpin + Send + 'a>;

impl End {
    /// Borrowed halves: unlike tokio's owned write half, dropping them does not shut the socket
    /// down, so a relay stopped for a move leaves its peer program none the wiser.
    fn split(&mut self) -> (Reader<'_>, Writer<'_>) {
        match self {
            End::Unix(s) => {
                let (r, w) = s.split();
                (Box::new(r), Box::new(w))
            }
            End::Tcp(s) => {
                let _ = s.set_nodelay(true);
                let (r, w) = s.split();
                (Box::new(r), Box::new(w))
            }
        }
    }

    fn raw(&self) -> std::os::fd::RawFd {
        match self {
            End::Unix(s) => s.as_raw_fd(),
            End::Tcp(s) => s.as_raw_fd(),
        }
    }

    /// A duplicate of the socket, kept while a relay runs so a move can take the socket back.
    fn held(&self, client: bool) -> std::io::Result<HeldEnd> {
        let fd = crate::sys::dup(self.raw())?;
        Ok(HeldEnd { ino: crate::sys::inode(&fd)?, fd: Arc::new(fd), client, tcp: matches!(self, End::Tcp(_)) })
    }

    /// Rebuilds an end from a held duplicate (non-blocking, for tokio).
    pub fn from_held(h: &HeldEnd) -> std::io::Result<End> {
        let fd = h.fd.try_clone()?;
        Ok(if h.tcp {
            let s = std::net::TcpStream::from(fd);
            s.set_nonblocking(true)?;
            End::Tcp(TcpStream::from_std(s)?)
        } else {
            let s = std::os::unix::net::UnixStream::from(fd);
            s.set_nonblocking(true)?;
            End::Unix(UnixStream::from_std(s)?)
        })
    }
}

/// A socket a relay uses, kept (duplicated) so a move can take it back.
#[derive(Clone)]
pub struct HeldEnd {
    /// Inode of the agent's socket: a program's end has it as its peer (sock_diag).
    pub ino: u64,
    pub fd: Arc<OwnedFd>,
    /// The connecting side of the stream (else the accepting side).
    pub client: bool,
    pub tcp: bool,
}

/// What one direction of a stopped relay still owes: bytes read from its source and not yet
/// written to its sink, and whether its source had ended (a FIN to pass on after them).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Dir {
    pub pending: Vec<u8>,
    pub ended: bool,
}

impl Dir {
    pub fn append(&mut self, other: Dir) {
        self.pending.extend_from_slice(&other.pending);
        self.ended |= other.ended;
    }
}

/// Bytes moved per direction (client → server, server → client).
#[derive(Default)]
pub struct Sequence {
    pub to_server: AtomicU64,
    pub to_client: AtomicU64,
}

/// A relay's stop switch: async pumps watch it, blocking threads are interrupted by a signal.
#[derive(Default)]
pub struct Stop {
    set: AtomicBool,
    notify: Notify,
    /// Relay threads blocked (or about to block) in read/write; they remove themselves before
    /// they end, under this lock, so a signal never goes to a thread that is gone.
    threads: Mutex<Vec<libc::pthread_t>>,
}

impl Stop {
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    fn request(&self) {
        self.set.store(true, Ordering::Release);
        self.notify.notify_waiters();
        for t in self.threads.lock().iter() {
            crate::sys::interrupt_thread(*t);
        }
    }

    async fn stopped(&self) {
        loop {
            let n = self.notify.notified();
            if self.is_set() {
                return;
            }
            n.await;
        }
    }

    fn enter_thread(&self) {
        self.threads.lock().push(crate::sys::current_thread());
    }

    fn leave_thread(&self) {
        let me = crate::sys::current_thread();
        self.threads.lock().retain(|t| *t != me);
    }
}

/// What a relay hands back when it is detached.
pub enum Left {
    /// Both ends were here.
    Local { to_server: Dir, to_client: Dir },
    /// One end here, the other on `peer`. `out`: read from our end, not sent; `inb`: received,
    /// not written to our end; `rx`: the stream's inbound queue (more may arrive until the peer
    /// confirms it stopped too).
    Remote { out: Dir, inb: Dir, rx: mpsc::UnboundedReceiver<Inbound> },
}

struct RelayEntry {
    generation: u64,
    ends: Vec<HeldEnd>,
    peer: Option<NodeId>,
    stop: Arc<Stop>,
    left: Option<oneshot::Receiver<Left>>,
}

/// A relay taken off its sockets by [`Relays::detach`].
pub struct Detached {
    pub ends: Vec<HeldEnd>,
    pub peer: Option<NodeId>,
    pub left: Left,
}

/// Every relay this agent runs, by stream id.
#[derive(Default)]
pub struct Relays {
    map: Mutex<HashMap<u64, RelayEntry>>,
    next_generation: AtomicU64,
}

impl Relays {
    fn register(
        &self,
        stream: u64,
        ends: Vec<HeldEnd>,
        peer: Option<NodeId>,
    ) -> (u64, Arc<Stop>, oneshot::Sender<Left>) {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let stop = Arc::new(Stop::default());
        let (tx, rx) = oneshot::channel();
        self.map.lock().insert(stream, RelayEntry { generation, ends, peer, stop: stop.clone(), left: Some(rx) });
        (generation, stop, tx)
    }

    fn ended(&self, stream: u64, generation: u64) {
        let mut m = self.map.lock();
        if m.get(&stream).is_some_and(|e| e.generation == generation) {
            m.remove(&stream);
        }
    }

    /// The stream whose relay holds the socket with inode `ino`, and whether that socket is the
    /// client side.
    pub fn by_inode(&self) -> HashMap<u64, (u64, bool)> {
        let m = self.map.lock();
        let mut out = HashMap::new();
        for (id, e) in m.iter() {
            for h in &e.ends {
                out.insert(h.ino, (*id, h.client));
            }
        }
        out
    }

    pub fn peer_of(&self, stream: u64) -> Option<Option<NodeId>> {
        self.map.lock().get(&stream).map(|e| e.peer)
    }

    /// Stops the relay of `stream` between two system calls and returns its sockets and what
    /// each direction still owes. None if it has already ended.
    pub async fn detach(&self, stream: u64) -> Option<Detached> {
        let mut entry = self.map.lock().remove(&stream)?;
        entry.stop.request();
        let mut rx = entry.left.take()?;
        // A thread may have been between its check and its blocking call when the signal came:
        // signal again until it answers.
        // Bounded: a relay that never answers (it cannot, short of a kernel bug) costs its
        // stream, not the move.
        let mut tries = 0;
        let left = loop {
            match tokio::time::timeout(std::time::Duration::from_millis(2), &mut rx).await {
                Ok(Ok(left)) => break left,
                Ok(Err(_)) => return None,
                Err(_) if tries >= 1000 => {
                    tracing::error!(stream, "relay did not stop within 2 s; the stream is lost");
                    return None;
                }
                Err(_) => {
                    tries += 1;
                    entry.stop.request();
                }
            }
        };
        Some(Detached { ends: entry.ends, peer: entry.peer, left })
    }
}

/// Starts a same-node relay (registered for detaching): `to_server`/`to_client` are written
/// first (a reattach), and a direction already `ended` is only finished, not read.
pub fn spawn_local(agent: &Arc<Agent>, stream: u64, client: End, server: End, to_server: Dir, to_client: Dir) {
    let ends = match (client.held(true), server.held(false)) {
        (Ok(c), Ok(s)) => vec![c, s],
        _ => return,
    };
    let (generation, stop, done) = agent.relays.register(stream, ends, None);
    let agent = agent.clone();
    tokio::spawn(async move {
        let left = relay_local(client, server, Arc::new(Sequence::default()), to_server, to_client, stop.clone()).await;
        agent.relays.ended(stream, generation);
        if let Some(left) = left {
            let _ = done.send(left);
        }
    });
}

/// Both ends on this node: one blocking thread per direction. A relay hop then costs
/// one kernel wake-up of the thread that waits in read(), with no reactor between
/// (measured: about half the round-trip time of the same loop on tokio tasks).
/// Returns what each direction owes if it was stopped.
async fn relay_local(
    client: End,
    server: End,
    seq: Arc<Sequence>,
    to_server: Dir,
    to_client: Dir,
    stop: Arc<Stop>,
) -> Option<Left> {
    let (Ok(client), Ok(server)) = (client.into_std(), server.into_std()) else { return None };
    let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else { return None };
    let (up, stop_a, stop_b) = (seq.clone(), stop.clone(), stop.clone());
    let a = std::thread::Builder::new()
        .name("relay".into())
        .stack_size(64 * 1024)
        .spawn(move || copy_blocking(client, server2, &up.to_server, &stop_a, to_server));
    let b = std::thread::Builder::new()
        .name("relay".into())
        .stack_size(64 * 1024)
        .spawn(move || copy_blocking(server, client2, &seq.to_client, &stop_b, to_client));
    let (a, b) = tokio::task::spawn_blocking(move || {
        let a = a.ok().and_then(|a| a.join().ok());
        let b = b.ok().and_then(|b| b.join().ok());
        (a, b)
    })
    .await
    .ok()?;
    if !stop.is_set() {
        return None;
    }
    Some(Left::Local { to_server: a.unwrap_or_default(), to_client: b.unwrap_or_default() })
}

/// A blocking socket of either kind.
pub enum StdEnd {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl StdEnd {
    fn try_clone(&self) -> std::io::Result<StdEnd> {
        Ok(match self {
            StdEnd::Unix(s) => StdEnd::Unix(s.try_clone()?),
            StdEnd::Tcp(s) => StdEnd::Tcp(s.try_clone()?),
        })
    }

    fn shutdown_write(&self) {
        let _ = match self {
            StdEnd::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            StdEnd::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
        };
    }
}

impl std::io::Read for StdEnd {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            StdEnd::Unix(s) => s.read(buf),
            StdEnd::Tcp(s) => s.read(buf),
        }
    }
}

impl std::io::Write for StdEnd {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            StdEnd::Unix(s) => s.write(buf),
            StdEnd::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl End {
    fn into_std(self) -> std::io::Result<StdEnd> {
        Ok(match self {
            End::Unix(s) => {
                let s = s.into_std()?;
                s.set_nonblocking(false)?;
                StdEnd::Unix(s)
            }
            End::Tcp(s) => {
                let s = s.into_std()?;
                s.set_nonblocking(false)?;
                let _ = s.set_nodelay(true);
                StdEnd::Tcp(s)
            }
        })
    }
}

/// Copies `from` → `to` until EOF (then half-closes `to`), an error, or `stop`. Writes
/// `first.pending` before anything it reads. Returns what it read and did not write.
fn copy_blocking(mut from: StdEnd, mut to: StdEnd, counter: &AtomicU64, stop: &Stop, first: Dir) -> Dir {
    use std::io::{ErrorKind, Read, Write};
    stop.enter_thread();
    let mut buf = first.pending;
    let mut ended = first.ended;
    let (mut start, mut end) = (0usize, buf.len());
    if buf.len() < LOCAL_CHUNK {
        buf.resize(LOCAL_CHUNK, 0);
    }
    let left = loop {
        // Write what we hold.
        while start < end {
            if stop.is_set() {
                break;
            }
            match to.write(&buf[start..end]) {
                Ok(n) => {
                    start += n;
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // The reader went away: stop reading too, so the writer sees its socket close.
                Err(_) => {
                    stop.leave_thread();
                    return Dir::default();
                }
            }
        }
        if stop.is_set() {
            break Dir { pending: buf[start..end].to_vec(), ended };
        }
        if ended {
            // Half-close: the other program reads EOF, its own direction keeps working.
            to.shutdown_write();
            break Dir { pending: Vec::new(), ended: true };
        }
        if buf.len() > LOCAL_CHUNK {
            buf.truncate(LOCAL_CHUNK);
        }
        match from.read(&mut buf) {
            Ok(0) => ended = true,
            Ok(n) => (start, end) = (0, n),
            Err(e) if e.kind() == ErrorKind::Interrupted => (start, end) = (0, 0),
            Err(_) => {
                stop.leave_thread();
                to.shutdown_write();
                return Dir::default();
            }
        }
        if start == end {
            (start, end) = (0, 0);
        }
    };
    stop.leave_thread();
    left
}

/// Send credit of one stream direction, and whether the stream was reset.
pub struct Credit {
    state: Mutex<(u64, bool)>,
    changed: Notify,
}

impl Credit {
    fn new(initial: u64) -> Self {
        Credit { state: Mutex::new((initial, false)), changed: Notify::new() }
    }

    pub fn grant(&self, n: u64) {
        self.state.lock().0 += n;
        self.changed.notify_waiters();
    }

    pub fn close(&self) {
        self.state.lock().1 = true;
        self.changed.notify_waiters();
    }

    /// Waits for credit; None once the stream is reset.
    async fn available(&self) -> Option<u64> {
        loop {
            let changed = self.changed.notified();
            {
                let (avail, closed) = *self.state.lock();
                if closed {
                    return None;
                }
                if avail > 0 {
                    return Some(avail);
                }
            }
            changed.await;
        }
    }

    async fn closed(&self) {
        loop {
            let changed = self.changed.notified();
            if self.state.lock().1 {
                return;
            }
            changed.await;
        }
    }

    fn consume(&self, n: u64) {
        let mut s = self.state.lock();
        s.0 = s.0.saturating_sub(n);
    }
}

pub enum Inbound {
    /// Payload `buf[offset..]` (the received frame body, not copied out of it).
    Data(Vec<u8>, usize),
    Fin,
    Reset,
}

/// Takes everything queued in a detached stream's inbound queue: its bytes, whether a FIN
/// came, whether it was reset.
pub fn drain_inbound(rx: &mut mpsc::UnboundedReceiver<Inbound>, into: &mut Dir) -> bool {
    let mut reset = false;
    while let Ok(m) = rx.try_recv() {
        match m {
            Inbound::Data(buf, off) => into.pending.extend_from_slice(buf.get(off..).unwrap_or_default()),
            Inbound::Fin => into.ended = true,
            Inbound::Reset => reset = true,
        }
    }
    reset
}

/// A stream whose other end is on another node, as the link reader sees it.
pub struct RemoteStream {
    pub peer: NodeId,
    inbound: mpsc::UnboundedSender<Inbound>,
    credit: Arc<Credit>,
    /// Received from the peer, not yet written to the program.
    buffered: Arc<AtomicU64>,
}

/// What the pumps of a remote stream need; made together with its [`RemoteStream`].
pub struct RemotePumps {
    inbound: mpsc::UnboundedReceiver<Inbound>,
    credit: Arc<Credit>,
    buffered: Arc<AtomicU64>,
    seq: Arc<Sequence>,
}

pub fn remote_stream(peer: NodeId) -> (RemoteStream, RemotePumps) {
    let (tx, rx) = mpsc::unbounded_channel();
    let credit = Arc::new(Credit::new(STREAM_WINDOW as u64));
    let buffered = Arc::new(AtomicU64::new(0));
    let seq = Arc::new(Sequence::default());
    (
        RemoteStream { peer, inbound: tx, credit: credit.clone(), buffered: buffered.clone() },
        RemotePumps { inbound: rx, credit, buffered, seq },
    )
}

impl RemoteStream {
    /// Hands data from the peer to the inbound pump. False if the peer overran the
    /// window it was granted (the caller resets the stream).
    pub fn deliver(&self, buf: Vec<u8>, offset: usize) -> bool {
        let n = buf.len().saturating_sub(offset) as u64;
        let total = self.buffered.fetch_add(n, Ordering::AcqRel) + n;
        if total > STREAM_WINDOW as u64 {
            return false;
        }
        let _ = self.inbound.send(Inbound::Data(buf, offset));
        true
    }

    pub fn finish(&self) {
        let _ = self.inbound.send(Inbound::Fin);
    }

    pub fn reset(&self) {
        let _ = self.inbound.send(Inbound::Reset);
        self.credit.close();
    }

    pub fn grant(&self, n: u64) {
        self.credit.grant(n);
    }
}

/// Starts the pumps of a remote stream (registered for detaching): `out` is sent to the peer
/// first, `inb` written to our end first; an `ended` direction is only finished.
/// `client_side`: our end is the connecting program (its reads go to the server).
#[allow(clippy::too_many_arguments)]
pub fn spawn_remote(
    agent: &Arc<Agent>,
    id: u64,
    peer: NodeId,
    end: End,
    pumps: RemotePumps,
    client_side: bool,
    out: Dir,
    inb: Dir,
) {
    let Ok(held) = end.held(client_side) else {
        agent.remove_stream(id);
        return;
    };
    let (generation, stop, done) = agent.relays.register(id, vec![held], Some(peer));
    let agent = agent.clone();
    tokio::spawn(async move {
        let left = relay_remote(&agent, id, peer, end, pumps, client_side, out, inb, &stop).await;
        agent.relays.ended(id, generation);
        match left {
            Some(left) => {
                let _ = done.send(left);
            }
            None => agent.remove_stream(id),
        }
    });
}

/// Runs both pumps of a remote stream. Returns what they owe if stopped (the stream then stays
/// registered with the link reader, so data the peer sent before it stopped is kept).
#[allow(clippy::too_many_arguments)]
async fn relay_remote(
    agent: &Arc<Agent>,
    id: u64,
    peer: NodeId,
    end: End,
    pumps: RemotePumps,
    client_side: bool,
    out: Dir,
    inb: Dir,
    stop: &Stop,
) -> Option<Left> {
    let link = agent.link(peer)?;
    let mut end = end;
    let (r, w) = end.split();
    let (sent, received) = if client_side {
        (&pumps.seq.to_server, &pumps.seq.to_client)
    } else {
        (&pumps.seq.to_client, &pumps.seq.to_server)
    };
    let ((out_left, _), (inb_left, rx)) = tokio::join!(
        outbound(&link, id, r, &pumps.credit, sent, stop, out),
        inbound(&link, id, w, pumps.inbound, &pumps.buffered, &pumps.credit, received, stop, inb),
    );
    if !stop.is_set() {
        return None;
    }
    Some(Left::Remote { out: out_left, inb: inb_left, rx })
}

#[allow(clippy::too_many_arguments)]
async fn outbound(
    link: &LinkHandle,
    stream: u64,
    mut from: Reader<'_>,
    credit: &Credit,
    counter: &AtomicU64,
    stop: &Stop,
    first: Dir,
) -> (Dir, ()) {
    let mut pending = first.pending;
    let mut ended = first.ended;
    loop {
        let avail = tokio::select! {
            a = credit.available() => match a { Some(a) => a, None => return (Dir::default(), ()) },
            _ = stop.stopped() => return (Dir { pending, ended }, ()),
        };
        if !pending.is_empty() {
            // Bytes owed from before a reattach go first, within the credit like any other.
            let n = pending.len().min(avail as usize).min(STREAM_CHUNK);
            let rest = pending.split_off(n);
            let chunk = std::mem::replace(&mut pending, rest);
            credit.consume(n as u64);
            counter.fetch_add(n as u64, Ordering::Relaxed);
            if link.write_now(PeerMessage::StreamData { stream, bytes: chunk }).await.is_err() {
                return (Dir::default(), ());
            }
            continue;
        }
        if ended {
            let _ = link.write_now(PeerMessage::StreamFin { stream }).await;
            return (Dir { pending: Vec::new(), ended: true }, ());
        }
        // A fresh buffer per chunk: it goes onto the link's socket uncopied.
        let mut buf = Vec::with_capacity((avail as usize).min(STREAM_CHUNK));
        let read = tokio::select! {
            r = from.read_buf(&mut buf) => r,
            _ = credit.closed() => return (Dir::default(), ()),
            _ = stop.stopped() => return (Dir::default(), ()),
        };
        match read {
            Ok(0) | Err(_) => ended = true,
            Ok(_) => pending = buf,
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn inbound(
    link: &LinkHandle,
    stream: u64,
    mut to: Writer<'_>,
    mut rx: mpsc::UnboundedReceiver<Inbound>,
    buffered: &AtomicU64,
    credit: &Credit,
    counter: &AtomicU64,
    stop: &Stop,
    first: Dir,
) -> (Dir, mpsc::UnboundedReceiver<Inbound>) {
    // Bytes owed from before a reattach: not counted against the window (the peer never sent
    // them on this stream's credit).
    let mut pos = 0;
    while pos < first.pending.len() {
        tokio::select! {
            w = to.write(&first.pending[pos..]) => match w {
                Ok(n) if n > 0 => pos += n,
                _ => {
                    let _ = link.write_now(PeerMessage::StreamReset { stream }).await;
                    credit.close();
                    return (Dir::default(), rx);
                }
            },
            _ = stop.stopped() => return (Dir { pending: first.pending[pos..].to_vec(), ended: first.ended }, rx),
        }
    }
    if first.ended {
        let _ = to.shutdown().await;
        return (Dir { pending: Vec::new(), ended: true }, rx);
    }
    // Credit goes back in batches of a quarter window: small request/reply traffic
    // then sends no credit messages at all (each one costs both agents a wake-up).
    let mut unacknowledged: u64 = 0;
    loop {
        let msg = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => return (Dir::default(), rx) },
            _ = stop.stopped() => return (Dir::default(), rx),
        };
        match msg {
            Inbound::Data(buf, offset) => {
                let bytes = buf.get(offset..).unwrap_or_default();
                let mut pos = 0;
                while pos < bytes.len() {
                    tokio::select! {
                        w = to.write(&bytes[pos..]) => match w {
                            Ok(n) if n > 0 => pos += n,
                            _ => {
                                // The program closed its socket: abort both directions.
                                let _ = link.write_now(PeerMessage::StreamReset { stream }).await;
                                credit.close();
                                return (Dir::default(), rx);
                            }
                        },
                        _ = stop.stopped() => {
                            buffered.fetch_sub(bytes.len() as u64, Ordering::AcqRel);
                            return (Dir { pending: bytes[pos..].to_vec(), ended: false }, rx);
                        }
                    }
                }
                let n = bytes.len() as u64;
                buffered.fetch_sub(n, Ordering::AcqRel);
                counter.fetch_add(n, Ordering::Relaxed);
                unacknowledged += n;
                if unacknowledged >= CREDIT_BATCH {
                    let bytes = unacknowledged as u32;
                    unacknowledged = 0;
                    // Written in order with the stream's other messages: a credit must never arrive
                    // after the detach that ends this relay (it would count towards the next one).
                    let _ = link.write_now(PeerMessage::StreamCredit { stream, bytes }).await;
                }
            }
            Inbound::Fin => {
                let _ = to.shutdown().await;
                return (Dir { pending: Vec::new(), ended: true }, rx);
            }
            Inbound::Reset => {
                credit.close();
                return (Dir::default(), rx);
            }
        }
    }
}
