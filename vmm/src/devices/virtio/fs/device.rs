//! The virtio-fs device: the vhost-user connection, the configuration space, and handing the
//! rings to the daemon on activation.
//!
//! Activation is split across threads like every other device's: the vCPU that writes
//! DRIVER_OK only stores the queues and signals the activation eventfd
//! ([`VirtioDevice::activate`]); the event loop then hands the rings to virtiofsd
//! ([`VhostUserFs::complete_activation`]). So no vCPU thread ever talks to the daemon, and its
//! seccomp filter holds no socket call.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use vhost::vhost_user::Frontend;
use vhost::VhostBackend;
use virtio_bindings::virtio_ids::VIRTIO_ID_FS;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::handshake::{connect_handshake, start_vring, Negotiated};
use super::{FsError, CONFIG_LEN, NUM_QUEUES, QUEUE_SIZE, TAG_LEN, TOKEN_CALL};
use crate::devices::virtio::{
    ActivateContext, ActivateError, Interrupt, PersistError, QueueProgress, VirtioDevice,
};
use crate::memory::GuestMemoryMmap;

/// Where the device is in its life.
#[derive(Debug)]
enum State {
    /// Connected and negotiated; the driver has not started the device.
    Ready,
    /// The driver set DRIVER_OK: the queues wait for the event loop to hand them to the daemon.
    Activating {
        /// The queues, memory and interrupt line the transport passed.
        ctx: ActivateContext,
    },
    /// The daemon owns the rings; calls are forwarded to this interrupt line.
    Active {
        /// The device's interrupt line.
        interrupt: Arc<Interrupt>,
        /// The rings as handed over (a snapshot reads their used index).
        queues: Vec<Queue>,
        /// Guest memory.
        mem: GuestMemoryMmap,
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
    pub(super) activate_evt: EventFd,
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
        let frontend = Frontend::connect(socket, max_queues).map_err(FsError::Connect)?;
        Self::with_frontend(frontend, config, mem)
    }

    /// [`Self::new`] over a connected stream (the fuzz targets play the daemon on a socket pair).
    ///
    /// # Errors
    /// [`FsError`] when the tag is invalid or the daemon refuses.
    pub fn from_stream(
        stream: UnixStream,
        tag: &str,
        mem: &GuestMemoryMmap,
    ) -> Result<Self, FsError> {
        let config = config_space(tag)?;
        let max_queues = u64::try_from(NUM_QUEUES).map_err(|_| FsError::Tag)?;
        Self::with_frontend(Frontend::from_stream(stream, max_queues), config, mem)
    }

    fn with_frontend(
        mut frontend: Frontend,
        config: [u8; CONFIG_LEN],
        mem: &GuestMemoryMmap,
    ) -> Result<Self, FsError> {
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

    /// The vhost-user socket (watched for hang-up; the event loop's filter allows the vhost-user
    /// messages on it and on no other socket).
    pub fn backend_fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
    }

