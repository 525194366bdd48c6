//! Fidelity suite of the checkpoint engine (in the spirit of CRIU's zdtm): each C program in
//! tests/fidelity/ sets up one kind of process state, prints READY, and keeps using that state;
//! the driver dumps it (the original is killed), restores it, says "go" through the FIFO `ctl`,
//! and the program checks its own state and prints PASS or FAIL. Every wait is bounded; the
//! driver kills only the processes it started, by pid. Needs root (ptrace of any process,
//! clone3 set_tid, PR_SET_MM_MAP); without it each test prints SKIP and returns.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dvk_checkpoint::{self as ck, AfterDump, RestoreOptions};

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let ok = unsafe { libc::geteuid() } == 0;
    if !ok {
        eprintln!("SKIP: the checkpoint fidelity suite needs root (ptrace, clone3 set_tid, PR_SET_MM_MAP)");
    }
    ok
}

struct Prog {
    name: &'static str,
    dir: tempfile::TempDir,
    pid: i32,
}

/// A test that fails half-way must not leave its program behind: kill it if it is
/// still our unreaped child (waitpid says so; a reaped pid that was reused by someone
/// else is not our child and is left alone).
impl Drop for Prog {
    fn drop(&mut self) {
        let mut st = 0;
        // SAFETY: waitpid/kill take integers and a valid out pointer; only our own child is killed.
        unsafe {
            if libc::waitpid(self.pid, &mut st, libc::WNOHANG) == 0 {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, &mut st, 0);
            }
        }
    }
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fidelity")
}

fn compile(name: &str, out: &Path) -> PathBuf {
    let bin = out.join(name);
    let st = Command::new("cc")
        .args(["-O1", "-w", "-pthread", "-o"])
        .arg(&bin)
        .arg(src_dir().join(format!("{name}.c")))
        .status()
        .expect("cc not found (install gcc)");
    assert!(st.success(), "compiling {name}.c failed");
    bin
}

/// Nothing but stdio is inherited (the harness may have stray fds, e.g. a pipe to its runner).
fn close_stray_fds(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: close_range is async-signal-safe; runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3, u32::MAX, 0);
            Ok(())
        })
    }
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_default()
}

use dvk_tests::wait_child_exit as wait_exit;

impl Prog {
    fn start(name: &'static str) -> Prog {
        Prog::start_as(name, None)
    }

    /// Starts `name`, as user/group `uid` when given.
    fn start_as(name: &'static str, uid: Option<u32>) -> Prog {
        let dir = tempfile::Builder::new().prefix(&format!("dvk-fid-{name}-")).tempdir().unwrap();
        Prog::start_in(name, dir, uid)
    }

    /// Starts `name` in `dir`, as user/group `uid` when given.
    fn start_in(name: &'static str, dir: tempfile::TempDir, uid: Option<u32>) -> Prog {
        Prog::start_env(name, dir, uid, &[])
    }

    /// [`Prog::start_in`] with extra environment.
    fn start_env(name: &'static str, dir: tempfile::TempDir, uid: Option<u32>, env: &[(&str, &str)]) -> Prog {
        let bin = compile(name, dir.path());
        let ctl = std::ffi::CString::new(dir.path().join("ctl").to_str().unwrap()).unwrap();
        // SAFETY: valid C string.
        assert_eq!(unsafe { libc::mkfifo(ctl.as_ptr(), 0o600) }, 0);
        let mut cmd = Command::new(&bin);
        if let Some(id) = uid {
            use std::os::unix::fs::PermissionsExt;
            use std::os::unix::process::CommandExt;
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
            fs::set_permissions(dir.path().join("ctl"), fs::Permissions::from_mode(0o666)).unwrap();
            cmd.uid(id).gid(id);
        }
        let child = close_stray_fds(&mut cmd)
            .envs(env.iter().copied())
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(File::create(dir.path().join("out")).unwrap())
            .stderr(File::create(dir.path().join("err")).unwrap())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        drop(child); // waited for by pid below
        let p = Prog { name, dir, pid };
        let t = Instant::now();
        while !read(&p.out()).contains("READY") {
            let mut st = 0;
            // SAFETY: our own child.
            if unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) } == pid {
                panic!("{name} exited before READY: {}", read(&p.out()));
            }
            assert!(t.elapsed() < Duration::from_secs(10), "{name}: no READY in 10 s");
            std::thread::sleep(Duration::from_millis(2));
        }
        p
    }
    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }
    fn out(&self) -> PathBuf {
        self.path("out")
    }
    fn img(&self, n: u32) -> PathBuf {
        self.path(&format!("img{n}"))
    }
    /// Dump (killing the original, which this process reaps) and restore; returns the new pid.
    fn move_once(&mut self, n: u32) {
        let rep = ck::dump(self.pid, &self.img(n), AfterDump::Kill)
            .unwrap_or_else(|e| panic!("{}: dump failed: {e}", self.name));
        assert!(rep.pages_bytes > 0);
        // Never-populated pages are not stored (the largest program touches ~180 MiB).
        assert!(rep.pages_bytes < 512 << 20, "{}: {} bytes stored", self.name, rep.pages_bytes);
        wait_exit(self.pid, Duration::from_secs(5)); // already reaped by the dump: no-op
        let r = ck::restore(&self.img(n), &RestoreOptions::default())
            .unwrap_or_else(|e| panic!("{}: restore failed: {e}", self.name));
        assert!(r.same_pid, "{}: pid {} was free but not reused (got {})", self.name, self.pid, r.pid);
        self.pid = r.pid;
    }
    /// [`Prog::move_once`] with pre-copy rounds while the program runs; returns the dump report.
    fn move_once_precopy(&mut self, n: u32) -> ck::DumpReport {
        let policy = ck::precopy::Policy::default();
        let rep = ck::dump_precopy(self.pid, &self.img(n), AfterDump::Kill, &Default::default(), &policy)
            .unwrap_or_else(|e| panic!("{}: pre-copy dump failed: {e}", self.name));
        assert!(!rep.precopy.is_empty(), "{}: no pre-copy round ran", self.name);
        wait_exit(self.pid, Duration::from_secs(5));
        let r = ck::restore(&self.img(n), &RestoreOptions::default())
            .unwrap_or_else(|e| panic!("{}: restore failed: {e}", self.name));
        self.pid = r.pid;
        rep
    }
    fn go(&self) {
        let mut f = fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(self.path("ctl")).unwrap();
        f.write_all(b"g").unwrap();
    }
    fn expect_pass(&self) {
        self.expect_exit(0);
    }
    /// PASS, and the exit status `code` (what the program chose) reported to this parent.
    fn expect_exit(&self, code: i32) {
        let st = wait_exit(self.pid, Duration::from_secs(20));
        let out = read(&self.out());
        let err = read(&self.path("err"));
        let ok = matches!(st, Some(s) if libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == code);
        assert!(
            ok && out.contains("PASS") && !out.contains("FAIL"),
            "{}: status {st:?}\n--- stdout\n{out}--- stderr\n{err}",
            self.name
        );
    }
}

fn simple(name: &'static str, settle_ms: u64) {
    if !root() {
        return;
    }
    let mut p = Prog::start(name);
    std::thread::sleep(Duration::from_millis(settle_ms));
    p.move_once(1);
    p.go();
    p.expect_pass();
}

macro_rules! fidelity {
    ($($name:ident $(settle $ms:literal)?),* $(,)?) => {$(
        #[test]
        fn $name() {
            simple(stringify!($name), 0 $(+ $ms)?);
        }
    )*};
}

fidelity! {
    anon_memory,
    file_private_map,
    shared_anon,
    regs_sse_avx settle 20,
    tls_fsbase,
    vdso_clock settle 20,
    rseq settle 20,
    sig_handlers,
    sig_mask_pending,
    sigaltstack,
    itimer settle 100,
    raise_abort,
    regular_files,
    devnull_pipe,
    cwd_umask_rlimit,
    blocked_read settle 100,
    blocked_nanosleep settle 200,
    blocked_epoll settle 100,
    eventfd_timerfd,
    epoll_set,
    protections,
    sigtrap_handler,
    sched_attrs settle 20,
    sparse_reservation,
    memfd,
    socketpair,
    unix_peer_gone,
    threads settle 20,
    vma_flags,
    memfd_exec,
    membarrier,
    process_attrs settle 20,
    fifo,
    epoll_dup,
    proc_self_files,
    mlockall_future,
    posix_shm,
    signalfd,
    inotify,
    pidfd,
    posix_timers settle 50,
    deleted_file,
    deleted_dirs,
    pty_pair,
    ns_fds,
    opath_symlink,
    fanotify,
    pipe_reopen,
    deleted_fifo,
}

/// The members of a restored tree: a failing test kills those still there (`Prog` kills only
/// the root), each checked to be ours (its working directory is the program's).
struct Members {
    pids: Vec<i32>,
    dir: PathBuf,
}

