//! Typed errors. Each names the process state it is about, so a binary can print it as one line.
//! The underlying OS error is part of the message (fields are named `err`, not `source`, so that
//! `anyhow`'s `{:#}` does not print it twice).

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- the process cannot be dumped (nothing was changed in it)
    #[error("process {pid} does not exist or cannot be read: {err}")]
    NoProcess { pid: i32, err: io::Error },
    /// fds 0–2 are also named as the user knows them: "fd 1 (stdout, pipe:[…]) cannot be moved: …".
    #[error("fd {fd} ({}{what}) cannot be moved: {why}", stdio_prefix(*.fd))]
    UnsupportedFd { fd: i32, what: String, why: String },
    #[error("mapping {range} {what} cannot be moved: {why}")]
    UnsupportedMapping { range: String, what: String, why: String },
    #[error("process {pid}: {what} cannot be moved")]
    Unsupported { pid: i32, what: String },

    /// About one process of a process tree (`who`: "child 4243 (worker) of 4242").
    #[error("{who}: {err}")]
    InTree { who: String, err: Box<Error> },

    /// The caller asked the dump to stop (`DumpOptions::interrupted`); the process was put
    /// back as it was and runs on.
    #[error("process {pid}: dump interrupted; the process runs on as it was")]
    Interrupted { pid: i32 },

    // ---- ptrace / injection
    #[error("{op} on process {pid} failed: {err}")]
    Ptrace { op: &'static str, pid: i32, err: io::Error },
    #[error("process {pid}: unexpected stop while {during} (wait status {status:#x})")]
    UnexpectedStop { pid: i32, during: String, status: i32 },
    #[error("process {pid}: injected {call} failed: errno {errno} ({msg})")]
    Injected { pid: i32, call: String, errno: i32, msg: String },

    // ---- the image
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: io::Error },
    /// An image directory or file that another user could have prepared: refused, never used.
    #[error("{path}: {why}")]
    Unsafe { path: PathBuf, why: String },
    #[error("{path}: not a dvk checkpoint image (bad magic)")]
    BadMagic { path: PathBuf },
    #[error("{path}: image version {found} is not supported (this build reads version {supported})")]
    BadVersion { path: PathBuf, found: u32, supported: u32 },
    #[error("{path}: image is for architecture {found}, this machine is {here}")]
    BadArch { path: PathBuf, found: u32, here: u32 },
    #[error("{path}: image is truncated ({what})")]
    Truncated { path: PathBuf, what: String },
    #[error("{path}: checksum mismatch in {what} (image corrupted)")]
    Checksum { path: PathBuf, what: String },
    #[error("{path}: cannot decode manifest: {msg}")]
    Decode { path: PathBuf, msg: String },
    #[error("{what} differs on this machine ({detail})")]
    Mismatch { what: String, detail: String },
    #[error("file {path} changed since the dump: {detail}")]
    FileChanged { path: String, detail: String },
    #[error("restore: {0}")]
    Restore(String),
}

pub type Result<T> = std::result::Result<T, Error>;

fn stdio_prefix(fd: i32) -> &'static str {
    match fd {
        0 => "stdin, ",
        1 => "stdout, ",
        2 => "stderr, ",
        _ => "",
    }
}

impl Error {
    /// The fd a refusal is about, if it is about one.
    pub fn fd(&self) -> Option<i32> {
        match self {
            Error::UnsupportedFd { fd, .. } => Some(*fd),
            _ => None,
        }
    }
}

pub(crate) fn io_at(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
    let path = path.into();
    move |err| Error::Io { path, err }
}

pub(crate) fn pt(op: &'static str, pid: i32) -> impl FnOnce(io::Error) -> Error {
    move |err| Error::Ptrace { op, pid, err }
}
