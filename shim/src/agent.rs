//! Typed client of the guest agent (ttrpc over hybrid vsock), with a deadline on every call
//! that is not meant to block (wait, stream reads and OOM events block by design).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pangolin_protocols::agent::*;
use pangolin_protocols::agent_ttrpc::AgentServiceClient;
use ttrpc::context::{self, Context};

use crate::rpc_stats::RpcStats;
use crate::vsock::{self, VsockError};

/// Deadline for calls that only touch the agent's state.
const QUICK: Duration = Duration::from_secs(10);
/// Deadline for calls that create processes (slow under emulation).
const SLOW: Duration = Duration::from_secs(60);

/// An agent call failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent could not be reached.
    #[error(transparent)]
    Connect(#[from] VsockError),
    /// The agent did not answer before the VM's boot deadline.
    #[error("the guest agent did not answer within {0:?}")]
    NotReady(Duration),
    /// The agent reported an error, or the transport failed.
    #[error("agent {call}: {message}")]
    Call {
        /// The RPC.
        call: &'static str,
        /// The agent's message (or the transport's).
        message: String,
        /// The ttrpc status code, when the agent answered.
        code: Option<ttrpc::Code>,
    },
    /// The agent speaks another API version.
    #[error("guest agent speaks API v{guest}, this host v{host}")]
    Version {
        /// Guest version.
        guest: u32,
        /// Host version.
        host: u32,
    },
    /// The host's own randomness for the guest could not be drawn.
    #[error("drawing entropy for the guest")]
    Entropy(#[source] std::io::Error),
}

impl AgentError {
    fn from_ttrpc(call: &'static str, err: ttrpc::Error) -> AgentError {
        match err {
            ttrpc::Error::RpcStatus(s) => AgentError::Call {
                call,
                message: s.message().to_string(),
                code: Some(s.code()),
            },
            other => AgentError::Call {
                call,
                message: other.to_string(),
                code: None,
            },
        }
    }

    /// The ttrpc status code the agent answered with, if any.
    pub fn code(&self) -> Option<ttrpc::Code> {
        match self {
            AgentError::Call { code, .. } => *code,
            _ => None,
        }
    }
}

fn ctx(timeout: Option<Duration>) -> Context {
    match timeout {
        Some(t) => context::with_timeout(i64::try_from(t.as_nanos()).unwrap_or(i64::MAX)),
        None => context::Context::default(),
    }
}

/// A connected agent.
#[derive(Clone)]
pub struct AgentClient {
    inner: AgentServiceClient,
    /// Latency of each call, per method (shared by the clones).
    stats: Arc<RpcStats>,
}

macro_rules! call {
    ($self:ident, $method:ident, $name:literal, $req:expr, $timeout:expr) => {{
        let started = Instant::now();
        let answer = $self
            .inner
            .$method(ctx($timeout), &$req)
            .await
            .map_err(|e| AgentError::from_ttrpc($name, e));
        $self.stats.observe($name, started.elapsed());
        answer
    }};
}

impl AgentClient {
    /// The latency histograms of this connection's calls (and its clones').
    pub fn rpc_stats(&self) -> &Arc<RpcStats> {
        &self.stats
    }

    /// Connects through `uds`, retrying until `deadline` while `alive()` holds (the VM runs).
    pub async fn connect(
        uds: &Path,
        port: u32,
        deadline: Instant,
        mut alive: impl FnMut() -> Result<(), crate::sandbox::SandboxError>,
    ) -> Result<AgentClient, crate::sandbox::SandboxError> {
        let start = Instant::now();
        loop {
            alive()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(AgentError::NotReady(deadline - start).into());
            }
            match vsock::connect(uds, port, left.min(Duration::from_secs(1))).await {
                Ok(stream) => {
                    let client = ttrpc::r#async::Client::new(
                        ttrpc::r#async::transport::Socket::from(stream),
                    );
                    let agent = AgentClient {
                        inner: AgentServiceClient::new(client),
                        stats: Arc::default(),
                    };
                    // The vsock daemon may accept before the guest listens: prove the agent answers.
                    match agent.check(left.min(Duration::from_secs(2))).await {
                        Ok(()) => return Ok(agent),
                        Err(err) => tracing::trace!(%err, "agent not answering yet"),
                    }
                }
                Err(err) => tracing::trace!(%err, "agent not reachable yet"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn check(&self, timeout: Duration) -> Result<(), AgentError> {
        call!(self, check, "Check", CheckRequest::new(), Some(timeout)).map(|_| ())
    }

    /// Guest facts (and the guest clock set from ours, its CRNG reseeded with our entropy:
    /// a VM restored from a template must not go on with the template's); fails on another API
    /// version. `share_tag` names the virtio-fs share the agent mounts first, if the VM has one;
    /// `console_shell`, the guest path of the debug console's busybox when it is on.
    pub async fn guest_details(
        &self,
        share_tag: Option<&str>,
        console_shell: Option<&str>,
    ) -> Result<GuestDetails, AgentError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let req = GuestDetailsRequest {
            host_time_unix_ns: now,
            entropy: host_entropy().map_err(AgentError::Entropy)?,
            share_tag: share_tag.unwrap_or_default().into(),
            debug_console_shell: console_shell.unwrap_or_default().into(),
            ..Default::default()
        };
        let d = call!(self, get_guest_details, "GetGuestDetails", req, Some(QUICK))?;
        if d.api_version != pangolin_protocols::API_VERSION {
            return Err(AgentError::Version {
                guest: d.api_version,
                host: pangolin_protocols::API_VERSION,
            });
        }
        Ok(d)
    }

    /// Creates a container from an OCI spec, rooted at a guest path.
    pub async fn create_container(
        &self,
        id: &str,
        spec_json: String,
        rootfs: &str,
        stdin: bool,
    ) -> Result<(), AgentError> {
        let req = CreateContainerRequest {
            container_id: id.into(),
            oci_spec_json: spec_json,
            rootfs: rootfs.into(),
            stdin,
            ..Default::default()
        };
        call!(self, create_container, "CreateContainer", req, Some(SLOW)).map(|_| ())
    }

    /// Starts a created container; returns init's guest pid.
    pub async fn start_container(&self, id: &str) -> Result<u32, AgentError> {
        let req = ContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        call!(self, start_container, "StartContainer", req, Some(SLOW)).map(|r| r.pid)
    }

    /// Runs another process in a running container; returns its guest pid.
    pub async fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        process_json: String,
        stdin: bool,
    ) -> Result<u32, AgentError> {
        let req = ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            process_json,
            stdin,
            ..Default::default()
        };
        call!(self, exec_process, "ExecProcess", req, Some(SLOW)).map(|r| r.pid)
    }

    /// Sends a signal to one process, or to all of the container's with `all`.
    pub async fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError> {
        let req = SignalProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            signal,
            all,
            ..Default::default()
        };
        call!(self, signal_process, "SignalProcess", req, Some(QUICK)).map(|_| ())
    }

    /// Blocks until the process exits.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<WaitProcessResponse, AgentError> {
        let req = ProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        call!(self, wait_process, "WaitProcess", req, None)
    }

    /// Forgets an exited exec process.
    pub async fn remove_process(&self, id: &str, exec_id: &str) -> Result<(), AgentError> {
        let req = ProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        call!(self, remove_process, "RemoveProcess", req, Some(QUICK)).map(|_| ())
    }

    /// Writes to the process's stdin.
    pub async fn write_stdin(
        &self,
        id: &str,
        exec_id: &str,
        data: Vec<u8>,
    ) -> Result<(), AgentError> {
        let req = WriteStreamRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            data,
            ..Default::default()
        };
        call!(self, write_stdin, "WriteStdin", req, Some(SLOW)).map(|_| ())
    }

    /// Closes the process's stdin.
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), AgentError> {
        let req = ProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        call!(self, close_stdin, "CloseStdin", req, Some(QUICK)).map(|_| ())
    }

    /// Reads output; `None` at end of stream.
    pub async fn read_output(
        &self,
        id: &str,
        exec_id: &str,
        stderr: bool,
    ) -> Result<Option<Vec<u8>>, AgentError> {
        let req = ReadStreamRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            len: 1 << 16,
            ..Default::default()
        };
        let resp = if stderr {
            call!(self, read_stderr, "ReadStderr", req, None)?
        } else {
            call!(self, read_stdout, "ReadStdout", req, None)?
        };
        Ok(if resp.eof { None } else { Some(resp.data) })
    }

    /// Resizes the process's terminal.
    pub async fn resize(
        &self,
        id: &str,
        exec_id: &str,
        rows: u16,
        cols: u16,
    ) -> Result<(), AgentError> {
        let req = ResizeTtyRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            rows: rows.into(),
            cols: cols.into(),
            ..Default::default()
        };
        call!(self, resize_tty, "ResizeTty", req, Some(QUICK)).map(|_| ())
    }

    /// Freezes the container.
    pub async fn pause(&self, id: &str) -> Result<(), AgentError> {
        let req = ContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        call!(self, pause_container, "PauseContainer", req, Some(QUICK)).map(|_| ())
    }

    /// Thaws the container.
    pub async fn resume(&self, id: &str) -> Result<(), AgentError> {
        let req = ContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        call!(self, resume_container, "ResumeContainer", req, Some(QUICK)).map(|_| ())
    }

    /// Applies OCI LinuxResources (JSON) to the container's cgroup.
    pub async fn update(&self, id: &str, resources_json: String) -> Result<(), AgentError> {
        let req = UpdateContainerRequest {
            container_id: id.into(),
            resources_json,
            ..Default::default()
        };
        call!(self, update_container, "UpdateContainer", req, Some(QUICK)).map(|_| ())
    }

    /// cgroup figures of the container.
    pub async fn stats(&self, id: &str) -> Result<ContainerStats, AgentError> {
        let req = ContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        call!(self, stats_container, "StatsContainer", req, Some(QUICK))
    }

    /// The guest's memory and load.
    pub async fn guest_stats(&self) -> Result<GuestStatsResponse, AgentError> {
        call!(
            self,
            guest_stats,
            "GuestStats",
            GuestStatsRequest::new(),
            Some(QUICK)
        )
    }

    /// Guest pids of the container's processes.
    pub async fn pids(&self, id: &str) -> Result<Vec<u32>, AgentError> {
        let req = ContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        call!(self, list_processes, "ListProcesses", req, Some(QUICK)).map(|r| r.pids)
    }

    /// Kills (if needed) and removes the container.
    pub async fn remove_container(&self, id: &str) -> Result<(), AgentError> {
        let req = ContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        call!(self, remove_container, "RemoveContainer", req, Some(SLOW)).map(|_| ())
    }

    /// Blocks until a container is OOM-killed; returns its id.
    pub async fn next_oom(&self) -> Result<String, AgentError> {
        call!(
            self,
            get_oom_event,
            "GetOomEvent",
            GetOomEventRequest::new(),
            None
        )
        .map(|e| e.container_id)
    }

    /// Configures the guest NIC, addresses and routes like the pod's interface.
    pub async fn setup_network(&self, req: SetupNetworkRequest) -> Result<(), AgentError> {
        call!(self, setup_network, "SetupNetwork", req, None).map(|_| ())
    }

    /// Stops every container and powers the guest off.
    pub async fn destroy_sandbox(&self, timeout: Duration) -> Result<(), AgentError> {
        call!(
            self,
            destroy_sandbox,
            "DestroySandbox",
            DestroySandboxRequest::new(),
            Some(timeout)
        )
        .map(|_| ())
    }
}

/// Bytes of host randomness sent with every GetGuestDetails.
pub const ENTROPY_BYTES: usize = 64;

/// [`ENTROPY_BYTES`] from the host's CRNG (`getrandom(2)`).
fn host_entropy() -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; ENTROPY_BYTES];
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a live, writable buffer of `rest.len()` bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => filled += n,
            Err(_) => {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
    Ok(buf)
}
