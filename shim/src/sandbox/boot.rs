//! The boot sequence of a sandbox's VM, one arm per mode: the pod's network, virtiofsd, the VM,
//! the agent's readiness, the first agent calls.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pangolin_protocols::{AGENT_READY_PORT, AGENT_VSOCK_PORT, LOG_PARAM};
use pangolin_runtime_config::{Config, VirtiofsCache};
use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;

use crate::agent::{AgentClient, AgentError};
use crate::daemon::{resolve_program, Daemon};
use crate::hypervisor::{Hypervisor, HypervisorError, NicSpec, VmSpec};
use crate::network::{holder, private::PrivateNetns};
use crate::template::{self};

use super::launch::{Launch, Mode, Ready};
use super::parts::LateNetwork;
use super::{BootOptions, BootTimings, Parts, Sandbox, SandboxError, SHARE_TAG};

/// The VM's hybrid vsock socket in the sandbox directory.
pub(crate) const VSOCK_UDS: &str = "vm.vsock";

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
    #[allow(clippy::too_many_lines)] // one boot sequence, in order, with one arm per mode
    pub(super) async fn boot(
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
                    let forward =
                        crate::network::forward::start(netns, &workdir.join(VSOCK_UDS)).await?;
                    parts.forward = Some(forward);
                    Some(nic)
                }
                None => {
                    tracing::info!(netns = %netns.display(), "no addressed interface in the pod namespace: no NIC");
                    None
                }
            },
            // Hooks will add the pod's interface after the boot: a namespace of the
            // sandbox's own and a NIC on its tap, with a template's placeholder MAC.
            (_, None) if options.netns_holder => {
                let netns = PrivateNetns::new(workdir.join(super::parts::LATE_NETNS)).await?;
                let nic = NicSpec {
                    netns: netns.path.clone(),
                    tap: crate::network::TAP_NAME.to_string(),
                    mac: template::TEMPLATE_MAC.to_string(),
                };
                parts.late = Some(Arc::new(LateNetwork {
                    netns,
                    wired: tokio::sync::Mutex::new(None),
                }));
                Some(nic)
            }
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
            vsock_uds: workdir.join(VSOCK_UDS),
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
        // The debug console's shell: the guest has none, the share carries it.
        let console = match (config.agent.debug_console, options.share) {
            (true, Some(share)) => Some(
                super::info::install_console_shell(&config.agent.debug_console_shell, share)
                    .map_err(|e| {
                        SandboxError::Workdir(config.agent.debug_console_shell.clone(), e)
                    })?,
            ),
            (true, None) => {
                tracing::warn!(
                    sandbox = id,
                    "no share: the debug console cannot be offered"
                );
                None
            }
            (false, _) => None,
        };
        let details = agent
            .guest_details(share_tag.as_deref(), console.as_deref())
            .await?;
        if let Some(net) = &parts.network {
            // A clone's NIC still has the template's MAC: the agent gives it the pod's.
            let guest_mac = matches!(mode, Mode::Restore(_)).then_some(template::TEMPLATE_MAC);
            agent
                .setup_network(net.iface.agent_request(guest_mac))
                .await?;
        }
        if options.netns_holder {
            let netns = options
                .netns
                .map(Path::to_path_buf)
                .or_else(|| parts.late.as_ref().map(|l| l.netns.path.clone()));
            if let Some(netns) = netns {
                let holder = holder::spawn(&netns, &workdir.join("netns-holder.log"))?;
                let placed = match (&parts.cgroup, holder.pid()) {
                    (Some(cgroup), Some(pid)) => cgroup.add_tree("netns holder", pid),
                    _ => Ok(()),
                };
                parts.holder = Some(holder);
                placed?;
            }
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
