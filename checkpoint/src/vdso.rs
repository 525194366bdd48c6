//! The kernel-provided block `[vvar]` + `[vvar_vclock]` + `[vdso]`.
//!
//! glibc caches pointers into the vDSO at start-up, so the restored process needs the kernel's
//! vDSO at exactly the image's addresses. The rebuild `mremap`s the stub's fresh block there,
//! sizes and adjacency kept (CRIU does the same); the image records the layout and a hash of the
//! vDSO text, and a destination with another layout or another vDSO is refused.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::inject::Remote;
use crate::proc::MapLine;

pub const NAMES: [&str; 3] = ["[vvar]", "[vvar_vclock]", "[vdso]"];

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VdsoLayout {
    /// (name, start, end) in address order.
    pub blocks: Vec<(String, u64, u64)>,
    pub hash: Vec<u8>,
}

pub fn layout_of(maps: &[MapLine]) -> Vec<(String, u64, u64)> {
    maps.iter().filter(|m| NAMES.contains(&m.path.as_str())).map(|m| (m.path.clone(), m.start, m.end)).collect()
}

fn own_hash() -> Vec<u8> {
    crate::sys::own_vdso().map(|b| Sha256::digest(b).to_vec()).unwrap_or_default()
}

pub fn collect(maps: &[MapLine]) -> VdsoLayout {
    VdsoLayout { blocks: layout_of(maps), hash: own_hash() }
}

/// Same names, sizes and relative offsets, in the same order.
fn same_shape(a: &[(String, u64, u64)], b: &[(String, u64, u64)]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| x.0 == y.0 && x.2 - x.1 == y.2 - y.1 && x.1 - a[0].1 == y.1 - b[0].1)
}

fn describe(v: &[(String, u64, u64)]) -> String {
    v.iter().map(|(n, s, e)| format!("{n} {:#x}", e - s)).collect::<Vec<_>>().join(" + ")
}

impl VdsoLayout {
    /// Refuses a machine whose vDSO block has another layout or other contents.
    pub fn check_here(&self) -> Result<()> {
        let here = crate::proc::maps(std::process::id() as i32)?;
        let l = layout_of(&here);
        if !same_shape(&self.blocks, &l) {
            return Err(Error::Mismatch {
                what: "vDSO layout".into(),
                detail: format!("image: {}; here: {}", describe(&self.blocks), describe(&l)),
            });
        }
        if own_hash() != self.hash {
            return Err(Error::Mismatch { what: "vDSO contents".into(), detail: "another kernel build".into() });
        }
        Ok(())
    }

    /// Moves the stub's block to `temp`, (the caller unmaps the stub's leftovers), see `place`.
    pub fn park(&self, r: &Remote, stub_maps: &[MapLine], temp: u64) -> Result<()> {
        let cur = layout_of(stub_maps);
        if !same_shape(&self.blocks, &cur) {
            return Err(Error::Mismatch {
                what: "vDSO layout".into(),
                detail: format!("image: {}; here: {}", describe(&self.blocks), describe(&cur)),
            });
        }
        let base = cur.first().map(|b| b.1).unwrap_or(0);
        for (n, s, e) in &cur {
            r.call(
                &format!("mremap {n}"),
                libc::SYS_mremap,
                &[*s, e - s, e - s, (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64, temp + (s - base)],
            )?;
        }
        Ok(())
    }

    /// Moves the parked block from `temp` onto the image's addresses.
    pub fn place(&self, r: &Remote, temp: u64) -> Result<()> {
        let base = self.blocks.first().map(|b| b.1).unwrap_or(0);
        for (n, s, e) in &self.blocks {
            r.call(
                &format!("mremap {n} to {s:#x}"),
                libc::SYS_mremap,
                &[temp + (s - base), e - s, e - s, (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64, *s],
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(v: &[(&str, u64, u64)]) -> Vec<(String, u64, u64)> {
        v.iter().map(|(n, s, e)| (n.to_string(), *s, *e)).collect()
    }

    #[test]
    fn shape_compares_names_sizes_and_offsets_not_addresses() {
        let a = b(&[("[vvar]", 0x1000, 0x5000), ("[vvar_vclock]", 0x5000, 0x7000), ("[vdso]", 0x7000, 0x9000)]);
        let moved =
            b(&[("[vvar]", 0x11000, 0x15000), ("[vvar_vclock]", 0x15000, 0x17000), ("[vdso]", 0x17000, 0x19000)]);
        assert!(same_shape(&a, &moved));
        let bigger = b(&[("[vvar]", 0x1000, 0x5000), ("[vvar_vclock]", 0x5000, 0x7000), ("[vdso]", 0x7000, 0xa000)]);
        assert!(!same_shape(&a, &bigger));
        let gap = b(&[("[vvar]", 0x1000, 0x5000), ("[vvar_vclock]", 0x6000, 0x8000), ("[vdso]", 0x8000, 0xa000)]);
        assert!(!same_shape(&a, &gap));
        assert!(!same_shape(&a, &a[..2]));
    }

    #[test]
    fn this_machine_matches_itself() {
        let maps = crate::proc::maps(std::process::id() as i32).unwrap();
        collect(&maps).check_here().unwrap();
    }
}
