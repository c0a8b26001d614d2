//! The VMM behind a sandbox, behind one small trait with a QEMU and (later) a built-in backend.
//!
//! A backend boots a [`VmSpec`] and exposes the guest's vsock as a hybrid vsock Unix socket; the
//! sandbox layer does everything else (virtio-fs daemon, agent connection, containers). Choice:
//! `auto` picks `builtin` on hosts with hardware virtualisation and `qemu` (TCG) elsewhere: on a
//! PVM or absent KVM the built-in VMM cannot boot Linux in usable time.

pub mod builtin;
pub mod jail;
pub mod qemu;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use pangolin_runtime_config::{Accel, HypervisorKind};
use pangolin_vmm_config::SnapshotFiles;

use crate::daemon::{log_tail, Daemon, DaemonError, ExitWatch};
use crate::host::HostInfo;

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Guest kernel (ELF vmlinux).
    pub kernel: PathBuf,
    /// Initramfs holding the agent as /init.
    pub initramfs: PathBuf,
    /// Full kernel command line.
    pub cmdline: String,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Private directory for sockets and logs, removed by the sandbox.
    pub workdir: PathBuf,
    /// Serial console output file.
    pub console_log: PathBuf,
    /// vhost-user socket of the virtio-fs daemon, with its tag.
    pub fs: Option<(PathBuf, String)>,
    /// Guest vsock context id.
    pub guest_cid: u32,
    /// Hybrid vsock Unix socket to create (`<path>_<port>` for guest-initiated connections).
    pub vsock_uds: PathBuf,
    /// The pod's NIC: a tap in a network namespace, where the VMM then runs.
    pub net: Option<NicSpec>,
    /// The pod's host cgroup: the backend moves each process it starts into it.
    pub cgroup: Option<std::sync::Arc<crate::host_cgroup::PodCgroup>>,
    /// A template VM: where its snapshot goes (built-in VMM only).
    pub snapshot: Option<SnapshotFiles>,
    /// Restore from this snapshot instead of booting the kernel (built-in VMM only).
    pub restore: Option<SnapshotFiles>,
}

impl VmSpec {
    /// Moves helper `what` (pid `pid`) into the pod's cgroup, when there is one.
    ///
    /// # Errors
    /// [`HypervisorError::Cgroup`] when the kernel refuses.
    pub fn place(&self, what: &'static str, pid: Option<u32>) -> Result<(), HypervisorError> {
        match (&self.cgroup, pid) {
            (Some(cgroup), Some(pid)) => Ok(cgroup.add(what, pid)?),
            _ => Ok(()),
        }
    }
}

/// A virtio-net NIC backed by a tap.
#[derive(Debug, Clone)]
pub struct NicSpec {
    /// The network namespace holding the tap (the VMM process runs in it).
    pub netns: PathBuf,
    /// The tap's name there.
    pub tap: String,
    /// The guest NIC's MAC.
    pub mac: String,
}

