//! Which fds of a process the agents carry themselves: its agent link, its virtual listeners
//! and streams (found by the inode of the agent's end, through sock_diag), connections whose
//! other end already closed, and stdio that cannot follow. The rest is the checkpoint engine's.

use super::plan::{FdRef, Redirect};
use crate::state::Agent;
use dvk_checkpoint::sys as ck;
use pidvirt::{EndpointEntry, Vpid};
use std::collections::BTreeMap;

#[derive(Debug, Default)]
pub struct Classified {
    pub link: Option<FdRef>,
    /// stream id → (the process's fds on it, the process is the connecting side).
    pub streams: BTreeMap<u64, (Vec<FdRef>, bool)>,
    pub listeners: Vec<(EndpointEntry, Vec<FdRef>)>,
    /// Connections whose other end is gone, grouped by socket.
    pub closed: Vec<Vec<FdRef>>,
    /// Connected to a socket of this agent that no relay holds yet (a stream being set up, or a
    /// request to the agent under way): settles within moments.
    pub pending: Vec<FdRef>,
    /// Every fd the process had when it was classified, with what it was (`/proc/PID/fd` link).
    pub seen: Vec<(i32, String)>,
    /// The log an earlier move gave the process on this node (it follows the process).
    pub own_log: Option<std::path::PathBuf>,
    pub stdio: Vec<(i32, Redirect, String)>,
    /// What each carried fd is, as a user knows it.
    pub carried: Vec<String>,
}

impl Classified {
    /// Every fd the engine must leave to us.
    pub fn external(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self.link.iter().map(|l| l.fd).collect();
        v.extend(self.streams.values().flat_map(|(f, _)| f.iter().map(|r| r.fd)));
        v.extend(self.listeners.iter().flat_map(|(_, f)| f.iter().map(|r| r.fd)));
        v.extend(self.closed.iter().flatten().map(|r| r.fd));
        v.extend(self.stdio.iter().map(|(fd, _, _)| *fd));
        v.extend(self.pending.iter().map(|r| r.fd));
        v.sort_unstable();
        v
    }
}

fn fds_of(pid: i32) -> std::io::Result<Vec<(i32, String)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let e = e?;
        let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if let Ok(l) = std::fs::read_link(e.path()) {
            out.push((fd, l.to_string_lossy().into_owned()));
        }
    }
    out.sort();
    Ok(out)
}

/// " (stdout)" for fd 1, and so on; "" for other fds.
fn std_name(fd: i32) -> String {
    dvk_checkpoint::files::stdio_name(fd).map(|n| format!(" ({n})")).unwrap_or_default()
}

/// The blockers of a running process, with its fds classified: retried when the process opened
/// an fd between the classification and the engine's look (a server accepting a connection), or
/// closed one and got its number again for another file (a server that accepts, answers, closes
/// and accepts the next connection at the same fd).
pub fn preflight(agent: &Agent, vpid: Vpid, pid: i32) -> Result<(Classified, Vec<dvk_checkpoint::Error>), String> {
    for attempt in 0.. {
        let c = classify(agent, vpid, pid).map_err(|e| format!("cannot read the fds of pid {pid}: {e}"))?;
        let opts = dvk_checkpoint::DumpOptions { external_fds: c.external(), ..Default::default() };
        let blockers = dvk_checkpoint::dump::blockers(pid, &opts).map_err(|e| e.to_string())?;
        let now = fds_of(pid).unwrap_or_default();
        // Not classified, or another file now: the engine looked at an fd the classification
        // did not see.
        let changed = |fd: i32| {
            let seen = c.seen.iter().find(|(f, _)| *f == fd);
            seen.is_none() || now.iter().find(|(f, _)| *f == fd) != seen
        };
        let unseen = blockers.iter().any(|b| b.fd().is_some_and(changed));
        // A request to the agent or a stream being set up settles within moments: wait for it
        // rather than start a move whose freeze would find it still pending.
        if (!unseen && c.pending.is_empty()) || attempt >= 50 {
            return Ok((c, blockers));
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    unreachable!()
}

/// [`preflight`] of a process tree (`members`: vPID and pid of each live process, the root
/// first): each one's fds classified (every member's listeners counted as the tree's: a
/// pre-fork server's children hold the root's), then the tree's blockers, with each member's
/// agent fds left to the caller.
pub fn preflight_tree(
    agent: &Agent,
    members: &[(Vpid, i32)],
) -> Result<(Vec<Classified>, Vec<dvk_checkpoint::Error>), String> {
    let owners: Vec<Vpid> = members.iter().map(|m| m.0).collect();
    let root = members.first().ok_or("an empty tree")?.1;
    for attempt in 0.. {
        let mut all = Vec::new();
        for &(vpid, pid) in members {
            all.push(
                classify_in(agent, vpid, pid, &owners).map_err(|e| format!("cannot read the fds of pid {pid}: {e}"))?,
            );
        }
        if all.iter().any(|c| !c.pending.is_empty()) && attempt < 50 {
            std::thread::sleep(std::time::Duration::from_millis(2));
            continue;
        }
        let opts = tree_dump_options(members.iter().map(|m| m.1).zip(&all));
        let blockers = dvk_checkpoint::tree::blockers(root, &opts).map_err(|e| e.to_string())?;
        return Ok((all, blockers));
    }
    unreachable!()
}

/// The dump options of a tree whose members' agent fds (each member's pid and classification,
/// the root first) are carried by the agents.
pub fn tree_dump_options<'a>(members: impl Iterator<Item = (i32, &'a Classified)>) -> dvk_checkpoint::DumpOptions {
    let mut opts = dvk_checkpoint::DumpOptions::default();
    for (i, (pid, c)) in members.enumerate() {
        if i == 0 {
            opts.external_fds = c.external();
        } else {
            opts.member_external.insert(pid, c.external());
        }
    }
    opts
}

