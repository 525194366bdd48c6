//! Group moves (issue 10): `migrate-cli move --group A,B NODE` moves several processes of one
//! node as one — all frozen, all restored on NODE before any runs there, a failure of any rolls
//! all back — and a stream between two members stays a stream between them, relayed on NODE.
//!
//! The group: a cache (the DVS paper's server, `tests/programs/move_server.c`, endpoint `kv`)
//! and a front server (a python proxy, endpoint `front`) that forwards each client connection
//! to the cache over a virtual stream of its own. The paper's client (`move_client.c`) on
//! another node talks to the front only, and checks every reply byte against its model of the
//! cache's data, then reads the whole data back: a byte lost or reordered on either stream,
//! or a request answered by a cache that lost its state, fails it.

use dvk_tests::moving::{
    agent_logs, client_done, no_inherited_fds, start_client_of, start_server, step_detail, LOOP, REACH,
};
use dvk_tests::net::Proc;
use dvk_tests::programs::{c_program, python3};
use dvk_tests::{bin_dir, Cluster, Mode};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const CACHE_PORT: u16 = 7000;
const FRONT_PORT: u16 = 7100;
const MB: usize = 4;
const SOURCE: usize = 0;
const DEST: usize = 1;
const CLIENT: usize = 2;

/// The front: every accepted connection gets a connection of its own to the cache, and bytes
/// are copied both ways (a half-close is passed on).
const FRONT_PY: &str = r#"
import socket, sys, threading
port, up_host, up_port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(('0.0.0.0', port))
ls.listen(64)
print('listening', flush=True)

def pipe(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass

while True:
    conn, _ = ls.accept()
    up = socket.create_connection((up_host, up_port))
    threading.Thread(target=pipe, args=(conn, up), daemon=True).start()
    threading.Thread(target=pipe, args=(up, conn), daemon=True).start()
"#;

/// One end of a stream between two members (`server PORT` or `client HOST PORT`), then
/// `BYTES SEED TRIGGER RESULT`: a thread sends BYTES pseudo-random bytes (their sha256 printed
/// first) and half-closes; nothing is read until the file TRIGGER exists, then everything up to
/// EOF is, and "length sha256" goes to the file RESULT. With nobody reading, every stage of the
/// stream fills: the sender's socket, the relay, the receiver's socket.
const PAIR_PY: &str = r#"
import hashlib, os, random, socket, sys, threading, time
if sys.argv[1] == 'server':
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(('0.0.0.0', int(sys.argv[2])))
    ls.listen(4)
    print('listening', flush=True)
    s, _ = ls.accept()
    rest = sys.argv[3:]
else:
    s = socket.create_connection((sys.argv[2], int(sys.argv[3])))
    rest = sys.argv[4:]
n, seed, trigger, result = int(rest[0]), int(rest[1]), rest[2], rest[3]
blob = random.Random(seed).randbytes(n)
print('blob', hashlib.sha256(blob).hexdigest(), flush=True)

def send():
    for i in range(0, n, 65536):
        s.sendall(blob[i:i + 65536])
        print('sent', i + len(blob[i:i + 65536]), flush=True)
    s.shutdown(socket.SHUT_WR)

threading.Thread(target=send, daemon=True).start()
for _ in range(24000):
    if os.path.exists(trigger):
        break
    time.sleep(0.01)
h, got = hashlib.sha256(), 0
while True:
    data = s.recv(65536)
    if not data:
        break
    h.update(data)
    got += len(data)
with open(result + '.tmp', 'w') as f:
    f.write('%d %s' % (got, h.hexdigest()))
os.rename(result + '.tmp', result)
time.sleep(600)
"#;

struct Group {
    _cache: Proc,
    cache: i64,
    _front: Proc,
    front: i64,
    client: Proc,
}

/// Cache and front on node1, the client on node3 looping `count` requests through the front.
fn start_group(cluster: &Cluster, count: usize) -> Group {
    let (cache_proc, cache) = start_server(cluster, SOURCE, CACHE_PORT, MB);
    let mut cmd = cluster.preloaded(SOURCE, python3());
    cmd.args(["-c", FRONT_PY, &FRONT_PORT.to_string(), "kv.dc0.dvk", &CACHE_PORT.to_string()])
        .env("DVK_ENDPOINT", "front")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(cluster.path("front.err")).unwrap());
    let mut front_proc = Proc::spawn(no_inherited_fds(&mut cmd), "front");
    front_proc.lines.wait_for("listening", REACH);
    let front = cluster.wait_registered(SOURCE, front_proc.pid())["vpid"].as_i64().unwrap();
    let mut client = start_client_of(cluster, CLIENT, "front.dc0.dvk", FRONT_PORT, MB, count, 1, 200, "0/1");
    client.lines.wait_for("progress", LOOP);
    Group { _cache: cache_proc, cache, _front: front_proc, front, client }
}

