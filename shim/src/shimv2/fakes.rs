//! Test doubles for the pod's three side-effect traits, passed in explicitly by unit tests:
//! a guest agent whose processes exit when the test says, a launcher that boots at once,
//! hangs until cancelled, or fails, and mounts that only record.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::protos::api::Mount;
use oci_spec::runtime::Spec;
use pangolin_protocols::agent::ContainerStats;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use super::guest::Guest;
use super::mounts::PodMounts;
use super::process::Exit;
use super::vm::{BootPlan, PodVm, VmLauncher};
use super::PodError;
use crate::agent::AgentError;
use crate::sandbox::SandboxError;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Exit senders keyed by `(container id, exec id)`.
type ExitSlots = HashMap<(String, String), watch::Sender<Option<Exit>>>;

/// A guest agent in memory.
#[derive(Default)]
pub struct FakeGuest {
    /// Every call, as `"<rpc> <id>[/<exec>]"`.
    pub calls: Mutex<Vec<String>>,
    /// Exits set by the test (or by a signal), keyed by `(id, exec_id)`.
    exits: Mutex<ExitSlots>,
    /// Every started process exits at once with this status.
    pub exit_at_once: Mutex<Option<u32>>,
    /// CreateContainer takes this long (widens races).
    pub create_delay: Mutex<Duration>,
    /// Output streams stay open after the exit until this is notified.
    pub output_gate: Mutex<Option<Arc<Notify>>>,
    /// When set, every process's stdout is what the test sends here (ending when the sender
    /// is dropped).
    pub stdout_feed: tokio::sync::Mutex<Option<mpsc::UnboundedReceiver<Vec<u8>>>>,
    next_pid: AtomicU32,
    ooms: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    oom_tx: Mutex<Option<mpsc::UnboundedSender<String>>>,
}

impl FakeGuest {
    /// A fresh guest.
    pub fn new() -> Arc<FakeGuest> {
        let (tx, rx) = mpsc::unbounded_channel();
        Arc::new(FakeGuest {
            next_pid: AtomicU32::new(100),
            ooms: Mutex::new(Some(rx)),
            oom_tx: Mutex::new(Some(tx)),
            ..FakeGuest::default()
        })
    }

    fn record(&self, call: &str, id: &str, exec_id: &str) {
        let what = if exec_id.is_empty() {
            format!("{call} {id}")
        } else {
            format!("{call} {id}/{exec_id}")
        };
        lock(&self.calls).push(what);
    }

    /// How often `call` was made.
    pub fn count(&self, call: &str) -> usize {
        lock(&self.calls)
            .iter()
            .filter(|c| c.split(' ').next() == Some(call))
            .count()
    }

    fn exit_slot(&self, id: &str, exec_id: &str) -> watch::Sender<Option<Exit>> {
        lock(&self.exits)
            .entry((id.to_string(), exec_id.to_string()))
            .or_insert_with(|| watch::channel(None).0)
            .clone()
    }

    /// Makes the process exit with `status`.
    pub fn exit(&self, id: &str, exec_id: &str, status: u32) {
        self.exit_slot(id, exec_id)
            .send_replace(Some(Exit::now(status)));
    }

    /// Reports an OOM kill of container `id`.
    pub fn oom(&self, id: &str) {
        if let Some(tx) = lock(&self.oom_tx).as_ref() {
            let _ = tx.send(id.to_string());
        }
    }

    fn pid(&self) -> u32 {
        self.next_pid.fetch_add(1, Ordering::Relaxed)
    }

    fn started(&self, id: &str, exec_id: &str) {
        if let Some(status) = *lock(&self.exit_at_once) {
            self.exit(id, exec_id, status);
        }
    }
}

#[async_trait]
impl Guest for FakeGuest {
    async fn create_container(
        &self,
        id: &str,
        _spec_json: String,
        _rootfs: &str,
        _stdin: bool,
    ) -> Result<(), AgentError> {
        self.record("create", id, "");
        let delay = *lock(&self.create_delay);
        tokio::time::sleep(delay).await;
        Ok(())
    }

