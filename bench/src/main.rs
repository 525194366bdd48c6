//! Minimal wiring of the checkpoint benchmark; the full benchmark CLI on `main` replaces this.
mod checkpoint_bench;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "dvk-bench")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Dump/restore throughput of the checkpoint engine.
    Checkpoint(checkpoint_bench::CheckpointBenchArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Checkpoint(a) => checkpoint_bench::run(&a),
    }
}
