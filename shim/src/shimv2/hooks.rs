//! OCI hooks that run on the host: `prestart`, `createRuntime`, `createContainer`,
//! `poststart` and `poststop`, with the container's state JSON on stdin, as runc runs them.
//!
//! Where each runs, and when (the OCI runtime spec, "Lifecycle" and "POSIX-platform Hooks"):
//! - `prestart` (deprecated) and `createRuntime`: in the runtime's namespaces, once the
//!   container exists (here: created in the guest) and before its process starts.
//! - `createContainer`: the spec puts it in the container's namespaces with its path resolved
//!   in the runtime's. A pod's container namespaces are inside its VM, where host binaries do
//!   not exist, so Pangolin runs it on the host right after `createRuntime` (README, "OCI hooks").
//! - `startContainer` is not here: it runs in the container (its path is the container's), so
//!   the guest spec keeps it and the agent's libcontainer runs it there.
//! - `poststart`: on the host once the container's process started; a failure kills the
//!   process and fails the start (runc's behaviour).
//! - `poststop`: on the host once the container is deleted; a failure is logged and the rest
//!   go on (the spec's "MUST log a warning").
//!
//! Every hook gets `state` (ociVersion, id, status, pid, bundle, annotations) on stdin. The pid
//! is the host process that holds the pod's network namespace, the VMM (what Docker's and
//! nerdctl's network hooks look the namespace up by); 0 once the VM is gone. A hook's `timeout`
//! kills its whole process group; its `env` replaces the environment (none given: the shim's).

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::{Hook, Spec};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// How much of a hook's stdout and stderr is kept for its error message.
const OUTPUT_KEPT: usize = 4096;

/// When a host hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Deprecated form of `createRuntime`.
    Prestart,
    /// After the container is created, before its process starts.
    CreateRuntime,
    /// After `createRuntime` (on the host here; see the module).
    CreateContainer,
    /// After the container's process started.
    Poststart,
    /// After the container is deleted.
    Poststop,
}

impl Phase {
    /// The spec's field name, `hooks.<name>`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Prestart => "prestart",
            Phase::CreateRuntime => "createRuntime",
            Phase::CreateContainer => "createContainer",
            Phase::Poststart => "poststart",
            Phase::Poststop => "poststop",
        }
    }

    /// The container's status the state JSON gives in this phase.
    fn status(self) -> &'static str {
        match self {
            Phase::Prestart | Phase::CreateRuntime | Phase::CreateContainer => "created",
            Phase::Poststart => "running",
            Phase::Poststop => "stopped",
        }
    }
}

/// A hook that could not run or failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The spec's hook is malformed.
    #[error("{field}: {why}")]
    Invalid {
        /// `hooks.<phase>[<index>].<field>`.
        field: String,
        /// What is wrong.
        why: String,
    },
    /// It could not be started.
    #[error("hooks.{phase}[{index}] {path}: cannot run it: {source}")]
    Spawn {
        /// Its phase's name.
        phase: &'static str,
        /// Its place in the phase's list.
        index: usize,
        /// Its path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// It exited unsuccessfully.
    #[error("hooks.{phase}[{index}] {path} failed ({status}): {output}")]
    Failed {
        /// Its phase's name.
        phase: &'static str,
        /// Its place in the phase's list.
        index: usize,
        /// Its path.
        path: String,
        /// "exit status N" or "signal N".
        status: String,
        /// The start of its stderr, then of its stdout.
        output: String,
    },
    /// It ran past its timeout and was killed.
    #[error("hooks.{phase}[{index}] {path} timed out after {seconds} s and was killed")]
    TimedOut {
        /// Its phase's name.
        phase: &'static str,
        /// Its place in the phase's list.
        index: usize,
        /// Its path.
        path: String,
        /// The spec's timeout.
        seconds: u64,
    },
}

/// One hook, checked.
#[derive(Debug, Clone)]
struct HostHook {
    path: String,
    args: Vec<String>,
    env: Option<Vec<String>>,
    timeout: Option<Duration>,
}

/// A container's host hooks, from its bundle spec; what the state JSON carries of it.
#[derive(Debug, Clone, Default)]
pub struct HostHooks {
    prestart: Vec<HostHook>,
    create_runtime: Vec<HostHook>,
    create_container: Vec<HostHook>,
    poststart: Vec<HostHook>,
    poststop: Vec<HostHook>,
    oci_version: String,
    annotations: HashMap<String, String>,
}

