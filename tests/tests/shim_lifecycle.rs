//! The shim's lifecycle guarantees, end to end on real VMs through a real containerd (or the
//! shim's own task API where containerd never produces the race): one container per id
//! however creates race, a stop during a stalled boot that cancels it, every TaskStart before
//! its TaskExit, an exec that returns when it exits although a child it left holds its output,
//! and the VMM's death reported at once.

#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_cri::v1::{CreateContainerRequest, ExecSyncRequest, StartContainerRequest};
use pangolin_e2e::containerd::{Options, BUSYBOX_IMAGE, PANGOLIN_HANDLER, PANGOLIN_RUNTIME};
use pangolin_e2e::cri::{self, BridgeNetwork, Cri};
use pangolin_e2e::shim::{bundle, Shim};
use pangolin_e2e::{
    busybox, finish_containerd, pangolin_containerd, patience, run_bounded, stderr, TestEnv,
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

#[test]
fn two_creates_of_one_id_make_one_container_and_leave_it_intact() {
    let env = TestEnv::new("shim-twin-create");
    let ctrd = pangolin_containerd(&env, Options::default());
    let dir = bundle(
        &env.dir.join("bundle"),
        &busybox(),
        &["sh", "-c", "test -x /bin/sh && exit 42"],
    )
    .expect("bundle");
    let rt = runtime();
    rt.block_on(async {
        let shim = Shim::start(&ctrd, &env, "twin", &dir)
            .await
            .expect("start the shim");
        let (a, b) = tokio::join!(shim.create("twin"), shim.create("twin"));
        let codes: Vec<String> = [&a, &b]
            .iter()
            .map(|r| match r {
                Ok(()) => "ok".to_string(),
                Err(containerd_shim_protos::ttrpc::Error::RpcStatus(s)) => {
                    format!("{:?}", s.code())
                }
                Err(e) => format!("{e}"),
            })
            .collect();
        assert!(
            codes.contains(&"ok".to_string()) && codes.contains(&"ALREADY_EXISTS".to_string()),
            "one create wins, the other finds it: {codes:?}"
        );
        // The loser's failure must not have touched the winner's rootfs.
        shim.start_task("twin").await.expect("start");
        let status = shim.wait("twin").await.expect("wait");
        assert_eq!(status, 42, "the container's rootfs is intact");
        shim.delete("twin").await.expect("delete");
        shim.shutdown().await.expect("shutdown");
    });
    finish_containerd(ctrd, env);
}

/// A QEMU that never starts its vCPUs (`-S`): the guest never boots, the boot would wait for
/// the whole boot timeout.
fn stalled_qemu(dir: &Path) -> std::path::PathBuf {
    let script = dir.join("qemu-stalled");
    std::fs::write(&script, "#!/bin/sh\nexec qemu-system-x86_64 \"$@\" -S\n").expect("script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    script
}

#[test]
fn a_client_that_gives_up_during_a_stalled_boot_leaves_nothing_long_before_the_boot_timeout() {
    const BOOT_TIMEOUT_MS: u64 = 120_000;
    let probe = TestEnv::new("shim-stalled-boot-probe");
    let qemu = stalled_qemu(&probe.dir);
    let env = TestEnv::with("shim-stalled-boot", |c| {
        c.hypervisor.kind = pangolin_runtime_config::HypervisorKind::Qemu;
        c.hypervisor.qemu_path = qemu.clone();
        c.hypervisor.boot_timeout_ms = BOOT_TIMEOUT_MS;
    });
    let ctrd = pangolin_containerd(&env, Options::default());
    ctrd.import_busybox(&busybox(), BUSYBOX_IMAGE)
        .expect("import busybox");
    let mut ctr = ctrd
        .ctr([
            "run",
            "--rm",
            "--runtime",
            PANGOLIN_RUNTIME,
            BUSYBOX_IMAGE,
            "stalled",
            "true",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("ctr run");
    let deadline = Instant::now() + patience(Duration::from_secs(60));
    while env.vmm_pids().is_empty() {
        assert!(Instant::now() < deadline, "QEMU never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    // The client gives up: containerd cancels the create and cleans up (Delete, Shutdown).
    let gave_up = Instant::now();
    let _ = ctr.kill();
    let _ = ctr.wait();
    let limit = Duration::from_millis(BOOT_TIMEOUT_MS / 2);
    while !env.vmm_pids().is_empty() {
        assert!(
            gave_up.elapsed() < limit,
            "the stalled VM still runs {limit:?} after the client gave up (boot timeout {BOOT_TIMEOUT_MS} ms)"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "stalled VM gone {:?} after the client gave up",
        gave_up.elapsed()
    );
    let _ = run_bounded(
        ctrd.ctr(["container", "rm", "stalled"]),
        Duration::from_secs(30),
    );
    finish_containerd(ctrd, env);
    probe.finish();
}

/// The `(topic, container id)` of every task event `ctr events` printed.
fn task_events(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let topic = l.split_whitespace().find(|w| w.starts_with("/tasks/"))?;
            let json = &l[l.find('{')?..];
            let v: serde_json::Value = serde_json::from_str(json).ok()?;
            Some((topic.to_string(), v["container_id"].as_str()?.to_string()))
        })
        .collect()
}

#[test]
fn fifty_containers_that_exit_at_once_each_have_their_start_event_before_their_exit() {
    let env = TestEnv::new("shim-event-order");
    let net = BridgeNetwork::create(&env.dir.join("containerd"), "pangolin-event-order", 41)
        .expect("CNI config");
    let ctrd = pangolin_containerd(
        &env,
        Options {
            cri: true,
            ..Options::default()
        },
    );
    cri::import_images(&ctrd, &busybox()).expect("images");
    let events_file = env.dir.join("events.txt");
    let mut events = ctrd
        .ctr_in("k8s.io", ["events"])
        .stdout(std::fs::File::create(&events_file).expect("events file"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("ctr events");
    let rt = runtime();
    let socket = ctrd.socket.clone();
    let logs = env.dir.join("logs");
    let ids = rt.block_on(async move {
        let mut cri = Cri::connect(&socket).await.expect("CRI");
        let pod_config = cri::pod_config("order", &logs, Default::default());
        let pod = cri
            .run_pod(PANGOLIN_HANDLER, &pod_config)
            .await
            .expect("RunPodSandbox");
        let mut ids = Vec::new();
        for i in 0..50 {
            let config = cri::container_config(&format!("true{i}"), &["true"]);
            let id = cri
                .runtime
                .create_container(CreateContainerRequest {
                    pod_sandbox_id: pod.clone(),
                    config: Some(config),
                    sandbox_config: Some(pod_config.clone()),
                })
                .await
                .expect("CreateContainer")
                .into_inner()
                .container_id;
            ids.push(id);
        }
        let starts: Vec<_> = ids
            .iter()
            .map(|id| {
                let mut client = cri.runtime.clone();
                let id = id.clone();
                tokio::spawn(async move {
                    client
                        .start_container(StartContainerRequest { container_id: id })
                        .await
                })
            })
            .collect();
        for s in starts {
            s.await.expect("join").expect("StartContainer");
        }
        // Every exit is in the stream before the pod goes.
        let deadline = tokio::time::Instant::now() + patience(Duration::from_secs(120));
        loop {
            let seen = task_events(&std::fs::read_to_string(&events_file).unwrap_or_default());
            let exits = ids
                .iter()
                .filter(|id| seen.iter().any(|(t, c)| t == "/tasks/exit" && c == *id))
                .count();
            if exits == ids.len() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{exits} of 50 exits seen"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        cri.remove_pod(&pod).await.expect("remove pod");
        (ids, events_file)
    });
    let _ = events.kill();
    let _ = events.wait();
    let seen = task_events(&std::fs::read_to_string(&ids.1).expect("events"));
    for id in &ids.0 {
        let position = |topic: &str| seen.iter().position(|(t, c)| t == topic && c == id);
        let (start, exit) = (position("/tasks/start"), position("/tasks/exit"));
        assert!(
            matches!((start, exit), (Some(s), Some(e)) if s < e),
            "container {id}: start at {start:?}, exit at {exit:?}"
        );
    }
    finish_containerd(ctrd, env);
    drop(net);
}

#[test]
fn an_exec_that_leaves_a_child_holding_its_output_returns_when_it_exits() {
    let env = TestEnv::new("shim-exec-child");
    let net = BridgeNetwork::create(&env.dir.join("containerd"), "pangolin-exec-child", 42)
        .expect("CNI config");
    let ctrd = pangolin_containerd(
        &env,
        Options {
            cri: true,
            ..Options::default()
        },
    );
    cri::import_images(&ctrd, &busybox()).expect("images");
    let rt = runtime();
    let socket = ctrd.socket.clone();
    let logs = env.dir.join("logs");
    rt.block_on(async move {
        let mut cri = Cri::connect(&socket).await.expect("CRI");
        let pod_config = cri::pod_config("execchild", &logs, Default::default());
        let pod = cri
            .run_pod(PANGOLIN_HANDLER, &pod_config)
            .await
            .expect("RunPodSandbox");
        let config = cri::container_config("sleeper", &["sleep", "3600"]);
        let id = cri
            .runtime
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(config),
                sandbox_config: Some(pod_config.clone()),
            })
            .await
            .expect("CreateContainer")
            .into_inner()
            .container_id;
        cri.runtime
            .start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .expect("StartContainer");
        // The child outlives any bound here: an ExecSync that waits for it never returns.
        let t = Instant::now();
        let exec = cri.runtime.exec_sync(ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec!["sh".into(), "-c".into(), "sleep 3600 & echo out".into()],
            timeout: 30,
        });
        let resp = tokio::time::timeout(patience(Duration::from_secs(60)), exec)
            .await
            .expect("ExecSync returns although `sleep` holds the exec's stdout")
            .expect("ExecSync")
            .into_inner();
        eprintln!("ExecSync returned after {:?}", t.elapsed());
        assert_eq!(String::from_utf8_lossy(&resp.stdout), "out\n");
        assert_eq!(resp.exit_code, 0);
        cri.remove_pod(&pod).await.expect("remove pod");
    });
    finish_containerd(ctrd, env);
    drop(net);
}

#[test]
fn the_vmms_death_reaches_containerd_as_task_exit_at_once() {
    let env = TestEnv::new("shim-vmm-death");
    let ctrd = pangolin_containerd(&env, Options::default());
    ctrd.import_busybox(&busybox(), BUSYBOX_IMAGE)
        .expect("import busybox");
    let events_file = env.dir.join("events.txt");
    let mut events = ctrd
        .ctr(["events"])
        .stdout(std::fs::File::create(&events_file).expect("events file"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("ctr events");
    let out = run_bounded(
        ctrd.ctr([
            "run",
            "-d",
            "--runtime",
            PANGOLIN_RUNTIME,
            BUSYBOX_IMAGE,
            "doomed",
            "sleep",
            "1000",
        ]),
        Duration::from_secs(180),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let vmm = env.vmm_pids();
    assert_eq!(vmm.len(), 1, "one VMM");
    let killed = std::time::SystemTime::now();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(vmm[0]).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    );
    let deadline = Instant::now() + patience(Duration::from_secs(60));
    let line = loop {
        let text = std::fs::read_to_string(&events_file).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains("/tasks/exit")) {
            break l.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no TaskExit after the VMM was killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = events.kill();
    let _ = events.wait();
    assert!(
        line.contains("\"exit_status\":137"),
        "{line}\n{}",
        ctrd.log_tail(40)
    );
    // containerd stamps the envelope when it receives the event: `YYYY-MM-DD HH:MM:SS.frac`.
    let mut words = line.split_whitespace();
    let stamp = format!(
        "{}T{}Z",
        words.next().unwrap_or(""),
        words.next().unwrap_or("")
    );
    let latency = humantime::parse_rfc3339(&stamp)
        .ok()
        .and_then(|t| t.duration_since(killed).ok())
        .map_or_else(|| "unknown".to_string(), |d| format!("{d:?}"));
    eprintln!("TaskExit reached containerd {latency} after the VMM was killed ({stamp})");
    let _ = run_bounded(
        ctrd.ctr(["task", "delete", "doomed"]),
        Duration::from_secs(30),
    );
    let _ = run_bounded(
        ctrd.ctr(["container", "rm", "doomed"]),
        Duration::from_secs(30),
    );
    finish_containerd(ctrd, env);
}
