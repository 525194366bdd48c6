//! Stop signals during a dump: Ctrl-C (SIGINT), `kill` (SIGTERM), a closed terminal (SIGHUP)
//! and SIGQUIT are blocked while a dump runs, so that the dumper never dies with the process
//! half-way through (frozen, or with an injected call in flight). The dump asks [`pending`]
//! between its steps and, when one arrived, puts the process back and stops; dropping the
//! [`Deferred`] guard then lets the signal take its usual effect on migrate-cli.
//!
//! And the other side of job control, for `restore --shell-job`: [`wait_job`] waits for the
//! restored job with Ctrl-C and Ctrl-\\ left to it.

use std::io;

const STOP_SIGNALS: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

fn stop_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// The stop signals blocked until dropped (migrate-cli is single-threaded, and the threads a
/// dump starts inherit the mask). Dropping restores the previous mask: a signal that arrived
/// meanwhile is delivered then.
pub struct Deferred {
    previous: libc::sigset_t,
}

impl Deferred {
    pub fn block() -> io::Result<Deferred> {
        let set = stop_set();
        // SAFETY: sigset_t is plain data; pthread_sigmask reads `set` and writes `previous`.
        let mut previous: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are valid for the call.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut previous) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(Deferred { previous })
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        // SAFETY: `previous` is the mask pthread_sigmask gave us; the old-set pointer may be null.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.previous, std::ptr::null_mut()) };
    }
}

/// Whether a stop signal is waiting (blocked) for this process.
pub fn pending() -> bool {
    // SAFETY: sigset_t is plain data; sigpending fills it; sigismember only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        if libc::sigpending(&mut set) != 0 {
            return false;
        }
        STOP_SIGNALS.iter().any(|s| libc::sigismember(&set, *s) == 1)
    }
}

/// Waits for the restored job (our child) to end, as a shell's job: Ctrl-C and Ctrl-\\ go to
/// it (the whole foreground group gets them; we ignore them meanwhile), Ctrl-Z stops us both.
/// Its exit status, or 128 + the signal that ended it.
pub fn wait_job(pid: i32) -> i32 {
    // SAFETY: setting two signals to SIG_IGN, and waitpid on our own child with a valid pointer.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
        let mut st = 0;
        loop {
            let r = libc::waitpid(pid, &mut st, 0);
            if r == pid {
                break;
            }
            if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return 1;
            }
        }
        if libc::WIFEXITED(st) {
            libc::WEXITSTATUS(st)
        } else {
            128 + libc::WTERMSIG(st)
        }
    }
}

/// Is our stdin a terminal (`restore --shell-job` hands it to the job)?
pub fn stdin_is_terminal() -> bool {
    // SAFETY: isatty only looks at fd 0.
    unsafe { libc::isatty(0) == 1 }
}