/// `migrate-cli --node node3 move --group FRONT,CACHE NODE --json`.
fn move_group(cluster: &Cluster, g: &Group, to: usize, flags: &[&str]) -> Output {
    move_vpids_with(cluster, &[g.front, g.cache], to, flags)
}

fn move_vpids(cluster: &Cluster, vpids: &[i64], to: usize) -> Output {
    move_vpids_with(cluster, vpids, to, &[])
}

fn move_vpids_with(cluster: &Cluster, vpids: &[i64], to: usize, flags: &[&str]) -> Output {
    let group: Vec<String> = vpids.iter().map(|v| v.to_string()).collect();
    let group = group.join(",");
    Command::new(bin_dir().join("migrate-cli"))
        .arg("--config")
        .arg(&cluster.config)
        .args(["--node", &cluster.nodes[CLIENT].name, "move", "--group", &group, &cluster.nodes[to].name, "--json"])
        .args(flags)
        .env_remove("LD_PRELOAD")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn report_of(cluster: &Cluster, out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "move --json printed no report ({e}): {}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
            agent_logs(cluster)
        )
    })
}

/// Both members on node `at` in every node's `ps`.
fn assert_both_on(cluster: &Cluster, g: &Group, at: usize) {
    assert_both_on_vpids(cluster, &[g.front, g.cache], at)
}

fn assert_both_on_vpids(cluster: &Cluster, vpids: &[i64], at: usize) {
    let name = cluster.nodes[at].name.as_str();
    for ask in 0..cluster.nodes.len() {
        dvk_tests::wait_until(REACH, &format!("{vpids:?} on {name} in node{}'s ps", ask + 1), || {
            let ps = cluster.ps(ask);
            vpids.iter().all(|v| ps.iter().any(|r| r["vpid"] == *v && r["node"] == name))
        });
    }
}

fn moved(cluster: &Cluster, g: &Group, to: usize, flags: &[&str]) -> serde_json::Value {
    let out = move_group(cluster, g, to, flags);
    let report = report_of(cluster, &out);
    assert!(
        out.status.success() && report["committed"] == true,
        "group move to {} failed: {}\n{report:#}\n{}",
        cluster.nodes[to].name,
        String::from_utf8_lossy(&out.stderr),
        agent_logs(cluster)
    );
    let others = report["group"].as_array().expect("the report lists the other members");
    assert_eq!(others.len(), 1);
    assert_eq!(others[0]["vpid"], g.cache);
    assert_ne!(others[0]["new_pid"], 0, "the cache's pid on the destination is reported");
    // The front's connection to the cache is one stream between the two, moved with both ends.
    let freeze = step_detail(&report, "freeze").unwrap_or_default();
    assert!(freeze.contains("1 between members of the group"), "freeze step: {freeze}");
    assert_both_on(cluster, g, to);
    report
}

#[test]
fn a_server_and_its_cache_move_together_under_load_loopback() {
    server_and_cache("a_server_and_its_cache_move_together_under_load_loopback", Mode::Loopback);
}

