//! containerd restarts under running CRI pods (killed with SIGKILL, then started again on the
//! same root and state, as after a crash or an upgrade on a node): the pods keep running, their
//! containers' output keeps reaching the CRI log with no line lost, and ExecSync, stats, stop
//! and remove work afterwards: containerd finds each shim by its bundle's address file and
//! reconnects. Run against runc too, in the same test binary, as the reference.

#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_cri::v1::{
    ContainerState, ContainerStatsRequest, ContainerStatusRequest, ExecSyncRequest,
    PodSandboxState, PodSandboxStatusRequest, RemoveContainerRequest, StopContainerRequest,
};
use pangolin_e2e::containerd::{Options, PANGOLIN_HANDLER};
use pangolin_e2e::cri::{self, BridgeNetwork, Cri};
use pangolin_e2e::{busybox, finish_containerd, pangolin_containerd, patience, TestEnv};

/// The numbers of the `line N` entries of a CRI log, in order.
fn numbered_lines(log: &Path) -> Vec<u64> {
    cri::parse_log(log)
        .unwrap_or_default()
        .iter()
        .filter(|(stream, _)| stream == "stdout")
        .filter_map(|(_, text)| text.strip_prefix("line ")?.parse().ok())
        .collect()
}

/// Waits until the log holds more than `count` numbered lines; those lines.
async fn wait_for_lines(log: &Path, count: usize, what: &str) -> Vec<u64> {
    let deadline = Instant::now() + patience(Duration::from_secs(30));
    loop {
        let lines = numbered_lines(log);
        if lines.len() > count {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the log has {} numbered lines, want more than {count}",
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The pod's and the container's CRI states, once CRI answers again (a restarted containerd
/// serves its socket before its CRI plugin has recovered the pods).
async fn states(cri: &mut Cri, pod: &str, container: &str) -> (i32, i32) {
    let deadline = Instant::now() + patience(Duration::from_secs(30));
    let status = loop {
        let asked = cri
            .runtime
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod.into(),
                verbose: false,
            })
            .await;
        match asked {
            Ok(status) => break status,
            Err(e) if Instant::now() < deadline => {
                eprintln!("PodSandboxStatus after the restart: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("PodSandboxStatus after the restart: {e}"),
        }
    };
    let pod_state = status.into_inner().status.expect("pod status").state;
    let container_state = cri
        .runtime
        .container_status(ContainerStatusRequest {
            container_id: container.into(),
            verbose: false,
        })
        .await
        .expect("ContainerStatus")
        .into_inner()
        .status
        .expect("container status")
        .state;
    (pod_state, container_state)
}

/// The whole check on runtime handler `handler`; `tag` keeps its bridge and subnet apart.
fn pods_survive_a_containerd_restart(handler: &str, tag: u8) {
    let name = format!("restart-{handler}");
    let env = TestEnv::new(&name);
    let net = BridgeNetwork::create(
        &env.dir.join("containerd"),
        &format!("pangolin-{name}"),
        tag,
    )
    .expect("CNI config");
    let mut ctrd = pangolin_containerd(
        &env,
        Options {
            cri: true,
            ..Options::default()
        },
    );
    cri::import_images(&ctrd, &busybox()).expect("import images");
    let logs = env.dir.join("pod-logs");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let socket = ctrd.socket.clone();
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        rt.block_on(async {
            let mut cri = Cri::connect(&socket).await.expect("CRI connect");
            let pod_config = cri::pod_config("p1", &logs, HashMap::new());
            let pod = cri
                .run_pod(handler, &pod_config)
                .await
                .unwrap_or_else(|e| panic!("RunPodSandbox: {e}"));
            // A line every 50 ms, numbered: a gap or a repeat in the log is a lost or doubled line.
            let counter = cri::container_config(
                "counter",
                &[
                    "sh",
                    "-c",
                    "i=0; while true; do echo \"line $i\"; i=$((i+1)); sleep 0.05; done",
                ],
            );
            let id = cri
                .create_start(&pod, &pod_config, counter)
                .await
                .expect("CreateContainer + StartContainer");
            let log = logs.join("counter.log");
            let before = wait_for_lines(&log, 5, "before the restart").await;

            let t = Instant::now();
            ctrd.restart().expect("containerd restarts");
            eprintln!("{handler}: containerd restarted in {:?}", t.elapsed());
            let mut cri = Cri::connect(&socket).await.expect("CRI connect again");
            assert_eq!(
                states(&mut cri, &pod, &id).await,
                (
                    PodSandboxState::SandboxReady as i32,
                    ContainerState::ContainerRunning as i32
                ),
                "pod ready and container running after the restart"
            );
            // The output written while containerd was away, and what follows, reach the log.
            let after = wait_for_lines(&log, before.len() + 40, "after the restart").await;
            let expected: Vec<u64> = (0..after.len() as u64).collect();
            assert_eq!(after, expected, "every line once, in order");

            let exec = cri
                .runtime
                .exec_sync(ExecSyncRequest {
                    container_id: id.clone(),
                    cmd: vec!["echo".into(), "exec-after-restart".into()],
                    timeout: 60,
                })
                .await
                .expect("ExecSync after the restart")
                .into_inner();
            assert_eq!(exec.exit_code, 0);
            assert_eq!(
                String::from_utf8_lossy(&exec.stdout).trim(),
                "exec-after-restart"
            );
            let stats = cri
                .runtime
                .container_stats(ContainerStatsRequest {
                    container_id: id.clone(),
                })
                .await
                .expect("ContainerStats after the restart")
                .into_inner()
                .stats
                .expect("stats");
            assert!(
                stats.memory.is_some_and(|m| m.working_set_bytes.is_some()),
                "memory stats after the restart"
            );
            cri.runtime
                .stop_container(StopContainerRequest {
                    container_id: id.clone(),
                    timeout: 2,
                })
                .await
                .expect("StopContainer after the restart");
            cri.runtime
                .remove_container(RemoveContainerRequest {
                    container_id: id.clone(),
                })
                .await
                .expect("RemoveContainer after the restart");
            cri.remove_pod(&pod)
                .await
                .expect("StopPodSandbox + RemovePodSandbox after the restart");
        });
    }));
    let leftovers = rt.block_on(cri::remove_all_pods(&socket));
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    assert!(leftovers.is_empty(), "pods left: {leftovers:?}");
    finish_containerd(ctrd, env);
    drop(net);
}

#[test]
fn runc_pods_survive_a_containerd_restart() {
    pods_survive_a_containerd_restart("runc", 61);
}

#[test]
fn pangolin_pods_survive_a_containerd_restart() {
    pods_survive_a_containerd_restart(PANGOLIN_HANDLER, 62);
}
