//! The foundation, end to end: real agents forming a cluster, real preloaded
//! programs getting vPIDs, signals across nodes, exit clean-up, and agents that
//! survive bad peers and garbage. Scenarios run in loopback mode and, as root,
//! in network mode (each node a network namespace on 192.0.2.0/24).

use dvk_tests::programs::{c_program, python3};
use dvk_tests::{skip_unless, wait_until, Cluster, ClusterSpec, Mode};
use serde_json::Value;
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Stdio};
use std::time::Duration;

const VPID_BASE: i64 = 1 << 22;

/// Reads one line from a child's stdout (with a timeout, so a hung child fails the test).
fn read_line(child: &mut Child) -> String {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            if tx.send(line.trim_end().to_owned()).is_err() {
                break;
            }
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(10)).expect("a line from the test program");
    // Keep the rest flowing to the same channel for later reads.
    LINES.with(|l| l.borrow_mut().insert(child.id(), rx));
    line
}

thread_local! {
    static LINES: std::cell::RefCell<std::collections::HashMap<u32, std::sync::mpsc::Receiver<String>>> =
        Default::default();
}

fn next_line(child: &Child) -> String {
    LINES.with(|l| {
        l.borrow()
            .get(&child.id())
            .expect("read_line first")
            .recv_timeout(Duration::from_secs(10))
            .expect("another line from the test program")
    })
}

/// Parses "who vpid=V real=R ppid=P".
fn fields(line: &str) -> (String, i64, i64, i64) {
    let mut parts = line.split_whitespace();
    let who = parts.next().unwrap().to_owned();
    let mut get = |k: &str| -> i64 {
        let p = parts.next().unwrap_or_else(|| panic!("`{line}` lacks {k}"));
        p.strip_prefix(k).unwrap().strip_prefix('=').unwrap().parse().unwrap()
    };
    (who, get("vpid"), get("real"), get("ppid"))
}

fn row_for_pid(rows: &[Value], pid: i64) -> Option<&Value> {
    rows.iter().find(|r| r["pid"] == pid)
}

fn sleeper(cluster: &Cluster, node: usize, endpoint: &str) -> u32 {
    cluster.spawn(
        cluster
            .preloaded(node, python3())
            .args(["-c", "import time; time.sleep(60)"])
            .env("DVK_ENDPOINT", endpoint)
            .stdin(Stdio::null()),
    )
}

// ---------------------------------------------------------------------------

fn vpids_are_unique_across_three_nodes(mode: Mode) {
    let cluster = Cluster::start(3, mode);
    let mut pids = Vec::new();
    for node in 0..3 {
        for k in 0..3 {
            pids.push((node, sleeper(&cluster, node, &format!("svc{k}"))));
        }
    }
    for (node, pid) in &pids {
        cluster.wait_registered(*node, *pid);
    }
    // Every node converges on the same nine processes.
    wait_until(Duration::from_secs(10), "all nodes to list 9 processes", || (0..3).all(|i| cluster.ps(i).len() == 9));
    let views: Vec<Vec<(i64, i64, String)>> = (0..3)
        .map(|i| {
            let mut v: Vec<_> = cluster
                .ps(i)
                .iter()
                .map(|r| {
                    (r["vpid"].as_i64().unwrap(), r["pid"].as_i64().unwrap(), r["node"].as_str().unwrap().to_owned())
                })
                .collect();
            v.sort();
            v
        })
        .collect();
    assert_eq!(views[0], views[1]);
    assert_eq!(views[1], views[2]);
    let vpids: HashSet<i64> = views[0].iter().map(|v| v.0).collect();
    assert_eq!(vpids.len(), 9, "vPIDs must be unique: {:?}", views[0]);
    for (node, pid) in &pids {
        let (vpid, _, name) = views[0].iter().find(|v| v.1 == *pid as i64).unwrap();
        assert!(*vpid >= VPID_BASE, "vPID {vpid} is above every real PID");
        assert_eq!(name, &format!("node{}", node + 1));
        assert_eq!(vpid >> 22, *node as i64 + 1, "vPID {vpid} carries the id of the node that allocated it");
    }
    // States as the asking node sees them.
    for r in cluster.ps(0) {
        let expected = if r["node"] == "node1" { "local" } else { "remote" };
        assert_eq!(r["state"], expected, "{r}");
        assert_eq!(r["dc"], "dc0");
        assert_eq!(r["owner"], "root");
        assert!(r["endpoint"].as_str().unwrap().starts_with("svc"));
    }
}

