//! The pod's host mounts (its virtio-fs share, container rootfs, volumes) behind one trait, so
//! the lifecycle can be unit-tested with a fake passed in explicitly.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use containerd_shim::protos::api::Mount;
use oci_spec::runtime::Spec;
use pangolin_protocols::GUEST_SHARED_DIR;

use super::{rootfs, volumes, PodError};

/// Host-side mounts of one pod.
#[async_trait]
pub trait PodMounts: Send + Sync + 'static {
    /// The directory shared with the guest (the virtio-fs source).
    fn shared(&self) -> &Path;
    /// Creates the share before the VM boots.
    fn prepare_shared(&self) -> Result<(), PodError>;
    /// Unmounts and removes the whole share.
    fn remove_shared(&self);
    /// Shares `spec`'s bind mounts for container `id`, rewriting their sources to guest paths.
    fn share_volumes(&self, id: &str, spec: &mut Spec) -> Result<(), PodError>;
    /// Mounts container `id`'s rootfs into the share; returns its guest path.
    async fn mount_rootfs(
        &self,
        id: &str,
        root: &Path,
        mounts: &[Mount],
    ) -> Result<String, PodError>;
    /// Unmounts container `id`'s rootfs and volumes and removes its directory.
    fn unmount_container(&self, id: &str);
}

/// The real mounts, under `<state_dir>/<pod>.shared`.
pub struct HostMounts {
    shared: PathBuf,
}

impl HostMounts {
    /// Mounts of the pod whose share is `shared`.
    pub fn new(shared: PathBuf) -> HostMounts {
        HostMounts { shared }
    }
}

#[async_trait]
impl PodMounts for HostMounts {
    fn shared(&self) -> &Path {
        &self.shared
    }

    fn prepare_shared(&self) -> Result<(), PodError> {
        // A full or read-only state dir is named by its key before anything is made there.
        if let Some(state_dir) = self.shared.parent() {
            crate::sandbox::prepare_state_dir(state_dir)?;
        }
        Ok(rootfs::prepare_shared(&self.shared)?)
    }

    fn remove_shared(&self) {
        rootfs::remove_shared(&self.shared);
    }

    fn share_volumes(&self, id: &str, spec: &mut Spec) -> Result<(), PodError> {
        Ok(volumes::share(
            &self.shared,
            Path::new(GUEST_SHARED_DIR),
            id,
            spec,
        )?)
    }

    async fn mount_rootfs(
        &self,
        id: &str,
        root: &Path,
        mounts: &[Mount],
    ) -> Result<String, PodError> {
        rootfs::mount_container(&self.shared, id, root, mounts).await?;
        Ok(format!("{GUEST_SHARED_DIR}/{id}/rootfs"))
    }

    fn unmount_container(&self, id: &str) {
        rootfs::unmount_container(&self.shared, id);
    }
}
