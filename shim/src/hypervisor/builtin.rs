//! The built-in VMM backend: one `pangolin-vmm` process per sandbox, configured by a JSON file
//! in the sandbox's workdir, with vsock served by the VMM itself (no helper daemon) and a control
//! socket for pause/resume/stop.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use pangolin_runtime_config::HypervisorKind;
use pangolin_vmm_config::api::Request;
use pangolin_vmm_config::{FsConfig, NetConfig, VmConfig, VsockConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::{Hypervisor, HypervisorError, Vm, VmSpec};
use crate::daemon::{Daemon, SpawnOptions};

/// How long a control request may take.
const API_TIMEOUT: Duration = Duration::from_secs(3);
/// How long writing a snapshot may take (the guest's touched memory, tens of MB, and fsyncs).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);
/// The VMM's exit status once it wrote its snapshot (`vmm/src/main.rs`).
const EXIT_SNAPSHOTTED: i32 = 5;

/// Boots VMs with `pangolin-vmm`.
#[derive(Debug, Clone)]
pub struct Builtin {
    /// The VMM binary.
    pub vmm_path: PathBuf,
    /// The jail the VMM enters (None: not jailed, configuration.toml's `jail.enabled = false`).
    pub jail: Option<super::jail::JailIds>,
    /// Whether the VMM's threads install their seccomp filters (`hypervisor.seccomp`).
    pub seccomp: bool,
}

/// The VMM configuration for `spec`, with the control socket at `api`.
pub fn vm_config(spec: &VmSpec, api: PathBuf) -> VmConfig {
    VmConfig {
        kernel: spec.kernel.clone(),
        initramfs: Some(spec.initramfs.clone()),
        cmdline: spec.cmdline.clone(),
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        console_log: spec.console_log.clone(),
        api_socket: Some(api),
        vsock: Some(VsockConfig {
            guest_cid: u64::from(spec.guest_cid),
            uds_path: spec.vsock_uds.clone(),
        }),
        fs: spec
            .fs
            .iter()
            .map(|(socket, tag)| FsConfig {
                socket: socket.clone(),
                tag: tag.clone(),
            })
            .collect(),
        net: spec
            .net
            .iter()
            .map(|n| NetConfig {
                tap: n.tap.clone(),
                mac: n.mac.clone(),
            })
            .collect(),
        blk: Vec::new(),
        rng: true,
        fds: None,
        jail: None,
        seccomp: true,
        snapshot: spec.snapshot.clone(),
        restore: spec.restore.clone(),
    }
}

#[async_trait]
impl Hypervisor for Builtin {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Builtin
    }

    async fn boot(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, HypervisorError> {
        if !self.vmm_path.is_file() {
            return Err(HypervisorError::Missing {
                what: "pangolin-vmm",
                path: self.vmm_path.clone(),
                key: "hypervisor.vmm_path",
            });
        }
        let api = spec.workdir.join(API_SOCKET);
        let mut config = vm_config(spec, api.clone());
        config.seccomp = self.seccomp;
        if !self.seccomp {
            tracing::warn!(
                "hypervisor.seccomp = false: the VMM's threads run without syscall filters"
            );
        }
        let handoff = match self.jail {
            Some(ids) => Some(super::jail::prepare(spec, &mut config, ids).await?),
            None => {
                tracing::warn!("jail.enabled = false: the VMM runs as root with every capability");
                None
            }
        };
        let config_file = spec.workdir.join("vmm.json");
        let json = serde_json::to_vec_pretty(&config)
            .map_err(std::io::Error::other)
            .map_err(|e| HypervisorError::Io("writing the VMM config", e))?;
        std::fs::write(&config_file, json)
            .map_err(|e| HypervisorError::Io("writing the VMM config", e))?;
        let args = vec!["--config".to_string(), config_file.display().to_string()];
        let log = spec.workdir.join("vmm.log");
        let netns = spec.net.as_ref().map(|n| n.netns.as_path());
        let vmm = match handoff {
            None => {
                let vmm = Daemon::spawn_in("pangolin-vmm", &self.vmm_path, &args, &log, netns)?;
                spec.place("pangolin-vmm", vmm.pid())?;
                vmm
            }
            Some(fds) => {
                let (ours, theirs) = std::os::unix::net::UnixStream::pair()
                    .map_err(|e| HypervisorError::Io("the VMM's descriptor socket", e))?;
                let options = SpawnOptions {
                    netns,
                    stdin: Some(theirs.into()),
                    ..SpawnOptions::default()
                };
                let vmm = Daemon::spawn_with("pangolin-vmm", &self.vmm_path, &args, &log, options)?;
                // Placed before it gets its descriptors: it allocates nothing until then.
                spec.place("pangolin-vmm", vmm.pid())?;
                super::jail::send(&ours, &fds)
                    .map_err(|e| HypervisorError::Io("sending the VMM its descriptors", e))?;
                vmm
            }
        };
        Ok(Box::new(BuiltinVm {
            vmm,
            api,
            console: spec.console_log.clone(),
        }))
    }
}

struct BuiltinVm {
    vmm: Daemon,
    api: PathBuf,
    console: PathBuf,
}

impl BuiltinVm {
    /// Sends one control request; returns the answer line.
    async fn request(&self, request: Request) -> std::io::Result<String> {
        self.request_within(request, API_TIMEOUT).await
    }

    /// Sends one control request, waiting up to `limit` for the answer.
    async fn request_within(&self, request: Request, limit: Duration) -> std::io::Result<String> {
        control(&self.api, request, limit).await
    }
}

/// The control socket's name in a sandbox directory.
pub const API_SOCKET: &str = "vmm-api.sock";

/// Sends one request to the control socket `api` of a `pangolin-vmm`, waiting up to `limit`
/// for the answer line (returned without its newline).
///
/// # Errors
/// Connecting, writing or reading failed, or `limit` passed (`TimedOut`).
pub async fn control(api: &Path, request: Request, limit: Duration) -> std::io::Result<String> {
    let exchange = async {
        let mut stream = tokio::net::UnixStream::connect(api).await?;
        let line = format!("{}\n", request.as_str());
        stream.write_all(line.as_bytes()).await?;
        let mut answer = String::new();
        // An answer is one line; a longer one is not a VMM's.
        BufReader::new(stream.take(64 * 1024))
            .read_line(&mut answer)
            .await?;
        Ok::<_, std::io::Error>(answer.trim_end().to_string())
    };
    tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "VMM control socket"))?
}

