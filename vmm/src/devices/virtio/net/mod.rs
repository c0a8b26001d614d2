//! virtio-net (not yet implemented).
