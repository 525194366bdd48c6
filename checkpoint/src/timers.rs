//! POSIX timers (`timer_create`): id, clock, how each notifies (SIGEV_SIGNAL, SIGEV_NONE,
//! SIGEV_THREAD_ID — glibc's SIGEV_THREAD is a SIGEV_THREAD_ID timer aimed at its helper
//! thread), the signal and its value, the thread aimed at, the time left and the interval.
//!
//! Dump: /proc/PID/timers gives every timer's id, signal, `sigev_value`, notification and clock;
//! the time left and the interval come from `timer_gettime` injected into the frozen process,
//! the overrun count of the last expiry from `timer_getoverrun`.
//!
//! Restore (once every thread exists, so that a SIGEV_THREAD_ID timer finds its thread): each
//! timer is created again with its id — with `prctl(PR_TIMER_CREATE_RESTORE_IDS)` (Linux ≥
//! 6.17) `timer_create` takes the id it is given; without it, ids are handed out one after the
//! other from 0, so stand-in timers are created up to the id and deleted after (test hook:
//! `DVK_TEST_TIMER_STANDINS` forces this path) — then armed with the time that was left
//! (relative) and its interval.
//!
//! Not carried, refused at dump naming the timer: a non-zero overrun count of the last expiry
//! (the kernel has no way to set it), clocks of a thread's or another process's CPU time.
//! A timer's signal pending at the dump is re-queued as a pending signal (see `signals`) with
//! the siginfo it had; overruns counted while it was pending are not carried.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::inject::{u64_at, Remote};
use crate::proc::proc_path;
use crate::sys::Pid;

const SIGEV_SIGNAL: i32 = 0;
const SIGEV_NONE: i32 = 1;
const SIGEV_THREAD: i32 = 2;
const SIGEV_THREAD_ID: i32 = 4;
const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
/// The highest id the restore reaches without PR_TIMER_CREATE_RESTORE_IDS (stand-ins).
const MAX_ID_BY_STANDINS: i32 = 1 << 14;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PosixTimer {
    pub id: i32,
    pub clock: i32,
    /// SIGEV_SIGNAL, SIGEV_NONE or SIGEV_THREAD_ID (with the thread in `tid`).
    pub notify: i32,
    pub signo: i32,
    /// `sigev_value`.
    pub value: u64,
    pub tid: Pid,
    pub interval_ns: u64,
    /// Time left until the next expiry (0: disarmed).
    pub left_ns: u64,
}

/// The timers as /proc/PID/timers lists them (time left and interval not filled in).
pub fn read(pid: Pid) -> Result<Vec<PosixTimer>> {
    let text = match std::fs::read_to_string(proc_path(pid, "timers")) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(Error::NoProcess { pid, err }),
    };
    parse(&text).map_err(|what| Error::Unsupported { pid, what })
}

fn parse(text: &str) -> std::result::Result<Vec<PosixTimer>, String> {
    let mut out: Vec<PosixTimer> = Vec::new();
    for l in text.lines() {
        let (k, v) = l.split_once(": ").ok_or_else(|| format!("/proc/PID/timers line {l:?}"))?;
        let bad = || format!("/proc/PID/timers line {l:?}");
        if k == "ID" {
            out.push(PosixTimer { id: v.trim().parse().map_err(|_| bad())?, ..Default::default() });
            continue;
        }
        let t = out.last_mut().ok_or_else(bad)?;
        match k {
            "signal" => {
                let (s, p) = v.split_once('/').ok_or_else(bad)?;
                t.signo = s.parse().map_err(|_| bad())?;
                t.value = u64::from_str_radix(p.trim(), 16).map_err(|_| bad())?;
            }
            "notify" => {
                // "signal/pid.42", "none/pid.42", "signal/tid.43"
                let (how, who) = v.split_once('/').ok_or_else(bad)?;
                let base = match how {
                    "signal" => SIGEV_SIGNAL,
                    "none" => SIGEV_NONE,
                    "thread" => SIGEV_THREAD,
                    _ => return Err(bad()),
                };
                let (kind, n) = who.split_once('.').ok_or_else(bad)?;
                t.notify = if kind == "tid" { base | SIGEV_THREAD_ID } else { base };
                t.tid = n.parse().map_err(|_| bad())?;
            }
            "ClockID" => t.clock = v.trim().parse().map_err(|_| bad())?,
            _ => {}
        }
    }
    out.sort_by_key(|t| t.id);
    Ok(out)
}

