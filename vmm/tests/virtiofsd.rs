//! virtio-fs against the real daemon: starts the Rust `virtiofsd` (what the shim runs; `cargo
//! xtask` installs it into ~/.cargo/bin) on a temporary directory,
//! connects, activates with two rings in guest memory, then plays the guest's first FUSE request
//! (`FUSE_INIT`) on the request queue and checks the daemon's answer arrives through the VMM's
//! call forwarding. Needs root (virtiofsd sandboxes itself in namespaces).
#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use pangolin_vmm::devices::virtio::fs::VhostUserFs;
use pangolin_vmm::devices::virtio::{
    ActivateContext, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING,
};
use pangolin_vmm::memory::GuestMemoryMmap;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the daemon cannot be run, for [`common::cannot_run`].
const NOT_INSTALLED: &str = "virtiofsd is not on PATH or in ~/.cargo/bin (cargo install virtiofsd)";
const FUSE_INIT: u32 = 26;
const REQ_BUF: u64 = 0x40_0000;
const REPLY_BUF: u64 = 0x41_0000;

/// A descriptor flag of virtio-bindings (a u32) as the 16-bit `flags` field takes it.
fn flag(bit: u32) -> u16 {
    u16::try_from(bit).expect("descriptor flags are 16 bits")
}

struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// virtiofsd where the shim looks for its default bare name: PATH, then ~/.cargo/bin.
fn virtiofsd() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("virtiofsd"))
        .find(|p| p.is_file())
}

fn start_daemon(name: &str) -> (Daemon, PathBuf) {
    let dir =
        std::env::temp_dir().join(format!("pangolin-virtiofsd-{}-{name}", std::process::id()));
    let source = dir.join("shared");
    std::fs::create_dir_all(&source).expect("temp dir");
    std::fs::write(source.join("hello"), b"hi").expect("file");
    let socket = dir.join("vfs.sock");
    let child = Command::new(virtiofsd().expect("virtiofsd"))
        .arg(format!("--socket-path={}", socket.display()))
        .arg(format!("--shared-dir={}", source.display()))
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn virtiofsd");
    let daemon = Daemon { child, dir };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "virtiofsd never created its socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (daemon, socket)
}

fn fuse_init_request(mem: &GuestMemoryMmap) -> u32 {
    let mut req = Vec::new();
    let len: u32 = 40 + 64;
    req.extend_from_slice(&len.to_le_bytes());
    req.extend_from_slice(&FUSE_INIT.to_le_bytes());
    req.extend_from_slice(&0x1234u64.to_le_bytes()); // unique
    req.extend_from_slice(&[0u8; 24]); // nodeid, uid, gid, pid, padding
    req.extend_from_slice(&7u32.to_le_bytes()); // major
    req.extend_from_slice(&31u32.to_le_bytes()); // minor
    req.extend_from_slice(&[0u8; 56]); // max_readahead, flags, flags2, unused
    mem.write_slice(&req, GuestAddress(REQ_BUF))
        .expect("request");
    len
}

fn wait_for_exit(daemon: &mut Daemon) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = daemon.child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "virtiofsd did not exit after the hang-up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn fuse_init_round_trip_through_virtiofsd() {
    if virtiofsd().is_none()
        && common::cannot_run("fuse_init_round_trip_through_virtiofsd", NOT_INSTALLED)
    {
        return;
    }
    let (mut daemon, socket) = start_daemon("init");
    let mem = pangolin_vmm::memory::create(64).expect("memory");
    let fs = VhostUserFs::new(&socket, "shared", &mem).expect("vhost-user handshake");
    let fs = Arc::new(Mutex::new(fs));
    let mut ev = EventManager::<Arc<Mutex<VhostUserFs>>>::new().expect("event manager");
    ev.add_subscriber(fs.clone());

    let hiprio = MockSplitQueue::create(&mem, GuestAddress(0x10_0000), 1024);
    let request = MockSplitQueue::create(&mem, GuestAddress(0x20_0000), 1024);
    let len = fuse_init_request(&mem);
    let descs = [
        RawDescriptor::from(Descriptor::new(REQ_BUF, len, flag(VRING_DESC_F_NEXT), 1)),
        RawDescriptor::from(Descriptor::new(
            REPLY_BUF,
            4096,
            flag(VRING_DESC_F_WRITE),
            0,
        )),
    ];
    request.add_desc_chains(&descs, 0).expect("chain");

    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("irq")));
    {
        let mut dev = fs.lock().expect("lock");
        assert!(dev.avail_features() & VIRTIO_F_VERSION_1 != 0);
        let features = dev.avail_features();
        dev.set_acked_features(features);
        dev.activate(ActivateContext {
            mem: mem.clone(),
            interrupt: interrupt.clone(),
            queues: vec![
                hiprio.create_queue::<Queue>().expect("hiprio"),
                request.create_queue::<Queue>().expect("request"),
            ],
        })
        .expect("activate");
        // The guest's kick, as KVM would deliver it through the ioeventfd.
        dev.queue_events()[1].write(1).expect("kick");
    }
    // Wait for the reply itself: virtiofsd may also signal a queue's call eventfd when it starts
    // serving it, so an interrupt alone does not mean the request completed.
    let deadline = Instant::now() + Duration::from_secs(10);
    let used_idx = |mem: &GuestMemoryMmap| -> u16 {
        mem.read_obj(request.used_addr().unchecked_add(2))
            .expect("used idx")
    };
    while used_idx(&mem) == 0 || interrupt.status() & VIRTIO_MMIO_INT_VRING == 0 {
        assert!(
            Instant::now() < deadline,
            "no reply and interrupt from virtiofsd"
        );
        ev.run_with_timeout(100).expect("event loop");
    }
    assert_eq!(used_idx(&mem), 1);
    let mut out = [0u8; 24];
    mem.read_slice(&mut out, GuestAddress(REPLY_BUF))
        .expect("reply");
    let error = i32::from_le_bytes(out[4..8].try_into().expect("4"));
    let unique = u64::from_le_bytes(out[8..16].try_into().expect("8"));
    let major = u32::from_le_bytes(out[16..20].try_into().expect("4"));
    assert_eq!((error, unique, major), (0, 0x1234, 7));

    // The VMM goes away: the daemon ends its session cleanly.
    assert!(!fs.lock().expect("lock").is_broken());
    drop(ev);
    drop(fs);
    let status = wait_for_exit(&mut daemon);
    assert!(status.success(), "virtiofsd exited with {status}");
}

#[test]
fn dead_daemon_is_noticed_by_the_event_loop() {
    if virtiofsd().is_none()
        && common::cannot_run("dead_daemon_is_noticed_by_the_event_loop", NOT_INSTALLED)
    {
        return;
    }
    let (mut daemon, socket) = start_daemon("dead");
    let mem = pangolin_vmm::memory::create(16).expect("memory");
    let fs = VhostUserFs::new(&socket, "shared", &mem).expect("vhost-user handshake");
    let fs = Arc::new(Mutex::new(fs));
    let mut ev = EventManager::<Arc<Mutex<VhostUserFs>>>::new().expect("event manager");
    ev.add_subscriber(fs.clone());
    daemon.child.kill().expect("kill");
    let _ = daemon.child.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fs.lock().expect("lock").is_broken() {
        assert!(Instant::now() < deadline, "hang-up not noticed");
        ev.run_with_timeout(100).expect("event loop");
    }
    // Noticed once; the socket is no longer watched, so the loop is idle.
    assert_eq!(ev.run_with_timeout(50).expect("event loop"), 0);
}
