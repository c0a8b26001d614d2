//! virtio-fs (not yet implemented).
