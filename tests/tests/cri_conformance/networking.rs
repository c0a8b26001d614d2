//! Networking: a container's pod IP (PodSandboxStatus) is on its `eth0`, and a server in one
//! pod answers a client in another pod at the first pod's IP; a container granted NET_ADMIN
//! makes bridges and veths in its pod.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

use k8s_cri::v1::Capability;

use crate::support::{security, Case};

/// The pod's IP as PodSandboxStatus reports it.
async fn pod_ip(c: &mut Case, pod: &str) -> Result<String> {
    c.cri.pod_ip(pod).await.context("PodSandboxStatus")
}

/// The pod IP CRI reports is the address of the container's `eth0`.
pub async fn a_containers_eth0_has_the_pod_ip(c: &mut Case) -> Result<()> {
    let (pod, pod_config) = c.pod("ip").await?;
    let id = c
        .run(
            &pod,
            &pod_config,
            c.container_config("addressed", &["sleep", "3600"]),
        )
        .await?;
    let ip = pod_ip(c, &pod).await?;
    let addr = c
        .exec_ok(&id, &["ip", "-4", "addr", "show", "dev", "eth0"])
        .await?;
    ensure!(
        addr.contains(&format!("inet {ip}/")),
        "pod IP {ip} not on eth0: {addr}"
    );
    Ok(())
}

/// A busybox httpd in pod A answers a client in pod B at pod A's IP.
pub async fn a_server_in_one_pod_answers_a_client_in_another_at_its_pod_ip(
    c: &mut Case,
) -> Result<()> {
    let (server_pod, server_config) = c.pod("server").await?;
    let script = "mkdir -p /tmp/www && echo across-pods > /tmp/www/index.html && exec httpd -f -p 8090 -h /tmp/www";
    c.run(
        &server_pod,
        &server_config,
        c.container_config("web", &["sh", "-c", script]),
    )
    .await?;
    let (client_pod, client_config) = c.pod("client").await?;
    let client = c
        .run(
            &client_pod,
            &client_config,
            c.container_config("client", &["sleep", "3600"]),
        )
        .await?;
    let ip = pod_ip(c, &server_pod).await?;
    let url = format!("http://{ip}:8090/");
    // nc, not wget: this static busybox's wget crashes in its resolver (exit 139).
    let ask = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} 8090");
    let mut last = String::new();
    for _ in 0..40 {
        let got = c.exec(&client, &["sh", "-c", &ask]).await?;
        if got.code == 0 && got.stdout.contains("across-pods") {
            return Ok(());
        }
        last = format!("{got:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("{url} never answered from the other pod: {last}")
}

/// A container granted NET_ADMIN administers its pod's network: it makes a bridge and a veth
/// pair and puts one end on the bridge (on Pangolin the guest kernel has to have them: `brctl
/// addbr` failed with ENOPKG before). They live in the pod's network namespace, and go with it.
pub async fn a_container_granted_net_admin_makes_a_bridge_and_veths_in_its_pod(
    c: &mut Case,
) -> Result<()> {
    let (pod, pod_config) = c.pod("netadmin").await?;
    let mut config = c.container_config("netadmin", &["sleep", "3600"]);
    security(&mut config).capabilities = Some(Capability {
        add_capabilities: vec!["NET_ADMIN".into()],
        ..Default::default()
    });
    let id = c.run(&pod, &pod_config, config).await?;
    let script = "set -e; brctl addbr pgnbr0; \
                  ip link add pgnv0 type veth peer name pgnv1; \
                  ip link set pgnv0 master pgnbr0; ip link set pgnbr0 up; \
                  ip -o link show";
    let links = c.exec_ok(&id, &["sh", "-c", script]).await?;
    for link in ["pgnbr0:", "pgnv0@"] {
        ensure!(links.contains(link), "no {link} among:\n{links}");
    }
    ensure!(
        links.contains("master pgnbr0"),
        "the veth is not a port of the bridge:\n{links}"
    );
    Ok(())
}
