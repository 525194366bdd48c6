//! Pseudo-terminal pairs held inside the process: a `/dev/ptmx` master and its `/dev/pts/N`
//! slave ([`FileKind::PtyMaster`], [`FileKind::PtySlave`]).
//!
//! Dump: the pair is found by the master's `tty-index` (fdinfo) and the slave's number; both
//! ends must be in the process and nowhere else (else refused, naming who holds the other
//! end), and the slave must not be the process's controlling terminal. While the process is
//! frozen ([`capture`]), through `pidfd_getfd` copies of both ends: the slave's settings
//! (`TCGETS2`: flags, line discipline, control characters, speeds; a master has none of its
//! own — termios calls on it act on its slave), the window size, packet
//! mode (`TIOCGPKT`), the slave lock (`TIOCGPTLCK`), exclusive mode (`TIOCGEXCL`), and the
//! unread bytes in both directions. A tty has no peek: the bytes are read (the slave's input
//! line by line when it is canonical, so each line keeps its end; then the unfinished line
//! with canonical mode off for that one read) and at once written back through the other
//! end, with input and output processing switched off around the write so they go in as they
//! came out (a byte a canonical reader would act on, typed after VLNEXT, after VLNEXT again;
//! see [`plan`]). The frozen process finds its queues as they were.
//!
//! Restore: a new pair (`/dev/ptmx`, `TIOCSPTLCK 0`, `TIOCGPTN`, `/dev/pts/M` — the slave's
//! number may differ), settings and window size set, the unread bytes written back the same
//! way, then packet mode, exclusive mode and the lock.
//!
//! Waiting for the line discipline: a write on one end is processed on the other by a kernel
//! worker, with the reader's settings of that moment. Where the write-back needs other
//! settings than the reader's own, they are put back only once the worker is seen to be done:
//! for a non-canonical reader when `TIOCINQ` counts every byte; for a canonical one (whose
//! `TIOCINQ` counts only whole lines) by the echo of each byte, turned on for the write and
//! read back from the writer's (then empty) queue.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::files::{FileKind, FilesState};
use crate::inject::Remote;
use crate::proc::{field, proc_path};
use crate::sys::{self, Pid};

/// A terminal's settings (struct termios2).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Termios {
    pub iflag: u32,
    pub oflag: u32,
    pub cflag: u32,
    pub lflag: u32,
    pub line: u8,
    pub cc: [u8; 19],
    pub ispeed: u32,
    pub ospeed: u32,
}

impl Termios {
    fn of(t: &libc::termios2) -> Termios {
        Termios {
            iflag: t.c_iflag,
            oflag: t.c_oflag,
            cflag: t.c_cflag,
            lflag: t.c_lflag,
            line: t.c_line,
            cc: t.c_cc,
            ispeed: t.c_ispeed,
            ospeed: t.c_ospeed,
        }
    }
    fn raw(&self) -> libc::termios2 {
        libc::termios2 {
            c_iflag: self.iflag,
            c_oflag: self.oflag,
            c_cflag: self.cflag,
            c_lflag: self.lflag,
            c_line: self.line,
            c_cc: self.cc,
            c_ispeed: self.ispeed,
            c_ospeed: self.ospeed,
        }
    }
    fn canonical(&self) -> bool {
        self.lflag & libc::ICANON != 0
    }
    /// A control character, None when disabled (0).
    fn cc(&self, i: usize) -> Option<u8> {
        Some(self.cc[i]).filter(|&c| c != 0)
    }
}

/// Unread bytes queued for one end. For a canonical reader, `lines` are its complete lines as
/// each read returns one (a line that does not end in `\n`, VEOL or VEOL2 was ended by VEOF,
/// which is not stored) and `rest` the unfinished line; otherwise everything is in `rest`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Queue {
    pub lines: Vec<Vec<u8>>,
    pub rest: Vec<u8>,
}

impl Queue {
    fn is_empty(&self) -> bool {
        self.lines.is_empty() && self.rest.is_empty()
    }
}

/// One pty pair's state (kept with its master).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pty {
    /// The slave's settings (a master's are the kernel's: termios calls on it act on the slave).
    pub slave: Termios,
    pub winsize: [u16; 4],
    pub packet: bool,
    pub locked: bool,
    pub exclusive: bool,
    /// Queued for the slave to read (written on the master).
    pub input: Queue,
    /// Queued for the master to read (written on the slave).
    pub output: Queue,
}

/// The largest unread input a line discipline holds (N_TTY_BUF_SIZE - 1).
const LDISC_MAX: usize = 4095;
/// How long the write-back waits for the kernel's line-discipline worker.
const WORKER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// `/dev/pts/N` → N.
fn pts_number(path: &str) -> Option<u32> {
    path.strip_prefix("/dev/pts/")?.parse().ok()
}

