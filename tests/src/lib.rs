//! Shared fixtures of Pangolin's end-to-end tests: the built artifacts, a private state
//! directory and configuration per test, and the leak check every test ends with.
//!
//! These tests boot real VMs (QEMU; TCG where this host has no hardware-virt KVM). They need
//! `cargo xtask guest` to have run; `cargo xtask test` does that. A missing artifact fails the
//! test with that instruction, and a test that cannot run here fails with its reason unless
//! [`EXPECTED_SKIPS_ENV`] names it ([`cannot_run`]): nothing is skipped silently. Waits are
//! bounded by deadlines scaled with [`patience`] (the nested test host is slower).
#![deny(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use pangolin_runtime_config::Config;

pub mod audit;
pub mod containerd;

pub use containerd::{patience, SLOWDOWN_ENV};

/// Environment variable listing the tests whose skip is expected on this machine
/// (comma-separated test names), for hosts that lack what a test needs by design. CI sets none.
pub const EXPECTED_SKIPS_ENV: &str = "PANGOLIN_EXPECTED_SKIPS";

/// Whether `test` may be skipped here for `reason`: true (after saying so) when
/// [`EXPECTED_SKIPS_ENV`] names it; otherwise the test fails with the reason.
///
/// # Panics
/// When the skip is not expected: a test that cannot run must not pass.
pub fn cannot_run(test: &str, reason: &str) -> bool {
    let expected = std::env::var(EXPECTED_SKIPS_ENV).unwrap_or_default();
    if expected.split(',').any(|t| t.trim() == test) {
        eprintln!("SKIPPED (expected by {EXPECTED_SKIPS_ENV}): {test}: {reason}");
        return true;
    }
    panic!(
        "{test} cannot run here: {reason} (set {EXPECTED_SKIPS_ENV}={test} if that is expected)"
    );
}
pub mod cri;
pub mod cri_pods;
pub mod ctr;
pub mod deploy_image;
pub mod registry;
pub mod shim;
pub mod streaming;
pub mod stress;

/// The checkout's root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A built artifact, or a panic saying how to build it.
pub fn artifact(rel: &str) -> PathBuf {
    let path = root().join(rel);
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask guest` (or `cargo xtask test`)",
        path.display()
    );
    path
}

/// The `pangolin` binary of this build.
pub fn pangolin_bin() -> PathBuf {
    let bin = target_dir().join("pangolin");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --bins`",
        bin.display()
    );
    bin
}

/// The busybox root filesystem built by `cargo xtask guest`.
pub fn busybox() -> PathBuf {
    artifact("target/rootfs/busybox")
}

/// A test's private state directory and configuration, checked for leaks on [`TestEnv::finish`].
pub struct TestEnv {
    /// Private directory (config file, state dir).
    pub dir: PathBuf,
    /// The state_dir sandboxes of this test live in.
    pub state: PathBuf,
    /// The configuration file.
    pub config_file: PathBuf,
    /// The configuration it holds.
    pub config: Config,
    /// The kernel's uptime when the test began: seccomp kills logged after it are this test's
    /// (or a concurrent one's) and fail it.
    started: f64,
    /// The audit of [`TestEnv::audit_scope`] when the test began.
    baseline: audit::Audit,
    /// The audit of the test's containerd ([`containerd_scope`]) once it first served, before
    /// any pod: set by [`pangolin_containerd`], checked by [`finish_containerd`].
    containerd_baseline: std::sync::Mutex<Option<audit::Audit>>,
}

impl TestEnv {
    /// A fresh environment named after the test.
    pub fn new(name: &str) -> TestEnv {
        Self::with(name, |_| {})
    }

