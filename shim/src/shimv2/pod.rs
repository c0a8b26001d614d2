//! The pod: its VM slot, its containers and their processes, and the events they produce.
//!
//! The lifecycle verbs live one per file (`create.rs`, `start.rs`, `kill.rs`, `delete.rs`);
//! this file holds the pod itself and the verbs that only read or forward.
//!
//! Locking: `containers` is a plain mutex held only to read or change entries (never across a
//! VM boot or an agent call); events are enqueued while it is held, at the transition they
//! report, so their order is the order of the transitions. The VM has its own slot
//! ([`super::vm::VmSlot`]).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pangolin_protocols::agent::ContainerStats;
use pangolin_runtime_config::Config;

use super::container::Containers;
use super::events::{Event, Events};
use super::io::StdioPaths;
use super::mounts::{HostMounts, PodMounts};
use super::process::{Exit, ProcessState};
use super::vm::{PodVm, SandboxLauncher, VmLauncher, VmSlot};
use super::PodError;

/// How long an exit waits for its process's output once the process exited: the agent ends
/// each stream as soon as the process's buffered output is read, so this only bounds a guest
/// that stops answering.
pub const OUTPUT_DRAIN_BOUND: Duration = Duration::from_secs(30);

/// What a pod's lifecycle acts on: swapped for fakes in unit tests.
pub struct Deps {
    /// Boots the VM.
    pub launcher: Arc<dyn VmLauncher>,
    /// Host mounts.
    pub mounts: Arc<dyn PodMounts>,
    /// How long an exit waits for drained output ([`OUTPUT_DRAIN_BOUND`] outside tests).
    pub output_drain_bound: Duration,
}

/// A read-only view of one process for State answers.
#[derive(Debug, Clone)]
pub struct ProcessView {
    /// Bundle of its container.
    pub bundle: String,
    /// Guest pid, once started.
    pub pid: Option<u32>,
    /// containerd's state name.
    pub status: containerd_shim::protos::api::Status,
    /// Its FIFOs.
    pub stdio: StdioPaths,
    /// Its exit, once it exited.
    pub exit: Option<Exit>,
}

/// Everything one shim process manages.
pub struct Pod {
    /// Group id: the CRI sandbox id, or the task id for a plain `ctr run`.
    pub id: String,
    /// The runtime configuration, or why it could not be loaded (every create then fails with
    /// that reason rather than running on defaults the operator did not choose).
    pub(super) config: Result<Config, String>,
    pub(super) events: Events,
    pub(super) vm: VmSlot,
    pub(super) mounts: Arc<dyn PodMounts>,
    containers: Mutex<Containers>,
    /// The pod's hostname (the first task's, i.e. the CRI sandbox's), for containers that join
    /// its UTS namespace.
    pub(super) hostname: Mutex<Option<String>>,
    /// The CRI pod (`namespace/name`), from the first task's annotations, for `pangolin list`.
    pub(super) cri_pod: Mutex<Option<String>>,
    pub(super) drain_bound: Duration,
}

impl Pod {
    /// A pod named `id` on the real host: its share under the state dir, VMs from sandboxes.
    pub fn new(id: &str, config: Result<Config, String>, events: Events) -> Arc<Pod> {
        let state_dir = match &config {
            Ok(c) => c.runtime.state_dir.clone(),
            Err(_) => Config::default().runtime.state_dir,
        };
        let shared: PathBuf = state_dir.join(format!("{id}.shared"));
        let deps = Deps {
            launcher: Arc::new(SandboxLauncher),
            mounts: Arc::new(HostMounts::new(shared)),
            output_drain_bound: OUTPUT_DRAIN_BOUND,
        };
        Pod::with(id, config, events, deps)
    }

    /// A pod acting through `deps`.
    pub fn with(id: &str, config: Result<Config, String>, events: Events, deps: Deps) -> Arc<Pod> {
        Arc::new(Pod {
            id: id.to_string(),
            config,
            events,
            vm: VmSlot::new(deps.launcher),
            mounts: deps.mounts,
            containers: Mutex::new(Containers::default()),
            hostname: Mutex::new(None),
            cri_pod: Mutex::new(None),
            drain_bound: deps.output_drain_bound,
        })
    }

    /// Writes the pod's facts (its CRI name, its containers) into its sandbox directory, for
    /// `pangolin list`; nothing when no VM runs.
    pub(super) fn record_facts(&self) {
        let Ok(config) = &self.config else {
            return;
        };
        if self.vm.host_pid() == 0 {
            return;
        }
        let workdir = crate::sandbox::workdir_of(&config.runtime.state_dir, &self.id);
        let facts = crate::sandbox::info::PodInfo {
            pod: self
                .cri_pod
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            containers: self.containers().ids(),
        };
        if let Err(e) = crate::sandbox::info::write_pod(&workdir, &facts) {
            tracing::debug!(error = %e, "cannot write the pod's facts");
        }
    }

