//! Booting a template VM: a sandbox of its own that is written to its snapshot files once its
//! agent serves, and ends.

use std::path::{Path, PathBuf};
use std::time::Instant;

use pangolin_runtime_config::{Config, HypervisorKind};
use pangolin_vmm_config::SnapshotFiles;

use crate::host::HostInfo;
use crate::hypervisor::{self, HypervisorError};

use super::launch::{check_artifacts, Launch, Mode};
use super::parts::{remove_workdir, workdir_of};
use super::{BootOptions, Sandbox, SandboxError};

impl Sandbox {
    /// Boots a template VM of `class` with an empty share (and, with `nic`, a NIC on a tap in a
    /// network namespace of its own), writes it to `files` once its agent serves, and tears it
    /// down.
    ///
    /// # Errors
    /// [`SandboxError`] when the backend is not the built-in VMM, or the VM fails to boot or to
    /// be written.
    pub async fn build_template(
        config: &Config,
        class: &str,
        nic: bool,
        files: &SnapshotFiles,
    ) -> Result<(), SandboxError> {
        let start = Instant::now();
        let host = HostInfo::probe();
        let kind = hypervisor::resolve(config.hypervisor.kind, &host)?;
        if kind != HypervisorKind::Builtin {
            return Err(HypervisorError::Unsupported {
                kind,
                reason: "VM templates need the built-in VMM".into(),
            }
            .into());
        }
        check_artifacts(config)?;
        // Under the class's lock: a directory of this name is a dead build's.
        // A leading dot: no containerd id can take the name.
        let id = format!(".template-{class}");
        remove_workdir(&workdir_of(&config.runtime.state_dir, &id));
        let class_dir = files
            .state
            .parent()
            .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
        let share = class_dir.join("empty-share");
        std::fs::create_dir_all(&share).map_err(|e| SandboxError::Workdir(share.clone(), e))?;
        let netns = if nic {
            Some(crate::network::private::PrivateNetns::new(class_dir.join("netns")).await?)
        } else {
            None
        };
        let options = BootOptions {
            share: Some(&share),
            ..BootOptions::default()
        };
        let how = Launch {
            mode: Mode::Build {
                files,
                netns: netns.as_ref().map(|n| n.path.as_path()),
            },
            start,
            iface: None,
        };
        let built = Self::launch(&id, config, &options, kind, &host, how).await;
        drop(netns);
        let _ = std::fs::remove_dir(&share);
        built.map(|_| ())
    }
}
