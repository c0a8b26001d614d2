//! One uid/gid per jailed VMM, from a configured range, without a registry that can leak.
//!
//! Slot `k` of the range is held by an exclusive `flock` on `<dir>/<k>`, kept by the sandbox for
//! its VM's lifetime: a shim that dies releases its slots with its descriptors, so nothing
//! stays allocated. A slot's file is unlinked when it is released; a process that opened the
//! file just before the unlink and then got the lock would hold a lock on a dead file, so after
//! locking, the holder checks that the path still names the inode it locked (the usual
//! lock-file protocol) and otherwise tries again.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// No free slot, or the lock directory is unusable.
#[derive(Debug, thiserror::Error)]
pub enum IdError {
    /// Every id of the range is in use.
    #[error("every one of the {count} jail ids from {first} is in use")]
    Exhausted {
        /// First id of the range.
        first: u32,
        /// Ids in the range.
        count: u32,
    },
    /// The lock directory could not be used.
    #[error("jail id locks in {0}")]
    Dir(PathBuf, #[source] std::io::Error),
}

/// A held id: the VMM runs as `id`/`id`; dropping it frees the id.
#[derive(Debug)]
pub struct JailId {
    /// The uid and gid.
    pub id: u32,
    path: PathBuf,
    lock: Option<Flock<File>>,
}

impl Drop for JailId {
    fn drop(&mut self) {
        // Unlink while holding the lock, then close: see the module docs for why this is safe.
        let _ = std::fs::remove_file(&self.path);
        drop(self.lock.take());
        // The last id out removes the directory (a taker recreates it).
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Takes the first free id of `first..first + count`, with its lock file in `dir`.
///
/// # Errors
/// [`IdError::Exhausted`] when all are held, [`IdError::Dir`] when `dir` is unusable.
pub fn take(dir: &Path, first: u32, count: u32) -> Result<JailId, IdError> {
    let dir_err = |e| IdError::Dir(dir.to_path_buf(), e);
    std::fs::create_dir_all(dir).map_err(dir_err)?;
    for k in 0..count {
        let Some(id) = first.checked_add(k) else {
            break;
        };
        let path = dir.join(k.to_string());
        let slot = match try_slot(&path) {
            // The last holder removed the directory meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).map_err(dir_err)?;
                try_slot(&path)
            }
            other => other,
        };
        if let Some(lock) = slot.map_err(dir_err)? {
            return Ok(JailId {
                id,
                path,
                lock: Some(lock),
            });
        }
    }
    Err(IdError::Exhausted { first, count })
}

/// Locks `path` if no one holds it and it is still the file we locked.
fn try_slot(path: &Path) -> std::io::Result<Option<Flock<File>>> {
    loop {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(None),
            Err((_, e)) => return Err(e.into()),
        };
        let ours = lock.metadata()?;
        match std::fs::metadata(path) {
            Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => return Ok(Some(lock)),
            // Unlinked (or replaced) between our open and our lock: try the new file.
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("pangolin-jail-ids-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn ids_are_handed_out_once_reused_after_release_and_run_out() {
        let d = dir("once");
        let a = take(&d, 200_000, 3).expect("a");
        let b = take(&d, 200_000, 3).expect("b");
        let c = take(&d, 200_000, 3).expect("c");
        assert_eq!((a.id, b.id, c.id), (200_000, 200_001, 200_002));
        let err = take(&d, 200_000, 3).expect_err("exhausted");
        assert!(matches!(err, IdError::Exhausted { count: 3, .. }), "{err}");
        drop(b);
        assert_eq!(take(&d, 200_000, 3).expect("reused").id, 200_001);
        drop((a, c));
        assert!(
            !d.exists(),
            "released slots leave no files, nor the directory"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_slot_held_by_another_process_is_skipped() {
        let d = dir("other");
        std::fs::create_dir_all(&d).expect("mkdir");
        let slot = d.join("0");
        std::fs::write(&slot, "").expect("slot file");
        let inode = std::fs::metadata(&slot).expect("stat").ino();
        // flock(1) in a child holds slot 0 as another shim would.
        let mut holder = std::process::Command::new("flock")
            .arg("-x")
            .arg(&slot)
            .args(["sleep", "30"])
            .spawn()
            .expect("flock");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let held = |inode: u64| {
            std::fs::read_to_string("/proc/locks").is_ok_and(|locks| {
                locks.lines().any(|l| {
                    l.contains("FLOCK")
                        && l.split_whitespace()
                            .any(|f| f.ends_with(&format!(":{inode}")))
                })
            })
        };
        while !held(inode) {
            assert!(
                std::time::Instant::now() < deadline,
                "flock(1) never locked the slot"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let id = take(&d, 10, 4).expect("take");
        assert_eq!(id.id, 11, "slot 0 belongs to the other process");
        drop(id);
        let _ = holder.kill();
        let _ = holder.wait();
        let _ = std::fs::remove_dir_all(&d);
    }
}
