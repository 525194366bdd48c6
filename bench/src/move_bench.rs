//! A live move as the client sees it (`migrate-cli move`), for servers holding 2.5, 64 and
//! 256 MB of written data. Baseline measured in the same run: a local dump + restore of the same
//! program holding the same data, with the checkpoint engine alone (no agents, no transfer).
//!
//! A 3-node loopback cluster (agents started here, stopped by pid at the end). The server
//! (`tests/programs/move_server.c`) runs on node1 under the shim; the client
//! (`move_bench_client.c`) on node3 sends 5-byte requests in a tight loop (one outstanding,
//! 4 KB replies, every byte checked) and prints the CLOCK_MONOTONIC time of every gap of more
//! than 1 ms between two consecutive replies. The bench moves the server node1 -> node2 ->
//! node1 ... (the same request `migrate-cli move` sends, to the source's agent), timestamps the
//! report's steps as they arrive (same clock), and reports per size the median and the max of:
//! the frozen time (report), the client-seen downtime (longest gap between two consecutive replies
//! around the move), freeze -> first reply (from the start of the freeze step until the reply
//! that ends that gap), the whole move, and each step.
//!
//! Runs as root (the agents and the engine ptrace). Kills only what it started, by pid.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dvk_checkpoint::{self as ck, AfterDump, RestoreOptions};
use dvk_protocol::frame::{self, LOCAL_MAX_FRAME};
use dvk_protocol::local::{LocalRequest, LocalResponse, MoveOptions, MoveReport, Transfer};
use dvk_tests::moving::no_inherited_fds;
use dvk_tests::net::{wait_connectable, Proc};
use dvk_tests::programs::c_program;
use dvk_tests::{Cluster, Mode};

#[derive(clap::Args, Debug, Clone)]
pub struct MoveBenchArgs {
    /// Written data held by the server, in MB (MiB).
    #[arg(long, value_delimiter = ',', default_values_t = vec![2.5, 64.0, 256.0])]
    pub sizes: Vec<f64>,
    /// Moves per size (node1 -> node2 -> node1 ...); median and max are reported.
    #[arg(long, default_value_t = 5)]
    pub moves: usize,
    /// Local dump + restore runs per size (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub baseline_runs: usize,
    /// Also measure every size with `move --precopy`.
    #[arg(long)]
    pub precopy: bool,
    /// Also measure every size with `move --transfer rsync`, twice: with no older image on
    /// either node (removed before each move: a full copy), and moving back and forth with a
    /// writer changing 4 MB of the server's data before each move (rsync sends the delta).
    #[arg(long)]
    pub rsync: bool,
    /// Moves compress their page data (`move --compress`).
    #[arg(long)]
    pub compress: bool,
    /// Also draw the results as SVG charts into this directory (move-downtime.svg,
    /// move-total.svg, move-transfer.svg).
    #[arg(long, value_name = "DIR")]
    pub plots: Option<std::path::PathBuf>,
}

/// How the moves of a row are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum How {
    /// Stop-and-copy, the image streamed over the agent link.
    Stop,
    /// `move --precopy`.
    Pre,
    /// `move --transfer rsync`, no older image on the destination.
    RsyncFull,
    /// `move --transfer rsync` back to a node that holds the image the server left it with,
    /// [`DELTA_WRITES`] blocks of 4 KB written since.
    RsyncDelta,
}

impl How {
    const ALL: [How; 4] = [How::Stop, How::Pre, How::RsyncFull, How::RsyncDelta];

    fn short(self) -> &'static str {
        match self {
            How::Stop => "stop",
            How::Pre => "pre",
            How::RsyncFull => "rsync",
            How::RsyncDelta => "delta",
        }
    }

    fn long(self) -> &'static str {
        match self {
            How::Stop => "stop-and-copy",
            How::Pre => "pre-copy",
            How::RsyncFull => "rsync, full",
            How::RsyncDelta => "rsync, delta",
        }
    }
}

/// Blocks of 4 KB a writer changes before each move of the rsync delta row (4 MB).
const DELTA_WRITES: usize = 1024;

/// The row's mode, short.
fn mode(r: &SizeResult) -> &'static str {
    r.how.short()
}

