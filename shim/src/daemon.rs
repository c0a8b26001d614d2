//! Helper processes owned by a sandbox (QEMU, virtiofsd, vhost-device-vsock).
//!
//! Every daemon is started with PR_SET_PDEATHSIG=SIGKILL and killed when its [`Daemon`] is
//! dropped, so it cannot outlive its owner, whether the owner returns, panics or is killed.
//! Readiness is a socket file that appears; a daemon that exits before that is reported with
//! the tail of its log.
//!
//! A task owns each child and awaits its exit (tokio reaps on SIGCHLD: no polling); the exit
//! status is published on a watch channel, so any number of watchers (the pod's VMM-death
//! watcher, a boot waiting for readiness) learn of it at once.
//!
//! PR_SET_PDEATHSIG fires when the *thread* that forked the daemon exits. Daemons are spawned
//! from tokio worker threads, which live as long as the runtime; never spawn one from
//! `spawn_blocking` (those threads exit when idle, and would take the daemon with them).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio::sync::{oneshot, watch};

/// A daemon that could not be started or did not become ready.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The binary could not be executed.
    #[error("cannot run {program}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It exited before it was ready.
    #[error("{name} exited ({status}) before it was ready; its log ({log}) ends with: {tail}")]
    Died {
        /// Daemon name.
        name: &'static str,
        /// Exit status.
        status: std::process::ExitStatus,
        /// Log file path.
        log: PathBuf,
        /// Last lines of the log.
        tail: String,
    },
    /// It exited while the VM it serves ran (the VM cannot go on without it).
    #[error("{name} exited ({status}) while its VM ran; its log ({log}) ends with: {tail}")]
    Exited {
        /// Daemon name.
        name: &'static str,
        /// Exit status.
        status: std::process::ExitStatus,
        /// Log file path.
        log: PathBuf,
        /// Last lines of the log.
        tail: String,
    },
    /// It did not create its socket in time.
    #[error("{name} did not create {socket} within {timeout:?}")]
    NotReady {
        /// Daemon name.
        name: &'static str,
        /// The awaited socket.
        socket: PathBuf,
        /// The limit.
        timeout: Duration,
    },
    /// Opening its log file failed.
    #[error("cannot create log file {0}")]
    Log(PathBuf, #[source] std::io::Error),
}

/// Sees a daemon's exit status once it exited.
pub type ExitWatch = watch::Receiver<Option<ExitStatus>>;

/// How a daemon is started beyond its command line.
#[derive(Debug, Default)]
pub struct SpawnOptions<'a> {
    /// The network namespace it joins before anything else (a VMM serving a tap there).
    pub netns: Option<&'a Path>,
    /// Its standard input (a Unix socket the host then sends descriptors on), else /dev/null.
    pub stdin: Option<OwnedFd>,
    /// Runs as this unprivileged user from its first instruction, else as the shim's user.
    pub user: Option<Unprivileged>,
    /// Descriptors it inherits at their numbers (its command line names them); closed in the
    /// shim once it started.
    pub inherit: Vec<OwnedFd>,
}

/// An unprivileged identity for a helper: set in the child between fork and exec, so the
/// helper never runs a single instruction as root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unprivileged {
    /// Real, effective and saved uid.
    pub uid: u32,
    /// Real, effective and saved gid.
    pub gid: u32,
    /// The supplementary groups (all others are dropped), e.g. /dev/kvm's group.
    pub groups: Vec<u32>,
    /// RLIMIT_NOFILE; core dumps are always off (RLIMIT_CORE = 0).
    pub max_open_files: u64,
}

impl Unprivileged {
    /// In the forked child: rlimits, groups, gid, uid (which leaves no capability: none is
    /// kept across a change from uid 0 to non-zero ids), then no_new_privs so nothing it execs
    /// can gain any.
    fn enter(&self) -> std::io::Result<()> {
        let nofile = libc::rlimit {
            rlim_cur: self.max_open_files,
            rlim_max: self.max_open_files,
        };
        let core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: plain system calls on values that live across them.
        unsafe {
            check(libc::setrlimit(libc::RLIMIT_NOFILE, &raw const nofile))?;
            check(libc::setrlimit(libc::RLIMIT_CORE, &raw const core))?;
            check(libc::setgroups(self.groups.len(), self.groups.as_ptr()))?;
            check(libc::setresgid(self.gid, self.gid, self.gid))?;
            check(libc::setresuid(self.uid, self.uid, self.uid))?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        }
        Ok(())
    }
}