#[async_trait]
impl Vm for BuiltinVm {
    fn pid(&self) -> Option<u32> {
        self.vmm.pid()
    }

    fn check_alive(&mut self) -> Result<(), HypervisorError> {
        super::check_vmm(&self.vmm, &self.console, "vmm")
    }

    fn exit_watch(&self) -> crate::daemon::ExitWatch {
        self.vmm.exit_watch()
    }

    async fn shutdown(&mut self, grace: Duration) {
        if tokio::time::timeout(grace, self.vmm.wait()).await.is_ok() {
            return;
        }
        tracing::debug!("VMM still running after guest power-off; asking it to stop");
        if self.request(Request::Stop).await.is_ok()
            && tokio::time::timeout(Duration::from_millis(500), self.vmm.wait())
                .await
                .is_ok()
        {
            return;
        }
        self.vmm.stop(Duration::from_millis(200)).await;
    }

    async fn snapshot(&mut self) -> Result<(), HypervisorError> {
        let answer = self
            .request_within(Request::Snapshot, SNAPSHOT_TIMEOUT)
            .await
            .map_err(|e| HypervisorError::Snapshot(format!("control socket: {e}")))?;
        if answer != "ok" {
            return Err(HypervisorError::Snapshot(format!(
                "the VMM answered {answer:?}; its log: {}",
                crate::daemon::log_tail(&self.vmm.log, 3)
            )));
        }
        let status = tokio::time::timeout(Duration::from_secs(10), self.vmm.wait())
            .await
            .map_err(|_| HypervisorError::Snapshot("the VMM did not exit after it".into()))?;
        if status.code() == Some(EXIT_SNAPSHOTTED) {
            Ok(())
        } else {
            Err(HypervisorError::Snapshot(format!(
                "the VMM exited with {status}, not {EXIT_SNAPSHOTTED} (snapshot written)"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_carries_the_spec() {
        let spec = VmSpec {
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/initramfs.cpio".into(),
            cmdline: "console=ttyS0".into(),
            vcpus: 2,
            memory_mib: 256,
            workdir: "/run/p/s1".into(),
            console_log: "/run/p/s1/console.log".into(),
            fs: Some(("/run/p/s1/fs.sock".into(), "pangolin".into())),
            guest_cid: 3,
            vsock_uds: "/run/p/s1/vm.vsock".into(),
            net: None,
            cgroup: None,
            snapshot: None,
            restore: None,
        };
        let c = vm_config(&spec, "/run/p/s1/api.sock".into());
        assert!(c.validate().is_ok());
        assert_eq!(c.vsock.as_ref().map(|v| v.guest_cid), Some(3));
        assert_eq!(c.fs[0].tag, "pangolin");
        assert_eq!(
            c.initramfs.as_deref(),
            Some(std::path::Path::new("/k/initramfs.cpio"))
        );
    }
}
