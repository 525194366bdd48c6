//! What the members of a process tree share (pipes, pairs, descriptions, memory, memfds and
//! deleted files, pidfds, SysV segments) and what of it cannot be carried — found from /proc,
//! `kcmp` and sock_diag, on a running tree (the preflight) or a frozen one (the dump, which
//! also copies the unread bytes of pipes and pairs).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::OwnedFd;

use super::{in_member, Member, PairEnd, SharedFd, SharedFile, SharedMap, TreeManifest, TreePidfd, TreePipe};
use crate::error::{io_at, pt, Error, Result};
use crate::proc::{self, proc_path};
use crate::sys::{self, Pid};

/// What the members share, and what of it cannot be carried.
#[derive(Default)]
pub(super) struct Plan {
    pub(super) tree: TreeManifest,
    /// Per member: the fds the tree carries (left out of the member's own image).
    pub(super) external: HashMap<Pid, Vec<i32>>,
    pub(super) blockers: Vec<Error>,
}

fn is_shared_anon(l: &proc::MapLine) -> bool {
    l.shared() && (l.path == "/dev/zero (deleted)" || l.path.starts_with("[anon_shmem:")) && l.inode != 0
}

/// Finds what the members share (`data`: also copies the unread bytes of pipes and pairs — on
/// a frozen tree).
/// `caller_external`: per member, the fds the caller carries (not looked at).
pub(super) fn plan(members: &[Member], caller_external: &HashMap<Pid, Vec<i32>>, data: bool) -> Result<Plan> {
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
            if caller_external.get(&m.pid).is_some_and(|v| v.contains(&fd)) {
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

pub(super) fn getfd(pid: Pid, fd: i32) -> Result<OwnedFd> {
    let pidfd = sys::pidfd_open(pid).map_err(|err| Error::NoProcess { pid, err })?;
    sys::pidfd_getfd(&pidfd, fd).map_err(pt("pidfd_getfd", pid))
}