/// A pty end, or None for any other file: the master (`/dev/ptmx`, with its `tty-index`) or a
/// slave (`/dev/pts/N`, a Unix98 pty slave device, major 136–143).
pub fn describe(link: &str, info: &str, rdev: u64, flags: u32) -> Option<FileKind> {
    if link == "/dev/ptmx" || link == "/dev/pts/ptmx" {
        let index = field(info, "tty-index")?.parse().ok()?;
        return Some(FileKind::PtyMaster { index, flags, pty: Box::default() });
    }
    let index = pts_number(link)?;
    let major = libc::major(rdev);
    ((136..=143).contains(&major)).then_some(FileKind::PtySlave { index, flags })
}

/// Whether `link` (an fd's /proc link) is the slave of a pty whose master the process holds
/// too and that is not its controlling terminal: such a pair is carried by the engine, so a
/// mover must not treat the slave as a terminal left behind.
pub fn slave_of_own_pair(pid: Pid, link: &str) -> bool {
    let Some(index) = pts_number(link) else { return false };
    let ctty: u64 = crate::proc::stat_fields(pid).ok().and_then(|f| f.get(7)?.parse().ok()).unwrap_or(0);
    let is_ctty = std::fs::metadata(link).is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.rdev() == ctty
    });
    if is_ctty {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(proc_path(pid, "fd")) else { return false };
    fds.flatten().take(1 << 16).any(|e| {
        let master = std::fs::read_link(e.path())
            .is_ok_and(|l| l == std::path::Path::new("/dev/ptmx") || l == std::path::Path::new("/dev/pts/ptmx"));
        master && {
            let info = std::fs::read_to_string(proc_path(pid, &format!("fdinfo/{}", e.file_name().to_string_lossy())))
                .unwrap_or_default();
            field(&info, "tty-index").and_then(|v| v.parse::<u32>().ok()) == Some(index)
        }
    })
}

/// Why a pty slave whose master was closed (its /dev/pts node is gone: "/dev/pts/N (deleted)")
/// cannot be carried; None for any other file.
pub fn closed_master(link: &str) -> Option<String> {
    let index = pts_number(link.strip_suffix(" (deleted)")?)?;
    Some(format!(
        "the slave of pty {index}, whose master was closed (a pty is carried only with both ends in the process)"
    ))
}

/// The processes other than `pid` holding an end of pty `index`: the slave by its path, the
/// master by the `tty-index` of their ptmx fds.
fn other_holders(pid: Pid, index: u32) -> Vec<(Pid, String)> {
    let slave = format!("/dev/pts/{index}");
    let masters = ["/dev/ptmx".to_string(), "/dev/pts/ptmx".to_string()];
    let mut links = vec![slave.clone()];
    links.extend(masters.iter().cloned());
    let found = crate::files::holders_of(&links, pid);
    let mut out: Vec<(Pid, String)> = found.get(&slave).cloned().unwrap_or_default();
    for m in &masters {
        for (p, comm) in found.get(m).into_iter().flatten() {
            let Some(fds) = crate::files::fd_dir(*p) else { continue };
            let holds = fds.take(1 << 16).any(|e| {
                let info =
                    std::fs::read_to_string(proc_path(*p, &format!("fdinfo/{}", e.file_name().to_string_lossy())))
                        .unwrap_or_default();
                field(&info, "tty-index").and_then(|v| v.parse::<u32>().ok()) == Some(index)
                    && std::fs::read_link(e.path()).is_ok_and(|l| l.to_str() == Some(m.as_str()))
            });
            if holds && !out.iter().any(|(q, _)| q == p) {
                out.push((*p, comm.clone()));
            }
        }
    }
    out
}

