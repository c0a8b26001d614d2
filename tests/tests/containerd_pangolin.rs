//! The pangolin runtime through a real (private) containerd and `ctr`: each task in its own
//! microVM on the configured backend, containerd's rootfs, FIFOs, exit codes, exec, pause/resume,
//! metrics, kill, and cleanup (no process, mount or directory left).

#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

use std::process::Stdio;
use std::time::{Duration, Instant};

use pangolin_e2e::containerd::{Options, PrivateContainerd, BUSYBOX_IMAGE, PANGOLIN_RUNTIME};
use pangolin_e2e::{
    busybox, finish_containerd, pangolin_containerd, run_bounded, stderr, stdout, TestEnv,
};

/// A private containerd whose shims use `env`'s configuration, with busybox imported.
fn containerd(env: &TestEnv) -> PrivateContainerd {
    let ctrd = pangolin_containerd(env, Options::default());
    ctrd.import_busybox(&busybox(), BUSYBOX_IMAGE)
        .expect("import busybox");
    ctrd
}

fn ctr(ctrd: &PrivateContainerd, args: &[&str]) -> std::process::Output {
    run_bounded(ctrd.ctr(args), Duration::from_secs(180))
}

/// Runs `cmd` with `input` on its stdin (then closed); returns its output.
fn with_input(mut cmd: std::process::Command, input: &[u8]) -> std::process::Output {
    use std::io::Write;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn ctr");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write stdin");
    child.wait_with_output().expect("wait for ctr")
}

#[test]
fn ctr_run_rm_prints_output_and_returns_the_exit_code() {
    let env = TestEnv::new("ctr-run");
    let ctrd = containerd(&env);
    let t = Instant::now();
    let out = ctr(
        &ctrd,
        &[
            "run",
            "--rm",
            "--runtime",
            PANGOLIN_RUNTIME,
            BUSYBOX_IMAGE,
            "run1",
            "sh",
            "-c",
            "echo hello-from-pangolin; uname -r; exit 3",
        ],
    );
    eprintln!("ctr run --rm took {:?}", t.elapsed());
    let text = stdout(&out);
    assert!(
        text.contains("hello-from-pangolin"),
        "stdout: {text}\nstderr: {}\nlog:\n{}",
        stderr(&out),
        ctrd.log_tail(30)
    );
    assert!(text.contains("-pangolin"), "guest kernel: {text}");
    assert_eq!(out.status.code(), Some(3), "stderr: {}", stderr(&out));
    // stdin through the FIFO, closed by CloseIO
    let cmd = ctrd.ctr([
        "run",
        "--rm",
        "--runtime",
        PANGOLIN_RUNTIME,
        BUSYBOX_IMAGE,
        "run2",
        "cat",
    ]);
    let out = with_input(cmd, b"piped-through\n");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "piped-through\n",
        "{}",
        stderr(&out)
    );
    finish_containerd(ctrd, env);
}

