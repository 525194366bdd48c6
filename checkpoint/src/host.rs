//! What this machine and this process allow the engine to do (`migrate-cli check`): each check
//! is harmless (it touches only the calling process) and says what a failure means.

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use crate::sys;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostCheck {
    /// Short name ("ptrace", "pidfd", …).
    pub name: &'static str,
    pub ok: bool,
    /// One line: what was found and, when it failed, what that means for a dump or restore.
    pub detail: String,
}

const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_CHECKPOINT_RESTORE: u32 = 40;

/// Effective capabilities of this process (CapEff of /proc/self/status).
pub(crate) fn cap_eff() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| crate::proc::field(&s, "CapEff").and_then(|v| u64::from_str_radix(v, 16).ok()))
        .unwrap_or(0)
}

fn has_cap(caps: u64, cap: u32) -> bool {
    caps & (1u64 << cap) != 0
}

/// (major, minor) of a kernel release such as "6.18.0-1-amd64".
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// The ptrace verdict from Yama's scope (None: no Yama) and our capabilities.
pub fn ptrace_verdict(scope: Option<u32>, cap_ptrace: bool) -> (bool, String) {
    let who = if cap_ptrace { "running with CAP_SYS_PTRACE" } else { "without CAP_SYS_PTRACE (not root)" };
    let reach = if cap_ptrace { "any process can be traced" } else { "processes of the same user can be traced" };
    match scope {
        None => (true, format!("no Yama LSM, {who}: {reach}")),
        Some(0) => (true, format!("kernel.yama.ptrace_scope = 0, {who}: {reach}")),
        Some(1 | 2) if cap_ptrace => (true, format!("kernel.yama.ptrace_scope = {}, {who}: any process can be traced", scope.unwrap())),
        Some(1) => (false, format!("kernel.yama.ptrace_scope = 1, {who}: only our own descendants can be traced; run as root (or set the sysctl to 0)")),
        Some(2) => (false, format!("kernel.yama.ptrace_scope = 2, {who}: only CAP_SYS_PTRACE may trace; run as root")),
        Some(s) => (false, format!("kernel.yama.ptrace_scope = {s}: ptrace is disabled on this machine until reboot; nothing can be dumped")),
    }
}

/// Every check, in a fixed order.
pub fn checks() -> Vec<HostCheck> {
    let mut v = Vec::new();
    let mut add = |name: &'static str, ok: bool, detail: String| v.push(HostCheck { name, ok, detail });
    let caps = cap_eff();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;

    let arch = std::fs::read_to_string("/proc/sys/kernel/arch")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| std::env::consts::ARCH.to_string());
    let x86 = cfg!(target_arch = "x86_64") && arch == "x86_64";
    add(
        "x86_64",
        x86,
        if x86 {
            "machine is x86_64".into()
        } else {
            format!("machine is {arch}: the engine saves and restores x86_64 registers only")
        },
    );

    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let kv = kernel_version(&release);
    let new_enough = kv.is_some_and(|v| v >= (5, 13));
    add(
        "kernel",
        new_enough,
        if new_enough {
            format!("Linux {release} (>= 5.13)")
        } else {
            format!("Linux {release}: the engine needs >= 5.13 (PTRACE_GET_RSEQ_CONFIGURATION, pidfd_getfd, clone3 set_tid)")
        },
    );

    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").ok().and_then(|s| s.trim().parse().ok());
    let (ok, detail) = ptrace_verdict(scope, has_cap(caps, CAP_SYS_PTRACE));
    add("ptrace", ok, detail);

    let me = std::process::id() as sys::Pid;
    let pidfd = match sys::pidfd_open(me) {
        Ok(p) => p,
        Err(e) => {
            add(
                "pidfd",
                false,
                format!("pidfd_open failed ({e}): fds of sockets and pipes cannot be inspected or copied"),
            );
            return finish(v, caps, root);
        }
    };
    let probe = std::fs::File::open("/dev/null");
    let got = probe
        .as_ref()
        .map_err(|e| std::io::Error::new(e.kind(), e.to_string()))
        .and_then(|f| sys::pidfd_getfd(&pidfd, f.as_raw_fd()));
    match got {
        Ok(_) => add("pidfd", true, "pidfd_open and pidfd_getfd work".into()),
        Err(e) => add(
            "pidfd",
            false,
            format!("pidfd_getfd failed ({e}): sockets, pipes and memfds cannot be inspected or copied"),
        ),
    }

    let src = *b"dvk-check-process_vm_readv";
    let mut dst = [0u8; 26];
    match sys::vm_read(me, &mut dst, &[(src.as_ptr() as u64, src.len())]) {
        Ok(n) if n == src.len() && dst == src => add("process_vm_readv", true, "process_vm_readv works".into()),
        Ok(n) => add(
            "process_vm_readv",
            false,
            format!("process_vm_readv read {n} bytes, not {}: pages cannot be copied", src.len()),
        ),
        Err(e) => add("process_vm_readv", false, format!("process_vm_readv failed ({e}): pages cannot be copied")),
    }

    let pm = std::fs::File::open("/proc/self/pagemap").and_then(|f| {
        let mut b = [0u8; 8];
        sys::pread_exact(&f, &mut b, (dst.as_ptr() as u64 / sys::PAGE) * 8).map(|_| u64::from_le_bytes(b))
    });
    match pm {
        Ok(e) if e & (1 << 63) != 0 => add("pagemap", true, "/proc/PID/pagemap readable".into()),
        Ok(_) => add(
            "pagemap",
            false,
            "/proc/self/pagemap shows a touched page as absent: populated pages cannot be found".into(),
        ),
        Err(e) => add("pagemap", false, format!("/proc/self/pagemap: {e}: populated pages cannot be found")),
    }

    let diag = std::os::unix::net::UnixStream::pair().and_then(|(a, b)| {
        let ino = |s: &std::os::unix::net::UnixStream| {
            std::fs::metadata(format!("/proc/self/fd/{}", s.as_raw_fd())).map(|m| m.ino())
        };
        let (ia, ib) = (ino(&a)?, ino(&b)?);
        let (peer, _) = sys::unix_peer(ia as u32)?;
        Ok(peer as u64 == ib)
    });
    match diag {
        Ok(true) => add("sock_diag", true, "sock_diag (AF_UNIX) finds socket peers".into()),
        Ok(false) => {
            add("sock_diag", false, "sock_diag (AF_UNIX) gave a wrong peer: socket pairs cannot be matched".into())
        }
        Err(e) => add(
            "sock_diag",
            false,
            format!("sock_diag (AF_UNIX) failed ({e}): AF_UNIX socket pairs cannot be matched (modprobe unix_diag?)"),
        ),
    }
    finish(v, caps, root)
}