/// The steps of a move, in order (agent/src/moving/source.rs).
const STEPS: [&str; 10] =
    ["preflight", "pre-copy", "start", "freeze", "detach", "dump", "transfer", "restore", "commit", "keep"];
/// Client activity between two moves, and after the last one, before the gaps are read.
pub(crate) const SETTLE_US: u64 = 300_000;
/// Targets of the issue (end to end, as the client sees it), printed beside the results.
const TARGETS: [(f64, f64); 2] = [(2.5, 20.0), (256.0, 150.0)];

pub(crate) fn now_us() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1000
}

pub(crate) fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

pub(crate) fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

/// What the client printed so far.
#[derive(Default)]
pub(crate) struct ClientLog {
    /// (previous reply, reply) more than 1 ms apart.
    pub(crate) gaps: Vec<(u64, u64)>,
    /// (time of the last reply, replies so far, longest gap since the previous line).
    pub(crate) alive: Vec<(u64, u64, u64)>,
}

/// Reads the client's lines until it reports a reply at or after `until_us`.
pub(crate) fn pump(client: &mut Proc, log: &mut ClientLog, until_us: u64, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("the client had no reply for {timeout:?} (last lines: {:?})", last_lines(client));
        }
        let Some(line) = client.lines.try_next(left.min(Duration::from_millis(200))) else {
            if let Ok(Some(st)) = client.child.try_wait() {
                bail!("the client exited ({st}): {:?}", last_lines(client));
            }
            continue;
        };
        let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
        if line.starts_with("gap ") && f.len() == 2 {
            log.gaps.push((f[0], f[1]));
        } else if line.starts_with("alive ") && f.len() == 3 {
            log.alive.push((f[0], f[1], f[2]));
            if f[0] >= until_us {
                return Ok(());
            }
        } else {
            bail!("the client: {line}");
        }
    }
}

fn last_lines(p: &Proc) -> Vec<String> {
    p.lines.seen.iter().rev().take(5).rev().cloned().collect()
}

struct MoveSample {
    report: MoveReport,
    frozen_ms: f64,
    total_ms: f64,
    /// Longest gap between two consecutive replies around the move.
    downtime_ms: f64,
    /// From the start of the freeze step until the reply that ended that gap.
    freeze_to_reply_ms: f64,
}

/// Asks the agent of node `ask` (the source) to move `vpid` to node `to`; returns the report,
/// when the request was sent and when the freeze step started (our clock).
fn move_once(
    cluster: &Cluster,
    ask: usize,
    vpid: i64,
    to: usize,
    how: How,
    compress: bool,
) -> anyhow::Result<(MoveReport, u64, u64)> {
    let dest = cluster.nodes[to].name.clone();
    let mut s = UnixStream::connect(cluster.nodes[ask].socket()).context("connect to the agent")?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let sent = now_us();
    frame::write_frame(
        &mut s,
        &LocalRequest::Move {
            target: vpid as i32,
            dest: dest.clone(),
            options: MoveOptions {
                precopy: Some(how == How::Pre),
                compress,
                transfer: match how {
                    How::Stop | How::Pre => Transfer::Stream,
                    How::RsyncFull | How::RsyncDelta => Transfer::Rsync,
                },
            },
            group: Vec::new(),
        },
        LOCAL_MAX_FRAME,
    )?;
    let mut freeze_at = None;
    loop {
        let ev: LocalResponse = frame::read_frame(&mut s, LOCAL_MAX_FRAME).context("waiting for the move")?;
        let t = now_us();
        match ev {
            // Each step is sent when it ends; the freeze step starts the freeze.
            LocalResponse::MoveStep(step) if step.name == "freeze" => freeze_at = Some(t - step.micros),
            LocalResponse::MoveStep(_) | LocalResponse::MoveProgress { .. } => {}
            LocalResponse::MoveDone(report) => {
                if !report.committed {
                    bail!("move of {vpid} to {dest} rolled back: {:?}", report.reason);
                }
                let freeze_at = freeze_at.context("the move reported no freeze step")?;
                return Ok((*report, sent, freeze_at));
            }
            LocalResponse::Error { message } => bail!("move of {vpid} to {dest} refused: {message}"),
            other => bail!("unexpected answer to the move: {other:?}"),
        }
    }
}

