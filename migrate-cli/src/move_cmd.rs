//! `migrate-cli move` and `migrate-cli logs`.

use crate::agent_client::Target;
use anyhow::{anyhow, bail, Context};
use dvk_protocol::frame::{self, LOCAL_MAX_FRAME};
use dvk_protocol::local::{LocalRequest, LocalResponse, MoveOptions, MoveReport, Transfer};
use std::io::{IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct MoveArgs {
    /// PROCESS NODE: the process (its vPID, see `migrate-cli ps`, or its real pid on the node
    /// asked) and the node to move it to; a process with children moves with its whole tree.
    /// With --group: NODE only.
    #[arg(value_name = "ARGS", num_args = 1..=2, required = true)]
    pub args: Vec<String>,
    /// Move these processes (vPIDs or real pids, comma-separated; all on one node) together:
    /// every one is frozen, all are restored on NODE before any runs there, and a failure of
    /// any rolls all of them back. Streams between them stay streams between them, on NODE.
    /// --precopy and --compress apply to every member (--transfer rsync not yet). A member
    /// may not have children (a process with children, moved alone, moves with its whole
    /// tree).
    #[arg(long, value_delimiter = ',', value_name = "PROCESS,PROCESS...")]
    pub group: Vec<i32>,
    /// Copy memory in rounds while the process still runs and serves (each round only the
    /// pages written since the previous one), then freeze it only for what changed last: a
    /// shorter pause for processes with much memory. The destination then lets it run before
    /// the pre-copied pages are in it and copies them in behind it (they are already on that
    /// node). Needs Linux ≥ 6.7 on the source; where it cannot run, the move says why and
    /// copies everything while frozen. Default: on when the process holds at least 64 MiB of
    /// private memory (RssAnon), off below. Not for a process tree yet.
    #[arg(long, overrides_with = "no_precopy")]
    pub precopy: bool,
    /// Never pre-copy: freeze first, then copy everything (see --precopy).
    #[arg(long, overrides_with = "precopy")]
    pub no_precopy: bool,
    /// Compress page data on the link (LZ4). Pays on a slow link with compressible memory;
    /// on a fast one (and on random data) it costs more CPU time than it saves: see
    /// docs/PERFORMANCE.md. Off by default. Not for a process tree yet.
    #[arg(long)]
    pub compress: bool,
    /// How the image travels: `stream` (image frames on the agent link, into the
    /// destination's memory) or `rsync` (the dump is written to an image directory and rsync,
    /// tunnelled through the authenticated agent link, sends only what differs from an older
    /// image of this process the destination still holds; no pre-copy).
    #[arg(long, value_enum, default_value_t = TransferArg::Stream)]
    pub transfer: TransferArg,
    /// Print the report as JSON (steps, image size, frozen time, total).
    #[arg(long)]
    pub json: bool,
    /// Stop waiting for the report after this many seconds (the move goes on; see `ps`).
    #[arg(long, default_value_t = 600)]
    pub wait: u64,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransferArg {
    Stream,
    Rsync,
}

#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    /// vPID of a moved process whose stdout/stderr could not follow it.
    pub vpid: i32,
    /// Keep printing what it writes.
    #[arg(short, long)]
    pub follow: bool,
}

fn connect(target: &Target, timeout: Duration) -> anyhow::Result<UnixStream> {
    let s = UnixStream::connect(&target.socket).map_err(|e| {
        anyhow!("cannot reach {} at {}: {e} (is dvk-agent running?)", target.describe, target.socket.display())
    })?;
    s.set_read_timeout(Some(timeout))?;
    Ok(s)
}

/// The process asked for, the others of a group, and the node: from `move PROCESS NODE` or
/// `move --group P1,P2... NODE`.
pub fn what_moves(args: &MoveArgs) -> anyhow::Result<(i32, Vec<i32>, String)> {
    let process = |s: &str| -> anyhow::Result<i32> {
        s.parse().map_err(|_| anyhow!("`{s}` is not a process (a vPID or a pid: see `migrate-cli ps`)"))
    };
    match (&args.args[..], &args.group[..]) {
        ([p, node], []) => Ok((process(p)?, Vec::new(), node.clone())),
        ([node], [first, rest @ ..]) => {
            if rest.is_empty() {
                bail!("--group names one process; name two or more, or use `migrate-cli move {first} {node}`");
            }
            Ok((*first, rest.to_vec(), node.clone()))
        }
        ([_], []) => bail!("name the process and the node: `migrate-cli move PROCESS NODE`"),
        (_, _) => bail!("with --group, name only the node: `migrate-cli move --group P1,P2 NODE`"),
    }
}

/// Runs a move; Ok(()) only when the process (every one of a group) runs on the destination.
pub fn run_move(target: &Target, args: &MoveArgs) -> anyhow::Result<()> {
    let (process, group, dest) = what_moves(args)?;
    let mut s = connect(target, Duration::from_secs(args.wait))?;
    frame::write_frame(
        &mut s,
        &LocalRequest::Move {
            target: process,
            group,
            dest,
            options: MoveOptions {
                precopy: match (args.precopy, args.no_precopy) {
                    (true, _) => Some(true),
                    (_, true) => Some(false),
                    _ => None,
                },
                compress: args.compress,
                transfer: match args.transfer {
                    TransferArg::Stream => Transfer::Stream,
                    TransferArg::Rsync => Transfer::Rsync,
                },
            },
        },
        LOCAL_MAX_FRAME,
    )
    .with_context(|| format!("sending the move to {}", target.describe))?;
    let tty = std::io::stderr().is_terminal() && !args.json;
    let started = Instant::now();
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut out = std::io::stdout();
    loop {
        let event: LocalResponse = frame::read_frame(&mut s, LOCAL_MAX_FRAME)
            .with_context(|| format!("waiting for {} (the move goes on; see `migrate-cli ps`)", target.describe))?;
        match event {
            LocalResponse::MoveStep(step) => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
                if !args.json {
                    writeln!(out, "{:<10} {:>10.3} ms  {}", step.name, step.micros as f64 / 1000.0, step.detail)?;
                }
            }
            LocalResponse::MoveProgress { sent, total } => {
                if tty && bar.is_none() && started.elapsed() > Duration::from_secs(1) && sent < total {
                    let b = indicatif::ProgressBar::new(total);
                    b.set_style(
                        indicatif::ProgressStyle::with_template(
                            "transfer  {bar:40} {bytes}/{total_bytes} {bytes_per_sec}",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                    bar = Some(b);
                }
                if let Some(b) = &bar {
                    b.set_position(sent);
                }
            }
            LocalResponse::MoveDone(report) => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
                return finish(&report, args.json);
            }
            LocalResponse::Error { message } => bail!("{} refused: {message}", target.describe),
            other => bail!("unexpected answer from {}: {other:?}", target.describe),
        }
    }
}

fn finish(report: &MoveReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else if report.committed {
        println!(
            "moved vPID {} from {} (pid {}) to {} (pid {}): image {:.1} MB ({:.1} MB sent), frozen {:.1} ms, \
             total {:.1} ms",
            report.vpid,
            report.from,
            report.old_pid,
            report.to,
            report.new_pid,
            report.image_bytes as f64 / 1e6,
            report.sent_bytes as f64 / 1e6,
            report.frozen_micros as f64 / 1000.0,
            report.total_micros as f64 / 1000.0
        );
        for m in &report.group {
            println!(
                "moved vPID {} with it (pid {} on {}, pid {} on {})",
                m.vpid, m.old_pid, report.from, m.new_pid, report.to
            );
        }
        if let Some(log) = &report.log {
            println!("stdout/stderr could not follow; they go to {log} (`migrate-cli logs <vPID>`)");
        }
    }
    if !report.committed {
        let others: Vec<String> = report.group.iter().map(|m| m.vpid.to_string()).collect();
        let (what, runs) = if others.is_empty() {
            (format!("vPID {}", report.vpid), "it runs")
        } else {
            (format!("the group of vPIDs {}, {}", report.vpid, others.join(", ")), "they run")
        };
        bail!(
            "move of {what} to {} rolled back: {}; {runs} on {} as before",
            report.to,
            report.reason.as_deref().unwrap_or("unknown reason"),
            report.from
        );
    }
    Ok(())
}

pub fn run_logs(target: &Target, args: &LogsArgs) -> anyhow::Result<()> {
    let vpid = pidvirt::Vpid(args.vpid);
    if !pidvirt::Vpid::is_virtual(args.vpid) {
        bail!("{} is not a vPID (see `migrate-cli ps`)", args.vpid);
    }
    let mut offset = 0u64;
    let mut out = std::io::stdout();
    loop {
        match target.request(&LocalRequest::Logs { vpid, offset })? {
            LocalResponse::LogChunk { bytes, next, .. } => {
                out.write_all(&bytes)?;
                out.flush()?;
                let empty = bytes.is_empty();
                offset = next;
                if empty {
                    if !args.follow {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
            }
            other => bail!("unexpected answer from {}: {other:?}", target.describe),
        }
    }
}
