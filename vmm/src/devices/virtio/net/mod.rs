//! virtio-net on a tap interface.
//!
//! virtio-net (device id 1) has a receive queue (the guest posts empty, device-writable buffers
//! the device fills with incoming frames) and a transmit queue (the guest posts device-readable
//! frames). Every frame in either direction starts with a 12-byte `virtio_net_hdr_v1`. With no
//! offloads negotiated the header carries nothing but `num_buffers`, and the tap is opened with
//! the same 12-byte vnet header, so a frame moves between a tap read/write and one descriptor
//! chain unchanged. The configuration space holds the MAC address, the link status (always up)
//! and `max_virtqueue_pairs` (1), plus the MTU when one is set.
//!
//! Layout: `tap` is the host side ([`TapBackend`], [`Tap`]), `rxtx` moves frames between it and
//! the queues, `device` is the virtio device and `event_handler` its event-loop subscriber.

mod device;
mod event_handler;
mod rxtx;
mod tap;
#[cfg(any(test, feature = "fuzzing"))]
pub mod test_utils;

use virtio_bindings::virtio_net;

pub use self::device::Net;
pub use self::rxtx::NetStats;
pub use self::tap::{Tap, TapBackend, TapError, VNET_HDR_LEN};
use super::feature;

/// Size of both queues.
pub const QUEUE_SIZE: u16 = 256;
/// `VIRTIO_NET_F_MTU`: the config space holds the MTU.
pub const VIRTIO_NET_F_MTU: u64 = feature(virtio_net::VIRTIO_NET_F_MTU);
/// `VIRTIO_NET_F_MAC`: the config space holds the MAC address.
pub const VIRTIO_NET_F_MAC: u64 = feature(virtio_net::VIRTIO_NET_F_MAC);
/// `VIRTIO_NET_F_STATUS`: the config space holds the link status.
pub const VIRTIO_NET_F_STATUS: u64 = feature(virtio_net::VIRTIO_NET_F_STATUS);

/// Index of the receive queue.
const RX: usize = 0;
/// Index of the transmit queue.
const TX: usize = 1;
/// Event-loop tokens.
const TOKEN_ACTIVATE: u32 = 0;
const TOKEN_RX_QUEUE: u32 = 1;
const TOKEN_TX_QUEUE: u32 = 2;
const TOKEN_TAP: u32 = 3;

/// The virtio-net device failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Creating an eventfd failed.
    #[error("eventfd")]
    EventFd(#[source] std::io::Error),
    /// Reading the tap failed for another reason than "empty".
    #[error("reading the tap")]
    TapRead(#[source] std::io::Error),
    /// The used ring could not be written.
    #[error("virtqueue")]
    Queue(#[source] virtio_queue::Error),
    /// A frame length does not fit the used ring's length field.
    #[error("frame too large")]
    FrameSize,
    /// Opening or configuring the tap failed.
    #[error("tap")]
    Tap(#[from] TapError),
}
