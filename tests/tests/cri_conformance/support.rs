//! What every conformance case uses: the suite's one private containerd, a [`Case`] with its
//! CRI client and handler, pod and container configurations, and the calls the cases make.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};
use k8s_cri::v1::{
    ContainerConfig, ContainerFilter, CreateContainerRequest, ExecSyncRequest,
    LinuxContainerConfig, LinuxContainerSecurityContext, ListContainersRequest,
    ListPodSandboxRequest, NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxFilter,
    StartContainerRequest,
};
use pangolin_e2e::containerd::{PrivateContainerd, PANGOLIN_HANDLER};
use pangolin_e2e::cri::{self, BridgeNetwork, Cri};
use pangolin_e2e::registry::Registry;
use pangolin_e2e::TestEnv;

/// The runtime handler a case runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handler {
    /// containerd's runc shim: the reference behaviour.
    Runc,
    /// Pangolin: one microVM per pod.
    Pangolin,
}

impl Handler {
    /// Both handlers, in the order their trials are listed.
    pub const ALL: [Handler; 2] = [Handler::Runc, Handler::Pangolin];

    /// The CRI runtime handler name.
    pub fn name(self) -> &'static str {
        match self {
            Handler::Runc => "runc",
            Handler::Pangolin => PANGOLIN_HANDLER,
        }
    }
}

/// The suite's shared environment: one CRI-enabled private containerd and its bridge network.
pub struct Fixture {
    /// Test directory, configuration and leak checks.
    pub env: TestEnv,
    /// The pods' CNI network.
    pub net: BridgeNetwork,
    /// containerd with both handlers.
    pub ctrd: PrivateContainerd,
    /// Where cases put their files (profiles, volumes, logs).
    pub cases_dir: PathBuf,
    /// The registry the image cases pull from, started by the first of them.
    pub registry: OnceLock<Result<Registry, String>>,
}

impl Fixture {
    /// The suite's registry, started on first use.
    pub fn registry(&self) -> Result<&Registry> {
        self.registry
            .get_or_init(|| {
                Registry::start(&self.cases_dir.join("registry")).map_err(|e| format!("{e:#}"))
            })
            .as_ref()
            .map_err(|e| anyhow::anyhow!("the suite's registry: {e}"))
    }
}

/// Label every pod and container of a case carries, with the case's number as value.
pub const CASE_LABEL: &str = "pangolin-conformance-case";

/// A case's body: borrows its [`Case`] for as long as it runs.
pub type Body = for<'a> fn(&'a mut Case) -> Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>>;

/// Hands out case numbers (pod names and labels are unique per case).
static CASES: AtomicUsize = AtomicUsize::new(0);

/// One behaviour on one handler: its CRI client, what it created, its files.
pub struct Case {
    /// The CRI services.
    pub cri: Cri,
    /// The handler its pods run on.
    pub handler: Handler,
    /// A directory of its own.
    pub dir: PathBuf,
    /// The suite's containerd, network and registry.
    pub fixture: Arc<Fixture>,
    number: usize,
    pods: Vec<String>,
}

impl Case {
    /// A fresh case on `handler`.
    pub async fn new(fixture: Arc<Fixture>, handler: Handler) -> Result<Case> {
        let number = CASES.fetch_add(1, Ordering::Relaxed);
        let dir = fixture.cases_dir.join(format!("case{number}"));
        std::fs::create_dir_all(&dir)?;
        Ok(Case {
            cri: Cri::connect(&fixture.ctrd.socket).await?,
            handler,
            dir,
            fixture,
            number,
            pods: Vec::new(),
        })
    }

    /// The case's number, unique in the run (for names and ports of its own).
    pub fn number(&self) -> usize {
        self.number
    }

    fn labels(&self) -> HashMap<String, String> {
        HashMap::from([(CASE_LABEL.to_string(), self.number.to_string())])
    }

    /// A pod configuration named `name` (unique within the case), with the case's label, its
    /// own log directory, pod PID/IPC namespaces and the handler's defaults.
    pub fn pod_config(&self, name: &str) -> PodSandboxConfig {
        let full = format!("c{}-{name}", self.number);
        let logs = self.dir.join(format!("logs-{name}"));
        let mut config = cri::pod_config(&full, &logs, HashMap::new());
        config.labels = self.labels();
        config
    }

