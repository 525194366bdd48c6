//! Real software moved under real clients, with zero client errors (`migrate-cli move`).
//!
//! * redis-server (background threads) moved node1 → node2 → node1 while a single redis-cli
//!   on node3 INCRs a counter 3000 times over one connection (replies exactly 1..=3000) and
//!   `redis-benchmark` runs; the vPID (`INFO server` process_id) stays; BGSAVE works after.
//! * `python3 -m http.server` moved twice under a curl loop on node3: every body
//!   byte-identical; its stdout/stderr (pipes to the test) go to a log on the destination,
//!   read with `migrate-cli logs`.
//! * The paper's server with 100 connections open across two moves; 10 moves back and forth
//!   in one run; the client itself moved while it runs.
//! * Identity (tests/programs/move_identity.c): getpid() is the vPID before and after a move,
//!   fork() after the move returns a vPID and waitpid gets the status, kill(vpid) from another
//!   node reaches it; connections waiting in the listen backlog are accepted on the
//!   destination.
//!
//! Every wait is bounded and waits for something observable; the moves happen at points in
//! the clients' progress (the clients wait at a gate until the move committed), so each move
//! lands while a client is mid-loop.

use dvk_tests::moving::{agent_logs, client_done, no_inherited_fds, start_client, start_server, LOOP, REACH};
use dvk_tests::net::{probe, run_bounded, run_ok, tail, wait_connectable, which, without_proxy, Proc};
use dvk_tests::programs::{c_program, python3};
use dvk_tests::{skip_unless, wait_until, Cluster, Mode};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const SHORT: Duration = Duration::from_secs(30);
/// One short client command (a new connection).
const CLI_WAIT: Duration = Duration::from_secs(15);
/// The first vPID; real pids are below it.
const VPID_BASE: i64 = 4_194_304;

// ---------------------------------------------------------------------------
// Shared helpers.

/// How long one `migrate-cli move` may take before the test fails.
const MOVE_WAIT: Duration = Duration::from_secs(30);

/// `moving::move_to` with a bounded wait: `migrate-cli move VPID NODE --json --wait S` asked
/// on node `ask`; checks the report says committed and `ps` shows the new node.
fn move_to(cluster: &Cluster, ask: usize, vpid: i64, to: usize) -> serde_json::Value {
    let dest = cluster.nodes[to].name.clone();
    let wait = MOVE_WAIT.as_secs().to_string();
    let out = cluster.cli(ask, &["move", &vpid.to_string(), &dest, "--json", "--wait", &wait]);
    assert!(
        out.status.success(),
        "move of {vpid} to {dest} (asked on node{}) failed: {}\n{}\n{}",
        ask + 1,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout),
        agent_logs(cluster)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("move --json prints the report");
    assert_eq!(report["committed"], true, "{report}");
    assert_eq!(report["to"], dest.as_str(), "{report}");
    let row = ps_row(cluster, ask, vpid).expect("the moved process is in ps");
    assert_eq!(row["node"], dest.as_str(), "ps shows the new node");
    report
}

/// Kills (SIGKILL, by the real pid `ps` shows) the processes of the given vPIDs wherever they
/// run when dropped: a moved process is a child of no test process, so the cluster would not.
struct KillMoved<'a> {
    cluster: &'a Cluster,
    vpids: Mutex<Vec<i64>>,
}

impl<'a> KillMoved<'a> {
    fn new(cluster: &'a Cluster) -> Self {
        KillMoved { cluster, vpids: Mutex::new(Vec::new()) }
    }

    fn add(&self, vpid: i64) {
        self.vpids.lock().unwrap().push(vpid);
    }
}

impl Drop for KillMoved<'_> {
    fn drop(&mut self) {
        let vpids = std::mem::take(&mut *self.vpids.lock().unwrap_or_else(|p| p.into_inner()));
        if vpids.is_empty() {
            return;
        }
        // Never panics: this also runs while a failed test unwinds.
        for i in 0..self.cluster.nodes.len() {
            let out = self.cluster.cli(i, &["ps", "--json"]);
            let Ok(rows) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else { continue };
            let Some(rows) = rows.as_array() else { continue };
            for row in rows {
                let (Some(vpid), Some(pid)) = (row["vpid"].as_i64(), row["pid"].as_i64()) else { continue };
                if vpids.contains(&vpid) && pid > 0 && pid < VPID_BASE {
                    // SAFETY: kill takes two integers.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
            return;
        }
    }
}

/// Where a client loop and the moves meet: the client reports its progress; the mover starts
/// move k once the progress reaches its threshold; the client waits at its gates until that
/// many moves committed. Whoever fails sets `stop`, so the other side does not wait in vain.
#[derive(Default)]
struct Steps {
    progress: AtomicUsize,
    moves_done: AtomicUsize,
    stop: AtomicBool,
}

impl Steps {
    fn advance(&self, to: usize) {
        self.progress.store(to, Ordering::SeqCst);
    }

    /// Client side: waits until `n` moves have committed.
    fn gate(&self, n: usize) {
        wait_until(LOOP, &format!("move {n} to commit"), || {
            self.moves_done.load(Ordering::SeqCst) >= n || self.stop.load(Ordering::SeqCst)
        });
        assert!(!self.stop.load(Ordering::SeqCst), "the mover failed");
    }

    /// Mover side: waits until the client's progress reaches `n`.
    fn reach(&self, n: usize) {
        wait_until(LOOP, &format!("the client's progress to reach {n}"), || {
            self.progress.load(Ordering::SeqCst) >= n || self.stop.load(Ordering::SeqCst)
        });
        assert!(!self.stop.load(Ordering::SeqCst), "the client failed");
    }

    fn committed(&self) {
        self.moves_done.fetch_add(1, Ordering::SeqCst);
    }
}

/// Sets `stop` when the thread holding it unwinds.
struct StopOnPanic<'a>(&'a Steps);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.stop.store(true, Ordering::SeqCst);
        }
    }
}