#[test]
fn a_server_and_its_cache_move_together_under_load_network() {
    server_and_cache("a_server_and_its_cache_move_together_under_load_network", Mode::Network);
}

fn server_and_cache(test: &str, mode: Mode) {
    if dvk_tests::moving::skip_without_root(test) || dvk_tests::skip_unless(mode, test) {
        return;
    }
    let cluster = Cluster::start(3, mode);
    let mut g = start_group(&cluster, 4000);
    // There with pre-copy: each member's memory copied in rounds while both still serve.
    let there = moved(&cluster, &g, DEST, &["--precopy"]);
    let precopy: Vec<&serde_json::Value> =
        there["steps"].as_array().unwrap().iter().filter(|s| s["name"] == "pre-copy").collect();
    assert_eq!(precopy.len(), 2, "a pre-copy step per member: {there:#}");
    for (step, v) in precopy.iter().zip([g.front, g.cache]) {
        let detail = step["detail"].as_str().unwrap_or_default();
        assert!(detail.starts_with(&format!("vPID {v}: ")) && detail.contains("round(s)"), "{detail}");
    }
    g.client.lines.wait_for("progress", LOOP);
    // Back with the page data compressed on the link.
    let back = moved(&cluster, &g, SOURCE, &["--compress"]);
    let done = client_done(&cluster, &mut g.client);
    eprintln!(
        "{test}: {done}; frozen {} ms and {} ms",
        there["frozen_micros"].as_u64().unwrap_or(0) / 1000,
        back["frozen_micros"].as_u64().unwrap_or(0) / 1000
    );
}

#[test]
fn a_group_move_whose_last_member_fails_to_restore_rolls_all_back_loopback() {
    let test = "a_group_move_whose_last_member_fails_to_restore_rolls_all_back_loopback";
    if dvk_tests::moving::skip_without_root(test) {
        return;
    }
    let mut cluster = Cluster::start(3, Mode::Loopback);
    cluster.restart_agent_with(DEST, &[("DVK_TEST_FAULT", "fail-last-member")]);
    let mut g = start_group(&cluster, 4000);
    let out = move_group(&cluster, &g, DEST, &[]);
    let report = report_of(&cluster, &out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && report["committed"] == false, "the move should have rolled back: {report:#}");
    let reason = report["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("vPID {} of the group", g.cache)) && reason.contains("test fault"),
        "the reason names the member that failed: {reason}"
    );
    assert!(stderr.contains("they run on node1 as before"), "migrate-cli says where the group runs: {stderr}");
    // The front was restored (held) before the cache failed: it never ran on node2, and it is
    // gone there; both still run on node1 and the client goes on through them.
    assert_both_on(&cluster, &g, SOURCE);
    assert!(!cluster.log_of(DEST).contains("moved process resumed here"), "{}", agent_logs(&cluster));
    g.client.lines.wait_for("progress", LOOP);
    // The rollback left both movable.
    cluster.restart_agent_with(DEST, &[]);
    moved(&cluster, &g, DEST, &[]);
    let done = client_done(&cluster, &mut g.client);
    eprintln!("{test}: {done}");
}

/// Both directions of a stream between two members full at every stage when the group moves
/// (the sender's socket, the relay, the receiver's unread bytes): after the move each side
/// reads everything the other sent, checked by length and sha256.
#[test]
fn a_full_stream_between_two_members_keeps_every_byte_both_ways_loopback() {
    full_stream_between_members("a_full_stream_between_two_members_keeps_every_byte_both_ways_loopback", false);
}

/// The same when the group move rolls back (the second member fails to restore): the relay
/// between the original sockets is made again and owes each side what it held.
#[test]
fn a_full_stream_between_two_members_keeps_every_byte_when_the_move_rolls_back_loopback() {
    full_stream_between_members(
        "a_full_stream_between_two_members_keeps_every_byte_when_the_move_rolls_back_loopback",
        true,
    );
}

