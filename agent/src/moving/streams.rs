//! Detaching and reattaching the two halves of a moving process's streams (docs/MOVE.md).
//!
//! The *fixed* end (the other party's socket) is held by its agent between the detach and the
//! reattach, with what it owes in each direction; the *moving* end is rebuilt by whoever holds
//! the process next (the destination on commit, the source on rollback) and reattached to it.

use crate::relay::{self, Detached, Dir, End, HeldEnd, Left};
use crate::state::Agent;
use dvk_move::{MoveMsg, MoveTag};
use dvk_protocol::peer::PeerMessage;
use pidvirt::NodeId;
use std::sync::Arc;
use std::time::Instant;

/// A fixed end waiting for the moving end's new holder.
pub struct HeldFixed {
    pub tag: MoveTag,
    pub end: HeldEnd,
    /// Received from the moving side, not yet written to the fixed socket (+ FIN).
    pub to_fixed: Dir,
    /// Read from the fixed socket, not yet sent to the moving side (+ EOF seen).
    pub from_fixed: Dir,
    pub since: Instant,
}

/// Reads what a frozen process wrote into its socket that the agent had not read: the tail.
pub fn read_tail(end: &HeldEnd) -> Dir {
    let mut out = Dir::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match crate::sys::recv_now(&*end.fd, &mut buf) {
            Ok(0) => {
                out.ended = true;
                return out;
            }
            Ok(n) => out.pending.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return out,
        }
    }
}

/// `StreamDetach` on the node of a fixed end: stop its relay and hold the end. The relay's
/// inbound queue is drained at once: the moving side sent its last data before asking.
pub async fn detach_fixed(agent: &Arc<Agent>, tag: MoveTag, stream: u64) -> bool {
    let Some(d) = agent.relays.detach(stream).await else {
        return false;
    };
    let Detached { ends, left, .. } = d;
    let Left::Remote { out, mut inb, mut rx, .. } = left else {
        return false;
    };
    let reset = relay::drain_inbound(&mut rx, &mut inb);
    agent.remove_stream(stream);
    if reset {
        return false;
    }
    let Some(end) = ends.into_iter().next() else { return false };
    agent
        .moves
        .held
        .lock()
        .insert(stream, HeldFixed { tag, end, to_fixed: inb, from_fixed: out, since: Instant::now() });
    true
}

/// `StreamReattach` from `from`: the moving end now lives there; resume our fixed end towards it.
/// Runs in the link reader, before the data that follows on the same link.
pub fn reattach_fixed_remote(agent: &Arc<Agent>, from: NodeId, tag: MoveTag, stream: u64) {
    let held = {
        let mut h = agent.moves.held.lock();
        match h.get(&stream) {
            Some(f) if f.tag == tag => h.remove(&stream),
            _ => None,
        }
    };
    let Some(f) = held else {
        tracing::info!(stream, %tag, "reattach of a stream no longer held here; resetting it");
        agent.send_to(from, PeerMessage::StreamReset { stream });
        return;
    };
    let Ok(end) = End::from_held(&f.end) else {
        agent.send_to(from, PeerMessage::StreamReset { stream });
        return;
    };
    let (rs, pumps) = relay::remote_stream(from);
    agent.streams.lock().insert(stream, rs);
    relay::spawn_remote(agent, stream, from, end, pumps, f.end.client, f.from_fixed, f.to_fixed);
}

/// Where the moving end lives now: reattach it to its fixed end. `end` is the agent's side of
/// the process's (new or original) socket; `to_program` and `to_fixed` are owed first.
#[allow(clippy::too_many_arguments)]
pub async fn reattach_moving(
    agent: &Arc<Agent>,
    tag: MoveTag,
    stream: u64,
    end: End,
    moving_is_client: bool,
    fixed_node: NodeId,
    to_program: Dir,
    to_fixed: Dir,
) {
    if fixed_node == agent.node_id() {
        let held = agent.moves.held.lock().remove(&stream);
        let Some(f) = held else {
            tracing::info!(stream, "the other end of the stream closed during the move");
            finish_alone(end, to_program);
            return;
        };
        let Ok(fixed) = End::from_held(&f.end) else { return };
        let mut toward_fixed = f.to_fixed;
        toward_fixed.append(to_fixed);
        let mut toward_moving = to_program;
        toward_moving.append(f.from_fixed);
        if moving_is_client {
            relay::spawn_local(agent, stream, end, fixed, toward_fixed, toward_moving);
        } else {
            relay::spawn_local(agent, stream, fixed, end, toward_moving, toward_fixed);
        }
        return;
    }
    let (rs, pumps) = relay::remote_stream(fixed_node);
    agent.streams.lock().insert(stream, rs);
    let sent = match agent.link(fixed_node) {
        Some(link) => link.write_now(PeerMessage::Move(MoveMsg::StreamReattach { tag, stream })).await.is_ok(),
        None => false,
    };
    if !sent {
        agent.remove_stream(stream);
        finish_alone(end, to_program);
        return;
    }
    relay::spawn_remote(agent, stream, fixed_node, end, pumps, moving_is_client, to_fixed, to_program);
}

/// The other end is gone: the program still gets what was owed to it, then EOF.
pub fn finish_alone(end: End, to_program: Dir) {
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        if let End::Unix(mut s) = end {
            let _ = s.write_all(&to_program.pending).await;
            let _ = s.shutdown().await;
        }
    });
}

/// Drops fixed ends nobody reattached within `max_age` (their move's source died).
pub fn expire_held(agent: &Agent, max_age: std::time::Duration) {
    agent.moves.held.lock().retain(|stream, f| {
        let keep = f.since.elapsed() < max_age;
        if !keep {
            tracing::warn!(stream, tag = %f.tag, "nobody reattached this stream after its move; closing it");
        }
        keep
    });
}