/// Refuses every pty slave that is the process's controlling terminal, and every pty end whose
/// other end is not in the process or that another process holds too.
pub fn check_pairs(pid: Pid, st: &FilesState, errs: &mut Vec<Error>, all: bool) {
    let ctty: u64 = crate::proc::stat_fields(pid).ok().and_then(|f| f.get(7)?.parse().ok()).unwrap_or(0);
    let mut judged: Vec<u32> = Vec::new();
    for e in &st.fds {
        let (index, master, what) = match &st.files[e.file] {
            FileKind::PtyMaster { index, .. } => (*index, true, "/dev/ptmx".to_string()),
            FileKind::PtySlave { index, .. } => (*index, false, format!("/dev/pts/{index}")),
            _ => continue,
        };
        let other_inside = st.files.iter().any(|f| match f {
            FileKind::PtyMaster { index: i, .. } => !master && *i == index,
            FileKind::PtySlave { index: i, .. } => master && *i == index,
            _ => false,
        });
        let refuse = |why: String| Error::UnsupportedFd { fd: e.fd, what: what.clone(), why };
        let name = format!("pty {index} (/dev/pts/{index})");
        // Unix98 pty slaves: major 136 + N / 256, minor N % 256.
        let dev = libc::makedev(136 + index / 256, index % 256);
        let err = if !master && ctty != 0 && ctty == dev {
            Some(refuse(format!(
                "it is the terminal /dev/pts/{index}, the process's controlling terminal (a tty cannot follow the \
                 process; a shell job's terminal can be replaced by the restorer's: dump and restore with \
                 --shell-job)"
            )))
        } else if !other_inside {
            let holders = other_holders(pid, index);
            let (mine, other) = if master { ("master", "slave") } else { ("slave", "master") };
            let where_ = if holders.is_empty() {
                "closed or not visible".to_string()
            } else {
                format!("held by {}", crate::files::name_holders(&holders))
            };
            Some(refuse(format!(
                "the {mine} of {name} whose {other} is not in the process ({where_}; a pty is carried only with both \
                 ends inside)"
            )))
        } else if judged.contains(&index) {
            None
        } else {
            judged.push(index);
            let holders = other_holders(pid, index);
            if !holders.is_empty() {
                Some(refuse(format!(
                    "{name} is also open in {} (a pty is carried only when no other process holds it)",
                    crate::files::name_holders(&holders)
                )))
            } else {
                None
            }
        };
        if let Some(err) = err {
            errs.push(err);
            if !all {
                return;
            }
        }
    }
}

/// Reads the settings and unread data of every pty pair of the frozen process into its
/// [`FileKind::PtyMaster`], putting the data back at once (see the module comment).
pub fn capture(pid: Pid, st: &mut FilesState) -> Result<()> {
    if !st.files.iter().any(|f| matches!(f, FileKind::PtyMaster { .. })) {
        return Ok(());
    }
    let pidfd = sys::pidfd_open(pid).map_err(|err| Error::NoProcess { pid, err })?;
    for i in 0..st.files.len() {
        let FileKind::PtyMaster { index, .. } = st.files[i] else { continue };
        let mfd = st.fds.iter().find(|e| e.file == i).map(|e| e.fd);
        let sfd = st
            .fds
            .iter()
            .find(|e| matches!(st.files[e.file], FileKind::PtySlave { index: j, .. } if j == index))
            .map(|e| e.fd);
        let (Some(mfd), Some(sfd)) = (mfd, sfd) else { continue };
        let refuse = |why: String| Error::UnsupportedFd { fd: mfd, what: "/dev/ptmx".into(), why };
        let m = sys::pidfd_getfd(&pidfd, mfd).map_err(|e| refuse(format!("pidfd_getfd: {e}")))?;
        let s = sys::pidfd_getfd(&pidfd, sfd).map_err(|e| refuse(format!("pidfd_getfd: {e}")))?;
        let pty = read_pair(&m, &s).map_err(|why| refuse(format!("pty {index}: {why}")))?;
        if let FileKind::PtyMaster { pty: p, .. } = &mut st.files[i] {
            **p = pty;
        }
    }
    Ok(())
}

/// Settings, modes and unread data of a pair, through our copies of its two ends; the data is
/// written back before returning.
fn read_pair(m: &OwnedFd, s: &OwnedFd) -> std::result::Result<Pty, String> {
    let e = |what: &'static str| move |err: std::io::Error| format!("{what}: {err}");
    let stt = sys::tcgets2(s).map_err(e("TCGETS2 (slave)"))?;
    let mut pty = Pty {
        slave: Termios::of(&stt),
        winsize: sys::get_winsize(s).map_err(e("TIOCGWINSZ"))?,
        packet: sys::ioctl_get_int(m, libc::TIOCGPKT).map_err(e("TIOCGPKT"))? != 0,
        locked: sys::ioctl_get_int(m, libc::TIOCGPTLCK).map_err(e("TIOCGPTLCK"))? != 0,
        exclusive: sys::ioctl_get_int(s, libc::TIOCGEXCL).map_err(e("TIOCGEXCL"))? != 0,
        ..Pty::default()
    };
    // Both descriptions are the process's own: their flags are put back as they were.
    let (mfl, sfl) = (
        sys::fd_status_flags(m.as_raw_fd()).map_err(e("F_GETFL"))?,
        sys::fd_status_flags(s.as_raw_fd()).map_err(e("F_GETFL"))?,
    );
    let nb = libc::O_NONBLOCK as u32;
    sys::set_status_flags(m, mfl | nb).map_err(e("F_SETFL"))?;
    sys::set_status_flags(s, sfl | nb).map_err(e("F_SETFL"))?;
    let res = (|| {
        // Packet mode would put a status byte before the data the master reads.
        if pty.packet {
            sys::ioctl_set_int(m, libc::TIOCPKT, 0).map_err(e("TIOCPKT"))?;
        }
        pty.output = drain(m, &master_termios())?;
        pty.input = drain(s, &pty.slave)?;
        // Input first: its write-back may read echoes from the master's queue, still empty.
        // Both are attempted whatever the other did: the frozen process must get back all it can.
        let input = refill(s, m, &pty.input, &pty.slave, None);
        let output = refill(m, s, &pty.output, &master_termios(), Some(&pty.slave));
        input.and(output)?;
        if pty.packet {
            sys::ioctl_set_int(m, libc::TIOCPKT, 1).map_err(e("TIOCPKT"))?;
        }
        Ok(())
    })();
    let _ = sys::set_status_flags(m, mfl);
    let _ = sys::set_status_flags(s, sfl);
    res.map(|()| pty)
}

