//! Every system call the engine makes that needs `unsafe`, wrapped once, with safe signatures.
//!
//! Nothing outside this module contains `unsafe`. Wrappers return `std::io::Error` (errno); the
//! callers turn them into typed [`crate::Error`]s that name the process state involved.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};

pub type Pid = libc::pid_t;

pub const PAGE: u64 = 4096;

/// General purpose registers, laid out exactly like the kernel's `struct user_regs_struct`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Regs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
}

const _: () = assert!(std::mem::size_of::<Regs>() == std::mem::size_of::<libc::user_regs_struct>());

fn cvt(r: libc::c_long) -> io::Result<libc::c_long> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

// ---------------------------------------------------------------- ptrace

const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
pub const NT_X86_XSTATE: libc::c_int = 0x202;

fn ptrace(req: libc::c_uint, pid: Pid, addr: u64, data: u64) -> io::Result<libc::c_long> {
    // SAFETY: raw ptrace request; every pointer passed as addr/data by the callers below points
    // to a live, correctly sized buffer owned by the caller for the duration of the call.
    let r = unsafe {
        *libc::__errno_location() = 0;
        libc::ptrace(req, pid, addr as *mut libc::c_void, data as *mut libc::c_void)
    };
    if r == -1 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(0) {
            return Err(e);
        }
    }
    Ok(r)
}

pub fn seize(pid: Pid, options: u64) -> io::Result<()> {
    ptrace(libc::PTRACE_SEIZE, pid, 0, options).map(drop)
}
pub fn interrupt(pid: Pid) -> io::Result<()> {
    ptrace(libc::PTRACE_INTERRUPT, pid, 0, 0).map(drop)
}
pub fn set_options(pid: Pid, options: u64) -> io::Result<()> {
    ptrace(libc::PTRACE_SETOPTIONS, pid, 0, options).map(drop)
}
pub fn cont(pid: Pid, sig: i32) -> io::Result<()> {
    ptrace(libc::PTRACE_CONT, pid, 0, sig as u64).map(drop)
}
pub fn cont_syscall(pid: Pid) -> io::Result<()> {
    ptrace(libc::PTRACE_SYSCALL, pid, 0, 0).map(drop)
}
/// `PTRACE_GETEVENTMSG`: e.g. the new child's pid at a fork event stop.
pub fn event_msg(pid: Pid) -> io::Result<u64> {
    let mut m: libc::c_ulong = 0;
    ptrace(libc::PTRACE_GETEVENTMSG, pid, 0, &mut m as *mut libc::c_ulong as u64)?;
    Ok(m as u64)
}
/// `PTRACE_LISTEN`: a tracee in group-stop stays stopped, but reports its next change.
pub fn listen(pid: Pid) -> io::Result<()> {
    ptrace(libc::PTRACE_LISTEN, pid, 0, 0).map(drop)
}
pub fn detach(pid: Pid, sig: i32) -> io::Result<()> {
    ptrace(libc::PTRACE_DETACH, pid, 0, sig as u64).map(drop)
}
pub fn get_regs(pid: Pid) -> io::Result<Regs> {
    let mut r = Regs::default();
    ptrace(libc::PTRACE_GETREGS, pid, 0, &mut r as *mut Regs as u64)?;
    Ok(r)
}
pub fn set_regs(pid: Pid, r: &Regs) -> io::Result<()> {
    ptrace(libc::PTRACE_SETREGS, pid, 0, r as *const Regs as u64).map(drop)
}
/// Reads the NT_X86_XSTATE regset into `buf`; returns the length the kernel filled in.
pub fn get_xstate(pid: Pid, buf: &mut [u8]) -> io::Result<usize> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    ptrace(libc::PTRACE_GETREGSET, pid, NT_X86_XSTATE as u64, &mut iov as *mut _ as u64)?;
    Ok(iov.iov_len)
}
pub fn set_xstate(pid: Pid, buf: &[u8]) -> io::Result<()> {
    let mut iov = libc::iovec { iov_base: buf.as_ptr() as *mut _, iov_len: buf.len() };
    ptrace(libc::PTRACE_SETREGSET, pid, NT_X86_XSTATE as u64, &mut iov as *mut _ as u64).map(drop)
}
pub fn get_sigmask(pid: Pid) -> io::Result<u64> {
    let mut m = 0u64;
    ptrace(PTRACE_GETSIGMASK, pid, 8, &mut m as *mut u64 as u64)?;
    Ok(m)
}
pub fn set_sigmask(pid: Pid, m: u64) -> io::Result<()> {
    ptrace(PTRACE_SETSIGMASK, pid, 8, &m as *const u64 as u64).map(drop)
}
pub fn peek_data(pid: Pid, addr: u64) -> io::Result<u64> {
    ptrace(libc::PTRACE_PEEKDATA, pid, addr, 0).map(|v| v as u64)
}
pub fn poke_data(pid: Pid, addr: u64, val: u64) -> io::Result<()> {
    ptrace(libc::PTRACE_POKEDATA, pid, addr, val).map(drop)
}

/// Pending signals of one queue (`shared` = the process-wide one), as raw 128-byte siginfos.
pub fn peek_siginfo(pid: Pid, shared: bool) -> io::Result<Vec<[u8; 128]>> {
    #[repr(C)]
    struct Args {
        off: u64,
        flags: u32,
        nr: i32,
    }
    let mut out = Vec::new();
    let mut buf = vec![[0u8; 128]; 32];
    loop {
        let a = Args { off: out.len() as u64, flags: shared as u32, nr: buf.len() as i32 };
        let n = ptrace(PTRACE_PEEKSIGINFO, pid, &a as *const Args as u64, buf.as_mut_ptr() as u64)?;
        if n <= 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n as usize]);
        if out.len() > 1 << 16 {
            return Ok(out);
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RseqConf {
    pub ptr: u64,
    pub len: u32,
    pub sig: u32,
}
pub fn get_rseq(pid: Pid) -> io::Result<Option<RseqConf>> {
    #[repr(C)]
    #[derive(Default)]
    struct Conf {
        ptr: u64,
        len: u32,
        sig: u32,
        flags: u32,
        pad: u32,
    }
    let mut c = Conf::default();
    let n = ptrace(PTRACE_GET_RSEQ_CONFIGURATION, pid, std::mem::size_of::<Conf>() as u64, &mut c as *mut Conf as u64)?;
    if n <= 0 || c.ptr == 0 {
        return Ok(None);
    }
    Ok(Some(RseqConf { ptr: c.ptr, len: c.len, sig: c.sig }))
}

/// Raw wait status of `pid` (`__WALL`).
pub fn wait(pid: Pid) -> io::Result<i32> {
    let mut st = 0;
    loop {
        // SAFETY: `st` is a valid out pointer.
        let r = unsafe { libc::waitpid(pid, &mut st, libc::__WALL) };
        if r == -1 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(st);
    }
}
/// Non-blocking wait: `Some(status)` when `pid` changed state.
pub fn wait_nohang(pid: Pid) -> io::Result<Option<i32>> {
    let mut st = 0;
    // SAFETY: `st` is a valid out pointer.
    let r = unsafe { libc::waitpid(pid, &mut st, libc::__WALL | libc::WNOHANG) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(if r == 0 { None } else { Some(st) })
}

/// The effective uid: who an image directory must belong to.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() }
}

pub fn kill(pid: Pid, sig: i32) -> io::Result<()> {
    // SAFETY: plain syscall with integer arguments.
    cvt(unsafe { libc::kill(pid, sig) } as libc::c_long).map(drop)
}

// ---------------------------------------------------------------- remote memory

/// iovecs for address ranges of another process (never dereferenced here).
fn remote_iovecs(remote: &[(u64, usize)]) -> Vec<libc::iovec> {
    remote.iter().map(|&(a, l)| libc::iovec { iov_base: a as *mut _, iov_len: l }).collect()
}

/// Reads `remote.len()` ranges of `pid` into consecutive parts of `local`; returns bytes read.
pub fn vm_read(pid: Pid, local: &mut [u8], remote: &[(u64, usize)]) -> io::Result<usize> {
    // A process whose main thread has exited: its memory through a live thread.
    let pid = crate::proc::live_thread(pid).unwrap_or(pid);
    let liov = libc::iovec { iov_base: local.as_mut_ptr().cast(), iov_len: local.len() };
    let riov = remote_iovecs(remote);
    // SAFETY: local iovec covers `local` (exclusively borrowed); remote addresses are only
    // interpreted in the other process.
    let r = unsafe { libc::process_vm_readv(pid, &liov, 1, riov.as_ptr(), riov.len() as _, 0) };
    cvt(r as libc::c_long).map(|n| n as usize)
}

/// Writes consecutive parts of `local` into the ranges `remote` of `pid`; returns bytes written.
pub fn vm_write(pid: Pid, local: &[u8], remote: &[(u64, usize)]) -> io::Result<usize> {
    let liov = libc::iovec { iov_base: local.as_ptr() as *mut _, iov_len: local.len() };
    let riov = remote_iovecs(remote);
    // SAFETY: the local buffer is only read; remote addresses are only interpreted in the other
    // process.
    let r = unsafe { libc::process_vm_writev(pid, &liov, 1, riov.as_ptr(), riov.len() as _, 0) };
    cvt(r as libc::c_long).map(|n| n as usize)
}

/// Whole-buffer positional read (for `/proc/PID/{mem,pagemap}`).
pub fn pread_exact(fd: &impl AsRawFd, buf: &mut [u8], off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writes at most `buf.len() - done` bytes into the tail of `buf`.
        let r = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
                (off + done as u64) as libc::off_t,
            )
        };
        let n = cvt(r as libc::c_long)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short read"));
        }
        done += n as usize;
    }
    Ok(())
}

