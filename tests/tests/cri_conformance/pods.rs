//! Pod sandboxes: PodSandboxStatus keeps what the pod was created with, ListPodSandbox filters
//! by id, state and labels, the pod's hostname and DNS configuration are what its containers
//! see, and StopPodSandbox / RemovePodSandbox succeed again on a pod already stopped or removed.

use std::collections::HashMap;

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use k8s_cri::v1::{
    DnsConfig, ListPodSandboxRequest, PodSandbox, PodSandboxFilter, PodSandboxState,
    PodSandboxStateValue, PodSandboxStatus, PodSandboxStatusRequest, PortMapping, Protocol,
    RemovePodSandboxRequest, StopPodSandboxRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Case, CASE_LABEL};

/// The suite's bridge subnet (main.rs, NET_TAG 40).
const SUBNET_PREFIX: &str = "10.231.40.";

/// The bridge's own address: a host address, so the host's nat OUTPUT rules of `portmap`
/// apply to connections the test makes to it.
const HOST_ADDRESS: &str = "10.231.40.1";

/// Host ports of the port-mapping case start here (plus the case's number).
const HOST_PORT_BASE: usize = 31400;

async fn status(c: &mut Case, pod: &str) -> Result<PodSandboxStatus> {
    c.cri
        .runtime
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.into(),
            verbose: false,
        })
        .await
        .context("PodSandboxStatus")?
        .into_inner()
        .status
        .context("PodSandboxStatus without a status")
}

async fn list(c: &mut Case, filter: PodSandboxFilter) -> Result<Vec<PodSandbox>> {
    Ok(c.cri
        .runtime
        .list_pod_sandbox(ListPodSandboxRequest {
            filter: Some(filter),
        })
        .await
        .context("ListPodSandbox")?
        .into_inner()
        .items)
}

async fn stop(c: &mut Case, pod: &str) -> Result<()> {
    c.cri
        .runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await
        .with_context(|| format!("StopPodSandbox {pod}"))?;
    Ok(())
}

async fn remove(c: &mut Case, pod: &str) -> Result<()> {
    c.cri
        .runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await
        .with_context(|| format!("RemovePodSandbox {pod}"))?;
    Ok(())
}

/// PodSandboxStatus keeps the pod's metadata, labels and annotations, and gives its IP, one of
/// the CNI network's.
pub async fn a_pods_status_keeps_its_metadata_labels_annotations_and_ip(
    c: &mut Case,
) -> Result<()> {
    let mut config = c.pod_config("status");
    config.labels.insert("tier".into(), "backend".into());
    config.annotations = HashMap::from([("pangolin.test/note".into(), "kept".into())]);
    let pod = c.run_pod(&config).await?;
    let s = status(c, &pod).await?;
    ensure!(s.id == pod, "id {:?}", s.id);
    ensure!(s.metadata == config.metadata, "metadata {:?}", s.metadata);
    ensure!(s.labels == config.labels, "labels {:?}", s.labels);
    ensure!(
        s.annotations.get("pangolin.test/note").map(String::as_str) == Some("kept"),
        "annotations {:?}",
        s.annotations
    );
    ensure!(
        s.state == PodSandboxState::SandboxReady as i32,
        "state {}",
        s.state
    );
    let ip = s.network.map(|n| n.ip).unwrap_or_default();
    ensure!(
        ip.starts_with(SUBNET_PREFIX),
        "pod IP {ip:?} not in {SUBNET_PREFIX}0/24"
    );
    Ok(())
}

/// ListPodSandbox filters by id, by state and by label selector.
pub async fn list_pod_sandbox_filters_by_id_state_and_labels(c: &mut Case) -> Result<()> {
    let mut first = c.pod_config("list-a");
    first.labels.insert("which".into(), "a".into());
    let a = c.run_pod(&first).await?;
    let mut second = c.pod_config("list-b");
    second.labels.insert("which".into(), "b".into());
    let b = c.run_pod(&second).await?;
    stop(c, &b).await?;
    let mine = first.labels.get(CASE_LABEL).cloned().unwrap_or_default();
    let ids = |items: Vec<PodSandbox>| {
        let mut ids: Vec<String> = items.into_iter().map(|p| p.id).collect();
        ids.sort();
        ids
    };
    let case_only = HashMap::from([(CASE_LABEL.to_string(), mine)]);
    let by_id = list(
        c,
        PodSandboxFilter {
            id: a.clone(),
            ..Default::default()
        },
    )
    .await?;
    ensure!(ids(by_id.clone()) == [a.clone()], "by id: {by_id:?}");
    let ready = list(
        c,
        PodSandboxFilter {
            state: Some(PodSandboxStateValue {
                state: PodSandboxState::SandboxReady as i32,
            }),
            label_selector: case_only.clone(),
            ..Default::default()
        },
    )
    .await?;
    ensure!(ids(ready.clone()) == [a.clone()], "ready: {ready:?}");
    let mut selector = case_only;
    selector.insert("which".into(), "b".into());
    let labelled = list(
        c,
        PodSandboxFilter {
            label_selector: selector,
            ..Default::default()
        },
    )
    .await?;
    ensure!(
        ids(labelled.clone()) == [b.clone()],
        "which=b: {labelled:?}"
    );
    Ok(())
}

