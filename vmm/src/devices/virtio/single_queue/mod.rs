//! One-queue devices (virtio-rng, virtio-blk): everything but their requests.
//!
//! Such a device has one request queue and nothing else to watch: the driver posts a chain, the
//! device serves it and returns it with the number of bytes written. [`SingleQueueDevice`] is the
//! device (`device`: the queue's notification eventfd, the activation eventfd that hands the queue
//! to the event loop, the Inactive/Active state, feature negotiation and reset) and its event-loop
//! subscriber (`event_handler`); what differs between devices is a [`RequestHandler`]: the device
//! id, features, configuration space and how one chain is served.

mod device;
mod event_handler;

use std::fmt::Display;

use virtio_queue::DescriptorChain;

pub use self::device::SingleQueueDevice;
use crate::memory::GuestMemoryMmap;

/// What makes a one-queue device what it is.
pub trait RequestHandler: Send {
    /// The virtio device id (`virtio_bindings::virtio_ids`).
    const DEVICE_TYPE: u32;
    /// The device's name in logs.
    const NAME: &'static str;
    /// Largest size of the request queue.
    const QUEUE_SIZE: u16;
    /// Why a chain could not be served (it then completes with zero bytes).
    type Error: Display;

    /// Features the device offers (including `VIRTIO_F_VERSION_1`).
    fn avail_features(&self) -> u64;

    /// Reads the (read-only) configuration space; bytes outside it read as zero.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    /// Serves one chain; returns the bytes written into it (the used length).
    ///
    /// # Errors
    /// [`Self::Error`] when the chain cannot be served at all; nothing was written then.
    fn handle(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<u32, Self::Error>;
}