fn full_stream_between_members(test: &str, fail: bool) {
    if dvk_tests::moving::skip_without_root(test) {
        return;
    }
    const PAIR_PORT: u16 = 7200;
    const BYTES: usize = 4 << 20;
    let mut cluster = Cluster::start(3, Mode::Loopback);
    if fail {
        cluster.restart_agent_with(DEST, &[("DVK_TEST_FAULT", "fail-last-member")]);
    }
    let trigger = cluster.path("pair-go");
    let result = |who: &str| cluster.path(&format!("pair-{who}.result"));
    let pair = |role: &str, seed: u32, endpoint: &str| {
        let mut cmd = cluster.preloaded(SOURCE, python3());
        cmd.args(["-c", PAIR_PY, role]);
        if role == "client" {
            cmd.arg("pair.dc0.dvk");
        }
        cmd.args([PAIR_PORT.to_string(), BYTES.to_string(), seed.to_string()])
            .arg(&trigger)
            .arg(result(role))
            .env("DVK_ENDPOINT", endpoint)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(cluster.path(&format!("pair-{role}.err"))).unwrap());
        let p = Proc::spawn(no_inherited_fds(&mut cmd), role);
        let vpid = cluster.wait_registered(SOURCE, p.pid())["vpid"].as_i64().unwrap();
        (p, vpid)
    };
    let (mut server, server_vpid) = pair("server", 1, "pair");
    server.lines.wait_for("listening", REACH);
    let (mut client, client_vpid) = pair("client", 2, "pair-client");
    let server_blob = server.lines.wait_for("blob", REACH);
    let client_blob = client.lines.wait_for("blob", REACH);
    // Nobody reads: each sender stops once the stream is full (≈ 450–500 KB here). 320 KB sent
    // each way is more than one socket holds, so the relay and both sockets hold bytes.
    for p in [&mut server, &mut client] {
        loop {
            let line = p.lines.wait_for("sent", REACH);
            if line.split_whitespace().nth(1).and_then(|n| n.parse::<usize>().ok()).unwrap_or(0) >= 320 << 10 {
                break;
            }
        }
    }
    let out = move_vpids(&cluster, &[server_vpid, client_vpid], DEST);
    let report = report_of(&cluster, &out);
    assert_eq!(out.status.success(), !fail, "{report:#}\n{}", agent_logs(&cluster));
    assert_eq!(report["committed"], !fail, "{report:#}\n{}", agent_logs(&cluster));
    let freeze = step_detail(&report, "freeze").unwrap_or_default();
    assert!(freeze.contains("1 between members of the group"), "freeze step: {freeze}");
    std::fs::write(&trigger, b"go").unwrap();
    for (who, sender_blob) in [("server", &client_blob), ("client", &server_blob)] {
        let path = result(who);
        dvk_tests::wait_until(LOOP, &format!("{who} read everything"), || path.exists());
        let got = std::fs::read_to_string(&path).unwrap();
        let want = format!("{BYTES} {}", sender_blob.trim_start_matches("blob "));
        assert_eq!(
            got,
            want,
            "what the {who} read after the move is what the other side sent\n{}",
            agent_logs(&cluster)
        );
    }
    eprintln!(
        "{test}: {} MB each way, frozen {} ms",
        BYTES >> 20,
        report["frozen_micros"].as_u64().unwrap_or(0) / 1000
    );
}

