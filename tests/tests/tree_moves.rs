//! Moving a process tree (issue 10): a process with children moves with its whole tree.
//!
//! python's `socketserver.ForkingTCPServer` on node1: every connection is served by a child
//! it forks, which inherits the listener. A client on node3 holds two connections (two
//! children with requests in progress) and keeps talking on them while the tree moves to
//! node2; before and after, it also opens a new connection per round (a child forked, served
//! and reaped). Every reply is checked. After the move the parent runs on node2 under a new
//! pid, its children too: it must still fork children with vPIDs and reap the ones it had
//! (its shim's table of children's real pids was fixed up through the Relink frame).

use dvk_tests::moving::{agent_logs, no_inherited_fds, step_detail, LOOP, REACH};
use dvk_tests::net::{wait_connectable, Proc};
use dvk_tests::programs::python3;
use dvk_tests::{bin_dir, Cluster, Mode};
use std::process::{Command, Stdio};
use std::time::Duration;

const PORT: u16 = 7400;
const SOURCE: usize = 0;
const DEST: usize = 1;
const CLIENT: usize = 2;

const SERVER_PY: &str = r#"
import socketserver, sys

class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(b'echo ' + line)
            self.wfile.flush()

class Server(socketserver.ForkingTCPServer):
    allow_reuse_address = True

server = Server(('0.0.0.0', int(sys.argv[1])), Echo)
print('listening', flush=True)
server.serve_forever(poll_interval=0.1)
"#;

/// `host port quiet go rounds`: two persistent connections, then `rounds` rounds of a line on
/// each (and, except between the files `quiet` and `go`, a new connection per round). It
/// writes `quiet` (as a line on stdout) and waits until the file `go` exists before opening
/// connections again.
const CLIENT_PY: &str = r#"
import os, socket, sys, time
host, port, go, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])

def ask(f, s, line):
    s.sendall(line)
    got = f.readline()
    if got != b'echo ' + line:
        print('FAIL', line, got, flush=True)
        sys.exit(1)

conns = []
for _ in range(2):
    s = socket.create_connection((host, port))
    conns.append((s.makefile('rb'), s))
print('connected', flush=True)
quiet_at, go_at = rounds // 3, 2 * rounds // 3
for i in range(rounds):
    for k, (f, s) in enumerate(conns):
        ask(f, s, b'%d-%d\n' % (k, i))
    if i == quiet_at:
        print('quiet', flush=True)
    if i == go_at:
        for _ in range(12000):
            if os.path.exists(go):
                break
            time.sleep(0.01)
    if i < quiet_at or i >= go_at:
        s = socket.create_connection((host, port))
        ask(s.makefile('rb'), s, b'new-%d\n' % i)
        s.close()
    if i % 20 == 0:
        print('progress', i, flush=True)
for f, s in conns:
    s.close()
print('DONE', rounds, flush=True)
"#;

/// Live (not zombie) and zombie children of `pid`.
fn children(pid: u32) -> (Vec<i32>, Vec<i32>) {
    let (mut live, mut zombies) = (Vec::new(), Vec::new());
    for c in dvk_tests::children_of(pid) {
        let stat = std::fs::read_to_string(format!("/proc/{c}/stat")).unwrap_or_default();
        match stat.rsplit(')').next().and_then(|r| r.split_whitespace().next()) {
            Some("Z") => zombies.push(c),
            Some(_) => live.push(c),
            None => {}
        }
    }
    (live, zombies)
}

#[test]
fn a_forking_server_moves_with_its_children_under_a_client_loop_loopback() {
    forking_server("a_forking_server_moves_with_its_children_under_a_client_loop_loopback", false);
}

/// The same, the first move failing on the destination: the whole tree rolls back and goes on
/// serving the client on node1, and a second move succeeds.
#[test]
fn a_forking_server_whose_move_fails_rolls_back_with_its_children_loopback() {
    forking_server("a_forking_server_whose_move_fails_rolls_back_with_its_children_loopback", true);
}

