//! The ttrpc Task service: thin, maps each request onto [`Pod`] and errors onto ttrpc codes.

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::api::{
    CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest,
    CreateTaskResponse, DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest,
    PauseRequest, PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest,
    StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse,
    UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::ttrpc::{self, r#async::TtrpcContext, Code};

use super::io::StdioPaths;
use super::pod::Pod;
use super::PodError;

/// The task service of one shim.
pub struct TaskService {
    pod: Arc<Pod>,
    exit: Arc<ExitSignal>,
}

impl TaskService {
    /// Service over `pod`; `exit` ends the shim.
    pub fn new(pod: Arc<Pod>, exit: Arc<ExitSignal>) -> Self {
        Self { pod, exit }
    }
}

/// A pod error as containerd gets it (one mapping: [`PodError::code`]).
fn status(e: PodError) -> ttrpc::Error {
    e.into()
}

/// Runs a lifecycle verb to completion in a task of its own. ttrpc drops a handler at its
/// client's deadline (and at server shutdown); a transition left half-made there (an id
/// reserved but never created, a process started but never recorded) would outlive the
/// request. The caller may stop waiting; the verb finishes.
pub(super) async fn to_completion<T: Send + 'static>(
    verb: impl std::future::Future<Output = Result<T, PodError>> + Send + 'static,
) -> ttrpc::Result<T> {
    tokio::spawn(verb)
        .await
        .map_err(|_| status(PodError::State("the request's task failed")))?
        .map_err(status)
}

fn stdio(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> StdioPaths {
    StdioPaths {
        stdin: stdin.into(),
        stdout: stdout.into(),
        stderr: stderr.into(),
        terminal,
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        tracing::info!(id = %req.id, bundle = %req.bundle, "create");
        let stdio = stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        let pod = Arc::clone(&self.pod);
        to_completion(async move { pod.create(&req.id, &req.bundle, &req.rootfs, stdio).await })
            .await?;
        let mut resp = CreateTaskResponse::new();
        resp.pid = std::process::id();
        Ok(resp)
    }

    async fn start(&self, _: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        let pod = Arc::clone(&self.pod);
        let pid = to_completion(async move { pod.start(&req.id, &req.exec_id).await }).await?;
        let mut resp = StartResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    async fn delete(&self, _: &TtrpcContext, req: DeleteRequest) -> ttrpc::Result<DeleteResponse> {
        let pod = Arc::clone(&self.pod);
        let (pid, exit) =
            to_completion(async move { pod.delete(&req.id, &req.exec_id).await }).await?;
        let mut resp = DeleteResponse::new();
        resp.pid = pid;
        resp.exit_status = exit.status;
        resp.exited_at = exit.exited_at();
        Ok(resp)
    }

    async fn pids(&self, _: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        let pids = self.pod.pids(&req.id).await.map_err(status)?;
        let mut resp = PidsResponse::new();
        resp.processes = pids
            .into_iter()
            .map(|pid| {
                let mut p = containerd_shim::protos::api::ProcessInfo::new();
                p.pid = pid;
                p
            })
            .collect();
        Ok(resp)
    }

    async fn pause(&self, _: &TtrpcContext, req: PauseRequest) -> ttrpc::Result<Empty> {
        let pod = Arc::clone(&self.pod);
        to_completion(async move { pod.set_paused(&req.id, true).await }).await?;
        Ok(Empty::new())
    }

    async fn resume(&self, _: &TtrpcContext, req: ResumeRequest) -> ttrpc::Result<Empty> {
        let pod = Arc::clone(&self.pod);
        to_completion(async move { pod.set_paused(&req.id, false).await }).await?;
        Ok(Empty::new())
    }

    async fn checkpoint(&self, _: &TtrpcContext, _: CheckpointTaskRequest) -> ttrpc::Result<Empty> {
        Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
            Code::UNIMPLEMENTED,
            "checkpoint is not supported by the pangolin runtime yet",
        )))
    }

    async fn kill(&self, _: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        self.pod
            .kill(&req.id, &req.exec_id, req.signal, req.all)
            .await
            .map_err(status)?;
        Ok(Empty::new())
    }

    async fn exec(&self, _: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        let json = String::from_utf8(spec)
            .map_err(|_| status(PodError::invalid("exec spec", "not UTF-8 JSON")))?;
        let stdio = stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        self.pod
            .add_exec(&req.id, &req.exec_id, json, stdio)
            .map_err(status)?;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        let rows = u16::try_from(req.height).unwrap_or(u16::MAX);
        let cols = u16::try_from(req.width).unwrap_or(u16::MAX);
        self.pod
            .resize(&req.id, &req.exec_id, rows, cols)
            .await
            .map_err(status)?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        if req.stdin {
            self.pod
                .close_stdin(&req.id, &req.exec_id)
                .await
                .map_err(status)?;
        }
        Ok(Empty::new())
    }

    async fn update(&self, _: &TtrpcContext, req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        let json = req
            .resources
            .as_ref()
            .map(|a| String::from_utf8_lossy(&a.value).into_owned())
            .unwrap_or_default();
        self.pod.update(&req.id, json).await.map_err(status)?;
        Ok(Empty::new())
    }

    async fn wait(&self, _: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        let exit = self.pod.wait(&req.id, &req.exec_id).await.map_err(status)?;
        let mut resp = WaitResponse::new();
        resp.exit_status = exit.status;
        resp.exited_at = exit.exited_at();
        Ok(resp)
    }

    async fn state(&self, _: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        let v = self.pod.view(&req.id, &req.exec_id).map_err(status)?;
        let mut resp = StateResponse::new();
        resp.id = req.id.clone();
        resp.exec_id = req.exec_id.clone();
        resp.bundle = v.bundle;
        resp.pid = v.pid.unwrap_or(0);
        resp.status = v.status.into();
        resp.stdin = v.stdio.stdin;
        resp.stdout = v.stdio.stdout;
        resp.stderr = v.stdio.stderr;
        resp.terminal = v.stdio.terminal;
        if let Some(exit) = v.exit {
            resp.exit_status = exit.status;
            resp.exited_at = exit.exited_at();
        }
        Ok(resp)
    }

    async fn stats(&self, _: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        let stats = self.pod.stats(&req.id).await.map_err(status)?;
        let mut resp = StatsResponse::new();
        resp.stats = protobuf::MessageField::some(super::metrics::to_any(&stats).map_err(status)?);
        Ok(resp)
    }

    async fn connect(
        &self,
        _: &TtrpcContext,
        req: ConnectRequest,
    ) -> ttrpc::Result<ConnectResponse> {
        let mut resp = ConnectResponse::new();
        resp.shim_pid = std::process::id();
        resp.task_pid = self
            .pod
            .view(&req.id, "")
            .ok()
            .and_then(|v| v.pid)
            .unwrap_or(0);
        Ok(resp)
    }

    async fn shutdown(&self, _: &TtrpcContext, _: ShutdownRequest) -> ttrpc::Result<Empty> {
        let pod = Arc::clone(&self.pod);
        if to_completion(async move { Ok(pod.shutdown().await) }).await? {
            self.exit.signal();
        }
        Ok(Empty::new())
    }
}
