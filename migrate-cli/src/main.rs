//! migrate-cli: look at a dvk cluster and move processes around it.

mod agent_client;
mod check;
mod checkpoint_cmd;
mod move_cmd;
mod status;
mod stop_signals;

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
    /// Dump a process (any single- or multi-threaded process of this machine, with its whole process
    /// tree when it has children) into an image directory.
    ///
    /// Ctrl-C, SIGTERM or SIGHUP during a dump stop it at its next step: the process is put back
    /// and runs on as it was (even a SIGKILLed dump leaves it so), then migrate-cli ends on that
    /// signal.
    Dump(checkpoint_cmd::DumpArgs),
    /// Move a process under the shim to another node while its clients stay connected:
    /// [pre-copy →] start → freeze → dump → transfer → restore → commit; on any failure it rolls
    /// back and keeps running where it was. Exit 0 only when it runs on the destination.
    ///
    /// A process with children moves with its whole tree. With --group, several processes of
    /// one node move as one: all are frozen, all are restored on NODE before any of them runs
    /// there, and a failure of any rolls all back.
    #[command(override_usage = "migrate-cli move [OPTIONS] <PROCESS> <NODE>\n       \
                                migrate-cli move [OPTIONS] --group <PROCESS>,<PROCESS>... <NODE>")]
    Move(move_cmd::MoveArgs),
    /// Show the stdout/stderr log a moved process writes when they could not follow it.
    Logs(move_cmd::LogsArgs),
    /// Restore a process (or a process tree) from an image directory; prints its pid (the root's).
    Restore(checkpoint_cmd::RestoreArgs),
    /// Check this machine (ptrace, pidfd, clone3, …) and, given a pid or vPID, list everything
    /// that keeps that process from moving (to NODE); nothing is frozen. Exit 1 if anything fails.
    Check(check::CheckArgs),
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
        Command::Dump(args) => checkpoint_cmd::run_dump(args, &target),
        Command::Check(args) => {
            if !check::run(args, &cli.config, &target)? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Restore(args) => checkpoint_cmd::run_restore(args),
        Command::Move(args) => {
            // Arguments first: a wrong command line is named before any config is read.
            move_cmd::what_moves(args)?;
            move_cmd::run_move(&target()?, args)
        }
        Command::Logs(args) => move_cmd::run_logs(&target()?, args),
    }
}