/// A read-only private mapping of a whole file (the image's page data).
pub struct MappedFile {
    ptr: *mut u8,
    len: usize,
    /// Made by [`MappedFile::anonymous`]: [`MappedFile::write_at`] may write into it.
    writable: bool,
}
// SAFETY: the mapping is read-only and owned by this value.
unsafe impl Send for MappedFile {}
// SAFETY: through a shared reference the mapping is only read (`bytes`); writing into it
// (`write_at`, `grow`) takes `&mut self`.
unsafe impl Sync for MappedFile {}
impl MappedFile {
    pub fn map(file: &std::fs::File, len: usize) -> io::Result<MappedFile> {
        if len == 0 {
            return Ok(MappedFile { ptr: std::ptr::NonNull::dangling().as_ptr(), len: 0, writable: false });
        }
        // SAFETY: new read-only mapping of an open file; the kernel chooses the address.
        let p =
            unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE, file.as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(MappedFile { ptr: p.cast(), len, writable: false })
    }
    /// No mapping at all (length 0); [`MappedFile::grow`] makes it one.
    pub fn empty() -> MappedFile {
        MappedFile { ptr: std::ptr::NonNull::dangling().as_ptr(), len: 0, writable: false }
    }

    /// A private anonymous read-write mapping of `len` bytes (transparent huge pages asked
    /// for: page data received over the network is written here, then read by the restore).
    pub fn anonymous(len: usize) -> io::Result<MappedFile> {
        if len == 0 {
            return Ok(MappedFile { ptr: std::ptr::NonNull::dangling().as_ptr(), len: 0, writable: false });
        }
        // SAFETY: a new anonymous mapping; the kernel chooses the address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: advice on the mapping just created; failure only loses the hint.
        unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) };
        Ok(MappedFile { ptr: p.cast(), len, writable: true })
    }

    /// Copies `data` to offset `off` of an [`MappedFile::anonymous`] mapping.
    pub fn write_at(&mut self, off: usize, data: &[u8]) -> io::Result<()> {
        let end = off.checked_add(data.len()).filter(|&e| e <= self.len);
        if !self.writable {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "a file's mapping is read-only"));
        }
        if end.is_none() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "write past the end of the page data"));
        }
        // SAFETY: off..off+len is inside the mapping (checked above), which is writable (made by
        // `anonymous`) and exclusively borrowed.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) };
        Ok(())
    }

    /// Grows an [`MappedFile::anonymous`] mapping to `len` bytes, keeping its content (the
    /// kernel may move it: no reference into it can be alive, `&mut self` guarantees that).
    pub fn grow(&mut self, len: usize) -> io::Result<()> {
        if len <= self.len {
            return Ok(());
        }
        if self.len == 0 {
            *self = MappedFile::anonymous(len)?;
            return Ok(());
        }
        if !self.writable {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "a file's mapping cannot grow"));
        }
        // SAFETY: remaps exactly the anonymous mapping owned by self; on success the old range
        // is gone and self takes the new one.
        let p = unsafe { libc::mremap(self.ptr.cast(), self.len, len, libc::MREMAP_MAYMOVE) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        self.ptr = p.cast();
        self.len = len;
        Ok(())
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: ptr/len describe a live read-only mapping owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}
impl Drop for MappedFile {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmapping exactly the mapping created in `map`.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }
}

// ---------------------------------------------------------------- misc process queries

pub fn kcmp_file(pid: Pid, fd1: i32, fd2: i32) -> io::Result<bool> {
    // SAFETY: integer-only syscall.
    let r = unsafe {
        libc::syscall(libc::SYS_kcmp, pid, pid, 0 /* KCMP_FILE */, fd1, fd2)
    };
    cvt(r).map(|v| v == 0)
}

/// `kcmp(pid1, pid2, kind)` for the kinds without arguments (KCMP_VM 1, KCMP_FILES 2, KCMP_FS 3,
/// KCMP_SIGHAND 4, KCMP_IO 5, KCMP_SYSVSEM 6): 0 the same object, 1 or 2 an order between two.
pub fn kcmp(pid1: Pid, pid2: Pid, kind: i32) -> io::Result<i64> {
    // SAFETY: integer-only syscall.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid1, pid2, kind, 0, 0) };
    cvt(r)
}

/// Do fd `fd1` of `pid1` and fd `fd2` of `pid2` refer to one open file description?
pub fn kcmp_file_of(pid1: Pid, fd1: i32, pid2: Pid, fd2: i32) -> io::Result<bool> {
    // SAFETY: integer-only syscall.
    let r = unsafe {
        libc::syscall(libc::SYS_kcmp, pid1, pid2, 0 /* KCMP_FILE */, fd1, fd2)
    };
    cvt(r).map(|v| v == 0)
}

/// `shmget(key, size, IPC_CREAT | IPC_EXCL | mode)`: a new SysV shared memory segment's id.
pub fn shm_create(key: i32, size: u64, mode: u32) -> io::Result<i32> {
    let fl = libc::IPC_CREAT | libc::IPC_EXCL | (mode & 0o777) as i32;
    // SAFETY: integer-only call.
    let r = unsafe { libc::shmget(key, size as usize, fl) };
    cvt(r as libc::c_long).map(|v| v as i32)
}

/// `shmctl(IPC_SET)`: owner and permission bits of segment `id`.
pub fn shm_set_owner(id: i32, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
    // SAFETY: shmid_ds is plain data; IPC_STAT fills it, IPC_SET reads it, both within the call.
    unsafe {
        let mut ds: libc::shmid_ds = std::mem::zeroed();
        cvt(libc::shmctl(id, libc::IPC_STAT, &mut ds) as libc::c_long)?;
        ds.shm_perm.uid = uid;
        ds.shm_perm.gid = gid;
        ds.shm_perm.mode = (mode & 0o777) as _;
        cvt(libc::shmctl(id, libc::IPC_SET, &mut ds) as libc::c_long).map(drop)
    }
}

