//! `migrate-cli check [<pid|vpid> [<node>]]`: can this machine dump and restore processes, and
//! can this process be moved — without freezing anything (like `criu check`). Also the
//! pid/vPID resolution shared by `dump`, `check` (and `move`).

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail};
use dvk_checkpoint::{DumpOptions, FdClass, FdDescription};
use dvk_protocol::local::{LocalRequest, LocalResponse};
use pidvirt::{EndpointState, Vpid};
use serde_json::json;

use crate::agent_client::Target;

/// `println!` that ignores a closed pipe (`migrate-cli check … | head -1`).
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

#[derive(clap::Args, Debug, Clone)]
pub struct CheckArgs {
    /// Process to check (a real pid of this machine, or a vPID); without it only this machine
    /// is checked.
    #[arg(value_name = "PID|VPID")]
    pub target: Option<String>,
    /// Destination node: must exist in the cluster configuration.
    #[arg(value_name = "NODE", requires = "target")]
    pub dest: Option<String>,
    /// An fd the caller carries itself (not judged); repeatable.
    #[arg(long = "external", value_name = "FD")]
    pub external: Vec<i32>,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// A process named on the command line, found on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedPid {
    /// Real pid on this node.
    pub pid: i32,
    /// Its vPID when it is registered with this node's agent.
    pub vpid: Option<Vpid>,
}

/// Parses a pid or vPID argument. A vPID (`>= 2^22`, [`Vpid::is_virtual`]) is looked up with
/// the agent (`ListProcesses`): it must run on this node, else the error says where to run
/// the command. For a real pid the agent is asked (best effort) for its vPID.
pub fn resolve_target(target: &Target, arg: &str) -> anyhow::Result<ResolvedPid> {
    let n = parse_pid(arg)?;
    if !Vpid::is_virtual(n) {
        let vpid = local_rows(target).ok().and_then(|(rows, me)| {
            rows.iter().find(|r| r.entry.real_pid == n && r.entry.node == me).map(|r| r.entry.vpid)
        });
        return Ok(ResolvedPid { pid: n, vpid });
    }
    let (rows, me) = local_rows(target)?;
    let Some(r) = rows.iter().find(|r| r.entry.vpid.0 == n) else {
        bail!(
            "vPID {n} is not registered in the cluster (as {} sees it; `migrate-cli ps` lists them)",
            target.describe
        );
    };
    if let EndpointState::Migrating { .. } = r.state {
        bail!("vPID {n} is being moved right now; try again when `migrate-cli ps` shows it settled");
    }
    if r.entry.node != me {
        bail!("vPID {n} runs on {} (pid {} there); run this on {}", r.node_name, r.entry.real_pid, r.node_name);
    }
    Ok(ResolvedPid { pid: r.entry.real_pid, vpid: Some(r.entry.vpid) })
}

/// A pid or vPID argument for commands that work without an agent (`dump`): the agent (through
/// `target`, called only then) is needed for a vPID only.
pub fn resolve_pid_arg(arg: &str, target: &dyn Fn() -> anyhow::Result<Target>) -> anyhow::Result<ResolvedPid> {
    let n = parse_pid(arg)?;
    if Vpid::is_virtual(n) {
        let t = target().map_err(|e| anyhow!("{arg} is a vPID, resolving it needs the agent: {e:#}"))?;
        resolve_target(&t, arg)
    } else {
        Ok(ResolvedPid { pid: n, vpid: None })
    }
}

fn parse_pid(arg: &str) -> anyhow::Result<i32> {
    match arg.trim().parse::<i32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => bail!("`{arg}` is not a pid or vPID (a positive number; vPIDs are >= {})", pidvirt::VPID_BASE),
    }
}

/// Every registered process, and the id of the node whose agent answered.
fn local_rows(target: &Target) -> anyhow::Result<(Vec<dvk_protocol::local::ProcessRow>, pidvirt::NodeId)> {
    let LocalResponse::Nodes(nodes) = target.request(&LocalRequest::ListNodes)? else {
        bail!("{} answered `nodes` with something else", target.describe);
    };
    let me = nodes
        .iter()
        .find(|n| n.is_self)
        .map(|n| n.id)
        .ok_or_else(|| anyhow!("{} did not say which node it is", target.describe))?;
    let LocalResponse::Processes(rows) = target.request(&LocalRequest::ListProcesses)? else {
        bail!("{} answered `ps` with something else", target.describe);
    };
    Ok((rows, me))
}

