//! Virtual endpoints, end to end (issue 4): unmodified socket programs under
//! the shim talk across nodes through the agents — python's http.server and
//! curl, redis-server with redis-cli and redis-benchmark, plain clients through
//! ingress, 1 GiB each way with checksums, TCP socket semantics call by call,
//! DC isolation, and per-stream flow control with bounded agent memory.
//!
//! Scenarios run in loopback mode and, as root, in network mode (each node a
//! network namespace on 192.0.2.0/24); the heavy ones run in loopback mode.
//! Every wait is bounded; a hung program is killed and the test fails with
//! what it printed.

use dvk_tests::net::{
    cluster_with_ingress, probe, run_bounded, run_ok, tail, vm_rss_kib, wait_connectable, wait_plain_connectable,
    which, without_proxy, Lines, Proc,
};
use dvk_tests::programs::{c_program, python3};
use dvk_tests::{skip_unless, wait_until, Cluster, Mode};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const REACH: Duration = Duration::from_secs(20);
const SHORT: Duration = Duration::from_secs(30);

fn log_file(cluster: &Cluster, name: &str) -> std::fs::File {
    std::fs::File::create(cluster.path(name)).unwrap()
}

fn read_log(cluster: &Cluster, name: &str) -> String {
    std::fs::read_to_string(cluster.path(name)).unwrap_or_default()
}

/// Fails the test with the server's log when the server has exited.
fn assert_alive(pid: u32, what: &str, log: &str) {
    assert!(Path::new(&format!("/proc/{pid}")).exists(), "{what} (pid {pid}) died; its output:\n{log}");
}

// ---------------------------------------------------------------------------
// 1. python3 -m http.server on node1, curl on node3, both preloaded.

struct Site {
    dir: PathBuf,
    files: Vec<(String, Vec<u8>)>,
}

fn make_site(cluster: &Cluster) -> Site {
    let dir = cluster.path("www");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let mut files = vec![
        ("index.txt".to_owned(), b"hello from node1 through dvk\n".to_vec()),
        ("empty.txt".to_owned(), Vec::new()),
        ("big.bin".to_owned(), dvk_tests::random_bytes(3 * 1024 * 1024 + 12345)),
        ("sub/nested.bin".to_owned(), dvk_tests::random_bytes(65536)),
    ];
    // A file full of bytes that look like HTTP framing.
    files.push(("crlf.bin".to_owned(), b"\r\n\r\n\0HTTP/1.1 200 OK\r\n".repeat(5000)));
    for (name, data) in &files {
        std::fs::write(dir.join(name), data).unwrap();
    }
    Site { dir, files }
}

/// Starts `python3 -m http.server PORT` preloaded on `node` as endpoint `name`; returns its pid.
fn start_http_server(cluster: &Cluster, node: usize, name: &str, port: u16, site: &Site) -> u32 {
    let log = log_file(cluster, &format!("http-{name}.log"));
    cluster.spawn(
        cluster
            .preloaded(node, python3())
            .args(["-u", "-m", "http.server", &port.to_string(), "--bind", "0.0.0.0", "--directory"])
            .arg(&site.dir)
            .env("DVK_ENDPOINT", name)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log),
    )
}

/// Fetches every file of the site with one curl (one connection, keep-alive) and compares bytes.
fn fetch_and_compare(cluster: &Cluster, mut curl: Command, base_url: &str, site: &Site, tag: &str) {
    let out_dir = cluster.path(&format!("fetched-{tag}"));
    std::fs::create_dir_all(&out_dir).unwrap();
    curl.args(["-sS", "--fail", "--noproxy", "*", "--max-time", "60"]);
    for (k, (name, _)) in site.files.iter().enumerate() {
        curl.arg("-o").arg(out_dir.join(format!("f{k}"))).arg(format!("{base_url}/{name}"));
    }
    without_proxy(&mut curl);
    let out = run_bounded(&mut curl, b"", Duration::from_secs(90), &format!("curl ({tag})"));
    assert!(
        out.status.success(),
        "curl ({tag}) failed with {}: {}\nstdout: {}",
        out.status,
        tail(&out.stderr),
        tail(&out.stdout)
    );
    for (k, (name, data)) in site.files.iter().enumerate() {
        let got = std::fs::read(out_dir.join(format!("f{k}"))).unwrap_or_default();
        assert_eq!(got.len(), data.len(), "{tag}: {name}: {} bytes fetched, {} served", got.len(), data.len());
        assert!(got == *data, "{tag}: {name}: contents differ");
    }
}

fn http_server_on_node1_is_fetched_by_curl_on_node3(mode: Mode) {
    let cluster = Cluster::start(3, mode);
    let site = make_site(&cluster);
    let server = start_http_server(&cluster, 0, "web", 8000, &site);
    wait_connectable(&cluster, 2, "dc0", "web.dc0.dvk", 8000, REACH);
    fetch_and_compare(&cluster, cluster.preloaded(2, "curl"), "http://web.dc0.dvk:8000", &site, "node3");
    // Same node, and the third node, too.
    fetch_and_compare(&cluster, cluster.preloaded(0, "curl"), "http://web.dc0.dvk:8000", &site, "node1");
    fetch_and_compare(&cluster, cluster.preloaded(1, "curl"), "http://web.dc0.dvk:8000", &site, "node2");
    // Concurrent fetches of the big file from two nodes at once.
    let big = &site.files.iter().find(|f| f.0 == "big.bin").unwrap().1;
    let mut children = Vec::new();
    for (k, node) in [2usize, 1, 2].into_iter().enumerate() {
        let out = cluster.path(&format!("concurrent{k}.bin"));
        let mut cmd = cluster.preloaded(node, "curl");
        cmd.args(["-sS", "--fail", "--noproxy", "*", "--max-time", "60", "-o"])
            .arg(&out)
            .arg("http://web.dc0.dvk:8000/big.bin")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        without_proxy(&mut cmd);
        children.push((out, cluster.spawn(&mut cmd)));
    }
    for (out, pid) in children {
        let child = cluster.take_child(pid);
        let res = child.wait_with_output().unwrap();
        assert!(res.status.success(), "concurrent curl: {}", tail(&res.stderr));
        assert!(std::fs::read(&out).unwrap() == *big, "concurrent fetch: contents differ");
    }
    // The server saw the clients at virtual addresses (getpeername/accept under the shim).
    let log = read_log(&cluster, "http-web.log");
    assert_alive(server, "http.server", &log);
    let requests: Vec<&str> = log.lines().filter(|l| l.contains("\"GET /")).collect();
    assert!(requests.len() >= 3 * site.files.len() + 3, "http.server logged {} requests:\n{log}", requests.len());
    for r in &requests {
        assert!(r.starts_with("127.77."), "http.server sees a client address outside 127.77.0.0/16: {r}");
    }
}

#[test]
fn http_server_on_node1_is_fetched_by_curl_on_node3_loopback() {
    http_server_on_node1_is_fetched_by_curl_on_node3(Mode::Loopback);
}

#[test]
fn http_server_on_node1_is_fetched_by_curl_on_node3_network() {
    if skip_unless(Mode::Network, "http_server_on_node1_is_fetched_by_curl_on_node3_network") {
        return;
    }
    http_server_on_node1_is_fetched_by_curl_on_node3(Mode::Network);
}

// ---------------------------------------------------------------------------
// 2. redis-server on node2, redis-cli and redis-benchmark on node3, all preloaded.

struct Redis {
    server: PathBuf,
    cli: PathBuf,
    benchmark: PathBuf,
}

fn redis_or_skip(test: &str) -> Option<Redis> {
    let found = (which("redis-server"), which("redis-cli"), which("redis-benchmark"));
    match found {
        (Some(server), Some(cli), Some(benchmark)) => Some(Redis { server, cli, benchmark }),
        _ => {
            eprintln!(
                "SKIP {test}: redis-server/redis-cli/redis-benchmark not installed (apt-get install redis-server redis-tools)"
            );
            None
        }
    }
}

