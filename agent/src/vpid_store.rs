//! Persists the vPID allocator's high-water mark in the runtime dir, so an
//! agent restarted while its processes keep running never hands out a vPID
//! one of them still holds. Numbers are reserved in blocks to keep disk writes
//! off the registration path.

use pidvirt::{NodeId, Vpid, VpidAllocator, VpidSpaceExhausted};
use std::path::PathBuf;
use std::time::Instant;

const BLOCK: u32 = 1024;

pub struct VpidStore {
    allocator: VpidAllocator,
    reserved_until: u32,
    path: PathBuf,
}

impl VpidStore {
    pub fn open(node: NodeId, path: PathBuf) -> std::io::Result<Self> {
        let first = match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().parse::<u32>().unwrap_or(1).max(1),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 1,
            Err(e) => return Err(e),
        };
        let mut store = VpidStore { allocator: VpidAllocator::new(node, first), reserved_until: first, path };
        store.reserve()?;
        Ok(store)
    }

    fn reserve(&mut self) -> std::io::Result<()> {
        let until = self.allocator.next_seq().saturating_add(BLOCK);
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, format!("{until}\n"))?;
        std::fs::rename(&tmp, &self.path)?;
        self.reserved_until = until;
        Ok(())
    }

    /// A vPID (see [`VpidAllocator::allocate_reusing`]): a freed one after its quarantine, else
    /// the counter's next (its high-water mark recorded first), else, with `may_wrap`, one
    /// below the counter that nobody holds.
    pub fn allocate(
        &mut self,
        now: Instant,
        in_use: impl Fn(Vpid) -> bool,
        may_wrap: bool,
    ) -> Result<Vpid, AllocError> {
        if self.allocator.next_seq() >= self.reserved_until {
            self.reserve().map_err(AllocError::Persist)?;
        }
        self.allocator.allocate_reusing(now, in_use, may_wrap).map_err(|VpidSpaceExhausted| AllocError::Exhausted)
    }

    /// `DVK_TEST_VPID_RANGE` (last sequence number) and `DVK_TEST_VPID_QUARANTINE_MS`: a tiny
    /// range and a short quarantine, so an end-to-end test can go round the range many times.
    pub fn apply_test_limits(&mut self) {
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u32>().ok());
        if let Some(last) = var("DVK_TEST_VPID_RANGE") {
            let quarantine = std::time::Duration::from_millis(var("DVK_TEST_VPID_QUARANTINE_MS").unwrap_or(0).into());
            tracing::warn!(last, ?quarantine, "test limits on the vPID range (DVK_TEST_VPID_RANGE)");
            self.allocator.limit_for_tests(last, quarantine);
        }
    }

    /// Nobody in the cluster holds `vpid` any more (ignored unless this node handed it out).
    pub fn free(&mut self, vpid: Vpid, now: Instant) {
        self.allocator.free(vpid, now);
    }
}

#[derive(Debug)]
pub enum AllocError {
    Exhausted,
    Persist(std::io::Error),
}

impl std::fmt::Display for AllocError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AllocError::Exhausted => {
                f.write_str("this node has no vPID free now (every number is held, or freed less than a minute ago)")
            }
            AllocError::Persist(e) => write!(f, "cannot record the vPID high-water mark: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_never_reuses_a_vpid() {
        let dir = std::env::temp_dir().join(format!("dvk-vpid-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vpid-next");
        let mut first = VpidStore::open(NodeId(4), path.clone()).unwrap();
        let now = Instant::now();
        let a: Vec<Vpid> = (0..1500).map(|_| first.allocate(now, |_| false, false).unwrap()).collect();
        drop(first);
        let mut second = VpidStore::open(NodeId(4), path).unwrap();
        let b = second.allocate(now, |_| false, false).unwrap();
        assert!(!a.contains(&b));
        assert!(b > *a.last().unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
