//! The pod: its VM (booted by the first task), its containers and their processes.
//!
//! Lock discipline: `state` (the container map) is a plain mutex held only to read or update
//! entries, never across a VM boot or an agent call; `vm` serialises boot and shutdown.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_shim::protos::api::{Mount, Status};
use oci_spec::runtime::Spec;
use pangolin_protocols::GUEST_SHARED_DIR;
use pangolin_runtime_config::Config;
use tokio::sync::watch;

use super::events::{Event, Events};
use super::guest_spec::{guest_spec, pod_netns};
use super::io::{self, StdioPaths};
use super::rootfs;
use crate::agent::{AgentClient, AgentError};
use crate::sandbox::{BootOptions, Sandbox, SandboxError};

/// A pod operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// No such container or process.
    #[error("{0} not found")]
    NotFound(String),
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
    /// The VM could not be booted.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The agent refused or failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// Host mounts for the rootfs.
    #[error(transparent)]
    Rootfs(#[from] rootfs::RootfsError),
    /// A host bind mount could not be shared with the guest.
    #[error(transparent)]
    Volume(#[from] super::volumes::VolumeError),
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit status (128 + signal when killed).
    pub status: u32,
    /// When, in ns since the epoch.
    pub at_unix_ns: u64,
}

impl Exit {
    /// The exit time as containerd's messages carry it.
    pub fn exited_at(
        &self,
    ) -> protobuf::MessageField<protobuf::well_known_types::timestamp::Timestamp> {
        let mut t = protobuf::well_known_types::timestamp::Timestamp::new();
        t.seconds = i64::try_from(self.at_unix_ns / 1_000_000_000).unwrap_or(i64::MAX);
        t.nanos = i32::try_from(self.at_unix_ns % 1_000_000_000).unwrap_or(0);
        protobuf::MessageField::some(t)
    }
}

/// One process (a container's init, or an exec).
struct Process {
    pid: u32,
    status: Status,
    stdio: StdioPaths,
    /// The exec's OCI process JSON until it starts.
    pending_spec: Option<String>,
    close_stdin: Option<tokio::sync::oneshot::Sender<()>>,
    exit: watch::Sender<Option<Exit>>,
}

impl Process {
    fn new(stdio: StdioPaths, pending_spec: Option<String>) -> Self {
        Self {
            pid: 0,
            status: Status::CREATED,
            stdio,
            pending_spec,
            close_stdin: None,
            exit: watch::channel(None).0,
        }
    }
}

struct Container {
    bundle: String,
    init: Process,
    execs: HashMap<String, Process>,
}

/// A read-only view of one process for State/Wait answers.
#[derive(Debug, Clone)]
pub struct ProcessView {
    /// Bundle of its container.
    pub bundle: String,
    /// Guest pid (0 before start).
    pub pid: u32,
    /// Lifecycle state.
    pub status: Status,
    /// Its FIFOs.
    pub stdio: StdioPaths,
    /// Its exit, once it exited.
    pub exit: Option<Exit>,
}

/// Everything one shim process manages.
pub struct Pod {
    /// Group id: the CRI sandbox id, or the task id for a plain `ctr run`.
    pub id: String,
    /// The runtime configuration, or why it could not be loaded (every create then fails
    /// with that reason rather than running on defaults the operator did not choose).
    config: Result<Config, String>,
    shared: PathBuf,
    events: Events,
    state: Mutex<HashMap<String, Container>>,
    /// The pod's VM once booted; also serialises boot and shutdown.
    vm: tokio::sync::Mutex<Option<Sandbox>>,
    agent: Mutex<Option<AgentClient>>,
    /// The pod's hostname (the first task's, i.e. the CRI sandbox's), for containers that
    /// join its UTS namespace.
    hostname: Mutex<Option<String>>,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl Pod {
    /// A pod named `id` with no VM yet.
    pub fn new(id: &str, config: Result<Config, String>, events: Events) -> Arc<Self> {
        let state_dir = match &config {
            Ok(c) => c.runtime.state_dir.clone(),
            Err(_) => Config::default().runtime.state_dir,
        };
        let shared = state_dir.join(format!("{id}.shared"));
        Arc::new(Self {
            id: id.to_string(),
            config,
            shared,
            events,
            state: Mutex::new(HashMap::new()),
            vm: tokio::sync::Mutex::new(None),
            agent: Mutex::new(None),
            hostname: Mutex::new(None),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Container>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn agent(&self) -> Result<AgentClient, PodError> {
        self.agent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(PodError::State("the pod's VM is not running"))
    }

    /// Boots the VM (shaped by the first task's `spec`) unless it runs; returns its agent.
    async fn ensure_vm(self: &Arc<Self>, spec: &Spec) -> Result<AgentClient, PodError> {
        let mut vm = self.vm.lock().await;
        if let Some(sandbox) = vm.as_ref() {
            return Ok(sandbox.agent().clone());
        }
        let base = self.config.as_ref().map_err(|why| PodError::Invalid {
            what: "configuration",
            why: why.clone(),
        })?;
        let config = super::sizing::vm_config(base, spec)?;
        let netns = pod_netns(spec)?;
        spec.hostname()
            .clone_into(&mut self.hostname.lock().unwrap_or_else(|p| p.into_inner()));
        tracing::info!(
            vcpus = config.hypervisor.vcpus,
            memory_mib = config.hypervisor.memory_mib,
            kind = %config.hypervisor.kind,
            "booting the pod VM"
        );
        rootfs::prepare_shared(&self.shared)?;
        let options = BootOptions {
            share: Some(&self.shared),
            console_log: None,
            netns: netns.as_deref(),
        };
        let sandbox = match Sandbox::start_with(&self.id, &config, options).await {
            Ok(s) => s,
            Err(e) => {
                rootfs::remove_shared(&self.shared);
                return Err(e.into());
            }
        };
        let agent = sandbox.agent().clone();
        *vm = Some(sandbox);
        *self.agent.lock().unwrap_or_else(|p| p.into_inner()) = Some(agent.clone());
        let pod = self.clone();
        tokio::spawn(async move { pod.watch_vmm().await });
        let pod = self.clone();
        let oom_agent = agent.clone();
        tokio::spawn(async move { pod.watch_oom(oom_agent).await });
        Ok(agent)
    }

    /// When the VMM dies, every process exits with 137 (so containerd sees TaskExit at once).
    async fn watch_vmm(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut vm = self.vm.lock().await;
            let Some(sandbox) = vm.as_mut() else { return };
            if sandbox.check_alive().is_ok() {
                continue;
            }
            tracing::error!("the pod's VMM exited; failing its processes");
            drop(vm);
            let ids: Vec<(String, String)> = self
                .lock()
                .iter()
                .flat_map(|(cid, c)| {
                    std::iter::once((cid.clone(), String::new()))
                        .chain(c.execs.keys().map(|e| (cid.clone(), e.clone())))
                })
                .collect();
            for (cid, exec) in ids {
                self.record_exit(&cid, &exec, 137, now_ns()).await;
            }
            return;
        }
    }

    async fn watch_oom(self: Arc<Self>, agent: AgentClient) {
        while let Ok(id) = agent.next_oom().await {
            let mut e = containerd_shim::protos::events::task::TaskOOM::new();
            e.container_id = id;
            self.events.send(Event::Oom(e)).await;
        }
    }

    /// Create: boots the VM if needed, mounts the rootfs, creates the container in the guest.
    pub async fn create(
        self: &Arc<Self>,
        id: &str,
        bundle: &str,
        mounts: &[Mount],
        stdio: StdioPaths,
    ) -> Result<(), PodError> {
        if self.lock().contains_key(id) {
            return Err(PodError::Exists(id.into()));
        }
        let spec_path = Path::new(bundle).join("config.json");
        let spec = Spec::load(&spec_path).map_err(|e| PodError::Invalid {
            what: "bundle config.json",
            why: e.to_string(),
        })?;
        let root = spec
            .root()
            .as_ref()
            .map(|r| Path::new(bundle).join(r.path()))
            .unwrap_or_else(|| Path::new(bundle).join("rootfs"));
        let agent = self.ensure_vm(&spec).await?;
        let mut spec = spec;
        let prepared = async {
            super::volumes::share(&self.shared, Path::new(GUEST_SHARED_DIR), id, &mut spec)?;
            let hostname = self
                .hostname
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let spec_json = guest_spec(spec, hostname.as_deref())?;
            rootfs::mount_container(&self.shared, id, &root, mounts).await?;
            let guest_rootfs = format!("{GUEST_SHARED_DIR}/{id}/rootfs");
            agent
                .create_container(id, spec_json, &guest_rootfs, !stdio.stdin.is_empty())
                .await?;
            Ok::<(), PodError>(())
        };
        if let Err(e) = prepared.await {
            rootfs::unmount_container(&self.shared, id);
            return Err(e);
        }
        self.lock().insert(
            id.to_string(),
            Container {
                bundle: bundle.to_string(),
                init: Process::new(stdio.clone(), None),
                execs: HashMap::new(),
            },
        );
        let mut e = containerd_shim::protos::events::task::TaskCreate::new();
        e.container_id = id.into();
        e.bundle = bundle.into();
        e.rootfs = mounts.to_vec();
        e.pid = std::process::id();
        let mut io = containerd_shim::protos::events::task::TaskIO::new();
        io.stdin = stdio.stdin;
        io.stdout = stdio.stdout;
        io.stderr = stdio.stderr;
        io.terminal = stdio.terminal;
        e.io = protobuf::MessageField::some(io);
        self.events.send(Event::Create(e)).await;
        Ok(())
    }

    /// Adds an exec (started later by `start`).
    pub async fn add_exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: String,
        stdio: StdioPaths,
    ) -> Result<(), PodError> {
        {
            let mut state = self.lock();
            let c = state
                .get_mut(id)
                .ok_or_else(|| PodError::NotFound(id.into()))?;
            if c.execs.contains_key(exec_id) {
                return Err(PodError::Exists(format!("exec {exec_id}")));
            }
            c.execs
                .insert(exec_id.to_string(), Process::new(stdio, Some(process_json)));
        }
        let mut e = containerd_shim::protos::events::task::TaskExecAdded::new();
        e.container_id = id.into();
        e.exec_id = exec_id.into();
        self.events.send(Event::ExecAdded(e)).await;
        Ok(())
    }

    /// Starts the init process (empty `exec_id`) or an exec; returns its pid.
    pub async fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<u32, PodError> {
        let agent = self.agent()?;
        let (stdio, pending) = {
            let mut state = self.lock();
            let c = state
                .get_mut(id)
                .ok_or_else(|| PodError::NotFound(id.into()))?;
            let p = if exec_id.is_empty() {
                &mut c.init
            } else {
                c.execs
                    .get_mut(exec_id)
                    .ok_or_else(|| PodError::NotFound(format!("exec {exec_id}")))?
            };
            if p.status != Status::CREATED {
                return Err(PodError::State("process already started"));
            }
            (p.stdio.clone(), p.pending_spec.take())
        };
        let pid = if exec_id.is_empty() {
            agent.start_container(id).await?
        } else {
            let json = pending.ok_or(PodError::State("exec has no process spec"))?;
            agent
                .exec_process(id, exec_id, json, !stdio.stdin.is_empty())
                .await?
        };
        let pumps = io::start(&agent, id, exec_id, &stdio);
        let outputs = pumps.outputs;
        {
            let mut state = self.lock();
            if let Some(p) = process_mut(&mut state, id, exec_id) {
                p.pid = pid;
                p.status = Status::RUNNING;
                p.close_stdin = pumps.close_stdin;
            }
        }
        let pod = self.clone();
        let (cid, eid) = (id.to_string(), exec_id.to_string());
        tokio::spawn(async move {
            let exit = agent.wait(&cid, &eid).await;
            for o in outputs {
                let _ = tokio::time::timeout(Duration::from_secs(2), o).await;
            }
            match exit {
                Ok(w) => {
                    let status = u32::try_from(w.exit_status).unwrap_or(255);
                    let at = if w.exited_at_unix_ns > 0 {
                        w.exited_at_unix_ns
                    } else {
                        now_ns()
                    };
                    pod.record_exit(&cid, &eid, status, at).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, container = %cid, exec = %eid, "waiting for a process");
                    pod.record_exit(&cid, &eid, 255, now_ns()).await;
                }
            }
        });
        if exec_id.is_empty() {
            let mut e = containerd_shim::protos::events::task::TaskStart::new();
            e.container_id = id.into();
            e.pid = pid;
            self.events.send(Event::Start(e)).await;
        } else {
            let mut e = containerd_shim::protos::events::task::TaskExecStarted::new();
            e.container_id = id.into();
            e.exec_id = exec_id.into();
            e.pid = pid;
            self.events.send(Event::ExecStarted(e)).await;
        }
        Ok(pid)
    }

    async fn record_exit(&self, id: &str, exec_id: &str, status: u32, at_unix_ns: u64) {
        let exit = Exit { status, at_unix_ns };
        let pid = {
            let mut state = self.lock();
            let Some(p) = process_mut(&mut state, id, exec_id) else {
                return;
            };
            if p.exit.borrow().is_some() {
                return;
            }
            p.status = Status::STOPPED;
            p.exit.send_replace(Some(exit));
            p.pid
        };
        let mut e = containerd_shim::protos::events::task::TaskExit::new();
        e.container_id = id.into();
        e.id = if exec_id.is_empty() {
            id.into()
        } else {
            exec_id.into()
        };
        e.pid = pid;
        e.exit_status = status;
        e.exited_at = exit.exited_at();
        self.events.send(Event::Exit(e)).await;
    }

    /// The process's current view.
    pub fn view(&self, id: &str, exec_id: &str) -> Result<ProcessView, PodError> {
        let mut state = self.lock();
        let bundle = state
            .get(id)
            .map(|c| c.bundle.clone())
            .ok_or_else(|| PodError::NotFound(id.into()))?;
        let p = process_mut(&mut state, id, exec_id)
            .ok_or_else(|| PodError::NotFound(format!("exec {exec_id}")))?;
        let exit = *p.exit.borrow();
        Ok(ProcessView {
            bundle,
            pid: p.pid,
            status: p.status,
            stdio: p.stdio.clone(),
            exit,
        })
    }

    /// Waits for the process to exit.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<Exit, PodError> {
        let mut rx = {
            let mut state = self.lock();
            process_mut(&mut state, id, exec_id)
                .ok_or_else(|| PodError::NotFound(format!("{id}/{exec_id}")))?
                .exit
                .subscribe()
        };
        loop {
            if let Some(exit) = *rx.borrow_and_update() {
                return Ok(exit);
            }
            if rx.changed().await.is_err() {
                return Err(PodError::State("the process was removed"));
            }
        }
    }

    /// Signals a process (or, with `all`, every process of the container).
    pub async fn kill(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), PodError> {
        let view = self.view(id, exec_id)?;
        if view.exit.is_some() && !all {
            return Err(PodError::State("process already finished"));
        }
        if view.status == Status::CREATED && exec_id.is_empty() {
            // Never started: nothing runs in the guest; it counts as killed.
            self.record_exit(id, exec_id, 128 + signal, now_ns()).await;
            return Ok(());
        }
        self.agent()?.signal(id, exec_id, signal, all).await?;
        Ok(())
    }

    /// Deletes an exec or the container; returns the exit.
    pub async fn delete(
        self: &Arc<Self>,
        id: &str,
        exec_id: &str,
    ) -> Result<(u32, Exit), PodError> {
        let view = self.view(id, exec_id)?;
        if view.status == Status::RUNNING || view.status == Status::PAUSED {
            return Err(PodError::State("cannot delete a running process"));
        }
        let exit = view.exit.unwrap_or(Exit {
            status: 0,
            at_unix_ns: now_ns(),
        });
        if !exec_id.is_empty() {
            if let Ok(agent) = self.agent() {
                let _ = agent.remove_process(id, exec_id).await;
            }
            if let Some(c) = self.lock().get_mut(id) {
                c.execs.remove(exec_id);
            }
            return Ok((view.pid, exit));
        }
        if let Ok(agent) = self.agent() {
            if let Err(e) = agent.remove_container(id).await {
                tracing::warn!(error = %e, container = id, "removing the container in the guest");
            }
        }
        rootfs::unmount_container(&self.shared, id);
        self.lock().remove(id);
        let mut e = containerd_shim::protos::events::task::TaskDelete::new();
        e.container_id = id.into();
        e.pid = view.pid;
        e.exit_status = exit.status;
        e.exited_at = exit.exited_at();
        self.events.send(Event::Delete(e)).await;
        if id == self.id {
            self.stop_vm().await;
        }
        Ok((view.pid, exit))
    }

    /// Stops the VM and removes the pod's share (the sandbox task was deleted, or shutdown).
    pub async fn stop_vm(&self) {
        *self.agent.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let vm = self.vm.lock().await.take();
        if let Some(sandbox) = vm {
            sandbox.shutdown().await;
        }
        rootfs::remove_shared(&self.shared);
    }

    /// Guest pids of the container.
    pub async fn pids(&self, id: &str) -> Result<Vec<u32>, PodError> {
        self.view(id, "")?;
        Ok(self.agent()?.pids(id).await?)
    }

    /// Pauses or resumes the container.
    pub async fn set_paused(&self, id: &str, paused: bool) -> Result<(), PodError> {
        self.view(id, "")?;
        let agent = self.agent()?;
        if paused {
            agent.pause(id).await?;
        } else {
            agent.resume(id).await?;
        }
        if let Some(c) = self.lock().get_mut(id) {
            c.init.status = if paused {
                Status::PAUSED
            } else {
                Status::RUNNING
            };
        }
        if paused {
            let mut e = containerd_shim::protos::events::task::TaskPaused::new();
            e.container_id = id.into();
            self.events.send(Event::Paused(e)).await;
        } else {
            let mut e = containerd_shim::protos::events::task::TaskResumed::new();
            e.container_id = id.into();
            self.events.send(Event::Resumed(e)).await;
        }
        Ok(())
    }

    /// Closes a process's stdin once what its client wrote is forwarded.
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), PodError> {
        let pump = {
            let mut state = self.lock();
            process_mut(&mut state, id, exec_id)
                .ok_or_else(|| PodError::NotFound(format!("{id}/{exec_id}")))?
                .close_stdin
                .take()
        };
        match pump {
            Some(tx) => {
                let _ = tx.send(());
                Ok(())
            }
            None => Ok(self.agent()?.close_stdin(id, exec_id).await?),
        }
    }

    /// Resizes a process's terminal.
    pub async fn resize(
        &self,
        id: &str,
        exec_id: &str,
        rows: u16,
        cols: u16,
    ) -> Result<(), PodError> {
        self.view(id, exec_id)?;
        Ok(self.agent()?.resize(id, exec_id, rows, cols).await?)
    }

    /// Applies new resources (OCI LinuxResources JSON) in the guest.
    pub async fn update(&self, id: &str, resources_json: String) -> Result<(), PodError> {
        self.view(id, "")?;
        Ok(self.agent()?.update(id, resources_json).await?)
    }

    /// The container's cgroup statistics from the guest.
    pub async fn stats(
        &self,
        id: &str,
    ) -> Result<pangolin_protocols::agent::ContainerStats, PodError> {
        self.view(id, "")?;
        Ok(self.agent()?.stats(id).await?)
    }

    /// Whether any container remains.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

fn process_mut<'a>(
    state: &'a mut HashMap<String, Container>,
    id: &str,
    exec_id: &str,
) -> Option<&'a mut Process> {
    let c = state.get_mut(id)?;
    if exec_id.is_empty() {
        Some(&mut c.init)
    } else {
        c.execs.get_mut(exec_id)
    }
}