fn start_redis(cluster: &Cluster, redis: &Redis, node: usize, name: &str, port: u16) -> u32 {
    let log = cluster.path(&format!("redis-{name}.log"));
    cluster.spawn(
        cluster
            .preloaded(node, &redis.server)
            .args(["--port", &port.to_string(), "--bind", "0.0.0.0", "--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--daemonize", "no", "--dir"])
            .arg(cluster.dir.path())
            .arg("--logfile")
            .arg(&log)
            .env("DVK_ENDPOINT", name)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
}

/// Runs one redis-cli command (`--raw`) through `cmd` (which already names the
/// program and its -h/-p); returns stdout.
fn redis_cli(mut cmd: Command, args: &[&str], stdin: &[u8]) -> Vec<u8> {
    cmd.arg("--raw").args(args);
    let out = run_ok(&mut cmd, stdin, SHORT, &format!("redis-cli {}", args.join(" ")));
    out.stdout
}

/// SET/GET of binary values, INCR, lists; returns the binary value it stored.
fn redis_session(cli: &dyn Fn() -> Command, tag: &str) -> Vec<u8> {
    assert_eq!(redis_cli(cli(), &["PING"], b""), b"PONG\n", "{tag}");
    let mut blob = dvk_tests::random_bytes(200_000);
    blob.extend_from_slice(b"\r\n\0*3\r\n$3\r\nSET\r\n\xff\xfe");
    assert_eq!(redis_cli(cli(), &["-x", "SET", "bin"], &blob), b"OK\n", "{tag}: SET bin");
    let mut got = redis_cli(cli(), &["GET", "bin"], b"");
    assert_eq!(got.pop(), Some(b'\n'), "{tag}: --raw ends the value with a newline");
    assert_eq!(got.len(), blob.len(), "{tag}: GET bin length");
    assert!(got == blob, "{tag}: GET bin returns other bytes than SET stored");
    assert_eq!(redis_cli(cli(), &["STRLEN", "bin"], b""), format!("{}\n", blob.len()).into_bytes(), "{tag}");
    for k in 1..=5 {
        assert_eq!(redis_cli(cli(), &["INCR", "counter"], b""), format!("{k}\n").into_bytes(), "{tag}: INCR");
    }
    assert_eq!(redis_cli(cli(), &["INCRBY", "counter", "10"], b""), b"15\n", "{tag}");
    assert_eq!(redis_cli(cli(), &["RPUSH", "list", "a", "b", "c d", ""], b""), b"4\n", "{tag}");
    assert_eq!(redis_cli(cli(), &["LRANGE", "list", "0", "-1"], b""), b"a\nb\nc d\n\n", "{tag}: LRANGE");
    assert_eq!(redis_cli(cli(), &["LRANGE", "list", "1", "2"], b""), b"b\nc d\n", "{tag}: LRANGE 1 2");
    blob
}

fn redis_dbsize(cli: &dyn Fn() -> Command) -> u64 {
    String::from_utf8(redis_cli(cli(), &["DBSIZE"], b"")).unwrap().trim().parse().unwrap()
}

/// Parses `redis-benchmark -q` output into {test: requests per second}.
fn benchmark_rps(stdout: &[u8]) -> BTreeMap<String, f64> {
    let text = String::from_utf8_lossy(stdout);
    let mut rps = BTreeMap::new();
    for line in text.split('\n') {
        let line = line.rsplit('\r').next().unwrap_or("").trim();
        if let Some((name, rest)) = line.split_once(": ") {
            if let Some(num) = rest.strip_suffix_any_requests() {
                rps.insert(name.to_owned(), num);
            }
        }
    }
    rps
}

trait RequestsPerSecond {
    fn strip_suffix_any_requests(&self) -> Option<f64>;
}

impl RequestsPerSecond for str {
    fn strip_suffix_any_requests(&self) -> Option<f64> {
        let (num, rest) = self.split_once(' ')?;
        if rest.starts_with("requests per second") {
            num.parse().ok()
        } else {
            None
        }
    }
}

fn redis_on_node2_is_driven_from_node3(mode: Mode, test: &str) {
    let Some(redis) = redis_or_skip(test) else { return };
    let cluster = Cluster::start(3, mode);
    let server = start_redis(&cluster, &redis, 1, "redis", 6379);
    wait_connectable(&cluster, 2, "dc0", "redis.dc0.dvk", 6379, REACH);
    let cli = || {
        let mut c = cluster.preloaded(2, &redis.cli);
        c.args(["-h", "redis.dc0.dvk", "-p", "6379"]);
        c
    };
    let blob = redis_session(&cli, "node3");
    let keys_before = redis_dbsize(&cli);
    assert_eq!(keys_before, 3, "bin, counter, list");

    let out = run_ok(
        cluster
            .preloaded(2, &redis.benchmark)
            .args(["-h", "redis.dc0.dvk", "-p", "6379"])
            .args(["-n", "2000", "-c", "10", "-t", "set,get", "-q"]),
        b"",
        Duration::from_secs(120),
        "redis-benchmark",
    );
    let rps = benchmark_rps(&out.stdout);
    eprintln!("redis-benchmark through dvk ({mode:?}): {rps:?}");
    for t in ["SET", "GET"] {
        let r = rps.get(t).copied().unwrap_or(0.0);
        assert!(r > 0.0, "redis-benchmark reported no {t} rate:\n{}", tail(&out.stdout));
    }
    // The benchmark wrote one key (key:__rand_int__, 3 bytes); ours are intact.
    assert_eq!(redis_dbsize(&cli), keys_before + 1);
    assert_eq!(redis_cli(cli(), &["STRLEN", "key:__rand_int__"], b""), b"3\n");
    let mut got = redis_cli(cli(), &["GET", "bin"], b"");
    got.pop();
    assert!(got == blob, "the binary value changed during the benchmark");
    assert_eq!(redis_cli(cli(), &["GET", "counter"], b""), b"15\n");
    // A client on the server's own node sees the same data.
    let same_node = || {
        let mut c = cluster.preloaded(1, &redis.cli);
        c.args(["-h", "redis.dc0.dvk", "-p", "6379"]);
        c
    };
    assert_eq!(redis_cli(same_node(), &["GET", "counter"], b""), b"15\n");

    // Connection churn: -k 0 opens a new connection per request. Every stream must be
    // torn down at both ends: redis sees its clients go, the agents' fds come back.
    let fds_before = agent_fds(&cluster);
    let out = run_ok(
        cluster
            .preloaded(2, &redis.benchmark)
            .args(["-h", "redis.dc0.dvk", "-p", "6379"])
            .args(["-n", "1000", "-c", "10", "-k", "0", "-t", "get", "-q"]),
        b"",
        Duration::from_secs(120),
        "redis-benchmark -k 0",
    );
    let rps = benchmark_rps(&out.stdout);
    eprintln!("redis-benchmark -k 0 through dvk ({mode:?}): {rps:?}");
    assert!(rps.get("GET").copied().unwrap_or(0.0) > 0.0, "{}", tail(&out.stdout));
    let mut clients = String::new();
    wait_until(Duration::from_secs(10), "redis to see only the asking client", || {
        clients = String::from_utf8_lossy(&redis_cli(cli(), &["INFO", "clients"], b"")).into_owned();
        clients.contains("connected_clients:1\r\n") || clients.contains("connected_clients:1\n")
    });
    let mut fds_after = Vec::new();
    wait_until(Duration::from_secs(10), "the agents' fds to return to their count before the churn", || {
        fds_after = agent_fds(&cluster);
        fds_after.iter().zip(&fds_before).all(|(a, b)| *a <= b + 4)
    });
    eprintln!("agent fds before churn {fds_before:?}, after {fds_after:?}");
    assert_alive(server, "redis-server", &read_log(&cluster, "redis-redis.log"));
}

/// Open fds of every agent of the cluster.
fn agent_fds(cluster: &Cluster) -> Vec<usize> {
    cluster
        .nodes
        .iter()
        .map(|n| {
            let pid = n.agent_pid().expect("agent running");
            std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(usize::MAX)
        })
        .collect()
}

#[test]
fn redis_on_node2_is_driven_by_redis_cli_and_benchmark_on_node3_loopback() {
    redis_on_node2_is_driven_from_node3(
        Mode::Loopback,
        "redis_on_node2_is_driven_by_redis_cli_and_benchmark_on_node3_loopback",
    );
}

#[test]
fn redis_on_node2_is_driven_by_redis_cli_and_benchmark_on_node3_network() {
    let test = "redis_on_node2_is_driven_by_redis_cli_and_benchmark_on_node3_network";
    if skip_unless(Mode::Network, test) {
        return;
    }
    redis_on_node2_is_driven_from_node3(Mode::Network, test);
}

// ---------------------------------------------------------------------------
// 3. Ingress: plain clients (no shim) reach endpoints through a node's real TCP port.

fn plain_clients_reach_endpoints_through_ingress(mode: Mode, test: &str) {
    let redis = redis_or_skip(&format!("{test} (redis part)"));
    // web runs on node1 and is exposed on node3 and node2; redis runs on node2 and is exposed on node1.
    let (cluster, addrs) =
        cluster_with_ingress(3, mode, &[(2, "web:8001", "dc0"), (1, "web:8001", "dc0"), (0, "redis:6380", "dc0")]);
    let site = make_site(&cluster);
    let server = start_http_server(&cluster, 0, "web", 8001, &site);
    for node in [2, 1] {
        wait_connectable(&cluster, node, "dc0", "web.dc0.dvk", 8001, REACH);
    }
    wait_plain_connectable(&cluster, 2, &addrs[0], REACH);
    // curl without LD_PRELOAD, on node3, to node3's ingress.
    let plain_curl = |node: usize| {
        let mut c = cluster.command(node, "curl");
        c.env_remove("LD_PRELOAD");
        c
    };
    fetch_and_compare(&cluster, plain_curl(2), &format!("http://{}", addrs[0]), &site, "ingress-node3");
    wait_plain_connectable(&cluster, 1, &addrs[1], REACH);
    fetch_and_compare(&cluster, plain_curl(1), &format!("http://{}", addrs[1]), &site, "ingress-node2");
    let log = read_log(&cluster, "http-web.log");
    assert_alive(server, "http.server", &log);
    assert!(
        log.lines().filter(|l| l.contains("\"GET /big.bin")).count() >= 2,
        "http.server did not log the ingress requests:\n{log}"
    );

    let Some(redis) = redis else { return };
    let rserver = start_redis(&cluster, &redis, 1, "redis", 6380);
    wait_connectable(&cluster, 0, "dc0", "redis.dc0.dvk", 6380, REACH);
    wait_plain_connectable(&cluster, 0, &addrs[2], REACH);
    let (host, port) = addrs[2].rsplit_once(':').unwrap();
    let (host, port) = (host.to_owned(), port.to_owned());
    let plain_cli = || {
        let mut c = cluster.command(0, &redis.cli);
        c.env_remove("LD_PRELOAD").args(["-h", &host, "-p", &port]);
        c
    };
    let blob = redis_session(&plain_cli, "ingress");
    // What the plain client stored is what a preloaded client sees by name.
    let mut got = {
        let mut c = cluster.preloaded(2, &redis.cli);
        c.args(["-h", "redis.dc0.dvk", "-p", "6380"]);
        redis_cli(c, &["GET", "bin"], b"")
    };
    got.pop();
    assert!(got == blob, "a preloaded client reads other bytes than the ingress client stored");
    assert_alive(rserver, "redis-server", &read_log(&cluster, "redis-redis.log"));
}

#[test]
fn plain_curl_and_redis_cli_reach_endpoints_through_ingress_loopback() {
    plain_clients_reach_endpoints_through_ingress(
        Mode::Loopback,
        "plain_curl_and_redis_cli_reach_endpoints_through_ingress_loopback",
    );
}

#[test]
fn plain_curl_and_redis_cli_reach_endpoints_through_ingress_network() {
    let test = "plain_curl_and_redis_cli_reach_endpoints_through_ingress_network";
    if skip_unless(Mode::Network, test) {
        return;
    }
    plain_clients_reach_endpoints_through_ingress(Mode::Network, test);
}

// ---------------------------------------------------------------------------
// 4. 1 GiB each way at once, verified byte by byte, across nodes.

/// Parses "PASS sent=N sent_hash=H received=N received_hash=H secs=S".
fn pass_fields(line: &str) -> BTreeMap<String, String> {
    assert!(line.starts_with("PASS "), "stream_check: {line}");
    line.split_whitespace()
        .skip(1)
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn one_gib_each_way_at_once(mode: Mode) {
    // DVK_STREAM_BYTES overrides the size (e.g. for a slow debug build).
    let bytes: u64 = std::env::var("DVK_STREAM_BYTES").ok().and_then(|s| s.parse().ok()).unwrap_or(1 << 30);
    let cluster = Cluster::start(3, mode);
    let program = c_program("stream_check");
    let mut server = Proc::spawn(
        cluster
            .preloaded(0, &program)
            .args(["server", "9500", &bytes.to_string(), "1"])
            .env("DVK_ENDPOINT", "bulk")
            .stdin(Stdio::null()),
        "stream_check server",
    );
    server.lines.wait_for("LISTENING", SHORT);
    wait_connectable(&cluster, 2, "dc0", "bulk.dc0.dvk", 9500, REACH);
    let started = Instant::now();
    let client = run_bounded(
        cluster.preloaded(2, &program).args(["client", "bulk.dc0.dvk", "9500", &bytes.to_string()]),
        b"",
        Duration::from_secs(180),
        "stream_check client",
    );
    let secs = started.elapsed().as_secs_f64();
    let client_line = String::from_utf8_lossy(&client.stdout).trim().to_owned();
    let server_line = server
        .lines
        .next(SHORT, "the server's verdict")
        .unwrap_or_else(|| format!("(server printed nothing more; lines: {:?})", server.lines.seen));
    server.wait(SHORT, "stream_check server");
    assert!(
        client.status.success() && server_line.starts_with("PASS"),
        "client: {client_line} (stderr: {})\nserver: {server_line}",
        tail(&client.stderr)
    );
    let (c, s) = (pass_fields(&client_line), pass_fields(&server_line));
    let n = bytes.to_string();
    assert_eq!((c["sent"].as_str(), c["received"].as_str()), (n.as_str(), n.as_str()));
    assert_eq!((s["sent"].as_str(), s["received"].as_str()), (n.as_str(), n.as_str()));
    assert_eq!(c["sent_hash"], s["received_hash"], "client -> server hashes");
    assert_eq!(s["sent_hash"], c["received_hash"], "server -> client hashes");
    eprintln!(
        "2 x {} MiB through shim + agents across nodes ({mode:?}) in {secs:.2} s ({:.0} MB/s each way)",
        bytes >> 20,
        bytes as f64 / secs / 1e6
    );
    assert!(secs < 60.0, "1 GiB each way took {secs:.1} s (budget 60 s)");
}

#[test]
fn one_gib_each_way_at_once_arrives_intact_across_nodes_loopback() {
    one_gib_each_way_at_once(Mode::Loopback);
}

#[test]
fn one_gib_each_way_at_once_arrives_intact_across_nodes_network() {
    if skip_unless(Mode::Network, "one_gib_each_way_at_once_arrives_intact_across_nodes_network") {
        return;
    }
    one_gib_each_way_at_once(Mode::Network);
}

// ---------------------------------------------------------------------------
// 5. TCP socket semantics, call by call (tests/programs/sockcheck_*.c).

/// A plain TCP echo server (no shim) on 127.0.0.1 of `node`; returns (pid, port).
fn plain_echo_server(cluster: &Cluster, node: usize) -> (Proc, u16) {
    let script = "import socket
s = socket.socket()
s.bind(('127.0.0.1', 0))
s.listen()
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
c.settimeout(20)
while True:
    d = c.recv(65536)
    if not d:
        break
    c.sendall(d)";
    let mut echo = Proc::spawn(
        cluster.command(node, python3()).args(["-c", script]).env_remove("LD_PRELOAD").stdin(Stdio::null()),
        "plain echo server",
    );
    let port = echo.lines.next(SHORT, "the echo server's port").expect("port").parse().unwrap();
    (echo, port)
}

fn socket_semantics(cluster: &Cluster, server_node: usize, client_node: usize, name: &str, port: u16) {
    let tag = format!("server on node{}, client on node{}", server_node + 1, client_node + 1);
    let mut server = Proc::spawn(
        cluster
            .preloaded(server_node, c_program("sockcheck_server"))
            .args([&port.to_string(), "1"])
            .env("DVK_ENDPOINT", name)
            .stdin(Stdio::null()),
        "sockcheck_server",
    );
    server.lines.wait_for("READY", SHORT);
    let host = format!("{name}.dc0.dvk");
    wait_connectable(cluster, client_node, "dc0", &host, port, REACH);
    let (echo, realport) = plain_echo_server(cluster, client_node);
    let client = run_bounded(
        cluster.preloaded(client_node, c_program("sockcheck_client")).args([
            host.as_str(),
            &port.to_string(),
            &(port + 1).to_string(),
            &realport.to_string(),
        ]),
        b"",
        Duration::from_secs(60),
        "sockcheck_client",
    );
    let client_out = String::from_utf8_lossy(&client.stdout).into_owned();
    // The server's verdict (a server stuck in a check is killed by the bound; its output says where).
    let deadline = Instant::now() + Duration::from_secs(if client.status.success() { 30 } else { 2 });
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        match server.lines.try_next(left) {
            Some(l) if l.starts_with("SERVER PASS") || l.starts_with("FAIL") => break,
            Some(_) => continue,
            None => break,
        }
    }
    drop(echo);
    eprintln!("sockcheck ({tag}): client:\n{client_out}");
    let server_out = server.lines.seen.join("\n");
    assert!(
        client.status.success() && client_out.contains("CLIENT PASS") && server_out.contains("SERVER PASS"),
        "socket semantics ({tag}):\n--- client ---\n{client_out}{}\n--- server ---\n{server_out}",
        tail(&client.stderr)
    );
    // The server has exited: its endpoint is gone, a connect is refused (after the news spreads).
    server.wait(SHORT, "sockcheck_server");
    wait_refused(cluster, client_node, "dc0", &host, port);
}

/// Waits (bounded) until a connect from `node` to `host:port` is refused.
fn wait_refused(cluster: &Cluster, node: usize, dc: &str, host: &str, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, line) = probe(cluster, node, dc, host, port);
        // Refused, or the name is gone altogether: either way nothing answers.
        if !ok && (line.starts_with("connect-failed ECONNREFUSED") || line.starts_with("resolve-failed")) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{host}:{port} still not refusing connections from node{} after 10 s; last probe: {line}",
            node + 1
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn tcp_socket_semantics_hold_across_nodes_and_on_one_node_loopback() {
    let cluster = Cluster::start(3, Mode::Loopback);
    socket_semantics(&cluster, 0, 2, "sockx", 7100);
    socket_semantics(&cluster, 0, 0, "socks", 7200);
}

#[test]
fn tcp_socket_semantics_hold_across_nodes_network() {
    if skip_unless(Mode::Network, "tcp_socket_semantics_hold_across_nodes_network") {
        return;
    }
    let cluster = Cluster::start(3, Mode::Network);
    socket_semantics(&cluster, 0, 2, "sockx", 7100);
}

// ---------------------------------------------------------------------------
// 6. DC isolation.

const ONE_SHOT_SERVER: &str = "import socket, sys
port, reply = int(sys.argv[1]), sys.argv[2].encode()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', port))
s.listen()
print('LISTENING', flush=True)
while True:
    c, _ = s.accept()
    try:
        c.sendall(reply + b'\\n')
    except OSError:
        pass
    c.close()";

/// Prints one JSON object: for each name, its address or resolution error,
/// gethostbyname's answer, and what a connection read; for each extra
/// `ip:port`, what a connection to it gives.
const DC_CLIENT: &str = "import json, socket, sys
out = {}
for name, port in [a.rsplit(':', 1) for a in sys.argv[1].split(',') if a]:
    r = {}
    try:
        r['ip'] = socket.getaddrinfo(name, int(port), socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror as e:
        r['gaierror'] = e.errno
    try:
        r['gethostbyname'] = socket.gethostbyname(name)
    except OSError as e:
        r['gethostbyname_error'] = str(e)
    if 'ip' in r:
        try:
            c = socket.create_connection((r['ip'], int(port)), timeout=10)
            r['read'] = c.recv(64).decode().strip()
            c.close()
        except ConnectionRefusedError:
            r['connect'] = 'refused'
        except OSError as e:
            r['connect'] = 'error %s' % e
    out[name + ':' + port] = r
for addr in [a for a in sys.argv[2].split(',') if a]:
    ip, port = addr.rsplit(':', 1)
    try:
        c = socket.create_connection((ip, int(port)), timeout=10)
        out[addr] = {'read': c.recv(64).decode().strip()}
        c.close()
    except ConnectionRefusedError:
        out[addr] = {'connect': 'refused'}
    except OSError as e:
        out[addr] = {'connect': 'error %s' % e}
print(json.dumps(out), flush=True)";

fn dc_view(cluster: &Cluster, node: usize, dc: &str, names: &[&str], addrs: &[String]) -> serde_json::Value {
    let out = run_ok(
        cluster
            .preloaded(node, python3())
            .args(["-c", DC_CLIENT, &names.join(","), &addrs.join(",")])
            .env("DVK_DC", dc),
        b"",
        Duration::from_secs(60),
        &format!("python client in {dc}"),
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}\n{}", tail(&out.stdout), tail(&out.stderr)))
}

fn dcs_are_isolated(mode: Mode) {
    let cluster = Cluster::start(3, mode);
    // dc0: secret:7000 and only0:7001 on node1; dc1: secret:7000 on node2 (same name, other DC).
    let servers = [
        (0, "dc0", "secret", 7000, "from-dc0"),
        (0, "dc0", "only0", 7001, "only-dc0"),
        (1, "dc1", "secret", 7000, "from-dc1"),
    ];
    let mut procs = Vec::new();
    for (node, dc, name, port, reply) in servers {
        let mut server = Proc::spawn(
            cluster
                .preloaded(node, python3())
                .args(["-c", ONE_SHOT_SERVER, &port.to_string(), reply])
                .env("DVK_DC", dc)
                .env("DVK_ENDPOINT", name)
                .stdin(Stdio::null()),
            "python server",
        );
        server.lines.wait_for("LISTENING", SHORT);
        procs.push(server);
        wait_connectable(&cluster, 2, dc, &format!("{name}.{dc}.dvk"), port, REACH);
    }
    let names = ["secret.dc0.dvk:7000", "only0.dc0.dvk:7001", "secret.dc1.dvk:7000"];
    let dc0 = dc_view(&cluster, 2, "dc0", &names, &[]);
    let dc1 = dc_view(&cluster, 2, "dc1", &names, &[]);
    let ctx = format!("dc0 view: {dc0}\ndc1 view: {dc1}");
    // Each DC reaches its own endpoints by name, and the right one.
    assert_eq!(dc0["secret.dc0.dvk:7000"]["read"], "from-dc0", "{ctx}");
    assert_eq!(dc0["only0.dc0.dvk:7001"]["read"], "only-dc0", "{ctx}");
    assert_eq!(dc1["secret.dc1.dvk:7000"]["read"], "from-dc1", "{ctx}");
    for (view, foreign) in [(&dc0, "secret.dc1.dvk:7000"), (&dc1, "secret.dc0.dvk:7000"), (&dc1, "only0.dc0.dvk:7001")]
    {
        assert!(view[foreign]["gaierror"].is_i64(), "{foreign} must not resolve in the other DC\n{ctx}");
        assert!(view[foreign]["ip"].is_null(), "{ctx}");
        assert!(view[foreign]["gethostbyname"].is_null(), "gethostbyname answered {foreign}\n{ctx}");
    }
    // The other DC's virtual IPs lead nowhere: refused, never the other DC's server.
    let ip = |v: &serde_json::Value, k: &str| {
        let ip = v[k]["ip"].as_str().unwrap_or_else(|| panic!("{k} did not resolve in its own DC\n{ctx}"));
        format!("{ip}:{}", k.rsplit_once(':').unwrap().1)
    };
    let dc0_addrs = vec![ip(&dc0, "secret.dc0.dvk:7000"), ip(&dc0, "only0.dc0.dvk:7001")];
    let dc1_addrs = vec![ip(&dc1, "secret.dc1.dvk:7000")];
    for a in dc0_addrs.iter().chain(&dc1_addrs) {
        assert!(a.starts_with("127.77."), "virtual IPs are in 127.77.0.0/16: {a}\n{ctx}");
    }
    let from_dc1 = dc_view(&cluster, 2, "dc1", &[], &dc0_addrs);
    let from_dc0 = dc_view(&cluster, 0, "dc0", &[], &dc1_addrs);
    let ctx = format!("{ctx}\ndc1 dialing dc0's VIPs: {from_dc1}\ndc0 dialing dc1's VIPs: {from_dc0}");
    assert_eq!(from_dc1[&dc0_addrs[1]]["connect"], "refused", "{ctx}");
    for a in &dc0_addrs {
        // secret's VIP may coincide in both DCs; then dc1 reaches its own secret, never dc0's.
        let r = &from_dc1[a];
        assert!(r["connect"] == "refused" || r["read"] == "from-dc1", "dc1 reached {a}: {r}\n{ctx}");
    }
    for a in &dc1_addrs {
        let r = &from_dc0[a];
        assert!(r["connect"] == "refused" || r["read"] == "from-dc0", "dc0 reached {a}: {r}\n{ctx}");
    }
}

#[test]
fn a_dc1_process_can_neither_resolve_nor_reach_dc0_endpoints_loopback() {
    dcs_are_isolated(Mode::Loopback);
}

#[test]
fn a_dc1_process_can_neither_resolve_nor_reach_dc0_endpoints_network() {
    if skip_unless(Mode::Network, "a_dc1_process_can_neither_resolve_nor_reach_dc0_endpoints_network") {
        return;
    }
    dcs_are_isolated(Mode::Network);
}

// ---------------------------------------------------------------------------
// 7. Per-stream flow control: a stalled reader holds up only its own stream,
//    and the agents do not buffer its backlog.

fn progress(lines: &mut Lines, last: &mut u64) -> u64 {
    for l in lines.drain_now() {
        if let Some(n) = l.strip_prefix("progress ") {
            *last = n.parse().unwrap();
        }
    }
    *last
}

#[test]
fn a_stalled_reader_stalls_only_its_own_stream_and_agent_memory_stays_bounded() {
    const FLOOD: u64 = 768 << 20;
    const RSS_LIMIT_KIB: u64 = 200 * 1024;
    let cluster = Cluster::start(3, Mode::Loopback);
    let program = c_program("flow");
    let mut server = Proc::spawn(
        cluster.preloaded(0, &program).args(["server", "9600"]).env("DVK_ENDPOINT", "flow").stdin(Stdio::null()),
        "flow server",
    );
    let server_lines = &mut server.lines;
    server_lines.wait_for("LISTENING", SHORT);
    for node in [2, 1, 0] {
        wait_connectable(&cluster, node, "dc0", "flow.dc0.dvk", 9600, REACH);
    }

    // node3 asks for 768 MiB and reads nothing.
    let mut stalled = Proc::spawn(
        cluster
            .preloaded(2, &program)
            .args(["flood", "flow.dc0.dvk", "9600", &FLOOD.to_string()])
            .stdin(Stdio::piped()),
        "flow flood (stalled reader)",
    );
    stalled.lines.wait_for("connected", SHORT);

    // The server's writes must stop: the pipe between it and the reader is bounded.
    let mut last = 0;
    let mut prev = u64::MAX;
    let mut plateau_since = Instant::now();
    wait_until(Duration::from_secs(30), "the flooding server to be held back", || {
        let now = progress(server_lines, &mut last);
        assert!(
            FLOOD - now >= 512 << 20,
            "the server wrote {} MiB to a reader that reads nothing: the agents buffer the backlog",
            now >> 20
        );
        if now != prev {
            prev = now;
            plateau_since = Instant::now();
        }
        now > 0 && plateau_since.elapsed() >= Duration::from_secs(2)
    });
    let held = progress(server_lines, &mut last);
    let agents: Vec<u32> = cluster.nodes.iter().map(|n| n.agent_pid().unwrap()).collect();
    let rss = |when: &str| {
        for (i, pid) in agents.iter().enumerate() {
            let kib = vm_rss_kib(*pid).unwrap_or_else(|| panic!("agent of node{} died {when}", i + 1));
            eprintln!("agent node{} VmRSS {} MiB {when}", i + 1, kib >> 10);
            assert!(
                kib < RSS_LIMIT_KIB,
                "agent of node{} uses {} MiB {when} (limit {} MiB); {} MiB held back",
                i + 1,
                kib >> 10,
                RSS_LIMIT_KIB >> 10,
                (FLOOD - held) >> 20
            );
        }
    };
    eprintln!("server held back after {} KiB in flight, {} MiB pending", held >> 10, (FLOOD - held) >> 20);
    rss("with the stalled stream");

    // Other streams to the same server still get prompt answers: from node3
    // (sharing the node3<->node1 link with the stalled stream), node2 and node1.
    for node in [2, 1, 0] {
        let out = run_ok(
            cluster.preloaded(node, &program).args(["ping", "flow.dc0.dvk", "9600", "200"]),
            b"",
            Duration::from_secs(30),
            &format!("ping from node{}", node + 1),
        );
        let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        eprintln!("node{}: {line}", node + 1);
        let field = |k: &str| -> f64 {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(k))
                .and_then(|v| v.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {k} in `{line}`"))
        };
        assert!(line.starts_with("PINGS 200"), "{line}");
        assert!(field("max_us") < 1e6, "a ping took {} ms next to the stalled stream", field("max_us") / 1e3);
        assert!(field("total_ms") < 5000.0, "200 pings took {} ms next to the stalled stream", field("total_ms"));
    }
    let still = progress(server_lines, &mut last);
    assert!(FLOOD - still >= 512 << 20, "the backlog drained while nobody read it: {} MiB written", still >> 20);
    rss("after the pings");

    // The reader resumes: every byte arrives, in order.
    stalled.child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let verdict = stalled.lines.wait_for("", Duration::from_secs(120));
    stalled.wait(SHORT, "the stalled reader");
    assert!(verdict.starts_with(&format!("DRAINED {FLOOD} ok")), "stalled reader after resuming: {verdict}");
    server_lines.wait_for("flood done", SHORT);
    rss("after the drain");
}

// ---------------------------------------------------------------------------
// 8. An endpoint lives as long as its listener: gone when the listener closes or
//    the process exits, and another process may take the name over.

const LISTEN_UNTIL_TOLD: &str = "import socket, sys
port, reply = int(sys.argv[1]), sys.argv[2].encode()
s = socket.socket()
s.bind(('0.0.0.0', port))
s.listen()
print('LISTENING', flush=True)
s.settimeout(0.05)
while True:
    try:
        c, _ = s.accept()
        c.sendall(reply + b'\\n')
        c.close()
    except socket.timeout:
        pass
    import select
    if select.select([sys.stdin], [], [], 0)[0]:
        if sys.stdin.readline().strip() == 'close':
            s.close()
            print('CLOSED', flush=True)
            sys.stdin.read()
            break";

fn read_from(cluster: &Cluster, node: usize, name_port: &str) -> String {
    let v = dc_view(cluster, node, "dc0", &[name_port], &[]);
    v[name_port]["read"].as_str().map(str::to_owned).unwrap_or_else(|| format!("(no read: {v})"))
}

#[test]
fn an_endpoint_goes_away_with_its_listener_and_another_process_can_take_it_over() {
    let cluster = Cluster::start(3, Mode::Loopback);
    let start = |node: usize, reply: &str| {
        let mut p = Proc::spawn(
            cluster
                .preloaded(node, python3())
                .args(["-c", LISTEN_UNTIL_TOLD, "7300", reply])
                .env("DVK_ENDPOINT", "svc")
                .stdin(Stdio::piped()),
            "python server",
        );
        p.lines.wait_for("LISTENING", SHORT);
        wait_connectable(&cluster, 2, "dc0", "svc.dc0.dvk", 7300, REACH);
        p
    };
    // 1. The listener closes while its process keeps running.
    let mut first = start(0, "first");
    assert_eq!(read_from(&cluster, 2, "svc.dc0.dvk:7300"), "first");
    first.child.stdin.as_mut().unwrap().write_all(b"close\n").unwrap();
    first.lines.wait_for("CLOSED", SHORT);
    wait_refused(&cluster, 2, "dc0", "svc.dc0.dvk", 7300);
    wait_refused(&cluster, 0, "dc0", "svc.dc0.dvk", 7300);
    assert_alive(first.pid(), "the first server", "");
    // 2. Another process on another node takes the endpoint over.
    let second = start(1, "second");
    assert_eq!(read_from(&cluster, 2, "svc.dc0.dvk:7300"), "second");
    assert_eq!(read_from(&cluster, 0, "svc.dc0.dvk:7300"), "second");
    // 3. Its process dies (SIGKILL: no close() runs in it): the endpoint goes away too.
    drop(second);
    wait_refused(&cluster, 2, "dc0", "svc.dc0.dvk", 7300);
    wait_refused(&cluster, 1, "dc0", "svc.dc0.dvk", 7300);
    // 4. And it can come back once more, on the first node.
    let _third = start(0, "third");
    assert_eq!(read_from(&cluster, 2, "svc.dc0.dvk:7300"), "third");
}

// ---------------------------------------------------------------------------
// 9. Streams between two processes of one node do not cross the peer links.

/// Bytes received so far on every TCP connection of the cluster's peer links
/// (loopback mode: both ends are on this host), from the kernel's tcp_info.
fn peer_link_bytes(cluster: &Cluster) -> u64 {
    // Every link has one end at a node's peer address (the acceptor's): match whole addresses,
    // since other clusters of this test process use the same port on other loopback IPs.
    let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.peer_addr.clone()).collect();
    let out = Command::new("ss").args(["-tinH"]).output().expect("run ss (apt-get install iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut total = 0;
    let mut ours = false;
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            ours = cols.len() >= 5 && addrs.iter().any(|a| cols[3] == a.as_str() || cols[4] == a.as_str());
        } else if ours {
            total += line
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix("bytes_received:"))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

fn stream_between(cluster: &Cluster, server_node: usize, client_node: usize, name: &str, port: u16, bytes: u64) {
    let program = c_program("stream_check");
    let mut server = Proc::spawn(
        cluster
            .preloaded(server_node, &program)
            .args(["server", &port.to_string(), &bytes.to_string(), "1"])
            .env("DVK_ENDPOINT", name)
            .stdin(Stdio::null()),
        "stream_check server",
    );
    server.lines.wait_for("LISTENING", SHORT);
    let host = format!("{name}.dc0.dvk");
    wait_connectable(cluster, client_node, "dc0", &host, port, REACH);
    let out = run_bounded(
        cluster.preloaded(client_node, &program).args(["client", &host, &port.to_string(), &bytes.to_string()]),
        b"",
        Duration::from_secs(120),
        "stream_check client",
    );
    let client_line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let server_line = server.lines.next(SHORT, "the server's verdict").unwrap_or_default();
    assert!(out.status.success() && server_line.starts_with("PASS"), "client: {client_line}\nserver: {server_line}");
    server.wait(SHORT, "stream_check server");
}

#[test]
fn streams_between_processes_on_one_node_stay_off_the_peer_links() {
    const MIB: u64 = 1 << 20;
    let cluster = Cluster::start(3, Mode::Loopback);
    // Control: a cross-node stream shows up on the links (the measure works).
    let before = peer_link_bytes(&cluster);
    stream_between(&cluster, 0, 1, "across", 9800, 64 * MIB);
    let across = peer_link_bytes(&cluster) - before;
    assert!(across >= 2 * 64 * MIB, "64 MiB each way across nodes moved only {} KiB over the peer links", across >> 10);
    // Same node: 256 MiB each way, the links stay quiet (heartbeats and control only).
    let before = peer_link_bytes(&cluster);
    stream_between(&cluster, 1, 1, "local", 9801, 256 * MIB);
    let local = peer_link_bytes(&cluster) - before;
    eprintln!("peer-link bytes: cross-node stream {} MiB, same-node stream {} KiB", across >> 20, local >> 10);
    assert!(local < 4 * MIB, "a same-node stream of 2 x 256 MiB moved {} MiB over the peer links", local >> 20);
}

// ---------------------------------------------------------------------------
// 10. More unmodified programs: http.server with its default (dual-stack IPv6)
//     bind, a forking server, a pre-forked shared listener, asyncio with many
//     concurrent connections.

#[test]
fn http_server_with_its_default_dual_stack_bind_is_reached_by_name() {
    let cluster = Cluster::start(3, Mode::Loopback);
    let site = make_site(&cluster);
    // No --bind: python 3.11 binds [::]:PORT with IPV6_V6ONLY off (DualStackServer).
    let log = log_file(&cluster, "http-web6.log");
    let server = cluster.spawn(
        cluster
            .preloaded(0, python3())
            .args(["-u", "-m", "http.server", "8002", "--directory"])
            .arg(&site.dir)
            .env("DVK_ENDPOINT", "web6")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log),
    );
    wait_connectable(&cluster, 2, "dc0", "web6.dc0.dvk", 8002, REACH);
    fetch_and_compare(&cluster, cluster.preloaded(2, "curl"), "http://web6.dc0.dvk:8002", &site, "dual-stack");
    assert_alive(server, "http.server (default bind)", &read_log(&cluster, "http-web6.log"));
}

/// A server that forks per connection (socketserver.ForkingTCPServer) or
/// pre-forks workers that all accept on one listener; every handler answers
/// "<handler pid> <peer ip> <line>".
const FORKING_SERVER: &str = "import ctypes, os, signal, socket, socketserver, sys, time
mode, port = sys.argv[1], int(sys.argv[2])
def die_with_parent():
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no worker outlives the test's server
def answer(conn):
    die_with_parent()
    f = conn.makefile('rwb')
    for line in f:
        peer = conn.getpeername()[0]
        f.write(('%d %s %s\\n' % (os.getpid(), peer, line.decode().strip())).encode())
        f.flush()
if mode == 'fork':
    class H(socketserver.StreamRequestHandler):
        def handle(self):
            answer(self.request)
    class S(socketserver.ForkingTCPServer):
        allow_reuse_address = True
    srv = S(('0.0.0.0', port), H)
    print('LISTENING', os.getpid(), flush=True)
    srv.serve_forever()
else:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(('0.0.0.0', port))
    s.listen(64)
    kids = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:
            die_with_parent()
            while True:
                c, _ = s.accept()
                answer(c)
                c.close()
        kids.append(pid)
    print('LISTENING', os.getpid(), flush=True)
    try:
        time.sleep(600)
    finally:
        for k in kids:
            os.kill(k, 9)";

/// Opens `n` connections at once to host:port, each asks 3 lines; prints JSON replies.
const MANY_CLIENTS: &str = "import json, socket, sys, threading
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = [None] * n
def one(i):
    try:
        c = socket.create_connection((host, port), timeout=20)
        f = c.makefile('rwb')
        got = []
        for k in range(3):
            f.write(b'req-%d-%d\\n' % (i, k))
            f.flush()
            got.append(f.readline().decode().strip())
        c.close()
        out[i] = got
    except Exception as e:
        out[i] = ['error %r' % e]
ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for t in ts: t.start()
for t in ts: t.join()
print(json.dumps(out))";

fn many_clients(cluster: &Cluster, node: usize, host: &str, port: u16, n: usize) -> Vec<Vec<String>> {
    let out = run_ok(
        cluster.preloaded(node, python3()).args(["-c", MANY_CLIENTS, host, &port.to_string(), &n.to_string()]),
        b"",
        Duration::from_secs(60),
        "python clients",
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", tail(&out.stdout)))
}

fn forking_server_serves(mode: &str, port: u16) {
    let cluster = Cluster::start(3, Mode::Loopback);
    let name = format!("fork{mode}");
    let mut server = Proc::spawn(
        cluster
            .preloaded(0, python3())
            .args(["-c", FORKING_SERVER, mode, &port.to_string()])
            .env("DVK_ENDPOINT", &name)
            .stdin(Stdio::null()),
        "forking server",
    );
    let line = server.lines.wait_for("LISTENING", SHORT);
    let server_vpid: i64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let host = format!("{name}.dc0.dvk");
    wait_connectable(&cluster, 2, "dc0", &host, port, REACH);
    let mut handlers = std::collections::HashSet::new();
    for round in 0..3 {
        let replies = many_clients(&cluster, 2, &host, port, 8);
        for (i, got) in replies.iter().enumerate() {
            assert_eq!(got.len(), 3, "{mode} round {round} client {i}: {got:?}");
            for (k, r) in got.iter().enumerate() {
                let parts: Vec<&str> = r.split_whitespace().collect();
                assert_eq!(parts.len(), 3, "{mode} round {round} client {i}: {got:?}");
                assert_eq!(parts[2], format!("req-{i}-{k}"), "{mode}: replies belong to their requests: {got:?}");
                assert!(parts[1].starts_with("127.77."), "{mode}: handler sees peer {}", parts[1]);
                let pid: i64 = parts[0].parse().unwrap();
                assert_ne!(pid, server_vpid, "{mode}: the answer comes from a forked child");
                handlers.insert(pid);
            }
        }
    }
    assert!(handlers.len() >= if mode == "fork" { 24 } else { 1 }, "{mode}: handler pids {handlers:?}");
    assert_alive(server.pid(), "forking server", &server.lines.seen.join("\n"));
}

#[test]
fn a_forking_server_serves_virtual_connections_from_its_children() {
    forking_server_serves("fork", 7400);
}

#[test]
fn prefork_workers_share_one_virtual_listener() {
    forking_server_serves("prefork", 7401);
}

const ASYNCIO_ECHO: &str = "import asyncio, sys
async def handle(r, w):
    try:
        while True:
            hdr = await r.readexactly(4)
            n = int.from_bytes(hdr, 'big')
            data = await r.readexactly(n)
            w.write(hdr + data)
            await w.drain()
    except asyncio.IncompleteReadError:
        pass
    w.close()
async def main():
    srv = await asyncio.start_server(handle, '0.0.0.0', int(sys.argv[1]))
    print('LISTENING', flush=True)
    await srv.serve_forever()
asyncio.run(main())";

const ASYNCIO_CLIENTS: &str = "import asyncio, os, random, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
async def one(i):
    r, w = await asyncio.open_connection(host, port)
    rnd = random.Random(i)
    total = 0
    for k in range(10):
        data = os.urandom(rnd.randint(1, 65536))
        w.write(len(data).to_bytes(4, 'big') + data)
        await w.drain()
        back = await r.readexactly(4 + len(data))
        if back[4:] != data:
            raise Exception('client %d message %d: echo differs' % (i, k))
        total += len(data)
    w.close()
    await w.wait_closed()
    return total
async def main():
    res = await asyncio.wait_for(asyncio.gather(*[one(i) for i in range(n)], return_exceptions=True), 60)
    bad = [r for r in res if isinstance(r, BaseException)]
    print('OK %d %d' % (n, sum(res)) if not bad else 'BAD %d %r' % (len(bad), bad[:3]), flush=True)
asyncio.run(main())";

#[test]
fn asyncio_echo_serves_a_hundred_concurrent_connections_across_nodes() {
    let cluster = Cluster::start(3, Mode::Loopback);
    let mut server = Proc::spawn(
        cluster
            .preloaded(0, python3())
            .args(["-c", ASYNCIO_ECHO, "7500"])
            .env("DVK_ENDPOINT", "aecho")
            .stdin(Stdio::null()),
        "asyncio server",
    );
    server.lines.wait_for("LISTENING", SHORT);
    wait_connectable(&cluster, 2, "dc0", "aecho.dc0.dvk", 7500, REACH);
    let mut clients: Vec<Proc> = [2usize, 1]
        .into_iter()
        .map(|node| {
            Proc::spawn(
                cluster
                    .preloaded(node, python3())
                    .args(["-c", ASYNCIO_CLIENTS, "aecho.dc0.dvk", "7500", "100"])
                    .stdin(Stdio::null()),
                "asyncio clients",
            )
        })
        .collect();
    for (k, c) in clients.iter_mut().enumerate() {
        let verdict = c.lines.next(Duration::from_secs(90), "the asyncio clients' verdict").unwrap_or_default();
        assert!(verdict.starts_with("OK 100 "), "asyncio clients #{k}: {verdict}");
        assert!(c.wait(SHORT, "asyncio clients").success());
    }
    assert_alive(server.pid(), "asyncio server", &server.lines.seen.join("\n"));
}

// ---------------------------------------------------------------------------
// 11. A stream never hangs when one end goes away: the other end sees EOF when
//     the peer process dies or when either node's agent stops.

const HOLD_SERVER: &str = "import socket, sys, time
s = socket.socket()
s.bind(('0.0.0.0', int(sys.argv[1])))
s.listen()
print('LISTENING', flush=True)
n = 0
while True:
    c, _ = s.accept()
    n += 1
    print('ACCEPTED', n, flush=True)
    if n >= 2:
        c.settimeout(30)
        try:
            print('SERVER-RECV %r' % c.recv(10), flush=True)
        except Exception as e:
            print('SERVER-RECV-ERROR %r' % e, flush=True)";

const HOLD_CLIENT: &str = "import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
print('CONNECTED', flush=True)
try:
    print('CLIENT-RECV %r' % c.recv(10), flush=True)
except Exception as e:
    print('CLIENT-RECV-ERROR %r' % e, flush=True)
time.sleep(60)";

#[derive(Clone, Copy, Debug)]
enum Gone {
    ServerKilled,
    ClientKilled,
    ServerAgentStopped,
    ClientAgentStopped,
}

fn the_other_end_sees_eof(gone: Gone) {
    // One port per scenario: the tests run in parallel on one host.
    let port = (7600 + gone as u16).to_string();
    let mut cluster = Cluster::start(3, Mode::Loopback);
    let mut server = Proc::spawn(
        cluster
            .preloaded(0, python3())
            .args(["-c", HOLD_SERVER, &port])
            .env("DVK_ENDPOINT", "hold")
            .stdin(Stdio::null()),
        "hold server",
    );
    server.lines.wait_for("LISTENING", SHORT);
    wait_connectable(&cluster, 2, "dc0", "hold.dc0.dvk", port.parse().unwrap(), REACH);
    server.lines.wait_for("ACCEPTED 1", SHORT);
    let mut client = Proc::spawn(
        cluster.preloaded(2, python3()).args(["-c", HOLD_CLIENT, "hold.dc0.dvk", &port]).stdin(Stdio::null()),
        "hold client",
    );
    client.lines.wait_for("CONNECTED", SHORT);
    server.lines.wait_for("ACCEPTED 2", SHORT);
    std::thread::sleep(Duration::from_millis(200)); // both are blocked in recv now
    let bound = Duration::from_secs(10);
    let (survivor, what) = match gone {
        Gone::ServerKilled => {
            server.child.kill().unwrap();
            (vec![&mut client], "CLIENT-RECV")
        }
        Gone::ClientKilled => {
            client.child.kill().unwrap();
            (vec![&mut server], "SERVER-RECV")
        }
        Gone::ServerAgentStopped => {
            cluster.stop_agent(0);
            (vec![&mut client, &mut server], "")
        }
        Gone::ClientAgentStopped => {
            cluster.stop_agent(2);
            (vec![&mut server, &mut client], "")
        }
    };
    for p in survivor {
        let line = p.lines.next(bound, &format!("the end of the stream after {gone:?}")).unwrap_or_default();
        assert!(
            line.ends_with("-RECV b''") && line.starts_with(what),
            "after {gone:?} a blocked recv must return EOF, got: {line}"
        );
    }
}

#[test]
fn the_client_sees_eof_when_the_server_process_is_killed() {
    the_other_end_sees_eof(Gone::ServerKilled);
}

#[test]
fn the_server_sees_eof_when_the_client_process_is_killed() {
    the_other_end_sees_eof(Gone::ClientKilled);
}

#[test]
fn both_ends_see_eof_when_the_servers_agent_stops() {
    the_other_end_sees_eof(Gone::ServerAgentStopped);
}

#[test]
fn both_ends_see_eof_when_the_clients_agent_stops() {
    the_other_end_sees_eof(Gone::ClientAgentStopped);
}

// ---------------------------------------------------------------------------
// 12. Endpoints are virtual: a node's own services may hold the same port for
//     real (on a real node, sshd, nginx, another DC's tenant...).

#[test]
fn an_endpoint_can_use_a_port_that_a_plain_socket_holds_on_the_node() {
    let cluster = Cluster::start(2, Mode::Loopback);
    // A plain (non-shim) listener holds the port on the host, for real.
    let plain = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = plain.local_addr().unwrap().port();
    let err = cluster.path("busy.err");
    let mut server = Proc::spawn(
        cluster
            .preloaded(0, python3())
            .args(["-c", ONE_SHOT_SERVER, &port.to_string(), "virtual"])
            .env("DVK_ENDPOINT", "busy")
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap()),
        "python server",
    );
    if server.lines.try_next(SHORT).as_deref() != Some("LISTENING") {
        panic!(
            "a preloaded server could not listen on port {port}, which a plain socket holds on the host: {}",
            std::fs::read_to_string(&err).unwrap_or_default().lines().last().unwrap_or("(no error output)")
        );
    }
    let name_port = format!("busy.dc0.dvk:{port}");
    wait_connectable(&cluster, 1, "dc0", "busy.dc0.dvk", port, REACH);
    assert_eq!(read_from(&cluster, 1, &name_port), "virtual");
    // The plain listener is untouched: a plain client still reaches it.
    let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    plain.set_nonblocking(false).unwrap();
    let (_conn, _) = plain.accept().unwrap();
}

// ---------------------------------------------------------------------------
// 13. Name lookup answers like a resolver: host names are case-insensitive
//     (RFC 4343), a trailing dot is the same name, an AF_INET6 query gets the
//     VIP v4-mapped and an AF_INET6 socket connects to it.

const LOOKUPS: &str = "import json, socket, sys
port = int(sys.argv[1])
out = {}
for name in ['look.dc0.dvk', 'LOOK.DC0.DVK', 'Look.Dc0.Dvk', 'look.dc0.dvk.']:
    try:
        out[name] = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror as e:
        out[name] = 'gaierror %d' % e.errno
    try:
        out['ghbn ' + name] = socket.gethostbyname(name)
    except OSError as e:
        out['ghbn ' + name] = 'error %s' % e
try:
    a6 = socket.getaddrinfo('look.dc0.dvk', port, socket.AF_INET6, socket.SOCK_STREAM)[0][4]
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(a6)
    out['v6'] = s.recv(64).decode().strip()
except Exception as e:
    out['v6'] = 'error %r' % e
print(json.dumps(out))";

#[test]
fn name_lookup_is_case_insensitive_and_serves_ipv6_sockets() {
    let cluster = Cluster::start(2, Mode::Loopback);
    let mut server = Proc::spawn(
        cluster
            .preloaded(0, python3())
            .args(["-c", ONE_SHOT_SERVER, "7800", "found"])
            .env("DVK_ENDPOINT", "look")
            .stdin(Stdio::null()),
        "python server",
    );
    server.lines.wait_for("LISTENING", SHORT);
    wait_connectable(&cluster, 1, "dc0", "look.dc0.dvk", 7800, REACH);
    let out =
        run_ok(cluster.preloaded(1, python3()).args(["-c", LOOKUPS, "7800"]), b"", Duration::from_secs(30), "lookups");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vip = v["look.dc0.dvk"].as_str().unwrap_or("").to_owned();
    assert!(vip.starts_with("127.77."), "{v}");
    let mut wrong = Vec::new();
    for name in ["LOOK.DC0.DVK", "Look.Dc0.Dvk", "look.dc0.dvk."] {
        for key in [name.to_owned(), format!("ghbn {name}")] {
            if v[&key] != vip.as_str() {
                wrong.push(format!("{key} -> {}", v[&key]));
            }
        }
    }
    assert_eq!(v["v6"], "found", "an AF_INET6 socket to the v4-mapped VIP: {v}");
    assert!(wrong.is_empty(), "these spellings of look.dc0.dvk ({vip}) answer otherwise: {wrong:?}");
}

/// A server with a backlog of 1 that is slow to accept: a burst of clients fills
/// the listener's queue. Like TCP (which retries its SYN), every client is served
/// once the server catches up, and the endpoint stays up: a full backlog is a busy
/// program, not a closed listener.
const SLOW_ACCEPTOR: &str = "import socket, time
s = socket.socket()
s.bind(('0.0.0.0', 7600))
s.listen(1)
print('LISTENING', flush=True)
time.sleep(0.5)
conns = []
for _ in range(12):
    c, _ = s.accept()
    conns.append(c)
for c in conns:
    c.sendall(c.recv(16))
time.sleep(30)";

const BURST_CLIENTS: &str = "import socket, threading
ok = []
def one(i):
    c = socket.create_connection(('slow.dc0.dvk', 7600), timeout=20)
    c.sendall(b'hello-%02d' % i)
    if c.recv(16) == b'hello-%02d' % i:
        ok.append(i)
ts = [threading.Thread(target=one, args=(i,)) for i in range(12)]
[t.start() for t in ts]
[t.join() for t in ts]
print(len(ok))";

#[test]
fn a_burst_that_overflows_the_listen_backlog_waits_instead_of_killing_the_endpoint() {
    let cluster = Cluster::start(2, Mode::Loopback);
    let mut server = Proc::spawn(
        cluster.preloaded(0, python3()).args(["-c", SLOW_ACCEPTOR]).env("DVK_ENDPOINT", "slow").stdin(Stdio::null()),
        "slow acceptor",
    );
    server.lines.wait_for("LISTENING", SHORT);
    wait_until(REACH, "slow:7600 to be listed on node2", || {
        String::from_utf8_lossy(&cluster.cli(1, &["endpoints"]).stdout).contains("slow:7600")
    });
    let out = run_ok(cluster.preloaded(1, python3()).args(["-c", BURST_CLIENTS]), b"", SHORT, "burst from node2");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "12", "every client of the burst is served");
    assert!(String::from_utf8_lossy(&cluster.cli(1, &["endpoints"]).stdout).contains("slow:7600"));
    drop(server);
}

