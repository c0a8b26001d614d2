//! The pangolin runtime through a real (private) containerd and `ctr`: each task in its own
//! microVM on the configured backend, containerd's rootfs, FIFOs, exit codes, exec, pause/resume,
//! metrics, kill, TTY, OOM events, network administration in the guest, and cleanup (no
//! process, mount or directory left). Host-side confinement, cgroups, volumes and the shim's
//! death: `containerd_sandboxing.rs`.

#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

use std::process::Stdio;
use std::time::{Duration, Instant};

use pangolin_e2e::ctr::{containerd, ctr, pangolin_run};
use pangolin_e2e::{finish_containerd, patience, run_in_pty, stderr, stdout, TestEnv};

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
        &pangolin_run(
            &["--rm"],
            "run1",
            &["sh", "-c", "echo hello-from-pangolin; uname -r; exit 3"],
        ),
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
    let cmd = ctrd.ctr(pangolin_run(&["--rm"], "run2", &["cat"]));
    let out = with_input(cmd, b"piped-through\n");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "piped-through\n",
        "{}",
        stderr(&out)
    );
    finish_containerd(ctrd, env);
}

/// A privileged container administers its pod's network inside the VM as it could on the host:
/// the guest kernel has bridges (`brctl addbr` used to fail with ENOPKG), veth pairs, VLANs,
/// macvlan, tun/tap and the iptables (legacy and nft) and nftables back ends with conntrack.
#[test]
fn a_privileged_container_makes_bridges_veths_vlans_and_has_tun_and_netfilter() {
    let env = TestEnv::new("ctr-netadmin");
    let ctrd = containerd(&env);
    let script = "set -e; brctl addbr pgnbr0; \
                  ip link add pgnv0 type veth peer name pgnv1; \
                  ip link set pgnv0 master pgnbr0; \
                  ip link add link pgnv0 name pgnv0.7 type vlan id 7; \
                  ip link add link pgnbr0 name pgnmv0 type macvlan; \
                  test -e /sys/class/misc/tun; \
                  test -e /proc/net/ip_tables_names; test -e /proc/net/ip6_tables_names; \
                  test -e /proc/sys/net/netfilter/nf_conntrack_max; \
                  ip -o link show";
    let out = ctr(
        &ctrd,
        &pangolin_run(
            &["--rm", "--privileged"],
            "netadmin1",
            &["sh", "-c", script],
        ),
    );
    let links = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "stdout: {links}\nstderr: {}",
        stderr(&out)
    );
    for (link, what) in [
        ("pgnbr0:", "bridge"),
        ("pgnv0@", "veth"),
        ("pgnv0.7@pgnv0:", "vlan"),
        ("pgnmv0@pgnbr0:", "macvlan"),
    ] {
        assert!(links.contains(link), "no {what} {link} among:\n{links}");
    }
    assert!(
        links.contains("master pgnbr0"),
        "the veth is not a port of the bridge:\n{links}"
    );
    finish_containerd(ctrd, env);
}

