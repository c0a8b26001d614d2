//! The `Shim` side: `start` (one shim per pod), `delete` (cleanup after a dead shim), and the
//! task service factory.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::api::DeleteResponse;
use containerd_shim::{Config as ShimConfig, Flags, StartOpts};

use super::events::{Containerd, Events};
use super::pod::Pod;
use super::task::TaskService;
use super::SANDBOX_ID_ANNOTATION;
use crate::artifacts;

/// The shim process.
pub struct Service {
    exit: Arc<ExitSignal>,
    id: String,
    namespace: String,
}

/// The pod a task belongs to: its CRI sandbox id, else the task itself.
pub fn group_id(bundle: &Path, id: &str) -> String {
    let spec = super::bundle::load_spec(bundle).ok();
    spec.and_then(|s| {
        s.annotations()
            .as_ref()?
            .get(SANDBOX_ID_ANNOTATION)
            .cloned()
    })
    .filter(|s| !s.is_empty())
    .unwrap_or_else(|| id.to_string())
}

/// The shim crate's settings. tokio owns our children (VMM, virtiofsd): the crate's
/// SIGCHLD reaper (`waitpid(-1)`) must not steal their exits, so this goes to
/// `asynchronous::run` itself: the crate installs its signal handling before `Shim::new` runs.
pub fn shim_config() -> ShimConfig {
    ShimConfig {
        no_reaper: true,
        no_sub_reaper: true,
        no_setup_logger: true,
        ..ShimConfig::default()
    }
}

#[async_trait]
impl Shim for Service {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, config: &mut ShimConfig) -> Self {
        *config = shim_config();
        Service {
            exit: Arc::new(ExitSignal::default()),
            id: args.id.clone(),
            namespace: args.namespace.clone(),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let cwd = std::env::current_dir().map_err(|err| containerd_shim::Error::IoError {
            context: "current directory (the bundle)".into(),
            err,
        })?;
        let grouping = group_id(&cwd, &opts.id);
        let address = spawn(opts, &grouping, Vec::new()).await?;
        containerd_shim::asynchronous::util::write_str_to_file("address", &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        // The shim died: unmount what it left of this task (the VM went with it: PDEATHSIG).
        let cwd = std::env::current_dir().map_err(|err| containerd_shim::Error::IoError {
            context: "current directory (the bundle)".into(),
            err,
        })?;
        let group = group_id(&cwd, &self.id);
        if let Ok(loaded) = artifacts::load(None) {
            let shared = loaded
                .config
                .runtime
                .state_dir
                .join(format!("{group}.shared"));
            super::rootfs::unmount_container(&shared, &self.id);
            if group == self.id {
                super::rootfs::remove_shared(&shared);
                let workdir = crate::sandbox::workdir_of(&loaded.config.runtime.state_dir, &group);
                let cgroup = crate::sandbox::owned_cgroup(&workdir);
                crate::sandbox::remove_workdir(&workdir);
                if let Some(path) = cgroup {
                    remove_pod_cgroup(&path);
                }
            }
        }
        let mut resp = DeleteResponse::new();
        resp.exit_status = 137;
        resp.exited_at = protobuf::MessageField::some(containerd_shim::util::timestamp()?);
        Ok(resp)
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        init_logging();
        let config = artifacts::load(None).map(|l| l.config).map_err(|e| {
            tracing::error!(error = %e, "configuration");
            e.to_string()
        });
        let events = Events::start(Containerd::new(publisher, &self.namespace));
        let pod = Pod::new(&self.id, config, events);
        TaskService::new(pod, self.exit.clone())
    }
}

/// The pod's host cgroup, the one its sandbox recorded as its own (a pod refused a cgroup in
/// use recorded none): the dead shim cannot remove it any more. Its helpers died with the
/// shim; whatever is left in it is killed by the removal.
fn remove_pod_cgroup(path: &std::path::Path) {
    match crate::host_cgroup::PodCgroup::new(path) {
        Ok(cgroup) => cgroup.remove(),
        Err(e) => tracing::warn!(error = %e, "the dead shim's pod cgroup"),
    }
}

/// Logs go to containerd's shim log FIFO (`log` in the bundle directory), RUST_LOG-filtered.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let log = std::fs::OpenOptions::new().write(true).open("log");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    let _ = match log {
        Ok(file) => builder.with_writer(std::sync::Mutex::new(file)).try_init(),
        Err(_) => builder.with_writer(std::io::stderr).try_init(),
    };
}
