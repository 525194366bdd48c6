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
//! is bounded. Half-close travels as StreamFin, abort as StreamReset. Each
//! stream counts the bytes it moved per direction (the sequence numbers a
//! migration will need).

use crate::state::{Agent, LinkHandle};
use dvk_protocol::peer::{PeerMessage, STREAM_CHUNK, STREAM_WINDOW};
use parking_lot::Mutex;
use pidvirt::NodeId;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, Notify};

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

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

impl End {
    fn split(self) -> (Reader, Writer) {
        match self {
            End::Unix(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            End::Tcp(s) => {
                let _ = s.set_nodelay(true);
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
        }
    }
}

/// Bytes moved per direction (client → server, server → client).
#[derive(Default)]
pub struct Sequence {
    pub to_server: AtomicU64,
    pub to_client: AtomicU64,
}

/// Both ends on this node: one blocking thread per direction. A relay hop then costs
/// one kernel wake-up of the thread that waits in read(), with no reactor between
/// (measured: about half the round-trip time of the same loop on tokio tasks).
pub async fn relay_local(client: End, server: End, seq: Arc<Sequence>) {
    let (Ok(client), Ok(server)) = (client.into_std(), server.into_std()) else { return };
    let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else { return };
    let up = seq.clone();
    let a = std::thread::Builder::new()
        .name("relay".into())
        .stack_size(64 * 1024)
        .spawn(move || copy_blocking(client, server2, &up.to_server));
    let b = std::thread::Builder::new()
        .name("relay".into())
        .stack_size(64 * 1024)
        .spawn(move || copy_blocking(server, client2, &seq.to_client));
    let _ = tokio::task::spawn_blocking(move || {
        if let Ok(a) = a {
            let _ = a.join();
        }
        if let Ok(b) = b {
            let _ = b.join();
        }
    })
    .await;
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

fn copy_blocking(mut from: StdEnd, mut to: StdEnd, counter: &AtomicU64) {
    use std::io::{Read, Write};
    let mut buf = vec![0u8; LOCAL_CHUNK];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if to.write_all(&buf[..n]).is_err() {
            // The reader went away: stop reading too, so the writer sees its socket close.
            return;
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
    // Half-close: the other program reads EOF, its own direction keeps working.
    to.shutdown_write();
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

/// Runs both pumps of a remote stream; removes the stream from the agent when both end.
/// `is_client_side`: the local end is the connecting program (its reads go to the server).
pub async fn relay_remote(
    agent: Arc<Agent>,
    id: u64,
    peer: NodeId,
    end: End,
    pumps: RemotePumps,
    is_client_side: bool,
) {
    let Some(link) = agent.link(peer) else {
        agent.remove_stream(id);
        return;
    };
    let (r, w) = end.split();
    let (sent, received) = if is_client_side {
        (&pumps.seq.to_server, &pumps.seq.to_client)
    } else {
        (&pumps.seq.to_client, &pumps.seq.to_server)
    };
    tokio::join!(
        outbound(&link, id, r, &pumps.credit, sent),
        inbound(&link, id, w, pumps.inbound, &pumps.buffered, &pumps.credit, received),
    );
    agent.remove_stream(id);
}

async fn outbound(link: &LinkHandle, stream: u64, mut from: Reader, credit: &Credit, counter: &AtomicU64) {
    loop {
        let Some(avail) = credit.available().await else { return };
        // A fresh buffer per chunk: it goes onto the link's socket uncopied.
        let mut buf = Vec::with_capacity((avail as usize).min(STREAM_CHUNK));
        let read = tokio::select! {
            r = from.read_buf(&mut buf) => r,
            _ = credit.closed() => return,
        };
        let n = match read {
            Ok(0) | Err(_) => {
                let _ = link.write_now(PeerMessage::StreamFin { stream }).await;
                return;
            }
            Ok(n) => n,
        };
        credit.consume(n as u64);
        counter.fetch_add(n as u64, Ordering::Relaxed);
        if link.write_now(PeerMessage::StreamData { stream, bytes: buf }).await.is_err() {
            return;
        }
    }
}

async fn inbound(
    link: &LinkHandle,
    stream: u64,
    mut to: Writer,
    mut rx: mpsc::UnboundedReceiver<Inbound>,
    buffered: &AtomicU64,
    credit: &Credit,
    counter: &AtomicU64,
) {
    // Credit goes back in batches of a quarter window: small request/reply traffic
    // then sends no credit messages at all (each one costs both agents a wake-up).
    let mut unacknowledged: u64 = 0;
    while let Some(msg) = rx.recv().await {
        match msg {
            Inbound::Data(buf, offset) => {
                let bytes = buf.get(offset..).unwrap_or_default();
                if to.write_all(bytes).await.is_err() {
                    // The program closed its socket: abort both directions.
                    let _ = link.tx.send(PeerMessage::StreamReset { stream }).await;
                    credit.close();
                    return;
                }
                let n = bytes.len() as u64;
                buffered.fetch_sub(n, Ordering::AcqRel);
                counter.fetch_add(n, Ordering::Relaxed);
                unacknowledged += n;
                if unacknowledged >= CREDIT_BATCH {
                    let bytes = unacknowledged as u32;
                    unacknowledged = 0;
                    let _ = link.tx.send(PeerMessage::StreamCredit { stream, bytes }).await;
                }
            }
            Inbound::Fin => {
                let _ = to.shutdown().await;
                return;
            }
            Inbound::Reset => {
                credit.close();
                return;
            }
        }
    }
}
