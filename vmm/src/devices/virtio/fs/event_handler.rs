//! virtio-fs on the event loop: the activation eventfd (the rings go to the daemon here), the
//! daemon's call eventfds (turned into interrupts) and the vhost-user socket (hang-up only: the
//! daemon died).

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::VhostUserFs;
use super::{TOKEN_ACTIVATE, TOKEN_BACKEND, TOKEN_CALL};

impl MutEventSubscriber for VhostUserFs {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            TOKEN_ACTIVATE,
            EventSet::IN,
        )) {
            tracing::error!(error = ?e, "registering the virtio-fs activation eventfd");
        }
        // Hang-up only: replies on the socket are read by whoever sent the request.
        let fd = self.backend_fd();
        if let Err(e) = ops.add(Events::with_data_raw(
            fd,
            TOKEN_BACKEND,
            EventSet::READ_HANG_UP,
        )) {
            tracing::error!(error = ?e, "registering the virtiofsd socket");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => {
                if self.activate_evt.read().is_err() {
                    return;
                }
                match self.complete_activation() {
                    Ok(true) => self.register_calls(ops),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "virtio-fs activation failed; the device needs a reset")
                    }
                }
            }
            TOKEN_BACKEND => self.backend_gone(ops),
            token => {
                if let Some(index) = token
                    .checked_sub(TOKEN_CALL)
                    .and_then(|i| usize::try_from(i).ok())
                {
                    self.forward_call(index);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, SubscriberOps};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;
    use crate::devices::virtio::fs::handshake::{
        self, PROTOCOL_FEATURES_BIT, VIRTIO_RING_F_EVENT_IDX,
    };
    use crate::devices::virtio::fs::test_utils::{connect, queues, req, BACKEND_FEATURES};
    use crate::devices::virtio::{
        ActivateContext, ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
    };

    #[test]
    fn activation_hands_rings_over_and_forwards_calls() {
        let (fs, backend, mem) = connect(BACKEND_FEATURES);
        let fs = Arc::new(Mutex::new(fs));
        let mut ev = EventManager::<Arc<Mutex<VhostUserFs>>>::new().expect("event manager");
        ev.add_subscriber(fs.clone());
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("irq")));
        {
            let mut dev = fs.lock().expect("lock");
            dev.set_acked_features(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | (1 << 28));
            dev.activate(ActivateContext {
                mem: mem.clone(),
                interrupt: interrupt.clone(),
                queues: queues(&mem),
            })
            .expect("activate");
            assert!(dev.is_activated());
        }
        assert_eq!(ev.run_with_timeout(100).expect("run"), 1); // activation
                                                               // The daemon signals queue 1's call eventfd: the guest gets a used-buffer interrupt.
        backend.signal_call(1);
        assert_eq!(ev.run_with_timeout(1000).expect("run"), 1);
        assert_eq!(
            interrupt.status(),
            crate::devices::virtio::VIRTIO_MMIO_INT_VRING
        );
        assert_eq!(interrupt.irq_evt().read().expect("irq"), 1);

        // The daemon dies: noticed once, then the socket is no longer watched.
        let log = backend.finish();
        assert_eq!(ev.run_with_timeout(1000).expect("run"), 1);
        assert!(fs.lock().expect("lock").is_broken());
        assert_eq!(ev.run_with_timeout(50).expect("run"), 0);

        let after: Vec<(u32, u64)> = log
            .iter()
            .skip_while(|m| m.request != req::SET_MEM_TABLE)
            .skip(1)
            .map(|m| (m.request, m.u64_body().unwrap_or(0)))
            .collect();
        assert_eq!(
            after[0],
            (
                req::SET_FEATURES,
                VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | PROTOCOL_FEATURES_BIT
            )
        );
        let per_queue = [
            req::SET_VRING_NUM,
            req::SET_VRING_BASE,
            req::SET_VRING_ADDR,
            req::SET_VRING_CALL,
            req::SET_VRING_KICK,
            req::SET_VRING_ENABLE,
        ];
        let codes: Vec<u32> = after[1..].iter().map(|m| m.0).collect();
        assert_eq!(codes, [per_queue, per_queue].concat());
        // The ring addresses are this process's addresses of the guest rings.
        let addr = log
            .iter()
            .find(|m| m.request == req::SET_VRING_ADDR)
            .expect("addr");
        let desc = u64::from_le_bytes(addr.body[8..16].try_into().expect("8 bytes"));
        let want = handshake::host_address(&mem, 0x10_0000, 16).expect("host");
        assert_eq!(desc, want);
    }

    #[test]
    fn activation_after_the_daemon_died_fails() {
        let (fs, backend, mem) = connect(BACKEND_FEATURES);
        let fs = Arc::new(Mutex::new(fs));
        let mut ev = EventManager::<Arc<Mutex<VhostUserFs>>>::new().expect("event manager");
        ev.add_subscriber(fs.clone());
        drop(backend.finish());
        assert_eq!(ev.run_with_timeout(1000).expect("run"), 1);
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("irq")));
        let mut dev = fs.lock().expect("lock");
        let res = dev.activate(ActivateContext {
            mem: mem.clone(),
            interrupt,
            queues: queues(&mem),
        });
        assert!(matches!(res, Err(ActivateError::Backend(_))));
        assert!(!dev.is_activated());
    }
}
