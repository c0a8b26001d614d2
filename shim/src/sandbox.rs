//! A sandbox: one microVM, its helper daemons, its private directory, and its agent connection.
//!
//! Ownership is the leak guarantee: everything a sandbox starts (VMM, virtiofsd, vsock daemon)
//! is a [`crate::daemon::Daemon`] owned here and dies with it, and everything it creates on disk
//! lives under one directory, `<state_dir>/<id>`, removed on shutdown and on drop. A boot that
//! fails half-way tears down what it had started before returning the error.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pangolin_protocols::agent::GuestDetails;
use pangolin_protocols::{AGENT_READY_PORT, AGENT_VSOCK_PORT, LOG_PARAM};
use pangolin_runtime_config::{Config, HypervisorKind, VirtiofsCache};
use pangolin_vmm_config::SnapshotFiles;
use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use crate::agent::{AgentClient, AgentError};
use crate::daemon::{resolve_program, Daemon, DaemonError};
use crate::host::HostInfo;
use crate::host_cgroup::PodCgroup;
use crate::hypervisor::{
    self, builtin::Builtin, qemu::Qemu, Hypervisor, HypervisorError, NicSpec, Vm, VmSpec,
};
use crate::network::PodInterface;
use crate::template::{self, StartedFrom, Template};

/// virtio-fs tag of the sandbox share.
pub const SHARE_TAG: &str = "pangolin";

/// How long the guest may take to power off after DestroySandbox.
const POWER_OFF_GRACE: Duration = Duration::from_secs(3);

/// Starting or running a sandbox failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A guest artifact is missing.
    #[error("{what} not found at {path} (build it with `cargo xtask guest`, or set {key})")]
    Artifact {
        /// Kernel or initramfs.
        what: &'static str,
        /// The path tried.
        path: PathBuf,
        /// Config key.
        key: &'static str,
    },
    /// The sandbox's directory could not be prepared.
    #[error("sandbox directory {0}")]
    Workdir(PathBuf, #[source] std::io::Error),
    /// Unix socket paths under the sandbox directory would exceed the kernel's limit.
    #[error("runtime.state_dir {0} is too long: sockets under it would exceed {max} bytes", max = SOCKET_PATH_MAX)]
    StateDirTooLong(PathBuf),
    /// The id is taken by a live or leaked sandbox.
    #[error("sandbox {0} already exists ({1} is present)")]
    Exists(String, PathBuf),
    /// A daemon failed.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The hypervisor failed.
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    /// The pod's host cgroup could not be made or used.
    #[error(transparent)]
    Cgroup(#[from] crate::host_cgroup::CgroupError),
    /// The agent failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The pod network could not be wired.
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    /// No per-VM jail id could be taken.
    #[error(transparent)]
    JailId(#[from] crate::jail_ids::IdError),
    /// The boot was cancelled (the pod is being stopped); what it had started is gone.
    #[error("the boot was cancelled")]
    Cancelled,
}

/// What a sandbox boots with besides the configuration.
#[derive(Debug, Default, Clone)]
pub struct BootOptions<'a> {
    /// Directory shared with the guest over virtio-fs.
    pub share: Option<&'a Path>,
    /// Where the guest console goes (default: the sandbox directory's `console.log`).
    pub console_log: Option<&'a Path>,
    /// The pod's network namespace (CNI's); its interface is mirrored into the guest.
    pub netns: Option<&'a Path>,
    /// The pod's host cgroup (from `linux.cgroupsPath`): every process the sandbox starts runs
    /// in it, and it is removed with the sandbox.
    pub cgroup: Option<&'a Path>,
    /// Cancels the boot: what was started is torn down and the boot fails with
    /// [`SandboxError::Cancelled`] at once, not at the boot deadline.
    pub cancel: Option<CancellationToken>,
}

/// Milestones of a boot, for benchmarks and logs.
#[derive(Debug, Clone, Copy)]
pub struct BootTimings {
    /// Sandbox start requested.
    pub start: Instant,
    /// VMM process running.
    pub vmm_started: Instant,
    /// Agent answered.
    pub agent_ready: Instant,
}

/// How a sandbox's VM comes up.
#[derive(Debug, Clone, Copy)]
enum Mode<'t> {
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
struct Launch<'a> {
    mode: Mode<'a>,
    start: Instant,
    iface: Option<&'a PodInterface>,
}

