//! The pod's VM: booted by the first create, cancellable while it boots, stopped once.
//!
//! ```text
//!          first create             boot done
//! Absent ─────────────► Booting ─────────────► Running ──── VMM exits ───► Dead
//!    ▲                    │  │ boot failed        │                          │
//!    └────────────────────┘  │                    │ stop                     │ stop
//!                            │ stop (cancels)     ▼                          ▼
//!                            └──────────────► Stopping ──────────────────► Stopped
//! ```
//! The boot runs in a task of its own, so a request that is dropped half-way cannot abandon a
//! half-made VM; a stop during the boot cancels it (the sandbox tears down what it started)
//! and waits for that, instead of waiting for the whole boot. Locks are held only to read or
//! change the state, never across the boot or a shutdown.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use pangolin_runtime_config::Config;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::guest::Guest;
use super::PodError;
use crate::sandbox::{BootOptions, Sandbox};

/// How long a stop waits for a cancelled boot to tear itself down.
const CANCEL_WAIT: Duration = Duration::from_secs(10);

/// What a pod VM is booted with.
#[derive(Debug, Clone)]
pub struct BootPlan {
    /// The pod id (names the sandbox directory).
    pub pod_id: String,
    /// The configuration, already sized for the pod.
    pub config: Config,
    /// The directory shared with the guest.
    pub share: PathBuf,
    /// The pod's network namespace, if it has one.
    pub netns: Option<PathBuf>,
    /// The pod's host cgroup (`linux.cgroupsPath`), if the spec names one.
    pub cgroup: Option<PathBuf>,
    /// The first task has host OCI hooks: a process holding the pod's network namespace is
    /// started for them, and a pod without a namespace gets one whose interface may come
    /// later ([`crate::sandbox::BootOptions::netns_holder`]).
    pub netns_holder: bool,
}

/// A running pod VM.
#[async_trait]
pub trait PodVm: Send + Sync + 'static {
    /// Its agent.
    fn guest(&self) -> Arc<dyn Guest>;
    /// Sees the VM's end (event-driven: no polling): the exit status of the VMM, or of a helper
    /// without which the VM cannot go on (virtiofsd; QEMU's vsock daemon), whichever came first.
    fn exit_watch(&self) -> watch::Receiver<Option<ExitStatus>>;
    /// Stops the guest and the VMM and removes what the VM made.
    async fn shutdown(self: Box<Self>);
    /// The host pid of the VM's process (the VMM), if known.
    fn host_pid(&self) -> Option<u32> {
        None
    }
    /// The pid OCI hooks get, a process in the pod's network namespace: its holder when the
    /// VM has one, else the VMM's (in it unless jailed).
    fn netns_pid(&self) -> Option<u32> {
        self.host_pid()
    }
    /// When the VM can take an interface added to its namespace after the boot: a future
    /// that wires one if it is there (owning what it needs, so it is awaited without the
    /// slot's lock).
    fn late_network(&self) -> Option<BoxFuture<'static, Result<(), PodError>>> {
        None
    }
}

/// Boots pod VMs.
#[async_trait]
pub trait VmLauncher: Send + Sync + 'static {
    /// Boots `plan`; when `cancel` fires, tears down what it started and fails.
    async fn boot(
        &self,
        plan: BootPlan,
        cancel: CancellationToken,
    ) -> Result<Box<dyn PodVm>, PodError>;
}

/// The real launcher: a [`Sandbox`] (virtiofsd, network, VMM, agent).
pub struct SandboxLauncher;

struct SandboxVm {
    sandbox: Sandbox,
    guest: Arc<dyn Guest>,
}

#[async_trait]
impl PodVm for SandboxVm {
    fn guest(&self) -> Arc<dyn Guest> {
        self.guest.clone()
    }

    fn exit_watch(&self) -> watch::Receiver<Option<ExitStatus>> {
        self.sandbox.vmm_exit()
    }

    async fn shutdown(self: Box<Self>) {
        self.sandbox.shutdown().await;
    }

    fn host_pid(&self) -> Option<u32> {
        self.sandbox.vmm_pid()
    }

    fn netns_pid(&self) -> Option<u32> {
        self.sandbox.netns_pid().or_else(|| self.sandbox.vmm_pid())
    }

    fn late_network(&self) -> Option<BoxFuture<'static, Result<(), PodError>>> {
        let late = self.sandbox.late_network()?;
        Some(Box::pin(async move {
            if late.attach().await? {
                tracing::info!("the pod's interface, added after the boot, is wired to its VM");
            }
            Ok(())
        }))
    }
}

