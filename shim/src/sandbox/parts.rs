//! What a sandbox has started, torn down in reverse, and where its files live.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::daemon::Daemon;
use crate::host_cgroup::PodCgroup;
use crate::hypervisor::Vm;

/// File name, in the sandbox directory, of the sandbox's own network namespace.
pub(super) const LATE_NETNS: &str = "netns";

/// A network namespace of the sandbox's own whose tap the VM's NIC serves from the boot, and
/// the interface wired to that tap once one appeared.
pub(super) struct LateNetwork {
    pub(super) netns: crate::network::private::PrivateNetns,
    pub(super) wired: tokio::sync::Mutex<Option<crate::network::PodNetwork>>,
}

/// What has been started so far; torn down in reverse.
pub(super) struct Parts {
    pub(super) workdir: PathBuf,
    pub(super) virtiofsd: Option<Daemon>,
    pub(super) vm: Option<Box<dyn Vm>>,
    pub(super) network: Option<crate::network::PodNetwork>,
    /// CRI port-forward into the VM (a pod with a CNI network only).
    pub(super) forward: Option<crate::network::forward::PortForward>,
    /// The sandbox's own network namespace, for an interface added after the boot.
    pub(super) late: Option<Arc<LateNetwork>>,
    /// The process holding the pod's network namespace, for its OCI hooks.
    pub(super) holder: Option<Daemon>,
    /// Writes the agent calls' latency histograms for `pangolin monitor`.
    pub(super) rpc_publisher: Option<tokio::task::JoinHandle<()>>,
    /// The VMM's own jail id, freed once the VMM is gone.
    pub(super) jail_id: Option<crate::jail_ids::JailId>,
    /// The pod's host cgroup, removed (killing anything left in it) once the rest is down.
    pub(super) cgroup: Option<Arc<PodCgroup>>,
    pub(super) done: bool,
}

impl Parts {
    /// A watch of the VM's end: the VMM's exit (QEMU's includes its vsock daemon's) or
    /// virtiofsd's, whichever comes first. Without virtiofsd the guest's root filesystem stops
    /// answering, so the pod is failed instead of left hanging.
    pub(super) fn ended(&self) -> crate::daemon::ExitWatch {
        let mut watches = Vec::new();
        if let Some(vm) = &self.vm {
            watches.push(("the VMM", vm.exit_watch()));
        }
        if let Some(fsd) = &self.virtiofsd {
            watches.push(("virtiofsd", fsd.exit_watch()));
        }
        crate::daemon::first_exit(watches)
    }

    pub(super) async fn teardown(&mut self, grace: Duration) {
        if let Some(publisher) = self.rpc_publisher.take() {
            publisher.abort();
        }
        // Nothing is forwarded to a VM going down; its socket leaves the pod namespace.
        drop(self.forward.take());
        if let Some(mut vm) = self.vm.take() {
            vm.shutdown(grace).await;
        }
        if let Some(net) = self.network.take() {
            net.detach().await;
        }
        if let Some(mut holder) = self.holder.take() {
            holder.kill().await;
        }
        if let Some(late) = self.late.take() {
            if let Some(net) = late.wired.lock().await.take() {
                net.detach().await;
            }
            // The namespace goes with its file (the VMM that held it is gone).
            drop(late);
        }
        if let Some(mut fsd) = self.virtiofsd.take() {
            fsd.stop(Duration::from_millis(500)).await;
        }
        if let Some(cgroup) = self.cgroup.take() {
            cgroup.remove_off_runtime().await;
        }
        remove_workdir(&self.workdir);
        drop(self.jail_id.take());
        self.done = true;
    }
}

impl Drop for Parts {
    fn drop(&mut self) {
        // Daemons are killed by their own Drop (kill-on-drop); the cgroup and the directory
        // are left.
        if let Some(publisher) = self.rpc_publisher.take() {
            publisher.abort();
        }
        if !self.done {
            if let Some(cgroup) = self.cgroup.take() {
                // In place, even on a runtime worker: this is a failed start's cleanup, rare,
                // and a removal handed elsewhere could be lost with the exiting process.
                cgroup.remove();
            }
            remove_workdir(&self.workdir);
        }
    }
}

/// The longest Unix socket path the kernel accepts (`sun_path` is 108 bytes with the NUL).
pub(super) const SOCKET_PATH_MAX: usize = 107;
/// The longest socket name a sandbox creates in its directory (the vsock UDS plus `_<port>`).
pub(super) const LONGEST_SOCKET_NAME: usize = "/vhost-vsock.sock".len() + "_4294967295".len();
/// Ids up to this length name their sandbox directory as they are.
const MAX_DIR_ID: usize = 32;

/// The file in the sandbox directory that names the pod cgroup the sandbox made its own (and
/// its teardown kills and removes): a dead shim's cleanup removes that cgroup and no other, so
/// a pod refused a cgroup in use never removes the one it was refused.
const CGROUP_MARK: &str = "cgroup";

/// Records in `workdir` that the sandbox owns cgroup `path`.
pub(super) fn mark_cgroup(workdir: &Path, path: &Path) -> std::io::Result<()> {
    std::fs::write(
        workdir.join(CGROUP_MARK),
        path.as_os_str().as_encoded_bytes(),
    )
}

/// The pod cgroup the sandbox in `workdir` owned, if it owned one.
pub fn owned_cgroup(workdir: &Path) -> Option<PathBuf> {
    let raw = std::fs::read(workdir.join(CGROUP_MARK)).ok()?;
    let text = String::from_utf8(raw).ok()?;
    crate::host_cgroup::pod_cgroup_path(Some(&text))
        .ok()
        .flatten()
}

/// The sandbox directory of `id` under `state_dir`. Long ids (CRI's are 64 hex digits) become a
/// 15-character prefix plus a 64-bit FNV-1a hash, so socket paths stay under the kernel's limit
/// and a dead shim's cleanup finds the same directory.
pub fn workdir_of(state_dir: &Path, id: &str) -> PathBuf {
    if id.len() <= MAX_DIR_ID {
        return state_dir.join(id);
    }
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let prefix: String = id.chars().take(15).collect();
    state_dir.join(format!("{prefix}-{hash:016x}"))
}

/// Removes a sandbox directory (what a sandbox or a dead shim left), unmounting the sandbox's
/// own network namespace there first.
pub fn remove_workdir(dir: &Path) {
    // A sandbox's own network namespace is a mount on a file there (a dead shim left it).
    crate::network::private::remove(&dir.join(LATE_NETNS));
    if let Err(err) = std::fs::remove_dir_all(dir) {
        if err.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), %err, "cannot remove sandbox directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_ids_get_short_stable_distinct_directories() {
        let state = Path::new("/run/pangolin");
        assert_eq!(workdir_of(state, "c1"), state.join("c1"));
        let a = "750644d8c45717e00f833ca4a2d6c6f2a034ce708627d9a87788c4693697e392";
        let b = "750644d8c45717e00f833ca4a2d6c6f2a034ce708627d9a87788c4693697e393";
        let (da, db) = (workdir_of(state, a), workdir_of(state, b));
        assert_eq!(da, workdir_of(state, a), "stable");
        assert_ne!(da, db, "distinct");
        let name = da.file_name().map(|n| n.len()).unwrap_or_default();
        assert_eq!(name, 15 + 1 + 16);
        assert!(da
            .to_string_lossy()
            .starts_with("/run/pangolin/750644d8c45717e-"));
    }
}
