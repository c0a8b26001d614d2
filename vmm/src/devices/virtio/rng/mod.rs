//! virtio-rng (not yet implemented).
