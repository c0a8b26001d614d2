//! The nested test host: a TCG VM with emulated SVM whose `/dev/kvm` is hardware-virtualisation
//! KVM. Inside it Pangolin must see such a KVM and pick it: the path a host with VT-x/AMD-V
//! takes, which this machine's own KVM (PVM) cannot show.
//!
//! Not yet here: booting a container on that KVM in CI. It works (agent ready at guest boottime
//! ~3.7 s) but the nested guest stalls before its first console line in about half the boots
//! (seen with every CPU model tried; multi-threaded TCG or -smp 2 in the test host stalls it
//! always), so such a test would be flaky. Tracked in the "Nested test host" issue.

#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

use std::process::Command;
use std::time::Duration;

use pangolin_e2e::{pangolin_bin, root, run_bounded, stderr, stdout};

#[test]
fn nested_test_host_has_hardware_kvm_and_pangolin_picks_it() {
    let xtask = root().join("target/debug/xtask");
    assert!(
        xtask.exists(),
        "{} is missing: run `cargo build --workspace --bins`",
        xtask.display()
    );
    let script = format!(
        "test -c /dev/kvm && echo kvm-device-ok; grep -qw svm /proc/cpuinfo && echo svm-ok; {} check",
        pangolin_bin().display()
    );
    let mut cmd = Command::new(xtask);
    cmd.args(["testhost", "--timeout", "300", "--", "sh", "-c", &script]);
    let out = run_bounded(cmd, Duration::from_secs(400));
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{text}\nstderr:\n{}",
        stderr(&out)
    );
    assert!(
        text.contains("kvm-device-ok") && text.contains("svm-ok"),
        "{text}"
    );
    assert!(
        text.contains("hardware virtualisation (VT-x/AMD-V)"),
        "KVM kind inside the test host:\n{text}"
    );
    assert!(text.contains("auto picks builtin"), "{text}");
    assert!(text.contains("pangolin-vmm"), "{text}");
    assert!(text.contains("Pangolin can run here."), "{text}");
}

#[test]
fn testhost_returns_the_commands_status_and_enforces_its_timeout() {
    let xtask = root().join("target/debug/xtask");
    let mut cmd = Command::new(&xtask);
    cmd.args(["testhost", "--", "sh", "-c", "echo inside; exit 3"]);
    let out = run_bounded(cmd, Duration::from_secs(400));
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stdout(&out).contains("inside"));
    let mut cmd = Command::new(&xtask);
    cmd.args(["testhost", "--timeout", "5", "--", "sleep", "600"]);
    let out = run_bounded(cmd, Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(124), "{}", stderr(&out));
    assert!(stderr(&out).contains("timeout"), "{}", stderr(&out));
}
