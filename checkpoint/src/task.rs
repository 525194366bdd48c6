//! Process-wide attributes: the mm fields (`prctl(PR_SET_MM, PR_SET_MM_MAP)`: brk, code, data,
//! stack, args, env, auxv, exe file), cwd, umask, name, personality, rlimits, the per-thread
//! registrations glibc made at start-up: `set_tid_address`, the robust futex list and rseq, and
//! the other prctl and /proc attributes ([`Attrs`]): each carried, or refused by name at dump
//! (docs/CHECKPOINT.md lists them all).

use serde::{Deserialize, Serialize};

use crate::error::{pt, Error, Result};
use crate::inject::{u64_at, Remote};
use crate::proc::{field, proc_path, read_string, stat_fields};
use crate::sys::{self, Pid, RseqConf};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskState {
    pub cwd: String,
    pub umask: u32,
    pub comm: String,
    pub personality: u64,
    /// RLIMIT_* 0..16: (soft, hard).
    pub rlimits: Vec<(u64, u64)>,
    pub mm: MmFields,
    pub auxv: Vec<u8>,
    pub exe: String,
    pub tid_address: u64,
    pub robust_list: (u64, u64),
    pub rseq: Option<RseqConf>,
    pub creds: Creds,
    /// Was the process its session's / its process group's leader?
    pub session_leader: bool,
    pub group_leader: bool,
    pub no_new_privs: bool,
    /// Scheduling of the main thread: CPU affinity mask words and nice value.
    pub affinity: Vec<u64>,
    pub nice: i32,
    pub oom_score_adj: i32,
    pub attrs: Attrs,
    /// The cgroup v2 path ("0::PATH" in /proc/PID/cgroup), if any.
    pub cgroup: Option<String>,
    /// The working directory was deleted (`cwd` is its path without " (deleted)"): it is
    /// created again, entered and removed.
    pub cwd_deleted: Option<crate::ghosts::DeletedDir>,
    /// The main thread had exited (`pthread_exit` in main; the leader was a zombie while the
    /// other threads ran on): every live thread is in `Manifest::threads`, the main thread's
    /// own fields here (tid address, robust list, rseq) are empty, and the restore makes the
    /// leader again only to have it exit the same way (`exit`, not `exit_group`) once the
    /// threads exist — see `threads::park_exiting_leader`.
    pub main_exited: bool,
}

/// prctl and /proc attributes carried by the restore (those refused are refused at dump).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attrs {
    /// PR_GET_THP_DISABLE as returned (bit 0: disabled; other bits: its flags).
    pub thp_disable: u64,
    pub child_subreaper: bool,
    /// PR_GET_DUMPABLE (0, 1; 2 = "root only" comes back as 1, prctl cannot set it).
    pub dumpable: u64,
    /// Of the main thread (other threads: `ThreadState::timerslack_ns`).
    pub timerslack_ns: u64,
    /// PR_GET_TSC (0 when not supported).
    pub tsc: u32,
    /// PR_MCE_KILL_GET, of the main thread (other threads: `ThreadState::prctls`).
    pub mce_kill: u64,
    /// PR_GET_MDWE (memory-deny-write-execute flags).
    pub mdwe: u64,
    /// PR_GET_MEMORY_MERGE (KSM for the whole process).
    pub memory_merge: bool,
    /// (which, PR_GET_SPECULATION_CTRL) for the controls the process may set itself.
    pub speculation: Vec<(u64, u64)>,
    /// membarrier registration commands issued (MEMBARRIER_CMD_GET_REGISTRATIONS).
    pub membarrier: u64,
    /// `mlockall` flags for future mappings (MCL_FUTURE, MCL_ONFAULT): the mm's default
    /// VM_LOCKED, which no /proc file shows (see `mlock_future`).
    pub mlock_future: u64,
    /// `arch_prctl(ARCH_SET_CPUID, 0)`: CPUID faults (as under the rr debugger).
    pub cpuid_faulting: bool,
    /// `arch_prctl(ARCH_GET_XCOMP_PERM)`: the dynamically enabled xstate features the process was
    /// granted (ARCH_REQ_XCOMP_PERM, e.g. AMX tile data, 18).
    pub xcomp_perm: u64,
    /// PR_GET_PDEATHSIG: carried for a member of a tree whose parent is restored with it (the
    /// signal follows the restored parent), refused otherwise.
    pub pdeathsig: i32,
    /// /proc/PID/loginuid (None: no audit support).
    pub loginuid: Option<u32>,
    /// /proc/PID/coredump_filter.
    pub coredump_filter: Option<u64>,
    /// CapInh, CapPrm, CapEff, CapBnd, CapAmb (checked again after the restore: `restore_last`).
    pub caps: [u64; 5],
}

