//! virtio-rng: an entropy device (virtio 1.2 section 5.4; Linux `virtio_rng` / `hw_random`).
//!
//! One queue, no configuration space, no device features beyond VERSION_1. The driver posts
//! chains of device-writable buffers; the device fills them with random bytes and returns each
//! chain with the number of bytes written. We cap a request at [`MAX_REQUEST_BYTES`] (the driver
//! just asks again), and complete a malformed chain (a device-readable descriptor, memory outside
//! the guest, a loop) with zero bytes.

mod entropy;

use std::io;

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::debug;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

pub use self::entropy::{EntropySource, OsEntropy};
use super::single_queue::SingleQueue;
use super::{device_type, ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::memory::GuestMemoryMmap;

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes handed out for one request.
pub const MAX_REQUEST_BYTES: u32 = 64 * 1024;

const CHUNK: usize = 4096;

/// The device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// Creating an eventfd failed.
    #[error("creating an eventfd")]
    EventFd(#[source] io::Error),
}

/// Why one request got no bytes.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    /// A descriptor is device-readable.
    #[error("descriptor not device-writable")]
    ReadOnly,
    /// A buffer lies outside guest memory.
    #[error("buffer outside guest memory")]
    OutOfBounds,
    /// The chain loops, is longer than the queue or points past the table.
    #[error("descriptor chain not terminated")]
    Unterminated,
    /// The entropy source failed.
    #[error("entropy source")]
    Entropy(#[source] io::Error),
    /// Writing guest memory failed.
    #[error("guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// The virtio-rng device, generic over its entropy source.
pub struct Rng<E: EntropySource = OsEntropy> {
    entropy: E,
    queue: SingleQueue,
    acked_features: u64,
}

impl Rng<OsEntropy> {
    /// A device drawing from the host's `getrandom(2)`.
    ///
    /// # Errors
    /// [`RngError`] if an eventfd cannot be created.
    pub fn new() -> Result<Self, RngError> {
        Self::with_source(OsEntropy)
    }
}

impl<E: EntropySource> Rng<E> {
    /// A device drawing from `entropy`.
    ///
    /// # Errors
    /// [`RngError`] if an eventfd cannot be created.
    pub fn with_source(entropy: E) -> Result<Self, RngError> {
        Ok(Self {
            entropy,
            queue: SingleQueue::new("virtio-rng").map_err(RngError::EventFd)?,
            acked_features: 0,
        })
    }

    /// Serves every available request, then raises the interrupt if any completed.
    fn process_queue(&mut self) {
        let entropy = &mut self.entropy;
        self.queue
            .serve(|mem, chain| fill_chain(mem, chain, &mut *entropy));
    }
}

/// Validates the whole chain, then fills its buffers; returns the bytes written.
fn fill_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    entropy: &mut impl EntropySource,
) -> Result<u32, RequestError> {
    let descs = writable_chain(mem, chain)?;
    let mut buf = [0u8; CHUNK];
    let mut written = 0u32;
    for desc in descs {
        let mut offset = 0u32;
        while offset < desc.len() && written < MAX_REQUEST_BYTES {
            let want = (desc.len() - offset).min(MAX_REQUEST_BYTES - written);
            let n = usize::try_from(want).map_or(CHUNK, |w| w.min(CHUNK));
            let chunk = buf.get_mut(..n).ok_or(RequestError::OutOfBounds)?;
            entropy.fill(chunk).map_err(RequestError::Entropy)?;
            let addr = desc
                .addr()
                .checked_add(u64::from(offset))
                .ok_or(RequestError::OutOfBounds)?;
            mem.write_slice(chunk, addr).map_err(RequestError::Memory)?;
            let n = u32::try_from(n).map_err(|_| RequestError::OutOfBounds)?;
            offset += n;
            written += n;
        }
    }
    Ok(written)
}

/// The chain's descriptors, if all are device-writable, in guest memory, and the chain ends
/// within the queue size.
fn writable_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<Vec<Descriptor>, RequestError> {
    let descs: Vec<Descriptor> = chain.take(usize::from(QUEUE_SIZE) + 1).collect();
    if descs.len() > usize::from(QUEUE_SIZE) || descs.last().is_some_and(Descriptor::has_next) {
        return Err(RequestError::Unterminated);
    }
    for desc in &descs {
        if !desc.is_write_only() {
            return Err(RequestError::ReadOnly);
        }
        let len = usize::try_from(desc.len()).map_err(|_| RequestError::OutOfBounds)?;
        if !GuestMemoryBackend::check_range(mem, desc.addr(), len) {
            return Err(RequestError::OutOfBounds);
        }
    }
    Ok(descs)
}

impl<E: EntropySource> VirtioDevice for Rng<E> {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        self.queue.queue_events()
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        debug!(offset, "virtio-rng: has no configuration space");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.queue.activate(ctx)
    }

    fn is_activated(&self) -> bool {
        self.queue.is_activated()
    }

    fn reset(&mut self) -> bool {
        self.queue.reset();
        self.acked_features = 0;
        true
    }
}

