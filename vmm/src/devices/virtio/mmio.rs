//! virtio-mmio transport (not yet implemented).