const PR_GET_PDEATHSIG: u64 = 2;
const PR_GET_DUMPABLE: u64 = 3;
const PR_GET_TSC: u64 = 25;
const PR_SET_TSC: u64 = 26;
const PR_GET_SECUREBITS: u64 = 27;
const PR_SET_TIMERSLACK: u64 = 29;
const PR_GET_TIMERSLACK: u64 = 30;
const PR_MCE_KILL: u64 = 33;
const PR_MCE_KILL_GET: u64 = 34;
const PR_SET_CHILD_SUBREAPER: u64 = 36;
const PR_GET_CHILD_SUBREAPER: u64 = 37;
const PR_SET_THP_DISABLE: u64 = 41;
const PR_GET_THP_DISABLE: u64 = 42;
const PR_GET_SPECULATION_CTRL: u64 = 52;
const PR_SET_SPECULATION_CTRL: u64 = 53;
const PR_SCHED_CORE: u64 = 62;
const PR_SET_MDWE: u64 = 65;
const PR_GET_MDWE: u64 = 66;
const PR_SET_MEMORY_MERGE: u64 = 67;
const PR_GET_MEMORY_MERGE: u64 = 68;
const ARCH_GET_CPUID: u64 = 0x1011;
const ARCH_SET_CPUID: u64 = 0x1012;
const ARCH_GET_XCOMP_PERM: u64 = 0x1022;
const ARCH_REQ_XCOMP_PERM: u64 = 0x1023;
/// The xstate features a process must ask for (XFEATURE_XTILEDATA, AMX); the others are given.
const XFEATURES_DYNAMIC: [u64; 1] = [18];
const MEMBARRIER_CMD_GET_REGISTRATIONS: u64 = 1 << 9;
/// The membarrier registration commands and, for each, the command that fails with EPERM
/// without it (the probe on kernels before 6.3, which lack GET_REGISTRATIONS).
const MEMBARRIER_REGISTER: [(u64, Option<u64>); 4] = [
    (1 << 2, None),         // REGISTER_GLOBAL_EXPEDITED: cannot be probed
    (1 << 4, Some(1 << 3)), // REGISTER_PRIVATE_EXPEDITED / PRIVATE_EXPEDITED
    (1 << 6, Some(1 << 5)), // …_SYNC_CORE
    (1 << 8, Some(1 << 7)), // …_RSEQ
];

fn cap_sets(status: &str) -> [u64; 5] {
    let h = |k: &str| field(status, k).and_then(|v| u64::from_str_radix(v, 16).ok()).unwrap_or(0);
    [h("CapInh"), h("CapPrm"), h("CapEff"), h("CapBnd"), h("CapAmb")]
}

/// The capability sets a restore by a root `restorer` (its own sets) gives a process with these
/// uids: the restore stub is executed as root (permitted and effective = bounding | inheritable),
/// then setresuid drops permitted and effective (no uid 0 left) or effective (euid not 0); no
/// ambient set is handed down.
fn caps_after_restore(uid: [u32; 3], restorer: [u64; 5]) -> [u64; 5] {
    let [inh, _, _, bnd, _] = restorer;
    let prm = if uid.contains(&0) { bnd | inh } else { 0 };
    let eff = if uid[1] == 0 { prm } else { 0 };
    [inh, prm, eff, bnd, 0]
}

const CAP_NAMES: [&str; 5] = ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"];

fn caps_differ(want: [u64; 5], got: [u64; 5]) -> Option<String> {
    let d: Vec<String> = (0..5)
        .filter(|&i| want[i] != got[i])
        .map(|i| format!("{} {:016x} would be {:016x}", CAP_NAMES[i], want[i], got[i]))
        .collect();
    (!d.is_empty()).then(|| d.join(", "))
}

/// Identity: (real, effective, saved) uid and gid, supplementary groups.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Creds {
    pub uid: [u32; 3],
    pub gid: [u32; 3],
    pub groups: Vec<u32>,
}

fn ids(status: &str, key: &str) -> [u32; 3] {
    let v: Vec<u32> = field(status, key).unwrap_or("").split_whitespace().filter_map(|x| x.parse().ok()).collect();
    [v.first().copied().unwrap_or(0), v.get(1).copied().unwrap_or(0), v.get(2).copied().unwrap_or(0)]
}

fn link(pid: Pid, what: &str) -> Result<String> {
    let p = proc_path(pid, what);
    std::fs::read_link(&p)
        .map(|l| l.to_string_lossy().into_owned())
        .map_err(|source| Error::NoProcess { pid, err: source })
}

/// What the process-wide attributes forbid (deleted executable, a seccomp
/// filter), all of them, without touching the process.
pub fn blockers(pid: Pid) -> Result<Vec<Error>> {
    let status = read_string(pid, "status")?;
    let exe = link(pid, "exe")?;
    let mut v = refusals(pid, &status, &exe);
    if v.is_empty() {
        // Anything else the collection would trip on.
        if let Err(e) = collect_static(pid) {
            v.push(e);
        }
    }
    Ok(v)
}