/// The shim keeps its agent link at the first free fd from here (shim/src/link.rs).
const SHIM_LINK_FD_MIN: i32 = 900;

/// Inodes of the sockets the agent itself holds.
fn agent_socket_inodes() -> std::collections::HashSet<u64> {
    fds_of(std::process::id() as i32)
        .unwrap_or_default()
        .iter()
        .filter_map(|(_, l)| l.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')).and_then(|s| s.parse().ok()))
        .collect()
}

/// Classifies the fds of local process `vpid` (real `pid`), without changing anything.
pub fn classify(agent: &Agent, vpid: Vpid, pid: i32) -> std::io::Result<Classified> {
    classify_in(agent, vpid, pid, &[vpid])
}

/// [`classify`], counting as the process's own the listeners of the endpoints of `owners`
/// (a process tree: a pre-fork server's children hold their parent's listener).
pub fn classify_in(agent: &Agent, vpid: Vpid, pid: i32, owners: &[Vpid]) -> std::io::Result<Classified> {
    let fds = fds_of(pid)?;
    let by_inode = agent.relays.by_inode();
    let ours = agent_socket_inodes();
    let agent_sock = agent.me.socket_path().into_os_string().into_encoded_bytes();
    let log_dir = agent.me.runtime_dir.join("logs");
    let (link_ino, listeners) = {
        let t = agent.tables.lock();
        let eps: Vec<EndpointEntry> = t.routing.endpoints().filter(|e| owners.contains(&e.vpid)).cloned().collect();
        let listeners: Vec<(EndpointEntry, Vec<Vec<u8>>)> = eps
            .into_iter()
            .map(|e| {
                let paths = t
                    .listeners
                    .get(&e.key())
                    .map(|v| v.iter().map(|l| l.path.as_os_str().as_encoded_bytes().to_vec()).collect())
                    .unwrap_or_default();
                (e, paths)
            })
            .collect();
        (t.link_inodes.get(&vpid).copied(), listeners)
    };
    let mut c = Classified { seen: fds.clone(), ..Default::default() };
    let mut closed: BTreeMap<u64, Vec<FdRef>> = BTreeMap::new();
    let mut listener_fds: BTreeMap<usize, Vec<FdRef>> = BTreeMap::new();
    for (fd, link) in &fds {
        let Some(ino) =
            link.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')).and_then(|s| s.parse::<u64>().ok())
        else {
            // The log an earlier move redirected stdout/stderr to stays with this node: the
            // process gets a log on its next node.
            if (1..=2).contains(fd) && std::path::Path::new(link).starts_with(&log_dir) {
                c.stdio.push((*fd, Redirect::Log, format!("the move log {link} of this node")));
                c.own_log = Some(link.into());
                continue;
            }
            stdio_check(&mut c, pid, *fd, link, &fds);
            continue;
        };
        let r = FdRef { fd: *fd, old_ino: ino };
        let Ok(diag) = ck::unix_diag(ino as u32) else {
            stdio_check(&mut c, pid, *fd, link, &fds);
            continue;
        };
        let peer = diag.peer as u64;
        if peer != 0 {
            if let Some((stream, client)) = by_inode.get(&peer) {
                // The agent's socket faces the process: it is the client side if the process is.
                let moving_is_client = *client;
                c.carried.push(format!("fd {fd}{}: virtual stream {stream:#x}", std_name(*fd)));
                c.streams.entry(*stream).or_insert_with(|| (Vec::new(), moving_is_client)).0.push(r);
                continue;
            }
            if Some(peer) == link_ino {
                c.carried.push(format!("fd {fd}: the dvk agent link"));
                c.link = Some(r);
                continue;
            }
            if ours.contains(&peer) {
                c.carried.push(format!("fd {fd}: a virtual stream being set up"));
                c.pending.push(r);
                continue;
            }
            // A request the shim just opened to this agent, not accepted yet: its other end
            // waits in the queue of the agent's socket (and bears its name), in no fd table.
            if ck::unix_diag(peer as u32).is_ok_and(|p| p.name.as_deref() == Some(agent_sock.as_slice())) {
                c.carried.push(format!("fd {fd}: a request to the dvk agent under way"));
                c.pending.push(r);
                continue;
            }
        }
        if diag.state == 10 {
            if let Some(name) = &diag.name {
                if let Some(i) = listeners.iter().position(|(_, paths)| paths.iter().any(|p| p == name)) {
                    let e = &listeners[i].0;
                    c.carried.push(format!("fd {fd}: virtual listener {}.{}.dvk:{}", e.name, e.dc, e.port));
                    listener_fds.entry(i).or_default().push(r);
                    continue;
                }
            }
        }
        if diag.sock_type == libc::SOCK_STREAM as u8 && diag.state != 10 && peer == 0 {
            c.carried.push(format!("fd {fd}{}: a connection whose other end closed", std_name(*fd)));
            closed.entry(ino).or_default().push(r);
            continue;
        }
        stdio_check(&mut c, pid, *fd, link, &fds);
    }
    c.closed = closed.into_values().collect();
    // After an agent restart the process's registration link is a dead connection (its other
    // end was the old agent's): the shim's link is still the one at fd >= 900, and a move must
    // give it a live one (with the Relink frame the shim reads).
    if c.link.is_none() {
        if let Some(i) = c.closed.iter().position(|refs| refs.len() == 1 && refs[0].fd >= SHIM_LINK_FD_MIN) {
            let r = c.closed.remove(i).remove(0);
            c.carried.retain(|what| !what.starts_with(&format!("fd {}:", r.fd)));
            c.carried.push(format!("fd {}: the dvk agent link (from before an agent restart)", r.fd));
            c.link = Some(r);
        }
    }
    c.listeners = listener_fds.into_iter().map(|(i, f)| (listeners[i].0.clone(), f)).collect();
    Ok(c)
}

/// stdin/stdout/stderr that cannot follow the process: a terminal, a pipe or socket whose
/// other end stays behind, a deleted file. stdin becomes /dev/null, the others a log.
fn stdio_check(c: &mut Classified, pid: i32, fd: i32, link: &str, all: &[(i32, String)]) {
    if !(0..=2).contains(&fd) {
        return;
    }
    let cannot_follow = if dvk_checkpoint::files::is_tty_path(link) {
        // A pty pair inside the process is carried by the engine; any other terminal stays.
        (!dvk_checkpoint::ttys::slave_of_own_pair(pid, link)).then(|| format!("terminal {link}"))
    } else if link.starts_with("pipe:[") {
        // Both ends inside the process are carried by the engine; otherwise the other end stays.
        let mode = |f: i32| {
            std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{f}"))
                .ok()
                .and_then(|i| i.lines().find_map(|l| l.strip_prefix("flags:").map(|v| v.trim().to_owned())))
                .and_then(|v| u32::from_str_radix(&v, 8).ok())
                .map(|flags| flags & 3)
        };
        let mine = mode(fd);
        let inside = all.iter().any(|(f, l)| l == link && *f != fd && mode(*f) != mine);
        (!inside).then(|| format!("{link}, whose other end stays behind"))
    } else if link.starts_with("socket:[") {
        Some(format!("{link}, connected to something that stays behind"))
    } else if link.ends_with(" (deleted)") {
        Some(format!("deleted file {link}"))
    } else {
        None
    };
    if let Some(what) = cannot_follow {
        let redirect = if fd == 0 { Redirect::Null } else { Redirect::Log };
        c.stdio.push((fd, redirect, what));
    }
}
