//! Node faults seen through CRI (a real private containerd with its CRI plugin, the bridge CNI
//! plugin): a pod's shim killed with SIGKILL, and a state dir that is full or read-only. Each
//! ends in a bounded time with a clear outcome, and the leak audit finds nothing of the pod
//! (processes, descriptors, mounts, sockets, leases, state files) afterwards.

#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_cri::v1::{ContainerState, RemovePodSandboxRequest, StopPodSandboxRequest};
use pangolin_e2e::audit::{assert_no_leaks, Audit, Scope};
use pangolin_e2e::cri::{self, Cri};
use pangolin_e2e::cri_pods::{container_state, create_start, drive, refused, run_pod, CriFixture};
use pangolin_e2e::patience;

/// What the audit covers for `fixture`: its directories, state dirs, containerd's descriptors
/// and its CNI leases (not the whole host: other test binaries may run pods meanwhile).
fn scope(fixture: &CriFixture) -> Scope {
    pangolin_e2e::pods_scope(&fixture.env, &fixture.ctrd, false)
}

/// kill -9 of a CRI pod's shim: containerd sees the container exit, StopPodSandbox and
/// RemovePodSandbox succeed, and the VM, its helpers, mounts, sockets and the pod's lease are
/// gone (the shim's `delete`, which containerd runs, removes what the dead shim made).
#[test]
fn killing_a_cri_pods_shim_exits_its_containers_and_stop_remove_leave_nothing() {
    let fixture = CriFixture::new("cri-shimkill", 66);
    let scope = scope(&fixture);
    let before = Audit::take(&scope);
    let (ctrd_dir, socket, logs) = (
        fixture.ctrd.dir.clone(),
        fixture.ctrd.socket.clone(),
        fixture.env.dir.join("logs"),
    );
    let CriFixture { env, net, ctrd } = fixture;
    drive(ctrd, env, net, async move {
        let mut cri = Cri::connect(&socket).await.expect("connect");
        let config = cri::pod_config("shimkill", &logs, HashMap::new());
        let (pod, _ip) = run_pod(&mut cri, &config).await;
        let id = create_start(
            &mut cri,
            &pod,
            &config,
            cri::container_config("sleeper", &["sleep", "3600"]),
        )
        .await;
        let shims: Vec<u32> = pangolin_e2e::processes_mentioning(&ctrd_dir)
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("containerd-shim-pangolin-v2") && cmd.contains(&pod))
            .map(|(pid, _)| pid)
            .collect();
        assert_eq!(shims.len(), 1, "one shim for the pod: {shims:?}");
        let killed = std::process::Command::new("kill")
            .args(["-9", &shims[0].to_string()])
            .status()
            .expect("kill");
        assert!(killed.success(), "kill -9 of the shim");
        let deadline = Instant::now() + patience(Duration::from_secs(30));
        loop {
            let (state, _) = container_state(&mut cri, &id).await;
            if state == ContainerState::ContainerExited as i32 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the container of a dead shim is still in state {state}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        cri.runtime
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .expect("StopPodSandbox after the shim died");
        cri.runtime
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .expect("RemovePodSandbox after the shim died");
        let pods = cri.pods().await.expect("ListPodSandbox");
        assert!(pods.is_empty(), "pods left: {pods:?}");
        tokio::task::spawn_blocking(move || {
            assert_no_leaks(&scope, &before, patience(Duration::from_secs(20)));
        })
        .await
        .expect("audit");
    });
}

/// A state dir that is full, then read-only: RunPodSandbox fails naming `runtime.state_dir`
/// and why, no pod is left in containerd and nothing in the state dir; with the space back a
/// pod starts.
#[test]
fn a_full_or_read_only_state_dir_fails_run_pod_sandbox_naming_it() {
    let fixture = CriFixture::new("cri-statedir", 67);
    let state = fixture.env.state.clone();
    std::fs::create_dir_all(&state).expect("mkdir state");
    let mount = move |opts: &str| {
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(&state)
            .status()
            .expect("mount");
        assert!(status.success(), "mount -o {opts}");
    };
    mount("size=64k");
    let state = fixture.env.state.clone();
    let (socket, logs) = (fixture.ctrd.socket.clone(), fixture.env.dir.join("logs"));
    let CriFixture { env, net, ctrd } = fixture;
    drive(ctrd, env, net, async move {
        let mut cri = Cri::connect(&socket).await.expect("connect");
        let fill = state.join("fill");
        // Fills it: the write ends with ENOSPC.
        let _ = std::fs::write(&fill, vec![0u8; 128 << 10]);
        let config = cri::pod_config("statefull", &logs, HashMap::new());
        let full = refused(&mut cri, &config, "a full state dir").await;
        let _ = std::fs::remove_file(&fill);
        mount("remount,ro");
        let config = cri::pod_config("stateronly", &logs, HashMap::new());
        let read_only = refused(&mut cri, &config, "a read-only state dir").await;
        for (err, why) in [(&full, "bytes free"), (&read_only, "read-only file system")] {
            assert!(
                err.message().contains("runtime.state_dir") && err.message().contains(why),
                "the error names the key and {why}: {}",
                err.message()
            );
        }
        let left: Vec<_> = std::fs::read_dir(&state)
            .expect("state dir")
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "made in the state dir: {left:?}");
        let unmounted = std::process::Command::new("umount")
            .arg(&state)
            .status()
            .expect("umount");
        assert!(unmounted.success(), "umount the state dir");
        let config = cri::pod_config("stateback", &logs, HashMap::new());
        let (pod, _ip) = run_pod(&mut cri, &config).await;
        cri.remove_pod(&pod).await.expect("remove the pod");
    });
}
