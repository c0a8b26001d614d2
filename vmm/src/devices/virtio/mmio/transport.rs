//! The transport proper: register reads and writes, reset and activation.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tracing::{debug, warn};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use super::persist::{PersistError, TransportState};
use super::regs;
use super::state::{QueueConfig, StatusAction, Transport};
use crate::bus::BusDevice;
use crate::devices::virtio::{
    feature, ActivateContext, ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemoryMmap;

/// Offset of `QueueNotify` in the window: register each queue's eventfd as an ioeventfd at
/// `base + queue_notify_offset()`, 4 bytes wide, matching the queue index as a `u32`.
pub const fn queue_notify_offset() -> u64 {
    regs::QUEUE_NOTIFY
}

/// One virtio device behind its MMIO register window; the VMM puts it on the MMIO bus at a
/// [`regs::WINDOW_SIZE`]-byte range.
pub struct MmioTransport {
    mem: GuestMemoryMmap,
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<Interrupt>,
    offered: u64,
    device_type: u32,
    state: Transport,
}

impl MmioTransport {
    /// A transport in the reset state for `device`, raising `interrupt`.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        let (offered, device_type, state) = {
            let dev = device.lock().unwrap_or_else(PoisonError::into_inner);
            let offered = dev.avail_features();
            if offered & VIRTIO_F_VERSION_1 == 0 {
                warn!(
                    device_type = dev.device_type(),
                    "virtio device does not offer VERSION_1"
                );
            }
            (
                offered,
                dev.device_type(),
                Transport::new(dev.queue_max_sizes()),
            )
        };
        Self {
            mem,
            device,
            interrupt,
            offered,
            device_type,
            state,
        }
    }

    /// The register state, for inspection and snapshots.
    pub fn state(&self) -> &Transport {
        &self.state
    }

    /// The device, so the VMM can register its queue eventfds as ioeventfds.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The interrupt line, so the VMM can register its irqfd.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The transport and its device for a snapshot of the paused VM.
    ///
    /// # Errors
    /// [`PersistError::Broken`] when the device needs a reset, or what the device reports when it
    /// cannot say where its queues stand.
    pub fn save(&mut self) -> Result<TransportState, PersistError> {
        let mut dev = self.lock_device();
        if self.state.needs_reset || dev.needs_reset() {
            return Err(PersistError::Broken);
        }
        let started = self.state.phase == super::state::Phase::DriverOk && !self.state.failed;
        let queues = if started {
            dev.queue_progress()?
        } else {
            Vec::new()
        };
        drop(dev);
        let state = TransportState {
            device_type: self.device_type,
            regs: self.state.clone(),
            interrupt_status: self.interrupt.status(),
            queues,
        };
        // The device's own answer is checked like a snapshot's would be at restore.
        state.check(
            self.device_type,
            self.lock_device().queue_max_sizes(),
            self.offered,
        )?;
        Ok(state)
    }

    /// Puts a freshly built transport (reset state, device just created from the same
    /// configuration) where `saved` was: registers and features, then, if the driver had started
    /// the device, re-activation with the saved queues at their saved positions, the device's
    /// [`VirtioDevice::after_restore`], one kick per queue and the pending interrupt bits.
    ///
    /// # Errors
    /// [`PersistError`] when the state does not fit this device or the device refuses it.
    pub fn restore(&mut self, saved: TransportState) -> Result<(), PersistError> {
        let sizes = self.lock_device().queue_max_sizes().to_vec();
        saved.check(self.device_type, &sizes, self.offered)?;
        let queues = if saved.starts_device() {
            Some(saved.queues(&self.mem)?)
        } else {
            None
        };
        let mut dev = self.lock_device();
        if saved.fixes_features() {
            dev.set_acked_features(saved.regs.driver_features);
        }
        if let Some(queues) = queues {
            dev.activate(ActivateContext {
                mem: self.mem.clone(),
                interrupt: self.interrupt.clone(),
                queues,
            })
            .map_err(PersistError::Activate)?;
            dev.after_restore();
            for evt in dev.queue_events() {
                evt.write(1)
                    .map_err(|e| PersistError::Activate(ActivateError::Event(e)))?;
            }
        }
        drop(dev);
        self.state = saved.regs;
        self.interrupt
            .restore_status(saved.interrupt_status)
            .map_err(|e| PersistError::Activate(ActivateError::Event(e)))
    }

    fn lock_device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.state.selected_queue();
        match offset {
            regs::MAGIC_VALUE => regs::MAGIC,
            regs::VERSION => regs::MMIO_VERSION,
            regs::DEVICE_ID => self.device_type,
            regs::VENDOR_ID => regs::VENDOR,
            regs::DEVICE_FEATURES => self.state.device_features(self.offered),
            regs::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size)),
            regs::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready)),
            regs::INTERRUPT_STATUS => self.interrupt.status(),
            regs::STATUS => {
                let failed_since = self.lock_device().needs_reset();
                self.state.status()
                    | if failed_since {
                        regs::status::DEVICE_NEEDS_RESET
                    } else {
                        0
                    }
            }
            regs::SHM_LEN_LOW | regs::SHM_LEN_HIGH => u32::MAX,
            regs::CONFIG_GENERATION => self.state.config_generation,
            _ => {
                debug!(
                    offset,
                    "virtio-mmio: read of unknown or write-only register"
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            regs::DEVICE_FEATURES_SEL => self.state.device_features_sel = value,
            regs::DRIVER_FEATURES => self.state.write_driver_features(value, self.offered),
            regs::DRIVER_FEATURES_SEL => self.state.driver_features_sel = value,
            regs::QUEUE_SEL => self.state.queue_sel = value,
            regs::QUEUE_NUM => {
                if let Some(q) = self.state.configurable_queue(false) {
                    q.size = u16::try_from(value).unwrap_or(0);
                }
            }
            regs::QUEUE_READY => {
                if let Some(q) = self.state.configurable_queue(true) {
                    q.ready = value == 1;
                }
            }
            regs::QUEUE_DESC_LOW => self.set_queue_address(|q| &mut q.desc, false, value),
            regs::QUEUE_DESC_HIGH => self.set_queue_address(|q| &mut q.desc, true, value),
            regs::QUEUE_DRIVER_LOW => self.set_queue_address(|q| &mut q.driver, false, value),
            regs::QUEUE_DRIVER_HIGH => self.set_queue_address(|q| &mut q.driver, true, value),
            regs::QUEUE_DEVICE_LOW => self.set_queue_address(|q| &mut q.device, false, value),
            regs::QUEUE_DEVICE_HIGH => self.set_queue_address(|q| &mut q.device, true, value),
            regs::QUEUE_NOTIFY => self.notify(value),
            regs::INTERRUPT_ACK => self.interrupt.ack(value),
            regs::STATUS => self.write_status(value),
            _ => debug!(
                offset,
                value, "virtio-mmio: write to unknown or read-only register"
            ),
        }
    }

    fn set_queue_address(&mut self, field: fn(&mut QueueConfig) -> &mut u64, high: bool, v: u32) {
        if let Some(q) = self.state.configurable_queue(false) {
            let addr = field(q);
            *addr = if high {
                (*addr & 0xffff_ffff) | (u64::from(v) << 32)
            } else {
                (*addr & !0xffff_ffff) | u64::from(v)
            };
        }
    }

    /// A kick that reached the transport instead of the ioeventfd: forward it to the eventfd.
    fn notify(&self, index: u32) {
        let dev = self.lock_device();
        let evt = usize::try_from(index)
            .ok()
            .and_then(|i| dev.queue_events().get(i));
        match evt {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    warn!(index, error = %e, "virtio-mmio: queue notify");
                }
            }
            None => debug!(index, "virtio-mmio: notify for unknown queue"),
        }
    }

    fn write_status(&mut self, value: u32) {
        // A device that failed after activation (on the event loop) is as broken as one whose
        // activation failed here.
        if self.lock_device().needs_reset() {
            self.state.needs_reset = true;
        }
        match self.state.write_status(value) {
            StatusAction::None => {}
            StatusAction::Reset => self.reset(),
            StatusAction::FeaturesOk => {
                let features = self.state.driver_features;
                self.lock_device().set_acked_features(features);
            }
            StatusAction::Activate => self.activate(),
        }
    }

    fn reset(&mut self) {
        let reset_ok = {
            let mut dev = self.lock_device();
            !dev.is_activated() || dev.reset()
        };
        if reset_ok {
            self.state.reset();
            self.interrupt.ack(u32::MAX);
        } else {
            warn!(
                device_type = self.device_type,
                "virtio-mmio: device cannot reset; left broken"
            );
            self.state.needs_reset = true;
        }
    }

    fn activate(&mut self) {
        let event_idx = self.state.driver_features & feature(VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.state.queues.len());
        for (index, config) in self.state.queues.iter().enumerate() {
            match config.build(&self.mem, event_idx) {
                Ok(q) => queues.push(q),
                Err(e) => {
                    warn!(device_type = self.device_type, index, error = %e, "virtio-mmio: bad queue");
                    return self.device_error();
                }
            }
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            interrupt: self.interrupt.clone(),
            queues,
        };
        let result = self.lock_device().activate(ctx);
        if let Err(e) = result {
            warn!(device_type = self.device_type, error = %e, "virtio-mmio: activation failed");
            self.device_error();
        }
    }

    fn device_error(&mut self) {
        self.state.needs_reset = true;
        if let Err(e) = self.interrupt.signal_config_change() {
            warn!(error = %e, "virtio-mmio: raising the config interrupt");
        }
    }

    /// Whether `[offset, offset + len)` lies in the configuration space of the window.
    fn config_offset(offset: u64, len: usize) -> Option<u64> {
        let end = offset.checked_add(u64::try_from(len).ok()?)?;
        (end <= regs::WINDOW_SIZE).then(|| offset - regs::CONFIG_SPACE)
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= regs::CONFIG_SPACE {
            match Self::config_offset(offset, data.len()) {
                Some(off) => self.lock_device().read_config(off, data),
                None => data.fill(0),
            }
            return;
        }
        let Ok(out) = <&mut [u8; 4]>::try_from(&mut *data) else {
            debug!(
                offset,
                len = data.len(),
                "virtio-mmio: register read not 32-bit"
            );
            data.fill(0);
            return;
        };
        *out = self.read_register(offset).to_le_bytes();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= regs::CONFIG_SPACE {
            match Self::config_offset(offset, data.len()) {
                Some(off) => self.lock_device().write_config(off, data),
                None => debug!(offset, "virtio-mmio: config write past the window"),
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            debug!(
                offset,
                len = data.len(),
                "virtio-mmio: register write not 32-bit"
            );
            return;
        };
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{QueueProgress, VIRTIO_MMIO_INT_CONFIG};
    use regs::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const FEATURES: u64 = VIRTIO_F_VERSION_1 | (1 << 3) | (1 << 33);
    const DRV: u32 = ACKNOWLEDGE | DRIVER;
    const FOK: u32 = DRV | FEATURES_OK;
    const DOK: u32 = FOK | DRIVER_OK;

    /// A device with two queues (16 and 8), an 8-byte config space and switchable failures.
    struct TestDevice {
        evts: Vec<EventFd>,
        acked: u64,
        config: [u8; 8],
        active_queues: Option<usize>,
        fail_activate: bool,
        can_reset: bool,
    }

    impl VirtioDevice for TestDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.evts
        }
        fn avail_features(&self) -> u64 {
            FEATURES
        }
        fn set_acked_features(&mut self, features: u64) {
            self.acked = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
                *b = at.and_then(|a| self.config.get(a)).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
                if let Some(slot) = at.and_then(|a| self.config.get_mut(a)) {
                    *slot = *b;
                }
            }
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::Event(std::io::Error::other("test")));
            }
            self.active_queues = Some(ctx.queues.len());
            Ok(())
        }
        fn is_activated(&self) -> bool {
            self.active_queues.is_some()
        }
        fn queue_progress(&mut self) -> Result<Vec<QueueProgress>, PersistError> {
            Ok(match self.active_queues {
                Some(n) => vec![
                    QueueProgress {
                        next_avail: 0,
                        next_used: 0
                    };
                    n
                ],
                None => Vec::new(),
            })
        }
        fn reset(&mut self) -> bool {
            if self.can_reset {
                self.active_queues = None;
            }
            self.can_reset
        }
    }

    struct Harness {
        t: MmioTransport,
        dev: Arc<Mutex<TestDevice>>,
    }

    fn harness() -> Harness {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mem");
        let evt = || EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let dev = Arc::new(Mutex::new(TestDevice {
            evts: vec![evt(), evt()],
            acked: 0,
            config: *b"abcdefgh",
            active_queues: None,
            fail_activate: false,
            can_reset: true,
        }));
        let interrupt = Arc::new(Interrupt::new(evt()));
        let t = MmioTransport::new(mem, dev.clone(), interrupt);
        Harness { t, dev }
    }

    impl Harness {
        fn r(&mut self, offset: u64) -> u32 {
            let mut b = [0u8; 4];
            self.t.read(offset, &mut b);
            u32::from_le_bytes(b)
        }
        fn w(&mut self, offset: u64, v: u32) {
            self.t.write(offset, &v.to_le_bytes());
        }
        fn dev(&self) -> std::sync::MutexGuard<'_, TestDevice> {
            self.dev.lock().expect("lock")
        }
        /// The Linux driver's sequence up to FEATURES_OK, accepting `features`.
        fn negotiate(&mut self, features: u64) {
            self.w(regs::STATUS, 0);
            self.w(regs::STATUS, ACKNOWLEDGE);
            self.w(regs::STATUS, DRV);
            for sel in 0..2u32 {
                self.w(regs::DRIVER_FEATURES_SEL, sel);
                let word = u32::try_from((features >> (32 * sel)) & 0xffff_ffff).expect("word");
                self.w(regs::DRIVER_FEATURES, word);
            }
            self.w(regs::STATUS, FOK);
        }
        fn setup_queue(&mut self, index: u32, size: u32, base: u64) {
            self.w(regs::QUEUE_SEL, index);
            assert_eq!(self.r(regs::QUEUE_READY), 0);
            self.w(regs::QUEUE_NUM, size);
            let parts = [
                (regs::QUEUE_DESC_LOW, base),
                (regs::QUEUE_DRIVER_LOW, base + 0x1000),
                (regs::QUEUE_DEVICE_LOW, base + 0x2000),
            ];
            for (low, addr) in parts {
                self.w(low, u32::try_from(addr & 0xffff_ffff).expect("low"));
                self.w(low + 4, u32::try_from(addr >> 32).expect("high"));
            }
            self.w(regs::QUEUE_READY, 1);
        }
    }

    #[test]
    fn identifies_as_a_modern_virtio_mmio_device() {
        let mut h = harness();
        assert_eq!(h.r(regs::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(h.r(regs::VERSION), 2);
        assert_eq!(h.r(regs::DEVICE_ID), 42);
        assert_eq!(h.r(regs::SHM_LEN_LOW), u32::MAX);
        h.w(regs::DEVICE_FEATURES_SEL, 1);
        assert_eq!(h.r(regs::DEVICE_FEATURES), 0b11);
        h.w(regs::DEVICE_FEATURES_SEL, 0);
        assert_eq!(h.r(regs::DEVICE_FEATURES), 1 << 3);
        h.w(regs::QUEUE_SEL, 1);
        assert_eq!(h.r(regs::QUEUE_NUM_MAX), 8);
        h.w(regs::QUEUE_SEL, 2);
        assert_eq!(h.r(regs::QUEUE_NUM_MAX), 0);
        assert_eq!(queue_notify_offset(), 0x50);
    }

    #[test]
    fn full_handshake_activates_with_all_queues() {
        let mut h = harness();
        h.negotiate(u64::MAX);
        assert_eq!(h.r(regs::STATUS), FOK);
        assert_eq!(h.dev().acked, FEATURES, "unoffered bits masked");
        h.setup_queue(0, 16, 0x1_0000);
        h.setup_queue(1, 4, 0x2_0000);
        h.w(regs::STATUS, DOK);
        assert_eq!(h.r(regs::STATUS), DOK);
        assert_eq!(h.dev().active_queues, Some(2));
        h.w(regs::QUEUE_SEL, 1);
        h.w(regs::QUEUE_NUM, 8);
        assert_eq!(
            h.t.state().queues[1].size,
            4,
            "no queue changes after DRIVER_OK"
        );
        // A kick that misses the ioeventfd still reaches the queue's eventfd.
        h.w(regs::QUEUE_NOTIFY, 1);
        assert_eq!(h.dev().evts[1].read().expect("kick"), 1);
        h.w(regs::QUEUE_NOTIFY, 9);
        // Interrupt status and acknowledgement.
        h.t.interrupt().signal_used_queue().expect("irq");
        assert_eq!(h.r(regs::INTERRUPT_STATUS), 1);
        h.w(regs::INTERRUPT_ACK, 1);
        assert_eq!(h.r(regs::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn features_ok_refused_without_version_1() {
        let mut h = harness();
        h.negotiate(1 << 3);
        assert_eq!(h.r(regs::STATUS), DRV);
        assert_eq!(h.dev().acked, 0);
        h.w(regs::STATUS, DOK);
        assert_eq!(h.dev().active_queues, None);
    }

    #[test]
    fn queue_writes_only_during_setup_and_while_not_ready() {
        let mut h = harness();
        h.w(regs::QUEUE_NUM, 4);
        assert_eq!(h.t.state().queues[0].size, 16, "before FEATURES_OK");
        h.negotiate(FEATURES);
        h.setup_queue(0, 8, 0x1_0000);
        h.w(regs::QUEUE_NUM, 4);
        h.w(regs::QUEUE_DESC_LOW, 0x5000);
        assert_eq!(h.t.state().queues[0].size, 8, "ready queue is frozen");
        assert_eq!(h.t.state().queues[0].desc, 0x1_0000);
        h.w(regs::QUEUE_READY, 0);
        h.w(regs::QUEUE_NUM, 4);
        assert_eq!(h.t.state().queues[0].size, 4);
        h.w(regs::QUEUE_NUM, 0x1_0000);
        assert_eq!(h.t.state().queues[0].size, 0, "oversized write is invalid");
    }

    fn activation_fails(setup: impl FnOnce(&mut Harness)) {
        let mut h = harness();
        h.negotiate(FEATURES);
        setup(&mut h);
        h.w(regs::STATUS, DOK);
        assert_eq!(h.dev().active_queues, None);
        assert_eq!(h.r(regs::STATUS), DOK | DEVICE_NEEDS_RESET);
        assert_eq!(h.r(regs::INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        // Reset clears the error and the driver can start over.
        h.w(regs::STATUS, 0);
        assert_eq!(h.r(regs::STATUS), 0);
        assert_eq!(h.r(regs::INTERRUPT_STATUS), 0);
        assert!(!h.t.state().queues[0].ready);
    }

    #[test]
    fn bad_queues_fail_activation() {
        activation_fails(|h| h.setup_queue(0, 16, 0x1_0000));
        activation_fails(|h| {
            h.setup_queue(0, 12, 0x1_0000);
            h.setup_queue(1, 8, 0x2_0000);
        });
        activation_fails(|h| {
            h.setup_queue(0, 16, 0x1_0000);
            h.setup_queue(1, 16, 0x2_0000);
        });
        activation_fails(|h| {
            h.setup_queue(0, 16, 0x1_0000);
            h.setup_queue(1, 8, 0xff_f000);
        });
        activation_fails(|h| {
            h.setup_queue(0, 16, 0x1_0000);
            h.setup_queue(1, 8, 0x1_0000_0000);
        });
        activation_fails(|h| {
            h.setup_queue(0, 16, 0x1_0004);
            h.setup_queue(1, 8, 0x2_0000);
        });
        activation_fails(|h| {
            h.setup_queue(0, 16, 0x1_0000);
            h.setup_queue(1, 8, 0x2_0000);
            h.dev().fail_activate = true;
        });
    }

    #[test]
    fn reset_returns_to_the_initial_state_or_marks_broken() {
        let mut h = harness();
        h.negotiate(FEATURES);
        h.setup_queue(0, 16, 0x1_0000);
        h.setup_queue(1, 8, 0x2_0000);
        h.w(regs::STATUS, DOK);
        h.w(regs::STATUS, 0);
        assert_eq!(h.dev().active_queues, None);
        assert_eq!(h.t.state(), &Transport::new(&[16, 8]));
        // A second life, then a device that cannot reset.
        h.negotiate(FEATURES);
        h.setup_queue(0, 16, 0x1_0000);
        h.setup_queue(1, 8, 0x2_0000);
        h.w(regs::STATUS, DOK);
        h.dev().can_reset = false;
        h.w(regs::STATUS, 0);
        assert_ne!(h.r(regs::STATUS) & DEVICE_NEEDS_RESET, 0);
        h.w(regs::STATUS, ACKNOWLEDGE);
        assert_eq!(
            h.r(regs::STATUS) & ACKNOWLEDGE,
            ACKNOWLEDGE,
            "still the old state"
        );
        assert_eq!(h.dev().active_queues, Some(2));
    }

    #[test]
    fn failed_is_sticky_until_reset() {
        let mut h = harness();
        h.w(regs::STATUS, ACKNOWLEDGE);
        h.w(regs::STATUS, ACKNOWLEDGE | FAILED);
        h.w(regs::STATUS, DRV);
        assert_eq!(h.r(regs::STATUS), ACKNOWLEDGE | FAILED);
        h.w(regs::STATUS, 0);
        assert_eq!(h.r(regs::STATUS), 0);
    }

    #[test]
    fn registers_need_32_bit_accesses() {
        let mut h = harness();
        let mut b = [0xffu8; 2];
        h.t.read(regs::MAGIC_VALUE, &mut b);
        assert_eq!(b, [0, 0]);
        let mut b = [0xffu8; 8];
        h.t.read(regs::MAGIC_VALUE, &mut b);
        assert_eq!(b, [0; 8]);
        h.t.write(regs::STATUS, &[1]);
        h.t.write(regs::STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(h.r(regs::STATUS), 0);
        assert_eq!(h.r(0x0f0), 0, "unknown register");
    }

    #[test]
    fn config_space_any_width_within_the_window() {
        let mut h = harness();
        let mut b = [0u8; 2];
        h.t.read(regs::CONFIG_SPACE + 1, &mut b);
        assert_eq!(&b, b"bc");
        let mut b = [0u8; 8];
        h.t.read(regs::CONFIG_SPACE, &mut b);
        assert_eq!(&b, b"abcdefgh");
        h.t.write(regs::CONFIG_SPACE + 7, b"Z");
        assert_eq!(&h.dev().config, b"abcdefgZ");
        let mut b = [0xffu8; 4];
        h.t.read(regs::CONFIG_SPACE + 6, &mut b);
        assert_eq!(&b, b"gZ\0\0", "past the device's config reads as zero");
        let mut b = [0xffu8; 8];
        h.t.read(regs::WINDOW_SIZE - 4, &mut b);
        assert_eq!(b, [0; 8], "past the window");
        h.t.write(regs::WINDOW_SIZE - 4, &[1; 8]);
        h.t.read(u64::MAX, &mut b);
        assert_eq!(b, [0; 8]);
    }
}