/// A group is checked whole before anything is frozen: every member's blockers are listed,
/// each under its vPID, and the members keep running where they are.
#[test]
fn a_group_with_a_blocked_member_lists_every_blocker_and_freezes_nothing_loopback() {
    let test = "a_group_with_a_blocked_member_lists_every_blocker_and_freezes_nothing_loopback";
    if dvk_tests::moving::skip_without_root(test) {
        return;
    }
    let cluster = Cluster::start(3, Mode::Loopback);
    let (_cache, cache) = start_server(&cluster, SOURCE, CACHE_PORT, MB);
    // A process with a child: its tree moves only from its root, never as a member of a group.
    let mut cmd = cluster.preloaded(SOURCE, python3());
    cmd.args([
        "-c",
        "import subprocess, time\n\
         p = subprocess.Popen(['sleep', '300'], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, \
         stderr=subprocess.DEVNULL)\n\
         print('started', p.pid, flush=True)\n\
         time.sleep(300)",
    ])
    .stdin(Stdio::null());
    let mut parent = Proc::spawn(no_inherited_fds(&mut cmd), "parent");
    let started = parent.lines.wait_for("started", REACH);
    let _child = KillOnDrop(started.split_whitespace().nth(1).and_then(|p| p.parse().ok()).expect("the child's pid"));
    let parent_vpid = cluster.wait_registered(SOURCE, parent.pid())["vpid"].as_i64().unwrap();
    let out = move_vpids(&cluster, &[cache, parent_vpid], DEST);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.stdout.is_empty(), "refused before it started: {stderr}");
    assert!(
        stderr.contains("the group of 2 processes cannot move")
            && stderr.contains("nothing was frozen")
            && stderr.contains(&format!("vPID {parent_vpid} (pid {}): ", parent.pid()))
            && stderr.contains("a process with children"),
        "every blocker named under its member: {stderr}"
    );
    let ps = cluster.ps(SOURCE);
    for v in [cache, parent_vpid] {
        let row = ps.iter().find(|r| r["vpid"] == v).expect("still registered");
        assert_eq!(row["node"], cluster.nodes[SOURCE].name.as_str());
    }
    let state = std::fs::read_to_string(format!("/proc/{}/stat", parent.pid())).unwrap();
    let state = state.rsplit(')').next().unwrap().split_whitespace().next().unwrap().to_owned();
    assert!(state == "S" || state == "R", "the parent was not left stopped: {state}");
}

/// A process this test started (a grandchild the harness does not know), killed when the test
/// ends, however it ends.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill(2) on a pid this test started; no memory is involved.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
        }
    }
}

/// Moving a group takes owning every member: a user who owns one process of the group cannot
/// move another user's process along with it (the owners are checked at the source, the
/// caller's uid taken from SO_PEERCRED where it asked); root may.
#[test]
fn a_user_cannot_move_another_users_process_in_a_group_with_her_own_loopback() {
    let test = "a_user_cannot_move_another_users_process_in_a_group_with_her_own_loopback";
    if dvk_tests::moving::skip_without_root(test) {
        return;
    }
    const NOBODY: u32 = 65534;
    let cluster = Cluster::start(3, Mode::Loopback);
    let (_cache, roots) = start_server(&cluster, SOURCE, CACHE_PORT, MB);
    // Her process: the paper's server run as nobody, the shim preloaded after the uid change.
    let mut cmd = cluster.command(SOURCE, "setpriv");
    cmd.args([format!("--reuid={NOBODY}"), format!("--regid={NOBODY}"), "--clear-groups".into(), "env".into()])
        .arg(format!("LD_PRELOAD={}", dvk_tests::shim_path().display()))
        .arg(c_program("move_server"))
        .args([(CACHE_PORT + 1).to_string(), "1".into()])
        .env("DVK_ENDPOINT", "hers")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(cluster.path("hers.err")).unwrap());
    let mut hers = Proc::spawn(no_inherited_fds(&mut cmd), "her server");
    hers.lines.wait_for("listening", REACH);
    let row = cluster.wait_registered(SOURCE, hers.pid());
    assert_eq!(row["uid"], NOBODY, "{row}");
    let her_vpid = row["vpid"].as_i64().unwrap();
    for ask in [SOURCE, CLIENT] {
        let out = Command::new("setpriv")
            .args([format!("--reuid={NOBODY}"), format!("--regid={NOBODY}"), "--clear-groups".into()])
            .arg(bin_dir().join("migrate-cli"))
            .arg("--socket")
            .arg(cluster.nodes[ask].socket())
            .args(["move", "--group", &format!("{her_vpid},{roots}"), &cluster.nodes[DEST].name])
            .env_remove("LD_PRELOAD")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "nobody moved root's process in her group (asked on node{})", ask + 1);
        assert!(
            err.contains("permission denied") && err.contains(&format!("vPID {roots}")) && err.contains("uid 0"),
            "asked on node{}: {err}",
            ask + 1
        );
    }
    assert_both_on_vpids(&cluster, &[her_vpid, roots], SOURCE);
    // Root may.
    let out = move_vpids(&cluster, &[her_vpid, roots], DEST);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), agent_logs(&cluster));
    assert_both_on_vpids(&cluster, &[her_vpid, roots], DEST);
}

