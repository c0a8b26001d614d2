//! The transport's register state as plain data (saved as-is by a snapshot), and the device
//! status state machine.
//!
//! The driver walks the status register one bit at a time: ACKNOWLEDGE, DRIVER, FEATURES_OK,
//! DRIVER_OK, each write repeating the bits already set. Writing 0 resets; setting FAILED means
//! the driver gave up. DEVICE_NEEDS_RESET is ours to set when activation fails. Anything else is
//! refused and leaves the state unchanged.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::regs::status;
use crate::devices::virtio::VIRTIO_F_VERSION_1;
use crate::memory::GuestMemoryMmap;

/// How far the driver got in initialising the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Status 0: just reset, the driver has not touched the device.
    Reset,
    /// ACKNOWLEDGE: the guest noticed the device.
    Acknowledged,
    /// DRIVER: a driver bound and negotiates features.
    Driver,
    /// FEATURES_OK: features are fixed; the driver configures the queues.
    FeaturesOk,
    /// DRIVER_OK: the device is live.
    DriverOk,
}

impl Phase {
    /// The status bits a driver has set to reach this phase.
    pub fn bits(self) -> u32 {
        match self {
            Phase::Reset => 0,
            Phase::Acknowledged => status::ACKNOWLEDGE,
            Phase::Driver => status::ACKNOWLEDGE | status::DRIVER,
            Phase::FeaturesOk => status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
            Phase::DriverOk => {
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK
            }
        }
    }

    fn next(self) -> Option<Phase> {
        match self {
            Phase::Reset => Some(Phase::Acknowledged),
            Phase::Acknowledged => Some(Phase::Driver),
            Phase::Driver => Some(Phase::FeaturesOk),
            Phase::FeaturesOk => Some(Phase::DriverOk),
            Phase::DriverOk => None,
        }
    }
}

/// What the transport must do with the device after a status write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusAction {
    /// Nothing (a step without device involvement, or a refused write).
    None,
    /// The driver wrote 0: reset the device.
    Reset,
    /// Features are accepted: pass them to the device.
    FeaturesOk,
    /// DRIVER_OK: validate the queues and activate the device.
    Activate,
}

/// One queue as the driver configured it through the registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    /// `QueueNumMax`, from the device.
    pub max_size: u16,
    /// `QueueNum`; 0 if the driver wrote a value that does not fit 16 bits.
    pub size: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring ("driver area") address.
    pub driver: u64,
    /// Used ring ("device area") address.
    pub device: u64,
}

/// A queue configuration the device cannot use.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The driver never set `QueueReady`.
    #[error("queue not ready")]
    NotReady,
    /// Size zero, not a power of two, or above the maximum.
    #[error("invalid queue size {0}")]
    Size(u16),
    /// A ring address is misaligned or the maximum size is invalid.
    #[error("invalid queue layout")]
    Layout(#[source] virtio_queue::Error),
    /// The rings do not lie in guest memory.
    #[error("queue rings outside guest memory")]
    OutOfMemory,
}

impl QueueConfig {
    /// A queue in its reset state.
    pub fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// Builds the queue the device will use, checking size, alignment and that every ring lies in
    /// `mem`.
    ///
    /// # Errors
    /// [`QueueError`] naming the first problem.
    pub fn build(&self, mem: &GuestMemoryMmap, event_idx: bool) -> Result<Queue, QueueError> {
        if !self.ready {
            return Err(QueueError::NotReady);
        }
        let mut queue = Queue::new(self.max_size).map_err(QueueError::Layout)?;
        queue
            .try_set_size(self.size)
            .map_err(|_| QueueError::Size(self.size))?;
        queue
            .try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(QueueError::Layout)?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(QueueError::Layout)?;
        queue
            .try_set_used_ring_address(GuestAddress(self.device))
            .map_err(QueueError::Layout)?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(mem) {
            return Err(QueueError::OutOfMemory);
        }
        Ok(queue)
    }
}

