//! Unit tests of the pod lifecycle, without a VM: the fakes of [`super::fakes`] stand in for
//! the agent, the VM launcher and the host mounts.

use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_shim::protos::api::Status;
use pangolin_runtime_config::Config;

use super::events::recorder::Recorder;
use super::events::{Event, Events};
use super::fakes::{BootMode, FakeGuest, FakeLauncher, FakeMounts};
use super::io::StdioPaths;
use super::pod::{Deps, Pod};
use super::PodError;

const POD: &str = "pod";

static BUNDLES: AtomicU32 = AtomicU32::new(0);

struct Harness {
    pod: Arc<Pod>,
    launcher: Arc<FakeLauncher>,
    mounts: Arc<FakeMounts>,
    rec: Recorder,
    bundle: PathBuf,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.bundle);
    }
}

fn harness(mode: BootMode) -> Harness {
    harness_with(mode, Duration::from_secs(5))
}

fn harness_with(mode: BootMode, drain: Duration) -> Harness {
    let n = BUNDLES.fetch_add(1, Ordering::Relaxed);
    let bundle = std::env::temp_dir().join(format!("pangolin-pod-test-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&bundle).expect("bundle dir");
    std::fs::write(
        bundle.join("config.json"),
        r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"hostname":"pod1",
            "process":{"cwd":"/","args":["sh"],"user":{"uid":0,"gid":0}},
            "linux":{"namespaces":[{"type":"pid"},{"type":"ipc"},
                                       {"type":"network","path":"/var/run/netns/test"}]}}"#,
    )
    .expect("config.json");
    let launcher = FakeLauncher::new(mode);
    let mounts = FakeMounts::new(&bundle.join("shared"));
    let rec = Recorder::default();
    let deps = Deps {
        launcher: launcher.clone(),
        mounts: mounts.clone(),
        output_drain_bound: drain,
    };
    let pod = Pod::with(POD, Ok(Config::default()), Events::start(rec.clone()), deps);
    Harness {
        pod,
        launcher,
        mounts,
        rec,
        bundle,
    }
}

impl Harness {
    async fn create(&self, id: &str) -> Result<(), PodError> {
        let bundle = self.bundle.display().to_string();
        self.pod
            .create(id, &bundle, &[], StdioPaths::default())
            .await
    }

    fn guest(&self) -> &FakeGuest {
        &self.launcher.guest
    }

    /// Published events once `done` holds for them (bounded).
    async fn events_until(&self, done: impl Fn(&[Event]) -> bool) -> Vec<Event> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let events = self.rec.events();
            if done(&events) || Instant::now() > deadline {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// The event kinds of `events` for container `id`, in order.
fn kinds(events: &[Event], id: &str) -> Vec<&'static str> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Create(e) if e.container_id == id => Some("create"),
            Event::Start(e) if e.container_id == id => Some("start"),
            Event::Exit(e) if e.container_id == id => Some("exit"),
            Event::ExecAdded(e) if e.container_id == id => Some("exec_added"),
            Event::ExecStarted(e) if e.container_id == id => Some("exec_started"),
            Event::Paused(e) if e.container_id == id => Some("paused"),
            Event::Resumed(e) if e.container_id == id => Some("resumed"),
            Event::Oom(e) if e.container_id == id => Some("oom"),
            Event::Delete(e) if e.container_id == id => Some("delete"),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_container_runs_through_create_start_exit_delete_with_events_in_order() {
    let h = harness(BootMode::Immediate);
    h.create(POD).await.expect("create");
    assert_eq!(h.launcher.boots.load(Ordering::Relaxed), 1);
    assert_eq!(h.pod.view(POD, "").expect("view").status, Status::CREATED);
    let pid = h.pod.start(POD, "").await.expect("start");
    let view = h.pod.view(POD, "").expect("view");
    assert_eq!((view.status, view.pid), (Status::RUNNING, Some(pid)));
    assert!(
        matches!(h.pod.delete(POD, "").await, Err(PodError::State(_))),
        "running"
    );
    h.guest().exit(POD, "", 3);
    let exit = h.pod.wait(POD, "").await.expect("wait");
    assert_eq!(exit.status, 3);
    let (dpid, dexit) = h.pod.delete(POD, "").await.expect("delete");
    assert_eq!((dpid, dexit.status), (pid, 3));
    let events = h.events_until(|e| kinds(e, POD).len() >= 4).await;
    assert_eq!(kinds(&events, POD), ["create", "start", "exit", "delete"]);
    assert!(matches!(h.pod.view(POD, ""), Err(PodError::NotFound(_))));
    assert_eq!(
        h.launcher.shutdowns.load(Ordering::Relaxed),
        1,
        "deleting the pod's container stops the VM"
    );
    assert_eq!(h.mounts.count("remove_shared"), 1);
    assert!(
        matches!(h.create("late").await, Err(PodError::Stopped)),
        "no VM after the stop"
    );
}

#[tokio::test]
async fn processes_that_exit_at_once_never_have_their_exit_before_their_start() {
    let h = harness(BootMode::Immediate);
    h.create(POD).await.expect("create");
    h.pod.start(POD, "").await.expect("start");
    *h.guest()
        .exit_at_once
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(0);
    let ids: Vec<String> = (0..50).map(|i| format!("c{i}")).collect();
    for id in &ids {
        h.create(id).await.expect("create");
    }
    let starts = ids.iter().map(|id| {
        let pod = h.pod.clone();
        let id = id.clone();
        tokio::spawn(async move { pod.start(&id, "").await })
    });
    for s in starts.collect::<Vec<_>>() {
        s.await.expect("join").expect("start");
    }
    let events = h
        .events_until(|e| ids.iter().all(|id| kinds(e, id).len() >= 3))
        .await;
    for id in &ids {
        assert_eq!(kinds(&events, id), ["create", "start", "exit"], "{id}");
    }
}

#[tokio::test]
async fn two_creates_with_one_id_reach_the_guest_once() {
    let h = harness(BootMode::Immediate);
    h.create(POD).await.expect("create");
    // A slow CreateContainer widens the window between the id check and the insert.
    *h.guest()
        .create_delay
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Duration::from_millis(200);
    let (a, b) = tokio::join!(h.create("twin"), h.create("twin"));
    let results = [a, b];
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    assert!(
        results
            .iter()
            .any(|r| matches!(r, Err(PodError::Exists(_)))),
        "{results:?}"
    );
    assert_eq!(h.guest().count("create"), 2, "the pod's and one twin");
    assert!(matches!(h.create("twin").await, Err(PodError::Exists(_))));
}

#[tokio::test]
async fn a_stop_during_a_hung_boot_cancels_it_within_a_second() {
    let h = harness(BootMode::Hang);
    let pod = h.pod.clone();
    let bundle = h.bundle.display().to_string();
    let create =
        tokio::spawn(async move { pod.create(POD, &bundle, &[], StdioPaths::default()).await });
    while h.launcher.boots.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = Instant::now();
    assert!(
        h.pod.shutdown().await,
        "no container exists: the shim may exit"
    );
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "stop took {:?}",
        t.elapsed()
    );
    assert!(
        h.launcher.cancelled.load(Ordering::Relaxed),
        "the boot saw its cancel"
    );
    let result = tokio::time::timeout(Duration::from_secs(1), create)
        .await
        .expect("create returns")
        .expect("join");
    assert!(matches!(result, Err(PodError::Stopped)), "{result:?}");
    assert!(
        matches!(h.pod.view(POD, ""), Err(PodError::NotFound(_))),
        "no reservation left"
    );
    assert_eq!(h.mounts.count("remove_shared"), 1);
}

#[tokio::test]
async fn deleting_the_pods_container_while_its_vm_boots_cancels_the_boot() {
    let h = harness(BootMode::Hang);
    let pod = h.pod.clone();
    let bundle = h.bundle.display().to_string();
    let create =
        tokio::spawn(async move { pod.create(POD, &bundle, &[], StdioPaths::default()).await });
    while h.launcher.boots.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let deleted = tokio::time::timeout(Duration::from_secs(1), h.pod.delete(POD, "")).await;
    assert!(
        matches!(deleted, Ok(Err(PodError::NotFound(_)))),
        "{deleted:?}"
    );
    assert!(h.launcher.cancelled.load(Ordering::Relaxed));
    let result = create.await.expect("join");
    assert!(matches!(result, Err(PodError::Stopped)), "{result:?}");
}

#[tokio::test]
async fn a_failed_boot_fails_the_create_leaves_no_reservation_and_may_be_retried() {
    let h = harness(BootMode::Fail);
    let err = h.create(POD).await.expect_err("boot fails");
    assert!(err.to_string().contains("fake boot fails"), "{err}");
    assert_eq!(
        h.mounts.count("remove_shared"),
        1,
        "the share goes with the failed boot"
    );
    *h.launcher.mode.lock().unwrap_or_else(|p| p.into_inner()) = BootMode::Immediate;
    h.create(POD).await.expect("the retry boots");
    assert_eq!(h.launcher.boots.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn the_vmms_death_ends_every_process_with_137_and_the_pod_stays_dead() {
    let h = harness(BootMode::Immediate);
    h.create(POD).await.expect("create");
    h.pod.start(POD, "").await.expect("start");
    h.create("c1").await.expect("create c1");
    h.pod.start("c1", "").await.expect("start c1");
    h.pod
        .add_exec("c1", "e1", "{}".into(), StdioPaths::default())
        .expect("exec");
    h.pod.start("c1", "e1").await.expect("start e1");
    h.create("c2").await.expect("created, never started");
    h.launcher.kill_vmm();
    for (id, exec) in [(POD, ""), ("c1", ""), ("c1", "e1"), ("c2", "")] {
        let exit = tokio::time::timeout(Duration::from_secs(1), h.pod.wait(id, exec))
            .await
            .expect("exit within a second")
            .expect("wait");
        assert_eq!(exit.status, 137, "{id}/{exec}");
    }
    let events = h
        .events_until(|e| kinds(e, "c1").iter().filter(|k| **k == "exit").count() >= 2)
        .await;
    assert_eq!(
        kinds(&events, "c1"),
        [
            "create",
            "start",
            "exec_added",
            "exec_started",
            "exit",
            "exit"
        ]
    );
    assert_eq!(
        kinds(&events, "c2"),
        ["create", "exit"],
        "a created init exits too"
    );
    assert_eq!(
        h.launcher.shutdowns.load(Ordering::Relaxed),
        1,
        "what the VM left is torn down"
    );
    assert!(matches!(h.create("c3").await, Err(PodError::VmGone(_))));
    assert!(matches!(
        h.pod.start("c2", "").await,
        Err(PodError::VmGone(_))
    ));
}

#[tokio::test]
async fn kill_reaches_running_processes_counts_for_created_ones_and_finds_no_exited_one() {
    let h = harness(BootMode::Immediate);
    h.create(POD).await.expect("create");
    h.pod
        .kill(POD, "", 9, false)
        .await
        .expect("kill a created init");
    assert_eq!(h.pod.wait(POD, "").await.expect("wait").status, 137);
    assert!(matches!(
        h.pod.kill(POD, "", 9, false).await,
        Err(PodError::Finished)
    ));
    assert_eq!(
        PodError::Finished.code(),
        containerd_shim::protos::ttrpc::Code::NOT_FOUND
    );
    h.pod
        .kill(POD, "", 9, true)
        .await
        .expect("kill --all of an exited init is fine");
    h.create("c1").await.expect("create");
    h.pod.start("c1", "").await.expect("start");
    h.pod.kill("c1", "", 15, false).await.expect("kill");
    assert_eq!(h.pod.wait("c1", "").await.expect("wait").status, 143);
    assert_eq!(
        h.guest().count("signal"),
        2,
        "created init: no guest signal"
    );
}

#[tokio::test]
async fn execs_start_exit_and_delete_and_need_a_running_init() {
    let h = harness(BootMode::Immediate);
    h.create(POD).await.expect("create");
    let refused = h
        .pod
        .add_exec(POD, "e1", "{}".into(), StdioPaths::default());
    assert!(matches!(refused, Err(PodError::State(_))), "{refused:?}");
    h.pod.start(POD, "").await.expect("start");
    h.pod
        .add_exec(POD, "e1", "{}".into(), StdioPaths::default())
        .expect("exec");
    assert!(matches!(
        h.pod
            .add_exec(POD, "e1", "{}".into(), StdioPaths::default()),
        Err(PodError::Exists(_))
    ));
    assert!(
        matches!(
            h.pod.kill(POD, "e1", 9, false).await,
            Err(PodError::State(_))
        ),
        "not started"
    );
    let pid = h.pod.start(POD, "e1").await.expect("start e1");
    assert!(
        matches!(h.pod.start(POD, "e1").await, Err(PodError::State(_))),
        "started twice"
    );
    assert!(
        matches!(h.pod.delete(POD, "e1").await, Err(PodError::State(_))),
        "running"
    );
    h.guest().exit(POD, "e1", 7);
    assert_eq!(h.pod.wait(POD, "e1").await.expect("wait").status, 7);
    assert_eq!(h.pod.delete(POD, "e1").await.expect("delete").0, pid);
    assert!(matches!(h.pod.view(POD, "e1"), Err(PodError::NotFound(_))));
    let events = h.events_until(|e| kinds(e, POD).contains(&"exit")).await;
    assert_eq!(
        kinds(&events, POD),
        ["create", "start", "exec_added", "exec_started", "exit"]
    );
    let Some(Event::Exit(exit)) = events.iter().find(|e| matches!(e, Event::Exit(_))) else {
        panic!("no exit");
    };
    assert_eq!(
        (exit.id.as_str(), exit.pid, exit.exit_status),
        ("e1", pid, 7)
    );
}

#[tokio::test]
async fn pause_and_resume_follow_the_state_and_publish_events() {
    let h = harness(BootMode::Immediate);
    h.create(POD).await.expect("create");
    assert!(
        matches!(h.pod.set_paused(POD, true).await, Err(PodError::State(_))),
        "not running"
    );
    h.pod.start(POD, "").await.expect("start");
    h.pod.set_paused(POD, true).await.expect("pause");
    assert_eq!(h.pod.view(POD, "").expect("view").status, Status::PAUSED);
    assert!(
        matches!(h.pod.set_paused(POD, true).await, Err(PodError::State(_))),
        "twice"
    );
    h.pod.set_paused(POD, false).await.expect("resume");
    assert_eq!(h.pod.view(POD, "").expect("view").status, Status::RUNNING);
    let events = h.events_until(|e| kinds(e, POD).contains(&"resumed")).await;
    assert_eq!(
        kinds(&events, POD),
        ["create", "start", "paused", "resumed"]
    );
}

/// A harness whose pod's init writes to a stdout FIFO (read by us, as containerd would) and
/// whose guest keeps that stream open after the exit until `gate` opens.
async fn started_with_gated_output(
    drain: Duration,
) -> (Harness, Arc<tokio::sync::Notify>, std::fs::File) {
    let h = harness_with(BootMode::Immediate, drain);
    let gate = Arc::new(tokio::sync::Notify::new());
    *h.guest()
        .output_gate
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(gate.clone());
    let fifo = h.bundle.join("stdout");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .expect("open fifo");
    let stdio = StdioPaths {
        stdout: fifo.display().to_string(),
        ..StdioPaths::default()
    };
    let bundle = h.bundle.display().to_string();
    h.pod
        .create(POD, &bundle, &[], stdio)
        .await
        .expect("create");
    h.pod.start(POD, "").await.expect("start");
    (h, gate, reader)
}

#[tokio::test]
async fn the_exit_is_published_once_the_agent_ends_the_output() {
    let (h, gate, _reader) = started_with_gated_output(Duration::from_secs(30)).await;
    h.guest().exit(POD, "", 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        kinds(&h.rec.events(), POD),
        ["create", "start"],
        "exit held while output flows"
    );
    assert_eq!(h.pod.view(POD, "").expect("view").status, Status::RUNNING);
    gate.notify_waiters();
    let events = h.events_until(|e| kinds(e, POD).contains(&"exit")).await;
    assert_eq!(kinds(&events, POD), ["create", "start", "exit"]);
}

#[tokio::test]
async fn a_guest_that_never_ends_the_output_delays_the_exit_only_by_the_bound() {
    let (h, _gate, _reader) = started_with_gated_output(Duration::from_millis(200)).await;
    h.guest().exit(POD, "", 0);
    let t = Instant::now();
    let exit = tokio::time::timeout(Duration::from_secs(2), h.pod.wait(POD, ""))
        .await
        .expect("exit despite the open stream")
        .expect("wait");
    assert_eq!(exit.status, 0);
    assert!(
        t.elapsed() >= Duration::from_millis(150),
        "the bound was waited: {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn oom_kills_in_the_guest_become_oom_events() {
    let h = harness(BootMode::Immediate);
    h.create(POD).await.expect("create");
    h.guest().oom(POD);
    let events = h.events_until(|e| kinds(e, POD).contains(&"oom")).await;
    assert_eq!(kinds(&events, POD), ["create", "oom"]);
}

#[tokio::test]
async fn a_create_whose_request_is_dropped_still_completes() {
    let h = harness(BootMode::Slow);
    let pod = h.pod.clone();
    let bundle = h.bundle.display().to_string();
    // The client's deadline passes while the VM boots: ttrpc drops the handler.
    let dropped = tokio::time::timeout(
        Duration::from_millis(50),
        super::task::to_completion(async move {
            pod.create(POD, &bundle, &[], StdioPaths::default()).await
        }),
    )
    .await;
    assert!(dropped.is_err(), "the request was given up");
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.pod.view(POD, "").is_err() {
        assert!(Instant::now() < deadline, "the create never completed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(h.pod.view(POD, "").expect("view").status, Status::CREATED);
    assert!(matches!(h.create(POD).await, Err(PodError::Exists(_))));
    assert_eq!(h.launcher.boots.load(Ordering::Relaxed), 1);
}

/// Rewrites the harness's config.json with `hooks` (shell scripts, keyed by phase).
fn with_hooks(h: &Harness, hooks: &[(&str, String)]) {
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(h.bundle.join("config.json")).expect("config.json"))
            .expect("json");
    for (phase, script) in hooks {
        spec["hooks"][*phase] =
            serde_json::json!([{ "path": "/bin/sh", "args": ["sh", "-c", script] }]);
    }
    std::fs::write(h.bundle.join("config.json"), spec.to_string()).expect("config.json");
}

#[tokio::test]
async fn host_hooks_run_at_create_start_and_delete_in_order() {
    let h = harness(BootMode::Immediate);
    let log = h.bundle.join("hooks.log");
    let append = |what: &str| format!("echo {what} >> {}", log.display());
    with_hooks(
        &h,
        &[
            ("prestart", append("prestart")),
            ("createRuntime", append("createRuntime")),
            ("createContainer", append("createContainer")),
            ("poststart", append("poststart")),
            ("poststop", append("poststop")),
        ],
    );
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    h.create(POD).await.expect("create");
    assert_eq!(read(), "prestart\ncreateRuntime\ncreateContainer\n");
    h.pod.start(POD, "").await.expect("start");
    assert!(
        read().ends_with("createContainer\npoststart\n"),
        "{}",
        read()
    );
    h.guest().exit(POD, "", 0);
    h.pod.wait(POD, "").await.expect("wait");
    h.pod.delete(POD, "").await.expect("delete");
    assert!(read().ends_with("poststart\npoststop\n"), "{}", read());
}

#[tokio::test]
async fn a_failed_create_hook_fails_the_create_and_undoes_it() {
    let h = harness(BootMode::Immediate);
    with_hooks(&h, &[("createRuntime", "echo denied >&2; exit 1".into())]);
    let err = h.create(POD).await.expect_err("the hook fails the create");
    assert!(matches!(err, PodError::Hook(_)), "{err}");
    assert!(
        err.chain().contains("hooks.createRuntime[0]"),
        "{}",
        err.chain()
    );
    assert!(err.chain().contains("denied"), "{}", err.chain());
    assert_eq!(
        h.guest().count("remove"),
        1,
        "the guest's container is removed"
    );
    assert_eq!(h.mounts.count("unmount"), 1, "its rootfs is unmounted");
    assert!(matches!(h.pod.view(POD, ""), Err(PodError::NotFound(_))));
}

#[tokio::test]
async fn a_failed_poststart_hook_kills_the_container_and_fails_the_start() {
    let h = harness(BootMode::Immediate);
    with_hooks(&h, &[("poststart", "exit 2".into())]);
    h.create(POD).await.expect("create");
    let err = h
        .pod
        .start(POD, "")
        .await
        .expect_err("the hook fails the start");
    assert!(
        err.chain().contains("hooks.poststart[0]"),
        "{}",
        err.chain()
    );
    let exit = h.pod.wait(POD, "").await.expect("wait");
    assert_eq!(exit.status, 137, "killed");
}

#[tokio::test]
async fn a_malformed_hook_is_refused_before_anything_boots() {
    let h = harness(BootMode::Immediate);
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(h.bundle.join("config.json")).expect("config.json"))
            .expect("json");
    spec["hooks"]["poststop"] = serde_json::json!([{ "path": "relative/hook" }]);
    std::fs::write(h.bundle.join("config.json"), spec.to_string()).expect("config.json");
    let err = h.create(POD).await.expect_err("refused");
    assert_eq!(
        err.code(),
        containerd_shim::protos::ttrpc::Code::INVALID_ARGUMENT
    );
    assert!(
        err.chain().contains("hooks.poststop[0].path"),
        "{}",
        err.chain()
    );
    assert_eq!(
        h.launcher.boots.load(Ordering::Relaxed),
        0,
        "nothing booted"
    );
}
