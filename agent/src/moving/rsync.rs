//! `move --transfer rsync`: the image directory goes with rsync, tunnelled through the
//! authenticated agent link as rsync's remote shell (no sshd).
//!
//! ```text
//!  source agent                                      destination agent
//!  rsync -e "dvk-agent --rsync-tunnel" DIR/ dvk::img/
//!   └ tunnel: stdin/stdout ⇄ socketpair ⇄ agent
//!        ── MoveRsyncOpen{mid} ───────────────────▶ only for a move it is the destination of,
//!                                                   from that move's source: it writes the
//!                                                   daemon config itself and runs
//!                                                   rsync --server --daemon --config=C .
//!        ⇄ MoveRsyncData / MoveRsyncCredit ⇄        (stdin/stdout of that rsync)
//!        ⇄ MoveRsyncEnd{why: None} ⇄                each side's output ended
//!  rsync exits 0: ImageSent                         the daemon's exit status is kept: the
//!                                                   restore waits for it and refuses a failure
//! ```
//! Confinement: the peer's rsync can only name the daemon's one module, whose path the
//! destination derives from the move's vPID (`kept::KeptImages::dir`); the daemon chroots into
//! it, makes regular files and directories only (devices and specials refused, symlinks
//! munged), 0600/0700, no file above 64 GiB. The delta runs against what that directory held: the older image of the
//! same process. Each direction has [`RSYNC_WINDOW`] bytes of credit, so a session holds at
//! most that much in the agent; a peer that overruns it, or credits more than was sent, loses
//! the session.

use super::kept::KeptImages;
use crate::state::{Agent, LinkHandle};
use dvk_protocol::peer::{PeerMessage, RSYNC_WINDOW};
use pidvirt::{NodeId, Vpid};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Semaphore};

/// The environment variable that tells `dvk-agent --rsync-tunnel` its socket's fd.
const TUNNEL_FD_ENV: &str = "DVK_RSYNC_TUNNEL_FD";
/// The fd the tunnel's socket has in the source's rsync and its remote shell.
const TUNNEL_FD: i32 = 3;
/// The one module of the destination's daemon.
const MODULE: &str = "img";
/// Bytes per MoveRsyncData.
const CHUNK: usize = 64 * 1024;
/// Largest file the destination's daemon may write (as the stream transfer's page data).
const MAX_IMAGE_FILE: u64 = 64 << 30;

/// One rsync session (a move's transfer) as the link reader sees it.
pub struct Session {
    peer: NodeId,
    incoming: mpsc::UnboundedSender<Incoming>,
    flow: Arc<Flow>,
    credit: Arc<Semaphore>,
}

/// A session's byte accounting, each direction bounded by [`RSYNC_WINDOW`].
#[derive(Default)]
struct Flow {
    /// Received, not yet written to our rsync.
    inflight: AtomicU64,
    /// Sent, not yet credited by the peer.
    outstanding: AtomicU64,
}

impl Flow {
    /// `n` bytes arrived; false if that is more than the peer's credit allowed.
    fn received(&self, n: u64) -> bool {
        self.inflight.fetch_add(n, Ordering::AcqRel) + n <= RSYNC_WINDOW as u64
    }

    /// `n` received bytes went to our rsync (and are credited back).
    fn delivered(&self, n: u64) {
        self.inflight.fetch_sub(n, Ordering::AcqRel);
    }

    /// `n` bytes went to the peer.
    fn sent(&self, n: u64) {
        self.outstanding.fetch_add(n, Ordering::AcqRel);
    }

    /// The peer credits `n` bytes; false if more than it was sent and did not credit yet.
    fn credited(&self, n: u64) -> bool {
        self.outstanding.fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| o.checked_sub(n)).is_ok()
    }
}

enum Incoming {
    Data(Vec<u8>),
    /// The peer's direction ended (None) or the session failed (the reason).
    End(Option<String>),
}

/// How a destination's receiving rsync ended: the image directory it wrote, or why it failed
/// (None while it runs).
pub type Received = Option<Result<PathBuf, String>>;

/// What rsync's `--stats` said of a transfer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes of the image files.
    pub total_size: u64,
    /// File data that travelled (what the destination's older image did not have).
    pub literal: u64,
    /// File data the destination took from its older image.
    pub matched: u64,
    /// Bytes the source's rsync sent (literal data, block references, file list).
    pub sent: u64,
    /// Bytes it received (the destination's block checksums, acknowledgements).
    pub received: u64,
}