/// Reads everything queued for `fd` (non-blocking), line by line when its reader is canonical.
fn drain(fd: &OwnedFd, t: &Termios) -> std::result::Result<Queue, String> {
    let mut f = std::fs::File::from(fd.try_clone().map_err(|e| e.to_string())?);
    let mut q = Queue::default();
    let mut buf = vec![0u8; 1 << 16];
    let mut read_all = |f: &mut std::fs::File, out: &mut Vec<u8>| -> std::result::Result<(), String> {
        // Bounded: a line discipline holds 4 KiB, the buffer before it 64 KiB.
        for _ in 0..64 {
            match f.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(format!("reading unread data: {e}")),
            }
        }
        Err("more unread data than a terminal holds".into())
    };
    if !t.canonical() {
        read_all(&mut f, &mut q.rest)?;
        return Ok(q);
    }
    // One read returns one line; an empty one is a line ended by VEOF alone.
    let mut line = vec![0u8; LDISC_MAX + 1];
    for _ in 0..=LDISC_MAX {
        match f.read(&mut line) {
            Ok(n) => q.lines.push(line[..n].to_vec()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(format!("reading unread lines: {e}")),
        }
    }
    // The unfinished line: readable once canonical mode is off (the queue is empty after, so
    // turning it back on changes nothing).
    let mut raw = t.raw();
    raw.c_lflag &= !libc::ICANON;
    raw.c_cc[libc::VMIN] = 0;
    raw.c_cc[libc::VTIME] = 0;
    sys::tcsets2(fd, &raw).map_err(|e| format!("TCSETS2: {e}"))?;
    let r = read_all(&mut f, &mut q.rest);
    sys::tcsets2(fd, &t.raw()).map_err(|e| format!("TCSETS2: {e}"))?;
    r.map(|()| q)
}

/// How a queue is written back: the bytes, how many of them the reader stores (the witness
/// count), and whether the reader needs IEXTEN for it.
#[derive(Debug)]
struct Plan {
    bytes: Vec<u8>,
    stored: usize,
    iexten: bool,
}

/// The write-back of `q` for a reader with settings `t` (see [`refill`] for the settings used
/// meanwhile). A non-canonical reader then acts on no byte. A canonical one acts on its line
/// terminators, erase, kill and end-of-file characters (and, with IEXTEN, word erase, reprint,
/// VEOL2 and VLNEXT): such a byte inside a line got there typed after VLNEXT, and is written
/// after VLNEXT again; each line that was ended by VEOF gets its VEOF back. Err when that
/// cannot be done (no VLNEXT character, a line too long).
fn plan(q: &Queue, t: &Termios) -> std::result::Result<Plan, String> {
    if !t.canonical() {
        return Ok(Plan { bytes: q.rest.clone(), stored: q.rest.len(), iexten: false });
    }
    let lnext = t.cc(libc::VLNEXT);
    // IEXTEN for the write-back when the reader had it (VEOL2 ends lines) or VLNEXT is needed.
    let iexten = t.lflag & libc::IEXTEN != 0 || lnext.is_some();
    let had_iexten = t.lflag & libc::IEXTEN != 0;
    let mut ends: Vec<u8> = vec![b'\n'];
    ends.extend(t.cc(libc::VEOL));
    if had_iexten {
        ends.extend(t.cc(libc::VEOL2));
    }
    let mut special: Vec<u8> = vec![b'\n'];
    for i in [libc::VERASE, libc::VKILL, libc::VEOF, libc::VEOL] {
        special.extend(t.cc(i));
    }
    if iexten {
        for i in [libc::VWERASE, libc::VREPRINT, libc::VEOL2, libc::VLNEXT] {
            special.extend(t.cc(i));
        }
    }
    let mut p = Plan { bytes: Vec::new(), stored: 0, iexten };
    let literal = |p: &mut Plan, b: u8| -> std::result::Result<(), String> {
        if special.contains(&b) {
            let Some(l) = lnext else {
                return Err(format!(
                    "its unread input holds the character {b:#04x} as data (typed after VLNEXT), and VLNEXT is now \
                     disabled: writing it back would act on it"
                ));
            };
            p.bytes.push(l);
        }
        p.bytes.push(b);
        p.stored += 1;
        Ok(())
    };
    for l in &q.lines {
        let (body, end) = match l.split_last() {
            Some((&c, body)) if ends.contains(&c) => (body, Some(c)),
            _ => (&l[..], None),
        };
        for &b in body {
            literal(&mut p, b)?;
        }
        match end {
            Some(c) => {
                p.bytes.push(c);
                p.stored += 1;
            }
            None => p.bytes.push(t.cc(libc::VEOF).ok_or("a line ended by VEOF, and VEOF is now disabled")?),
        }
    }
    for &b in &q.rest {
        literal(&mut p, b)?;
    }
    if p.stored > LDISC_MAX {
        return Err(format!("{} bytes of unread canonical input (at most {LDISC_MAX} are carried)", p.stored));
    }
    Ok(p)
}

