//! The restore of a process tree (see the module doc of `tree`): every member in the stub,
//! forked by its parent, its session and group, zombies ended; then each one completed with
//! what it shares, all held, then released.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::share::getfd;
use super::{add_phases, in_member, read_tree, Member, TreeManifest};
use crate::error::{io_at, Error, Result};
use crate::image;
use crate::inject::Remote;
use crate::rebuild::{self, FromTree, Laps, RestoreOptions, RestoreReport};
use crate::sys::{self, Pid};

/// The session and process group of a new member (forked by its restored parent, whose own it
/// has): its own session, its own group, or another member's group.
/// `new_pid`: the members restored so far, (pid in the image → pid now): another member's
/// group is the group of that member's pid now.
fn set_session(r: &Remote, m: &Member, parent: &Member, new_pid: &HashMap<Pid, Pid>) -> Result<()> {
    if m.sid == m.pid {
        r.call("setsid", libc::SYS_setsid, &[])?;
    } else if m.pgid != parent.pgid {
        let g = if m.pgid == m.pid { 0 } else { new_pid.get(&m.pgid).copied().unwrap_or(m.pgid) };
        r.call(&format!("setpgid(0, {g})"), libc::SYS_setpgid, &[0, g as u64])?;
    }
    Ok(())
}

/// Takes back the SIGCHLD a zombie's exit just queued in its (stub) parent: the original had
/// had it delivered already (one still pending is in the parent's image, queued again later).
fn take_back_sigchld(r: &Remote) -> Result<()> {
    let set = 1u64 << (libc::SIGCHLD - 1);
    let mut b = set.to_le_bytes().to_vec();
    b.extend_from_slice(&[0u8; 16]); // timespec {0, 0}: do not wait
    let a = r.put(0, &b)?;
    for _ in 0..4 {
        if r.raw(libc::SYS_rt_sigtimedwait, &[a, 0, a + 8, 8])? != libc::SIGCHLD as i64 {
            break;
        }
    }
    Ok(())
}

/// The restorer's copies of the pipes, pairs and pidfds the tree carries: (pid, fd) → its fd.
fn make_pipes_and_pairs(
    t: &TreeManifest,
    new_pid: &HashMap<Pid, Pid>,
    keep: &mut Vec<OwnedFd>,
) -> Result<HashMap<(Pid, i32), i32>> {
    let mut out = HashMap::new();
    // Every member exists again (in the stub, or a zombie): a pidfd of it is its pidfd.
    for p in &t.pidfds {
        let pid = new_pid[&p.target];
        let fd = sys::pidfd_open(pid).map_err(|err| Error::NoProcess { pid, err })?;
        for &h in &p.holders {
            out.insert(h, fd.as_raw_fd());
        }
        keep.push(fd);
    }
    for p in &t.pipes {
        let what = || format!("pipe:[{}]", p.ino);
        let (r, w) = std::io::pipe().map_err(io_at(what()))?;
        let (r, mut w) = (OwnedFd::from(r), std::fs::File::from(OwnedFd::from(w)));
        if p.size != 65536 {
            sys::set_pipe_size(&w, p.size as usize).map_err(io_at(what()))?;
        }
        if p.data.len() as u64 > p.size.max(65536) {
            return Err(Error::Restore(format!("{}: {} unread bytes do not fit the pipe", what(), p.data.len())));
        }
        std::io::Write::write_all(&mut w, &p.data).map_err(io_at(what()))?;
        for &h in &p.read {
            out.insert(h, r.as_raw_fd());
        }
        for &h in &p.write {
            out.insert(h, w.as_raw_fd());
        }
        keep.push(r);
        keep.push(OwnedFd::from(w));
    }
    for [a, b] in &t.pairs {
        let what = || format!("socket:[{}]", a.ino);
        let (sa, sb) = std::os::unix::net::UnixStream::pair().map_err(io_at(what()))?;
        for (end, other) in [(&sa, &b), (&sb, &a)] {
            // What the other end reads is written by this one (never waiting).
            end.set_nonblocking(true).map_err(io_at(what()))?;
            if !other.data.is_empty() {
                let size = (2 * other.data.len() + (256 << 10)).min(i32::MAX as usize) as i32;
                sys::set_sndbuf_force(end, size).map_err(io_at(what()))?;
                std::io::Write::write_all(&mut &*end, &other.data).map_err(io_at(what()))?;
            }
        }
        for (end, e) in [(&sa, &a), (&sb, &b)] {
            if e.shutdown & 2 != 0 {
                end.shutdown(std::net::Shutdown::Write).map_err(io_at(what()))?;
            }
            if e.shutdown & 1 != 0 {
                end.shutdown(std::net::Shutdown::Read).map_err(io_at(what()))?;
            }
        }
        for (end, e) in [(&sa, &a), (&sb, &b)] {
            for &h in &e.holders {
                out.insert(h, end.as_raw_fd());
            }
        }
        keep.push(OwnedFd::from(sa));
        keep.push(OwnedFd::from(sb));
    }
    Ok(out)
}