#[test]
fn vpids_are_unique_across_three_nodes_loopback() {
    vpids_are_unique_across_three_nodes(Mode::Loopback);
}

#[test]
fn vpids_are_unique_across_three_nodes_network() {
    if skip_unless(Mode::Network, "vpids_are_unique_across_three_nodes_network") {
        return;
    }
    vpids_are_unique_across_three_nodes(Mode::Network);
}

#[test]
fn preloaded_c_program_sees_its_vpid_as_listed_by_ps() {
    let cluster = Cluster::start(2, Mode::Loopback);
    let pid = cluster.spawn(
        cluster.preloaded(1, c_program("identity")).stdin(Stdio::piped()).stdout(Stdio::piped()).env("DVK_DC", "dc7"),
    );
    let mut child = cluster.take_child(pid);
    let (who, vpid, real, _) = fields(&read_line(&mut child));
    assert_eq!(who, "self");
    assert_eq!(real, pid as i64);
    let row = cluster.wait_registered(0, pid);
    assert_eq!(row["vpid"], vpid, "getpid() == the vPID that ps lists on another node");
    assert_eq!(row["node"], "node2");
    assert_eq!(row["dc"], "dc7");
    assert_eq!(row["endpoint"], "identity", "endpoint defaults to the program name");
    assert!(row["command"].as_str().unwrap().ends_with("identity"));
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
}

#[test]
fn preloaded_python_program_sees_its_vpid_as_listed_by_ps() {
    let cluster = Cluster::start(3, Mode::Loopback);
    let script = "import os, sys\nprint(os.getpid(), os.readlink('/proc/self'), flush=True)\nsys.stdin.read()";
    let pid = cluster
        .spawn(cluster.preloaded(2, python3()).args(["-c", script]).stdin(Stdio::piped()).stdout(Stdio::piped()));
    let mut child = cluster.take_child(pid);
    let line = read_line(&mut child);
    let mut it = line.split_whitespace().map(|x| x.parse::<i64>().unwrap());
    let (vpid, real) = (it.next().unwrap(), it.next().unwrap());
    assert_eq!(real, pid as i64);
    assert!(vpid >= VPID_BASE, "os.getpid() answers the vPID, got {vpid}");
    for node in 0..3 {
        assert_eq!(cluster.wait_registered(node, pid)["vpid"], vpid);
    }
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
}

#[test]
fn forked_child_registers_with_its_own_vpid_and_sees_its_parents() {
    let cluster = Cluster::start(1, Mode::Loopback);
    let pid = cluster
        .spawn(cluster.preloaded(0, c_program("identity")).arg("fork").stdin(Stdio::piped()).stdout(Stdio::piped()));
    let mut child = cluster.take_child(pid);
    let (_, parent_vpid, _, _) = fields(&read_line(&mut child));
    let (who, child_vpid, child_real, child_ppid) = fields(&next_line(&child));
    assert_eq!(who, "child");
    assert!(child_vpid >= VPID_BASE);
    assert_ne!(child_vpid, parent_vpid, "the child has its own vPID");
    assert_eq!(child_ppid, parent_vpid, "getppid() in the child is the parent's vPID");
    let row = cluster.wait_registered(0, child_real as u32);
    assert_eq!(row["vpid"], child_vpid);
    assert_eq!(row["parent_vpid"], parent_vpid);
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
}