fn refusals(pid: Pid, status: &str, exe: &str) -> Vec<Error> {
    let mut v = Vec::new();
    match field(status, "Seccomp") {
        Some("0") | None => {}
        Some("1") => v.push(Error::Unsupported { pid, what: "strict seccomp mode".into() }),
        Some(_) => v.push(Error::Unsupported {
            pid,
            what: format!(
                "a seccomp filter ({} filter(s), e.g. from a sandbox or container runtime)",
                field(status, "Seccomp_filters").unwrap_or("?")
            ),
        }),
    }
    if exe.ends_with(" (deleted)") {
        v.push(Error::Unsupported { pid, what: format!("executable {exe}") });
    }
    // An LSM label (AppArmor profile, SELinux context) other than the restorer's would be lost:
    // the restored process runs under the restorer's (without an LSM, the file cannot be read).
    let label =
        |p: &str| std::fs::read(p).ok().map(|b| String::from_utf8_lossy(&b).trim_end_matches(['\0', '\n']).to_string());
    if let (Some(theirs), Some(mine)) =
        (label(&proc_path(pid, "attr/current").to_string_lossy()), label("/proc/self/attr/current"))
    {
        if theirs != mine {
            v.push(Error::Unsupported {
                pid,
                what: format!(
                    "security label {theirs:?} (the restore would run it as {mine:?}; LSM labels are not carried)"
                ),
            });
        }
    }
    // A chroot: the restore would run it in the restorer's root directory.
    if let Ok(root) = link(pid, "root") {
        if root != "/" {
            v.push(Error::Unsupported { pid, what: format!("a changed root directory {root} (chroot)") });
        }
    }
    // Capability sets are not set by the restore: they come from the restorer (this process
    // stands in for it) and the uids. Refuse a process whose sets would differ.
    let me = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if let Some(d) = caps_differ(cap_sets(status), caps_after_restore(ids(status, "Uid"), cap_sets(&me))) {
        v.push(Error::Unsupported { pid, what: format!("capability sets ({d}; capabilities are not carried yet)") });
    }
    // Namespaces are not carried: the restore runs the process in the restorer's (the dumper
    // stands in for it). One of its own would be lost without a word — refuse it. The mount
    // namespace is the exception, written down as a limit: `ip netns exec` gives every
    // command its own (to remount /sys), so a node's agent and programs never share one.
    for kind in ["net", "uts", "ipc", "pid", "user", "cgroup", "time"] {
        let ns = |p: std::path::PathBuf| std::fs::read_link(p).ok();
        // (Through proc_path: a zombie leader's own ns links are gone, a live thread's are not.)
        if let (Some(theirs), Some(mine)) =
            (ns(proc_path(pid, &format!("ns/{kind}"))), ns(format!("/proc/self/ns/{kind}").into()))
        {
            if theirs != mine {
                v.push(Error::Unsupported {
                    pid,
                    what: format!(
                        "its own {kind} namespace ({}; the restore would run it in the restorer's {}: namespaces \
                         are not carried)",
                        theirs.display(),
                        mine.display()
                    ),
                });
            }
        }
    }
    // PR_SET_IO_FLUSHER shows as PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE in the task flags.
    if let Ok(f) = stat_fields(pid) {
        let flags: u64 = f.get(9).and_then(|v| v.parse().ok()).unwrap_or(0);
        if flags & 0x0018_0000 == 0x0018_0000 {
            v.push(Error::Unsupported { pid, what: "PR_SET_IO_FLUSHER (an I/O flusher process)".into() });
        }
    }
    v
}

