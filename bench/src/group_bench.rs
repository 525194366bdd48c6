//! Group moves (`migrate-cli move --group`): N servers of the same size moved as one group,
//! against the same N servers moved one by one, in the same run and the same cluster.
//!
//! Each server (`tests/programs/move_server.c`, endpoint `kv<i>`) runs on node1 with its own
//! client (`move_bench_client.c`) on node3, which prints every gap of more than 1 ms between two
//! consecutive replies (see move_bench.rs). A round moves every server node1 -> node2 (or back):
//! "alone" as N moves one after the other, "group" as one group move. Reported per round: the
//! time the servers were frozen (alone: the sum over the N moves, and per move; group: the
//! report's), the longest gap any client saw, and the whole round.
//!
//! Runs as root (the agents ptrace). Kills only what it started, by pid.

use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dvk_protocol::frame::{self, LOCAL_MAX_FRAME};
use dvk_protocol::local::{LocalRequest, LocalResponse, MoveOptions, MoveReport};
use dvk_tests::moving::no_inherited_fds;
use dvk_tests::net::{wait_connectable, Proc};
use dvk_tests::programs::c_program;
use dvk_tests::{Cluster, Mode};

use crate::move_bench::{keep_logs, machine, max, median, ms, now_us, pump, ClientLog, SETTLE_US};

#[derive(clap::Args, Debug, Clone)]
pub struct GroupBenchArgs {
    /// Servers in the group.
    #[arg(long, default_value_t = 2)]
    pub servers: usize,
    /// Written data held by each server, in MB (MiB).
    #[arg(long, value_delimiter = ',', default_values_t = vec![2.5, 64.0])]
    pub sizes: Vec<f64>,
    /// Rounds per size and way (node1 -> node2 -> node1 ...); median and max are reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Every move (alone and group) pre-copies (`move --precopy`); by default none does.
    #[arg(long)]
    pub precopy: bool,
}

/// One move request to the source's agent, as `migrate-cli move` sends it.
fn move_request(cluster: &Cluster, ask: usize, vpids: &[i64], to: usize, precopy: bool) -> anyhow::Result<MoveReport> {
    let dest = cluster.nodes[to].name.clone();
    let mut s = UnixStream::connect(cluster.nodes[ask].socket()).context("connect to the agent")?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let request = LocalRequest::Move {
        target: vpids[0] as i32,
        group: vpids[1..].iter().map(|v| *v as i32).collect(),
        dest: dest.clone(),
        options: MoveOptions { precopy: Some(precopy), ..Default::default() },
    };
    frame::write_frame(&mut s, &request, LOCAL_MAX_FRAME)?;
    loop {
        match frame::read_frame(&mut s, LOCAL_MAX_FRAME).context("waiting for the move")? {
            LocalResponse::MoveStep(_) | LocalResponse::MoveProgress { .. } => {}
            LocalResponse::MoveDone(report) if report.committed => return Ok(*report),
            LocalResponse::MoveDone(report) => bail!("move of {vpids:?} to {dest} rolled back: {:?}", report.reason),
            LocalResponse::Error { message } => bail!("move of {vpids:?} to {dest} refused: {message}"),
            other => bail!("unexpected answer to the move: {other:?}"),
        }
    }
}

struct Round {
    /// Frozen per move (one for a group).
    frozen_ms: Vec<f64>,
    /// The steps of the moves, "name ms" (summed over the moves of an "alone" round).
    steps: Vec<(String, f64)>,
    /// The longest gap any client saw.
    gap_ms: f64,
    total_ms: f64,
}

/// A server and its client.
struct Pair {
    server: Proc,
    vpid: i64,
    client: Proc,
    log: ClientLog,
}

fn start_pair(cluster: &Cluster, i: usize, port: u16, mb: f64) -> anyhow::Result<Pair> {
    let endpoint = format!("kv{i}");
    let mut cmd = cluster.preloaded(0, c_program("move_server"));
    cmd.args([port.to_string(), format!("{mb}")])
        .env("DVK_ENDPOINT", &endpoint)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(cluster.path(&format!("server-{port}.err")))?);
    let mut server = Proc::spawn(no_inherited_fds(&mut cmd), "move_server");
    server.lines.wait_for("listening", Duration::from_secs(60));
    let vpid = cluster.wait_registered(0, server.pid())["vpid"].as_i64().context("no vPID")?;
    let host = format!("{endpoint}.dc0.dvk");
    wait_connectable(cluster, 2, "dc0", &host, port, Duration::from_secs(20));
    let mut cmd = cluster.preloaded(2, c_program("move_bench_client"));
    cmd.args([host, port.to_string(), format!("{mb}")]).stdin(Stdio::null());
    let mut client = Proc::spawn(no_inherited_fds(&mut cmd), "move_bench_client");
    client.lines.wait_for("connected", Duration::from_secs(20));
    Ok(Pair { server, vpid, client, log: ClientLog::default() })
}