/// `shmctl(cmd)` without a buffer (IPC_RMID, SHM_LOCK).
pub fn shm_ctl(id: i32, cmd: i32) -> io::Result<()> {
    // SAFETY: these commands take no buffer.
    let r = unsafe { libc::shmctl(id, cmd, std::ptr::null_mut()) };
    cvt(r as libc::c_long).map(drop)
}

/// Copies `data` into SysV segment `id` at `offset` (attached read-write in this process for
/// the copy, detached after). Fails if the range is outside the segment.
pub fn shm_write(id: i32, size: u64, offset: u64, data: &[u8]) -> io::Result<()> {
    if offset.checked_add(data.len() as u64).is_none_or(|e| e > size.div_ceil(4096) * 4096) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: the segment is attached where the kernel chooses, at least `size` rounded up to
    // pages long (checked above against `offset + len`); nothing else in this process uses
    // that address; it is detached right after the copy.
    unsafe {
        let p = libc::shmat(id, std::ptr::null(), 0);
        if p as isize == -1 {
            return Err(io::Error::last_os_error());
        }
        std::ptr::copy_nonoverlapping(data.as_ptr(), p.cast::<u8>().add(offset as usize), data.len());
        cvt(libc::shmdt(p) as libc::c_long).map(drop)
    }
}

/// `semctl(GETPID)`: the pid of the last `semop` on semaphore `num` of set `id`.
pub fn sem_last_pid(id: i32, num: i32) -> io::Result<i32> {
    // SAFETY: GETPID takes no argument.
    let r = unsafe { libc::semctl(id, num, libc::GETPID) };
    cvt(r as libc::c_long).map(|v| v as i32)
}

/// `semctl(GETALL)`: the values of the `n` semaphores of set `id`.
pub fn sem_get_all(id: i32, n: usize) -> io::Result<Vec<u16>> {
    let mut v = vec![0u16; n];
    // SAFETY: GETALL writes one unsigned short per semaphore of the set; `n` is its size (the
    // caller read it just before; a set cannot be resized, only removed, which fails the call).
    let r = unsafe { libc::semctl(id, 0, libc::GETALL, v.as_mut_ptr()) };
    cvt(r as libc::c_long).map(|_| v)
}

/// `semctl(IPC_STAT)`: the number of semaphores of set `id`.
pub fn sem_count(id: i32) -> io::Result<usize> {
    // SAFETY: semid_ds is plain data, filled by IPC_STAT within the call.
    unsafe {
        let mut ds: libc::semid_ds = std::mem::zeroed();
        cvt(libc::semctl(id, 0, libc::IPC_STAT, &mut ds as *mut libc::semid_ds) as libc::c_long)?;
        Ok(ds.sem_nsems as usize)
    }
}

/// `semget(key, nsems, IPC_CREAT | IPC_EXCL | mode)`: a new SysV semaphore set's id.
pub fn sem_create(key: i32, nsems: usize, mode: u32) -> io::Result<i32> {
    let fl = libc::IPC_CREAT | libc::IPC_EXCL | (mode & 0o777) as i32;
    // SAFETY: integer-only call.
    let r = unsafe { libc::semget(key, nsems as i32, fl) };
    cvt(r as libc::c_long).map(|v| v as i32)
}

/// `semctl(IPC_SET)`: owner and permission bits of semaphore set `id`.
pub fn sem_set_owner(id: i32, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
    // SAFETY: semid_ds is plain data; IPC_STAT fills it, IPC_SET reads it, both within the call.
    unsafe {
        let mut ds: libc::semid_ds = std::mem::zeroed();
        cvt(libc::semctl(id, 0, libc::IPC_STAT, &mut ds as *mut libc::semid_ds) as libc::c_long)?;
        ds.sem_perm.uid = uid;
        ds.sem_perm.gid = gid;
        ds.sem_perm.mode = (mode & 0o777) as _;
        cvt(libc::semctl(id, 0, libc::IPC_SET, &mut ds as *mut libc::semid_ds) as libc::c_long).map(drop)
    }
}

/// `semctl(IPC_RMID)`: removes semaphore set `id`.
pub fn sem_remove(id: i32) -> io::Result<()> {
    // SAFETY: IPC_RMID takes no argument.
    let r = unsafe { libc::semctl(id, 0, libc::IPC_RMID) };
    cvt(r as libc::c_long).map(drop)
}

/// Runs `f` with the pid of a child of this process that waits, doing nothing, until `f` is done
/// (then it is killed and reaped): a task known to have no SysV undo list (a fork without
/// CLONE_SYSVSEM starts with none), for `kcmp(KCMP_SYSVSEM)` against it. A fork of this process:
/// only for a process seen using a semaphore set.
pub fn with_task_without_undo_list<T>(f: impl FnOnce(Pid) -> T) -> io::Result<T> {
    // SAFETY: the child of a possibly multi-threaded parent calls only pause (async-signal-safe)
    // until it is killed.
    let child = unsafe {
        let r = libc::fork();
        if r == 0 {
            loop {
                libc::pause();
            }
        }
        r
    };
    if child < 0 {
        return Err(io::Error::last_os_error());
    }
    let out = f(child);
    let mut st = 0;
    // SAFETY: kills and waits for our own child, by pid, with a valid status pointer.
    unsafe {
        libc::kill(child, libc::SIGKILL);
        while libc::waitpid(child, &mut st, libc::__WALL) == -1
            && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
        {}
    }
    Ok(out)
}

/// What `msgctl(IPC_STAT)` says of a message queue that a copy of its messages depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsgStat {
    pub qnum: u64,
    pub cbytes: u64,
    pub qbytes: u64,
    pub stime: i64,
    pub rtime: i64,
    pub ctime: i64,
}

/// `msgctl(IPC_STAT)` of message queue `id`.
pub fn msg_stat(id: i32) -> io::Result<MsgStat> {
    // SAFETY: msqid_ds is plain data, filled by IPC_STAT within the call.
    unsafe {
        let mut ds: libc::msqid_ds = std::mem::zeroed();
        cvt(libc::msgctl(id, libc::IPC_STAT, &mut ds) as libc::c_long)?;
        Ok(MsgStat {
            qnum: ds.msg_qnum,
            cbytes: ds.__msg_cbytes,
            qbytes: ds.msg_qbytes,
            stime: ds.msg_stime,
            rtime: ds.msg_rtime,
            ctime: ds.msg_ctime,
        })
    }
}

/// `msgrcv(id, buf, len - 8, index, MSG_COPY | IPC_NOWAIT)`: a copy of the `index`-th message
/// of queue `id` (0 the first), left in the queue: its type in the first 8 bytes of `buf`, its
/// text after; returns (type, text length). E2BIG if the text is longer than `buf.len() - 8`;
/// ENOSYS without CONFIG_CHECKPOINT_RESTORE.
pub fn msg_copy(id: i32, index: u64, buf: &mut [u8]) -> io::Result<(i64, usize)> {
    const MSG_COPY: i64 = 0o40000;
    let max = buf.len().checked_sub(8).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: the kernel writes the type (8 bytes) and at most `max` bytes of text into `buf`,
    // which is 8 + max bytes long and lives through the call.
    let r = unsafe {
        libc::syscall(libc::SYS_msgrcv, id, buf.as_mut_ptr(), max, index, MSG_COPY | libc::IPC_NOWAIT as i64)
    };
    let n = cvt(r)? as usize;
    let mtype = i64::from_ne_bytes(buf[..8].try_into().expect("8 bytes"));
    Ok((mtype, n.min(max)))
}

/// `msgget(key, IPC_CREAT | IPC_EXCL | mode)`: a new SysV message queue's id.
pub fn msg_create(key: i32, mode: u32) -> io::Result<i32> {
    let fl = libc::IPC_CREAT | libc::IPC_EXCL | (mode & 0o777) as i32;
    // SAFETY: integer-only call.
    let r = unsafe { libc::msgget(key, fl) };
    cvt(r as libc::c_long).map(|v| v as i32)
}

