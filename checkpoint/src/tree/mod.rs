//! Process trees: a process and every descendant, dumped and restored together.
//!
//! Dump: the members are found and frozen parents first (a frozen process forks no more, so
//! its children listed then are final); zombies are recorded with their wait status, not
//! frozen. Objects the members share are found from /proc with `kcmp(KCMP_FILE)`, pipe and
//! socket inodes and shmem inodes: pipes and AF_UNIX stream pairs with ends in several members,
//! open file descriptions several members hold (one offset), shared anonymous memory
//! inherited across fork. Each member is then dumped as a process of its own into `DIR/<pid>/`,
//! the shared fds left out as external; `DIR/tree.img` says who is who and how they share.
//!
//! Restore: the root is spawned as a single process is; every other member is forked by its
//! restored parent while both are still in the restore stub (`clone3` with `set_tid`: the
//! same pid, the parent its parent), takes its session or process group right after, and a
//! zombie then exits with its recorded status (the SIGCHLD that leaves in the parent is taken
//! back). Pipes and pairs between members are made by the restorer, filled, and handed to every
//! holder; a description several members share is made by the first (parents first) and taken
//! by the others from it (`pidfd_getfd`); a shared anonymous mapping of a later member maps the
//! object of the first through `/proc/PID/map_files`. Every member is held until all are
//! complete, then all run (a failure kills them all).
//!
//! In steps (a move): [`FrozenTree`] freezes, writes the image, thaws or kills;
//! [`restore_held`] leaves every member complete and held ([`HeldTree`]: resumed or killed).
//! With `RestoreOptions::new_pid` every member gets a new pid (forked without `set_tid`), and a
//! process group or session that was a member's is that member's new one.

mod restore;
mod share;

pub use restore::{restore, restore_held, HeldTree};
use share::plan;

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::dump::{AfterDump, DumpOptions, DumpReport};
use crate::error::{io_at, Error, Result};
use crate::freeze::Frozen;
use crate::image;
use crate::proc::{self, proc_path, stat_fields};
use crate::sys::Pid;

/// The tree's own file in an image directory (each member's image is in `DIR/<pid>/`).
pub const TREE: &str = "tree.img";
const TREE_MAGIC: [u8; 8] = *b"DVKTREE\0";
const TREE_VERSION: u32 = 1;
/// More members than this is refused (a fork bomb is not a server).
const MAX_MEMBERS: usize = 4096;

/// One process of the tree, as it was.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Member {
    pub pid: Pid,
    /// Its parent in the tree (0 for the root).
    pub ppid: Pid,
    pub pgid: Pid,
    pub sid: Pid,
    pub comm: String,
    /// The signal its parent gets when it ends (SIGCHLD unless cloned otherwise).
    pub exit_signal: i32,
    /// A zombie not yet reaped: its wait status.
    pub zombie: Option<i32>,
    /// In a job-control stop (SIGSTOP, SIGTSTP…): restored into one.
    pub stopped: bool,
}

/// A pipe with ends in several members: made by the restorer, filled with `data`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TreePipe {
    pub ino: u64,
    pub size: u64,
    pub data: Vec<u8>,
    /// (pid, fd) of every read end and every write end.
    pub read: Vec<(Pid, i32)>,
    pub write: Vec<(Pid, i32)>,
}

/// One end of an AF_UNIX stream pair between members: what is queued for it to read, its
/// shutdown mask (1 receive, 2 send), and who holds it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PairEnd {
    pub ino: u64,
    pub data: Vec<u8>,
    pub shutdown: u8,
    pub holders: Vec<(Pid, i32)>,
}

/// An open file description several members hold: restored by `owner`, taken by `users`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SharedFd {
    pub what: String,
    pub owner: (Pid, i32),
    pub users: Vec<(Pid, i32)>,
}

/// A shared anonymous mapping of `pid` whose object `owner` (restored before) maps at
/// `owner_start..owner_end`; offsets are the mappings' offsets into the object.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SharedMap {
    pub pid: Pid,
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    pub owner: Pid,
    pub owner_start: u64,
    pub owner_end: u64,
    pub owner_offset: u64,
}

/// A memfd or a file deleted while open (`deleted`) that `pid` holds (mapped, or through a
/// description of its own) and that `owner`, restored before, holds too: `pid` opens
/// `/proc/<owner>/<handle>` ("fd/N", "map_files/A-B") instead of making one of its own.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SharedFile {
    pub pid: Pid,
    pub ino: u64,
    pub deleted: bool,
    pub owner: Pid,
    pub handle: String,
}

