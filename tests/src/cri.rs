//! A Kubernetes CRI client (the `k8s-cri` crate's v1 API over containerd's gRPC socket) and
//! what a CRI pod needs on this machine without a cluster: a bridge CNI network of its own, a
//! pause image, pod and container configurations.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, ImageSpec, LinuxContainerConfig,
    LinuxContainerResources, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    ListPodSandboxRequest, NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata,
    PodSandboxStatusRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StopPodSandboxRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::containerd::{PrivateContainerd, BUSYBOX_IMAGE, CRI_NAMESPACE, PAUSE_IMAGE};

/// The two CRI services of one containerd (a clone shares the connection).
#[derive(Clone)]
pub struct Cri {
    /// Pods and containers.
    pub runtime: RuntimeServiceClient<Channel>,
    /// Images (status, list).
    pub images: ImageServiceClient<Channel>,
}

impl Cri {
    /// Connects to containerd's gRPC socket (where its CRI plugin serves).
    pub async fn connect(socket: &Path) -> Result<Cri> {
        let path = socket.to_path_buf();
        let channel = Endpoint::try_from("http://[::]:0")?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .with_context(|| format!("connecting to CRI at {}", socket.display()))?;
        Ok(Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    /// RunPodSandbox of `config` on runtime handler `handler`; the pod id.
    pub async fn run_pod(
        &mut self,
        handler: &str,
        config: &PodSandboxConfig,
    ) -> Result<String, tonic::Status> {
        Ok(self
            .runtime
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            })
            .await?
            .into_inner()
            .pod_sandbox_id)
    }

    /// CreateContainer of `config` in `pod`, then StartContainer; the container id.
    pub async fn create_start(
        &mut self,
        pod: &str,
        pod_config: &PodSandboxConfig,
        config: ContainerConfig,
    ) -> Result<String, tonic::Status> {
        let id = self
            .runtime
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(config),
                sandbox_config: Some(pod_config.clone()),
            })
            .await?
            .into_inner()
            .container_id;
        self.runtime
            .start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await?;
        Ok(id)
    }

    /// The pod's IP as PodSandboxStatus reports it (empty without a network).
    pub async fn pod_ip(&mut self, pod: &str) -> Result<String, tonic::Status> {
        Ok(self
            .pod_ips(pod)
            .await?
            .into_iter()
            .next()
            .unwrap_or_default())
    }

    /// The pod's IPs as PodSandboxStatus reports them: the primary one (IPv4 in a dual-stack
    /// pod), then the additional ones; empty without a network.
    pub async fn pod_ips(&mut self, pod: &str) -> Result<Vec<String>, tonic::Status> {
        let network = self
            .runtime
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod.into(),
                verbose: false,
            })
            .await?
            .into_inner()
            .status
            .and_then(|s| s.network);
        Ok(network.map_or_else(Vec::new, |n| {
            std::iter::once(n.ip)
                .filter(|ip| !ip.is_empty())
                .chain(n.additional_ips.into_iter().map(|a| a.ip))
                .collect()
        }))
    }

    /// StopPodSandbox then RemovePodSandbox (tried even when the stop failed).
    pub async fn remove_pod(&mut self, pod: &str) -> Result<(), tonic::Status> {
        let stopped = self
            .runtime
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.into(),
            })
            .await;
        let removed = self
            .runtime
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.into(),
            })
            .await;
        stopped?;
        removed?;
        Ok(())
    }

    /// Ids of the pods CRI knows.
    pub async fn pods(&mut self) -> Result<Vec<String>, tonic::Status> {
        Ok(self
            .runtime
            .list_pod_sandbox(ListPodSandboxRequest::default())
            .await?
            .into_inner()
            .items
            .into_iter()
            .map(|p| p.id)
            .collect())
    }
}

/// Stops and removes every pod CRI knows (a failed test's leftovers: their network
/// namespaces and CNI leases are only released through CRI). Returns the ids it found.
pub async fn remove_all_pods(socket: &Path) -> Vec<String> {
    let Ok(mut cri) = Cri::connect(socket).await else {
        return Vec::new();
    };
    let pods = cri.pods().await.unwrap_or_default();
    for pod in &pods {
        let _ = cri.remove_pod(pod).await;
    }
    pods
}

/// A private bridge network for CRI pods: a CNI config in containerd's CNI config directory
/// (`<containerd dir>/cni`, see [`crate::containerd::config_toml`]), IPAM state in the same
/// directory, its own bridge and subnet (or two: IPv4 and an IPv6 ULA one), no masquerade.
/// Removes the bridge on drop (the bridge plugin creates it and never deletes it).
pub struct BridgeNetwork {
    /// The Linux bridge the plugin creates (at most 15 bytes).
    pub bridge: String,
    /// The pod subnet (`10.x.y.0/24`).
    pub subnet: String,
    /// The IPv6 pod subnet of a dual-stack network (`fd23:1:<tag>::/64`).
    pub subnet6: Option<String>,
    /// Where host-local keeps its leases.
    pub ipam_dir: PathBuf,
}

