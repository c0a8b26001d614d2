//! `pangolin run` end to end: real guest kernel, real agent, real containers, on the backend
//! `auto` picks (QEMU/TCG on a PVM host, the built-in VMM on hardware KVM) or the one
//! `PANGOLIN_TEST_HYPERVISOR` names (the nested test host runs this suite with `builtin`).
//! Every test ends by checking that nothing of its VM remains.

#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

use pangolin_e2e::{stderr, stdout, TestEnv};

#[test]
fn echo_output_and_exit_zero() {
    let env = TestEnv::new("echo");
    let out = env.run(&[], &["echo", "hello from the guest"]);
    assert_eq!(
        stdout(&out),
        "hello from the guest\n",
        "stderr: {}",
        stderr(&out)
    );
    assert_eq!(out.status.code(), Some(0));
    env.finish();
}

#[test]
fn exit_codes_come_back_as_the_containers() {
    let env = TestEnv::new("exit");
    let out = env.run(&[], &["sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "out\n");
    assert!(
        stderr(&out).contains("err\n"),
        "stderr carries the container's stderr: {}",
        stderr(&out)
    );
    // The init is PID 1 of its namespace; a child killed by SIGKILL gives the shell 137.
    let out = env.run(&[], &["sh", "-c", "sh -c 'kill -9 $$'; exit $?"]);
    assert_eq!(out.status.code(), Some(137), "stderr: {}", stderr(&out));
    env.finish();
}

#[test]
fn stdin_is_piped_in_with_dash_i() {
    let env = TestEnv::new("stdin");
    let mut cmd = env.pangolin();
    cmd.arg("run")
        .arg("-i")
        .arg("--rootfs")
        .arg(pangolin_e2e::busybox())
        .args(["--", "sh", "-c", "tr a-z A-Z; echo done"]);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(b"piped through a microvm\n")
            .expect("write");
    }
    let out = child.wait_with_output().expect("wait");
    assert_eq!(
        stdout(&out),
        "PIPED THROUGH A MICROVM\ndone\n",
        "stderr: {}",
        stderr(&out)
    );
    assert_eq!(out.status.code(), Some(0));
    env.finish();
}

#[test]
fn tty_gives_the_container_a_terminal() {
    let env = TestEnv::new("tty");
    let out = env.run(
        &["-t"],
        &[
            "sh",
            "-c",
            "tty; stty size; test -t 0 && echo stdin-is-a-tty",
        ],
    );
    let text = stdout(&out).replace('\r', "");
    assert!(
        text.contains("/dev/pts/0"),
        "no pty: {text:?} / {}",
        stderr(&out)
    );
    assert!(
        text.contains("24 80"),
        "default window size not applied: {text:?}"
    );
    assert!(text.contains("stdin-is-a-tty"), "{text:?}");
    assert_eq!(out.status.code(), Some(0));
    env.finish();
}

/// The guest's timer ticks at its rate. Its APIC timer is not calibrated at boot (the built-in
/// VMM offers the TSC-deadline mode; QEMU/TCG tells the kernel the frequency with
/// `lapic_timer_khz`), so a wrong frequency would show as a tick rate off by the same factor
/// (sleeps still end on time: the periodic tick re-checks them). Counted over two seconds of the
/// guest's clock while the CPU is busy (no idle tick stop): HZ is 250 (Kconfig's default, which
/// guest.config leaves), so about 500 local timer interrupts.
#[test]
fn the_guest_timer_ticks_at_its_rate() {
    let env = TestEnv::new("tick");
    let script = r#"loc() { awk '/LOC:/{print $2}' /proc/interrupts; }
s=$(date +%s); while [ "$(date +%s)" -eq "$s" ]; do :; done
a=$(loc); s=$((s+1)); while [ "$(date +%s)" -lt $((s+2)) ]; do :; done; b=$(loc)
echo $((b-a))"#;
    let out = env.run(&[], &["sh", "-c", script]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let ticks: u32 = stdout(&out)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("tick count: {:?} {}", stdout(&out), stderr(&out)));
    assert!(
        (300..800).contains(&ticks),
        "{ticks} local timer interrupts in 2 s of guest time (HZ 250: ~500)"
    );
    env.finish();
}

#[test]
fn guest_kernel_is_not_the_hosts() {
    let env = TestEnv::new("uname");
    let out = env.run(&[], &["uname", "-r"]);
    let guest = stdout(&out).trim().to_string();
    let host = String::from_utf8_lossy(
        &std::process::Command::new("uname")
            .arg("-r")
            .output()
            .expect("uname")
            .stdout,
    )
    .trim()
    .to_string();
    assert!(
        guest.ends_with("-pangolin"),
        "guest kernel {guest:?} / {}",
        stderr(&out)
    );
    assert_ne!(guest, host);
    // The guest's clock is the host's (the agent sets it from the host): same second, give or
    // take.
    let out = env.run(&[], &["date", "+%s"]);
    let guest_now: i64 = stdout(&out).trim().parse().expect("date +%s");
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let host_now = i64::try_from(host_now).expect("i64");
    assert!(
        (host_now - guest_now).abs() < 30,
        "guest {guest_now} vs host {host_now}"
    );
    env.finish();
}

#[test]
fn memory_limit_oom_kills_and_is_reported() {
    let env = TestEnv::new("oom");
    // The shell (the container's init) keeps 64 MiB in a variable under a 16 MiB limit.
    let out = env.run(
        &["--memory-limit", "16"],
        &[
            "sh",
            "-c",
            "x=$(dd if=/dev/zero bs=1M count=64 2>/dev/null | tr '\\000' x); echo survived",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(137),
        "stdout {} stderr {}",
        stdout(&out),
        stderr(&out)
    );
    assert!(!stdout(&out).contains("survived"));
    assert!(
        stderr(&out).contains("OOM-killed"),
        "OOM not reported: {}",
        stderr(&out)
    );
    env.finish();
}

#[test]
fn read_only_rootfs_and_workdir_and_env() {
    let env = TestEnv::new("ro");
    let out = env.run(
        &["--read-only", "-w", "/etc", "-e", "GREETING=hi"],
        &[
            "sh",
            "-c",
            "pwd; echo $GREETING; touch /x 2>/dev/null && echo writable || echo read-only",
        ],
    );
    assert_eq!(
        stdout(&out),
        "/etc\nhi\nread-only\n",
        "stderr: {}",
        stderr(&out)
    );
    env.finish();
}

#[test]
fn missing_rootfs_is_a_clear_error_before_booting() {
    let env = TestEnv::new("norootfs");
    let mut cmd = env.pangolin();
    cmd.args(["run", "--rootfs", "/nonexistent/rootfs", "--", "true"]);
    let out = pangolin_e2e::run_bounded(cmd, std::time::Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("--rootfs /nonexistent/rootfs: not a directory"),
        "{}",
        stderr(&out)
    );
    env.finish();
}

#[test]
fn command_not_found_exits_127_with_its_name() {
    let env = TestEnv::new("notfound");
    let out = env.run(&[], &["no-such-command"]);
    assert_eq!(out.status.code(), Some(127), "stderr: {}", stderr(&out));
    assert!(stderr(&out).contains("no-such-command"), "{}", stderr(&out));
    env.finish();
}

#[test]
fn corrupt_config_names_the_key() {
    let env = TestEnv::new("badconfig");
    std::fs::write(&env.config_file, "[hypervisor]\nvcpus = \"two\"\n").expect("write");
    let out = env.run(&[], &["true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("hypervisor.vcpus"),
        "{}",
        stderr(&out)
    );
    std::fs::write(&env.config_file, "[hypervisor\n").expect("write");
    let out = env.run(&[], &["true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("line 1"), "{}", stderr(&out));
    env.finish();
}

/// A state dir that cannot hold a sandbox (full, then read-only: a 64 KiB tmpfs mounted over
/// it) fails the run before anything starts, naming `runtime.state_dir` and why (a full one
/// used to fail as "virtiofsd exited before it was ready", its log empty for want of space),
/// and nothing is made in it.
#[test]
fn a_full_or_read_only_state_dir_is_refused_naming_it() {
    let env = TestEnv::new("statedir");
    std::fs::create_dir_all(&env.state).expect("mkdir state");
    let mount = |opts: &str| {
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(&env.state)
            .status()
            .expect("mount");
        assert!(status.success(), "mount -o {opts}");
    };
    mount("size=64k");
    let fill = env.state.join("fill");
    // Fills it: the write ends with ENOSPC.
    let _ = std::fs::write(&fill, vec![0u8; 128 << 10]);
    let full = env.run(&[], &["true"]);
    let _ = std::fs::remove_file(&fill);
    mount("remount,ro");
    let read_only = env.run(&[], &["true"]);
    let left: Vec<_> = std::fs::read_dir(&env.state)
        .expect("state dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    let _ = std::process::Command::new("umount")
        .arg(&env.state)
        .status();
    for (out, why) in [(&full, "bytes free"), (&read_only, "read-only file system")] {
        assert_eq!(out.status.code(), Some(125), "stderr: {}", stderr(out));
        assert!(
            stderr(out).contains("runtime.state_dir") && stderr(out).contains(why),
            "names the key and {why}: {}",
            stderr(out)
        );
    }
    assert!(left.is_empty(), "made in the state dir: {left:?}");
    env.finish();
}

#[test]
fn missing_qemu_is_named_with_its_key() {
    let env = TestEnv::with("noqemu", |c| {
        c.hypervisor.kind = pangolin_runtime_config::HypervisorKind::Qemu;
        c.hypervisor.qemu_path = "/nonexistent/qemu-system-x86_64".into()
    });
    let out = env.run(&[], &["true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = stderr(&out);
    assert!(
        err.contains("/nonexistent/qemu-system-x86_64") && err.contains("hypervisor.qemu_path"),
        "{err}"
    );
    env.finish();
}

#[test]
fn unreachable_agent_times_out_and_cleans_up() {
    // The agent cannot come up in 300 ms: the boot deadline must end the wait, and teardown
    // must still remove the VM and its daemons.
    let env = TestEnv::with("timeout", |c| c.hypervisor.boot_timeout_ms = 300);
    let out = env.run(&[], &["true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("did not answer within"),
        "{}",
        stderr(&out)
    );
    env.finish();
}

#[test]
fn a_guest_without_init_is_reported_with_its_console() {
    // The kernel finds no init, panics and reboots (panic=-1): the VMM exits during boot.
    let env = TestEnv::with("noinit", |c| {
        c.hypervisor.kernel_params = "rdinit=/nonexistent".into()
    });
    let out = env.run(&[], &["true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = stderr(&out);
    assert!(err.contains("VMM exited") && err.contains("panic"), "{err}");
    env.finish();
}

#[test]
fn killing_the_vmm_ends_the_run_and_cleans_up() {
    let env = TestEnv::new("vmmkill");
    let mut cmd = env.pangolin();
    cmd.arg("run")
        .arg("--rootfs")
        .arg(pangolin_e2e::busybox())
        .args(["--", "sh", "-c", "echo up; sleep 600"]);
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 3];
    std::io::Read::read_exact(&mut stdout, &mut first).expect("container output");
    assert_eq!(&first, b"up\n");
    let qemu = env.vmm_pids();
    assert_eq!(qemu.len(), 1, "one VMM per run");
    std::process::Command::new("kill")
        .arg("-9")
        .arg(qemu[0].to_string())
        .status()
        .expect("kill");
    let started = std::time::Instant::now();
    let status = child.wait().expect("wait");
    assert!(
        started.elapsed() < pangolin_e2e::patience(std::time::Duration::from_secs(10)),
        "run did not notice the VMM died"
    );
    assert_eq!(status.code(), Some(125));
    env.finish();
}

#[test]
fn check_reports_the_host_and_the_backend() {
    let env = TestEnv::new("check");
    let mut cmd = env.pangolin();
    cmd.arg("check");
    let out = pangolin_e2e::run_bounded(cmd, std::time::Duration::from_secs(30));
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("KVM") && text.contains("guest kernel") && text.contains("virtiofsd"),
        "{text}"
    );
    let expected = match std::env::var(pangolin_e2e::HYPERVISOR_ENV).ok().as_deref() {
        Some("builtin") => "builtin picks builtin",
        Some("qemu") => "qemu picks qemu",
        _ if pangolin_e2e::host_has_hardware_kvm() => "auto picks builtin",
        _ => "auto picks qemu",
    };
    assert!(text.contains(expected), "{text}");
    assert!(text.contains("Pangolin can run here."), "{text}");
    // A missing kernel is a MISS line and a non-zero exit.
    let broken = TestEnv::with("checkbad", |c| {
        c.hypervisor.kernel = "/nonexistent/vmlinux".into()
    });
    let mut cmd = broken.pangolin();
    cmd.arg("check");
    let out = pangolin_e2e::run_bounded(cmd, std::time::Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("MISS  guest kernel"),
        "{}",
        stdout(&out)
    );
    broken.finish();
    env.finish();
}

/// The built-in backend's plumbing and cleanup on this host's KVM when the agent does not
/// answer in time: the run ends with a clear error and leaves no VMM, socket or directory. On
/// PVM the guest cannot reach its agent in usable time at all; on hardware-virt KVM no guest
/// reaches it within 100 ms (the shortest `boot_timeout_ms` the configuration accepts).
#[test]
fn builtin_backend_times_out_cleanly_where_the_guest_cannot_boot() {
    let timeout_ms = if pangolin_e2e::host_has_hardware_kvm() {
        100
    } else {
        1500
    };
    let env = TestEnv::with("builtin", |c| c.hypervisor.boot_timeout_ms = timeout_ms);
    let out = env.run(&["--hypervisor", "builtin"], &["true"]);
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(stderr(&out).contains("did not answer"), "{}", stderr(&out));
    env.finish();
}

/// SIGTERM while the VM boots cancels the boot and the run ends with nothing left (before, the
/// signal's default action killed `pangolin run` and its sandbox directory stayed).
#[test]
fn sigterm_during_the_boot_ends_the_run_and_leaves_nothing() {
    let env = TestEnv::new("sigterm-boot");
    let mut child = env
        .pangolin()
        .arg("run")
        .arg("--rootfs")
        .arg(pangolin_e2e::busybox())
        .args(["--", "sleep", "600"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    // The boot takes several hundred milliseconds here: the signal lands in it.
    std::thread::sleep(std::time::Duration::from_millis(150));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    let status = pangolin_e2e::wait_for_end(&mut child, std::time::Duration::from_secs(60));
    assert_ne!(status.code(), Some(0), "the run went on: {status:?}");
    env.finish();
}
