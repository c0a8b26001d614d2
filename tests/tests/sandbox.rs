//! The agent API end to end through the host library: one sandbox (real VM, either backend), a
//! long-running container, and exec, pause/resume, stats, update, process list and removal.

#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pangolin_e2e::{busybox, TestEnv};
use pangolin_protocols::GUEST_SHARED_DIR;
use pangolin_shim::agent::AgentClient;
use pangolin_shim::sandbox::Sandbox;
use pangolin_shim::spec::{container_spec, exec_process, RunSpec};

const ID: &str = "c1";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Collects init's stdout continuously, each chunk with its arrival time.
fn collect_output(agent: AgentClient) -> Arc<Mutex<Vec<(Instant, String)>>> {
    let chunks = Arc::new(Mutex::new(Vec::new()));
    let sink = chunks.clone();
    tokio::spawn(async move {
        while let Ok(Some(data)) = agent.read_output(ID, "", false).await {
            sink.lock()
                .expect("lock")
                .push((Instant::now(), String::from_utf8_lossy(&data).into_owned()));
        }
    });
    chunks
}

/// Output that arrived after `since`.
fn output_since(chunks: &Mutex<Vec<(Instant, String)>>, since: Instant) -> String {
    chunks
        .lock()
        .expect("lock")
        .iter()
        .filter(|(t, _)| *t > since)
        .map(|(_, s)| s.as_str())
        .collect()
}

