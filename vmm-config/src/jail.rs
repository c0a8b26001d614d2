//! How a jailed `pangolin-vmm` starts: the descriptors the host side opened for it, and the
//! jail it enters before it reads anything a guest controls.
//!
//! The host opens every file and socket the VMM needs (KVM, the boot images, the console log,
//! the listening sockets, taps, disks) and sends them in one `SCM_RIGHTS` message on the VMM's
//! stdin, a Unix socket ([`InheritedFds`] names each one's position in that message; no
//! descriptor numbers are agreed on, so nothing can collide in the child). The VMM adopts them,
//! then enters the [`JailConfig`]: its own mount
//! namespace whose root is an empty tmpfs holding only the bound directories (the sandbox's
//! socket directory), its own IPC, UTS and network namespaces, a non-root uid/gid, no capability in any
//! set, no_new_privs and rlimits; only then does it build the VM. A jailed VMM opens nothing
//! by path but the sockets it connects to in the bound directories.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::vm::{invalid, ConfigError, VmConfig};

/// Where each resource is in the set of descriptors the host sends on the VMM's stdin
/// (positions 0..n, each used once).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InheritedFds {
    /// `/dev/kvm`, read-write.
    pub kvm: i32,
    /// The kernel image, read-only.
    pub kernel: i32,
    /// The initramfs, read-only, when the config has one.
    #[serde(default)]
    pub initramfs: Option<i32>,
    /// The console log, opened for appending.
    pub console: i32,
    /// The control socket, listening, when the config has one.
    #[serde(default)]
    pub api: Option<i32>,
    /// The vsock device's host listener (bound at `vsock.uds_path`), when there is a vsock.
    #[serde(default)]
    pub vsock: Option<i32>,
    /// One tap queue per `net` entry, in order.
    #[serde(default)]
    pub taps: Vec<i32>,
    /// The snapshot files (state, memory) a template's VMM writes, opened read-write by the
    /// host, when the config has `snapshot`.
    #[serde(default)]
    pub snapshot: Option<[i32; 2]>,
    /// The snapshot files (state, memory) to restore from, read-only, when the config has
    /// `restore`.
    #[serde(default)]
    pub restore: Option<[i32; 2]>,
    /// One disk image per `blk` entry, in order.
    #[serde(default)]
    pub disks: Vec<i32>,
}

impl InheritedFds {
    /// Every position, in field order.
    pub fn all(&self) -> Vec<i32> {
        let mut all = vec![self.kvm, self.kernel, self.console];
        all.extend(self.initramfs);
        all.extend(self.api);
        all.extend(self.vsock);
        all.extend(&self.taps);
        all.extend(self.snapshot.iter().flatten());
        all.extend(self.restore.iter().flatten());
        all.extend(&self.disks);
        all
    }
}

/// The jail the VMM enters before building the VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JailConfig {
    /// An empty host directory the jail's root (a tmpfs) is mounted on.
    pub root: PathBuf,
    /// Host directories bound into the jail at the same path (the sandbox's socket directory).
    pub bind: Vec<PathBuf>,
    /// The uid the VMM runs as (never 0).
    pub uid: u32,
    /// The gid the VMM runs as (never 0).
    pub gid: u32,
    /// RLIMIT_NOFILE.
    pub max_open_files: u64,
}

/// Fewest open files a jailed VMM may be limited to (stdio, KVM, vCPUs, devices, eventfds).
pub const MIN_OPEN_FILES: u64 = 64;

