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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::dump::{AfterDump, DumpOptions, DumpReport};
use crate::error::{io_at, pt, Error, Result};
use crate::freeze::Frozen;
use crate::image;
use crate::inject::Remote;
use crate::proc::{self, proc_path, stat_fields};
use crate::rebuild::{self, FromTree, Laps, RestoreOptions, RestoreReport};
use crate::sys::{self, Pid};

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

/// What the members share, and what of it cannot be carried.
#[derive(Default)]
struct Plan {
    tree: TreeManifest,
    /// Per member: the fds the tree carries (left out of the member's own image).
    external: HashMap<Pid, Vec<i32>>,
    blockers: Vec<Error>,
}

fn is_shared_anon(l: &proc::MapLine) -> bool {
    l.shared() && (l.path == "/dev/zero (deleted)" || l.path.starts_with("[anon_shmem:")) && l.inode != 0
}

/// Finds what the members share (`data`: also copies the unread bytes of pipes and pairs — on
/// a frozen tree).
fn plan(members: &[Member], root_external: &[i32], data: bool) -> Result<Plan> {
    let mut p = Plan::default();
    let live: Vec<&Member> = members.iter().filter(|m| m.zombie.is_none()).collect();
    let by_pid: HashMap<Pid, &Member> = members.iter().map(|m| (m.pid, m)).collect();
    let ext = |p: &mut Plan, pid: Pid, fd: i32| p.external.entry(pid).or_default().push(fd);

    // Every fd of every member: (pid, fd, link, fdinfo flags).
    let mut fds: Vec<(Pid, i32, String, u32)> = Vec::new();
    for m in &live {
        // Unreadable (a process whose main thread exited): its own blockers say why.
        let Ok(list) = crate::files::list_fds(m.pid) else { continue };
        for fd in list {
            if m.ppid == 0 && root_external.contains(&fd) {
                continue;
            }
            let Ok(link) = std::fs::read_link(proc_path(m.pid, &format!("fd/{fd}"))) else { continue };
            let info = std::fs::read_to_string(proc_path(m.pid, &format!("fdinfo/{fd}"))).unwrap_or_default();
            let flags = proc::field(&info, "flags").and_then(|v| u32::from_str_radix(v, 8).ok()).unwrap_or(0);
            fds.push((m.pid, fd, link.to_string_lossy().into_owned(), flags));
        }
    }
    let pids_of = |v: &[(Pid, i32)]| v.iter().map(|x| x.0).collect::<HashSet<Pid>>();
    let mut carried: HashSet<String> = HashSet::new(); // links the tree carries

    // Pipes with ends in several members.
    // Per pipe inode: (read ends, write ends).
    type Ends = (Vec<(Pid, i32)>, Vec<(Pid, i32)>);
    let mut pipes: BTreeMap<u64, Ends> = BTreeMap::new();
    for (pid, fd, link, flags) in &fds {
        if let Some(ino) = link.strip_prefix("pipe:[").and_then(|s| s.strip_suffix(']')).and_then(|s| s.parse().ok()) {
            let e = pipes.entry(ino).or_default();
            if flags & libc::O_ACCMODE as u32 == libc::O_WRONLY as u32 {
                e.1.push((*pid, *fd));
            } else {
                e.0.push((*pid, *fd));
            }
        }
    }
    for (ino, (read, write)) in pipes {
        let all: Vec<(Pid, i32)> = read.iter().chain(&write).copied().collect();
        if pids_of(&all).len() < 2 {
            continue; // within one process: its own image carries it
        }
        for end in [&read, &write] {
            if let Some(&(p0, f0)) = end.first() {
                if let Some(&(pid, fd)) =
                    end.iter().find(|(pi, fi)| !sys::kcmp_file_of(p0, f0, *pi, *fi).unwrap_or(false))
                {
                    p.blockers.push(in_member(
                        by_pid[&pid],
                        Error::UnsupportedFd {
                            fd,
                            what: format!("pipe:[{ino}]"),
                            why: "the pipe was reopened through /proc (several descriptions of one end)".into(),
                        },
                    ));
                }
            }
        }
        let (mut size, mut bytes) = (65536, Vec::new());
        if data {
            if let Some(&(pid, fd)) = read.first().or(write.first()) {
                let dup = getfd(pid, fd)?;
                size = sys::pipe_size(&dup).map_err(io_at(format!("pipe:[{ino}]")))? as u64;
                if !read.is_empty() {
                    bytes = sys::pipe_peek(&dup, size as usize).map_err(io_at(format!("pipe:[{ino}]")))?;
                }
            }
        }
        for &(pid, fd) in &all {
            ext(&mut p, pid, fd);
        }
        carried.insert(format!("pipe:[{ino}]"));
        p.tree.pipes.push(TreePipe { ino, size, data: bytes, read, write });
    }

    // AF_UNIX stream pairs with ends in several members.
    let mut socks: BTreeMap<u64, Vec<(Pid, i32)>> = BTreeMap::new();
    for (pid, fd, link, _) in &fds {
        if let Some(ino) = link.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')).and_then(|s| s.parse().ok())
        {
            socks.entry(ino).or_default().push((*pid, *fd));
        }
    }
    let mut paired: HashSet<u64> = HashSet::new();
    for (&ino, holders) in &socks {
        if paired.contains(&ino) {
            continue;
        }
        let Ok(d) = sys::unix_diag(ino as u32) else { continue };
        let peer = d.peer as u64;
        if d.sock_type != libc::SOCK_STREAM as u8 || peer == 0 {
            continue;
        }
        // A peer outside the tree: the member's own dump refuses it, naming who holds it.
        let Some(peer_holders) = socks.get(&peer) else { continue };
        let both: Vec<(Pid, i32)> = holders.iter().chain(peer_holders).copied().collect();
        if pids_of(&both).len() < 2 {
            continue;
        }
        paired.insert(ino);
        paired.insert(peer);
        let mut ends = Vec::new();
        for (i, h) in [(ino, holders), (peer, peer_holders)] {
            let shutdown = sys::unix_diag(i as u32).map(|d| d.shutdown).unwrap_or(0);
            let bytes = if data {
                let dup = getfd(h[0].0, h[0].1)?;
                sys::sock_peek(&dup, 4 << 20).map_err(io_at(format!("socket:[{i}]")))?
            } else {
                Vec::new()
            };
            for &(pid, fd) in h {
                ext(&mut p, pid, fd);
            }
            carried.insert(format!("socket:[{i}]"));
            ends.push(PairEnd { ino: i, data: bytes, shutdown, holders: h.clone() });
        }
        let b = ends.pop().unwrap();
        let a = ends.pop().unwrap();
        p.tree.pairs.push([a, b]);
    }

    // pidfds of other members (the process's own and dead ones: its own image carries them).
    let mut pidfd_groups: Vec<TreePidfd> = Vec::new();
    let mut pidfd_fds: HashSet<(Pid, i32)> = HashSet::new();
    for (pid, fd, link, _) in &fds {
        if link != "anon_inode:[pidfd]" {
            continue;
        }
        let info = std::fs::read_to_string(proc_path(*pid, &format!("fdinfo/{fd}"))).unwrap_or_default();
        let Some(target) = proc::field(&info, "Pid").and_then(|v| v.parse::<Pid>().ok()) else { continue };
        if target == *pid || !by_pid.contains_key(&target) {
            continue;
        }
        let same = pidfd_groups.iter_mut().find(|g| {
            g.target == target && sys::kcmp_file_of(g.holders[0].0, g.holders[0].1, *pid, *fd).unwrap_or(false)
        });
        match same {
            Some(g) => g.holders.push((*pid, *fd)),
            None => pidfd_groups.push(TreePidfd { target, holders: vec![(*pid, *fd)] }),
        }
        pidfd_fds.insert((*pid, *fd));
        ext(&mut p, *pid, *fd);
    }
    p.tree.pidfds = pidfd_groups;

    // Descriptions several members hold (inherited across fork, passed over a socket).
    let mut by_link: BTreeMap<&str, Vec<(Pid, i32)>> = BTreeMap::new();
    for (pid, fd, link, _) in &fds {
        if !carried.contains(link) && !pidfd_fds.contains(&(*pid, *fd)) {
            by_link.entry(link).or_default().push((*pid, *fd));
        }
    }
    for (link, v) in by_link {
        if pids_of(&v).len() < 2 {
            continue;
        }
        let mut groups: Vec<Vec<(Pid, i32)>> = Vec::new();
        for x in v {
            match groups.iter_mut().find(|g| sys::kcmp_file_of(g[0].0, g[0].1, x.0, x.1).unwrap_or(false)) {
                Some(g) => g.push(x),
                None => groups.push(vec![x]),
            }
        }
        for g in groups {
            let owner = g[0];
            let users: Vec<(Pid, i32)> = g.into_iter().filter(|u| u.0 != owner.0).collect();
            if users.is_empty() {
                continue;
            }
            for &(pid, fd) in &users {
                ext(&mut p, pid, fd);
            }
            p.tree.shared_fds.push(SharedFd { what: link.to_string(), owner, users });
        }
    }

    // Pipes and pairs the tree carries must have no end outside it.
    let links: Vec<String> = carried.iter().cloned().collect();
    if !links.is_empty() {
        for (link, h) in crate::files::holders_of(&links, members[0].pid) {
            let outside: Vec<(Pid, String)> = h.into_iter().filter(|(pid, _)| !by_pid.contains_key(pid)).collect();
            if outside.is_empty() {
                continue;
            }
            let Some((pid, fd, ..)) = fds.iter().find(|f| f.2 == link) else { continue };
            p.blockers.push(in_member(
                by_pid[pid],
                Error::UnsupportedFd {
                    fd: *fd,
                    what: link.clone(),
                    why: format!(
                        "it is also held by {}, outside the process tree",
                        crate::files::name_holders(&outside)
                    ),
                },
            ));
        }
    }

    // Shared anonymous memory: the first member (parents first) with the object restores it.
    let mut first: HashMap<u64, (Pid, Vec<proc::MapLine>)> = HashMap::new();
    // Deleted directories are saved per image: shared, they would split.
    let mut per_image: HashMap<String, Vec<Pid>> = HashMap::new();
    // memfds and deleted files: the first member (parents first) whose image has one makes it,
    // the others open it from there. ino → (owner, handle); (pid, ino) seen.
    let mut file_first: HashMap<u64, (Pid, String)> = HashMap::new();
    let mut file_seen: HashSet<(Pid, u64)> = HashSet::new();
    let mut file_use = |p: &mut Plan, pid: Pid, ino: u64, deleted: bool, handle: String| {
        if !file_seen.insert((pid, ino)) {
            return;
        }
        match file_first.get(&ino) {
            None => {
                file_first.insert(ino, (pid, handle));
            }
            Some((owner, h)) => {
                p.tree.shared_files.push(SharedFile { pid, ino, deleted, owner: *owner, handle: h.clone() })
            }
        }
    };
    for m in &live {
        // Its fds first (not those taken from another member: one description).
        for (pid, fd, link, _) in fds.iter().filter(|f| f.0 == m.pid) {
            let memfd = crate::memfd::name_of(link).is_some();
            if !(memfd || crate::ghosts::deleted_path(link).is_some())
                || p.external.get(pid).is_some_and(|v| v.contains(fd))
            {
                continue;
            }
            use std::os::unix::fs::MetadataExt;
            match std::fs::metadata(proc_path(*pid, &format!("fd/{fd}"))) {
                Ok(md) if md.is_file() => file_use(&mut p, *pid, md.ino(), !memfd, format!("fd/{fd}")),
                Ok(md) => {
                    let v = per_image.entry(format!("{link} (inode {})", md.ino())).or_default();
                    if !v.contains(pid) {
                        v.push(*pid);
                    }
                }
                Err(_) => {}
            }
        }
        let Ok(maps) = proc::maps(m.pid) else { continue };
        for l in maps {
            let memfd = crate::memfd::name_of(&l.path).is_some();
            let ghost =
                l.path.starts_with('/') && crate::ghosts::deleted_path(&l.path).is_some() && !is_shared_anon(&l);
            if memfd || ghost {
                file_use(&mut p, m.pid, l.inode, ghost, format!("map_files/{:x}-{:x}", l.start, l.end));
            }
            if !is_shared_anon(&l) {
                continue;
            }
            match first.get_mut(&l.inode) {
                None => {
                    first.insert(l.inode, (m.pid, vec![l]));
                }
                Some((o, ls)) if *o == m.pid => ls.push(l),
                Some((o, ls)) => {
                    let len = l.end - l.start;
                    match ls
                        .iter()
                        .find(|ol| ol.offset <= l.offset && l.offset + len <= ol.offset + (ol.end - ol.start))
                    {
                        Some(ol) => p.tree.shared_maps.push(SharedMap {
                            pid: m.pid,
                            start: l.start,
                            end: l.end,
                            offset: l.offset,
                            owner: *o,
                            owner_start: ol.start,
                            owner_end: ol.end,
                            owner_offset: ol.offset,
                        }),
                        None => p.blockers.push(in_member(
                            m,
                            Error::UnsupportedMapping {
                                range: l.range(),
                                what: l.path.clone(),
                                why: format!(
                                    "it shares its memory with pid {o} of the tree beyond any one mapping of it \
                                     there (not carried yet)"
                                ),
                            },
                        )),
                    }
                }
            }
        }
    }
    let mut split: Vec<(String, Vec<Pid>)> = per_image.into_iter().filter(|(_, v)| v.len() > 1).collect();
    split.sort();
    for (what, v) in split {
        p.blockers.push(in_member(
            by_pid[&v[1]],
            Error::Unsupported {
                pid: v[1],
                what: format!(
                    "{what} shared with {} (deleted directories shared between processes of a tree are not \
                     carried yet)",
                    crate::dump::named(&v[..1])
                ),
            },
        ));
    }

    // Processes that share what each member's image holds for itself (clone without
    // CLONE_THREAD: vfork, posix_spawn before its exec, CLONE_FILES…) would come back as two.
    // (KCMP_SYSVSEM is not asked: processes without an undo list compare equal.)
    const SHARED_KINDS: [(i32, &str); 3] = [
        (1, "its address space (CLONE_VM: vfork, or posix_spawn before its exec)"),
        (2, "its fd table (CLONE_FILES)"),
        (3, "its working directory, root and umask (CLONE_FS)"),
    ];
    for (kind, what) in SHARED_KINDS {
        // kcmp orders the kernel objects: each member looked up among those before it, kept in
        // that order (a binary search never fails on a comparison that errs: it is checked).
        let mut sorted: Vec<&Member> = Vec::new();
        for m in &live {
            let at = sorted.binary_search_by(|x| match sys::kcmp(x.pid, m.pid, kind) {
                Ok(1) => std::cmp::Ordering::Less,
                Ok(2) => std::cmp::Ordering::Greater,
                _ => std::cmp::Ordering::Equal,
            });
            match at {
                Ok(i) if sys::kcmp(sorted[i].pid, m.pid, kind).ok() == Some(0) => p.blockers.push(in_member(
                    m,
                    Error::Unsupported {
                        pid: m.pid,
                        what: format!("a process sharing {what} with {}", crate::dump::named(&[sorted[i].pid])),
                    },
                )),
                Ok(i) | Err(i) => sorted.insert(i, m),
            }
        }
    }

    // Namespaces: every member is restored into the restorer's (as the root is); one of a member
    // that differ from the root's would be lost.
    let ns_of = |pid: Pid, ns: &str| std::fs::read_link(proc_path(pid, &format!("ns/{ns}"))).ok();
    for m in live.iter().skip(1) {
        for ns in ["pid", "pid_for_children", "mnt", "net", "ipc", "uts", "user", "cgroup", "time"] {
            // (Unreadable: a process whose main thread exited; its own blockers say so.)
            let (Some(theirs), Some(root)) = (ns_of(m.pid, ns), ns_of(members[0].pid, ns)) else { continue };
            if theirs != root {
                p.blockers.push(in_member(
                    m,
                    Error::Unsupported {
                        pid: m.pid,
                        what: format!(
                            "a {ns} namespace of its own ({}; the root's is {}: namespaces are not carried)",
                            theirs.display(),
                            root.display()
                        ),
                    },
                ));
            }
        }
    }

    // Sessions and process groups: each member's own, or its parent's (inherited at fork), or
    // (a group) another member's made before it in the restore order.
    for (i, m) in members.iter().enumerate().skip(1) {
        let parent = by_pid[&m.ppid];
        if m.sid != m.pid && m.sid != parent.sid {
            p.blockers.push(in_member(
                m,
                Error::Unsupported {
                    pid: m.pid,
                    what: format!(
                        "session {} (neither its own nor its parent's, which is {}: not carried yet)",
                        m.sid, parent.sid
                    ),
                },
            ));
        }
        let joins = m.sid != m.pid && m.pgid != m.pid && m.pgid != parent.pgid;
        let leader_before =
            members[..i].iter().any(|l| l.pid == m.pgid && l.pgid == l.pid && l.sid == m.sid && l.zombie.is_none());
        if joins && !leader_before {
            p.blockers.push(in_member(
                m,
                Error::Unsupported {
                    pid: m.pid,
                    what: format!(
                        "process group {} (led by a process outside the tree or restored after this one: not \
                         carried yet)",
                        m.pgid
                    ),
                },
            ));
        }
        if m.zombie.is_some_and(|st| libc::WIFSIGNALED(st) && libc::WCOREDUMP(st)) {
            p.blockers.push(in_member(
                m,
                Error::Unsupported {
                    pid: m.pid,
                    what: "a zombie that dumped core (its status cannot be made again)".into(),
                },
            ));
        }
    }
    Ok(p)
}

