//! Snapshot and restore of a real guest on this host's KVM: a template VMM (seccomp on) boots
//! the guest kernel to its console, writes itself out on `snapshot` and exits 5; a second VMM
//! restored from the files carries on running that kernel, which goes on printing to the new
//! VMM's console where the first one stopped. Corrupt or mismatched snapshots are refused with
//! the reason.
//!
//! On a PVM host (these CI machines) the guest only gets through early boot in usable time, so
//! the snapshot is taken there; on hardware-virtualisation KVM the same tests pass too. The
//! template that matters, a guest whose agent is up, needs hardware virtualisation: that test is
//! `#[ignore]`d here and run by `tests/tests/testhost.rs` in the nested test host
//! (`--include-ignored`). Needs `/dev/kvm` and `target/guest/{vmlinux,initramfs.cpio}`
//! (`cargo xtask guest`); without them each test fails saying so.
#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

mod common;

use common::{request, PVM_SAFE};

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MEMORY_MIB: u64 = 256;

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn kernel(test: &str) -> Option<PathBuf> {
    if !Path::new("/dev/kvm").exists() {
        common::cannot_run(
            test,
            "/dev/kvm does not exist: the built-in VMM runs on KVM only",
        );
        return None;
    }
    let kernel = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest/vmlinux");
    if !kernel.exists() {
        common::cannot_run(
            test,
            "target/guest/vmlinux is missing: run `cargo xtask guest`",
        );
        return None;
    }
    Some(kernel)
}

/// The fingerprint the tests stamp and expect (the host side computes real digests; the VMM
/// only compares): `host_kernel` varies to make a mismatch.
fn fingerprint(cmdline: &str, initramfs: bool, host_kernel: &str) -> serde_json::Value {
    serde_json::json!({
        "kernel_sha256": "k", "initramfs_sha256": initramfs.then_some("i"), "vmm_sha256": "v",
        "vcpus": 2, "memory_mib": MEMORY_MIB, "cmdline": cmdline,
        "host_cpu": "c", "host_kernel": host_kernel,
    })
}

/// A VMM config in `dir`, its console at `console`, with `extra` merged in.
fn config(kernel: &Path, dir: &Path, name: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut c = serde_json::json!({
        "kernel": kernel,
        "cmdline": format!("console=ttyS0 {PVM_SAFE} reboot=t panic=-1"),
        "vcpus": 2,
        "memory_mib": MEMORY_MIB,
        "console_log": dir.join(format!("{name}.log")),
        "api_socket": dir.join(format!("{name}.sock")),
    });
    if let (Some(c), serde_json::Value::Object(extra)) = (c.as_object_mut(), extra) {
        c.extend(extra);
    }
    c
}

fn spawn(config: &serde_json::Value) -> Child {
    Command::new(env!("CARGO_BIN_EXE_pangolin-vmm"))
        .arg("--config-json")
        .arg(config.to_string())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pangolin-vmm")
}

/// Waits for `vmm` to exit (at most `limit`); its status and stderr.
fn finish(mut vmm: Child, limit: Duration) -> (Option<i32>, String) {
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = vmm.try_wait().expect("wait") {
            break s.code();
        }
        if Instant::now() > deadline {
            let _ = vmm.kill();
            let _ = vmm.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut e) = vmm.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    (status, stderr)
}

