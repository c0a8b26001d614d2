//! Where the configuration and the guest artifacts come from.
//!
//! Order: an explicit config file (`--config` or `PANGOLIN_CONFIG`) wins entirely. Otherwise
//! `/etc/pangolin/configuration.toml` if installed, else built-in defaults; and when the binary
//! runs from a checkout (`<checkout>/target/<profile>/`), the guest kernel and initramfs built
//! there by `cargo xtask guest` (`target/guest/`) are used, since they match that binary, and so
//! is the `pangolin-vmm` built beside it.

use std::path::{Path, PathBuf};

use pangolin_runtime_config::{Config, ConfigError, DEFAULT_CONFIG_PATH};

/// Environment variable naming a configuration file.
pub const CONFIG_ENV: &str = "PANGOLIN_CONFIG";

/// Kernel file name inside a guest artifact directory.
pub const KERNEL_NAME: &str = "vmlinux";
/// Initramfs file name inside a guest artifact directory.
pub const INITRAMFS_NAME: &str = "initramfs.cpio";
/// The built-in VMM's binary name.
pub const VMM_NAME: &str = "pangolin-vmm";

/// The loaded configuration and where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The configuration, artifacts resolved.
    pub config: Config,
    /// The file it was read from (None: built-in defaults).
    pub file: Option<PathBuf>,
    /// The checkout guest directory whose artifacts are used, if any.
    pub checkout_guest: Option<PathBuf>,
}

/// `target/guest` of the checkout this binary was built in, if it holds both artifacts.
pub fn checkout_guest_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    // target/<profile>/pangolin or target/<profile>/deps/<test binary>
    exe.ancestors()
        .skip(1)
        .take(4)
        .map(|dir| dir.join("guest"))
        .find(|guest| guest.join(KERNEL_NAME).is_file() && guest.join(INITRAMFS_NAME).is_file())
}

/// The `pangolin-vmm` built beside this binary in a checkout (`target/<profile>/`), if any.
pub fn checkout_vmm() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(VMM_NAME))
        .find(|vmm| vmm.is_file())
}

/// Loads the configuration as described in the module docs.
pub fn load(explicit: Option<&Path>) -> Result<Loaded, ConfigError> {
    let from_env = std::env::var_os(CONFIG_ENV).map(PathBuf::from);
    let explicit = explicit.map(Path::to_path_buf).or(from_env);
    if let Some(file) = explicit {
        let config = Config::load(&file)?;
        return Ok(Loaded {
            config,
            file: Some(file),
            checkout_guest: None,
        });
    }
    let installed = Path::new(DEFAULT_CONFIG_PATH);
    let (mut config, file) = if installed.is_file() {
        (Config::load(installed)?, Some(installed.to_path_buf()))
    } else {
        (Config::default(), None)
    };
    let checkout_guest = checkout_guest_dir();
    if let Some(dir) = &checkout_guest {
        config.hypervisor.kernel = dir.join(KERNEL_NAME);
        config.hypervisor.initramfs = dir.join(INITRAMFS_NAME);
        if let Some(vmm) = checkout_vmm() {
            config.hypervisor.vmm_path = vmm;
        }
    }
    Ok(Loaded {
        config,
        file,
        checkout_guest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_config_file_wins_and_bad_ones_name_the_key() {
        let path = std::env::temp_dir().join(format!("pangolin-cfg-{}.toml", std::process::id()));
        std::fs::write(&path, "[hypervisor]\nvcpus = 2\n").expect("write");
        let loaded = load(Some(&path)).expect("load");
        assert_eq!(loaded.config.hypervisor.vcpus, 2);
        assert_eq!(loaded.file.as_deref(), Some(path.as_path()));
        assert!(loaded.checkout_guest.is_none());
        std::fs::write(&path, "[hypervisor]\nvcpus = 0\n").expect("write");
        let err = load(Some(&path)).expect_err("invalid");
        assert!(err.to_string().contains("hypervisor.vcpus"), "{err}");
        std::fs::remove_file(&path).expect("cleanup");
    }
}
