//! Pods restored from VM templates, end to end through `pangolin run`: the first pod of a size
//! class builds its template (a real guest booted to its agent and snapshotted), every later
//! one is restored from it with its own virtiofsd and share, entropy, boot id and clock; a
//! template that fails to restore is removed and the pod boots cold; pods that start at once
//! build one template between them.
//!
//! Templates boot real guests on the built-in VMM, which needs hardware virtualisation: this
//! machine's PVM KVM only gets through early boot, so the tests are `#[ignore]`d here and
//! `tests/testhost.rs` runs them in the nested test host (`--include-ignored`).
#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use pangolin_e2e::{busybox, stderr, stdout, TestEnv};

/// A test environment whose pods use templates kept in `<dir>/templates` (outside the state
/// dir, which must be empty after the test), with a private copy of busybox as the rootfs.
fn env(name: &str) -> (TestEnv, PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("pangolin-e2e-{name}-{}", std::process::id()));
    let templates = dir.join("templates");
    let env = TestEnv::with(name, |c| {
        c.hypervisor.kind = pangolin_runtime_config::HypervisorKind::Builtin;
        c.template.enabled = true;
        c.template.dir = templates.clone();
    });
    let rootfs = env.dir.join("rootfs");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(busybox())
        .arg(&rootfs)
        .status()
        .expect("cp");
    assert!(copied.success(), "copying busybox");
    (env, templates, rootfs)
}

/// `pangolin run --timings --rootfs <rootfs> -- sh -c <script>`, with the shim's info logs.
fn run(env: &TestEnv, rootfs: &Path, script: &str) -> Output {
    spawn_run(env, rootfs, script)
        .wait_with_output()
        .expect("wait")
}