/// A pidfd of member `target` held by other members (one description): made by the restorer
/// once the target exists again, and handed to every holder.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TreePidfd {
    pub target: Pid,
    pub holders: Vec<(Pid, i32)>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TreeManifest {
    pub root: Pid,
    /// Parents before children (breadth first), the root first.
    pub members: Vec<Member>,
    pub pipes: Vec<TreePipe>,
    pub pairs: Vec<[PairEnd; 2]>,
    pub shared_fds: Vec<SharedFd>,
    pub shared_maps: Vec<SharedMap>,
    pub shared_files: Vec<SharedFile>,
    pub pidfds: Vec<TreePidfd>,
}

/// Children of `pid` (of any of its threads), in pid order.
pub fn children(pid: Pid) -> Vec<Pid> {
    let mut v: Vec<Pid> = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(proc_path(pid, "task")) {
        for t in tasks.flatten() {
            if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                v.extend(c.split_whitespace().filter_map(|x| x.parse::<Pid>().ok()));
            }
        }
    }
    v.sort_unstable();
    v.dedup();
    v
}

pub fn has_children(pid: Pid) -> bool {
    !children(pid).is_empty()
}

/// Is `dir` the image of a process tree?
pub fn is_tree(dir: &Path) -> bool {
    dir.join(TREE).exists()
}

fn member(pid: Pid, ppid: Pid) -> Result<Member> {
    let f = stat_fields(pid)?;
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
    // A leader whose main thread exited while others run shows Z too: not a zombie (its own
    // dump refuses it, naming why).
    let threads = proc::threads(pid).unwrap_or(1);
    let zombie = f.get(3).is_some_and(|s| s == "Z") && threads <= 1;
    Ok(Member {
        pid,
        ppid,
        pgid: n(5) as Pid,
        sid: n(6) as Pid,
        comm: proc::read_string(pid, "comm").unwrap_or_default().trim_end().to_string(),
        exit_signal: n(38) as i32,
        zombie: zombie.then(|| n(52) as i32),
        stopped: f.get(3).is_some_and(|s| s == "T"),
    })
}

/// Every process under `root` (included), breadth first.
pub fn members(root: Pid) -> Result<Vec<Member>> {
    let mut out = vec![member(root, 0)?];
    let mut i = 0;
    while i < out.len() {
        let (pid, zombie) = (out[i].pid, out[i].zombie.is_some());
        if !zombie {
            for c in children(pid) {
                // A child gone since the listing is not a member.
                if let Ok(m) = member(c, pid) {
                    out.push(m);
                }
            }
        }
        if out.len() > MAX_MEMBERS {
            return Err(Error::Unsupported {
                pid: root,
                what: format!("a process tree of more than {MAX_MEMBERS} processes"),
            });
        }
        i += 1;
    }
    Ok(out)
}

/// "the root of the tree, pid 4242 (server)", "pid 4243 (worker), child of 4242".
fn who(m: &Member) -> String {
    if m.ppid == 0 {
        format!("the root of the tree, pid {} ({})", m.pid, m.comm)
    } else {
        format!("pid {} ({}), child of {}", m.pid, m.comm, m.ppid)
    }
}

fn in_member(m: &Member, err: Error) -> Error {
    Error::InTree { who: who(m), err: Box::new(err) }
}

/// The fds the caller carries, per member: the root's (`external_fds`, and any under its pid in
/// `member_external`) and every other member's (`member_external`).
fn caller_external(members: &[Member], opts: &DumpOptions) -> HashMap<Pid, Vec<i32>> {
    let mut out: HashMap<Pid, Vec<i32>> = HashMap::new();
    for m in members {
        let mut v: Vec<i32> = if m.ppid == 0 { opts.external_fds.clone() } else { Vec::new() };
        for &fd in opts.member_external.get(&m.pid).into_iter().flatten() {
            if !v.contains(&fd) {
                v.push(fd);
            }
        }
        if !v.is_empty() {
            out.insert(m.pid, v);
        }
    }
    out
}

