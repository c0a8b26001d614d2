//! The built-in VMM's contract with the host side, as plain serde data: the [`VmConfig`] one
//! `pangolin-vmm` process boots (with its validation), the control-socket messages ([`api`]),
//! the descriptor handoff of a jailed VMM ([`handoff`]: its only I/O), and the [`Fingerprint`] of
//! what a snapshot was taken from ([`snapshot`]). No KVM: the shim links this crate instead of the
//! VMM.
#![deny(missing_docs)]

pub mod api;
pub mod handoff;
mod jail;
pub mod snapshot;
mod vm;

pub use jail::{InheritedFds, JailConfig, MIN_OPEN_FILES};
pub use snapshot::{sha256_file, Fingerprint, SnapshotFiles};

pub use vm::{
    parse_mac, BlkConfig, ConfigError, FsConfig, NetConfig, VmConfig, VsockConfig, MAX_FS_TAG_LEN,
    MAX_MEMORY_MIB, MAX_TAP_NAME_LEN, MAX_VCPUS, MAX_VIRTIO_DEVICES, MIN_MEMORY_MIB,
};
