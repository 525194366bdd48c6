//! What the agent reads about a registering process from /proc.

use std::fs;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    pub ppid: i32,
    /// Start time in clock ticks since boot: with the pid, identifies a process
    /// across pid reuse, and stays the same across execve.
    pub start_time: u64,
    pub comm: String,
    pub command: String,
}

pub fn read(pid: i32) -> std::io::Result<ProcInfo> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let (comm, ppid, start_time) = parse_stat(&stat).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("/proc/{pid}/stat: unexpected format"))
    })?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let command = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).replace(|c: char| c.is_control(), " "))
        .collect::<Vec<_>>()
        .join(" ");
    Ok(ProcInfo { ppid, start_time, command: if command.is_empty() { comm.clone() } else { command }, comm })
}

/// Parses `pid (comm) state ppid … starttime …`; comm may contain spaces and ')'.
fn parse_stat(stat: &str) -> Option<(String, i32, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let rest: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); ppid is field 4, starttime field 22.
    let ppid = rest.get(1)?.parse().ok()?;
    let start_time = rest.get(19)?.parse().ok()?;
    Some((comm, ppid, start_time))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_comm_with_spaces_and_parens() {
        let stat = "4242 (my (odd) prog) S 17 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 200";
        assert_eq!(parse_stat(stat), Some(("my (odd) prog".into(), 17, 98765)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn reads_itself() {
        let me = read(std::process::id() as i32).unwrap();
        assert!(me.ppid > 0);
        assert!(!me.command.is_empty());
    }
}
