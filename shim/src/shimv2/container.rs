//! The pod's containers and their processes, as one map behind the pod's state lock.
//!
//! A container id is reserved before its create does any work ([`Containers::reserve`]) and
//! only becomes a [`Container`] once the guest created it, so two creates with one id cannot
//! both proceed: the second finds the reservation and fails with `Exists`.

use std::collections::{HashMap, HashSet};

use super::hooks::HostHooks;
use super::process::{Kind, Process};
use super::PodError;

/// A container: its init and its execs.
#[derive(Debug)]
pub struct Container {
    /// containerd's bundle directory.
    pub bundle: String,
    /// The init process.
    pub init: Process,
    /// Its OCI hooks that run on the host (poststart, poststop; the create-time ones ran).
    pub hooks: HostHooks,
    execs: HashMap<String, Process>,
}

impl Container {
    /// A created container whose init is `init`.
    pub fn new(bundle: &str, init: Process) -> Container {
        Container {
            bundle: bundle.to_string(),
            init,
            hooks: HostHooks::default(),
            execs: HashMap::new(),
        }
    }

    /// The same container with its host `hooks`.
    pub fn with_hooks(mut self, hooks: HostHooks) -> Container {
        self.hooks = hooks;
        self
    }

    /// The init (empty `exec_id`) or an exec.
    pub fn process(&self, exec_id: &str) -> Option<&Process> {
        if exec_id.is_empty() {
            Some(&self.init)
        } else {
            self.execs.get(exec_id)
        }
    }

    /// As [`Self::process`], mutable.
    pub fn process_mut(&mut self, exec_id: &str) -> Option<&mut Process> {
        if exec_id.is_empty() {
            Some(&mut self.init)
        } else {
            self.execs.get_mut(exec_id)
        }
    }

    /// Whether an exec may be added: the init runs and the exec id is new.
    pub fn can_exec(&self, exec_id: &str) -> Result<(), PodError> {
        if exec_id.is_empty() {
            return Err(PodError::invalid("exec id", "must not be empty"));
        }
        if self.execs.contains_key(exec_id) {
            return Err(PodError::Exists(format!("exec {exec_id}")));
        }
        if !self.init.is_live() {
            return Err(PodError::State("the container is not running"));
        }
        Ok(())
    }

    /// Adds an exec (checked with [`Self::can_exec`]).
    pub fn add_exec(
        &mut self,
        exec_id: &str,
        spec: String,
        stdio: super::io::StdioPaths,
    ) -> Result<(), PodError> {
        self.can_exec(exec_id)?;
        self.execs.insert(
            exec_id.to_string(),
            Process::new(Kind::Exec { spec }, stdio),
        );
        Ok(())
    }

    /// Removes an exec that may be deleted.
    pub fn remove_exec(&mut self, exec_id: &str) -> Option<Process> {
        self.execs.remove(exec_id)
    }

    /// Every process: (exec id, process), the init with an empty id.
    pub fn processes_mut(&mut self) -> impl Iterator<Item = (&str, &mut Process)> {
        std::iter::once(("", &mut self.init))
            .chain(self.execs.iter_mut().map(|(k, v)| (k.as_str(), v)))
    }
}

/// The pod's containers and the ids being created.
#[derive(Debug, Default)]
pub struct Containers {
    ready: HashMap<String, Container>,
    creating: HashSet<String>,
}

impl Containers {
    /// Reserves `id` for a create; `Exists` if it is taken or being created.
    pub fn reserve(&mut self, id: &str) -> Result<(), PodError> {
        if self.ready.contains_key(id) || self.creating.contains(id) {
            return Err(PodError::Exists(id.to_string()));
        }
        self.creating.insert(id.to_string());
        Ok(())
    }

    /// Drops a reservation whose create failed.
    pub fn release(&mut self, id: &str) {
        self.creating.remove(id);
    }