/// Waits until `log` holds `needle` while `vmm` runs; the log so far.
fn wait_for(vmm: &mut Child, log: &Path, needle: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        if let Ok(Some(status)) = vmm.try_wait() {
            panic!("VMM exited ({status}) before {needle:?}; console:\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} within {limit:?}; console:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Boots a template VMM to the console and snapshots it; the files' paths.
fn take_snapshot(kernel: &Path, dir: &Path) -> (PathBuf, PathBuf, String) {
    let (state, memory) = (dir.join("state"), dir.join("memory"));
    let cmdline = format!("console=ttyS0 {PVM_SAFE} reboot=t panic=-1");
    let files = serde_json::json!({
        "state": state, "memory": memory, "fingerprint": fingerprint(&cmdline, false, "h"),
    });
    let c = config(
        kernel,
        dir,
        "template",
        serde_json::json!({ "snapshot": files }),
    );
    let mut vmm = spawn(&c);
    let log = dir.join("template.log");
    let before = wait_for(
        &mut vmm,
        &log,
        "console [ttyS0] enabled",
        Duration::from_secs(90),
    );
    let answer = request(&dir.join("template.sock"), "snapshot");
    let (status, stderr) = finish(vmm, Duration::from_secs(30));
    assert_eq!(answer, "ok\n", "snapshot answer; stderr:\n{stderr}");
    assert_eq!(
        status,
        Some(5),
        "exit status after a snapshot; stderr:\n{stderr}"
    );
    assert!(stderr.contains("snapshot written"), "{stderr}");
    // The console as it was when the vCPUs stopped.
    let at_snapshot = std::fs::read_to_string(&log).unwrap_or(before);
    (state, memory, at_snapshot)
}

#[test]
fn a_restored_guest_carries_on_from_where_the_template_stopped() {
    let test = "a_restored_guest_carries_on_from_where_the_template_stopped";
    let Some(kernel) = kernel(test) else { return };
    let dir = Dir(std::env::temp_dir().join(format!("pangolin-snapshot-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let (state, memory, at_snapshot) = take_snapshot(&kernel, &dir.0);

    let mem = std::fs::metadata(&memory).expect("memory file");
    assert_eq!(mem.len(), MEMORY_MIB << 20, "laid out like guest RAM");
    let allocated = mem.blocks() * 512;
    eprintln!(
        "memory file: {} MiB of {MEMORY_MIB} MiB allocated; state file {} bytes",
        allocated >> 20,
        std::fs::metadata(&state).expect("state").len()
    );
    assert!(
        allocated < (MEMORY_MIB << 20) / 2,
        "sparse: {allocated} bytes allocated"
    );

    // The restored VMM has its own console: what the kernel prints next lands there.
    let cmdline = format!("console=ttyS0 {PVM_SAFE} reboot=t panic=-1");
    let files = serde_json::json!({
        "state": state, "memory": memory, "fingerprint": fingerprint(&cmdline, false, "h"),
    });
    let c = config(
        &kernel,
        &dir.0,
        "clone",
        serde_json::json!({ "restore": files }),
    );
    let started = Instant::now();
    let mut vmm = spawn(&c);
    let log = dir.0.join("clone.log");
    let deadline = started + Duration::from_secs(90);
    let printed = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        // A whole line the template never printed: the guest ran on in the clone.
        if text.lines().count() >= 2 {
            break text;
        }
        if let Ok(Some(status)) = vmm.try_wait() {
            let (_, stderr) = finish(vmm, Duration::from_secs(1));
            panic!("restored VMM exited ({status}); stderr:\n{stderr}\nconsole:\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "the clone printed nothing within 90 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = started.elapsed();
    let status = request(&dir.0.join("clone.sock"), "status");
    assert!(status.contains("\"state\":\"running\""), "{status}");
    assert_eq!(request(&dir.0.join("clone.sock"), "stop"), "ok\n");
    let (code, stderr) = finish(vmm, Duration::from_secs(10));
    eprintln!(
        "template's last line: {:?}\nthe clone printed within {elapsed:?}:\n{printed}",
        at_snapshot.lines().last().unwrap_or_default()
    );
    assert_eq!(code, Some(3), "stop exit status; stderr:\n{stderr}");
    assert!(stderr.contains("snapshot loaded"), "{stderr}");
    assert!(stderr.contains("started_from=\"snapshot\""), "{stderr}");
    let first = printed.lines().next().unwrap_or_default();
    assert!(
        !first.contains("Linux version"),
        "the clone booted from scratch instead of restoring:\n{printed}"
    );
    // Each line the clone printed comes after the template's last one: none is repeated.
    let last_template_line = at_snapshot.lines().last().unwrap_or_default().to_owned();
    for line in printed.lines().skip(1) {
        assert_ne!(
            line, last_template_line,
            "clone repeated the template's output"
        );
    }
}

/// The agent's vsock port and the host port it reports READY on (pangolin-protocols).
const AGENT_PORT: u32 = 1024;
const READY_PORT: u32 = 1025;

/// `CONNECT <port>` through the hybrid vsock socket `uds`; the guest's answer line.
fn vsock_connect(uds: &Path, port: u32) -> std::io::Result<String> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') && line.len() < 64 {
        if s.read(&mut byte)? == 0 {
            break;
        }
        line.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Retries [`vsock_connect`] until the guest accepts (`OK <port>`); how long it took.
fn until_agent_accepts(uds: &Path, vmm: &mut Child, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if let Ok(line) = vsock_connect(uds, AGENT_PORT) {
            if line.starts_with("OK ") {
                return started.elapsed();
            }
        }
        if let Ok(Some(status)) = vmm.try_wait() {
            panic!("VMM exited ({status}) before the agent accepted");
        }
        assert!(
            started.elapsed() < limit,
            "the agent did not accept within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
#[ignore = "needs hardware-virtualisation KVM: tests/tests/testhost.rs runs it in the nested test host"]
fn a_clone_of_a_template_whose_agent_was_up_answers_on_its_own_vsock() {
    let test = "a_clone_of_a_template_whose_agent_was_up_answers_on_its_own_vsock";
    let Some(kernel) = kernel(test) else { return };
    let initramfs = kernel.with_file_name("initramfs.cpio");
    assert!(
        initramfs.exists(),
        "{} missing: run `cargo xtask guest`",
        initramfs.display()
    );
    let dir = Dir(std::env::temp_dir().join(format!("pangolin-snapagent-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let slow: u32 = std::env::var("PANGOLIN_TEST_SLOWDOWN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let limit = Duration::from_secs(30) * slow;
    let cmdline = "console=ttyS0 reboot=t panic=-1 quiet".to_string();
    let (state, memory) = (dir.0.join("state"), dir.0.join("memory"));
    let files = serde_json::json!({
        "state": state, "memory": memory, "fingerprint": fingerprint(&cmdline, true, "h"),
    });
    let guest = |name: &str, extra: serde_json::Value| {
        let mut c = config(&kernel, &dir.0, name, extra);
        c["cmdline"] = cmdline.clone().into();
        c["initramfs"] = serde_json::json!(initramfs);
        c["rng"] = true.into();
        c["vsock"] = serde_json::json!({
            "guest_cid": 3, "uds_path": dir.0.join(format!("{name}.vsock")),
        });
        c
    };

    // Cold: boot until the agent says READY on the host's port, then until it accepts.
    let ready =
        std::os::unix::net::UnixListener::bind(dir.0.join(format!("template.vsock_{READY_PORT}")))
            .expect("READY listener");
    let started = Instant::now();
    let mut template = spawn(&guest("template", serde_json::json!({ "snapshot": files })));
    ready.set_nonblocking(true).expect("nonblocking");
    loop {
        if ready.accept().is_ok() {
            break;
        }
        if let Ok(Some(status)) = template.try_wait() {
            let (_, stderr) = finish(template, Duration::from_secs(1));
            let console = std::fs::read_to_string(dir.0.join("template.log")).unwrap_or_default();
            panic!("template exited ({status}):\n{stderr}\nconsole:\n{console}");
        }
        assert!(
            started.elapsed() < limit * 4,
            "no READY within {:?}",
            limit * 4
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let cold_ready = started.elapsed();
    until_agent_accepts(&dir.0.join("template.vsock"), &mut template, limit);
    let cold = started.elapsed();
    // The connection is closed; the template is taken with the agent idle.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(request(&dir.0.join("template.sock"), "snapshot"), "ok\n");
    let (code, stderr) = finish(template, limit);
    assert_eq!(code, Some(5), "{stderr}");

    // The clone: its own vsock socket, console and control socket; no READY (the agent said it
    // to the template), its listener answers once the transport reset is through.
    let mut clone = spawn(&guest("clone", serde_json::json!({ "restore": files })));
    let accepted = until_agent_accepts(&dir.0.join("clone.vsock"), &mut clone, limit);
    let second = vsock_connect(&dir.0.join("clone.vsock"), AGENT_PORT).expect("again");
    assert!(second.starts_with("OK "), "{second}");
    assert_eq!(request(&dir.0.join("clone.sock"), "stop"), "ok\n");
    let (code, stderr) = finish(clone, limit);
    eprintln!(
        "cold boot: READY after {cold_ready:?}, agent accepting after {cold:?}; \
         clone: agent accepting {accepted:?} after spawn\nclone's log:\n{stderr}"
    );
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains("transport reset sent to the restored guest"),
        "{stderr}"
    );
}

#[test]
fn corrupt_or_mismatched_snapshots_are_refused_with_the_reason() {
    let test = "corrupt_or_mismatched_snapshots_are_refused_with_the_reason";
    let Some(kernel) = kernel(test) else { return };
    let dir = Dir(std::env::temp_dir().join(format!("pangolin-snapbad-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let (state, memory, _) = take_snapshot(&kernel, &dir.0);
    let cmdline = format!("console=ttyS0 {PVM_SAFE} reboot=t panic=-1");
    let restore = |name: &str, state: &Path, fp: serde_json::Value| {
        let files = serde_json::json!({ "state": state, "memory": memory, "fingerprint": fp });
        let c = config(
            &kernel,
            &dir.0,
            name,
            serde_json::json!({ "restore": files }),
        );
        finish(spawn(&c), Duration::from_secs(30))
    };

    // An expected fingerprint that does not describe the VM configured is refused up front.
    let (code, stderr) = restore(
        "other-cmdline",
        &state,
        fingerprint("console=ttyS1", false, "h"),
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("fingerprint.cmdline differs from cmdline"),
        "{stderr}"
    );
    // One that does, but is not the snapshot's, is refused when the state file is read.
    let (code, stderr) = restore("other-host", &state, fingerprint(&cmdline, false, "other"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("snapshot taken with another host_kernel"),
        "{stderr}"
    );

    let mut bytes = std::fs::read(&state).expect("state");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    let flipped = dir.0.join("flipped");
    std::fs::write(&flipped, &bytes).expect("write");
    let (code, stderr) = restore("flipped", &flipped, fingerprint(&cmdline, false, "h"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("snapshot checksum mismatch"), "{stderr}");

    // A VMM that is not a template refuses the request and keeps running.
    let c = config(&kernel, &dir.0, "plain", serde_json::json!({}));
    let mut vmm = spawn(&c);
    let sock = dir.0.join("plain.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        request(&sock, "snapshot").starts_with("error: no snapshot files configured"),
        "plain VMM"
    );
    assert!(request(&sock, "status").contains("\"state\":\"running\""));
    assert_eq!(request(&sock, "stop"), "ok\n");
    let _ = vmm.wait();
}
