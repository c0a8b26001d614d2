//! Pangolin's built-in VMM: one KVM microVM per process, booted from an ELF vmlinux via PVH,
//! with a serial console, i8042 reset and virtio-mmio devices (vsock, fs, net, blk, rng).
#![deny(missing_docs)]

pub mod arch;
pub mod bus;
pub mod devices;
pub mod memory;
