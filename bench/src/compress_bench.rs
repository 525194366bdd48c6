//! Is `move --compress` worth it here? LZ4 (the agent's `lz4_flex` blocks of 1 MiB, as a move
//! sends them) on the page data of two real processes: the paper's server (pseudo-random data)
//! and a python3 interpreter holding a dict of 1 M entries (a heap of objects, strings and
//! pointers: compressible). Each is dumped locally (left running) and its pages.img compressed
//! and decompressed on one core. A link that carries pages faster than the compressor's output
//! rate gains nothing: the table gives the link speed below which compression pays.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dvk_checkpoint::{self as ck, AfterDump};
use dvk_tests::moving::no_inherited_fds;
use dvk_tests::net::Proc;
use dvk_tests::programs::c_program;

const CHUNK: usize = 1 << 20;

struct Sample {
    what: &'static str,
    bytes: usize,
    packed: usize,
    compress: Duration,
    decompress: Duration,
}

fn measure(what: &'static str, pages: &[u8]) -> anyhow::Result<Sample> {
    // Best of 3 (the machine may be busy with something else for one of them).
    let mut best: Option<Sample> = None;
    for _ in 0..3 {
        let t = Instant::now();
        let blocks: Vec<Vec<u8>> = pages.chunks(CHUNK).map(lz4_flex::block::compress).collect();
        let compress = t.elapsed();
        let packed = blocks.iter().zip(pages.chunks(CHUNK)).map(|(b, raw)| b.len().min(raw.len())).sum();
        let t = Instant::now();
        for (b, raw) in blocks.iter().zip(pages.chunks(CHUNK)) {
            let out = lz4_flex::block::decompress(b, raw.len()).context("decompress")?;
            if out != raw {
                bail!("{what}: LZ4 round trip differs");
            }
        }
        let decompress = t.elapsed();
        let s = Sample { what, bytes: pages.len(), packed, compress, decompress };
        if best.as_ref().is_none_or(|b| s.compress < b.compress) {
            best = Some(s);
        }
    }
    best.context("no run")
}

/// Dumps `pid` (left running) into `dir` and returns its page data.
fn pages_of(pid: i32, dir: &Path) -> anyhow::Result<Vec<u8>> {
    let _ = std::fs::remove_dir_all(dir);
    ck::dump(pid, dir, AfterDump::LeaveRunning).with_context(|| format!("dump of pid {pid}"))?;
    let pages = std::fs::read(dir.join(ck::image::PAGES))?;
    let _ = std::fs::remove_dir_all(dir);
    Ok(pages)
}

pub fn run(mb: f64) -> anyhow::Result<()> {
    anyhow::ensure!(dvk_tests::is_root(), "dvk-bench compress needs root (it dumps processes)");
    let tmp = tempfile::tempdir()?;
    let mut samples = Vec::new();

    let mut cmd = Command::new(c_program("move_server"));
    cmd.args(["0".to_string(), format!("{mb}")]).env_remove("LD_PRELOAD").stdin(Stdio::null()).stderr(Stdio::null());
    let mut server = Proc::spawn(no_inherited_fds(&mut cmd), "move_server");
    server.lines.wait_for("ready", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(100));
    samples.push(measure("move_server (random data)", &pages_of(server.pid() as i32, &tmp.path().join("s"))?)?);
    drop(server);

    // stdout goes to /dev/null once "ready" is out: a pipe to us could not be dumped.
    let script = "import os, time\n\
        d = {i: ('user-%d' % i, i * 3, [i, str(i)]) for i in range(1000000)}\n\
        print('ready', flush=True)\n\
        os.dup2(os.open('/dev/null', os.O_WRONLY), 1)\n\
        time.sleep(60)\n";
    let mut cmd = Command::new("python3");
    cmd.args(["-c", script]).env_remove("LD_PRELOAD").stdin(Stdio::null()).stderr(Stdio::null());
    let mut py = Proc::spawn(no_inherited_fds(&mut cmd), "python3");
    py.lines.wait_for("ready", Duration::from_secs(60));
    let t = Instant::now();
    while std::fs::read_link(format!("/proc/{}/fd/1", py.pid())).map(|l| l != Path::new("/dev/null")).unwrap_or(true) {
        anyhow::ensure!(t.elapsed() < Duration::from_secs(10), "python3 did not let go of its stdout");
        std::thread::sleep(Duration::from_millis(5));
    }
    samples.push(measure("python3, dict of 1 M entries", &pages_of(py.pid() as i32, &tmp.path().join("p"))?)?);
    drop(py);

    println!("LZ4 (lz4_flex block, 1 MiB chunks, one core) on the page data of two processes; best of 3");
    println!(
        "{:<30} {:>9} {:>8} {:>13} {:>15} {:>20}",
        "process", "pages MB", "ratio", "compress MB/s", "decompress MB/s", "pays below (MB/s)"
    );
    for s in &samples {
        let mb = s.bytes as f64 / 1e6;
        let ratio = s.bytes as f64 / s.packed.max(1) as f64;
        let c = mb / s.compress.as_secs_f64();
        let d = mb / s.decompress.as_secs_f64();
        // Sending n bytes takes n/L raw, or n/C + n/(r·L) compressed (one core, not overlapped):
        // compression pays while L < C·(1 − 1/r).
        let break_even = c * (1.0 - 1.0 / ratio);
        println!("{:<30} {:>9.1} {:>7.2}x {:>13.0} {:>15.0} {:>20.0}", s.what, mb, ratio, c, d, break_even);
    }
    println!(
        "compare with the link: a stop-and-copy move's pages cross the agent link at the rate of its dump \
         step (dvk-bench move; docs/PERFORMANCE.md)"
    );
    Ok(())
}
