//! Container root filesystems on the host, under the pod's shared directory (the virtio-fs
//! source): `<shared>/<container>/rootfs`, mounted from containerd's rootfs mounts (an overlay
//! from the snapshotter) or bind-mounted from the bundle.
//!
//! The shared directory is bind-mounted onto itself and made a shared mount before virtiofsd
//! starts, so mounts made later below it propagate into virtiofsd's private mount namespace.

use std::path::{Path, PathBuf};

use containerd_shim::protos::api::Mount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// A rootfs operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// Creating a directory failed.
    #[error("creating {0}")]
    Mkdir(PathBuf, #[source] std::io::Error),
    /// A mount failed.
    #[error("mounting {what} on {target}")]
    Mount {
        /// What was mounted.
        what: String,
        /// Where.
        target: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

fn mount_err(what: &str, target: &Path) -> impl FnOnce(nix::Error) -> RootfsError {
    let what = what.to_string();
    let target = target.to_path_buf();
    move |e| RootfsError::Mount {
        what,
        target,
        source: e.into(),
    }
}

/// Creates the pod's shared directory as a shared mount point.
pub fn prepare_shared(dir: &Path) -> Result<(), RootfsError> {
    std::fs::create_dir_all(dir).map_err(|e| RootfsError::Mkdir(dir.to_path_buf(), e))?;
    mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(mount_err("the pod share", dir))?;
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(mount_err("the pod share (shared propagation)", dir))?;
    Ok(())
}

/// Unmounts everything below and at `dir` and removes it.
pub fn remove_shared(dir: &Path) {
    unmount_all(dir);
    remove_unmounted(dir);
}

/// Unmounts everything at and below `dir`, innermost first. Each mount is made private first:
/// a volume's bind is a peer of its host source when that is a shared mount, and unmounting
/// its submounts would otherwise propagate and unmount the host's own mounts under the source.
fn unmount_all(dir: &Path) {
    let mounts = mounts_below(dir);
    for m in &mounts {
        let _ = mount(
            None::<&str>,
            m,
            None::<&str>,
            MsFlags::MS_PRIVATE,
            None::<&str>,
        );
    }
    for m in mounts.iter().rev() {
        if let Err(e) = umount2(m, MntFlags::MNT_DETACH) {
            tracing::warn!(path = %m.display(), error = %e, "unmounting a container rootfs or volume");
        }
    }
}

/// Mount points at or below `dir`, in mount order.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Mounts a container's rootfs at `<shared>/<id>/rootfs` (from `mounts`, or a bind of the spec's
/// `root_dir` when containerd passes none); returns that path.
pub async fn mount_container(
    shared: &Path,
    id: &str,
    root_dir: &Path,
    mounts: &[Mount],
) -> Result<PathBuf, RootfsError> {
    let target = shared.join(id).join("rootfs");
    std::fs::create_dir_all(&target).map_err(|e| RootfsError::Mkdir(target.clone(), e))?;
    if mounts.is_empty() {
        mount(
            Some(root_dir),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(mount_err("the bundle rootfs", &target))?;
        return Ok(target);
    }
    for m in mounts {
        containerd_shim::asynchronous::util::mount_rootfs(m, &target)
            .await
            .map_err(|e| RootfsError::Mount {
                what: format!("{} {}", m.type_, m.source),
                target: target.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
    }
    Ok(target)
}

/// Unmounts a container's rootfs and shared volumes and removes its directory.
pub fn unmount_container(shared: &Path, id: &str) {
    let dir = shared.join(id);
    unmount_all(&dir);
    remove_unmounted(&dir);
}

/// Removes `dir` only when nothing is mounted below it any more: a recursive removal through a
/// still-mounted volume would delete the user's host files.
fn remove_unmounted(dir: &Path) {
    let left = mounts_below(dir);
    if left.is_empty() {
        let _ = std::fs::remove_dir_all(dir);
    } else {
        tracing::error!(dir = %dir.display(), mounts = ?left, "still mounted: not removing");
    }
}
