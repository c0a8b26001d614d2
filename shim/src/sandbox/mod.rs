//! A sandbox: one microVM, its helper daemons, its private directory, and its agent connection.
//!
//! Ownership is the leak guarantee: everything a sandbox starts (VMM, virtiofsd, vsock daemon)
//! is a [`crate::daemon::Daemon`] owned here and dies with it, and everything it creates on disk
//! lives under one directory, `<state_dir>/<id>`, removed on shutdown and on drop. A boot that
//! fails half-way tears down what it had started before returning the error.
//!
//! Files: `launch.rs` takes the jail identity, the backend and the directory and hands the parts
//! to `boot.rs`, which starts the network, virtiofsd and the VM in order, one arm per mode
//! (cold boot, restore, template build); `parts.rs` owns what was started and tears it down;
//! `template_build.rs` boots a template VM; `error.rs` holds [`SandboxError`].

mod boot;
mod error;
pub mod info;
mod launch;
mod parts;
mod template_build;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pangolin_protocols::agent::GuestDetails;
use pangolin_runtime_config::{Config, HypervisorKind};
use tokio_util::sync::CancellationToken;

use crate::agent::{AgentClient, AgentError};
use crate::host::HostInfo;
use crate::hypervisor;
use crate::template::{self, StartedFrom};

pub use boot::kernel_cmdline;
pub use error::SandboxError;
pub use launch::prepare_state_dir;
use launch::{check_artifacts, Launch, Mode};
pub use parts::{owned_cgroup, remove_workdir, workdir_of};
use parts::{LateNetwork, Parts};

/// virtio-fs tag of the sandbox share.
pub const SHARE_TAG: &str = "pangolin";

/// How long the guest may take to power off after DestroySandbox.
const POWER_OFF_GRACE: Duration = Duration::from_secs(3);

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
    /// The pod has OCI hooks on the host, which find its network namespace by a pid: a
    /// process holding the namespace is started ([`Sandbox::netns_pid`]). A pod without a
    /// namespace (`netns` None: a fresh one asked for, as Docker and nerdctl do) then gets one
    /// of its own, `<workdir>/netns`, and its VM a NIC on an unwired tap there, for the
    /// interface a hook adds after the boot ([`Sandbox::late_network`] wires it).
    pub netns_holder: bool,
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

/// Wires a sandbox's late network interface ([`Sandbox::late_network`]); cheap to clone.
#[derive(Clone)]
pub struct LateNetworkHandle {
    late: std::sync::Arc<LateNetwork>,
    agent: AgentClient,
}

impl LateNetworkHandle {
    /// Looks for the pod's interface in the sandbox's namespace; when one is there and not yet
    /// wired, mirrors it with the VM's tap and has the agent give the guest NIC its MAC,
    /// addresses and routes. True when it wired one now. Calling it again is cheap (one lock
    /// once wired, three netlink dumps while nothing is there).
    ///
    /// # Errors
    /// Reading the namespace, wiring it, or the agent's SetupNetwork failed (what was wired
    /// stays for the teardown).
    pub async fn attach(&self) -> Result<bool, SandboxError> {
        let mut wired = self.late.wired.lock().await;
        if wired.is_some() {
            return Ok(false);
        }
        let netns = &self.late.netns.path;
        let Some(iface) = crate::network::discover(netns).await? else {
            return Ok(false);
        };
        let net = wired.insert(crate::network::attach_existing(netns, iface).await?);
        // The NIC was booted with the placeholder MAC a template's has: the agent finds it
        // by that and gives it the interface's.
        self.agent
            .setup_network(net.iface.agent_request(Some(template::TEMPLATE_MAC)))
            .await?;
        Ok(true)
    }
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
        let late_nic = options.netns.is_none() && options.netns_holder;
        let mut start = start;
        let why_cold = match template::unfit(config, kind, options.share.is_some()) {
            Some(why) => why,
            None => {
                let found = tokio::select! {
                    found = template::get_or_build(config, iface.is_some() || late_nic, false) => found,
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

    /// The agent of this sandbox.
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// VMM process id.
    pub fn vmm_pid(&self) -> Option<u32> {
        self.parts.vm.as_ref().and_then(|vm| vm.pid())
    }

    /// The pid of the process holding the pod's network namespace, when the sandbox was asked
    /// for one ([`BootOptions::netns_holder`]).
    pub fn netns_pid(&self) -> Option<u32> {
        self.parts
            .holder
            .as_ref()
            .and_then(crate::daemon::Daemon::pid)
    }

    /// For a sandbox that made its own network namespace ([`BootOptions::netns_holder`]): a
    /// handle that wires the interface something added there after the boot (Docker's
    /// prestart hook) to the VM's NIC.
    pub fn late_network(&self) -> Option<LateNetworkHandle> {
        self.parts.late.as_ref().map(|late| LateNetworkHandle {
            late: std::sync::Arc::clone(late),
            agent: self.agent.clone(),
        })
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
