//! The restore stub: a 200-byte static ELF executable, built here byte by byte, that the rebuild
//! `execve`s under `PTRACE_TRACEME`. It is linked at [`STUB_BASE`], far from where Linux puts
//! programs, libraries and stacks, and its entry point is the `syscall; int3` gadget; it never
//! runs on its own: the kernel stops it right after the execve and the engine drives it.
//! No libc, no TLS, no signal handlers, no rseq — nothing to clean out of the new process.

use crate::inject::GADGET;

/// Where the stub and the rebuild's helper mappings live; an image using this range is refused.
pub const STUB_BASE: u64 = 0x3ff0_0000_0000;
pub const GADGET_PAGE: u64 = STUB_BASE + 0x100_0000;
pub const SCRATCH: u64 = STUB_BASE + 0x200_0000;
pub const SCRATCH_LEN: usize = 1 << 20;
pub const VDSO_TEMP: u64 = STUB_BASE + 0x300_0000;
pub const RESERVED_END: u64 = STUB_BASE + 0x400_0000;

const EHDR: usize = 64;
const PHDR: usize = 56;
pub const ENTRY_OFF: u64 = (EHDR + 2 * PHDR) as u64;

pub fn elf() -> Vec<u8> {
    let total = ENTRY_OFF as usize + 8;
    let mut b = Vec::with_capacity(total);
    b.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    b.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    b.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&(STUB_BASE + ENTRY_OFF).to_le_bytes()); // e_entry
    b.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    b.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    b.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    b.extend_from_slice(&(EHDR as u16).to_le_bytes());
    b.extend_from_slice(&(PHDR as u16).to_le_bytes());
    b.extend_from_slice(&2u16.to_le_bytes()); // e_phnum
    b.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
                                  // PT_LOAD, R+X, the whole file at STUB_BASE
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&5u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&STUB_BASE.to_le_bytes());
    b.extend_from_slice(&STUB_BASE.to_le_bytes());
    b.extend_from_slice(&(total as u64).to_le_bytes());
    b.extend_from_slice(&(total as u64).to_le_bytes());
    b.extend_from_slice(&0x1000u64.to_le_bytes());
    // PT_GNU_STACK, RW: no executable stack
    b.extend_from_slice(&0x6474_e551u32.to_le_bytes());
    b.extend_from_slice(&6u32.to_le_bytes());
    b.extend_from_slice(&[0; 48]);
    assert_eq!(b.len(), ENTRY_OFF as usize);
    b.extend_from_slice(&GADGET);
    b.extend_from_slice(&[0xcc; 5]);
    b
}

#[cfg(test)]
mod tests {
    #[test]
    fn elf_is_well_formed() {
        let e = super::elf();
        assert_eq!(&e[..4], b"\x7fELF");
        assert_eq!(e.len(), 120 + 56 + 8);
        assert_eq!(&e[super::ENTRY_OFF as usize..][..3], &[0x0f, 0x05, 0xcc]);
    }
}
