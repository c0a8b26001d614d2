//! virtio-rng: an entropy device (virtio 1.2 section 5.4; Linux `virtio_rng` / `hw_random`).
//!
//! One queue, no configuration space, no device features beyond VERSION_1. The driver posts
//! chains of device-writable buffers; the device fills them with random bytes and returns each
//! chain with the number of bytes written. We cap a request at [`MAX_REQUEST_BYTES`] (the driver
//! just asks again), and complete a malformed chain (a device-readable descriptor, memory outside
//! the guest, a loop) with zero bytes.
//!
//! Layout: `entropy` is where the bytes come from ([`EntropySource`], [`OsEntropy`]), `device`
//! the virtio device: a one-queue device
//! ([`SingleQueueDevice`](super::single_queue::SingleQueueDevice), which is also its event-loop
//! subscriber) around an [`RngHandler`].

mod device;
mod entropy;
#[cfg(any(test, feature = "fuzzing"))]
pub mod test_utils;

use std::io;

pub use self::device::{RequestError, Rng, RngHandler};
pub use self::entropy::{EntropySource, OsEntropy};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes handed out for one request.
pub const MAX_REQUEST_BYTES: u32 = 64 * 1024;

/// The device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// Creating an eventfd failed.
    #[error("creating an eventfd")]
    EventFd(#[source] io::Error),
}
