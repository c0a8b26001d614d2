//! What one VMM process boots: a plain, serialisable description passed by the host side as JSON.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Most vCPUs a VM may have (the VMM's MP table describes at most this many).
pub const MAX_VCPUS: u8 = 16;
/// Most virtio devices a VM may have: one interrupt line each (GSIs 5 to 23).
pub const MAX_VIRTIO_DEVICES: usize = 19;
/// Longest virtio-fs tag (the size of the tag field in the device's configuration space).
pub const MAX_FS_TAG_LEN: usize = 36;
/// Longest tap interface name (`IFNAMSIZ` less the terminating NUL).
pub const MAX_TAP_NAME_LEN: usize = 15;
/// Smallest guest RAM accepted, in MiB.
pub const MIN_MEMORY_MIB: u32 = 32;
/// Largest guest RAM accepted, in MiB.
pub const MAX_MEMORY_MIB: u32 = 256 * 1024;

/// The VM to run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// ELF vmlinux.
    pub kernel: PathBuf,
    /// Initramfs, if any.
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line; the VMM appends its `virtio_mmio.device=` entries.
    pub cmdline: String,
    /// vCPUs, 1 to 16.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Where the serial console goes.
    pub console_log: PathBuf,
    /// Control socket (pause, resume, stop, status), if wanted.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// Hybrid vsock device.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// virtio-fs devices (vhost-user).
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    /// virtio-net devices.
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// virtio-blk devices.
    #[serde(default)]
    pub blk: Vec<BlkConfig>,
    /// Whether to add a virtio-rng device.
    #[serde(default)]
    pub rng: bool,
    /// Descriptors the host opened for the VMM; without them the VMM opens the paths itself.
    #[serde(default)]
    pub fds: Option<crate::jail::InheritedFds>,
    /// The jail to enter before building the VM (requires `fds`).
    #[serde(default)]
    pub jail: Option<crate::jail::JailConfig>,
    /// Whether each thread installs its seccomp filter before the guest runs (default true;
    /// false is for debugging a filter and is logged as a warning).
    #[serde(default = "enabled")]
    pub seccomp: bool,
    /// A template's VMM: where a `snapshot` request writes the VM. Without it `snapshot` is
    /// refused (and the event loop's filter holds none of the calls a snapshot makes).
    #[serde(default)]
    pub snapshot: Option<crate::SnapshotFiles>,
    /// Start from this snapshot instead of booting the kernel (the devices are the same list,
    /// their host ends this VM's own).
    #[serde(default)]
    pub restore: Option<crate::SnapshotFiles>,
}

fn enabled() -> bool {
    true
}

/// Hybrid vsock: host connections arrive on `uds_path`, guest connections to port P go to
/// `<uds_path>_P`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id, 3 to `u32::MAX - 1`.
    pub guest_cid: u64,
    /// The Unix socket to listen on.
    pub uds_path: PathBuf,
}

/// A virtio-fs share served by a vhost-user daemon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// The daemon's vhost-user socket.
    pub socket: PathBuf,
    /// Mount tag the guest uses.
    pub tag: String,
}

/// A network card on a tap device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Tap interface name (opened in the VMM's network namespace).
    pub tap: String,
    /// Guest MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
}

/// A disk on a raw file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BlkConfig {
    /// Image file.
    pub path: PathBuf,
    /// Refuse guest writes.
    #[serde(default)]
    pub read_only: bool,
}

/// A configuration value is out of range.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Named field and what is wrong with it.
    #[error("{field}: {problem}")]
    Invalid {
        /// Dotted field name.
        field: &'static str,
        /// What is wrong.
        problem: &'static str,
    },
}

