//! virtio-blk (not yet implemented).