/// The master's own settings: the kernel's, fixed (termios calls on a master act on its slave):
/// raw, nothing processed.
fn master_termios() -> Termios {
    Termios::default()
}

/// Writes `q` back into the queue `reader` reads, through `writer`, so that it is stored as it
/// was (see the module comment). `tw` is the writer's settings when it is a slave (None for a
/// master). Both ends' settings are as before after.
fn refill(
    reader: &OwnedFd,
    writer: &OwnedFd,
    q: &Queue,
    tr: &Termios,
    tw: Option<&Termios>,
) -> std::result::Result<(), String> {
    if q.is_empty() {
        return Ok(());
    }
    let e = |what: &'static str| move |err: std::io::Error| format!("{what}: {err}");
    let plan = match plan(q, tr) {
        Ok(p) => p,
        Err(why) => {
            // Refused; the frozen process still gets its bytes back as well as they can go in.
            let mut all: Vec<u8> = q.lines.concat();
            all.extend_from_slice(&q.rest);
            let _ = std::fs::File::from(writer.try_clone().map_err(|e| e.to_string())?).write_all(&all);
            return Err(why);
        }
    };
    let bytes = &plan.bytes;
    // The reader: nothing transformed, echoed or taken as a signal or flow control (packet
    // mode is off meanwhile: changing IXON queues no status for the master).
    let mut r = tr.raw();
    r.c_iflag &= !(libc::ICRNL | libc::INLCR | libc::IGNCR | libc::IUCLC | libc::ISTRIP | libc::PARMRK | libc::IXON);
    r.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ISIG | libc::IEXTEN | libc::XCASE);
    if plan.iexten {
        r.c_lflag |= libc::IEXTEN;
    }
    let as_is = Termios::of(&r) == *tr;
    let mut wf = std::fs::File::from(writer.try_clone().map_err(|e| e.to_string())?);
    // A slave writer: no output processing for the write.
    if let Some(tw) = tw {
        let mut w = tw.raw();
        w.c_oflag &= !libc::OPOST;
        sys::tcsets2(writer, &w).map_err(e("TCSETS2 (writer)"))?;
    }
    let res = (|| {
        if as_is {
            return wf.write_all(bytes).map_err(|e| format!("writing unread data back: {e}"));
        }
        if bytes.len() > LDISC_MAX {
            return Err(format!("{} bytes of unread data with input processing on (at most {LDISC_MAX})", bytes.len()));
        }
        // Only a slave reads with processing on; its writer is the master.
        let canonical = tr.canonical();
        if canonical {
            if tw.is_some() {
                return Err("a canonical reader written to by a slave".into());
            }
            // The witness: each byte stored is echoed once, unchanged, into the master's
            // queue (empty now, and raw); VEOF and VLNEXT are not echoed.
            r.c_lflag |= libc::ECHO;
            r.c_lflag &= !libc::ECHOCTL;
            r.c_oflag &= !libc::OPOST;
        }
        sys::tcsets2(reader, &r).map_err(e("TCSETS2 (reader)"))?;
        let res = (|| {
            wf.write_all(bytes).map_err(|e| format!("writing unread data back: {e}"))?;
            let want = plan.stored;
            let t = std::time::Instant::now();
            let mut got = 0usize;
            let mut buf = vec![0u8; LDISC_MAX + 1];
            loop {
                if canonical {
                    match wf.read(&mut buf) {
                        Ok(n) => got += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(format!("reading the echo of unread data: {e}")),
                    }
                } else {
                    got = sys::ioctl_get_int(reader, libc::FIONREAD).map_err(e("TIOCINQ"))?.max(0) as usize;
                }
                if got >= want {
                    return if got == want {
                        Ok(())
                    } else {
                        Err(format!("{got} bytes came through where {want} were written back"))
                    };
                }
                if t.elapsed() > WORKER_WAIT {
                    return Err(format!(
                        "the terminal took in {got} of {want} unread bytes within {} s",
                        WORKER_WAIT.as_secs()
                    ));
                }
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        })();
        let back = sys::tcsets2(reader, &tr.raw()).map_err(e("TCSETS2 (reader)"));
        res.and(back)
    })();
    if let Some(tw) = tw {
        let back = sys::tcsets2(writer, &tw.raw()).map_err(e("TCSETS2 (writer)"));
        return res.and(back);
    }
    res
}