/// What needs no injection (also used by the preflight).
pub fn collect_static(pid: Pid) -> Result<TaskState> {
    let mut cwd = link(pid, "cwd")?;
    let status = read_string(pid, "status")?;
    let exe = link(pid, "exe")?;
    if let Some(e) = refusals(pid, &status, &exe).into_iter().next() {
        return Err(e);
    }
    let mut cwd_deleted = None;
    if let Some(p) = cwd.strip_suffix(" (deleted)").filter(|p| p.starts_with('/')) {
        crate::ghosts::parent_exists(p)
            .map_err(|why| Error::Unsupported { pid, what: format!("working directory: {why}") })?;
        let d = crate::ghosts::DeletedDir::of(&proc_path(pid, "cwd")).map_err(|err| Error::NoProcess { pid, err })?;
        cwd_deleted = Some(d);
        cwd = p.to_string();
    }
    let umask = field(&status, "Umask").and_then(|v| u32::from_str_radix(v, 8).ok()).unwrap_or(0o022);
    let f = stat_fields(pid)?;
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let mm = MmFields {
        start_code: n(26),
        end_code: n(27),
        start_stack: n(28),
        start_data: n(45),
        end_data: n(46),
        start_brk: n(47),
        brk: 0,
        arg_start: n(48),
        arg_end: n(49),
        env_start: n(50),
        env_end: n(51),
    };
    let creds = Creds {
        uid: ids(&status, "Uid"),
        gid: ids(&status, "Gid"),
        groups: field(&status, "Groups").unwrap_or("").split_whitespace().filter_map(|x| x.parse().ok()).collect(),
    };
    let no_new_privs = field(&status, "NoNewPrivs").is_some_and(|v| v == "1");
    let session_leader = f.get(6).and_then(|v| v.parse::<i32>().ok()) == Some(pid);
    let group_leader = f.get(5).and_then(|v| v.parse::<i32>().ok()) == Some(pid);
    Ok(TaskState {
        cwd,
        cwd_deleted,
        main_exited: false,
        umask,
        comm: read_string(pid, "comm")?.trim_end().to_string(),
        personality: u64::from_str_radix(read_string(pid, "personality")?.trim(), 16).unwrap_or(0),
        rlimits: Vec::new(),
        mm,
        auxv: std::fs::read(proc_path(pid, "auxv")).map_err(|source| Error::NoProcess { pid, err: source })?,
        exe,
        tid_address: 0,
        robust_list: (0, 0),
        rseq: None,
        creds,
        session_leader,
        group_leader,
        no_new_privs,
        affinity: sys::get_affinity(pid).map_err(pt("sched_getaffinity", pid))?,
        nice: sys::get_nice(pid).map_err(pt("getpriority", pid))?,
        oom_score_adj: read_string(pid, "oom_score_adj")?.trim().parse().unwrap_or(0),
        cgroup: read_string(pid, "cgroup")
            .ok()
            .and_then(|c| c.lines().find_map(|l| l.strip_prefix("0::").map(str::to_string))),
        attrs: Attrs {
            loginuid: read_string(pid, "loginuid").ok().and_then(|v| v.trim().parse().ok()),
            coredump_filter: read_string(pid, "coredump_filter")
                .ok()
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok()),
            caps: cap_sets(&status),
            ..Default::default()
        },
    })
}

/// The prctl attributes only the process itself can read (injected), or the refusal naming one
/// that cannot be carried.
fn collect_attrs(r: &Remote, a: &mut Attrs) -> Result<()> {
    let pid = r.pid;
    let prctl = |op: u64, a2: u64| r.raw(libc::SYS_prctl, &[op, a2, 0, 0, 0]);
    let int_out = |op: u64, what: &str| -> Result<i64> {
        r.put(0, &[0u8; 4])?;
        r.call(what, libc::SYS_prctl, &[op, r.scratch, 0, 0, 0])?;
        Ok(i32::from_le_bytes(r.get(0, 4)?.try_into().unwrap()) as i64)
    };
    // Judged by the dump (`pdeathsig_refusal`): carried only when the parent is restored too.
    a.pdeathsig = int_out(PR_GET_PDEATHSIG, "prctl(PR_GET_PDEATHSIG)")? as i32;
    let sb = prctl(PR_GET_SECUREBITS, 0)?;
    if sb > 0 {
        return Err(Error::Unsupported {
            pid,
            what: format!("securebits {sb:#x} (PR_SET_SECUREBITS, PR_SET_KEEPCAPS)"),
        });
    }
    // A core-scheduling cookie (PR_SCHED_CORE_GET).
    r.put(0, &[0u8; 8])?;
    if prctl_cookie(r)? != 0 {
        return Err(Error::Unsupported { pid, what: "a core-scheduling cookie (PR_SCHED_CORE)".into() });
    }
    a.thp_disable = prctl(PR_GET_THP_DISABLE, 0)?.max(0) as u64;
    a.child_subreaper = int_out(PR_GET_CHILD_SUBREAPER, "prctl(PR_GET_CHILD_SUBREAPER)")? != 0;
    a.dumpable = prctl(PR_GET_DUMPABLE, 0)?.max(0) as u64;
    a.timerslack_ns = prctl(PR_GET_TIMERSLACK, 0)?.max(0) as u64;
    a.tsc = int_out(PR_GET_TSC, "prctl(PR_GET_TSC)").unwrap_or(0) as u32;
    (a.mce_kill, a.speculation) = collect_thread_prctls(r)?;
    a.mdwe = prctl(PR_GET_MDWE, 0)?.max(0) as u64;
    a.memory_merge = prctl(PR_GET_MEMORY_MERGE, 0)? > 0;
    a.mlock_future = mlock_future(r)?;
    a.cpuid_faulting = r.raw(libc::SYS_arch_prctl, &[ARCH_GET_CPUID, 0])? == 0;
    r.put(0, &[0u8; 8])?;
    if r.raw(libc::SYS_arch_prctl, &[ARCH_GET_XCOMP_PERM, r.scratch])? == 0 {
        a.xcomp_perm = u64_at(&r.get(0, 8)?, 0);
    }
    let reg = r.raw(libc::SYS_membarrier, &[MEMBARRIER_CMD_GET_REGISTRATIONS, 0, 0])?;
    a.membarrier = if reg >= 0 {
        reg as u64
    } else {
        // Before Linux 6.3: a private expedited barrier fails with EPERM unless registered (all
        // threads are stopped: it interrupts no one). The global registration cannot be seen:
        // it is made again anyway (it only adds this process to others' barriers).
        let mut bits = 1 << 2;
        for (reg, probe) in MEMBARRIER_REGISTER.iter().filter_map(|(g, p)| p.map(|p| (*g, p))) {
            if r.raw(libc::SYS_membarrier, &[probe, 0, 0])? == 0 {
                bits |= reg;
            }
        }
        bits
    };
    Ok(())
}