pub(crate) fn invalid(field: &'static str, problem: &'static str) -> ConfigError {
    ConfigError::Invalid { field, problem }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

impl NetConfig {
    /// The MAC address as bytes.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `net.mac` when it is not `aa:bb:cc:dd:ee:ff`.
    pub fn mac_bytes(&self) -> Result<[u8; 6], ConfigError> {
        parse_mac(&self.mac).ok_or(invalid("net.mac", "must look like aa:bb:cc:dd:ee:ff"))
    }
}

impl VmConfig {
    /// Number of virtio-mmio devices this configuration asks for.
    pub fn virtio_device_count(&self) -> usize {
        usize::from(self.vsock.is_some())
            + self.fs.len()
            + self.net.len()
            + self.blk.len()
            + usize::from(self.rng)
    }

    /// Checks every field's range.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(invalid("vcpus", "must be 1 to 16"));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(invalid("memory_mib", "must be 32 to 262144"));
        }
        if self.virtio_device_count() > MAX_VIRTIO_DEVICES {
            return Err(invalid(
                "devices",
                "more virtio devices than interrupt lines (19)",
            ));
        }
        if let Some(v) = &self.vsock {
            // 0-2 are the hypervisor, local and host; u32::MAX is VMADDR_CID_ANY.
            if v.guest_cid < 3 || v.guest_cid >= u64::from(u32::MAX) {
                return Err(invalid("vsock.guest_cid", "must be 3 to 4294967294"));
            }
        }
        for fs in &self.fs {
            if fs.tag.is_empty() || fs.tag.len() > MAX_FS_TAG_LEN {
                return Err(invalid("fs.tag", "must be 1 to 36 bytes"));
            }
        }
        for net in &self.net {
            net.mac_bytes()?;
            if net.tap.is_empty() || net.tap.len() > MAX_TAP_NAME_LEN {
                return Err(invalid("net.tap", "must be 1 to 15 bytes"));
            }
        }
        for (field, files) in [("snapshot", &self.snapshot), ("restore", &self.restore)] {
            let Some(f) = files else { continue };
            if !f.state.is_absolute() || !f.memory.is_absolute() {
                return Err(invalid(field, "state and memory paths must be absolute"));
            }
            if f.fingerprint.vcpus != self.vcpus {
                return Err(invalid(field, "fingerprint.vcpus differs from vcpus"));
            }
            if f.fingerprint.memory_mib != self.memory_mib {
                return Err(invalid(
                    field,
                    "fingerprint.memory_mib differs from memory_mib",
                ));
            }
            if f.fingerprint.cmdline != self.cmdline {
                return Err(invalid(field, "fingerprint.cmdline differs from cmdline"));
            }
            if f.fingerprint.initramfs_sha256.is_some() != self.initramfs.is_some() {
                return Err(invalid(
                    field,
                    "fingerprint.initramfs_sha256 must be given exactly when initramfs is",
                ));
            }
        }
        if self.snapshot.is_some() && self.restore.is_some() {
            return Err(invalid(
                "snapshot",
                "a restored VM is never a template (templates are booted)",
            ));
        }
        crate::jail::validate(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> VmConfig {
        VmConfig {
            kernel: "/k".into(),
            initramfs: None,
            cmdline: "console=ttyS0".into(),
            vcpus: 1,
            memory_mib: 128,
            console_log: "/c".into(),
            api_socket: None,
            vsock: None,
            fs: vec![],
            net: vec![],
            blk: vec![],
            rng: false,
            fds: None,
            jail: None,
            seccomp: true,
            snapshot: None,
            restore: None,
        }
    }

    #[test]
    fn snapshot_files_must_fit_the_vm_and_a_clone_is_no_template() {
        let files = |vcpus, memory_mib, state: &str| {
            Some(crate::SnapshotFiles {
                state: state.into(),
                memory: "/m".into(),
                fingerprint: crate::Fingerprint {
                    kernel_sha256: "k".into(),
                    initramfs_sha256: None,
                    vmm_sha256: "v".into(),
                    vcpus,
                    memory_mib,
                    cmdline: "console=ttyS0".into(),
                    host_cpu: "c".into(),
                    host_kernel: "h".into(),
                },
            })
        };
        let reason = |c: VmConfig| match c.validate() {
            Err(ConfigError::Invalid { field, problem }) => format!("{field}: {problem}"),
            Ok(()) => "ok".into(),
        };
        let good = files(1, 128, "/s");
        let template = VmConfig {
            snapshot: good.clone(),
            ..base()
        };
        assert_eq!(reason(template.clone()), "ok");
        assert_eq!(
            reason(VmConfig {
                restore: good.clone(),
                ..base()
            }),
            "ok"
        );
        assert_eq!(
            reason(VmConfig {
                restore: files(2, 128, "/s"),
                ..base()
            }),
            "restore: fingerprint.vcpus differs from vcpus"
        );
        assert_eq!(
            reason(VmConfig {
                snapshot: files(1, 256, "/s"),
                ..base()
            }),
            "snapshot: fingerprint.memory_mib differs from memory_mib"
        );
        assert_eq!(
            reason(VmConfig {
                snapshot: files(1, 128, "relative"),
                ..base()
            }),
            "snapshot: state and memory paths must be absolute"
        );
        let mut other_cmdline = good.clone();
        if let Some(f) = other_cmdline.as_mut() {
            f.fingerprint.cmdline = "console=ttyS1".into();
        }
        assert_eq!(
            reason(VmConfig {
                restore: other_cmdline,
                ..base()
            }),
            "restore: fingerprint.cmdline differs from cmdline"
        );
        assert_eq!(
            reason(VmConfig {
                restore: good.clone(),
                initramfs: Some("/i".into()),
                ..base()
            }),
            "restore: fingerprint.initramfs_sha256 must be given exactly when initramfs is"
        );
        assert!(reason(VmConfig {
            restore: good,
            ..template
        })
        .starts_with("snapshot: a restored VM is never a template"));
    }

    #[test]
    fn bad_fields_are_named() {
        assert!(base().validate().is_ok());
        let field = |c: VmConfig| match c.validate() {
            Err(ConfigError::Invalid { field, .. }) => field,
            Ok(()) => "ok",
        };
        assert_eq!(field(VmConfig { vcpus: 0, ..base() }), "vcpus");
        assert_eq!(
            field(VmConfig {
                vcpus: 17,
                ..base()
            }),
            "vcpus"
        );
        assert_eq!(
            field(VmConfig {
                memory_mib: 8,
                ..base()
            }),
            "memory_mib"
        );
        let vsock = Some(VsockConfig {
            guest_cid: 2,
            uds_path: "/v".into(),
        });
        assert_eq!(field(VmConfig { vsock, ..base() }), "vsock.guest_cid");
        let vsock = Some(VsockConfig {
            guest_cid: u64::from(u32::MAX),
            uds_path: "/v".into(),
        });
        assert_eq!(field(VmConfig { vsock, ..base() }), "vsock.guest_cid");
        let net = vec![NetConfig {
            tap: "tap0".into(),
            mac: "zz".into(),
        }];
        assert_eq!(field(VmConfig { net, ..base() }), "net.mac");
        let net = vec![NetConfig {
            tap: "sixteen-chars-xx".into(),
            mac: "02:00:00:00:00:0a".into(),
        }];
        assert_eq!(field(VmConfig { net, ..base() }), "net.tap");
        let fs = |tag: &str| {
            vec![FsConfig {
                socket: "/s".into(),
                tag: tag.into(),
            }]
        };
        assert_eq!(
            field(VmConfig {
                fs: fs(""),
                ..base()
            }),
            "fs.tag"
        );
        assert_eq!(
            field(VmConfig {
                fs: fs(&"t".repeat(37)),
                ..base()
            }),
            "fs.tag"
        );
        assert_eq!(
            field(VmConfig {
                fs: fs(&"t".repeat(36)),
                ..base()
            }),
            "ok"
        );
        let blk = vec![
            BlkConfig {
                path: "/b".into(),
                read_only: true
            };
            20
        ];
        assert_eq!(field(VmConfig { blk, ..base() }), "devices");
    }

    #[test]
    fn json_rejects_unknown_fields_and_parses_macs() {
        let bad = r#"{"kernel":"/k","cmdline":"","vcpus":1,"memory_mib":64,"console_log":"/c","bogus":1}"#;
        assert!(serde_json::from_str::<VmConfig>(bad).is_err());
        assert_eq!(parse_mac("02:00:00:00:00:0a"), Some([2, 0, 0, 0, 0, 10]));
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:0a:01"), None);
        assert_eq!(parse_mac("2:00:00:00:00:0a"), None);
    }
}
