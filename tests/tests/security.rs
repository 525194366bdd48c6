//! Attacks from issue 9, each as it was tried: a hostile unprivileged local user (nobody) or a
//! keyless remote, against a cluster of real agents. Every test here failed before its fix.
//!
//! They need root (to act as nobody and as root side by side) and skip visibly without it.

use dvk_tests::moving::{move_to, no_inherited_fds};
use dvk_tests::net::{probe, run_bounded, vm_rss_kib, wait_connectable, Proc};
use dvk_tests::programs::{c_program, python3};
use dvk_tests::{is_root, wait_until, Cluster, ClusterSpec, Mode};
use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

const NOBODY: u32 = 65534;
const REACH: Duration = Duration::from_secs(20);

fn skip_without_root(test: &str) -> bool {
    if !is_root() {
        eprintln!("SKIP {test}: needs root (it acts as nobody against a root agent)");
        return true;
    }
    false
}

/// `cmd` run as nobody (no supplementary groups: std drops them when it changes the uid).
fn as_nobody(cmd: &mut Command) -> &mut Command {
    cmd.uid(NOBODY).gid(NOBODY)
}

/// nobody's server: listens on PORT under the shim (a virtual listener: a socket file of
/// nobody's in the agent's listener dir), then renames a symlink to TARGET over that file.
const SWAP_SERVER: &str = r#"
import os, socket, sys
ep, target, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket()
s.bind(('0.0.0.0', port))
s.listen(16)
mine = [os.path.join(ep, n) for n in os.listdir(ep)
        if os.lstat(os.path.join(ep, n)).st_uid == os.getuid() and n.endswith('.sock')]
for p in mine:
    os.symlink(target, p + '.swap')
    os.rename(p + '.swap', p)
print('swapped', len(mine), flush=True)
sys.stdin.read()
"#;

/// Issue 9 item 1: the agent registered nobody's listener file, nobody swapped a symlink to a
/// root-only socket over it; a client connecting to nobody's endpoint must reach nobody's
/// listener — never, with root's credentials, the socket the symlink names.
#[test]
fn a_symlink_swapped_over_a_listener_never_leads_the_agent_to_a_root_only_socket() {
    if skip_without_root("a_symlink_swapped_over_a_listener_never_leads_the_agent_to_a_root_only_socket") {
        return;
    }
    let cluster = Cluster::start(1, Mode::Loopback);
    // root's private service: a socket in a 0700 directory nobody cannot even look into.
    let private = cluster.path("root-only");
    std::fs::create_dir(&private).unwrap();
    dvk_tests::set_mode(&private, 0o700);
    let target = private.join("service.sock");
    let root_service = std::os::unix::net::UnixListener::bind(&target).unwrap();
    root_service.set_nonblocking(true).unwrap();

    let ep_dir = cluster.nodes[0].runtime_dir.join("ep");
    let mut server = Proc::spawn(
        as_nobody(
            cluster
                .preloaded(0, python3())
                .args(["-c", SWAP_SERVER])
                .arg(&ep_dir)
                .arg(&target)
                .arg("7000")
                .env("DVK_DC", "dc0")
                .env("DVK_ENDPOINT", "evil")
                .stdin(Stdio::piped()),
        ),
        "nobody's swapping server",
    );
    let line = server.lines.wait_for("swapped", REACH);
    assert_eq!(line, "swapped 1", "nobody's server should have made exactly one listener file");

    let (connected, said) = probe(&cluster, 0, "dc0", "evil.dc0.dvk", 7000);
    match root_service.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Ok(_) => panic!("the agent connected to root's private socket through nobody's symlink"),
        Err(e) => panic!("accept on root's socket: {e}"),
    }
    // The stream went where it was registered: nobody's own listener, which still listens.
    assert!(connected, "a client of nobody's endpoint was refused: {said}");
}

/// Speaks the local protocol by hand (postcard: varints, length-prefixed strings): registers
/// as `evil` in dc0, hard-links SOURCE (a socket file of its own that another process serves)
/// into the listener dir and asks the agent to listen on it as port 7100.
const LINK_AND_LISTEN: &str = r#"
import os, socket, struct, sys
agent, source, ep = sys.argv[1], sys.argv[2], sys.argv[3]
def varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7f, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)
def s(x):
    b = x.encode()
    return varint(len(b)) + b
def call(c, body):
    c.sendall(struct.pack('<I', len(body)) + body)
    n = struct.unpack('<I', c.recv(4, socket.MSG_WAITALL))[0]
    return c.recv(n, socket.MSG_WAITALL)