/// `mlockall(MCL_FUTURE)` shows nowhere but in what a new mapping gets: a probe page is mapped
/// (after the memory was collected) and unmapped. Locked, it adds to VmLck; locked on fault
/// (MCL_ONFAULT), it is not populated at once.
fn mlock_future(r: &Remote) -> Result<u64> {
    let locked_kb = || -> Result<u64> {
        Ok(field(&read_string(r.pid, "status")?, "VmLck")
            .and_then(|v| v.trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0))
    };
    let before = locked_kb()?;
    let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let fl = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
    let addr = r.raw(libc::SYS_mmap, &[0, 4096, prot, fl, u64::MAX, 0])?;
    if addr == -(libc::EAGAIN as i64) {
        return Ok(libc::MCL_FUTURE as u64); // locking it would exceed RLIMIT_MEMLOCK
    }
    if (-4095..0).contains(&addr) {
        return Err(Error::Injected {
            pid: r.pid,
            call: "mmap (mlockall probe)".into(),
            errno: -addr as i32,
            msg: crate::inject::errno_name(-addr as i32),
        });
    }
    let after = locked_kb();
    let resident = r.raw(libc::SYS_mincore, &[addr as u64, 4096, r.scratch]).and_then(|_| r.get(0, 1));
    r.call("munmap (mlockall probe)", libc::SYS_munmap, &[addr as u64, 4096])?;
    if after? <= before {
        return Ok(0);
    }
    let onfault = resident?[0] & 1 == 0;
    Ok((libc::MCL_FUTURE | if onfault { libc::MCL_ONFAULT } else { 0 }) as u64)
}

/// What only the thread itself can tell and no other thread inherits later: its MCE kill policy
/// and its speculation controls (those it may set itself: PR_SPEC_PRCTL).
pub fn collect_thread_prctls(r: &Remote) -> Result<(u64, Vec<(u64, u64)>)> {
    let mce = r.call("prctl(PR_MCE_KILL_GET)", libc::SYS_prctl, &[PR_MCE_KILL_GET, 0, 0, 0, 0])?;
    let mut spec = Vec::new();
    for which in 0..3u64 {
        let v = r.raw(libc::SYS_prctl, &[PR_GET_SPECULATION_CTRL, which, 0, 0, 0])?;
        if v > 0 && v & 1 != 0 {
            spec.push((which, v as u64));
        }
    }
    Ok((mce, spec))
}

/// [`collect_thread_prctls`]' state, set by the thread itself.
pub fn restore_thread_prctls(r: &Remote, mce: u64, spec: &[(u64, u64)]) -> Result<()> {
    let now = r.call("prctl(PR_MCE_KILL_GET)", libc::SYS_prctl, &[PR_MCE_KILL_GET, 0, 0, 0, 0])?;
    if now != mce {
        let (op, policy) = if mce == 2 { (0, 0) } else { (1, mce) }; // 2: PR_MCE_KILL_CLEAR to the default
        r.call("prctl(PR_MCE_KILL)", libc::SYS_prctl, &[PR_MCE_KILL, op, policy, 0, 0])?;
    }
    for &(which, v) in spec {
        let now = r.raw(libc::SYS_prctl, &[PR_GET_SPECULATION_CTRL, which, 0, 0, 0])?;
        let state = v & 0b11110; // ENABLE, DISABLE, FORCE_DISABLE, DISABLE_NOEXEC
        if now != v as i64 && state != 0 {
            r.call(
                &format!("prctl(PR_SET_SPECULATION_CTRL, {which}, {state:#x})"),
                libc::SYS_prctl,
                &[PR_SET_SPECULATION_CTRL, which, state, 0, 0],
            )?;
        }
    }
    Ok(())
}

fn prctl_cookie(r: &Remote) -> Result<u64> {
    // prctl(PR_SCHED_CORE, PR_SCHED_CORE_GET, 0 (this task), PIDTYPE_PID (the only type GET
    // takes), &cookie)
    let v = r.raw(libc::SYS_prctl, &[PR_SCHED_CORE, 0, 0, 0, r.scratch])?;
    if v < 0 {
        return Ok(0); // no core scheduling in this kernel
    }
    Ok(u64_at(&r.get(0, 8)?, 0))
}

