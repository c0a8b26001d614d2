//! What the CRI pod tests share: a fixture (a test's environment, its bridge CNI network and a
//! CRI-enabled private containerd with the images), a driver that runs a test body and then
//! removes every pod through CRI before the leak checks, and CRI calls that panic with their
//! context (these are test helpers).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_cri::v1::{
    ContainerConfig, ContainerStatusRequest, CreateContainerRequest, ExecSyncRequest,
    PodSandboxConfig, StartContainerRequest,
};

use crate::containerd::{Options, PrivateContainerd, PANGOLIN_HANDLER};
use crate::cri::{self, BridgeNetwork, Cri};
use crate::{busybox, finish_containerd, pangolin_containerd, patience, TestEnv};

/// A two-worker tokio runtime for a test body.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Output of an ExecSync: stdout, stderr, exit code.
pub async fn exec(cri: &mut Cri, id: &str, cmd: &[&str]) -> (String, String, i32) {
    let resp = cri
        .runtime
        .exec_sync(ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| (*s).to_string()).collect(),
            timeout: 60,
        })
        .await
        .unwrap_or_else(|e| panic!("ExecSync {cmd:?} in {id}: {e}"))
        .into_inner();
    (
        String::from_utf8_lossy(&resp.stdout).into_owned(),
        String::from_utf8_lossy(&resp.stderr).into_owned(),
        resp.exit_code,
    )
}

/// CreateContainer + StartContainer in `pod`; the container id.
pub async fn create_start(
    cri: &mut Cri,
    pod: &str,
    pod_config: &PodSandboxConfig,
    config: ContainerConfig,
) -> String {
    let name = config.metadata.as_ref().map(|m| m.name.clone());
    let t = Instant::now();
    let id = cri
        .runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .unwrap_or_else(|e| panic!("CreateContainer {name:?}: {e}"))
        .into_inner()
        .container_id;
    let created = t.elapsed();
    cri.runtime
        .start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("StartContainer {name:?}: {e}"));
    eprintln!(
        "{name:?}: CreateContainer {created:?}, StartContainer {:?}",
        t.elapsed() - created
    );
    id
}

/// A container's state and exit code.
pub async fn container_state(cri: &mut Cri, id: &str) -> (i32, i32) {
    let st = cri
        .runtime
        .container_status(ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        })
        .await
        .expect("ContainerStatus")
        .into_inner()
        .status
        .expect("status");
    (st.state, st.exit_code)
}

/// The pod's network namespace path, from the verbose sandbox status (containerd's `info`).
pub fn netns_of(info: &HashMap<String, String>) -> String {
    let raw = info.get("info").expect("verbose status has info");
    let v: serde_json::Value = serde_json::from_str(raw).expect("info is JSON");
    v["runtimeSpec"]["linux"]["namespaces"]
        .as_array()
        .and_then(|nss| {
            nss.iter()
                .find(|ns| ns["type"] == "network")
                .and_then(|ns| ns["path"].as_str())
        })
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no network namespace path in {raw}"))
}

/// Waits until the CRI log at `path` holds `want` (stream, text) lines; the parsed log.
pub async fn wait_log(path: &Path, want: &[(&str, &str)]) -> Vec<(String, String)> {
    let deadline = Instant::now() + patience(Duration::from_secs(20));
    loop {
        let lines = cri::parse_log(path).unwrap_or_default();
        let has = |(s, t): &(&str, &str)| lines.iter().any(|(ls, lt)| ls == s && lt == t);
        if want.iter().all(has) || Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A test's environment, bridge network and CRI-enabled private containerd with the images.
pub struct CriFixture {
    /// The test's environment.
    pub env: TestEnv,
    /// Its CNI network (removed on drop).
    pub net: Arc<BridgeNetwork>,
    /// The CRI-enabled containerd.
    pub ctrd: PrivateContainerd,
}

/// Writes a CNI network: [`BridgeNetwork::create`] or its dual-stack sibling.
pub type MakeNetwork = fn(&Path, &str, u8) -> anyhow::Result<BridgeNetwork>;

impl CriFixture {
    /// `tag` (1-255) keeps the bridge and subnet apart from other tests'.
    pub fn new(name: &str, tag: u8) -> CriFixture {
        Self::with_network(name, tag, BridgeNetwork::create)
    }

    /// [`Self::new`] on the network `make` writes.
    pub fn with_network(name: &str, tag: u8, make: MakeNetwork) -> CriFixture {
        Self::with_env(TestEnv::new(name), name, tag, make)
    }

    /// [`Self::with_network`] in an environment of the caller's.
    pub fn with_env(env: TestEnv, name: &str, tag: u8, make: MakeNetwork) -> CriFixture {
        let net = Arc::new(
            make(
                &env.dir.join("containerd"),
                &format!("pangolin-{name}"),
                tag,
            )
            .expect("CNI config"),
        );
        let ctrd = pangolin_containerd(
            &env,
            Options {
                cri: true,
                ..Options::default()
            },
        );
        cri::import_images(&ctrd, &busybox()).expect("import images");
        CriFixture { env, net, ctrd }
    }
}

/// Runs `body` (bounded to 10 minutes); whatever happened, pods go through CRI (network
/// namespaces, CNI leases) before containerd stops, then the leak checks run.
pub fn drive(
    ctrd: PrivateContainerd,
    env: TestEnv,
    net: Arc<BridgeNetwork>,
    body: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let rt = runtime();
    let task = rt.spawn(body);
    let outcome = rt.block_on(async { tokio::time::timeout(Duration::from_secs(600), task).await });
    let leftovers = rt.block_on(cri::remove_all_pods(&ctrd.socket));
    match outcome {
        Err(_) => panic!("CRI test did not finish within 10 minutes"),
        Ok(Err(join)) => std::panic::resume_unwind(join.into_panic()),
        Ok(Ok(())) => {}
    }
    assert!(leftovers.is_empty(), "pods left: {leftovers:?}");
    finish_containerd(ctrd, env);
    let tap = std::process::Command::new("ip")
        .args(["link", "show", pangolin_shim::network::TAP_NAME])
        .output()
        .expect("ip link");
    assert!(!tap.status.success(), "a pod tap in the host namespace");
    drop(net);
}

/// RunPodSandbox on the pangolin handler; the pod id and its IP.
pub async fn run_pod(cri: &mut Cri, config: &PodSandboxConfig) -> (String, String) {
    let pod = cri
        .run_pod(PANGOLIN_HANDLER, config)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}"));
    let ip = cri.pod_ip(&pod).await.expect("PodSandboxStatus");
    (pod, ip)
}

/// RunPodSandbox of `config` must fail (`what`), leaving no pod behind; its error.
pub async fn refused(cri: &mut Cri, config: &PodSandboxConfig, what: &str) -> tonic::Status {
    let err = cri.run_pod(PANGOLIN_HANDLER, config).await.expect_err(what);
    let pods = cri.pods().await.expect("ListPodSandbox");
    assert!(pods.is_empty(), "failed pod left: {pods:?}");
    err
}