/// A booted VM's agent, its first answer, and the boot's milestones.
type Ready = (AgentClient, GuestDetails, BootTimings);

/// Fails on a missing guest kernel or initramfs, naming its config key.
fn check_artifacts(config: &Config) -> Result<(), SandboxError> {
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

/// A running microVM with its agent.
pub struct Sandbox {
    /// Sandbox id.
    pub id: String,
    /// Private directory (sockets, logs).
    pub workdir: PathBuf,
    /// The backend that runs it.
    pub hypervisor: HypervisorKind,
    /// Guest facts reported at boot.
    pub details: GuestDetails,
    /// Boot milestones.
    pub timings: BootTimings,
    /// Booted or restored from a template.
    pub started_from: StartedFrom,
    agent: AgentClient,
    parts: Parts,
    /// Fires when the VMM or a helper its devices need (virtiofsd) exits: either ends the VM.
    ended: crate::daemon::ExitWatch,
}

/// What has been started so far; torn down in reverse.
struct Parts {
    workdir: PathBuf,
    virtiofsd: Option<Daemon>,
    vm: Option<Box<dyn Vm>>,
    network: Option<crate::network::PodNetwork>,
    /// The VMM's own jail id, freed once the VMM is gone.
    jail_id: Option<crate::jail_ids::JailId>,
    /// The pod's host cgroup, removed (killing anything left in it) once the rest is down.
    cgroup: Option<Arc<PodCgroup>>,
    done: bool,
}

impl Parts {
    /// A watch of the VM's end: the VMM's exit (QEMU's includes its vsock daemon's) or
    /// virtiofsd's, whichever comes first. Without virtiofsd the guest's root filesystem stops
    /// answering, so the pod is failed instead of left hanging.
    fn ended(&self) -> crate::daemon::ExitWatch {
        let mut watches = Vec::new();
        if let Some(vm) = &self.vm {
            watches.push(("the VMM", vm.exit_watch()));
        }
        if let Some(fsd) = &self.virtiofsd {
            watches.push(("virtiofsd", fsd.exit_watch()));
        }
        crate::daemon::first_exit(watches)
    }

    async fn teardown(&mut self, grace: Duration) {
        if let Some(mut vm) = self.vm.take() {
            vm.shutdown(grace).await;
        }
        if let Some(net) = self.network.take() {
            net.detach().await;
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
const SOCKET_PATH_MAX: usize = 107;
/// The longest socket name a sandbox creates in its directory (the vsock UDS plus `_<port>`).
const LONGEST_SOCKET_NAME: usize = "/vhost-vsock.sock".len() + "_4294967295".len();
/// Ids up to this length name their sandbox directory as they are.
const MAX_DIR_ID: usize = 32;

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

fn remove_workdir(dir: &Path) {
    if let Err(err) = std::fs::remove_dir_all(dir) {
        if err.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), %err, "cannot remove sandbox directory");
        }
    }
}

/// The kernel command line for a sandbox: the same for every pod of a configuration (nothing
/// of the pod is in it, so a template's fits all its clones; the share is named in the first
/// agent call).
pub fn kernel_cmdline(config: &Config) -> String {
    // reboot=t: power-off is a triple fault, an exit for every VMM; panic=-1: a dead agent ends the VM.
    let mut cmdline = String::from("console=ttyS0 reboot=t panic=-1 quiet");
    cmdline.push_str(&format!(" {LOG_PARAM}={}", config.runtime.log_level));
    if !config.hypervisor.kernel_params.trim().is_empty() {
        cmdline.push(' ');
        cmdline.push_str(config.hypervisor.kernel_params.trim());
    }
    cmdline
}

/// virtiofsd's command line (the Rust virtiofsd's flags). Its sandbox and seccomp modes are its
/// defaults, named anyway: they are what this runtime promises of it (its own mount, PID and
/// network namespaces rooted at the share; every thread that serves the guest filtered, a
/// refused syscall kills it), so they must not move with a virtiofsd release.
fn virtiofsd_args(socket: &Path, source: &Path, cache: VirtiofsCache) -> Vec<String> {
    let cache = match cache {
        VirtiofsCache::Auto => "auto",
        VirtiofsCache::Always => "always",
        VirtiofsCache::None => "never",
    };
    vec![
        format!("--socket-path={}", socket.display()),
        format!("--shared-dir={}", source.display()),
        format!("--cache={cache}"),
        "--sandbox=namespace".into(),
        "--seccomp=kill".into(),
    ]
}

/// Waits for the agent's READY call, checking the VMM lives; true once it came. A missed call
/// ends at the deadline (false) and the caller's connect loop then reports what the console
/// shows.
async fn wait_ready(
    listener: &UnixListener,
    deadline: Instant,
    mut alive: impl FnMut() -> Result<(), SandboxError>,
) -> Result<bool, SandboxError> {
    loop {
        alive()?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((mut stream, _)) = accepted {
                    let mut buf = [0u8; 6];
                    let _ = tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut buf)).await;
                    tracing::trace!(said = ?String::from_utf8_lossy(&buf), "agent announced readiness");
                }
                return Ok(true);
            }
            () = tokio::time::sleep(left.min(Duration::from_millis(20))) => {}
        }
    }
}