/// Every guest-visible register of one transport, as plain data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transport {
    /// Initialisation progress.
    pub phase: Phase,
    /// The driver set FAILED.
    pub failed: bool,
    /// We set DEVICE_NEEDS_RESET (activation failed or the device could not reset).
    pub needs_reset: bool,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// Features the driver accepted, already masked to the offered ones.
    pub driver_features: u64,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// Per-queue configuration, in index order.
    pub queues: Vec<QueueConfig>,
    /// `ConfigGeneration`.
    pub config_generation: u32,
}

impl Transport {
    /// The reset state for a device with these queue maximum sizes.
    pub fn new(queue_max_sizes: &[u16]) -> Self {
        Self {
            phase: Phase::Reset,
            failed: false,
            needs_reset: false,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues: queue_max_sizes
                .iter()
                .map(|&m| QueueConfig::new(m))
                .collect(),
            config_generation: 0,
        }
    }

    /// Back to the reset state (the configuration generation keeps counting).
    pub fn reset(&mut self) {
        let generation = self.config_generation;
        let sizes: Vec<u16> = self.queues.iter().map(|q| q.max_size).collect();
        *self = Self::new(&sizes);
        self.config_generation = generation;
    }

    /// The `Status` register.
    pub fn status(&self) -> u32 {
        let mut bits = self.phase.bits();
        if self.failed {
            bits |= status::FAILED;
        }
        if self.needs_reset {
            bits |= status::DEVICE_NEEDS_RESET;
        }
        bits
    }

    /// Applies a driver write to `Status` and says what the device must do.
    pub fn write_status(&mut self, value: u32) -> StatusAction {
        if value == 0 {
            return StatusAction::Reset;
        }
        if value & status::FAILED != 0 {
            self.failed = true;
            return StatusAction::None;
        }
        let next = self.phase.next();
        let Some(next) = next.filter(|n| !self.failed && !self.needs_reset && value == n.bits())
        else {
            tracing::debug!(
                value,
                status = self.status(),
                "virtio-mmio: refused status write"
            );
            return StatusAction::None;
        };
        match next {
            Phase::FeaturesOk if self.driver_features & VIRTIO_F_VERSION_1 == 0 => {
                tracing::warn!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1");
                StatusAction::None
            }
            Phase::FeaturesOk => {
                self.phase = next;
                StatusAction::FeaturesOk
            }
            Phase::DriverOk => {
                self.phase = next;
                StatusAction::Activate
            }
            _ => {
                self.phase = next;
                StatusAction::None
            }
        }
    }

    /// The `DeviceFeatures` word selected by `DeviceFeaturesSel`.
    pub fn device_features(&self, offered: u64) -> u32 {
        feature_word(offered, self.device_features_sel)
    }

    /// A driver write to `DriverFeatures`: only while negotiating, masked to `offered`.
    pub fn write_driver_features(&mut self, value: u32, offered: u64) {
        if self.phase != Phase::Driver || self.failed || self.needs_reset {
            tracing::debug!(
                value,
                "virtio-mmio: feature write outside negotiation ignored"
            );
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            _ => return,
        };
        let masked = (u64::from(value) << shift) & offered;
        let word_mask = 0xffff_ffff_u64 << shift;
        self.driver_features = (self.driver_features & !word_mask) | masked;
    }

    /// The queue picked by `QueueSel`, if it exists.
    pub fn selected_queue(&self) -> Option<&QueueConfig> {
        usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get(i))
    }

    /// The selected queue if the driver may change its configuration now: after FEATURES_OK,
    /// before DRIVER_OK, and (unless `for_ready`) while the queue is not ready.
    pub fn configurable_queue(&mut self, for_ready: bool) -> Option<&mut QueueConfig> {
        if self.phase != Phase::FeaturesOk || self.failed || self.needs_reset {
            tracing::debug!("virtio-mmio: queue write outside queue setup ignored");
            return None;
        }
        let index = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(index).filter(|q| for_ready || !q.ready)
    }
}