#[test]
fn getpid_is_consistent_across_threads() {
    let cluster = Cluster::start(1, Mode::Loopback);
    let pid = cluster
        .spawn(cluster.preloaded(0, c_program("identity")).arg("threads").stdin(Stdio::piped()).stdout(Stdio::piped()));
    let mut child = cluster.take_child(pid);
    let (_, vpid, _, _) = fields(&read_line(&mut child));
    assert!(vpid >= VPID_BASE);
    assert_eq!(next_line(&child), "threads ok");
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
}

#[test]
fn program_runs_unchanged_with_one_warning_when_no_agent_is_reachable() {
    let dir = tempfile::tempdir().unwrap();
    // `fork`: the forked child runs without an agent too, and says nothing more.
    let mut child = std::process::Command::new(c_program("identity"))
        .arg("fork")
        .env("LD_PRELOAD", dvk_tests::shim_path())
        .env("DVK_AGENT_SOCK", dir.path().join("no-agent.sock"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = [read_line(&mut child), next_line(&child)];
    for line in &lines {
        let (_, vpid, real, _) = fields(line);
        assert_eq!(vpid, real, "without an agent getpid() is the real PID: {line}");
    }
    assert!(lines[0].starts_with("self") && lines[1].starts_with("child"), "{lines:?}");
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "exactly one warning, got: {stderr:?}");
    assert!(stderr.starts_with("dvk: no usable agent at ") && stderr.contains("no-agent.sock"), "{stderr}");
}

// ---------------------------------------------------------------------------

const WAIT_FOR_SIGNAL: &str = "import os, signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
print(os.getpid(), flush=True)
deadline = time.time() + 30
while not got and time.time() < deadline:
    time.sleep(0.01)
print('got SIGUSR1' if got else 'timeout', flush=True)";

const SEND_SIGNAL: &str = "import os, signal, sys
try:
    os.kill(int(sys.argv[1]), signal.SIGUSR1)
    print('sent')
except OSError as e:
    print('error', e.errno)";

fn send_signal(cluster: &Cluster, node: usize, vpid: i64, as_nobody: bool) -> String {
    let mut cmd = if as_nobody {
        let mut c = cluster.preloaded(node, "setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(python3());
        c
    } else {
        cluster.preloaded(node, python3())
    };
    let out = cmd.args(["-c", SEND_SIGNAL, &vpid.to_string()]).stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn kill_by_vpid_reaches_another_node(mode: Mode) {
    let cluster = Cluster::start(3, mode);
    let pid = cluster.spawn(
        cluster.preloaded(0, python3()).args(["-c", WAIT_FOR_SIGNAL]).stdin(Stdio::null()).stdout(Stdio::piped()),
    );
    let mut target = cluster.take_child(pid);
    let vpid: i64 = read_line(&mut target).parse().unwrap();
    cluster.wait_registered(2, pid);

    // An unprivileged user may not signal root's process: EPERM, and nothing is delivered.
    if dvk_tests::is_root() {
        assert_eq!(send_signal(&cluster, 2, vpid, true), format!("error {}", libc::EPERM));
    }
    // Unknown vPID: ESRCH, as kill(2) says.
    assert_eq!(send_signal(&cluster, 2, vpid + 999, false), format!("error {}", libc::ESRCH));
    // Root on node3 signals the process on node1 by its vPID.
    assert_eq!(send_signal(&cluster, 2, vpid, false), "sent");
    assert_eq!(next_line(&target), "got SIGUSR1");
    assert!(target.wait().unwrap().success());
}

#[test]
fn kill_by_vpid_reaches_a_process_on_another_node_loopback() {
    kill_by_vpid_reaches_another_node(Mode::Loopback);
}

#[test]
fn kill_by_vpid_reaches_a_process_on_another_node_network() {
    if skip_unless(Mode::Network, "kill_by_vpid_reaches_a_process_on_another_node_network") {
        return;
    }
    kill_by_vpid_reaches_another_node(Mode::Network);
}

#[test]
fn exited_process_disappears_from_every_node() {
    let cluster = Cluster::start(3, Mode::Loopback);
    let pid = sleeper(&cluster, 1, "short");
    let other = sleeper(&cluster, 1, "stays");
    for node in 0..3 {
        cluster.wait_registered(node, pid);
        cluster.wait_registered(node, other);
    }
    let mut child = cluster.take_child(pid);
    child.kill().unwrap();
    child.wait().unwrap();
    wait_until(Duration::from_secs(10), "the exited process to vanish everywhere", || {
        (0..3).all(|i| row_for_pid(&cluster.ps(i), pid as i64).is_none())
    });
    for i in 0..3 {
        assert!(row_for_pid(&cluster.ps(i), other as i64).is_some(), "the other process stays listed");
        let status = cluster.node_status(i);
        assert_eq!(status[1]["processes"], 1, "node2 runs one registered process now");
    }
}

// ---------------------------------------------------------------------------

#[test]
fn peer_without_the_cluster_key_is_refused() {
    // node2 is an impostor with another key: node1 dials it, it dials node3.
    let mut cluster = Cluster::start_with(ClusterSpec { nodes: 3, mode: Mode::Loopback, not_started: vec![1] });
    let wrong_key = cluster.path("wrong.key");
    std::fs::write(&wrong_key, "ff".repeat(32)).unwrap();
    let config = std::fs::read_to_string(&cluster.config).unwrap();
    let impostor_config = cluster.path("impostor.toml");
    std::fs::write(
        &impostor_config,
        config.replace("cluster_key_file = \"cluster.key\"", "cluster_key_file = \"wrong.key\""),
    )
    .unwrap();
    let real_config = std::mem::replace(&mut cluster.config, impostor_config);
    cluster.start_agent(1);
    cluster.config = real_config;

    let impostors_process = sleeper(&cluster, 1, "impostor");
    // node1 and node3 link to each other, never to the impostor.
    wait_until(Duration::from_secs(10), "node1 and node3 to link", || {
        cluster.node_status(0)[2]["up"] == true && cluster.node_status(2)[0]["up"] == true
    });
    wait_until(Duration::from_secs(10), "node3 to log the refusal", || {
        cluster.log_of(2).contains("refused peer: it does not hold the cluster key")
    });
    wait_until(Duration::from_secs(10), "the impostor to log the refusal", || {
        cluster.log_of(1).contains("refused peer: it does not hold the cluster key")
    });
    std::thread::sleep(Duration::from_millis(500));
    for i in [0, 2] {
        assert_eq!(cluster.node_status(i)[1]["up"], false, "the impostor is never up");
        assert!(row_for_pid(&cluster.ps(i), impostors_process as i64).is_none(), "nothing of the impostor's is listed");
    }
}

/// xorshift: deterministic garbage.
fn garbage(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn assert_serving(cluster: &Cluster, marker: u32) {
    for i in 0..cluster.nodes.len() {
        let pid = cluster.nodes[i].agent_pid().unwrap();
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists(), "agent of node{} died", i + 1);
        assert!(row_for_pid(&cluster.ps(i), marker as i64).is_some(), "node{} still answers ps", i + 1);
    }
    cluster.wait_mesh();
}

#[test]
fn garbage_on_the_peer_and_local_sockets_closes_only_that_connection() {
    let cluster = Cluster::start(2, Mode::Loopback);
    let marker = sleeper(&cluster, 0, "marker");
    cluster.wait_registered(1, marker);
    let peer_addr = cluster.nodes[1].peer_addr.clone();
    let socket = cluster.nodes[1].socket();

    let mut attacks: Vec<Vec<u8>> = (0..20).map(|s| garbage(s + 1, 64 + 997 * s as usize)).collect();
    attacks.push(u32::MAX.to_le_bytes().to_vec()); // oversized length
    attacks.push(vec![0, 0, 0, 0]); // empty frame
    attacks.push({
        let mut f = 100u32.to_le_bytes().to_vec(); // truncated frame
        f.extend_from_slice(&[1, 2, 3]);
        f
    });
    attacks.push({
        let mut f = 8u32.to_le_bytes().to_vec(); // valid length, undecodable body
        f.extend_from_slice(&[0xff; 8]);
        f
    });
    for bytes in &attacks {
        if let Ok(mut s) = std::net::TcpStream::connect(&peer_addr) {
            let _ = s.write_all(bytes);
            s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink); // the agent closes it
        }
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&socket) {
            let _ = s.write_all(bytes);
            s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        }
    }
    assert_serving(&cluster, marker);

    // A dialer that does not hold the key gets a challenge nonce and nothing else.
    let mut s = std::net::TcpStream::connect(&peer_addr).unwrap();
    let hello = hello_frame(1);
    s.write_all(&hello).unwrap();
    let mut header = [0u8; 4];
    s.read_exact(&mut header).unwrap();
    let mut challenge = vec![0u8; u32::from_le_bytes(header) as usize];
    s.read_exact(&mut challenge).unwrap();
    let mut forged = 33u32.to_le_bytes().to_vec();
    forged.push(3); // PeerMessage::Proof
    forged.extend_from_slice(&[0u8; 32]);
    s.write_all(&forged).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "a keyless peer received {} more bytes", rest.len());
    wait_until(Duration::from_secs(5), "the refusal to be logged", || {
        cluster.log_of(1).contains("refused peer: it does not hold the cluster key")
    });
    assert_serving(&cluster, marker);
}