fn move_cmd(cluster: &Cluster, vpid: i64) -> std::process::Output {
    Command::new(bin_dir().join("migrate-cli"))
        .arg("--config")
        .arg(&cluster.config)
        .args(["--node", &cluster.nodes[CLIENT].name, "move", &vpid.to_string(), &cluster.nodes[DEST].name, "--json"])
        .env_remove("LD_PRELOAD")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn forking_server(test: &str, fail_first: bool) {
    if dvk_tests::moving::skip_without_root(test) {
        return;
    }
    let mut cluster = Cluster::start(3, Mode::Loopback);
    if fail_first {
        cluster.restart_agent_with(DEST, &[("DVK_TEST_FAULT", "fail-restore")]);
    }
    let mut cmd = cluster.preloaded(SOURCE, python3());
    cmd.args(["-c", SERVER_PY, &PORT.to_string()])
        .env("DVK_ENDPOINT", "forking")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(cluster.path("server.err")).unwrap());
    let mut server = Proc::spawn(no_inherited_fds(&mut cmd), "ForkingTCPServer");
    server.lines.wait_for("listening", REACH);
    let vpid = cluster.wait_registered(SOURCE, server.pid())["vpid"].as_i64().unwrap();
    wait_connectable(&cluster, CLIENT, "dc0", "forking.dc0.dvk", PORT, REACH);

    let go = cluster.path("go");
    let mut cmd = cluster.preloaded(CLIENT, python3());
    cmd.args(["-c", CLIENT_PY, "forking.dc0.dvk", &PORT.to_string()]).arg(&go).arg("300").stdin(Stdio::null());
    let mut client = Proc::spawn(no_inherited_fds(&mut cmd), "client");
    client.lines.wait_for("connected", REACH);
    client.lines.wait_for("quiet", LOOP);
    // No new connection now: the tree settles at the parent and the two children serving the
    // client's connections (the others exited; a zombie not reaped yet travels as one).
    dvk_tests::wait_until(REACH, "two live children", || children(server.pid()).0.len() == 2);

    // `check` looks at the whole tree: the listener the children inherited is the agents' in
    // each of them, nothing blocks.
    let out = Command::new(bin_dir().join("migrate-cli"))
        .arg("--config")
        .arg(&cluster.config)
        .args(["--node", &cluster.nodes[SOURCE].name, "check", &vpid.to_string(), &cluster.nodes[DEST].name, "--json"])
        .env_remove("LD_PRELOAD")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let check: serde_json::Value = serde_json::from_slice(&out.stdout).expect("check --json");
    let carried: Vec<&str> =
        check["process"]["carried"].as_array().unwrap().iter().filter_map(|c| c.as_str()).collect();
    assert_eq!(check["process"]["blockers"], serde_json::json!([]), "{check:#}");
    assert_eq!(carried.iter().filter(|c| c.contains("virtual listener forking")).count(), 3, "{check:#}");
    if fail_first {
        let children_before = children(server.pid()).0;
        let out = move_cmd(&cluster, vpid);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("rolled back") && err.contains("test fault"), "{err}");
        // Thawed where it was: the same processes, serving.
        assert_eq!(children(server.pid()).0, children_before, "the same children, thawed");
        let row = cluster.ps(CLIENT).into_iter().find(|r| r["vpid"] == vpid).expect("the server is in ps");
        assert_eq!(row["node"], cluster.nodes[SOURCE].name.as_str());
        cluster.restart_agent_with(DEST, &[]);
    }
    let out = move_cmd(&cluster, vpid);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("no report ({e}): {}\n{}", String::from_utf8_lossy(&out.stderr), agent_logs(&cluster))
    });
    assert!(
        out.status.success() && report["committed"] == true,
        "the tree move failed: {}\n{report:#}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent_logs(&cluster)
    );
    let preflight = step_detail(&report, "preflight").unwrap_or_default();
    assert!(preflight.starts_with("process tree of 3:"), "preflight: {preflight}");
    let others = report["group"].as_array().expect("the children are in the report");
    assert_eq!(others.len(), 2, "{report:#}");
    let new_root = report["new_pid"].as_i64().unwrap();
    std::fs::write(&go, b"go").unwrap();

    // On node2 the parent forks new children (with vPIDs) and reaps them; the client checks
    // every reply and ends.
    let status = client.wait(LOOP, "client");
    // Lines may still be in the reader: drain them.
    while client.lines.try_next(Duration::from_millis(200)).is_some() {}
    let done = client.lines.seen.iter().find(|l| l.starts_with("DONE")).cloned();
    assert!(status.success() && done.is_some(), "client: {:?}\n{}", client.lines.seen, agent_logs(&cluster));
    // Its two long-lived children ended with the client's connections: the moved parent reaps
    // them (waitpid by vPID, mapped to their new real pids), and every later one.
    dvk_tests::wait_until(REACH, "the moved parent reaped its children", || {
        let (live, zombies) = children(new_root as u32);
        live.is_empty() && zombies.is_empty()
    });
    let row = cluster.ps(CLIENT).into_iter().find(|r| r["vpid"] == vpid).expect("the server is in ps");
    assert_eq!(row["node"], cluster.nodes[DEST].name.as_str());
    eprintln!("{test}: {}, frozen {} ms", done.unwrap(), report["frozen_micros"].as_u64().unwrap_or(0) / 1000);
}