impl Stats {
    fn parse(out: &str) -> Option<Stats> {
        let field = |name: &str| -> Option<u64> {
            let line = out.lines().find_map(|l| l.trim().strip_prefix(name))?;
            let digits: String = line.split_whitespace().next()?.chars().filter(|c| *c != ',').collect();
            digits.parse().ok()
        };
        Some(Stats {
            total_size: field("Total file size:")?,
            literal: field("Literal data:")?,
            matched: field("Matched data:")?,
            sent: field("Total bytes sent:")?,
            received: field("Total bytes received:")?,
        })
    }
}

/// `dvk-agent --rsync-tunnel …` (rsync's remote shell on the source; its arguments, the host
/// and the remote command, are rsync's and ignored: the agent at the other end of the socket
/// decides what runs). Carries stdin to the socket and the socket to stdout.
pub fn tunnel_main() -> ! {
    use std::os::fd::FromRawFd;
    let fd: i32 = match std::env::var(TUNNEL_FD_ENV).ok().and_then(|v| v.parse().ok()) {
        Some(fd) if fd >= 3 => fd,
        _ => {
            eprintln!("dvk-agent --rsync-tunnel: run by dvk-agent only (as rsync's remote shell)");
            std::process::exit(2);
        }
    };
    // SAFETY: the agent passed this fd (a socket) for this process to own; nothing else here
    // uses it.
    let sock = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
    let Ok(up) = sock.try_clone() else { std::process::exit(2) };
    // SAFETY: fds 0 and 1 are this process's stdin and stdout, open for its whole life; the
    // Files are never dropped (so they are not closed twice). Plain read/write loops: neither
    // std's line-buffered stdout (it holds binary data back) nor io::copy's splice, which can
    // sit on a socket that has data.
    let (stdin, stdout) = unsafe { (std::fs::File::from_raw_fd(0), std::fs::File::from_raw_fd(1)) };
    let (stdin, stdout) = (std::mem::ManuallyDrop::new(stdin), std::mem::ManuallyDrop::new(stdout));
    std::thread::spawn(move || {
        pump(&*stdin, &up);
        let _ = up.shutdown(std::net::Shutdown::Write);
    });
    pump(&sock, &*stdout);
    std::process::exit(0);
}

/// Copies `from` to `to` until EOF or an error.
fn pump(mut from: impl std::io::Read, mut to: impl std::io::Write) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// The rsync binary (the agent's PATH, set by whoever started it as root).
fn rsync_binary() -> &'static str {
    "rsync"
}

/// The session's shared counters, and its half for the link reader.
struct Wiring {
    rx: mpsc::UnboundedReceiver<Incoming>,
    flow: Arc<Flow>,
    credit: Arc<Semaphore>,
}

/// Registers session `mid` with `peer`; false if there is one already.
fn register(agent: &Agent, mid: u64, peer: NodeId) -> Option<Wiring> {
    let (tx, rx) = mpsc::unbounded_channel();
    let w = Wiring { rx, flow: Arc::default(), credit: Arc::new(Semaphore::new(RSYNC_WINDOW as usize)) };
    let mut sessions = agent.moves.rsync.lock();
    if sessions.contains_key(&mid) {
        return None;
    }
    sessions.insert(mid, Session { peer, incoming: tx, flow: w.flow.clone(), credit: w.credit.clone() });
    Some(w)
}

/// Ends session `mid` with `why` (both here and at the peer).
fn fail(agent: &Agent, mid: u64, why: &str) {
    let Some(s) = agent.moves.rsync.lock().remove(&mid) else { return };
    let _ = s.incoming.send(Incoming::End(Some(why.to_owned())));
    agent.send_to(s.peer, PeerMessage::MoveRsyncEnd { mid, why: Some(why.to_owned()) });
}

/// `MoveRsyncData` from `from` (in the link reader: must not block).
pub fn on_data(agent: &Agent, from: NodeId, mid: u64, bytes: Vec<u8>) {
    let overrun = {
        let sessions = agent.moves.rsync.lock();
        // Late data of a session that ended is dropped.
        let Some(s) = sessions.get(&mid).filter(|s| s.peer == from) else { return };
        if !s.flow.received(bytes.len() as u64) {
            true
        } else {
            let _ = s.incoming.send(Incoming::Data(bytes));
            false
        }
    };
    if overrun {
        tracing::warn!(peer = %agent.node_name(from), mid, "the peer overran the rsync window; session ended");
        fail(agent, mid, "the peer sent more rsync data than its credit");
    }
}

