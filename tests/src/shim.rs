//! Pangolin's shim driven directly over its ttrpc task API, started the way containerd starts
//! a shim (`<shim> -namespace NS -address SOCK -publish-binary BIN -id ID start` in the bundle
//! directory, with `TTRPC_ADDRESS`): for the races containerd itself never produces, such as
//! two creates of one id at once. Events go to the private containerd as usual.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use containerd_shim_protos::api::{
    CreateTaskRequest, DeleteRequest, ShutdownRequest, StartRequest, WaitRequest,
};
use containerd_shim_protos::shim_async::{Client, TaskClient};
use containerd_shim_protos::ttrpc::context;

use crate::containerd::{PrivateContainerd, NAMESPACE};
use crate::TestEnv;

/// How to run the shim binary for one task, as containerd does.
struct Invocation {
    binary: PathBuf,
    containerd: PathBuf,
    address: String,
    ttrpc_address: String,
    config: PathBuf,
    id: String,
    bundle: PathBuf,
}

impl Invocation {
    fn command(&self, action: &str) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.args([
            "-namespace",
            NAMESPACE,
            "-address",
            &self.address,
            "-publish-binary",
        ])
        .arg(&self.containerd)
        .args(["-id", &self.id]);
        if action == "delete" {
            cmd.arg("-bundle").arg(&self.bundle);
        }
        cmd.arg(action)
            .current_dir(&self.bundle)
            .env("TTRPC_ADDRESS", &self.ttrpc_address)
            .env("PANGOLIN_CONFIG", &self.config);
        cmd
    }
}

/// A shim process and a task client connected to it.
pub struct Shim {
    /// The task service.
    pub tasks: TaskClient,
    /// The socket address it printed.
    pub address: String,
    invocation: Invocation,
}

/// A bundle for `args`: config.json (the `pangolin run` spec, rooted at `rootfs`) in `dir`.
pub fn bundle(dir: &Path, rootfs: &Path, args: &[&str]) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let run = pangolin_shim::spec::RunSpec {
        args: args.iter().map(|s| (*s).to_string()).collect(),
        readonly: true,
        ..Default::default()
    };
    let mut spec = pangolin_shim::spec::container_spec(&run)?;
    spec.set_root(Some(
        oci_spec::runtime::RootBuilder::default()
            .path(rootfs)
            .readonly(true)
            .build()?,
    ));
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&spec)?)?;
    Ok(dir.to_path_buf())
}

impl Shim {
    /// Starts the shim for task `id` with `bundle` as its working directory, as containerd
    /// would, configured by `env`'s configuration; connects to it.
    pub async fn start(
        ctrd: &PrivateContainerd,
        env: &TestEnv,
        id: &str,
        bundle: &Path,
    ) -> Result<Shim> {
        let mut ttrpc_address = ctrd.socket.clone().into_os_string();
        ttrpc_address.push(".ttrpc");
        let invocation = Invocation {
            binary: crate::target_dir().join("containerd-shim-pangolin-v2"),
            containerd: which("containerd")?,
            address: ctrd.socket.display().to_string(),
            ttrpc_address: ttrpc_address.to_string_lossy().into_owned(),
            config: env.config_file.clone(),
            id: id.to_string(),
            bundle: bundle.to_path_buf(),
        };
        let out = invocation
            .command("start")
            .output()
            .context("running the shim")?;
        if !out.status.success() {
            bail!(
                "shim start failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let address = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let client = Client::connect(&address)
            .await
            .with_context(|| format!("connecting to the shim at {address}"))?;
        Ok(Shim {
            tasks: TaskClient::new(client),
            address,
            invocation,
        })
    }

    /// Create of task `id` from the shim's bundle, with no stdio.
    pub async fn create(&self, id: &str) -> Result<(), containerd_shim_protos::ttrpc::Error> {
        let req = CreateTaskRequest {
            id: id.into(),
            bundle: self.invocation.bundle.display().to_string(),
            ..Default::default()
        };
        self.tasks
            .create(context::with_timeout(0), &req)
            .await
            .map(|_| ())
    }

    /// Start of task `id`'s init; its pid.
    pub async fn start_task(&self, id: &str) -> Result<u32> {
        let req = StartRequest {
            id: id.into(),
            ..Default::default()
        };
        Ok(self.tasks.start(context::with_timeout(0), &req).await?.pid)
    }

    /// Wait for task `id`'s init; its exit status.
    pub async fn wait(&self, id: &str) -> Result<u32> {
        let req = WaitRequest {
            id: id.into(),
            ..Default::default()
        };
        Ok(self
            .tasks
            .wait(context::with_timeout(0), &req)
            .await?
            .exit_status)
    }

    /// Delete of task `id`.
    pub async fn delete(&self, id: &str) -> Result<(), containerd_shim_protos::ttrpc::Error> {
        let req = DeleteRequest {
            id: id.into(),
            ..Default::default()
        };
        self.tasks
            .delete(context::with_timeout(0), &req)
            .await
            .map(|_| ())
    }

    /// Shutdown (the shim exits once it has no task), then `shim delete` as containerd runs it.
    pub async fn shutdown(self) -> Result<()> {
        let req = ShutdownRequest {
            id: self.invocation.id.clone(),
            ..Default::default()
        };
        // The shim may exit before it answers.
        let _ = self.tasks.shutdown(context::with_timeout(0), &req).await;
        let out = self.invocation.command("delete").output()?;
        if !out.status.success() {
            bail!("shim delete: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}

fn which(program: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program} not on PATH"))
}