/// A tree moves only when every process in it is under the shim: a child started without it
/// is named, and nothing is frozen.
#[test]
fn a_tree_with_a_child_outside_the_shim_is_refused_by_name_loopback() {
    let test = "a_tree_with_a_child_outside_the_shim_is_refused_by_name_loopback";
    if dvk_tests::moving::skip_without_root(test) {
        return;
    }
    let cluster = Cluster::start(3, Mode::Loopback);
    let mut cmd = cluster.preloaded(SOURCE, python3());
    cmd.args([
        "-c",
        "import os, subprocess, time\n\
         env = {k: v for k, v in os.environ.items() if k != 'LD_PRELOAD'}\n\
         p = subprocess.Popen(['sleep', '300'], env=env, stdin=subprocess.DEVNULL, \
         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n\
         print('started', p.pid, flush=True)\n\
         p.wait()",
    ])
    .stdin(Stdio::null());
    let mut parent = Proc::spawn(no_inherited_fds(&mut cmd), "parent");
    let started = parent.lines.wait_for("started", REACH);
    let child: i32 = started.split_whitespace().nth(1).and_then(|p| p.parse().ok()).expect("the child's pid");
    let vpid = cluster.wait_registered(SOURCE, parent.pid())["vpid"].as_i64().unwrap();
    // python starts it with vfork and exec (no fork hook of the shim runs in between): the
    // agent never knew it.
    assert!(!cluster.ps(SOURCE).iter().any(|r| r["pid"] == child), "the child is not registered");
    let out = move_cmd(&cluster, vpid);
    let err = String::from_utf8_lossy(&out.stderr);
    // SAFETY: kill takes two integers; the child is this test's grandchild.
    unsafe { libc::kill(child, libc::SIGKILL) };
    assert!(!out.status.success() && out.stdout.is_empty(), "refused before it started: {err}");
    assert!(
        err.contains(&format!("pid {child} (sleep), a child of pid {}", parent.pid()))
            && err.contains("not a process under the dvk shim"),
        "the child is named: {err}"
    );
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", parent.pid())).unwrap();
    let state = stat.rsplit(')').next().unwrap().split_whitespace().next().unwrap().to_owned();
    assert!(state == "S" || state == "R", "the parent was not left stopped: {state}");
}