#[async_trait]
impl VmLauncher for SandboxLauncher {
    async fn boot(
        &self,
        plan: BootPlan,
        cancel: CancellationToken,
    ) -> Result<Box<dyn PodVm>, PodError> {
        let options = BootOptions {
            share: Some(&plan.share),
            console_log: None,
            netns: plan.netns.as_deref(),
            cgroup: plan.cgroup.as_deref(),
            cancel: Some(cancel),
            netns_holder: plan.netns_holder,
        };
        let sandbox = Sandbox::start_with(&plan.pod_id, &plan.config, options).await?;
        let guest: Arc<dyn Guest> = Arc::new(sandbox.agent().clone());
        Ok(Box::new(SandboxVm { sandbox, guest }))
    }
}

/// Where the pod's VM is in its lifecycle.
enum VmState {
    /// No VM yet: the first create boots one.
    Absent,
    /// A boot is under way; `cancel` stops it, `done` turns true when it has finished.
    Booting {
        cancel: CancellationToken,
        done: watch::Receiver<bool>,
    },
    /// The VM runs.
    Running(Box<dyn PodVm>),
    /// A stop is under way.
    Stopping,
    /// Stopped for good: no VM is booted again.
    Stopped,
    /// The VMM died on its own; nothing runs any more.
    Dead(String),
}

/// What a caller of [`VmSlot::ensure`] does next, decided under the lock.
enum Next {
    Ready(Arc<dyn Guest>),
    Wait(watch::Receiver<bool>),
    Boot(CancellationToken, watch::Sender<bool>),
}

/// The pod's one VM slot.
pub struct VmSlot {
    inner: Arc<Inner>,
}

struct Inner {
    launcher: Arc<dyn VmLauncher>,
    state: Mutex<VmState>,
    /// Bumped at every state change, for [`VmSlot::left_running`].
    changes: watch::Sender<u64>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, VmState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, state: &mut VmState, next: VmState) {
        *state = next;
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Records the boot's outcome; a VM whose boot finished after a stop was asked for is shut
    /// down here.
    async fn finish_boot(
        &self,
        booted: Result<Box<dyn PodVm>, PodError>,
        on_running: impl FnOnce(&dyn PodVm) + Send,
    ) -> Result<Arc<dyn Guest>, PodError> {
        let late = {
            let mut state = self.lock();
            let booting = matches!(&*state, VmState::Booting { .. });
            match (booted, booting) {
                (Ok(vm), true) => {
                    let guest = vm.guest();
                    on_running(vm.as_ref());
                    self.set(&mut state, VmState::Running(vm));
                    return Ok(guest);
                }
                // Failed on its own: a later create may try again.
                (Err(e), true) => {
                    self.set(&mut state, VmState::Absent);
                    return Err(e);
                }
                // A stop came while it booted: the stop owns the state now.
                (Err(_), false) => return Err(PodError::Stopped),
                (Ok(vm), false) => vm,
            }
        };
        late.shutdown().await;
        Err(PodError::Stopped)
    }
}

impl VmSlot {
    /// An empty slot booting through `launcher`.
    pub fn new(launcher: Arc<dyn VmLauncher>) -> VmSlot {
        VmSlot {
            inner: Arc::new(Inner {
                launcher,
                state: Mutex::new(VmState::Absent),
                changes: watch::channel(0).0,
            }),
        }
    }

    /// The running VM's agent, or why there is none.
    pub fn guest(&self) -> Result<Arc<dyn Guest>, PodError> {
        match &*self.inner.lock() {
            VmState::Running(vm) => Ok(vm.guest()),
            VmState::Dead(why) => Err(PodError::VmGone(why.clone())),
            VmState::Stopping | VmState::Stopped => Err(PodError::Stopped),
            VmState::Absent | VmState::Booting { .. } => {
                Err(PodError::State("the pod's VM is not running"))
            }
        }
    }

    /// The host pid of the running VM's process; 0 when no VM runs.
    pub fn host_pid(&self) -> u32 {
        match &*self.inner.lock() {
            VmState::Running(vm) => vm.host_pid().unwrap_or(0),
            _ => 0,
        }
    }

    /// The pid the pod's OCI hooks get ([`PodVm::netns_pid`]); 0 when no VM runs.
    pub fn netns_pid(&self) -> u32 {
        match &*self.inner.lock() {
            VmState::Running(vm) => vm.netns_pid().unwrap_or(0),
            _ => 0,
        }
    }

    /// Wires an interface added to the pod's namespace after the boot, when the running VM
    /// can take one and it is there ([`PodVm::late_network`]); nothing otherwise.
    pub async fn attach_late_network(&self) -> Result<(), PodError> {
        let attach = match &*self.inner.lock() {
            VmState::Running(vm) => vm.late_network(),
            _ => None,
        };
        match attach {
            Some(attach) => attach.await,
            None => Ok(()),
        }
    }

