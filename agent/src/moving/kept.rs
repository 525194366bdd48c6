//! Older images kept on this node, one per process (vPID), so that a `move --transfer rsync`
//! back here sends only what changed (rsync's delta against the kept image).
//!
//! ```text
//! <image_dir>/kept/vpid-<N>/            the latest image of N this node dumped or received
//! <image_dir>/kept/vpid-<N>.in-<mid>/   the dump of move <mid> that left this node, being
//!                                       copied here from the agent's tmpfs after the commit
//!                                       (then renamed to vpid-<N>)
//! ```
//! A source dumps to tmpfs (no disk writeback while the process is frozen) and copies its dump
//! here once the move committed (the process runs on the destination by then).
//! A kept image goes when its process exits (any node's ProcessDown), or when the images here
//! hold more than the node's `kept_images_mb`: the least recently used first. The directories
//! are root's, 0700, inside the node's 0700 `image_dir`.

use pidvirt::Vpid;
use std::collections::HashSet;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

pub struct KeptImages {
    root: PathBuf,
    max: u64,
}

impl KeptImages {
    pub fn new(image_dir: &Path, max: u64) -> KeptImages {
        KeptImages { root: image_dir.join("kept"), max }
    }

    pub fn of(agent: &crate::state::Agent) -> KeptImages {
        KeptImages::new(&agent.me.image_dir, agent.me.kept_images_max)
    }

    /// The kept image of `vpid` (it may not exist).
    pub fn dir(&self, vpid: Vpid) -> PathBuf {
        self.root.join(format!("vpid-{}", vpid.0))
    }

    /// Where the dump of move `mid` of `vpid` is copied before it becomes the kept image.
    fn incoming_dir(&self, vpid: Vpid, mid: u64) -> PathBuf {
        self.root.join(format!("vpid-{}.in-{mid:x}", vpid.0))
    }

    /// The kept image directory of `vpid`, made (0700) if there is none, marked as just used.
    pub fn prepare(&self, vpid: Vpid) -> std::io::Result<PathBuf> {
        let dir = self.dir(vpid);
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        // Made by root in root's 0700 image_dir: nobody else can have put a link there.
        let m = std::fs::symlink_metadata(&dir)?;
        if !m.is_dir() {
            return Err(std::io::Error::other(format!("{} is not a directory", dir.display())));
        }
        touch(&dir);
        Ok(dir)
    }

    /// Copies the image files of `from` into a new directory for move `mid` of `vpid`.
    fn copy_in(&self, vpid: Vpid, mid: u64, from: &Path) -> std::io::Result<PathBuf> {
        let to = self.incoming_dir(vpid, mid);
        let _ = std::fs::remove_dir_all(&to);
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&to)?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            // An image directory holds regular files only (written by this agent).
            if e.file_type()?.is_file() {
                std::fs::copy(e.path(), to.join(e.file_name()))?;
            }
        }
        Ok(to)
    }

    /// `new` becomes the kept image of `vpid` (the one it replaces is removed).
    fn install(&self, vpid: Vpid, new: &Path) -> std::io::Result<()> {
        let dir = self.dir(vpid);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(new, &dir)?;
        touch(&dir);
        Ok(())
    }

    /// `vpid` exited: its images here are of no use any more.
    pub fn forget(&self, vpid: Vpid) {
        let prefix = format!("vpid-{}", vpid.0);
        let Ok(entries) = std::fs::read_dir(&self.root) else { return };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == prefix || name.strip_prefix(&prefix).is_some_and(|rest| rest.starts_with(".in-")) {
                if let Err(err) = std::fs::remove_dir_all(e.path()) {
                    tracing::warn!(dir = %e.path().display(), "cannot remove the kept image: {err}");
                }
            }
        }
    }

    /// At agent start: dumps whose copy in was cut short (the agent stopped) are removed.
    pub fn clean_incomplete(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().contains(".in-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    /// Removes kept images, least recently used first, until they hold at most the cap; the
    /// images of processes in `busy` (moving now) stay. Returns the vPIDs whose image went.
    pub fn enforce_cap(&self, busy: &HashSet<Vpid>) -> Vec<Vpid> {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return Vec::new() };
        let mut images: Vec<(std::time::SystemTime, u64, Vpid, PathBuf)> = Vec::new();
        let mut total = 0u64;
        for e in entries.flatten() {
            let size = dir_size(&e.path());
            total += size;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(vpid) = name.strip_prefix("vpid-").and_then(|n| n.parse::<i32>().ok()).map(Vpid) else {
                continue; // a dump being copied in
            };
            let used = e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
            images.push((used, size, vpid, e.path()));
        }
        images.sort_by_key(|i| i.0);
        let mut removed = Vec::new();
        for (_, size, vpid, path) in images {
            if total <= self.max {
                break;
            }
            if busy.contains(&vpid) {
                continue;
            }
            if std::fs::remove_dir_all(&path).is_ok() {
                tracing::info!(%vpid, bytes = size, cap = self.max, total, "kept image removed (over the cap)");
                total -= size;
                removed.push(vpid);
            }
        }
        removed
    }
}