impl BridgeNetwork {
    /// Writes the network for a containerd that will live in `containerd_dir`; `tag` (1-255)
    /// makes the bridge name and subnet unique among concurrent tests.
    pub fn create(containerd_dir: &Path, name: &str, tag: u8) -> Result<BridgeNetwork> {
        Self::write(containerd_dir, name, tag, false, false)
    }

    /// As [`BridgeNetwork::create`], with the `portmap` plugin chained after the bridge, so a
    /// pod's port mappings with a host port are published on the host as the kubelet's
    /// hostPort is (DNAT from the host's addresses to the pod IP, in the host's nat table).
    pub fn create_with_port_mappings(
        containerd_dir: &Path,
        name: &str,
        tag: u8,
    ) -> Result<BridgeNetwork> {
        Self::write(containerd_dir, name, tag, false, true)
    }

    /// As [`BridgeNetwork::create`], dual-stack: host-local gives every pod an address from
    /// each of two ranges (the IPv4 subnet and `fd23:1:<tag hex>::/64`), with a default route
    /// of each family through the bridge. Host setting: IPv6 must not be disabled on the host
    /// for the bridge to take its gateway address, so this turns it on
    /// (`net.ipv6.conf.{all,default}.disable_ipv6 = 0`); the bridge plugin itself turns on IPv6
    /// forwarding, as it does IPv4's.
    pub fn create_dual_stack(containerd_dir: &Path, name: &str, tag: u8) -> Result<BridgeNetwork> {
        for scope in ["all", "default"] {
            let knob = format!("/proc/sys/net/ipv6/conf/{scope}/disable_ipv6");
            fs::write(&knob, "0").with_context(|| format!("enabling IPv6: {knob}"))?;
        }
        Self::write(containerd_dir, name, tag, true, false)
    }

    fn write(
        containerd_dir: &Path,
        name: &str,
        tag: u8,
        dual: bool,
        port_mappings: bool,
    ) -> Result<BridgeNetwork> {
        let bridge = format!("pgn-cri{tag}");
        let subnet = format!("10.231.{tag}.0/24");
        let subnet6 = dual.then(|| format!("fd23:1:{tag:x}::/64"));
        let ipam_dir = containerd_dir.join("cni-ipam");
        let conf_dir = containerd_dir.join("cni");
        fs::create_dir_all(&conf_dir)?;
        let mut ranges = vec![serde_json::json!([{ "subnet": subnet }])];
        let mut routes = vec![serde_json::json!({ "dst": "0.0.0.0/0" })];
        if let Some(v6) = &subnet6 {
            ranges.push(serde_json::json!([{ "subnet": v6 }]));
            routes.push(serde_json::json!({ "dst": "::/0" }));
        }
        let mut plugins = vec![serde_json::json!({
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": ranges,
                    "routes": routes,
                    "dataDir": ipam_dir,
                },
        })];
        if port_mappings {
            plugins.push(serde_json::json!({
                "type": "portmap",
                "capabilities": { "portMappings": true },
            }));
        }
        let conflist = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": name,
            "plugins": plugins,
        });
        fs::write(
            conf_dir.join("10-pangolin-test.conflist"),
            serde_json::to_vec_pretty(&conflist)?,
        )?;
        Ok(BridgeNetwork {
            bridge,
            subnet,
            subnet6,
            ipam_dir,
        })
    }

    /// Leases host-local still holds (one file per allocated IP, named by the IP, either
    /// family; besides them it keeps `lock` and `last_reserved_ip.<range>`).
    pub fn leases(&self) -> Vec<String> {
        let Ok(dirs) = fs::read_dir(&self.ipam_dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for net in dirs.flatten() {
            for f in fs::read_dir(net.path()).into_iter().flatten().flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if name.parse::<std::net::IpAddr>().is_ok() {
                    out.push(name);
                }
            }
        }
        out
    }
}

impl Drop for BridgeNetwork {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "delete", &self.bridge])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Imports busybox (`sh`) and the pause image (busybox sleeping) into CRI's namespace.
pub fn import_images(ctrd: &PrivateContainerd, busybox: &Path) -> Result<()> {
    ctrd.import_image(CRI_NAMESPACE, busybox, BUSYBOX_IMAGE, &["sh"])?;
    ctrd.import_image(
        CRI_NAMESPACE,
        busybox,
        PAUSE_IMAGE,
        &["sleep", "2147483647"],
    )
}

/// The host cgroup parent of test pods (runc creates its containers' cgroups under it).
pub const CGROUP_PARENT: &str = "pangolin-test";