impl Drop for Members {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for &pid in self.pids.iter().skip(1) {
            let cwd = fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
            if cwd.starts_with(&self.dir) {
                // SAFETY: killing a process this test restored, by pid.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// A process tree (`DumpOptions::tree`): every member dumped, all restored with their pids;
/// the root then checks the tree and prints PASS; `want` must be in its output too.
fn tree(name: &'static str, members: usize, want: &[&str]) {
    if !root() {
        return;
    }
    let mut p = Prog::start(name);
    let opts = ck::DumpOptions { tree: true, ..Default::default() };
    let rep =
        ck::dump_with(p.pid, &p.img(1), AfterDump::Kill, &opts).unwrap_or_else(|e| panic!("{name}: dump failed: {e}"));
    assert_eq!(rep.tree.len(), members, "{name}: members dumped: {:?}", rep.tree);
    assert_eq!(rep.tree[0], p.pid);
    wait_exit(p.pid, Duration::from_secs(5));
    let r =
        ck::restore(&p.img(1), &RestoreOptions::default()).unwrap_or_else(|e| panic!("{name}: restore failed: {e}"));
    let _members = Members { pids: r.tree.clone(), dir: p.dir.path().to_path_buf() };
    assert_eq!(r.tree, rep.tree, "{name}: every member keeps its pid");
    p.pid = r.pid;
    p.go();
    p.expect_pass();
    let out = read(&p.out());
    for w in want {
        assert!(out.contains(w), "{name}: {w:?} missing from\n{out}");
    }
}

#[test]
fn tree_zombie() {
    tree("tree_zombie", 5, &[]);
}

#[test]
fn tree_pipes() {
    // The child's line survives the parent's: one offset for their shared stdout.
    tree("tree_pipes", 2, &["child-ok\n"]);
}

#[test]
fn tree_shared_anon() {
    tree("tree_shared_anon", 2, &[]);
}

#[test]
fn tree_memfd() {
    tree("tree_memfd", 2, &[]);
}

#[test]
fn tree_lock_fifo() {
    tree("tree_lock_fifo", 2, &[]);
}

#[test]
fn tree_pidfd() {
    tree("tree_pidfd", 3, &[]);
}

#[test]
fn tree_sysv() {
    tree("tree_sysv", 2, &[]);
}

#[test]
fn tree_listener() {
    tree("tree_listener", 3, &[]);
}

#[test]
fn tree_stopped() {
    tree("tree_stopped", 2, &[]);
}

#[test]
fn tree_groups() {
    tree("tree_groups", 6, &[]);
}

/// The preflight of a tree lists the blockers of every member at once, each naming its member
/// (a child's socket, a grandchild's session); the dump is refused and the whole tree runs on.
#[test]
fn tree_refused() {
    if !root() {
        return;
    }
    let p = Prog::start("tree_refused");
    let out = read(&p.out());
    let pid_of = |k: &str| -> i32 {
        out.split_whitespace().find_map(|w| w.strip_prefix(k)).and_then(|v| v.parse().ok()).expect("child pid")
    };
    let (a, g) = (pid_of("A="), pid_of("G="));
    let opts = ck::DumpOptions { tree: true, ..Default::default() };
    let all: Vec<String> = ck::blockers(p.pid, &opts).unwrap().iter().map(|e| e.to_string()).collect();
    let has =
        |named: String, what: &[&str]| all.iter().any(|e| e.starts_with(&named) && what.iter().all(|w| e.contains(w)));
    let child = format!("pid {a} (tree_refused), child of {}", p.pid);
    assert!(has(child, &["AF_INET", "real network sockets"]), "child A's socket not named: {all:#?}");
    let grandchild = format!("pid {g} (tree_refused), child of ");
    assert!(has(grandchild, &["session", "neither its own nor its parent's"]), "grandchild G's session: {all:#?}");
    let e = ck::dump_with(p.pid, &p.img(1), AfterDump::Kill, &opts).expect_err("dump should be refused").to_string();
    assert!(e.contains("child of"), "{e}");
    assert!(!p.img(1).join("tree.img").exists());
    p.go();
    p.expect_pass();
}

/// A tree restored beside its running original: the child's pid is taken, so the restore fails
/// naming it; the original runs on undisturbed.
#[test]
fn tree_pid_taken_fails_restore() {
    if !root() {
        return;
    }
    let p = Prog::start("tree_pipes");
    let opts = ck::DumpOptions { tree: true, ..Default::default() };
    let rep = ck::dump_with(p.pid, &p.img(1), AfterDump::LeaveRunning, &opts).expect("dump");
    let child = rep.tree[1];
    let e = ck::restore(&p.img(1), &RestoreOptions::default()).expect_err("restore should fail").to_string();
    for w in [format!("pid {child} (tree_pipes), child of {}", p.pid), format!("pid {child} cannot be given again")] {
        assert!(e.contains(&w), "error {e:?} should mention {w:?}");
    }
    p.go();
    p.expect_pass();
    assert!(read(&p.out()).contains("child-ok"));
}

/// A child whose main thread exited (its threads run on) looks like a zombie but is not: it is
/// carried as a live member (its leader a zombie again, its thread running), never restored dead.
#[test]
fn tree_main_exit() {
    tree("tree_main_exit", 2, &[]);
}

/// `/proc/PID/stat` of `pid`: (state, ppid, process group, session); None once it is gone.
fn stat_of(pid: i32) -> Option<(char, i32, i32, i32)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = s[s.rfind(')')? + 2..].split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse().ok());
    Some((f.first()?.chars().next()?, n(1)?, n(2)?, n(3)?))
}

/// A held tree restore: every member complete but in a ptrace stop; killed, none is left (not
/// even a zombie) and none ran (the program's output is as it was at the dump).
#[test]
fn tree_held_restore_killed_leaves_nothing() {
    if !root() {
        return;
    }
    // Killed, or dropped (zombie members too).
    for (name, kill) in [("tree_pipes", true), ("tree_zombie", false)] {
        let p = Prog::start(name);
        let opts = ck::DumpOptions { tree: true, ..Default::default() };
        let rep = ck::dump_with(p.pid, &p.img(1), AfterDump::Kill, &opts).expect("dump");
        wait_exit(p.pid, Duration::from_secs(5));
        let out = read(&p.out());
        let (r, held) = ck::tree::restore_held(&p.img(1), &RestoreOptions::default()).expect("held restore");
        let _members = Members { pids: r.tree.clone(), dir: p.dir.path().to_path_buf() };
        assert_eq!(r.tree, rep.tree);
        let want: Vec<(i32, i32)> = rep.tree.iter().map(|&x| (x, x)).collect();
        assert_eq!(held.pids(), &want[..]);
        for &pid in &r.tree {
            let state = stat_of(pid).map(|s| s.0);
            assert!(matches!(state, Some('t' | 'Z')), "{name}: pid {pid} is held in a ptrace stop: {state:?}");
        }
        assert!(r.tree.iter().filter(|&&pid| stat_of(pid).map(|s| s.0) == Some('t')).count() >= 2);
        // Each killed child, and each zombie, is reaped by its parent (not left for whoever
        // reaps orphans), the root by us.
        if kill {
            held.kill().expect("kill");
        } else {
            drop(held);
        }
        for &pid in &r.tree {
            assert_eq!(stat_of(pid), None, "{name}: member {pid} is left");
        }
        assert_eq!(read(&p.out()), out, "{name}: a member ran");
    }
}

/// A held tree restore resumed: the tree runs on as `restore` leaves it.
#[test]
fn tree_held_restore_resumed() {
    if !root() {
        return;
    }
    let mut p = Prog::start("tree_pipes");
    let opts = ck::DumpOptions { tree: true, ..Default::default() };
    let rep = ck::dump_with(p.pid, &p.img(1), AfterDump::Kill, &opts).expect("dump");
    wait_exit(p.pid, Duration::from_secs(5));
    let (r, held) = ck::tree::restore_held(&p.img(1), &RestoreOptions::default()).expect("held restore");
    let _members = Members { pids: r.tree.clone(), dir: p.dir.path().to_path_buf() };
    assert_eq!(r.tree, rep.tree);
    for &pid in &r.tree {
        assert_eq!(stat_of(pid).map(|s| s.0), Some('t'), "pid {pid} is held in a ptrace stop");
    }
    held.resume().expect("resume");
    p.pid = r.pid;
    p.go();
    p.expect_pass();
    assert!(read(&p.out()).contains("child-ok"));
}

/// A tree frozen, its image written, then thawed (what a move does, in steps): the original
/// runs on to its end; then the image restores (the pids are free again) and passes too.
#[test]
fn tree_frozen_in_steps() {
    if !root() {
        return;
    }
    let mut p = Prog::start("tree_pipes");
    let mut t = ck::tree::FrozenTree::freeze(p.pid).expect("freeze");
    let pids: Vec<i32> = t.members().iter().map(|m| m.pid).collect();
    assert_eq!((pids.len(), pids[0]), (2, p.pid));
    t.set_exit_kill(true).expect("exit kill");
    t.set_exit_kill(false).expect("no exit kill");
    let opts = ck::DumpOptions { tree: true, ..Default::default() };
    let rep = t.write_image(&p.img(1), &opts).expect("write_image");
    assert_eq!(rep.tree, pids);
    assert!(rep.pages_bytes > 0 && p.img(1).join("tree.img").exists());
    for &pid in &pids {
        assert_eq!(stat_of(pid).map(|s| s.0), Some('t'), "pid {pid} stays frozen after the image");
    }
    let len = fs::metadata(p.out()).unwrap().len();
    t.thaw().expect("thaw");
    p.go();
    p.expect_pass();
    assert!(read(&p.out()).contains("child-ok"));
    // The output as it was at the dump: the copy writes its own lines after it.
    fs::OpenOptions::new().write(true).open(p.out()).unwrap().set_len(len).unwrap();
    let r = ck::restore(&p.img(1), &RestoreOptions::default()).expect("restore");
    let _members = Members { pids: r.tree.clone(), dir: p.dir.path().to_path_buf() };
    assert_eq!(r.tree, pids);
    p.pid = r.pid;
    p.go();
    p.expect_pass();
    assert!(read(&p.out()).contains("child-ok"));
}

/// A tree restored under new pids while its original, frozen, still holds its own: the copy
/// has other pids, its parents, process groups and sessions are the new pids of those it had,
/// and it passes checks that do not depend on pid numbers (groups and sessions against its own
/// and its parent's pid, a pipe each way, shared memory, a zombie reaped by wait(-1) with its
/// status). Then the original is killed.
#[test]
fn tree_restored_under_new_pids_while_the_original_runs() {
    if !root() {
        return;
    }
    let mut p = Prog::start("tree_new_pids");
    let mut t = ck::tree::FrozenTree::freeze(p.pid).expect("freeze");
    let old = t.members().to_vec();
    // A failing test kills the original's members too (the first entry is skipped).
    let _originals =
        Members { pids: [0].into_iter().chain(old.iter().map(|m| m.pid)).collect(), dir: p.dir.path().to_path_buf() };
    assert_eq!(old.len(), 7, "{old:?}");
    let opts = ck::DumpOptions { tree: true, ..Default::default() };
    t.write_image(&p.img(1), &opts).expect("write_image");
    let ro = RestoreOptions { new_pid: true, ..Default::default() };
    let r = ck::restore(&p.img(1), &ro).unwrap_or_else(|e| panic!("restore under new pids: {e}"));
    let _members = Members { pids: r.tree.clone(), dir: p.dir.path().to_path_buf() };
    assert_eq!(r.tree.len(), old.len());
    let new: std::collections::HashMap<i32, i32> = old.iter().map(|m| m.pid).zip(r.tree.iter().copied()).collect();
    let now = |pid: i32| *new.get(&pid).unwrap_or(&pid);
    for (m, &pid) in old.iter().zip(&r.tree) {
        assert_ne!(m.pid, pid, "{m:?}: the original holds its pid");
        assert!(stat_of(m.pid).is_some(), "the original {} runs on (frozen)", m.pid);
        let (state, ppid, pgrp, sid) = stat_of(pid).unwrap_or_else(|| panic!("copy {pid} of {m:?} is gone"));
        assert_eq!((pgrp, sid), (now(m.pgid), now(m.sid)), "copy {pid} of {m:?}");
        if m.ppid != 0 {
            assert_eq!(ppid, now(m.ppid), "copy {pid} of {m:?}: its parent");
        }
        assert_eq!(state == 'Z', m.zombie.is_some(), "copy {pid} of {m:?}: state {state}");
    }
    // Groups and sessions that were members' are the new pids' (the root's group, A's, B's),
    // also D's: the group of another member than itself and its parent.
    assert!(old.iter().filter(|m| new.contains_key(&m.pgid)).count() >= 6, "{old:?}");
    assert!(old.iter().any(|m| m.ppid != 0 && m.sid == m.pid), "{old:?}");
    let parent_group = |m: &ck::tree::Member| old.iter().find(|p| p.pid == m.ppid).map(|p| p.pgid);
    assert!(old.iter().any(|m| m.pgid != m.pid && Some(m.pgid) != parent_group(m)), "{old:?}");
    let original = p.pid;
    p.pid = r.pid;
    p.go();
    p.expect_pass();
    // The original, frozen all along, is killed: every member reaped (the root by us).
    t.kill().expect("kill the original");
    for m in &old {
        assert_eq!(stat_of(m.pid), None, "original {} is left (root {original})", m.pid);
    }
}

/// Every kind of tree that can be copied beside its original (nothing of the original's
/// reused: no FIFO, SysV object or bound socket path) is restored under new pids while the
/// original is frozen (pidfds, shared memory, memfds, zombies, stops, groups, threads of a
/// member whose main thread exited), held, and killed; the original, thawed, runs on and passes.
#[test]
fn tree_copies_under_new_pids_held_and_killed() {
    if !root() {
        return;
    }
    let kinds = [
        ("tree_zombie", 5),
        ("tree_pipes", 2),
        ("tree_shared_anon", 2),
        ("tree_memfd", 2),
        ("tree_pidfd", 3),
        ("tree_stopped", 2),
        ("tree_groups", 6),
        ("tree_main_exit", 2),
    ];
    for (name, n) in kinds {
        let p = Prog::start(name);
        let mut t = ck::tree::FrozenTree::freeze(p.pid).expect("freeze");
        let old = t.members().to_vec();
        assert_eq!(old.len(), n, "{name}: {old:?}");
        let opts = ck::DumpOptions { tree: true, ..Default::default() };
        t.write_image(&p.img(1), &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        let ro = RestoreOptions { new_pid: true, ..Default::default() };
        let (r, held) = ck::tree::restore_held(&p.img(1), &ro).unwrap_or_else(|e| panic!("{name}: new pids: {e}"));
        let _members = Members { pids: r.tree.clone(), dir: p.dir.path().to_path_buf() };
        let new: std::collections::HashMap<i32, i32> = held.pids().iter().copied().collect();
        let now = |pid: i32| *new.get(&pid).unwrap_or(&pid);
        for (m, &pid) in old.iter().zip(&r.tree) {
            assert_ne!(m.pid, pid, "{name}: {m:?}");
            let (_, ppid, pgrp, sid) = stat_of(pid).unwrap_or_else(|| panic!("{name}: copy {pid} of {m:?} is gone"));
            assert_eq!((pgrp, sid), (now(m.pgid), now(m.sid)), "{name}: copy {pid} of {m:?}");
            if m.ppid != 0 {
                assert_eq!(ppid, now(m.ppid), "{name}: copy {pid} of {m:?}: its parent");
            }
        }
        held.kill().expect("kill the copy");
        for &pid in &r.tree {
            assert_eq!(stat_of(pid), None, "{name}: copy {pid} is left");
        }
        t.thaw().expect("thaw");
        p.go();
        p.expect_pass();
    }
}

/// A pre-fork server's listener carried by the caller in every member (the root's
/// `external_fds`, the workers' `member_external`), replaced at restore by one listening socket
/// of the test's: every member then holds that very description (kcmp), a connection to it is
/// accepted by a worker, and the program finds the new address and passes. Without replacements
/// for the workers the restore is refused.
#[test]
fn tree_listener_external_in_every_member() {
    if !root() {
        return;
    }
    use std::os::fd::AsRawFd;
    let mut p = Prog::start("tree_prefork");
    let out = read(&p.out());
    let l: i32 = out.split("L=").nth(1).and_then(|v| v.split_whitespace().next()?.parse().ok()).expect("L=");
    let members = ck::tree::members(p.pid).unwrap();
    assert_eq!(members.len(), 3, "{members:?}");
    let workers: Vec<i32> = members[1..].iter().map(|m| m.pid).collect();
    let opts = ck::DumpOptions {
        tree: true,
        external_fds: vec![l],
        member_external: workers.iter().map(|&w| (w, vec![l])).collect(),
        ..Default::default()
    };
    assert!(ck::blockers(p.pid, &opts).unwrap().is_empty());
    let rep = ck::dump_with(p.pid, &p.img(1), AfterDump::Kill, &opts).expect("dump");
    assert_eq!(rep.tree[1..], workers[..]);
    wait_exit(p.pid, Duration::from_secs(5));
    let listener = std::os::unix::net::UnixListener::bind(p.path("sock2")).unwrap();
    let fd = listener.as_raw_fd();
    let root_only = RestoreOptions { external_fds: vec![(l, fd)], ..Default::default() };
    let e = ck::restore(&p.img(1), &root_only).expect_err("workers without a replacement").to_string();
    assert!(e.contains("child of") && e.contains(&format!("fd {l}")), "{e}");
    let ro = RestoreOptions {
        external_fds: vec![(l, fd)],
        member_external: workers.iter().map(|&w| (w, l, fd)).collect(),
        ..Default::default()
    };
    let r = ck::restore(&p.img(1), &ro).unwrap_or_else(|e| panic!("restore: {e}"));
    let _members = Members { pids: r.tree.clone(), dir: p.dir.path().to_path_buf() };
    assert_eq!(r.tree, rep.tree);
    let me = std::process::id() as i32;
    for &pid in &r.tree {
        assert!(ck::sys::kcmp_file_of(me, fd, pid, l).unwrap(), "member {pid}: fd {l} is not the replacement");
    }
    let mut c = std::os::unix::net::UnixStream::connect(p.path("sock2")).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"who?").unwrap();
    let mut b = [0u8; 4];
    std::io::Read::read_exact(&mut c, &mut b).unwrap();
    let who = i32::from_ne_bytes(b);
    assert!(workers.contains(&who), "answered by {who}, not a worker of {workers:?}");
    drop(c);
    p.pid = r.pid;
    p.go();
    p.expect_pass();
    drop(listener);
}

/// Pre-copy of a program that keeps writing its pages (and mapping, moving, unmapping and
/// discarding memory) while it is copied: every page comes back with the last value written.
#[test]
fn precopy_writer() {
    if !root() {
        return;
    }
    let mut p = Prog::start("precopy_writer");
    let rep = p.move_once_precopy(1);
    // The first round copied most of the 64 MiB buffer (pages discarded, or in a region
    // unmapped under the read, are left to the freeze); the freeze left part of it to the store.
    assert!(rep.precopy[0].bytes >= 32 << 20, "first round copied {} bytes", rep.precopy[0].bytes);
    assert!(rep.precopied_bytes > 0, "nothing was left to the pre-copy store");
    p.go();
    p.expect_pass();
}

/// A lazy restore (a move's, when pre-copied pages are already on the destination): the
/// process runs before its pre-copied pages are in. With the background copy held, each first
/// touch is a fault the restorer serves — a `read` into such a page (a fault in the kernel), a
/// child forked meanwhile, pages moved with mremap, discarded (they must read as zeros) and
/// unmapped — and every page is right. The restoring thread guards the process meanwhile
/// (ptrace) and passes its signals on (the forked child's SIGCHLD among them).
#[test]
fn lazy_restore_serves_faults_forks_and_remaps() {
    if !root() {
        return;
    }
    let mut p = Prog::start("lazy_events");
    let img = lazy_image(&mut p);
    let (tx, rx) = std::sync::mpsc::channel();
    // The restoring thread stays the process's tracer until the copy is done.
    let restorer = std::thread::spawn(move || {
        let opts = RestoreOptions { lazy_precopy: true, lazy_paused: true, ..Default::default() };
        let (r, held) = ck::restore_held(&img, &opts).unwrap_or_else(|e| panic!("restore failed: {e}"));
        assert!(r.lazy_bytes >= 16 << 20, "only {} bytes left to the lazy copy", r.lazy_bytes);
        let pid = held.pid();
        let guarded = held.resume_guarded().unwrap().expect("a lazy copy");
        assert_eq!(guarded.unguarded(), None);
        tx.send((pid, guarded.releaser())).unwrap();
        guarded.finish()
    });
    let (pid, release) = rx.recv().unwrap();
    p.pid = pid;
    assert_ne!(tracer_of(pid), 0, "the process runs unguarded during the copy");
    p.go();
    let t = Instant::now();
    while !read(&p.out()).contains("PASS") && !read(&p.out()).contains("FAIL") {
        assert!(t.elapsed() < Duration::from_secs(20), "no result: {}", read(&p.out()));
        std::thread::sleep(Duration::from_millis(5));
    }
    release();
    let st = restorer.join().unwrap();
    let out = read(&p.out());
    assert!(out.contains("PASS") && !out.contains("FAIL"), "{out}");
    assert!(st.faults > 100, "the process met only {} missing pages", st.faults);
    assert_eq!(st.processes, 2, "the forked child was not served: {st:?}");
    let tracer = out.lines().find_map(|l| l.strip_prefix("child tracer ")).and_then(|v| v.trim().parse::<i32>().ok());
    assert!(tracer.is_some_and(|t| t > 0), "the forked child ran unguarded: {out}");
}

/// If the process that copies the pages in dies before it is done (an agent killed mid-copy),
/// the process dies too: pages never copied would read as zeros once the userfaultfd is gone.
#[test]
fn lazy_restore_kills_the_process_if_the_copier_dies() {
    if !root() {
        return;
    }
    let mut p = Prog::start("lazy_events");
    let img = lazy_image(&mut p);
    let restorer = std::thread::spawn(move || {
        let opts = RestoreOptions { lazy_precopy: true, lazy_paused: true, ..Default::default() };
        let (_, held) = ck::restore_held(&img, &opts).unwrap_or_else(|e| panic!("restore failed: {e}"));
        let pid = held.pid();
        let guarded = held.resume_guarded().unwrap().expect("a lazy copy");
        std::mem::forget(guarded); // the copier "dies": its thread ends without finishing
        pid
    });
    let pid = restorer.join().unwrap();
    p.pid = pid;
    let st = wait_exit(pid, Duration::from_secs(10)).expect("the process outlived its copier");
    assert!(libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGKILL, "status {st:#x}");
}

/// Pre-copy dump of `p` (killing it) into img1, with most of its memory left to the store.
fn lazy_image(p: &mut Prog) -> PathBuf {
    let policy = ck::precopy::Policy::default();
    let rep = ck::dump_precopy(p.pid, &p.img(1), AfterDump::Kill, &Default::default(), &policy)
        .unwrap_or_else(|e| panic!("pre-copy dump failed: {e}"));
    assert!(rep.precopied_bytes >= 16 << 20, "only {} bytes left to the store", rep.precopied_bytes);
    wait_exit(p.pid, Duration::from_secs(5));
    p.img(1)
}

fn tracer_of(pid: i32) -> i32 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("TracerPid:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// Programs whose state is not about memory, through the pre-copy path too.
#[test]
fn precopy_keeps_other_state() {
    if !root() {
        return;
    }
    for name in
        ["anon_memory", "threads", "sparse_reservation", "shared_anon", "sig_mask_pending", "vma_flags", "sysv_shm"]
    {
        let mut p = Prog::start(name);
        let rep = p.move_once_precopy(1);
        assert!(rep.precopied_bytes > 0 || name == "sparse_reservation", "{name}: nothing left to the store");
        p.go();
        p.expect_pass();
    }
}

/// A process with a userfaultfd of its own: pre-copy does not touch it, the dump is refused
/// naming the userfaultfd, and the process runs on as it was.
#[test]
fn precopy_refuses_a_process_with_its_own_userfaultfd() {
    if !root() {
        return;
    }
    let p = Prog::start("own_userfaultfd");
    let policy = ck::precopy::Policy::default();
    let e = ck::dump_precopy(p.pid, &p.img(1), AfterDump::Kill, &Default::default(), &policy)
        .expect_err("a pre-copy dump of a process using userfaultfd should be refused")
        .to_string();
    assert!(e.contains("userfaultfd"), "the refusal should name the userfaultfd: {e}");
    assert!(!p.img(1).join("manifest.img").exists());
    assert!(!p.img(1).join("precopy.img").exists());
    p.go();
    p.expect_pass();
}

/// POSIX timers restored the way kernels before 6.17 need (no PR_TIMER_CREATE_RESTORE_IDS):
/// stand-in timers take the ids below each timer's, deleted after. (The test hook is read at
/// restore; `posix_timers` running at the same time takes either path, both keep the ids.)
#[test]
fn posix_timers_by_standins() {
    if !root() {
        return;
    }
    let mut p = Prog::start("posix_timers");
    std::thread::sleep(Duration::from_millis(50));
    std::env::set_var("DVK_TEST_TIMER_STANDINS", "1");
    let dumped = ck::dump(p.pid, &p.img(1), AfterDump::Kill);
    wait_exit(p.pid, Duration::from_secs(5));
    let restored = dumped.and_then(|_| ck::restore(&p.img(1), &RestoreOptions::default()));
    std::env::remove_var("DVK_TEST_TIMER_STANDINS");
    p.pid = restored.unwrap().pid;
    p.go();
    p.expect_pass();
}

#[test]
fn blocked_sigsuspend() {
    if !root() {
        return;
    }
    let mut p = Prog::start("blocked_sigsuspend");
    std::thread::sleep(Duration::from_millis(100));
    p.move_once(1);
    std::thread::sleep(Duration::from_millis(50));
    // SAFETY: signalling the restored program, our child, by pid.
    unsafe { libc::kill(p.pid, libc::SIGUSR1) };
    p.expect_pass();
}

/// A real interpreter: python3 (if installed) with 100+ mappings and a 200 000-entry dict.
#[test]
fn python_interpreter() {
    python(
        "import os, sys, time, hashlib\n\
        d = {i: str(i) * 10 for i in range(200000)}\n\
        print('READY', flush=True)\n\
        while not os.path.exists('go') and time.time() < DEADLINE: time.sleep(0.005)\n\
        h = hashlib.sha256(''.join(d[i] for i in range(0, 200000, 7)).encode()).hexdigest()\n\
        want = hashlib.sha256(''.join(str(i) * 10 for i in range(0, 200000, 7)).encode()).hexdigest()\n\
        print('PASS' if h == want and len(d) == 200000 else 'FAIL', flush=True)\n",
    );
}

/// python3 with four worker threads (GIL, condition variables, thread-local data) that keep
/// computing across the dump and are joined after the restore.
#[test]
fn python_threads() {
    python(
        "import os, threading, time\n\
        local = threading.local()\n\
        results = {}\n\
        def work(n):\n\
        \x20   local.n = n\n\
        \x20   total = 0\n\
        \x20   while not os.path.exists('go') and time.time() < DEADLINE:\n\
        \x20       total += sum(range(1000)); time.sleep(0.001)\n\
        \x20   results[n] = (local.n == n, threading.get_ident() == idents[n])\n\
        idents = {}\n\
        ts = [threading.Thread(target=work, args=(i,), name=f'w{i}') for i in range(4)]\n\
        for i, t in enumerate(ts): t.start(); idents[i] = t.ident\n\
        time.sleep(0.1)\n\
        print('READY', flush=True)\n\
        for t in ts: t.join(20)\n\
        ok = all(not t.is_alive() for t in ts) and all(a and b for a, b in results.values()) and len(results) == 4\n\
        print('PASS' if ok else f'FAIL {results}', flush=True)\n",
    );
}

/// python3 asyncio: the event loop's self-pipe is a socketpair; tasks, a queue and timers go on.
#[test]
fn python_asyncio() {
    python(
        "import asyncio, os\n\
        async def producer(q):\n\
        \x20   for i in range(1000000):\n\
        \x20       await q.put(i); await asyncio.sleep(0.001)\n\
        async def main():\n\
        \x20   q = asyncio.Queue(); got = []\n\
        \x20   t = asyncio.create_task(producer(q))\n\
        \x20   loop = asyncio.get_running_loop()\n\
        \x20   print('READY', flush=True)\n\
        \x20   while not os.path.exists('go') and time.time() < DEADLINE:\n\
        \x20       got.append(await q.get())\n\
        \x20   fut = loop.run_in_executor(None, sum, range(10))\n\
        \x20   ok = got == list(range(len(got))) and await fut == 45\n\
        \x20   t.cancel()\n\
        \x20   print('PASS' if ok else 'FAIL', len(got), flush=True)\n\
        asyncio.run(main())\n",
    );
}

fn python(script: &str) {
    // Every wait in the scripts is bounded: a test that dies never leaves one spinning.
    let script = format!("import time\nDEADLINE = time.time() + 60\n{script}");
    interpreted(&["python3", "-c", &script], &[]);
}

/// A JVM (`java Main.java`, the single-file launcher): ~20 threads, 200+ mappings, a heap of
/// 200 000 map entries, and the NIO selector's AF_UNIX socket pair whose other end the JVM has
/// closed (a socket whose peer is gone).
#[test]
fn java_nio_program() {
    const MAIN: &str = r#"import java.nio.file.*;
public class Main {
    public static void main(String[] a) throws Exception {
        java.nio.channels.Selector s = java.nio.channels.Selector.open();
        java.util.HashMap<Integer, String> m = new java.util.HashMap<>();
        for (int i = 0; i < 200000; i++) m.put(i, "v" + i);
        System.out.println("READY");
        long deadline = System.currentTimeMillis() + 60000;
        while (!Files.exists(Paths.get("go")) && System.currentTimeMillis() < deadline) Thread.sleep(5);
        boolean ok = m.size() == 200000 && m.get(123456).equals("v123456");
        s.wakeup();
        s.selectNow();
        System.out.println(ok ? "PASS" : "FAIL");
    }
}
"#;
    interpreted(&["java", "Main.java"], &[("Main.java", MAIN)]);
}

/// Runs `argv` (an interpreter, skipped if not installed) in a new directory holding `files`;
/// it prints READY, waits for a file `go`, then checks its state and prints PASS. Dumped
/// (killed), restored, told to go.
#[allow(clippy::zombie_processes)] // waited for by pid (the dump kills and reaps it)
fn interpreted(argv: &[&str], files: &[(&str, &str)]) {
    let name = argv[0];
    if !root() {
        return;
    }
    if Command::new(name).arg("--version").output().map(|o| !o.status.success()).unwrap_or(true) {
        eprintln!("SKIP: {name} not installed");
        return;
    }
    let dir = tempfile::Builder::new().prefix(&format!("dvk-fid-{name}-")).tempdir().unwrap();
    for (file, text) in files {
        fs::write(dir.path().join(file), text).unwrap();
    }
    let child = close_stray_fds(&mut Command::new(name))
        .args(&argv[1..])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(File::create(dir.path().join("out")).unwrap())
        .stderr(File::create(dir.path().join("err")).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let t = Instant::now();
    while !read(&dir.path().join("out")).contains("READY") {
        assert!(t.elapsed() < Duration::from_secs(60), "{name}: no READY\n{}", read(&dir.path().join("err")));
        std::thread::sleep(Duration::from_millis(5));
    }
    ck::dump(pid, &dir.path().join("img"), AfterDump::Kill).unwrap_or_else(|e| panic!("{name}: dump: {e}"));
    wait_exit(pid, Duration::from_secs(5));
    let r = ck::restore(&dir.path().join("img"), &RestoreOptions::default())
        .unwrap_or_else(|e| panic!("{name}: restore: {e}"));
    File::create(dir.path().join("go")).unwrap();
    let st = wait_exit(r.pid, Duration::from_secs(20));
    let out = read(&dir.path().join("out"));
    assert!(
        matches!(st, Some(s) if libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0) && out.contains("PASS"),
        "{name}: {st:?}\n{out}\n{}",
        read(&dir.path().join("err"))
    );
}

#[test]
fn credentials() {
    if !root() {
        return;
    }
    let mut p = Prog::start_as("credentials", Some(65534));
    p.move_once(1);
    p.go();
    p.expect_pass();
}

/// Threads of a process running as nobody come back as nobody, every one of them (credentials
/// are per thread in the kernel).
#[test]
fn threads_as_nobody() {
    if !root() {
        return;
    }
    let mut p = Prog::start_as("threads", Some(65534));
    std::thread::sleep(Duration::from_millis(20));
    p.move_once(1);
    p.go();
    p.expect_pass();
}

#[test]
fn stdio_files() {
    if !root() {
        return;
    }
    let mut p = Prog::start("stdio_files");
    p.move_once(1);
    p.go();
    p.expect_pass();
    assert_eq!(read(&p.out()), "out-before\nREADY\nout-after\nPASS\n");
    assert_eq!(read(&p.path("err")), "err-before\nerr-after\n");
}

#[test]
fn blocked_accept() {
    if !root() {
        return;
    }
    let mut p = Prog::start("blocked_accept");
    std::thread::sleep(Duration::from_millis(100));
    p.move_once(1);
    let mut c = std::os::unix::net::UnixStream::connect(p.path("sock")).expect("connect to the restored listener");
    c.write_all(b"g").unwrap();
    p.expect_pass();
}

/// A restored process is dumped and restored again.
#[test]
fn restore_twice() {
    if !root() {
        return;
    }
    let mut p = Prog::start("anon_memory");
    p.move_once(1);
    std::thread::sleep(Duration::from_millis(50));
    p.move_once(2);
    p.go();
    p.expect_pass();
}

/// A multi-threaded process, restored twice in a row.
#[test]
fn threads_restore_twice() {
    if !root() {
        return;
    }
    let mut p = Prog::start("threads");
    std::thread::sleep(Duration::from_millis(20));
    p.move_once(1);
    std::thread::sleep(Duration::from_millis(50));
    p.move_once(2);
    p.go();
    p.expect_pass();
}

/// A multi-threaded process dumped with --leave-running runs on (every thread thawed); later
/// the image restores it again.
#[test]
fn threads_leave_running_then_restore() {
    if !root() {
        return;
    }
    let mut p = Prog::start("threads");
    std::thread::sleep(Duration::from_millis(20));
    ck::dump(p.pid, &p.img(1), AfterDump::LeaveRunning).unwrap();
    let at_dump = fs::metadata(p.out()).unwrap().len();
    p.go();
    p.expect_pass();
    // The original has exited: its pid and tids are free for the copy.
    fs::OpenOptions::new().write(true).open(p.out()).unwrap().set_len(at_dump).unwrap();
    let r = ck::restore(&p.img(1), &RestoreOptions::default()).unwrap();
    assert!(r.same_pid);
    p.pid = r.pid;
    p.go();
    p.expect_pass();
}

/// `dump --leave-running`: the original runs on and the copy (with a new pid) runs too.
#[test]
fn leave_running_both_run() {
    if !root() {
        return;
    }
    let p = Prog::start("snapshot");
    ck::dump(p.pid, &p.img(1), AfterDump::LeaveRunning).unwrap();
    let r = ck::restore(&p.img(1), &RestoreOptions::default()).unwrap();
    assert_ne!(r.pid, p.pid);
    assert!(!r.same_pid);
    // Each reads exactly one byte of the FIFO they share.
    let mut f = fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(p.path("ctl")).unwrap();
    f.write_all(b"gg").unwrap();
    wait_exit(p.pid, Duration::from_secs(10));
    wait_exit(r.pid, Duration::from_secs(10));
    let a = read(&p.path(&format!("res.{}", p.pid)));
    let b = read(&p.path(&format!("res.{}", r.pid)));
    assert_eq!(a, "PASS original\n");
    assert_eq!(b, "PASS copy\n");
}

/// The phases one by one, as the agent drives a move: freeze, write an image twice while the
/// process stays frozen (same mappings and page runs), kill, restore the second.
#[test]
fn phases_one_by_one() {
    if !root() {
        return;
    }
    let mut p = Prog::start("sig_mask_pending");
    let mut f = ck::Frozen::freeze(p.pid).unwrap();
    let a = ck::write_image(&mut f, &p.img(1), &Default::default()).unwrap();
    let b = ck::write_image(&mut f, &p.img(2), &Default::default()).unwrap();
    assert_eq!(a.pages_bytes, b.pages_bytes);
    assert_eq!(a.vmas, b.vmas, "the injection helpers leaked into the second image");
    // (Byte equality is not expected: the kernel refreshes the rseq area's cpu id whenever an
    // injected syscall returns.)
    assert_eq!(
        fs::metadata(p.img(1).join("pages.img")).unwrap().len(),
        fs::metadata(p.img(2).join("pages.img")).unwrap().len()
    );
    f.kill().unwrap();
    wait_exit(p.pid, Duration::from_secs(5));
    let r = ck::restore(&p.img(2), &RestoreOptions::default()).unwrap();
    p.pid = r.pid;
    p.go();
    p.expect_pass();
}

/// An fd left to the caller (how the agent link and virtual sockets will be carried): recorded
/// as external at dump, replaced at restore by an fd the restorer hands in.
#[test]
fn external_fd_replaced() {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    if !root() {
        return;
    }
    let dir = tempfile::Builder::new().prefix("dvk-fid-agent-").tempdir().unwrap();
    let listener = std::os::unix::net::UnixListener::bind(dir.path().join("agent.sock")).unwrap();
    let mut p = Prog::start_in("agent_link", dir, None);
    let (_first, _) = listener.accept().unwrap();
    let fd: i32 = read(&p.out()).split("fd=").nth(1).and_then(|v| v.trim().parse().ok()).expect("fd in READY line");
    // Not marked external, the link (its peer is outside the process) is refused by name.
    let e = ck::dump(p.pid, &p.img(0), AfterDump::Kill).unwrap_err().to_string();
    assert!(e.contains(&format!("fd {fd} (socket:[")) && e.contains("both ends"), "{e}");
    let opts = ck::DumpOptions { external_fds: vec![fd], ..Default::default() };
    ck::dump_with(p.pid, &p.img(1), AfterDump::Kill, &opts).unwrap();
    wait_exit(p.pid, Duration::from_secs(5));
    // Without a replacement the restore is refused before anything is created.
    let e = ck::restore(&p.img(1), &RestoreOptions::default()).unwrap_err().to_string();
    assert!(e.contains(&format!("fd {fd}")) && e.contains("no replacement"), "{e}");
    let (mut mine, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let ro = RestoreOptions { external_fds: vec![(fd, theirs.as_raw_fd())], ..Default::default() };
    let r = ck::restore(&p.img(1), &ro).unwrap();
    drop(theirs);
    p.pid = r.pid;
    mine.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    mine.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    mine.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong");
    p.expect_pass();
}

/// A move's commit point: the copy is restored complete but held in a ptrace stop (no SIGSTOP
/// the program or its parent could see); it runs only once resumed. A held copy that is dropped
/// (a rolled-back move) is killed.
#[test]
fn held_until_resumed() {
    if !root() {
        return;
    }
    let mut p = Prog::start("threads");
    std::thread::sleep(Duration::from_millis(20));
    ck::dump(p.pid, &p.img(1), AfterDump::LeaveRunning).unwrap();
    let at_dump = fs::metadata(p.out()).unwrap().len();
    // Rollback first: the original goes on; a held copy (new pid: the original is alive) dies.
    let (r, held) = ck::restore_held(&p.img(1), &RestoreOptions::default()).unwrap();
    assert!(!r.same_pid);
    let stat = read(Path::new(&format!("/proc/{}/stat", r.pid)));
    assert_eq!(stat.rsplit(')').next().and_then(|x| x.split_whitespace().next()), Some("t"), "{stat}");
    drop(held);
    // SAFETY: probing our own former child by pid.
    assert_ne!(unsafe { libc::kill(r.pid, 0) }, 0, "a dropped held copy must be gone");
    p.go();
    p.expect_pass();
    // Commit: with the original gone, the held copy takes its pid and runs only when resumed.
    fs::OpenOptions::new().write(true).open(p.out()).unwrap().set_len(at_dump).unwrap();
    let (r, held) = ck::restore_held(&p.img(1), &RestoreOptions::default()).unwrap();
    assert!(r.same_pid);
    p.go();
    std::thread::sleep(Duration::from_millis(100));
    assert!(!read(&p.out()).contains("PASS"), "a held copy ran");
    held.resume().unwrap();
    p.pid = r.pid;
    p.expect_pass();
}

/// A process in a job-control stop (SIGSTOP) is dumped and left as it was: stopped.
#[test]
fn stopped_process_stays_stopped() {
    if !root() {
        return;
    }
    let p = Prog::start("anon_memory");
    let state = |pid: i32| {
        let s = read(Path::new(&format!("/proc/{pid}/stat")));
        s.rsplit(')').next().and_then(|r| r.split_whitespace().next()).unwrap_or("?").to_string()
    };
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(p.pid, libc::SIGSTOP) };
    let t = Instant::now();
    while state(p.pid) != "T" && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(2));
    }
    ck::dump(p.pid, &p.img(1), AfterDump::LeaveRunning).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(state(p.pid), "T", "the dump resumed a stopped process");
    // SAFETY: as above.
    unsafe { libc::kill(p.pid, libc::SIGCONT) };
    p.go();
    p.expect_pass();
}

/// Refused dumps name the culprit and leave the process running as it was.
fn refused(name: &'static str, want: &[&str]) {
    if !root() {
        return;
    }
    let p = Prog::start(name);
    let e = ck::dump(p.pid, &p.img(1), AfterDump::Kill).expect_err("dump should be refused").to_string();
    for w in want {
        assert!(e.contains(w), "{name}: error {e:?} should mention {w:?}");
    }
    assert!(!p.img(1).join("manifest.img").exists());
    p.go();
    p.expect_pass();
}

#[test]
fn deleted_big_file_refused() {
    refused("deleted_big_file", &["fd 3", "big.bin", "17825792 bytes of data"]);
}

#[test]
fn deleted_parent_refused() {
    refused("deleted_parent", &["fd 4", "d/f", "directory", "is gone too"]);
}

/// A deleted FIFO whose name was taken before the restore: a `.dvk-ghost.<inode>` name stands
/// in (the program checks its fd's link), the file at the name is left alone.
#[test]
fn deleted_fifo_name_taken() {
    if !root() {
        return;
    }
    let dir = tempfile::Builder::new().prefix("dvk-fid-deleted_fifo-").tempdir().unwrap();
    let mut p = Prog::start_env("deleted_fifo", dir, None, &[("TAKEN", "1")]);
    ck::dump(p.pid, &p.img(1), AfterDump::Kill).unwrap_or_else(|e| panic!("dump failed: {e}"));
    wait_exit(p.pid, Duration::from_secs(5));
    fs::write(p.path("gone.fifo"), b"taken").unwrap();
    let r = ck::restore(&p.img(1), &RestoreOptions::default()).unwrap_or_else(|e| panic!("restore failed: {e}"));
    p.pid = r.pid;
    p.go();
    p.expect_pass();
    assert_eq!(fs::read(p.path("gone.fifo")).unwrap(), b"taken");
}

#[test]
fn deleted_fifo_parent_refused() {
    refused("deleted_fifo_parent", &["fd 4", "d/p", "directory", "is gone too"]);
}

/// A deleted FIFO another process (this one) holds too: refused naming it; the program runs on.
#[test]
fn deleted_fifo_shared_refused() {
    if !root() {
        return;
    }
    let p = Prog::start("deleted_fifo");
    let held =
        fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(format!("/proc/{}/fd/3", p.pid)).unwrap();
    let e = ck::dump(p.pid, &p.img(1), AfterDump::Kill).expect_err("a shared deleted FIFO must be refused").to_string();
    let me = format!("pid {}", std::process::id());
    assert!(e.contains("gone.fifo (deleted)") && e.contains("also open in") && e.contains(&me), "{e}");
    assert!(!p.img(1).join("manifest.img").exists());
    drop(held);
    p.go();
    p.expect_pass();
}

/// Runs tests/fidelity/lock_contender in `dir` (another process looking at a lock); its line.
fn contender(dir: &Path, args: &[&str]) -> String {
    let bin = dir.join("lock_contender");
    if !bin.exists() {
        compile("lock_contender", dir);
    }
    let out = Command::new(&bin).args(args).current_dir(dir).stdin(Stdio::null()).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// POSIX (a write and a read range), OFD (write and read ranges) and flock (LOCK_EX on a
/// description with a dup, LOCK_SH) locks are held by the restored process, restored twice:
/// another process sees each of them as before, with the new owner's pid; the program sees
/// its OFD and flock locks conflict with its other descriptions and its POSIX locks as its own.
#[test]
fn file_lock() {
    if !root() {
        return;
    }
    let mut p = Prog::start("file_lock");
    p.move_once(1);
    p.move_once(2);
    let (d, pid) = (p.dir.path(), p.pid);
    assert_eq!(contender(d, &["posix.lock", "posix", "w", "0", "0"]), format!("HELD w {pid} 0 10"));
    assert_eq!(contender(d, &["posix.lock", "posix", "w", "10", "10"]), "FREE");
    assert_eq!(contender(d, &["posix.lock", "posix", "w", "20", "5"]), format!("HELD r {pid} 20 0"));
    assert_eq!(contender(d, &["posix.lock", "posix", "r", "20", "5"]), "FREE");
    assert_eq!(contender(d, &["ofd.lock", "ofd", "r", "0", "0"]), "HELD w -1 5 10");
    assert_eq!(contender(d, &["ofd.lock", "ofd", "w", "15", "0"]), "HELD r -1 100 10");
    assert_eq!(contender(d, &["flock_ex.lock", "flock", "sh"]), "HELD");
    assert_eq!(contender(d, &["flock_sh.lock", "flock", "sh"]), "FREE");
    assert_eq!(contender(d, &["flock_sh.lock", "flock", "ex"]), "HELD");
    p.go();
    p.expect_pass();
}

/// A lock another process took between the dump and the restore fails the restore, naming the
/// file, the lock and the holder; nothing runs without its lock (the pid stays free). Once the
/// lock is free, the same image restores.
#[test]
fn file_lock_taken_meanwhile_fails_restore() {
    use std::os::fd::AsRawFd;
    if !root() {
        return;
    }
    let mut p = Prog::start("file_lock");
    ck::dump(p.pid, &p.img(1), AfterDump::Kill).unwrap();
    wait_exit(p.pid, Duration::from_secs(5));
    let me = std::process::id();
    let open = |f: &str| fs::OpenOptions::new().read(true).write(true).open(p.path(f)).unwrap();
    let gone = |pid: i32| {
        // SAFETY: a signal-0 probe of a pid.
        unsafe { libc::kill(pid, 0) != 0 }
    };

    // A POSIX write lock on byte 25, inside the program's read lock 20-EOF.
    let posix = open("posix.lock");
    let l =
        libc::flock { l_type: libc::F_WRLCK as i16, l_whence: libc::SEEK_SET as i16, l_start: 25, l_len: 1, l_pid: 0 };
    // SAFETY: fcntl(F_SETLK) on an fd we own with a valid struct flock.
    assert_eq!(unsafe { libc::fcntl(posix.as_raw_fd(), libc::F_SETLK, &l) }, 0);
    let e = ck::restore(&p.img(1), &RestoreOptions::default()).expect_err("restore should fail").to_string();
    for w in ["fd 3", "posix.lock", "POSIX read lock on bytes 20-EOF", &format!("pid {me} ("), "not run"] {
        assert!(e.contains(w), "error {e:?} should mention {w:?}");
    }
    assert!(gone(p.pid), "a process runs without its lock");
    drop(posix); // closing releases our POSIX lock

    // flock LOCK_SH on another description of the file the program holds LOCK_EX on.
    let ex = open("flock_ex.lock");
    // SAFETY: flock on an fd we own.
    assert_eq!(unsafe { libc::flock(ex.as_raw_fd(), libc::LOCK_SH) }, 0);
    let e = ck::restore(&p.img(1), &RestoreOptions::default()).expect_err("restore should fail").to_string();
    for w in ["fd 5", "flock_ex.lock", "flock LOCK_EX lock", &format!("pid {me} (")] {
        assert!(e.contains(w), "error {e:?} should mention {w:?}");
    }
    assert!(gone(p.pid), "a process runs without its lock");
    drop(ex);

    let r = ck::restore(&p.img(1), &RestoreOptions::default()).unwrap();
    assert!(r.same_pid);
    p.pid = r.pid;
    assert_eq!(contender(p.dir.path(), &["flock_ex.lock", "flock", "sh"]), "HELD");
    p.go();
    p.expect_pass();
}

/// Frozen while waiting for a flock and a POSIX lock (F_SETLKW, on another thread) that another
/// process holds: the waits go on after the restore, and when that process lets go the restored
/// one gets both locks (another process then sees them held by it).
#[test]
fn blocked_lock() {
    use std::os::fd::AsRawFd;
    if !root() {
        return;
    }
    let dir = tempfile::Builder::new().prefix("dvk-fid-blocked_lock-").tempdir().unwrap();
    let open = |f: &str| {
        fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(dir.path().join(f)).unwrap()
    };
    let (posix, fl) = (open("posix.lock"), open("flock.lock"));
    let l =
        libc::flock { l_type: libc::F_WRLCK as i16, l_whence: libc::SEEK_SET as i16, l_start: 0, l_len: 0, l_pid: 0 };
    // SAFETY: fcntl(F_SETLK) and flock on fds we own, with a valid struct flock.
    unsafe {
        assert_eq!(libc::fcntl(posix.as_raw_fd(), libc::F_SETLK, &l), 0);
        assert_eq!(libc::flock(fl.as_raw_fd(), libc::LOCK_EX), 0);
    }
    let mut p = Prog::start_in("blocked_lock", dir, None);
    let t = Instant::now();
    while !read(&p.out()).contains("waiting") {
        assert!(t.elapsed() < Duration::from_secs(10), "no waiting line");
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(100)); // into the waits
    p.move_once(1);
    drop(posix); // closing our fd releases our POSIX lock
    drop(fl);
    let pid = p.pid;
    let t = Instant::now();
    while contender(p.dir.path(), &["posix.lock", "posix", "r", "0", "1"]) != format!("HELD w {pid} 0 10") {
        assert!(t.elapsed() < Duration::from_secs(10), "the restored process did not get the POSIX lock");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The flock: taken by the restored process once ours was dropped (a description of its own).
    let t = Instant::now();
    while contender(p.dir.path(), &["flock.lock", "flock", "sh"]) != "HELD" {
        assert!(t.elapsed() < Duration::from_secs(10), "the restored process did not get the flock");
        std::thread::sleep(Duration::from_millis(10));
    }
    p.go();
    p.expect_pass();
}

/// A flock lock on an open file description another process shares (here this one, through
/// pidfd_getfd) belongs to the description, which cannot follow: refused by fd and file,
/// naming the sharer; the program runs on with its locks.
#[test]
fn file_lock_shared_description_refused() {
    use std::os::fd::{FromRawFd, OwnedFd};
    if !root() {
        return;
    }
    let p = Prog::start("file_lock");
    // SAFETY: integer-only syscalls; the fd returned is ours and owned by the OwnedFd.
    let copy = unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, p.pid, 0) as i32;
        assert!(pidfd >= 0);
        let fd = libc::syscall(libc::SYS_pidfd_getfd, pidfd, 5, 0) as i32;
        libc::close(pidfd);
        assert!(fd >= 0);
        OwnedFd::from_raw_fd(fd)
    };
    let me = std::process::id();
    let e = ck::dump(p.pid, &p.img(1), AfterDump::Kill).expect_err("dump should be refused").to_string();
    for w in ["fd 5", "flock_ex.lock", "file lock", "FLOCK", &format!("pid {me} ("), "description"] {
        assert!(e.contains(w), "error {e:?} should mention {w:?}");
    }
    assert!(!p.img(1).join("manifest.img").exists());
    drop(copy);
    p.go();
    p.expect_pass();
}

/// The "shm <keyed id> <key> <removed id>" line sysv_shm prints before READY.
fn shm_ids(p: &Prog) -> (i32, i32, i32) {
    let out = read(&p.out());
    let l = out.lines().find_map(|l| l.strip_prefix("shm ")).expect("shm line");
    let v: Vec<i32> = l.split_whitespace().map(|x| x.parse().unwrap()).collect();
    (v[0], v[1], v[2])
}

/// Removes a SysV segment when a test ends, however it ends.
struct RmShm(i32);
impl Drop for RmShm {
    fn drop(&mut self) {
        // SAFETY: IPC_RMID takes no buffer; removing a segment a test made (or took) by id.
        unsafe { libc::shmctl(self.0, libc::IPC_RMID, std::ptr::null_mut()) };
    }
}

fn shm_exists(id: i32) -> bool {
    read(Path::new("/proc/sysvipc/shm")).lines().skip(1).any(|l| l.split_whitespace().nth(1) == Some(&id.to_string()))
}

/// SysV shared memory, restored twice on the same machine: the keyed segment outlives the
/// process and is attached again as it is (twice, one attachment split by mprotect, one
/// SHM_RDONLY); the IPC_RMID-ed one, gone with the process, is created again under its id with
/// its contents and removed again once attached.
#[test]
fn sysv_shm() {
    if !root() {
        return;
    }
    let mut p = Prog::start("sysv_shm");
    let (id, _, rid) = shm_ids(&p);
    let _rm = RmShm(id);
    p.move_once(1);
    p.move_once(2);
    assert!(shm_exists(rid), "the removed segment is not attached");
    p.go();
    p.expect_pass();
    assert!(!shm_exists(rid), "the removed segment outlived its last attachment");
}

/// The keyed segment is gone when the image is restored (as on another machine): it is created
/// again under the same id and key, with its contents, mode and owner.
#[test]
fn sysv_shm_recreated() {
    if !root() {
        return;
    }
    let mut p = Prog::start("sysv_shm");
    let (id, key, _) = shm_ids(&p);
    let _rm = RmShm(id);
    ck::dump(p.pid, &p.img(1), AfterDump::Kill).unwrap();
    wait_exit(p.pid, Duration::from_secs(5));
    drop(RmShm(id));
    assert!(!shm_exists(id));
    let r = ck::restore(&p.img(1), &RestoreOptions::default()).unwrap();
    p.pid = r.pid;
    let line = read(Path::new("/proc/sysvipc/shm"))
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(&id.to_string()))
        .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
        .expect("segment created again");
    assert_eq!(line[0], key.to_string());
    p.go();
    p.expect_pass();
}