    async fn start_container(&self, id: &str) -> Result<u32, AgentError> {
        self.record("start", id, "");
        let pid = self.pid();
        self.started(id, "");
        Ok(pid)
    }

    async fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        _process_json: String,
        _stdin: bool,
    ) -> Result<u32, AgentError> {
        self.record("exec", id, exec_id);
        let pid = self.pid();
        self.started(id, exec_id);
        Ok(pid)
    }

    async fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        _all: bool,
    ) -> Result<(), AgentError> {
        self.record("signal", id, exec_id);
        if signal == 9 || signal == 15 {
            self.exit(id, exec_id, 128 + signal);
        }
        Ok(())
    }

    async fn wait(&self, id: &str, exec_id: &str) -> Result<Exit, AgentError> {
        let mut rx = self.exit_slot(id, exec_id).subscribe();
        let exit = rx.wait_for(Option::is_some).await.map(|e| *e);
        match exit {
            Ok(Some(exit)) => Ok(exit),
            _ => Err(AgentError::NotReady(Duration::ZERO)),
        }
    }

    async fn remove_process(&self, id: &str, exec_id: &str) -> Result<(), AgentError> {
        self.record("remove_process", id, exec_id);
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> Result<(), AgentError> {
        self.record("remove", id, "");
        Ok(())
    }

    async fn write_stdin(&self, _: &str, _: &str, _: Vec<u8>) -> Result<(), AgentError> {
        Ok(())
    }

    async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), AgentError> {
        self.record("close_stdin", id, exec_id);
        Ok(())
    }

    async fn read_output(
        &self,
        id: &str,
        exec_id: &str,
        stderr: bool,
    ) -> Result<Option<Vec<u8>>, AgentError> {
        if !stderr {
            if let Some(feed) = self.stdout_feed.lock().await.as_mut() {
                return Ok(feed.recv().await);
            }
        }
        let gate = lock(&self.output_gate).clone();
        if let Some(gate) = gate {
            // Output flows until the process exits and the test releases the gate.
            let mut rx = self.exit_slot(id, exec_id).subscribe();
            let _ = rx.wait_for(Option::is_some).await;
            gate.notified().await;
        }
        Ok(None)
    }

    async fn resize(&self, id: &str, exec_id: &str, _: u16, _: u16) -> Result<(), AgentError> {
        self.record("resize", id, exec_id);
        Ok(())
    }

    async fn pids(&self, id: &str) -> Result<Vec<u32>, AgentError> {
        self.record("pids", id, "");
        Ok(vec![1])
    }

    async fn set_paused(&self, id: &str, paused: bool) -> Result<(), AgentError> {
        self.record(if paused { "pause" } else { "resume" }, id, "");
        Ok(())
    }

    async fn update(&self, id: &str, _: String) -> Result<(), AgentError> {
        self.record("update", id, "");
        Ok(())
    }

    async fn stats(&self, id: &str) -> Result<ContainerStats, AgentError> {
        self.record("stats", id, "");
        Ok(ContainerStats::new())
    }

    async fn next_oom(&self) -> Result<String, AgentError> {
        let rx = lock(&self.ooms).take();
        let Some(mut rx) = rx else {
            return Err(AgentError::NotReady(Duration::ZERO));
        };
        let next = rx.recv().await;
        *lock(&self.ooms) = Some(rx);
        next.ok_or(AgentError::NotReady(Duration::ZERO))
    }
}

/// How [`FakeLauncher`] boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootMode {
    /// Boots at once.
    Immediate,
    /// Boots after 300 ms.
    Slow,
    /// Never finishes on its own: only a cancel ends it.
    Hang,
    /// Fails.
    Fail,
}

/// A launcher whose VMs are [`FakeVm`]s over one [`FakeGuest`].
pub struct FakeLauncher {
    /// The guest every VM has.
    pub guest: Arc<FakeGuest>,
    /// How it boots.
    pub mode: Mutex<BootMode>,
    /// Boots started.
    pub boots: AtomicU32,
    /// A hung boot saw its cancel and tore down.
    pub cancelled: AtomicBool,
    /// VMs shut down.
    pub shutdowns: Arc<AtomicU32>,
    /// The running VM's exit sender (the test kills the "VMM" with it).
    pub vmm: Mutex<Option<watch::Sender<Option<ExitStatus>>>>,
}

