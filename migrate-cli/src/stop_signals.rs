//! Stop signals during a dump: Ctrl-C (SIGINT), `kill` (SIGTERM), a closed terminal (SIGHUP)
//! and SIGQUIT are blocked while a dump runs, so that the dumper never dies with the process
//! half-way through (frozen, or with an injected call in flight). The dump asks [`pending`]
//! between its steps and, when one arrived, puts the process back and stops; dropping the
//! [`Deferred`] guard then lets the signal take its usual effect on migrate-cli.

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