/// Every reason the tree under `root` cannot be dumped, each naming its member.
pub fn blockers(root: Pid, opts: &DumpOptions) -> Result<Vec<Error>> {
    let members = members(root)?;
    let caller = caller_external(&members, opts);
    let p = plan(&members, &caller, false)?;
    let mut v = p.blockers;
    for m in members.iter().filter(|m| m.zombie.is_none()) {
        let mut external = p.external.get(&m.pid).cloned().unwrap_or_default();
        external.extend(caller.get(&m.pid).into_iter().flatten());
        let allies = members.iter().map(|x| x.pid).filter(|&x| x != m.pid).collect();
        let o = DumpOptions { external_fds: external, tree: false, allies, ..opts.clone() };
        match crate::dump::process_blockers(m.pid, &o, true) {
            Ok(b) => v.extend(b.into_iter().map(|e| in_member(m, e))),
            // Gone since the listing (a server's worker that ended): no longer a member. The
            // dump lists the members again once their parents are frozen.
            Err(Error::NoProcess { .. }) if m.ppid != 0 => {}
            Err(e) if m.ppid != 0 => v.push(in_member(m, e)),
            Err(e) => return Err(e),
        }
    }
    Ok(v)
}

/// A process tree frozen (see the module doc): every member found and frozen parents first,
/// zombies recorded, not frozen. Then its image can be written (`write_image`, as often as
/// wanted: a move detaches the process's network streams in between), and the tree is thawed
/// or killed. ptrace is per tracer thread: everything here happens on the thread that froze.
/// Dropped without either, every member is thawed. The caller checks [`blockers`] first, as
/// [`dump`] does (the image still refuses what it cannot carry, the tree staying frozen).
pub struct FrozenTree {
    root: Pid,
    members: Vec<Member>,
    /// One per live member, in the order of `members`.
    frozen: Vec<Frozen>,
    frozen_at: Instant,
}

impl FrozenTree {
    /// Freezes the tree under `root`, parents first: a frozen process forks no more, so the
    /// children listed then are all.
    pub fn freeze(root: Pid) -> Result<FrozenTree> {
        let frozen_at = Instant::now();
        let mut members: Vec<Member> = vec![member(root, 0)?];
        let mut frozen: Vec<Frozen> = Vec::new();
        let mut i = 0;
        while i < members.len() {
            let m = members[i].clone();
            if m.zombie.is_none() {
                frozen.push(Frozen::freeze(m.pid).map_err(|e| in_member(&m, e))?);
                for c in children(m.pid) {
                    members.push(member(c, m.pid).map_err(|e| in_member(&m, e))?);
                }
            }
            if members.len() > MAX_MEMBERS {
                return Err(Error::Unsupported {
                    pid: root,
                    what: format!("a process tree of more than {MAX_MEMBERS} processes"),
                });
            }
            i += 1;
        }
        Ok(FrozenTree { root, members, frozen, frozen_at })
    }

    pub fn root(&self) -> Pid {
        self.root
    }

    /// Every member, parents first (the root first), zombies included.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// When the freeze began.
    pub fn frozen_at(&self) -> Instant {
        self.frozen_at
    }

    /// With `on`, every frozen member is killed if this tracer exits before it is thawed
    /// (see [`Frozen::set_exit_kill`]).
    pub fn set_exit_kill(&mut self, on: bool) -> Result<()> {
        let live = self.members.iter().filter(|m| m.zombie.is_none());
        for (m, f) in live.zip(self.frozen.iter_mut()) {
            f.set_exit_kill(on).map_err(|e| in_member(m, e))?;
        }
        Ok(())
    }

    /// Writes the tree's image into `dir` (what [`dump`] does once the tree is frozen): what
    /// the members share, each live member's image in `DIR/<pid>/`, then `tree.img`. The tree
    /// stays frozen, whatever the outcome (a failure removes what was written). The report's
    /// phases are the share plan's, the members' (summed) and the tree file's; `frozen` is
    /// the time since the freeze.
    pub fn write_image(&mut self, dir: &Path, opts: &DumpOptions) -> Result<DumpReport> {
        let start = Instant::now();
        refuse_elsewhere(self.root, opts)?;
        image::create_dir(dir)?;
        remove_tree_image(dir);
        let mut clk = crate::dump::Clock { last: start, phases: Vec::new() };
        let mut rep = self.write_members(dir, opts, &mut clk)?;
        rep.phases = clk.phases;
        rep.total = start.elapsed();
        rep.frozen = self.frozen_at.elapsed();
        Ok(rep)
    }