/// Makes a new pair in the process being rebuilt: the master, unlocked, and a slave
/// description per entry of `slaves` (file index, flags); then, from here through copies of
/// both ends, settings, window size, unread data and modes. Returns the master's fd and each
/// slave's (file index, fd), all in the new process.
pub fn restore_pair(r: &Remote, pty: &Pty, flags: u32, slaves: &[(usize, u32)]) -> Result<(u64, Vec<(usize, u64)>)> {
    let keep = |f: u32| (f & !((libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_CLOEXEC) as u32)) as u64;
    let noctty = (libc::O_NOCTTY | libc::O_CLOEXEC) as u64;
    let p = r.put_cstr(0, b"/dev/ptmx")?;
    let m = r.call("open /dev/ptmx", libc::SYS_openat, &[libc::AT_FDCWD as u64, p, keep(flags) | noctty, 0])?;
    let a = r.put(0, &0i32.to_le_bytes())?;
    r.call("ioctl(TIOCSPTLCK)", libc::SYS_ioctl, &[m, libc::TIOCSPTLCK, a])?;
    r.call("ioctl(TIOCGPTN)", libc::SYS_ioctl, &[m, libc::TIOCGPTN, a])?;
    let n = i32::from_le_bytes(r.get(0, 4)?.try_into().unwrap());
    let path = format!("/dev/pts/{n}");
    let mut out = Vec::new();
    for &(i, fl) in slaves {
        let p = r.put_cstr(0, path.as_bytes())?;
        let fd =
            r.call(&format!("open {path}"), libc::SYS_openat, &[libc::AT_FDCWD as u64, p, keep(fl) | noctty, 0])?;
        out.push((i, fd));
    }
    let Some(&(_, sfd)) = out.first() else {
        return Err(Error::Restore(format!("pty {path}: no slave description in the image")));
    };
    let err = |why: String| Error::Restore(format!("pty {path}: {why}"));
    let pidfd = sys::pidfd_open(r.pid).map_err(|e| err(format!("pidfd_open: {e}")))?;
    let mc = sys::pidfd_getfd(&pidfd, m as i32).map_err(|e| err(format!("pidfd_getfd: {e}")))?;
    let sc = sys::pidfd_getfd(&pidfd, sfd as i32).map_err(|e| err(format!("pidfd_getfd: {e}")))?;
    write_pair(&mc, &sc, pty, flags, slaves.first().map_or(0, |s| s.1)).map_err(err)?;
    Ok((m, out))
}

fn write_pair(m: &OwnedFd, s: &OwnedFd, pty: &Pty, mfl: u32, sfl: u32) -> std::result::Result<(), String> {
    let e = |what: &'static str| move |err: std::io::Error| format!("{what}: {err}");
    sys::tcsets2(s, &pty.slave.raw()).map_err(e("TCSETS2 (slave)"))?;
    sys::set_winsize(m, pty.winsize).map_err(e("TIOCSWINSZ"))?;
    let nb = libc::O_NONBLOCK as u32;
    sys::set_status_flags(m, mfl | nb).map_err(e("F_SETFL"))?;
    sys::set_status_flags(s, sfl | nb).map_err(e("F_SETFL"))?;
    refill(s, m, &pty.input, &pty.slave, None)?;
    refill(m, s, &pty.output, &master_termios(), Some(&pty.slave))?;
    let keep = !((libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_CLOEXEC | libc::O_NOCTTY) as u32);
    sys::set_status_flags(m, mfl & keep).map_err(e("F_SETFL"))?;
    sys::set_status_flags(s, sfl & keep).map_err(e("F_SETFL"))?;
    if pty.exclusive {
        sys::ioctl_none(s, libc::TIOCEXCL).map_err(e("TIOCEXCL"))?;
    }
    if pty.packet {
        sys::ioctl_set_int(m, libc::TIOCPKT, 1).map_err(e("TIOCPKT"))?;
    }
    if pty.locked {
        sys::ioctl_set_int(m, libc::TIOCSPTLCK, 1).map_err(e("TIOCSPTLCK"))?;
    }
    Ok(())
}

