//! virtio-blk on a raw image (virtio 1.2 section 5.2; Linux `virtio_blk`).
//!
//! One request queue. The configuration space starts with the capacity in 512-byte sectors and
//! `seg_max`, the most data buffers a request may carry. We offer FLUSH (the guest may cache
//! writes and asks for durability with a FLUSH request, served with `fdatasync`), SEG_MAX, and RO
//! for read-only images. Requests are IN (read), OUT (write), FLUSH and GET_ID (serial number);
//! see [`request`] for their layout and validation. I/O is synchronous on the event-loop thread.
//!
//! Layout: [`request`] parses and serves one request chain, `backend` is the disk behind the
//! device ([`DiskBackend`], [`FileDisk`]), `device` the virtio device: a one-queue device
//! ([`SingleQueueDevice`](super::single_queue::SingleQueueDevice), which is also its event-loop
//! subscriber) around a [`BlockHandler`].

mod backend;
mod device;
pub mod request;
#[cfg(any(test, feature = "fuzzing"))]
pub mod test_utils;

use std::io;

use virtio_bindings::virtio_blk;

pub use self::backend::{DiskBackend, FileDisk, ID_BYTES};
pub use self::device::{Block, BlockHandler};
use super::feature;

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;

/// Feature bit: `seg_max` in the configuration space is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = feature(virtio_blk::VIRTIO_BLK_F_SEG_MAX);
/// Feature bit: the disk is read-only.
pub const VIRTIO_BLK_F_RO: u64 = feature(virtio_blk::VIRTIO_BLK_F_RO);
/// Feature bit: FLUSH requests are supported.
pub const VIRTIO_BLK_F_FLUSH: u64 = feature(virtio_blk::VIRTIO_BLK_F_FLUSH);

/// The device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Opening the image failed.
    #[error("opening the disk image")]
    Open(#[source] io::Error),
    /// Creating an eventfd failed.
    #[error("creating an eventfd")]
    EventFd(#[source] io::Error),
}
