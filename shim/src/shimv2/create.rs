//! Create: a container (booting the pod's VM first when it is the pod's first), or an exec.

use std::path::Path;
use std::sync::Arc;

use containerd_shim::protos::api::Mount;
use containerd_shim::protos::events::task::TaskIO;
use oci_spec::runtime::Spec;

use super::container::Container;
use super::events::Event;
use super::guest::Guest;
use super::guest_spec::{guest_spec, pod_netns, refuse_host_namespaces};
use super::hooks::{HostHooks, Subject};
use super::io::StdioPaths;
use super::pod::Pod;
use super::process::{Kind, Process};
use super::vm::BootPlan;
use super::PodError;

impl Pod {
    /// Creates container `id` from `bundle`: boots the VM if needed, mounts the rootfs and the
    /// volumes into the share, creates the container in the guest. The id is reserved first,
    /// so a second create with it fails with `Exists` whatever the timing.
    pub async fn create(
        self: &Arc<Self>,
        id: &str,
        bundle: &str,
        rootfs: &[Mount],
        stdio: StdioPaths,
    ) -> Result<(), PodError> {
        self.containers().reserve(id)?;
        match self.create_reserved(id, bundle, rootfs, &stdio).await {
            Ok(hooks) => {
                let mut io = TaskIO::new();
                io.stdin.clone_from(&stdio.stdin);
                io.stdout.clone_from(&stdio.stdout);
                io.stderr.clone_from(&stdio.stderr);
                io.terminal = stdio.terminal;
                let mut cs = self.containers();
                let init = Process::new(Kind::Init, stdio);
                cs.insert(id, Container::new(bundle, init).with_hooks(hooks));
                self.events
                    .send(Event::create(id, bundle, rootfs.to_vec(), io));
                drop(cs);
                self.record_facts();
                Ok(())
            }
            Err(e) => {
                self.containers().release(id);
                Err(e)
            }
        }
    }

    async fn create_reserved(
        self: &Arc<Self>,
        id: &str,
        bundle: &str,
        rootfs: &[Mount],
        stdio: &StdioPaths,
    ) -> Result<HostHooks, PodError> {
        let spec = super::bundle::load_spec(Path::new(bundle))?;
        let root = super::bundle::root_path(Path::new(bundle), &spec)?;
        // Before anything boots: a pod that asks for them fails at RunPodSandbox.
        refuse_host_namespaces(&spec)?;
        let hooks = HostHooks::from_spec(&spec)?;
        let guest = self.ensure_vm(&spec, hooks.need_netns_pid()).await?;
        let mut result = self
            .prepare_in_guest(guest.as_ref(), id, spec, &root, rootfs, stdio)
            .await;
        if result.is_ok() {
            let subject = Subject {
                id,
                bundle,
                pid: self.vm.netns_pid(),
            };
            if let Err(e) = hooks.run_create(subject).await {
                if let Err(removing) = guest.remove_container(id).await {
                    tracing::warn!(error = %removing, container = id, "removing the container after its hook failed");
                }
                result = Err(e.into());
            }
        }
        if result.is_err() {
            self.mounts.unmount_container(id);
        }
        result.map(|()| hooks)
    }

    async fn prepare_in_guest(
        &self,
        guest: &dyn Guest,
        id: &str,
        mut spec: Spec,
        root: &Path,
        rootfs: &[Mount],
        stdio: &StdioPaths,
    ) -> Result<(), PodError> {
        self.mounts.share_volumes(id, &mut spec)?;
        let hostname = self
            .hostname
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let inits = self.containers().live_init_pids();
        let spec_json = guest_spec(spec, hostname.as_deref(), &inits)?;
        let guest_rootfs = self.mounts.mount_rootfs(id, root, rootfs).await?;
        guest
            .create_container(id, spec_json, &guest_rootfs, !stdio.stdin.is_empty())
            .await?;
        Ok(())
    }

    /// The running VM's agent; boots the VM, shaped by this first task's `spec`, if needed,
    /// with a holder of its network namespace when `netns_holder` (the task has host hooks).
    async fn ensure_vm(
        self: &Arc<Self>,
        spec: &Spec,
        netns_holder: bool,
    ) -> Result<Arc<dyn Guest>, PodError> {
        let plan = || {
            let base = self
                .config
                .as_ref()
                .map_err(|why| PodError::invalid("configuration", why.clone()))?;
            let config = super::sizing::vm_config(base, spec)?;
            let netns = pod_netns(spec)?;
            let cgroup = crate::host_cgroup::pod_cgroup_path(
                spec.linux()
                    .as_ref()
                    .and_then(|l| l.cgroups_path().as_ref())
                    .and_then(|p| p.to_str()),
            )
            .map_err(|e| PodError::invalid("linux.cgroupsPath", e.to_string()))?;
            spec.hostname()
                .clone_into(&mut self.hostname.lock().unwrap_or_else(|p| p.into_inner()));
            *self.cri_pod.lock().unwrap_or_else(|p| p.into_inner()) = cri_pod_name(spec);
            tracing::info!(
                vcpus = config.hypervisor.vcpus,
                memory_mib = config.hypervisor.memory_mib,
                kind = %config.hypervisor.kind,
                "booting the pod VM"
            );
            self.mounts.prepare_shared()?;
            Ok(BootPlan {
                pod_id: self.id.clone(),
                config,
                share: self.mounts.shared().to_path_buf(),
                netns,
                cgroup,
                netns_holder,
            })
        };
        let pod = Arc::clone(self);
        let result = self.vm.ensure(plan, move |vm| pod.watch_vm(vm)).await;
        let failed_on_its_own = matches!(&result, Err(e) if !matches!(e, PodError::Stopped));
        if failed_on_its_own && !self.containers().has_ready() {
            // The first container could not get a VM: nothing uses the share (a stop removes
            // it itself).
            self.mounts.remove_shared();
        }
        result
    }

    /// Adds an exec to container `id` (started later by `start`).
    pub fn add_exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: String,
        stdio: StdioPaths,
    ) -> Result<(), PodError> {
        let mut cs = self.containers();
        cs.get_mut(id)?.add_exec(exec_id, process_json, stdio)?;
        self.events.send(Event::exec_added(id, exec_id));
        Ok(())
    }
}

/// `namespace/name` of the CRI pod `spec` belongs to (containerd's CRI annotations), if any.
fn cri_pod_name(spec: &Spec) -> Option<String> {
    let a = spec.annotations().as_ref()?;
    let name = a.get("io.kubernetes.cri.sandbox-name")?;
    let namespace = a
        .get("io.kubernetes.cri.sandbox-namespace")
        .map_or("", String::as_str);
    Some(format!("{namespace}/{name}"))
}
