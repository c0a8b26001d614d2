//! VM templates on the host: which pods start from one, and building one on first use.
//!
//! A template is a VM booted as every pod's VM is (same kernel, initramfs, command line and
//! devices: vsock, rng and a virtio-fs device whose share is never mounted), snapshotted once
//! its agent serves and before the host's first call. A pod restored from it gets its own
//! virtiofsd and share, entropy, boot id and clock at that first call (`agent.rs`,
//! `agent/src/share.rs`). Templates are per size class (vCPUs, memory, NIC or not) and per
//! fingerprint ([`fingerprint`]); [`Store`] keeps them. A template with a NIC boots with a tap
//! in a network namespace of its own ([`crate::network::private`]) and the MAC
//! [`TEMPLATE_MAC`]; its clones have their pod's tap in the same slot, and the agent gives the
//! NIC the pod veth's MAC before it configures it. Only the built-in VMM has templates; every
//! other pod boots cold, and the reason is logged with the pod.

pub mod fingerprint;
pub mod store;

use std::time::{Duration, Instant};

use pangolin_runtime_config::{Config, HypervisorKind};

pub use store::{class, Listed, Meta, Store, Template};

/// The NIC MAC of every template VM (locally administered); a clone's agent replaces it with
/// its pod's.
pub const TEMPLATE_MAC: &str = "02:50:47:00:00:01";

/// How a pod's VM came up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartedFrom {
    /// Booted its kernel.
    Boot,
    /// Restored from a template.
    Template,
}

impl StartedFrom {
    /// `boot` or `template`, as `--timings` and the logs print it.
    pub fn as_str(self) -> &'static str {
        match self {
            StartedFrom::Boot => "boot",
            StartedFrom::Template => "template",
        }
    }
}

impl std::fmt::Display for StartedFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A template could not be found, built or used.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The templates' directory, lock or files failed.
    #[error("template directory {dir}: {what}")]
    Io {
        /// The directory.
        dir: std::path::PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The template VM failed to boot or to be written.
    #[error("building the template failed")]
    Build(#[source] Box<crate::sandbox::SandboxError>),
}

/// Why a pod cannot use a template at all, or None when it can.
pub fn unfit(config: &Config, kind: HypervisorKind, share: bool) -> Option<String> {
    if !config.template.enabled {
        return Some("template.enabled = false".into());
    }
    if kind != HypervisorKind::Builtin {
        return Some(format!("the {kind} backend has no templates"));
    }
    if !share {
        return Some("the VM has no share (templates are built with one)".into());
    }
    None
}

/// The template store `config` names.
pub fn store(config: &Config) -> Store {
    Store::new(config.template.dir_under(&config.runtime.state_dir))
}

fn io(dir: &std::path::Path, what: &'static str) -> impl FnOnce(std::io::Error) -> TemplateError {
    let dir = dir.to_path_buf();
    move |source| TemplateError::Io { dir, what, source }
}

/// The template of `config`'s size class (with a NIC or without), built now if there is none
/// with the current fingerprint (or always, with `rebuild`). Pods that ask at the same moment
/// wait for one build under the class's lock.
///
/// # Errors
/// [`TemplateError`] when the lock, the fingerprint's inputs or the build fail.
pub async fn get_or_build(
    config: &Config,
    nic: bool,
    rebuild: bool,
) -> Result<Template, TemplateError> {
    let store = store(config);
    let class = class(config.hypervisor.vcpus, config.hypervisor.memory_mib, nic);
    let dir = store.dir().to_path_buf();
    let (lock, fingerprint, digests) = {
        let (store, class, config) = (store.clone(), class.clone(), config.clone());
        tokio::task::spawn_blocking(move || {
            let lock = store.lock(&class).map_err(io(store.dir(), "locking"))?;
            let known = store.meta(&class).map(|m| m.digests).unwrap_or_default();
            let cmdline = crate::sandbox::kernel_cmdline(&config);
            let inputs = fingerprint::Inputs {
                kernel: &config.hypervisor.kernel,
                initramfs: &config.hypervisor.initramfs,
                vmm: &config.hypervisor.vmm_path,
                vcpus: config.hypervisor.vcpus,
                memory_mib: config.hypervisor.memory_mib,
                cmdline: &cmdline,
            };
            let (fp, digests) = fingerprint::compute(&inputs, &known)
                .map_err(io(store.dir(), "computing the fingerprint"))?;
            Ok::<_, TemplateError>((lock, fp, digests))
        })
        .await
        .map_err(|e| io(&dir, "computing the fingerprint")(std::io::Error::other(e)))??
    };
    if !rebuild {
        match store.find(&class, &fingerprint) {
            Ok(template) => return Ok(template),
            Err(why) => tracing::info!(%class, %why, "building the VM template"),
        }
    }
    let staged = store
        .staging(&class, fingerprint.clone())
        .map_err(io(&dir, "preparing the build"))?;
    let started = Instant::now();
    crate::sandbox::Sandbox::build_template(config, &class, nic, &staged)
        .await
        .map_err(|e| TemplateError::Build(Box::new(e)))?;
    let meta = Meta {
        fingerprint,
        digests,
        guest_cid: config.vsock.guest_cid,
        built_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        build_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    let template = store
        .commit(&class, &staged, &meta)
        .map_err(io(&dir, "writing the template"))?;
    tracing::info!(%class, build_ms = meta.build_ms, "VM template built");
    drop(lock);
    Ok(template)
}

/// Removes a template a restore failed from (the next pod builds a new one), under its lock.
pub async fn discard(config: &Config, template: &Template) {
    let store = store(config);
    let class = template.class.clone();
    let removed = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || {
            let _lock = store.lock(&class)?;
            store.remove(&class)
        }),
    )
    .await;
    if !matches!(removed, Ok(Ok(Ok(_)))) {
        tracing::warn!(class = %template.class, ?removed, "cannot remove the failed template");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_builtin_pods_with_a_share_fit() {
        let config = Config::default();
        assert_eq!(unfit(&config, HypervisorKind::Builtin, true), None);
        let qemu = unfit(&config, HypervisorKind::Qemu, true).expect("qemu");
        assert!(qemu.contains("qemu"), "{qemu}");
        assert!(unfit(&config, HypervisorKind::Builtin, false).is_some());
        let mut off = Config::default();
        off.template.enabled = false;
        assert_eq!(
            unfit(&off, HypervisorKind::Builtin, true).as_deref(),
            Some("template.enabled = false")
        );
    }

    #[test]
    fn the_store_follows_the_state_dir_unless_a_dir_is_set() {
        let mut config = Config::default();
        config.runtime.state_dir = "/run/p".into();
        assert_eq!(
            store(&config).dir(),
            std::path::Path::new("/run/p/.templates")
        );
        config.template.dir = "/var/lib/pangolin/templates".into();
        assert_eq!(
            store(&config).dir(),
            std::path::Path::new("/var/lib/pangolin/templates")
        );
    }
}
