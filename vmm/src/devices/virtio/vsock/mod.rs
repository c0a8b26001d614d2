//! virtio-vsock with Firecracker's hybrid Unix-socket backend.
//!
//! Virtio-vsock carries stream connections between the guest (its context id, `guest_cid`) and the
//! host (cid 2) over three queues: the driver posts empty buffers on `rx` for packets to the
//! guest, sends its packets on `tx`, and `event` carries transport resets (sent once, after a restore). Every
//! packet starts with a 44-byte header (cids, ports, op, flags and credit counters); `OP_RW`
//! packets carry payload. Connections open with `REQUEST`/`RESPONSE`, close with `SHUTDOWN` and
//! `RST`, and flow control is credit based: each side advertises its buffer (`buf_alloc`) and how
//! much of it it has consumed (`fwd_cnt`), and never sends more than the peer has free.
//!
//! The host side is a Unix socket (`uds_path`), the hybrid protocol:
//! - host-initiated: a client connects to `uds_path`, writes `CONNECT <port>\n`; the device sends
//!   the guest a `REQUEST` for that port and, on `RESPONSE`, answers `OK <host port>\n`;
//! - guest-initiated: a `REQUEST` to port `P` connects to the Unix socket `<uds_path>_<P>`.
//!
//! Layout: [`packet`] parses and writes headers over guest memory, [`connection`] is one stream's
//! state machine and credit, [`unix`] the host sockets' handshakes, [`muxer`] routes packets and
//! socket events between them, `device` and `event_handler` tie it to the queues and event loop.

mod connection;
mod device;
mod event_handler;
mod muxer;
pub mod packet;
#[cfg(any(test, feature = "fuzzing"))]
pub mod test_utils;
mod unix;

pub use device::Vsock;
pub use event_handler::{FdRegistry, RegistryError};

/// The host's context id (virtio 1.2 section 5.10.4).
pub const VSOCK_HOST_CID: u64 = 2;
/// Index of the queue carrying packets to the guest.
pub const RX_QUEUE: usize = 0;
/// Index of the queue carrying packets from the guest.
pub const TX_QUEUE: usize = 1;
/// Index of the event queue (transport resets, after a restore).
pub const EVENT_QUEUE: usize = 2;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, the one event id (virtio 1.2 section 5.10.6.5).
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Largest payload of one packet, either direction (the Linux driver's own limit).
pub const MAX_PKT_PAYLOAD: u32 = 64 * 1024;
/// Buffer the device advertises to the guest per connection (`buf_alloc`).
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Consumed guest bytes after which the device tells the guest its new `fwd_cnt`.
pub const CREDIT_UPDATE_THRESHOLD: u32 = 64 * 1024;
/// Most connections (established, connecting or still sending `CONNECT`) at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Queued control packets past which the device stops reading the tx queue until the guest
/// drains rx (backpressure instead of an unbounded queue).
pub const MAX_CONTROL_PACKETS: usize = 256;
/// First local port handed to host-initiated connections.
pub const HOST_PORT_BASE: u32 = 1 << 30;

/// The vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// Binding or configuring the host Unix socket failed.
    #[error("binding the vsock socket")]
    Bind(#[source] std::io::Error),
    /// Creating an eventfd or the timer failed.
    #[error("vsock event file descriptor")]
    EventFd(#[source] std::io::Error),
    /// The guest cid is reserved (0, 1, 2 or `u32::MAX` and above).
    #[error("invalid guest cid {0}")]
    GuestCid(u64),
}
