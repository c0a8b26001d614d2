//! A private containerd for tests and developer tasks: its own config, `root`, `state`, sockets
//! and log under one directory, beside any other containerd on the machine; plus a local OCI
//! image built from a root filesystem directory (no registry is reachable here).
//!
//! Not isolated by those settings (containerd 1.6): shim sockets in `/run/containerd/s/`, netns
//! in `/var/run/netns`, CNI IPAM state, cgroups. Namespace [`NAMESPACE`] keeps ours apart.
//!
//! This file is self-contained (std, anyhow, nix, serde_json, sha2, tar) so that xtask can
//! include it with `#[path]`.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// The containerd namespace every [`PrivateContainerd::ctr`] command uses.
pub const NAMESPACE: &str = "pangolin-test";
/// The namespace CRI works in (the only one it sees).
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The runtime type of Pangolin's shim (containerd looks for `containerd-shim-pangolin-v2`).
pub const PANGOLIN_RUNTIME: &str = "io.containerd.pangolin.v2";
/// The CRI runtime handler name configured for Pangolin.
pub const PANGOLIN_HANDLER: &str = "pangolin";
/// The CRI runtime handler of runc (the reference).
pub const RUNC_HANDLER: &str = "runc";
/// The busybox image name tests import.
pub const BUSYBOX_IMAGE: &str = "pangolin.local/busybox:latest";
/// The sandbox (pause) image CRI is configured with; nothing is pulled.
pub const PAUSE_IMAGE: &str = "pangolin.local/pause:latest";

/// How long [`PrivateContainerd::start`] waits for the gRPC socket (before [`patience`]).
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long each `ctr` command of a stop's cleanup may take (before [`patience`]).
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stop waits for containerd to exit after SIGTERM before SIGKILL (before
/// [`patience`]).
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Environment variable: how many times slower than this project's CI machines (2 cores,
/// guests under QEMU/TCG) the tests' waits may be, e.g. `4` inside the nested test host, where
/// everything runs under TCG twice over. The nested test host suites set it.
pub const SLOWDOWN_ENV: &str = "PANGOLIN_TEST_SLOWDOWN";

/// `base` scaled by [`SLOWDOWN_ENV`]. Deadlines only bound how long a failing wait takes
/// before it fails with its reason; they never judge speed (benchmarks do).
///
/// # Panics
/// When the variable is set but is not a number from 1 to 100.
pub fn patience(base: Duration) -> Duration {
    let factor = match std::env::var(SLOWDOWN_ENV) {
        Err(_) => 1,
        Ok(v) => match v.parse::<u32>() {
            Ok(n @ 1..=100) => n,
            _ => panic!("{SLOWDOWN_ENV}={v:?}: must be a whole number from 1 to 100"),
        },
    };
    base * factor
}

/// What the generated configuration enables beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Enable the CRI plugin (disabled by default: `disabled_plugins`). Its section is written
    /// either way: `restrict_oom_score_adj`, the pause image, the `pangolin` handler.
    pub cri: bool,
    /// TOML appended to the generated configuration (extra plugin sections).
    pub extra_config: String,
    /// Extra environment for containerd (and so for the shims it starts), e.g. PANGOLIN_CONFIG.
    pub env: Vec<(String, String)>,
    /// Leave the `pangolin` CRI handler out (an installer adds it).
    pub without_pangolin_handler: bool,
    /// Put containerd's `root` (content, snapshots, metadata) on a tmpfs of this many MiB: a
    /// node whose image disk is small, where a container that fills its rootfs meets ENOSPC.
    pub root_size_mib: Option<u64>,
}

/// A running private containerd; stopped (and its files removed) on drop or [`Self::stop`].
pub struct PrivateContainerd {
    /// The directory everything lives in (config, sockets, root, state, log).
    pub dir: PathBuf,
    /// The gRPC socket (`<dir>/containerd.sock`).
    pub socket: PathBuf,
    /// The configuration file.
    pub config_file: PathBuf,
    /// containerd's stdout and stderr.
    pub log: PathBuf,
    /// The directory put first on containerd's PATH (where shims are found).
    pub shim_dir: PathBuf,
    /// containerd's environment beyond ours: PATH with `shim_dir` first, [`Options::env`].
    env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    /// Whether `root` is a tmpfs this value mounted ([`Options::root_size_mib`]).
    root_mounted: bool,
    child: Option<Child>,
}