#[test]
fn ctr_task_exec_ps_pause_resume_metrics_kill_delete() {
    let env = TestEnv::new("ctr-task");
    let ctrd = containerd(&env);
    let out = ctr(
        &ctrd,
        &[
            "run",
            "-d",
            "--runtime",
            PANGOLIN_RUNTIME,
            BUSYBOX_IMAGE,
            "task1",
            "sleep",
            "1000",
        ],
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        stderr(&out),
        ctrd.log_tail(30)
    );
    let ls = stdout(&ctr(&ctrd, &["task", "ls"]));
    assert!(ls.contains("task1") && ls.contains("RUNNING"), "{ls}");

    let cmd = ctrd.ctr([
        "task",
        "exec",
        "--exec-id",
        "e1",
        "task1",
        "sh",
        "-c",
        "cat; echo exec-done",
    ]);
    let out = with_input(cmd, b"into-exec\n");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "into-exec\nexec-done\n",
        "{}",
        stderr(&out)
    );
    assert_eq!(
        ctr(
            &ctrd,
            &[
                "task",
                "exec",
                "--exec-id",
                "e2",
                "task1",
                "sh",
                "-c",
                "exit 5"
            ]
        )
        .status
        .code(),
        Some(5)
    );

    let ps = stdout(&ctr(&ctrd, &["task", "ps", "task1"]));
    assert!(ps.lines().count() >= 2, "a process listed: {ps}");

    assert!(ctr(&ctrd, &["task", "pause", "task1"]).status.success());
    assert!(stdout(&ctr(&ctrd, &["task", "ls"])).contains("PAUSED"));
    assert!(ctr(&ctrd, &["task", "resume", "task1"]).status.success());
    assert!(stdout(&ctr(&ctrd, &["task", "ls"])).contains("RUNNING"));

    let metrics = stdout(&ctr(&ctrd, &["task", "metrics", "task1"]));
    assert!(
        metrics.contains("memory.usage") && metrics.contains("pids.current"),
        "{metrics}"
    );

    assert!(ctr(&ctrd, &["task", "kill", "-s", "SIGKILL", "task1"])
        .status
        .success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !stdout(&ctr(&ctrd, &["task", "ls"])).contains("STOPPED") {
        assert!(Instant::now() < deadline, "task did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ctr(&ctrd, &["task", "delete", "task1"]).status.success());
    assert!(ctr(&ctrd, &["container", "rm", "task1"]).status.success());
    finish_containerd(ctrd, env);
}

#[test]
fn killing_the_vmm_makes_the_task_exit() {
    let env = TestEnv::new("ctr-vmmkill");
    let ctrd = containerd(&env);
    let out = ctr(
        &ctrd,
        &[
            "run",
            "-d",
            "--runtime",
            PANGOLIN_RUNTIME,
            BUSYBOX_IMAGE,
            "vk1",
            "sleep",
            "1000",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let vmm: Vec<u32> = env
        .leftover_processes()
        .into_iter()
        .filter(|(_, c)| c.contains("qemu-system") || c.contains("pangolin-vmm"))
        .map(|(p, _)| p)
        .collect();
    assert_eq!(vmm.len(), 1, "one VMM for the task");
    let killed = Instant::now();
    let _ = std::process::Command::new("kill")
        .args(["-9", &vmm[0].to_string()])
        .status();
    let deadline = killed + Duration::from_secs(10);
    while !stdout(&ctr(&ctrd, &["task", "ls"])).contains("STOPPED") {
        assert!(
            Instant::now() < deadline,
            "task did not exit after the VMM died"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "task STOPPED {:?} after the VMM was killed",
        killed.elapsed()
    );
    assert!(ctr(&ctrd, &["task", "delete", "vk1"]).status.success());
    assert!(ctr(&ctrd, &["container", "rm", "vk1"]).status.success());
    finish_containerd(ctrd, env);
}

#[test]
fn annotations_and_limits_shape_the_vm_and_bad_ones_are_named() {
    let env = TestEnv::new("ctr-annot");
    let ctrd = containerd(&env);
    let out = ctr(
        &ctrd,
        &[
            "run",
            "--rm",
            "--runtime",
            PANGOLIN_RUNTIME,
            "--annotation",
            "io.pangolin.vcpus=2",
            "--annotation",
            "io.pangolin.not-a-knob=whatever",
            "--memory-limit",
            "536870912",
            BUSYBOX_IMAGE,
            "annot1",
            "sh",
            "-c",
            "echo cpus=$(nproc) mem=$(free -m | awk '/Mem:/{print $2}')",
        ],
    );
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{}\n{}",
        stderr(&out),
        ctrd.log_tail(20)
    );
    assert!(text.contains("cpus=2"), "{text}");
    let mem: u32 = text
        .split("mem=")
        .nth(1)
        .and_then(|m| m.trim().parse().ok())
        .expect("mem figure");
    assert!(mem > 512, "a 512 MiB limit must fit the VM: {text}");
    let out = ctr(
        &ctrd,
        &[
            "run",
            "--rm",
            "--runtime",
            PANGOLIN_RUNTIME,
            "--annotation",
            "io.pangolin.vcpus=lots",
            BUSYBOX_IMAGE,
            "annot2",
            "true",
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("io.pangolin.vcpus"),
        "{}",
        stderr(&out)
    );
    let _ = ctr(&ctrd, &["container", "rm", "annot2"]);
    finish_containerd(ctrd, env);
}