/// Checks `fds` and `jail` against the rest of `config`.
pub(crate) fn validate(config: &VmConfig) -> Result<(), ConfigError> {
    if let Some(fds) = &config.fds {
        let mut sorted = fds.all();
        sorted.sort_unstable();
        if sorted.iter().zip(0..).any(|(got, want)| *got != want) {
            return Err(invalid("fds", "positions must be 0..n, each once"));
        }
        if fds.initramfs.is_some() != config.initramfs.is_some() {
            return Err(invalid(
                "fds.initramfs",
                "must be given exactly when initramfs is",
            ));
        }
        if fds.api.is_some() != config.api_socket.is_some() {
            return Err(invalid(
                "fds.api",
                "must be given exactly when api_socket is",
            ));
        }
        if fds.vsock.is_some() != config.vsock.is_some() {
            return Err(invalid("fds.vsock", "must be given exactly when vsock is"));
        }
        if fds.taps.len() != config.net.len() {
            return Err(invalid("fds.taps", "one tap per net entry"));
        }
        if fds.snapshot.is_some() != config.snapshot.is_some() {
            return Err(invalid(
                "fds.snapshot",
                "must be given exactly when snapshot is",
            ));
        }
        if fds.restore.is_some() != config.restore.is_some() {
            return Err(invalid(
                "fds.restore",
                "must be given exactly when restore is",
            ));
        }
        if fds.disks.len() != config.blk.len() {
            return Err(invalid("fds.disks", "one disk per blk entry"));
        }
    }
    if let Some(jail) = &config.jail {
        if config.fds.is_none() {
            return Err(invalid(
                "jail",
                "a jailed VMM needs fds: it opens nothing itself",
            ));
        }
        if jail.uid == 0 || jail.gid == 0 {
            return Err(invalid(
                "jail.uid",
                "the jailed VMM must not run as uid or gid 0",
            ));
        }
        if !jail.root.is_absolute() || jail.bind.iter().any(|b| !b.is_absolute()) {
            return Err(invalid("jail.root", "jail paths must be absolute"));
        }
        if jail.bind.iter().any(|b| b.as_os_str().len() <= 1) {
            return Err(invalid("jail.bind", "binding / would defeat the jail"));
        }
        if jail.max_open_files < MIN_OPEN_FILES {
            return Err(invalid("jail.max_open_files", "must be at least 64"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            kernel: "/k".into(),
            initramfs: Some("/i".into()),
            cmdline: String::new(),
            vcpus: 1,
            memory_mib: 128,
            console_log: "/c".into(),
            api_socket: None,
            vsock: None,
            fs: Vec::new(),
            net: Vec::new(),
            blk: Vec::new(),
            rng: false,
            fds: Some(InheritedFds {
                kvm: 0,
                kernel: 1,
                initramfs: Some(2),
                console: 3,
                api: None,
                vsock: None,
                taps: Vec::new(),
                snapshot: None,
                restore: None,
                disks: Vec::new(),
            }),
            jail: Some(JailConfig {
                root: "/run/p/s1/jail".into(),
                bind: vec!["/run/p/s1".into()],
                uid: 2050,
                gid: 2050,
                max_open_files: 1024,
            }),
            seccomp: true,
            snapshot: None,
            restore: None,
        }
    }

    #[test]
    fn a_jail_with_its_descriptors_is_valid() {
        config().validate().expect("valid");
    }

    #[test]
    fn each_inconsistency_is_named() {
        type Break = Box<dyn Fn(&mut VmConfig)>;
        let cases: Vec<(&str, Break)> = vec![
            (
                "jail.uid",
                Box::new(|c| c.jail.as_mut().map_or((), |j| j.uid = 0)),
            ),
            ("jail", Box::new(|c| c.fds = None)),
            ("fds.initramfs", Box::new(|c| c.initramfs = None)),
            (
                "fds",
                Box::new(|c| c.fds.as_mut().map_or((), |f| f.console = 2)),
            ),
            (
                "fds",
                Box::new(|c| c.fds.as_mut().map_or((), |f| f.kvm = 7)),
            ),
            (
                "jail.bind",
                Box::new(|c| c.jail.as_mut().map_or((), |j| j.bind = vec!["/".into()])),
            ),
            (
                "jail.max_open_files",
                Box::new(|c| c.jail.as_mut().map_or((), |j| j.max_open_files = 8)),
            ),
            (
                "fds.taps",
                Box::new(|c| c.fds.as_mut().map_or((), |f| f.taps = vec![4])),
            ),
        ];
        for (field, break_it) in cases {
            let mut c = config();
            break_it(&mut c);
            let err = c.validate().expect_err(field);
            assert!(err.to_string().starts_with(field), "{field}: {err}");
        }
    }
}