/// `msgctl(IPC_SET)`: owner, permission bits and size limit (`msg_qbytes`) of queue `id`.
pub fn msg_set(id: i32, uid: u32, gid: u32, mode: u32, qbytes: u64) -> io::Result<()> {
    // SAFETY: msqid_ds is plain data; IPC_STAT fills it, IPC_SET reads it, both within the call.
    unsafe {
        let mut ds: libc::msqid_ds = std::mem::zeroed();
        cvt(libc::msgctl(id, libc::IPC_STAT, &mut ds) as libc::c_long)?;
        ds.msg_perm.uid = uid;
        ds.msg_perm.gid = gid;
        ds.msg_perm.mode = (mode & 0o777) as _;
        ds.msg_qbytes = qbytes as _;
        cvt(libc::msgctl(id, libc::IPC_SET, &mut ds) as libc::c_long).map(drop)
    }
}

/// `msgctl(IPC_RMID)`: removes message queue `id` (and its messages).
pub fn msg_remove(id: i32) -> io::Result<()> {
    // SAFETY: IPC_RMID takes no buffer.
    let r = unsafe { libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
    cvt(r as libc::c_long).map(drop)
}

/// Is the file registered in epoll `epfd` of `pid` under fd number `tfd` (its `toff`-th
/// registration under that number, counted in the order its fdinfo lists them) the file of `fd`?
pub fn kcmp_epoll_tfd(pid: Pid, epfd: i32, tfd: i32, toff: u32, fd: i32) -> io::Result<bool> {
    let slot: [u32; 3] = [epfd as u32, tfd as u32, toff];
    // SAFETY: KCMP_EPOLL_TFD reads the 12-byte slot, which lives through the call.
    let r = unsafe {
        libc::syscall(libc::SYS_kcmp, pid, pid, 7 /* KCMP_EPOLL_TFD */, fd, slot.as_ptr())
    };
    cvt(r).map(|v| v == 0)
}

/// The status flags (F_GETFL) of one of our own fds.
pub fn fd_status_flags(fd: i32) -> io::Result<u32> {
    // SAFETY: integer-only fcntl on an fd number; an invalid fd gives EBADF.
    let r = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    cvt(r as libc::c_long).map(|v| v as u32)
}

pub fn pidfd_open(pid: Pid) -> io::Result<OwnedFd> {
    // A process whose main thread has exited: the leader's task has no fd table any more, a
    // live thread's pidfd (PIDFD_THREAD = O_EXCL) reaches the process's fds.
    let (pid, flags) = match crate::proc::live_thread(pid) {
        Some(tid) => (tid, libc::O_EXCL),
        None => (pid, 0),
    };
    // SAFETY: integer-only syscall; the returned fd is owned by the OwnedFd.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, flags) };
    cvt(r).map(|fd| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}
pub fn pidfd_getfd(pidfd: &OwnedFd, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: integer-only syscall; the returned fd is owned by the OwnedFd.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    cvt(r).map(|fd| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}
pub fn getsockopt_int(fd: &OwnedFd, level: i32, opt: i32) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut l = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v/l are valid out pointers of the declared size.
    let r = unsafe { libc::getsockopt(fd.as_raw_fd(), level, opt, (&mut v as *mut i32).cast(), &mut l) };
    cvt(r as libc::c_long).map(|_| v)
}
/// The bound path of an AF_UNIX socket (None when unnamed or abstract).
pub fn unix_sock_path(fd: &OwnedFd) -> io::Result<Option<Vec<u8>>> {
    // SAFETY: sockaddr_un is plain data; zero is a valid value.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut l = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: sa/l are valid out pointers of the declared size.
    let r = unsafe { libc::getsockname(fd.as_raw_fd(), (&mut sa as *mut libc::sockaddr_un).cast(), &mut l) };
    cvt(r as libc::c_long)?;
    let n = (l as usize).saturating_sub(2);
    let p: Vec<u8> = sa.sun_path[..n.min(108)].iter().map(|&c| c as u8).collect();
    if p.is_empty() || p[0] == 0 {
        return Ok(None);
    }
    Ok(Some(p.into_iter().take_while(|&c| c != 0).collect()))
}

/// Copies up to `len` bytes queued in pipe `fd` without consuming them (tee into a fresh pipe).
pub fn pipe_peek(fd: &OwnedFd, len: usize) -> io::Result<Vec<u8>> {
    let mut p = [0i32; 2];
    // SAFETY: p is a valid 2-int out array.
    cvt(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } as libc::c_long)?;
    // SAFETY: the two fds were just created and are owned here.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
    // SAFETY: integer-only fcntl.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, len.max(4096) as libc::c_int) };
    // SAFETY: tee between two pipe fds, no user memory.
    let n = unsafe { libc::tee(fd.as_raw_fd(), w.as_raw_fd(), len, libc::SPLICE_F_NONBLOCK) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return Ok(Vec::new());
        }
        return Err(e);
    }
    let mut out = vec![0u8; n as usize];
    let mut done = 0;
    while done < out.len() {
        // SAFETY: reads into the tail of `out`.
        let k = unsafe { libc::read(r.as_raw_fd(), out[done..].as_mut_ptr().cast(), out.len() - done) };
        let k = cvt(k as libc::c_long)?;
        if k == 0 {
            break;
        }
        done += k as usize;
    }
    out.truncate(done);
    Ok(out)
}
/// `F_SETPIPE_SZ`: makes pipe `fd` hold at least `size` bytes.
pub fn set_pipe_size(fd: &impl AsRawFd, size: usize) -> io::Result<()> {
    // SAFETY: integer-only fcntl.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) } as libc::c_long).map(drop)
}

/// `SO_SNDBUFFORCE` (root): a send buffer of `size` bytes (the kernel doubles it) on socket `fd`.
pub fn set_sndbuf_force(fd: &impl AsRawFd, size: i32) -> io::Result<()> {
    // SAFETY: passes a pointer to a local int with its size.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&size as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    } as libc::c_long)
    .map(drop)
}

pub fn pipe_size(fd: &OwnedFd) -> io::Result<usize> {
    // SAFETY: integer-only fcntl.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) } as libc::c_long).map(|v| v as usize)
}

pub fn prlimit(pid: Pid, res: u32, new: Option<(u64, u64)>) -> io::Result<(u64, u64)> {
    let n = new.map(|(c, m)| libc::rlimit64 { rlim_cur: c, rlim_max: m });
    let mut old = libc::rlimit64 { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid in/out pointers to rlimit64 values (new may be null).
    let r = unsafe { libc::prlimit64(pid, res as _, n.as_ref().map_or(std::ptr::null(), |x| x as *const _), &mut old) };
    cvt(r as libc::c_long).map(|_| (old.rlim_cur, old.rlim_max))
}

/// CPU affinity of one thread, as mask words.
pub fn get_affinity(tid: Pid) -> io::Result<Vec<u64>> {
    let mut m = vec![0u64; 16]; // 1024 CPUs
                                // SAFETY: the kernel writes at most the given size into `m`.
    let r = unsafe { libc::syscall(libc::SYS_sched_getaffinity, tid, m.len() * 8, m.as_mut_ptr()) };
    let n = cvt(r)? as usize;
    m.truncate(n.div_ceil(8));
    Ok(m)
}
pub fn set_affinity(tid: Pid, m: &[u64]) -> io::Result<()> {
    // SAFETY: the kernel reads `m.len() * 8` bytes from `m`.
    let r = unsafe { libc::syscall(libc::SYS_sched_setaffinity, tid, m.len() * 8, m.as_ptr()) };
    cvt(r).map(drop)
}
/// Nice value of one thread.
pub fn get_nice(tid: Pid) -> io::Result<i32> {
    // SAFETY: integer-only syscall; the raw syscall returns 20 - nice.
    let r = unsafe { libc::syscall(libc::SYS_getpriority, libc::PRIO_PROCESS, tid) };
    cvt(r).map(|v| 20 - v as i32)
}
pub fn set_nice(tid: Pid, nice: i32) -> io::Result<()> {
    // SAFETY: integer-only syscall.
    let r = unsafe { libc::syscall(libc::SYS_setpriority, libc::PRIO_PROCESS, tid, nice) };
    cvt(r).map(drop)
}

pub fn get_robust_list(pid: Pid) -> io::Result<(u64, u64)> {
    let mut head = 0u64;
    let mut len = 0usize;
    // SAFETY: valid out pointers.
    let r = unsafe { libc::syscall(libc::SYS_get_robust_list, pid, &mut head as *mut u64, &mut len as *mut usize) };
    cvt(r).map(|_| (head, len as u64))
}

pub fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    #[allow(unused_unsafe)]
    // SAFETY: CPUID is available on every x86_64 CPU.
    let r = unsafe { core::arch::x86_64::__cpuid_count(leaf, sub) };
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Start and end of this process's own vDSO, for its content hash.
pub fn own_vdso() -> Option<&'static [u8]> {
    // SAFETY: getauxval is always safe to call.
    let base = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) } as usize;
    if base == 0 {
        return None;
    }
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    for l in maps.lines() {
        if l.ends_with("[vdso]") {
            let (a, rest) = l.split_once('-')?;
            let b = rest.split_whitespace().next()?;
            let a = usize::from_str_radix(a, 16).ok()?;
            let b = usize::from_str_radix(b, 16).ok()?;
            if a == base {
                // SAFETY: the vDSO is mapped readable for the life of the process.
                return Some(unsafe { std::slice::from_raw_parts(a as *const u8, b - a) });
            }
        }
    }
    None
}