fn step_ms(r: &MoveReport, name: &str) -> f64 {
    r.steps.iter().filter(|s| s.name == name).map(|s| ms(s.micros)).sum()
}

struct SizeResult {
    mb: f64,
    how: How,
    moves: Vec<MoveSample>,
    quiet_rtt_us: f64,
    quiet_max_gap_ms: f64,
    base_dump_ms: f64,
    base_restore_ms: f64,
    base_pages_mb: f64,
}

/// The server's current real pid, from the agents' registry, if it is our program.
fn server_pid(cluster: &Cluster, vpid: i64) -> Option<i32> {
    let row = cluster.ps(0).into_iter().find(|r| r["vpid"] == vpid)?;
    let pid = row["pid"].as_i64()? as i32;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    String::from_utf8_lossy(&cmdline).contains("move_server").then_some(pid)
}

fn measure_moves(
    cluster: &Cluster,
    port: u16,
    mb: f64,
    moves: usize,
    how: How,
    compress: bool,
) -> anyhow::Result<SizeResult> {
    let mb_arg = format!("{mb}");
    let log = std::fs::File::create(cluster.path(&format!("server-{port}.err")))?;
    let mut cmd = cluster.preloaded(0, c_program("move_server"));
    cmd.args([port.to_string(), mb_arg.clone()]).env("DVK_ENDPOINT", "kv").stdin(Stdio::null()).stderr(log);
    let mut server = Proc::spawn(no_inherited_fds(&mut cmd), "move_server");
    server.lines.wait_for("listening", Duration::from_secs(60));
    let vpid = cluster.wait_registered(0, server.pid())["vpid"].as_i64().context("no vPID")?;
    let result = (|| {
        wait_connectable(cluster, 2, "dc0", "kv.dc0.dvk", port, Duration::from_secs(20));
        let mut cmd = cluster.preloaded(2, c_program("move_bench_client"));
        cmd.args(["kv.dc0.dvk".to_string(), port.to_string(), mb_arg.clone()]).stdin(Stdio::null());
        if how == How::RsyncDelta {
            // Even blocks only: the writer changes odd ones.
            cmd.args(["42", "2"]);
        }
        let mut client = Proc::spawn(no_inherited_fds(&mut cmd), "move_bench_client");
        client.lines.wait_for("connected", Duration::from_secs(20));
        let mut log = ClientLog::default();
        // Without a move: 0.5 s of requests, after 0.1 s of warm-up.
        let t0 = now_us() + 100_000;
        pump(&mut client, &mut log, t0 + 500_000, Duration::from_secs(10))?;
        let quiet: Vec<_> = log.alive.iter().filter(|a| a.0 >= t0).copied().collect();
        let (first, last) = (quiet.first().context("no reply")?, quiet.last().unwrap());
        let quiet_rtt_us = (last.0 - first.0) as f64 / (last.1 - first.1).max(1) as f64;
        let quiet_max_gap_ms = quiet.iter().skip(1).map(|a| ms(a.2)).fold(0.0, f64::max);

        let mut samples = Vec::new();
        let mut at = 0;
        if how == How::RsyncDelta {
            // Not measured: after it, both nodes hold an image of the server.
            move_once(cluster, 0, vpid, 1, how, compress)?;
            at = 1;
        }
        for i in 0..moves {
            let to = 1 - at;
            match how {
                How::RsyncFull => forget_kept_images(cluster),
                How::RsyncDelta => write_blocks(cluster, port, mb, DELTA_WRITES, (i, moves))?,
                How::Stop | How::Pre => {}
            }
            let (report, sent, freeze_at) = move_once(cluster, at, vpid, to, how, compress)?;
            let done = now_us();
            at = to;
            pump(&mut client, &mut log, done + SETTLE_US, Duration::from_secs(20))
                .with_context(|| format!("after move {} of the {mb} MB server", i + 1))?;
            let (a, b) = log
                .gaps
                .iter()
                .filter(|(a, b)| *b >= sent && *a <= done + SETTLE_US)
                .max_by_key(|(a, b)| b - a)
                .copied()
                .unwrap_or((sent, sent));
            let steps: Vec<String> = report
                .steps
                .iter()
                .map(|s| {
                    format!(
                        "{} {:.1}{}",
                        s.name,
                        ms(s.micros),
                        if s.name == "dump" || s.name == "transfer" || s.name == "pre-copy" {
                            format!(" [{}]", s.detail)
                        } else {
                            String::new()
                        }
                    )
                })
                .collect();
            eprintln!(
                "  move {}: {} -> {}: frozen {:.1} ms, client gap {:.1} ms; {}",
                i + 1,
                report.from,
                report.to,
                ms(report.frozen_micros),
                ms(b - a),
                steps.join(", ")
            );
            samples.push(MoveSample {
                frozen_ms: ms(report.frozen_micros),
                total_ms: ms(report.total_micros),
                downtime_ms: ms(b - a),
                freeze_to_reply_ms: (b as f64 - freeze_at as f64) / 1000.0,
                report,
            });
        }
        Ok(SizeResult {
            mb,
            how,
            moves: samples,
            quiet_rtt_us,
            quiet_max_gap_ms,
            base_dump_ms: 0.0,
            base_restore_ms: 0.0,
            base_pages_mb: 0.0,
        })
    })();
    // The server runs where the last move left it (restored by that node's agent): kill it by pid.
    if let Some(pid) = server_pid(cluster, vpid) {
        if pid as u32 != server.pid() {
            // SAFETY: kill takes two integers; the pid is our moved server (checked above).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    result
}

/// The rsync full row: no node holds an older image of the server (`<image_dir>/kept`).
fn forget_kept_images(cluster: &Cluster) {
    for n in &cluster.nodes {
        let _ = std::fs::remove_dir_all(cluster.path(&format!("{}/images/kept", n.name)));
    }
}

/// The rsync delta row: before move `i` of `n`, a writer on node3 makes `count` writes of 4 KB
/// into the server's data (`move_client`, which checks each and reads its blocks back), then
/// quits. Each writer has a slice of odd blocks of its own (b % 2n == 2i + 1; move_client's
/// model knows only its own writes); the reader reads even blocks.
fn write_blocks(cluster: &Cluster, port: u16, mb: f64, count: usize, (i, n): (usize, usize)) -> anyhow::Result<()> {
    let mut cmd = cluster.preloaded(2, c_program("move_client"));
    // move_client takes whole MB: it writes within the first floor(mb) MB.
    let whole_mb = (mb.floor() as u64).max(1);
    let slice = format!("{}/{}", 2 * i + 1, 2 * n);
    cmd.args(["kv.dc0.dvk", &port.to_string(), &whole_mb.to_string(), &count.to_string(), "1", "0", "42", &slice])
        .stdin(Stdio::null());
    let mut w = Proc::spawn(no_inherited_fds(&mut cmd), "move_client (writer)");
    let status = w.wait(Duration::from_secs(120), "move_client (writer)");
    // Its last lines may still be in the reader.
    while !w.lines.seen.iter().any(|l| l.starts_with("DONE")) && w.lines.try_next(Duration::from_secs(2)).is_some() {}
    anyhow::ensure!(
        status.success() && w.lines.seen.iter().any(|l| l.starts_with("DONE")),
        "the writer failed ({status}): {:?}",
        last_lines(&w)
    );
    Ok(())
}

/// Local dump + restore of the same program holding the same data (no socket, stdio on
/// /dev/null), into the cluster's directory (the file system of the agents' image dirs).
/// Returns (dump ms without the kill that follows it, restore ms, pages MB).
fn baseline(dir: &Path, mb: f64) -> anyhow::Result<(f64, f64, f64)> {
    let mut cmd = Command::new(c_program("move_server"));
    cmd.args(["0".to_string(), format!("{mb}")]).env_remove("LD_PRELOAD").stdin(Stdio::null()).stderr(Stdio::null());
    let mut p = Proc::spawn(no_inherited_fds(&mut cmd), "move_server (baseline)");
    p.lines.wait_for("ready", Duration::from_secs(60));
    let pid = p.pid() as i32;
    // Ready to dump once stdio points at /dev/null and it sleeps.
    let t = Instant::now();
    while std::fs::read_link(format!("/proc/{pid}/fd/1")).map(|l| l != Path::new("/dev/null")).unwrap_or(true)
        || !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") S ")
    {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("the baseline process did not get ready");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let img = dir.join(format!("baseline-{pid}"));
    let _ = std::fs::remove_dir_all(&img);
    let d = ck::dump(pid, &img, AfterDump::Kill).context("baseline dump")?;
    drop(p); // already reaped by the dump
    let r = ck::restore(&img, &RestoreOptions::default()).context("baseline restore");
    let _ = std::fs::remove_dir_all(&img);
    let r = r?;
    let rss_kib = dvk_tests::net::vm_rss_kib(r.pid as u32).unwrap_or(0);
    // SAFETY: the restored copy is our child (the engine forked it); kill and reap it by pid.
    unsafe {
        libc::kill(r.pid, libc::SIGKILL);
        let mut st = 0;
        libc::waitpid(r.pid, &mut st, 0);
    }
    if (rss_kib as f64) < mb * 1024.0 * 0.9 {
        bail!("the restored baseline process holds {rss_kib} KiB, not {mb} MB");
    }
    let kill: Duration = d.phases.iter().filter(|(n, _)| *n == "kill").map(|(_, d)| *d).sum();
    Ok(((d.total - kill).as_secs_f64() * 1e3, r.total.as_secs_f64() * 1e3, d.pages_bytes as f64 / 1e6))
}

/// One line about CRIU: measured when it is installed and `criu check` passes.
fn criu_line(dir: &Path, mb: f64) -> String {
    let Ok(v) = Command::new("criu").arg("--version").output() else {
        return "criu: not installed here, not measured (CRIU 3.17 does not run on this kernel)".into();
    };
    let version = String::from_utf8_lossy(&v.stdout).lines().next().unwrap_or("").trim().to_owned();
    let check = Command::new("criu").arg("check").output();
    if !check.as_ref().is_ok_and(|o| o.status.success()) {
        let why = check.map(|o| String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("").to_owned());
        return format!("criu: {version} installed but `criu check` fails ({}), not measured", why.unwrap_or_default());
    }
    match criu_run(dir, mb) {
        Ok((d, r)) => {
            format!("criu ({version}), same process, {mb} MB: dump {d:.1} ms + restore {r:.1} ms = {:.1} ms", d + r)
        }
        Err(e) => format!("criu: {version} failed on the baseline process: {e:#}"),
    }
}

fn criu_run(dir: &Path, mb: f64) -> anyhow::Result<(f64, f64)> {
    let mut cmd = Command::new(c_program("move_server"));
    cmd.args(["0".to_string(), format!("{mb}")]).env_remove("LD_PRELOAD").stdin(Stdio::null()).stderr(Stdio::null());
    let mut p = Proc::spawn(no_inherited_fds(&mut cmd), "move_server (criu)");
    p.lines.wait_for("ready", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(50));
    let img = dir.join("criu");
    std::fs::create_dir_all(&img)?;
    let pid = p.pid().to_string();
    let t = Instant::now();
    let out = Command::new("criu").args(["dump", "-t", &pid, "-D"]).arg(&img).args(["--shell-job"]).output()?;
    let dump = t.elapsed().as_secs_f64() * 1e3;
    drop(p);
    if !out.status.success() {
        bail!("criu dump: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""));
    }
    let pidfile = img.join("restored.pid");
    let t = Instant::now();
    let out = Command::new("criu")
        .args(["restore", "-d", "--shell-job", "-D"])
        .arg(&img)
        .arg("--pidfile")
        .arg(&pidfile)
        .output()?;
    let restore = t.elapsed().as_secs_f64() * 1e3;
    if let Some(rpid) = std::fs::read_to_string(&pidfile).ok().and_then(|s| s.trim().parse::<i32>().ok()) {
        // SAFETY: the restored copy of our own process, by pid.
        unsafe { libc::kill(rpid, libc::SIGKILL) };
    }
    let _ = std::fs::remove_dir_all(&img);
    if !out.status.success() {
        bail!("criu restore: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""));
    }
    Ok((dump, restore))
}

/// After a failure: the agents' logs are copied out of the cluster's directory (deleted when
/// the cluster stops) and their last lines printed.
pub(crate) fn keep_logs(cluster: &Cluster) {
    let dir = std::env::temp_dir().join(format!("dvk-bench-move-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    for (i, node) in cluster.nodes.iter().enumerate() {
        let log = cluster.log_of(i);
        let _ = std::fs::write(dir.join(format!("{}.log", node.name)), &log);
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        eprintln!("---- last lines of {} agent log ----", node.name);
        for l in tail.into_iter().rev() {
            eprintln!("{l}");
        }
    }
    eprintln!("dvk-bench move: the agents' logs are in {}", dir.display());
}

pub(crate) fn machine() -> String {
    let nproc = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let uname = Command::new("uname").arg("-r").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "{nproc} cores, Linux {}, load average {}",
        uname.unwrap_or_default(),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    )
}

pub fn run(args: &MoveBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(dvk_tests::is_root(), "dvk-bench move needs root (the agents and the engine ptrace)");
    anyhow::ensure!(args.moves > 0 && args.baseline_runs > 0 && !args.sizes.is_empty(), "nothing to measure");
    let cluster = Cluster::start(3, Mode::Loopback);
    let mut results = Vec::new();
    for (i, &mb) in args.sizes.iter().enumerate() {
        eprintln!("dvk-bench move: {mb} MB: local dump + restore x {}", args.baseline_runs);
        let mut dumps = Vec::new();
        let mut restores = Vec::new();
        let mut pages = 0.0;
        for _ in 0..args.baseline_runs {
            let (d, r, p) = baseline(cluster.dir.path(), mb)?;
            dumps.push(d);
            restores.push(r);
            pages = p;
        }
        let modes: Vec<How> = How::ALL
            .into_iter()
            .filter(|h| match h {
                How::Stop => true,
                How::Pre => args.precopy,
                How::RsyncFull | How::RsyncDelta => args.rsync,
            })
            .collect();
        for (j, &how) in modes.iter().enumerate() {
            eprintln!("dvk-bench move: {mb} MB: {} moves, {}", args.moves, how.long());
            let port = 7100 + (4 * i + j) as u16;
            let mut r = match measure_moves(&cluster, port, mb, args.moves, how, args.compress) {
                Ok(r) => r,
                Err(e) => {
                    keep_logs(&cluster);
                    return Err(e);
                }
            };
            r.base_dump_ms = median(dumps.clone());
            r.base_restore_ms = median(restores.clone());
            r.base_pages_mb = pages;
            results.push(r);
        }
    }
    let criu = criu_line(cluster.dir.path(), args.sizes[0]);
    drop(cluster);

    println!(
        "move: server with N MB of written data on node1 under the shim, client on node3 (5-byte requests, 4 KB \
         replies, one outstanding), 3-node loopback cluster; {} moves per size (node1 -> node2 -> node1 ...), \
         median / max; {}",
        args.moves,
        machine()
    );
    println!(
        "{:>7} {:>5} {:>8} {:>8} | {:>13} | {:>13} | {:>13} | {:>13} | {:>10} {:>10} {:>9} | {:>7}",
        "size MB",
        "mode",
        "image MB",
        "sent MB",
        "frozen ms",
        "downtime ms",
        "frz->reply ms",
        "total ms",
        "local dump",
        "+ restore",
        "= sum ms",
        "frz/sum"
    );
    for r in &results {
        let col = |f: &dyn Fn(&MoveSample) -> f64| {
            let v: Vec<f64> = r.moves.iter().map(f).collect();
            format!("{:>6.1} {:>6.1}", median(v.clone()), max(&v))
        };
        let image = median(r.moves.iter().map(|m| m.report.image_bytes as f64 / 1e6).collect());
        let sent = median(r.moves.iter().map(|m| m.report.sent_bytes as f64 / 1e6).collect());
        let frozen = median(r.moves.iter().map(|m| m.frozen_ms).collect());
        let sum = r.base_dump_ms + r.base_restore_ms;
        println!(
            "{:>7.1} {:>5} {:>8.1} {:>8.1} | {} | {} | {} | {} | {:>10.1} {:>10.1} {:>9.1} | {:>6.2}x",
            r.mb,
            mode(r),
            image,
            sent,
            col(&|m| m.frozen_ms),
            col(&|m| m.downtime_ms),
            col(&|m| m.freeze_to_reply_ms),
            col(&|m| m.total_ms),
            r.base_dump_ms,
            r.base_restore_ms,
            sum,
            frozen / sum
        );
    }
    println!("per step, median ms (frozen from freeze to commit; preflight and start run before the freeze):");
    print!("{:>7} {:>5} ", "size MB", "mode");
    for s in STEPS {
        print!("{s:>10}");
    }
    println!();
    for r in &results {
        print!("{:>7.1} {:>5} ", r.mb, mode(r));
        for s in STEPS {
            print!("{:>10.1}", median(r.moves.iter().map(|m| step_ms(&m.report, s)).collect()));
        }
        println!();
    }
    println!("client without a move (0.5 s before the first move of each size):");
    for r in &results {
        println!(
            "  {:>6.1} MB {:>5}: {:.0} us per request (mean), longest gap between replies {:.2} ms",
            r.mb,
            mode(r),
            r.quiet_rtt_us,
            r.quiet_max_gap_ms
        );
    }
    for (mb, target) in TARGETS {
        for r in results.iter().filter(|r| r.mb == mb) {
            let down = median(r.moves.iter().map(|m| m.downtime_ms).collect());
            let worst = max(&r.moves.iter().map(|m| m.downtime_ms).collect::<Vec<_>>());
            let total = median(r.moves.iter().map(|m| m.total_ms).collect());
            let met = |ok: bool| if ok { "met" } else { "NOT met" };
            println!(
                "target {mb} MB <= {target} ms end to end ({}): client-seen downtime median {down:.1} ms -> {} (max \
             {worst:.1}); whole move median {total:.1} ms -> {}",
                mode(r),
                met(down <= target),
                met(total <= target)
            );
        }
    }
    for r in results.iter().filter(|r| r.how == How::RsyncDelta) {
        let ratio = median(r.moves.iter().map(|m| m.report.sent_bytes as f64 / m.report.image_bytes as f64).collect());
        println!(
            "rsync delta, {:.1} MB ({} KB written since the server left the node): sent {:.1} % of the image (median) \
             -> target <= 10 % {}",
            r.mb,
            DELTA_WRITES * 4,
            ratio * 100.0,
            if ratio <= 0.10 { "met" } else { "NOT met" }
        );
    }
    println!("{criu}");
    if let Some(dir) = &args.plots {
        plots(dir, &results)?;
        println!("charts: {}", dir.display());
    }
    Ok(())
}

/// The DVS paper's figures 6 and 7 (total move time and transfer time against size) and the
/// downtime the client saw, one line per mode, medians; the local dump + restore for scale.
fn plots(dir: &Path, results: &[SizeResult]) -> anyhow::Result<()> {
    use crate::plot::{log_x_chart, Series};
    std::fs::create_dir_all(dir)?;
    let by_mode = |f: &dyn Fn(&SizeResult) -> f64| -> Vec<Series> {
        How::ALL
            .iter()
            .map(|&how| Series {
                name: how.long().into(),
                points: results.iter().filter(|r| r.how == how).map(|r| (r.mb, f(r))).collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect()
    };
    let med = |r: &SizeResult, f: &dyn Fn(&MoveSample) -> f64| median(r.moves.iter().map(f).collect());
    let baseline = Series {
        name: "local dump + restore".into(),
        points: results
            .iter()
            .filter(|r| r.how == How::Stop)
            .map(|r| (r.mb, r.base_dump_ms + r.base_restore_ms))
            .collect(),
    };
    let mut down = by_mode(&|r| med(r, &|m| m.downtime_ms));
    down.push(baseline);
    log_x_chart(&dir.join("move-downtime.svg"), "Downtime seen by the client", "server size (MB)", "ms", &down)?;
    let total = by_mode(&|r| med(r, &|m| m.total_ms));
    log_x_chart(&dir.join("move-total.svg"), "Total move time (paper fig. 6)", "server size (MB)", "ms", &total)?;
    let copy =
        |m: &MoveSample| step_ms(&m.report, "pre-copy") + step_ms(&m.report, "dump") + step_ms(&m.report, "transfer");
    let transfer = by_mode(&|r| med(r, &copy));
    log_x_chart(
        &dir.join("move-transfer.svg"),
        "Transfer time: pre-copy + dump + transfer steps (paper fig. 7)",
        "server size (MB)",
        "ms",
        &transfer,
    )?;
    Ok(())
}