fn getfd(pid: Pid, fd: i32) -> Result<OwnedFd> {
    let pidfd = sys::pidfd_open(pid).map_err(|err| Error::NoProcess { pid, err })?;
    sys::pidfd_getfd(&pidfd, fd).map_err(pt("pidfd_getfd", pid))
}

/// Every reason the tree under `root` cannot be dumped, each naming its member.
pub fn blockers(root: Pid, opts: &DumpOptions) -> Result<Vec<Error>> {
    let members = members(root)?;
    let p = plan(&members, &opts.external_fds, false)?;
    let mut v = p.blockers;
    for m in members.iter().filter(|m| m.zombie.is_none()) {
        let mut external = p.external.get(&m.pid).cloned().unwrap_or_default();
        if m.ppid == 0 {
            external.extend(&opts.external_fds);
        }
        let allies = members.iter().map(|x| x.pid).filter(|&x| x != m.pid).collect();
        let o = DumpOptions { external_fds: external, tree: false, allies, ..opts.clone() };
        match crate::dump::process_blockers(m.pid, &o, true) {
            Ok(b) => v.extend(b.into_iter().map(|e| in_member(m, e))),
            // Gone since the listing: the dump finds out.
            Err(e) if m.ppid != 0 => v.push(in_member(m, e)),
            Err(e) => return Err(e),
        }
    }
    Ok(v)
}