// ---------------------------------------------------------------- spawning the restore stub

pub fn memfd_with(name: &str, data: &[u8]) -> io::Result<OwnedFd> {
    let n = CString::new(name).unwrap();
    // SAFETY: valid C string; fd owned below.
    let fd = cvt(unsafe { libc::memfd_create(n.as_ptr(), libc::MFD_CLOEXEC) } as libc::c_long)?;
    // SAFETY: fd was just created.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let mut f = std::fs::File::from(fd);
    std::io::Write::write_all(&mut f, data)?;
    Ok(OwnedFd::from(f))
}

/// What sock_diag tells about one AF_UNIX socket: (peer inode, shutdown mask).
pub fn unix_peer(ino: u32) -> io::Result<(u32, u8)> {
    unix_diag(ino).map(|d| (d.peer, d.shutdown))
}

/// One AF_UNIX socket as sock_diag sees it (by inode, in this network namespace).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnixDiag {
    /// SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET.
    pub sock_type: u8,
    /// TCP_* numbering: 1 = established, 7 = close (unconnected), 10 = listen.
    pub state: u8,
    /// Inode of the peer (0: none, or the peer was closed).
    pub peer: u32,
    pub shutdown: u8,
    /// The bound name (an accepted socket shows its listener's): a path, or starting with NUL
    /// when abstract; None when unnamed.
    pub name: Option<Vec<u8>>,
}

/// Asks sock_diag about the AF_UNIX socket with inode `ino`.
pub fn unix_diag(ino: u32) -> io::Result<UnixDiag> {
    // SAFETY: plain socket creation; the fd is owned below.
    let fd = cvt(unsafe {
        libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 4 /* NETLINK_SOCK_DIAG */)
    } as libc::c_long)?;
    // SAFETY: fd was just created.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let mut req = [0u8; 16 + 24];
    req[0..4].copy_from_slice(&40u32.to_le_bytes());
    req[4..6].copy_from_slice(&20u16.to_le_bytes()); // SOCK_DIAG_BY_FAMILY
    req[6..8].copy_from_slice(&1u16.to_le_bytes()); // NLM_F_REQUEST
    req[16] = libc::AF_UNIX as u8;
    req[20..24].copy_from_slice(&u32::MAX.to_le_bytes()); // all states
    req[24..28].copy_from_slice(&ino.to_le_bytes());
    req[28..32].copy_from_slice(&(1u32 | 4 | 0x10).to_le_bytes()); // UDIAG_SHOW_NAME | PEER | RQLEN
    req[32..40].copy_from_slice(&[0xff; 8]); // no cookie
                                             // SAFETY: sends `req` (valid for its length) to the kernel (default destination).
    cvt(unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } as libc::c_long)?;
    let mut buf = vec![0u8; 8192];
    // SAFETY: receives into `buf` (valid for its length).
    let n = cvt(unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) } as libc::c_long)? as usize;
    parse_unix_diag(&buf[..n])
}

/// Parses sock_diag's answer (nlmsghdr + unix_diag_msg + attributes).
fn parse_unix_diag(buf: &[u8]) -> io::Result<UnixDiag> {
    let n = buf.len();
    let u16_at = |o: usize| u16::from_le_bytes([buf[o], buf[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(buf[o..o + 4].try_into().unwrap());
    if n < 16 || u16_at(4) == 2
    /* NLMSG_ERROR */
    {
        let errno = if n >= 20 { -(u32_at(16) as i32) } else { libc::EIO };
        return Err(io::Error::from_raw_os_error(errno.max(1)));
    }
    if n < 32 {
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    let mut d = UnixDiag { sock_type: buf[17], state: buf[18], ..Default::default() };
    let mut o = 16 + 16; // nlmsghdr + unix_diag_msg
    let end = (u32_at(0) as usize).min(n);
    while o + 4 <= end {
        let len = u16_at(o) as usize;
        let ty = u16_at(o + 2);
        if len < 4 || o + len > end {
            break;
        }
        match ty {
            0 if len > 4 => {
                // UNIX_DIAG_NAME: a path ends at its first NUL (binders may count it in).
                let n = &buf[o + 4..o + len];
                d.name = Some(if n[0] == 0 { n.to_vec() } else { n.iter().copied().take_while(|&c| c != 0).collect() });
            }
            2 if len >= 8 => d.peer = u32_at(o + 4),  // UNIX_DIAG_PEER
            6 if len >= 5 => d.shutdown = buf[o + 4], // UNIX_DIAG_SHUTDOWN
            _ => {}
        }
        o += (len + 3) & !3;
    }
    Ok(d)
}

/// Bytes queued for reading on a stream socket, copied without consuming them (MSG_PEEK).
pub fn sock_peek(fd: &OwnedFd, max: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; max];
    // SAFETY: receives into `buf` (valid for its length).
    let n =
        unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return Ok(Vec::new());
        }
        return Err(e);
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// F_GET_SEALS of a memfd.
pub fn memfd_seals(f: &impl AsRawFd) -> io::Result<u32> {
    // SAFETY: integer-only fcntl.
    cvt(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GET_SEALS) } as libc::c_long).map(|v| v as u32)
}

/// A memfd named `name` holding `data`, then sealed with `seals`.
/// A memfd named `name` holding `data`, with mode bits and owner `attrs` = (mode, uid, gid) set
/// before `seals` are added (F_SEAL_EXEC would forbid changing the exec bits afterwards).
pub fn memfd_with_seals(name: &str, data: &[u8], seals: u32, attrs: (u32, u32, u32)) -> io::Result<OwnedFd> {
    let n = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: valid C string; the fd is owned below.
    let fd =
        cvt(unsafe { libc::memfd_create(n.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) } as libc::c_long)?;
    // SAFETY: fd was just created.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let mut f = std::fs::File::from(fd);
    std::io::Write::write_all(&mut f, data)?;
    // SAFETY: integer-only calls on an fd owned here.
    cvt(unsafe { libc::fchown(f.as_raw_fd(), attrs.1, attrs.2) } as libc::c_long)?;
    // SAFETY: as above.
    cvt(unsafe { libc::fchmod(f.as_raw_fd(), attrs.0 as libc::mode_t) } as libc::c_long)?;
    if seals != 0 {
        // SAFETY: integer-only fcntl.
        cvt(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals as libc::c_int) } as libc::c_long)?;
    }
    Ok(OwnedFd::from(f))
}

