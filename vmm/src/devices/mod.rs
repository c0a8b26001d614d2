//! Emulated devices: legacy PC devices the kernel expects, and virtio devices.

pub mod legacy;
pub mod virtio;