impl<E: EntropySource> MutEventSubscriber for Rng<E> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.queue.process(events, ops) {
            self.process_queue();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.queue.init(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::devices::virtio::Interrupt;
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use event_manager::{EventManager, SubscriberOps};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    /// `VRING_DESC_F_NEXT`.
    const NEXT: u16 = 1;
    /// `VRING_DESC_F_WRITE`.
    const WRITE: u16 = 2;

    /// Deterministic bytes 0, 1, 2, ... wrapping.
    struct Counter(u8);

    impl EntropySource for Counter {
        fn fill(&mut self, buf: &mut [u8]) -> io::Result<()> {
            for b in buf {
                *b = self.0;
                self.0 = self.0.wrapping_add(1);
            }
            Ok(())
        }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).expect("memory")
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    fn activated(mem: &GuestMemoryMmap, vq: &MockSplitQueue<'_, GuestMemoryMmap>) -> Rng<Counter> {
        let mut rng = Rng::with_source(Counter(0)).expect("rng");
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let ctx = ActivateContext {
            mem: mem.clone(),
            interrupt: Arc::new(Interrupt::new(irq)),
            queues: vec![vq.create_queue().expect("queue")],
        };
        rng.activate(ctx).expect("activate");
        rng
    }

    fn used(vq: &MockSplitQueue<'_, GuestMemoryMmap>, index: usize) -> (u32, u32) {
        let elem = vq.used().ring().ref_at(index).expect("used").load();
        (elem.id(), elem.len())
    }

    fn irq_status(rng: &Rng<Counter>) -> u32 {
        rng.queue.interrupt().map_or(0, |i| i.status())
    }

    #[test]
    fn fills_every_writable_buffer() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let mut rng = activated(&mem, &vq);
        let chain = [
            desc(0x10_0000, 100, WRITE | NEXT, 1),
            desc(0x20_0000, 50, WRITE, 0),
        ];
        vq.add_desc_chains(&chain, 0).expect("chain");
        rng.process_queue();
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(used(&vq, 0), (0, 150));
        let mut got = [0u8; 50];
        mem.read_slice(&mut got, GuestAddress(0x20_0000))
            .expect("read");
        assert_eq!(got[0], 100);
        assert_eq!(got[49], 149);
        assert_eq!(irq_status(&rng), 1);
    }

