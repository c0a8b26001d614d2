//! virtio-fs as a vhost-user frontend: the file system server is an external `virtiofsd`.
//!
//! virtio-fs (device id 26) carries FUSE requests over a `hiprio` queue and request queues; its
//! configuration space is a 36-byte mount tag and the number of request queues. Here the VMM does
//! none of the FUSE work. It talks vhost-user to the daemon over a Unix socket: at creation it
//! negotiates features and sends the memory table (guest RAM is memfd-backed, so the daemon maps
//! it); on activation it hands each vring over (size, start index, addresses, eventfds).
//!
//! Kicks go straight from KVM to the daemon: a queue's kick eventfd is the ioeventfd KVM signals
//! on the guest's `QueueNotify` write. Calls come back through the VMM: virtio-mmio needs the
//! interrupt status bit set before the irq fires, so the daemon signals one call eventfd per
//! queue and the event loop turns it into [`Interrupt::signal_used_queue`]. The event loop also
//! watches the socket for hang-up: a dead daemon breaks the device (logged once, no spinning).

mod handshake;

#[cfg(test)]
mod fake_backend;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vhost::vhost_user::Frontend;
use vhost::VhostBackend;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::handshake::{connect_handshake, start_vring, Negotiated};
use super::{device_type, ActivateContext, ActivateError, Interrupt, VirtioDevice};
use crate::memory::GuestMemoryMmap;

/// Queue size of both queues (libvhost-user's maximum).
pub const QUEUE_SIZE: u16 = 1024;
/// hiprio + one request queue.
pub const NUM_QUEUES: usize = 2;
/// Length of the tag field of the configuration space.
pub const TAG_LEN: usize = 36;
/// Configuration space: tag, then `num_request_queues` (le32).
const CONFIG_LEN: usize = TAG_LEN + 4;

/// Event-loop token of the activation eventfd.
const TOKEN_ACTIVATE: u32 = 0;
/// Event-loop token of the vhost-user socket (hang-up only).
const TOKEN_BACKEND: u32 = 1;
/// Event-loop token of the first queue's call eventfd; queue `i` uses `TOKEN_CALL + i`.
const TOKEN_CALL: u32 = 2;