/// The container a hook is told about.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// Container id.
    pub id: &'a str,
    /// Its bundle directory.
    pub bundle: &'a str,
    /// The host pid of the process that holds the pod's network namespace (0: none).
    pub pid: u32,
}

impl HostHooks {
    /// The host hooks of `spec`, each checked (an absolute path, a positive timeout).
    pub fn from_spec(spec: &Spec) -> Result<HostHooks, HookError> {
        let mut hooks = HostHooks {
            oci_version: spec.version().clone(),
            annotations: spec.annotations().clone().unwrap_or_default(),
            ..HostHooks::default()
        };
        let Some(given) = spec.hooks() else {
            return Ok(hooks);
        };
        #[allow(deprecated)]
        let prestart = given.prestart();
        hooks.prestart = checked(Phase::Prestart, prestart.as_deref())?;
        hooks.create_runtime = checked(Phase::CreateRuntime, given.create_runtime().as_deref())?;
        hooks.create_container =
            checked(Phase::CreateContainer, given.create_container().as_deref())?;
        hooks.poststart = checked(Phase::Poststart, given.poststart().as_deref())?;
        hooks.poststop = checked(Phase::Poststop, given.poststop().as_deref())?;
        Ok(hooks)
    }

    /// Whether there is no host hook at all.
    pub fn is_empty(&self) -> bool {
        self.prestart.is_empty()
            && self.create_runtime.is_empty()
            && self.create_container.is_empty()
            && self.poststart.is_empty()
            && self.poststop.is_empty()
    }

    /// Whether a hook is told a live pid (every phase but `poststop`): the pod then needs a
    /// process in its network namespace for it.
    pub fn need_netns_pid(&self) -> bool {
        !(self.prestart.is_empty()
            && self.create_runtime.is_empty()
            && self.create_container.is_empty()
            && self.poststart.is_empty())
    }

    fn of(&self, phase: Phase) -> &[HostHook] {
        match phase {
            Phase::Prestart => &self.prestart,
            Phase::CreateRuntime => &self.create_runtime,
            Phase::CreateContainer => &self.create_container,
            Phase::Poststart => &self.poststart,
            Phase::Poststop => &self.poststop,
        }
    }

    /// The create-time hooks in order: `prestart`, `createRuntime`, `createContainer`; the
    /// first failure ends the run.
    pub async fn run_create(&self, subject: Subject<'_>) -> Result<(), HookError> {
        for phase in [
            Phase::Prestart,
            Phase::CreateRuntime,
            Phase::CreateContainer,
        ] {
            self.run(phase, subject).await?;
        }
        Ok(())
    }

    /// Runs the hooks of `phase` in order; the first failure ends the run.
    pub async fn run(&self, phase: Phase, subject: Subject<'_>) -> Result<(), HookError> {
        self.run_phase(phase, subject, false).await
    }

    /// Runs every hook of `phase`, logging each failure (`poststop`: the rest go on).
    pub async fn run_all_logging(&self, phase: Phase, subject: Subject<'_>) {
        let _ = self.run_phase(phase, subject, true).await;
    }

    async fn run_phase(
        &self,
        phase: Phase,
        subject: Subject<'_>,
        go_on: bool,
    ) -> Result<(), HookError> {
        let hooks = self.of(phase);
        if hooks.is_empty() {
            return Ok(());
        }
        let state = self.state(phase, subject);
        for (index, hook) in hooks.iter().enumerate() {
            tracing::info!(hook = phase.name(), index, path = %hook.path, container = subject.id, "running an OCI hook");
            match run_one(phase, index, hook, &state).await {
                Err(e) if go_on => {
                    tracing::warn!(error = %e, container = subject.id, "an OCI hook failed");
                }
                other => other?,
            }
        }
        Ok(())
    }

    /// The state JSON a hook of `phase` reads on stdin.
    fn state(&self, phase: Phase, subject: Subject<'_>) -> Vec<u8> {
        let state = serde_json::json!({
            "ociVersion": self.oci_version,
            "id": subject.id,
            "status": phase.status(),
            "pid": subject.pid,
            "bundle": subject.bundle,
            "annotations": self.annotations,
        });
        serde_json::to_vec(&state).unwrap_or_default()
    }
}