/// A pod's hostname and DNS configuration (servers, searches, options) are what its
/// containers see in `hostname` and `/etc/resolv.conf`.
pub async fn a_pods_hostname_and_dns_config_are_what_its_containers_see(
    c: &mut Case,
) -> Result<()> {
    let mut config = c.pod_config("dns");
    config.hostname = "pgn-named-host".into();
    config.dns_config = Some(DnsConfig {
        servers: vec!["10.231.40.53".into()],
        searches: vec!["pgn.example".into()],
        options: vec!["ndots:3".into()],
    });
    let pod = c.run_pod(&config).await?;
    let id = c
        .run(
            &pod,
            &config,
            c.container_config("resolver", &["sleep", "3600"]),
        )
        .await?;
    let hostname = c.exec_ok(&id, &["hostname"]).await?;
    ensure!(hostname.trim() == "pgn-named-host", "hostname {hostname:?}");
    let resolv = c.exec_ok(&id, &["cat", "/etc/resolv.conf"]).await?;
    for want in [
        "nameserver 10.231.40.53",
        "search pgn.example",
        "options ndots:3",
    ] {
        ensure!(
            resolv.lines().any(|l| l.trim() == want),
            "{want:?} not in {resolv:?}"
        );
    }
    Ok(())
}

/// StopPodSandbox and RemovePodSandbox succeed on a pod already stopped or removed, and
/// RemovePodSandbox on an id CRI never knew; StopPodSandbox after the remove succeeds or says
/// NotFound.
pub async fn stop_and_remove_of_a_pod_are_idempotent(c: &mut Case) -> Result<()> {
    let (pod, _) = c.pod("idempotent").await?;
    stop(c, &pod).await?;
    stop(c, &pod).await.context("a second stop")?;
    remove(c, &pod).await?;
    c.forget_pod(&pod);
    remove(c, &pod).await.context("a second remove")?;
    // containerd 1.6 answers NotFound here, which the kubelet takes for done.
    match stop(c, &pod).await {
        Ok(()) => {}
        Err(e) => ensure!(
            e.downcast_ref::<tonic::Status>()
                .is_some_and(|s| s.code() == tonic::Code::NotFound),
            "a stop after the remove: {e:#}"
        ),
    }
    remove(c, "0123456789abcdef-never-a-pod")
        .await
        .context("an unknown id")?;
    ensure!(
        list(
            c,
            PodSandboxFilter {
                id: pod.clone(),
                ..Default::default()
            }
        )
        .await?
        .is_empty(),
        "the removed pod is still listed"
    );
    Ok(())
}

/// An HTTP GET of `/` at `addr`; the whole answer, or the error.
async fn http_get(addr: &str) -> Result<String> {
    let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .context("answer timed out")??;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// A pod's port mapping with a host port publishes the container's port on the host (the
/// kubelet's hostPort; CNI's portmap plugin): a connection to a host address at the host port
/// reaches the server in the container, and nothing answers there once the pod is removed.
pub async fn a_host_port_mapping_reaches_the_container_until_the_pod_is_removed(
    c: &mut Case,
) -> Result<()> {
    let host_port = HOST_PORT_BASE + c.number();
    let mut config = c.pod_config("hostport");
    config.port_mappings = vec![PortMapping {
        protocol: Protocol::Tcp as i32,
        container_port: 8091,
        host_port: i32::try_from(host_port)?,
        host_ip: String::new(),
    }];
    let pod = c.run_pod(&config).await?;
    let script = "mkdir -p /tmp/www && echo via-host-port > /tmp/www/index.html && exec httpd -f -p 8091 -h /tmp/www";
    c.run(
        &pod,
        &config,
        c.container_config("web", &["sh", "-c", script]),
    )
    .await?;
    let addr = format!("{HOST_ADDRESS}:{host_port}");
    let mut answered = None;
    let mut last = String::new();
    for _ in 0..40 {
        match http_get(&addr).await {
            Ok(answer) if answer.contains("via-host-port") => {
                answered = Some(answer);
                break;
            }
            Ok(answer) => last = format!("answer {answer:?}"),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if answered.is_none() {
        bail!("{addr} never reached the container: {last}");
    }
    stop(c, &pod).await?;
    remove(c, &pod).await?;
    c.forget_pod(&pod);
    if let Ok(answer) = http_get(&addr).await {
        bail!("{addr} still answers after the pod was removed: {answer:?}");
    }
    Ok(())
}