/// A segment whose id is taken on the restoring machine by another segment cannot be restored
/// (the program holds the id): the restore fails naming both, before it creates anything (no
/// segment, no process); with the id free again, the image restores.
#[test]
fn sysv_shm_id_taken_refused() {
    if !root() {
        return;
    }
    let mut p = Prog::start("sysv_shm");
    let (id, _, rid) = shm_ids(&p);
    let _rm = RmShm(id);
    ck::dump(p.pid, &p.img(1), AfterDump::Kill).unwrap();
    wait_exit(p.pid, Duration::from_secs(5));
    drop(RmShm(id));
    let squatter = ck::sysv::create_at(id, 0, 4096, 0o600).unwrap();
    let sq = RmShm(squatter);
    assert_eq!(squatter, id, "could not take the segment's id");
    let e = ck::restore(&p.img(1), &RestoreOptions::default()).expect_err("restore should fail").to_string();
    for w in [format!("SysV shared memory segment {id}"), "taken".into(), "4096 bytes".into()] {
        assert!(e.contains(&w), "error {e:?} should mention {w:?}");
    }
    // SAFETY: a signal-0 probe of a pid.
    assert!(unsafe { libc::kill(p.pid, 0) } != 0, "a process runs without its segment");
    assert!(!shm_exists(rid), "the failed restore left segment {rid} behind");
    drop(sq);
    let r = ck::restore(&p.img(1), &RestoreOptions::default()).unwrap();
    p.pid = r.pid;
    p.go();
    p.expect_pass();
}