    #[test]
    fn caps_one_request() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let mut rng = activated(&mem, &vq);
        vq.add_desc_chains(&[desc(0x10_0000, 0x20_0000, WRITE, 0)], 0)
            .expect("chain");
        rng.process_queue();
        assert_eq!(used(&vq, 0), (0, MAX_REQUEST_BYTES));
    }

    /// Runs one bad chain followed by a good one; the bad gets 0 bytes, the good is served.
    fn rejects(bad: &[RawDescriptor]) {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let mut rng = activated(&mem, &vq);
        vq.add_desc_chains(bad, 0).expect("bad chain");
        let next = u16::try_from(bad.len()).expect("len");
        vq.add_desc_chains(&[desc(0x30_0000, 8, WRITE, 0)], next)
            .expect("good chain");
        rng.process_queue();
        assert_eq!(vq.used().idx().load(), 2);
        assert_eq!(used(&vq, 0), (0, 0));
        assert_eq!(used(&vq, 1), (u32::from(next), 8));
        let mut untouched = [0xffu8; 16];
        mem.read_slice(&mut untouched, GuestAddress(0x10_0000))
            .expect("read");
        assert_eq!(untouched, [0; 16], "nothing written for the bad chain");
    }

    #[test]
    fn read_only_descriptor_rejects_the_chain() {
        rejects(&[
            desc(0x10_0000, 16, WRITE | NEXT, 1),
            desc(0x11_0000, 16, 0, 0),
        ]);
    }

    #[test]
    fn out_of_bounds_buffers_reject_the_chain() {
        rejects(&[
            desc(0x10_0000, 16, WRITE | NEXT, 1),
            desc(0x3f_fff0, 32, WRITE, 0),
        ]);
        rejects(&[
            desc(0x10_0000, 16, WRITE | NEXT, 1),
            desc(u64::MAX - 4, 8, WRITE, 0),
        ]);
    }

    #[test]
    fn loops_and_overlong_chains_are_rejected() {
        // 0 -> 1 -> 0 -> ...: the walk stops after the queue size with NEXT still set.
        rejects(&[
            desc(0x10_0000, 16, WRITE | NEXT, 1),
            desc(0x10_0010, 16, WRITE | NEXT, 0),
        ]);
        // NEXT pointing past the descriptor table.
        rejects(&[desc(0x10_0000, 16, WRITE | NEXT, 999)]);
    }

    #[test]
    fn bogus_head_index_is_skipped() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let mut rng = activated(&mem, &vq);
        mem.write_obj(999u16, vq.avail_addr().unchecked_add(4))
            .expect("ring");
        mem.write_obj(1u16, vq.avail_addr().unchecked_add(2))
            .expect("idx");
        rng.process_queue();
        assert_eq!(vq.used().idx().load(), 0);
    }

    #[test]
    fn activation_needs_one_queue_and_reset_deactivates() {
        let mem = memory();
        let mut rng = Rng::with_source(Counter(0)).expect("rng");
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
        let ctx = ActivateContext {
            mem: mem.clone(),
            interrupt: irq,
            queues: Vec::new(),
        };
        assert!(matches!(
            rng.activate(ctx),
            Err(ActivateError::QueueCount {
                expected: 1,
                got: 0
            })
        ));
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let mut rng = activated(&mem, &vq);
        assert!(rng.is_activated());
        assert!(rng.reset());
        assert!(!rng.is_activated());
        assert_eq!(rng.avail_features(), VIRTIO_F_VERSION_1);
    }

    #[test]
    fn serves_kicks_from_the_event_loop() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let rng = Arc::new(Mutex::new(Rng::with_source(Counter(7)).expect("rng")));
        let mut manager =
            EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().expect("manager");
        manager.add_subscriber(rng.clone());
        {
            let mut dev = rng.lock().expect("lock");
            let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
            let ctx = ActivateContext {
                mem: mem.clone(),
                interrupt: Arc::new(Interrupt::new(irq)),
                queues: vec![vq.create_queue().expect("queue")],
            };
            dev.activate(ctx).expect("activate");
        }
        assert_eq!(manager.run_with_timeout(100).expect("run"), 1);
        vq.add_desc_chains(&[desc(0x10_0000, 4, WRITE, 0)], 0)
            .expect("chain");
        rng.lock().expect("lock").queue_events()[0]
            .write(1)
            .expect("kick");
        assert_eq!(manager.run_with_timeout(100).expect("run"), 1);
        assert_eq!(used(&vq, 0), (0, 4));
        let got: [u8; 4] = mem.read_obj(GuestAddress(0x10_0000)).expect("read");
        assert_eq!(got, [7, 8, 9, 10]);
    }
}
