//! Kill: a signal to one process, or with `all` to every process of the container.

use super::pod::Pod;
use super::process::{Exit, Kind, ProcessState};
use super::PodError;

/// What a kill does, decided from the process's state.
enum Action {
    /// Forward the signal to the guest.
    Signal,
    /// A created init: nothing runs yet; it counts as killed by the signal.
    KillCreated,
}

impl Pod {
    /// Signals a process (or, with `all`, every process of the container).
    pub async fn kill(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), PodError> {
        let action = {
            let mut cs = self.containers();
            let p = cs.process_mut(id, exec_id)?;
            match (p.state(), &p.kind) {
                // Running or paused: the guest delivers it (a paused process gets it on thaw).
                (ProcessState::Running { .. } | ProcessState::Paused { .. }, _) => Action::Signal,
                // Exited: `all` still reaches what else runs in the container; a plain kill
                // finds nothing (NotFound, as runc's shim answers).
                (ProcessState::Exited { .. }, _) if all => Action::Signal,
                (ProcessState::Exited { .. }, _) => return Err(PodError::Finished),
                // Created or starting init: it counts as killed (containerd then deletes it,
                // which removes it from the guest).
                (ProcessState::Created | ProcessState::Starting, Kind::Init) => Action::KillCreated,
                (ProcessState::Created | ProcessState::Starting, Kind::Exec { .. }) => {
                    return Err(PodError::State("the exec has not started"))
                }
            }
        };
        match action {
            Action::KillCreated => {
                self.record_exit(id, exec_id, Exit::now(128 + signal));
                Ok(())
            }
            Action::Signal => match self.vm.guest() {
                Ok(guest) => Ok(guest.signal(id, exec_id, signal, all).await?),
                // The VM is gone: every process already exited with it.
                Err(_) if all => Ok(()),
                Err(e) => Err(e),
            },
        }
    }
}
