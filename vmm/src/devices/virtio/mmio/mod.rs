//! The virtio-mmio transport, version 2 (virtio 1.2 section 4.2; Linux driver `virtio_mmio`).
//!
//! Each device gets a 0x1000-byte window: 32-bit little-endian registers below 0x100, the
//! device's configuration space from 0x100. The driver finds the device by `MagicValue`, `Version`
//! and `DeviceID`, then walks the status register (see [`state`]): it reads the offered features
//! a 32-bit word at a time, writes back the ones it accepts, sets FEATURES_OK, configures each
//! queue (select it, set its size and ring addresses, mark it ready) and sets DRIVER_OK, at which
//! point the transport validates the queues and activates the device.
//!
//! Afterwards the driver kicks a queue by writing its index to `QueueNotify` (caught by an
//! ioeventfd, see [`queue_notify_offset`]) and the device raises the interrupt line; the driver
//! reads `InterruptStatus` and acknowledges it through `InterruptACK`. Writing 0 to `Status`
//! resets the device.
//!
//! [`persist`] saves and restores a transport with its device for VM snapshots.

pub mod persist;
pub mod regs;
pub mod state;
mod transport;

pub use self::state::{Phase, QueueConfig, QueueError, StatusAction, Transport};
pub use self::transport::{queue_notify_offset, MmioTransport};