/// Forks a child (with PID `want` when given and free) that asks to be traced and executes the
/// static stub in `stub_fd`. Returns the child's pid; it stops with SIGTRAP after the execve.
/// `want` taken: falls back to an ordinary fork (returned flag false).
pub fn spawn_traced_stub(stub_fd: &OwnedFd, want: Option<Pid>) -> io::Result<(Pid, bool)> {
    #[repr(C)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    let empty = [0u8; 1];
    let argv: [*const libc::c_char; 2] = [c"dvk-restore".as_ptr(), std::ptr::null()];
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let raw = stub_fd.as_raw_fd();
    let child = |_: ()| -> ! {
        // SAFETY: runs in the forked child of a possibly multi-threaded parent: only raw,
        // async-signal-safe syscalls until execve replaces the image.
        unsafe {
            libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0);
            libc::syscall(libc::SYS_execveat, raw, empty.as_ptr(), argv.as_ptr(), envp.as_ptr(), libc::AT_EMPTY_PATH);
            libc::syscall(libc::SYS_exit_group, 127);
        }
        #[allow(clippy::empty_loop)]
        loop {}
    };
    if let Some(p) = want {
        let tids = [p as u64];
        let args = CloneArgs {
            flags: 0,
            pidfd: 0,
            child_tid: 0,
            parent_tid: 0,
            exit_signal: libc::SIGCHLD as u64,
            stack: 0,
            stack_size: 0,
            tls: 0,
            set_tid: tids.as_ptr() as u64,
            set_tid_size: 1,
            cgroup: 0,
        };
        // SAFETY: fork-like clone3 (no CLONE_VM): the child gets a copy of memory and only
        // calls `child` above; args/tids live across the call.
        let r = unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>()) };
        if r == 0 {
            child(());
        }
        if r > 0 {
            return Ok((r as Pid, true));
        }
        // EEXIST (taken), EPERM/EINVAL (no privilege / nested namespace): ordinary fork.
    }
    // SAFETY: as above, the child only runs raw syscalls before execve.
    let r = unsafe { libc::fork() };
    if r == 0 {
        child(());
    }
    cvt(r as libc::c_long).map(|p| (p as Pid, false))
}

// ---------------------------------------------------------------- host capability probes

/// Whether the kernel has clone3: a call with a size below the first version of its arguments
/// fails with EINVAL before reading anything; ENOSYS (or a seccomp filter's) means no clone3.
pub fn clone3_exists() -> io::Result<()> {
    // SAFETY: size 0 is rejected by the kernel before the (null) argument pointer is read.
    let r = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
    match cvt(r) {
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) || e.raw_os_error() == Some(libc::EPERM) => Err(e),
        _ => Ok(()),
    }
}

/// `prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE)`: the size of `struct prctl_mm_map` (present with
/// CONFIG_CHECKPOINT_RESTORE); changes nothing.
pub fn mm_map_size() -> io::Result<u32> {
    let mut size: libc::c_uint = 0;
    // SAFETY: the kernel writes one unsigned int to the given pointer.
    let r = unsafe {
        libc::prctl(libc::PR_SET_MM, libc::PR_SET_MM_MAP_SIZE, &mut size as *mut libc::c_uint as libc::c_ulong, 0, 0)
    };
    cvt(r as libc::c_long).map(|_| size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unix_diag_answers() {
        // nlmsghdr (16) + unix_diag_msg (16) + NAME "/a" + PEER 77 + SHUTDOWN 2
        let mut b = vec![0u8; 32];
        b[17] = libc::SOCK_STREAM as u8;
        b[18] = 1;
        let attr = |b: &mut Vec<u8>, ty: u16, data: &[u8]| {
            b.extend_from_slice(&((4 + data.len()) as u16).to_le_bytes());
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(data);
            while b.len() & 3 != 0 {
                b.push(0);
            }
        };
        attr(&mut b, 0, b"/a");
        attr(&mut b, 2, &77u32.to_le_bytes());
        attr(&mut b, 6, &[2]);
        let n = b.len() as u32;
        b[0..4].copy_from_slice(&n.to_le_bytes());
        b[4..6].copy_from_slice(&20u16.to_le_bytes());
        let d = parse_unix_diag(&b).unwrap();
        assert_eq!(d, UnixDiag { sock_type: 1, state: 1, peer: 77, shutdown: 2, name: Some(b"/a".to_vec()) });
        // NLMSG_ERROR carries -errno.
        let mut e = vec![0u8; 20];
        e[4..6].copy_from_slice(&2u16.to_le_bytes());
        e[16..20].copy_from_slice(&(-libc::ENOENT).to_le_bytes());
        assert_eq!(parse_unix_diag(&e).unwrap_err().raw_os_error(), Some(libc::ENOENT));
    }

    #[test]
    fn unix_diag_of_a_pair_and_a_listener() {
        use std::os::unix::fs::MetadataExt;
        let ino = |fd: i32| std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap().ino() as u32;
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let d = unix_diag(ino(a.as_raw_fd())).unwrap();
        assert_eq!(d.peer, ino(b.as_raw_fd()));
        assert_eq!(d.name, None);
        let dir = tempfile::tempdir().unwrap();
        let l = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
        let d = unix_diag(ino(l.as_raw_fd())).unwrap();
        assert_eq!(d.state, 10);
        assert_eq!(d.name.as_deref(), Some(dir.path().join("s").as_os_str().as_encoded_bytes()));
        // An accepted socket shows its listener's name; its client is unnamed.
        let c = std::os::unix::net::UnixStream::connect(dir.path().join("s")).unwrap();
        let (s, _) = l.accept().unwrap();
        let dc = unix_diag(ino(c.as_raw_fd())).unwrap();
        assert_eq!(dc.peer, ino(s.as_raw_fd()));
        assert_eq!(dc.name, None);
        assert_eq!(unix_diag(dc.peer).unwrap().name, d.name);
    }
}

// ---------------------------------------------------------------- dirty tracking (pre-copy)

/// `UFFD_FEATURE_WP_ASYNC`: write faults on write-protected pages are resolved by the kernel
/// itself (the page is only marked written), so nobody has to read the userfaultfd.
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// `UFFD_USER_MODE_ONLY` (userfaultfd flags): allowed to unprivileged processes whatever
/// `vm.unprivileged_userfaultfd` says; the async resolution does not depend on it.
pub const UFFD_USER_MODE_ONLY: u64 = 1;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFD_API: u64 = 0xaa;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;

/// `UFFDIO_API` on a fresh userfaultfd: enables `features`, fails (EINVAL) when the kernel
/// lacks one.
pub fn uffd_api(uffd: &OwnedFd, features: u64) -> io::Result<()> {
    let mut api = [UFFD_API, features, 0u64];
    // SAFETY: `api` is a struct uffdio_api (three u64) the kernel reads and writes in place.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, api.as_mut_ptr()) };
    cvt(r as libc::c_long).map(|_| ())
}

/// `UFFDIO_REGISTER` in write-protect mode of `len` bytes at `start` of the userfaultfd's
/// process (the fd may have been created in another process: its memory is the target).
pub fn uffd_register_wp(uffd: &OwnedFd, start: u64, len: u64) -> io::Result<()> {
    let mut reg = [start, len, UFFDIO_REGISTER_MODE_WP, 0u64];
    // SAFETY: `reg` is a struct uffdio_register (range, mode, ioctls out) read and written in place.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, reg.as_mut_ptr()) };
    cvt(r as libc::c_long).map(|_| ())
}

// ---------------------------------------------------------------- lazy restore (missing faults)

/// Events a lazy restore must see to keep its list of pages still to copy true: the process
/// forked (the child needs the same pages), moved (mremap), discarded (MADV_DONTNEED) or
/// unmapped memory.
pub const UFFD_FEATURE_EVENTS: u64 = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 6);
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
/// `ioctl(open("/dev/userfaultfd"), USERFAULTFD_IOC_NEW, flags)`: a userfaultfd of the caller.
pub const USERFAULTFD_IOC_NEW: u64 = 0xaa00;