fn checked(phase: Phase, hooks: Option<&[Hook]>) -> Result<Vec<HostHook>, HookError> {
    let mut out = Vec::new();
    for (index, hook) in hooks.unwrap_or_default().iter().enumerate() {
        let field = |f: &str| format!("hooks.{}[{index}].{f}", phase.name());
        if !hook.path().is_absolute() {
            return Err(HookError::Invalid {
                field: field("path"),
                why: format!("{} is not an absolute path", hook.path().display()),
            });
        }
        let path = hook
            .path()
            .to_str()
            .ok_or_else(|| HookError::Invalid {
                field: field("path"),
                why: "not UTF-8".into(),
            })?
            .to_string();
        let timeout = match hook.timeout() {
            None => None,
            Some(s) if s > 0 => Some(Duration::from_secs(s.unsigned_abs())),
            Some(s) => {
                return Err(HookError::Invalid {
                    field: field("timeout"),
                    why: format!("{s}: must be greater than zero"),
                })
            }
        };
        out.push(HostHook {
            path,
            args: hook.args().clone().unwrap_or_default(),
            env: hook.env().clone(),
            timeout,
        });
    }
    Ok(out)
}

/// Runs one hook with `state` on its stdin, within its timeout.
async fn run_one(
    phase: Phase,
    index: usize,
    hook: &HostHook,
    state: &[u8],
) -> Result<(), HookError> {
    let mut cmd = Command::new(&hook.path);
    if let Some(arg0) = hook.args.first() {
        cmd.arg0(arg0).args(&hook.args[1..]);
    }
    if let Some(env) = &hook.env {
        cmd.env_clear();
        for entry in env {
            if let Some((k, v)) = entry.split_once('=') {
                cmd.env(k, v);
            }
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let spawn_error = |source| HookError::Spawn {
        phase: phase.name(),
        index,
        path: hook.path.clone(),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_error)?;
    let group = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .map(Pid::from_raw);
    let stdout = child.stdout.take().map(|s| tokio::spawn(keep_start(s)));
    let stderr = child.stderr.take().map(|s| tokio::spawn(keep_start(s)));
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its state closes the pipe: that is not a failure.
        let _ = stdin.write_all(state).await;
    }
    let status = match hook.timeout {
        Some(limit) => match tokio::time::timeout(limit, child.wait()).await {
            Ok(waited) => waited.map_err(spawn_error)?,
            Err(_) => {
                if let Some(group) = group {
                    let _ = killpg(group, Signal::SIGKILL);
                }
                let _ = child.wait().await;
                return Err(HookError::TimedOut {
                    phase: phase.name(),
                    index,
                    path: hook.path.clone(),
                    seconds: limit.as_secs(),
                });
            }
        },
        None => child.wait().await.map_err(spawn_error)?,
    };
    if status.success() {
        return Ok(());
    }
    let mut output = String::new();
    for stream in [stderr, stdout].into_iter().flatten() {
        if let Ok(text) = stream.await {
            output.push_str(text.trim());
            output.push(' ');
        }
    }
    Err(HookError::Failed {
        phase: phase.name(),
        index,
        path: hook.path.clone(),
        status: status.code().map_or_else(
            || format!("signal {}", status.signal().unwrap_or(0)),
            |c| format!("exit status {c}"),
        ),
        output: output.trim().to_string(),
    })
}

/// Reads `stream` to its end, keeping its first [`OUTPUT_KEPT`] bytes.
async fn keep_start(mut stream: impl AsyncRead + Unpin) -> String {
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = OUTPUT_KEPT.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
    String::from_utf8_lossy(&kept).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(hooks: serde_json::Value) -> Spec {
        let json = serde_json::json!({
            "ociVersion": "1.0.2",
            "annotations": { "pangolin.test/a": "b" },
            "hooks": hooks,
        });
        serde_json::from_value(json).expect("spec")
    }

    fn sh(script: &str) -> serde_json::Value {
        serde_json::json!({ "path": "/bin/sh", "args": ["sh", "-c", script] })
    }

    const SUBJECT: Subject<'static> = Subject {
        id: "c1",
        bundle: "/run/b",
        pid: 42,
    };

    #[tokio::test]
    async fn create_hooks_run_in_order_with_the_state_on_stdin() {
        let dir = crate::test_dir::TestDir::new("hooks-order");
        let log = dir.path.join("log");
        let log = log.display();
        let hooks = HostHooks::from_spec(&spec(serde_json::json!({
            "prestart": [sh(&format!("echo prestart >> {log}"))],
            "createRuntime": [sh(&format!("cat >> {log}; echo >> {log}"))],
            "createContainer": [sh(&format!("echo createContainer >> {log}"))],
        })))
        .expect("hooks");
        hooks.run_create(SUBJECT).await.expect("run");
        let text = std::fs::read_to_string(dir.path.join("log")).expect("log");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "prestart");
        let state: serde_json::Value = serde_json::from_str(lines[1]).expect("state JSON");
        assert_eq!(state["id"], "c1");
        assert_eq!(state["pid"], 42);
        assert_eq!(state["status"], "created");
        assert_eq!(state["bundle"], "/run/b");
        assert_eq!(state["ociVersion"], "1.0.2");
        assert_eq!(state["annotations"]["pangolin.test/a"], "b");
        assert_eq!(lines[2], "createContainer");
    }

    #[tokio::test]
    async fn a_failing_hook_names_itself_and_stops_the_rest() {
        let dir = crate::test_dir::TestDir::new("hooks-fail");
        let marker = dir.path.join("second");
        let hooks = HostHooks::from_spec(&spec(serde_json::json!({
            "createRuntime": [
                sh("echo no network for you >&2; exit 3"),
                sh(&format!("touch {}", marker.display())),
            ],
        })))
        .expect("hooks");
        let err = hooks.run_create(SUBJECT).await.expect_err("must fail");
        let msg = err.to_string();
        assert!(msg.contains("hooks.createRuntime[0] /bin/sh"), "{msg}");
        assert!(msg.contains("exit status 3"), "{msg}");
        assert!(msg.contains("no network for you"), "{msg}");
        assert!(!marker.exists(), "the hook after the failed one ran");
    }

    #[tokio::test]
    async fn a_hook_past_its_timeout_is_killed_with_its_children() {
        let dir = crate::test_dir::TestDir::new("hooks-timeout");
        let marker = dir.path.join("late");
        let mut hook = sh(&format!("(sleep 2; touch {}) & sleep 30", marker.display()));
        hook["timeout"] = 1.into();
        let hooks =
            HostHooks::from_spec(&spec(serde_json::json!({ "poststart": [hook] }))).expect("hooks");
        let t = std::time::Instant::now();
        let err = hooks
            .run(Phase::Poststart, SUBJECT)
            .await
            .expect_err("must time out");
        assert!(
            matches!(err, HookError::TimedOut { seconds: 1, .. }),
            "{err}"
        );
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(2500));
        assert!(!marker.exists(), "the hook's child outlived the kill");
    }

    #[tokio::test]
    async fn env_replaces_the_environment_and_args_give_argv0() {
        let dir = crate::test_dir::TestDir::new("hooks-env");
        let out = dir.path.join("out");
        let hook = serde_json::json!({
            "path": "/bin/sh",
            "args": ["my-hook", "-c", format!("echo \"$0 $PGN_X ${{HOME:-unset}}\" > {}", out.display())],
            "env": ["PGN_X=1"],
        });
        let hooks =
            HostHooks::from_spec(&spec(serde_json::json!({ "poststop": [hook] }))).expect("hooks");
        hooks.run_all_logging(Phase::Poststop, SUBJECT).await;
        let text = std::fs::read_to_string(&out).expect("out");
        assert_eq!(text.trim(), "my-hook 1 unset");
    }

    #[test]
    fn malformed_hooks_are_refused_naming_the_field() {
        let relative = serde_json::json!({ "prestart": [{ "path": "bin/true" }] });
        let err = HostHooks::from_spec(&spec(relative)).expect_err("relative path");
        assert!(
            err.to_string().starts_with("hooks.prestart[0].path:"),
            "{err}"
        );
        let zero = serde_json::json!({ "poststop": [{ "path": "/bin/true" }, { "path": "/bin/true", "timeout": 0 }] });
        let err = HostHooks::from_spec(&spec(zero)).expect_err("zero timeout");
        assert!(
            err.to_string().starts_with("hooks.poststop[1].timeout:"),
            "{err}"
        );
    }

    #[test]
    fn a_spec_without_host_hooks_has_none() {
        let only_guest = serde_json::json!({ "startContainer": [{ "path": "/bin/true" }] });
        assert!(HostHooks::from_spec(&spec(only_guest))
            .expect("hooks")
            .is_empty());
    }
}