/// The virtio-fs device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty or longer than 36 bytes.
    #[error("virtio-fs tag must be 1 to 36 bytes")]
    Tag,
    /// Connecting to the daemon's socket failed.
    #[error("connecting to virtiofsd")]
    Connect(#[source] vhost::Error),
    /// A setup message failed.
    #[error("vhost-user handshake")]
    Handshake(#[source] vhost::Error),
    /// A vring message failed.
    #[error("vhost-user vring setup")]
    Vring(#[source] vhost::Error),
    /// The daemon does not offer `VIRTIO_F_VERSION_1`.
    #[error("virtiofsd does not offer VIRTIO_F_VERSION_1")]
    NoVersion1,
    /// The daemon serves fewer queues than the device has.
    #[error("virtiofsd serves only {0} queues")]
    TooFewQueues(u64),
    /// A guest memory region has no file the daemon could map.
    #[error("guest memory is not file-backed")]
    MemoryNotShared,
    /// A ring does not lie inside one guest memory region.
    #[error("vring at {0:#x} is outside guest memory")]
    RingAddress(u64),
    /// Creating an eventfd failed.
    #[error("eventfd")]
    EventFd(#[source] std::io::Error),
    /// The daemon went away earlier.
    #[error("virtiofsd connection is broken")]
    Broken,
}

/// Where the device is in its life.
#[derive(Debug)]
enum State {
    /// Connected and negotiated; the driver has not started the device.
    Ready,
    /// The daemon owns the rings; calls are forwarded to this interrupt line.
    Active {
        /// The device's interrupt line.
        interrupt: Arc<Interrupt>,
    },
    /// The daemon died or a vring setup failed half way; nothing more is done.
    Broken,
}

/// A virtio-fs device backed by a vhost-user daemon.
pub struct VhostUserFs {
    frontend: Frontend,
    negotiated: Negotiated,
    config: [u8; CONFIG_LEN],
    acked_features: u64,
    queue_evts: Vec<EventFd>,
    call_evts: Vec<EventFd>,
    activate_evt: EventFd,
    state: State,
}

impl std::fmt::Debug for VhostUserFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserFs")
            .field("negotiated", &self.negotiated)
            .field("acked_features", &self.acked_features)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl VhostUserFs {
    /// Connects to the daemon at `socket`, negotiates, and sends it the memory table of `mem`
    /// (which must be memfd-backed, see [`crate::memory::create`]).
    ///
    /// # Errors
    /// [`FsError`] when the tag is invalid, the socket is unreachable or the daemon refuses.
    pub fn new(socket: &Path, tag: &str, mem: &GuestMemoryMmap) -> Result<Self, FsError> {
        let config = config_space(tag)?;
        let max_queues = u64::try_from(NUM_QUEUES).map_err(|_| FsError::Tag)?;
        let mut frontend = Frontend::connect(socket, max_queues).map_err(FsError::Connect)?;
        let negotiated = connect_handshake(&mut frontend, mem, NUM_QUEUES)?;
        let new_evt = || EventFd::new(EFD_NONBLOCK).map_err(FsError::EventFd);
        Ok(Self {
            frontend,
            negotiated,
            config,
            acked_features: 0,
            queue_evts: (0..NUM_QUEUES)
                .map(|_| new_evt())
                .collect::<Result<_, _>>()?,
            call_evts: (0..NUM_QUEUES)
                .map(|_| new_evt())
                .collect::<Result<_, _>>()?,
            activate_evt: new_evt()?,
            state: State::Ready,
        })
    }

    /// Whether the daemon went away (or a vring setup failed); the device then does nothing.
    pub fn is_broken(&self) -> bool {
        matches!(self.state, State::Broken)
    }

    fn start_vrings(&mut self, ctx: &ActivateContext) -> Result<(), FsError> {
        self.frontend
            .set_features(self.negotiated.backend_ack(self.acked_features))
            .map_err(FsError::Handshake)?;
        for (index, queue) in ctx.queues.iter().enumerate() {
            let (Some(kick), Some(call)) = (self.queue_evts.get(index), self.call_evts.get(index))
            else {
                return Err(FsError::TooFewQueues(u64::try_from(index).unwrap_or(0)));
            };
            start_vring(
                &mut self.frontend,
                self.negotiated,
                &ctx.mem,
                index,
                queue,
                kick,
                call,
            )?;
        }
        Ok(())
    }

    fn backend_gone(&mut self, ops: &mut EventOps) {
        tracing::error!("virtiofsd closed its vhost-user socket; virtio-fs stops");
        self.state = State::Broken;
        let fd = self.frontend.as_raw_fd();
        if let Err(e) = ops.remove(Events::empty_raw(fd)) {
            tracing::warn!(error = ?e, "unregistering the virtiofsd socket");
        }
    }

    fn forward_call(&self, index: usize) {
        let Some(evt) = self.call_evts.get(index) else {
            return;
        };
        // Non-blocking: a spurious wakeup reads EAGAIN and is harmless.
        if evt.read().is_err() {
            return;
        }
        if let State::Active { interrupt } = &self.state {
            if let Err(e) = interrupt.signal_used_queue() {
                tracing::warn!(error = %e, "virtio-fs interrupt");
            }
        }
    }

    fn register_calls(&self, ops: &mut EventOps) {
        for (evt, token) in self.call_evts.iter().zip(TOKEN_CALL..) {
            if let Err(e) = ops.add(Events::with_data(evt, token, EventSet::IN)) {
                tracing::error!(error = ?e, "registering a virtio-fs call eventfd");
            }
        }
    }
}

/// The configuration space for `tag`: NUL-padded tag, one request queue.
fn config_space(tag: &str) -> Result<[u8; CONFIG_LEN], FsError> {
    let bytes = tag.as_bytes();
    if bytes.is_empty() || bytes.len() > TAG_LEN {
        return Err(FsError::Tag);
    }
    let mut config = [0u8; CONFIG_LEN];
    config[..bytes.len()].copy_from_slice(bytes);
    config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
    Ok(config)
}

impl VirtioDevice for VhostUserFs {
    fn device_type(&self) -> u32 {
        device_type::FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn avail_features(&self) -> u64 {
        self.negotiated.guest_features()
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = self.config.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(offset, "ignoring a write to the read-only virtio-fs config");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got: ctx.queues.len(),
            });
        }
        if !matches!(self.state, State::Ready) {
            return Err(ActivateError::Backend(Box::new(FsError::Broken)));
        }
        if let Err(e) = self.start_vrings(&ctx) {
            // Some rings may already belong to the daemon: no way back but a new device.
            self.state = State::Broken;
            return Err(ActivateError::Backend(Box::new(e)));
        }
        self.state = State::Active {
            interrupt: ctx.interrupt,
        };
        self.activate_evt.write(1).map_err(ActivateError::Event)
    }

    fn is_activated(&self) -> bool {
        matches!(self.state, State::Active { .. })
    }
}

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
        let fd = self.frontend.as_raw_fd();
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
                if self.activate_evt.read().is_ok() && self.is_activated() {
                    self.register_calls(ops);
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
    use super::*;
    use crate::devices::virtio::VIRTIO_F_VERSION_1;
    use event_manager::{EventManager, SubscriberOps};
    use fake_backend::{req, FakeBackend};
    use handshake::{PROTOCOL_FEATURES_BIT, VIRTIO_RING_F_EVENT_IDX};
    use std::sync::Mutex;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::GuestAddress;

    const BACKEND_FEATURES: u64 =
        VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES_BIT | VIRTIO_RING_F_EVENT_IDX;

    #[test]
    fn config_space_holds_tag_and_one_request_queue() {
        let c = config_space("shared").expect("tag");
        assert_eq!(&c[..6], b"shared");
        assert!(c[6..TAG_LEN].iter().all(|&b| b == 0));
        assert_eq!(&c[TAG_LEN..], &1u32.to_le_bytes());
        assert!(config_space(&"x".repeat(36)).is_ok());
        assert!(matches!(config_space(&"x".repeat(37)), Err(FsError::Tag)));
        assert!(matches!(config_space(""), Err(FsError::Tag)));
    }

    fn connect(features: u64) -> (VhostUserFs, FakeBackend, GuestMemoryMmap) {
        let mem = crate::memory::create(4).expect("memory");
        let backend = FakeBackend::start(features, 2);
        let fs = VhostUserFs::new(backend.path(), "myfs", &mem).expect("connect");
        (fs, backend, mem)
    }

    #[test]
    fn handshake_negotiates_and_sends_the_memory_table() {
        let (fs, backend, _mem) = connect(BACKEND_FEATURES);
        assert_eq!(
            fs.avail_features(),
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
        );
        let mut data = [0xffu8; 8];
        fs.read_config(0, &mut data);
        assert_eq!(&data, b"myfs\0\0\0\0");
        fs.read_config(36, &mut data);
        assert_eq!(data, [1, 0, 0, 0, 0, 0, 0, 0]);
        fs.read_config(1000, &mut data);
        assert_eq!(data, [0; 8]);
        assert_eq!(fs.queue_max_sizes(), &[1024, 1024]);
        drop(fs);
        let log = backend.finish();
        let codes: Vec<u32> = log.iter().map(|m| m.request).collect();
        assert_eq!(
            codes,
            [
                req::GET_FEATURES,
                req::GET_PROTOCOL_FEATURES,
                req::SET_PROTOCOL_FEATURES,
                req::GET_QUEUE_NUM,
                req::SET_OWNER,
                req::SET_FEATURES,
                req::SET_MEM_TABLE,
            ]
        );
        // Only MQ of the offered protocol features; VERSION_1 plus the protocol bit.
        assert_eq!(log[2].u64_body(), Some(1));
        assert_eq!(
            log[5].u64_body(),
            Some(VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES_BIT)
        );
        assert_eq!(log[6].fds, 1);
    }

    #[test]
    fn daemon_without_version_1_is_refused() {
        let mem = crate::memory::create(4).expect("memory");
        let backend = FakeBackend::start(PROTOCOL_FEATURES_BIT, 2);
        let err = VhostUserFs::new(backend.path(), "t", &mem).expect_err("refused");
        assert!(matches!(err, FsError::NoVersion1));
        let mem2 = crate::memory::create(4).expect("memory");
        let one_queue = FakeBackend::start(BACKEND_FEATURES, 1);
        let err = VhostUserFs::new(one_queue.path(), "t", &mem2).expect_err("refused");
        assert!(matches!(err, FsError::TooFewQueues(1)));
    }

    fn queues(mem: &GuestMemoryMmap) -> Vec<Queue> {
        [0x10_0000u64, 0x20_0000]
            .iter()
            .map(|&base| {
                MockSplitQueue::create(mem, GuestAddress(base), QUEUE_SIZE)
                    .create_queue::<Queue>()
                    .expect("queue")
            })
            .collect()
    }

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

    #[test]
    fn wrong_queue_count_is_refused() {
        let (mut fs, _backend, mem) = connect(BACKEND_FEATURES);
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("irq")));
        let mut qs = queues(&mem);
        qs.pop();
        let res = fs.activate(ActivateContext {
            mem: mem.clone(),
            interrupt,
            queues: qs,
        });
        assert!(matches!(
            res,
            Err(ActivateError::QueueCount {
                expected: 2,
                got: 1
            })
        ));
    }
}