/// Dumps the tree under `root` into `dir` (see the module doc).
pub fn dump(root: Pid, dir: &Path, after: AfterDump, opts: &DumpOptions) -> Result<DumpReport> {
    // Each member writes its own pages.img: one page stream or pre-copy store cannot serve them.
    if opts.pages_to.is_some() || opts.precopy.is_some() {
        return Err(Error::Unsupported {
            pid: root,
            what: "a process tree whose pages go elsewhere than the image directory (a move: not yet)".into(),
        });
    }
    let start = Instant::now();
    let mut clk = crate::dump::Clock { last: start, phases: Vec::new() };
    if let Some(e) = blockers(root, opts)?.into_iter().next() {
        return Err(e);
    }
    image::create_dir(dir)?;
    remove_tree_image(dir);
    clk.lap("check");

    // Parents first: a frozen process forks no more, so the children listed then are all.
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
    clk.lap("freeze");
    type Written = (Vec<(&'static str, std::time::Duration)>, u64, u64, usize, usize);
    let written = (|| -> Result<Written> {
        let t0 = Instant::now();
        let p = plan(&members, &opts.external_fds, true)?;
        if let Some(e) = p.blockers.into_iter().next() {
            return Err(e);
        }
        let mut phases = vec![("share", t0.elapsed())];
        let (mut pages, mut manifest, mut vmas, mut fds) = (0, 0, 0, 0);
        for (m, f) in members.iter().filter(|m| m.zombie.is_none()).zip(frozen.iter_mut()) {
            let mut external = p.external.get(&m.pid).cloned().unwrap_or_default();
            if m.ppid == 0 {
                external.extend(&opts.external_fds);
            }
            let allies = members.iter().map(|x| x.pid).filter(|&x| x != m.pid).collect();
            let o = DumpOptions { external_fds: external, tree: false, allies, ..opts.clone() };
            let r = crate::dump::write_image(f, &dir.join(m.pid.to_string()), &o).map_err(|e| in_member(m, e))?;
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
            return Err(e); // every `Frozen` thaws its process as it is dropped
        }
    };
    // The members' phases, summed (one member after the other), then the tree file.
    let members_time: std::time::Duration = phases.iter().map(|p| p.1).sum();
    clk.phases.extend(phases);
    clk.lap("tree");
    if let Some(t) = clk.phases.last_mut() {
        t.1 = t.1.saturating_sub(members_time);
    }
    let mut frozen_time = frozen_at.elapsed();
    match after {
        AfterDump::Kill => kill_tree(&members, frozen)?,
        // Children first: a parent never runs before its children are back.
        _ => {
            for f in frozen.into_iter().rev() {
                f.thaw(after == AfterDump::LeaveStopped)?;
            }
        }
    }
    if after != AfterDump::Kill {
        frozen_time = frozen_at.elapsed();
    }
    clk.lap(if after == AfterDump::Kill { "kill" } else { "thaw" });
    Ok(DumpReport {
        pid: root,
        phases: clk.phases,
        frozen: frozen_time,
        total: start.elapsed(),
        pages_bytes,
        manifest_bytes,
        vmas,
        fds,
        tree: members.iter().map(|m| m.pid).collect(),
        ..Default::default()
    })
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
fn add_phases(sum: &mut Vec<(&'static str, std::time::Duration)>, p: &[(&'static str, std::time::Duration)]) {
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

/// The session and process group of a new member (forked by its restored parent, whose own it
/// has): its own session, its own group, or another member's group.
fn set_session(r: &Remote, m: &Member, parent: &Member) -> Result<()> {
    if m.sid == m.pid {
        r.call("setsid", libc::SYS_setsid, &[])?;
    } else if m.pgid != parent.pgid {
        let g = if m.pgid == m.pid { 0 } else { m.pgid as u64 };
        r.call(&format!("setpgid(0, {})", m.pgid), libc::SYS_setpgid, &[0, g])?;
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

/// Restores the tree imaged in `dir` (see the module doc). The report is the root's, with
/// every member in `tree`.
pub fn restore(dir: &Path, opts: &RestoreOptions) -> Result<RestoreReport> {
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
            let s = rebuild::fork_stub(parent, c.pid, c.exit_signal).map_err(|e| in_member(c, e))?;
            set_session(&s.r, c, m).map_err(|e| in_member(c, e))?;
            new_pid.insert(c.pid, c.pid);
            match c.zombie {
                Some(status) => {
                    s.die_as(status).map_err(|e| in_member(c, e))?;
                    zombies = true;
                }
                None => {
                    let task = &imgs[&c.pid].manifest.task;
                    notes.extend(crate::task::restore_cgroup(c.pid, task));
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
    // SysV segments: found or made by the first member that has one attached.
    let mut shm_made: HashSet<i32> = HashSet::new();
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
        let o = RestoreOptions {
            external_fds: external_of(m, &with),
            new_pid: opts.new_pid && m.ppid == 0,
            stopped: opts.stopped,
        };
        let (rep, h) = rebuild::complete(stub, img, &o, &from, true, Laps::new()).map_err(|e| in_member(m, e))?;
        held.push(h.expect("held"));
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
    // All complete: let them run, children first; those that were in a job-control stop go back
    // into one (their parent is told again, as after a new SIGSTOP).
    let live: Vec<&Member> = t.members.iter().filter(|m| m.zombie.is_none()).collect();
    for (h, m) in held.into_iter().zip(live).rev() {
        h.release(opts.stopped || m.stopped)?;
    }
    laps.lap("release");
    let mut rep = root_rep.expect("the root is live");
    rep.notes.extend(notes);
    rep.phases = laps.phases;
    rep.total = laps.start.elapsed();
    rep.pages_bytes = imgs.values().map(|i| i.manifest.pages_len).sum();
    rep.tree = t.members.iter().map(|m| new_pid[&m.pid]).collect();
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

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