// ---------------------------------------------------------------- shell jobs (`--shell-job`)
//
// A job of an interactive shell has the shell's terminal as its stdio and controlling
// terminal. With `DumpOptions::shell_job` the fds open on the controlling terminal are recorded
// as [`FileKind::ShellTerminal`] (with the terminal's settings: an interactive program may have
// made it raw); `RestoreOptions::shell_job` gives the restorer's terminal, which the new
// process gets (the same open file description, as a job shares its shell's) with those
// settings. The process then stays in the restorer's session and process group — the
// foreground job of that terminal — instead of becoming a group leader again.

/// The fds of `pid` open on its controlling terminal (or on `/dev/tty`).
pub fn ctty_fds(pid: Pid) -> Vec<i32> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let ctty: u64 = crate::proc::stat_fields(pid).ok().and_then(|f| f.get(7)?.parse().ok()).unwrap_or(0);
    if ctty == 0 {
        return Vec::new();
    }
    let Ok(dir) = std::fs::read_dir(proc_path(pid, "fd")) else { return Vec::new() };
    let mut out: Vec<i32> = dir
        .flatten()
        // The terminal itself, or /dev/tty (5:0), which opens the controlling terminal.
        .filter(|e| {
            std::fs::metadata(e.path())
                .is_ok_and(|m| m.file_type().is_char_device() && (m.rdev() == ctty || m.rdev() == libc::makedev(5, 0)))
        })
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    out.sort_unstable();
    out
}

/// Why `pid` cannot be dumped as a shell job: it leads its terminal's session (it is the
/// shell, or a program started in its own session).
pub fn shell_job_blockers(pid: Pid) -> Vec<Error> {
    let f = crate::proc::stat_fields(pid).unwrap_or_default();
    let sid: Pid = f.get(6).and_then(|v| v.parse().ok()).unwrap_or(0);
    if sid == pid && !ctty_fds(pid).is_empty() {
        return vec![Error::Unsupported {
            pid,
            what: "the leader of its terminal's session (a shell job is a process a shell started; the session \
                   leader owns the terminal)"
                .into(),
        }];
    }
    Vec::new()
}

/// Turns the [`FileKind::External`] records of the controlling terminal's fds (`fds`) into
/// [`FileKind::ShellTerminal`] with the terminal's settings.
pub fn shell_terminals(pid: Pid, st: &mut FilesState, fds: &[i32]) -> Result<()> {
    let pidfd = sys::pidfd_open(pid).map_err(|err| Error::NoProcess { pid, err })?;
    for e in st.fds.iter().filter(|e| fds.contains(&e.fd)) {
        let FileKind::External { what, flags, .. } = &st.files[e.file] else { continue };
        let refuse = |why: String| Error::UnsupportedFd { fd: e.fd, what: what.clone(), why };
        let dup = sys::pidfd_getfd(&pidfd, e.fd).map_err(|e| refuse(format!("pidfd_getfd: {e}")))?;
        let termios = Termios::of(&sys::tcgets2(&dup).map_err(|e| refuse(format!("TCGETS2: {e}")))?);
        st.files[e.file] = FileKind::ShellTerminal { path: what.clone(), flags: *flags, termios };
    }
    Ok(())
}

/// The fds of the image that were its shell job's terminal.
pub fn shell_terminal_fds(st: &FilesState) -> Vec<i32> {
    st.fds.iter().filter(|e| matches!(st.files[e.file], FileKind::ShellTerminal { .. })).map(|e| e.fd).collect()
}

/// Gives the restorer's terminal `local` the image's terminal settings, before the process
/// gets it.
pub fn prepare_shell_terminal(st: &FilesState, local: i32) -> Result<()> {
    let Some(termios) = st.files.iter().find_map(|f| match f {
        FileKind::ShellTerminal { termios, .. } => Some(termios),
        _ => None,
    }) else {
        return Ok(());
    };
    sys::tcsets2(&local, &termios.raw())
        .map_err(|e| Error::Restore(format!("--shell-job: fd {local} is not a terminal (TCSETS2: {e})")))
}