linked = os.path.join(ep, 'linked.sock')
os.link(source, linked)
c = socket.socket(socket.AF_UNIX)
c.connect(agent)
call(c, b'\x01' + varint(1) + s('dc0') + b'\x01' + s('evil'))  # Register
r = call(c, b'\x07' + varint(7100) + s(linked))  # Listen
print('listen', r.decode('utf-8', 'replace'), flush=True)
sys.stdin.read()
"#;

/// Issue 9 item 1, the other way in: a socket file the user owns but another process serves
/// (a root daemon's per-user socket, say), hard-linked into the listener dir and registered
/// with a hand-made `Listen`. The owner check alone let the agent deliver streams to that
/// daemon as root; the agent now also checks that the caller itself listens on the file.
#[test]
fn a_hard_linked_socket_that_the_caller_does_not_serve_is_refused() {
    if skip_without_root("a_hard_linked_socket_that_the_caller_does_not_serve_is_refused") {
        return;
    }
    let cluster = Cluster::start(1, Mode::Loopback);
    // root's daemon, with a per-user socket that belongs to nobody.
    let daemon_dir = cluster.path("daemon");
    std::fs::create_dir(&daemon_dir).unwrap();
    dvk_tests::set_mode(&daemon_dir, 0o755);
    let per_user = daemon_dir.join("nobody.sock");
    let daemon = std::os::unix::net::UnixListener::bind(&per_user).unwrap();
    daemon.set_nonblocking(true).unwrap();
    std::os::unix::fs::chown(&per_user, Some(NOBODY), Some(NOBODY)).unwrap();

    let mut attack = Proc::spawn(
        as_nobody(
            Command::new(python3())
                .args(["-c", LINK_AND_LISTEN])
                .arg(cluster.nodes[0].socket())
                .arg(&per_user)
                .arg(cluster.nodes[0].runtime_dir.join("ep"))
                .stdin(Stdio::piped()),
        ),
        "nobody's hand-made Listen",
    );
    let answer = attack.lines.wait_for("listen", REACH);
    let (connected, said) = probe(&cluster, 0, "dc0", "evil.dc0.dvk", 7100);
    match daemon.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Ok(_) => panic!("the agent connected, as root, to the daemon's socket nobody registered ({answer})"),
        Err(e) => panic!("accept on the daemon's socket: {e}"),
    }
    assert!(answer.contains("listens on"), "the Listen was not refused for the right reason: {answer}");
    assert!(!connected, "a client reached an endpoint that should not exist: {said}");
}

/// Renames a symlink to TARGET over PATH (run as the owner of PATH).
const SWAP: &str =
    "import os, sys; os.symlink(sys.argv[2], sys.argv[1] + '.swap'); os.rename(sys.argv[1] + '.swap', sys.argv[1])";

/// Issue 9 item 1, after a move: the destination's agent makes the moved process's listener
/// and gives it to the process's user, who can then rename a symlink over it just the same.
#[test]
fn a_symlink_swapped_over_a_moved_listener_never_leads_the_agent_to_a_root_only_socket() {
    if skip_without_root("a_symlink_swapped_over_a_moved_listener_never_leads_the_agent_to_a_root_only_socket") {
        return;
    }
    let cluster = Cluster::start(2, Mode::Loopback);
    let private = cluster.path("root-only");
    std::fs::create_dir(&private).unwrap();
    dvk_tests::set_mode(&private, 0o700);
    let target = private.join("service.sock");
    let root_service = std::os::unix::net::UnixListener::bind(&target).unwrap();
    root_service.set_nonblocking(true).unwrap();

    let log = std::fs::File::create(cluster.path("server.err")).unwrap();
    let mut cmd = cluster.preloaded(0, c_program("move_server"));
    cmd.args(["7000", "1"]).env("DVK_ENDPOINT", "kv").stdin(Stdio::null()).stderr(log);
    let mut server = Proc::spawn(no_inherited_fds(as_nobody(&mut cmd)), "nobody's move_server");
    server.lines.wait_for("listening", REACH);
    let vpid = cluster.wait_registered(0, server.pid())["vpid"].as_i64().unwrap();
    move_to(&cluster, 0, vpid, 1);

    let ep_dir = cluster.nodes[1].runtime_dir.join("ep");
    let moved: Vec<_> = std::fs::read_dir(&ep_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.uid() == NOBODY && m.file_type().is_socket()))
        .collect();
    assert_eq!(moved.len(), 1, "one listener of nobody's on node2 after the move: {moved:?}");
    let out = run_bounded(
        as_nobody(Command::new(python3()).args(["-c", SWAP]).arg(&moved[0]).arg(&target)),
        b"",
        REACH,
        "nobody's swap",
    );
    assert!(out.status.success(), "nobody could not swap her listener: {}", String::from_utf8_lossy(&out.stderr));

    let (connected, said) = probe(&cluster, 1, "dc0", "kv.dc0.dvk", 7000);
    match root_service.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Ok(_) => panic!("the agent connected to root's private socket through nobody's symlink"),
        Err(e) => panic!("accept on root's socket: {e}"),
    }
    assert!(connected, "a client of the moved endpoint was refused: {said}");
}

