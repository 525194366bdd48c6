//! Peer links: one authenticated TCP connection per pair of nodes. The node
//! with the lower id dials (and redials with backoff); the higher one accepts.
//! The handshake is drawn in `dvk_protocol::peer`.

use crate::state::Agent;
use dvk_protocol::auth::{Role, Transcript};
use dvk_protocol::frame::{self, FrameError, HEADER_LEN, PEER_MAX_FRAME};
use dvk_protocol::peer::{stream_data, Nonce, PeerMessage, PEER_PROTOCOL_VERSION};
use pidvirt::NodeId;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// The whole handshake must finish within this, or the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshake frames are tiny; anything larger is garbage.
const HANDSHAKE_MAX_FRAME: usize = 256;
const PING_EVERY: Duration = Duration::from_secs(1);
/// A link that has carried nothing (not even a Pong) for this long is dead.
const SILENCE_LIMIT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const LINK_QUEUE: usize = 4096;
/// Read and write buffer of a peer link: small frames are batched into one syscall;
/// stream payloads, larger than this, bypass it.
const LINK_BUFFER: usize = 64 * 1024;

async fn read_msg<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<PeerMessage, FrameError> {
    frame::decode(&read_body(r, max).await?)
}

/// Reads one frame and returns its body.
async fn read_body<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    r.read_exact(&mut header).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Closed
        } else {
            e.into()
        }
    })?;
    let len = frame::body_len(header, max)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(body)
}

/// Writes one message; stream payloads take the zero-copy path.
pub(crate) async fn write_any<W: AsyncWrite + Unpin>(w: &mut W, msg: PeerMessage) -> Result<(), FrameError> {
    match msg {
        PeerMessage::StreamData { stream, bytes } => {
            let mut prefix = [0u8; stream_data::MAX_PREFIX];
            let n = stream_data::prefix(stream, bytes.len(), &mut prefix);
            w.write_all(&prefix[..n]).await?;
            w.write_all(&bytes).await?;
            Ok(())
        }
        other => write_msg(w, &other).await,
    }
}

async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, msg: &PeerMessage) -> Result<(), FrameError> {
    w.write_all(&frame::encode(msg, PEER_MAX_FRAME)?).await?;
    Ok(())
}

fn nonce() -> Nonce {
    let mut n = [0u8; 32];
    getrandom::getrandom(&mut n).expect("the kernel's random source is available");
    n
}

#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("protocol violation: expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("peer speaks protocol version {0}, we speak {PEER_PROTOCOL_VERSION}")]
    Version(u16),
    #[error("node id {0} is not in the cluster config (or should not dial us)")]
    UnknownNode(NodeId),
    #[error("authentication failed: the peer does not hold the cluster key")]
    BadProof,
    #[error("timed out")]
    Timeout,
}

fn unexpected(expected: &'static str, got: &PeerMessage) -> HandshakeError {
    let name = format!("{got:?}");
    HandshakeError::Unexpected { expected, got: name.split([' ', '{', '(']).next().unwrap_or("?").to_owned() }
}

/// Dialer side; returns the authenticated stream.
async fn dial_handshake(agent: &Agent, peer: NodeId, stream: &mut TcpStream) -> Result<(), HandshakeError> {
    let me = agent.node_id();
    let dialer_nonce = nonce();
    write_msg(stream, &PeerMessage::Hello { version: PEER_PROTOCOL_VERSION, node: me, nonce: dialer_nonce }).await?;
    let acceptor_nonce = match read_msg(stream, HANDSHAKE_MAX_FRAME).await? {
        PeerMessage::Challenge { node, nonce } if node == peer => nonce,
        PeerMessage::Challenge { node, .. } => return Err(HandshakeError::UnknownNode(node)),
        other => return Err(unexpected("Challenge", &other)),
    };
    let t = Transcript { dialer: me, acceptor: peer, dialer_nonce, acceptor_nonce };
    write_msg(stream, &PeerMessage::Proof { mac: t.prove(&agent.key, Role::Dialer) }).await?;
    match read_msg(stream, HANDSHAKE_MAX_FRAME).await? {
        PeerMessage::Accepted { mac } if t.verify(&agent.key, Role::Acceptor, &mac) => Ok(()),
        PeerMessage::Accepted { .. } => Err(HandshakeError::BadProof),
        other => Err(unexpected("Accepted", &other)),
    }
}