/// `UFFDIO_REGISTER` in missing mode: faults on absent pages of `start..start+len` wait for
/// the reader of the userfaultfd.
pub fn uffd_register_missing(uffd: &impl AsRawFd, start: u64, len: u64) -> io::Result<()> {
    let mut reg = [start, len, UFFDIO_REGISTER_MODE_MISSING, 0u64];
    // SAFETY: `reg` is a struct uffdio_register (range, mode, ioctls out) read and written in place.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, reg.as_mut_ptr()) };
    cvt(r as libc::c_long).map(|_| ())
}

/// `UFFDIO_COPY` of `src` to `dst` in the userfaultfd's process (waking what waits there).
/// Ok(len) when all was copied; Err((errno, bytes copied before it)) otherwise (EEXIST: a page
/// is there already; EAGAIN: the layout is changing, read the events first).
pub fn uffd_copy(uffd: &impl AsRawFd, dst: u64, src: &[u8]) -> std::result::Result<u64, (i32, u64)> {
    let mut c = [dst, src.as_ptr() as u64, src.len() as u64, 0u64, 0u64];
    // SAFETY: `c` is a struct uffdio_copy; the kernel reads `src.len()` bytes at `src`, which
    // is valid for them, and writes the count into c[4].
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY, c.as_mut_ptr()) };
    if r == 0 {
        return Ok(src.len() as u64);
    }
    let errno = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
    let done = c[4] as i64;
    Err((errno, if done > 0 { done as u64 } else { 0 }))
}

/// `UFFDIO_ZEROPAGE` of `len` bytes at `start` (Err: the errno).
pub fn uffd_zeropage(uffd: &impl AsRawFd, start: u64, len: u64) -> std::result::Result<(), i32> {
    let mut z = [start, len, 0u64, 0u64];
    // SAFETY: `z` is a struct uffdio_zeropage read and written in place.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_ZEROPAGE, z.as_mut_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
    }
}

/// `UFFDIO_WAKE`: wakes what waits on `start..start+len` (the page got there another way).
pub fn uffd_wake(uffd: &impl AsRawFd, start: u64, len: u64) {
    let mut w = [start, len];
    // SAFETY: `w` is a struct uffdio_range the kernel reads.
    unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_WAKE, w.as_mut_ptr()) };
}

/// One message read from a userfaultfd (struct uffd_msg).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UffdEvent {
    PageFault {
        address: u64,
    },
    /// The process forked: the child's userfaultfd, now an fd of this process.
    Fork {
        ufd: i32,
    },
    Remap {
        from: u64,
        to: u64,
        len: u64,
    },
    /// MADV_DONTNEED/MADV_REMOVE: the range reads as zeros now.
    Remove {
        start: u64,
        end: u64,
    },
    Unmap {
        start: u64,
        end: u64,
    },
    Other(u8),
}

/// Reads the pending messages of a non-blocking userfaultfd (empty: none).
pub fn uffd_read(uffd: &impl AsRawFd, out: &mut Vec<UffdEvent>) -> io::Result<()> {
    let mut buf = [0u8; 32 * 16];
    loop {
        // SAFETY: reads into `buf`, valid for its length.
        let n = unsafe { libc::read(uffd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                return Ok(());
            }
            return Err(e);
        }
        let n = n as usize;
        if n == 0 {
            return Ok(());
        }
        for m in buf[..n].chunks_exact(32) {
            out.push(parse_uffd_msg(m));
        }
        if n < buf.len() {
            return Ok(());
        }
    }
}

fn parse_uffd_msg(m: &[u8]) -> UffdEvent {
    let u64_at = |o: usize| u64::from_le_bytes(m[o..o + 8].try_into().unwrap_or_default());
    let u32_at = |o: usize| u32::from_le_bytes(m[o..o + 4].try_into().unwrap_or_default());
    match m[0] {
        0x12 => UffdEvent::PageFault { address: u64_at(16) },
        0x13 => UffdEvent::Fork { ufd: u32_at(8) as i32 },
        0x14 => UffdEvent::Remap { from: u64_at(8), to: u64_at(16), len: u64_at(24) },
        0x15 => UffdEvent::Remove { start: u64_at(8), end: u64_at(16) },
        0x16 => UffdEvent::Unmap { start: u64_at(8), end: u64_at(16) },
        other => UffdEvent::Other(other),
    }
}

/// Waits up to `timeout_ms` (-1: forever) until one of `fds` is readable; their indexes.
pub fn poll_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<Vec<usize>> {
    let mut p: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    // SAFETY: `p` is a valid array of pollfd of the given length.
    let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::EINTR) { Ok(Vec::new()) } else { Err(e) };
    }
    Ok(p.iter().enumerate().filter(|(_, p)| p.revents != 0).map(|(i, _)| i).collect())
}

const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;
/// Write-protect the pages that match (atomically with reporting them).
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail with EPERM on a mapping not registered for async write-protect.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// A guard page (MADV_GUARD_INSTALL): also reported as swapped, never data.
pub const PAGE_IS_GUARD: u64 = 1 << 8;

/// One `PAGEMAP_SCAN` query (Linux ≥ 6.7) over `start..end` of the process whose
/// `/proc/PID/pagemap` is `pagemap`.
#[derive(Clone, Copy, Debug)]
pub struct PagemapScan {
    pub flags: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

/// Runs `scan` over `start..end`, appending `(start, end, categories)` regions to `out`.
pub fn pagemap_scan(
    pagemap: &impl AsRawFd,
    start: u64,
    end: u64,
    scan: PagemapScan,
    out: &mut Vec<(u64, u64, u64)>,
) -> io::Result<()> {
    const VEC: usize = 1024;
    let mut regions = vec![[0u64; 3]; VEC];
    let mut at = start;
    while at < end {
        // struct pm_scan_arg: size, flags, start, end, walk_end, vec, vec_len, max_pages,
        // category_inverted, category_mask, category_anyof_mask, return_mask.
        let mut arg: [u64; 12] = [
            96,
            scan.flags,
            at,
            end,
            0,
            regions.as_mut_ptr() as u64,
            VEC as u64,
            0,
            0,
            scan.category_mask,
            scan.category_anyof_mask,
            scan.return_mask,
        ];
        // SAFETY: `arg` is a struct pm_scan_arg whose `vec` points at VEC page_region entries
        // (three u64 each) owned by `regions`, alive for the call.
        let r = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, arg.as_mut_ptr()) };
        let n = cvt(r as libc::c_long)? as usize;
        out.extend(regions[..n.min(VEC)].iter().map(|g| (g[0], g[1], g[2])));
        let walk_end = arg[4];
        if walk_end <= at {
            break;
        }
        at = walk_end;
    }
    Ok(())
}

// ---------------------------------------------------------------- inotify, pidfd, POSIX timers

/// Bytes waiting to be read on `fd` (FIONREAD).
pub fn fionread(fd: &impl AsRawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the given pointer.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n as *mut libc::c_int) };
    cvt(r as libc::c_long).map(|_| n.max(0) as usize)
}