    /// RunPodSandbox on the case's handler; the pod is removed when the case ends.
    pub async fn run_pod(&mut self, config: &PodSandboxConfig) -> Result<String> {
        let pod = self
            .cri
            .run_pod(self.handler.name(), config)
            .await
            .context("RunPodSandbox")?;
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// The case removed `pod` itself: [`Self::finish`] leaves it alone.
    pub fn forget_pod(&mut self, pod: &str) {
        self.pods.retain(|p| p != pod);
    }

    /// A pod from [`Self::pod_config`]; its id and configuration.
    pub async fn pod(&mut self, name: &str) -> Result<(String, PodSandboxConfig)> {
        let config = self.pod_config(name);
        Ok((self.run_pod(&config).await?, config))
    }

    /// A busybox container running `command`, labelled for the case.
    pub fn container_config(&self, name: &str, command: &[&str]) -> ContainerConfig {
        let mut config = cri::container_config(name, command);
        config.labels = self.labels();
        config
    }

    /// CreateContainer in `pod`; the container id.
    pub async fn create(
        &mut self,
        pod: &str,
        pod_config: &PodSandboxConfig,
        config: ContainerConfig,
    ) -> Result<String> {
        let name = config.metadata.as_ref().map(|m| m.name.clone());
        Ok(self
            .cri
            .runtime
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(config),
                sandbox_config: Some(pod_config.clone()),
            })
            .await
            .with_context(|| format!("CreateContainer {name:?}"))?
            .into_inner()
            .container_id)
    }

    /// StartContainer.
    pub async fn start(&mut self, id: &str) -> Result<()> {
        self.cri
            .runtime
            .start_container(StartContainerRequest {
                container_id: id.into(),
            })
            .await
            .with_context(|| format!("StartContainer {id}"))?;
        Ok(())
    }

    /// CreateContainer + StartContainer; the container id.
    pub async fn run(
        &mut self,
        pod: &str,
        pod_config: &PodSandboxConfig,
        config: ContainerConfig,
    ) -> Result<String> {
        let id = self.create(pod, pod_config, config).await?;
        self.start(&id).await?;
        Ok(id)
    }

    /// ExecSync `cmd` in `id` (60 s timeout): stdout, stderr, exit code.
    pub async fn exec(&mut self, id: &str, cmd: &[&str]) -> Result<Exec> {
        let resp = self
            .cri
            .runtime
            .exec_sync(ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| (*s).to_string()).collect(),
                timeout: 60,
            })
            .await
            .with_context(|| format!("ExecSync {cmd:?}"))?
            .into_inner();
        Ok(Exec {
            stdout: String::from_utf8_lossy(&resp.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&resp.stderr).into_owned(),
            code: resp.exit_code,
        })
    }

    /// ExecSync that must exit 0; its stdout.
    pub async fn exec_ok(&mut self, id: &str, cmd: &[&str]) -> Result<String> {
        let out = self.exec(id, cmd).await?;
        if out.code != 0 {
            bail!("{cmd:?} exited {}: {}", out.code, out.stderr);
        }
        Ok(out.stdout)
    }

    /// Stops and removes every pod of the case, then checks that CRI lists none of its pods
    /// or containers.
    pub async fn finish(&mut self) -> Result<()> {
        let mut failures = Vec::new();
        for pod in std::mem::take(&mut self.pods) {
            if let Err(e) = self.cri.remove_pod(&pod).await {
                failures.push(format!("removing pod {pod}: {e}"));
            }
        }
        let pods = self
            .cri
            .runtime
            .list_pod_sandbox(ListPodSandboxRequest {
                filter: Some(PodSandboxFilter {
                    label_selector: self.labels(),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner()
            .items;
        if !pods.is_empty() {
            failures.push(format!("pods left: {pods:?}"));
        }
        let containers = self
            .cri
            .runtime
            .list_containers(ListContainersRequest {
                filter: Some(ContainerFilter {
                    label_selector: self.labels(),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner()
            .containers;
        if !containers.is_empty() {
            failures.push(format!("containers left: {containers:?}"));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if !failures.is_empty() {
            bail!("{}", failures.join("; "));
        }
        Ok(())
    }
}

/// What an ExecSync returned.
#[derive(Debug, Clone)]
pub struct Exec {
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
    /// Its exit code.
    pub code: i32,
}

/// `config`'s Linux security context, created if absent.
pub fn security(config: &mut ContainerConfig) -> &mut LinuxContainerSecurityContext {
    config
        .linux
        .get_or_insert_with(LinuxContainerConfig::default)
        .security_context
        .get_or_insert_with(LinuxContainerSecurityContext::default)
}

/// A container in its own PID namespace (`/proc/1` is its init), other namespaces per pod.
pub fn own_pid_namespace(config: &mut ContainerConfig) {
    security(config).namespace_options = Some(NamespaceOption {
        pid: NamespaceMode::Container as i32,
        ..Default::default()
    });
}

/// The lines of a `/proc/<pid>/status` text whose key is in `keys`, in `keys`' order.
pub fn status_fields(status: &str, keys: &[&str]) -> Vec<String> {
    keys.iter()
        .map(|k| {
            status
                .lines()
                .find(|l| l.split(':').next() == Some(k))
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap_or_else(|| format!("{k}: <absent>"))
        })
        .collect()
}

/// Writes a file into the case's directory; its path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
