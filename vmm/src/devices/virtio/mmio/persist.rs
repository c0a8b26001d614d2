//! Snapshot and restore of one virtio-mmio device: its registers, its interrupt status and
//! where each queue stands.
//!
//! What a device is made of splits in two. Everything the driver negotiated lives in the
//! transport and is saved as-is ([`Transport`] is plain data): the phase, the accepted features,
//! every queue's size and ring addresses. What the device itself adds at run time is only how far
//! it got in each ring ([`QueueProgress`], asked of the device, which may ask its backend). A
//! restored transport hands the device the same features and, when the driver had started it,
//! re-activates it with the saved queues moved to the saved positions, exactly the
//! [`VirtioDevice::activate`] call the driver's DRIVER_OK made, so a restored device takes the
//! same path as a booted one. Then it kicks every queue once (chains the guest queued before the
//! snapshot are served) and raises the interrupt again if the guest had not acknowledged it.
//!
//! A snapshot is trusted input (the host wrote it and checksummed it), but the state in it came
//! from a guest: the queue layout is validated again by [`QueueConfig::build`] and the features
//! against what this device offers.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};

use super::state::{Phase, QueueError, Transport};
use crate::devices::virtio::{feature, ActivateError};

/// How far a device got in one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueProgress {
    /// Index of the next available-ring entry the device will take.
    pub next_avail: u16,
    /// Index of the next used-ring entry the device will fill.
    pub next_used: u16,
}

impl QueueProgress {
    /// Where `queue` stands.
    pub fn of(queue: &Queue) -> Self {
        Self {
            next_avail: queue.next_avail(),
            next_used: queue.next_used(),
        }
    }

    /// Moves `queue` to this position.
    pub fn apply(self, queue: &mut Queue) {
        queue.set_next_avail(self.next_avail);
        queue.set_next_used(self.next_used);
    }
}

/// One device's transport in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// The virtio device id, checked against the device in the same slot at restore.
    pub device_type: u32,
    /// Every register.
    pub regs: Transport,
    /// `InterruptStatus`: bits raised and not yet acknowledged.
    pub interrupt_status: u32,
    /// Per queue, when the device was activated (empty otherwise).
    pub queues: Vec<QueueProgress>,
}