impl PrivateContainerd {
    /// Starts containerd with the default [`Options`] (CRI disabled) in `dir` (created), with
    /// `shim_dir` first on its PATH, and waits until its socket accepts connections.
    pub fn start(dir: &Path, shim_dir: &Path) -> Result<Self> {
        Self::start_with(dir, shim_dir, &Options::default())
    }

    /// [`Self::start`] with options.
    pub fn start_with(dir: &Path, shim_dir: &Path, options: &Options) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let dir = fs::canonicalize(dir)?;
        let shim_dir = fs::canonicalize(shim_dir)
            .with_context(|| format!("shim dir {}", shim_dir.display()))?;
        let socket = dir.join("containerd.sock");
        let config_file = dir.join("config.toml");
        let log = dir.join("containerd.log");
        // A stale socket from a killed run would make the readiness check pass too early.
        for stale in [socket.clone(), ttrpc_address(&socket)] {
            let _ = fs::remove_file(stale);
        }
        fs::write(&config_file, config_toml(&dir, options))?;
        let path = match std::env::var_os("PATH") {
            Some(p) => {
                let mut dirs = vec![shim_dir.clone()];
                dirs.extend(std::env::split_paths(&p));
                std::env::join_paths(dirs)?
            }
            None => shim_dir.clone().into_os_string(),
        };
        let mut env = vec![("PATH".into(), path)];
        env.extend(options.env.iter().map(|(k, v)| (k.into(), v.into())));
        fs::File::create(&log)?;
        let mut me = PrivateContainerd {
            dir,
            socket,
            config_file,
            log,
            shim_dir,
            env,
            root_mounted: false,
            child: None,
        };
        if let Some(mib) = options.root_size_mib {
            me.mount_root(mib)?;
        }
        me.spawn()?;
        Ok(me)
    }

    /// Mounts a tmpfs of `mib` MiB on `<dir>/root` (unmounted by [`Self::stop`]).
    fn mount_root(&mut self, mib: u64) -> Result<()> {
        let root = self.dir.join("root");
        fs::create_dir_all(&root).with_context(|| format!("mkdir {}", root.display()))?;
        nix::mount::mount(
            Some("tmpfs"),
            &root,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(format!("size={mib}m,mode=0711").as_str()),
        )
        .with_context(|| format!("mount a {mib} MiB tmpfs on {}", root.display()))?;
        self.root_mounted = true;
        Ok(())
    }

    /// Starts containerd on our configuration (its log appended to) and waits until it serves.
    fn spawn(&mut self) -> Result<()> {
        let log_file = fs::OpenOptions::new().append(true).open(&self.log)?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&self.config_file)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context(
                "spawning containerd (Debian package containerd; `cargo xtask guest` installs it)",
            )?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Kills containerd (SIGKILL: no cleanup of its own) and starts it again on the same
    /// configuration, root and state, as a node's containerd restarts: the shims live on and
    /// the new containerd must find them (their bundles' address files) and reconnect.
    pub fn restart(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        for stale in [self.socket.clone(), ttrpc_address(&self.socket)] {
            let _ = fs::remove_file(stale);
        }
        self.spawn()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + patience(START_TIMEOUT);
        loop {
            if UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!(
                        "containerd exited ({status}) before its socket {} was ready; log {}:\n{}",
                        self.socket.display(),
                        self.log.display(),
                        self.log_tail(30)
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd's socket {} not ready within {:?}; log {}:\n{}",
                    self.socket.display(),
                    patience(START_TIMEOUT),
                    self.log.display(),
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The last `lines` lines of containerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// containerd's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `ctr --address <sock> --namespace pangolin-test <args>`, stdin closed.
    pub fn ctr<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.ctr_in(NAMESPACE, args)
    }

    /// [`Self::ctr`] in another containerd namespace.
    pub fn ctr_in<I, S>(&self, namespace: &str, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(namespace)
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs a `ctr` command to completion, failing with its stderr; returns its stdout.
    pub fn ctr_output<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        run_ctr(self.ctr(args))
    }

    /// [`Self::ctr_output`] in another containerd namespace.
    pub fn ctr_in_output<I, S>(&self, namespace: &str, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        run_ctr(self.ctr_in(namespace, args))
    }

    /// Builds an OCI image layout tarball of `rootfs` (one uncompressed layer, `Cmd ["sh"]`)
    /// named `name` and imports it (`ctr image import`, unpacked for the default snapshotter).
    pub fn import_busybox(&self, rootfs: &Path, name: &str) -> Result<()> {
        self.import_image(NAMESPACE, rootfs, name, &["sh"])
    }

    /// Imports `rootfs` as image `name` with command `cmd` into `namespace`.
    pub fn import_image(
        &self,
        namespace: &str,
        rootfs: &Path,
        name: &str,
        cmd: &[&str],
    ) -> Result<()> {
        let file_name: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let tarball = self.dir.join(format!("{file_name}.oci.tar"));
        write_oci_archive(rootfs, name, cmd, &tarball)?;
        let import = [
            std::ffi::OsStr::new("image"),
            "import".as_ref(),
            tarball.as_os_str(),
        ];
        run_ctr(self.ctr_in(namespace, import)).with_context(|| format!("importing {name}"))?;
        let _ = fs::remove_file(&tarball);
        let listed = run_ctr(self.ctr_in(namespace, ["image", "ls", "-q"]))?;
        if !listed.lines().any(|l| l.trim() == name) {
            bail!("{name} missing from `ctr image ls` after the import: {listed}");
        }
        Ok(())
    }

    /// Live processes other than containerd whose command line mentions this containerd's
    /// directory (its shims: `-address <dir>/containerd.sock`).
    pub fn leftover_processes(&self) -> Vec<(u32, String)> {
        let me = self.pid();
        processes_mentioning(&self.dir)
            .into_iter()
            .filter(|(pid, _)| Some(*pid) != me)
            .collect()
    }

    /// Kills and deletes every task and deletes every container of [`NAMESPACE`] (what a test
    /// left behind; a shim that dies uncleanly leaves its container processes running).
    /// Returns what it found, for the error of [`Self::stop`].
    fn remove_tasks_and_containers(&self) -> Vec<String> {
        let mut found = Vec::new();
        for ns in [NAMESPACE, CRI_NAMESPACE] {
            let list = |what: &str| -> Vec<String> {
                self.ctr_bounded(ns, &[what, "ls", "-q"])
                    .map(|out| out.split_whitespace().map(str::to_string).collect())
                    .unwrap_or_default()
            };
            for id in list("task") {
                found.push(format!("task {ns}/{id} left running: killed and deleted"));
                let _ =
                    self.ctr_bounded(ns, &["task", "kill", "--signal", "SIGKILL", "--all", &id]);
                let _ = self.ctr_bounded(ns, &["task", "delete", "--force", &id]);
            }
            for id in list("container") {
                found.push(format!("container {ns}/{id} left: deleted"));
                let _ = self.ctr_bounded(ns, &["container", "delete", &id]);
            }
        }
        found
    }

    /// A `ctr` command with a time limit ([`CLEANUP_TIMEOUT`]; a broken shim must not hang a
    /// test's cleanup); its stdout.
    fn ctr_bounded(&self, namespace: &str, args: &[&str]) -> Result<String> {
        let mut child = self
            .ctr_in(namespace, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + patience(CLEANUP_TIMEOUT);
        loop {
            if let Some(status) = child.try_wait()? {
                let mut out = String::new();
                if let Some(mut stdout) = child.stdout.take() {
                    io::Read::read_to_string(&mut stdout, &mut out)?;
                }
                if !status.success() {
                    bail!("ctr {args:?}: {status}");
                }
                return Ok(out);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("ctr {args:?} hung");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills and deletes leftover tasks and containers, stops containerd (SIGTERM, then
    /// SIGKILL), kills leftover shims, unmounts whatever is
    /// mounted under the directory and removes root, state and sockets (the config and log
    /// stay). Errors name what could not be cleaned.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        let mut problems = Vec::new();
        if self.child.is_some() {
            problems.extend(self.remove_tasks_and_containers());
        }
        if let Some(mut child) = self.child.take() {
            if let Err(err) = terminate(&mut child) {
                problems.push(format!("stopping containerd: {err:#}"));
            }
        }
        for (pid, cmdline) in processes_mentioning(&self.dir) {
            problems.push(format!("killed leftover process {pid}: {cmdline}"));
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        // A tmpfs root of our own is the one mount expected here.
        let ours = usize::from(std::mem::take(&mut self.root_mounted));
        match unmount_under(&self.dir) {
            Ok(n) if n > ours => {
                problems.push(format!("unmounted {} leftover mounts", n - ours));
            }
            Ok(_) => {}
            Err(err) => problems.push(format!("unmounting: {err:#}")),
        }
        for sub in [
            "root",
            "state",
            "opt",
            "containerd.sock",
            "containerd.sock.ttrpc",
        ] {
            let path = self.dir.join(sub);
            let res = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            match res {
                Err(err) if err.kind() != io::ErrorKind::NotFound => {
                    problems.push(format!("removing {}: {err}", path.display()));
                }
                _ => {}
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!(
                "private containerd in {}: {}",
                self.dir.display(),
                problems.join("; ")
            )
        }
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        if let Err(err) = self.shutdown() {
            eprintln!("{err:#}");
        }
    }
}

/// Runs a `ctr` command to completion, failing with its stderr; returns its stdout.
fn run_ctr(mut cmd: Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `<grpc socket>.ttrpc`, what containerd 1.6 also passes shims as `TTRPC_ADDRESS`.
fn ttrpc_address(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".ttrpc");
    PathBuf::from(s)
}

/// The configuration of a private containerd in `dir` (config `version = 2`, containerd 1.6).
pub fn config_toml(dir: &Path, options: &Options) -> String {
    let d = dir.display();
    let mut toml = String::new();
    let _ = writeln!(toml, "version = 2");
    let _ = writeln!(toml, "root = \"{d}/root\"");
    let _ = writeln!(toml, "state = \"{d}/state\"");
    if !options.cri {
        let _ = writeln!(toml, "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]");
    }
    let _ = write!(
        toml,
        r#"
[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  sandbox_image = "{PAUSE_IMAGE}"

[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{d}/cni"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = false
"#
    );
    if !options.without_pangolin_handler {
        let _ = write!(
            toml,
            r#"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{PANGOLIN_HANDLER}]
  runtime_type = "{PANGOLIN_RUNTIME}"
  pod_annotations = ["io.pangolin.*"]
"#
        );
    }
    toml.push_str(&options.extra_config);
    toml
}

fn terminate(child: &mut Child) -> Result<()> {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let deadline = Instant::now() + patience(STOP_GRACE);
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill()?;
    child.wait()?;
    bail!("containerd ignored SIGTERM for {STOP_GRACE:?}; killed")
}

/// Unmounts (lazily, deepest first) everything mounted at or under `dir`; returns how many.
pub fn unmount_under(dir: &Path) -> Result<usize> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount_path(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    points.dedup();
    for p in &points {
        nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH)
            .with_context(|| format!("umount {}", p.display()))?;
    }
    Ok(points.len())
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Live (non-zombie) processes whose command line contains `needle`.
fn processes_mentioning(needle: &Path) -> Vec<(u32, String)> {
    let needle = needle.to_string_lossy().to_string();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        let zombie = fs::read_to_string(entry.path().join("stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        });
        if cmdline.contains(&needle) && !zombie && pid != std::process::id() {
            found.push((pid, cmdline));
        }
    }
    found
}

fn sha256_hex(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let mut hex = String::with_capacity(64);
    for b in digest {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

/// An uncompressed tar of the tree under `rootfs` (sorted, owner root, fixed mtime; modes,
/// symlinks and the tree's own paths kept), reproducible for the same tree.
pub fn layer_tar(rootfs: &Path) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    append_tree(&mut builder, rootfs, Path::new(""))
        .with_context(|| format!("packing {}", rootfs.display()))?;
    Ok(builder.into_inner()?)
}

fn append_tree(b: &mut tar::Builder<Vec<u8>>, root: &Path, rel: &Path) -> Result<()> {
    let mut entries = fs::read_dir(root.join(rel))?.collect::<io::Result<Vec<_>>>()?;
    entries.sort_by_key(fs::DirEntry::file_name);
    for entry in entries {
        let rel = rel.join(entry.file_name());
        let path = root.join(&rel);
        let meta = fs::symlink_metadata(&path)?;
        let ft = meta.file_type();
        let mut h = tar::Header::new_gnu();
        h.set_metadata_in_mode(&meta, tar::HeaderMode::Deterministic);
        h.set_mode(meta.permissions().mode() & 0o7777);
        if ft.is_dir() {
            h.set_size(0);
            b.append_data(&mut h, &rel, io::empty())?;
            append_tree(b, root, &rel)?;
        } else if ft.is_symlink() {
            h.set_size(0);
            b.append_link(&mut h, &rel, fs::read_link(&path)?)?;
        } else if ft.is_file() {
            b.append_data(&mut h, &rel, fs::File::open(&path)?)?;
        } else if ft.is_fifo() || ft.is_char_device() || ft.is_block_device() {
            h.set_size(0);
            b.append_data(&mut h, &rel, io::empty())?;
        } else {
            bail!("{}: unsupported file type (socket?)", path.display());
        }
    }
    Ok(())
}

/// Writes an OCI image layout tarball (oci-layout, index.json, blobs/sha256/...) of `rootfs`
/// as image `name` (`registry/repo:tag`) for linux/amd64 with command `cmd`.
pub fn write_oci_archive(rootfs: &Path, name: &str, cmd: &[&str], out: &Path) -> Result<()> {
    let layer = layer_tar(rootfs)?;
    let layer_digest = format!("sha256:{}", sha256_hex(&layer));
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": cmd,
            "WorkingDir": "/",
        },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
        "history": [{ "created_by": "pangolin-e2e: rootfs directory as one layer" }],
    }))?;
    let config_digest = format!("sha256:{}", sha256_hex(&config));
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))?;
    let manifest_digest = format!("sha256:{}", sha256_hex(&manifest));
    // The tag: what follows the last ':' after the last '/'.
    let tag = name
        .rsplit('/')
        .next()
        .and_then(|last| last.rsplit_once(':'))
        .map_or("latest", |(_, t)| t);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }))?;

    let mut archive = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| -> io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::Regular);
        archive.append_data(&mut h, path, data)
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &index)?;
    for (digest, data) in [
        (&manifest_digest, &manifest),
        (&config_digest, &config),
        (&layer_digest, &layer),
    ] {
        add(&format!("blobs/{}", digest.replacen(':', "/", 1)), data)?;
    }
    let bytes = archive.into_inner()?;
    let mut f = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    f.write_all(&bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
        assert_eq!(unescape_mount_path(r"/end\04"), r"/end\04");
    }

    #[test]
    fn config_disables_cri_unless_asked() {
        let dir = Path::new("/x");
        let off = config_toml(dir, &Options::default());
        assert!(off.contains("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]"));
        assert!(off.contains("address = \"/x/containerd.sock\""));
        let on = config_toml(
            dir,
            &Options {
                cri: true,
                ..Options::default()
            },
        );
        assert!(!on.contains("disabled_plugins"));
        assert!(on.contains("runtime_type = \"io.containerd.pangolin.v2\""));
    }
}