    /// Turns the reservation of `container`'s id into the container.
    pub fn insert(&mut self, id: &str, container: Container) {
        self.creating.remove(id);
        self.ready.insert(id.to_string(), container);
    }

    /// The container `id`.
    pub fn get(&self, id: &str) -> Result<&Container, PodError> {
        self.ready
            .get(id)
            .ok_or_else(|| PodError::NotFound(id.to_string()))
    }

    /// As [`Self::get`], mutable.
    pub fn get_mut(&mut self, id: &str) -> Result<&mut Container, PodError> {
        self.ready
            .get_mut(id)
            .ok_or_else(|| PodError::NotFound(id.to_string()))
    }

    /// A process of container `id`.
    pub fn process_mut(&mut self, id: &str, exec_id: &str) -> Result<&mut Process, PodError> {
        self.get_mut(id)?
            .process_mut(exec_id)
            .ok_or_else(|| PodError::NotFound(format!("exec {exec_id} of {id}")))
    }

    /// Removes container `id`.
    pub fn remove(&mut self, id: &str) -> Option<Container> {
        self.ready.remove(id)
    }

    /// The guest pids of the containers whose init runs: the namespaces a new container of
    /// the pod may join (`/proc/<pid>/ns/...` in the guest).
    pub fn live_init_pids(&self) -> Vec<u32> {
        self.ready
            .values()
            .filter(|c| c.init.is_live())
            .filter_map(|c| c.init.pid())
            .collect()
    }

    /// The ids of the containers, sorted.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.ready.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Every container: (id, container).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut Container)> {
        self.ready.iter_mut().map(|(k, v)| (k.as_str(), v))
    }

    /// Whether any container exists (creates under way do not count).
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Whether `id` is being created.
    pub fn is_creating(&self, id: &str) -> bool {
        self.creating.contains(id)
    }

    /// No container exists or is being created.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.ready.is_empty() && self.creating.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shimv2::io::StdioPaths;
    use crate::shimv2::process::Exit;

    fn container() -> Container {
        Container::new("/b", Process::new(Kind::Init, StdioPaths::default()))
    }

    #[test]
    fn an_id_is_reserved_once_until_released_or_inserted() {
        let mut cs = Containers::default();
        cs.reserve("c1").expect("first");
        assert!(matches!(cs.reserve("c1"), Err(PodError::Exists(_))));
        assert!(!cs.is_empty());
        cs.release("c1");
        assert!(cs.is_empty());
        cs.reserve("c1").expect("again");
        cs.insert("c1", container());
        assert!(matches!(cs.reserve("c1"), Err(PodError::Exists(_))));
        assert!(cs.get("c1").is_ok());
        assert!(matches!(cs.get("c2"), Err(PodError::NotFound(_))));
    }

    #[test]
    fn execs_need_a_running_init_and_a_new_id() {
        let mut c = container();
        let stdio = StdioPaths::default;
        assert!(matches!(
            c.add_exec("e1", "{}".into(), stdio()),
            Err(PodError::State(_))
        ));
        assert!(c.init.begin_start() && c.init.started(5, None));
        c.add_exec("e1", "{}".into(), stdio()).expect("exec");
        assert!(matches!(
            c.add_exec("e1", "{}".into(), stdio()),
            Err(PodError::Exists(_))
        ));
        assert!(matches!(
            c.add_exec("", "{}".into(), stdio()),
            Err(PodError::Invalid { .. })
        ));
        assert!(c.process("e1").is_some());
        let e1 = c.process_mut("e1").expect("e1");
        assert!(e1.begin_start() && e1.started(6, None));
        assert!(c.init.exited(Exit::now(0)));
        assert!(c.init.can_delete());
        assert!(
            c.process("e1").is_some_and(|p| !p.can_delete()),
            "the exec still runs"
        );
        assert!(c.process_mut("e1").is_some_and(|p| p.exited(Exit::now(0))));
        assert!(c.remove_exec("e1").is_some());
    }
}
