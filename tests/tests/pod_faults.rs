//! Faults a pod's VM meets on a node, through a real (private) containerd and `ctr`: the guest
//! kernel panics, the guest powers itself off, a helper daemon the VM needs is killed. Each
//! must end the pod's task within a bounded time (no hang) and leave nothing behind
//! (`finish_containerd`'s checks: processes, sockets, mounts, directories).
//!
//! The guest faults are triggered the way a privileged container can: `/proc/sysrq-trigger`
//! (`c` crashes the kernel, `o` powers it off).

#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

use std::time::{Duration, Instant};

use pangolin_e2e::containerd::PrivateContainerd;
use pangolin_e2e::ctr::{containerd, ctr, pangolin_run};
use pangolin_e2e::{finish_containerd, patience, stderr, stdout, TestEnv};

/// Starts `id` (privileged, `sleep 3600`) and returns once its task runs.
fn start_sleeper(ctrd: &PrivateContainerd, id: &str) {
    let out = ctr(
        ctrd,
        &pangolin_run(&["-d", "--privileged"], id, &["sleep", "3600"]),
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Waits until no task runs any more and returns how long that took from `since`.
fn wait_until_stopped(ctrd: &PrivateContainerd, since: Instant, what: &str) -> Duration {
    let deadline = since + patience(Duration::from_secs(30));
    loop {
        let tasks = stdout(&ctr(ctrd, &["task", "ls"]));
        if !tasks.contains("RUNNING") {
            return since.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the task still runs:\n{tasks}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Checks that the pod's VM is gone by itself, then deletes `id`'s task and container and
/// checks that nothing of the pod is left.
fn remove_and_finish(ctrd: PrivateContainerd, env: TestEnv, id: &str) {
    let deadline = Instant::now() + patience(Duration::from_secs(10));
    while !env.vmm_pids().is_empty() {
        assert!(Instant::now() < deadline, "the VM outlived its pod's end");
        std::thread::sleep(Duration::from_millis(100));
    }
    delete_and_finish(ctrd, env, id);
}

/// Deletes `id`'s (stopped) task and container and checks that nothing of the pod is left.
fn delete_and_finish(ctrd: PrivateContainerd, env: TestEnv, id: &str) {
    let out = ctr(&ctrd, &["task", "delete", id]);
    assert!(out.status.success(), "task delete: {}", stderr(&out));
    let out = ctr(&ctrd, &["container", "delete", id]);
    assert!(out.status.success(), "container delete: {}", stderr(&out));
    finish_containerd(ctrd, env);
}

/// A sysrq command run in `id` by `ctr task exec`; returns when the exec ended, with its exit
/// code, the time the task took to stop after the trigger, and the exec's output.
fn sysrq(ctrd: &PrivateContainerd, id: &str, key: char) -> (Option<i32>, Duration, String) {
    let trigger = format!("echo {key} > /proc/sysrq-trigger; sleep 3600");
    let started = Instant::now();
    let out = ctr(
        ctrd,
        &[
            "task",
            "exec",
            "--exec-id",
            "sysrq",
            id,
            "sh",
            "-c",
            &trigger,
        ],
    );
    let stopped = wait_until_stopped(ctrd, started, "after sysrq");
    (
        out.status.code(),
        stopped,
        format!("{}{}", stdout(&out), stderr(&out)),
    )
}

/// Runs a privileged sleeper `id`, triggers sysrq `key` in it, and checks that its task and the
/// exec stop and nothing of the pod is left.
fn guest_fault_ends_the_pod(what: &str, id: &str, key: char) {
    let env = TestEnv::new(&format!("fault-{id}"));
    let ctrd = containerd(&env);
    start_sleeper(&ctrd, id);
    let (code, stopped, out) = sysrq(&ctrd, id, key);
    assert_ne!(code, Some(0), "the exec outlived its VM: {out}");
    eprintln!("{what}: task stopped {stopped:?} after the trigger (exec exit {code:?})");
    remove_and_finish(ctrd, env, id);
}

/// The guest kernel panics (`panic=-1`: it resets at once, the VMM sees the reset and exits):
/// the container's task and the exec both exit, and the pod is gone.
#[test]
fn a_guest_kernel_panic_ends_the_task_and_leaves_nothing() {
    guest_fault_ends_the_pod("guest panic", "panic1", 'c');
}

/// The guest powers itself off (sysrq `o`: the kernel shuts its devices down; with no ACPI
/// the machine cannot switch itself off): the pod must end, not hang with a VM that no longer
/// answers.
#[test]
fn a_guest_power_off_ends_the_task_and_leaves_nothing() {
    guest_fault_ends_the_pod("guest power-off", "off1", 'o');
}

/// Kills every process of the pod named `daemon` (by its executable's file name) and returns
/// how many there were. One may be gone before its turn: virtiofsd is two processes (it forks
/// into its sandbox), and each ends when the other dies.
fn kill_helper(env: &TestEnv, daemon: &str) -> usize {
    let pids: Vec<u32> = env
        .leftover_processes()
        .into_iter()
        .filter(|(_, cmd)| {
            cmd.split_whitespace()
                .next()
                .is_some_and(|exe| exe.rsplit('/').next() == Some(daemon))
        })
        .map(|(pid, _)| pid)
        .collect();
    for pid in &pids {
        let raw = i32::try_from(*pid).expect("pid");
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), nix::sys::signal::SIGKILL) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => panic!("kill -9 {daemon} {pid}: {e}"),
        }
    }
    pids.len()
}

/// virtiofsd dies under a running pod: the guest's root filesystem can no longer answer, so
/// the pod fails at once (its task exits, the VM is stopped) instead of hanging.
#[test]
fn killing_virtiofsd_ends_the_task_and_leaves_nothing() {
    let env = TestEnv::new("fault-virtiofsd");
    let ctrd = containerd(&env);
    start_sleeper(&ctrd, "fsd1");
    let killed_at = Instant::now();
    assert!(
        kill_helper(&env, "virtiofsd") > 0,
        "the pod has a virtiofsd"
    );
    let stopped = wait_until_stopped(&ctrd, killed_at, "after virtiofsd's death");
    eprintln!("virtiofsd killed: task stopped {stopped:?} later");
    remove_and_finish(ctrd, env, "fsd1");
}

/// vhost-device-vsock (the QEMU backend's vsock device) dies: the shim loses the agent, so the
/// pod fails at once. The built-in VMM serves vsock itself: there is no such daemon to kill,
/// which the test checks instead.
#[test]
fn killing_the_vsock_daemon_ends_the_task_and_leaves_nothing() {
    let env = TestEnv::new("fault-vsockd");
    let ctrd = containerd(&env);
    start_sleeper(&ctrd, "vsockd1");
    let builtin = env
        .leftover_processes()
        .iter()
        .any(|(_, cmd)| cmd.contains("pangolin-vmm"));
    let killed_at = Instant::now();
    let killed = kill_helper(&env, "vhost-device-vsock");
    if builtin {
        assert_eq!(killed, 0, "the built-in VMM has no vsock daemon");
        let out = ctr(&ctrd, &["task", "kill", "-s", "SIGKILL", "vsockd1"]);
        assert!(out.status.success(), "{}", stderr(&out));
        wait_until_stopped(&ctrd, killed_at, "after SIGKILL");
        delete_and_finish(ctrd, env, "vsockd1");
        return;
    }
    assert!(killed > 0, "the QEMU pod has a vhost-device-vsock");
    let stopped = wait_until_stopped(&ctrd, killed_at, "after vhost-device-vsock's death");
    eprintln!("vhost-device-vsock killed ({killed}): task stopped {stopped:?} later");
    remove_and_finish(ctrd, env, "vsockd1");
}
