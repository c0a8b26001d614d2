//! OCI hooks through a real containerd: `ctr run --config SPEC` with a spec that carries every
//! kind of hook, on runc (the reference) and on pangolin. The host hooks (`prestart`,
//! `createRuntime`, `createContainer`, `poststart`, `poststop`) write marker files on the host
//! in their order, each with the state JSON it read on stdin; `startContainer` runs in the
//! container, from its filesystem. A failing `createRuntime` hook fails the run, naming the
//! hook, and leaves nothing behind.

#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

use std::path::Path;

use pangolin_e2e::containerd::{PrivateContainerd, PANGOLIN_RUNTIME};
use pangolin_e2e::ctr::{containerd, ctr};
use pangolin_e2e::{busybox, finish_containerd, stderr, stdout, TestEnv};

const RUNC_RUNTIME: &str = "io.containerd.runc.v2";

/// The host hooks, in the order they must run.
const HOST_PHASES: [&str; 5] = [
    "prestart",
    "createRuntime",
    "createContainer",
    "poststart",
    "poststop",
];

/// A hook that appends its phase to `dir/order` and keeps its state JSON, and the name of
/// the process its state's pid names, in `dir/<phase>.json` and `dir/<phase>.comm`.
fn recording_hook(dir: &Path, phase: &str) -> serde_json::Value {
    let d = dir.display();
    let script = format!(
        "state=$(cat); echo {phase} >> {d}/order; printf '%s' \"$state\" > {d}/{phase}.json; \
         pid=$(printf '%s' \"$state\" | sed -n 's/.*\"pid\":\\([0-9]*\\).*/\\1/p'); \
         cat /proc/$pid/comm > {d}/{phase}.comm 2>/dev/null || true"
    );
    serde_json::json!({ "path": "/bin/sh", "args": ["sh", "-c", script], "timeout": 30 })
}

