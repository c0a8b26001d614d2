//! virtio-fs as a vhost-user frontend: the file system server is an external `virtiofsd`.
//!
//! virtio-fs (device id 26) carries FUSE requests over a `hiprio` queue and request queues; its
//! configuration space is a 36-byte mount tag and the number of request queues. Here the VMM does
//! none of the FUSE work. It talks vhost-user to the daemon over a Unix socket: at creation it
//! negotiates features and sends the memory table (guest RAM is memfd-backed, so the daemon maps
//! it); on activation it hands each vring over (size, start index, addresses, eventfds).
//!
//! Kicks go straight from KVM to the daemon: a queue's kick eventfd is the ioeventfd KVM signals
//! on the guest's `QueueNotify` write. Calls come back through the VMM: virtio-mmio needs the
//! interrupt status bit set before the irq fires, so the daemon signals one call eventfd per
//! queue and the event loop turns it into [`Interrupt::signal_used_queue`]. The event loop also
//! watches the socket for hang-up: a dead daemon breaks the device (logged once, no spinning).

//!
//! Layout: `handshake` holds the vhost-user messages, `device` the virtio device and
//! `event_handler` its event-loop subscriber (call forwarding, daemon hang-up).

mod device;
mod event_handler;
mod handshake;
#[cfg(test)]
mod test_utils;

pub use self::device::VhostUserFs;

/// Queue size of both queues (libvhost-user's maximum).
pub const QUEUE_SIZE: u16 = 1024;
/// hiprio + one request queue.
pub const NUM_QUEUES: usize = 2;
/// Length of the tag field of the configuration space.
pub const TAG_LEN: usize = 36;
// The configuration accepts the tags that fit.
const _: () = assert!(TAG_LEN == crate::config::MAX_FS_TAG_LEN);
/// Configuration space: tag, then `num_request_queues` (le32).
const CONFIG_LEN: usize = TAG_LEN + 4;

/// Event-loop token of the activation eventfd.
const TOKEN_ACTIVATE: u32 = 0;
/// Event-loop token of the vhost-user socket (hang-up only).
const TOKEN_BACKEND: u32 = 1;
/// Event-loop token of the first queue's call eventfd; queue `i` uses `TOKEN_CALL + i`.
const TOKEN_CALL: u32 = 2;

/// The virtio-fs device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty or longer than 36 bytes.
    #[error("virtio-fs tag must be 1 to 36 bytes")]
    Tag,
    /// Connecting to the daemon's socket failed.
    #[error("connecting to virtiofsd")]
    Connect(#[source] vhost::Error),
    /// A setup message failed.
    #[error("vhost-user handshake")]
    Handshake(#[source] vhost::Error),
    /// A vring message failed.
    #[error("vhost-user vring setup")]
    Vring(#[source] vhost::Error),
    /// The daemon does not offer `VIRTIO_F_VERSION_1`.
    #[error("virtiofsd does not offer VIRTIO_F_VERSION_1")]
    NoVersion1,
    /// The daemon serves fewer queues than the device has.
    #[error("virtiofsd serves only {0} queues")]
    TooFewQueues(u64),
    /// A guest memory region has no file the daemon could map.
    #[error("guest memory is not file-backed")]
    MemoryNotShared,
    /// A ring does not lie inside one guest memory region.
    #[error("vring at {0:#x} is outside guest memory")]
    RingAddress(u64),
    /// Creating an eventfd failed.
    #[error("eventfd")]
    EventFd(#[source] std::io::Error),
    /// The daemon went away earlier.
    #[error("virtiofsd connection is broken")]
    Broken,
    /// The daemon answered `GET_VRING_BASE` with an index beyond 16 bits.
    #[error("virtiofsd reported vring base {0}")]
    VringBase(u32),
}
