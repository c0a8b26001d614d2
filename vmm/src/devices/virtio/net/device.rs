//! The virtio-net device: configuration space, features, and the rx/tx passes it runs when the
//! event loop says a queue or the tap is ready.

use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::rxtx::{receive, transmit, NetStats, RxOutcome, MAX_TX_LEN, RX_BUF_LEN};
use super::tap::TapBackend;
use super::{
    NetError, QUEUE_SIZE, TOKEN_TAP, TX, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
};
use crate::devices::virtio::{
    ActivateContext, ActivateError, Interrupt, PersistError, QueueProgress, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemoryMmap;

// virtio-bindings makes every `#define` a u32; the status field is 16 bits.
const _: () = assert!(VIRTIO_NET_S_LINK_UP < 0x1_0000);
/// `VIRTIO_NET_S_LINK_UP`, the link status field's value (its low 16 bits: all of it).
const LINK_UP: u16 = {
    let [lo, hi, _, _] = VIRTIO_NET_S_LINK_UP.to_le_bytes();
    u16::from_le_bytes([lo, hi])
};
/// mac[6], status, max_virtqueue_pairs, mtu.
const CONFIG_LEN: usize = 12;

/// The queues and what they need, once the driver started the device.
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    rx: Queue,
    tx: Queue,
}

/// Where the device is in its life.
enum State {
    /// The driver has not started the device.
    Inactive,
    /// Frames flow.
    Active(Box<Active>),
    /// A fatal error (unwritable used ring, tap read error): the device stops, the VMM lives on.
    Broken,
}

/// A virtio-net device on a tap.
pub struct Net {
    tap: Box<dyn TapBackend>,
    config: [u8; CONFIG_LEN],
    avail_features: u64,
    acked_features: u64,
    pub(super) queue_evts: Vec<EventFd>,
    pub(super) activate_evt: EventFd,
    state: State,
    /// Whether the tap is registered with the event loop (not while the guest has no rx buffer).
    pub(super) rx_watching: bool,
    /// A frame from the tap on its way to the guest.
    rx_buf: Vec<u8>,
    /// A frame from the guest on its way to the tap (one buffer for every frame).
    tx_buf: Vec<u8>,
    stats: NetStats,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("acked_features", &self.acked_features)
            .field("rx_watching", &self.rx_watching)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Net {
    /// A device with MAC `mac` on `tap` (a [`Tap`], or a test backend).
    ///
    /// # Errors
    /// [`NetError::EventFd`] when eventfds cannot be created.
    pub fn new(tap: Box<dyn TapBackend>, mac: [u8; 6]) -> Result<Self, NetError> {
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        let new_evt = || EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd);
        Ok(Self {
            tap,
            config,
            avail_features: VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS,
            acked_features: 0,
            queue_evts: vec![new_evt()?, new_evt()?],
            activate_evt: new_evt()?,
            state: State::Inactive,
            rx_watching: false,
            rx_buf: vec![0; RX_BUF_LEN],
            tx_buf: vec![0; MAX_TX_LEN],
            stats: NetStats::default(),
        })
    }

    /// Advertises `mtu` to the guest (`VIRTIO_NET_F_MTU`); set the tap's MTU to match.
    pub fn with_mtu(mut self, mtu: u16) -> Self {
        self.config[10..12].copy_from_slice(&mtu.to_le_bytes());
        self.avail_features |= VIRTIO_NET_F_MTU;
        self
    }

    /// Frame and error counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Whether a fatal error stopped the device.
    pub fn is_broken(&self) -> bool {
        matches!(self.state, State::Broken)
    }

    fn config_len(&self) -> usize {
        if self.avail_features & VIRTIO_NET_F_MTU != 0 {
            CONFIG_LEN
        } else {
            CONFIG_LEN - 2
        }
    }

    pub(super) fn watch_tap(&mut self, ops: &mut EventOps, want: bool) {
        if want == self.rx_watching {
            return;
        }
        let fd = self.tap.raw_fd();
        let res = if want {
            ops.add(Events::with_data_raw(fd, TOKEN_TAP, EventSet::IN))
        } else {
            ops.remove(Events::empty_raw(fd))
        };
        match res {
            Ok(()) => self.rx_watching = want,
            Err(e) => tracing::error!(error = ?e, want, "virtio-net: (un)watching the tap"),
        }
    }

