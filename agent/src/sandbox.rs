//! The guest's containers: creation and exec (through the helper) and lookup.
//!
//! The container map lock is only held to look up, insert or remove; never across a helper
//! run or any other await, so a slow create does not stall other requests.

use std::collections::HashMap;
use std::fs;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
use oci_spec::runtime::{LinuxBuilder, Process as OciProcess, RootBuilder, Spec};
use tokio::net::UnixListener;

use crate::cgroup;
use crate::container::{Container, Process};
use crate::error::{check_id, AgentError};
use crate::helper::{self, HelperOp, HelperRequest};
use crate::oom::OomWatcher;
use crate::reaper::Reaper;
use crate::stdio::{self, Pty};

/// Guest directory holding one bundle directory per container.
pub const BUNDLES: &str = "/run/pangolin/bundles";

/// Guest directory of the console sockets libcontainer hands terminals through. A socket
/// address holds at most 108 bytes, so they are named by a counter, never by the (up to
/// 64-byte) container and exec ids.
pub const CONSOLES: &str = "/run/pangolin/consoles";

/// Names console sockets uniquely within this agent.
static CONSOLE_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A fresh console socket path of bounded length.
fn console_socket_path() -> PathBuf {
    let n = CONSOLE_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Path::new(CONSOLES).join(format!("{n}.sock"))
}

/// How long libcontainer may take to hand over a terminal.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(30);

/// All containers of the sandbox.
pub struct Sandbox {
    /// Exit statuses of every child.
    pub reaper: Reaper,
    /// OOM kill notifications.
    pub oom: OomWatcher,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

impl Sandbox {
    /// An empty sandbox.
    pub fn new(reaper: Reaper, oom: OomWatcher) -> Sandbox {
        Sandbox {
            reaper,
            oom,
            containers: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks a container up.
    pub fn get(&self, id: &str) -> Result<Arc<Container>, AgentError> {
        self.map()
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::NoContainer(id.to_string()))
    }

    /// Every container, for teardown.
    pub fn all(&self) -> Vec<Arc<Container>> {
        self.map().values().cloned().collect()
    }

    /// Forgets a container after it was destroyed.
    pub fn forget(&self, id: &str) {
        self.map().remove(id);
        self.oom.unwatch(id);
    }

    /// Creates a container whose init waits for StartContainer.
    pub async fn create(
        &self,
        id: &str,
        spec_json: &str,
        rootfs: &str,
        with_stdin: bool,
    ) -> Result<(), AgentError> {
        check_id(id)?;
        if self.map().contains_key(id) {
            return Err(AgentError::Exists(id.to_string()));
        }
        let rootfs = Path::new(rootfs);
        if !rootfs.is_absolute() || !rootfs.is_dir() {
            return Err(AgentError::Invalid {
                field: "rootfs",
                reason: format!("{} is not a directory in the guest", rootfs.display()),
            });
        }
        let mut spec: Spec = serde_json::from_str(spec_json).map_err(|e| AgentError::Invalid {
            field: "oci_spec_json",
            reason: e.to_string(),
        })?;
        let cgroups_path = prepare_spec(&mut spec, id, rootfs)?;
        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);

        let bundle = Path::new(BUNDLES).join(id);
        fs::create_dir_all(&bundle).map_err(|e| AgentError::Io("create bundle", e))?;
        let result = self
            .spawn_init(id, &bundle, &spec, terminal, with_stdin, &cgroups_path)
            .await;
        let container = match result {
            Ok(c) => Arc::new(c),
            Err(err) => {
                let _ = fs::remove_dir_all(&bundle);
                return Err(err);
            }
        };
        if let Err(err) = self.oom.watch(id, container.cgroup_dir.clone()) {
            tracing::warn!(%err, container = id, "no OOM notification for this container");
        }
        self.map().insert(id.to_string(), container);
        Ok(())
    }

    async fn spawn_init(
        &self,
        id: &str,
        bundle: &Path,
        spec: &Spec,
        terminal: bool,
        with_stdin: bool,
        cgroups_path: &Path,
    ) -> Result<Container, AgentError> {
        let config = serde_json::to_vec(spec).map_err(AgentError::Encode)?;
        fs::write(bundle.join("config.json"), config)
            .map_err(|e| AgentError::Io("write spec", e))?;
        let op = HelperOp::Create {
            bundle: bundle.to_path_buf(),
        };
        let (pid, host, pty) = self
            .run_helper(id, "init", op, bundle, terminal, with_stdin)
            .await?;
        let exit = self.reaper.register(pid);
        let init = Process::new(pid, exit, host, pty);
        let cgroup_dir = cgroup::dir_of(cgroups_path);
        Ok(Container::new(
            id.to_string(),
            bundle.to_path_buf(),
            cgroups_path.into(),
            cgroup_dir,
            init,
        ))
    }

