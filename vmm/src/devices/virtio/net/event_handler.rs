//! virtio-net on the event loop: activation registers the queue eventfds and the tap; queue
//! kicks and tap readability run the rx/tx passes. The tap is unwatched while the guest has no
//! rx buffer (no spinning on a readable tap) and after it reports an error.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Net;
use super::{RX, TOKEN_ACTIVATE, TOKEN_RX_QUEUE, TOKEN_TAP, TOKEN_TX_QUEUE, TX};
use crate::devices::virtio::VirtioDevice;

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
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, SubscriberOps};
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;
    use crate::devices::virtio::net::test_utils::{kick, setup, Driver, MAC};
    use crate::devices::virtio::net::{TapBackend, QUEUE_SIZE};
    use crate::devices::virtio::{ActivateContext, Interrupt, VIRTIO_MMIO_INT_VRING};

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