    /// A fresh environment whose configuration `edit` adjusts.
    pub fn with(name: &str, edit: impl FnOnce(&mut Config)) -> TestEnv {
        let dir = std::env::temp_dir().join(format!("pangolin-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir test dir");
        let state = dir.join("state");
        let mut config = Config::default();
        config.hypervisor.kernel = artifact("target/guest/vmlinux");
        config.hypervisor.initramfs = artifact("target/guest/initramfs.cpio");
        config.hypervisor.vmm_path = pangolin_bin().with_file_name("pangolin-vmm");
        config.runtime.state_dir = state.clone();
        // Each test boots the VM it tests; the template tests (tests/templates.rs) opt in.
        config.template.enabled = false;
        // Emulated (TCG) boots on a loaded 2-core machine can take several seconds.
        config.hypervisor.boot_timeout_ms = 60_000;
        // The same suite runs on either backend (e.g. builtin inside the nested test host).
        if let Ok(kind) = std::env::var(HYPERVISOR_ENV) {
            config.hypervisor.kind = kind
                .parse()
                .expect("PANGOLIN_TEST_HYPERVISOR: auto|qemu|builtin");
        }
        edit(&mut config);
        let config_file = dir.join("configuration.toml");
        std::fs::write(&config_file, toml_of(&config)).expect("write config");
        let mut env = TestEnv {
            baseline: audit::Audit::default(),
            containerd_baseline: std::sync::Mutex::new(None),
            dir,
            state,
            config_file,
            config,
            started: uptime(),
        };
        env.baseline = audit::Audit::take(&env.audit_scope());
        env
    }

    /// What the leak audit covers for this test: processes, mounts and Unix sockets that
    /// mention its directory, and every file in its state dir.
    pub fn audit_scope(&self) -> audit::Scope {
        audit::Scope {
            dirs: vec![self.dir.clone()],
            state_dirs: vec![self.state.clone()],
            ..audit::Scope::default()
        }
    }

    /// `pangolin --config <ours> <args>`, ready to run.
    pub fn pangolin(&self) -> Command {
        let mut cmd = Command::new(pangolin_bin());
        cmd.arg("--config")
            .arg(&self.config_file)
            .stdin(Stdio::null());
        cmd
    }

    /// `pangolin run --rootfs <busybox> <opts> -- <command>`, run to completion.
    pub fn run(&self, opts: &[&str], command: &[&str]) -> Output {
        let mut cmd = self.pangolin();
        cmd.arg("run")
            .arg("--rootfs")
            .arg(busybox())
            .args(opts)
            .arg("--")
            .args(command);
        run_bounded(cmd, Duration::from_secs(180))
    }

    /// Pids of live processes whose command line mentions this test's state directory.
    pub fn leftover_processes(&self) -> Vec<(u32, String)> {
        processes_mentioning(&self.state)
    }

    /// Pids of this test's VMM processes (QEMU or pangolin-vmm).
    pub fn vmm_pids(&self) -> Vec<u32> {
        vmm_pids_under(&self.state)
    }

    /// Starts `pangolin run --hypervisor builtin --rootfs <busybox> -- <command>` in the
    /// background, its output discarded.
    pub fn spawn_builtin_run(&self, command: &[&str]) -> std::process::Child {
        let mut run = self.pangolin();
        run.args(["run", "--hypervisor", "builtin", "--rootfs"])
            .arg(busybox())
            .arg("--")
            .args(command)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        run.spawn().expect("pangolin run")
    }

    /// The first of this test's VMMs that has a vCPU thread (a jailed VMM creates none before
    /// its jail is complete), waiting up to `within` (times [`patience`]) for one.
    pub fn wait_for_vmm_with_vcpu(&self, within: Duration) -> u32 {
        let deadline = Instant::now() + patience(within);
        loop {
            if let Some(pid) = self
                .vmm_pids()
                .into_iter()
                .find(|&pid| has_vcpu_thread(pid))
            {
                return pid;
            }
            assert!(
                Instant::now() < deadline,
                "no VMM with a vCPU thread appeared"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asserts nothing of this test remains (the leak audit of [`Self::audit_scope`]: processes,
    /// mounts, sockets, state files; and no sandbox directory in the state dir), and no pod
    /// helper was killed by its seccomp filter; then removes the test directory.
    pub fn finish(self) {
        audit::assert_no_leaks(&self.audit_scope(), &self.baseline, Duration::from_secs(5));
        // An empty sandbox directory goes a moment after its last file.
        let deadline = Instant::now() + patience(Duration::from_secs(2));
        loop {
            let entries: Vec<PathBuf> = std::fs::read_dir(&self.state)
                .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default();
            if entries.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "left in the state dir after the test: {entries:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let kills = seccomp_kills_since(self.started);
        assert!(
            kills.is_empty(),
            "a pod helper was killed by its seccomp filter during the test:\n{}",
            kills.join("\n")
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Seconds since the kernel booted (the kernel log's clock).
fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Kernel log lines (`audit: type=1326`, what the kernel logs when a seccomp filter kills) for
/// the VMM, QEMU or virtiofsd since `since` (uptime seconds). Empty where the kernel log cannot
/// be read or the kernel has no audit support (then the shim's log still says SIGSYS).
pub fn seccomp_kills_since(since: f64) -> Vec<String> {
    let Ok(out) = Command::new("dmesg").output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("type=1326") && l.contains("sig=31"))
        .filter(|l| {
            ["/pangolin-vmm\"", "/qemu-system-x86_64\"", "/virtiofsd\""]
                .iter()
                .any(|exe| l.contains(exe))
        })
        .filter(|l| {
            l.strip_prefix('[')
                .and_then(|r| r.split(']').next())
                .and_then(|t| t.trim().parse::<f64>().ok())
                .is_some_and(|t| t >= since)
        })
        .map(str::to_string)
        .collect()
}

/// target/<profile>, where the workspace's binaries (the shim among them) are built.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("the executable's directory");
    // A test is in target/<profile>/deps, a binary (stress) in target/<profile>.
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf).expect("target dir")
    } else {
        dir.to_path_buf()
    }
}

/// A private containerd (in `<env>/containerd`) whose pangolin shims use `env`'s configuration;
/// `options.env` gets `PANGOLIN_CONFIG`.
pub fn pangolin_containerd(
    env: &TestEnv,
    mut options: containerd::Options,
) -> containerd::PrivateContainerd {
    let shim = target_dir().join("containerd-shim-pangolin-v2");
    assert!(
        shim.exists(),
        "{} missing: build the workspace",
        shim.display()
    );
    options.env.push((
        "PANGOLIN_CONFIG".into(),
        env.config_file.display().to_string(),
    ));
    let ctrd = containerd::PrivateContainerd::start_with(
        &env.dir.join("containerd"),
        &target_dir(),
        &options,
    )
    .expect("start containerd");
    let baseline = audit::Audit::take(&containerd_scope(&ctrd));
    *env.containerd_baseline
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(baseline);
    ctrd
}

/// What the leak audit covers for a private containerd: processes, mounts and sockets under its
/// directory (shims and what they start), every file in its state dir (bundles, FIFOs), its
/// open descriptors and the leases of CNI networks kept in its directory (`<dir>/cni-ipam`).
pub fn containerd_scope(ctrd: &containerd::PrivateContainerd) -> audit::Scope {
    audit::Scope {
        dirs: vec![ctrd.dir.clone()],
        state_dirs: vec![ctrd.dir.join("state")],
        containerd_pid: ctrd.pid(),
        lease_dirs: vec![ctrd.dir.join("cni-ipam")],
        whole_host: false,
    }
}

/// The audit scope of a test and its private containerd together ([`TestEnv::audit_scope`] and
/// [`containerd_scope`]); `whole_host` when nothing else on the host makes pods meanwhile.
pub fn pods_scope(
    env: &TestEnv,
    ctrd: &containerd::PrivateContainerd,
    whole_host: bool,
) -> audit::Scope {
    let test = env.audit_scope();
    let mut scope = containerd_scope(ctrd);
    scope.dirs.splice(0..0, test.dirs);
    scope.state_dirs.splice(0..0, test.state_dirs);
    scope.whole_host = whole_host;
    scope
}

/// Audits `ctrd` against its audit when [`pangolin_containerd`] started it (before it stops:
/// its own cleanup would hide a leak), stops it (failing on anything it had to clean up),
/// asserts nothing is mounted under the test directory, then [`TestEnv::finish`].
pub fn finish_containerd(ctrd: containerd::PrivateContainerd, mut env: TestEnv) {
    let baseline = env
        .containerd_baseline
        .get_mut()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(baseline) = baseline {
        audit::assert_no_leaks(&containerd_scope(&ctrd), &baseline, Duration::from_secs(10));
    }
    ctrd.stop()
        .expect("containerd stopped cleanly with nothing left");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let needle = env.dir.to_string_lossy().to_string();
    let left: Vec<&str> = mounts.lines().filter(|l| l.contains(&needle)).collect();
    assert!(left.is_empty(), "left mounted: {left:?}");
    env.finish();
}

/// Serialises a configuration to TOML.
pub fn toml_of(config: &Config) -> String {
    toml::to_string(config).expect("config serialises")
}

/// Pids of VMM processes (QEMU or pangolin-vmm) whose command line mentions `dir`.
pub fn vmm_pids_under(dir: &Path) -> Vec<u32> {
    processes_mentioning(dir)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("qemu-system") || cmd.contains("pangolin-vmm"))
        .map(|(pid, _)| pid)
        .collect()
}

/// Whether process `pid` has a thread named `vcpu*`.
pub fn has_vcpu_thread(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("vcpu"))
        })
}

/// Waits up to `within` (times [`patience`]) for `child` to end; kills it and fails the test
/// when it does not.
pub fn wait_for_end(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + patience(within);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pangolin run did not end within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Live processes whose command line contains `needle`.
pub fn processes_mentioning(needle: &Path) -> Vec<(u32, String)> {
    processes_mentioning_any(&[needle.to_path_buf()])
}

/// Live (non-zombie) processes whose command line mentions any of `needles`, with it.
pub fn processes_mentioning_any(needles: &[PathBuf]) -> Vec<(u32, String)> {
    let needles: Vec<String> = needles
        .iter()
        .map(|n| n.to_string_lossy().to_string())
        .collect();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        let zombie = std::fs::read_to_string(entry.path().join("stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        });
        if !zombie && needles.iter().any(|n| cmdline.contains(n.as_str())) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Runs a command with a hard time limit (a hung VM must fail the test, not stall the suite).
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
    }
}

/// stdout as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Environment variable choosing the backend the suites run on (`auto` by default).
pub const HYPERVISOR_ENV: &str = "PANGOLIN_TEST_HYPERVISOR";

/// Whether this host's `/dev/kvm` is hardware virtualisation (VT-x/AMD-V), where the built-in VMM
/// boots Linux at full speed (not PVM, whose guest kernel code is emulated).
pub fn host_has_hardware_kvm() -> bool {
    Path::new("/dev/kvm").exists()
        && (Path::new("/sys/module/kvm_amd").exists()
            || Path::new("/sys/module/kvm_intel").exists())
}

/// Runs `cmd` with a new pseudo-terminal (`rows` x `cols`) as stdin, stdout and stderr, as a
/// user's shell would, with `input` typed ahead; returns what it wrote (without carriage
/// returns) and its exit code.
pub fn run_in_pty(
    mut cmd: std::process::Command,
    rows: u16,
    cols: u16,
    input: &[u8],
) -> (String, Option<i32>) {
    use std::io::{Read, Write};
    let size = nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size), None).expect("openpty");
    let fd = |f: &std::os::fd::OwnedFd| Stdio::from(f.try_clone().expect("dup pty"));
    cmd.stdin(fd(&pty.slave))
        .stdout(fd(&pty.slave))
        .stderr(fd(&pty.slave));
    let mut child = cmd.spawn().expect("spawn in pty");
    drop(cmd);
    drop(pty.slave);
    let mut typing = std::fs::File::from(pty.master.try_clone().expect("dup pty master"));
    typing.write_all(input).expect("type into the pty");
    let reader = std::thread::spawn(move || {
        let mut master = std::fs::File::from(pty.master);
        let mut out = Vec::new();
        // EIO once the last slave descriptor closes: the command and its children are gone.
        let _ = master.read_to_end(&mut out);
        String::from_utf8_lossy(&out).replace('\r', "")
    });
    let deadline = Instant::now() + patience(Duration::from_secs(180));
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("command in pty did not finish within 180 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (reader.join().expect("pty reader"), status.code())
}
