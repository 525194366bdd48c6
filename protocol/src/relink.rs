//! The Relink frame: what the destination agent of a move writes onto the
//! moved process's new agent link before the process resumes, so the shim can
//! follow (docs/MOVE.md, "The shim after a restore"). Fixed binary layout so the
//! shim decodes it inside hooks without allocating:
//!
//! ```text
//!  0      4         6        8                                   116
//!  | DVKR | version | count  | agent socket path (108 bytes, NUL padded) |
//!  116 + 20·i
//!  | fd (i32) | old inode (u64) | new inode (u64) |   × count
//! ```
//! Integers little-endian; version 1; count ≤ [`MAX_RECORDS`]; the path is a
//! `sockaddr_un` `sun_path`: 1 to 107 bytes, no NUL inside, NUL padded. One
//! record per virtual fd of the process: the socket at `fd` had inode `old`
//! before the move and has inode `new` after it. A record whose fd is
//! [`CHILD_PID`] is about a child of the process restored under another real
//! pid (a process tree moved where its pids were taken): `old` is the child's
//! real pid before the move, `new` its real pid now.

pub const MAGIC: [u8; 4] = *b"DVKR";
pub const VERSION: u16 = 1;
/// Most records one frame may carry.
pub const MAX_RECORDS: usize = 1024;
/// Size of the path field (`sizeof(sockaddr_un.sun_path)`).
pub const PATH_LEN: usize = 108;
pub const HEADER_LEN: usize = 4 + 2 + 2 + PATH_LEN;
pub const RECORD_LEN: usize = 20;
/// Largest possible frame.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + MAX_RECORDS * RECORD_LEN;

/// The fd field of a record that maps a child's real pid (see the module doc).
pub const CHILD_PID: i32 = -2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelinkRecord {
    pub fd: i32,
    pub old_ino: u64,
    pub new_ino: u64,
}

impl RelinkRecord {
    /// A child of the process was `old` (real pid) and is `new` now.
    pub fn child_pid(old: i32, new: i32) -> RelinkRecord {
        RelinkRecord { fd: CHILD_PID, old_ino: old as u32 as u64, new_ino: new as u32 as u64 }
    }

