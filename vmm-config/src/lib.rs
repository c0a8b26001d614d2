//! The built-in VMM's contract with the host side, as plain serde data: the [`VmConfig`] one
//! `pangolin-vmm` process boots (with its validation) and the control-socket messages ([`api`]).
//! No KVM, no I/O: the shim links this crate instead of the VMM.
#![deny(missing_docs)]

pub mod api;
mod jail;
mod vm;

pub use jail::{InheritedFds, JailConfig, MIN_OPEN_FILES};

pub use vm::{
    parse_mac, BlkConfig, ConfigError, FsConfig, NetConfig, VmConfig, VsockConfig, MAX_FS_TAG_LEN,
    MAX_MEMORY_MIB, MAX_TAP_NAME_LEN, MAX_VCPUS, MAX_VIRTIO_DEVICES, MIN_MEMORY_MIB,
};
