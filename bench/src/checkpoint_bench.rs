//! Checkpoint engine benchmark: dump and restore a process with 2.5 MB, 256 MB and 1 GB of
//! touched memory; MB/s per phase. Baselines measured in the same run: one `process_vm_readv`
//! pass over the same memory, and a buffered write of as many bytes into the image directory
//! (the two copies a dump makes; on this VM the second one dominates and varies 3-5x from run
//! to run with the page cache's state).
//!
//! The workload is a forked child of this (single-threaded) benchmark: it maps and touches N MB,
//! points stdio at /dev/null, closes every other fd and sleeps. The benchmark kills only the
//! processes it started, by pid.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dvk_checkpoint::{self as ck, AfterDump, RestoreOptions};

#[derive(clap::Args, Debug, Clone)]
pub struct CheckpointBenchArgs {
    /// Touched memory sizes in MB.
    #[arg(long, value_delimiter = ',', default_values_t = vec![2.5, 256.0, 1024.0])]
    pub sizes: Vec<f64>,
    /// Where images are written (one at a time, removed afterwards).
    #[arg(long, default_value = "/tmp/dvk-ckpt-bench")]
    pub dir: PathBuf,
    /// A process tree of this many processes instead (the workload and its children, each
    /// touching its own share of the size), dumped and restored whole.
    #[arg(long, default_value_t = 1)]
    pub tree: usize,
}

struct Workload {
    pid: i32,
    addr: u64,
    len: usize,
}

fn spawn_workload(len: usize, members: usize) -> anyhow::Result<Workload> {
    // SAFETY: anonymous mapping owned by this process until the fork; the parent unmaps it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        bail!("mmap {len} bytes failed");
    }
    // SAFETY: fork of a single-threaded process; the child only touches its own memory and makes
    // plain syscalls, and never returns.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: child side: (a tree: fork the other members first, each fills its own share
        // of the mapping and tells the root through a pipe) fill the mapping, detach stdio,
        // sleep forever.
        unsafe {
            let share = (len / members) & !4095;
            let mut me = 0;
            let mut rdy = [-1i32; 2];
            if members > 1 {
                libc::pipe(rdy.as_mut_ptr());
                for i in 1..members {
                    if libc::fork() == 0 {
                        me = i;
                        break;
                    }
                }
            }
            let words = (p as *mut u8).add(me * share) as *mut u64;
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ me as u64;
            let mine = if members > 1 { share } else { len };
            for i in 0..mine / 8 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *words.add(i) = x;
            }
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
            if me > 0 {
                libc::write(rdy[1], c"r".as_ptr().cast(), 1);
            } else if members > 1 {
                libc::close(rdy[1]);
                let mut b = [0u8; 1];
                for _ in 1..members {
                    libc::read(rdy[0], b.as_mut_ptr().cast(), 1);
                }
            }
            libc::syscall(libc::SYS_close_range, 3, u32::MAX, 0);
            libc::kill(libc::getpid(), 0);
            if me == 0 {
                std::ptr::write_volatile(words, 1); // ready marker: first word (all members filled)
            }
            loop {
                libc::pause();
            }
        }
    }
    // SAFETY: the parent's copy of the mapping is not used.
    unsafe { libc::munmap(p, len) };
    if pid < 0 {
        bail!("fork failed");
    }
    // A tree: the root's own share (what the baselines read; the others have theirs).
    let own = if members > 1 { (len / members) & !4095 } else { len };
    let w = Workload { pid, addr: p as u64, len: own };
    // Ready once the child's first word is 1 (written after the fill).
    let t = Instant::now();
    loop {
        let mut b = [0u8; 8];
        let n = ck::sys::vm_read(pid, &mut b, &[(w.addr, 8)]).unwrap_or(0);
        if n == 8 && u64::from_le_bytes(b) == 1 {
            break;
        }
        if t.elapsed() > Duration::from_secs(60) {
            kill(pid);
            bail!("workload did not get ready");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(20)); // let it settle in pause()
    Ok(w)
}

fn kill(pid: i32) {
    // SAFETY: our own child, by pid.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
    }
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9)
}

fn phase(p: &[(&'static str, Duration)], name: &str) -> Duration {
    p.iter().filter(|(n, _)| *n == name).map(|(_, d)| *d).sum()
}

/// Buffered write of `len` bytes into `dir` (the file system's own speed); MB/s.
fn write_baseline(dir: &std::path::Path, len: usize, buf: &[u8]) -> anyhow::Result<f64> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let wpath = dir.join("write-baseline");
    let t = Instant::now();
    {
        let mut f = std::fs::File::create(&wpath)?;
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len());
            f.write_all(&buf[..n])?;
            left -= n;
        }
    }
    let r = mbps(len as u64, t.elapsed());
    let _ = std::fs::remove_file(&wpath);
    Ok(r)
}