/// PeerMessage::Hello { version: PEER_PROTOCOL_VERSION, node, nonce } in postcard, framed.
fn hello_frame(node: u8) -> Vec<u8> {
    // variant 1, the version (a varint: one byte while below 128), node id (varint)
    let version = dvk_protocol::peer::PEER_PROTOCOL_VERSION as u8;
    let mut body = vec![1u8, version, node];
    body.extend_from_slice(&[0x42; 32]);
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend(body);
    f
}

#[test]
fn restarted_peer_is_reconnected_and_resynchronised() {
    let mut cluster = Cluster::start(3, Mode::Loopback);
    let on_node3 = sleeper(&cluster, 2, "survivor");
    let before = cluster.wait_registered(0, on_node3);
    let doomed = sleeper(&cluster, 2, "doomed");
    cluster.wait_registered(0, doomed);
    cluster.stop_agent(2);
    wait_until(Duration::from_secs(10), "node1 to see node3 down", || cluster.node_status(0)[2]["up"] == false);
    assert!(row_for_pid(&cluster.ps(0), on_node3 as i64).is_none(), "a down node's processes are not listed");
    // One process dies while its agent is away.
    let mut gone = cluster.take_child(doomed);
    gone.kill().unwrap();
    gone.wait().unwrap();

    cluster.start_agent(2);
    cluster.wait_mesh();
    // The restarted agent takes back its surviving process, with the same vPID, and
    // the rest of the cluster learns it again; the one that died is not brought back.
    let after = cluster.wait_registered(0, on_node3);
    assert_eq!(after["vpid"], before["vpid"], "the survivor keeps its vPID");
    assert_eq!(after["node"], "node3");
    assert!(row_for_pid(&cluster.ps(2), doomed as i64).is_none(), "a process that died meanwhile stays gone");
    // New registrations work and get fresh vPIDs.
    let fresh = sleeper(&cluster, 2, "fresh");
    let row = cluster.wait_registered(0, fresh);
    assert_eq!(row["node"], "node3");
    assert_ne!(row["vpid"], before["vpid"]);
    assert_eq!(cluster.node_status(1)[2]["up"], true);
    // And the survivor's exit is still noticed.
    let mut survivor = cluster.take_child(on_node3);
    survivor.kill().unwrap();
    survivor.wait().unwrap();
    wait_until(Duration::from_secs(10), "the survivor's exit to be seen", || {
        row_for_pid(&cluster.ps(0), on_node3 as i64).is_none()
    });
}