/// `MoveRsyncCredit` from `from`.
pub fn on_credit(agent: &Agent, from: NodeId, mid: u64, bytes: u32) {
    let bad = {
        let sessions = agent.moves.rsync.lock();
        let Some(s) = sessions.get(&mid).filter(|s| s.peer == from) else { return };
        if s.flow.credited(bytes as u64) {
            s.credit.add_permits(bytes as usize);
            false
        } else {
            true
        }
    };
    if bad {
        fail(agent, mid, "the peer credited more rsync data than was sent");
    }
}

/// `MoveRsyncEnd` from `from`.
pub fn on_end(agent: &Agent, from: NodeId, mid: u64, why: Option<String>) {
    let sessions = agent.moves.rsync.lock();
    if let Some(s) = sessions.get(&mid).filter(|s| s.peer == from) {
        let why = why.map(|w| format!("{}: {w}", agent.node_name(from)));
        let _ = s.incoming.send(Incoming::End(why));
    }
}

/// The link to `node` went down: its sessions end.
pub fn on_link_down(agent: &Agent, node: NodeId) {
    let mids: Vec<u64> = agent.moves.rsync.lock().iter().filter(|(_, s)| s.peer == node).map(|(m, _)| *m).collect();
    for mid in mids {
        if let Some(s) = agent.moves.rsync.lock().remove(&mid) {
            let _ = s.incoming.send(Incoming::End(Some(format!("the link to {} went down", agent.node_name(node)))));
        }
    }
}

/// Carries bytes between our rsync (`r`, `w`) and the peer until `child` exits; kills it if the
/// session fails or nothing moves for the transfer's idle limit. Returns its exit status.
async fn run_session<R, W>(
    agent: &Arc<Agent>,
    mid: u64,
    link: LinkHandle,
    mut child: tokio::process::Child,
    mut r: R,
    mut w: W,
    wiring: Wiring,
) -> Result<std::process::ExitStatus, String>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let Wiring { mut rx, flow, credit } = wiring;
    let progress = Arc::new(AtomicU64::new(super::now_ms()));
    let outgoing = {
        let (link, progress, flow) = (link.clone(), progress.clone(), flow.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = r.read(&mut buf).await.map_err(|e| format!("reading from rsync: {e}"))?;
                if n == 0 {
                    let end = PeerMessage::MoveRsyncEnd { mid, why: None };
                    return link.write_now(end).await.map_err(|e| format!("the agent link failed: {e}"));
                }
                credit.acquire_many(n as u32).await.map_err(|e| e.to_string())?.forget();
                flow.sent(n as u64);
                let msg = PeerMessage::MoveRsyncData { mid, bytes: buf[..n].to_vec() };
                link.write_now(msg).await.map_err(|e| format!("the agent link failed: {e}"))?;
                progress.store(super::now_ms(), Ordering::Relaxed);
            }
        })
    };
    let incoming = {
        let (link, progress) = (link.clone(), progress.clone());
        tokio::spawn(async move {
            let mut ended = false;
            while let Some(i) = rx.recv().await {
                match i {
                    Incoming::Data(b) => {
                        w.write_all(&b).await.map_err(|e| format!("writing to rsync: {e}"))?;
                        flow.delivered(b.len() as u64);
                        let credit = PeerMessage::MoveRsyncCredit { mid, bytes: b.len() as u32 };
                        link.write_now(credit).await.map_err(|e| format!("the agent link failed: {e}"))?;
                        progress.store(super::now_ms(), Ordering::Relaxed);
                    }
                    Incoming::End(None) => {
                        ended = true;
                        let _ = w.shutdown().await;
                    }
                    Incoming::End(Some(why)) => return Err(why),
                }
            }
            if ended {
                Ok(())
            } else {
                Err("the session was closed".to_string())
            }
        })
    };
    let idle = super::timeouts().transfer_idle;
    let (mut outgoing, mut incoming) = (outgoing, incoming);
    let (mut out_done, mut in_done) = (false, false);
    let result = loop {
        tokio::select! {
            status = child.wait() => break status.map_err(|e| format!("waiting for rsync: {e}")),
            r = &mut outgoing, if !out_done => {
                out_done = true;
                if let Err(e) = r.map_err(|e| e.to_string()).and_then(|r| r) {
                    break Err(e);
                }
            }
            r = &mut incoming, if !in_done => {
                in_done = true;
                if let Err(e) = r.map_err(|e| e.to_string()).and_then(|r| r) {
                    break Err(e);
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                let quiet = super::now_ms().saturating_sub(progress.load(Ordering::Relaxed));
                if quiet > idle {
                    break Err(format!("no progress for {} s", quiet / 1000));
                }
            }
        }
    };
    // What our rsync wrote before it exited still goes to the peer (its last words end the
    // peer's rsync), within the idle limit.
    let result = match result {
        Ok(status) if !out_done => match tokio::time::timeout(Duration::from_millis(idle), &mut outgoing).await {
            Ok(Ok(Ok(()))) => Ok(status),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("rsync's last output did not leave within {idle} ms")),
        },
        other => other,
    };
    outgoing.abort();
    incoming.abort();
    match result {
        Ok(status) => {
            agent.moves.rsync.lock().remove(&mid);
            Ok(status)
        }
        Err(e) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            fail(agent, mid, &e);
            agent.moves.rsync.lock().remove(&mid);
            Err(e)
        }
    }
}

