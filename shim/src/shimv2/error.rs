//! The shim's error type and its one mapping onto ttrpc status codes.

use containerd_shim::protos::ttrpc::{self, Code};

use crate::agent::AgentError;
use crate::sandbox::SandboxError;

/// A pod operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// No such container or process.
    #[error("{0} not found")]
    NotFound(String),
    /// The process exited already (runc's shim answers NotFound too; CRI relies on it).
    #[error("process already finished")]
    Finished,
    /// It exists already.
    #[error("{0} already exists")]
    Exists(String),
    /// The request does not fit the task's state.
    #[error("{0}")]
    State(&'static str),
    /// The bundle or request is malformed.
    #[error("{what}: {why}")]
    Invalid {
        /// Which input.
        what: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The pod is being stopped: its VM boot was cancelled, or it is gone.
    #[error("the pod is stopped")]
    Stopped,
    /// The pod's VM died; nothing runs in it any more.
    #[error("the pod's VM is gone: {0}")]
    VmGone(String),
    /// The VM could not be booted.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The agent refused or failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// Host mounts for the rootfs.
    #[error(transparent)]
    Rootfs(#[from] super::rootfs::RootfsError),
    /// A host bind mount could not be shared with the guest.
    #[error(transparent)]
    Volume(#[from] super::volumes::VolumeError),
    /// An OCI hook is malformed, could not run or failed.
    #[error(transparent)]
    Hook(#[from] super::hooks::HookError),
}

impl PodError {
    /// An [`PodError::Invalid`] for input `what`.
    pub fn invalid(what: &'static str, why: impl Into<String>) -> PodError {
        PodError::Invalid {
            what,
            why: why.into(),
        }
    }

    /// The ttrpc status code containerd gets.
    pub fn code(&self) -> Code {
        match self {
            PodError::NotFound(_) | PodError::Finished => Code::NOT_FOUND,
            PodError::Exists(_) => Code::ALREADY_EXISTS,
            PodError::State(_) | PodError::Stopped | PodError::VmGone(_) => {
                Code::FAILED_PRECONDITION
            }
            PodError::Invalid { .. } | PodError::Hook(super::hooks::HookError::Invalid { .. }) => {
                Code::INVALID_ARGUMENT
            }
            PodError::Hook(_) => Code::FAILED_PRECONDITION,
            PodError::Agent(a) => a.code().unwrap_or(Code::UNAVAILABLE),
            PodError::Sandbox(
                SandboxError::Artifact { .. }
                | SandboxError::StateDirTooLong(_)
                | SandboxError::StateDir(..),
            ) => Code::FAILED_PRECONDITION,
            PodError::Sandbox(SandboxError::Cancelled) => Code::CANCELLED,
            PodError::Sandbox(_) | PodError::Rootfs(_) | PodError::Volume(_) => Code::INTERNAL,
        }
    }

    /// The message with every source appended.
    pub fn chain(&self) -> String {
        crate::error_chain(self)
    }
}

impl From<PodError> for ttrpc::Error {
    fn from(e: PodError) -> ttrpc::Error {
        let code = e.code();
        let msg = e.chain();
        // containerd probes routinely (state of a deleted task, kill of an exited one).
        if code == Code::NOT_FOUND {
            tracing::debug!(%msg, "request failed");
        } else {
            tracing::warn!(%msg, ?code, "request failed");
        }
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_containerds_expectations() {
        assert_eq!(PodError::Finished.code(), Code::NOT_FOUND);
        assert_eq!(PodError::NotFound("c".into()).code(), Code::NOT_FOUND);
        assert_eq!(PodError::Exists("c".into()).code(), Code::ALREADY_EXISTS);
        assert_eq!(PodError::invalid("x", "y").code(), Code::INVALID_ARGUMENT);
        assert_eq!(PodError::Stopped.code(), Code::FAILED_PRECONDITION);
        let missing = PodError::Sandbox(SandboxError::Artifact {
            what: "guest kernel",
            path: "/k".into(),
            key: "hypervisor.kernel",
        });
        assert_eq!(missing.code(), Code::FAILED_PRECONDITION);
        assert!(missing.chain().contains("hypervisor.kernel"));
    }
}
