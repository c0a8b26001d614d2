//! Virtio devices and their MMIO transport.
//!
//! A device is split the Firecracker way: the transport (`mmio`) owns the guest-visible registers
//! and queue configuration and runs on vCPU threads; the device itself owns its queues once
//! activated and runs on the event-loop thread as an `event_manager` subscriber. Activation crosses
//! threads through the device's `activate_evt`: the transport calls [`VirtioDevice::activate`]
//! (which stores queues and memory, then signals the eventfd), the event loop sees the eventfd and
//! the device registers its queue and backend fds there.
//!
//! Queue notifications never touch a vCPU thread after boot: each queue's [`EventFd`] is registered
//! with KVM as an ioeventfd on the transport's `QueueNotify` register. Interrupts go the other way
//! through [`Interrupt`]: set a bit in the interrupt status register, then signal the irqfd.

pub mod blk;
pub mod chain;
pub mod fs;
mod guest_errors;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod single_queue;
#[cfg(any(test, feature = "fuzzing"))]
pub mod test_utils;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

pub use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub use self::guest_errors::{GuestErrors, LOG_EVERY, LOG_FIRST};
pub use self::mmio::persist::{PersistError, QueueProgress, TransportState};
use crate::memory::GuestMemoryMmap;

/// The feature mask of virtio feature bit `bit` (virtio-bindings gives bit numbers).
pub const fn feature(bit: u32) -> u64 {
    1 << bit
}

/// Feature every modern device must offer (virtio 1.x, no legacy interface).
pub const VIRTIO_F_VERSION_1: u64 = feature(virtio_bindings::virtio_config::VIRTIO_F_VERSION_1);

/// A device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a different number of queues than the device has.
    #[error("device expects {expected} queues, driver configured {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues the transport passed.
        got: usize,
    },
    /// Signalling the event loop or a backend failed.
    #[error("activation event")]
    Event(#[source] std::io::Error),
    /// The device's backend refused (vhost-user handshake, tap, file).
    #[error("device backend: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The interrupt line of one virtio-mmio device, shared by its transport (which reads and
/// acknowledges the status) and the device (which raises it).
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irq_evt: EventFd,
}

impl Interrupt {
    /// An interrupt that signals `irq_evt` (registered with KVM as an irqfd).
    pub fn new(irq_evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irq_evt,
        }
    }

    /// Raises the line for used buffers (`VIRTIO_MMIO_INT_VRING`).
    pub fn signal_used_queue(&self) -> std::io::Result<()> {
        self.raise(VIRTIO_MMIO_INT_VRING)
    }

    /// Raises the line for a configuration change.
    pub fn signal_config_change(&self) -> std::io::Result<()> {
        self.raise(VIRTIO_MMIO_INT_CONFIG)
    }

    fn raise(&self, bit: u32) -> std::io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irq_evt.write(1)
    }

    /// The `InterruptStatus` register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// `InterruptACK`: clears the bits the driver handled.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// A restored VM's status bits: set again and, when any is set, the line raised again (the
    /// guest had not acknowledged them; a second interrupt for the same bits is harmless, a lost
    /// one would stall the device).
    pub fn restore_status(&self, bits: u32) -> std::io::Result<()> {
        self.status.store(bits, Ordering::SeqCst);
        if bits != 0 {
            self.irq_evt.write(1)?;
        }
        Ok(())
    }

    /// The irqfd, for registration with KVM.
    pub fn irq_evt(&self) -> &EventFd {
        &self.irq_evt
    }
}

/// What a device gets when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct ActivateContext {
    /// Guest memory (cheap to clone; shares the mapping).
    pub mem: GuestMemoryMmap,
    /// The device's interrupt line.
    pub interrupt: Arc<Interrupt>,
    /// The queues as the driver configured them, validated by the transport, in index order.
    pub queues: Vec<Queue>,
}

/// One virtio device, driven by a transport. Implementations also implement
/// `event_manager::MutEventSubscriber` to process their queues on the event-loop thread.
pub trait VirtioDevice: Send {
    /// The virtio device id (`virtio_bindings::virtio_ids`).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The notification eventfd of each queue, registered as ioeventfds before boot.
    fn queue_events(&self) -> &[EventFd];
    /// Features the device offers (must include [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;
    /// The driver's accepted features; the transport already dropped bits never offered.
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device configuration space; bytes outside it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space; writes outside it or to read-only fields are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's queues.
    ///
    /// # Errors
    /// [`ActivateError`] when the queues or the backend are unusable; the transport then sets
    /// DEVICE_NEEDS_RESET.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Whether the device is activated (or its activation is under way on the event loop).
    fn is_activated(&self) -> bool;
    /// Whether the device failed after the transport activated it (e.g. its backend refused
    /// the rings on the event loop, or went away): the transport then shows DEVICE_NEEDS_RESET.
    fn needs_reset(&self) -> bool {
        false
    }
    /// Driver reset: stops processing and forgets the queues; false if the device cannot reset
    /// (the transport then marks it broken).
    fn reset(&mut self) -> bool {
        false
    }
    /// Where each queue stands, in index order, for a snapshot of a paused VM (empty before
    /// activation). A device whose rings a backend owns asks the backend (virtio-fs: which stops
    /// the rings; a snapshotted VM is never resumed).
    ///
    /// # Errors
    /// [`PersistError`] when the device cannot say (its backend refused).
    fn queue_progress(&mut self) -> Result<Vec<QueueProgress>, PersistError>;
    /// Called once after a restore re-activated the device, before any vCPU runs: the device
    /// tells the guest what it lost of the host side (vsock: every connection).
    fn after_restore(&mut self) {}
}