impl Sandbox {
    /// Boots a sandbox named `id`, sharing `share` (if any) with the guest over virtio-fs.
    pub async fn start(
        id: &str,
        config: &Config,
        share: Option<&Path>,
    ) -> Result<Sandbox, SandboxError> {
        let options = BootOptions {
            share,
            ..BootOptions::default()
        };
        Self::start_with(id, config, options).await
    }

    /// As [`Sandbox::start`], with a console log path and a pod network namespace. The VM is
    /// restored from its size class's template when the pod fits one (built first if there is
    /// none), and boots its kernel otherwise, or when the restore fails (that template is then
    /// removed); either way the reason is logged with the pod.
    pub async fn start_with(
        id: &str,
        config: &Config,
        options: BootOptions<'_>,
    ) -> Result<Sandbox, SandboxError> {
        let start = Instant::now();
        let host = HostInfo::probe();
        let kind = hypervisor::resolve(config.hypervisor.kind, &host)?;
        check_artifacts(config)?;
        let cancel = options.cancel.clone().unwrap_or_default();
        // The template must have the devices the pod's VM will have: a NIC or none.
        let iface = match options.netns {
            Some(netns) => crate::network::discover(netns).await?,
            None => None,
        };
        let iface = iface.as_ref();
        let mut start = start;
        let why_cold = match template::unfit(config, kind, options.share.is_some()) {
            Some(why) => why,
            None => {
                let found = tokio::select! {
                    found = template::get_or_build(config, iface.is_some(), false) => found,
                    () = cancel.cancelled() => return Err(SandboxError::Cancelled),
                };
                // The boot deadline counts from here: a build before is not the pod's.
                start = Instant::now();
                match found {
                    Ok(t) => {
                        let how = Launch {
                            mode: Mode::Restore(&t),
                            start,
                            iface,
                        };
                        match Self::launch(id, config, &options, kind, &host, how).await {
                            Ok(sandbox) => return sandbox.ok_or(SandboxError::Cancelled),
                            Err(SandboxError::Cancelled) => return Err(SandboxError::Cancelled),
                            Err(err) => {
                                template::discard(config, &t).await;
                                start = Instant::now();
                                let why = format!(
                                    "restoring from template {} failed, so it is removed: {}",
                                    t.class,
                                    crate::error_chain(&err)
                                );
                                tracing::warn!(sandbox = id, reason = %why, "booting the VM's kernel");
                                why
                            }
                        }
                    }
                    Err(err) => {
                        let why = crate::error_chain(&err);
                        tracing::warn!(sandbox = id, reason = %why, "no template: booting the VM's kernel");
                        why
                    }
                }
            }
        };
        tracing::info!(sandbox = id, reason = %why_cold, "booting the VM's kernel (no template)");
        let how = Launch {
            mode: Mode::Cold,
            start,
            iface,
        };
        Self::launch(id, config, &options, kind, &host, how)
            .await?
            .ok_or(SandboxError::Cancelled)
    }

