//! Boots the real guest kernel on this host's KVM and checks the early console: the VMM's boot
//! path (ELF/PVH load, start info + memory map, command line, MP table, serial, control socket).
//!
//! On a PVM host (these CI machines) the guest only gets through early boot in usable time, which
//! is exactly what this checks; on hardware-virtualisation KVM the same test passes in a second.
//! Needs `/dev/kvm` and `target/guest/vmlinux` (`cargo xtask guest`); without either it fails
//! saying so.
#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

mod common;

use common::{request, PVM_SAFE};

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn guest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest")
}

#[test]
fn guest_kernel_reaches_console_setup_with_our_cmdline_e820_and_mptable() {
    let kernel = guest_dir().join("vmlinux");
    assert!(
        kernel.exists(),
        "{} missing: run `cargo xtask guest`",
        kernel.display()
    );
    early_boot(&kernel, "pvh", "Pvh");
}

/// The same kernel without its PVH note boots through the Linux 64-bit boot protocol (zero page,
/// identity-mapped long mode).
#[test]
fn kernel_without_pvh_note_boots_through_the_64_bit_protocol() {
    let kernel = guest_dir().join("vmlinux");
    assert!(
        kernel.exists(),
        "{} missing: run `cargo xtask guest`",
        kernel.display()
    );
    let stripped =
        std::env::temp_dir().join(format!("pangolin-vmlinux-nopvh-{}", std::process::id()));
    let status = Command::new("objcopy")
        .args(["-R", ".notes"])
        .arg(&kernel)
        .arg(&stripped)
        .status()
        .expect("objcopy (binutils) is needed to strip the PVH note");
    assert!(status.success(), "objcopy failed");
    early_boot(&stripped, "linux64", "Linux64");
    let _ = std::fs::remove_file(&stripped);
}

fn early_boot(kernel: &Path, tag: &str, entry: &str) {
    assert!(
        Path::new("/dev/kvm").exists(),
        "this test needs /dev/kvm: the built-in VMM runs on KVM only"
    );
    let dir = std::env::temp_dir().join(format!("pangolin-vmm-early-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let console = dir.join("console.log");
    let api = dir.join("api.sock");
    let marker = format!("pangolin.test={}", std::process::id());
    let config = serde_json::json!({
        "kernel": kernel,
        "cmdline": format!("console=ttyS0 {PVM_SAFE} reboot=t panic=-1 {marker}"),
        "vcpus": 2,
        "memory_mib": 256,
        "console_log": console,
        "api_socket": api,
    });
    let started = Instant::now();
    let mut vmm = Command::new(env!("CARGO_BIN_EXE_pangolin-vmm"))
        .arg("--config-json")
        .arg(config.to_string())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pangolin-vmm");

    let deadline = started + Duration::from_secs(90);
    let mut log = String::new();
    while Instant::now() < deadline {
        log = std::fs::read_to_string(&console).unwrap_or_default();
        if log.contains("console [ttyS0] enabled") {
            break;
        }
        if let Ok(Some(status)) = vmm.try_wait() {
            panic!("VMM exited early ({status}); console:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let elapsed = started.elapsed();
    let status_line = request(&api, "status");
    let metrics: serde_json::Value =
        serde_json::from_str(&request(&api, "metrics")).expect("metrics JSON");
    assert_eq!(request(&api, "pause"), "ok\n");
    assert!(request(&api, "status").contains("\"state\":\"paused\""));
    assert_eq!(request(&api, "resume"), "ok\n");
    assert_eq!(request(&api, "stop"), "ok\n");
    let status = vmm.wait().expect("wait");
    let mut stderr = String::new();
    if let Some(mut e) = vmm.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let _ = std::fs::remove_dir_all(&dir);

    eprintln!("console [ttyS0] enabled after {elapsed:?}");
    assert!(
        log.contains("console [ttyS0] enabled"),
        "no console within 90 s:\n{log}"
    );
    assert!(
        log.contains(&format!("Command line: console=ttyS0 {PVM_SAFE}")),
        "{log}"
    );
    assert!(log.contains(&marker), "{log}");
    assert!(
        log.contains("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable"),
        "{log}"
    );
    assert!(
        log.contains("BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable"),
        "{log}"
    );
    assert!(log.contains("MPTABLE: OEM ID: PANGOLIN"), "{log}");
    assert!(log.contains("Processor #1"), "{log}");
    assert!(log.contains("smpboot: Allowing 2 CPUs"), "{log}");
    assert!(
        status_line.starts_with("{\"state\":\"running\",\"vcpus\":2"),
        "{status_line}"
    );
    assert_eq!(
        status.code(),
        Some(3),
        "stop request exit status; stderr:\n{stderr}"
    );
    assert!(stderr.contains("guest started"), "{stderr}");
    assert!(stderr.contains(&format!("entry={entry}")), "{stderr}");
    // The console's bytes went out through the serial port: one port write exit each.
    let io_out = metrics["exits"]["io_out"].as_u64().unwrap_or(0);
    assert!(
        io_out >= log.len() as u64,
        "{io_out} port writes for {} console bytes: {metrics}",
        log.len()
    );
    assert_eq!(metrics["guest_errors"]["vsock"], 0, "{metrics}");
}

#[test]
fn bad_config_is_refused_naming_the_field() {
    let run = |vcpus: u8| {
        let config = serde_json::json!({
            "kernel": "/nonexistent", "cmdline": "", "vcpus": vcpus, "memory_mib": 128,
            "console_log": "/dev/null",
        });
        Command::new(env!("CARGO_BIN_EXE_pangolin-vmm"))
            .arg("--config-json")
            .arg(config.to_string())
            .output()
            .expect("run")
    };
    let out = run(0);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("vcpus"));
    let out = run(1);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("kernel /nonexistent"));
}
