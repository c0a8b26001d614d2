//! Semantic checks that types alone cannot express, run before any VM is started.

use std::fmt::Display;
use std::ops::RangeInclusive;
use std::path::{Component, Path};

use crate::config::Config;
use crate::error::ConfigError;

impl Config {
    /// Rejects values the runtime cannot use, so misconfiguration fails at startup rather
    /// than halfway through booting a pod; reports the first problem, in file order.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let h = &self.hypervisor;
        absolute("hypervisor.kernel", &h.kernel)?;
        absolute("hypervisor.initramfs", &h.initramfs)?;
        if h.kernel_params.chars().any(char::is_control) {
            return Err(ConfigError::Invalid {
                key: "hypervisor.kernel_params",
                reason: format!(
                    "must not contain control characters (newlines, tabs, NUL), got {:?}",
                    h.kernel_params
                ),
            });
        }
        in_range("hypervisor.vcpus", h.vcpus, 1..=16)?;
        in_range("hypervisor.memory_mib", h.memory_mib, 64..=65_536)?;
        in_range(
            "hypervisor.boot_timeout_ms",
            h.boot_timeout_ms,
            100..=600_000,
        )?;
        absolute("hypervisor.qemu_path", &h.qemu_path)?;
        absolute("hypervisor.vmm_path", &h.vmm_path)?;

        let j = &self.jail;
        in_range("jail.uid", j.uid, 1..=u32::MAX - 1)?;
        in_range("jail.gid", j.gid, 1..=u32::MAX - 1)?;
        in_range("jail.max_open_files", j.max_open_files, 64..=1_048_576)?;
        in_range("jail.first_per_vm_id", j.first_per_vm_id, 1..=u32::MAX - 1)?;
        in_range(
            "jail.per_vm_id_count",
            j.per_vm_id_count,
            1..=u32::MAX - j.first_per_vm_id,
        )?;

        program("virtiofs.virtiofsd_path", &self.virtiofs.virtiofsd_path)?;

        let v = &self.vsock;
        program("vsock.vhost_device_vsock_path", &v.vhost_device_vsock_path)?;
        in_range("vsock.guest_cid", v.guest_cid, 3..=u32::MAX - 1)?;
        in_range("vsock.agent_port", v.agent_port, 1..=u32::MAX - 1)?;

        absolute("runtime.state_dir", &self.runtime.state_dir)?;
        absolute("agent.debug_console_shell", &self.agent.debug_console_shell)?;
        if !self.template.dir.as_os_str().is_empty() {
            absolute("template.dir", &self.template.dir)?;
        }
        Ok(())
    }
}

fn in_range<T: PartialOrd + Display>(
    key: &'static str,
    value: T,
    range: RangeInclusive<T>,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        key,
        reason: format!(
            "must be in {}..={}, got {value}",
            range.start(),
            range.end()
        ),
    })
}

/// Absolute paths keep the runtime independent of the working directory it was started in.
fn absolute(key: &'static str, path: &Path) -> Result<(), ConfigError> {
    if path.is_absolute() {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        key,
        reason: format!(
            "must be an absolute path, got {:?}",
            path.display().to_string()
        ),
    })
}