/// What cannot be carried, from /proc only: timers on a thread's or another process's CPU
/// clock, SIGEV_THREAD_ID timers aimed at a thread that has exited.
pub fn blockers(pid: Pid) -> Result<Vec<Error>> {
    Ok(read(pid)?
        .into_iter()
        .filter_map(|t| {
            if t.notify & SIGEV_THREAD_ID != 0 && (t.tid <= 0 || !proc_path(pid, &format!("task/{}", t.tid)).exists()) {
                return Some(Error::Unsupported {
                    pid,
                    what: format!(
                        "POSIX timer {} (timer_create) aimed at a thread that has exited (SIGEV_THREAD_ID)",
                        t.id
                    ),
                });
            }
            let why = match t.clock {
                0 | 1 | 2 | 7 | 8 | 9 | 11 => return None,
                3 => "the CPU-time clock of one thread (CLOCK_THREAD_CPUTIME_ID)".to_string(),
                c if c < 0 => "the CPU-time clock of another process or thread (clock_getcpuclockid)".to_string(),
                c => format!("clock {c}"),
            };
            Some(Error::Unsupported { pid, what: format!("POSIX timer {} (timer_create) on {why}", t.id) })
        })
        .collect())
}

/// Every timer with its time left and interval, from the frozen process (injected calls).
pub fn collect(r: &Remote) -> Result<Vec<PosixTimer>> {
    let mut timers = read(r.pid)?;
    for t in &mut timers {
        r.call(&format!("timer_gettime({})", t.id), libc::SYS_timer_gettime, &[t.id as u64, r.scratch])?;
        let b = r.get(0, 32)?;
        t.interval_ns = u64_at(&b, 0) * 1_000_000_000 + u64_at(&b, 8);
        t.left_ns = u64_at(&b, 16) * 1_000_000_000 + u64_at(&b, 24);
        let overrun = r.call(&format!("timer_getoverrun({})", t.id), libc::SYS_timer_getoverrun, &[t.id as u64])?;
        if overrun != 0 {
            return Err(Error::Unsupported {
                pid: r.pid,
                what: format!(
                    "POSIX timer {} (timer_create) whose last expiry counted {overrun} overrun(s): the count \
                     timer_getoverrun reports cannot be set again",
                    t.id
                ),
            });
        }
    }
    Ok(timers)
}

fn create(r: &Remote, t: &PosixTimer, tid: Pid, id_in: i32) -> Result<(i64, i32)> {
    // struct sigevent (64 bytes): sigev_value, sigev_signo, sigev_notify, sigev_tid.
    let mut ev = vec![0u8; 64];
    ev[0..8].copy_from_slice(&t.value.to_le_bytes());
    ev[8..12].copy_from_slice(&t.signo.to_le_bytes());
    ev[12..16].copy_from_slice(&t.notify.to_le_bytes());
    ev[16..20].copy_from_slice(&tid.to_le_bytes());
    ev.extend_from_slice(&id_in.to_le_bytes());
    let a = r.put(0, &ev)?;
    let ret = r.raw(libc::SYS_timer_create, &[t.clock as u64, a, a + 64])?;
    let id = i32::from_le_bytes(r.get(64, 4)?.try_into().unwrap());
    Ok((ret, id))
}

