//! The guest agent as the pod lifecycle uses it: one narrow trait, implemented by the ttrpc
//! [`AgentClient`] and, in unit tests, by a fake passed in explicitly.

use async_trait::async_trait;
use pangolin_protocols::agent::ContainerStats;

use super::process::Exit;
use crate::agent::{AgentClient, AgentError};

/// What the pod asks of the guest agent.
#[async_trait]
pub trait Guest: Send + Sync + 'static {
    /// Creates container `id` (its init waits for start) from the guest spec.
    async fn create_container(
        &self,
        id: &str,
        spec_json: String,
        rootfs: &str,
        stdin: bool,
    ) -> Result<(), AgentError>;
    /// Starts the created container; its init's guest pid.
    async fn start_container(&self, id: &str) -> Result<u32, AgentError>;
    /// Runs an exec in a running container; its guest pid.
    async fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        process_json: String,
        stdin: bool,
    ) -> Result<u32, AgentError>;
    /// Signals one process, or every process of the container with `all`.
    async fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError>;
    /// Blocks until the process exits.
    async fn wait(&self, id: &str, exec_id: &str) -> Result<Exit, AgentError>;
    /// Forgets an exited exec.
    async fn remove_process(&self, id: &str, exec_id: &str) -> Result<(), AgentError>;
    /// Kills (if needed) and removes the container.
    async fn remove_container(&self, id: &str) -> Result<(), AgentError>;
    /// Writes to a process's stdin.
    async fn write_stdin(&self, id: &str, exec_id: &str, data: Vec<u8>) -> Result<(), AgentError>;
    /// Closes a process's stdin.
    async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), AgentError>;
    /// Reads output (`stderr` or stdout); None once the agent says the stream is drained.
    async fn read_output(
        &self,
        id: &str,
        exec_id: &str,
        stderr: bool,
    ) -> Result<Option<Vec<u8>>, AgentError>;
    /// Resizes a process's terminal.
    async fn resize(&self, id: &str, exec_id: &str, rows: u16, cols: u16)
        -> Result<(), AgentError>;
    /// Guest pids of the container.
    async fn pids(&self, id: &str) -> Result<Vec<u32>, AgentError>;
    /// Freezes or thaws the container.
    async fn set_paused(&self, id: &str, paused: bool) -> Result<(), AgentError>;
    /// Applies OCI LinuxResources JSON.
    async fn update(&self, id: &str, resources_json: String) -> Result<(), AgentError>;
    /// cgroup figures of the container.
    async fn stats(&self, id: &str) -> Result<ContainerStats, AgentError>;
    /// Blocks until a container is OOM-killed; its id.
    async fn next_oom(&self) -> Result<String, AgentError>;
}

#[async_trait]
impl Guest for AgentClient {
    async fn create_container(
        &self,
        id: &str,
        spec_json: String,
        rootfs: &str,
        stdin: bool,
    ) -> Result<(), AgentError> {
        AgentClient::create_container(self, id, spec_json, rootfs, stdin).await
    }

    async fn start_container(&self, id: &str) -> Result<u32, AgentError> {
        AgentClient::start_container(self, id).await
    }

    async fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        process_json: String,
        stdin: bool,
    ) -> Result<u32, AgentError> {
        AgentClient::exec_process(self, id, exec_id, process_json, stdin).await
    }

    async fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError> {
        AgentClient::signal(self, id, exec_id, signal, all).await
    }

    async fn wait(&self, id: &str, exec_id: &str) -> Result<Exit, AgentError> {
        let w = AgentClient::wait(self, id, exec_id).await?;
        let status = u32::try_from(w.exit_status).unwrap_or(255);
        Ok(if w.exited_at_unix_ns > 0 {
            Exit {
                status,
                at_unix_ns: w.exited_at_unix_ns,
            }
        } else {
            Exit::now(status)
        })
    }

    async fn remove_process(&self, id: &str, exec_id: &str) -> Result<(), AgentError> {
        AgentClient::remove_process(self, id, exec_id).await
    }

    async fn remove_container(&self, id: &str) -> Result<(), AgentError> {
        AgentClient::remove_container(self, id).await
    }

    async fn write_stdin(&self, id: &str, exec_id: &str, data: Vec<u8>) -> Result<(), AgentError> {
        AgentClient::write_stdin(self, id, exec_id, data).await
    }

    async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), AgentError> {
        AgentClient::close_stdin(self, id, exec_id).await
    }

    async fn read_output(
        &self,
        id: &str,
        exec_id: &str,
        stderr: bool,
    ) -> Result<Option<Vec<u8>>, AgentError> {
        AgentClient::read_output(self, id, exec_id, stderr).await
    }

    async fn resize(
        &self,
        id: &str,
        exec_id: &str,
        rows: u16,
        cols: u16,
    ) -> Result<(), AgentError> {
        AgentClient::resize(self, id, exec_id, rows, cols).await
    }

    async fn pids(&self, id: &str) -> Result<Vec<u32>, AgentError> {
        AgentClient::pids(self, id).await
    }

    async fn set_paused(&self, id: &str, paused: bool) -> Result<(), AgentError> {
        if paused {
            AgentClient::pause(self, id).await
        } else {
            AgentClient::resume(self, id).await
        }
    }

    async fn update(&self, id: &str, resources_json: String) -> Result<(), AgentError> {
        AgentClient::update(self, id, resources_json).await
    }

    async fn stats(&self, id: &str) -> Result<ContainerStats, AgentError> {
        AgentClient::stats(self, id).await
    }

    async fn next_oom(&self) -> Result<String, AgentError> {
        AgentClient::next_oom(self).await
    }
}
