//! dvk's checkpoint engine: freeze, dump and restore a live Linux process (one or more threads) in user
//! space, with ptrace and /proc only (no CRIU, no DMTCP, no kernel module).
//!
//! Phases, each usable on its own:
//! - [`freeze::Frozen`]: `PTRACE_SEIZE` + `PTRACE_INTERRUPT`, thaw, kill;
//! - [`dump::write_image`] (collect + write, process stays frozen): registers and xstate ([`cpu`]), memory ([`memory`], [`vdso`],
//!   SysV segments, semaphore sets and message queues [`sysv`]), fds
//!   ([`files`]) and their locks ([`locks`]), signals ([`signals`]), process attributes ([`task`]);
//! - [`image`]: write and read (checked) images;
//! - [`rebuild`]: a new process from an image;
//! - [`tree`]: a process and all its descendants, dumped and restored together (what they share
//!   stays shared).
//!
//! One module per kind of process state, with its collect and its rebuild side by side. All
//! `unsafe` lives in [`sys`]. The library never prints or exits; errors name what they are about.
//! See docs/CHECKPOINT.md for the image format, the phases and the limits.

pub mod anonfds;
pub mod cpu;
pub mod dump;
pub mod error;
pub mod fanotify;
pub mod files;
pub mod freeze;
pub mod ghosts;
pub mod host;
pub mod image;
pub mod inject;
pub mod lazy;
pub mod locks;
pub mod memfd;
pub mod memory;
pub mod nsfds;
pub mod precopy;
pub mod proc;
pub mod rebuild;
pub mod signals;
pub mod stub;
pub mod sys;
pub mod sysv;
pub mod task;
pub mod threads;
pub mod timers;
pub mod tree;
pub mod ttys;
pub mod vdso;

pub use dump::{
    blockers, dump, dump_precopy, dump_with, preflight, write_image, AfterDump, DumpOptions, DumpReport, PrecopyRef,
};
pub use error::{Error, Result};
pub use files::{describe_fds, FdClass, FdDescription};
pub use freeze::Frozen;
pub use rebuild::{Held, RestoreOptions, RestoreReport};

/// Unit tests that fork, or that look at which processes hold an fd, take this lock: a child
/// forked by one test holds copies of every fd the others have open until it execs or exits.
#[cfg(test)]
pub(crate) static FORK_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Reads and checks the image in `dir`, then rebuilds the process from it (a whole process
/// tree when `dir` holds one, see [`tree`]).
pub fn restore(dir: &std::path::Path, opts: &RestoreOptions) -> Result<RestoreReport> {
    if tree::is_tree(dir) {
        return tree::restore(dir, opts);
    }
    let t = std::time::Instant::now();
    let img = image::read(dir)?;
    let read = t.elapsed();
    let mut rep = rebuild::restore(&img, opts)?;
    rep.phases.insert(0, ("read", read));
    rep.total += read;
    Ok(rep)
}

/// [`restore_held`] with the page data already in memory (`pages`, e.g. received over the
/// network into [`sys::MappedFile::anonymous`]) instead of in `dir/pages.img`.
/// `precopy` is the pre-copy store if the move pre-copied (else an empty mapping).
pub fn restore_held_with_pages(
    dir: &std::path::Path,
    pages: sys::MappedFile,
    precopy: sys::MappedFile,
    opts: &RestoreOptions,
) -> Result<(RestoreReport, Held)> {
    let t = std::time::Instant::now();
    let img = image::read_with_pages(dir, pages, precopy)?;
    let read = t.elapsed();
    let (mut rep, held) = rebuild::restore_held(&img, opts)?;
    rep.phases.insert(0, ("read", read));
    rep.total += read;
    Ok((rep, held))
}

/// [`restore`], leaving the process complete but held in a ptrace stop until
/// [`Held::resume`] (a move's commit) or [`Held::kill`]/drop (its rollback).
pub fn restore_held(dir: &std::path::Path, opts: &RestoreOptions) -> Result<(RestoreReport, Held)> {
    let t = std::time::Instant::now();
    let img = image::read(dir)?;
    let read = t.elapsed();
    let (mut rep, held) = rebuild::restore_held(&img, opts)?;
    rep.phases.insert(0, ("read", read));
    rep.total += read;
    Ok((rep, held))
}