/// The 32-bit word `sel` of a 64-bit feature set (0 beyond the second word).
fn feature_word(features: u64, sel: u32) -> u32 {
    let word = match sel {
        0 => features,
        1 => features >> 32,
        _ => 0,
    };
    u32::try_from(word & 0xffff_ffff).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACK: u32 = status::ACKNOWLEDGE;
    const DRV: u32 = ACK | status::DRIVER;
    const FOK: u32 = DRV | status::FEATURES_OK;
    const DOK: u32 = FOK | status::DRIVER_OK;

    #[test]
    fn walks_the_status_sequence_and_refuses_skips() {
        let mut t = Transport::new(&[8]);
        assert_eq!(t.write_status(DRV), StatusAction::None, "skip ACKNOWLEDGE");
        assert_eq!(t.status(), 0);
        assert_eq!(t.write_status(ACK), StatusAction::None);
        assert_eq!(t.write_status(DOK), StatusAction::None, "skip to DRIVER_OK");
        assert_eq!(t.status(), ACK);
        assert_eq!(t.write_status(DRV), StatusAction::None);
        assert_eq!(
            t.write_status(FOK),
            StatusAction::None,
            "VERSION_1 not accepted"
        );
        assert_eq!(t.status(), DRV);
        t.write_driver_features(1, VIRTIO_F_VERSION_1);
        assert_eq!(
            t.write_status(FOK),
            StatusAction::None,
            "bit 0 is not VERSION_1"
        );
        t.driver_features_sel = 1;
        t.write_driver_features(1, VIRTIO_F_VERSION_1);
        assert_eq!(t.write_status(FOK), StatusAction::FeaturesOk);
        assert_eq!(t.write_status(DRV), StatusAction::None, "clearing bits");
        assert_eq!(t.write_status(DOK), StatusAction::Activate);
        assert_eq!(t.status(), DOK);
        assert_eq!(t.write_status(DOK), StatusAction::None);
        assert_eq!(t.write_status(0), StatusAction::Reset);
    }

    #[test]
    fn failed_and_needs_reset_block_progress() {
        let mut t = Transport::new(&[8]);
        t.write_status(ACK);
        t.write_status(ACK | status::FAILED);
        assert_eq!(t.status(), ACK | status::FAILED);
        assert_eq!(t.write_status(DRV), StatusAction::None);
        t.reset();
        t.needs_reset = true;
        assert_eq!(t.write_status(ACK), StatusAction::None);
        assert_eq!(t.status(), status::DEVICE_NEEDS_RESET);
    }

    #[test]
    fn features_are_masked_per_word_and_only_while_negotiating() {
        let offered = VIRTIO_F_VERSION_1 | 0b101;
        let mut t = Transport::new(&[8]);
        t.write_driver_features(0xffff_ffff, offered);
        assert_eq!(t.driver_features, 0, "before DRIVER");
        t.write_status(ACK);
        t.write_status(DRV);
        t.write_driver_features(0xffff_ffff, offered);
        t.driver_features_sel = 1;
        t.write_driver_features(0xffff_ffff, offered);
        t.driver_features_sel = 7;
        t.write_driver_features(0xffff_ffff, offered);
        assert_eq!(t.driver_features, offered);
        t.device_features_sel = 1;
        assert_eq!(t.device_features(offered), 1);
        t.device_features_sel = 2;
        assert_eq!(t.device_features(offered), 0);
    }

    #[test]
    fn queue_build_checks_size_alignment_and_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("mem");
        let good = QueueConfig {
            max_size: 16,
            size: 16,
            ready: true,
            desc: 0x1000,
            driver: 0x2000,
            device: 0x3000,
        };
        assert!(good.build(&mem, false).is_ok());
        let cases = [
            QueueConfig {
                ready: false,
                ..good.clone()
            },
            QueueConfig {
                size: 0,
                ..good.clone()
            },
            QueueConfig {
                size: 12,
                ..good.clone()
            },
            QueueConfig {
                size: 32,
                ..good.clone()
            },
            QueueConfig {
                desc: 0x1008,
                ..good.clone()
            },
            QueueConfig {
                driver: 0x2001,
                ..good.clone()
            },
            QueueConfig {
                device: 0x3002,
                ..good.clone()
            },
            QueueConfig {
                device: 0xfffc,
                ..good.clone()
            },
            QueueConfig {
                desc: u64::MAX - 15,
                ..good.clone()
            },
        ];
        for case in cases {
            assert!(case.build(&mem, false).is_err(), "{case:?}");
        }
    }
}