/// Creates and arms every timer. `tid_of` maps a thread id of the image to the new process's.
pub fn restore(r: &Remote, timers: &[PosixTimer], tid_of: &dyn Fn(Pid) -> Pid) -> Result<()> {
    if timers.is_empty() {
        return Ok(());
    }
    // (Test hook: `DVK_TEST_TIMER_STANDINS` in the restorer's environment takes the stand-in
    // path, which kernels before 6.17 need, on this one too.)
    let by_id = std::env::var_os("DVK_TEST_TIMER_STANDINS").is_none()
        && r.raw(libc::SYS_prctl, &[PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0])? == 0;
    let mut standins = Vec::new();
    let mut last = -1;
    for t in timers {
        let tid = if t.notify & SIGEV_THREAD_ID != 0 { tid_of(t.tid) } else { 0 };
        let what = format!("timer_create (POSIX timer {})", t.id);
        let fail = |ret: i64| Error::Injected {
            pid: r.pid,
            call: what.clone(),
            errno: -ret as i32,
            msg: crate::inject::errno_name(-ret as i32),
        };
        if by_id {
            let (ret, id) = create(r, t, tid, t.id)?;
            if ret != 0 {
                return Err(fail(ret));
            }
            if id != t.id {
                return Err(Error::Restore(format!("POSIX timer {} came back as {id}", t.id)));
            }
        } else {
            if t.id > MAX_ID_BY_STANDINS {
                return Err(Error::Restore(format!(
                    "POSIX timer {}: this kernel cannot create a timer with a given id (PR_TIMER_CREATE_RESTORE_IDS, \
                     Linux 6.17) and the id is above {MAX_ID_BY_STANDINS}",
                    t.id
                )));
            }
            // Ids are handed out one after the other from 0 in the new process (the stub had none).
            let none = PosixTimer { notify: SIGEV_NONE, clock: libc::CLOCK_MONOTONIC, ..Default::default() };
            while last + 1 < t.id {
                let (ret, id) = create(r, &none, 0, 0)?;
                if ret != 0 {
                    return Err(fail(ret));
                }
                standins.push(id);
                last = id;
            }
            let (ret, id) = create(r, t, tid, 0)?;
            if ret != 0 {
                return Err(fail(ret));
            }
            if id != t.id {
                return Err(Error::Restore(format!("POSIX timer {} came back as {id}", t.id)));
            }
            last = id;
        }
        if t.left_ns != 0 || t.interval_ns != 0 {
            // A periodic timer whose expiry is due shows 0 left: it expires at once, then runs on.
            let left = t.left_ns.max(1);
            let mut b = Vec::with_capacity(32);
            for v in [
                t.interval_ns / 1_000_000_000,
                t.interval_ns % 1_000_000_000,
                left / 1_000_000_000,
                left % 1_000_000_000,
            ] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            let a = r.put(0, &b)?;
            r.call(&format!("timer_settime({})", t.id), libc::SYS_timer_settime, &[t.id as u64, 0, a, 0])?;
        }
    }
    for id in standins {
        r.call("timer_delete (stand-in)", libc::SYS_timer_delete, &[id as u64])?;
    }
    if by_id {
        r.call("prctl(PR_TIMER_CREATE_RESTORE_IDS, OFF)", libc::SYS_prctl, &[PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_timers() {
        let t = parse(
            "ID: 2\nsignal: 0/0000000000000000\nnotify: none/pid.5237\nClockID: 7\nID: 1\nsignal: \
             34/0000000000000000\nnotify: signal/tid.5238\nClockID: 0\nID: 0\nsignal: 12/0000000000001234\nnotify: \
             signal/pid.5237\nClockID: 1\n",
        )
        .unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(
            t[0],
            PosixTimer {
                id: 0,
                clock: 1,
                notify: SIGEV_SIGNAL,
                signo: 12,
                value: 0x1234,
                tid: 5237,
                ..Default::default()
            }
        );
        assert_eq!((t[1].notify, t[1].signo, t[1].tid), (SIGEV_SIGNAL | SIGEV_THREAD_ID, 34, 5238));
        assert_eq!((t[2].notify, t[2].clock), (SIGEV_NONE, 7));
        assert!(parse("signal: 1/0\n").is_err());
        assert!(parse("").unwrap().is_empty());
    }
}
