//! Who may run in which DC, and who may listen on which endpoint name (the config's `[[dc]]`
//! tables; DESIGN §1: a DC is an isolation boundary). Checked by the agent where the caller's
//! uid is known (SO_PEERCRED): at every registration, and at every `Listen`.

use dvk_config::{Config, DcPolicy};
use std::ffi::CString;

/// May the process `pid` of `uid` register in `dc`? Root may always; in a DC with `users` or
/// `groups` only those listed (a group counts when it is the process's effective gid or one of
/// its supplementary groups, read from /proc: the caller verifies `pid` afterwards).
pub fn may_join(config: &Config, dc: &str, uid: u32, pid: i32) -> Result<(), String> {
    let Some(policy) = config.dc_policy(dc) else { return Ok(()) };
    if uid == 0 || policy.is_open() {
        return Ok(());
    }
    if policy.users.iter().flatten().any(|u| user_id(u) == Some(uid)) {
        return Ok(());
    }
    if let Some(groups) = &policy.groups {
        let mine = groups_of(pid).map_err(|e| format!("cannot read the groups of pid {pid}: {e}"))?;
        if groups.iter().filter_map(|g| group_id(g)).any(|g| mine.contains(&g)) {
            return Ok(());
        }
    }
    Err(format!("uid {uid} may not run in DC `{}` (the cluster config lists who may)", policy.name))
}

/// May `uid` listen on endpoint `name` of `dc`, as far as the config says? A name reserved
/// for a user is that user's only (root's processes included). Err: the errno for listen(2).
pub fn may_listen(config: &Config, dc: &str, name: &str, uid: u32) -> Result<(), i32> {
    match config.dc_policy(dc).and_then(|p: &DcPolicy| p.reserved_for(name)) {
        Some(user) if user_id(user) != Some(uid) => Err(libc::EACCES),
        _ => Ok(()),
    }
}

/// A uid from a user name or a decimal uid; None for an unknown user.
fn user_id(user: &str) -> Option<u32> {
    if let Ok(uid) = user.parse() {
        return Some(uid);
    }
    let name = CString::new(user).ok()?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: a zeroed passwd is a valid out-parameter (pointers null, integers 0).
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf outlives it and its length is passed.
    let rc = unsafe { libc::getpwnam_r(name.as_ptr(), &mut pwd, buf.as_mut_ptr().cast(), buf.len(), &mut found) };
    (rc == 0 && !found.is_null()).then_some(pwd.pw_uid)
}

/// A gid from a group name or a decimal gid; None for an unknown group.
fn group_id(group: &str) -> Option<u32> {
    if let Ok(gid) = group.parse() {
        return Some(gid);
    }
    let name = CString::new(group).ok()?;
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: a zeroed group is a valid out-parameter (pointers null, integers 0).
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf outlives it and its length is passed.
    let rc = unsafe { libc::getgrnam_r(name.as_ptr(), &mut grp, buf.as_mut_ptr().cast(), buf.len(), &mut found) };
    (rc == 0 && !found.is_null()).then_some(grp.gr_gid)
}

/// The effective gid and supplementary groups of `pid`.
fn groups_of(pid: i32) -> std::io::Result<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(parse_groups(&status))
}

fn parse_groups(status: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("Gid:") {
            // real, effective, saved, filesystem
            out.extend(rest.split_whitespace().nth(1).and_then(|g| g.parse::<u32>().ok()));
        } else if let Some(rest) = line.strip_prefix("Groups:") {
            out.extend(rest.split_whitespace().filter_map(|g| g.parse::<u32>().ok()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(dcs: &str) -> Config {
        let text = format!(
            "cluster_key_file = \"k\"\n[[node]]\nname = \"n1\"\nid = 1\npeer_addr = \"127.0.0.1:1\"\n\
             runtime_dir = \"/r\"\nimage_dir = \"/i\"\n{dcs}"
        );
        Config::parse(Path::new("/c.toml"), &text).unwrap()
    }

    #[test]
    fn open_unless_listed() {
        let me = std::process::id() as i32;
        let c = config("[[dc]]\nname = \"prod\"\nusers = [\"root\", \"1001\"]\n[[dc]]\nname = \"lab\"\n");
        assert!(may_join(&c, "dc0", 1002, me).is_ok(), "a DC without a table is open");
        assert!(may_join(&c, "lab", 1002, me).is_ok(), "a table without lists is open");
        assert!(may_join(&c, "prod", 1001, me).is_ok());
        assert!(may_join(&c, "PROD", 0, me).is_ok());
        let e = may_join(&c, "Prod", 1002, me).unwrap_err();
        assert!(e.contains("1002") && e.contains("prod"), "{e}");
        let root_only = config("[[dc]]\nname = \"prod\"\nusers = []\n");
        assert!(may_join(&root_only, "prod", 1001, me).is_err());
    }

    #[test]
    fn groups_count_by_effective_and_supplementary_gid() {
        let status = "Name:\tx\nUid:\t5\t5\t5\t5\nGid:\t7\t8\t8\t8\nGroups:\t20 30 \n";
        assert_eq!(parse_groups(status), vec![8, 20, 30]);
        let me = std::process::id() as i32;
        let mine = groups_of(me).unwrap();
        let c = config(&format!("[[dc]]\nname = \"prod\"\ngroups = [\"{}\"]\n", mine[0]));
        assert!(may_join(&c, "prod", 4242, me).is_ok(), "our effective gid {} lets us in", mine[0]);
    }

    #[test]
    fn reserved_names_are_their_users_only() {
        let c = config("[[dc]]\nname = \"prod\"\nreserve = { db = \"1001\", web = \"root\" }\n");
        assert_eq!(may_listen(&c, "prod", "DB", 1002), Err(libc::EACCES));
        assert_eq!(may_listen(&c, "prod", "db", 0), Err(libc::EACCES), "root too");
        assert_eq!(may_listen(&c, "prod", "db", 1001), Ok(()));
        assert_eq!(may_listen(&c, "prod", "web", 0), Ok(()));
        assert_eq!(may_listen(&c, "prod", "cache", 1002), Ok(()));
        assert_eq!(may_listen(&c, "dc0", "db", 1002), Ok(()));
    }
}
