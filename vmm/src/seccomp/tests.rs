//! The filters compile, hold none of the calls a VMM must never make, allow what each thread
//! does, and kill the whole process on anything else. Installing a filter is irreversible, so
//! each case runs in a fresh copy of this test binary (the child) and the parent reads how it
//! ended.

use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;

use super::*;

/// Calls no VMM thread may make: files by path, processes, credentials, mounts, namespaces,
/// code loading, tracing, other processes' signals and memory, new kernel objects that could
/// reach outside (bpf, io_uring, perf, userfaultfd, keys).
const NEVER: &[i64] = &[
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_creat,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_fork,
    libc::SYS_vfork,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kill,
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setresuid,
    libc::SYS_capset,
    libc::SYS_prctl,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_bpf,
    libc::SYS_io_uring_setup,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_add_key,
    libc::SYS_keyctl,
    libc::SYS_memfd_create,
    libc::SYS_seccomp,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_setsockopt,
    libc::SYS_mknodat,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_chown,
    libc::SYS_fchown,
    libc::SYS_rename,
    libc::SYS_renameat2,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
];

fn vm() -> VmContext {
    VmContext {
        vhost_user_sockets: vec![17],
        kick_signal: libc::SIGRTMIN(),
        snapshot: None,
    }
}

#[test]
fn only_a_template_vmm_may_snapshot_and_still_never_the_forbidden_calls() {
    let plain = event_loop::rules(&vm()).expect("rules");
    let template = event_loop::rules(&VmContext {
        snapshot: Some([40, 41]),
        ..vm()
    })
    .expect("rules");
    Filters::compile(&VmContext {
        snapshot: Some([40, 41]),
        ..vm()
    })
    .expect("compile");
    for nr in [libc::SYS_ftruncate, libc::SYS_lseek, libc::SYS_fstat] {
        assert!(!plain.contains(nr), "plain VMM allows syscall {nr}");
        assert!(template.contains(nr), "template VMM lacks syscall {nr}");
    }
    for &nr in NEVER {
        assert!(!template.contains(nr), "template allows syscall {nr}");
    }
    // The KVM reads, and none of them a KVM_SET_* (bit 30, _IOC_WRITE alone, would be set
    // for the _IOW setters; the readers are _IOR/_IOWR or _IO).
    let ioctls = snapshot::ioctls();
    assert_eq!(ioctls.len(), 16);
    assert!(ioctls.contains(&0x8090_ae81), "KVM_GET_REGS");
    assert!(ioctls.contains(&0xc008_ae88), "KVM_GET_MSRS");
    assert!(ioctls.contains(&0xae03), "KVM_CHECK_EXTENSION");
    assert!(
        ioctls.iter().all(|nr| nr >> 30 != 0b01),
        "no write-only ioctl"
    );
}

#[test]
fn allow_lists_compile_and_hold_none_of_the_forbidden_calls() {
    let vm = vm();
    Filters::compile(&vm).expect("compile");
    let vcpu = vcpu::rules().expect("vcpu rules");
    let event_loop = event_loop::rules(&vm).expect("event-loop rules");
    for &nr in NEVER {
        assert!(!vcpu.contains(nr), "vCPU allows syscall {nr}");
        assert!(!event_loop.contains(nr), "event loop allows syscall {nr}");
    }
    // vCPU threads never wait on epoll, accept, connect, talk on a socket or touch disks.
    for nr in [
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_epoll_wait,
        libc::SYS_accept4,
        libc::SYS_socket,
        libc::SYS_connect,
        libc::SYS_read,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_tgkill,
    ] {
        assert!(!vcpu.contains(nr), "vCPU allows syscall {nr}");
    }
    // Without a virtio-fs device the event loop has no vhost-user message call at all.
    let bare = event_loop::rules(&VmContext::default()).expect("rules");
    assert!(!bare.contains(libc::SYS_sendmsg) && !bare.contains(libc::SYS_recvmsg));
    assert!(event_loop.contains(libc::SYS_sendmsg) && event_loop.contains(libc::SYS_recvmsg));
}

/// Env var naming the case a child runs.
const CASE: &str = "PANGOLIN_SECCOMP_CASE";

/// Runs `case` in a fresh test process; returns how it ended and what it printed. A child
/// that is still alive after 20 s (a filter that killed one thread and left the rest waiting)
/// is killed and reported as such.
fn child(case: &str) -> (std::process::ExitStatus, String) {
    use std::io::Read;
    let mut proc = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "seccomp::tests::child_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CASE, case)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run child");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = proc.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = proc.kill();
            let _ = proc.wait();
            panic!("{case}: the child hung (a thread died and the process did not)");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut text = String::new();
    for out in [
        proc.stdout.take().map(|o| Box::new(o) as Box<dyn Read>),
        proc.stderr.take().map(|e| Box::new(e) as Box<dyn Read>),
    ]
    .into_iter()
    .flatten()
    {
        let mut out = out;
        let _ = out.read_to_string(&mut text);
    }
    (status, text)
}

fn assert_killed_by_sigsys(case: &str) {
    let (status, text) = child(case);
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "{case}: expected the whole process killed by SIGSYS, got {status:?}\n{text}"
    );
}