/// The "sem <id> msg <id> key <key>" line sysv_sem_msg and tree_sysv_sem print before READY.
fn sem_msg_ids(p: &Prog) -> (i32, i32, i32) {
    let out = read(&p.out());
    let l = out.lines().find_map(|l| l.strip_prefix("sem ")).expect("sem line");
    let v: Vec<i32> = l.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    (v[0], v[1], v[2])
}

/// Removes a SysV semaphore set / message queue when a test ends, however it ends.
struct RmSem(i32);
impl Drop for RmSem {
    fn drop(&mut self) {
        // SAFETY: IPC_RMID takes no argument; removing a set a test made (or took) by id.
        unsafe { libc::semctl(self.0, 0, libc::IPC_RMID) };
    }
}
struct RmMsg(i32);
impl Drop for RmMsg {
    fn drop(&mut self) {
        // SAFETY: IPC_RMID takes no buffer; removing a queue a test made (or took) by id.
        unsafe { libc::msgctl(self.0, libc::IPC_RMID, std::ptr::null_mut()) };
    }
}

/// The line of /proc/sysvipc/<kind> for object `id`, split.
fn sysvipc_line(kind: &str, id: i32) -> Option<Vec<String>> {
    read(&Path::new("/proc/sysvipc").join(kind))
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
        .find(|t| t.get(1) == Some(&id.to_string()))
}