/// Installs the restorer's terminal `local` in the new process (its own copy of the same open
/// file description) with the image's status flags — or, for an fd that was an open of
/// `/dev/tty`, opens `/dev/tty` there (the process is in the restorer's session by then: it is
/// that terminal); returns its fd there.
pub fn pull_terminal(r: &Remote, path: &str, local: i32, flags: u32) -> Result<u64> {
    let keep = (libc::O_APPEND | libc::O_NONBLOCK | libc::O_ASYNC) as u32;
    if path == "/dev/tty" {
        let p = r.put_cstr(0, b"/dev/tty")?;
        let fl = (flags & (keep | libc::O_ACCMODE as u32)) as u64 | libc::O_CLOEXEC as u64;
        return r.call("open /dev/tty", libc::SYS_openat, &[libc::AT_FDCWD as u64, p, fl, 0]);
    }
    let pidfd = r.call("pidfd_open (restorer)", libc::SYS_pidfd_open, &[std::process::id() as u64, 0])?;
    let got = r.call("pidfd_getfd (the restorer's terminal)", libc::SYS_pidfd_getfd, &[pidfd, local as u64, 0]);
    r.call("close", libc::SYS_close, &[pidfd])?;
    let got = got?;
    r.call("fcntl(F_SETFL) (terminal)", libc::SYS_fcntl, &[got, libc::F_SETFL as u64, (flags & keep) as u64])?;
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slave whose master this process holds is "its own pair" (carried, not a terminal left
    /// behind); once the master is closed it is not.
    #[test]
    fn a_slave_is_of_an_own_pair_while_the_master_is_held() {
        use std::os::fd::AsRawFd;
        let master = std::fs::OpenOptions::new().read(true).write(true).open("/dev/ptmx").unwrap();
        let mut n: libc::c_uint = 0;
        let unlock: libc::c_int = 0;
        // SAFETY: TIOCGPTN writes an unsigned int; TIOCSPTLCK reads an int; both valid.
        unsafe {
            assert_eq!(libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut n), 0);
            assert_eq!(libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock), 0);
        }
        let slave = format!("/dev/pts/{n}");
        let me = std::process::id() as Pid;
        assert!(slave_of_own_pair(me, &slave));
        drop(master);
        assert!(!slave_of_own_pair(me, &slave));
        assert!(!slave_of_own_pair(me, "/dev/tty1"));
    }

    #[test]
    fn pty_ends_are_told_apart() {
        let m = describe("/dev/ptmx", "pos:\t0\nflags:\t02\ntty-index:\t7\n", libc::makedev(5, 2), 2);
        assert!(matches!(m, Some(FileKind::PtyMaster { index: 7, flags: 2, .. })));
        let s = describe("/dev/pts/7", "pos:\t0\n", libc::makedev(136, 7), 2);
        assert_eq!(s, Some(FileKind::PtySlave { index: 7, flags: 2 }));
        assert_eq!(describe("/dev/pts/7", "", libc::makedev(4, 1), 2), None);
        assert_eq!(describe("/dev/tty1", "", libc::makedev(4, 1), 2), None);
        assert_eq!(describe("/dev/ptmx", "pos:\t0\n", libc::makedev(5, 2), 2), None);
        assert!(closed_master("/dev/pts/3 (deleted)").unwrap().contains("slave of pty 3, whose master was closed"));
        assert_eq!(closed_master("/dev/pts/3"), None);
        assert_eq!(closed_master("/tmp/x (deleted)"), None);
    }

    #[test]
    fn write_back_plans() {
        let mut t = Termios { lflag: libc::ICANON, ..Termios::default() };
        t.cc[libc::VEOF] = 4;
        t.cc[libc::VERASE] = 0x7f;
        // Lines ended by VEOF get it back; it is not stored.
        let q = Queue { lines: vec![b"a\n".to_vec(), b"bc".to_vec(), vec![]], rest: b"d".to_vec() };
        let p = plan(&q, &t).unwrap();
        assert_eq!((p.bytes, p.stored, p.iexten), (b"a\nbc\x04\x04d".to_vec(), 5, false));
        // A literal erase (or newline) needs VLNEXT: refused without it, escaped with it.
        let lit = Queue { lines: vec![b"x\x7fy\n".to_vec()], rest: b"z\n".to_vec() };
        assert!(plan(&lit, &t).unwrap_err().contains("0x7f"));
        t.cc[libc::VLNEXT] = 0x16;
        let p = plan(&lit, &t).unwrap();
        assert_eq!((p.bytes, p.stored, p.iexten), (b"x\x16\x7fy\nz\x16\n".to_vec(), 6, true));
        // A non-canonical reader acts on nothing.
        let raw = Termios::default();
        let p = plan(&Queue { lines: vec![], rest: vec![0x7f, 4, b'\n'] }, &raw).unwrap();
        assert_eq!((p.bytes, p.stored), (vec![0x7f, 4, b'\n'], 3));
    }
}
