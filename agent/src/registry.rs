//! This node's processes and endpoints survive a restart of the agent: they are
//! saved in the runtime dir shortly after every change (changes within
//! [`SAVE_DELAY`] are written together, off the registration path; at shutdown
//! at once) and taken back at start-up for
//! every process that still runs (same pid *and* start time, so a reused pid is
//! never mistaken for the old process). The processes keep their vPIDs, and
//! the peers learn them again from the next `Announce`.

use crate::state::Agent;
use pidvirt::{EndpointEntry, ProcessEntry};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;

const FILE: &str = "registry.bin";
/// Changes are saved this long after the first of them, together.
pub const SAVE_DELAY: std::time::Duration = std::time::Duration::from_millis(50);
/// Bumped when the saved layout changes; an old file is then ignored (with a warning).
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Saved {
    version: u32,
    processes: Vec<SavedProcess>,
    endpoints: Vec<SavedEndpoint>,
}

#[derive(Serialize, Deserialize)]
struct SavedProcess {
    entry: ProcessEntry,
    /// Clock ticks since boot (/proc/PID/stat field 22): identifies the process across pid reuse.
    start_time: u64,
}

#[derive(Serialize, Deserialize)]
struct SavedEndpoint {
    entry: EndpointEntry,
    listeners: Vec<PathBuf>,
}

fn path(agent: &Agent) -> PathBuf {
    agent.me.runtime_dir.join(FILE)
}

/// Asks for a save soon (the saver task writes changes together).
pub fn save(agent: &Agent) {
    agent.registry_changed.notify_one();
}

/// Writes the changes `save` asked for, [`SAVE_DELAY`] after the first of them.
pub async fn saver(agent: Arc<Agent>) {
    loop {
        agent.registry_changed.notified().await;
        tokio::time::sleep(SAVE_DELAY).await;
        save_now(&agent);
    }
}

/// Saves this node's processes and endpoints now (atomically: a crash leaves the old file).
pub fn save_now(agent: &Agent) {
    let saved = {
        let t = agent.tables.lock();
        Saved {
            version: VERSION,
            processes: t
                .routing
                .local_entries()
                .filter_map(|e| {
                    let start_time = *t.start_times.get(&e.vpid)?;
                    Some(SavedProcess { entry: e.clone(), start_time })
                })
                .collect(),
            endpoints: t
                .routing
                .local_endpoints()
                .map(|e| SavedEndpoint {
                    entry: e.clone(),
                    listeners: t
                        .listeners
                        .get(&e.key())
                        .map(|v| v.iter().map(|l| l.path.clone()).collect())
                        .unwrap_or_default(),
                })
                .collect(),
        }
    };
    if let Err(e) = write(agent, &saved) {
        tracing::warn!("cannot save the registry in {}: {e}", agent.me.runtime_dir.display());
    }
}

fn write(agent: &Agent, saved: &Saved) -> std::io::Result<()> {
    let bytes = postcard::to_allocvec(saved).map_err(std::io::Error::other)?;
    let tmp = path(agent).with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(&bytes)?;
    std::fs::rename(&tmp, path(agent))
}

/// Takes back the processes and endpoints saved by a previous run of this agent.
/// Returns how many processes were recovered.
pub fn recover(agent: &Arc<Agent>) -> usize {
    let bytes = match std::fs::read(path(agent)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
        Err(e) => {
            tracing::warn!("cannot read the saved registry: {e}; starting empty");
            return 0;
        }
    };
    let saved: Saved = match postcard::from_bytes(&bytes) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("saved registry is unreadable ({e}); starting empty");
            return 0;
        }
    };
    if saved.version != VERSION {
        tracing::warn!(version = saved.version, "saved registry has another version; starting empty");
        return 0;
    }
    let me = agent.node_id();
    let mut recovered = Vec::new();
    for p in saved.processes.into_iter().filter(|p| p.entry.node == me) {
        let pid = p.entry.real_pid;
        let alive = crate::procinfo::read(pid).map(|i| i.start_time == p.start_time).unwrap_or(false);
        if !alive {
            continue;
        }
        let Ok(pidfd) = crate::sys::pidfd_open(pid) else { continue };
        {
            let mut t = agent.tables.lock();
            t.routing.upsert(p.entry.clone());
            t.start_times.insert(p.entry.vpid, p.start_time);
        }
        tokio::spawn(crate::local::watch_exit(agent.clone(), p.entry.vpid, pid, pidfd));
        tracing::info!(vpid = %p.entry.vpid, pid, "process recovered after an agent restart");
        recovered.push(p.entry.vpid);
    }
    let mut t = agent.tables.lock();
    for e in saved.endpoints.into_iter().filter(|e| recovered.contains(&e.entry.vpid)) {
        let key = e.entry.key();
        // Opened anew with the checks of `Listen`: the owner may have renamed anything over
        // the names while no agent was looking.
        let Some((uid, pid)) = t.routing.get(e.entry.vpid).map(|r| (r.entry.uid, r.entry.real_pid)) else {
            continue;
        };
        let files: Vec<_> = e
            .listeners
            .iter()
            .filter_map(|p| {
                crate::listener::ListenerFile::open(p, uid)
                    .and_then(|f| f.check_served_by(pid).map(|_| f))
                    .inspect_err(|err| tracing::warn!(endpoint = %key, "listener not recovered: {err}"))
                    .ok()
            })
            .collect();
        if files.is_empty() {
            continue;
        }
        if t.routing.upsert_endpoint(e.entry) {
            t.listeners.insert(key, files);
        }
    }
    drop(t);
    save_now(agent);
    recovered.len()
}