/// Echoes every line it is sent, for as many connections as come, for up to a minute.
const LINE_ECHO: &str = "import socket, threading, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', 7700))
s.listen(16)
s.settimeout(60)
print('LISTENING', flush=True)
def serve(c):
    f = c.makefile('rwb')
    for line in f:
        f.write(line)
        f.flush()
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()";

const ONE_ROUND_TRIP: &str = "import socket, sys
c = socket.create_connection(('echo.dc0.dvk', 7700), timeout=10)
c.sendall(sys.argv[1].encode() + b'\\n')
print(c.makefile('rb').readline().decode().strip())";

#[test]
fn an_endpoint_and_its_process_survive_a_restart_of_their_agent() {
    let mut cluster = Cluster::start(2, Mode::Loopback);
    let mut server = Proc::spawn(
        cluster.preloaded(0, python3()).args(["-c", LINE_ECHO]).env("DVK_ENDPOINT", "echo").stdin(Stdio::null()),
        "echo server",
    );
    server.lines.wait_for("LISTENING", SHORT);
    wait_connectable(&cluster, 1, "dc0", "echo.dc0.dvk", 7700, REACH);
    let ask = |cluster: &Cluster, word: &str| {
        let out = run_ok(cluster.preloaded(1, python3()).args(["-c", ONE_ROUND_TRIP, word]), b"", SHORT, "echo client");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(ask(&cluster, "before"), "before");

    // The server's agent goes away and comes back; the server never noticed.
    cluster.stop_agent(0);
    cluster.start_agent(0);
    cluster.wait_mesh();
    wait_connectable(&cluster, 1, "dc0", "echo.dc0.dvk", 7700, REACH);
    assert_eq!(ask(&cluster, "after"), "after", "the endpoint is served again after the restart");
    drop(server);
}