/// A restored tree, every member complete and held in a ptrace stop (see [`rebuild::Held`]):
/// none has run. Only the thread that restored it may resume or kill it; dropped without
/// either, every member is killed.
pub struct HeldTree {
    /// Per member, in member order (parents first): its hold and whether it goes back into a
    /// job-control stop; None for a zombie, or once let go.
    held: Vec<Option<(rebuild::Held, bool)>>,
    /// Per member: its parent's index (None for the root).
    parent: Vec<Option<usize>>,
    /// (pid in the image, pid now) of every member, in member order, zombies included.
    pids: Vec<(Pid, Pid)>,
    stopped: bool,
}

impl HeldTree {
    /// (pid in the image → pid now) of every member, in member order (the root first),
    /// zombies included.
    pub fn pids(&self) -> &[(Pid, Pid)] {
        &self.pids
    }

    /// Lets every member run, children first; those that were in a job-control stop (or all,
    /// with `RestoreOptions::stopped`) go back into one (their parent is told again, as after
    /// a new SIGSTOP). A failure kills the members not yet let run.
    pub fn resume(mut self) -> Result<()> {
        for i in (0..self.held.len()).rev() {
            if let Some((h, stopped)) = self.held[i].take() {
                h.release(self.stopped || stopped)?;
            }
        }
        Ok(())
    }

    /// Kills every member, children first (none has run), each killed child and each zombie
    /// reaped by its still-held parent (an injected `wait4`), so none is left behind for
    /// whoever reaps orphans; the root is collected by us, its parent.
    pub fn kill(mut self) -> Result<()> {
        self.kill_all();
        Ok(())
    }

    fn kill_all(&mut self) {
        for i in (0..self.held.len()).rev() {
            if let Some((h, _)) = self.held[i].take() {
                let _ = h.kill();
            }
            let parent = self.parent[i].and_then(|p| self.held[p].as_ref());
            if let Some((p, _)) = parent {
                // Best effort: a parent that cannot take the call leaves it to the reaper.
                let _ = p.reap_child(self.pids[i].1);
            }
        }
    }
}