    /// Boots a template VM of `class` with an empty share (and, with `nic`, a NIC on a tap in a
    /// network namespace of its own), writes it to `files` once its agent serves, and tears it
    /// down.
    ///
    /// # Errors
    /// [`SandboxError`] when the backend is not the built-in VMM, or the VM fails to boot or to
    /// be written.
    pub async fn build_template(
        config: &Config,
        class: &str,
        nic: bool,
        files: &SnapshotFiles,
    ) -> Result<(), SandboxError> {
        let start = Instant::now();
        let host = HostInfo::probe();
        let kind = hypervisor::resolve(config.hypervisor.kind, &host)?;
        if kind != HypervisorKind::Builtin {
            return Err(HypervisorError::Unsupported {
                kind,
                reason: "VM templates need the built-in VMM".into(),
            }
            .into());
        }
        check_artifacts(config)?;
        // Under the class's lock: a directory of this name is a dead build's.
        // A leading dot: no containerd id can take the name.
        let id = format!(".template-{class}");
        remove_workdir(&workdir_of(&config.runtime.state_dir, &id));
        let class_dir = files
            .state
            .parent()
            .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
        let share = class_dir.join("empty-share");
        std::fs::create_dir_all(&share).map_err(|e| SandboxError::Workdir(share.clone(), e))?;
        let netns = if nic {
            Some(crate::network::private::PrivateNetns::new(class_dir.join("netns")).await?)
        } else {
            None
        };
        let options = BootOptions {
            share: Some(&share),
            ..BootOptions::default()
        };
        let how = Launch {
            mode: Mode::Build {
                files,
                netns: netns.as_ref().map(|n| n.path.as_path()),
            },
            start,
            iface: None,
        };
        let built = Self::launch(&id, config, &options, kind, &host, how).await;
        drop(netns);
        let _ = std::fs::remove_dir(&share);
        built.map(|_| ())
    }