    /// Runs a process described by OCI process JSON in a running container.
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &str,
        with_stdin: bool,
    ) -> Result<i32, AgentError> {
        check_id(exec_id)?;
        let container = self.get(id)?;
        container.can_exec(exec_id)?;
        let process: OciProcess =
            serde_json::from_str(process_json).map_err(|e| AgentError::Invalid {
                field: "process_json",
                reason: e.to_string(),
            })?;
        let terminal = process.terminal().unwrap_or(false);
        let path = container.bundle.join(format!("exec-{exec_id}.json"));
        let json = serde_json::to_vec(&process).map_err(AgentError::Encode)?;
        fs::write(&path, json).map_err(|e| AgentError::Io("write process", e))?;
        let op = HelperOp::Exec {
            bundle: container.bundle.clone(),
            process: path.clone(),
        };
        let result = self
            .run_helper(id, exec_id, op, &container.bundle, terminal, with_stdin)
            .await;
        let _ = fs::remove_file(&path);
        let (pid, host, pty) = result?;
        let exit = self.reaper.register(pid);
        container.add_exec(exec_id, Process::new(pid, exit, host, pty))?;
        Ok(pid)
    }

    async fn run_helper(
        &self,
        id: &str,
        name: &str,
        op: HelperOp,
        bundle: &Path,
        terminal: bool,
        with_stdin: bool,
    ) -> Result<(i32, stdio::HostStdio, Option<Arc<Pty>>), AgentError> {
        let console_path = console_socket_path();
        let request = HelperRequest {
            id: id.to_string(),
            op,
            pid_file: bundle.join(format!("{name}.pid")),
            error_file: bundle.join(format!("{name}.err")),
            console_socket: terminal.then(|| console_path.clone()),
        };
        if !terminal {
            let (child, host) =
                stdio::pipes(with_stdin).map_err(|e| AgentError::Io("create pipes", e))?;
            let pid = helper::spawn(&self.reaper, &request, child).await?;
            return Ok((pid, host, None));
        }
        fs::create_dir_all(CONSOLES).map_err(|e| AgentError::Io("create console dir", e))?;
        let _ = fs::remove_file(&console_path);
        let listener = StdUnixListener::bind(&console_path)
            .and_then(|l| {
                l.set_nonblocking(true)?;
                UnixListener::from_std(l)
            })
            .map_err(|e| AgentError::Io("bind console socket", e))?;
        let receive = tokio::spawn(async move { receive_pty(listener).await });
        let child = stdio::null_stdio().map_err(|e| AgentError::Io("open /dev/null", e))?;
        let spawned = helper::spawn(&self.reaper, &request, child).await;
        let _ = fs::remove_file(&console_path);
        let pid = match spawned {
            Ok(pid) => pid,
            Err(err) => {
                receive.abort();
                return Err(err);
            }
        };
        let master = tokio::time::timeout(CONSOLE_TIMEOUT, receive)
            .await
            .map_err(|_| AgentError::NoConsole)?
            .map_err(|_| AgentError::NoConsole)??;
        let pty = Arc::new(Pty::new(master).map_err(|e| AgentError::Io("terminal", e))?);
        Ok((pid, stdio::pty_host(pty.clone(), with_stdin), Some(pty)))
    }
}

/// Fills in what the guest decides: root, cgroupsPath. Returns the cgroupsPath.
///
/// # Errors
/// [`AgentError::Invalid`] when the root or linux section cannot be built.
pub fn prepare_spec(spec: &mut Spec, id: &str, rootfs: &Path) -> Result<PathBuf, AgentError> {
    let readonly = spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false);
    let root = RootBuilder::default()
        .path(rootfs)
        .readonly(readonly)
        .build()
        .map_err(|e| AgentError::Invalid {
            field: "oci_spec_json.root",
            reason: e.to_string(),
        })?;
    spec.set_root(Some(root));
    let mut linux = match spec.linux().clone() {
        Some(l) => l,
        None => LinuxBuilder::default()
            .build()
            .map_err(|e| AgentError::Invalid {
                field: "oci_spec_json.linux",
                reason: e.to_string(),
            })?,
    };
    let cgroups_path = match linux.cgroups_path() {
        Some(p) if p.is_absolute() => p.clone(),
        _ => cgroup::default_path(id),
    };
    linux.set_cgroups_path(Some(cgroups_path.clone()));
    spec.set_linux(Some(linux));
    if let Some(process) = spec.process_mut() {
        // `false` and absent mean the same, but libcontainer orders the seccomp filter after
        // the capability drop for any present value, where loading it fails (see confinement).
        if process.no_new_privileges() == Some(false) {
            process.set_no_new_privileges(None);
        }
    }
    // Every hook but startContainer would run a binary as the guest's root outside the
    // container (the host runs those itself); startContainer runs inside the container, under
    // its confinement, from its filesystem.
    let start_container = spec
        .hooks()
        .as_ref()
        .and_then(|h| h.start_container().clone());
    spec.set_hooks(start_container.map(|start| {
        let mut hooks = oci_spec::runtime::Hooks::default();
        hooks.set_start_container(Some(start));
        hooks
    }));
    Ok(cgroups_path)
}