/// Removes the (empty) [`CGROUP_PARENT`] directories runc pods leave in every hierarchy.
pub fn remove_cgroup_parent() {
    let root = Path::new("/sys/fs/cgroup");
    let mut dirs = vec![root.join(CGROUP_PARENT)];
    for hierarchy in fs::read_dir(root).into_iter().flatten().flatten() {
        dirs.push(hierarchy.path().join(CGROUP_PARENT));
    }
    for dir in dirs {
        let _ = fs::remove_dir(dir);
    }
}

/// A pod in its own network namespace (CNI), pid and ipc namespaces per pod.
pub fn pod_config(
    name: &str,
    log_directory: &Path,
    annotations: HashMap<String, String>,
) -> PodSandboxConfig {
    let pod = NamespaceMode::Pod as i32;
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "pangolin-test".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_directory.display().to_string(),
        annotations,
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: format!("/{CGROUP_PARENT}"),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: pod,
                    pid: pod,
                    ipc: pod,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A busybox container running `command`, logging to `<pod log dir>/<name>.log`.
pub fn container_config(name: &str, command: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: BUSYBOX_IMAGE.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| (*s).to_string()).collect(),
        log_path: format!("{name}.log"),
        linux: Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources::default()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A busybox container serving `text` over HTTP on `port` (busybox httpd in the foreground).
pub fn web_container(name: &str, text: &str, port: u16) -> ContainerConfig {
    let script = format!(
        "mkdir -p /tmp/www && echo {text} > /tmp/www/index.html && exec httpd -f -p {port} -h /tmp/www"
    );
    container_config(name, &["sh", "-c", &script])
}

/// `GET /` from `ip:port`, retried until `patience` runs out (the server may still be
/// starting); the whole response.
pub async fn http_get(ip: &str, port: u16, patience: std::time::Duration) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect((ip, port)).await?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
            let mut out = Vec::new();
            s.read_to_end(&mut out).await?;
            anyhow::Ok(String::from_utf8_lossy(&out).into_owned())
        };
        match tokio::time::timeout(std::time::Duration::from_secs(5), attempt).await {
            Ok(Ok(body)) if !body.is_empty() => return Ok(body),
            Ok(Ok(_)) => {}
            Ok(Err(e)) if tokio::time::Instant::now() > deadline => {
                return Err(e.context(format!("GET http://{ip}:{port}/")))
            }
            _ if tokio::time::Instant::now() > deadline => {
                bail!("GET http://{ip}:{port}/: no answer within {patience:?}")
            }
            _ => {}
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// The `stdout`/`stderr` lines of a CRI log file (`<RFC3339Nano> <stream> <P|F> <text>`), as
/// `(stream, text)`; a malformed line is an error.
pub fn parse_log(path: &Path) -> Result<Vec<(String, String)>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(4, ' ');
        let (Some(ts), Some(stream), Some(tag), Some(msg)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            bail!("malformed CRI log line {line:?}");
        };
        if !ts.contains('T') || !matches!(tag, "P" | "F") {
            bail!("malformed CRI log line {line:?}");
        }
        out.push((stream.to_string(), msg.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_log_lines_parse_and_bad_ones_are_errors() {
        let dir = std::env::temp_dir().join(format!("cri-log-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        let f = dir.join("c.log");
        fs::write(
            &f,
            "2026-11-23T20:00:00.123456789Z stdout F hello world\n\
             2026-11-23T20:00:00.2Z stderr P part\n",
        )
        .expect("write");
        let lines = parse_log(&f).expect("parse");
        assert_eq!(
            lines,
            vec![
                ("stdout".into(), "hello world".into()),
                ("stderr".into(), "part".into())
            ]
        );
        fs::write(&f, "hello\n").expect("write");
        assert!(parse_log(&f).is_err());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn leases_of_both_families_are_counted_and_host_locals_own_files_are_not() {
        let dir = std::env::temp_dir().join(format!("cri-leases-{}", std::process::id()));
        let net_dir = dir.join("pangolin-test");
        fs::create_dir_all(&net_dir).expect("mkdir");
        for f in [
            "10.231.3.2",
            "fd23:1:3::2",
            "lock",
            "last_reserved_ip.0",
            "last_reserved_ip.1",
        ] {
            fs::write(net_dir.join(f), "x").expect("write");
        }
        let net = BridgeNetwork {
            bridge: "pgn-none".into(),
            subnet: "10.231.3.0/24".into(),
            subnet6: Some("fd23:1:3::/64".into()),
            ipam_dir: dir.clone(),
        };
        let mut leases = net.leases();
        leases.sort();
        assert_eq!(leases, ["10.231.3.2", "fd23:1:3::2"]);
        drop(net);
        let _ = fs::remove_dir_all(&dir);
    }
}
