//! dvk-bench: every benchmark compares against a baseline measured in the same
//! run and prints a table with the ratio. Results go to docs/PERFORMANCE.md.

mod checkpoint_bench;
mod compress_bench;
mod getpid_bench;
mod group_bench;
mod move_bench;
mod net_bench;
mod plot;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "dvk benchmarks (build the workspace with --release first)")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// getpid() under the shim vs the real syscall.
    Getpid {
        /// Calls per run.
        #[arg(long, default_value_t = 20_000_000)]
        calls: u64,
        /// Runs of each case (the median is reported).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
    },
    /// fork()+waitpid() under the shim (the child gets a vPID) vs bare.
    Fork {
        /// fork/wait pairs per run.
        #[arg(long, default_value_t = 2000)]
        forks: u64,
        /// Runs of each case (the median is reported).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
    },
    /// Dump/restore throughput of the checkpoint engine at 2.5 MB, 256 MB and 1 GB (root).
    Checkpoint(checkpoint_bench::CheckpointBenchArgs),
    /// Request/reply RTT and bulk throughput through shim + agents (same node, cross
    /// node) vs direct TCP on loopback.
    Net {
        /// Request/reply rounds per run.
        #[arg(long, default_value_t = 10_000)]
        rounds: usize,
        /// Megabytes per bulk transfer.
        #[arg(long, default_value_t = 1000)]
        bulk_mb: usize,
    },
    /// A live move (`migrate-cli move`) as its client sees it, at 2.5, 64 and 256 MB, vs a local
    /// dump + restore of the same process (root).
    Move(move_bench::MoveBenchArgs),
    /// N servers moved as one group (`move --group`) vs one after the other: frozen time, the
    /// clients' longest gap, the whole round (root).
    Group(group_bench::GroupBenchArgs),
    /// LZ4 (what `move --compress` uses) on the page data of a random-data server and of a
    /// python heap: ratio, MB/s, and the link speed below which compression pays (root).
    Compress {
        /// Megabytes of random data in the server.
        #[arg(long, default_value_t = 256.0)]
        mb: f64,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.bench {
        Bench::Getpid { calls, repeats } => getpid_bench::run(calls, repeats),
        Bench::Fork { forks, repeats } => getpid_bench::run_fork(forks, repeats),
        Bench::Net { rounds, bulk_mb } => net_bench::run(rounds, bulk_mb),
        Bench::Checkpoint(args) => checkpoint_bench::run(&args),
        Bench::Move(args) => move_bench::run(&args),
        Bench::Group(args) => group_bench::run(&args),
        Bench::Compress { mb } => compress_bench::run(mb),
    };
    if let Err(e) = result {
        eprintln!("dvk-bench: {e:#}");
        std::process::exit(1);
    }
}