/// The attributes set from inside, before the threads exist (they inherit them) and before
/// the identity is dropped (loginuid needs CAP_AUDIT_CONTROL).
/// A parent-death signal cannot follow a process whose parent is not restored with it (the
/// restored process has another parent); `restored_with` are the processes dumped with it.
pub fn pdeathsig_refusal(pid: Pid, st: &TaskState, restored_with: &[Pid]) -> Option<Error> {
    let sig = st.attrs.pdeathsig;
    if sig == 0 {
        return None;
    }
    let ppid: Pid = stat_fields(pid).ok().and_then(|f| f.get(4)?.parse().ok()).unwrap_or(0);
    (!restored_with.contains(&ppid)).then(|| Error::Unsupported {
        pid,
        what: format!("a parent-death signal (PR_SET_PDEATHSIG {sig}: the restored process has another parent)"),
    })
}

pub fn restore_attrs(r: &Remote, st: &TaskState) -> Result<()> {
    let a = &st.attrs;
    let pid = r.pid;
    if a.pdeathsig != 0 {
        // Forked by its restored parent just before: the signal follows that parent.
        r.call("prctl(PR_SET_PDEATHSIG)", libc::SYS_prctl, &[1 /* PR_SET_PDEATHSIG */, a.pdeathsig as u64, 0, 0, 0])?;
    }
    if a.thp_disable & 1 != 0 {
        r.call("prctl(PR_SET_THP_DISABLE)", libc::SYS_prctl, &[PR_SET_THP_DISABLE, 1, a.thp_disable & !1, 0, 0])?;
    }
    if a.child_subreaper {
        r.call("prctl(PR_SET_CHILD_SUBREAPER)", libc::SYS_prctl, &[PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0])?;
    }
    if a.timerslack_ns != 0 {
        r.call("prctl(PR_SET_TIMERSLACK)", libc::SYS_prctl, &[PR_SET_TIMERSLACK, a.timerslack_ns, 0, 0, 0])?;
    }
    if a.tsc != 0 {
        r.call("prctl(PR_SET_TSC)", libc::SYS_prctl, &[PR_SET_TSC, a.tsc as u64, 0, 0, 0])?;
    }
    restore_thread_prctls(r, a.mce_kill, &a.speculation)?;
    if a.memory_merge {
        r.call("prctl(PR_SET_MEMORY_MERGE)", libc::SYS_prctl, &[PR_SET_MEMORY_MERGE, 1, 0, 0, 0])?;
    }
    if a.cpuid_faulting {
        r.call("arch_prctl(ARCH_SET_CPUID, 0)", libc::SYS_arch_prctl, &[ARCH_SET_CPUID, 0])?;
    }
    // Before the registers and xstate are written (finish): AMX state needs the permission.
    for f in XFEATURES_DYNAMIC.into_iter().filter(|f| a.xcomp_perm & (1 << f) != 0) {
        r.call(&format!("arch_prctl(ARCH_REQ_XCOMP_PERM, {f})"), libc::SYS_arch_prctl, &[ARCH_REQ_XCOMP_PERM, f])?;
    }
    if a.mlock_future != 0 {
        r.call("mlockall(MCL_FUTURE)", libc::SYS_mlockall, &[a.mlock_future])?;
    }
    for (reg, _) in MEMBARRIER_REGISTER {
        if a.membarrier & reg != 0 {
            r.call(&format!("membarrier(register {reg:#x})"), libc::SYS_membarrier, &[reg, 0, 0])?;
        }
    }
    if let Some(uid) = a.loginuid {
        let now: Option<u32> = read_string(pid, "loginuid").ok().and_then(|v| v.trim().parse().ok());
        if now != Some(uid) {
            // Only the process itself may write its loginuid.
            let fd = r.open("/proc/self/loginuid", libc::O_WRONLY | libc::O_CLOEXEC)?;
            let text = uid.to_string();
            let b = r.put(64, text.as_bytes())?;
            let w = r.call(&format!("write loginuid {uid}"), libc::SYS_write, &[fd, b, text.len() as u64]);
            r.call("close", libc::SYS_close, &[fd])?;
            w?;
        }
    }
    if let Some(f) = a.coredump_filter {
        let p = proc_path(pid, "coredump_filter");
        std::fs::write(&p, format!("{f:#x}")).map_err(crate::error::io_at(p))?;
    }
    Ok(())
}

/// Last, once the identity is the process's: memory-deny-write-execute (no later mapping may
/// need it off), and a check that the capability sets came out as they were.
pub fn restore_last(r: &Remote, st: &TaskState) -> Result<()> {
    let a = &st.attrs;
    if a.mdwe != 0 {
        r.call("prctl(PR_SET_MDWE)", libc::SYS_prctl, &[PR_SET_MDWE, a.mdwe, 0, 0, 0])?;
    }
    let got = cap_sets(&read_string(r.pid, "status")?);
    if let Some(d) = caps_differ(a.caps, got) {
        return Err(Error::Restore(format!(
            "the capability sets differ from the dump ({d}): capabilities are not carried yet"
        )));
    }
    Ok(())
}

