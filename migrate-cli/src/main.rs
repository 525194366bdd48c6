//! Minimal wiring of the checkpoint commands; the full CLI on `main` replaces this file.
mod checkpoint_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "migrate-cli", about = "dvk command line")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Dump a process into an image directory.
    Dump(checkpoint_cmd::DumpArgs),
    /// Restore a process from an image directory; prints its pid.
    Restore(checkpoint_cmd::RestoreArgs),
}

fn main() {
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::Dump(a) => checkpoint_cmd::run_dump(a),
        Cmd::Restore(a) => checkpoint_cmd::run_restore(a),
    };
    if let Err(e) = r {
        eprintln!("migrate-cli: {e:#}");
        std::process::exit(1);
    }
}