/// Collects a child's pipe (stdout or stderr) while it runs.
fn collect<P: AsyncRead + Unpin + Send + 'static>(p: Option<P>) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut out = Vec::new();
        if let Some(mut p) = p {
            // Bounded: rsync's stats and errors are short; anything past this is not kept.
            let _ = (&mut p).take(1 << 20).read_to_end(&mut out).await;
            let _ = tokio::io::copy(&mut p, &mut tokio::io::sink()).await;
        }
        String::from_utf8_lossy(&out).into_owned()
    })
}

/// The last lines of rsync's error output, for a move's reason.
fn last_lines(s: &str) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join("; ")
}

/// Source: sends `dir` (a complete image) to `dest` for move `mid`.
pub async fn send(agent: &Arc<Agent>, dest: NodeId, mid: u64, dir: &Path, compress: bool) -> Result<Stats, String> {
    use std::os::fd::AsRawFd;
    let link = agent.link(dest).ok_or_else(|| format!("no link to {}", agent.node_name(dest)))?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the agent's binary: {e}"))?;
    let exe = exe.to_str().filter(|s| !s.contains(['\'', '"'])).ok_or("the agent's path cannot be quoted")?;
    let wiring = register(agent, mid, dest).ok_or("an rsync session of this move is under way")?;
    let target = match agent.fault {
        // A hostile source: it asks the daemon to write outside its directory.
        Some(super::Fault::RsyncEscape) => {
            tracing::warn!("test fault: the rsync request names a path outside the image directory");
            format!("dvk::{MODULE}/../../escaped/")
        }
        Some(super::Fault::RsyncBadModule) => {
            tracing::warn!("test fault: the rsync request names another module");
            "dvk::etc/".to_string()
        }
        _ => format!("dvk::{MODULE}/"),
    };
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let theirs_fd = theirs.as_raw_fd();
    let mut cmd = tokio::process::Command::new(rsync_binary());
    // -I: never skip a file by its size and time; --no-whole-file: the delta algorithm runs
    // even though the link is fast; blocks of one page: page data is page-aligned, so a page
    // written since is all that differs (rsync's default, √size, makes 16 KB blocks at 256 MB:
    // four times the literal data for scattered writes); --delete: files the older image had
    // and this one has not. Not --inplace: it would write fewer pages, but it matches a block
    // only at or after the offset being written (with it, a move back in the benchmark matched
    // nothing); the new file is built beside the old one instead, which also leaves the old
    // one whole if the transfer fails.
    cmd.args(["-r", "-I", "--no-whole-file", "--block-size=4096", "--delete", "--stats"]);
    if compress {
        cmd.arg("--compress");
    }
    cmd.arg("-e")
        .arg(format!("'{exe}' --rsync-tunnel"))
        .arg(format!("{}/", dir.display()))
        .arg(target)
        .env(TUNNEL_FD_ENV, TUNNEL_FD.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: dup2 and fcntl are async-signal-safe; the child gets the socket as fd 3 (not
    // close-on-exec), which rsync passes on to its remote shell, the tunnel.
    unsafe {
        cmd.pre_exec(move || {
            if theirs_fd == TUNNEL_FD {
                if libc::fcntl(TUNNEL_FD, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(theirs_fd, TUNNEL_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    if let Err(e) = link.write_now(PeerMessage::MoveRsyncOpen { mid }).await {
        agent.moves.rsync.lock().remove(&mid);
        return Err(format!("the link to {} failed: {e}", agent.node_name(dest)));
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            fail(agent, mid, "the source could not start rsync");
            return Err(format!("cannot run {}: {e}", rsync_binary()));
        }
    };
    drop(theirs);
    let (stdout, stderr) = (collect(child.stdout.take()), collect(child.stderr.take()));
    ours.set_nonblocking(true).map_err(|e| e.to_string())?;
    let ours = tokio::net::UnixStream::from_std(ours).map_err(|e| e.to_string())?;
    let (r, w) = ours.into_split();
    let status = run_session(agent, mid, link, child, r, w, wiring).await;
    let (out, err) = (stdout.await.unwrap_or_default(), stderr.await.unwrap_or_default());
    let status = status.map_err(|e| if err.trim().is_empty() { e } else { format!("{e} ({})", last_lines(&err)) })?;
    if !status.success() {
        let why = format!("rsync failed ({status}): {}", last_lines(&err));
        fail(agent, mid, &why);
        return Err(why);
    }
    Stats::parse(&out).ok_or_else(|| format!("rsync printed no statistics: {}", last_lines(&out)))
}

/// The daemon configuration for move `mid`: one module, `dir`, nothing else.
fn daemon_config(mid: u64, dir: &Path) -> String {
    format!(
        "# dvk-agent, move {mid:x}: the peer's rsync may write into this one directory only\n\
         use chroot = yes\n\
         numeric ids = yes\n\
         munge symlinks = yes\n\
         log file = /dev/null\n\
         max verbosity = 0\n\
         [{MODULE}]\n\
         path = {}\n\
         read only = no\n\
         write only = yes\n\
         list = no\n\
         uid = 0\n\
         gid = 0\n\
         incoming chmod = Du=rwx,Dgo=,Fu=rw,Fgo=\n\
         refuse options = devices specials copy-devices write-devices log-file log-file-format \
         link-dest copy-dest compare-dest\n",
        dir.display()
    )
}

/// Destination: `MoveRsyncOpen` from `from` (in the link reader: must not block). Only for a
/// move this node is the destination of, from its source; the daemon's module is the kept
/// image directory of the move's vPID, whatever the peer's rsync asks for.
pub fn open(agent: &Arc<Agent>, from: NodeId, mid: u64) {
    let vpid = agent.moves.rsync_dest.lock().get(&mid).copied().filter(|_| (mid >> 48) as u16 == from.0);
    let Some(vpid) = vpid else {
        tracing::warn!(peer = %agent.node_name(from), mid, "rsync for no move of that node to here; refused");
        agent.send_to(from, PeerMessage::MoveRsyncEnd { mid, why: Some("no such move here".into()) });
        return;
    };
    let Some(wiring) = register(agent, mid, from) else {
        tracing::warn!(peer = %agent.node_name(from), mid, "a second rsync for one move; refused");
        return;
    };
    let (done_tx, done_rx) = watch::channel(None);
    agent.moves.rsync_results.lock().insert(mid, done_rx);
    let agent = agent.clone();
    tokio::spawn(async move {
        let result = serve(&agent, from, mid, vpid, wiring).await;
        if let Err(e) = &result {
            tracing::warn!(mid, %vpid, "rsync receive failed: {e}");
        }
        let _ = done_tx.send(Some(result.map(|()| KeptImages::of(&agent).dir(vpid))));
    });
}

async fn serve(agent: &Arc<Agent>, from: NodeId, mid: u64, vpid: Vpid, wiring: Wiring) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let link = agent.link(from).ok_or("no link to the source")?;
    let dir = KeptImages::of(agent).prepare(vpid).map_err(|e| format!("cannot make the image directory: {e}"))?;
    let basis: u64 = std::fs::read_dir(&dir)
        .map(|d| d.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum())
        .unwrap_or(0);
    tracing::info!(mid, %vpid, dir = %dir.display(), basis, "receiving an image by rsync (older image: {basis} bytes)");
    let conf = agent.staging.join(format!("rsyncd-{mid:x}.conf"));
    let _ = std::fs::remove_file(&conf);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&conf)
        .and_then(|mut f| std::io::Write::write_all(&mut f, daemon_config(mid, &dir).as_bytes()))
        .map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
    let mut cmd = tokio::process::Command::new(rsync_binary());
    cmd.args(["--server", "--daemon"])
        .arg(format!("--config={}", conf.display()))
        .arg(".")
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: setrlimit is async-signal-safe. No file the peer's rsync writes may grow past
    // what the stream transfer accepts either (the kernel stops the daemon with SIGXFSZ).
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: MAX_IMAGE_FILE, rlim_max: MAX_IMAGE_FILE };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&conf);
            let why = format!("cannot run {}: {e}", rsync_binary());
            fail(agent, mid, &why);
            return Err(why);
        }
    };
    let (stdin, stdout) = (child.stdin.take(), child.stdout.take());
    let stderr = collect(child.stderr.take());
    let (Some(stdin), Some(stdout)) = (stdin, stdout) else {
        return Err("rsync without pipes".into());
    };
    let status = run_session(agent, mid, link, child, stdout, stdin, wiring).await;
    let _ = std::fs::remove_file(&conf);
    let err = stderr.await.unwrap_or_default();
    let status = status?;
    if !status.success() {
        return Err(format!("the receiving rsync failed ({status}) {}", last_lines(&err)));
    }
    Ok(())
}

/// Destination, before the restore: if move `mid` came by rsync, waits for its receiving rsync
/// to end and returns the image directory it wrote (or why it failed); None for a move whose
/// image came as frames.
pub async fn received(agent: &Agent, mid: u64) -> Option<Result<PathBuf, String>> {
    let mut rx = agent.moves.rsync_results.lock().get(&mid).cloned()?;
    let wait = Duration::from_millis(super::timeouts().transfer_idle);
    let got = tokio::time::timeout(wait, rx.wait_for(|r| r.is_some())).await;
    Some(match got {
        Ok(Ok(r)) => r.clone().unwrap_or_else(|| Err("no result".into())),
        Ok(Err(_)) => Err("the receiving rsync vanished".into()),
        Err(_) => Err(format!("the receiving rsync did not end within {wait:?}")),
    })
}

/// The destination's part of move `mid` ended: its session (if any) and result go.
pub fn forget(agent: &Agent, mid: u64) {
    agent.moves.rsync_dest.lock().remove(&mid);
    agent.moves.rsync_results.lock().remove(&mid);
    if let Some(s) = agent.moves.rsync.lock().remove(&mid) {
        let _ = s.incoming.send(Incoming::End(Some("the move ended".into())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_read_from_rsyncs_summary() {
        let out = "\nNumber of files: 3 (reg: 2, dir: 1)\nTotal file size: 20,000,003 bytes\n\
                   Literal data: 44,720 bytes\nMatched data: 19,955,283 bytes\nTotal bytes sent: 62,757\n\
                   Total bytes received: 26,905\n\nsent 62,757 bytes  received 26,905 bytes\n";
        let s = Stats::parse(out).unwrap();
        assert_eq!(
            s,
            Stats { total_size: 20_000_003, literal: 44_720, matched: 19_955_283, sent: 62_757, received: 26_905 }
        );
        assert_eq!(Stats::parse("rsync error: some files could not be transferred"), None);
    }

    #[test]
    fn a_peer_gets_no_more_than_its_window_in_and_credits_no_more_than_it_was_sent() {
        let f = Flow::default();
        let w = RSYNC_WINDOW as u64;
        assert!(f.received(w - 10) && f.received(10), "a full window is allowed");
        assert!(!f.received(1), "one byte past the credit is an overrun");
        let f = Flow::default();
        assert!(f.received(w));
        f.delivered(w / 2);
        assert!(f.received(w / 2), "what went to rsync is credit again");

        let f = Flow::default();
        assert!(!f.credited(1), "nothing was sent");
        f.sent(100);
        assert!(f.credited(60) && f.credited(40));
        assert!(!f.credited(1), "credit for bytes never sent");
    }

    #[test]
    fn the_daemon_config_has_one_chrooted_module() {
        let c = daemon_config(0xab, Path::new("/var/lib/dvk/images/kept/vpid-7"));
        assert!(c.contains("use chroot = yes\n"));
        assert!(c.contains("[img]\npath = /var/lib/dvk/images/kept/vpid-7\n"));
        assert_eq!(c.matches("path = ").count(), 1);
        assert!(c.contains("refuse options = devices specials"));
    }
}