impl FakeLauncher {
    /// A launcher in `mode`.
    pub fn new(mode: BootMode) -> Arc<FakeLauncher> {
        Arc::new(FakeLauncher {
            guest: FakeGuest::new(),
            mode: Mutex::new(mode),
            boots: AtomicU32::new(0),
            cancelled: AtomicBool::new(false),
            shutdowns: Arc::new(AtomicU32::new(0)),
            vmm: Mutex::new(None),
        })
    }

    /// The running VM's VMM exits (killed).
    pub fn kill_vmm(&self) {
        if let Some(tx) = lock(&self.vmm).as_ref() {
            tx.send_replace(Some(std::os::unix::process::ExitStatusExt::from_raw(9)));
        }
    }
}

/// A VM that is only its guest and an exit watch.
pub struct FakeVm {
    guest: Arc<FakeGuest>,
    exit: watch::Receiver<Option<ExitStatus>>,
    shutdowns: Arc<AtomicU32>,
}

#[async_trait]
impl PodVm for FakeVm {
    fn guest(&self) -> Arc<dyn Guest> {
        self.guest.clone()
    }

    fn exit_watch(&self) -> watch::Receiver<Option<ExitStatus>> {
        self.exit.clone()
    }

    async fn shutdown(self: Box<Self>) {
        self.shutdowns.fetch_add(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl VmLauncher for FakeLauncher {
    async fn boot(
        &self,
        _plan: BootPlan,
        cancel: CancellationToken,
    ) -> Result<Box<dyn PodVm>, PodError> {
        self.boots.fetch_add(1, Ordering::Relaxed);
        let mode = *lock(&self.mode);
        if mode == BootMode::Slow {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        match mode {
            BootMode::Immediate | BootMode::Slow => {
                let (tx, exit) = watch::channel(None);
                *lock(&self.vmm) = Some(tx);
                Ok(Box::new(FakeVm {
                    guest: self.guest.clone(),
                    exit,
                    shutdowns: self.shutdowns.clone(),
                }))
            }
            BootMode::Hang => {
                cancel.cancelled().await;
                self.cancelled.store(true, Ordering::Relaxed);
                Err(SandboxError::Cancelled.into())
            }
            BootMode::Fail => Err(PodError::invalid("configuration", "the fake boot fails")),
        }
    }
}

/// Mounts that only record.
pub struct FakeMounts {
    shared: PathBuf,
    /// Every call, as `"<op> [<id>]"`.
    pub calls: Mutex<Vec<String>>,
}

impl FakeMounts {
    /// Mounts whose share is `shared`.
    pub fn new(shared: &Path) -> Arc<FakeMounts> {
        Arc::new(FakeMounts {
            shared: shared.to_path_buf(),
            calls: Mutex::new(Vec::new()),
        })
    }

    /// How often `op` was done.
    pub fn count(&self, op: &str) -> usize {
        lock(&self.calls)
            .iter()
            .filter(|c| c.split(' ').next() == Some(op))
            .count()
    }
}

#[async_trait]
impl PodMounts for FakeMounts {
    fn shared(&self) -> &Path {
        &self.shared
    }

    fn prepare_shared(&self) -> Result<(), PodError> {
        lock(&self.calls).push("prepare".into());
        Ok(())
    }

    fn remove_shared(&self) {
        lock(&self.calls).push("remove_shared".into());
    }

    fn share_volumes(&self, id: &str, _spec: &mut Spec) -> Result<(), PodError> {
        lock(&self.calls).push(format!("volumes {id}"));
        Ok(())
    }

    async fn mount_rootfs(
        &self,
        id: &str,
        _root: &Path,
        _mounts: &[Mount],
    ) -> Result<String, PodError> {
        lock(&self.calls).push(format!("rootfs {id}"));
        Ok(format!("/run/pangolin/shared/{id}/rootfs"))
    }

    fn unmount_container(&self, id: &str) {
        lock(&self.calls).push(format!("unmount {id}"));
    }
}
