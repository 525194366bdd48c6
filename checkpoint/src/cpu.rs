//! CPU state: general registers (fs_base/gs_base included) and the full xstate (x87, SSE, AVX,
//! AVX-512, PKRU …) through `PTRACE_GETREGSET NT_X86_XSTATE`, its buffer sized from CPUID 0xD.
//! Also what the destination CPU must offer: glibc chose its ifuncs from CPUID at start-up, so the
//! destination must have every feature the source had, and every xstate component in use.

use serde::{Deserialize, Serialize};

use crate::error::{pt, Error, Result};
use crate::sys::{self, Pid, Regs};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CpuState {
    /// Registers to resume with (the syscall-restart fixup already applied).
    pub regs: Regs,
    /// Registers exactly as stopped (for diagnostics).
    pub stopped_regs: Regs,
    pub xstate: Vec<u8>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CpuIdent {
    /// CPUID leaf 1 ECX, EDX; leaf 7.0 EBX, ECX, EDX (feature bits only).
    pub features: [u32; 5],
    /// xstate components enabled by the kernel (from the xstate's software-reserved bytes).
    pub xfeatures: u64,
}

/// Feature bits that describe the OS or the package, not the instruction set.
const LEAF1_ECX_IGNORE: u32 = (1 << 27) | (1 << 3); // OSXSAVE, MONITOR
const LEAF1_EDX_IGNORE: u32 = 1 << 9 | 1 << 28; // APIC, HTT
const LEAF7_ECX_IGNORE: u32 = 1 << 4; // OSPKE

pub fn xstate_len() -> usize {
    let c = sys::cpuid(0xd, 0);
    (c[1].max(c[2]) as usize).max(4096)
}

pub fn xfeatures_of(xstate: &[u8]) -> u64 {
    // fxsave.sw_reserved (offset 464): magic1 u32, extended_size u32, xfeatures u64.
    if xstate.len() >= 480 {
        u64::from_le_bytes(xstate[472..480].try_into().unwrap())
    } else {
        3
    }
}

pub fn ident_here() -> CpuIdent {
    let l1 = sys::cpuid(1, 0);
    let l7 = sys::cpuid(7, 0);
    let d = sys::cpuid(0xd, 0);
    CpuIdent {
        features: [l1[2] & !LEAF1_ECX_IGNORE, l1[3] & !LEAF1_EDX_IGNORE, l7[1], l7[2] & !LEAF7_ECX_IGNORE, l7[3]],
        xfeatures: d[0] as u64 | (d[3] as u64) << 32,
    }
}

impl CpuIdent {
    /// Refuses when this machine lacks a CPU feature or xstate component the image uses.
    pub fn check_here(&self) -> Result<()> {
        let here = ident_here();
        let names = ["CPUID.1:ECX", "CPUID.1:EDX", "CPUID.7:EBX", "CPUID.7:ECX", "CPUID.7:EDX"];
        for ((name, have), want) in names.iter().zip(here.features).zip(self.features) {
            let missing = want & !have;
            if missing != 0 {
                return Err(Error::Mismatch {
                    what: "CPU features".into(),
                    detail: format!("{name} bits {missing:#x} missing"),
                });
            }
        }
        let missing = self.xfeatures & !here.xfeatures;
        if missing != 0 {
            return Err(Error::Mismatch {
                what: "xstate components (XCR0)".into(),
                detail: format!("{missing:#x} missing"),
            });
        }
        Ok(())
    }
}

pub fn collect(pid: Pid, stopped: &Regs) -> Result<(CpuState, CpuIdent)> {
    let mut buf = vec![0u8; xstate_len()];
    let n = sys::get_xstate(pid, &mut buf).map_err(pt("PTRACE_GETREGSET NT_X86_XSTATE", pid))?;
    buf.truncate(n);
    let mut ident = ident_here();
    ident.xfeatures = xfeatures_of(&buf);
    let regs = crate::freeze::restart_fixup(stopped);
    Ok((CpuState { regs, stopped_regs: *stopped, xstate: buf }, ident))
}

/// Writes xstate then registers (the last thing before the process runs).
pub fn restore(pid: Pid, st: &CpuState) -> Result<()> {
    sys::set_xstate(pid, &st.xstate).map_err(pt("PTRACE_SETREGSET NT_X86_XSTATE", pid))?;
    sys::set_regs(pid, &st.regs).map_err(pt("PTRACE_SETREGS", pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_cpu_satisfies_itself_but_not_more() {
        let here = ident_here();
        here.check_here().unwrap();
        let mut more = here.clone();
        more.features[2] |= 1 << 31; // CPUID.7:EBX bit 31 (AVX512VL) — set it if absent
        if more.features[2] != here.features[2] {
            let e = more.check_here().unwrap_err().to_string();
            assert!(e.contains("CPUID.7:EBX"), "{e}");
        }
        let mut xs = here.clone();
        xs.xfeatures |= 1 << 62;
        assert!(xs.check_here().unwrap_err().to_string().contains("XCR0"));
    }

    #[test]
    fn xstate_buffer_is_sized_from_cpuid() {
        assert!(xstate_len() >= 576);
        assert_eq!(xfeatures_of(&[0u8; 100]), 3);
    }
}