/// The child side: does nothing unless [`CASE`] is set (so a plain test run passes it).
#[test]
fn child_entry() {
    let Ok(case) = std::env::var(CASE) else {
        return;
    };
    let filters = Filters::compile(&vm()).expect("compile");
    match case.as_str() {
        // A vCPU thread makes a call off its list; the main thread would go on and exit 0.
        "vcpu-denied" => {
            let f = filters.vcpu.clone();
            let t = std::thread::spawn(move || {
                install("vCPU", &f).expect("install");
                // SAFETY: a plain syscall without arguments.
                unsafe { libc::syscall(libc::SYS_getppid) };
            });
            let _ = t.join();
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
        // A vCPU creates no kernel object (here an eventfd: everything it signals exists).
        "vcpu-creates-eventfd" => {
            let f = filters.vcpu.clone();
            let t = std::thread::spawn(move || {
                install("vCPU", &f).expect("install");
                drop(vmm_sys_util::eventfd::EventFd::new(0));
            });
            let _ = t.join();
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
        // What a vCPU does when it handles exits works under its filter: eventfd and console
        // writes, locks, allocation, a log line, the thread's end.
        "vcpu-allowed" => {
            // The console log is a file (or a pipe), never a socket.
            let (rx, mut tx) = std::io::pipe().expect("pipe");
            let evt = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
            let f = filters.vcpu.clone();
            let lock = std::sync::Arc::new(std::sync::Mutex::new(0u64));
            let l2 = lock.clone();
            let t = std::thread::spawn(move || {
                install("vCPU", &f).expect("install");
                evt.write(1).expect("eventfd write");
                use std::io::Write;
                tx.write_all(b"console").expect("write");
                let v: Vec<u8> = vec![7; 4 << 20];
                *l2.lock().expect("lock") += u64::from(v[4 << 19]);
                tracing::info!("a log line");
            });
            t.join()
                .expect("the filtered thread ran and ended normally");
            assert_eq!(*lock.lock().expect("lock"), 7);
            drop(rx);
            println!("CHILD-OK");
        }
        // The vhost-user messages go on the virtio-fs socket only: the same call on another
        // socket kills the process.
        "event-loop-sendmsg" => {
            let (vhost, _peer) = std::os::unix::net::UnixStream::pair().expect("socketpair");
            let (other, _peer2) = std::os::unix::net::UnixStream::pair().expect("socketpair");
            let ctx = VmContext {
                vhost_user_sockets: vec![vhost.as_raw_fd()],
                ..vm()
            };
            let filters = Filters::compile(&ctx).expect("compile");
            install("event-loop", &filters.event_loop).expect("install");
            sendmsg_byte(vhost.as_raw_fd()).expect("sendmsg on the vhost-user socket");
            println!("CHILD-VHOST-OK");
            let _ = sendmsg_byte(other.as_raw_fd());
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
        // A vCPU never talks on a socket, not even the vhost-user one.
        "vcpu-sendmsg" => {
            let (vhost, _peer) = std::os::unix::net::UnixStream::pair().expect("socketpair");
            let f = filters.vcpu.clone();
            let fd = vhost.as_raw_fd();
            let t = std::thread::spawn(move || {
                install("vCPU", &f).expect("install");
                let _ = sendmsg_byte(fd);
            });
            let _ = t.join();
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
        // The event loop may not open files.
        "event-loop-denied" => {
            install("event-loop", &filters.event_loop).expect("install");
            let _ = std::fs::File::open("/proc/self/status");
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
        // Nor send any other signal than the vCPU kick.
        "event-loop-signal" => {
            install("event-loop", &filters.event_loop).expect("install");
            // SAFETY: tgkill to ourselves with a signal the filter refuses.
            unsafe {
                libc::syscall(
                    libc::SYS_tgkill,
                    libc::getpid(),
                    libc::gettid(),
                    libc::SIGUSR1,
                )
            };
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
        // Nor map memory executable.
        "event-loop-exec" => {
            install("event-loop", &filters.event_loop).expect("install");
            // SAFETY: an anonymous mapping that is never used.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
        other => panic!("unknown case {other}"),
    }
}

/// `sendmsg(2)` of one byte on `fd`.
fn sendmsg_byte(fd: std::os::fd::RawFd) -> nix::Result<usize> {
    use nix::sys::socket::{sendmsg, MsgFlags, UnixAddr};
    sendmsg::<UnixAddr>(
        fd,
        &[std::io::IoSlice::new(b"x")],
        &[],
        MsgFlags::empty(),
        None,
    )
}

#[test]
fn a_call_off_the_vcpu_list_kills_the_whole_process() {
    assert_killed_by_sigsys("vcpu-denied");
    assert_killed_by_sigsys("vcpu-creates-eventfd");
    assert_killed_by_sigsys("vcpu-sendmsg");
}

#[test]
fn the_event_loop_sends_vhost_user_messages_on_that_socket_only() {
    let (status, text) = child("event-loop-sendmsg");
    assert!(text.contains("CHILD-VHOST-OK"), "{status:?}\n{text}");
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "sendmsg on another socket: expected SIGSYS, got {status:?}\n{text}"
    );
}

#[test]
fn what_a_vcpu_does_on_an_exit_passes_its_filter() {
    let (status, text) = child("vcpu-allowed");
    assert!(
        status.success() && text.contains("CHILD-OK"),
        "{status:?}\n{text}"
    );
}

#[test]
fn the_event_loop_cannot_open_files_signal_others_or_map_code() {
    assert_killed_by_sigsys("event-loop-denied");
    assert_killed_by_sigsys("event-loop-signal");
    assert_killed_by_sigsys("event-loop-exec");
}
