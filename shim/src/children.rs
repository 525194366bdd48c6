//! The vPIDs of this process's own children, so fork() can return a vPID and the
//! wait family and kill() can take one: a lock-free table of (vPID, real pid)
//! pairs, filled by the fork hook and emptied when a child is reaped.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// More children alive at once than this keep working, with real PIDs.
const CAPACITY: usize = 4096;

#[allow(clippy::declare_interior_mutable_const)] // a template for the array below, never used by reference
const EMPTY: AtomicU64 = AtomicU64::new(0);
static TABLE: [AtomicU64; CAPACITY] = [EMPTY; CAPACITY];
/// One above the highest slot ever used: lookups scan no further.
static HIGH: AtomicUsize = AtomicUsize::new(0);

fn used() -> &'static [AtomicU64] {
    &TABLE[..HIGH.load(Ordering::Acquire).min(CAPACITY)]
}

fn pack(vpid: i32, real: i32) -> u64 {
    (vpid as u32 as u64) << 32 | real as u32 as u64
}

fn unpack(v: u64) -> (i32, i32) {
    ((v >> 32) as u32 as i32, v as u32 as i32)
}

/// Remembers a child; false if the table is full (the caller then uses the real PID).
pub fn record(vpid: i32, real: i32) -> bool {
    let packed = pack(vpid, real);
    match TABLE.iter().position(|slot| slot.compare_exchange(0, packed, Ordering::AcqRel, Ordering::Relaxed).is_ok()) {
        Some(i) => {
            HIGH.fetch_max(i + 1, Ordering::AcqRel);
            true
        }
        None => false,
    }
}

pub fn real_of(vpid: i32) -> Option<i32> {
    used().iter().map(|s| unpack(s.load(Ordering::Acquire))).find(|(v, r)| *v == vpid && *r != 0).map(|(_, r)| r)
}

pub fn vpid_of(real: i32) -> Option<i32> {
    used().iter().map(|s| unpack(s.load(Ordering::Acquire))).find(|(v, r)| *r == real && *v != 0).map(|(v, _)| v)
}

/// A child now has another real pid (its tree was restored under new pids): the same vPID.
pub fn remap(old_real: i32, new_real: i32) {
    for slot in used() {
        let v = slot.load(Ordering::Acquire);
        let (vpid, real) = unpack(v);
        if v != 0 && real == old_real {
            let _ = slot.compare_exchange(v, pack(vpid, new_real), Ordering::AcqRel, Ordering::Relaxed);
        }
    }
}

/// Forgets a reaped child.
pub fn forget(real: i32) {
    for slot in used() {
        let v = slot.load(Ordering::Acquire);
        if v != 0 && unpack(v).1 == real {
            let _ = slot.compare_exchange(v, 0, Ordering::AcqRel, Ordering::Relaxed);
        }
    }
}

/// Forgets every child (in a new child: its parent's children are not its own).
pub fn clear() {
    for slot in used() {
        slot.store(0, Ordering::Release);
    }
    HIGH.store(0, Ordering::Release);
}