/// Waits (bounded) until `pid` is waiting in one of the system calls `nrs` (/proc/PID/syscall).
fn wait_in_syscall(pid: i32, nrs: &[i64]) {
    let t = Instant::now();
    loop {
        let s = read(Path::new(&format!("/proc/{pid}/syscall")));
        if s.split_whitespace().next().and_then(|n| n.parse::<i64>().ok()).is_some_and(|n| nrs.contains(&n)) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "pid {pid} not waiting in {nrs:?}: {s}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The program's set and queue removed (as when the image is restored on another machine).
fn remove_sem_msg(sem: i32, msg: i32) {
    drop(RmSem(sem));
    drop(RmMsg(msg));
    assert!(sysvipc_line("sem", sem).is_none() && sysvipc_line("msg", msg).is_none(), "not removed");
}

/// SysV semaphores and message queues gone when the image is restored (as on another machine):
/// created again under their ids, key, mode and size limit, with every value and every message
/// (the program checks them byte for byte, then uses both). Moved twice: the restored process
/// is seen using them again by the second dump.
#[test]
fn sysv_sem_msg_recreated() {
    if !root() {
        return;
    }
    let mut p = Prog::start("sysv_sem_msg");
    let (sem, msg, key) = sem_msg_ids(&p);
    let _rm = (RmSem(sem), RmMsg(msg));
    for n in 1..=2 {
        ck::dump(p.pid, &p.img(n), AfterDump::Kill).unwrap_or_else(|e| panic!("dump {n}: {e}"));
        wait_exit(p.pid, Duration::from_secs(5));
        remove_sem_msg(sem, msg);
        let r = ck::restore(&p.img(n), &RestoreOptions::default()).unwrap_or_else(|e| panic!("restore {n}: {e}"));
        p.pid = r.pid;
        let s = sysvipc_line("sem", sem).expect("semaphore set created again");
        assert_eq!((s[0].as_str(), s[2].as_str(), s[3].as_str()), ("0", "640", "3"), "{s:?}");
        let q = sysvipc_line("msg", msg).expect("queue created again");
        assert_eq!((q[0].clone(), q[2].as_str(), q[4].as_str()), (key.to_string(), "620", "5"), "{q:?}");
        // The restored process made the last operations on both.
        assert_eq!(q[5], p.pid.to_string(), "lspid {q:?}");
    }
    p.go();
    p.expect_pass();
}

/// Restored on the same machine, the set and queue still there: used as they are, not written
/// from the image — a message sent to the queue after the dump is still there and its raised
/// `msg_qbytes` kept (the program checks both, told by the file "late"), nothing is duplicated.
#[test]
fn sysv_sem_msg_live() {
    if !root() {
        return;
    }
    let mut p = Prog::start("sysv_sem_msg");
    let (sem, msg, _) = sem_msg_ids(&p);
    let _rm = (RmSem(sem), RmMsg(msg));
    ck::dump(p.pid, &p.img(1), AfterDump::Kill).unwrap();
    wait_exit(p.pid, Duration::from_secs(5));
    // SAFETY: msqid_ds is plain data; IPC_STAT fills it, IPC_SET reads it, within the calls.
    unsafe {
        let mut ds: libc::msqid_ds = std::mem::zeroed();
        assert_eq!(libc::msgctl(msg, libc::IPC_STAT, &mut ds), 0);
        ds.msg_qbytes = 12000;
        assert_eq!(libc::msgctl(msg, libc::IPC_SET, &mut ds), 0);
    }
    let mut m = 9i64.to_ne_bytes().to_vec();
    m.extend_from_slice(b"late");
    // SAFETY: msgsnd reads the type and the 4 bytes of text from `m`, which lives through it.
    assert_eq!(unsafe { libc::msgsnd(msg, m.as_ptr().cast(), 4, libc::IPC_NOWAIT) }, 0);
    fs::write(p.path("late"), "").unwrap();
    let r = ck::restore(&p.img(1), &RestoreOptions::default()).unwrap();
    p.pid = r.pid;
    p.go();
    p.expect_pass();
}

/// A semaphore set whose id is taken on the restoring machine by another set cannot be restored
/// (the program holds the id): the restore fails naming both, before it creates anything (no
/// queue, no process); with the id free again, the image restores.
#[test]
fn sysv_sem_id_taken_refused() {
    if !root() {
        return;
    }
    let mut p = Prog::start("sysv_sem_msg");
    let (sem, msg, _) = sem_msg_ids(&p);
    let _rm = (RmSem(sem), RmMsg(msg));
    ck::dump(p.pid, &p.img(1), AfterDump::Kill).unwrap();
    wait_exit(p.pid, Duration::from_secs(5));
    remove_sem_msg(sem, msg);
    let squatter = ck::sysv::create_sem_at(sem, 0, 1, 0o600).unwrap();
    let sq = RmSem(squatter);
    assert_eq!(squatter, sem, "could not take the set's id");
    let e = ck::restore(&p.img(1), &RestoreOptions::default()).expect_err("restore should fail").to_string();
    for w in [
        format!("SysV semaphore set {sem} (key 0x00000000, 3 semaphores)"),
        "taken here by another set (key 0x00000000, 1 semaphore)".into(),
    ] {
        assert!(e.contains(&w), "error {e:?} should mention {w:?}");
    }
    // SAFETY: a signal-0 probe of a pid.
    assert!(unsafe { libc::kill(p.pid, 0) } != 0, "a process runs without its semaphores");
    assert!(sysvipc_line("msg", msg).is_none(), "the failed restore left queue {msg} behind");
    drop(sq);
    let r = ck::restore(&p.img(1), &RestoreOptions::default()).unwrap();
    p.pid = r.pid;
    p.go();
    p.expect_pass();
}

/// The set and queue a restore made are removed when the restored process is killed before it
/// runs (a held restore given up, as a failed move does; a restore that fails later drops them
/// the same way); they stay once it runs. A queue whose id is taken is refused by the check,
/// before the set is made.
#[test]
fn sysv_sem_msg_removed_with_failed_restore() {
    if !root() {
        return;
    }
    let mut p = Prog::start("sysv_sem_msg");
    let (sem, msg, key) = sem_msg_ids(&p);
    let _rm = (RmSem(sem), RmMsg(msg));
    ck::dump(p.pid, &p.img(1), AfterDump::Kill).unwrap();
    wait_exit(p.pid, Duration::from_secs(5));
    remove_sem_msg(sem, msg);
    let other = ck::sysv::create_msg_at(msg, key ^ 0x5a5a, 0o600).unwrap();
    let sq = RmMsg(other);
    assert_eq!(other, msg, "could not take the queue's id");
    let e = ck::restore(&p.img(1), &RestoreOptions::default()).expect_err("restore should fail").to_string();
    assert!(e.contains(&format!("SysV message queue {msg} (key {:#010x})", key as u32)) && e.contains("taken"), "{e}");
    assert!(sysvipc_line("sem", sem).is_none(), "the refused restore made set {sem}");
    drop(sq);
    let (_, held) = ck::restore_held(&p.img(1), &RestoreOptions::default()).unwrap();
    assert!(sysvipc_line("sem", sem).is_some() && sysvipc_line("msg", msg).is_some(), "not made");
    held.kill().unwrap();
    wait_exit(p.pid, Duration::from_secs(5));
    assert!(sysvipc_line("sem", sem).is_none(), "set {sem} outlived the restore given up");
    assert!(sysvipc_line("msg", msg).is_none(), "queue {msg} outlived the restore given up");
    let (r, held) = ck::restore_held(&p.img(1), &RestoreOptions::default()).unwrap();
    p.pid = r.pid;
    held.resume().unwrap();
    p.go();
    p.expect_pass();
}

/// A process that did a semop with SEM_UNDO is refused by name (its adjustments cannot be read);
/// it runs on.
#[test]
fn sysv_sem_undo_refused() {
    sem_refused("sysv_sem_undo");
}

/// A multi-threaded process using a semaphore set is refused the same way, SEM_UNDO or not:
/// its threads gave it an undo list (the price of the rule, see docs/CHECKPOINT.md).
#[test]
fn sysv_sem_threads_refused() {
    sem_refused("sysv_sem_threads");
}

/// `name` (printing "sem <id>") is refused for its SysV undo list, naming its set; it runs on.
fn sem_refused(name: &'static str) {
    if !root() {
        return;
    }
    let p = Prog::start(name);
    let out = read(&p.out());
    let sem: i32 = out.lines().find_map(|l| l.strip_prefix("sem ")).and_then(|x| x.trim().parse().ok()).unwrap();
    let _rm = RmSem(sem);
    let e = ck::dump(p.pid, &p.img(1), AfterDump::Kill).expect_err("dump should be refused").to_string();
    let set = format!("SysV semaphore set {sem} (key 0x00000000, 1 semaphore)");
    for w in ["SysV semaphore undo state", "SEM_UNDO", "undo list", &set] {
        assert!(e.contains(w), "{name}: error {e:?} should mention {w:?}");
    }
    assert!(!p.img(1).join("manifest.img").exists());
    p.go();
    p.expect_pass();
}

/// Parent and child of a tree share a semaphore set and a message queue, both seen using them:
/// removed before the restore, each is made once (by the parent), and the two meet through them
/// again.
#[test]
fn tree_sysv_sem() {
    if !root() {
        return;
    }
    let mut p = Prog::start("tree_sysv_sem");
    let (sem, msg, _) = sem_msg_ids(&p);
    let _rm = (RmSem(sem), RmMsg(msg));
    let opts = ck::DumpOptions { tree: true, ..Default::default() };
    let rep = ck::dump_with(p.pid, &p.img(1), AfterDump::Kill, &opts).unwrap();
    assert_eq!(rep.tree.len(), 2, "members dumped: {:?}", rep.tree);
    wait_exit(p.pid, Duration::from_secs(5));
    // Both members are seen using them (each did a last operation on them): stored once, in the
    // parent's image.
    let ids = |m: i32| {
        let man = ck::image::read(&p.img(1).join(m.to_string())).unwrap().manifest;
        (man.sem.iter().map(|s| s.id).collect::<Vec<_>>(), man.msg.iter().map(|q| q.id).collect::<Vec<_>>())
    };
    assert_eq!(ids(rep.tree[0]), (vec![sem], vec![msg]), "the parent's image");
    assert_eq!(ids(rep.tree[1]), (vec![], vec![]), "the child's image");
    // SAFETY: GETPID takes no argument.
    assert_eq!(unsafe { libc::semctl(sem, 1, libc::GETPID) }, rep.tree[1], "the child's semop was not the last");
    assert_eq!(sysvipc_line("msg", msg).unwrap()[6], rep.tree[1].to_string(), "the child's msgrcv was not the last");
    remove_sem_msg(sem, msg);
    let r = ck::restore(&p.img(1), &RestoreOptions::default()).unwrap_or_else(|e| panic!("restore failed: {e}"));
    let _members = Members { pids: r.tree.clone(), dir: p.dir.path().to_path_buf() };
    assert_eq!(r.tree, rep.tree);
    p.pid = r.pid;
    assert!(sysvipc_line("sem", sem).is_some() && sysvipc_line("msg", msg).is_some());
    p.go();
    p.expect_pass();
}

#[test]
fn sysv_shm_partial_refused() {
    refused("sysv_shm_partial", &["SysV shared memory segment", "attached only in part"]);
}

#[test]
fn file_lease_refused() {
    refused("file_lease", &["fd 3", "leased", "LEASE", "F_SETLEASE"]);
}

#[test]
fn posix_timer_refused() {
    refused("posix_timer", &["POSIX timer 0", "overrun", "timer_getoverrun"]);
}

#[test]
fn posix_timer_dead_thread_refused() {
    refused("posix_timer_dead_thread", &["POSIX timer 0", "thread that has exited", "SIGEV_THREAD_ID"]);
}

#[test]
fn io_uring_refused() {
    refused("io_uring", &["fd 3", "io_uring"]);
}

/// The unread bytes of a pty cannot be peeked: the dump reads them and writes them back at once.
/// A process left running after its dump (a snapshot) finds every byte and every line as before.
#[test]
fn pty_pair_left_running() {
    if !root() {
        return;
    }
    let p = Prog::start("pty_pair");
    ck::dump(p.pid, &p.img(1), AfterDump::LeaveRunning).unwrap();
    p.go();
    p.expect_pass();
}

/// A new pty pair for the driver: the master (non-blocking) and the slave's path.
fn open_pty() -> (File, String) {
    // SAFETY: posix_openpt/grantpt/unlockpt on the fd just opened; ptsname's static buffer is
    // copied at once (one test thread uses it).
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC);
        assert!(m >= 0);
        assert_eq!(libc::grantpt(m), 0);
        assert_eq!(libc::unlockpt(m), 0);
        let name = std::ffi::CStr::from_ptr(libc::ptsname(m)).to_string_lossy().into_owned();
        (std::os::fd::FromRawFd::from_raw_fd(m), name)
    }
}

