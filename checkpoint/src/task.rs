//! Process-wide attributes: the mm fields (`prctl(PR_SET_MM, PR_SET_MM_MAP)`: brk, code, data,
//! stack, args, env, auxv, exe file), cwd, umask, name, personality, rlimits, and the per-thread
//! registrations glibc made at start-up: `set_tid_address`, the robust futex list and rseq.

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

/// What the process-wide attributes forbid (deleted working directory or executable, a seccomp
/// filter), all of them, without touching the process.
pub fn blockers(pid: Pid) -> Result<Vec<Error>> {
    let cwd = link(pid, "cwd")?;
    let status = read_string(pid, "status")?;
    let exe = link(pid, "exe")?;
    let mut v = refusals(pid, &cwd, &status, &exe);
    if v.is_empty() {
        // Anything else the collection would trip on.
        if let Err(e) = collect_static(pid) {
            v.push(e);
        }
    }
    Ok(v)
}

fn refusals(pid: Pid, cwd: &str, status: &str, exe: &str) -> Vec<Error> {
    let mut v = Vec::new();
    if cwd.ends_with(" (deleted)") {
        v.push(Error::Unsupported { pid, what: format!("working directory {cwd}") });
    }
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
    v
}

/// What needs no injection (also used by the preflight).
pub fn collect_static(pid: Pid) -> Result<TaskState> {
    let cwd = link(pid, "cwd")?;
    let status = read_string(pid, "status")?;
    let exe = link(pid, "exe")?;
    if let Some(e) = refusals(pid, &cwd, &status, &exe).into_iter().next() {
        return Err(e);
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
    })
}

pub fn collect(r: &Remote) -> Result<TaskState> {
    let pid = r.pid;
    let mut st = collect_static(pid)?;
    st.mm.brk = r.call("brk(0)", libc::SYS_brk, &[0])?;
    // From inside: prlimit on another user's process needs CAP_SYS_RESOURCE, which root lacks here.
    for res in 0..16u64 {
        r.call("prlimit64", libc::SYS_prlimit64, &[0, res, 0, r.scratch])?;
        let b = r.get(0, 16)?;
        st.rlimits.push((u64_at(&b, 0), u64_at(&b, 8)));
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
    let p = r.put_cstr(0, st.cwd.as_bytes())?;
    r.call(&format!("chdir {}", st.cwd), libc::SYS_chdir, &[p])?;
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
    r.call("prctl(PR_SET_DUMPABLE)", libc::SYS_prctl, &[libc::PR_SET_DUMPABLE as u64, 1])?;
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
