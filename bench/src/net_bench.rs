//! Request/reply round trip and bulk throughput through shim + agents vs
//! direct TCP on loopback, same program (tests/programs/netbench.c), same run.
//!
//! Cases: (a) direct TCP on 127.0.0.1, no shim; (b) shim + agents, client and
//! server on the same node; (c) shim + agents, client on node2, server on
//! node1 (2-node loopback cluster). The cases are interleaved over 3 repeats
//! and the median of the repeats is reported, so machine load hits all alike.
//! Targets (DESIGN.md §9): RTT <= 2.0x direct, throughput >= 0.5x direct.

use anyhow::{bail, Context};
use dvk_tests::net::{free_port, probe};
use dvk_tests::programs::c_program;
use dvk_tests::{Cluster, Mode};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REPEATS: usize = 3;
const MSG_SIZE: usize = 64;
const ENDPOINT: &str = "netbench";
const VPORT: u16 = 9700;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `netbench server` and waits for "LISTENING".
fn start_server(mut cmd: Command) -> anyhow::Result<Server> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).spawn().context("spawn netbench server")?;
    let stdout = child.stdout.take().unwrap();
    let server = Server(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(10)).context("netbench server did not start")?;
    if line.trim() != "LISTENING" {
        bail!("netbench server: {line}");
    }
    Ok(server)
}

/// Runs a netbench client (bounded) and returns its one output line's `key=value` fields.
fn run_client(mut cmd: Command, timeout: Duration) -> anyhow::Result<Vec<(String, f64)>> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn netbench client")?;
    let deadline = Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("netbench client did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("netbench client failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let text = String::from_utf8(out.stdout)?;
    Ok(text
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect())
}

fn field(fields: &[(String, f64)], key: &str) -> anyhow::Result<f64> {
    fields.iter().find(|(k, _)| k == key).map(|(_, v)| *v).with_context(|| format!("netbench printed no {key}"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[derive(Default)]
struct Results {
    rtt_median: Vec<f64>,
    rtt_p99: Vec<f64>,
    mb_per_s: Vec<f64>,
}

/// The test harness finds the agent and the shim next to the running binary's
/// `deps/`; the bench binary lives one level up, so point it there.
fn locate_binaries() {
    if std::env::var_os("DVK_BIN_DIR").is_some() {
        return;
    }
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        if dir.join("dvk-agent").exists() && dir.join("libdvkshim.so").exists() {
            std::env::set_var("DVK_BIN_DIR", dir);
        }
    }
}

/// `rounds` request/replies of 64 bytes and a `bulk_mb` MB one-way transfer per case and repeat.
pub fn run(rounds: usize, bulk_mb: usize) -> anyhow::Result<()> {
    anyhow::ensure!(rounds > 0 && bulk_mb > 0, "rounds and bulk size must be positive");
    locate_binaries();
    let program = c_program("netbench");
    let cluster = Cluster::start(2, Mode::Loopback);

    let direct_port = free_port();
    let _direct = start_server({
        let mut c = Command::new(&program);
        c.args(["server", &direct_port.to_string()]).env_remove("LD_PRELOAD");
        c
    })?;
    let _virtual = start_server({
        let mut c = cluster.preloaded(0, &program);
        c.args(["server", &VPORT.to_string()]).env("DVK_ENDPOINT", ENDPOINT);
        c
    })?;
    let host = format!("{ENDPOINT}.dc0.dvk");
    for node in [0, 1] {
        // The server discards the probe connections (no command line).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (ok, line) = probe(&cluster, node, "dc0", &host, VPORT);
            if ok {
                break;
            }
            if Instant::now() >= deadline {
                bail!("{host}:{VPORT} not reachable from node{}: {line}", node + 1);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    let direct_target = ("127.0.0.1".to_owned(), direct_port);
    let virtual_target = (host.clone(), VPORT);
    let cases: [(&str, Option<usize>, &(String, u16)); 3] = [
        ("direct TCP 127.0.0.1 (no shim)", None, &direct_target),
        ("shim+agents, same node", Some(0), &virtual_target),
        ("shim+agents, node2 -> node1", Some(1), &virtual_target),
    ];
    let client = |node: Option<usize>| match node {
        None => {
            let mut c = Command::new(&program);
            c.env_remove("LD_PRELOAD");
            c
        }
        Some(n) => cluster.preloaded(n, &program),
    };
    let bulk_bytes = (bulk_mb as u64) * 1_000_000;
    let mut results: Vec<Results> = (0..cases.len()).map(|_| Results::default()).collect();
    for _ in 0..REPEATS {
        for (i, (_, node, (h, p))) in cases.iter().enumerate() {
            let mut c = client(*node);
            c.args(["rtt", h, &p.to_string(), &MSG_SIZE.to_string(), &rounds.to_string()]);
            let f = run_client(c, Duration::from_secs(300))?;
            results[i].rtt_median.push(field(&f, "median_us")?);
            results[i].rtt_p99.push(field(&f, "p99_us")?);
            let mut c = client(*node);
            c.args(["bulk", h, &p.to_string(), &bulk_bytes.to_string()]);
            let f = run_client(c, Duration::from_secs(300))?;
            results[i].mb_per_s.push(field(&f, "mb_per_s")?);
        }
    }

    let rows: Vec<(f64, f64, f64)> =
        results.into_iter().map(|r| (median(r.rtt_median), median(r.rtt_p99), median(r.mb_per_s))).collect();
    let (base_rtt, _, base_tput) = rows[0];
    println!(
        "network: {MSG_SIZE}-byte request/reply x {rounds} rounds, {bulk_mb} MB one way; median of {REPEATS} interleaved runs"
    );
    println!("{:<32} {:>12} {:>10} {:>9} {:>12} {:>9}", "case", "RTT med us", "p99 us", "RTT/dir", "MB/s", "tput/dir");
    for ((name, _, _), (rtt, p99, tput)) in cases.iter().zip(&rows) {
        println!(
            "{:<32} {:>12.2} {:>10.2} {:>8.2}x {:>12.1} {:>8.2}x",
            name,
            rtt,
            p99,
            rtt / base_rtt,
            tput,
            tput / base_tput
        );
    }
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    for (name, _, _) in &cases[1..] {
        let (rtt, _, tput) = rows[cases.iter().position(|c| c.0 == *name).unwrap()];
        println!(
            "targets, {name}: RTT <= 2.0x direct -> {} ({:.2}x); throughput >= 0.5x direct -> {} ({:.2}x)",
            met(rtt <= 2.0 * base_rtt),
            rtt / base_rtt,
            met(tput >= 0.5 * base_tput),
            tput / base_tput
        );
    }
    Ok(())
}