pub fn run(args: &CheckpointBenchArgs) -> anyhow::Result<()> {
    let members = args.tree.max(1);
    if members > 1 {
        println!("checkpoint engine: dump (kill) + restore of a tree of {members} processes with N MB of touched memory in all");
        // Members orphaned by the clean-up (their parent killed first) are ours to reap.
        // SAFETY: integer-only prctl on this process.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    } else {
        println!("checkpoint engine: dump (kill) + restore of a process with N MB of touched memory");
    }
    println!(
        "{:>8} {:>9} | {:>9} {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9} {:>9} | {:>9} {:>9}",
        "size MB",
        "stored MB",
        "dump ms",
        "dump MB/s",
        "pages ms",
        "pages MB/s",
        "rest. ms",
        "rest.MB/s",
        "memory ms",
        "mem. MB/s",
        "readv MB/s",
        "write MB/s"
    );
    for &mb in &args.sizes {
        let len = ((mb * 1024.0 * 1024.0) as usize).div_ceil(4096) * 4096;
        let w = spawn_workload(len, members)?;
        // Baseline: one process_vm_readv pass over the same memory, 8 MiB at a time.
        let mut buf = vec![0u8; 8 << 20];
        let t = Instant::now();
        let mut off = 0;
        while off < w.len {
            let n = (w.len - off).min(buf.len());
            ck::sys::vm_read(w.pid, &mut buf[..n], &[(w.addr + off as u64, n)]).context("baseline read")?;
            off += n;
        }
        let base = mbps(w.len as u64, t.elapsed());
        // This VM pays heavily the first time guest memory is used (fresh page-cache pages are
        // 3-5x slower to fill): warm it once, untimed, so the dump and the write baseline below
        // run under the same conditions.
        write_baseline(&args.dir, w.len, &buf)?;

        let dir = args.dir.join(format!("img-{}", w.pid));
        let _ = std::fs::remove_dir_all(&dir);
        let opts = ck::DumpOptions { tree: members > 1, ..Default::default() };
        let d = match ck::dump_with(w.pid, &dir, AfterDump::Kill, &opts) {
            Ok(d) => d,
            Err(e) => {
                kill(w.pid);
                return Err(e.into());
            }
        };
        kill(w.pid); // reaped already by the dump (we are its tracer and parent): no-op
        let r = ck::restore(&dir, &RestoreOptions::default()).context("restore")?;
        // The copy must be alive and hold the data.
        let mut b = [0u8; 8];
        let n = ck::sys::vm_read(r.pid, &mut b, &[(w.addr + 8, 8)]).unwrap_or(0);
        let _ = len;
        if members > 1 && r.tree.len() != members {
            bail!("restored a tree of {} processes, not {members}", r.tree.len());
        }
        for &m in r.tree.iter().skip(1) {
            // SAFETY: killing a member of the tree this benchmark made, by pid.
            unsafe { libc::kill(m, libc::SIGKILL) };
        }
        kill(r.pid);
        for _ in 1..members {
            // SAFETY: valid out pointer; reaps the orphaned members (we are their subreaper).
            unsafe { libc::waitpid(-1, std::ptr::null_mut(), 0) };
        }
        let _ = std::fs::remove_dir_all(&dir);
        if n != 8 {
            bail!("restored workload {} does not hold its memory", r.pid);
        }
        let wbase = write_baseline(&args.dir, w.len, &buf)?;
        let pages = phase(&d.phases, "pages");
        let rmem = phase(&r.phases, "memory");
        println!(
            "{:>8.1} {:>9.1} | {:>9.1} {:>9.0} {:>9.1} {:>9.0} | {:>9.1} {:>9.0} {:>9.1} {:>9.0} | {:>9.0} {:>9.0}",
            mb,
            d.pages_bytes as f64 / 1e6,
            d.total.as_secs_f64() * 1e3,
            mbps(d.pages_bytes, d.total),
            pages.as_secs_f64() * 1e3,
            mbps(d.pages_bytes, pages),
            r.total.as_secs_f64() * 1e3,
            mbps(r.pages_bytes, r.total),
            rmem.as_secs_f64() * 1e3,
            mbps(r.pages_bytes, rmem),
            base,
            wbase
        );
        let phases = |p: &[(&'static str, Duration)]| {
            p.iter().map(|(n, d)| format!("{n} {:.1}", d.as_secs_f64() * 1e3)).collect::<Vec<_>>().join(", ")
        };
        println!("           dump phases (ms): {}; frozen {:.1}", phases(&d.phases), d.frozen.as_secs_f64() * 1e3);
        println!("           restore phases (ms): {}", phases(&r.phases));
    }
    Ok(())
}