/// An echo server under the shim (endpoint web:8000 in dc0).
const ECHO_SERVER: &str = r#"
import socket, threading
s = socket.socket()
s.bind(('0.0.0.0', 8000))
s.listen(64)
print('listening', flush=True)
def serve(c):
    with c:
        while True:
            d = c.recv(65536)
            if not d:
                return
            c.sendall(d)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Sends `ping` to HOST:PORT and prints the answer.
const PING: &str = r#"
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    c.sendall(b'ping')
    d = b''
    while len(d) < 4:
        x = c.recv(16)
        if not x:
            break
        d += x
    print('reply', d.decode() or 'none', flush=True)
except OSError as e:
    print('error', e, flush=True)
"#;

fn ping(cluster: &Cluster, node: usize) -> String {
    let out = run_bounded(
        cluster.preloaded(node, python3()).args(["-c", PING, "web.dc0.dvk", "8000"]).env("DVK_DC", "dc0"),
        b"",
        Duration::from_secs(30),
        "ping client",
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Holds N idle connections to the agent's local socket and N keyless ones to its peer port.
const FLOOD: &str = r#"
import resource, socket, sys
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
path, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
held = []
local = peer = 0
for i in range(n):
    u = socket.socket(socket.AF_UNIX)
    u.setblocking(False)
    try:
        u.connect(path)
        local += 1
    except OSError:
        pass
    held.append(u)
    t = socket.socket()
    t.setblocking(False)
    if t.connect_ex((host, port)) in (0, 115):
        peer += 1
    held.append(t)
print('holding', local, peer, flush=True)
sys.stdin.read()
"#;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Issue 9 item 3: nobody floods node1's agent (fd limit 256, a small systemd default) with
/// idle local connections and keyless peer connections. A stream opened meanwhile from node2
/// to the healthy endpoint on node1 must work, and the endpoint must outlive the flood (it was
/// unlinked and announced gone when connect() to its listener failed with EMFILE).
#[test]
fn a_connection_flood_does_not_delete_a_healthy_endpoint() {
    if skip_without_root("a_connection_flood_does_not_delete_a_healthy_endpoint") {
        return;
    }
    const NOFILE: u64 = 256;
    let mut cluster = Cluster::start(2, Mode::Loopback);
    cluster.restart_agent_with_nofile(0, NOFILE);
    let mut server = Proc::spawn(
        cluster.preloaded(0, python3()).args(["-c", ECHO_SERVER]).env("DVK_DC", "dc0").env("DVK_ENDPOINT", "web"),
        "echo server",
    );
    server.lines.wait_for("listening", REACH);
    wait_connectable(&cluster, 1, "dc0", "web.dc0.dvk", 8000, REACH);
    assert_eq!(ping(&cluster, 1), "reply ping");

    let agent = cluster.nodes[0].agent_pid().unwrap();
    let (host, port) = cluster.nodes[0].peer_addr.rsplit_once(':').unwrap();
    let mut flood = Proc::spawn(
        as_nobody(Command::new(python3()).args(["-c", FLOOD]))
            .arg(cluster.nodes[0].socket())
            .args([host, port, "400"])
            .stdin(Stdio::piped()),
        "nobody's flood",
    );
    flood.lines.wait_for("holding", REACH);
    // Either the agent is out of fds, or it capped nobody: the flood has done what it can.
    wait_until(REACH, "the flood to fill the agent's fds or hit nobody's cap", || {
        open_fds(agent) as u64 >= NOFILE - 4 || cluster.log_of(0).contains("its cap; refusing more")
    });

    assert_eq!(ping(&cluster, 1), "reply ping", "a stream to the healthy endpoint failed during the flood");
    // Keyless connections beyond the few handshakes allowed at once were turned away at once.
    wait_until(REACH, "the agent to cap keyless handshakes", || {
        cluster.log_of(0).contains("peer handshakes already in flight")
    });
    drop(flood);
    assert_eq!(ping(&cluster, 1), "reply ping", "the endpoint did not outlive the flood");
    assert!(
        !cluster.log_of(0).contains("endpoint no longer listening"),
        "the flood made the agent retire a healthy endpoint"
    );
    drop(server);
}

/// Issue 9 item 3: a local connection that never registers (it held one of the agent's fds
/// forever) is closed by the agent. Bounded: the agent's limit is 10 s, the test waits 60.
#[test]
fn an_idle_local_connection_is_closed_before_it_registers() {
    let cluster = Cluster::start(1, Mode::Loopback);
    let mut idle = std::os::unix::net::UnixStream::connect(cluster.nodes[0].socket()).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut buf = [0u8; 16];
    match std::io::Read::read(&mut idle, &mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("the agent sent {n} bytes to a connection that asked nothing"),
        Err(e) => panic!("the agent kept an idle, unregistered connection open: {e}"),
    }
}

/// Sends N local frames that each announce 1 MiB and carry all of it but the last byte
/// (so the agent, waiting for that byte, holds what it read), then N at the largest request
/// size the agent accepts.
const BIG_FRAMES: &str = r#"
import resource, socket, struct, sys
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
path, n = sys.argv[1], int(sys.argv[2])
held = []
for size in (1 << 20, 64 << 10):
    for i in range(n):
        u = socket.socket(socket.AF_UNIX)
        u.settimeout(2)
        try:
            u.connect(path)
            u.sendall(struct.pack('<I', size) + b'\x01' * (size - 1))
        except OSError:
            pass
        held.append(u)
print('sent', flush=True)
sys.stdin.read()
"#;

/// Issue 9 item 4: 600 local connections with 1 MiB frames grew the agent to 625 MB. The
/// agent now reads requests of 64 KiB at most, within a budget shared by all connections.
#[test]
fn oversized_local_frames_do_not_grow_the_agent() {
    if skip_without_root("oversized_local_frames_do_not_grow_the_agent") {
        return;
    }
    let cluster = Cluster::start(1, Mode::Loopback);
    let agent = cluster.nodes[0].agent_pid().unwrap();
    let before = vm_rss_kib(agent).unwrap();
    let mut attack = Proc::spawn(
        as_nobody(Command::new(python3()).args(["-c", BIG_FRAMES]))
            .arg(cluster.nodes[0].socket())
            .arg("600")
            .stdin(Stdio::piped()),
        "nobody's big frames",
    );
    attack.lines.wait_for("sent", Duration::from_secs(120));
    let after = vm_rss_kib(agent).unwrap();
    let grown_mib = after.saturating_sub(before) / 1024;
    eprintln!("agent VmRSS {before} KiB before, {after} KiB with the frames pending: +{grown_mib} MiB");
    assert!(grown_mib < 64, "600 pending oversized frames grew the agent by {grown_mib} MiB");
    // Still serving.
    assert!(cluster.cli(0, &["ps", "--json"]).status.success());
    drop(attack);
}

/// Issue 9 item 8: nobody prepares an image directory of hers with `pages.img` a symlink to a
/// root-only file, and has root dump a process into it. The dump must refuse the directory,
/// before anything is frozen or written, and the root-only file must be untouched.
#[test]
fn a_dump_into_another_users_directory_is_refused() {
    if skip_without_root("a_dump_into_another_users_directory_is_refused") {
        return;
    }
    let base = tempfile::Builder::new().prefix("dvk-sec-dump-").tempdir().unwrap();
    dvk_tests::set_mode(base.path(), 0o755);
    let private = base.path().join("root-only");
    std::fs::create_dir(&private).unwrap();
    dvk_tests::set_mode(&private, 0o700);
    let victim = private.join("secret");
    std::fs::write(&victim, b"precious").unwrap();
    dvk_tests::set_mode(&victim, 0o600);

    let trap = base.path().join("nobodys-images");
    std::fs::create_dir(&trap).unwrap();
    std::os::unix::fs::chown(&trap, Some(NOBODY), Some(NOBODY)).unwrap();
    let planted = trap.join("pages.img");
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    std::os::unix::fs::lchown(&planted, Some(NOBODY), Some(NOBODY)).unwrap();

    // stdio on /dev/null: a pipe to the test would be refused by the dump's preflight.
    let mut sleep = Command::new("sleep");
    sleep.arg("120").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: between fork and exec only close_range runs (a raw syscall: no allocation, no
    // lock). Fds the test runner inherited would be refused by the dump's preflight too.
    unsafe {
        sleep.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let mut target = KillOnDrop(sleep.spawn().unwrap());
    let out = run_bounded(
        Command::new(dvk_tests::bin_dir().join("migrate-cli"))
            .args(["dump", &target.0.id().to_string(), "--leave-running", "--images"])
            .arg(&trap),
        b"",
        Duration::from_secs(60),
        "migrate-cli dump",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious", "root wrote through nobody's symlink");
    assert!(!out.status.success(), "dump into nobody's directory succeeded");
    assert!(stderr.contains("belongs to uid 65534"), "the refusal does not say why: {stderr}");
    assert!(target.0.try_wait().unwrap().is_none(), "the process died");
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A process under the shim that prints `up` and waits for its stdin to close.
const IDLE: &str = "import sys; print('up', flush=True); sys.stdin.read()";

/// What a move leaves when a process's stdout/stderr cannot follow it: `<runtime>/logs/<vpid>.log`,
/// 0600, given to the process's user.
fn plant_log(cluster: &Cluster, node: usize, vpid: i64, uid: u32, text: &str) {
    let dir = cluster.nodes[node].runtime_dir.join("logs");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{vpid}.log"));
    std::fs::write(&path, text).unwrap();
    dvk_tests::set_mode(&path, 0o600);
    std::os::unix::fs::chown(&path, Some(uid), Some(uid)).unwrap();
}

/// `migrate-cli logs VPID` asked of node `node`'s agent, as `uid`.
fn logs_as(cluster: &Cluster, node: usize, vpid: i64, uid: u32) -> std::process::Output {
    run_bounded(
        Command::new(dvk_tests::bin_dir().join("migrate-cli"))
            .arg("--socket")
            .arg(cluster.nodes[node].socket())
            .args(["logs", &vpid.to_string()])
            .env_remove("LD_PRELOAD")
            .uid(uid)
            .gid(uid),
        b"",
        REACH,
        "migrate-cli logs",
    )
}

/// Issue 9 (logs): `migrate-cli logs VPID` read any process's redirected log for any local
/// user. nobody asks for root's log, on the node that holds it and through another node (the
/// forwarded read); she gets an error and none of its bytes. Root and the owner still read.
#[test]
fn another_users_log_cannot_be_read() {
    if skip_without_root("another_users_log_cannot_be_read") {
        return;
    }
    let cluster = Cluster::start(2, Mode::Loopback);
    let mut roots = Proc::spawn(cluster.preloaded(0, python3()).args(["-c", IDLE]).stdin(Stdio::piped()), "root's");
    roots.lines.wait_for("up", REACH);
    let root_vpid = cluster.wait_registered(0, roots.pid())["vpid"].as_i64().unwrap();
    plant_log(&cluster, 0, root_vpid, 0, "root's password is hunter2\n");
    let mut hers =
        Proc::spawn(as_nobody(cluster.preloaded(0, python3()).args(["-c", IDLE]).stdin(Stdio::piped())), "nobody's");
    hers.lines.wait_for("up", REACH);
    let her_vpid = cluster.wait_registered(0, hers.pid())["vpid"].as_i64().unwrap();
    plant_log(&cluster, 0, her_vpid, NOBODY, "nobody's own line\n");
    // node2 must know where root's process runs to forward the read.
    wait_until(REACH, "node2 to see root's process", || cluster.ps(1).iter().any(|p| p["vpid"] == root_vpid));

    for node in [0, 1] {
        let out = logs_as(&cluster, node, root_vpid, NOBODY);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!stdout.contains("hunter2"), "nobody read root's log through node{}: {stdout}", node + 1);
        assert!(!out.status.success(), "migrate-cli logs of root's process succeeded for nobody on node{}", node + 1);
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("another user"), "refusal should say why on node{}: {said}", node + 1);

        let out = logs_as(&cluster, node, root_vpid, 0);
        assert!(String::from_utf8_lossy(&out.stdout).contains("hunter2"), "root could not read the log");
        let out = logs_as(&cluster, node, her_vpid, NOBODY);
        assert!(String::from_utf8_lossy(&out.stdout).contains("nobody's own line"), "nobody could not read her log");
    }
}

/// A cluster of two whose config ends with `dc_tables` (`[[dc]]` tables).
fn cluster_with_dcs(dc_tables: &str) -> Cluster {
    let mut cluster = Cluster::start_with(ClusterSpec { nodes: 2, mode: Mode::Loopback, not_started: vec![0, 1] });
    let mut config = std::fs::read_to_string(&cluster.config).unwrap();
    config.push_str(dc_tables);
    std::fs::write(&cluster.config, config).unwrap();
    cluster.start_agent(0);
    cluster.start_agent(1);
    cluster.wait_mesh();
    cluster
}

/// Prints the pid getpid() gives (a vPID once registered, else the real pid).
const WHOAMI: &str = "import os; print('pid', os.getpid(), flush=True)";

/// Issue 9 item 5: DCs are an isolation boundary (DESIGN §1), yet any user could join `prod`
/// by setting DVK_DC. With `[[dc]] name = "prod" users = ["root"]`, nobody's process is
/// refused registration (under any spelling of the DC) and keeps its real pid; nobody may
/// still run in a DC the config says nothing about; root may run in prod.
#[test]
fn a_user_not_allowed_in_a_dc_cannot_register_there() {
    if skip_without_root("a_user_not_allowed_in_a_dc_cannot_register_there") {
        return;
    }
    let cluster = cluster_with_dcs("\n[[dc]]\nname = \"prod\"\nusers = [\"root\"]\n");
    let run = |dc: &str, nobody: bool| {
        let mut cmd = cluster.preloaded(0, python3());
        cmd.args(["-c", WHOAMI]).env("DVK_DC", dc);
        if nobody {
            as_nobody(&mut cmd);
        }
        let out = run_bounded(&mut cmd, b"", REACH, "whoami");
        let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let pid: i32 = said.strip_prefix("pid ").and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{said}"));
        (pid, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    for dc in ["prod", "PROD"] {
        let (pid, stderr) = run(dc, true);
        assert!(!pidvirt::Vpid::is_virtual(pid), "nobody registered in DC {dc} (got vPID {pid})");
        assert!(stderr.contains("refused the registration"), "the shim should say why: {stderr}");
    }
    assert!(cluster.log_of(0).contains("may not run in DC `prod`"), "the agent should log the refusal");
    let (pid, stderr) = run("dc0", true);
    assert!(pidvirt::Vpid::is_virtual(pid), "nobody could not register in the open DC dc0: {stderr}");
    let (pid, stderr) = run("prod", false);
    assert!(pidvirt::Vpid::is_virtual(pid), "root could not register in prod: {stderr}");
}

/// A server under the shim: binds 0.0.0.0:PORT, listens, says `listening` (or `refused ERRNO`
/// and whether the socket ended up listening for real anywhere), then echoes one line per client.
const LISTENER: &str = r#"
import errno, socket, sys, threading
s = socket.socket()
s.bind(('0.0.0.0', int(sys.argv[1])))
try:
    s.listen(16)
except OSError as e:
    real = s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    print('refused', errno.errorcode[e.errno], 'accepting', real, flush=True)
    sys.exit(0)
print('listening', flush=True)
def serve(c):
    with c:
        c.sendall(sys.argv[2].encode() + b'\n')
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// `python3 LISTENER port greeting` under the shim on node `node` as `endpoint` in dc0.
fn listener(cluster: &Cluster, node: usize, endpoint: &str, port: u16, greeting: &str, nobody: bool) -> Proc {
    let mut cmd = cluster.preloaded(node, python3());
    cmd.args(["-c", LISTENER, &port.to_string(), greeting]).env("DVK_DC", "dc0").env("DVK_ENDPOINT", endpoint);
    if nobody {
        as_nobody(&mut cmd);
    }
    Proc::spawn(&mut cmd, endpoint)
}

/// Reads the greeting of `host:port` in dc0 from node `node`.
fn greeting(cluster: &Cluster, node: usize, host: &str, port: u16) -> String {
    const READ: &str =
        "import socket, sys\nc = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)\n\
                        print(c.makefile().readline().strip(), flush=True)";
    let out = run_bounded(
        cluster.preloaded(node, python3()).args(["-c", READ, host, &port.to_string()]).env("DVK_DC", "dc0"),
        b"",
        REACH,
        "greeting client",
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Issue 9 item 5: any user could squat `db:5432` before the real service started, and its
/// clients' passwords went to her. Now a name the config reserves for a user (`reserve = { db =
/// "root" }`), or one that another user's process already listens on (`web`, on any port),
/// is refused: nobody's listen() fails with EACCES / EADDRINUSE — and her socket does not
/// listen for real either (it used to, on a random port of 0.0.0.0). The real services work.
#[test]
fn a_squatter_is_refused_a_reserved_or_held_endpoint_name() {
    if skip_without_root("a_squatter_is_refused_a_reserved_or_held_endpoint_name") {
        return;
    }
    let cluster = cluster_with_dcs("\n[[dc]]\nname = \"dc0\"\nreserve = { db = \"root\" }\n");

    // nobody comes first, for the reserved name, on either node.
    for node in [0, 1] {
        let mut squatter = listener(&cluster, node, "db", 5432, "squatter", true);
        let said = squatter.lines.next(REACH, "the squatter's listen").unwrap_or_default();
        assert_eq!(said, "refused EACCES accepting 0", "nobody's listen on the reserved db:5432 on node{}", node + 1);
        // The spelling of a name does not matter: `DB` is the same host name.
        let mut squatter = listener(&cluster, node, "DB", 5433, "squatter", true);
        let said = squatter.lines.next(REACH, "the squatter's listen").unwrap_or_default();
        assert_eq!(said, "refused EACCES accepting 0", "nobody's listen on DB:5433 on node{}", node + 1);
    }
    let mut db = listener(&cluster, 0, "db", 5432, "the real db", false);
    db.lines.wait_for("listening", REACH);
    wait_until(REACH, "node2's clients to reach the real db", || {
        greeting(&cluster, 1, "db.dc0.dvk", 5432) == "the real db"
    });

    // root's web listens first; nobody then tries another port of the same name, on both nodes.
    let mut web = listener(&cluster, 0, "web", 8000, "root's web", false);
    web.lines.wait_for("listening", REACH);
    wait_until(REACH, "node2 to know web", || greeting(&cluster, 1, "web.dc0.dvk", 8000) == "root's web");
    for node in [0, 1] {
        let mut squatter = listener(&cluster, node, "web", 8001, "squatter", true);
        let said = squatter.lines.next(REACH, "the squatter's listen").unwrap_or_default();
        assert_eq!(said, "refused EADDRINUSE accepting 0", "nobody's listen on web:8001 on node{}", node + 1);
    }
    assert_eq!(greeting(&cluster, 1, "web.dc0.dvk", 8000), "root's web");
    // A name nobody holds alone is hers to use.
    let mut hers = listener(&cluster, 1, "blog", 8080, "nobody's blog", true);
    hers.lines.wait_for("listening", REACH);
    wait_until(REACH, "node1's clients to reach nobody's blog", || {
        greeting(&cluster, 0, "blog.dc0.dvk", 8080) == "nobody's blog"
    });
}

/// Issue 9 item 5: when the shim could not make a virtual listener (here: another user's file
/// already sits at the listener path it picks, in the sticky listener directory), listen()
/// fell back to the real one — on a socket whose bind was only recorded, so the kernel bound
/// a random port of 0.0.0.0 and the server listened there, silently. It must fail instead.
#[test]
fn a_listener_that_cannot_be_made_fails_instead_of_listening_on_a_random_port() {
    if skip_without_root("a_listener_that_cannot_be_made_fails_instead_of_listening_on_a_random_port") {
        return;
    }
    let cluster = Cluster::start(1, Mode::Loopback);
    // Waits for a line on stdin between creating the socket (its fd is known) and bind/listen.
    const GATED: &str = "import sys\nsys.stdin.readline()\nexec(sys.argv[3])";
    let mut cmd = cluster.preloaded(0, python3());
    cmd.args(["-c", GATED, "5432", "x", LISTENER]).env("DVK_DC", "dc0").env("DVK_ENDPOINT", "db");
    let mut server = Proc::spawn(as_nobody(cmd.stdin(Stdio::piped())), "nobody's db");
    cluster.wait_registered(0, server.pid());
    // The first listener of a process is `<pid>-<fd>-0.sock`: another user's files take those
    // names for every fd the server's socket may get.
    let ep = cluster.nodes[0].runtime_dir.join("ep");
    for fd in 3..64 {
        let planted = ep.join(format!("{}-{fd}-0.sock", server.pid()));
        std::fs::write(&planted, b"").unwrap();
        std::os::unix::fs::chown(&planted, Some(NOBODY - 1), Some(NOBODY - 1)).unwrap();
    }
    use std::io::Write;
    server.child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let said = server.lines.next(REACH, "the server's listen").unwrap_or_default();
    assert!(said.starts_with("refused ") && said.ends_with("accepting 0"), "listen() should fail, not listen: {said}");
}

/// Sends N copies of FRAME (one local request) to the agent at SOCK on one connection, one at
/// a time, and counts the answers whose first body byte is TAG.
const RESERVE_FLOOD: &str = r#"
import socket, struct, sys
sock, frame, tag, n = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
c = socket.socket(socket.AF_UNIX)
c.connect(sock)
def read(k):
    b = b''
    while len(b) < k:
        x = c.recv(k - len(b))
        if not x:
            print('closed after', ok, flush=True)
            sys.exit(1)
        b += x
    return b
ok = 0
for _ in range(n):
    c.sendall(frame)
    body = read(struct.unpack('<I', read(4))[0])
    ok += body[0] == tag
print('reserved', ok, flush=True)
"#;

/// Forks once and prints what fork() returned (a vPID when the agent reserved one).
const FORK_ONCE: &str =
    "import os\npid = os.fork()\nif pid == 0:\n    os._exit(0)\nos.waitpid(pid, 0)\nprint('child', pid, flush=True)";

/// Issue 9 item 9: any local user could burn the node's vPIDs with `ReserveVpid` (830–2700/s,
/// never given back). nobody floods her agent with 3000 reservations: only what her uid's
/// budget allows is granted (at most 1024 unclaimed at once), and root's
/// fork right after still gets a vPID.
#[test]
fn a_reservation_flood_is_limited_to_its_uid() {
    if skip_without_root("a_reservation_flood_is_limited_to_its_uid") {
        return;
    }
    use dvk_protocol::frame;
    use dvk_protocol::local::{LocalRequest, LocalResponse};
    let cluster = Cluster::start(1, Mode::Loopback);
    let request = frame::encode(&LocalRequest::ReserveVpid, frame::LOCAL_MAX_FRAME).unwrap();
    let answer = frame::encode(&LocalResponse::VpidReserved { vpid: pidvirt::Vpid(0) }, 1024).unwrap();
    let hex: String = request.iter().map(|b| format!("{b:02x}")).collect();
    let sock = cluster.nodes[0].socket();
    let started = std::time::Instant::now();
    let out = run_bounded(
        as_nobody(cluster.preloaded(0, python3()).args(["-c", RESERVE_FLOOD]).arg(&sock).args([
            hex.as_str(),
            &answer[frame::HEADER_LEN].to_string(),
            "3000",
        ])),
        b"",
        Duration::from_secs(120),
        "nobody's reservation flood",
    );
    let minutes = started.elapsed().as_secs() / 60 + 1;
    let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let granted: u64 = said
        .strip_prefix("reserved ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("flood said `{said}`: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(granted > 0, "nobody got no reservation at all");
    assert!(granted <= 1024 * minutes, "nobody was granted {granted} of 3000 reservations");

    let fork = || {
        let mut cmd = cluster.preloaded(0, python3());
        cmd.args(["-c", FORK_ONCE]);
        let out = run_bounded(&mut cmd, b"", REACH, "fork once");
        let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        said.strip_prefix("child ").and_then(|p| p.parse::<i32>().ok()).unwrap_or_else(|| panic!("{said}"))
    };
    assert!(pidvirt::Vpid::is_virtual(fork()), "root's child got no vPID after nobody's flood");
}

/// vPIDs are reused (issue 9 item 9), and a moved process's stdout that cannot follow goes to
/// `<runtime>/logs/<vpid>.log` on the destination. A log an earlier holder of the same vPID
/// left there, another user's, must not become the new holder's (appended to and given to
/// her, she could read it with `migrate-cli logs`).
#[test]
fn a_log_left_by_an_earlier_holder_of_a_vpid_is_not_given_to_the_next() {
    if skip_without_root("a_log_left_by_an_earlier_holder_of_a_vpid_is_not_given_to_the_next") {
        return;
    }
    let cluster = Cluster::start(2, Mode::Loopback);
    let log = std::fs::File::create(cluster.path("server.err")).unwrap();
    let mut cmd = cluster.preloaded(0, c_program("move_server"));
    cmd.args(["7000", "1"]).env("DVK_ENDPOINT", "kv").stdin(Stdio::null()).stderr(log);
    // Its stdout is a pipe to this test: it cannot follow, it goes to the log on node2.
    let mut server = Proc::spawn(no_inherited_fds(as_nobody(&mut cmd)), "nobody's move_server");
    server.lines.wait_for("listening", REACH);
    let vpid = cluster.wait_registered(0, server.pid())["vpid"].as_i64().unwrap();
    plant_log(&cluster, 1, vpid, 0, "an earlier root process with this vPID said hunter2\n");
    move_to(&cluster, 0, vpid, 1);
    let out = logs_as(&cluster, 1, vpid, NOBODY);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(!said.contains("hunter2"), "nobody read the earlier holder's log: {said}");
    let path = cluster.nodes[1].runtime_dir.join("logs").join(format!("{vpid}.log"));
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(!on_disk.contains("hunter2"), "the earlier holder's log was handed to nobody: {on_disk}");
}

/// Issue 9 item 9: vPIDs were never reused, so a node that handed out its whole range could
/// register nothing more. With the range cut to 16 numbers (and no quarantine, a test knob of
/// the agent), 100 processes that register and exit one after another each get a vPID: the
/// numbers of those that exited come back.
#[test]
fn vpids_of_exited_processes_come_back_far_beyond_the_range() {
    let mut cluster = Cluster::start_with(ClusterSpec { nodes: 1, mode: Mode::Loopback, not_started: vec![0] });
    cluster.restart_agent_with(0, &[("DVK_TEST_VPID_RANGE", "16"), ("DVK_TEST_VPID_QUARANTINE_MS", "0")]);
    let mut seen = std::collections::BTreeSet::new();
    for round in 0..100 {
        let mut got = None;
        // The agent sees the previous process's exit through its pidfd, a moment after it: a
        // process that came first gets its real pid (a few tries at most).
        for _try in 0..50 {
            let out = run_bounded(cluster.preloaded(0, python3()).args(["-c", WHOAMI]), b"", REACH, "whoami");
            let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let pid: i32 = said.strip_prefix("pid ").and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{said}"));
            if pidvirt::Vpid::is_virtual(pid) {
                got = Some(pid);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let vpid =
            got.unwrap_or_else(|| panic!("process {round} got no vPID: the range is used up\n{}", cluster.log_of(0)));
        seen.insert(vpid);
    }
    assert!(seen.len() <= 16, "vPIDs outside the 16-number range: {seen:?}");
}