/// Opens `program` to execute it through its descriptor; true when it is a script (`#!`).
fn open_executable(program: &Path) -> std::io::Result<(std::fs::File, bool)> {
    use std::io::Read;
    let mut file = std::fs::File::open(program)?;
    let mut magic = [0u8; 2];
    let script = file.read_exact(&mut magic).is_ok() && &magic == b"#!";
    Ok((file, script))
}

/// What a child needs to execute a binary through its descriptor with execveat: argv built
/// before the fork (nothing is allocated between fork and exec).
struct ExecByFd {
    fd: RawFd,
    _strings: Vec<std::ffi::CString>,
    argv: Vec<*const libc::c_char>,
}

// SAFETY: the pointers point into `_strings`, owned alongside and never changed; the child
// only reads them.
unsafe impl Send for ExecByFd {}
// SAFETY: as above: shared only for reading.
unsafe impl Sync for ExecByFd {}

impl ExecByFd {
    fn new(fd: RawFd, program: &Path, args: &[String]) -> Result<ExecByFd, DaemonError> {
        use std::os::unix::ffi::OsStrExt;
        let nul = |e: std::ffi::NulError| DaemonError::Spawn {
            program: program.into(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        };
        let mut strings =
            vec![std::ffi::CString::new(program.as_os_str().as_bytes()).map_err(nul)?];
        for a in args {
            strings.push(std::ffi::CString::new(a.as_bytes()).map_err(nul)?);
        }
        let mut argv: Vec<*const libc::c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        argv.push(std::ptr::null());
        Ok(ExecByFd {
            fd,
            _strings: strings,
            argv,
        })
    }

    /// execveat(fd, "", argv, environ, AT_EMPTY_PATH); the error when it returns.
    fn exec(&self) -> std::io::Error {
        extern "C" {
            static environ: *const *const libc::c_char;
        }
        // SAFETY: argv is a NULL-terminated array of NUL-terminated strings that outlive the
        // call; `environ` is the process's environment (the child's copy of the parent's);
        // the empty path with AT_EMPTY_PATH executes the open descriptor itself.
        unsafe {
            libc::syscall(
                libc::SYS_execveat,
                self.fd,
                c"".as_ptr(),
                self.argv.as_ptr(),
                environ,
                libc::AT_EMPTY_PATH,
            );
        }
        std::io::Error::last_os_error()
    }
}

/// The child gets SIGKILL when the thread that forked it exits.
fn die_with_parent() -> std::io::Result<()> {
    // SAFETY: prctl(2) with integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) })
}

/// A libc return value as a result (`-1`: errno).
fn check(ret: libc::c_int) -> std::io::Result<()> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A running helper process, killed when dropped.
#[derive(Debug)]
pub struct Daemon {
    /// Short name for messages ("qemu", "virtiofsd").
    pub name: &'static str,
    /// Where its stdout/stderr go.
    pub log: PathBuf,
    pid: Option<u32>,
    exit: ExitWatch,
    /// Dropping or firing it makes the owning task kill the child.
    kill: Option<oneshot::Sender<()>>,
}

impl Daemon {
    /// Starts `program args...` with output to `log`.
    pub fn spawn(
        name: &'static str,
        program: &Path,
        args: &[String],
        log: &Path,
    ) -> Result<Daemon, DaemonError> {
        Self::spawn_in(name, program, args, log, None)
    }

    /// As [`Daemon::spawn`], inside the network namespace `netns` (a VMM serving a tap that
    /// lives there).
    pub fn spawn_in(
        name: &'static str,
        program: &Path,
        args: &[String],
        log: &Path,
        netns: Option<&Path>,
    ) -> Result<Daemon, DaemonError> {
        let options = SpawnOptions {
            netns,
            ..SpawnOptions::default()
        };
        Self::spawn_with(name, program, args, log, options)
    }

