//! The single-threaded helper that drives libcontainer.
//!
//! libcontainer creates processes with clone(2)/clone3 and expects a single-threaded caller; the
//! agent runs tokio worker threads, so it re-executes itself (`/proc/self/exe HELPER_ARG <json>`)
//! for every create and exec. The helper's fds 0/1/2 are the new process's stdio; the container
//! init (or exec'd process) is cloned as a sibling, i.e. as a child of the agent, which reaps it.
//! The helper reports the new pid through a pid file and a failure as text in an error file.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::oci_spec::runtime::{Process, Spec};
use libcontainer::syscall::syscall::SyscallType;
use serde::{Deserialize, Serialize};

use crate::confinement::{self, ConfinedExecutor};
use crate::error::AgentError;
use crate::reaper::{ExitStatus, Reaper};
use crate::stdio::ChildStdio;

/// argv[1] that turns the agent binary into the helper.
pub const HELPER_ARG: &str = "__pangolin_helper";

/// libcontainer's state root inside the guest.
pub const CONTAINER_ROOT: &str = "/run/pangolin/containers";

/// A helper that runs longer than this is killed (a stuck clone or mount).
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

/// What the helper is asked to do.
#[derive(Debug, Serialize, Deserialize)]
pub enum HelperOp {
    /// Create a container from `<bundle>/config.json`; its init waits for start.
    Create {
        /// Bundle directory holding config.json.
        bundle: PathBuf,
    },
    /// Run `process` (an OCI process JSON file) in the running container, confined as the
    /// container's init ([`crate::confinement`]).
    Exec {
        /// The container's bundle directory (its config.json holds the seccomp filter).
        bundle: PathBuf,
        /// Path of the process JSON file.
        process: PathBuf,
    },
}

/// One helper invocation, serialised onto its command line.
#[derive(Debug, Serialize, Deserialize)]
pub struct HelperRequest {
    /// Container id.
    pub id: String,
    /// The operation.
    pub op: HelperOp,
    /// Where libcontainer writes the new process's pid.
    pub pid_file: PathBuf,
    /// Where the helper writes its error text.
    pub error_file: PathBuf,
    /// Console socket for a terminal process.
    pub console_socket: Option<PathBuf>,
}

/// Environment variable carrying the agent's log filter to the helper.
pub const LOG_ENV: &str = "PANGOLIN_HELPER_LOG";

/// Sends the helper's (and libcontainer's) logs to the serial console, as the agent's go.
fn init_logging() {
    let Ok(filter) = std::env::var(LOG_ENV) else {
        return;
    };
    let Ok(console) = fs::OpenOptions::new().write(true).open("/dev/console") else {
        return;
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(console))
        .init();
}

/// Runs the helper side; returns the process exit code.
pub fn helper_main(arg: Option<&str>) -> i32 {
    init_logging();
    let request: HelperRequest = match arg.map(serde_json::from_str) {
        Some(Ok(req)) => req,
        Some(Err(err)) => {
            eprintln!("pangolin helper: bad request: {err}");
            return 2;
        }
        None => {
            eprintln!("pangolin helper: missing request");
            return 2;
        }
    };
    match run(&request) {
        Ok(()) => 0,
        Err(err) => {
            tracing::error!(container = %request.id, "{err:#}");
            // Best effort: the agent falls back to the exit code if the file cannot be written.
            let _ = fs::write(&request.error_file, format!("{err:#}"));
            1
        }
    }
}

fn run(req: &HelperRequest) -> anyhow::Result<()> {
    let builder = ContainerBuilder::new(req.id.clone(), SyscallType::default())
        .with_root_path(CONTAINER_ROOT)?
        .with_pid_file(Some(req.pid_file.clone()))?
        .with_console_socket(req.console_socket.clone());
    match &req.op {
        HelperOp::Create { bundle } => {
            builder
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .as_sibling(true)
                .build()?;
        }
        HelperOp::Exec { bundle, process } => {
            let executor = confine_exec(bundle, process)?;
            builder
                .with_executor(executor)
                .as_tenant()
                .with_process(Some(process))
                .with_detach(true)
                .as_sibling(true)
                .build()?;
        }
    }
    Ok(())
}

/// Rewrites the exec's process file for [`confinement::prepare`] and returns the executor that
/// applies the rest.
fn confine_exec(bundle: &Path, process: &Path) -> anyhow::Result<ConfinedExecutor> {
    let spec = Spec::load(bundle.join("config.json"))?;
    let text = fs::read_to_string(process)?;
    let mut proc: Process = serde_json::from_str(&text)?;
    let confinement = confinement::prepare(&spec, &mut proc)?;
    fs::write(process, serde_json::to_vec(&proc)?)?;
    Ok(ConfinedExecutor::new(confinement))
}

/// Spawns the helper with `stdio` and returns the pid of the process it created.
pub async fn spawn(
    reaper: &Reaper,
    req: &HelperRequest,
    stdio: ChildStdio,
) -> Result<i32, AgentError> {
    let json = serde_json::to_string(req).map_err(AgentError::Encode)?;
    let _ = fs::remove_file(&req.pid_file);
    let _ = fs::remove_file(&req.error_file);
    let child = Command::new("/proc/self/exe")
        .arg(HELPER_ARG)
        .arg(json)
        .env(LOG_ENV, crate::guest::log_filter())
        .stdin(Stdio::from(stdio.stdin))
        .stdout(Stdio::from(stdio.stdout))
        .stderr(Stdio::from(stdio.stderr))
        .spawn()
        .map_err(AgentError::SpawnHelper)?;
    let helper_pid = i32::try_from(child.id()).map_err(|_| AgentError::BadPid)?;
    // The reaper owns waitpid; `child` is dropped without waiting.
    drop(child);
    let status = match tokio::time::timeout(HELPER_TIMEOUT, reaper.wait(helper_pid)).await {
        Ok(status) => status,
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(helper_pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            return Err(AgentError::HelperTimeout(HELPER_TIMEOUT));
        }
    };
    if status.status != ExitStatus::Exited(0) {
        let detail = fs::read_to_string(&req.error_file)
            .unwrap_or_else(|_| format!("helper ended with {:?}", status.status));
        // libcontainer reports a missing executable only as text.
        if detail.contains("not found in $PATH") || detail.contains("executable file not found") {
            return Err(AgentError::ExecutableNotFound(detail));
        }
        return Err(AgentError::Runtime(detail));
    }
    read_pid(&req.pid_file)
}

fn read_pid(path: &Path) -> Result<i32, AgentError> {
    let text = fs::read_to_string(path).map_err(|e| AgentError::Io("read pid file", e))?;
    text.trim().parse().map_err(|_| AgentError::BadPid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_through_json() {
        let req = HelperRequest {
            id: "c1".into(),
            op: HelperOp::Exec {
                bundle: "/run/b".into(),
                process: "/run/p.json".into(),
            },
            pid_file: "/run/pid".into(),
            error_file: "/run/err".into(),
            console_socket: None,
        };
        let json = serde_json::to_string(&req).expect("encode");
        let back: HelperRequest = serde_json::from_str(&json).expect("decode");
        assert_eq!(back.id, "c1");
        assert!(matches!(back.op, HelperOp::Exec { .. }));
    }

    #[test]
    fn helper_rejects_a_missing_or_bad_request() {
        assert_eq!(helper_main(None), 2);
        assert_eq!(helper_main(Some("{")), 2);
    }
}
