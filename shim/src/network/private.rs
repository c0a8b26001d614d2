//! A network namespace of the runtime's own, holding only a tap: what a VM template boots
//! with, so that its NIC sits in the same device slot as its clones' (whose taps are their
//! pods'). Nothing is wired to it: the template's guest never brings its NIC up.
//!
//! The namespace is a fresh thread's (`unshare(CLONE_NEWNET)`) kept by a bind mount of
//! `/proc/thread-self/ns/net` on a file, as `ip netns add` keeps one; the tap is created from
//! that thread, so it is made inside. Removing it is unmounting and unlinking the file: with the
//! VMM gone nothing else holds the namespace, and the kernel frees it with its tap.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::{tap, NetworkError, TAP_NAME};

/// Creates the namespace at `path` (a new file) with the tap [`TAP_NAME`] in it.
///
/// # Errors
/// [`NetworkError::Private`] for the file, the unshare, the mount or the tap; what was made is
/// removed again.
pub async fn create(path: &Path) -> Result<(), NetworkError> {
    let private = |source| NetworkError::Private {
        netns: path.to_path_buf(),
        source,
    };
    remove(path);
    std::fs::File::create(path).map_err(private)?;
    let target = path.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("pgn-netns-new".into())
        .spawn(move || {
            let made = (|| -> std::io::Result<()> {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
                mount(
                    Some("/proc/thread-self/ns/net"),
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )?;
                tap::create_persistent(TAP_NAME)
            })();
            // The thread ends here, leaving the namespace to the mount.
            let _ = tx.send(made);
        })
        .map_err(private)?;
    let made = rx
        .await
        .map_err(|_| NetworkError::Worker {
            netns: path.to_path_buf(),
        })
        .and_then(|r| r.map_err(private));
    if made.is_err() {
        remove(path);
    }
    made
}

/// Unmounts and removes the namespace file at `path`, if any (best effort: logged).
pub fn remove(path: &Path) {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
        Err(e) => tracing::warn!(netns = %path.display(), error = %e, "cannot unmount"),
    }
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(netns = %path.display(), error = %e, "cannot remove");
        }
    }
}

/// A private namespace, removed on drop.
#[derive(Debug)]
pub struct PrivateNetns {
    /// Its file.
    pub path: PathBuf,
}

impl PrivateNetns {
    /// Creates it at `path`; see [`create`].
    ///
    /// # Errors
    /// As [`create`].
    pub async fn new(path: PathBuf) -> Result<PrivateNetns, NetworkError> {
        create(&path).await?;
        Ok(PrivateNetns { path })
    }
}

impl Drop for PrivateNetns {
    fn drop(&mut self) {
        remove(&self.path);
    }
}