/// Acceptor side; returns the authenticated peer's id.
async fn accept_handshake(agent: &Agent, stream: &mut TcpStream) -> Result<NodeId, HandshakeError> {
    let me = agent.node_id();
    let (peer, dialer_nonce) = match read_msg(stream, HANDSHAKE_MAX_FRAME).await? {
        PeerMessage::Hello { version, .. } if version != PEER_PROTOCOL_VERSION => {
            return Err(HandshakeError::Version(version))
        }
        PeerMessage::Hello { node, nonce, .. } => (node, nonce),
        other => return Err(unexpected("Hello", &other)),
    };
    if agent.config.node_by_id(peer.0).is_none() || peer >= me {
        return Err(HandshakeError::UnknownNode(peer));
    }
    let acceptor_nonce = nonce();
    write_msg(stream, &PeerMessage::Challenge { node: me, nonce: acceptor_nonce }).await?;
    let t = Transcript { dialer: peer, acceptor: me, dialer_nonce, acceptor_nonce };
    match read_msg(stream, HANDSHAKE_MAX_FRAME).await? {
        PeerMessage::Proof { mac } if t.verify(&agent.key, Role::Dialer, &mac) => {}
        PeerMessage::Proof { .. } => return Err(HandshakeError::BadProof),
        other => return Err(unexpected("Proof", &other)),
    }
    write_msg(stream, &PeerMessage::Accepted { mac: t.prove(&agent.key, Role::Acceptor) }).await?;
    Ok(peer)
}

async fn with_timeout<T>(f: impl std::future::Future<Output = Result<T, HandshakeError>>) -> Result<T, HandshakeError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, f).await.unwrap_or(Err(HandshakeError::Timeout))
}