/// Reads what appears on the terminal whose master is `m` into `said` until it holds `until`
/// (at most 10 s).
fn hear(m: &mut File, said: &mut Vec<u8>, until: &str) {
    let t = Instant::now();
    while !String::from_utf8_lossy(said).contains(until) && t.elapsed() < Duration::from_secs(10) {
        let mut b = [0u8; 4096];
        match std::io::Read::read(m, &mut b) {
            Ok(n) => said.extend_from_slice(&b[..n]),
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// An interactive program survives a dump and a restore in a shell (CRIU's `--shell-job`): a
/// job of a stand-in shell, stdin and stderr on the shell's terminal, is dumped with
/// `shell_job` (without it the terminal is refused, naming the option) and restored by
/// `migrate-cli restore --shell-job` running as the only process of another terminal's session:
/// the job gets that terminal with its raw settings, in the foreground, reads a key typed there
/// and writes to it; the CLI waits for it and exits with its status.
#[test]
fn shell_job() {
    if !root() {
        return;
    }
    let cli = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().join("migrate-cli");
    if !cli.exists() {
        eprintln!("SKIP: {} not built (cargo build -p migrate-cli)", cli.display());
        return;
    }
    let dir = tempfile::Builder::new().prefix("dvk-fid-shell_job-").tempdir().unwrap();
    let (_m1, pts1) = open_pty();
    // The shell stand-in is ours; the job is its child, reaped by it.
    let p = Prog::start_env("shell_job", dir, None, &[("PTS", &pts1)]);
    let job: i32 = read(&PathBuf::from(format!("/proc/{}/task/{}/children", p.pid, p.pid))).trim().parse().unwrap();

    let e = ck::dump(job, &p.img(1), AfterDump::LeaveRunning).expect_err("a terminal is refused").to_string();
    assert!(e.contains("fd 0 (stdin, ") && e.contains(&pts1) && e.contains("--shell-job"), "{e}");
    let opts = ck::DumpOptions { shell_job: true, ..Default::default() };
    ck::dump_with(job, &p.img(1), AfterDump::Kill, &opts).unwrap();
    // Without --shell-job the image is refused before anything is made.
    let e = ck::restore(&p.img(1), &RestoreOptions::default()).expect_err("needs --shell-job").to_string();
    assert!(e.contains("shell job") && e.contains("--shell-job"), "{e}");

    let (mut m2, pts2) = open_pty();
    fs::write(p.path("newtty"), &pts2).unwrap();
    m2.write_all(b"x").unwrap(); // typed ahead on the new terminal
    let mut cmd = Command::new(&cli);
    cmd.args(["restore", "--shell-job", "--images"]).arg(p.img(1)).stdout(Stdio::null());
    let pts2c = std::ffi::CString::new(pts2.clone()).unwrap();
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: async-signal-safe calls between fork and exec: a new session whose controlling
        // terminal is pts2 (its first terminal), as stdin and stderr.
        unsafe {
            cmd.pre_exec(move || {
                libc::setsid();
                let t = libc::open(pts2c.as_ptr(), libc::O_RDWR);
                if t < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::dup2(t, 0);
                libc::dup2(t, 2);
                libc::close(t);
                Ok(())
            });
        }
    }
    let restorer = close_stray_fds(&mut cmd).spawn().unwrap();
    let rpid = restorer.id() as i32;
    drop(restorer);
    // Go once the restorer says the job runs (on the terminal, its stderr).
    let mut said = Vec::new();
    hear(&mut m2, &mut said, "waiting for it to end");
    assert!(
        String::from_utf8_lossy(&said).contains("waiting for it to end"),
        "the restorer did not restore the job: {}\n--- job\n{}",
        String::from_utf8_lossy(&said),
        read(&p.out())
    );
    p.go();
    hear(&mut m2, &mut said, "hello\r\n");
    let st = wait_exit(rpid, Duration::from_secs(20));
    let out = read(&p.out());
    let said = String::from_utf8_lossy(&said).into_owned();
    assert!(out.contains("PASS") && !out.contains("FAIL"), "job: {out}\n--- its terminal\n{said}");
    assert!(matches!(st, Some(s) if libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0), "restorer: {st:?}\n{said}");
    assert!(said.contains("shell job") && said.contains("via tty\r\nhello\r\n"), "{said}");
    drop(p); // kills the shell stand-in
}

#[test]
fn aio_ring_refused() {
    refused("aio_ring", &["/[aio]", "AIO context (io_setup)"]);
}

#[test]
fn fanotify_pending_refused() {
    refused("fanotify_pending", &["fd 3 (anon_inode:[fanotify])", "unread fanotify events"]);
}

#[test]
fn ns_other_refused() {
    refused("ns_other", &["fd 3 (uts:[", "uts namespace other than the restorer's"]);
}

/// A pty whose master is outside the process (here the driver holds it) is refused, naming
/// the fd, the pty and who holds the other end.
#[test]
fn pty_outside_refused() {
    if !root() {
        return;
    }
    let (mut m, pts) = open_pty();
    let dir = tempfile::Builder::new().prefix("dvk-fid-pty_outside-").tempdir().unwrap();
    let p = Prog::start_env("pty_outside", dir, None, &[("PTS", &pts)]);
    let e = ck::dump(p.pid, &p.img(1), AfterDump::Kill).expect_err("must be refused").to_string();
    let me = format!("pid {} (", std::process::id());
    assert!(
        e.contains(&format!("fd 3 ({pts})")) && e.contains("whose master is not in the process") && e.contains(&me),
        "{e}"
    );
    assert!(!p.img(1).join("manifest.img").exists());
    p.go();
    p.expect_pass();
    let mut said = Vec::new();
    hear(&mut m, &mut said, "still");
    assert!(String::from_utf8_lossy(&said).contains("still\r\n"));
}

#[test]
fn pty_half_refused() {
    refused("pty_half", &["fd 3", "/dev/pts/", "slave of pty", "master was closed"]);
}

#[test]
fn pidfd_other_refused() {
    refused("pidfd_other", &["fd 3", "pidfd of pid", "another live process"]);
}

#[test]
fn child_process_refused() {
    refused("child_process", &["children", "process trees"]);
}

/// A FIFO that another process (here the test) holds too is refused, naming it and the holder.
#[test]
fn fifo_shared_refused() {
    if !root() {
        return;
    }
    let p = Prog::start("fifo");
    let held = fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(p.path("ctl")).unwrap();
    let e = ck::dump(p.pid, &p.img(1), AfterDump::Kill).expect_err("a shared FIFO must be refused").to_string();
    let me = format!("pid {}", std::process::id());
    assert!(e.contains("ctl") && e.contains("also open in") && e.contains(&me), "{e}");
    assert!(!p.img(1).join("manifest.img").exists());
    drop(held);
    p.go();
    p.expect_pass();
}

/// A pipe the program reopened through /proc, one of whose descriptions another process (this
/// one) holds too: refused naming it; the program runs on.
#[test]
fn pipe_reopen_shared_refused() {
    if !root() {
        return;
    }
    let p = Prog::start("pipe_reopen");
    let held =
        fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(format!("/proc/{}/fd/3", p.pid)).unwrap();
    let e = ck::dump(p.pid, &p.img(1), AfterDump::Kill).expect_err("a shared pipe must be refused").to_string();
    let me = format!("pid {}", std::process::id());
    assert!(e.contains("reopened through /proc") && e.contains("also open in") && e.contains(&me), "{e}");
    assert!(!p.img(1).join("manifest.img").exists());
    drop(held);
    p.go();
    p.expect_pass();
}

#[test]
fn pdeathsig_refused() {
    refused("pdeathsig", &["parent-death signal", "PR_SET_PDEATHSIG 10"]);
}

#[test]
fn own_namespace_refused() {
    refused("own_uts_namespace", &["its own uts namespace", "namespaces are not carried"]);
}

/// The tids in /proc/PID/task, sorted.
fn task_ids(pid: i32) -> Vec<i32> {
    let mut v: Vec<i32> = fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// The State letter of /proc/PID/status ('?' if unreadable).
fn state_of(pid: i32) -> char {
    read(Path::new(&format!("/proc/{pid}/status")))
        .lines()
        .find_map(|l| l.strip_prefix("State:"))
        .and_then(|v| v.trim().chars().next())
        .unwrap_or('?')
}

/// Bounded wait until the leader of `pid` is a zombie again (it exits as the restore detaches it).
fn leader_becomes_zombie(pid: i32) -> bool {
    for _ in 0..2000 {
        if state_of(pid) == 'Z' {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

/// The main thread called pthread_exit while two threads run on (the leader is a zombie): the
/// copy has the same pid and tids, its leader is a zombie again, its threads carry on with their
/// pipe, file and memory (main_thread_exit.c checks), one ends with pthread_exit, and the
/// parent sees the status the last thread chose.
#[test]
fn main_thread_exit() {
    if !root() {
        return;
    }
    let mut p = Prog::start("main_thread_exit");
    let tids = task_ids(p.pid);
    assert_eq!(tids.len(), 3, "the leader and two threads: {tids:?}");
    assert_eq!(state_of(p.pid), 'Z');
    p.move_once(1);
    assert!(leader_becomes_zombie(p.pid), "restored leader: state {}", state_of(p.pid));
    assert_eq!(task_ids(p.pid), tids, "tids kept");
    let comm = |t: i32| read(Path::new(&format!("/proc/{}/task/{t}/comm", p.pid)));
    assert_eq!(comm(p.pid), "main_thread_exi\n");
    p.go();
    p.expect_exit(42);
}

/// The same, moved with pre-copy rounds while it runs (read through a live thread meanwhile).
#[test]
fn main_thread_exit_precopy() {
    if !root() {
        return;
    }
    let mut p = Prog::start("main_thread_exit");
    let tids = task_ids(p.pid);
    let rep = p.move_once_precopy(1);
    assert!(rep.precopied_bytes > 0, "nothing pre-copied: {rep:?}");
    assert!(leader_becomes_zombie(p.pid), "restored leader: state {}", state_of(p.pid));
    assert_eq!(task_ids(p.pid), tids, "tids kept");
    p.go();
    p.expect_exit(42);
}

/// A process whose main thread has exited is judged like any other, through a live thread: its
/// TCP listener (which an empty /proc/PID/fd of the leader would hide) is refused by name.
#[test]
fn main_thread_exit_tcp_refused() {
    refused("main_thread_exit_tcp", &["fd 3", "AF_INET"]);
}

/// Restored into a job-control stop (`--stopped`): the threads stay stopped, the leader exits
/// all the same; SIGCONT lets the threads go on.
#[test]
fn main_thread_exit_restored_stopped() {
    if !root() {
        return;
    }
    let mut p = Prog::start("main_thread_exit");
    let tids = task_ids(p.pid);
    ck::dump(p.pid, &p.img(1), AfterDump::Kill).unwrap();
    wait_exit(p.pid, Duration::from_secs(5));
    let r = ck::restore(&p.img(1), &RestoreOptions { stopped: true, ..Default::default() }).unwrap();
    assert!(r.same_pid);
    p.pid = r.pid;
    assert!(leader_becomes_zombie(p.pid), "restored leader: state {}", state_of(p.pid));
    assert_eq!(task_ids(p.pid), tids, "tids kept");
    threads_stop(p.pid, &tids[1..]);
    // SAFETY: a signal to our own child, by pid.
    assert_eq!(unsafe { libc::kill(p.pid, libc::SIGCONT) }, 0);
    p.go();
    p.expect_exit(42);
}

/// Bounded wait until each of `tids` of `pid` is in a job-control stop (State T).
fn threads_stop(pid: i32, tids: &[i32]) {
    let state = |t: i32| {
        read(Path::new(&format!("/proc/{pid}/task/{t}/status")))
            .lines()
            .find_map(|l| l.strip_prefix("State:").map(|v| v.trim().to_string()))
            .unwrap_or_default()
    };
    for &t in tids {
        let mut st = state(t);
        for _ in 0..2000 {
            if st.starts_with('T') {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
            st = state(t);
        }
        assert!(st.starts_with('T'), "thread {t}: {st}");
    }
}

/// Dumped with --leave-stopped: the live threads are detached into a job-control stop, the
/// zombie leader stays one; SIGCONT lets the threads go on.
#[test]
fn main_thread_exit_left_stopped() {
    if !root() {
        return;
    }
    let p = Prog::start("main_thread_exit");
    let tids = task_ids(p.pid);
    ck::dump(p.pid, &p.img(1), AfterDump::LeaveStopped).unwrap();
    threads_stop(p.pid, &tids[1..]);
    assert_eq!(state_of(p.pid), 'Z');
    // SAFETY: a signal to our own child, by pid.
    assert_eq!(unsafe { libc::kill(p.pid, libc::SIGCONT) }, 0);
    p.go();
    p.expect_exit(42);
}

/// Dumped with --leave-running, the process runs on (its live threads thawed, the zombie leader
/// untouched); once it has exited, the image restores it again.
#[test]
fn main_thread_exit_leave_running_then_restore() {
    if !root() {
        return;
    }
    let mut p = Prog::start("main_thread_exit");
    ck::dump(p.pid, &p.img(1), AfterDump::LeaveRunning).unwrap();
    let at_dump = fs::metadata(p.out()).unwrap().len();
    assert_eq!(state_of(p.pid), 'Z');
    p.go();
    p.expect_exit(42);
    fs::OpenOptions::new().write(true).open(p.out()).unwrap().set_len(at_dump).unwrap();
    // The file as it was at the dump (the program appended to it since).
    fs::write(p.path("data"), "hello").unwrap();
    let r = ck::restore(&p.img(1), &RestoreOptions::default()).unwrap();
    assert!(r.same_pid);
    p.pid = r.pid;
    assert!(leader_becomes_zombie(p.pid), "restored leader: state {}", state_of(p.pid));
    p.go();
    p.expect_exit(42);
}

#[test]
fn tcp_socket_refused() {
    refused("tcp_socket", &["fd 3", "AF_INET"]);
}

/// Restore refuses, before creating anything, a mapped file that changed since the dump or is
/// missing, another vDSO layout, missing CPU features, and a corrupted page file.
#[test]
fn changed_file_and_corrupt_image_refused() {
    if !root() {
        return;
    }
    let p = Prog::start("file_private_map");
    ck::dump(p.pid, &p.img(1), AfterDump::Kill).unwrap();
    wait_exit(p.pid, Duration::from_secs(5));
    let good = fs::read(p.path("data.bin")).unwrap();
    fs::OpenOptions::new().append(true).open(p.path("data.bin")).unwrap().write_all(b"more").unwrap();
    let e = ck::restore(&p.img(1), &RestoreOptions::default()).expect_err("changed file must be refused").to_string();
    assert!(e.contains("data.bin") && e.contains("changed") && e.contains("size"), "{e}");
    // SAFETY: signal 0 only probes for existence.
    assert_ne!(unsafe { libc::kill(p.pid, 0) }, 0, "a process was created");

    fs::write(p.path("data.bin"), &good).unwrap(); // same size, but a new mtime
    let e = ck::restore(&p.img(1), &RestoreOptions::default()).expect_err("mtime").to_string();
    assert!(e.contains("mtime"), "{e}");

    // Another kernel's vDSO layout, another CPU: refused before anything is created.
    let mpath = p.img(1).join("manifest.img");
    let orig = fs::read(&mpath).unwrap();
    let mut m = ck::image::decode_manifest(&orig, &mpath).unwrap();
    if let Some(last) = m.vdso.blocks.last_mut() {
        last.2 += 4096;
    }
    fs::write(&mpath, ck::image::encode_manifest(&m).unwrap()).unwrap();
    let e = ck::restore(&p.img(1), &RestoreOptions::default()).expect_err("vdso").to_string();
    assert!(e.contains("vDSO layout"), "{e}");
    let mut m = ck::image::decode_manifest(&orig, &mpath).unwrap();
    m.cpu_ident.xfeatures |= 1 << 62;
    fs::write(&mpath, ck::image::encode_manifest(&m).unwrap()).unwrap();
    let e = ck::restore(&p.img(1), &RestoreOptions::default()).expect_err("cpu").to_string();
    assert!(e.contains("XCR0") && e.contains("differs on this machine"), "{e}");
    fs::write(&mpath, &orig).unwrap();
    // A missing mapped file.
    fs::rename(p.path("data.bin"), p.path("data.moved")).unwrap();
    let e = ck::restore(&p.img(1), &RestoreOptions::default()).expect_err("missing").to_string();
    assert!(e.contains("data.bin") && e.contains("cannot stat"), "{e}");
    fs::rename(p.path("data.moved"), p.path("data.bin")).unwrap();

    let pages = p.img(1).join("pages.img");
    let mut b = fs::read(&pages).unwrap();
    let n = b.len() / 2;
    b[n] ^= 0x55;
    fs::write(&pages, b).unwrap();
    let e = ck::restore(&p.img(1), &RestoreOptions::default()).expect_err("corrupt pages").to_string();
    assert!(e.contains("checksum mismatch") && e.contains("pages.img"), "{e}");
}

/// The CLI around the same engine: `migrate-cli dump --json` then `migrate-cli restore` (of one
/// process, then of a process tree); a refused dump is one line on stderr and a non-zero exit.
/// Needs the binary built next to this test
/// (`cargo build -p migrate-cli` or `cargo test --workspace`); otherwise SKIP.
#[test]
fn cli_dump_restore() {
    if !root() {
        return;
    }
    let cli = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().join("migrate-cli");
    if !cli.exists() {
        eprintln!("SKIP: {} not built (cargo build -p migrate-cli)", cli.display());
        return;
    }
    // The restored process is the CLI's child; once the CLI exits it is re-parented to us.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let p = Prog::start("sig_handlers");
    let out =
        Command::new(&cli).args(["dump", &p.pid.to_string(), "--images"]).arg(p.img(1)).arg("--json").output().unwrap();
    assert!(out.status.success(), "dump: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pid"], p.pid);
    let phases: Vec<&str> = v["phases"].as_array().unwrap().iter().map(|x| x["phase"].as_str().unwrap()).collect();
    assert_eq!(phases, ["check", "freeze", "collect", "pages", "inject", "write", "kill"]);
    assert!(v["pages_bytes"].as_u64().unwrap() > 0 && v["frozen_ms"].as_f64().unwrap() > 0.0);
    wait_exit(p.pid, Duration::from_secs(5));
    let out = Command::new(&cli).args(["restore", "--images"]).arg(p.img(1)).output().unwrap();
    assert!(out.status.success(), "restore: {}", String::from_utf8_lossy(&out.stderr));
    let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("restore prints the pid");
    assert_eq!(pid, p.pid, "the old pid was free");
    p.go();
    p.expect_pass();

    // A process with children: `dump` takes its whole tree, `restore` brings it back.
    let mut p = Prog::start("tree_pipes");
    let out =
        Command::new(&cli).args(["dump", &p.pid.to_string(), "--images"]).arg(p.img(1)).arg("--json").output().unwrap();
    assert!(out.status.success(), "tree dump: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tree: Vec<i64> = v["tree"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
    assert_eq!((tree.len(), tree[0]), (2, p.pid as i64), "{v}");
    wait_exit(p.pid, Duration::from_secs(5));
    let out = Command::new(&cli).args(["restore", "--images"]).arg(p.img(1)).output().unwrap();
    assert!(out.status.success(), "tree restore: {}", String::from_utf8_lossy(&out.stderr));
    p.pid = String::from_utf8_lossy(&out.stdout).trim().parse().expect("restore prints the root's pid");
    assert!(String::from_utf8_lossy(&out.stderr).contains("process tree of 2"));
    p.go();
    p.expect_pass();
    assert!(read(&p.out()).contains("child-ok"));

    let t = Prog::start("tcp_socket");
    let out = Command::new(&cli).args(["dump", &t.pid.to_string(), "--images"]).arg(t.img(1)).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("migrate-cli: fd 3 (socket:[") && err.contains("AF_INET"), "{err}");
    t.go();
    t.expect_pass();
}

/// Every blocker at once, each named as a user knows it (stdio by name, the process at the
/// other end of a pipe, children by name), without freezing anything; `preflight` refuses
/// with the first of them; `migrate-cli check --json` reports stdio that cannot follow as
/// redirected, not as blockers.
#[test]
fn blockers_listed_at_once() {
    if !root() {
        return;
    }
    let me = std::process::id() as i32;
    let mut sh = close_stray_fds(Command::new("sh").args(["-c", "sleep 30 & wait"]))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = sh.id() as i32;
    let children = |p: i32| read(Path::new(&format!("/proc/{p}/task/{p}/children")));
    let t = Instant::now();
    while children(pid).trim().is_empty() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let kid: i32 = children(pid).split_whitespace().next().and_then(|v| v.parse().ok()).expect("sh started sleep");
    while read(Path::new(&format!("/proc/{kid}/comm"))).trim() != "sleep" && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let errs: Vec<String> = ck::blockers(pid, &Default::default()).unwrap().iter().map(|e| e.to_string()).collect();
    let first = ck::preflight(pid, &Default::default()).unwrap_err().to_string();
    let cli = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().join("migrate-cli");
    let check = cli.exists().then(|| {
        Command::new(&cli).args(["--config", "/nonexistent", "check", &pid.to_string(), "--json"]).output().unwrap()
    });
    // Nothing was frozen: sh still waits (state S), its child still runs.
    let stat = read(Path::new(&format!("/proc/{pid}/stat")));
    let state = stat.rsplit(')').next().and_then(|r| r.split_whitespace().next()).unwrap_or("?").to_string();
    // SAFETY: killing the grandchild (found above by pid) and our own child by pid.
    unsafe {
        libc::kill(kid, libc::SIGKILL);
        libc::kill(pid, libc::SIGKILL);
    }
    let _ = sh.wait();
    assert_eq!(state, "S", "{stat}");
    let has = |f: &dyn Fn(&String) -> bool| errs.iter().any(f);
    assert!(has(&|e| e.starts_with("fd 1 (stdout, pipe:[") && e.contains(&format!("pipe to pid {me} ("))), "{errs:#?}");
    assert!(has(&|e| e.starts_with("fd 2 (stderr, pipe:[") && e.contains(&format!("pipe to pid {me} ("))), "{errs:#?}");
    assert!(has(&|e| e.contains("children") && e.contains(&format!("pid {kid} (sleep)"))), "{errs:#?}");
    assert_eq!(first, errs[0]);
    let Some(out) = check else {
        eprintln!("SKIP (check): {} not built (cargo build -p migrate-cli)", cli.display());
        return;
    };
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let redirected: Vec<i64> =
        v["process"]["redirected"].as_array().unwrap().iter().map(|r| r["fd"].as_i64().unwrap()).collect();
    assert_eq!(redirected, [1, 2], "{v}");
    let blockers = v["process"]["blockers"].as_array().unwrap();
    assert!(blockers.iter().all(|b| !matches!(b["fd"].as_i64(), Some(fd) if fd <= 2)), "{v}");
    assert!(blockers.iter().any(|b| b["message"].as_str().unwrap().contains("process trees")), "{v}");
}

/// The process comes back in its cgroup v2 when that exists on the restoring machine; when it
/// does not, the restore still succeeds and its report says so.
#[test]
fn cgroup_membership() {
    if !root() {
        return;
    }
    let Some(mount) = fs::read_to_string("/proc/self/mountinfo").ok().and_then(|mi| {
        mi.lines().find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.starts_with("cgroup2 ")).then(|| PathBuf::from(pre.split_whitespace().nth(4).unwrap()))
        })
    }) else {
        eprintln!("SKIP: no cgroup v2 hierarchy mounted");
        return;
    };
    let name = format!("dvk-fid-cg-{}", std::process::id());
    let cg = mount.join(&name);
    if fs::create_dir(&cg).is_err() {
        eprintln!("SKIP: cannot create a cgroup under {}", mount.display());
        return;
    }
    struct Rm(PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = fs::remove_dir(&self.0);
        }
    }
    let _rm = Rm(cg.clone());
    let in_cg = |pid: i32| read(Path::new(&format!("/proc/{pid}/cgroup"))).lines().any(|l| l == format!("0::/{name}"));
    let mut p = Prog::start("anon_memory");
    fs::write(cg.join("cgroup.procs"), p.pid.to_string()).unwrap();
    assert!(in_cg(p.pid));
    ck::dump(p.pid, &p.img(1), AfterDump::LeaveRunning).unwrap();
    // The original is still there: the copy (a new pid) joins it in the cgroup.
    let r = ck::restore(&p.img(1), &RestoreOptions::default()).unwrap();
    assert!(r.notes.is_empty(), "{:?}", r.notes);
    assert!(in_cg(r.pid), "{}", read(Path::new(&format!("/proc/{}/cgroup", r.pid))));
    // SAFETY: killing the copy, our child, by pid.
    unsafe { libc::kill(r.pid, libc::SIGKILL) };
    wait_exit(r.pid, Duration::from_secs(5));
    ck::dump(p.pid, &p.img(2), AfterDump::Kill).unwrap();
    wait_exit(p.pid, Duration::from_secs(5));
    fs::remove_dir(&cg).unwrap();
    let r = ck::restore(&p.img(2), &RestoreOptions::default()).unwrap();
    p.pid = r.pid;
    assert!(r.notes.iter().any(|n| n.contains(&name) && n.contains("does not exist")), "{:?}", r.notes);
    p.go();
    p.expect_pass();
}

/// Frozen waiting in semop, the set removed before the restore (made again from the image): the
/// restored process waits on (after the EINTR Linux gives semop after any stop), and takes the
/// semaphore the driver posts after the restore.
#[test]
fn sysv_sem_blocked() {
    if !root() {
        return;
    }
    let mut p = Prog::start("sysv_sem_blocked");
    let (sem, _, _) = sem_msg_ids(&p);
    let _rm = RmSem(sem);
    wait_in_syscall(p.pid, &[libc::SYS_semop, libc::SYS_semtimedop]);
    ck::dump(p.pid, &p.img(1), AfterDump::Kill).unwrap();
    wait_exit(p.pid, Duration::from_secs(5));
    drop(RmSem(sem));
    let r = ck::restore(&p.img(1), &RestoreOptions::default()).unwrap();
    p.pid = r.pid;
    assert!(!read(&p.out()).contains("semop done"), "the semop ended before the post");
    let mut post = libc::sembuf { sem_num: 0, sem_op: 1, sem_flg: 0 };
    // SAFETY: one sembuf, living through the call.
    assert_eq!(unsafe { libc::semop(sem, &mut post, 1) }, 0);
    p.go();
    p.expect_pass();
}

/// Frozen waiting in msgrcv on an empty queue, the queue removed before the restore (made again
/// from the image): the restored process waits on (the call restarted, no EINTR: Linux restarts
/// msgrcv after a stop), and gets the message the driver sends after the restore.
#[test]
fn sysv_msg_blocked() {
    if !root() {
        return;
    }
    let mut p = Prog::start("sysv_msg_blocked");
    let (_, msg, _) = sem_msg_ids(&p);
    let _rm = RmMsg(msg);
    wait_in_syscall(p.pid, &[libc::SYS_msgrcv]);
    ck::dump(p.pid, &p.img(1), AfterDump::Kill).unwrap();
    wait_exit(p.pid, Duration::from_secs(5));
    drop(RmMsg(msg));
    let r = ck::restore(&p.img(1), &RestoreOptions::default()).unwrap();
    p.pid = r.pid;
    assert!(!read(&p.out()).contains("msgrcv done"), "the msgrcv ended before the message");
    let mut m = 6i64.to_ne_bytes().to_vec();
    m.extend_from_slice(b"after");
    // SAFETY: msgsnd reads the type and the 5 bytes of text from `m`, which lives through it.
    assert_eq!(unsafe { libc::msgsnd(msg, m.as_ptr().cast(), 5, libc::IPC_NOWAIT) }, 0);
    p.go();
    p.expect_pass();
    assert!(read(&p.out()).contains("msgrcv done after 0 EINTR"), "the wait in msgrcv was not restarted");
}