/// A backend failed.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// A helper could not be moved into the pod's cgroup.
    #[error(transparent)]
    Cgroup(#[from] crate::host_cgroup::CgroupError),
    /// A helper process failed.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// A binary the backend needs is missing.
    #[error("{what} not found at {path} (set {key} in configuration.toml)")]
    Missing {
        /// What is missing.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// The config key that sets it.
        key: &'static str,
    },
    /// The requested backend cannot run on this host.
    #[error("hypervisor {kind} cannot run here: {reason}")]
    Unsupported {
        /// The backend.
        kind: HypervisorKind,
        /// Why.
        reason: String,
    },
    /// A file the backend writes could not be written.
    #[error("{0}")]
    Io(&'static str, #[source] std::io::Error),
    /// The VMM refused or failed a snapshot.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// The VMM exited.
    #[error("the VMM exited ({status}); console log {console}: {tail}")]
    Exited {
        /// Exit status.
        status: std::process::ExitStatus,
        /// Console log path.
        console: PathBuf,
        /// The log's last lines.
        tail: String,
    },
}

/// One running VM.
#[async_trait]
pub trait Vm: Send + Sync {
    /// VMM process id, while it runs.
    fn pid(&self) -> Option<u32>;
    /// Ok while the VMM runs; the exit as an error once it stopped.
    fn check_alive(&mut self) -> Result<(), HypervisorError>;
    /// Sees the VMM's exit status once the VM stopped running (for QEMU: QEMU or its vsock
    /// daemon, whichever ends first: without either the guest is unreachable).
    fn exit_watch(&self) -> ExitWatch;
    /// Waits for the VMM to exit on its own (guest power-off) up to `grace`, then kills it;
    /// stops the backend's helper daemons too.
    async fn shutdown(&mut self, grace: Duration);
    /// A template VM: writes the VM to its spec's snapshot files and waits for the VMM to end.
    ///
    /// # Errors
    /// The backend has no snapshots, or the VMM refused or failed to write one.
    async fn snapshot(&mut self) -> Result<(), HypervisorError> {
        Err(HypervisorError::Unsupported {
            kind: HypervisorKind::Qemu,
            reason: "VM templates need the built-in VMM".into(),
        })
    }
}

/// Boots VMs.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// Which backend this is.
    fn kind(&self) -> HypervisorKind;
    /// Starts the VMM; returns once it runs (not once the guest booted).
    async fn boot(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, HypervisorError>;
}

/// Ok while `vmm` runs; once it exited, the exit with the console's and the VMM log's last lines.
pub fn check_vmm(vmm: &Daemon, console: &Path, label: &str) -> Result<(), HypervisorError> {
    let Some(status) = vmm.exited() else {
        return Ok(());
    };
    let mut tail = log_tail(console, 5);
    let vmm_log = log_tail(&vmm.log, 3);
    if vmm_log != "(empty)" {
        tail = format!("{tail}; {label}: {vmm_log}");
    }
    Err(HypervisorError::Exited {
        status,
        console: console.to_path_buf(),
        tail,
    })
}

/// Picks the backend for a configured kind on this host.
pub fn resolve(kind: HypervisorKind, host: &HostInfo) -> Result<HypervisorKind, HypervisorError> {
    match kind {
        HypervisorKind::Auto if host.kvm.hardware_virt() => Ok(HypervisorKind::Builtin),
        HypervisorKind::Auto => Ok(HypervisorKind::Qemu),
        HypervisorKind::Builtin if !host.kvm.usable() => Err(HypervisorError::Unsupported {
            kind,
            reason: "the built-in VMM needs /dev/kvm".into(),
        }),
        other => Ok(other),
    }
}

/// The accelerator QEMU should use on this host for a configured choice.
pub fn qemu_accel(accel: Accel, host: &HostInfo) -> Result<Accel, HypervisorError> {
    match accel {
        Accel::Auto if host.kvm.hardware_virt() => Ok(Accel::Kvm),
        Accel::Auto => Ok(Accel::Tcg),
        Accel::Kvm if !host.kvm.usable() => Err(HypervisorError::Unsupported {
            kind: HypervisorKind::Qemu,
            reason: "accel = \"kvm\" but /dev/kvm cannot be opened".into(),
        }),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::Kvm;

    fn host(kvm: Kvm) -> HostInfo {
        HostInfo {
            kvm,
            ..HostInfo::default()
        }
    }

    #[test]
    fn auto_picks_tcg_qemu_without_hardware_virt() {
        let pvm = host(Kvm::Pvm);
        assert_eq!(qemu_accel(Accel::Auto, &pvm).expect("accel"), Accel::Tcg);
        assert_eq!(
            resolve(HypervisorKind::Auto, &pvm).expect("kind"),
            HypervisorKind::Qemu
        );
        assert_eq!(
            qemu_accel(Accel::Auto, &host(Kvm::Absent)).expect("accel"),
            Accel::Tcg
        );
    }

    #[test]
    fn auto_picks_builtin_with_hardware_virt() {
        let hw = host(Kvm::HardwareVirt);
        assert_eq!(qemu_accel(Accel::Auto, &hw).expect("accel"), Accel::Kvm);
        assert_eq!(
            resolve(HypervisorKind::Auto, &hw).expect("kind"),
            HypervisorKind::Builtin
        );
        assert_eq!(
            resolve(HypervisorKind::Builtin, &host(Kvm::Pvm)).expect("forced"),
            HypervisorKind::Builtin,
            "PVM opens: forcing builtin is allowed (slow, but asked for)"
        );
        let err = resolve(HypervisorKind::Builtin, &host(Kvm::Absent)).expect_err("no kvm");
        assert!(err.to_string().contains("/dev/kvm"), "{err}");
    }

    #[test]
    fn forcing_kvm_without_kvm_is_a_clear_error() {
        let err = qemu_accel(Accel::Kvm, &host(Kvm::Absent)).expect_err("no kvm");
        assert!(err.to_string().contains("/dev/kvm"), "{err}");
        // PVM opens: forcing it is allowed (slow, but the user asked).
        assert_eq!(
            qemu_accel(Accel::Kvm, &host(Kvm::Pvm)).expect("pvm"),
            Accel::Kvm
        );
    }
}
