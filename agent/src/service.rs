//! The ttrpc AgentService: thin request/response mapping onto [`Sandbox`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pangolin_protocols::agent::*;
use pangolin_protocols::agent_ttrpc::AgentService;
use ttrpc::r#async::TtrpcContext;

use crate::error::AgentError;
use crate::sandbox::Sandbox;

/// The agent's ttrpc service.
pub struct Service {
    sandbox: Arc<Sandbox>,
    ready_boottime_ns: u64,
    share: crate::share::Share,
}

impl Service {
    /// Serves `sandbox`; `ready_boottime_ns` is reported by GetGuestDetails.
    pub fn new(sandbox: Arc<Sandbox>, ready_boottime_ns: u64) -> Service {
        Service {
            sandbox,
            ready_boottime_ns,
            share: crate::share::Share::default(),
        }
    }
}

type Ctx = TtrpcContext;

/// `value` as a u16 request field named `field`.
///
/// # Errors
/// [`AgentError::Invalid`] above 65535.
pub fn u16_field(value: u32, field: &'static str) -> Result<u16, AgentError> {
    u16::try_from(value).map_err(|_| AgentError::Invalid {
        field,
        reason: format!("{value} > 65535"),
    })
}

/// A signal number from the request.
///
/// # Errors
/// [`AgentError::Invalid`] when it does not fit an `i32`.
pub fn signal_field(value: u32) -> Result<i32, AgentError> {
    i32::try_from(value).map_err(|_| AgentError::Invalid {
        field: "signal",
        reason: format!("{value} too large"),
    })
}

#[async_trait]
impl AgentService for Service {
    async fn get_guest_details(
        &self,
        _: &Ctx,
        req: GuestDetailsRequest,
    ) -> ttrpc::Result<GuestDetails> {
        // First, before anything could draw from it: a template's clone must not go on with
        // the template's CRNG state.
        if let Err(err) = crate::entropy::reseed(&req.entropy) {
            tracing::error!(%err, "cannot add the host's entropy");
            return Err(crate::error::AgentError::from(err).into());
        }
        if !req.entropy.is_empty() {
            tracing::debug!(bytes = req.entropy.len(), "CRNG reseeded from the host");
        }
        match crate::clock::sync_to(req.host_time_unix_ns) {
            Ok(true) => tracing::info!("guest clock set from the host"),
            Ok(false) => {}
            Err(err) => tracing::warn!(%err, "cannot set the guest clock"),
        }
        // After the reseed (the share's virtiofsd is this pod's, never the template's).
        self.share.mount(&req.share_tag).map_err(AgentError::from)?;
        if !req.debug_console_shell.is_empty() {
            crate::console::enable(&req.debug_console_shell, self.sandbox.reaper.clone()).map_err(
                |e| {
                    tracing::error!(%e, "cannot start the debug console");
                    AgentError::Io("start the debug console", e)
                },
            )?;
        }
        Ok(crate::guest::details(self.ready_boottime_ns))
    }

    async fn check(&self, _: &Ctx, _: CheckRequest) -> ttrpc::Result<CheckResponse> {
        Ok(CheckResponse {
            serving: true,
            ..Default::default()
        })
    }

    async fn create_container(&self, _: &Ctx, req: CreateContainerRequest) -> ttrpc::Result<Empty> {
        tracing::info!(container = %req.container_id, "create container");
        self.sandbox
            .create(
                &req.container_id,
                &req.oci_spec_json,
                &req.rootfs,
                req.stdin,
            )
            .await?;
        Ok(Empty::new())
    }

    async fn start_container(
        &self,
        _: &Ctx,
        req: ContainerRequest,
    ) -> ttrpc::Result<StartResponse> {
        let pid = self.sandbox.get(&req.container_id)?.start().await?;
        tracing::info!(container = %req.container_id, pid, "started");
        Ok(StartResponse {
            pid: pid.unsigned_abs(),
            ..Default::default()
        })
    }

    async fn exec_process(&self, _: &Ctx, req: ExecProcessRequest) -> ttrpc::Result<StartResponse> {
        let pid = self
            .sandbox
            .exec(
                &req.container_id,
                &req.exec_id,
                &req.process_json,
                req.stdin,
            )
            .await?;
        tracing::info!(container = %req.container_id, exec = %req.exec_id, pid, "exec");
        Ok(StartResponse {
            pid: pid.unsigned_abs(),
            ..Default::default()
        })
    }

    async fn signal_process(&self, _: &Ctx, req: SignalProcessRequest) -> ttrpc::Result<Empty> {
        let container = self.sandbox.get(&req.container_id)?;
        let signal = signal_field(req.signal)?;
        if req.all {
            container.signal_all(signal)?;
        } else {
            container.process(&req.exec_id)?.signal(signal)?;
        }
        Ok(Empty::new())
    }

    async fn wait_process(
        &self,
        _: &Ctx,
        req: ProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let process = self.sandbox.get(&req.container_id)?.process(&req.exec_id)?;
        let exit = process.wait().await;
        Ok(WaitProcessResponse {
            exit_status: exit.status.shell_status(),
            signal: exit.status.signal(),
            exited_at_unix_ns: exit.at_unix_ns,
            ..Default::default()
        })
    }

