//! Namespace modes. POD (the default): a pod's containers share its PID and IPC namespaces (and
//! so its IPC sysctls); CONTAINER: a PID namespace of the container's own. NODE (`hostPID`,
//! `hostIPC`): runc gives the host's; a microVM cannot share either with the host, so
//! Pangolin refuses such a pod at RunPodSandbox, naming the field (README, "CRI conformance"),
//! instead of giving it private namespaces in the guest.

use anyhow::{bail, ensure, Result};
use k8s_cri::v1::{NamespaceMode, NamespaceOption, PodSandboxConfig};

use crate::support::{own_pid_namespace, security, Case, Handler};

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

/// `readlink /proc/self/ns/<kind>` in container `id`.
async fn namespace_of(c: &mut Case, id: &str, kind: &str) -> Result<String> {
    let link = format!("/proc/self/ns/{kind}");
    Ok(c.exec_ok(id, &["readlink", &link])
        .await?
        .trim()
        .to_string())
}

/// POD mode (the zero value, what Kubernetes gives every container): the pod's containers
/// share one PID namespace, so each sees the others' processes, and PID 1 is the sandbox's.
pub async fn containers_of_a_pod_share_its_pid_namespace(c: &mut Case) -> Result<()> {
    let (pod, pod_config) = c.pod("sharedpid").await?;
    let a = c
        .run(
            &pod,
            &pod_config,
            c.container_config("a", &["sleep", "3601"]),
        )
        .await?;
    let b = c
        .run(
            &pod,
            &pod_config,
            c.container_config("b", &["sleep", "3602"]),
        )
        .await?;
    let (ns_a, ns_b) = (
        namespace_of(c, &a, "pid").await?,
        namespace_of(c, &b, "pid").await?,
    );
    ensure!(
        ns_a == ns_b,
        "two PID namespaces in one pod: {ns_a} and {ns_b}"
    );
    let seen = c.exec_ok(&b, &["ps", "-o", "args"]).await?;
    ensure!(
        seen.contains("sleep 3601"),
        "container b does not see container a's process:\n{seen}"
    );
    // The suite's pause image is busybox running `sleep 2147483647`.
    let init = c.exec_ok(&b, &["cat", "/proc/1/cmdline"]).await?;
    ensure!(
        init.contains("2147483647"),
        "PID 1 is not the sandbox's process: {init:?}"
    );
    Ok(())
}

/// CONTAINER mode: the container's init is PID 1 of a namespace of its own.
pub async fn a_container_in_container_pid_mode_has_a_namespace_of_its_own(
    c: &mut Case,
) -> Result<()> {
    let (pod, pod_config) = c.pod("ownpid").await?;
    let shared = c
        .run(
            &pod,
            &pod_config,
            c.container_config("shared", &["sleep", "3600"]),
        )
        .await?;
    let mut config = c.container_config("own", &["sleep", "3603"]);
    own_pid_namespace(&mut config);
    let own = c.run(&pod, &pod_config, config).await?;
    let (ns_shared, ns_own) = (
        namespace_of(c, &shared, "pid").await?,
        namespace_of(c, &own, "pid").await?,
    );
    ensure!(
        ns_shared != ns_own,
        "CONTAINER mode joined the pod's PID namespace {ns_own}"
    );
    let init = c.exec_ok(&own, &["cat", "/proc/1/cmdline"]).await?;
    ensure!(
        init.replace('\0', " ").trim() == "sleep 3603",
        "PID 1 of its own namespace is not its init: {init:?}"
    );
    Ok(())
}

/// The pod's containers share one IPC namespace, the sandbox's, where the pod's namespaced
/// sysctls (`kernel.shm*`, `kernel.msg*`) were set: every container sees them.
pub async fn containers_of_a_pod_share_its_ipc_namespace_and_its_sysctls(
    c: &mut Case,
) -> Result<()> {
    let mut pod_config = c.pod_config("sharedipc");
    pod_config
        .linux
        .get_or_insert_with(Default::default)
        .sysctls
        .insert("kernel.shmmni".into(), "2048".into());
    let pod = c.run_pod(&pod_config).await?;
    let a = c
        .run(
            &pod,
            &pod_config,
            c.container_config("a", &["sleep", "3600"]),
        )
        .await?;
    let b = c
        .run(
            &pod,
            &pod_config,
            c.container_config("b", &["sleep", "3600"]),
        )
        .await?;
    let (ns_a, ns_b) = (
        namespace_of(c, &a, "ipc").await?,
        namespace_of(c, &b, "ipc").await?,
    );
    ensure!(
        ns_a == ns_b,
        "two IPC namespaces in one pod: {ns_a} and {ns_b}"
    );
    for id in [&a, &b] {
        let value = c.exec_ok(id, &["cat", "/proc/sys/kernel/shmmni"]).await?;
        ensure!(
            value.trim() == "2048",
            "the pod's kernel.shmmni = 2048 is {value:?} in {id}"
        );
    }
    Ok(())
}