    /// The event loop's half of activation: hands every ring the driver configured to the daemon
    /// (features, then per queue num/base/addr/call/kick/enable). Returns false when nothing was
    /// waiting (a spurious wakeup, or the device is already active or broken).
    ///
    /// # Errors
    /// [`FsError`] when the daemon refuses a message; the device is then broken (some rings
    /// may already belong to the daemon), reports DEVICE_NEEDS_RESET, and raises a
    /// configuration interrupt so the driver notices.
    pub fn complete_activation(&mut self) -> Result<bool, FsError> {
        let ctx = match std::mem::replace(&mut self.state, State::Broken) {
            State::Activating { ctx } => ctx,
            other => {
                self.state = other;
                return Ok(false);
            }
        };
        if let Err(e) = self.start_vrings(&ctx) {
            if let Err(irq) = ctx.interrupt.signal_config_change() {
                tracing::warn!(error = %irq, "virtio-fs configuration interrupt");
            }
            return Err(e);
        }
        self.state = State::Active {
            interrupt: ctx.interrupt,
            queues: ctx.queues,
            mem: ctx.mem,
        };
        Ok(true)
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

    pub(super) fn backend_gone(&mut self, ops: &mut EventOps) {
        tracing::error!("virtiofsd closed its vhost-user socket; virtio-fs stops");
        self.state = State::Broken;
        let fd = self.frontend.as_raw_fd();
        if let Err(e) = ops.remove(Events::empty_raw(fd)) {
            tracing::warn!(error = ?e, "unregistering the virtiofsd socket");
        }
    }

    pub(super) fn forward_call(&self, index: usize) {
        let Some(evt) = self.call_evts.get(index) else {
            return;
        };
        // Non-blocking: a spurious wakeup reads EAGAIN and is harmless.
        if evt.read().is_err() {
            return;
        }
        if let State::Active { interrupt, .. } = &self.state {
            if let Err(e) = interrupt.signal_used_queue() {
                tracing::warn!(error = %e, "virtio-fs interrupt");
            }
        }
    }

    pub(super) fn register_calls(&self, ops: &mut EventOps) {
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
        VIRTIO_ID_FS
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
        // The vhost-user messages are the event loop's: see `complete_activation`.
        self.activate_evt.write(1).map_err(ActivateError::Event)?;
        self.state = State::Activating { ctx };
        Ok(())
    }

    fn is_activated(&self) -> bool {
        matches!(self.state, State::Activating { .. } | State::Active { .. })
    }

    fn needs_reset(&self) -> bool {
        matches!(self.state, State::Broken)
    }

    /// Asks virtiofsd where it stands in each ring (`GET_VRING_BASE`, which also stops the ring:
    /// the snapshotted VM is never resumed) and reads the used index from guest memory.
    ///
    /// Only a device that never carried a request can be saved: the FUSE session (INIT, node
    /// ids, open handles) lives in the template's virtiofsd and cannot move to a clone's, so a
    /// template must be taken before the guest mounts the share (the agent mounts it when the
    /// kernel command line names it). Any ring the daemon has taken a request from is refused.
    /// The call blocks the event loop until virtiofsd answers (vhost-user has no timeout here);
    /// the template's daemon is the host's own, started for the template.
    fn queue_progress(&mut self) -> Result<Vec<QueueProgress>, PersistError> {
        let (queues, mem) = match &self.state {
            State::Ready => return Ok(Vec::new()),
            State::Activating { .. } => return Err(PersistError::Busy("virtio-fs activation")),
            State::Broken => return Err(PersistError::Broken),
            State::Active { queues, mem, .. } => (queues, mem),
        };
        let mut progress = Vec::with_capacity(queues.len());
        for (index, queue) in queues.iter().enumerate() {
            let base = self
                .frontend
                .get_vring_base(index)
                .map_err(|e| PersistError::Backend(Box::new(FsError::Vring(e))))?;
            let next_avail = u16::try_from(base)
                .map_err(|_| PersistError::Backend(Box::new(FsError::VringBase(base))))?;
            let used = queue
                .used_idx(mem, std::sync::atomic::Ordering::Acquire)
                .map_err(|e| PersistError::Backend(Box::new(e)))?;
            if next_avail != 0 || used.0 != 0 {
                return Err(PersistError::Busy(
                    "virtio-fs served requests: its FUSE session cannot move to a clone",
                ));
            }
            progress.push(QueueProgress {
                next_avail,
                next_used: used.0,
            });
        }
        Ok(progress)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::fs::handshake::{PROTOCOL_FEATURES_BIT, VIRTIO_RING_F_EVENT_IDX};
    use crate::devices::virtio::fs::test_utils::{
        connect, queues, req, FakeBackend, BACKEND_FEATURES,
    };
    use crate::devices::virtio::VIRTIO_F_VERSION_1;

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

    #[test]
    fn from_stream_reads_the_daemon_replies_from_the_stream() {
        let mem = crate::memory::create(2).expect("memory");
        // A daemon whose only reply (GET_FEATURES) lacks VERSION_1, then hangs up its side.
        let (ours, mut daemon) = UnixStream::pair().expect("socketpair");
        let mut reply = Vec::new();
        for word in [req::GET_FEATURES, 0x1 | 0x4, 8] {
            reply.extend_from_slice(&word.to_le_bytes());
        }
        reply.extend_from_slice(&PROTOCOL_FEATURES_BIT.to_le_bytes());
        std::io::Write::write_all(&mut daemon, &reply).expect("reply");
        daemon
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        let err = VhostUserFs::from_stream(ours, "t", &mem).expect_err("refused");
        assert!(matches!(err, FsError::NoVersion1));
        // No reply at all: the handshake fails instead of waiting.
        let (ours, daemon) = UnixStream::pair().expect("socketpair");
        daemon
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        let err = VhostUserFs::from_stream(ours, "t", &mem).expect_err("refused");
        assert!(matches!(err, FsError::Handshake(_)));
        let (ours, _daemon) = UnixStream::pair().expect("socketpair");
        assert!(matches!(
            VhostUserFs::from_stream(ours, "", &mem),
            Err(FsError::Tag)
        ));
    }

    #[test]
    fn the_vcpus_half_of_activation_sends_nothing_and_a_refusal_later_asks_for_a_reset() {
        let (mut fs, backend, mem) = connect(BACKEND_FEATURES);
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("irq")));
        fs.activate(ActivateContext {
            mem: mem.clone(),
            interrupt: interrupt.clone(),
            queues: queues(&mem),
        })
        .expect("activate");
        assert!(fs.is_activated() && !fs.needs_reset());
        assert_eq!(fs.activate_evt.read().expect("the event loop is told"), 1);
        // The daemon goes away before the event loop hands it the rings.
        let log = backend.finish();
        assert_eq!(
            log.last().map(|m| m.request),
            Some(req::SET_MEM_TABLE),
            "the vCPU's half talked to the daemon"
        );
        assert!(fs.complete_activation().is_err());
        assert!(fs.needs_reset() && !fs.is_activated());
        assert_eq!(
            interrupt.status(),
            crate::devices::virtio::VIRTIO_MMIO_INT_CONFIG
        );
        // Nothing is waiting any more: a second wakeup does nothing.
        assert!(!fs.complete_activation().expect("nothing to do"));
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