/// A device could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The slot holds another kind of device than the snapshot's.
    #[error("device type {found} in the snapshot, {expected} in this slot")]
    DeviceType {
        /// This slot's device.
        expected: u32,
        /// The snapshot's.
        found: u32,
    },
    /// The snapshot's queues are not this device's.
    #[error("snapshot queue sizes {found:?}, the device has {expected:?}")]
    QueueSizes {
        /// The device's maximum sizes.
        expected: Vec<u16>,
        /// The snapshot's.
        found: Vec<u16>,
    },
    /// The snapshot's driver accepted features this device does not offer.
    #[error("snapshot features {found:#x} beyond the offered {offered:#x}")]
    Features {
        /// What this device offers.
        offered: u64,
        /// What the snapshot says the driver accepted.
        found: u64,
    },
    /// The number of queue positions does not match the number of queues.
    #[error("positions for {found} queues, the device has {expected}")]
    Progress {
        /// Queues of the device.
        expected: usize,
        /// Positions in the snapshot (or reported by the device).
        found: usize,
    },
    /// A saved queue layout is unusable.
    #[error("snapshot queue {index}")]
    Queue {
        /// The queue.
        index: usize,
        /// What is wrong with it.
        #[source]
        source: QueueError,
    },
    /// The device refused re-activation.
    #[error("re-activating the device")]
    Activate(#[source] ActivateError),
    /// The device is broken (it needs a reset): it is no template material.
    #[error("the device needs a reset")]
    Broken,
    /// The device cannot be saved now (activation under way on the event loop).
    #[error("the device is not at rest: {0}")]
    Busy(&'static str),
    /// The device cannot be snapshotted at all.
    #[error("the device does not support snapshots")]
    Unsupported,
    /// The device's backend refused (virtio-fs: virtiofsd).
    #[error("the device's backend")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl TransportState {
    /// Checks that this state can be restored onto a device of `device_type` with these queue
    /// sizes offering `offered`.
    ///
    /// # Errors
    /// [`PersistError`] naming the first mismatch.
    pub fn check(
        &self,
        device_type: u32,
        queue_max_sizes: &[u16],
        offered: u64,
    ) -> Result<(), PersistError> {
        if self.device_type != device_type {
            return Err(PersistError::DeviceType {
                expected: device_type,
                found: self.device_type,
            });
        }
        let found: Vec<u16> = self.regs.queues.iter().map(|q| q.max_size).collect();
        if found != queue_max_sizes {
            return Err(PersistError::QueueSizes {
                expected: queue_max_sizes.to_vec(),
                found,
            });
        }
        if self.regs.driver_features & !offered != 0 {
            return Err(PersistError::Features {
                offered,
                found: self.regs.driver_features,
            });
        }
        let started = self.starts_device();
        let expected = if started { found.len() } else { 0 };
        if self.queues.len() != expected {
            return Err(PersistError::Progress {
                expected,
                found: self.queues.len(),
            });
        }
        Ok(())
    }

    /// Whether the driver had started the device (so restore re-activates it).
    pub fn starts_device(&self) -> bool {
        self.regs.phase == Phase::DriverOk && !self.regs.failed && !self.regs.needs_reset
    }

    /// Whether the driver had at least fixed the features (so restore passes them on).
    pub fn fixes_features(&self) -> bool {
        matches!(self.regs.phase, Phase::FeaturesOk | Phase::DriverOk)
    }

    /// The saved queues, built and moved to their saved positions.
    ///
    /// # Errors
    /// [`PersistError::Queue`] when a layout is unusable in `mem`.
    pub fn queues(&self, mem: &crate::memory::GuestMemoryMmap) -> Result<Vec<Queue>, PersistError> {
        let event_idx = self.regs.driver_features & feature(VIRTIO_RING_F_EVENT_IDX) != 0;
        self.regs
            .queues
            .iter()
            .zip(&self.queues)
            .enumerate()
            .map(|(index, (config, progress))| {
                let mut queue = config
                    .build(mem, event_idx)
                    .map_err(|source| PersistError::Queue { index, source })?;
                progress.apply(&mut queue);
                Ok(queue)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::super::regs::{self, status};
    use super::super::MmioTransport;
    use super::*;
    use crate::bus::BusDevice;
    use crate::devices::virtio::rng::test_utils::{memory, used, Counter};
    use crate::devices::virtio::rng::{Rng, QUEUE_SIZE};
    use crate::devices::virtio::test_utils::{raw as desc, WRITE};
    use crate::devices::virtio::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
    use crate::memory::GuestMemoryMmap;

    type Dev = Arc<Mutex<Rng<Counter>>>;

    fn transport(mem: &GuestMemoryMmap, start: u8) -> (MmioTransport, Dev) {
        let dev = Arc::new(Mutex::new(Rng::with_source(Counter(start)).expect("rng")));
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("irq")));
        let t = MmioTransport::new(mem.clone(), dev.clone(), irq);
        (t, dev)
    }

    fn write(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    /// Plays the Linux driver's probe: status walk, VERSION_1, the queue at `vq`'s rings.
    fn start(t: &mut MmioTransport, vq: &MockSplitQueue<'_, GuestMemoryMmap>) {
        let drv = status::ACKNOWLEDGE | status::DRIVER;
        write(t, regs::STATUS, status::ACKNOWLEDGE);
        write(t, regs::STATUS, drv);
        write(t, regs::DRIVER_FEATURES_SEL, 1);
        write(t, regs::DRIVER_FEATURES, 1);
        write(t, regs::STATUS, drv | status::FEATURES_OK);
        write(t, regs::QUEUE_SEL, 0);
        write(t, regs::QUEUE_NUM, u32::from(QUEUE_SIZE));
        let addr = |a: GuestAddress| u32::try_from(a.0).expect("low address");
        write(t, regs::QUEUE_DESC_LOW, addr(vq.desc_table_addr()));
        write(t, regs::QUEUE_DRIVER_LOW, addr(vq.avail_addr()));
        write(t, regs::QUEUE_DEVICE_LOW, addr(vq.used_addr()));
        write(t, regs::QUEUE_READY, 1);
        write(
            t,
            regs::STATUS,
            drv | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    #[test]
    fn a_restored_device_serves_the_next_request_as_the_original_would() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let (mut t, dev) = transport(&mem, 0);
        start(&mut t, &vq);
        vq.add_desc_chains(&[desc(0x10_0000, 8, WRITE, 0)], 0)
            .expect("chain");
        dev.lock().expect("lock").process_queue();
        assert_eq!(vq.used().idx().load(), 1);

        let saved = t.save().expect("save");
        assert_eq!(
            saved.queues,
            [QueueProgress {
                next_avail: 1,
                next_used: 1
            }]
        );
        assert_eq!(saved.interrupt_status, 1, "not acknowledged yet");
        let json = serde_json::to_string(&saved).expect("encode");
        let saved: TransportState = serde_json::from_str(&json).expect("decode");

        // The next request, queued after the snapshot: the restored device (its entropy
        // counter where the old one stopped) must fill it exactly as the old one does.
        vq.add_desc_chains(&[desc(0x20_0000, 4, WRITE, 0)], 1)
            .expect("chain");
        let (mut restored, rdev) = transport(&mem, 8);
        restored.restore(saved.clone()).expect("restore");
        assert_eq!(restored.state(), &saved.regs);
        assert_eq!(restored.interrupt().status(), 1);
        assert_eq!(restored.interrupt().irq_evt().read().ok(), Some(1));
        let mut r = rdev.lock().expect("lock");
        assert!(r.is_activated());
        assert_eq!(r.acked_features(), VIRTIO_F_VERSION_1);
        assert_eq!(r.queue_events()[0].read().ok(), Some(1), "kicked once");
        r.process_queue();
        assert_eq!(vq.used().idx().load(), 2);
        assert_eq!(used(&vq, 1), (1, 4));
        let got: [u8; 4] = mem.read_obj(GuestAddress(0x20_0000)).expect("read");
        drop(r);
        mem.write_obj([0u8; 4], GuestAddress(0x20_0000))
            .expect("clear");
        vq.used().idx().store(1);
        let mut d = dev.lock().expect("lock");
        d.process_queue();
        let want: [u8; 4] = mem.read_obj(GuestAddress(0x20_0000)).expect("read");
        assert_eq!(got, want);
        assert_eq!(used(&vq, 1), (1, 4));
    }

    #[test]
    fn a_device_the_driver_never_started_restores_unstarted() {
        let mem = memory();
        let (mut t, _dev) = transport(&mem, 0);
        write(&mut t, regs::STATUS, status::ACKNOWLEDGE);
        let saved = t.save().expect("save");
        assert!(saved.queues.is_empty());
        let (mut restored, rdev) = transport(&mem, 0);
        restored.restore(saved).expect("restore");
        assert_eq!(restored.state().status(), status::ACKNOWLEDGE);
        let r = rdev.lock().expect("lock");
        assert!(!r.is_activated());
        assert_eq!(r.queue_events()[0].read().ok(), None, "no kick");
    }

    #[test]
    fn states_that_do_not_fit_the_device_are_refused() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let (mut t, _dev) = transport(&mem, 0);
        start(&mut t, &vq);
        let good = t.save().expect("save");
        let restore = |s: TransportState| transport(&mem, 0).0.restore(s);

        let mut s = good.clone();
        s.device_type = 19;
        assert!(matches!(
            restore(s),
            Err(PersistError::DeviceType {
                expected: 4,
                found: 19
            })
        ));
        let mut s = good.clone();
        s.regs.queues[0].max_size = 128;
        assert!(matches!(restore(s), Err(PersistError::QueueSizes { .. })));
        let mut s = good.clone();
        s.regs.driver_features |= 1 << 40;
        assert!(matches!(restore(s), Err(PersistError::Features { .. })));
        let mut s = good.clone();
        s.queues.push(s.queues[0]);
        assert!(matches!(
            restore(s),
            Err(PersistError::Progress {
                expected: 1,
                found: 2
            })
        ));
        let mut s = good.clone();
        s.regs.queues[0].desc = 0x1001;
        assert!(matches!(
            restore(s),
            Err(PersistError::Queue { index: 0, .. })
        ));
        let mut s = good;
        s.regs.queues[0].device = 0x7fff_0000;
        assert!(matches!(
            restore(s),
            Err(PersistError::Queue { index: 0, .. })
        ));
    }

    #[test]
    fn a_broken_device_is_not_saved() {
        let mem = memory();
        let (mut t, _dev) = transport(&mem, 0);
        write(&mut t, regs::STATUS, status::ACKNOWLEDGE);
        write(&mut t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        // DRIVER_OK with no queue configured: activation fails, DEVICE_NEEDS_RESET.
        write(&mut t, regs::DRIVER_FEATURES_SEL, 1);
        write(&mut t, regs::DRIVER_FEATURES, 1);
        let fok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        write(&mut t, regs::STATUS, fok);
        write(&mut t, regs::STATUS, fok | status::DRIVER_OK);
        assert!(matches!(t.save(), Err(PersistError::Broken)));
    }
}
