//! The agent's error type and its mapping onto ttrpc status codes.

use std::io;
use std::time::Duration;

use ttrpc::{Code, Status};

/// Everything an agent request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No container with this id.
    #[error("container {0:?} not found")]
    NoContainer(String),
    /// No process with this exec id in the container.
    #[error("process {exec_id:?} not found in container {container_id:?}")]
    NoProcess {
        /// The container.
        container_id: String,
        /// The exec id asked for.
        exec_id: String,
    },
    /// The id is already taken.
    #[error("{0:?} already exists")]
    Exists(String),
    /// An id that cannot name a file or cgroup.
    #[error("invalid id {0:?}: use 1-64 characters of [A-Za-z0-9_.-], not starting with '.'")]
    BadId(String),
    /// The request is malformed.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The request field.
        field: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// The operation does not fit the container's state.
    #[error("container {id:?} is {state}: cannot {op}")]
    State {
        /// The container.
        id: String,
        /// Its current state.
        state: &'static str,
        /// What was asked.
        op: &'static str,
    },
    /// The process's executable does not exist in the container.
    #[error("{0}")]
    ExecutableNotFound(String),
    /// libcontainer (in the helper) failed; its message.
    #[error("container runtime: {0}")]
    Runtime(String),
    /// libcontainer failed in the agent process.
    #[error("container runtime")]
    Container(#[from] libcontainer::error::LibcontainerError),
    /// A cgroup operation failed.
    #[error("cgroup {0}")]
    Cgroup(&'static str, #[source] io::Error),
    /// The helper could not be started.
    #[error("cannot start the container helper")]
    SpawnHelper(#[source] io::Error),
    /// The helper did not finish in time.
    #[error("container helper did not finish within {0:?}")]
    HelperTimeout(Duration),
    /// A pid file held no pid.
    #[error("helper reported no valid pid")]
    BadPid,
    /// A request could not be encoded for the helper.
    #[error("cannot encode the helper request")]
    Encode(#[source] serde_json::Error),
    /// A system call failed.
    #[error("{0}")]
    Io(&'static str, #[source] io::Error),
    /// The guest network could not be configured.
    #[error(transparent)]
    Network(#[from] crate::net::NetError),
    /// The terminal's console socket did not deliver a pty.
    #[error("no terminal received from the container runtime")]
    NoConsole,
    /// The host's entropy could not be added (or the CRNG not reseeded from it).
    #[error("adding the host's entropy")]
    Entropy(#[from] crate::entropy::EntropyError),
    /// The pod's share could not be mounted.
    #[error(transparent)]
    Share(#[from] crate::share::ShareError),
}

impl AgentError {
    fn code(&self) -> Code {
        match self {
            AgentError::NoContainer(_)
            | AgentError::NoProcess { .. }
            | AgentError::ExecutableNotFound(_) => Code::NOT_FOUND,
            AgentError::Exists(_) => Code::ALREADY_EXISTS,
            AgentError::BadId(_)
            | AgentError::Invalid { .. }
            | AgentError::Network(
                crate::net::NetError::Invalid { .. } | crate::net::NetError::NoSuchMac { .. },
            ) => Code::INVALID_ARGUMENT,
            AgentError::State { .. } => Code::FAILED_PRECONDITION,
            AgentError::Entropy(crate::entropy::EntropyError::TooLong(_))
            | AgentError::Share(crate::share::ShareError::BadTag(_)) => Code::INVALID_ARGUMENT,
            AgentError::Share(crate::share::ShareError::Other { .. }) => Code::FAILED_PRECONDITION,
            AgentError::HelperTimeout(_) => Code::DEADLINE_EXCEEDED,
            _ => Code::INTERNAL,
        }
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(err: AgentError) -> ttrpc::Error {
        // The whole source chain goes to the host: it is the only place a user sees it.
        let mut message = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        let mut status = Status::new();
        status.set_code(err.code());
        status.set_message(message);
        ttrpc::Error::RpcStatus(status)
    }
}

/// Checks a container or exec id before it names files and cgroups.
pub fn check_id(id: &str) -> Result<(), AgentError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(AgentError::BadId(id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_escape_a_directory_are_rejected() {
        for bad in ["", ".", "..", "../x", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
        for good in ["c1", "abc-DEF_1.2", &"x".repeat(64)] {
            assert!(check_id(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn status_carries_code_and_the_source_chain() {
        let err = AgentError::Io("open", io::Error::from_raw_os_error(libc::ENOENT));
        match ttrpc::Error::from(err) {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::INTERNAL);
                assert!(s.message().starts_with("open: "), "{}", s.message());
            }
            other => panic!("unexpected {other:?}"),
        }
        match ttrpc::Error::from(AgentError::NoContainer("x".into())) {
            ttrpc::Error::RpcStatus(s) => assert_eq!(s.code(), Code::NOT_FOUND),
            other => panic!("unexpected {other:?}"),
        }
    }
}