impl Drop for HeldTree {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Restores the tree imaged in `dir` (see the module doc): [`restore_held`], then every member
/// released. The report is the root's, with every member in `tree`.
pub fn restore(dir: &Path, opts: &RestoreOptions) -> Result<RestoreReport> {
    let (mut rep, held) = restore_held(dir, opts)?;
    let t = std::time::Instant::now();
    held.resume()?;
    let d = t.elapsed();
    rep.phases.push(("release", d));
    rep.total += d;
    Ok(rep)
}

/// Restores the tree imaged in `dir` (see the module doc), every member complete and held: see
/// [`HeldTree`]. The report is the root's, with every member's pid now in `tree` (member
/// order). With `opts.new_pid` every member gets a new pid (the originals may still hold
/// theirs): each is forked by its restored parent without `set_tid`, and a process group or
/// session that was a member's is that member's new one.
pub fn restore_held(dir: &Path, opts: &RestoreOptions) -> Result<(RestoreReport, HeldTree)> {
    let mut laps = Laps::new();
    let t = read_tree(dir)?;
    let mut imgs: HashMap<Pid, image::Image> = HashMap::new();
    for m in t.members.iter().filter(|m| m.zombie.is_none()) {
        let img = image::read(&dir.join(m.pid.to_string())).map_err(|e| in_member(m, e))?;
        if img.manifest.pid != m.pid {
            return Err(in_member(m, Error::Restore("its image is another process's".into())));
        }
        imgs.insert(m.pid, img);
    }
    laps.lap("read");
    let external_of = |m: &Member, with: &dyn Fn(Pid, i32) -> Option<i32>| -> Vec<(i32, i32)> {
        let mut v: Vec<(i32, i32)> = Vec::new();
        let mut add = |fd: i32| {
            if let Some(l) = with(m.pid, fd) {
                v.push((fd, l));
            }
        };
        for p in &t.pipes {
            p.read.iter().chain(&p.write).filter(|h| h.0 == m.pid).for_each(|h| add(h.1));
        }
        for e in t.pairs.iter().flatten() {
            e.holders.iter().filter(|h| h.0 == m.pid).for_each(|h| add(h.1));
        }
        for s in &t.shared_fds {
            s.users.iter().filter(|h| h.0 == m.pid).for_each(|h| add(h.1));
        }
        for p in &t.pidfds {
            p.holders.iter().filter(|h| h.0 == m.pid).for_each(|h| add(h.1));
        }
        if m.ppid == 0 {
            v.extend(&opts.external_fds);
        }
        // Another member's fds the caller carries (the root's may be named there too).
        for &(pid, fd, theirs) in &opts.member_external {
            if pid == m.pid && !v.iter().any(|y| y.0 == fd) {
                v.push((fd, theirs));
            }
        }
        v
    };
    // Everything that can be refused before a process exists (external fds: stand-ins).
    for m in t.members.iter().filter(|m| m.zombie.is_none()) {
        let o = RestoreOptions { external_fds: external_of(m, &|_, _| Some(-1)), ..opts.clone() };
        rebuild::check(&imgs[&m.pid], &o).map_err(|e| in_member(m, e))?;
    }
    laps.lap("check");

    // Every process, parents first, in the stub: forked by its parent, then its session.
    let root = &t.members[0];
    let mut stubs: Vec<Option<rebuild::Stub>> = (0..t.members.len()).map(|_| None).collect();
    let s = rebuild::spawn(&imgs[&root.pid], opts).map_err(|e| in_member(root, e))?;
    let task = &imgs[&root.pid].manifest.task;
    crate::task::restore_early(&s.r, task)?;
    crate::task::restore_session(&s.r, task)?;
    let mut new_pid: HashMap<Pid, Pid> = HashMap::from([(root.pid, s.r.pid)]);

    stubs[0] = Some(s);
    let mut notes = Vec::new();
    for i in 0..t.members.len() {
        let m = &t.members[i];
        if m.zombie.is_some() {
            continue;
        }
        let mut zombies = false;
        let kids: Vec<(usize, &Member)> = t.members.iter().enumerate().filter(|(_, c)| c.ppid == m.pid).collect();
        for (j, c) in kids {
            let parent = &stubs[i].as_ref().expect("parents first").r;
            let want = if opts.new_pid { None } else { Some(c.pid) };
            let s = rebuild::fork_stub(parent, want, c.exit_signal).map_err(|e| in_member(c, e))?;
            new_pid.insert(c.pid, s.r.pid);
            set_session(&s.r, c, m, &new_pid).map_err(|e| in_member(c, e))?;
            match c.zombie {
                Some(status) => {
                    s.die_as(status).map_err(|e| in_member(c, e))?;
                    zombies = true;
                }
                None => {
                    let task = &imgs[&c.pid].manifest.task;
                    notes.extend(crate::task::restore_cgroup(s.r.pid, task));
                    crate::task::restore_early(&s.r, task).map_err(|e| in_member(c, e))?;
                    stubs[j] = Some(s);
                }
            }
        }
        if zombies {
            take_back_sigchld(&stubs[i].as_ref().expect("parents first").r)?;
        }
    }
    laps.lap("fork");

    // Then each one complete, parents first (the first holder of a shared object makes it),
    // held until all are.
    let mut keep: Vec<OwnedFd> = Vec::new();
    let made = make_pipes_and_pairs(&t, &new_pid, &mut keep)?;
    let mut held = Vec::new();
    let mut root_rep = None;
    let mut member_phases = Vec::new();
    // SysV segments: found or made by the first member that has one attached; semaphore sets
    // and message queues by the first member seen using them.
    let mut shm_made: HashSet<i32> = HashSet::new();
    let (mut sem_made, mut msg_made): (HashSet<i32>, HashSet<i32>) = Default::default();
    for (i, m) in t.members.iter().enumerate() {
        let Some(stub) = stubs[i].take() else { continue };
        let img = &imgs[&m.pid];
        let mut taken: HashMap<(Pid, i32), i32> = HashMap::new();
        for s in t.shared_fds.iter().filter(|s| s.users.iter().any(|u| u.0 == m.pid)) {
            let owner = new_pid[&s.owner.0];
            let fd = getfd(owner, s.owner.1).map_err(|e| in_member(m, e))?;
            for u in s.users.iter().filter(|u| u.0 == m.pid) {
                taken.insert(*u, fd.as_raw_fd());
            }
            keep.push(fd);
        }
        let with = |pid: Pid, fd: i32| made.get(&(pid, fd)).or(taken.get(&(pid, fd))).copied();
        let mut from = FromTree::default();
        for s in t.shared_maps.iter().filter(|s| s.pid == m.pid) {
            let path =
                PathBuf::from(format!("/proc/{}/map_files/{:x}-{:x}", new_pid[&s.owner], s.owner_start, s.owner_end));
            from.maps.insert((s.start, s.end), (path, s.offset - s.owner_offset));
        }
        for s in t.shared_files.iter().filter(|s| s.pid == m.pid) {
            let path = PathBuf::from(format!("/proc/{}/{}", new_pid[&s.owner], s.handle));
            if s.deleted {
                from.ghosts.insert(s.ino, path); // opened inside the new process, as its own are made
                continue;
            }
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .or_else(|_| std::fs::File::open(&path))
                .map_err(|e| in_member(m, Error::Io { path: path.clone(), err: e }))?;
            from.memfds.insert(s.ino, OwnedFd::from(f));
        }
        from.shm = img.manifest.shm.iter().map(|s| s.id).filter(|id| shm_made.contains(id)).collect();
        shm_made.extend(img.manifest.shm.iter().map(|s| s.id));
        from.sem = img.manifest.sem.iter().map(|s| s.id).filter(|id| sem_made.contains(id)).collect();
        sem_made.extend(img.manifest.sem.iter().map(|s| s.id));
        from.msg = img.manifest.msg.iter().map(|q| q.id).filter(|id| msg_made.contains(id)).collect();
        msg_made.extend(img.manifest.msg.iter().map(|q| q.id));
        let o = RestoreOptions {
            external_fds: external_of(m, &with),
            new_pid: opts.new_pid,
            stopped: opts.stopped,
            ..Default::default()
        };
        let (rep, h) = rebuild::complete(stub, img, &o, &from, true, Laps::new()).map_err(|e| in_member(m, e))?;
        held.push((h.expect("held"), m.stopped));
        add_phases(&mut member_phases, &rep.phases);
        if m.ppid == 0 {
            root_rep = Some(rep);
        }
    }
    drop(keep);
    // The members' phases, summed (one member after the other), and the rest of that time:
    // the shared objects (pipes, pairs, descriptions, memfds) made or taken here.
    laps.lap("members");
    let loop_time = laps.phases.pop().map(|p| p.1).unwrap_or_default();
    let members_time: std::time::Duration = member_phases.iter().map(|p| p.1).sum();
    laps.phases.push(("share", loop_time.saturating_sub(members_time)));
    laps.phases.extend(member_phases);
    // All complete: held until the caller lets them run (`HeldTree::resume`).
    let mut held = held.into_iter();
    let held = HeldTree {
        held: t.members.iter().map(|m| if m.zombie.is_none() { held.next() } else { None }).collect(),
        parent: t.members.iter().map(|m| t.members.iter().position(|p| p.pid == m.ppid && m.ppid != 0)).collect(),
        pids: t.members.iter().map(|m| (m.pid, new_pid[&m.pid])).collect(),
        stopped: opts.stopped,
    };
    let mut rep = root_rep.expect("the root is live");
    rep.notes.extend(notes);
    rep.phases = laps.phases;
    rep.total = laps.start.elapsed();
    rep.pages_bytes = imgs.values().map(|i| i.manifest.pages_len).sum();
    rep.tree = t.members.iter().map(|m| new_pid[&m.pid]).collect();
    Ok((rep, held))
}