/// [`run`], started in the background.
fn spawn_run(env: &TestEnv, rootfs: &Path, script: &str) -> Child {
    let mut cmd = env.pangolin();
    cmd.env("RUST_LOG", "info,ttrpc=error")
        .args(["run", "--timings", "--rootfs"])
        .arg(rootfs)
        .args(["--", "sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().expect("pangolin run")
}

/// `started_from` of a run's `--timings` line.
fn started_from(out: &Output) -> String {
    let err = stderr(out);
    let line = err
        .lines()
        .find_map(|l| l.strip_prefix("pangolin-timings: "))
        .unwrap_or_else(|| panic!("no timings line in: {err}"));
    let json: serde_json::Value = serde_json::from_str(line).expect("timings JSON");
    json["started_from"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn ok(out: &Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        stdout(out),
        stderr(out)
    );
    stdout(out)
}

/// What a clone's guest says of itself: boot id, 16 random bytes, its wall clock (seconds).
const FACTS: &str = "cat /proc/sys/kernel/random/boot_id; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s";

fn facts(out: &str) -> (String, String, u64) {
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.len() >= 3, "facts: {out:?}");
    let n = lines.len();
    (
        lines[n - 3].to_string(),
        lines[n - 2].to_string(),
        lines[n - 1].trim().parse().expect("date +%s"),
    )
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[test]
#[ignore = "needs hardware-virtualisation KVM: tests/testhost.rs runs it in the nested test host"]
fn pods_restored_from_a_template_share_files_and_are_distinct_guests() {
    let (env, templates, rootfs) = env("tpl-clones");
    // The first pod builds the template, then is restored from it as every later pod is.
    let first = run(
        &env,
        &rootfs,
        &format!("echo written-by-a-clone > /from-guest; {FACTS}"),
    );
    let out = ok(&first);
    assert_eq!(started_from(&first), "template", "{}", stderr(&first));
    assert!(
        templates.join("1vcpu-256mib/template.json").is_file(),
        "the template is kept"
    );
    // The clone wrote through its own virtiofsd into the host's directory.
    assert_eq!(
        std::fs::read_to_string(rootfs.join("from-guest")).expect("the guest's file"),
        "written-by-a-clone\n"
    );
    let (boot_a, random_a, clock_a) = facts(&out);

    std::fs::write(rootfs.join("from-host"), "host-data\n").expect("host file");
    let second = run(&env, &rootfs, &format!("cat /from-host; {FACTS}"));
    let out = ok(&second);
    assert_eq!(started_from(&second), "template", "{}", stderr(&second));
    assert!(
        out.starts_with("host-data\n"),
        "the share is this pod's: {out}"
    );
    let (boot_b, random_b, clock_b) = facts(&out);
    assert_ne!(boot_a, boot_b, "clones have their own boot ids");
    assert_ne!(random_a, random_b, "clones draw their own random numbers");
    for clock in [clock_a, clock_b] {
        assert!(
            clock.abs_diff(now()) < 120,
            "a clone's clock is the host's, not the template's: {clock} vs {}",
            now()
        );
    }
    let builds = [&first, &second]
        .iter()
        .map(|o| stderr(o).matches("VM template built").count())
        .sum::<usize>();
    assert_eq!(builds, 1, "built once, on first use");
    env.finish();
    let _ = std::fs::remove_dir_all(&templates);
}

#[test]
#[ignore = "needs hardware-virtualisation KVM: tests/testhost.rs runs it in the nested test host"]
fn a_corrupted_template_is_refused_and_the_pod_boots_cold() {
    let (env, templates, rootfs) = env("tpl-corrupt");
    let built = env
        .pangolin()
        .args(["template", "build"])
        .output()
        .expect("pangolin template build");
    assert!(built.status.success(), "{}", stderr(&built));
    assert!(
        stdout(&built).contains("1vcpu-256mib: built in"),
        "{}",
        stdout(&built)
    );
    let listed = env
        .pangolin()
        .args(["template", "list"])
        .output()
        .expect("list");
    assert!(
        stdout(&listed).contains("1vcpu-256mib"),
        "{}",
        stdout(&listed)
    );

    // One flipped byte in the state file's payload: its checksum no longer matches.
    let state = templates.join("1vcpu-256mib/state");
    let mut bytes = std::fs::read(&state).expect("state file");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&state, bytes).expect("corrupt");
    let cold = run(&env, &rootfs, "echo still-runs");
    assert_eq!(ok(&cold), "still-runs\n");
    assert_eq!(started_from(&cold), "boot", "{}", stderr(&cold));
    let err = stderr(&cold);
    assert!(
        err.contains("restoring from template 1vcpu-256mib failed"),
        "the reason is logged: {err}"
    );
    assert!(
        !templates.join("1vcpu-256mib").exists(),
        "the bad template is removed"
    );
    // The next pod builds a good one again.
    let again = run(&env, &rootfs, "true");
    ok(&again);
    assert_eq!(started_from(&again), "template", "{}", stderr(&again));

    let rm = env
        .pangolin()
        .args(["template", "rm", "--all"])
        .output()
        .expect("rm");
    assert!(
        stdout(&rm).contains("1vcpu-256mib: removed"),
        "{}",
        stdout(&rm)
    );
    env.finish();
    let _ = std::fs::remove_dir_all(&templates);
}

#[test]
#[ignore = "needs hardware-virtualisation KVM: tests/testhost.rs runs it in the nested test host"]
fn pods_started_at_once_build_one_template() {
    let (env, templates, rootfs) = env("tpl-once");
    let children: Vec<_> = (0..5)
        .map(|i| spawn_run(&env, &rootfs, &format!("echo pod {i}")))
        .collect();
    let outs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait"))
        .collect();
    let mut builds = 0;
    for (i, out) in outs.iter().enumerate() {
        assert_eq!(ok(out), format!("pod {i}\n"));
        assert_eq!(started_from(out), "template", "{}", stderr(out));
        builds += stderr(out).matches("VM template built").count();
    }
    assert_eq!(builds, 1, "five pods at once, one build");
    env.finish();
    let _ = std::fs::remove_dir_all(&templates);
}
