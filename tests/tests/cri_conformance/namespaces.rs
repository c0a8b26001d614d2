//! Namespace modes: a pod that asks for the host's PID or IPC namespace (`hostPID`, `hostIPC`,
//! CRI's `NODE` mode) gets it from runc; a microVM cannot share either with the host, so
//! Pangolin refuses such a pod at RunPodSandbox, naming the field (README, "CRI conformance"),
//! instead of giving it private namespaces in the guest.

use anyhow::{bail, ensure, Result};
use k8s_cri::v1::{NamespaceMode, NamespaceOption, PodSandboxConfig};

use crate::support::{security, Case, Handler};

/// Picks one namespace's mode out of a `NamespaceOption`.
type Pick = fn(&mut NamespaceOption) -> &mut i32;

fn pod_namespaces(config: &mut PodSandboxConfig) -> &mut NamespaceOption {
    config
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
        .namespace_options
        .get_or_insert_with(Default::default)
}

/// A pod (and its container) in the host's `kind` namespace (`/proc/self/ns/<kind>`): with
/// runc the container's namespace is the host's; Pangolin refuses the pod saying `field`.
async fn host_namespace(c: &mut Case, kind: &str, field: &str, pick: Pick) -> Result<()> {
    let mut pod_config = c.pod_config(&format!("host{kind}"));
    *pick(pod_namespaces(&mut pod_config)) = NamespaceMode::Node as i32;
    match c.handler {
        Handler::Runc => {
            let pod = c.run_pod(&pod_config).await?;
            let mut config = c.container_config("probe", &["sleep", "3600"]);
            let ns = security(&mut config)
                .namespace_options
                .get_or_insert_with(Default::default);
            *pick(ns) = NamespaceMode::Node as i32;
            let id = c.run(&pod, &pod_config, config).await?;
            let link = format!("/proc/self/ns/{kind}");
            let inside = c.exec_ok(&id, &["readlink", &link]).await?;
            let host = std::fs::read_link(&link)?;
            ensure!(
                inside.trim() == host.display().to_string(),
                "{field}: the container's {kind} namespace {inside:?} is not the host's {host:?}"
            );
        }
        Handler::Pangolin => match c.run_pod(&pod_config).await {
            Ok(pod) => bail!("{field}: pod {pod} was accepted (it would get a private namespace)"),
            Err(e) => {
                let said = format!("{e:#}");
                ensure!(
                    said.contains(field),
                    "{field}: RunPodSandbox failed without naming it: {said}"
                );
            }
        },
    }
    Ok(())
}

/// `hostPID: true`.
pub async fn a_host_pid_pod_shares_the_hosts_pid_namespace_or_is_refused(
    c: &mut Case,
) -> Result<()> {
    host_namespace(c, "pid", "hostPID: true", |ns| &mut ns.pid).await
}

/// `hostIPC: true`.
pub async fn a_host_ipc_pod_shares_the_hosts_ipc_namespace_or_is_refused(
    c: &mut Case,
) -> Result<()> {
    host_namespace(c, "ipc", "hostIPC: true", |ns| &mut ns.ipc).await
}