/// `open_by_handle_at(mount, handle, O_PATH)`: the file an inotify watch's handle names, on the
/// filesystem of `mount` (needs CAP_DAC_READ_SEARCH).
pub fn open_by_handle(mount: &impl AsRawFd, handle_type: i32, handle: &[u8]) -> io::Result<OwnedFd> {
    // struct file_handle: u32 handle_bytes, i32 handle_type, then the bytes (u32-aligned).
    let mut raw = vec![0u32; 2 + handle.len().div_ceil(4)];
    raw[0] = handle.len() as u32;
    raw[1] = handle_type as u32;
    for (i, chunk) in handle.chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        raw[2 + i] = u32::from_ne_bytes(w);
    }
    // SAFETY: `raw` holds a complete struct file_handle (header + handle_bytes bytes) that lives
    // through the call; the returned fd is owned below.
    let r = unsafe {
        libc::syscall(libc::SYS_open_by_handle_at, mount.as_raw_fd(), raw.as_ptr(), libc::O_PATH | libc::O_CLOEXEC)
    };
    // SAFETY: a new fd from the kernel, owned by the OwnedFd.
    cvt(r).map(|fd| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `PIDFD_GET_INFO` (Linux 6.15) of a pidfd whose process has exited: its wait status and ids
/// (ruid, rgid, euid, egid, suid, sgid, fsuid, fsgid); None when the kernel does not tell.
pub fn pidfd_exit_info(fd: &impl AsRawFd) -> Option<(i32, [u32; 8])> {
    const PIDFD_GET_INFO: libc::c_ulong = 0xc040_ff0b; // _IOWR(0xFF, 11, 64 bytes)
    const PIDFD_INFO_EXIT: u64 = 1 << 3;
    let mut b = [0u64; 8];
    b[0] = PIDFD_INFO_EXIT;
    // SAFETY: `b` is a 64-byte struct pidfd_info the kernel reads and writes in place.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), PIDFD_GET_INFO, b.as_mut_ptr()) };
    if r != 0 || b[0] & PIDFD_INFO_EXIT == 0 {
        return None;
    }
    let bytes: Vec<u8> = b.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let u32_at = |o: usize| u32::from_ne_bytes(bytes[o..o + 4].try_into().unwrap());
    let ids = std::array::from_fn(|i| u32_at(28 + 4 * i));
    Some((u32_at(60) as i32, ids))
}

/// A pidfd of a process that has exited and been reaped (a child forked here that exits at
/// once): what a pidfd of a dead process answers (POLLIN, ESRCH, fdinfo `Pid: -1`). With `exit`
/// (a wait status and ids as [`pidfd_exit_info`] gives them), the child takes those ids and
/// ends that way, so `PIDFD_GET_INFO` answers the same (a core dump is not made again).
pub fn dead_pidfd(exit: Option<(i32, [u32; 8])>) -> io::Result<OwnedFd> {
    // SAFETY: the child only makes raw system calls (async-signal-safe) and exits.
    let child = unsafe { libc::fork() };
    if child == 0 {
        // SAFETY: raw syscalls in the forked child with pointers to its own locals.
        unsafe {
            if let Some((status, ids)) = exit {
                libc::syscall(libc::SYS_setresgid, ids[1], ids[3], ids[5]);
                libc::syscall(libc::SYS_setresuid, ids[0], ids[2], ids[4]);
                if libc::WIFSIGNALED(status) {
                    let sig = libc::WTERMSIG(status);
                    libc::syscall(libc::SYS_prctl, libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
                    let dfl = [0u64; 4];
                    libc::syscall(libc::SYS_rt_sigaction, sig, dfl.as_ptr(), 0usize, 8usize);
                    let m: u64 = 1 << (sig - 1);
                    libc::syscall(libc::SYS_rt_sigprocmask, libc::SIG_UNBLOCK, &m as *const u64, 0usize, 8usize);
                    libc::syscall(libc::SYS_kill, libc::syscall(libc::SYS_getpid), sig);
                }
                libc::_exit(libc::WEXITSTATUS(status));
            }
            libc::_exit(0);
        }
    }
    let child = cvt(child as libc::c_long)? as Pid;
    let fd = pidfd_open(child);
    wait(child)?;
    fd
}

/// A new inotify instance watching `p` for IN_CREATE (tests).
#[cfg(test)]
pub fn inotify_watching(p: &std::path::Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: plain syscall; the fd is owned below.
    let fd = cvt(unsafe { libc::inotify_init1(libc::IN_CLOEXEC) } as libc::c_long)?;
    // SAFETY: fd was just created.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // SAFETY: valid C string and fd.
    cvt(unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), libc::IN_CREATE) } as libc::c_long)?;
    Ok(fd)
}

// ---------------------------------------------------------------- sparse files

fn seek(f: &impl AsRawFd, off: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: integer-only lseek on an fd the caller owns.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(e) };
    }
    Ok(Some(r as u64))
}

/// The first byte of data at or after `off` (`SEEK_DATA`); None past the last data.
pub fn seek_data(f: &impl AsRawFd, off: u64) -> io::Result<Option<u64>> {
    seek(f, off, libc::SEEK_DATA)
}

/// The first hole at or after `off` (`SEEK_HOLE`; the end of the file counts as one).
pub fn seek_hole(f: &impl AsRawFd, off: u64) -> io::Result<u64> {
    seek(f, off, libc::SEEK_HOLE).map(|o| o.unwrap_or(off))
}

// ---------------------------------------------------------------- terminals (see `ttys`)

/// A terminal's settings (`TCGETS2`: flags, line discipline, control characters, any speed).
pub fn tcgets2(fd: &impl AsRawFd) -> io::Result<libc::termios2> {
    // SAFETY: termios2 is plain data; TCGETS2 fills exactly one termios2.
    let mut t: libc::termios2 = unsafe { std::mem::zeroed() };
    // SAFETY: TCGETS2 writes one termios2 to the given pointer.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TCGETS2, &mut t as *mut libc::termios2) };
    cvt(r as libc::c_long).map(|_| t)
}

/// Sets a terminal's settings at once (`TCSETS2`: no drain, no flush).
pub fn tcsets2(fd: &impl AsRawFd, t: &libc::termios2) -> io::Result<()> {
    // SAFETY: TCSETS2 reads one termios2 from the given pointer.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TCSETS2, t as *const libc::termios2) };
    cvt(r as libc::c_long).map(drop)
}

/// An ioctl that writes one int (TIOCGPKT, TIOCGPTLCK, TIOCGEXCL, TIOCGPTN, TIOCINQ).
pub fn ioctl_get_int(fd: &impl AsRawFd, req: libc::Ioctl) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    // SAFETY: the request writes one int to the given pointer.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut v as *mut libc::c_int) };
    cvt(r as libc::c_long).map(|_| v)
}

/// An ioctl that reads one int through a pointer (TIOCPKT, TIOCSPTLCK).
pub fn ioctl_set_int(fd: &impl AsRawFd, req: libc::Ioctl, v: i32) -> io::Result<()> {
    // SAFETY: the request reads one int from the given pointer.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, &v as *const libc::c_int) };
    cvt(r as libc::c_long).map(drop)
}

/// An ioctl without argument (TIOCEXCL).
pub fn ioctl_none(fd: &impl AsRawFd, req: libc::Ioctl) -> io::Result<()> {
    // SAFETY: the request takes no argument.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, 0) };
    cvt(r as libc::c_long).map(drop)
}

/// A terminal's window size: rows, columns, x pixels, y pixels.
pub fn get_winsize(fd: &impl AsRawFd) -> io::Result<[u16; 4]> {
    let mut w = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one winsize to the given pointer.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut w as *mut libc::winsize) };
    cvt(r as libc::c_long).map(|_| [w.ws_row, w.ws_col, w.ws_xpixel, w.ws_ypixel])
}

pub fn set_winsize(fd: &impl AsRawFd, s: [u16; 4]) -> io::Result<()> {
    let w = libc::winsize { ws_row: s[0], ws_col: s[1], ws_xpixel: s[2], ws_ypixel: s[3] };
    // SAFETY: TIOCSWINSZ reads one winsize from the given pointer.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &w as *const libc::winsize) };
    cvt(r as libc::c_long).map(drop)
}

/// Sets the status flags (F_SETFL) of an open file description.
pub fn set_status_flags(fd: &impl AsRawFd, flags: u32) -> io::Result<()> {
    // SAFETY: integer-only fcntl.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags as libc::c_int) };
    cvt(r as libc::c_long).map(drop)
}
