//! fds of namespaces (`open("/proc/self/ns/net")`: /proc/PID/fd shows `net:[4026531840]`),
//! [`FileKind::Namespace`].
//!
//! The restored process lives in the restorer's namespaces. An fd of a namespace is carried
//! when that namespace is the dumper's own of its kind — the dumper standing in for the
//! restorer, as for capabilities — and is re-opened at restore from the new process's
//! `/proc/self/ns/<kind>`, which is then the restorer's. Any other namespace (a container's,
//! one the process `unshare`d) cannot be made again by opening a path, and is refused naming
//! it.

use std::os::unix::fs::MetadataExt;

use crate::error::Result;
use crate::files::FileKind;
use crate::inject::Remote;

/// The kinds /proc/PID/ns holds (`pid_for_children` and `time_for_children` show as `pid`,
/// `time`).
const KINDS: [&str; 8] = ["cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts"];

/// `net:[4026531840]` → ("net", 4026531840).
fn parse(link: &str) -> Option<(&'static str, u64)> {
    let (kind, rest) = link.split_once(":[")?;
    let ino = rest.strip_suffix(']')?.parse().ok()?;
    KINDS.iter().find(|k| **k == kind).map(|k| (*k, ino))
}

/// A namespace fd, or None for any other file; Err says why it cannot be carried.
pub fn describe(link: &str, flags: u32) -> Option<std::result::Result<FileKind, String>> {
    let (kind, ino) = parse(link)?;
    let own = std::fs::metadata(format!("/proc/self/ns/{kind}")).map(|m| m.ino());
    Some(match own {
        Ok(o) if o == ino => Ok(FileKind::Namespace { kind: kind.to_string(), flags }),
        Ok(o) => Err(format!(
            "an fd of a {kind} namespace other than the restorer's ({kind}:[{o}]): only the restorer's own \
             namespaces can be opened again"
        )),
        Err(e) => Err(format!("cannot look at this process's own {kind} namespace: {e}")),
    })
}

/// Opens the new process's own namespace of `kind` (the restorer's); returns the fd there.
pub fn restore(r: &Remote, kind: &str, flags: u32) -> Result<u64> {
    let path = format!("/proc/self/ns/{kind}");
    let p = r.put_cstr(0, path.as_bytes())?;
    let fl = (flags & (libc::O_NONBLOCK as u32)) as u64 | (libc::O_RDONLY | libc::O_CLOEXEC) as u64;
    r.call(&format!("open {path}"), libc::SYS_openat, &[libc::AT_FDCWD as u64, p, fl, 0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_links() {
        assert_eq!(parse("net:[4026531840]"), Some(("net", 4026531840)));
        assert_eq!(parse("pid:[4026531836]"), Some(("pid", 4026531836)));
        assert_eq!(parse("socket:[12]"), None);
        assert_eq!(parse("pipe:[12]"), None);
        assert_eq!(parse("net:[x]"), None);
        // Our own namespace is carried; another inode is refused naming the kind.
        let own = std::fs::metadata("/proc/self/ns/uts").unwrap().ino();
        assert_eq!(
            describe(&format!("uts:[{own}]"), 0o2000000).unwrap().unwrap(),
            FileKind::Namespace { kind: "uts".into(), flags: 0o2000000 }
        );
        let why = describe(&format!("uts:[{}]", own + 1), 0).unwrap().unwrap_err();
        assert!(why.contains("uts namespace other than the restorer's"), "{why}");
    }
}