    fn fail(&mut self, ops: &mut EventOps, err: &NetError) {
        tracing::error!(error = %err, "virtio-net stops");
        self.state = State::Broken;
        self.watch_tap(ops, false);
    }

    pub(super) fn handle_rx(&mut self, ops: &mut EventOps) {
        let State::Active(active) = &mut self.state else {
            return;
        };
        let res = receive(
            &mut active.rx,
            &active.mem,
            &mut *self.tap,
            &mut self.rx_buf,
            &mut self.stats,
        );
        match res {
            Ok((outcome, used)) => {
                if used {
                    signal(&active.interrupt);
                }
                self.watch_tap(ops, outcome != RxOutcome::NoBuffers);
            }
            Err(e) => self.fail(ops, &e),
        }
    }

    pub(super) fn handle_tx(&mut self, ops: &mut EventOps) {
        let State::Active(active) = &mut self.state else {
            return;
        };
        let (tap, buf) = (&mut *self.tap, &mut self.tx_buf);
        match transmit(&mut active.tx, &active.mem, tap, buf, &mut self.stats) {
            Ok((more, used)) => {
                if used {
                    signal(&active.interrupt);
                }
                if more {
                    // Come back after the other ready events instead of looping here.
                    if let Err(e) = self.queue_evts[TX].write(1) {
                        tracing::warn!(error = %e, "virtio-net: re-arming tx");
                    }
                }
            }
            Err(e) => self.fail(ops, &e),
        }
    }
}

fn signal(interrupt: &Interrupt) {
    if let Err(e) = interrupt.signal_used_queue() {
        tracing::warn!(error = %e, "virtio-net interrupt");
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = self.config[..self.config_len()].get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Read-only for a virtio 1.x driver (the MAC is writable only for legacy ones).
        tracing::debug!(offset, "ignoring a write to the virtio-net config");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != 2 {
            return Err(ActivateError::QueueCount {
                expected: 2,
                got: ctx.queues.len(),
            });
        }
        let mut queues = ctx.queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::QueueCount {
                expected: 2,
                got: 0,
            });
        };
        self.state = State::Active(Box::new(Active {
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            rx,
            tx,
        }));
        self.activate_evt.write(1).map_err(ActivateError::Event)
    }

    fn is_activated(&self) -> bool {
        matches!(self.state, State::Active(_))
    }

    fn queue_progress(&mut self) -> Result<Vec<QueueProgress>, PersistError> {
        Ok(match &self.state {
            State::Active(a) => vec![QueueProgress::of(&a.rx), QueueProgress::of(&a.tx)],
            State::Inactive => Vec::new(),
            State::Broken => return Err(PersistError::Broken),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::net::test_utils::{pair, MAC};

    #[test]
    fn config_space_and_features() {
        let (tap, _host) = pair();
        let mut net = Net::new(Box::new(tap), MAC).expect("net");
        assert_eq!(net.device_type(), 1);
        assert_eq!(net.queue_max_sizes(), &[256, 256]);
        assert_eq!(
            net.avail_features(),
            VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
        );
        let mut data = [0xffu8; 12];
        net.read_config(0, &mut data);
        assert_eq!(&data, &[2, 0x50, 0x47, 0, 0, 1, 1, 0, 1, 0, 0, 0]);
        let mut status = [0u8; 2];
        net.read_config(6, &mut status);
        assert_eq!(status, [1, 0]);
        net.read_config(u64::MAX, &mut status);
        assert_eq!(status, [0, 0]);
        net.write_config(0, &[0; 6]);
        net.read_config(0, &mut data[..6]);
        assert_eq!(data[..6], MAC);
        // Offloads the driver might ack are never accepted.
        net.set_acked_features(
            VIRTIO_F_VERSION_1 | 1 /* CSUM */ | (1 << 11), /* HOST_TSO4 */
        );
        assert_eq!(net.acked_features, VIRTIO_F_VERSION_1);

        let (tap, _host) = pair();
        let net = Net::new(Box::new(tap), MAC).expect("net").with_mtu(1400);
        assert_ne!(net.avail_features() & VIRTIO_NET_F_MTU, 0);
        let mut mtu = [0u8; 2];
        net.read_config(10, &mut mtu);
        assert_eq!(u16::from_le_bytes(mtu), 1400);
    }
}