fn finish(mut v: Vec<HostCheck>, caps: u64, root: bool) -> Vec<HostCheck> {
    let cr = has_cap(caps, CAP_SYS_ADMIN) || has_cap(caps, CAP_CHECKPOINT_RESTORE);
    let mut add = |name: &'static str, ok: bool, detail: String| v.push(HostCheck { name, ok, detail });
    match sys::clone3_exists() {
        Err(e) => add("clone3 set_tid", false, format!("clone3 is not available ({e}; a seccomp filter?): restored processes get a new pid")),
        Ok(()) if cr => add("clone3 set_tid", true, "clone3 with set_tid available: restores keep the pid when it is free".into()),
        Ok(()) => add("clone3 set_tid", false, "clone3 exists, but set_tid needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE: restored processes get a new pid".into()),
    }
    match sys::mm_map_size() {
        Err(e) => add("PR_SET_MM_MAP", false, format!("prctl(PR_SET_MM_MAP) unavailable ({e}; kernel without CONFIG_CHECKPOINT_RESTORE?): nothing can be restored")),
        Ok(_) if cr => add("PR_SET_MM_MAP", true, format!("prctl(PR_SET_MM_MAP) allowed ({})", if root { "root" } else { "CAP_SYS_ADMIN/CAP_CHECKPOINT_RESTORE" })),
        Ok(_) => add("PR_SET_MM_MAP", false, "prctl(PR_SET_MM_MAP) with an exe file needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE (run as root): nothing can be restored".into()),
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert_eq!(kernel_version("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(kernel_version("5.4.0"), Some((5, 4)));
        assert_eq!(kernel_version("5.13"), Some((5, 13)));
        assert_eq!(kernel_version("x"), None);
        assert!(kernel_version("5.13.1").unwrap() >= (5, 13));
        assert!(kernel_version("5.9.1").unwrap() < (5, 13));
    }

    #[test]
    fn ptrace_scopes() {
        assert!(ptrace_verdict(None, false).0);
        assert!(ptrace_verdict(Some(0), false).0);
        assert!(ptrace_verdict(Some(1), true).0);
        assert!(!ptrace_verdict(Some(1), false).0);
        assert!(!ptrace_verdict(Some(2), false).0);
        assert!(!ptrace_verdict(Some(3), true).0);
        assert!(ptrace_verdict(Some(1), false).1.contains("ptrace_scope = 1"));
    }

    #[test]
    fn self_checks_run() {
        let c = checks();
        let names: Vec<&str> = c.iter().map(|c| c.name).collect();
        for n in [
            "x86_64",
            "kernel",
            "ptrace",
            "pidfd",
            "process_vm_readv",
            "pagemap",
            "sock_diag",
            "clone3 set_tid",
            "PR_SET_MM_MAP",
        ] {
            assert!(names.contains(&n), "{n} missing: {names:?}");
        }
        // Those that touch only this process work on any machine the engine supports.
        for c in c.iter().filter(|c| ["pidfd", "process_vm_readv", "sock_diag", "x86_64"].contains(&c.name)) {
            assert!(c.ok, "{}: {}", c.name, c.detail);
        }
    }
}
