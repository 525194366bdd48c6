//! `migrate-cli dump` and `migrate-cli restore`: thin wrappers over the checkpoint engine that
//! print per-phase timings and sizes (human table, or one JSON object with `--json`).

use std::path::PathBuf;
use std::time::Duration;

use dvk_checkpoint::{AfterDump, DumpOptions, RestoreOptions};

/// `println!`/`eprintln!` that ignore a closed pipe (`migrate-cli dump … | head -1`): the
/// outcome is already decided when the report is printed.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}
macro_rules! err {
    ($($t:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

#[derive(clap::Args, Debug, Clone)]
pub struct DumpArgs {
    /// Process to dump: a real pid, or a vPID of a process on this node (asks the agent). A
    /// process with children is dumped with its whole tree (every descendant, zombies too).
    #[arg(value_name = "PID|VPID")]
    pub pid: String,
    /// Image directory (created 0700). It must be yours (and so must its parents, or root's):
    /// a directory another user could have prepared is refused.
    #[arg(long)]
    pub images: PathBuf,
    /// Leave the process stopped (SIGSTOP; SIGCONT resumes it) instead of killing it.
    #[arg(long, conflicts_with = "leave_running")]
    pub leave_stopped: bool,
    /// Leave the process running (a snapshot) instead of killing it.
    #[arg(long)]
    pub leave_running: bool,
    /// Copy memory while the process runs first, in rounds (each only the pages written since
    /// the previous one), so that it is frozen only for what changed last; the image then
    /// has a precopy.img beside pages.img. Needs Linux ≥ 6.7 (userfaultfd async
    /// write-protect and PAGEMAP_SCAN).
    #[arg(long)]
    pub precopy: bool,
    /// The process is a job of an interactive shell: its stdio on its controlling terminal is
    /// recorded as the job's terminal, to be replaced by the restorer's (`restore
    /// --shell-job`). Without it a terminal is refused.
    #[arg(long)]
    pub shell_job: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RestoreArgs {
    /// Image directory written by `dump`.
    #[arg(long)]
    pub images: PathBuf,
    /// Leave the restored process stopped (SIGCONT resumes it).
    #[arg(long)]
    pub stopped: bool,
    /// Do not try to keep the image's pid.
    #[arg(long)]
    pub new_pid: bool,
    /// For an image dumped with `--shell-job`: the restored process gets this terminal (our
    /// stdin) in place of its old one, runs as our job (our session and process group, in the
    /// foreground), and we wait for it and exit with its status — so an interactive program
    /// survives a dump and a restore in a shell.
    #[arg(long, conflicts_with = "stopped")]
    pub shell_job: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// "4242 4243 4250".
fn pids(v: &[i32]) -> String {
    v.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" ")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Phases in their order: `[{"phase": "freeze", "ms": 0.2}, …]`.
fn phases_json(p: &[(&'static str, Duration)]) -> serde_json::Value {
    p.iter().map(|(n, d)| serde_json::json!({"phase": n, "ms": ms(*d)})).collect()
}

fn print_phases(p: &[(&'static str, Duration)]) {
    for (n, d) in p {
        out!("  {n:<8} {:>9.3} ms", ms(*d));
    }
}

pub fn run_dump(
    args: &DumpArgs,
    target: &dyn Fn() -> anyhow::Result<crate::agent_client::Target>,
) -> anyhow::Result<()> {
    let pid = crate::check::resolve_pid_arg(&args.pid, target)?.pid;
    let after = if args.leave_running {
        AfterDump::LeaveRunning
    } else if args.leave_stopped {
        AfterDump::LeaveStopped
    } else {
        AfterDump::Kill
    };
    // Ctrl-C, kill or a hang-up must not kill us half-way with the process frozen or patched:
    // they are held off, the dump stops at its next step and puts the process back, and
    // only then does the signal take effect (see stop_signals).
    let deferred = crate::stop_signals::Deferred::block()?;
    let opts = DumpOptions {
        interrupted: Some(crate::stop_signals::pending),
        shell_job: args.shell_job,
        tree: true,
        ..Default::default()
    };
    let dumped = if args.precopy {
        let policy = dvk_checkpoint::precopy::Policy::default();
        dvk_checkpoint::dump_precopy(pid, &args.images, after, &opts, &policy)
    } else {
        dvk_checkpoint::dump_with(pid, &args.images, after, &opts)
    };
    let r = match dumped {
        Ok(r) => r,
        Err(e) => {
            err!("migrate-cli: {e}");
            drop(deferred); // a pending stop signal ends us here, as it would have at once
            std::process::exit(1);
        }
    };
    drop(deferred);
    let rounds: Vec<serde_json::Value> = r
        .precopy
        .iter()
        .map(|x| serde_json::json!({"bytes": x.bytes, "registered": x.registered, "ms": ms(x.took)}))
        .collect();
    if args.json {
        let v = serde_json::json!({
            "pid": r.pid,
            "images": args.images,
            "phases": phases_json(&r.phases),
            "frozen_ms": ms(r.frozen),
            "total_ms": ms(r.total),
            "pages_bytes": r.pages_bytes,
            "manifest_bytes": r.manifest_bytes,
            "vmas": r.vmas,
            "fds": r.fds,
            "precopy_rounds": rounds,
            "precopied_bytes": r.precopied_bytes,
            "tree": r.tree,
        });
        out!("{v}");
    } else {
        out!(
            "dumped pid {} to {}: {:.1} MiB of pages, {} B manifest, {} mappings, {} fds",
            r.pid,
            args.images.display(),
            r.pages_bytes as f64 / (1 << 20) as f64,
            r.manifest_bytes,
            r.vmas,
            r.fds
        );
        if !r.tree.is_empty() {
            out!("  process tree of {}: {}", r.tree.len(), pids(&r.tree));
        }
        for (i, x) in r.precopy.iter().enumerate() {
            out!("  pre-copy round {}: {:.1} MiB in {:.1} ms", i + 1, x.bytes as f64 / (1 << 20) as f64, ms(x.took));
        }
        if !r.precopy.is_empty() {
            out!("  {:.1} MiB left in precopy.img (not written since)", r.precopied_bytes as f64 / (1 << 20) as f64);
        }
        print_phases(&r.phases);
        out!("  frozen   {:>9.3} ms\n  total    {:>9.3} ms", ms(r.frozen), ms(r.total));
    }
    Ok(())
}

pub fn run_restore(args: &RestoreArgs) -> anyhow::Result<()> {
    if args.shell_job && !crate::stop_signals::stdin_is_terminal() {
        anyhow::bail!("--shell-job: stdin is not a terminal (the restored job gets this terminal)");
    }
    let opts = RestoreOptions {
        stopped: args.stopped,
        new_pid: args.new_pid,
        shell_job: args.shell_job.then_some(0),
        ..Default::default()
    };
    let r = dvk_checkpoint::restore(&args.images, &opts)?;
    if args.shell_job {
        for n in &r.notes {
            err!("note: {n}");
        }
        err!("restored pid {} as a shell job; waiting for it to end", r.pid);
        std::process::exit(crate::stop_signals::wait_job(r.pid));
    }
    if args.json {
        let v = serde_json::json!({
            "pid": r.pid,
            "same_pid": r.same_pid,
            "phases": phases_json(&r.phases),
            "total_ms": ms(r.total),
            "pages_bytes": r.pages_bytes,
            "notes": r.notes,
            "tree": r.tree,
        });
        out!("{v}");
    } else {
        out!("{}", r.pid);
        for n in &r.notes {
            err!("note: {n}");
        }
        err!(
            "restored pid {}{} from {}: {:.1} MiB of pages",
            r.pid,
            if r.same_pid { " (same pid)" } else { " (new pid)" },
            args.images.display(),
            r.pages_bytes as f64 / (1 << 20) as f64
        );
        if !r.tree.is_empty() {
            err!("  process tree of {}: {}", r.tree.len(), pids(&r.tree));
        }
        for (n, d) in &r.phases {
            err!("  {n:<8} {:>9.3} ms", ms(*d));
        }
        err!("  total    {:>9.3} ms", ms(r.total));
    }
    Ok(())
}
