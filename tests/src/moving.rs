//! Helpers for the move tests: the DVS paper's evaluation server and client
//! (`tests/programs/move_server.c`, `move_client.c`) and `migrate-cli move`.

use crate::net::{wait_connectable, Proc};
use crate::programs::c_program;
use crate::Cluster;
use std::process::Stdio;
use std::time::Duration;

/// Programs under test inherit no stray fds from the test runner (a pipe to the shell that ran
/// `cargo test` cannot follow a moved process, and the move would rightly refuse it).
pub fn no_inherited_fds(cmd: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: close_range is async-signal-safe; it only marks fds ≥ 3 close-on-exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 4u32 /* CLOSE_RANGE_CLOEXEC */);
            Ok(())
        })
    }
}

pub const REACH: Duration = Duration::from_secs(20);
pub const LOOP: Duration = Duration::from_secs(120);

/// The paper's server on node `node` as endpoint `kv:PORT`; returns it and its vPID.
pub fn start_server(cluster: &Cluster, node: usize, port: u16, mb: usize) -> (Proc, i64) {
    let log = std::fs::File::create(cluster.path(&format!("server-{port}.err"))).unwrap();
    let mut cmd = cluster.preloaded(node, c_program("move_server"));
    cmd.args([port.to_string(), mb.to_string()]).env("DVK_ENDPOINT", "kv").stdin(Stdio::null()).stderr(log);
    let mut server = Proc::spawn(no_inherited_fds(&mut cmd), "move_server");
    server.lines.wait_for("listening", REACH);
    let row = cluster.wait_registered(node, server.pid());
    (server, row["vpid"].as_i64().unwrap())
}

/// The paper's client on node `node`: `count` requests over `conns` connections.
pub fn start_client(
    cluster: &Cluster,
    node: usize,
    port: u16,
    mb: usize,
    count: usize,
    conns: usize,
    pause_us: u64,
) -> Proc {
    start_client_slice(cluster, node, port, mb, count, conns, pause_us, "0/1")
}

/// [`start_client`] writing and checking only blocks `b % n == k` (`slice` = "k/n"), so several
/// clients can share one server.
#[allow(clippy::too_many_arguments)]
pub fn start_client_slice(
    cluster: &Cluster,
    node: usize,
    port: u16,
    mb: usize,
    count: usize,
    conns: usize,
    pause_us: u64,
    slice: &str,
) -> Proc {
    start_client_of(cluster, node, "kv.dc0.dvk", port, mb, count, conns, pause_us, slice)
}

/// [`start_client_slice`] talking to `host` (an endpoint that serves the paper's protocol: the
/// server itself, or a proxy in front of it).
#[allow(clippy::too_many_arguments)]
pub fn start_client_of(
    cluster: &Cluster,
    node: usize,
    host: &str,
    port: u16,
    mb: usize,
    count: usize,
    conns: usize,
    pause_us: u64,
    slice: &str,
) -> Proc {
    wait_connectable(cluster, node, "dc0", host, port, REACH);
    let mut cmd = cluster.preloaded(node, c_program("move_client"));
    cmd.args([
        host.to_string(),
        port.to_string(),
        mb.to_string(),
        count.to_string(),
        conns.to_string(),
        pause_us.to_string(),
        "42".to_string(),
        slice.to_string(),
    ])
    .stdin(Stdio::null());
    let mut client = Proc::spawn(no_inherited_fds(&mut cmd), "move_client");
    client.lines.wait_for("connected", REACH);
    client
}

/// `migrate-cli move VPID NODE --json` asked on node `ask`; returns the report.
pub fn move_to(cluster: &Cluster, ask: usize, vpid: i64, to: usize) -> serde_json::Value {
    move_to_with(cluster, ask, vpid, to, &[])
}

/// [`move_to`] with more `migrate-cli move` flags (e.g. `--precopy`).
pub fn move_to_with(cluster: &Cluster, ask: usize, vpid: i64, to: usize, flags: &[&str]) -> serde_json::Value {
    let dest = cluster.nodes[to].name.clone();
    let vpid_arg = vpid.to_string();
    let mut args = vec!["move", &vpid_arg, &dest, "--json"];
    args.extend_from_slice(flags);
    let out = cluster.cli(ask, &args);
    assert!(
        out.status.success(),
        "move of {vpid} to {dest} failed: {}\n{}\nsource log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout),
        agent_logs(cluster)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("move --json prints the report");
    assert_eq!(report["committed"], true);
    assert_eq!(report["to"], dest.as_str());
    let row = cluster.ps(ask).into_iter().find(|r| r["vpid"] == vpid).expect("the moved process is in ps");
    assert_eq!(row["node"], dest.as_str(), "ps shows the new node");
    report
}

/// The detail line of step `name` in a `move --json` report.
pub fn step_detail(report: &serde_json::Value, name: &str) -> Option<String> {
    let steps = report["steps"].as_array()?;
    steps.iter().find(|s| s["name"] == name).map(|s| s["detail"].as_str().unwrap_or("").to_owned())
}

/// Waits for the client to finish and checks it saw every byte right.
pub fn agent_logs(cluster: &Cluster) -> String {
    (0..cluster.nodes.len())
        .map(|i| format!("=== {} ===\n{}", cluster.nodes[i].name, cluster.log_of(i)))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn client_done(cluster: &Cluster, client: &mut Proc) -> String {
    let status = client.wait(LOOP, "move_client");
    let last = client.lines.seen.last().cloned().unwrap_or_default();
    // Lines may still be in the reader: drain them.
    while let Some(l) = client.lines.try_next(Duration::from_millis(200)) {
        let _ = l;
    }
    let done = client.lines.seen.iter().find(|l| l.starts_with("DONE")).cloned();
    assert!(
        status.success() && done.is_some(),
        "client failed ({status}); last line: {last}\nall:\n{}\n{}",
        client.lines.seen.join("\n"),
        agent_logs(cluster)
    );
    done.unwrap()
}

/// Moves need root (the agents ptrace the process): without it a move test prints SKIP and passes.
pub fn skip_without_root(test: &str) -> bool {
    if crate::is_root() {
        return false;
    }
    eprintln!("SKIP {test}: moving a process needs root (the agents ptrace it)");
    true
}