#[test]
fn cli_errors_are_one_clear_line() {
    let cluster = Cluster::start(1, Mode::Loopback);
    let out = std::process::Command::new(dvk_tests::bin_dir().join("migrate-cli"))
        .arg("--config")
        .arg(&cluster.config)
        .args(["--node", "node9", "ps"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no node named `node9`"), "{err}");

    let out = std::process::Command::new(dvk_tests::bin_dir().join("migrate-cli"))
        .args(["--socket", "/nonexistent/agent.sock", "nodes"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach") && err.contains("is dvk-agent running?"), "{err}");

    let out = std::process::Command::new(dvk_tests::bin_dir().join("migrate-cli"))
        .args(["--config", "/nonexistent/cluster.toml", "ps"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(err.matches("No such file").count(), 1, "the cause is said once: {err}");
    assert!(err.contains("/nonexistent/cluster.toml") && err.contains("--config"), "{err}");
}

#[test]
fn agent_refuses_a_bad_config_naming_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "cluster_key_file = \"k\"\n[[node]]\nname = \"n1\"\nid = 0\npeer_addr = \"127.0.0.1:1\"\nruntime_dir = \"r\"\nimage_dir = \"i\"\n").unwrap();
    let out = std::process::Command::new(dvk_tests::bin_dir().join("dvk-agent"))
        .arg("--config")
        .arg(&cfg)
        .args(["--node", "n1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains(&format!("{}:4: field `id`", cfg.display())), "{err}");
}

#[test]
fn endpoints_are_listed_everywhere_and_leave_with_their_process() {
    let cluster = Cluster::start(2, Mode::Loopback);
    let server = "import socket, time\ns = socket.socket()\ns.bind(('0.0.0.0', 7000))\ns.listen()\ntime.sleep(60)";
    let pid = cluster
        .spawn(cluster.preloaded(0, python3()).args(["-c", server]).env("DVK_ENDPOINT", "svc").stdin(Stdio::null()));
    let vpid = cluster.wait_registered(1, pid)["vpid"].clone();
    let mut row = None;
    wait_until(Duration::from_secs(10), "endpoint svc:7000 to be listed on node2", || {
        let out = cluster.cli(1, &["endpoints", "--json"]);
        let list: Value = serde_json::from_slice(&out.stdout).unwrap();
        row = list.as_array().unwrap().iter().find(|e| e["name"] == "svc").cloned();
        row.is_some()
    });
    let row = row.unwrap();
    assert_eq!(row["port"], 7000);
    assert_eq!(row["dc"], "dc0");
    assert_eq!(row["host"], "svc.dc0.dvk");
    assert_eq!(row["node"], "node1");
    assert_eq!(row["vpid"], vpid);
    assert!(row["vip"].as_str().unwrap().starts_with("127.77."), "{row}");
    let table = String::from_utf8(cluster.cli(0, &["endpoints"]).stdout).unwrap();
    assert!(table.contains("svc:7000") && table.contains("svc.dc0.dvk"), "{table}");

    let mut child = cluster.take_child(pid);
    child.kill().unwrap();
    child.wait().unwrap();
    wait_until(Duration::from_secs(10), "the endpoint to leave with its process", || {
        let out = cluster.cli(1, &["endpoints", "--json"]);
        let list: Value = serde_json::from_slice(&out.stdout).unwrap();
        list.as_array().unwrap().is_empty()
    });
    let leftovers: Vec<_> = std::fs::read_dir(cluster.nodes[0].runtime_dir.join("ep")).unwrap().collect();
    assert!(leftovers.is_empty(), "the agent removes a dead process's listener files: {leftovers:?}");
}

#[test]
fn fork_returns_the_childs_vpid_and_the_wait_family_takes_it() {
    let cluster = Cluster::start(1, Mode::Loopback);
    let out = cluster.preloaded(0, c_program("fork_wait")).stdin(Stdio::null()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("done 0"), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.matches(" ok").count(), 13, "{stdout}");

    // Without an agent the same program sees real PIDs throughout, and still passes
    // every check but the one that wants a vPID.
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(c_program("fork_wait"))
        .env("LD_PRELOAD", dvk_tests::shim_path())
        .env("DVK_AGENT_SOCK", dir.path().join("none.sock"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("child-pid-is-virtual FAIL") && stdout.contains("done 1"), "{stdout}");
}