    /// (old, new) real pid of a child, if this record maps one.
    pub fn as_child_pid(&self) -> Option<(i32, i32)> {
        let pid = |v: u64| i32::try_from(v).ok().filter(|p| *p > 0);
        (self.fd == CHILD_PID).then(|| Some((pid(self.old_ino)?, pid(self.new_ino)?))).flatten()
    }

    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[0..4].copy_from_slice(&self.fd.to_le_bytes());
        b[4..12].copy_from_slice(&self.old_ino.to_le_bytes());
        b[12..20].copy_from_slice(&self.new_ino.to_le_bytes());
        b
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelinkError {
    #[error("agent socket path of {0} bytes: must be 1 to {max} bytes", max = PATH_LEN - 1)]
    PathLength(usize),
    #[error("agent socket path contains a NUL byte")]
    PathNul,
    #[error("{0} relink records: at most {MAX_RECORDS}")]
    TooManyRecords(usize),
    #[error("not a relink frame (bad magic)")]
    BadMagic,
    #[error("relink frame version {0}, expected {VERSION}")]
    BadVersion(u16),
    #[error("agent socket path in the relink frame is empty or not NUL-terminated")]
    BadPath,
}

/// The whole frame for `agent_socket` (D's agent socket path, no NUL) and `records`.
pub fn encode(agent_socket: &[u8], records: &[RelinkRecord]) -> Result<Vec<u8>, RelinkError> {
    if agent_socket.is_empty() || agent_socket.len() >= PATH_LEN {
        return Err(RelinkError::PathLength(agent_socket.len()));
    }
    if agent_socket.contains(&0) {
        return Err(RelinkError::PathNul);
    }
    if records.len() > MAX_RECORDS {
        return Err(RelinkError::TooManyRecords(records.len()));
    }
    let mut out = Vec::with_capacity(HEADER_LEN + records.len() * RECORD_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(records.len() as u16).to_le_bytes());
    let mut path = [0u8; PATH_LEN];
    path[..agent_socket.len()].copy_from_slice(agent_socket);
    out.extend_from_slice(&path);
    for r in records {
        out.extend_from_slice(&r.encode());
    }
    Ok(out)
}

/// Checks a header; returns the record count that follows and the path field
/// (NUL padded, at least one NUL; see [`path_bytes`]).
pub fn decode_header(b: &[u8; HEADER_LEN]) -> Result<(u16, [u8; PATH_LEN]), RelinkError> {
    if b[0..4] != MAGIC {
        return Err(RelinkError::BadMagic);
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if version != VERSION {
        return Err(RelinkError::BadVersion(version));
    }
    let count = u16::from_le_bytes([b[6], b[7]]);
    if count as usize > MAX_RECORDS {
        return Err(RelinkError::TooManyRecords(count as usize));
    }
    let mut path = [0u8; PATH_LEN];
    path.copy_from_slice(&b[8..HEADER_LEN]);
    if path[0] == 0 || !path.contains(&0) {
        return Err(RelinkError::BadPath);
    }
    Ok((count, path))
}

pub fn decode_record(b: &[u8; RECORD_LEN]) -> RelinkRecord {
    let u64_at = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(w)
    };
    RelinkRecord { fd: i32::from_le_bytes([b[0], b[1], b[2], b[3]]), old_ino: u64_at(4), new_ino: u64_at(12) }
}

/// The path in a decoded path field, without its NUL padding.
pub fn path_bytes(path: &[u8; PATH_LEN]) -> &[u8] {
    let end = path.iter().position(|c| *c == 0).unwrap_or(PATH_LEN);
    &path[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_of(frame: &[u8]) -> [u8; HEADER_LEN] {
        frame[..HEADER_LEN].try_into().unwrap()
    }

    #[test]
    fn round_trip() {
        let records = [
            RelinkRecord { fd: 3, old_ino: 1, new_ino: u64::MAX },
            RelinkRecord { fd: 901, old_ino: 0x0102_0304_0506_0708, new_ino: 42 },
            RelinkRecord { fd: -1, old_ino: 0, new_ino: 0 },
        ];
        let frame = encode(b"/tmp/x/node2/agent.sock", &records).unwrap();
        assert_eq!(frame.len(), HEADER_LEN + 3 * RECORD_LEN);
        assert_eq!(&frame[..4], b"DVKR");
        let (count, path) = decode_header(&header_of(&frame)).unwrap();
        assert_eq!(count, 3);
        assert_eq!(path_bytes(&path), b"/tmp/x/node2/agent.sock");
        for (i, r) in records.iter().enumerate() {
            let at = HEADER_LEN + i * RECORD_LEN;
            assert_eq!(decode_record(frame[at..at + RECORD_LEN].try_into().unwrap()), *r);
        }
        // Longest path, no records.
        let long = [b'a'; PATH_LEN - 1];
        let frame = encode(&long, &[]).unwrap();
        assert_eq!(frame.len(), HEADER_LEN);
        let (count, path) = decode_header(&header_of(&frame)).unwrap();
        assert_eq!((count, path_bytes(&path)), (0, &long[..]));
        // MAX_RECORDS is allowed.
        let many = vec![RelinkRecord { fd: 1, old_ino: 2, new_ino: 3 }; MAX_RECORDS];
        let frame = encode(b"a", &many).unwrap();
        assert_eq!(frame.len(), MAX_FRAME_LEN);
        assert_eq!(decode_header(&header_of(&frame)).unwrap().0 as usize, MAX_RECORDS);
    }

    #[test]
    fn child_pid_records() {
        let r = RelinkRecord::child_pid(4242, 77);
        assert_eq!(r.fd, CHILD_PID);
        assert_eq!(decode_record(&r.encode()).as_child_pid(), Some((4242, 77)));
        assert_eq!(RelinkRecord { fd: 3, old_ino: 1, new_ino: 2 }.as_child_pid(), None);
        assert_eq!(RelinkRecord { fd: CHILD_PID, old_ino: 0, new_ino: 2 }.as_child_pid(), None);
        assert_eq!(RelinkRecord { fd: CHILD_PID, old_ino: 1 << 40, new_ino: 2 }.as_child_pid(), None);
    }

    #[test]
    fn bad_magic() {
        let mut frame = encode(b"/run/dvk/agent.sock", &[]).unwrap();
        frame[3] = b'1';
        assert_eq!(decode_header(&header_of(&frame)), Err(RelinkError::BadMagic));
    }

    #[test]
    fn bad_version() {
        let mut frame = encode(b"/run/dvk/agent.sock", &[]).unwrap();
        frame[4..6].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(decode_header(&header_of(&frame)), Err(RelinkError::BadVersion(2)));
    }

    #[test]
    fn count_too_large() {
        let many = vec![RelinkRecord { fd: 1, old_ino: 2, new_ino: 3 }; MAX_RECORDS + 1];
        assert_eq!(encode(b"/run/dvk/agent.sock", &many), Err(RelinkError::TooManyRecords(MAX_RECORDS + 1)));
        let mut frame = encode(b"/run/dvk/agent.sock", &[]).unwrap();
        frame[6..8].copy_from_slice(&(MAX_RECORDS as u16 + 1).to_le_bytes());
        assert_eq!(decode_header(&header_of(&frame)), Err(RelinkError::TooManyRecords(MAX_RECORDS + 1)));
    }

    #[test]
    fn path_too_long_empty_or_unterminated() {
        assert_eq!(encode(&[b'a'; PATH_LEN], &[]), Err(RelinkError::PathLength(PATH_LEN)));
        assert_eq!(encode(&[b'a'; 200], &[]), Err(RelinkError::PathLength(200)));
        assert_eq!(encode(b"", &[]), Err(RelinkError::PathLength(0)));
        assert_eq!(encode(b"/tmp/a\0b", &[]), Err(RelinkError::PathNul));
        let mut frame = encode(b"/run/dvk/agent.sock", &[]).unwrap();
        frame[8..HEADER_LEN].fill(b'a');
        assert_eq!(decode_header(&header_of(&frame)), Err(RelinkError::BadPath));
        frame[8..HEADER_LEN].fill(0);
        assert_eq!(decode_header(&header_of(&frame)), Err(RelinkError::BadPath));
    }
}