/// Moves every server from `at` to `to`, alone or as one group; the clients' longest gap.
fn round(
    cluster: &Cluster,
    pairs: &mut [Pair],
    at: usize,
    to: usize,
    group: bool,
    precopy: bool,
) -> anyhow::Result<Round> {
    let started = now_us();
    let t = Instant::now();
    let vpids: Vec<i64> = pairs.iter().map(|p| p.vpid).collect();
    let reports: Vec<MoveReport> = if group {
        vec![move_request(cluster, at, &vpids, to, precopy)?]
    } else {
        vpids.iter().map(|v| move_request(cluster, at, &[*v], to, precopy)).collect::<anyhow::Result<_>>()?
    };
    let total_ms = t.elapsed().as_secs_f64() * 1000.0;
    let done = now_us();
    let mut gap: f64 = 0.0;
    for p in pairs.iter_mut() {
        pump(&mut p.client, &mut p.log, done + SETTLE_US, Duration::from_secs(20))?;
        let worst = p
            .log
            .gaps
            .iter()
            .filter(|(a, b)| *b >= started && *a <= done + SETTLE_US)
            .map(|(a, b)| ms(b - a))
            .fold(0.0, f64::max);
        gap = gap.max(worst);
    }
    let mut steps: Vec<(String, f64)> = Vec::new();
    for s in reports.iter().flat_map(|r| r.steps.iter()) {
        match steps.iter_mut().find(|(n, _)| *n == s.name) {
            Some((_, t)) => *t += ms(s.micros),
            None => steps.push((s.name.clone(), ms(s.micros))),
        }
    }
    Ok(Round { frozen_ms: reports.iter().map(|r| ms(r.frozen_micros)).collect(), steps, gap_ms: gap, total_ms })
}

pub fn run(args: &GroupBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(dvk_tests::is_root(), "dvk-bench group needs root (the agents ptrace)");
    anyhow::ensure!(args.servers >= 2 && args.rounds > 0 && !args.sizes.is_empty(), "nothing to measure");
    let cluster = Cluster::start(3, Mode::Loopback);
    let mut rows = Vec::new();
    for (si, &mb) in args.sizes.iter().enumerate() {
        eprintln!("dvk-bench group: {} servers of {mb} MB", args.servers);
        let mut pairs = Vec::new();
        let result = (|| -> anyhow::Result<()> {
            for i in 0..args.servers {
                pairs.push(start_pair(&cluster, i, 7300 + (si * 16 + i) as u16, mb)?);
            }
            let mut at = 0;
            for group in [false, true] {
                let mut rounds = Vec::new();
                for _ in 0..args.rounds {
                    let r = round(&cluster, &mut pairs, at, 1 - at, group, args.precopy)?;
                    let steps: Vec<String> = r.steps.iter().map(|(n, t)| format!("{n} {t:.1}")).collect();
                    eprintln!(
                        "  {}: frozen {:?} ms, longest client gap {:.1} ms, round {:.1} ms; {}",
                        if group { "group" } else { "alone" },
                        r.frozen_ms.iter().map(|f| (f * 10.0).round() / 10.0).collect::<Vec<_>>(),
                        r.gap_ms,
                        r.total_ms,
                        steps.join(", ")
                    );
                    at = 1 - at;
                    rounds.push(r);
                }
                rows.push((mb, group, rounds));
            }
            Ok(())
        })();
        // The servers run where the last round left them (restored by that node's agent).
        for p in &pairs {
            let row = cluster.ps(0).into_iter().find(|r| r["vpid"] == p.vpid);
            if let Some(pid) = row.and_then(|r| r["pid"].as_i64()) {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if pid as u32 != p.server.pid() && String::from_utf8_lossy(&cmdline).contains("move_server") {
                    // SAFETY: kill takes two integers; the pid is our moved server (checked above).
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
        }
        if let Err(e) = result {
            keep_logs(&cluster);
            return Err(e);
        }
    }
    println!(
        "\nGroup moves: {} servers moved as one group vs one after the other, {} ({})",
        args.servers,
        if args.precopy { "with pre-copy" } else { "no pre-copy" },
        machine()
    );
    println!(
        "(median of {} rounds, max in brackets; frozen: alone = the N moves' sum, group = the one move)\n",
        args.rounds
    );
    println!("| each server | how | frozen ms | longest client gap ms | round ms |");
    println!("|---|---|---|---|---|");
    for (mb, group, rounds) in &rows {
        let frozen: Vec<f64> = rounds.iter().map(|r| r.frozen_ms.iter().sum()).collect();
        let gaps: Vec<f64> = rounds.iter().map(|r| r.gap_ms).collect();
        let totals: Vec<f64> = rounds.iter().map(|r| r.total_ms).collect();
        println!(
            "| {mb} MB | {} | {:.1} ({:.1}) | {:.1} ({:.1}) | {:.1} ({:.1}) |",
            if *group { "group" } else { "alone, one by one" },
            median(frozen.clone()),
            max(&frozen),
            median(gaps.clone()),
            max(&gaps),
            median(totals.clone()),
            max(&totals)
        );
    }
    Ok(())
}