pub async fn accept_loop(agent: Arc<Agent>, listener: TcpListener) {
    let limits = crate::limits::get();
    loop {
        let (mut stream, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                crate::ratelog::warn(&crate::ratelog::ACCEPT, format_args!("peer accept failed: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Anyone who reaches the port gets here before proving anything: at most so many such
        // connections at once (each for at most HANDSHAKE_TIMEOUT), so keyless floods cannot
        // take the fds the agent needs. A real peer refused now redials with backoff.
        let Ok(permit) = limits.handshakes.clone().try_acquire_owned() else {
            crate::ratelog::warn(
                &crate::ratelog::PEER_CAP,
                format_args!("{} peer handshakes already in flight; refusing {addr}", limits.handshakes_max),
            );
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let shaken = with_timeout(accept_handshake(&agent, &mut stream)).await;
            drop(permit);
            match shaken {
                Ok(peer) => {
                    tracing::info!(peer = %agent.node_name(peer), %addr, "peer link up (accepted, authenticated)");
                    run_link(agent, peer, stream).await;
                }
                Err(HandshakeError::BadProof) => crate::ratelog::warn(
                    &crate::ratelog::KEYLESS_PEER,
                    format_args!("refused peer: it does not hold the cluster key ({addr})"),
                ),
                Err(e) => crate::ratelog::warn(
                    &crate::ratelog::BAD_PEER,
                    format_args!("refused peer connection from {addr}: {e}"),
                ),
            }
        });
    }
}

/// Keeps a link to `peer` up for as long as the agent runs.
pub async fn dial_loop(agent: Arc<Agent>, peer: NodeId, addr: SocketAddr) {
    let name = agent.node_name(peer);
    let mut backoff = BACKOFF_MIN;
    let mut logged_down = false;
    loop {
        let attempt = async {
            let mut stream = TcpStream::connect(addr).await.map_err(|e| HandshakeError::Frame(e.into()))?;
            dial_handshake(&agent, peer, &mut stream).await?;
            Ok(stream)
        };
        match with_timeout(attempt).await {
            Ok(stream) => {
                tracing::info!(peer = %name, %addr, "peer link up (dialed, authenticated)");
                backoff = BACKOFF_MIN;
                logged_down = false;
                run_link(agent.clone(), peer, stream).await;
                tracing::warn!(peer = %name, "peer link down; reconnecting");
            }
            Err(e) => {
                if !logged_down {
                    tracing::warn!(peer = %name, %addr, "cannot link to peer: {e}; retrying with backoff");
                    logged_down = true;
                } else {
                    tracing::debug!(peer = %name, "still cannot link: {e}");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Runs an authenticated link until it fails; cleans up after it.
async fn run_link(agent: Arc<Agent>, peer: NodeId, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (mut reader, writer) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<PeerMessage>(LINK_QUEUE);
    // Announce our processes first: queued before the link is visible to broadcasts,
    // so the peer never sees an update before the full list.
    let _ = tx.try_send(agent.announcement());

    let out = Arc::new(tokio::sync::Mutex::new(tokio::io::BufWriter::with_capacity(LINK_BUFFER, writer)));
    let cut = Arc::new(tokio::sync::Notify::new());
    let link_id = agent.link_up(peer, crate::state::LinkHandle { tx: tx.clone(), out: out.clone(), cut: cut.clone() });
    crate::moving::on_link(&agent, peer, true);
    let writer_task = tokio::spawn(async move {
        // Small messages are batched in the buffer; stream payloads (larger than it)
        // go straight from their own buffer to the socket.
        while let Some(msg) = rx.recv().await {
            let mut w = out.lock().await;
            if write_any(&mut *w, msg).await.is_err() {
                return;
            }
            // Whatever else is queued goes out in the same write.
            while let Ok(msg) = rx.try_recv() {
                if write_any(&mut *w, msg).await.is_err() {
                    return;
                }
            }
            if w.flush().await.is_err() {
                return;
            }
        }
    });
    let pinger = {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PING_EVERY).await;
                if tx.send(PeerMessage::Ping).await.is_err() {
                    break;
                }
            }
        })
    };
    drop(tx);

    let name = agent.node_name(peer);
    let mut buffered = tokio::io::BufReader::with_capacity(LINK_BUFFER, &mut reader);
    loop {
        let read = tokio::select! {
            r = tokio::time::timeout(SILENCE_LIMIT, read_body(&mut buffered, PEER_MAX_FRAME)) => r,
            _ = cut.notified() => {
                tracing::warn!(peer = %name, "link cut on purpose");
                break;
            }
        };
        let body = match read {
            Err(_) => {
                tracing::warn!(peer = %name, "peer silent for {SILENCE_LIMIT:?}; closing the link");
                break;
            }
            Ok(Err(FrameError::Closed)) => break,
            Ok(Err(e)) => {
                tracing::warn!(peer = %name, "bad frame on the peer link, closing it: {e}");
                break;
            }
            Ok(Ok(body)) => body,
        };
        agent.touch(peer);
        // Stream payloads are handed on inside the received buffer, without decoding.
        if let Some((stream, offset)) = stream_data::parse(&body) {
            stream_payload(&agent, peer, stream, body, offset);
            continue;
        }
        // Image bytes of a move are written from the received buffer, without decoding.
        if let Some((mid, file, offset, at)) = dvk_protocol::peer::move_image::parse(&body) {
            crate::moving::participant::receive_image(&agent, peer, mid, file, offset, &body[at..]);
            continue;
        }
        let msg = match frame::decode(&body) {
            Ok(msg) => msg,
            Err(e) => {
                tracing::warn!(peer = %name, "bad frame on the peer link, closing it: {e}");
                break;
            }
        };
        // A reattach waits for a detach of the same stream still under way (same link order).
        crate::moving::before_message(&agent, &msg).await;
        if !handle(&agent, peer, msg) {
            tracing::warn!(peer = %name, "protocol violation on the peer link; closing it");
            break;
        }
    }
    pinger.abort();
    writer_task.abort();
    agent.link_down(peer, link_id);
    crate::moving::on_link(&agent, peer, false);
}

/// Stream bytes from `peer`: `buf[offset..]` goes to the stream's inbound pump.
fn stream_payload(agent: &Arc<Agent>, peer: NodeId, stream: u64, buf: Vec<u8>, offset: usize) {
    let overrun = match agent.streams.lock().get(&stream) {
        Some(s) if s.peer == peer => !s.deliver(buf, offset),
        _ => {
            agent.send_to(peer, PeerMessage::StreamReset { stream });
            false
        }
    };
    if overrun {
        tracing::warn!(peer = %agent.node_name(peer), stream, "peer overran the stream window; resetting the stream");
        if let Some(s) = agent.streams.lock().remove(&stream) {
            s.reset();
        }
        agent.send_to(peer, PeerMessage::StreamReset { stream });
    }
}

/// Handles one message from an authenticated peer; false closes the link.
fn handle(agent: &Arc<Agent>, peer: NodeId, msg: PeerMessage) -> bool {
    match msg {
        PeerMessage::Ping => {
            agent.send_to(peer, PeerMessage::Pong);
        }
        PeerMessage::Pong => {}
        PeerMessage::Announce { processes, endpoints } => agent.apply_announce(peer, processes, endpoints),
        PeerMessage::EndpointUp(entry) => agent.apply_endpoint_up(peer, entry),
        PeerMessage::EndpointDown(key) => agent.apply_endpoint_down(peer, key),
        PeerMessage::StreamOpen { stream, endpoint, client, server } => {
            crate::endpoints::accept_remote_stream(agent, peer, stream, endpoint, client, server)
        }
        PeerMessage::StreamData { stream, bytes } => stream_payload(agent, peer, stream, bytes, 0),
        PeerMessage::StreamCredit { stream, bytes } => {
            if let Some(s) = agent.streams.lock().get(&stream).filter(|s| s.peer == peer) {
                s.grant(bytes as u64);
            }
        }
        PeerMessage::StreamFin { stream } => {
            if let Some(s) = agent.streams.lock().get(&stream).filter(|s| s.peer == peer) {
                s.finish();
            }
        }
        PeerMessage::StreamReset { stream } => {
            let mut streams = agent.streams.lock();
            if streams.get(&stream).is_some_and(|s| s.peer == peer) {
                if let Some(s) = streams.remove(&stream) {
                    s.reset();
                }
            }
        }
        PeerMessage::ProcessUp(entry) => agent.apply_process_up(peer, entry),
        PeerMessage::ProcessDown { vpid } => agent.apply_process_down(peer, vpid),
        PeerMessage::Signal { request, vpid, signal, group, sender_uid } => {
            let errno = agent.signal_local(vpid, signal, group, sender_uid);
            tracing::info!(peer = %agent.node_name(peer), %vpid, signal, errno, "relayed signal");
            agent.send_to(peer, PeerMessage::SignalDone { request, errno });
        }
        PeerMessage::SignalDone { request, errno } => agent.complete_signal(request, errno),
        PeerMessage::Move(m) => crate::moving::on_message(agent, peer, m),
        PeerMessage::MoveImage { mid, file, offset, bytes } => {
            crate::moving::participant::receive_image(agent, peer, mid, &file, offset, &bytes);
        }
        PeerMessage::MoveImageLz4 { mid, file, offset, raw_len, bytes } => {
            let raw_len = raw_len as usize;
            let raw = (raw_len <= dvk_protocol::peer::MAX_IMAGE_CHUNK)
                .then(|| lz4_flex::block::decompress(&bytes, raw_len).ok())
                .flatten()
                .filter(|raw| raw.len() == raw_len);
            match raw {
                Some(raw) => {
                    crate::moving::participant::receive_image(agent, peer, mid, &file, offset, &raw);
                }
                None => crate::moving::participant::image_lost(agent, peer, mid, "a corrupt compressed image chunk"),
            }
        }
        PeerMessage::MoveImageSize { mid, file, len } => {
            crate::moving::participant::image_size(agent, peer, mid, &file, len);
        }
        PeerMessage::MoveRsyncOpen { mid } => crate::moving::rsync::open(agent, peer, mid),
        PeerMessage::MoveRsyncData { mid, bytes } => crate::moving::rsync::on_data(agent, peer, mid, bytes),
        PeerMessage::MoveRsyncCredit { mid, bytes } => crate::moving::rsync::on_credit(agent, peer, mid, bytes),
        PeerMessage::MoveRsyncEnd { mid, why } => crate::moving::rsync::on_end(agent, peer, mid, why),
        PeerMessage::MoveForward { request, vpid, dest, uid, options, group } => {
            crate::moving::serve_forwarded(agent, peer, request, vpid, group, dest, uid, options)
        }
        PeerMessage::MoveForwardEvent { request, event } => crate::moving::forwarded_event(agent, peer, request, event),
        PeerMessage::LogRead { request, vpid, offset, uid } => {
            let response = crate::moving::read_log(agent, vpid, offset, uid);
            agent.send_to(peer, PeerMessage::LogChunk { request, response });
        }
        PeerMessage::LogChunk { request, response } => {
            if let Some(tx) = agent.moves.log_reads.lock().remove(&request) {
                let _ = tx.send(response);
            }
        }
        PeerMessage::Reserved
        | PeerMessage::Hello { .. }
        | PeerMessage::Challenge { .. }
        | PeerMessage::Proof { .. }
        | PeerMessage::Accepted { .. } => return false,
    }
    true
}