/// `ctr oci spec`, made to run `args` from a read-only busybox root with a tmpfs `/tmp`,
/// carrying `hooks`, in a cgroup named for container `id` (`ctr oci spec` gives every spec
/// the namespace's one cgroup, and a pod needs one of its own).
fn spec(
    ctrd: &PrivateContainerd,
    id: &str,
    args: &[&str],
    hooks: serde_json::Value,
) -> serde_json::Value {
    let text = ctrd.ctr_output(["oci", "spec"]).expect("ctr oci spec");
    let mut spec: serde_json::Value = serde_json::from_str(&text).expect("spec JSON");
    spec["process"]["args"] = serde_json::json!(args);
    spec["process"]["terminal"] = false.into();
    spec["process"]["env"] = serde_json::json!(["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]);
    spec["root"] = serde_json::json!({ "path": busybox(), "readonly": true });
    spec["mounts"]
        .as_array_mut()
        .expect("mounts")
        .push(serde_json::json!({
            "destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
            "options": ["nosuid", "nodev", "mode=1777"],
        }));
    spec["hooks"] = hooks;
    spec["linux"]["cgroupsPath"] = format!("/pangolin-test/{id}").into();
    spec
}

fn run_with_spec(
    ctrd: &PrivateContainerd,
    env: &TestEnv,
    runtime: &str,
    id: &str,
    spec: &serde_json::Value,
) -> std::process::Output {
    let file = env.dir.join(format!("{id}.json"));
    std::fs::write(&file, spec.to_string()).expect("spec file");
    let file = file.display().to_string();
    ctr(
        ctrd,
        &["run", "--rm", "--config", &file, "--runtime", runtime, id],
    )
}

fn every_hook_runs_in_order_with_its_state(runtime: &str, name: &str) {
    let env = TestEnv::new(name);
    let ctrd = containerd(&env);
    let dir = env.dir.join("hooks");
    std::fs::create_dir_all(&dir).expect("hooks dir");
    let mut hooks = serde_json::Map::new();
    for phase in HOST_PHASES {
        hooks.insert(
            phase.into(),
            serde_json::json!([recording_hook(&dir, phase)]),
        );
    }
    hooks.insert(
        "startContainer".into(),
        serde_json::json!([{ "path": "/bin/sh", "args": ["sh", "-c", "echo in-the-container > /tmp/start-hook"] }]),
    );
    let id = "hooks1";
    let spec = spec(
        &ctrd,
        id,
        &["cat", "/tmp/start-hook"],
        serde_json::Value::Object(hooks),
    );
    let out = run_with_spec(&ctrd, &env, runtime, id, &spec);
    assert!(
        out.status.success(),
        "ctr run: {}\n{}\nlog:\n{}",
        stdout(&out),
        stderr(&out),
        ctrd.log_tail(30)
    );
    assert_eq!(
        stdout(&out).trim(),
        "in-the-container",
        "the startContainer hook did not run in the container"
    );
    let order = std::fs::read_to_string(dir.join("order")).unwrap_or_default();
    assert_eq!(
        order.lines().collect::<Vec<_>>(),
        HOST_PHASES,
        "host hooks ran out of order"
    );
    for phase in HOST_PHASES {
        let text = std::fs::read_to_string(dir.join(format!("{phase}.json"))).expect("state");
        let state: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{phase}: state {text:?} is not JSON: {e}"));
        assert_eq!(state["id"], id, "{phase}: {state}");
        assert!(
            state["bundle"].as_str().is_some_and(|b| b.ends_with(id)),
            "{phase}: {state}"
        );
        assert!(state["ociVersion"].is_string(), "{phase}: {state}");
        if phase != "poststop" {
            let comm =
                std::fs::read_to_string(dir.join(format!("{phase}.comm"))).unwrap_or_default();
            assert!(
                state["pid"].as_u64().is_some_and(|p| p > 0) && !comm.trim().is_empty(),
                "{phase}: the state's pid names no live host process: {state} (comm {comm:?})"
            );
        }
    }
    finish_containerd(ctrd, env);
}

#[test]
fn runc_runs_every_hook_in_order_with_its_state() {
    every_hook_runs_in_order_with_its_state(RUNC_RUNTIME, "hooks-runc");
}

#[test]
fn pangolin_runs_every_hook_in_order_with_its_state() {
    every_hook_runs_in_order_with_its_state(PANGOLIN_RUNTIME, "hooks-pangolin");
}

/// A createRuntime hook that fails fails the run with the hook named, and nothing is left
/// (the leak checks of `finish_containerd`).
#[test]
fn a_failing_create_runtime_hook_fails_the_run_naming_it_and_leaves_nothing() {
    let env = TestEnv::new("hooks-fail");
    let ctrd = containerd(&env);
    let marker = env.dir.join("after-the-failure");
    let hooks = serde_json::json!({
        "createRuntime": [{ "path": "/bin/sh", "args": ["sh", "-c", "echo no-network-for-you >&2; exit 7"] }],
        "poststart": [{ "path": "/bin/sh", "args": ["sh", "-c", format!("touch {}", marker.display())] }],
    });
    let spec = spec(&ctrd, "hooksfail1", &["true"], hooks);
    let out = run_with_spec(&ctrd, &env, PANGOLIN_RUNTIME, "hooksfail1", &spec);
    assert!(!out.status.success(), "ctr run succeeded: {}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains("hooks.createRuntime[0]") && err.contains("no-network-for-you"),
        "the error does not name the hook: {err}"
    );
    assert!(!marker.exists(), "a later hook ran after the failure");
    // ctr leaves the container record when the task could not be created; it is removed
    // like any other (then the leak checks run).
    let _ = ctrd.ctr_output(["containers", "rm", "hooksfail1"]);
    finish_containerd(ctrd, env);
}

/// Docker's networking on a runtime: the spec asks for a fresh network namespace, and an OCI
/// `prestart` hook (Docker's `libnetwork-setkey`) finds it by the state's pid and moves a veth
/// into it, with an address and a default route; the container then has that network. Here the
/// hook does it with `ip`, as libnetwork does with netlink. On pangolin the VM booted before the
/// hook ran: the interface is wired to its NIC at the start.
fn a_prestart_hook_that_adds_a_veth_gives_the_container_its_network(
    runtime: &str,
    name: &str,
    subnet: u8,
) {
    let env = TestEnv::new(name);
    let ctrd = containerd(&env);
    let (host_if, peer) = (format!("pgnhk{subnet}h"), format!("pgnhk{subnet}c"));
    let (host_ip, guest_ip) = (format!("10.250.{subnet}.1"), format!("10.250.{subnet}.2"));
    let script = format!(
        "set -e; state=$(cat); \
         pid=$(printf '%s' \"$state\" | sed -n 's/.*\"pid\":\\([0-9]*\\).*/\\1/p'); \
         ip link add {host_if} type veth peer name {peer}; \
         ip link set {peer} netns $pid; \
         ip addr add {host_ip}/24 dev {host_if}; ip link set {host_if} up; \
         nsenter --net=/proc/$pid/ns/net sh -c \
           'ip addr add {guest_ip}/24 dev {peer} && ip link set {peer} up && ip route add default via {host_ip}'"
    );
    let hooks = serde_json::json!({
        "prestart": [{ "path": "/bin/sh", "args": ["sh", "-c", script], "timeout": 30 }],
    });
    let id = format!("hooksnet{subnet}");
    let check = format!("ip -o -4 addr show; ping -c 1 -W 20 {host_ip} >/dev/null && echo reached");
    let spec = spec(&ctrd, &id, &["sh", "-c", &check], hooks);
    let out = run_with_spec(&ctrd, &env, runtime, &id, &spec);
    let text = stdout(&out);
    assert!(
        out.status.success()
            && text.contains(&format!("{guest_ip}/24"))
            && text.contains("reached"),
        "the container did not get the hook's network: {text}\n{}\nlog:\n{}",
        stderr(&out),
        ctrd.log_tail(30)
    );
    // The veth goes with the pod's namespace.
    let gone = (0..100).any(|_| {
        let shown = std::process::Command::new("ip")
            .args(["link", "show", &host_if])
            .output()
            .is_ok_and(|o| o.status.success());
        if shown {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        !shown
    });
    assert!(
        gone,
        "{host_if} is still on the host after the container was removed"
    );
    finish_containerd(ctrd, env);
}

#[test]
fn runc_gives_a_container_the_network_its_prestart_hook_added() {
    a_prestart_hook_that_adds_a_veth_gives_the_container_its_network(
        RUNC_RUNTIME,
        "hooks-net-runc",
        7,
    );
}

#[test]
fn pangolin_gives_a_container_the_network_its_prestart_hook_added() {
    a_prestart_hook_that_adds_a_veth_gives_the_container_its_network(
        PANGOLIN_RUNTIME,
        "hooks-net-pangolin",
        8,
    );
}

/// kill -9 of the shim of a container whose VM has a network namespace of the sandbox's own
/// (its prestart hook added the veth): the VM, the namespace's holder and the namespace's mount
/// go, and the shim's `delete` leaves nothing (the leak checks of `finish_containerd`).
#[test]
fn killing_the_shim_of_a_pod_with_its_own_namespace_leaves_nothing() {
    let env = TestEnv::new("hooks-net-shimkill");
    let ctrd = containerd(&env);
    let hooks = serde_json::json!({
        "prestart": [{ "path": "/bin/sh", "args": ["sh", "-c", "cat >/dev/null"], "timeout": 30 }],
    });
    let id = "hooksnetkill";
    let spec = spec(&ctrd, id, &["sleep", "3600"], hooks);
    let file = env.dir.join(format!("{id}.json"));
    std::fs::write(&file, spec.to_string()).expect("spec file");
    let file = file.display().to_string();
    let out = ctr(
        &ctrd,
        &[
            "run",
            "-d",
            "--config",
            &file,
            "--runtime",
            PANGOLIN_RUNTIME,
            id,
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let holders = |cmd: &str| cmd.contains("--pangolin-hold-netns");
    let running = pangolin_e2e::processes_mentioning(&env.dir);
    assert!(
        running.iter().any(|(_, cmd)| holders(cmd)),
        "no holder of the pod's namespace: {running:?}"
    );
    let shim = running
        .iter()
        .find(|(_, cmd)| cmd.contains("containerd-shim-pangolin-v2"))
        .map(|(pid, _)| *pid)
        .expect("the shim");
    let killed = std::process::Command::new("kill")
        .args(["-9", &shim.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success(), "kill -9 of the shim");
    let deadline =
        std::time::Instant::now() + pangolin_e2e::patience(std::time::Duration::from_secs(30));
    while stdout(&ctr(&ctrd, &["task", "ls"])).contains("RUNNING") {
        assert!(std::time::Instant::now() < deadline, "the task still runs");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let _ = ctr(&ctrd, &["task", "delete", id]);
    let out = ctr(&ctrd, &["container", "delete", id]);
    assert!(out.status.success(), "container delete: {}", stderr(&out));
    let deadline =
        std::time::Instant::now() + pangolin_e2e::patience(std::time::Duration::from_secs(10));
    while pangolin_e2e::processes_mentioning(&env.dir)
        .iter()
        .any(|(_, cmd)| holders(cmd))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the holder outlived its shim"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    finish_containerd(ctrd, env);
}