/// Accepts libcontainer's connection and takes the pty master it sends.
async fn receive_pty(listener: UnixListener) -> Result<OwnedFd, AgentError> {
    let (stream, _) = listener
        .accept()
        .await
        .map_err(|e| AgentError::Io("accept console", e))?;
    let stream = stream
        .into_std()
        .map_err(|e| AgentError::Io("console socket", e))?;
    stream
        .set_nonblocking(false)
        .map_err(|e| AgentError::Io("console socket", e))?;
    tokio::task::spawn_blocking(move || {
        let mut name = [0u8; 64];
        let mut iov = [std::io::IoSliceMut::new(&mut name)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<UnixAddr>(
            std::os::fd::AsRawFd::as_raw_fd(&stream),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| AgentError::Io("receive terminal", e.into()))?;
        let cmsgs = msg
            .cmsgs()
            .map_err(|e| AgentError::Io("receive terminal", e.into()))?;
        for cmsg in cmsgs {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                if let Some(&fd) = fds.first() {
                    for &extra in &fds[1..] {
                        // SAFETY: the kernel just installed these fds for us; we own them.
                        drop(unsafe { OwnedFd::from_raw_fd(extra) });
                    }
                    // SAFETY: as above; ownership moves into the OwnedFd.
                    return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        Err(AgentError::NoConsole)
    })
    .await
    .map_err(|_| AgentError::NoConsole)?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).expect("spec")
    }

    #[test]
    fn prepare_spec_sets_root_and_default_cgroup() {
        let mut s = spec(r#"{"ociVersion":"1.0.2","root":{"path":"ignored","readonly":true}}"#);
        let cg = prepare_spec(&mut s, "c1", Path::new("/run/pangolin/shared/c1/rootfs"))
            .expect("prepare");
        assert_eq!(cg, PathBuf::from("/pangolin/c1"));
        let root = s.root().as_ref().expect("root");
        assert_eq!(root.path(), Path::new("/run/pangolin/shared/c1/rootfs"));
        assert_eq!(root.readonly(), Some(true));
    }

    #[test]
    fn console_sockets_stay_within_a_socket_address() {
        let a = console_socket_path();
        let b = console_socket_path();
        assert_ne!(a, b);
        // sun_path is 108 bytes with its NUL; leave room for a long counter.
        assert!(a.as_os_str().len() < 60, "{}", a.display());
    }

    #[test]
    fn prepare_spec_turns_no_new_privs_false_into_absent() {
        let mut s = spec(
            r#"{"ociVersion":"1.0.2","process":{"cwd":"/","user":{"uid":0,"gid":0},"noNewPrivileges":false}}"#,
        );
        prepare_spec(&mut s, "c1", Path::new("/r")).expect("prepare");
        assert_eq!(
            s.process().as_ref().and_then(|p| p.no_new_privileges()),
            None
        );
    }

    #[test]
    fn prepare_spec_keeps_an_absolute_cgroup_path_and_only_start_container_hooks() {
        let mut s = spec(
            r#"{"ociVersion":"1.0.2","linux":{"cgroupsPath":"/k8s/pod1/c2"},
                "hooks":{"prestart":[{"path":"/bin/evil"}],"createRuntime":[{"path":"/bin/evil"}],
                         "createContainer":[{"path":"/bin/evil"}],"poststart":[{"path":"/bin/evil"}],
                         "poststop":[{"path":"/bin/evil"}],"startContainer":[{"path":"/bin/in"}]}}"#,
        );
        let cg = prepare_spec(&mut s, "c2", Path::new("/r")).expect("prepare");
        assert_eq!(cg, PathBuf::from("/k8s/pod1/c2"));
        let hooks = s.hooks().as_ref().expect("startContainer kept");
        let json = serde_json::to_value(hooks).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"startContainer": [{"path": "/bin/in"}]})
        );
    }
}