/// Runs `moves` ((progress threshold, destination node)) of `vpid` asked on node `ask`,
/// each once the client's progress reaches its threshold.
fn mover(cluster: &Cluster, steps: &Steps, ask: usize, vpid: i64, moves: &[(usize, usize)]) -> Vec<serde_json::Value> {
    let _stop = StopOnPanic(steps);
    let mut reports = Vec::new();
    for &(at, to) in moves {
        steps.reach(at);
        reports.push(move_to(cluster, ask, vpid, to));
        steps.committed();
    }
    reports
}

fn frozen_ms(reports: &[serde_json::Value]) -> Vec<f64> {
    reports.iter().map(|r| r["frozen_micros"].as_f64().unwrap_or(-1.0) / 1000.0).collect()
}

/// Runs `cmd` (stdin null, stdout and stderr read) to completion; kills it and panics after
/// `timeout`, or as soon as `stop` is set (the other side of the test failed).
fn run_stoppable(cmd: &mut Command, timeout: Duration, stop: &AtomicBool, what: &str) -> std::process::Output {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let out = read_all_of(child.stdout.take().unwrap());
    let err = read_all_of(child.stderr.take().unwrap());
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return std::process::Output { status, stdout: out.join().unwrap(), stderr: err.join().unwrap() };
        }
        if Instant::now() >= deadline || stop.load(Ordering::SeqCst) {
            let _ = child.kill();
            let _ = child.wait();
            let (o, e) = (out.join().unwrap(), err.join().unwrap());
            panic!(
                "{what} {}; killed.\nstdout: {}\nstderr: {}",
                if stop.load(Ordering::SeqCst) {
                    "stopped: the test failed elsewhere"
                } else {
                    "did not finish in time"
                },
                tail(&o),
                tail(&e)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reads all of `r` in a thread.
fn read_all_of(mut r: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

/// Waits until `migrate-cli logs VPID` (what a moved process wrote to its stdout and stderr
/// since they could not follow it) on node `ask` satisfies `cond`; returns the log.
fn wait_logs(cluster: &Cluster, ask: usize, vpid: i64, what: &str, cond: impl Fn(&str) -> bool) -> String {
    let mut log = String::new();
    let deadline = Instant::now() + REACH;
    loop {
        let out = cluster.cli(ask, &["logs", &vpid.to_string()]);
        if out.status.success() {
            log = String::from_utf8_lossy(&out.stdout).into_owned();
            if cond(&log) {
                return log;
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} in `migrate-cli logs {vpid}` on node{}; last answer: {}{}\n{}",
            ask + 1,
            log,
            String::from_utf8_lossy(&out.stderr),
            agent_logs(cluster)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ps_row(cluster: &Cluster, ask: usize, vpid: i64) -> Option<serde_json::Value> {
    cluster.ps(ask).into_iter().find(|r| r["vpid"] == vpid)
}

// ---------------------------------------------------------------------------
// 1. redis-server moved node1 → node2 → node1 under an INCR loop and redis-benchmark.

struct Redis {
    server: PathBuf,
    cli: PathBuf,
    benchmark: PathBuf,
}

fn redis_or_skip(test: &str) -> Option<Redis> {
    match (which("redis-server"), which("redis-cli"), which("redis-benchmark")) {
        (Some(server), Some(cli), Some(benchmark)) => Some(Redis { server, cli, benchmark }),
        _ => {
            eprintln!("SKIP {test}: redis-server/redis-cli/redis-benchmark not installed (ci/install-test-deps.sh)");
            None
        }
    }
}

/// The value of `field` in an INFO answer.
fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines().find_map(|l| l.trim_end().strip_prefix(&format!("{field}:")).map(str::to_owned))
}

/// Parses `redis-benchmark -q` output into {test: requests per second}.
fn benchmark_rps(stdout: &[u8]) -> BTreeMap<String, f64> {
    let text = String::from_utf8_lossy(stdout);
    let mut rps = BTreeMap::new();
    for line in text.split('\n') {
        let line = line.rsplit('\r').next().unwrap_or("").trim();
        if let Some((name, rest)) = line.split_once(": ") {
            if let Some((num, unit)) = rest.split_once(' ') {
                if unit.starts_with("requests per second") {
                    if let Ok(n) = num.parse() {
                        rps.insert(name.to_owned(), n);
                    }
                }
            }
        }
    }
    rps
}

const INCRS: usize = 3000;

fn redis_moves_under_clients(mode: Mode, test: &str) {
    if skip_unless(mode, test) {
        return;
    }
    let Some(redis) = redis_or_skip(test) else { return };
    let started = Instant::now();
    let cluster = Cluster::start(3, mode);
    let moved = KillMoved::new(&cluster);
    let port = 6390u16;
    let data = cluster.path("redis-data");
    std::fs::create_dir_all(&data).unwrap();
    let log = cluster.path("redis.log");
    let mut cmd = cluster.preloaded(0, &redis.server);
    cmd.args(["--port", &port.to_string(), "--bind", "0.0.0.0", "--save", "", "--appendonly", "no"])
        .args(["--protected-mode", "no", "--daemonize", "no", "--dir"])
        .arg(&data)
        .arg("--logfile")
        .arg(&log)
        .env("DVK_ENDPOINT", "redis")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let pid = cluster.spawn(no_inherited_fds(&mut cmd));
    let vpid = cluster.wait_registered(0, pid)["vpid"].as_i64().unwrap();
    moved.add(vpid);
    wait_connectable(&cluster, 2, "dc0", "redis.dc0.dvk", port, REACH);
    let redis_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let cli = |args: &[&str]| -> String {
        let mut c = cluster.preloaded(2, &redis.cli);
        c.args(["-h", "redis.dc0.dvk", "-p", &port.to_string(), "--raw"]).args(args);
        let out = run_ok(&mut c, b"", CLI_WAIT, &format!("redis-cli {}", args.join(" ")));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let info = cli(&["INFO", "server"]);
    let process_id = info_field(&info, "process_id").expect("INFO server has process_id");
    assert_eq!(process_id, vpid.to_string(), "redis sees its vPID as its pid");

    // (a) One redis-cli, one connection: CLIENT ID, INCR × 3000, CLIENT ID, fed through stdin.
    let incr_err = cluster.path("incr.err");
    let mut incr = cluster.preloaded(2, &redis.cli);
    incr.args(["-h", "redis.dc0.dvk", "-p", &port.to_string()])
        .stdin(Stdio::piped())
        .stderr(std::fs::File::create(&incr_err).unwrap());
    let mut incr = Proc::spawn(no_inherited_fds(&mut incr), "redis-cli (INCR loop)");
    let mut stdin = incr.child.stdin.take().unwrap();

    let steps = Steps::default();
    // Move 1 once 300 INCRs are answered (the writer stops at 1000 until it committed),
    // move 2 at 1300 (the writer stops at 2000).
    let plan = [(300usize, 1usize), (1300, 0)];
    let gates = [1000usize, 2000];
    let (reports, bench, client_ids) = std::thread::scope(|s| {
        let steps = &steps;
        let _stop = StopOnPanic(steps);
        let writer = s.spawn(move || {
            let _stop = StopOnPanic(steps);
            stdin.write_all(b"CLIENT ID\n").unwrap();
            for k in 0..INCRS {
                if let Some(g) = gates.iter().position(|&g| g == k) {
                    steps.gate(g + 1);
                }
                stdin.write_all(b"INCR counter\n").unwrap();
                // Pacing only: the loop runs while the moves happen.
                std::thread::sleep(Duration::from_micros(500));
            }
            stdin.write_all(b"CLIENT ID\n").unwrap();
            // Dropping stdin ends redis-cli.
        });
        let reader = s.spawn(|| {
            let _stop = StopOnPanic(steps);
            let lines = &mut incr.lines;
            let first = lines.next(REACH, "CLIENT ID").expect("redis-cli answers CLIENT ID");
            for k in 1..=INCRS {
                let line = lines.next(LOOP, &format!("INCR reply {k}")).unwrap_or_else(|| {
                    panic!(
                        "redis-cli ended after {} replies; stderr: {}",
                        k - 1,
                        tail(&std::fs::read(&incr_err).unwrap_or_default())
                    )
                });
                assert_eq!(line, k.to_string(), "INCR reply {k} (gap or repeat)");
                steps.advance(k);
            }
            let last = lines.next(REACH, "CLIENT ID").expect("redis-cli answers the last CLIENT ID");
            (first, last)
        });
        // (b) redis-benchmark from node3, started before the first move.
        let bench = s.spawn(|| {
            let _stop = StopOnPanic(steps);
            let mut b = cluster.preloaded(2, &redis.benchmark);
            b.args(["-h", "redis.dc0.dvk", "-p", &port.to_string()])
                .args(["-t", "set,get", "-n", "20000", "-c", "10", "-q"]);
            run_stoppable(no_inherited_fds(&mut b), LOOP, &steps.stop, "redis-benchmark")
        });
        // The benchmark's 10 clients are connected (and so is the INCR client, and INFO's own).
        wait_until(REACH, "redis-benchmark's clients to connect", || {
            let n: usize =
                info_field(&cli(&["INFO", "clients"]), "connected_clients").and_then(|v| v.parse().ok()).unwrap_or(0);
            n >= 12 || bench.is_finished()
        });
        let reports = mover(&cluster, steps, 2, vpid, &plan);
        let bench_ran_through_moves = !bench.is_finished();
        // A new connection after the moves (the benchmark still runs): the same process.
        let info = cli(&["INFO", "server"]);
        assert_eq!(info_field(&info, "process_id").as_deref(), Some(process_id.as_str()), "process_id after the moves");
        writer.join().unwrap();
        let ids = reader.join().unwrap();
        let out = bench.join().unwrap();
        eprintln!("{test}: redis-benchmark still running after the moves: {bench_ran_through_moves}");
        (reports, out, ids)
    });
    eprintln!("{test}: frozen ms per move {:?}", frozen_ms(&reports));
    let status = incr.wait(SHORT, "redis-cli (INCR loop)");
    let incr_stderr = std::fs::read_to_string(&incr_err).unwrap_or_default();
    assert!(status.success() && incr_stderr.trim().is_empty(), "redis-cli INCR loop: {status}; stderr: {incr_stderr}");
    assert_eq!(client_ids.0, client_ids.1, "the INCR loop kept one connection (CLIENT ID before and after)");

    let rps = benchmark_rps(&bench.stdout);
    let bench_text = format!("{}{}", String::from_utf8_lossy(&bench.stdout), String::from_utf8_lossy(&bench.stderr));
    eprintln!("{test}: redis-benchmark across the moves: {rps:?}");
    assert!(bench.status.success(), "redis-benchmark failed ({}): {}", bench.status, tail(bench_text.as_bytes()));
    assert!(
        !bench_text.to_lowercase().contains("error"),
        "redis-benchmark reported errors:\n{}",
        tail(bench_text.as_bytes())
    );
    for t in ["SET", "GET"] {
        assert!(
            rps.get(t).copied().unwrap_or(0.0) > 0.0,
            "no {t} rate from redis-benchmark:\n{}",
            tail(bench_text.as_bytes())
        );
    }

    // Same process, same data, where it started.
    let row = ps_row(&cluster, 2, vpid).expect("redis is in ps");
    assert_eq!(row["node"], cluster.nodes[0].name.as_str());
    assert_eq!(cli(&["GET", "counter"]).trim(), INCRS.to_string());

    // BGSAVE after the moves: redis forks a child that writes the dump.
    let saves_before: u64 =
        info_field(&cli(&["INFO", "persistence"]), "rdb_saves").and_then(|v| v.parse().ok()).unwrap_or(0);
    let answer = cli(&["BGSAVE"]);
    assert!(answer.contains("Background saving started"), "BGSAVE: {answer}");
    let mut persistence = String::new();
    wait_until(SHORT, "BGSAVE to finish", || {
        persistence = cli(&["INFO", "persistence"]);
        info_field(&persistence, "rdb_bgsave_in_progress").as_deref() == Some("0")
            && info_field(&persistence, "rdb_saves").and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) > saves_before
    });
    assert_eq!(
        info_field(&persistence, "rdb_last_bgsave_status").as_deref(),
        Some("ok"),
        "BGSAVE status:\n{persistence}\nredis log:\n{}",
        redis_log()
    );
    let dump = std::fs::read(data.join("dump.rdb")).expect("dump.rdb written");
    assert!(dump.starts_with(b"REDIS"), "dump.rdb is an RDB file");
    eprintln!("{test}: {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn redis_moves_twice_under_incr_loop_and_benchmark_loopback() {
    if dvk_tests::moving::skip_without_root("redis_moves_twice_under_incr_loop_and_benchmark_loopback") {
        return;
    }
    redis_moves_under_clients(Mode::Loopback, "redis_moves_twice_under_incr_loop_and_benchmark_loopback");
}

#[test]
fn redis_moves_twice_under_incr_loop_and_benchmark_network() {
    if dvk_tests::moving::skip_without_root("redis_moves_twice_under_incr_loop_and_benchmark_network") {
        return;
    }
    redis_moves_under_clients(Mode::Network, "redis_moves_twice_under_incr_loop_and_benchmark_network");
}

// ---------------------------------------------------------------------------
// 2. python3 -m http.server moved twice under a curl loop.

const FETCHES: usize = 300;
const PER_CURL: usize = 5;

#[test]
fn http_server_moves_twice_under_a_curl_loop() {
    if dvk_tests::moving::skip_without_root("http_server_moves_twice_under_a_curl_loop") {
        return;
    }
    let test = "http_server_moves_twice_under_a_curl_loop";
    if which("curl").is_none() {
        eprintln!("SKIP {test}: curl not installed (ci/install-test-deps.sh)");
        return;
    }
    let started = Instant::now();
    let cluster = Cluster::start(3, Mode::Loopback);
    let moved = KillMoved::new(&cluster);
    let site = cluster.path("www");
    std::fs::create_dir_all(&site).unwrap();
    let files: Vec<(String, Vec<u8>)> =
        [("tiny.bin", 17usize), ("small.bin", 4096), ("mid.bin", 100_000), ("big.bin", 1_000_003)]
            .iter()
            .map(|(name, len)| (name.to_string(), dvk_tests::random_bytes(*len)))
            .collect();
    for (name, body) in &files {
        std::fs::write(site.join(name), body).unwrap();
    }
    let port = 8010u16;
    let mut cmd = cluster.preloaded(0, python3());
    cmd.args(["-u", "-m", "http.server", &port.to_string(), "--bind", "0.0.0.0", "--directory"])
        .arg(&site)
        .env("DVK_ENDPOINT", "web")
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    let mut server = Proc::spawn(no_inherited_fds(&mut cmd), "http.server");
    // Its access log (stderr) is a pipe to the test too, until the move.
    let piped_log = read_all_of(server.child.stderr.take().unwrap());
    server.lines.wait_for("Serving HTTP", REACH);
    let vpid = cluster.wait_registered(0, server.pid())["vpid"].as_i64().unwrap();
    moved.add(vpid);
    wait_connectable(&cluster, 2, "dc0", "web.dc0.dvk", port, REACH);

    let steps = Steps::default();
    // Move 1 once 50 fetches are done (the loop waits at 150 until it committed), move 2 at 170
    // (the loop waits at 270).
    let plan = [(50usize, 1usize), (170, 0)];
    let gates = [150usize, 270];
    let out_dir = cluster.path("fetched");
    std::fs::create_dir_all(&out_dir).unwrap();
    let reports = std::thread::scope(|s| {
        let steps = &steps;
        let mover = s.spawn(|| {
            let _stop = StopOnPanic(steps);
            let mut reports = Vec::new();
            for (i, &(at, to)) in plan.iter().enumerate() {
                steps.reach(at);
                if i == 1 {
                    // On node2 now: the fetches since the first move are in its log, read from node3.
                    let log = wait_logs(&cluster, 2, vpid, "the access log after the first move", |l| {
                        (gates[0]..at).all(|j| l.contains(&format!("?fetch={j} ")))
                    });
                    assert!(!log.contains("?fetch=0 "), "the log holds only what came after the move:\n{log}");
                }
                reports.push(move_to(&cluster, 2, vpid, to));
                steps.committed();
            }
            reports
        });
        let _stop = StopOnPanic(steps);
        let mut k = 0;
        while k < FETCHES {
            if let Some(g) = gates.iter().position(|&g| g == k) {
                steps.gate(g + 1);
            }
            let mut curl = cluster.preloaded(2, "curl");
            // --fail-early: with several URLs curl exits with the status of the last one only;
            // a failed transfer in the middle must fail the run (and show why).
            curl.args(["-sS", "--fail", "--fail-early", "--noproxy", "*", "--max-time", "60"]);
            let batch: Vec<usize> = (k..k + PER_CURL).collect();
            for &j in &batch {
                let (name, _) = &files[j % files.len()];
                // The query tags the request in http.server's access log.
                curl.arg("-o")
                    .arg(out_dir.join(format!("f{j}")))
                    .arg(format!("http://web.dc0.dvk:{port}/{name}?fetch={j}"));
            }
            without_proxy(&mut curl);
            let out = run_bounded(no_inherited_fds(&mut curl), b"", Duration::from_secs(90), "curl");
            assert!(
                out.status.success(),
                "curl (fetches {k}..{}) failed with {}: {}\n{}",
                k + PER_CURL,
                out.status,
                tail(&out.stderr),
                agent_logs(&cluster)
            );
            for &j in &batch {
                let (name, body) = &files[j % files.len()];
                let got = std::fs::read(out_dir.join(format!("f{j}"))).unwrap_or_default();
                assert_eq!(got.len(), body.len(), "fetch {j} of {name}: length");
                assert!(got == *body, "fetch {j} of {name}: contents differ");
                std::fs::remove_file(out_dir.join(format!("f{j}"))).unwrap();
            }
            k += PER_CURL;
            steps.advance(k);
        }
        mover.join().unwrap()
    });
    eprintln!("{test}: frozen ms per move {:?}", frozen_ms(&reports));
    // The first move redirects the pipes to a log on node2; the second carries that file.
    assert!(
        reports[0]["log"].is_string(),
        "stdout/stderr were pipes to the test: the move reports a log: {}",
        reports[0]
    );
    // Before the first move, the access log came through the pipe.
    // (The pipe ends when the original is killed.)
    let piped = String::from_utf8_lossy(&piped_log.join().unwrap()).into_owned();
    assert!(piped.contains("GET /tiny.bin?fetch=0 "), "access log through the pipe:\n{piped}");
    // After the second move (back to node1) the access log is still there for `migrate-cli
    // logs`, asked on node3, with the fetches since.
    let last = FETCHES - 1;
    // Where the first move redirected stdout/stderr (node2's runtime dir).
    let node2_log = cluster.nodes[1].runtime_dir.join("logs").join(format!("{vpid}.log"));
    eprintln!(
        "{test}: {} has the last fetch: {}",
        node2_log.display(),
        std::fs::read_to_string(&node2_log).unwrap_or_default().contains(&format!("?fetch={last} "))
    );
    let log = wait_logs(&cluster, 2, vpid, "the access log of the last fetch, after the second move", |l| {
        l.contains(&format!("?fetch={last} "))
    });
    let logged: Vec<usize> =
        log.lines().filter_map(|l| l.split("?fetch=").nth(1)?.split(' ').next()?.parse().ok()).collect();
    // Fetches after the first move (≥ 150, as the loop waited there) are all in the log.
    for j in gates[0]..FETCHES {
        assert!(
            logged.contains(&j),
            "fetch {j} (after the first move) is not in `migrate-cli logs`:\n{log}\nFILE:\n{}\n{}",
            std::fs::read_to_string(cluster.nodes[0].runtime_dir.join("logs").join(format!("{vpid}.log")))
                .unwrap_or_default(),
            agent_logs(&cluster)
        );
    }
    assert!(log.lines().all(|l| !l.contains("Traceback")), "http.server raised:\n{log}");
    let row = ps_row(&cluster, 2, vpid).expect("http.server in ps");
    assert_eq!(row["node"], cluster.nodes[0].name.as_str());
    // The report names the log where it is: in the destination's runtime dir.
    let named = reports[0]["log"].as_str().unwrap_or_default();
    assert!(
        named.starts_with(&*cluster.nodes[1].runtime_dir.to_string_lossy()),
        "the first move's report names {named}, not a file in node2's runtime dir {}",
        cluster.nodes[1].runtime_dir.display()
    );
    eprintln!("{test}: {:.1} s", started.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------
// 3./4. The paper's programs: 100 connections, 10 moves, a moved client.

#[test]
fn hundred_open_connections_survive_two_moves() {
    if dvk_tests::moving::skip_without_root("hundred_open_connections_survive_two_moves") {
        return;
    }
    let started = Instant::now();
    let cluster = Cluster::start(3, Mode::Loopback);
    let moved = KillMoved::new(&cluster);
    let (port, mb) = (7010, 4);
    let (_server, vpid) = start_server(&cluster, 0, port, mb);
    moved.add(vpid);
    let mut client = start_client(&cluster, 2, port, mb, 3000, 100, 100);
    assert_eq!(client.lines.seen.last().map(String::as_str), Some("connected 100"));
    let mut reports = Vec::new();
    for to in [1, 0] {
        client.lines.wait_for("progress", SHORT);
        reports.push(move_to(&cluster, 2, vpid, to));
    }
    let done = client_done(&cluster, &mut client);
    eprintln!(
        "hundred_open_connections_survive_two_moves: {done}; frozen ms {:?}; {:.1} s",
        frozen_ms(&reports),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn ten_moves_back_and_forth_in_one_run() {
    if dvk_tests::moving::skip_without_root("ten_moves_back_and_forth_in_one_run") {
        return;
    }
    let started = Instant::now();
    let cluster = Cluster::start(3, Mode::Loopback);
    let moved = KillMoved::new(&cluster);
    let (port, mb) = (7020, 4);
    let (_server, vpid) = start_server(&cluster, 0, port, mb);
    moved.add(vpid);
    let moves = 10;
    // The blocks b % 2 == 0 are this client's; the late client below takes the others.
    let mut client = dvk_tests::moving::start_client_slice(&cluster, 2, port, mb, 1000 + 300 * moves, 1, 200, "0/2");
    let mut reports = Vec::new();
    for k in 0..moves {
        client.lines.wait_for("progress", SHORT);
        let to = if k % 2 == 0 { 1 } else { 0 };
        // Ask the source, the destination and the client's node in turn.
        reports.push(move_to(&cluster, [0, 1, 2][k % 3], vpid, to));
    }
    let done = client_done(&cluster, &mut client);
    let row = ps_row(&cluster, 2, vpid).expect("server in ps");
    assert_eq!(row["node"], cluster.nodes[0].name.as_str(), "10 moves end where they started");
    // The server still takes new connections (its listener followed it 10 times).
    let mut late = dvk_tests::moving::start_client_slice(&cluster, 2, port, mb, 200, 2, 0, "1/2");
    let late_done = client_done(&cluster, &mut late);
    assert!(late_done.starts_with("DONE requests=200"), "{late_done}");
    eprintln!(
        "ten_moves_back_and_forth_in_one_run: {done}; frozen ms {:?}; {:.1} s",
        frozen_ms(&reports),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn a_running_client_is_moved_and_completes() {
    if dvk_tests::moving::skip_without_root("a_running_client_is_moved_and_completes") {
        return;
    }
    let started = Instant::now();
    let cluster = Cluster::start(3, Mode::Loopback);
    let moved = KillMoved::new(&cluster);
    let (port, mb) = (7030, 4);
    let (_server, server_vpid) = start_server(&cluster, 0, port, mb);
    moved.add(server_vpid);
    let count = 3000;
    let mut client = start_client(&cluster, 2, port, mb, count, 4, 300);
    let client_vpid = cluster.wait_registered(2, client.pid())["vpid"].as_i64().unwrap();
    moved.add(client_vpid);
    client.lines.wait_for("progress", SHORT);
    let report = move_to(&cluster, 2, client_vpid, 1);
    assert!(report["log"].is_string(), "the client's stdout (a pipe to the test) goes to a log: {report}");
    // The original on node3 is gone; the client runs on node2 and writes its stdout to the log.
    let status = client.wait(SHORT, "the moved client's original");
    assert!(!status.success(), "the frozen original is killed, it does not finish: {status}");
    let log =
        wait_logs(&cluster, 1, client_vpid, "the moved client to finish", |l| l.contains("DONE") || l.contains("FAIL"));
    assert!(
        log.lines().any(
            |l| l == format!("DONE requests={count}").as_str() || l.starts_with(&format!("DONE requests={count} "))
        ),
        "the moved client did not finish cleanly:\n{log}\n{}",
        agent_logs(&cluster)
    );
    // Its exit is seen: it leaves ps.
    wait_until(REACH, "the moved client to leave ps", || ps_row(&cluster, 2, client_vpid).is_none());
    eprintln!(
        "a_running_client_is_moved_and_completes: {}; frozen {:.1} ms; {:.1} s",
        log.lines().find(|l| l.starts_with("DONE")).unwrap_or(""),
        report["frozen_micros"].as_f64().unwrap_or(0.0) / 1000.0,
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------
// 5./6. Identity: getpid, fork/waitpid, kill(vpid) across nodes; the listen backlog.

const ASK_PY: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
r = s.makefile('rb')
for c in sys.argv[3:]:
    s.sendall(c.encode() + b'\n')
    print('sent', c, flush=True)
    line = r.readline()
    if not line:
        print('eof', flush=True)
        sys.exit(1)
    print('reply', line.decode().strip(), flush=True)
s.close()
"#;

fn identity_cmd(cluster: &Cluster, node: usize, port: u16, cmds: &[&str]) -> Command {
    let mut c = cluster.preloaded(node, python3());
    c.args(["-c", ASK_PY, "ident.dc0.dvk", &port.to_string()]).args(cmds).env("DVK_ENDPOINT", "ident-client");
    no_inherited_fds(&mut c);
    c
}

/// Sends `cmds` to move_identity over one connection from node `node`; returns the replies.
fn ask(cluster: &Cluster, node: usize, port: u16, cmds: &[&str]) -> Vec<String> {
    let out = run_ok(&mut identity_cmd(cluster, node, port, cmds), b"", SHORT, &format!("ask {cmds:?}"));
    let text = String::from_utf8_lossy(&out.stdout);
    let replies: Vec<String> = text.lines().filter_map(|l| l.strip_prefix("reply ")).map(str::to_owned).collect();
    assert_eq!(replies.len(), cmds.len(), "replies to {cmds:?}: {text}");
    replies
}

/// kill(vpid, sig) from a preloaded process on node `node`.
fn kill_from(cluster: &Cluster, node: usize, vpid: i64, sig: i32) {
    let mut c = cluster.preloaded(node, python3());
    c.args(["-c", &format!("import os; os.kill({vpid}, {sig})")]);
    run_ok(no_inherited_fds(&mut c), b"", SHORT, &format!("kill({vpid}, {sig}) from node{}", node + 1));
}

fn start_identity(cluster: &Cluster, node: usize, port: u16) -> (Proc, i64) {
    let mut cmd = cluster.preloaded(node, c_program("move_identity"));
    cmd.arg(port.to_string())
        .env("DVK_ENDPOINT", "ident")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(cluster.path(&format!("identity-{port}.err"))).unwrap());
    let mut server = Proc::spawn(no_inherited_fds(&mut cmd), "move_identity");
    let line = server.lines.wait_for("listening", REACH);
    let vpid = cluster.wait_registered(node, server.pid())["vpid"].as_i64().unwrap();
    assert_eq!(line, format!("listening {vpid}"), "getpid() is the vPID");
    wait_connectable(cluster, 2, "dc0", "ident.dc0.dvk", port, REACH);
    (server, vpid)
}

/// `fork` reply: (pid fork returned, pid waitpid returned, exit status).
fn fork_reply(reply: &str) -> (i64, i64, i32) {
    let v: Vec<&str> = reply.split_whitespace().collect();
    assert_eq!(v.len(), 3, "fork reply: {reply}");
    (v[0].parse().unwrap(), v[1].parse().unwrap(), v[2].parse().unwrap())
}

fn wait_sigs(cluster: &Cluster, port: u16, want: u32) {
    let mut got = String::new();
    wait_until(REACH, &format!("SIGUSR1 count {want}"), || {
        got = ask(cluster, 2, port, &["sigs"]).remove(0);
        got.parse::<u32>().map(|n| n >= want).unwrap_or(false)
    });
    assert_eq!(got, want.to_string(), "SIGUSR1 delivered exactly once per kill");
}

#[test]
fn a_moved_process_keeps_its_pid_forks_vpids_and_gets_signals() {
    if dvk_tests::moving::skip_without_root("a_moved_process_keeps_its_pid_forks_vpids_and_gets_signals") {
        return;
    }
    let started = Instant::now();
    let cluster = Cluster::start(3, Mode::Loopback);
    let moved = KillMoved::new(&cluster);
    let port = 7100;
    let (_server, vpid) = start_identity(&cluster, 0, port);
    moved.add(vpid);
    let before = ask(&cluster, 2, port, &["pid", "fork", "sigs"]);
    assert_eq!(before[0], vpid.to_string(), "getpid() before the move");
    let (child, waited, status) = fork_reply(&before[1]);
    assert!(child > VPID_BASE && waited == child && status == 7, "fork before the move: {}", before[1]);
    assert_eq!(before[2], "0");
    kill_from(&cluster, 2, vpid, libc::SIGUSR1);
    wait_sigs(&cluster, port, 1);

    let report = move_to(&cluster, 2, vpid, 1);
    let after = ask(&cluster, 2, port, &["pid", "fork", "sigs", "fork"]);
    assert_eq!(after[0], vpid.to_string(), "getpid() after the move");
    for f in [&after[1], &after[3]] {
        let (child2, waited2, status2) = fork_reply(f);
        assert!(child2 > VPID_BASE, "fork after the move returns a vPID: {f}");
        assert_eq!(waited2, child2, "waitpid returns what fork returned: {f}");
        assert_eq!(status2, 7, "waitpid gets the child's exit status: {f}");
        assert_ne!(child2, child, "a new vPID for a new child");
    }
    assert_eq!(after[2], "1", "the count survived the move");
    // kill(vpid) from the third node and from the node it left.
    kill_from(&cluster, 2, vpid, libc::SIGUSR1);
    wait_sigs(&cluster, port, 2);
    kill_from(&cluster, 0, vpid, libc::SIGUSR1);
    wait_sigs(&cluster, port, 3);
    eprintln!(
        "a_moved_process_keeps_its_pid_forks_vpids_and_gets_signals: frozen {:.1} ms; {:.1} s",
        report["frozen_micros"].as_f64().unwrap_or(0.0) / 1000.0,
        started.elapsed().as_secs_f64()
    );
}

/// Connections queued in the listen backlog of real pid `pid` on node `node` (`ss`), or None.
fn backlog_of(cluster: &Cluster, node: usize, pid: u32) -> Option<u64> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|e| {
            let l = std::fs::read_link(e.ok()?.path()).ok()?;
            let l = l.to_string_lossy();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let out = cluster.command(node, "ss").args(["-xlnH"]).output().ok()?;
    // u_str LISTEN RECV-Q SEND-Q PATH INODE * 0
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() >= 6 && inodes.iter().any(|i| i == f[5])).then(|| f[2].parse().ok()).flatten()
    })
}

#[test]
fn connections_in_the_listen_backlog_are_accepted_on_the_destination() {
    if dvk_tests::moving::skip_without_root("connections_in_the_listen_backlog_are_accepted_on_the_destination") {
        return;
    }
    let started = Instant::now();
    let cluster = Cluster::start(3, Mode::Loopback);
    let moved = KillMoved::new(&cluster);
    let port = 7110;
    let (mut server, vpid) = start_identity(&cluster, 0, port);
    moved.add(vpid);
    assert_eq!(ask(&cluster, 2, port, &["hold"]), ["holding"]);
    server.lines.wait_for("holding", REACH);
    // Queued while it does not accept: one connection whose client already left (net_probe
    // connects and closes), then one with a request waiting for its answer.
    let (ok, line) = probe(&cluster, 2, "dc0", "ident.dc0.dvk", port);
    assert!(ok, "connect while the server does not accept: {line}");
    let mut held = Proc::spawn(identity_cmd(&cluster, 2, port, &["pid", "sigs"]).stdin(Stdio::null()), "held client");
    held.lines.wait_for("sent pid", REACH);
    let mut queued = None;
    wait_until(REACH, "both connections to wait in the server's listen backlog", || {
        queued = backlog_of(&cluster, 0, server.pid());
        queued.is_some_and(|n| n >= 2)
    });
    assert!(held.lines.drain_now().is_empty(), "no answer while the server does not accept");

    let report = move_to(&cluster, 2, vpid, 1);
    assert!(held.lines.drain_now().is_empty(), "no answer before SIGUSR2");
    kill_from(&cluster, 2, vpid, libc::SIGUSR2);
    let reply = held.lines.wait_for("reply", REACH);
    assert_eq!(reply, format!("reply {vpid}"), "the queued request is answered on the destination");
    assert_eq!(held.lines.wait_for("reply", REACH), "reply 0");
    let status = held.wait(SHORT, "held client");
    assert!(status.success(), "held client: {status}; {:?}", held.lines.seen);
    // The server said so on its stdout, which is now the log on node2.
    wait_logs(&cluster, 2, vpid, "`accepting`", |l| l.lines().any(|x| x == "accepting"));
    assert_eq!(ask(&cluster, 2, port, &["pid"]), [vpid.to_string()]);
    eprintln!(
        "connections_in_the_listen_backlog_are_accepted_on_the_destination: {queued:?} queued; frozen {:.1} ms; {:.1} s",
        report["frozen_micros"].as_f64().unwrap_or(0.0) / 1000.0,
        started.elapsed().as_secs_f64()
    );
}
