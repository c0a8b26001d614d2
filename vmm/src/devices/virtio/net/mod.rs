//! virtio-net on a tap interface.
//!
//! virtio-net (device id 1) has a receive queue (the guest posts empty, device-writable buffers
//! the device fills with incoming frames) and a transmit queue (the guest posts device-readable
//! frames). Every frame in either direction starts with a 12-byte `virtio_net_hdr_v1`. With no
//! offloads negotiated the header carries nothing but `num_buffers`, and the tap is opened with
//! the same 12-byte vnet header, so a frame moves between a tap read/write and one descriptor
//! chain unchanged. The configuration space holds the MAC address, the link status (always up)
//! and `max_virtqueue_pairs` (1), plus the MTU when one is set.

mod chain;
mod rxtx;
mod tap;

#[cfg(test)]
mod test_tap;

use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use self::rxtx::NetStats;
use self::rxtx::{receive, transmit, RxOutcome, RX_BUF_LEN};
pub use self::tap::{Tap, TapBackend, TapError, VNET_HDR_LEN};
use super::{
    device_type, ActivateContext, ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemoryMmap;

/// Size of both queues.
pub const QUEUE_SIZE: u16 = 256;
/// `VIRTIO_NET_F_MTU`: the config space holds the MTU.
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
/// `VIRTIO_NET_F_MAC`: the config space holds the MAC address.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// `VIRTIO_NET_F_STATUS`: the config space holds the link status.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
/// `VIRTIO_NET_S_LINK_UP`.
const LINK_UP: u16 = 1;
/// mac[6], status, max_virtqueue_pairs, mtu.
const CONFIG_LEN: usize = 12;

const RX: usize = 0;
const TX: usize = 1;
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
    queue_evts: Vec<EventFd>,
    activate_evt: EventFd,
    state: State,
    /// Whether the tap is registered with the event loop (not while the guest has no rx buffer).
    rx_watching: bool,
    rx_buf: Vec<u8>,
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

    fn watch_tap(&mut self, ops: &mut EventOps, want: bool) {
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

    fn handle_rx(&mut self, ops: &mut EventOps) {
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

    fn handle_tx(&mut self, ops: &mut EventOps) {
        let State::Active(active) = &mut self.state else {
            return;
        };
        match transmit(&mut active.tx, &active.mem, &mut *self.tap, &mut self.stats) {
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
        device_type::NET
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
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            TOKEN_ACTIVATE,
            EventSet::IN,
        )) {
            tracing::error!(error = ?e, "registering the virtio-net activation eventfd");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => {
                if self.activate_evt.read().is_err() || !self.is_activated() {
                    return;
                }
                for (evt, token) in self.queue_evts.iter().zip([TOKEN_RX_QUEUE, TOKEN_TX_QUEUE]) {
                    if let Err(e) = ops.add(Events::with_data(evt, token, EventSet::IN)) {
                        tracing::error!(error = ?e, "registering a virtio-net queue eventfd");
                    }
                }
                self.watch_tap(ops, true);
            }
            TOKEN_RX_QUEUE if self.queue_evts[RX].read().is_ok() => self.handle_rx(ops),
            TOKEN_TX_QUEUE if self.queue_evts[TX].read().is_ok() => self.handle_tx(ops),
            TOKEN_TAP => {
                let set = events.event_set();
                if set.intersects(EventSet::ERROR | EventSet::HANG_UP)
                    && !set.contains(EventSet::IN)
                {
                    tracing::error!("virtio-net: the tap reported an error; rx stops");
                    self.watch_tap(ops, false);
                } else {
                    self.handle_rx(ops);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::VIRTIO_MMIO_INT_VRING;
    use event_manager::{EventManager, SubscriberOps};
    use std::sync::Mutex;
    use test_tap::{pair, Driver};
    use vm_memory::{Bytes, GuestAddress};

    const MAC: [u8; 6] = [0x02, 0x50, 0x47, 0x00, 0x00, 0x01];

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

    struct Setup<'a> {
        ev: EventManager<Arc<Mutex<Net>>>,
        net: Arc<Mutex<Net>>,
        rx: Driver<'a>,
        tx: Driver<'a>,
        interrupt: Arc<Interrupt>,
        host: std::os::unix::net::UnixDatagram,
    }

    fn setup(mem: &GuestMemoryMmap) -> Setup<'_> {
        let (tap, host) = pair();
        let net = Arc::new(Mutex::new(Net::new(Box::new(tap), MAC).expect("net")));
        let mut ev = EventManager::<Arc<Mutex<Net>>>::new().expect("event manager");
        ev.add_subscriber(net.clone());
        let rx = Driver::new(mem, 0x1_0000, QUEUE_SIZE);
        let tx = Driver::new(mem, 0x2_0000, QUEUE_SIZE);
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("irq")));
        net.lock()
            .expect("lock")
            .activate(ActivateContext {
                mem: mem.clone(),
                interrupt: interrupt.clone(),
                queues: vec![rx.queue(), tx.queue()],
            })
            .expect("activate");
        assert_eq!(ev.run_with_timeout(100).expect("run"), 1);
        Setup {
            ev,
            net,
            rx,
            tx,
            interrupt,
            host,
        }
    }

    fn kick(s: &Setup<'_>, queue: usize) {
        s.net.lock().expect("lock").queue_events()[queue]
            .write(1)
            .expect("kick");
    }

    #[test]
    fn rx_waits_for_buffers_without_spinning() {
        let mem = crate::memory::create(4).expect("memory");
        let mut s = setup(&mem);
        let frame = [7u8; 60];
        s.host.send(&frame).expect("send");
        // The tap is readable but the guest posted nothing: one pass, then the tap is unwatched.
        assert_eq!(s.ev.run_with_timeout(100).expect("run"), 1);
        assert!(!s.net.lock().expect("lock").rx_watching);
        assert_eq!(s.ev.run_with_timeout(50).expect("run"), 0);
        assert_eq!(s.interrupt.status(), 0);
        // The guest posts a buffer and kicks: the pending frame arrives.
        s.rx.add(&[(0x10_0000, 1526, true)]);
        kick(&s, RX);
        assert_eq!(s.ev.run_with_timeout(100).expect("run"), 1);
        assert_eq!(s.rx.used(&mem, 0), (0, 60));
        let mut got = [0u8; 60];
        mem.read_slice(&mut got, GuestAddress(0x10_0000))
            .expect("r");
        assert_eq!(&got[12..], &frame[12..]);
        assert_eq!(s.interrupt.status(), VIRTIO_MMIO_INT_VRING);
        assert_eq!(s.net.lock().expect("lock").stats().rx_frames, 1);
    }

    #[test]
    fn tx_kick_sends_and_interrupts() {
        let mem = crate::memory::create(4).expect("memory");
        let mut s = setup(&mem);
        mem.write_slice(&[9u8; 74], GuestAddress(0x10_0000))
            .expect("w");
        s.tx.add(&[(0x10_0000, 74, false)]);
        kick(&s, TX);
        assert_eq!(s.ev.run_with_timeout(100).expect("run"), 1);
        let mut got = [0u8; 100];
        assert_eq!(s.host.recv(&mut got).expect("frame"), 74);
        assert_eq!(s.tx.used_idx(&mem), 1);
        assert_eq!(s.interrupt.status(), VIRTIO_MMIO_INT_VRING);
        // Nothing left to do: the loop is idle.
        assert_eq!(s.ev.run_with_timeout(50).expect("run"), 0);
    }

    #[test]
    fn tap_read_error_stops_the_device_not_the_vmm() {
        struct Failing(EventFd);
        impl TapBackend for Failing {
            fn read_frame(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::from_raw_os_error(libc::EBADFD))
            }
            fn write_frame(&mut self, f: &[u8]) -> std::io::Result<usize> {
                Ok(f.len())
            }
            fn raw_fd(&self) -> std::os::fd::RawFd {
                std::os::fd::AsRawFd::as_raw_fd(&self.0)
            }
        }
        let mem = crate::memory::create(4).expect("memory");
        let evt = EventFd::new(EFD_NONBLOCK).expect("evt");
        evt.write(1).expect("readable forever");
        let tap = Failing(evt);
        let net = Arc::new(Mutex::new(Net::new(Box::new(tap), MAC).expect("net")));
        let mut ev = EventManager::<Arc<Mutex<Net>>>::new().expect("event manager");
        ev.add_subscriber(net.clone());
        let mut rx = Driver::new(&mem, 0x1_0000, QUEUE_SIZE);
        rx.add(&[(0x10_0000, 2048, true)]);
        let tx = Driver::new(&mem, 0x2_0000, QUEUE_SIZE);
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("irq")));
        net.lock()
            .expect("lock")
            .activate(ActivateContext {
                mem: mem.clone(),
                interrupt,
                queues: vec![rx.queue(), tx.queue()],
            })
            .expect("activate");
        assert_eq!(ev.run_with_timeout(100).expect("run"), 1);
        assert_eq!(ev.run_with_timeout(100).expect("run"), 1);
        assert!(net.lock().expect("lock").is_broken());
        // The ever-readable fd is no longer watched.
        assert_eq!(ev.run_with_timeout(50).expect("run"), 0);
        // The rx buffer was given back untouched (un-popped, not used).
        assert_eq!(rx.used_idx(&mem), 0);
    }
}
