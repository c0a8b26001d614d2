//! Delete: an exec, or a container (and with the pod's own container, the VM).

use std::sync::Arc;

use super::events::Event;
use super::hooks::{Phase, Subject};
use super::pod::Pod;
use super::process::Exit;
use super::PodError;

impl Pod {
    /// Deletes an exec or the container; returns its pid (0 if it never started) and exit.
    pub async fn delete(
        self: &Arc<Self>,
        id: &str,
        exec_id: &str,
    ) -> Result<(u32, Exit), PodError> {
        if !exec_id.is_empty() {
            return self.delete_exec(id, exec_id).await;
        }
        let taken = {
            let mut cs = self.containers();
            if cs.is_creating(id) && id == self.id {
                // The pod's own container is still being created (its VM boots): containerd
                // gave up on it. Cancel the boot; there is nothing to delete.
                None
            } else {
                let c = cs.get(id)?;
                if !c.init.can_delete() {
                    return Err(PodError::State("cannot delete a running container"));
                }
                cs.remove(id)
            }
        };
        let Some(container) = taken else {
            self.stop_vm().await;
            return Err(PodError::NotFound(id.to_string()));
        };
        let pid = container.init.pid().unwrap_or(0);
        let exit = container.init.exit().unwrap_or_else(|| Exit::now(0));
        if let Ok(guest) = self.vm.guest() {
            if let Err(e) = guest.remove_container(id).await {
                tracing::warn!(error = %e, container = id, "removing the container in the guest");
            }
        }
        self.mounts.unmount_container(id);
        self.events.send(Event::deleted(id, pid, exit));
        if id == self.id {
            self.stop_vm().await;
        } else {
            self.record_facts();
        }
        let subject = Subject {
            id,
            bundle: &container.bundle,
            pid: 0,
        };
        container
            .hooks
            .run_all_logging(Phase::Poststop, subject)
            .await;
        Ok((pid, exit))
    }

    async fn delete_exec(&self, id: &str, exec_id: &str) -> Result<(u32, Exit), PodError> {
        let (pid, exit) = {
            let mut cs = self.containers();
            let c = cs.get_mut(id)?;
            let p = c
                .process(exec_id)
                .ok_or_else(|| PodError::NotFound(format!("exec {exec_id} of {id}")))?;
            if !p.can_delete() {
                return Err(PodError::State("cannot delete a running process"));
            }
            let answer = (
                p.pid().unwrap_or(0),
                p.exit().unwrap_or_else(|| Exit::now(0)),
            );
            c.remove_exec(exec_id);
            answer
        };
        if let Ok(guest) = self.vm.guest() {
            let _ = guest.remove_process(id, exec_id).await;
        }
        Ok((pid, exit))
    }
}