    async fn remove_process(&self, _: &Ctx, req: ProcessRequest) -> ttrpc::Result<Empty> {
        self.sandbox
            .get(&req.container_id)?
            .remove_exec(&req.exec_id)?;
        Ok(Empty::new())
    }

    async fn write_stdin(
        &self,
        _: &Ctx,
        req: WriteStreamRequest,
    ) -> ttrpc::Result<WriteStreamResponse> {
        let process = self.sandbox.get(&req.container_id)?.process(&req.exec_id)?;
        let n = process.write_stdin(&req.data).await?;
        Ok(WriteStreamResponse {
            len: u32::try_from(n).unwrap_or(u32::MAX),
            ..Default::default()
        })
    }

    async fn close_stdin(&self, _: &Ctx, req: ProcessRequest) -> ttrpc::Result<Empty> {
        self.sandbox
            .get(&req.container_id)?
            .process(&req.exec_id)?
            .close_stdin()
            .await;
        Ok(Empty::new())
    }

    async fn read_stdout(
        &self,
        _: &Ctx,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        self.read(req, false).await
    }

    async fn read_stderr(
        &self,
        _: &Ctx,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        self.read(req, true).await
    }

    async fn resize_tty(&self, _: &Ctx, req: ResizeTtyRequest) -> ttrpc::Result<Empty> {
        let process = self.sandbox.get(&req.container_id)?.process(&req.exec_id)?;
        process.resize(u16_field(req.rows, "rows")?, u16_field(req.cols, "cols")?)?;
        Ok(Empty::new())
    }

    async fn pause_container(&self, _: &Ctx, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.sandbox.get(&req.container_id)?.pause().await?;
        Ok(Empty::new())
    }

    async fn resume_container(&self, _: &Ctx, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.sandbox.get(&req.container_id)?.resume().await?;
        Ok(Empty::new())
    }

    async fn update_container(&self, _: &Ctx, req: UpdateContainerRequest) -> ttrpc::Result<Empty> {
        let container = self.sandbox.get(&req.container_id)?;
        let resources =
            serde_json::from_str(&req.resources_json).map_err(|e| AgentError::Invalid {
                field: "resources_json",
                reason: e.to_string(),
            })?;
        crate::cgroup::update(&container.cgroups_path, &resources)?;
        Ok(Empty::new())
    }

    async fn stats_container(
        &self,
        _: &Ctx,
        req: ContainerRequest,
    ) -> ttrpc::Result<ContainerStats> {
        let container = self.sandbox.get(&req.container_id)?;
        Ok(crate::cgroup::stats(&container.cgroup_dir)?)
    }

    async fn guest_stats(
        &self,
        _: &Ctx,
        _: GuestStatsRequest,
    ) -> ttrpc::Result<GuestStatsResponse> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        Ok(crate::guest::stats(&meminfo, &loadavg))
    }

    async fn list_processes(
        &self,
        _: &Ctx,
        req: ContainerRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        let container = self.sandbox.get(&req.container_id)?;
        let pids = crate::cgroup::pids(&container.cgroup_dir)?;
        Ok(ListProcessesResponse {
            pids,
            ..Default::default()
        })
    }

    async fn remove_container(&self, _: &Ctx, req: ContainerRequest) -> ttrpc::Result<Empty> {
        let container = self.sandbox.get(&req.container_id)?;
        container.destroy().await?;
        self.sandbox.forget(&req.container_id);
        tracing::info!(container = %req.container_id, "removed");
        Ok(Empty::new())
    }

    async fn get_oom_event(&self, _: &Ctx, _: GetOomEventRequest) -> ttrpc::Result<OomEvent> {
        match self.sandbox.oom.next().await {
            Some(container_id) => Ok(OomEvent {
                container_id,
                ..Default::default()
            }),
            None => {
                Err(AgentError::Io("OOM watcher", std::io::ErrorKind::BrokenPipe.into()).into())
            }
        }
    }

    async fn setup_network(&self, _: &Ctx, req: SetupNetworkRequest) -> ttrpc::Result<Empty> {
        tokio::task::spawn_blocking(move || crate::net::setup(&req))
            .await
            .map_err(|e| AgentError::Io("network setup task", std::io::Error::other(e)))?
            .map_err(AgentError::from)?;
        Ok(Empty::new())
    }

    async fn destroy_sandbox(&self, _: &Ctx, _: DestroySandboxRequest) -> ttrpc::Result<Empty> {
        tracing::info!("destroying sandbox");
        for container in self.sandbox.all() {
            if let Err(err) = container.destroy().await {
                tracing::warn!(container = %container.id, %err, "teardown failed");
            }
            self.sandbox.forget(&container.id);
        }
        // Answer first; power off a moment later.
        tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            crate::guest::power_off();
        });
        Ok(Empty::new())
    }
}

impl Service {
    async fn read(
        &self,
        req: ReadStreamRequest,
        stderr: bool,
    ) -> ttrpc::Result<ReadStreamResponse> {
        let process = self.sandbox.get(&req.container_id)?.process(&req.exec_id)?;
        let len = usize::try_from(req.len).unwrap_or(crate::container::MAX_READ);
        let (data, eof) = process.read(stderr, len).await?;
        Ok(ReadStreamResponse {
            data,
            eof,
            ..Default::default()
        })
    }
}