    /// The container map, locked.
    pub(super) fn containers(&self) -> MutexGuard<'_, Containers> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an exit (first one wins) and enqueues its TaskExit.
    pub(super) fn record_exit(&self, id: &str, exec_id: &str, exit: Exit) {
        let mut cs = self.containers();
        if let Ok(p) = cs.process_mut(id, exec_id) {
            let pid = p.pid();
            if p.exited(exit) {
                self.events
                    .send(Event::exited(id, exec_id, pid.unwrap_or(0), exit));
            }
        }
    }

    /// Every process that has not exited exits with `status` (the VM is gone).
    pub(super) fn fail_all(&self, status: u32) {
        let exit = Exit::now(status);
        let mut cs = self.containers();
        for (id, c) in cs.iter_mut() {
            for (exec_id, p) in c.processes_mut() {
                let pid = p.pid();
                // An exec never started has nothing to report; its waiters still wake.
                let report = exec_id.is_empty() || pid.is_some();
                if p.exited(exit) && report {
                    self.events
                        .send(Event::exited(id, exec_id, pid.unwrap_or(0), exit));
                }
            }
        }
    }

    /// Called once per VM when it starts running: watches for the VMM's death and OOM kills.
    pub(super) fn watch_vm(self: &Arc<Self>, vm: &dyn PodVm) {
        let mut exit = vm.exit_watch();
        let pod = Arc::clone(self);
        tokio::spawn(async move {
            let status = match exit.wait_for(Option::is_some).await {
                Ok(s) => *s,
                Err(_) => return,
            };
            let why = status.map_or_else(
                || "the VM ended".to_string(),
                |s| format!("the VM ended (the VMM or a helper it needs exited: {s})"),
            );
            if pod.vm.died(why.clone()).await {
                tracing::error!(%why, "the pod's VM died; failing its processes");
                pod.fail_all(137);
            }
        });
        let guest = vm.guest();
        let pod = Arc::clone(self);
        tokio::spawn(async move {
            while let Ok(id) = guest.next_oom().await {
                pod.events.send(Event::oom(&id));
            }
        });
    }

    /// Stops the VM (cancelling a boot under way) and removes the pod's share; any process
    /// still running exits with 137.
    pub async fn stop_vm(&self) {
        self.vm.stop().await;
        self.mounts.remove_shared();
        self.fail_all(137);
    }

    /// The process's current view.
    pub fn view(&self, id: &str, exec_id: &str) -> Result<ProcessView, PodError> {
        let cs = self.containers();
        let c = cs.get(id)?;
        let p = c
            .process(exec_id)
            .ok_or_else(|| PodError::NotFound(format!("exec {exec_id} of {id}")))?;
        Ok(ProcessView {
            bundle: c.bundle.clone(),
            pid: p.pid(),
            status: p.status(),
            stdio: p.stdio.clone(),
            exit: p.exit(),
        })
    }

    /// Waits for the process to exit.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<Exit, PodError> {
        let mut rx = self.containers().process_mut(id, exec_id)?.subscribe();
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| PodError::State("the process was removed"))?;
        (*exit).ok_or(PodError::State("the process was removed"))
    }

    /// Guest pids of the container.
    pub async fn pids(&self, id: &str) -> Result<Vec<u32>, PodError> {
        self.view(id, "")?;
        Ok(self.vm.guest()?.pids(id).await?)
    }

    /// Pauses or resumes the container.
    pub async fn set_paused(&self, id: &str, paused: bool) -> Result<(), PodError> {
        {
            let mut cs = self.containers();
            let init = &cs.get_mut(id)?.init;
            let ok = match init.state() {
                ProcessState::Running { .. } => paused,
                ProcessState::Paused { .. } => !paused,
                _ => false,
            };
            if !ok {
                return Err(PodError::State(if paused {
                    "only a running container can be paused"
                } else {
                    "only a paused container can be resumed"
                }));
            }
        }
        self.vm.guest()?.set_paused(id, paused).await?;
        let mut cs = self.containers();
        if cs.get_mut(id)?.init.set_paused(paused) {
            self.events.send(Event::paused(id, paused));
        }
        Ok(())
    }

    /// Closes a process's stdin once what its client wrote is forwarded.
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), PodError> {
        let pump = self
            .containers()
            .process_mut(id, exec_id)?
            .take_close_stdin();
        match pump {
            Some(tx) => {
                let _ = tx.send(());
                Ok(())
            }
            None => Ok(self.vm.guest()?.close_stdin(id, exec_id).await?),
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
        Ok(self.vm.guest()?.resize(id, exec_id, rows, cols).await?)
    }

    /// Applies new resources (OCI LinuxResources JSON) in the guest.
    pub async fn update(&self, id: &str, resources_json: String) -> Result<(), PodError> {
        self.view(id, "")?;
        Ok(self.vm.guest()?.update(id, resources_json).await?)
    }

    /// The container's cgroup statistics from the guest.
    pub async fn stats(&self, id: &str) -> Result<ContainerStats, PodError> {
        self.view(id, "")?;
        Ok(self.vm.guest()?.stats(id).await?)
    }

    /// Shutdown: when no container exists, stops the VM (cancelling a boot under way) and
    /// returns true (the shim may exit).
    pub async fn shutdown(&self) -> bool {
        if !self.containers().has_ready() {
            self.stop_vm().await;
            return true;
        }
        false
    }
}
