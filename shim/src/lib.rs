//! libdvkshim.so — preloaded into a process (`LD_PRELOAD=libdvkshim.so prog`).
//!
//! At load time it registers the process with its node agent and learns its
//! vPID; from then on the hooks in [`hooks`] answer in vPIDs. A child made by
//! fork() registers itself and gets its own vPID. Without a reachable agent (or one
//! that does not answer within 1 s) the program runs unchanged after one warning on
//! stderr. A process restored on
//! another node (moved) follows its new agent through [`relink`].
//!
//! Environment: `DVK_AGENT_SOCK` (an absolute path; default `/run/dvk/agent.sock`), `DVK_DC`
//! (default `dc0`), `DVK_ENDPOINT` (default: the program name).
//!
//! Limits of any LD_PRELOAD shim apply (docs/ARCHITECTURE.md): static
//! binaries, raw syscalls and glibc-internal calls are not seen; the kernel
//! still reports real PIDs in /proc, si_pid and SO_PEERCRED.

mod children;
mod fdtable;
mod hooks;
mod identity;
mod link;
mod names;
mod raw;
mod real;
mod relink;
mod vsock;

/// Where the shim looks for its agent when DVK_AGENT_SOCK is not set (the
/// runtime dir of the packaged config and systemd unit).
const DEFAULT_AGENT_SOCK: &str = "/run/dvk/agent.sock";

#[ctor::ctor]
fn on_load() {
    // Nothing may unwind into the dynamic loader.
    let _ = std::panic::catch_unwind(|| raw::preserving_errno(init));
}

fn init() {
    let sock = std::env::var_os("DVK_AGENT_SOCK").unwrap_or_else(|| DEFAULT_AGENT_SOCK.into());
    let dc = std::env::var("DVK_DC").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "dc0".into());
    let endpoint = std::env::var("DVK_ENDPOINT").ok().filter(|s| !s.is_empty());
    if let Err(why) = link::configure(std::os::unix::ffi::OsStrExt::as_bytes(sock.as_os_str()), dc, endpoint) {
        warn_parts(&[b"dvk: ", why.as_bytes(), b"; running without virtual PIDs\n"]);
        return;
    }
    real::resolve_all();
    if !raw::at_fork_child(after_fork_in_child) {
        raw::warn(b"dvk: pthread_atfork failed; forked children keep real PIDs\n");
    }
    register_or_warn();
}

/// Registers and installs the identity, or warns once and leaves the program on real PIDs.
fn register_or_warn() {
    match link::register() {
        Ok(r) => identity::set(r.vpid.0, r.parent.map(|p| p.0), raw::getppid(), r.link_fd),
        Err(e) => {
            if link::config().is_none() {
                return;
            }
            let path = link::current_path();
            let mut reason = [0u8; 128];
            let reason: &[u8] = match e {
                link::RegisterError::Unreachable(libc::EAGAIN | libc::ETIMEDOUT) => b"it did not answer within 1 s",
                link::RegisterError::Unreachable(errno) => {
                    let n = raw::strerror_into(errno, &mut reason);
                    &reason[..n]
                }
                link::RegisterError::Refused => b"the agent refused the registration (see its log)",
            };
            warn_parts(&[
                b"dvk: no usable agent at ",
                dvk_protocol::relink::path_bytes(&path),
                b" (",
                reason,
                b"); running without virtual PIDs\n",
            ]);
        }
    }
}

/// Writes the parts as one line with one write(2), without allocating.
pub(crate) fn warn_parts(parts: &[&[u8]]) {
    let mut line = [0u8; 512];
    let mut len = 0;
    for part in parts {
        let take = part.len().min(line.len() - len);
        line[len..len + take].copy_from_slice(&part[..take]);
        len += take;
    }
    raw::warn(&line[..len]);
}

thread_local! {
    /// The vPID the forking thread reserved for the child it is forking (0: none). Written
    /// by the fork hook before the fork, read in the child, whose only thread is the copy of
    /// the forking one. Per thread: threads that fork at the same time each hand their own
    /// reservation to their own child. A const-initialised Cell without Drop: a plain TLS
    /// slot (no allocation, no destructor registration), usable in signal handlers.
    static RESERVED_FOR_CHILD: std::cell::Cell<i32> = const { std::cell::Cell::new(0) };
}

/// Sets this thread's reservation for the child it is about to fork; returns the previous
/// value (a fork in a signal handler that interrupted the fork hook puts it back after).
pub(crate) fn set_reserved_for_child(vpid: i32) -> i32 {
    RESERVED_FOR_CHILD.with(|r| r.replace(vpid))
}

/// In the child of fork(): drop the parent's identity, agent link and children, and
/// register anew under the vPID the parent reserved (without one: real PIDs).
/// A parent that runs without an agent has warned once already: its children stay quiet.
unsafe extern "C" fn after_fork_in_child() {
    let _ = std::panic::catch_unwind(|| {
        raw::preserving_errno(|| {
            let parent_vpid = identity::vpid();
            let parent_was_registered = parent_vpid != 0;
            let reserved = set_reserved_for_child(0);
            // Before the inherited link is dropped: a relink the parent had pending.
            relink::after_fork_child();
            if let Some(inherited) = identity::clear() {
                raw::close(inherited);
            }
            children::clear();
            if !parent_was_registered {
                return;
            }
            // No reservation (the agent did not answer the parent in time, or refused): the
            // parent's fork() returned our real PID, so we stay on it. Registering now would
            // give us a vPID our parent does not know, and make a stalled agent cost every
            // fork a second timeout.
            if reserved != 0 {
                if let Ok(link_fd) = link::register_forked(pidvirt::Vpid(reserved)) {
                    identity::set(reserved, Some(parent_vpid), raw::getppid(), link_fd);
                }
            }
        })
    });
}
