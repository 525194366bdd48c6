//! getpid() and fork() under the shim vs bare, same program, same run.

use dvk_tests::programs::c_program;
use dvk_tests::{Cluster, Mode};
use std::process::Command;

/// Runs a benchmark program; it prints the time per operation.
fn per_op(cmd: &mut Command) -> anyhow::Result<f64> {
    let out = cmd.output()?;
    anyhow::ensure!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    Ok(text.trim().parse()?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Median per-operation time of `program ARG` bare and under the shim, runs interleaved
/// so that drift in machine load hits both alike.
fn compare(program: &str, arg: u64, repeats: usize) -> anyhow::Result<(f64, f64)> {
    let program = c_program(program);
    let cluster = Cluster::start(1, Mode::Loopback);
    let mut bare = Vec::new();
    let mut shim = Vec::new();
    for _ in 0..repeats {
        bare.push(per_op(Command::new(&program).arg(arg.to_string()))?);
        shim.push(per_op(cluster.preloaded(0, &program).arg(arg.to_string()))?);
    }
    Ok((median(bare), median(shim)))
}

pub fn run(calls: u64, repeats: usize) -> anyhow::Result<()> {
    let (bare, shim) = compare("getpid_bench", calls, repeats)?;
    println!("getpid(): {calls} calls x {repeats} runs, median ns/call");
    println!("{:<28} {:>10} {:>8}", "case", "ns/call", "ratio");
    println!("{:<28} {:>10.2} {:>8}", "bare (real syscall)", bare, "1.00x");
    println!("{:<28} {:>10.2} {:>7.3}x", "under libdvkshim.so (vPID)", shim, shim / bare);
    println!("target: <= 1.0x bare  ->  {}", if shim <= bare { "met" } else { "NOT met" });
    Ok(())
}

/// fork()+waitpid() under the shim (a vPID reserved per fork, the child registers) vs bare.
pub fn run_fork(forks: u64, repeats: usize) -> anyhow::Result<()> {
    let (bare, shim) = compare("fork_bench", forks, repeats)?;
    println!("fork()+waitpid(): {forks} pairs x {repeats} runs, median us/pair");
    println!("{:<28} {:>10} {:>8}", "case", "us/pair", "ratio");
    println!("{:<28} {:>10.1} {:>8}", "bare", bare, "1.00x");
    println!("{:<28} {:>10.1} {:>7.2}x", "under libdvkshim.so", shim, shim / bare);
    Ok(())
}