    /// As [`Daemon::spawn`], started the way `options` says: in a network namespace, with a
    /// given standard input, as an unprivileged user, with descriptors it inherits.
    pub fn spawn_with(
        name: &'static str,
        program: &Path,
        args: &[String],
        log: &Path,
        options: SpawnOptions<'_>,
    ) -> Result<Daemon, DaemonError> {
        let SpawnOptions {
            netns,
            stdin,
            user,
            inherit: inherited,
        } = options;
        let ns = match netns {
            Some(path) => Some(
                std::fs::File::open(path).map_err(|source| DaemonError::Spawn {
                    program: program.into(),
                    source: std::io::Error::new(
                        source.kind(),
                        format!("network namespace {}: {source}", path.display()),
                    ),
                })?,
            ),
            None => None,
        };
        let ns_fd = ns.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
        let out = std::fs::File::create(log).map_err(|e| DaemonError::Log(log.into(), e))?;
        let err = out
            .try_clone()
            .map_err(|e| DaemonError::Log(log.into(), e))?;
        // An unprivileged helper may not be able to reach its binary by path (e.g. under
        // /root): open it here and execute it through the descriptor (argv[0] stays the path).
        // A script's interpreter opens the descriptor's path after the exec, so a script's
        // stays open across it; a binary's closes with the exec.
        let exe = match &user {
            Some(_) => Some(
                open_executable(program).map_err(|source| DaemonError::Spawn {
                    program: program.into(),
                    source,
                })?,
            ),
            None => None,
        };
        let script_fd = exe
            .as_ref()
            .filter(|(_, script)| *script)
            .map(|(file, _)| file.as_raw_fd());
        let mut cmd = match &exe {
            Some((file, _)) => {
                let mut cmd = Command::new(format!("/proc/self/fd/{}", file.as_raw_fd()));
                cmd.arg0(program);
                cmd
            }
            None => Command::new(program),
        };
        cmd.args(args)
            .stdin(stdin.map_or_else(Stdio::null, Stdio::from))
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true);
        // A binary reached through its descriptor is executed with execveat(AT_EMPTY_PATH) in
        // the child rather than by its /proc/self/fd path: the kernel then names the process
        // (comm, what ps and top show) after the binary, not after the descriptor's number.
        let by_descriptor = match &exe {
            Some((file, false)) => Some(ExecByFd::new(file.as_raw_fd(), program, args)?),
            _ => None,
        };
        let inherit: Vec<RawFd> = inherited
            .iter()
            .map(AsRawFd::as_raw_fd)
            .chain(script_fd)
            .collect();
        // SAFETY: the closure only makes async-signal-safe system calls (prctl, setns, fcntl,
        // setrlimit, setgroups, setresgid, setresuid) on memory allocated before the fork; the
        // namespace and inherited descriptors stay open in the parent until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                die_with_parent()?;
                if let Some(fd) = ns_fd {
                    check(libc::setns(fd, libc::CLONE_NEWNET))?;
                }
                for &fd in &inherit {
                    // Kept across exec at its number, which the command line names.
                    check(libc::fcntl(fd, libc::F_SETFD, 0))?;
                }
                if let Some(user) = &user {
                    user.enter()?;
                    // A change of credentials clears the parent-death signal: set it again.
                    die_with_parent()?;
                }
                if let Some(exec) = &by_descriptor {
                    // Returns only on failure.
                    return Err(exec.exec());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| DaemonError::Spawn {
            program: program.into(),
            source,
        })?;
        // The child has its copies (the binary's was closed by its exec: close-on-exec).
        drop(inherited);
        drop(exe);
        let pid = child.id();
        tracing::debug!(name, pid, program = %program.display(), "daemon started");
        let (status_tx, exit) = watch::channel(None);
        let (kill, kill_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status,
                // Asked to, or the Daemon was dropped.
                _ = kill_rx => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let status = status.unwrap_or_else(|e| {
                tracing::warn!(name, error = %e, "waiting for a daemon");
                ExitStatus::from_raw(255 << 8)
            });
            if status.signal() == Some(libc::SIGSYS) {
                // Only a seccomp filter kills with SIGSYS: the kernel log has the syscall number.
                tracing::error!(
                    name,
                    %status,
                    "daemon killed by its seccomp filter (SIGSYS): a system call off its allow-list; \
                     the kernel log names it (audit type=1326 ... syscall=N)"
                );
            } else {
                tracing::debug!(name, %status, "daemon exited");
            }
            status_tx.send_replace(Some(status));
        });
        Ok(Daemon {
            name,
            log: log.into(),
            pid,
            exit,
            kill: Some(kill),
        })
    }

    /// Process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.exited().is_none().then_some(self.pid).flatten()
    }

    /// Exit status if it has exited (non-blocking).
    pub fn exited(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// A receiver that sees the exit status.
    pub fn exit_watch(&self) -> ExitWatch {
        self.exit.clone()
    }

    /// Waits for it to exit.
    pub async fn wait(&mut self) -> ExitStatus {
        let mut rx = self.exit.clone();
        let status = match rx.wait_for(Option::is_some).await {
            Ok(s) => *s,
            // The owning task is gone only after publishing; treat as exited.
            Err(_) => None,
        };
        status.unwrap_or_else(|| ExitStatus::from_raw(255 << 8))
    }

    /// Kills it (SIGKILL) and waits until it is reaped.
    pub async fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        self.wait().await;
    }

    /// Waits until `socket` exists, failing early if the daemon dies.
    pub async fn wait_for_socket(
        &mut self,
        socket: &Path,
        timeout: Duration,
    ) -> Result<(), DaemonError> {
        let start = Instant::now();
        let mut exit = self.exit.clone();
        loop {
            if socket.exists() {
                return Ok(());
            }
            if let Some(status) = self.exited() {
                return Err(self.died(status));
            }
            if start.elapsed() > timeout {
                return Err(DaemonError::NotReady {
                    name: self.name,
                    socket: socket.into(),
                    timeout,
                });
            }
            // Daemons create their socket within milliseconds; an exit wakes us at once.
            let _ = tokio::time::timeout(Duration::from_millis(5), exit.changed()).await;
        }
    }

    /// The error for an early exit, with the log's tail.
    pub fn died(&self, status: std::process::ExitStatus) -> DaemonError {
        DaemonError::Died {
            name: self.name,
            status,
            log: self.log.clone(),
            tail: log_tail(&self.log, 5),
        }
    }

    /// Ok while it runs; once it exited (after it was ready), the exit with its log's tail.
    pub fn check_running(&self) -> Result<(), DaemonError> {
        match self.exited() {
            None => Ok(()),
            Some(status) => Err(DaemonError::Exited {
                name: self.name,
                status,
                log: self.log.clone(),
                tail: log_tail(&self.log, 5),
            }),
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; always reaps.
    pub async fn stop(&mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        // Not reaped yet (the watch says so), so the pid is still this child's.
        if let Some(pid) = self.pid().and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(grace, self.wait()).await.is_err() {
            self.kill().await;
        }
    }
}

/// A watch that sees the first exit among `watches`, for processes that only work together (a
/// VMM and the helpers its devices need): the first one gone ends them all. The one that went
/// first is logged by its name. A watch whose daemon was dropped counts as an exit.
pub fn first_exit(watches: Vec<(&'static str, ExitWatch)>) -> ExitWatch {
    let (tx, rx) = watch::channel(None);
    let tx = std::sync::Arc::new(tx);
    for (name, mut watch) in watches {
        let tx = std::sync::Arc::clone(&tx);
        tokio::spawn(async move {
            let status = watch
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|s| *s)
                .unwrap_or_else(|| ExitStatus::from_raw(255 << 8));
            tx.send_if_modified(|first| {
                if first.is_some() {
                    return false;
                }
                tracing::info!(name, %status, "first of its group to exit");
                *first = Some(status);
                true
            });
        });
    }
    rx
}

/// The last `lines` lines of a log file, joined with " | ".
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &all[all.len().saturating_sub(lines)..];
    if tail.is_empty() {
        "(empty)".into()
    } else {
        tail.join(" | ")
    }
}

