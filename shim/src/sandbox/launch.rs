//! One launch of a sandbox's VM: the jail identity, the backend, the directory and the parts,
//! then the boot; a ready sandbox comes out, or everything started is torn down.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pangolin_protocols::agent::GuestDetails;
use pangolin_runtime_config::{Accel, Config, HypervisorKind};
use pangolin_vmm_config::SnapshotFiles;

use crate::agent::AgentClient;
use crate::daemon::Daemon;
use crate::host::HostInfo;
use crate::host_cgroup::PodCgroup;
use crate::hypervisor::{self, builtin::Builtin, qemu::Qemu, Hypervisor, HypervisorError};
use crate::network::PodInterface;
use crate::template::{StartedFrom, Template};

use super::parts::{workdir_of, LONGEST_SOCKET_NAME, SOCKET_PATH_MAX};
use super::{BootOptions, BootTimings, Parts, Sandbox, SandboxError};

/// How a sandbox's VM comes up.
#[derive(Debug, Clone, Copy)]
pub(super) enum Mode<'t> {
    /// Boots its kernel.
    Cold,
    /// Restored from a template.
    Restore(&'t Template),
    /// A template: boots, is written to `files` once its agent serves, and ends; with a NIC
    /// on the tap in `netns` when there is one.
    Build {
        /// Where its snapshot goes.
        files: &'t SnapshotFiles,
        /// Its private network namespace holding the tap.
        netns: Option<&'t Path>,
    },
}

/// How one launch goes: the mode, when its boot deadline starts, and the pod's interface
/// (discovered once per pod, before any launch: a failed restore's cold boot reuses it).
#[derive(Debug, Clone, Copy)]
pub(super) struct Launch<'a> {
    pub(super) mode: Mode<'a>,
    pub(super) start: Instant,
    pub(super) iface: Option<&'a PodInterface>,
}

/// A booted VM's agent, its first answer, and the boot's milestones.
pub(super) type Ready = (AgentClient, GuestDetails, BootTimings);

/// Fails on a missing guest kernel or initramfs, naming its config key.
pub(super) fn check_artifacts(config: &Config) -> Result<(), SandboxError> {
    for (what, path, key) in [
        (
            "guest kernel",
            &config.hypervisor.kernel,
            "hypervisor.kernel",
        ),
        (
            "guest initramfs",
            &config.hypervisor.initramfs,
            "hypervisor.initramfs",
        ),
    ] {
        if !path.is_file() {
            return Err(SandboxError::Artifact {
                what,
                path: path.clone(),
                key,
            });
        }
    }
    Ok(())
}

/// Free space a sandbox needs in `runtime.state_dir` to start: its sockets, the VMM's
/// configuration, and room for its helpers' logs (a helper that cannot write its log fails
/// without saying why).
const MIN_STATE_DIR_FREE: u64 = 1 << 20;

/// Creates `runtime.state_dir` where missing and checks a sandbox can live there: writable,
/// with [`MIN_STATE_DIR_FREE`] bytes and some inodes free. Nothing of the sandbox exists yet
/// (the shim calls it before it makes the pod's share there too).
pub fn prepare_state_dir(dir: &Path) -> Result<(), SandboxError> {
    let bad = |why: String| SandboxError::StateDir(dir.to_path_buf(), why);
    std::fs::create_dir_all(dir).map_err(|e| bad(e.to_string()))?;
    let st = nix::sys::statvfs::statvfs(dir).map_err(|e| bad(e.to_string()))?;
    if st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY) {
        return Err(bad("read-only file system".into()));
    }
    let free = st.blocks_available().saturating_mul(st.fragment_size());
    if free < MIN_STATE_DIR_FREE {
        return Err(bad(format!(
            "{free} bytes free; a sandbox needs at least {MIN_STATE_DIR_FREE}"
        )));
    }
    if st.files() > 0 && st.files_available() < 64 {
        return Err(bad(format!("{} inodes free", st.files_available())));
    }
    Ok(())
}

