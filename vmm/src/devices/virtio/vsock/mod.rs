//! virtio-vsock (not yet implemented).