pub fn collect(r: &Remote) -> Result<TaskState> {
    // `r` runs in the main thread — or, when that has exited, in a live thread of the process.
    let pid = match field(&read_string(r.pid, "status")?, "Tgid").and_then(|v| v.parse::<Pid>().ok()) {
        Some(tgid) => tgid,
        None => r.pid,
    };
    let mut st = collect_static(pid)?;
    st.mm.brk = r.call("brk(0)", libc::SYS_brk, &[0])?;
    // From inside: prlimit on another user's process needs CAP_SYS_RESOURCE, which root lacks here.
    for res in 0..16u64 {
        r.call("prlimit64", libc::SYS_prlimit64, &[0, res, 0, r.scratch])?;
        let b = r.get(0, 16)?;
        st.rlimits.push((u64_at(&b, 0), u64_at(&b, 8)));
    }
    collect_attrs(r, &mut st.attrs)?;
    if pid != r.pid {
        // The main thread has exited: its tid address was cleared and its robust list walked
        // as it exited (memory shows both), its rseq area is no one's. The leader made again
        // registers none, so that its exit at the restore changes nothing in memory.
        st.main_exited = true;
        return Ok(st);
    }
    r.call("prctl(PR_GET_TID_ADDRESS)", libc::SYS_prctl, &[libc::PR_GET_TID_ADDRESS as u64, r.scratch])?;
    st.tid_address = u64_at(&r.get(0, 8)?, 0);
    st.robust_list = sys::get_robust_list(pid).map_err(pt("get_robust_list", pid))?;
    st.rseq = sys::get_rseq(pid).map_err(pt("PTRACE_GET_RSEQ_CONFIGURATION", pid))?;
    Ok(st)
}

/// cwd, umask, personality, name (early, before files are opened by relative path).
pub fn restore_early(r: &Remote, st: &TaskState) -> Result<()> {
    r.call("umask", libc::SYS_umask, &[st.umask as u64])?;
    let dir = match &st.cwd_deleted {
        Some(d) => d.make(r, &st.cwd)?,
        None => st.cwd.clone(),
    };
    let p = r.put_cstr(0, dir.as_bytes())?;
    r.call(&format!("chdir {dir}"), libc::SYS_chdir, &[p])?;
    if st.cwd_deleted.is_some() {
        crate::ghosts::remove_dir(r, &dir)?;
    }
    r.call("personality", libc::SYS_personality, &[st.personality])?;
    let mut name = st.comm.as_bytes().to_vec();
    name.truncate(15);
    let p = r.put_cstr(0, &name)?;
    r.call("prctl(PR_SET_NAME)", libc::SYS_prctl, &[libc::PR_SET_NAME as u64, p])?;
    Ok(())
}

/// The mm fields, in one consistent `PR_SET_MM_MAP` (after every VMA exists).
pub fn restore_mm(r: &Remote, st: &TaskState) -> Result<()> {
    let p = r.put_cstr(0, st.exe.as_bytes())?;
    let exe_fd = r.call(
        &format!("open {}", st.exe),
        libc::SYS_openat,
        &[libc::AT_FDCWD as u64, p, (libc::O_RDONLY | libc::O_CLOEXEC) as u64, 0],
    )?;
    let m = &st.mm;
    let mut auxv = st.auxv.clone();
    auxv.truncate(52 * 8);
    let auxv_addr = r.put(4096, &auxv)?;
    let mut b = Vec::with_capacity(104);
    for v in [
        m.start_code,
        m.end_code,
        m.start_data,
        m.end_data,
        m.start_brk,
        m.brk,
        m.start_stack,
        m.arg_start,
        m.arg_end,
        m.env_start,
        m.env_end,
        auxv_addr,
    ] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&(auxv.len() as u32).to_le_bytes());
    b.extend_from_slice(&(exe_fd as u32).to_le_bytes());
    let map = r.put(0, &b)?;
    let res = r.call(
        "prctl(PR_SET_MM, PR_SET_MM_MAP)",
        libc::SYS_prctl,
        &[libc::PR_SET_MM as u64, libc::PR_SET_MM_MAP as u64, map, b.len() as u64, 0],
    );
    r.call("close", libc::SYS_close, &[exe_fd])?;
    res.map(drop)
}

/// set_tid_address, robust list, rseq.
pub fn restore_thread(r: &Remote, st: &TaskState) -> Result<()> {
    if st.tid_address != 0 {
        r.call("set_tid_address", libc::SYS_set_tid_address, &[st.tid_address])?;
    }
    if st.robust_list.0 != 0 {
        r.call("set_robust_list", libc::SYS_set_robust_list, &[st.robust_list.0, st.robust_list.1])?;
    }
    if let Some(rs) = st.rseq {
        r.call("rseq (register)", libc::SYS_rseq, &[rs.ptr, rs.len as u64, 0, rs.sig as u64])?;
    }
    Ok(())
}

/// Session and process group: a leader becomes a leader again (new session / group).
pub fn restore_session(r: &Remote, st: &TaskState) -> Result<()> {
    if st.session_leader {
        r.call("setsid", libc::SYS_setsid, &[])?;
    } else if st.group_leader {
        r.call("setpgid", libc::SYS_setpgid, &[0, 0])?;
    }
    Ok(())
}

