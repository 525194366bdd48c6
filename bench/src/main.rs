//! dvk-bench: every benchmark compares against a baseline measured in the same
//! run and prints a table with the ratio. Results go to docs/PERFORMANCE.md.

mod getpid_bench;

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
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.bench {
        Bench::Getpid { calls, repeats } => getpid_bench::run(calls, repeats),
    };
    if let Err(e) = result {
        eprintln!("dvk-bench: {e:#}");
        std::process::exit(1);
    }
}
