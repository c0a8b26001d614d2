//! The virtio-rng device: a one-queue device ([`SingleQueueDevice`]) whose requests
//! [`RngHandler`] fills with random bytes.

use std::io::{self, Write};

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::DescriptorChain;

use super::entropy::{EntropySource, OsEntropy};
use super::{RngError, MAX_REQUEST_BYTES, QUEUE_SIZE};
use crate::devices::virtio::chain::{self, ChainError, Limits};
use crate::devices::virtio::single_queue::{RequestHandler, SingleQueueDevice};
use crate::devices::virtio::VIRTIO_F_VERSION_1;
use crate::memory::GuestMemoryMmap;

/// Bytes drawn from the source at a time.
const CHUNK: usize = 4096;
/// A request chain: up to a queue's worth of device-writable descriptors, any length.
const LIMITS: Limits = Limits::descriptors(QUEUE_SIZE as usize);

/// Why one request got no bytes.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain is malformed: a device-readable descriptor, memory outside the guest, a loop.
    #[error("malformed descriptor chain")]
    Chain(#[from] ChainError),
    /// The entropy source failed.
    #[error("entropy source")]
    Entropy(#[source] io::Error),
    /// Writing guest memory failed.
    #[error("guest memory")]
    Memory(#[source] io::Error),
}

/// The virtio-rng device, generic over its entropy source.
pub type Rng<E = OsEntropy> = SingleQueueDevice<RngHandler<E>>;

/// Fills virtio-rng requests from an entropy source.
pub struct RngHandler<E: EntropySource> {
    entropy: E,
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
        Self::with_handler(RngHandler { entropy }).map_err(RngError::EventFd)
    }
}

impl<E: EntropySource> RequestHandler for RngHandler<E> {
    const DEVICE_TYPE: u32 = VIRTIO_ID_RNG;
    const NAME: &'static str = "virtio-rng";
    const QUEUE_SIZE: u16 = QUEUE_SIZE;
    type Error = RequestError;

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    /// Validates the whole chain, then fills its buffers; returns the bytes written.
    fn handle(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<u32, RequestError> {
        let mut writer = chain::writer(mem, chain, LIMITS)?;
        let max = usize::try_from(MAX_REQUEST_BYTES).unwrap_or(usize::MAX);
        let mut left = writer.available_bytes().min(max);
        let mut buf = [0u8; CHUNK];
        while left > 0 {
            let chunk = &mut buf[..left.min(CHUNK)];
            self.entropy.fill(chunk).map_err(RequestError::Entropy)?;
            writer.write_all(chunk).map_err(RequestError::Memory)?;
            left -= chunk.len();
        }
        // At most MAX_REQUEST_BYTES.
        Ok(u32::try_from(writer.bytes_written()).unwrap_or(MAX_REQUEST_BYTES))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::rng::test_utils::{activated, irq_status, memory, used, Counter};
    use crate::devices::virtio::test_utils::{activation, raw as desc, INDIRECT, NEXT, WRITE};
    use crate::devices::virtio::{ActivateError, VirtioDevice};

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
    fn a_wake_up_serves_at_most_its_budget_then_kicks_itself() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let mut rng = activated(&mem, &vq);
        let chains: Vec<_> = (0..5u64)
            .map(|i| desc(0x10_0000 + i * 0x100, 16, WRITE, 0))
            .collect();
        vq.add_desc_chains(&chains, 0).expect("chains");
        let kick = |rng: &Rng<Counter>| rng.queue_events()[0].read().ok();
        assert_eq!(rng.serve_up_to(2), 2);
        assert_eq!(vq.used().idx().load(), 2);
        assert_eq!(irq_status(&rng), 1);
        assert_eq!(kick(&rng), Some(1), "a spent budget re-kicks the queue");
        assert_eq!(rng.serve_up_to(2), 2);
        assert_eq!(kick(&rng), Some(1));
        // The last chain fits the budget: served, and nothing more is due.
        assert_eq!(rng.serve_up_to(2), 1);
        assert_eq!(vq.used().idx().load(), 5);
        assert_eq!(kick(&rng), None);
        assert_eq!(rng.serve_up_to(2), 0);
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
        assert_eq!(rng.guest_errors().count(), 1);
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
        // Through an indirect table: more descriptors than the queue holds.
        let mem = memory();
        let table = virtio_queue::mock::DescriptorTable::new(&mem, GuestAddress(0x20_0000), 300);
        for i in 0..300u16 {
            let flags = if i == 299 { WRITE } else { WRITE | NEXT };
            table
                .store(i, desc(0x10_0000, 1, flags, i + 1))
                .expect("store");
        }
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let mut rng = activated(&mem, &vq);
        vq.add_desc_chains(&[desc(0x20_0000, 300 * 16, INDIRECT, 0)], 0)
            .expect("chain");
        rng.process_queue();
        assert_eq!(used(&vq, 0), (0, 0));
        let first: u8 = mem.read_obj(GuestAddress(0x10_0000)).expect("read");
        assert_eq!(first, 0, "nothing written");
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
        let (ctx, _) = activation(&mem, Vec::new());
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
            let (ctx, _) = activation(&mem, vec![vq.create_queue().expect("queue")]);
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
