//! migrate-cli: look at a dvk cluster and move processes around it.

mod agent_client;
mod checkpoint_cmd;
mod status;

use agent_client::Target;
use clap::{Parser, Subcommand};
use dvk_config::DEFAULT_CONFIG_PATH;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(version, about = "Inspect a dvk cluster and migrate processes between its nodes")]
struct Cli {
    /// Cluster configuration file.
    #[arg(long, global = true, env = "DVK_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Ask the agent of this node (needed when the config has several nodes).
    #[arg(long, global = true, env = "DVK_NODE")]
    node: Option<String>,
    /// Talk to the agent at this local socket instead (overrides --config/--node).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List every registered process of the cluster.
    Ps {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// List every endpoint (listening service) of the cluster with its virtual address.
    Endpoints {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Dump a process (any single- or multi-threaded process of this machine) into an image directory.
    Dump(checkpoint_cmd::DumpArgs),
    /// Restore a process from an image directory; prints its pid.
    Restore(checkpoint_cmd::RestoreArgs),
    /// List the cluster's nodes with their link state.
    Nodes {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("migrate-cli: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let target = || Target::resolve(&cli.config, cli.node.as_deref(), cli.socket.clone());
    match &cli.command {
        Command::Ps { json } => status::ps(&target()?, *json),
        Command::Nodes { json } => status::nodes(&target()?, *json),
        Command::Endpoints { json } => status::endpoints(&target()?, *json),
        Command::Dump(args) => checkpoint_cmd::run_dump(args),
        Command::Restore(args) => checkpoint_cmd::run_restore(args),
    }
}