#[test]
fn ctr_task_exec_ps_pause_resume_metrics_kill_delete() {
    let env = TestEnv::new("ctr-task");
    let ctrd = containerd(&env);
    let out = ctr(&ctrd, &pangolin_run(&["-d"], "task1", &["sleep", "1000"]));
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
    let deadline = Instant::now() + patience(Duration::from_secs(20));
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
    let out = ctr(&ctrd, &pangolin_run(&["-d"], "vk1", &["sleep", "1000"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let vmm = env.vmm_pids();
    assert_eq!(vmm.len(), 1, "one VMM for the task");
    let killed = Instant::now();
    let _ = std::process::Command::new("kill")
        .args(["-9", &vmm[0].to_string()])
        .status();
    let deadline = killed + patience(Duration::from_secs(10));
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
        &pangolin_run(
            &[
                "--rm",
                "--annotation",
                "io.pangolin.vcpus=2",
                "--annotation",
                "io.pangolin.not-a-knob=whatever",
                "--memory-limit",
                "536870912",
            ],
            "annot1",
            &[
                "sh",
                "-c",
                "echo cpus=$(nproc) mem=$(free -m | awk '/Mem:/{print $2}')",
            ],
        ),
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
        &pangolin_run(
            &["--rm", "--annotation", "io.pangolin.vcpus=lots"],
            "annot2",
            &["true"],
        ),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("io.pangolin.vcpus"),
        "{}",
        stderr(&out)
    );
    let _ = ctr(&ctrd, &["container", "rm", "annot2"]);

    // A broken configuration fails the task, naming the key, instead of running on defaults.
    let good = std::fs::read_to_string(&env.config_file).expect("config");
    let bad = good.replacen("vcpus = 1", "vcpus = 0", 1);
    assert_ne!(bad, good, "config has a vcpus key to break:\n{good}");
    std::fs::write(&env.config_file, bad).expect("break config");
    let out = ctr(&ctrd, &pangolin_run(&["--rm"], "badconf", &["true"]));
    std::fs::write(&env.config_file, good).expect("restore config");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("hypervisor.vcpus: must be in 1..=16, got 0"),
        "{}",
        stderr(&out)
    );
    let _ = ctr(&ctrd, &["container", "rm", "badconf"]);
    finish_containerd(ctrd, env);
}

/// CRI's ids are 64 hex characters; a terminal exec with such a container id and exec id gets
/// its pty (the guest's console socket path is bounded, not built from the ids).
#[test]
fn tty_exec_with_64_character_ids_gets_a_terminal() {
    let env = TestEnv::new("ctr-tty-long-ids");
    let ctrd = containerd(&env);
    let id = "c".repeat(64);
    let exec_id = "e".repeat(64);
    let out = ctr(&ctrd, &pangolin_run(&["-d"], &id, &["sleep", "3600"]));
    assert!(out.status.success(), "ctr run -d: {}", stderr(&out));
    let (text, code) = run_in_pty(
        ctrd.ctr([
            "task",
            "exec",
            "-t",
            "--exec-id",
            &exec_id,
            &id,
            "sh",
            "-c",
            "tty; test -t 0 && echo stdin-is-a-tty",
        ]),
        24,
        80,
        b"",
    );
    assert!(text.contains("/dev/pts/"), "no terminal: {text:?}");
    assert!(text.contains("stdin-is-a-tty"), "{text:?}");
    assert_eq!(code, Some(0), "{text:?}");
    let out = ctr(&ctrd, &["task", "kill", "-s", "SIGKILL", &id]);
    assert!(out.status.success(), "kill: {}", stderr(&out));
    let deadline = Instant::now() + patience(Duration::from_secs(30));
    loop {
        let out = ctr(&ctrd, &["task", "delete", &id]);
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "task delete: {}", stderr(&out));
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = ctr(&ctrd, &["container", "delete", &id]);
    assert!(out.status.success(), "container delete: {}", stderr(&out));
    finish_containerd(ctrd, env);
}

#[test]
fn ctr_run_tty_and_an_oom_kill_reports_the_oom_event() {
    let env = TestEnv::new("ctr-tty-oom");
    let ctrd = containerd(&env);
    // containerd's event stream, as a subscriber sees it.
    let events_file = env.dir.join("events.txt");
    let mut events = ctrd
        .ctr(["events"])
        .stdout(std::fs::File::create(&events_file).expect("events file"))
        .stderr(Stdio::null())
        .spawn()
        .expect("ctr events");

    let (text, code) = run_in_pty(
        ctrd.ctr(pangolin_run(
            &["-t", "--rm"],
            "tty1",
            &[
                "sh",
                "-c",
                "tty; stty size; test -t 0 && echo stdin-is-a-tty",
            ],
        )),
        30,
        100,
        b"",
    );
    assert!(text.contains("/dev/pts/"), "no terminal: {text:?}");
    assert!(
        text.contains("30 100"),
        "window size not forwarded: {text:?}"
    );
    assert!(text.contains("stdin-is-a-tty"), "{text:?}");
    assert_eq!(code, Some(0), "{text:?}");

    // A container that outgrows its 32 MiB limit is OOM-killed in the guest: exit 137 and a
    // /tasks/oom event for it.
    let out = ctr(
        &ctrd,
        &pangolin_run(
            &["--rm", "--memory-limit", "33554432"],
            "oom1",
            &["tail", "/dev/zero"],
        ),
    );
    assert_eq!(out.status.code(), Some(137), "{}", stderr(&out));
    let deadline = Instant::now() + patience(Duration::from_secs(10));
    let oom = loop {
        let seen = std::fs::read_to_string(&events_file).unwrap_or_default();
        let oom: Vec<String> = seen
            .lines()
            .filter(|l| l.contains("/tasks/oom"))
            .map(str::to_string)
            .collect();
        if !oom.is_empty() || Instant::now() > deadline {
            break (oom, seen);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = events.kill();
    let _ = events.wait();
    assert!(
        oom.0.iter().any(|l| l.contains("\"oom1\"")),
        "no /tasks/oom event for oom1; events:\n{}",
        oom.1
    );
    finish_containerd(ctrd, env);
}
