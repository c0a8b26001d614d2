//! `pangolin console` and `pangolin list` against a real pod VM (`pangolin run` of a long
//! `sleep`): with `[agent] debug_console = true` a command runs in the VM outside every
//! container (it sees the share the containers' roots are in), with its stdout, stderr and exit
//! status, and an interactive shell gets a terminal; with the console off (the default) the
//! session is refused, saying why. `pangolin list` shows the sandbox.

#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use pangolin_e2e::{busybox, patience, run_in_pty, stderr, stdout, TestEnv};

/// A pod VM running a `sleep` that ends on SIGTERM, through `pangolin run`; its sandbox id (from `pangolin list`).
// The child is returned to the caller, which stops and waits for it (`stop_pod`).
#[allow(clippy::zombie_processes)]
fn start_pod(env: &TestEnv) -> (Child, String) {
    let mut child = env
        .pangolin()
        .arg("run")
        .arg("--rootfs")
        .arg(busybox())
        // PID 1 of its namespace: SIGTERM ends it only through a handler.
        .args([
            "--",
            "sh",
            "-c",
            "trap 'exit 0' TERM; echo ready; sleep 600 & wait",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("pangolin run");
    // Signals are only safe to send once the container's trap is set.
    let mut ready = String::new();
    let out = child.stdout.take().expect("stdout");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut ready).expect("read");
    if ready != "ready\n" {
        stop_pod(child);
        panic!("the pod did not start: {ready:?}");
    }
    let deadline = Instant::now() + patience(Duration::from_secs(60));
    loop {
        let out = env.pangolin().arg("list").output().expect("pangolin list");
        let listed = stdout(&out);
        if let Some(line) = listed.lines().nth(1) {
            let id = line
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            return (child, id);
        }
        if Instant::now() > deadline {
            stop_pod(child);
            panic!("no sandbox listed: {listed}{}", stderr(&out));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn stop_pod(mut child: Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid")),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = pangolin_e2e::wait_for_end(&mut child, Duration::from_secs(60));
}

#[test]
fn the_console_runs_commands_and_a_shell_in_the_vm_outside_every_container() {
    let env = TestEnv::with("console", |c| c.agent.debug_console = true);
    let (pod, id) = start_pod(&env);

    let listed = stdout(&env.pangolin().arg("list").output().expect("list"));
    let line = listed.lines().nth(1).expect("a sandbox");
    assert!(
        line.contains("256Mi") && line.ends_with("on"),
        "list: {listed}"
    );

    // Outside every container: the share with the containers' roots is there.
    let out = env
        .pangolin()
        .args(["console", &id, "--", "sh", "-c"])
        .arg("ls /run/pangolin/shared >/dev/null && echo outside; echo to-stderr >&2; exit 3")
        .output()
        .expect("console");
    assert_eq!(stdout(&out), "outside\n", "stderr: {}", stderr(&out));
    assert_eq!(stderr(&out), "to-stderr\n");
    assert_eq!(out.status.code(), Some(3));

    // Interactive: a shell on a terminal.
    let mut cmd = env.pangolin();
    cmd.args(["console", &id]);
    let (text, code) = run_in_pty(cmd, 30, 100, b"echo pgn-$((6*7)); tty; stty size; exit 5\n");
    assert!(
        text.contains("pgn-42"),
        "no answer from the shell: {text:?}"
    );
    assert!(text.contains("/dev/pts/"), "not on a terminal: {text:?}");
    assert!(text.contains("30 100"), "window size not passed: {text:?}");
    assert_eq!(code, Some(5), "{text:?}");

    stop_pod(pod);
    env.finish();
}

#[test]
fn the_console_is_refused_when_it_is_off() {
    let env = TestEnv::new("console-off");
    let (pod, id) = start_pod(&env);
    let listed = stdout(&env.pangolin().arg("list").output().expect("list"));
    assert!(
        listed.lines().nth(1).is_some_and(|l| l.ends_with("off")),
        "{listed}"
    );
    let out = env
        .pangolin()
        .args(["console", &id, "--", "true"])
        .output()
        .expect("console");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("debug console is off ([agent] debug_console = false"),
        "{}",
        stderr(&out)
    );
    stop_pod(pod);
    env.finish();
}