/// A web front (python's http.server) that counts hits in redis over one persistent
/// connection: `/incr` answers INCR's value, `/get` the value as it is.
const WEB_FRONT_PY: &str = r#"
import http.server, socket, sys
port, cache_host, cache_port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
cache = socket.create_connection((cache_host, cache_port))
pending = b''

def command(*args):
    global pending
    cache.sendall(b'*%d\r\n' % len(args) + b''.join(b'$%d\r\n%s\r\n' % (len(a), a) for a in args))
    while b'\r\n' not in pending:
        data = cache.recv(4096)
        if not data:
            raise OSError('the cache closed the connection')
        pending += data
    line, pending = pending.split(b'\r\n', 1)
    if not line.startswith(b':'):
        raise OSError('unexpected answer %r' % line)
    return line[1:]

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        by = b'1' if self.path.startswith('/incr') else b'0'
        body = command(b'INCRBY', b'hits', by) + b'\n'
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = http.server.HTTPServer(('0.0.0.0', port), Handler)
print('listening', flush=True)
server.serve_forever()
"#;

/// Real software: redis as the cache of a python web front, moved together twice while curl
/// on node3 keeps asking the front to count. Every answer is the count before it plus one: no
/// increment lost or doubled, none answered by a cache that lost its state, no request
/// refused.
#[test]
fn a_web_front_and_its_redis_move_together_under_a_curl_loop_loopback() {
    let test = "a_web_front_and_its_redis_move_together_under_a_curl_loop_loopback";
    if dvk_tests::moving::skip_without_root(test) {
        return;
    }
    let (Some(redis), Some(_)) = (dvk_tests::net::which("redis-server"), dvk_tests::net::which("curl")) else {
        eprintln!("SKIP {test}: redis-server or curl not installed (ci/install-test-deps.sh)");
        return;
    };
    const REDIS_PORT: u16 = 6391;
    const WEB_PORT: u16 = 8011;
    const HITS: usize = 300;
    const PER_CURL: usize = 5;
    let cluster = Cluster::start(3, Mode::Loopback);
    let data = cluster.path("redis-data");
    std::fs::create_dir_all(&data).unwrap();
    let mut cmd = cluster.preloaded(SOURCE, &redis);
    cmd.args(["--port", &REDIS_PORT.to_string(), "--bind", "0.0.0.0", "--save", "", "--appendonly", "no"])
        .args(["--protected-mode", "no", "--daemonize", "no", "--dir"])
        .arg(&data)
        .arg("--logfile")
        .arg(cluster.path("redis.log"))
        .env("DVK_ENDPOINT", "cache")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let redis_pid = cluster.spawn(no_inherited_fds(&mut cmd));
    let cache = cluster.wait_registered(SOURCE, redis_pid)["vpid"].as_i64().unwrap();
    dvk_tests::net::wait_connectable(&cluster, SOURCE, "dc0", "cache.dc0.dvk", REDIS_PORT, REACH);
    let mut cmd = cluster.preloaded(SOURCE, python3());
    cmd.args(["-c", WEB_FRONT_PY, &WEB_PORT.to_string(), "cache.dc0.dvk", &REDIS_PORT.to_string()])
        .env("DVK_ENDPOINT", "web")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(cluster.path("web.err")).unwrap());
    let mut web = Proc::spawn(no_inherited_fds(&mut cmd), "web front");
    web.lines.wait_for("listening", REACH);
    let front = cluster.wait_registered(SOURCE, web.pid())["vpid"].as_i64().unwrap();
    dvk_tests::net::wait_connectable(&cluster, CLIENT, "dc0", "web.dc0.dvk", WEB_PORT, REACH);

    use std::sync::atomic::{AtomicUsize, Ordering};
    // Move k starts once MOVE_AT[k] hits are counted; the loop goes on meanwhile and waits at
    // GATE[k] until that move is over, so each move happens with requests under way.
    const MOVE_AT: [usize; 2] = [60, 180];
    const GATE: [usize; 2] = [120, 240];
    let (done, moves_done) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let answers = std::thread::scope(|s| {
        let looping = s.spawn(|| {
            let mut answers: Vec<u64> = Vec::new();
            while answers.len() < HITS {
                for (k, gate) in GATE.iter().enumerate() {
                    if answers.len() >= *gate {
                        dvk_tests::wait_until(LOOP, &format!("move {} over", k + 1), || {
                            moves_done.load(Ordering::Relaxed) > k
                        });
                    }
                }
                let mut curl = cluster.preloaded(CLIENT, "curl");
                curl.args(["-sS", "--fail", "--fail-early", "--noproxy", "*", "--max-time", "60"]);
                for i in answers.len()..answers.len() + PER_CURL {
                    curl.arg(format!("http://web.dc0.dvk:{WEB_PORT}/incr?hit={i}"));
                }
                dvk_tests::net::without_proxy(&mut curl);
                let out =
                    dvk_tests::net::run_bounded(no_inherited_fds(&mut curl), b"", Duration::from_secs(90), "curl");
                if !out.status.success() {
                    return Err(format!(
                        "curl failed after {} hits: {}",
                        answers.len(),
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
                answers.extend(String::from_utf8_lossy(&out.stdout).lines().map(|l| l.parse::<u64>().unwrap_or(0)));
                done.store(answers.len(), Ordering::Relaxed);
            }
            Ok(answers)
        });
        let mut reports = Vec::new();
        for (at, to) in MOVE_AT.into_iter().zip([DEST, SOURCE]) {
            dvk_tests::wait_until(LOOP, &format!("{at} hits counted"), || {
                looping.is_finished() || done.load(Ordering::Relaxed) >= at
            });
            let out = move_vpids(&cluster, &[front, cache], to);
            let report = report_of(&cluster, &out);
            assert!(out.status.success(), "{report:#}\n{}", agent_logs(&cluster));
            let freeze = step_detail(&report, "freeze").unwrap_or_default();
            assert!(freeze.contains("1 between members of the group"), "freeze step: {freeze}");
            assert_both_on_vpids(&cluster, &[front, cache], to);
            reports.push(report);
            moves_done.fetch_add(1, Ordering::Relaxed);
        }
        let answers = looping.join().unwrap().unwrap_or_else(|e| panic!("{e}\n{}", agent_logs(&cluster)));
        (answers, reports)
    });
    let (answers, reports) = answers;
    let want: Vec<u64> = (1..=HITS as u64).collect();
    assert_eq!(answers, want, "every hit counted once, in order, across both moves");
    let mut curl = cluster.preloaded(CLIENT, "curl");
    curl.args(["-sS", "--fail", "--noproxy", "*", "--max-time", "30", &format!("http://web.dc0.dvk:{WEB_PORT}/get")]);
    dvk_tests::net::without_proxy(&mut curl);
    let out = dvk_tests::net::run_bounded(no_inherited_fds(&mut curl), b"", Duration::from_secs(40), "curl /get");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), HITS.to_string(), "redis holds the count");
    eprintln!(
        "{test}: {HITS} hits; frozen {} ms and {} ms",
        reports[0]["frozen_micros"].as_u64().unwrap_or(0) / 1000,
        reports[1]["frozen_micros"].as_u64().unwrap_or(0) / 1000
    );
}
