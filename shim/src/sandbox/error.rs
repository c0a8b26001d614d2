//! What starting or running a sandbox can fail with.

use std::path::PathBuf;

use crate::agent::AgentError;
use crate::daemon::DaemonError;
use crate::hypervisor::HypervisorError;

use super::parts::SOCKET_PATH_MAX;

/// Starting or running a sandbox failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A guest artifact is missing.
    #[error("{what} not found at {path} (build it with `cargo xtask guest`, or set {key})")]
    Artifact {
        /// Kernel or initramfs.
        what: &'static str,
        /// The path tried.
        path: PathBuf,
        /// Config key.
        key: &'static str,
    },
    /// The sandbox's directory could not be prepared.
    #[error("sandbox directory {0}")]
    Workdir(PathBuf, #[source] std::io::Error),
    /// `runtime.state_dir` cannot hold a sandbox (missing and not creatable, read-only, full).
    #[error("runtime.state_dir {0}: {1}")]
    StateDir(PathBuf, String),
    /// Unix socket paths under the sandbox directory would exceed the kernel's limit.
    #[error("runtime.state_dir {0} is too long: sockets under it would exceed {max} bytes", max = SOCKET_PATH_MAX)]
    StateDirTooLong(PathBuf),
    /// The id is taken by a live or leaked sandbox.
    #[error("sandbox {0} already exists ({1} is present)")]
    Exists(String, PathBuf),
    /// A daemon failed.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The hypervisor failed.
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    /// The pod's host cgroup could not be made or used.
    #[error(transparent)]
    Cgroup(#[from] crate::host_cgroup::CgroupError),
    /// The agent failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The pod network could not be wired.
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    /// No per-VM jail id could be taken.
    #[error(transparent)]
    JailId(#[from] crate::jail_ids::IdError),
    /// The boot was cancelled (the pod is being stopped); what it had started is gone.
    #[error("the boot was cancelled")]
    Cancelled,
}
