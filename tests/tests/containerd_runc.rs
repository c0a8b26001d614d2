//! The containerd test infrastructure, proved with the stock runc runtime
//! (`io.containerd.runc.v2`): a private containerd, a locally built busybox image, `ctr run`.

#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pangolin_e2e::containerd::{self, Options, PrivateContainerd, BUSYBOX_IMAGE};
use pangolin_e2e::{busybox, processes_mentioning, run_bounded, stderr, stdout};

/// target/<profile>, where `containerd-shim-pangolin-v2` is built.
fn shim_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test> -> target/debug
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("target dir")
}

fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pangolin-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Asserts the stopped containerd left nothing (processes, mounts) and removes its directory.
fn assert_gone(dir: &Path) {
    let procs = processes_mentioning(dir);
    assert!(procs.is_empty(), "left running: {procs:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let needle = dir.to_string_lossy();
    let left: Vec<&str> = mounts.lines().filter(|l| l.contains(&*needle)).collect();
    assert!(left.is_empty(), "left mounted: {left:?}");
    std::fs::remove_dir_all(dir).expect("remove the test dir");
}

#[test]
fn runc_runs_busybox_through_a_private_containerd() {
    let dir = test_dir("containerd-runc");
    let t = Instant::now();
    let ctrd = PrivateContainerd::start(&dir, &shim_dir()).expect("start containerd");
    let started = t.elapsed();

    let t = Instant::now();
    ctrd.import_busybox(&busybox(), BUSYBOX_IMAGE)
        .expect("import busybox");
    let imported = t.elapsed();

    let t = Instant::now();
    let out = run_bounded(
        ctrd.ctr(["run", "--rm", BUSYBOX_IMAGE, "t1", "echo", "hello"]),
        Duration::from_secs(120),
    );
    let ran = t.elapsed();
    assert!(
        out.status.success(),
        "ctr run failed: {}\ncontainerd log:\n{}",
        stderr(&out),
        ctrd.log_tail(30)
    );
    assert_eq!(stdout(&out), "hello\n");

    // --rm: no container, no task, no shim left.
    let containers = ctrd
        .ctr_output(["container", "ls", "-q"])
        .expect("ctr container ls");
    assert!(
        containers.trim().is_empty(),
        "containers left: {containers}"
    );
    let tasks = ctrd.ctr_output(["task", "ls", "-q"]).expect("ctr task ls");
    assert!(tasks.trim().is_empty(), "tasks left: {tasks}");
    let procs = ctrd.leftover_processes();
    assert!(procs.is_empty(), "shims left: {procs:?}");

    let t = Instant::now();
    ctrd.stop().expect("clean stop");
    let stopped = t.elapsed();
    eprintln!(
        "containerd start {started:?}, busybox import {imported:?}, ctr run --rm {ran:?}, stop {stopped:?}"
    );
    assert_gone(&dir);
}

#[test]
fn containerd_starts_with_the_cri_plugin_enabled() {
    let dir = test_dir("containerd-cri");
    let ctrd = PrivateContainerd::start_with(
        &dir,
        &shim_dir(),
        &Options {
            cri: true,
            ..Options::default()
        },
    )
    .expect("start containerd with CRI");
    let plugins = ctrd.ctr_output(["plugins", "ls"]).expect("ctr plugins ls");
    let cri = plugins
        .lines()
        .find(|l| l.contains("io.containerd.grpc.v1") && l.contains(" cri "))
        .unwrap_or_else(|| panic!("no CRI plugin listed:\n{plugins}"));
    assert!(
        cri.trim_end().ends_with("ok"),
        "CRI plugin not ok: {cri}\n{}",
        ctrd.log_tail(30)
    );
    ctrd.stop().expect("clean stop");
    assert_gone(&dir);
}

#[test]
fn the_image_archive_is_reproducible() {
    let dir = test_dir("containerd-oci");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let (a, b) = (dir.join("a.tar"), dir.join("b.tar"));
    containerd::write_oci_archive(&busybox(), BUSYBOX_IMAGE, &["sh"], &a).expect("archive a");
    containerd::write_oci_archive(&busybox(), BUSYBOX_IMAGE, &["sh"], &b).expect("archive b");
    assert_eq!(
        std::fs::read(&a).expect("read a"),
        std::fs::read(&b).expect("read b")
    );
    std::fs::remove_dir_all(&dir).expect("rm");
}

#[test]
fn a_containerd_that_cannot_start_reports_its_log() {
    let dir = test_dir("containerd-bad");
    let err = PrivateContainerd::start_with(
        &dir,
        &shim_dir(),
        &Options {
            extra_config: "[grpc\n".into(),
            ..Options::default()
        },
    )
    .err()
    .expect("a broken config must fail");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("exited") && msg.contains("containerd.log") && msg.contains("toml"),
        "{msg}"
    );
    assert_gone(&dir);
}
