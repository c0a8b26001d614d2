//! Clones of one VM template are distinct guests: a template VMM boots the real guest until its
//! agent is up and writes itself out; two VMMs restored from it each answer the host's first
//! agent call (GetGuestDetails, which carries the host's entropy and clock) and report their own
//! boot id, drawn after the reseed, while the template's kernel, memory and agent are the same.
//!
//! The template must boot to its agent, which needs hardware virtualisation: this machine's PVM
//! KVM only gets through early boot, so the test is `#[ignore]`d here and `tests/testhost.rs`
//! runs it in the nested test host (`--include-ignored`). The VMM-level snapshot tests
//! (`vmm/tests/snapshot.rs`) run here too.
#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pangolin_e2e::{patience, root};
use pangolin_protocols::{AGENT_READY_PORT, AGENT_VSOCK_PORT};
use pangolin_shim::agent::AgentClient;

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A guest VMM config in `dir` named `name`, with `extra` merged in.
fn config(dir: &Path, name: &str, extra: serde_json::Value) -> serde_json::Value {
    let guest = root().join("target/guest");
    let mut c = serde_json::json!({
        "kernel": guest.join("vmlinux"),
        "initramfs": guest.join("initramfs.cpio"),
        "cmdline": "console=ttyS0 reboot=t panic=-1 quiet",
        "vcpus": 1,
        "memory_mib": 256,
        "console_log": dir.join(format!("{name}.log")),
        "api_socket": dir.join(format!("{name}.sock")),
        "vsock": { "guest_cid": 3, "uds_path": dir.join(format!("{name}.vsock")) },
        "rng": true,
    });
    if let (Some(c), serde_json::Value::Object(extra)) = (c.as_object_mut(), extra) {
        c.extend(extra);
    }
    c
}

fn spawn(config: &serde_json::Value) -> Child {
    Command::new(root().join("target/debug/pangolin-vmm"))
        .arg("--config-json")
        .arg(config.to_string())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn target/debug/pangolin-vmm (cargo build --workspace --bins)")
}

fn control(sock: &Path, line: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("control socket");
    s.write_all(format!("{line}\n").as_bytes()).expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

/// The VMM's exit status and stderr, killing it after `limit`.
fn finish(mut vmm: Child, limit: Duration) -> (Option<i32>, String) {
    use std::io::Read;
    let deadline = Instant::now() + limit;
    let code = loop {
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
    let mut err = String::new();
    if let Some(mut e) = vmm.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (code, err)
}

/// Connects to the agent behind `uds` and asks for the guest's details, as the shim does first.
fn details(uds: &Path, limit: Duration) -> pangolin_protocols::agent::GuestDetails {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let agent = AgentClient::connect(uds, AGENT_VSOCK_PORT, Instant::now() + limit, || Ok(()))
            .await
            .expect("agent answers");
        agent
            .guest_details(None, None)
            .await
            .expect("GetGuestDetails")
    })
}

#[test]
#[ignore = "needs hardware-virtualisation KVM: tests/testhost.rs runs it in the nested test host"]
fn two_clones_of_one_template_have_their_own_boot_ids() {
    let dir = Dir(std::env::temp_dir().join(format!("pangolin-clones-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let limit = patience(Duration::from_secs(30));
    let files = serde_json::json!({
        "state": dir.0.join("state"),
        "memory": dir.0.join("memory"),
        "fingerprint": {
            "kernel_sha256": "k", "initramfs_sha256": "i", "vmm_sha256": "v", "vcpus": 1,
            "memory_mib": 256, "cmdline": "console=ttyS0 reboot=t panic=-1 quiet",
            "host_cpu": "c", "host_kernel": "h",
        },
    });

    // The template: booted until the agent says READY, then written out, its agent never
    // called (nothing in it has drawn a boot id).
    let ready = UnixListener::bind(dir.0.join(format!("template.vsock_{AGENT_READY_PORT}")))
        .expect("READY listener");
    ready.set_nonblocking(true).expect("nonblocking");
    let started = Instant::now();
    let mut template = spawn(&config(
        &dir.0,
        "template",
        serde_json::json!({ "snapshot": files }),
    ));
    while ready.accept().is_err() {
        if let Ok(Some(status)) = template.try_wait() {
            let console = std::fs::read_to_string(dir.0.join("template.log")).unwrap_or_default();
            panic!("template exited ({status}) before READY:\n{console}");
        }
        assert!(
            started.elapsed() < limit * 2,
            "no READY within {:?}",
            limit * 2
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let cold = started.elapsed();
    assert_eq!(control(&dir.0.join("template.sock"), "snapshot"), "ok\n");
    let (code, err) = finish(template, limit);
    assert_eq!(code, Some(5), "{err}");

    let mut boot_ids = Vec::new();
    for name in ["clone-a", "clone-b"] {
        let started = Instant::now();
        let clone = spawn(&config(
            &dir.0,
            name,
            serde_json::json!({ "restore": files }),
        ));
        let d = details(&dir.0.join(format!("{name}.vsock")), limit);
        let answered = started.elapsed();
        assert_eq!(control(&dir.0.join(format!("{name}.sock")), "stop"), "ok\n");
        let (code, err) = finish(clone, limit);
        assert_eq!(code, Some(3), "{err}");
        assert!(err.contains("started_from=\"snapshot\""), "{err}");
        eprintln!(
            "{name}: GetGuestDetails answered {answered:?} after spawn (template: READY {cold:?} \
             after spawn), boot id {}",
            d.boot_id
        );
        assert_eq!(d.boot_id.len(), 36, "a UUID: {:?}", d.boot_id);
        boot_ids.push(d.boot_id);
    }
    assert_ne!(
        boot_ids[0], boot_ids[1],
        "two clones drew the same boot id: their CRNGs were not reseeded apart"
    );
}