/// fds at or above this that are AF_UNIX sockets are the shim's agent link.
const LINK_FD_MIN: i32 = 900;

/// What the dvk agent carries itself during a move (approximation until the agent's own view is
/// passed in): the shim's link (AF_UNIX at fd >= 900), and AF_UNIX sockets bound or connected
/// under the agent's runtime dir (virtual listeners in its `ep` dir, connections to its socket).
pub fn agent_handled(d: &FdDescription, runtime_dir: Option<&Path>) -> Option<&'static str> {
    let FdClass::UnixSocket { path, peer_path, listening, .. } = &d.class else { return None };
    if d.fd >= LINK_FD_MIN {
        return Some("the dvk agent link");
    }
    let under = |p: &Option<Vec<u8>>| matches!((p, runtime_dir), (Some(p), Some(dir)) if Path::new(std::ffi::OsStr::from_bytes(p)).starts_with(dir));
    if under(path) {
        return Some(if *listening { "a virtual listener" } else { "a virtual connection (accepted)" });
    }
    if under(peer_path) {
        return Some("a virtual socket to the agent");
    }
    None
}

/// The verdict on one process.
struct ProcessReport {
    pid: i32,
    vpid: Option<Vpid>,
    comm: String,
    /// (fd, what it is, why the agent carries it)
    agent: Vec<(i32, String, &'static str)>,
    /// (fd, what ties it outside)
    redirected: Vec<(i32, String)>,
    blockers: Vec<dvk_checkpoint::Error>,
}

fn check_process(
    resolved: &ResolvedPid,
    runtime_dir: Option<&Path>,
    external: &[i32],
) -> anyhow::Result<ProcessReport> {
    let pid = resolved.pid;
    let ds = dvk_checkpoint::describe_fds(pid)?;
    let mut ext: Vec<i32> = external.to_vec();
    let mut agent = Vec::new();
    for d in &ds {
        if let Some(why) = agent_handled(d, runtime_dir) {
            agent.push((d.fd, d.to_string(), why));
            ext.push(d.fd);
        }
    }
    let mut redirected = Vec::new();
    for d in &ds {
        if d.fd > 2 || ext.contains(&d.fd) {
            continue;
        }
        if let Some(tie) = d.outside_tie(&ds) {
            redirected.push((d.fd, tie));
            ext.push(d.fd);
        }
    }
    let blockers = dvk_checkpoint::blockers(pid, &DumpOptions { external_fds: ext, ..Default::default() })?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim_end().to_string();
    Ok(ProcessReport { pid, vpid: resolved.vpid, comm, agent, redirected, blockers })
}

/// The destination: known in the config, up as the local agent sees it, not this node.
fn check_dest(config: &Path, dest: &str, target: Option<&Target>, registered: bool) -> anyhow::Result<Vec<String>> {
    let cfg = dvk_config::Config::load(config)?;
    cfg.node(dest)?; // "no node named `x` (known: …)"
    let mut problems = Vec::new();
    let Some(t) = target else {
        problems.push(format!("no agent to move it with (cannot find this node's agent in {})", config.display()));
        return Ok(problems);
    };
    match t.request(&LocalRequest::ListNodes) {
        Ok(LocalResponse::Nodes(nodes)) => match nodes.iter().find(|n| n.name == dest) {
            Some(n) if n.is_self && registered => problems.push(format!("the process already runs on {dest}")),
            Some(n) if !n.up => problems.push(format!(
                "{dest} is down as {} sees it (last contact: {})",
                t.describe,
                n.last_contact_ms.map_or("never".to_string(), |ms| format!("{:.1}s ago", ms as f64 / 1000.0))
            )),
            Some(_) => {}
            None => problems.push(format!("{} does not know {dest} (its configuration differs?)", t.describe)),
        },
        Ok(_) => problems.push(format!("{} answered `nodes` with something else", t.describe)),
        Err(e) => problems.push(format!("{e:#}")),
    }
    if !registered {
        problems.push(
            "the process is not registered with the dvk agent (not started under the dvk shim): only dvk processes \
             are moved"
                .into(),
        );
    }
    Ok(problems)
}

/// Runs the checks and prints them; Ok(true) when everything is fine (exit 0), Ok(false) when a
/// check failed or something blocks the move (exit 1).
pub fn run(args: &CheckArgs, config: &Path, target: &dyn Fn() -> anyhow::Result<Target>) -> anyhow::Result<bool> {
    let host = dvk_checkpoint::host::checks();
    let host_ok = host.iter().all(|c| c.ok);
    let Some(arg) = &args.target else {
        if args.json {
            out!("{}", json!({"ok": host_ok, "machine": host_json(&host)}));
        } else {
            print_host(&host);
            let failed = host.iter().filter(|c| !c.ok).count();
            if failed == 0 {
                out!("all checks passed");
            } else {
                out!("{failed} check{} failed", if failed == 1 { "" } else { "s" });
            }
        }
        return Ok(host_ok);
    };
    // A vPID needs the agent; for a real pid it is only asked what it would carry itself.
    let n = parse_pid(arg)?;
    let agent = if Vpid::is_virtual(n) {
        Some(target().map_err(|e| anyhow!("{arg} is a vPID, resolving it needs the agent: {e:#}"))?)
    } else {
        target().ok()
    };
    let resolved = match &agent {
        Some(t) => resolve_target(t, arg)?,
        None => ResolvedPid { pid: n, vpid: None },
    };
    // A registered process: the agent's own view, the very classification `move` uses.
    if let (Some(t), Some(vpid), true) = (&agent, resolved.vpid, args.external.is_empty()) {
        let asked = t.request(&LocalRequest::MoveCheck { target: vpid.0, dest: args.dest.clone() });
        if let Ok(LocalResponse::MoveChecked(c)) = asked {
            return Ok(print_agent_check(&host, &c, args.json) && host_ok);
        }
    }
    let runtime_dir: Option<PathBuf> = agent.as_ref().and_then(|t| t.socket.parent().map(Path::to_path_buf));
    let p = check_process(&resolved, runtime_dir.as_deref(), &args.external)?;
    let dest = match &args.dest {
        Some(d) => Some((d.clone(), check_dest(config, d, agent.as_ref(), resolved.vpid.is_some())?)),
        None => None,
    };
    let ready = p.blockers.is_empty() && !matches!(&dest, Some((_, v)) if !v.is_empty());
    if args.json {
        let v = json!({
            "ok": host_ok && ready,
            "machine": host_json(&host),
            "process": {
                "pid": p.pid,
                "vpid": p.vpid.map(|v| v.0),
                "comm": p.comm,
                "ready": p.blockers.is_empty(),
                "blockers": p.blockers.iter().map(|e| json!({"fd": e.fd(), "message": e.to_string()})).collect::<Vec<_>>(),
                "redirected": p.redirected.iter().map(|(fd, what)| json!({
                    "fd": fd, "name": dvk_checkpoint::files::stdio_name(*fd), "what": what,
                })).collect::<Vec<_>>(),
                "agent_fds": p.agent.iter().map(|(fd, what, why)| json!({"fd": fd, "what": what, "as": why})).collect::<Vec<_>>(),
                "external": args.external,
            },
            "destination": dest.as_ref().map(|(d, problems)| json!({"node": d, "ok": problems.is_empty(), "problems": problems})),
        });
        out!("{v}");
        return Ok(host_ok && ready);
    }
    print_host(&host);
    match p.vpid {
        Some(v) => out!("process {} ({}), vPID {}:", p.pid, p.comm, v),
        None => out!("process {} ({}):", p.pid, p.comm),
    }
    if agent.is_none() {
        out!("  (no dvk agent found: sockets to an agent are not recognized)");
    }
    for (_, what, why) in &p.agent {
        out!("  {what} — {why}, carried by the agent");
    }
    for &fd in &args.external {
        out!("  fd {fd} — left to the caller (--external)");
    }
    for (fd, what) in &p.redirected {
        let name = dvk_checkpoint::files::stdio_name(*fd).unwrap_or("stdio");
        out!("  fd {fd} ({name}): {what} — will be redirected");
    }
    for b in &p.blockers {
        out!("  BLOCKER {b}");
    }
    if let Some((d, problems)) = &dest {
        if problems.is_empty() {
            out!("destination {d}: ok");
        }
        for pr in problems {
            out!("  BLOCKER destination {d}: {pr}");
        }
    }
    let n = p.blockers.len() + dest.as_ref().map_or(0, |(_, v)| v.len());
    match (ready, host_ok) {
        (true, true) => out!("ready to move"),
        (true, false) => out!("the process could be moved, but this machine fails a check above"),
        (false, _) => out!("not ready to move: {n} blocker{}", if n == 1 { "" } else { "s" }),
    }
    Ok(host_ok && ready)
}

/// Prints the agent's answer to `MoveCheck`; true when nothing blocks the move.
fn print_agent_check(host: &[dvk_checkpoint::host::HostCheck], c: &dvk_protocol::local::MoveCheck, json: bool) -> bool {
    let ready = c.blockers.is_empty();
    if json {
        out!(
            "{}",
            json!({
                "ok": ready && host.iter().all(|h| h.ok),
                "machine": host_json(host),
                "process": {
                    "pid": c.pid, "vpid": c.vpid.0, "node": c.node, "ready": ready,
                    "blockers": c.blockers, "redirected": c.redirects, "carried": c.carried,
                },
            })
        );
        return ready;
    }
    print_host(host);
    out!("process {} on {}, vPID {}:", c.pid, c.node, c.vpid);
    for what in &c.carried {
        out!("  {what} — carried by the agents");
    }
    for what in &c.redirects {
        out!("  {what} — will be redirected (stdin: /dev/null; stdout/stderr: a log on the destination)");
    }
    for b in &c.blockers {
        out!("  BLOCKER {b}");
    }
    if ready {
        out!("ready to move");
    } else {
        let n = c.blockers.len();
        out!("not ready to move: {n} blocker{}", if n == 1 { "" } else { "s" });
    }
    ready
}

fn host_json(host: &[dvk_checkpoint::host::HostCheck]) -> serde_json::Value {
    host.iter().map(|c| json!({"check": c.name, "ok": c.ok, "detail": c.detail})).collect()
}

fn print_host(host: &[dvk_checkpoint::host::HostCheck]) {
    out!("machine:");
    let w = host.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for c in host {
        out!("  {:<4}  {:<w$}  {}", if c.ok { "ok" } else { "FAIL" }, c.name, c.detail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock(fd: i32, path: Option<&str>, peer_path: Option<&str>, listening: bool) -> FdDescription {
        FdDescription {
            fd,
            link: "socket:[1]".into(),
            class: FdClass::UnixSocket {
                ino: 1,
                peer_ino: peer_path.map(|_| 2),
                listening,
                path: path.map(|p| p.as_bytes().to_vec()),
                peer_path: peer_path.map(|p| p.as_bytes().to_vec()),
                peer_holders: vec![],
            },
        }
    }

    #[test]
    fn agent_sockets_are_recognized() {
        let dir = Some(Path::new("/run/dvk/node1"));
        assert_eq!(agent_handled(&sock(901, None, Some("/x"), false), None), Some("the dvk agent link"));
        assert_eq!(
            agent_handled(&sock(5, None, Some("/run/dvk/node1/agent.sock"), false), dir),
            Some("a virtual socket to the agent")
        );
        assert_eq!(agent_handled(&sock(5, Some("/run/dvk/node1/ep/l1"), None, true), dir), Some("a virtual listener"));
        assert_eq!(
            agent_handled(&sock(6, Some("/run/dvk/node1/ep/l1"), None, false), dir),
            Some("a virtual connection (accepted)")
        );
        assert_eq!(agent_handled(&sock(5, None, Some("/run/dvk/node10/agent.sock"), false), dir), None);
        assert_eq!(agent_handled(&sock(5, None, Some("/run/dvk/node1/agent.sock"), false), None), None);
        let pipe = FdDescription {
            fd: 950,
            link: "pipe:[3]".into(),
            class: FdClass::Pipe { ino: 3, write_end: true, other_holders: vec![] },
        };
        assert_eq!(agent_handled(&pipe, dir), None);
    }

    #[test]
    fn pid_arguments() {
        assert_eq!(parse_pid("42").unwrap(), 42);
        assert!(parse_pid("0").is_err());
        assert!(parse_pid("-3").is_err());
        assert!(parse_pid("abc").unwrap_err().to_string().contains("not a pid or vPID"));
        let t = || -> anyhow::Result<Target> { bail!("no config") };
        assert_eq!(resolve_pid_arg("42", &t).unwrap(), ResolvedPid { pid: 42, vpid: None });
        let e = resolve_pid_arg("4194305", &t).unwrap_err().to_string();
        assert!(e.contains("vPID") && e.contains("no config"), "{e}");
    }
}