/// Identity, last (everything before needed the restorer's privileges): groups, gids, uids,
/// then dumpable again (a uid change clears it) and no_new_privs.
pub fn restore_creds(r: &Remote, st: &TaskState) -> Result<()> {
    let c = &st.creds;
    let mut g = Vec::with_capacity(c.groups.len() * 4);
    for x in &c.groups {
        g.extend_from_slice(&x.to_le_bytes());
    }
    let p = r.put(0, &g)?;
    r.call("setgroups", libc::SYS_setgroups, &[c.groups.len() as u64, p])?;
    r.call("setresgid", libc::SYS_setresgid, &[c.gid[0] as u64, c.gid[1] as u64, c.gid[2] as u64])?;
    r.call("setresuid", libc::SYS_setresuid, &[c.uid[0] as u64, c.uid[1] as u64, c.uid[2] as u64])?;
    // A uid change clears it; the recorded value comes back (2, "root only", cannot be set by
    // prctl: it comes back as 1).
    let dumpable = st.attrs.dumpable.min(1);
    r.call("prctl(PR_SET_DUMPABLE)", libc::SYS_prctl, &[libc::PR_SET_DUMPABLE as u64, dumpable])?;
    if st.no_new_privs {
        r.call("prctl(PR_SET_NO_NEW_PRIVS)", libc::SYS_prctl, &[libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0])?;
    }
    Ok(())
}

/// Affinity, nice value (of thread `tid`), from outside.
pub fn restore_sched(tid: Pid, affinity: &[u64], nice: i32) -> Result<()> {
    if !affinity.is_empty() {
        sys::set_affinity(tid, affinity).map_err(pt("sched_setaffinity", tid))?;
    }
    sys::set_nice(tid, nice).map_err(pt("setpriority", tid))
}

/// oom_score_adj, from outside. Lowering it below what the restorer has needs
/// CAP_SYS_RESOURCE (which root lacks on this machine): then the restorer's value stays.
pub fn restore_oom(pid: Pid, st: &TaskState) -> Result<()> {
    let p = proc_path(pid, "oom_score_adj");
    match std::fs::write(&p, st.oom_score_adj.to_string()) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Ok(()),
        r => r.map_err(crate::error::io_at(p)),
    }
}

/// rlimits, from outside (prlimit on the new pid), at the very end.
pub fn restore_rlimits(pid: Pid, st: &TaskState) -> Result<()> {
    for (res, &(cur, max)) in st.rlimits.iter().enumerate() {
        sys::prlimit(pid, res as u32, Some((cur, max))).map_err(pt("prlimit", pid))?;
    }
    Ok(())
}

/// Where the cgroup v2 hierarchy is mounted here (from /proc/self/mountinfo).
fn cgroup2_mount() -> Option<std::path::PathBuf> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mi.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next() == Some("cgroup2")).then(|| pre.split_whitespace().nth(4).map(Into::into))?
    })
}

/// Puts the new process (one thread yet) into the image's cgroup v2 when that exists here.
/// `None`: it is there; `Some(why)`: it stays in the restorer's cgroup, and why (for
/// the restore report).
pub fn restore_cgroup(pid: Pid, st: &TaskState) -> Option<String> {
    let path = st.cgroup.as_deref()?;
    let Some(mount) = cgroup2_mount() else {
        return Some(format!("cgroup {path} not restored: no cgroup v2 hierarchy is mounted here"));
    };
    let dir = mount.join(path.trim_start_matches('/'));
    let here = read_string(pid, "cgroup").ok();
    if here.as_deref().is_some_and(|c| c.lines().any(|l| l.strip_prefix("0::") == Some(path))) {
        return None;
    }
    if !dir.is_dir() {
        return Some(format!("cgroup {path} not restored: {} does not exist here", dir.display()));
    }
    match std::fs::write(dir.join("cgroup.procs"), pid.to_string()) {
        Ok(()) => None,
        Err(e) => Some(format!("cgroup {path} not restored: writing {}: {e}", dir.join("cgroup.procs").display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_sets_a_restore_gives() {
        let full = 0x1ff_ffff_ffff;
        let root = [0, full, full, full, 0];
        // A root process keeps the restorer's sets; nobody has none but the bounding set.
        assert_eq!(caps_after_restore([0, 0, 0], root), root);
        assert_eq!(caps_after_restore([65534; 3], root), [0, 0, 0, full, 0]);
        // A saved uid 0 keeps the permitted set, not the effective one.
        assert_eq!(caps_after_restore([1000, 1000, 0], root), [0, full, 0, full, 0]);
        // A root process that dropped a capability is named with the set that differs.
        let d = caps_differ([0, full & !(1 << 21), full & !(1 << 21), full, 0], root).unwrap();
        assert!(d.starts_with("CapPrm ") && d.contains("CapEff ") && !d.contains("CapBnd"), "{d}");
        assert_eq!(caps_differ(root, root), None);
    }
}