    /// Prepares a sandbox directory and its parts and brings the VM up as `mode` says: the
    /// ready sandbox, or None for a template build (its parts already torn down).
    async fn launch(
        id: &str,
        config: &Config,
        options: &BootOptions<'_>,
        kind: HypervisorKind,
        host: &HostInfo,
        how: Launch<'_>,
    ) -> Result<Option<Sandbox>, SandboxError> {
        let Launch { mode, start, .. } = how;
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
            HypervisorKind::Qemu => Box::new(Qemu {
                qemu_path: config.hypervisor.qemu_path.clone(),
                vhost_vsock_path: config.vsock.vhost_device_vsock_path.clone(),
                accel: hypervisor::qemu_accel(config.hypervisor.accel, host)?,
                jail,
            }),
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
        std::fs::create_dir_all(&config.runtime.state_dir)
            .map_err(|e| SandboxError::Workdir(config.runtime.state_dir.clone(), e))?;
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
            jail_id,
            cgroup: None,
            done: false,
        };
        if let Some(path) = options.cgroup {
            match PodCgroup::new(path) {
                Ok(c) => parts.cgroup = Some(Arc::new(c)),
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

    #[allow(clippy::too_many_lines)] // one boot sequence, in order, with one arm per mode
    async fn boot(
        id: &str,
        config: &Config,
        options: &BootOptions<'_>,
        backend: &dyn Hypervisor,
        parts: &mut Parts,
        how: Launch<'_>,
    ) -> Result<Option<Ready>, SandboxError> {
        let Launch { mode, start, iface } = how;
        let workdir = parts.workdir.clone();
        let nic = match (mode, options.netns) {
            // A template's NIC: the tap of its own namespace, nothing wired to it.
            (
                Mode::Build {
                    netns: Some(netns), ..
                },
                _,
            ) => Some(NicSpec {
                netns: netns.to_path_buf(),
                tap: crate::network::TAP_NAME.to_string(),
                mac: template::TEMPLATE_MAC.to_string(),
            }),
            (_, Some(netns)) => match iface {
                Some(iface) => {
                    let net = crate::network::attach(netns, iface.clone()).await?;
                    let nic = NicSpec {
                        netns: net.netns.clone(),
                        tap: net.tap.clone(),
                        mac: net.iface.mac.clone(),
                    };
                    parts.network = Some(net);
                    Some(nic)
                }
                None => {
                    tracing::info!(netns = %netns.display(), "no addressed interface in the pod namespace: no NIC");
                    None
                }
            },
            (_, None) => None,
        };
        let fs = match options.share {
            Some(source) => {
                let bin = resolve_program(&config.virtiofs.virtiofsd_path).ok_or_else(|| {
                    HypervisorError::Missing {
                        what: "virtiofsd",
                        path: config.virtiofs.virtiofsd_path.clone(),
                        key: "virtiofs.virtiofsd_path",
                    }
                })?;
                let socket = workdir.join("virtiofsd.sock");
                let args = virtiofsd_args(&socket, source, config.virtiofs.cache);
                let mut fsd =
                    Daemon::spawn("virtiofsd", &bin, &args, &workdir.join("virtiofsd.log"))?;
                let placed = match (&parts.cgroup, fsd.pid()) {
                    // virtiofsd forks into its sandbox at once: its child may already exist.
                    (Some(cgroup), Some(pid)) => cgroup.add_tree("virtiofsd", pid),
                    _ => Ok(()),
                };
                if let Err(e) = placed {
                    parts.virtiofsd = Some(fsd);
                    return Err(e.into());
                }
                let ready = fsd.wait_for_socket(&socket, Duration::from_secs(10)).await;
                parts.virtiofsd = Some(fsd);
                ready?;
                Some((socket, SHARE_TAG.to_string()))
            }
            None => None,
        };
        let share_tag = fs.as_ref().map(|(_, tag)| tag.clone());
        let spec = VmSpec {
            kernel: config.hypervisor.kernel.clone(),
            initramfs: config.hypervisor.initramfs.clone(),
            cmdline: kernel_cmdline(config),
            vcpus: config.hypervisor.vcpus,
            memory_mib: config.hypervisor.memory_mib,
            workdir: workdir.clone(),
            console_log: options
                .console_log
                .map_or_else(|| workdir.join("console.log"), Path::to_path_buf),
            fs,
            // A clone keeps the template's: its guest read it at boot.
            guest_cid: match mode {
                Mode::Restore(t) => t.meta.guest_cid,
                Mode::Cold | Mode::Build { .. } => config.vsock.guest_cid,
            },
            vsock_uds: workdir.join("vm.vsock"),
            net: nic,
            cgroup: parts.cgroup.clone(),
            snapshot: match mode {
                Mode::Build { files, .. } => Some(files.clone()),
                Mode::Cold | Mode::Restore(_) => None,
            },
            restore: match mode {
                Mode::Restore(t) => Some(t.files.clone()),
                Mode::Cold | Mode::Build { .. } => None,
            },
        };
        // Listen for the agent's readiness call before the guest can make it.
        let ready_path = PathBuf::from(format!("{}_{AGENT_READY_PORT}", spec.vsock_uds.display()));
        let ready =
            UnixListener::bind(&ready_path).map_err(|e| SandboxError::Workdir(ready_path, e))?;
        tracing::debug!(sandbox = id, cmdline = %spec.cmdline, ?mode, "booting");
        let vm = parts.vm.insert(backend.boot(&spec).await?);
        let vmm_started = Instant::now();
        let deadline = start + Duration::from_millis(config.hypervisor.boot_timeout_ms);
        match mode {
            // A booting guest announces its agent.
            Mode::Cold => {
                wait_ready(&ready, deadline, || {
                    vm.check_alive().map_err(SandboxError::from)
                })
                .await?;
            }
            // A template is written once its agent serves, before anyone called it.
            Mode::Build { .. } => {
                let heard = wait_ready(&ready, deadline, || {
                    vm.check_alive().map_err(SandboxError::from)
                })
                .await?;
                if !heard {
                    return Err(HypervisorError::Snapshot(format!(
                        "the template's agent did not start within {:?} (hypervisor.boot_timeout_ms); console log {} ends with: {}",
                        Duration::from_millis(config.hypervisor.boot_timeout_ms),
                        spec.console_log.display(),
                        crate::daemon::log_tail(&spec.console_log, 5)
                    ))
                    .into());
                }
                vm.snapshot().await?;
                tracing::info!(
                    sandbox = id,
                    boot_ms = start.elapsed().as_millis(),
                    "template written"
                );
                return Ok(None);
            }
            // A restored agent has served since before the snapshot: it is called at once.
            Mode::Restore(_) => {}
        }
        let agent = AgentClient::connect(&spec.vsock_uds, AGENT_VSOCK_PORT, deadline, || {
            vm.check_alive().map_err(SandboxError::from)
        })
        .await
        .map_err(|err| match err {
            SandboxError::Agent(AgentError::NotReady(_)) => SandboxError::Agent(AgentError::Call {
                call: "connect",
                message: format!(
                    "the guest agent did not answer within {:?} (hypervisor.boot_timeout_ms); console log {} ends with: {}",
                    Duration::from_millis(config.hypervisor.boot_timeout_ms),
                    spec.console_log.display(),
                    crate::daemon::log_tail(&spec.console_log, 5)
                ),
                code: None,
            }),
            other => other,
        })?;
        let agent_ready = Instant::now();
        let details = agent.guest_details(share_tag.as_deref()).await?;
        if let Some(net) = &parts.network {
            // A clone's NIC still has the template's MAC: the agent gives it the pod's.
            let guest_mac = matches!(mode, Mode::Restore(_)).then_some(template::TEMPLATE_MAC);
            agent
                .setup_network(net.iface.agent_request(guest_mac))
                .await?;
        }
        Ok(Some((
            agent,
            details,
            BootTimings {
                start,
                vmm_started,
                agent_ready,
            },
        )))
    }

    /// The agent of this sandbox.
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// VMM process id.
    pub fn vmm_pid(&self) -> Option<u32> {
        self.parts.vm.as_ref().and_then(|vm| vm.pid())
    }

    /// Ok while the VMM and virtiofsd run.
    pub fn check_alive(&mut self) -> Result<(), SandboxError> {
        if let Some(vm) = self.parts.vm.as_mut() {
            vm.check_alive()?;
        }
        if let Some(fsd) = &self.parts.virtiofsd {
            fsd.check_running()?;
        }
        Ok(())
    }

    /// Sees the VM's end once it came (no polling): the exit status of the VMM or of
    /// virtiofsd, whichever exited first.
    pub fn vmm_exit(&self) -> crate::daemon::ExitWatch {
        self.ended.clone()
    }

    /// Resolves when the VM ends (it should not while the sandbox is in use), with the reason.
    pub async fn vmm_exited(&mut self) -> SandboxError {
        let mut exit = self.vmm_exit();
        let _ = exit.wait_for(Option::is_some).await;
        match self.check_alive() {
            Err(err) => err,
            Ok(()) => SandboxError::Agent(AgentError::NotReady(Duration::ZERO)),
        }
    }

    /// Stops the guest (containers killed by the agent), the VMM and the daemons; removes files.
    pub async fn shutdown(mut self) {
        if self.vmm_exit().borrow().is_some() {
            // Nothing to ask: the VM is gone or cannot go on (tear down the VMM if it still
            // runs, its helpers, network and files).
            self.parts.teardown(Duration::ZERO).await;
            return;
        }
        let powered_off = self.agent.destroy_sandbox(Duration::from_secs(2)).await;
        let grace = if powered_off.is_ok() {
            POWER_OFF_GRACE
        } else {
            Duration::ZERO
        };
        if let Err(err) = powered_off {
            tracing::debug!(%err, "DestroySandbox failed; killing the VMM");
        }
        self.parts.teardown(grace).await;
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

    #[test]
    fn cmdline_carries_log_level_and_extra_params_and_nothing_of_the_pod() {
        let mut config = Config::default();
        config.hypervisor.kernel_params = " foo=bar ".into();
        let c = kernel_cmdline(&config);
        assert!(c.starts_with("console=ttyS0 reboot=t panic=-1"), "{c}");
        assert!(!c.contains("pangolin.share"), "nothing of the pod: {c}");
        assert!(c.contains("pangolin.log=info"), "{c}");
        assert!(c.ends_with(" foo=bar"), "{c}");
    }

    #[test]
    fn virtiofsd_gets_socket_source_cache_and_its_sandbox() {
        let args = virtiofsd_args(
            Path::new("/s/fs.sock"),
            Path::new("/rootfs"),
            VirtiofsCache::Auto,
        );
        assert_eq!(
            args,
            [
                "--socket-path=/s/fs.sock",
                "--shared-dir=/rootfs",
                "--cache=auto",
                "--sandbox=namespace",
                "--seccomp=kill"
            ]
        );
        let never = virtiofsd_args(
            Path::new("/s/fs.sock"),
            Path::new("/rootfs"),
            VirtiofsCache::None,
        );
        assert!(never.contains(&"--cache=never".to_string()), "{never:?}");
    }

    #[tokio::test]
    async fn missing_kernel_is_named_with_its_config_key() {
        let mut config = Config::default();
        config.hypervisor.kernel = "/nonexistent/vmlinux".into();
        let err = Sandbox::start("t", &config, None)
            .await
            .err()
            .expect("must fail");
        let text = err.to_string();
        assert!(
            text.contains("/nonexistent/vmlinux") && text.contains("hypervisor.kernel"),
            "{text}"
        );
    }
}
