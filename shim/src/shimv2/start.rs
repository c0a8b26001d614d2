//! Start: a container's init or an exec, and the wait for its exit.
//!
//! Ordering: TaskStart (or TaskExecStarted) is enqueued at the Starting → Running transition,
//! and only then is the exit waiter spawned, so a process's TaskExit can never be published
//! before its start, however fast it exits. The exit itself is recorded once the agent has
//! said both output streams are drained (the agent ends them as soon as the exited process's
//! buffered output is read), so containerd sees all output before TaskExit.

use std::sync::Arc;

use tokio::task::JoinHandle;

use super::events::Event;
use super::guest::Guest;
use super::hooks::{Phase, Subject};
use super::io;
use super::pod::Pod;
use super::process::{Exit, Kind};
use super::PodError;

/// What a failed poststart hook's container gets.
const SIGKILL: u32 = 9;

impl Pod {
    /// Starts the init process (empty `exec_id`) or an exec; returns its guest pid.
    pub async fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<u32, PodError> {
        let guest = self.vm.guest()?;
        let (kind, stdio) = {
            let mut cs = self.containers();
            let p = cs.process_mut(id, exec_id)?;
            if !p.begin_start() {
                return Err(PodError::State("the process was started already"));
            }
            (p.kind.clone(), p.stdio.clone())
        };
        let started: Result<u32, PodError> = match kind {
            Kind::Init => {
                // Docker's prestart hook added the pod's interface after the VM booted: it
                // is wired before the first process can need it.
                match self.vm.attach_late_network().await {
                    Ok(()) => guest.start_container(id).await.map_err(Into::into),
                    Err(e) => Err(e),
                }
            }
            Kind::Exec { spec } => guest
                .exec_process(id, exec_id, spec, !stdio.stdin.is_empty())
                .await
                .map_err(Into::into),
        };
        let pid = match started {
            Ok(pid) => pid,
            Err(e) => {
                if let Ok(p) = self.containers().process_mut(id, exec_id) {
                    p.start_failed();
                }
                return Err(e);
            }
        };
        let pumps = io::start(&guest, id, exec_id, &stdio);
        {
            let mut cs = self.containers();
            let p = cs.process_mut(id, exec_id)?;
            if !p.started(pid, pumps.close_stdin) {
                // It was ended meanwhile (VM death, or killed while starting): that exit
                // was reported; no start may follow it.
                return Err(PodError::State("the process ended while it was starting"));
            }
            self.events.send(Event::started(id, exec_id, pid));
        }
        let pod = Arc::clone(self);
        let waiter = (id.to_string(), exec_id.to_string(), Arc::clone(&guest));
        tokio::spawn(async move {
            let (id, exec_id, guest) = waiter;
            pod.await_exit(guest, &id, &exec_id, pumps.outputs).await;
        });
        if exec_id.is_empty() {
            self.run_poststart(guest.as_ref(), id).await?;
        }
        Ok(pid)
    }

    /// The container's poststart hooks; when one fails the process is killed and the start
    /// fails (as runc does).
    async fn run_poststart(&self, guest: &dyn Guest, id: &str) -> Result<(), PodError> {
        let (hooks, bundle) = {
            let cs = self.containers();
            let c = cs.get(id)?;
            (c.hooks.clone(), c.bundle.clone())
        };
        let subject = Subject {
            id,
            bundle: &bundle,
            pid: self.vm.netns_pid(),
        };
        if let Err(e) = hooks.run(Phase::Poststart, subject).await {
            if let Err(killing) = guest.signal(id, "", SIGKILL, true).await {
                tracing::warn!(error = %killing, container = id, "killing the container after its poststart hook failed");
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// Waits for the process's exit and its drained output, then records the exit.
    async fn await_exit(
        self: Arc<Self>,
        guest: Arc<dyn Guest>,
        id: &str,
        exec_id: &str,
        outputs: Vec<JoinHandle<()>>,
    ) {
        let exit = match guest.wait(id, exec_id).await {
            Ok(exit) => exit,
            Err(e) => {
                // Connection lost with the VM: its death (or the stop) reports every process.
                tokio::select! {
                    () = self.vm.left_running() => return,
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
                tracing::warn!(error = %e, container = id, exec = exec_id, "waiting for a process failed");
                Exit::now(255)
            }
        };
        let drained = tokio::time::timeout(self.drain_bound, async {
            for o in outputs {
                let _ = o.await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                container = id,
                exec = exec_id,
                bound = ?self.drain_bound,
                "the guest did not end the process's output streams; reporting the exit anyway"
            );
        }
        self.record_exit(id, exec_id, exit);
    }
}