/// Finds `program` on PATH (or `~/.cargo/bin`) when it is a bare name.
pub fn resolve_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.exists().then(|| program.to_path_buf());
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_daemon_that_dies_early_is_reported_with_its_log() {
        let dir = std::env::temp_dir().join(format!("pangolin-daemon-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let log = dir.join("sh.log");
        let args = vec!["-c".to_string(), "echo boom >&2; exit 3".to_string()];
        let mut d = Daemon::spawn("sh", Path::new("/bin/sh"), &args, &log).expect("spawn");
        let err = d
            .wait_for_socket(&dir.join("never.sock"), Duration::from_secs(5))
            .await
            .expect_err("must fail");
        let text = err.to_string();
        assert!(
            text.contains("boom") && text.contains("sh exited"),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    /// An unprivileged daemon is executed through its descriptor and still named after its
    /// binary (what ps, top and the stress report show), with its arguments and environment.
    #[tokio::test]
    async fn an_unprivileged_daemon_is_named_after_its_binary() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root: it drops a daemon to another user"
        );
        let log =
            std::env::temp_dir().join(format!("pangolin-daemon-name-{}.log", std::process::id()));
        let options = SpawnOptions {
            user: Some(Unprivileged {
                uid: 65534,
                gid: 65534,
                groups: Vec::new(),
                max_open_files: 64,
            }),
            ..SpawnOptions::default()
        };
        let args = vec!["30".to_string()];
        let mut d = Daemon::spawn_with("sleep", Path::new("/bin/sleep"), &args, &log, options)
            .expect("spawn");
        let pid = d.pid().expect("pid");
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut comm = String::new();
        while Instant::now() < deadline {
            comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "sleep" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        d.stop(Duration::from_millis(100)).await;
        let _ = std::fs::remove_file(&log);
        assert_eq!(comm.trim(), "sleep", "named after the descriptor?");
        assert_eq!(cmdline, b"/bin/sleep\x0030\x00");
    }

    #[tokio::test]
    async fn stop_kills_a_daemon_that_ignores_sigterm() {
        let log =
            std::env::temp_dir().join(format!("pangolin-daemon-stop-{}.log", std::process::id()));
        let args = vec!["-c".to_string(), "trap '' TERM; sleep 30".to_string()];
        let mut d = Daemon::spawn("sh", Path::new("/bin/sh"), &args, &log).expect("spawn");
        tokio::time::sleep(Duration::from_millis(50)).await;
        d.stop(Duration::from_millis(100)).await;
        assert!(d.exited().is_some());
        let _ = std::fs::remove_file(&log);
    }

    #[tokio::test]
    async fn every_watcher_sees_the_exit_without_polling_and_drop_kills() {
        let log =
            std::env::temp_dir().join(format!("pangolin-daemon-watch-{}.log", std::process::id()));
        let args = vec!["-c".to_string(), "exit 7".to_string()];
        let d = Daemon::spawn("sh", Path::new("/bin/sh"), &args, &log).expect("spawn");
        let (mut a, mut b) = (d.exit_watch(), d.exit_watch());
        let t = Instant::now();
        let sa = *a.wait_for(Option::is_some).await.expect("watch a");
        let sb = *b.wait_for(Option::is_some).await.expect("watch b");
        assert_eq!(sa.and_then(|s| s.code()), Some(7));
        assert_eq!(sa, sb);
        assert!(d.pid().is_none(), "no pid once exited");
        eprintln!("exit seen after {:?}", t.elapsed());

        let args = vec!["-c".to_string(), "sleep 30".to_string()];
        let d = Daemon::spawn("sh", Path::new("/bin/sh"), &args, &log).expect("spawn");
        let mut w = d.exit_watch();
        drop(d);
        let status = *w.wait_for(Option::is_some).await.expect("watch");
        assert_eq!(
            status.and_then(|s| s.signal()),
            Some(libc::SIGKILL),
            "dropping a daemon kills it"
        );
        let _ = std::fs::remove_file(&log);
    }

    #[test]
    fn bare_names_are_looked_up_on_path() {
        assert!(resolve_program(Path::new("sh")).is_some());
        assert!(resolve_program(Path::new("/nonexistent/prog")).is_none());
        assert!(resolve_program(Path::new("no-such-program-xyz")).is_none());
    }
}