/// Waits until output after `since` contains `want`.
async fn wait_output(chunks: &Mutex<Vec<(Instant, String)>>, since: Instant, want: &str) -> bool {
    for _ in 0..400 {
        if output_since(chunks, since).contains(want) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn exec(
    agent: &AgentClient,
    exec_id: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> (String, i32) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let process =
        serde_json::to_string(&exec_process(&args, false, &[]).expect("process")).expect("json");
    agent
        .exec_process(ID, exec_id, process, stdin.is_some())
        .await
        .expect("exec");
    if let Some(data) = stdin {
        agent
            .write_stdin(ID, exec_id, data.to_vec())
            .await
            .expect("stdin");
        agent.close_stdin(ID, exec_id).await.expect("close stdin");
    }
    let mut out = String::new();
    while let Some(data) = agent.read_output(ID, exec_id, false).await.expect("read") {
        out.push_str(&String::from_utf8_lossy(&data));
    }
    let status = agent.wait(ID, exec_id).await.expect("wait").exit_status;
    agent
        .remove_process(ID, exec_id)
        .await
        .expect("remove process");
    (out, status)
}

#[test]
fn exec_pause_resume_stats_update_and_remove() {
    let env = TestEnv::new("sandbox");
    runtime().block_on(async {
        let sandbox = Sandbox::start("s1", &env.config, Some(&busybox()))
            .await
            .expect("boot");
        assert_eq!(sandbox.details.api_version, pangolin_protocols::API_VERSION);
        assert!(sandbox.details.kernel_release.ends_with("-pangolin"));
        let agent = sandbox.agent().clone();

        // A container that ticks every 100 ms.
        let spec = container_spec(&RunSpec {
            args: vec![
                "sh".into(),
                "-c".into(),
                "i=0; while true; do i=$((i+1)); echo tick$i; sleep 0.1; done".into(),
            ],
            memory_limit_mib: Some(64),
            ..Default::default()
        })
        .expect("spec");
        agent
            .create_container(
                ID,
                serde_json::to_string(&spec).expect("json"),
                GUEST_SHARED_DIR,
                false,
            )
            .await
            .expect("create");
        let init_pid = agent.start_container(ID).await.expect("start");
        assert!(init_pid > 1);
        let output = collect_output(agent.clone());
        let t0 = Instant::now() - Duration::from_secs(1);
        assert!(
            wait_output(&output, t0, "tick2").await,
            "no ticks: {}",
            output_since(&output, t0)
        );

        // A second process in the running container, with stdin.
        let (out, status) = exec(
            &agent,
            "e1",
            &["sh", "-c", "cat; echo pid1=$(cat /proc/1/comm)"],
            Some(b"via stdin\n"),
        )
        .await;
        assert_eq!(status, 0);
        assert_eq!(out, "via stdin\npid1=sh\n");
        let (_, status) = exec(&agent, "e2", &["sh", "-c", "exit 3"], None).await;
        assert_eq!(status, 3);
        let true_json =
            serde_json::to_string(&exec_process(&["true".to_string()], false, &[]).expect("p"))
                .expect("json");
        let dup = agent.exec_process(ID, "e3", true_json.clone(), false).await;
        dup.expect("exec e3");
        let again = agent.exec_process(ID, "e3", true_json.clone(), false).await;
        assert!(
            again.is_err(),
            "an exec id cannot be used twice while it exists"
        );
        agent.wait(ID, "e3").await.expect("wait e3");

        // Processes and stats come from the container's cgroup in the guest.
        let pids = agent.pids(ID).await.expect("pids");
        assert!(pids.contains(&init_pid), "{pids:?} lacks init {init_pid}");
        let stats = agent.stats(ID).await.expect("stats");
        assert!(stats.memory.usage_bytes > 0, "{stats:?}");
        assert_eq!(stats.memory.limit_bytes, 64 * 1024 * 1024);
        assert!(stats.cpu.usage_usec > 0);
        assert!(stats.pids.current >= 1);

        // Pause freezes the container: no ticks while paused, ticks again after resume.
        agent.pause(ID).await.expect("pause");
        // Output already in flight may still arrive for a moment; after that, silence.
        let settled = Instant::now() + pangolin_e2e::patience(Duration::from_millis(500));
        tokio::time::sleep(pangolin_e2e::patience(Duration::from_millis(2000))).await;
        assert_eq!(output_since(&output, settled), "", "output while paused");
        assert!(
            agent.pause(ID).await.is_err(),
            "pausing twice is a state error"
        );
        let resumed = Instant::now();
        agent.resume(ID).await.expect("resume");
        assert!(
            wait_output(&output, resumed, "tick").await,
            "no ticks after resume"
        );

        // Update applies new limits in the guest.
        agent
            .update(
                ID,
                r#"{"memory":{"limit":134217728},"pids":{"limit":100}}"#.into(),
            )
            .await
            .expect("update");
        let stats = agent.stats(ID).await.expect("stats");
        assert_eq!(stats.memory.limit_bytes, 128 * 1024 * 1024);
        assert_eq!(stats.pids.limit, 100);
        let bad = agent
            .update(ID, "{not json".into())
            .await
            .expect_err("bad json");
        assert!(bad.to_string().contains("resources_json"), "{bad}");

        // SIGKILL ends init with 137; removal frees the id.
        agent.signal(ID, "", 9, false).await.expect("kill");
        assert_eq!(agent.wait(ID, "").await.expect("wait").exit_status, 137);
        agent.remove_container(ID).await.expect("remove");
        assert!(agent.stats(ID).await.is_err(), "removed container is gone");
        sandbox.shutdown().await;
    });
    env.finish();
}

#[test]
fn bad_requests_get_errors_naming_the_field() {
    let env = TestEnv::new("badreq");
    runtime().block_on(async {
        let sandbox = Sandbox::start("s2", &env.config, Some(&busybox()))
            .await
            .expect("boot");
        let agent = sandbox.agent().clone();
        let err = agent
            .create_container("../escape", "{}".into(), GUEST_SHARED_DIR, false)
            .await
            .expect_err("bad id");
        assert!(err.to_string().contains("invalid id"), "{err}");
        let err = agent
            .create_container("c", "{oops".into(), GUEST_SHARED_DIR, false)
            .await
            .expect_err("bad spec");
        assert!(err.to_string().contains("oci_spec_json"), "{err}");
        let err = agent
            .create_container("c", "{}".into(), "/nonexistent", false)
            .await
            .expect_err("bad rootfs");
        assert!(err.to_string().contains("rootfs"), "{err}");
        let err = agent.start_container("missing").await.expect_err("missing");
        assert_eq!(err.code(), Some(ttrpc::Code::NOT_FOUND), "{err}");
        sandbox.shutdown().await;
    });
    env.finish();
}

#[test]
fn the_oci_spec_is_enforced_in_the_guest() {
    let env = TestEnv::new("ocispec");
    let script = "id -u; id -G; hostname; ulimit -n; \
                  grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status | tr -s '\\t' ' '; \
                  mkdir /tmp/x 2>/dev/null && echo mkdir-allowed || echo mkdir-denied; \
                  ls /tmp/x 2>/dev/null; cat /sys/fs/cgroup/pids.max";
    let base = container_spec(&RunSpec {
        args: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    })
    .expect("spec");
    let mut spec = serde_json::to_value(&base).expect("json");
    spec["hostname"] = "box".into();
    spec["process"]["user"] =
        serde_json::json!({"uid": 65534, "gid": 65534, "additionalGids": [1234]});
    spec["process"]["rlimits"] =
        serde_json::json!([{"type": "RLIMIT_NOFILE", "hard": 123, "soft": 123}]);
    spec["process"]["capabilities"] = serde_json::json!({"bounding": [], "effective": [], "permitted": [], "inheritable": [], "ambient": []});
    spec["process"]["noNewPrivileges"] = true.into();
    spec["mounts"].as_array_mut().expect("mounts").push(
        serde_json::json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["mode=1777"]}),
    );
    spec["linux"]["resources"] = serde_json::json!({"pids": {"limit": 42}});
    spec["linux"]["seccomp"] = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    runtime().block_on(async {
        let sandbox = Sandbox::start("s3", &env.config, Some(&busybox()))
            .await
            .expect("boot");
        let agent = sandbox.agent().clone();
        agent
            .create_container(ID, spec.to_string(), GUEST_SHARED_DIR, false)
            .await
            .expect("create");
        agent.start_container(ID).await.expect("start");
        let mut out = String::new();
        while let Some(data) = agent.read_output(ID, "", false).await.expect("read") {
            out.push_str(&String::from_utf8_lossy(&data));
        }
        let status = agent.wait(ID, "").await.expect("wait").exit_status;
        assert_eq!(
            out,
            "65534\n65534 1234\nbox\n123\nCapEff: 0000000000000000\nCapBnd: 0000000000000000\n\
             NoNewPrivs: 1\nSeccomp: 2\nmkdir-denied\n42\n",
            "exit {status}"
        );
        agent.remove_container(ID).await.expect("remove");
        sandbox.shutdown().await;
    });
    env.finish();
}