impl Sandbox {
    /// Prepares a sandbox directory and its parts and brings the VM up as `mode` says: the
    /// ready sandbox, or None for a template build (its parts already torn down).
    pub(super) async fn launch(
        id: &str,
        config: &Config,
        options: &BootOptions<'_>,
        kind: HypervisorKind,
        host: &HostInfo,
        how: Launch<'_>,
    ) -> Result<Option<Sandbox>, SandboxError> {
        let Launch { mode, start, .. } = how;
        // Before anything is written there (per-VM jail ids).
        prepare_state_dir(&config.runtime.state_dir)?;
        // One identity for the pod's confined host processes (the built-in VMM, or QEMU and
        // vhost-device-vsock): a per-VM id from the range, or the shared jail uid/gid.
        let j = &config.jail;
        let mut jail_id = None;
        let jail = if j.enabled {
            let (uid, gid) = if j.per_vm_ids {
                let dir = config.runtime.state_dir.join(".jail-ids");
                let held = crate::jail_ids::take(&dir, j.first_per_vm_id, j.per_vm_id_count)?;
                let id = held.id;
                jail_id = Some(held);
                (id, id)
            } else {
                (j.uid, j.gid)
            };
            Some(hypervisor::jail::JailIds {
                uid,
                gid,
                max_open_files: j.max_open_files,
            })
        } else {
            None
        };
        let backend: Box<dyn Hypervisor> = match kind {
            HypervisorKind::Qemu => {
                let accel = hypervisor::qemu_accel(config.hypervisor.accel, host)?;
                Box::new(Qemu {
                    qemu_path: config.hypervisor.qemu_path.clone(),
                    vhost_vsock_path: config.vsock.vhost_device_vsock_path.clone(),
                    accel,
                    jail,
                    // Measured once per host boot; only a TCG guest is told it.
                    tsc_khz: (accel == Accel::Tcg)
                        .then(|| crate::host_tsc::tsc_khz(Path::new(crate::host_tsc::CACHE)))
                        .flatten(),
                })
            }
            HypervisorKind::Builtin => Box::new(Builtin {
                vmm_path: config.hypervisor.vmm_path.clone(),
                seccomp: config.hypervisor.seccomp,
                jail,
            }),
            // `resolve` never returns Auto: refuse rather than guess.
            other => {
                return Err(HypervisorError::Unsupported {
                    kind: other,
                    reason: "no backend of this kind in this build".into(),
                }
                .into())
            }
        };

        let workdir = workdir_of(&config.runtime.state_dir, id);
        if workdir.as_os_str().len() + LONGEST_SOCKET_NAME > SOCKET_PATH_MAX {
            return Err(SandboxError::StateDirTooLong(
                config.runtime.state_dir.clone(),
            ));
        }
        match std::fs::create_dir(&workdir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(SandboxError::Exists(id.into(), workdir));
            }
            Err(e) => return Err(SandboxError::Workdir(workdir, e)),
        }
        let mut parts = Parts {
            workdir: workdir.clone(),
            virtiofsd: None,
            vm: None,
            network: None,
            forward: None,
            late: None,
            holder: None,
            rpc_publisher: None,
            jail_id,
            cgroup: None,
            done: false,
        };
        if let Some(path) = options.cgroup {
            match PodCgroup::new(path).and_then(|c| c.refuse_if_in_use().map(|()| c)) {
                Ok(c) => {
                    if let Err(e) = super::parts::mark_cgroup(&workdir, path) {
                        parts.teardown(Duration::ZERO).await;
                        return Err(SandboxError::Workdir(workdir, e));
                    }
                    parts.cgroup = Some(Arc::new(c));
                }
                Err(e) => {
                    parts.teardown(Duration::ZERO).await;
                    return Err(e.into());
                }
            }
        }
        let cancel = options.cancel.clone().unwrap_or_default();
        let booted = tokio::select! {
            booted = Self::boot(id, config, options, backend.as_ref(), &mut parts, how) => booted,
            () = cancel.cancelled() => Err(SandboxError::Cancelled),
        };
        match booted {
            Ok(Some((agent, details, timings))) => {
                let started_from = match mode {
                    Mode::Restore(_) => StartedFrom::Template,
                    Mode::Cold | Mode::Build { .. } => StartedFrom::Boot,
                };
                tracing::info!(
                    sandbox = id,
                    hypervisor = %kind,
                    kernel = %details.kernel_release,
                    started_from = %started_from,
                    agent_ready_ms = (timings.agent_ready - start).as_millis(),
                    "sandbox ready"
                );
                let info = super::info::SandboxInfo {
                    id: id.into(),
                    hypervisor: kind.to_string(),
                    vcpus: config.hypervisor.vcpus,
                    memory_mib: config.hypervisor.memory_mib,
                    ready_unix_ms: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                        .unwrap_or(0),
                    started_from: started_from.to_string(),
                    vmm_pid: parts.vm.as_ref().and_then(|vm| vm.pid()),
                    virtiofsd_pid: parts.virtiofsd.as_ref().and_then(Daemon::pid),
                    owner_pid: std::process::id(),
                    boot_ms: u64::try_from((timings.agent_ready - start).as_millis())
                        .unwrap_or(u64::MAX),
                    debug_console: config.agent.debug_console && options.share.is_some(),
                };
                if let Err(e) = super::info::write_info(&workdir, &info) {
                    tracing::warn!(sandbox = id, error = %e, "cannot write the sandbox's facts");
                }
                parts.rpc_publisher = Some(agent.rpc_stats().publish_every(workdir.clone()));
                let ended = parts.ended();
                Ok(Some(Sandbox {
                    id: id.into(),
                    workdir,
                    hypervisor: kind,
                    details,
                    timings,
                    started_from,
                    agent,
                    parts,
                    ended,
                }))
            }
            Ok(None) => {
                parts.teardown(Duration::ZERO).await;
                Ok(None)
            }
            Err(err) => {
                let t = Instant::now();
                parts.teardown(Duration::ZERO).await;
                tracing::debug!(sandbox = id, %err, teardown_ms = t.elapsed().as_millis(), "boot failed; torn down");
                Err(err)
            }
        }
    }
}