/// Marks `dir` as used now (its mtime orders eviction).
fn touch(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum()
}

/// `vpid` exited: every kept image of it on this node goes (off the caller's thread).
pub fn forget(agent: &crate::state::Agent, vpid: Vpid) {
    let kept = KeptImages::of(agent);
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn_blocking(move || kept.forget(vpid));
        }
        Err(_) => kept.forget(vpid),
    }
}

/// Source, after a committed `--transfer rsync` move: its dump `from` (on the agent's tmpfs)
/// becomes this node's kept image of `vpid`; returns its size. Not if a move of it to this node
/// started meanwhile (its rsync writes the kept image: that one is newer, and its restore
/// reads it).
pub fn keep_dump(agent: &crate::state::Agent, vpid: Vpid, mid: u64, from: &Path) -> std::io::Result<u64> {
    let kept = KeptImages::of(agent);
    let new = kept.copy_in(vpid, mid, from);
    let new = match new {
        Ok(d) => d,
        Err(e) => {
            let _ = std::fs::remove_dir_all(kept.incoming_dir(vpid, mid));
            return Err(e);
        }
    };
    let installed = {
        // Under this lock no move of vpid to here starts (participant::start inserts it).
        let incoming = agent.moves.rsync_dest.lock();
        if incoming.values().any(|v| *v == vpid) {
            Err(std::io::Error::other("a move of the process back here has started"))
        } else {
            kept.install(vpid, &new)
        }
    };
    let _ = std::fs::remove_dir_all(&new);
    installed?;
    tracing::info!(%vpid, dir = %kept.dir(vpid).display(), "the image that left is kept for a move back");
    enforce_cap(agent);
    Ok(dir_size(&kept.dir(vpid)))
}

/// Enforces the cap, sparing the processes moving now.
pub fn enforce_cap(agent: &crate::state::Agent) {
    let mut busy: HashSet<Vpid> = agent.moves.coordinating.lock().keys().copied().collect();
    busy.extend(agent.moves.rsync_dest.lock().values().copied());
    KeptImages::of(agent).enforce_cap(&busy);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(k: &KeptImages, vpid: i32, bytes: usize, age_s: u64) {
        let d = k.prepare(Vpid(vpid)).unwrap();
        std::fs::write(d.join("pages.img"), vec![1u8; bytes]).unwrap();
        let f = std::fs::File::open(&d).unwrap();
        f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(age_s)).unwrap();
    }

    #[test]
    fn over_the_cap_the_least_recently_used_go_first_and_busy_ones_stay() {
        let t = tempfile::tempdir().unwrap();
        let k = KeptImages::new(t.path(), 250);
        image(&k, 1, 100, 30); // oldest, but moving now
        image(&k, 2, 100, 20);
        image(&k, 3, 100, 10);
        image(&k, 4, 100, 0);
        let busy: HashSet<Vpid> = [Vpid(1)].into();
        assert_eq!(k.enforce_cap(&busy), vec![Vpid(2), Vpid(3)]);
        assert!(k.dir(Vpid(1)).exists() && k.dir(Vpid(4)).exists());
        assert!(!k.dir(Vpid(2)).exists() && !k.dir(Vpid(3)).exists());
        assert!(k.enforce_cap(&busy).is_empty(), "under the cap nothing more goes");
    }

    #[test]
    fn an_exit_removes_the_kept_image_and_any_dump_of_that_process_only() {
        let t = tempfile::tempdir().unwrap();
        let k = KeptImages::new(t.path(), 1 << 30);
        image(&k, 7, 10, 0);
        image(&k, 70, 10, 0);
        std::fs::create_dir_all(k.incoming_dir(Vpid(7), 0xabc)).unwrap();
        k.forget(Vpid(7));
        assert!(!k.dir(Vpid(7)).exists() && !k.incoming_dir(Vpid(7), 0xabc).exists());
        assert!(k.dir(Vpid(70)).exists(), "vPID 70 is another process");
        std::fs::create_dir_all(k.incoming_dir(Vpid(70), 0xdef)).unwrap();
        k.clean_incomplete();
        assert!(!k.incoming_dir(Vpid(70), 0xdef).exists() && k.dir(Vpid(70)).exists());
    }

    #[test]
    fn a_committed_dump_replaces_the_kept_image() {
        let t = tempfile::tempdir().unwrap();
        let k = KeptImages::new(t.path(), 1 << 30);
        image(&k, 5, 10, 0);
        let dump = t.path().join("staging-out");
        std::fs::create_dir_all(&dump).unwrap();
        std::fs::write(dump.join("manifest.img"), b"new").unwrap();
        let new = k.copy_in(Vpid(5), 1, &dump).unwrap();
        k.install(Vpid(5), &new).unwrap();
        assert!(!new.exists());
        assert!(!k.dir(Vpid(5)).join("pages.img").exists());
        assert_eq!(std::fs::read(k.dir(Vpid(5)).join("manifest.img")).unwrap(), b"new");
    }
}