    /// The image of the frozen tree, its phases added to `clk` (the tree file's last).
    fn write_members(&mut self, dir: &Path, opts: &DumpOptions, clk: &mut crate::dump::Clock) -> Result<DumpReport> {
        let root = self.root;
        let members = &self.members;
        let frozen = &mut self.frozen;
        type Written = (Vec<(&'static str, std::time::Duration)>, u64, u64, usize, usize);
        let written = (|| -> Result<Written> {
            let t0 = Instant::now();
            let caller = caller_external(members, opts);
            let p = plan(members, &caller, true)?;
            if let Some(e) = p.blockers.into_iter().next() {
                return Err(e);
            }
            let mut phases = vec![("share", t0.elapsed())];
            let (mut pages, mut manifest, mut vmas, mut fds) = (0, 0, 0, 0);
            // SysV semaphore sets and message queues are stored once, by the first member seen
            // using them (parents first: the first restored, which makes them).
            let (mut sems, mut msgs): (Vec<i32>, Vec<i32>) = Default::default();
            for (m, f) in members.iter().filter(|m| m.zombie.is_none()).zip(frozen.iter_mut()) {
                let mut external = p.external.get(&m.pid).cloned().unwrap_or_default();
                external.extend(caller.get(&m.pid).into_iter().flatten());
                let allies = members.iter().map(|x| x.pid).filter(|&x| x != m.pid).collect();
                // Shared anonymous memory is stored once, in its owner's image.
                let borrowed_maps =
                    p.tree.shared_maps.iter().filter(|s| s.pid == m.pid).map(|s| (s.start, s.end)).collect();
                let o = DumpOptions {
                    external_fds: external,
                    tree: false,
                    allies,
                    borrowed_maps,
                    borrowed_sems: sems.clone(),
                    borrowed_msgs: msgs.clone(),
                    ..opts.clone()
                };
                let (s, q) = crate::sysv::seen_ids(m.pid);
                let r = crate::dump::write_image(f, &dir.join(m.pid.to_string()), &o).map_err(|e| in_member(m, e))?;
                sems.extend(s.into_iter().filter(|id| !sems.contains(id)).collect::<Vec<_>>());
                msgs.extend(q.into_iter().filter(|id| !msgs.contains(id)).collect::<Vec<_>>());
                add_phases(&mut phases, &r.phases);
                pages += r.pages_bytes;
                manifest += r.manifest_bytes;
                vmas += r.vmas;
                fds += r.fds;
            }
            let mut t = p.tree;
            t.root = root;
            t.members = members.clone();
            let bytes = image::encode_payload(&TREE_MAGIC, TREE_VERSION, &t, TREE)?;
            let path = dir.join(TREE);
            let mut out = image::create_file(&path)?;
            std::io::Write::write_all(&mut out, &bytes).map_err(io_at(&path))?;
            crate::dump::check_interrupted(root, opts)?;
            Ok((phases, pages, manifest + bytes.len() as u64, vmas, fds))
        })();
        let (phases, pages_bytes, manifest_bytes, vmas, fds) = match written {
            Ok(v) => v,
            Err(e) => {
                remove_tree_image(dir);
                return Err(e);
            }
        };
        // The members' phases, summed (one member after the other), then the tree file.
        let members_time: std::time::Duration = phases.iter().map(|p| p.1).sum();
        clk.phases.extend(phases);
        clk.lap("tree");
        if let Some(t) = clk.phases.last_mut() {
            t.1 = t.1.saturating_sub(members_time);
        }
        Ok(DumpReport {
            pid: root,
            pages_bytes,
            manifest_bytes,
            vmas,
            fds,
            tree: self.members.iter().map(|m| m.pid).collect(),
            ..Default::default()
        })
    }

    /// Lets every member run on as it was, children first (a parent never runs before its
    /// children are back).
    pub fn thaw(self) -> Result<()> {
        self.thaw_with(false)
    }

    /// [`FrozenTree::thaw`]; `stop`: each member detached into a job-control stop.
    pub fn thaw_with(self, stop: bool) -> Result<()> {
        for f in self.frozen.into_iter().rev() {
            f.thaw(stop)?;
        }
        Ok(())
    }

    /// Kills every member, leaves first, each reaped by its parent (see `kill_tree`); the root
    /// is left to its own parent.
    pub fn kill(self) -> Result<()> {
        kill_tree(&self.members, self.frozen)
    }
}

/// Each member writes its own pages.img: one page stream or pre-copy store cannot serve them.
fn refuse_elsewhere(root: Pid, opts: &DumpOptions) -> Result<()> {
    if opts.pages_to.is_some() || opts.precopy.is_some() {
        return Err(Error::Unsupported {
            pid: root,
            what: "a process tree whose pages go elsewhere than the image directory (a move: not yet)".into(),
        });
    }
    Ok(())
}

/// Dumps the tree under `root` into `dir` (see the module doc): [`FrozenTree::freeze`],
/// [`FrozenTree::write_image`], then thawed or killed as `after` says.
pub fn dump(root: Pid, dir: &Path, after: AfterDump, opts: &DumpOptions) -> Result<DumpReport> {
    refuse_elsewhere(root, opts)?;
    let start = Instant::now();
    let mut clk = crate::dump::Clock { last: start, phases: Vec::new() };
    if let Some(e) = blockers(root, opts)?.into_iter().next() {
        return Err(e);
    }
    image::create_dir(dir)?;
    remove_tree_image(dir);
    clk.lap("check");

    let mut tree = FrozenTree::freeze(root)?;
    clk.lap("freeze");
    // On failure every `Frozen` thaws its process as the tree is dropped.
    let rep = tree.write_members(dir, opts, &mut clk)?;
    let frozen_at = tree.frozen_at;
    let mut frozen_time = frozen_at.elapsed();
    match after {
        AfterDump::Kill => tree.kill()?,
        _ => tree.thaw_with(after == AfterDump::LeaveStopped)?,
    }
    if after != AfterDump::Kill {
        frozen_time = frozen_at.elapsed();
    }
    clk.lap(if after == AfterDump::Kill { "kill" } else { "thaw" });
    Ok(DumpReport { phases: clk.phases, frozen: frozen_time, total: start.elapsed(), ..rep })
}

/// Kills every member, leaves first, each reaped by its parent (a `wait4` injected there while
/// that one is still frozen), zombies too: their pids are free again at once for the restore
/// (an orphan would wait for init, which does not always reap). The root is left to its own
/// parent.
fn kill_tree(members: &[Member], frozen: Vec<Frozen>) -> Result<()> {
    let mut frozen: HashMap<Pid, Frozen> =
        members.iter().filter(|m| m.zombie.is_none()).map(|m| m.pid).zip(frozen).collect();
    for m in members.iter().skip(1).rev() {
        if let Some(f) = frozen.remove(&m.pid) {
            f.kill()?;
        }
        let parent = frozen.get_mut(&m.ppid).expect("parents are live members");
        let maps = proc::maps(parent.pid)?;
        let at = crate::dump::gadget_address(parent.pid, &maps)?;
        let r = parent.remote(at)?;
        let mut reaped = false;
        for _ in 0..1000 {
            let got = r.raw(libc::SYS_wait4, &[m.pid as u64, 0, (libc::WNOHANG | libc::__WALL) as u64, 0])?;
            if got == m.pid as i64 {
                reaped = true;
                break;
            }
            if got != 0 {
                break;
            }
            // Not yet handed over to its parent (bounded: 1 s).
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if !reaped {
            return Err(Error::InTree {
                who: who(m),
                err: Box::new(Error::Restore("killed, but its parent could not reap it".into())),
            });
        }
    }
    for (_, f) in frozen {
        f.kill()?;
    }
    Ok(())
}

/// Adds the durations of `p` to those of the same phase in `sum` (new phases at the end).
pub(super) fn add_phases(
    sum: &mut Vec<(&'static str, std::time::Duration)>,
    p: &[(&'static str, std::time::Duration)],
) {
    for (n, d) in p {
        match sum.iter_mut().find(|(m, _)| m == n) {
            Some(x) => x.1 += *d,
            None => sum.push((n, *d)),
        }
    }
}

/// Removes a tree image (tree.img and the members' directories' image files) from `dir`.
fn remove_tree_image(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(TREE));
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let is_member = e.file_name().to_str().is_some_and(|n| n.parse::<Pid>().is_ok());
        if is_member && e.file_type().is_ok_and(|t| t.is_dir() && !t.is_symlink()) {
            crate::dump::remove_image(&e.path());
        }
    }
}

fn read_tree(dir: &Path) -> Result<TreeManifest> {
    let path = dir.join(TREE);
    let b = image::read_image_file(&path, image::MAX_MANIFEST)?;
    let t: TreeManifest = image::decode_payload(&TREE_MAGIC, TREE_VERSION, &b, &path)?;
    let bad = |why: &str| Error::Decode { path: path.clone(), msg: why.to_string() };
    // Parents before children, each parent a live member: the restore order relies on it.
    if t.members.first().map(|m| (m.pid, m.ppid)) != Some((t.root, 0)) {
        return Err(bad("the root is not the first member"));
    }
    for (i, m) in t.members.iter().enumerate().skip(1) {
        if !t.members[..i].iter().any(|p| p.pid == m.ppid && p.zombie.is_none()) {
            return Err(bad(&format!("member {} comes before its parent {}", m.pid, m.ppid)));
        }
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys;
    use std::path::PathBuf;

    fn m(pid: Pid, ppid: Pid, zombie: Option<i32>) -> Member {
        Member { pid, ppid, pgid: pid, sid: pid, comm: "x".into(), exit_signal: libc::SIGCHLD, zombie, stopped: false }
    }

    fn write(dir: &Path, t: &TreeManifest) -> PathBuf {
        let b = image::encode_payload(&TREE_MAGIC, TREE_VERSION, t, TREE).unwrap();
        let path = dir.join(TREE);
        let _ = std::fs::remove_file(&path);
        std::fs::write(&path, b).unwrap();
        path
    }

    #[test]
    fn tree_image_round_trip_and_checks() {
        let d = tempfile::tempdir().unwrap();
        let mut t = TreeManifest {
            root: 10,
            members: vec![m(10, 0, None), m(11, 10, None), m(12, 11, Some(42 << 8))],
            pipes: vec![TreePipe {
                ino: 5,
                size: 65536,
                data: b"abc".to_vec(),
                read: vec![(11, 3)],
                write: vec![(10, 4)],
            }],
            ..Default::default()
        };
        let path = write(d.path(), &t);
        assert!(is_tree(d.path()));
        assert_eq!(read_tree(d.path()).unwrap(), t);

        // A flipped payload byte: the checksum says so.
        let mut b = std::fs::read(&path).unwrap();
        let last = b.len() - 1;
        b[last] ^= 1;
        std::fs::write(&path, &b).unwrap();
        assert!(matches!(read_tree(d.path()), Err(Error::Checksum { .. })));

        // A single-process manifest is not a tree image.
        let mut b = std::fs::read(&path).unwrap();
        b[..8].copy_from_slice(&image::MAGIC);
        std::fs::write(&path, &b).unwrap();
        assert!(matches!(read_tree(d.path()), Err(Error::BadMagic { .. })));

        // A member before its parent, or under a zombie, would break the restore order.
        t.members.swap(1, 2);
        write(d.path(), &t);
        assert!(matches!(read_tree(d.path()), Err(Error::Decode { msg, .. }) if msg.contains("before its parent")));
        t.members = vec![m(10, 0, None), m(11, 10, Some(0)), m(12, 11, None)];
        write(d.path(), &t);
        assert!(matches!(read_tree(d.path()), Err(Error::Decode { .. })));
        t.members = vec![m(11, 10, None), m(10, 0, None)];
        write(d.path(), &t);
        assert!(matches!(read_tree(d.path()), Err(Error::Decode { msg, .. }) if msg.contains("root")));
    }

    #[test]
    fn members_are_named() {
        assert_eq!(who(&m(10, 0, None)), "the root of the tree, pid 10 (x)");
        let e = in_member(&m(11, 10, None), Error::Unsupported { pid: 11, what: "y".into() });
        assert_eq!(e.to_string(), "pid 11 (x), child of 10: process 11: y cannot be moved");
    }

    /// A live tree of three levels (sh → sleep, sh → sleep), found parents first.
    #[test]
    fn members_are_found_parents_first() {
        let _g = crate::FORK_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let mut c = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sh -c 'sleep 30; :' & wait"])
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let sh = c.id() as Pid;
        let mut found = Vec::new();
        let leaves = |f: &[Member]| f.iter().filter(|m| m.comm == "sleep").count();
        for _ in 0..5000 {
            found = members(sh).unwrap();
            if found.len() == 4 && leaves(&found) == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // Leaves first: each shell reaps its own and ends, the root is ours.
        for m in found.iter().filter(|m| m.comm == "sleep") {
            let _ = sys::kill(m.pid, libc::SIGKILL);
        }
        let _ = c.wait();
        assert_eq!(found.len(), 4, "{found:?}");
        assert_eq!((found[0].pid, found[0].ppid), (sh, 0));
        for (i, m) in found.iter().enumerate().skip(1) {
            let parent = found.iter().position(|p| p.pid == m.ppid).expect("parent is a member");
            assert!(parent < i, "{found:?}");
            assert!(m.zombie.is_none());
        }
        assert!(found.iter().any(|m| m.ppid != sh && m.comm == "sleep"), "a grandchild: {found:?}");
    }
}
