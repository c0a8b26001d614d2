//! Pangolin's built-in VMM: one KVM microVM per process, booted from an ELF vmlinux via PVH,
//! with a serial console, i8042 reset and virtio-mmio devices (vsock, fs, net, blk, rng).
#![deny(missing_docs)]

pub mod api;
pub mod arch;
pub mod builder;
pub mod bus;
/// The VM configuration and control-socket types (the `pangolin-vmm-config` crate).
pub use pangolin_vmm_config as config;
pub mod devices;
pub mod jail;
pub mod lifecycle;
pub mod memory;
pub mod metrics;
pub mod resources;
pub mod seccomp;
pub mod snapshot;
pub mod vstate;