/// A bare program name (looked up on `PATH` by the caller) or an absolute path; a relative
/// path with a slash would depend on the working directory.
fn program(key: &'static str, path: &Path) -> Result<(), ConfigError> {
    let mut components = path.components();
    let bare_name = matches!(
        (components.next(), components.next()),
        (Some(Component::Normal(_)), None)
    ) && !path.as_os_str().as_encoded_bytes().contains(&b'/');
    if path.is_absolute() || bare_name {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        key,
        reason: format!(
            "must be a bare program name or an absolute path, got {:?}",
            path.display().to_string()
        ),
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn invalid(mutate: impl FnOnce(&mut Config)) -> String {
        let mut c = Config::default();
        mutate(&mut c);
        match c.validate() {
            Ok(()) => panic!("expected a validation error for {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn valid(mutate: impl FnOnce(&mut Config)) -> Result<(), ConfigError> {
        let mut c = Config::default();
        mutate(&mut c);
        c.validate()
    }

    #[test]
    fn defaults_are_valid() -> Result<(), ConfigError> {
        Config::default().validate()
    }

    #[test]
    fn vcpus_range() -> Result<(), ConfigError> {
        assert_eq!(
            invalid(|c| c.hypervisor.vcpus = 0),
            "hypervisor.vcpus: must be in 1..=16, got 0"
        );
        assert_eq!(
            invalid(|c| c.hypervisor.vcpus = 17),
            "hypervisor.vcpus: must be in 1..=16, got 17"
        );
        valid(|c| c.hypervisor.vcpus = 16)
    }

    #[test]
    fn memory_range() -> Result<(), ConfigError> {
        assert_eq!(
            invalid(|c| c.hypervisor.memory_mib = 63),
            "hypervisor.memory_mib: must be in 64..=65536, got 63"
        );
        assert!(invalid(|c| c.hypervisor.memory_mib = 65_537).starts_with("hypervisor.memory_mib:"));
        valid(|c| c.hypervisor.memory_mib = 64)?;
        valid(|c| c.hypervisor.memory_mib = 65_536)
    }

    #[test]
    fn boot_timeout_range() -> Result<(), ConfigError> {
        assert_eq!(
            invalid(|c| c.hypervisor.boot_timeout_ms = 99),
            "hypervisor.boot_timeout_ms: must be in 100..=600000, got 99"
        );
        assert!(invalid(|c| c.hypervisor.boot_timeout_ms = 600_001)
            .starts_with("hypervisor.boot_timeout_ms:"));
        valid(|c| c.hypervisor.boot_timeout_ms = 600_000)
    }

    #[test]
    fn guest_cid_reserved_values() -> Result<(), ConfigError> {
        for cid in [0, 1, 2, u32::MAX] {
            let msg = invalid(|c| c.vsock.guest_cid = cid);
            assert_eq!(
                msg,
                format!("vsock.guest_cid: must be in 3..=4294967294, got {cid}")
            );
        }
        valid(|c| c.vsock.guest_cid = u32::MAX - 1)
    }

    #[test]
    fn agent_port_range() -> Result<(), ConfigError> {
        assert!(invalid(|c| c.vsock.agent_port = 0).starts_with("vsock.agent_port: must be in"));
        assert!(invalid(|c| c.vsock.agent_port = u32::MAX).starts_with("vsock.agent_port:"));
        valid(|c| c.vsock.agent_port = 1)
    }

    type Mutation = fn(&mut Config);

    #[test]
    fn paths_must_be_absolute() {
        let cases: [(&str, Mutation); 5] = [
            ("hypervisor.kernel", |c| {
                c.hypervisor.kernel = PathBuf::from("vmlinux")
            }),
            ("hypervisor.initramfs", |c| {
                c.hypervisor.initramfs = PathBuf::from("./i.cpio")
            }),
            ("hypervisor.qemu_path", |c| {
                c.hypervisor.qemu_path = PathBuf::from("qemu")
            }),
            ("runtime.state_dir", |c| {
                c.runtime.state_dir = PathBuf::from("run/pangolin")
            }),
            ("runtime.state_dir", |c| {
                c.runtime.state_dir = PathBuf::from("")
            }),
        ];
        for (key, mutate) in cases {
            let msg = invalid(mutate);
            assert!(
                msg.starts_with(&format!("{key}: must be an absolute path")),
                "{msg}"
            );
        }
    }

    #[test]
    fn helper_programs_are_bare_names_or_absolute_paths() -> Result<(), ConfigError> {
        type Set = fn(&mut Config, PathBuf);
        let keys: [(&str, Set); 2] = [
            ("vsock.vhost_device_vsock_path", |c, p| {
                c.vsock.vhost_device_vsock_path = p
            }),
            ("virtiofs.virtiofsd_path", |c, p| {
                c.virtiofs.virtiofsd_path = p
            }),
        ];
        for (key, set) in keys {
            valid(|c| set(c, PathBuf::from("helper")))?;
            valid(|c| set(c, PathBuf::from("/usr/bin/helper")))?;
            for bad in ["bin/helper", "./helper", "", ".", "..", "x/"] {
                let msg = invalid(|c| set(c, PathBuf::from(bad)));
                assert!(
                    msg.starts_with(&format!("{key}: must be a bare program name")),
                    "{key} = {bad:?}: {msg}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn kernel_params_reject_control_characters() -> Result<(), ConfigError> {
        valid(|c| c.hypervisor.kernel_params = "console=ttyS0 quiet".to_owned())?;
        let msg = invalid(|c| c.hypervisor.kernel_params = "a\nb".to_owned());
        assert!(
            msg.starts_with("hypervisor.kernel_params: must not contain"),
            "{msg}"
        );
        Ok(())
    }

    #[test]
    fn validation_errors_surface_through_toml() {
        let err = Config::from_toml_str("[vsock]\nguest_cid = 2\n")
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("vsock.guest_cid: must be in 3..=4294967294, got 2")
        );
    }
}