    /// The running VM's agent, booting the VM from `plan()` first if there is none (a boot
    /// under way is joined). `on_running` sees the VM once, when it starts running.
    ///
    /// The boot and the recording of its outcome run in a task of their own: a caller whose
    /// request is dropped half-way (ttrpc drops handlers when containerd's connection goes)
    /// leaves neither a half-made VM nor a slot stuck in `Booting`.
    pub async fn ensure(
        &self,
        plan: impl FnOnce() -> Result<BootPlan, PodError>,
        on_running: impl FnOnce(&dyn PodVm) + Send + 'static,
    ) -> Result<Arc<dyn Guest>, PodError> {
        let mut plan = Some(plan);
        loop {
            let next = {
                let mut state = self.inner.lock();
                match &*state {
                    VmState::Running(vm) => Next::Ready(vm.guest()),
                    VmState::Dead(why) => return Err(PodError::VmGone(why.clone())),
                    VmState::Stopping | VmState::Stopped => return Err(PodError::Stopped),
                    VmState::Booting { done, .. } => Next::Wait(done.clone()),
                    VmState::Absent => {
                        let cancel = CancellationToken::new();
                        let (tx, done) = watch::channel(false);
                        let booting = VmState::Booting {
                            cancel: cancel.clone(),
                            done,
                        };
                        self.inner.set(&mut state, booting);
                        Next::Boot(cancel, tx)
                    }
                }
            };
            match next {
                Next::Ready(guest) => return Ok(guest),
                Next::Wait(mut done) => {
                    // The booting caller reports its own error; we look at the state again.
                    if done.wait_for(|d| *d).await.is_err() {
                        return Err(PodError::State("the pod's VM boot was abandoned"));
                    }
                }
                Next::Boot(cancel, done) => {
                    let plan = match plan.take() {
                        Some(make) => make(),
                        None => Err(PodError::State("the pod's VM boot was retried")),
                    };
                    let inner = Arc::clone(&self.inner);
                    let booting = tokio::spawn(async move {
                        let booted = match plan {
                            Ok(plan) => inner.launcher.boot(plan, cancel).await,
                            Err(e) => Err(e),
                        };
                        let result = inner.finish_boot(booted, on_running).await;
                        done.send_replace(true);
                        result
                    });
                    return booting.await.map_err(|e| {
                        PodError::State(if e.is_panic() {
                            "the VM boot panicked"
                        } else {
                            "the VM boot was aborted"
                        })
                    })?;
                }
            }
        }
    }

    /// Stops the VM for good: cancels a boot (and waits for its teardown) or shuts the
    /// running VM down. Later creates fail with [`PodError::Stopped`].
    pub async fn stop(&self) {
        let previous = {
            let mut state = self.inner.lock();
            let previous = std::mem::replace(&mut *state, VmState::Stopping);
            self.inner.changes.send_modify(|n| *n = n.wrapping_add(1));
            previous
        };
        match previous {
            VmState::Booting { cancel, mut done } => {
                cancel.cancel();
                if tokio::time::timeout(CANCEL_WAIT, done.wait_for(|d| *d))
                    .await
                    .is_err()
                {
                    tracing::error!(?CANCEL_WAIT, "a cancelled VM boot did not finish");
                }
            }
            VmState::Running(vm) => vm.shutdown().await,
            VmState::Absent | VmState::Stopping | VmState::Stopped | VmState::Dead(_) => {}
        }
        let mut state = self.inner.lock();
        self.inner.set(&mut state, VmState::Stopped);
    }

    /// The VMM exited on its own: records why and tears the rest down (daemons, network,
    /// files). False when the VM was not running (a stop is under way, or it was replaced).
    pub async fn died(&self, why: String) -> bool {
        let vm = {
            let mut state = self.inner.lock();
            if !matches!(&*state, VmState::Running(_)) {
                return false;
            }
            match std::mem::replace(&mut *state, VmState::Dead(why)) {
                VmState::Running(vm) => {
                    self.inner.changes.send_modify(|n| *n = n.wrapping_add(1));
                    vm
                }
                other => {
                    *state = other;
                    return false;
                }
            }
        };
        vm.shutdown().await;
        true
    }

    /// Resolves once the VM is no longer running (it died, or a stop began).
    pub async fn left_running(&self) {
        let mut changes = self.inner.changes.subscribe();
        loop {
            if !matches!(&*self.inner.lock(), VmState::Running(_)) {
                return;
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    }
}
